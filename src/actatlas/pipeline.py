"""collect -> layout -> grid -> whiten -> render -> assemble, with skip and resume.

Each stage is keyed by a hash of its own config and of the hashes of the stages it reads, recorded
in ``RUN/manifest.json``. A stage whose key is unchanged and whose status is complete is skipped; a
stage interrupted part-way resumes (collect by shard, render by icon batch). Changing only the
render settings therefore reruns only render and assemble.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .atlas import Atlas, AtlasLevel, atlas_dir
from .collect import CollectConfig, collect, config_hash
from .errors import UserError
from .run import Run, open_run, read_manifest
from .store import ensure_dir, layer_dirname, run_lock, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    name: str
    ran: bool
    seconds: float
    hash: str


@dataclass
class BuildResult:
    """What `build` did: per-stage reports, the atlas, canvas PNG paths and the summary dict."""

    run_dir: Path
    layer: str
    stages: list[StageReport]
    atlas: Atlas
    pngs: dict[int, Path]
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# stage bookkeeping


def _stage(run_dir: Path, key: str, record: dict, fn: Callable[[bool], None],
           outputs_ok: Callable[[], bool], force: bool = False) -> StageReport:
    """Run `fn(resume)` unless the manifest says stage `key` is complete with the same record hash
    (or `force`). Holds the run's lock throughout. A stage is marked complete only after `fn`
    returns; an exception (or an interrupt) marks it "failed" with the reason, never complete."""
    h = config_hash(record)
    with run_lock(run_dir, f"stage {key}"):
        manifest = read_manifest(run_dir)
        st = manifest.get("stages", {}).get(key)
        if not force and st and st.get("hash") == h and st.get("status") == "complete" and outputs_ok():
            log.info("stage %s unchanged: skipped", key)
            return StageReport(key, False, 0.0, h)
        resume = bool(st and st.get("hash") == h)
        manifest.setdefault("stages", {})[key] = {"hash": h, "config": record, "status": "running"}
        write_json_atomic(run_dir / "manifest.json", manifest)
        t0 = time.perf_counter()
        try:
            fn(resume)
        except BaseException as exc:
            manifest = read_manifest(run_dir)
            manifest["stages"][key].update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            write_json_atomic(run_dir / "manifest.json", manifest)
            raise
        seconds = time.perf_counter() - t0
        manifest = read_manifest(run_dir)
        manifest["stages"][key].update(status="complete", seconds=round(seconds, 3))
        manifest["stages"][key].pop("error", None)
        write_json_atomic(run_dir / "manifest.json", manifest)
    return StageReport(key, True, seconds, h)


def stage_hash(run_dir: Path, key: str) -> str:
    st = read_manifest(run_dir).get("stages", {}).get(key)
    if not st or st.get("status") != "complete":
        raise UserError(f"stage {key!r} has not completed in {run_dir}; run it first (or 'actatlas build')")
    return st["hash"]


def _config_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    for k in ("device", "progress"):
        d.pop(k, None)
    return d


def _check_layer(run: Run, layer: str | None) -> str:
    if layer is None:
        return run.layers[0]
    if layer not in run.layers:
        raise UserError(f"layer {layer!r} was not collected in {run.path}; collected: {', '.join(run.layers)}")
    return layer


# ----------------------------------------------------------------------------------------------
# stages


def run_layout(run_dir: str | Path, layer: str | None = None, cfg=None, progress: bool = True):
    """Stage: 2-D layout of the layer's activations (method.md §1.4–1.5) -> ``RUN/layout/<layer>``."""
    from .layout import LayoutConfig, compute_layout, load_layout, save_layout

    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = _check_layer(run, layer)
    cfg = cfg or LayoutConfig()
    record = {"collect": stage_hash(run_dir, "collect"), "layer": layer, "layout": _config_dict(cfg)}
    out = run_dir / "layout"

    def fn(resume):
        layout = compute_layout(run.activations(layer), cfg, progress=progress)
        save_layout(layout, out, layer)

    rep = _stage(run_dir, f"layout:{layer}", record, fn,
                 lambda: (out / f"{layer_dirname(layer)}.npy").is_file())
    return rep, load_layout(out, layer)


