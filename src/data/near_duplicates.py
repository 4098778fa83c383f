"""Near-duplicate images (EDA): perceptual hashes of the cached uint8 images and embedding cosine,
searched with faiss, grouped, and reported within and across splits. Nothing is removed.

* dHash (Krawetz 2013, "Kind of like that"): the gray image resized to 9x8; bit (r, c) = pixel
  (r, c+1) brighter than pixel (r, c). Insensitive to brightness and contrast changes.
* pHash (Zauner 2010; the variant of the ``imagehash`` package): the gray image at 32x32, the 2-D
  DCT-II, its 8x8 lowest frequencies; bit = coefficient above their median. Insensitive to JPEG
  re-compression and small shifts.

A hash pair: both 64-bit hashes within ``dedup.hash_distance`` differing bits (faiss binary
search over the 128-bit concatenation, ``dedup.neighbors`` candidates per image). An embedding pair:
cosine >= ``dedup.embedding_cosine`` among each image's ``dedup.neighbors`` nearest neighbours
(src.neighbors.knn_graph, exact). Pairs become groups by connected components.

At 32x32 the hashes catch re-saved (JPEG), re-coloured and brightened copies but not shifted or
cropped ones (a one-pixel shift changes ~13 of 64 bits on the real data): those are the embedding
pass's, since the encoders are trained to be invariant to crops.

    codes = hash_codes(images)                       # (N, 16) uint8: dHash | pHash
    pairs = hash_pairs(codes, max_distance=6, k=10)  # DataFrame a, b, dhash, phash (a < b)
    summary = summarize(pairs, index, images)        # counts within / across splits, groups
"""
from __future__ import annotations

import time

