"""The ``actatlas`` command. Thin over the library: parse, call, print.

User errors (unknown model/layer, empty folder, bad option) print one line and exit 2, without a
traceback. ``--json`` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

log = logging.getLogger("actatlas")


def _add_model_args(p: argparse.ArgumentParser, default: str | None = "efficientnet_lite0") -> None:
    p.add_argument("--model", "-m", default=default,
                   help="registered name (see 'actatlas models'), torchvision:<name>, timm:<name> or "
                        "package.module:factory (default: %(default)s)")
    p.add_argument("--weights", help="weights file or URL for models that take them (e.g. inceptionv1)")
    p.add_argument("--sha256", help="expected sha256 of --weights when it is a URL")
    p.add_argument("--labels", help="class labels file for models that take one (inceptionv1: one "
                                    "'wnid name' or 'name' line per logit, Lucid's order)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="allow a model whose weights are random (inceptionv1 without --weights): for smoke "
                        "tests only, its activations and icons mean nothing")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (this process, default) or ray (Ray Data actors / Ray tasks; "
                        "pip install 'actatlas[ray]')")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --engine ray (default: RAY_ADDRESS or a local Ray)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary object on the last line")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true", help="log more")


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=int, default=50_000_000, metavar="N",
                   help="skip (and count as unreadable) an image whose header says it has more than N pixels, "
                        "before decoding it (default: %(default)s; 0: no cap of ours)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actatlas",
        description="Activation Atlases (Carter et al., Distill 2019) of any PyTorch vision model.")
    parser.add_argument("--version", action="version", version=f"actatlas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the available models")
    _add_common(p)

    p = sub.add_parser("layers", help="list every hookable layer of a model with its output shape")
    p.add_argument("model", help="model name (see 'actatlas models')")
    p.add_argument("--weights")
    p.add_argument("--sha256")
    p.add_argument("--labels", help="class labels file for models that take one (inceptionv1)")
    p.add_argument("--all", action="store_true", help="also list non-spatial / non-tensor outputs")
    _add_common(p)

    p = sub.add_parser("collect", help="collect activations, attributions and provenance from images")
    _add_model_args(p)
    p.add_argument("--images", "-i", required=True,
                   help="a folder (recursive), a .txt file of paths, or 'sample[:N]' for N crops of the "
                        "photos bundled with scikit-image")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--layers", "-l", help="comma-separated layer names or aliases (default: the model's)")
    p.add_argument("--positions", default="random", choices=["random", "center", "all"],
                   help="spatial positions per image (default: random, away from the border)")
    p.add_argument("--per-image", type=int, default=1, help="positions per image for --positions random")
    p.add_argument("--border", type=int, default=1, help="cells to avoid at each edge for random positions")
    p.add_argument("--attributions", default="full", choices=["full", "topk", "none"],
                   help="per-class attribution of each vector: full (float16), topk, none (default: full)")
    p.add_argument("--topk", type=int, default=10, help="classes kept per row with --attributions topk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N images (sorted path order)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="images per committed shard (unit of resume)")
    p.add_argument("--loader-threads", type=int, default=2, help="threads decoding images")
    _add_max_pixels(p)
    p.add_argument("--float16", action="store_true", help="store activations as float16")
    p.add_argument("--amp", action="store_true",
                   help="mixed-precision forward (float16 on CUDA, bfloat16 on CPU) for --attributions none; "
                        "see docs/scale.md for the tolerance")
    p.add_argument("--overwrite", action="store_true", help="replace a collect with a different config")
    p.add_argument("--smooth-maxpool", action="store_true",
                   help="attributions through max-pools use the article's smooth relaxation of the max-pool "
                        "gradient (InceptionV1; method.md 1.3)")
    p.add_argument("--ray-actors", type=int, default=None,
                   help="model actors with --engine ray (default: one per GPU, else as many CPU actors as fit)")
    _add_engine_args(p)
    _add_common(p)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on labelled images")
    _add_model_args(p)
    p.add_argument("--images", "-i", required=True, help="labelled images (wnid file prefixes or class folders)")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--loader-threads", type=int, default=2)
    _add_max_pixels(p)
    _add_common(p)
    p = sub.add_parser("layout", help="2-D layout (UMAP by default) of a collected layer")
    p.add_argument("run", help="run directory")
    p.add_argument("--layer", "-l", help="collected layer (default: the first)")
    _add_layout_args(p)
    _add_common(p)

    p = sub.add_parser("grid", help="multi-level grid of cells over the layout")
    p.add_argument("run", help="run directory")
    p.add_argument("--layer", "-l")
    _add_grid_args(p)
    _add_common(p)

    p = sub.add_parser("render", help="render one icon per grid cell (feature visualization)")
    p.add_argument("run", help="run directory")
    p.add_argument("--layer", "-l")
    _add_render_args(p)
    _add_engine_args(p)
    _add_common(p)

    p = sub.add_parser("build", help="collect -> layout -> grid -> render -> atlas PNGs, skipping finished stages")
    _add_model_args(p)
    p.add_argument("--images", "-i", required=True, help="a folder, a .txt list or sample[:N]")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--layer", "-l", help="layer name or alias (default: the model's)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--per-image", type=int, default=1, help="random positions per image")
    p.add_argument("--batch-size-collect", type=int, default=32, dest="collect_batch_size")
    _add_max_pixels(p)
    p.add_argument("--smooth-maxpool", action="store_true",
                   help="attributions through max-pools use the article's smooth relaxation of the max-pool "
                        "gradient (InceptionV1; method.md 1.3)")
    p.add_argument("--seed", type=int, default=0, help="seed for positions, layout and icons")
    _add_layout_args(p, seed=False)
    _add_grid_args(p)
    _add_render_args(p, device=False, seed=False)
    _add_engine_args(p)
    _add_common(p)

    p = sub.add_parser("export", help="export the atlas of a run as a static site (the viewer)")
    p.add_argument("run", help="run directory (after 'actatlas build')")
    p.add_argument("--out", "-o", required=True, help="site folder to write")
    p.add_argument("--single-file", action="store_true", help="one self-contained index.html (opens from file://)")
    p.add_argument("--layer", "-l", action="append", help="layer to export (repeatable; default: all)")
    p.add_argument("--patches", type=int, default=8, help="real image patches per cell (default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=64, help="patch side in pixels (default: %(default)s)")
    _add_common(p)

    p = sub.add_parser("serve", help="serve an exported site (or a run, exported to RUN/site first) locally")
    p.add_argument("path", help="a site folder (with index.html) or a run directory")
    p.add_argument("--port", "-p", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--host", default=None,
                   help="address to bind (default 127.0.0.1; giving one explicitly allows non-local hosts)")
    p.add_argument("--max-requests", type=int, default=None, help=argparse.SUPPRESS)
    _add_common(p)
    from .cli_patches import add_patch_parsers  # patch-attack, find-patches

    add_patch_parsers(sub, _add_model_args, _add_common)
    from .cli_views import add_view_parsers  # class-atlas, compare

    add_view_parsers(sub)
    return parser


def _add_layout_args(p, seed: bool = True) -> None:
    p.add_argument("--method", default="umap", choices=["umap", "tsne", "pca"], help="default: umap")
    p.add_argument("--n-neighbors", type=int, default=50, help="UMAP neighbours (article: 50)")
    p.add_argument("--min-dist", type=float, default=0.05, help="UMAP min_dist (article: 0.05)")
    p.add_argument("--metric", default="cosine", help="UMAP/t-SNE metric (article: cosine for mid layers)")
    p.add_argument("--pca-dims", type=int, default=None, help="PCA pre-reduction before UMAP/t-SNE")
    p.add_argument("--fit-max", type=int, default=None, help="fit the layout on at most N rows, place the rest")
    if seed:
        p.add_argument("--seed", type=int, default=0)


def _add_grid_args(p) -> None:
    p.add_argument("--levels", default="10,20,40", help="grid sizes, coarse to fine (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=6,
                   help="keep cells with at least this many samples (default 6 = the recipe's count > 5)")


def _add_render_args(p, device: bool = True, seed: bool = True) -> None:
    p.add_argument("--steps", type=int, help="optimisation steps per icon")
    p.add_argument("--attempts", type=int, help="independent attempts per icon, best kept")
    p.add_argument("--icon-size", type=int, help="icon side in pixels")
    p.add_argument("--icon-batch", type=int, help="icons optimised together")
    p.add_argument("--article", action="store_true",
                   help="the article's settings (1024 steps, 4 attempts, 80 px, batch 100): for a GPU")
    p.add_argument("--objective", choices=["lucid", "cosine", "dot"], help="direction objective variant")
    p.add_argument("--power", type=float, help="cosine power in the objective")
    p.add_argument("--transforms", choices=["recipe", "notebook", "none"], help="robustness transforms")
    p.add_argument("--no-whiten", action="store_true", help="do not whiten the target directions")
    if device:
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=None)
    if seed:
        p.add_argument("--seed", type=int, default=0)


def _layout_cfg(args):
    from .layout import LayoutConfig

    return LayoutConfig(method=args.method, n_neighbors=args.n_neighbors, min_dist=args.min_dist,
                        metric=args.metric, pca_dims=args.pca_dims, fit_max=args.fit_max, seed=args.seed)


def _levels(args) -> list[int]:
    return parse_levels(args.levels)


def parse_levels(text: str) -> list[int]:
    """'10,20,40' -> [10, 20, 40]. Empty items, non-integers and sizes < 1 are refused; sizes given
    out of order or twice are sorted and deduplicated with a warning."""
    items = [x.strip() for x in str(text).split(",")]
    if not text or any(not x for x in items):
        raise UserError(f"--levels must be comma-separated grid sizes such as 10,20,40, not {text!r} "
                        "(empty item)")
    try:
        sizes = [int(x) for x in items]
    except ValueError:
        raise UserError(f"--levels must be comma-separated integers, not {text!r}") from None
    if min(sizes) < 1:
        raise UserError(f"--levels sizes must be >= 1, not {text!r}")
    ordered = sorted(set(sizes))
    if ordered != sizes:
        log.warning("--levels %s given out of order or with repeats; building levels %s (coarse to fine)",
                    text, ",".join(map(str, ordered)))
    return ordered


def parse_layers(text: str | None) -> tuple[str, ...] | None:
    """'a,b' -> ('a', 'b'); None -> None (the model's default). An empty list or item is refused."""
    if text is None:
        return None
    items = tuple(x.strip() for x in text.split(","))
    if not any(items):
        raise UserError("--layers is empty: give layer names or aliases (see 'actatlas layers MODEL'), "
                        "or omit it for the model's default layer")
    if not all(items):
        raise UserError(f"--layers {text!r} has an empty item")
    return items


def _render_cfg(args):
    import dataclasses

    from .render import RenderConfig

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: icons need at least 1 optimisation step (valid: 1..100000)")
    cfg = RenderConfig.article() if args.article else RenderConfig.cpu_default()
    over = {"steps": args.steps, "attempts": args.attempts, "icon_size": args.icon_size,
            "batch_size": args.icon_batch, "objective": args.objective, "power": args.power,
            "transforms": args.transforms}
    try:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None},
                                  seed=args.seed, device=args.device)
    except ValueError as exc:
        msg = str(exc)
        for field_name, flag in (("icon_size", "--icon-size"), ("batch_size", "--icon-batch"),
                                 ("steps", "--steps"), ("attempts", "--attempts"), ("power", "--power"),
                                 ("transforms", "--transforms"), ("objective", "--objective")):
            msg = msg.replace(field_name, flag)
        raise UserError(msg) from None
    if args.no_whiten:
        cfg = dataclasses.replace(cfg, whiten=False)
    return cfg


