"""What a training step costs, counted rather than guessed: FLOPs (torch.utils.flop_counter), the
peak of live tensor memory, and the measured matmul roof they are compared against.

FLOP convention: FlopCounterMode's, unchanged. 2 FLOPs per multiply-accumulate (MAC) of every
convolution and matrix product (conv, mm, addmm, bmm, attention) that autograd executes in one
forward + backward pass:

* forward: 2 x MACs of each layer;
* backward: 2 x MACs for each weight gradient, and 2 x MACs for each input gradient that
  autograd computes -- not for the first layer, whose input (the images) needs no gradient.

Elementwise ops, normalisation, pooling, softmax and the optimiser are not counted (they are
memory-bound: a few per cent of a ResNet's FLOPs). So a conv/linear stack costs 3x its forward
minus the first layer's input gradient. EMA teachers (BYOL, DINO) add their forward only.
"Per view" divides a step by the augmented views it trains on (images x views per image).

Memory: :class:`LiveMemory` follows every tensor storage created inside it until its last
reference dies (what the CUDA caching allocator's ``max_memory_allocated`` follows, minus its
512-byte rounding and library workspaces). Run on the ``meta`` device it sizes a full-batch step
of a full-size model in a second, with no memory at all.

    costs = ssl_step_costs(cfg)          # {"flops_per_view": 3.34e9, ...} for cfg.ssl.batch_size
    est = gpu_memory_estimate(cfg)       # per stage: bytes a CUDA run of this config needs at most
    roof = matmul_roof(device, dtype=ssl_step_dtype(cfg, device))  # {"gflops": ..., "n": 4096, "dtype": ...}
"""
from __future__ import annotations

import dataclasses
import math
import time
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from src.config import BackboneCfg, Config
from src.runtime import resolve_cpu_bf16, sync

