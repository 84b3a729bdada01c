"""Static site export of an atlas run: our own HTML/JS/CSS viewer plus the data it reads.

Layout of an exported site ``SITE/``::

    index.html  viewer.js  viewer.css      the viewer (from ``actatlas/export/static``)
    manifest.json                          layers, levels, class names, icon size, sample counts
    data/<layer>/level-<G>.json            cells of one level, columnar, compact keys (below)
    data/<layer>/class-heat/<c>.bin        class c's heat over every cell of every level (below)
    data/<layer>/level-<G>/icons-<tx>-<ty>.png    icon sprite sheets, one per tile of T x T cells
    data/<layer>/level-<G>/patches-<k>.png        member image patches, sprite sheets of fixed capacity

Cell JSON (one entry per kept cell, all arrays of length m): ``i``, ``j`` grid column / row
(j grows upward), ``n`` samples in the cell, ``t`` top-5 class ids (flattened, 5 per cell, -1
padded), ``v`` their mean attribution values, ``f`` the icon's objective alignment (formerly
"fidelity"), ``mf`` the best real member's, ``s`` icon sheet index (into ``sheets``) and ``k`` slot in that sheet, ``pc`` number of
member patches. Patches of cell number c live in sheet ``c // patches.cells_per_sheet`` at slots
``(c % cells_per_sheet) * per_cell + q``. With attributions, ``w`` / ``wn`` are each cell's top class
/ most negative class over ALL classes (-1: none), for the viewer's "winner" filter. Atlases with
honest icon scores (``actatlas.scores``) add the columns of `SCORE_COLUMNS` (null where not computed):
``rr`` / ``rw`` retrieval rank against the raw / whitened cell means, ``ca`` class agreement, ``cf``
colourfulness, ``ct`` contrast, ``bf`` border fill of the icon; the same with an ``m`` prefix for the
cell's random real member (``moa`` its objective alignment; ``mrrl`` / ``mrwl`` its ranks against its
cell's mean without itself); ``pcf``, ``pct``, ``pbf`` the medians
over the cell's real patches (``pn`` of them).

Aligned layers (an export of several layers of a run laid out jointly, ``build_atlas(..., align=True)``):
the manifest has ``aligned: true`` and ``aligned_layers`` (their order), and each level JSON of such a
layer has ``links``: ``{"prev": L, "next": L}`` (each present when that neighbour was exported) with
``L = {layer, o, c, n}``, for every cell of this level where its samples lie in the neighbouring
layer's level of the same size: cell number c's targets are ``c[o[c]:o[c+1]]`` (cell numbers of that
level) holding ``n[...]`` of its samples, most first, at most `LINKS_PER_CELL` of them (samples in
dropped cells, or beyond the cap, are not listed).

Class heat (format 2, present when the run has attributions): the full mean attribution of every
class in every cell, one small binary file per class, fetched when the class is chosen (the first
paint loads none). The manifest's layer entry has ``class_heat = {url: "data/<layer>/class-heat/{c}.bin",
levels: [G...], cells: [m...], scale: 127}``; file c holds, for the levels in that order, first
little-endian float32 ``pos, neg`` per level (max over the level's cells of a_c and of -a_c, >= 0),
then int8 [m] per level: ``q = round(127 * h+) - round(127 * h-)`` where ``h+`` / ``h-`` are
``Atlas.class_heat(c, G, mode="weighted", sign=+1 / -1)`` (a_c scaled to its own max, clipped at 0).
So the viewer's heat for sign s is ``max(0, s * q) / 127`` and the attribution it stands for is
``heat * (pos if s > 0 else neg)`` (method.md §3.1, normalised per class); 1000 classes x 25k cells
is 25 MB on disk, 25 kB per class and level.

Format 1 (sites exported before full class heat) kept each cell's top 20 classes by |attribution| in
``data/<layer>/level-<G>-heat.json`` (the level entry's ``heat``: k, m, base64 uint16 ``idx`` and
float16 ``val`` [m, k], per-class ``pos`` / ``neg``); the viewer still reads it and says in the
legend that its heat is truncated.

Python: `export_atlases` is the core: it exports `Atlas` objects (each level's grid comes from
``level.grid`` when present, else from ``RUN/grid/<layer>/``); `export_site` opens a run's atlases and
calls it; `export_atlas` does the same for one atlas saved outside ``RUN/atlas/`` (class atlases,
comparisons); `show` is the Jupyter display. What an export has to leave out (unreadable member
photos, levels without a grid level, layers without provenance) is logged as one warning per kind.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..atlas import (Atlas, AtlasLevel, AtlasSet, aligned_attributions, cell_winners, class_heat_values, cut_patch,
                     patch_box)  # noqa: F401  (patch_box: public here as before)
from ..data import ImageDecodeError, load_rgb
from ..errors import ConfigError, RunStateError, UserError
from ..grid import GridLevel, load_grid
from ..models import Preprocess
from ..run import Rows, Run, load_run_model, open_run
from ..store import layer_dirname

log = logging.getLogger(__name__)

STATIC_FILES = ("index.html", "viewer.js", "viewer.css")
HEAT_SCALE = 127
SHEET_MAX_PX = 2048
PATCH_SHEET_MAX_PX = 2048
FORMAT = 2
FALLBACK_INPUT = 224  # side of the plain centre crop used when the model's input geometry is unknown
LINKS_PER_CELL = 64   # target cells listed per cell in an aligned level's links


def _static(name: str) -> str:
    return resources.files("actatlas.export").joinpath("static", name).read_text(encoding="utf-8")


class _Writer:
    """Writes site files to disk, or keeps them in memory for the single-file export."""

    def __init__(self, out: Path | None):
        self.out = out
        self.files: dict[str, object] = {}

    def json(self, rel: str, obj) -> None:
        if self.out is None:
            self.files[rel] = obj
        else:
            p = self.out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")

    def bin(self, rel: str, data: bytes) -> None:
        if self.out is None:
            self.files[rel] = base64.b64encode(data).decode("ascii")
        else:
            p = self.out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

    def png(self, rel: str, img: Image.Image) -> None:
        if self.out is None:
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=False)
            self.files[rel] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        else:
            p = self.out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p, format="PNG")


# ---------------------------------------------------------------------------------------------
# what an export leaves out: one warning per kind, with a count

_NOTES = {  # kind -> (one thing, several things, what the export does about them)
    "photo": ("member photo could not be read", "member photos could not be read", "their patches are left out"),
    "grid": ("level has no grid level", "levels have no grid level",
             "exported without member patches and class heat"),
    "cell": ("cell is missing from its grid level", "cells are missing from their grid level",
             "they get no member patches and zero class heat"),
    "provenance": ("layer has no provenance for its members", "layers have no provenance for their members",
                   "exported without member patches"),
    "heat": ("level has attributions that do not match the class names",
             "levels have attributions that do not match the class names", "their class heat is left out"),
}


@dataclass
class _Notes:
    """What an export had to leave out, by kind: {kind: {what: why}} (the first reason per thing)."""

    items: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, kind: str, what: str, why: str = "") -> None:
        self.items.setdefault(kind, {}).setdefault(what, why)

    def warn(self) -> None:
        """One ``log.warning`` per kind: the count, the first case and what was done."""
        for kind, got in self.items.items():
            one, many, done = _NOTES[kind]
            what, why = next(iter(got.items()))
            log.warning("%d %s (first: %s%s); %s", len(got), one if len(got) == 1 else many, what,
                        f": {why}" if why else "", done)


class _ImageCache:
    """Small LRU of geometry-transformed input images (members often share an image); a photo that
    cannot be read (moved, deleted, corrupt) is noted once and gives None."""

    def __init__(self, geometry: Callable[[Image.Image], Image.Image], notes: _Notes, size: int = 64):
        self.geometry = geometry
        self.notes = notes
        self.size = size
        self.cache: OrderedDict[str, Image.Image] = OrderedDict()
        self.failed: set[str] = set()

    def get(self, path: str) -> Image.Image | None:
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        if path in self.failed:
            return None
        try:
            img = self.geometry(load_rgb(path))
        except ImageDecodeError as e:
            self.failed.add(path)
            self.notes.add("photo", e.path, e.reason)
            return None
        self.cache[path] = img
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return img


def _centre_crop(s: int) -> Callable[[Image.Image], Image.Image]:
    def geom(img: Image.Image) -> Image.Image:
        w, h = img.size
        m = min(w, h)
        img = img.crop(((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m))
        return img.resize((s, s), Image.BILINEAR)

    return geom


def _input_geometry(run: Run) -> tuple[Callable[[Image.Image], Image.Image], int]:
    """(geometry, s): the model's input geometry (resize/crop to s x s) from the preprocessing the run
    recorded, else from the model loaded again; failing both, a plain centre crop to 224 px, with a
    warning that names the reason."""
    d = run.summary.get("preprocess")
    if d is not None:
        try:
            pre = Preprocess(**d)
            return pre.geometry, int(pre.size)
        except (TypeError, ValueError) as e:  # unknown fields or values: a newer/older format
            recorded = f"its recorded preprocessing is unusable ({e})"
    else:
        recorded = "collect/complete.json records no preprocessing"
    try:
        pre = load_run_model(run, "cpu").preprocess
        return pre.geometry, int(pre.size)
    except (UserError, OSError) as e:  # not reloadable by name, unknown model, weights unavailable
        log.warning("member patches are cut from a plain %d px centre crop, not the model's input geometry: "
                    "%s, and its model cannot be loaded (%s)", FALLBACK_INPUT, recorded, e)
    return _centre_crop(FALLBACK_INPUT), FALLBACK_INPUT


def _icon_tile(size: int, icon: int) -> int:
    return max(1, min(size, SHEET_MAX_PX // max(1, icon)))


def quantize_heat(att: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q int8 [classes, m], pos float32 [classes], neg float32 [classes]) of full mean attributions
    att [m, classes]: q = round(127 h+) - round(127 h-) with h+- = ``class_heat_values(att, c,
    "weighted", +-1)``, the numbers of ``Atlas.class_heat``; pos / neg = max of a_c / -a_c (>= 0)."""
    att = np.asfortranarray(att, np.float32)  # contiguous columns
    m, n = att.shape
    q = np.empty((n, m), np.int8)
    for c in range(n):
        hp = class_heat_values(att, c, "weighted", 1)
        hn = class_heat_values(att, c, "weighted", -1)
        q[c] = np.rint(HEAT_SCALE * hp) - np.rint(HEAT_SCALE * hn)
    pos = np.maximum(att.max(axis=0), 0) if m else np.zeros(n, np.float32)
    neg = np.maximum((-att).max(axis=0), 0) if m else np.zeros(n, np.float32)
    return q, pos.astype(np.float32), neg.astype(np.float32)


