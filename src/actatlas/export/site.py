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
padded), ``v`` their mean attribution values, ``f`` icon fidelity, ``mf`` best real member
fidelity, ``s`` icon sheet index (into ``sheets``) and ``k`` slot in that sheet, ``pc`` number of
member patches. Patches of cell number c live in sheet ``c // patches.cells_per_sheet`` at slots
``(c % cells_per_sheet) * per_cell + q``. With attributions, ``w`` / ``wn`` are each cell's top class
/ most negative class over ALL classes (-1: none), for the viewer's "winner" filter.

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

from ..atlas import aligned_attributions, cell_winners, class_heat_values
from ..errors import UserError

STATIC_FILES = ("index.html", "viewer.js", "viewer.css")
HEAT_SCALE = 127
SHEET_MAX_PX = 2048
PATCH_SHEET_MAX_PX = 2048
FORMAT = 2


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


def _export_level(w: _Writer, atlas_dir: Path, layer: str, lvjson: dict, grid_level, rows, shape,
                  images: _ImageCache | None, s: int, patches_per_cell: int, patch_size: int,
                  n_classes: int, heats: list | None = None) -> dict:
    """Export one level; with attributions, appends ``(G, q, pos, neg)`` (`quantize_heat`) to `heats`."""
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
    # ---- class heat: the full mean attribution of every class (written per class by _write_class_heat)
    att = aligned_attributions(grid_level, [int(c["i"]) for c in cells], [int(c["j"]) for c in cells]) \
        if m else None
    if att is not None and att.shape[1] == n_classes and heats is not None:
        data["w"] = cell_winners(att, 1).tolist()
        data["wn"] = cell_winners(att, -1).tolist()
        heats.append((G, *quantize_heat(att)))
    w.json(f"{base}.json", data)
    return {"size": G, "cells": m, "url": f"{base}.json", "icon": icon, "samples": data["samples"]}


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
    levels, heats = [], []
    for G in meta["levels"]:
        lvjson = json.loads((adir / f"level-{G}.json").read_text())
        levels.append(_export_level(w, adir, layer, lvjson, grids.get(int(G)), rows, shape, use_images, s,
                                    patches_per_cell, patch_size, n_classes, heats))
    entry = {"name": layer, "levels": levels, "total_samples": max([lv["samples"] for lv in levels] or [0]),
             "icon": max([lv["icon"] for lv in levels] or [0])}
    class_heat = _write_class_heat(w, layer, heats, n_classes)
    if class_heat is not None:
        entry["class_heat"] = class_heat
    return entry


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
