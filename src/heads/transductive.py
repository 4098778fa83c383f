"""Transductive heads: label propagation over the kNN graph of every image, PT-MAP, TIM-GD,
LaplacianShot and BD-CSPN (the methods live in src/transductive; see their docstrings for papers).

Inputs. Without a context a head takes embeddings, like every head: ``fit(support_x, ...,
query_x=test_x)`` preprocesses support and queries with one transform fitted on both
(``heads.transductive_features``; ``auto``: each method's own, ``FEATURES`` below). With a
:class:`src.transductive.TransductiveContext` (stage 05 and the comparison scripts set
``head.context``) it takes row indices into the context's embeddings of ALL images instead:
features are preprocessed once over every image, the kNN graph is built once, and
``heads.transductive_set`` chooses the transductive set: ``query`` (the rows passed as query_x: the
test images and any held-out row) or ``all`` (every image not in the support).

Outputs. ``predict_proba`` returns the transductive posterior for rows of the transductive set, and
the method's inductive rule (its final classifier alone) for any other row. With
``heads.balanced_prior`` the posteriors of the transductive set are Sinkhorn-balanced so that every
present class receives the same mass (the competition's classes are balanced); PT-MAP's own
optimal transport and TIM's marginal entropy are balanced priors by construction.

Registered: propagation, pt_map, tim, laplacianshot, bd_cspn.
"""
from __future__ import annotations

import numpy as np

from src.heads import HEADS, Head
from src.neighbors import knn_graph, knn_search
from src.transductive import LabelPropagation, Preprocess, sinkhorn_balance, softmax
from src.transductive.methods import (SINKHORN_ITERS, SINKHORN_TOL, centred_cosine, knn_kernel, laplacian_shot,
                                      pt_map, pt_map_assign, rectify_prototypes, squared_distances, tim_gd, tim_logits)


