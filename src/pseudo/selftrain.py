"""FixMatch-style self-training (Sohn et al. 2020) of encoder + classifier between pseudo-label rounds.

One step (per process; B = pseudo.self_train_batch_size / world, mu = pseudo.unlabeled_ratio):

    labeled batch:   B rows drawn from labeled + selected pseudo-labeled images, weak view
                     -> cross-entropy with their (pseudo-)labels                       (L_x)
    unlabeled batch: mu*B rows of every unlabeled image (test included), weak + strong views;
                     the weak view's prediction (no gradient) is the target of the strong view
                     where its confidence >= threshold (fixed, or FreeMatch self-adaptive) (L_u)
    loss = L_x + consistency_weight * L_u;  one forward pass over the concatenated 1+2mu batches.

With pseudo.self_train_budget_s > 0 the round is fitted to that many wall seconds: steps FIT_FROM..FIT_AT
are timed (after cuDNN's autotuning and the allocator's growth) and the total becomes what fits
(:func:`fit_total_steps`); the warm-up + cosine schedule is recomputed for it.

The EMA of the weights (momentum pseudo.ema, ramped up as min(ema, (1+t)/(10+t)) so short runs
still move it) embeds the images and predicts afterwards. Images stay uint8 on the device and are
augmented there in batches (src.augment); bf16 autocast on CUDA; channels_last; optional
torch.compile; fused SGD on CUDA; LR schedule computed up front; no host sync inside a step.
Under torchrun each process draws its own batches (DDP averages the gradients).

    model, log = self_train(cfg, encoder, images, train_rows, train_y, unlabeled_rows, device, ckpt_dir)
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src import io
from src.augment import strong_augment, weak_augment
from src.config import Config
from src.runtime import autocast, sync, use_channels_last
from src.pseudo.selection import SelfAdaptiveThreshold
from src.train_utils import (Checkpointer, all_reduce_mean, barrier, build_optimizer, dist_info, ema_update,
                             param_groups, set_lr, shard_rows, steps_per_epoch, warmup_cosine, wrap_ddp)


class CosineClassifier(nn.Module):
    """logits = cos(f, w_c) / temperature: (B, D) features -> (B, C). Weights (C, D), e.g. class
    prototypes (Gidaris & Komodakis 2018; Chen et al. 2019 'A Closer Look at Few-shot Classification')."""

    def __init__(self, dim: int, n_classes: int, temperature: float = 0.1, init: torch.Tensor | None = None):
        super().__init__()
        self.temperature = temperature
        self.weight = nn.Parameter(init.clone().float() if init is not None else torch.randn(n_classes, dim) * 0.01)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float(), dim=1) @ F.normalize(self.weight, dim=1).T / self.temperature


class Classifier(nn.Module):
    """Encoder + head: uint8-derived normalised images (B, 3, H, W) -> logits (B, C)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.dim = encoder.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def make_head(kind: str, dim: int, n_classes: int, temperature: float, prototypes: np.ndarray | None) -> nn.Module:
    if kind == "cosine":
        init = torch.from_numpy(prototypes) if prototypes is not None else None
        return CosineClassifier(dim, n_classes, temperature, init)
    return nn.Linear(dim, n_classes)


FIT_FROM, FIT_AT = 5, 25  # steps timed for the budget fit (pseudo.self_train_budget_s)


def fit_total_steps(budget_s: float, elapsed_s: float, seconds_per_step: float, done: int, total: int) -> int:
    """Steps of a round that fit budget_s: the `done` steps took elapsed_s; the rest run at
    seconds_per_step, with 5 % left for the per-epoch checkpoints. Never more than `total`, never
    fewer than done + 1."""
    more = math.floor(0.95 * max(budget_s - elapsed_s, 0.0) / max(seconds_per_step, 1e-9) + 1e-9)
    return int(max(done + 1, min(total, done + more)))


def ema_momentum(base: float, step: int) -> float:
    """Ramp-up used by mean teacher / TF ExponentialMovingAverage(num_updates)."""
    return min(base, (1.0 + step) / (10.0 + step))


