"""The prepared data every later stage reads: a uint8 image cache, an index table and the classes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from src import io
from src.data.competition import parse_label
from src.errors import UserError
from src.paths import RunPaths


def class_array(values: list) -> np.ndarray:
    """Class labels as an array: int64 for integer classes, object (str) for class names, so that
    ``classes[ids]`` gives the submission's labels and a longer name is never truncated."""
    return np.array(values, dtype=np.int64 if all(isinstance(v, (int, np.integer)) for v in values) else object)


def encode_labels(values, classes: np.ndarray, where: str) -> np.ndarray:
    """Original labels (ints, names, or their CSV text) -> class ids 0..C-1 (int64). UserError naming
    `where` when a label is not one of `classes` (an unseen name, or names against integer classes)."""
    lookup = {c: i for i, c in enumerate(np.asarray(classes).tolist())}
    ids = np.empty(len(values), dtype=np.int64)
    for n, v in enumerate(values):
        key = parse_label(v) if isinstance(v, str) else int(v)
        if key not in lookup:
            raise UserError(f"{where}: label '{v}' is not one of the classes {list(lookup)}")
        ids[n] = lookup[key]
    return ids


@dataclass
class CompetitionData:
    """images[i] belongs to index.iloc[i]. Splits: train (labeled or not), val, test.

    images: uint8 (N, H, W, 3) RGB, memory-mapped from 00_prepare/images.npy.
    index:  DataFrame with image_id (str), split (str), label (int, -1 when unknown).
    names:  the class labels (sorted ints or sorted names) from 00_prepare/classes.json; then
            index["label"] holds class ids 0..C-1. None (caches written before classes.json, and
            tests): index["label"] holds the integer labels themselves.
    """

    images: np.ndarray
    index: pd.DataFrame
    names: list | None = None

    @cached_property
    def classes(self) -> np.ndarray:
        """Sorted class labels (C,): int64 or str (object). classes[class_id] is the label to submit."""
        if self.names is not None:
            return class_array(self.names)
        labels = self.index["label"].to_numpy(np.int64)
        return np.unique(labels[self.labeled_idx])

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
        """Class id 0..C-1 of every row (-1 unknown): what losses and heads use as targets."""
        labels = self.index["label"].to_numpy(np.int64)
        if self.names is not None:
            return labels
        out = np.full(len(labels), -1, np.int64)
        out[self.labeled_idx] = encode_labels(labels[self.labeled_idx], self.classes, "index.csv")
        return out

    def encode(self, labels, where: str) -> np.ndarray:
        """Original labels (from a labels/truth CSV read with src.data.competition.read_label_table,
        or values of self.classes) -> class ids (int64); UserError naming `where` for an unknown class."""
        return encode_labels(labels, self.classes, where)

    def without_labels(self, rows: np.ndarray) -> "CompetitionData":
        """The same images and classes with the labels of `rows` removed: they join the unlabeled images
        (cross-fitting). Every class must keep a labeled row."""
        index = self.index.copy()
        index.iloc[np.asarray(rows, np.int64), index.columns.get_loc("label")] = -1
        out = CompetitionData(self.images, index, self.names if self.names is not None else list(self.classes))
        if self.names is None:  # keep the integer labels as labels: map the class ids back
            out.index["label"] = np.where(index["label"].to_numpy() >= 0, self.class_ids, -1)
        return out

    @property
    def test_ids(self) -> list[str]:
        return self.index["image_id"].to_numpy()[self.test_idx].tolist()


def load_data(paths: RunPaths, mmap: bool = True) -> CompetitionData:
    if not paths.images.exists() or not paths.index.exists():
        raise UserError(f"{paths.images}: prepared data not found (run pipelines/00_prepare.py first)")
    images = io.read_npy(paths.images, mmap=mmap)
    index = pd.read_csv(paths.index, dtype={"image_id": str, "split": str}, keep_default_na=False)
    if len(index) != len(images):
        raise UserError(f"{paths.index}: {len(index)} rows but {len(images)} images in {paths.images}")
    names = io.read_json(paths.classes)["classes"] if paths.classes.exists() else None
    return CompetitionData(images=images, index=index, names=names)