def run_grid(run_dir: str | Path, layer: str | None = None, levels: Sequence[int] = (10, 20, 40),
             min_count: int = 6, topk: int = 5, progress: bool = True):
    """Stage: multi-level grid over the layout (method.md §1.6–1.7, §2) -> ``RUN/grid/<layer>``.

    A level in which no cell reaches `min_count` samples is skipped with a warning (recorded in
    ``levels.json``); the others are built. No non-empty level at all is a UserError."""
    from .grid import grid_levels, load_grid, save_grid
    from .layout import load_layout

    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = _check_layer(run, layer)
    levels = sorted({int(g) for g in levels})
    if not levels or levels[0] < 1:
        raise UserError("grid levels must be positive integers, e.g. 10,20,40")
    record = {"layout": stage_hash(run_dir, f"layout:{layer}"), "levels": levels, "min_count": min_count,
              "topk": topk}
    out = run_dir / "grid"
    index = out / layer_dirname(layer) / "levels.json"

    def fn(resume):
        coords = load_layout(run_dir / "layout", layer).coords
        attr = run.attributions(layer)
        lv = grid_levels(coords, run.activations(layer), levels, attributions=attr, min_count=min_count, topk=topk)
        empty = {g.size: _empty_level_note(g.size, len(coords), min_count) for g in lv if len(g.i) == 0}
        kept = [g for g in lv if len(g.i)]
        if not kept:
            raise UserError(f"no grid level has a cell with at least {min_count} samples ({len(coords)} samples "
                            f"in all; levels {', '.join(map(str, levels))}): collect more images or more "
                            "positions per image, or use coarser levels")
        save_grid(kept, out, layer, run.class_names)
        write_json_atomic(index, {"requested": levels, "kept": [g.size for g in kept],
                                  "empty": {str(k): v for k, v in empty.items()}})

    def outputs_ok():
        if not index.is_file():
            return False
        kept = json.loads(index.read_text())["kept"]
        return all((out / layer_dirname(layer) / f"level-{g}.npz").is_file() for g in kept)

    rep = _stage(run_dir, f"grid:{layer}", record, fn, outputs_ok)
    for note in json.loads(index.read_text()).get("empty", {}).values():
        log.warning("%s", note)
    return rep, load_grid(out, layer)


def _empty_level_note(size: int, n: int, min_count: int) -> str:
    return (f"grid level {size} skipped: none of its {size}x{size} cells holds {min_count} or more of the "
            f"{n} samples; to fill it, collect more images or more positions per image (--per-image), "
            f"or use a coarser level")


def run_whiten(run_dir: str | Path, layer: str | None = None, ridge: float = 1e-2):
    """Stage: whitening matrix S of the layer (method.md §1.8) -> ``RUN/whiten/<layer>.npy``."""
    from .whiten import whitening_matrix

    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = _check_layer(run, layer)
    record = {"collect": stage_hash(run_dir, "collect"), "layer": layer, "ridge": ridge}
    path = run_dir / "whiten" / f"{layer_dirname(layer)}.npy"

    def fn(resume):
        w = whitening_matrix(run.activations(layer), ridge=ridge)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, np.asarray(getattr(w, "S", w), np.float32))
        tmp.replace(path)

    rep = _stage(run_dir, f"whiten:{layer}", record, fn, path.is_file)
    return rep, np.load(path)


def _load_spec(run: Run, device: str):
    from .models import load_model

    cfg = run.config
    load_args = cfg.get("model_info", {}).get("load_args", {})
    return load_model(cfg["model"], device=device, **load_args)


