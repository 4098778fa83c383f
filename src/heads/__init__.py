"""Few-shot inference heads: one interface over embeddings (or images, for heads that run the encoder).

    head = HEADS.get("protonet")(cfg.heads)
    head.fit(support_x, support_y, n_classes, query_x=test_x)   # query_x: transductive heads only
    probs = head.predict_proba(x)                                 # float32 (Q, C), rows sum to 1

* ``support_x`` float32 (S, D) embeddings (L2-normalised by the stages), ``support_y`` int (S,) in
  0..C-1, ``n_classes`` C. Classes absent from the support get probability 0 (episodes and
  leave-one-out may remove a class), so every head returns all C columns.
* ``query_x`` float32 (Q, D) | None: the unlabeled test embeddings, for transductive heads.
* ``support_weight`` float (S,) | None: per-row weight (1 for labeled images, the confidence for
  pseudo-labeled ones).

Registered heads: protonet, protonet_transductive, knn, cosine_finetune, logreg.
"""
from __future__ import annotations

import numpy as np

from src.config import HeadsCfg
from src.registry import Registry

HEADS = Registry("head")


class Head:
    """Base class: stores the config; subclasses implement fit and predict_proba."""

    transductive = False  # uses query_x in fit
    runs_encoder = False  # takes uint8 images instead of embeddings

    def __init__(self, cfg: HeadsCfg):
        self.cfg = cfg
        self.n_classes = 0
        self.present = np.zeros(0, bool)  # (C,) classes with at least one support row

    def _start(self, support_x, support_y, n_classes: int, support_weight=None):
        """Common checks; returns (x float32 (S, D), y int64 (S,), w float32 (S,))."""
        y = np.asarray(support_y, dtype=np.int64)
        if len(y) == 0:
            raise ValueError("empty support set")
        if y.min() < 0 or y.max() >= n_classes:
            raise ValueError(f"support_y must be in 0..{n_classes - 1}")
        self.n_classes = int(n_classes)
        self.present = np.bincount(y, minlength=n_classes) > 0
        w = np.ones(len(y), np.float32) if support_weight is None else np.asarray(support_weight, np.float32)
        x = support_x if self.runs_encoder else np.asarray(support_x, dtype=np.float32)
        return x, y, w

    def fit(self, support_x, support_y, n_classes: int, query_x=None, support_weight=None) -> "Head":
        raise NotImplementedError

    def predict_proba(self, x) -> np.ndarray:
        raise NotImplementedError


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def masked_softmax(logits: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Row softmax over the present classes; absent classes get exactly 0. (Q, C) float32."""
    z = np.asarray(logits)
    if not present.all():
        z = np.where(present[None, :], z, -np.inf)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e.astype(np.float32, copy=False)


def compute_prototypes(x: np.ndarray, y: np.ndarray, n_classes: int, weight: np.ndarray | None = None,
                       cosine: bool = True) -> np.ndarray:
    """Class prototypes (C, D): the (weighted) mean of each class's support embeddings (Snell et al.
    2017). cosine=True averages L2-normalised rows and re-normalises the mean. Absent classes: 0."""
    x = l2_normalize(x) if cosine else np.asarray(x, np.float32)
    w = np.ones(len(y), np.float32) if weight is None else np.asarray(weight, np.float32)
    onehot = np.zeros((len(y), n_classes), np.float32)
    onehot[np.arange(len(y)), y] = w
    sums = onehot.T @ x  # (C, D)
    protos = sums / np.maximum(onehot.sum(0), 1e-12)[:, None]
    return l2_normalize(protos) if cosine else protos


def prototype_logits(x: np.ndarray, protos: np.ndarray, cosine: bool, temperature: float) -> np.ndarray:
    """cosine: temperature * cos(x, p); euclidean: -||x - p||^2 (Snell et al. 2017). (Q, C)."""
    x = np.asarray(x, np.float32)
    if cosine:
        return temperature * (l2_normalize(x) @ protos.T)
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ protos.T + (protos * protos).sum(1)[None, :]
    return -d2


# Register the heads (imports at the bottom: the modules import HEADS and Head from here).
from src.heads import protonet, knn, cosine_finetune, logreg  # noqa: E402,F401
