"""Shared machinery of the meta-learning methods.

Every method works on the same split of the chosen encoder (``last_block_paths``):

* the **trunk** -- every layer before the encoder's last block -- is frozen; its outputs are
  computed once for the images a stage needs and kept in a :class:`FeatureBank`
  (e.g. ResNet-18: the (8w, 4, 4) input of ``layer4[-1]`` for a 32x32 image);
* the **body** -- the last block plus the encoder's pooling -- is trained by each method,
  mapping trunk features to pooled features (B, D). ``meta.train_block=false`` trains no encoder
  weight at all: the body is the identity over the stage's saved L2-normalised embeddings.

A :class:`MetaMethod` is an ``nn.Module`` holding the body and its own parts (pair head, relation
module, Meta-SGD learning rates ...). ``step(tasks)`` does one meta-training step over a meta-batch of
episodes; ``predict(xs, ys, xq, C)`` adapts to a support set and returns query probabilities, which
makes every method usable as an inference head.
"""
from __future__ import annotations

import copy
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src import io
from src.config import MetaCfg
from src.errors import UserError
from src.models.encoder import to_input, unwrap
from src.runtime import autocast


# ---------------------------------------------------------------------------------------------
# Encoder split: frozen trunk (cached) + trainable last block
# ---------------------------------------------------------------------------------------------
def last_block_paths(net: nn.Module) -> tuple[str, str | None]:
    """(module path of the last block, path of the norm applied after it or None) for the timm
    families this repository uses: ResNet (layer4[-1]), ConvNeXt (stages[-1].blocks[-1], then
    norm_pre) and ViT (blocks[-1], then norm)."""
    if hasattr(net, "layer4"):
        return f"layer4.{len(net.layer4) - 1}", None
    if hasattr(net, "stages") and hasattr(net.stages[-1], "blocks"):
        return f"stages.{len(net.stages) - 1}.blocks.{len(net.stages[-1].blocks) - 1}", "norm_pre"
    if hasattr(net, "blocks"):
        return f"blocks.{len(net.blocks) - 1}", "norm"
    raise UserError(f"backbone.name: meta.train_block needs a ResNet, ConvNeXt or ViT backbone, got "
                    f"{type(net).__name__} (set meta.train_block=false to meta-learn on the embeddings)")


class _StopForward(Exception):
    pass


class EncoderTail(nn.Module):
    """The trainable end of an encoder: last block (+ norm) + timm's pooling head.
    forward(trunk features) -> pooled features (B, dim)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(unwrap(encoder).net)  # never touch the caller's encoder
        self.block, self.post = last_block_paths(self.net)
        self.dim = int(self.net.num_features)
        trainable = [self.block] + ([self.post] if self.post else [])
        for name, p in self.net.named_parameters():
            p.requires_grad_(any(name.startswith(t + ".") for t in trainable))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.get_submodule(self.block)(x)
        if self.post:
            x = self.net.get_submodule(self.post)(x)
        return self.net.forward_head(x)


class Identity(nn.Module):
    """Body of meta.train_block=false: the inputs already are the (L2-normalised) embeddings."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def trunk_forward(encoder: nn.Module, x: torch.Tensor, device: torch.device, precision: str = "bf16") -> torch.Tensor:
    """Input of the encoder's last block for a normalised batch x (B, 3, S, S): float16 (B, ...).
    The forward stops at the block (a pre-hook raises), so the block itself is never computed.
    The caller sets the encoder's mode (eval: running batch-norm statistics)."""
    net = unwrap(encoder).net
    block, _ = last_block_paths(net)
    captured: list[torch.Tensor] = []

    def hook(_module, inputs):
        captured.append(inputs[0].to(torch.float16))
        raise _StopForward

    handle = net.get_submodule(block).register_forward_pre_hook(hook)
    try:
        with autocast(device, precision):
            try:
                encoder(x)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def trunk_features(encoder: nn.Module, images: np.ndarray, rows: np.ndarray, device: torch.device,
                   batch_size: int = 512, precision: str = "bf16", progress: bool = False) -> torch.Tensor:
    """Inputs of the encoder's last block for images[rows]: float16 (len(rows), ...) on `device`."""
    captured: list[torch.Tensor] = []
    was_training = encoder.training
    encoder.eval()
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="trunk features", disable=not progress,
                          mininterval=2):
            batch = torch.from_numpy(np.ascontiguousarray(images[rows[start:start + batch_size]]))
            captured.append(trunk_forward(encoder, to_input(batch.to(device)), device, precision))
    finally:
        encoder.train(was_training)
    return torch.cat(captured) if captured else torch.zeros(0, device=device, dtype=torch.float16)


