"""Static site export of an atlas run: our own HTML/JS/CSS viewer plus the data it reads.

Layout of an exported site ``SITE/``::

    index.html  viewer.js  viewer.css      the viewer (from ``actatlas/export/static``)
    manifest.json                          layers, levels, class names, icon size, sample counts
    data/<layer>/level-<G>.json            cells of one level, columnar, compact keys (below)
    data/<layer>/level-<G>-heat.json       class attributions for the class heatmap (below)
    data/<layer>/level-<G>/icons-<tx>-<ty>.png    icon sprite sheets, one per tile of T x T cells
    data/<layer>/level-<G>/patches-<k>.png        member image patches, sprite sheets of fixed capacity

Cell JSON (one entry per kept cell, all arrays of length m): ``i``, ``j`` grid column / row
(j grows upward), ``n`` samples in the cell, ``t`` top-5 class ids (flattened, 5 per cell, -1
padded), ``v`` their mean attribution values, ``f`` icon fidelity, ``mf`` best real member
fidelity, ``s`` icon sheet index (into ``sheets``) and ``k`` slot in that sheet, ``pc`` number of
member patches. Patches of cell number c live in sheet ``c // patches.cells_per_sheet`` at slots
``(c % cells_per_sheet) * per_cell + q``.

Heat JSON (present when the run has attributions): to keep a level of ~25k cells x 1000 classes
small, each cell keeps only its ``K`` (default 20) classes of largest absolute mean attribution:
``idx`` = base64 little-endian uint16 [m, K] (65535 = padding) and ``val`` = base64 float16
[m, K]. Per-class normalisers over ALL classes are computed from the full vectors before
truncation: ``pos[c]`` = max over cells of the attribution to c (>= 0) and ``neg[c]`` = max of its
negation; the viewer draws ``a = max(0, f_c * sign / norm_c) * intensity`` (method.md §3.1,
normalised per class). A class missing from a cell's top K counts as 0 there (small by
construction).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

STATIC_FILES = ("index.html", "viewer.js", "viewer.css")
HEAT_K = 20
SHEET_MAX_PX = 2048
PATCH_SHEET_MAX_PX = 2048
FORMAT = 1


def _static(name: str) -> str:
    return resources.files("actatlas.export").joinpath("static", name).read_text(encoding="utf-8")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


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

    def png(self, rel: str, img: Image.Image) -> None:
        if self.out is None:
            import io

            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=False)
            self.files[rel] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        else:
            p = self.out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p, format="PNG")


class _ImageCache:
    """Small LRU of geometry-transformed input images (members often share an image)."""

    def __init__(self, geometry, size: int = 64):
        self.geometry = geometry
        self.size = size
        self.cache: OrderedDict[str, Image.Image | None] = OrderedDict()

    def get(self, path: str) -> Image.Image | None:
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        from ..data import load_rgb

        try:
            img = self.geometry(load_rgb(path))
        except Exception:  # a moved/deleted source image: that patch is left out
            img = None
        self.cache[path] = img
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return img


def _geometry_for(run):
    """The model's input geometry (resize/crop to s x s) or a plain centre square resize."""
    try:
        from ..pipeline import _load_spec

        pre = _load_spec(run, "cpu").preprocess
        return pre.geometry, int(pre.size)
    except Exception:
        s = 224

        def geom(img: Image.Image) -> Image.Image:
            w, h = img.size
            m = min(w, h)
            img = img.crop(((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m))
            return img.resize((s, s), Image.BILINEAR)

        return geom, s


def patch_box(y: int, x: int, h: int, w: int, s: int) -> tuple[int, int, int, int]:
    """Crop box (x0, y0, x1, y1) in the s x s input around layer position (y, x) of an h x w map.

    The box is centred on the position's centre ((y+.5)s/h, (x+.5)s/w) and approximates its
    receptive field: 4 strides wide, at least s/4 and at most s; shifted to stay inside the image.
    """
    stride = s / max(1, min(h, w))
    side = int(round(min(s, max(4 * stride, s / 4))))
    cy, cx = (y + 0.5) * s / h, (x + 0.5) * s / w
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    x0 = min(max(0, x0), s - side)
    y0 = min(max(0, y0), s - side)
    return x0, y0, x0 + side, y0 + side


def _icon_tile(size: int, icon: int) -> int:
    return max(1, min(size, SHEET_MAX_PX // max(1, icon)))


def _export_level(w: _Writer, atlas_dir: Path, layer: str, lvjson: dict, grid_level, rows, shape,
                  images: _ImageCache | None, s: int, patches_per_cell: int, patch_size: int,
                  n_classes: int) -> dict:
    G = int(lvjson["size"])
    icon = int(lvjson.get("icon_size") or 0)
    cells = lvjson["cells"]
    m = len(cells)
    base = f"data/{layer}/level-{G}"
    # ---- icon sprite sheets, one per T x T tile of the grid
    if icon <= 0 and m:
        with Image.open(atlas_dir / cells[0]["icon"]) as im:
            icon = im.size[0]
    T = _icon_tile(G, icon)
    tiles: dict[tuple[int, int], list[int]] = {}
    for c, cell in enumerate(cells):
        tiles.setdefault((int(cell["i"]) // T, int(cell["j"]) // T), []).append(c)
    sheets, sheet_of, slot_of = [], np.zeros(m, np.int32), np.zeros(m, np.int32)
    for si, ((tx, ty), members) in enumerate(sorted(tiles.items())):
        cols = max(1, math.ceil(math.sqrt(len(members))))
        nrows = math.ceil(len(members) / cols)
        sheet = Image.new("RGB", (cols * icon, nrows * icon), (223, 223, 223))
        for k, c in enumerate(members):
            with Image.open(atlas_dir / cells[c]["icon"]) as im:
                im = im.convert("RGB")
                if im.size != (icon, icon):
                    im = im.resize((icon, icon), Image.BILINEAR)
                sheet.paste(im, ((k % cols) * icon, (k // cols) * icon))
            sheet_of[c], slot_of[c] = si, k
        rel = f"{base}/icons-{tx}-{ty}.png"
        w.png(rel, sheet)
        sheets.append({"url": rel, "cols": cols, "tx": tx, "ty": ty})
    # ---- member patches
    pcount = np.zeros(m, np.int32)
    patch_info = None
    if images is not None and grid_level is not None and patches_per_cell > 0 and m:
        per_sheet_slots = (PATCH_SHEET_MAX_PX // patch_size) ** 2
        cells_per_sheet = max(1, per_sheet_slots // patches_per_cell)
        pcols = max(1, math.ceil(math.sqrt(cells_per_sheet * patches_per_cell)))
        h, wd = int(shape[1]), int(shape[2])
        index = {(int(a), int(b)): q for q, (a, b) in enumerate(zip(grid_level.i, grid_level.j))}
        closest = np.asarray(grid_level.closest) if grid_level.closest is not None else None
        patch_urls = []
        for k0 in range(0, m, cells_per_sheet):
            chunk = range(k0, min(m, k0 + cells_per_sheet))
            slots_used = (len(chunk) - 1) * patches_per_cell + patches_per_cell
            prow = math.ceil(slots_used / pcols)
            sheet = Image.new("RGB", (pcols * patch_size, prow * patch_size), (255, 255, 255))
            for c in chunk:
                q = index.get((int(cells[c]["i"]), int(cells[c]["j"])))
                if q is None:
                    continue
                if closest is not None and closest.ndim == 2 and len(closest) > q:
                    members = [int(r) for r in closest[q] if r >= 0]
                else:
                    o0, o1 = int(grid_level.member_offsets[q]), int(grid_level.member_offsets[q + 1])
                    members = [int(r) for r in grid_level.member_rows[o0:o1]]
                got = 0
                for r in members:
                    if got >= patches_per_cell:
                        break
                    img = images.get(str(rows.path[r]))
                    if img is None:
                        continue
                    crop = img.crop(patch_box(int(rows.y[r]), int(rows.x[r]), h, wd, s))
                    crop = crop.resize((patch_size, patch_size), Image.BILINEAR)
                    slot = (c - k0) * patches_per_cell + got
                    sheet.paste(crop, ((slot % pcols) * patch_size, (slot // pcols) * patch_size))
                    got += 1
                pcount[c] = got
            rel = f"{base}/patches-{k0 // cells_per_sheet}.png"
            w.png(rel, sheet)
            patch_urls.append(rel)
        patch_info = {"sheets": patch_urls, "cells_per_sheet": cells_per_sheet, "per_cell": patches_per_cell,
                      "cols": pcols, "size": patch_size}
    # ---- cell JSON
    t = np.full((m, 5), -1, np.int32)
    v = np.zeros((m, 5), np.float64)
    for c, cell in enumerate(cells):
        for q, entry in enumerate((cell.get("top") or [])[:5]):
            t[c, q], v[c, q] = int(entry[0]), float(entry[2])

    def fl(x, nd=4):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)

    data = {
        "layer": layer, "size": G, "icon": icon, "tile": T,
        "i": [int(c["i"]) for c in cells], "j": [int(c["j"]) for c in cells], "n": [int(c["n"]) for c in cells],
        "t": t.ravel().tolist(), "v": [float(f"{x:.4g}") for x in v.ravel()],
        "f": [fl(c.get("fidelity")) for c in cells], "mf": [fl(c.get("member_fidelity")) for c in cells],
        "s": sheet_of.tolist(), "k": slot_of.tolist(), "pc": pcount.tolist(),
        "sheets": sheets, "patches": patch_info, "samples": int(sum(int(c["n"]) for c in cells)),
    }
    w.json(f"{base}.json", data)
    # ---- heat
    heat_url = None
    att = None if grid_level is None else grid_level.mean_attribution
    if att is not None and np.size(att) and m and np.ndim(att) == 2 and att.shape[1] == n_classes:
        att = np.asarray(att, np.float32)
        index = {(int(a), int(b)): q for q, (a, b) in enumerate(zip(grid_level.i, grid_level.j))}
        order = np.array([index.get((int(c["i"]), int(c["j"])), -1) for c in cells])
        full = np.zeros((m, n_classes), np.float32)
        ok = order >= 0
        full[ok] = att[order[ok]]
        K = min(HEAT_K, n_classes)
        idx = np.argsort(-np.abs(full), axis=1, kind="stable")[:, :K]
        val = np.take_along_axis(full, idx, axis=1)
        idx = idx.astype("<u2")
        pos = np.maximum(full.max(axis=0), 0)
        neg = np.maximum((-full).max(axis=0), 0)
        heat_url = f"{base}-heat.json"
        w.json(heat_url, {"k": K, "m": m, "idx": _b64(idx), "val": _b64(val.astype("<f2")),
                          "pos": [float(f"{x:.4g}") for x in pos], "neg": [float(f"{x:.4g}") for x in neg]})
    return {"size": G, "cells": m, "url": f"{base}.json", "heat": heat_url, "icon": icon,
            "samples": data["samples"]}


def _provenance(run, layer: str, subset=None):
    """(Rows, layer map shape [c, h, w]) of `layer`, restricted to run rows `subset` when given, so that
    a grid whose members index the subset finds its member patches; (None, None) when unavailable."""
    try:
        rows = run.rows(layer)
        shape = run.summary["layer_shapes"][layer]
    except Exception:
        return None, None
    if subset is not None:
        from ..run import Rows

        idx = np.asarray(subset, np.int64)
        rows = Rows(**{f: getattr(rows, f)[idx] for f in rows.__dataclass_fields__})
    return rows, shape


def _export_layer(w: _Writer, adir: Path, layer: str, grids: dict, rows, shape, images, s: int,
                  patches_per_cell: int, patch_size: int, n_classes: int) -> dict:
    """Export every level of the assembled atlas in `adir` (``atlas.json`` + ``level-<G>.json`` +
    icons); returns the manifest's entry for the layer (with its largest icon size under "icon")."""
    meta = json.loads((adir / "atlas.json").read_text())
    use_images = images if rows is not None and shape is not None and len(shape) == 3 else None
    levels = []
    for G in meta["levels"]:
        lvjson = json.loads((adir / f"level-{G}.json").read_text())
        levels.append(_export_level(w, adir, layer, lvjson, grids.get(int(G)), rows, shape, use_images, s,
                                    patches_per_cell, patch_size, n_classes))
    return {"name": layer, "levels": levels, "total_samples": max([lv["samples"] for lv in levels] or [0]),
            "icon": max([lv["icon"] for lv in levels] or [0])}


def _build(run_dir: Path, w: _Writer, layers, patches_per_cell: int, patch_size: int) -> dict:
    from ..grid import load_grid
    from ..run import open_run

    atlas_root = run_dir / "atlas"
    if not atlas_root.is_dir():
        raise UserError(f"{run_dir} has no atlas/ (run 'actatlas build' or 'actatlas render' first)")
    run = open_run(run_dir)
    avail = [ly for ly in run.layers if (atlas_root / ly / "atlas.json").is_file()]
    if not avail:  # layer names may have been sanitised for the directory
        avail = sorted(p.parent.name for p in atlas_root.glob("*/atlas.json"))
    if layers:
        missing = [ly for ly in layers if ly not in avail]
        if missing:
            raise UserError(f"no atlas for layer(s) {', '.join(missing)} in {run_dir}; have: {', '.join(avail)}")
        avail = list(layers)
    if not avail:
        raise UserError(f"{run_dir}/atlas holds no atlas.json")
    geometry, s = _geometry_for(run) if patches_per_cell > 0 else (None, 0)
    images = _ImageCache(geometry) if geometry is not None else None
    class_names = list(run.class_names)
    out_layers = []
    icon_size = 0
    for layer in avail:
        try:
            grids = {int(g.size): g for g in load_grid(run_dir / "grid", layer)}
        except Exception:
            grids = {}
        entry = _export_layer(w, atlas_root / layer, layer, grids, *_provenance(run, layer), images, s,
                              patches_per_cell, patch_size, len(class_names))
        icon_size = max(icon_size, entry["icon"])
        out_layers.append(entry)
    cfg = run.config
    rows_per_layer = run.summary.get("rows")
    total = (int(rows_per_layer.get(avail[0], 0)) if isinstance(rows_per_layer, dict) else 0) or \
        max(ly["total_samples"] for ly in out_layers)
    manifest = {"format": FORMAT, "title": f"Activation atlas: {cfg.get('model', '')}",
                "model": cfg.get("model"), "layers": out_layers, "class_names": class_names,
                "icon_size": icon_size, "total_samples": total}
    w.json("manifest.json", manifest)
    return manifest


def _script_json(obj) -> str:
    """JSON safe to embed inside a <script> element."""
    return (json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def single_file_html(run_dir: str | os.PathLike, layers=None, patches_per_cell: int = 8,
                     patch_size: int = 64) -> str:
    """The whole viewer with every file inlined (data: URIs / embedded JSON) as one HTML string."""
    w = _Writer(None)
    _build(Path(run_dir), w, layers, patches_per_cell, patch_size)
    return _inline(w)


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
    run_dir, out = Path(run_dir), Path(out_dir)
    if patch_size < 8 or patch_size > 512:
        raise UserError("patch_size must be in [8, 512]")
    out.mkdir(parents=True, exist_ok=True)
    if single_file:
        index = out / "index.html"
        index.write_text(single_file_html(run_dir, layers, patches_per_cell, patch_size), encoding="utf-8")
        return index
    if (out / "data").is_dir():
        shutil.rmtree(out / "data")
    _build(run_dir, _Writer(out), layers, patches_per_cell, patch_size)
    for name in STATIC_FILES:
        (out / name).write_text(_static(name), encoding="utf-8")
    return out / "index.html"


def export_atlas(atlas_dir: str | os.PathLike, out_dir: str | os.PathLike, run_dir: str | os.PathLike, *,
                 grid_levels=(), subset_rows=None, title: str | None = None, single_file: bool = True,
                 patches_per_cell: int = 8, patch_size: int = 64) -> Path:
    """Export one assembled atlas that lives outside ``RUN/atlas/`` (a class atlas, a two-class
    comparison: anything written by ``Atlas.save``) as the viewer; returns the index.html path.

    Args:
        atlas_dir: the folder ``Atlas.save`` wrote (``atlas.json``, ``level-<G>.json``, icons).
        out_dir: where the viewer goes (``index.html``, plus data files unless `single_file`).
        run_dir: the run the atlas was made from (class names, provenance for member patches).
        grid_levels: the ``GridLevel`` of each level (members and mean attributions: patches and the
            class heatmap); levels without one are exported without them.
        subset_rows: [n] int64 run rows that the grid levels' member ids index (the atlas was laid out
            over this subset of the run); None when they are run rows already.
        title: the page title.
        single_file: one self-contained ``index.html`` (default) or a site folder.
        patches_per_cell, patch_size: real image patches per cell and their side in pixels.
    """
    from ..run import open_run

    adir, out = Path(atlas_dir), Path(out_dir)
    if not (adir / "atlas.json").is_file():
        raise UserError(f"{adir} holds no assembled atlas (atlas.json missing)")
    if patch_size < 8 or patch_size > 512:
        raise UserError("patch_size must be in [8, 512]")
    run = open_run(run_dir)
    layer = json.loads((adir / "atlas.json").read_text())["layer"]
    class_names = list(run.class_names)
    geometry, s = _geometry_for(run) if patches_per_cell > 0 else (None, 0)
    images = _ImageCache(geometry) if geometry is not None else None
    out.mkdir(parents=True, exist_ok=True)
    if not single_file and (out / "data").is_dir():
        shutil.rmtree(out / "data")
    w = _Writer(None if single_file else out)
    entry = _export_layer(w, adir, layer, {int(g.size): g for g in grid_levels},
                          *_provenance(run, layer, subset_rows), images, s, patches_per_cell, patch_size,
                          len(class_names))
    cfg = run.config
    w.json("manifest.json", {"format": FORMAT, "title": title or f"Activation atlas: {cfg.get('model', '')}",
                             "model": cfg.get("model"), "layers": [entry], "class_names": class_names,
                             "icon_size": entry["icon"], "total_samples": entry["total_samples"]})
    index = out / "index.html"
    if single_file:
        index.write_text(_inline(w), encoding="utf-8")
    else:
        for name in STATIC_FILES:
            (out / name).write_text(_static(name), encoding="utf-8")
    return index


def notebook_html(run_dir: str | os.PathLike, layer: str | None = None, height: int = 640) -> str:
    """The single-file viewer inside an ``<iframe srcdoc=...>`` for Jupyter's ``_repr_html_``."""
    page = single_file_html(run_dir, [layer] if layer else None)
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;'
            f'border:1px solid #ccc" sandbox="allow-scripts" title="activation atlas"></iframe>')
