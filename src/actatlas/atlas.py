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
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError
from .store import layer_dirname, write_json_atomic


@dataclass
class AtlasLevel:
    """One zoom level: `size` G, per-cell grid position, count, classes, icons and fidelity scores.

    Arrays share the first dimension m (kept cells): i, j, count [m]; top_classes, top_values [m, k];
    icons uint8 [m, P, P, 3]; fidelity [m] (icon), member_fidelity [m] (best real member).
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

    def _repr_html_(self) -> str:
        """Jupyter display: the interactive viewer (single-file, inlined) when the run is known,
        else the coarsest canvas as an inline PNG."""
        if self.run_dir is not None and (Path(self.run_dir) / "manifest.json").is_file():
            from .export import notebook_html

            return notebook_html(self.run_dir, self.layer)
        if not self.levels:
            return f"<p>activation atlas of {html.escape(self.layer)}: no levels</p>"
        buf = io.BytesIO()
        Image.fromarray(self.levels[0].canvas()).save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{b64}" style="max-width:100%" '
                f'alt="activation atlas"><figcaption>{html.escape(self.layer)}, level '
                f'{self.levels[0].size}</figcaption></figure>')

    def level(self, size: int) -> AtlasLevel:
        for lv in self.levels:
            if lv.size == size:
                return lv
        raise UserError(f"no level {size}; levels: {[lv.size for lv in self.levels]}")

    def records(self, level: AtlasLevel) -> list[dict]:
        """JSON-able per-cell records (the viewer's data): grid position, count, top classes, fidelity."""
        out = []
        for k in range(len(level.i)):
            top = [[int(c), self.class_names[int(c)] if 0 <= int(c) < len(self.class_names) else str(int(c)),
                    round(float(v), 5)] for c, v in zip(level.top_classes[k], level.top_values[k])]
            out.append({"i": int(level.i[k]), "j": int(level.j[k]), "n": int(level.count[k]), "top": top,
                        "fidelity": round(float(level.fidelity[k]), 4),
                        "member_fidelity": round(float(level.member_fidelity[k]), 4),
                        "icon": f"level-{level.size}/cell-{int(level.i[k])}-{int(level.j[k])}.png"})
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
                     member_fidelity=lv.member_fidelity)
        write_json_atomic(d / "atlas.json", {"layer": self.layer, "levels": [lv.size for lv in self.levels],
                                             "class_names": self.class_names, "summary": self.summary})
        return pngs

    @classmethod
    def load(cls, directory: str | Path) -> "Atlas":
        d = Path(directory)
        if not (d / "atlas.json").is_file():
            raise UserError(f"{d} holds no atlas (atlas.json missing); run 'actatlas build' first")
        meta = json.loads((d / "atlas.json").read_text())
        levels = []
        for g in meta["levels"]:
            z = np.load(d / f"level-{g}.npz")
            levels.append(AtlasLevel(size=g, **{k: z[k] for k in z.files}))
        run_dir = d.parent.parent if (d.parent.parent / "manifest.json").is_file() else None
        return cls(meta["layer"], levels, meta["class_names"], meta.get("summary", {}), run_dir=run_dir)


def atlas_dir(run_dir: str | Path, layer: str) -> Path:
    return Path(run_dir) / "atlas" / layer_dirname(layer)


def open_atlas(run_dir: str | Path, layer: str | None = None) -> Atlas:
    """Load the assembled atlas of `layer` (default: the only / first layer built) from a run."""
    root = Path(run_dir) / "atlas"
    if layer is None:
        built = sorted(p for p in root.glob("*") if (p / "atlas.json").is_file()) if root.is_dir() else []
        if not built:
            raise UserError(f"{run_dir} holds no assembled atlas; run 'actatlas build' first")
        return Atlas.load(built[0])
    return Atlas.load(atlas_dir(run_dir, layer))
