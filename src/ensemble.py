"""Ensembling the heads: mean, CV-weighted mean, rank mean, and a LightGBM stacker, plus the
leak check that keeps the stacker's local CV honest.

Members are arrays of class probabilities with the same row order. Weights are always chosen on
out-of-fold (local CV) probabilities of labeled rows, never on truth, and their own CV score is
nested (the weights that score row i were chosen without row i).

Stacking (Wolpert 1992): the LightGBM stacker trains on the heads' out-of-fold probabilities of
labeled + pseudo-labeled rows. Rows carry a *group* (a pseudo-labeled image joins the group of the
labeled image nearest to it, i.e. the label it most likely inherited); folds are group folds, so a
row's features never come from a head that saw its label or its group's label, and the stacker's
own CV reuses the same folds.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.model_selection import GroupKFold

from src.errors import UserError

EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Simple combiners. probs: list of (n, C) arrays.
# ------------------------------------------------------------------------------------------------
def mean_probs(probs: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    w = np.ones(len(probs)) if weights is None else np.asarray(weights, np.float64)
    out = sum(wi * np.asarray(p, np.float64) for wi, p in zip(w, probs)) / max(w.sum(), EPS)
    return out.astype(np.float32)


def rank_average(probs: list[np.ndarray]) -> np.ndarray:
    """Average of per-class ranks across rows (each column ranked over the rows, scaled to 0..1),
    renormalised per row. Insensitive to the members' calibration; needs many rows to be fine."""
    ranks = [np.stack([(rankdata(p[:, c]) - 1) / max(len(p) - 1, 1) for c in range(p.shape[1])], 1)
             for p in probs]
    r = np.mean(ranks, axis=0) + EPS
    return (r / r.sum(1, keepdims=True)).astype(np.float32)


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0)).mean())


def greedy_weights(oof: list[np.ndarray], y: np.ndarray, rounds: int = 20) -> np.ndarray:
    """Ensemble selection with replacement (Caruana et al. 2004): start from the best member and
    repeatedly add the member that most lowers the log-loss of the averaged out-of-fold
    probabilities. Returns weights (M,) summing to 1 (selection counts / rounds)."""
    m = len(oof)
    counts = np.zeros(m)
    total = np.zeros_like(oof[0], dtype=np.float64)
    for _ in range(max(rounds, 1)):
        losses = [log_loss((total + p) / (counts.sum() + 1), y) for p in oof]
        best = int(np.argmin(losses))  # ties -> lowest index: deterministic
        counts[best] += 1
        total += oof[best]
    return counts / counts.sum()


def nested_weighted_oof(oof: list[np.ndarray], y: np.ndarray, rounds: int = 20) -> np.ndarray:
    """Honest CV of the weighted ensemble: row i is combined with weights chosen on the other rows."""
    out = np.zeros_like(oof[0], dtype=np.float32)
    rows = np.arange(len(y))
    for i in rows:
        keep = rows != i
        w = greedy_weights([p[keep] for p in oof], y[keep], rounds)
        out[i] = mean_probs([p[i:i + 1] for p in oof], w)[0]
    return out


