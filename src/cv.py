"""Local cross-validation you can trust with 30 labels: say how sure the score is.

With 30 labeled images one image is 3.3 accuracy points, so every estimate here comes with its
uncertainty:

* :func:`leave_one_out` — out-of-fold probabilities of every labeled image; :func:`cv_summary`
  turns them into accuracy with a Wilson 95% binomial interval (Wilson 1927), which behaves at
  small n and near 0/1 where the normal approximation does not.
* :func:`support_redraws` — many random n-shot-per-class supports drawn from the labeled images,
  each scored on the held-out rest: mean +- std tells how much the score depends on *which* two
  images per class one happened to get.
* :func:`episodic_estimate` — N-way K-shot episodes (Vinyals et al. 2016) drawn from confident
  pseudo-labels: many more queries, but BIASED by the pseudo-labeler (an episode scores agreement
  with pseudo-labels, not with the truth).

Every driver takes a ``fit_predict(train_rows, test_rows) -> probs (len(test_rows), C)`` callback
whose rows index the set the labels belong to; the driver never passes a held-out row in
``train_rows`` (tests check this with a spy).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion correct/n (95% for z=1.96). n=0 -> (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cv_summary(oof: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of out-of-fold probabilities (n, C) against labels (n,) with its Wilson interval."""
    labels = np.asarray(labels)
    correct = int((np.asarray(oof).argmax(1) == labels).sum())
    n = int(len(labels))
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n,
            "interval": [lo, hi]}


def leave_one_out(fit_predict: FitPredict, labels: np.ndarray, held: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probabilities (n, C): row i is predicted by a model fit on every row but i. With
    `held` (positions), only those rows are predicted; the others stay 0."""
    n = len(labels)
    rows = np.arange(n)
    out = None
    for i in rows if held is None else np.asarray(held, np.int64):
        probs = np.asarray(fit_predict(rows[rows != i], rows[i:i + 1]), dtype=np.float32)
        if out is None:
            out = np.zeros((n, probs.shape[1]), np.float32)
        out[i] = probs[0]
    return out if out is not None else np.zeros((0, 0), np.float32)


def label_folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """(n,) fold of each labeled row for cross-fitting: the i-th row of each class goes to fold
    i mod `folds`, so with at least `folds` rows per class every fold holds out one row of each class
    and leaves every class labeled."""
    labels = np.asarray(labels)
    out = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out[rows] = np.arange(len(rows)) % folds
    return out


def support_redraws(fit_predict: FitPredict, labels: np.ndarray, shots=(1, 2), n_draws: int = 200,
                    seed: int = 0, keep: dict | None = None) -> dict:
    """Accuracy over `n_draws` random n_shot-per-class supports, scored on the held-out rest.

    Returns {"<k>-shot": {"mean", "std", "n_draws", "n_query"}} (n_query: held-out rows per draw).
    A shot count that leaves a class without a held-out image is skipped (reported as skipped).
    The draws depend only on (labels, shots, n_draws, seed), so every head of a run gets the same
    ones; with `keep` (a dict) the per-draw arrays are stored in it as keep["<k>-shot"] =
    {"support" (D, k*C), "query" (D, Q), "probs" (D, Q, C)}, for ensembles to be scored per draw.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    out = {}
    for k in shots:
        key = f"{k}-shot"
        if min(len(r) for r in by_class) <= k:
            out[key] = {"skipped": f"a class has <= {k} labeled images"}
            continue
        accs, draws = [], {"support": [], "query": [], "probs": []}
        for _ in range(n_draws):
            support = np.concatenate([rng.choice(r, k, replace=False) for r in by_class])
            query = np.setdiff1d(np.arange(len(labels)), support)
            probs = np.asarray(fit_predict(support, query))
            accs.append(float((probs.argmax(1) == labels[query]).mean()))
            for name, value in (("support", support), ("query", query), ("probs", probs)):
                draws[name].append(value)
        if keep is not None:
            keep[key] = {name: np.stack(v) for name, v in draws.items()}
        out[key] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n_draws": n_draws,
                    "n_query": int(len(labels) - k * len(classes))}
    return out


