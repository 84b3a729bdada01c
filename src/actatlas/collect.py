"""Activation collection with per-class attribution (method.md §1.1–1.3): the driver.

`collect` runs an engine over the images (the local one here, or Ray's), writes the rows into the
resumable store shard by shard and merges them when all are in. It runs as the "collect" stage of the
stage engine (skip, resume, lock, never complete on failure). The batch function and the settings
live in `actatlas.collect_batch` and are re-exported here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .version import __version__
from .data import ImageSource
from .devices import resolve_device
from .errors import ConfigError, DataError
from .models.spec import ModelSpec
from .collect_batch import (ATTRIBUTIONS, AMP_MIN_COSINE, ENGINES, POSITIONS, BatchOutput,  # noqa: F401  (re-exported)
                            CollectConfig, amp_context, check_alignable, check_shared_layers, layer_shapes, local_batches,
                            locations_to_positions, make_plan, position_warnings, process_batch, resolve_layers,
                            sample_positions, shared_locations, store_widths)
from .stages import config_hash, run_stage, update_manifest
from .store import (ShardWriter, committed_shards, consolidate, ensure_dir, remove_shards,
                    write_json_atomic)

log = logging.getLogger(__name__)

@dataclass
class CollectResult:
    """Summary of a collect call (also the CLI's --json object)."""

    run_dir: Path
    rows: int
    rows_per_layer: dict[str, int]
    images: int
    skipped: int
    seconds: float
    images_per_s: float
    resumed_shards: int
    already_complete: bool

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d



def _config(cfg: CollectConfig | None, options: dict) -> CollectConfig:
    cfg = cfg or CollectConfig()
    if options:
        unknown = set(options) - {f.name for f in dataclasses.fields(CollectConfig)}
        if unknown:
            raise TypeError(f"unknown collect option(s): {sorted(unknown)}")
        if isinstance(options.get("layers"), str):
            options["layers"] = (options["layers"],)
        cfg = dataclasses.replace(cfg, **options)
    cfg.validate()
    return cfg


def _record(spec: ModelSpec, source: ImageSource, cfg: CollectConfig, layers: dict[str, str]) -> dict:
    """The settings that determine the stored rows (the collect stage's hash)."""
    record = {
        "model": spec.name, "model_info": spec.info, "num_classes": spec.num_classes,
        "module_layers": layers, "images": source.description, "images_fingerprint": source.fingerprint(),
        **{k: getattr(cfg, k) for k in CollectConfig.RESULT_FIELDS},
    }
    record["layers"] = list(record["layers"])
    if cfg.amp:  # only then, so runs without it keep their hash
        record["amp"] = True
    if cfg.smooth_maxpool:
        record["smooth_maxpool"] = True
    if cfg.shared_locations:
        record["shared_locations"] = True
    return record


def collect(spec: ModelSpec, source: ImageSource, out: str | Path, cfg: CollectConfig | None = None, *,
            progress: bool = True, overwrite: bool = False, **options) -> CollectResult:
    """Collect activations (+ attributions, provenance) of `source` into run directory `out`.

    `options` override fields of `cfg` (e.g. ``layers=["blocks.8"], attributions="none"``).

    Resumable: rerunning with the same arguments after a crash or kill continues from the last
    committed shard and yields exactly the rows of an uninterrupted run. A second concurrent
    collect into the same directory is refused (the run's lock, through `run_stage`).
    """
    cfg = _config(cfg, options)
    resolve_device("cpu" if cfg.engine == "ray" and str(cfg.device).startswith("cuda") else cfg.device)
    if cfg.engine == "ray":
        from .ray_engine import require_ray

        require_ray()
    t0 = time.perf_counter()
    out = Path(out)
    layers = resolve_layers(spec, cfg.layers)
    cfg = dataclasses.replace(cfg, layers=tuple(layers))
    if cfg.limit is not None:
        source = source.head(cfg.limit)
    if len(source) == 0:
        raise DataError("the image source is empty")
    record = _record(spec, source, cfg, layers)
    if cfg.shared_locations:   # refused before anything is written
        check_alignable(spec, layers)
    ensure_dir(out, "run directory")
    store_dir = ensure_dir(out / "collect", "store directory")
    result: list[CollectResult] = []

    def conflict(prev: dict) -> None:
        if not overwrite:
            old = prev.get("config", {})
            diff = sorted(k for k in set(record) | set(old) if old.get(k) != record.get(k))
            why = ""
            if cfg.shared_locations and not old.get("shared_locations"):
                why = (" (it was collected without shared locations, so its layers' rows are not the same image "
                       "locations and cannot be aligned; collect the layers to align again with "
                       "shared_locations, into another run directory)")
            raise ConfigError(f"{out} already holds a collect with a different config (differs in: "
                              f"{', '.join(diff)}){why}; overwrite it or use another run directory")
        for p in store_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def fn(resume: bool) -> None:
        update_manifest(out, actatlas_version=__version__)
        result.append(_collect_into(spec, source, store_dir, cfg, layers, record, progress, t0))

    rep = run_stage(out, "collect", record, fn, (store_dir / "complete.json").is_file, conflict=conflict)
    if rep.ran:
        return result[0]
    summary = json.loads((store_dir / "complete.json").read_text())
    return CollectResult(out, sum(summary["rows"].values()), summary["rows"], summary["images"],
                         len(summary["skipped"]), time.perf_counter() - t0, 0.0, 0, True)


def _collect_into(spec: ModelSpec, source: ImageSource, store_dir: Path, cfg: CollectConfig,
                  layers: dict[str, str], record: dict, progress: bool, t0: float) -> CollectResult:
    """Run the engine over the shards not yet committed, then merge them into the store."""
    n_images = len(source)
    # the Ray engine's workers load their own copy; the driver only needs the layer shapes
    device = resolve_device(cfg.device) if cfg.engine == "local" else spec.device
    spec.to_device(device)
    shapes = layer_shapes(spec, list(layers.values()), device)
    label_shapes = {label: shapes[m] for label, m in layers.items()}
    for msg in position_warnings(label_shapes, cfg):
        log.warning("%s", msg)
    n_shards = (n_images + cfg.shard_size - 1) // cfg.shard_size
    done = committed_shards(store_dir)
    todo = [s for s in range(n_shards) if s not in done]
    if done:
        log.info("resuming: %d of %d shards already committed", len(done), n_shards)
    processed = _write_shards(spec, source, store_dir, cfg, layers, shapes, todo, progress)
    seconds_compute = time.perf_counter() - t0
    merged = consolidate(store_dir, list(layers), n_shards)
    n_skipped = len(merged["skipped"])
    if n_skipped == n_images:
        listing = store_dir / "skipped.json"
        write_json_atomic(listing, merged["skipped"])
        first = merged["skipped"][0]["reason"] if merged["skipped"] else ""
        raise DataError(f"no readable images: {n_skipped} files skipped, see {listing} (first: {first})")
    write_json_atomic(store_dir / "complete.json", {
        "config": {**record, "layers": list(layers)}, "hash": config_hash(record),
        "class_names": spec.class_names, "wnids": spec.wnids, "preprocess": spec.preprocess.to_dict(),
        "rows": merged["rows"], "images": n_images - n_skipped, "skipped": merged["skipped"],
        "layer_shapes": {label: list(shp) for label, shp in label_shapes.items()},
    })
    remove_shards(store_dir)
    ips = processed / seconds_compute if processed else 0.0
    return CollectResult(store_dir.parent, sum(merged["rows"].values()), merged["rows"], n_images - n_skipped,
                         n_skipped, time.perf_counter() - t0, ips, len(done), False)


def _write_shards(spec: ModelSpec, source: ImageSource, store_dir: Path, cfg: CollectConfig,
                  layers: dict[str, str], shapes: dict[str, tuple[int, ...]], todo: list[int],
                  progress: bool) -> int:
    """Process the images of shards `todo` with the configured engine and commit each shard as soon
    as its last batch is in. Returns the number of images processed."""
    n_images = len(source)
    labels = source.labels(spec.class_names, spec.wnids)
    paths = [it.path for it in source]
    widths = store_widths({label: shapes[m] for label, m in layers.items()}, spec.num_classes, cfg)
    plan = make_plan(todo, n_images, cfg)
    remaining = sum(min(cfg.shard_size, n_images - s * cfg.shard_size) for s in todo)
    bar = tqdm(total=remaining, disable=not progress, unit="img", desc=f"collect {','.join(layers)}")
    if cfg.engine == "ray":
        from .ray_engine import ray_batches

        outputs = ray_batches(spec, layers, shapes, source, plan, cfg, progress=progress)
    else:
        outputs = local_batches(spec, layers, shapes, source, plan, cfg)
    writer: ShardWriter | None = None
    expected = processed = 0
    for out_b in outputs:
        if out_b.bi != expected:  # an engine must deliver every planned batch once, in order
            raise RuntimeError(f"engine {cfg.engine!r} delivered batch {out_b.bi}, expected {expected}")
        expected += 1
        shard = out_b.shard
        if writer is None or writer.shard_id != shard:
            writer = ShardWriter(store_dir, shard, shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, n_images),
                                 list(layers), np.dtype(cfg.activation_dtype), widths)
        for i, err in out_b.skipped:
            log.warning("skipping %s", err)
            writer.skip(i, paths[i], err)
        for label, lb in (out_b.layers or {}).items():
            writer.add(label, lb)
        processed += out_b.requested
        bar.update(out_b.requested)
        if out_b.bi + 1 == len(plan) or plan[out_b.bi + 1][0] != shard:
            writer.commit(paths, labels)
    if expected != len(plan):
        raise RuntimeError(f"engine {cfg.engine!r} delivered {expected} of {len(plan)} batches")
    bar.close()
    return processed


__all__ = ["collect", "CollectResult", "CollectConfig", "process_batch", "sample_positions", "shared_locations",
           "locations_to_positions", "check_shared_layers", "check_alignable", "resolve_layers",
           "layer_shapes", "BatchOutput", "local_batches", "make_plan", "amp_context", "position_warnings",
           "store_widths", "POSITIONS", "ATTRIBUTIONS", "ENGINES", "AMP_MIN_COSINE"]
