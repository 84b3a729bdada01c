"""What every command group shares: option groups, parsing of list options, the output of a command,
the `Runtime` from the options, and the translation of library names to flags in messages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

from ..errors import ConfigError
from ..layout import LayoutConfig
from ..models import load_model
from ..render import RenderConfig
from ..runtime import Runtime

log = logging.getLogger("actatlas")

# library setting name -> CLI flag, for messages (the library never speaks of flags; see actatlas.errors)
FLAGS = {
    "per_image": "--per-image", "icon_size": "--icon-size", "batch_size": "--icon-batch", "steps": "--steps",
    "attempts": "--attempts", "power": "--power", "transforms": "--transforms", "objective": "--objective",
    "min_count": "--min-count", "shard_size": "--shard-size", "loader_threads": "--loader-threads",
    "topk": "--topk", "max_pixels": "--max-pixels", "fit_max": "--fit-max", "n_neighbors": "--n-neighbors",
    "min_dist": "--min-dist", "pca_dims": "--pca-dims", "border": "--border", "layers": "--layers",
    "limit": "--limit", "threads": "--threads", "engine": "--engine", "device": "--device",
    "allow_random_weights": "--allow-random-weights", "shared_locations": "--shared-locations",
}
_NAME = re.compile(r"(?<![\w-])(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")(?=[=\s)\],;:]|$)")


def flag_names(text: str) -> str:
    """Replace library setting names by their flags where they stand as names: ``per_image`` and
    ``icon_size=1`` become ``--per-image`` and ``--icon-size=1``. Plain words that are also setting
    names (steps, power, border, ...) are replaced only in the ``name=value`` form."""
    def sub(m):
        name = m.group(1)
        after = text[m.end():m.end() + 1]
        if "_" in name or after == "=":
            return FLAGS[name]
        return name
    return _NAME.sub(sub, text)


class FlagNames(logging.Filter):
    """A logging filter that applies `flag_names` to the message of every record (CLI warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = flag_names(record.getMessage())
        record.args = ()
        return True


# ---------------------------------------------------------------------------------------------- options

def add_model_args(p: argparse.ArgumentParser, default: str | None = "efficientnet_lite0") -> None:
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
    add_device_args(p)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (this process, default) or ray (Ray Data actors / Ray tasks; "
                        "pip install 'actatlas[ray]')")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --engine ray (default: RAY_ADDRESS or a local Ray)")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON summary object on the last line")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true", help="log more, and show tracebacks")


def add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=int, default=50_000_000, metavar="N",
                   help="skip (and count as unreadable) an image whose header says it has more than N pixels, "
                        "before decoding it (default: %(default)s; 0: no cap of ours)")


def add_layout_args(p, seed: bool = True) -> None:
    p.add_argument("--method", default="umap", choices=["umap", "tsne", "pca"], help="default: umap")
    p.add_argument("--n-neighbors", type=int, default=50, help="UMAP neighbours (article: 50)")
    p.add_argument("--min-dist", type=float, default=0.05, help="UMAP min_dist (article: 0.05)")
    p.add_argument("--metric", default="cosine", help="UMAP/t-SNE metric (article: cosine for mid layers)")
    p.add_argument("--pca-dims", type=int, default=None, help="PCA pre-reduction before UMAP/t-SNE")
    p.add_argument("--fit-max", type=int, default=None, help="fit the layout on at most N rows, place the rest")
    if seed:
        p.add_argument("--seed", type=int, default=0)


def add_grid_args(p) -> None:
    p.add_argument("--levels", default="10,20,40", help="grid sizes, coarse to fine (default: %(default)s)")
    p.add_argument("--min-count", type=int, default=6,
                   help="keep cells with at least this many samples (default 6 = the recipe's count > 5)")


def add_render_args(p, device: bool = True, seed: bool = True) -> None:
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
    p.add_argument("--fast", action="store_true",
                   help="quick previews: each icon stops at its own plateau (about 30 steps), lr 0.1, parent "
                        "starts; less faithful to the cell means than the default (BENCHMARKS.md)")
    p.add_argument("--warm-start", choices=["none", "parent", "member", "parent-member"],
                   help="where icons start: random, the parent cell's icon (default), the closest member's "
                        "real patch, or parents then members")
    p.add_argument("--stop", choices=["fixed", "plateau"], help="every icon runs --steps, or stops at its plateau")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 0.05)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "warmup-cosine"], help="learning-rate schedule")
    if device:
        add_device_args(p)
    if seed:
        p.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------- values

