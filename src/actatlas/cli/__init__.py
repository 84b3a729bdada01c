"""The ``actatlas`` command: thin over the library (parse, call, print), one module per command group.

    data     models, layers, collect, eval
    atlas    layout, grid, render, build, export, serve
    views    class-atlas, compare
    patches  patch-attack, find-patches
    common   option groups, list parsing, output, Runtime from the options, flag names in messages

Library errors (``actatlas.errors``: every kind derives from ``UserError``) print one line
``actatlas: error: ...`` and exit 2, without a traceback (``--verbose`` shows it); so do file-system
errors (``OSError``). ``--json`` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from ..errors import UserError
from ..version import __version__
from . import article, atlas, data, patches, views
from .common import FlagNames, flag_names, parse_layers, parse_levels, runtime_of

GROUPS = (data, atlas, patches, views, article)
COMMANDS = {name: fn for group in GROUPS for name, fn in group.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actatlas",
        description="Activation Atlases (Carter et al., Distill 2019) of any PyTorch vision model.")
    parser.add_argument("--version", action="version", version=f"actatlas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("actatlas: %(levelname)s: %(message)s"))
        handler.addFilter(FlagNames())
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # an image over --max-pixels is refused (one line, or counted as skipped) from its header; PIL's
    # DecompressionBombWarning, printed while reading that header, would only repeat it
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit", module=r"PIL\.Image")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        runtime_of(args).apply()       # the one place the CLI sets process-wide state
        COMMANDS[args.command](args)
    except UserError as exc:
        if args.verbose:
            raise
        print(f"actatlas: error: {flag_names(str(exc))}", file=sys.stderr)
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


__all__ = ["main", "build_parser", "COMMANDS", "parse_levels", "parse_layers"]