class TrunkCache:
    """trunk_features of image rows, each row computed once and kept. Trunk features read no label,
    so every support re-draw of one encoder shares them (the test rows are most of each draw's)."""

    def __init__(self, encoder: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 512,
                 precision: str = "bf16"):
        self.encoder, self.images, self.device = encoder, images, device
        self.batch_size, self.precision = batch_size, precision
        self.pos = np.full(len(images), -1, np.int64)  # (N,) row -> position in feats, -1: not computed
        self.feats: torch.Tensor | None = None  # (computed rows, ...) float16

    def __call__(self, rows: np.ndarray, progress: bool = False) -> torch.Tensor:
        """trunk_features(encoder, images, rows, ...): float16 (len(rows), ...) on the device."""
        rows = np.asarray(rows, np.int64)
        missing = np.unique(rows[self.pos[rows] < 0])
        if len(missing):
            new = trunk_features(self.encoder, self.images, missing, self.device, self.batch_size, self.precision,
                                 progress)
            start = 0 if self.feats is None else len(self.feats)
            self.feats = new if self.feats is None else torch.cat([self.feats, new])
            self.pos[missing] = start + np.arange(len(missing))
        return self.feats[torch.from_numpy(self.pos[rows]).to(self.feats.device)]


class FeatureBank:
    """Cached body inputs for a set of image rows; ``bank[rows]`` -> float32 tensor on the device."""

    def __init__(self, rows: np.ndarray, feats: torch.Tensor, n_total: int):
        self.pos = np.full(n_total, -1, np.int64)
        self.pos[rows] = np.arange(len(rows))
        self.feats = feats

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        pos = self.pos[np.asarray(rows)]
        if (pos < 0).any():
            raise KeyError(f"rows not in the feature bank: {np.asarray(rows)[pos < 0][:5].tolist()}")
        return self.feats[torch.from_numpy(pos).to(self.feats.device)].float()

    def task_inputs(self, episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Body inputs of an episode's support and query rows (src.meta.task_augment computes
        augmented ones per episode instead)."""
        return self[episode.support_rows], self[episode.query_rows]


@dataclass
class Task:
    """One episode as tensors: support (xs, ys) and query (xq, yq); labels in 0..n_way-1.
    n_way is a host int, so no step has to read it back from the device."""

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    n_way: int


def make_task(bank: FeatureBank, episode, device: torch.device) -> Task:
    xs, xq = bank.task_inputs(episode)
    return Task(xs, torch.as_tensor(episode.support_y, device=device), xq,
                torch.as_tensor(episode.query_y, device=device), len(episode.classes))


# ---------------------------------------------------------------------------------------------
# Scores -> probabilities shared by the methods
# ---------------------------------------------------------------------------------------------
def one_hot(y: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) int -> (N, C). A scatter: unlike F.one_hot it never reads y back to the host (no CUDA sync)."""
    return torch.zeros(len(y), n_classes, dtype=dtype, device=y.device).scatter_(1, y[:, None], 1.0)


