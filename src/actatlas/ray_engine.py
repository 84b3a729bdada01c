"""The Ray engine: collection through Ray Data, icon rendering through Ray tasks (design.md "scale-out").

Collection (``collect(..., engine="ray")``)::

    plan rows (one per planned batch) --map_batches--> decode actors (CPU, thread pool each)
        --map_batches--> model actors (load the model once; one per GPU, or CPU actors)
        --> the driver, which reorders by batch number and writes shards in order

Both stages run the local engine's own functions (`batches.decode_batch`, `collect.process_batch`)
on the same planned batches, so the rows equal the local engine's. Payloads travel as pickled bytes
columns (variable-sized batches, several arrays per layer). Fault tolerance: Ray Data's actor pools
run with ``max_restarts=-1`` and ``max_task_retries=-1`` (its defaults; we do not override them), so
a model actor that dies is restarted, reloads the model, and its unfinished batches are retried. The
driver keeps only the first result of every batch number and refuses to commit a shard that misses
one, so every row lands in the store exactly once.

Rendering (``run_render(..., engine="ray")``): one Ray task per icon batch (``max_retries`` for a
dead worker), each calling `render.icons.render_icon_batch` with the batch's own seed; the driver
commits each batch's ``.npz`` as it arrives. Same seeds and batches, hence the same icons.

Ray is an optional extra (``pip install "actatlas[ray]"``); this module imports it lazily.
"""

from __future__ import annotations

import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "actatlas[ray]"  (or: pip install "ray[data]")'
RENDER_MAX_RETRIES = 3


def require_ray():
    """Import ray (and Ray Data); UserError telling how to install it when missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"engine 'ray' needs Ray, which is not installed ({exc}); install it with: "
                        f"{INSTALL_HINT}") from None
    return ray


def ensure_ray(address: str | None = None):
    """Connect to Ray: reuse an initialised session, else ``ray.init(address)`` (None: a local
    cluster on this machine, or the one named by ``RAY_ADDRESS``). PYTHONPATH is passed to the
    workers so ``package.module:factory`` models import there too."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    env = {k: os.environ[k] for k in ("PYTHONPATH", "NUMBA_CACHE_DIR") if os.environ.get(k)}
    kw = dict(include_dashboard=False, logging_level=logging.WARNING,
              runtime_env={"env_vars": env} if env else None)
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot connect to Ray at {address or 'a local cluster'}: {exc}") from None
    return ray


# ----------------------------------------------------------------------------------------------
# models on workers


@dataclass
class ModelRecipe:
    """How a worker gets the model: by name through `load_model` (with the arguments recorded by
    it) when the spec came from the registry, else the pickled spec itself."""

    name: str
    load_args: dict = field(default_factory=dict)
    spec: object | None = None

    @classmethod
    def of(cls, spec) -> "ModelRecipe":
        if "load_args" in spec.info:
            return cls(spec.name, dict(spec.info["load_args"]))
        return cls(spec.name, {}, spec)

    def load(self, device: str):
        if self.spec is not None:
            return self.spec.to_device(device)
        from .models import load_model

        return load_model(self.name, device=device, **self.load_args)


_WORKER_MODELS: dict = {}   # per worker process: (recipe key, device) -> spec (reused by later tasks)


def _worker_model(recipe: ModelRecipe, device: str):
    key = (recipe.name, repr(sorted(recipe.load_args.items())), id(recipe.spec) if recipe.spec else 0, device)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = recipe.load(device)
    return _WORKER_MODELS[key]


@dataclass(frozen=True)
class Resources:
    """What one model actor / render task asks Ray for, and how many actors run."""

    device: str         # the device name inside the worker ("cuda" or "cpu")
    num_cpus: float
    num_gpus: float
    actors: int
    decoders: int
    threads: int


def plan_resources(device: str, threads: int | None, actors: int | None, cluster: dict) -> Resources:
    """One actor per GPU for a CUDA device, else CPU actors of `threads` threads each, leaving one
    CPU for decoding. UserError for a CUDA device on a cluster without GPUs."""
    dev = torch.device(device)
    cpus, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
    if dev.type == "cuda":
        if gpus == 0:
            raise ConfigError(f"device {device} with engine 'ray', but the Ray cluster has no GPUs "
                            f"(resources: {cluster}); use the cpu device")
        n = actors or gpus
        return Resources("cuda", 1, 1, n, max(1, cpus - n), max(1, threads or 1))
    if dev.type != "cpu":
        raise ConfigError(f"engine 'ray' supports the cpu or cuda device, not {device}")
    t = max(1, threads or 1)
    n = actors or max(1, (cpus - 1) // t)
    return Resources("cpu", t, 0, n, max(1, cpus - n * t), t)


# ----------------------------------------------------------------------------------------------
# collection through Ray Data


class _Decode:
    """Ray Data stage 1 (actors, CPU): planned batch -> pickled (index, uint8 pixels, skipped)."""

    def __init__(self, source, preprocess, threads: int):
        import ray

        self.source = ray.get(source) if isinstance(source, ray.ObjectRef) else source
        self.preprocess = preprocess
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))

    def __call__(self, batch: dict) -> dict:
        from .batches import decode_batch

        payloads = []
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            db = decode_batch(self.source, self.preprocess, int(shard), range(int(start), int(stop)), self.pool)
            pixels = db.pixels.numpy() if db.pixels is not None else None
            payloads.append(pickle.dumps((db.index, pixels, db.skipped), protocol=5))
        return {"bi": np.asarray(batch["bi"]), "shard": np.asarray(batch["shard"]),
                "requested": np.asarray(batch["stop"]) - np.asarray(batch["start"]),
                "payload": np.array(payloads, dtype=object)}