def _load(args):
    from .models import load_model

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    if getattr(args, "engine", "local") == "ray":
        device = "cpu"  # the Ray workers load the model on their own devices
    else:
        from .devices import resolve_device

        resolve_device(device)
    spec = load_model(args.model, weights=args.weights, sha256=args.sha256, device=device, **_model_kwargs(args))
    check_random_weights(spec, getattr(args, "allow_random_weights", False))
    return spec


def check_random_weights(spec, allowed: bool) -> None:
    """Refuse a model built with random weights unless the user asked for it (a smoke test)."""
    init = str(spec.info.get("init", ""))
    if not init.startswith("random"):
        return
    if not allowed:
        raise UserError(f"{spec.name} has no --weights, so its weights would be RANDOM and every activation, "
                        "icon and attack meaningless; pass --weights FILE_OR_URL, or --allow-random-weights "
                        "for a smoke test")
    log.warning("%s runs with RANDOM weights (--allow-random-weights): results mean nothing", spec.name)


def _model_kwargs(args) -> dict:
    """Model options beyond weights (recorded in the run, so later stages reload the same model)."""
    return {"labels": str(Path(args.labels).resolve())} if getattr(args, "labels", None) else {}


def _emit(args, summary: dict, human: str) -> None:
    if args.json:
        if human:
            print(human, file=sys.stderr)
        print(json.dumps(summary, default=str))
    else:
        print(human)