def class_mean(values: torch.Tensor, ys: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over support rows of each class. values (S, ...) -> (C, ...); plus present (C,) bool.
    Absent classes get zeros."""
    onehot = one_hot(ys, n_classes, values.dtype)  # (S, C)
    counts = onehot.sum(0)
    means = (onehot.T @ values.reshape(len(values), -1)) / counts.clamp_min(1)[:, None]
    return means.reshape(n_classes, *values.shape[1:]), counts > 0


def masked_softmax(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes present in the support; absent classes get probability 0."""
    return torch.softmax(logits.float().masked_fill(~present[None, :], float("-inf")), dim=1)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
class MetaMethod(nn.Module):
    """Base class. Subclasses implement ``loss(task)`` (and optionally ``step``) and ``scores``."""

    name = "?"
    task_augment = False  # meta-trains on task-augmented episodes when meta.task_augment is set

    def __init__(self, cfg: MetaCfg, body: nn.Module, device: torch.device | str = "cpu", precision: str = "fp32"):
        super().__init__()
        self.cfg = cfg
        self.body = body
        self.dim = int(body.dim)
        self.device = torch.device(device)
        self.precision = precision
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- training ----
    def setup(self) -> None:
        """Move to the device and create the outer optimiser (call after building every part)."""
        self.to(self.device)
        params = [p for p in self.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.Adam(params, lr=self.cfg.outer_lr, **fused) if params else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.body(x).float()

    def loss(self, task: Task) -> torch.Tensor:
        raise NotImplementedError

    def step(self, tasks: list[Task], iteration: int) -> torch.Tensor:
        """One optimiser step on the mean loss of a meta-batch. Returns the detached loss (no sync)."""
        self.train()
        if self.optimizer is None:  # nothing trainable (e.g. ProtoNet on frozen embeddings)
            with torch.no_grad():
                return torch.stack([self.loss(t) for t in tasks]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.stack([self.loss(t) for t in tasks]).mean()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    # ---- inference ----
    def scores(self, hs: torch.Tensor, ys: torch.Tensor, hq: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Class logits (Q, C) of query features hq given support features hs (S, D), labels ys."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, n_classes: int,
                batch_size: int = 512) -> np.ndarray:
        """Adapt to the support (xs, ys) and return float32 probabilities (Q, C) of the queries.
        Metric methods: features in eval mode (running batch-norm statistics), no adaptation."""
        self.eval()
        hs = self.features(xs)
        present = torch.bincount(ys, minlength=n_classes) > 0
        out = [masked_softmax(self.scores(hs, ys, self.features(xq[i:i + batch_size]), n_classes), present)
               for i in range(0, len(xq), batch_size)]
        return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, n_classes), np.float32)


# ---------------------------------------------------------------------------------------------
# Meta-training loop with checkpoint/resume
# ---------------------------------------------------------------------------------------------
def episode_rng(seed: int, name: str, iteration: int) -> np.random.Generator:
    """Episodes depend only on (seed, method, iteration): a resumed run draws the same ones."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), iteration])


def meta_train(method: MetaMethod, sampler, bank: FeatureBank, seed: int, checkpoint: Path | None = None,
               log: Path | None = None, progress: bool = False, tag: str = "") -> dict:
    """cfg.episodes meta-iterations of cfg.meta_batch episodes each; resumes from `checkpoint`."""
    cfg, start = method.cfg, 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=method.device, weights_only=True)
        method.load_state_dict(state["model"])
        if method.optimizer is not None and state.get("optimizer"):
            method.optimizer.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
    losses: list[torch.Tensor] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.episodes), desc=f"meta {tag or method.name}", disable=not progress, mininterval=2)
    for it in bar:
        rng = episode_rng(seed, tag or method.name, it)
        tasks = [make_task(bank, sampler.sample(rng), method.device) for _ in range(cfg.meta_batch)]
        losses.append(method.step(tasks, it))
        last = it + 1 == cfg.episodes
        if log is not None and ((it + 1) % max(cfg.log_every, 1) == 0 or last):
            recent = torch.stack(losses[-max(cfg.log_every, 1):]).mean().item()  # one sync per log line
            io.append_jsonl(log, {"method": tag or method.name, "iteration": it + 1, "loss": round(recent, 5),
                                  "seconds": round(time.perf_counter() - t0, 2)})
        if checkpoint is not None and cfg.checkpoint_every > 0 and ((it + 1) % cfg.checkpoint_every == 0 or last):
            state = {"model": method.state_dict(), "iteration": it + 1,
                     "optimizer": method.optimizer.state_dict() if method.optimizer is not None else {}}
            with io.atomic_path(checkpoint, suffix=".pt") as tmp:
                torch.save(state, tmp)
    final = torch.stack(losses[-max(cfg.log_every, 1):]).mean().item() if losses else float("nan")
    return {"iterations": cfg.episodes, "resumed_from": start, "final_loss": final}



# ---------------------------------------------------------------------------------------------
# Peak memory of one block of work
# ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory (MiB) while the block runs: CUDA max allocated on a GPU; on CPU the peak
    resident set size of this process, sampled every 20 ms by a thread (ru_maxrss is a
    process-lifetime high-water mark, useless per method)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.mb = max(self.mb, self._rss_mb())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.mb = self._rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mb = max(self.mb, self._rss_mb())
