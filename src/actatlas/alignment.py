"""Aligned atlases of several layers: that their rows correspond, and how well their maps line up.

A run can be laid out jointly over several layers (``actatlas.layout.compute_aligned_layouts``) only
when row r of every layer is the same sample: the same image at the same image location. A collect
with shared locations (``CollectConfig.shared_locations``) stores each row's normalized location;
`check_shared_rows` compares them (and the images) across the layers, and refuses anything else with
what to collect again.

The alignment measure (`alignment_report`, ``summary.json["alignment"]``), for each pair of consecutive
layers A, B:

- displacement: the mean distance in [0, 1]^2 between a sample's place in A's map and in B's. For the
  aligned layouts as they are; for the independent layouts (each layer laid out alone) after the best
  orthogonal Procrustes fit of B onto A (rotation or reflection plus translation, no scaling:
  `actatlas.layout.procrustes`), so that a mere rotation or mirroring of an otherwise equal map costs
  nothing. ``chance`` is the same mean over a seeded random pairing of A's and B's samples: what
  unrelated maps would give.
- top class kept: of the coarsest grid level's cells that hold at least ``min_count`` samples in both
  maps, the share whose top class (the largest mean attribution of the cell's samples) is the same in
  A and in B; independent maps again after B's Procrustes fit onto A.

Both are computed by the same functions for the aligned and for the independent layouts.
"""

from __future__ import annotations

import numpy as np

from .collect_batch import check_shared_layers
from .errors import ConfigError, RunStateError
from .grid import cell_index
from .layout import procrustes
from .run import ALIGNED_DIR, ALIGNED_STAGE, Run  # noqa: F401  (re-exported)
from .store import drop_pages


def _recollect(run: Run, layers: list[str]) -> str:
    return (f"collect {', '.join(layers)} again with shared_locations into a new run directory (building an "
            f"aligned atlas of these layers does that)")


def check_shared_rows(run: Run, layers: list[str]) -> None:
    """Refuse (one line, saying what to collect again) unless `layers` of `run` can be aligned: two or
    more layers with a spatial map, collected with shared locations, whose rows are the same images at
    the same stored locations."""
    if len(layers) < 2:
        raise ConfigError(f"aligning needs two or more layers, got {', '.join(layers) or 'none'}")
    shapes = run.summary.get("layer_shapes", {})
    check_shared_layers({ly: tuple(shapes.get(ly, ())) for ly in layers})
    if not run.shared_locations:
        raise RunStateError(f"{run.path} was collected without shared locations: each layer sampled its own image "
                            f"positions, so its rows do not correspond and cannot be aligned; {_recollect(run, layers)}")
    first = layers[0]
    loc0, img0 = run.locations(first), run.rows(first).image
    if loc0 is None:
        raise RunStateError(f"{run.path} holds no locations for layer {first}; {_recollect(run, layers)}")
    for ly in layers[1:]:
        loc = run.locations(ly)
        if loc is None or loc.shape != loc0.shape or not np.array_equal(run.rows(ly).image, img0) \
                or not np.array_equal(np.asarray(loc), np.asarray(loc0)):
            raise RunStateError(f"the rows of layers {first} and {ly} in {run.path} are not the same samples at the "
                                f"same image locations; {_recollect(run, layers)}")


# ----------------------------------------------------------------------------------------------
# the measure


def displacement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance between rows of a [n, 2] and b [n, 2] (the same samples)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.sqrt((d ** 2).sum(axis=1)).mean()) if len(d) else 0.0


def cell_top_classes(coords: np.ndarray, attributions, size: int, min_count: int,
                     chunk_rows: int = 65536) -> np.ndarray:
    """int64 [size * size] the top class of each cell of a size x size grid over `coords` (cell index
    ``i * size + j``, the grid's binning `actatlas.grid.cell_index`): the class with the largest mean
    attribution over the cell's samples; -1 for cells with fewer than `min_count` samples or only zero
    attributions. `attributions` [n, classes] (a float16 memmap is read in chunks)."""
    import scipy.sparse as sp

    ij = cell_index(coords, size)
    cell = ij[:, 0] * size + ij[:, 1]
    n, classes = attributions.shape
    sums = np.zeros((size * size, classes), np.float64)
    for a in range(0, n, chunk_rows):
        part = cell[a:a + chunk_rows]
        onehot = sp.csr_matrix((np.ones(len(part)), (part, np.arange(len(part)))), shape=(size * size, len(part)))
        sums += onehot @ np.asarray(attributions[a:a + chunk_rows], np.float64)
        drop_pages(attributions, a, a + chunk_rows)
    count = np.bincount(cell, minlength=size * size)
    top = np.argmax(sums, axis=1).astype(np.int64)
    top[(count < min_count) | ~np.any(sums != 0, axis=1)] = -1
    return top


