"""Aligned atlases of several layers (issue 13, "Layers of one model"): shared image locations, the aligned
layout (umap-learn's AlignedUMAP; Procrustes-aligned PCA), the multi-layer build and its
resume, the alignment measure, the bad inputs, the export's links and the viewer's layer slider."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import actatlas as aa
from actatlas.alignment import cell_top_classes, displacement, pair_measure, top_class_kept
from actatlas.collect_batch import (CollectConfig, check_shared_layers, locations_to_positions, position_warnings,
                                    shared_locations)
from actatlas.export.site import cell_links
from actatlas.layout import AlignConfig, LayoutConfig, compute_aligned_layouts, procrustes
from conftest import needs_browser, serving, tiny_build

LAYERS = ["conv1", "conv2", "relu2"]        # 8 x 32 x 32, 16 x 16 x 16, 16 x 16 x 16 in the tiny CNN


# ---------------------------------------------------------------------------------------------- locations

def test_shared_locations_map_to_the_same_place_at_every_resolution():
    cfg = CollectConfig(per_image=5, border=1, shared_locations=True)
    for image in range(50):
        loc = shared_locations(7, 7, image, cfg)           # the coarsest map: 7 x 7 (EfficientNet blocks.15)
        assert loc.shape == (5, 2) and (loc >= 1 / 7).all() and (loc < 6 / 7).all()
        coarse = locations_to_positions(loc, 7, 7)
        assert len({tuple(p) for p in coarse}) == 5       # distinct cells of the coarsest map
        assert (coarse >= 1).all() and (coarse <= 5).all()  # border 1 on the coarsest map
        for h in (14, 28, 56):                             # blocks.8 / blocks.4 and finer: inside the coarse cell
            fine = locations_to_positions(loc, h, h)
            r = h // 7
            np.testing.assert_array_equal(fine // r, coarse)
            assert (fine >= r).all() and (fine <= h - r - 1).all()   # every layer's position is interior
    # the rule: y = floor(u * h), x = floor(v * w), clipped
    np.testing.assert_array_equal(locations_to_positions(np.array([[0.5, 0.25], [0.999, 0.0], [1.0, -0.1]]), 7, 14),
                                  [[3, 3], [6, 0], [6, 0]])


def test_shared_locations_depend_on_image_and_seed_only():
    cfg = CollectConfig(per_image=3, shared_locations=True)
    a = shared_locations(16, 16, 4, cfg)
    np.testing.assert_array_equal(a, shared_locations(16, 16, 4, cfg))
    assert not np.array_equal(a, shared_locations(16, 16, 5, cfg))
    assert not np.array_equal(a, shared_locations(16, 16, 4, dataclasses.replace(cfg, seed=1)))
    np.testing.assert_array_equal(shared_locations(16, 16, 4, dataclasses.replace(cfg, positions="center")),
                                  [[0.5, 0.5]])
    # more positions than the coarsest map's interior: capped and warned about once, on that map
    msgs = position_warnings({"a": (8, 4, 4), "b": (8, 16, 16)}, dataclasses.replace(cfg, per_image=9))
    assert len(msgs) == 1 and "coarsest map" in msgs[0] and "4 distinct positions" in msgs[0]


def test_shared_locations_refuse_what_cannot_share_a_place():
    with pytest.raises(aa.ConfigError, match="positions 'all'"):
        CollectConfig(positions="all", shared_locations=True).validate()
    with pytest.raises(aa.ConfigError, match="logits has no spatial output"):
        check_shared_layers({"conv2": (16, 16, 16), "logits": (10,)})
    with pytest.raises(aa.ConfigError, match="pool is global-pooled"):
        check_shared_layers({"conv2": (16, 16, 16), "pool": (16, 1, 1)})


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "run"
    spec = aa.load_model("tinymodels:tiny_cnn")
    aa.collect(spec, aa.images("sample:24"), out, layers=LAYERS, per_image=3, shared_locations=True,
               shard_size=10, batch_size=8, progress=False)
    return aa.open_run(out)


def test_collect_with_shared_locations_stores_them_and_rows_correspond(shared_run):
    run = shared_run
    assert run.shared_locations and run.config["shared_locations"] is True
    loc = np.asarray(run.locations("conv1"))
    assert loc.shape == (72, 2) and loc.dtype == np.float32
    for ly in LAYERS[1:]:
        np.testing.assert_array_equal(run.locations(ly), loc)
        np.testing.assert_array_equal(run.rows(ly).image, run.rows("conv1").image)
    for ly, h in (("conv1", 32), ("conv2", 16)):
        rows = run.rows(ly)
        pos = locations_to_positions(loc, h, h)
        np.testing.assert_array_equal(rows.y, pos[:, 0])
        np.testing.assert_array_equal(rows.x, pos[:, 1])
    # the stored vector is the layer's output at that position
    spec = aa.load_model("tinymodels:tiny_cnn")
    import torch

    from actatlas.hooks import capture

    path = run.rows("conv1").path[0]
    x = spec.preprocess.normalize(torch.as_tensor(np.array(spec.preprocess.geometry(aa.data.load_rgb(path))))
                                  .permute(2, 0, 1)[None])
    with torch.no_grad(), capture(spec.module, ["conv1"]) as got:
        spec.module(x)
    r = run.rows("conv1")
    np.testing.assert_allclose(run.activations("conv1")[0], got["conv1"][0, :, r.y[0], r.x[0]].numpy(), atol=1e-5)


def test_shared_locations_resume_gives_the_same_rows(shared_run, tmp_path, monkeypatch):
    import sys

    collect_mod = sys.modules["actatlas.collect"]     # (aa.collect is the function)
    spec = aa.load_model("tinymodels:tiny_cnn")
    out = tmp_path / "run"
    real, calls = collect_mod.ShardWriter.commit, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(collect_mod.ShardWriter, "commit", flaky)
    kw = dict(layers=LAYERS, per_image=3, shared_locations=True, shard_size=10, batch_size=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        aa.collect(spec, aa.images("sample:24"), out, **kw)
    monkeypatch.setattr(collect_mod.ShardWriter, "commit", real)
    res = aa.collect(spec, aa.images("sample:24"), out, **kw)
    assert res.resumed_shards == 1
    run = aa.open_run(out)
    for ly in LAYERS:
        np.testing.assert_array_equal(run.locations(ly), shared_run.locations(ly))
        np.testing.assert_array_equal(run.activations(ly), shared_run.activations(ly))


# ---------------------------------------------------------------------------------------------- the measure

def test_procrustes_undoes_a_rotation_and_a_reflection():
    rng = np.random.default_rng(0)
    a = rng.random((500, 2))
    t = np.radians(37)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    for m in (rot, rot @ np.diag([1, -1])):                  # a rotation, and a rotation with a mirror
        b = (a - 0.5) @ m + 0.5 + 0.02
        assert displacement(a, b) > 0.1
        assert displacement(a, procrustes(a, b)) < 1e-12
    noisy = a + rng.normal(scale=0.01, size=a.shape)
    assert displacement(a, procrustes(a, noisy)) == pytest.approx(displacement(a, noisy), rel=0.05)


def test_pair_measure_on_constructed_layouts():
    rng = np.random.default_rng(1)
    n, classes = 4000, 6
    a = rng.random((n, 2))
    quadrant = (a[:, 0] > 0.5).astype(int) * 2 + (a[:, 1] > 0.5)
    att_a = np.eye(classes)[quadrant] + 0.01 * rng.random((n, classes))
    att_b = att_a.copy()
    att_b[quadrant == 3] = np.eye(classes)[5] + 0.01        # one quadrant changes its class in layer B
    mirrored = np.stack([1 - a[:, 0], a[:, 1]], axis=1)      # an independent layout: B is A mirrored
    m = pair_measure((a, a + 0.01), (a, mirrored), (att_a, att_b), size=2, min_count=5)
    d = m["displacement"]
    assert d["aligned"] == pytest.approx(0.01 * np.sqrt(2))
    assert d["independent_after_procrustes"] < 1e-9 < 0.3 < d["independent_as_is"]
    assert 0.4 < d["chance"] < 0.6                            # unrelated places in a unit square: ~0.52
    kept = m["top_class_kept"]
    assert kept["aligned"] == {"cells": 4, "same": 3, "share": 0.75}
    assert kept["independent_after_procrustes"]["share"] == 0.75
    top = cell_top_classes(a, att_a, 2, min_count=n)         # no cell holds n samples
    assert (top == -1).all()
    assert top_class_kept(np.array([1, 2, -1]), np.array([1, 3, 4])) == {"cells": 2, "same": 1, "share": 0.5}


def test_aligned_pca_removes_rotation_between_layers():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(300, 6)) * np.array([5, 3, 1, 0.5, 0.2, 0.1])
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    lays = compute_aligned_layouts([base, base @ q, -base], LayoutConfig(method="pca"), progress=False)
    assert [la.coords.shape for la in lays] == [(300, 2)] * 3
    for la in lays[1:]:
        assert displacement(lays[0].coords, la.coords) < 1e-5      # the same map, placed the same way
    joint = np.concatenate([la.coords for la in lays])
    assert joint.min() >= 0 and joint.max() <= 1 and lays[0].params["normalization"] == "joint"
    with pytest.raises(aa.ConfigError, match="two or more layers"):
        compute_aligned_layouts([base], LayoutConfig(method="pca"))
    with pytest.raises(aa.ConfigError, match="no aligned form"):
        compute_aligned_layouts([base, base], LayoutConfig(method="tsne"))
    with pytest.raises(aa.ConfigError, match="fit_max"):
        compute_aligned_layouts([base, base], LayoutConfig(fit_max=100))
    with pytest.raises(aa.ConfigError, match="same samples"):
        compute_aligned_layouts([base, base[:10]], LayoutConfig(method="pca"))
    with pytest.raises(aa.ConfigError, match="window"):
        AlignConfig(window=0)


@pytest.mark.slow  # UMAP, and umap-learn's AlignedUMAP compiling its own numba code (~1 min)
def test_aligned_umap_keeps_samples_in_place_across_layers():
    """Three layers of the same samples, the second a noisy copy of the first and the third a rotated
    one: the aligned layouts keep each sample near its place from layer to layer (far nearer than
    independent layouts after Procrustes), and a seeded run repeats exactly."""
    rng = np.random.default_rng(0)
    n = 300
    centres = rng.normal(size=(6, 16)) * 4
    base = np.abs(centres[rng.integers(0, 6, n)] + rng.normal(size=(n, 16))).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    xs = [base, base + 0.3 * np.abs(rng.normal(size=(n, 16))).astype(np.float32), (base @ q).astype(np.float32)]
    cfg = LayoutConfig(n_neighbors=15, min_dist=0.05, metric="euclidean", seed=3)
    ours = compute_aligned_layouts(xs, cfg, AlignConfig(regularisation=0.02, window=2), progress=False)
    assert [la.coords.shape for la in ours] == [(n, 2)] * 3
    shift = [float(np.linalg.norm(ours[i + 1].coords - ours[i].coords, axis=1).mean()) for i in range(2)]
    assert max(shift) < 0.1, shift
    again = compute_aligned_layouts(xs, cfg, AlignConfig(regularisation=0.02, window=2), progress=False)
    for a, b in zip(ours, again):
        np.testing.assert_array_equal(a.coords, b.coords)
    assert ours[0].method == "umap" and ours[0].params["alignment_window_size"] == 2


# ---------------------------------------------------------------------------------------------- the build

def _aligned(out, **kw):
    return tiny_build(out, images="sample:60", layers=LAYERS, align=True, levels=(2, 4), **kw)


@pytest.fixture(scope="module")
def aligned_build(tmp_path_factory):
    return _aligned(tmp_path_factory.mktemp("aligned") / "run")


def test_aligned_build_lays_the_layers_out_jointly(aligned_build):
    res = aligned_build
    out = res.run_dir
    assert isinstance(res, aa.AtlasSet) and res.aligned and res.layers == LAYERS
    assert [len(a.levels) for a in res] == [2, 2, 2] and res["conv2"].layer == "conv2"
    run = aa.open_run(out)
    assert run.shared_locations
    stages = run.manifest["stages"]
    assert stages["layout-aligned"]["config"]["layers"] == LAYERS
    for ly in LAYERS:   # grids on the aligned layout; the layer's own layout computed too (the baseline)
        assert stages[f"grid:{ly}"]["config"]["layout"] == stages["layout-aligned"]["hash"]
        assert (out / "layout-aligned" / f"{ly}.npy").is_file() and (out / "layout" / f"{ly}.npy").is_file()
        assert (out / "atlas" / ly / "atlas.json").is_file()
    s = json.loads((out / "summary.json").read_text())
    assert s["layers"] == LAYERS and s["aligned"] and s["samples"] == 120 and set(s["atlases"]) == set(LAYERS)
    al = s["alignment"]
    assert [(p["from"], p["to"]) for p in al["pairs"]] == [("conv1", "conv2"), ("conv2", "relu2")]
    for p in al["pairs"]:
        d = p["displacement"]
        assert set(d) == {"aligned", "aligned_after_procrustes", "chance", "independent_after_procrustes",
                          "independent_as_is"}
        assert 0 <= d["aligned"] < d["chance"]
        assert p["top_class_kept"]["level"] == 2 and p["top_class_kept"]["aligned"]["cells"] >= 1
    assert set(al["mean"]["displacement"]) == set(al["pairs"][0]["displacement"])
    # the numbers are those of the stored layouts
    c = {ly: np.load(out / "layout-aligned" / f"{ly}.npy") for ly in LAYERS}
    assert al["pairs"][0]["displacement"]["aligned"] == pytest.approx(displacement(c["conv1"], c["conv2"]))


def test_aligned_build_rerun_does_no_work_and_continues_from_out(aligned_build, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(aligned_build.run_dir, out)
    again = aa.build_atlas(out=out, runtime=aa.Runtime(progress=False, numba_cache=False))
    assert isinstance(again, aa.AtlasSet) and again.aligned and again.layers == LAYERS
    assert [r.name for r in again.report.stages if r.ran] == [f"assemble:{ly}" for ly in LAYERS]
    for a, b in zip(again, aligned_build):
        np.testing.assert_array_equal(a.level(4).icons, b.level(4).icons)


@pytest.mark.parametrize("where", ["layout", "render"])
def test_killed_aligned_build_finishes_on_rerun_with_identical_results(aligned_build, tmp_path, monkeypatch, where):
    import actatlas.layout as layout_mod
    import actatlas.render as render_pkg

    out = tmp_path / "run"
    if where == "layout":      # killed inside the joint layout
        real = layout_mod._aligned_pca

        def kill(*a, **k):
            raise KeyboardInterrupt("simulated kill")

        monkeypatch.setattr(layout_mod, "_aligned_pca", kill)
    else:                      # killed while rendering the second layer's icons
        real, calls = render_pkg.render_icons, {"n": 0}
        first = sum(-(-len(lv.i) // 8) for lv in aligned_build[0].levels)

        def kill(*a, **k):
            calls["n"] += 1
            if calls["n"] == first + 1:
                raise KeyboardInterrupt("simulated kill")
            return real(*a, **k)

        monkeypatch.setattr(render_pkg, "render_icons", kill)
    with pytest.raises(KeyboardInterrupt):
        _aligned(out)
    monkeypatch.setattr(layout_mod if where == "layout" else render_pkg,
                        "_aligned_pca" if where == "layout" else "render_icons", real)
    status = aa.open_run(out).manifest["stages"]
    assert status["layout-aligned" if where == "layout" else "render:conv2"]["status"] == "failed"
    done = _aligned(out)
    for a, b in zip(done, aligned_build):
        for la, lb in zip(a.levels, b.levels):
            np.testing.assert_array_equal(la.icons, lb.icons)
            np.testing.assert_array_equal(la.i, lb.i)
    for ly in LAYERS:
        np.testing.assert_array_equal(np.load(out / "layout-aligned" / f"{ly}.npy"),
                                      np.load(aligned_build.run_dir / "layout-aligned" / f"{ly}.npy"))
    s = json.loads((out / "summary.json").read_text())
    ref = json.loads((aligned_build.run_dir / "summary.json").read_text())
    assert s["alignment"]["pairs"] == ref["alignment"]["pairs"]


def test_several_layers_without_align_keep_their_own_layouts(tmp_path):
    res = tiny_build(tmp_path / "run", images="sample:40", layers=["conv1", "conv2"], levels=(2,))
    assert isinstance(res, aa.AtlasSet) and not res.aligned and "alignment" not in res.summary
    stages = aa.open_run(tmp_path / "run").manifest["stages"]
    assert "layout-aligned" not in stages
    assert stages["grid:conv2"]["config"]["layout"] == stages["layout:conv2"]["hash"]
    assert not aa.open_run(tmp_path / "run").shared_locations


# ---------------------------------------------------------------------------------------------- bad input

def test_align_with_one_layer_or_a_layer_without_a_map_is_refused_before_any_work(tmp_path):
    with pytest.raises(aa.ConfigError, match="two or more layers"):
        tiny_build(tmp_path / "one", layers=["conv2"], align=True)
    with pytest.raises(aa.ConfigError, match="two or more layers"):
        tiny_build(tmp_path / "default", align=True)
    with pytest.raises(aa.ConfigError, match="logits has no spatial output"):
        tiny_build(tmp_path / "flat", layers=["conv2", "logits"], align=True)
    assert not (tmp_path / "one").exists() and not (tmp_path / "flat").exists()


def test_aligning_a_run_without_shared_locations_says_what_to_rerun(tmp_path):
    from actatlas.pipeline import run_aligned_layout

    tiny_build(tmp_path / "run", images="sample:40", layers=["conv1", "conv2"], levels=(2,))
    for call in (lambda: run_aligned_layout(tmp_path / "run", ["conv1", "conv2"], LayoutConfig(method="pca")),
                 lambda: tiny_build(tmp_path / "run", images="sample:40", layers=["conv1", "conv2"], levels=(2,),
                                    align=True)):
        with pytest.raises(aa.RunStateError, match="without shared locations.*collect conv1, conv2 again with "
                                                   "shared_locations into a new run directory"):
            call()


def test_cli_bad_aligned_input_is_one_line_exit_2(tmp_path, capsys, shared_run):
    from actatlas.cli import main

    base = ["build", "--model", "tinymodels:tiny_cnn", "--images", "sample:8", "--levels", "2", "--method", "pca",
            "-q"]
    cases = [(["--layers", "conv2", "--align"], "--align lays out two or more layers"),
             (["--layers", "conv1,logits", "--align"], "logits has no spatial output"),
             (["--layers", "conv1,nope", "--align"], "unknown layer 'nope'"),
             (["--layer", "conv1", "--layers", "conv1,conv2"], "--layer or --layers")]
    for k, (extra, msg) in enumerate(cases):
        assert main(base + ["--out", str(tmp_path / f"r{k}")] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("actatlas: error: ") and msg in err, err
    plain = tmp_path / "plain"
    aa.collect(aa.load_model("tinymodels:tiny_cnn"), aa.images("sample:8"), plain, layers=["conv1", "conv2"],
               progress=False)
    assert main(["layout", str(plain), "--layers", "conv1,conv2", "--align", "--method", "pca", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--shared-locations" in err and "collect conv1, conv2 again" in err
    assert main(["layout", str(shared_run.path), "--layers", "conv1,conv2", "--align", "--method", "pca", "-q"]) == 0


# ---------------------------------------------------------------------------------------------- export

def test_cell_links_lists_where_each_cells_samples_go():
    src = np.array([0, 0, 0, 1, 1, -1, 2])
    dst = np.array([1, 1, 0, 0, -1, 0, 2])
    lk = cell_links(src, dst, 3, 3)
    assert lk == {"o": [0, 2, 3, 4], "c": [1, 0, 0, 2], "n": [2, 1, 1, 1]}
    assert cell_links(src, dst, 3, 3, cap=1) == {"o": [0, 1, 2, 3], "c": [1, 0, 2], "n": [2, 1, 1]}


@pytest.fixture(scope="module")
def aligned_site(aligned_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned-site") / "site"
    aa.save_site(aligned_build, out)
    return out


def test_export_of_aligned_layers_links_neighbouring_cells(aligned_build, aligned_site):
    man = json.loads((aligned_site / "manifest.json").read_text())
    assert man["aligned"] is True and man["aligned_layers"] == LAYERS
    assert [ly["name"] for ly in man["layers"]] == LAYERS
    run = aa.open_run(aligned_build.run_dir)
    from actatlas.grid import load_grid

    for a, b in zip(LAYERS, LAYERS[1:]):
        da = json.loads((aligned_site / "data" / a / "level-4.json").read_text())
        db = json.loads((aligned_site / "data" / b / "level-4.json").read_text())
        nxt, prv = da["links"]["next"], db["links"]["prev"]
        assert nxt["layer"] == b and prv["layer"] == a and "prev" not in json.loads(
            (aligned_site / "data" / LAYERS[0] / "level-4.json").read_text())["links"]
        ga, gb = (next(g for g in load_grid(run.path / "grid", ly) if g.size == 4) for ly in (a, b))
        # every sample of cell c of A that sits in a kept cell of B is counted once
        for c in range(len(da["i"])):
            q = ga.cell_at(da["i"][c], da["j"][c])
            rows = ga.member_rows[ga.member_offsets[q]:ga.member_offsets[q + 1]]
            in_b = gb.cell_of_row[rows]
            got = dict(zip(nxt["c"][nxt["o"][c]:nxt["o"][c + 1]], nxt["n"][nxt["o"][c]:nxt["o"][c + 1]]))
            want = {}
            for t in in_b[in_b >= 0]:
                cb = next(k for k in range(len(db["i"])) if (db["i"][k], db["j"][k]) == (gb.i[t], gb.j[t]))
                want[cb] = want.get(cb, 0) + 1
            assert got == want
        assert sum(nxt["n"]) == sum(prv["n"])


def test_export_without_alignment_has_no_links(tmp_path):
    res = tiny_build(tmp_path / "run", images="sample:40", layers=["conv1", "conv2"], levels=(2,))
    aa.save_site(res, tmp_path / "site")
    man = json.loads((tmp_path / "site" / "manifest.json").read_text())
    assert "aligned" not in man and len(man["layers"]) == 2
    assert "links" not in json.loads((tmp_path / "site" / "data" / "conv1" / "level-2.json").read_text())


# ---------------------------------------------------------------------------------------------- viewer

@pytest.fixture(scope="module")
def aligned_served(aligned_site):
    with serving(aligned_site) as url:
        yield url


@needs_browser
def test_viewer_layer_slider_keeps_the_view_and_the_hash_keeps_the_layer(browser, aligned_served):
    from test_viewer import Page

    p = Page(browser, aligned_served + "#level=4&x=0.4&y=0.6&z=1.5")
    try:
        slider = p.page.locator("#layerslider")
        assert slider.is_visible() and slider.get_attribute("max") == "2"
        st = p.stats()
        assert st["layer"] == "conv1" and st["aligned"] and st["level"] == 4
        view = p.page.evaluate("atlasViewer.view")
        slider.fill("2")                                           # a range input: fill sets its value
        p.page.wait_for_function("atlasViewer.stats.layer === 'relu2' && atlasViewer.stats.drawn > 0")
        assert p.page.evaluate("atlasViewer.view") == view          # the view stays put, the icons change
        assert p.page.inner_text("#layerpos") == "3/3 aligned"
        p.page.wait_for_function("location.hash.includes('layer=relu2')")
        p.page.locator("#atlas").focus()                            # (keys typed into the slider move it natively)
        p.page.keyboard.press("[")
        p.page.wait_for_function("atlasViewer.stats.layer === 'conv2'")
        assert p.page.evaluate("document.getElementById('layerslider').value") == "1"
        p.page.wait_for_function("location.hash.includes('layer=conv2')")
        url = p.page.url
    finally:
        p.close()
    q = Page(browser, url)                                          # the hash opens the same layer
    try:
        assert q.stats()["layer"] == "conv2"
        assert q.page.evaluate("document.getElementById('layerslider').value") == "1"
        assert not q.errors
    finally:
        q.close()


@needs_browser
def test_viewer_hover_highlights_where_the_cells_samples_lie_in_the_neighbouring_layers(browser, aligned_served,
                                                                                        aligned_site):
    from test_viewer import Page

    p = Page(browser, aligned_served + "#layer=conv2&level=4&x=0.5&y=0.5&z=1")
    try:
        p.settle()
        d = json.loads((aligned_site / "data" / "conv2" / "level-4.json").read_text())
        c = int(np.argmax(d["n"]))
        before = p.canvas_pixels()
        pt = p.page.evaluate(f"atlasViewer.cellCenter({d['i'][c]}, {d['j'][c]})")
        p.page.mouse.move(pt["x"], pt["y"])
        p.page.wait_for_function("atlasViewer.stats.links && atlasViewer.stats.links.prev.ready "
                                 "&& atlasViewer.stats.links.next.ready")
        links = p.stats()["links"]
        for side, other in (("prev", "conv1"), ("next", "relu2")):
            lk = d["links"][side]
            assert links[side]["layer"] == other
            assert links[side]["cells"] == lk["o"][c + 1] - lk["o"][c] >= 1
            assert links[side]["samples"] == sum(lk["n"][lk["o"][c]:lk["o"][c + 1]])
            assert 0 <= links[side]["same"] <= links[side]["samples"] <= d["n"][c]
        tip = p.page.inner_text("#tooltip")
        assert "in conv1 (previous)" in tip and "in relu2 (next)" in tip and "% in this place" in tip
        p.page.wait_for_timeout(200)
        assert (p.canvas_pixels() != before).any()                   # the highlights are drawn
        p.page.mouse.move(2, 2)
        p.page.wait_for_function("atlasViewer.stats.links === null")
        assert not p.errors
    finally:
        p.close()
