"""Models: SAME-padding layers, EfficientNet-Lite0, InceptionV1, weights fetching, adapters."""

from __future__ import annotations

import hashlib
import math
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from actatlas.errors import ModelError, UserError
from actatlas.hooks import capture
from actatlas.models import ModelSpec, list_models, load_model
from actatlas.models.adapters import default_layer, factory_model, timm_model, torchvision_model
from actatlas.models.layers import Conv2dSame, MaxPool2dSame, fold_batchnorms, same_padding
from actatlas.models.weights import fetch_weights, load_state_dict
from conftest import layer_output_shapes


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- SAME padding layers


def _ref_pads(size, k, s, d=1):
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def test_same_padding_known_cases():
    assert same_padding(224, 7, 2) == (2, 3)   # InceptionV1 conv2d0
    assert same_padding(112, 3, 2) == (0, 1)   # stride-2 3x3 on even input: asymmetric
    assert same_padding(113, 3, 2) == (1, 1)
    assert same_padding(14, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)
    assert same_padding(9, 3, 3) == (0, 0)
    assert same_padding(8, 3, 1, dilation=2) == (2, 2)


@pytest.mark.parametrize("size", [(7, 8), (13, 13), (16, 17), (28, 28)])
@pytest.mark.parametrize("k,s,d", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (5, 2, 1), (7, 2, 1), (3, 3, 1),
                                   (4, 2, 1), (3, 1, 2)])
def test_conv2d_same_matches_reference(size, k, s, d):
    h, w = size
    gen = torch.Generator().manual_seed(0)
    conv = Conv2dSame(4, 6, k, stride=s, dilation=d)
    x = torch.randn(2, 4, h, w, generator=gen)
    y = conv(x)
    assert y.shape == (2, 6, math.ceil(h / s), math.ceil(w / s))
    t, b = _ref_pads(h, k, s, d)
    l, r = _ref_pads(w, k, s, d)
    ref = F.conv2d(F.pad(x, (l, r, t, b)), conv.weight, conv.bias, s, 0, d)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(7, 8), (13, 13), (56, 56), (112, 112)])
@pytest.mark.parametrize("k,s", [(3, 1), (3, 2), (2, 2), (5, 3)])
def test_maxpool_same_matches_reference(size, k, s):
    h, w = size
    x = -1.0 - torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))  # all negative
    y = MaxPool2dSame(k, s)(x)
    assert y.shape == (1, 3, math.ceil(h / s), math.ceil(w / s))
    t, b = _ref_pads(h, k, s)
    l, r = _ref_pads(w, k, s)
    ref = F.max_pool2d(F.pad(x, (l, r, t, b), value=float("-inf")), k, s)
    torch.testing.assert_close(y, ref)
    assert (y < 0).all()  # padding never wins (it is -inf, not 0)


def test_same_layers_forward_ad_and_func():
    gen = torch.Generator().manual_seed(0)
    conv = Conv2dSame(3, 5, 3, stride=2, bias=False).double()
    pool = MaxPool2dSame(3, 2)
    x = torch.randn(1, 3, 10, 11, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 3, 10, 11, generator=gen, dtype=torch.float64)
    with fwAD.dual_level():
        out = conv(fwAD.make_dual(x, v))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, conv(v))  # conv without bias is linear
    _, jt = torch.func.jvp(lambda z: pool(conv(z)), (x,), (v,))
    assert jt.shape == (1, 5, 3, 3)
    eps = 1e-7  # float64 central difference; max-pool ties are measure-zero
    with torch.no_grad():
        fd = (pool(conv(x + eps * v)) - pool(conv(x - eps * v))) / (2 * eps)
    torch.testing.assert_close(jt, fd, rtol=1e-5, atol=1e-5)


def test_fold_batchnorms_generic():
    class CB(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = Conv2dSame(3, 4, 3, stride=2, bias=False)
            self.bn = nn.BatchNorm2d(4, eps=1e-3)

        def forward(self, x):
            return self.bn(self.conv(x))

    m = CB().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
        m.bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 9, 10)
    before = m(x)
    assert fold_batchnorms(m) == 1
    assert isinstance(m.bn, nn.Identity) and isinstance(m.conv, Conv2dSame) and m.conv.bias is not None
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_plain():
    return load_model("efficientnet_lite0", fold_bn=False, channels_last=False)


@pytest.fixture(scope="module")
def photo_batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=gen)


