"""``actatlas models``, ``layers``, ``collect`` and ``eval``: models and the data collected from them."""

from __future__ import annotations

from ..collect import CollectConfig, collect
from ..data import images
from ..evaluate import evaluate
from ..hooks import list_layers
from ..models import describe_models, load_model
from .common import (add_common, add_engine_args, add_max_pixels, add_model_args, emit, load_model_of,
                     model_options, parse_layers, runtime_of)


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help="list the available models")
    add_common(p)

    p = sub.add_parser("layers", help="list every hookable layer of a model with its output shape")
    p.add_argument("model", help="model name (see 'actatlas models')")
    p.add_argument("--weights")
    p.add_argument("--sha256")
    p.add_argument("--labels", help="class labels file for models that take one (inceptionv1)")
    p.add_argument("--all", action="store_true", help="also list non-spatial / non-tensor outputs")
    add_common(p)

    p = sub.add_parser("collect", help="collect activations, attributions and provenance from images")
    add_model_args(p)
    p.add_argument("--images", "-i", required=True,
                   help="a folder (recursive), a .txt file of paths, or 'sample[:N]' for N crops of the "
                        "photos bundled with scikit-image")
    p.add_argument("--out", "-o", required=True, help="run directory")
    p.add_argument("--layers", "-l", help="comma-separated layer names or aliases (default: the model's)")
    p.add_argument("--positions", default="random", choices=["random", "center", "all"],
                   help="spatial positions per image (default: random, away from the border)")
    p.add_argument("--per-image", type=int, default=1, help="positions per image for --positions random")
    p.add_argument("--border", type=int, default=1, help="cells to avoid at each edge for random positions")
    p.add_argument("--shared-locations", action="store_true",
                   help="every layer samples the same image locations (drawn once per image on the coarsest "
                        "layer's map): what an aligned layout of the layers needs ('layout --align')")
    p.add_argument("--attributions", default="full", choices=["full", "topk", "none"],
                   help="per-class attribution of each vector: full (float16), topk, none (default: full)")
    p.add_argument("--topk", type=int, default=10, help="classes kept per row with --attributions topk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N images (sorted path order)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="images per committed shard (unit of resume)")
    p.add_argument("--loader-threads", type=int, default=2, help="threads decoding images")
    add_max_pixels(p)
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
    add_engine_args(p)
    add_common(p)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on labelled images")
    add_model_args(p)
    p.add_argument("--images", "-i", required=True, help="labelled images (wnid file prefixes or class folders)")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--loader-threads", type=int, default=2)
    add_max_pixels(p)
    add_common(p)


def cmd_models(args) -> None:
    desc = describe_models()
    human = "\n".join(f"{n:24s} {d}" for n, d in desc.items())
    human += "\nalso: torchvision:<name>, timm:<name> (optional extras), package.module:factory"
    emit(args, {"models": desc}, human)


def cmd_layers(args) -> None:
    spec = load_model(args.model, weights=args.weights, sha256=args.sha256, **model_options(args))
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
    emit(args, {"model": spec.name, "default_layer": spec.default_layer, "input_size": s,
                "layers": [{"name": i.name, "kind": i.kind, "shape": list(i.shape),
                            "alias": spec.layer_label(i.name)} for i in infos]}, "\n".join(lines))


def cmd_collect(args) -> None:
    runtime = runtime_of(args)
    spec = load_model_of(args, runtime)
    source = images(args.images, seed=args.seed, max_pixels=args.max_pixels)
    cfg = CollectConfig(
        layers=parse_layers(args.layers),
        positions=args.positions, per_image=args.per_image, border=args.border,
        attributions=args.attributions, topk=args.topk, seed=args.seed, limit=args.limit,
        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device, threads=args.threads,
        loader_threads=args.loader_threads, activation_dtype="float16" if args.float16 else "float32",
        amp=args.amp, engine=args.engine, address=args.address, ray_actors=args.ray_actors,
        smooth_maxpool=args.smooth_maxpool, shared_locations=args.shared_locations)
    res = collect(spec, source, args.out, cfg, progress=runtime.progress, overwrite=args.overwrite)
    if res.already_complete:
        human = f"{res.run_dir}: already complete ({res.rows} rows from {res.images} images); nothing to do"
    else:
        per = ", ".join(f"{k}: {v}" for k, v in res.rows_per_layer.items())
        human = (f"wrote {res.rows} rows ({per}) from {res.images} images to {res.run_dir}/collect "
                 f"({res.skipped} skipped, {res.seconds:.1f} s, {res.images_per_s:.1f} images/s"
                 + (f", resumed after {res.resumed_shards} shards" if res.resumed_shards else "") + ")")
    emit(args, res.to_dict(), human)


def cmd_eval(args) -> None:
    runtime = runtime_of(args)
    spec = load_model_of(args, runtime)
    source = images(args.images, max_pixels=args.max_pixels)
    if args.limit:
        source = source.head(args.limit)
    res = evaluate(spec, source, batch_size=args.batch_size, loader_threads=args.loader_threads,
                   progress=runtime.progress)
    human = (f"{spec.name} on {source.description}: top-1 {100 * res.top1:.2f}%  top-5 {100 * res.top5:.2f}%  "
             f"(n={res.n}, skipped {res.skipped}, unlabelled {res.unlabelled}, {res.images_per_s:.1f} images/s)")
    emit(args, res.to_dict(), human)


COMMANDS = {"models": cmd_models, "layers": cmd_layers, "collect": cmd_collect, "eval": cmd_eval}
