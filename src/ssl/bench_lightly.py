"""`python pipelines/bench.py lightly -c CONFIG [--seconds S]`: our SimCLR beside lightly's, side by side.

Both sides train the SAME encoder (`Encoder(cfg.backbone)`, identical initial weights: the same seed
before each is built) on every prepared image, with the same batch, optimiser (build_optimizer over
param_groups), LR and temperature, for the same wall-clock budget S each. Then both encoders get the
same kNN probe (`src.probe.knn_probe` through the stage-01 probe, with cfg.data.truth).

* lightly (PyPI `lightly`, requirements-bench.txt): the library's documented SimCLR recipe:
  `SimCLRTransform` per PIL image in a torchvision-style dataset, a DataLoader (cfg.run.num_workers
  workers, shuffle, drop_last; pinned memory and persistent workers given for free), a model =
  encoder + `SimCLRProjectionHead(D, ssl.proj_hidden, ssl.proj_dim)`, `NTXentLoss(ssl.temperature)`
  on z0 = model(x0), z1 = model(x1) (two forward passes, as lightly's examples do).
* ours: SSLRun.step with our views (src.ssl.views.make_views: the configured augmentation path).

Matched view settings: crop scale (ssl.crop_scale_min, 1) with aspect ratio (3/4, 4/3), flips
(ssl.flip), colour jitter p=0.8 with brightness/contrast/saturation ssl.color_jitter and hue
ssl.color_jitter/4, grayscale ssl.grayscale_p, blur ssl.blur_p (sigma 0.1..2), rotation
ssl.rotate_deg, ImageNet normalisation. Not matchable through lightly's API (printed as notes):
solarize (SimCLRTransform has none), our hue shift is a YIQ rotation (lightly: HSV), lightly's
rotation fills black (ours reflects), lightly's head ends in BatchNorm without bias (ours: bias, no BN).
Both sides are forced to SimCLR with two global views (ssl.objectives = {simclr: 1},
ssl.n_local_crops = 0); everything else is read from the config at run time. Model-side speed
settings of the config apply to both sides (bf16 autocast on CUDA, channels_last, run.compile, ssl.view_size).

Equal wall time (:func:`train_for`): the clock starts when the first batch is requested (data
loading, augmentation and worker start-up count) and a side stops after the first step that ends
past S. The LR follows the config's warmup + cosine shape over the fraction of S spent (warm-up
fraction ssl.warmup_epochs / ssl.epochs), so each side gets one complete schedule in its budget.
views/s = 2 x batch x steps after the first --warmup steps / their seconds (synchronised).
Rows: untrained (the common initial encoder, BatchNorm running statistics at their initial values),
lightly, ours.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from src import io
from src.config import Config
from src.data.dataset import CompetitionData, load_data
from src.errors import UserError
from src.models.encoder import Encoder, embed
from src.paths import RunPaths
from src.probe import truth_rows
from src.runtime import autocast, machine_info, resolve_device, seed_everything, sync, use_channels_last
from src.ssl.bench import _cycle
from src.ssl.trainer import Eager, SSLRun, probe, validate
from src.ssl.views import make_views
from src.train_utils import build_optimizer, cosine_ramp, param_groups, set_lr, warmup_cosine

SCHEDULE_POINTS = 1000  # resolution of the wall-time LR schedule (fraction of the budget -> LR)
INSTALL = "pip install -r requirements-bench.txt -c requirements.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=60.0, help="wall-clock training budget of EACH side")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of views/s (still trained)")
    parser.add_argument("--out", default="", help="also append the result as a JSON line to this file")


# ---------------------------------------------------------------------------------------------
# Equal-wall-time bookkeeping (no lightly needed)
# ---------------------------------------------------------------------------------------------
def train_for(seconds: float, batches: Iterable, step: Callable[[object, float], None], device: torch.device,
              warmup_steps: int = 0, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Call step(batch, fraction) on batches until `seconds` of wall time have passed; fraction =
    share of the budget spent when the step starts (0..1, drives the LR schedule). Fetching a batch
    is inside the clock. Stops after the first step that ends at or past the budget (at least one
    step). The device is synchronised at the start, after step `warmup_steps` and at the end.

    Returns steps (all), seconds (all, synchronised), timed_steps / timed_seconds (after the
    warm-up; the whole run when it had no more steps than warmup_steps)."""
    sync(device)
    start = clock()
    steps, warm_end = 0, None
    for batch in batches:
        step(batch, min((clock() - start) / seconds, 1.0))
        steps += 1
        if steps == warmup_steps:
            sync(device)
            warm_end = clock()
        if clock() - start >= seconds:
            break
    sync(device)
    end = clock()
    if warm_end is None or steps == warmup_steps:
        timed_steps, timed_seconds = steps, end - start
    else:
        timed_steps, timed_seconds = steps - warmup_steps, end - warm_end
    return {"steps": steps, "seconds": end - start, "timed_steps": timed_steps, "timed_seconds": timed_seconds}