def _write_class_heat(w: _Writer, layer: str, heats: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                      n_classes: int) -> dict | None:
    """One ``data/<layer>/class-heat/<c>.bin`` per class from per-level ``(G, q, pos, neg)``
    (`quantize_heat`); returns the manifest's ``class_heat`` entry (None without levels)."""
    if not heats:
        return None
    url = f"data/{layer}/class-heat/{{c}}.bin"
    for c in range(n_classes):
        head = np.array([[pos[c], neg[c]] for _, _, pos, neg in heats], "<f4").tobytes()
        w.bin(url.replace("{c}", str(c)), head + b"".join(q[c].tobytes() for _, q, _, _ in heats))
    return {"url": url, "levels": [G for G, *_ in heats], "cells": [int(q.shape[1]) for _, q, _, _ in heats],
            "scale": HEAT_SCALE}


# ---------------------------------------------------------------------------------------------
# one layer, one level


@dataclass
class _LayerExport:
    """What every level of one layer's export shares."""

    writer: _Writer
    atlas: Atlas              # the layer's atlas (class names, records)
    base: str                 # "data/<layer>": where its files go
    n_classes: int            # classes of the site (class heat needs this many attribution columns)
    notes: _Notes
    rows: Rows | None = None  # provenance of the grid levels' member ids; None: no member patches
    map_hw: tuple[int, int] = (0, 0)   # the layer's map (h, w): patch boxes
    images: _ImageCache | None = None
    input_size: int = 0       # the model's input side s (patch boxes are in s x s)
    patches_per_cell: int = 0
    patch_size: int = 64

    @property
    def patches(self) -> bool:
        return self.images is not None and self.rows is not None and self.patches_per_cell > 0


