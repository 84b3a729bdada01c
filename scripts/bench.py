"""`make bench`: measured throughput figures for BENCHMARKS.md.

Collection: images/s of `actatlas collect` with attributions off and on, against the model's pure
forward throughput (pre-decoded tensors, same batch size, same machine, same process) as ratios.

    python scripts/bench.py [--images DIR|sample:N] [--n 256] [--batch-size 32] [--layer blocks.8]

Prints a Markdown table and writes bench-out/collect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import actatlas as aa

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "imagenet-sample"


def pure_forward(spec, pixels: torch.Tensor, batch_size: int, repeats: int = 1) -> float:
    """images/s of the bare model forward (normalize + network) on pre-decoded uint8 pixels."""
    with torch.inference_mode():
        x = spec.preprocess.normalize(pixels[:batch_size])
        spec.module(x)  # warm-up (oneDNN set-up for this shape)
        t0 = time.perf_counter()
        n = 0
        for _ in range(repeats):
            for a in range(0, len(pixels), batch_size):
                x = spec.preprocess.normalize(pixels[a:a + batch_size])
                if spec.info.get("channels_last"):
                    x = x.contiguous(memory_format=torch.channels_last)
                spec.module(x)
                n += len(x)
    return n / (time.perf_counter() - t0)


def bench_collect(args) -> dict:
    spec = aa.load_model(args.model)
    source = aa.images(args.images).head(args.n)
    pixels = torch.from_numpy(np.stack([spec.preprocess.to_uint8(source.load(it)) for it in source]))
    results = {"model": spec.name, "layer": args.layer or spec.default_layer, "n_images": len(source),
               "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "images": source.description, "machine": f"{platform.processor() or platform.machine()}, "
                                                        f"{os.cpu_count()} cores"}
    # warm the collect path once (imports, oneDNN shapes) on a few images
    with tempfile.TemporaryDirectory() as tmp:
        aa.collect(spec, source.head(args.batch_size), Path(tmp) / "w", layers=[results["layer"]],
                   attributions="full", batch_size=args.batch_size, progress=False)
    rows = []
    for attributions in ("none", "full"):
        fwd = pure_forward(spec, pixels, args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            res = aa.collect(spec, source, Path(tmp) / "run", layers=[results["layer"]],
                             attributions=attributions, batch_size=args.batch_size, progress=False)
        rows.append({"attributions": attributions, "forward_images_per_s": fwd,
                     "collect_images_per_s": res.images_per_s, "ratio": res.images_per_s / fwd,
                     "cost_vs_forward": fwd / res.images_per_s})
    results["runs"] = rows
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--images", default=str(SHARED) if SHARED.is_dir() else "sample:256")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layer", default=None)
    ap.add_argument("--out", default=str(REPO / "bench-out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = bench_collect(args)
    (out / "collect.json").write_text(json.dumps(res, indent=2))
    print(f"\n## Collection throughput ({res['model']}, layer {res['layer']}, {res['n_images']} images, "
          f"batch {res['batch_size']}, {res['threads']} threads, {res['machine']})\n")
    print("| attributions | pure forward img/s | collect img/s | collect / forward | cost vs forward |")
    print("|---|---|---|---|---|")
    for r in res["runs"]:
        print(f"| {r['attributions']} | {r['forward_images_per_s']:.1f} | {r['collect_images_per_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['cost_vs_forward']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