def episodic_estimate(fit_predict: FitPredict, labels: np.ndarray, n_way: int = 10, n_shot: int = 2,
                      n_query: int = 15, episodes: int = 600, seed: int = 0) -> dict:
    """N-way K-shot episodes on a pool of (pseudo-)labeled rows: mean accuracy with a 95% interval
    (mean +- 1.96 std / sqrt(episodes)). Predictions are restricted to the episode's classes.

    BIASED: with pseudo-labels as `labels` this scores agreement with the pseudo-labeler.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= n_shot + n_query]
    if len(eligible) < n_way or episodes <= 0:
        return {"skipped": f"{len(eligible)} classes have >= {n_shot + n_query} pool images; need {n_way}"}
    by_class = {c: np.flatnonzero(labels == c) for c in eligible}
    accs = []
    for _ in range(episodes):
        way = rng.choice(eligible, n_way, replace=False)
        picks = [rng.choice(by_class[c], n_shot + n_query, replace=False) for c in way]
        support = np.concatenate([p[:n_shot] for p in picks])
        query = np.concatenate([p[n_shot:] for p in picks])
        probs = np.asarray(fit_predict(support, query))[:, way]  # only the episode's classes compete
        accs.append(float((way[probs.argmax(1)] == labels[query]).mean()))
    mean, std = float(np.mean(accs)), float(np.std(accs))
    half = 1.96 * std / math.sqrt(len(accs))
    return {"mean": mean, "std": std, "interval": [mean - half, mean + half], "episodes": len(accs),
            "n_way": n_way, "n_shot": n_shot, "n_query": n_query,
            "note": "biased: scored against pseudo-labels, not truth"}


# ------------------------------------------------------------------------------------------------
# Public truth (scoring only) and the CV table
# ------------------------------------------------------------------------------------------------
def public_truth(truth_file: str, test_ids: list[str], classes: np.ndarray) -> np.ndarray | None:
    """Class ids (n_test,) of the test images from a truth CSV (image_id,label), -1 where the file
    has no row (a public subset). None when no file is configured. SCORING ONLY: never train,
    threshold or select on it."""
    if not truth_file:
        return None
    from pathlib import Path

    from src.data.competition import read_id_label_csv
    from src.data.dataset import encode_labels
    from src.errors import UserError

    frame = read_id_label_csv(Path(truth_file))
    truth = dict(zip(frame["image_id"], encode_labels(frame["label"].tolist(), classes, truth_file)))
    out = np.array([truth.get(i, -1) for i in test_ids], dtype=np.int64)
    if (out < 0).all():
        raise UserError(f"{truth_file}: no image_id matches a test image")
    return out


def truth_accuracy(probs: np.ndarray, truth: np.ndarray | None) -> float | None:
    """Accuracy of argmax(probs) over the test rows the truth file covers (None without truth)."""
    if truth is None:
        return None
    known = truth >= 0
    return float((np.asarray(probs)[known].argmax(1) == truth[known]).mean())


def format_interval(value: float, interval) -> str:
    """'0.900 [0.74, 0.97]': an accuracy (or its estimate) with its 95 % interval."""
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _fmt_acc(summary: dict | None) -> str:
    if not summary or "accuracy" not in summary:
        return "-"
    return format_interval(summary["accuracy"], summary["interval"])


def _fmt_mean(entry: dict | None) -> str:
    if not entry or "mean" not in entry:
        return "-"
    return f"{entry['mean']:.3f}±{entry['std']:.3f}"


def format_cv_table(rows: dict[str, dict], truth_name: str = "", estimator: str = "") -> str:
    """rows: name -> {"loo": cv_summary, "loo_labeled_only": cv_summary|None, "redraws": {...},
    "episodic": {...}, "estimates": {estimator: {"estimate", "interval"}}, "test_accuracy": float|None}.
    One line per head: the `estimator`'s accuracy estimate [95%] (src/estimate.py) where the rows
    have it, LOO accuracy [Wilson 95%] (and without pseudo-labels when a head uses them), redraw
    mean±std per shot, the (biased) episodic estimate, and the public-truth accuracy beside them
    when a truth file is configured."""
    shots = sorted({k for r in rows.values() for k in (r.get("redraws") or {})}, key=lambda s: int(s.split("-")[0]))
    plain = any(r.get("loo_labeled_only") for r in rows.values())
    est = bool(estimator) and any(estimator in (r.get("estimates") or {}) for r in rows.values())
    header = ["head", *([f"estimate ({estimator})"] if est else []), "LOO acc [95% CI]",
              *(["LOO labeled-only**"] if plain else []),
              *[f"redraw {s}" for s in shots], "episodic* (biased)"]
    if truth_name:
        header.append("test acc (truth)")
    table = [header]
    for name, r in rows.items():
        e = (r.get("estimates") or {}).get(estimator)
        line = [name, *([format_interval(e["estimate"], e["interval"]) if e else "-"] if est else []),
                _fmt_acc(r.get("loo")), *([_fmt_acc(r.get("loo_labeled_only"))] if plain else []),
                *[_fmt_mean((r.get("redraws") or {}).get(s)) for s in shots], _fmt_mean(r.get("episodic"))]
        if truth_name:
            acc = r.get("test_accuracy")
            line.append("-" if acc is None else f"{acc:.4f}")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("* episodic: N-way K-shot episodes scored against pseudo-labels, not truth"
                 + (f"; truth: {truth_name} (scoring only)" if truth_name else ""))
    if plain:
        lines.append("** heads with pseudo-labeled support: the same head on the labeled images only. Pseudo-labels "
                     "were made with every label, so LOO with them is optimistic when they are poor")
    return "\n".join(lines)