def self_train(cfg: Config, model: Classifier, images: np.ndarray, train_rows: np.ndarray, train_y: np.ndarray,
               unlabeled_rows: np.ndarray, device: torch.device, ckpt_dir: Path, log_path: Path | None = None,
               round_no: int = 0) -> tuple[Classifier, list[dict]]:
    """Train `model` in place; return (EMA model, per-epoch log records). Resumes from ckpt_dir."""
    p, info = cfg.pseudo, dist_info()
    size = cfg.data.image_size
    batch = p.self_train_batch_size // info.world  # labeled images per process and step
    ubatch = batch * p.unlabeled_ratio
    steps = steps_per_epoch(len(unlabeled_rows), ubatch, info.world, p.max_steps_per_epoch)
    total = steps * p.self_train_epochs
    base_lr = p.self_train_lr * p.self_train_batch_size / 64  # linear scaling from FixMatch's B = 64
    warmup = int(p.self_train_warmup_epochs * steps)
    lrs = warmup_cosine(base_lr, total, warmup)
    channels_last = use_channels_last(cfg.run.channels_last, device, model)

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval()
    for q in ema.parameters():
        q.requires_grad_(False)
    optimizer = build_optimizer("sgd", param_groups(model, p.self_train_weight_decay), base_lr, 0.9, device,
                                "pseudo.self_train")
    sat = SelfAdaptiveThreshold(model.head.weight.shape[0], device)  # both heads: weight (C, D)
    pair = nn.ModuleDict({"model": model, "ema": ema})  # one checkpoint file for both
    ckpt = Checkpointer(ckpt_dir)
    state = ckpt.load(pair, optimizer, device)
    start = int(state["epoch"]) if state else 0
    fitting = p.self_train_budget_s > 0 and steps > FIT_AT
    if p.self_train_budget_s > 0 and not fitting and info.is_main:
        print(f"self-train r{round_no}: {steps} steps per epoch are too few to time (the fit needs > {FIT_AT}); "
              f"pseudo.self_train_budget_s is not applied", flush=True)
    if state and "total_steps" in state:  # a fitted round resumes with its fitted length
        total, fitting = int(state["total_steps"]), False
        lrs = warmup_cosine(base_lr, total, min(warmup, total // 2))
    if state and "sat" in state:
        sat.load_state_dict(state["sat"])
    if cfg.run.compile:
        model.encoder.compile()  # in place: state_dict keys unchanged; the EMA copy stays eager
    net = wrap_ddp(model, device)

    gpu_images = torch.from_numpy(np.array(images)).to(device)  # uint8 (N, H, W, 3), a writable copy
    pool = torch.from_numpy(np.asarray(train_rows, np.int64)).to(device)
    pool_y = torch.from_numpy(np.asarray(train_y, np.int64)).to(device)
    unl = torch.from_numpy(np.asarray(unlabeled_rows, np.int64)).to(device)
    weak, strong = weak_augment(size, channels_last), strong_augment(size, channels_last)
    # Epoch records of this round written before an interruption (appended after each checkpoint).
    log = [r for r in io.read_jsonl(log_path) if r.get("round") == round_no and r["epoch"] <= start] \
        if (log_path and start) else []

    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    ema_buffers, model_buffers = list(ema.buffers()), list(model.buffers())
    t_round = time.perf_counter()
    for epoch in range(start, p.self_train_epochs):
        if epoch * steps >= total:
            break
        net.train()
        g = torch.Generator(device=device).manual_seed((cfg.run.seed * 1_000_003 + round_no * 1009 + epoch) * 64
                                                       + info.rank)
        urows = shard_rows(len(unl), ubatch, epoch, cfg.run.seed + round_no, device)  # (steps_all, mu*B)
        sums = torch.zeros(4, device=device)  # loss, L_x, L_u, mask rate: read once per epoch
        sync(device)
        t0 = time.perf_counter()
        for s in tqdm(range(steps), desc=f"self-train r{round_no} {epoch + 1}/{p.self_train_epochs}",
                      disable=not (cfg.run.progress and info.is_main), mininterval=2):
            step = epoch * steps + s
            if step >= total:
                break
            if fitting and step in (FIT_FROM, FIT_AT):
                sync(device)
                if step == FIT_FROM:
                    t_fit = time.perf_counter()
                else:
                    now = time.perf_counter()
                    per_step = torch.tensor((now - t_fit) / (FIT_AT - FIT_FROM), dtype=torch.float64, device=device)
                    per_step = float(all_reduce_mean(per_step))  # every rank fits the same total
                    total = fit_total_steps(p.self_train_budget_s, now - t_round, per_step, step, total)
                    lrs = warmup_cosine(base_lr, total, min(warmup, total // 2))
                    fitting = False
                    if info.is_main:
                        print(f"self-train r{round_no}: {per_step:.3f} s per step; {total} of "
                              f"{steps * p.self_train_epochs} steps fit {p.self_train_budget_s:.0f} s", flush=True)
            set_lr(optimizer, float(lrs[step]))
            pick = torch.randint(len(pool), (batch,), device=device, generator=g)
            xl = weak(gpu_images[pool[pick]], g)
            xu = gpu_images[unl[urows[s]]]
            x = torch.cat([xl, weak(xu, g), strong(xu, g)])
            with autocast(device, cfg.run.precision):
                logits = net(x).float()
            logit_l, logit_w, logit_s = logits[:batch], logits[batch:batch + ubatch], logits[batch + ubatch:]
            loss_x = F.cross_entropy(logit_l, pool_y[pick])
            with torch.no_grad():
                prob = logit_w.softmax(1)
                conf, target = prob.max(1)
                if p.self_adaptive_threshold:
                    sat.update(prob)
                    mask = (conf >= sat.thresholds()[target]).float()
                else:
                    mask = (conf >= p.consistency_threshold).float()
            loss_u = (F.cross_entropy(logit_s, target, reduction="none") * mask).mean()
            loss = loss_x + p.consistency_weight * loss_u
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update(ema_params, model_params, ema_momentum(p.ema, step))
            if ema_buffers:
                torch._foreach_copy_(ema_buffers, model_buffers)  # BN statistics follow the model
            sums += torch.stack([loss.detach(), loss_x.detach(), loss_u.detach(), mask.mean()])
        sync(device)
        seconds = time.perf_counter() - t0
        done = min(steps, total - epoch * steps)  # the last epoch of a fitted round is partial
        mean = (all_reduce_mean(sums) / max(done, 1)).tolist()
        record = {"round": round_no, "epoch": epoch + 1, "loss": round(mean[0], 5), "loss_x": round(mean[1], 5),
                  "loss_u": round(mean[2], 5), "mask_rate": round(mean[3], 4), "lr": float(lrs[min(step, total - 1)]),
                  "seconds": round(seconds, 2),
                  "images_per_s": round(done * (batch + 2 * ubatch) * info.world / max(seconds, 1e-9), 1),
                  "steps": done, "total_steps": total}
        log.append(record)
        if info.is_main:
            ckpt.save(epoch + 1, pair, optimizer, sat=sat.state_dict(), steps_per_epoch=steps, total_steps=total)
            if log_path:
                io.append_jsonl(log_path, record)
        barrier()
    return ema, log