def test_registry_lists_builtin_models():
    names = list_models()
    assert "efficientnet_lite0" in names and "inceptionv1" in names
    assert list_models("eff*") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def test_lite0_spec(lite0):
    assert isinstance(lite0, ModelSpec)
    assert lite0.num_classes == 1000 and len(lite0.wnids) == 1000
    assert lite0.default_layer == "blocks.8"
    assert lite0.resolve_layer("logits") == "classifier"
    assert lite0.resolve_layer("blocks.8.depthwise") == "blocks.8.depthwise"
    pre = lite0.preprocess
    assert (pre.size, pre.resize, pre.mode, pre.interpolation) == (224, 256, "resize_crop", "bicubic")
    assert pre.mean == (127, 127, 127) and pre.std == (128, 128, 128)
    assert len(lite0.info["sha256"]) == 64
    assert not any(p.requires_grad for p in lite0.module.parameters())
    names = dict(lite0.module.named_modules())
    assert "blocks.0.expand" not in names and "blocks.1.expand.conv" in names
    assert {"blocks.15.depthwise.act", "blocks.3.project.bn", "head", "classifier"} <= set(names)


def test_lite0_layerlayer_output_shapes(lite0_plain, photo_batch):
    x = lite0_plain.preprocess.normalize(photo_batch)
    expect = {"stem": (32, 112), "blocks.0": (16, 112), "blocks.1": (24, 56), "blocks.3": (40, 28),
              "blocks.5": (80, 14), "blocks.8": (112, 14), "blocks.11": (192, 7), "blocks.15": (320, 7),
              "head": (1280, 7), "blocks.8.depthwise": (480, 14), "blocks.9.depthwise": (672, 14)}
    got = layer_output_shapes(lite0_plain.module, expect, x)
    for name, (c, hw) in expect.items():
        assert got[name] == (2, c, hw, hw), name


def test_lite0_any_input_size(lite0):
    y = layer_output_shapes(lite0.module, ["head"], torch.zeros(1, 3, 199, 250))
    assert y["head"] == (1, 1280, 7, 8)


def test_lite0_fold_bn_and_channels_last_preserve_logits(lite0, lite0_plain, photo_batch):
    x = lite0.preprocess.normalize(photo_batch)
    with torch.no_grad():
        a, b = lite0_plain.module(x), lite0.module(x)
    assert (a - b).abs().max().item() < 1e-4
    assert all(isinstance(m.bn, nn.Identity) for m in lite0.module.modules() if hasattr(m, "bn"))
    assert lite0.module.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_lite0_head_is_followed_only_by_gap_and_linear(lite0, photo_batch):
    x = lite0.preprocess.normalize(photo_batch)
    store = {}
    h = lite0.module.head.register_forward_hook(lambda _m, _i, o: store.__setitem__("head", o))
    try:
        with torch.no_grad():
            logits = lite0.module(x)
    finally:
        h.remove()
    head = store["head"]
    fc = lite0.module.classifier
    torch.testing.assert_close(fc(head.mean(dim=(2, 3))), logits, rtol=1e-5, atol=1e-5)
    # attribution completeness at head: sum_{y,x} W_c . h_yx / (H W) == logit_c - b_c
    attr = torch.einsum("kc,bchw->bkhw", fc.weight, head) / (head.shape[2] * head.shape[3])
    torch.testing.assert_close(attr.sum(dim=(2, 3)), logits - fc.bias, rtol=1e-4, atol=1e-3)


def test_lite0_inplace_act_never_alters_hooked_tensors(lite0, photo_batch):
    x = lite0.preprocess.normalize(photo_batch[:1])
    seen = {}
    names = ["blocks.8.depthwise.conv", "blocks.8.expand.bn", "stem.act"]
    hs = [lite0.module.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: seen.__setitem__(n, (o, o.clone()))) for n in names]
    try:
        with torch.no_grad():
            lite0.module(x)
    finally:
        for h in hs:
            h.remove()
    for n, (kept, copy) in seen.items():
        assert torch.equal(kept, copy), f"{n} was modified in place after its hook ran"
    pre = seen["blocks.8.depthwise.conv"][0]
    assert pre.min() < 0  # pre-activation values really are pre-activation


