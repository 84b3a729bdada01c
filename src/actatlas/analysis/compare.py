"""Two-class comparison ("class gradient", method.md §3.3).

x = attribution difference right - left, divided by the 99th percentile of its magnitude (no
re-centering: x = 0 stays the decision boundary), clipped to [-1, 1]. Negative x = more attributed to
the left class, positive x = to the right class. y = a 1-D embedding of the activations normalised to
[0, 1]. The grid bins ((x + 1) / 2, y) so that for an even grid size G, columns i < G/2 hold exactly
the rows with x < 0 (left side) and columns i >= G/2 those with x >= 0 (right side).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ..grid import GridLevel, grid_level
from ..layout import normalize_layout
from .classes import top_rows, winner_rows

Y_METHODS = ("tsne", "umap", "pca")


def comparison_axis(attributions: np.ndarray, left: int, right: int) -> np.ndarray:
    """[n, K] attributions -> [n] float32 x in [-1, 1].

    d = attr[:, right] - attr[:, left]; d /= P99(|d|); clip to [-1, 1]. When P99(|d|) == 0 the scale is
    max(|d|) instead, and when d is all zero x is all zero.
    """
    if left == right:
        raise ConfigError("left and right classes must differ")
    a = np.asarray(attributions)
    d = np.asarray(a[:, right], dtype=np.float64) - np.asarray(a[:, left], dtype=np.float64)
    if len(d) == 0:
        return np.zeros(0, np.float32)
    scale = float(np.percentile(np.abs(d), 99))
    if scale <= 0:
        scale = float(np.abs(d).max())
    if scale <= 0:
        return np.zeros(len(d), np.float32)
    return np.clip(d / scale, -1.0, 1.0).astype(np.float32)


def comparison_rows(attributions: np.ndarray, left: int, right: int, top: int = 2000) -> np.ndarray:
    """Sorted unique union of the "top" and "winner" rows of both classes (method.md §3.3 step 1,
    without the reference's duplicates)."""
    parts = [f(attributions, c) for c in (left, right) for f in (winner_rows, lambda a, c: top_rows(a, c, top))]
    return np.unique(np.concatenate(parts)).astype(np.int64)


def embed_1d(acts: np.ndarray, method: str = "tsne", seed: int = 0, metric: str = "cosine",
             perplexity: float | None = None, learning_rate: float | str = 10.0,
             n_neighbors: int = 20) -> np.ndarray:
    """[n, c] activations -> [n] float32 1-D embedding normalised to [0, 1] (``normalize_layout``).

    tsne: sklearn TSNE(n_components=1, metric, perplexity=min(50, (n-1)/3) by default,
    learning_rate=10 as the reference notebook); umap: umap-learn with n_components=1 and
    n_neighbors adapted to small n; pca: the first centered principal component.
    """
    x = np.asarray(acts, dtype=np.float32)
    n = len(x)
    if n < 4:
        raise ConfigError(f"a 1-D embedding needs at least 4 rows, got {n}")
    if method == "pca":
        xc = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        v = vt[0]
        v = v * (np.sign(v[np.argmax(np.abs(v))]) or 1.0)
        raw = xc @ v
    elif method == "tsne":
        from sklearn.manifold import TSNE

        p = perplexity if perplexity is not None else min(50.0, (n - 1) / 3)
        raw = TSNE(n_components=1, metric=metric, perplexity=p, learning_rate=learning_rate,
                   init="random", random_state=seed).fit_transform(x)[:, 0]
    elif method == "umap":
        from ..layout import import_umap

        umap = import_umap()
        k = max(2, min(n_neighbors, n // 4, n - 1))
        raw = umap.UMAP(n_components=1, n_neighbors=k, min_dist=0.01, metric=metric,
                        random_state=seed, n_jobs=1).fit_transform(x)[:, 0]
    else:
        raise ConfigError(f"y method must be one of {', '.join(Y_METHODS)}, got {method!r}")
    return normalize_layout(np.asarray(raw, np.float64)[:, None])[:, 0].astype(np.float32)


def cell_sides(level: GridLevel) -> np.ndarray:
    """[m] int8 side of each kept cell of a comparison grid: -1 left (i < G/2), +1 right (i >= G/2 for
    even G); for odd G the middle column straddles x = 0 and gets 0."""
    G = level.size
    i2 = 2 * level.i.astype(np.int64)
    side = np.where(i2 + 2 <= G, -1, np.where(i2 >= G, 1, 0))
    return side.astype(np.int8)


@dataclass
class Candidate:
    """A candidate patch cell: on `side`'s half of the comparison, top attributed class `top_class`
    (neither left nor right), with mean attribution `value` to it."""

    cell: int
    side: str          # "left" | "right"
    side_class: int    # the class whose half it sits on
    i: int
    j: int
    n: int
    top_class: int
    top_name: str | None
    value: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def candidate_cells(level: GridLevel, sides: np.ndarray, left: int, right: int,
                    class_names: list[str] | None = None) -> list[Candidate]:
    """Cells on one class's side (sides[c] = -1 left, +1 right, 0 neither) whose top attributed class is
    a third class; sorted by that class's mean attribution, descending (ties by cell order)."""
    sides = np.asarray(sides)
    if len(sides) != level.m:
        raise ConfigError(f"sides has {len(sides)} entries for {level.m} cells")
    label = level.label
    out = []
    for c in range(level.m):
        t = int(label[c])
        if t < 0 or t in (left, right) or sides[c] == 0:
            continue
        s = "left" if sides[c] < 0 else "right"
        out.append(Candidate(cell=c, side=s, side_class=int(left if s == "left" else right),
                             i=int(level.i[c]), j=int(level.j[c]), n=int(level.count[c]), top_class=t,
                             top_name=class_names[t] if class_names is not None else None,
                             value=float(level.top_values[c, 0])))
    out.sort(key=lambda k: -k.value)
    return out


@dataclass
class Comparison:
    """Result of ``compare``.

    rows:   [n] int64 sorted unique run rows (union of top + winner sets of both classes)
    x:      [n] float32 in [-1, 1] (comparison_axis over `rows`); y: [n] float32 in [0, 1]
    coords: [n, 2] float32 ((x + 1) / 2, y): the grid's input
    level:  GridLevel (members index the subset 0..n-1; map with rows[...])
    labels: [m] top class name of each kept cell
    sides:  [m] int8 (cell_sides)
    candidates: candidate patch cells (candidate_cells)
    """

    left: int
    right: int
    rows: np.ndarray
    x: np.ndarray
    y: np.ndarray
    coords: np.ndarray
    level: GridLevel
    labels: list[str]
    sides: np.ndarray
    candidates: list[Candidate] = field(default_factory=list)
    y_method: str = "tsne"


def compare(run, layer: str, left: int, right: int, top: int = 2000, grid: int = 10,
            y_method: str = "tsne", min_count: int = 4, seed: int = 0) -> Comparison:
    """Two-class comparison of `left` vs `right` on a run's layer (method.md §3.3)."""
    attr = run.attributions(layer)
    if attr is None:
        raise ConfigError(f"run has no attributions for layer {layer!r}; a comparison needs them")
    rows = comparison_rows(attr, left, right, top)
    if len(rows) < 4:
        raise ConfigError(f"only {len(rows)} activations support classes {left} and {right}")
    sub_attr = np.asarray(attr[rows], dtype=np.float32)
    acts = np.asarray(run.activations(layer)[rows], dtype=np.float32)
    x = comparison_axis(sub_attr, left, right)
    y = embed_1d(acts, y_method, seed=seed)
    coords = np.stack([(x + 1.0) / 2.0, y], axis=1).astype(np.float32)
    level = grid_level(coords, acts, grid, attributions=sub_attr, min_count=min_count)
    names = list(run.class_names)
    labels = [names[t] if t >= 0 else "" for t in level.label]
    sides = cell_sides(level)
    cands = candidate_cells(level, sides, left, right, names)
    return Comparison(left=int(left), right=int(right), rows=rows, x=x, y=y, coords=coords, level=level,
                      labels=labels, sides=sides, candidates=cands, y_method=y_method)
