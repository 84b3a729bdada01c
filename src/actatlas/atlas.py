"""The assembled atlas: levels of cells with icons, saved as PNG canvases and per-level JSON.

Orientation (method.md §1.12 discusses the reference's variants): the canvas shows the layout as a
scatter plot would — layout x to the right, layout y upward. Cell (i, j) of level G (i from x, j from
y) is drawn at pixel column ``i * P`` and row ``(G - 1 - j) * P`` for icons of P pixels. Empty cells
stay white.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ConfigError
from .grid import level_to_records
from .models import resolve_class
from .scores import SCORE_KEYS, cut_patch, patch_box, score_value  # noqa: F401  (cut_patch, patch_box: a
#   cell's real patches, public here for the export, which reads only the atlas layer)
from .store import layer_dirname, write_json_atomic


@dataclass
class AtlasLevel:
    """One zoom level: `size` G, per-cell grid position, count, classes, icons and their scores.

    Arrays share the first dimension m (kept cells): i, j, count [m]; top_classes, top_values [m, k];
    icons uint8 [m, P, P, 3]; fidelity [m] (the icon's objective alignment: cos to the target it was
    optimised toward; `objective_alignment`), member_fidelity [m] (the same for the best real member);
    scores: the honest icon scores {name: [m]} (`actatlas.scores.SCORE_KEYS`; empty when not computed,
    e.g. an atlas saved before they existed); steps: int64 [m] optimiser steps spent on each icon, all
    attempts together (None when not recorded).
    """

    size: int
    i: np.ndarray
    j: np.ndarray
    count: np.ndarray
    top_classes: np.ndarray
    top_values: np.ndarray
    icons: np.ndarray
    fidelity: np.ndarray
    member_fidelity: np.ndarray
    grid: Any = field(default=None, repr=False, compare=False)  # the GridLevel it was built from, if known
    scores: dict = field(default_factory=dict, repr=False, compare=False)
    steps: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def mean_steps(self) -> float | None:
        """Optimiser steps actually spent per icon, on average (None when not recorded or no cells)."""
        return float(np.mean(self.steps)) if self.steps is not None and len(self.steps) else None

    @property
    def objective_alignment(self) -> np.ndarray:
        """[m] the honest name of `fidelity`: cos(icon centre activation, the target it was optimised toward)."""
        return self.fidelity

    @property
    def icon_size(self) -> int:
        return int(self.icons.shape[1]) if len(self.icons) else 0

    def canvas(self, background: int = 255) -> np.ndarray:
        """uint8 [G*P, G*P, 3]: icons at their cells, x to the right and y upward."""
        g, p = self.size, self.icon_size
        out = np.full((g * p, g * p, 3), background, np.uint8)
        for k in range(len(self.i)):
            r, c = (g - 1 - int(self.j[k])) * p, int(self.i[k]) * p
            out[r:r + p, c:c + p] = self.icons[k]
        return out


@dataclass
class Atlas:
    """An activation atlas of one layer: `levels` from coarse to fine, plus class names."""

    layer: str
    levels: list[AtlasLevel]
    class_names: list[str]
    summary: dict = field(default_factory=dict)
    run_dir: Path | None = None  # the run it came from: lets notebooks show the full viewer
    report: Any = field(default=None, repr=False, compare=False)  # pipeline.BuildReport of build_atlas
    # {G: float32 [m, classes]} full mean attributions per cell, read lazily by class_heat
    _attributions: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _repr_html_(self) -> str:
        """Jupyter display: the coarsest canvas as an inline PNG (``actatlas.show(atlas)`` is the
        interactive viewer)."""
        return self.canvas_html("<br>interactive viewer: <code>actatlas.show(atlas)</code>")

    def canvas_html(self, note_html: str = "") -> str:
        """The coarsest canvas as an inline PNG figure, `note_html` appended to its caption."""
        if not self.levels:
            return f"<p>activation atlas of {html.escape(self.layer)}: no levels{note_html}</p>"
        buf = io.BytesIO()
        Image.fromarray(self.levels[0].canvas()).save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{b64}" style="max-width:100%" '
                f'alt="activation atlas"><figcaption>{html.escape(self.layer)}, level '
                f'{self.levels[0].size}{note_html}</figcaption></figure>')

    def level(self, size: int) -> AtlasLevel:
        for lv in self.levels:
            if lv.size == size:
                return lv
        raise ConfigError(f"no level {size}; levels: {[lv.size for lv in self.levels]}")

    def class_heat(self, cls: str | int, level: int, *, mode: str = "weighted", sign: int = 1) -> np.ndarray:
        """float32 [cells] heat of class `cls` (name or index) over the cells of level `level` (a size G),
        in the order of ``self.level(G)``'s cells, from the FULL mean attribution of every class
        (the run's grid artifacts, read lazily on first use). The export writes these numbers, so the
        viewer's class view shows the same values (quantized to 1/127).

        mode: "weighted" (the viewer's default): max(0, sign * a) / its max over the level's cells, in
                [0, 1] (0 everywhere when no cell has sign * a > 0);
              "winner": 1.0 where `cls` is the cell's top class (sign=1; the most negative one for
                sign=-1), else 0.0;
              "attribution": the raw signed mean attribution a of `cls` in each cell (the legend's units).
        sign: 1 positive influence, -1 negative influence.
        """
        c = resolve_class(cls, self.class_names)
        lv = self.level(int(level))
        att = self._attributions.get(lv.size)
        if att is None:
            att = self._attributions[lv.size] = _load_attributions(self, lv)
        return class_heat_values(att, c, mode, sign)

    def records(self, level: AtlasLevel) -> list[dict]:
        """JSON-able per-cell records (``level-<G>.json``): grid position, count, top classes
        (`grid.level_to_records`), the objective alignment of the icon and of the best real member
        (also under their old names "fidelity" / "member_fidelity"), the honest icon scores when the
        level has them (`actatlas.scores.SCORE_KEYS`; None where not computed) and the icon's path."""
        recs = level_to_records(level, self.class_names, None, digits=5, unknown_name=True)
        names = [k for k in SCORE_KEYS if k in level.scores]
        cols = {k: np.asarray(level.scores[k]).tolist() for k in names}
        steps = np.asarray(level.steps).tolist() if level.steps is not None else None
        out = []
        for c, (rec, f, mf) in enumerate(zip(recs, np.asarray(level.fidelity, np.float64).tolist(),
                                             np.asarray(level.member_fidelity, np.float64).tolist())):
            out.append({**rec, "objective_alignment": round(f, 4), "best_member_objective_alignment": round(mf, 4),
                        "fidelity": round(f, 4), "member_fidelity": round(mf, 4),
                        **{k: score_value(k, cols[k][c]) for k in names},
                        **({"steps": int(steps[c])} if steps is not None else {}),
                        "icon": f"level-{level.size}/cell-{rec['i']}-{rec['j']}.png"})
        return out

    def save(self, directory: str | Path) -> dict[int, Path]:
        """Write ``<dir>/level-<G>.png`` canvases, ``level-<G>.json`` cells, ``level-<G>/cell-i-j.png``
        icons and ``level-<G>.npz`` arrays. Returns {G: canvas path}."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        pngs = {}
        for lv in self.levels:
            icon_dir = d / f"level-{lv.size}"
            icon_dir.mkdir(exist_ok=True)
            for k in range(len(lv.i)):
                Image.fromarray(lv.icons[k]).save(icon_dir / f"cell-{int(lv.i[k])}-{int(lv.j[k])}.png")
            png = d / f"level-{lv.size}.png"
            tmp = d / f".level-{lv.size}.png.tmp"
            Image.fromarray(lv.canvas()).save(tmp, format="PNG")
            tmp.replace(png)
            pngs[lv.size] = png
            write_json_atomic(d / f"level-{lv.size}.json", {"layer": self.layer, "size": lv.size,
                                                            "icon_size": lv.icon_size, "cells": self.records(lv)})
            np.savez(d / f"level-{lv.size}.npz", i=lv.i, j=lv.j, count=lv.count, top_classes=lv.top_classes,
                     top_values=lv.top_values, icons=lv.icons, fidelity=lv.fidelity,
                     member_fidelity=lv.member_fidelity,
                     **({"steps": np.asarray(lv.steps, np.int64)} if lv.steps is not None else {}),
                     **{f"{SCORE_PREFIX}{k}": np.asarray(v) for k, v in lv.scores.items()})
        write_json_atomic(d / "atlas.json", {"layer": self.layer, "levels": [lv.size for lv in self.levels],
                                             "class_names": self.class_names, "summary": self.summary})
        return pngs

    @classmethod
    def load(cls, directory: str | Path) -> "Atlas":
        d = Path(directory)
        if not (d / "atlas.json").is_file():
            raise ConfigError(f"{d} holds no atlas (atlas.json missing); run 'actatlas build' first")
        meta = json.loads((d / "atlas.json").read_text())
        levels = []
        for g in meta["levels"]:
            with np.load(d / f"level-{g}.npz") as z:
                arrays = {k: z[k] for k in z.files}
            scores = {k[len(SCORE_PREFIX):]: arrays.pop(k) for k in list(arrays) if k.startswith(SCORE_PREFIX)}
            if "fidelity" not in arrays and "objective_alignment" in arrays:
                arrays["fidelity"] = arrays.pop("objective_alignment")
            levels.append(AtlasLevel(size=g, **arrays, scores=scores))
        run_dir = d.parent.parent if (d.parent.parent / "manifest.json").is_file() else None
        return cls(meta["layer"], levels, meta["class_names"], meta.get("summary", {}), run_dir=run_dir)


@dataclass
class AtlasSet:
    """The atlases of several layers of one run, in their order (what ``build_atlas`` returns for
    several layers): iterate it, index it by position or layer name. `aligned`: their layouts were laid
    out jointly, so a place in one layer's map is the same place in the others'."""

    atlases: list[Atlas]
    aligned: bool = False
    summary: dict = field(default_factory=dict)
    run_dir: Path | None = None
    report: Any = field(default=None, repr=False, compare=False)  # pipeline.BuildReport of build_atlas

    @property
    def layers(self) -> list[str]:
        return [a.layer for a in self.atlases]

    def __len__(self) -> int:
        return len(self.atlases)

    def __iter__(self):
        return iter(self.atlases)

    def __getitem__(self, key: int | str) -> Atlas:
        if isinstance(key, str):
            for a in self.atlases:
                if a.layer == key:
                    return a
            raise ConfigError(f"no atlas of layer {key!r}; layers: {', '.join(self.layers)}")
        return self.atlases[key]

    def _repr_html_(self) -> str:
        return "".join(a.canvas_html() for a in self.atlases)


HEAT_MODES = ("weighted", "winner", "attribution")
SCORE_PREFIX = "score_"   # the honest icon scores' arrays in level-<G>.npz


def aligned_attributions(grid_level, i: np.ndarray, j: np.ndarray) -> np.ndarray | None:
    """float32 [m, classes]: the grid level's full mean attribution for each cell (i[k], j[k]) (rows of
    zeros for cells the grid lacks); None when the grid level holds no attributions."""
    att = None if grid_level is None else grid_level.mean_attribution
    if att is None or np.ndim(att) != 2:
        return None
    return _align(np.asarray(grid_level.i), np.asarray(grid_level.j), att, i, j)


def _align(gi, gj, att, i, j) -> np.ndarray:
    att = np.asarray(att, np.float32)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    if len(gi) == len(i) and np.array_equal(gi, i) and np.array_equal(gj, j):
        return att
    index = {(int(a), int(b)): q for q, (a, b) in enumerate(zip(gi, gj))}
    order = np.array([index.get((int(a), int(b)), -1) for a, b in zip(i, j)], np.int64)
    out = np.zeros((len(i), att.shape[1]), np.float32)
    ok = order >= 0
    out[ok] = att[order[ok]]
    return out


def cell_winners(att: np.ndarray, sign: int = 1) -> np.ndarray:
    """int32 [m]: each cell's top class by full mean attribution (sign=1) or most negative class
    (sign=-1); -1 for a cell whose attributions are all zero (no information)."""
    att = np.asarray(att, np.float32)
    if att.shape[1] == 0:
        return np.full(len(att), -1, np.int32)
    w = np.argmax(att if sign > 0 else -att, axis=1).astype(np.int32)
    w[~np.any(att != 0, axis=1)] = -1
    return w


def class_heat_values(att: np.ndarray, cls: int, mode: str = "weighted", sign: int = 1) -> np.ndarray:
    """The heat of class `cls` from full mean attributions att [m, classes] (see `Atlas.class_heat`)."""
    if mode not in HEAT_MODES:
        raise ConfigError(f"unknown heat mode {mode!r}; use one of {', '.join(HEAT_MODES)}")
    if sign not in (1, -1):
        raise ConfigError("sign must be 1 (positive influence) or -1 (negative influence)")
    a = np.asarray(att[:, cls], np.float32)
    if mode == "attribution":
        return a.copy()
    if mode == "winner":
        return (cell_winners(att, sign) == cls).astype(np.float32)
    s = np.maximum(sign * a, 0).astype(np.float32)
    mx = float(s.max()) if len(s) else 0.0
    return s / mx if mx > 0 else np.zeros_like(s)


def _load_attributions(atlas: "Atlas", lv: AtlasLevel) -> np.ndarray:
    """float32 [m, classes] full mean attributions of `lv`'s cells from the run's grid artifacts."""
    if atlas.run_dir is None:
        raise ConfigError("this atlas does not know its run (run_dir), so it has no per-cell attributions")
    p = Path(atlas.run_dir) / "grid" / layer_dirname(atlas.layer) / f"level-{lv.size}.npz"
    if not p.is_file():
        raise ConfigError(f"no grid level {lv.size} for layer {atlas.layer!r} in {atlas.run_dir} ({p} missing)")
    with np.load(p) as z:  # reads only the arrays named below
        if "mean_attribution" not in z.files:
            raise ConfigError(f"{p} holds no attributions (the run was collected without them)")
        return _align(z["i"], z["j"], z["mean_attribution"], lv.i, lv.j)


def atlas_dir(run_dir: str | Path, layer: str) -> Path:
    return Path(run_dir) / "atlas" / layer_dirname(layer)


def open_atlas(run_dir: str | Path, layer: str | None = None) -> Atlas:
    """Load the assembled atlas of `layer` (default: the only / first layer built) from a run."""
    root = Path(run_dir) / "atlas"
    if layer is None:
        built = sorted(p for p in root.glob("*") if (p / "atlas.json").is_file()) if root.is_dir() else []
        if not built:
            raise ConfigError(f"{run_dir} holds no assembled atlas; run 'actatlas build' first")
        return Atlas.load(built[0])
    return Atlas.load(atlas_dir(run_dir, layer))
