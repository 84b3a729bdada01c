"""Patch attacks driven by atlases (method.md §3.3, §4.3): patches from atlas cells, source sets,
evaluation against the noise control, and the search for patches among comparison candidates.

The arithmetic of one attack (composite, static/dynamic success, the noise control) is
``actatlas.analysis.patches``; this module adds what the commands need around it:

* `CellSpec` / `parse_cell_spec`: a patch named ``RUN:LAYER:LEVEL:I:J`` (a cell of a run's atlas grid).
* `render_patches` / `cell_patch`: a direction (a cell's mean activation) rendered as a larger icon
  with the run's own render settings (objective, whitening, transforms), at `size_px`.
* `LabelledImages`, `ImageBank`, `prepare_attack_set`: the images an attack runs on. With a source class
  that has fewer than `min_source` correctly classified images (e.g. the one-image-per-class ImageNet
  sample) the set falls back to every correctly classified image of any class but the target, and
  says so (``AttackSet.fallback``, ``AttackSet.note``).
* `evaluate_on_set`: `evaluate_patch` over an `AttackSet` with a progress bar; `attack_summary` gives
  the same keys as ``patch_attack`` (static_success, dynamic_success, correct_before, p_target_before,
  p_target_after, p_target_after_dynamic, per_size, grid, ..., noise).
* `run_patch_attack`: several patches against one target, one shared noise control, reports written.
* `find_patches`: compare two classes, render the candidate cells of both sides, attack with each and
  rank by lift over noise = static success - noise static success.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data import DEFAULT_MAX_PIXELS, ImageDecodeError, images, load_rgb
from ..errors import ConfigError, UserError
from ..grid import load_grid
from ..models.spec import resolve_class
from ..pipeline import check_layer, run_whiten
from ..render import RenderConfig, render_icons
from ..run import load_run_model, open_run
from ..stages import read_manifest
from ..store import ensure_dir, save_png_atomic, write_json_atomic
from .compare import compare
from .patches import (DEFAULT_SIZES, PatchAttackResult, Classifier, corner_list, jsonable, evaluate_patch,
                      noise_patch, save_report)

log = logging.getLogger(__name__)

MIN_SOURCE_IMAGES = 5
"""A source class with fewer correctly classified images than this falls back to all other classes."""

SUMMARY_KEYS = ("static_success", "dynamic_success", "correct_before", "p_target_before", "p_target_after",
                "p_target_after_dynamic", "static_flipped", "dynamic_flipped", "static_size", "static_corner",
                "static_corner_name")

__all__ = ["MIN_SOURCE_IMAGES", "CellSpec", "parse_cell_spec", "looks_like_cell_spec", "run_render_config",
           "run_whitening", "render_patches", "cell_direction", "render_cell_patch", "cell_patch",
           "LabelledImages", "labelled_images", "run_images", "ImageBank", "AttackSet", "prepare_attack_set",
           "evaluate_on_set", "attack_summary", "lift", "run_patch_attack", "select_candidates",
           "find_patches", "FindPatchesResult", "contact_sheet"]


# ----------------------------------------------------------------------------------------------
# cell specs and cell patches

@dataclass(frozen=True)
class CellSpec:
    """A cell of a run's atlas grid: ``RUN:LAYER:LEVEL:I:J`` (i = x cell, j = y cell, see ``grid``)."""
    run: str
    layer: str
    level: int
    i: int
    j: int

    def __str__(self) -> str:
        return f"{self.run}:{self.layer}:{self.level}:{self.i}:{self.j}"

    @property
    def name(self) -> str:
        """A file-name friendly label, e.g. ``blocks.8-L20-i3-j7``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.layer}-L{self.level}-i{self.i}-j{self.j}")


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def looks_like_cell_spec(text: str) -> bool:
    """True when `text` is not an existing file, has a ':' and no image file suffix (so it is meant as
    ``RUN:LAYER:LEVEL:I:J``; `parse_cell_spec` then reports what is wrong with it)."""
    return ":" in text and not Path(text).is_file() and not text.lower().endswith(_IMAGE_SUFFIXES)


def parse_cell_spec(text: str) -> CellSpec:
    """``RUN:LAYER:LEVEL:I:J`` -> CellSpec (RUN may itself contain ':'; LEVEL, I, J are integers >= 0).

    Raises UserError naming the expected form for anything else.
    """
    form = "expected RUN:LAYER:LEVEL:I:J, e.g. runs/demo:blocks.8:20:3:7"
    parts = str(text).rsplit(":", 4)
    if len(parts) != 5 or not all(p.strip() for p in parts):
        raise ConfigError(f"malformed cell spec {text!r}: {form}")
    run, layer, level, i, j = (p.strip() for p in parts)
    try:
        level_i, ii, jj = int(level), int(i), int(j)
    except ValueError:
        raise ConfigError(f"malformed cell spec {text!r}: LEVEL, I and J must be integers ({form})") from None
    if level_i < 1 or ii < 0 or jj < 0:
        raise ConfigError(f"malformed cell spec {text!r}: LEVEL must be >= 1 and I, J >= 0 ({form})")
    return CellSpec(run, layer, level_i, ii, jj)


def run_render_config(run_dir, layer: str, **overrides):
    """The `RenderConfig` of the run's last render of `layer` (manifest ``render:<layer>`` stage; its
    `standalone` form: these icons have no parent level), else ``RenderConfig.single_level()``, with
    `overrides` (None values ignored) applied; and the whitening
    ridge recorded for the layer (default 1e-2). Returns (cfg, ridge)."""
    stages = read_manifest(Path(run_dir)).get("stages", {})
    rec = stages.get(f"render:{layer}", {}).get("config", {}).get("render")
    fields = {f.name for f in dataclasses.fields(RenderConfig)}
    cfg = (RenderConfig(**{k: v for k, v in rec.items() if k in fields}).standalone() if rec
           else RenderConfig.single_level())
    ridge = float(stages.get(f"whiten:{layer}", {}).get("config", {}).get("ridge", 1e-2))
    over = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = dataclasses.replace(cfg, **over)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg, ridge


def run_whitening(run_dir, layer: str, ridge: float = 1e-2) -> np.ndarray:
    """[c, c] whitening matrix S of the run's layer (the pipeline's cached ``whiten`` stage, §1.8)."""
    return run_whiten(run_dir, layer, ridge).S


def _spec_for_run(run, spec=None, device: str = "cpu"):
    """The run's model: `spec` when it is that model, else loaded from the run's config."""
    if spec is not None and spec.name == run.config["model"]:
        return spec
    if spec is not None:
        log.warning("the run was collected with %s, not %s: rendering its patches with %s",
                    run.config["model"], spec.name, run.config["model"])
    return load_run_model(run, device)


def render_patches(spec, run_dir, layer: str, directions: np.ndarray, size_px: int = 128,
                   steps: int | None = None, device: str | None = None, progress: bool = True):
    """Render each direction [m, c] of a run's `layer` as a `size_px` square patch (PIL RGB images).

    Uses the run's own render settings (`run_render_config`: objective, power, whitening, transforms,
    attempts) with the icon size set to `size_px` and, when given, `steps`. Returns (images, IconSet).
    """
    run = open_run(run_dir)
    if layer not in run.layers:
        raise ConfigError(f"layer {layer!r} was not collected in {run_dir}; collected: {', '.join(run.layers)}")
    if size_px < 8:
        raise ConfigError(f"patch size must be at least 8 px, got {size_px}")
    if steps is not None and steps < 1:
        raise ConfigError(f"render steps must be >= 1, got {steps}")
    cfg, ridge = run_render_config(run_dir, layer, icon_size=int(size_px), steps=steps, device=device)
    S = run_whitening(run_dir, layer, ridge) if cfg.whiten else None
    module_layer = run.config["module_layers"][layer]
    dirs = np.asarray(directions, np.float32)
    icons = render_icons(spec, module_layer, dirs, cfg, S=S, progress=progress)
    return [Image.fromarray(np.asarray(im), "RGB") for im in icons.images], icons


def cell_direction(cell: CellSpec) -> tuple[np.ndarray, dict]:
    """The direction of an atlas cell (its mean activation, [c]) and a description of the cell.

    Raises UserError when the run, layer, grid level or cell does not exist (listing what does).
    """
    run = open_run(cell.run)
    if cell.layer not in run.layers:
        raise ConfigError(f"cell spec {cell}: layer {cell.layer!r} was not collected in {cell.run}; "
                        f"collected: {', '.join(run.layers)}")
    try:
        levels = load_grid(Path(cell.run) / "grid", cell.layer)
    except UserError:
        raise ConfigError(f"cell spec {cell}: the run has no grid for {cell.layer!r} yet "
                        f"(grid the run's layer {cell.layer} first, e.g. by building its atlas)") from None
    by_size = {lv.size: lv for lv in levels}
    if cell.level not in by_size:
        raise ConfigError(f"cell spec {cell}: no grid level {cell.level}; levels: "
                        f"{', '.join(map(str, sorted(by_size)))}")
    lv = by_size[cell.level]
    c = lv.cell_at(cell.i, cell.j)
    if c < 0:
        cells = [f"{int(a)}:{int(b)}" for a, b in zip(lv.i, lv.j)]
        shown = ", ".join(cells[:40]) + (f", ... ({len(cells)} in all)" if len(cells) > 40 else "")
        raise ConfigError(f"cell spec {cell}: level {cell.level} has no cell at i={cell.i}, j={cell.j} "
                        f"(out of range or under the count threshold); cells that exist (I:J): {shown}")
    names = run.class_names
    top = [int(t) for t in lv.top_classes[c][:3]]
    info = dict(cell=str(cell), level=cell.level, i=cell.i, j=cell.j, n=int(lv.count[c]),
                top_classes=top, top_names=[names[t] for t in top if t >= 0],
                top_values=[float(v) for v in lv.top_values[c][:3]])
    return np.asarray(lv.mean_activation[c], np.float32), info


def render_cell_patch(cell: CellSpec, size_px: int = 128, steps: int | None = None, spec=None,
                      device: str = "cpu", progress: bool = False) -> tuple[Image.Image, dict]:
    """Render one atlas cell as a patch; returns (RGB image size_px x size_px, info dict with the cell's
    count, top classes and the icon's fidelity / objective)."""
    direction, info = cell_direction(cell)
    spec = _spec_for_run(open_run(cell.run), spec, device)
    imgs, icons = render_patches(spec, cell.run, cell.layer, direction[None], size_px, steps, progress=progress)
    info.update(fidelity=float(icons.fidelity[0]), objective=float(icons.objective[0]),
                size_px=int(size_px), steps=int(icons.config.steps))
    return imgs[0], info


def cell_patch(run_dir, layer: str, level: int, i: int, j: int, size_px: int = 128, steps: int | None = None,
               spec=None, device: str = "cpu", progress: bool = False) -> Image.Image:
    """The icon of atlas cell (level, i, j) of `layer` in `run_dir`, re-rendered at `size_px` with the
    run's render settings (direction = the cell's mean activation). A PIL RGB image."""
    return render_cell_patch(CellSpec(str(run_dir), layer, int(level), int(i), int(j)), size_px, steps, spec,
                             device, progress)[0]


# ----------------------------------------------------------------------------------------------
# images and source sets

@dataclass
class LabelledImages:
    """Image paths with class labels (-1 unknown) in the model's class order; `max_pixels`: the
    loader's pixel cap for them (see `actatlas.data.load_rgb`)."""
    paths: list[str]
    labels: np.ndarray
    description: str
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((np.asarray(self.labels) >= 0).any())


def labelled_images(source, spec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LabelledImages:
    """`source` (anything ``actatlas.images`` takes) with labels resolved against the model's classes
    (wnid file-name prefixes, class folders)."""
    src = images(source, max_pixels=max_pixels)
    return LabelledImages([it.path for it in src], np.asarray(src.labels(spec.class_names, spec.wnids), np.int64),
                          src.description, src.max_pixels)


def run_images(run_dir) -> LabelledImages:
    """The images a run was collected from (unique paths of its provenance rows, with their labels)."""
    run = open_run(run_dir)
    rows = run.rows(run.layers[0])
    _, first = np.unique(np.asarray(rows.image), return_index=True)
    first = np.sort(first)
    return LabelledImages([str(p) for p in rows.path[first]], np.asarray(rows.label[first], np.int64),
                          f"the images of run {run_dir} ({run.config.get('images', '?')})")


class ImageBank:
    """Loads images at the model's input geometry (s x s) and classifies them once; cached by index.

    Undecodable images are skipped (counted in ``skipped``).
    """
    def __init__(self, spec, images: LabelledImages, batch_size: int = 32, progress: bool = True):
        self.spec, self.images, self.progress = spec, images, progress
        self.classify = Classifier(spec, batch_size)
        self.bgs: dict[int, Image.Image] = {}
        self.probs: dict[int, np.ndarray] = {}
        self.skipped: dict[int, str] = {}

    def load(self, indices: Sequence[int]) -> list[int]:
        """Load and classify `indices` (once); returns those that decoded."""

        todo = [int(k) for k in indices if int(k) not in self.bgs and int(k) not in self.skipped]
        if todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="classify images", unit="img", disable=not self.progress)
            for a in range(0, len(todo), 64):
                part = []
                for k in todo[a:a + 64]:
                    try:
                        pre = self.spec.preprocess
                        self.bgs[k] = pre.geometry(load_rgb(self.images.paths[k], max_pixels=self.images.max_pixels,
                                                            min_side=pre.decode_side))
                        part.append(k)
                    except ImageDecodeError as exc:
                        self.skipped[k] = str(exc)
                if part:
                    pr = self.classify([self.bgs[k] for k in part])
                    for k, p in zip(part, pr):
                        self.probs[k] = p.astype(np.float32)
                bar.update(len(todo[a:a + 64]))
            bar.close()
        return [int(k) for k in indices if int(k) in self.bgs]

    def pred(self, k: int) -> int:
        return int(np.argmax(self.probs[k]))


@dataclass
class AttackSet:
    """The images one attack runs on: N correctly classified source images at the model's input size.

    backgrounds: N PIL s x s; p_before: [N] target probability unpatched; labels: [N] their class
    (the model's own prediction when the images have no labels); indices: [N] into the image list.
    fallback: True when the source class had fewer than `min_source` correctly classified images and
    every other class was used instead; note: a human-readable account of how the set was chosen.
    """
    target: int
    source_class: int | None
    backgrounds: list
    p_before: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    fallback: bool
    note: str
    source_class_correct: int | None = None
    eligible_total: int = 0
    labels_from: str = "files"
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.backgrounds)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        nm = (lambda c: None if c is None or class_names is None else class_names[c])  # noqa: E731
        return dict(target=self.target, target_name=nm(self.target), source_class=self.source_class,
                    source_name=nm(self.source_class), source_fallback=self.fallback, note=self.note,
                    source_class_correct=self.source_class_correct, images_used=self.n,
                    eligible_total=self.eligible_total, labels_from=self.labels_from,
                    source_classes=int(len(np.unique(self.labels))) if self.n else 0, **self.info)


