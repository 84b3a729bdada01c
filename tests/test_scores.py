"""Honest icon scores (actatlas.scores, the pipeline's scores stage): retrieval ranks, class agreement
through collect's own attribution, vividness, the random-member baseline, where the numbers land
(level-G.json, summary.json, the export and the viewer) and old atlases without them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import actatlas as aa
from actatlas.atlas import Atlas, open_atlas
from actatlas.export import export_site
from actatlas.grid import load_grid
from actatlas.models import load_model
from actatlas.pipeline import run_render, run_scores
from actatlas.render import centre_activations
from actatlas.scores import (SCORE_KEYS, ScoreConfig, activation_scores, border_fill, centre_scores_inputs,
                             class_agreement, colourfulness, contrast, cut_patch, leave_one_out_means,
                             retrieval_ranks, score_level, top_classes_of, vividness)

from conftest import fast_render, needs_browser


# ------------------------------------------------------------------ pure functions
def test_retrieval_rank_of_a_constructed_case():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(12, 6))
    own = np.arange(12)
    assert (retrieval_ranks(means, own, means) == 1).all()             # activation = own mean: rank 1
    assert (retrieval_ranks(3.0 * means, own, means) == 1).all()       # cosine: scale does not matter
    perm = np.roll(own, 1)                                             # a shuffled assignment
    shuffled = retrieval_ranks(means[perm], own, means)
    assert (shuffled > 1).all() and shuffled.max() <= 12
    # whitened: an activation equal to its whitened target ranks 1 there
    A = rng.normal(size=(6, 6))
    S = A @ A.T + 6 * np.eye(6)
    s = activation_scores(means @ S, None, own, means, S, np.zeros((12, 0), np.int64))
    assert (s["retrieval_rank_whitened"] == 1).all()
    np.testing.assert_allclose(s["objective_alignment"], 1.0)
    assert np.isnan(s["class_agreement"]).all()                         # no attributions: not computed
    no_s = activation_scores(means, None, own, means, None, np.zeros((12, 0), np.int64))
    assert (no_s["retrieval_rank_whitened"] == -1).all()


def test_leave_one_out_rank_does_not_count_the_member_in_its_own_mean():
    a, b = np.array([1.0, 0.0]), np.array([1.0, 2.0])
    means = np.stack([(a + b) / 2, [1.0, 1.2]])                        # cell 0 = {a, b}; cell 1 elsewhere
    counts = np.array([2, 9])
    assert retrieval_ranks(a[None], [0], means)[0] == 1                # a is half of its own cell's mean
    loo = leave_one_out_means(means, counts, np.stack([a, means[1]]))
    np.testing.assert_allclose(loo[0], b)
    assert retrieval_ranks(a[None], [0], means, own_targets=loo[:1])[0] == 2
    assert (leave_one_out_means(means, np.array([1, 1]), means) == means).all()   # a cell of one keeps its mean


def test_class_agreement_and_top_classes():
    attr = np.array([[5, 4, 3, 2, 1, 0, -1], [0, 1, 2, 3, 4, 5, 6]], np.float32)
    top = top_classes_of(attr)
    assert top.tolist() == [[0, 1, 2, 3, 4], [6, 5, 4, 3, 2]]
    cell = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 5, -1]])
    np.testing.assert_allclose(class_agreement(top, cell), [1.0, 0.5])
    assert np.isnan(class_agreement(top, np.full((2, 3), -1)))[0]


def test_vividness_of_grey_saturated_and_framed_images():
    grey = np.full((2, 20, 20, 3), 128, np.uint8)
    assert np.allclose(colourfulness(grey), 0) and np.allclose(contrast(grey), 0)
    sat = np.zeros((1, 20, 20, 3), np.uint8)
    sat[:, :, :10, 0] = 255                                            # half pure red, half pure blue
    sat[:, :, 10:, 2] = 255
    assert colourfulness(sat)[0] > 200 and contrast(sat)[0] > 10
    # Hasler & Suesstrunk by hand for a two-colour image
    rg = np.r_[np.full(200, 255.0), np.zeros(200)]
    yb = np.r_[np.full(200, 127.5), np.full(200, -255.0)]
    want = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    np.testing.assert_allclose(colourfulness(sat)[0], want)
    # border fill: a vivid icon inside a flat grey 10% frame is ~0; filled to the edge is 1
    framed = np.full((1, 40, 40, 3), 128, np.uint8)
    framed[:, 4:36, 4:36] = sat[0, 0, 0]
    assert border_fill(framed)[0] == pytest.approx(0.0)
    assert border_fill(sat)[0] == pytest.approx(1.0)
    noisy = framed.copy()
    noisy[:, :4] = 128 + np.random.default_rng(0).integers(-5, 6, size=(1, 4, 40, 3))  # faint noise is still grey
    assert border_fill(noisy)[0] == pytest.approx(0.0)
    v = vividness(np.concatenate([framed, np.tile(sat, (1, 2, 2, 1))]))
    assert set(v) == {"colourfulness", "contrast", "border_fill"} and v["border_fill"].tolist() == [0.0, 1.0]


def test_member_baseline_is_the_same_function_as_the_icon_score():
    """score_level gives the icon and member columns from the same functions: equal inputs, equal scores."""
    rng = np.random.default_rng(1)
    m, c = 7, 5
    means = rng.normal(size=(m, c))
    acts = means + 0.3 * rng.normal(size=(m, c))
    attr = rng.normal(size=(m, 10))
    images = rng.integers(0, 256, size=(m, 8, 8, 3), dtype=np.uint8)
    cell_top = top_classes_of(rng.normal(size=(m, 10)))
    S = np.eye(c) * 2.0
    patches = [np.array([10 + k, 50 + k]) for k in range(m)]
    v = vividness(images)
    pv = np.stack([np.stack([v["colourfulness"], v["contrast"], v["border_fill"]], 1)[k] for k in range(m)
                   for _ in range(2)])                                # both patches of cell k = icon k
    s = score_level(means=means, cell_top=cell_top, S=S, icon_acts=acts, icon_top=top_classes_of(attr), icons=images,
                    member=np.arange(m), member_acts=acts, member_top=top_classes_of(attr), patches=patches,
                    patch_values=pv, cfg=ScoreConfig())
    assert set(s) == set(SCORE_KEYS)
    for key in ("retrieval_rank_raw", "retrieval_rank_whitened", "class_agreement", "colourfulness", "contrast",
                "border_fill"):
        np.testing.assert_array_equal(s[key], s[f"member_{key}"])
        if key in ("colourfulness", "contrast", "border_fill"):
            np.testing.assert_allclose(s[key], s[f"patch_{key}"])
    assert (s["patch_count"] == 2).all()


# ------------------------------------------------------------------ the attribution identity
@pytest.fixture(scope="module")
def tiny_spec():
    return load_model("tinymodels:tiny_cnn")


def test_icon_attribution_is_collects_attribution(tiny_spec, tmp_path):
    """For a collected row (centre position), the scores' attribution of the row's image equals the
    attribution collect stored for it, and its activation the stored activation."""
    src = aa.images("sample:6")
    aa.collect(tiny_spec, src, tmp_path / "run", aa.CollectConfig(positions="center", batch_size=4), progress=False)
    run = aa.open_run(tmp_path / "run")
    imgs = np.stack([tiny_spec.preprocess.to_uint8(src.load(src[i], min_side=tiny_spec.preprocess.decode_side))
                     .transpose(1, 2, 0) for i in range(len(src))])
    order = np.argsort(run.rows("conv2").image)
    acts, attr = centre_scores_inputs(tiny_spec, "conv2", imgs, batch_size=4)
    np.testing.assert_allclose(acts, np.asarray(run.activations("conv2"))[order], rtol=1e-5, atol=1e-6)
    stored = np.asarray(run.attributions("conv2"), np.float32)[order]
    np.testing.assert_allclose(attr, stored, rtol=2e-3, atol=1e-6)
    assert (top_classes_of(attr) == top_classes_of(stored)).all()


def test_icon_centre_activation_and_attribution_at_icon_size(tiny_spec):
    """An icon at its stored size: the activation is the render's centre activation, and for the tiny
    CNN (conv2 -> relu -> spatial mean -> fc) the attribution is exactly fc.W h / (h' w')."""
    icons = np.random.default_rng(0).integers(0, 256, size=(5, 24, 24, 3), dtype=np.uint8)
    acts, attr = centre_scores_inputs(tiny_spec, "mid", icons, batch_size=2)
    x = torch.from_numpy(icons).permute(0, 3, 1, 2).float() / 255.0
    np.testing.assert_allclose(acts, centre_activations(tiny_spec, "mid", x).numpy(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        h = torch.relu(tiny_spec.module.conv2(tiny_spec.module.relu1(tiny_spec.module.conv1(
            tiny_spec.preprocess.normalize(torch.from_numpy(icons).permute(0, 3, 1, 2))))))
        centre = h[:, :, h.shape[2] // 2, h.shape[3] // 2]
        want = centre @ tiny_spec.module.fc.weight.T / (h.shape[2] * h.shape[3])
    np.testing.assert_allclose(attr, want.numpy(), rtol=2e-3, atol=1e-5)


# ------------------------------------------------------------------ the stage and where the numbers land
def test_scores_land_in_level_json_and_summary(tiny_run):
    run_dir = tiny_run.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    adir = run_dir / "atlas" / "conv2"
    for lv, entry in zip(tiny_run.levels, summary["levels"]):
        cells = json.loads((adir / f"level-{lv.size}.json").read_text())["cells"]
        m = len(cells)
        assert set(SCORE_KEYS) <= set(cells[0])
        for c in cells:
            assert 1 <= c["retrieval_rank_raw"] <= m and 1 <= c["retrieval_rank_whitened"] <= m
            assert 1 <= c["member_retrieval_rank_raw"] <= m and 0 <= c["class_agreement"] <= 1
            assert c["fidelity"] == c["objective_alignment"] and c["member_fidelity"] == c["best_member_objective_alignment"]
            assert c["colourfulness"] >= 0 and 0 <= c["border_fill"] <= 1 and c["patch_count"] >= 1
        sc = entry["scores"]
        assert sc["cells"] == m and set(sc) == {"cells", "icons", "members", "patches"}
        ranks = np.array([c["retrieval_rank_raw"] for c in cells])
        assert sc["icons"]["retrieval_at1_raw"] == pytest.approx((ranks == 1).mean(), abs=1e-4)
        mranks = np.array([c["member_retrieval_rank_whitened"] for c in cells])
        assert sc["members"]["retrieval_at5_whitened"] == pytest.approx((mranks <= 5).mean(), abs=1e-4)
        loo = np.array([c["member_retrieval_rank_raw_loo"] for c in cells])
        assert sc["members"]["retrieval_at1_raw_loo"] == pytest.approx((loo == 1).mean(), abs=1e-4)
        assert sc["icons"]["objective_alignment"] == pytest.approx(entry["icon_objective_alignment"], abs=1e-4)
        assert entry["icon_fidelity"] == entry["icon_objective_alignment"]          # the old key, kept
        assert sc["patches"]["colourfulness"] > 0
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["scores:conv2"]["status"] == "complete"
    # the atlas saved and loaded keeps the arrays
    back = open_atlas(run_dir, "conv2")
    for a, b in zip(tiny_run.levels, back.levels):
        assert set(b.scores) == set(SCORE_KEYS)
        np.testing.assert_array_equal(a.scores["retrieval_rank_raw"], b.scores["retrieval_rank_raw"])


def test_member_baseline_in_a_run_is_measured_as_the_icons_are(tiny_run, tiny_spec):
    """The random member's numbers in a built atlas, recomputed by hand: its stored activation ranked
    by the same function, its stored attribution's classes, its patch cut as the export cuts it."""
    run = aa.open_run(tiny_run.run_dir)
    rows = run.rows("conv2")
    acts = np.asarray(run.activations("conv2"), np.float32)
    full = np.asarray(run.attributions("conv2"), np.float32)
    shape = run.summary["layer_shapes"]["conv2"]
    grids = {g.size: g for g in load_grid(tiny_run.run_dir / "grid", "conv2")}
    for lv in tiny_run.levels:
        g, s = grids[lv.size], lv.scores
        member = s["member_row"]
        for c in range(len(member)):                                   # each member belongs to its cell
            assert member[c] in g.members(c)
        np.testing.assert_array_equal(s["member_retrieval_rank_raw"],
                                      retrieval_ranks(acts[member], np.arange(len(member)), g.mean_activation))
        loo = leave_one_out_means(g.mean_activation, g.count, acts[member])
        np.testing.assert_array_equal(s["member_retrieval_rank_raw_loo"],
                                      retrieval_ranks(acts[member], np.arange(len(member)), g.mean_activation, loo))
        np.testing.assert_allclose(s["member_class_agreement"],
                                   class_agreement(top_classes_of(full[member]), g.top_classes[:, :5]))
        P = lv.icon_size
        patches = np.stack([np.asarray(cut_patch(tiny_spec.preprocess.geometry(aa.data.load_rgb(rows.path[r])),
                                                 rows.y[r], rows.x[r], (shape[1], shape[2]),
                                                 tiny_spec.preprocess.size, P)) for r in member])
        np.testing.assert_allclose(s["member_colourfulness"], colourfulness(patches))
        np.testing.assert_allclose(s["colourfulness"], colourfulness(lv.icons))


