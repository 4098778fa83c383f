"""Cosine-softmax classifier fine-tuned on the support set.

W is initialised to the L2-normalised class means and b = 0 (the "Baseline++" cosine classifier
of Chen et al. 2019, "A Closer Look at Few-shot Classification"), so before any step the head
predicts exactly what cosine ProtoNet predicts at the same temperature. It is then trained with
Adam on the class-balanced, weighted cross-entropy of the support plus ``finetune_entropy_weight`` times the
mean entropy of its predictions on a random batch of unlabeled queries (transductive
fine-tuning, Dhillon et al. 2020, "A Baseline for Few-Shot Image Classification").

Two paths, one objective:

* on embeddings (the default) W and b are trained in numpy with closed-form gradients
  (:func:`cosine_softmax_grads`, checked against torch autograd in tests/test_heads.py): local CV
  refits this head hundreds of times and a 10 x D problem is dominated by autograd overhead;
* with ``encoder`` given, the head takes uint8 images (N, H, W, 3), fine-tunes a copy of the
  encoder too (torch autograd on the configured device; BatchNorm statistics frozen: a 20-image
  batch cannot estimate them), with random horizontal flips in training and flip TTA at
  prediction (``heads.tta_flip``).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from src.heads import HEADS, Head
from src.runtime import autocast
from src.transductive import (Adam, class_balanced_targets, compute_prototypes, info_objective, l2_normalize,
                              softmax)

NEG = -1e4  # logit of a class absent from the support


def cosine_softmax_grads(W: np.ndarray, b: np.ndarray, xs: np.ndarray, target: np.ndarray, xq: np.ndarray,
                         temperature: float, entropy_weight: float, present: np.ndarray):
    """Loss and gradients of  CE(support) + entropy_weight * mean H(query)  for logits
    z = temperature * x_n W_n^T + b (x_n, W_n row-normalised; absent classes masked out).

    W (C, D), b (C,); xs (S, D) and xq (Q, D) L2-normalised; target (S, C): the one-hot labels times
    weights summing to 1 (see class_balanced_targets). Returns (loss, dW, db)."""
    norm = np.linalg.norm(W, axis=1, keepdims=True)
    wn = W / norm
    logits_q = temperature * xq @ wn.T + b if len(xq) else np.zeros((0, len(b)))
    loss, g, gq = info_objective(temperature * xs @ wn.T + b, target, logits_q, present, entropy_weight)
    gwn = temperature * (g.T @ xs + gq.T @ xq)
    gb = g.sum(0) + gq.sum(0)
    gw = (gwn - wn * (gwn * wn).sum(1, keepdims=True)) / norm  # through the row normalisation
    return loss, gw, gb


@HEADS.register("cosine_finetune")
class CosineFinetune(Head):
    transductive = True

    def __init__(self, cfg, encoder: torch.nn.Module | None = None, device: torch.device | str = "cpu",
                 precision: str = "fp32", seed: int = 0, batch_size: int = 512):
        super().__init__(cfg)
        self.base_encoder = encoder
        self.runs_encoder = encoder is not None
        self.device = torch.device(device)
        self.precision = precision
        self.seed = seed
        self.batch_size = batch_size

    def fit(self, support_x, support_y, n_classes, query_x=None, support_weight=None):
        x, y, w = self._start(support_x, support_y, n_classes, support_weight)
        if self.runs_encoder:
            return self._fit_encoder(x, y, w, query_x)
        # float64: Adam divides by sqrt(v), so float32 rounding noise in a (near-)zero gradient would
        # be blown up into lr-sized random steps; the arrays are tiny, the cost is nil.
        xs = l2_normalize(x).astype(np.float64)
        has_query = query_x is not None and len(query_x) > 0
        xq = (l2_normalize(query_x) if has_query else np.zeros((0, x.shape[1]))).astype(np.float64)
        self.W = compute_prototypes(xs, y, n_classes, w, cosine=True).astype(np.float64)  # W = M, b = 0
        self.b = np.zeros(n_classes, np.float64)
        self.W[~self.present] = 1.0 / np.sqrt(x.shape[1])  # any unit row: masked anyway, avoids 0 / 0
        target = class_balanced_targets(y, w, n_classes)
        rng = np.random.default_rng(self.seed)
        opt = Adam([self.W, self.b], self.cfg.finetune_lr)
        for _ in range(self.cfg.finetune_steps):
            batch = xq[rng.integers(0, len(xq), min(self.cfg.finetune_query_batch, len(xq)))] if len(xq) else xq
            _, gw, gb = cosine_softmax_grads(self.W, self.b, xs, target, batch, self.cfg.finetune_temperature,
                                             self.cfg.finetune_entropy_weight, self.present)
            opt.step([gw, gb])
        return self

    def predict_proba(self, x):
        if self.runs_encoder:
            return self._predict_encoder(x)
        wn = self.W / np.linalg.norm(self.W, axis=1, keepdims=True)
        logits = self.cfg.finetune_temperature * l2_normalize(x).astype(np.float64) @ wn.T + self.b
        return softmax(logits, self.present)

    # ---- encoder path (torch autograd) ----
    def _features(self, x, train: bool = False, flip: bool = False) -> torch.Tensor:
        """uint8 images -> (B, D) L2-normalised float32 features of the fine-tuned encoder."""
        from src.models.encoder import to_input  # imports timm: only for heads that run the encoder

        inp = to_input(torch.as_tensor(np.ascontiguousarray(x), device=self.device))
        if train:  # random horizontal flip per image
            mirror = torch.rand(len(inp), device=self.device) < 0.5
            inp = torch.where(mirror[:, None, None, None], torch.flip(inp, dims=[3]), inp)
        elif flip:
            inp = torch.flip(inp, dims=[3])
        with autocast(self.device, self.precision):
            f = self.encoder(inp).float()
        return F.normalize(f, dim=1)

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        logits = self.cfg.finetune_temperature * feats @ F.normalize(self.Wt, dim=1).T + self.bt
        return logits.masked_fill(~self.mask, NEG)

    def _fit_encoder(self, x, y, w, query_x):
        torch.manual_seed(self.seed)
        self.encoder = copy.deepcopy(self.base_encoder).to(self.device).eval()
        with torch.no_grad():
            feats0 = torch.cat([self._features(x[s:s + self.batch_size]) for s in range(0, len(x), self.batch_size)])
        protos = compute_prototypes(feats0.cpu().numpy(), y, self.n_classes, w, cosine=True)  # W = M, b = 0
        self.Wt = torch.tensor(protos, device=self.device, requires_grad=True)
        self.bt = torch.zeros(self.n_classes, device=self.device, requires_grad=True)
        self.mask = torch.as_tensor(self.present, device=self.device)
        opt = torch.optim.Adam([{"params": list(self.encoder.parameters()), "lr": self.cfg.finetune_encoder_lr},
                                {"params": [self.Wt, self.bt], "lr": self.cfg.finetune_lr}])
        yt = torch.as_tensor(y, device=self.device)
        wt = torch.as_tensor(class_balanced_targets(y, w, self.n_classes).sum(1), device=self.device)
        nq = 0 if query_x is None else len(query_x)
        rng = np.random.default_rng(self.seed)
        for _ in range(self.cfg.finetune_steps):
            ce = F.cross_entropy(self._logits(self._features(x, train=True)), yt, reduction="none")
            loss = (ce * wt).sum() / wt.sum()
            if nq and self.cfg.finetune_entropy_weight > 0:
                pick = np.sort(rng.choice(nq, min(self.cfg.finetune_query_batch, nq), replace=False))
                logp = F.log_softmax(self._logits(self._features(query_x[pick], train=True)), dim=1)
                loss = loss + self.cfg.finetune_entropy_weight * -(logp.exp() * logp).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def _predict_encoder(self, x):
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            p = F.softmax(self._logits(self._features(chunk)), dim=1)
            if self.cfg.tta_flip:  # average the image and its mirror
                p = 0.5 * (p + F.softmax(self._logits(self._features(chunk, flip=True)), dim=1))
            out.append(p.float().cpu())
        probs = torch.cat(out).numpy() if out else np.zeros((0, self.n_classes), np.float32)
        probs[:, ~self.present] = 0.0
        return probs / probs.sum(1, keepdims=True)