def prepare_attack_set(bank: ImageBank, target: int, source_class: int | None = None,
                       min_source: int = MIN_SOURCE_IMAGES, max_images: int | None = None,
                       seed: int = 0) -> AttackSet:
    """Choose the source images of an attack on `target` (method.md §4.3: only images classified
    correctly before patching count).

    * source_class given and it has >= `min_source` correctly classified images: those images.
    * otherwise (no source class, or too few of it): every image of another class (label != target)
      that the model classifies correctly; with a source class this is the *fallback*, reported in
      ``fallback`` / ``note``.
    Images without labels (every label -1) are labelled by the model's own top-1 prediction (so
    "correct" means "not already the target"). `max_images` caps the set by a seeded random subset.
    """
    names = bank.spec.class_names
    K = bank.spec.num_classes
    if not 0 <= target < K:
        raise ConfigError(f"target class {target} out of range [0, {K})")
    if source_class is not None and not 0 <= source_class < K:
        raise ConfigError(f"source class {source_class} out of range [0, {K})")
    if source_class is not None and source_class == target:
        raise ConfigError(f"source and target are the same class ({names[target]})")
    labels_all = np.asarray(bank.images.labels, np.int64)
    labelled = bank.images.has_labels
    n_all = len(labels_all)
    fallback, note, src_correct = False, "", None

    def correct_of(idx):
        ok = bank.load(idx)
        if labelled:
            return [k for k in ok if bank.pred(k) == labels_all[k] and labels_all[k] != target]
        return [k for k in ok if bank.pred(k) != target]

    chosen: list[int] | None = None
    if source_class is not None:
        cand = (np.flatnonzero(labels_all == source_class) if labelled else np.arange(n_all)).tolist()
        ok = bank.load(cand)
        src = [k for k in ok if bank.pred(k) == source_class]
        src_correct = len(src)
        if src_correct >= min_source:
            chosen = src
            note = (f"{src_correct} images of {names[source_class]} classified correctly"
                    + ("" if labelled else " (unlabelled images: the model's predictions)"))
        else:
            fallback = True
            note = (f"only {src_correct} correctly classified image(s) of the source class "
                    f"{names[source_class]} (fewer than {min_source}): falling back to every correctly "
                    f"classified image of any class other than the target {names[target]}")
    if chosen is None:
        cand = (np.flatnonzero((labels_all >= 0) & (labels_all != target)) if labelled else np.arange(n_all))
        chosen = correct_of(cand.tolist())
        if not note:
            note = (f"{len(chosen)} correctly classified images of classes other than {names[target]}"
                    + ("" if labelled else " (unlabelled images: the model's predictions as labels)"))
    eligible_total = len(chosen)
    if max_images is not None and len(chosen) > max_images:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(np.asarray(chosen), size=int(max_images), replace=False).tolist())
        note += f"; a seeded random {max_images} of these {eligible_total} are used"
    idx = np.asarray(chosen, np.int64)
    labels = (np.asarray([labels_all[k] for k in idx], np.int64) if labelled
              else np.asarray([bank.pred(k) for k in idx], np.int64))
    return AttackSet(target=int(target), source_class=None if source_class is None else int(source_class),
                     backgrounds=[bank.bgs[k] for k in idx],
                     p_before=np.asarray([bank.probs[k][target] for k in idx], np.float64),
                     labels=labels, indices=idx, fallback=fallback, note=note, source_class_correct=src_correct,
                     eligible_total=eligible_total, labels_from="files" if labelled else "model predictions")


