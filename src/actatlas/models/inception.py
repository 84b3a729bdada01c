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
by the spatial mean and the linear ``softmax2_pre_activation`` (the logits, alias ``logits``), so
attributions there sum to ``logit - bias``. ``softmax2`` is, as in Lucid and lucent, the softmax of the
logits: a hookable module (probabilities [b, 1008]); the forward still returns the logits.

Local response norm: ``F.local_response_norm(size=9, alpha=9.99999974738e-05, beta=0.5, k=1)``, the
constants used by the widely used PyTorch port of these weights. (PyTorch divides alpha by `size`, as
that port's outputs assume.)

Each mixed block has children ``conv_1x1``, ``conv_3x3_bottleneck``, ``conv_3x3``,
``conv_5x5_bottleneck``, ``conv_5x5``, ``pool`` and ``pool_reduce``; each conv child is a `ConvReLU`
with children ``conv`` (pre-ReLU) and ``relu``.

Layer names of lucent's ``InceptionV1`` are aliases (`lucent_layer_aliases`, derived from the same
table as the weight keys): ``mixed4c_3x3_pre_relu_conv`` -> ``mixed4c.conv_3x3.conv``, ``mixed4c_3x3``
-> ``mixed4c.conv_3x3`` (after the ReLU), ``mixed4c_pool`` -> ``mixed4c.pool``,
``softmax2_pre_activation_matmul`` -> ``softmax2_pre_activation``.

Weights: no package bundles them; users pass a state dict file, a URL (sha256-checked, cached) or the
named source ``inception5h`` (`actatlas.models.weights.WEIGHT_SOURCES`: the file lucent downloads).
Three key layouts are read (`map_flat_keys`): lucent's (``conv2d0_pre_relu_conv.weight``,
``mixed3a_3x3_bottleneck_pre_relu_conv.weight``, ``softmax2_pre_activation_matmul.weight``), the flat
one of other ports (``conv2d0.weight``, ``mixed3a_3x3_bottleneck.weight``, ``softmax2.weight``) and this
module's own. Auxiliary-head keys (``head0_*``, ``nn0*``, ``softmax0*``, ...) are ignored; any other
missing, extra or mis-shaped key is a `ModelError` naming the first ones.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .layers import Conv2dSame, MaxPool2dSame
from .catalog import register
from .spec import ModelSpec, Preprocess

log = logging.getLogger(__name__)

__all__ = ["ConvReLU", "Mixed", "InceptionV1", "MIXED_CHANNELS", "map_flat_keys",
           "to_flat_state_dict", "lucent_layer_table", "lucent_key_map", "lucent_layer_aliases",
           "read_labels", "inceptionv1"]

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
        self.softmax2_pre_activation = nn.Linear(cin, num_classes)
        self.softmax2 = nn.Softmax(dim=1)

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
        logits = self.softmax2_pre_activation(x.mean(dim=(2, 3)))
        self.softmax2(logits)  # Lucid's "softmax2": computed so that hooks can read it; not returned
        return logits


# ---------------------------------------------------------------- key layouts and layer names

def _branch_module(branch: str) -> str:
    return "pool_reduce" if branch == "pool_reduce" else f"conv_{branch}"


def lucent_layer_table() -> list[tuple[str, str]]:
    """(lucent module name, our module path) of every layer with weights, in forward order.

    lucent's InceptionV1 names its convs ``<layer>_pre_relu_conv`` and its last Linear
    ``softmax2_pre_activation_matmul``; its state dict keys are these names + ``.weight``/``.bias``.
    The one table from which weight keys (`lucent_key_map`) and layer aliases
    (`lucent_layer_aliases`) are both derived.
    """
    rows = [(f"{n}_pre_relu_conv", f"{n}.conv") for n in ("conv2d0", "conv2d1", "conv2d2")]
    for block in MIXED_LAYERS:
        rows += [(f"{block}_{b}_pre_relu_conv", f"{block}.{_branch_module(b)}.conv") for b in _BRANCHES]
    rows.append(("softmax2_pre_activation_matmul", "softmax2_pre_activation"))
    return rows


def _flat_stem(lucent: str) -> str:
    """lucent's name -> the flat port's (``mixed3a_1x1_pre_relu_conv`` -> ``mixed3a_1x1``)."""
    return "softmax2" if lucent == "softmax2_pre_activation_matmul" else lucent.removesuffix("_pre_relu_conv")


@functools.lru_cache(maxsize=1)
def _layouts() -> dict[str, dict[str, str]]:
    """Layout name -> {our state-dict key: that layout's key}, for lucent's, the flat and our own layout
    (cached: never modify the result)."""
    out: dict[str, dict[str, str]] = {"lucent": {}, "flat": {}, "own": {}}
    for lucent, ours in lucent_layer_table():
        for leaf in ("weight", "bias"):
            key = f"{ours}.{leaf}"
            out["lucent"][key] = f"{lucent}.{leaf}"
            out["flat"][key] = f"{_flat_stem(lucent)}.{leaf}"
            out["own"][key] = key
    return out


