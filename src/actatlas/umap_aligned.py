"""The SGD of umap-learn's AlignedUMAP on plain arrays: `aligned_sgd`.

umap-learn's ``optimize_layout_aligned_euclidean`` (what ``AlignedUMAP.fit`` runs) reads its embeddings,
edges and sampling schedules through numba typed lists inside the innermost loop and compiles its epoch
function again on every call. `aligned_epoch` is the body of its
``_optimize_layout_aligned_euclidean_single_epoch`` (umap-learn 0.5) with the same operations in the
same order, over 2-D arrays (layers stacked; every layer has the same n samples here) and with the
constant ``lambda * exp(-(|offset| - 1))`` computed once per epoch instead of once per use: the result
is bit-identical (tests/test_align.py compares it with umap-learn's on the same inputs) and about 5x
faster. The module imports numba at import; `actatlas.layout` imports it only when an aligned UMAP runs.
"""

from __future__ import annotations

import numba
import numpy as np
from umap.layouts import clip, rdist
from umap.utils import tau_rand_int


@numba.njit(fastmath=True)
def aligned_epoch(emb, heads, tails, n_edges, epochs_per_sample, a, b, regularisation_weights, relations,
                  rng_state, gamma, lambda_, dim, move_other, alpha, epochs_per_negative_sample,
                  epoch_of_next_negative_sample, epoch_of_next_sample, n):  # pragma: no cover - compiled
    """One epoch, in place. emb float32 [L, n, dim]; heads, tails int32 [L, E]; n_edges [L] (the rest
    of each row is padding); the schedules [L, E]; relations int32 / weights float32 [L, 2w+1, n]."""
    n_embeddings = emb.shape[0]
    window_size = (relations.shape[1] - 1) // 2
    max_n_edges = 0
    for m0 in range(n_embeddings):
        if n_edges[m0] >= max_n_edges:
            max_n_edges = n_edges[m0]
    coef = np.empty(2 * window_size + 1)
    for o in range(-window_size, window_size + 1):
        coef[o + window_size] = lambda_ * np.exp(-(np.abs(o) - 1))
    embedding_order = np.arange(n_embeddings).astype(np.int32)
    np.random.seed(abs(rng_state[0]))
    np.random.shuffle(embedding_order)
    for i in range(max_n_edges):
        for m in embedding_order:
            if i < n_edges[m] and epoch_of_next_sample[m, i] <= n:
                j = heads[m, i]
                k = tails[m, i]
                current = emb[m, j]
                other = emb[m, k]
                dist_squared = rdist(current, other)
                if dist_squared > 0.0:
                    grad_coeff = -2.0 * a * b * pow(dist_squared, b - 1.0)
                    grad_coeff /= a * pow(dist_squared, b) + 1.0
                else:
                    grad_coeff = 0.0
                for d in range(dim):
                    grad_d = clip(grad_coeff * (current[d] - other[d]))
                    for offset in range(-window_size, window_size):
                        neighbor_m = m + offset
                        if n_embeddings > neighbor_m >= 0 != offset:
                            identified_index = relations[m, offset + window_size, j]
                            if identified_index >= 0:
                                grad_d -= clip(coef[offset + window_size]
                                               * regularisation_weights[m, offset + window_size, j]
                                               * (current[d] - emb[neighbor_m, identified_index, d]))
                    current[d] += clip(grad_d) * alpha
                    if move_other:
                        other_grad_d = clip(grad_coeff * (other[d] - current[d]))
                        for offset in range(-window_size, window_size):
                            neighbor_m = m + offset
                            if n_embeddings > neighbor_m >= 0 != offset:
                                identified_index = relations[m, offset + window_size, k]
                                if identified_index >= 0:
                                    other_grad_d -= clip(coef[offset + window_size]
                                                         * regularisation_weights[m, offset + window_size, k]
                                                         * (other[d] - emb[neighbor_m, identified_index, d]))
                        other[d] += clip(other_grad_d) * alpha
                epoch_of_next_sample[m, i] += epochs_per_sample[m, i]
                if epochs_per_negative_sample[m, i] > 0:
                    n_neg_samples = int((n - epoch_of_next_negative_sample[m, i]) / epochs_per_negative_sample[m, i])
                else:
                    n_neg_samples = 0
                for p in range(n_neg_samples):
                    k = tau_rand_int(rng_state) % emb.shape[1]
                    other = emb[m, k]
                    dist_squared = rdist(current, other)
                    if dist_squared > 0.0:
                        grad_coeff = 2.0 * gamma * b
                        grad_coeff /= (0.001 + dist_squared) * (a * pow(dist_squared, b) + 1)
                    elif j == k:
                        continue
                    else:
                        grad_coeff = 0.0
                    for d in range(dim):
                        if grad_coeff > 0.0:
                            grad_d = clip(grad_coeff * (current[d] - other[d]))
                        else:
                            grad_d = 0.0
                        for offset in range(-window_size, window_size):
                            neighbor_m = m + offset
                            if n_embeddings > neighbor_m >= 0 != offset:
                                identified_index = relations[m, offset + window_size, j]
                                if identified_index >= 0:
                                    grad_d -= clip(coef[offset + window_size]
                                                   * regularisation_weights[m, offset + window_size, j]
                                                   * (current[d] - emb[neighbor_m, identified_index, d]))
                        current[d] += clip(grad_d) * alpha
                epoch_of_next_negative_sample[m, i] += n_neg_samples * epochs_per_negative_sample[m, i]