class _Collect:
    """Ray Data stage 2 (actors, one per GPU or CPU actors): loads the model once, then runs
    `collect.process_batch` on every decoded batch; returns pickled `BatchOutput`s."""

    def __init__(self, recipe: ModelRecipe, layers: dict, shapes: dict, cfg, device: str, threads: int):
        if device == "cpu":
            torch.set_num_threads(threads)
        self.spec = recipe.load(device)
        self.layers, self.shapes, self.cfg = layers, shapes, cfg

    def __call__(self, batch: dict) -> dict:
        from .collect_batch import BatchOutput, process_batch

        results = []
        for bi, shard, requested, payload in zip(batch["bi"], batch["shard"], batch["requested"],
                                                 batch["payload"]):
            index, pixels, skipped = pickle.loads(payload)
            res = (process_batch(self.spec, self.layers, self.shapes, torch.from_numpy(pixels), index, self.cfg)
                   if pixels is not None else None)
            out = BatchOutput(int(bi), int(shard), int(requested), list(skipped), res)
            results.append(pickle.dumps(out, protocol=5))
        return {"bi": np.asarray(batch["bi"]), "result": np.array(results, dtype=object)}


def ray_batches(spec, layers: dict[str, str], shapes: dict, source, plan: Sequence[tuple[int, range]], cfg,
                progress: bool = True) -> Iterator:
    """The Ray engine of `collect`: yields one `collect.BatchOutput` per entry of `plan`, in plan
    order, each exactly once (see the module docstring)."""
    ray = ensure_ray(cfg.address)
    import ray.data

    if not plan:
        return
    res = plan_resources(cfg.device, cfg.threads, cfg.ray_actors, ray.cluster_resources())
    log.info("ray collect: %d model actor(s) on %s (%s CPU, %s GPU each), %d decoder(s)",
             res.actors, res.device, res.num_cpus, res.num_gpus, res.decoders)
    items = [{"bi": bi, "shard": int(s), "start": r.start, "stop": r.stop} for bi, (s, r) in enumerate(plan)]
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    try:
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * (res.actors + res.decoders)))
        ds = ds.map_batches(_Decode, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=res.decoders),
                            num_cpus=1, fn_constructor_kwargs=dict(source=ray.put(source), preprocess=spec.preprocess,
                                                                   threads=cfg.loader_threads))
        ds = ds.map_batches(_Collect, batch_size=1, compute=ray.data.ActorPoolStrategy(size=res.actors),
                            num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                            fn_constructor_kwargs=dict(recipe=ModelRecipe.of(spec), layers=dict(layers),
                                                       shapes=dict(shapes), cfg=cfg, device=res.device,
                                                       threads=res.threads))
        pending: dict[int, object] = {}
        nxt = 0
        for row in ds.iter_rows():
            bi = int(row["bi"])
            if bi < nxt or bi in pending:
                log.warning("ray collect: batch %d delivered twice (a retried task); kept the first", bi)
                continue
            pending[bi] = row["result"]
            while nxt in pending:
                yield pickle.loads(pending.pop(nxt))
                nxt += 1
        if nxt != len(plan):
            missing = sorted(set(range(nxt, len(plan))) - set(pending))[:10]
            raise RuntimeError(f"ray collect lost batches (first missing: {missing}); rerun to resume")
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


# ----------------------------------------------------------------------------------------------
# rendering through Ray tasks


def _render_task(recipe: ModelRecipe, layer: str, directions: np.ndarray, cfg, S, device: str, threads: int,
                 init=None, init_mask=None):
    from .render.icons import render_icon_batch

    if device == "cpu":
        torch.set_num_threads(threads)
    spec = _worker_model(recipe, device)
    return render_icon_batch(spec, layer, directions, cfg, S, init=init, init_mask=init_mask)


def ray_render(spec, layer: str, jobs: Sequence[tuple[object, np.ndarray, object]], S, *, device: str = "cpu",
               threads: int | None = None, address: str | None = None) -> Iterator[tuple[object, dict]]:
    """Render icon batches as Ray tasks. `jobs`: (key, directions [m, c], RenderConfig with the
    batch's seed[, init, init_mask] start images, `render_icon_batch`). Yields (key, its arrays) as
    tasks finish (any order).

    Tasks ask for one GPU each with a CUDA device, else `threads` CPUs; at most twice as many are
    in flight as can run, so the driver's memory stays bounded."""
    import dataclasses

    ray = ensure_ray(address)
    res = plan_resources(device, threads, None, ray.cluster_resources())
    n_slots = res.actors if res.num_gpus else max(1, int(ray.cluster_resources().get("CPU", 1) // res.num_cpus))
    task = ray.remote(_render_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                            max_retries=RENDER_MAX_RETRIES)
    recipe_ref = ray.put(ModelRecipe.of(spec))
    s_ref = ray.put(None if S is None else np.asarray(S, np.float32))
    queue = list(jobs)
    inflight: dict = {}
    while queue or inflight:
        while queue and len(inflight) < 2 * n_slots:
            key, dirs, cfg, *start = queue.pop(0)
            cfg = dataclasses.replace(cfg, device=res.device)
            ref = task.remote(recipe_ref, layer, np.asarray(dirs, np.float32), cfg, s_ref, res.device, res.threads,
                              *start)
            inflight[ref] = key
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            yield inflight.pop(ref), ray.get(ref)
