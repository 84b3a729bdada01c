"""Does a smaller sample recover the atlas's cell directions? (method.md §6 "100,000 activations was often
sufficient", §7 B8).

The atlas of all n samples and an atlas of a random subset of them are binned on the same layout at the
same grid sizes with the same cell threshold (``grid.grid_levels``: the atlas's own binning). For every
cell mean of the full atlas (its icon direction) the measure is the best cosine to any cell mean of the
subset atlas (`best_cosines`); §7 B8 proposes that each reaches >= 0.9 at G = 20 for 100k of 1M samples.
The cosine to the subset's mean of the *same* cell (when the subset keeps that cell) is reported too.
Sharing the layout isolates what the number of samples does to the cell means from what a second UMAP
would do to the map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError
from ..grid import GridLevel, grid_levels

THRESHOLD = 0.9
_BLOCK = 4096


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def best_cosines(reference: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[m, c] reference vectors, [k, c] candidates -> [m] float64: each reference row's highest cosine
    to any candidate row (a zero vector has cosine 0 to everything; no candidates: all NaN)."""
    ref, cand = np.asarray(reference), np.asarray(candidates)
    if ref.ndim != 2 or cand.ndim != 2 or (len(cand) and cand.shape[1] != ref.shape[1]):
        raise ConfigError(f"reference [m, c] and candidates [k, c] must have the same width, got "
                          f"{ref.shape} and {cand.shape}")
    if len(cand) == 0:
        return np.full(len(ref), np.nan)
    u, v = _unit(ref), _unit(cand)
    out = np.empty(len(ref))
    for a in range(0, len(ref), _BLOCK):
        out[a:a + _BLOCK] = (u[a:a + _BLOCK] @ v.T).max(axis=1)
    return out


def same_cell_cosines(full: GridLevel, sub: GridLevel) -> np.ndarray:
    """[m] cosine of each cell mean of `full` to the mean of the same (i, j) cell in `sub` (NaN where
    `sub` does not keep that cell); both levels must have the same G."""
    if full.size != sub.size:
        raise ConfigError(f"levels of different sizes: {full.size} and {sub.size}")
    out = np.full(len(full.i), np.nan)
    if len(sub.i) == 0:
        return out
    u, v = _unit(full.mean_activation), _unit(sub.mean_activation)
    for c in range(len(full.i)):
        s = sub.cell_at(int(full.i[c]), int(full.j[c]))
        if s >= 0:
            out[c] = float(u[c] @ v[s])
    return out


def recovery(full: GridLevel, sub: GridLevel, threshold: float = THRESHOLD) -> dict:
    """How well `sub`'s cell means recover `full`'s at one grid size: cells of each, the share of full
    cells whose best cosine (`best_cosines`) is >= threshold, its median / minimum / mean, the share of
    full cells the subset keeps too and their mean same-cell cosine."""
    best = best_cosines(full.mean_activation, sub.mean_activation) if len(full.i) else np.zeros(0)
    same = same_cell_cosines(full, sub)
    kept = same[np.isfinite(same)]

    def r(v):
        return None if v is None or not np.isfinite(v) else round(float(v), 4)

    has = len(best) > 0 and len(sub.i) > 0
    return {"grid": int(full.size), "cells_all": int(len(full.i)), "cells_subset": int(len(sub.i)),
            f"share_best_cosine_ge_{threshold:g}": r(np.mean(best >= threshold)) if len(best) else None,
            "median_best_cosine": r(np.median(best)) if has else None,
            "min_best_cosine": r(best.min()) if has else None,
            "mean_best_cosine": r(best.mean()) if has else None,
            "share_cells_kept_by_subset": r(len(kept) / len(full.i)) if len(full.i) else None,
            "mean_same_cell_cosine": r(kept.mean()) if len(kept) else None}


def subset_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """[size] sorted int64 rows drawn without replacement from range(n) (seeded)."""
    if not 1 <= size <= n:
        raise ConfigError(f"subset size must be in [1, {n}], got {size}")
    rng = np.random.default_rng([int(seed), 100_003])
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def sample_size_check(coords: np.ndarray, acts: np.ndarray, full_levels: Sequence[GridLevel], size: int,
                      seed: int = 0, threshold: float = THRESHOLD) -> list[dict]:
    """Bin a random subset of `size` rows of (coords [n, 2], acts [n, c]) at the sizes of `full_levels`
    (the atlas's levels over all n rows), each with that level's cell threshold (min_count), and
    measure per level how well the subset's cell means recover the atlas's (`recovery`). One dict per
    level, in order."""
    n = len(coords)
    if getattr(acts, "shape", (None,))[0] != n:
        raise ConfigError(f"activations must have the layout's {n} rows, got shape {getattr(acts, 'shape', None)}")
    rows = subset_rows(n, size, seed)
    xy, x = np.asarray(coords)[rows], np.asarray(acts[rows], np.float32)
    sub: dict[tuple[int, int], GridLevel] = {}
    for mc in sorted({int(lv.min_count) for lv in full_levels}):
        sizes = [int(lv.size) for lv in full_levels if int(lv.min_count) == mc]
        for lv in grid_levels(xy, x, sizes, min_count=mc, topk=0, n_closest=0):
            sub[(lv.size, mc)] = lv
    return [{**recovery(f, sub[(int(f.size), int(f.min_count))], threshold), "min_count": int(f.min_count),
             "subset": int(size), "samples": int(n)} for f in full_levels]


__all__ = ["best_cosines", "same_cell_cosines", "recovery", "subset_rows", "sample_size_check", "THRESHOLD"]
