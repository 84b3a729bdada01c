"""Benchmarks of the grid and layout stages (for BENCHMARKS.md).

    python scripts/bench_grid.py grid   [--n 1000000] [--c 512] [--levels 20,40,80,160] [--classes 0]
                                        [--ref-n 100000] [--ref-G 80]
    python scripts/bench_grid.py layout [--sizes 10000,100000] [--c 64]
    python scripts/bench_grid.py jit    [--n 2000]

grid:   grid_levels over a synthetic float16 memmap [n, c] (written to a temp dir in chunks) at all levels:
        seconds and peak RSS growth (VmHWM, reset through /proc/self/clear_refs; it includes the pages of
        the memory-mapped input that were touched, i.e. up to n*c*2 bytes), and the recipe's per-cell loop
        (reference_grid_loop) against grid_level at ref_n rows, ref_G cells per side: speed ratio
        (goal >= 50x) and equality of the results.
layout: UMAP seconds, same data and settings, in one process with numba already warm: actatlas
        compute_layout vs plain umap-learn (overhead ratio; the embeddings should be identical).
jit:    fresh processes with a warm on-disk numba cache: plain umap-learn vs actatlas (which turns on
        numba caching for umap-learn's kernels), seconds from start to a fitted 300-point UMAP (JIT dominates).
Each prints a Markdown table and returns a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from actatlas.grid import grid_level, grid_levels, reference_grid_loop


# ----------------------------------------------------------------------------------------------
# memory

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ----------------------------------------------------------------------------------------------
# data

def synthetic(n: int, c: int, path: Path | None, k: int = 64, seed: int = 0, chunk: int = 65536,
              dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """Clustered ReLU-like activations [n, c] (a memmap at `path`, else in memory) and a clustered layout
    [n, 2] float32 in [0, 1]^2 (the same cluster label drives both)."""
    rng = np.random.default_rng(seed)
    centers = (rng.random((k, c)) * 2).astype(np.float32)
    pos = rng.random((k, 2)) * 0.8 + 0.1
    spread = rng.random(k) * 0.08 + 0.02
    lab = rng.integers(0, k, n)
    coords = np.clip(pos[lab] + rng.standard_normal((n, 2)) * spread[lab, None], 0, 1).astype(np.float32)
    acts = (np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, c)) if path is not None
            else np.empty((n, c), dtype))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = centers[lab[a:b]] + rng.standard_normal((b - a, c), dtype=np.float32)
        acts[a:b] = np.maximum(x, 0)
    if path is not None:
        acts.flush()
        del acts
        acts = np.load(path, mmap_mode="r")
    return acts, coords


def _table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# grid

def bench_grid(n: int = 1_000_000, c: int = 512, levels=(20, 40, 80, 160), ref_n: int = 100_000,
               ref_G: int = 80, classes: int = 0, chunk_rows: int = 65536, workdir: str | None = None) -> dict:
    """Time grid_levels on an [n, c] float16 memmap and the reference loop vs grid_level at ref_n/ref_G."""
    res: dict = {"n": n, "c": c, "levels": list(levels), "classes": classes, "chunk_rows": chunk_rows}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t = time.perf_counter()
        acts, coords = synthetic(n, c, Path(tmp) / "acts.npy")
        attr = None
        if classes:
            attr, _ = synthetic(n, classes, Path(tmp) / "attr.npy", seed=1)
        res["write_s"] = round(time.perf_counter() - t, 2)

        reset = _reset_peak()
        base = _status_kb("VmRSS") or 0
        base_file = _status_kb("RssFile") or 0
        t = time.perf_counter()
        lv = grid_levels(coords, acts, levels, attributions=attr, chunk_rows=chunk_rows)
        res["grid_s"] = round(time.perf_counter() - t, 3)
        res["peak_rss_growth_mb"] = round((_peak_kb() - base) / 1024, 1) if reset else None
        # file-backed part (pages of the memory-mapped input); the rest is the stage's own memory
        res["mapped_input_mb"] = round(((_status_kb("RssFile") or 0) - base_file) / 1024, 1)
        res["cells"] = {lv_.size: lv_.m for lv_ in lv}
        t = time.perf_counter()
        grid_levels(coords, acts, levels, attributions=attr, chunk_rows=chunk_rows, n_closest=0)
        res["grid_no_closest_s"] = round(time.perf_counter() - t, 3)
        del lv

        m = min(ref_n, n)
        sub = np.asarray(acts[:m], np.float32)
        sc = coords[:m]
        t = time.perf_counter()
        ref = reference_grid_loop(sc, sub, ref_G, threshold=5)
        res["ref_loop_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        fast = grid_level(sc, sub, ref_G, min_count=6, n_closest=0, topk=0, chunk_rows=chunk_rows)
        res["grid_level_s"] = round(time.perf_counter() - t, 4)
        res["speedup"] = round(res["ref_loop_s"] / max(res["grid_level_s"], 1e-9), 1)
        res["ref_equal"] = bool(np.array_equal(ref["i"], fast.i) and np.array_equal(ref["j"], fast.j)
                                and np.array_equal(ref["count"], fast.count)
                                and np.allclose(ref["mean"], fast.mean_activation, rtol=1e-4, atol=1e-5))
        res["ref_n"], res["ref_G"] = m, ref_G
        del acts, attr, sub
    print(f"\n### grid_levels, float16 memmap {n:,} x {c}" + (f" + attributions x {classes}" if classes else ""))
    print(_table(["levels", "seconds (with closest)", "seconds (no closest)", "peak RSS growth MB",
                  "of which mapped input MB", "cells"],
                 [[",".join(map(str, levels)), res["grid_s"], res["grid_no_closest_s"],
                   res["peak_rss_growth_mb"], res["mapped_input_mb"], ", ".join(f"{g}: {k}" for g, k in res["cells"].items())]]))
    print(f"\n### recipe loop vs grid_level, {m:,} x {c}, G = {ref_G}")
    print(_table(["reference loop s", "grid_level s", "speed-up", "identical"],
                 [[res["ref_loop_s"], res["grid_level_s"], f"{res['speedup']}x", res["ref_equal"]]]))
    return res


# ----------------------------------------------------------------------------------------------
# layout

def bench_layout(sizes=(10_000, 100_000), c: int = 64, n_neighbors: int = 50, min_dist: float = 0.05,
                 metric: str = "cosine") -> dict:
    """UMAP seconds, numba warm, same process and data: actatlas compute_layout vs plain umap-learn."""
    from actatlas.layout import LayoutConfig, _import_umap, compute_layout

    umap = _import_umap()   # the same numba cache set-up compute_layout uses
    warm, _ = synthetic(500, c, None, dtype=np.float32)
    compute_layout(warm, LayoutConfig(n_neighbors=15), progress=False)            # compile (small data)
    umap.UMAP(n_neighbors=15, random_state=0, n_jobs=1).fit_transform(warm)
    res = {"c": c, "rows": []}
    for n in sizes:
        x, _ = synthetic(n, c, None, seed=n, dtype=np.float32)
        if n > 4096:   # the nearest-neighbour descent path is compiled on first use at this size
            compute_layout(x[:5000], LayoutConfig(n_neighbors=n_neighbors, n_epochs=1), progress=False)
        t = time.perf_counter()
        plain = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                          random_state=0, n_jobs=1).fit_transform(x)
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        ours = compute_layout(x, LayoutConfig(n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
                                              seed=0), progress=False)
        t_ours = time.perf_counter() - t
        row = {"n": n, "umap_learn_s": round(t_plain, 2), "actatlas_s": round(t_ours, 2),
               "ratio": round(t_ours / t_plain, 3), "identical": bool(np.array_equal(plain, ours.raw))}
        res["rows"].append(row)
    print(f"\n### UMAP {n_neighbors}_{min_dist}_{metric}, c = {c}, numba warm, one thread (seeded)")
    print(_table(["n", "umap-learn s", "actatlas compute_layout s", "ratio", "identical embedding"],
                 [[f"{r['n']:,}", r["umap_learn_s"], r["actatlas_s"], r["ratio"], r["identical"]]
                  for r in res["rows"]]))
    return res


_JIT_CODE = """
import time, numpy as np
t = time.perf_counter()
x = np.maximum(np.random.default_rng(0).standard_normal(({n}, 32)) + 1, 0).astype(np.float32)
if {ours}:
    from actatlas.layout import LayoutConfig, compute_layout
    compute_layout(x, LayoutConfig(n_neighbors=15), progress=False)
