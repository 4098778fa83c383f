"""An encoder split in two at a stage boundary: a frozen trunk run once over every image, and a
light tail run (and trained) on the trunk's cached maps (``ssl.trunk_cut``).

For timm's EfficientNet / MobileNet family (``conv_stem``, ``bn1``, ``blocks``, ``conv_head``,
``bn2``, ``global_pool``), cut k:

    trunk:  normalised (B, 3, h, w) -> input statistics, resize -> stem -> blocks[:k] -> (B, C, s, s)
    tail:   (B, C, s, s) -> blocks[k:] -> conv_head -> bn2 -> pool -> (B, D)

tail(trunk(x)) == encoder(x). On EfficientNet-Lite0 at 224 with k = 6 the trunk holds about 0.9 of
the 0.39 GMAC per image and the maps are (192, 7, 7): 18.8 KB per view in float16, so 20k images and
their mirrors cache in 0.75 GB and the tail trains at about a tenth of the full network's cost.

    maps = trunk_maps(encoder, images, cut, path, batch_size, engine="onnxruntime")   # (N, V, C, s, s)
    feats = embed_tail(encoder.net, maps, cut, power=0.5)                             # (N, D), unit rows
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src import io
from src.errors import UserError
from src.models.encoder import to_input
from src.transductive.core import power_transform

PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")


def check_split(net: nn.Module, cut: int, key: str = "ssl.trunk_cut") -> None:
    """UserError unless `net` is an EfficientNet-family timm model with stages on both sides of `cut`."""
    missing = [p for p in PARTS if not hasattr(net, p)]
    if missing:
        raise UserError(f"{key}: {type(net).__name__} has no {missing[0]} (the split needs timm's EfficientNet / "
                        f"MobileNet family: {', '.join(PARTS)})")
    if not 1 <= cut < len(net.blocks):
        raise UserError(f"{key}: must be in 1..{len(net.blocks) - 1} for {type(net).__name__} "
                        f"({len(net.blocks)} stages), got {cut}")


class Trunk(nn.Module):
    """Normalised (B, 3, h, w) -> (B, C, s, s): the encoder's input map and resize, stem, blocks[:cut]."""

    def __init__(self, encoder: nn.Module, cut: int):
        super().__init__()
        check_split(encoder.net, cut)
        self.encoder, self.cut = encoder, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.encoder.net
        x = net.bn1(net.conv_stem(self.encoder.model_input(x)))
        for block in net.blocks[:self.cut]:
            x = block(x)
        return x


def tail_modules(net: nn.Module, cut: int) -> list[nn.Module]:
    """The modules with weights after the cut: blocks[cut:], conv_head, bn2."""
    return [*net.blocks[cut:], net.conv_head, net.bn2]


def tail_features(net: nn.Module, maps: torch.Tensor, cut: int) -> torch.Tensor:
    """(B, C, s, s) trunk maps -> (B, D) pooled features."""
    for block in net.blocks[cut:]:
        maps = block(maps)
    return net.global_pool(net.bn2(net.conv_head(maps)))


def trunk_maps(encoder: nn.Module, images: np.ndarray, cut: int, path: Path, batch_size: int = 64,
               flip: bool = True, engine: str = "torch", device: torch.device | str = "cpu",
               progress: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float16 (N, V, C, s, s) trunk maps of every image (V = 2 with `flip`: the
    image, then its mirror), written to `path` (.npy, renamed into place when complete) and returned
    memory-mapped. engine: torch (on `device`) or onnxruntime (the trunk exported beside `path`, CPU)."""
    encoder = encoder.eval()
    trunk = Trunk(encoder, cut).eval()
    size = images.shape[1]
    if engine == "onnxruntime":
        from src.models.onnx_engine import cpu_session, export_onnx

        onnx = Path(path).with_suffix(".onnx")
        export_onnx(trunk, size, onnx)
        session = cpu_session(onnx, torch.get_num_threads())

        def run(x: torch.Tensor) -> np.ndarray:
            return session.run(None, {"images": np.ascontiguousarray(x.numpy())})[0]
    else:
        def run(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return trunk(x.to(device)).float().cpu().numpy()

    shape = tuple(run(to_input(torch.zeros(1, size, size, 3, dtype=torch.uint8))).shape[1:])
    views = 1 + bool(flip)
    with io.atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(images), views, *shape))
        for s in tqdm(range(0, len(images), batch_size), desc="trunk", disable=not progress, mininterval=2):
            x = to_input(torch.from_numpy(np.array(images[s:s + batch_size])))
            out[s:s + batch_size, 0] = run(x)
            if flip:
                out[s:s + batch_size, 1] = run(torch.flip(x, dims=[3]))
        out.flush()
        del out
    return io.read_npy(path, mmap=True)


@torch.no_grad()
def embed_tail(net: nn.Module, maps: np.ndarray, cut: int, power: float = 1.0, batch_size: int = 512,
               device: torch.device | str = "cpu") -> np.ndarray:
    """float16 (N, V, C, s, s) trunk maps -> L2-normalised float32 (N, D): the tail's features summed
    over the V views (flip test-time augmentation), power-transformed (ssl.embed_power), as
    :func:`src.models.encoder.embed` computes them from images."""
    was_training = net.training
    net.eval()
    out = []
    for s in range(0, len(maps), batch_size):
        chunk = torch.from_numpy(np.asarray(maps[s:s + batch_size], np.float32)).to(device)  # (B, V, C, s, s)
        f = sum(tail_features(net, chunk[:, v], cut).float() for v in range(chunk.shape[1]))  # (B, D)
        if power != 1.0:
            f = torch.from_numpy(power_transform(f.cpu().numpy(), power))
        out.append(F.normalize(f, dim=1).cpu())
    net.train(was_training)
    return torch.cat(out).numpy()
