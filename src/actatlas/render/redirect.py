"""Lucid's "redirected ReLU" gradient for feature visualization, as a temporary swap of ReLU modules.

A random starting image often leaves the unit being visualized (or units on the way to it) below zero,
where a ReLU passes no gradient, so the optimisation never starts. Lucid's ``redirected_relu_grad``
(``lucid/misc/redirected_relu_grad.py``, used by ``render_vis`` by default) changes only the backward
pass of each ReLU, and only during the first steps. With x the ReLU's input and g = dloss/dy its
incoming gradient (the optimiser minimises loss = -objective):

- ``relu_grad`` = g where x > 0, else 0 (the true gradient);
- ``redirected`` = g, except 0 where x <= 0 and g > 0, i.e. where a descent step would push an already
  inactive input further down; so where x <= 0 the gradient passes only if it pushes x up;
- per image b of the batch: ``relu_grad[b]`` if it has any non-zero entry, else ``redirected[b]``
  ("only use redirected gradient where nothing got through the original gradient");
- at steps 0..16 (Lucid's ``global_step <= 16``: the first `REDIRECT_STEPS` = 17 steps); afterwards
  the true gradient. The forward values never change.

ReLU6 (``redirected_relu6_grad``) the same way, with the upper flat region too: the true gradient passes
where 0 < x < 6; the redirected one is 0 where x <= 0 and g > 0 or x >= 6 and g < 0.

Differences to Lucid, both on a set of measure zero: at x == 0 exactly (and x == 6) the true gradient
here is torch's (0), where Lucid's override passes g. lucent's ``RedirectedReLU`` differs more: it scales
the gradient where x < 0 by 0.1 on every step, without the direction test or the step limit.

`redirected_relu(module)` swaps every ``nn.ReLU`` and ``nn.ReLU6`` child for a `RedirectedReLU` for the
duration of a ``with`` block (hooks registered on the original modules keep firing) and yields a
`RedirectSchedule`; the optimisation loop calls ``schedule.set_step(i)`` before each step. Modules that
apply their activation in place through a flag ``inplace_act`` (EfficientNet-Lite's units) have it off
inside the block, so the swapped module really runs. Whether a render uses it: `RenderConfig.redirected_relu`
(None = the model's default, ``spec.info["redirected_relu"]``: on for inceptionv1, off otherwise).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["REDIRECT_STEPS", "RedirectSchedule", "RedirectedReLU", "redirected_relu", "redirected_relu_grad",
           "uses_redirected_relu"]

REDIRECT_STEPS = 17
"""Steps with the redirected gradient: Lucid redirects while ``global_step <= 16`` (steps 0..16)."""

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@dataclass
class RedirectSchedule:
    """Shared by every swapped module of one `redirected_relu` block: redirect while ``step < steps``."""

    steps: int = REDIRECT_STEPS
    step: int = 0
    images: torch.Tensor | None = None

    def set_step(self, step: int) -> None:
        self.step = int(step)
        self.images = None

    def set_image_steps(self, steps: torch.Tensor) -> None:
        """Per-image steps [b] (continuous batching, where every image of the batch is at its own step):
        image b has the redirected gradient while ``steps[b] < self.steps``."""
        self.images = torch.as_tensor(steps) < self.steps
        self.step = 0 if bool(self.images.any()) else self.steps

    @property
    def active(self) -> bool:
        return self.step < self.steps


def redirected_relu_grad(x: torch.Tensor, grad: torch.Tensor, upper: float | None = None,
                         images: torch.Tensor | None = None) -> torch.Tensor:
    """The redirected input gradient of relu (``upper=None``) or relu6 (``upper=6``) at input `x` for the
    incoming gradient `grad` (dloss/dy), both [b, ...] (see the module docstring). `images`: bool [b],
    the images that get it (the others get the true gradient); None: all."""
    if upper is None:
        inside = x > 0
        blocked = (x <= 0) & (grad > 0)
    else:
        inside = (x > 0) & (x < upper)
        blocked = ((x <= 0) & (grad > 0)) | ((x >= upper) & (grad < 0))
    true_grad = grad.masked_fill(~inside, 0)
    redirected = grad.masked_fill(blocked, 0)
    if x.dim() >= 2:  # per image: the true gradient where any of it flows
        flows = (true_grad != 0).flatten(1).any(dim=1).view(-1, *([1] * (x.dim() - 1)))
    else:
        flows = (true_grad != 0).any()
    if images is not None and x.dim() >= 2:
        flows = flows | ~images.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(flows, true_grad, redirected)


class _RedirectedClamp(torch.autograd.Function):
    """relu / relu6 forward; `redirected_relu_grad` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None, images: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.upper = upper
        ctx.images = images
        return F.relu(x) if upper is None else F.relu6(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return redirected_relu_grad(x, grad, ctx.upper, ctx.images), None, None


class RedirectedReLU(nn.Module):
    """ReLU (or ReLU6 with ``upper=6``) whose gradient is redirected while `schedule` is active.

    [any shape] -> same shape; forward values equal ``F.relu`` / ``F.relu6``; outside the schedule's
    active steps (or without autograd) it is exactly torch's op.
    """

    def __init__(self, schedule: RedirectSchedule, upper: float | None = None):
        super().__init__()
        self.schedule = schedule
        self.upper = upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.schedule.active and torch.is_grad_enabled() and x.requires_grad:
            return _RedirectedClamp.apply(x, self.upper, self.schedule.images)
        return F.relu(x) if self.upper is None else F.relu6(x)

    def extra_repr(self) -> str:
        return f"upper={self.upper}, steps={self.schedule.steps}"


def _replacement(child: nn.Module, schedule: RedirectSchedule) -> RedirectedReLU | None:
    if type(child) is nn.ReLU:
        new = RedirectedReLU(schedule)
    elif type(child) is nn.ReLU6:
        new = RedirectedReLU(schedule, upper=6.0)
    else:
        return None
    for name in _HOOK_DICTS:  # hooks registered on the original keep firing (and stay removable)
        if hasattr(child, name):
            object.__setattr__(new, name, getattr(child, name))
    new.train(child.training)
    return new


@contextlib.contextmanager
def redirected_relu(module: nn.Module, steps: int = REDIRECT_STEPS) -> Iterator[RedirectSchedule]:
    """Within the block every ``nn.ReLU`` / ``nn.ReLU6`` inside `module` is a `RedirectedReLU`; restored
    afterwards (also on errors). Yields the `RedirectSchedule` the caller advances with ``set_step``.

    Only activation *modules* are swapped: a network that calls ``F.relu`` directly keeps its gradient.
    """
    schedule = RedirectSchedule(steps=steps)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    flags: list[tuple[nn.Module, bool]] = []
    try:
        for parent in list(module.modules()):
            for name, child in list(parent._modules.items()):
                new = _replacement(child, schedule) if child is not None else None
                if new is not None:
                    parent._modules[name] = new
                    swapped.append((parent, name, child))
            flag = getattr(parent, "inplace_act", None)
            if isinstance(flag, bool) and flag:
                flags.append((parent, flag))
                parent.inplace_act = False
        yield schedule
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child
        for parent, flag in flags:
            parent.inplace_act = flag


def uses_redirected_relu(setting: bool | None, info: dict | None) -> bool:
    """A render's redirected-ReLU choice: `setting` when given, else the model's default
    (``info["redirected_relu"]``, False when absent)."""
    if setting is not None:
        return bool(setting)
    return bool((info or {}).get("redirected_relu", False))
