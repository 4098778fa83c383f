"""Task augmentation for episodic meta-training (``meta.task_augment``), for the methods that set
``task_augment = True`` (the MAML family and protonet_episodic):

* ``rot90`` -- every pool class c becomes four classes (c, r): its images turned by r x 90 degrees,
  r = 0..3, each a class of its own, so an episode's n_way classes are drawn from base classes x
  rotations and may hold several rotations of one base class. The classic Omniglot recipe
  (Santoro et al. 2016; Vinyals et al. 2016), the "task augmentation" of ML2022 HW15, and the
  large-rotation task augmentation that Ni et al. 2021 ("Data Augmentation for Meta-Learning",
  ICML) found to help the most. Rotated copies are addressed by virtual rows
  ``r * n_total + row`` (r = 0: the image itself), so pools, samplers and banks work unchanged.
* ``image`` -- every image of a training episode (support and query) gets a fresh random flip
  (``meta.task_augment_flip``) and shift of up to 1/8 of its side (src.augment.GpuAugment, batched,
  seeded per episode: a resumed run draws the same augmentations), and goes through the frozen
  trunk (or, with ``meta.train_block=false``, the whole encoder) for that episode.
* ``rot90+image`` -- both.

Inference (the labeled support, the test images) never sees an augmentation. With ``rot90``
alone the rotated body inputs are computed once (:func:`rotated_bank`); with ``image`` they are
computed per episode (:class:`EpisodeBank`): N*(K+Q) trunk forwards per episode, no gradient.
Caveat on digits: a 6 turned by 180 degrees is a 9, so (6, 180) and (9, 0) are near-identical
classes: noisy episodes there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from src.augment import GpuAugment
from src.errors import UserError
from src.meta.base import FeatureBank, trunk_forward
from src.meta.sampler import EpisodeSampler, Pool
from src.models.encoder import to_input

MODES = ("none", "rot90", "image", "rot90+image")
N_ROT = 4  # quarter turns


def parse_mode(mode: str) -> tuple[bool, bool]:
    """'rot90+image' -> (rotate, image) = (True, True). Unknown -> UserError."""
    if mode not in MODES:
        raise UserError(f"meta.task_augment: expected one of {', '.join(MODES)}, got '{mode}'")
    return "rot90" in mode, "image" in mode


def rotated_pool(pool: Pool, n_total: int) -> Pool:
    """Class c -> classes N_ROT * c + r (r = 0..3), virtual rows r * n_total + row; groups repeated
    (a CACTUs episode stays within one clustering)."""
    r = np.repeat(np.arange(N_ROT), len(pool))
    return Pool(np.tile(pool.rows, N_ROT) + r * n_total, np.tile(pool.labels, N_ROT) * N_ROT + r, pool.kind,
                None if pool.groups is None else np.tile(pool.groups, N_ROT),
                pool.note + ("; " if pool.note else "") + "x4 rotations as classes (task augmentation)")


def split_virtual(rows: np.ndarray, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Virtual rows -> (image rows, quarter turns)."""
    rows = np.asarray(rows, np.int64)
    return rows % n_total, rows // n_total


def rot90_each(x: torch.Tensor, k: torch.Tensor, dims=(1, 2)) -> torch.Tensor:
    """Turn sample i of a batch of square images by k[i] quarter turns (counter-clockwise from
    dims[0] towards dims[1], as torch.rot90 / np.rot90). Masks, not indexing: no host sync."""
    out = x
    for r in range(1, N_ROT):
        out = torch.where((k == r).view(-1, *[1] * (x.dim() - 1)), torch.rot90(x, r, dims=dims), out)
    return out