def evaluate_on_set(bank: ImageBank, aset: AttackSet, patch: Image.Image, sizes: Sequence[float] = DEFAULT_SIZES,
                    corners=4, chunk: int = 8, desc: str = "patch") -> PatchAttackResult:
    """`evaluate_patch` over the attack set, `chunk` images at a time (a progress bar over images)."""
    from tqdm.auto import tqdm

    sizes = [float(s) for s in sizes]
    if not sizes or any(not 0 < s <= 1 for s in sizes):
        raise ConfigError(f"patch sizes are fractions of the side in (0, 1], got {sizes}")
    cl = corner_list(corners)
    parts = []
    with tqdm(total=aset.n, desc=desc, unit="img", disable=not bank.progress or aset.n == 0) as bar:
        for a in range(0, aset.n, chunk):
            parts.append(evaluate_patch(bank.classify, aset.backgrounds[a:a + chunk], aset.p_before[a:a + chunk],
                                        aset.target, patch, sizes, cl))
            bar.update(len(parts[-1].p_before))
    if not parts:
        return evaluate_patch(bank.classify, [], np.zeros(0), aset.target, patch, sizes, cl)
    return PatchAttackResult(sizes=sizes, corners=cl, flipped=np.concatenate([p.flipped for p in parts]),
                             p_target=np.concatenate([p.p_target for p in parts]),
                             p_before=np.concatenate([p.p_before for p in parts]))


