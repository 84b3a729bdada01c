"""The engine-independent part of collection: settings, spatial positions and the batch function.

For every image, K spatial positions are sampled per layer; the activation vector h at each position
is stored together with its attribution to every class,

    attr_c = h · d logit_c / d h          (the gradient taken at that position, image context fixed)

computed for all classes at once as one forward-mode Jacobian-vector product: the tangent is h itself
at the sampled position and zero elsewhere, so the tangent of the logits is exactly attr (method.md
§1.3, the reference code's ``fwd_gradients``). One dual forward per (layer, position slot) replaces a
loop over 1000 classes.

`process_batch` is what every engine runs on a batch: the local one (`local_batches`, driven by
``actatlas.collect``) and the Ray one (``actatlas.ray_engine``).

Shared locations (``CollectConfig.shared_locations``, what aligned atlases need): instead of drawing
positions per layer, each image's K samples are drawn once as normalized image locations (u, v) in
[0, 1)^2 (u down, v across; `shared_locations`) and every layer takes the cell that holds them
(`locations_to_positions`): ``y = min(floor(u * h), h - 1)``, ``x = min(floor(v * w), w - 1)``. The
draw depends only on (seed, image index) and the coarsest map of the collected layers (the smallest h
and w): K distinct cells of that map, ``border`` cells from its edges, and a uniform point inside each.
So row r of every layer is the same image at the same place, every layer's position is at least
``border`` cells from its edges (a finer map's cells are no larger), and with maps whose sizes divide
(28, 14, 7) each finer position lies inside the coarser cell. The locations are stored with the rows
(``collect/<layer>/locations.npy``, float32 [n, 2]), so alignment can check that rows correspond.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from .batches import iter_batches
from .data import ImageSource
from .errors import ConfigError
from .hooks import capture
from .models.layers import smooth_maxpool_gradients
from .models.spec import ModelSpec
from .store import LayerBatch

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
    shared_locations: every layer samples the same image locations (module docstring), drawn once per
        image instead of once per layer, and the store keeps them; what aligned layouts need. Only
        with positions "random" or "center", and only for layers with a spatial map. Part of the
        config hash when on.
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
    shared_locations: bool = False

    def validate(self) -> None:
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if self.attributions not in ATTRIBUTIONS:
            raise ConfigError(f"attributions must be one of {', '.join(ATTRIBUTIONS)}, not {self.attributions!r}")
        for name in ("per_image", "batch_size", "shard_size", "topk", "loader_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1")
        if self.border < 0:
            raise ConfigError("border must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit must be >= 1")
        if self.activation_dtype not in ("float32", "float16"):
            raise ConfigError("activation dtype must be float32 or float16")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.amp and self.attributions != "none":
            raise ConfigError("amp applies to the plain forward only: use it with attributions='none' "
                            "(attributions through a half-precision forward-mode pass were too inexact; "
                            "see docs/scale.md)")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise ConfigError("ray actors must be >= 1")
        if self.shared_locations and self.positions == "all":
            raise ConfigError("shared_locations samples the same image locations in every layer; positions 'all' "
                              "takes every cell of each map instead (a different number per layer): use positions "
                              "'random' or 'center'")

    # Fields that change the stored rows; the others (batch size, device, threads) do not.
    RESULT_FIELDS = ("layers", "positions", "per_image", "border", "attributions", "topk", "seed", "limit",
                     "shard_size", "activation_dtype")


# ----------------------------------------------------------------------------------------------
# positions


def _interior(h: int, w: int, border: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the cells at least `border` from each edge of an h x w map, or the whole map
    when that leaves none."""
    b = border
    return (b, h - b, b, w - b) if (h - 2 * b >= 1 and w - 2 * b >= 1) else (0, h, 0, w)