def test_lite0_inplace_act_same_values_and_derivatives(lite0, photo_batch):
    fast = lite0.module
    slow = load_model("efficientnet_lite0", inplace_act=False).module
    x = lite0.preprocess.normalize(photo_batch[:1])
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=0, atol=0)
    jf = torch.func.jvp(fast, (x,), (v,))[1]
    js = torch.func.jvp(slow, (x,), (v,))[1]
    torch.testing.assert_close(jf, js)
    gf = torch.func.grad(lambda z: fast(z)[0, 1].sum())(x)
    gs = torch.func.grad(lambda z: slow(z)[0, 1].sum())(x)
    torch.testing.assert_close(gf, gs)
    xr = x.clone().requires_grad_(True)
    fast(xr)[0, 7].backward()
    torch.testing.assert_close(xr.grad, torch.func.grad(lambda z: slow(z)[0, 7])(x))


def test_lite0_weights_from_path_with_sha(lite0):
    path = lite0.info["weights"]
    spec = load_model("efficientnet_lite0", weights=path, sha256=lite0.info["sha256"])
    assert spec.info["weights"] == path
    with pytest.raises(UserError, match="sha256 mismatch"):
        load_model("efficientnet_lite0", weights=path, sha256="0" * 64)


def test_lite0_rejects_foreign_state_dict(tmp_path):
    p = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3)}, p)
    with pytest.raises(UserError, match="does not fit"):
        load_model("efficientnet_lite0", weights=str(p))


def test_default_layer_rule_on_builtin_models(lite0):
    assert default_layer(lite0.module, 224) == "blocks.8"
    from actatlas.models.inception import InceptionV1

    assert default_layer(InceptionV1(), 224) == "mixed4c"


# ---------------------------------------------------------------- InceptionV1


@pytest.fixture(scope="module")
def incv1():
    return load_model("inceptionv1")


MIXED = {"mixed3a": (256, 28), "mixed3b": (480, 28), "mixed4a": (508, 14), "mixed4b": (512, 14),
         "mixed4c": (512, 14), "mixed4d": (528, 14), "mixed4e": (832, 14), "mixed5a": (832, 7),
         "mixed5b": (1024, 7)}


def _incv1_input():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 224, 224, generator=gen) * 255 - 117


def test_inceptionv1_random_initlayer_output_shapes(incv1):
    assert incv1.num_classes == 1008 and incv1.class_names[5] == "class_5" and incv1.wnids is None
    assert incv1.default_layer == "mixed4c"
    assert incv1.resolve_layer("logits") == "softmax2_pre_activation"   # Lucid's and lucent's names:
    assert incv1.resolve_layer("softmax2") == "softmax2"                  # softmax2 is the softmax
    assert incv1.resolve_layer("mixed4c") == "mixed4c"
    pre = incv1.preprocess
    assert (pre.size, pre.resize, pre.mode, pre.interpolation) == (224, None, "squash", "bilinear")
    assert pre.mean == (117, 117, 117) and pre.std == (1, 1, 1)
    x = _incv1_input()
    got = layer_output_shapes(incv1.module, list(MIXED) + ["conv2d0", "conv2d2", "softmax2_pre_activation", "softmax2"], x)
    for name, (c, hw) in MIXED.items():
        assert got[name] == (1, c, hw, hw), name
    assert got["conv2d0"] == (1, 64, 112, 112) and got["conv2d2"] == (1, 192, 56, 56)
    assert got["softmax2_pre_activation"] == (1, 1008) and got["softmax2"] == (1, 1008)


def test_inceptionv1_softmax2_is_the_softmax_of_the_logits(incv1):
    with torch.no_grad(), capture(incv1.module, ["softmax2"]) as out:
        logits = incv1.module(_incv1_input())
    assert logits.shape == (1, 1008)                      # the forward returns the logits
    torch.testing.assert_close(out["softmax2"], torch.softmax(logits, dim=1))


def test_inceptionv1_sizes_at_80px(incv1):
    """method.md §0: the recipe renders icons at 80 px -> 10x10 / 5x5 / 3x3."""
    got = layer_output_shapes(incv1.module, ["mixed3b", "mixed4c", "mixed5b", "softmax2"], torch.zeros(2, 3, 80, 80))
    assert got["mixed3b"][2:] == (10, 10) and got["mixed4c"][2:] == (5, 5) and got["mixed5b"][2:] == (3, 3)
    assert got["softmax2"] == (2, 1008)


