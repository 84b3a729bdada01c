"""The fireboat analysis's cluster count and the sample-size check (issue 14) on synthetic data with known
answers: analysis/clusters.py and analysis/sample_size.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from actatlas.analysis.classes import top_rows
from actatlas.analysis.clusters import PALETTE, class_clusters, cluster_figure, count_clusters
from actatlas.analysis.sample_size import (best_cosines, recovery, same_cell_cosines, sample_size_check,
                                           subset_rows)
from actatlas.errors import ConfigError
from actatlas.grid import grid_levels

CENTRES = np.array([[0.2, 0.2], [0.8, 0.3], [0.5, 0.85], [0.15, 0.8], [0.85, 0.85]])


def _blobs(sizes, sd=0.03, seed=0):
    rng = np.random.default_rng(seed)
    pts = np.concatenate([rng.normal(CENTRES[q], sd, (s, 2)) for q, s in enumerate(sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return pts, truth


def _same_partition(labels, truth):
    pairs = set(zip(labels.tolist(), truth.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


# ------------------------------------------------------------------------------------ count_clusters

@pytest.mark.parametrize("sizes", [(150, 100, 50), (60, 60, 60, 60, 60)])
def test_count_clusters_finds_separated_blobs(sizes):
    pts, truth = _blobs(sizes)
    cl = count_clusters(pts)
    assert cl.k == len(sizes)
    assert _same_partition(cl.labels, truth)
    assert cl.shares == sorted(cl.shares, reverse=True)
    assert cl.shares == pytest.approx(sorted(np.asarray(sizes) / sum(sizes), reverse=True), abs=1e-4)
    assert np.bincount(cl.labels)[0] == max(sizes)          # cluster 0 is the largest
    assert max(cl.silhouettes, key=cl.silhouettes.get) == len(sizes)


@pytest.mark.parametrize("kind", ["gauss", "uniform"])
def test_count_clusters_one_group_is_one_cluster(kind):
    rng = np.random.default_rng(1)
    pts = rng.normal(0.5, 0.1, (300, 2)) if kind == "gauss" else rng.uniform(0, 1, (300, 2))
    cl = count_clusters(pts)
    assert cl.k == 1 and cl.shares == [1.0] and (cl.labels == 0).all()
    assert max(cl.silhouettes.values()) < 0.5            # tried, but no separated structure


def test_count_clusters_dominant_cluster_and_determinism():
    pts, truth = _blobs((190, 10))
    a, b = count_clusters(pts, seed=3), count_clusters(pts, seed=3)
    assert a.k == 2 and a.largest_share == pytest.approx(0.95)
    assert np.array_equal(a.labels, b.labels) and a.silhouettes == b.silhouettes
    assert _same_partition(a.labels, truth)


def test_count_clusters_rule_parameters_and_bad_input():
    pts, _ = _blobs((60, 60, 60, 60, 60))
    assert count_clusters(pts, k_max=3).k <= 3
    assert count_clusters(pts, min_silhouette=0.99).k == 1       # the threshold decides for one cluster
    assert count_clusters(np.array([[0.1, 0.1], [0.9, 0.9]] * 5)).k == 1   # 2 distinct points: no silhouette
    with pytest.raises(ConfigError):
        count_clusters(np.array([[0.1, np.nan], [0.2, 0.3]]))
    with pytest.raises(ConfigError):
        count_clusters(np.zeros((0, 2)))


def test_class_clusters_top_classes_and_figure(tmp_path):
    # three blobs of class 0's activations, each also attributed more strongly to its own class q + 1,
    # among 200 background rows attributed negatively to class 0
    pts, truth = _blobs((90, 60, 40))
    rng = np.random.default_rng(2)
    bg = rng.uniform(0, 1, (200, 2))
    coords = np.concatenate([pts, bg]).clip(0, 1)
    attr = np.zeros((len(coords), 6), np.float16)
    attr[:190, 0] = 1.0
    attr[np.arange(190), truth + 1] = 2.0
    attr[190:, 0] = -1.0
    attr[190:, 5] = 3.0
    rows = top_rows(attr, 0, top=1000)
    assert np.array_equal(rows, np.arange(190))
    cc = class_clusters("mixed4d", coords, attr, rows)
    names = ["fireboat", "windows", "spray", "crane", "x", "background"]
    s = cc.summary(names)
    assert s["clusters"] == 3 and s["rows"] == 190
    assert [t[0] for t in s["cluster_top_classes"]] == ["windows", "spray", "crane"]   # by size: 90, 60, 40
    assert "background" not in {c for t in s["cluster_top_classes"] for c in t}
    assert s["largest_share"] == pytest.approx(90 / 190, abs=1e-4)

    one = class_clusters("mixed5b", coords, attr, rows[truth == 0])
    assert one.clusters.k == 1
    path = cluster_figure(tmp_path / "fig" / "clusters.png", [("mixed5b", coords, one), ("mixed4d", coords, cc)],
                          size=200)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (200 + 30 + 8, 2 * (200 + 8) + 8, 3)
    left, right = img[:, :208], img[:, 208:]
    colours = lambda part: {tuple(c) for c in part.reshape(-1, 3).tolist()}  # noqa: E731
    assert tuple(PALETTE[0]) in colours(left) and tuple(PALETTE[1]) not in colours(left)
    assert {tuple(PALETTE[q]) for q in range(3)} <= colours(right)
    # the largest cluster (blob 0, centre (0.2, 0.2): lower left) is drawn in the lower left of its panel
    ys, xs = np.nonzero((right == PALETTE[0]).all(axis=2))
    assert xs.mean() < 0.4 * 200 and ys.mean() > 30 + 0.6 * 200
    with pytest.raises(ConfigError):
        class_clusters("mixed4d", coords, attr, np.zeros(0, np.int64))
    with pytest.raises(ConfigError):
        class_clusters("mixed4d", coords[:10], attr, rows)


# ------------------------------------------------------------------------------------ sample size

def test_best_cosines_by_hand():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    cand = np.array([[2.0, 0.0], [1.0, 1.0]])
    got = best_cosines(ref, cand)
    assert got == pytest.approx([1.0, 1 / np.sqrt(2), 1.0, 0.0])
    assert np.isnan(best_cosines(ref, np.zeros((0, 2)))).all()
    with pytest.raises(ConfigError):
        best_cosines(ref, np.ones((2, 3)))


def _cells_data(n=4000, G=4, c=16, noise=0.0, seed=0):
    """Uniform layout; each cell's activations share one direction (its own basis vector) plus noise."""
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 1, (n, 2))
    ij = np.minimum((coords * G).astype(int), G - 1)
    cell = ij[:, 0] * G + ij[:, 1]
    acts = np.eye(c, dtype=np.float32)[cell % c] * 5 + noise * rng.standard_normal((n, c)).astype(np.float32)
    return coords, acts