def run_render(run_dir: str | Path, layer: str | None = None, cfg=None, ridge: float = 1e-2, spec=None,
               progress: bool = True, engine: str = "local", address: str | None = None,
               threads: int | None = None):
    """Stage: one icon per kept cell of every level (method.md §1.9–1.11) -> ``RUN/icons/<layer>``.

    Icons are rendered and committed in batches (one ``.npz`` per batch, written atomically), each
    batch with its own seed, so an interrupted render resumes and yields the same icons.
    engine "local" renders the batches here, one after another; "ray" runs one Ray task per batch
    (`threads` CPUs each, or one GPU each with a CUDA device; `address`: the Ray cluster) and
    commits each as it finishes. Both call `render_icon_batch` with the same seeds.
    """
    from .grid import load_grid
    from .render import RenderConfig
    from .render.icons import render_icon_batch

    if engine not in ("local", "ray"):
        raise UserError(f"--engine must be local or ray, not {engine!r}")
    if engine == "ray":
        from .ray_engine import require_ray

        require_ray()

    run_dir = Path(run_dir)
    run = open_run(run_dir)
    layer = _check_layer(run, layer)
    cfg = cfg or RenderConfig.cpu_default()
    record = {"grid": stage_hash(run_dir, f"grid:{layer}"), "render": _config_dict(cfg)}
    S = None
    if cfg.whiten:
        wrep, S = run_whiten(run_dir, layer, ridge)
        record["whiten_hash"] = wrep.hash
    out = run_dir / "icons" / layer_dirname(layer)
    levels = load_grid(run_dir / "grid", layer)

    def batches(level):
        m = len(level.i)
        return [(b, slice(a, min(a + cfg.batch_size, m))) for b, a in enumerate(range(0, m, cfg.batch_size))]

    def done_path(level, b):
        return out / f"level-{level.size}" / f"batch-{b:05d}.npz"

    def commit(level, b, arrays):
        p = done_path(level, b)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp.npz")
        np.savez(tmp, images=arrays["images"], objective=arrays["objective"], fidelity=arrays["fidelity"])
        tmp.replace(p)

    def fn(resume):
        nonlocal spec
        if not resume and out.exists():
            shutil.rmtree(out)
        todo = [(lv, b, sl) for lv in levels for b, sl in batches(lv) if not done_path(lv, b).is_file()]
        if not todo:
            return
        if spec is None:
            spec = _load_spec(run, "cpu" if engine == "ray" else (cfg.device or "cpu"))
        module_layer = run.config["module_layers"][layer]
        from tqdm.auto import tqdm

        total = sum(sl.stop - sl.start for _, _, sl in todo)
        bar = tqdm(total=total, disable=not progress, unit="icon", desc=f"render {layer}")

        def seeded(lv, b):
            seed = int(config_hash({"seed": cfg.seed, "level": lv.size, "batch": b})[:8], 16)
            return dataclasses.replace(cfg, seed=seed)

        if engine == "ray":
            from .ray_engine import ray_render

            jobs = [((lv, b, sl), lv.mean_activation[sl], seeded(lv, b)) for lv, b, sl in todo]
            for (lv, b, sl), arrays in ray_render(spec, module_layer, jobs, S, device=cfg.device or "cpu",
                                                  threads=threads, address=address):
                commit(lv, b, arrays)
                bar.update(sl.stop - sl.start)
        else:
            from . import render as render_pkg

            for lv, b, sl in todo:
                commit(lv, b, render_icon_batch(spec, module_layer, lv.mean_activation[sl], seeded(lv, b), S,
                                                render=render_pkg.render_icons))
                bar.update(sl.stop - sl.start)
        bar.close()

    rep = _stage(run_dir, f"render:{layer}", record, fn,
                 lambda: all(done_path(lv, b).is_file() for lv in levels for b, _ in batches(lv)))
    icons = {}
    for lv in levels:
        parts = [np.load(done_path(lv, b)) for b, _ in batches(lv)]
        icons[lv.size] = {k: (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0))
                          for k in ("images", "objective", "fidelity")}
    return rep, icons, S


def best_member_fidelity(level, acts: np.ndarray, S: np.ndarray | None) -> np.ndarray:
    """[m] for each kept cell, the highest fidelity among its real member samples (the
    non-parametric comparison for the icons), computed over all members at once."""
    from .render import fidelity_of_activations

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


def run_assemble(run_dir: str | Path, layer: str, icons: dict, S: np.ndarray | None) -> tuple[Atlas, dict]:
    """Stage: canvases, per-level cell JSON and summary -> ``RUN/atlas/<layer>``.

    Always runs (it is cheap). Its ``atlas.json``, which marks an assembled atlas, is removed first
    and written last, so a failed assemble never leaves an earlier atlas to be exported as current."""
    from .grid import load_grid

    run_dir = Path(run_dir)
    run = open_run(run_dir)
    acts = run.activations(layer)
    adir = atlas_dir(run_dir, layer)
    result: dict = {}

    def fn(resume):
        (adir / "atlas.json").unlink(missing_ok=True)
        levels = []
        for g in load_grid(run_dir / "grid", layer):
            ic = icons[g.size]
            levels.append(AtlasLevel(size=g.size, i=g.i, j=g.j, count=g.count, top_classes=g.top_classes,
                                     top_values=g.top_values, icons=ic["images"], fidelity=ic["fidelity"],
                                     member_fidelity=best_member_fidelity(g, acts, S)))
        atlas = Atlas(layer, levels, run.class_names, run_dir=run_dir)
        result["atlas"], result["pngs"] = atlas, atlas.save(adir)

    record = {"render": read_manifest(run_dir).get("stages", {}).get(f"render:{layer}", {}).get("hash")}
    _stage(run_dir, f"assemble:{layer}", record, fn, lambda: False, force=True)
    return result["atlas"], result["pngs"]