def test_inceptionv1_random_init_is_deterministic_and_leaves_global_rng(caplog):
    from actatlas.models.inception import inceptionv1

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level("WARNING"):
        a = inceptionv1()
    assert torch.equal(torch.rand(3), expected)
    assert "random weights" in caplog.text
    b = inceptionv1()
    x = _incv1_input()
    with torch.no_grad():
        assert torch.equal(a.module(x), b.module(x))


def test_inceptionv1_mixed5b_attributions_sum_to_logit_minus_bias(incv1):
    with torch.no_grad(), capture(incv1.module, ["mixed5b"]) as got:
        logits = incv1.module(_incv1_input())
    fc = incv1.module.softmax2_pre_activation
    attr = torch.einsum("kc,bchw->bkhw", fc.weight, got["mixed5b"]) / 49
    torch.testing.assert_close(attr.sum(dim=(2, 3)), logits - fc.bias, rtol=1e-4, atol=1e-3)


@pytest.fixture()
def flat_weights(incv1, tmp_path):
    from actatlas.models.inception import to_flat_state_dict

    flat = to_flat_state_dict(incv1.module)
    assert "mixed3a_3x3_bottleneck.weight" in flat and "mixed5b_pool_reduce.bias" in flat
    assert "conv2d0.weight" in flat and "softmax2.weight" in flat
    flat = {k: v.clone() for k, v in flat.items()}
    flat["head0_bottleneck.weight"] = torch.zeros(128, 508, 1, 1)   # auxiliary heads: ignored
    flat["nn0.weight"] = torch.zeros(1024, 2048)
    flat["softmax0.weight"] = torch.zeros(1008, 1024)
    path = tmp_path / "inception5h.pth"
    torch.save(flat, path)
    return path


def test_inceptionv1_reload_flat_state_dict(incv1, flat_weights):
    x = _incv1_input()
    spec = load_model("inceptionv1", weights=str(flat_weights))
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), incv1.module(x), rtol=0, atol=0)
    assert spec.info["sha256"] == _sha(flat_weights)


def test_inceptionv1_accepts_own_and_pre_relu_layouts(incv1, tmp_path):
    from actatlas.models.inception import inceptionv1

    x = _incv1_input()
    with torch.no_grad():
        ref = incv1.module(x)
    own = tmp_path / "own.pth"
    torch.save(incv1.module.state_dict(), own)
    port = {}
    for k, v in incv1.module.state_dict().items():  # the `*_pre_relu_conv` naming of another port
        parts = k.split(".")
        if parts[0] == "softmax2_pre_activation":
            port[f"softmax2_pre_activation_matmul.{parts[-1]}"] = v
        elif parts[0].startswith("conv2d"):
            port[f"{parts[0]}_pre_relu_conv.{parts[-1]}"] = v
        else:
            port[f"{parts[0]}_{parts[1].removeprefix('conv_')}_pre_relu_conv.{parts[-1]}"] = v
    pre = tmp_path / "pre_relu.pth"
    torch.save(port, pre)
    for path in (own, pre):
        with torch.no_grad():
            torch.testing.assert_close(inceptionv1(weights=str(path)).module(x), ref, rtol=0, atol=0)


def test_inceptionv1_missing_keys_is_user_error(incv1, tmp_path):
    from actatlas.models.inception import to_flat_state_dict

    flat = dict(to_flat_state_dict(incv1.module))
    del flat["mixed4c_5x5.weight"]
    p = tmp_path / "partial.pth"
    torch.save(flat, p)
    with pytest.raises(UserError, match="mixed4c"):
        load_model("inceptionv1", weights=str(p))


def test_inceptionv1_url_sha_cache(incv1, flat_weights, tmp_path, monkeypatch):
    from actatlas.models.inception import inceptionv1

    x = _incv1_input()
    with torch.no_grad():
        ref = incv1.module(x)
    cache = tmp_path / "cache"
    url = flat_weights.as_uri()
    sha = _sha(flat_weights)
    with pytest.raises(UserError, match="sha256 mismatch"):
        inceptionv1(weights=url, sha256="f" * 64, cache_dir=cache)
    assert not [p for p in cache.iterdir() if p.is_file()]  # mismatching download removed, no temp left
    spec = inceptionv1(weights=url, sha256=sha, cache_dir=cache)
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-inception5h.pth")
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), ref, rtol=0, atol=0)
    flat_weights.unlink()  # the second load must come from the cache: no download possible now
    monkeypatch.setenv("ACTATLAS_CACHE", str(cache))
    spec2 = load_model("inceptionv1", weights=url, sha256=sha.upper())
    assert spec2.info["weights"] == str(cached[0])
    with torch.no_grad():
        torch.testing.assert_close(spec2.module(x), ref, rtol=0, atol=0)


