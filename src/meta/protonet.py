"""Prototypical Networks trained episodically (Snell, Swersky & Zemel 2017): class prototypes are
the mean support features; a query's logits are minus its squared Euclidean distances to the
prototypes; cross-entropy on the queries of each N-way K-shot episode trains the encoder's last
block. Inference is the same rule with the labeled images as the support."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src.meta import META_METHODS
from src.meta.base import MetaMethod, Task, class_mean


def squared_distances(hq: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(Q, D), (C, D) -> (Q, C) squared Euclidean distances."""
    return torch.cdist(hq, protos).pow(2)


@META_METHODS.register("protonet_episodic")
class EpisodicProtoNet(MetaMethod):
    name = "protonet_episodic"
    task_augment = True

    def loss(self, task: Task) -> torch.Tensor:
        h = self.features(torch.cat([task.xs, task.xq]))
        hs, hq = h[:len(task.xs)], h[len(task.xs):]
        return F.cross_entropy(self.scores(hs, task.ys, hq, task.n_way), task.yq)

    def scores(self, hs, ys, hq, n_classes):
        protos, _ = class_mean(hs, ys, n_classes)
        return -squared_distances(hq, protos)
