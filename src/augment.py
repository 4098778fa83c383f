"""Image augmentation: a batched path for uint8 tensors already on the device, and a per-image
albumentations path for CPU data-loader workers.

Batched path (every op runs on the whole batch, per-sample random parameters, no host sync)::

    aug = GpuAugment(image_size=32)              # SimCLR-style views
    x = aug(images_u8)                           # uint8 (B, H, W, 3) -> normalised float (B, 3, 32, 32)
    weak, strong = weak_augment(32), strong_augment(32)   # FixMatch pair (Sohn et al. 2020)

CPU path (per image, albumentations; normalisation happens later, batched, on the device)::

    tf = cpu_pipeline("ssl", 32)                 # HWC uint8 -> HWC uint8
    loader = view_loader(images, [tf, tf], batch_size=256, device=device)
    views = to_device_views(next(iter(loader)), device)   # list of normalised (B, 3, 32, 32)

All batched modules take an optional ``generator`` (a torch.Generator on the images' device) so
that a given seed reproduces the same views.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from src.errors import UserError
from src.models.encoder import to_input

# ITU-R 601 luma weights (what torchvision's rgb_to_grayscale uses).
LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, i.e. one 3x3 matrix per
# sample instead of a round trip through HSV. Close to torchvision's HSV hue shift for |h| <= 0.1.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


# ---------------------------------------------------------------------------------------------
# Batched primitives. x: float (B, 3, H, W) in 0..1 unless noted; masks: bool (B,).
# ---------------------------------------------------------------------------------------------
def _rand(shape, x: torch.Tensor, generator: torch.Generator | None, low: float = 0.0, high: float = 1.0):
    return torch.rand(shape, device=x.device, generator=generator) * (high - low) + low


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (Python-float weights: no host->device copy)."""
    return x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2]


_CONSTS: dict = {}


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A module constant on like's device/dtype, copied once (per-step pageable copies sync the host)."""
    key = (id(t), like.device, like.dtype)
    if key not in _CONSTS:
        _CONSTS[key] = t.to(like)
    return _CONSTS[key]


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance semantics: factor 0 -> other, 1 -> img; clamped to 0..1. factor: (B,)."""
    return (other + factor.view(-1, 1, 1, 1) * (img - other)).clamp_(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)


def adjust_saturation(x, factor):
    return _blend(x, _gray(x).expand_as(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate chroma by shift (B,) turns (torchvision hue_factor units, -0.5..0.5)."""
    angle = -shift * 2 * math.pi  # sign: positive shifts turn red towards green, as in HSV
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(x), 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = _on(_YIQ2RGB, x) @ rot @ _on(_RGB2YIQ, x)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1)


def adjust_sharpness(x, factor):
    """Blend with PIL's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1) / 13, borders kept as is."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5
    k = (k / 13).expand(3, 1, 3, 3)
    smooth = F.conv2d(x, k, padding=1, groups=3)
    smooth[..., 0, :], smooth[..., -1, :] = x[..., 0, :], x[..., -1, :]
    smooth[..., :, 0], smooth[..., :, -1] = x[..., :, 0], x[..., :, -1]
    return _blend(x, smooth, factor)


def solarize(x, threshold):
    """Invert pixels >= threshold (B,)."""
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 1 - x, x)


def posterize(x, bits):
    """Keep `bits` (B,) high bits of each 8-bit value."""
    step = torch.pow(2.0, 8 - bits.to(x.dtype)).view(-1, 1, 1, 1)
    return torch.floor(torch.round(x * 255) / step) * step / 255


def autocontrast(x):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def equalize(x):
    """Per-channel histogram equalisation: each value -> its empirical CDF (rank / (H*W))."""
    b, c, h, w = x.shape
    flat = torch.round(x * 255).reshape(b * c, h * w).contiguous()
    ranks = torch.searchsorted(flat.sort(dim=1).values, flat, right=True)
    return (ranks.to(x.dtype) / (h * w)).reshape(b, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (B,), as one grouped convolution."""
    b, c, h, w = x.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.reshape(b, c, h, w)


def cutout(x: torch.Tensor, size_frac: torch.Tensor, generator=None, fill: float = 0.5) -> torch.Tensor:
    """Fill one square per sample, side size_frac (B,) of the image, centre uniform (DeVries 2017)."""
    b, _, h, w = x.shape
    cy, cx = _rand((b, 1), x, generator) * h, _rand((b, 1), x, generator) * w
    half = size_frac.view(-1, 1) * min(h, w) / 2
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, -1) + 0.5
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, -1) + 0.5
    inside = ((ys - cy).abs() < half).unsqueeze(2) & ((xs - cx).abs() < half).unsqueeze(1)  # (B, H, W)
    return x.masked_fill(inside.unsqueeze(1), fill)


