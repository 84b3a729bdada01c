"""Layout normalization, binning, multi-level grid, whitening and layout methods (method.md §7.A1, A2,
A5, A10, A11)."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from actatlas.errors import UserError
from actatlas.grid import (cell_index, check_nesting, grid_level, grid_levels, level_to_records, load_grid,
                           reference_grid_loop, save_grid)
from actatlas.layout import (Layout, LayoutConfig, compute_layout, load_layout,
                             normalize_layout, save_layout)
from actatlas.whiten import (second_moment, whitening_from_moment,
                             whitening_matrix)


def clustered(n=2000, c=24, k=6, seed=0, dtype=np.float32):
    """Synthetic ReLU-like activations with k clusters, and a clustered layout in [0, 1]^2."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    centers = rng.random((k, c)) * 3
    acts = np.maximum(centers[lab] + rng.standard_normal((n, c)), 0).astype(dtype)
    pos = rng.random((k, 2)) * 0.8 + 0.1
    coords = np.clip(pos[lab] + rng.standard_normal((n, 2)) * 0.12, 0, 1).astype(np.float32)
    return coords, acts, lab


def separated(n=300, c=16, k=4, seed=0):
    """k clusters far apart relative to their unit noise (centre distances ~15 sigma): any faithful 2-D
    layout keeps them apart, whatever the BLAS kernel or thread count."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    centers = rng.random((k, c)) * 10
    return np.maximum(centers[lab] + rng.standard_normal((n, c)), 0).astype(np.float32), lab


def knn_label_agreement(coords, lab, k=10) -> float:
    """Mean share of each point's k nearest neighbours (excluding itself) that carry its label."""
    d = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :k]
    return float((lab[nn] == lab[:, None]).mean())


def test_knn_label_agreement_measures_separation():
    lab = np.repeat([0, 1], 50)
    apart = np.concatenate([np.zeros((50, 2)), np.ones((50, 2))]) + np.random.default_rng(0).random((100, 2)) * .1
    mixed = np.random.default_rng(1).random((100, 2))
    assert knn_label_agreement(apart, lab) == 1.0
    assert knn_label_agreement(mixed, lab) < 0.7


# ---------------------------------------------------------------------------------------------- A1

def _lucid_steps(x, lo_p=1, hi_p=99, margin=0.1):
    """The reference's four steps, written out literally (in-place updates, as in §1.5)."""
    x = np.array(x, dtype=np.float64)
    mins = np.percentile(x, lo_p, axis=0)
    maxs = np.percentile(x, hi_p, axis=0)
    mins -= margin * (maxs - mins)
    maxs += margin * (maxs - mins)      # uses the already-moved mins: the 0.11 R quirk
    out = np.clip(x, mins, maxs)
    out -= out.min(axis=0)
    out /= out.max(axis=0)
    return out


def test_normalize_hand_computed():
    # axis 0: -1000, 0..98, 1000 (n = 101) -> P1 = 0, P99 = 98 (linear interpolation), R = 98
    x0 = np.concatenate([[-1000.0], np.arange(99.0), [1000.0]])
    x1 = -2.0 * x0                                            # a second axis with other bounds
    raw = np.stack([x0, x1], axis=1)
    out = normalize_layout(raw)
    lo, hi = 0 - 9.8, 98 + 10.78                              # 0.10 R below, 0.11 R above
    np.testing.assert_allclose(out[:, 0], (np.clip(x0, lo, hi) - lo) / (hi - lo), rtol=0, atol=1e-12)
    assert out[0, 0] == 0.0 and out[-1, 0] == 1.0
    np.testing.assert_allclose(out[1, 0], 9.8 / 118.58, atol=1e-12)
    # axis 1 = -2 x0: P1 = -196, P99 = 0, R = 196 -> [-215.6, 21.56]
    lo1, hi1 = -196 - 19.6, 0 + 0.1 * (0 + 215.6)
    np.testing.assert_allclose(out[:, 1], (np.clip(x1, lo1, hi1) - lo1) / (hi1 - lo1), atol=1e-12)
    np.testing.assert_allclose(out, _lucid_steps(raw), atol=1e-12)
    # symmetric margin: 0.1 R on both sides
    sym = normalize_layout(raw, symmetric=True)
    lo, hi = -9.8, 98 + 9.8
    np.testing.assert_allclose(sym[:, 0], (np.clip(x0, lo, hi) - lo) / (hi - lo), atol=1e-12)


