"""Clustering-based self-supervised objectives (Caron et al. 2020, "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments", arXiv:2006.09882), registered into OBJECTIVES:

* ``swav`` -- online prototypes: each global view's scores against K L2-normalised prototypes are
  turned into soft codes by Sinkhorn-Knopp equipartition (:func:`sinkhorn_knopp`), and every other
  view (local crops included) predicts those codes (swapped prediction). Optional queue of past
  projections for small batches and optional prototype freezing at the start, as in the paper.
* ``deepcluster`` -- DeepCluster-v2 (same paper, appendix; Caron et al. 2018 for DeepCluster): a
  memory bank holds the L2-normalised projection of every image's two global views; before each
  epoch, spherical k-means (faiss, src.neighbors.kmeans) of the bank gives centroids (the
  prototypes, not trained) and each image's cluster (the target); every view of an image is
  classified into its image's cluster by cross-entropy on cos / T. One head per k in
  ``ssl.deepcluster_prototypes`` (several k's), losses averaged. The bank is refreshed during the
  epoch with the views' projections (no extra pass) and filled once, from the clean images, at the
  first epoch of a process (start or resume).

Shapes: B images per step (per process), V global views (2), L local crops, P = ssl.proj_dim,
K prototypes, N training images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.config import SSLCfg
from src.errors import UserError
from src.models.encoder import embed
from src.neighbors import kmeans
from src.ssl.base import OBJECTIVES, Objective, mlp
from src.train_utils import all_gather_with_grad, all_reduce, broadcast_from_main, dist_info


def _fp32(device: torch.device):
    """Prototype scores in fp32 even inside bf16 autocast: Sinkhorn exponentiates them / epsilon."""
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """SwAV codes of this process's rows. scores: (B, K) cosines to the prototypes -> (B, K), each row
    a distribution over prototypes.

    Q = exp(scores / epsilon) / total, then `iters` times: scale every prototype's column to mass
    1/K, then every sample's row to mass 1/B (B = global batch); returned times B (rows sum to 1).
    This is Cuturi's (2013) Sinkhorn-Knopp for the entropy-regularised transport to the uniform
    marginals, with the paper's 3 iterations. Under DDP the column sums and the total are summed over
    processes (all_reduce), so the codes equal those of the single-process global batch. The global
    max is subtracted first: a common factor that the first normalisation cancels, so exp cannot
    overflow (exp(1 / epsilon) does in float32 below epsilon = 0.0113). Entries more than ~100 epsilon
    below the max still underflow to 0, as in the paper's code: keep epsilon >= 0.02 or so."""
    s = scores.float()
    q = torch.exp((s - all_reduce(s.max(), "max")) / epsilon)
    b, k = q.shape[0] * dist_info().world, q.shape[1]
    q /= all_reduce(q.sum())
    for _ in range(iters):
        q /= all_reduce(q.sum(0, keepdim=True)) * k  # each prototype: total mass 1/K
        q /= q.sum(1, keepdim=True) * b  # each sample: mass 1/B
    return q * b


