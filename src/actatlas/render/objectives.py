"""Feature-visualization objectives and their algebra (method.md §1.9, §1.11; Lucid style).

An `Objective` maps a `RenderContext` to one value per image, a Tensor [b], so that best-of-N
selection and fidelity work per icon. Objectives are always *maximised*; the optimiser negates in one
place (`optimize.optimize`). They combine with ``+``, ``-``, unary ``-``, and scalar ``*`` / ``/``::

    obj = direction_cossim("blocks.8", v, S=S, power=2) + 1.0 * boundary_penalty(5)

`Objective.layers` is the set of layer names the objective reads from ``ctx.acts``; the optimiser runs
the network only up to the deepest of them.

Objectives here:
- `direction`: [RECIPE] ``direction_neuron_S``, mean_k(h_k v'_k) at the centre position.
- `direction_cossim`: variant "lucid" = [RECIPE] ``direction_neuron_cossim_S`` ported exactly (mean dot,
  "cosine" = dot / (1e-4 + ||h||), floored at 0.1); variant "cosine" = the article's (h.v') cos(h,v')^p
  with the true cosine, floored at 0.1 (method.md §1.9, §7.A6).
- `channel`, `neuron`: mean of one channel over space / at the centre.
- `boundary_penalty`: [RECIPE] ``penalize_boundary_complexity(w=5)`` on the untransformed image (§1.11).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RenderContext", "Objective", "as_objective", "direction", "direction_cossim", "channel", "neuron",
    "boundary_penalty", "blur5", "target_vectors",
]


@dataclass
class RenderContext:
    """What an objective sees at one optimisation step.

    Attributes:
        acts: layer name (as the objective names it) -> activations [b, c, h, w] of the transformed batch.
        image: the untransformed parameterized image [b, 3, H, W] in (0, 1).
        input: the transformed image fed to the network [b, 3, h', w'] in [0, 1] (None if not run).
    """

    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    image: torch.Tensor | None = None
    input: torch.Tensor | None = None


def _compound(name: str) -> bool:
    return " + " in name or " - " in name


def _paren(name: str) -> str:
    return f"({name})" if _compound(name) else name


class Objective:
    """A maximised quantity, ``fn(ctx) -> Tensor [b]``, with the Lucid algebra.

    Args:
        fn: callable taking a `RenderContext` and returning one value per image, [b].
        name: readable description (shown in progress bars and logs).
        layers: layer names `fn` reads from ``ctx.acts``.
    """

    def __init__(self, fn: Callable[[RenderContext], torch.Tensor], name: str = "objective",
                 layers: Iterable[str] = ()):
        self.fn = fn
        self.name = name
        self.layers = frozenset(layers)

    def __call__(self, ctx: RenderContext) -> torch.Tensor:
        return self.fn(ctx)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    # --- algebra -------------------------------------------------------------------------------------
    def __add__(self, other):
        if isinstance(other, numbers.Number):
            if other == 0:
                return self
            c = float(other)
            return Objective(lambda ctx: self(ctx) + c, f"{self.name} + {c:g}", self.layers)
        other = as_objective(other)
        return Objective(lambda ctx: self(ctx) + other(ctx), f"{self.name} + {other.name}",
                         self.layers | other.layers)

    def __radd__(self, other):  # so that sum([obj1, obj2]) works (0 + obj1)
        return self + other

    def __neg__(self):
        return Objective(lambda ctx: -self(ctx), f"-{_paren(self.name)}", self.layers)

    def __sub__(self, other):
        if isinstance(other, numbers.Number):
            return self + (-float(other))
        other = as_objective(other)
        return Objective(lambda ctx: self(ctx) - other(ctx), f"{self.name} - {_paren(other.name)}",
                         self.layers | other.layers)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, k):
        if not isinstance(k, numbers.Number):
            return NotImplemented
        k = float(k)
        return Objective(lambda ctx: k * self(ctx), f"{k:g} * {_paren(self.name)}", self.layers)

    __rmul__ = __mul__

    def __truediv__(self, k):
        if not isinstance(k, numbers.Number):
            return NotImplemented
        return self * (1.0 / float(k))

    @staticmethod
    def sum(objs: Iterable["Objective"]) -> "Objective":
        objs = [as_objective(o) for o in objs]
        if not objs:
            raise ValueError("Objective.sum of nothing")
        total = objs[0]
        for o in objs[1:]:
            total = total + o
        return total


def as_objective(obj) -> Objective:
    """Objective -> itself; ``"layer:n"`` -> ``channel(layer, n)``; a callable ``fn(ctx) -> [b]`` ->
    ``Objective(fn)`` (it then reads no layers)."""
    if isinstance(obj, Objective):
        return obj
    if isinstance(obj, str):
        layer, _, n = obj.rpartition(":")
        if not layer:
            raise ValueError(f"objective string must be 'layer:channel', got {obj!r}")
        return channel(layer.strip(), int(n))
    if callable(obj):
        return Objective(obj, getattr(obj, "__name__", "objective"))
    raise TypeError(f"cannot make an Objective from {type(obj).__name__}")


# --- helpers -----------------------------------------------------------------------------------------
def target_vectors(vectors, S=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """v' = v @ S (or v when S is None), [b, c] in `dtype` (method.md §1.8: the whitened target).

    Args:
        vectors: [b, c] (or [c], treated as [1, c]) numpy array or tensor.
        S: [c, c] whitening matrix (inverse second moment) or None. The product is done in float64.
    """
    v = torch.as_tensor(np.asarray(vectors) if not torch.is_tensor(vectors) else vectors).detach().cpu()
    v = v.to(torch.float64)
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2:
        raise ValueError(f"direction vectors must be [b, c], got shape {tuple(v.shape)}")
    if S is not None:
        s = torch.as_tensor(np.asarray(S) if not torch.is_tensor(S) else S).detach().cpu().to(torch.float64)
        if s.shape != (v.shape[1], v.shape[1]):
            raise ValueError(f"S must be [c, c] = [{v.shape[1]}, {v.shape[1]}], got {tuple(s.shape)}")
        v = v @ s
    return v.to(dtype)


class _OnDevice:
    """A CPU tensor cached per (device, dtype), so the per-step move happens once."""

    def __init__(self, t: torch.Tensor):
        self.cpu = t
        self._cache: dict = {}

    def like(self, ref: torch.Tensor) -> torch.Tensor:
        key = (ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = self.cpu.to(device=ref.device, dtype=ref.dtype)
        return self._cache[key]


def center_vectors(acts: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] -> [b, c] at position [h//2, w//2] (lower-right of the central 2x2 for even sizes)."""
    if acts.dim() == 2:
        return acts
    return acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2]