else:
    import umap
    umap.UMAP(n_neighbors=15, min_dist=0.05, metric="cosine", random_state=0, n_jobs=1).fit_transform(x)
print(time.perf_counter() - t)
"""


def bench_jit(n: int = 300, cache_dir: str | None = None) -> dict:
    """Seconds of a fresh process (import + fit of n points) with a warm NUMBA_CACHE_DIR, run twice
    each (the first run fills the cache): plain umap-learn vs actatlas."""
    env = dict(os.environ)
    tmp = None
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory()
        cache_dir = tmp.name
    env["NUMBA_CACHE_DIR"] = cache_dir
    res = {"n": n}
    for name, ours in (("umap-learn", False), ("actatlas", True)):
        times = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _JIT_CODE.format(n=n, ours=ours)], env=env,
                                 capture_output=True, text=True, check=True)
            times.append(round(float(out.stdout.strip().splitlines()[-1]), 1))
        res[name] = {"first_s": times[0], "warm_s": times[1]}
    if tmp is not None:
        tmp.cleanup()
    print(f"\n### fresh process: import + UMAP fit of {n:,} points, NUMBA_CACHE_DIR shared")
    print(_table(["", "first run s (cache filling)", "later run s (cache warm)"],
                 [[k, res[k]["first_s"], res[k]["warm_s"]] for k in ("umap-learn", "actatlas")]))
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grid")
    g.add_argument("--n", type=int, default=1_000_000)
    g.add_argument("--c", type=int, default=512)
    g.add_argument("--levels", default="20,40,80,160")
    g.add_argument("--classes", type=int, default=0)
    g.add_argument("--ref-n", type=int, default=100_000)
    g.add_argument("--ref-G", type=int, default=80)
    g.add_argument("--chunk-rows", type=int, default=65536)
    lay = sub.add_parser("layout")
    lay.add_argument("--sizes", default="10000,100000")
    lay.add_argument("--c", type=int, default=64)
    j = sub.add_parser("jit")
    j.add_argument("--n", type=int, default=300)
    p.add_argument("--json", help="also write the result dict to this file")
    a = p.parse_args(argv)
    if a.what == "grid":
        res = bench_grid(a.n, a.c, tuple(int(v) for v in a.levels.split(",")), a.ref_n, a.ref_G, a.classes,
                         a.chunk_rows)
    elif a.what == "layout":
        res = bench_layout(tuple(int(v) for v in a.sizes.split(",")), a.c)
    else:
        res = bench_jit(a.n)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
