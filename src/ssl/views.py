"""Where the augmented views of a training step come from.

* :class:`DeviceViews` (``ssl.gpu_augment = gpu``): the whole uint8 image set lives on the device;
  each step gathers its rows and augments them in batches there (src.augment.GpuAugment).
* :class:`LoaderViews` (``cpu``): albumentations per image in DataLoader workers, pinned memory,
  non-blocking copies, normalisation on the device.

Both yield ``(views, local_views)`` per step: lists of normalised (B, 3, S, S) tensors on the
device, B = per-process batch. Under DDP both shard every epoch like DistributedSampler.
"""
from __future__ import annotations

import numpy as np
import torch

from src.augment import GpuAugment, cpu_pipeline, to_device_views, view_loader
from src.config import Config
from src.errors import UserError
from src.train_utils import dist_info, shard_rows


def augment_path(cfg: Config, device: torch.device) -> str:
    """'gpu' (batched on the device) or 'cpu' (per-image workers). 'auto' takes the batched path
    on every device: measured faster on CPU as well (docs/results_parts/issue3.md)."""
    choice = cfg.ssl.gpu_augment
    if choice not in ("auto", "gpu", "cpu"):
        raise UserError(f"ssl.gpu_augment: expected auto, gpu or cpu, got '{choice}'")
    return "gpu" if choice == "auto" else choice


def local_size(cfg: Config, encoder) -> int:
    """Patch-embedding models (ViT) have a fixed token grid: their local crops keep image_size."""
    return cfg.data.image_size if hasattr(getattr(encoder, "net", encoder), "patch_embed") else cfg.ssl.local_crop_size


def _aug_kwargs(cfg: Config, scale) -> dict:
    s = cfg.ssl
    return dict(crop_scale=tuple(scale), flip=s.flip, color_jitter=s.color_jitter, grayscale_p=s.grayscale_p,
                blur_p=s.blur_p, solarize_p=s.solarize_p, rotate_deg=s.rotate_deg)


class DeviceViews:
    rows: torch.Tensor | None = None  # (B,) image rows of the batch last yielded (DeepCluster-v2's memory bank)

    def __init__(self, cfg: Config, images: np.ndarray, device: torch.device, batch: int, n_local: int,
                 local_px: int, channels_last: bool = False):
        self.cfg, self.device, self.batch, self.n_local = cfg, device, batch, n_local
        # Every image on the device once (uint8: 60k x 32x32x3 = 184 MB).
        self.images = torch.from_numpy(np.array(images)).to(device)  # copy: the cache is a read-only memmap
        cl = channels_last  # views in the encoder's memory format (src.runtime.use_channels_last)
        size = cfg.ssl.view_size or cfg.data.image_size
        self.global_aug = GpuAugment(size, channels_last=cl, **_aug_kwargs(cfg, (cfg.ssl.crop_scale_min, 1.0)))
        self.local_aug = GpuAugment(local_px, channels_last=cl, **_aug_kwargs(cfg, cfg.ssl.local_crop_scale))

    def epoch(self, epoch: int, steps: int):
        info = dist_info()
        rows = shard_rows(len(self.images), self.batch, epoch, self.cfg.run.seed, self.device)
        g = torch.Generator(device=self.device).manual_seed(
            (self.cfg.run.seed * 1_000_003 + epoch) * 1024 + info.rank)
        for s in range(steps):
            self.rows = rows[s]
            x = self.images[self.rows]  # (B, H, W, 3) uint8, gathered on the device
            yield ([self.global_aug(x, g) for _ in range(2)],
                   [self.local_aug(x, g) for _ in range(self.n_local)])


class LoaderViews:
    rows = None  # image rows of the batch: unknown on this path

    def __init__(self, cfg: Config, images: np.ndarray, device: torch.device, batch: int, n_local: int,
                 local_px: int, channels_last: bool = False):
        self.cfg, self.device, self.n_local = cfg, device, n_local
        self.channels_last = channels_last
        size = cfg.ssl.view_size or cfg.data.image_size
        self.global_tf = cpu_pipeline("ssl", size, **_aug_kwargs(cfg, (cfg.ssl.crop_scale_min, 1.0)))
        self.local_tf = cpu_pipeline("ssl", local_px, **_aug_kwargs(cfg, cfg.ssl.local_crop_scale))
        info = dist_info()
        self.sampler = None
        if info.enabled:
            from torch.utils.data.distributed import DistributedSampler

            self.sampler = DistributedSampler(range(len(images)), num_replicas=info.world, rank=info.rank,
                                              shuffle=True, seed=cfg.run.seed, drop_last=True)
        self.loader = view_loader(images, [self.global_tf] * 2 + [self.local_tf] * n_local, batch, device,
                                  num_workers=cfg.run.num_workers, sampler=self.sampler, seed=cfg.run.seed)

    def epoch(self, epoch: int, steps: int):
        info = dist_info()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.loader.generator.manual_seed(self.cfg.run.seed * 1_000_003 + epoch)  # shuffle + worker seeds
        for tf in (self.global_tf, self.local_tf):  # in-process (num_workers=0) augmentation stream
            tf.set_random_seed((self.cfg.run.seed * 1_000_003 + epoch) * 1024 + info.rank)
        for _, batch in zip(range(steps), self.loader):
            views = to_device_views(batch, self.device, self.channels_last)
            yield views[:2], views[2:]


def make_views(cfg: Config, images: np.ndarray, device: torch.device, batch: int, encoder,
               uses_local: bool, channels_last: bool = False):
    n_local = cfg.ssl.n_local_crops if uses_local else 0
    cls = DeviceViews if augment_path(cfg, device) == "gpu" else LoaderViews
    return cls(cfg, images, device, batch, n_local, local_size(cfg, encoder), channels_last)
