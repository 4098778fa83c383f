"""Stage 00 logic: validate a competition folder, decode every image once, write the cache."""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from src import io
from src.config import Config
from src.data.competition import (LABEL_FILES, DecodeStats, content_hash, decode_image, extract_archive,
                                  list_images, read_id_label_csv)
from src.errors import UserError
from src.paths import RunPaths


def ensure_competition_folder(cfg: Config) -> Path:
    """Return the competition folder, extracting `data.archive` or building `data.builder` if needed."""
    folder = Path(cfg.data.path)
    if folder.suffix.lower() in (".xz", ".gz", ".zip", ".tgz", ".tar") and folder.is_file():
        raise UserError(f"{folder}: data.path must be a folder; put the archive in data.archive")
    if folder.is_dir():
        return folder
    if cfg.data.archive:
        print(f"extracting {cfg.data.archive} -> {folder}")
        return extract_archive(cfg.data.archive, folder)
    if cfg.data.builder == "digits":
        from src.data.digits import build_digits

        truth = Path(cfg.data.truth) if cfg.data.truth else folder.with_name(folder.name + "_truth.csv")
        return build_digits(folder, truth, n_test=cfg.data.demo_test_size, seed=0)
    if cfg.data.builder:
        raise UserError(f"data.builder: unknown builder '{cfg.data.builder}' (known: digits)")
    raise UserError(f"{folder}: competition folder not found (set data.path, data.archive or data.builder)")


def prepare(cfg: Config, paths: RunPaths) -> dict:
    t0 = time.perf_counter()
    folder = ensure_competition_folder(cfg)
    size = cfg.data.image_size
    files = {split: list_images(folder / split) for split in ("train", "val", "test")}
    labels = {split: read_id_label_csv(folder / name) for split, name in LABEL_FILES.items()}
    sample = read_id_label_csv(folder / "sample_submission.csv", need_labels=False)
    if not files["test"]:
        raise UserError(f"{folder / 'test'}: no test images")
    if sample.empty:
        raise UserError(f"{folder / 'sample_submission.csv'}: no rows")
    for split, frame in labels.items():
        missing = frame.loc[~frame["image_id"].isin(files[split].keys()), "image_id"]
        if len(missing):
            raise UserError(f"{folder / LABEL_FILES[split]}: image_id '{missing.iloc[0]}' has no image in "
                            f"{folder / split} ({len(missing)} missing)")
    missing = sample.loc[~sample["image_id"].isin(files["test"].keys()), "image_id"]
    if len(missing):
        raise UserError(f"{folder / 'sample_submission.csv'}: image_id '{missing.iloc[0]}' has no image in "
                        f"{folder / 'test'} ({len(missing)} missing)")
    classes = set(labels["train"]["label"].tolist())
    if not classes:
        raise UserError(f"{folder / 'train_labels.csv'}: no labeled images")
    bad = labels["val"].loc[~labels["val"]["label"].isin(classes)]
    if len(bad):
        raise UserError(f"{folder / 'val_labels.csv'}: label {bad['label'].iloc[0]} of '{bad['image_id'].iloc[0]}' "
                        f"is not one of the classes present in train_labels.csv ({sorted(classes)})")

    # Row order: train (sorted ids), val (sorted ids), test (sample_submission order).
    rows = []
    for split in ("train", "val"):
        lab = dict(zip(labels[split]["image_id"], labels[split]["label"]))
        rows += [(i, split, int(lab.get(i, -1)), files[split][i]) for i in sorted(files[split])]
    rows += [(i, "test", -1, files["test"][i]) for i in sample["image_id"]]
    unlisted_test = len(files["test"]) - len(sample)

    stats = DecodeStats()
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    keep = np.ones(len(rows), dtype=bool)
    hashes: list[str] = [""] * len(rows)
    for r, (image_id, split, _, path) in enumerate(tqdm(rows, desc="decode", unit="img", mininterval=2,
                                                        disable=not cfg.run.progress)):
        img = decode_image(path, size, stats)
        if img is None:
            if not cfg.data.skip_corrupt:
                raise UserError(f"{path}: cannot decode image (use data.skip_corrupt=true to skip and count)")
            stats.corrupt.append(str(path))
            if split == "test":  # its id must stay in the submission: predict it from a gray image
                img = np.full((size, size, 3), 128, np.uint8)
            else:
                keep[r] = False
                continue
        images[r] = img
        hashes[r] = content_hash(img)

    index = pd.DataFrame([(i, s, lab) for i, s, lab, _ in rows], columns=["image_id", "split", "label"])
    images, index = images[keep], index[keep].reset_index(drop=True)
    hashes = [h for h, k in zip(hashes, keep) if k]
    duplicates = find_duplicates(index, hashes)
    io.write_npy(paths.images, images)
    io.write_csv(paths.index, index)

    counts = index.groupby("split").size().to_dict()
    report = {
        "folder": str(folder),
        "counts": {s: int(counts.get(s, 0)) for s in ("train", "val", "test")},
        "labeled_per_class": {str(k): int(v) for k, v in index[index["label"] >= 0].groupby("label").size().items()},
        "unlabeled_train": int(((index["split"] == "train") & (index["label"] < 0)).sum()),
        "modes": dict(stats.modes), "sizes": dict(stats.sizes), "converted": stats.converted,
        "corrupt": len(stats.corrupt), "corrupt_files": stats.corrupt[:50], "unlisted_test_images": unlisted_test,
        "duplicates": duplicates, "seconds": round(time.perf_counter() - t0, 2),
    }
    io.write_json(paths.data_report, report)
    print_report(report)
    return {k: report[k] for k in ("counts", "corrupt", "converted", "seconds")} | {
        "duplicate_groups": duplicates["groups"]}


def find_duplicates(index: pd.DataFrame, hashes: list[str]) -> dict:
    """Exact duplicates by decoded-pixel hash, within and across splits, and label conflicts."""
    groups: dict[str, list[int]] = defaultdict(list)
    for row, h in enumerate(hashes):
        groups[h].append(row)
    dup = [rows for rows in groups.values() if len(rows) > 1]
    within: dict[str, int] = defaultdict(int)
    across: dict[str, int] = defaultdict(int)
    conflicts = 0
    examples = []
    for rows in dup:
        splits = sorted(set(index["split"].iloc[rows]))
        key = "+".join(splits)
        (within if len(splits) == 1 else across)[key] += 1
        known = set(index["label"].iloc[rows]) - {-1}
        conflicts += len(known) > 1
        if len(examples) < 20:
            examples.append(index["image_id"].iloc[rows].tolist())
    return {"groups": len(dup), "images": int(sum(len(r) for r in dup)), "within_split": dict(within),
            "across_splits": dict(across), "label_conflicts": conflicts, "examples": examples}


def print_report(report: dict) -> None:
    c = report["counts"]
    print(f"data: train {c['train']} (unlabeled {report['unlabeled_train']}), val {c['val']}, test {c['test']}")
    print(f"labeled per class: {report['labeled_per_class']}")
    print(f"modes {report['modes']}  sizes {report['sizes']}  converted {report['converted']}  "
          f"corrupt {report['corrupt']}  unlisted test images {report['unlisted_test_images']}")
    d = report["duplicates"]
    print(f"exact duplicates: {d['groups']} groups ({d['images']} images); within split {d['within_split']}; "
          f"across splits {d['across_splits']}; label conflicts {d['label_conflicts']}")
    print(f"prepared in {report['seconds']:.1f}s")
