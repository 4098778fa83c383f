"""timm backbones as feature encoders for 32x32 images, plus input normalisation, embedding,
and save/load through safetensors (never pickles).

An encoder maps a float batch (B, 3, H, W), normalised by :func:`to_input`, to pooled features
(B, D) with ``encoder.dim == D``. A saved encoder is two files: ``encoder.safetensors`` (weights)
and ``encoder.json`` (the BackboneCfg it was built from, the image and model input sizes, and the
input statistics).

Input statistics: :func:`to_input` always normalises with ImageNet's mean and std (augmentations and
every caller rely on it). A model trained on other statistics, e.g. EfficientNet-Lite's
(x/255 - 0.5)/0.5 (timm's ``pretrained_cfg`` mean/std), gets them in :meth:`Encoder.forward`
through one per-channel affine map (x * scale + shift); models with ImageNet statistics skip it.
``encoder.json`` records the statistics and :func:`load_encoder` restores them (a file without them
was trained on ImageNet-normalised inputs and keeps those).

Pretrained weights (``backbone.pretrained``): a local ``.safetensors`` or ``.pth`` file (read with
``weights_only=True``, never a pickle) for any timm model, or the name of an installed weight source
(:mod:`src.models.weights`, e.g. ``efficientnet_lite0`` for ``backbone.name=tf_efficientnet_lite0``);
``backbone.allow_download=true`` lets timm fetch its own weights from the hub instead, only when the
user sets it. ImageNet weights expect their native resolution: ``data.model_input_size`` (e.g. 224)
resizes every 32x32 input inside :meth:`Encoder.forward` (bilinear), which multiplies the FLOPs by
(224/32)^2 = 49.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src import io
from src.config import BackboneCfg
from src.errors import UserError
from src.models.weights import WEIGHT_SOURCES, read_weights, resolve  # noqa: F401 - read_weights: re-exported
from src.registry import Registry
from src.transductive.core import power_transform
from src.runtime import autocast

# ImageNet statistics (0..1 units): what to_input normalises with, and most timm weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0

# Named presets; any other timm model name is passed to timm as is.
BACKBONES = Registry("backbone")


@BACKBONES.register("resnet18")
def _resnet18(cfg: BackboneCfg, image_size: int) -> dict:
    return _resnet_kwargs(cfg)


@BACKBONES.register("resnet34")
def _resnet34(cfg: BackboneCfg, image_size: int) -> dict:
    return _resnet_kwargs(cfg)


@BACKBONES.register("vit_tiny_patch16_224")
def _vit_tiny(cfg: BackboneCfg, image_size: int) -> dict:
    if image_size > 64:  # native-resolution input (data.model_input_size): timm's own 16x16 patches
        return {"img_size": image_size}
    return {"img_size": image_size, "patch_size": 4}  # 8x8 tokens for 32x32 inputs


@BACKBONES.register("convnext_nano")
def _convnext_nano(cfg: BackboneCfg, image_size: int) -> dict:
    return {}


def _resnet_kwargs(cfg: BackboneCfg) -> dict:
    kwargs = {}
    if cfg.width > 0:  # narrow ResNet for CPU demos and tests: (w, 2w, 4w, 8w) channels
        kwargs["channels"] = tuple(cfg.width * m for m in (1, 2, 4, 8))
    if cfg.stem_width > 0:
        kwargs["stem_width"] = cfg.stem_width
    return kwargs


class Encoder(nn.Module):
    """timm model without its classifier: forward(x) -> (B, dim) pooled features.

    image_size: side of the cached images (32). input_size: side the model sees; > 0 and different
    from the batch's side resizes the batch bilinearly in forward (data.model_input_size)."""

    def __init__(self, cfg: BackboneCfg, image_size: int = 32, input_size: int = 0):
        super().__init__()
        size = input_size or image_size  # what the model is built for (ViT position embeddings)
        kwargs = BACKBONES.get(cfg.name)(cfg, size) if cfg.name in BACKBONES else {}
        if "vit" in cfg.name or "deit" in cfg.name:
            kwargs.setdefault("img_size", size)
        download = cfg.allow_download and not cfg.pretrained  # timm's hub only when the user asks
        try:
            self.net = timm.create_model(cfg.name, pretrained=download, num_classes=0, **kwargs)
        except RuntimeError as exc:  # timm: unknown model, or no pretrained weights for it
            raise UserError(f"backbone.name: {exc}") from None
        except OSError as exc:  # hub unreachable (allow_download only)
            raise UserError(f"backbone.allow_download: cannot fetch weights of '{cfg.name}' ({exc})") from None
        if cfg.small_stem:
            adapt_small_stem(self.net)
        if cfg.pretrained:
            state, _ = resolve(cfg.pretrained, cfg.name)  # a file, or an installed source of this architecture
            load_pretrained(self.net, state, cfg.pretrained, cfg.name, cfg.small_stem)
        self.cfg = cfg
        self.image_size = image_size
        self.input_size = input_size
        self.dim = int(self.net.num_features)
        self.set_input_stats(*model_stats(self.net))

    def set_input_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Statistics (0..1 units) the network expects. Other than ImageNet's: forward maps the
        ImageNet-normalised batch onto them with x * in_scale + in_shift, (1, 3, 1, 1) non-persistent
        buffers (saved encoder files stay the same); ImageNet's: both are None and forward skips it."""
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        scale = shift = None
        if not np.allclose(self.mean + self.std, IMAGENET_MEAN + IMAGENET_STD, rtol=0, atol=1e-6):
            m = torch.tensor(self.mean, device="cpu").view(1, 3, 1, 1) * 255.0  # cpu like MEAN/STD, also
            s = torch.tensor(self.std, device="cpu").view(1, 3, 1, 1) * 255.0  # under torch.device("meta")
            scale, shift = STD / s, (MEAN - m) / s  # (p - MEAN) / STD * scale + shift == (p - m) / s
            device = next(self.net.parameters()).device
            scale, shift = scale.to(device), shift.to(device)
        self.register_buffer("in_scale", scale, persistent=False)
        self.register_buffer("in_shift", shift, persistent=False)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (B, 3, h, w) -> what the network takes: its own statistics, its input size."""
        if self.in_scale is not None:  # ImageNet-normalised -> the model's own statistics
            x = x * self.in_scale + self.in_shift
        if self.input_size and x.shape[-1] != self.input_size:
            # (B, 3, h, w) -> (B, 3, S, S): a linear map, so resizing the normalised batch equals
            # normalising the resized images. Costs (S/h)^2 more FLOPs in the network.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.model_input(x))


def source_backbone(name: str) -> tuple[BackboneCfg, int]:
    """(backbone, native input side) of the installed weight source `name` (src/models/weights.py):
    its timm model with the source's weights and the pretrained stride-2 stem (ssl.extra_encoders)."""
    source = WEIGHT_SOURCES.get(name)
    return BackboneCfg(name=source.model, pretrained=name, small_stem=False), source.resolution


