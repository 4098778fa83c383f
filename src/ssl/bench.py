"""`python pipelines/bench.py ssl -c CONFIG`: throughput of the SSL training step on this device.

Measures, after warm-up steps (compilation, allocator, cuDNN autotuning):
* augmentation alone for each augmentation path (views/s): batched on the device, and the
  per-image albumentations loader (cfg.run.num_workers workers);
* the full training step (augment + forward + backward + optimiser + EMA) for the path the
  config selects: augmented views/s, seconds per step, peak memory, and the resulting time per
  epoch over the prepared data (or 59,980 images when the run has no prepared data);
* achieved GFLOP/s = FLOPs per view (FlopCounterMode over one forward + backward, src.costs) x
  views/s, and its share of the matmul roof measured right after (an n x n torch.mm: fp32 with the
  current thread count on CPU, n = 4096; bf16 on CUDA, n = 8192; bench.roof_size sets n).
Uses the run's prepared images when present, random images otherwise (throughput does not depend
on content)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from src import io
from src.config import Config
from src.costs import achieved, matmul_roof, ssl_step_costs, ssl_step_dtype
from src.paths import RunPaths
from src.runtime import machine_info, peak_memory_mb, resolve_device, seed_everything, sync
from src.ssl.trainer import SSLRun, validate
from src.ssl.views import DeviceViews, LoaderViews, augment_path, local_size
from src.train_utils import steps_per_epoch

FULL_DATA = 59_980  # images of the real competition (train + val + test)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--augment", choices=["config", "both"], default="both",
                        help="augmentation-only throughput of the configured path or of both paths")
    parser.add_argument("--out", default="", help="also append the result as a JSON line to this file")


def _images(cfg: Config, n_min: int) -> tuple[np.ndarray, str, int]:
    paths = RunPaths(cfg)
    if paths.images.exists():
        images = io.read_npy(paths.images, mmap=True)
        if len(images) >= n_min:
            return images, str(paths.images), len(images)
    size = cfg.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (n_min, size, size, 3), dtype=np.uint8)
    return images, "random", FULL_DATA


def _timed(device: torch.device, fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t0


def _cycle(source, steps):
    epoch = 0
    while True:
        yield from source.epoch(epoch, steps)
        epoch += 1


def bench_ssl(cfg: Config, args: argparse.Namespace) -> dict:
    validate(cfg)
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    batch = cfg.ssl.batch_size
    images, source_name, n_epoch = _images(cfg, batch * 4)
    run = SSLRun(dataclasses.replace(cfg, ssl=dataclasses.replace(cfg.ssl, max_steps_per_epoch=0)), len(images), device)
    run.wrap()
    n_local = cfg.ssl.n_local_crops if run.model.uses_local else 0
    n_views = 2 + n_local
    out = {"bench": "ssl", "device": str(device), "machine": machine_info(device), "backbone": cfg.backbone.name,
           "width": cfg.backbone.width, "objectives": cfg.ssl.objectives, "batch_size": batch,
           "precision": cfg.run.precision if device.type == "cuda" or run.cpu_bf16 else "fp32", "compile": cfg.run.compile,
           "channels_last": run.channels_last, "images": source_name, "steps": args.steps, "warmup": args.warmup}

    # Augmentation alone, per path.
    paths = ["gpu", "cpu"] if args.augment == "both" else [augment_path(cfg, device)]
    lpx = local_size(cfg, run.encoder)
    for path in paths:
        cls = DeviceViews if path == "gpu" else LoaderViews
        src = cls(cfg, images, device, batch, n_local, lpx, run.channels_last)
        stream = _cycle(src, len(images) // batch)
        seconds = _timed(device, lambda: next(stream), max(1, args.warmup // 2), args.steps)
        out[f"augment_{path}_views_per_s"] = round(args.steps * batch * n_views / seconds, 1)
        del src, stream

    # Full training step on the configured path.
    path = augment_path(cfg, device)
    src = (DeviceViews if path == "gpu" else LoaderViews)(cfg, images, device, batch, n_local, lpx, run.channels_last)
    stream = _cycle(src, len(images) // batch)
    step = iter(range(10**9))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run.model.on_epoch_start(0, images)  # deepcluster: memory bank + k-means (not timed)
    run.net.train()

    def train_step():
        v, lv = next(stream)
        loss, _ = run.step(v, lv, min(next(step), len(run.lrs) - 1), src.rows)
        return loss

    seconds = _timed(device, train_step, args.warmup, args.steps)
    per_step = seconds / args.steps
    steps_epoch = steps_per_epoch(n_epoch, batch)
    out.update({"augment": path, "train_views_per_s": round(args.steps * batch * n_views / seconds, 1),
                "train_images_per_s": round(args.steps * batch / seconds, 1), "seconds_per_step": round(per_step, 4),
                "epoch_images": n_epoch, "epoch_seconds": round(per_step * steps_epoch, 2),
                "peak_memory_mb": round(peak_memory_mb(device), 1)})
    out["flops_per_view"] = ssl_step_costs(cfg)["flops_per_view"]
    out["roof"] = matmul_roof(device, cfg.bench.roof_size, dtype=ssl_step_dtype(cfg, device))
    out.update(achieved(out["flops_per_view"], out["train_views_per_s"], out["roof"]["gflops"]))
    print(f"ssl bench on {device} ({out['machine'].get('gpu', 'cpu')}): {cfg.backbone.name} batch {batch}, "
          f"{n_views} views/image, augment {path}")
    for path_name in ("gpu", "cpu"):
        if f"augment_{path_name}_views_per_s" in out:
            print(f"  augmentation only, {path_name} path: {out[f'augment_{path_name}_views_per_s']:,.0f} views/s")
    print(f"  train step: {out['train_views_per_s']:,.0f} augmented views/s (forward+backward), "
          f"{per_step * 1000:.1f} ms/step, peak memory {out['peak_memory_mb']:.0f} MB")
    print(f"  epoch of {n_epoch:,} images: {out['epoch_seconds']:.1f} s")
    roof = out["roof"]
    print(f"  {out['flops_per_view'] / 1e9:.3f} GFLOP per view (forward + backward, counted): achieved "
          f"{out['achieved_gflops']:,.1f} GFLOP/s = {out['roof_pct']:.1f} % of the measured matmul roof "
          f"({roof['gflops']:,.0f} GFLOP/s, {roof['n']}x{roof['n']} {roof['dtype']}, {roof['threads']} threads)")
    print(json.dumps(out))
    if args.out:
        io.append_jsonl(args.out, out)
    return out
