"""``actatlas class-atlas`` and ``actatlas compare`` (method.md §3.2, §3.3): thin over
``actatlas.analysis.views``."""

from __future__ import annotations

from ..analysis.views import candidates_table, class_atlas_and_render, compare_and_render
from ..layout import LayoutConfig
from .common import add_common, add_render_args, emit, render_config


def add_parsers(sub) -> None:
    """Add the class-atlas and compare subcommands to the ``actatlas`` subparsers `sub`."""
    p = sub.add_parser("class-atlas", help="class activation atlas: the activations supporting one class, "
                                           "their own layout, one icon per cell")
    p.add_argument("run", help="run directory (collected with --attributions full)")
    p.add_argument("--layer", "-l", help="collected layer (default: the first)")
    p.add_argument("--class", "-c", dest="cls", required=True, help="class name, index or wnid")
    p.add_argument("--filter", default="winner", choices=["winner", "top"],
                   help="winner: rows whose top attribution is the class; top: the --top rows most "
                        "attributed to it (default: %(default)s)")
    p.add_argument("--top", type=int, default=2000, help="rows kept by --filter top (default: %(default)s)")
    p.add_argument("--grid", type=int, default=8, help="grid size G (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=4, help="smallest kept cell (default: %(default)s)")
    p.add_argument("--layout", default="umap", choices=["umap", "tsne", "pca"],
                   help="layout of the subset (default umap with n_neighbors 20, min_dist 0.01, cosine)")
    _add_view_args(p)

    p = sub.add_parser("compare", help="two-class comparison (x: attribution difference, y: 1-D embedding) "
                                       "with its candidate patch cells")
    p.add_argument("run", help="run directory (collected with --attributions full)")
    p.add_argument("--layer", "-l", help="collected layer (default: the first)")
    p.add_argument("--left", required=True, help="left class: name, index or wnid")
    p.add_argument("--right", required=True, help="right class: name, index or wnid")
    p.add_argument("--top", type=int, default=2000, help="rows per class by attribution (default: %(default)s)")
    p.add_argument("--grid", type=int, default=10, help="grid size G, even (default: %(default)s)")
    p.add_argument("--y", default="tsne", choices=["tsne", "umap", "pca"], dest="y_method",
                   help="1-D embedding for the vertical axis (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=4, help="smallest kept cell (default: %(default)s)")
    _add_view_args(p)


def _add_view_args(p) -> None:
    p.add_argument("--out", "-o", help="results folder (default: a folder under the run)")
    p.add_argument("--patches", type=int, default=8,
                   help="real image patches per cell in the viewer (default: %(default)s)")
    p.add_argument("--no-viewer", action="store_true", help="skip the viewer page")
    p.add_argument("--force", action="store_true", help="recompute even when the folder is up to date")
    add_render_args(p)
    add_common(p)


def _lines(v, head: list[str]) -> str:
    return "\n".join(head + [f"  {k}: {p}" for k, p in v.paths.items()])


def _summary(v) -> dict:
    return {**v.summary, "ran": v.ran, "paths": {k: str(p) for k, p in v.paths.items()}}


def cmd_class_atlas(args) -> None:
    cfg = render_config(args)
    lcfg = LayoutConfig(method=args.layout, n_neighbors=20, min_dist=0.01, metric="cosine", seed=args.seed)
    v = class_atlas_and_render(args.run, args.layer, args.cls, mode=args.filter, top=args.top, grid=args.grid,
                               min_count=args.min_count, layout_cfg=lcfg, render_cfg=cfg, out=args.out,
                               patches_per_cell=args.patches, viewer=not args.no_viewer, force=args.force,
                               progress=not args.quiet)
    s = v.summary
    head = [f"class atlas of {s['class']['name']} ({s['class']['index']}), layer {s['layer']}, filter "
            f"{s['filter']}: {s['rows']} rows, {s['cells']} cells of {s['grid']}x{s['grid']}"
            + ("" if v.ran else " (up to date: loaded, not recomputed)"),
            f"  objective alignment: icons {s['mean_icon_fidelity']}, best real member {s['mean_member_fidelity']}"]
    emit(args, _summary(v), _lines(v, head))


def cmd_compare(args) -> None:
    cfg = render_config(args)
    v = compare_and_render(args.run, args.layer, args.left, args.right, top=args.top, grid=args.grid,
                           y_method=args.y_method, min_count=args.min_count, seed=args.seed, render_cfg=cfg,
                           out=args.out, patches_per_cell=args.patches, viewer=not args.no_viewer,
                           force=args.force, progress=not args.quiet)
    s = v.summary
    left, right = s["left"]["name"], s["right"]["name"]
    head = [f"{left} (left) vs {right} (right), layer {s['layer']}: {s['rows']} rows, {s['cells']} cells of "
            f"{s['grid']}x{s['grid']}" + ("" if v.ran else " (up to date: loaded, not recomputed)"),
            candidates_table(s["candidates"], left, right)]
    emit(args, _summary(v), _lines(v, head))


COMMANDS = {"class-atlas": cmd_class_atlas, "compare": cmd_compare}