def cmd_models(args) -> None:
    from .models import describe_models

    desc = describe_models()
    human = "\n".join(f"{n:24s} {d}" for n, d in desc.items())
    human += "\nalso: torchvision:<name>, timm:<name> (optional extras), package.module:factory"
    _emit(args, {"models": desc}, human)


def cmd_layers(args) -> None:
    from .hooks import list_layers
    from .models import load_model

    spec = load_model(args.model, weights=args.weights, sha256=args.sha256, **_model_kwargs(args))
    s = spec.input_size
    infos = list_layers(spec.module, (1, 3, s, s))
    if not args.all:
        infos = [i for i in infos if len(i.shape) in (1, 3)]
    default = spec.resolve_layer(spec.default_layer)
    lines = [f"{spec.name}: {len(infos)} layers at {s}x{s} input (default layer: {spec.default_layer})"]
    width = max(len(i.name) for i in infos)
    for i in infos:
        alias = spec.layer_label(i.name)
        tags = (f"  alias {alias}" if alias != i.name else "") + ("  [default]" if i.name == default else "")
        lines.append(f"{i.name:{width}s}  {i.kind:18s} {'x'.join(map(str, i.shape)):>14s}{tags}")
    _emit(args, {"model": spec.name, "default_layer": spec.default_layer, "input_size": s,
                 "layers": [{"name": i.name, "kind": i.kind, "shape": list(i.shape),
                             "alias": spec.layer_label(i.name)} for i in infos]}, "\n".join(lines))


