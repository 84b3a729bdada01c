"""The article end to end (issue 14): every experiment of Carter et al. (Distill 2019) that this tool can
compute, on the article's own model (Lucid's InceptionV1, e.g. lucent's ``inception5h.pth``), side by side
with the article's numbers (method.md §1.13, §3, §4.3 and the acceptance list of §7).

``reproduce_article(weights, labels, images, out, scale="tiny" | "full")`` runs one stage per experiment
(``actatlas.stages.run_stage`` in ``OUT/manifest.json``, key ``experiment:<name>``): skipped when done
with the same inputs and settings, rerun when it failed or was interrupted. The experiments build on
the public functions: ``pipeline.build_atlas`` (mixed4c, mixed4a, mixed5b atlases of one collection
with full attributions), ``analysis.views.class_atlas_and_render`` (four classes),
``analysis.views.compare_and_render`` (three comparisons and their candidate cells) and
``analysis.attack`` (candidate cells of the target side rendered as patches, attacking photos of the
source class, static and dynamic success against the noise control, pooled over the comparisons),
``analysis.clusters`` (the fireboat analysis: the clusters of fireboat's activations on the mixed5b and
mixed4d layouts; the collection holds mixed4d for it) and ``analysis.sample_size`` (the mixed4c atlas's
cell means against those of a random subset binned on the same layout at the same grid sizes).

An experiment that cannot run (the images hold no photo of a class it needs, too few photos of a source
class, an upstream experiment not done) is recorded as "skipped" with the reason; one that raises is
"failed" with the reason; the others still run. The single-image patch numbers (§4.2) are listed as
"skipped": they need the article's own photos and patches.

``OUT/`` holds::

    manifest.json             the experiment stages (and the report stage)
    run/                      the collected run and its atlases (``build_atlas``)
    experiments/<slug>.json   one experiment's result: name, status, ours, note, figures
    experiments/<slug>/       its class-atlas / comparison folder, its attack reports and patches
    report.json               [{"name", "status", "ours", "article", "note"}, ...]
    report.md                 tables with ours and the article's numbers side by side, figures as PNGs
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..collect_batch import CollectConfig
from ..data import images as make_images
from ..errors import ConfigError, RunLockedError, UserError
from ..grid import load_grid
from ..layout import LayoutConfig, load_layout
from ..models import load_model
from ..models.spec import resolve_class
from ..pipeline import build_atlas, run_assemble, run_grid, run_layout, run_render
from ..render import RenderConfig
from ..run import open_run
from ..runtime import Runtime
from ..stages import config_hash, run_stage, stage_entry
from ..store import ensure_dir, write_atomic, write_json_atomic
from .attack import LabelledImages, render_patches, run_patch_attack
from .classes import top_rows
from .clusters import DOMINANT_SHARE, K_MAX, MIN_SILHOUETTE, class_clusters, cluster_figure
from .sample_size import THRESHOLD, sample_size_check
from .views import class_atlas_and_render, compare_and_render, load_comparison

log = logging.getLogger(__name__)

FORMAT = 1
LAYERS = ("mixed4c", "mixed4a", "mixed5b")     # atlases; the first is built with the collection
COLLECTED = LAYERS + ("mixed4d",)              # mixed4d: laid out for the fireboat analysis only
FIREBOAT_LAYERS = ("mixed5b", "mixed4d")
MIN_CLUSTER_ROWS = 30     # fewer fireboat-attributed activations at a layer: the fireboat analysis is skipped

# name -> wnid of every class the experiments use (method.md Appendix A; the class atlases' four classes
# from ImageNet's synset list). Classes resolve by wnid when the labels have wnids, else by name.
WNIDS = {
    "red fox": "n02119022", "ibex": "n02417914", "artichoke": "n07718747", "great white shark": "n01484850",
    "snorkel": "n04251144", "scuba diver": "n10565667", "grey whale": "n02066245", "frying pan": "n03400231",
    "wok": "n04596742", "steam locomotive": "n04310018", "baseball": "n02799071", "carbonara": "n07831146",
    "fireboat": "n03344393", "streetcar": "n04335435",
}
NAME_VARIANTS = {"grey whale": ("gray whale",), "great white shark": ("white shark",)}

CLASS_ATLASES = ("red fox", "ibex", "artichoke", "great white shark")
# (left = source, right = target, the article's third class on the right side, its cell (row, col))
COMPARISONS = (("snorkel", "scuba diver", "steam locomotive", (7, 8)),
               ("grey whale", "great white shark", "baseball", (2, 7)),
               ("frying pan", "wok", "carbonara", (1, 7)))

# ------------------------------------------------------------------------------------ the article's numbers
# (method.md §1.13 build parameters, §3.2-3.3 findings, §4.3 at-scale patch evaluation, §7 B)

_ATLAS_ARTICLE = {"samples": 1_000_000, "levels": [20, 40, 80, 160], "max_icons": [400, 1600, 6400, 25600],
                  "layout": "UMAP n_neighbors 50, min_dist 0.05, cosine", "whiten": True, "icon_px": 80,
                  "steps": 1024, "tries": 4, "cells": "not published (record ours as the baseline, §7 B4)"}
ARTICLE: dict[str, dict] = {
    "atlas mixed4c": dict(_ATLAS_ARTICLE),
    "atlas mixed4a": dict(_ATLAS_ARTICLE),
    "atlas mixed5b": {**_ATLAS_ARTICLE, "levels": [20, 40, 80, 160, 320],
                      "max_icons": [400, 1600, 6400, 25600, 102400]},
    "attribution by depth": {"finding": "mean |top-class attribution| per cell increases with depth, "
                                        "mixed3a -> mixed5b (early-layer attributions are 'very small')"},
    **{f"class atlas {c}": {"layer": "mixed5b", "grid": 8, "filter": "top 2,000 by attribution to the class",
                            "layout": "UMAP n_neighbors 20, min_dist 0.02, cosine", "icon_px": 80, "steps": 1056,
                            "tries": 3} for c in CLASS_ATLASES},
    "compare snorkel vs scuba diver": {
        "layer": "mixed5b", "grid": 10, "points": 4673, "third_class": "steam locomotive",
        "cell": "row 7, col 8 (scuba diver side)",
        "finding": "a scuba-side cell whose top attributed class is steam locomotive (round, shiny, metallic)"},
    "compare grey whale vs great white shark": {
        "layer": "mixed5b", "grid": 10, "third_class": "baseball", "cell": "row 2, col 7 (shark side)",
        "finding": "a shark-side cell whose top attributed class is baseball (red stitching / teeth)"},
    "compare frying pan vs wok": {
        "layer": "mixed5b", "grid": 10, "third_class": "carbonara", "cell": "row 1, col 7 (wok side)",
        "finding": "a wok-side noodle cell whose top attributed class is carbonara, nearer the centre"},
    "patch attack snorkel -> scuba diver": {
        "patches": 10, "images": 1000, "correct_before": 827, "static_success": 0.654, "dynamic_success": 0.850,
        "p_target_before": 0.037, "p_target_after_static": 0.467, "p_target_after_dynamic": 0.605,
        "noise_static_success": 0.042, "noise_dynamic_success": 0.139},
    "patch attack grey whale -> great white shark": {
        "patches": 10, "images": 1000, "correct_before": 874, "static_success": 0.188, "dynamic_success": 0.405,
        "p_target_before": 0.018, "p_target_after_static": 0.181, "p_target_after_dynamic": 0.316,
        "noise_static_success": 0.043, "noise_dynamic_success": 0.113},
    "patch attack frying pan -> wok": {
        "patches": 10, "images": 1000, "correct_before": 624, "static_success": 0.256, "dynamic_success": 0.449,
        "p_target_before": 0.103, "p_target_after_static": 0.230, "p_target_after_dynamic": 0.344,
        "noise_static_success": 0.046, "noise_dynamic_success": 0.183},
    "patch attacks pooled": {"patches": 30, "static_success": 0.372, "static_flipped": 8643,
                             "dynamic_success": 0.575, "dynamic_flipped": 13369, "correct": 23250,
                             "finding": "about 2 in 5 (static), 1 in 2 (best corner and size)"},
    "single-image patch numbers": {"snorkel": 0.5560, "scuba diver (train-10, r=0.4, top-left)": 0.7128,
                                   "grey whale": 0.9095, "great white shark (baseball-01, r=0.4, top-left)": 0.6670,
                                   "frying pan": 0.7652, "wok (noodles-03, r=0.4, top-left)": 0.6613},
    "fireboat analysis": {"finding": "mixed5b: one dominant fireboat cluster; mixed4d: >= 3 clusters "
                                     "(windows, water/spray, cranes); the windows cluster's top class is streetcar",
                          "mixed5b_clusters": "1 (one main cluster: red boats, spray)",
                          "mixed5b_one_dominant": True,
                          "mixed4d_clusters": ">= 3 (windows, geysers/splashing water, cranes)",
                          "mixed4d_at_least_3": True,
                          "mixed4d_a_cluster_top_class_is_streetcar": True},
    "sample size 100k vs all": {"finding": "100,000 activations 'often sufficient': each 1M cell mean has a "
                                           "100k cell mean at cosine >= 0.9 (G = 20, proposed)",
                                "layer": "mixed4c", "grid": 20, "samples": 1_000_000, "subset": 100_000,
                                f"share_best_cosine_ge_{THRESHOLD:g}": 1.0},
}

NOT_IMPLEMENTED = {
    "single-image patch numbers": "skipped: needs the article's own photos and hand-made patches "
                                  "(lucid-static assets), which this command does not download",
}


# ------------------------------------------------------------------------------------ scales

@dataclass(frozen=True)
class ArticleScale:
    """How big each experiment is. images: images sampled for the atlases (None: all; the photos of
    the article's classes come first); levels / levels_5b: atlas grid sizes (mixed5b has one more in the
    article); render: `RenderConfig` overrides of atlas icons, class atlases, comparisons and patches;
    class_grid / class_top: class atlas grid and rows kept ("top" filter); compare_grid / compare_top:
    comparison grid and rows per class; view_min_count: smallest kept cell of both; patches: candidate
    cells rendered as patches per comparison; patch_px: their side; sizes: patch sides tried (fractions
    of the image); attack_images: source photos used at most; min_photos: fewer photos of a source class
    than this and its attack is skipped; subset_rows / subset_fraction: the sample-size check's subset
    (rows, else this fraction of the collected samples)."""

    name: str
    images: int | None
    per_image: int
    levels: tuple[int, ...]
    levels_5b: tuple[int, ...]
    min_count: int
    render: dict
    class_grid: int
    class_top: int
    compare_grid: int
    compare_top: int
    view_min_count: int
    patches: int
    patch_px: int
    sizes: tuple[float, ...]
    attack_images: int | None
    min_photos: int
    class_photos: int | None      # photos per article class put first into the sample (None: all)
    subset_rows: int | None = None
    subset_fraction: float | None = None

    def render_config(self, device: str | None) -> RenderConfig:
        base = RenderConfig.article() if self.name == "full" else RenderConfig.cpu_default()
        return dataclasses.replace(base, **self.render, device=device)


SCALES = {
    "tiny": ArticleScale(name="tiny", images=300, per_image=1, levels=(4, 8), levels_5b=(4, 8), min_count=2,
                         render=dict(steps=16, attempts=1, icon_size=32, batch_size=16), class_grid=4,
                         class_top=200, compare_grid=4, compare_top=200, view_min_count=2, patches=2,
                         patch_px=64, sizes=(0.3, 0.5), attack_images=50, min_photos=5, class_photos=10,
                         subset_fraction=0.5),    # 10% of a few hundred samples keeps no cell: half of them
    "full": ArticleScale(name="full", images=1_000_000, per_image=1, levels=(20, 40, 80, 160),
                         levels_5b=(20, 40, 80, 160, 320), min_count=6, render={}, class_grid=8, class_top=2000,
                         compare_grid=10, compare_top=2000, view_min_count=4, patches=10, patch_px=224,
                         sizes=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), attack_images=1000, min_photos=50,
                         class_photos=None, subset_rows=100_000),
}


# ------------------------------------------------------------------------------------ results

@dataclass
class ArticleReport:
    """What `reproduce_article` did: entries (report.json's list), the stages that ran this call
    (empty on a rerun with nothing to do), and the report paths."""

    out: Path
    entries: list[dict]
    ran: list[str]
    paths: dict[str, Path]
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"done": 0, "skipped": 0, "failed": 0}
        for e in self.entries:
            out[e["status"]] = out.get(e["status"], 0) + 1
        return out


class _Skip(Exception):
    """An experiment that cannot run here: recorded as "skipped" with the reason."""


@dataclass
class _Ctx:
    out: Path
    run_dir: Path
    scale: ArticleScale
    spec: object
    runtime: Runtime
    inputs: str                       # hash of weights, labels and the sampled images
    paths: list[str]                  # the sampled images (atlases)
    list_file: Path                   # the same as a list file (what the run records)
    sample_labels: np.ndarray         # their classes
    folder_paths: list[str]           # every image of the folder (attacks)
    folder_labels: np.ndarray
    progress: bool
    seed: int
    status: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)

    @property
    def exp_dir(self) -> Path:
        return self.out / "experiments"

    def render(self) -> RenderConfig:
        return self.scale.render_config(self.runtime.device)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _file_hash(path) -> str:
    p = Path(str(path))
    if not p.is_file():
        return str(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _class(spec, name: str) -> int:
    """The model's index of an article class (by wnid, then by name and its variants); _Skip if absent."""
    wnids = getattr(spec, "wnids", None)
    keys = ([WNIDS[name]] if wnids is not None and WNIDS.get(name) in wnids else []) + [name]
    keys += list(NAME_VARIANTS.get(name, ()))
    for key in keys:
        try:
            return resolve_class(key, spec.class_names, wnids)
        except UserError:
            continue
    raise _Skip(f"class {name!r} ({WNIDS.get(name, '?')}) is not among the model's labels")


def _need_photo(ctx: _Ctx, c: int, name: str) -> int:
    n = int(np.sum(ctx.sample_labels == c))
    if n == 0:
        raise _Skip(f"the images hold no photo of {name} ({WNIDS.get(name, '?')}): add its class folder "
                    "or wnid-named files")
    return n


MIN_VIEW_ROWS = 4     # class atlases and comparisons refuse fewer rows (their layouts need 4)


def _need_rows(ctx: _Ctx, classes: dict[str, int]) -> int:
    """Rows of the collection at mixed5b with a positive attribution to the classes (what the "top"
    filter keeps); _Skip when all together fewer than MIN_VIEW_ROWS."""
    attr = open_run(ctx.run_dir).attributions("mixed5b")
    counts = {name: int(np.sum(np.asarray(attr[:, c], np.float32) > 0)) if attr is not None else 0
              for name, c in classes.items()}
    need = max(MIN_VIEW_ROWS, ctx.scale.view_min_count)
    if sum(counts.values()) < need:
        told = ", ".join(f"{n} to {name}" for name, n in counts.items())
        raise _Skip(f"too few of the sampled activations at mixed5b are positively attributed ({told}); "
                    f"{need} needed (sample more images)")
    return sum(counts.values())


def _rel(ctx: _Ctx, p) -> str:
    return os.path.relpath(str(p), str(ctx.out))


def _pct(v) -> float | None:
    return None if v is None else round(float(v), 4)


# ------------------------------------------------------------------------------------ experiments

def _atlas(ctx: _Ctx, layer: str) -> dict:
    """The first layer: ``build_atlas`` (the collection of all three layers with full attributions, then
    its atlas); the others: the same pipeline stages over that collection (``build_atlas`` would
    collect their layer alone)."""
    sc = ctx.scale
    levels = sc.levels_5b if layer == "mixed5b" else sc.levels
    lcfg, rcfg = LayoutConfig(seed=ctx.seed), ctx.render()
    if layer == LAYERS[0]:
        ccfg = CollectConfig(layers=COLLECTED, per_image=sc.per_image, attributions="full", seed=ctx.seed,
                             device=ctx.runtime.device)
        atlas = build_atlas(str(ctx.list_file), out=ctx.run_dir, model=ctx.spec, layer=None, levels=levels,
                            min_count=sc.min_count, collect=ccfg, layout=lcfg, render=rcfg, runtime=ctx.runtime)
        pngs = atlas.report.pngs
    else:
        pr = ctx.progress
        run_layout(ctx.run_dir, layer, lcfg, progress=pr)
        run_grid(ctx.run_dir, layer, levels, min_count=sc.min_count, progress=pr)
        ren = run_render(ctx.run_dir, layer, rcfg, spec=ctx.spec, progress=pr, runtime=ctx.runtime)
        asm = run_assemble(ctx.run_dir, layer, ren, spec=ctx.spec, progress=pr, device=ctx.runtime.model_device)
        atlas, pngs = asm.atlas, asm.pngs
    lvs = [lv for lv in atlas.levels if len(lv.i)]
    cat = (lambda xs: np.concatenate([np.asarray(x, np.float64) for x in xs]) if xs else np.zeros(0))  # noqa: E731
    fid = cat([lv.fidelity for lv in lvs])
    member = cat([lv.member_fidelity for lv in lvs])
    tops = cat([np.abs(np.asarray(lv.top_values, np.float64)[:, 0]) for lv in lvs])
    ours = {"samples": int(len(open_run(ctx.run_dir).rows(layer).image)),
            "levels": [int(lv.size) for lv in atlas.levels],
            "cells": [int(len(lv.i)) for lv in atlas.levels],
            "samples_in_cells": [int(np.sum(lv.count)) for lv in atlas.levels],
            "mean_icon_fidelity": _pct(fid.mean()) if len(fid) else None,
            "mean_best_member_fidelity": _pct(member.mean()) if len(member) else None,
            "mean_abs_top_attribution": _pct(tops.mean()) if len(tops) else None,
            "layout": "UMAP n_neighbors 50, min_dist 0.05, cosine", "whiten": rcfg.whiten,
            "icon_px": rcfg.icon_size, "steps": rcfg.steps, "tries": rcfg.attempts}
    figures = [_rel(ctx, p) for _, p in sorted(pngs.items(), key=lambda kv: int(kv[0]))]
    return {"ours": ours, "figures": figures[-2:], "note": f"{len(ctx.paths)} images, layer {layer}"}


def _depth(ctx: _Ctx) -> dict:
    vals = {layer: ctx.results[f"atlas {layer}"]["ours"]["mean_abs_top_attribution"] for layer in
            ("mixed4a", "mixed4c", "mixed5b")}
    seq = [vals[k] for k in ("mixed4a", "mixed4c", "mixed5b")]
    inc = all(a is not None and b is not None and a < b for a, b in zip(seq, seq[1:]))
    return {"ours": {"mean_abs_top_attribution": vals, "increases_with_depth": inc},
            "note": "mean over the atlases' cells of |mean attribution to the cell's top class|"}


def _fireboat(ctx: _Ctx) -> dict:
    """method.md §3.1 / §7 B7: fireboat's activations (the "top" filter: largest positive attribution to
    fireboat, at most the scale's class_top rows) on the full layouts of mixed5b and mixed4d, their
    clusters counted by ``clusters.count_clusters`` (k-means, k by silhouette, k = 1 below 0.5).
    k-means splits long or curved groups, so on such shapes the count is an upper estimate (see the figure)."""
    sc = ctx.scale
    c = _class(ctx.spec, "fireboat")
    try:
        streetcar = ctx.spec.class_names[_class(ctx.spec, "streetcar")]
    except _Skip:
        streetcar = None
    run = open_run(ctx.run_dir)
    rows = {}
    for layer in FIREBOAT_LAYERS:
        attr = run.attributions(layer)
        if attr is None:
            raise _Skip(f"the collection holds no attributions at {layer}")
        rows[layer] = top_rows(attr, c, sc.class_top)
    if any(len(r) < MIN_CLUSTER_ROWS for r in rows.values()):
        told = ", ".join(f"{len(r)} at {layer}" for layer, r in rows.items())
        raise _Skip(f"too few activations attributed to fireboat to count clusters ({told}; positive attribution, "
                    f"top {sc.class_top}); {MIN_CLUSTER_ROWS} per layer needed (sample more images)")
    lcfg = LayoutConfig(seed=ctx.seed)
    res, panels = {}, []
    for layer in FIREBOAT_LAYERS:
        coords = run_layout(ctx.run_dir, layer, lcfg, progress=ctx.progress).layout.coords
        res[layer] = class_clusters(layer, coords, run.attributions(layer), rows[layer], seed=ctx.seed)
        panels.append((f"{layer}: fireboat's activations by cluster", coords, res[layer]))
    fig = cluster_figure(ctx.exp_dir / slug("fireboat analysis") / "clusters.png", panels)
    s5, s4 = (res[x].summary(ctx.spec.class_names) for x in FIREBOAT_LAYERS)
    ours = {"mixed5b_clusters": s5["clusters"], "mixed5b_largest_share": s5["largest_share"],
            "mixed5b_one_dominant": bool(s5["clusters"] == 1 or s5["largest_share"] >= DOMINANT_SHARE),
            "mixed4d_clusters": s4["clusters"], "mixed4d_largest_share": s4["largest_share"],
            "mixed4d_at_least_3": bool(s4["clusters"] >= 3),
            "mixed4d_a_cluster_top_class_is_streetcar": (
                None if streetcar is None else any(t and t[0] == streetcar for t in s4["cluster_top_classes"])),
            "mixed5b": s5, "mixed4d": s4}
    return {"ours": ours, "figures": [_rel(ctx, fig)],
            "note": f"rows: the largest positive attributions to fireboat (at most {sc.class_top}) on each layer's "
                    f"full layout; k-means on their positions, k = 2..{K_MAX} by mean silhouette, 1 cluster when it "
                    f"is below {MIN_SILHOUETTE:g}; one dominant: 1 cluster or the largest holds >= "
                    f"{DOMINANT_SHARE:g} of the rows"}


def _sample_size(ctx: _Ctx) -> dict:
    """method.md §6 / §7 B8: the mixed4c atlas's cell means (all samples) against those of a random
    subset binned on the same layout at the same levels and threshold (``sample_size.sample_size_check``)."""
    sc = ctx.scale
    layer = LAYERS[0]
    run = open_run(ctx.run_dir)
    coords = load_layout(ctx.run_dir / "layout", layer).coords
    n = len(coords)
    size = sc.subset_rows if sc.subset_rows is not None else int(round((sc.subset_fraction or 0.0) * n))
    if not 1 <= size < n:
        raise _Skip(f"the collection holds {n} samples at {layer}: a subset of {size} cannot be compared with them "
                    "(sample more images)")
    levels = sample_size_check(coords, run.activations(layer), load_grid(ctx.run_dir / "grid", layer), size,
                               seed=ctx.seed)
    ours = {"layer": layer, **levels[0], "by_level": levels}
    how = (f"{sc.subset_rows} rows" if sc.subset_rows is not None else f"{sc.subset_fraction:g} of the samples")
    return {"ours": ours,
            "note": f"subset: {how} drawn at random (seeded), binned on the atlas's own layout at its levels and "
                    f"cell threshold; per atlas cell mean the best cosine to any subset cell mean (headline: the "
                    f"first level, G = {levels[0]['grid']}); same-cell cosine where the subset keeps the cell"}


def _class_atlas(ctx: _Ctx, name: str) -> dict:
    sc = ctx.scale
    c = _class(ctx.spec, name)
    photos = _need_photo(ctx, c, name)
    _need_rows(ctx, {name: c})
    lcfg = LayoutConfig(method="umap", n_neighbors=20, min_dist=0.02, metric="cosine", seed=ctx.seed)
    v = class_atlas_and_render(ctx.run_dir, "mixed5b", c, mode="top", top=sc.class_top, grid=sc.class_grid,
                               min_count=sc.view_min_count, layout_cfg=lcfg, render_cfg=ctx.render(),
                               out=ctx.exp_dir / slug(f"class atlas {name}"), viewer=False, spec=ctx.spec,
                               progress=ctx.progress)
    s = v.summary
    labels = [ctx.spec.class_names[int(t)] for t in v.atlas.level.label if t >= 0]
    common = sorted(set(labels), key=labels.count, reverse=True)[:5]
    ours = {"layer": "mixed5b", "grid": s["grid"], "filter": f"top {sc.class_top}", "rows": s["rows"],
            "cells": s["cells"], "cells_top_class_is_target": s["cells_top_class_is_target"],
            "most_common_cell_labels": common, "mean_icon_fidelity": s["mean_icon_fidelity"],
            "photos_of_class_in_sample": photos}
    return {"ours": ours, "figures": [_rel(ctx, v.paths["labelled_png"])],
            "note": f"class index {c} in the model's labels"}


def _compare(ctx: _Ctx, left: str, right: str, third: str) -> dict:
    sc = ctx.scale
    a, b = _class(ctx.spec, left), _class(ctx.spec, right)
    for c, name in ((a, left), (b, right)):
        _need_photo(ctx, c, name)
    _need_rows(ctx, {left: a, right: b})
    v = compare_and_render(ctx.run_dir, "mixed5b", a, b, top=sc.compare_top, grid=sc.compare_grid,
                           y_method="tsne", min_count=sc.view_min_count, seed=ctx.seed, render_cfg=ctx.render(),
                           out=ctx.exp_dir / slug(f"compare {left} vs {right}"), viewer=False, spec=ctx.spec,
                           progress=ctx.progress)
    s = v.summary
    G = s["grid"]

    def cand(c):   # row counted from the top, as the article's figure annotations
        return {"top_class": c["top_name"], "side": c["side"], "row": G - 1 - int(c["j"]), "col": int(c["i"]),
                "n": c["n"], "mean_attribution": round(float(c["value"]), 5)}

    cands = [cand(c) for c in s["candidates"]]
    right_side = [c for c in cands if c["side"] == "right"]
    ours = {"layer": "mixed5b", "grid": G, "points": s["rows"], "cells": s["cells"],
            "candidates_target_side": right_side[:8],
            "candidates_source_side": [c for c in cands if c["side"] == "left"][:8],
            "third_class_found_on_target_side": any(str(c["top_class"]) == third for c in right_side)}
    return {"ours": ours, "figures": [_rel(ctx, v.paths["png"])],
            "note": f"top {sc.compare_top} rows per class plus winners; y: 1-D t-SNE"}


def _attack(ctx: _Ctx, left: str, right: str) -> dict:
    sc = ctx.scale
    a, b = _class(ctx.spec, left), _class(ctx.spec, right)
    src = np.flatnonzero(ctx.folder_labels == a)
    if len(src) < sc.min_photos:
        raise _Skip(f"too few photos of the source class {left}: {len(src)} in the images folder, "
                    f"{sc.min_photos} needed at scale {sc.name}")
    cmp_dir = ctx.exp_dir / slug(f"compare {left} vs {right}")
    view = load_comparison(cmp_dir)
    chosen = [c for c in view.candidates if c.side == "right"][:sc.patches]
    if not chosen:
        raise _Skip(f"the comparison has no candidate patch cell on the {right} side")
    dirs = np.stack([view.comparison.level.mean_activation[c.cell] for c in chosen])
    steps = ctx.render().steps
    patches, _ = render_patches(ctx.spec, ctx.run_dir, "mixed5b", dirs, sc.patch_px, steps, progress=ctx.progress)
    named = [(f"cell-r{view.level.size - 1 - c.j}-c{c.i}-{slug(str(c.top_name))}", p) for c, p in zip(chosen, patches)]
    imgs = LabelledImages([ctx.folder_paths[k] for k in src], np.full(len(src), a, np.int64),
                          f"{len(src)} photos of {left}")
    res = run_patch_attack(ctx.spec, imgs, b, named, source_class=a, sizes=sc.sizes, corners=4,
                           min_source=min(5, sc.min_photos), max_images=sc.attack_images, seed=ctx.seed,
                           out=ctx.exp_dir / slug(f"patch attack {left} to {right}"), progress=ctx.progress)
    pats = res["patches"]
    correct = int(res["noise"]["correct_before"] or 0)
    if correct == 0:
        raise _Skip(f"none of the {len(imgs.paths)} photos of {left} is classified as {left} before patching "
                    "(success is measured on those only)")
    tot = correct * len(pats)
    sflip = sum(int(p["static_flipped"]) for p in pats)
    dflip = sum(int(p["dynamic_flipped"]) for p in pats)
    mean = (lambda key: _pct(np.mean([p[key] for p in pats])) if all(p[key] is not None for p in pats)  # noqa: E731
            else None)
    noise = res["noise"]
    ours = {"patches": len(pats), "images": len(src) if sc.attack_images is None else min(len(src), sc.attack_images),
            "correct_before": correct, "static_success": _pct(sflip / tot) if tot else None,
            "static_flipped": sflip, "dynamic_success": _pct(dflip / tot) if tot else None, "dynamic_flipped": dflip,
            "p_target_before": _pct(noise.get("p_target_before")), "p_target_after_static": mean("p_target_after"),
            "p_target_after_dynamic": mean("p_target_after_dynamic"),
            "noise_static_success": _pct(noise.get("static_success")),
            "noise_dynamic_success": _pct(noise.get("dynamic_success")),
            "noise_static_flipped": noise["static_flipped"],
            "noise_dynamic_flipped": noise["dynamic_flipped"],
            "per_patch": [{"patch": p["name"], "static": _pct(p["static_success"]),
                           "dynamic": _pct(p["dynamic_success"])} for p in pats]}
    if tot:
        ours["patch_beats_noise"] = bool((ours["static_success"] or 0) > (ours["noise_static_success"] or 0) and
                                         (ours["dynamic_success"] or 0) > (ours["noise_dynamic_success"] or 0))
        ours["dynamic_beats_static"] = bool((ours["dynamic_success"] or 0) > (ours["static_success"] or 0))
    figures = [_rel(ctx, p["patch_png"]) for p in pats if p.get("patch_png")][:4]
    note = res.get("source_note") or ""
    return {"ours": ours, "figures": figures,
            "note": f"patches: the {right}-side candidate cells rendered at {sc.patch_px} px; {note}"}


def _pooled(ctx: _Ctx, names: list[str]) -> dict:
    rs = [ctx.results[n]["ours"] for n in names]
    correct = sum(r["correct_before"] * r["patches"] for r in rs)
    sflip, dflip = sum(r["static_flipped"] for r in rs), sum(r["dynamic_flipped"] for r in rs)
    ncorrect = sum(r["correct_before"] for r in rs)
    ns, nd = sum(r["noise_static_flipped"] for r in rs), sum(r["noise_dynamic_flipped"] for r in rs)
    ours = {"comparisons": len(rs), "patches": sum(r["patches"] for r in rs), "correct": correct,
            "static_flipped": sflip, "static_success": _pct(sflip / correct) if correct else None,
            "dynamic_flipped": dflip, "dynamic_success": _pct(dflip / correct) if correct else None,
            "noise_static_success": _pct(ns / ncorrect) if ncorrect else None,
            "noise_dynamic_success": _pct(nd / ncorrect) if ncorrect else None}
    return {"ours": ours, "note": "success = sum flipped / sum correct before over every patch (as the article "
                                  "pools); noise: one control per comparison; over: " + ", ".join(names)}


@dataclass
class _Experiment:
    name: str
    run: Callable[[_Ctx], dict]
    needs: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)


