"""Activation collection with per-class attribution (method.md §1.1–1.3).

For every image, K spatial positions are sampled per layer; the activation vector h at each position
is stored together with its attribution to every class,

    attr_c = h · d logit_c / d h          (the gradient taken at that position, image context fixed)

computed for all classes at once as one forward-mode Jacobian-vector product: the tangent is h itself
at the sampled position and zero elsewhere, so the tangent of the logits is exactly attr (method.md
§1.3, the reference code's ``fwd_gradients``). One dual forward per (layer, position slot) replaces a
loop over 1000 classes.

`process_batch` is the engine-independent batch function; `collect` is the local engine around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from tqdm.auto import tqdm

from . import __version__
from .batches import iter_batches
from .data import ImageSource
from .devices import resolve_device
from .errors import UserError
from .hooks import capture
from .models.layers import smooth_maxpool_gradients
from .models.spec import ModelSpec
from .run import Run, read_manifest
from .store import (LayerBatch, ShardWriter, committed_shards, consolidate, ensure_dir, remove_shards,
                    run_lock, write_json_atomic)

log = logging.getLogger(__name__)

POSITIONS = ("random", "center", "all")
AMP_MIN_COSINE = 0.98   # per-row cosine of --amp activations to float32 (the documented tolerance)
ENGINES = ("local", "ray")
ATTRIBUTIONS = ("full", "topk", "none")


@dataclass(frozen=True)
class CollectConfig:
    """Settings of one collection.

    layers: layer names or aliases; None -> the model's default layer.
    positions: "random" (K positions per image, at least `border` away from the edges; the article
        uses one random position and avoids the edges, method.md §1.2), "center" or "all".
    per_image: K for "random".
    attributions: "full" (float16 [n, classes]), "topk" (the `topk` largest per row) or "none".
    limit: use only the first N images of the source (sorted path order).
    shard_size: images per committed shard (the unit of resume).
    activation_dtype: "float32" or "float16" on disk.
    amp: run the collection forward under autocast (float16 on CUDA, bfloat16 elsewhere); only with
        attributions "none". Tolerance (docs/scale.md): each activation row within cosine
        `AMP_MIN_COSINE` of float32 (bfloat16 on CPU measured >= 0.988 on EfficientNet-Lite0
        blocks.8, top-1 unchanged). Attributions through a half-precision JVP were far off (cosine
        down to 0.67), so they always run in float32. Part of the config hash.
    engine: "local" (this process; the default) or "ray" (Ray Data: decode actors streaming into
        model actors, one per GPU when the cluster has GPUs). Both run `process_batch` and give
        the same rows.
    address: Ray cluster address for engine "ray" (None: start or reuse a local Ray).
    ray_actors: model actors for engine "ray" (None: one per GPU, else as many CPU actors as fit).
    smooth_maxpool: attributions through max-pools use the article's continuous relaxation of the
        max-pool gradient (d/dx of avg_pool(x^2) / (1e-2 + avg_pool(|x|)), method.md §1.3) instead
        of the exact one; only models built from `MaxPool2dSame` (InceptionV1) have such pools.
        Activations and logits are unchanged. Part of the config hash when on.
    """

    layers: tuple[str, ...] | None = None
    positions: str = "random"
    per_image: int = 1
    border: int = 1
    attributions: str = "full"
    topk: int = 10
    seed: int = 0
    limit: int | None = None
    batch_size: int = 32
    shard_size: int = 256
    device: str = "cpu"
    threads: int | None = None
    loader_threads: int = 2
    activation_dtype: str = "float32"
    amp: bool = False
    engine: str = "local"
    address: str | None = None
    ray_actors: int | None = None
    smooth_maxpool: bool = False

    def validate(self) -> None:
        if self.positions not in POSITIONS:
            raise UserError(f"--positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if self.attributions not in ATTRIBUTIONS:
            raise UserError(f"--attributions must be one of {', '.join(ATTRIBUTIONS)}, not {self.attributions!r}")
        for name in ("per_image", "batch_size", "shard_size", "topk", "loader_threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1")
        if self.border < 0:
            raise UserError("border must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be >= 1")
        if self.activation_dtype not in ("float32", "float16"):
            raise UserError("activation dtype must be float32 or float16")
        if self.engine not in ENGINES:
            raise UserError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.amp and self.attributions != "none":
            raise UserError("--amp applies to the plain forward only: use it with --attributions none "
                            "(attributions through a half-precision forward-mode pass were too inexact; "
                            "see docs/scale.md)")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise UserError("ray actors must be >= 1")

    # Fields that change the stored rows; the others (batch size, device, threads) do not.
    RESULT_FIELDS = ("layers", "positions", "per_image", "border", "attributions", "topk", "seed", "limit",
                     "shard_size", "activation_dtype")


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


# ----------------------------------------------------------------------------------------------
# positions


def sample_positions(h: int, w: int, image_index: int, layer: str, cfg: CollectConfig) -> np.ndarray:
    """[K, 2] (y, x) positions in a layer map of size h x w for one image.

    Deterministic in (seed, image index, layer) only, so a resumed or re-batched run samples the
    same positions. "random" draws K distinct positions from the interior (``border`` cells away
    from each edge, or the whole map when it is too small).
    """
    if cfg.positions == "center":
        return np.array([[h // 2, w // 2]], dtype=np.int64)
    if cfg.positions == "all":
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)
    b = cfg.border
    y0, y1, x0, x1 = (b, h - b, b, w - b) if (h - 2 * b >= 1 and w - 2 * b >= 1) else (0, h, 0, w)
    n_cand = (y1 - y0) * (x1 - x0)
    k = min(cfg.per_image, n_cand)
    rng = np.random.default_rng([cfg.seed, image_index, zlib.crc32(layer.encode())])
    flat = rng.choice(n_cand, size=k, replace=False)
    return np.stack([y0 + flat // (x1 - x0), x0 + flat % (x1 - x0)], axis=1).astype(np.int64)


def position_warnings(shapes: dict[str, tuple[int, ...]], cfg: CollectConfig) -> list[str]:
    """One line per setting that the layers' map sizes silently override (label -> [c, h, w] / [d])."""
    msgs = []
    for label, shp in shapes.items():
        if len(shp) != 3 or cfg.positions != "random":
            continue
        h, w = shp[1], shp[2]
        b = cfg.border
        interior = h - 2 * b >= 1 and w - 2 * b >= 1
        if not interior:
            msgs.append(f"border {b} leaves no interior in layer {label} ({h}x{w}); positions are drawn from "
                        f"the whole map (valid border for this layer: 0..{(min(h, w) - 1) // 2})")
        n_cand = (h - 2 * b) * (w - 2 * b) if interior else h * w
        if cfg.per_image > n_cand:
            msgs.append(f"per-image {cfg.per_image} exceeds the {n_cand} distinct positions of layer {label} "
                        f"({h}x{w}, border {b if interior else 0}); using {n_cand} per image "
                        f"(valid: 1..{n_cand})")
    return msgs


