"""Bad input and faults: each gets one clear line and exit 2, is skipped and counted, or is refused;
nothing is left stuck for the next run (issue "Hardening"). Every row of the Reliability table in
BENCHMARKS.md comes from a test here or in tests/test_serve.py / tests/test_images.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import actatlas as aa
from actatlas.cli import main, parse_layers, parse_levels
from actatlas.cli.common import flag_names
from actatlas.collect import CollectConfig
from actatlas.errors import UserError
from conftest import fast_render, tiny_build
from actatlas.store import LayerBatch, RunLock, ShardWriter, consolidate, ensure_dir, run_lock

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

FAST = dict(steps=4, attempts=1, icon_size=16, batch_size=8)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, needle=None):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("actatlas: error:")]
    assert len(lines) == 1, err
    if needle:
        assert needle in lines[0], lines[0]
    return lines[0]


def photo_folder(root: Path, good: int, bad: int) -> Path:
    """`good` small RGB images, then `bad` zero-byte files that sort after them."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"a{i:03d}.png")
    for i in range(bad):
        (root / f"z{i:03d}.jpg").write_bytes(b"")
    return root


# ------------------------------------------------------------------------------------- empty shards

@pytest.mark.parametrize("attributions", ["full", "topk", "none"])
def test_shard_with_no_readable_image_stores_zero_rows_and_merges(tmp_path, capsys, attributions):
    imgs = photo_folder(tmp_path / "imgs", good=1, bad=3)
    out = tmp_path / "run"
    args = ["collect", "-m", "tinymodels:tiny_cnn", "--images", imgs, "--out", out, "--shard-size", 2,
            "--attributions", attributions, "--topk", 3, "-q"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    run = aa.open_run(out)
    acts = run.activations("conv2")
    assert acts.shape == (1, 16) and acts.dtype == np.float32
    assert len(run.summary["skipped"]) == 3 and run.summary["images"] == 1
    if attributions == "full":
        assert run.attributions("conv2").shape == (1, 10)
    if attributions == "topk":
        idx, val = run.attribution_topk("conv2")
        assert idx.shape == (1, 3) and val.shape == (1, 3)
    assert len(run.rows("conv2")) == 1
    rc, out2, err = run_cli(capsys, *args)          # a rerun finds it complete, not broken
    assert rc == 0 and "already complete" in out2, err


def test_legacy_flat_empty_shard_still_merges(tmp_path):
    """A store written before the fix holds a flat (0,) array for a shard with no rows: it merges."""
    store = tmp_path / "collect"
    widths = {"L": {"activations": 4, "attributions": 3}}
    paths, labels = ["a", "b", "c", "d"], np.zeros(4, np.int32)
    w0 = ShardWriter(store, 0, 0, 2, ["L"], np.float32, widths)
    w0.add("L", LayerBatch(activations=np.ones((2, 4), np.float32), image=np.array([0, 1]),
                           y=np.zeros(2, np.int16), x=np.zeros(2, np.int16), top5=np.zeros((2, 5), np.int32),
                           top5_prob=np.zeros((2, 5), np.float32), attributions=np.ones((2, 3), np.float16)))
    w0.commit(paths, labels)
    w1 = ShardWriter(store, 1, 2, 4, ["L"], np.float32, widths)
    w1.skip(2, "c", "bad")
    w1.skip(3, "d", "bad")
    w1.commit(paths, labels)
    shard1 = store / "shards" / "shard-000001" / "L"
    assert np.load(shard1 / "activations.npy").shape == (0, 4)     # the fix: the right width
    np.save(shard1 / "activations.npy", np.zeros(0, np.float32))     # what older versions wrote
    (shard1 / "attributions.npy").unlink()
    merged = consolidate(store, ["L"], 2)
    assert merged["rows"] == {"L": 2} and len(merged["skipped"]) == 2
    assert np.load(store / "L" / "activations.npy").shape == (2, 4)
    assert np.load(store / "L" / "attributions.npy").shape == (2, 3)


def test_folder_without_readable_image_is_one_line(tmp_path, capsys):
    imgs = photo_folder(tmp_path / "imgs", good=0, bad=3)
    rc, _, err = run_cli(capsys, "collect", "-m", "tinymodels:tiny_cnn", "--images", imgs,
                         "--out", tmp_path / "run", "-q")
    line = assert_one_line_error(rc, err, "no readable images: 3 files skipped, see ")
    listed = json.loads((tmp_path / "run" / "collect" / "skipped.json").read_text())
    assert len(listed) == 3 and str(tmp_path / "run" / "collect" / "skipped.json") in line
    assert not (tmp_path / "run" / "collect" / "complete.json").exists()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["collect"]["status"] != "complete"


# ------------------------------------------------------------------------------------- empty levels

def _build(out, **kw):
    args = dict(images="sample:40", levels=(2, 40), min_count=3, collect=CollectConfig(per_image=1),
                render=fast_render(**FAST))
    args.update(kw)
    return tiny_build(out, **args)


def test_empty_level_is_skipped_with_a_warning_and_the_rest_built(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="actatlas"):
        res = _build(tmp_path / "run")
    assert [lv.size for lv in res.levels] == [2]
    notes = [r.getMessage() for r in caplog.records if "grid level 40 skipped" in r.getMessage()]
    assert notes and "(per_image)" in notes[0] and "coarser level" in notes[0] and "more images" in notes[0]
    assert "(--per-image)" in flag_names(notes[0])            # how the CLI prints it
    index = json.loads((tmp_path / "run" / "grid" / "conv2" / "levels.json").read_text())
    assert index["kept"] == [2] and list(index["empty"]) == ["40"]
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert all(st["status"] == "complete" for st in stages.values())
    again = _build(tmp_path / "run")                                  # a rerun skips every stage
    assert [r.name for r in again.report.stages if r.ran] == ["assemble:conv2"]


def test_all_levels_empty_fails_and_is_never_marked_complete(tmp_path):
    with pytest.raises(UserError, match="no grid level has a cell"):
        _build(tmp_path / "run", levels=(30, 40))
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert stages["grid:conv2"]["status"] == "failed" and "no grid level" in stages["grid:conv2"]["error"]
    assert "render:conv2" not in stages
    res = _build(tmp_path / "run", levels=(2,))                       # the same run recovers
    assert [lv.size for lv in res.levels] == [2]


def test_failed_assemble_leaves_no_atlas_to_export(tmp_path, monkeypatch, capsys):
    from actatlas.atlas import Atlas

    _build(tmp_path / "run", levels=(2,))
    assert (tmp_path / "run" / "atlas" / "conv2" / "atlas.json").is_file()

    def broken_save(self, directory):
        raise ValueError("disk full (simulated)")

    monkeypatch.setattr(Atlas, "save", broken_save)
    with pytest.raises(ValueError, match="simulated"):
        _build(tmp_path / "run", levels=(2, 4))
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert stages["assemble:conv2"]["status"] == "failed"
    assert not (tmp_path / "run" / "atlas" / "conv2" / "atlas.json").exists()
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--out", tmp_path / "site")
    assert_one_line_error(rc, err, "no")                            # the stale atlas is not published
    monkeypatch.undo()
    res = _build(tmp_path / "run", levels=(2, 4))
    assert [lv.size for lv in res.levels] == [2, 4]


def test_levels_and_layers_parsing():
    assert parse_levels("10,20,40") == [10, 20, 40]
    assert parse_levels("10,5") == [5, 10]
    assert parse_levels(" 4, 4 ,8") == [4, 8]
    for bad in ("2,,4", "", ",", "a,b", "0,4", "-2"):
        with pytest.raises(UserError):
            parse_levels(bad)
    assert parse_layers(None) is None and parse_layers("a, b") == ("a", "b")
    for bad in ("", ",", "a,,b", " "):
        with pytest.raises(UserError):
            parse_layers(bad)


# ------------------------------------------------------------------------------------- locks

LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from actatlas.store import run_lock
    with run_lock(sys.argv[1], "build"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


@pytest.mark.slow  # a second process holds the lock
def test_every_stage_command_refuses_while_another_process_holds_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    _build(out, levels=(2,))
    before = (out / "manifest.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out), "60"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["layout", out, "--method", "pca"], ["grid", out, "--levels", "3"],
                     ["render", out, "--steps", "2", "--icon-size", "16"],
                     ["collect", "-m", "tinymodels:tiny_cnn", "--images", "sample:40", "--out", out, "-q"]):
            rc, _, err = run_cli(capsys, *args, "-q")
            assert_one_line_error(rc, err, "is writing into")
    finally:
        holder.kill()
        holder.wait(30)
    assert (out / "manifest.json").read_text() == before            # nothing was touched
    rc, _, err = run_cli(capsys, "grid", out, "--levels", "3", "-q")  # released with its process
    assert rc == 0, err


@pytest.mark.slow  # a second process holds the lock
def test_run_lock_is_reentrant_in_one_process(tmp_path):
    with run_lock(tmp_path, "build"):
        with run_lock(tmp_path, "stage"):
            pass
        with RunLock(tmp_path / ".lock", "again"):
            pass
    code = f"from actatlas.store import run_lock\nwith run_lock({str(tmp_path)!r}, 'x'): print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


# ------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("extra, needle", [
    (["--steps", "0"], "--steps 0"),
    (["--power", "nan"], "--power=nan"),
    (["--power", "-1"], "--power=-1"),
    (["--icon-size", "1"], "--icon-size=1 is out of range: must be an integer in [8, 1024]"),
    (["--icon-batch", "0"], "--icon-batch=0"),
    (["--levels", "2,,4"], "empty item"),
    (["--levels", "0,4"], ">= 1"),
])
def test_degenerate_build_options_are_refused(tmp_path, capsys, extra, needle):
    rc, _, err = run_cli(capsys, "build", "-m", "tinymodels:tiny_cnn", "--images", "sample:4",
                         "--out", tmp_path / "run", "-q", *extra)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()                            # refused before any work


