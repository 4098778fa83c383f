"""Prototypical networks as an inference head (Snell et al. 2017, "Prototypical Networks for
Few-shot Learning") and its transductive refinement by soft k-means over the unlabeled query
embeddings (Ren et al. 2018, "Meta-Learning for Semi-Supervised Few-Shot Classification"), with an
optional balanced-class prior enforced by Sinkhorn scaling of the soft assignments (Cuturi 2013;
as in PT-MAP, Hu et al. 2021)."""
from __future__ import annotations

import numpy as np

from src.heads import HEADS, Head
from src.transductive import compute_prototypes, l2_normalize, prototype_logits, sinkhorn_balance, softmax


@HEADS.register("protonet")
class ProtoNet(Head):
    """Nearest class mean: cosine (temperature * cos) or squared Euclidean distance."""

    def fit(self, support_x, support_y, n_classes, query_x=None, support_weight=None):
        x, y, w = self._start(support_x, support_y, n_classes, support_weight)
        if self.cfg.distance not in ("cosine", "euclidean"):
            raise ValueError(f"heads.distance: expected cosine or euclidean, got {self.cfg.distance!r}")
        self.cosine = self.cfg.distance == "cosine"
        self.prototypes = compute_prototypes(x, y, n_classes, w, cosine=self.cosine)  # (C, D)
        return self

    def predict_proba(self, x):
        logits = prototype_logits(x, self.prototypes, self.cosine, self.cfg.protonet_temperature)
        return softmax(logits, self.present)


@HEADS.register("protonet_transductive")
class TransductiveProtoNet(ProtoNet):
    """ProtoNet whose prototypes are refined on the query set: each of `transductive_iters` steps
    soft-assigns every query embedding (softmax of temperature * cos) and recomputes each prototype
    as the weighted mean of its support rows and its assigned queries."""

    transductive = True

    def fit(self, support_x, support_y, n_classes, query_x=None, support_weight=None):
        super().fit(support_x, support_y, n_classes, support_weight=support_weight)
        if query_x is None or len(query_x) == 0:
            return self  # nothing to adapt to: plain ProtoNet
        x, y, w = self._start(support_x, support_y, n_classes, support_weight)
        q = np.asarray(query_x, np.float32)
        if self.cosine:
            x, q = l2_normalize(x), l2_normalize(q)
        # Every present class anchors its prototype with the same support mass (the mean per class):
        # a class one image short (leave-one-out) must not be pulled harder towards the queries.
        per_class = np.bincount(y, weights=w, minlength=n_classes)
        onehot = np.zeros((len(y), n_classes), np.float32)
        onehot[np.arange(len(y)), y] = w * (w.sum() / self.present.sum()) / per_class[y]
        support_sum, support_mass = onehot.T @ x, onehot.sum(0)  # (C, D), (C,): fixed across steps
        for _ in range(self.cfg.transductive_iters):
            logits = prototype_logits(q, self.prototypes, self.cosine, self.cfg.transductive_temperature)
            resp = softmax(logits, self.present)  # (Q, C)
            if self.cfg.balanced_prior:
                resp = sinkhorn_balance(resp, self.present).astype(np.float32)
            mass = support_mass + resp.sum(0)  # (C,)
            protos = (support_sum + resp.T @ q) / np.maximum(mass, 1e-12)[:, None]
            self.prototypes = (l2_normalize(protos) if self.cosine else protos).astype(np.float32)
        return self
