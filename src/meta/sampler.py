"""Labeled pools and N-way K-shot Q-query episodes for meta-training.

A :class:`Pool` is a set of image rows (indices into ``CompetitionData.images``) with one class per
row. Three sources:

* ``labeled``  -- the 30 labeled images (labeled train + val);
* ``pseudo``   -- the confident pseudo-labeled images of ``paths.pseudo_labels()`` (rows with
  ``selected == True`` or ``confidence >= threshold``), plus the labeled images when asked
  (``include_labeled``; the 04_meta stage leaves them out so that one meta-training can serve
  every leave-one-out fold without seeing the held-out label);
* ``clusters`` -- k-means clusters of the embeddings as pseudo-classes, no label used at all
  (CACTUs, Hsu, Levine & Finn 2019, "Unsupervised Learning via Meta-Learning"). Several
  clusterings with different seeds may be drawn; an episode takes all its classes from one
  clustering, as in CACTUs.
* ``auto``     -- ``pseudo`` when the pseudo-label table exists, else ``clusters``.

:class:`EpisodeSampler` draws episodes from a pool and refuses, before any training, pools that
cannot produce them: a class with fewer than K + Q images, or fewer than N classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from src.errors import UserError

POOLS = ("labeled", "pseudo", "clusters", "auto")


@dataclass
class Pool:
    rows: np.ndarray  # (M,) int64 image rows (indices into CompetitionData.images)
    labels: np.ndarray  # (M,) int64 class of each row (class ids 0..C-1, or cluster ids)
    kind: str  # labeled | pseudo | clusters
    groups: np.ndarray | None = None  # (M,) clustering id of each row (CACTUs); None: one group
    note: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def class_counts(self) -> dict[int, int]:
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def without_rows(self, rows: np.ndarray) -> "Pool":
        keep = ~np.isin(self.rows, rows)
        return Pool(self.rows[keep], self.labels[keep], self.kind,
                    None if self.groups is None else self.groups[keep], self.note)


@dataclass
class Episode:
    """One N-way task. Labels are episode-local: 0..N-1 in the order of ``classes``."""

    support_rows: np.ndarray  # (N*K,) image rows, class-major (class 0's K shots first)
    support_y: np.ndarray  # (N*K,) int64 in 0..N-1
    query_rows: np.ndarray  # (N*Q,)
    query_y: np.ndarray  # (N*Q,)
    classes: np.ndarray  # (N,) pool classes behind the episode labels
    augment_seed: int | None = None  # seed of the episode's image augmentation (src.meta.task_augment)


class EpisodeSampler:
    """N-way K-shot Q-query episodes from a pool (Vinyals et al. 2016; Snell et al. 2017).

    ``sample(rng)`` picks N classes uniformly (within one clustering for CACTUs pools), then K + Q
    distinct images per class, so support and query never share an image.
    """

    def __init__(self, pool: Pool, n_way: int, n_shot: int, n_query: int, where: str = "meta"):
        if n_way < 2 or n_shot < 1 or n_query < 1:
            raise UserError(f"{where}.n_way/n_shot/n_query: need n_way >= 2, n_shot >= 1, n_query >= 1 "
                            f"(got {n_way}, {n_shot}, {n_query})")
        self.pool, self.n_way, self.n_shot, self.n_query = pool, n_way, n_shot, n_query
        need = n_shot + n_query
        counts = pool.class_counts()
        small = {c: n for c, n in counts.items() if n < need}
        if small:
            c, n = min(small.items(), key=lambda kv: (kv[1], kv[0]))
            raise UserError(
                f"{where}.n_shot + {where}.n_query = {need} images per class, but {pool.kind} pool class {c} has only "
                f"{n} image(s) ({len(small)} of {len(counts)} classes are too small; lower n_shot/n_query "
                f"or use a larger pool)")
        groups = pool.groups if pool.groups is not None else np.zeros(len(pool), np.int64)
        self.members = {c: np.flatnonzero(pool.labels == c) for c in counts}  # positions in pool
        by_group: dict[int, list[int]] = {}
        for c in counts:
            by_group.setdefault(int(groups[self.members[c][0]]), []).append(c)
        self.group_classes = {g: np.array(sorted(cs)) for g, cs in by_group.items() if len(cs) >= n_way}
        if not self.group_classes:
            most = max(len(cs) for cs in by_group.values()) if by_group else 0
            raise UserError(f"{where}.n_way = {n_way}, but the {pool.kind} pool has only {most} class(es) "
                            f"(counts per class: {counts})")
        self.group_ids = np.array(sorted(self.group_classes))

    def sample(self, rng: np.random.Generator) -> Episode:
        group = self.group_ids[rng.integers(len(self.group_ids))]
        classes = rng.choice(self.group_classes[group], size=self.n_way, replace=False)
        need = self.n_shot + self.n_query
        picks = np.stack([rng.choice(self.members[c], size=need, replace=False) for c in classes])  # (N, K+Q)
        rows = self.pool.rows[picks]
        y = np.repeat(np.arange(self.n_way), need).reshape(self.n_way, need)
        k = self.n_shot
        return Episode(support_rows=rows[:, :k].reshape(-1), support_y=y[:, :k].reshape(-1),
                       query_rows=rows[:, k:].reshape(-1), query_y=y[:, k:].reshape(-1), classes=classes)


# ---------------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------------
def labeled_pool(data) -> Pool:
    rows = data.labeled_idx
    return Pool(rows.astype(np.int64), data.class_ids[rows].astype(np.int64), "labeled")


def pseudo_pool(data, table_path, threshold: float, include_labeled: bool = True) -> Pool:
    """Labeled rows (optional) + pseudo-labeled rows of 02_pseudo's label table at `table_path` with
    selected == True or confidence >= threshold."""
    try:
        table = pd.read_csv(table_path, dtype={"image_id": str, "label": str}, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{table_path}: pseudo-label table not found (run 02_pseudo or use meta.pool=clusters)") from None
    return pseudo_pool_of(data, table, threshold, include_labeled, str(table_path))


def pseudo_pool_of(data, table: pd.DataFrame, threshold: float, include_labeled: bool = True,
                   name: str = "pseudo-labels") -> Pool:
    """pseudo_pool of a label table already in memory (image_id, label, confidence[, selected]);
    `name` names it in errors."""
    missing = {"image_id", "label", "confidence"} - set(table.columns)
    if missing:
        raise UserError(f"{name}: missing column(s) {', '.join(sorted(missing))}")
    keep = table["confidence"].to_numpy(float) >= threshold
    if "selected" in table.columns:
        keep |= table["selected"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    table = table[keep]
    row_of = pd.Series(np.arange(len(data.index)), index=data.index["image_id"].to_numpy())
    known = table["image_id"].isin(row_of.index)
    if not known.all():
        bad = table.loc[~known, "image_id"].iloc[0]
        raise UserError(f"{name}: image_id '{bad}' is not in the prepared data ({int((~known).sum())} unknown)")
    labels = data.encode(table["label"].tolist(), name)  # integer labels or class names -> ids
    rows = row_of[table["image_id"]].to_numpy(np.int64)
    labeled = np.isin(rows, data.labeled_idx)  # a table row for a labeled image would duplicate it
    rows, labels = rows[~labeled], labels[~labeled]
    if include_labeled:
        base = labeled_pool(data)
        rows, labels = np.concatenate([base.rows, rows]), np.concatenate([base.labels, labels])
    return Pool(rows, labels, "pseudo", note=f"{int((~labeled).sum())} pseudo-labeled rows with confidence >= "
                                             f"{threshold} or selected")


def cluster_pool(embeddings: np.ndarray, rows: np.ndarray, n_clusters: int, n_way: int, min_size: int,
                 clusterings: int = 1, seed: int = 0, iters: int = 20) -> Pool:
    """CACTUs pseudo-classes: faiss k-means (cosine, on L2-normalised embeddings) of `rows`, repeated
    `clusterings` times with different seeds. Clusters smaller than `min_size` (= K + Q) are dropped
    (k-means makes some; CACTUs drops them too); an error follows if fewer than N remain."""
    import faiss

    x = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    if n_clusters < n_way or n_clusters > len(x):
        raise UserError(f"meta.clusters: need n_way ({n_way}) <= clusters <= number of images ({len(x)}), "
                        f"got {n_clusters}")
    all_rows, all_labels, all_groups, dropped = [], [], [], 0
    for p in range(clusterings):
        km = faiss.Kmeans(x.shape[1], n_clusters, niter=iters, seed=seed + 1000 * p, spherical=True, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        assign = assign[:, 0].astype(np.int64)
        sizes = np.bincount(assign, minlength=n_clusters)
        ok = sizes[assign] >= min_size
        dropped += int((sizes < min_size).sum())
        all_rows.append(rows[ok])
        all_labels.append(assign[ok] + p * n_clusters)  # unique class id across clusterings
        all_groups.append(np.full(int(ok.sum()), p, np.int64))
    return Pool(np.concatenate(all_rows).astype(np.int64), np.concatenate(all_labels),
                "clusters", np.concatenate(all_groups),
                note=f"{clusterings} k-means clustering(s) of {len(rows)} images into {n_clusters}; "
                     f"{dropped} cluster(s) under {min_size} images dropped")


def cap_per_class(pool: Pool, per_class: int, rng: np.random.Generator) -> Pool:
    """Keep at most `per_class` random rows of each class (bounds memory and feature caching)."""
    if per_class <= 0:
        return pool
    keep = np.zeros(len(pool), bool)
    for c in np.unique(pool.labels):
        members = np.flatnonzero(pool.labels == c)
        keep[rng.permutation(members)[:per_class]] = True
    return Pool(pool.rows[keep], pool.labels[keep], pool.kind, None if pool.groups is None else pool.groups[keep],
                pool.note + (f"; capped at {per_class} per class" if (~keep).any() else ""))
