"""Class atlases and two-class comparisons rendered to disk (method.md §3.2, §3.3).

``class_atlas_and_render`` and ``compare_and_render`` run the pure functions of ``classes`` /
``compare``, render one icon per kept cell (direction = the cell's mean activation, whitened with the
run's matrix S exactly as the main atlas render: ``pipeline.run_whiten`` + ``render.render_icons``)
and write a results folder; ``load_class_atlas`` / ``load_comparison`` read it back. Like
``pipeline.py`` this module orchestrates several stages, so it is the one analysis module that imports
across them.

A results folder ``OUT/`` holds::

    result.json            kind, key of the inputs and settings, summary, paths (written last)
    class_atlas.json       (or comparison.json) settings + one record per kept cell (below)
    class_atlas.png        (or comparison.png) the canvas, see below
    rows.npz               rows [n] int64 run rows of the subset, coords [n, 2] float32
                           (+ x [n], y [n] for a comparison)
    grid/<layer>/level-G.* the GridLevel (``grid.save_grid``): members index the subset 0..n-1
    layout/<layer>.*       the subset's layout (class atlas only, ``layout.save_layout``)
    atlas/                 ``Atlas.save`` of the one level: level-G.png, icons level-G/cell-i-j.png, ...
    viewer/index.html      the viewer (single file, opens from file://)

Cell records: ``cell`` (index into the kept cells), ``i``, ``j`` (grid column from x, row from y,
j upward), ``n``, ``top`` [[class, name, mean attribution], ...] (5, descending), ``fidelity`` (icon),
``member_fidelity`` (best real member), ``icon`` (path relative to OUT), ``rows`` (run rows of the
members, ascending); comparison cells add ``side`` ("left", "right" or "middle"). ``comparison.json``
also lists ``candidates``: ``Candidate.to_dict()`` + ``icon`` + ``rows``.

Canvases use the atlas orientation (``atlas.py``: x to the right, y upward). The class atlas PNG is the
bare canvas, exactly G*P pixels square; ``class_atlas_labelled.png`` and the comparison PNG add the
top class under every icon, a title, and (comparison) an x-axis annotation with the left class on the
left and the right class on the right; candidate patch cells get a red frame.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atlas import Atlas, AtlasLevel
from ..errors import ConfigError
from ..export.site import export_atlas
from ..grid import level_to_records, load_grid, save_grid
from ..layout import load_layout, save_layout
from ..models.spec import resolve_class
from ..pipeline import best_member_fidelity, check_layer, load_run_model, run_whiten
from ..render import RenderConfig, render_icons
from ..run import open_run
from ..stages import config_hash, run_stage, settings_record, stage_hash
from ..store import ensure_dir, layer_dirname, save_png_atomic, write_json_atomic
from .classes import FILTERS, ClassAtlas, class_atlas
from .compare import Y_METHODS, Candidate, Comparison, cell_sides, compare

log = logging.getLogger(__name__)

CLASS_ATLAS = "class_atlas"
COMPARISON = "comparison"
FORMAT = 1

__all__ = ["ClassAtlasView", "ComparisonView", "class_atlas_and_render", "compare_and_render",
           "load_class_atlas", "load_comparison", "labelled_canvas", "candidates_table", "class_slug"]


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class _View:
    out_dir: Path
    layer: str
    level: AtlasLevel          # icons [m, P, P, 3], fidelity [m], top classes [m, 5], in kept-cell order
    class_names: list[str]
    summary: dict
    paths: dict[str, Path]
    ran: bool                  # False: an up-to-date folder was loaded instead of recomputed

    def icon(self, cell: int) -> np.ndarray:
        """uint8 [P, P, 3] icon of kept cell `cell`."""
        return self.level.icons[cell]


@dataclass
class ClassAtlasView(_View):
    """A rendered class atlas (``class_atlas_and_render`` / ``load_class_atlas``).

    atlas: the ``ClassAtlas`` (rows [n], coords [n, 2], layout, GridLevel over the subset).
    """

    atlas: ClassAtlas = None

    def run_rows(self, cell: int) -> np.ndarray:
        """Run row ids of kept cell `cell`'s members."""
        return self.atlas.run_rows(cell)