def test_empty_layers_option_is_refused(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "collect", "-m", "tinymodels:tiny_cnn", "--images", "sample:4",
                         "--out", tmp_path / "run", "--layers", "", "-q")
    assert_one_line_error(rc, err, "--layers is empty")


def test_border_and_per_image_beyond_the_map_warn_with_the_valid_range(tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="actatlas"):
        rc, _, err = run_cli(capsys, "collect", "-m", "tinymodels:tiny_cnn", "--images", "sample:2",
                             "--out", tmp_path / "run", "--border", "99", "--per-image", "1000", "-q")
    assert rc == 0, err
    err = caplog.text
    assert "border 99 leaves no interior in layer conv2 (16x16)" in err and "0..7" in err
    assert "per-image 1000 exceeds the 256 distinct positions" in err and "1..256" in err
    assert len(aa.open_run(tmp_path / "run").activations("conv2")) == 2 * 256


class Payload:
    """An arbitrary Python object inside a "weights" file (what a pickle that runs code looks like)."""


def test_pickled_weights_are_one_line_without_unsafe_advice(tmp_path, capsys):
    import torch

    torch.save({"state": Payload()}, tmp_path / "pickled.pt")
    rc, _, err = run_cli(capsys, "layers", "inceptionv1", "--weights", tmp_path / "pickled.pt")
    line = assert_one_line_error(rc, err, "pickled Python objects")
    assert "weights_only=False" not in err and "Payload" in line


