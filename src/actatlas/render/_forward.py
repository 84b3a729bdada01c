"""Run a network only as far as the layers an objective needs (performance.md "Rendering on CPU").

`forward_to_layers` runs a model only as far as the layers it needs: it records the
output of each named module and ends the forward pass (by raising inside the hook) as soon as all of
them have been produced, so modules after the deepest needed layer never run. Autograd graphs of the
recorded outputs stay intact, so the caller can back-propagate to the input image.
"""

from __future__ import annotations

import contextlib
import time
import logging
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..hooks import get_module
from ..models.spec import ModelSpec

log = logging.getLogger(__name__)

__all__ = ["forward_to_layers", "model_input", "frozen", "warmup"]


class _StopForward(Exception):
    """Raised inside a forward hook once every requested layer has been recorded."""


def forward_to_layers(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of modules `names` (dotted names) for input `x`; later modules are not run.

    Args:
        model: the network; ``model(x)`` is its forward.
        x: its input, [b, 3, h, w] already normalised (see `model_input`).
        names: dotted module names (resolve aliases first with ``ModelSpec.resolve_layer``).

    Returns:
        ``{name: output}``, e.g. [b, c, h', w'] per layer. The first call of a module is kept when it
        runs more than once. Raises RuntimeError if a layer is never reached.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return {}
    out: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(mod, inp, o):
            if name not in out:
                out[name] = o
            if len(out) == len(wanted):
                raise _StopForward
        return hook

    try:
        for name in wanted:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        try:
            model(x)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in wanted if n not in out]
    if missing:
        raise RuntimeError(f"layers {missing} were not reached in the forward pass")
    return out


def model_input(spec: ModelSpec, x01: torch.Tensor) -> torch.Tensor:
    """[b, 3, h, w] in [0, 1] -> the model's input scale, channels_last when the spec asks for it."""
    x = spec.preprocess.normalize(x01)
    if spec.info.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter for the duration; restored afterwards.

    Gradients then flow to the input image only (method.md §1.11), and BatchNorm statistics never move.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        module.eval()
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def warmup(spec: ModelSpec, layers: Iterable[str], sizes: Iterable[tuple[int, int]], batch: int,
           device: str | torch.device = "cpu", max_shapes: int = 32) -> float:
    """Run forward + input-gradient backward once per input shape, so oneDNN sets up its kernels
    before timing starts (each new shape costs 0.5-1.5 s on CPU; performance.md pitfalls).

    Args:
        layers: layer names or aliases to run up to.
        sizes: network input sizes (h, w), e.g. ``transform.output_sizes((80, 80))``.
        batch: batch size b of the real run (the shape includes it).
        max_shapes: skip (return 0) when there are more shapes than this: not cheap then.

    Returns:
        seconds spent.
    """
    sizes = sorted(set(sizes))
    if len(sizes) > max_shapes:
        log.info("warmup skipped: %d input shapes > max_shapes=%d", len(sizes), max_shapes)
        return 0.0
    names = [spec.resolve_layer(n) for n in layers]
    t0 = time.perf_counter()
    with frozen(spec.module):
        for h, w in sizes:
            x = torch.full((batch, 3, h, w), 0.5, device=device, requires_grad=True)
            acts = forward_to_layers(spec.module, model_input(spec, x), names)
            sum(a.float().mean() for a in acts.values()).backward()
    dt = time.perf_counter() - t0
    log.info("warmup: %d shapes in %.2f s", len(sizes), dt)
    return dt
