"""Render less (issue 12): the continuous-batching loop, per-image stopping, warm starts from parent
icons, per-image redirected ReLU, and the steps the render stage records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import actatlas
from actatlas.errors import ConfigError
from actatlas.pipeline import parent_cells
from actatlas.render import FFTImage, RenderConfig, centre_activations, channel, optimize, render_icons
from actatlas.render.optimize import StopRule, lr_factor, optimize_queue
from actatlas.render.redirect import redirected_relu_grad


@pytest.fixture(scope="module")
def tiny():
    return actatlas.load_model("tinymodels:tiny_cnn")


@pytest.fixture(scope="module")
def dirs(tiny):
    """[6, 16] reachable targets: conv2 centre activations of contrasty images minus that of grey."""
    x = FFTImage(6, 24, 24, sd=3.0, generator=torch.Generator().manual_seed(9))().detach()
    grey = centre_activations(tiny, "conv2", torch.full((1, 3, 24, 24), 0.5))
    return (centre_activations(tiny, "conv2", x) - grey).numpy()


def _cfg(**kw):
    base = dict(steps=24, attempts=1, icon_size=24, batch_size=4, whiten=False, boundary_weight=0.0, seed=0)
    return RenderConfig(**{**base, **kw})


def _param(b):
    return FFTImage(b, 24, 24, generator=torch.Generator().manual_seed(0))


def test_spectrum_of_inverts_the_parameterisation():
    p = FFTImage(3, 24, 20, sd=0.5, generator=torch.Generator().manual_seed(1))
    img = p().detach()
    q = FFTImage(3, 24, 20)
    with torch.no_grad():
        q.spectrum.copy_(q.spectrum_of(img))
    assert torch.allclose(q(), img, atol=1e-5)
    with pytest.raises(ValueError, match="must be"):
        q.spectrum_of(img[:, :, :10])


def test_queue_with_one_slot_is_torch_adam(tiny):
    """Per-image Adam of the continuous loop = torch's Adam, for one image without transforms."""
    start = FFTImage(1, 24, 24, generator=torch.Generator().manual_seed(3)).spectrum.detach().clone()
    obj = channel("mid", 2)
    ref = _param(1)
    with torch.no_grad():
        ref.spectrum.copy_(start)
    a = optimize(tiny, ref, obj, None, steps=10, lr=0.05, progress=False)
    q = optimize_queue(tiny, _param, start, lambda items: obj, None, StopRule(max_steps=10), batch=1, lr=0.05)
    assert q.steps.tolist() == [10] and q.batch_steps == 10
    assert torch.allclose(q.images, a.images[:, :3], atol=1e-5)
    np.testing.assert_allclose(q.record, a.final_values, rtol=1e-5)


def test_queue_items_do_not_depend_on_their_batch(tiny, dirs):
    """Without transforms every item's optimisation is its own: batch 1 and batch 4 give the same
    images (slots refill as items finish), and every item runs its max_steps."""
    from actatlas.render.icons import _objectives

    starts = torch.cat([FFTImage(1, 24, 24, generator=torch.Generator().manual_seed(k)).spectrum.detach()
                        for k in range(6)], dim=1)
    cfg = _cfg(objective="cosine")

    def make(items):
        return _objectives("conv2", dirs[np.asarray(items)], None, cfg)[1]

    one = optimize_queue(tiny, _param, starts, make, None, StopRule(max_steps=7), batch=1)
    four = optimize_queue(tiny, _param, starts, make, None, StopRule(max_steps=7), batch=4)
    assert one.steps.tolist() == [7] * 6 == four.steps.tolist()
    assert one.batch_steps == 42 and four.batch_steps == 7 + 7    # 4 slots, then the remaining 2
    assert torch.allclose(one.images, four.images, atol=1e-4)


def test_plateau_stops_each_image_on_its_own(tiny, dirs):
    """A plateau rule ends items at different steps (never before min_steps, never after max_steps),
    and spends fewer passes than running every item to the cap."""
    cfg = _cfg(steps=60, stop="plateau", min_steps=6, plateau_window=4, plateau_tol=0.05, objective="cosine")
    ic = render_icons(tiny, "conv2", dirs, cfg, progress=False)
    assert ic.steps.shape == (6,) and ((ic.steps >= 6) & (ic.steps <= 60)).all()
    assert ic.steps.min() < 60 and len(set(ic.steps.tolist())) > 1
    full = render_icons(tiny, "conv2", dirs, cfg.replace(stop="fixed", lr_schedule="cosine"), progress=False)
    assert full.steps.tolist() == [60] * 6
    # determinism, and the fixed-length reference loop records its steps too
    again = render_icons(tiny, "conv2", dirs, cfg, progress=False)
    assert np.array_equal(again.images, ic.images) and np.array_equal(again.steps, ic.steps)
    ref = render_icons(tiny, "conv2", dirs, _cfg(steps=5, attempts=2), progress=False)
    assert ref.steps.tolist() == [10] * 6


