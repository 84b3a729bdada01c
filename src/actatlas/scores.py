"""Honest icon scores: how well an icon stands for its cell, measured without the renderer's objective.

The old per-icon number ("fidelity", now named *objective alignment*) is the cosine between the icon's
centre activation and the whitened target the renderer optimised toward, so it favours icons by
construction. The scores here do not depend on what the renderer optimised, and each is computed
the same way (by the same function) for the icon and, as the baseline, for one seeded random real
member of the same cell:

- **Retrieval rank** (`retrieval_ranks`): the rank of the icon's own cell among all cells of its
  level by the cosine between the icon's centre activation (the icon at its stored size, no
  transforms) and each cell's mean activation; 1 is best. Twice: against the raw means and against
  the whitened targets (means @ S, the renderer's targets). A member uses its collected activation.
- **Class agreement** (`class_agreement`): the share of the cell's top-5 classes (by mean
  attribution, the grid's ``top_classes``) among the top-5 classes of the icon's own attribution:
  its centre activation through the rest of the network, computed by collect's own batch function
  (`actatlas.collect_batch.process_batch`, the forward-mode JVP with the activation as tangent at the
  centre position). A member's attribution is the row collect stored for it (the same function).
- **Vividness** (`vividness`): colourfulness (Hasler & Suesstrunk 2003), pixel contrast (std of the
  grey image) and border fill (the share of the outer frame whose pixels are not flat mid-grey, the
  value the image parameterisation starts from) of the icon, of the random member's patch, and the
  median over the cell's real patches (crops of member photos around the collected position, cut as
  the export cuts them: `patch_box` / `cut_patch`, at the icon's size).

Everything here is array in, array out, except `centre_scores_inputs` (runs the model) and
`patch_vividness` (reads member photos); the pipeline's ``run_scores`` stage calls `score_level`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .collect_batch import CollectConfig, process_batch
from .data import ImageDecodeError, load_rgb
from .models.spec import ModelSpec
from .render import forward_to_layers, model_input

log = logging.getLogger(__name__)

VERSION = 2           # of the scores' definitions: part of the scores stage's key, so a change reruns it
TOP = 5               # classes compared by class agreement
GREY = 127.5          # the flat grey an unoptimised icon shows (sigmoid(0) of the FFT parameterisation)

# per-cell score arrays (AtlasLevel.scores, level-<G>.json); ranks are int (-1: not computed)
ICON_KEYS = ("retrieval_rank_raw", "retrieval_rank_whitened", "class_agreement", "colourfulness", "contrast",
             "border_fill")
MEMBER_KEYS = ("member_row", "member_retrieval_rank_raw", "member_retrieval_rank_whitened",
               "member_retrieval_rank_raw_loo", "member_retrieval_rank_whitened_loo", "member_class_agreement", "member_colourfulness", "member_contrast", "member_border_fill",
               "member_objective_alignment")
PATCH_KEYS = ("patch_colourfulness", "patch_contrast", "patch_border_fill", "patch_count")
SCORE_KEYS = ICON_KEYS + MEMBER_KEYS + PATCH_KEYS
INT_KEYS = ("retrieval_rank_raw", "retrieval_rank_whitened", "member_row", "member_retrieval_rank_raw",
            "member_retrieval_rank_whitened", "member_retrieval_rank_raw_loo", "member_retrieval_rank_whitened_loo",
            "patch_count")


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of the icon scores.

    seed: picks each cell's random member and its patch sample (per level: ``[seed, G]``).
    max_patches: real patches per cell for the median vividness (the random member's first).
    frame: the border fill's frame, as a share of the icon side (0.1: the outer 10%).
    grey_tol: a frame pixel is filled when a channel differs from mid-grey by more than this (0-255).
    batch_size: icons per model call.
    """

    seed: int = 0
    max_patches: int = 16
    frame: float = 0.1
    grey_tol: float = 16.0
    batch_size: int = 32


