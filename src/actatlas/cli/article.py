"""``actatlas reproduce-article`` (issue 14): thin over ``actatlas.analysis.article.reproduce_article``."""

from __future__ import annotations

from ..analysis.article import SCALES, reproduce_article
from ..runtime import Runtime
from .common import add_common, add_device_args, emit


def add_parsers(sub) -> None:
    """Add the reproduce-article subcommand to the ``actatlas`` subparsers `sub`."""
    p = sub.add_parser("reproduce-article",
                       help="every experiment of the Activation Atlas article on its own model (InceptionV1), "
                            "each a resumable step, with a report beside the article's numbers")
    p.add_argument("--weights", help="InceptionV1 weights: lucent's inception5h.pth (or the name inception5h)")
    p.add_argument("--labels", required=True, help="label list: lucent's 'wnid index name' lines or Lucid's")
    p.add_argument("--images", "-i", required=True,
                   help="ImageNet folder (class sub-folders or wnid-prefixed file names)")
    p.add_argument("--out", "-o", required=True, help="output folder (resumes when it exists)")
    p.add_argument("--scale", default="tiny", choices=sorted(SCALES),
                   help="tiny: a few hundred images, small levels and icons (minutes); full: the article's "
                        "settings (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="images sampled for the atlases (default: 300 tiny, 1,000,000 full)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="allow running without --weights (random weights: a smoke test, numbers mean nothing)")
    p.add_argument("--seed", type=int, default=0)
    add_device_args(p)
    add_common(p)


def cmd_reproduce_article(args) -> None:
    runtime = Runtime(device=args.device, threads=args.threads, progress=not args.quiet, numba_cache=True)
    rep = reproduce_article(args.weights, args.labels, args.images, args.out, scale=args.scale,
                            allow_random_weights=args.allow_random_weights, limit=args.limit, runtime=runtime,
                            seed=args.seed, progress=not args.quiet)
    width = max(len(e["name"]) for e in rep.entries)
    lines = [f"{e['name']:<{width}}  {e['status']:<7}  {(e.get('note') or '')[:100]}" for e in rep.entries]
    c = rep.counts()
    lines.append(f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed; "
                 + (f"{len(rep.ran)} steps ran" if rep.ran else "nothing to do (every step up to date)")
                 + f"; report: {rep.paths['md']}")
    emit(args, {"out": str(rep.out), "counts": c, "stages_run": rep.ran, "entries": rep.entries,
                "paths": {k: str(v) for k, v in rep.paths.items()}, "seconds": rep.seconds}, "\n".join(lines))


COMMANDS = {"reproduce-article": cmd_reproduce_article}