def test_random_weights_are_refused_unless_allowed(tmp_path, capsys, caplog):
    args = ["collect", "-m", "inceptionv1", "--images", "sample:1", "--out", tmp_path / "run",
            "--attributions", "none", "-q"]
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, "RANDOM")
    assert "--allow-random-weights" in err and not (tmp_path / "run").exists()
    with caplog.at_level(logging.WARNING, logger="actatlas"):
        rc, _, err = run_cli(capsys, *args, "--allow-random-weights")
    assert rc == 0, err
    assert "RANDOM weights" in caplog.text


def test_raising_model_factory_is_one_line(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "collect", "-m", "tinymodels:broken_factory", "--images", "sample:1",
                         "--out", tmp_path / "run", "-q")
    assert_one_line_error(rc, err, "model factory 'tinymodels:broken_factory' raised RuntimeError: "
                                   "checkpoint shape mismatch in layer 3")


# ------------------------------------------------------------------------------------- output paths

def test_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, _, err = run_cli(capsys, "collect", "-m", "tinymodels:tiny_cnn", "--images", "sample:1",
                         "--out", tmp_path / "file" / "sub", "-q")
    assert_one_line_error(rc, err, "is a file")
    rc, _, err = run_cli(capsys, "collect", "-m", "tinymodels:tiny_cnn", "--images", "sample:1",
                         "--out", tmp_path / "file", "-q")
    assert_one_line_error(rc, err, "not a directory")