FULL_DATA = 59_980  # images of the real competition (train + val + test)
GIB = 2**30
# Allowance for what the tracker cannot see but max_memory_allocated counts: cuDNN / cuBLAS
# workspaces (allocated through PyTorch's allocator; a few hundred MB for ResNet convolutions)
# and the allocator's block rounding. Deliberately generous: the check is a ceiling, not a fit.
WORKSPACE_BYTES = 1 * GIB


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run fn() under FlopCounterMode; return (total FLOPs, FLOPs by aten op name)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op).split(".", 1)[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


class LiveMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still referenced.

    Every op's output storage is counted once (views and in-place results share it) and
    uncounted by a weakref callback when it is freed. Storages that existed before the block
    (parameters, inputs made outside) are not counted: add them yourself."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        ref = self._refs.get(key)
        if ref is not None and ref() is storage:
            return
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def freed(_ref, n=n, key=key):
            self.live -= n
            if self._refs.get(key) is _ref:
                del self._refs[key]

        self._refs[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def shapes_only(backbone: BackboneCfg) -> BackboneCfg:
    """The backbone without its pretrained weights: counting on the meta device needs shapes, and
    loading a weights file into meta parameters is wasted I/O (and a no-op)."""
    return dataclasses.replace(backbone, pretrained="", allow_download=False)


def _ssl_model(cfg: Config, device: str | torch.device = "meta"):
    from src.models.encoder import Encoder
    from src.ssl.objectives import SSLModel

    with torch.device(device):  # meta: parameters have shapes but no storage; init is free
        return SSLModel(Encoder(shapes_only(cfg.backbone), cfg.data.image_size, cfg.data.model_input_size), cfg.ssl)


def flops_per_image(model: nn.Module, image_size: int, device: str | torch.device = "meta") -> int:
    """Counted FLOPs of one forward of one image_size x image_size image (count_flops: convolutions
    and matrix products; a resize inside the model and elementwise ops count 0)."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.inference_mode():
        return count_flops(lambda: model(x))[0]


def embed_flops(cfg: Config) -> int:
    """FLOPs of one image's forward pass through the encoder as it embeds (the resize to
    data.model_input_size included), counted on the meta device. With ssl.extra_encoders: the mean
    over the main encoder and each extra one (at the extra's native resolution); every encoder makes
    the same number of passes, so this mean x passes per second is the FLOP/s of the embedding."""
    from src.models.encoder import Encoder, source_backbone

    encoders = [(cfg.backbone, cfg.data.model_input_size)] + [source_backbone(n) for n in cfg.ssl.extra_encoders]
    flops = []
    for backbone, input_size in encoders:
        with torch.device("meta"):
            encoder = Encoder(shapes_only(backbone), cfg.data.image_size, input_size).eval()
        flops.append(flops_per_image(encoder, cfg.data.image_size))
    return round(sum(flops) / len(flops))


def ssl_step_costs(cfg: Config, batch: int = 0) -> dict:
    """FLOPs and activation memory of one SSL training step (forward + backward of SSLModel over
    the global views and local crops of `batch` images, cfg.ssl.batch_size by default), counted
    on the meta device. Per view = per step / (batch x views per image)."""
    from src.ssl.views import local_size

    b = batch or cfg.ssl.batch_size
    model = _ssl_model(cfg).train()
    size = cfg.ssl.view_size or cfg.data.image_size  # global views (ssl.view_size: trained smaller)
    n_local = cfg.ssl.n_local_crops if model.uses_local else 0
    lpx = local_size(cfg, model.encoder)
    memory = LiveMemory()

    def step():
        with memory:
            views = [torch.empty(b, 3, size, size, device="meta") for _ in range(2)]
            local = [torch.empty(b, 3, lpx, lpx, device="meta") for _ in range(n_local)]
            loss, _ = model(views, local)
            loss.backward()

    total, by_op = count_flops(step)
    views = b * (2 + n_local)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"batch": b, "views_per_image": 2 + n_local, "views_per_step": views, "flops_per_step": total,
            "flops_per_view": total / views, "flops_by_op": by_op,
            "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in trainable),
            "param_bytes": _tensor_bytes(model.parameters()) + _tensor_bytes(model.buffers()),
            "trainable_bytes": _tensor_bytes(trainable), "step_peak_bytes": memory.peak}


def _classifier_step_peak(cfg: Config, n_images: int, n_classes: int = 10) -> tuple[int, int]:
    """(peak live bytes of a forward + backward of encoder + linear head over n_images images,
    parameter bytes): the shape of the 02_pseudo self-training and 03_metric steps (their losses
    act on (n, D) features, negligible beside the encoder's activations)."""
    from src.models.encoder import Encoder

    with torch.device("meta"):
        encoder = Encoder(shapes_only(cfg.backbone), cfg.data.image_size, cfg.data.model_input_size)
        head = nn.Linear(encoder.dim, n_classes)
    memory = LiveMemory()
    size = cfg.data.image_size
    with memory:
        x = torch.empty(n_images, 3, size, size, device="meta")
        y = torch.zeros(n_images, dtype=torch.long, device="meta")
        F.cross_entropy(head(encoder(x)), y).backward()
    params = _tensor_bytes(encoder.parameters()) + _tensor_bytes(encoder.buffers()) + _tensor_bytes(head.parameters())
    return memory.peak, params


def _embed_peak(cfg: Config, batch: int) -> int:
    from src.models.encoder import Encoder

    with torch.device("meta"):
        encoder = Encoder(shapes_only(cfg.backbone), cfg.data.image_size, cfg.data.model_input_size).eval()
    memory = LiveMemory()
    size = cfg.data.image_size
    with memory, torch.no_grad():
        encoder(torch.empty(batch, 3, size, size, device="meta"))
    return memory.peak + _tensor_bytes(encoder.parameters()) + _tensor_bytes(encoder.buffers())


def gpu_memory_estimate(cfg: Config, n_images: int = FULL_DATA) -> dict:
    """Upper estimate of each GPU stage's torch.cuda.max_memory_allocated, in bytes.

    Counted in fp32 on the meta device (bf16 autocast keeps most activations in bf16, so the
    fp32 count bounds them from above), plus what a CUDA run adds: the optimiser state (SGD /
    LARS momentum: 1x the trainable weights; AdamW: 2x), the bf16 weight copies autocast caches
    (0.5x), the uint8 images held on the device (N x S x S x 3), and WORKSPACE_BYTES.
    Stages: ssl (train step), pseudo (FixMatch step over (1 + 2 mu) B images, when it trains),
    metric (batch_size images), embed (largest no-grad embedding batch of any stage)."""
    size = cfg.data.image_size
    images = n_images * size * size * 3
    out: dict[str, dict] = {}

    c = ssl_step_costs(cfg)
    state = (2 if cfg.ssl.optimizer == "adamw" else 1) * c["trainable_bytes"]
    parts = {"weights": c["param_bytes"], "optimizer_state": state, "autocast_weight_copies": c["param_bytes"] // 2,
             "step_activations_and_grads": c["step_peak_bytes"], "device_images": images,
             "workspace_allowance": WORKSPACE_BYTES}
    out["ssl"] = {"batch": c["batch"], "images_per_step": c["views_per_step"], "parts": parts,
                  "bytes": sum(parts.values())}

    p = cfg.pseudo
    if p.rounds > 0 and p.self_train_epochs > 0:
        n = p.self_train_batch_size * (1 + 2 * p.unlabeled_ratio)
        peak, params = _classifier_step_peak(cfg, n)
        parts = {"weights_and_ema": 2 * params, "optimizer_state": params, "autocast_weight_copies": params // 2,
                 "step_activations_and_grads": peak, "device_images": images, "workspace_allowance": WORKSPACE_BYTES}
        out["pseudo"] = {"images_per_step": n, "parts": parts, "bytes": sum(parts.values())}

    if cfg.metric.epochs > 0:
        n = cfg.metric.batch_size
        peak, params = _classifier_step_peak(cfg, n)
        parts = {"weights": params, "optimizer_state": params, "autocast_weight_copies": params // 2,
                 "step_activations_and_grads": peak, "device_images": images, "workspace_allowance": WORKSPACE_BYTES}
        out["metric"] = {"images_per_step": n, "parts": parts, "bytes": sum(parts.values())}

    batch = max(cfg.ssl.embed_batch_size, cfg.meta.batch_size, 1024)  # 1024: 03_metric's EMBED_BATCH
    parts = {"weights_and_activations": _embed_peak(cfg, batch), "workspace_allowance": WORKSPACE_BYTES}
    out["embed"] = {"batch": batch, "parts": parts, "bytes": sum(parts.values())}
    return out


def ssl_step_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype of the SSL step's matrix products: bf16 under autocast (CUDA with run.precision bf16;
    the CPU where ssl.cpu_precision resolves to bf16, src.runtime.autocast), else fp32. A roof in
    another dtype than the step's is not its ceiling (fp32's is about half of native bf16's)."""
    bf16 = cfg.run.precision == "bf16" and (device.type == "cuda" or resolve_cpu_bf16(cfg.ssl.cpu_precision))
    return torch.bfloat16 if bf16 else torch.float32


def matmul_roof(device: torch.device, n: int = 0, min_seconds: float = 0.5, dtype: torch.dtype | None = None) -> dict:
    """Measured matmul throughput, the ceiling achieved FLOP/s is compared against: an n x n
    torch.mm in `dtype` (default: fp32 on CPU, with torch's current thread count, n = 4096 by default;
    bf16 on CUDA, n = 8192; pass :func:`ssl_step_dtype` for a training step's). One warm-up product,
    then enough products for about min_seconds (>= 3)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 4096)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def timed(repeats: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        sync(device)
        return time.perf_counter() - t0

    one = timed(1)  # warm-up (and a first estimate of one product's time)
    repeats = max(3, math.ceil(min_seconds / max(one, 1e-9)))
    seconds = timed(repeats)
    return {"gflops": round(2 * n**3 * repeats / seconds / 1e9, 1), "n": n, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "device": str(device), "repeats": repeats,
            "seconds": round(seconds, 3)}


def achieved(flops_per_view: float | None, views_per_s: float | None, roof_gflops: float | None) -> dict:
    """Achieved GFLOP/s of a training loop and its share of the roof (None where unknown)."""
    if not flops_per_view or not views_per_s:
        return {"achieved_gflops": None, "roof_pct": None}
    gflops = flops_per_view * views_per_s / 1e9
    return {"achieved_gflops": gflops, "roof_pct": 100 * gflops / roof_gflops if roof_gflops else None}