def store_widths(shapes: dict[str, tuple[int, ...]], num_classes: int, cfg: CollectConfig) -> dict:
    """label -> {array name: row width} of what the store keeps for each layer."""
    out = {}
    for label, shp in shapes.items():
        w = {"activations": int(shp[0])}
        if cfg.attributions == "full":
            w["attributions"] = int(num_classes)
        elif cfg.attributions == "topk":
            w["attr_index"] = w["attr_value"] = int(min(cfg.topk, num_classes))
        out[label] = w
    return out


def layer_shapes(spec: ModelSpec, module_names: Sequence[str], device) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of each module at the model's input size."""
    s = spec.input_size
    with torch.inference_mode(), capture(spec.module, module_names) as got:
        spec.module(torch.zeros(1, 3, s, s, device=device))
    missing = [m for m in module_names if m not in got]
    if missing:
        raise UserError(f"layer(s) {missing} produced no output in a forward pass of {spec.name}")
    shapes = {}
    for m in module_names:
        out = got[m]
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
            raise UserError(f"layer {m!r} outputs {type(out).__name__} of shape "
                            f"{getattr(out, 'shape', '?')}; need [b, c, h, w] or [b, d]")
        shapes[m] = tuple(out.shape[1:])
    return shapes


# ----------------------------------------------------------------------------------------------
# the batch function (shared by every engine)


