"""Name-addressed access to a model's intermediate layers.

- `list_layers(model, input_shape)`: every hookable module with its output shape.
- `capture(model, names)`: context manager that records the outputs of the named modules.
- `stop_after(model, name)`: run the network only up to a layer (icon rendering, method.md §1.11).

Hooks are always removed in ``finally`` (Captum's habit).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class LayerInfo:
    """One hookable module: dotted `name`, module `kind` (class name) and output `shape` [c, h, w] or [d]."""

    name: str
    kind: str
    shape: tuple[int, ...]

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 3


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise KeyError(name) from exc


def list_layers(model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "cpu") -> list[LayerInfo]:
    """Run one dummy forward of shape `input_shape` ([1, 3, s, s]) and report each module whose
    output is a single tensor, in execution order."""
    seen: dict[str, LayerInfo] = {}
    handles = []

    def make_hook(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor) and name not in seen:
                seen[name] = LayerInfo(name, type(mod).__name__, tuple(out.shape[1:]))
        return hook

    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_hook(make_hook(name)))
        with torch.inference_mode():
            model(torch.zeros(*input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str],
            transform: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of modules `names` into the yielded dict on each forward.

    `transform(name, output)` may return a replacement output (used to attach forward-mode tangents
    for attribution, method.md §1.3); returning None keeps the output.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(mod, inp, out):
            if transform is not None:
                new = transform(name, out)
                if new is not None:
                    out = new
            store[name] = out
            return out
        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()
