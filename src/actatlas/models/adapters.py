"""Adapters turning other people's models into `ModelSpec`s.

- ``torchvision:<name>``: `torchvision_model` (optional extra ``actatlas[torchvision]``);
- ``timm:<name>``: `timm_model` (optional extra ``actatlas[timm]``);
- ``package.module:factory``: `factory_model`, for any callable returning an ``nn.Module`` or a
  ``ModelSpec``.

When a model declares no default layer, `default_layer` picks one by a generic rule (no branching on
model names); see its docstring.
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
from torch import nn

from ..errors import ModelError, UserError
from .spec import ModelSpec, Preprocess, imagenet_classes

log = logging.getLogger(__name__)

__all__ = ["default_layer", "torchvision_model", "timm_model", "factory_model"]

TARGET_STRIDE = 16  # the article's mixed4c sits at stride 16 (14x14 at 224 px)
MIN_CANDIDATES = 4
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@torch.no_grad()
def _output_shapes(module: nn.Module, size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(dotted name, output shape) of every named module whose first output is a tensor, in call order.

    Runs one forward pass on zeros [1, 3, size, size] on the module's device, in eval mode.
    """
    try:
        p = next(module.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in module.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            if name not in seen and isinstance(out, torch.Tensor):
                seen[name] = tuple(out.shape)

        handles.append(mod.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        module(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return list(seen.items())


def default_layer(module: nn.Module, input_size: int = 224) -> str:
    """Choose a mid-level layer generically, like the article's mixed4c.

    Rule (one dummy forward pass at `input_size`):
      1. Record every named module whose output is 4-D [1, c, h, w].
      2. Take the shallowest nesting depth (number of dots in the name) at which at least 4 such
         modules exist (e.g. ``layer1..layer4`` of a ResNet; ``features.0..8`` of a model that wraps
         its body in one ``features`` container). If no depth has 4, take the depth with the most.
      3. Among them keep those whose output stride (input_size / h) is closest to 16 in log scale
         (ties: the smaller stride, i.e. more spatial positions).
      4. Return the middle one in forward order (index n // 2).
    If no module produces a 4-D output, the middle named top-level child is returned with a warning.
    """
    shapes = _output_shapes(module, input_size)
    four_d = [(n, s) for n, s in shapes if len(s) == 4]
    if not four_d:
        top = [n for n, _ in module.named_children()]
        if not top:
            raise ModelError("the model has no sub-modules to hook; name the layers explicitly")
        log.warning("no module outputs a 4-D [b, c, h, w] tensor; default layer %s is a guess", top[len(top) // 2])
        return top[len(top) // 2]
    by_depth: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in four_d:
        by_depth.setdefault(name.count("."), []).append((name, shape))
    enough = [d for d in sorted(by_depth) if len(by_depth[d]) >= MIN_CANDIDATES]
    depth = enough[0] if enough else max(by_depth, key=lambda d: (len(by_depth[d]), -d))
    cands = by_depth[depth]

    def distance(shape):
        stride = input_size / max(shape[2], 1)
        return (abs(math.log2(stride) - math.log2(TARGET_STRIDE)), stride)

    best = min(distance(s)[0] for _, s in cands)
    # keep ties in the distance; prefer the smaller stride among equally distant ones
    close = [(n, s) for n, s in cands if math.isclose(distance(s)[0], best)]
    smallest = min(distance(s)[1] for _, s in close)
    close = [n for n, s in close if math.isclose(distance(s)[1], smallest)]
    return close[len(close) // 2]


def _num_outputs(module: nn.Module, size: int) -> int:
    """Number of logits from a dummy forward [1, 3, size, size]; UserError if not [1, k]."""
    try:
        p = next(module.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    with torch.no_grad():
        out = module.eval()(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model must return logits [b, k] for an image batch; got {shape}")
    return int(out.shape[1])


def _class_names(k: int) -> tuple[list[str], list[str] | None]:
    if k == 1000:
        return imagenet_classes()
    return [f"class_{i}" for i in range(k)], None


def _load_weights(module: nn.Module, weights: str, sha256: str | None, what: str) -> str:
    from .weights import fetch_weights, load_state_dict

    path = fetch_weights(weights, sha256)
    try:
        module.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights {path} do not fit {what}: {str(e)[:800]}") from e
    return str(path)


def _missing_extra(extra: str, e: Exception) -> UserError:
    return UserError(f"{extra} is not usable here ({type(e).__name__}: {e}); "
                     f"install the optional extra: pip install 'actatlas[{extra}]'")


def torchvision_model(name: str, weights: str | None = None, sha256: str | None = None) -> ModelSpec:
    """A torchvision classification model (``torchvision.models.get_model(name, weights="DEFAULT")``).

    With `weights` (path or URL), the architecture is built without weights and the state dict is
    loaded from the file. Preprocessing comes from the default weights' transforms (resize_size,
    crop_size, mean/std * 255, interpolation); class names from ``weights.meta["categories"]``.
    """
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001  (ImportError, or OSError/RuntimeError from a broken install)
        raise _missing_extra("torchvision", e) from e
    try:
        default_weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception as e:  # noqa: BLE001
        avail = ", ".join(sorted(torchvision.models.list_models())[:20])
        raise ModelError(f"unknown torchvision model {name!r} ({e}). Some available: {avail}, ...") from e
    info: dict = {"adapter": "torchvision", "torchvision": torchvision.__version__}
    if weights is None:
        module = torchvision.models.get_model(name, weights="DEFAULT")
        info["weights"] = str(default_weights)
    else:
        module = torchvision.models.get_model(name, weights=None,
                                              num_classes=len(default_weights.meta["categories"]))
        info["weights"] = _load_weights(module, weights, sha256, f"torchvision:{name}")
    module.eval()
    tf = default_weights.transforms()
    interp = getattr(getattr(tf, "interpolation", None), "value", "bilinear")
    crop = int(_first(getattr(tf, "crop_size", 224)))
    resize = int(_first(getattr(tf, "resize_size", crop)))
    pre = Preprocess(
        size=crop, resize=resize, mode="resize_crop",
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest", "lanczos") else "bilinear",
        mean=tuple(float(m) * 255 for m in tf.mean), std=tuple(float(s) * 255 for s in tf.std),
    )
    categories = list(default_weights.meta.get("categories") or [])
    k = _num_outputs(module, crop)
    if len(categories) == k:
        names, wnids = categories, (imagenet_classes()[1] if k == 1000 else None)
    else:
        names, wnids = _class_names(k)
    return ModelSpec(name=f"torchvision:{name}", module=module, preprocess=pre, class_names=names,
                     wnids=wnids, default_layer=default_layer(module, crop), info=info)


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def timm_model(name: str, weights: str | None = None, sha256: str | None = None) -> ModelSpec:
    """A timm model (``timm.create_model(name, pretrained=weights is None)``).

    Preprocessing from ``timm.data.resolve_data_config``: crop ``input_size``, resize
    ``floor(size / crop_pct)``, mean/std * 255, interpolation; ``crop_mode="squash"`` maps to
    ``mode="squash"``. Class names: the ImageNet classes for 1000 outputs, else ``class_{i}``.
    """
    try:
        import timm
        import timm.data
    except Exception as e:  # noqa: BLE001
        raise _missing_extra("timm", e) from e
    try:
        module = timm.create_model(name, pretrained=weights is None)
    except RuntimeError as e:
        raise ModelError(f"cannot create timm model {name!r}: {e}") from e
    info: dict = {"adapter": "timm", "timm": timm.__version__}
    if weights is not None:
        info["weights"] = _load_weights(module, weights, sha256, f"timm:{name}")
    else:
        info["weights"] = "pretrained"
    module.eval()
    cfg = timm.data.resolve_data_config({}, model=module)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interp = cfg.get("interpolation", "bilinear")
    pre = Preprocess(
        size=size, resize=int(math.floor(size / crop_pct)),
        mode="squash" if cfg.get("crop_mode") == "squash" else "resize_crop",
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest", "lanczos") else "bilinear",
        mean=tuple(float(m) * 255 for m in cfg["mean"]), std=tuple(float(s) * 255 for s in cfg["std"]),
    )
    names, wnids = _class_names(_num_outputs(module, size))
    return ModelSpec(name=f"timm:{name}", module=module, preprocess=pre, class_names=names, wnids=wnids,
                     default_layer=default_layer(module, size), info=info)


def factory_model(target: str, weights: str | None = None, sha256: str | None = None, **kw) -> ModelSpec:
    """``"package.module:factory"`` -> ModelSpec, calling ``factory(**kw)``.

    The factory may return a `ModelSpec` (used as is) or an ``nn.Module`` (wrapped: ImageNet mean/std,
    resize 256 + centre crop 224 bilinear; ImageNet class names for 1000 outputs, else ``class_{i}``;
    default layer by `default_layer`). With `weights` (path or URL) the state dict is loaded into the
    module afterwards.
    """
    modname, sep, attr = target.partition(":")
    if not sep or not modname or not attr:
        raise ModelError(f"model {target!r}: expected 'package.module:factory'")
    try:
        mod = importlib.import_module(modname)
    except Exception as e:  # ImportError, or any error the module raises while it is imported
        raise ModelError(f"cannot import module {modname!r} for model {target!r}: "
                        f"{type(e).__name__}: {e}") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"module {modname!r} has no attribute {attr!r} (model {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{target!r} is not callable (it is a {type(obj).__name__})")
    try:
        result = obj(**kw)
    except Exception as e:  # the user's factory failed: say where, without our traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"model factory {target!r} raised {type(e).__name__}: {first}") from e
    info = {"adapter": "factory", "factory": target, "kwargs": {k: repr(v) for k, v in kw.items()}}
    if isinstance(result, ModelSpec):
        spec = result
        if weights is not None:
            spec.info["weights"] = _load_weights(spec.module, weights, sha256, target)
        spec.info = {**info, **spec.info}
        return spec
    if not isinstance(result, nn.Module):
        raise ModelError(f"{target!r} returned a {type(result).__name__}; expected an nn.Module or a ModelSpec")
    module = result
    if weights is not None:
        info["weights"] = _load_weights(module, weights, sha256, target)
    return spec_from_module(module, name=target, info=info)


def spec_from_module(module: nn.Module, name: str | None = None, info: dict | None = None) -> ModelSpec:
    """Wrap a plain ImageNet-style classifier ``nn.Module`` as a `ModelSpec`: ImageNet mean/std,
    resize 256 + centre crop 224 bilinear; ImageNet class names for 1000 outputs, else ``class_{i}``;
    the default layer chosen by `default_layer`."""
    module.eval()
    pre = Preprocess(size=224, resize=256, mode="resize_crop", interpolation="bilinear",
                     mean=_IMAGENET_MEAN, std=_IMAGENET_STD)
    names, wnids = _class_names(_num_outputs(module, pre.size))
    return ModelSpec(name=name or type(module).__name__, module=module, preprocess=pre, class_names=names,
                     wnids=wnids, default_layer=default_layer(module, pre.size), info=dict(info or {}))