def attack_summary(res: PatchAttackResult, noise: PatchAttackResult, aset: AttackSet,
                   class_names: Sequence[str] | None = None) -> dict:
    """The ``patch_attack`` result dict (patch keys + ``noise`` + sizes/corners) plus the source set."""
    out = res.summary()
    out.update(noise=noise.summary(), sizes=list(res.sizes), corners=[list(c) for c in res.corners],
               source_class=aset.source_class, target=aset.target, source_fallback=aset.fallback,
               source_set=aset.to_dict(class_names), eligible=[int(k) for k in aset.indices])
    return out


def lift(summary: dict, key: str = "static_success") -> float | None:
    """summary[key] - summary['noise'][key] (the lift over the noise control), None when undefined."""
    a, b = summary.get(key), (summary.get("noise") or {}).get(key)
    return None if a is None or b is None else float(a) - float(b)


def _compact(summary: dict) -> dict:
    keep = {k: summary.get(k) for k in SUMMARY_KEYS}
    keep["per_size"] = summary.get("per_size")
    return keep


def run_patch_attack(spec, images: LabelledImages, target: int, patches: Sequence[tuple[str, Image.Image]],
                     source_class: int | None = None, sizes: Sequence[float] = DEFAULT_SIZES, corners=4,
                     min_source: int = MIN_SOURCE_IMAGES, max_images: int | None = None, seed: int = 0,
                     batch_size: int = 32, out=None, patch_info: Sequence[dict] | None = None,
                     progress: bool = True) -> dict:
    """Attack `target` with each named patch on one source set, against one noise control
    (``noise_patch(s, seed)``, same images, sizes and corners; method.md §4.3).

    Returns a dict: the best patch's summary keys at top level (best = highest static success over
    noise, then dynamic), ``noise`` (the control's summary), ``patches`` (one entry per patch: name,
    the summary keys, lift_static, lift_dynamic, info, report paths), ``source_fallback``,
    ``source_set`` and, with `out`, the report files (``save_report`` per patch: <name>.json/.csv/.png)
    plus ``summary.json``.
    """
    if not patches:
        raise ConfigError("give at least one patch")
    names = spec.class_names
    bank = ImageBank(spec, images, batch_size, progress)
    aset = prepare_attack_set(bank, target, source_class, min_source, max_images, seed)
    if aset.fallback:
        log.warning(aset.note)
    noise = evaluate_on_set(bank, aset, noise_patch(spec.input_size, seed), sizes, corners, desc="noise control")
    results = []
    out_dir = Path(out) if out is not None else None
    used = set()
    for k, (name, patch) in enumerate(patches):
        res = evaluate_on_set(bank, aset, patch, sizes, corners, desc=f"patch {k + 1}/{len(patches)}")
        summ = attack_summary(res, noise, aset, names)
        summ.update(patch=name, patch_info=(patch_info[k] if patch_info else {}))
        entry = dict(name=name, **_compact(summ), lift_static=lift(summ), lift_dynamic=lift(summ, "dynamic_success"),
                     info=summ["patch_info"])
        if out_dir is not None:
            base = Path(name).stem if name.lower().endswith(_IMAGE_SUFFIXES) else name
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base)[-80:] or "patch"
            stem = f"{k + 1:02d}-{stem}"
            while stem in used:
                stem += "_"
            used.add(stem)
            entry["report"] = save_report(summ, out_dir, stem)
            out_dir.mkdir(parents=True, exist_ok=True)
            patch.convert("RGB").save(out_dir / f"{stem}-patch.png")
            entry["patch_png"] = str(out_dir / f"{stem}-patch.png")
        results.append(entry)
    order = sorted(range(len(results)), key=lambda k: (_key(results[k]["lift_static"]),
                                                       _key(results[k]["lift_dynamic"])), reverse=True)
    best = results[order[0]]
    top = {k: best.get(k) for k in SUMMARY_KEYS}
    top.update(best_patch=best["name"], noise=_compact(noise.summary()), patches=results,
               target=int(target), target_name=names[target], source_class=aset.source_class,
               source_name=None if aset.source_class is None else names[aset.source_class],
               source_fallback=aset.fallback, source_note=aset.note, source_set=aset.to_dict(names),
               sizes=[float(s) for s in sizes], corners=[list(c) for c in corner_list(corners)],
               images=images.description, skipped_images=len(bank.skipped),
               lift_static=best["lift_static"], lift_dynamic=best["lift_dynamic"])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(jsonable(top), indent=2) + "\n", encoding="utf-8")
        top["summary_json"] = str(out_dir / "summary.json")
    return top


