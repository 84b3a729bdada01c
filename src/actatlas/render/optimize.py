"""The one feature-visualization optimisation loop (method.md §1.11 "Optimizer").

Each step: image = param() [b, 3, H, W] -> x = transforms(image) [b, 3, h', w'] -> the network runs
only up to the deepest layer the objective needs -> values = objective(ctx) [b] -> loss = -values.sum()
(the ONLY place an objective is negated, design.md) -> Adam step on the image parameters. Model
parameters are frozen; gradients reach the image only.

Adam: lr 0.05, betas (0.9, 0.999), eps 1e-8 (TF defaults, as the recipe). The recorded per-image values
are those of the last step *before* its update, under that step's random transform (Lucid records
``sess.run([losses, vis_op])``, so best-of-N uses that noisy value; §1.11 "tries").
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models.spec import ModelSpec
from ._forward import forward_to_layers, frozen, model_input
from .objectives import RenderContext, as_objective
from .redirect import redirected_relu as redirect_relus
from .transforms import Transform

log = logging.getLogger(__name__)

__all__ = ["OptimResult", "optimize", "evaluate_objective", "StopRule", "QueueResult", "optimize_queue", "lr_factor"]


@dataclass
class OptimResult:
    """Outcome of `optimize`.

    Attributes:
        final_values: [b] objective per image at the last step (pre-update, as Lucid records).
        history: [steps] mean objective over the batch at every step (pre-update).
        images: [b, C, H, W] the parameterized image after the last update, detached, in (0, 1).
        final_record: [b] values of the `record` objective at the last step, or None.
        seconds: wall time of the loop.
    """

    final_values: np.ndarray
    history: np.ndarray
    images: torch.Tensor
    final_record: np.ndarray | None = None
    seconds: float = 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / max(1, len(self.history))


def _context(spec: ModelSpec, objective_layers, img: torch.Tensor, transforms: Transform | None,
             generator: torch.Generator | None) -> RenderContext:
    """Transform `img`, run the network up to the needed layers, and package the context."""
    x = transforms(img, generator) if transforms is not None else img
    acts = {}
    if objective_layers:
        resolved = {name: spec.resolve_layer(name) for name in objective_layers}
        out = forward_to_layers(spec.module, model_input(spec, x), list(set(resolved.values())))
        acts = {name: out[mod] for name, mod in resolved.items()}
    return RenderContext(acts=acts, image=img, input=x)


def optimize(spec: ModelSpec, param: nn.Module, objective, transforms: Transform | None = None,
             steps: int = 128, lr: float = 0.05, generator: torch.Generator | None = None,
             progress: bool = True, record=None, redirected_relu: bool = False) -> OptimResult:
    """Maximise `objective` over the parameters of `param` (method.md §1.10-1.11).

    Args:
        spec: the model (its module runs frozen, in eval mode; flags are restored afterwards).
        param: an ``nn.Module`` whose ``forward()`` returns the image [b, 3, H, W] in (0, 1), e.g.
            `FFTImage`; its parameters are the only ones optimised.
        objective: an `Objective` (or anything `as_objective` accepts) returning [b].
        transforms: a `Transform` applied to the image every step (None: the image as is).
        steps: optimisation steps (0: evaluate once, no update).
        lr: Adam learning rate (0.05 as the recipe).
        generator: torch.Generator for the transforms' draws (default: a fresh one seeded 0).
        progress: show a tqdm bar.
        record: optional extra `Objective` evaluated on the same forward pass; its last-step values
            are returned as ``final_record`` (render_icons records the direction term without the
            boundary penalty there, as the recipe does).

    Returns:
        `OptimResult`.
    """
    objective = as_objective(objective)
    record = as_objective(record) if record is not None else None
    layers = objective.layers | (record.layers if record is not None else frozenset())
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    params = [p for p in param.parameters() if p.requires_grad]
    if not params:
        raise ValueError("param has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)

    bar = None
    if progress and steps > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="render", unit="step", leave=False)
    history: list[torch.Tensor] = []
    final = rec = None
    t0 = time.perf_counter()
    with frozen(spec.module), (redirect_relus(spec.module) if redirected_relu
                               else contextlib.nullcontext()) as schedule:
        try:
            if steps == 0:
                with torch.no_grad():
                    ctx = _context(spec, layers, param(), transforms, generator)
                    final = objective(ctx).detach()
                    rec = record(ctx).detach() if record is not None else None
            for i in range(steps):
                if schedule is not None:
                    schedule.set_step(i)
                ctx = _context(spec, layers, param(), transforms, generator)
                values = objective(ctx)
                if values.dim() != 1:
                    raise ValueError(f"objective {objective.name} must return [b], got {tuple(values.shape)}")
                loss = -values.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                vals = values.detach()
                history.append(vals.mean())
                if i == steps - 1:
                    final = vals
                    if record is not None:
                        with torch.no_grad():
                            rec = record(ctx).detach()
                if bar is not None:
                    bar.update(1)
                    if i % 16 == 0 or i == steps - 1:
                        bar.set_postfix(objective=f"{float(vals.mean()):.4g}")
        finally:
            if bar is not None:
                bar.close()
        with torch.no_grad():
            images = param().detach()
    seconds = time.perf_counter() - t0
    hist = torch.stack(history).cpu().numpy() if history else np.zeros(0, dtype=np.float32)
    log.debug("optimize %s: %d steps in %.2f s", objective.name, steps, seconds)
    return OptimResult(final_values=final.cpu().numpy(), history=hist, images=images,
                       final_record=rec.cpu().numpy() if rec is not None else None, seconds=seconds)


@torch.no_grad()
def evaluate_objective(spec: ModelSpec, images: torch.Tensor, objective,
                       transforms: Transform | None = None,
                       generator: torch.Generator | None = None) -> np.ndarray:
    """Objective values [b] for fixed images [b, 3, H, W] in [0, 1] (no optimisation)."""
    objective = as_objective(objective)
    with frozen(spec.module):
        ctx = _context(spec, objective.layers, images, transforms, generator)
        return objective(ctx).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# continuous batching: every image stops at its own plateau and its slot takes the next one


@dataclass(frozen=True)
class StopRule:
    """When one image of `optimize_queue` is done.

    max_steps: the hard cap (every image stops here).
    plateau: stop earlier, at the image's own plateau: after at least `min_steps` (and 2 x `window`),
        once the mean of its recorded objective over the last `window` steps exceeds the mean over the
        `window` steps before by less than `tol` times the latter's magnitude (a relative gain: the
        objective's scale depends on the target's norm; two window means: the values are noisy, since
        every step sees a new random transform). False: every image runs `max_steps`.
    """

    max_steps: int = 128
    plateau: bool = False
    min_steps: int = 16
    window: int = 8
    tol: float = 0.01

    def __post_init__(self):
        if self.max_steps < 1 or self.min_steps < 1 or self.window < 1:
            raise ValueError(f"max_steps, min_steps and window must be >= 1, got {self}")

    def done(self, history: list[float]) -> bool:
        """Whether an image with these recorded values (one per step taken) is done."""
        t = len(history)
        if t >= self.max_steps:
            return True
        if not self.plateau or t < max(self.min_steps, 2 * self.window):
            return False
        w = self.window
        before = float(np.mean(history[-2 * w:-w]))
        return float(np.mean(history[-w:])) - before < self.tol * abs(before)


@dataclass
class QueueResult:
    """Outcome of `optimize_queue`: per item (in the order given)

    images: [n, 3, H, W] the image after its last update, detached, on the CPU, in (0, 1).
    record: [n] the `record` objective at its last step (pre-update), or the objective's without one.
    steps: int64 [n] the optimiser steps the item took.
    seconds: wall time; batch_steps: forward/backward passes run (each over up to `batch` images).
    """

    images: torch.Tensor
    record: np.ndarray
    steps: np.ndarray
    seconds: float = 0.0
    batch_steps: int = 0


def lr_factor(schedule: str, t: torch.Tensor, max_steps: int) -> torch.Tensor:
    """The learning-rate multiplier at per-image steps `t` [b]: "constant" 1; "cosine" from 1 down to
    0.1 at `max_steps` (half a cosine); "warmup-cosine" the same after a linear ramp over the first
    8 steps."""
    u = (t.to(torch.float64) / max(1, max_steps)).clamp(0, 1)
    if schedule == "constant":
        return torch.ones_like(u)
    cos = 0.1 + 0.9 * 0.5 * (1 + torch.cos(np.pi * u))
    if schedule == "cosine":
        return cos
    if schedule == "warmup-cosine":
        return cos * ((t.to(torch.float64) + 1) / 8).clamp(max=1)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}: constant, cosine or warmup-cosine")


def optimize_queue(spec: ModelSpec, make_param, start: torch.Tensor, make_objective, transforms: Transform | None,
                   stop: StopRule, batch: int, lr: float = 0.05, schedule: str = "constant",
                   generator: torch.Generator | None = None, make_record=None, redirected_relu: bool = False,
                   on_done=None) -> QueueResult:
    """Optimise n images, `batch` at a time, each until its own `stop` (method.md §1.11 Adam, TF defaults).

    The batch is a set of slots; when an image stops, its slot is refilled with the next image of the
    queue, with a fresh optimiser state, so no pass is spent on finished images (continuous batching).
    Once the queue is empty the batch shrinks to the images still running. Adam is written out here
    because its step count is per image (torch's Adam keeps one per tensor).

    Args:
        make_param: ``make_param(b)`` -> an `FFTImage`-like module of batch b with a ``spectrum``
            parameter [2, b, ...] (the batch index is dimension 1).
        start: [2, n, ...] the starting spectrum of every image.
        make_objective: ``make_objective(items)`` -> the `Objective` for the images `items` (queue
            indices, one per slot, in slot order) — the objective's per-image targets follow the slots.
        make_record: the same for the recorded objective (e.g. the direction term without penalties);
            None: the objective itself.
        transforms, generator: as `optimize` (one draw per pass, shared by the slots).
        stop: the `StopRule`; lr, schedule: Adam's rate and its per-image schedule (`lr_factor`).
        redirected_relu: Lucid's redirected ReLU gradient for each image's own first steps.
        on_done: ``on_done(k)`` called with the number of images that finished (e.g. a progress bar).
    """
    n = int(start.shape[1])
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    b1, b2, eps = 0.9, 0.999, 1e-8
    param = make_param(min(batch, n)) if n else None
    out_images: torch.Tensor | None = None
    out_record = np.zeros(n, np.float64)
    out_steps = np.zeros(n, np.int64)
    t0 = time.perf_counter()
    passes = 0
    if n == 0:
        return QueueResult(torch.zeros(0), out_record, out_steps, 0.0, 0)
    device = param.spectrum.device
    slots = list(range(min(batch, n)))            # queue index per slot
    nxt = len(slots)
    with torch.no_grad():
        param.spectrum.copy_(start[:, slots].to(device))
    m = torch.zeros_like(param.spectrum)
    v = torch.zeros_like(param.spectrum)
    t = torch.zeros(len(slots), dtype=torch.int64)
    hist: list[list[float]] = [[] for _ in slots]
    objective = record = None
    layers: frozenset = frozenset()
    dirty = True
    with frozen(spec.module), (redirect_relus(spec.module) if redirected_relu
                               else contextlib.nullcontext()) as rschedule:
        while slots:
            if dirty:
                objective = as_objective(make_objective(list(slots)))
                record = as_objective(make_record(list(slots))) if make_record is not None else objective
                layers = objective.layers | record.layers
                dirty = False
            if rschedule is not None:
                rschedule.set_image_steps(t)
            ctx = _context(spec, layers, param(), transforms, generator)
            values = objective(ctx)
            if values.dim() != 1 or len(values) != len(slots):
                raise ValueError(f"objective {objective.name} must return [{len(slots)}], got {tuple(values.shape)}")
            rec = (record(ctx) if record is not objective else values).detach().to(torch.float64).cpu()
            param.spectrum.grad = None
            (-values.sum()).backward()
            passes += 1
            with torch.no_grad():
                g = param.spectrum.grad
                t += 1
                shape = (1, len(slots)) + (1,) * (g.dim() - 2)
                tt = t.to(device=device, dtype=torch.float64)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = (lr * lr_factor(schedule, t - 1, stop.max_steps).to(device) / (1 - b1 ** tt))
                denom = (v / (1 - b2 ** tt).view(shape).to(v.dtype)).sqrt_().add_(eps)
                param.spectrum.sub_(step.view(shape).to(m.dtype) * m / denom)
            done = []
            for s in range(len(slots)):
                hist[s].append(float(rec[s]))
                if stop.done(hist[s]):
                    done.append(s)
            if not done:
                continue
            with torch.no_grad():
                imgs = param()[done, :3].detach().cpu()
            if out_images is None:
                out_images = torch.zeros((n,) + tuple(imgs.shape[1:]), dtype=imgs.dtype)
            for j, s in enumerate(done):
                k = slots[s]
                out_images[k] = imgs[j]
                out_record[k] = float(rec[s])
                out_steps[k] = int(t[s])
            if on_done is not None:
                on_done(len(done))
            dirty = True
            keep = [s for s in range(len(slots)) if s not in set(done)]
            refill = done[:max(0, n - nxt)]
            with torch.no_grad():
                for s in refill:                       # the next image takes the slot, fresh state
                    slots[s] = nxt
                    param.spectrum[:, s] = start[:, nxt].to(device)
                    m[:, s] = 0
                    v[:, s] = 0
                    t[s] = 0
                    hist[s] = []
                    nxt += 1
            alive = sorted(keep + refill)
            if len(alive) < len(slots):               # queue empty: shrink to the images still running
                idx = torch.as_tensor(alive, dtype=torch.long)
                new = make_param(len(alive)) if alive else None
                if new is not None:
                    with torch.no_grad():
                        new.spectrum.copy_(param.spectrum[:, idx.to(device)])
                    m, v = m[:, idx.to(device)].clone(), v[:, idx.to(device)].clone()
                    t = t[idx].clone()
                param = new
                slots = [slots[s] for s in alive]
                hist = [hist[s] for s in alive]
    seconds = time.perf_counter() - t0
    return QueueResult(out_images, out_record, out_steps, seconds, passes)