def _layer_center(ctx: RenderContext, layer: str, target: _OnDevice) -> tuple[torch.Tensor, torch.Tensor]:
    h = center_vectors(ctx.acts[layer])
    v = target.like(h)
    if h.shape != v.shape:
        raise ValueError(f"layer {layer!r} centre activations {tuple(h.shape)} do not match the target "
                         f"vectors {tuple(v.shape)} ([b, c]: one vector per image in the batch)")
    return h, v


# --- objectives --------------------------------------------------------------------------------------
def direction(layer: str, vectors, S=None) -> Objective:
    """[RECIPE] ``direction_neuron_S``: mean_k(h_k v'_k) at the centre position, per image -> [b].

    Args:
        layer: layer name (alias or dotted).
        vectors: [b, c], one target per image of the batch.
        S: optional [c, c] whitening matrix; v' = v @ S (method.md §1.8).
    """
    target = _OnDevice(target_vectors(vectors, S))

    def fn(ctx):
        h, v = _layer_center(ctx, layer, target)
        return (h * v).mean(dim=1)

    return Objective(fn, f"direction({layer}{', S' if S is not None else ''})", {layer})


def direction_cossim(layer: str, vectors, S=None, power: float = 2, variant: str = "lucid",
                     floor: float = 0.1) -> Objective:
    """Direction times a floored cosine to a power, at the centre position, per image -> [b] (§1.9).

    With h = activations at [H//2, W//2] ([b, c]) and v' = v @ S (or v):

    - ``variant="lucid"`` (faithful port of ``direction_neuron_cossim_S``): dot = mean_k(h_k v'_k),
      cossim = max(floor, dot / (1e-4 + ||h||)) (not divided by ||v'||, includes 1/c), value =
      dot * cossim**power.
    - ``variant="cosine"`` (the article's formula): dot = h . v' (a sum), cos = dot / (||h|| ||v'||),
      value = dot * max(floor, cos)**power.

    The floor passes no gradient below it (as ``tf.maximum``).
    """
    if variant not in ("lucid", "cosine"):
        raise ValueError(f"variant must be 'lucid' or 'cosine', not {variant!r}")
    target = _OnDevice(target_vectors(vectors, S))
    p = float(power)

    def fn(ctx):
        h, v = _layer_center(ctx, layer, target)
        if variant == "lucid":
            dot = (h * v).mean(dim=1)
            cos = dot / (1e-4 + torch.linalg.vector_norm(h, dim=1))
        else:
            dot = (h * v).sum(dim=1)
            norms = torch.linalg.vector_norm(h, dim=1) * torch.linalg.vector_norm(v, dim=1)
            cos = dot / norms.clamp_min(1e-12)
        return dot * cos.clamp_min(floor) ** p

    s = ", S" if S is not None else ""
    return Objective(fn, f"direction_cossim({layer}{s}, power={p:g}, {variant})", {layer})


