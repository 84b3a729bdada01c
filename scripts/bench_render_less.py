"""Render less (issue 12): optimiser steps per icon against the honest icon scores, lever by lever.

Two parts, each on a run that has been collected, laid out and gridded (see --prepare):

pareto   For each layer and each render setting below, render the icons of the given levels
         (coarse to fine, so the "parent" warm start has its parents) and score them with the
         scores module's own functions (`activation_scores`, `vividness`, `centre_scores_inputs`:
         exactly what the pipeline's scores stage computes per icon): retrieval@1/@5 against raw
         cell means and whitened targets, class agreement, colourfulness, contrast, border fill;
         plus the optimiser steps actually spent per icon, wall time and icon-steps/s.
e2e      The render stage of the same run (`pipeline.run_render`, every level of the grid),
         once with the old defaults and once with the new ones, on copies of the run: stage
         seconds, icons, mean steps per icon and icon-steps/s, same machine, same process.

    python scripts/bench_render_less.py --prepare RUN           # collect+layout+grid (sample:1000, K=4)
    python scripts/bench_render_less.py pareto RUN --layers blocks.8 --levels 10,20 --json out.json
    python scripts/bench_render_less.py e2e RUN --layer blocks.8 --json e2e.json
    python scripts/bench_render_less.py table out.json [more.json ...]   # markdown Pareto tables

Scores are means over the icons of all given levels. Choose settings on blocks.8, confirm on blocks.15.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from actatlas.grid import load_grid
from actatlas.pipeline import icon_starts, parent_cells, run_render, run_whiten
from actatlas.render import RenderConfig, render_icons
from actatlas.run import load_run_model, open_run
from actatlas.runtime import Runtime, enable_numba_cache
from actatlas.scores import TOP, activation_scores, centre_scores_inputs, top_classes_of, vividness

OLD_DEFAULT = RenderConfig(steps=128, attempts=1, icon_size=64, batch_size=8, whiten=True, objective="cosine")
"""`RenderConfig.cpu_default()` before issue 12 (the recipe's fixed-length loop otherwise)."""

# name -> overrides of the old default (each lever alone, then combined)
SETTINGS: dict[str, dict] = {
    "default-128": {},
    "fixed-64": {"steps": 64},
    "fixed-32": {"steps": 32},
    "fixed-16": {"steps": 16},
    "lr0.1-32": {"steps": 32, "lr": 0.1},
    "cosine-lr0.1-32": {"steps": 32, "lr": 0.1, "lr_schedule": "cosine"},
    "cosine-lr0.2-32": {"steps": 32, "lr": 0.2, "lr_schedule": "cosine"},
    "plateau-128": {"stop": "plateau"},
    "parent-32": {"steps": 32, "warm_start": "parent"},
    "parent-16": {"steps": 16, "warm_start": "parent"},
    "power4-32": {"steps": 32, "power": 4.0},
    "plateau-64": {"steps": 64, "stop": "plateau"},
    "parent-plateau-128": {"stop": "plateau", "warm_start": "parent"},
    "parent-cosine-lr0.1-32": {"steps": 32, "lr": 0.1, "lr_schedule": "cosine", "warm_start": "parent"},
    "warmup-cosine-lr0.1-32": {"steps": 32, "lr": 0.1, "lr_schedule": "warmup-cosine"},
    "plateau-tol0.02-128": {"stop": "plateau", "plateau_tol": 0.02},
    "parent-plateau-tol0.02-128": {"stop": "plateau", "warm_start": "parent", "plateau_tol": 0.02},
    "parent-lr0.1-plateau-128": {"stop": "plateau", "warm_start": "parent", "lr": 0.1},
    "member-32": {"steps": 32, "warm_start": "member"},
    "member-16": {"steps": 16, "warm_start": "member"},
    "member-plateau-128": {"stop": "plateau", "warm_start": "member"},
    "parent-member-32": {"steps": 32, "warm_start": "parent-member"},
    "parent-member-plateau-128": {"stop": "plateau", "warm_start": "parent-member"},
    "member-lr0.1-plateau-128": {"stop": "plateau", "warm_start": "member", "lr": 0.1},
    "parent-64": {"steps": 64, "warm_start": "parent"},
    "parent-48": {"steps": 48, "warm_start": "parent"},
    "parent-96": {"steps": 96, "warm_start": "parent"},
    "plateau-tol0.003-128": {"stop": "plateau", "plateau_tol": 0.003},
    "parent-plateau-tol0.003-128": {"stop": "plateau", "warm_start": "parent", "plateau_tol": 0.003},
    "parent-lr0.1-plateau-tol0.003-128": {"stop": "plateau", "warm_start": "parent", "lr": 0.1, "plateau_tol": 0.003},
    "redirect-128": {"redirected_relu": True},
    "redirect-32": {"steps": 32, "redirected_relu": True},
}


def prepare(run: Path, images: str, per_image: int, layers: str, levels: str) -> None:
    exe = str(Path(sys.executable).with_name("actatlas"))
    subprocess.run([exe, "collect", "--model", "efficientnet_lite0", "--images", images, "--per-image",
                    str(per_image), "--layers", layers, "--out", str(run), "-q"], check=True)
    for layer in layers.split(","):
        subprocess.run([exe, "layout", str(run), "--layer", layer, "-q"], check=True)
        subprocess.run([exe, "grid", str(run), "--layer", layer, "--levels", levels, "-q"], check=True)


def score_icons(spec, module_layer: str, level, rows: np.ndarray, icons: np.ndarray, S) -> dict[str, np.ndarray]:
    """Per-icon honest scores of the icons of cells `rows` of one level, each ranked among all the
    level's cells (the scores stage's functions, icon side only)."""
    acts, attr = centre_scores_inputs(spec, module_layer, icons, attributions=True)
    s = activation_scores(acts.reshape(len(icons), -1), top_classes_of(attr), np.asarray(rows),
                          np.asarray(level.mean_activation, np.float32), S, np.asarray(level.top_classes)[:, :TOP])
    return {**{k: s[k] for k in ("retrieval_rank_raw", "retrieval_rank_whitened", "class_agreement")},
            **vividness(icons)}


def summarize(per: dict[str, np.ndarray], steps: np.ndarray, seconds: float) -> dict:
    raw, white = per["retrieval_rank_raw"], per["retrieval_rank_whitened"]
    return {"icons": int(len(steps)), "mean_steps": float(steps.mean()), "seconds": round(seconds, 1),
            "icon_steps_per_s": float(steps.sum() / seconds),
            "retrieval@1_raw": float((raw == 1).mean()), "retrieval@5_raw": float((raw <= 5).mean()),
            "retrieval@1_whitened": float((white == 1).mean()), "retrieval@5_whitened": float((white <= 5).mean()),
            "class_agreement": float(np.nanmean(per["class_agreement"])),
            "colourfulness": float(per["colourfulness"].mean()), "contrast": float(per["contrast"].mean()),
            "border_fill": float(per["border_fill"].mean())}


def subset(levels: list, cells: int, seed: int = 0) -> list[np.ndarray]:
    """Rows to render per level: `cells` seeded random cells of the finest level (all when 0), and at
    each coarser level the parents of the rows below (so warm starts have their parents)."""
    rows = [np.arange(len(levels[-1].i))]
    if cells and cells < len(rows[0]):
        rows[0] = np.sort(np.random.default_rng(seed).choice(len(rows[0]), cells, replace=False))
    for k in range(len(levels) - 1, 0, -1):
        par = parent_cells(levels[k], levels[k - 1])[rows[0]]
        rows.insert(0, np.unique(par[par >= 0]) if cells else np.arange(len(levels[k - 1].i)))
    return rows


def pareto(run_dir: Path, layers: list[str], sizes: list[int], names: list[str], threads: int,
           cells: int = 0) -> dict:
    """Scores are over the rendered icons of the FINEST given level (retrieval among all its cells);
    coarser levels are rendered (their parents' rows only with `cells`) for the warm start, and are
    reported per level too."""
    torch.set_num_threads(threads)
    run = open_run(run_dir)
    spec = load_run_model(run, "cpu")
    out: dict = {}
    for layer in layers:
        S = run_whiten(run_dir, layer).S
        levels = {lv.size: lv for lv in load_grid(run_dir / "grid", layer)}
        levels = [levels[g] for g in sorted(sizes)]
        rows = subset(levels, cells)
        module_layer = run.config["module_layers"][layer]
        out[layer] = {"cells": [int(len(r)) for r in rows], "level_cells": [int(len(lv.i)) for lv in levels]}
        for name in names:
            cfg = dataclasses.replace(OLD_DEFAULT, **SETTINGS[name])
            prev_icons, prev_rows, by_level = None, None, {}
            parents = cfg.warm_start in ("parent", "parent-member")
            for k, lv in enumerate(levels):
                if k < len(levels) - 1 and not parents:
                    continue                     # coarser levels only matter as parents
                r = rows[k]
                parent = (levels[k - 1], prev_rows, prev_icons) if parents and k > 0 else None
                init, mask = icon_starts(run, layer, cfg, spec, lv, r, parent)
                t0 = time.perf_counter()
                level_cfg = cfg.standalone() if k == 0 else cfg     # as the render stage does
                res = render_icons(spec, module_layer, np.asarray(lv.mean_activation, np.float32)[r], level_cfg, S=S,
                                   progress=False, init=init, init_mask=mask)
                dt = time.perf_counter() - t0
                prev_icons, prev_rows = res.images, r
                sc = score_icons(spec, module_layer, lv, r, res.images, S)
                by_level[lv.size] = summarize(sc, res.steps, dt)
            row = dict(by_level[levels[-1].size])
            row["levels"] = by_level
            out[layer][name] = row
            print(json.dumps({"layer": layer, "setting": name, **{k: v for k, v in row.items() if k != "levels"}}),
                  flush=True)
    return out


def e2e(run_dir: Path, layer: str, which: list[str], threads: int, work: Path) -> dict:
    """The render stage on copies of the run (without icons): the old defaults ("old") and/or the new
    ones ("new"). Wall seconds and CPU seconds of this process (all threads): on a shared machine the CPU
    seconds compare two runs fairly when the wall clock does not."""
    torch.set_num_threads(threads)
    res = {}
    for name in which:
        cfg = OLD_DEFAULT if name == "old" else RenderConfig.cpu_default()
        d = work / f"e2e-{name}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("icons", "scores", "atlas"))
        t0, c0 = time.perf_counter(), time.process_time()
        r = run_render(d, layer, cfg, progress=False, runtime=Runtime(device="cpu", threads=threads,
                                                                        numba_cache=False))
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        steps = np.concatenate([ic["steps"] for ic in r.icons.values()])
        res[name] = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(OLD_DEFAULT, k)},
                     "seconds": round(sec, 1), "cpu_seconds": round(cpu, 1), "icons": int(len(steps)),
                     "mean_steps": float(steps.mean()), "icon_steps_per_s": float(steps.sum() / sec),
                     "icon_steps_per_cpu_s": float(steps.sum() / cpu), "levels": sorted(r.icons),
                     "mean_steps_per_level": {int(g): float(ic["steps"].mean()) for g, ic in r.icons.items()}}
        print(json.dumps({name: res[name]}), flush=True)
    if "old" in res and "new" in res:
        res["speedup_wall"] = res["old"]["seconds"] / res["new"]["seconds"]
        res["speedup_cpu"] = res["old"]["cpu_seconds"] / res["new"]["cpu_seconds"]
    return res


