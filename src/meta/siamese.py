"""Siamese networks (Koch, Zemel & Salakhutdinov 2015, "Siamese Neural Networks for One-shot
Image Recognition"): one shared encoder embeds both images of a pair.

* ``siamese`` -- Koch's pair head: p(same) = sigmoid(sum_j a_j |h1_j - h2_j| + b) on L2-normalised
  features, initialised at a_j = -1 (a plain L1 nearest-neighbour rule before training), trained with
  binary cross-entropy on every support x query pair of an episode (positives up-weighted by
  N - 1 so same and different pairs weigh the same). A query's class score is its mean pair logit
  over the support images of that class (Koch takes the max over one-shot supports; the mean is
  its K-shot version).
* ``siamese_triplet`` -- the triplet variant (Schroff et al. 2015, FaceNet): triplet margin loss
  (pytorch-metric-learning, every valid triplet of the episode) on L2-normalised embeddings; a
  query's class score is temperature * its mean cosine similarity to the class's supports.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses
from torch import nn

from src.meta import META_METHODS
from src.meta.base import MetaMethod, Task, class_mean


@META_METHODS.register("siamese")
class Siamese(MetaMethod):
    name = "siamese"

    def __init__(self, cfg, body, device="cpu", precision="fp32"):
        super().__init__(cfg, body, device, precision)
        self.pair = nn.Linear(self.dim, 1)  # weighted L1 distance -> same-class logit
        with torch.no_grad():  # start as a plain (negative) L1 distance: a nearest-neighbour rule, not chance
            self.pair.weight.fill_(-1.0)
            self.pair.bias.fill_(1.0)

    def pair_logits(self, hq: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        """(Q, D), (S, D) -> (Q, S) logits of 'same class', on L2-normalised features."""
        hq, hs = F.normalize(hq, dim=1), F.normalize(hs, dim=1)
        return self.pair((hq[:, None, :] - hs[None, :, :]).abs()).squeeze(-1)

    def loss(self, task: Task) -> torch.Tensor:
        h = self.features(torch.cat([task.xs, task.xq]))
        hs, hq = h[:len(task.xs)], h[len(task.xs):]
        same = (task.yq[:, None] == task.ys[None, :]).float()  # (Q, S)
        pos_weight = h.new_full((), task.n_way - 1.0)  # balance 1 positive : N-1 negatives
        return F.binary_cross_entropy_with_logits(self.pair_logits(hq, hs), same, pos_weight=pos_weight)

    def scores(self, hs, ys, hq, n_classes):
        return class_mean(self.pair_logits(hq, hs).T, ys, n_classes)[0].T  # (Q, C)


@META_METHODS.register("siamese_triplet")
class SiameseTriplet(MetaMethod):
    name = "siamese_triplet"

    def __init__(self, cfg, body, device="cpu", precision="fp32"):
        super().__init__(cfg, body, device, precision)
        self.triplet = losses.TripletMarginLoss(margin=cfg.margin)  # L2-normalises the embeddings

    def loss(self, task: Task) -> torch.Tensor:
        h = self.features(torch.cat([task.xs, task.xq]))
        return self.triplet(h, torch.cat([task.ys, task.yq]))

    def scores(self, hs, ys, hq, n_classes):
        cos = F.normalize(hq, dim=1) @ F.normalize(hs, dim=1).T  # (Q, S)
        return self.cfg.temperature * class_mean(cos.T, ys, n_classes)[0].T
