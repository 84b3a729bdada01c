"""Grid stage: bin a normalized layout into G x G cells at several resolutions (method.md §1.6, §1.7, §2).

Axis convention (used by every consumer of a GridLevel):

    i = column index = x cell, from layout dim 0 (coords[:, 0]), increasing to the right;
    j = row index    = y cell, from layout dim 1 (coords[:, 1]), increasing *upward*.

So on an image/canvas with row 0 at the top, cell (i, j) is drawn at column i, row G - 1 - j (the
notebook ``render_layout`` convention). Lucid's recipe canvas and the Distill viewer instead put
layout dim 0 on rows (method.md §0 "Orientation"); that only matters when matching published pictures.

Binning: cell = min(floor(v * G), G - 1) per axis (the recipe's ``digitize`` with the last edge at
+inf: half-open cells, v = 1.0 lands in G - 1; values outside [0, 1] are clamped to the border cells).
Cells are kept iff count >= ``min_count``. The recipe keeps iff count > threshold (threshold 5), so the
default ``min_count=6`` reproduces it; ``min_count=1`` keeps every non-empty cell. Kept cells are ordered
by (i, j), i-major.

Cost: O(n) per level (bincount / torch ``index_add_`` scatter-adds, a stable sort for the member
lists), never a loop over cells. Levels dividing the finest one share one pass over the activations:
sums are accumulated at the finest level and added up r x r into coarser ones, whose cells are *derived*
(parent = (i // r, j // r)), so the nesting of §7.A11 holds by construction (and equals direct binning
for float32 coords: v * G is exact in float64). A second pass finds each cell's closest members.
Inputs may be float16 memmaps, read ``chunk_rows`` rows at a time into float32 and scatter-added into
float64 (activations) / float32 (attributions) sums over used cells: never [G*G, classes], never a full
float32 copy of [n, c].
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import ConfigError, UserError
from .store import drop_pages, layer_dirname, save_npz_atomic, write_json_atomic

MAX_GRID = 8192         # cells per side (bookkeeping arrays have G*G entries)
_FLUSH_ROWS = 1 << 18  # rows summed in float32 before adding into the float64 totals
_BLOCK = 2048  # rows per gather in the closest-member pass (keeps the gathered means in cache)
AXES_NOTE = ("i = x cell from layout dim 0 (rightward), j = y cell from layout dim 1 (upward); "
             "cell = min(floor(v*G), G-1)")


@dataclass
class GridLevel:
    """One resolution G of the atlas grid; m = number of kept cells, n = number of layout rows.

    size:             G
    i, j:             [m] int32 cell coordinates (see module docstring for the axis convention)
    count:            [m] int64 members per cell
    mean_activation:  [m, c] float32 unweighted mean of member activations (the icon direction)
    mean_attribution: [m, classes] float32 mean member attribution, or None
    top_classes:      [m, k] int32 classes by mean attribution, descending ([m, 0] without attributions)
    top_values:       [m, k] float32 their mean attributions
    member_offsets:   [m + 1] int64 CSR offsets into member_rows
    member_rows:      [sum(count)] int64 row ids of each cell's members, ascending within a cell
    closest:          [m, kc] int64 the kc members with highest cosine to the cell mean, descending,
                      -1 padded
    cell_of_row:      [n] int32 kept-cell index of each row, -1 when its cell was dropped
    min_count:        cells with count >= min_count were kept
    """

    size: int
    i: np.ndarray
    j: np.ndarray
    count: np.ndarray
    mean_activation: np.ndarray
    mean_attribution: np.ndarray | None
    top_classes: np.ndarray
    top_values: np.ndarray
    member_offsets: np.ndarray
    member_rows: np.ndarray
    closest: np.ndarray
    cell_of_row: np.ndarray
    min_count: int

    m = property(lambda self: len(self.i), doc="Number of kept cells.")
    n_rows = property(lambda self: len(self.cell_of_row), doc="Number of layout rows (kept or not).")
    threshold = property(lambda self: self.min_count - 1,
                         doc="The recipe's strict threshold: kept iff count > threshold (= min_count - 1).")
    n_dropped = property(lambda self: int(self.n_rows - self.count.sum()),
                         doc="Rows whose cell had fewer than min_count members.")

    @property
    def label(self) -> np.ndarray:
        """[m] int32 the class each cell most supports (argmax mean attribution), -1 without them."""
        if self.top_classes.shape[1] == 0:
            return np.full(self.m, -1, np.int32)
        return self.top_classes[:, 0]

    def members(self, cell: int) -> np.ndarray:
        """Row ids (ascending) of kept cell number `cell`."""
        return self.member_rows[self.member_offsets[cell]:self.member_offsets[cell + 1]]

    def cell_at(self, i: int, j: int) -> int:
        """Index of the kept cell at (i, j), or -1."""
        keys, key = self.i.astype(np.int64) * self.size + self.j, int(i) * self.size + int(j)
        pos = int(np.searchsorted(keys, key))
        return pos if pos < len(keys) and keys[pos] == key else -1


def cell_index(coords: np.ndarray, G: int) -> np.ndarray:
    """[n, 2] coords in [0, 1] -> [n, 2] int64 cells: ij[:, 0] = i (x cell), ij[:, 1] = j (y cell).

    cell = min(floor(v * G), G - 1), clamped to [0, G - 1] for values outside [0, 1].
    """
    v = np.asarray(coords, dtype=np.float64)
    ij = np.floor(v * G)
    np.clip(ij, 0, G - 1, out=ij)
    return ij.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# the stage

def grid_level(coords: np.ndarray, acts: np.ndarray, G: int, attributions: np.ndarray | None = None,
               min_count: int = 6, topk: int = 5, n_closest: int = 8,
               chunk_rows: int = 65536) -> GridLevel:
    """One level: see ``grid_levels``."""
    return grid_levels(coords, acts, (G,), attributions, min_count, topk, n_closest, chunk_rows)[0]


def grid_levels(coords: np.ndarray, acts: np.ndarray, levels: Sequence[int] = (20, 40, 80),
                attributions: np.ndarray | None = None, min_count: int = 6, topk: int = 5,
                n_closest: int = 8, chunk_rows: int = 65536, progress: bool = False) -> list[GridLevel]:
    """Bin a layout at every G in `levels` (method.md §1.6-1.7, §2); one GridLevel per entry, in order.

    coords: [n, 2] in [0, 1]^2; acts: [n, c]; attributions: [n, classes] or None (both may be float16
    memmaps). A level with no cell reaching min_count has m = 0 (no error). Two chunked passes over
    `acts` (one over `attributions`) whatever the number of levels; progress=True shows tqdm bars.
    """
    _, c, levels = _validate(coords, acts, attributions, levels, min_count, topk, n_closest, chunk_rows)
    return _grid_levels(coords, acts, levels, attributions, min_count, topk, n_closest, chunk_rows, progress, c)


def _grid_levels(coords, acts, levels, attributions, min_count, topk, n_closest, chunk_rows, progress,
                 c) -> list[GridLevel]:
    has_attr = attributions is not None
    n_cls = attributions.shape[1] if has_attr else 0

    groups = _groups(levels)                                  # [(F, [G, ...]), ...]
    plans = [_plan(coords, F, sizes, min_count) for F, sizes in groups]

    # pass 1: scatter-add activations (and attributions) into the needed fine cells of every group
    act_acc = [_Sums(p["m_need"], c, np.float64) for p in plans]
    attr_acc = [_Sums(p["m_need"], n_cls, np.float32) if has_attr else None for p in plans]
    attr_reader = _Reader(attributions, chunk_rows) if has_attr else None
    for a, x in _chunks(acts, chunk_rows, progress, "grid: means"):
        b = a + len(x)
        xa = attr_reader.read(a, b) if has_attr else None
        for p, acc, aacc in zip(plans, act_acc, attr_acc):
            acc.add(p["row_need"][a:b], x)
            if has_attr:
                aacc.add(p["row_need"][a:b], xa)
        if has_attr:
            drop_pages(attributions, a, b)

    out: dict[int, GridLevel] = {}
    for p, acc, aacc in zip(plans, act_acc, attr_acc):
        sums, asums = acc.total(), None if aacc is None else aacc.total()
        for G in p["sizes"]:
            out[G] = _level_from_fine(p, G, sums, asums, topk, n_closest, min_count, c)

    # pass 2: the closest members of every cell (cosine to the cell mean)
    todo = [lv for lv in out.values() if n_closest > 0 and lv.m > 0]
    if todo:
        _closest(acts, todo, n_closest, chunk_rows, progress)
    return [out[G] for G in levels]


def _validate(coords, acts, attributions, levels, min_count, topk, n_closest, chunk_rows):
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ConfigError(f"layout coords must be [n, 2], got shape {coords.shape}")
    if getattr(acts, "ndim", 0) != 2 or acts.shape[0] != len(coords):
        raise ConfigError(f"activations must be [n, c] with n = {len(coords)} layout rows, got shape "
                        f"{getattr(acts, 'shape', None)}")
    if attributions is not None and (attributions.ndim != 2 or attributions.shape[0] != len(coords)):
        raise ConfigError(f"attributions must be [n, classes] with n = {len(coords)}, got shape "
                        f"{attributions.shape}")
    if not np.isfinite(coords).all():
        raise ConfigError("layout coords contain NaN or infinite values")
    levels = [int(g) for g in levels] if not isinstance(levels, (int, np.integer)) else [int(levels)]
    if not levels or any(g < 1 or g > MAX_GRID for g in levels):
        raise ConfigError(f"grid sizes must be integers in [1, {MAX_GRID}], got {levels}")
    for name, v, lo in (("min_count", min_count, 1), ("topk", topk, 0), ("n_closest", n_closest, 0),
                        ("chunk_rows", chunk_rows, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
    return len(coords), acts.shape[1], levels


def _groups(levels: list[int]) -> list[tuple[int, list[int]]]:
    """Group sizes so that every size in a group divides the group's finest size F."""
    groups: list[tuple[int, list[int]]] = []
    for G in sorted(set(levels), reverse=True):
        for F, sizes in groups:
            if F % G == 0:
                sizes.append(G)
                break
        else:
            groups.append((G, [G]))
    return groups