def test_scores_stage_is_cached_and_keyed_by_its_settings(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    ren = run_render(run_dir, "conv2", fast_render(), progress=False)
    assert not ren.report.ran
    again = run_scores(run_dir, "conv2", ren, progress=False)
    assert not again.report.ran                                        # unchanged: skipped
    other = run_scores(run_dir, "conv2", ren, cfg=ScoreConfig(seed=1), progress=False)
    assert other.report.ran
    G = tiny_run.levels[-1].size
    assert not np.array_equal(other.scores[G]["member_row"], tiny_run.levels[-1].scores["member_row"])
    np.testing.assert_array_equal(other.scores[G]["retrieval_rank_raw"],
                                  tiny_run.levels[-1].scores["retrieval_rank_raw"])


def test_export_has_the_score_columns_and_an_old_atlas_still_loads_and_exports(tiny_run, tmp_path):
    site = tmp_path / "site"
    export_site(tiny_run.run_dir, site, patches_per_cell=2)
    lv = tiny_run.levels[0]
    d = json.loads((site / "data" / "conv2" / f"level-{lv.size}.json").read_text())
    assert d["rr"] == lv.scores["retrieval_rank_raw"].tolist() and len(d["mcf"]) == len(d["i"])
    assert d["f"] == [round(float(f), 4) for f in lv.fidelity]
    assert d["st"] == lv.steps.tolist() and all(s > 0 for s in d["st"])   # optimiser steps per icon

    # an atlas saved before the scores existed: no score arrays, no score keys in its JSON
    run_dir = tmp_path / "old"
    shutil.copytree(tiny_run.run_dir, run_dir)
    adir = run_dir / "atlas" / "conv2"
    for g in (lv.size for lv in tiny_run.levels):
        with np.load(adir / f"level-{g}.npz") as z:
            arrays = {k: z[k] for k in z.files if not k.startswith("score_")}
        np.savez(adir / f"level-{g}.npz", **arrays)
        js = json.loads((adir / f"level-{g}.json").read_text())
        js["cells"] = [{k: v for k, v in c.items() if k not in SCORE_KEYS and "objective_alignment" not in k}
                       for c in js["cells"]]
        (adir / f"level-{g}.json").write_text(json.dumps(js))
    old = Atlas.load(adir)
    assert all(lv.scores == {} for lv in old.levels)
    assert "retrieval_rank_raw" not in old.records(old.levels[0])[0]
    assert old.records(old.levels[0])[0]["fidelity"] == pytest.approx(float(old.levels[0].fidelity[0]), abs=1e-4)
    export_site(run_dir, tmp_path / "old-site", patches_per_cell=0)
    d = json.loads((tmp_path / "old-site" / "data" / "conv2" / f"level-{lv.size}.json").read_text())
    assert "rr" not in d and "f" in d and "mf" in d


@needs_browser
def test_viewer_cell_panel_shows_the_scores(browser, tiny_run, tmp_path):
    index = export_site(tiny_run.run_dir, tmp_path / "site", single_file=True, patches_per_cell=2)
    page = browser.new_page(viewport={"width": 900, "height": 700})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(index.resolve().as_uri())
        page.wait_for_function("window.atlasViewer && atlasViewer.stats.ready", timeout=15000)
        page.wait_for_timeout(500)
        G = page.evaluate("atlasViewer.stats.level")
        lv = tiny_run.level(G)
        pos = page.evaluate(f"atlasViewer.cellCenter({int(lv.i[0])}, {int(lv.j[0])})")
        page.mouse.click(pos["x"], pos["y"])
        page.wait_for_selector("#panel:not([hidden])")
        text = page.inner_text("#pinfo")
        for words in ("retrieval rank (raw)", "retrieval rank (whitened)", "class agreement", "colourfulness",
                      "border fill", "objective alignment", "member", "patches"):
            assert words in text, (words, text)
        assert f"{int(lv.scores['retrieval_rank_raw'][0])} / {len(lv.i)}" in text
        assert f"optimiser steps{int(lv.steps[0])}" in text.replace("\t", "").replace("\n", "")
        assert errors == []
    finally:
        page.close()