def lucent_key_map() -> dict[str, str]:
    """lucent's state-dict key -> ours (``mixed4c_3x3_pre_relu_conv.weight`` ->
    ``mixed4c.conv_3x3.conv.weight``)."""
    return {theirs: ours for ours, theirs in _layouts()["lucent"].items()}


def lucent_layer_aliases() -> dict[str, str]:
    """lucent's module names -> our module paths, derived from `lucent_layer_table`.

    Each conv ``<layer>_pre_relu_conv`` -> ``<path>.conv`` and its ReLU ``<layer>`` -> ``<path>`` (the
    `ConvReLU`); each block's ``<block>_pool`` -> ``<block>.pool``;
    ``softmax2_pre_activation_matmul`` -> ``softmax2_pre_activation``. Names that already are our module
    names (``conv2d0``, ``mixed4c``, ``maxpool4``, ``softmax2``) are left out.
    """
    aliases: dict[str, str] = {}
    for lucent, ours in lucent_layer_table():
        aliases[lucent] = ours
        if ours.endswith(".conv"):
            aliases[lucent.removesuffix("_pre_relu_conv")] = ours.removesuffix(".conv")
    for block in MIXED_LAYERS:
        aliases[f"{block}_pool"] = f"{block}.pool"
    return {a: t for a, t in aliases.items() if a != t}


def map_flat_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in lucent's, the flat port's or our own layout -> this module's keys.

    Auxiliary-classifier keys (``head0_*``, ``nn0*``, ``softmax0*``, ``head1_*``, ``nn1*``,
    ``softmax1*``) and keys of no known layout are dropped (`_load_into` reports the latter).
    """
    return {ours: state[theirs] for ours, theirs in _match_keys(state)[0].items()}


def _match_keys(state) -> tuple[dict[str, str], list[str]]:
    """({our key: the file's key}, [the file's keys of no known layout]) for a state dict."""
    lookup = {}
    for layout in _layouts().values():
        for ours, theirs in layout.items():
            lookup.setdefault(theirs, ours)
    matched, unknown = {}, []
    for key in state:
        ours = lookup.get(key)
        if ours is not None and ours not in matched:
            matched[ours] = key
        elif not key.startswith(_AUX_PREFIXES):
            unknown.append(key)  # unknown, or a second key for the same weight
    return matched, unknown


def to_flat_state_dict(model_or_state: nn.Module | dict[str, torch.Tensor],
                       layout: str = "flat") -> dict[str, torch.Tensor]:
    """Our keys -> the flat port layout (``conv2d0.weight``, ``mixed3a_3x3_bottleneck.bias``,
    ``softmax2.weight``...) or, with ``layout="lucent"``, lucent's (``conv2d0_pre_relu_conv.weight``,
    ..., ``softmax2_pre_activation_matmul.bias``); the inverse of `map_flat_keys`. Tensors are shared."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    names = _layouts()[layout]
    unknown = [k for k in state if k not in names]
    if unknown:
        raise ValueError(f"unexpected InceptionV1 keys {unknown[:3]}")
    return {names[k]: v for k, v in state.items()}


def _guess_layout(keys) -> str:
    keys = set(keys)
    hits = {name: len(keys & set(lay.values())) for name, lay in _layouts().items()}
    return max(hits, key=lambda n: (hits[n], n == "lucent"))


