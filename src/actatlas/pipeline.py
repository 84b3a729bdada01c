"""collect -> layout -> grid -> whiten -> render -> assemble, with skip and resume; `build_atlas`.

Each stage runs through the one stage engine (`actatlas.stages.run_stage`): it is keyed by a hash of
its own config and of the hashes of the stages it reads, recorded in ``RUN/manifest.json``. A stage
whose key is unchanged and whose status is complete is skipped; a stage interrupted part-way resumes
(collect by shard, render by icon batch); a failed stage is never marked complete. Changing only the
render settings therefore reruns only render and assemble.

Stage functions return typed results (`LayoutResult`, `GridResult`, ...); `build_atlas` runs them all
and returns the `Atlas`, with what it did in ``atlas.report`` (a `BuildReport`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import render as render_pkg
from .alignment import ALIGNED_DIR, ALIGNED_STAGE, alignment_report, check_shared_rows
from .atlas import Atlas, AtlasLevel, AtlasSet, atlas_dir
from .collect import CollectConfig, check_alignable, resolve_layers
from .collect import collect as collect_activations
from .data import ImageSource
from .data import images as make_images
from .errors import ConfigError, RunStateError
from .grid import GridLevel, grid_levels, load_grid, save_grid
from .layout import (AlignConfig, Layout, LayoutConfig, compute_aligned_layouts, compute_layout, load_layout,
                     save_layout)
from .models import ModelSpec, Preprocess, load_model, prepare_spec, spec_from_module
from .render import RenderConfig, fidelity_of_activations
from .render.icons import ICON_ARRAYS, render_icon_batch
from .run import Run, load_run_model, open_run
from .runtime import Runtime
from .scores import VERSION as SCORES_VERSION
from .scores import (TOP, ScoreConfig, centre_scores_inputs, patch_vividness, read_patches, sample_members,
                     score_level, summarize_level, top_classes_of)
from .stages import (StageReport, config_hash, read_manifest, run_stage, settings_record, stage_hash,
                     update_manifest)
from .store import ensure_dir, layer_dirname, run_lock, save_npy_atomic, save_npz_atomic, write_json_atomic
from .whiten import whitening_matrix

log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_LEVELS = (10, 20, 40)
DEFAULT_MIN_COUNT = 6
SAMPLES_PER_FINEST_CELL = 2.5
"""Samples per cell of the finest level's G x G grid that the default positions per image aim for.
Measured on the shared sample (EfficientNet-Lite0 blocks.8, UMAP): 1000 photos x 4 positions (2.5 per
cell of 40 x 40) keep 282 cells of 6+ samples at level 40; 1000 x 1 (0.6 per cell) keep one."""
MAX_AUTO_PER_IMAGE = 16


def positions_per_image(n_images: int, levels: Sequence[int]) -> int:
    """The default positions per image: enough for `SAMPLES_PER_FINEST_CELL` samples per cell of the
    finest level, between 1 and `MAX_AUTO_PER_IMAGE`."""
    need = SAMPLES_PER_FINEST_CELL * max(levels) ** 2
    return int(min(MAX_AUTO_PER_IMAGE, max(1, math.ceil(need / max(1, n_images)))))


def positions_note(n_images: int, per_image: int, levels: Sequence[int]) -> str | None:
    """A warning when n_images x per_image samples are too few to fill the finest level (None if enough)."""
    g, have = max(levels), n_images * per_image
    need = SAMPLES_PER_FINEST_CELL * g ** 2
    if have >= need:
        return None
    k = positions_per_image(n_images, levels)
    fix = (f"set per_image={k}" if k > per_image and n_images * k >= need
           else "use more images or coarser levels")
    return (f"{n_images} images x {per_image} positions = {have} samples are few for level {g} "
            f"({g}x{g} cells; about {int(need)} fill it): expect few or no cells there; {fix}")


# ----------------------------------------------------------------------------------------------
# typed stage results


@dataclass
class LayoutResult:
    report: StageReport
    layout: Layout


@dataclass
class AlignedLayoutResult:
    """The aligned layouts of several layers ({layer: Layout}, in the aligned order)."""

    report: StageReport
    layouts: dict[str, Layout]


@dataclass
class GridResult:
    report: StageReport
    levels: list[GridLevel]


@dataclass
class WhitenResult:
    report: StageReport
    S: np.ndarray          # [c, c] float32 whitening matrix (method.md §1.8)


@dataclass
class RenderResult:
    """Icons per level size: {G: {"images": uint8 [m, P, P, 3], "objective": [m], "fidelity": [m],
    "steps": int64 [m] optimiser steps spent per icon (absent for units committed by an older version)}}."""

    report: StageReport
    icons: dict[int, dict[str, np.ndarray]]
    S: np.ndarray | None


@dataclass
class ScoresResult:
    """Honest icon scores per level size: {G: {score name: [m] array}} (`actatlas.scores.SCORE_KEYS`)."""

    report: StageReport
    scores: dict[int, dict[str, np.ndarray]]


@dataclass
class AssembleResult:
    report: StageReport
    atlas: Atlas
    pngs: dict[int, Path]
    scores: ScoresResult | None = None   # the scores stage it read (None: left out)


@dataclass
class BuildReport:
    """What `build_atlas` did: per-stage reports, canvas PNG paths ({G: path}; with several layers
    {layer: {G: path}}) and the summary dict. `layer` is the (first) layer, `layers` all of them."""

    run_dir: Path
    layer: str
    stages: list[StageReport]
    pngs: dict
    summary: dict = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# helpers


def check_layer(run: Run, layer: str | None) -> str:
    """`layer` if it was collected in `run` (None: the first collected layer); else a UserError."""
    if layer is None:
        return run.layers[0]
    if layer not in run.layers:
        raise ConfigError(f"layer {layer!r} was not collected in {run.path}; collected: {', '.join(run.layers)}")
    return layer


# ----------------------------------------------------------------------------------------------
# stages


def run_layout(run_dir: str | Path, layer: str | None = None, cfg: LayoutConfig | None = None,
               progress: bool = True) -> LayoutResult:
    """Stage: 2-D layout of the layer's activations (method.md §1.4–1.5) -> ``RUN/layout/<layer>``."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = check_layer(run, layer)
    cfg = cfg or LayoutConfig()
    record = {"collect": stage_hash(run_dir, "collect"), "layer": layer, "layout": settings_record(cfg)}
    out = run_dir / "layout"

    def fn(resume):
        save_layout(compute_layout(run.activations(layer), cfg, progress=progress), out, layer)

    rep = run_stage(run_dir, f"layout:{layer}", record, fn, lambda: (out / f"{layer_dirname(layer)}.npy").is_file())
    return LayoutResult(rep, load_layout(out, layer))