def adapt_small_stem(net: nn.Module) -> None:
    """32x32 stem: the first RGB convolution becomes 3x3 stride 1, the first max-pool goes.
    Standard for CIFAR-sized inputs (He et al. 2016, sec. 4.2); a no-op for patch-embedding models."""
    if hasattr(net, "patch_embed"):
        return
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(parent, name, nn.Conv2d(3, child.out_channels, 3, 1, 1, bias=child.bias is not None))
                break
        else:
            continue
        break
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.Identity())
                return


# Tensors a weights file may have that the encoder does not: the classifier (num_classes=0 drops it;
# timm's pretrained_cfg names it too).
HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head_dist.", "last_linear.")


def load_pretrained(net: nn.Module, state: dict[str, torch.Tensor], path: Path | str, name: str = "",
                    small_stem: bool = False) -> None:
    """Load a timm-named state dict (from :func:`src.models.weights.resolve`; `path` names its origin
    in messages) into a timm model. Every tensor must fit except the classifier (dropped with
    num_classes=0) and, with backbone.small_stem, the replaced stem convolution (kept freshly
    initialised); anything else (another architecture or width) is a one-line UserError, never a
    silent partial load."""
    own = net.state_dict()
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    head = HEAD_PREFIXES + ((f"{classifier}.",) if isinstance(classifier, str) else ())
    stem = stem_conv_key(net) if small_stem else None
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(head)]
    shape = [k for k in state if k in own and own[k].shape != state[k].shape and k != stem]
    if missing or unexpected or shape:
        example = (f"'{shape[0]}' is {tuple(state[shape[0]].shape)} in the file, {tuple(own[shape[0]].shape)} in "
                   f"the model" if shape else f"'{(missing or unexpected)[0]}' "
                   f"{'missing from the file' if missing else 'not in the model'}")
        raise UserError(f"{path}: weights do not fit backbone '{name or type(net).__name__}' ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(shape)} of another shape; e.g. {example}): "
                        f"wrong architecture, backbone.width/stem_width or input size")
    load = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(load, strict=False)
    note = f" (kept fresh: {stem}, the small_stem 3x3 convolution)" if stem and stem not in load else ""
    print(f"loaded {len(load)}/{len(own)} tensors from {path}{note}")


