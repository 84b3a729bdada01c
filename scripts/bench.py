"""`make bench`: measured throughput figures for BENCHMARKS.md.

Collection: images/s of `actatlas collect` with attributions off and on, against the model's pure
forward throughput (pre-decoded tensors, same batch size, same machine, same process) as ratios.

    python scripts/bench.py [--images DIR|sample:N] [--n 256] [--batch-size 32] [--layer blocks.8]
                            [--attributions none,full] [--repeat 3] [--large 4000x3000] [--no-draft]

``--repeat K`` alternates K forward and K collect runs and reports the best of each (the box is
shared, so other work only ever slows a run down), plus each one's CPU time per image (all threads of
this process), whose ratio does not depend on other load.

``--large WxH`` first writes the first N images upscaled (bicubic) to W x H (H x W for portrait
photos) as quality-90 JPEGs into a temporary folder (camera-sized photos, e.g. 12 MP) and benchmarks
on those. ``--no-draft`` decodes JPEGs at full size (no DCT-domain downscaling), as before draft
decoding existed.

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


def make_large(source, size: str, folder: Path) -> list[str]:
    """Upscale the images of `source` to W x H (H x W for portrait) JPEGs in `folder`; their paths."""
    from PIL import Image

    W, H = (int(v) for v in size.lower().split("x"))
    paths = []
    for k, item in enumerate(source):
        img = source.load(item)
        w, h = img.size
        target = (W, H) if w >= h else (H, W)
        out = folder / f"{k:05d}_{Path(item.path).stem}.jpg"
        img.resize(target, Image.Resampling.BICUBIC).save(out, quality=90)
        paths.append(str(out))
    return paths


def bench_collect(args) -> dict:
    if args.no_draft:  # the collect loader as before draft decoding: every image at full size
        import actatlas.batches

        actatlas.batches.load_for = lambda source, preprocess, item: source.load(item)
    spec = aa.load_model(args.model)
    source = aa.images(args.images).head(args.n)
    if args.large:
        tmp = Path(tempfile.mkdtemp(prefix="bench-large-"))
        args._cleanup = tmp
        t0 = time.perf_counter()
        source = aa.images(make_large(source, args.large, tmp))
        print(f"wrote {len(source)} {args.large} JPEGs to {tmp} in {time.perf_counter() - t0:.0f} s", flush=True)
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
    for attributions in args.attributions.split(","):
        fwds, cols, fwd_cpu, col_cpu = [], [], [], []
        for _ in range(args.repeat):  # alternate, keep the best of each (other load only slows runs down)
            c0 = time.process_time()
            fwds.append(pure_forward(spec, pixels, args.batch_size))
            fwd_cpu.append((time.process_time() - c0) / len(pixels))
            with tempfile.TemporaryDirectory() as tmp:
                c0 = time.process_time()
                res = aa.collect(spec, source, Path(tmp) / "run", layers=[results["layer"]],
                                 attributions=attributions, batch_size=args.batch_size, progress=False)
                col_cpu.append((time.process_time() - c0) / len(source))
            cols.append(res.images_per_s)
        fwd, col = max(fwds), max(cols)
        rows.append({"attributions": attributions, "forward_images_per_s": fwd,
                     "collect_images_per_s": col, "ratio": col / fwd, "cost_vs_forward": fwd / col,
                     "all_forward_images_per_s": fwds, "all_collect_images_per_s": cols,
                     # CPU seconds per image (this process, all threads): robust to other load
                     "cpu_ratio": min(fwd_cpu) / min(col_cpu), "forward_cpu_ms": 1000 * min(fwd_cpu),
                     "collect_cpu_ms": 1000 * min(col_cpu)})
    results["runs"] = rows
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--images", default=str(SHARED) if SHARED.is_dir() else "sample:256")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layer", default=None)
    ap.add_argument("--attributions", default="none,full", help="comma-separated runs (default: %(default)s)")
    ap.add_argument("--large", default=None, metavar="WxH",
                    help="benchmark on the images upscaled to W x H JPEGs (e.g. 4000x3000, 12 MP)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="forward and collect runs, alternated; the best of each is reported (default 1)")
    ap.add_argument("--no-draft", action="store_true",
                    help="decode JPEGs at full size in collect (no DCT-domain downscaling; the 'before' figure)")
    ap.add_argument("--out", default=str(REPO / "bench-out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args._cleanup = None
    try:
        res = bench_collect(args)
    finally:
        if args._cleanup is not None:
            shutil.rmtree(args._cleanup, ignore_errors=True)
    res["large"] = args.large
    res["draft"] = not args.no_draft
    (out / "collect.json").write_text(json.dumps(res, indent=2))
    what = f"{args.large} JPEGs" if args.large else "images"
    print(f"\n## Collection throughput ({res['model']}, layer {res['layer']}, {res['n_images']} {what}, "
          f"{'draft' if res['draft'] else 'no draft'}, "
          f"batch {res['batch_size']}, {res['threads']} threads, {res['machine']})\n")
    print("| attributions | pure forward img/s | collect img/s | collect / forward | cost vs forward | "
          "CPU ms/img forward, collect | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        print(f"| {r['attributions']} | {r['forward_images_per_s']:.1f} | {r['collect_images_per_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['cost_vs_forward']:.2f}x | {r['forward_cpu_ms']:.1f}, "
              f"{r['collect_cpu_ms']:.1f} | {r['cpu_ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