def affine_sample(x: torch.Tensor, theta: torch.Tensor, size: int, padding: str = "reflection",
                  fill: float | None = None) -> torch.Tensor:
    """Resample x through per-sample affine maps theta (B, 2, 3) in normalised [-1, 1] output->input
    coordinates (F.affine_grid convention). fill: value outside the image (uses zero padding)."""
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    if fill is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def crop_flip_theta(b: int, x: torch.Tensor, generator, crop_scale: tuple[float, float] | None,
                    ratio: tuple[float, float], flip: bool, translate_px: int, size: int) -> torch.Tensor:
    """Per-sample affine (B, 2, 3): random resized crop (area fraction in crop_scale, aspect ratio
    log-uniform in ratio), horizontal flip with p=0.5, integer pixel translation in +-translate_px."""
    theta = torch.zeros(b, 2, 3, device=x.device)
    sx = torch.ones(b, device=x.device)
    sy = torch.ones(b, device=x.device)
    if crop_scale is not None:
        area = _rand(b, x, generator, *crop_scale)
        log_r = _rand(b, x, generator, math.log(ratio[0]), math.log(ratio[1]))
        sx = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop width / image width
        sy = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        theta[:, 0, 2] = (_rand(b, x, generator) * 2 - 1) * (1 - sx)  # crop centre, inside the image
        theta[:, 1, 2] = (_rand(b, x, generator) * 2 - 1) * (1 - sy)
    if translate_px:
        shift = torch.randint(-translate_px, translate_px + 1, (b, 2), device=x.device, generator=generator)
        theta[:, :, 2] += shift.float() * 2 / size  # whole pixels: bilinear sampling stays exact
    if flip:
        sx = sx * torch.where(_rand(b, x, generator) < 0.5, -1.0, 1.0)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return theta