def _key(v) -> float:
    return -math.inf if v is None else float(v)


# ----------------------------------------------------------------------------------------------
# finding patches among comparison candidates

def select_candidates(candidates, max_candidates: int) -> list:
    """Up to `max_candidates` candidates, alternating the right and left sides (each side in its own
    order: strongest attribution to the third class first), so both directions are tried."""
    right = [c for c in candidates if c.side == "right"]
    left = [c for c in candidates if c.side == "left"]
    out = []
    while len(out) < max_candidates and (right or left):
        for side in (right, left):
            if side and len(out) < max_candidates:
                out.append(side.pop(0))
    return out


@dataclass
class FindPatchesResult:
    """Ranked candidate patches of one comparison; `ranking` is sorted by `score` (lift over noise of
    static success), best first, candidates without a score (no eligible image) last."""
    left: int
    right: int
    layer: str
    ranking: list[dict]
    candidates: list[dict]
    attack_sets: dict
    paths: dict
    comparison: object = None

    def to_dict(self) -> dict:
        return dict(left=self.left, right=self.right, layer=self.layer, ranking=self.ranking,
                    candidates=self.candidates, attack_sets=self.attack_sets, paths=self.paths)


def find_patches(run_dir, layer: str, left, right, images=None, spec=None, max_candidates: int = 6,
                 patch_px: int = 128, render_steps: int | None = None, sizes: Sequence[float] = DEFAULT_SIZES,
                 corners=4, min_source: int = MIN_SOURCE_IMAGES, max_images: int | None = None, top: int = 2000,
                 grid: int = 10, y_method: str = "tsne", min_count: int = 4, seed: int = 0, out=None,
                 device: str = "cpu", batch_size: int = 32, progress: bool = True) -> FindPatchesResult:
    """Search a two-class comparison for patches (method.md §3.3 findings, §4.3 evaluation).

    1. ``compare(run, layer, left, right, top, grid, y_method, min_count)``; take up to `max_candidates`
       candidate cells (`select_candidates`: both sides).
    2. Render each cell's mean activation as a `patch_px` patch (`render_patches`: the run's settings).
    3. A right-side candidate attacks left -> right (source = left images, target = right); a left-side
       one right -> left. Each direction has one source set (`prepare_attack_set`, with the fallback to
       all other classes) and one noise control.
    4. score = static success - noise static success; ranking sorted by score, then by the dynamic lift,
       then by lift_p_target = p(target) after (static choice) - the noise control's (a finer signal
       when no image flips).

    `images`: anything ``actatlas.images`` takes, a `LabelledImages`, or an `ImageBank` (reused across
    calls: images are decoded and classified once); None = the run's own images.
    With `out` writes ranking.json, ranking.csv, contact_sheet.png, patches/*.png and reports/*.
    """
    run = open_run(run_dir)
    layer = check_layer(run, layer)
    names = run.class_names
    L, R = resolve_class(left, names, run.wnids), resolve_class(right, names, run.wnids)
    if L == R:
        raise ConfigError("left and right classes must differ")
    if max_candidates < 1:
        raise ConfigError(f"max candidates must be >= 1, got {max_candidates}")
    spec = _spec_for_run(run, spec, device)
    bank, imgs = _attack_images(run_dir, images, spec)
    cmp = compare(run, layer, L, R, top=top, grid=grid, y_method=y_method, min_count=min_count, seed=seed)
    chosen = select_candidates(list(cmp.candidates), max_candidates)
    all_cands = [c.to_dict() for c in cmp.candidates]
    out_dir = Path(out) if out is not None else None
    ranked: list[tuple[dict, Image.Image]] = []
    sets: dict = {}
    if chosen:
        dirs = np.stack([cmp.level.mean_activation[c.cell] for c in chosen])
        patches, icons = render_patches(spec, run_dir, layer, dirs, patch_px, render_steps, device=None,
                                        progress=progress)
        bank = bank or ImageBank(spec, imgs, batch_size, progress)
        ranked = _rank_candidates(bank, chosen, patches, icons.fidelity, (L, R), names, sizes, corners, min_source,
                                  max_images, seed, sets, out_dir)
    ranking = [entry for entry, _ in ranked]
    paths: dict = {}
    if out_dir is not None:
        doc = dict(run=str(run_dir), layer=layer, left=L, left_name=names[L], right=R, right_name=names[R],
                   comparison=dict(rows=int(len(cmp.rows)), grid=grid, cells=int(cmp.level.m), top=top,
                                   y_method=y_method, min_count=min_count),
                   settings=dict(max_candidates=max_candidates, patch_px=patch_px, render_steps=render_steps,
                                 sizes=[float(s) for s in sizes],
                                 corners=[list(c) for c in corner_list(corners)], min_source=min_source,
                                 max_images=max_images, seed=seed, images=imgs.description),
                   candidates=all_cands, attack_sets=sets, ranking=ranking)
        paths = _write_ranking(out_dir, doc, ranked, f"{names[L]} vs {names[R]} ({layer})")
    return FindPatchesResult(left=L, right=R, layer=layer, ranking=ranking, candidates=all_cands, attack_sets=sets,
                             paths=paths, comparison=cmp)


