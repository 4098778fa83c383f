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


def digits_layout(n_test: int = 500, seed: int = 0, names: bool = False) -> pd.DataFrame:
    """Where every digits image goes: DataFrame(image_id, split, source (row of load_digits), label,
    labeled) in file order. Deterministic in (n_test, seed): :func:`build_digits` writes exactly this
    layout, and :func:`digits_labels` reads every image's label back from it (the competition folder
    publishes only the 30 labeled ones; the truth file only the test ones). names: ids as the CSVs
    list them (with ".png") and labels as class names, as ``data.builder: digits_names`` writes them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target.astype(np.int64)
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
    val = rng.permutation(val)
    labeled_set = set(labeled)
    rows = [(f"train_{n:05d}", "train", int(k), int(k) in labeled_set) for n, k in enumerate(train)]
    rows += [(f"val_{n}", "val", int(k), True) for n, k in enumerate(val)]
    rows += [(f"test_{n:05d}", "test", int(k), False) for n, k in enumerate(test)]
    frame = pd.DataFrame(rows, columns=["image_id", "split", "source", "labeled"])
    label = y[frame["source"].to_numpy()]
    frame.insert(3, "label", [NAMES[v] for v in label] if names else label)
    frame.insert(1, "listed_id", frame["image_id"] + (".png" if names else ""))  # as the CSVs list it
    return frame


def digits_labels(n_test: int = 500, seed: int = 0, names: bool = False) -> pd.DataFrame:
    """image_id,label of EVERY image of the digits competition built with (n_test, seed, names): what
    the builder knows. For evaluations that draw new supports (src/selection.py); never read by a run."""
    return digits_layout(n_test, seed, names)[["listed_id", "label"]].rename(columns={"listed_id": "image_id"})


def build_digits(folder: str | Path, truth_path: str | Path, n_test: int = 500, seed: int = 0,
                 size: int = 32, names: bool = False) -> Path:
    from sklearn.datasets import load_digits

    folder, truth_path = Path(folder), Path(truth_path)
    x = (load_digits().images / 16.0 * 255.0).astype(np.float32)  # (1797, 8, 8)
    layout = digits_layout(n_test, seed, names)

    tmp = folder.with_name(f".{folder.name}.building")
    if tmp.exists():
        shutil.rmtree(tmp)
    for split in ("train", "val", "test"):
        (tmp / split).mkdir(parents=True)

    for image_id, split, k in layout[["image_id", "split", "source"]].itertuples(index=False):
        img = cv2.resize(x[k], (size, size), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img, 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp / split / f"{image_id}.png"), np.repeat(img[:, :, None], 3, axis=2))

    cols = ["listed_id", "label"]  # written as image_id,label
    out = layout[cols].rename(columns={"listed_id": "image_id"})
    by_split = {split: out.loc[layout["split"] == split] for split in ("train", "val", "test")}
    by_split["train"].loc[layout.loc[layout["split"] == "train", "labeled"]].to_csv(tmp / "train_labels.csv", index=False)
    by_split["val"].to_csv(tmp / "val_labels.csv", index=False)
    by_split["test"][["image_id"]].assign(label=NAMES[0] if names else 0).to_csv(tmp / "sample_submission.csv", index=False)
    io.write_csv(truth_path, by_split["test"].reset_index(drop=True))
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    print(f"built digits demo competition in {folder} ({len(by_split['train'])} train, {len(by_split['val'])} val, "
          f"{len(by_split['test'])} test); truth in {truth_path}")
    return folder
