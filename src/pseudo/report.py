"""Pseudo-label summaries: counts per class and coverage always; with a truth file (cfg.data.truth,
reporting only - never used for training, thresholds or selection) precision of the selected
labels and precision against coverage as a table and a PNG plot.

Precision at coverage q: sort the images that have a truth label by confidence, keep the top q
fraction, and report the fraction of those whose pseudo-label is right.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src import io
from src.data.competition import read_id_label_csv
from src.probe import knn_probe, truth_rows
from src.transductive import compute_prototypes

COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def load_truth(path: str) -> pd.DataFrame | None:
    """image_id,label CSV or None when not configured / not present."""
    if not path or not Path(path).is_file():
        return None
    return read_id_label_csv(Path(path))


def precision_at_coverage(confidence: np.ndarray, correct: np.ndarray,
                          coverages: tuple[float, ...] = COVERAGES) -> pd.DataFrame:
    """(n,) confidences and (n,) bool correctness -> DataFrame(coverage, n, precision)."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    rows = []
    for q in coverages:
        n = max(1, int(round(q * len(order)))) if len(order) else 0
        rows.append((q, n, float(hits[n - 1] / n) if n else float("nan")))
    return pd.DataFrame(rows, columns=["coverage", "n", "precision"])


def summarize(table: pd.DataFrame, classes: np.ndarray, truth: pd.DataFrame | None) -> dict:
    """table: the labels.csv contract (image_id, label, confidence, source, selected)."""
    sel = table["selected"].to_numpy(bool)
    counts = table.loc[sel, "label"].value_counts()
    out = {"n_unlabeled": int(len(table)), "n_selected": int(sel.sum()),
           "coverage": float(sel.mean()) if len(table) else 0.0,
           "selected_per_class": {str(c): int(counts.get(c, 0)) for c in classes},
           "predicted_per_class": {str(c): int(v) for c, v in
                                   table["label"].value_counts().reindex(classes, fill_value=0).items()}}
    if truth is None:
        return out
    merged = table.merge(truth, on="image_id", suffixes=("", "_true"))
    if merged.empty:
        return out
    correct = (merged["label"] == merged["label_true"]).to_numpy()
    msel = merged["selected"].to_numpy(bool)
    curve = precision_at_coverage(merged["confidence"].to_numpy(), correct)
    out["truth"] = {
        "n_truth": int(len(merged)),  # the images the precision is measured on
        "accuracy_all": float(correct.mean()),  # every truth image labeled (100% coverage)
        "selected_coverage": float(msel.mean()),
        "selected_precision": float(correct[msel].mean()) if msel.any() else float("nan"),
        "precision_at_coverage": {f"{r.coverage:.1f}": round(r.precision, 4) for r in curve.itertuples()},
    }
    return out


def summary_table(summaries: dict[int, dict]) -> pd.DataFrame:
    """One row per round: coverage and, with truth, precision of the selection and at fixed coverages."""
    rows = []
    for r, s in sorted(summaries.items()):
        row = {"round": r, "selected": s["n_selected"], "coverage": round(s["coverage"], 4)}
        if "truth" in s:
            t = s["truth"]
            row |= {"n_truth": t["n_truth"], "selected_precision": round(t["selected_precision"], 4),
                    "selected_coverage_truth": round(t["selected_coverage"], 4),
                    "accuracy_all": round(t["accuracy_all"], 4)}
            row |= {f"prec@{k}": v for k, v in t["precision_at_coverage"].items()}
        rows.append(row)
    return pd.DataFrame(rows)


def plot_precision_coverage(summaries: dict[int, dict], path: Path) -> Path | None:
    """Precision-vs-coverage curves, one per round (needs truth)."""
    curves = {r: s["truth"]["precision_at_coverage"] for r, s in summaries.items() if "truth" in s}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for r, curve in sorted(curves.items()):
        ax.plot([float(k) for k in curve], list(curve.values()), marker="o", label=f"round {r}")
        s = summaries[r]["truth"]
        ax.scatter([s["selected_coverage"]], [s["selected_precision"]], marker="x", color="k")
    ax.set_xlabel("coverage (fraction of truth images, most confident first)")
    ax.set_ylabel("pseudo-label precision")
    ax.set_title("pseudo-labels vs truth (x: selected set)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def format_summary(r: int, s: dict) -> str:
    line = (f"round {r}: selected {s['n_selected']}/{s['n_unlabeled']} (coverage {s['coverage']:.3f}); "
            f"per class {s['selected_per_class']}")
    if "truth" in s:
        t = s["truth"]
        pac = t["precision_at_coverage"]
        line += (f"\n  truth ({t['n_truth']} images): selected precision {t['selected_precision']:.4f} at "
                 f"coverage {t['selected_coverage']:.3f}; accuracy at 100% {t['accuracy_all']:.4f}; "
                 f"precision@0.8 {pac.get('0.8', float('nan')):.4f}")
    return line


def embedding_scores(data, emb: np.ndarray, truth: str = "", seed: int = 0) -> dict:
    """Quality of the embeddings themselves: kNN leave-one-out on the labeled images (a local CV
    score, optimistic after self-training on those images), and with truth the ProtoNet accuracy
    (labeled prototypes only) and 5-fold kNN on the truth images (reporting only)."""
    out = knn_probe(lambda rows: emb[rows], data, truth, k=20, seed=seed)
    if truth:
        rows, labels = truth_rows(data, truth)
        protos = compute_prototypes(emb[data.labeled_idx], data.class_ids[data.labeled_idx], data.n_classes)
        out["protonet_truth"] = float(((emb[rows] @ protos.T).argmax(1) == labels).mean())  # class ids
    return {k: round(v, 4) for k, v in out.items()}
