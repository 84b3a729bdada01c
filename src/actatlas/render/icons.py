"""Icons for atlas cells: batched, best-of-N feature visualization of cell mean directions (§1.9-1.11).

`render_icons` optimises `batch_size` icons at a time, each with its own image in the batch and its
own target vector (Lucid indexes ``layer[b]`` per icon). Each icon gets `attempts` independent
optimisations; per icon the attempt with the highest last-step direction objective is kept
(``argmax(loss_attempts[:, i])``, §1.11 "tries"; the boundary penalty is optimised but, as in the
recipe, not part of the recorded value).

The fidelity score (method.md §7.C) is cos(h, v'): h = the icon's activation at the centre position
of the layer map when the *untransformed* icon (uint8-quantised, at icon size) is fed to the network,
v' = v @ S if S is given else v. `fidelity_of_activations` gives the same score for real samples.

Seeding: attempt a of the batch starting at icon k uses a generator seeded from (seed, a, k) for both
the initial spectrum and the transform draws, so the same config and directions give the same icons.
"""

from __future__ import annotations

import dataclasses
import math
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..models.spec import ModelSpec
from ._forward import forward_to_layers, frozen, model_input
from .objectives import center_vectors, boundary_penalty, direction, direction_cossim, target_vectors
from .optimize import StopRule, optimize, optimize_queue
from .params import FFTImage
from .redirect import uses_redirected_relu
from .transforms import make_transforms

log = logging.getLogger(__name__)

STOPS = ("fixed", "plateau")
LR_SCHEDULES = ("constant", "cosine", "warmup-cosine")
WARM_STARTS = ("none", "parent", "member", "parent-member")

__all__ = ["RenderConfig", "IconSet", "render_icons", "render_icon_batch", "fidelity_of_activations",
           "icon_fidelity", "centre_activations"]