# ---------------------------------------------------------------------------------------------
# retrieval and class agreement (any activations / attributions: icons and members alike)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def retrieval_ranks(h: np.ndarray, own: np.ndarray, targets: np.ndarray, own_targets: np.ndarray | None = None,
                    chunk: int = 1024) -> np.ndarray:
    """int64 [n]: rank (1 = best) of cell own[k] among all rows of targets [m, c] by cos(h[k], target);
    the rank is 1 + the number of cells with a strictly higher cosine than the own cell's.
    `own_targets` [n, c]: row k's own cell is represented by own_targets[k] instead of targets[own[k]]
    (e.g. the cell's mean without the member itself)."""
    h, targets = np.asarray(h), np.asarray(targets)
    own = np.asarray(own, np.int64)
    if h.ndim != 2 or targets.ndim != 2 or h.shape[1] != targets.shape[1] or len(own) != len(h):
        raise ValueError(f"activations {h.shape}, targets {targets.shape} and own cells {own.shape} do not match")
    t = _unit_rows(targets)
    out = np.empty(len(h), np.int64)
    for a in range(0, len(h), chunk):
        hu = _unit_rows(h[a:a + chunk])
        sims = hu @ t.T
        rows = np.arange(len(sims))
        if own_targets is None:
            mine = sims[rows, own[a:a + chunk]]
        else:
            mine = np.sum(hu * _unit_rows(np.asarray(own_targets)[a:a + chunk]), axis=1)
            sims[rows, own[a:a + chunk]] = -np.inf
        out[a:a + chunk] = 1 + (sims > mine[:, None]).sum(axis=1)
    return out


def whitened_targets(means: np.ndarray, S: np.ndarray | None) -> np.ndarray | None:
    """means @ S (float64), the renderer's whitened targets; None without S."""
    if S is None:
        return None
    return np.asarray(means, np.float64) @ np.asarray(S, np.float64)


def top_classes_of(attr: np.ndarray, k: int = TOP) -> np.ndarray:
    """int64 [n, k]: the k classes with the largest attribution per row, descending (ties: lower id)."""
    a = np.asarray(attr, np.float32)
    k = min(k, a.shape[1])
    return np.argsort(-a, axis=1, kind="stable")[:, :k].astype(np.int64)


def class_agreement(top: np.ndarray, cell_top: np.ndarray) -> np.ndarray:
    """float64 [n]: the share of each row's cell classes cell_top [n, k] (-1 padded) found in top
    [n, k'] (the classes of the row's own attribution); NaN where the cell has no classes."""
    top, cell_top = np.asarray(top), np.asarray(cell_top)
    out = np.full(len(cell_top), np.nan)
    for r in range(len(cell_top)):
        want = {int(c) for c in cell_top[r] if c >= 0}
        if want and r < len(top):
            out[r] = len(want & {int(c) for c in top[r]}) / len(want)
    return out


