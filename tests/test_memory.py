"""Bounded memory: collection streams, so its peak RSS does not grow with the number of images.

Each collect runs in a fresh subprocess (tiny model with 1000 classes, 8 positions per image, full
float16 attributions: ~16 KB of rows per image, so 2,000 images make ~33 MB of store) and reports
its peak resident set (VmHWM). Holding the rows, or writing the store through a memory map, would
add tens of MB to the 2,000-image run; streaming keeps both runs within a few MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow  # collects 2,000 images in subprocesses

CHILD = r"""
import json, sys
import numpy as np
import actatlas as aa
import tinymodels

folder, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = tinymodels.tiny_cnn(num_classes=1000)
src = aa.images(folder).head(n)
res = aa.collect(spec, src, out, layers=["conv2"], per_image=8, attributions="full", batch_size=32,
                 shard_size=100, threads=1, loader_threads=1, progress=False)
status = open("/proc/self/status").read().split("\n")
kb = {l.split(":")[0]: int(l.split()[1]) for l in status if l.startswith(("VmHWM", "VmRSS"))}
store = sum(f.stat().st_size for f in __import__("pathlib").Path(out, "collect").rglob("*.npy"))
print(json.dumps({"rows": res.rows, "hwm_kb": kb["VmHWM"], "store_bytes": store}))
"""


def _peak(folder: Path, out: Path, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), str(n)], capture_output=True,
                       text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux) for VmHWM")
def test_collect_peak_rss_does_not_grow_with_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2000):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"img_{i:05d}.png")
    small = _peak(folder, tmp_path / "r200", 200)
    large = _peak(folder, tmp_path / "r2000", 2000)
    assert small["rows"] == 1600 and large["rows"] == 16000
    grown_store = large["store_bytes"] - small["store_bytes"]
    assert grown_store > 25e6  # the larger store really is tens of MB bigger
    grown_rss = (large["hwm_kb"] - small["hwm_kb"]) * 1024
    # streaming: the extra store size must not show up in memory (allow 8 MB of allocator noise)
    assert grown_rss < 8e6, (f"peak RSS grew by {grown_rss / 1e6:.1f} MB for {grown_store / 1e6:.1f} MB more "
                             f"rows (200 images: {small['hwm_kb'] / 1e3:.0f} MB, 2000: {large['hwm_kb'] / 1e3:.0f} MB)")