@dataclass(frozen=True)
class RenderConfig:
    """Icon rendering settings (method.md §1.11, §1.13).

    Attributes:
        steps: Adam steps per attempt ([PROD] 1024, [RECIPE] 128, [NB] 512).
        attempts: independent optimisations per icon, best kept ([PROD] "tries" 4).
        icon_size: icon side P in px ([PROD] 80).
        batch_size: icons optimised together ([PROD] 100).
        lr: Adam learning rate (0.05).
        transforms: "recipe" (80 -> 80 px), "notebook" (80 -> 32..51 px) or "none".
        objective: "lucid" (faithful direction_neuron_cossim_S), "cosine" (true cosine) or "dot"
            (plain mean dot, direction_neuron_S: [RECIPE] cossim=False, [NB] without S), §1.9.
        power: cosine exponent ([RECIPE] 2; [NB] 4 with whitening).
        whiten: use the whitening matrix S (render_icons then requires S; §1.8). [PROD]: true for
            mid/deep layers, false for the earliest.
        boundary_weight: weight of `boundary_penalty(5)` ([RECIPE] 1; [NB] 0).
        seed: base seed for spectra and transform draws.
        device: torch device for the images; None = the model's device.
        per_sample_transforms: draw transforms per image instead of once per batch.
        redirected_relu: Lucid's redirected ReLU gradient during the first 17 steps (`render.redirect`):
            True or False, or None for the model's default (``spec.info["redirected_relu"]``: on for
            inceptionv1 as in Lucid's and lucent's rendering, off for every other model).
        stop: "fixed" (every attempt runs `steps`) or "plateau" (each icon stops at its own plateau,
            at most `steps`, and its batch slot takes the next icon: `optimize.StopRule`, issue 12).
        min_steps, plateau_window, plateau_tol: the plateau rule: after at least `min_steps`, stop once
            the objective's mean over the last `plateau_window` steps rose by less than `plateau_tol`
            (relative) over the mean of the window before.
        lr_schedule: "constant" (the recipe), "cosine" (lr decays to a tenth at `steps`) or
            "warmup-cosine" (`optimize.lr_factor`).
        warm_start: "none" (a random spectrum, the recipe); "parent": the pipeline starts each icon of
            a finer level from the icon of the coarser level's cell that contains it (the levels nest);
            "member": from the real patch of the cell's member closest to its mean; "parent-member":
            parents where there are, members elsewhere (the coarsest level).
    """

    steps: int = 128
    attempts: int = 1
    icon_size: int = 80
    batch_size: int = 32
    lr: float = 0.05
    transforms: str = "recipe"
    objective: str = "lucid"
    power: float = 2.0
    whiten: bool = False
    boundary_weight: float = 1.0
    seed: int = 0
    device: str | None = None
    per_sample_transforms: bool = False
    redirected_relu: bool | None = None
    stop: str = "fixed"
    min_steps: int = 16
    plateau_window: int = 8
    plateau_tol: float = 0.01
    lr_schedule: str = "constant"
    warm_start: str = "none"

    def __post_init__(self):
        bad = []
        for name, lo, hi, unit in (("steps", 0, 100_000, ""), ("attempts", 1, 64, ""),
                                   ("icon_size", 8, 1024, " px"), ("batch_size", 1, 4096, ""),
                                   ("min_steps", 1, 100_000, ""), ("plateau_window", 1, 1000, "")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                bad.append(f"{name}={v!r} is out of range: must be an integer in [{lo}, {hi}]{unit}")
        for name, lo_open in (("lr", True), ("power", True), ("boundary_weight", False), ("plateau_tol", False)):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v < 0 or (lo_open and v == 0):
                bad.append(f"{name}={v!r} must be a finite number {'> 0' if lo_open else '>= 0'}")
        if self.redirected_relu is not None and not isinstance(self.redirected_relu, (bool, np.bool_)):
            bad.append(f"redirected_relu={self.redirected_relu!r} must be True, False or None (the model's default)")
        if bad:
            raise ConfigError("invalid render setting: " + "; ".join(bad))
        if self.transforms not in ("recipe", "notebook", "none"):
            raise ConfigError(f"transforms must be 'recipe', 'notebook' or 'none', not {self.transforms!r}")
        if self.objective not in ("lucid", "cosine", "dot"):
            raise ConfigError(f"objective must be 'lucid', 'cosine' or 'dot', not {self.objective!r}")
        for name, allowed in (("stop", STOPS), ("lr_schedule", LR_SCHEDULES), ("warm_start", WARM_STARTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {getattr(self, name)!r}")

    @property
    def continuous(self) -> bool:
        """Whether icons render through the continuous-batching loop (`optimize_queue`): any of the
        render-less levers is on. Off (the recipe), the one fixed-length `optimize` loop runs."""
        return self.stop != "fixed" or self.lr_schedule != "constant" or self.warm_start != "none"

    @classmethod
    def cpu_default(cls, **overrides) -> "RenderConfig":
        """Settings for a 2-core CPU: 64 steps, 1 attempt, 64 px, batch 8, recipe chain, whitened,
        true-cosine objective, finer levels started from their parent cells' icons.

        Chosen on efficientnet_lite0 blocks.8 with the honest icon scores (issue 12, BENCHMARKS.md
        "Render less"; `scripts/bench_render_less.py`): 128 random-start steps (the previous default)
        gave retrieval@1 0.89 raw / 1.00 whitened and colourfulness 23.1, contrast 31.1, border fill
        0.154 on 64 cells of level 20; 64 steps from the parent icon give 0.81 / 1.00 and 23.4, 31.0,
        0.149 for half the steps, and 64 random-start steps only 0.77 / 1.00 and 18.3, 24.2, 0.124.
        Batch 8 gives ~2x the icons/s of batch 1 on 2 cores; the true-cosine objective keeps icons from
        staying near grey (``objective="lucid"`` keeps the faithful port).
        """
        base = dict(steps=64, attempts=1, icon_size=64, batch_size=8, whiten=True, objective="cosine",
                    warm_start="parent")
        return cls(**{**base, **overrides})

    @classmethod
    def single_level(cls, **overrides) -> "RenderConfig":
        """`cpu_default` for icons rendered without a coarser level to start from (class atlases,
        comparisons, patch search): random starts with 128 steps, the previous default, which scored
        at least as well as 64 steps from parents (see `cpu_default`)."""
        return cls.cpu_default(**{"steps": 128, "warm_start": "none", **overrides})

    def standalone(self) -> "RenderConfig":
        """This config for icons that have no parent level: a "parent" warm start becomes a random
        start with twice the steps (the measured random-start match of parent starts, `cpu_default`),
        "parent-member" becomes "member"; other configs are returned unchanged."""
        if self.warm_start == "parent":
            return dataclasses.replace(self, warm_start="none", steps=2 * self.steps)
        if self.warm_start == "parent-member":
            return dataclasses.replace(self, warm_start="member")
        return self

    @classmethod
    def fast(cls, **overrides) -> "RenderConfig":
        """Quick previews: `cpu_default` with lr 0.1 and each icon stopped at its own plateau (at most
        128 steps). On blocks.8 (issue 12): 29 steps per icon on average, retrieval@1 0.69 raw / 0.97
        whitened, and more vivid icons than the default (colourfulness 30.6, contrast 34.9)."""
        base = dict(steps=128, lr=0.1, stop="plateau")
        return cls.cpu_default(**{**base, **overrides})

    @classmethod
    def article(cls, **overrides) -> "RenderConfig":
        """The Distill build settings ([PROD] §1.13): 1024 steps, 4 tries, 80 px, batch 100, whitened.

        The objective stays the true-cosine variant (see `cpu_default`); pass ``objective="lucid"``
        for the reference code's exact formula.
        """
        base = dict(steps=1024, attempts=4, icon_size=80, batch_size=100, whiten=True, objective="cosine")
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> "RenderConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class IconSet:
    """Rendered icons for m directions.

    Attributes:
        images: uint8 [m, P, P, 3].
        objective: [m] the kept attempt's last-step direction objective.
        fidelity: [m] cos(centre activation of the untransformed icon, v').
        attempts_objective: [attempts, m] last-step direction objective of every attempt.
        best_attempt: [m] index of the kept attempt.
        layer: the layer name the icons were rendered for.
        config: the `RenderConfig` used.
        seconds: wall time.
        steps: int64 [m] optimiser steps spent on each icon, all attempts together (None: not recorded).
    """

    images: np.ndarray
    objective: np.ndarray
    fidelity: np.ndarray
    attempts_objective: np.ndarray
    best_attempt: np.ndarray
    layer: str
    config: RenderConfig
    seconds: float = 0.0
    steps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


def fidelity_of_activations(h, targets, S=None) -> np.ndarray:
    """Cosine between activations h [n, c] and targets v' = targets @ S (or targets), -> [n] (§7.C).

    Used for icons (h = the icon's centre activation) and for real samples ("best real member").
    A zero vector gives 0.
    """
    hv = torch.as_tensor(np.asarray(h) if not torch.is_tensor(h) else h.detach().cpu()).to(torch.float64)
    v = target_vectors(targets, S, dtype=torch.float64)
    if hv.dim() == 1:
        hv = hv[None]
    if hv.shape != v.shape:
        raise ValueError(f"activations {tuple(hv.shape)} and targets {tuple(v.shape)} must both be [n, c]")
    den = (hv.norm(dim=1) * v.norm(dim=1)).clamp_min(1e-30)
    return ((hv * v).sum(dim=1) / den).numpy()


@torch.no_grad()
def centre_activations(spec: ModelSpec, layer: str, images: torch.Tensor) -> torch.Tensor:
    """Activations [b, c] at the centre position of `layer` for images [b, 3, P, P] in [0, 1]."""
    name = spec.resolve_layer(layer)
    with frozen(spec.module):
        acts = forward_to_layers(spec.module, model_input(spec, images), [name])[name]
    return center_vectors(acts).float()


def icon_fidelity(spec: ModelSpec, layer: str, images: np.ndarray | torch.Tensor, directions, S=None,
                  device: str | torch.device | None = None, batch_size: int = 64) -> np.ndarray:
    """Fidelity [m] of icons (uint8 [m, P, P, 3] or float [m, 3, P, P] in [0, 1]) to `directions` [m, c],
    run `batch_size` icons at a time."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2)
    h = []
    for k in range(0, len(x), batch_size):
        xb = x[k:k + batch_size]
        xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
        if device is not None:
            xb = xb.to(device)
        h.append(centre_activations(spec, layer, xb).cpu())
    return fidelity_of_activations(torch.cat(h), directions, S)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """[b, 3, P, P] in [0, 1] -> uint8 [b, P, P, 3]."""
    return (img[:, :3].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def render_icons(spec: ModelSpec, layer: str, directions: np.ndarray, cfg: RenderConfig | None = None,
                 S: np.ndarray | None = None, progress: bool = True, init: np.ndarray | None = None,
                 init_mask: np.ndarray | None = None) -> IconSet:
    """Render one icon per direction (method.md §1.9-1.11).

    Args:
        spec: the model.
        layer: layer name or alias (e.g. ``"blocks.8"``).
        directions: [m, c] target directions (cell mean activations, §1.7).
        cfg: settings (default `RenderConfig.cpu_default()`).
        S: [c, c] whitening matrix (``actatlas.whiten``), required when ``cfg.whiten``; ignored
            (with a warning) otherwise.
        progress: a tqdm bar over batches x attempts (over icons with the continuous loop).
        init: uint8 [m, P, P, 3] images to start from (e.g. the parent cells' icons; `cfg.warm_start`),
            instead of a random spectrum; with several attempts the first starts there, the others at
            random. Rendered through the continuous loop (`RenderConfig.continuous`).
        init_mask: bool [m]: the rows of `init` to start from (the others start at random); None: all.

    Returns:
        `IconSet` with images uint8 [m, P, P, 3], objective [m], fidelity [m], attempts_objective
        [attempts, m].
    """
    cfg = cfg or RenderConfig.cpu_default()
    dirs = np.asarray(directions, dtype=np.float32)
    if dirs.ndim != 2:
        raise ValueError(f"directions must be [m, c], got shape {dirs.shape}")
    if cfg.whiten and S is None:
        raise ValueError("cfg.whiten is True but no whitening matrix S was given "
                         "(compute it with actatlas.whiten, or set whiten=False)")
    if not cfg.whiten and S is not None:
        log.warning("cfg.whiten is False: ignoring the whitening matrix S")
        S = None
    layer_name = spec.resolve_layer(layer)  # fail early on an unknown layer
    device = torch.device(cfg.device) if cfg.device else spec.device
    m, P, A = len(dirs), cfg.icon_size, cfg.attempts
    transforms = make_transforms(cfg.transforms, P, cfg.per_sample_transforms)
    redirect = uses_redirected_relu(cfg.redirected_relu, spec.info)
    if init is not None:
        init = np.asarray(init)
        if init.shape != (m, P, P, 3) or init.dtype != np.uint8:
            raise ValueError(f"init must be uint8 [{m}, {P}, {P}, 3], got {init.dtype} {init.shape}")
        init_mask = np.ones(m, bool) if init_mask is None else np.asarray(init_mask, bool)
        if init_mask.shape != (m,):
            raise ValueError(f"init_mask must be bool [{m}], got shape {init_mask.shape}")
    if cfg.continuous or init is not None:
        return _render_continuous(spec, layer, layer_name, dirs, cfg, S, transforms, redirect, init, init_mask,
                                  device, progress)

    images = np.zeros((m, P, P, 3), dtype=np.uint8)
    attempts_obj = np.full((A, m), -np.inf, dtype=np.float64)
    best = np.zeros(m, dtype=np.int64)
    batches = [(k, min(k + cfg.batch_size, m)) for k in range(0, m, cfg.batch_size)]
    bar = None
    if progress and m:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * A, desc=f"icons {layer}", unit="batch")
    t0 = time.perf_counter()
    try:
        for k0, k1 in batches:
            v = dirs[k0:k1]
            if cfg.objective == "dot":
                main = direction(layer_name, v, S=S)
            else:
                main = direction_cossim(layer_name, v, S=S, power=cfg.power, variant=cfg.objective)
            full = main + cfg.boundary_weight * boundary_penalty(5) if cfg.boundary_weight else main
            best_imgs = None
            for a in range(A):
                gen = torch.Generator().manual_seed(_seed(cfg.seed, a, k0))
                param = FFTImage(k1 - k0, P, P, generator=gen, device=device)
                res = optimize(spec, param, full, transforms, steps=cfg.steps, lr=cfg.lr,
                               generator=gen, progress=False, record=main, redirected_relu=redirect)
                score = res.final_record
                attempts_obj[a, k0:k1] = score
                if best_imgs is None:
                    best_imgs = res.images[:, :3].clone()
                else:
                    better = torch.as_tensor(score > attempts_obj[best[k0:k1], np.arange(k0, k1)],
                                             device=best_imgs.device)
                    best_imgs[better] = res.images[better, :3]
                    best[k0:k1] = np.where(better.cpu().numpy(), a, best[k0:k1])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(objective=f"{float(np.mean(score)):.4g}")
            images[k0:k1] = _to_uint8(best_imgs)
    finally:
        if bar is not None:
            bar.close()
    objective = attempts_obj[best, np.arange(m)] if m else np.zeros(0)
    fidelity = (icon_fidelity(spec, layer_name, images, dirs, S, device=device, batch_size=cfg.batch_size)
                if m else np.zeros(0))
    seconds = time.perf_counter() - t0
    log.info("rendered %d icons (%d px, %d steps x %d attempts) for %s in %.1f s", m, P, cfg.steps, A,
             layer, seconds)
    return IconSet(images=images, objective=objective, fidelity=fidelity, attempts_objective=attempts_obj,
                   best_attempt=best, layer=layer, config=cfg, seconds=seconds,
                   steps=np.full(m, cfg.steps * A, np.int64))


def _objectives(layer_name: str, dirs: np.ndarray, S, cfg: RenderConfig):
    """(direction term, full objective) for the target rows `dirs`."""
    if cfg.objective == "dot":
        main = direction(layer_name, dirs, S=S)
    else:
        main = direction_cossim(layer_name, dirs, S=S, power=cfg.power, variant=cfg.objective)
    return main, (main + cfg.boundary_weight * boundary_penalty(5) if cfg.boundary_weight else main)


def _render_continuous(spec, layer, layer_name, dirs, cfg: RenderConfig, S, transforms, redirect, init, init_mask,
                       device, progress) -> IconSet:
    """`render_icons` through `optimize_queue`: every (attempt, icon) is one item of the queue, started
    from `init` (attempt 0) or a spectrum seeded by (seed, attempt, icon), so an icon's start does not
    depend on which icons share its batch; each stops by `cfg`'s rule; the best attempt is kept."""
    m, P, A = len(dirs), cfg.icon_size, cfg.attempts
    t0 = time.perf_counter()

    def make_param(b):   # its random start is overwritten; a local generator leaves the global RNG alone
        return FFTImage(b, P, P, device=device, generator=torch.Generator().manual_seed(0))

    starts = []
    for a in range(A):
        for k in range(m):
            gen = torch.Generator().manual_seed(_seed(cfg.seed, a, k))
            starts.append(FFTImage(1, P, P, generator=gen).spectrum.detach())
    start = torch.cat(starts, dim=1) if starts else torch.zeros(2, 0, 3, P, P // 2 + 1)
    if init is not None and init_mask.any():
        rows = np.flatnonzero(init_mask)
        x = torch.as_tensor(init[rows]).permute(0, 3, 1, 2).float() / 255.0
        start[:, torch.as_tensor(rows)] = make_param(1).spectrum_of(x).cpu()
    stop = StopRule(max_steps=cfg.steps, plateau=cfg.stop == "plateau", min_steps=min(cfg.min_steps, cfg.steps),
                    window=cfg.plateau_window, tol=cfg.plateau_tol)
    bar = None
    if progress and m:
        from tqdm.auto import tqdm

        bar = tqdm(total=m * A, desc=f"icons {layer}", unit="icon")
    try:
        res = optimize_queue(
            spec, make_param, start, lambda items: _objectives(layer_name, dirs[np.asarray(items) % m], S, cfg)[1],
            transforms, stop, cfg.batch_size, lr=cfg.lr, schedule=cfg.lr_schedule,
            generator=torch.Generator().manual_seed(_seed(cfg.seed, 1_000_003)),
            make_record=lambda items: _objectives(layer_name, dirs[np.asarray(items) % m], S, cfg)[0],
            redirected_relu=redirect, on_done=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    rec = res.record.reshape(A, m) if m else np.zeros((A, 0))
    best = np.argmax(rec, axis=0) if m else np.zeros(0, np.int64)
    imgs = res.images.reshape(A, m, 3, P, P) if m else torch.zeros(A, 0, 3, P, P)
    images = _to_uint8(imgs[torch.as_tensor(best), torch.arange(m)]) if m else np.zeros((0, P, P, 3), np.uint8)
    objective = rec[best, np.arange(m)] if m else np.zeros(0)
    fidelity = (icon_fidelity(spec, layer_name, images, dirs, S, device=device, batch_size=cfg.batch_size)
                if m else np.zeros(0))
    steps = res.steps.reshape(A, m).sum(axis=0) if m else np.zeros(0, np.int64)
    seconds = time.perf_counter() - t0
    log.info("rendered %d icons (%d px, %.1f steps per icon on average, at most %d x %d attempts) for %s in %.1f s",
             m, P, float(steps.mean()) if m else 0.0, cfg.steps, A, layer, seconds)
    return IconSet(images=images, objective=objective, fidelity=fidelity, attempts_objective=rec,
                   best_attempt=best.astype(np.int64), layer=layer, config=cfg, seconds=seconds, steps=steps)


ICON_ARRAYS = ("images", "objective", "fidelity", "steps")
"""What the render stage stores per icon (`render_icon_batch`)."""


def render_icon_batch(spec: ModelSpec, layer: str, directions: np.ndarray, cfg: RenderConfig,
                      S: np.ndarray | None = None, render=None, init: np.ndarray | None = None,
                      init_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The engine-independent unit of the render stage: one committed unit of icons.

    `render_icons` without a progress bar, returning only what the pipeline stores (`ICON_ARRAYS`):
    {"images": uint8 [m, P, P, 3], "objective": [m], "fidelity": [m], "steps": int64 [m]}. The local
    loop and the Ray tasks both call this, with the unit's own seed in `cfg`, so they give the same icons.
    `init` uint8 [m, P, P, 3] / `init_mask` bool [m]: start images for the rows where the mask is True
    (all rows without a mask); the other rows start at random.
    `render`: the renderer to call (default `render_icons`; the pipeline passes the package's
    attribute so a substituted one, e.g. in a test, is used).
    """
    kwargs = {}
    if init is not None and (init_mask is None or np.asarray(init_mask).any()):
        kwargs = {"init": init, "init_mask": init_mask}
    icons = (render or render_icons)(spec, layer, directions, cfg, S=S, progress=False, **kwargs)
    steps = icons.steps if icons.steps is not None else np.full(len(icons.images), cfg.steps * cfg.attempts)
    return {"images": icons.images, "objective": icons.objective, "fidelity": icons.fidelity,
            "steps": np.asarray(steps, np.int64)}
