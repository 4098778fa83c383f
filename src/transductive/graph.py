"""Label propagation over the kNN graph of every image, and the context that builds that graph once.

Label spreading (Zhou et al. 2004, "Learning with Local and Global Consistency"): with S the
symmetric normalised affinity of the kNN graph (src/neighbors.py, affinities max(cos, 0)^gamma as in
Iscen et al. 2019), the class scores are F = (I - alpha S)^-1 Y for seed matrix Y (N, C). The system
is solved by conjugate gradient, all C columns at once (:func:`block_cg`, the iterates of
scipy.sparse.linalg.cg column by column).

:class:`LabelPropagation` serves many seed sets on one graph: F is linear in Y, so it solves
(I - alpha S) g_j = e_j once per seed row j (to a relative residual of 1e-6) and any later seed set
of cached rows is the weighted sum of their columns, F[:, c] = sum_{j: y_j = c} w_j g_j. Leave-one-out
and support re-draws therefore cost a (N, L) x (L, C) product each. Only rows that recur (seeds of
an earlier call, up to MAX_CACHED) are cached; seeds seen for the first time share one direct solve
of C columns (a single fit, or an episode of pseudo-labels, needs no cache).
The held-out row's label never reaches :meth:`LabelPropagation.propagate` (tests/test_transductive.py
spies on it).

:class:`TransductiveContext` holds every image's embedding (N, D) and caches what heads derive from
it: preprocessed features, the kNN graph, the propagation operator. Stage 05 and the comparison
scripts make one per run and hand it to every head (``src.heads.Head.context``); heads then take
row indices into it instead of embeddings.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from src.neighbors import affinity_matrix, knn_graph, normalized_adjacency
from src.transductive.core import Preprocess


def block_cg(a: sp.spmatrix, b: np.ndarray, x0: np.ndarray | None = None, rtol: float = 1e-6,
             maxiter: int = 100) -> np.ndarray:
    """Solve a x = b for every column of b (N, K) by conjugate gradient (a symmetric positive
    definite). Column k follows exactly the iterates of scipy.sparse.linalg.cg(a, b[:, k], x0[:, k],
    rtol, maxiter): it stops once its residual is below rtol * ||b_k||; the columns share one sparse
    product per iteration. Returns float64 (N, K)."""
    b = np.asarray(b, np.float64)
    x = np.zeros_like(b) if x0 is None else np.array(x0, np.float64)
    atol = rtol * np.linalg.norm(b, axis=0)  # (K,)
    r = b - a @ x
    active = atol > 0  # a zero right-hand side has the zero solution (scipy returns b)
    x[:, ~active] = 0.0
    p = np.zeros_like(b)
    rho_prev = np.ones(b.shape[1])
    for it in range(maxiter):
        active &= np.linalg.norm(r, axis=0) >= atol
        if not active.any():
            break
        rho = np.einsum("ij,ij->j", r, r)
        beta = np.where(active, rho / np.where(rho_prev > 0, rho_prev, 1.0), 0.0) if it else np.zeros_like(rho)
        p = np.where(active[None, :], r + beta[None, :] * p, 0.0)
        q = a @ p
        pq = np.einsum("ij,ij->j", p, q)
        alpha = np.where(active, rho / np.where(pq != 0, pq, 1.0), 0.0)
        x += alpha[None, :] * p
        r -= alpha[None, :] * q
        rho_prev = np.where(active, rho, rho_prev)
    return x


def propagation_operator(sims: np.ndarray, idx: np.ndarray, alpha: float, gamma: float) -> sp.csr_matrix:
    """A = I - alpha S (N, N) CSR for the kNN graph (sims, idx) (N, k)."""
    s = normalized_adjacency(affinity_matrix(sims, idx, gamma=gamma))
    return (sp.identity(len(idx), format="csr") - alpha * s).tocsr()


class LabelPropagation:
    """Label spreading on one graph for many seed sets (see the module docstring).

        lp = LabelPropagation(sims, idx, alpha=0.99, gamma=3.0)
        scores = lp.propagate(seed_rows, seed_y, n_classes)        # (N, C) float64, >= 0
    """

    MAX_CACHED = 512  # cached responses (N x 512 float32: 123 MB at 60,000 images); beyond: direct solves

    def __init__(self, sims: np.ndarray, idx: np.ndarray, alpha: float = 0.99, gamma: float = 3.0,
                 rtol: float = 1e-6, maxiter: int = 1000):
        self.a = propagation_operator(sims, idx, alpha, gamma)
        self.n = len(idx)
        self.rtol, self.maxiter = rtol, maxiter
        self._col = np.full(self.n, -1, np.int64)  # row -> column of self._g, -1: not solved yet
        self._g = np.zeros((self.n, 0), np.float32)  # (N, cached) responses g_j = A^-1 e_j
        self._seed_before = np.zeros(self.n, bool)  # rows that were seeds in an earlier call

    def responses(self, rows: np.ndarray) -> np.ndarray:
        """(N, len(rows)) float32 responses A^-1 e_j of seed rows j, solved once and cached."""
        rows = np.asarray(rows, np.int64)
        new = np.unique(rows[self._col[rows] < 0])
        if len(new):
            e = np.zeros((self.n, len(new)))
            e[new, np.arange(len(new))] = 1.0
            g = block_cg(self.a, e, x0=e, rtol=self.rtol, maxiter=self.maxiter).astype(np.float32)
            self._col[new] = self._g.shape[1] + np.arange(len(new))
            self._g = np.concatenate([self._g, g], axis=1)
        return self._g[:, self._col[rows]]

    def propagate(self, seed_rows: np.ndarray, seed_y: np.ndarray, n_classes: int,
                  seed_weight: np.ndarray | None = None) -> np.ndarray:
        """Class scores F = A^-1 Y (N, C) float64, clipped at 0, for seeds Y[row, y] = weight.

        Every class's seeds carry the same total mass (weights divided by the class's sum): a class
        one seed short (leave-one-out) must not spread less. The only entry point that sees labels."""
        seed_rows = np.asarray(seed_rows, np.int64)
        seed_y = np.asarray(seed_y, np.int64)
        w = np.ones(len(seed_rows)) if seed_weight is None else np.asarray(seed_weight, np.float64)
        per_class = np.bincount(seed_y, weights=w, minlength=n_classes)
        y = np.zeros((len(seed_rows), n_classes))
        y[np.arange(len(seed_rows)), seed_y] = w / np.maximum(per_class[seed_y], 1e-30)
        # F = A^-1 Y is linear in the seeds: seeds seen in an earlier call (the labeled rows, refit by
        # leave-one-out and re-draws) use their cached responses A^-1 e_j, one solve each for the whole
        # stage; first-time seeds (an episode's pseudo-labeled support) share one C-column solve.
        # Before: every new seed got its own solve, so 200 episodes x 20 seeds took 4,000 solves.
        known = self._col[seed_rows] >= 0
        cache = known | self._seed_before[seed_rows]
        self._seed_before[seed_rows] = True
        n_new = len(np.unique(seed_rows[cache & ~known]))
        if n_new and self._g.shape[1] + n_new > self.MAX_CACHED:  # cache full: new seeds go to the direct solve
            cache = known
        f = np.zeros((self.n, n_classes))
        if cache.any():
            f += self.responses(seed_rows[cache]).astype(np.float64) @ y[cache]
        if not cache.all():
            dense = np.zeros((self.n, n_classes))
            np.add.at(dense, seed_rows[~cache], y[~cache])
            f += block_cg(self.a, dense, x0=dense, rtol=self.rtol, maxiter=self.maxiter)
        return np.clip(f, 0.0, None)


class TransductiveContext:
    """Every image's embedding and what transductive heads derive from it, computed once.

    x (N, D) float32: the embeddings of all images in index order (labeled, unlabeled, test).
    device: where the kNN search runs (src/neighbors.py). Heads given a context take row indices
    (int arrays into x) instead of embeddings."""

    def __init__(self, x: np.ndarray, device: torch.device | None = None):
        self.x = np.asarray(x, np.float32)
        self.device = device
        self._features: dict = {}
        self._graphs: dict = {}
        self._propagators: dict = {}

    def __len__(self) -> int:
        return len(self.x)

    def features(self, method: str, beta: float = 0.5) -> np.ndarray:
        """(N, D) preprocessed features; centring uses the mean over all N images."""
        key = (method, beta)
        if key not in self._features:
            prep = Preprocess(method, beta).fit(self.x)
            self._features[key] = prep(self.x)
        return self._features[key]

    def graph(self, method: str, beta: float, k: int) -> tuple[np.ndarray, np.ndarray]:
        """kNN graph (sims (N, k), idx (N, k)) of the preprocessed features, self excluded; a graph
        with more neighbours serves smaller k (rows are sorted by similarity)."""
        for (m, b, kk), (sims, idx) in self._graphs.items():
            if (m, b) == (method, beta) and kk >= k:
                return sims[:, :k], idx[:, :k]
        feats = self.features(method, beta)
        self._graphs[(method, beta, k)] = knn_graph(feats, min(k, len(feats) - 1), self.device)
        return self._graphs[(method, beta, k)]

    def propagation(self, method: str, beta: float, k: int, alpha: float, gamma: float) -> LabelPropagation:
        key = (method, beta, k, alpha, gamma)
        if key not in self._propagators:
            self._propagators[key] = LabelPropagation(*self.graph(method, beta, k), alpha=alpha, gamma=gamma)
        return self._propagators[key]
