"""Ray engine: same store and icons as the local engine; a model actor that dies mid-collect is
restarted and every row lands exactly once. One Ray session (2 CPUs) for the whole module."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import actatlas as aa
from actatlas.render import RenderConfig
from test_collect import make_folder

pytestmark = pytest.mark.slow  # starts Ray (~7 s) and its workers

TESTS = Path(__file__).resolve().parent

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:  # pragma: no cover - ray is in requirements-test.txt
    pytest.skip("ray is not installed (pip install 'actatlas[ray]'); the Ray engine is not tested",
                allow_module_level=True)

COLLECT = dict(layers=["conv1", "conv2"], per_image=2, batch_size=4, shard_size=5, progress=False)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One local Ray for the module; workers import tests/ and know the crash marker path."""
    base = tmp_path_factory.mktemp("ray")
    marker = base / "crashed"
    if ray.is_initialized():  # pragma: no cover
        ray.shutdown()
    pythonpath = os.pathsep.join([str(TESTS), *sys.path[1:]])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "ACTATLAS_TEST_CRASH_MARKER": str(marker),
                                       "ACTATLAS_TEST_CRASH_AT": "3"}})
    folder = make_folder(base / "imgs", 13)
    yield {"base": base, "marker": marker, "folder": folder}
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(session):
    spec = aa.load_model("tinymodels:tiny_cnn")
    out = session["base"] / "local"
    aa.collect(spec, aa.images(session["folder"]), out, **COLLECT)
    return aa.open_run(out)


def assert_same_store(a, b):
    assert a.summary["rows"] == b.summary["rows"]
    for layer in a.layers:
        np.testing.assert_array_equal(a.activations(layer), b.activations(layer))
        np.testing.assert_array_equal(a.attributions(layer), b.attributions(layer))
        assert a.rows_table(layer).equals(b.rows_table(layer))


def test_ray_collect_equals_local(session, local_run):
    spec = aa.load_model("tinymodels:tiny_cnn")
    out = session["base"] / "ray"
    res = aa.collect(spec, aa.images(session["folder"]), out, engine="ray", **COLLECT)
    assert res.images == 13 and res.rows_per_layer == {"conv1": 26, "conv2": 26}
    run = aa.open_run(out)
    assert_same_store(local_run, run)
    assert run.manifest["stages"]["collect"]["hash"] == local_run.manifest["stages"]["collect"]["hash"]
    assert not (out / "collect" / "shards").exists()


def test_ray_collect_with_shared_locations_equals_local(session):
    """Aligned atlases collect at shared image locations; the Ray engine draws the same ones."""
    spec = aa.load_model("tinymodels:tiny_cnn")
    runs = {}
    for engine in ("local", "ray"):
        out = session["base"] / f"shared-{engine}"
        aa.collect(spec, aa.images(session["folder"]), out, engine=engine, shared_locations=True, **COLLECT)
        runs[engine] = aa.open_run(out)
    assert_same_store(runs["local"], runs["ray"])
    for layer in ("conv1", "conv2"):
        np.testing.assert_array_equal(runs["local"].locations(layer), runs["ray"].locations(layer))
    assert runs["ray"].shared_locations


def test_killed_actor_is_restarted_and_rows_land_once(session, local_run):
    marker = session["marker"]
    assert not marker.exists()
    spec = aa.load_model("crashmodels:crash_once_tiny_cnn")  # crashes only inside a Ray worker
    out = session["base"] / "crash"
    res = aa.collect(spec, aa.images(session["folder"]), out, engine="ray", **COLLECT)
    assert marker.exists(), "the model actor should have killed itself once"
    assert int(marker.read_text()) != os.getpid()
    assert res.rows_per_layer == {"conv1": 26, "conv2": 26}
    run = aa.open_run(out)
    for layer in run.layers:
        image = run.rows(layer).image
        assert sorted(image.tolist()) == [i for i in range(13) for _ in range(2)]  # every row exactly once
    assert_same_store(local_run, run)


def test_ray_render_equals_local(session, local_run):
    from actatlas.layout import LayoutConfig
    from actatlas.pipeline import run_grid, run_layout, run_render

    src = Path(local_run.path)
    base = session["base"] / "render"
    shutil.copytree(src, base / "prep")
    run_layout(base / "prep", "conv2", LayoutConfig(method="pca"), progress=False)
    run_grid(base / "prep", "conv2", [2, 3], min_count=1, progress=False)
    cfg = RenderConfig(steps=6, attempts=2, icon_size=24, batch_size=3, whiten=True, objective="cosine")
    icons = {}
    for engine in ("local", "ray"):
        shutil.copytree(base / "prep", base / engine)
        res = run_render(base / engine, "conv2", cfg, progress=False,
                         runtime=aa.Runtime(engine=engine, threads=1, progress=False, numba_cache=False))
        icons[engine] = res.icons
        assert res.report.ran and res.S is not None
    assert icons["local"].keys() == icons["ray"].keys()
    n = 0
    for g in icons["local"]:
        for k in ("images", "objective", "fidelity"):
            np.testing.assert_array_equal(icons["local"][g][k], icons["ray"][g][k])
        n += len(icons["local"][g]["images"])
    assert n >= 4  # several batches per level went through separate tasks
    batches = sorted(p.name for p in (base / "ray" / "icons" / "conv2").rglob("batch-*.npz"))
    assert len(batches) >= 3


def test_engine_ray_without_ray_is_a_clear_error(monkeypatch, tmp_path):
    """With ray unimportable, --engine ray says how to install it."""
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    spec = aa.load_model("tinymodels:tiny_cnn")
    with pytest.raises(aa.UserError, match=r"actatlas\[ray\]"):
        aa.collect(spec, aa.images(make_folder(tmp_path / "imgs", 2)), tmp_path / "run", engine="ray",
                   progress=False)
    assert not (tmp_path / "run" / "manifest.json").exists()
