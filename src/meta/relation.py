"""Relation Networks (Sung et al. 2018, "Learning to Compare: Relation Network for Few-Shot
Learning"): a learned relation module g scores how related a query is to a class,
r_{q,c} = sigmoid(g([z_c ; h_q])), from the concatenation of the class representation z_c and the
query features h_q. Trained episodically with mean squared error against the one-hot match
(r = 1 for the query's class, 0 otherwise) -- the relation module and the encoder's last block are
trained together, so the module does not sit at chance.

Choices: the features are the L2-normalised pooled outputs of the last block (the paper
concatenates conv feature maps; pooled features keep 10-way x 10,000-query inference cheap), and
z_c is the *mean* of the class's support features (the paper sums them, which changes scale when
the test shot count differs from the training one). Probabilities for inference: softmax of the
pre-sigmoid scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.meta import META_METHODS
from src.meta.base import MetaMethod, Task, class_mean, one_hot


@META_METHODS.register("relation")
class RelationNet(MetaMethod):
    name = "relation"

    def __init__(self, cfg, body, device="cpu", precision="fp32"):
        super().__init__(cfg, body, device, precision)
        hidden = cfg.hidden
        # Linear-BN-ReLU like the paper's conv-BN-ReLU blocks: batch norm standardises the pair
        # features, without it the module collapses to the constant 1/N on real encoder features.
        self.relation = nn.Sequential(nn.Linear(2 * self.dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def scores(self, hs, ys, hq, n_classes):
        hs, hq = F.normalize(hs, dim=1), F.normalize(hq, dim=1)  # scale-free inputs for the MLP
        z, _ = class_mean(hs, ys, n_classes)  # (C, D)
        pairs = torch.cat([z[None].expand(len(hq), -1, -1), hq[:, None].expand(-1, n_classes, -1)], dim=2)
        return self.relation(pairs.reshape(-1, pairs.shape[-1])).view(len(hq), n_classes)  # (Q, C) pre-sigmoid

    def loss(self, task: Task) -> torch.Tensor:
        h = self.features(torch.cat([task.xs, task.xq]))
        hs, hq = h[:len(task.xs)], h[len(task.xs):]
        relation = torch.sigmoid(self.scores(hs, task.ys, hq, task.n_way))
        return F.mse_loss(relation, one_hot(task.yq, task.n_way))