def run_aligned_layout(run_dir: str | Path, layers: Sequence[str], cfg: LayoutConfig | None = None,
                       align: AlignConfig | None = None, progress: bool = True) -> AlignedLayoutResult:
    """Stage: one joint layout of several layers (`actatlas.layout.compute_aligned_layouts`) ->
    ``RUN/layout-aligned/<layer>.npy`` (+ .raw.npy, .json), per layer in the format of `run_layout`.

    `layers` (two or more, in the order consecutive layers are aligned) must hold the same samples at
    the same image locations: a collect with shared locations (`actatlas.alignment.check_shared_rows`
    refuses anything else with what to collect again). One stage per run ("layout-aligned"): another
    set of layers or other settings replace the previous aligned layouts."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layers = [check_layer(run, ly) for ly in layers]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers lists a layer twice: {', '.join(layers)}")
    check_shared_rows(run, layers)
    cfg = cfg or LayoutConfig()
    align = align or AlignConfig()
    record = {"collect": stage_hash(run_dir, "collect"), "layers": layers, "layout": settings_record(cfg),
              "align": dataclasses.asdict(align)}
    out = run_dir / ALIGNED_DIR

    def fn(resume):
        if out.exists():      # an earlier set of layers, or a try that was killed part-way
            shutil.rmtree(out)
        computed = compute_aligned_layouts([run.activations(ly) for ly in layers], cfg, align, progress=progress)
        for ly, lay in zip(layers, computed):
            save_layout(lay, out, ly)

    def outputs_ok():
        return all((out / f"{layer_dirname(ly)}.{ext}").is_file() for ly in layers for ext in ("npy", "json"))

    rep = run_stage(run_dir, ALIGNED_STAGE, record, fn, outputs_ok)
    return AlignedLayoutResult(rep, {ly: load_layout(out, ly) for ly in layers})


def _layout_source(run_dir: Path, layer: str, aligned: bool) -> tuple[str, Path]:
    """(stage hash, folder) of the layout that the grid of `layer` reads: its own layout, or (aligned)
    the run's aligned layout, which must include the layer."""
    if not aligned:
        return stage_hash(run_dir, f"layout:{layer}"), run_dir / "layout"
    h = stage_hash(run_dir, ALIGNED_STAGE)
    done = (read_manifest(run_dir)["stages"][ALIGNED_STAGE].get("config") or {}).get("layers", [])
    if layer not in done:
        raise ConfigError(f"the aligned layout of {run_dir} covers {', '.join(done)}, not {layer}")
    return h, run_dir / ALIGNED_DIR


def run_grid(run_dir: str | Path, layer: str | None = None, levels: Sequence[int] = DEFAULT_LEVELS,
             min_count: int = DEFAULT_MIN_COUNT, topk: int = 5, progress: bool = True,
             aligned: bool = False) -> GridResult:
    """Stage: multi-level grid over the layout (method.md §1.6–1.7, §2) -> ``RUN/grid/<layer>``.

    `aligned`: over the layer's aligned layout (`run_aligned_layout`) instead of its own.
    A level in which no cell reaches `min_count` samples is skipped with a warning (recorded in
    ``levels.json``); the others are built. No non-empty level at all is a ConfigError."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = check_layer(run, layer)
    levels = sorted({int(g) for g in levels})
    if not levels or levels[0] < 1:
        raise ConfigError("grid levels must be positive integers, e.g. 10,20,40")
    layout_hash, layout_dir = _layout_source(run_dir, layer, aligned)
    record = {"layout": layout_hash, "levels": levels, "min_count": min_count, "topk": topk}
    out = run_dir / "grid"
    index = out / layer_dirname(layer) / "levels.json"

    def fn(resume):
        coords = load_layout(layout_dir, layer).coords
        lv = grid_levels(coords, run.activations(layer), levels, attributions=run.attributions(layer),
                         min_count=min_count, topk=topk)
        empty = {g.size: _empty_level_note(g.size, len(coords), min_count) for g in lv if len(g.i) == 0}
        kept = [g for g in lv if len(g.i)]
        if not kept:
            raise ConfigError(f"no grid level has a cell with at least {min_count} samples ({len(coords)} samples "
                              f"in all; levels {', '.join(map(str, levels))}): collect more images or more "
                              "positions per image (per_image), or use coarser levels")
        save_grid(kept, out, layer, run.class_names)
        write_json_atomic(index, {"requested": levels, "kept": [g.size for g in kept],
                                  "empty": {str(k): v for k, v in empty.items()}})

    def outputs_ok():
        if not index.is_file():
            return False
        kept = json.loads(index.read_text())["kept"]
        return all((out / layer_dirname(layer) / f"level-{g}.npz").is_file() for g in kept)

    rep = run_stage(run_dir, f"grid:{layer}", record, fn, outputs_ok)
    for note in json.loads(index.read_text()).get("empty", {}).values():
        log.warning("%s", note)
    return GridResult(rep, load_grid(out, layer))


def _empty_level_note(size: int, n: int, min_count: int) -> str:
    return (f"grid level {size} skipped: none of its {size}x{size} cells holds {min_count} or more of the "
            f"{n} samples; to fill it, collect more images or more positions per image (per_image), "
            f"or use a coarser level")


def run_whiten(run_dir: str | Path, layer: str | None = None, ridge: float = 1e-2) -> WhitenResult:
    """Stage: whitening matrix S of the layer (method.md §1.8) -> ``RUN/whiten/<layer>.npy``."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = check_layer(run, layer)
    record = {"collect": stage_hash(run_dir, "collect"), "layer": layer, "ridge": ridge}
    path = run_dir / "whiten" / f"{layer_dirname(layer)}.npy"

    def fn(resume):
        ensure_dir(path.parent)
        save_npy_atomic(path, np.asarray(whitening_matrix(run.activations(layer), ridge=ridge).S, np.float32))

    rep = run_stage(run_dir, f"whiten:{layer}", record, fn, path.is_file)
    return WhitenResult(rep, np.load(path))


