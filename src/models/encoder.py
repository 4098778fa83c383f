"""timm backbones as feature encoders for 32x32 images, plus input normalisation, embedding,
and save/load through safetensors (never pickles).

An encoder maps a float batch (B, 3, H, W), normalised by :func:`to_input`, to pooled features
(B, D) with ``encoder.dim == D``. A saved encoder is two files: ``encoder.safetensors`` (weights)
and ``encoder.json`` (the BackboneCfg it was built from, plus the image size).
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
from src.registry import Registry
from src.runtime import autocast

# ImageNet statistics: keep them so users' locally pretrained timm weights see familiar inputs.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255.0
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255.0

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
    """timm model without its classifier: forward(x) -> (B, dim) pooled features."""

    def __init__(self, cfg: BackboneCfg, image_size: int = 32):
        super().__init__()
        kwargs = BACKBONES.get(cfg.name)(cfg, image_size) if cfg.name in BACKBONES else {}
        if "vit" in cfg.name or "deit" in cfg.name:
            kwargs.setdefault("img_size", image_size)
        try:
            self.net = timm.create_model(cfg.name, pretrained=cfg.allow_download and not cfg.pretrained,
                                         num_classes=0, **kwargs)
        except RuntimeError as exc:  # timm: unknown model
            raise UserError(f"backbone.name: {exc}") from None
        if cfg.small_stem:
            adapt_small_stem(self.net)
        if cfg.pretrained:
            load_pretrained(self.net, Path(cfg.pretrained))
        self.cfg = cfg
        self.image_size = image_size
        self.dim = int(self.net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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


def load_pretrained(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: backbone.pretrained weights not found")
    if path.suffix == ".safetensors":
        state = io.load_tensors(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = net.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not compatible:
        raise UserError(f"{path}: no tensor matches the backbone's parameter names and shapes")
    net.load_state_dict(compatible, strict=False)
    print(f"loaded {len(compatible)}/{len(own)} tensors from {path}")


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
          progress: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) -> L2-normalised float32 (N, D). flip_tta averages the features of the
    image and its horizontal mirror before normalising."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="embed", disable=not progress, mininterval=2):
        chunk = np.array(images[start:start + batch_size])  # a writable copy: the image cache is a read-only memmap
        batch = torch.from_numpy(chunk).to(device, non_blocking=True)
        x = to_input(batch, channels_last)
        with autocast(device, precision):
            f = encoder(x).float()
            if flip_tta:
                f = f + encoder(torch.flip(x, dims=[3])).float()
        out.append(F.normalize(f, dim=1).cpu())
    encoder.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(encoder, "dim", 0)), np.float32)


def save_encoder(encoder: Encoder, weights: Path, spec: Path, extra: dict | None = None) -> None:
    state = {k: v for k, v in unwrap(encoder).state_dict().items()}
    io.save_tensors(weights, state)
    io.write_json(spec, {"backbone": dataclasses.asdict(unwrap(encoder).cfg),
                         "image_size": unwrap(encoder).image_size, "dim": unwrap(encoder).dim, **(extra or {})})


def load_encoder(weights: Path, spec: Path, device: torch.device | str = "cpu") -> Encoder:
    if not weights.exists() or not spec.exists():
        raise UserError(f"{weights}: encoder not found (run the stage that trains it first)")
    meta = io.read_json(spec)
    cfg = BackboneCfg(**{**meta["backbone"], "pretrained": "", "allow_download": False})
    encoder = Encoder(cfg, meta["image_size"])
    encoder.load_state_dict(io.load_tensors(weights))
    return encoder.to(device)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