def test_recovery_exact_share_when_the_subset_misses_half_the_cells():
    coords, acts = _cells_data()
    full = grid_levels(coords, acts, (4,), min_count=1, topk=0, n_closest=0)[0]
    left = coords[:, 0] < 0.5                             # the subset never visits the right half
    sub = grid_levels(coords[left], acts[left], (4,), min_count=1, topk=0, n_closest=0)[0]
    r = recovery(full, sub)
    assert r["cells_all"] == 16 and r["cells_subset"] == 8
    assert r["share_best_cosine_ge_0.9"] == 0.5            # right-half directions are orthogonal to all left ones
    assert r["median_best_cosine"] == pytest.approx(0.5, abs=1e-6)     # median of eight 1s and eight 0s
    assert r["min_best_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert r["share_cells_kept_by_subset"] == 0.5 and r["mean_same_cell_cosine"] == pytest.approx(1.0)
    same = same_cell_cosines(full, sub)
    assert np.isnan(same[full.i >= 2]).all() and np.allclose(same[full.i < 2], 1.0)


def test_sample_size_check_uses_the_atlas_grid():
    coords, acts = _cells_data(noise=0.5)
    full = grid_levels(coords, acts, (2, 4), min_count=6, topk=0, n_closest=0)
    every = sample_size_check(coords, acts, full, size=len(coords))           # the subset is everything
    for lv, r in zip(full, every):
        assert r["grid"] == lv.size and r["cells_subset"] == r["cells_all"] == len(lv.i)
        assert r["share_best_cosine_ge_0.9"] == 1.0 and r["mean_same_cell_cosine"] == pytest.approx(1.0)
        assert r["min_count"] == 6 and r["samples"] == len(coords)
    tenth = sample_size_check(coords, acts, full, size=400, seed=1)
    assert [r["grid"] for r in tenth] == [2, 4] and all(r["subset"] == 400 for r in tenth)
    assert tenth[1]["share_best_cosine_ge_0.9"] == 1.0 and tenth[1]["median_best_cosine"] > 0.95
    # heavy noise and few rows: the subset's means drift, so fewer atlas cells are recovered at 0.9
    coords, acts = _cells_data(noise=6.0)
    full = grid_levels(coords, acts, (4,), min_count=6, topk=0, n_closest=0)
    noisy = sample_size_check(coords, acts, full, size=200, seed=1)[0]
    assert noisy["share_best_cosine_ge_0.9"] < 1.0
    assert noisy["median_best_cosine"] < tenth[1]["median_best_cosine"]


def test_subset_rows():
    a = subset_rows(1000, 100, seed=4)
    assert len(a) == len(np.unique(a)) == 100 and (np.diff(a) > 0).all() and a.max() < 1000
    assert np.array_equal(a, subset_rows(1000, 100, seed=4)) and not np.array_equal(a, subset_rows(1000, 100, seed=5))
    for bad in (0, 1001):
        with pytest.raises(ConfigError):
            subset_rows(1000, bad)
