"""lucent compatibility of inceptionv1 (issue 14): lucent's state dict and layer names, Lucid's and lucent's
label lists, softmax2 as the softmax, the named weights source with trust-on-first-use sha256, one-line
errors for foreign weights and labels, and the redirected ReLU gradient of rendering.

The weights fixture is a random state dict in lucent's key format, built here from the layer shapes of
lucent's published ``InceptionV1`` (lucent/modelzoo/inceptionv1/InceptionV1.py): nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actatlas.errors import ConfigError, ModelError
from actatlas.models import ModelSpec, Preprocess, load_model
from actatlas.models.inception import inceptionv1, lucent_key_map, read_labels, to_flat_state_dict
from actatlas.models.weights import WEIGHT_SOURCES, fetch_weights, recorded_sha256
from actatlas.render import (FFTImage, RedirectedReLU, RenderConfig, channel, optimize, redirected_relu,
                             redirected_relu_grad, render_icons, uses_redirected_relu)
from actatlas.render.redirect import RedirectSchedule

LUCENT_URL = "https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth"

# lucent's InceptionV1: stem convs (name, in, out, kernel) and mixed blocks
# (name, in, 1x1, 3x3_bottleneck, 3x3, 5x5_bottleneck, 5x5, pool_reduce)
STEM = [("conv2d0", 3, 64, 7), ("conv2d1", 64, 64, 1), ("conv2d2", 64, 192, 3)]
MIXED = [
    ("mixed3a", 192, 64, 96, 128, 16, 32, 32),
    ("mixed3b", 256, 128, 128, 192, 32, 96, 64),
    ("mixed4a", 480, 192, 96, 204, 16, 48, 64),
    ("mixed4b", 508, 160, 112, 224, 24, 64, 64),
    ("mixed4c", 512, 128, 128, 256, 24, 64, 64),
    ("mixed4d", 512, 112, 144, 288, 32, 64, 64),
    ("mixed4e", 528, 256, 160, 320, 32, 128, 128),
    ("mixed5a", 832, 256, 160, 320, 48, 128, 128),
    ("mixed5b", 832, 384, 192, 384, 48, 128, 128),
]


def lucent_shapes() -> dict[str, tuple[int, ...]]:
    """lucent's state-dict keys -> shapes."""
    convs = list(STEM)
    for name, cin, c1, c3r, c3, c5r, c5, cp in MIXED:
        convs += [(f"{name}_1x1", cin, c1, 1), (f"{name}_3x3_bottleneck", cin, c3r, 1),
                  (f"{name}_5x5_bottleneck", cin, c5r, 1), (f"{name}_pool_reduce", cin, cp, 1),
                  (f"{name}_3x3", c3r, c3, 3), (f"{name}_5x5", c5r, c5, 5)]
    shapes = {}
    for name, cin, cout, k in convs:
        shapes[f"{name}_pre_relu_conv.weight"] = (cout, cin, k, k)
        shapes[f"{name}_pre_relu_conv.bias"] = (cout,)
    shapes["softmax2_pre_activation_matmul.weight"] = (1008, 1024)
    shapes["softmax2_pre_activation_matmul.bias"] = (1008,)
    return shapes


def random_lucent_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in lucent_shapes().items():
        if key.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            std = math.sqrt(2.0 / fan_in) if len(shape) == 4 else fan_in ** -0.5
            state[key] = torch.randn(shape, generator=gen) * std
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


@pytest.fixture(scope="module")
def lucent_state():
    return random_lucent_state()