def rotation_matrix(angle: torch.Tensor) -> torch.Tensor:
    """(B,) radians -> (B, 2, 2) rotation matrices."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in 0..1."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255)


# ---------------------------------------------------------------------------------------------
# Batched modules
# ---------------------------------------------------------------------------------------------
class GpuAugment(nn.Module):
    """SimCLR/BYOL-style views of a uint8 batch on its own device (Chen et al. 2020, appendix A):
    random resized crop + flip (one affine resampling), colour jitter with p=0.8 (brightness,
    contrast, saturation `color_jitter`, hue `color_jitter / 4`), grayscale, Gaussian blur
    (sigma 0.1..2), solarize. Each op draws per-sample parameters and is applied through masks,
    so there is no data-dependent control flow and no host synchronisation.

    forward(uint8 (B, H, W, 3)) -> normalised float (B, 3, image_size, image_size).
    """

    def __init__(self, image_size=32, crop_scale=(0.2, 1.0), flip=True, color_jitter=0.4, grayscale_p=0.2,
                 blur_p=0.0, solarize_p=0.0, channels_last=False, translate_px=0, jitter_p=0.8,
                 ratio=(3 / 4, 4 / 3), rotate_deg=0.0):
        super().__init__()
        self.image_size = image_size
        self.crop_scale = tuple(crop_scale) if crop_scale is not None else None
        self.ratio = tuple(ratio)
        self.flip = flip
        self.translate_px = translate_px
        self.rotate_deg = rotate_deg  # uniform rotation in +-rotate_deg (handwriting slant); 0: off
        self.color_jitter = color_jitter
        self.jitter_p = jitter_p
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.solarize_p = solarize_p
        self.channels_last = channels_last
        self.blur_kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # ~10% of the side, odd

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_unit(images)
        b = len(x)
        geometric = self.crop_scale is not None or self.flip or self.translate_px or self.rotate_deg
        if geometric or x.shape[-1] != self.image_size:
            theta = crop_flip_theta(b, x, generator, self.crop_scale, self.ratio, self.flip, self.translate_px,
                                    self.image_size)
            if self.rotate_deg:
                theta[:, :, :2] = theta[:, :, :2] @ rotation_matrix(
                    _rand(b, x, generator, -self.rotate_deg, self.rotate_deg) * math.pi / 180)
            x = affine_sample(x, theta, self.image_size)
        if self.color_jitter > 0:
            s = self.color_jitter
            on = _rand(b, x, generator) < self.jitter_p
            y = adjust_brightness(x, _rand(b, x, generator, 1 - s, 1 + s))
            y = adjust_contrast(y, _rand(b, x, generator, 1 - s, 1 + s))
            y = adjust_saturation(y, _rand(b, x, generator, 1 - s, 1 + s))
            y = adjust_hue(y, _rand(b, x, generator, -s / 4, s / 4))
            x = _where(on, y, x)
        if self.grayscale_p > 0:
            x = _where(_rand(b, x, generator) < self.grayscale_p, _gray(x).expand_as(x), x)
        if self.blur_p > 0:
            sigma = _rand(b, x, generator, 0.1, 2.0)
            x = _where(_rand(b, x, generator) < self.blur_p, gaussian_blur(x, sigma, self.blur_kernel), x)
        if self.solarize_p > 0:
            half = torch.full((b,), 0.5, device=x.device)
            x = _where(_rand(b, x, generator) < self.solarize_p, solarize(x, half), x)
        return to_input(x * 255, self.channels_last)


class StrongAugment(nn.Module):
    """Batched RandAugment-style strong view for FixMatch (Cubuk et al. 2020; Sohn et al. 2020):
    flip + pad-and-crop translation, then `n_ops` ops per sample drawn uniformly from OPS with
    random magnitude, then Cutout (side up to `cutout` of the image, grey fill).

    Geometric ops (rotate, shear, translate) are folded into one affine resampling; colour ops are
    computed on the whole batch and selected per sample through masks (cheap at 32x32 and free of
    host syncs). forward(uint8 (B, H, W, 3)) -> normalised float (B, 3, image_size, image_size).
    """

    OPS = ("identity", "autocontrast", "equalize", "brightness", "color", "contrast", "sharpness",
           "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")

    def __init__(self, image_size=32, n_ops=2, translate_px=4, flip=True, cutout=0.5, channels_last=False):
        super().__init__()
        self.image_size = image_size
        self.n_ops = n_ops
        self.translate_px = translate_px
        self.flip = flip
        self.cutout = cutout
        self.channels_last = channels_last

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_unit(images)
        b, dev = len(x), x.device
        picks = torch.randint(0, len(self.OPS), (b, self.n_ops), device=dev, generator=generator)
        sel = {name: (picks == i).any(1) for i, name in enumerate(self.OPS)}  # name -> (B,) bool

        def mag(name, low, high):  # magnitude where the op is picked, identity value elsewhere
            v = _rand(b, x, generator, low, high)
            neutral = 1.0 if name in ("brightness", "color", "contrast", "sharpness") else 0.0
            return torch.where(sel[name], v, torch.full_like(v, neutral))

        # Geometry: A = [flip/translate] o rotate o shear, one resampling with grey outside.
        theta = crop_flip_theta(b, x, generator, None, (1, 1), self.flip, self.translate_px, self.image_size)
        lin = rotation_matrix(mag("rotate", -30, 30) * math.pi / 180)  # (B, 2, 2)
        shx, shy = mag("shear_x", -0.3, 0.3), mag("shear_y", -0.3, 0.3)
        one = torch.ones_like(shx)
        shear = torch.stack([torch.stack([one, shx], 1), torch.stack([shy, one], 1)], 1)
        theta[:, :, :2] = theta[:, :, :2] @ lin @ shear
        theta[:, 0, 2] += mag("translate_x", -0.3, 0.3) * 2
        theta[:, 1, 2] += mag("translate_y", -0.3, 0.3) * 2
        x = affine_sample(x, theta, self.image_size, fill=0.5)

        x = _where(sel["autocontrast"], autocontrast(x), x)
        x = _where(sel["equalize"], equalize(x), x)
        x = adjust_brightness(x, mag("brightness", 0.05, 1.95))
        x = adjust_saturation(x, mag("color", 0.05, 1.95))
        x = adjust_contrast(x, mag("contrast", 0.05, 1.95))
        x = adjust_sharpness(x, mag("sharpness", 0.05, 1.95))
        x = _where(sel["posterize"], posterize(x, torch.randint(4, 9, (b,), device=dev, generator=generator)), x)
        x = _where(sel["solarize"], solarize(x, _rand(b, x, generator)), x)
        if self.cutout > 0:
            x = cutout(x, _rand(b, x, generator, 0.0, self.cutout), generator)
        return to_input(x * 255, self.channels_last)


def weak_augment(image_size: int = 32, channels_last: bool = False) -> GpuAugment:
    """FixMatch weak view: horizontal flip + random translation by up to 4 px (pad 4, crop)."""
    return GpuAugment(image_size, crop_scale=None, flip=True, color_jitter=0.0, grayscale_p=0.0,
                      translate_px=max(1, image_size // 8), channels_last=channels_last)


def strong_augment(image_size: int = 32, channels_last: bool = False, n_ops: int = 2,
                   cutout: float = 0.5) -> StrongAugment:
    return StrongAugment(image_size, n_ops=n_ops, translate_px=max(1, image_size // 8), cutout=cutout,
                         channels_last=channels_last)


# ---------------------------------------------------------------------------------------------
# Per-image CPU path (albumentations) and its loader
# ---------------------------------------------------------------------------------------------
def cpu_pipeline(kind: str, image_size: int = 32, crop_scale=(0.2, 1.0), color_jitter: float = 0.4,
                 grayscale_p: float = 0.2, blur_p: float = 0.0, solarize_p: float = 0.0, flip: bool = True,
                 rotate_deg: float = 0.0, seed: int | None = None):
    """albumentations Compose, HWC uint8 -> HWC uint8 (normalise later, batched, on the device).

    kind: "ssl" (same recipe as GpuAugment), "weak" (flip + pad-4 crop), "strong" (weak + two of a
    RandAugment-like op pool + Cutout)."""
    import albumentations as A
    import cv2

    pad = max(1, image_size // 8)
    flip_crop = [A.PadIfNeeded(image_size + 2 * pad, image_size + 2 * pad, border_mode=cv2.BORDER_REFLECT_101),
                 A.RandomCrop(image_size, image_size), A.HorizontalFlip(p=0.5)]
    if kind == "ssl":
        s = color_jitter
        ops = [A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(crop_scale)),
               A.HorizontalFlip(p=0.5 if flip else 0.0)]
        if rotate_deg:
            ops.append(A.Affine(rotate=(-rotate_deg, rotate_deg), border_mode=cv2.BORDER_REFLECT_101, p=1.0))
        if s > 0:
            ops.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=s / 4, p=0.8))
        if grayscale_p > 0:
            ops.append(A.ToGray(num_output_channels=3, p=grayscale_p))
        if blur_p > 0:
            k = max(3, int(0.1 * image_size) // 2 * 2 + 1)
            ops.append(A.GaussianBlur(blur_limit=(k, k), sigma_limit=(0.1, 2.0), p=blur_p))
        if solarize_p > 0:
            ops.append(A.Solarize(threshold_range=(0.5, 0.5), p=solarize_p))
    elif kind == "weak":
        ops = flip_crop
    elif kind == "strong":
        pool = [A.AutoContrast(p=1), A.Equalize(p=1), A.RandomBrightnessContrast(0.9, 0.9, p=1),
                A.ColorJitter(brightness=0, contrast=0, saturation=0.9, hue=0, p=1), A.Sharpen(p=1),
                A.Posterize(num_bits=(4, 8), p=1), A.Solarize(threshold_range=(0.0, 1.0), p=1),
                A.Affine(rotate=(-30, 30), fill=128, p=1), A.Affine(shear=(-17, 17), fill=128, p=1),
                A.Affine(translate_percent=(-0.3, 0.3), fill=128, p=1)]
        ops = flip_crop + [A.SomeOf(pool, n=2, p=1),
                           A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.0, 0.5),
                                           hole_width_range=(0.0, 0.5), fill=128, p=1)]
    else:
        raise UserError(f"augmentation kind '{kind}': expected ssl, weak or strong")
    return A.Compose(ops, seed=seed)


class ViewDataset(torch.utils.data.Dataset):
    """Item i -> tuple of uint8 (H, W, 3) tensors, one per transform (views of images[rows[i]])."""

    def __init__(self, images: np.ndarray, transforms: list, rows: np.ndarray | None = None):
        self.images = images
        self.transforms = transforms
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img = np.asarray(self.images[self.rows[i]])
        return tuple(torch.from_numpy(np.ascontiguousarray(t(image=img)["image"])) for t in self.transforms)


def _seed_worker(worker_id: int) -> None:
    """Give every worker its own augmentation stream (torch seeds workers base_seed + worker_id,
    base_seed drawn from the loader's generator; albumentations and numpy do not follow it)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    for t in getattr(info.dataset, "transforms", []) if info is not None else []:
        if hasattr(t, "set_random_seed"):
            t.set_random_seed(seed)


def view_loader(images: np.ndarray, transforms: list, batch_size: int, device: torch.device, num_workers: int = 0,
                rows: np.ndarray | None = None, sampler=None, shuffle: bool = True, drop_last: bool = True,
                seed: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader of uint8 views; pinned memory on CUDA so to_device_views can copy asynchronously."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ViewDataset(images, transforms, rows), batch_size=batch_size, shuffle=shuffle and sampler is None,
        sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=drop_last,
        persistent_workers=num_workers > 0, worker_init_fn=_seed_worker, generator=g)


def to_device_views(batch, device: torch.device, channels_last: bool = False) -> list[torch.Tensor]:
    """Loader batch (tuple of uint8 (B, H, W, 3)) -> list of normalised float (B, 3, H, W) on device."""
    return [to_input(v.to(device, non_blocking=True), channels_last) for v in batch]
