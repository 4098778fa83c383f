"""kNN probe of an embedding: how well do nearest neighbours recover the classes?

Cosine k-NN with a similarity-weighted vote (Wu et al. 2018, arXiv:1805.01978: weight
exp(cos / T), T = 0.07; the monitor most SSL papers report), or a plain majority vote
(``temperature=None``). Two scores:

* ``knn_loo_labeled``: leave-one-out over the labeled images (30 here) -- usable for decisions;
* ``knn_5fold_truth``: 5-fold k-NN within the test images listed in ``cfg.data.truth`` -- a
  monitoring/report number only, never used for training, thresholds or model selection.

And one label-free signal, usable inside a run: :func:`rankme`, the effective rank of the embeddings
of a fixed sample of unlabeled images (Garrido et al. 2023, arXiv:2210.02885).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from src.data.competition import read_id_label_csv
from src.data.dataset import CompetitionData
from src.errors import UserError


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()


def knn_predict(ref: torch.Tensor, ref_labels: torch.Tensor, query: torch.Tensor, k: int = 20,
                temperature: float | None = 0.07, n_classes: int | None = None, exclude_self: bool = False,
                balanced: bool = True, chunk: int = 4096) -> torch.Tensor:
    """Class scores (Q, C) of each query from its k most cosine-similar reference rows.

    ref (R, D), ref_labels (R,) in 0..C-1, query (Q, D). exclude_self: query i is ref row i (Q == R),
    which is left out of its own neighbours (leave-one-out). Ties in a majority vote go to the
    neighbour class with the largest summed similarity.

    balanced: divide each class's vote by its number of reference images. Without it, k=20 over
    30 labeled images (3 per class) is biased against the held-out image's own class, which has
    only 2 references left: with features of little contrast the leave-one-out score drops to 0."""
    ref, query = F.normalize(_as_tensor(ref), dim=1), F.normalize(_as_tensor(query), dim=1)
    ref_labels = torch.as_tensor(ref_labels, dtype=torch.long, device=ref.device)
    n_classes = int(n_classes or int(ref_labels.max()) + 1)
    k = min(k, len(ref) - int(exclude_self))
    out = []
    for start in range(0, len(query), chunk):
        sim = query[start:start + chunk] @ ref.T  # (q, R)
        if exclude_self:
            rows = torch.arange(start, start + len(sim), device=sim.device)
            sim[torch.arange(len(sim), device=sim.device), rows] = -float("inf")
        top, idx = sim.topk(k, dim=1)
        weight = torch.exp(top / temperature) if temperature else 1.0 + 1e-6 * top  # tiny tie-break
        scores = torch.zeros(len(sim), n_classes, device=sim.device)
        scores.scatter_add_(1, ref_labels[idx], weight)
        if balanced:  # each class votes as if it had as many reference images as the largest
            counts = torch.bincount(ref_labels, minlength=n_classes).float().to(sim.device)
            if exclude_self:  # the held-out query is not a reference for its own class
                own = counts[ref_labels[start:start + len(sim)]]
                counts = counts.expand(len(sim), -1).clone()
                counts[torch.arange(len(sim)), ref_labels[start:start + len(sim)]] = own - 1
            scores = scores / counts.clamp_min(1)
        out.append(scores)
    return torch.cat(out) if out else torch.zeros(0, n_classes)


def knn_loo_accuracy(feats, labels, k: int = 20, temperature: float | None = 0.07) -> float:
    """Leave-one-out accuracy of the kNN vote within (feats, labels)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    scores = knn_predict(feats, labels, feats, k, temperature, exclude_self=True)
    return float((scores.argmax(1) == labels).float().mean())


def knn_kfold_accuracy(feats, labels, k: int = 20, folds: int = 5, seed: int = 0,
                       temperature: float | None = 0.07) -> float:
    """Stratified k-fold accuracy: each fold is classified by kNN over the other folds."""
    from sklearn.model_selection import StratifiedKFold

    feats = _as_tensor(feats)
    labels = np.asarray(labels)
    _, y = np.unique(labels, return_inverse=True)
    y_t = torch.as_tensor(y, dtype=torch.long)
    correct = 0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        scores = knn_predict(feats[train], y_t[train], feats[test], k, temperature, n_classes=int(y.max()) + 1)
        correct += int((scores.argmax(1) == y_t[test]).sum())
    return correct / len(y)


def truth_rows(data: CompetitionData, truth: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of data.index listed in the truth CSV and their class ids. Raises UserError on unknown
    ids and on labels that are not one of the classes."""
    frame = read_id_label_csv(Path(truth))
    row_of = {image_id: r for r, image_id in enumerate(data.index["image_id"].tolist())}
    missing = [i for i in frame["image_id"] if i not in row_of]
    if missing:
        raise UserError(f"{truth}: image_id '{missing[0]}' is not in the prepared data ({len(missing)} unknown)")
    return (np.array([row_of[i] for i in frame["image_id"]], dtype=np.int64),
            data.encode(frame["label"].tolist(), str(truth)))


def probe_rows(data: CompetitionData, truth: str = "") -> np.ndarray:
    """Every row the probe needs (labeled rows, then truth rows): embed only these."""
    rows = [data.labeled_idx]
    if truth:
        rows.append(truth_rows(data, truth)[0])
    return np.unique(np.concatenate(rows))


def knn_probe(feats_of_rows, data: CompetitionData, truth: str = "", k: int = 20, seed: int = 0) -> dict:
    """feats_of_rows(rows) -> (len(rows), D) features. Returns {'knn_loo_labeled': acc,
    'knn_5fold_truth': acc (only with a truth file)}."""
    out = {"knn_loo_labeled": knn_loo_accuracy(feats_of_rows(data.labeled_idx), data.class_ids[data.labeled_idx], k)}
    if truth:
        rows, labels = truth_rows(data, truth)
        out["knn_5fold_truth"] = knn_kfold_accuracy(feats_of_rows(rows), labels, k, seed=seed)
    return out


def rankme(feats, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of the
    (N, D) embedding matrix, in [1, min(N, D)]. Label-free: a collapsing encoder scores near 1, one
    that spreads its images over all D directions near D."""
    s = torch.linalg.svdvals(_as_tensor(feats).double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Raw-pixel baseline: normalised pixels (ImageNet mean/std per channel), flattened (N, H*W*3)."""
    from src.models.encoder import to_input

    return to_input(torch.from_numpy(np.array(images))).flatten(1).numpy()
