"""InceptionV1 (GoogLeNet) exactly as Lucid's modelzoo ``InceptionV1`` (method.md §0).

Input [b, 3, 224, 224] in the range [-117, 138] (``255 * x - 117`` for x in [0, 1]), RGB. Output: the
1008 logits ``softmax2_pre_activation`` (index 0 "dummy", 1..1000 classes in Lucid's alternate order,
1001..1007 unused). Layer outputs at 224 px (all post-ReLU concatenations):

    mixed3a 256 x 28x28   mixed3b 480 x 28x28
    mixed4a 508 x 14x14   mixed4b 512   mixed4c 512   mixed4d 528   mixed4e 832 (all 14x14)
    mixed5a 832 x 7x7     mixed5b 1024 x 7x7

Stem: conv2d0 (7x7 s2, 64) -> maxpool0 (3x3 s2) -> localresponsenorm0 -> conv2d1 (1x1, 64) -> conv2d2
(3x3, 192) -> localresponsenorm1 -> maxpool1 (3x3 s2); maxpool4 before mixed4a and maxpool10 before
mixed5a. All padding is TensorFlow "SAME"; every conv has a bias and a ReLU. mixed5b is followed only
by the spatial mean and the linear ``softmax2``, so attributions there sum to ``logit - bias``.

Local response norm: ``F.local_response_norm(size=9, alpha=9.99999974738e-05, beta=0.5, k=1)``, the
constants used by the widely used PyTorch port of these weights. (PyTorch divides alpha by `size`, as
that port's outputs assume.)

Each mixed block has children ``conv_1x1``, ``conv_3x3_bottleneck``, ``conv_3x3``,
``conv_5x5_bottleneck``, ``conv_5x5``, ``pool`` and ``pool_reduce``; each conv child is a `ConvReLU`
with children ``conv`` (pre-ReLU) and ``relu``.

Weights: no package bundles them; users pass a state dict file or URL (sha256-checked, cached). Flat
port layouts are mapped (`map_flat_keys`): ``conv2d0.weight`` / ``conv2d0_pre_relu_conv.weight``,
``mixed3a_3x3_bottleneck.weight`` / ``mixed3a_3x3_bottleneck_pre_relu_conv.weight``, ``softmax2.weight`` /
``softmax2_pre_activation_matmul.weight``; auxiliary-head keys are ignored.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layers import Conv2dSame, MaxPool2dSame
from .catalog import register
from .spec import ModelSpec, Preprocess

log = logging.getLogger(__name__)

__all__ = ["ConvReLU", "Mixed", "InceptionV1", "MIXED_CHANNELS", "map_flat_keys",
           "to_flat_state_dict", "read_labels", "inceptionv1"]

NUM_LOGITS = 1008
LRN = dict(size=9, alpha=9.99999974738e-05, beta=0.5, k=1.0)

# name: (1x1, 3x3 bottleneck, 3x3, 5x5 bottleneck, 5x5, pool_reduce); method.md §0, Lucid InceptionV1.py
MIXED_CHANNELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "mixed3a": (64, 96, 128, 16, 32, 32),
    "mixed3b": (128, 128, 192, 32, 96, 64),
    "mixed4a": (192, 96, 204, 16, 48, 64),
    "mixed4b": (160, 112, 224, 24, 64, 64),
    "mixed4c": (128, 128, 256, 24, 64, 64),
    "mixed4d": (112, 144, 288, 32, 64, 64),
    "mixed4e": (256, 160, 320, 32, 128, 128),
    "mixed5a": (256, 160, 320, 48, 128, 128),
    "mixed5b": (384, 192, 384, 48, 128, 128),
}
MIXED_LAYERS = tuple(MIXED_CHANNELS)
_BRANCHES = ("1x1", "3x3_bottleneck", "3x3", "5x5_bottleneck", "5x5", "pool_reduce")
_AUX_PREFIXES = ("head0", "head1", "nn0", "nn1", "softmax0", "softmax1", "avgpool0_", "dropout")


class ConvReLU(nn.Module):
    """Conv (SAME padding, bias) -> ReLU: [b, c_in, h, w] -> [b, c_out, ceil(h / s), ceil(w / s)]."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = Conv2dSame(cin, cout, kernel, stride=stride, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class LocalResponseNorm(nn.Module):
    """Cross-channel LRN with Lucid's constants; [b, c, h, w] -> same shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x, **LRN)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in LRN.items())


class Mixed(nn.Module):
    """Inception block: [b, c_in, h, w] -> concat(1x1, 3x3, 5x5, pool_reduce) [b, c_out, h, w]."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.conv_1x1 = ConvReLU(cin, c1, 1)
        self.conv_3x3_bottleneck = ConvReLU(cin, c3r, 1)
        self.conv_3x3 = ConvReLU(c3r, c3, 3)
        self.conv_5x5_bottleneck = ConvReLU(cin, c5r, 1)
        self.conv_5x5 = ConvReLU(c5r, c5, 5)
        self.pool = MaxPool2dSame(3, 1)
        self.pool_reduce = ConvReLU(cin, cp, 1)
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.conv_1x1(x),
            self.conv_3x3(self.conv_3x3_bottleneck(x)),
            self.conv_5x5(self.conv_5x5_bottleneck(x)),
            self.pool_reduce(self.pool(x)),
        ], dim=1)


