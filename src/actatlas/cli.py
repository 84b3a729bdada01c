"""The ``actatlas`` command. Thin over the library: parse, call, print.

User errors (unknown model/layer, empty folder, bad option) print one line and exit 2, without a
traceback. ``--json`` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import UserError

log = logging.getLogger("actatlas")


def _add_model_args(p: argparse.ArgumentParser, default: str | None = "efficientnet_lite0") -> None:
    p.add_argument("--model", "-m", default=default,
                   help="registered name (see 'actatlas models'), torchvision:<name>, timm:<name> or "
                        "package.module:factory (default: %(default)s)")
    p.add_argument("--weights", help="weights file or URL for models that take them (e.g. inceptionv1)")
    p.add_argument("--sha256", help="expected sha256 of --weights when it is a URL")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary object on the last line")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true", help="log more")


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
    p.add_argument("--float16", action="store_true", help="store activations as float16")
    p.add_argument("--overwrite", action="store_true", help="replace a collect with a different config")
    _add_common(p)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on labelled images")
    _add_model_args(p)
    p.add_argument("--images", "-i", required=True, help="labelled images (wnid file prefixes or class folders)")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--loader-threads", type=int, default=2)
    _add_common(p)
    return parser


def _load(args):
    from .models import load_model

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return load_model(args.model, weights=args.weights, sha256=args.sha256, device=getattr(args, "device", "cpu"))


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

    spec = load_model(args.model, weights=args.weights, sha256=args.sha256)
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
    source = images(args.images, seed=args.seed)
    cfg = CollectConfig(
        layers=tuple(x.strip() for x in args.layers.split(",") if x.strip()) if args.layers else None,
        positions=args.positions, per_image=args.per_image, border=args.border,
        attributions=args.attributions, topk=args.topk, seed=args.seed, limit=args.limit,
        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device, threads=args.threads,
        loader_threads=args.loader_threads, activation_dtype="float16" if args.float16 else "float32")
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
    source = images(args.images)
    if args.limit:
        source = source.head(args.limit)
    res = evaluate(spec, source, batch_size=args.batch_size, loader_threads=args.loader_threads,
                   progress=not args.quiet)
    human = (f"{spec.name} on {source.description}: top-1 {100 * res.top1:.2f}%  top-5 {100 * res.top5:.2f}%  "
             f"(n={res.n}, skipped {res.skipped}, unlabelled {res.unlabelled}, {res.images_per_s:.1f} images/s)")
    _emit(args, res.to_dict(), human)


COMMANDS = {"models": cmd_models, "layers": cmd_layers, "collect": cmd_collect, "eval": cmd_eval}


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