def test_export_onto_a_file_is_one_line(tmp_path, capsys):
    _build(tmp_path / "run", levels=(2,))
    (tmp_path / "site").write_text("x")
    rc, _, err = run_cli(capsys, "export", tmp_path / "run", "--out", tmp_path / "site")
    assert_one_line_error(rc, err, "not a directory")
    assert (tmp_path / "site").read_text() == "x"


def test_out_on_a_read_only_file_system_is_one_line(tmp_path, capsys):
    """/sys refuses new directories for every user, root included."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux sysfs at /sys")
    rc, _, err = run_cli(capsys, "collect", "-m", "tinymodels:tiny_cnn", "--images", "sample:1",
                         "--out", "/sys/actatlas-test-run", "-q")
    assert_one_line_error(rc, err, "cannot create run directory /sys/actatlas-test-run")
    with pytest.raises(UserError, match="cannot create"):
        ensure_dir("/sys/actatlas-test-run/x")


def test_out_without_permission_is_one_line_as_a_normal_user(tmp_path):
    """The same check as a non-root user (permission bits are ignored for root)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not writable|cannot create"):
            ensure_dir(locked / "run")
        return
    base = Path(tempfile.mkdtemp(prefix="actatlas-perm-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        code = ("import sys\nfrom actatlas.cli import main\n"
                "sys.exit(main(['collect', '-m', 'tinymodels:tiny_cnn', '--images', 'sample:1', '--out', "
                f"{str(base / 'run')!r}, '-q']))")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]), HOME=str(base))
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                 user=65534, timeout=120)
        except PermissionError:
            pytest.skip("the nobody user cannot start this Python (its interpreter is not readable by other users)")
        if "Permission denied" in res.stderr and "python" in res.stderr.lower() and "actatlas" not in res.stderr:
            pytest.skip(f"the 'nobody' user cannot run this Python: {res.stderr.strip()[:200]}")
        if res.returncode != 2 and ("ModuleNotFoundError" in res.stderr or "PermissionError" in res.stderr
                                    and "site-packages" in res.stderr):
            pytest.skip(f"the 'nobody' user cannot import the test environment: {res.stderr.strip()[-200:]}")
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr
        assert "cannot create run directory" in res.stderr and "ermission denied" in res.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_library_names_become_flags_only_in_the_cli():
    assert flag_names("icon_size=1 is out of range") == "--icon-size=1 is out of range"
    assert flag_names("more positions per image (per_image)") == "more positions per image (--per-image)"
    assert flag_names("steps=0 and power=nan") == "--steps=0 and --power=nan"
    assert flag_names("icons need optimisation steps; power of two; a border") == \
        "icons need optimisation steps; power of two; a border"           # plain words stay words
    assert flag_names("my_per_image_x") == "my_per_image_x"