class InceptionV1(nn.Module):
    """Lucid's InceptionV1: [b, 3, h, w] in [-117, 138] -> logits [b, 1008] (see module docstring)."""

    def __init__(self, num_classes: int = NUM_LOGITS):
        super().__init__()
        self.conv2d0 = ConvReLU(3, 64, 7, stride=2)
        self.maxpool0 = MaxPool2dSame(3, 2)
        self.localresponsenorm0 = LocalResponseNorm()
        self.conv2d1 = ConvReLU(64, 64, 1)
        self.conv2d2 = ConvReLU(64, 192, 3)
        self.localresponsenorm1 = LocalResponseNorm()
        self.maxpool1 = MaxPool2dSame(3, 2)
        cin = 192
        for name, ch in MIXED_CHANNELS.items():
            if name == "mixed4a":
                self.maxpool4 = MaxPool2dSame(3, 2)
            elif name == "mixed5a":
                self.maxpool10 = MaxPool2dSame(3, 2)
            block = Mixed(cin, *ch)
            self.add_module(name, block)
            cin = block.out_channels
        self.softmax2 = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool0(self.conv2d0(x))
        x = self.conv2d2(self.conv2d1(self.localresponsenorm0(x)))
        x = self.maxpool1(self.localresponsenorm1(x))
        for name in MIXED_LAYERS:
            if name == "mixed4a":
                x = self.maxpool4(x)
            elif name == "mixed5a":
                x = self.maxpool10(x)
            x = getattr(self, name)(x)
        return self.softmax2(x.mean(dim=(2, 3)))


def _flat_to_module(stem: str) -> str | None:
    """Flat port name (without .weight/.bias) -> our module path, None if not a known layer."""
    stem = re.sub(r"_pre_relu_conv$", "", stem)
    if stem in ("softmax2", "softmax2_pre_activation_matmul"):
        return "softmax2"
    if stem in ("conv2d0", "conv2d1", "conv2d2"):
        return f"{stem}.conv"
    m = re.fullmatch(r"(mixed\d[a-e])_(\w+)", stem)
    if m and m.group(1) in MIXED_CHANNELS and m.group(2) in _BRANCHES:
        branch = m.group(2)
        return f"{m.group(1)}.{'pool_reduce' if branch == 'pool_reduce' else 'conv_' + branch}.conv"
    return None


def map_flat_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the flat PyTorch-port layout (or ours) -> this module's keys.

    Auxiliary-classifier keys (``head0_*``, ``nn0*``, ``softmax0*``, ``head1_*``, ``nn1*``,
    ``softmax1*``) are dropped; keys already in our layout pass through; others are logged and dropped.
    """
    own_prefixes = ("conv2d0.", "conv2d1.", "conv2d2.", "softmax2.") + tuple(f"{n}." for n in MIXED_LAYERS)
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(_AUX_PREFIXES):
            continue
        stem, _, leaf = key.rpartition(".")
        target = _flat_to_module(stem) if leaf in ("weight", "bias") else None
        if target is not None:
            out[f"{target}.{leaf}"] = value
        elif key.startswith(own_prefixes):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        log.warning("ignoring %d unknown InceptionV1 weight keys, e.g. %s", len(unknown), unknown[:5])
    return out


def to_flat_state_dict(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> the flat port layout (``conv2d0.weight``, ``mixed3a_3x3_bottleneck.bias``,
    ``softmax2.weight``...); the inverse of `map_flat_keys`. Tensors are shared, not copied."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "softmax2":
            out[key] = value
        elif parts[0] in ("conv2d0", "conv2d1", "conv2d2"):
            out[f"{parts[0]}.{parts[-1]}"] = value
        elif parts[0] in MIXED_CHANNELS:
            branch = parts[1].removeprefix("conv_")
            out[f"{parts[0]}_{branch}.{parts[-1]}"] = value
        else:
            raise ValueError(f"unexpected InceptionV1 key {key!r}")
    return out


def _load_into(model: InceptionV1, state: dict[str, torch.Tensor], source: str) -> None:
    state = map_flat_keys(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(
            f"{source} is not an InceptionV1 state dict this model understands: {len(missing)} of "
            f"{len(own)} required keys missing, e.g. {missing[:5]}. Expected the flat layout "
            "(conv2d0.weight, mixed3a_1x1.weight, ..., softmax2.weight) or this model's own keys."
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise UserError(
            f"{source}: {len(bad)} weight shapes differ from InceptionV1, e.g. {bad[0]}: file "
            f"{tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)


@torch.no_grad()
def _random_init(model: nn.Module, seed: int = 0) -> None:
    """He-normal conv weights, small normal linear weights, zero biases, from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            fan_in = mod.weight[0].numel()
            std = (2.0 / fan_in) ** 0.5 if isinstance(mod, nn.Conv2d) else fan_in ** -0.5
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
            if mod.bias is not None:
                mod.bias.zero_()


