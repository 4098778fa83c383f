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
* Heads with ``uses_context`` accept a :class:`src.transductive.TransductiveContext` (the embeddings
  of every image; set ``head.context``): they then take int row indices into it in place of
  ``support_x``, ``query_x`` and ``x``, and reuse its preprocessed features and kNN graph.

Registered heads: protonet, protonet_transductive, knn, cosine_finetune, logreg, and the transductive
heads of src/heads/transductive.py: propagation (over the kNN graph of all images), pt_map, tim,
laplacianshot, bd_cspn. Shared numerics (prototypes, normalisation, softmax, Sinkhorn) live in
src/transductive.
"""
from __future__ import annotations

import numpy as np

from src.config import HeadsCfg
from src.registry import Registry
# The shared numerics live in src/transductive (also used by the pseudo-labelers); re-exported here
# because every head module needs them.
from src.transductive import compute_prototypes, l2_normalize, prototype_logits, softmax  # noqa: F401

HEADS = Registry("head")


class Head:
    """Base class: stores the config; subclasses implement fit and predict_proba."""

    transductive = False  # uses query_x in fit
    runs_encoder = False  # takes uint8 images instead of embeddings
    uses_context = False  # accepts a TransductiveContext (make_head sets it; then takes row indices)
    context = None  # src.transductive.TransductiveContext | None

    @property
    def takes_rows(self) -> bool:
        """True when inputs are row indices into self.context.x instead of embeddings."""
        return self.context is not None

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
        if self.takes_rows:
            x = np.asarray(support_x, dtype=np.int64)
        else:
            x = support_x if self.runs_encoder else np.asarray(support_x, dtype=np.float32)
        return x, y, w

    def fit(self, support_x, support_y, n_classes: int, query_x=None, support_weight=None) -> "Head":
        raise NotImplementedError

    def predict_proba(self, x) -> np.ndarray:
        raise NotImplementedError


def loads_saved_encoder(cfg: HeadsCfg, heads: list[str] | None = None) -> bool:
    """Whether the heads (cfg.heads, or the given names) run the saved encoder: cosine_finetune with
    heads.finetune_encoder fine-tunes it on the images (the others read the written embeddings)."""
    return cfg.finetune_encoder and "cosine_finetune" in (cfg.heads if heads is None else heads)


# Register the heads (imports at the bottom: the modules import HEADS and Head from here).
from src.heads import protonet, knn, cosine_finetune, logreg, transductive  # noqa: E402,F401