@dataclass
class ComparisonView(_View):
    """A rendered two-class comparison (``compare_and_render`` / ``load_comparison``).

    comparison: the ``Comparison`` (rows [n], x [n], y [n], coords [n, 2], level, labels, sides,
    candidates).
    """

    comparison: Comparison = None

    @property
    def candidates(self) -> list[Candidate]:
        """Candidate patch cells: on one class's side, top class a third class (strongest first)."""
        return self.comparison.candidates

    def run_rows(self, cell: int) -> np.ndarray:
        """Run row ids of kept cell `cell`'s members."""
        return self.comparison.rows[self.comparison.level.members(cell)]


# ----------------------------------------------------------------------------------------------
# helpers


def class_slug(index: int, name: str) -> str:
    """'2-great-white-shark' for (2, "great white shark"): a folder name, unique by the index."""
    s = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")[:60]
    return f"{int(index)}-{s}" if s else str(int(index))


def _resolve(run, key) -> int:
    return resolve_class(key, run.class_names, run.wnids)


def _setup(run_dir, layer, render_cfg):
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = check_layer(run, layer)
    if run.attributions(layer) is None:
        raise ConfigError(f"run {run_dir} has no attributions for layer {layer!r}: collect with "
                        "attributions='full' for class atlases and comparisons")
    cfg = render_cfg.standalone() if render_cfg is not None else RenderConfig.single_level()
    return run_dir, run, layer, cfg, stage_hash(run_dir, "collect")


def _up_to_date(out: Path, kind: str, key: str) -> bool:
    import json

    p = out / "result.json"
    if not p.is_file():
        return False
    try:
        res = json.loads(p.read_text())
    except ValueError:
        return False
    return (res.get("kind") == kind and res.get("key") == key
            and all((out / rel).exists() for rel in res.get("paths", {}).values()))


MARKER = ".actatlas-view"


