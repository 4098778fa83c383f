"""Training helpers shared by every stage that trains a network (SSL, self-training, metric, meta).

* optimisers: :func:`param_groups` (no weight decay on biases and norm layers), :func:`build_optimizer`
  (SGD / AdamW, fused on CUDA; :class:`LARS`);
* schedules computed up front as arrays (:func:`warmup_cosine`, :func:`cosine_ramp`), applied per
  step with :func:`set_lr` (a Python float: no host sync);
* checkpoints (:class:`Checkpointer`): weights in safetensors, optimiser/scheduler/RNG state in a
  ``torch.save`` file that loads with ``weights_only=True``;
* LR range test (:func:`lr_range_test`, :func:`plot_lr_find`);
* DistributedDataParallel under torchrun (:func:`init_distributed`, :func:`all_gather_with_grad`,
  :func:`run_stage_distributed`, ...). Single-process runs need none of it.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from src import io
from src.errors import UserError


# ---------------------------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and 1-D (norm) parameters without decay and without
    LARS adaptation (Goyal et al. 2017; You et al. 2017). Frozen parameters are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with momentum (You et al. 2017,
    arXiv:1708.03888; the variant of BYOL / Barlow Twins):

        d = g + wd * w
        q = eta * ||w|| / ||d||   (1 where either norm is 0; q = 1 for groups with lars_exclude)
        v = momentum * v + q * d
        w = w - lr * v

    The trust ratio stays on the device (torch.where), so a step has no host sync."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:  # foreach kernels: one launch per op for the whole group
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                d = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            else:
                d = [g.clone() for g in grads]
            if not group["lars_exclude"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(d))
                q = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(d, list(q.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                    device: torch.device | None = None, where: str = "optimizer") -> torch.optim.Optimizer:
    """sgd | adamw | lars. Fused kernels on CUDA (`fused=True` is CUDA-only)."""
    fused = device is not None and device.type == "cuda"
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False, fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise UserError(f"{where}: unknown optimizer '{name}' (known: adamw, lars, sgd)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's LR (times its optional 'lr_scale'). lr is a Python float: no sync."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------------------------
# Schedules (computed once, indexed by global step)
# ---------------------------------------------------------------------------------------------
def warmup_cosine(base: float, total_steps: int, warmup_steps: int = 0, final: float = 0.0,
                  start: float = 0.0) -> np.ndarray:
    """(total_steps,) float64: linear start->base over warmup_steps, then cosine base->final
    (Loshchilov & Hutter 2017; Goyal et al. 2017 for the warmup)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n, 1)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warm, cos])


def cosine_ramp(start: float, end: float, total_steps: int) -> np.ndarray:
    """(total_steps,) cosine increase start -> end, e.g. BYOL's EMA momentum 0.99 -> 1 (Grill et al. 2020)."""
    total_steps = max(int(total_steps), 1)
    t = np.arange(total_steps) / max(total_steps - 1, 1)
    return end - (end - start) * (np.cos(np.pi * t) + 1) / 2