def _plan(coords, F: int, sizes: list[int], min_count: int) -> dict:
    """Cell bookkeeping of one group (no activations read): fine cells at F, kept cells per size."""
    n = len(coords)
    ij = cell_index(coords, F)
    fkey = ij[:, 0] * F + ij[:, 1]                              # [n] fine cell key
    fcount = np.bincount(fkey, minlength=F * F)                 # [F*F] counts (ints only)
    fne = np.flatnonzero(fcount)                                # non-empty fine keys, ascending
    fi, fj = fne // F, fne % F
    needed = np.zeros(len(fne), bool)
    levels = {}
    for G in sizes:
        r = F // G
        pkey = (fi // r) * G + fj // r                          # parent key of each non-empty fine cell
        cnt = np.bincount(pkey, weights=fcount[fne], minlength=G * G).astype(np.int64)
        kept = np.flatnonzero(cnt >= min_count)
        cmap = np.full(G * G, -1, np.int64)
        cmap[kept] = np.arange(len(kept))
        fine_to_cell = cmap[pkey]                               # [len(fne)] kept index or -1
        needed |= fine_to_cell >= 0
        levels[G] = dict(kept=kept, count=cnt[kept], fine_to_cell=fine_to_cell)
    need_idx = np.full(len(fne), -1, np.int64)
    need_idx[needed] = np.arange(int(needed.sum()))
    fmap = np.zeros(F * F, np.int64)
    fmap[fne] = np.arange(len(fne))
    fpos = fmap[fkey]                                           # [n] position of the row's cell in fne
    row_need = need_idx[fpos] if n else np.zeros(0, np.int64)  # [n] accumulator row or -1
    return dict(F=F, sizes=sizes, n=n, fpos=fpos, row_need=row_need, need_idx=need_idx,
                m_need=int(needed.sum()), levels=levels)


def _chunks(array, chunk_rows: int, progress: bool, desc: str):
    """Yield (start, [b, d] float32 chunk); the chunk is only valid until the next one is read."""
    n = len(array)
    reader = _Reader(array, chunk_rows)
    starts = range(0, n, chunk_rows)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, total=-(-n // chunk_rows), unit="chunk", leave=False)
    for a in starts:
        yield a, reader.read(a, min(n, a + chunk_rows))
        drop_pages(array, a, a + chunk_rows)  # a memmap's pages read so far need not stay resident


class _Reader:
    """Reads rows [a, b) of an [n, d] array (memmap ok) as float32 into one reused buffer.

    Casting float16 with torch ``copy_`` into a reused buffer measured 4-5x faster here than numpy's
    ``astype`` (numpy's float16 cast is scalar, and a fresh 128 MB array per chunk costs page faults)."""

    def __init__(self, array, chunk_rows: int):
        self.array, self.chunk_rows, self.buf = array, chunk_rows, None

    def read(self, a: int, b: int) -> np.ndarray:
        x = np.asarray(self.array[a:b])
        if x.dtype == np.float32:
            return x if x.flags.writeable and x.flags.c_contiguous else np.array(x, order="C")
        if x.dtype.kind not in "fiu" or x.ndim != 2:
            return np.array(x, dtype=np.float32, order="C")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        if self.buf is None:
            self.buf = torch.empty((min(self.chunk_rows, len(self.array)), x.shape[1]), dtype=torch.float32)
        out = self.buf[:len(x)]
        with warnings.catch_warnings():   # a read-only memmap: torch warns that writes would be unsafe;
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            src = torch.from_numpy(x)      # we only read it
        out.copy_(src)
        return out.numpy()


class _Sums:
    """Row sums by index, O(rows * d): ``add(idx, x)`` does sums[idx[r]] += x[r] (idx -1 = skip).

    Rows are scatter-added (torch ``index_add_``) into a float32 buffer, which is flushed into the
    float64 total every ``_FLUSH_ROWS`` rows (so no float32 running sum spans more rows than that);
    ``dtype=float32`` accumulates in float32 only. A spare last row takes the skipped rows (cheaper than
    copying the chunk to drop them). Memory: [m + 1, d] float32 (+ float64)."""

    def __init__(self, m: int, d: int, dtype):
        self.m, self.pending = m, 0
        self.buf = torch.zeros((m + 1, d), dtype=torch.float32)
        self.total64 = np.zeros((m + 1, d), np.float64) if dtype == np.float64 else None

    def add(self, idx: np.ndarray, x: np.ndarray) -> None:
        if len(idx) == 0 or x.shape[1] == 0:
            return
        idx = np.where(idx >= 0, idx, self.m)
        self.buf.index_add_(0, torch.from_numpy(idx), torch.from_numpy(x))
        self.pending += len(idx)
        if self.total64 is not None and self.pending >= _FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        self.total64 += self.buf.numpy()
        self.buf.zero_()
        self.pending = 0

    def total(self) -> np.ndarray:
        """[m, d] sums (float64, or float32 for a float32 accumulator)."""
        if self.total64 is None:
            return self.buf.numpy()[:-1]
        if self.pending:
            self._flush()
        return self.total64[:-1]


def _level_from_fine(p: dict, G: int, acc: np.ndarray, aacc: np.ndarray | None, topk: int,
                     n_closest: int, min_count: int, c: int) -> GridLevel:
    info = p["levels"][G]
    kept, count = info["kept"], info["count"]
    m = len(kept)
    # fine accumulator rows -> kept cells of this level
    f2c = info["fine_to_cell"]                                 # [len(fne)]
    src = p["need_idx"] >= 0
    dst = f2c[src]                                             # cell of each accumulator row
    sums = _sum_rows(acc, dst, m)
    denom = np.maximum(count, 1)[:, None]
    mean_act = np.divide(sums, denom, out=sums).astype(np.float32)
    mean_attr = None
    if aacc is not None:
        asum = _sum_rows(aacc, dst, m)
        mean_attr = np.divide(asum, denom, out=asum).astype(np.float32, copy=False)
    top_c, top_v = _topk(mean_attr, topk, m)
    cell_of_row = f2c[p["fpos"]].astype(np.int32) if p["n"] else np.zeros(0, np.int32)
    order = np.argsort(cell_of_row, kind="stable")
    n_drop = int(np.count_nonzero(cell_of_row < 0))
    offsets = np.zeros(m + 1, np.int64)
    np.cumsum(count, out=offsets[1:])
    return GridLevel(size=G, i=(kept // G).astype(np.int32), j=(kept % G).astype(np.int32),
                     count=count.astype(np.int64), mean_activation=mean_act, mean_attribution=mean_attr,
                     top_classes=top_c, top_values=top_v, member_offsets=offsets,
                     member_rows=order[n_drop:].astype(np.int64),
                     closest=np.full((m, n_closest), -1, np.int64), cell_of_row=cell_of_row,
                     min_count=int(min_count))


def _sum_rows(acc: np.ndarray, dst: np.ndarray, m: int) -> np.ndarray:
    """out[dst[r]] += acc[r] for dst >= 0 -> [m, d] in acc's dtype (torch index_add_, O(rows * d))."""
    acc = np.ascontiguousarray(acc)
    out = torch.zeros((m + 1, acc.shape[1]), dtype=torch.from_numpy(acc[:0]).dtype)   # +1: spare row
    if len(dst) and acc.shape[1]:
        out.index_add_(0, torch.from_numpy(np.where(dst >= 0, dst, m).astype(np.int64)),
                       torch.from_numpy(acc))
    return out.numpy()[:m]


def _topk(mean_attr: np.ndarray | None, topk: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k classes per row of [m, classes], descending by value (ties: lower class id first)."""
    if mean_attr is None or topk == 0 or mean_attr.shape[1] == 0:
        return np.zeros((m, 0), np.int32), np.zeros((m, 0), np.float32)
    k = min(topk, mean_attr.shape[1])
    if k < mean_attr.shape[1]:
        idx = np.argpartition(-mean_attr, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(k), (m, k)).copy()
    vals = np.take_along_axis(mean_attr, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=-1)
    idx = np.take_along_axis(idx, order, axis=1)
    return idx.astype(np.int32), np.take_along_axis(vals, order, axis=1).astype(np.float32)


def _closest(acts, levels: list[GridLevel], kc: int, chunk_rows: int, progress: bool) -> None:
    """Fill ``closest`` of each level: second chunked pass computing cos(row, its cell mean)."""
    n = len(acts)
    units = []
    for lv in levels:
        mu = lv.mean_activation
        norm = np.linalg.norm(mu, axis=1, keepdims=True)
        units.append(np.where(norm > 0, mu / np.where(norm > 0, norm, 1), 0).astype(np.float32))
    scores = [np.zeros(n, np.float32) for _ in levels]
    for a, x in _chunks(acts, chunk_rows, progress, "grid: closest"):
        rnorm = np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-30)
        for lv, u, sc in zip(levels, units, scores):
            cells = lv.cell_of_row[a:a + len(x)]
            safe = np.maximum(cells, 0)          # rows of dropped cells get a score that is never read
            # numpy take + einsum in cache-sized blocks: ~5x faster than one chunk-sized gather
            for s0 in range(0, len(x), _BLOCK):
                s1 = min(s0 + _BLOCK, len(x))
                sc[a + s0:a + s1] = np.einsum("ij,ij->i", x[s0:s1], np.take(u, safe[s0:s1], axis=0))
            sc[a:a + len(x)] /= rnorm
    for lv, sc in zip(levels, scores):
        rows = lv.member_rows
        cell = np.repeat(np.arange(lv.m), lv.count)
        # one float64 sort key: cell id + (1 - cos) / 2 scaled into [0, 1) (exact for float32 cosines up
        # to ~2^-30; a stable sort keeps ties in ascending row order) -- ~4x faster than a lexsort
        key = cell + (1.0 - np.clip(sc[rows].astype(np.float64), -1, 1)) * (0.5 * (1 - 2.0 ** -20))
        order = np.argsort(key, kind="stable")
        pos = np.arange(len(rows)) - lv.member_offsets[cell]
        sel = pos < kc
        lv.closest[cell[sel], pos[sel]] = rows[order][sel]


def check_nesting(levels: Sequence[GridLevel]) -> bool:
    """Check method.md §7.A11 for every pair of levels where the coarse size divides the fine size:
    each member of fine cell (i, j) lies in coarse cell (i // r, j // r) (and, when the coarse level's
    min_count is not larger, that coarse cell was kept). Returns True or raises AssertionError."""
    for fine in levels:
        for coarse in levels:
            if coarse.size >= fine.size or fine.size % coarse.size or coarse.n_rows != fine.n_rows:
                continue
            r = fine.size // coarse.size
            cell = np.repeat(np.arange(fine.m), fine.count)
            pc = coarse.cell_of_row[fine.member_rows]
            if coarse.min_count <= fine.min_count and (pc < 0).any():
                raise AssertionError(f"rows of kept cells at G={fine.size} fall in dropped cells at "
                                     f"G={coarse.size}")
            ok = pc >= 0
            bad = (coarse.i[pc[ok]] != fine.i[cell[ok]] // r) | (coarse.j[pc[ok]] != fine.j[cell[ok]] // r)
            if bad.any():
                row = int(fine.member_rows[ok][bad][0])
                raise AssertionError(f"row {row}: cell at G={fine.size} is not inside its cell at "
                                     f"G={coarse.size}")
    return True


def reference_grid_loop(coords: np.ndarray, acts: np.ndarray, G: int, threshold: int = 5) -> dict:
    """The article recipe's per-cell loop (method.md §1.6 [RECIPE] ``bin_laid_out_activations``),
    for tests and benchmarks only: O(G^2 * n).

    Edges ``linspace(0, 1, G + 1)`` with the last set to +inf, cell = digitize(v) - 1; for every cell a
    boolean mask over all points; kept iff count > threshold; mean = np.average of the members.
    Returns {"i": [m], "j": [m], "count": [m], "mean": [m, c]} with cells in (i, j) order.
    """
    edges = np.linspace(0.0, 1.0, G + 1)
    edges[-1] = np.inf
    idx = np.digitize(np.asarray(coords), edges) - 1
    acts = np.asarray(acts)
    cells, means = [], []
    for i in range(G):
        for j in range(G):
            mask = (idx[:, 0] == i) & (idx[:, 1] == j)
            cnt = int(np.count_nonzero(mask))
            if cnt > threshold:
                cells.append((i, j, cnt))
                means.append(np.average(acts[mask], axis=0))
    ijn = np.asarray(cells, np.int64).reshape(-1, 3)
    return {"i": ijn[:, 0], "j": ijn[:, 1], "count": ijn[:, 2],
            "mean": np.asarray(means, np.float64).reshape(len(cells), acts.shape[1])}


# ----------------------------------------------------------------------------------------------
# artifacts: <dir>/<layer>/level-<G>.json (records) + level-<G>.npz (all arrays)

def level_to_records(level, class_names: Sequence[str] | None = None, n_members: int | None = 16, *,
                     digits: int | None = None, unknown_name: bool = False) -> list[dict]:
    """One JSON-able dict per kept cell: {i, j, n, top: [[class, name, value], ...]} and, unless
    `n_members` is None, members: the first n_members row ids, closest: row ids (best first).

    The one builder of per-cell records: ``Atlas.records`` and the analysis views' cell records are
    these plus their own fields. level: a `GridLevel`, or anything with i, j, count [m] and
    top_classes, top_values [m, k] (an ``AtlasLevel``, with ``n_members=None``); digits: round the
    values to this many digits (None: as stored); unknown_name: a class id outside `class_names` is
    named by its number (``"-1"``) instead of None.
    """
    names = list(class_names) if class_names is not None else []

    def name(c: int) -> str | None:
        return names[c] if 0 <= c < len(names) else (str(c) if unknown_name else None)

    def val(v: float) -> float:
        return v if digits is None else round(v, digits)

    out = [{"i": i, "j": j, "n": n, "top": [[c, name(c), val(v)] for c, v in zip(tc, tv)]}
           for i, j, n, tc, tv in zip(level.i.tolist(), level.j.tolist(), level.count.tolist(),
                                      level.top_classes.tolist(), level.top_values.tolist())]
    if n_members is not None:
        off, rows = level.member_offsets.tolist(), level.member_rows
        for k, (rec, cl) in enumerate(zip(out, level.closest.tolist())):
            rec["members"] = rows[off[k]:min(off[k + 1], off[k] + n_members)].tolist()
            rec["closest"] = [r for r in cl if r >= 0]
    return out


_ARRAYS = ("i", "j", "count", "mean_activation", "top_classes", "top_values", "member_offsets",
           "member_rows", "closest", "cell_of_row")


def save_grid(levels: Sequence[GridLevel], directory: str | Path, layer: str,
              class_names: Sequence[str] | None = None, n_members: int = 16) -> Path:
    """Write ``<dir>/<layer>/level-<G>.npz`` (every array, incl. the full mean_attribution) and
    ``level-<G>.json`` ({layer, size, min_count, n_rows, n_cells, axes, cells: records}), atomically.
    Level files of other sizes left by an earlier run are removed. Returns the layer's folder."""
    d = Path(directory) / layer_dirname(layer)
    d.mkdir(parents=True, exist_ok=True)
    keep = {f"level-{lv.size}.{ext}" for lv in levels for ext in ("npz", "json")}
    for old in d.glob("level-*.*"):
        if old.name not in keep and re.fullmatch(r"level-\d+\.(npz|json)", old.name):
            old.unlink()
    for lv in levels:
        arrays = {k: getattr(lv, k) for k in _ARRAYS}
        arrays["size"] = np.int64(lv.size)
        arrays["min_count"] = np.int64(lv.min_count)
        if lv.mean_attribution is not None:
            arrays["mean_attribution"] = lv.mean_attribution

        save_npz_atomic(d / f"level-{lv.size}.npz", **arrays)
        write_json_atomic(d / f"level-{lv.size}.json", {
            "layer": layer, "size": lv.size, "min_count": lv.min_count, "n_rows": lv.n_rows,
            "n_cells": lv.m, "n_in_cells": int(lv.count.sum()), "axes": AXES_NOTE,
            "cells": level_to_records(lv, class_names, n_members)})
    return d


def load_grid(directory: str | Path, layer: str) -> list[GridLevel]:
    """Read every ``level-<G>.npz`` of `layer`, sorted by G. UserError when there is none."""
    d = Path(directory) / layer_dirname(layer)
    files = sorted((int(m.group(1)), p) for p in (d.glob("level-*.npz") if d.is_dir() else [])
                   if (m := re.fullmatch(r"level-(\d+)\.npz", p.name)))
    if not files:
        raise ConfigError(f"no grid for layer {layer!r} in {directory}")
    out = []
    for _, p in files:
        with np.load(p) as z:
            kw = {k: z[k] for k in _ARRAYS}
            out.append(GridLevel(size=int(z["size"]), min_count=int(z["min_count"]),
                                 mean_attribution=z["mean_attribution"] if "mean_attribution" in z else None,
                                 **kw))
    return out


__all__ = ["GridLevel", "cell_index", "grid_level", "grid_levels", "check_nesting", "reference_grid_loop",
           "level_to_records", "save_grid", "load_grid", "AXES_NOTE"]