def test_inceptionv1_labels(tmp_path):
    from actatlas.models.inception import inceptionv1, read_labels

    p = tmp_path / "labels.txt"
    p.write_text("dummy\n" + "".join(f"n{i:08d} thing {i}\n" for i in range(1000)))
    names, wnids = read_labels(p)
    assert len(names) == 1008 and names[0] == "dummy" and names[1] == "thing 0"
    assert names[1001] == "unused_1001" and wnids[0] == "" and wnids[1] == "n00000000"
    spec = inceptionv1(labels=p)
    assert spec.class_index("thing 3") == 4 and spec.class_index("n00000003") == 4
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(f"name{i}" for i in range(1008)) + "\n")
    assert read_labels(plain)[1] is None
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ModelError, match=r"has 2 labels but the model has 1008 logits.*1001"):
        read_labels(bad)


# ---------------------------------------------------------------- weights


def test_fetch_weights_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        fetch_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="64 hexadecimal"):
        fetch_weights(str(tmp_path / "nope.pth"), sha256="abc")
    with pytest.raises(UserError, match="unsupported URL scheme"):
        fetch_weights("ftp://example.com/w.pth", cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"127\.0\.0\.1.*weights FILE"):
        fetch_weights("http://127.0.0.1:9/w.pth", cache_dir=tmp_path)  # connection refused
    missing = (tmp_path / "gone.pth").as_uri()
    with pytest.raises(UserError, match="weights FILE"):
        fetch_weights(missing, cache_dir=tmp_path / "c")


def test_fetch_weights_local_and_sha(tmp_path):
    p = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, p)
    assert fetch_weights(str(p)) == p
    assert fetch_weights(p, sha256="sha256:" + _sha(p)) == p
    with pytest.raises(UserError, match="sha256 mismatch"):
        fetch_weights(p, sha256="0" * 64)


def test_load_state_dict_variants(tmp_path):
    sd = {"a.weight": torch.ones(2)}
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module.a.weight": torch.ones(2)}, "epoch": 3}, wrapped)
    assert list(load_state_dict(wrapped)) == list(sd)
    not_sd = tmp_path / "list.pth"
    torch.save([torch.ones(2)], not_sd)
    with pytest.raises(UserError, match="state dict"):
        load_state_dict(not_sd)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_state_dict(garbage)


# ---------------------------------------------------------------- adapters


def test_factory_returning_spec():
    spec = load_model("tinymodels:tiny_cnn")
    assert spec.preprocess.size == 32 and spec.class_names[:2] == ["c0", "c1"]
    assert spec.default_layer == "conv2" and spec.info["factory"] == "tinymodels:tiny_cnn"
    assert not any(p.requires_grad for p in spec.module.parameters())
    with torch.no_grad():
        y = spec.module(torch.zeros(2, 3, 32, 32))
    assert y.shape == (2, 10)
    again = load_model("tinymodels:tiny_cnn")
    assert all(torch.equal(a, b) for a, b in zip(spec.module.state_dict().values(),
                                                 again.module.state_dict().values()))
    assert load_model("tinymodels:tiny_cnn", num_classes=5).num_classes == 5


def test_factory_wrapping_module(tmp_path):
    spec = load_model("tinymodels:tiny_module")
    assert spec.preprocess.size == 224 and spec.preprocess.resize == 256
    assert spec.class_names[:2] == ["class_0", "class_1"] and spec.wnids is None
    assert spec.default_layer == "relu2"  # stride 2 is the closest to 16 in this tiny net
    p = tmp_path / "tiny.pth"
    sd = {k: torch.full_like(v, 0.5) for k, v in spec.module.state_dict().items()}
    torch.save(sd, p)
    loaded = load_model("tinymodels:tiny_module", weights=str(p))
    assert torch.equal(loaded.module.fc.weight, torch.full_like(loaded.module.fc.weight, 0.5))


@pytest.mark.parametrize("target,match", [
    ("no_such_module_xyz:factory", "cannot import"),
    ("tinymodels:nope", "no attribute"),
    ("tinymodels:NOT_CALLABLE", "not callable"),
    ("tinymodels", "package.module:factory"),
])
def test_factory_errors(target, match):
    with pytest.raises(UserError, match=match):
        factory_model(target)


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model"):
        load_model("no_such_model")