_cache_checked = False


def aligned_sgd(embeddings: list[np.ndarray], heads: list[np.ndarray], tails: list[np.ndarray], n_epochs: int,
                epochs_per_sample: list[np.ndarray], weights: np.ndarray, relations: np.ndarray,
                rng_state: np.ndarray, lambda_: float, progress: bool = False, a: float = 1.576943460405378,
                b: float = 0.8950608781227859, gamma: float = 1.0, initial_alpha: float = 1.0,
                negative_sample_rate: float = 5.0) -> list[np.ndarray]:
    """umap-learn's ``optimize_layout_aligned_euclidean(..., move_other=True)`` as ``AlignedUMAP.fit``
    calls it (its default a, b, gamma, learning rate and negative sampling): the layers' embeddings
    float32 [n, 2] after `n_epochs` epochs. `rng_state` (int64 [3]) advances in place, as there."""
    global _cache_checked
    from tqdm.auto import tqdm

    from .runtime import numba_cache_enabled

    if not _cache_checked:
        _cache_checked = True
        if numba_cache_enabled():        # keep the compiled epoch on disk like umap-learn's own functions
            try:
                aligned_epoch.enable_caching()
            except Exception:  # pragma: no cover - numba cannot cache here: compiled as before  # noqa: BLE001
                pass
    L = len(heads)
    n_edges = np.array([len(h) for h in heads], np.int64)
    E = int(n_edges.max())
    H, T = np.zeros((L, E), np.int32), np.zeros((L, E), np.int32)
    eps = np.zeros((L, E), np.float64)
    for m in range(L):
        H[m, :n_edges[m]], T[m, :n_edges[m]], eps[m, :n_edges[m]] = heads[m], tails[m], epochs_per_sample[m]
    per_negative = eps.astype(np.float32) / np.float32(negative_sample_rate)
    next_negative = per_negative.copy()
    next_sample = eps.astype(np.float32)
    emb = np.ascontiguousarray(np.stack(embeddings), np.float32)
    alpha = initial_alpha
    for n in tqdm(range(n_epochs), disable=not progress, desc="aligned layout", unit="epoch"):
        aligned_epoch(emb, H, T, n_edges, eps, a, b, weights, relations, rng_state, gamma, lambda_, emb.shape[2],
                      True, alpha, per_negative, next_negative, next_sample, n)
        alpha = initial_alpha * (1.0 - (float(n) / float(n_epochs)))
    return [emb[m].copy() for m in range(L)]


__all__ = ["aligned_epoch", "aligned_sgd"]
