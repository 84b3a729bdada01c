"""The table of registered model factories (name -> factory, description) and its decorator.

Below every model module: `efficientnet` and `inception` register themselves here with `register`;
`registry` (which loads models by name) imports them so that their entries exist.
"""

from __future__ import annotations

from typing import Callable

FACTORIES: dict[str, Callable] = {}
DESCRIPTIONS: dict[str, str] = {}


def register(name: str, description: str = ""):
    """Decorator registering a factory ``f(weights=None, sha256=None, **kw) -> ModelSpec`` under `name`."""

    def deco(fn):
        FACTORIES[name] = fn
        DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


__all__ = ["FACTORIES", "DESCRIPTIONS", "register"]