def _claim(out: Path) -> None:
    """Make `out` this module's results folder: new, empty, or already marked as ours. Refuses a
    non-empty folder that this module did not create (``out`` pointing at a run, say), so that
    nothing else is ever deleted."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ConfigError(f"{out} exists and is not a class-atlas/compare results folder; give an empty or "
                          "new results folder")
    ensure_dir(out, "results folder")
    (out / MARKER).write_text("written by actatlas class-atlas / compare; safe to overwrite\n")


def _prepare(out: Path) -> None:
    """Empty the parts of `out` (claimed by `_claim`) this module writes: a previous result."""
    (out / "result.json").unlink(missing_ok=True)
    for sub in ("atlas", "grid", "layout", "viewer"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    for name in ("rows.npz", "class_atlas.png", "class_atlas_labelled.png", "class_atlas.json", "comparison.png",
                 "comparison.json"):
        (out / name).unlink(missing_ok=True)


def _render(run_dir: Path, run, layer: str, level, acts: np.ndarray, cfg, ridge: float, spec, progress: bool):
    """Icons for the kept cells of `level` (directions = level.mean_activation [m, c]) with the run's
    whitening (like ``pipeline.run_render``). acts: [n, c] the subset's activations (member ids of
    `level` index it). Returns (images [m, P, P, 3] uint8, fidelity [m], member_fidelity [m], S)."""
    S = run_whiten(run_dir, layer, ridge).S if cfg.whiten else None
    if spec is None:
        spec = load_run_model(run, cfg.device or "cpu")
    module_layer = run.config["module_layers"][layer]
    icons = render_icons(spec, module_layer, level.mean_activation, cfg, S=S, progress=progress)
    member = best_member_fidelity(level, acts, S)
    return icons.images, icons.fidelity, member, S


def _atlas_level(level, images, fidelity, member) -> AtlasLevel:
    return AtlasLevel(size=level.size, i=level.i, j=level.j, count=level.count, top_classes=level.top_classes,
                      top_values=level.top_values, icons=images, fidelity=fidelity, member_fidelity=member)


def _cell_records(alv: AtlasLevel, class_names: list[str], rows: np.ndarray, level) -> list[dict]:
    """One dict per kept cell (see the module docstring); rows: [n] run rows the level's members index.
    ``grid.level_to_records`` builds the common fields; a cell adds its index, icon path and run rows."""
    recs = level_to_records(alv, class_names, None, digits=6, unknown_name=True)
    fid = np.asarray(alv.fidelity, np.float64).tolist()
    member = np.asarray(alv.member_fidelity, np.float64).tolist()
    return [{"cell": c, **rec, "fidelity": round(fid[c], 4), "member_fidelity": round(member[c], 4),
             "icon": f"atlas/level-{alv.size}/cell-{rec['i']}-{rec['j']}.png",
             "rows": rows[level.members(c)].tolist()} for c, rec in enumerate(recs)]


def _font():
    return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: float, font) -> str:
    """`text`, cut with '…' to at most `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: float, font, max_lines: int = 3) -> list[str]:
    """`text` broken at spaces into lines of at most `width` pixels (the last one cut with '…')."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [_fit(draw, line, width, font) for line in lines]


def labelled_canvas(level: AtlasLevel, labels: list[str], title: str | None = None,
                    marks: set[int] | frozenset = frozenset(), axis: tuple[str, str] | None = None,
                    label_height: int = 14) -> Image.Image:
    """The icons of `level` on a G x G canvas (x right, y up, as ``AtlasLevel.canvas``) with `labels[c]`
    written under icon c.

    level: AtlasLevel with icons [m, P, P, 3]; labels: [m] strings; marks: kept-cell indices to frame
    in red; axis: (left text, right text) written under the grid at its left and right ends with an
    arrow between them and a dashed line at the middle (x = 0 of a comparison). Returns an RGB image
    of width G*P and height (title strip) + G*(P + label_height) + (axis strip).
    """
    G, P = int(level.size), int(level.icon_size)
    if P <= 0:
        raise ConfigError("the level has no icons to draw")
    font = _font()
    ch = P + label_height
    lines = _wrap(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, G * P - 6, font) if title else []
    top = 4 + 13 * len(lines) if lines else 0
    bottom = 34 if axis else 0
    img = Image.new("RGB", (G * P, top + G * ch + bottom), "white")
    d = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        d.text((3, 2 + 13 * k), line, fill="black", font=font)
    for c in range(len(level.i)):
        x0, y0 = int(level.i[c]) * P, top + (G - 1 - int(level.j[c])) * ch
        img.paste(Image.fromarray(np.asarray(level.icons[c], np.uint8)), (x0, y0))
        text = _fit(d, str(labels[c]), P - 2, font)
        tw = d.textlength(text, font=font)
        d.text((x0 + max(1, (P - tw) / 2), y0 + P + 1), text, fill=(40, 40, 40), font=font)
        if c in marks:
            d.rectangle([x0, y0, x0 + P - 1, y0 + P - 1], outline=(220, 30, 30), width=max(1, P // 24))
    if axis:
        ya = top + G * ch
        if G % 2 == 0:
            xm = G // 2 * P
            for y in range(top, ya, 6):
                d.line([(xm, y), (xm, min(y + 3, ya))], fill=(120, 120, 120))
        yl = ya + 9
        d.line([(4, yl), (G * P - 5, yl)], fill="black")
        d.polygon([(0, yl), (6, yl - 4), (6, yl + 4)], fill="black")
        d.polygon([(G * P - 1, yl), (G * P - 7, yl - 4), (G * P - 7, yl + 4)], fill="black")
        left, right = axis
        half = G * P / 2 - 6
        lt, rt = _fit(d, f"more {left}", half, font), _fit(d, f"more {right}", half, font)
        d.text((2, yl + 5), lt, fill="black", font=font)
        d.text((G * P - 2 - d.textlength(rt, font=font), yl + 5), rt, fill="black", font=font)
    return img


def _viewer(out: Path, atlas_dir: Path, run_dir: Path, level, rows: np.ndarray, title: str,
            patches_per_cell: int) -> Path:
    return export_atlas(atlas_dir, out / "viewer", run_dir, grid_levels=[level], subset_rows=rows, title=title,
                        single_file=True, patches_per_cell=patches_per_cell)


def _run_view(out: Path, kind: str, key_rec: dict, force: bool, compute) -> bool:
    """Run ``compute(key)`` through the stage engine unless `out` already holds this result (same
    inputs and settings) and not `force`. Returns whether it ran. `out` gets its own manifest and
    lock; a folder this module did not create is refused before anything is written."""
    _claim(out)
    key = config_hash(key_rec)

    def fn(resume: bool) -> None:
        _prepare(out)
        compute(key)

    rep = run_stage(out, kind, key_rec, fn, lambda: _up_to_date(out, kind, key), force=force)
    if not rep.ran:
        log.info("%s in %s is up to date: loaded", kind.replace("_", " "), out)
    return rep.ran


def _render_subset(out: Path, run_dir: Path, run, layer: str, level, rows: np.ndarray, cfg, ridge: float, spec,
                   progress: bool, grid: int, min_count: int):
    """Render one icon per kept cell of `level` (a grid over run rows `rows`), save the one-level atlas
    and grid under `out`. Returns (AtlasLevel, icon fidelity [m], best-member fidelity [m])."""
    if level.m == 0:
        raise ConfigError(f"no cell of the {grid}x{grid} grid holds {min_count}+ of the {len(rows)} rows: "
                        "lower min_count or the grid size")
    acts = np.asarray(run.activations(layer)[rows], np.float32)
    images, fid, member, _ = _render(run_dir, run, layer, level, acts, cfg, ridge, spec, progress)
    alv = _atlas_level(level, images, fid, member)
    Atlas(layer, [alv], run.class_names).save(out / "atlas")
    save_grid([level], out / "grid", layer, run.class_names)
    return alv, fid, member


def _mean(a) -> float | None:
    a = np.asarray(a, np.float64)
    return round(float(a.mean()), 4) if len(a) else None


# ----------------------------------------------------------------------------------------------
# class atlas


def class_atlas_and_render(run_dir, layer: str | None, cls, *, mode: str = "winner", top: int = 2000,
                           grid: int = 8, min_count: int = 4, layout_cfg=None, render_cfg=None,
                           ridge: float = 1e-2, out=None, patches_per_cell: int = 8, viewer: bool = True,
                           force: bool = False, spec=None, progress: bool = False) -> ClassAtlasView:
    """A class activation atlas of `cls` (method.md §3.2), rendered and written to `out`.

    run_dir: run with full attributions for `layer` (None = the first collected layer); cls: class
    name, index or wnid ("did you mean" on near misses); mode: "winner" | "top" (``class_filter``);
    top: rows kept by "top"; grid: G; min_count: smallest kept cell (the reference's min_density 4);
    layout_cfg: ``LayoutConfig`` (default UMAP 20 / 0.01 / cosine, adapted to small subsets);
    render_cfg: ``RenderConfig`` (default ``single_level()``, whitened with ``RUN/whiten/<layer>``; a
        parent warm start becomes its `standalone` match: a view has one level);
    out: results folder (default ``RUN/class-atlas/<layer>/<index-name>-<mode>``); viewer: also write
    ``viewer/index.html``; force: recompute even when `out` holds a result with the same inputs and
    settings (otherwise loaded, ``ran=False``); spec: the run's model, loaded when None.

    Returns a ``ClassAtlasView``: ``.atlas`` (rows [n], coords [n, 2], level), ``.level`` (icons
    [m, P, P, 3], fidelity [m]), ``.paths`` (png, labelled_png, json, viewer), ``.summary``.
    """
    t0 = time.perf_counter()
    run_dir, run, layer, cfg, chash = _setup(run_dir, layer, render_cfg)
    c = _resolve(run, cls)
    if mode not in FILTERS:
        raise ConfigError(f"class filter must be one of {', '.join(FILTERS)}, got {mode!r}")
    if grid < 1:
        raise ConfigError(f"grid must be >= 1, got {grid}")
    names = run.class_names
    out = Path(out) if out is not None else (run_dir / "class-atlas" / layer_dirname(layer)
                                             / f"{class_slug(c, names[c])}-{mode}")
    lcfg_rec = dataclasses.asdict(layout_cfg) if layout_cfg is not None else None
    key_rec = {"kind": CLASS_ATLAS, "format": FORMAT, "collect": chash, "layer": layer, "class": c, "mode": mode,
               "top": int(top), "grid": int(grid), "min_count": int(min_count), "layout": lcfg_rec,
               "render": settings_record(cfg), "ridge": ridge, "viewer": viewer, "patches": patches_per_cell}
    views: list = []

    def compute(key: str) -> None:
        ca = class_atlas(run, layer, c, mode, top, grid, layout_cfg, min_count=min_count, progress=progress)
        alv, fid, member = _render_subset(out, run_dir, run, layer, ca.level, ca.rows, cfg, ridge, spec, progress,
                                          grid, min_count)
        save_layout(ca.layout, out / "layout", layer)
        np.savez(out / "rows.npz", rows=ca.rows, coords=ca.coords)
        labels = [names[int(t)] if t >= 0 else "" for t in ca.level.label]
        title = f"class atlas: {names[c]} ({mode}{f' {top}' if mode == 'top' else ''}, {layer})"
        paths = {"png": "class_atlas.png", "labelled_png": "class_atlas_labelled.png", "json": "class_atlas.json"}
        save_png_atomic(out / paths["png"], alv.canvas())
        save_png_atomic(out / paths["labelled_png"], labelled_canvas(alv, labels, title=title))
        if viewer:
            paths["viewer"] = str(_viewer(out, out / "atlas", run_dir, ca.level, ca.rows, title,
                                          patches_per_cell).relative_to(out))
        summary = {
            "kind": CLASS_ATLAS, "out_dir": str(out), "run_dir": str(run_dir), "layer": layer,
            "class": {"index": c, "name": names[c]}, "filter": mode, "top": int(top), "grid": int(grid),
            "min_count": int(min_count), "rows": int(len(ca.rows)), "rows_in_cells": int(ca.level.count.sum()),
            "cells": int(ca.level.m), "icon_size": int(alv.icon_size), "mean_icon_fidelity": _mean(fid),
            "mean_member_fidelity": _mean(member), "layout": {"method": ca.layout.method, "params": ca.layout.params},
            "cells_top_class_is_target": int(np.sum(ca.level.label == c)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json_atomic(out / paths["json"], {
            **{k: v for k, v in summary.items() if k not in ("seconds", "cells")}, "n_cells": int(ca.level.m),
            "axes": "i = x cell (rightward), j = y cell (upward) of the subset's own layout",
            "cells": _cell_records(alv, names, ca.rows, ca.level)})
        write_json_atomic(out / "result.json", {"kind": CLASS_ATLAS, "format": FORMAT, "key": key, "settings": key_rec,
                                                "summary": summary, "paths": paths})
        views.append(ClassAtlasView(out_dir=out, layer=layer, level=alv, class_names=names, summary=summary,
                              paths={k: out / v for k, v in paths.items()}, ran=True, atlas=ca))

    if not _run_view(out, CLASS_ATLAS, key_rec, force, compute):
        return load_class_atlas(out)
    return views[0]


def _read_result(out, kind: str) -> dict:
    import json

    out = Path(out)
    p = out / "result.json"
    if not p.is_file():
        raise ConfigError(f"{out} holds no finished {kind.replace('_', ' ')} (result.json missing)")
    res = json.loads(p.read_text())
    if res.get("kind") != kind:
        raise ConfigError(f"{out} holds a {res.get('kind')}, not a {kind}")
    return res


def load_class_atlas(out) -> ClassAtlasView:
    """Read a folder written by ``class_atlas_and_render`` (``ran=False``)."""
    out = Path(out)
    res = _read_result(out, CLASS_ATLAS)
    s, layer = res["settings"], res["summary"]["layer"]
    atlas = Atlas.load(out / "atlas")
    with np.load(out / "rows.npz") as z:
        rows, coords = z["rows"], z["coords"]
    level = load_grid(out / "grid", layer)[0]
    ca = ClassAtlas(cls=int(s["class"]), mode=s["mode"], top=int(s["top"]), rows=rows, coords=coords,
                    layout=load_layout(out / "layout", layer), level=level)
    return ClassAtlasView(out_dir=out, layer=layer, level=atlas.levels[0], class_names=atlas.class_names,
                          summary=res["summary"], paths={k: out / v for k, v in res["paths"].items()},
                          ran=False, atlas=ca)


# ----------------------------------------------------------------------------------------------
# two-class comparison


def compare_and_render(run_dir, layer: str | None, left, right, *, top: int = 2000, grid: int = 10,
                       y_method: str = "tsne", min_count: int = 4, seed: int = 0, render_cfg=None,
                       ridge: float = 1e-2, out=None, patches_per_cell: int = 8, viewer: bool = True,
                       force: bool = False, spec=None, progress: bool = False) -> ComparisonView:
    """A two-class comparison of `left` vs `right` (method.md §3.3), rendered and written to `out`.

    run_dir: run with full attributions for `layer` (None = the first collected layer); left, right:
    class names, indices or wnids; top: rows per class by the magnitude filter (plus its winners);
    grid: G (even, so that the two halves are the two sides); y_method: "tsne" | "umap" | "pca";
    seed: of the 1-D embedding; render_cfg / ridge / spec: as ``class_atlas_and_render``; out: results
    folder (default ``RUN/compare/<layer>/<left>--<right>``); force: recompute even when up to date.

    Returns a ``ComparisonView``: ``.comparison`` (rows [n], x [n] in [-1, 1], y [n] in [0, 1], level,
    labels [m], sides [m], candidates), ``.candidates``, ``.level`` (icons [m, P, P, 3]), ``.paths``
    (png, json, viewer), ``.summary`` (with ``candidates`` as dicts).
    """
    t0 = time.perf_counter()
    run_dir, run, layer, cfg, chash = _setup(run_dir, layer, render_cfg)
    a, b = _resolve(run, left), _resolve(run, right)
    if a == b:
        raise ConfigError(f"left and right are the same class ({a}: {run.class_names[a]})")
    if y_method not in Y_METHODS:
        raise ConfigError(f"y method must be one of {', '.join(Y_METHODS)}, got {y_method!r}")
    if grid < 2:
        raise ConfigError(f"grid must be >= 2, got {grid}")
    names = run.class_names
    out = Path(out) if out is not None else (run_dir / "compare" / layer_dirname(layer)
                                             / f"{class_slug(a, names[a])}--{class_slug(b, names[b])}")
    key_rec = {"kind": COMPARISON, "format": FORMAT, "collect": chash, "layer": layer, "left": a, "right": b,
               "top": int(top), "grid": int(grid), "y": y_method, "min_count": int(min_count), "seed": int(seed),
               "render": settings_record(cfg), "ridge": ridge, "viewer": viewer, "patches": patches_per_cell}
    views: list = []

    def compute(key: str) -> None:
        cmp = compare(run, layer, a, b, top=top, grid=grid, y_method=y_method, min_count=min_count, seed=seed)
        alv, fid, member = _render_subset(out, run_dir, run, layer, cmp.level, cmp.rows, cfg, ridge, spec, progress,
                                          grid, min_count)
        np.savez(out / "rows.npz", rows=cmp.rows, coords=cmp.coords, x=cmp.x, y=cmp.y)
        marks = {k.cell for k in cmp.candidates}
        title = (f"{names[a]} vs {names[b]} ({layer}; x: attribution {names[b]} - {names[a]}, y: {y_method})"
                 + ("; red frame: candidate patch cell" if marks else ""))
        paths = {"png": "comparison.png", "json": "comparison.json"}
        save_png_atomic(out / paths["png"],
                        labelled_canvas(alv, cmp.labels, title=title, marks=marks, axis=(names[a], names[b])))
        if viewer:
            paths["viewer"] = str(_viewer(out, out / "atlas", run_dir, cmp.level, cmp.rows,
                                          f"{names[a]} \u2190 \u2192 {names[b]}: two-class comparison ({layer})",
                                          patches_per_cell).relative_to(out))
        cells = _cell_records(alv, names, cmp.rows, cmp.level)
        side_name = {-1: "left", 1: "right", 0: "middle"}
        for rec, sd in zip(cells, cmp.sides.tolist()):
            rec["side"] = side_name[int(sd)]
        cands = [{**k.to_dict(), "icon": cells[k.cell]["icon"], "rows": cells[k.cell]["rows"]} for k in cmp.candidates]
        summary = {
            "kind": COMPARISON, "out_dir": str(out), "run_dir": str(run_dir), "layer": layer,
            "left": {"index": a, "name": names[a]}, "right": {"index": b, "name": names[b]}, "top": int(top),
            "grid": int(grid), "y": y_method, "min_count": int(min_count), "rows": int(len(cmp.rows)),
            "rows_in_cells": int(cmp.level.count.sum()), "cells": int(cmp.level.m), "icon_size": int(alv.icon_size),
            "mean_icon_fidelity": _mean(fid), "mean_member_fidelity": _mean(member),
            "candidates": [{k: v for k, v in c.items() if k != "rows"} for c in cands],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json_atomic(out / paths["json"], {
            **{k: v for k, v in summary.items() if k not in ("seconds", "candidates", "cells")},
            "n_cells": int(cmp.level.m),
            "axes": ("x = (attr[right] - attr[left]) / P99(|.|) clipped to [-1, 1], binned as (x + 1) / 2: "
                     "columns i < G/2 are the left side, i >= G/2 the right side (G even); "
                     "j = y cell (upward) of the 1-D embedding"),
            "cells": cells, "candidates": cands})
        write_json_atomic(out / "result.json", {"kind": COMPARISON, "format": FORMAT, "key": key, "settings": key_rec,
                                                "summary": summary, "paths": paths})
        views.append(ComparisonView(out_dir=out, layer=layer, level=alv, class_names=names, summary=summary,
                              paths={k: out / v for k, v in paths.items()}, ran=True, comparison=cmp))

    if not _run_view(out, COMPARISON, key_rec, force, compute):
        return load_comparison(out)
    return views[0]


def load_comparison(out) -> ComparisonView:
    """Read a folder written by ``compare_and_render`` (``ran=False``): the full ``Comparison`` (rows, x,
    y, grid level, labels, sides, candidates as ``Candidate``) plus icons and summary."""
    import json

    out = Path(out)
    res = _read_result(out, COMPARISON)
    s, layer = res["settings"], res["summary"]["layer"]
    atlas = Atlas.load(out / "atlas")
    data = json.loads((out / res["paths"]["json"]).read_text())
    with np.load(out / "rows.npz") as z:
        rows, coords, x, y = z["rows"], z["coords"], z["x"], z["y"]
    level = load_grid(out / "grid", layer)[0]
    fields = {f.name for f in dataclasses.fields(Candidate)}
    cands = [Candidate(**{k: v for k, v in d.items() if k in fields}) for d in data["candidates"]]
    labels = [atlas.class_names[int(t)] if t >= 0 else "" for t in level.label]
    cmp = Comparison(left=int(s["left"]), right=int(s["right"]), rows=rows, x=x, y=y, coords=coords, level=level,
                     labels=labels, sides=cell_sides(level), candidates=cands, y_method=s["y"])
    return ComparisonView(out_dir=out, layer=layer, level=atlas.levels[0], class_names=atlas.class_names,
                          summary=res["summary"], paths={k: out / v for k, v in res["paths"].items()},
                          ran=False, comparison=cmp)


def candidates_table(candidates, left_name: str = "left", right_name: str = "right") -> str:
    """A plain-text table of candidate patch cells (``Candidate`` objects or their dicts)."""
    rows = [c.to_dict() if isinstance(c, Candidate) else c for c in candidates]
    head = f"candidate patch cells (top class neither {left_name} nor {right_name}): {len(rows)}"
    if not rows:
        return head
    lines = [head, f"  {'cell':>4}  {'(i, j)':>8}  {'side':<24}  {'n':>5}  {'top class':<28}  mean attr"]
    for r in rows:
        side = f"{r['side']} ({right_name if r['side'] == 'right' else left_name})"
        name = r.get("top_name") or str(r["top_class"])
        lines.append(f"  {r['cell']:>4}  {'(%d, %d)' % (r['i'], r['j']):>8}  {side[:24]:<24}  {r['n']:>5}  "
                     f"{(str(r['top_class']) + ' ' + name)[:28]:<28}  {r['value']:.4g}")
    return "\n".join(lines)
