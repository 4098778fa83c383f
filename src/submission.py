"""Submission CSVs: checked against sample_submission.csv, written atomically, with a JSON sidecar;
and the scorer (accuracy, per-class accuracy, confusion matrix)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src import io
from src.config import Config
from src.data.competition import kind_word, label_kind, read_id_label_csv
from src.errors import UserError
from src.runtime import git_commit


def check_submission(frame: pd.DataFrame, sample: pd.DataFrame, classes: np.ndarray, where: str) -> None:
    if list(frame.columns) != ["image_id", "label"]:
        raise UserError(f"{where}: columns must be image_id,label, got {','.join(map(str, frame.columns))}")
    dup = frame["image_id"][frame["image_id"].duplicated()]
    if len(dup):
        raise UserError(f"{where}: image_id '{dup.iloc[0]}' appears more than once")
    want, got = set(sample["image_id"]), set(frame["image_id"])
    if want != got:
        missing, extra = sorted(want - got), sorted(got - want)
        raise UserError(f"{where}: ids differ from sample_submission.csv ({len(missing)} missing, e.g. "
                        f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]})")
    bad = ~frame["label"].isin(classes.tolist())
    if bad.any():
        raise UserError(f"{where}: label '{frame['label'][bad].iloc[0]}' is not one of the classes {classes.tolist()}")


def write_submission(cfg: Config, path: Path, test_ids: list[str], labels: np.ndarray, classes: np.ndarray,
                     extra: dict | None = None) -> Path:
    """Write `labels` (original class values: integers or class names, as in train_labels.csv) for
    `test_ids` to `path` and `path`.json, in sample_submission.csv's order."""
    sample = read_id_label_csv(Path(cfg.data.path) / "sample_submission.csv", need_labels=False)
    integer = np.asarray(classes).dtype.kind in "iu"
    values = np.asarray(labels).astype(np.int64) if integer else np.asarray(labels, dtype=object)
    frame = pd.DataFrame({"image_id": test_ids, "label": values})
    frame = frame.set_index("image_id").reindex(sample["image_id"]).reset_index()
    if frame["label"].isna().any():
        raise UserError(f"{path}: predictions missing for {int(frame['label'].isna().sum())} sample ids")
    if integer:
        frame["label"] = frame["label"].astype(np.int64)
    check_submission(frame, sample, classes, str(path))
    counts = frame["label"].value_counts().sort_index()
    sidecar = {"config_hash": cfg.hash(), "commit": git_commit(), "seed": cfg.run.seed, "run": cfg.run.name,
               "predicted_class_counts": {str(k): int(v) for k, v in counts.items()}, **(extra or {})}
    io.write_csv(path, frame)
    io.write_json(path.with_suffix(".json"), sidecar)
    return path


def score(submission: str | Path, truth: str | Path) -> dict:
    """Accuracy over the ids present in the truth file (a public subset is fine). Labels are integers
    or class names; both files must use the same kind."""
    sub = read_id_label_csv(Path(submission))
    tru = read_id_label_csv(Path(truth))
    if len(sub) and len(tru) and label_kind(sub["label"]) != label_kind(tru["label"]):
        raise UserError(f"{submission}: labels are {kind_word(label_kind(sub['label']))} but {truth} has "
                        f"{kind_word(label_kind(tru['label']))}")
    merged = tru.merge(sub, on="image_id", how="left", suffixes=("_true", "_pred"))
    if merged["label_pred"].isna().any():
        n = int(merged["label_pred"].isna().sum())
        raise UserError(f"{submission}: {n} id(s) of {truth} have no prediction")
    y, p = merged["label_true"].to_numpy(), merged["label_pred"].to_numpy()
    classes = np.unique(np.concatenate([y, p]))
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    pos = {c: i for i, c in enumerate(classes)}
    for a, b in zip(y, p):
        cm[pos[a], pos[b]] += 1
    per_class = {c: float(cm[i, i] / max(cm[i].sum(), 1)) for i, c in enumerate(classes.tolist())}
    return {"accuracy": float((y == p).mean()), "n": int(len(y)), "per_class": per_class,
            "classes": classes.tolist(), "confusion": cm.tolist()}


def format_score(result: dict) -> str:
    lines = [f"accuracy {result['accuracy']:.4f} on {result['n']} images", "per-class accuracy:"]
    lines += [f"  {c:>4}: {a:.3f}" for c, a in result["per_class"].items()]
    lines.append("confusion matrix (rows: truth, columns: prediction):")
    head = "      " + " ".join(f"{c:>5}" for c in result["classes"])
    lines.append(head)
    for c, row in zip(result["classes"], result["confusion"]):
        lines.append(f"  {c:>4} " + " ".join(f"{v:>5}" for v in row))
    return "\n".join(lines)