def schedule_index(fraction: float) -> int:
    """Fraction of the budget spent (0..1) -> index into the SCHEDULE_POINTS-long LR schedule."""
    return min(int(fraction * SCHEDULE_POINTS), SCHEDULE_POINTS - 1)


def wall_time_schedule(cfg: Config, base_lr: float) -> np.ndarray:
    """The config's warmup + cosine LR over the budget: (SCHEDULE_POINTS,), warm-up share
    ssl.warmup_epochs / ssl.epochs."""
    warm = min(cfg.ssl.warmup_epochs / cfg.ssl.epochs, 1.0)
    return warmup_cosine(base_lr, SCHEDULE_POINTS, round(warm * SCHEDULE_POINTS), final=base_lr * cfg.ssl.min_lr_ratio)


# ---------------------------------------------------------------------------------------------
# The lightly side
# ---------------------------------------------------------------------------------------------
def _lightly():
    try:
        import lightly.loss
        import lightly.models.modules
        import lightly.transforms
    except ImportError:
        raise UserError(f"lightly is not installed (bench only): {INSTALL}") from None
    return lightly


def lightly_transform(cfg: Config):
    """lightly.transforms.SimCLRTransform matched to our view settings as far as its API goes."""
    s, L = cfg.ssl, _lightly()
    return L.transforms.SimCLRTransform(
        input_size=cfg.ssl.view_size or cfg.data.image_size, min_scale=s.crop_scale_min, cj_prob=0.8, cj_strength=1.0,
        cj_bright=s.color_jitter, cj_contrast=s.color_jitter, cj_sat=s.color_jitter, cj_hue=s.color_jitter / 4,
        random_gray_scale=s.grayscale_p, gaussian_blur=s.blur_p, sigmas=(0.1, 2.0), hf_prob=0.5 if s.flip else 0.0,
        vf_prob=0.0, rr_prob=1.0 if s.rotate_deg > 0 else 0.0, rr_degrees=s.rotate_deg if s.rotate_deg > 0 else None)


def unmatched_settings(cfg: Config) -> list[str]:
    notes = []
    if cfg.ssl.solarize_p > 0:
        notes.append(f"ssl.solarize_p={cfg.ssl.solarize_p}: lightly's SimCLRTransform has no solarize (ours only)")
    if cfg.ssl.objectives != {"simclr": 1.0}:
        notes.append(f"ssl.objectives={cfg.ssl.objectives}: replaced by {{simclr: 1.0}} on both sides")
    if cfg.ssl.n_local_crops:
        notes.append(f"ssl.n_local_crops={cfg.ssl.n_local_crops}: 0 on both sides (two global views)")
    return notes


class ArrayImages(torch.utils.data.Dataset):
    """torchvision-style dataset over uint8 (N, H, W, 3) images (what torchvision's CIFAR10 does:
    PIL image -> transform); __getitem__ -> (transform(image), 0)."""

    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(np.asarray(self.images[i]))), 0


