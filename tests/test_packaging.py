"""The installable library: its wheel installs into an environment that already has a torch (and the rest)
without pip replacing any of it. Checked with pip's own resolver (``--dry-run --report``) against a
fresh virtual environment that sees this environment's packages, the project itself left out; and a
wheel that pins another torch is shown to fail the same check."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _pip(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def _wheel(src: Path, dest: Path) -> Path:
    res = _pip("wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(dest))
    assert res.returncode == 0, res.stderr
    return next(dest.glob("actatlas-*.whl"))


@pytest.fixture(scope="module")
def env_with_torch(tmp_path_factory):
    """A fresh venv (no pip of its own) whose only packages are this environment's, minus actatlas."""
    base = tmp_path_factory.mktemp("pkg")
    res = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    py = base / "venv" / "bin" / "python"
    outer = Path(sysconfig.get_paths()["purelib"])
    visible = base / "visible"
    visible.mkdir()
    for entry in outer.iterdir():
        if "actatlas" in entry.name.lower():
            continue                       # the project as installed here (editable): not part of "the user's env"
        (visible / entry.name).symlink_to(entry)
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True).stdout.strip()
    Path(inner, "user-env.pth").write_text(str(visible) + "\n")
    return base, py


def _would_install(py: Path, wheels: Path, report: Path):
    res = _pip("--python", str(py), "install", "--dry-run", "--report", str(report), "--no-index",
               "--find-links", str(wheels), "actatlas")
    if res.returncode != 0:
        return None, res.stderr
    return [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]], res.stderr


def test_wheel_keeps_the_users_torch(env_with_torch):
    base, py = env_with_torch
    wheels = base / "wheels"
    _wheel(ROOT, wheels)
    installs, err = _would_install(py, wheels, base / "report.json")
    assert installs == ["actatlas"], err          # nothing else: torch and every dependency are kept


def test_a_wheel_pinning_another_torch_fails_the_same_check(env_with_torch, tmp_path):
    base, py = env_with_torch
    import torch

    mine = torch.__version__.split("+")[0]
    other = "2.1.0" if mine != "2.1.0" else "2.2.0"
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "README.md", src / "README.md")
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r'"torch>=[^"]*"', f'"torch=={other}"', text)
    (src / "pyproject.toml").write_text(text)
    wheels = tmp_path / "wheels"
    _wheel(src, wheels)
    installs, err = _would_install(py, wheels, tmp_path / "report.json")
    assert installs is None or "torch" in installs, (installs, err)
    assert os.path.isfile(py)
