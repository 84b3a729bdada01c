"""EfficientNet-Lite0 accuracy on the 1000 ImageNet sample photos (one per class), through `actatlas eval`.

The sample lives in ``../shared/data/imagenet-sample`` beside the repository (see its README); the test
is skipped when it is absent. Expected about 88.8% top-1 / 97.7% top-5 (docs/models.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"ImageNet sample photos not found at {SAMPLE} "
                                                "(they sit beside the repository in CI, not in a fresh clone)")
def test_efficientnet_lite0_accuracy_on_imagenet_sample():
    res = subprocess.run([sys.executable, "-m", "actatlas.cli", "eval", "--model", "efficientnet_lite0",
                          "--images", str(SAMPLE), "--batch-size", "50", "--json", "-q"],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"efficientnet_lite0 on the sample: top-1 {out['top1']:.1%}, top-5 {out['top5']:.1%}, "
          f"{out['images_per_s']:.1f} images/s")
    assert out["n"] == 1000 and out["skipped"] == 0
    assert out["top1"] >= 0.85, f"top-1 {out['top1']:.1%} < 85%"
    assert out["top5"] >= 0.95, f"top-5 {out['top5']:.1%} < 95%"
    assert set(out) >= {"top1", "top5", "n", "images_per_s"}
