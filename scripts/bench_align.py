"""Cost of an aligned layout against the layers' independent layouts (issue 13; BENCHMARKS.md "Aligned layouts").

    python scripts/bench_align.py [--sizes 10000,30000] [--epochs N] [--dims 40,112,192,320]
                                  [--run RUN --layers a,b,c,d] [--stock 10000] [--json bench-out/align.json]

For each size n: the 4 layers' independent layouts (``compute_layout``, the article's UMAP settings:
50 neighbours, min_dist 0.05, cosine, seed 0), each in its own fresh subprocess, and their aligned
layout (``compute_aligned_layouts``, the same settings, AlignedUMAP's window 3 and lambda 0.01) in one
more. Every subprocess first lays out 1,000 rows (numba's JIT and disk cache paid there) and then
measures the call at n rows: its wall time, and the peak of the process's anonymous memory (RssAnon,
sampled every 20 ms) above what it held before the call. Epochs: each method's default (umap-learn's
UMAP: 500 up to 10,000 rows, 200 above; AlignedUMAP: 200), or ``--epochs N`` for all. Reported: aligned seconds / the sum of the
independent seconds (the issue's goal: <= 1.5), and the aligned peak against the largest and the sum
of the independent peaks.

Data: synthetic activations shaped like EfficientNet-Lite0's blocks.4/8/12/15 (40, 112, 192, 320
channels): one 16-D mixture of 30 clusters per sample, sent through a random expanding linear map per
layer (each layer's map mixes the previous layer's input with fresh directions) and a ReLU, so the
layers share structure as a network's layers do. ``--run RUN --layers ...``: real activations from a run
collected with shared locations (its first n rows).

The layouts themselves are kept (in a temporary folder) and compared as ``summary.json["alignment"]``
compares them (`actatlas.alignment.pair_measure`, displacement only): how far a sample moves between
consecutive layers' maps, aligned vs independent after Procrustes, and by chance.

``--stock N``: also time a bare ``AlignedUMAP.fit_transform`` call at N rows (the call the aligned
layout makes, without its normalisation and bookkeeping), in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))   # this checkout's actatlas, as in the measuring subprocesses


from bench_scale import PeakSampler  # noqa: E402  (scripts/ is on sys.path: run as a script)


def synthetic(n: int, dims: list[int], seed: int = 0) -> list[np.ndarray]:
    """float32 [n, c] per layer (module docstring)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, 16)) * 3
    z = centres[rng.integers(0, 30, n)] + rng.normal(size=(n, 16))
    out, h = [], z
    for c in dims:
        w = rng.normal(size=(h.shape[1], c)) / np.sqrt(h.shape[1])
        h = np.maximum(h @ w + 0.3 * rng.normal(size=(n, c)), 0)
        out.append(h.astype(np.float32))
    return out


def load_data(args, n: int) -> list[np.ndarray]:
    if args.run:
        import actatlas as aa

        run = aa.open_run(args.run)
        return [np.asarray(run.activations(ly)[:n], np.float32) for ly in args.layers.split(",")]
    return synthetic(n, [int(d) for d in args.dims.split(",")])


# ----------------------------------------------------------------------------------------------
# one measurement, in a subprocess

def measure(args) -> dict:
    import actatlas as aa
    from actatlas.layout import AlignConfig, compute_aligned_layouts, compute_layout

    aa.enable_numba_cache()
    cfg = aa.LayoutConfig(n_epochs=args.epochs)
    n = args.n
    data = load_data(args, n)
    warm = [x[:1000] for x in data]
    keep = None
    if args.what == "stock":
        import warnings

        from umap.aligned_umap import AlignedUMAP

        warnings.filterwarnings("ignore")

        def call(xs):
            rel = [{i: i for i in range(len(xs[0]))}] * (len(xs) - 1)
            AlignedUMAP(n_neighbors=min(50, len(xs[0]) - 1), min_dist=0.05, metric="cosine", random_state=0,
                        transform_seed=0, low_memory=True, n_epochs=args.epochs).fit_transform(xs, relations=rel)
    elif args.what == "aligned":
        def call(xs):
            return np.stack([la.coords for la in compute_aligned_layouts(xs, cfg, AlignConfig(), progress=False)])
    else:
        k = int(args.what)

        def call(xs):
            return compute_layout(xs[k], cfg, progress=False).coords
    call(warm)
    base = PeakSampler.read()
    t0 = time.perf_counter()
    with PeakSampler() as ps:
        keep = call(data)
    if args.save and keep is not None:
        np.save(Path(args.save) / f"{args.what}-{n}.npy", keep)
    return {"what": args.what, "n": n, "seconds": round(time.perf_counter() - t0, 2),
            "peak_anon_mb": round((ps.peak_kb - base) / 1024, 1), "held_before_mb": round(base / 1024, 1)}