# ------------------------------------------------------------------------------------------------
# Group folds, out-of-fold driver and the leak check
# ------------------------------------------------------------------------------------------------
def group_folds(groups: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold id (R,) per row; every group lies in exactly one fold."""
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise UserError(f"cv.stack_folds: need at least 2 groups (labeled images) to make folds, got {n_groups}")
    k = min(n_folds, n_groups)
    folds = np.empty(len(groups), np.int64)
    for f, (_, test) in enumerate(GroupKFold(n_splits=k, shuffle=True, random_state=seed).split(groups, groups=groups)):
        folds[test] = f
    return folds


def check_folds(groups: np.ndarray, folds: np.ndarray) -> None:
    """Raise if a group is split across folds (its members' labels would leak into each other)."""
    groups, folds = np.asarray(groups), np.asarray(folds)
    order = np.lexsort((folds, groups))
    g, f = groups[order], folds[order]
    split = (g[1:] == g[:-1]) & (f[1:] != f[:-1])
    if split.any():
        raise UserError(f"stacker folds leak: group {g[1:][split][0]} appears in more than one fold")


def group_oof(fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray], folds: np.ndarray) -> np.ndarray:
    """Out-of-fold probabilities (R, C): rows of fold f come from fit_predict(rows not in f, rows in f)."""
    rows = np.arange(len(folds))
    out = None
    for f in np.unique(folds):
        train, test = rows[folds != f], rows[folds == f]
        probs = np.asarray(fit_predict(train, test), np.float32)
        if out is None:
            out = np.zeros((len(rows), probs.shape[1]), np.float32)
        out[test] = probs
    return out


def leak_check(oof_driver: Callable = None, fold_maker: Callable = None, n_groups: int = 60, group_size: int = 3,
               n_classes: int = 5, n_folds: int = 5, seed: int = 0) -> dict:
    """Canary test of an out-of-fold pipeline: random labels shared within groups (like a labeled
    image and the pseudo-labels it passed on), and a base model that memorises the group labels it
    was trained on. Its features carry the label only for rows whose group the model saw, so any
    accuracy above chance after base OOF + stacker CV is a leak. Returns accuracies and `leak`.

    oof_driver(fit_predict, folds) defaults to :func:`group_oof`; fold_maker(groups, n_folds, seed)
    defaults to :func:`group_folds`. Pass deliberately broken ones to see the check fire."""
    oof_driver = oof_driver or group_oof
    fold_maker = fold_maker or group_folds
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), group_size)
    y = np.repeat(rng.integers(0, n_classes, n_groups), group_size)

    def memoriser(train, test):
        seen = dict(zip(groups[train], y[train]))
        out = np.full((len(test), n_classes), 1.0 / n_classes, np.float32)
        for j, g in enumerate(groups[test]):
            if g in seen:
                out[j] = 0.0
                out[j, seen[g]] = 1.0
        return out

    folds = fold_maker(groups, n_folds, seed)
    oof = oof_driver(memoriser, folds)
    base_acc = float((oof.argmax(1) == y).mean())
    stack = stack_oof(oof, y, folds, np.ones(len(y)), n_classes, rounds=20, leaves=3)
    stack_acc = float((stack.argmax(1) == y).mean())
    chance = 1.0 / n_classes
    limit = chance + 4 * np.sqrt(chance * (1 - chance) / n_groups)  # groups are the independent units
    return {"base_accuracy": base_acc, "stacker_accuracy": stack_acc, "chance": chance, "limit": float(limit),
            "leak": bool(base_acc > limit or stack_acc > limit)}


# ------------------------------------------------------------------------------------------------
# LightGBM stacker
# ------------------------------------------------------------------------------------------------
def _stacker(n_rows: int, rounds: int, lr: float, leaves: int, seed: int):
    import lightgbm as lgb

    return lgb.LGBMClassifier(objective="multiclass", n_estimators=rounds, learning_rate=lr, num_leaves=leaves,
                              min_child_samples=max(2, min(20, n_rows // 20)), subsample=0.8, subsample_freq=1,
                              colsample_bytree=0.8, reg_lambda=1.0, max_bin=63, random_state=seed, verbose=-1,
                              n_jobs=1)  # a few thousand rows: threads cost more than they save


def fit_stacker(features: np.ndarray, y: np.ndarray, weight: np.ndarray, n_classes: int, rounds: int = 200,
                lr: float = 0.05, leaves: int = 7, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Train LightGBM on (R, F) features; returns predict(features) -> (Q, n_classes) probabilities."""
    present = np.unique(y)
    if len(present) == 1:  # LightGBM needs two classes
        def constant(x):
            out = np.zeros((len(x), n_classes), np.float32)
            out[:, present[0]] = 1.0
            return out
        return constant
    model = _stacker(len(y), rounds, lr, leaves, seed).fit(features, y, sample_weight=weight)

    def predict(x):
        out = np.zeros((len(x), n_classes), np.float32)
        out[:, model.classes_] = model.predict_proba(x)
        return out

    return predict


def stack_oof(features: np.ndarray, y: np.ndarray, folds: np.ndarray, weight: np.ndarray, n_classes: int,
              rounds: int = 200, lr: float = 0.05, leaves: int = 7, seed: int = 0) -> np.ndarray:
    """The stacker's own out-of-fold probabilities, on the same folds as its features."""
    out = np.zeros((len(y), n_classes), np.float32)
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        predict = fit_stacker(features[train], y[train], weight[train], n_classes, rounds, lr, leaves, seed)
        out[test] = predict(features[test])
    return out