def _load_into(model: InceptionV1, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` (any layout `map_flat_keys` reads) into `model`; one-line ModelError when it is not
    this network's state dict: names the first missing, unexpected and mis-shaped keys."""
    matched, unknown = _match_keys(state)
    own = model.state_dict()
    spell = _layouts()[_guess_layout(state)]
    missing = [k for k in own if k not in matched]
    shapes = [k for k in own if k in matched and tuple(own[k].shape) != tuple(state[matched[k]].shape)]
    if missing or unknown or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(own)} keys missing, first "
                         + ", ".join(spell[k] for k in missing[:3]))
        if unknown:
            parts.append(f"{len(unknown)} unexpected keys, first " + ", ".join(unknown[:3]))
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shapes differ, first {matched[k]} {tuple(state[matched[k]].shape)} "
                         f"(expected {tuple(own[k].shape)})")
        raise ModelError(f"{source} is not lucent's/Lucid's InceptionV1 state dict: {'; '.join(parts)}. "
                         "Expected lucent's keys (conv2d0_pre_relu_conv.weight, ..., "
                         "softmax2_pre_activation_matmul.bias)")
    model.load_state_dict({k: state[matched[k]] for k in own}, strict=True)


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


# ---------------------------------------------------------------- labels

_INDEXED = re.compile(r"(n\d{8})\s+(\d+)\s+(\S.*)")
_WNID_NAME = re.compile(r"(n\d{8})\s+(\S.*)")
_PLACEHOLDERS = ("dummy", "background")


def read_labels(path: str | Path, n: int = NUM_LOGITS) -> tuple[list[str], list[str] | None]:
    """Class names (and wnids) for the `n` (1008) logits from a text file.

    Accepted formats:

    - lucent's list: lines ``wnid index name`` (``n10565667 982 scuba diver``), the index being the
      logit (1..1000 in Lucid's alternate order, no dummy line); logit 0 is named ``dummy``. Lines that
      are only ``dummy`` or ``background`` may be mixed in and are ignored.
    - one label per logit, in logit order, each ``name`` or ``wnid name``: 1001 lines (Lucid's
      alternate list: ``dummy`` + 1000 classes, as ``ImageNet_alternate.txt`` and the article's
      ``labels--model-InceptionV1.txt``) or `n` lines (Lucid's padded list).

    Logits no line names are ``unused_{i}`` (1001..1007 in Lucid's model). Returns (names, wnids);
    wnids is None when no line gives one ("" where a line lacks one).

    Raises:
        ModelError: unreadable file; a count that fits no format (the message gives both counts); an
            index outside the logits or given twice.
    """
    try:
        lines = [ln.strip() for ln in Path(path).read_text("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read labels file {path}: {e}") from e
    while lines and not lines[-1]:
        lines.pop()
    names = [f"unused_{i}" for i in range(n)]
    wnids = [""] * n
    indexed = [_INDEXED.fullmatch(ln) for ln in lines]
    if any(indexed):
        names[0] = "dummy"
        seen: dict[int, int] = {}
        for lineno, (line, m) in enumerate(zip(lines, indexed), start=1):
            if m is None:
                if line.lower() in _PLACEHOLDERS:
                    continue
                raise ModelError(f"labels file {path}: line {lineno} ({line!r}) is not 'wnid index name' "
                                 "like the other lines")
            idx = int(m.group(2))
            if idx >= n:
                raise ModelError(f"labels file {path}: line {lineno} names logit {idx}, but the model "
                                 f"has {n} logits")
            if idx in seen:
                raise ModelError(f"labels file {path}: logit {idx} is named twice (lines {seen[idx]} "
                                 f"and {lineno})")
            seen[idx] = lineno
            wnids[idx], names[idx] = m.group(1), m.group(3).strip()
        return names, wnids
    if len(lines) not in (1001, n):
        raise ModelError(f"labels file {path} has {len(lines)} labels but the model has {n} logits: "
                         f"expected {n} lines, 1001 (Lucid's 'dummy' + 1000 classes) or lucent's lines "
                         "'wnid index name'")
    for i, line in enumerate(lines):
        m = _WNID_NAME.fullmatch(line)
        wnids[i] = m.group(1) if m else ""
        names[i] = m.group(2).strip() if m else line
    return names, (wnids if any(wnids) else None)


# ---------------------------------------------------------------- the factory

@register("inceptionv1", "GoogLeNet as in Lucid (mixed3a..mixed5b); weights from --weights FILE, URL or "
                         "inception5h (lucent's file)")
def inceptionv1(weights: str | None = None, sha256: str | None = None,
                cache_dir: str | Path | None = None, labels: str | Path | None = None) -> ModelSpec:
    """Lucid's InceptionV1 (the article's model).

    Args:
        weights: a state dict file, a URL, or a named source (``"inception5h"``: the public PyTorch
            conversion lucent downloads; see `actatlas.models.weights.WEIGHT_SOURCES`); any key layout
            `map_flat_keys` reads. None builds a random-init model (seed 0, for tests and plumbing
            only: a warning says results are meaningless).
        sha256: expected checksum of `weights`.
        cache_dir: download cache for URL weights (default ``$ACTATLAS_CACHE`` or ~/.cache/actatlas).
        labels: optional text file naming the 1008 logits (see `read_labels`); else ``class_{i}``.

    Returns a ModelSpec: the whole image squashed to 224x224 bilinear, scaled to [-117, 138]; logits
    [b, 1008]; default layer ``mixed4c``; layer aliases ``logits`` (= ``softmax2_pre_activation``) and
    lucent's layer names (`lucent_layer_aliases`); ``info["redirected_relu"]`` True (icons are rendered
    with Lucid's redirected ReLU gradient unless the render settings say otherwise).
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
        names, wnids = read_labels(labels, NUM_LOGITS)
        info["labels"] = str(labels)
    else:
        names, wnids = [f"class_{i}" for i in range(NUM_LOGITS)], None
    info["redirected_relu"] = True  # Lucid's and lucent's default for feature visualization
    aliases = {name: name for name in MIXED_LAYERS}
    aliases["logits"] = "softmax2_pre_activation"
    aliases.update(lucent_layer_aliases())
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
