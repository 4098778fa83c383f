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
from src.data import near_duplicates
from src.data.competition import (LABEL_FILES, DecodeStats, content_hash, decode_image, extract_archive,
                                  kind_word, label_kind, list_images, parse_label, read_id_label_csv,
                                  read_label_table, resolve_ids)
from src.errors import UserError
from src.paths import RunPaths


def _builder_truth(cfg: Config, folder: Path) -> Path:
    return Path(cfg.data.truth) if cfg.data.truth else folder.with_name(folder.name + "_truth.csv")


def _check_builder_kind(builder: str, folder: Path, truth: Path) -> None:
    """A builder writes only into a missing data.path, so an existing folder (or truth file) of the other
    digits builder would silently be used (or overwritten): `data.builder=digits_names` on top of
    configs/demo.yaml after `make demo` would run on integer labels. Stop with one line instead."""
    want = "name" if builder == "digits_names" else "int"
    for path in (folder / "train_labels.csv", truth):
        if path.is_file():
            kind = label_kind(read_label_table(path)["label"])
            if kind != want:
                raise UserError(f"{path}: holds {kind_word(kind)} as labels, but data.builder={builder} builds "
                                f"{kind_word(want)} (only into a missing folder); set data.path and data.truth "
                                f"to new paths, e.g. data.path=input/{builder} data.truth=input/{builder}_truth.csv")