def model_stats(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in 0..1 units the timm model was trained with (its pretrained_cfg); ImageNet's
    when timm does not say."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(mean), tuple(std)


def stem_conv_key(net: nn.Module) -> str | None:
    """State-dict key of the first convolution on RGB input (what adapt_small_stem replaces)."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return f"{name}.weight"
    return None


_STATS: dict = {}


def _stats_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN/STD on `device`, copied once: a copy from pageable host memory per batch would make
    the host wait for the GPU queue (a hidden synchronisation in every training step)."""
    if device not in _STATS:
        _STATS[device] = (MEAN.to(device), STD.to(device))
    return _STATS[device]


def to_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in 0..255 -> normalised float (B, 3, H, W)."""
    if images.dtype == torch.uint8 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    mean, std = _stats_on(images.device)
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@torch.no_grad()
def embed(encoder: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 1024,
          precision: str = "bf16", flip_tta: bool = False, channels_last: bool = False,
          cpu_bf16: bool = False, progress: bool = False, power: float = 1.0) -> np.ndarray:
    """uint8 (N, H, W, 3) -> L2-normalised float32 (N, D). flip_tta averages the features of the
    image and its horizontal mirror before normalising. cpu_bf16: bf16 autocast on the CPU too
    (ssl.cpu_precision; CPUs with native bf16 only). power < 1: the power transform sign(f) |f|^power
    (Hu et al. 2021, eq. 1; ssl.embed_power) before normalising."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="embed", disable=not progress, mininterval=2):
        chunk = np.array(images[start:start + batch_size])  # a writable copy: the image cache is a read-only memmap
        batch = torch.from_numpy(chunk).to(device, non_blocking=True)
        x = to_input(batch, channels_last)
        with autocast(device, precision, cpu=cpu_bf16):
            f = encoder(x).float()
            if flip_tta:
                f = f + encoder(torch.flip(x, dims=[3])).float()
        if power != 1.0:
            f = torch.from_numpy(power_transform(f.cpu().numpy(), power))
        out.append(F.normalize(f, dim=1).cpu())
    encoder.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(encoder, "dim", 0)), np.float32)


def save_encoder(encoder: Encoder, weights: Path, spec: Path, extra: dict | None = None) -> None:
    state = {k: v for k, v in unwrap(encoder).state_dict().items()}
    io.save_tensors(weights, state)
    enc = unwrap(encoder)
    io.write_json(spec, {"backbone": dataclasses.asdict(enc.cfg), "image_size": enc.image_size,
                         "input_size": enc.input_size, "dim": enc.dim, "mean": list(enc.mean), "std": list(enc.std),
                         **(extra or {})})


def load_encoder(weights: Path, spec: Path, device: torch.device | str = "cpu") -> Encoder:
    if not weights.exists() or not spec.exists():
        raise UserError(f"{weights}: encoder not found (run the stage that trains it first)")
    meta = io.read_json(spec)
    cfg = BackboneCfg(**{**meta["backbone"], "pretrained": "", "allow_download": False})
    encoder = Encoder(cfg, meta["image_size"], meta.get("input_size", 0))
    # the statistics it was trained with; files written before per-model statistics saw ImageNet's
    encoder.set_input_stats(meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD))
    encoder.load_state_dict(io.load_tensors(weights))
    return encoder.to(device)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
