"""``actatlas layout``, ``grid``, ``render``, ``build``, ``export`` and ``serve``: the atlas of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..collect import CollectConfig
from ..data import images
from ..errors import ConfigError, RunStateError
from ..export import export_site, serve
from ..export.serve import check_port
from ..layout import AlignConfig
from ..pipeline import (build_atlas, check_layer, positions_per_image, run_aligned_layout, run_assemble, run_grid,
                        run_layout, run_render)
from ..run import load_run_model, open_run
from ..store import ensure_dir
from .common import (add_common, add_engine_args, add_grid_args, add_layout_args, add_max_pixels, add_model_args,
                     add_render_args, emit, layout_config, load_model_of, model_options, parse_layers,
                     parse_levels, render_config, runtime_of, stage_line)


def add_parsers(sub) -> None:
    p = sub.add_parser("layout", help="2-D layout (UMAP by default) of a collected layer, or several aligned")
    p.add_argument("run", help="run directory")
    p.add_argument("--layer", "-l", help="collected layer (default: the first)")
    p.add_argument("--layers", help="with --align: the collected layers to lay out jointly, comma-separated, in order")
    add_align_args(p)
    add_layout_args(p)
    add_common(p)

    p = sub.add_parser("grid", help="multi-level grid of cells over the layout")
    p.add_argument("run", help="run directory")
    p.add_argument("--layer", "-l")
    p.add_argument("--aligned", action="store_true", help="over the layer's aligned layout ('layout --align')")
    add_grid_args(p)
    add_common(p)

    p = sub.add_parser("render", help="render one icon per grid cell (feature visualization)")
    p.add_argument("run", help="run directory")
    p.add_argument("--layer", "-l")
    add_render_args(p)
    add_engine_args(p)
    add_common(p)

    p = sub.add_parser("build", help="collect -> layout -> grid -> render -> atlas PNGs, skipping finished stages")
    add_model_args(p)
    p.add_argument("--images", "-i", required=True, help="a folder, a .txt list or sample[:N]")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--layer", "-l", help="layer name or alias (default: the model's)")
    p.add_argument("--layers", help="several layers, comma-separated (one atlas each, collected in one pass; "
                                    "the viewer steps through them in this order)")
    add_align_args(p)
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--per-image", type=int, default=None,
                   help="random positions per image (default: enough for about 2.5 samples per cell of the "
                        "finest level, at most 16)")
    p.add_argument("--batch-size-collect", type=int, default=32, dest="collect_batch_size")
    add_max_pixels(p)
    p.add_argument("--smooth-maxpool", action="store_true",
                   help="attributions through max-pools use the article's smooth relaxation of the max-pool "
                        "gradient (InceptionV1; method.md 1.3)")
    p.add_argument("--seed", type=int, default=0, help="seed for positions, layout and icons")
    add_layout_args(p, seed=False)
    add_grid_args(p)
    add_render_args(p, device=False, seed=False)
    add_engine_args(p)
    add_common(p)

    p = sub.add_parser("export", help="export the atlas of a run as a static site (the viewer)")
    p.add_argument("run", help="run directory (after 'actatlas build')")
    p.add_argument("--out", "-o", required=True, help="site folder to write")
    p.add_argument("--single-file", action="store_true", help="one self-contained index.html (opens from file://)")
    p.add_argument("--layer", "-l", action="append", help="layer to export (repeatable; default: all)")
    p.add_argument("--patches", type=int, default=8, help="real image patches per cell (default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=64, help="patch side in pixels (default: %(default)s)")
    add_common(p)

    p = sub.add_parser("serve", help="serve an exported site (or a run, exported to RUN/site first) locally")
    p.add_argument("path", help="a site folder (with index.html) or a run directory")
    p.add_argument("--port", "-p", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--host", default=None,
                   help="address to bind (default 127.0.0.1; giving one explicitly allows non-local hosts)")
    p.add_argument("--max-requests", type=int, default=None, help=argparse.SUPPRESS)
    add_common(p)


def add_align_args(p) -> None:
    p.add_argument("--align", action="store_true",
                   help="lay the --layers out jointly (umap-learn's AlignedUMAP, or Procrustes-aligned PCA with "
                        "--method pca), collected at shared image locations, so a place means the same in every "
                        "layer's map")
    p.add_argument("--align-regularisation", type=float, default=0.01,
                   help="AlignedUMAP's alignment_regularisation: pull toward the neighbouring layers (default: 0.01)")
    p.add_argument("--align-window", type=int, default=3,
                   help="AlignedUMAP's alignment_window_size: layers pulling on each side (default: 3)")


def _layers_and_align(args) -> tuple[list[str] | None, AlignConfig | None]:
    """The layers of --layer / --layers and the AlignConfig of --align (one-line errors for bad pairs)."""
    if args.layer and args.layers:
        raise ConfigError("give --layer or --layers, not both")
    names = list(parse_layers(args.layers)) if args.layers else ([args.layer] if args.layer else None)
    if not args.align:
        return names, None
    if not names or len(names) < 2:
        raise ConfigError(f"--align lays out two or more layers jointly; got {', '.join(names) if names else 'one layer'}"
                          " (give --layers A,B,...)")
    return names, AlignConfig(regularisation=args.align_regularisation, window=args.align_window)


def cmd_layout(args) -> None:
    names, align = _layers_and_align(args)
    if align is not None:
        res = run_aligned_layout(args.run, names, layout_config(args), align, progress=not args.quiet)
        n = len(next(iter(res.layouts.values())).coords)
        emit(args, {"stage": res.report.name, "ran": res.report.ran, "seconds": res.report.seconds, "rows": int(n),
                    "layers": names},
             stage_line(res.report) + f" ({len(names)} layers x {n} points)")
        return
    if names and len(names) > 1:
        raise ConfigError("--layers without --align: lay the layers out one at a time with --layer")
    res = run_layout(args.run, names[0] if names else None, layout_config(args), progress=not args.quiet)
    n = len(res.layout.coords)
    emit(args, {"stage": res.report.name, "ran": res.report.ran, "seconds": res.report.seconds, "rows": int(n)},
         stage_line(res.report) + f" ({n} points)")


def cmd_grid(args) -> None:
    res = run_grid(args.run, args.layer, parse_levels(args.levels), min_count=args.min_count,
                   progress=not args.quiet, aligned=args.aligned)
    cells = {int(lv.size): int(len(lv.i)) for lv in res.levels}
    emit(args, {"stage": res.report.name, "ran": res.report.ran, "seconds": res.report.seconds, "cells": cells},
         stage_line(res.report) + " (cells per level: " + ", ".join(f"{g}: {c}" for g, c in cells.items()) + ")")


def cmd_render(args) -> None:
    runtime = runtime_of(args)
    cfg = render_config(args)
    run = open_run(args.run)
    layer = check_layer(run, args.layer)
    try:
        spec = load_run_model(run, runtime.model_device)    # once, for the icons and their scores
    except RunStateError:
        spec = None     # a model given as an object: the stages say so only if they need it
    ren = run_render(args.run, layer, cfg, spec=spec, progress=runtime.progress, runtime=runtime)
    asm = run_assemble(args.run, layer, ren, spec=spec, progress=runtime.progress, device=runtime.model_device)
    emit(args, {"stage": ren.report.name, "ran": ren.report.ran, "seconds": ren.report.seconds,
                "pngs": {str(g): str(p) for g, p in asm.pngs.items()}},
         stage_line(ren.report) + "\n" + "\n".join(f"level {g}: {p}" for g, p in asm.pngs.items()))


def cmd_build(args) -> None:
    runtime = runtime_of(args)
    names, align = _layers_and_align(args)
    levels = parse_levels(args.levels)
    render = render_config(args)
    layout = layout_config(args)
    spec = load_model_of(args, runtime)
    source = images(args.images, max_pixels=args.max_pixels)
    built = build_atlas(source, out=args.out, model=spec, layer=names, levels=levels,
                        min_count=args.min_count, limit=args.limit,
                        collect=CollectConfig(per_image=args.per_image or positions_per_image(
                                                  min(len(source), args.limit or len(source)), levels),
                                              seed=args.seed,
                                              batch_size=args.collect_batch_size,
                                              smooth_maxpool=args.smooth_maxpool),
                        layout=layout, render=render, runtime=runtime, weights=args.weights, sha256=args.sha256,
                        model_options=model_options(args), align=align if align is not None else False)
    s = built.summary
    if "atlases" not in s:      # one layer
        lines = [f"atlas of {s['model']} layer {s['layer']} from {s['samples']} samples:", *_level_lines(s)]
        lines.append("stages run: " + (", ".join(s["stages_run"]) or "none (everything up to date)"))
        lines += [f"canvas level {g}: {p}" for g, p in s["pngs"].items()]
        emit(args, s, "\n".join(lines))
        return
    kind = "aligned atlases" if s["aligned"] else "atlases"
    lines = [f"{kind} of {s['model']} layers {', '.join(s['layers'])} from {s['samples']} samples each:"]
    for ly, one in s["atlases"].items():
        lines.append(f" {ly}:")
        lines += _level_lines(one)
    al = s.get("alignment")
    if al:
        lines.append("alignment (mean over consecutive layers; displacement in the [0,1]^2 map):")
        d = al["mean"]["displacement"]
        lines.append(f"  displacement: aligned {_r3(d.get('aligned'))}, independent after Procrustes "
                     f"{_r3(d.get('independent_after_procrustes'))}, chance {_r3(d.get('chance'))}")
        kept = al["mean"].get("top_class_kept")
        if kept:
            lines.append(f"  coarsest cells keeping their top class: aligned {_r3(kept.get('aligned'))}, "
                         f"independent after Procrustes {_r3(kept.get('independent_after_procrustes'))}")
    lines.append("stages run: " + (", ".join(s["stages_run"]) or "none (everything up to date)"))
    lines += [f"canvas {ly} level {g}: {p}" for ly, pngs in s["pngs"].items() for g, p in pngs.items()]
    emit(args, s, "\n".join(lines))


def _r3(v):
    return v if v is None else round(v, 3)


def _level_lines(s: dict) -> list[str]:
    lines = []
    for lv in s["levels"]:
        line = (f"  level {lv['size']:>3}: {lv['cells']:>5} cells, objective alignment: icons "
                f"{_r3(lv['icon_fidelity'])}, best real member {_r3(lv['member_fidelity'])}")
        sc = lv.get("scores") or {}
        if sc.get("icons") and sc.get("members"):
            ic, mb = sc["icons"], sc["members"]
            line += (f"; retrieval@1 raw: icons {_r3(ic.get('retrieval_at1_raw'))} / random member "
                     f"{_r3(mb.get('retrieval_at1_raw'))}")
        lines.append(line)
    return lines


def cmd_export(args) -> None:
    ensure_dir(args.out, "site folder")
    index = export_site(args.run, args.out, single_file=args.single_file, layers=args.layer,
                        patches_per_cell=args.patches, patch_size=args.patch_size)
    emit(args, {"index": str(index), "single_file": bool(args.single_file)},
         f"wrote {index}" + ("" if args.single_file else f" (serve with: actatlas serve {args.out})"))


def cmd_serve(args) -> None:
    check_port(args.port)  # a bad --port fails before a run is exported
    root = Path(args.path)
    if not (root / "index.html").is_file():
        if not (root / "manifest.json").is_file() or not (root / "atlas").is_dir():
            raise RunStateError(f"{root} is neither a site (no index.html) nor a built run "
                                "(no manifest.json + atlas/)")
        site = root / "site"
        stamps = [p.stat().st_mtime for p in (root / "atlas").glob("*/atlas.json")]
        if not (site / "index.html").is_file() or (stamps and max(stamps) > (site / "index.html").stat().st_mtime):
            print(f"exporting {root} to {site} ...", flush=True)
            export_site(root, site)
        root = site
    serve(root, host=args.host or "127.0.0.1", port=args.port, max_requests=args.max_requests,
          allow_remote=args.host is not None, quiet=args.quiet)


COMMANDS = {"layout": cmd_layout, "grid": cmd_grid, "render": cmd_render, "build": cmd_build,
            "export": cmd_export, "serve": cmd_serve}
