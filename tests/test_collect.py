"""Collector: attribution identity, store round trip, resume after SIGKILL, locking, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import actatlas as aa
from actatlas.collect import CollectConfig, layer_shapes, process_batch, sample_positions

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "actatlas.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def make_folder(root: Path, n: int, size: int = 48, seed: int = 0) -> Path:
    """n small RGB photos-like images named with real wnid prefixes (labels known)."""
    rng = np.random.default_rng(seed)
    names, wnids = aa.models.imagenet_classes()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 8 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{wnids[i % 10]}_{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def tiny():
    import tinymodels

    return aa.load_model("tinymodels:tiny_cnn")


# --------------------------------------------------------------------------------------------
# attribution identity (method.md §1.3, §7.A3)


@pytest.fixture(scope="module")
def lite0():
    return aa.load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def two_images(lite0):
    src = aa.images("sample:2", seed=3)
    return torch.from_numpy(np.stack([lite0.preprocess.to_uint8(src.load(it)) for it in src]))


def test_attributions_sum_to_logit_minus_bias_at_head(lite0, two_images):
    cfg = CollectConfig(positions="all", attributions="full")
    layers = {"head": "head"}
    shapes = layer_shapes(lite0, ["head"], "cpu")
    assert shapes["head"] == (1280, 7, 7)
    res = process_batch(lite0, layers, shapes, two_images, np.array([0, 1]), cfg)["head"]
    attr = res.attributions.astype(np.float64).reshape(2, 49, -1)        # float16 on disk
    x = lite0.preprocess.normalize(two_images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = lite0.module(x).double()
    bias = lite0.module.get_submodule("classifier").bias.double()
    target = (logits - bias).numpy()
    total = attr.sum(axis=1)
    scale = np.abs(target).max()
    assert np.abs(total - target).max() <= 1e-3 * scale + 5e-3
    # per position: attr_c(y, x) = W_c . h_{y,x} / 49 (linear head after GAP)
    W = lite0.module.get_submodule("classifier").weight.double().numpy()
    h = res.activations.astype(np.float64).reshape(2, 49, -1)
    np.testing.assert_allclose(attr, h @ W.T / 49, atol=2e-2, rtol=2e-2)  # float16 storage


def test_jvp_attribution_equals_per_class_autograd(lite0, two_images):
    """At a mid layer (nonlinear rest of the network), the one-JVP result equals a VJP per class."""
    layer = "blocks.8"
    cfg = CollectConfig(positions="random", per_image=2, attributions="full", seed=5)
    shapes = layer_shapes(lite0, [layer], "cpu")
    res = process_batch(lite0, {layer: layer}, shapes, two_images, np.array([0, 1]), cfg)[layer]
    # reference: autograd loop over a few classes
    x = lite0.preprocess.normalize(two_images).contiguous(memory_format=torch.channels_last)
    feats = {}

    def leaf(mod, inp, out):  # make the layer output a leaf we can differentiate against
        feats["h"] = out.detach().requires_grad_(True)
        return feats["h"]

    hnd = lite0.module.get_submodule(layer).register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            logits = lite0.module(x)
            h = feats["h"]
            for c in [0, 2, 147, 999]:
                g, = torch.autograd.grad(logits[:, c].sum(), h, retain_graph=True)
                for row in range(4):
                    b = row // 2
                    yy, xx = int(res.y[row]), int(res.x[row])
                    ref = float((g[b, :, yy, xx] * h[b, :, yy, xx]).sum().detach())
                    got_v = float(res.attributions[row, c])
                    assert abs(got_v - ref) <= 2e-3 * max(1.0, abs(ref)), (c, row, got_v, ref)
    finally:
        hnd.remove()
    # activations are the layer output at the sampled positions
    assert res.activations.shape == (4, 112)
    np.testing.assert_allclose(res.activations[0], h[0, :, int(res.y[0]), int(res.x[0])].detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_random_positions_avoid_border_and_are_deterministic():
    cfg = CollectConfig(positions="random", per_image=5, seed=1)
    a = sample_positions(14, 14, 7, "blocks.8", cfg)
    b = sample_positions(14, 14, 7, "blocks.8", cfg)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(p) for p in a}) == 5
    assert a.min() >= 1 and a.max() <= 12
    assert not np.array_equal(a, sample_positions(14, 14, 8, "blocks.8", cfg))
    assert sample_positions(14, 14, 7, "x", CollectConfig(positions="center")).tolist() == [[7, 7]]
    assert len(sample_positions(3, 4, 0, "x", CollectConfig(positions="all"))) == 12
    # too small for a border: whole map
    assert sample_positions(1, 1, 0, "x", cfg).tolist() == [[0, 0]]


# --------------------------------------------------------------------------------------------
# store round trip through the Python API


def test_collect_round_trip_and_provenance(tiny, tmp_path):
    folder = make_folder(tmp_path / "imgs", 13)
    res = aa.collect(tiny, aa.images(folder), tmp_path / "run", layers=["conv1", "conv2"], per_image=2,
                     batch_size=4, shard_size=5, progress=False)
    assert res.images == 13 and res.skipped == 0
    assert res.rows_per_layer == {"conv1": 26, "conv2": 26}
    run = aa.open_run(tmp_path / "run")
    assert run.layers == ["conv1", "conv2"]
    acts = run.activations("conv2")
    attr = run.attributions("conv2")
    assert isinstance(acts, np.memmap) and acts.shape[0] == 26
    assert attr.shape == (26, tiny.num_classes) and attr.dtype == np.float16
    rows = run.rows("conv2")
    assert list(rows.image) == [i for i in range(13) for _ in range(2)]
    names, wnids = aa.models.imagenet_classes()
    assert rows.label[0] == -1 or rows.label[0] >= 0  # tiny model has its own classes
    assert rows.path[0].endswith("_0000.png")
    # shards were consolidated and removed
    assert not (tmp_path / "run" / "collect" / "shards").exists()
    # rerun with the same config does nothing
    again = aa.collect(tiny, aa.images(folder), tmp_path / "run", layers=["conv1", "conv2"], per_image=2,
                       batch_size=4, shard_size=5, progress=False)
    assert again.already_complete
    # a different config is refused without --overwrite
    with pytest.raises(aa.UserError, match="different config"):
        aa.collect(tiny, aa.images(folder), tmp_path / "run", layers=["conv1"], progress=False)


def test_rows_match_a_recomputation(tiny, tmp_path):
    """Stored activations equal the layer output at the stored (y, x) of the stored image."""
    folder = make_folder(tmp_path / "imgs", 6)
    aa.collect(tiny, aa.images(folder), tmp_path / "run", layers=["conv2"], attributions="topk", topk=3,
               progress=False)
    run = aa.open_run(tmp_path / "run")
    rows, acts = run.rows("conv2"), run.activations("conv2")
    src = aa.images(folder)
    idx, val = run.attribution_topk("conv2")
    assert idx.shape == (6, 3) and np.all(np.diff(val, axis=1) <= 0)
    for r in [0, 5]:
        img = torch.from_numpy(tiny.preprocess.to_uint8(src.load(src[int(rows.image[r])])))[None]
        with aa.capture(tiny.module, ["conv2"]) as got, torch.no_grad():
            logits = tiny.module(tiny.preprocess.normalize(img))
        np.testing.assert_allclose(acts[r], got["conv2"][0, :, rows.y[r], rows.x[r]].numpy(), rtol=1e-5, atol=1e-6)
        assert rows.top5[r][0] == int(logits.argmax())


def test_batch_size_does_not_change_rows(tiny, tmp_path):
    folder = make_folder(tmp_path / "imgs", 9)
    for bs in (1, 4):
        aa.collect(tiny, aa.images(folder), tmp_path / f"r{bs}", batch_size=bs, progress=False)
    a, b = aa.open_run(tmp_path / "r1"), aa.open_run(tmp_path / "r4")
    layer = a.layers[0]
    np.testing.assert_allclose(a.activations(layer), b.activations(layer), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.rows(layer).y, b.rows(layer).y)


def test_corrupt_and_odd_images_are_converted_or_skipped(tiny, tmp_path):
    folder = make_folder(tmp_path / "imgs", 4)
    (folder / "n01440764_bad.jpg").write_text("not an image")
    Image.new("CMYK", (40, 40), (10, 20, 30, 0)).save(folder / "n01440764_cmyk.jpg")
    Image.fromarray(np.full((40, 40), 60000, np.uint16)).save(folder / "n01440764_16bit.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(folder / "n01440764_rgba.png")
    Image.new("P", (40, 40), 3).save(folder / "n01440764_pal.png")
    res = aa.collect(tiny, aa.images(folder), tmp_path / "run", progress=False)
    assert res.skipped == 1 and res.images == 8
    run = aa.open_run(tmp_path / "run")
    assert [s["path"].endswith("n01440764_bad.jpg") for s in run.summary["skipped"]] == [True]


# --------------------------------------------------------------------------------------------
# resume after SIGKILL, concurrent refusal (real subprocesses)


def _collect_args(folder, out):
    return ["collect", "--model", "tinymodels:slow_tiny_cnn", "--images", str(folder), "--out", str(out),
            "--batch-size", "2", "--shard-size", "4", "--per-image", "2", "--layers", "conv1,conv2", "-q",
            "--json"]


def _start(args):
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "actatlas.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow  # real subprocesses of the CLI
def test_resume_after_sigkill_gives_identical_rows(tmp_path):
    folder = make_folder(tmp_path / "imgs", 24)
    full = cli(*_collect_args(folder, tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    shards = tmp_path / "killed" / "collect" / "shards"
    proc = _start(_collect_args(folder, tmp_path / "killed"))
    try:
        assert _wait_for(lambda: shards.is_dir() and len(list(shards.glob("shard-*"))) >= 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    n_done = len(list(shards.glob("shard-*")))
    assert 2 <= n_done < 6, "the run must be killed part-way"
    assert not (tmp_path / "killed" / "collect" / "complete.json").exists()
    resumed = cli(*_collect_args(folder, tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_shards"] == n_done
    a, b = aa.open_run(tmp_path / "full"), aa.open_run(tmp_path / "killed")
    for layer in ["conv1", "conv2"]:
        np.testing.assert_array_equal(a.activations(layer), b.activations(layer))
        np.testing.assert_array_equal(a.attributions(layer), b.attributions(layer))
        assert a.rows_table(layer).equals(b.rows_table(layer))
        assert len(a.activations(layer)) == 48


@pytest.mark.slow  # real subprocesses of the CLI
def test_second_concurrent_collect_is_refused(tmp_path):
    folder = make_folder(tmp_path / "imgs", 24)
    out = tmp_path / "run"
    proc = _start(_collect_args(folder, out))
    try:
        assert _wait_for(lambda: (out / ".lock").exists() and (out / "manifest.json").exists())
        second = cli(*_collect_args(folder, out))
        assert second.returncode == 2
        assert "is writing into" in second.stderr and "Traceback" not in second.stderr
    finally:
        proc.kill()
        proc.wait(30)


# --------------------------------------------------------------------------------------------
# CLI user errors: one clear line, non-zero exit, no traceback


@pytest.mark.parametrize("args, needle", [
    (["collect", "--model", "nosuchmodel", "--images", "sample:2", "--out", "{tmp}/r"], "efficientnet_lite0"),
    (["collect", "--model", "tinymodels:tiny_cnn", "--layers", "nosuch", "--images", "sample:2", "--out", "{tmp}/r"],
     "Aliases"),
    (["collect", "--model", "tinymodels:tiny_cnn", "--images", "{tmp}/empty", "--out", "{tmp}/r"], "no images"),
    (["collect", "--model", "tinymodels:tiny_cnn", "--images", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
    (["layers", "nosuchmodel"], "unknown model"),
    (["collect", "--model", "tinymodels:tiny_cnn", "--images", "sample:2", "--out", "{tmp}/r", "--batch-size", "0"],
     "batch-size"),
])
def test_cli_user_errors(tmp_path, capsys, args, needle):
    from actatlas.cli import main

    (tmp_path / "empty").mkdir()
    rc = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert needle in err
    assert err.strip().count("\n") == 0, err


@pytest.mark.slow  # real subprocesses of the CLI
def test_cli_collect_json_and_layers(tmp_path):
    res = cli("collect", "--model", "tinymodels:tiny_cnn", "--images", "sample:6", "--out", str(tmp_path / "r"),
              "--json", "-q")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"rows", "images", "skipped", "seconds", "images_per_s"} <= set(summary)
    assert summary["rows"] == 6 and summary["images"] == 6 and summary["skipped"] == 0
    lay = cli("layers", "tinymodels:tiny_cnn", "--json")
    assert lay.returncode == 0, lay.stderr
    info = json.loads(lay.stdout.strip().splitlines()[-1])
    assert info["default_layer"] == "conv2"
    assert any(layer["name"] == "conv2" for layer in info["layers"])


# --------------------------------------------------------------------------------------------
# smooth max-pool gradient relaxation in collection (method.md §1.3, §7.A3 last bullet)


@pytest.mark.slow  # the InceptionV1 architecture
def test_smooth_maxpool_changes_attributions_only_through_maxpools(tmp_path):
    """InceptionV1 (random init): mixed5b -> logits has no max-pool, so its attributions are identical
    with and without the relaxation; mixed4c's path has max-pools (mixed4d/4e pool branches, maxpool10),
    so its attributions change while activations and predictions stay the same."""
    spec = aa.load_model("inceptionv1")
    folder = make_folder(tmp_path / "imgs", 3, size=64)
    runs = {}
    for smooth in (False, True):
        out = tmp_path / f"run-{smooth}"
        aa.collect(spec, aa.images(folder), out, layers=["mixed4c", "mixed5b"], per_image=2, batch_size=3,
                   smooth_maxpool=smooth, progress=False)
        runs[smooth] = aa.open_run(out)
    a, b = runs[False], runs[True]
    assert a.config.get("smooth_maxpool") is None and b.config.get("smooth_maxpool") is True
    for layer in ("mixed4c", "mixed5b"):
        np.testing.assert_array_equal(a.activations(layer), b.activations(layer))
    np.testing.assert_array_equal(a.attributions("mixed5b"), b.attributions("mixed5b"))
    d = np.abs(np.asarray(a.attributions("mixed4c"), np.float32) - np.asarray(b.attributions("mixed4c"), np.float32))
    assert d.max() > 1e-3 * np.abs(np.asarray(a.attributions("mixed4c"), np.float32)).max()


@pytest.mark.slow  # the InceptionV1 architecture
def test_model_labels_option(tmp_path):
    """--labels names InceptionV1's logits; models without such an option refuse it clearly."""
    names, wnids = aa.models.imagenet_classes()
    labels = tmp_path / "labels.txt"
    labels.write_text("dummy\n" + "".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
    r = cli("layers", "inceptionv1", "--labels", str(labels))
    assert r.returncode == 0, r.stderr
    spec = aa.load_model("inceptionv1", labels=str(labels))
    assert spec.class_names[1] == names[0] and spec.wnids[1] == wnids[0]
    r = cli("layers", "efficientnet_lite0", "--labels", str(labels))
    assert r.returncode == 2 and "takes no option labels" in r.stderr and "Traceback" not in r.stderr
