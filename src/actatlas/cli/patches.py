"""The ``patch-attack`` and ``find-patches`` subcommands (method.md §4.3, §3.3); registered by ``cli``.

Thin over ``actatlas.analysis.attack``: parse, call, print.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.attack import (find_patches, labelled_images, looks_like_cell_spec, parse_cell_spec,
                               render_cell_patch, run_patch_attack)
from ..analysis.views import class_slug
from ..data import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb
from ..errors import ConfigError, DataError
from ..models.spec import resolve_class
from ..pipeline import check_layer
from ..run import open_run
from .common import add_common, add_device_args, add_max_pixels, add_model_args, emit, load_model_of, runtime_of

_DEFAULT_SIZES = "0.1,0.2,0.3,0.4,0.5,0.6,0.7"


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=_DEFAULT_SIZES,
                   help="patch sides as fractions of the image side (default: %(default)s)")
    p.add_argument("--corners", type=int, default=4, choices=[1, 2, 3, 4],
                   help="corners tried: 1 top-left, 2 +top-right, 3 +bottom-left, 4 +bottom-right (default 4)")
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most N source images (a seeded random subset of the eligible ones)")
    p.add_argument("--min-source", type=int, default=5,
                   help="a source class with fewer correctly classified images than this falls back to every "
                        "other class (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise control and of --max-images")


def add_parsers(sub) -> None:
    """Add ``patch-attack`` and ``find-patches`` to the ``actatlas`` subparsers."""
    p = sub.add_parser("patch-attack",
                       help="paste patches on images and measure how often the model flips to a target class")
    add_model_args(p)
    p.add_argument("--images", "-i", required=True,
                   help="labelled images: a folder (wnid file prefixes or class folders) or a .txt list")
    p.add_argument("--target", "-t", required=True, help="target class: name, index or wnid")
    p.add_argument("--source", "-s", help="source class (default: every image not of the target class)")
    p.add_argument("--patch", "-p", action="append", required=True,
                   help="a patch image (PNG, JPEG, ...) or an atlas cell RUN:LAYER:LEVEL:I:J rendered as a "
                        "patch; repeatable")
    p.add_argument("--patch-size-px", type=int, default=128,
                   help="side of patches rendered from cells (default: %(default)s)")
    p.add_argument("--render-steps", type=int, default=None,
                   help="optimisation steps for cell patches (default: the run's render steps)")
    _add_attack_args(p)
    add_max_pixels(p)
    p.add_argument("--out", "-o", default="patch-attack",
                   help="report folder: <patch>.json/.csv/.png per patch + summary.json (default: %(default)s)")
    add_common(p)

    p = sub.add_parser("find-patches",
                       help="compare two classes, render the candidate cells as patches, attack and rank them")
    p.add_argument("run", help="run directory with full attributions")
    p.add_argument("--layer", "-l", help="collected layer (default: the first)")
    p.add_argument("--left", required=True, help="left class: name, index or wnid")
    p.add_argument("--right", required=True, help="right class: name, index or wnid")
    p.add_argument("--images", "-i", help="labelled images to attack (default: the images the run was collected from)")
    p.add_argument("--max-candidates", type=int, default=6, help="candidate cells to evaluate (default: %(default)s)")
    p.add_argument("--patch-px", type=int, default=128, help="rendered patch side (default: %(default)s)")
    p.add_argument("--render-steps", type=int, default=None, help="steps per patch (default: the run's render steps)")
    p.add_argument("--top", type=int, default=2000, help="comparison: top rows per class (article: 2000)")
    p.add_argument("--grid", type=int, default=10, help="comparison grid size (article: 10)")
    p.add_argument("--y-method", default="tsne", choices=["tsne", "umap", "pca"], help="comparison y axis")
    p.add_argument("--min-count", type=int, default=4, help="comparison cells kept with >= this many rows")
    _add_attack_args(p)
    p.add_argument("--out", "-o", help="output folder (default: RUN/patches/<layer>/<left>-vs-<right>)")
    add_device_args(p)
    add_common(p)


def _sizes(text: str) -> list[float]:
    try:
        sizes = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated fractions, e.g. {_DEFAULT_SIZES}; got {text!r}") from None
    if not sizes or any(not 0 < s <= 1 for s in sizes):
        raise ConfigError(f"--sizes must be fractions of the image side in (0, 1], got {text!r}")
    return sizes


def _check_counts(args) -> None:
    if args.max_images is not None and args.max_images < 1:
        raise ConfigError(f"--max-images must be >= 1, got {args.max_images}")
    if args.min_source < 1:
        raise ConfigError(f"--min-source must be >= 1, got {args.min_source}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")


def _open_patch(text: str, spec, args):
    """(name, PIL image, info) for one --patch value.

    Files decode through the same loader as collection (`actatlas.data.load_rgb`: 16-bit and other
    wide modes scaled, transparency over white, EXIF orientation, the --max-pixels cap); any
    decoding problem (corrupt, truncated, a decompression bomb) is a UserError."""
    path = Path(text).expanduser()
    if path.is_file():
        try:
            img = load_rgb(path, max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS))
        except ImageDecodeError as exc:
            raise DataError(f"--patch {text}: not a readable image ({exc.reason})") from None
        return path.name, img, {"file": str(path)}
    if looks_like_cell_spec(text):
        cell = parse_cell_spec(text)
        img, info = render_cell_patch(cell, args.patch_size_px, args.render_steps, spec=spec, device=args.device,
                                      progress=not args.quiet)
        return cell.name, img, info
    raise DataError(f"--patch {text}: no such image file (give a PNG/JPEG file or an atlas cell "
                    "RUN:LAYER:LEVEL:I:J)")


def _pct(v) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}%"


def cmd_patch_attack(args) -> None:
    sizes = _sizes(args.sizes)
    _check_counts(args)
    if args.patch_size_px < 8:
        raise ConfigError(f"--patch-size-px must be >= 8, got {args.patch_size_px}")
    spec = load_model_of(args, runtime_of(args))
    target = spec.class_index(args.target)
    source = spec.class_index(args.source) if args.source is not None else None
    imgs = labelled_images(args.images, spec, max_pixels=args.max_pixels)
    patches = [_open_patch(t, spec, args) for t in args.patch]
    res = run_patch_attack(spec, imgs, target, [(n, im) for n, im, _ in patches], source_class=source, sizes=sizes,
                           corners=args.corners, min_source=args.min_source, max_images=args.max_images,
                           seed=args.seed, batch_size=args.batch_size, out=args.out,
                           patch_info=[info for _, _, info in patches], progress=not args.quiet)
    names = spec.class_names
    src = "every other class" if source is None else names[source]
    lines = []
    if res["source_fallback"]:
        lines.append(f"note: {res['source_note']}")
    lines.append(f"patch attack -> {names[target]} (source: {src}; {res['correct_before']} correctly classified "
                 f"source images; sizes {','.join(f'{s:g}' for s in sizes)}; {args.corners} corner(s))")
    lines.append(f"{'patch':40s} {'static':>7s} {'dynamic':>8s} {'p(target) before->after':>24s}")
    nz = res["noise"]
    rows = [(p["name"], p) for p in res["patches"]] + [("noise control", nz)]
    for name, r in rows:
        pb, pa = r["p_target_before"], r["p_target_after"]
        lines.append(f"{name[:40]:40s} {_pct(r['static_success']):>7s} {_pct(r['dynamic_success']):>8s} "
                     f"{_pct(pb):>11s} -> {_pct(pa):>7s}")
    lines.append(f"reports in {args.out} (summary.json, <patch>.json/.csv/.png)")
    emit(args, res, "\n".join(lines))


def cmd_find_patches(args) -> None:
    sizes = _sizes(args.sizes)
    _check_counts(args)
    run = open_run(args.run)
    layer = check_layer(run, args.layer)
    L = resolve_class(args.left, run.class_names, run.wnids)
    R = resolve_class(args.right, run.class_names, run.wnids)
    out = args.out
    if out is None:
        out = Path(args.run) / "patches" / layer / f"{class_slug(L, run.class_names[L])}-vs-{class_slug(R, run.class_names[R])}"
    res = find_patches(args.run, layer, L, R, images=args.images, max_candidates=args.max_candidates,
                       patch_px=args.patch_px, render_steps=args.render_steps, sizes=sizes, corners=args.corners,
                       min_source=args.min_source, max_images=args.max_images, top=args.top, grid=args.grid,
                       y_method=args.y_method, min_count=args.min_count, seed=args.seed, out=out,
                       device=args.device, batch_size=args.batch_size, progress=not args.quiet)
    names = run.class_names
    lines = [f"{names[L]} vs {names[R]} at {layer}: {len(res.candidates)} candidate cells, "
             f"{len(res.ranking)} evaluated"]
    for key, s in res.attack_sets.items():
        lines.append(f"  {key}: {s['images_used']} source images" + (f"  (note: {s['note']})" if s["source_fallback"] else ""))
    for e in res.ranking:
        lines.append(f"  #{e['rank']} {e['side']:5s} ({e['i']},{e['j']}) n={e['n']:<4d} top {str(e['top_name'])[:24]:24s} "
                     f"{e['source_name'][:14]}->{e['target_name'][:14]}: static {_pct(e['static_success'])} "
                     f"(noise {_pct(e['noise']['static_success'])}), dynamic {_pct(e['dynamic_success'])} "
                     f"(noise {_pct(e['noise']['dynamic_success'])})")
    lines += [f"{k}: {v}" for k, v in res.paths.items()]
    summary = dict(res.to_dict(), left_name=names[L], right_name=names[R], out=str(out),
                   best=res.ranking[0] if res.ranking else None)
    emit(args, summary, "\n".join(lines))


COMMANDS = {"patch-attack": cmd_patch_attack, "find-patches": cmd_find_patches}