def top_class_kept(top_a: np.ndarray, top_b: np.ndarray) -> dict:
    """Of the cells with a top class in both (>= 0), how many have the same one: {cells, same, share}."""
    both = (top_a >= 0) & (top_b >= 0)
    cells, same = int(both.sum()), int((both & (top_a == top_b)).sum())
    return {"cells": cells, "same": same, "share": same / cells if cells else None}


def pair_measure(aligned: tuple[np.ndarray, np.ndarray], independent: tuple[np.ndarray, np.ndarray] | None,
                 attributions: tuple | None, size: int, min_count: int, seed: int = 0) -> dict:
    """The measure of one pair of consecutive layers (module docstring). `aligned` / `independent`:
    the two layers' coords [n, 2] (independent may be None); `attributions`: the two layers'
    [n, classes] arrays, or None (no top-class numbers)."""
    a, b = (np.asarray(x, np.float64) for x in aligned)
    perm = np.random.default_rng(seed).permutation(len(a))
    out: dict = {"displacement": {"aligned": displacement(a, b),
                                  "aligned_after_procrustes": displacement(a, procrustes(a, b)),
                                  "chance": displacement(a, b[perm])}}
    fitted = None
    if independent is not None:
        ia, ib = (np.asarray(x, np.float64) for x in independent)
        fitted = procrustes(ia, ib)
        out["displacement"]["independent_after_procrustes"] = displacement(ia, fitted)
        out["displacement"]["independent_as_is"] = displacement(ia, ib)
    if attributions is not None:
        att_a, att_b = attributions
        kept = {"aligned": top_class_kept(cell_top_classes(a, att_a, size, min_count),
                                          cell_top_classes(b, att_b, size, min_count))}
        if fitted is not None:
            kept["independent_after_procrustes"] = top_class_kept(
                cell_top_classes(ia, att_a, size, min_count), cell_top_classes(fitted, att_b, size, min_count))
        out["top_class_kept"] = {"level": size, "min_count": min_count, **kept}
    return out


def alignment_report(run: Run, layers: list[str], aligned: dict, independent: dict | None, size: int,
                     min_count: int, seed: int = 0) -> dict:
    """``summary.json["alignment"]``: the measure (module docstring) of every pair of consecutive
    layers of `layers`, and its mean over the pairs. `aligned` / `independent`: layer -> coords
    [n, 2] (independent may be None); top classes come from the run's stored full attributions (left
    out when it has none) at grid level `size` with cells of at least `min_count` samples."""
    with_attr = all(run.attributions(ly) is not None for ly in layers)
    pairs = []
    for a, b in zip(layers, layers[1:]):
        m = pair_measure((aligned[a], aligned[b]), (independent[a], independent[b]) if independent else None,
                         (run.attributions(a), run.attributions(b)) if with_attr else None, size, min_count, seed)
        pairs.append({"from": a, "to": b, **m})
    report = {"layers": list(layers), "pairs": pairs, "mean": _mean_of(pairs),
              "definition": "displacement: mean distance of a sample between consecutive layers' maps in [0,1]^2 "
                            "(independent layouts after the best orthogonal Procrustes fit, rotation/reflection "
                            "and translation; chance: a random pairing); top_class_kept: share of the coarsest "
                            "level's cells (>= min_count samples in both) whose top class is the same"}
    if not with_attr:
        report["note"] = "the run has no full attributions, so no top-class numbers"
    return report


def _mean_of(pairs: list[dict]) -> dict:
    out: dict = {"displacement": {}}
    for k in pairs[0]["displacement"] if pairs else []:
        out["displacement"][k] = float(np.mean([p["displacement"][k] for p in pairs]))
    if pairs and "top_class_kept" in pairs[0]:
        out["top_class_kept"] = {}
        for k in ("aligned", "independent_after_procrustes"):
            vals = [p["top_class_kept"][k]["share"] for p in pairs if k in p["top_class_kept"]]
            vals = [v for v in vals if v is not None]
            if vals:
                out["top_class_kept"][k] = float(np.mean(vals))
    return out


__all__ = ["check_shared_rows", "displacement", "cell_top_classes", "top_class_kept",
           "pair_measure", "alignment_report", "ALIGNED_STAGE", "ALIGNED_DIR"]