def build(model: str, images, out: str | Path, layer: str | None = None, limit: int | None = None,
          levels: Sequence[int] = (10, 20, 40), collect_cfg: CollectConfig | None = None, layout_cfg=None,
          render_cfg=None, min_count: int = 6, weights: str | None = None,
          sha256: str | None = None, device: str = "cpu", progress: bool = True, engine: str = "local",
          address: str | None = None, threads: int | None = None,
          model_kwargs: dict | None = None) -> BuildResult:
    """The whole atlas with one call: collect -> layout -> grid -> render -> assemble.

    Stages whose inputs and config are unchanged are skipped; interrupted stages resume.
    engine "ray" runs collect and render on Ray (`address`: the cluster; see `ray_engine`).
    """
    from .data import images as make_images
    from .models import load_model

    out = Path(out)
    if engine == "ray":
        from .ray_engine import require_ray

        require_ray()
    else:
        from .devices import resolve_device

        resolve_device(device)
    # with Ray the workers hold the model on their devices; the driver keeps a CPU copy
    spec = load_model(model, weights=weights, sha256=sha256, device="cpu" if engine == "ray" else device,
                      **(model_kwargs or {}))
    source = make_images(images) if not hasattr(images, "load") else images
    ccfg = collect_cfg or CollectConfig()
    ccfg = dataclasses.replace(ccfg, layers=(layer,) if layer else ccfg.layers, limit=limit or ccfg.limit,
                               device=device, engine=engine, address=address,
                               threads=ccfg.threads or threads)
    t0 = time.perf_counter()
    ensure_dir(out, "run directory")
    with run_lock(out, "build"):
        res = collect(spec, source, out, ccfg, progress=progress)
        reports = [StageReport("collect", not res.already_complete,
                               0.0 if res.already_complete else res.seconds, stage_hash(out, "collect"))]
        run = open_run(out)
        layer = run.layers[0] if layer is None else layer
        rep, _ = run_layout(out, layer, layout_cfg, progress=progress)
        reports.append(rep)
        rep, grid = run_grid(out, layer, levels, min_count=min_count, progress=progress)
        reports.append(rep)
        rep, icons, S = run_render(out, layer, render_cfg, spec=spec, progress=progress, engine=engine,
                                   address=address, threads=threads)
        reports.append(rep)
        ta = time.perf_counter()
        atlas, pngs = run_assemble(out, layer, icons, S)
        reports.append(StageReport("assemble", True, time.perf_counter() - ta, ""))
        manifest = read_manifest(out)
        stage_seconds = {k: v.get("seconds") for k, v in manifest.get("stages", {}).items()}
        summary = {
            "run_dir": str(out), "layer": layer, "model": run.config["model"],
            "samples": int(sum(run.summary["rows"].values())),
            "levels": [{"size": lv.size, "cells": int(len(lv.i)), "samples_used": int(lv.count.sum()),
                        "icon_fidelity": float(lv.fidelity.mean()) if len(lv.i) else None,
                        "member_fidelity": float(lv.member_fidelity.mean()) if len(lv.i) else None}
                       for lv in atlas.levels],
            "mean_icon_fidelity": _mean([lv.fidelity for lv in atlas.levels]),
            "mean_member_fidelity": _mean([lv.member_fidelity for lv in atlas.levels]),
            "stages_run": [r.name for r in reports if r.ran],
            "seconds_this_call": {r.name: round(r.seconds, 3) for r in reports},
            "seconds_recorded": stage_seconds,
            "seconds": round(time.perf_counter() - t0, 3),
            "pngs": {str(g): str(p) for g, p in pngs.items()},
        }
        atlas.summary = summary
        write_json_atomic(atlas_dir(out, layer) / "atlas.json",
                          {"layer": layer, "levels": [lv.size for lv in atlas.levels],
                           "class_names": atlas.class_names, "summary": summary})
        write_json_atomic(out / "summary.json", summary)
    return BuildResult(out, layer, reports, atlas, pngs, summary)


def _mean(arrays: list[np.ndarray]) -> float | None:
    arr = np.concatenate([np.asarray(a, np.float64) for a in arrays]) if arrays else np.zeros(0)
    return float(arr.mean()) if len(arr) else None
