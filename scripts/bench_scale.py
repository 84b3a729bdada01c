"""The 1M-row stages at the article's scale, on synthetic data (for BENCHMARKS.md, `make bench-scale`).

    python scripts/bench_scale.py [--n 1000000] [--c 512] [--levels 20,40,80,160] [--stages whiten,grid,pca,layout]
                                  [--layout-sizes 30000,100000] [--fit 30000] [--transform 300000] [--threads 1]
                                  [--json bench-out/scale.json] [--keep DIR]

1. make:      a synthetic store: activations [n, c] float16 (ReLU of a 32-D cluster mixture, about half
              zeros like real post-ReLU layers) written chunk by chunk as .npy, plus a layout [n, 2].
2. whiten:    `whitening_matrix` over the memory-mapped store (chunked float64 second moment + eigh).
3. grid:      `grid_levels` at every level (means, top members) over the memory-mapped store.
4. pca:       the layout's PCA-50 pre-reduction of all n rows (chunked), i.e. UMAP's input at 1M.
5. layout-N:  `compute_layout` (UMAP, article settings, PCA-50) fitted on the first N rows, for each N
              (after a 5,000-row warm-up that pays numba's JIT; "umap_seconds" excludes it).
6. transform: UMAP fitted on `--fit` rows places `--transform` further rows (`LayoutConfig.fit_max`,
              the route to 1M); its rows/s gives the cost of placing the rest of 1M.

Every stage runs in a fresh subprocess and reports wall time, peak RSS (VmHWM) and the peak of
anonymous memory (RssAnon sampled every 20 ms: the process's own allocations, without the pages of
the mapped store). UMAP at 1M is extrapolated from the measured sizes (power law through the two
largest) and, for the fit-then-place route, as fit(largest N) + (n - N) / (rows/s of transform).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# inside a stage subprocess

class PeakSampler:
    """Samples RssAnon of this process every `every` seconds on a thread; `.peak_kb` after stop()."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak_kb, self._stop = every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> int:
        """RssAnon of this process in kB (0 where /proc does not tell)."""
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.read())
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak_kb = max(self.peak_kb, self.read())


def _hwm_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _write_npy_chunks(path: Path, shape: tuple, dtype, chunks) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        for part in chunks:
            f.write(np.ascontiguousarray(part, dtype=dtype).data)


