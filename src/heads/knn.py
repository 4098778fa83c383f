"""k-nearest-neighbour vote with faiss over labeled (+ pseudo-labeled) embeddings, weighted by
exp(cos / tau) as in the weighted kNN classifier of Wu et al. 2018 ("Unsupervised Feature Learning
via Non-Parametric Instance Discrimination") and by each support row's weight, and divided by each
class's total support weight (a balanced class prior)."""
from __future__ import annotations

import faiss
import numpy as np

from src.heads import HEADS, Head
from src.transductive import l2_normalize

SELF_MATCH = 1.0 - 1e-5  # cosine above which a pseudo-labeled neighbour is the query itself


@HEADS.register("knn")
class KNN(Head):
    def fit(self, support_x, support_y, n_classes, query_x=None, support_weight=None):
        x, self.y, self.w = self._start(support_x, support_y, n_classes, support_weight)
        self.class_mass = np.bincount(self.y, weights=self.w, minlength=n_classes)  # (C,) support weight per class
        self.index = faiss.IndexFlatIP(x.shape[1])  # inner product of unit vectors = cosine
        self.index.add(np.ascontiguousarray(l2_normalize(x)))
        return self

    def predict_proba(self, x):
        q = np.ascontiguousarray(l2_normalize(x))
        k = min(self.cfg.knn_k + 1, self.index.ntotal)  # one spare: a skipped self-match
        sims, nbrs = self.index.search(q, k)  # (Q, k) each, best first
        weight = np.exp((sims - 1.0) / self.cfg.knn_temperature) * self.w[nbrs]
        # A pseudo-labeled test image must not vote for itself: that only echoes its pseudo-label.
        weight[(sims >= SELF_MATCH) & (self.w[nbrs] < 1.0)] = 0.0
        keep = np.argsort(weight == 0, axis=1, kind="stable")[:, : min(self.cfg.knn_k, k)]
        weight, labels = np.take_along_axis(weight, keep, 1), np.take_along_axis(self.y[nbrs], keep, 1)
        votes = np.zeros((len(q), self.n_classes), np.float64)
        np.add.at(votes, (np.repeat(np.arange(len(q)), labels.shape[1]), labels.ravel()), weight.ravel())
        # votes_c / n_c: the kNN estimate of p(x | c), i.e. a balanced class prior. Raw votes would
        # favour classes with more support rows (leave-one-out leaves the held-out class one short).
        votes /= np.maximum(self.class_mass, 1e-12)[None, :]
        # A small floor over the present classes keeps probabilities finite for log-loss.
        votes = votes / np.maximum(votes.sum(1, keepdims=True), 1e-300) + 1e-4 * self.present[None, :]
        return (votes / votes.sum(1, keepdims=True)).astype(np.float32)
