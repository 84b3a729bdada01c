"""`build`: stages in order, skip when unchanged, rerun only what changed, resume render, canvas layout."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import actatlas as aa
from actatlas.atlas import Atlas, AtlasLevel
from actatlas.collect import CollectConfig
from actatlas.layout import LayoutConfig
from actatlas.pipeline import build, run_render
from actatlas.render import RenderConfig

TESTS = Path(__file__).resolve().parent

FAST_RENDER = dict(steps=8, attempts=1, icon_size=24, batch_size=8, transforms="recipe")


def _render_cfg(**kw):
    return dataclasses.replace(RenderConfig.cpu_default(), **{**FAST_RENDER, **kw})


def _build(out, **kw):
    args = dict(model="tinymodels:tiny_cnn", images="sample:160", out=out, levels=(2, 4), min_count=2,
                collect_cfg=CollectConfig(per_image=2, batch_size=32),
                layout_cfg=LayoutConfig(method="umap", n_neighbors=10, seed=0),
                render_cfg=_render_cfg(), progress=False)
    args.update(kw)
    return build(**args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "run"
    return _build(out)


def test_build_writes_every_artifact(built):
    out = built.run_dir
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
    again = _build(built.run_dir)
    assert [r.name for r in again.stages if r.ran and r.name != "assemble"] == []
    np.testing.assert_array_equal(again.atlas.level(4).icons, built.atlas.level(4).icons)


def test_changing_render_steps_reruns_only_render(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built.run_dir, out)
    res = _build(out, render_cfg=_render_cfg(steps=12))
    ran = {r.name for r in res.stages if r.ran}
    assert ran == {"render:conv2", "assemble"}


def test_interrupted_render_resumes_to_identical_icons(built, tmp_path, monkeypatch):
    import shutil

    import actatlas.render as render_pkg

    out = tmp_path / "copy"
    shutil.copytree(built.run_dir, out)
    cfg = _render_cfg(steps=10, batch_size=2)
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
    rep, icons, _ = run_render(out, "conv2", cfg, progress=False)
    assert rep.ran
    total_batches = sum(-(-len(built.atlas.level(g).i) // 2) for g in (2, 4))
    assert counter["n"] == total_batches - 2 and calls_before == 3
    # an uninterrupted render with the same config gives the same icons
    out2 = tmp_path / "copy2"
    shutil.copytree(built.run_dir, out2)
    _, icons2, _ = run_render(out2, "conv2", cfg, progress=False)
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
