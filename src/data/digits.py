"""Embedded demo competition built from scikit-learn's bundled handwritten digits.

1,797 images of 8x8 pixels (values 0..16), upscaled to 32x32 RGB and written as PNG in the same
layout as the real competition: 2 labeled training images and 1 validation image per class,
`n_test` test images (stratified), the rest unlabeled training images. The test labels go to a
truth file outside the competition folder, used for scoring only. Needs no network.

With ``names=True`` (``data.builder: digits_names``) the CSVs look like a typical Kaggle
competition instead: labels are class names ("zero" ... "nine") and ids are listed with their file
extension (``train_00042.png``), in the label files, the sample submission and the truth file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from src import io


NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def build_digits(folder: str | Path, truth_path: str | Path, n_test: int = 500, seed: int = 0,
                 size: int = 32, names: bool = False) -> Path:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    folder, truth_path = Path(folder), Path(truth_path)
    digits = load_digits()
    x = (digits.images / 16.0 * 255.0).astype(np.float32)  # (1797, 8, 8)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    rest, test = train_test_split(np.arange(len(y)), test_size=n_test, stratify=y, random_state=seed)
    labeled, val = [], []
    for c in np.unique(y):
        members = rng.permutation(rest[y[rest] == c])
        labeled += members[:2].tolist()
        val.append(int(members[2]))
    unlabeled = np.setdiff1d(rest, np.array(labeled + val))
    train = rng.permutation(np.concatenate([labeled, unlabeled]))
    test = rng.permutation(test)

    tmp = folder.with_name(f".{folder.name}.building")
    if tmp.exists():
        shutil.rmtree(tmp)
    for split in ("train", "val", "test"):
        (tmp / split).mkdir(parents=True)

    def write(split: str, image_id: str, k: int) -> None:
        img = cv2.resize(x[k], (size, size), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img, 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp / split / f"{image_id}.png"), np.repeat(img[:, :, None], 3, axis=2))

    ext = ".png" if names else ""  # how the CSVs list ids

    def label(k: int):
        return NAMES[int(y[k])] if names else int(y[k])

    labeled_set = set(labeled)
    train_rows, val_rows, test_rows = [], [], []
    for n, k in enumerate(train):
        write("train", f"train_{n:05d}", int(k))
        if int(k) in labeled_set:
            train_rows.append((f"train_{n:05d}{ext}", label(k)))
    for n, k in enumerate(rng.permutation(val)):
        write("val", f"val_{n}", int(k))
        val_rows.append((f"val_{n}{ext}", label(k)))
    for n, k in enumerate(test):
        write("test", f"test_{n:05d}", int(k))
        test_rows.append((f"test_{n:05d}{ext}", label(k)))
    cols = ["image_id", "label"]
    pd.DataFrame(train_rows, columns=cols).to_csv(tmp / "train_labels.csv", index=False)
    pd.DataFrame(val_rows, columns=cols).to_csv(tmp / "val_labels.csv", index=False)
    pd.DataFrame([(i, NAMES[0] if names else 0) for i, _ in test_rows], columns=cols).to_csv(tmp / "sample_submission.csv", index=False)
    io.write_csv(truth_path, pd.DataFrame(test_rows, columns=cols))
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    print(f"built digits demo competition in {folder} ({len(train)} train, {len(val)} val, {len(test)} test); "
          f"truth in {truth_path}")
    return folder
