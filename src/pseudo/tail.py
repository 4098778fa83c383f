"""Self-training the tail of a frozen pretrained encoder on its cached trunk maps
(``pseudo.self_trainer: tail``; :mod:`src.models.split`).

The tail (the stages after ``ssl.trunk_cut``, conv_head, bn2) and a cosine classifier initialised
at the class means train on the previous round's selected pseudo-labels.
One epoch passes over the pseudo-labeled rows once and over the labeled rows
pseudo.tail_labeled_repeat times (0: left out):

    x      = a random view of the row's maps (the image or its mirror)           # (B, C, s, s)
             -> a random crop of s-2..s cells, resized back to s x s (bilinear)
             -> dropout p = MAP_DROPOUT                                          (feature-map augmentation)
    logits = cos(tail(x), W) / T                                                 # (B, K), T = classifier_temperature
    loss   = cross-entropy(logits, y) with label smoothing LABEL_SMOOTHING

AdamW (pseudo.self_train_lr for the tail, CLASSIFIER_LR_MULT x for the classifier, weight decay
pseudo.self_train_weight_decay), cosine schedule over pseudo.self_train_epochs. The BatchNorm
statistics stay frozen: batches are pseudo-labeled and augmented, not the data the statistics
describe. On the real competition (EfficientNet-Lite0 at 224, cut 6, ~15k pseudo-labels) one epoch
took 73-78 s on 2 CPU cores and lifted label propagation on the joined Lite0 + Lite2 embeddings by
2.5-2.9 points and the submission by 1.3 (docs/RESULTS.md).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src.config import PseudoCfg
from src.models.split import tail_features, tail_modules
from src.pseudo.selftrain import CosineClassifier
from src.train_utils import set_lr, warmup_cosine

LABEL_SMOOTHING = 0.1
MAP_DROPOUT = 0.2
CLASSIFIER_LR_MULT = 10.0


def augment_maps(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, C, s, s) -> (B, C, s, s): one random crop of s-2..s cells (the batch shares it), resized
    back, then dropout of single activations with p = MAP_DROPOUT."""
    side = x.shape[-1]
    crop = int(torch.randint(side - 2, side + 1, (1,), generator=generator)) if side >= 5 else side
    if crop < side:
        i, j = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=generator))
        x = F.interpolate(x[:, :, i:i + crop, j:j + crop], size=(side, side), mode="bilinear", align_corners=False)
    return F.dropout(x, MAP_DROPOUT)


def self_train_tail(p: PseudoCfg, net: nn.Module, cut: int, maps: np.ndarray, rows: np.ndarray, y: np.ndarray,
                    labeled: np.ndarray, prototypes: np.ndarray, device: torch.device | str = "cpu", seed: int = 0,
                    progress: bool = False, on_epoch: Callable[[int, dict], None] | None = None,
                    ) -> tuple[CosineClassifier, list[dict]]:
    """Train net's tail (in place) and a cosine classifier on the trunk maps (N, V, C, s, s) of `rows`
    with class ids `y`; the rows in `labeled` (a subset of `rows`) repeat p.tail_labeled_repeat times
    (0: left out).
    prototypes (K, D): the classifier's initial weights. Returns (classifier, one log record per epoch);
    on_epoch(epoch, record) runs after each epoch (the net back in eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    is_labeled = np.isin(rows, labeled)
    order = np.concatenate([np.flatnonzero(~is_labeled)] + [np.flatnonzero(is_labeled)] * p.tail_labeled_repeat)
    train_rows, train_y = rows[order], torch.from_numpy(np.asarray(y)[order]).long().to(device)
    classifier = CosineClassifier(net.num_features, len(prototypes), p.classifier_temperature,
                                  torch.from_numpy(np.asarray(prototypes, np.float32))).to(device)
    net.to(device)
    modules = tail_modules(net, cut)
    params = [q for m in modules for q in m.parameters()]
    net.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    groups = [{"params": params}, {"params": list(classifier.parameters()), "lr_scale": CLASSIFIER_LR_MULT}]
    optimizer = torch.optim.AdamW(groups, lr=p.self_train_lr, weight_decay=p.self_train_weight_decay)
    steps = math.ceil(len(train_rows) / p.self_train_batch_size)
    lrs = warmup_cosine(p.self_train_lr, steps * p.self_train_epochs)  # (total steps,) cosine, no warm-up
    step, log = 0, []
    views = maps.shape[1]
    for epoch in range(1, p.self_train_epochs + 1):
        for m in modules:
            m.train()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # frozen statistics
        t0, running = time.perf_counter(), torch.zeros((), device=device)
        batches = torch.randperm(len(train_rows), generator=generator).split(p.self_train_batch_size)
        for batch in tqdm(batches, desc=f"tail {epoch}/{p.self_train_epochs}", disable=not progress, mininterval=2):
            r = train_rows[batch.numpy()]
            v = torch.randint(0, views, (len(r),), generator=generator).numpy()
            x = torch.from_numpy(np.asarray(maps[r, v], np.float32)).to(device)  # (B, C, s, s), a copy
            set_lr(optimizer, float(lrs[step]))
            logits = classifier(tail_features(net, augment_maps(x, generator), cut))  # (B, K)
            loss = F.cross_entropy(logits, train_y[batch.to(device)], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            step += 1
        net.eval()
        record = {"epoch": epoch, "loss": round(float(running) / steps, 5), "steps": steps,
                  "seconds": round(time.perf_counter() - t0, 2), "train_rows": int(len(train_rows))}
        log.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    net.requires_grad_(False)
    return classifier.eval(), log