def _batches(level: GridLevel, batch_size: int) -> list[tuple[int, slice]]:
    m = len(level.i)
    return [(b, slice(a, min(a + batch_size, m))) for b, a in enumerate(range(0, m, batch_size))]


COMMIT_BATCHES = 8
"""With the continuous loop (`RenderConfig.continuous`) a committed unit holds this many optimiser batches,
so that finished icons' slots are refilled from a queue long enough to keep the batch full."""


def commit_size(cfg: RenderConfig) -> int:
    """Icons per committed (and resumable) unit of the render stage."""
    return cfg.batch_size * (COMMIT_BATCHES if cfg.continuous else 1)


def parent_cells(level: GridLevel, parent: GridLevel) -> np.ndarray:
    """int64 [m]: for each kept cell of `level`, the index of the kept cell of the coarser `parent` level
    that holds its centre (((i + 0.5) G'/G, (j + 0.5) G'/G), the grid's binning), or -1 when that cell
    was not kept. When G' divides G the levels nest and every member of the cell is a member of its
    parent, so a kept cell always has one (a parent has at least as many members)."""
    G, Gp = level.size, parent.size
    pi = np.minimum(((np.asarray(level.i, np.int64) * 2 + 1) * Gp) // (2 * G), Gp - 1)
    pj = np.minimum(((np.asarray(level.j, np.int64) * 2 + 1) * Gp) // (2 * G), Gp - 1)
    index = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(parent.i, parent.j))}
    return np.array([index.get((int(a), int(b)), -1) for a, b in zip(pi, pj)], np.int64)


def member_starts(run: Run, layer: str, level: GridLevel, cells: np.ndarray, size: int,
                  spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(init uint8 [n, size, size, 3], mask bool [n]): for the kept cells `cells` of `level`, the real
    patch of the member closest to the cell's mean (the grid's ``closest[:, 0]``), cut from its photo as
    the export cuts patches (`scores.cut_patch`), at the icon size: a start for the icon
    (``RenderConfig.warm_start`` "member"). The mask is False where the photo cannot be read or the
    layer has no spatial map."""
    cells = np.asarray(cells, np.int64)
    init = np.zeros((len(cells), size, size, 3), np.uint8)
    mask = np.zeros(len(cells), bool)
    shape = run.summary.get("layer_shapes", {}).get(layer)
    if shape is None or len(shape) != 3 or not len(cells):
        return init, mask
    rows = run.rows(layer)
    geometry, s = _patch_geometry(run, spec)
    best = np.asarray(level.closest)[cells, 0]
    requests = [(rows.path[r], int(rows.y[r]), int(rows.x[r]), size) for r in best if r >= 0]
    where = np.flatnonzero(best >= 0)
    patches, failed = read_patches(requests, geometry, s, (int(shape[1]), int(shape[2])))
    if failed:
        log.warning("render: %d member photos could not be read; those icons start at random", failed)
    for q, p in zip(where, patches):
        if p is not None:
            init[q], mask[q] = p, True
    return init, mask


def icon_starts(run: Run, layer: str, cfg: RenderConfig, spec: ModelSpec, level: GridLevel, cells: np.ndarray,
                parent: tuple[GridLevel, np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(init, init_mask) for the icons of kept cells `cells` of `level` by ``cfg.warm_start``, or
    (None, None) when every icon starts at random. `parent` = (the next coarser level, the rows of it
    whose icons are given, those icons uint8 [r, P, P, 3]) for "parent" / "parent-member"."""
    cells = np.asarray(cells, np.int64)
    ws, size = cfg.warm_start, cfg.icon_size
    init, mask = np.zeros((len(cells), size, size, 3), np.uint8), np.zeros(len(cells), bool)
    if ws in ("parent", "parent-member") and parent is not None:
        plevel, prows, picons = parent
        where = {int(c): q for q, c in enumerate(prows)}
        pos = np.array([where.get(int(c), -1) for c in parent_cells(level, plevel)[cells]], np.int64)
        init[pos >= 0], mask = picons[pos[pos >= 0]], pos >= 0
    if ws == "member" or (ws == "parent-member" and not mask.all()):
        rest = np.flatnonzero(~mask)
        m_init, m_mask = member_starts(run, layer, level, cells[rest], size, spec)
        init[rest[m_mask]], mask[rest[m_mask]] = m_init[m_mask], True
    return (init, mask) if mask.any() else (None, None)


