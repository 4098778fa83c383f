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

from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from src.errors import UserError
from src.estimate import ESTIMATORS, EstimateContext

EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Simple combiners. probs: list of (n, C) arrays.
# ------------------------------------------------------------------------------------------------
def mean_probs(probs: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    w = np.ones(len(probs)) if weights is None else np.asarray(weights, np.float64)
    out = sum(wi * np.asarray(p, np.float64) for wi, p in zip(w, probs)) / max(w.sum(), EPS)
    return out.astype(np.float32)


def percentile_ranks(p: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(n, C) mid-rank percentile of every entry of p among the same column of `reference` (R, C):
    (#{ref < x} + #{ref <= x}) / (2 R), in [0, 1]. Rows of `reference` itself get (rank - 1/2) / R."""
    p, reference = np.asarray(p, np.float64), np.asarray(reference, np.float64)
    out = np.empty_like(p)
    for c in range(p.shape[1]):
        ref = np.sort(reference[:, c])
        out[:, c] = (np.searchsorted(ref, p[:, c], "left") + np.searchsorted(ref, p[:, c], "right")) / (2 * len(ref))
    return out


def rank_average(probs: list[np.ndarray], reference: list[np.ndarray] | None = None,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """(n, C) average across members (weighted by `weights` (M,), default equal) of per-class
    percentile ranks, in [0, 1]. Each member's column is ranked among the same column of its
    `reference` rows (default: the rows themselves): the LOO rows of the labeled images are ranked
    among the test rows, so their scores are the same function of the member's probabilities as the
    test images' and the rule's local CV and accuracy estimates read what is submitted. Insensitive
    to the members' calibration; needs many rows. Scores, not probabilities: see `rank_probs`."""
    reference = probs if reference is None else reference
    return average_ranks([percentile_ranks(p, ref) for p, ref in zip(probs, reference)], weights)


def average_ranks(ranks: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """(n, C) weighted mean over members of percentile ranks (M arrays (n, C))."""
    return np.average(np.asarray(ranks, np.float64), axis=0, weights=weights)


def softmax_scores(scores: np.ndarray, tau: float) -> np.ndarray:
    """(n, C) softmax(scores / tau), float32."""
    z = np.asarray(scores, np.float64) / tau
    z = np.exp(z - z.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


def confidence_matching_tau(scores: np.ndarray, confidence: float, iters: int = 60) -> float:
    """The tau at which softmax(scores / tau) (scores (T, C), each in [0, 1]) has mean top probability
    `confidence` over the rows, by bisection on log tau (the mean top probability falls as tau grows)."""
    c = scores.shape[1]
    target = float(np.clip(confidence, 1.0 / c + 1e-4, 1 - 1e-4))
    lo, hi = np.log(1e-4), np.log(1e2)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if softmax_scores(scores, np.exp(mid)).max(1).mean() > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def rank_probs(test_scores: np.ndarray, oof_scores: np.ndarray, like: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from rank scores, label-free and argmax-preserving: softmax(scores / tau), with
    one tau for the test rows and the LOO rows, chosen so the test rows' mean top probability equals
    that of `like` (T, C), the members' mean probabilities with the rule's weights. The rule then
    submits probabilities on its members' own confidence scale, which the accuracy estimates (DoC,
    ATC on negative entropy, temperature scaling) and the log-loss read; renormalised ranks would put
    about 0.2 on every top class. Returns (test (T, C), oof (n, C))."""
    tau = confidence_matching_tau(test_scores, like.max(1).mean())
    return softmax_scores(test_scores, tau), softmax_scores(oof_scores, tau)


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


# ------------------------------------------------------------------------------------------------
# Rules: one function per ensemble.method, shared by stage 06 and the re-draw evaluator
# (src/selection.py), so what the evaluator measures is what the submission runs.
# ------------------------------------------------------------------------------------------------
@dataclass
class Members:
    """Everything a rule may see: the members' probabilities and the labeled images' labels. Never
    truth: the rules take no argument that could carry it (tests check with a scrambled-truth spy).

    stack/table: the stacker's inputs (group-fold OOF probabilities (R, C) per member, or None, and
    the stack table of 05_heads: row, y, weight, group, fold, labeled); only the "stack" rule reads them."""

    names: list[str]
    oof: list[np.ndarray]  # (L, C) leave-one-out probabilities of the labeled images, per member
    probs: list[np.ndarray]  # (T, C) test probabilities, per member
    y: np.ndarray  # (L,) class ids of the labeled images
    transductive: list[bool] = field(default_factory=list)  # member used the unlabeled images
    stack: list[np.ndarray | None] | None = None
    table: pd.DataFrame | None = None
    sources: list[str] = field(default_factory=list)  # the stage of each member (heads | meta); empty: heads

    @property
    def n_classes(self) -> int:
        return int(self.probs[0].shape[1])


def count_once(m: Members, sources: list[str]) -> tuple[Members, np.ndarray]:
    """The members of each stage in `sources` (ensemble.count_once) merged into one member, their
    mean, named after the stage: a family trained together (04_meta's methods meta-train on the same
    episodes from the same encoder and share their errors) is one voter in every rule, not one per
    method. Returns (merged members, spread (G, M)): a merged member's weight spreads evenly over
    the members it stands for, so member weights (M,) = merged weights (G,) @ spread."""
    stage = list(m.sources) or ["heads"] * len(m.names)
    keyed: dict[object, list[int]] = {}  # a family's stage, or the member's own index: its rows, in first-seen order
    for k, s in enumerate(stage):
        keyed.setdefault(s if s in sources else k, []).append(k)
    groups = list(keyed.values())
    spread = np.zeros((len(groups), len(m.names)))
    for g, ks in enumerate(groups):
        spread[g, ks] = 1.0 / len(ks)
    if len(groups) == len(m.names):
        return m, spread

    def merged(arrays, ks):
        return arrays[ks[0]] if len(ks) == 1 else mean_probs([arrays[k] for k in ks])

    stack = None
    if m.stack is not None:
        stack = [None if any(m.stack[k] is None for k in ks) else merged(m.stack, ks) for ks in groups]
    trans = list(m.transductive) or [False] * len(m.names)
    return Members(names=[m.names[ks[0]] if len(ks) == 1 else stage[ks[0]] for ks in groups],
                   oof=[merged(m.oof, ks) for ks in groups], probs=[merged(m.probs, ks) for ks in groups], y=m.y,
                   transductive=[any(trans[k] for k in ks) for ks in groups], stack=stack, table=m.table,
                   sources=[stage[ks[0]] for ks in groups]), spread


@dataclass
class Combined:
    oof: np.ndarray  # (L, C) local-CV probabilities: nested wherever the rule itself read labels
    test: np.ndarray  # (T, C) test probabilities
    weights: np.ndarray | None  # (M,) member weights, when the rule is a weighted mean
    note: str


@dataclass
class RuleParams:
    """The ensemble.* settings the rules read (a subset of EnsembleCfg) and the run seed."""

    weight_rounds: int = 20
    preferred: list[str] = field(default_factory=lambda: ["propagation", "knn"])
    gate_agreement: float = 0.9
    auto_candidates: list[str] = field(default_factory=lambda: ["mean", "weighted", "rank", "stack"])
    agreement_iters: int = 10
    stacker_rounds: int = 200
    stacker_lr: float = 0.05
    stacker_leaves: int = 7
    count_once: list[str] = field(default_factory=lambda: ["meta"])
    seed: int = 0
    estimator: str = "atc"  # cv.estimator: the accuracy estimate the "estimated" rule ranks members by

    @classmethod
    def from_config(cls, e, seed: int = 0, estimator: str = "atc") -> "RuleParams":
        return cls(**{f.name: getattr(e, f.name) for f in fields(cls) if f.name not in ("seed", "estimator")},
                   seed=seed, estimator=estimator)


RULES: dict[str, Callable[[Members, RuleParams], Combined]] = {}
PREFERRED_RULES = ("preferred", "preferred_mean", "gated")  # rules that read ensemble.preferred


def rule(name: str):
    def deco(fn):
        RULES[name] = fn
        return fn
    return deco


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(1) == y).mean())


def _score_key(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Sort key of a candidate on local CV (lower is better): accuracy first, then log-loss."""
    return -accuracy(probs, y), log_loss(probs, y)


def nested_choice(candidates: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Honest CV of 'pick the candidate with the best local CV' (candidates: OOF probabilities (L, C)
    each): row i takes the candidate that scores best on the other rows (ties: the earlier one)."""
    out = np.zeros_like(candidates[0], dtype=np.float32)
    rows = np.arange(len(y))
    for i in rows:
        keep = rows != i
        best = min(range(len(candidates)), key=lambda k: (*_score_key(candidates[k][keep], y[keep]), k))
        out[i] = candidates[best][i]
    return out


@rule("mean")
def rule_mean(m: Members, p: RuleParams) -> Combined:
    w = np.full(len(m.names), 1.0 / len(m.names))
    return Combined(mean_probs(m.oof), mean_probs(m.probs), w, "equal weights")


@rule("weighted")
def rule_weighted(m: Members, p: RuleParams) -> Combined:
    w = greedy_weights(m.oof, m.y, p.weight_rounds)
    return Combined(nested_weighted_oof(m.oof, m.y, p.weight_rounds), mean_probs(m.probs, w), w,
                    "weights: greedy selection on LOO probabilities; CV nested")


def rank_rule_probs(m: Members, w: np.ndarray | None = None, ranks: list[np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The members' rank average with weights w (M,) (default equal), as probabilities (`rank_probs`,
    on the confidence scale of their mean probabilities with the same weights); the LOO rows ranked
    among the test rows. `ranks`: the members' percentile ranks among the test rows, if already
    computed. Returns (test (T, C), oof (n, C))."""
    ranks = [percentile_ranks(q, q) for q in m.probs] if ranks is None else ranks
    return rank_probs(average_ranks(ranks, w), rank_average(m.oof, m.probs, w), mean_probs(m.probs, w))


@rule("rank")
def rule_rank(m: Members, p: RuleParams) -> Combined:
    test, oof = rank_rule_probs(m)
    return Combined(oof, test, None, "per-class percentile rank among the test rows, averaged; as probabilities "
                    "on the members' confidence scale (label-free)")


@rule("best")
def rule_best(m: Members, p: RuleParams) -> Combined:
    """The single member with the best local CV (accuracy, then log-loss); CV nested."""
    best = min(range(len(m.names)), key=lambda k: (*_score_key(m.oof[k], m.y), k))
    w = np.eye(len(m.names))[best]
    return Combined(nested_choice(m.oof, m.y), m.probs[best], w, f"best member on local CV: {m.names[best]}")


@rule("estimated")
def rule_estimated(m: Members, p: RuleParams) -> Combined:
    """The single member with the highest accuracy estimate (src/estimate.py, p.estimator), which
    reads the test images as well as the labeled ones; CV nested: row i's member is the one ranked
    first with row i left out of the labeled rows."""
    estimator = ESTIMATORS.get(p.estimator)

    def ranked_first(rows: np.ndarray) -> int:
        ctx = EstimateContext(list(m.probs), [o[rows] for o in m.oof], m.y[rows], intervals=False)
        values = [estimator(m.probs[k], m.oof[k][rows], ctx).value for k in range(len(m.names))]
        return int(np.argmax(values))  # ties: the earlier member

    best = ranked_first(np.arange(len(m.y)))
    oof = np.stack([m.oof[ranked_first(np.flatnonzero(np.arange(len(m.y)) != i))][i] for i in range(len(m.y))])
    return Combined(oof.astype(np.float32), m.probs[best], np.eye(len(m.names))[best],
                    f"highest {p.estimator} estimate: {m.names[best]}")


def shrink_weights(oof: list[np.ndarray], y: np.ndarray, rounds: int) -> tuple[np.ndarray, float]:
    """Greedy CV weights shrunk toward uniform by how much of the members' LOO spread is noise:
    r = max(0, 1 - se^2 / var_m(acc_m)), se^2 = pbar (1 - pbar) / L the binomial variance of one
    LOO accuracy (James & Stein 1961 / empirical Bayes); w = r * greedy + (1 - r) * uniform. With 30
    labels se is ~6 points, so members whose LOO scores sit within each other's intervals get equal
    weights. Returns (weights (M,), r)."""
    acc = np.array([accuracy(o, y) for o in oof])
    pbar = float(acc.mean())
    se2 = pbar * (1 - pbar) / max(len(y), 1)
    spread = float(acc.var())
    r = 0.0 if spread <= 0 else max(0.0, 1.0 - se2 / spread)
    uniform = np.full(len(oof), 1.0 / len(oof))
    return r * greedy_weights(oof, y, rounds) + (1 - r) * uniform, r


@rule("shrunk")
def rule_shrunk(m: Members, p: RuleParams) -> Combined:
    w, r = shrink_weights(m.oof, m.y, p.weight_rounds)
    nested = np.zeros_like(m.oof[0], dtype=np.float32)
    rows = np.arange(len(m.y))
    for i in rows:  # CV nested: row i is combined with weights chosen on the other rows
        wi, _ = shrink_weights([o[rows != i] for o in m.oof], m.y[rows != i], p.weight_rounds)
        nested[i] = mean_probs([o[i:i + 1] for o in m.oof], wi)[0]
    return Combined(nested, mean_probs(m.probs, w), w, f"greedy CV weights shrunk toward uniform (trust r={r:.2f})")


def agreement_weights(probs: list[np.ndarray], iters: int = 10) -> np.ndarray:
    """Label-free member weights from the unlabeled test images alone. Start from the uniform mean;
    each step, a_m = agreement of member m's argmax with the consensus argmax and
    w_m = max(0, log(a_m (C - 1) / (1 - a_m))): the optimal weighted-majority weight of a member of
    accuracy a_m among independent members with symmetric errors (Nitzan & Paroush 1982), with the
    agreement standing in for the unknown accuracy (the Dawid & Skene 1979 idea); the consensus is
    then the weighted mean. Members at or below chance get 0. Returns weights (M,) summing to 1."""
    c = probs[0].shape[1]
    w = np.full(len(probs), 1.0 / len(probs))
    labels = np.stack([p.argmax(1) for p in probs])  # (M, T)
    for _ in range(max(iters, 1)):
        consensus = mean_probs(probs, w).argmax(1)
        agree = np.clip((labels == consensus[None]).mean(1), 1.0 / c, 1 - 1e-3)
        new = np.maximum(np.log(agree * (c - 1) / (1 - agree)), 0.0)
        new = new / new.sum() if new.sum() > 0 else np.full(len(probs), 1.0 / len(probs))
        if np.allclose(new, w, atol=1e-6):
            break
        w = new
    return w


@rule("agreement")
def rule_agreement(m: Members, p: RuleParams) -> Combined:
    w = agreement_weights(m.probs, p.agreement_iters)
    return Combined(mean_probs(m.oof, w), mean_probs(m.probs, w), w,
                    "weights from agreement with the consensus on the test images (label-free)")


@rule("agreement_rank")
def rule_agreement_rank(m: Members, p: RuleParams) -> Combined:
    """agreement's label-free weights, read from and applied to the members' per-class percentile
    ranks among the test rows (rank's scores) instead of their probabilities. In a mean of
    probabilities a member whose probabilities are sharper than the others' carries the consensus,
    so agreement weighs it most whatever its accuracy; ranks put every member on one scale. Weighted
    rank average, the LOO rows ranked among the test rows, submitted as probabilities (`rank_probs`)."""
    ranks = [percentile_ranks(q, q) for q in m.probs]  # (T, C) per member
    w = agreement_weights(ranks, p.agreement_iters)  # (M,)
    test, oof = rank_rule_probs(m, w, ranks)
    return Combined(oof, test, w, "weights from agreement with the consensus of the members' percentile ranks on "
                    "the test images (label-free); weighted rank average, as probabilities on the members' "
                    "confidence scale")


def equal_weight_mean(m: Members, keep: np.ndarray, which: str) -> Combined:
    """Equal-weight mean of the members where keep (M,) bool is set; `which` names them in the note."""
    w = keep / keep.sum()
    return Combined(mean_probs(m.oof, w), mean_probs(m.probs, w), w,
                    f"equal weights over the {which} members: " + ", ".join(n for n, k in zip(m.names, keep) if k))


def no_preferred_member(m: Members, p: RuleParams) -> UserError:
    return UserError(f"ensemble.preferred: none of {', '.join(p.preferred) or '(empty)'} is a member "
                     f"(members: {', '.join(m.names)})")


@rule("transductive")
def rule_transductive(m: Members, p: RuleParams) -> Combined:
    keep = np.array(m.transductive, bool) if m.transductive else np.zeros(len(m.names), bool)
    if not keep.any():
        raise UserError("ensemble.method=transductive: no transductive member "
                        f"(members: {', '.join(m.names)})")
    return equal_weight_mean(m, keep, "transductive")


@rule("preferred")
def rule_preferred(m: Members, p: RuleParams) -> Combined:
    chosen = next((n for n in p.preferred if n in m.names), None)
    if chosen is None:
        raise no_preferred_member(m, p)
    k = m.names.index(chosen)
    return Combined(m.oof[k], m.probs[k], np.eye(len(m.names))[k], f"fixed member {chosen} (ensemble.preferred)")


@rule("preferred_mean")
def rule_preferred_mean(m: Members, p: RuleParams) -> Combined:
    """Equal-weight mean of every ensemble.preferred member present (default: propagation and kNN).
    Label-free like `preferred`, but one member's bad support draw is halved instead of submitted
    (40-draw digits tables in docs/RESULTS.md: it passes both bars where `preferred` fails them)."""
    keep = np.array([n in p.preferred for n in m.names], bool)
    if not keep.any():
        raise no_preferred_member(m, p)
    return equal_weight_mean(m, keep, "preferred")


def one_se_members(oof: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Members whose LOO accuracy is within one binomial standard error of the best member's
    (the one-standard-error rule, Breiman et al. 1984): se = sqrt(a (1 - a) / L) at the best
    accuracy a; with 30 labels that is ~5 points, so only clearly worse members drop out.
    Returns a boolean mask (M,)."""
    acc = np.array([accuracy(o, y) for o in oof])
    top = float(acc.max())
    se = np.sqrt(top * (1 - top) / max(len(y), 1))
    return acc >= top - se - 1e-12


@rule("top")
def rule_top(m: Members, p: RuleParams) -> Combined:
    """Equal-weight mean of the members within one standard error of the best LOO; CV nested."""
    keep = one_se_members(m.oof, m.y)
    w = keep / keep.sum()
    nested = np.zeros_like(m.oof[0], dtype=np.float32)
    rows = np.arange(len(m.y))
    for i in rows:  # row i is combined over the members chosen on the other rows
        ki = one_se_members([o[rows != i] for o in m.oof], m.y[rows != i])
        nested[i] = mean_probs([o[i:i + 1] for o in m.oof], ki / ki.sum())[0]
    return Combined(nested, mean_probs(m.probs, w), w,
                    "mean of the members within one SE of the best LOO: "
                    + ", ".join(n for n, k in zip(m.names, keep) if k))


def test_agreement(probs: list[np.ndarray]) -> float:
    """Mean over member pairs of the fraction of test images on which both argmaxes agree (label-free)."""
    labels = [p.argmax(1) for p in probs]
    pairs = [(a == b).mean() for i, a in enumerate(labels) for b in labels[i + 1:]]
    return float(np.mean(pairs)) if pairs else 1.0


@rule("gated")
def rule_gated(m: Members, p: RuleParams) -> Combined:
    """The uniform mean when the members agree (mean pairwise test agreement >= ensemble.gate_agreement),
    else the preferred member: when members disagree a lot, the mean is dragged by the weak ones. Label-free."""
    agree = test_agreement(m.probs)
    if agree >= p.gate_agreement:
        c = rule_mean(m, p)
        return Combined(c.oof, c.test, c.weights, f"members agree {agree:.2f} >= {p.gate_agreement:g}: equal weights")
    c = rule_preferred(m, p)
    return Combined(c.oof, c.test, c.weights, f"members agree {agree:.2f} < {p.gate_agreement:g}: {c.note}")


@rule("stack")
def rule_stack(m: Members, p: RuleParams) -> Combined:
    """LightGBM on the concatenated group-fold OOF probabilities; CV on the same group folds."""
    stackable = [k for k, s in enumerate(m.stack or []) if s is not None]
    if not stackable or m.table is None:
        raise UserError("ensemble.method=stack: no member has stacker features (05_heads stack_rows.csv / stack_oof.npy)")
    table = m.table
    folds, groups = table["fold"].to_numpy(), table["group"].to_numpy()
    check_folds(groups, folds)  # a split group would leak its label into its own features
    feats = np.hstack([m.stack[k] for k in stackable])
    yr, wr = table["y"].to_numpy(), table["weight"].to_numpy(np.float64)
    labeled = table["labeled"].to_numpy(bool)
    kw = dict(rounds=p.stacker_rounds, lr=p.stacker_lr, leaves=p.stacker_leaves, seed=p.seed)
    oof = stack_oof(feats, yr, folds, wr, m.n_classes, **kw)
    model = fit_stacker(feats, yr, wr, m.n_classes, **kw)
    test = model(np.hstack([m.probs[k] for k in stackable]))
    # The table's labeled rows are the labeled images in order (written so by 05_heads).
    return Combined(oof[labeled], test, None, f"LightGBM on {len(stackable)} members' group-fold OOF, {len(table)} rows")


def pick_best(results: dict[str, Combined], y: np.ndarray) -> tuple[str, Combined]:
    """The rule with the best local CV (accuracy, log-loss, then dict order), with its CV nested:
    row i takes the rule that is best on the other rows. Returns (name, Combined)."""
    names = list(results)
    best = min(range(len(names)), key=lambda k: (*_score_key(results[names[k]].oof, y), k))
    chosen = results[names[best]]
    return names[best], Combined(nested_choice([results[n].oof for n in names], y), chosen.test, chosen.weights,
                                 f"best local CV among {', '.join(names)}: {names[best]} ({chosen.note})")


def _auto_candidates(m: Members, p: RuleParams) -> list[str]:
    # e.g. no stacker features: auto simply does without the stacker.
    return [n for n in p.auto_candidates if applicable(n, m, p)]


@rule("auto")
def rule_auto(m: Members, p: RuleParams) -> Combined:
    """The candidate rule (ensemble.auto_candidates) with the best local CV; CV nested."""
    return pick_best(apply_rules(_auto_candidates(m, p), m, p), m.y)[1]


def applicable(name: str, m: Members, p: RuleParams) -> bool:
    """Whether rule `name` can run on these members (stack: stacker features; transductive: a
    transductive member; preferred, preferred_mean and gated: a preferred member present)."""
    if name == "stack":
        return m.table is not None and any(s is not None for s in (m.stack or []))
    if name == "transductive":
        return any(m.transductive)
    if name in PREFERRED_RULES:
        return any(n in m.names for n in p.preferred)
    return True


def apply_rules(names: list[str], m: Members, p: RuleParams) -> dict[str, Combined]:
    """Every rule in `names` on the same members, each family of ensemble.count_once counted once
    (count_once); "auto" reuses the candidates already computed. Weights are per member of `m`."""
    g, spread = count_once(m, p.count_once)
    out: dict[str, Combined] = {}

    def get(name: str) -> Combined:
        if name not in out:
            check_rule(name)
            if name == "auto":
                out[name] = pick_best({n: get(n) for n in _auto_candidates(g, p)}, g.y)[1]
            else:
                out[name] = RULES[name](g, p)
        return out[name]

    merged = [n for n in g.names if n not in m.names]
    note = f"; counted once: {', '.join(merged)} (the mean of its members)" if merged else ""
    return {n: Combined(c.oof, c.test, None if c.weights is None else c.weights @ spread, c.note + note)
            for n, c in ((n, get(n)) for n in names)}


def estimate_context(m: Members, p: RuleParams) -> EstimateContext:
    """The accuracy estimators' view of the members (src/estimate.py): each family of
    ensemble.count_once counted once, as the rules count it, so that the label-free estimators
    (Dawid-Skene, disagreement, agreement-on-the-line) do not take one family's shared errors for
    many independent votes."""
    g, _ = count_once(m, p.count_once)
    return EstimateContext(list(g.probs), list(g.oof), g.y)


def check_rule(name: str, key: str = "ensemble.method") -> None:
    if name not in RULES:
        raise UserError(f"{key}: unknown rule '{name}' (known: {', '.join(RULES)})")


def combine(name: str, m: Members, p: RuleParams) -> Combined:
    """Apply rule `name` to the members (UserError for an unknown rule)."""
    return apply_rules([name], m, p)[name]
