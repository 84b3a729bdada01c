"""Building blocks shared by the built-in models.

`Conv2dSame` and `MaxPool2dSame` reproduce TensorFlow's ``padding="SAME"``: the padding is computed from
the actual input size at every call, so any input size works, and it is asymmetric (the extra pixel goes
to the bottom/right) where the total is odd:

    out      = ceil(in / s)
    pad_total = max((out - 1) * s + (k - 1) * d + 1 - in, 0)
    pad_left  = pad_total // 2,   pad_right = pad_total - pad_left

Both are written with `F.pad` + the functional op and no in-place operations, so they work with
`torch.autograd.forward_ad`, `torch.func.jvp`/`vjp`/`vmap` and ordinary autograd. Where the padding
happens to be symmetric (stride 1, odd kernel) the op's own padding is used instead of a separate pad
(same numbers, one copy fewer).

`fuse_conv_bn` folds an eval-mode BatchNorm into the preceding convolution.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["same_padding", "Conv2dSame", "MaxPool2dSame", "fuse_conv_bn", "fold_batchnorms"]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis of length `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pads_2d(x: torch.Tensor, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) SAME pads for x [..., h, w]."""
    h, w = x.shape[-2], x.shape[-1]
    top, bottom = same_padding(h, kernel[0], stride[0], dilation[0])
    left, right = same_padding(w, kernel[1], stride[1], dilation[1])
    return top, bottom, left, right


class Conv2dSame(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow "SAME" padding computed from the input size at forward time.

    Input [b, c_in, h, w] -> output [b, c_out, ceil(h / s), ceil(w / s)]. Same parameters (and
    state-dict keys ``weight``/``bias``) as `nn.Conv2d`; the `padding` argument is not accepted.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, dilation=1,
                 groups: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         dilation=dilation, groups=groups, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = _pads_2d(x, self.kernel_size, self.stride, self.dilation)
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation,
                            self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME"


SMOOTH_MAXPOOL_EPS = 1e-2


class _SmoothGradMaxPool(torch.autograd.Function):
    """Max-pool forward; backward and forward-mode derivatives are those of the smooth relaxation
    ``avg_pool(x**2) / (eps + avg_pool(|x|))`` (method.md §1.3, Lucid's smoothed_maxpool_grad "L2")."""

    @staticmethod
    def forward(x, pool):
        return pool.hard(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, pool = inputs
        ctx.pool = pool
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.pool.smooth(xd), xd, grad)
        return gx, None

    @staticmethod
    def jvp(ctx, dx, _):
        (x,) = ctx.saved_tensors
        pool = ctx.pool
        den = SMOOTH_MAXPOOL_EPS + pool.avg(x.abs())
        return pool.avg(2 * x * dx) / den - pool.avg(x * x) * pool.avg(torch.sign(x) * dx) / den ** 2


class MaxPool2dSame(nn.Module):
    """Max-pooling with TensorFlow "SAME" padding (padded cells are -inf, so they never win).

    Input [b, c, h, w] -> output [b, c, ceil(h / s), ceil(w / s)].

    ``smooth_grad = True`` keeps the forward but replaces its derivatives (backward and forward-mode)
    by those of ``avg_pool(x**2) / (1e-2 + avg_pool(|x|))`` with the same kernel, stride and SAME
    padding: the article's "continuous relaxation of the gradient for max pooling" for attributions
    (method.md §1.3). See `smooth_maxpool_gradients`.
    """

    def __init__(self, kernel_size, stride=None, dilation=1):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.dilation = _pair(dilation)
        self.smooth_grad = False

    def avg(self, x: torch.Tensor) -> torch.Tensor:
        """TF "SAME" average pooling: padded cells are excluded from each window's count."""
        if self.dilation != (1, 1):
            raise NotImplementedError("smooth max-pool gradients need dilation 1")
        top, bottom, left, right = _pads_2d(x, self.kernel_size, self.stride, self.dilation)
        pad = (left, right, top, bottom)
        total = F.avg_pool2d(F.pad(x, pad), self.kernel_size, self.stride, 0, divisor_override=1)
        ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, pad), self.kernel_size, self.stride, 0, divisor_override=1)
        return total / count

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """The relaxation whose derivatives replace max-pool's: avg(x^2) / (eps + avg(|x|))."""
        return self.avg(x * x) / (SMOOTH_MAXPOOL_EPS + self.avg(x.abs()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_grad and (x.requires_grad or _has_tangent(x)):
            return _SmoothGradMaxPool.apply(x, self)
        return self.hard(x)

    def hard(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = _pads_2d(x, self.kernel_size, self.stride, self.dilation)
        if (top == bottom and left == right and top <= self.kernel_size[0] // 2
                and left <= self.kernel_size[1] // 2):
            # max_pool2d's own padding is implicit -inf: identical result without a padded copy
            return F.max_pool2d(x, self.kernel_size, self.stride, (top, left), self.dilation)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, 0, self.dilation)

    def extra_repr(self) -> str:
        extra = ", smooth_grad=True" if self.smooth_grad else ""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME{extra}"


def _has_tangent(x: torch.Tensor) -> bool:
    import torch.autograd.forward_ad as fwAD

    try:
        return fwAD.unpack_dual(x).tangent is not None
    except RuntimeError:  # no forward-AD level active
        return False


@contextlib.contextmanager
def smooth_maxpool_gradients(module: nn.Module, enabled: bool = True):
    """Within the block, every `MaxPool2dSame` in `module` uses the smooth gradient relaxation.

    Forward values are unchanged; attributions (gradients and JVPs) change only through max-pools.
    Plain ``nn.MaxPool2d`` modules are not affected (they have no SAME padding to mirror).
    """
    pools = [m for m in module.modules() if isinstance(m, MaxPool2dSame)]
    before = [p.smooth_grad for p in pools]
    for p in pools:
        p.smooth_grad = enabled
    try:
        yield len(pools)
    finally:
        for p, b in zip(pools, before):
            p.smooth_grad = b


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv (same class, with bias) computing ``bn(conv(x))`` with BN in eval mode.

    w' = w * g / sqrt(var + eps) per output channel;  b' = (b - mean) * g / sqrt(var + eps) + beta.
    Computed in float64, stored in the conv's dtype.
    """
    dtype = conv.weight.dtype
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    new_b = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    if isinstance(conv, Conv2dSame):
        fused = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=dtype)
    else:
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, bias=True,
                          padding_mode=conv.padding_mode, device=conv.weight.device, dtype=dtype)
    fused.weight.copy_(new_w.to(dtype))
    fused.bias.copy_(new_b.to(dtype))
    return fused


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every ``bn`` child into its sibling ``conv`` (modules having both), in place.

    The conv gets a bias and ``bn`` becomes `nn.Identity`, so module names (and hooks on the
    parent) are unchanged. Returns the number of folded pairs.
    """
    count = 0
    for mod in list(model.modules()):
        conv = getattr(mod, "conv", None)
        bn = getattr(mod, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            mod.conv = fuse_conv_bn(conv, bn)
            mod.bn = nn.Identity()
            count += 1
    return count
