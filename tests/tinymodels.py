"""Tiny deterministic models for tests (factory adapter, collectors): ``tinymodels:tiny_cnn``.

Import path: this file sits in ``tests/``, which pytest puts on ``sys.path`` (rootdir-relative test
modules without ``__init__.py``), so ``load_model("tinymodels:tiny_cnn")`` works inside tests.
"""

from __future__ import annotations

import torch
from torch import nn

from actatlas.models import ModelSpec, Preprocess


class TinyCNN(nn.Module):
    """conv1 (3->8, 3x3, s1, pad 1) -> relu1 -> conv2 (8->16, 3x3, s2, pad 1) -> relu2 -> mean -> fc.

    [b, 3, h, w] -> conv1 [b, 8, h, w] -> conv2 [b, 16, ceil(h/2), ceil(w/2)] -> logits [b, num_classes].
    ``conv2``'s post-ReLU output (``relu2``) is followed only by the spatial mean and the linear ``fc``.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@torch.no_grad()
def _init(module: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic init from a private generator (global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        fan_in = p[0].numel() if p.dim() > 1 else 1
        p.copy_(torch.randn(p.shape, generator=gen) * (fan_in ** -0.5 if p.dim() > 1 else 0.1))
    return module.eval()


def _build(num_classes: int) -> TinyCNN:
    with torch.random.fork_rng(devices=[]):
        return _init(TinyCNN(num_classes))


def tiny_cnn(num_classes: int = 10) -> ModelSpec:
    """A full ModelSpec: 32 px input (resize 36, centre crop 32), classes c0..c{k-1}, layer conv2."""
    return ModelSpec(
        name="tinymodels:tiny_cnn",
        module=_build(num_classes),
        preprocess=Preprocess(size=32, resize=36, mode="resize_crop", interpolation="bilinear",
                              mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),
        class_names=[f"c{i}" for i in range(num_classes)],
        default_layer="conv2",
        layers={"early": "conv1", "mid": "conv2", "logits": "fc"},
    )


def tiny_module(num_classes: int = 10) -> nn.Module:
    """The bare nn.Module (for the adapter's wrapping path: default preprocessing, class_{i})."""
    return _build(num_classes)


NOT_CALLABLE = 42


def slow_tiny_cnn(num_classes: int = 10, delay: float = 0.05) -> ModelSpec:
    """`tiny_cnn` whose every forward sleeps `delay` seconds: a stand-in for a slow real model, so a
    subprocess test can kill a collect part-way (resume and locking tests)."""
    import time

    spec = tiny_cnn(num_classes)
    spec.name = "tinymodels:slow_tiny_cnn"
    spec.module.register_forward_pre_hook(lambda mod, inp: time.sleep(delay))
    return spec


def broken_factory(num_classes: int = 10) -> ModelSpec:
    """A user factory that fails (for the CLI's one-line error on a raising ``module:factory``)."""
    raise RuntimeError("checkpoint shape mismatch in layer 3\nmore detail on a second line")
