"""Icon rendering benchmark (BENCHMARKS.md, atlas-core issue).

1. speed: icons/s batched vs one icon at a time (same steps, model, layer), and the fraction of this
   machine's fp32 matmul roof that a batched step achieves (performance.md: the 5x batched goal is not
   reachable on a 2-core CPU; the CPU goal is >= 70% of the roof at batch >= 8);
2. fidelity: mean icon fidelity vs mean best-real-member fidelity of an atlas built on the shared
   ImageNet sample (or on the bundled photos when it is absent).

    python scripts/bench_render.py [--speed] [--fidelity] [--steps 32] [--icons 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import actatlas as aa
from actatlas.render import RenderConfig, render_icons

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "imagenet-sample"


def matmul_roof(threads: int, n: int = 1024, reps: int = 20) -> float:
    """Measured fp32 GFLOP/s of a square matmul on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def step_flops(spec, layer: str, batch: int, size: int) -> float:
    """FLOPs of one optimisation step (forward to `layer` + input-gradient backward) at the network input."""
    from torch.utils.flop_counter import FlopCounterMode

    from actatlas.render import forward_to_layers

    x = torch.rand(batch, 3, size, size, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        acts = forward_to_layers(spec.module, spec.preprocess.normalize(x), [layer])[layer]
        acts.sum().backward()
    return float(fc.get_total_flops())


def bench_speed(steps: int, n_icons: int, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    spec = aa.load_model("efficientnet_lite0")
    run_dirs = np.random.default_rng(0).standard_normal((n_icons, 112)).astype(np.float32)
    res = {"steps": steps, "icons": n_icons, "threads": threads, "layer": "blocks.8"}
    base = dataclasses.replace(RenderConfig.cpu_default(), steps=steps, whiten=False)
    for bs in (1, 8, 16):
        cfg = dataclasses.replace(base, batch_size=bs)
        render_icons(spec, "blocks.8", run_dirs[:bs], cfg, progress=False)  # warm shapes
        t0 = time.perf_counter()
        render_icons(spec, "blocks.8", run_dirs, cfg, progress=False)
        sec = time.perf_counter() - t0
        res[f"batch{bs}_icons_per_s"] = n_icons / sec
        res[f"batch{bs}_ms_per_step"] = 1000 * sec / (steps * -(-n_icons // bs))
    # network input size of the recipe chain at icon size P is P (crop_or_pad_to)
    flops8 = step_flops(spec, "blocks.8", 8, base.icon_size)
    roof = matmul_roof(threads)
    res["gflop_per_step_batch8"] = flops8 / 1e9
    res["matmul_roof_gflops"] = roof
    res["roof_fraction_batch8"] = flops8 / 1e9 / (res["batch8_ms_per_step"] / 1000) / roof
    res["batched_vs_single"] = res["batch8_icons_per_s"] / res["batch1_icons_per_s"]
    return res


def bench_fidelity(out: Path, n_images: int) -> dict:
    import actatlas as aa

    images = str(SHARED) if SHARED.is_dir() else f"sample:{n_images}"
    atlas = aa.build_atlas(images, out=out, model="efficientnet_lite0", limit=n_images, levels=(10, 20),
                           collect=aa.CollectConfig(per_image=2))
    s = atlas.summary
    return {"images": images, "samples": s["samples"], "levels": s["levels"],
            "mean_icon_fidelity": s["mean_icon_fidelity"], "mean_member_fidelity": s["mean_member_fidelity"],
            "seconds": s["seconds_recorded"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--fidelity", action="store_true")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--icons", type=int, default=16)
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--out", default=str(REPO / "bench-out"))
    args = ap.parse_args()
    if not (args.speed or args.fidelity):
        args.speed = args.fidelity = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        r = bench_speed(args.steps, args.icons)
        (out / "render_speed.json").write_text(json.dumps(r, indent=2))
        print(f"\n## Render speed (efficientnet_lite0 blocks.8, {r['steps']} steps, {r['icons']} icons, "
              f"{r['threads']} threads)\n")
        print("| icons per batch | ms/step | icons/s |\n|---|---|---|")
        for bs in (1, 8, 16):
            print(f"| {bs} | {r[f'batch{bs}_ms_per_step']:.0f} | {r[f'batch{bs}_icons_per_s']:.2f} |")
        print(f"\nbatched (8) / single: {r['batched_vs_single']:.1f}x; one batch-8 step = "
              f"{r['gflop_per_step_batch8']:.2f} GFLOP; matmul roof {r['matmul_roof_gflops']:.0f} GFLOP/s; "
              f"achieved {100 * r['roof_fraction_batch8']:.0f}% of the roof")
    if args.fidelity:
        r = bench_fidelity(out / "fidelity-run", args.n_images)
        (out / "render_fidelity.json").write_text(json.dumps(r, indent=2))
        print(f"\n## Icon fidelity ({r['images']}, {r['samples']} samples)\n")
        print("| level | cells | mean icon fidelity | mean best-member fidelity |\n|---|---|---|---|")
        for lv in r["levels"]:
            print(f"| {lv['size']} | {lv['cells']} | {lv['icon_fidelity']:.3f} | {lv['member_fidelity']:.3f} |")
        print(f"| all | | {r['mean_icon_fidelity']:.3f} | {r['mean_member_fidelity']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
