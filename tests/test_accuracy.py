"""EfficientNet-Lite0 accuracy on the 1000 ImageNet sample photos (one per class).

The sample lives in ``../shared/data/imagenet-sample`` beside the repository (see its README); the test
is skipped when it is absent. Expected about 88.8% top-1 / 97.7% top-5 (docs/models.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actatlas.models import imagenet_classes, load_model

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
BATCH = 50


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"ImageNet sample photos not found at {SAMPLE}")
def test_efficientnet_lite0_accuracy_on_imagenet_sample():
    torch.set_num_threads(2)
    files = sorted(SAMPLE.glob("*.JPEG"))
    assert len(files) == 1000, f"expected 1000 photos in {SAMPLE}, found {len(files)}"
    index = {wnid: i for i, wnid in enumerate(imagenet_classes()[1])}
    spec = load_model("efficientnet_lite0")
    pre = spec.preprocess
    top1 = top5 = 0
    for start in range(0, len(files), BATCH):
        chunk = files[start:start + BATCH]
        arrays = []
        for f in chunk:
            with Image.open(f) as img:
                arrays.append(pre.to_uint8(img.convert("RGB")))
        x = pre.normalize(torch.from_numpy(np.stack(arrays)))
        labels = torch.tensor([index[f.name.split("_", 1)[0]] for f in chunk])
        with torch.inference_mode():
            top = spec.module(x).topk(5, dim=1).indices
        top1 += int((top[:, 0] == labels).sum())
        top5 += int((top == labels[:, None]).any(dim=1).sum())
    acc1, acc5 = top1 / len(files), top5 / len(files)
    print(f"efficientnet_lite0 on {len(files)} sample photos: top-1 {acc1:.1%}, top-5 {acc5:.1%}")
    assert acc1 >= 0.85, f"top-1 {acc1:.1%} < 85%"
    assert acc5 >= 0.95, f"top-5 {acc5:.1%} < 95%"
