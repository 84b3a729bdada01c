"""Models: `ModelSpec` (module + preprocessing + class names + layer aliases) and the registry.

Built in: ``efficientnet_lite0`` (embedded ImageNet weights, the default) and ``inceptionv1`` (Lucid's
GoogLeNet, weights from a file or URL). Adapters: ``torchvision:<name>``, ``timm:<name>`` and
``package.module:factory``.
"""

from .adapters import spec_from_module
from .registry import describe_models, list_models, load_model, prepare_spec, register
from .spec import ModelSpec, Preprocess, imagenet_classes, resolve_class

__all__ = [
    "ModelSpec",
    "Preprocess",
    "load_model",
    "list_models",
    "describe_models",
    "register",
    "prepare_spec",
    "spec_from_module",
    "imagenet_classes",
    "resolve_class",
]