def balance(probs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The balanced-class prior: Sinkhorn to equal class mass, run to convergence."""
    return sinkhorn_balance(probs, present, iters=SINKHORN_ITERS, tol=SINKHORN_TOL)


def features_for(head: Head) -> str:
    """The head's feature preprocessing: heads.transductive_features, or with auto its FEATURES entry."""
    return FEATURES[head.name] if head.cfg.transductive_features == "auto" else head.cfg.transductive_features


# Feature preprocessing per method under transductive_features=auto: the papers' choices (TIM: L2N,
# Boudiaf et al. 2020; LaplacianShot: CL2N, Ziko et al. 2020; BD-CSPN: cosine on L2N, Liu et al. 2020)
# and stage 02's for propagation (pseudo.center). PT-MAP: the power transform alone (Hu et al. 2021,
# eq. 1, as easyfsl applies it); the official code's extra centring and normalisation (power_cl2n) cost
# 1.0 point over 10 support re-draws of the real data and gained 0.2 on the digits (docs/RESULTS.md).
FEATURES = {"propagation": "cl2n", "pt_map": "power", "tim": "l2n", "laplacianshot": "cl2n", "bd_cspn": "l2n"}


class TransductiveHead(Head):
    """Resolves inputs (rows or embeddings), runs :meth:`_transduce` on the transductive set, keeps
    its posteriors, and answers other rows with :meth:`_inductive`."""

    transductive = True
    uses_context = True
    name = ""  # registry name (FEATURES key)

    def fit(self, support_x, support_y, n_classes, query_x=None, support_weight=None):
        x, y, w = self._start(support_x, support_y, n_classes, support_weight)
        cfg = self.cfg
        self.features = features_for(self)
        if self.takes_rows:
            self.feats = self.context.features(self.features, cfg.power_beta)
            self.support_rows = x
            self.query_rows = self._transductive_rows(x, query_x)
            self._pos = np.full(len(self.context), -1, np.int64)
            self._pos[self.query_rows] = np.arange(len(self.query_rows))
            fs, fq = self.feats[x], self.feats[self.query_rows]
        else:
            q = np.zeros((0, x.shape[1]), np.float32) if query_x is None else np.asarray(query_x, np.float32)
            self.prep = Preprocess(self.features, cfg.power_beta).fit(np.concatenate([x, q]))
            self._keys = {row.tobytes(): i for i, row in enumerate(q)}
            fs, fq = self.prep(x), self.prep(q)
        probs = self._transduce(fs, y, w, fq)
        if cfg.balanced_prior and len(fq):
            probs = balance(probs, self.present)
        self.query_probs = probs.astype(np.float32)
        return self

    def _transductive_rows(self, support_rows: np.ndarray, query_x) -> np.ndarray:
        if self.cfg.transductive_set == "all":
            return np.setdiff1d(np.arange(len(self.context)), support_rows)
        if query_x is None:
            return np.zeros(0, np.int64)
        return np.setdiff1d(np.asarray(query_x, np.int64), support_rows)

    def predict_proba(self, x):
        if self.takes_rows:
            rows = np.asarray(x, np.int64)
            pos = self._pos[rows]

            def features(mask):
                return self.feats[rows[mask]]
        else:
            x = np.asarray(x, np.float32)
            pos = np.array([self._keys.get(row.tobytes(), -1) for row in x], np.int64)

            def features(mask):
                return self.prep(x[mask])
        out = np.zeros((len(pos), self.n_classes), np.float32)
        known = pos >= 0
        out[known] = self.query_probs[pos[known]]
        if (~known).any():
            out[~known] = self._inductive(features(~known))
        return out

    def _transduce(self, fs, y, w, fq) -> np.ndarray:
        """Posteriors (Q, C) of the transductive set fq (Q, D) given the support fs (S, D), y, w."""
        raise NotImplementedError

    def _inductive(self, f) -> np.ndarray:
        """Posteriors (M, C) of rows outside the transductive set from the fitted classifier."""
        raise NotImplementedError


@HEADS.register("pt_map")
class PTMap(TransductiveHead):
    """PT-MAP (Hu et al. 2021): optimal-transport soft assignments to class centres that move
    towards them (``heads.ptmap_*``; with transductive_features=auto the power transform, eq. 1)."""

    name = "pt_map"

    def _transduce(self, fs, y, w, fq):
        c = self.cfg
        probs, self.centres = pt_map(fs, y, fq, self.n_classes, w, c.ptmap_steps, c.ptmap_lr, c.ptmap_lambda,
                                     balanced=c.balanced_prior)
        return probs

    def _inductive(self, f):
        return pt_map_assign(f, self.centres, self.present, self.cfg.ptmap_lambda, balanced=False)[0]


@HEADS.register("tim")
class TIM(TransductiveHead):
    """TIM-GD (Boudiaf et al. 2020): support CE minus the queries' mutual information, full-batch
    Adam on the classifier weights (``heads.tim_*``; logits -T/2 ||f - w||^2 with
    heads.distance=euclidean, as in the paper, or T cos(f, w) with cosine, as in easyfsl)."""

    name = "tim"

    def _transduce(self, fs, y, w, fq):
        c = self.cfg
        ce, marginal, cond = c.tim_weights
        probs, self.W = tim_gd(fs, y, fq, self.n_classes, w, c.tim_steps, c.tim_lr, c.tim_temperature, ce,
                               marginal, cond, cosine=c.distance == "cosine")
        return probs

    def _inductive(self, f):
        return softmax(tim_logits(f, self.W, self.cfg.tim_temperature, self.cfg.distance == "cosine"), self.present)


@HEADS.register("bd_cspn")
class BDCSPN(TransductiveHead):
    """BD-CSPN (Liu et al. 2020): prototypes rectified with the shifted, pseudo-labeled queries;
    softmax(protonet_temperature * cos) to them (``heads.bdcspn_epsilon`` weighs the rows). With
    heads.balanced_prior the cosines are measured from the mean of the transductive set, so that
    the Sinkhorn-balanced posteriors are balanced decisions (methods.centred_cosine)."""

    name = "bd_cspn"

    def _transduce(self, fs, y, w, fq):
        self.protos = rectify_prototypes(fs, y, fq, self.n_classes, w, self.cfg.bdcspn_epsilon, self.cfg.balanced_prior)
        self.centre = fq.mean(0, keepdims=True) if self.cfg.balanced_prior and len(fq) else None  # (1, D)
        return self._inductive(fq)

    def _inductive(self, f):
        logits = self.cfg.protonet_temperature * centred_cosine(f, self.protos, self.centre)  # (N, C)
        return softmax(logits, self.present)


@HEADS.register("laplacianshot")
class LaplacianShot(TransductiveHead):
    """LaplacianShot (Ziko et al. 2020) on BD-CSPN-rectified prototypes: bound updates with a
    binary kNN kernel over the transductive set (``heads.laplacian_*``). With a context the kernel
    comes from the graph of all images: each row keeps its first laplacian_k neighbours among the
    graph_k nearest that belong to the transductive set."""

    name = "laplacianshot"

    def _transduce(self, fs, y, w, fq):
        c = self.cfg
        self.protos = rectify_prototypes(fs, y, fq, self.n_classes, w, c.bdcspn_epsilon, c.balanced_prior)
        if self.takes_rows:
            _, nbrs = self.context.graph(self.features, c.power_beta, max(c.graph_k, c.laplacian_k))
            pos = self._pos[nbrs[self.query_rows]]  # (Q, k) positions in the transductive set, -1 outside
            order = np.argsort(pos < 0, axis=1, kind="stable")[:, :c.laplacian_k]  # members first, by similarity
            kernel = knn_kernel(np.take_along_axis(pos, order, 1), len(fq))
        else:
            k = min(c.laplacian_k, len(fq) - 1)
            kernel = knn_kernel(knn_graph(fq, k)[1] if k > 0 else np.zeros((len(fq), 0), np.int64), len(fq))
        return laplacian_shot(fq, self.protos, kernel, self.present, c.laplacian_lambda, c.laplacian_steps)

    def _inductive(self, f):
        return softmax(-squared_distances(f, self.protos), self.present)


@HEADS.register("propagation")
class Propagation(Head):
    """Label spreading as a head (Zhou et al. 2004; solved as in src/transductive/graph.py). The
    support rows are the seeds; with a context the graph spans every image (labeled, unlabeled and
    test), is built once, and each fit only changes the seeds (leave-one-out drops the held-out row
    from them). Without one the graph spans the support and query embeddings. Scores become
    probabilities by Sinkhorn balancing over the unlabeled nodes (heads.balanced_prior) or by
    row normalisation; rows without any path to a seed get the uniform distribution."""

    transductive = True
    uses_context = True
    name = "propagation"

    def fit(self, support_x, support_y, n_classes, query_x=None, support_weight=None):
        x, y, w = self._start(support_x, support_y, n_classes, support_weight)
        c = self.cfg
        features = features_for(self)
        if self.takes_rows:
            lp = self.context.propagation(features, c.power_beta, c.graph_k, c.propagation_alpha, c.propagation_gamma)
            seeds = x
        else:
            q = np.zeros((0, x.shape[1]), np.float32) if query_x is None else np.asarray(query_x, np.float32)
            nodes = np.concatenate([x, q])
            self.prep = Preprocess(features, c.power_beta).fit(nodes)
            self.node_feats = self.prep(nodes)
            self._keys = {row.tobytes(): i for i, row in enumerate(nodes)}
            sims, idx = knn_graph(self.node_feats, max(1, min(c.graph_k, len(nodes) - 1)))
            lp = LabelPropagation(sims, idx, alpha=c.propagation_alpha, gamma=c.propagation_gamma)
            seeds = np.arange(len(x))
        scores = lp.propagate(seeds, y, n_classes, w)  # (N, C): the only place labels enter
        self.probs = self._normalise(scores, seeds).astype(np.float32)
        return self

    def _normalise(self, scores: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        scores = scores * self.present[None, :]
        reached = scores.sum(1) > 0
        out = np.where(reached[:, None], scores, self.present[None, :].astype(np.float64))  # unreached: uniform
        out /= out.sum(1, keepdims=True)
        unlabeled = np.ones(len(out), bool)
        unlabeled[seeds] = False
        if self.cfg.balanced_prior and unlabeled.any():
            out[unlabeled] = sinkhorn_balance(out[unlabeled], self.present, iters=SINKHORN_ITERS, tol=SINKHORN_TOL)
        return out

    def predict_proba(self, x):
        if self.takes_rows:
            return self.probs[np.asarray(x, np.int64)]
        x = np.asarray(x, np.float32)
        pos = np.array([self._keys.get(row.tobytes(), -1) for row in x], np.int64)
        out = np.zeros((len(x), self.n_classes), np.float32)
        out[pos >= 0] = self.probs[pos[pos >= 0]]
        new = np.flatnonzero(pos < 0)
        if len(new):  # out-of-sample rows: affinity-weighted mean of their graph neighbours' posteriors
            sims, nbrs = knn_search(self.prep(x[new]), self.node_feats, self.cfg.graph_k)
            wts = np.clip(sims, 0.0, None).astype(np.float64) ** self.cfg.propagation_gamma + 1e-12
            p = (wts[:, :, None] * self.probs[nbrs]).sum(1)
            out[new] = p / p.sum(1, keepdims=True)
        return out