def run_render(run_dir: str | Path, layer: str | None = None, cfg: RenderConfig | None = None, ridge: float = 1e-2,
               spec: ModelSpec | None = None, progress: bool = True, runtime: Runtime | None = None) -> RenderResult:
    """Stage: one icon per kept cell of every level (method.md §1.9–1.11) -> ``RUN/icons/<layer>``.

    Icons are rendered and committed in units (one ``.npz`` per unit, written atomically; a unit is one
    optimiser batch, or `COMMIT_BATCHES` of them with the continuous loop), each with its own seed, so
    an interrupted render resumes and yields the same icons. Levels render coarse to fine; with
    ``cfg.warm_start == "parent"`` each icon of a finer level starts from the icon of its parent cell
    (`parent_cells`) in the next coarser level, and the coarsest level renders with the config's
    `standalone` form (random starts, twice the steps); with "member" every icon starts from the real
    patch of its cell's closest member (`member_starts`); "parent-member": parents where there are,
    else members. ``runtime.engine`` "local" renders the units here, one after another; "ray" runs one
    Ray task per unit (``runtime.threads`` CPUs each, or one GPU each with
    a CUDA device), a level at a time, and commits each as it finishes. Both call `render_icon_batch`
    with the same seeds and starts.
    """
    runtime = runtime or Runtime(device=(cfg.device if cfg and cfg.device else "cpu"), progress=progress,
                                 numba_cache=False)
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = check_layer(run, layer)
    cfg = cfg or RenderConfig.cpu_default()
    device = cfg.device or runtime.device
    record = {"grid": stage_hash(run_dir, f"grid:{layer}"), "render": settings_record(cfg)}
    S = None
    if cfg.whiten:
        wh = run_whiten(run_dir, layer, ridge)
        S, record["whiten_hash"] = wh.S, wh.report.hash
    out = run_dir / "icons" / layer_dirname(layer)
    levels = sorted(load_grid(run_dir / "grid", layer), key=lambda lv: lv.size)
    unit = commit_size(cfg)

    def done_path(level, b):
        return out / f"level-{level.size}" / f"batch-{b:05d}.npz"

    def commit(level, b, arrays):
        p = done_path(level, b)
        ensure_dir(p.parent)
        save_npz_atomic(p, **{k: arrays[k] for k in ICON_ARRAYS if k in arrays})

    def seeded(lv, b):
        """The unit's config: its own seed; the coarsest level, which has no parents to start from,
        renders with the `standalone` form of a parent warm start."""
        seed = int(config_hash({"seed": cfg.seed, "level": lv.size, "batch": b})[:8], 16)
        base = cfg.standalone() if lv.size == levels[0].size else cfg
        return dataclasses.replace(base, seed=seed)

    def level_images(lv):
        return np.concatenate([np.load(done_path(lv, b))["images"] for b, _ in _batches(lv, unit)])

    def starts(k, lv, sl):
        parent = None
        if cfg.warm_start in ("parent", "parent-member") and k > 0:
            prev = levels[k - 1]
            parent = (prev, np.arange(len(prev.i)), level_images(prev))
        return icon_starts(run, layer, cfg, spec, lv, np.arange(sl.start, sl.stop), parent)

    def fn(resume):
        nonlocal spec
        if not resume and out.exists():
            shutil.rmtree(out)
        todo = [(k, lv, b, sl) for k, lv in enumerate(levels) for b, sl in _batches(lv, unit)
                if not done_path(lv, b).is_file()]
        if not todo:
            return
        if spec is None:
            spec = load_run_model(run, runtime.model_device if runtime.engine == "ray" else device)
        module_layer = run.config["module_layers"][layer]
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(sl.stop - sl.start for *_, sl in todo), disable=not progress, unit="icon",
                   desc=f"render {layer}")
        if runtime.engine == "ray":
            from .ray_engine import ray_render

            # a level at a time when icons start from their parents', else everything at once
            waves = ([[job for job in todo if job[0] == k] for k in range(len(levels))]
                     if cfg.warm_start in ("parent", "parent-member") else [todo])
            for wave in waves:
                jobs = [((lv, b, sl), lv.mean_activation[sl], seeded(lv, b), *starts(k, lv, sl))
                        for k, lv, b, sl in wave]
                for (lv, b, sl), arrays in ray_render(spec, module_layer, jobs, S, device=device,
                                                      threads=runtime.threads, address=runtime.address):
                    commit(lv, b, arrays)
                    bar.update(sl.stop - sl.start)
        else:
            for k, lv, b, sl in todo:
                init, mask = starts(k, lv, sl)
                commit(lv, b, render_icon_batch(spec, module_layer, lv.mean_activation[sl], seeded(lv, b), S,
                                                render=render_pkg.render_icons, init=init, init_mask=mask))
                bar.update(sl.stop - sl.start)
        bar.close()

    rep = run_stage(run_dir, f"render:{layer}", record, fn,
                    lambda: all(done_path(lv, b).is_file() for lv in levels for b, _ in _batches(lv, unit)))
    icons = {}
    for lv in levels:
        parts = [np.load(done_path(lv, b)) for b, _ in _batches(lv, unit)]
        icons[lv.size] = {k: np.concatenate([p[k] for p in parts]) for k in ICON_ARRAYS
                          if all(k in p.files for p in parts)}
    return RenderResult(rep, icons, S)


def best_member_fidelity(level, acts: np.ndarray, S: np.ndarray | None) -> np.ndarray:
    """[m] for each kept cell, the highest fidelity among its real member samples (the
    non-parametric comparison for the icons), computed over all members at once."""
    rows = np.asarray(level.member_rows)
    if len(rows) == 0:
        return np.zeros(0, np.float32)
    counts = np.diff(level.member_offsets)
    owner = np.repeat(np.arange(len(counts)), counts)
    order = np.argsort(rows, kind="stable")          # read the memmap in ascending order
    h = np.asarray(acts[rows[order]], np.float32)
    f = np.empty(len(rows), np.float32)
    f[order] = fidelity_of_activations(h, np.asarray(level.mean_activation, np.float32)[owner[order]], S)
    return np.maximum.reduceat(f, level.member_offsets[:-1]).astype(np.float32)