def _icon_sheets(ctx: _LayerExport, level: AtlasLevel) -> tuple[list[dict], np.ndarray, np.ndarray, int]:
    """Write the level's icons as sprite sheets, one per T x T tile of the grid; returns (sheets,
    sheet index [m], slot in its sheet [m], T)."""
    G, icon, m = int(level.size), level.icon_size, len(level.i)
    T = _icon_tile(G, icon)
    tiles: dict[tuple[int, int], list[int]] = {}
    for c, (i, j) in enumerate(zip(np.asarray(level.i).tolist(), np.asarray(level.j).tolist())):
        tiles.setdefault((i // T, j // T), []).append(c)
    icons = np.asarray(level.icons, np.uint8)
    sheets, sheet_of, slot_of = [], np.zeros(m, np.int32), np.zeros(m, np.int32)
    for si, ((tx, ty), members) in enumerate(sorted(tiles.items())):
        cols = max(1, math.ceil(math.sqrt(len(members))))
        sheet = np.full((math.ceil(len(members) / cols) * icon, cols * icon, 3), 223, np.uint8)
        for k, c in enumerate(members):
            r, q = divmod(k, cols)
            sheet[r * icon:(r + 1) * icon, q * icon:(q + 1) * icon] = icons[c]
        sheet_of[members], slot_of[members] = si, np.arange(len(members))
        rel = f"{ctx.base}/level-{G}/icons-{tx}-{ty}.png"
        ctx.writer.png(rel, Image.fromarray(sheet))
        sheets.append({"url": rel, "cols": cols, "tx": tx, "ty": ty})
    return sheets, sheet_of, slot_of, T


def _members(grid: GridLevel, q: int) -> list[int]:
    """Member ids of grid cell q, best first (``closest``) when the level has them."""
    closest = np.asarray(grid.closest) if grid.closest is not None else None
    if closest is not None and closest.ndim == 2 and len(closest) > q:
        return [int(r) for r in closest[q] if r >= 0]
    o0, o1 = int(grid.member_offsets[q]), int(grid.member_offsets[q + 1])
    return [int(r) for r in grid.member_rows[o0:o1]]


def _cell_patches(ctx: _LayerExport, grid: GridLevel, q: int) -> list[Image.Image]:
    """Up to `patches_per_cell` patches (patch_size square) of grid cell q's members whose photo reads."""
    out = []
    for r in _members(grid, q):
        if len(out) >= ctx.patches_per_cell:
            break
        img = ctx.images.get(str(ctx.rows.path[r]))
        if img is not None:
            out.append(cut_patch(img, ctx.rows.y[r], ctx.rows.x[r], ctx.map_hw, ctx.input_size, ctx.patch_size))
    return out


def _patch_sheets(ctx: _LayerExport, level: AtlasLevel, grid: GridLevel | None) -> tuple[dict | None, np.ndarray]:
    """Write the member patches of every cell as sprite sheets of fixed capacity; returns (the level's
    ``patches`` entry or None, patches per cell [m])."""
    m = len(level.i)
    pcount = np.zeros(m, np.int32)
    if not ctx.patches or grid is None or not m:
        return None, pcount
    per, ps = ctx.patches_per_cell, ctx.patch_size
    cells_per_sheet = max(1, (PATCH_SHEET_MAX_PX // ps) ** 2 // per)
    pcols = max(1, math.ceil(math.sqrt(cells_per_sheet * per)))
    index = {(a, b): q for q, (a, b) in enumerate(zip(np.asarray(grid.i).tolist(), np.asarray(grid.j).tolist()))}
    urls = []
    for k0 in range(0, m, cells_per_sheet):
        chunk = range(k0, min(m, k0 + cells_per_sheet))
        sheet = Image.new("RGB", (pcols * ps, math.ceil(len(chunk) * per / pcols) * ps), (255, 255, 255))
        for c in chunk:
            q = index.get((int(level.i[c]), int(level.j[c])))
            if q is None:
                ctx.notes.add("cell", f"{ctx.atlas.layer} level {level.size} cell ({level.i[c]}, {level.j[c]})")
                continue
            crops = _cell_patches(ctx, grid, q)
            for n, crop in enumerate(crops):
                slot = (c - k0) * per + n
                sheet.paste(crop, ((slot % pcols) * ps, (slot // pcols) * ps))
            pcount[c] = len(crops)
        rel = f"{ctx.base}/level-{level.size}/patches-{k0 // cells_per_sheet}.png"
        ctx.writer.png(rel, sheet)
        urls.append(rel)
    return {"sheets": urls, "cells_per_sheet": cells_per_sheet, "per_cell": per, "cols": pcols, "size": ps}, pcount


def _rounded(x, nd: int = 4):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


# the honest icon scores' columns in the level JSON (compact key -> record key), present when the
# atlas has them: icon, random real member, median of the cell's real patches; and the optimiser
# steps the icon took
SCORE_COLUMNS = {
    "rr": "retrieval_rank_raw", "rw": "retrieval_rank_whitened", "ca": "class_agreement",
    "cf": "colourfulness", "ct": "contrast", "bf": "border_fill",
    "mrr": "member_retrieval_rank_raw", "mrw": "member_retrieval_rank_whitened", "mca": "member_class_agreement",
    "mrrl": "member_retrieval_rank_raw_loo", "mrwl": "member_retrieval_rank_whitened_loo",
    "mcf": "member_colourfulness", "mct": "member_contrast", "mbf": "member_border_fill",
    "moa": "member_objective_alignment",
    "pcf": "patch_colourfulness", "pct": "patch_contrast", "pbf": "patch_border_fill", "pn": "patch_count",
    "st": "steps",
}


def _cell_columns(records: list[dict]) -> dict:
    """The level JSON's per-cell columns i, j, n, t, v, f, mf from ``Atlas.records``, and the score
    columns of `SCORE_COLUMNS` that the records have."""
    m = len(records)
    t = np.full((m, 5), -1, np.int32)
    v = np.zeros((m, 5), np.float64)
    for c, rec in enumerate(records):
        for q, entry in enumerate((rec.get("top") or [])[:5]):
            t[c, q], v[c, q] = int(entry[0]), float(entry[2])
    return {"i": [r["i"] for r in records], "j": [r["j"] for r in records], "n": [r["n"] for r in records],
            "t": t.ravel().tolist(), "v": [float(f"{x:.4g}") for x in v.ravel()],
            "f": [_rounded(r.get("objective_alignment", r.get("fidelity"))) for r in records],
            "mf": [_rounded(r.get("best_member_objective_alignment", r.get("member_fidelity"))) for r in records],
            **{col: [r.get(key) for r in records] for col, key in SCORE_COLUMNS.items()
               if any(r.get(key) is not None for r in records)}}


def _level_heat(ctx: _LayerExport, level: AtlasLevel, grid: GridLevel | None) -> np.ndarray | None:
    """float32 [m, classes] full mean attributions of the level's cells, or None (no grid level, a run
    without attributions, or columns that do not match the class names: noted)."""
    att = aligned_attributions(grid, level.i, level.j) if len(level.i) else None
    if att is not None and att.shape[1] != ctx.n_classes:
        ctx.notes.add("heat", f"{ctx.atlas.layer} level {level.size}",
                      f"{att.shape[1]} attribution columns, {ctx.n_classes} class names")
        return None
    return att


def _export_level(ctx: _LayerExport, level: AtlasLevel, grid: GridLevel | None, heats: list,
                  links: dict | None = None) -> dict:
    """Write one level (icons, patches, cell JSON, the aligned `links` when given); with attributions,
    appends ``(G, q, pos, neg)`` (`quantize_heat`) to `heats`. Returns the manifest's level entry."""
    G = int(level.size)
    sheets, sheet_of, slot_of, T = _icon_sheets(ctx, level)
    patch_info, pcount = _patch_sheets(ctx, level, grid)
    cols = _cell_columns(ctx.atlas.records(level))
    data = {"layer": ctx.atlas.layer, "size": G, "icon": level.icon_size, "tile": T, **cols,
            "s": sheet_of.tolist(), "k": slot_of.tolist(), "pc": pcount.tolist(),
            "sheets": sheets, "patches": patch_info, "samples": int(sum(cols["n"]))}
    if links:
        data["links"] = links
    att = _level_heat(ctx, level, grid)
    if att is not None:
        data["w"] = cell_winners(att, 1).tolist()
        data["wn"] = cell_winners(att, -1).tolist()
        heats.append((G, *quantize_heat(att)))
    url = f"{ctx.base}/level-{G}.json"
    ctx.writer.json(url, data)
    return {"size": G, "cells": len(level.i), "url": url, "icon": level.icon_size, "samples": data["samples"]}


def _export_layer(ctx: _LayerExport, grids: dict[int, GridLevel], links: dict[int, dict] | None = None) -> dict:
    """Export every level of `ctx.atlas` (with the aligned `links` of each level size, when given);
    returns the manifest's entry for the layer (with its largest icon size under "icon")."""
    heats: list = []
    links = links or {}
    levels = [_export_level(ctx, lv, grids.get(int(lv.size)), heats, links.get(int(lv.size)))
              for lv in ctx.atlas.levels]
    entry = {"name": ctx.atlas.layer, "levels": levels,
             "total_samples": max([lv["samples"] for lv in levels] or [0]),
             "icon": max([lv["icon"] for lv in levels] or [0])}
    class_heat = _write_class_heat(ctx.writer, layer_dirname(ctx.atlas.layer), heats, ctx.n_classes)
    if class_heat is not None:
        entry["class_heat"] = class_heat
    return entry


# ---------------------------------------------------------------------------------------------
# aligned layers: where a cell's samples lie in the neighbouring layers


def _atlas_cell_of_row(level: AtlasLevel, grid: GridLevel) -> np.ndarray:
    """int64 [n] the atlas cell number of each run row at this level (-1: in no kept cell)."""
    index = {(int(a), int(b)): c for c, (a, b) in enumerate(zip(np.asarray(level.i), np.asarray(level.j)))}
    to_atlas = np.array([index.get((int(a), int(b)), -1) for a, b in zip(np.asarray(grid.i), np.asarray(grid.j))]
                        + [-1], np.int64)
    return to_atlas[np.asarray(grid.cell_of_row, np.int64)]   # -1 (a dropped row) picks the trailing -1


def cell_links(src: np.ndarray, dst: np.ndarray, m_src: int, m_dst: int, cap: int = LINKS_PER_CELL) -> dict:
    """{o, c, n}: for each of the m_src cells, the cells of the other layer holding its samples and
    how many, most first (at most `cap` per cell), from src / dst [n] (each row's cell in the two layers,
    -1 for none), as CSR lists (see the module docstring)."""
    ok = (src >= 0) & (dst >= 0)
    keys, counts = np.unique(src[ok] * m_dst + dst[ok], return_counts=True)
    a, b = keys // max(m_dst, 1), keys % max(m_dst, 1)
    order = np.lexsort((b, -counts, a))
    a, b, counts = a[order], b[order], counts[order]
    rank = np.arange(len(a)) - np.searchsorted(a, a)
    keep = rank < cap
    a, b, counts = a[keep], b[keep], counts[keep]
    return {"o": np.searchsorted(a, np.arange(m_src + 1)).tolist(), "c": b.tolist(), "n": counts.tolist()}


def _aligned_links(atlases: Sequence[Atlas], grids: list[dict[int, GridLevel]], run: Run | None) -> dict:
    """{layer: {G: {"prev": ..., "next": ...}}} for exported layers whose layouts were aligned together
    (`Run.aligned_layers`), between neighbours in the export's order; {} otherwise."""
    if run is None:
        return {}
    together = set(run.aligned_layers())
    names = [a.layer for a in atlases]
    if len(names) < 2 or not set(names) <= together:
        return {}
    out: dict = {ly: {} for ly in names}
    for k in range(len(atlases) - 1):
        A, B = atlases[k], atlases[k + 1]
        for lv in A.levels:
            G = int(lv.size)
            ga, gb = grids[k].get(G), grids[k + 1].get(G)
            lb = next((x for x in B.levels if int(x.size) == G), None)
            if ga is None or gb is None or lb is None or len(ga.cell_of_row) != len(gb.cell_of_row):
                continue
            ra, rb = _atlas_cell_of_row(lv, ga), _atlas_cell_of_row(lb, gb)
            out[A.layer].setdefault(G, {})["next"] = {"layer": B.layer, **cell_links(ra, rb, len(lv.i), len(lb.i))}
            out[B.layer].setdefault(G, {})["prev"] = {"layer": A.layer, **cell_links(rb, ra, len(lb.i), len(lv.i))}
    return out


# ---------------------------------------------------------------------------------------------
# the inputs of a layer: grid levels and provenance


def _grid_levels(atlas: Atlas, run: Run | None, from_run: bool, notes: _Notes) -> dict[int, GridLevel]:
    """{G: GridLevel} of the atlas's levels: ``level.grid`` when present, else (with `from_run`) the
    run's ``grid/<layer>/level-<G>.npz``; levels without one are noted."""
    grids = {int(lv.size): lv.grid for lv in atlas.levels if lv.grid is not None}
    missing = [int(lv.size) for lv in atlas.levels if int(lv.size) not in grids]
    if not missing:
        return grids
    why = "not given"
    if from_run and run is not None:
        why = f"not in {run.path / 'grid'}"
        try:
            grids.update({int(g.size): g for g in load_grid(run.path / "grid", atlas.layer) if int(g.size) in missing})
        except UserError as e:  # no grid folder for the layer
            why = str(e)
    for G in missing:
        if G not in grids:
            notes.add("grid", f"{atlas.layer} level {G}", why)
    return grids


def _provenance(run: Run | None, layer: str, subset_rows=None) -> tuple[Rows | None, tuple[int, int], str]:
    """(rows, layer map (h, w), "") of `layer`, restricted to run rows `subset_rows` when given (the
    ids a grid level's members use); (None, (0, 0), why) when there is none."""
    if run is None:
        return None, (0, 0), "the atlas has no run"
    try:
        rows = run.rows(layer)
    except UserError as e:  # not collected in this run
        return None, (0, 0), str(e)
    except FileNotFoundError as e:  # collect/<layer>/rows.parquet missing
        return None, (0, 0), f"its rows' provenance is missing ({e})"
    shape = run.summary.get("layer_shapes", {}).get(layer)
    if shape is None:
        return None, (0, 0), "collect/complete.json records no map shape for it"
    if len(shape) != 3:
        return None, (0, 0), f"its output has no spatial map (shape {list(shape)})"
    if subset_rows is not None:
        idx = np.asarray(subset_rows, np.int64)
        rows = Rows(**{f.name: getattr(rows, f.name)[idx] for f in dataclasses.fields(Rows)})
    return rows, (int(shape[1]), int(shape[2])), ""


# ---------------------------------------------------------------------------------------------
# the core: atlases -> site files


@dataclass
class _Settings:
    run: Run | None
    class_names: list[str]
    title: str | None = None
    subset_rows: np.ndarray | None = None
    grids_from_run: bool = True
    patches_per_cell: int = 8
    patch_size: int = 64


def _build(w: _Writer, atlases: Sequence[Atlas], opt: _Settings) -> dict:
    """Write every atlas (one layer each) and the manifest through `w`; warns about what it left out."""
    notes = _Notes()
    geometry: list = []  # (geometry, s), found once when the first layer has provenance

    layers = []
    grids = [_grid_levels(atlas, opt.run, opt.grids_from_run, notes) for atlas in atlases]
    own_layout = opt.run is not None and opt.subset_rows is None and opt.grids_from_run
    links = _aligned_links(atlases, grids, opt.run) if own_layout else {}
    for atlas, grids_of in zip(atlases, grids):
        ctx = _LayerExport(w, atlas, f"data/{layer_dirname(atlas.layer)}", len(opt.class_names), notes,
                           patches_per_cell=max(0, int(opt.patches_per_cell)), patch_size=int(opt.patch_size))
        if ctx.patches_per_cell > 0:
            rows, hw, why = _provenance(opt.run, atlas.layer, opt.subset_rows)
            if rows is None:
                notes.add("provenance", atlas.layer, why)
            else:
                if not geometry:
                    geometry.append(_input_geometry(opt.run))
                geom, s = geometry[0]
                ctx = dataclasses.replace(ctx, rows=rows, map_hw=hw, images=_ImageCache(geom, notes), input_size=s)
        layers.append(_export_layer(ctx, grids_of, links.get(atlas.layer)))
    notes.warn()
    cfg = opt.run.config if opt.run is not None else {}
    total = max(ly["total_samples"] for ly in layers)
    rows_per_layer = opt.run.summary.get("rows") if own_layout else None  # else: the atlas's own count
    if isinstance(rows_per_layer, dict):
        total = int(rows_per_layer.get(atlases[0].layer, 0)) or total
    manifest = {"format": FORMAT, "title": opt.title or f"Activation atlas: {cfg.get('model', '')}",
                "model": cfg.get("model"), "layers": layers, "class_names": opt.class_names,
                "icon_size": max(ly["icon"] for ly in layers), "total_samples": total}
    if links:
        manifest["aligned"] = True
        manifest["aligned_layers"] = [a.layer for a in atlases]
    w.json("manifest.json", manifest)
    return manifest


def _script_json(obj) -> str:
    """JSON safe to embed inside a <script> element."""
    return (json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _inline(w: _Writer) -> str:
    """The viewer page with the in-memory files of `w` embedded (the single-file export)."""
    page = _static("index.html")
    css = _static("viewer.css")
    js = _static("viewer.js")
    bundle = f'<script type="application/json" id="atlas-bundle">{_script_json(w.files)}</script>'
    page = page.replace('<link rel="stylesheet" href="viewer.css">', f"<style>\n{css}\n</style>")
    page = page.replace('<script src="viewer.js"></script>',
                        bundle + "\n<script>\n" + js.replace("</script", "<\\/script") + "\n</script>")
    return page


def _check_patch_size(patch_size: int) -> None:
    if patch_size < 8 or patch_size > 512:
        raise ConfigError("patch_size must be in [8, 512]")


def _settings(atlases: Sequence[Atlas], run, **kw) -> _Settings:
    """The export's settings; `run` is a `Run`, a run directory, or None for the atlases' own run_dir."""
    if not atlases:
        raise ConfigError("no atlas to export")
    _check_patch_size(kw.get("patch_size", 64))
    if run is None:
        run = next((a.run_dir for a in atlases if a.run_dir is not None), None)
    if run is not None and not isinstance(run, Run):
        run = open_run(run)
    names = list(run.class_names) if run is not None else list(atlases[0].class_names)
    return _Settings(run, names, **kw)


def export_atlases(atlases: Sequence[Atlas], out: str | os.PathLike, *, run: Run | str | os.PathLike | None = None,
                   single_file: bool = False, title: str | None = None, subset_rows=None,
                   grids_from_run: bool = True, patches_per_cell: int = 8, patch_size: int = 64) -> Path:
    """Export `Atlas` objects (one per layer) as the viewer; returns the index.html path.

    Args:
        atlases: the atlases, one layer each, in the order the viewer lists them.
        out: the site folder (created; files of a previous export are replaced).
        run: the run they were made from (a `Run` or its directory; default: the atlases' ``run_dir``):
            class names, provenance of the members (real image patches), the model's input geometry
            and the grid levels that ``level.grid`` does not hold. None and no ``run_dir``: the
            atlases' own class names, no patches, class heat only from ``level.grid``.
        single_file: one self-contained ``index.html`` (opens from file://) instead of a folder.
        title: the page title (default ``"Activation atlas: <model>"``).
        subset_rows: [n] int64 run rows that the grid levels' member ids index (an atlas laid out over
            this subset of the run); None when they are run rows already.
        grids_from_run: read the run's ``grid/<layer>/`` for levels without ``level.grid`` (False for an
            atlas whose layout is not the run's: a class atlas, a comparison).
        patches_per_cell: real image patches kept per cell (the ``closest`` members); 0: none.
        patch_size: side of a patch in pixels, in [8, 512].
    """
    opt = _settings(atlases, run, title=title, subset_rows=subset_rows, grids_from_run=grids_from_run,
                    patches_per_cell=patches_per_cell, patch_size=patch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    if single_file:
        w = _Writer(None)
        _build(w, atlases, opt)
        index.write_text(_inline(w), encoding="utf-8")
        return index
    if (out / "data").is_dir():
        shutil.rmtree(out / "data")
    _build(_Writer(out), atlases, opt)
    for name in STATIC_FILES:
        (out / name).write_text(_static(name), encoding="utf-8")
    return index


def _open_atlases(run: Run, layers=None) -> list[Atlas]:
    """The assembled atlases of `run` (``RUN/atlas/<layer>/``), in the run's layer order, or those of
    `layers` (labels or folder names) in that order."""
    root = run.path / "atlas"
    if not root.is_dir():
        raise RunStateError(f"{run.path} has no atlas/ (run 'actatlas build' or 'actatlas render' first)")
    found: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if (p / "atlas.json").is_file()):
        found[json.loads((d / "atlas.json").read_text())["layer"]] = d
    order = {ly: k for k, ly in enumerate(run.layers)}
    avail = sorted(found, key=lambda ly: (order.get(ly, len(order)), ly))
    if layers:
        by_name = {**{d.name: ly for ly, d in found.items()}, **{ly: ly for ly in found}}
        missing = [ly for ly in layers if ly not in by_name]
        if missing:
            raise ConfigError(f"no atlas for layer(s) {', '.join(missing)} in {run.path}; have: {', '.join(avail)}")
        avail = [by_name[ly] for ly in layers]
    if not avail:
        raise RunStateError(f"{root} holds no atlas.json")
    return [Atlas.load(found[ly]) for ly in avail]


def single_file_html(run_dir: str | os.PathLike, layers=None, patches_per_cell: int = 8,
                     patch_size: int = 64) -> str:
    """The whole viewer of a run's atlases with every file inlined (data: URIs / embedded JSON) as one
    HTML string."""
    run = open_run(run_dir)
    atlases = _open_atlases(run, layers)
    return _page(atlases, _settings(atlases, run, patches_per_cell=patches_per_cell, patch_size=patch_size))


def _page(atlases: Sequence[Atlas], opt: _Settings) -> str:
    w = _Writer(None)
    _build(w, atlases, opt)
    return _inline(w)


def export_site(run_dir: str | os.PathLike, out_dir: str | os.PathLike, single_file: bool = False,
                layers=None, patches_per_cell: int = 8, patch_size: int = 64) -> Path:
    """Export the atlas of a run as a static site; returns the index.html path.

    Args:
        run_dir: a run directory with ``atlas/<layer>/`` (after ``actatlas build``).
        out_dir: the site folder (created; files of a previous export are replaced).
        single_file: write one self-contained ``index.html`` (opens from file://).
        layers: layer names to export (default: every layer with an atlas).
        patches_per_cell: real image patches kept per cell (the ``closest`` members).
        patch_size: side of a patch in pixels.
    """
    _check_patch_size(patch_size)
    run = open_run(run_dir)
    return export_atlases(_open_atlases(run, layers), out_dir, run=run, single_file=single_file,
                          patches_per_cell=patches_per_cell, patch_size=patch_size)


def export_atlas(atlas: Atlas | str | os.PathLike, out_dir: str | os.PathLike, run_dir: str | os.PathLike, *,
                 grid_levels=(), subset_rows=None, title: str | None = None, single_file: bool = True,
                 patches_per_cell: int = 8, patch_size: int = 64) -> Path:
    """Export one atlas whose layout is not the run's (a class atlas, a two-class comparison: anything
    written by ``Atlas.save`` outside ``RUN/atlas/``) as the viewer; returns the index.html path.

    Args:
        atlas: the `Atlas`, or the folder ``Atlas.save`` wrote (``atlas.json``, ``level-<G>.npz``, ...).
        out_dir: where the viewer goes (``index.html``, plus data files unless `single_file`).
        run_dir: the run the atlas was made from (class names, provenance for member patches).
        grid_levels: the ``GridLevel`` of each level that ``level.grid`` does not hold (members and mean
            attributions: patches and the class heatmap); levels without one are exported without them
            (never with the run's own grid, which belongs to another layout).
        subset_rows: [n] int64 run rows that the grid levels' member ids index (the atlas was laid out
            over this subset of the run); None when they are run rows already.
        title: the page title.
        single_file: one self-contained ``index.html`` (default) or a site folder.
        patches_per_cell, patch_size: real image patches per cell and their side in pixels.
    """
    if not isinstance(atlas, Atlas):
        adir = Path(atlas)
        if not (adir / "atlas.json").is_file():
            raise RunStateError(f"{adir} holds no assembled atlas (atlas.json missing)")
        atlas = Atlas.load(adir)
    given = {int(g.size): g for g in grid_levels}
    levels = [dataclasses.replace(lv, grid=given[int(lv.size)]) if lv.grid is None and int(lv.size) in given
              else lv for lv in atlas.levels]
    atlas = dataclasses.replace(atlas, levels=levels)
    return export_atlases([atlas], out_dir, run=run_dir, single_file=single_file, title=title,
                          subset_rows=subset_rows, grids_from_run=False, patches_per_cell=patches_per_cell,
                          patch_size=patch_size)


# ---------------------------------------------------------------------------------------------
# Jupyter


def _iframe(page: str, height: int) -> str:
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;'
            f'border:1px solid #ccc" sandbox="allow-scripts" title="activation atlas"></iframe>')


def notebook_html(run_dir: str | os.PathLike, layer: str | None = None, height: int = 640) -> str:
    """The single-file viewer of a run inside an ``<iframe srcdoc=...>`` (Jupyter's ``_repr_html_``)."""
    return _iframe(single_file_html(run_dir, [layer] if layer else None), height)


def _canvas_html(atlas: Atlas) -> str:
    """The coarsest canvas of `atlas` as an inline PNG (an atlas without a run)."""
    return atlas.canvas_html(" (no run: the interactive viewer needs the run the atlas came from)")


@dataclass
class AtlasView:
    """What ``actatlas.show(atlas)`` returns: Jupyter displays it as the interactive viewer (the
    single-file export of this atlas inside an iframe), or as the coarsest canvas when the atlas
    has no run (``run_dir``) to read class names, patches and grid levels from."""

    atlas: Atlas | AtlasSet
    height: int = 640

    @property
    def atlases(self) -> list[Atlas]:
        return _atlas_list(self.atlas)

    @property
    def has_run(self) -> bool:
        rd = self.atlas.run_dir
        return rd is not None and (Path(rd) / "collect" / "complete.json").is_file()

    def _repr_html_(self) -> str:
        if not self.has_run:
            return _canvas_html(self.atlases[0])
        return _iframe(_page(self.atlases, _settings(self.atlases, self.atlas.run_dir)), self.height)

    def __repr__(self) -> str:
        a = self.atlases
        return f"AtlasView({', '.join(repr(x.layer) for x in a)}, levels={[lv.size for lv in a[0].levels]})"


def _atlas_list(atlas: Atlas | AtlasSet) -> list[Atlas]:
    return list(atlas) if isinstance(atlas, AtlasSet) else [atlas]


def save_site(atlas: Atlas | AtlasSet, path: str | os.PathLike, *, single_file: bool = False,
              patches_per_cell: int = 8, patch_size: int = 64) -> Path:
    """Write the viewer of `atlas` (``aa.build_atlas``'s result: an `Atlas`, or an `AtlasSet` of several
    layers, which the viewer steps through with its layer slider; or ``aa.open_atlas``) as a static site
    in folder `path` (``single_file``: one self-contained ``index.html``); returns the index.html path.
    Serve a folder with ``actatlas serve PATH``. (A function, like `show`, not an ``Atlas`` method:
    the atlas module stays below the export.)"""
    return export_atlases(_atlas_list(atlas), path, single_file=single_file, patches_per_cell=patches_per_cell,
                          patch_size=patch_size)


def show(atlas: Atlas | AtlasSet, height: int = 640) -> AtlasView:
    """The interactive viewer of `atlas` (an `Atlas` or an `AtlasSet`) in Jupyter (``aa.show(atlas)`` as
    a cell's last line): the same page as ``actatlas export --single-file``, inside an iframe `height`
    pixels high. An atlas without a run shows its coarsest canvas."""
    return AtlasView(atlas, height)
