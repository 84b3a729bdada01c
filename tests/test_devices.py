"""Devices and mixed precision: clear errors for a missing GPU, --amp within its documented tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import actatlas as aa
from actatlas.cli import main
from actatlas.collect import AMP_MIN_COSINE, CollectConfig, layer_shapes, process_batch
from actatlas.devices import resolve_device
from test_collect import make_folder

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_resolve_device():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(aa.UserError, match="not a torch device"):
        resolve_device("gpu0")


@no_cuda
@pytest.mark.parametrize("command", ["collect", "eval", "build", "render"])
def test_cuda_without_a_gpu_is_a_clear_user_error(command, tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs", 2)
    args = {
        "collect": ["collect", "-m", "tinymodels:tiny_cnn", "-i", str(folder), "-o", str(tmp_path / "r")],
        "eval": ["eval", "-m", "tinymodels:tiny_cnn", "-i", str(folder)],
        "build": ["build", "-m", "tinymodels:tiny_cnn", "-i", str(folder), "-o", str(tmp_path / "r")],
        "render": ["render", str(tmp_path / "r")],
    }[command]
    if command == "render":  # needs a run up to the grid; the device check comes before any work
        aa.collect(aa.load_model("tinymodels:tiny_cnn"), aa.images(folder), tmp_path / "r", progress=False)
    assert main([*args, "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "cpu device" in err


def _pixels(spec, folder):
    src = aa.images(folder)
    return torch.from_numpy(np.stack([spec.preprocess.to_uint8(src.load(it)) for it in src]))


def test_amp_activations_within_tolerance(tmp_path):
    spec = aa.load_model("tinymodels:tiny_cnn")
    x = _pixels(spec, make_folder(tmp_path / "imgs", 6))
    shapes = layer_shapes(spec, ["conv2"], "cpu")
    out = {amp: process_batch(spec, {"conv2": "conv2"}, shapes, x, np.arange(6),
                              CollectConfig(per_image=4, attributions="none", amp=amp))["conv2"]
           for amp in (False, True)}
    a, b = out[False].activations.astype(np.float64), out[True].activations.astype(np.float64)
    assert b.dtype == a.dtype and a.shape == b.shape == (24, 16)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    assert cos.min() >= AMP_MIN_COSINE
    assert not np.array_equal(a, b)  # autocast really ran in lower precision
    np.testing.assert_array_equal(out[False].y, out[True].y)


def test_amp_is_refused_with_attributions_and_changes_the_hash(tmp_path):
    spec = aa.load_model("tinymodels:tiny_cnn")
    folder = make_folder(tmp_path / "imgs", 3)
    with pytest.raises(aa.UserError, match="attributions=.none."):
        aa.collect(spec, aa.images(folder), tmp_path / "a", amp=True, progress=False)
    aa.collect(spec, aa.images(folder), tmp_path / "r", attributions="none", progress=False)
    with pytest.raises(aa.UserError, match="different config"):
        aa.collect(spec, aa.images(folder), tmp_path / "r", attributions="none", amp=True, progress=False)
