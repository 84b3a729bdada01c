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

__all__ = ["OptimResult", "optimize", "evaluate_objective"]


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