def stage_make(d: Path, n: int, c: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    k, latent = 64, 32
    centers = rng.normal(size=(k, latent)) * 2.0
    w = rng.normal(size=(latent, c)) / np.sqrt(latent)
    bias = -0.1 * np.abs(rng.normal(size=c))
    labels = rng.integers(0, k, n)
    step = 65536

    def acts():
        for a in range(0, n, step):
            lab = labels[a:a + step]
            z = centers[lab] + 0.5 * rng.normal(size=(len(lab), latent))
            yield np.maximum(z @ w + bias, 0).astype(np.float16)

    _write_npy_chunks(d / "activations.npy", (n, c), np.float16, acts())
    # a layout in [0, 1]^2 from the cluster structure (the grid only needs plausible coordinates)
    pos = rng.random((k, 2)) * 0.8 + 0.1
    coords = np.clip(pos[labels] + 0.05 * rng.normal(size=(n, 2)), 0, 1).astype(np.float32)
    np.save(d / "coords.npy", coords)
    acts_mm = np.load(d / "activations.npy", mmap_mode="r")
    zero = float(np.mean(np.asarray(acts_mm[:100000]) == 0))
    return {"rows": n, "dims": c, "bytes": (d / "activations.npy").stat().st_size, "zero_fraction": round(zero, 3)}


def stage_whiten(d: Path) -> dict:
    from actatlas.whiten import whitening_matrix

    acts = np.load(d / "activations.npy", mmap_mode="r")
    w = whitening_matrix(acts)
    return {"S_finite": bool(np.isfinite(w.S).all()), "rows": w.n_rows}


def stage_grid(d: Path, levels: list[int]) -> dict:
    from actatlas.grid import grid_levels

    acts = np.load(d / "activations.npy", mmap_mode="r")
    coords = np.load(d / "coords.npy")
    lv = grid_levels(coords, acts, levels, min_count=6)
    return {"cells": {int(x.size): int(x.m) for x in lv}}


def stage_pca(d: Path) -> dict:
    from actatlas.layout import _pca_project

    acts = np.load(d / "activations.npy", mmap_mode="r")
    out = _pca_project(acts, 50, center=False, chunk_rows=65536)
    return {"shape": list(out.shape)}


def stage_layout(d: Path, rows: int, fit: int | None) -> dict:
    from actatlas.layout import LayoutConfig, compute_layout

    acts = np.load(d / "activations.npy", mmap_mode="r")
    # numba JIT first (fit 4,500 + place 500 rows: above umap-learn's 4,096-row exact-kNN cut-off, so
    # the NN-descent and transform kernels compile too); the timed run then measures the algorithm only
    t0 = time.perf_counter()
    compute_layout(acts[-5000:], LayoutConfig(pca_dims=50, fit_max=4500), progress=False)
    jit = time.perf_counter() - t0
    cfg = LayoutConfig(pca_dims=50, fit_max=fit)
    lay = compute_layout(acts[:rows], cfg, progress=False)
    return {"rows": rows, "fit_rows": lay.params.get("n_fit"), "umap_seconds": round(lay.seconds, 2),
            "jit_and_warmup_seconds": round(jit, 2), "engine": lay.engine}


def run_stage(argv: list[str]) -> None:
    """Child entry: run one stage, print one JSON line with seconds and memory."""
    name, d = argv[0], Path(argv[1])
    t0 = time.perf_counter()
    with PeakSampler() as ps:
        if name == "make":
            info = stage_make(d, int(argv[2]), int(argv[3]))
        elif name == "whiten":
            info = stage_whiten(d)
        elif name == "grid":
            info = stage_grid(d, [int(x) for x in argv[2].split(",")])
        elif name == "pca":
            info = stage_pca(d)
        elif name == "layout":
            info = stage_layout(d, int(argv[2]), int(argv[3]) if argv[3] != "none" else None)
        else:
            raise SystemExit(f"unknown stage {name}")
    print(json.dumps({"stage": name, "seconds": round(time.perf_counter() - t0, 2),
                      "peak_rss_mb": round(_hwm_kb() / 1024), "peak_anon_mb": round(ps.peak_kb / 1024),
                      **info}))


# ----------------------------------------------------------------------------------------------
# driver


THREADS = 1


def child(args: list[str], label: str) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(THREADS)
    env.setdefault("NUMBA_CACHE_DIR", str(HERE.parent / ".cache" / "numba"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stage", *args], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"stage {label} failed:\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["label"] = label
    res["process_seconds"] = round(time.perf_counter() - t0, 2)
    umap = f"   (UMAP itself {res['umap_seconds']:.1f} s)" if "umap_seconds" in res else ""
    print(f"  {label:<32} {res['seconds']:>8.1f} s   peak RSS {res['peak_rss_mb']:>6} MB   "
          f"peak anon {res['peak_anon_mb']:>6} MB{umap}", flush=True)
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stage":
        run_stage(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--c", type=int, default=512)
    ap.add_argument("--levels", default="20,40,80,160")
    ap.add_argument("--layout-sizes", default="30000,100000", help="UMAP fitted on all of these many rows")
    ap.add_argument("--fit", type=int, default=30000, help="fit rows of the fit-then-place measurement")
    ap.add_argument("--transform", type=int, default=300000, help="total rows of that measurement")
    ap.add_argument("--json", default="bench-out/scale.json")
    ap.add_argument("--keep", default=None, help="keep the synthetic store in this folder (reused if there)")
    ap.add_argument("--stages", default="whiten,grid,pca,layout", help="stages to run (the store is made when missing)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP/numba threads per stage (default 1: on a shared 2-core box two "
                         "threads made the chunked matmuls 3x slower)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads

    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="actatlas-scale-"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"bench-scale: {args.n:,} x {args.c} float16 in {d} ({args.threads} thread(s) per stage; "
          f"{os.cpu_count()} cores)")
    results = []
    try:
        if not (d / "activations.npy").is_file():
            results.append(child(["make", str(d), str(args.n), str(args.c)], "make store"))
        stages = set(args.stages.split(","))
        if "whiten" in stages:
            results.append(child(["whiten", str(d)], "whiten"))
        if "grid" in stages:
            results.append(child(["grid", str(d), args.levels], f"grid {args.levels}"))
        if "pca" in stages:
            results.append(child(["pca", str(d)], "PCA-50 of all rows"))
        tr = None
        if "layout" in stages:
            for s in [int(x) for x in args.layout_sizes.split(",") if x]:
                results.append(child(["layout", str(d), str(s), "none"], f"UMAP fit {s:,}"))
            tr = child(["layout", str(d), str(args.transform), str(args.fit)],
                       f"UMAP fit {args.fit:,} + place {args.transform - args.fit:,}")
            results.append(tr)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    # extrapolations to n rows
    fits = {r["rows"]: r["umap_seconds"] for r in results if r["stage"] == "layout" and r["fit_rows"] == r["rows"]}
    extra = {}
    if len(fits) >= 2:
        (n1, t1), (n2, t2) = sorted(fits.items())[-2:]
        b = np.log(t2 / t1) / np.log(n2 / n1)
        extra["umap_full_fit_exponent"] = round(float(b), 2)
        extra["umap_full_fit_at_n_s"] = round(float(t2 * (args.n / n2) ** b))
    fit_t = fits.get(args.fit)
    if fit_t is not None and tr is not None:
        place = tr["umap_seconds"] - fit_t
        rate = (args.transform - args.fit) / max(place, 1e-9)
        extra["transform_rows_per_s"] = round(rate)
        big = max(fits)
        extra["fit_then_place_at_n_s"] = round(fits[big] + (args.n - big) / rate)
        extra["fit_then_place_fit_rows"] = big
    summary = {"n": args.n, "c": args.c, "stages": results, "extrapolation": extra}
    print("extrapolation to n =", f"{args.n:,}:", json.dumps(extra))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
