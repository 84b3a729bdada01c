"""Class activation atlases (method.md §3.2): keep only the activations that support one class.

Two filters over the attribution matrix ``attr`` [n, K] (K classes):

* ``winner``: rows i with argmax_k attr[i, k] == cls (the reference's ``argsort(-attr)[0:1]``).
* ``top``:    the `top` rows with the largest attr[i, cls], keeping only attr[i, cls] > 0.

Both return sorted unique row indices (the reference notebook concatenated filters with duplicates;
we never do). The subset gets its own layout and one grid level.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..grid import GridLevel, grid_level
from ..layout import Layout, LayoutConfig, compute_layout

FILTERS = ("winner", "top")
_CHUNK = 65536


def _check_attr(attributions, cls: int) -> tuple[int, int]:
    if getattr(attributions, "ndim", 0) != 2:
        raise ConfigError(f"attributions must be a [n, classes] array, got shape "
                        f"{getattr(attributions, 'shape', None)}")
    n, k = attributions.shape
    if not 0 <= int(cls) < k:
        raise ConfigError(f"class index {cls} out of range [0, {k})")
    return n, k


def winner_rows(attributions: np.ndarray, cls: int, chunk_rows: int = _CHUNK) -> np.ndarray:
    """[n, K] attributions -> sorted int64 rows whose argmax attribution is `cls` (first max on ties).

    Reads `chunk_rows` rows at a time (float16 memmaps are fine).
    """
    n, _ = _check_attr(attributions, cls)
    out = []
    for a in range(0, n, chunk_rows):
        block = np.asarray(attributions[a:a + chunk_rows], dtype=np.float32)
        out.append(np.flatnonzero(block.argmax(axis=1) == cls) + a)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def top_rows(attributions: np.ndarray, cls: int, top: int = 2000) -> np.ndarray:
    """[n, K] attributions -> sorted int64 rows of the `top` largest attr[:, cls], positive values only.

    Fewer than `top` rows come back when fewer are positive. Ties at the cut are broken by row order
    (a stable sort on the negated value).
    """
    _check_attr(attributions, cls)
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    col = np.asarray(attributions[:, int(cls)], dtype=np.float32)
    pos = np.flatnonzero(col > 0)
    if len(pos) > top:
        order = np.argsort(-col[pos], kind="stable")[:top]
        pos = pos[order]
    return np.sort(pos).astype(np.int64)


def class_filter(attributions: np.ndarray, cls: int, mode: str = "winner", top: int = 2000) -> np.ndarray:
    """Rows supporting class `cls` (method.md §3.2).

    attributions: [n, K] (any float dtype, memmap ok); cls: class index; mode: "winner" | "top";
    top: how many rows "top" keeps at most. Returns [m] int64 sorted unique row indices.
    """
    if mode == "winner":
        return winner_rows(attributions, cls)
    if mode == "top":
        return top_rows(attributions, cls, top)
    raise ConfigError(f"class filter must be one of {', '.join(FILTERS)}, got {mode!r}")


def small_n_layout_config(cfg: LayoutConfig | None, n: int) -> LayoutConfig:
    """The class-atlas layout config adapted to a subset of `n` rows.

    Default: UMAP n_neighbors 20, min_dist 0.01, cosine (the reference class notebook, §3.2).
    n_neighbors is lowered to max(2, min(n_neighbors, n // 4)) for small subsets (a UMAP neighbourhood
    spanning most points gives a blob), and never reaches n - 1; t-SNE perplexity defaults inside
    ``compute_layout`` already adapt to n.
    """
    cfg = cfg or LayoutConfig(method="umap", n_neighbors=20, min_dist=0.01, metric="cosine")
    if cfg.method == "umap":
        k = max(2, min(cfg.n_neighbors, n // 4, n - 1))
        if k != cfg.n_neighbors:
            cfg = dataclasses.replace(cfg, n_neighbors=k)
    return cfg


@dataclass
class ClassAtlas:
    """A class activation atlas.

    cls:     the class index; mode / top: the filter used
    rows:    [m] int64 sorted unique row ids into the run's layer arrays
    coords:  [m, 2] float32 layout of the subset in [0, 1]^2 (row r of coords is run row rows[r])
    layout:  the Layout (its config and params record what was actually used)
    level:   GridLevel of size `grid` over the subset; its member_rows / closest index the *subset*
             (0..m-1): map back with ``rows[level.members(c)]``
    """

    cls: int
    mode: str
    top: int
    rows: np.ndarray
    coords: np.ndarray
    layout: Layout
    level: GridLevel

    def run_rows(self, cell: int) -> np.ndarray:
        """Run row ids of kept cell `cell`'s members."""
        return self.rows[self.level.members(cell)]


def class_atlas(run, layer: str, cls: int, mode: str = "winner", top: int = 2000, grid: int = 8,
                layout_cfg: LayoutConfig | None = None, min_count: int = 4,
                progress: bool = False) -> ClassAtlas:
    """Filter a run's layer to class `cls`, lay the subset out on its own and bin it on a grid x grid.

    run: an ``actatlas.Run`` with attributions for `layer`; cls: class index (resolve names with
    ``actatlas.models.spec.resolve_class``). min_count 4 is the reference's ``min_density``.
    """
    attr = run.attributions(layer)
    if attr is None:
        raise ConfigError(f"run has no attributions for layer {layer!r}; collect with attributions to build "
                        "a class atlas")
    rows = class_filter(attr, cls, mode, top)
    if len(rows) < 4:
        raise ConfigError(f"only {len(rows)} activations pass the {mode!r} filter for class {cls}; "
                        "need at least 4 (try the 'top' filter or a larger run)")
    acts = np.asarray(run.activations(layer)[rows], dtype=np.float32)
    sub_attr = np.asarray(attr[rows], dtype=np.float32)
    cfg = small_n_layout_config(layout_cfg, len(rows))
    layout = compute_layout(acts, cfg, progress=progress)
    level = grid_level(layout.coords, acts, grid, attributions=sub_attr, min_count=min_count)
    return ClassAtlas(cls=int(cls), mode=mode, top=int(top), rows=rows, coords=layout.coords,
                      layout=layout, level=level)