def experiments() -> list[_Experiment]:
    """Every experiment, in the order they run (upstream first)."""
    exps = [_Experiment(f"atlas {layer}", (lambda ctx, layer=layer: _atlas(ctx, layer)),
                        needs=() if layer == LAYERS[0] else (f"atlas {LAYERS[0]}",), params={"layer": layer})
            for layer in LAYERS]
    exps.append(_Experiment("attribution by depth", _depth, needs=tuple(f"atlas {x}" for x in LAYERS)))
    exps.append(_Experiment("fireboat analysis", _fireboat, needs=("atlas mixed5b",),
                            params={"layers": list(FIREBOAT_LAYERS), "min_rows": MIN_CLUSTER_ROWS}))
    exps.append(_Experiment("sample size 100k vs all", _sample_size, needs=(f"atlas {LAYERS[0]}",)))
    for name in CLASS_ATLASES:
        exps.append(_Experiment(f"class atlas {name}", (lambda ctx, name=name: _class_atlas(ctx, name)),
                                needs=("atlas mixed5b",), params={"class": name}))
    attacks = []
    for left, right, third, _ in COMPARISONS:
        cname = f"compare {left} vs {right}"
        exps.append(_Experiment(cname, (lambda ctx, left=left, right=right, third=third:
                                        _compare(ctx, left, right, third)),
                                needs=("atlas mixed5b",), params={"left": left, "right": right}))
        aname = f"patch attack {left} -> {right}"
        attacks.append(aname)
        exps.append(_Experiment(aname, (lambda ctx, left=left, right=right: _attack(ctx, left, right)),
                                needs=(cname,), params={"left": left, "right": right}))
    exps.append(_Experiment("patch attacks pooled", None, needs=tuple(attacks)))   # run: see _run_pooled
    return exps