def amp_context(device: torch.device, enabled: bool):
    """Autocast for the collection forward: float16 on CUDA, bfloat16 elsewhere; a no-op when off."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def process_batch(spec: ModelSpec, layers: dict[str, str], shapes: dict[str, tuple[int, ...]],
                  batch: torch.Tensor, image_index: np.ndarray, cfg: CollectConfig) -> dict[str, LayerBatch]:
    """Activations, attributions and predictions for one batch.

    Args:
        layers: label -> dotted module name.
        shapes: dotted module name -> output shape without batch ([c, h, w] or [d]).
        batch: uint8 [b, 3, s, s] (the preprocess geometry already applied).
        image_index: [b] indices of the images in the source.
    Returns:
        label -> LayerBatch with b*K rows, image-major (all K positions of image 0 first).
    """
    device = next(iter(spec.module.parameters()), torch.zeros(0)).device
    x = spec.preprocess.normalize(batch.to(device))
    if spec.info.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    bsz = x.shape[0]
    # positions per (module, image): [b, K, 2]
    pos: dict[str, torch.Tensor] = {}
    for label, mod in layers.items():
        shp = shapes[mod]
        h, w = (shp[1], shp[2]) if len(shp) == 3 else (1, 1)
        p = np.stack([sample_positions(h, w, int(i), label, cfg) for i in image_index])
        pos[mod] = torch.as_tensor(p, device=device)
    mods = list(dict.fromkeys(layers.values()))
    gathered: dict[str, torch.Tensor] = {}

    def gather(out: torch.Tensor, mod: str) -> torch.Tensor:
        """[b, K, c] activation vectors at the sampled positions (a copy)."""
        primal = fwAD.unpack_dual(out).primal.detach()
        if primal.dim() == 2:
            return primal[:, None, :].float().clone()
        p = pos[mod]
        b = torch.arange(bsz, device=device)[:, None]
        return primal[b, :, p[..., 0], p[..., 1]].float().clone()

    def run(target: str | None = None, slot: int = 0):
        """One forward; with `target`, a dual forward whose logit tangents are the attributions of
        position slot `slot` of layer `target`."""

        def transform(mod, out):
            if mod not in gathered:
                gathered[mod] = gather(out, mod)
            if mod != target:
                return None
            tangent = torch.zeros_like(out)
            if out.dim() == 2:
                tangent.copy_(out.detach())
            else:
                p = pos[mod][:, slot]
                b = torch.arange(bsz, device=device)
                tangent[b, :, p[:, 0], p[:, 1]] = out.detach()[b, :, p[:, 0], p[:, 1]]
            return fwAD.make_dual(out, tangent)

        with capture(spec.module, mods, transform=transform):
            if target is None:
                with torch.inference_mode(), amp_context(device, cfg.amp):
                    return spec.module(x).float(), None
            with torch.no_grad(), fwAD.dual_level(), \
                    smooth_maxpool_gradients(spec.module, cfg.smooth_maxpool):  # float32 always (no amp)
                y = spec.module(x)
                unpacked = fwAD.unpack_dual(y)
                tan = unpacked.tangent
                if tan is None:  # the logits do not depend on this layer
                    tan = torch.zeros_like(unpacked.primal)
                return unpacked.primal.float().clone(), tan.float().clone()

    attrs: dict[str, torch.Tensor] = {}  # mod -> [b, K, classes]
    if cfg.attributions == "none":
        logits, _ = run()
    else:
        logits = None
        for mod in mods:
            k_slots = pos[mod].shape[1]
            per_slot = []
            for k in range(k_slots):
                lg, tan = run(mod, k)
                logits = lg if logits is None else logits
                per_slot.append(tan)
            attrs[mod] = torch.stack(per_slot, dim=1)
    probs = torch.softmax(logits, dim=1)
    top_p, top_i = probs.topk(min(5, probs.shape[1]), dim=1)
    if top_i.shape[1] < 5:  # models with fewer than 5 classes: pad with -1 / 0
        pad = 5 - top_i.shape[1]
        top_i = torch.cat([top_i, torch.full((bsz, pad), -1, device=device)], 1)
        top_p = torch.cat([top_p, torch.zeros(bsz, pad, device=device)], 1)
    result = {}
    for label, mod in layers.items():
        acts = gathered[mod]                       # [b, K, c]
        k_slots = acts.shape[1]
        p = pos[mod].cpu().numpy()
        rep = lambda t: np.repeat(t.cpu().numpy(), k_slots, axis=0)  # noqa: E731
        lb = LayerBatch(
            activations=acts.reshape(bsz * k_slots, -1).cpu().numpy(),
            image=np.repeat(np.asarray(image_index, np.int64), k_slots),
            y=p[..., 0].reshape(-1).astype(np.int16), x=p[..., 1].reshape(-1).astype(np.int16),
            top5=rep(top_i).astype(np.int32), top5_prob=rep(top_p).astype(np.float32))
        if mod in attrs:
            a = attrs[mod].reshape(bsz * k_slots, -1)
            if cfg.attributions == "full":
                lb.attributions = a.cpu().numpy().astype(np.float16)
            else:
                v, i = a.topk(min(cfg.topk, a.shape[1]), dim=1)
                lb.attr_index, lb.attr_value = i.cpu().numpy().astype(np.int32), v.cpu().numpy()
        result[label] = lb
    return result


# ----------------------------------------------------------------------------------------------
# engines: each turns the plan into BatchOutputs, in plan order, through `process_batch`


@dataclass
class BatchOutput:
    """What an engine hands the driver for planned batch number `bi` (of shard `shard`):
    `requested` images, those that failed to decode (`skipped`: (index, reason)) and the rows of the
    others per layer label (None when none decoded)."""

    bi: int
    shard: int
    requested: int
    skipped: list[tuple[int, str]]
    layers: dict[str, LayerBatch] | None


def local_batches(spec: ModelSpec, layers: dict[str, str], shapes: dict[str, tuple[int, ...]],
                  source: ImageSource, plan: list[tuple[int, range]], cfg: CollectConfig):
    """The local engine: decode on `cfg.loader_threads` threads a few batches ahead, run the model
    here. Yields one BatchOutput per entry of `plan`, in order."""
    for bi, batch in enumerate(iter_batches(source, spec.preprocess, plan, threads=cfg.loader_threads)):
        res = (process_batch(spec, layers, shapes, batch.pixels, batch.index, cfg)
               if batch.pixels is not None else None)
        yield BatchOutput(bi, int(batch.key), batch.requested, batch.skipped, res)


def make_plan(todo: Sequence[int], n_images: int, cfg: CollectConfig) -> list[tuple[int, range]]:
    """[(shard, image indices)] batches of `cfg.batch_size`, never crossing a shard boundary."""
    return [(s, range(a, min(a + cfg.batch_size, (s + 1) * cfg.shard_size, n_images)))
            for s in todo
            for a in range(s * cfg.shard_size, min((s + 1) * cfg.shard_size, n_images), cfg.batch_size)]


# ----------------------------------------------------------------------------------------------
# the driver (writes the store for every engine)


def _model_device(spec: ModelSpec) -> torch.device:
    p = next(iter(spec.module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_layers(spec: ModelSpec, layers: Sequence[str] | None) -> dict[str, str]:
    """label -> dotted module name; the model's default layer when `layers` is empty."""
    names = list(layers) if layers else [spec.default_layer]
    if len(set(names)) != len(names):
        raise UserError(f"--layers lists a layer twice: {names}")
    return {n: spec.resolve_layer(n) for n in names}


