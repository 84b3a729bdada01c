"""`actatlas patch-attack` / `find-patches` and ``actatlas.analysis.attack`` on a tiny model.

The image folder is labelled by the tiny model's own predictions (class sub-folders c0..c9), so every
image is "correctly classified" and the expected number of source images is known exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import actatlas as aa
from actatlas.analysis.attack import (cell_patch, find_patches, parse_cell_spec, prepare_attack_set, ImageBank,
                                      labelled_images)
from actatlas.analysis.patches import patch_attack
from actatlas.cli import main
from actatlas.collect import CollectConfig
from actatlas.errors import UserError
from actatlas.layout import LayoutConfig
from actatlas.render import RenderConfig

TESTS = Path(__file__).resolve().parent
MODEL = "patchmodels:balanced_tiny_cnn"
KEYS = ("static_success", "dynamic_success", "correct_before", "p_target_before", "p_target_after")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from patchmodels import labelled_folder  # tests/ on sys.path

    root = tmp_path_factory.mktemp("patches")
    spec = aa.load_model(MODEL)
    folder = root / "imgs"
    imgs, pred = labelled_folder(spec, folder, 48, seed=1)
    counts = Counter(pred)
    target = counts.most_common(1)[0][0]
    rare = [c for c, n in counts.items() if 1 <= n < 5 and c != target]
    common = [c for c, n in counts.items() if n >= 2 and c != target]
    assert len(counts) >= 3 and rare and common, f"need varied predictions, got {counts}"
    run = root / "run"
    aa.build_atlas(str(folder), out=run, model=MODEL, levels=(2, 4), min_count=2,
                   collect=CollectConfig(per_image=8, batch_size=32), layout=LayoutConfig(method="pca"),
                   render=dataclasses.replace(RenderConfig.cpu_default(), steps=6, icon_size=24, batch_size=8),
                   runtime=aa.Runtime(progress=False, numba_cache=False))
    patch = root / "stripes.png"
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:, ::4] = (255, 20, 20)
    arr[::5] = (20, 20, 255)
    Image.fromarray(arr).save(patch)
    return dict(root=root, spec=spec, folder=folder, run=run, counts=counts, target=target, rare=rare[0],
                common=common[0], patch=patch, pred=pred, imgs=imgs)


def _main_json(capsys, argv):
    rc = main(argv + ["--json", "--quiet", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "actatlas.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _check_summary(s: dict):
    for k in KEYS:
        assert k in s and k in s["noise"], k
    for r in (s, s["noise"]):
        for k in ("static_success", "dynamic_success"):
            assert 0.0 <= r[k] <= 1.0
        assert r["static_success"] <= r["dynamic_success"]
        assert 0.0 <= r["p_target_before"] <= 1.0 and 0.0 <= r["p_target_after"] <= 1.0
    assert s["noise"]["correct_before"] == s["correct_before"]


def test_cli_patch_attack_png_matches_core(world, tmp_path):
    """Subprocess CLI with a PNG patch, no --source: summary keys, ranges, noise with the same grid, and
    exactly the numbers of the core ``patch_attack`` on the same images."""
    t = world["target"]
    out = tmp_path / "rep"
    res = _cli("patch-attack", "--model", MODEL, "--images", str(world["folder"]), "--target",
               f"c{t}", "--patch", str(world["patch"]), "--sizes", "0.25,0.5", "--corners", "4", "--out", str(out),
               "--json", "--quiet", "--threads", "1")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout.strip().splitlines()[-1])
    _check_summary(s)
    n_src = sum(n for c, n in world["counts"].items() if c != t)
    assert s["correct_before"] == n_src and s["source_fallback"] is False
    # the full report: same sizes and corners for the patch and its noise control
    data = json.loads((Path(s["patches"][0]["report"]["json"])).read_text())
    assert [(g["size"], g["corner"]) for g in data["grid"]] == [(g["size"], g["corner"]) for g in data["noise"]["grid"]]
    assert len(data["grid"]) == 8 and Path(s["patches"][0]["report"]["png"]).is_file()
    assert Path(s["patches"][0]["report"]["csv"]).read_text().count("\n") == 17
    # same numbers as the core function on the same images and labels
    spec = world["spec"]
    imgs = labelled_images(str(world["folder"]), spec)
    ims = [Image.open(p).convert("RGB") for p in imgs.paths]
    core = patch_attack(spec, ims, imgs.labels, None, t, Image.open(world["patch"]), sizes=(0.25, 0.5), corners=4)
    for k in ("static_success", "dynamic_success", "correct_before", "p_target_after_dynamic"):
        assert s[k] == pytest.approx(core[k], abs=1e-6)
        assert s["noise"][k] == pytest.approx(core["noise"][k], abs=1e-6)
    assert s["p_target_before"] == pytest.approx(core["p_target_before"], abs=1e-6)


def test_fallback_to_other_classes_is_reported(world, capsys):
    t, rare = world["target"], world["rare"]
    base = ["patch-attack", "--model", MODEL, "--images", str(world["folder"]), "--target",
            str(t), "--patch", str(world["patch"]), "--sizes", "0.3,0.6", "--corners", "2",
            "--out", str(world["root"] / "fb")]
    s, err = _main_json(capsys, base + ["--source", f"c{rare}"])
    assert s["source_fallback"] is True and "falling back" in s["source_note"]
    assert "note:" in err and "falling back" in err
    assert s["correct_before"] == sum(n for c, n in world["counts"].items() if c != t)
    assert s["source_set"]["source_class_correct"] == world["counts"][rare]
    # enough images of the source class: no fallback, only that class
    s2, _ = _main_json(capsys, base + ["--source", f"c{rare}", "--min-source", "1"])
    assert s2["source_fallback"] is False and s2["correct_before"] == world["counts"][rare]
    # the API: --max-images caps the set reproducibly
    bank = ImageBank(world["spec"], labelled_images(str(world["folder"]), world["spec"]), progress=False)
    a = prepare_attack_set(bank, t, None, max_images=5, seed=3)
    b = prepare_attack_set(bank, t, None, max_images=5, seed=3)
    assert a.n == 5 and a.indices.tolist() == b.indices.tolist() and t not in a.labels.tolist()


def test_cell_spec_patch_and_errors(world, capsys, tmp_path):
    run = world["run"]
    from actatlas.grid import load_grid

    g4 = [g for g in load_grid(run / "grid", "conv2") if g.size == 4][0]
    i, j = int(g4.i[0]), int(g4.j[0])
    img = cell_patch(run, "conv2", 4, i, j, size_px=20, steps=3)
    assert img.size == (20, 20) and img.mode == "RGB" and np.asarray(img).std() > 0
    spec_text = f"{run}:conv2:4:{i}:{j}"
    assert parse_cell_spec(spec_text).level == 4
    s, _ = _main_json(capsys, ["patch-attack", "--model", MODEL, "--images", str(world["folder"]),
                               "--target", str(world["target"]), "--patch", spec_text, "--patch", str(world["patch"]),
                               "--patch-size-px", "20", "--render-steps", "3", "--sizes", "0.5", "--corners", "1",
                               "--out", str(tmp_path / "cell")])
    assert len(s["patches"]) == 2 and s["best_patch"] in {p["name"] for p in s["patches"]}
    _check_summary(s)
    cell_png = Image.open(s["patches"][0]["patch_png"])
    assert cell_png.size == (20, 20) and s["patches"][0]["info"]["n"] == int(g4.count[0])
    best = max(s["patches"], key=lambda p: p["lift_static"])
    assert s["static_success"] == best["static_success"]
    # a malformed cell spec: clean error, no traceback (real subprocess)
    res = _cli("patch-attack", "--model", MODEL, "--images", str(world["folder"]), "--target", "c1",
               "--patch", f"{run}:conv2:4:x:1", "--out", str(tmp_path / "bad"))
    assert res.returncode != 0 and "malformed cell spec" in res.stderr and "Traceback" not in res.stderr
    # a cell that does not exist lists the ones that do; a missing PNG; an unknown class
    for argv, needle in (([ "--patch", f"{run}:conv2:4:99:99"], f"{i}:{j}"),
                         (["--patch", f"{run}:conv2:7:0:0"], "levels: 2, 4"),
                         (["--patch", str(tmp_path / "nope.png")], "no such image file"),
                         (["--patch", str(world["patch"]), "--target", "nosuchclass"], "unknown class")):
        full = ["patch-attack", "--model", MODEL, "--images", str(world["folder"]), "--target", "c1",
                "--out", str(tmp_path / "bad"), "--quiet"] + argv
        assert main(full) == 2
        err = capsys.readouterr().err
        assert needle in err, (needle, err)
    with pytest.raises(UserError, match="malformed"):
        parse_cell_spec("runs/x:conv2:4")


def test_find_patches_ranking(world, capsys, tmp_path):
    run = aa.open_run(world["run"])
    attr = np.asarray(run.attributions("conv2"), np.float32)
    # one class wins most rows' attributions here; comparing the next two leaves it as the third class of
    # candidate cells on both sides
    left, right = [int(k) for k in np.argsort(-np.bincount(attr.argmax(1), minlength=attr.shape[1]),
                                              kind="stable")[1:3]]
    out = tmp_path / "fp"
    s, err = _main_json(capsys, ["find-patches", str(world["run"]), "--layer", "conv2", "--left", str(left),
                                 "--right", f"c{right}", "--max-candidates", "4", "--patch-px", "16",
                                 "--render-steps", "3", "--sizes", "0.3,0.6", "--corners", "2", "--top", "200",
                                 "--grid", "4", "--y-method", "pca", "--min-count", "2", "--out", str(out)])
    ranking = s["ranking"]
    assert s["candidates"], "the tiny comparison should have candidate cells"
    assert len(ranking) == min(4, len(s["candidates"]))
    assert {r["side"] for r in ranking} == {"left", "right"} or {c["side"] for c in s["candidates"]} != {"left", "right"}
    scores = [r["score"] for r in ranking if r["score"] is not None]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in ranking] == list(range(1, len(ranking) + 1))
    for r in ranking:
        assert r["top_class"] not in (left, right)
        assert (r["source"], r["target"]) == ((left, right) if r["side"] == "right" else (right, left))
        if r["score"] is not None:
            assert r["score"] == pytest.approx(r["static_success"] - r["noise"]["static_success"])
            assert r["lift_p_target"] == pytest.approx(r["p_target_after"] - r["noise"]["p_target_after"])
        assert Image.open(r["patch_png"]).size == (16, 16)
    doc = json.loads((out / "ranking.json").read_text())
    assert [r["rank"] for r in doc["ranking"]] == [r["rank"] for r in ranking]
    assert (out / "ranking.csv").read_text().count("\n") == len(ranking) + 1
    assert Image.open(out / "contact_sheet.png").size[0] > 100
    # the API gives the same ranking order as the CLI (same seed and settings)
    api = find_patches(world["run"], "conv2", left, right, max_candidates=4, patch_px=16, render_steps=3,
                       sizes=(0.3, 0.6), corners=2, top=200, grid=4, y_method="pca", min_count=2, progress=False)
    assert [(r["i"], r["j"], r["side"]) for r in api.ranking] == [(r["i"], r["j"], r["side"]) for r in ranking]