# ------------------------------------------------------------------------------------ driver

def _select_images(folder_labels: np.ndarray, paths: list[str], needed: list[int], scale: ArticleScale,
                   limit: int | None, seed: int) -> list[int]:
    """Indices of the images sampled for the atlases: photos of the article's classes first (at most
    `scale.class_photos` each), then a seeded random fill up to `limit` (or the scale's count)."""
    n_max = limit if limit is not None else scale.images
    first: list[int] = []
    for c in needed:
        idx = np.flatnonzero(folder_labels == c)
        first += idx[:scale.class_photos].tolist() if scale.class_photos is not None else idx.tolist()
    first = sorted(set(first))
    if n_max is not None and len(first) > n_max:
        first = first[:n_max]
    rest = np.setdiff1d(np.arange(len(paths)), np.asarray(first, np.int64))
    k = len(rest) if n_max is None else max(0, n_max - len(first))
    if k < len(rest):
        rest = np.sort(np.random.default_rng(seed).choice(rest, size=k, replace=False))
    return sorted(first + rest.tolist())


def reproduce_article(weights, labels, images, out, *, scale: str = "tiny", allow_random_weights: bool = False,
                      limit: int | None = None, runtime: Runtime | None = None, seed: int = 0,
                      progress: bool = False) -> ArticleReport:
    """Run every experiment of the article this tool can compute (see the module doc) into `out`.

    weights: InceptionV1 weights (a file in lucent's or Lucid's format, or a named source such as
    "inception5h"; None: random weights, refused unless `allow_random_weights`); labels: the label list
    (lucent's ``wnid index name`` lines or Lucid's lists); images: an ImageNet folder (class sub-folders
    or wnid-prefixed file names); scale: "tiny" (a few hundred images, small levels and icons: minutes)
    or "full" (the article's settings); limit: images sampled for the atlases (default: the scale's);
    runtime: device, threads, progress of the heavy steps.

    Returns an `ArticleReport`; writes ``out/report.json`` and ``out/report.md``.
    """
    t0 = time.perf_counter()
    if scale not in SCALES:
        raise ConfigError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    sc = SCALES[scale]
    runtime = runtime or Runtime(progress=progress)
    if labels is None:
        raise ConfigError("labels is required: the article's classes are found by name and wnid in it")
    spec = load_model("inceptionv1", weights=weights, device=runtime.model_device, labels=str(labels))
    if str(spec.info.get("init", "")).startswith("random"):
        if not allow_random_weights:
            raise ConfigError("no weights were given, so the model's weights would be random and every number "
                              "meaningless; give weights, or allow_random_weights for a smoke test")
        log.warning("reproduce-article with RANDOM weights: the numbers mean nothing")
    out = Path(out)
    ensure_dir(out, "output folder")
    src = make_images(images)
    folder_paths = [str(it.path) for it in src]
    folder_labels = np.asarray(src.labels(spec.class_names, spec.wnids), np.int64)
    needed = []
    for name in WNIDS:
        try:
            needed.append(_class(spec, name))
        except _Skip:
            pass
    chosen = _select_images(folder_labels, folder_paths, needed, sc, limit, seed)
    if not chosen:
        raise ConfigError(f"no images in {images}")
    paths = [folder_paths[k] for k in chosen]
    inputs = config_hash({"weights": _file_hash(weights) if weights else None, "labels": _file_hash(labels),
                          "images": paths, "seed": seed})
    # the sampled images as a list file named by its content (a run records a list's path, not 1M paths)
    keys = [src[k].label_key for k in chosen]
    list_file = out / f"images-{config_hash({'images': paths})}.txt"
    if not list_file.is_file():
        text = "".join(f"{p}\t{k}\n" if k else f"{p}\n" for p, k in zip(paths, keys))
        write_atomic(list_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    ctx = _Ctx(out=out, run_dir=out / "run", scale=sc, spec=spec, runtime=runtime, inputs=inputs, paths=paths,
               list_file=list_file,
               sample_labels=folder_labels[np.asarray(chosen, np.int64)], folder_paths=folder_paths,
               folder_labels=folder_labels, progress=runtime.progress, seed=seed)
    ensure_dir(ctx.exp_dir, "experiments folder")
    ran: list[str] = []
    entries = []
    for exp in experiments():
        entries.append(_run_experiment(ctx, exp, ran))
    for name, reason in NOT_IMPLEMENTED.items():
        entries.append({"name": name, "status": "skipped", "ours": None, "article": ARTICLE.get(name),
                        "note": reason, "figures": []})
    paths_out = _write_report(ctx, entries, ran)
    return ArticleReport(out=out, entries=[{k: e[k] for k in ("name", "status", "ours", "article", "note")}
                                           for e in entries], ran=ran, paths=paths_out,
                         seconds=round(time.perf_counter() - t0, 3))


def _run_experiment(ctx: _Ctx, exp: _Experiment, ran: list[str]) -> dict:
    """One experiment through the stage engine; returns its report entry (with figures)."""
    entry = {"name": exp.name, "article": ARTICLE.get(exp.name), "ours": None, "figures": []}
    missing = [n for n in exp.needs if ctx.status.get(n) != "done"]
    if exp.run is None:         # pooled: over the attacks that were done
        missing = [] if any(ctx.status.get(n) == "done" for n in exp.needs) else missing
    if missing:
        ctx.status[exp.name] = "skipped"
        return {**entry, "status": "skipped",
                "note": "skipped: needs " + ", ".join(f"{n} ({ctx.status.get(n, 'not run')})" for n in missing)}
    done_needs = [n for n in exp.needs if ctx.status.get(n) == "done"]
    path = ctx.exp_dir / f"{slug(exp.name)}.json"
    record = {"experiment": exp.name, "format": FORMAT, "inputs": ctx.inputs, "scale": dataclasses.asdict(ctx.scale),
              "params": exp.params, "seed": ctx.seed,
              "needs": {n: (stage_entry(ctx.out, f"experiment:{n}") or {}).get("hash") for n in done_needs}}

    def fn(resume: bool) -> None:
        try:
            if exp.run is None:
                res = _pooled(ctx, done_needs)
            else:
                res = exp.run(ctx)
            res = {"status": "done", **res}
        except _Skip as why:
            res = {"status": "skipped", "ours": None, "note": f"skipped: {why}"}
        write_json_atomic(path, {"name": exp.name, "figures": [], **res})

    def outputs_ok() -> bool:
        if not path.is_file():
            return False
        try:
            res = json.loads(path.read_text())
        except ValueError:
            return False
        return all((ctx.out / f).exists() for f in res.get("figures", []))

    try:
        rep = run_stage(ctx.out, f"experiment:{exp.name}", record, fn, outputs_ok)
    except RunLockedError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:      # noqa: BLE001 - one experiment's failure is recorded, the rest run
        log.warning("experiment %s failed: %s: %s", exp.name, type(exc).__name__, exc)
        ctx.status[exp.name] = "failed"
        return {**entry, "status": "failed", "note": f"failed: {type(exc).__name__}: {exc}"[:600]}
    if rep.ran:
        ran.append(f"experiment:{exp.name}")
    res = json.loads(path.read_text())
    ctx.status[exp.name] = res["status"]
    if res["status"] == "done":
        ctx.results[exp.name] = res
    return {**entry, "status": res["status"], "ours": res.get("ours"), "note": res.get("note", ""),
            "figures": res.get("figures", [])}


# ------------------------------------------------------------------------------------ the report

def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if v and isinstance(v[0], dict):
            return "; ".join(", ".join(f"{k} {_fmt(x)}" for k, x in d.items()) for d in v)
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v).replace("|", "/").replace("\n", " ")