def sample_positions(h: int, w: int, image_index: int, layer: str, cfg: CollectConfig) -> np.ndarray:
    """[K, 2] (y, x) positions in a layer map of size h x w for one image (positions per layer).

    Deterministic in (seed, image index, layer) only, so a resumed or re-batched run samples the
    same positions. "random" draws K distinct positions from the interior (``border`` cells away
    from each edge, or the whole map when it is too small). With ``shared_locations`` the positions
    come from `shared_locations` and `locations_to_positions` instead.
    """
    if cfg.positions == "center":
        return np.array([[h // 2, w // 2]], dtype=np.int64)
    if cfg.positions == "all":
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)
    y0, y1, x0, x1 = _interior(h, w, cfg.border)
    n_cand = (y1 - y0) * (x1 - x0)
    k = min(cfg.per_image, n_cand)
    rng = np.random.default_rng([cfg.seed, image_index, zlib.crc32(layer.encode())])
    flat = rng.choice(n_cand, size=k, replace=False)
    return np.stack([y0 + flat // (x1 - x0), x0 + flat % (x1 - x0)], axis=1).astype(np.int64)


SHARED_TAG = zlib.crc32(b"shared-locations")   # the third seed word of shared locations (never a layer's)


def shared_locations(h: int, w: int, image_index: int, cfg: CollectConfig) -> np.ndarray:
    """float64 [K, 2] normalized image locations (u down, v across, in [0, 1)) of one image's samples,
    shared by every layer; (h, w) is the coarsest map of the collected layers (smallest height and
    width). "random": K distinct cells of that map at least ``border`` from its edges (or anywhere
    when that leaves none), a uniform point in each; "center": (0.5, 0.5). Deterministic in (seed,
    image index) and (h, w, border, per_image) only, never in a layer's name."""
    if cfg.positions == "center":
        return np.array([[0.5, 0.5]])
    y0, y1, x0, x1 = _interior(h, w, cfg.border)
    n_cand = (y1 - y0) * (x1 - x0)
    k = min(cfg.per_image, n_cand)
    rng = np.random.default_rng([cfg.seed, image_index, SHARED_TAG])
    flat = rng.choice(n_cand, size=k, replace=False)
    offset = rng.random((k, 2))
    cell = np.stack([y0 + flat // (x1 - x0), x0 + flat % (x1 - x0)], axis=1)
    return (cell + offset) / np.array([h, w], np.float64)


def locations_to_positions(locations: np.ndarray, h: int, w: int) -> np.ndarray:
    """int64 [K, 2] (y, x) cells of an h x w map that hold normalized locations [K, 2] (u, v):
    y = min(floor(u * h), h - 1), x = min(floor(v * w), w - 1) (clipped at 0 too)."""
    loc = np.asarray(locations, np.float64)
    y = np.clip(np.floor(loc[:, 0] * h), 0, h - 1)
    x = np.clip(np.floor(loc[:, 1] * w), 0, w - 1)
    return np.stack([y, x], axis=1).astype(np.int64)


def coarsest_map(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(h, w): the smallest height and width among the spatial outputs in `shapes` ([c, h, w])."""
    maps = [s for s in shapes.values() if len(s) == 3]
    return (min(s[1] for s in maps), min(s[2] for s in maps)) if maps else (1, 1)


def check_shared_layers(shapes: dict[str, tuple[int, ...]]) -> None:
    """ConfigError unless every layer (label -> output shape without batch) has a spatial map with more
    than one cell: shared locations (and aligned layouts) place each sample at one image location in
    every layer, which a layer without a map (a [d] output, or a global-pooled [c, 1, 1] one) lacks."""
    for label, shp in shapes.items():
        if len(shp) != 3 or shp[1] * shp[2] < 2:
            kind = "has no spatial output" if len(shp) != 3 else "is global-pooled (a 1x1 map)"
            raise ConfigError(f"layer {label} {kind} (shape {list(shp)}), so its samples cannot sit at the same "
                              "image locations as the other layers'; shared locations and aligned layouts need "
                              "layers with a spatial map [c, h, w] (see 'actatlas layers MODEL')")


def check_alignable(spec: ModelSpec, layers: dict[str, str]) -> None:
    """`check_shared_layers` for the layers (label -> module) of `spec`, from one forward pass at its
    input size (on its device)."""
    shapes = layer_shapes(spec, list(layers.values()), spec.device)
    check_shared_layers({label: shapes[m] for label, m in layers.items()})


def position_warnings(shapes: dict[str, tuple[int, ...]], cfg: CollectConfig) -> list[str]:
    """One line per setting that the layers' map sizes silently override (label -> [c, h, w] / [d]).
    With shared locations only the coarsest map decides (it is where the locations are drawn)."""
    if cfg.shared_locations:
        h, w = coarsest_map(shapes)
        shapes = {f"(the coarsest map of {', '.join(shapes)})": (0, h, w)}
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
        if cfg.shared_locations:
            w["locations"] = 2
        out[label] = w
    return out


def layer_shapes(spec: ModelSpec, module_names: Sequence[str], device) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of each module at the model's input size."""
    s = spec.input_size
    with torch.inference_mode(), capture(spec.module, module_names) as got:
        spec.module(torch.zeros(1, 3, s, s, device=device))
    missing = [m for m in module_names if m not in got]
    if missing:
        raise ConfigError(f"layer(s) {missing} produced no output in a forward pass of {spec.name}")
    shapes = {}
    for m in module_names:
        out = got[m]
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
            raise ConfigError(f"layer {m!r} outputs {type(out).__name__} of shape "
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
    device = spec.device
    x = spec.preprocess.normalize(batch.to(device))
    if spec.info.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    pos, locations = _batch_positions(layers, shapes, image_index, cfg, device)
    fwd = _Forwards(spec, x, pos, cfg)
    attrs: dict[str, torch.Tensor] = {}  # mod -> [b, K, classes]
    if cfg.attributions == "none":
        logits, _ = fwd.run()
    else:
        logits = None
        for mod in pos:
            per_slot = []
            for k in range(pos[mod].shape[1]):
                lg, tan = fwd.run(mod, k)
                logits = lg if logits is None else logits
                per_slot.append(tan)
            attrs[mod] = torch.stack(per_slot, dim=1)
    top_i, top_p = _top5(logits)
    return {label: _layer_batch(fwd.gathered[mod], pos[mod], attrs.get(mod), top_i, top_p, image_index, cfg,
                                locations)
            for label, mod in layers.items()}


def _batch_positions(layers: dict[str, str], shapes: dict[str, tuple[int, ...]], image_index: np.ndarray,
                     cfg: CollectConfig, device) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    """(module -> [b, K, 2] (y, x) sampled positions of each image (a [d] output has the one (0, 0)),
    the shared locations float64 [b, K, 2] or None when each layer draws its own)."""
    pos: dict[str, torch.Tensor] = {}
    locations = None
    if cfg.shared_locations:
        hc, wc = coarsest_map({mod: shapes[mod] for mod in layers.values()})
        locations = np.stack([shared_locations(hc, wc, int(i), cfg) for i in image_index])
    for label, mod in layers.items():
        shp = shapes[mod]
        h, w = (shp[1], shp[2]) if len(shp) == 3 else (1, 1)
        if locations is not None:
            p = np.stack([locations_to_positions(loc, h, w) for loc in locations])
        else:
            p = np.stack([sample_positions(h, w, int(i), label, cfg) for i in image_index])
        pos.setdefault(mod, torch.as_tensor(p, device=device))
    return pos, locations


class _Forwards:
    """Forward passes over one batch `x` that record each hooked module's vectors at `pos` once."""

    def __init__(self, spec: ModelSpec, x: torch.Tensor, pos: dict[str, torch.Tensor], cfg: CollectConfig):
        self.spec, self.x, self.pos, self.cfg = spec, x, pos, cfg
        self.gathered: dict[str, torch.Tensor] = {}    # module -> [b, K, c]
        self.rows = torch.arange(x.shape[0], device=x.device)

    def _gather(self, out: torch.Tensor, mod: str) -> torch.Tensor:
        """[b, K, c] activation vectors at the sampled positions (a copy)."""
        primal = fwAD.unpack_dual(out).primal.detach()
        if primal.dim() == 2:
            return primal[:, None, :].float().clone()
        p = self.pos[mod]
        return primal[self.rows[:, None], :, p[..., 0], p[..., 1]].float().clone()

    def run(self, target: str | None = None, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward -> (logits [b, classes], None); with `target`, a dual forward whose logit
        tangents [b, classes] are the attributions of position slot `slot` of module `target`."""

        def transform(mod, out):
            if mod not in self.gathered:
                self.gathered[mod] = self._gather(out, mod)
            if mod != target:
                return None
            tangent = torch.zeros_like(out)
            if out.dim() == 2:
                tangent.copy_(out.detach())
            else:
                p, b = self.pos[mod][:, slot], self.rows
                tangent[b, :, p[:, 0], p[:, 1]] = out.detach()[b, :, p[:, 0], p[:, 1]]
            return fwAD.make_dual(out, tangent)

        module = self.spec.module
        with capture(module, list(self.pos), transform=transform):
            if target is None:
                with torch.inference_mode(), amp_context(self.x.device, self.cfg.amp):
                    return module(self.x).float(), None
            with torch.no_grad(), fwAD.dual_level(), \
                    smooth_maxpool_gradients(module, self.cfg.smooth_maxpool):  # float32 always (no amp)
                unpacked = fwAD.unpack_dual(module(self.x))
                tan = unpacked.tangent
                if tan is None:  # the logits do not depend on this layer
                    tan = torch.zeros_like(unpacked.primal)
                return unpacked.primal.float().clone(), tan.float().clone()


def _top5(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, 5] predicted classes and probabilities (padded with -1 / 0 below 5 classes)."""
    probs = torch.softmax(logits, dim=1)
    top_p, top_i = probs.topk(min(5, probs.shape[1]), dim=1)
    if top_i.shape[1] < 5:
        pad, b = 5 - top_i.shape[1], logits.shape[0]
        top_i = torch.cat([top_i, torch.full((b, pad), -1, device=logits.device)], 1)
        top_p = torch.cat([top_p, torch.zeros(b, pad, device=logits.device)], 1)
    return top_i, top_p


def _layer_batch(acts: torch.Tensor, pos: torch.Tensor, attr: torch.Tensor | None, top_i: torch.Tensor,
                 top_p: torch.Tensor, image_index: np.ndarray, cfg: CollectConfig,
                 locations: np.ndarray | None = None) -> LayerBatch:
    """The b*K rows of one layer: acts [b, K, c], pos [b, K, 2], attr [b, K, classes] or None,
    locations [b, K, 2] (shared locations) or None."""
    b, k_slots = acts.shape[:2]
    p = pos.cpu().numpy()
    rep = lambda t: np.repeat(t.cpu().numpy(), k_slots, axis=0)  # noqa: E731
    lb = LayerBatch(
        activations=acts.reshape(b * k_slots, -1).cpu().numpy(),
        image=np.repeat(np.asarray(image_index, np.int64), k_slots),
        y=p[..., 0].reshape(-1).astype(np.int16), x=p[..., 1].reshape(-1).astype(np.int16),
        top5=rep(top_i).astype(np.int32), top5_prob=rep(top_p).astype(np.float32),
        locations=None if locations is None else locations.reshape(b * k_slots, 2).astype(np.float32))
    if attr is not None:
        a = attr.reshape(b * k_slots, -1)
        if cfg.attributions == "full":
            lb.attributions = a.cpu().numpy().astype(np.float16)
        else:
            v, i = a.topk(min(cfg.topk, a.shape[1]), dim=1)
            lb.attr_index, lb.attr_value = i.cpu().numpy().astype(np.int32), v.cpu().numpy()
    return lb


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


def resolve_layers(spec: ModelSpec, layers: Sequence[str] | None) -> dict[str, str]:
    """label -> dotted module name; the model's default layer when `layers` is empty."""
    names = list(layers) if layers else [spec.default_layer]
    if len(set(names)) != len(names):
        raise ConfigError(f"layers lists a layer twice: {names}")
    return {n: spec.resolve_layer(n) for n in names}