def soft_cross_entropy(codes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_k codes_ik log softmax(logits_i)_k; codes (B, K) rows summing to 1."""
    return -(codes * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def _positive(cfg: SSLCfg, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise UserError(f"ssl.{key}: must be positive, got {getattr(cfg, key)}")


@OBJECTIVES.register("swav")
class SwAV(Objective):
    """SwAV: projector (2-layer MLP) -> L2-normalised z; scores z . c_k / T against K prototypes,
    weight-normalised in the forward pass (the paper re-normalises them in place after each step;
    both keep |c_k| = 1 in the scores). Loss: for each global view i, codes q_i = Sinkhorn(scores_i)
    (no gradient); every other view v predicts them: mean_{v != i} H(q_i, softmax(scores_v / T)),
    averaged over i.

    ssl.swav_queue_length > 0: the last L projections of each global view (this process's, as in the
    paper) join the Sinkhorn batch once the queue is full, so equipartition holds over B + L samples
    when B is small next to K; only the batch's codes are used. The queue is a plain attribute,
    not a buffer: DDP would overwrite every process's queue with rank 0's; after a resume it
    refills. ssl.swav_freeze_prototypes_steps: no gradient reaches the prototypes for the first
    steps (their value still enters the loss, so DDP sees the parameter used every step)."""

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__(cfg, encoder)
        self.uses_local = cfg.n_local_crops > 0
        self.projector = mlp(encoder.dim, cfg.proj_hidden, cfg.proj_dim)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(cfg.swav_prototypes, cfg.proj_dim), dim=1))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards so far (freezing)
        self.queue: torch.Tensor | None = None  # (V, L, P) float32, newest first
        self.queue_filled = 0  # rows of the queue holding projections (a host int: no device sync)

    @classmethod
    def check_config(cls, cfg: SSLCfg) -> None:
        _positive(cfg, "swav_prototypes", "swav_temperature", "swav_epsilon", "swav_sinkhorn_iters")
        for key in ("swav_queue_length", "swav_freeze_prototypes_steps"):
            if getattr(cfg, key) < 0:
                raise UserError(f"ssl.{key}: must be >= 0, got {getattr(cfg, key)}")

    def prototype_weights(self) -> torch.Tensor:
        """(K, P) unit prototypes; while frozen, their gradient is multiplied by 0 (on device: no sync)."""
        w = F.normalize(self.prototypes.float(), dim=1)
        if self.cfg.swav_freeze_prototypes_steps > 0:
            on = (self.steps >= self.cfg.swav_freeze_prototypes_steps).to(w.dtype)
            w = w.detach() + (w - w.detach()) * on
        return w

    def codes(self, view: int, scores: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes (B, K) of one global view's scores (B, K), with the queue when it is full."""
        b = len(scores)
        if self.queue is not None and self.queue_filled >= self.queue.shape[1]:
            scores = torch.cat([self.queue[view] @ w.T, scores])
        return sinkhorn_knopp(scores, self.cfg.swav_epsilon, self.cfg.swav_sinkhorn_iters)[-b:]

    def forward(self, feats, local_feats, views, encoder):
        all_feats = list(feats) + list(local_feats)
        n_global, b = len(feats), len(feats[0])
        z = self.projector(torch.cat(all_feats))
        with _fp32(z.device):
            z = F.normalize(z.float(), dim=1)  # (V_all*B, P)
            w = self.prototype_weights()
            scores = (z @ w.T).split([len(f) for f in all_feats])  # V_all x (B, K) cosines
            loss = z.new_zeros(())
            for i in range(n_global):
                q = self.codes(i, scores[i].detach(), w.detach())
                others = [v for v in range(len(all_feats)) if v != i]
                t = self.cfg.swav_temperature
                loss = loss + sum(soft_cross_entropy(q, scores[v] / t) for v in others) / len(others)
        if self.training:
            self._enqueue(z[:n_global * b].detach().view(n_global, b, -1))
            self.steps += 1
        return loss / n_global

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        """z (V, B, P): newest rows first, the oldest drop out."""
        length = self.cfg.swav_queue_length
        if length <= 0:
            return
        if self.queue is None or self.queue.device != z.device:
            self.queue, self.queue_filled = z.new_zeros(z.shape[0], length, z.shape[2]), 0
        self.queue = torch.cat([z, self.queue], dim=1)[:, :length]
        self.queue_filled = min(self.queue_filled + z.shape[1], length)


class _Projection(nn.Module):
    """encoder -> projector for src.models.encoder.embed (which L2-normalises the output). Calls the
    encoder's eager forward: a torch.compile'd encoder would recompile for the ragged last batch."""

    def __init__(self, encoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.dim = projector[-1].out_features
        self.training = encoder.training  # embed() restores this mode on both modules

    def forward(self, x):
        return self.projector(self.encoder.forward(x))


@OBJECTIVES.register("deepcluster")
class DeepClusterV2(Objective):
    """DeepCluster-v2 (see the module docstring). Needs each batch's image rows (``rows``, given by
    the batched augmentation path) to read targets from and write projections to the memory bank.

    State (plain attributes, not buffers: DDP would broadcast them every step; all of it is rebuilt
    by on_epoch_start after a resume):
      memory       (2, N, P) float32: latest L2-normalised projection of each image's global views
      centroids    list of (k_h, P) unit centroids, one per head
      assignments  (H, N) int64: each image's cluster in each head

    Under DDP every process writes the projections of the whole global batch (all_gather) into its
    copy of the bank; k-means runs on rank 0 and its centroids and assignments are broadcast, so
    every process trains against the same targets (tested with 2 gloo processes)."""

    needs_rows = True
    n_memory_views = 2  # the trainer's two global views (the paper's crops_for_assign = [0, 1])

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__(cfg, encoder)
        self.uses_local = cfg.n_local_crops > 0
        self.projector = mlp(encoder.dim, cfg.proj_hidden, cfg.proj_dim)
        self.memory: torch.Tensor | None = None
        self.centroids: list[torch.Tensor] = []
        self.assignments: torch.Tensor | None = None

    @classmethod
    def check_config(cls, cfg: SSLCfg) -> None:
        ks = cfg.deepcluster_prototypes
        if not ks or min(ks) < 2:
            raise UserError(f"ssl.deepcluster_prototypes: need one or more k >= 2, got {ks}")
        _positive(cfg, "deepcluster_temperature", "deepcluster_kmeans_iters")
        if cfg.gpu_augment == "cpu":
            raise UserError("ssl.gpu_augment: deepcluster needs the batched augmentation path (auto or gpu), "
                            "which knows the image rows of each batch")

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, encoder: nn.Module, images) -> None:
        n = len(images)
        if max(self.cfg.deepcluster_prototypes) > n:
            raise UserError(f"ssl.deepcluster_prototypes: k = {max(self.cfg.deepcluster_prototypes)} clusters, "
                            f"but there are only {n} training images")
        device = next(self.projector.parameters()).device
        if self.memory is None or self.memory.shape[1] != n:  # first epoch of this process: the clean images
            z = embed(_Projection(encoder, self.projector), images, device, self.cfg.embed_batch_size, "fp32")
            self.memory = torch.from_numpy(z).to(device).expand(self.n_memory_views, -1, -1).clone()
        self.cluster(epoch)

    @torch.no_grad()
    def cluster(self, epoch: int) -> None:
        """k-means of the bank for every head (head h clusters global view h mod 2, as in the paper)."""
        n, p = self.memory.shape[1:]
        centroids, assignments = [], []
        for h, k in enumerate(self.cfg.deepcluster_prototypes):
            c = self.memory.new_zeros(k, p)
            a = torch.zeros(n, dtype=torch.long, device=self.memory.device)
            if dist_info().is_main:
                c_np, a_np = kmeans(self.memory[h % self.n_memory_views].cpu().numpy(), k,
                                    self.cfg.deepcluster_kmeans_iters, seed=epoch * 1000 + h, device=c.device)
                c.copy_(torch.from_numpy(c_np))
                a.copy_(torch.from_numpy(a_np))
            centroids.append(broadcast_from_main(c))
            assignments.append(broadcast_from_main(a))
        self.centroids, self.assignments = centroids, torch.stack(assignments)

    def forward(self, feats, local_feats, views, encoder, rows):
        if self.assignments is None or rows is None:
            raise RuntimeError("deepcluster: call on_epoch_start before training and pass the batch's image rows")
        all_feats = list(feats) + list(local_feats)
        z = self.projector(torch.cat(all_feats))
        with _fp32(z.device):
            z = F.normalize(z.float(), dim=1)  # (V_all*B, P)
            targets = self.assignments[:, rows]  # (H, B): each image's cluster, from the last k-means
            loss = sum(F.cross_entropy(z @ c.T / self.cfg.deepcluster_temperature, t.repeat(len(all_feats)))
                       for c, t in zip(self.centroids, targets)) / len(self.centroids)
        if self.training:
            self._remember(z[:self.n_memory_views * len(rows)].detach(), rows)
        return loss

    @torch.no_grad()
    def _remember(self, z: torch.Tensor, rows: torch.Tensor) -> None:
        """Write the global views' projections z (2*B, P) of images `rows` (B,) into the bank; under
        DDP those of every process (the same bank everywhere)."""
        b = len(rows)
        rows_all = all_gather_with_grad(rows)  # (W*B,)
        for v in range(self.n_memory_views):
            self.memory[v].index_copy_(0, rows_all, all_gather_with_grad(z[v * b:(v + 1) * b]))