def _patch_geometry(run: Run, spec: ModelSpec):
    """(geometry, s): the input geometry the run recorded (else the model's): where patches are cut."""
    d = run.summary.get("preprocess")
    if d is not None:
        try:
            pre = Preprocess(**d)
            return pre.geometry, int(pre.size)
        except (TypeError, ValueError):  # a recorded format this version does not know
            pass
    return spec.preprocess.geometry, int(spec.preprocess.size)


def _member_tops(run: Run, layer: str, rows: np.ndarray) -> np.ndarray | None:
    """int64 [n, 5] the top classes of the stored attributions of run rows `rows` (collect's own
    numbers for the members); None when the run has no attributions."""
    order = np.argsort(rows, kind="stable")
    full = run.attributions(layer)
    if full is not None:
        top = top_classes_of(np.asarray(full[rows[order]], np.float32))
    else:
        topk = run.attribution_topk(layer)
        if topk is None:
            return None
        top = np.asarray(topk[0][rows[order]], np.int64)[:, :TOP]
    out = np.empty_like(top)
    out[order] = top
    return out


def run_scores(run_dir: str | Path, layer: str, render: RenderResult, spec: ModelSpec | None = None,
               cfg: ScoreConfig | None = None, progress: bool = True, device: str = "cpu") -> ScoresResult:
    """Stage: honest icon scores of every level (`actatlas.scores`) -> ``RUN/scores/<layer>/level-<G>.npz``.

    For each cell: the icon's retrieval ranks (raw and whitened), class agreement and vividness, the
    same for one seeded random real member, and the median vividness of the cell's real patches.
    Keyed by the render's hash and `cfg`; committed per level, so an interrupted stage resumes."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = check_layer(run, layer)
    cfg = cfg or ScoreConfig()
    record = {"render": render.report.hash, "scores": dataclasses.asdict(cfg), "version": SCORES_VERSION}
    out = run_dir / "scores" / layer_dirname(layer)
    levels = load_grid(run_dir / "grid", layer)

    def path(lv):
        return out / f"level-{lv.size}.npz"

    def fn(resume):
        nonlocal spec
        if not resume and out.exists():
            shutil.rmtree(out)
        todo = [lv for lv in levels if not path(lv).is_file()]
        if not todo:
            return
        if spec is None:
            spec = load_run_model(run, device)
        acts = run.activations(layer)
        rows = run.rows(layer)
        shape = run.summary.get("layer_shapes", {}).get(layer)
        geometry, s = _patch_geometry(run, spec)
        picks, requests = {}, []
        for lv in todo:
            member, patches = sample_members(lv.member_offsets, lv.member_rows, cfg.seed, lv.size, cfg.max_patches)
            P = int(render.icons[lv.size]["images"].shape[1])
            picks[lv.size] = (member, patches, len(requests))
            requests += [(rows.path[r], int(rows.y[r]), int(rows.x[r]), P) for p in patches for r in p]
        if shape is not None and len(shape) == 3:
            values, failed = patch_vividness(requests, geometry, s, (int(shape[1]), int(shape[2])), cfg.frame,
                                             cfg.grey_tol, progress=progress)
            if failed:
                log.warning("icon scores: %d member photos could not be read; their patches are left out", failed)
        else:   # a layer without a spatial map has no patches
            values = np.full((len(requests), 3), np.nan)
        with_attr = run.attributions(layer) is not None or run.attribution_topk(layer) is not None
        module_layer = run.config["module_layers"][layer]
        for lv in todo:
            member, patches, start = picks[lv.size]
            n = sum(len(p) for p in patches)
            icons = render.icons[lv.size]["images"]
            icon_acts, icon_attr = centre_scores_inputs(spec, module_layer, icons, attributions=with_attr,
                                                        batch_size=cfg.batch_size)
            order = np.argsort(member, kind="stable")
            member_acts = np.empty((len(member), acts.shape[1]), np.float32)
            member_acts[order] = np.asarray(acts[member[order]], np.float32)
            arrays = score_level(
                means=np.asarray(lv.mean_activation, np.float32), cell_top=np.asarray(lv.top_classes)[:, :TOP],
                S=render.S, icon_acts=icon_acts.reshape(len(icons), -1),
                icon_top=top_classes_of(icon_attr) if icon_attr is not None else None, icons=icons,
                member=member, member_acts=member_acts,
                member_top=_member_tops(run, layer, member) if with_attr else None,
                patches=patches, patch_values=values[start:start + n], cfg=cfg, counts=lv.count)
            ensure_dir(out)
            save_npz_atomic(path(lv), **arrays)

    rep = run_stage(run_dir, f"scores:{layer}", record, fn, lambda: all(path(lv).is_file() for lv in levels))
    scores = {}
    for lv in levels:
        with np.load(path(lv)) as z:
            scores[lv.size] = {k: z[k] for k in z.files}
    return ScoresResult(rep, scores)


def run_assemble(run_dir: str | Path, layer: str, render: RenderResult, scores: ScoresResult | None = None, *,
                 spec: ModelSpec | None = None, progress: bool = False, device: str = "cpu") -> AssembleResult:
    """Stage: canvases, per-level cell JSON and summary -> ``RUN/atlas/<layer>``.

    Always runs (it is cheap). Its ``atlas.json``, which marks an assembled atlas, is removed first
    and written last, so a failed assemble never leaves an earlier atlas to be exported as current.
    Without `scores` it runs the scores stage first (`run_scores` with `spec`, else the run's model
    loaded again on `device`; a model given as an object cannot be, and the atlas then has no icon
    scores); it is its own stage ("scores:<layer>" in the manifest: cached, resumable)."""
    run_dir = Path(run_dir)
    run = open_run(run_dir)
    acts = run.activations(layer)
    adir = atlas_dir(run_dir, layer)
    result: dict = {}
    if scores is None:
        try:
            scores = run_scores(run_dir, layer, render, spec=spec, progress=progress, device=device)
        except RunStateError as e:
            log.warning("icon scores left out: %s", e)
    per_level = scores.scores if scores is not None else {}

    def fn(resume):
        (adir / "atlas.json").unlink(missing_ok=True)
        levels = []
        for g in load_grid(run_dir / "grid", layer):
            ic = render.icons[g.size]
            levels.append(AtlasLevel(size=g.size, i=g.i, j=g.j, count=g.count, top_classes=g.top_classes,
                                     top_values=g.top_values, icons=ic["images"], fidelity=ic["fidelity"],
                                     member_fidelity=best_member_fidelity(g, acts, render.S), grid=g,
                                     scores=per_level.get(g.size, {}), steps=ic.get("steps")))
        atlas = Atlas(layer, levels, run.class_names, run_dir=run_dir)
        result["atlas"], result["pngs"] = atlas, atlas.save(adir)

    record = {"render": render.report.hash, **({"scores": scores.report.hash} if scores is not None else {})}
    rep = run_stage(run_dir, f"assemble:{layer}", record, fn, force=True)
    return AssembleResult(rep, result["atlas"], result["pngs"], scores)


# ----------------------------------------------------------------------------------------------
# the whole atlas


_BUILD_KEY = "build"   # manifest entry: the settings of the last build_atlas, to continue the run


def _resolve_model(model, weights, sha256, model_options, device) -> ModelSpec:
    import torch.nn as nn

    if isinstance(model, ModelSpec):
        return prepare_spec(model, device)
    if isinstance(model, nn.Module):
        return prepare_spec(spec_from_module(model), device)
    if not isinstance(model, str):
        raise ConfigError(f"model must be a registered name, a ModelSpec or an nn.Module, not {type(model).__name__}")
    return load_model(model, weights=weights, sha256=sha256, device=device, **(model_options or {}))


def _collect_config(d: dict) -> CollectConfig:
    known = {f.name for f in dataclasses.fields(CollectConfig)}
    d = {k: v for k, v in d.items() if k in known}
    if d.get("layers") is not None:
        d["layers"] = tuple(d["layers"])
    return CollectConfig(**d)


def _images_record(images) -> Any:
    """How to name `images` again when the run is continued (None when it cannot be)."""
    if isinstance(images, (str, os.PathLike)):
        return str(images)
    if isinstance(images, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in images):
        return [str(p) for p in images]
    return None


def _layer_names(layer, layers) -> list[str] | None:
    """The layers asked for: `layer` (a name or a list) or `layers`, as a list; None for the default."""
    if layer is not None and layers is not None:
        raise ConfigError("give layer= or layers=, not both")
    names = layers if layers is not None else layer
    if names is None:
        return None
    names = [names] if isinstance(names, str) else list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"layers must be layer names, got {names!r}")
    return names


def _align_config(align) -> AlignConfig | None:
    if align is None or align is False:
        return None
    if align is True:
        return AlignConfig()
    if isinstance(align, AlignConfig):
        return align
    if isinstance(align, dict):
        return AlignConfig.from_dict(align)
    raise ConfigError(f"align must be True, False or an AlignConfig, not {type(align).__name__}")


def _check_alignable_run(out: Path, names: list[str]) -> None:
    """Before anything runs: a finished collect in `out` made without shared locations cannot be
    aligned (a new collect there would only be refused as a different config)."""
    complete = out / "collect" / "complete.json"
    if complete.is_file() and not json.loads(complete.read_text())["config"].get("shared_locations"):
        raise RunStateError(f"{out} was collected without shared locations: each layer sampled its own image "
                            "positions, so its rows do not correspond and cannot be aligned; collect "
                            f"{', '.join(names)} again with shared_locations into a new run directory (an aligned "
                            "build into a new out= does that)")


def build_atlas(images=None, out: str | Path | None = None, *, model=None, layer: str | Sequence[str] | None = None,
                levels: Sequence[int] | None = None, min_count: int | None = None, limit: int | None = None,
                collect: CollectConfig | None = None, layout: LayoutConfig | None = None,
                render: RenderConfig | None = None, runtime: Runtime | None = None, weights: str | None = None,
                sha256: str | None = None, model_options: dict | None = None,
                layers: Sequence[str] | None = None, align: bool | AlignConfig | None = None) -> Atlas | AtlasSet:
    """The whole activation atlas with one call: collect -> layout -> grid -> render -> assemble.

    Args:
        images: anything ``aa.images`` takes (a folder, a .txt list, ``"sample:N"``, a list of paths)
            or an `ImageSource`. None with an existing run in `out`: continue that run with the
            settings it was built with (any argument given here overrides its saved value).
        out: the run directory (created).
        model: a registered name (default ``"efficientnet_lite0"``), a `ModelSpec` or an ``nn.Module``.
        layer: layer name or alias (default: the model's default layer), or a list of them.
        layers: several layers (the same as a list in `layer`): one atlas per layer, collected in one pass.
        align: lay the layers out jointly (`run_aligned_layout`; True, or an `AlignConfig`): the layers
            are collected at shared image locations, so each sample is the same image place in every
            layer, and ``summary["alignment"]`` measures how well their maps line up (aligned against
            the layers' independent layouts, which are computed too). Needs two or more layers with a
            spatial map. Without it each layer keeps its own independent layout.
        levels: grid sizes, coarse to fine (default 10, 20, 40).
        min_count: smallest kept cell (default 6, the recipe's count > 5).
        limit: use only the first N images.
        collect, layout, render: stage settings (`CollectConfig`, `LayoutConfig`, `RenderConfig`).
        runtime: device, engine, threads, progress (`Runtime`); applied once here. Without it the
            device/engine/threads of `collect` are used (its defaults: cpu, local).
        weights, sha256, model_options: passed to ``load_model`` for a model given by name.

    Stages whose inputs and config are unchanged are skipped; interrupted stages resume. Returns the
    `Atlas` of one layer, or an `AtlasSet` (one `Atlas` per layer, in order) of several;
    ``.report`` is the `BuildReport` (stages run, times, canvases, summary).
    """
    if out is None:
        raise ConfigError("build_atlas needs out= (the run directory)")
    out = Path(out)
    saved = read_manifest(out).get(_BUILD_KEY, {}) if out.is_dir() else {}
    if images is None:
        if not saved and not (out / "collect" / "complete.json").is_file():
            raise ConfigError(f"{out} holds no run to continue; pass images= to start one")
        images = saved.get("images")
    names = _layer_names(layer, layers)
    if names is None:
        names = saved.get("layers") or ([saved["layer"]] if saved.get("layer") else None)
    acfg = _align_config(align if align is not None else saved.get("align"))
    if acfg is not None and (names is None or len(names) < 2):
        raise ConfigError(f"align lays out two or more layers jointly; got {', '.join(names) if names else 'one layer'}"
                          " (give layers=[...] with two or more)")
    if acfg is not None:
        _check_alignable_run(out, names)
    source = None if images is None or isinstance(images, ImageSource) else make_images(images)
    source = images if isinstance(images, ImageSource) else source
    ccfg = collect or (_collect_config(saved["collect"]) if saved.get("collect") else None)
    levels = tuple(levels if levels is not None else saved.get("levels", DEFAULT_LEVELS))
    limit = limit if limit is not None else saved.get("limit", (ccfg or CollectConfig()).limit)
    n_images = min(len(source), limit or len(source)) if source is not None else None
    if ccfg is None:            # the default positions per image fill the finest level
        ccfg = CollectConfig(per_image=positions_per_image(n_images, levels) if n_images else 1)
        if ccfg.per_image > 1:
            log.info("%d positions per image, so that %d images fill level %d", ccfg.per_image, n_images, max(levels))
    if n_images and ccfg.positions == "random" and levels:
        note = positions_note(n_images, ccfg.per_image, levels)
        if note:
            log.warning("%s", note)
    if runtime is None:
        runtime = Runtime(device=ccfg.device, engine=ccfg.engine, threads=ccfg.threads, address=ccfg.address)
    runtime.apply()
    model = model if model is not None else saved.get("model", DEFAULT_MODEL)
    min_count = int(min_count if min_count is not None else saved.get("min_count", DEFAULT_MIN_COUNT))
    lcfg = layout or (LayoutConfig.from_dict(saved["layout"]) if saved.get("layout") else LayoutConfig())
    rcfg = render or (RenderConfig(**saved["render"]) if saved.get("render") else RenderConfig.cpu_default())
    if rcfg.device is None or render is None:
        rcfg = dataclasses.replace(rcfg, device=runtime.device)
    if model_options is None:
        model_options = saved.get("model_options") or {}
    if weights is None and sha256 is None and isinstance(model, str) and model == saved.get("model"):
        weights, sha256 = saved.get("weights"), saved.get("sha256")

    spec = _resolve_model(model, weights, sha256, model_options, runtime.model_device)
    if acfg is not None:     # before anything is written
        check_alignable(spec, resolve_layers(spec, names))
    ccfg = dataclasses.replace(ccfg, layers=tuple(names) if names else ccfg.layers, limit=limit,
                               device=runtime.device, engine=runtime.engine, address=runtime.address,
                               threads=runtime.threads, shared_locations=ccfg.shared_locations or acfg is not None)
    t0 = time.perf_counter()
    ensure_dir(out, "run directory")
    with run_lock(out, "build"):
        if images is None and not (out / "collect" / "complete.json").is_file():
            raise ConfigError(f"the collect of {out} is unfinished and its images were given as an object; "
                              "pass images= again to finish it")
        if images is None:      # continuing a run whose collect is complete: nothing to collect
            res = None
        else:
            res = collect_activations(spec, source, out, ccfg, progress=runtime.progress)
        update_manifest(out, **{_BUILD_KEY: {
            "images": _images_record(images) if images is not None else saved.get("images"),
            "model": model if isinstance(model, str) else spec.name, "weights": weights, "sha256": sha256,
            "model_options": {k: v for k, v in model_options.items() if isinstance(v, (str, int, float, bool))},
            "layer": names[0] if names and len(names) == 1 else None,
            "layers": names if names and len(names) > 1 else None,
            "align": dataclasses.asdict(acfg) if acfg is not None else False,
            "levels": list(levels), "min_count": min_count, "limit": limit,
            "collect": dataclasses.asdict(ccfg), "layout": dataclasses.asdict(lcfg),
            "render": {**dataclasses.asdict(rcfg), "device": None}}})
        ran = res is not None and not res.already_complete
        reports = [StageReport("collect", ran, res.seconds if ran else 0.0, stage_hash(out, "collect"))]
        run = open_run(out)
        labels = [check_layer(run, ly) for ly in names] if names else [check_layer(run, None)]
        own = {}       # each layer's own (independent) layout: its atlas without align, the baseline with it
        if acfg is not None:
            aligned = run_aligned_layout(out, labels, lcfg, acfg, progress=runtime.progress)
            reports.append(aligned.report)
        atlases, per_layer = [], {}
        for ly in labels:
            lay = run_layout(out, ly, lcfg, progress=runtime.progress)
            own[ly] = lay.layout.coords
            reports.append(lay.report)
            grid = run_grid(out, ly, levels, min_count=min_count, progress=runtime.progress,
                            aligned=acfg is not None)
            ren = run_render(out, ly, rcfg, spec=spec, progress=runtime.progress, runtime=runtime)
            asm = run_assemble(out, ly, ren, spec=spec, progress=runtime.progress, device=runtime.model_device)
            reports += [grid.report, ren.report, asm.report]
            atlases.append(asm.atlas)
            per_layer[ly] = asm.pngs
        if len(labels) == 1:
            atlas = atlases[0]
            summary = _summary(out, run, labels[0], atlas, reports, per_layer[labels[0]], t0)
            atlas.summary = summary
            atlas.report = BuildReport(out, labels[0], reports, per_layer[labels[0]], summary, layers=labels)
            _write_atlas_json(out, atlas, summary)
            write_json_atomic(out / "summary.json", summary)
            return atlas
        summary = {"run_dir": str(out), "model": run.config["model"], "layers": labels, "aligned": acfg is not None,
                   "samples": int(run.summary["rows"][labels[0]]), "atlases": {}}
        for ly, atlas in zip(labels, atlases):
            mine = [r for r in reports if r.name.endswith(f":{ly}")]
            atlas.summary = _summary(out, run, ly, atlas, mine, per_layer[ly], t0)
            summary["atlases"][ly] = atlas.summary
            _write_atlas_json(out, atlas, atlas.summary)
        if acfg is not None:
            summary["alignment"] = alignment_report(
                run, labels, {ly: lay.coords for ly, lay in aligned.layouts.items()}, own, min(levels), min_count,
                seed=lcfg.seed or 0)
            summary["align"] = dataclasses.asdict(acfg)
        stage_seconds = {k: v.get("seconds") for k, v in read_manifest(out).get("stages", {}).items()}
        summary.update({"stages_run": [r.name for r in reports if r.ran],
                        "seconds_this_call": {r.name: round(r.seconds, 3) for r in reports},
                        "seconds_recorded": stage_seconds, "seconds": round(time.perf_counter() - t0, 3),
                        "pngs": {ly: {str(g): str(p) for g, p in pngs.items()} for ly, pngs in per_layer.items()}})
        write_json_atomic(out / "summary.json", summary)
        result = AtlasSet(atlases, aligned=acfg is not None, summary=summary, run_dir=out)
        result.report = BuildReport(out, labels[0], reports, per_layer, summary, layers=labels)
    return result


def _write_atlas_json(out: Path, atlas: Atlas, summary: dict) -> None:
    write_json_atomic(atlas_dir(out, atlas.layer) / "atlas.json",
                      {"layer": atlas.layer, "levels": [lv.size for lv in atlas.levels],
                       "class_names": atlas.class_names, "summary": summary})


def _summary(out: Path, run: Run, layer: str, atlas: Atlas, reports: list[StageReport], pngs: dict,
             t0: float) -> dict:
    stage_seconds = {k: v.get("seconds") for k, v in read_manifest(out).get("stages", {}).items()}
    return {
        "run_dir": str(out), "layer": layer, "model": run.config["model"],
        "samples": int(run.summary["rows"].get(layer, sum(run.summary["rows"].values()))),
        "levels": [_level_summary(lv) for lv in atlas.levels],
        "mean_icon_fidelity": _mean([lv.fidelity for lv in atlas.levels]),
        "mean_member_fidelity": _mean([lv.member_fidelity for lv in atlas.levels]),
        "mean_icon_objective_alignment": _mean([lv.fidelity for lv in atlas.levels]),
        "mean_best_member_objective_alignment": _mean([lv.member_fidelity for lv in atlas.levels]),
        "mean_steps": _mean([lv.steps for lv in atlas.levels if lv.steps is not None]),
        "stages_run": [r.name for r in reports if r.ran],
        "seconds_this_call": {r.name: round(r.seconds, 3) for r in reports},
        "seconds_recorded": stage_seconds,
        "seconds": round(time.perf_counter() - t0, 3),
        "pngs": {str(g): str(p) for g, p in pngs.items()},
    }


def _level_summary(lv: AtlasLevel) -> dict:
    """One level of the summary: the old fidelity numbers (under their honest names too: "objective
    alignment", the best real member's) and, when the level has them, the honest icon scores for the
    icons, the random members and the real patches (`actatlas.scores.summarize_level`)."""
    icon = float(lv.fidelity.mean()) if len(lv.i) else None
    member = float(lv.member_fidelity.mean()) if len(lv.i) else None
    out = {"size": lv.size, "cells": int(len(lv.i)), "samples_used": int(lv.count.sum()),
           "mean_steps": lv.mean_steps, "icon_fidelity": icon, "member_fidelity": member,
           "icon_objective_alignment": icon, "best_member_objective_alignment": member}
    if lv.scores:
        out["scores"] = summarize_level(lv.scores, lv.fidelity)
    return out


def _mean(arrays: list[np.ndarray]) -> float | None:
    arr = np.concatenate([np.asarray(a, np.float64) for a in arrays]) if arrays else np.zeros(0)
    return float(arr.mean()) if len(arr) else None


__all__ = ["build_atlas", "BuildReport", "LayoutResult", "AlignedLayoutResult", "GridResult", "WhitenResult",
           "RenderResult", "AssembleResult", "ScoresResult", "run_layout", "run_aligned_layout", "run_grid",
           "run_whiten", "run_render", "run_scores",
           "run_assemble",
           "best_member_fidelity", "check_layer", "load_run_model"]
