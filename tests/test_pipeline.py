"""`build`: stages in order, skip when unchanged, rerun only what changed, resume render, canvas layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import actatlas as aa
from actatlas.atlas import Atlas, AtlasLevel
from actatlas.pipeline import run_render
from conftest import fast_render, tiny_build

TESTS = Path(__file__).resolve().parent


def _render_cfg(**kw):
    return fast_render(**kw)


def _build(out, **kw):
    return tiny_build(out, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("build") / "run")


def test_build_writes_every_artifact(built):
    out = built.report.run_dir
    s = json.loads((out / "summary.json").read_text())
    assert s["samples"] == 320
    assert [lv["size"] for lv in s["levels"]] == [2, 4]
    for lv in s["levels"]:
        assert lv["cells"] >= 1
        assert lv["samples_used"] <= 320
    assert {"collect", "layout:conv2", "grid:conv2", "render:conv2"} <= set(s["seconds_recorded"])
    for g, png in s["pngs"].items():
        assert Path(png).is_file()
    atlas = Atlas.load(out / "atlas" / "conv2")
    lv = atlas.level(4)
    assert lv.icons.shape[1:] == (24, 24, 3)
    cells = json.loads((out / "atlas" / "conv2" / "level-4.json").read_text())["cells"]
    assert len(cells) == len(lv.i)
    assert all(len(c["top"]) == 5 for c in cells)
    assert all(c["n"] >= 2 for c in cells)
    # per-level cell counts sum to the samples kept at that level
    assert sum(c["n"] for c in cells) == s["levels"][1]["samples_used"]


def test_rebuild_with_same_config_does_no_work(built):
    again = _build(built.report.run_dir)
    assert [r.name for r in again.report.stages if r.ran and r.name != "assemble:conv2"] == []
    np.testing.assert_array_equal(again.level(4).icons, built.level(4).icons)


def test_changing_render_steps_reruns_only_render(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built.report.run_dir, out)
    res = _build(out, render=_render_cfg(steps=12))
    ran = {r.name for r in res.report.stages if r.ran}
    assert ran == {"render:conv2", "assemble:conv2"}


@pytest.mark.parametrize("warm_start,batch", [("none", 2), ("parent", 1)])
def test_interrupted_render_resumes_to_identical_icons(built, tmp_path, monkeypatch, warm_start, batch):
    """Killed at its third committed unit, the render resumes with the units left and gives the icons
    of an uninterrupted render: the recipe loop (a unit = one batch) and the continuous loop with parent
    starts (a unit = 8 batches; the finer level's units start from the committed parents)."""
    import shutil

    import actatlas.render as render_pkg
    from actatlas.pipeline import commit_size

    out = tmp_path / "copy"
    shutil.copytree(built.report.run_dir, out)
    cfg = _render_cfg(steps=10, batch_size=batch, warm_start=warm_start)
    unit = commit_size(cfg)
    assert unit == (batch if warm_start == "none" else 8 * batch)
    real = render_pkg.render_icons
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(render_pkg, "render_icons", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_render(out, "conv2", cfg, progress=False)
    monkeypatch.setattr(render_pkg, "render_icons", real)
    calls_before = calls["n"]
    counter = {"n": 0}

    def counting(*a, **k):
        counter["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(render_pkg, "render_icons", counting)
    res = run_render(out, "conv2", cfg, progress=False)
    rep, icons = res.report, res.icons
    assert rep.ran
    total_units = sum(-(-len(built.level(g).i) // unit) for g in (2, 4))
    assert total_units >= 3, "the test needs at least three units"
    assert counter["n"] == total_units - 2 and calls_before == 3
    # an uninterrupted render with the same config gives the same icons
    out2 = tmp_path / "copy2"
    shutil.copytree(built.report.run_dir, out2)
    icons2 = run_render(out2, "conv2", cfg, progress=False).icons
    for g in (2, 4):
        np.testing.assert_array_equal(icons[g]["images"], icons2[g]["images"])


def test_canvas_orientation_x_right_y_up():
    p = 2
    icons = np.zeros((2, p, p, 3), np.uint8)
    icons[0] = 10
    icons[1] = 200
    lv = AtlasLevel(size=3, i=np.array([0, 2]), j=np.array([0, 2]), count=np.array([5, 5]),
                    top_classes=np.zeros((2, 5), np.int32), top_values=np.zeros((2, 5), np.float32),
                    icons=icons, fidelity=np.zeros(2), member_fidelity=np.zeros(2))
    canvas = lv.canvas()
    assert canvas.shape == (6, 6, 3)
    assert (canvas[4:6, 0:2] == 10).all()      # cell (0, 0): bottom-left
    assert (canvas[0:2, 4:6] == 200).all()     # cell (2, 2): top-right
    assert (canvas[0:2, 0:2] == 255).all()     # empty cell stays white


@pytest.mark.slow  # a real subprocess of the CLI, UMAP
def test_cli_build_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "actatlas.cli", "build", "--model", "tinymodels:tiny_cnn", "--images", "sample:64",
           "--out", str(tmp_path / "r"), "--levels", "2,4", "--min-count", "2", "--steps", "4", "--icon-size", "16",
           "--n-neighbors", "8", "--json", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["samples"] == 64 and Path(s["pngs"]["4"]).is_file()
    bad = subprocess.run(cmd[:-2] + ["--levels", "a,b"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "levels" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------- the API

def test_build_atlas_continues_a_run_from_out_alone(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built.report.run_dir, out)
    again = aa.build_atlas(out=out, runtime=aa.Runtime(progress=False, numba_cache=False))
    assert [r.name for r in again.report.stages if r.ran] == ["assemble:conv2"]   # everything else up to date
    np.testing.assert_array_equal(again.level(4).icons, built.level(4).icons)
    more = aa.build_atlas(out=out, levels=(2, 4, 8), runtime=aa.Runtime(progress=False, numba_cache=False))
    assert [lv.size for lv in more.levels] == [2, 4, 8]
    assert {r.name for r in more.report.stages if r.ran} == {"grid:conv2", "render:conv2", "assemble:conv2"}
    with pytest.raises(aa.ConfigError, match="no run to continue"):
        aa.build_atlas(out=tmp_path / "nothing-here")


def test_build_atlas_takes_a_model_object(tmp_path):
    from tinymodels import tiny_cnn, tiny_module

    spec = tiny_cnn()
    a = tiny_build(tmp_path / "spec", model=spec, levels=(2,))
    assert a.summary["model"] == spec.name and [lv.size for lv in a.levels] == [2]
    b = tiny_build(tmp_path / "module", model=tiny_module(), levels=(2,), images="sample:40")
    assert b.level(2).icons.shape[1:] == (24, 24, 3)


def test_runtime_precedence_collect_config_device_is_kept(tmp_path, monkeypatch):
    """build_atlas without runtime= takes device/engine/threads from the CollectConfig (an old bug let a
    default device argument overwrite them); with runtime= the runtime decides."""
    import actatlas.pipeline as pl

    seen = []
    real = pl.collect_activations

    def recording(spec, src, out, cfg, **kw):
        seen.append(cfg)
        return real(spec, src, out, cfg, **kw)

    monkeypatch.setattr(pl, "collect_activations", recording)
    with pytest.raises(aa.UserError, match="CUDA|cuda"):
        tiny_build(tmp_path / "a", collect=aa.CollectConfig(device="cuda:99"), runtime=None)
    tiny_build(tmp_path / "b", collect=aa.CollectConfig(per_image=2, threads=1), runtime=None, levels=(2,))
    assert seen[-1].threads == 1 and seen[-1].device == "cpu"
    tiny_build(tmp_path / "c", collect=aa.CollectConfig(per_image=2, threads=1), levels=(2,),
               runtime=aa.Runtime(progress=False, threads=2, numba_cache=False))
    assert seen[-1].threads == 2


def test_save_site_and_show_from_the_built_atlas(built, tmp_path):
    index = aa.save_site(built, tmp_path / "site")
    manifest = json.loads((tmp_path / "site" / "manifest.json").read_text())
    assert index == tmp_path / "site" / "index.html" and index.is_file()
    assert [lv["size"] for lv in manifest["layers"][0]["levels"]] == [2, 4]
    single = aa.save_site(built, tmp_path / "one", single_file=True)
    assert single.read_text().count("atlas-bundle") >= 1 and not (tmp_path / "one" / "manifest.json").exists()
    view = aa.show(built)
    assert isinstance(view, aa.AtlasView) and "<iframe" in view._repr_html_()


def test_settings_added_later_keep_older_runs_hashes():
    """A RenderConfig field added after runs were made (redirected_relu, default None = the model's own
    default) must not change the render stage's hash of a run that never set it."""
    from actatlas.stages import settings_record

    d = settings_record(fast_render())
    assert "redirected_relu" not in d and "device" not in d
    assert settings_record(fast_render(redirected_relu=True))["redirected_relu"] is True