def cmd_collect(args) -> None:
    from .collect import CollectConfig, collect
    from .data import images

    spec = _load(args)
    source = images(args.images, seed=args.seed, max_pixels=args.max_pixels)
    cfg = CollectConfig(
        layers=parse_layers(args.layers),
        positions=args.positions, per_image=args.per_image, border=args.border,
        attributions=args.attributions, topk=args.topk, seed=args.seed, limit=args.limit,
        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device, threads=args.threads,
        loader_threads=args.loader_threads, activation_dtype="float16" if args.float16 else "float32",
        amp=args.amp, engine=args.engine, address=args.address, ray_actors=args.ray_actors,
        smooth_maxpool=args.smooth_maxpool)
    res = collect(spec, source, args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    d = res.to_dict()
    if res.already_complete:
        human = f"{res.run_dir}: already complete ({res.rows} rows from {res.images} images); nothing to do"
    else:
        per = ", ".join(f"{k}: {v}" for k, v in res.rows_per_layer.items())
        human = (f"wrote {res.rows} rows ({per}) from {res.images} images to {res.run_dir}/collect "
                 f"({res.skipped} skipped, {res.seconds:.1f} s, {res.images_per_s:.1f} images/s"
                 + (f", resumed after {res.resumed_shards} shards" if res.resumed_shards else "") + ")")
    _emit(args, d, human)


def cmd_eval(args) -> None:
    from .data import images
    from .evaluate import evaluate

    spec = _load(args)
    source = images(args.images, max_pixels=args.max_pixels)
    if args.limit:
        source = source.head(args.limit)
    res = evaluate(spec, source, batch_size=args.batch_size, loader_threads=args.loader_threads,
                   progress=not args.quiet)
    human = (f"{spec.name} on {source.description}: top-1 {100 * res.top1:.2f}%  top-5 {100 * res.top5:.2f}%  "
             f"(n={res.n}, skipped {res.skipped}, unlabelled {res.unlabelled}, {res.images_per_s:.1f} images/s)")
    _emit(args, res.to_dict(), human)


def _report(rep) -> str:
    return f"{rep.name}: {'done in %.1f s' % rep.seconds if rep.ran else 'unchanged, skipped'}"


def cmd_layout(args) -> None:
    from .pipeline import run_layout

    rep, layout = run_layout(args.run, args.layer, _layout_cfg(args), progress=not args.quiet)
    _emit(args, {"stage": rep.name, "ran": rep.ran, "seconds": rep.seconds, "rows": int(len(layout.coords))},
          _report(rep) + f" ({len(layout.coords)} points)")


def cmd_grid(args) -> None:
    from .pipeline import run_grid

    rep, levels = run_grid(args.run, args.layer, _levels(args), min_count=args.min_count, progress=not args.quiet)
    cells = {int(lv.size): int(len(lv.i)) for lv in levels}
    _emit(args, {"stage": rep.name, "ran": rep.ran, "seconds": rep.seconds, "cells": cells},
          _report(rep) + " (cells per level: " + ", ".join(f"{g}: {c}" for g, c in cells.items()) + ")")


def cmd_render(args) -> None:
    from .pipeline import run_assemble, run_render

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = _render_cfg(args)
    if args.engine == "local":
        from .devices import resolve_device

        resolve_device(cfg.device)
    rep, icons, S = run_render(args.run, args.layer, cfg, progress=not args.quiet, engine=args.engine,
                               address=args.address, threads=args.threads)
    from .run import open_run

    layer = args.layer or open_run(args.run).layers[0]
    atlas, pngs = run_assemble(args.run, layer, icons, S)
    _emit(args, {"stage": rep.name, "ran": rep.ran, "seconds": rep.seconds,
                 "pngs": {str(g): str(p) for g, p in pngs.items()}},
          _report(rep) + "\n" + "\n".join(f"level {g}: {p}" for g, p in pngs.items()))


def cmd_build(args) -> None:
    from .collect import CollectConfig
    from .data import images
    from .pipeline import build

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    source = images(args.images, max_pixels=args.max_pixels)
    res = build(args.model, source, args.out, layer=args.layer, limit=args.limit, levels=_levels(args),
                collect_cfg=CollectConfig(per_image=args.per_image, seed=args.seed,
                                          batch_size=args.collect_batch_size, smooth_maxpool=args.smooth_maxpool),
                layout_cfg=_layout_cfg(args), render_cfg=_render_cfg(args), min_count=args.min_count,
                weights=args.weights, sha256=args.sha256, device=args.device, model_kwargs=_model_kwargs(args),
                progress=not args.quiet, engine=args.engine, address=args.address, threads=args.threads)
    s = res.summary
    lines = [f"atlas of {s['model']} layer {s['layer']} from {s['samples']} samples:"]
    for lv in s["levels"]:
        lines.append(f"  level {lv['size']:>3}: {lv['cells']:>5} cells, icon fidelity "
                     f"{lv['icon_fidelity'] if lv['icon_fidelity'] is None else round(lv['icon_fidelity'], 3)}, "
                     f"best real member {lv['member_fidelity'] if lv['member_fidelity'] is None else round(lv['member_fidelity'], 3)}")
    lines.append("stages run: " + (", ".join(s["stages_run"]) or "none (everything up to date)"))
    lines += [f"canvas level {g}: {p}" for g, p in s["pngs"].items()]
    _emit(args, s, "\n".join(lines))


def cmd_export(args) -> None:
    from .export import export_site
    from .store import ensure_dir

    ensure_dir(args.out, "site folder")
    index = export_site(args.run, args.out, single_file=args.single_file, layers=args.layer,
                        patches_per_cell=args.patches, patch_size=args.patch_size)
    _emit(args, {"index": str(index), "single_file": bool(args.single_file)},
          f"wrote {index}" + ("" if args.single_file else f" (serve with: actatlas serve {args.out})"))


def cmd_serve(args) -> None:
    from pathlib import Path

    from .export import export_site, serve
    from .export.serve import check_port

    check_port(args.port)  # a bad --port fails before a run is exported
    root = Path(args.path)
    if not (root / "index.html").is_file():
        if not (root / "manifest.json").is_file() or not (root / "atlas").is_dir():
            raise UserError(f"{root} is neither a site (no index.html) nor a built run (no manifest.json + atlas/)")
        site = root / "site"
        stamps = [p.stat().st_mtime for p in (root / "atlas").glob("*/atlas.json")]
        if not (site / "index.html").is_file() or (stamps and max(stamps) > (site / "index.html").stat().st_mtime):
            print(f"exporting {root} to {site} ...", flush=True)
            export_site(root, site)
        root = site
    serve(root, host=args.host or "127.0.0.1", port=args.port, max_requests=args.max_requests,
          allow_remote=args.host is not None, quiet=args.quiet)


COMMANDS = {"models": cmd_models, "layers": cmd_layers, "collect": cmd_collect, "eval": cmd_eval,
            "layout": cmd_layout, "grid": cmd_grid, "render": cmd_render, "build": cmd_build,
            "export": cmd_export, "serve": cmd_serve}

from .cli_patches import PATCH_COMMANDS  # noqa: E402

COMMANDS.update(PATCH_COMMANDS)

from .cli_views import VIEW_COMMANDS  # noqa: E402

COMMANDS.update(VIEW_COMMANDS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="actatlas: %(levelname)s: %(message)s")
    try:
        COMMANDS[args.command](args)
    except UserError as exc:
        print(f"actatlas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("actatlas: interrupted (a rerun with the same arguments resumes)", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system said no: one line (the traceback with --verbose)
        if args.verbose:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"actatlas: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
