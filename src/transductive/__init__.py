"""Transductive inference: one home for the numerics the heads (stage 05) and the pseudo-labelers
(stage 02) share, and for the transductive methods themselves.

* :mod:`src.transductive.core` - feature preprocessing (L2N, CL2N, power transform: one step,
  :class:`Preprocess`, selected by ``heads.transductive_features``), prototypes, (masked) softmax,
  Sinkhorn balancing (the balanced-class prior), the softmax information objective (entropy, TIM's
  mutual information) and a numpy Adam.
* :mod:`src.transductive.graph` - the kNN graph of every image (:class:`TransductiveContext`, built
  once per run) and label propagation on it with cached per-seed solutions (:class:`LabelPropagation`).
* :mod:`src.transductive.methods` - PT-MAP, TIM-GD, BD-CSPN, LaplacianShot on large query sets.
* :mod:`src.transductive.bench` - ``pipelines/bench.py transductive``: these methods against
  easyfsl's and scikit-learn's on one run's embeddings (accuracy and seconds).

The heads that wrap them are in src/heads/transductive.py.
"""
from src.transductive.core import (FEATURES, Adam, Preprocess, center_normalize, class_balanced_targets,
                                   compute_prototypes, info_objective, l2_normalize, one_hot, power_transform,
                                   prototype_logits, sinkhorn, sinkhorn_balance, softmax, squared_distances)
from src.transductive.graph import LabelPropagation, TransductiveContext, block_cg, propagation_operator

__all__ = ["FEATURES", "Adam", "Preprocess", "center_normalize", "class_balanced_targets", "compute_prototypes",
           "info_objective", "l2_normalize", "one_hot", "power_transform", "prototype_logits", "sinkhorn",
           "sinkhorn_balance",
           "softmax", "squared_distances", "LabelPropagation", "TransductiveContext", "block_cg",
           "propagation_operator"]