def test_warm_start_begins_at_the_given_image(tiny, dirs):
    """With 1 step and a tiny rate the icon stays at its start image; masked-out rows start at random."""
    start = np.random.default_rng(0).integers(30, 220, (6, 24, 24, 3), dtype=np.uint8)
    mask = np.array([True, True, True, False, True, False])
    ic = render_icons(tiny, "conv2", dirs, _cfg(steps=1, lr=1e-6, transforms="none"), progress=False,
                      init=start, init_mask=mask)
    diff = np.abs(ic.images.astype(int) - start.astype(int)).max(axis=(1, 2, 3))
    assert (diff[mask] <= 1).all() and (diff[~mask] > 20).all()
    with pytest.raises(ValueError, match="init must be uint8"):
        render_icons(tiny, "conv2", dirs, _cfg(), progress=False, init=start[:2])


def test_lr_schedules_and_bad_settings():
    t = torch.arange(0, 33)
    assert torch.all(lr_factor("constant", t, 32) == 1)
    cos = lr_factor("cosine", t, 32)
    assert cos[0] == pytest.approx(1.0) and cos[32] == pytest.approx(0.1) and torch.all(cos[1:] <= cos[:-1])
    warm = lr_factor("warmup-cosine", t, 32)
    assert warm[0] == pytest.approx(1 / 8) and warm[7] == pytest.approx(cos[7].item())
    for bad in (dict(stop="early"), dict(lr_schedule="step"), dict(warm_start="photo"), dict(min_steps=0),
                dict(plateau_window=0), dict(plateau_tol=-1.0)):
        with pytest.raises(ConfigError):
            _cfg(**bad)
    with pytest.raises(ValueError):
        StopRule(window=0)
    rule = StopRule(max_steps=10, plateau=True, min_steps=4, window=2, tol=0.1)
    assert not rule.done([0, 1, 2])                      # too few steps
    assert not rule.done([0, 1, 2, 3])                    # still rising: (2+3)/2 - (0+1)/2 = 2
    assert rule.done([0, 1, 1, 1, 1.05, 1.05])            # 1.05 - 1.0 < 0.1 x 1.0
    assert not rule.done([0, 1, 10, 10, 11.5, 11.5])      # 11.5 - 10 >= 0.1 x 10
    assert rule.done(list(range(10)))                     # the cap
    assert not StopRule(max_steps=10).done([1.0] * 9)


def test_redirected_gradient_per_image():
    """Only the images flagged get the redirected gradient; the others get the true one."""
    x = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    g = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]])   # nothing flows through the true gradient
    both = redirected_relu_grad(x, g)
    assert torch.equal(both, torch.tensor([[-1.0, 0.0], [-1.0, 0.0]]))
    first = redirected_relu_grad(x, g, images=torch.tensor([True, False]))
    assert torch.equal(first, torch.tensor([[-1.0, 0.0], [0.0, 0.0]]))


def test_redirected_relu_runs_in_the_continuous_loop(tiny, dirs):
    """The per-image redirect schedule works inside the continuous loop (each image on its own step)."""
    a = render_icons(tiny, "conv2", dirs, _cfg(steps=4, stop="plateau", redirected_relu=True), progress=False)
    b = render_icons(tiny, "conv2", dirs, _cfg(steps=4, stop="plateau", redirected_relu=False), progress=False)
    assert a.images.shape == b.images.shape == (6, 24, 24, 3)
    assert a.steps.tolist() == b.steps.tolist() == [4] * 6


class _Level:
    def __init__(self, size, cells):
        self.size = size
        self.i = np.array([c[0] for c in cells])
        self.j = np.array([c[1] for c in cells])


def test_parent_cells_nest_and_missing_parents():
    parent = _Level(2, [(0, 0), (1, 1), (1, 0)])
    child = _Level(4, [(0, 0), (1, 1), (3, 3), (2, 0), (0, 3)])
    assert parent_cells(child, parent).tolist() == [0, 0, 1, 2, -1]
    odd = _Level(3, [(2, 2), (1, 1)])          # 3 -> 2: the centre decides
    assert parent_cells(odd, parent).tolist() == [1, 1]


