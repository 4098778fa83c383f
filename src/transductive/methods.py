"""Transductive few-shot methods on preprocessed features, vectorised over large query sets
(10,000 test images, or all 60,000 images) in numpy: each step is one or two (Q, D) x (D, C)
products plus O(Q C) work.

* :func:`pt_map` - PT-MAP (Hu et al. 2021, "Leveraging the Feature Distribution in Transfer-based
  Few-Shot Learning", Algorithm 1): query soft assignments are the Sinkhorn optimal-transport plan
  to the class centres (cost ||f - c||^2, entropic weight lambda), centres move a fraction `lr`
  towards the assignment-weighted means. The Sinkhorn column constraint is the balanced prior;
  without it the assignments are plain soft k-means posteriors exp(-lambda d^2) / Z.
* :func:`tim_gd` - TIM-GD (Boudiaf et al. 2020, "Transductive Information Maximization for Few-Shot
  Learning", the gradient-descent variant): classifier weights W (C, D), initialised at the class
  means, minimise ce_weight * CE(support) - (marginal_weight * H(Y_Q) - cond_weight * H(Y_Q | X_Q))
  by full-batch Adam; logits -T/2 ||f - w||^2 (the paper's) or T cos(f, w). The marginal entropy
  H(Y_Q) is TIM's own balanced-class prior.
* :func:`rectify_prototypes` - BD-CSPN (Liu et al. 2020, "Prototype Rectification for Few-Shot
  Learning"): queries shifted by the support-query mean difference (cross-class bias), labeled by
  their nearest prototype, and each prototype becomes the exp(eps cos)-weighted mean of its support
  and query rows (intra-class bias). As in easyfsl, every query takes part (not only the top-Z).
  Under the balanced prior the pseudo-labels (and the head's posteriors) come from centred cosines
  (:func:`centred_cosine`): see there why.
* :func:`laplacian_shot` - LaplacianShot (Ziko et al. 2020, "Laplacian Regularized Few-Shot
  Learning"): assignments minimise sum a_iq y_iq - lambda sum_ij w_ij y_i . y_j + entropy over the
  kNN graph of the queries by the paper's bound updates Y <- softmax(-a + lambda W Y), a = squared
  distance to the (rectified) prototypes, stopping when the bound stops moving (rel. 1e-6).

Each returns class probabilities for the queries (Q, C) float64, rows summing to 1, absent classes 0.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from src.transductive.core import (Adam, class_balanced_targets, compute_prototypes, info_objective, l2_normalize,
                                   one_hot, sinkhorn, sinkhorn_balance, softmax, squared_distances)

SINKHORN_ITERS, SINKHORN_TOL = 1000, 1e-3  # balanced prior: class masses within 0.1% of equal


def pt_map(fs: np.ndarray, ys: np.ndarray, fq: np.ndarray, n_classes: int, weight: np.ndarray | None = None,
           steps: int = 10, lr: float = 0.2, lam: float = 10.0, balanced: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """PT-MAP on features fs (S, D), fq (Q, D) (power-transformed and normalised by the caller).
    ys (S,) labels, weight (S,) support row weights. Returns (query probabilities (Q, C), centres (C, D))."""
    present = np.bincount(ys, minlength=n_classes) > 0
    support = one_hot(ys, n_classes, weight)  # (S, C) fixed assignments of the support rows
    centres = compute_prototypes(fs, ys, n_classes, weight, cosine=False)  # euclidean class means
    scale = None  # Sinkhorn column scaling, carried from step to step
    fq_sq = np.einsum("ij,ij->i", fq, fq)[:, None]
    for _ in range(steps):
        assign, scale = pt_map_assign(fq, centres, present, lam, balanced, scale, x_sq=fq_sq)
        assign = assign.astype(np.float32)
        mass = support.sum(0) + assign.sum(0)  # (C,)
        target = (support.T @ fs + assign.T @ fq) / np.maximum(mass, 1e-12)[:, None]
        centres = centres + lr * (target - centres) * present[:, None]
    return pt_map_assign(fq, centres, present, lam, balanced, scale, x_sq=fq_sq)[0], centres


def pt_map_assign(fq: np.ndarray, centres: np.ndarray, present: np.ndarray, lam: float, balanced: bool,
                  scale: np.ndarray | None = None, tol: float | None = None,
                  x_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Soft assignments (Q, C): softmax(-lam ||f - c||^2), Sinkhorn-balanced when `balanced` (the
    optimal transport plan with uniform class marginals). Returns (assignments float64, column scale)."""
    p = softmax(-lam * squared_distances(fq, centres, x_sq).astype(np.float64), present).astype(np.float64)
    if balanced and len(fq):
        return sinkhorn(p, present, SINKHORN_ITERS, SINKHORN_TOL if tol is None else tol, scale)
    return p, scale