import cv2
import faiss
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64  # per hash
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------
def grayscale(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (N, H, W) luma, ITU-R 601 weights (PIL's "L" conversion)."""
    x = np.asarray(images, np.float32)
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _resize(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """float32 (N, H, W) -> (N, height, width), area interpolation (an average over each cell)."""
    if gray.shape[1:] == (height, width):
        return gray
    return np.stack([cv2.resize(g, (width, height), interpolation=cv2.INTER_AREA) for g in gray])


def dhash_bits(gray: np.ndarray) -> np.ndarray:
    """float32 (N, H, W) -> bool (N, 64): row-major bits of 'right neighbour is brighter' on 9x8."""
    small = _resize(gray, 9, 8)
    return (small[:, :, 1:] > small[:, :, :-1]).reshape(len(gray), -1)


def dct_matrix(n: int) -> np.ndarray:
    """(n, n) DCT-II matrix without normalisation, C[k, i] = 2 cos(pi (2i + 1) k / 2n): C @ x equals
    scipy.fft.dct(x, type=2) (norm=None), the transform imagehash's pHash uses."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def phash_bits(gray: np.ndarray) -> np.ndarray:
    """float32 (N, H, W) -> bool (N, 64): the 8x8 lowest DCT frequencies of the 32x32 image above
    their median (DC coefficient included, as imagehash.phash)."""
    x = _resize(gray, 32, 32).astype(np.float64)
    c = dct_matrix(32)[:8]  # (8, 32): only the low frequencies are needed
    low = np.einsum("ki,nij,lj->nkl", c, x, c, optimize=True).reshape(len(x), -1)  # (N, 64)
    return low > np.median(low, axis=1, keepdims=True)


def hash_codes(images: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, 16): packed dHash (bytes 0-7) and pHash (bytes 8-15).
    Chunked so a memory-mapped 60k-image cache never becomes one float array."""
    out = np.empty((len(images), 16), np.uint8)
    for s in range(0, len(images), chunk):
        gray = grayscale(images[s:s + chunk])
        out[s:s + chunk, :8] = np.packbits(dhash_bits(gray), axis=1)
        out[s:s + chunk, 8:] = np.packbits(phash_bits(gray), axis=1)
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits of packed codes, row by row: uint8 (P, B) x2 -> int (P,)."""
    return _POPCOUNT[np.bitwise_xor(a, b)].sum(1, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Pair search
# ---------------------------------------------------------------------------------------------
def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate (a, b) row pairs -> unique pairs with a < b (self pairs dropped)."""
    keep = a != b
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    pairs = np.unique(np.stack([lo, hi], 1), axis=0) if len(lo) else np.zeros((0, 2), np.int64)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def hash_pairs(codes: np.ndarray, max_distance: int, k: int) -> pd.DataFrame:
    """Pairs whose dHash and pHash each differ in at most `max_distance` bits, among every image's
    k nearest codes (faiss exact binary search on the 128-bit concatenation, i.e. by the sum of
    both distances). DataFrame a, b (rows, a < b), dhash, phash (differing bits)."""
    n = len(codes)
    if n < 2:
        return pd.DataFrame({"a": [], "b": [], "dhash": [], "phash": []}, dtype=np.int64)
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(np.ascontiguousarray(codes))
    dist, idx = index.search(np.ascontiguousarray(codes), min(k + 1, n))  # (N, k+1): self included
    rows = np.repeat(np.arange(n), idx.shape[1])
    near = (idx.ravel() >= 0) & (dist.ravel() <= 2 * max_distance)  # the sum bound prunes before the exact test
    a, b = _unique_pairs(rows[near], idx.ravel()[near].astype(np.int64))
    dd, dp = hamming(codes[a, :8], codes[b, :8]), hamming(codes[a, 8:], codes[b, 8:])
    keep = (dd <= max_distance) & (dp <= max_distance)
    return pd.DataFrame({"a": a[keep], "b": b[keep], "dhash": dd[keep], "phash": dp[keep]})


def embedding_pairs(emb: np.ndarray, min_cosine: float, k: int, device=None) -> pd.DataFrame:
    """Pairs with cosine >= min_cosine among every image's k nearest neighbours (L2-normalised
    embeddings (N, D), exact search). DataFrame a, b (rows, a < b), cosine."""
    from src.neighbors import knn_graph

    n = len(emb)
    if n < 2:
        return pd.DataFrame({"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "cosine": np.zeros(0)})
    x = np.asarray(emb, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims, idx = knn_graph(x, min(k, n - 1), device)
    near = sims.ravel() >= min_cosine
    a, b = _unique_pairs(np.repeat(np.arange(n), idx.shape[1])[near], idx.ravel()[near])
    return pd.DataFrame({"a": a, "b": b, "cosine": np.round(np.einsum("nd,nd->n", x[a], x[b]), 5)})


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _split_key(splits) -> str:
    return "+".join(sorted(set(splits)))


def summarize(pairs: pd.DataFrame, index: pd.DataFrame, images: np.ndarray, method: str, threshold: dict,
              seconds: float, max_groups: int = 200) -> dict:
    """Counts of pairs and groups within one split and across splits, pixel-identical pairs, label
    conflicts (labeled images of different classes in one group) and labeled-test pairs.
    index: image_id, split, label (class id, -1 unknown), row order of `images`."""
    n = len(index)
    split = index["split"].to_numpy()
    label = index["label"].to_numpy()
    ids = index["image_id"].to_numpy()
    a, b = pairs["a"].to_numpy(np.int64), pairs["b"].to_numpy(np.int64)
    pair_keys = pd.Series([_split_key((split[i], split[j])) for i, j in zip(a, b)], dtype=object)
    same = split[a] == split[b] if len(a) else np.zeros(0, bool)
    identical = int(sum(np.array_equal(images[i], images[j]) for i, j in zip(a, b)))
    labeled = label >= 0
    groups_out, within, across, conflicts, images_in = [], {}, {}, 0, 0
    if len(a):
        graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        members = pd.Series(np.arange(n)).groupby(comp).agg(list)
        members = [m for m in members if len(m) > 1]
        members.sort(key=len, reverse=True)
        images_in = int(sum(len(m) for m in members))
        for m in members:
            key = _split_key(split[m])
            target = within if "+" not in key else across
            target[key] = target.get(key, 0) + 1
            conflicts += len(set(label[m][label[m] >= 0].tolist())) > 1
            if len(groups_out) < max_groups:
                groups_out.append([f"{ids[r]} ({split[r]})" for r in m])
    return {
        "method": method, "threshold": threshold, "seconds": round(seconds, 2),
        "pairs": int(len(a)), "identical_pairs": identical,
        "pairs_within_split": {k: int(v) for k, v in pair_keys[same].value_counts().sort_index().items()},
        "pairs_across_splits": {k: int(v) for k, v in pair_keys[~same].value_counts().sort_index().items()},
        "groups": int(sum(within.values()) + sum(across.values())), "images": images_in,
        "groups_within_split": dict(sorted(within.items())), "groups_across_splits": dict(sorted(across.items())),
        "label_conflicts": int(conflicts),
        "labeled_test_pairs": int(((labeled[a] & (split[b] == "test")) | (labeled[b] & (split[a] == "test"))).sum()),
        "largest_groups": groups_out,
    }


def pair_table(pairs: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    """The pairs with ids and splits beside the rows, for near_duplicate_pairs.csv."""
    out = pairs.copy()
    for side in ("a", "b"):
        out[f"{side}_id"] = index["image_id"].to_numpy()[out[side].to_numpy(np.int64)]
        out[f"{side}_split"] = index["split"].to_numpy()[out[side].to_numpy(np.int64)]
    return out


def similarity(pairs: pd.DataFrame) -> np.ndarray:
    """Higher = more alike: cosine, or minus the summed hash distance."""
    if "cosine" in pairs:
        return pairs["cosine"].to_numpy(np.float64)
    return -(pairs["dhash"].to_numpy(np.float64) + pairs["phash"].to_numpy(np.float64))


def top_pairs(pairs: pd.DataFrame, images: np.ndarray, n: int) -> pd.DataFrame:
    """The n most similar pairs that are not pixel-identical (those are in the exact-duplicate report)."""
    order = np.argsort(-similarity(pairs), kind="stable")
    chosen = []
    for p in order:
        i, j = int(pairs["a"].iloc[p]), int(pairs["b"].iloc[p])
        if not np.array_equal(images[i], images[j]):
            chosen.append(p)
            if len(chosen) == n:
                break
    return pairs.iloc[chosen]


def find(images: np.ndarray, index: pd.DataFrame, max_distance: int, k: int) -> tuple[pd.DataFrame, dict]:
    """Hash pass over a prepared cache: (pairs, summary)."""
    t0 = time.perf_counter()
    pairs = hash_pairs(hash_codes(images), max_distance, k)
    return pairs, summarize(pairs, index, images, "dhash+phash", {"hash_distance": max_distance, "neighbors": k},
                            time.perf_counter() - t0)


def find_by_embedding(emb: np.ndarray, images: np.ndarray, index: pd.DataFrame, min_cosine: float, k: int,
                      device=None) -> tuple[pd.DataFrame, dict]:
    """Embedding pass: (pairs, summary)."""
    t0 = time.perf_counter()
    pairs = embedding_pairs(emb, min_cosine, k, device)
    return pairs, summarize(pairs, index, images, "embedding cosine", {"cosine": min_cosine, "neighbors": k},
                            time.perf_counter() - t0)


def format_summary(s: dict) -> str:
    return (f"near duplicates ({s['method']}, {s['threshold']}): {s['pairs']} pairs ({s['identical_pairs']} "
            f"pixel-identical); within split {s['pairs_within_split']}; across splits {s['pairs_across_splits']}; "
            f"{s['groups']} groups ({s['images']} images), label conflicts {s['label_conflicts']}, "
            f"labeled-test pairs {s['labeled_test_pairs']}; {s['seconds']:.1f}s")


def duplicate_support(pairs: pd.DataFrame, class_ids: np.ndarray, split: np.ndarray) -> pd.DataFrame:
    """Test images that are near-duplicates of labeled images, as extra support: DataFrame row
    (test row), y (class id), source (the labeled row). A test image near labeled images of two
    classes is ambiguous and left out. class_ids, split: (N,) per row of the index."""
    label = np.asarray(class_ids)
    a, b = pairs["a"].to_numpy(np.int64), pairs["b"].to_numpy(np.int64)
    links = []
    for lab, test in ((a, b), (b, a)):
        ok = (label[lab] >= 0) & (np.asarray(split)[test] == "test")
        links.append(pd.DataFrame({"row": test[ok], "y": label[lab][ok], "source": lab[ok]}))
    table = pd.concat(links, ignore_index=True).drop_duplicates(["row", "source"])
    classes_per_row = table.groupby("row")["y"].nunique()
    table = table[table["row"].map(classes_per_row) == 1]
    return table.sort_values(["row", "source"]).drop_duplicates("row").reset_index(drop=True)
