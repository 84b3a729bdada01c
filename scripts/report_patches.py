"""Issue 5 report: candidate patch cells and found patches on EfficientNet-Lite0, written to docs/results.md.

Reruns end to end (the collect is skipped when the run is already complete):

    NUMBA_CACHE_DIR=.cache/numba .venv/bin/python scripts/report_patches.py

1. ``actatlas collect`` of the shared ImageNet sample (1000 photos, one per class) at a late layer
   (default ``blocks.15``, the last block before the head; 7x7 map, 4 random positions per image) with
   full attributions.
2. For grey whale vs great white shark, snorkel vs scuba diver and frying pan vs wok (method.md §3.3):
   the two-class comparison, its candidate patch cells, and ``find_patches`` (each candidate rendered as
   a patch and attacked against the noise control, method.md §4.3).
3. docs/results.md: the candidates, the ranked patches' static / dynamic success next to the noise
   control, and the article's InceptionV1 numbers.

With one image per class the source class has one photo, so every attack falls back to all correctly
classified photos of other classes (a seeded random subset of --max-images), as the report says.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("grey whale", "great white shark", "baseball"), ("snorkel", "scuba diver", "steam locomotive"),
         ("frying pan", "wok", "carbonara")]
# method.md §4.3: InceptionV1, 10 hand-made patches per comparison, 1000 train images of the source class
ARTICLE = {
    "grey whale": dict(static=18.8, dynamic=40.5, noise_static=4.3, noise_dynamic=11.3, correct=874),
    "snorkel": dict(static=65.4, dynamic=85.0, noise_static=4.2, noise_dynamic=13.9, correct=827),
    "frying pan": dict(static=25.6, dynamic=44.9, noise_static=4.6, noise_dynamic=18.3, correct=624),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default="/work/shared/data/imagenet-sample")
    p.add_argument("--run", default="runs/patches-lite0")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--layer", default="blocks.15")
    p.add_argument("--per-image", type=int, default=4)
    p.add_argument("--top", type=int, default=500, help="comparison: top rows per class")
    p.add_argument("--grid", type=int, default=10)
    p.add_argument("--max-candidates", type=int, default=4)
    p.add_argument("--patch-px", type=int, default=128)
    p.add_argument("--render-steps", type=int, default=128)
    p.add_argument("--sizes", default="0.2,0.3,0.4,0.5")
    p.add_argument("--corners", type=int, default=4)
    p.add_argument("--max-images", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def pct(v, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def pp(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} pp"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    torch.set_num_threads(args.threads)
    command = "NUMBA_CACHE_DIR=.cache/numba .venv/bin/python scripts/report_patches.py" + (
        " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) if (
            argv if argv is not None else sys.argv[1:]) else "")
    t_all = time.perf_counter()

    import actatlas as aa
    from actatlas.analysis.attack import ImageBank, find_patches, labelled_images
    from actatlas.models.spec import resolve_class

    # 1. collect (skipped when complete)
    collect_cmd = [str(ROOT / ".venv" / "bin" / "actatlas"), "collect", "--model", args.model, "--images",
                   args.images, "--out", args.run, "--layers", args.layer, "--per-image", str(args.per_image),
                   "--attributions", "full", "--threads", str(args.threads), "--quiet"]
    t0 = time.perf_counter()
    res = subprocess.run(collect_cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return res.returncode
    collect_note = res.stdout.strip().splitlines()[-1]
    t_collect = time.perf_counter() - t0
    print(collect_note, flush=True)
    run = aa.open_run(args.run)
    recorded_collect_s = run.manifest.get("stages", {}).get("collect", {}).get("seconds")
    names = run.class_names

    # 2. comparisons + find-patches, one image bank (decoded and classified once)
    spec = aa.load_model(args.model)
    bank = ImageBank(spec, labelled_images(args.images, spec), batch_size=32, progress=not args.quiet)
    sizes = [float(s) for s in args.sizes.split(",")]
    results = []
    for left, right, article_cls in PAIRS:
        L, R = resolve_class(left, names, run.wnids), resolve_class(right, names, run.wnids)
        out = Path(args.run) / "patches" / args.layer / f"{L}-vs-{R}"
        t0 = time.perf_counter()
        fp = find_patches(args.run, args.layer, L, R, images=bank, spec=spec, max_candidates=args.max_candidates,
                          patch_px=args.patch_px, render_steps=args.render_steps, sizes=sizes, corners=args.corners,
                          max_images=args.max_images, top=args.top, grid=args.grid, seed=args.seed, out=out,
                          progress=not args.quiet)
        secs = time.perf_counter() - t0
        print(f"{left} vs {right}: {len(fp.candidates)} candidates, {len(fp.ranking)} evaluated, {secs:.0f} s",
              flush=True)
        results.append(dict(left=left, right=right, L=L, R=R, article_cls=article_cls, fp=fp, out=out, seconds=secs))

    # baseline: the one sample photo of each class
    base = {}
    for left, right, _ in PAIRS:
        for name in (left, right):
            c = resolve_class(name, names, run.wnids)
            idx = [k for k in np.flatnonzero(bank.images.labels == c)]
            ok = bank.load(idx)
            base[name] = [(Path(bank.images.paths[k]).name, names[bank.pred(k)], float(bank.probs[k][c]))
                          for k in ok]
    total = time.perf_counter() - t_all
    write_report(args, command, collect_note, t_collect, recorded_collect_s, results, base, total, run, bank)
    print(f"wrote {args.out} ({total:.0f} s)")
    return 0


def write_report(args, command, collect_note, t_collect, recorded_collect_s, results, base, total, run, bank):
    names = run.class_names
    n_correct = sum(1 for k in bank.probs if bank.images.labels[k] >= 0 and bank.pred(k) == bank.images.labels[k])
    L = []
    w = L.append
    w("# Patch attacks found from atlas comparisons: EfficientNet-Lite0 on the shared ImageNet sample\n")
    w("Measured by (rerunnable; the collect is skipped when the run is complete):\n")
    w("```bash\n" + command + "\n```\n")
    w(f"Measured {datetime.date.today().isoformat()} on {platform.machine()} CPU, {args.threads} torch threads "
      f"(a shared 2-core machine), total {total / 60:.1f} min for this invocation"
      + (f"; the collect itself took {recorded_collect_s:.0f} s when it ran" if recorded_collect_s else "")
      + ". Per comparison: " + ", ".join(f"{r['left']} vs {r['right']} {r['seconds']:.0f} s" for r in results)
      + ".\n")
    w("## Set-up\n")
    w(f"- Model `{args.model}`, layer `{args.layer}` (the last block before the 1x1 head conv, 320 x 7 x 7), "
      f"collected with `actatlas collect --layers {args.layer} --per-image {args.per_image} --attributions full` "
      f"from `{args.images}` (1000 photos, one per class): {sum(run.summary['rows'].values())} activation "
      f"vectors with full 1000-class attributions. {collect_note}.")
    w(f"- The model classifies {n_correct} of the {len(bank.probs)} photos correctly (top-1).")
    w(f"- Comparison (method.md §3.3): top {args.top} rows per class by attribution + winner rows (the article "
      f"uses 2000 of 1,000,000; {args.top} of {sum(run.summary['rows'].values())} is already a far larger "
      f"share), 1-D t-SNE for y, {args.grid} x {args.grid} grid, cells with >= 4 rows. Candidate = a cell on "
      f"one class's half whose top attributed class is a third class.")
    w(f"- Patches: up to {args.max_candidates} candidates per comparison (alternating sides), each cell's mean "
      f"activation rendered as a {args.patch_px} px icon ({args.render_steps} steps, whitened, the project's "
      f"CPU render settings). A right-side candidate attacks left -> right, a left-side one right -> left.")
    w(f"- Attack (method.md §4.3): sizes {args.sizes} of the 224 px side, {args.corners} corners; static = "
      f"the one (size, corner) with most flips over all images, dynamic = any (size, corner) flips the image; "
      f"control = a uniform-noise patch on the same images, sizes and corners. Score = static success - noise "
      f"static success.")
    w(f"- **Source images (fallback).** The sample has ONE photo per class, so no source class reaches the "
      f"5 correctly classified images an attack needs; every attack falls back to photos of all other classes "
      f"that the model classifies correctly (excluding the target class), a seeded random {args.max_images} of "
      f"them per direction. These attacks therefore ask \"does this patch turn an arbitrary photo into the "
      f"target class\", which is harder than the article's \"turn a snorkel photo into scuba diver\".\n")
    w("One-photo baseline of the six classes (file, top-1 prediction, probability of its own class):\n")
    w("| class | photo | top-1 | p(own class) |\n|---|---|---|---|")
    for name, rows in base.items():
        for f, pred, p in rows:
            w(f"| {name} | {f} | {pred} | {pct(p)} |")
    w("")

    w("## Candidate patch cells\n")
    w("All candidate cells of each comparison, strongest attribution to the third class first "
      "(side = the class half the cell lies on; n = activation vectors in the cell; value = mean attribution "
      "to the top class).\n")
    for r in results:
        fp = r["fp"]
        art = [c for c in fp.candidates if c["top_name"] == r["article_cls"]]
        w(f"### {r['left']} (left) vs {r['right']} (right): {len(fp.candidates)} candidates\n")
        w("| side | cell (i, j) | n | top class | value |\n|---|---|---|---|---|")
        for c in fp.candidates[:15]:
            w(f"| {c['side']} ({c['side'] == 'left' and r['left'] or r['right']}) | ({c['i']}, {c['j']}) | {c['n']} "
              f"| {c['top_name']} | {c['value']:.3f} |")
        if len(fp.candidates) > 15:
            w(f"| ... | {len(fp.candidates) - 15} more in `{fp.paths.get('json')}` | | | |")
        w("")
        w(f"The article's cell for this pair (a {r['right']}-side cell whose top class is "
          f"\"{r['article_cls']}\", method.md §7.B6): "
          + ("**found**: " + ", ".join(f"({c['i']}, {c['j']}) on the {c['side']} side" for c in art)
             if art else "not among the candidates at this layer of this model") + ".\n")

    w("## Found patches: success against the noise control\n")
    w("Per evaluated candidate (ranked by score within the comparison). Rates are flipped / correctly "
      "classified source images.\n")
    pooled = dict(s=0, d=0, n=0, ns=0, nd=0)
    best_rows = []
    for r in results:
        fp = r["fp"]
        w(f"### {r['left']} vs {r['right']}\n")
        for key, s in fp.attack_sets.items():
            nz = s["noise"]
            w(f"- {key}: {s['images_used']} source images of {s['source_classes']} classes "
              f"({'fallback: ' if s['source_fallback'] else ''}{s['note']}); noise control: static "
              f"{pct(nz['static_success'])}, dynamic {pct(nz['dynamic_success'])}, p(target) "
              f"{pct(nz['p_target_before'], 2)} -> {pct(nz['p_target_after'], 2)}")
        w("")
        w("| rank | side | cell | top class | attack | static | noise static | dynamic | noise dynamic | "
          "score | p(target) before -> after (static) | noise p(target) after | static size, corner | "
          "icon fidelity |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for e in fp.ranking:
            w(f"| {e['rank']} | {e['side']} | ({e['i']}, {e['j']}) | {e['top_name']} | {e['source_name']} -> "
              f"{e['target_name']} | {pct(e['static_success'])} | {pct(e['noise']['static_success'])} | "
              f"{pct(e['dynamic_success'])} | {pct(e['noise']['dynamic_success'])} | "
              f"{pp(e['score'])} | "
              f"{pct(e['p_target_before'], 2)} -> {pct(e['p_target_after'], 2)} | "
              f"{pct(e['noise']['p_target_after'], 2)} | "
              f"{e['static_size']}, {e['static_corner_name']} | {e['fidelity']:.2f} |")
            if e["correct_before"]:
                pooled["s"] += e["static_flipped"]
                pooled["d"] += e["dynamic_flipped"]
                pooled["n"] += e["correct_before"]
                pooled["ns"] += e["noise"]["static_flipped"]
                pooled["nd"] += e["noise"]["dynamic_flipped"]
        if fp.ranking:
            best_rows.append((r, fp.ranking[0]))
        w(f"\nFiles: `{fp.paths.get('json')}`, `{fp.paths.get('csv')}`, contact sheet "
          f"`{fp.paths.get('contact_sheet')}`, per-patch reports under `{r['out']}/reports/`.\n")

    w("## Side by side with the article (InceptionV1, method.md §4.3)\n")
    w("Article: 10 hand-made patches per comparison on 1,000 ImageNet training images of the source class; "
      "ours: the best automatically found candidate per comparison (rank 1 above) on photos of all other "
      "classes (fallback). Different model, different source sets: compare the lift over noise, not the "
      "absolute values.\n")
    w("| comparison (article: left -> right) | article static | article dynamic | article noise static / dynamic | ours: best patch "
      "| ours static | ours dynamic | ours noise static / dynamic |")
    w("|---|---|---|---|---|---|---|---|")
    for r, e in best_rows:
        a = ARTICLE[r["left"]]
        w(f"| {r['left']} vs {r['right']} | {a['static']}% | {a['dynamic']}% | {a['noise_static']}% / "
          f"{a['noise_dynamic']}% | ({e['i']}, {e['j']}) {e['top_name']}, {e['source_name']} -> "
          f"{e['target_name']} | {pct(e['static_success'])} | {pct(e['dynamic_success'])} | "
          f"{pct(e['noise']['static_success'])} / {pct(e['noise']['dynamic_success'])} |")
    n = pooled["n"]
    w(f"| pooled | 37.2% | 57.5% | 4–18% (4.2–4.6% static, 11.3–18.3% dynamic) | all {sum(len(r['fp'].ranking) for r in results)} "
      f"evaluated patches | {pct(pooled['s'] / n if n else None)} | {pct(pooled['d'] / n if n else None)} | "
      f"{pct(pooled['ns'] / n if n else None)} / {pct(pooled['nd'] / n if n else None)} |")
    w("")
    w("Pooled = sum of flips / sum of correctly classified source images over the patches (the article's "
      "aggregation); the noise numbers are pooled the same way over the same image sets.\n")
    w("## Reading\n")
    best_lift = max((e["score"] for _, e in best_rows if e["score"] is not None), default=None)
    any_pos = any((e["score"] or 0) > 0 for _, e in best_rows)
    w(f"- Best lift of static success over noise: {pp(best_lift)}"
      f"; {'at least one' if any_pos else 'no'} comparison has a found patch above its noise control. "
      "The article's hand-made InceptionV1 patches reach 37.2% static / 57.5% dynamic pooled against 4–18% "
      "for noise.")
    evaluated = [e for r in results for e in r["fp"].ranking if e["lift_p_target"] is not None]
    above = [e for e in evaluated if e["lift_p_target"] > 0]
    if evaluated:
        top_e = max(evaluated, key=lambda e: e["lift_p_target"])
        w(f"- A finer signal than flips: the patch raises the mean target probability (at its static choice) "
          f"above the noise control's in {len(above)} of {len(evaluated)} evaluated patches; the largest "
          f"difference is {pp(top_e['lift_p_target'])} ({top_e['top_name']} cell, {top_e['source_name']} -> "
          f"{top_e['target_name']}: {pct(top_e['p_target_after'], 2)} vs noise "
          f"{pct(top_e['noise']['p_target_after'], 2)}). These are tiny absolute probabilities: the patches "
          "nudge the target class but are far from flipping a photo of an unrelated class.")
    w("- Why weaker here, honestly: (1) one photo per class, so the attacks run on photos of every other class "
      "(fallback), not on photos of the source class; an off-class photo is usually not near the "
      "left/right decision boundary the comparison is about; (2) the sample gives "
      f"{sum(run.summary['rows'].values())} activation vectors instead of 1,000,000, so each comparison "
      "rests on a few rows per class and the candidate cells are small and noisy; (3) patches are automatic "
      "CPU renders of cell means (128 steps), not the article's hand-picked, high-step renders; (4) a different "
      "model and layer. The numbers are real measurements of exactly these settings and nothing more.")
    w("- What would make this comparable: many images per class (e.g. ImageNet train folders with "
      "`--images`), `--source` with >= 5 correct images so no fallback, the article's `--top 2000` on ~1M "
      "vectors, and more render steps; on InceptionV1 see README \"Reproducing the article with InceptionV1\".")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(L) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
