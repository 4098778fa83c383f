"""Combining labelers and selecting the pseudo-labels to train on.

    result = pseudo_label({"propagation": p1, "kmeans": p2}, cfg.pseudo)   # p*: (U, C) unlabeled rows
    result.label, result.confidence, result.selected, result.source         # (U,) each

Pipeline: combine the labelers (the first labeler's probabilities, majority vote, mean, or a
normalised geometric mean) -> optional distribution alignment to a uniform prior (ReMixMatch,
Berthelot et al. 2020) -> agreement filter (how many labelers' own argmax equals the combined
label) -> one rule:

* ``threshold``: confidence >= pseudo.threshold;
* ``topk``: per class, the k = topk_fraction * U / C most confident (class balanced);
* ``freematch``: the self-adaptive per-class threshold of FreeMatch (Wang et al. 2023):
  tau_c = MaxNorm(mean class probability)_c * mean max-probability.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from src.config import PseudoCfg

COMBINE = ("first", "vote", "mean", "product")
SELECTION = ("threshold", "topk", "freematch")


@dataclass
class PseudoLabels:
    probs: np.ndarray  # (U, C) float32 after combination and alignment
    label: np.ndarray  # (U,) int64 class ids 0..C-1
    confidence: np.ndarray  # (U,) float32 = probs[label]
    agree: np.ndarray  # (U,) int number of labelers whose own label equals `label`
    source: list[str]  # (U,) names of the agreeing labelers joined by '+'
    selected: np.ndarray  # (U,) bool


def combine(outputs: dict[str, np.ndarray], method: str = "first") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """{labeler: (U, C) probs} -> (probs (U, C), agree (U,), source (U,)).

    first:   the first labeler's probabilities; the others only count as agreement.
    vote:    majority of the labelers' own labels (ties: the earlier labeler), probabilities = the mean
             over labelers with the voted class forced on top (its confidence = mean prob of the vote).
    mean:    arithmetic mean of the probabilities.
    product: normalised geometric mean (a product of experts: confident only where all agree).
    The labelers' probabilities are not calibrated alike (propagation is flatter than a cosine
    softmax), so mean/product let the sharpest labeler dominate the ranking; on the demo data
    ranking by the first (propagation) labeler and filtering by agreement selected more precisely.
    """
    names = list(outputs)
    stack = np.stack([outputs[n] for n in names]).astype(np.float64)  # (L, U, C)
    own = stack.argmax(2)  # (L, U)
    if method == "first":
        probs = stack[0]
    elif method == "product":
        probs = np.exp(np.log(np.clip(stack, 1e-12, None)).mean(0))
        probs /= probs.sum(1, keepdims=True)
    else:
        probs = stack.mean(0)
    if method == "vote":
        votes = np.zeros(probs.shape)
        rows = np.arange(probs.shape[0])
        for rank, labels in enumerate(own):  # earlier labelers win ties by a hair
            votes[rows, labels] += 1.0 + 1e-6 * (len(names) - rank)
        label = votes.argmax(1)
        # put the voted class on top: swap its mean prob with the row's max (rows still sum to 1)
        top = probs.argmax(1)
        p_label, p_top = probs[rows, label].copy(), probs[rows, top].copy()
        probs[rows, top], probs[rows, label] = p_label, p_top
    label = probs.argmax(1)
    agrees = own == label[None]  # (L, U)
    codes = (agrees * (1 << np.arange(len(names)))[:, None]).sum(0)  # bit mask of agreeing labelers
    names_of = {c: "+".join(n for b, n in enumerate(names) if c >> b & 1) or "none" for c in np.unique(codes)}
    return probs.astype(np.float32), agrees.sum(0), [names_of[c] for c in codes]


def distribution_alignment(probs: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """p~ = normalise(p * prior / mean_p) (ReMixMatch). prior defaults to uniform. Rows sum to 1."""
    prior = np.full(probs.shape[1], 1.0 / probs.shape[1]) if prior is None else np.asarray(prior, np.float64)
    marginal = probs.mean(0).astype(np.float64)
    out = probs * (prior / np.maximum(marginal, 1e-12))[None]
    return (out / out.sum(1, keepdims=True)).astype(np.float32)


def select_threshold(confidence: np.ndarray, threshold: float) -> np.ndarray:
    return confidence >= threshold


def select_topk(label: np.ndarray, confidence: np.ndarray, n_classes: int, k: int,
                candidates: np.ndarray | None = None) -> np.ndarray:
    """Per class, the k most confident candidate rows predicted as that class (fewer if the class
    has fewer). Ties broken by row order (stable sort)."""
    cand = np.ones(len(label), bool) if candidates is None else candidates
    mask = np.zeros(len(label), bool)
    for c in range(n_classes):
        rows = np.flatnonzero(cand & (label == c))
        mask[rows[np.argsort(-confidence[rows], kind="stable")[:k]]] = True
    return mask


def freematch_thresholds(mean_max_prob: float | torch.Tensor, class_marginal: np.ndarray | torch.Tensor):
    """FreeMatch self-adaptive thresholds: tau_c = tau * p_c / max_c p_c (global tau times the
    max-normalised local class marginal). Works on numpy arrays and torch tensors."""
    return class_marginal / class_marginal.max() * mean_max_prob


def select_freematch(probs: np.ndarray) -> np.ndarray:
    """Offline FreeMatch selection: the estimates are the means over all rows (no EMA needed)."""
    tau = freematch_thresholds(float(probs.max(1).mean()), probs.mean(0))
    return probs.max(1) >= tau[probs.argmax(1)]


class SelfAdaptiveThreshold:
    """Online FreeMatch threshold for training: EMA of the mean max-probability (global tau) and of
    the mean class probabilities (local), updated per batch on the device without host sync."""

    def __init__(self, n_classes: int, device: torch.device, momentum: float = 0.999):
        self.momentum = momentum
        self.tau = torch.tensor(1.0 / n_classes, device=device)
        self.marginal = torch.full((n_classes,), 1.0 / n_classes, device=device)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """probs: (B, C) weak-view probabilities of the unlabeled batch."""
        self.tau.lerp_(probs.max(1).values.mean().float(), 1 - self.momentum)
        self.marginal.lerp_(probs.mean(0).float(), 1 - self.momentum)

    def thresholds(self) -> torch.Tensor:
        return freematch_thresholds(self.tau, self.marginal)

    def state_dict(self) -> dict:
        return {"tau": self.tau.view(1), "marginal": self.marginal}

    def load_state_dict(self, state: dict) -> None:
        self.tau.copy_(state["tau"].view(()))
        self.marginal.copy_(state["marginal"])


def pseudo_label(outputs: dict[str, np.ndarray], cfg: PseudoCfg) -> PseudoLabels:
    """Combine -> align -> agreement filter -> selection rule, on the unlabeled rows."""
    probs, agree, source = combine(outputs, cfg.combine)
    if cfg.distribution_alignment:
        probs = distribution_alignment(probs)
    label = probs.argmax(1)
    conf = probs[np.arange(len(probs)), label]
    cand = agree >= min(cfg.require_agreement, len(outputs))
    n_classes = probs.shape[1]
    if cfg.selection == "threshold":
        selected = cand & select_threshold(conf, cfg.threshold)
    elif cfg.selection == "topk":
        selected = select_topk(label, conf, n_classes, int(cfg.topk_fraction * len(probs) / n_classes), cand)
    else:
        selected = cand & select_freematch(probs)
    return PseudoLabels(probs=probs, label=label, confidence=conf.astype(np.float32), agree=agree,
                        source=source, selected=selected)