def test_normalize_random_matches_reference_and_spans_unit_square():
    rng = np.random.default_rng(3)
    raw = rng.standard_cauchy((5000, 2)).astype(np.float32)   # heavy tails: clipping happens
    out = normalize_layout(raw)
    np.testing.assert_allclose(out, _lucid_steps(raw), atol=1e-12)
    assert np.array_equal(out.min(axis=0), [0, 0]) and np.array_equal(out.max(axis=0), [1, 1])
    # no point beyond the bounds: the data extremes are used
    small = rng.random((300, 2))
    np.testing.assert_allclose(normalize_layout(small), (small - small.min(0)) / np.ptp(small, 0), atol=1e-12)


def test_normalize_degenerate_and_bad_input():
    raw = np.stack([np.full(50, 3.0), np.arange(50.0)], axis=1)
    out = normalize_layout(raw)
    assert not np.isnan(out).any() and np.all(out[:, 0] == 0.5)
    assert out[:, 1].min() == 0 and out[:, 1].max() == 1
    with pytest.raises(UserError):
        normalize_layout(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(UserError):
        normalize_layout(np.zeros((0, 2)))


# ---------------------------------------------------------------------------------------------- A2

def test_cell_index_edges():
    v = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.999999], [0.05, 0.1], [1.2, -0.3]], np.float32)
    ij = cell_index(v, 10)
    assert ij.tolist() == [[0, 9], [9, 0], [5, 9], [0, 1], [9, 0]]
    # the recipe's digitize binning agrees on float32 coordinates, including v = 1.0
    ref = reference_grid_loop(np.array([[1.0, 1.0]] * 3, np.float32), np.ones((3, 2)), 7, threshold=0)
    assert (ref["i"].tolist(), ref["j"].tolist(), ref["count"].tolist()) == ([6], [6], [3])


@pytest.mark.parametrize("G", [13, 20])
def test_binning_matches_reference_loop(G):
    coords, acts, _ = clustered(3000, 16, seed=G)
    coords[:5] = [[1, 1], [0, 0], [1, 0], [0.5, 0.5], [0.25, 0.75]]
    lv = grid_level(coords, acts, G, min_count=6, chunk_rows=512)
    ref = reference_grid_loop(coords, acts, G, threshold=5)
    assert 0 < lv.m < G * G                       # some cells dropped, some kept
    assert np.array_equal(lv.i, ref["i"]) and np.array_equal(lv.j, ref["j"])
    assert np.array_equal(lv.count, ref["count"])
    np.testing.assert_allclose(lv.mean_activation, ref["mean"], rtol=1e-5, atol=1e-6)
    assert lv.threshold == 5 and lv.n_dropped == 3000 - ref["count"].sum()


def test_counts_sum_to_n_and_csr_members():
    coords, acts, _ = clustered(1500, 8, seed=1)
    lv = grid_level(coords, acts, 16, min_count=1, chunk_rows=100)
    assert lv.count.sum() == 1500 and (lv.cell_of_row >= 0).all() and lv.n_dropped == 0
    assert lv.member_offsets[-1] == 1500 and len(lv.member_rows) == 1500
    ij = cell_index(coords, 16)
    for k in range(lv.m):
        rows = lv.members(k)
        assert np.array_equal(rows, np.flatnonzero(lv.cell_of_row == k))     # ascending, complete
        assert (ij[rows, 0] == lv.i[k]).all() and (ij[rows, 1] == lv.j[k]).all()
        assert lv.cell_at(lv.i[k], lv.j[k]) == k


def test_levels_nest_and_match_direct_binning():
    coords, acts, _ = clustered(4000, 8, seed=2)
    levels = grid_levels(coords, acts, (10, 20, 40, 80), min_count=3, n_closest=0)
    assert [lv.size for lv in levels] == [10, 20, 40, 80]
    assert check_nesting(levels)
    for lv in levels:                              # derived coarse cells == binning at that G
        ij = cell_index(coords, lv.size)
        rows = lv.member_rows
        cell = lv.cell_of_row[rows]
        assert (lv.i[cell] == ij[rows, 0]).all() and (lv.j[cell] == ij[rows, 1]).all()
        single = grid_level(coords, acts, lv.size, min_count=3, n_closest=0)
        assert np.array_equal(single.count, lv.count)
        np.testing.assert_allclose(single.mean_activation, lv.mean_activation, rtol=1e-6, atol=1e-6)
    # levels that do not divide each other (separate groups) still agree with one-level runs
    odd = grid_levels(coords, acts, (12, 40, 20), min_count=3, n_closest=0)
    assert [lv.size for lv in odd] == [12, 40, 20]
    assert np.array_equal(odd[0].count, grid_level(coords, acts, 12, min_count=3).count)
    # a violation is reported
    bad = levels[1]
    bad.i = bad.i.copy()
    bad.i[0] = (bad.i[0] + 3) % bad.size
    with pytest.raises(AssertionError):
        check_nesting(levels)


