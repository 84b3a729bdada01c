"""Class filters, two-class comparison axis and candidates, patch compositing and attack arithmetic
(issue 5 checks; method.md §3.2, §3.3, §4.1, §4.3)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from actatlas.analysis import (CORNERS, candidate_cells, cell_sides, class_filter, comparison_axis, composite,
                               embed_1d, noise_patch, patch_attack, save_report)
from actatlas.analysis.compare import comparison_rows
from actatlas.errors import UserError
from actatlas.grid import grid_level
from actatlas.models import ModelSpec, Preprocess


# ---------------------------------------------------------------------------------------------- filters

def _attr():
    # 6 rows, 3 classes
    return np.array([[3.0, 1.0, 0.0],    # winner 0
                     [0.5, 2.0, 0.1],    # winner 1
                     [-1.0, -2.0, -0.5],  # winner 2 (all negative)
                     [1.0, 4.0, 0.0],    # winner 1
                     [2.0, 0.0, 2.5],    # winner 2
                     [0.2, 0.1, -3.0]], dtype=np.float16)  # winner 0


def test_winner_filter_exact_rows():
    a = _attr()
    assert class_filter(a, 0, "winner").tolist() == [0, 5]
    assert class_filter(a, 1, "winner").tolist() == [1, 3]
    assert class_filter(a, 2, "winner").tolist() == [2, 4]
    # partition: every row in exactly one winner set
    allrows = np.concatenate([class_filter(a, k, "winner") for k in range(3)])
    assert sorted(allrows.tolist()) == list(range(6))


def test_top_filter_positive_only_sorted_unique():
    a = _attr()
    assert class_filter(a, 0, "top", top=2).tolist() == [0, 4]     # 3.0, 2.0
    assert class_filter(a, 0, "top", top=100).tolist() == [0, 1, 3, 4, 5]  # -1.0 dropped
    assert class_filter(a, 2, "top", top=100).tolist() == [1, 4]   # only positives (0 excluded)
    r = class_filter(a, 1, "top", top=3)
    assert r.tolist() == [0, 1, 3] and len(np.unique(r)) == len(r)
    with pytest.raises(UserError):
        class_filter(a, 0, "best")
    with pytest.raises(UserError):
        class_filter(a, 3, "winner")


def test_comparison_rows_union_without_duplicates():
    a = _attr()
    rows = comparison_rows(a, 0, 1, top=2)
    assert rows.tolist() == sorted(set(rows.tolist()))
    expect = {0, 5} | {1, 3} | {0, 4} | {3, 1}
    assert set(rows.tolist()) == expect


# ---------------------------------------------------------------------------------------------- compare

def test_comparison_axis_sign_zero_and_clipping():
    rng = np.random.default_rng(0)
    n = 1000
    a = rng.standard_normal((n, 4)).astype(np.float32)
    a[0, 1] = a[0, 3] = 0.7          # d = 0 -> x = 0
    a[1, 1], a[1, 3] = 0.0, 50.0      # huge positive -> clipped to +1 (right)
    a[2, 1], a[2, 3] = 50.0, 0.0      # huge negative -> -1 (left)
    x = comparison_axis(a, left=1, right=3)
    d = a[:, 3] - a[:, 1]
    assert x[0] == 0.0
    assert x[1] == 1.0 and x[2] == -1.0
    assert x.min() >= -1 and x.max() <= 1
    assert np.all(np.sign(x) == np.sign(d))
    scale = np.percentile(np.abs(d.astype(np.float64)), 99)
    inside = np.abs(d) < scale
    np.testing.assert_allclose(x[inside], d[inside] / scale, rtol=1e-5)
    assert (np.abs(x) == 1).sum() >= 10   # ~1% clipped at the P99
    # swapping the classes flips the sign
    np.testing.assert_allclose(comparison_axis(a, 3, 1), -x, atol=1e-6)


def test_comparison_axis_degenerate_scale():
    a = np.zeros((100, 2), np.float32)
    assert np.all(comparison_axis(a, 0, 1) == 0)
    a[5, 1] = 2.0  # P99(|d|) == 0 -> fall back to max
    x = comparison_axis(a, 0, 1)
    assert x[5] == 1.0 and np.isfinite(x).all() and (x[np.arange(100) != 5] == 0).all()


def test_cells_labels_sides_and_candidates():
    # 4 classes: left 0, right 1, third classes 2, 3. One cluster per cell on a 10x10 grid.
    cells = [((0.05, 0.5), 0), ((0.95, 0.5), 1), ((0.75, 0.25), 2), ((0.25, 0.85), 3), ((0.55, 0.05), 3)]
    coords, attr = [], []
    for k, ((cx, cy), cls) in enumerate(cells):
        for t in range(5):
            coords.append((cx, cy))
            v = np.zeros(4, np.float32)
            v[cls] = 1.0 + k + 0.1 * t
            attr.append(v)
    coords = np.array(coords, np.float32)
    attr = np.array(attr, np.float32)
    acts = np.abs(np.random.default_rng(0).standard_normal((len(coords), 3))).astype(np.float32) + 0.1
    level = grid_level(coords, acts, 10, attributions=attr, min_count=4)
    assert level.m == 5
    sides = cell_sides(level)
    side_by_ij = {(int(i), int(j)): int(s) for i, j, s in zip(level.i, level.j, sides)}
    assert side_by_ij[(0, 5)] == -1 and side_by_ij[(9, 5)] == 1 and side_by_ij[(5, 0)] == 1
    assert side_by_ij[(2, 8)] == -1
    assert level.label[level.cell_at(7, 2)] == 2   # labelled by the top class
    names = ["left", "right", "baseball", "noodles"]
    cands = candidate_cells(level, sides, 0, 1, names)
    assert [(c.i, c.j, c.top_name, c.side) for c in cands] == [
        (5, 0, "noodles", "right"), (2, 8, "noodles", "left"), (7, 2, "baseball", "right")]
    assert [c.value for c in cands] == sorted([c.value for c in cands], reverse=True)
    assert cands[0].n == 5 and cands[0].side_class == 1 and cands[1].side_class == 0
    # x = 0 lands on the right half's first column for an even grid; odd grid middle column is neutral
    lv = grid_level(np.array([[0.5, 0.5]] * 4, np.float32), acts[:4], 5, attributions=attr[:4], min_count=1)
    assert cell_sides(lv).tolist() == [0]


def test_embed_1d_pca_range():
    rng = np.random.default_rng(1)
    acts = rng.random((50, 6)).astype(np.float32)
    y = embed_1d(acts, "pca")
    assert y.shape == (50,) and y.min() == 0 and y.max() == 1


# ---------------------------------------------------------------------------------------------- patches

def test_composite_geometry_each_corner():
    s = 224
    bg = Image.new("RGB", (s, s), (0, 0, 0))
    patch = Image.new("RGB", (50, 50), (255, 0, 0))
    for r in (0.1, 0.33, 0.4, 0.7):
        side = int(r * s)
        for (px, py) in CORNERS:
            out = np.asarray(composite(bg, patch, r, (px, py)))
            x, y = int(px * (s - side)), int(py * (s - side))
            mask = out.any(axis=2)
            expect = np.zeros((s, s), bool)
            expect[y:y + side, x:x + side] = True
            assert np.array_equal(mask, expect), (r, px, py)
            assert (out[expect] == (255, 0, 0)).all()
    tl = np.asarray(composite(bg, patch, 0.4, (0, 0))).any(axis=2)
    br = np.asarray(composite(bg, patch, 0.4, (1, 1))).any(axis=2)
    assert tl[0, 0] and not tl[-1, -1] and br[-1, -1] and not br[0, 0]
    tr = np.asarray(composite(bg, patch, 0.4, (1, 0))).any(axis=2)
    bl = np.asarray(composite(bg, patch, 0.4, (0, 1))).any(axis=2)
    assert tr[0, -1] and not tr[0, 0] and bl[-1, 0] and not bl[-1, -1]
    assert np.asarray(bg).max() == 0  # background untouched


def test_noise_patch():
    a, b = np.asarray(noise_patch(16, 3)), np.asarray(noise_patch(16, 3))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b) and a.std() > 50


class RedCornerNet(nn.Module):
    """3 classes on [0, 1] inputs. class 0 (source): logit 1. class 2: logit 2 iff mean blue > 0.6.
    class 1 (target): logit 5 iff >= 100 pure red pixels in the trigger quadrant, which is bottom-right
    when mean green > 0.5 and top-left otherwise; else -5."""

    def forward(self, x):
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        red = (r > 0.9) & (g < 0.1) & (b < 0.1)
        h = x.shape[-1] // 2
        tl = red[:, :h, :h].flatten(1).sum(1)
        br = red[:, h:, h:].flatten(1).sum(1)
        greenish = g.flatten(1).mean(1) > 0.5
        hit = torch.where(greenish, br, tl) >= 100
        blue = b.flatten(1).mean(1) > 0.6
        out = torch.full((x.shape[0], 3), -5.0)
        out[:, 0] = 1.0
        out[:, 1] = torch.where(hit, 5.0, -5.0)
        out[:, 2] = torch.where(blue, 2.0, -5.0)
        return out


def _red_spec():
    return ModelSpec(name="red", module=RedCornerNet().eval(),
                     preprocess=Preprocess(size=32, resize=None, mode="squash", mean=(0, 0, 0),
                                           std=(255, 255, 255)),
                     class_names=["src", "tgt", "other"], default_layer="")


def _softmax(z):
    e = np.exp(np.asarray(z, np.float64) - np.max(z))
    return e / e.sum()


def test_patch_attack_arithmetic(tmp_path):
    spec = _red_spec()
    gray, green, blue = (100, 100, 100), (0, 200, 0), (0, 0, 230)
    imgs = [Image.new("RGB", (32, 32), c) for c in (gray, gray, gray, green, blue)]
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    sizes = (0.25, 0.5)   # sides 8 (64 px, never enough) and 16 (a full quadrant)
    res = patch_attack(spec, imgs, None, 0, 1, red, sizes=sizes, corners=4, batch_size=3)
    p_lo, p_hi = _softmax([1, -5, -5])[1], _softmax([1, 5, -5])[1]
    assert res["correct_before"] == 4 and res["eligible"] == [0, 1, 2, 3]   # blue image misclassified
    assert res["static_success"] == pytest.approx(0.75)     # 0.5 top-left flips the 3 grey images
    assert res["static_size"] == 0.5 and res["static_corner"] == [0, 0]
    assert res["dynamic_success"] == pytest.approx(1.0)     # green flips at bottom-right
    assert res["p_target_before"] == pytest.approx(p_lo)
    assert res["p_target_after"] == pytest.approx((3 * p_hi + p_lo) / 4)
    assert res["p_target_after_dynamic"] == pytest.approx(p_hi)
    assert [p["success"] for p in res["per_size"]] == pytest.approx([0.0, 0.75])
    grid = {(g["size"], tuple(g["corner"])): g["flipped"] for g in res["grid"]}
    assert grid[(0.5, (0, 0))] == 3 and grid[(0.5, (1, 1))] == 1 and sum(grid.values()) == 4
    # noise control: same sizes, corners and images; never flips
    nz = res["noise"]
    assert len(nz["grid"]) == len(res["grid"]) == 8
    assert [(g["size"], g["corner"]) for g in nz["grid"]] == [(g["size"], g["corner"]) for g in res["grid"]]
    assert nz["correct_before"] == 4 and nz["static_success"] == 0 and nz["dynamic_success"] == 0
    assert nz["p_target_after"] == pytest.approx(p_lo)
    # source omitted: every non-target image whose label the model predicts
    labels = np.array([0, 0, 1, 0, 0])
    res2 = patch_attack(spec, imgs, labels, None, 1, red, sizes=sizes, corners=[(0, 0), (1, 1)])
    assert res2["correct_before"] == 3 and res2["eligible"] == [0, 1, 3]
    assert res2["static_success"] == pytest.approx(2 / 3) and res2["dynamic_success"] == pytest.approx(1.0)
    with pytest.raises(UserError):
        patch_attack(spec, imgs, None, None, 1, red)
    # report files
    paths = save_report(res, tmp_path)
    data = json.loads(open(paths["json"]).read())
    assert data["static_success"] == pytest.approx(0.75) and "noise" in data
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 16 and {r["patch"] for r in rows} == {"patch", "noise"}
    png = Image.open(paths["png"])
    assert png.size[0] > 200 and png.mode == "RGB"


# ---------------------------------------------------------------------------------------------- on a run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import actatlas as aa
    import tinymodels  # noqa: F401  (tests/ on sys.path)

    root = tmp_path_factory.mktemp("analysis")
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    spec = aa.load_model("tinymodels:tiny_cnn")
    aa.collect(spec, aa.images(str(folder)), root / "run", layers=["conv2"], per_image=30,
               attributions="full", progress=False)
    return aa.open_run(root / "run")


def test_class_atlas_and_compare_on_run(tiny_run):
    from actatlas.analysis import class_atlas, compare
    from actatlas.layout import LayoutConfig

    layer = tiny_run.layers[0]
    attr = np.asarray(tiny_run.attributions(layer), np.float32)
    counts = np.bincount(attr.argmax(1), minlength=attr.shape[1])
    cls = int(counts.argmax())
    ca = class_atlas(tiny_run, layer, cls, "winner", grid=4, layout_cfg=LayoutConfig(method="pca"), min_count=1)
    assert ca.rows.tolist() == np.flatnonzero(attr.argmax(1) == cls).tolist()
    assert ca.coords.shape == (len(ca.rows), 2) and ca.level.count.sum() == len(ca.rows)
    cell = int(np.argmax(ca.level.count))
    assert set(ca.run_rows(cell).tolist()) <= set(ca.rows.tolist())

    left, right = [int(k) for k in np.argsort(-counts)[:2]]
    cmp = compare(tiny_run, layer, left, right, top=50, y_method="pca", min_count=1)
    assert len(np.unique(cmp.rows)) == len(cmp.rows)
    np.testing.assert_allclose(cmp.x, comparison_axis(attr[cmp.rows], left, right), atol=1e-6)
    assert cmp.y.min() >= 0 and cmp.y.max() <= 1
    assert len(cmp.labels) == cmp.level.m
    assert cmp.labels == [tiny_run.class_names[t] for t in cmp.level.label]
    for c in cmp.candidates:
        assert c.top_class not in (left, right)
    # the 1-D t-SNE path runs on a small subset
    y = embed_1d(np.asarray(tiny_run.activations(layer)[:80], np.float32), "tsne")
    assert y.shape == (80,) and y.min() == 0 and y.max() == 1
