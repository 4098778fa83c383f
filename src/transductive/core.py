"""Shared numerics of few-shot inference: feature preprocessing, prototypes, softmax, Sinkhorn
balancing and the softmax information objective. Used by the heads (src/heads), the pseudo-labelers
(src/pseudo/labelers.py) and the transductive methods (src/transductive/methods.py).

Shapes: support / query features (S, D) / (Q, D) float32, labels (S,) int in 0..C-1, class
probabilities (Q, C) with rows summing to 1; ``present`` (C,) bool marks the classes with at least
one support row (absent classes get probability exactly 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Feature preprocessing (one shared step; heads.transductive_features selects it):
#   none        features as given
#   power       power transform only (PT-MAP's eq. 1, Hu et al. 2021, as easyfsl applies it)
#   l2n         L2-normalise rows
#   cl2n        L2-normalise, subtract the mean feature, L2-normalise (SimpleShot, Wang et al. 2019)
#   power_l2n   power transform, L2-normalise
#   power_cl2n  power transform, L2-normalise, centre, L2-normalise (PT-MAP, Hu et al. 2021)
FEATURES = ("none", "power", "l2n", "cl2n", "power_l2n", "power_cl2n")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero). float32."""
    x = np.asarray(x, dtype=np.float32)
    # einsum row norms: a quarter of np.linalg.norm(axis=1)'s time on (60,000, 128) float32
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    return x * (1.0 / np.maximum(norm, np.float32(eps)))[:, None]


def power_transform(x: np.ndarray, beta: float = 0.5) -> np.ndarray:
    """sign(x) |x|^beta (Hu et al. 2021, eq. 1): compresses the heavy tail of post-ReLU features and
    makes class clusters more Gaussian. On non-negative features this is x^beta, PT-MAP's transform;
    the sign keeps features of heads that are not post-ReLU (metric embeddings) ordered."""
    x = np.asarray(x, dtype=np.float32)
    return np.sign(x) * np.abs(x) ** np.float32(beta)