def tim_logits(f: np.ndarray, w: np.ndarray, temperature: float, cosine: bool) -> np.ndarray:
    """TIM's classifier: T cos(f, w), or -T/2 ||f - w||^2 (Boudiaf et al. 2020) up to the per-row
    constant -T/2 ||f||^2, which no softmax, loss or gradient of W sees: T f.w - T/2 ||w||^2.
    (N, C) in f's dtype (W, small, is cast to it: float32 features keep the (N, D) x (D, C) product
    in float32)."""
    w = np.asarray(w).astype(f.dtype, copy=False)
    if cosine:
        return temperature * (f @ l2_normalize(w).astype(f.dtype, copy=False).T)
    return temperature * (f @ w.T) - (0.5 * temperature) * (w * w).sum(1)[None, :]


def tim_gd(fs: np.ndarray, ys: np.ndarray, fq: np.ndarray, n_classes: int, weight: np.ndarray | None = None,
           steps: int = 100, lr: float = 1e-3, temperature: float = 15.0, ce_weight: float = 0.1,
           marginal_weight: float = 1.0, cond_weight: float = 0.1,
           cosine: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """TIM-GD on L2-normalised features fs (S, D), fq (Q, D). The support CE is class-balanced
    (class_balanced_targets; equal to TIM's mean CE on a balanced support). The query passes run in
    fq's dtype (float32: 60,000 x 10 logits per step), W and Adam in float64. Returns (query
    probabilities (Q, C), weights W (C, D))."""
    present = np.bincount(ys, minlength=n_classes) > 0
    w_rows = np.ones(len(ys)) if weight is None else np.asarray(weight, np.float64)
    target = class_balanced_targets(ys, w_rows, n_classes)
    # W starts at the class means (both logits; as the paper and easyfsl). Adam's steps are about lr per
    # coordinate whatever the scale of W, so this start, not a normalised one, is part of the method.
    W = compute_prototypes(fs, ys, n_classes, weight, cosine=False).astype(np.float64)
    W[~present] = 1.0 / np.sqrt(fs.shape[1])  # any nonzero row: masked anyway, avoids 0 / 0
    fs64 = np.asarray(fs, np.float64)  # (S, D): tiny, kept exact
    opt = Adam([W], lr)
    for _ in range(steps):
        _, g_s, g_q = info_objective(tim_logits(fs64, W, temperature, cosine), target,
                                     tim_logits(fq, W, temperature, cosine), present, cond_weight,
                                     marginal_weight, ce_weight)
        opt.step([tim_weight_grad(W, fs64, fq, g_s, g_q, temperature, cosine)])
    return softmax(tim_logits(fq, W, temperature, cosine), present).astype(np.float64), W


def tim_weight_grad(W: np.ndarray, fs: np.ndarray, fq: np.ndarray, g_s: np.ndarray, g_q: np.ndarray,
                    temperature: float, cosine: bool) -> np.ndarray:
    """dL/dW (C, D) float64 from the logit gradients g_s (S, C), g_q (Q, C) of :func:`tim_logits`."""
    gf = g_s.T @ fs + (g_q.T.astype(fq.dtype, copy=False) @ fq)  # (C, D): sum_i g_ik f_i
    if cosine:
        norm = np.linalg.norm(W, axis=1, keepdims=True)
        wn = W / norm
        gwn = temperature * gf
        return (gwn - wn * (gwn * wn).sum(1, keepdims=True)) / norm  # through the row normalisation
    # z_ik = T f_i.w_k - T/2 ||w_k||^2  ->  dz_ik/dw_k = T (f_i - w_k)
    g_sum = g_s.sum(0) + g_q.sum(0, dtype=np.float64)
    return temperature * (gf - g_sum[:, None] * W)


def centred_cosine(x: np.ndarray, protos: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """(N, C) cos(x - centre, protos - centre) for rows x (N, D), prototypes (C, D), centre (1, D) or
    None (plain cosine).

    Why the balanced prior needs the centre: pooled post-ReLU features share one large direction
    (mean pairwise cosine ~0.9 after L2N), so each row's cosines to the C prototypes differ by a few
    hundredths and softmax(10 cos) is nearly uniform (mean top probability 0.15 for 10 classes on
    CIFAR-10 test images as pooled pixels). Sinkhorn then equalises the class masses of nearly flat
    rows with small per-class offsets that do not equalise the argmax counts: there the coefficient
    of variation of the predicted class sizes was 0.55 balanced against 0.42 unbalanced, on a
    balanced test set. Measured from the centre of the rows the cosines spread out, the posteriors
    are sharp enough for balanced soft masses to mean balanced decisions (0.05)."""
    return cosines(x, protos, centre)[1 if centre is not None else 0]


def cosines(x: np.ndarray, protos: np.ndarray, centre: np.ndarray | None = None,
            shift: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """For the rows r = x + shift (x (N, D), shift (1, D) or None): (plain cos(r, protos), centred
    cos(r - centre, protos - centre) or None), each (N, C) float32. One (N, D) x (D, C + 2) product
    and the squared norms of x: no (N, D) temporary (r, r - centre or normalised rows). Expanded:
    (r - c).(p - c) = r.(p - c) - c.(p - c), r.p = r.(p - c) + r.c, |r - c|^2 = |r|^2 - 2 r.c + c.c,
    with r.v = x.v + shift.v and |r|^2 = |x|^2 + 2 x.shift + shift.shift. The product takes p - c,
    not p, so that the small centred dot products are not differences of large ones."""
    x = np.asarray(x, np.float32)
    protos = np.asarray(protos, np.float32)
    n_classes = len(protos)
    tiny = np.float32(1e-12)
    c = None if centre is None else np.asarray(centre, np.float32).reshape(1, -1)
    base = protos if c is None else protos - c  # (C, D)
    extra = [v for v in (c, None if shift is None else np.asarray(shift, np.float32).reshape(1, -1)) if v is not None]
    rows = np.concatenate([base, *extra])  # (C + k, D): p (or p - c), then c, then shift
    dots = x @ rows.T  # (N, C + k) x.v
    r_sq = np.einsum("ij,ij->i", x, x)  # (N,) |x|^2, then |r|^2
    if shift is not None:
        s = rows[-1]
        dots[:, :-1] += rows[:-1] @ s  # r.v = x.v + shift.v
        r_sq += 2 * dots[:, -1] + s @ s
    r_norm = np.maximum(np.sqrt(r_sq), tiny)[:, None]  # (N, 1) |r|
    p_norm = np.maximum(np.sqrt((protos * protos).sum(1)), tiny)[None, :]  # (1, C) |p|
    if c is None:
        return dots[:, :n_classes] / (r_norm * p_norm), None
    r_c = dots[:, n_classes:n_classes + 1]  # (N, 1) r.c
    plain = (dots[:, :n_classes] + r_c) / (r_norm * p_norm)
    num = dots[:, :n_classes] - (base @ c[0])[None, :]  # (N, C) (r - c).(p - c)
    rc_norm = np.sqrt(np.maximum(r_sq[:, None] - 2 * r_c + (c * c).sum(), 0))  # (N, 1) |r - c|
    pc_norm = np.sqrt((base * base).sum(1))[None, :]  # (1, C) |p - c|
    return plain, num / (np.maximum(rc_norm, tiny) * np.maximum(pc_norm, tiny))


def rectify_prototypes(fs: np.ndarray, ys: np.ndarray, fq: np.ndarray, n_classes: int,
                       weight: np.ndarray | None = None, eps: float = 10.0, balanced: bool = False) -> np.ndarray:
    """BD-CSPN prototype rectification (Liu et al. 2020, Sec. 3.2). fs (S, D), fq (Q, D) L2-normalised,
    ys (S,) labels, weight (S,) support row weights.

    Cross-class bias: every query moves by the shifting term xi = mean(fs) - mean(fq). Intra-class
    bias: each shifted query takes the label of its most similar prototype, and each prototype
    becomes the weighted mean of its support and pseudo-labeled rows X', weights
    w_i = exp(eps cos(X'_i, P_n)) / sum_j exp(eps cos(X'_j, P_n)) over the rows of class n (the paper's
    weighted prototype; every query takes part, as in easyfsl, rather than the top Z per class).

    With `balanced` the labels are the argmax of the Sinkhorn-balanced softmax(eps cos) of the
    cosines measured from the centre of the shifted queries, mean(fs) (:func:`centred_cosine`: on
    uncentred features the balancing does not balance the labels). The weights keep the paper's
    plain cosine. Returns (C, D) float32, not re-normalised (as in the paper and easyfsl)."""
    present = np.bincount(ys, minlength=n_classes) > 0
    w = np.ones(len(ys), np.float32) if weight is None else np.asarray(weight, np.float32)
    protos = compute_prototypes(fs, ys, n_classes, w, cosine=False)  # (C, D) class means P_n
    if not len(fq):
        return protos
    centre = fs.mean(0, keepdims=True)  # (1, D): mean of the support and, after the shift, of the queries
    xi = centre - fq.mean(0, keepdims=True)  # (1, D): the shifted queries are fq + xi (never formed)
    # (Q, C) cos(X'_i, P_n), and with `balanced` the same measured from the centre
    cos_q, centred = cosines(fq, protos, centre if balanced else None, shift=xi)
    if balanced:
        p = softmax(eps * centred, present)  # (Q, C)
        label = sinkhorn_balance(p, present, iters=SINKHORN_ITERS, tol=SINKHORN_TOL).argmax(1)
    else:
        label = np.where(present[None, :], cos_q, -np.inf).argmax(1)  # (Q,)
    cos_s = (l2_normalize(fs) @ l2_normalize(protos).T)[np.arange(len(ys)), ys]  # (S,)
    # exp(eps (cos - 1)): the paper's exp(eps cos) shifted by a constant that cancels per class.
    ws = w * np.exp(eps * (cos_s - 1.0))  # (S,)
    wq = np.exp(eps * (cos_q[np.arange(len(fq)), label] - 1.0)).astype(np.float32)  # (Q,)
    mass_q = np.bincount(label, weights=wq, minlength=n_classes)  # (C,)
    mass = np.bincount(ys, weights=ws, minlength=n_classes) + mass_q
    # (C, D) sum_i w_i X'_i, the query rows' as sum_i w_i fq_i + (sum_i w_i) xi
    sums = one_hot(ys, n_classes, ws).T @ fs + one_hot(label, n_classes, wq).T @ fq + mass_q[:, None] * xi
    return (sums / np.maximum(mass, 1e-30)[:, None]).astype(np.float32)


def laplacian_shot(fq: np.ndarray, protos: np.ndarray, kernel: sp.spmatrix, present: np.ndarray,
                   lam: float = 0.7, steps: int = 20) -> np.ndarray:
    """LaplacianShot bound updates (Ziko et al. 2020, Algorithm 1). fq (Q, D), protos (C, D),
    kernel (Q, Q) sparse kNN affinities w_ij. Returns assignments (Q, C) float64."""
    a = squared_distances(fq, protos).astype(np.float64)  # unary: distance to each prototype
    a[:, ~present] = np.inf
    y = softmax(-a, present).astype(np.float64)
    old = np.inf
    for i in range(steps):
        y = softmax(-a + lam * (kernel @ y), present).astype(np.float64)
        bound = laplacian_bound(y, a, kernel, lam)
        if i > 1 and abs(bound - old) <= 1e-6 * abs(old):
            break
        old = bound
    return y


def laplacian_bound(y: np.ndarray, a: np.ndarray, kernel: sp.spmatrix, lam: float) -> float:
    """The paper's upper bound (eq. 7): sum y log y + a . y - lambda (W y) . y, absent classes skipped."""
    ay = np.where(np.isfinite(a), a, 0.0) * y
    return float((y * np.log(y + 1e-12) + ay - lam * (kernel @ y) * y).sum())


def knn_kernel(neighbours: np.ndarray, n: int) -> sp.csr_matrix:
    """Binary kNN affinity (n, n): w_ij = 1 when j is among i's neighbours (rows of `neighbours`,
    -1 = none), as LaplacianShot's W."""
    rows = np.repeat(np.arange(len(neighbours)), neighbours.shape[1])
    cols = neighbours.ravel()
    keep = cols >= 0
    return sp.csr_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(n, n))