def _attack_images(run_dir, images, spec) -> tuple["ImageBank | None", "LabelledImages"]:
    """(the `ImageBank` given, or None; the labelled images to attack): `images` as `find_patches` takes it."""
    if isinstance(images, ImageBank):
        if images.spec is not spec and images.spec.name != spec.name:
            raise ConfigError(f"the image bank was classified by {images.spec.name}, the run by {spec.name}")
        return images, images.images
    if isinstance(images, LabelledImages):
        return None, images
    if images is None:
        return None, run_images(run_dir)
    return None, labelled_images(images, spec)


def _rank_candidates(bank, chosen, patches, fidelity, classes, names, sizes, corners, min_source, max_images,
                     seed, sets: dict, out_dir: Path | None) -> list[tuple[dict, Image.Image]]:
    """Attack with each candidate's patch (right-side cells: left -> right; left-side: right -> left),
    each direction against its own source set and noise control (recorded in `sets`); with `out_dir`
    each patch and its report are saved. Returns (ranking entry, patch image), best first."""
    L, R = classes
    noise_img = noise_patch(bank.spec.input_size, seed)
    per_dir: dict = {}
    ranked = []
    for k, c in enumerate(chosen):
        src, tgt = (L, R) if c.side == "right" else (R, L)
        if (src, tgt) not in per_dir:
            aset = prepare_attack_set(bank, tgt, src, min_source, max_images, seed)
            if aset.fallback:
                log.warning(aset.note)
            nz = evaluate_on_set(bank, aset, noise_img, sizes, corners, desc=f"noise {names[src]}->{names[tgt]}")
            per_dir[(src, tgt)] = (aset, nz)
            sets[f"{names[src]} -> {names[tgt]}"] = dict(aset.to_dict(names), noise=_compact(nz.summary()))
        aset, nz = per_dir[(src, tgt)]
        res = evaluate_on_set(bank, aset, patches[k], sizes, corners, desc=f"candidate {k + 1}/{len(chosen)}")
        summ = attack_summary(res, nz, aset, names)
        entry = dict(c.to_dict(), source=int(src), source_name=names[src], target=int(tgt),
                     target_name=names[tgt], fidelity=float(fidelity[k]),
                     **_compact(summ), noise=_compact(summ["noise"]),
                     score=lift(summ), lift_dynamic=lift(summ, "dynamic_success"),
                     lift_p_target=lift(summ, "p_target_after"),
                     source_fallback=aset.fallback, images_used=aset.n)
        entry.pop("per_size", None)
        entry["noise"].pop("per_size", None)
        if out_dir is not None:
            stem = f"cand{k + 1:02d}-{c.side}-i{c.i}-j{c.j}"
            ensure_dir(out_dir / "patches")
            save_png_atomic(out_dir / "patches" / f"{stem}.png", patches[k].convert("RGB"))
            entry["patch_png"] = str(out_dir / "patches" / f"{stem}.png")
            entry["report"] = save_report(dict(summ, candidate=c.to_dict()), out_dir / "reports", stem)
        ranked.append((entry, patches[k]))
    ranked.sort(key=lambda ep: (_key(ep[0]["score"]), _key(ep[0]["lift_dynamic"]), _key(ep[0]["lift_p_target"])),
                reverse=True)
    for r, (e, _) in enumerate(ranked):
        e["rank"] = r + 1
    return ranked


