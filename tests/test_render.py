"""Tests for actatlas.render: parameterization, transforms, objectives, optimisation, icons.

method.md §7.A6-A9 acceptance tests plus behaviour on the tiny model; one slow test on
efficientnet_lite0 (blocks.8).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import actatlas
from actatlas.render import (
    NOTEBOOK_SCALES, RECIPE_ANGLES, RECIPE_SCALES, Compose, CropOrPadTo, FFTImage, Jitter, Objective, Pad,
    RandomRotate, RandomScale, RenderConfig, RenderContext, as_objective, blur5, boundary_penalty,
    centre_activations, channel, color_correlation_matrix, direction, direction_cossim,
    fidelity_of_activations, forward_to_layers, notebook_transforms, optimize, recipe_transforms,
    render_icons, spectrum_scale, warmup,
)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="module")
def tiny():
    return actatlas.load_model("tinymodels:tiny_cnn")


@pytest.fixture(scope="module")
def tiny_dirs(tiny):
    """[4, 16] reachable targets: conv2 centre activations of contrasty images minus that of grey."""
    x = FFTImage(4, 24, 24, sd=3.0, generator=gen(9))().detach()
    grey = centre_activations(tiny, "conv2", torch.full((1, 3, 24, 24), 0.5))
    return (centre_activations(tiny, "conv2", x) - grey).numpy()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- parameterization (§1.10, §7.A7) -------------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(80, 80), (33, 47), (10, 9)])
def test_zero_spectrum_is_exactly_half(h, w):
    p = FFTImage(2, h, w, generator=gen())
    with torch.no_grad():
        p.spectrum.zero_()
    img = p()
    assert img.shape == (2, 3, h, w)
    assert torch.equal(img, torch.full_like(img, 0.5))


def test_spectrum_scale_formula():
    for h, w in [(80, 80), (6, 9), (7, 4)]:
        fy = np.fft.fftfreq(h)[:, None]
        fx = np.abs(np.fft.fftfreq(w)[: w // 2 + 1])[None, :]
        f = np.sqrt(fx ** 2 + fy ** 2)
        expected = np.sqrt(h * w) / np.maximum(f, 1.0 / max(h, w))
        got = spectrum_scale(h, w).numpy()
        assert got.shape == (h, w // 2 + 1)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert spectrum_scale(80, 80)[0, 0].item() == pytest.approx(80 * 80)  # DC: sqrt(hw) * max(h, w)


def test_color_matrix_normalised_by_max_column_norm():
    c = color_correlation_matrix()
    assert c.norm(dim=0).max().item() == pytest.approx(1.0, abs=1e-6)
    raw = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    assert raw.norm(dim=0).max().item() == pytest.approx(0.4620, abs=1e-4)
    torch.testing.assert_close(c * raw.norm(dim=0).max(), raw)


def test_output_strictly_inside_unit_interval_and_alpha():
    p = FFTImage(3, 40, 40, sd=0.01, generator=gen(1))
    img = p()
    assert img.shape == (3, 3, 40, 40) and img.min() > 0 and img.max() < 1 and img.std() > 0
    pa = FFTImage(2, 16, 16, alpha=True, generator=gen(1))
    assert pa().shape == (2, 4, 16, 16)
    assert torch.equal(FFTImage(1, 8, 8, generator=gen(5))(), FFTImage(1, 8, 8, generator=gen(5))())


# --- transforms (§1.11, §7.A8) -------------------------------------------------------------------------
def test_recipe_scales_and_angles():
    assert len(RECIPE_SCALES) == 20
    assert min(RECIPE_SCALES) == pytest.approx(0.9249, abs=1e-4)
    assert max(RECIPE_SCALES) == pytest.approx(0.9608, abs=1e-4)
    assert len(RECIPE_ANGLES) == 75
    assert Counter(RECIPE_ANGLES)[0] == 8 and min(RECIPE_ANGLES) == -20 and max(RECIPE_ANGLES) == 19
    assert len(NOTEBOOK_SCALES) == 125
    assert max(NOTEBOOK_SCALES) == pytest.approx(1.0254, abs=1e-4)
    assert min(NOTEBOOK_SCALES) == pytest.approx(0.6730, abs=1e-4)


def test_recipe_chain_geometry():
    t = recipe_transforms(80)
    assert t.output_sizes((80, 80)) == {(80, 80)}
    # 80 -> pad 112 -> jitters 80 -> scale 73..76 -> jitter 2 -> 71..74 (before crop_or_pad)
    assert Compose(list(t.transforms[:6])).output_sizes((80, 80)) == {(80, 80)}
    scaled = {s for s, _ in t.transforms[6].output_sizes((80, 80))}
    assert scaled == {73, 74, 75, 76}
    x = torch.rand(2, 3, 80, 80)
    g = gen(3)
    for _ in range(10):
        assert t(x, g).shape == (2, 3, 80, 80)


def test_notebook_chain_geometry():
    t = notebook_transforms()
    sizes = t.output_sizes((80, 80))  # pad 2 -> 84 -> jitters 52 -> x scale -> -2
    assert {s for s, _ in sizes} == set(range(32, 52))
    x = torch.rand(1, 3, 80, 80)
    g = gen(4)
    for _ in range(10):
        out = t(x, g)
        assert tuple(out.shape[-2:]) in sizes


def test_same_seed_same_draws_and_per_sample():
    x = torch.rand(4, 3, 80, 80)
    t = recipe_transforms(80)
    assert torch.equal(t(x, gen(7)), t(x, gen(7)))
    assert not torch.equal(t(x, gen(7)), t(x, gen(8)))
    same = torch.rand(1, 3, 40, 40).expand(8, 3, 40, 40)
    shared = Jitter(8)(same, gen(0))
    assert all(torch.equal(shared[0], s) for s in shared)
    each = Jitter(8, per_sample=True)(same, gen(0))
    assert each.shape == (8, 3, 32, 32) and not all(torch.equal(each[0], s) for s in each)
    ps = recipe_transforms(80, per_sample=True)
    assert ps(same.expand(8, 3, 40, 40)[:, :, :40, :40], gen(1)).shape == (8, 3, 80, 80)
    rs = RandomScale(RECIPE_SCALES, per_sample=True)
    assert rs(torch.rand(5, 3, 80, 80), gen(2)).shape == (5, 3, 76, 76)
    with pytest.raises(ValueError):
        Jitter(4)(x, None)


def test_rotation_direction_pad_and_crop():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 7] = 1.0  # right of centre
    r = RandomRotate([90], mode="nearest", pi=math.pi)(x, gen())
    assert r[0, 0, 1, 4] == 1.0 and r.sum() == 1.0  # counter-clockwise: now above the centre
    assert torch.equal(RandomRotate([0])(x, gen()), x)
    p = Pad(2, 0.5)(torch.zeros(1, 3, 4, 4))
    assert p.shape == (1, 3, 8, 8) and p[0, 0, 0, 0] == 0.5 and p[0, 0, 2, 2] == 0
    y = torch.arange(25.0).view(1, 1, 5, 5)
    c = CropOrPadTo(3)(y, None)
    assert torch.equal(c[0, 0], y[0, 0, 1:4, 1:4])
    padded = CropOrPadTo(8)(y, None)  # TF: (8 - 5) // 2 = 1 on top/left, 2 on bottom/right
    assert torch.equal(padded[0, 0, 1:6, 1:6], y[0, 0]) and padded[0, 0, 0].abs().sum() == 0


# --- objectives (§1.9, §7.A6) ------------------------------------------------------------------------------
def _hand_objective(h, v, S, p, variant):
    vp = v @ S if S is not None else v
    out = []
    for hb, vb in zip(h, vp):
        if variant == "lucid":
            dot = np.mean(hb * vb)
            cos = max(0.1, dot / (1e-4 + np.linalg.norm(hb)))
        else:
            dot = np.dot(hb, vb)
            cos = max(0.1, dot / (np.linalg.norm(hb) * np.linalg.norm(vb)))
        out.append(dot * cos ** p)
    return np.array(out)


@pytest.mark.parametrize("variant", ["lucid", "cosine"])
@pytest.mark.parametrize("whiten", [False, True])
def test_direction_cossim_matches_hand_computation(variant, whiten):
    rng = np.random.default_rng(1)
    b, c, H, W = 5, 7, 5, 6
    acts = rng.normal(size=(b, c, H, W))
    v = rng.normal(size=(b, c))
    v[0] = acts[0, :, H // 2, W // 2] * 3  # strongly aligned: cosine far above the floor
    v[1] = -acts[1, :, H // 2, W // 2]      # anti-aligned: floored at 0.1
    a = rng.normal(size=(c, c))
    S = a @ a.T / c + np.eye(c) if whiten else None
    ctx = RenderContext(acts={"L": torch.tensor(acts, dtype=torch.float32)})
    for p in (0, 2, 4):
        got = direction_cossim("L", v, S=S, power=p, variant=variant)(ctx).numpy()
        want = _hand_objective(acts[:, :, H // 2, W // 2], v, S, p, variant)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)
    plain = direction("L", v, S=S)(ctx).numpy()
    vp = v @ S if whiten else v
    np.testing.assert_allclose(plain, np.mean(acts[:, :, H // 2, W // 2] * vp, axis=1), rtol=1e-5, atol=1e-7)
    if whiten:  # S = I reduces to the unwhitened objective (§7.A5)
        eye = direction_cossim("L", v, S=np.eye(c), variant=variant)(ctx)
        torch.testing.assert_close(eye, direction_cossim("L", v, variant=variant)(ctx))


def test_objective_algebra():
    ctx = RenderContext(acts={"A": torch.randn(3, 4, 5, 5), "B": torch.randn(3, 4, 5, 5)},
                        image=torch.rand(3, 3, 16, 16))
    a, b = channel("A", 1), channel("B", 2)
    ra, rb = a(ctx), b(ctx)
    torch.testing.assert_close((a + 0.5 * b)(ctx), ra + 0.5 * rb)
    torch.testing.assert_close((a - b)(ctx), ra - rb)
    torch.testing.assert_close((-a)(ctx), -ra)
    torch.testing.assert_close((a / 4)(ctx), ra / 4)
    torch.testing.assert_close((b * 2 - a)(ctx), 2 * rb - ra)
    torch.testing.assert_close(sum([a, b])(ctx), ra + rb)
    torch.testing.assert_close(Objective.sum([a, b, a])(ctx), 2 * ra + rb)
    assert (a + b).layers == {"A", "B"} and (a + boundary_penalty()).layers == {"A"}
    assert (a - 0.5 * b).name == "channel(A:1) - 0.5 * channel(B:2)"
    assert as_objective("A:1")(ctx).shape == (3,)
    assert as_objective(a) is a
    with pytest.raises(TypeError):
        a * b


def test_boundary_penalty():
    bp = boundary_penalty(5)
    half = torch.full((2, 3, 32, 32), 0.5)
    assert torch.equal(bp(RenderContext(image=half)), torch.zeros(2))
    assert torch.equal(blur5(half), half)
    x = torch.rand(2, 3, 32, 32)
    val = bp(RenderContext(image=x))
    assert val.shape == (2,) and (val < 0).all()
    y = x.clone()
    y[:, :, 12:20, 12:20] = torch.rand(2, 3, 8, 8)  # interior, > 2 px (blur radius) from the border band
    torch.testing.assert_close(bp(RenderContext(image=y)), val)
    # hand computation of blur5 at a corner: 3x3 window of the kernel, weights 1 (inner) / 0.5 (ring)
    z = torch.rand(1, 1, 6, 6)
    k = torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5], [0.5, 0.5, 0.5]])
    assert blur5(z)[0, 0, 0, 0].item() == pytest.approx(float((z[0, 0, :3, :3] * k).sum() / k.sum()), rel=1e-5)


# --- forward, optimisation, icons (§1.11, §7.A9) -----------------------------------------------------------
def test_forward_to_layers_stops_after_deepest(tiny):
    calls = []
    handle = tiny.module.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = forward_to_layers(tiny.module, torch.rand(2, 3, 16, 16), ["conv2", "conv1"])
    finally:
        handle.remove()
    assert out["conv1"].shape == (2, 8, 16, 16) and out["conv2"].shape == (2, 16, 8, 8)
    assert not calls


def test_optimize_maximises_and_leaves_model_frozen(tiny):
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    p = FFTImage(2, 24, 24, generator=gen())
    res = optimize(tiny, p, channel("mid", 3), recipe_transforms(24), steps=30, generator=gen(), progress=False)
    assert res.history.shape == (30,) and res.final_values.shape == (2,)
    assert res.history[-5:].mean() > res.history[:5].mean()
    assert res.images.shape == (2, 3, 24, 24)
    for k, v in tiny.module.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not q.requires_grad for q in tiny.module.parameters())
    assert warmup(tiny, ["conv2"], [(24, 24), (20, 20)], batch=2) >= 0


def _cfg(**kw):
    base = dict(steps=24, attempts=1, icon_size=24, batch_size=4, whiten=False, boundary_weight=0.0, seed=0)
    return RenderConfig(**{**base, **kw})


def test_rendering_raises_objective_and_fidelity(tiny, tiny_dirs):
    start = render_icons(tiny, "conv2", tiny_dirs, _cfg(steps=0), progress=False)
    done = render_icons(tiny, "conv2", tiny_dirs, _cfg(), progress=False)
    assert done.images.shape == (4, 24, 24, 3) and done.images.dtype == np.uint8
    assert done.objective.mean() > start.objective.mean()
    assert done.fidelity.mean() > start.fidelity.mean() + 0.15
    # fidelity is the centre-position cosine of the untransformed icon
    x = torch.as_tensor(done.images).permute(0, 3, 1, 2).float() / 255
    h = centre_activations(tiny, "conv2", x)
    np.testing.assert_allclose(done.fidelity, fidelity_of_activations(h, tiny_dirs), rtol=1e-5, atol=1e-6)


def test_render_is_deterministic(tiny, tiny_dirs):
    cfg = _cfg(steps=8, batch_size=3)
    a = render_icons(tiny, "conv2", tiny_dirs, cfg, progress=False)
    b = render_icons(tiny, "conv2", tiny_dirs, cfg, progress=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.objective, b.objective)
    c = render_icons(tiny, "conv2", tiny_dirs, cfg.replace(seed=1), progress=False)
    assert not np.array_equal(a.images, c.images)


def test_best_of_n_keeps_highest_final_objective(tiny, tiny_dirs):
    cfg = _cfg(steps=6, attempts=3, boundary_weight=1.0)
    ic = render_icons(tiny, "conv2", tiny_dirs, cfg, progress=False)
    assert ic.attempts_objective.shape == (3, 4)
    for i in range(4):
        assert ic.objective[i] == ic.attempts_objective[ic.best_attempt[i], i]
        assert (ic.objective[i] >= ic.attempts_objective[:, i]).all()
    single = render_icons(tiny, "conv2", tiny_dirs, cfg.replace(attempts=1), progress=False)
    np.testing.assert_array_equal(single.attempts_objective[0], ic.attempts_objective[0])
    for i in range(4):  # attempt 0 is the same optimisation in both runs
        assert np.array_equal(single.images[i], ic.images[i]) == (ic.best_attempt[i] == 0)


def test_render_notebook_per_sample_and_ragged_batches(tiny, tiny_dirs):
    dirs = np.concatenate([tiny_dirs, tiny_dirs[:1]])  # 5 icons in batches of 2, 2, 1
    cfg = _cfg(steps=3, batch_size=2, icon_size=40, transforms="notebook", per_sample_transforms=True,
               objective="cosine", attempts=2)
    ic = render_icons(tiny, "mid", dirs, cfg, progress=False)
    assert ic.images.shape == (5, 40, 40, 3) and ic.attempts_objective.shape == (2, 5)
    assert np.isfinite(ic.fidelity).all() and ic.layer == "mid"
    dot = render_icons(tiny, "conv2", dirs[:2], _cfg(steps=2, objective="dot", transforms="none"),
                       progress=False)
    assert dot.objective.shape == (2,)


def test_whitening_and_fidelity_of_activations(tiny, tiny_dirs):
    rng = np.random.default_rng(3)
    h, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    a = rng.normal(size=(5, 5))
    S = a @ a.T + np.eye(5)
    vp = t @ S
    want = (h * vp).sum(1) / np.linalg.norm(h, axis=1) / np.linalg.norm(vp, axis=1)
    np.testing.assert_allclose(fidelity_of_activations(h, t, S), want, rtol=1e-10)
    np.testing.assert_allclose(fidelity_of_activations(h, h), np.ones(6), rtol=1e-12)
    with pytest.raises(ValueError, match="whiten"):
        render_icons(tiny, "conv2", tiny_dirs, _cfg(whiten=True), progress=False)
    ic = render_icons(tiny, "conv2", tiny_dirs[:2], _cfg(steps=4, whiten=True), S=np.eye(16), progress=False)
    assert ic.fidelity.shape == (2,)


def test_render_config_presets():
    art = RenderConfig.article()
    assert (art.steps, art.attempts, art.icon_size, art.batch_size, art.lr) == (1024, 4, 80, 100, 0.05)
    assert art.transforms == "recipe" and art.power == 2 and art.boundary_weight == 1.0
    cpu = RenderConfig.cpu_default(seed=3)
    assert cpu.seed == 3 and cpu.steps <= art.steps
    with pytest.raises(ValueError):
        RenderConfig(transforms="bogus")
    with pytest.raises(ValueError):
        RenderConfig(objective="bogus")


# --- the real model -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_icons_on_efficientnet_lite0_blocks8():
    spec = actatlas.load_model("efficientnet_lite0")
    files = sorted(SAMPLE.glob("*.JPEG"))[::250][:4] if SAMPLE.is_dir() else []
    if len(files) == 4:  # real directions: centre activations of photos
        from PIL import Image

        x = torch.from_numpy(np.stack([spec.preprocess.to_uint8(Image.open(f).convert("RGB")) for f in files]))
        x = x.float() / 255
    else:  # smooth synthetic images
        x = FFTImage(4, 224, 224, sd=0.2, generator=gen(9))().detach()
    dirs = centre_activations(spec, "blocks.8", x).numpy()
    cfg = RenderConfig(steps=64, attempts=1, icon_size=48, batch_size=4, whiten=False, seed=0)
    start = render_icons(spec, "blocks.8", dirs, cfg.replace(steps=0), progress=False)
    done = render_icons(spec, "blocks.8", dirs, cfg, progress=False)
    assert done.images.shape == (4, 48, 48, 3)
    assert done.objective.mean() > start.objective.mean()
    assert done.fidelity.mean() > start.fidelity.mean() + 0.1
    assert (done.fidelity > start.fidelity).all()