def test_closest_members_ordered_by_cosine():
    coords, acts, _ = clustered(1200, 12, seed=4)
    lv = grid_level(coords, acts, 12, min_count=1, n_closest=5, chunk_rows=200)
    assert lv.closest.shape == (lv.m, 5)
    for k in range(lv.m):
        rows = lv.members(k)
        mu = lv.mean_activation[k].astype(np.float64)
        a = acts[rows].astype(np.float64)
        cos = a @ mu / (np.linalg.norm(a, axis=1) * np.linalg.norm(mu))
        want = rows[np.argsort(-cos, kind="stable")][:5]
        got = lv.closest[k]
        assert np.array_equal(got[:len(want)], want)
        assert (got[len(want):] == -1).all()
    assert (lv.closest == -1).any()                # some cells have fewer than 5 members


def test_attribution_means_and_top_classes():
    coords, acts, _ = clustered(2000, 8, seed=5)
    rng = np.random.default_rng(5)
    attr = rng.standard_normal((2000, 30)).astype(np.float16)
    lv = grid_level(coords, acts, 10, attributions=attr, topk=4, chunk_rows=333)
    assert lv.mean_attribution.shape == (lv.m, 30)
    for k in range(lv.m):
        direct = attr[lv.members(k)].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(lv.mean_attribution[k], direct, rtol=1e-5, atol=1e-5)
        order = np.argsort(-lv.mean_attribution[k], kind="stable")[:4]
        assert np.array_equal(lv.top_classes[k], order)
        assert np.all(np.diff(lv.top_values[k]) <= 0)
    assert np.array_equal(lv.label, lv.top_classes[:, 0])
    none = grid_level(coords, acts, 10)
    assert none.mean_attribution is None and none.top_classes.shape == (none.m, 0)


