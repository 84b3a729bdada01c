"""``actatlas reproduce-article`` (issue 14) at --scale tiny on the shared ImageNet sample, with random
InceptionV1 weights saved in lucent's key format (built by test_lucent's helper: nothing downloaded).

One photo per class in the sample: the patch attacks are "skipped" for too few source photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actatlas.analysis import article
from actatlas.analysis.article import ARTICLE, experiments
from actatlas.cli import main
from actatlas.stages import read_manifest
from test_lucent import random_lucent_state

SAMPLE = Path("/work/shared/data/imagenet-sample")
LIMIT = 24      # images sampled for the atlases: the article's classes' photos first, then a random fill


def _labels(path: Path) -> Path:
    """lucent's label format (``wnid index name``, the index being the logit) from the sample's classes."""
    rows = [line.split("\t") for line in (SAMPLE / "classes.tsv").read_text().splitlines()[1:] if line.strip()]
    path.write_text("".join(f"{wnid} {int(i) + 1} {name}\n" for i, wnid, name, *_ in rows))
    return path


@pytest.mark.slow  # InceptionV1 on CPU, UMAP, t-SNE, icon rendering: about 2-3 minutes on 2 cores
def test_reproduce_article_tiny(tmp_path, capsys, monkeypatch):
    if not (SAMPLE / "classes.tsv").is_file():
        pytest.skip(f"the shared ImageNet sample is absent ({SAMPLE})")
    weights = tmp_path / "inception5h.pth"
    torch.save(random_lucent_state(), weights)
    labels = _labels(tmp_path / "labels.txt")
    out = tmp_path / "article"
    argv = ["reproduce-article", "--weights", str(weights), "--labels", str(labels), "--images", str(SAMPLE),
            "--out", str(out), "--scale", "tiny", "--limit", str(LIMIT), "--allow-random-weights",
            "--threads", "2", "--quiet", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["stages_run"]

    report = json.loads((out / "report.json").read_text())
    names = [e["name"] for e in report]
    assert names == [x.name for x in experiments()] + [n for n in ARTICLE if n not in names[:len(experiments())]]
    assert len(set(names)) == len(names) and set(names) <= set(ARTICLE)
    by = {e["name"]: e for e in report}
    for e in report:
        assert set(e) == {"name", "status", "ours", "article", "note"}
        assert e["status"] in ("done", "skipped", "failed"), e
        assert e["article"], e["name"]
        if e["status"] == "done":
            assert e["ours"], e["name"]
        else:
            assert e["note"], e["name"]
    failed = [(e["name"], e["note"]) for e in report if e["status"] == "failed"]
    assert failed == []
    for layer in ("mixed4c", "mixed4a", "mixed5b"):
        assert by[f"atlas {layer}"]["status"] == "done"
        assert by[f"atlas {layer}"]["ours"]["samples"] == LIMIT
    # random weights, 24 activations: a class may have too few positively attributed rows (then skipped)
    views = [by[f"class atlas {n}"] for n in ("red fox", "ibex", "artichoke", "great white shark")]
    views += [by[f"compare {a} vs {b}"] for a, b in (("snorkel", "scuba diver"), ("grey whale", "great white shark"),
                                                     ("frying pan", "wok"))]
    assert all(v["status"] == "done" or "too few of the sampled activations" in v["note"] for v in views)
    assert sum(v["status"] == "done" for v in views[:4]) >= 1 and sum(v["status"] == "done" for v in views[4:]) >= 1
    for left, right in (("snorkel", "scuba diver"), ("grey whale", "great white shark"), ("frying pan", "wok")):
        attack = by[f"patch attack {left} -> {right}"]
        assert attack["status"] == "skipped"
        assert ("too few photos of the source class" in attack["note"]
                or by[f"compare {left} vs {right}"]["status"] == "skipped")
    assert by["patch attacks pooled"]["status"] == "skipped"
    assert not any("not implemented" in e["note"] for e in report)
    # 24 samples: far fewer fireboat-attributed activations than the cluster count needs (then skipped)
    fire = by["fireboat analysis"]
    assert fire["status"] == "done" or "too few activations attributed to fireboat" in fire["note"], fire
    if fire["status"] == "done":
        assert fire["ours"]["mixed5b_clusters"] >= 1 and fire["ours"]["mixed4d_clusters"] >= 1
    size = by["sample size 100k vs all"]
    assert size["status"] == "done", size
    ours = size["ours"]
    assert ours["samples"] == LIMIT and ours["subset"] == LIMIT // 2 and ours["grid"] == 4   # tiny: half, G = 4
    assert [lv["grid"] for lv in ours["by_level"]] == by["atlas mixed4c"]["ours"]["levels"]
    assert ours["cells_all"] == by["atlas mixed4c"]["ours"]["cells"][0]
    assert 0.0 <= ours["share_best_cosine_ge_0.9"] <= 1.0 and size["article"]["subset"] == 100_000
    assert by["patch attack snorkel -> scuba diver"]["article"]["static_success"] == 0.654

    md = (out / "report.md").read_text()
    assert "| quantity | ours | article |" in md and "![atlas mixed4c](" in md
    for line in md.splitlines():
        if line.startswith("!["):
            assert (out / line[line.index("](") + 2:-1]).is_file(), line

    # a rerun does no work: every stage skipped
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["stages_run"] == []
    assert json.loads((out / "report.json").read_text()) == report
    stages = read_manifest(out)["stages"]
    assert all(st["status"] == "complete" for st in stages.values())

    # the fireboat analysis end to end on these 24 samples: with its row minimum lowered only it reruns
    # (mixed4d laid out, clusters counted on both layers, the figure drawn)
    monkeypatch.setattr(article, "MIN_CLUSTER_ROWS", 4)
    assert main(argv) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(third["stages_run"]) == {"experiment:fireboat analysis", "report"}
    fire = {e["name"]: e for e in json.loads((out / "report.json").read_text())}["fireboat analysis"]
    assert fire["status"] == "done", fire
    for layer in ("mixed5b", "mixed4d"):
        s = fire["ours"][layer]
        assert 4 <= s["rows"] <= LIMIT and 1 <= s["clusters"] == len(s["shares"]) == fire["ours"][f"{layer}_clusters"]
        assert abs(sum(s["shares"]) - 1) < 1e-3 and s["largest_share"] == max(s["shares"])
        assert all(len(t) == 3 for t in s["cluster_top_classes"])
    assert (out / "experiments" / "fireboat-analysis" / "clusters.png").is_file()
    assert "![fireboat analysis](experiments/fireboat-analysis/clusters.png)" in (out / "report.md").read_text()