def ensure_competition_folder(cfg: Config) -> Path:
    """Return the competition folder, extracting `data.archive` or building `data.builder` if needed."""
    folder = Path(cfg.data.path)
    if folder.suffix.lower() in (".xz", ".gz", ".zip", ".tgz", ".tar") and folder.is_file():
        raise UserError(f"{folder}: data.path must be a folder; put the archive in data.archive")
    if cfg.data.builder in ("digits", "digits_names"):
        _check_builder_kind(cfg.data.builder, folder, _builder_truth(cfg, folder))
    if folder.is_dir():
        return folder
    if cfg.data.archive:
        print(f"extracting {cfg.data.archive} -> {folder}")
        return extract_archive(cfg.data.archive, folder)
    if cfg.data.builder in ("digits", "digits_names"):
        from src.data.digits import build_digits

        return build_digits(folder, _builder_truth(cfg, folder), n_test=cfg.data.demo_test_size, seed=0,
                            names=cfg.data.builder == "digits_names")
    if cfg.data.builder:
        raise UserError(f"data.builder: unknown builder '{cfg.data.builder}' (known: digits, digits_names)")
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
    listed = {split: resolve_ids(folder / LABEL_FILES[split], frame["image_id"], files[split], folder / split)
              for split, frame in labels.items()}
    test_files = resolve_ids(folder / "sample_submission.csv", sample["image_id"], files["test"], folder / "test")
    classes, notes = check_classes(folder, labels, sample)

    # Row order: train (sorted files), val (sorted files), test (sample_submission order). Listed
    # images keep the id their CSV gives; unlisted train images use the same style (with or without
    # the extension) as the labeled ones.
    class_id = {c: i for i, c in enumerate(classes)}
    rows = []
    for split in ("train", "val"):
        frame = labels[split]
        lab = {f: class_id[c] for f, c in zip(listed[split], frame["label"])}
        id_of = dict(zip(listed[split], frame["image_id"]))
        with_ext = any(i != f.stem for f, i in id_of.items())
        for stem in sorted(files[split]):
            f = files[split][stem]
            rows.append((id_of.get(f, f.name if with_ext else stem), split, lab.get(f, -1), f))
    rows += [(i, "test", -1, f) for i, f in zip(sample["image_id"], test_files)]
    unlisted_test = len(files["test"]) - len(sample)
    rows, dropped = limit_unlabeled(rows, cfg.data.unlabeled_limit)

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
    near = None
    if cfg.dedup.hash:  # perceptual hashes of the decoded images: no encoder exists yet
        pairs, near = near_duplicates.find(images, index, cfg.dedup.hash_distance, cfg.dedup.neighbors)
    io.write_npy(paths.images, images)
    io.write_csv(paths.index, index)
    io.write_json(paths.classes, {"classes": classes, "kind": label_kind(labels["train"]["label"])})
    if near is not None:
        io.write_csv(paths.near_duplicate_pairs("prepare"), near_duplicates.pair_table(pairs, index))
        io.write_json(paths.near_duplicates("prepare"), near)

    counts = index.groupby("split").size().to_dict()
    report = {
        "folder": str(folder),
        "counts": {s: int(counts.get(s, 0)) for s in ("train", "val", "test")},
        "classes": classes,
        "labeled_per_class": {str(classes[k]): int(v) for k, v in
                              index[index["label"] >= 0].groupby("label").size().items()},
        "unlabeled_train": int(((index["split"] == "train") & (index["label"] < 0)).sum()),
        "unlabeled_left_out": dropped,
        "modes": dict(stats.modes), "sizes": dict(stats.sizes), "converted": stats.converted,
        "corrupt": len(stats.corrupt), "corrupt_files": stats.corrupt[:50], "unlisted_test_images": unlisted_test,
        "duplicates": duplicates, "notes": notes,
        "near_duplicates": None if near is None else {k: v for k, v in near.items() if k != "largest_groups"},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    io.write_json(paths.data_report, report)
    print_report(report)
    return {k: report[k] for k in ("counts", "corrupt", "converted", "seconds")} | {
        "duplicate_groups": duplicates["groups"], "near_duplicate_pairs": None if near is None else near["pairs"]}


def limit_unlabeled(rows: list[tuple], limit: int, seed: int = 0) -> tuple[list[tuple], int]:
    """Keep at most `limit` unlabeled train rows (a fixed random sample, file order kept; 0: none);
    labeled, validation and test rows always stay. limit -1: all. Returns (rows, number left out)."""
    unlabeled = [r for r, (_, split, label, _) in enumerate(rows) if split == "train" and label < 0]
    if limit < 0 or len(unlabeled) <= limit:
        return rows, 0
    drop = set(np.random.default_rng(seed).choice(unlabeled, len(unlabeled) - limit, replace=False).tolist())
    return [row for r, row in enumerate(rows) if r not in drop], len(drop)


def check_classes(folder: Path, labels: dict[str, pd.DataFrame], sample: pd.DataFrame) -> tuple[list, list[str]]:
    """The sorted class set of train_labels.csv (ints or names); validation labels must be of the
    same kind and among them. Returns (classes, notes): a note when sample_submission.csv's label
    placeholders are of the other kind (the submission writes the classes' own labels)."""
    train, val = labels["train"]["label"], labels["val"]["label"]
    if train.empty:
        raise UserError(f"{folder / 'train_labels.csv'}: no labeled images")
    kind = label_kind(train)
    if not val.empty and label_kind(val) != kind:
        raise UserError(f"{folder / 'val_labels.csv'}: labels are {kind_word(label_kind(val))} but train_labels.csv "
                        f"has {kind_word(kind)} (e.g. '{val.iloc[0]}' vs '{train.iloc[0]}')")
    classes = sorted(set(train.tolist()))
    bad = labels["val"].loc[~val.isin(classes)]
    if len(bad):
        raise UserError(f"{folder / 'val_labels.csv'}: label {bad['label'].iloc[0]} of '{bad['image_id'].iloc[0]}' "
                        f"is not one of the classes present in train_labels.csv ({classes})")
    notes = []
    placeholders = [parse_label(t) for t in sample["label"] if str(t).strip()]
    kinds = {"int" if isinstance(v, int) else "name" for v in placeholders}
    if len(kinds) == 1 and kinds != {kind}:  # informative (one kind) and not the classes' kind
        notes.append(f"sample_submission.csv labels are {kind_word(kinds.pop())} but the classes are "
                     f"{kind_word(kind)}; the submission writes the classes ({classes[:3]}...)")
    return [c if isinstance(c, str) else int(c) for c in classes], notes


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
    left_out = f"; {report['unlabeled_left_out']} more left out by data.unlabeled_limit" if report.get("unlabeled_left_out") else ""
    print(f"data: train {c['train']} (unlabeled {report['unlabeled_train']}{left_out}), val {c['val']}, test {c['test']}")
    kind = "integer" if all(isinstance(c, int) for c in report["classes"]) else "named"
    print(f"{len(report['classes'])} {kind} classes; labeled per class: {report['labeled_per_class']}")
    print(f"modes {report['modes']}  sizes {report['sizes']}  converted {report['converted']}  "
          f"corrupt {report['corrupt']}  unlisted test images {report['unlisted_test_images']}")
    d = report["duplicates"]
    print(f"exact duplicates: {d['groups']} groups ({d['images']} images); within split {d['within_split']}; "
          f"across splits {d['across_splits']}; label conflicts {d['label_conflicts']}")
    if report["near_duplicates"] is not None:
        print(near_duplicates.format_summary(report["near_duplicates"]))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"prepared in {report['seconds']:.1f}s")
