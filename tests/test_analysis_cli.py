"""`actatlas class-atlas` and `actatlas compare` (issue 5 items 1-2; method.md §3.2, §3.3) on a tiny run:
files written, canvas geometry, cells vs the class filter, candidate patch cells vs the x axis, clear
errors for unknown classes, reload and skip-when-unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_analysis import tiny_run  # noqa: F401  (module-scoped fixture: 12 random images x 30 positions)

from actatlas.analysis import class_filter, comparison_axis
from actatlas.analysis.views import load_class_atlas, load_comparison
from actatlas.cli import main

G, P = 4, 16
FAST = ["--steps", "8", "--attempts", "1", "--icon-size", str(P), "--icon-batch", "16", "--threads", "1",
        "--patches", "2", "-q"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _winner_counts(run) -> np.ndarray:
    attr = np.asarray(run.attributions("conv2"), np.float32)
    return np.bincount(attr.argmax(1), minlength=attr.shape[1])


def _cli(capsys, *argv) -> dict:
    rc = main(list(argv) + ["--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1]) | {"_stderr": err}


def _bundle(index: Path) -> dict:
    """The files embedded in a single-file viewer page."""
    m = re.search(r'<script type="application/json" id="atlas-bundle">(.*?)</script>', index.read_text(), re.S)
    assert m, "no embedded data in the viewer page"
    return json.loads(m.group(1))


def test_class_atlas_cli(tiny_run, tmp_path, capsys):  # noqa: F811
    run_dir = tiny_run.path
    cls = int(_winner_counts(tiny_run).argmax())
    name = tiny_run.class_names[cls]
    out = tmp_path / "ca"
    args = ["class-atlas", str(run_dir), "--layer", "conv2", "--class", name, "--grid", str(G), "--min-count", "1",
            "--layout", "pca", "--out", str(out), *FAST]
    s = _cli(capsys, *args)
    assert s["ran"] is True and s["class"] == {"index": cls, "name": name} and s["filter"] == "winner"
    # the canvas: G*P square, icons at (column i, row G-1-j)
    png = Image.open(s["paths"]["png"])
    assert png.size == (G * P, G * P)
    canvas = np.asarray(png.convert("RGB"))
    data = json.loads(Path(s["paths"]["json"]).read_text())
    cells = data["cells"]
    assert len(cells) == s["cells"] == data["n_cells"] >= 2
    for c in cells:
        icon = np.asarray(Image.open(out / c["icon"]).convert("RGB"))
        r0, c0 = (G - 1 - c["j"]) * P, c["i"] * P
        np.testing.assert_array_equal(canvas[r0:r0 + P, c0:c0 + P], icon)
        assert c["n"] == len(c["rows"]) and len(c["top"]) == 5 and -1 <= c["fidelity"] <= 1
    # cells partition exactly the rows of the winner filter (min_count 1 keeps every row)
    expected = class_filter(tiny_run.attributions("conv2"), cls, "winner")
    got = np.concatenate([c["rows"] for c in cells])
    assert sorted(got.tolist()) == expected.tolist() and s["rows"] == len(expected)
    # every member really has `cls` as its top attribution
    attr = np.asarray(tiny_run.attributions("conv2"), np.float32)
    assert (attr[got].argmax(1) == cls).all()
    assert Image.open(s["paths"]["labelled_png"]).size[0] == G * P
    # viewer: one self-contained page holding this grid
    files = _bundle(Path(s["paths"]["viewer"]))
    man = files["manifest.json"]
    assert name in man["title"] and [lv["size"] for lv in man["layers"][0]["levels"]] == [G]
    assert len(files[f"data/conv2/level-{G}.json"]["i"]) == len(cells)
    # reload in Python
    v = load_class_atlas(out)
    assert v.atlas.rows.tolist() == expected.tolist() and v.level.icons.shape == (len(cells), P, P, 3)
    assert sorted(v.run_rows(0).tolist()) == sorted(cells[0]["rows"])
    # same arguments again: nothing recomputed; another filter: recomputed into the same folder
    assert _cli(capsys, *args)["ran"] is False
    s2 = _cli(capsys, *args, "--filter", "top", "--top", "40")
    assert s2["ran"] is True and s2["rows"] == len(class_filter(tiny_run.attributions("conv2"), cls, "top", 40))
    # default folder under the run; a non-empty folder it did not write is refused, never emptied
    s3 = _cli(capsys, *[a for a in args if a not in ("--out", str(out))], "--no-viewer")
    assert Path(s3["out_dir"]) == run_dir / "class-atlas" / "conv2" / f"{cls}-{name}-winner"
    assert "viewer" not in s3["paths"] and Path(s3["paths"]["png"]).is_file()
    assert main([*args[:-len(FAST)], "--out", str(run_dir), "-q"]) == 2
    assert "not a class-atlas/compare results folder" in capsys.readouterr().err
    assert (run_dir / "collect" / "complete.json").is_file()


def test_unknown_class_is_a_clear_error(tiny_run, tmp_path, capsys):  # noqa: F811
    rc = main(["class-atlas", str(tiny_run.path), "--class", "cc3", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "did you mean" in err and "c3" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert main(["compare", str(tiny_run.path), "--left", "c1", "--right", "99", "-q"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["compare", str(tiny_run.path), "--left", "c1", "--right", "1", "-q"]) == 2
    assert "same class" in capsys.readouterr().err


def test_compare_cli_candidates(tiny_run, tmp_path, capsys):  # noqa: F811
    counts = _winner_counts(tiny_run)
    order = np.argsort(-counts, kind="stable")
    left, right = int(order[1]), int(order[2])   # minor classes: the dominant one shows up as a third class
    names = tiny_run.class_names
    out = tmp_path / "cmp"
    args = ["compare", str(tiny_run.path), "--layer", "conv2", "--left", names[left], "--right", str(right),
            "--grid", str(G), "--y", "pca", "--top", "100", "--min-count", "1", "--out", str(out), *FAST]
    s = _cli(capsys, *args)
    assert s["left"]["index"] == left and s["right"]["index"] == right and s["ran"] is True
    assert "candidate patch cells" in s["_stderr"]
    png = Image.open(s["paths"]["png"])
    assert png.size[0] == G * P and png.size[1] > G * P          # labels, title and x axis below the icons
    data = json.loads(Path(s["paths"]["json"]).read_text())
    cells, cands = data["cells"], data["candidates"]
    assert len(cands) >= 1 and len(s["candidates"]) == len(cands)
    # x of every row of the comparison, recomputed from the run's attributions
    with np.load(out / "rows.npz") as z:
        rows, x = z["rows"], z["x"]
    attr = np.asarray(tiny_run.attributions("conv2"), np.float32)
    np.testing.assert_allclose(x, comparison_axis(attr[rows], left, right), atol=1e-6)
    x_of = dict(zip(rows.tolist(), x.tolist()))
    for c in cells:
        assert c["side"] == ("left" if c["i"] < G // 2 else "right")
        xs = np.array([x_of[r] for r in c["rows"]])
        assert (xs < 0).all() if c["side"] == "left" else (xs >= 0).all()
    for k in cands:
        cell = cells[k["cell"]]
        assert k["top_class"] not in (left, right) and k["top_class"] == cell["top"][0][0]
        assert (k["i"], k["j"], k["side"]) == (cell["i"], cell["j"], cell["side"])
        assert k["side_class"] == (left if k["side"] == "left" else right)
        assert np.mean(attr[k["rows"]], axis=0).argmax() == k["top_class"]
    # exactly the cells on a side whose top class is a third class
    third = [c["cell"] for c in cells if c["top"][0][0] not in (left, right)]
    assert sorted(k["cell"] for k in cands) == sorted(third)
    # reload for find-patches
    v = load_comparison(out)
    assert [c.to_dict() for c in v.candidates] == [{k: d[k] for k in c.to_dict()} for c, d in zip(v.candidates, cands)]
    assert v.comparison.rows.tolist() == rows.tolist() and v.icon(cands[0]["cell"]).shape == (P, P, 3)
    assert sorted(v.run_rows(cands[0]["cell"]).tolist()) == sorted(cands[0]["rows"])
    assert _bundle(Path(s["paths"]["viewer"]))["manifest.json"]["layers"][0]["levels"][0]["cells"] == len(cells)
    # unchanged -> loaded; --force -> recomputed, same result (seeded)
    assert _cli(capsys, *args)["ran"] is False
    s3 = _cli(capsys, *args, "--force")
    assert s3["ran"] is True and s3["candidates"] == s["candidates"]