def cosine_rows(h: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float64 [n]: cos(h[k], targets[k]) (0 for a zero vector)."""
    return np.sum(_unit_rows(h) * _unit_rows(targets), axis=1)


def activation_scores(h: np.ndarray, top: np.ndarray | None, own: np.ndarray, means: np.ndarray,
                      S: np.ndarray | None, cell_top: np.ndarray,
                      own_means: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The activation-side scores of activations h [n, c] standing for cells `own` [n] of a level with
    cell means [m, c], whitening S, and cell classes cell_top [m, k]; `top` [n, k'] the classes of
    each row's own attribution (None: no attributions). The one function for icons and members:
    {"retrieval_rank_raw", "retrieval_rank_whitened" (-1 without S), "class_agreement" (NaN without
    attributions), "objective_alignment" (cos to own mean @ S, or own mean)}. With `own_means` [n, c]
    (the own cell's mean without the row itself) the ranks use it for the own cell (`retrieval_ranks`)."""
    own = np.asarray(own, np.int64)
    white = whitened_targets(means, S)
    own_white = whitened_targets(own_means, S) if own_means is not None else None
    raw_rank = retrieval_ranks(h, own, means, own_means)
    white_rank = (retrieval_ranks(h, own, white, own_white) if white is not None
                  else np.full(len(own), -1, np.int64))
    cells = np.asarray(cell_top)[own] if len(own) else np.zeros((0, 0), np.int64)
    agree = class_agreement(top, cells) if top is not None else np.full(len(own), np.nan)
    target = (white if white is not None else np.asarray(means, np.float64))[own]
    return {"retrieval_rank_raw": raw_rank, "retrieval_rank_whitened": white_rank, "class_agreement": agree,
            "objective_alignment": cosine_rows(h, target) if len(own) else np.zeros(0)}


# ---------------------------------------------------------------------------------------------
# vividness (icons and real patches alike)


def _rgb(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [n, h, w, 3] (uint8 0-255), got shape {x.shape}")
    return x.astype(np.float64)


def colourfulness(images: np.ndarray) -> np.ndarray:
    """[n] Hasler & Suesstrunk (2003) colourfulness of uint8 images [n, h, w, 3]:
    sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2), rg = R - G, yb = (R + G)/2 - B (0-255)."""
    x = _rgb(images)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg, yb = (r - g).reshape(len(x), -1), (0.5 * (r + g) - b).reshape(len(x), -1)
    return (np.sqrt(rg.std(axis=1) ** 2 + yb.std(axis=1) ** 2)
            + 0.3 * np.sqrt(rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2))


def contrast(images: np.ndarray) -> np.ndarray:
    """[n] pixel contrast: the std of the grey image (ITU-R 601 luma, 0-255)."""
    x = _rgb(images)
    grey = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    return grey.reshape(len(x), -1).std(axis=1)


def border_fill(images: np.ndarray, frame: float = 0.1, grey_tol: float = 16.0) -> np.ndarray:
    """[n] the share of pixels in the outer `frame` (share of the side, at least 1 px) whose largest
    channel difference from flat mid-grey (127.5) exceeds `grey_tol`: ~0 for an icon that fades into
    a grey frame, ~1 for one that is filled to its edges."""
    x = _rgb(images)
    h, w = x.shape[1:3]
    f = max(1, int(round(frame * min(h, w))))
    mask = np.ones((h, w), bool)
    mask[f:h - f, f:w - f] = False
    filled = np.abs(x - GREY).max(axis=-1) > grey_tol     # [n, h, w]
    return filled[:, mask].mean(axis=1) if mask.any() else np.zeros(len(x))


def vividness(images: np.ndarray, frame: float = 0.1, grey_tol: float = 16.0) -> dict[str, np.ndarray]:
    """{"colourfulness", "contrast", "border_fill"} [n] of uint8 images [n, h, w, 3]."""
    return {"colourfulness": colourfulness(images), "contrast": contrast(images),
            "border_fill": border_fill(images, frame, grey_tol)}


# ---------------------------------------------------------------------------------------------
# real patches (cut as the export cuts them)


def patch_box(y: int, x: int, h: int, w: int, s: int) -> tuple[int, int, int, int]:
    """Crop box (x0, y0, x1, y1) in the s x s input around layer position (y, x) of an h x w map.

    The box is centred on the position's centre ((y+.5)s/h, (x+.5)s/w) and approximates its
    receptive field: 4 strides wide, at least s/4 and at most s; shifted to stay inside the image.
    """
    stride = s / max(1, min(h, w))
    side = int(round(min(s, max(4 * stride, s / 4))))
    cy, cx = (y + 0.5) * s / h, (x + 0.5) * s / w
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    x0 = min(max(0, x0), s - side)
    y0 = min(max(0, y0), s - side)
    return x0, y0, x0 + side, y0 + side


def cut_patch(img: Image.Image, y: int, x: int, map_hw: tuple[int, int], s: int, size: int) -> Image.Image:
    """The real patch of layer position (y, x) of an h x w map from `img` (already at the model's s x s
    input geometry): its `patch_box`, resized to size x size (bilinear). The export's member patches."""
    h, w = map_hw
    return img.crop(patch_box(int(y), int(x), h, w, s)).resize((size, size), Image.BILINEAR)


def read_patches(requests: Sequence[tuple[str, int, int, int]], geometry: Callable[[Image.Image], Image.Image],
                 s: int, map_hw: tuple[int, int], progress: bool = False,
                 desc: str = "patches") -> tuple[list[np.ndarray | None], int]:
    """The real patches `requests` = (photo path, y, x, patch side), each cut with `cut_patch` from its
    photo at the model's input geometry: uint8 [side, side, 3] per request, None where the photo cannot
    be read. Each photo is decoded once. Returns (patches, unreadable photo count)."""
    out: list[np.ndarray | None] = [None] * len(requests)
    by_path: dict[str, list[int]] = {}
    for q, req in enumerate(requests):
        by_path.setdefault(str(req[0]), []).append(q)
    failed = 0
    from tqdm.auto import tqdm

    for path, qs in tqdm(sorted(by_path.items()), disable=not progress, unit="photo", desc=desc):
        try:
            img = geometry(load_rgb(path))
        except ImageDecodeError as e:
            failed += 1
            log.debug("%s", e)
            continue
        for q in qs:
            out[q] = np.asarray(cut_patch(img, requests[q][1], requests[q][2], map_hw, s, requests[q][3]))
    return out, failed


def patch_vividness(requests: Sequence[tuple[str, int, int, int]], geometry: Callable[[Image.Image], Image.Image],
                    s: int, map_hw: tuple[int, int], frame: float = 0.1, grey_tol: float = 16.0,
                    progress: bool = False) -> tuple[np.ndarray, int]:
    """float64 [n, 3] (colourfulness, contrast, border fill) of the patches `requests` (`read_patches`);
    rows of NaN for photos that cannot be read. Returns (values, unreadable photo count)."""
    out = np.full((len(requests), 3), np.nan)
    patches, failed = read_patches(requests, geometry, s, map_hw, progress, desc="scores: patches")
    ok = [q for q, p in enumerate(patches) if p is not None]
    by_size: dict[tuple, list[int]] = {}
    for q in ok:
        by_size.setdefault(patches[q].shape, []).append(q)
    for qs in by_size.values():
        v = vividness(np.stack([patches[q] for q in qs]), frame, grey_tol)
        out[qs] = np.stack([v["colourfulness"], v["contrast"], v["border_fill"]], axis=1)
    return out, failed


def sample_members(offsets: np.ndarray, rows: np.ndarray, seed: int, size: int,
                   max_patches: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(member [m], patches [m] lists): for every cell (CSR `offsets` into member `rows`) one seeded
    random member and a seeded random sample of up to `max_patches` members, the chosen member first.
    Seeded by ``[seed, size]`` (the level's G), so every level draws its own."""
    rng = np.random.default_rng([int(seed), int(size)])
    offsets, rows = np.asarray(offsets, np.int64), np.asarray(rows, np.int64)
    member = np.empty(len(offsets) - 1, np.int64)
    patches = []
    for c in range(len(offsets) - 1):
        cell = rows[offsets[c]:offsets[c + 1]]
        order = rng.permutation(len(cell))[:max(1, max_patches)]
        member[c] = cell[order[0]]
        patches.append(cell[order])
    return member, patches


# ---------------------------------------------------------------------------------------------
# the model: icon centre activations and attributions through collect's own batch function


@torch.no_grad()
def _map_shape(spec: ModelSpec, module: str, side: int) -> tuple[int, ...]:
    x = torch.zeros(1, 3, side, side, device=spec.device)
    out = forward_to_layers(spec.module, model_input(spec, x), [module])[module]
    return tuple(out.shape[1:])


def centre_scores_inputs(spec: ModelSpec, layer: str, images: np.ndarray, attributions: bool = True,
                         batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """(activations float32 [n, c], attributions float32 [n, classes] or None) of uint8 images
    [n, P, P, 3] (icons at their stored size, no transforms) at the centre position of `layer`.

    Runs `actatlas.collect_batch.process_batch` (collect's own batch function: the forward-mode JVP
    whose tangent is the activation at the sampled position, zero elsewhere) with ``positions="center"``
    (the position [h//2, w//2] of the render's `centre_activations`), so an icon's attribution is
    computed exactly as collect computes a real sample's. Attributions come back as collect stores
    them ("full": float16 values, returned as float32)."""
    x = np.asarray(images, np.uint8)
    module = spec.resolve_layer(layer)
    cfg = CollectConfig(positions="center", per_image=1, attributions="full" if attributions else "none",
                        batch_size=batch_size)
    if len(x) == 0:
        return np.zeros((0, 0), np.float32), (np.zeros((0, len(spec.class_names)), np.float32)
                                              if attributions else None)
    shapes = {module: _map_shape(spec, module, int(x.shape[1]))}
    acts, attrs = [], []
    was_training = spec.module.training
    spec.module.eval()
    try:
        for a in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[a:a + batch_size].transpose(0, 3, 1, 2)))
            lb = process_batch(spec, {layer: module}, shapes, batch, np.arange(a, a + len(batch)), cfg)[layer]
            acts.append(np.asarray(lb.activations, np.float32))
            if attributions:
                attrs.append(np.asarray(lb.attributions, np.float32))
    finally:
        spec.module.train(was_training)
    return np.concatenate(acts), (np.concatenate(attrs) if attributions else None)


# ---------------------------------------------------------------------------------------------
# one level


def leave_one_out_means(means: np.ndarray, counts: np.ndarray, h: np.ndarray) -> np.ndarray:
    """float64 [m, c]: each cell's mean without its member h[k] ((n mean - h) / (n - 1)); the mean
    itself for a cell of one."""
    n = np.asarray(counts, np.float64)[:, None]
    means, h = np.asarray(means, np.float64), np.asarray(h, np.float64)
    return np.where(n > 1, (means * n - h) / np.maximum(n - 1, 1), means)


def score_level(*, means: np.ndarray, cell_top: np.ndarray, S: np.ndarray | None,
                icon_acts: np.ndarray, icon_top: np.ndarray | None, icons: np.ndarray,
                member: np.ndarray, member_acts: np.ndarray, member_top: np.ndarray | None,
                patches: Sequence[np.ndarray], patch_values: np.ndarray, cfg: ScoreConfig,
                counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every per-cell score array (`SCORE_KEYS`) of a level of m cells.

    means [m, c] cell mean activations, cell_top [m, k] the cells' top classes, S whitening (None: no
    whitened ranks); icon_acts [m, c] and icon_top [m, 5] (None: no attributions) the icons' centre
    activations and attribution classes, icons uint8 [m, P, P, 3]; member [m] run rows of the random
    members, member_acts [m, c] their activations, member_top [m, 5] their stored attributions'
    classes; patches [m] lists of the sampled member rows (the member's patch first) and
    patch_values [sum(len), 3] (colourfulness, contrast, border fill) of those patches in order;
    counts [m] the cells' sample counts (for the members' leave-one-out ranks; -1 without).
    The icon and member columns come from the same two functions (`activation_scores`, `vividness`).
    The member is one of the samples its cell mean averages (the icon is not), which favours it on
    small cells; the ``_loo`` ranks rank it against its cell's mean without itself.
    """
    m = len(means)
    own = np.arange(m)
    ic = activation_scores(icon_acts, icon_top, own, means, S, cell_top)
    mb = activation_scores(member_acts, member_top, own, means, S, cell_top)
    if counts is not None and m:
        loo = activation_scores(member_acts, None, own, means, S, cell_top,
                                own_means=leave_one_out_means(means, counts, member_acts))
        loo_raw, loo_white = loo["retrieval_rank_raw"], loo["retrieval_rank_whitened"]
    else:
        loo_raw = loo_white = np.full(m, -1, np.int64)
    vv = vividness(icons, cfg.frame, cfg.grey_tol) if m else {k: np.zeros(0) for k in
                                                               ("colourfulness", "contrast", "border_fill")}
    n_patches = np.array([len(p) for p in patches], np.int64)
    starts = np.concatenate([[0], np.cumsum(n_patches)[:-1]]).astype(np.int64)
    pv = np.asarray(patch_values, np.float64).reshape(-1, 3)
    first = pv[starts] if m and len(pv) else np.full((m, 3), np.nan)
    med = np.full((m, 3), np.nan)
    readable = np.zeros(m, np.int64)
    for c in range(m):
        block = pv[starts[c]:starts[c] + n_patches[c]]
        ok = np.isfinite(block).all(axis=1)
        readable[c] = int(ok.sum())
        if ok.any():
            med[c] = np.median(block[ok], axis=0)
    return {
        "retrieval_rank_raw": ic["retrieval_rank_raw"], "retrieval_rank_whitened": ic["retrieval_rank_whitened"],
        "class_agreement": ic["class_agreement"], **vv,
        "member_row": np.asarray(member, np.int64),
        "member_retrieval_rank_raw": mb["retrieval_rank_raw"],
        "member_retrieval_rank_whitened": mb["retrieval_rank_whitened"],
        "member_retrieval_rank_raw_loo": loo_raw, "member_retrieval_rank_whitened_loo": loo_white,
        "member_class_agreement": mb["class_agreement"],
        "member_colourfulness": first[:, 0], "member_contrast": first[:, 1], "member_border_fill": first[:, 2],
        "member_objective_alignment": mb["objective_alignment"],
        "patch_colourfulness": med[:, 0], "patch_contrast": med[:, 1], "patch_border_fill": med[:, 2],
        "patch_count": readable,
    }


def _mean(x) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return round(float(x.mean()), 4) if len(x) else None


def _at(ranks, k: int) -> float | None:
    r = np.asarray(ranks, np.int64)
    r = r[r > 0]
    return round(float((r <= k).mean()), 4) if len(r) else None


def _side(s: dict, prefix: str, alignment) -> dict:
    return {"retrieval_at1_raw": _at(s[f"{prefix}retrieval_rank_raw"], 1),
            "retrieval_at5_raw": _at(s[f"{prefix}retrieval_rank_raw"], 5),
            "retrieval_at1_whitened": _at(s[f"{prefix}retrieval_rank_whitened"], 1),
            "retrieval_at5_whitened": _at(s[f"{prefix}retrieval_rank_whitened"], 5),
            "class_agreement": _mean(s[f"{prefix}class_agreement"]),
            "colourfulness": _mean(s[f"{prefix}colourfulness"]), "contrast": _mean(s[f"{prefix}contrast"]),
            "border_fill": _mean(s[f"{prefix}border_fill"]), "objective_alignment": _mean(alignment)}


def summarize_level(scores: dict[str, np.ndarray], objective_alignment=None) -> dict:
    """Per-level summary of `score_level`'s arrays: for the icons and the random members alike,
    retrieval@1 and @5 (raw, whitened; None when not computed), mean class agreement, colourfulness,
    contrast, border fill and objective alignment (the icons': `objective_alignment`, the old
    "fidelity"); for the real patches, the mean over cells of the per-cell medians."""
    m = len(scores["retrieval_rank_raw"])
    return {"cells": int(m),
            "icons": _side(scores, "", objective_alignment if objective_alignment is not None else []),
            "members": {**_side(scores, "member_", scores["member_objective_alignment"]),
                        **{f"retrieval_at{k}_{kind}_loo": _at(scores[f"member_retrieval_rank_{kind}_loo"], k)
                           for kind in ("raw", "whitened") for k in (1, 5)
                           if f"member_retrieval_rank_{kind}_loo" in scores}},
            "patches": {"colourfulness": _mean(scores["patch_colourfulness"]),
                        "contrast": _mean(scores["patch_contrast"]),
                        "border_fill": _mean(scores["patch_border_fill"])}}


def score_value(key: str, v) -> int | float | None:
    """One per-cell score as JSON: ints for ranks and counts (None for -1), floats rounded to 4
    digits (None for NaN)."""
    if key in INT_KEYS:
        v = int(v)
        return None if v < 0 else v
    v = float(v)
    return round(v, 4) if np.isfinite(v) else None


__all__ = ["ScoreConfig", "SCORE_KEYS", "ICON_KEYS", "MEMBER_KEYS", "PATCH_KEYS", "retrieval_ranks",
           "whitened_targets", "top_classes_of", "class_agreement", "cosine_rows", "activation_scores",
           "colourfulness", "contrast", "border_fill", "vividness", "patch_box", "cut_patch", "patch_vividness",
           "sample_members", "centre_scores_inputs", "leave_one_out_means", "score_level", "summarize_level",
           "score_value"]