@pytest.fixture(scope="module")
def lucent_file(lucent_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("lucent") / "inception5h.pth"
    torch.save(lucent_state, path)
    return path


@pytest.fixture(scope="module")
def lucent_spec(lucent_file):
    return load_model("inceptionv1", weights=str(lucent_file))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- an independent reference forward

def _same(x, k, s, value=0.0):
    """TensorFlow SAME padding for a k x k window at stride s."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def reference_forward(sd, x):
    """Lucid's InceptionV1 from lucent's state dict with plain functional ops: (logits, {mixed: output})."""
    def conv(h, name, stride=1):
        w = sd[f"{name}_pre_relu_conv.weight"]
        return F.relu(F.conv2d(_same(h, w.shape[-1], stride), w, sd[f"{name}_pre_relu_conv.bias"], stride))

    def pool(h, s):
        return F.max_pool2d(_same(h, 3, s, float("-inf")), 3, s)

    def lrn(h):
        return F.local_response_norm(h, size=9, alpha=9.99999974738e-05, beta=0.5, k=1.0)

    h = lrn(pool(conv(x, "conv2d0", 2), 2))
    h = pool(lrn(conv(conv(h, "conv2d1"), "conv2d2")), 2)
    outs = {}
    for name, *_ in MIXED:
        if name in ("mixed4a", "mixed5a"):
            h = pool(h, 2)
        h = torch.cat([conv(h, f"{name}_1x1"), conv(conv(h, f"{name}_3x3_bottleneck"), f"{name}_3x3"),
                       conv(conv(h, f"{name}_5x5_bottleneck"), f"{name}_5x5"),
                       conv(pool(h, 1), f"{name}_pool_reduce")], dim=1)
        outs[name] = h
    logits = F.linear(h.mean(dim=(2, 3)), sd["softmax2_pre_activation_matmul.weight"],
                      sd["softmax2_pre_activation_matmul.bias"])
    return logits, outs


def test_lucent_state_dict_loads_and_forward_matches_reference(lucent_state, lucent_spec):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 224, 224, generator=gen) * 255 - 117
    got = {}
    hooks = [lucent_spec.module.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: got.__setitem__(n, o)) for n in ("mixed3a", "mixed4c", "mixed5b")]
    try:
        with torch.no_grad():
            logits = lucent_spec.module(x)
            ref_logits, ref = reference_forward(lucent_state, x)
    finally:
        for h in hooks:
            h.remove()
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_lucent_key_map_is_lucents_state_dict(lucent_state, lucent_spec):
    assert set(lucent_key_map()) == set(lucent_state)
    exported = to_flat_state_dict(lucent_spec.module, layout="lucent")
    assert set(exported) == set(lucent_state)
    for key, value in lucent_state.items():
        assert torch.equal(exported[key], value), key


def test_lucent_layer_names_are_aliases(lucent_state, lucent_spec):
    spec = lucent_spec
    for key in lucent_state:  # every module name of lucent's state dict -> the module holding that tensor
        stem, leaf = key.rsplit(".", 1)
        module = spec.module.get_submodule(spec.resolve_layer(stem))
        assert torch.equal(getattr(module, leaf), lucent_state[key]), key
    assert spec.resolve_layer("mixed4c_3x3_pre_relu_conv") == "mixed4c.conv_3x3.conv"
    assert spec.resolve_layer("mixed4c_pool_reduce_pre_relu_conv") == "mixed4c.pool_reduce.conv"
    assert spec.resolve_layer("conv2d0_pre_relu_conv") == "conv2d0.conv"
    assert spec.resolve_layer("mixed4c_3x3") == "mixed4c.conv_3x3"          # lucent's ReLU layers
    assert spec.resolve_layer("mixed4c_pool") == "mixed4c.pool"
    assert spec.resolve_layer("softmax2_pre_activation_matmul") == "softmax2_pre_activation"
    assert spec.resolve_layer("logits") == "softmax2_pre_activation"
    assert spec.resolve_layer("softmax2") == "softmax2"
    assert spec.layer_label("mixed4c.conv_3x3.conv") == "mixed4c_3x3_pre_relu_conv"
    assert spec.layer_label("mixed4c") == "mixed4c" and spec.layer_label("softmax2_pre_activation") == "logits"


def test_softmax2_hook_reads_probabilities(lucent_spec):
    from actatlas.render import forward_to_layers

    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        out = forward_to_layers(lucent_spec.module, x, ["softmax2", "softmax2_pre_activation"])
    torch.testing.assert_close(out["softmax2"], torch.softmax(out["softmax2_pre_activation"], dim=1))


# ---------------------------------------------------------------- foreign weights: one line

def _save(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def _one_line_error(path) -> str:
    with pytest.raises(ModelError) as err:
        inceptionv1(weights=str(path))
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_key_names_it(lucent_state, tmp_path):
    state = dict(lucent_state)
    del state["mixed4c_5x5_pre_relu_conv.weight"]
    msg = _one_line_error(_save(tmp_path, state))
    assert "1 of 116 keys missing, first mixed4c_5x5_pre_relu_conv.weight" in msg


def test_extra_key_names_it(lucent_state, tmp_path):
    state = {**lucent_state, "mixed6a_1x1_pre_relu_conv.weight": torch.zeros(1)}
    msg = _one_line_error(_save(tmp_path, state))
    assert "1 unexpected keys, first mixed6a_1x1_pre_relu_conv.weight" in msg


def test_wrong_shape_names_key_and_shapes(lucent_state, tmp_path):
    state = dict(lucent_state)
    state["mixed4c_3x3_pre_relu_conv.weight"] = torch.zeros(256, 128, 5, 5)
    msg = _one_line_error(_save(tmp_path, state))
    assert "mixed4c_3x3_pre_relu_conv.weight (256, 128, 5, 5) (expected (256, 128, 3, 3))" in msg


def test_other_network_is_refused(tmp_path):
    state = {"features.0.weight": torch.zeros(64, 3, 3, 3), "classifier.weight": torch.zeros(1000, 512)}
    msg = _one_line_error(_save(tmp_path, state))
    assert "116 of 116 keys missing, first conv2d0_pre_relu_conv.weight" in msg
    assert "unexpected keys, first features.0.weight, classifier.weight" in msg


def test_auxiliary_heads_of_lucids_graph_are_ignored(lucent_state, lucent_spec, tmp_path):
    state = {**lucent_state, "head0_bottleneck_pre_relu_conv.weight": torch.zeros(128, 508, 1, 1),
             "nn0_pre_relu_matmul.weight": torch.zeros(1024, 2048), "softmax1_pre_activation_matmul.bias":
             torch.zeros(1008)}
    spec = inceptionv1(weights=str(_save(tmp_path, state, "aux.pth")))
    assert torch.equal(spec.module.softmax2_pre_activation.bias, lucent_spec.module.softmax2_pre_activation.bias)


# ---------------------------------------------------------------- labels

REAL = {982: ("n10565667", "scuba diver"), 278: ("n04252225", "snowplow"), 507: ("n04251144", "snorkel")}


def _lucent_lines() -> list[str]:
    lines = []
    for i in range(1, 1001):
        wnid, name = REAL.get(i, (f"n{90000000 + i:08d}", f"thing {i}"))
        lines.append(f"{wnid} {i} {name}")
    return lines


def test_lucent_label_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("\n".join(_lucent_lines()) + "\n")
    spec = inceptionv1(labels=p)
    assert spec.num_classes == 1008
    assert spec.class_index("scuba diver") == 982 and spec.class_index("scuba_diver") == 982
    assert spec.class_index("n04252225") == 278 and spec.class_index("N04252225") == 278
    assert spec.class_names[0] == "dummy" and spec.class_names[1001] == "unused_1001"
    assert spec.wnids[982] == "n10565667" and spec.wnids[0] == ""
    with pytest.raises(ModelError, match="did you mean"):
        spec.class_index("scuba divers")


def test_lucent_label_file_with_a_dummy_line_keeps_the_indices(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("dummy\n" + "\n".join(_lucent_lines()) + "\n")
    names, wnids = read_labels(p)
    assert names[982] == "scuba diver" and wnids[278] == "n04252225" and names[0] == "dummy"


def test_lucid_1001_and_1008_line_lists(tmp_path):
    names = ["dummy"] + [REAL.get(i, (None, f"thing {i}"))[1] for i in range(1, 1001)]
    p1001 = tmp_path / "alternate.txt"
    p1001.write_text("\n".join(names) + "\n")
    got, wnids = read_labels(p1001)
    assert got[982] == "scuba diver" and got[0] == "dummy" and got[1007] == "unused_1007" and wnids is None
    p1008 = tmp_path / "padded.txt"
    p1008.write_text("\n".join(names + ["dummy"] * 7) + "\n")
    got, _ = read_labels(p1008)
    assert len(got) == 1008 and got[982] == "scuba diver"
    with_wnids = tmp_path / "synsets.txt"
    with_wnids.write_text("dummy\n" + "\n".join(f"{REAL[i][0]} {REAL[i][1]}" if i in REAL else f"thing {i}"
                                                for i in range(1, 1001)))
    spec = inceptionv1(labels=with_wnids)
    assert spec.class_index("n10565667") == 982 and spec.class_index("snowplow") == 278


def test_label_count_mismatch_is_one_line_with_both_counts(tmp_path):
    p = tmp_path / "standard.txt"
    p.write_text("\n".join(f"name {i}" for i in range(1000)) + "\n")  # 1000 names without indices
    with pytest.raises(ModelError) as err:
        read_labels(p)
    msg = str(err.value)
    assert "\n" not in msg and "has 1000 labels but the model has 1008 logits" in msg
    p.write_text("n01234567 1500 thing\n")
    with pytest.raises(ModelError, match="names logit 1500, but the model has 1008 logits"):
        read_labels(p)
    p.write_text("n01234567 5 thing\nn01234568 5 other\n")
    with pytest.raises(ModelError, match="logit 5 is named twice"):
        read_labels(p)


# ---------------------------------------------------------------- the named weights source

def test_inception5h_entry_points_at_lucents_file():
    entry = WEIGHT_SOURCES["inception5h"]
    assert entry.url == LUCENT_URL and entry.model == "inceptionv1" and entry.sha256 is None


def test_inception5h_trust_on_first_use(lucent_file, lucent_state, tmp_path, monkeypatch, caplog):
    origin = tmp_path / "server" / "inception5h.pth"
    origin.parent.mkdir()
    shutil.copy(lucent_file, origin)
    monkeypatch.setitem(WEIGHT_SOURCES, "inception5h",
                        WEIGHT_SOURCES["inception5h"].__class__(url=origin.as_uri(), model="inceptionv1"))
    cache = tmp_path / "cache"
    monkeypatch.setenv("ACTATLAS_CACHE", str(cache))
    sha = _sha(origin)
    with caplog.at_level("WARNING"):
        spec = load_model("inceptionv1", weights="inception5h")
    assert sha in caplog.text and "trust on first use" in caplog.text       # printed on first download
    cached = next(p for p in cache.iterdir() if p.name.endswith("-inception5h.pth"))
    assert recorded_sha256(cached) == sha                                  # recorded beside the file
    assert (cache / f"{cached.name}.sha256").read_text() == f"{sha}  {cached.name}\n"
    assert spec.info["sha256"] == sha and spec.info["source"] == "inception5h"
    assert torch.equal(spec.module.mixed4c.conv_3x3.conv.weight, lucent_state["mixed4c_3x3_pre_relu_conv.weight"])

    origin.unlink()  # later uses come from the cache, verified against the record
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert fetch_weights("inception5h") == cached
    assert "trust on first use" not in caplog.text
    with open(cached, "ab") as f:  # a cached file that changed is refused
        f.write(b"\0")
    with pytest.raises(ModelError, match="changed since their first download"):
        fetch_weights("inception5h")


def test_a_local_file_named_like_a_source_wins(lucent_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(lucent_file, tmp_path / "inception5h")
    assert fetch_weights("inception5h").resolve() == (tmp_path / "inception5h").resolve()


# ---------------------------------------------------------------- redirected ReLU

def _grads(module, x, g):
    x = x.clone().requires_grad_(True)
    module(x).backward(g)
    return x.grad


def test_redirected_relu_gradient_rule():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    x[1] = -x[1].abs() - 0.1            # image 1: nothing active, so no true gradient flows
    x[0, 0, 0, 0] = 0.0                 # x == 0 counts as inactive
    g = torch.randn(2, 3, 4, 4, generator=gen)
    schedule = RedirectSchedule()
    schedule.set_step(0)
    red = _grads(RedirectedReLU(schedule), x, g)
    ref = _grads(nn.ReLU(), x, g)
    torch.testing.assert_close(red[0], ref[0], rtol=0, atol=0)     # where gradient flows: torch's
    pos = x[0] > 0
    assert torch.equal(red[0][pos], g[0][pos])
    # image 1 (all x <= 0): the gradient passes where it pushes x up (g < 0 for the minimised loss)
    torch.testing.assert_close(red[1], torch.where(g[1] < 0, g[1], torch.zeros_like(g[1])), rtol=0, atol=0)
    assert torch.equal(redirected_relu_grad(x, g), red)
    schedule.set_step(17)               # after Lucid's 17 steps (global_step <= 16): torch's gradient
    torch.testing.assert_close(_grads(RedirectedReLU(schedule), x, g), ref, rtol=0, atol=0)


def test_redirected_relu6_upper_region():
    x = torch.tensor([[-1.0, 7.0, 8.0, 9.0]])
    g = torch.tensor([[-0.5, -1.0, 2.0, 0.5]])
    # nothing flows (no 0 < x < 6): pass where the step pushes x back inside, i.e. up below 0, down above 6
    assert torch.equal(redirected_relu_grad(x, g, upper=6.0), torch.tensor([[-0.5, 0.0, 2.0, 0.5]]))
    x2 = torch.tensor([[-1.0, 3.0, 8.0]])
    g2 = torch.tensor([[-0.5, 1.0, 2.0]])
    ref = _grads(nn.ReLU6(), x2, g2)
    assert torch.equal(redirected_relu_grad(x2, g2, upper=6.0), ref)


def test_redirected_relu_swaps_and_restores_modules():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU6()))
    relu, relu6 = net[1], net[2][1]
    seen = []
    handle = relu.register_forward_hook(lambda _m, _i, o: seen.append(o.shape))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    with redirected_relu(net):
        assert isinstance(net[1], RedirectedReLU) and net[2][1].upper == 6.0
        with torch.no_grad():
            torch.testing.assert_close(net(x), before, rtol=0, atol=0)   # forward values unchanged
    assert net[1] is relu and net[2][1] is relu6
    assert len(seen) == 2                      # the original's hook also fired inside the block
    handle.remove()


def test_redirect_starts_a_dead_unit():
    """A unit that is off everywhere gets no gradient from a plain ReLU; the redirected one moves the image."""
    conv = nn.Conv2d(3, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(0.1)
        conv.bias.fill_(-100.0)
    spec = ModelSpec(name="dead", module=nn.Sequential(conv, nn.ReLU()), class_names=["a"], default_layer="1",
                     preprocess=Preprocess(size=16, resize=None, mode="squash", mean=(127.5,) * 3, std=(127.5,) * 3))
    images = {}
    for flag in (False, True):
        param = FFTImage(1, 16, 16, generator=torch.Generator().manual_seed(0))
        start = param().detach()
        res = optimize(spec, param, channel("1", 0), steps=3, progress=False, redirected_relu=flag)
        images[flag] = (res.images - start).abs().max().item()
    assert images[False] == 0.0 and images[True] > 0.0
    assert type(spec.module[1]) is nn.ReLU


def test_redirected_relu_setting_and_model_defaults():
    assert RenderConfig().redirected_relu is None and RenderConfig.cpu_default().redirected_relu is None
    with pytest.raises(ConfigError, match="redirected_relu"):
        RenderConfig(redirected_relu="yes")
    assert uses_redirected_relu(None, {"redirected_relu": True}) is True
    assert uses_redirected_relu(None, {}) is False
    assert uses_redirected_relu(False, {"redirected_relu": True}) is False
    assert uses_redirected_relu(True, {}) is True


def _spy(monkeypatch):
    optimize_module = sys.modules["actatlas.render.optimize"]  # the module (the package exports the function)
    calls = []
    real = optimize_module.redirect_relus

    def spy(module, *a, **k):
        calls.append(type(module).__name__)
        return real(module, *a, **k)

    monkeypatch.setattr(optimize_module, "redirect_relus", spy)
    return calls


def test_off_by_default_for_efficientnet(monkeypatch):
    lite0 = load_model("efficientnet_lite0")
    assert uses_redirected_relu(None, lite0.info) is False
    calls = _spy(monkeypatch)
    cfg = RenderConfig(steps=2, icon_size=32, batch_size=1, whiten=False, transforms="none", boundary_weight=0)
    dirs = torch.randn(1, 40, generator=torch.Generator().manual_seed(0)).numpy()
    render_icons(lite0, "blocks.3", dirs, cfg, progress=False)
    assert calls == []
    flags = {n: m.inplace_act for n, m in lite0.module.named_modules() if hasattr(m, "inplace_act")}
    render_icons(lite0, "blocks.3", dirs, cfg.replace(redirected_relu=True), progress=False)
    assert calls == ["EfficientNetLite"]                   # on request it applies to ReLU6 too
    assert flags == {n: m.inplace_act for n, m in lite0.module.named_modules() if hasattr(m, "inplace_act")}
    assert all(type(m) is not RedirectedReLU for m in lite0.module.modules())


def test_on_by_default_for_inceptionv1(lucent_spec, monkeypatch):
    assert lucent_spec.info["redirected_relu"] is True
    calls = _spy(monkeypatch)
    cfg = RenderConfig(steps=2, icon_size=32, batch_size=1, whiten=False, transforms="none", boundary_weight=0)
    dirs = torch.randn(1, 256, generator=torch.Generator().manual_seed(0)).numpy()
    render_icons(lucent_spec, "mixed3a", dirs, cfg, progress=False)
    assert calls == ["InceptionV1"]
    render_icons(lucent_spec, "mixed3a", dirs, cfg.replace(redirected_relu=False), progress=False)
    assert calls == ["InceptionV1"]
    assert all(type(m) is not RedirectedReLU for m in lucent_spec.module.modules())
