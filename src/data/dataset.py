"""The prepared data every later stage reads: a uint8 image cache plus an index table."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from src import io
from src.errors import UserError
from src.paths import RunPaths


@dataclass
class CompetitionData:
    """images[i] belongs to index.iloc[i]. Splits: train (labeled or label -1), val, test.

    images: uint8 (N, H, W, 3) RGB, memory-mapped from 00_prepare/images.npy.
    index:  DataFrame with image_id (str), split (str), label (int, -1 when unknown).
    """

    images: np.ndarray
    index: pd.DataFrame

    @cached_property
    def labels(self) -> np.ndarray:
        return self.index["label"].to_numpy(np.int64)

    @cached_property
    def classes(self) -> np.ndarray:
        """Sorted class labels present among the labeled images (C,)."""
        return np.unique(self.labels[self.labeled_idx])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def labeled_idx(self) -> np.ndarray:
        """Rows with a known label: labeled train images and validation images (30 here)."""
        return np.flatnonzero((self.index["split"].isin(["train", "val"]) & (self.index["label"] >= 0)).to_numpy())

    @cached_property
    def test_idx(self) -> np.ndarray:
        return np.flatnonzero((self.index["split"] == "test").to_numpy())

    @cached_property
    def unlabeled_idx(self) -> np.ndarray:
        """Every image without a label, test images included (transductive use is allowed)."""
        return np.flatnonzero((self.index["label"] < 0).to_numpy())

    @cached_property
    def class_ids(self) -> np.ndarray:
        """labels mapped to 0..C-1 (-1 stays -1): what losses and heads use as targets."""
        lookup = {c: i for i, c in enumerate(self.classes.tolist())}
        return np.array([lookup.get(int(v), -1) for v in self.labels], dtype=np.int64)

    @property
    def test_ids(self) -> list[str]:
        return self.index["image_id"].to_numpy()[self.test_idx].tolist()


def load_data(paths: RunPaths, mmap: bool = True) -> CompetitionData:
    if not paths.images.exists() or not paths.index.exists():
        raise UserError(f"{paths.images}: prepared data not found (run pipelines/00_prepare.py first)")
    images = io.read_npy(paths.images, mmap=mmap)
    index = pd.read_csv(paths.index, dtype={"image_id": str, "split": str})
    if len(index) != len(images):
        raise UserError(f"{paths.index}: {len(index)} rows but {len(images)} images in {paths.images}")
    return CompetitionData(images=images, index=index)
