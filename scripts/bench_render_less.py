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
from actatlas.pipeline import parent_cells, run_render, run_whiten
from actatlas.render import RenderConfig, render_icons
from actatlas.run import load_run_model, open_run
from actatlas.runtime import Runtime, enable_numba_cache
from actatlas.scores import TOP, activation_scores, centre_scores_inputs, top_classes_of, vividness

OLD_DEFAULT = RenderConfig.cpu_default(steps=128, stop="fixed", lr_schedule="constant", warm_start="none",
                                       lr=0.05)

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


def score_icons(spec, module_layer: str, level, icons: np.ndarray, S) -> dict[str, np.ndarray]:
    """Per-icon honest scores of one level (the scores stage's functions, icon side only)."""
    acts, attr = centre_scores_inputs(spec, module_layer, icons, attributions=True)
    s = activation_scores(acts.reshape(len(icons), -1), top_classes_of(attr), np.arange(len(icons)),
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


def pareto(run_dir: Path, layers: list[str], sizes: list[int], names: list[str], threads: int) -> dict:
    torch.set_num_threads(threads)
    run = open_run(run_dir)
    spec = load_run_model(run, "cpu")
    out: dict = {}
    for layer in layers:
        S = run_whiten(run_dir, layer).S
        levels = {lv.size: lv for lv in load_grid(run_dir / "grid", layer)}
        levels = [levels[g] for g in sorted(sizes)]
        module_layer = run.config["module_layers"][layer]
        out[layer] = {}
        for name in names:
            cfg = dataclasses.replace(OLD_DEFAULT, **SETTINGS[name])
            per: dict[str, list] = {}
            steps, seconds, icons_prev, by_level = [], 0.0, None, {}
            for k, lv in enumerate(levels):
                init = mask = None
                if cfg.warm_start == "parent" and k > 0:
                    parent = parent_cells(lv, levels[k - 1])
                    init = np.zeros((len(parent), cfg.icon_size, cfg.icon_size, 3), np.uint8)
                    init[parent >= 0] = icons_prev[parent[parent >= 0]]
                    mask = parent >= 0
                t0 = time.perf_counter()
                res = render_icons(spec, module_layer, np.asarray(lv.mean_activation, np.float32), cfg, S=S,
                                   progress=False, init=init, init_mask=mask)
                dt = time.perf_counter() - t0
                icons_prev = res.images
                sc = score_icons(spec, module_layer, lv, res.images, S)
                by_level[lv.size] = summarize(sc, res.steps, dt)
                for key, v in sc.items():
                    per.setdefault(key, []).append(v)
                steps.append(res.steps)
                seconds += dt
            row = summarize({k: np.concatenate(v) for k, v in per.items()}, np.concatenate(steps), seconds)
            row["levels"] = by_level
            out[layer][name] = row
            print(json.dumps({"layer": layer, "setting": name, **{k: v for k, v in row.items() if k != "levels"}}),
                  flush=True)
    return out


def e2e(run_dir: Path, layer: str, new: RenderConfig, threads: int, work: Path) -> dict:
    """The render stage on two copies of the run (no icons yet): old defaults, then `new`."""
    torch.set_num_threads(threads)
    res = {}
    for name, cfg in (("old", OLD_DEFAULT), ("new", new)):
        d = work / f"e2e-{name}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("icons", "scores", "atlas"))
        t0 = time.perf_counter()
        r = run_render(d, layer, cfg, progress=False, runtime=Runtime(device="cpu", threads=threads,
                                                                        numba_cache=False))
        sec = time.perf_counter() - t0
        steps = np.concatenate([ic["steps"] for ic in r.icons.values()])
        res[name] = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(OLD_DEFAULT, k)},
                     "seconds": round(sec, 1), "icons": int(len(steps)), "mean_steps": float(steps.mean()),
                     "icon_steps_per_s": float(steps.sum() / sec), "levels": sorted(r.icons)}
        print(json.dumps({name: res[name]}), flush=True)
    res["speedup"] = res["old"]["seconds"] / res["new"]["seconds"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("prepare", "pareto", "e2e"))
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", default="sample:1000")
    ap.add_argument("--per-image", type=int, default=4)
    ap.add_argument("--layers", default="blocks.8,blocks.15")
    ap.add_argument("--layer", default="blocks.8")
    ap.add_argument("--levels", default="10,20,40")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    enable_numba_cache()
    if a.mode == "prepare":
        prepare(a.run, a.images, a.per_image, a.layers, a.levels)
        return 0
    if a.mode == "pareto":
        result = pareto(a.run, a.layers.split(","), [int(g) for g in a.levels.split(",")], a.settings.split(","),
                        a.threads)
    else:
        result = e2e(a.run, a.layer, RenderConfig.cpu_default(), a.threads, a.run.parent)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
