"""Exact nearest neighbours and k-means over embeddings with faiss (Johnson et al. 2019).

Embeddings are L2-normalised, so inner product == cosine similarity and an exact flat IP index
is the right tool at this size (60k x 512: a few seconds on CPU). Backends, best first:

* faiss GPU index, when faiss was built with GPU support and the device is CUDA;
* torch matmul + top-k in chunks on the CUDA device (the usual case with the faiss-cpu wheel);
* faiss CPU index otherwise.

All three return the same neighbours (exact search); only speed differs.

    sims, idx = knn_graph(emb, k=20, device=device)    # (N, k) each, self excluded
    centroids, assign = kmeans(emb, n_clusters=100, iters=25, seed=0, device=device)
"""
from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp
import torch


def faiss_gpu_available(device: torch.device | None) -> bool:
    return (device is not None and device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0)


def _gpu_id(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def knn_search(queries: np.ndarray, database: np.ndarray, k: int, device: torch.device | None = None,
               chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search. queries (Q, D), database (N, D) float32 ->
    (similarities (Q, k) float32 descending, indices (Q, k) int64)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    database = np.ascontiguousarray(database, dtype=np.float32)
    k = min(k, len(database))
    if faiss_gpu_available(device):
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, database.shape[1], _gpu_config(device))
        index.add(database)
        sims, idx = index.search(queries, k)
        return sims, idx.astype(np.int64)
    if device is not None and device.type == "cuda":
        db = torch.from_numpy(database).to(device)
        sims, idx = [], []
        for start in range(0, len(queries), chunk):
            q = torch.from_numpy(queries[start:start + chunk]).to(device)
            s, i = (q @ db.T).topk(k, dim=1)  # (chunk, k); fp32 so ties/order match faiss
            sims.append(s.cpu())
            idx.append(i.cpu())
        return torch.cat(sims).numpy(), torch.cat(idx).numpy().astype(np.int64)
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    sims, idx = index.search(queries, k)
    return sims, idx.astype(np.int64)


def _gpu_config(device: torch.device):
    cfg = faiss.GpuIndexFlatConfig()
    cfg.device = _gpu_id(device)
    return cfg


def knn_graph(emb: np.ndarray, k: int, device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every row among the other rows: (sims (N, k), idx (N, k)).
    Searches k+1 and drops each row's own entry (wherever exact duplicates put it)."""
    n = len(emb)
    sims, idx = knn_search(emb, emb, min(k + 1, n), device)
    own = idx == np.arange(n)[:, None]
    # Rows where self was not returned (duplicates filled the list): drop the last neighbour.
    own[~own.any(1), -1] = True
    keep = ~own
    return sims[keep].reshape(n, -1), idx[keep].reshape(n, -1)


def affinity_matrix(sims: np.ndarray, idx: np.ndarray, gamma: float = 3.0) -> sp.csr_matrix:
    """Symmetric sparse affinity W = A + A^T of a kNN graph, A_ij = max(cos_ij, 0)^gamma
    (Iscen et al. 2019, "Label Propagation for Deep Semi-supervised Learning"). (N, N) CSR."""
    n, k = idx.shape
    w = np.clip(sims, 0.0, None).astype(np.float64) ** gamma
    a = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    return (a + a.T).tocsr()


def normalized_adjacency(w: sp.csr_matrix) -> sp.csr_matrix:
    """S = D^-1/2 W D^-1/2 (Zhou et al. 2004); isolated nodes get zero rows."""
    deg = np.asarray(w.sum(1)).ravel()
    inv = np.zeros_like(deg)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    d = sp.diags(inv)
    return (d @ w @ d).tocsr()


def kmeans(x: np.ndarray, n_clusters: int, iters: int = 25, seed: int = 0, device: torch.device | None = None,
           spherical: bool = True, nredo: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means on all rows (no subsampling). Returns (centroids (K, D) float32, L2-normalised
    when spherical; assignment (N,) int64 of each row to its nearest centroid)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], n_clusters, niter=iters, seed=seed, spherical=spherical, nredo=nredo,
                      gpu=faiss_gpu_available(device), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-len(x) // n_clusters)))
    km.train(x)
    _, assign = knn_search(x, km.centroids, 1, device)
    return km.centroids.astype(np.float32), assign[:, 0]