def run_one(what: str, n: int, args, save: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--measure", what, "--n", str(n), "--dims", args.dims]
    if save:
        cmd += ["--save", save]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.run:
        cmd += ["--run", args.run, "--layers", args.layers]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{what} at n={n} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {what:>9} n={n}: {out['seconds']:8.1f} s, peak +{out['peak_anon_mb']:7.1f} MB", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000", help="rows per layer, comma-separated (default: %(default)s)")
    p.add_argument("--dims", default="40,112,192,320", help="channels of the synthetic layers")
    p.add_argument("--epochs", type=int, default=None, help="SGD epochs of every layout (default: each method's)")
    p.add_argument("--run", help="take real activations from this run (collected with shared locations)")
    p.add_argument("--layers", help="the run's layers, comma-separated, in aligned order")
    p.add_argument("--stock", type=int, default=0, help="also time umap-learn's AlignedUMAP at this many rows")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        args.what = args.measure
        print(json.dumps(measure(args)))
        return
    n_layers = len(args.layers.split(",")) if args.run else len(args.dims.split(","))
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        print(f"n = {n}, {n_layers} layers", flush=True)
        tmp = tempfile.mkdtemp(prefix="bench-align-")
        indep = [run_one(str(k), n, args, tmp) for k in range(n_layers)]
        al = run_one("aligned", n, args, tmp)
        s_sum = sum(r["seconds"] for r in indep)
        row = {"n": n, "layers": n_layers, "independent": indep, "aligned": al,
               "independent_seconds_sum": round(s_sum, 2), "time_ratio": round(al["seconds"] / s_sum, 3),
               "independent_peak_max_mb": max(r["peak_anon_mb"] for r in indep),
               "independent_peak_sum_mb": round(sum(r["peak_anon_mb"] for r in indep), 1),
               "aligned_peak_mb": al["peak_anon_mb"]}
        row["memory_ratio_to_sum"] = round(row["aligned_peak_mb"] / max(row["independent_peak_sum_mb"], 1e-9), 3)
        from actatlas.alignment import pair_measure

        aligned_coords = np.load(Path(tmp) / f"aligned-{n}.npy")
        own = [np.load(Path(tmp) / f"{k}-{n}.npy") for k in range(n_layers)]
        row["displacement"] = [pair_measure((aligned_coords[k], aligned_coords[k + 1]), (own[k], own[k + 1]), None,
                                            10, 6)["displacement"] for k in range(n_layers - 1)]
        shutil.rmtree(tmp, ignore_errors=True)
        results.append(row)
        print(f"  aligned / sum of independent: time {row['time_ratio']:.2f}x; peak memory {row['aligned_peak_mb']:.0f} MB "
              f"vs {row['independent_peak_sum_mb']:.0f} MB summed ({row['independent_peak_max_mb']:.0f} MB largest)",
              flush=True)
        for k, d in enumerate(row["displacement"]):
            print(f"  displacement {k}->{k + 1}: aligned {d['aligned']:.3f}, independent after Procrustes "
                  f"{d['independent_after_procrustes']:.3f}, chance {d['chance']:.3f}", flush=True)
    if args.stock:
        print(f"umap-learn's AlignedUMAP at n = {args.stock}", flush=True)
        results.append({"stock": run_one("stock", args.stock, args)})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "epochs": args.epochs, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