def test_optional_extras_missing_are_user_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match=r"actatlas\[torchvision\]"):
        torchvision_model("resnet18")
    with pytest.raises(UserError, match=r"actatlas\[timm\]"):
        timm_model("resnet18")


def _require(module: str):
    try:
        return pytest.importorskip(module, reason=f"optional extra {module} is not installed")
    except Exception as e:  # noqa: BLE001  e.g. torchvision built for another torch
        pytest.skip(f"optional extra {module} is installed but cannot be imported: {e}")


def test_torchvision_adapter(tmp_path):
    tv = _require("torchvision")
    path = tmp_path / "r18.pth"
    torch.save(tv.models.resnet18(weights=None).state_dict(), path)
    spec = torchvision_model("resnet18", weights=str(path))
    assert spec.num_classes == 1000 and spec.class_names[0] == "tench"
    assert spec.preprocess.size == 224 and spec.preprocess.mean[0] == pytest.approx(0.485 * 255)
    assert spec.default_layer == "layer3"


def test_timm_adapter(tmp_path):
    timm = _require("timm")
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    spec = timm_model("resnet18", weights=str(path))
    assert spec.num_classes == 1000 and spec.default_layer == "layer3"
    assert spec.preprocess.size == 224


# ---------------------------------------------------------------- smooth max-pool gradient (method.md §7 A4)

def _smooth_reference(x, k, s):
    """avg_pool(x^2) / (1e-2 + avg_pool(|x|)) with TF SAME padding, padded cells excluded from the mean,
    written out independently of MaxPool2dSame.avg."""
    h, w = x.shape[-2:]
    oh, ow = math.ceil(h / s), math.ceil(w / s)
    ph = max((oh - 1) * s + k - h, 0)
    pw = max((ow - 1) * s + k - w, 0)
    top, left = ph // 2, pw // 2
    rows = []
    for i in range(oh):
        cols = []
        for j in range(ow):
            y0, x0 = i * s - top, j * s - left
            win = x[..., max(y0, 0):min(y0 + k, h), max(x0, 0):min(x0 + k, w)]
            cols.append((win ** 2).mean((-2, -1)) / (1e-2 + win.abs().mean((-2, -1))))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


@pytest.mark.parametrize("size,k,s", [(7, 3, 2), (8, 3, 2), (6, 3, 1), (9, 2, 2)])
def test_smooth_maxpool_gradient_is_the_relaxations(size, k, s):
    torch.manual_seed(size * 10 + k)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    pool = MaxPool2dSame(k, s)
    g = torch.randn(pool(x).shape, dtype=torch.float64)
    pool.smooth_grad = True
    xa = x.clone().requires_grad_(True)
    y = pool(xa)
    assert torch.equal(y.detach(), MaxPool2dSame(k, s)(x))            # forward unchanged
    (ga,) = torch.autograd.grad(y, xa, g)
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(_smooth_reference(xr, k, s), xr, g)
    torch.testing.assert_close(ga, gr, rtol=1e-10, atol=1e-12)
    # forward mode (what collection uses) gives the same directional derivative
    v = torch.randn_like(x)
    with fwAD.dual_level():
        out = pool(fwAD.make_dual(x, v))
        tangent = fwAD.unpack_dual(out).tangent
    _, ref_t = torch.func.jvp(lambda t: _smooth_reference(t, k, s), (x,), (v,))
    torch.testing.assert_close(tangent, ref_t, rtol=1e-10, atol=1e-12)
    # and it differs from the hard max-pool's gradient (the override is really applied)
    pool.smooth_grad = False
    xh = x.clone().requires_grad_(True)
    (gh,) = torch.autograd.grad(pool(xh), xh, g)
    assert not torch.allclose(gh, ga)


def test_smooth_maxpool_context_restores_and_counts():
    from actatlas.models.layers import smooth_maxpool_gradients

    net = nn.Sequential(MaxPool2dSame(3, 2), nn.ReLU(), MaxPool2dSame(3, 1))
    with smooth_maxpool_gradients(net) as n:
        assert n == 2 and all(m.smooth_grad for m in net if isinstance(m, MaxPool2dSame))
    assert not any(m.smooth_grad for m in net if isinstance(m, MaxPool2dSame))