COLUMNS = ("mean_steps", "retrieval@1_raw", "retrieval@5_raw", "retrieval@1_whitened", "class_agreement",
           "colourfulness", "contrast", "border_fill", "icon_steps_per_s")


def table(paths: list[Path]) -> str:
    """Markdown Pareto tables (one per layer) from `pareto` JSON files, rows sorted by mean steps."""
    rows: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    for p in paths:
        for layer, d in json.loads(p.read_text()).items():
            meta[layer] = {k: d[k] for k in ("cells", "level_cells") if k in d}
            rows.setdefault(layer, {}).update({k: v for k, v in d.items() if isinstance(v, dict) and "mean_steps" in v})
    out = []
    for layer, settings in rows.items():
        out.append(f"{layer} (icons of {meta[layer].get('cells', ['?'])[-1]} of the "
                   f"{meta[layer].get('level_cells', ['?'])[-1]} cells of the finest level)\n")
        out.append("| setting | " + " | ".join(COLUMNS) + " |")
        out.append("|---" * (len(COLUMNS) + 1) + "|")
        for name, r in sorted(settings.items(), key=lambda kv: kv[1]["mean_steps"]):
            out.append(f"| {name} | " + " | ".join(f"{r[c]:.3g}" if c != "mean_steps" else f"{r[c]:.1f}"
                                                   for c in COLUMNS) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("prepare", "pareto", "e2e", "table"))
    ap.add_argument("run", type=Path, nargs="+", help="the run (table: pareto JSON files)")
    ap.add_argument("--images", default="sample:1000")
    ap.add_argument("--per-image", type=int, default=4)
    ap.add_argument("--layers", default="blocks.8,blocks.15")
    ap.add_argument("--layer", default="blocks.8")
    ap.add_argument("--levels", default="10,20,40")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--which", default="old,new", help="e2e: old, new or old,new")
    ap.add_argument("--cells", type=int, default=0, help="pareto: render this many seeded random cells of the "
                    "finest level (and their parents), not all")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    enable_numba_cache()
    if a.mode == "table":
        print(table(a.run))
        return 0
    a.run = a.run[0]
    if a.mode == "prepare":
        prepare(a.run, a.images, a.per_image, a.layers, a.levels)
        return 0
    if a.mode == "pareto":
        result = pareto(a.run, a.layers.split(","), [int(g) for g in a.levels.split(",")], a.settings.split(","),
                        a.threads, a.cells)
    else:
        result = e2e(a.run, a.layer, a.which.split(","), a.threads, a.run.parent)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
