"""A tiny model whose predictions spread over its classes, for the patch-attack tests.

``tinymodels.tiny_cnn`` predicts almost only two classes on generated images; here its logits are
standardised per class (fc weights and bias rescaled) over a fixed, seeded calibration set of the same
kind of images, so several classes get predicted. Deterministic: ``patchmodels:balanced_tiny_cnn``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tinymodels import tiny_cnn


def generated_image(rng: np.random.Generator) -> Image.Image:
    """36 px RGB: a random base colour, a random rectangle of another colour, Gaussian pixel noise."""
    a = np.empty((36, 36, 3), np.float64)
    a[:] = rng.integers(0, 256, 3)
    y0, x0 = rng.integers(0, 24, 2)
    h, w = rng.integers(6, 14, 2)
    a[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    a += rng.normal(0, 25, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def balanced_tiny_cnn(num_classes: int = 10):
    """`tiny_cnn` with per-class standardised logits (calibrated on 300 seeded generated images)."""
    spec = tiny_cnn(num_classes)
    spec.name = "patchmodels:balanced_tiny_cnn"
    rng = np.random.default_rng(123)
    arr = np.stack([np.asarray(spec.preprocess.geometry(generated_image(rng))).transpose(2, 0, 1)
                    for _ in range(300)])
    m = spec.module
    with torch.no_grad():
        z = m(spec.preprocess.normalize(torch.from_numpy(arr)))
        mu, sd = z.mean(0), z.std(0).clamp_min(1e-6)
        m.fc.weight.div_(sd[:, None])
        m.fc.bias.sub_(mu).div_(sd)
    return spec


def labelled_folder(spec, folder, n: int, seed: int, name: str = "im{k:02d}.png"):
    """`n` generated images saved under `folder`/c<class>/ by `spec`'s own predictions, so every image
    is "correctly classified". Returns (images, predicted classes)."""
    rng = np.random.default_rng(seed)
    imgs = [generated_image(rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(spec.preprocess.geometry(im)).transpose(2, 0, 1) for im in imgs]))
    with torch.no_grad():
        pred = spec.module(spec.preprocess.normalize(x)).argmax(1).tolist()
    for k, (im, c) in enumerate(zip(imgs, pred)):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        im.save(folder / f"c{c}" / name.format(k=k))
    return imgs, pred
