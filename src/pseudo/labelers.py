"""Pseudo-labelers: each maps the current embeddings plus the labeled images to class
probabilities for EVERY image, (N, C) float32 rows summing to 1. Label = argmax, confidence = max.

    ctx = LabelingContext(emb, labeled_idx, labeled_y, n_classes, cfg.pseudo, device)
    probs = LABELERS.get("propagation")(ctx)          # (N, C)

Registered labelers:

* ``propagation`` - label spreading over the symmetric normalised kNN graph (Zhou et al. 2004,
  "Learning with Local and Global Consistency"), solved with conjugate gradient as in Iscen et al.
  2019, seeded with the labeled images only.
* ``kmeans`` - faiss spherical k-means with over-clustering; clusters mapped to classes through the
  labeled images (Hungarian assignment when clusters == classes, else majority vote of the labeled
  members, nearest class prototype for clusters without one).
* ``scan`` - SCAN-style clustering head (Van Gansbeke et al. 2020): neighbour consistency + entropy,
  then self-labeling on confident clusters; here the head sits on the frozen embeddings (the encoder
  itself is trained by self-training), several heads trained at once and the lowest-loss one kept.
* ``prototype`` - cosine class prototypes from labeled (+ previously selected pseudo-labeled) images,
  refined by a few transductive soft k-means steps (Ren et al. 2018).
* ``knn`` - similarity-weighted kNN vote among labeled (+ previously selected pseudo-labeled) images.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from src.config import PseudoCfg
from src.errors import UserError
from src.neighbors import kmeans, knn_search
from src.registry import Registry
from src.runtime import cpu_threads
from src.transductive import TransductiveContext, block_cg, compute_prototypes, propagation_operator, softmax

LABELERS = Registry("labeler")


@dataclass
class LabelingContext:
    emb: np.ndarray  # (N, D) float32, L2-normalised, every image in index order
    labeled_idx: np.ndarray  # (L,) rows with a known class
    labeled_y: np.ndarray  # (L,) class ids 0..C-1
    n_classes: int
    cfg: PseudoCfg
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    extra_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # selected pseudo rows
    extra_y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # their labels
    progress: bool = False
    _context: TransductiveContext | None = None

    def __post_init__(self) -> None:
        check_classes(self.labeled_y, self.n_classes)

    def graph(self) -> tuple[np.ndarray, np.ndarray]:
        """kNN graph (sims (N, k), idx (N, k)) of the embeddings (already preprocessed by the stage),
        computed once and shared (the same cache the transductive heads use)."""
        if self._context is None:
            self._context = TransductiveContext(self.emb, self.device)
        return self._context.graph("none", 0.5, self.cfg.knn_k)

    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """Labeled rows plus the previous round's selected pseudo-labeled rows: (idx, y)."""
        return (np.concatenate([self.labeled_idx, self.extra_idx]).astype(np.int64),
                np.concatenate([self.labeled_y, self.extra_y]).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
def check_classes(labeled_y: np.ndarray, n_classes: int, where: str = "labeled images") -> None:
    """Every class needs at least one labeled image: it seeds propagation, names clusters and
    defines prototypes. Raises UserError naming the first missing class."""
    counts = np.bincount(np.asarray(labeled_y, np.int64), minlength=n_classes)[:n_classes]
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise UserError(f"{where}: class {int(missing[0])} has no labeled image ({n_classes} classes, labeled counts "
                        f"{counts.tolist()}); every class needs at least one")


def cosine_softmax(x: np.ndarray, centers: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(cos(x_i, c_k) / T) over k: (N, D), (K, D) unit rows -> (N, K)."""
    return softmax(x @ centers.T / temperature)


def map_clusters_to_classes(labeled_clusters: np.ndarray, labeled_y: np.ndarray, n_clusters: int,
                            n_classes: int, prior: np.ndarray | None = None) -> np.ndarray:
    """Cluster -> class mapping through the labeled images. Returns Q (K, C) one-hot rows.

    labeled_clusters (L,): cluster of each labeled image; prior (K, C): a tie-breaker score (e.g.
    cosine of cluster centroid to class prototype), used alone for clusters without labeled members.
    K == C (or K < C): one-to-one Hungarian assignment maximising the labeled images that land in
    their class's cluster (scipy linear_sum_assignment). K > C: many-to-one, majority vote per cluster.
    """
    counts = np.zeros((n_clusters, n_classes), np.float64)
    np.add.at(counts, (labeled_clusters, labeled_y), 1.0)
    # Prior scaled below one vote: it only breaks ties and fills clusters without labeled images.
    score = counts + (1e-3 * (prior - prior.min()) / max(np.ptp(prior), 1e-12) if prior is not None else 0.0)
    q = np.zeros((n_clusters, n_classes), np.float32)
    if n_clusters <= n_classes:
        rows, cols = linear_sum_assignment(score, maximize=True)
        q[rows, cols] = 1.0
    else:
        q[np.arange(n_clusters), score.argmax(1)] = 1.0
    return q


def _cluster_prior(emb: np.ndarray, post: np.ndarray, ctx: LabelingContext) -> np.ndarray:
    """(K, C) cosine between soft cluster centroids and labeled class prototypes."""
    centroids = compute_prototypes(emb, post, post.shape[1])  # soft cluster means
    protos = compute_prototypes(emb[ctx.labeled_idx], ctx.labeled_y, ctx.n_classes)
    return centroids @ protos.T


def _renorm(p: np.ndarray) -> np.ndarray:
    """Rows to probabilities; all-zero rows (nothing reached them) become uniform."""
    s = p.sum(1, keepdims=True)
    return np.where(s > 0, p / np.maximum(s, 1e-30), 1.0 / p.shape[1]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Labelers
# ---------------------------------------------------------------------------------------------
@LABELERS.register("propagation")
def propagation(ctx: LabelingContext) -> np.ndarray:
    """Label spreading: solve (I - alpha S) F = Y, S = D^-1/2 W D^-1/2 over the kNN graph,
    Y one-hot on the labeled rows. Class-mass normalisation, then rows -> probabilities."""
    cfg = ctx.cfg
    a = propagation_operator(*ctx.graph(), alpha=cfg.propagation_alpha, gamma=cfg.propagation_gamma)
    y = np.zeros((len(ctx.emb), ctx.n_classes))
    y[ctx.labeled_idx, ctx.labeled_y] = 1.0
    f = np.clip(block_cg(a, y, x0=y, rtol=1e-6, maxiter=cfg.propagation_iters), 0.0, None)
    f /= np.maximum(f.sum(0, keepdims=True), 1e-30)  # class-mass normalisation (Zhu et al. 2003)
    return _renorm(f)


@LABELERS.register("kmeans")
def kmeans_labeler(ctx: LabelingContext) -> np.ndarray:
    """Spherical k-means with K = kmeans_clusters >= C; p(class|x) = sum over clusters mapped to
    the class of the soft cluster posterior softmax(cos(x, centroid) / T)."""
    cfg = ctx.cfg
    centroids, assign = kmeans(ctx.emb, cfg.kmeans_clusters, cfg.kmeans_iters, ctx.seed, ctx.device)
    post = cosine_softmax(ctx.emb, centroids, cfg.temperature)  # (N, K)
    q = map_clusters_to_classes(assign[ctx.labeled_idx], ctx.labeled_y, len(centroids), ctx.n_classes,
                                prior=_cluster_prior(ctx.emb, post, ctx))
    return _renorm(post @ q)


@LABELERS.register("prototype")
def prototype(ctx: LabelingContext) -> np.ndarray:
    """Cosine prototypes of the support set, refined by soft k-means steps over all rows."""
    cfg = ctx.cfg
    idx, y = ctx.support()
    onehot = np.eye(ctx.n_classes, dtype=np.float32)[y]
    protos = compute_prototypes(ctx.emb[idx], y, ctx.n_classes)
    for _ in range(cfg.prototype_refine_iters):
        w = cosine_softmax(ctx.emb, protos, cfg.temperature)  # (N, C) soft memberships
        w[idx] = onehot  # support rows keep their (pseudo-)label
        protos = compute_prototypes(ctx.emb, w, ctx.n_classes)
    return cosine_softmax(ctx.emb, protos, cfg.temperature)


@LABELERS.register("knn")
def knn_labeler(ctx: LabelingContext) -> np.ndarray:
    """Vote of the k most similar support rows, each weighted exp(cos / T); a row never votes for itself."""
    cfg = ctx.cfg
    idx, y = ctx.support()
    sims, nbr = knn_search(ctx.emb, ctx.emb[idx], cfg.knn_k + 1, ctx.device)
    w = np.exp((sims - 1.0) / cfg.temperature)  # shifted by the max cosine (1) for stability
    w[idx[nbr] == np.arange(len(ctx.emb))[:, None]] = 0.0
    votes = np.zeros((len(ctx.emb), ctx.n_classes), np.float64)
    np.add.at(votes, (np.repeat(np.arange(len(ctx.emb)), nbr.shape[1]), y[nbr].ravel()), w.ravel())
    return _renorm(votes)



@LABELERS.register("scan")
def scan(ctx: LabelingContext) -> np.ndarray:
    """SCAN clustering head on the frozen embeddings, then self-labeling, then cluster -> class."""
    with cpu_threads(ctx.device, 1):  # a linear head: tiny kernels
        return _scan(ctx)


def _scan(ctx: LabelingContext) -> np.ndarray:
    cfg = ctx.cfg
    dev = ctx.device
    gen = torch.Generator().manual_seed(ctx.seed)
    x = torch.from_numpy(np.ascontiguousarray(ctx.emb, dtype=np.float32)).to(dev)  # (N, D)
    nbr = torch.from_numpy(ctx.graph()[1]).to(dev)  # (N, k)
    n, k_clusters, n_heads = len(x), cfg.scan_clusters or ctx.n_classes, cfg.scan_heads
    torch.manual_seed(ctx.seed)
    heads = torch.nn.Linear(x.shape[1], n_heads * k_clusters).to(dev)
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.scan_lr, weight_decay=1e-4)
    bs = _scan_batch(cfg, n)
    steps = n // bs
    for _ in tqdm(range(cfg.scan_epochs), desc="scan", disable=not ctx.progress, mininterval=2):
        perm = torch.randperm(n, generator=gen).to(dev)
        head_loss = torch.zeros(n_heads, device=dev)  # summed over the epoch; read once at the end
        for s in range(steps):
            anchor = perm[s * bs:(s + 1) * bs]
            pick = torch.randint(nbr.shape[1], (len(anchor),), generator=gen).to(dev)
            neighbour = nbr[anchor, pick]
            pa = heads(x[anchor]).view(-1, n_heads, k_clusters).softmax(-1)  # (B, H, K)
            pn = heads(x[neighbour]).view(-1, n_heads, k_clusters).softmax(-1)
            consistency = -torch.log((pa * pn).sum(-1).clamp_min(1e-8)).mean(0)  # (H,)
            mean_p = pa.mean(0)  # (H, K)
            neg_entropy = (mean_p * torch.log(mean_p.clamp_min(1e-8))).sum(-1)  # (H,)
            loss = consistency + cfg.scan_entropy_weight * neg_entropy
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            head_loss += loss.detach()
    best = int(head_loss.argmin()) if steps else 0
    head = torch.nn.Linear(x.shape[1], k_clusters).to(dev)
    with torch.no_grad():
        head.weight.copy_(heads.weight.view(n_heads, k_clusters, -1)[best])
        head.bias.copy_(heads.bias.view(n_heads, k_clusters)[best])
    _self_label(head, x, k_clusters, cfg, gen)
    with torch.no_grad():
        post = head(x).softmax(-1).cpu().numpy().astype(np.float32)  # (N, K)
    q = map_clusters_to_classes(post[ctx.labeled_idx].argmax(1), ctx.labeled_y, k_clusters, ctx.n_classes,
                                prior=_cluster_prior(ctx.emb, post, ctx))
    return _renorm(post @ q)


def _scan_batch(cfg: PseudoCfg, n: int) -> int:
    """Batch size, shrunk on small sets so that an epoch has at least 8 steps (the head needs steps)."""
    return max(1, min(cfg.scan_batch_size, max(32, n // 8), n))


def _self_label(head: torch.nn.Linear, x: torch.Tensor, k_clusters: int, cfg: PseudoCfg,
                gen: torch.Generator) -> None:
    """SCAN step 3: cross-entropy on the head's own confident predictions (max prob >= threshold),
    class-balanced weights, input perturbed by feature dropout (the 'strong augmentation' here)."""
    if cfg.scan_self_label_epochs <= 0:
        return
    opt = torch.optim.Adam(head.parameters(), lr=cfg.scan_lr, weight_decay=1e-4)
    n = len(x)
    bs = _scan_batch(cfg, n)
    for _ in range(cfg.scan_self_label_epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for s in range(n // bs):
            xb = x[perm[s * bs:(s + 1) * bs]]
            with torch.no_grad():
                conf, target = head(xb).softmax(-1).max(-1)
                mask = (conf >= cfg.scan_self_label_threshold).float()
                counts = torch.bincount(target, weights=mask, minlength=k_clusters)
                weight = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
                weight = weight / weight.sum().clamp_min(1e-12) * (counts > 0).sum()
            loss = F.cross_entropy(head(F.dropout(xb, 0.25)), target, reduction="none")
            loss = (loss * mask * weight[target]).sum() / mask.sum().clamp_min(1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
