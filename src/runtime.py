"""Device, precision, seeding and provenance helpers shared by every stage."""
from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from src.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present. Never assume a GPU: CI and most laptops have none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name}: CUDA is not available on this machine (use auto or cpu)")
    return torch.device(name)


# Narrowest convolution input that gets NHWC on the CPU (see use_channels_last).
CPU_CHANNELS_LAST_MIN_CHANNELS = 16


def use_channels_last(requested: bool, device: torch.device, model: torch.nn.Module) -> bool:
    """Whether `model` runs in NHWC (channels_last) memory format: where requested (run.channels_last),
    on CUDA always, and on the CPU only when every convolution after the RGB stem reads >= 16
    channels. NHWC makes oneDNN's convolutions 1.2-1.5x faster on 2 Zen 3 cores for the widths the
    CPU recipes use (docs/RESULTS.md), but torch 2.14's CPU backward of a 1x1 stride-2 convolution
    in NHWC with 4-5 input and 8 output channels corrupts the heap ("corrupted double-linked list",
    tests/test_ssl_flags.py keeps the guard), and the tiny test networks have such layers."""
    if not requested:
        return False
    if device.type != "cpu":
        return True
    inputs = [m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels != 3]
    return min(inputs, default=CPU_CHANNELS_LAST_MIN_CHANNELS) >= CPU_CHANNELS_LAST_MIN_CHANNELS


def autocast(device: torch.device, precision: str = "bf16", cpu: bool = False):
    """bf16 autocast on CUDA; on the CPU only when `cpu` (ssl.cpu_precision): bf16 is emulated and slower
    than fp32 on CPUs without native bf16 matmul (Zen 3), 1.65x faster on AMX (docs/RESULTS.md)."""
    if precision == "bf16" and (device.type == "cuda" or (device.type == "cpu" and cpu)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matmul instructions


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises bf16 matmul instructions (amx_bf16 or avx512_bf16 flags; Linux)."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in BF16_FLAGS)


def resolve_cpu_bf16(mode: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ssl.cpu_precision (bf16, fp32, or auto: bf16 where the CPU has native bf16) means bf16."""
    return mode == "bf16" or (mode == "auto" and cpu_has_native_bf16(cpuinfo))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def git_commit() -> str:
    """The current commit (with '+dirty' if the tree has changes), or 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit or "unknown") + ("+dirty" if dirty and commit else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers (an EPYC Zen 3 is family
    25 model 1, a Zen 4 family 25 model 17), the SIMD level PyTorch's kernels dispatch to (ATen's
    capability: AVX2, AVX512, ...; ATEN_CPU_CAPABILITY lowers it) and whether it has native bf16."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if not line.strip() and fields:
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {"name": fields.get("model name") or platform.processor() or "unknown",
            "family": fields.get("cpu family", ""), "model": fields.get("model", ""),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": any(flag in fields.get("flags", "").split() for flag in BF16_FLAGS)}


def machine_info(device: torch.device | None = None) -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cpu": cpu_identity()}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock timer; on CUDA it synchronises first so queued kernels are counted."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        if self.device is not None:
            sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device is not None:
            sync(self.device)
        self.seconds = time.perf_counter() - self.start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int):
    """Limit torch's intra-op threads and the BLAS pools to n inside the block (n <= 0 or a GPU
    device: unchanged). Stages that run many tiny kernels (meta-learning episodes, SCAN, linear
    heads) wait at OpenMP barriers when the cores are shared: on the busy 2-core host the demo
    02_pseudo took 124 s with torch's 2 threads and 40 s with 1; 04_meta 385 s and 29 s."""
    if device.type != "cpu" or n <= 0:
        yield
        return
    from threadpoolctl import threadpool_limits  # ships with scikit-learn

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)