def report_markdown(entries: list[dict], title: str = "Activation Atlas: the article reproduced") -> str:
    """report.md's text: a status table, then per experiment a table of ours vs the article's values
    (keys of either side) and its figures."""
    lines = [f"# {title}", "",
             "Numbers of the article from method.md (§1.13, §3, §4.3, §7). Rates are fractions "
             "(0.654 = 65.4%).", "",
             "| experiment | status | note |", "|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['name']} | {e['status']} | {_fmt(e.get('note'))} |")
    for e in entries:
        lines += ["", f"## {e['name']} ({e['status']})", ""]
        if e.get("note"):
            lines += [_fmt(e["note"]), ""]
        ours, art = e.get("ours") or {}, e.get("article") or {}
        keys = list(ours) + [k for k in art if k not in ours]
        if keys:
            lines += ["| quantity | ours | article |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(ours.get(k))} | {_fmt(art.get(k))} |" for k in keys]
        for f in e.get("figures", []):
            lines += ["", f"![{e['name']}]({f})"]
    return "\n".join(lines) + "\n"


def _write_report(ctx: _Ctx, entries: list[dict], ran: list[str]) -> dict[str, Path]:
    paths = {"json": ctx.out / "report.json", "md": ctx.out / "report.md"}
    record = {"format": FORMAT, "entries": [{k: e.get(k) for k in ("name", "status", "note")} for e in entries],
              "stages": {e["name"]: (stage_entry(ctx.out, f"experiment:{e['name']}") or {}).get("hash")
                         for e in entries}}

    def fn(resume: bool) -> None:
        doc = [{k: e.get(k) for k in ("name", "status", "ours", "article", "note")} for e in entries]
        write_json_atomic(paths["json"], doc)
        text = report_markdown(entries, f"Activation Atlas: the article reproduced (scale {ctx.scale.name})")
        write_atomic(paths["md"], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    rep = run_stage(ctx.out, "report", record, fn, lambda: all(p.is_file() for p in paths.values()))
    if rep.ran:
        ran.append("report")
    return paths


__all__ = ["ARTICLE", "SCALES", "ArticleScale", "ArticleReport", "reproduce_article", "report_markdown",
           "experiments", "WNIDS", "CLASS_ATLASES", "COMPARISONS"]