class LightlySimCLR(nn.Module):
    """lightly's SimCLR model: backbone -> SimCLRProjectionHead (as in lightly's examples)."""

    def __init__(self, backbone: nn.Module, hidden: int, out: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = _lightly().models.modules.SimCLRProjectionHead(backbone.dim, hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class LightlySide:
    """Everything a lightly user builds for SimCLR, with our encoder, optimiser and LR."""

    def __init__(self, cfg: Config, images: np.ndarray, device: torch.device, base_lr: float):
        L = _lightly()
        self.cfg, self.device = cfg, device
        self.model = LightlySimCLR(Encoder(cfg.backbone, cfg.data.image_size, cfg.data.model_input_size), cfg.ssl.proj_hidden,
                                   cfg.ssl.proj_dim).to(device)
        self.channels_last = use_channels_last(cfg.run.channels_last, device, self.model.backbone)  # as ours
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.run.compile:
            self.model.backbone.compile()
        self.criterion = L.loss.NTXentLoss(temperature=cfg.ssl.temperature)
        self.optimizer = build_optimizer(cfg.ssl.optimizer, param_groups(self.model, cfg.ssl.weight_decay), base_lr,
                                         cfg.ssl.momentum, device, "ssl.optimizer")
        self.lrs = wall_time_schedule(cfg, base_lr)
        workers = cfg.run.num_workers
        self.loader = torch.utils.data.DataLoader(
            ArrayImages(images, lightly_transform(cfg)), batch_size=cfg.ssl.batch_size, shuffle=True, drop_last=True,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(cfg.run.seed))

    def batches(self):
        while True:
            yield from self.loader

    def step(self, batch, fraction: float) -> None:
        (x0, x1), _ = batch
        x0, x1 = (x.to(self.device, non_blocking=True) for x in (x0, x1))
        if self.channels_last:
            x0, x1 = (x.contiguous(memory_format=torch.channels_last) for x in (x0, x1))
        set_lr(self.optimizer, float(self.lrs[schedule_index(fraction)]))
        with autocast(self.device, self.cfg.run.precision):
            z0, z1 = self.model(x0), self.model(x1)
        loss = self.criterion(z0.float(), z1.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @property
    def encoder(self) -> nn.Module:
        return self.model.backbone


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------
def simclr_cfg(cfg: Config) -> Config:
    """The config with SimCLR on two global views (what both sides train)."""
    return dataclasses.replace(cfg, ssl=dataclasses.replace(cfg.ssl, objectives={"simclr": 1.0}, n_local_crops=0,
                                                            max_steps_per_epoch=0))


def _probe_encoder(encoder: nn.Module, data: CompetitionData, cfg: Config, device: torch.device,
                   channels_last: bool) -> dict:
    """The stage-01 kNN probe (same rows, k, seed, truth) of a bare encoder."""
    embedder = SimpleNamespace(embed=lambda images: embed(Eager(encoder), images, device, cfg.ssl.embed_batch_size,
                                                          cfg.run.precision, channels_last=channels_last))
    return {k: round(v, 4) for k, v in probe(embedder, data, cfg).items()}


def _row(method: str, batch: int, timing: dict | None, probe: dict) -> dict:
    row = {"method": method, **probe}
    if timing:
        row.update({"views_per_s": round(2 * batch * timing["timed_steps"] / timing["timed_seconds"], 1),
                    "steps": timing["steps"], "seconds": round(timing["seconds"], 2),
                    "timed_steps": timing["timed_steps"]})
    return row


def print_table(rows: list[dict]) -> None:
    probe_keys = [k for k in ("knn_loo_labeled", "knn_5fold_truth") if any(k in r for r in rows)]
    head = ["method", "views/s", "steps", "seconds", *probe_keys]
    print("  ".join(f"{h:>16}" for h in head))
    for r in rows:
        cells = [r["method"], f"{r['views_per_s']:,.0f}" if "views_per_s" in r else "-", str(r.get("steps", "-")),
                 f"{r['seconds']:.1f}" if "seconds" in r else "-", *(f"{r[k]:.4f}" for k in probe_keys)]
        print("  ".join(f"{c:>16}" for c in cells))


def bench_lightly(cfg: Config, args: argparse.Namespace) -> dict:
    if args.seconds <= 0:
        raise UserError(f"--seconds: must be positive, got {args.seconds}")
    if args.warmup < 0:
        raise UserError(f"--warmup: must be >= 0, got {args.warmup}")
    notes = unmatched_settings(cfg)
    cfg = simclr_cfg(cfg)
    validate(cfg)
    _lightly()  # not installed: fail before any work
    device = resolve_device(cfg.run.device)
    paths = RunPaths(cfg)
    data = load_data(paths)
    if cfg.data.truth:
        truth_rows(data, cfg.data.truth)  # unknown ids fail now, not after training
    batch = cfg.ssl.batch_size

    # Ours first only to read its base LR; the same seed before each build: identical encoders.
    seed_everything(cfg.run.seed)
    ours = SSLRun(cfg, len(data.images), device)
    seed_everything(cfg.run.seed)
    theirs = LightlySide(cfg, data.images, device, ours.base_lr)
    rows = [_row("untrained", batch, None, _probe_encoder(theirs.encoder, data, cfg, device, theirs.channels_last))]

    seed_everything(cfg.run.seed)
    theirs.model.train()
    timing = train_for(args.seconds, theirs.batches(), theirs.step, device, args.warmup)
    rows.append(_row("lightly", batch, timing, _probe_encoder(theirs.encoder, data, cfg, device, theirs.channels_last)))
    del theirs

    seed_everything(cfg.run.seed)
    ours.wrap()
    ours.lrs = wall_time_schedule(cfg, ours.base_lr)  # the step reads its LR (and EMA) at the index we pass
    ours.momentum = cosine_ramp(cfg.ssl.ema, 1.0, SCHEDULE_POINTS)
    views = make_views(cfg, data.images, device, ours.batch, ours.encoder, ours.model.uses_local, ours.channels_last)
    ours.net.train()
    timing = train_for(args.seconds, _cycle(views, ours.steps), lambda b, f: ours.step(*b, schedule_index(f)),
                       device, args.warmup)
    rows.append(_row("ours", batch, timing, _probe_encoder(ours.encoder, data, cfg, device, ours.channels_last)))

    lightly = _lightly()
    ratio = rows[2]["views_per_s"] / rows[1]["views_per_s"]
    out = {"bench": "lightly", "device": str(device), "machine": machine_info(device), "lightly": lightly.__version__,
           "backbone": dataclasses.asdict(cfg.backbone), "batch_size": batch, "optimizer": cfg.ssl.optimizer,
           "base_lr": ours.base_lr, "temperature": cfg.ssl.temperature, "num_workers": cfg.run.num_workers,
           "precision": cfg.run.precision if device.type == "cuda" else "fp32", "compile": cfg.run.compile,
           "budget_s": args.seconds, "warmup_steps": args.warmup, "images": len(data.images),
           "views_per_s_ratio": round(ratio, 2), "notes": notes, "rows": rows}
    print(f"lightly {lightly.__version__} vs ours on {device} ({out['machine'].get('gpu', 'cpu')}): "
          f"{cfg.backbone.name} width {cfg.backbone.width}, batch {batch}, {cfg.ssl.optimizer} lr {ours.base_lr:g}, "
          f"{args.seconds:g} s each, {len(data.images):,} images, {cfg.run.num_workers} loader workers (lightly)")
    for note in notes:
        print(f"  note: {note}")
    print_table(rows)
    print(f"ours / lightly views/s: {ratio:.2f}x (target >= 1.5x)")
    print(json.dumps(out))
    if args.out:
        io.append_jsonl(args.out, out)
    return out