def test_render_stage_records_steps_and_warm_starts(tmp_path, build_tiny):
    """A build with the render-less levers records the steps per icon in level-G.json and mean_steps in
    summary.json, and a rerun of a finished build renders nothing."""
    render = RenderConfig.cpu_default(steps=12, icon_size=24, batch_size=4, stop="plateau", min_steps=4,
                                      plateau_window=2, plateau_tol=0.05, warm_start="parent")
    atlas = build_tiny(tmp_path / "run", render=render)
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    for k, (lv, s) in enumerate(zip(atlas.levels, summary["levels"])):
        assert lv.steps is not None and len(lv.steps) == len(lv.i)
        cap = 24 if k == 0 else 12       # the coarsest level has no parents: twice the steps (standalone)
        assert ((lv.steps >= 4) & (lv.steps <= cap)).all()
        assert s["mean_steps"] == pytest.approx(float(lv.steps.mean()))
        cells = json.loads((out / "atlas" / atlas.layer / f"level-{lv.size}.json").read_text())["cells"]
        assert [c["steps"] for c in cells] == lv.steps.tolist()
    assert summary["mean_steps"] == pytest.approx(float(np.concatenate([lv.steps for lv in atlas.levels]).mean()))
    again = build_tiny(out, render=render)
    assert "render:" + atlas.layer not in [r.name for r in again.report.stages if r.ran]
    loaded = actatlas.Atlas.load(out / "atlas" / atlas.layer)
    assert np.array_equal(loaded.levels[-1].steps, atlas.levels[-1].steps)


def test_default_positions_fill_the_finest_level():
    from actatlas.pipeline import positions_note, positions_per_image

    assert positions_per_image(1000, (10, 20, 40)) == 4        # 2.5 x 40^2 = 4000 samples
    assert positions_per_image(1000, (10, 20)) == 1
    assert positions_per_image(10, (80,)) == 16                # capped
    assert positions_note(1000, 4, (10, 20, 40)) is None
    note = positions_note(1000, 1, (10, 20, 40))
    assert "1000 samples are few for level 40" in note and "per_image=4" in note
    assert "more images or coarser levels" in positions_note(10, 16, (80,))


def test_build_picks_positions_per_image_or_warns(tmp_path, build_tiny, caplog):
    """Without a collect setting, build_atlas picks enough positions per image for the finest level;
    with an explicit one that is too small, it warns."""
    from actatlas.run import open_run

    render = RenderConfig.cpu_default(steps=2, icon_size=16, batch_size=8)
    build_tiny(tmp_path / "auto", levels=(2, 16), collect=None, render=render, limit=40)
    assert open_run(tmp_path / "auto").config["per_image"] == 16     # 2.5 x 256 / 40 = 16
    caplog.set_level("WARNING")
    build_tiny(tmp_path / "few", levels=(2, 16), render=render, limit=40)   # per_image=2 given
    assert any("are few for level 16" in r.getMessage() for r in caplog.records)


def test_member_starts_are_the_closest_members_patches(tiny_run, tmp_path, build_tiny):
    """"member" starts: the real patch of each cell's closest member, cut as the export cuts it; a
    build with member and parent starts renders and records its steps."""
    from actatlas.data import load_rgb
    from actatlas.grid import load_grid
    from actatlas.pipeline import member_starts
    from actatlas.run import open_run
    from actatlas.scores import cut_patch

    run = open_run(tiny_run.run_dir)
    layer = tiny_run.layer
    lv = load_grid(tiny_run.run_dir / "grid", layer)[-1]
    spec = actatlas.load_model("tinymodels:tiny_cnn")
    init, mask = member_starts(run, layer, lv, np.arange(3), 16, spec)
    assert init.shape == (3, 16, 16, 3) and mask.all()
    rows = run.rows(layer)
    shape = run.summary["layer_shapes"][layer]
    pre = spec.preprocess
    for c in range(3):
        r = int(lv.closest[c, 0])
        want = cut_patch(pre.geometry(load_rgb(rows.path[r])), rows.y[r], rows.x[r], tuple(shape[1:]),
                         int(pre.size), 16)
        assert np.array_equal(init[c], np.asarray(want))
    render = RenderConfig.cpu_default(steps=6, icon_size=16, batch_size=4, stop="plateau", min_steps=2,
                                      plateau_window=1, warm_start="parent-member")
    atlas = build_tiny(tmp_path / "pm", render=render)
    assert all(lv.steps is not None and (lv.steps <= 6).all() for lv in atlas.levels)


def test_coarsest_level_renders_standalone(tmp_path, build_tiny):
    """With parent starts the coarsest level (no parents) takes the standalone form: random starts and
    twice the steps; the finer levels take the steps asked for."""
    render = RenderConfig.cpu_default(steps=3, icon_size=16, batch_size=4, warm_start="parent")
    assert render.standalone().steps == 6 and render.standalone().warm_start == "none"
    assert RenderConfig.cpu_default(warm_start="parent-member").standalone().warm_start == "member"
    assert RenderConfig.single_level().steps == 128 and not RenderConfig.single_level().continuous
    atlas = build_tiny(tmp_path / "run", render=render)
    assert atlas.levels[0].steps.tolist() == [6] * len(atlas.levels[0].i)
    assert all(lv.steps.tolist() == [3] * len(lv.i) for lv in atlas.levels[1:])