def test_float16_memmap_in_chunks(tmp_path):
    coords, acts, _ = clustered(2500, 20, seed=6)
    attr = np.random.default_rng(6).standard_normal((2500, 7)).astype(np.float16)
    np.save(tmp_path / "a.npy", acts.astype(np.float16))
    np.save(tmp_path / "t.npy", attr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    tm = np.load(tmp_path / "t.npy", mmap_mode="r")
    small = grid_levels(coords, mm, (8, 16), attributions=tm, chunk_rows=37)
    big = grid_levels(coords, np.asarray(mm, np.float32), (8, 16), attributions=np.asarray(tm, np.float32),
                      chunk_rows=100_000)
    for a, b in zip(small, big):
        assert np.array_equal(a.count, b.count) and np.array_equal(a.member_rows, b.member_rows)
        np.testing.assert_allclose(a.mean_activation, b.mean_activation, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.mean_attribution, b.mean_attribution, rtol=1e-5, atol=1e-6)
        assert np.array_equal(a.closest, b.closest)


def test_zero_kept_cells_and_bad_arguments():
    coords, acts, _ = clustered(50, 4, seed=7)
    lv = grid_level(coords, acts, 40, min_count=1000)
    assert lv.m == 0 and lv.mean_activation.shape == (0, 4) and (lv.cell_of_row == -1).all()
    assert lv.member_offsets.tolist() == [0] and level_to_records(lv) == []
    with pytest.raises(UserError):
        grid_level(coords, acts[:10], 10)
    with pytest.raises(UserError):
        grid_level(coords, acts, 0)
    with pytest.raises(UserError):
        grid_level(coords, acts, 10, min_count=0)
    with pytest.raises(UserError):
        grid_level(np.full((50, 2), np.nan), acts, 10)


def test_save_and_load_grid(tmp_path):
    coords, acts, _ = clustered(1000, 6, seed=8)
    attr = np.random.default_rng(8).standard_normal((1000, 5)).astype(np.float16)
    levels = grid_levels(coords, acts, (5, 10), attributions=attr, topk=3)
    names = ["a", "b", "c", "d", "e"]
    d = save_grid(levels, tmp_path, "blocks/5", names, n_members=4)
    assert d.name == "blocks_5"
    back = load_grid(tmp_path, "blocks/5")
    assert [lv.size for lv in back] == [5, 10]
    for a, b in zip(levels, back):
        for f in ("i", "j", "count", "mean_activation", "mean_attribution", "top_classes", "top_values",
                  "member_offsets", "member_rows", "closest", "cell_of_row"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
        assert b.min_count == a.min_count
    doc = json.loads((d / "level-10.json").read_text())
    assert doc["size"] == 10 and doc["n_cells"] == levels[1].m
    rec = doc["cells"][0]
    assert set(rec) == {"i", "j", "n", "top", "members", "closest"}
    assert rec["top"][0][1] == names[rec["top"][0][0]] and len(rec["members"]) <= 4
    with pytest.raises(UserError):
        load_grid(tmp_path, "nope")


# ---------------------------------------------------------------------------------------------- A5

def test_whitening_identity(tmp_path):
    rng = np.random.default_rng(9)
    a = (rng.standard_normal((4000, 16)) @ rng.standard_normal((16, 16)) + 1).astype(np.float32)
    m = (a.astype(np.float64).T @ a) / len(a)
    np.testing.assert_allclose(second_moment(a, chunk_rows=333), m, rtol=1e-10, atol=1e-10)
    exact = whitening_matrix(a, ridge=0, chunk_rows=500)
    assert exact.S.dtype == np.float32 and exact.ridge_lambda == 0
    np.testing.assert_allclose(exact.S.astype(np.float64) @ m, np.eye(16), atol=1e-3)
    reg = whitening_matrix(a, ridge=1e-2)
    lam = 1e-2 * np.trace(m) / 16
    assert reg.ridge_lambda == pytest.approx(lam)
    np.testing.assert_allclose(reg.S.astype(np.float64) @ (m + lam * np.eye(16)), np.eye(16), atol=1e-4)
    v = rng.standard_normal(16).astype(np.float32)
    np.testing.assert_allclose(reg.apply(v), v @ reg.S, rtol=1e-6)
    # float16 memmap, chunked
    np.save(tmp_path / "a.npy", a.astype(np.float16))
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    m16 = np.asarray(mm, np.float64)
    np.testing.assert_allclose(second_moment(mm, chunk_rows=97), m16.T @ m16 / len(m16), rtol=1e-10)


def test_whitening_singular_needs_ridge():
    rng = np.random.default_rng(10)
    a = np.maximum(rng.standard_normal((500, 8)), 0).astype(np.float32)
    a[:, 3] = 0                                      # a dead channel
    with pytest.raises(UserError, match="singular"):
        whitening_matrix(a, ridge=0)
    w = whitening_matrix(a, ridge=1e-3)
    assert np.isfinite(w.S).all()
    with pytest.raises(UserError):
        whitening_from_moment(np.zeros((3, 3)), ridge=0.1)
    with pytest.raises(UserError):
        whitening_matrix(a, ridge=-1)


# ---------------------------------------------------------------------------------------------- layout

@pytest.fixture(scope="module")
def umap_runs():
    """All UMAP work of this module in one place: numba compiles on first use (~30-60 s cold)."""
    _, acts, lab = clustered(300, 16, k=4, seed=11)
    cfg = LayoutConfig(n_neighbors=15, seed=0)
    sep, sep_lab = separated(300, 16, k=4, seed=11)
    first = compute_layout(sep, cfg, progress=False)
    second = compute_layout(sep, cfg, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny = compute_layout(acts[:12], LayoutConfig(seed=1), progress=False)
    fitted = compute_layout(acts, LayoutConfig(n_neighbors=15, fit_max=200, seed=0), progress=False)
    return dict(acts=acts, lab=sep_lab, first=first, second=second, tiny=tiny, caught=caught, fitted=fitted)


@pytest.mark.slow  # numba compiles umap-learn on first use: ~75 s cold, ~6 s warm
def test_umap_seeded_deterministic_in_unit_square(umap_runs):
    a, b = umap_runs["first"], umap_runs["second"]
    assert isinstance(a, Layout) and a.engine == "umap-learn" and a.method == "umap"
    assert a.coords.dtype == np.float32 and a.coords.shape == (300, 2) and a.raw.shape == (300, 2)
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.raw, b.raw)
    assert a.coords.min() >= 0 and a.coords.max() <= 1
    assert np.array_equal(a.coords.min(0), [0, 0]) and np.array_equal(a.coords.max(0), [1, 1])
    np.testing.assert_allclose(a.coords, normalize_layout(a.raw), atol=1e-6)
    # well-separated clusters stay together: the 10 nearest layout neighbours of a point share its label.
    # A property of any correct UMAP on any CPU/BLAS, not a spread ratio tuned to one machine.
    assert knn_label_agreement(a.coords, umap_runs["lab"], k=10) >= 0.9


@pytest.mark.slow  # numba compiles umap-learn on first use: ~75 s cold, ~6 s warm
def test_umap_clamps_neighbors_and_fit_max(umap_runs):
    tiny = umap_runs["tiny"]
    assert tiny.params["n_neighbors"] == 11 and tiny.coords.shape == (12, 2)
    assert any("n_neighbors" in str(w.message) for w in umap_runs["caught"])
    fitted = umap_runs["fitted"]
    assert fitted.params["n_fit"] == 200 and np.isfinite(fitted.raw).all()
    assert fitted.coords.min() == 0 and fitted.coords.max() == 1


def test_pca_and_tsne_paths(tmp_path):
    _, acts, _ = clustered(150, 10, k=3, seed=12)
    pca = compute_layout(acts.astype(np.float16), LayoutConfig(method="pca"), progress=False)
    x = acts.astype(np.float16).astype(np.float64)
    x -= x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    ref = u[:, :2] * s[:2]
    for k in range(2):                                # equal up to the sign of each axis
        assert min(np.abs(pca.raw[:, k] - ref[:, k]).max(), np.abs(pca.raw[:, k] + ref[:, k]).max()) < 1e-3
    assert pca.engine == "numpy"
    tsne = compute_layout(acts, LayoutConfig(method="tsne", seed=0, n_epochs=250), progress=False)
    tsne2 = compute_layout(acts, LayoutConfig(method="tsne", seed=0, n_epochs=250), progress=False)
    assert tsne.engine == "sklearn" and tsne.params["perplexity"] == pytest.approx(149 / 3)
    assert np.array_equal(tsne.coords, tsne2.coords)
    assert tsne.coords.min() == 0 and tsne.coords.max() == 1
    save_layout(pca, tmp_path, "features.3")
    back = load_layout(tmp_path, "features.3")
    assert np.array_equal(back.coords, pca.coords) and np.array_equal(back.raw, pca.raw)
    assert back.config == pca.config and back.method == "pca"
    meta = json.loads((tmp_path / "features.3.json").read_text())
    assert meta["n"] == 150 and meta["seed"] == 0 and "seconds" in meta


def test_pca_prereduction_uncentered_for_cosine():
    from actatlas.layout import _pca_project
    _, acts, _ = clustered(400, 12, seed=13)
    proj = _pca_project(acts, 12, center=False, chunk_rows=50)      # full rank: a rotation
    g = acts.astype(np.float64) @ acts.T
    np.testing.assert_allclose(proj.astype(np.float64) @ proj.T, g, rtol=1e-4, atol=1e-2)


def test_bad_layout_configs():
    with pytest.raises(UserError):
        LayoutConfig(method="isomap")
    with pytest.raises(UserError):
        LayoutConfig(n_neighbors=1)
    with pytest.raises(UserError):
        LayoutConfig(min_dist=-0.1)
    with pytest.raises(UserError):
        LayoutConfig(metric="hamming-ish")
    with pytest.raises(UserError):
        LayoutConfig(engine="gpu")
    with pytest.raises(UserError):
        LayoutConfig(method="tsne", fit_max=100)
    with pytest.raises(UserError):
        LayoutConfig(min_percentile=50, max_percentile=10)
    with pytest.raises(UserError):
        compute_layout(np.zeros((3, 5), np.float32), LayoutConfig(method="pca"))
    with pytest.raises(UserError):
        compute_layout(np.zeros(10, np.float32), LayoutConfig(method="pca"))


def test_numba_cache_dir(monkeypatch, tmp_path):
    from actatlas.runtime import default_numba_cache_dir

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "given"))
    assert default_numba_cache_dir() == str(tmp_path / "given")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("ACTATLAS_CACHE", str(tmp_path / "aa"))
    assert default_numba_cache_dir() == str(tmp_path / "aa" / "numba")
    monkeypatch.delenv("ACTATLAS_CACHE")
    assert default_numba_cache_dir().endswith(os.path.join(".cache", "actatlas", "numba"))


@pytest.mark.slow  # imports umap-learn
def test_enable_numba_cache_switches_umaps_functions_to_disk_caching():
    """Explicit and process-wide: after the call umap-learn's jitted functions cache to the folder."""
    import umap.umap_ as umap_mod
    from numba.core.registry import CPUDispatcher

    from actatlas.runtime import default_numba_cache_dir, enable_numba_cache

    d = enable_numba_cache()
    assert d == default_numba_cache_dir() == os.environ["NUMBA_CACHE_DIR"] and os.path.isdir(d)
    jitted = [f for f in vars(umap_mod).values() if isinstance(f, CPUDispatcher)]
    assert jitted and all(type(f._cache).__name__ != "NullCache" for f in jitted)