def read_labels(path: str | Path, n: int = NUM_LOGITS) -> tuple[list[str], list[str] | None]:
    """Class names (and wnids) for the 1008 logits from a text file.

    One label per line, either ``name`` or ``wnid name`` (wnid like ``n01440764``). 1001 lines (Lucid's
    ``dummy`` + 1000 classes) or 1008 lines are accepted; names are padded to `n` with ``unused_{i}``.
    Returns (names, wnids); wnids is None when no line gives one ("" where a line lacks one).
    """
    try:
        lines = [ln.strip() for ln in Path(path).read_text("utf-8").splitlines()]
    except OSError as e:
        raise UserError(f"cannot read labels file {path}: {e}") from e
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) not in (1001, n):
        raise UserError(f"labels file {path} has {len(lines)} lines; expected 1001 (Lucid's "
                        f"'dummy' + 1000 classes) or {n}")
    names, wnids = [], []
    for line in lines:
        m = re.fullmatch(r"(n\d{8})\s+(.+)", line)
        wnids.append(m.group(1) if m else "")
        names.append(m.group(2).strip() if m else line)
    names += [f"unused_{i}" for i in range(len(names), n)]
    wnids += [""] * (n - len(wnids))
    return names, (wnids if any(wnids) else None)


@register("inceptionv1", "GoogLeNet as in Lucid (mixed3a..mixed5b); weights from --weights FILE or URL")
def inceptionv1(weights: str | None = None, sha256: str | None = None,
                cache_dir: str | Path | None = None, labels: str | Path | None = None) -> ModelSpec:
    """Lucid's InceptionV1 (the article's model).

    Args:
        weights: a state dict file or URL (flat port layout or ours); None builds a random-init model
            (seed 0, for tests and plumbing only: a warning says results are meaningless).
        sha256: expected checksum of `weights`.
        cache_dir: download cache for URL weights (default ``$ACTATLAS_CACHE`` or ~/.cache/actatlas).
        labels: optional text file naming the 1008 logits (see `read_labels`); else ``class_{i}``.

    Returns a ModelSpec: the whole image squashed to 224x224 bilinear, scaled to [-117, 138]; logits
    [b, 1008]; default layer ``mixed4c``.
    """
    from .weights import fetch_weights, load_state_dict, sha256_file

    with torch.random.fork_rng(devices=[]):  # module construction must not consume the global RNG
        model = InceptionV1()
    info: dict = {}
    if weights is None:
        _random_init(model, seed=0)
        log.warning("inceptionv1 has random weights (no weights given): activations and "
                    "attributions are meaningless except for testing")
        info = {"weights": None, "sha256": None, "init": "random(seed=0)"}
    else:
        path = fetch_weights(weights, sha256, cache_dir)
        _load_into(model, load_state_dict(path), str(path))
        info = {"weights": str(path), "source": str(weights), "sha256": sha256_file(path)}
    model.eval()
    if labels is not None:
        names, wnids = read_labels(labels)
        info["labels"] = str(labels)
    else:
        names, wnids = [f"class_{i}" for i in range(NUM_LOGITS)], None
    aliases = {name: name for name in MIXED_LAYERS}
    aliases["logits"] = "softmax2"
    return ModelSpec(
        name="inceptionv1",
        module=model,
        preprocess=Preprocess(size=224, resize=None, mode="squash", interpolation="bilinear",
                              mean=(117.0, 117.0, 117.0), std=(1.0, 1.0, 1.0)),
        class_names=names,
        wnids=wnids,
        default_layer="mixed4c",
        layers=aliases,
        info=info,
    )