@torch.no_grad()
def body_inputs(encoder: nn.Module, images: torch.Tensor, turns: torch.Tensor, train_block: bool,
                device: torch.device, precision: str, augment: nn.Module | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images (B, H, W, 3) on the device, quarter turns (B,) -> what a method's body reads:
    trunk features (train_block) or L2-normalised embeddings, float16. The encoder must be in eval mode."""
    x = rot90_each(images, turns)
    x = augment(x, generator) if augment is not None else to_input(x)
    if train_block:
        return trunk_forward(encoder, x, device, precision)
    return F.normalize(encoder(x).float(), dim=1).to(torch.float16)


class EpisodeBank:
    """Body inputs computed per episode from the uint8 images of the pool rows (kept on the device):
    quarter turns of virtual rows, then the episode's seeded augmentation."""

    def __init__(self, encoder: nn.Module, images: np.ndarray, rows: np.ndarray, n_total: int, train_block: bool,
                 augment: nn.Module, device: torch.device, precision: str):
        self.encoder, self.train_block, self.augment = encoder.eval(), train_block, augment
        self.device, self.precision, self.n_total = device, precision, n_total
        rows = np.unique(rows)
        self.pos = np.full(n_total, -1, np.int64)
        self.pos[rows] = np.arange(len(rows))
        self.images = torch.from_numpy(np.ascontiguousarray(images[rows])).to(device)  # (M, H, W, 3) uint8

    def task_inputs(self, episode) -> tuple[torch.Tensor, torch.Tensor]:
        rows, turns = split_virtual(np.concatenate([episode.support_rows, episode.query_rows]), self.n_total)
        pos = self.pos[rows]
        if (pos < 0).any():
            raise KeyError(f"rows not in the episode bank: {rows[pos < 0][:5].tolist()}")
        g = torch.Generator(device=self.device).manual_seed(int(episode.augment_seed))
        x = body_inputs(self.encoder, self.images[torch.from_numpy(pos).to(self.device)],
                        torch.from_numpy(turns).to(self.device), self.train_block, self.device, self.precision,
                        self.augment, g).float()
        n = len(episode.support_rows)
        return x[:n], x[n:]


@torch.no_grad()
def rotated_bank(bank: FeatureBank, encoder: nn.Module, images: np.ndarray, rows: np.ndarray, n_total: int,
                 train_block: bool, device: torch.device, precision: str, batch_size: int = 512,
                 channels_last: bool = False) -> FeatureBank:
    """Body inputs of images[rows] (taken from `bank`) and of their 1, 2 and 3 quarter turns,
    addressed by virtual rows: what rot90 episodes of a pool with these rows read."""
    was_training = encoder.training
    encoder.eval()
    rows = np.unique(rows)
    feats = [bank.feats[torch.from_numpy(bank.pos[rows]).to(bank.feats.device)]]
    for r in range(1, N_ROT):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            x = torch.from_numpy(np.ascontiguousarray(images[chunk])).to(device)
            turns = torch.full((len(chunk),), r, device=device)
            feats.append(body_inputs(encoder, x, turns, train_block, device, precision).to(bank.feats.dtype))
    encoder.train(was_training)
    out = torch.cat(feats)
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return FeatureBank(np.concatenate([rows + r * n_total for r in range(N_ROT)]), out, N_ROT * n_total)


class AugmentedSampler:
    """The wrapped sampler's episodes, each with a seed for its image augmentation (drawn from the
    episode's generator after the episode, so the episodes themselves are unchanged)."""

    def __init__(self, sampler: EpisodeSampler):
        self.sampler, self.pool = sampler, sampler.pool

    def sample(self, rng: np.random.Generator):
        episode = self.sampler.sample(rng)
        episode.augment_seed = int(rng.integers(2**62))
        return episode


@dataclass
class TaskAugment:
    """What task-augmented meta-training draws from: :meth:`sampler` for a (base) pool, and the bank."""

    mode: str
    n_total: int  # rows of the prepared index (virtual rows start at n_total)
    bank: FeatureBank | EpisodeBank

    def sampler(self, pool: Pool, n_way: int, n_shot: int, n_query: int):
        rotate, image = parse_mode(self.mode)
        sampler = EpisodeSampler(rotated_pool(pool, self.n_total) if rotate else pool, n_way, n_shot, n_query)
        return AugmentedSampler(sampler) if image else sampler


def build_task_augment(mode: str, flip: bool, bank: FeatureBank, encoder: nn.Module, images: np.ndarray,
                       pool_rows: np.ndarray, train_block: bool, device: torch.device, precision: str,
                       channels_last: bool = False, batch_size: int = 512) -> TaskAugment | None:
    """None for mode 'none'; else the bank the augmented episodes read (rotations precomputed
    when there is no image augmentation, per-episode computation otherwise)."""
    rotate, image = parse_mode(mode)
    if not (rotate or image):
        return None
    n_total = len(bank.pos)
    if image:
        size = images.shape[1]
        augment = GpuAugment(size, crop_scale=None, flip=flip, color_jitter=0.0, grayscale_p=0.0,
                             translate_px=max(1, size // 8), channels_last=channels_last)
        return TaskAugment(mode, n_total, EpisodeBank(encoder, images, pool_rows, n_total, train_block, augment,
                                                      device, precision))
    return TaskAugment(mode, n_total, rotated_bank(bank, encoder, images, pool_rows, n_total, train_block, device,
                                                   precision, batch_size, channels_last))