@torch.no_grad()
def ema_update(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * source, one foreach kernel per dtype/device."""
    target, source = list(target), list(source)
    if target:
        torch._foreach_lerp_(target, source, 1.0 - momentum)


# ---------------------------------------------------------------------------------------------
# RNG state (for checkpoints; every value is a tensor, list or number: weights_only-loadable)
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
             "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
class Checkpointer:
    """Keeps the latest checkpoint of a training loop in `folder`:

        epoch_0010.safetensors   model weights (every tensor of the module's state_dict)
        epoch_0010.pt            {"epoch", "optimizer", "rng", **extra}: torch.load(weights_only=True)
        latest.json              {"epoch": 10, ...} written last, so a half-written pair is never used

    `epoch` counts completed epochs; resume with `start_epoch = loaded["epoch"]`."""

    def __init__(self, folder: str | Path, keep: int = 1):
        self.folder = Path(folder)
        self.keep = keep

    def save(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             **extra) -> None:
        stem = self.folder / f"epoch_{epoch:04d}"
        io.save_tensors(stem.with_suffix(".safetensors"), model.state_dict())
        state = {"epoch": epoch, "rng": rng_state(), **extra}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        with io.atomic_path(stem.with_suffix(".pt"), suffix=".pt") as tmp:
            torch.save(state, tmp)
        io.write_json(self.folder / "latest.json", {"epoch": epoch, "stem": stem.name})
        for old in sorted(self.folder.glob("epoch_*.safetensors"))[:-self.keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".pt").unlink(missing_ok=True)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             device: torch.device | str = "cpu", restore_rng: bool = True) -> dict | None:
        """Load the latest checkpoint into model (and optimizer); returns its state dict or None."""
        marker = self.folder / "latest.json"
        if not marker.exists():
            return None
        stem = self.folder / io.read_json(marker)["stem"]
        model.load_state_dict(io.load_tensors(stem.with_suffix(".safetensors"), device=str(device)))
        state = torch.load(stem.with_suffix(".pt"), map_location=device, weights_only=True)
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if restore_rng:
            rng = state["rng"]
            rng["torch"] = rng["torch"].cpu()
            rng["cuda"] = [s.cpu() for s in rng.get("cuda", [])]
            set_rng_state(rng)
        return state


# ---------------------------------------------------------------------------------------------
# LR range test (Smith 2017, arXiv:1506.01186)
# ---------------------------------------------------------------------------------------------
def lr_range_test(step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, min_lr: float = 1e-5,
                  max_lr: float = 10.0, steps: int = 100, smooth: float = 0.9, diverge: float = 4.0) -> dict:
    """Run `steps` training steps with the LR growing exponentially min_lr -> max_lr; `step()` does
    forward + backward + optimizer.step and returns the (device) loss. Stops once the smoothed loss
    exceeds `diverge` x its minimum. Suggested LR: where the smoothed loss falls fastest per
    log-LR before its minimum (the "steepest descent" reading of the curve; min_loss_lr / 10 is
    also returned, a rule that misleads when the loss never diverges, e.g. with AdamW + BN)."""
    lrs = np.geomspace(min_lr, max_lr, steps)
    pending: list[torch.Tensor] = []
    losses: list[float] = []
    for i, lr in enumerate(lrs):
        set_lr(optimizer, float(lr))
        pending.append(step().detach().float())
        if (i + 1) % 10 == 0 or i == steps - 1:  # sync every 10 steps only
            losses += torch.stack(pending).cpu().tolist()
            pending = []
            sm = _ema_smooth(losses, smooth)
            finite = np.isfinite(sm)
            if not finite.all() or sm[-1] > diverge * np.nanmin(sm):
                break
    n = len(losses)
    smoothed = _ema_smooth(losses, smooth)
    valid = np.where(np.isfinite(smoothed), smoothed, np.inf)
    best = int(np.argmin(valid))
    skip = max(1, n // 20)  # the first points carry the smoothing's start-up
    if best - skip >= 2:
        slope = np.gradient(smoothed[skip:best + 1], np.log(lrs[skip:best + 1]))
        steep = skip + int(np.argmin(slope))
    else:
        steep = best
    return {"lrs": lrs[:n].tolist(), "losses": losses, "smoothed": smoothed.tolist(),
            "min_loss_lr": float(lrs[best]), "min_loss_lr_div10": float(lrs[best] / 10),
            "suggested_lr": float(lrs[steep])}


def _ema_smooth(values: list[float], beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (the fastai LR-finder smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return np.asarray(out)


def plot_lr_find(result: dict, path: str | Path, title: str = "LR range test") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    ax.axvline(result["suggested_lr"], color="r", ls="--", label=f"suggested {result['suggested_lr']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Distributed (torchrun)
# ---------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, gloo on CPU.
    Returns rank/world; a plain `python script.py` run returns DistInfo() and does nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist_info()


def local_device(device: torch.device) -> torch.device:
    """Under DDP on CUDA each process owns cuda:LOCAL_RANK."""
    info = dist_info()
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) from every rank along dim 0, in rank order, keeping the autograd graph
    (the backward pass sends each rank the gradient of its own slice, summed over ranks)."""
    if not dist_info().enabled:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in torch 2.14 in favour of names that 2.11 lacks
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (no gradient); identity in a single process."""
    info = dist_info()
    if not info.enabled:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / info.world


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or max over ranks (no gradient, a new tensor); identity in a single process."""
    if not dist_info().enabled:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


def broadcast_from_main(x: torch.Tensor) -> torch.Tensor:
    """Overwrite x in place with rank 0's values (results every rank must share, e.g. k-means
    centroids); identity in a single process. Returns x."""
    if dist_info().enabled:
        dist.broadcast(x, src=0)
    return x


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm (on accelerators: PyTorch's SyncBatchNorm refuses CPU tensors) + DDP.
    On CPU/gloo ranks keep local BN statistics; DDP's buffer broadcast keeps running stats equal."""
    info = dist_info()
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def run_stage_distributed(stage, cfg, force: bool = False, lr_find: bool = False) -> dict:
    """Entry point of a training stage script that may run under torchrun.

    Rank 0 goes through src.stages.run_stage (fingerprint, skip, directory, config.yaml, done
    marker); the other ranks make the same skip decision and call stage.run directly, which
    synchronises with rank 0 (barriers) before reading or training. Only rank 0 writes files."""
    from src.runtime import resolve_device, seed_everything
    from src.paths import RunPaths
    from src.stages import fingerprint, is_done, run_stage, validate_stage

    info = init_distributed(resolve_device(cfg.run.device))
    if not info.enabled:
        return run_stage(stage, cfg, force=force, lr_find=lr_find)
    if lr_find:
        raise UserError("--lr-find: run it in one process (python, not torchrun)")
    try:
        if info.is_main:
            return run_stage(stage, cfg, force=force)
        validate_stage(stage, cfg)  # bad settings and a missing upstream stage fail here too, not in a barrier
        fingerprint(stage, cfg, RunPaths(cfg))
        if not force and is_done(stage, cfg, RunPaths(cfg)):
            return {}
        seed_everything(cfg.run.seed)
        from src.config import for_stage

        return stage.run(for_stage(cfg, stage.key), RunPaths(cfg)) or {}
    finally:
        dist.destroy_process_group()


def shard_rows(n: int, batch_size: int, epoch: int, seed: int, device: torch.device) -> torch.Tensor:
    """(steps, batch_size) row indices of this rank for one epoch: a permutation of range(n) that
    every rank draws identically (seeded by seed, epoch), split rank-wise like DistributedSampler;
    the tail that does not fill a global batch is dropped. Stays on `device`."""
    info = dist_info()
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g, device=device)
    steps = n // (batch_size * info.world)
    mine = perm[: steps * batch_size * info.world].view(steps, info.world, batch_size)[:, info.rank]
    return mine


def steps_per_epoch(n: int, batch_size: int, world: int = 1, cap: int = 0) -> int:
    steps = n // (batch_size * world)
    if steps == 0:
        raise UserError(f"batch_size: {batch_size} x {world} process(es) is larger than the {n} training images")
    return min(steps, cap) if cap > 0 else steps


def images_per_second(n_images: int, seconds: float) -> float:
    return n_images / seconds if seconds > 0 else math.nan