def config_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def collect(spec: ModelSpec, source: ImageSource, out: str | Path, cfg: CollectConfig | None = None, *,
            progress: bool = True, overwrite: bool = False, **options) -> CollectResult:
    """Collect activations (+ attributions, provenance) of `source` into run directory `out`.

    `options` override fields of `cfg` (e.g. ``layers=["blocks.8"], attributions="none"``).

    Resumable: rerunning with the same arguments after a crash or kill continues from the last
    committed shard and yields exactly the rows of an uninterrupted run. A second concurrent
    collect into the same directory is refused.
    """
    cfg = cfg or CollectConfig()
    if options:
        unknown = set(options) - {f.name for f in dataclasses.fields(CollectConfig)}
        if unknown:
            raise TypeError(f"unknown collect option(s): {sorted(unknown)}")
        if isinstance(options.get("layers"), str):
            options["layers"] = (options["layers"],)
        cfg = dataclasses.replace(cfg, **options)
    cfg.validate()
    if cfg.engine == "ray":
        from .ray_engine import require_ray

        require_ray()
        resolve_device("cpu" if str(cfg.device).startswith("cuda") else cfg.device)  # GPUs are the workers'
    else:
        resolve_device(cfg.device)
    t0 = time.perf_counter()
    out = Path(out)
    layers = resolve_layers(spec, cfg.layers)
    cfg = dataclasses.replace(cfg, layers=tuple(layers))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.limit is not None:
        source = source.head(cfg.limit)
    n_images = len(source)
    if n_images == 0:
        raise UserError("the image source is empty")
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
    chash = config_hash(record)
    ensure_dir(out, "run directory")
    store_dir = ensure_dir(out / "collect", "store directory")
    with run_lock(out, "collect"):
        manifest = read_manifest(out)
        prev = manifest.get("stages", {}).get("collect")
        if prev is not None and prev.get("hash") != chash:
            if not overwrite:
                diff = sorted(k for k in record if prev.get("config", {}).get(k) != record[k])
                raise UserError(f"{out} already holds a collect with a different config (differs in: "
                                f"{', '.join(diff)}); use --overwrite or another --out")
            for p in store_dir.iterdir():
                if p.name != ".lock":
                    (p.unlink() if p.is_file() else __import__("shutil").rmtree(p))
            prev = None
        if prev is not None and prev.get("status") == "complete" and (store_dir / "complete.json").is_file():
            summary = json.loads((store_dir / "complete.json").read_text())
            return CollectResult(out, sum(summary["rows"].values()), summary["rows"], summary["images"],
                                 len(summary["skipped"]), time.perf_counter() - t0, 0.0, 0, True)
        manifest.setdefault("stages", {})["collect"] = {"hash": chash, "config": record, "status": "running"}
        manifest["actatlas_version"] = __version__
        write_json_atomic(out / "manifest.json", manifest)

        # the Ray engine's workers load their own copy; the driver only needs the layer shapes
        device = resolve_device(cfg.device) if cfg.engine == "local" else _model_device(spec)
        spec.to_device(device)
        shapes = layer_shapes(spec, list(layers.values()), device)
        for msg in position_warnings({label: shapes[m] for label, m in layers.items()}, cfg):
            log.warning("%s", msg)
        widths = store_widths({label: shapes[m] for label, m in layers.items()}, spec.num_classes, cfg)
        labels = source.labels(spec.class_names, spec.wnids)
        paths = [it.path for it in source]
        n_shards = (n_images + cfg.shard_size - 1) // cfg.shard_size
        done = committed_shards(store_dir)
        todo = [s for s in range(n_shards) if s not in done]
        remaining = sum(min(cfg.shard_size, n_images - s * cfg.shard_size) for s in todo)
        if done:
            log.info("resuming: %d of %d shards already committed", len(done), n_shards)
        processed = 0
        bar = tqdm(total=remaining, disable=not progress, unit="img", desc=f"collect {','.join(layers)}")
        plan = make_plan(todo, n_images, cfg)
        if cfg.engine == "ray":
            from .ray_engine import ray_batches

            outputs = ray_batches(spec, layers, shapes, source, plan, cfg, progress=progress)
        else:
            outputs = local_batches(spec, layers, shapes, source, plan, cfg)
        writer: ShardWriter | None = None
        expected = 0
        for out_b in outputs:
            if out_b.bi != expected:  # an engine must deliver every planned batch once, in order
                raise RuntimeError(f"engine {cfg.engine!r} delivered batch {out_b.bi}, expected {expected}")
            expected += 1
            shard = out_b.shard
            if writer is None or writer.shard_id != shard:
                writer = ShardWriter(store_dir, shard, shard * cfg.shard_size,
                                     min((shard + 1) * cfg.shard_size, n_images), list(layers),
                                     np.dtype(cfg.activation_dtype), widths)
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
        seconds_compute = time.perf_counter() - t0
        merged = consolidate(store_dir, list(layers), n_shards)
        n_skipped = len(merged["skipped"])
        if n_skipped == n_images:
            listing = store_dir / "skipped.json"
            write_json_atomic(listing, merged["skipped"])
            first = merged["skipped"][0]["reason"] if merged["skipped"] else ""
            raise UserError(f"no readable images: {n_skipped} files skipped, see {listing} "
                            f"(first: {first})")
        summary = {
            "config": {**record, "layers": list(layers)}, "hash": chash,
            "class_names": spec.class_names, "wnids": spec.wnids,
            "rows": merged["rows"], "images": n_images - n_skipped, "skipped": merged["skipped"],
            "layer_shapes": {label: list(shapes[m]) for label, m in layers.items()},
        }
        write_json_atomic(store_dir / "complete.json", summary)
        remove_shards(store_dir)
        seconds = time.perf_counter() - t0
        manifest["stages"]["collect"].update(status="complete", seconds=round(seconds, 3))
        write_json_atomic(out / "manifest.json", manifest)
    ips = processed / seconds_compute if processed else 0.0
    return CollectResult(out, sum(merged["rows"].values()), merged["rows"], n_images - n_skipped, n_skipped,
                         seconds, ips, len(done), False)


def open_collected(out: str | Path) -> Run:
    from .run import open_run

    return open_run(out)
