"""Model registry: names -> factories returning a `ModelSpec`.

Built in: ``efficientnet_lite0`` (embedded default), ``inceptionv1`` (Lucid GoogLeNet, user weights).
Adapters: ``torchvision:<name>``, ``timm:<name>`` (optional extras) and ``package.module:factory`` for
any callable returning an ``nn.Module`` or a ``ModelSpec``.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging

from ..errors import ModelError
from . import efficientnet, inception  # noqa: F401  (their factories register in the catalog)
from .catalog import DESCRIPTIONS, FACTORIES, register  # noqa: F401  (register re-exported)
from .spec import ModelSpec

log = logging.getLogger(__name__)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob `pattern` (timm style: ``list_models("eff*")``)."""
    return sorted(n for n in FACTORIES if fnmatch.fnmatch(n, pattern))


def describe_models() -> dict[str, str]:
    return {n: DESCRIPTIONS[n] for n in sorted(FACTORIES)}


def load_model(name: str, weights: str | None = None, sha256: str | None = None,
               device: str = "cpu", **kwargs) -> ModelSpec:
    """Build a model by name and move it to `device` (eval mode, no grad on parameters).

    Args:
        name: a registered name, ``torchvision:<name>``, ``timm:<name>`` or ``package.module:factory``.
        weights: optional weights file path or URL (``file://``, ``https://``) where the model takes them.
        sha256: expected checksum of downloaded weights.
    """
    if name in FACTORIES:
        factory = FACTORIES[name]
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            extra = sorted(set(kwargs) - set(params))
            if extra:
                raise ModelError(f"model {name!r} takes no option {', '.join(extra)}")
        spec = factory(weights=weights, sha256=sha256, **kwargs)
    elif name.startswith("torchvision:"):
        from .adapters import torchvision_model

        spec = torchvision_model(name.split(":", 1)[1], weights=weights, sha256=sha256, **kwargs)
    elif name.startswith("timm:"):
        from .adapters import timm_model

        spec = timm_model(name.split(":", 1)[1], weights=weights, sha256=sha256, **kwargs)
    elif ":" in name and not name.startswith(("/", ".")):
        from .adapters import factory_model

        spec = factory_model(name, weights=weights, sha256=sha256, **kwargs)
    else:
        raise ModelError(
            f"unknown model {name!r}. Available: {', '.join(list_models())}; "
            "or torchvision:<name>, timm:<name>, package.module:factory"
        )
    # how to load this model again (later stages of a run reload it by name)
    spec.info["load_args"] = {"weights": weights, "sha256": sha256,
                              **{k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    return prepare_spec(spec, device)


def prepare_spec(spec: ModelSpec, device: str = "cpu") -> ModelSpec:
    """Eval mode, no gradients on parameters, on `device`: how every stage expects a model."""
    spec.module.eval()
    for p in spec.module.parameters():
        p.requires_grad_(False)
    return spec.to_device(device)