def channel(layer: str, n: int) -> Objective:
    """Mean of channel `n` of `layer` over all positions, per image -> [b]."""

    def fn(ctx):
        return ctx.acts[layer][:, n].flatten(1).mean(dim=1)

    return Objective(fn, f"channel({layer}:{n})", {layer})


def neuron(layer: str, n: int) -> Objective:
    """Channel `n` of `layer` at the centre position [H//2, W//2], per image -> [b]."""

    def fn(ctx):
        return center_vectors(ctx.acts[layer])[:, n]

    return Objective(fn, f"neuron({layer}:{n})", {layer})


def blur5(x: torch.Tensor) -> torch.Tensor:
    """Normalised 5x5 box blur per channel, [b, c, h, w] -> [b, c, h, w] (Lucid ``_tf_blur(x, w=5)``).

    Kernel: 0.5 on the outer ring, 1.0 on the inner 3x3; zero ("SAME") padding, divided by the same
    convolution of ones, so a constant image is left exactly unchanged, borders included.
    (A depthwise convolution; on CPU it measured as fast as a separable sum and ~3x faster than
    ``avg_pool2d`` window sums.)
    """
    c = x.shape[1]
    k = torch.full((5, 5), 0.5, dtype=x.dtype, device=x.device)
    k[1:-1, 1:-1] = 1.0
    num = F.conv2d(x, k.expand(c, 1, 5, 5), padding=2, groups=c)
    den = F.conv2d(torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device),
                   k.expand(1, 1, 5, 5), padding=2)
    return num / den


def boundary_penalty(width: int = 5, color: float = 0.5) -> Objective:
    """[RECIPE] ``penalize_boundary_complexity(w=5)`` on the untransformed image ``ctx.image`` (§1.11).

    value_b = -sum over a `width`-px border (all channels) of (blur5(x) - x)^2 + 0.8 (x - color)^2 -> [b].
    It is 0 for a constant `color` image and negative otherwise. The border mask is 1 outside
    ``[width:-width, width:-width]`` (the whole image when it is smaller than 2*width + 1).
    """
    if width < 1:
        raise ValueError(f"boundary width must be >= 1, got {width}")

    def fn(ctx):
        x = ctx.image
        h, w = x.shape[-2:]
        mask = torch.ones((h, w), dtype=x.dtype, device=x.device)
        mask[width:h - width, width:w - width] = 0
        diffs = (blur5(x) - x) ** 2 + 0.8 * (x - color) ** 2
        return -(diffs * mask).flatten(1).sum(dim=1)

    return Objective(fn, f"boundary_penalty({width})", ())