def parse_levels(text: str) -> list[int]:
    """'10,20,40' -> [10, 20, 40]. Empty items, non-integers and sizes < 1 are refused; sizes given
    out of order or twice are sorted and deduplicated with a warning."""
    items = [x.strip() for x in str(text).split(",")]
    if not text or any(not x for x in items):
        raise ConfigError(f"--levels must be comma-separated grid sizes such as 10,20,40, not {text!r} "
                          "(empty item)")
    try:
        sizes = [int(x) for x in items]
    except ValueError:
        raise ConfigError(f"--levels must be comma-separated integers, not {text!r}") from None
    if min(sizes) < 1:
        raise ConfigError(f"--levels sizes must be >= 1, not {text!r}")
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
        raise ConfigError("--layers is empty: give layer names or aliases (see 'actatlas layers MODEL'), "
                          "or omit it for the model's default layer")
    if not all(items):
        raise ConfigError(f"--layers {text!r} has an empty item")
    return items


def layout_config(args) -> LayoutConfig:
    return LayoutConfig(method=args.method, n_neighbors=args.n_neighbors, min_dist=args.min_dist,
                        metric=args.metric, pca_dims=args.pca_dims, fit_max=args.fit_max, seed=args.seed)


def render_config(args) -> RenderConfig:
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: icons need at least 1 optimisation step (valid: 1..100000)")
    if args.article and args.fast:
        raise ConfigError("--article and --fast are two presets: give one")
    cfg = (RenderConfig.article() if args.article else RenderConfig.fast() if args.fast
           else RenderConfig.cpu_default())
    over = {"steps": args.steps, "attempts": args.attempts, "icon_size": args.icon_size,
            "batch_size": args.icon_batch, "objective": args.objective, "power": args.power,
            "transforms": args.transforms, "warm_start": args.warm_start, "stop": args.stop, "lr": args.lr,
            "lr_schedule": args.lr_schedule}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None},
                              seed=args.seed, device=getattr(args, "device", None))
    if args.no_whiten:
        cfg = dataclasses.replace(cfg, whiten=False)
    return cfg


# commands that may run UMAP: they keep numba's compiled code on disk (enable_numba_cache)
UMAP_COMMANDS = {"layout", "build", "class-atlas", "compare", "find-patches"}


def runtime_of(args) -> Runtime:
    """The `Runtime` the options ask for (applied once by ``main``)."""
    return Runtime(device=getattr(args, "device", "cpu"), engine=getattr(args, "engine", "local"),
                   threads=getattr(args, "threads", None), address=getattr(args, "address", None),
                   progress=not getattr(args, "quiet", False),
                   numba_cache=getattr(args, "command", None) in UMAP_COMMANDS)


def model_options(args) -> dict:
    """Model options beyond weights (recorded in the run, so later stages reload the same model)."""
    return {"labels": str(Path(args.labels).resolve())} if getattr(args, "labels", None) else {}


def load_model_of(args, runtime: Runtime):
    """The model the options name, on the runtime's device; refuses random weights unless allowed."""
    spec = load_model(args.model, weights=args.weights, sha256=args.sha256, device=runtime.model_device,
                      **model_options(args))
    check_random_weights(spec, getattr(args, "allow_random_weights", False))
    return spec


def check_random_weights(spec, allowed: bool) -> None:
    """Refuse a model built with random weights unless the user asked for it (a smoke test)."""
    init = str(spec.info.get("init", ""))
    if not init.startswith("random"):
        return
    if not allowed:
        raise ConfigError(f"{spec.name} has no --weights, so its weights would be RANDOM and every activation, "
                          "icon and attack meaningless; pass --weights FILE_OR_URL, or --allow-random-weights "
                          "for a smoke test")
    log.warning("%s runs with RANDOM weights (--allow-random-weights): results mean nothing", spec.name)


def emit(args, summary: dict, human: str) -> None:
    """A command's output: the human text, or with --json the text on stderr and one JSON line."""
    if args.json:
        if human:
            print(human, file=sys.stderr)
        print(json.dumps(summary, default=str))
    else:
        print(human)


def stage_line(rep) -> str:
    return f"{rep.name}: {'done in %.1f s' % rep.seconds if rep.ran else 'unchanged, skipped'}"