RANKING_COLUMNS = ("rank", "side", "i", "j", "n", "top_class", "top_name", "value", "source", "target",
                   "images_used", "source_fallback", "static_success", "dynamic_success", "noise_static_success",
                   "noise_dynamic_success", "score", "lift_dynamic", "lift_p_target", "p_target_before",
                   "p_target_after", "static_size", "static_corner_name", "fidelity")


def _ranking_row(e: dict) -> list:
    special = {"source": e["source_name"], "target": e["target_name"],
               "noise_static_success": e["noise"]["static_success"],
               "noise_dynamic_success": e["noise"]["dynamic_success"]}
    return [special[k] if k in special else e[k] for k in RANKING_COLUMNS]


def _write_ranking(out_dir: Path, doc: dict, ranked: list[tuple[dict, Image.Image]], title: str) -> dict:
    """ranking.json, ranking.csv and contact_sheet.png in `out_dir`; returns their paths."""
    ensure_dir(out_dir)
    paths = {"json": str(out_dir / "ranking.json"), "csv": str(out_dir / "ranking.csv"),
             "contact_sheet": str(out_dir / "contact_sheet.png")}
    write_json_atomic(Path(paths["json"]), jsonable(doc))
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(RANKING_COLUMNS)
        for e, _ in ranked:
            w.writerow(_ranking_row(e))
    sheet = contact_sheet([p for _, p in ranked], [e for e, _ in ranked], title)
    save_png_atomic(Path(paths["contact_sheet"]), sheet)
    return paths


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def contact_sheet(patches: Sequence[Image.Image], ranking: Sequence[dict], title: str = "",
                  thumb: int = 128, cols: int = 4) -> Image.Image:
    """A PNG-ready sheet: each patch (in ranking order) with its rank, cell, top class, direction and
    static / dynamic success against the noise control."""
    font = ImageFont.load_default()
    n = len(patches)
    cols = max(1, min(cols, n or 1))
    rows = max(1, math.ceil(n / cols))
    cw, ch, head = max(thumb, 170) + 10, thumb + 62, 24
    sheet = Image.new("RGB", (cols * cw + 10, rows * ch + head + 6), "white")
    d = ImageDraw.Draw(sheet)
    d.text((8, 6), title + ("" if n else ": no candidate cells"), fill="black", font=font)
    for k, (p, e) in enumerate(zip(patches, ranking)):
        x, y = 8 + (k % cols) * cw, head + (k // cols) * ch
        sheet.paste(p.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS), (x, y))
        lines = [f"#{e.get('rank', k + 1)} {e['side']} ({e['i']},{e['j']}) n={e['n']}",
                 f"top: {str(e.get('top_name'))[:26]}",
                 f"{str(e['source_name'])[:12]}->{str(e['target_name'])[:12]}",
                 f"static {_pct(e['static_success'])} (noise {_pct(e['noise']['static_success'])})"
                 f" dyn {_pct(e['dynamic_success'])}"]
        for t, line in enumerate(lines):
            d.text((x, y + thumb + 2 + 12 * t), line, fill="black", font=font)
    return sheet