def center_normalize(x: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """CL2N (SimpleShot, Wang et al. 2019): subtract `mean` (default: the rows' own mean), L2-normalise.
    Pooled post-ReLU features share a large common direction (mean cosine ~0.9 on the demo); removing
    it lets cosine similarities separate classes (k-means mapping 0.23 -> 0.45 on the demo)."""
    x = np.asarray(x, dtype=np.float32)
    return l2_normalize(x - (x.mean(0, keepdims=True) if mean is None else mean))


@dataclass
class Preprocess:
    """One feature transform for support, queries and any later rows: ``fit`` on the transductive set
    (the mean for centring comes from those rows), then call on any rows.

        prep = Preprocess("power_cl2n").fit(np.concatenate([support_x, query_x]))
        fs, fq = prep(support_x), prep(query_x)
    """

    method: str = "l2n"
    beta: float = 0.5  # power transform exponent
    mean: np.ndarray | None = None  # (1, D) centring vector, set by fit

    def __post_init__(self) -> None:
        if self.method not in FEATURES:
            raise ValueError(f"feature preprocessing: expected one of {', '.join(FEATURES)}, got {self.method!r}")

    def _before_centring(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.method == "none":
            return x
        if self.method.startswith("power"):
            x = power_transform(x, self.beta)
        return x if self.method == "power" else l2_normalize(x)

    def fit(self, x: np.ndarray) -> "Preprocess":
        if self.method.endswith("cl2n"):
            self.mean = self._before_centring(x).mean(0, keepdims=True)
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = self._before_centring(x)
        if self.method.endswith("cl2n"):
            if self.mean is None:
                raise ValueError("Preprocess: call fit before transforming (centring needs a mean)")
            z = center_normalize(z, self.mean)
        return z


NARROW = 16  # class axes up to this width take the column-wise paths below; wider ones numpy's own reductions


def column_max(z: np.ndarray) -> np.ndarray:
    """(Q,) maxima of (Q, C) by C column-wise passes (scripts/row_reductions.py times it)."""
    m = z[:, 0].copy()
    for k in range(1, z.shape[1]):
        np.maximum(m, z[:, k], out=m)
    return m


def row_max(z: np.ndarray) -> np.ndarray:
    """max over the class axis of (Q, C), as (Q, 1). numpy reduces a short last axis one row at a time
    (3.3 ms for 60,000 x 10 float32); C column-wise maxima take 0.6 ms. From 32 columns on the strided
    column passes lose (micro-benchmark, docs/RESULTS.md), so wide axes use z.max(axis=1)."""
    if z.shape[1] > NARROW:
        return z.max(axis=1, keepdims=True)
    return column_max(z)[:, None]


def row_sum(z: np.ndarray) -> np.ndarray:
    """sum over the class axis of (Q, C), as (Q, 1): for a narrow axis a matrix-vector product (0.1-0.2 ms
    for 60,000 x 10 against 1.0 ms for z.sum(1)), else z.sum(axis=1)."""
    if z.shape[1] > NARROW:
        return z.sum(axis=1, keepdims=True)
    return (z @ np.ones(z.shape[1], z.dtype))[:, None]


def softmax(logits: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """Row softmax (Q, C) float32; with `present` (C,) bool, absent classes get exactly 0."""
    z = np.asarray(logits)
    if present is not None and not present.all():
        z = np.where(present[None, :], z, -np.inf)
    if not z.size:
        return z.astype(np.float32)
    e = np.exp(z - row_max(z))
    e /= row_sum(e)
    return e.astype(np.float32, copy=False)


def one_hot(y: np.ndarray, n_classes: int, weight: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
    """(S, C) one-hot rows of labels y (S,), scaled by weight (S,) when given."""
    out = np.zeros((len(y), n_classes), dtype)
    out[np.arange(len(y)), y] = 1.0 if weight is None else weight
    return out


def compute_prototypes(x: np.ndarray, labels: np.ndarray, n_classes: int, weight: np.ndarray | None = None,
                       cosine: bool = True) -> np.ndarray:
    """Class prototypes (C, D): the (weighted) mean of each class's rows (Snell et al. 2017).

    labels: int (S,) class ids, or float (S, C) soft assignments (each row's weight per class, as
    in soft k-means and PT-MAP). weight (S,): per-row weight on top. cosine=True averages
    L2-normalised rows and re-normalises the mean. Classes without mass get a zero row."""
    x = l2_normalize(x) if cosine else np.asarray(x, np.float32)
    labels = np.asarray(labels)
    assign = labels.astype(np.float32) if labels.ndim == 2 else one_hot(labels, n_classes)
    if weight is not None:
        assign = assign * np.asarray(weight, np.float32)[:, None]
    protos = (assign.T @ x) / np.maximum(assign.sum(0), 1e-12)[:, None]
    return l2_normalize(protos) if cosine else protos


def prototype_logits(x: np.ndarray, protos: np.ndarray, cosine: bool, temperature: float) -> np.ndarray:
    """cosine: temperature * cos(x, p); euclidean: -||x - p||^2 (Snell et al. 2017). (Q, C)."""
    x = np.asarray(x, np.float32)
    if cosine:
        return temperature * (l2_normalize(x) @ protos.T)
    return -squared_distances(x, protos)


def squared_distances(x: np.ndarray, protos: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    """||x_i - p_k||^2 (Q, C), clipped at 0 (rounding). x_sq (Q, 1): the rows' squared norms, when
    the caller reuses them across many calls (iterative methods over large query sets)."""
    x_sq = np.einsum("ij,ij->i", x, x)[:, None] if x_sq is None else x_sq
    d2 = x_sq - 2 * (x @ protos.T) + (protos * protos).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def sinkhorn(resp: np.ndarray, present: np.ndarray | None = None, iters: int = 10, tol: float = 0.0,
             scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rescale soft assignments (Q, C) so that each present class receives Q / C_present mass and each
    row sums to 1 (Sinkhorn-Knopp, Cuturi 2013): the prior that the classes are balanced.

    The result is rows-normalised resp * scale for a column scaling `scale` (C,); each of at most
    `iters` steps multiplies it by target / column mass. With tol > 0 it stops once every column
    mass is within tol * Q / C_present of its target. A previous call's scale warm-starts it (PT-MAP's
    centres move a little per step). Returns (float64 (Q, C), rows exactly 1, absent classes 0; scale)."""
    present = np.ones(resp.shape[1], bool) if present is None else present
    r0 = resp[:, present].astype(np.float64) + 1e-12
    target = len(r0) / present.sum()
    v = np.ones(r0.shape[1]) if scale is None else np.asarray(scale, np.float64)[present]
    for _ in range(iters):
        # column masses of rows-normalised r0 * v, without a (Q, C) temporary: two matrix-vector products
        mass = v * (r0.T @ (1.0 / (r0 @ v)))
        if tol > 0 and np.abs(mass - target).max() <= tol * target:
            break
        v = v * (target / mass)
    r = r0 * v
    out = np.zeros_like(resp, dtype=np.float64)
    out[:, present] = r / r.sum(1, keepdims=True)
    full = np.ones(resp.shape[1])
    full[present] = v / v.max()  # only ratios matter; keep the numbers tame
    return out, full


def sinkhorn_balance(resp: np.ndarray, present: np.ndarray | None = None, iters: int = 10,
                     tol: float = 0.0) -> np.ndarray:
    """:func:`sinkhorn` without the scale: (Q, C) float64 balanced assignments."""
    return sinkhorn(resp, present, iters, tol)[0]


def class_balanced_targets(y: np.ndarray, w: np.ndarray, n_classes: int) -> np.ndarray:
    """(S, C) one-hot targets scaled so every present class carries the same total weight and all
    sum to 1. Unbalanced counts (leave-one-out leaves one class an image short) would otherwise
    teach a classifier the support's class frequencies, voting against the held-out image's class."""
    per_class = np.bincount(y, weights=w, minlength=n_classes)
    n_present = int((per_class > 0).sum())
    return one_hot(y, n_classes, w / (per_class[y] * n_present), dtype=np.float64)


def info_objective(logits_s: np.ndarray, target: np.ndarray, logits_q: np.ndarray, present: np.ndarray,
                   cond_weight: float, marginal_weight: float = 0.0, ce_weight: float = 1.0):
    """Loss and its gradients with respect to the logits of

        ce_weight * sum(target * -log p_s) + cond_weight * mean_i H(p_i) - marginal_weight * H(mean_i p_i)

    p = softmax over the present classes. The query terms are transductive fine-tuning's entropy
    (Dhillon et al. 2020) and, with the marginal term, TIM's mutual information (Boudiaf et al. 2020).
    target (S, C): one-hot labels times weights (class_balanced_targets). Returns
    (loss, dL/dlogits_s (S, C), dL/dlogits_q (Q, C))."""
    p = softmax(logits_s, present).astype(np.float64)
    loss = float(-ce_weight * (target * np.log(np.maximum(p, 1e-30))).sum())
    g_s = ce_weight * (p * target.sum(1, keepdims=True) - target)  # dCE/dz
    if not (len(logits_q) and (cond_weight or marginal_weight)):
        return loss, g_s, np.zeros(logits_q.shape, np.float64)
    # The query part works in the logits' dtype (float32 at 60,000 rows halves the memory traffic of
    # TIM's ~10 passes per step) and takes log p from the log-softmax, not log of p: one log per row.
    q = len(logits_q)
    z = np.asarray(logits_q)
    if not present.all():
        z = np.where(present[None, :], z, z.dtype.type(-1e30))  # exp underflows to 0; 0 * -1e30 = 0
    z = z - row_max(z)
    e = np.exp(z)
    s = row_sum(e)
    pq = e / s  # (Q, C)
    lq = z - np.log(s)  # (Q, C) log p
    coef = np.zeros_like(pq)  # g_q = pq * coef
    if cond_weight:
        lq_present = lq if present.all() else np.where(present[None, :], lq, 0)
        h = -np.einsum("ij,ij->i", pq, lq_present)[:, None]  # (Q, 1) entropy per query
        loss += float(cond_weight * h.mean(dtype=np.float64))
        coef -= cond_weight / q * (lq + h)  # dH_i/dz_ik = -p_ik (log p_ik + H_i)
    if marginal_weight:
        marg = (np.ones(q, pq.dtype) @ pq).astype(np.float64) / q  # (C,) mean over queries
        lm = np.log(np.maximum(marg, 1e-30)) * present
        loss -= float(marginal_weight * -(marg * lm).sum())
        # dH(mean p)/dz_ik = -(1/Q) p_ik (log m_k - sum_j p_ij log m_j)
        lm = lm.astype(pq.dtype)
        coef += marginal_weight / q * (lm[None, :] - (pq @ lm)[:, None])
    return loss, g_s, pq * coef


class Adam:
    """Adam (Kingma & Ba 2015) with torch's defaults, on a list of numpy arrays updated in place."""

    def __init__(self, params: list[np.ndarray], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= self.lr * (m / (1 - b1 ** self.t)) / (np.sqrt(v / (1 - b2 ** self.t)) + self.eps)
