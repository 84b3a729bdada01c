"""Patch attacks (method.md §4.1, §4.3, §7.A12): paste a patch on images of a source class and count
how often the model's top-1 flips to a target class.

Geometry (``composite``): the background is already at the model's input size s (``preprocess.geometry``);
the patch is resized (LANCZOS) to side = int(r * s) and pasted opaquely at x = int(px * (s - side)),
y = int(py * (s - side)). Corners (px, py): (0,0) top-left, (1,0) top-right, (0,1) bottom-left,
(1,1) bottom-right.

Success (§4.3): over the images classified correctly as the source class before patching,
* static:  the single (size, corner) with the most flips, applied to every image: flipped / correct;
* dynamic: an image counts when ANY (size, corner) flips it: flipped / correct.
p_target_before is the mean target probability over those images unpatched. p_target_after is the mean
over images at the static choice (static), and (dynamic) at each image's best choice: the flipping
(size, corner) with the highest target probability when one flips, else the (size, corner) with the
highest target probability. The same is computed for a uniform-noise patch (the control).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..data import to_rgb
from ..errors import ConfigError

CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))  # top-left, top-right, bottom-left, bottom-right
CORNER_NAMES = {(0, 0): "top-left", (1, 0): "top-right", (0, 1): "bottom-left", (1, 1): "bottom-right"}
DEFAULT_SIZES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def composite(bg: Image.Image, patch: Image.Image, r: float, corner: Sequence[float]) -> Image.Image:
    """Paste `patch` resized to int(r * s) square (LANCZOS) on a copy of the s x s RGB `bg` at `corner`.

    corner = (px, py) in [0, 1]^2; position x = int(px * (s - side)), y = int(py * (s - side)).
    Returns a new RGB image; r with int(r * s) == 0 returns an unchanged copy.
    """
    w, h = bg.size
    if w != h:
        raise ConfigError(f"composite needs a square background at the model input size, got {w}x{h}")
    if not 0 <= r <= 1:
        raise ConfigError(f"patch size must be a fraction of the side in [0, 1], got {r}")
    s = w
    out = to_rgb(bg).copy()
    side = int(r * s)
    if side <= 0:
        return out
    p = to_rgb(patch).resize((side, side), Image.Resampling.LANCZOS)
    px, py = corner
    out.paste(p, (int(px * (s - side)), int(py * (s - side))))
    return out


def noise_patch(size: int, seed: int = 0) -> Image.Image:
    """A size x size RGB image of uniform random uint8 values (the §4.3 control, like ``random.png``)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def corner_list(corners) -> list[tuple[float, float]]:
    if isinstance(corners, (int, np.integer)):
        if not 1 <= corners <= 4:
            raise ConfigError(f"corners must be 1-4 or a list of (px, py), got {corners}")
        return [CORNERS[k] for k in range(int(corners))]
    out = [tuple(c) for c in corners]
    if not out or any(len(c) != 2 or not all(0 <= v <= 1 for v in c) for c in out):
        raise ConfigError(f"corners must be (px, py) pairs in [0, 1], got {corners!r}")
    return out


class Classifier:
    """Batched softmax over a ModelSpec for s x s PIL images."""

    def __init__(self, spec, batch_size: int):
        self.spec, self.batch_size = spec, max(1, int(batch_size))
        params = list(spec.module.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.channels_last = bool(getattr(spec, "info", {}).get("channels_last"))

    @torch.no_grad()
    def __call__(self, imgs: list[Image.Image]) -> np.ndarray:
        """[b] PIL (already s x s) -> [b, classes] float64 softmax probabilities."""
        out = []
        for a in range(0, len(imgs), self.batch_size):
            arr = np.stack([np.asarray(to_rgb(im), np.uint8).transpose(2, 0, 1)
                            for im in imgs[a:a + self.batch_size]])
            x = self.spec.preprocess.normalize(torch.from_numpy(arr).to(self.device))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self.spec.module(x).float()
            out.append(torch.softmax(logits, dim=1).double().cpu().numpy())
        if not out:
            return np.zeros((0, self.spec.num_classes))
        return np.concatenate(out)


@dataclass
class PatchAttackResult:
    """One patch over the eligible images. S sizes, C corners, N eligible images.

    sizes: [S]; corners: [C] (px, py); flipped: [N, S, C] bool (top-1 == target after patching);
    p_target: [N, S, C] target probability after patching; p_before: [N] before patching.
    """

    sizes: list[float]
    corners: list[tuple[float, float]]
    flipped: np.ndarray
    p_target: np.ndarray
    p_before: np.ndarray

    @property
    def correct_before(self) -> int:
        return int(len(self.p_before))

    def success_grid(self) -> np.ndarray:
        """[S, C] fraction flipped per (size, corner); zeros when no image is eligible."""
        n = max(self.correct_before, 1)
        return self.flipped.sum(axis=0) / n

    def static_choice(self) -> tuple[int, int]:
        """(size index, corner index) with the most flips; ties -> highest mean p_target, then first."""
        counts = self.flipped.sum(axis=0).astype(np.float64)
        meanp = self.p_target.mean(axis=0) if self.correct_before else np.zeros_like(counts)
        key = counts * 2.0 + meanp  # meanp in [0, 1] < 2 breaks ties only
        flat = int(np.argmax(key))
        return divmod(flat, len(self.corners))

    def dynamic_choice(self) -> np.ndarray:
        """[N] flat (size * C + corner) per image: the flipping choice with the highest p_target when one
        flips, else the highest p_target."""
        N = self.correct_before
        f = self.flipped.reshape(N, -1)
        p = self.p_target.reshape(N, -1)
        return np.argmax(np.where(f, 2.0 + p, p), axis=1)

    def summary(self) -> dict:
        """JSON-ready numbers (rates as fractions in [0, 1]; None when no image was eligible)."""
        N = self.correct_before
        si, ci = self.static_choice()
        grid = self.success_grid()
        if N:
            dyn = self.dynamic_choice()
            p_dyn = self.p_target.reshape(N, -1)[np.arange(N), dyn]
            static_flipped = int(self.flipped[:, si, ci].sum())
            dyn_flipped = int(self.flipped.reshape(N, -1).any(axis=1).sum())
            res = dict(static_success=static_flipped / N, dynamic_success=dyn_flipped / N,
                       p_target_before=float(self.p_before.mean()),
                       p_target_after=float(self.p_target[:, si, ci].mean()),
                       p_target_after_dynamic=float(p_dyn.mean()))
        else:
            static_flipped = dyn_flipped = 0
            res = dict(static_success=None, dynamic_success=None, p_target_before=None,
                       p_target_after=None, p_target_after_dynamic=None)
        res.update(
            correct_before=N, static_flipped=static_flipped, dynamic_flipped=dyn_flipped,
            static_size=float(self.sizes[si]), static_corner=list(self.corners[ci]),
            static_corner_name=CORNER_NAMES.get(tuple(self.corners[ci]), str(self.corners[ci])),
            per_size=[dict(size=float(s), success=float(grid[k].max()) if N else None,
                           corner=list(self.corners[int(grid[k].argmax())]))
                      for k, s in enumerate(self.sizes)],
            grid=[dict(size=float(s), corner=list(c), flipped=int(self.flipped[:, a, b].sum()),
                       success=float(grid[a, b]) if N else None,
                       p_target_after=float(self.p_target[:, a, b].mean()) if N else None)
                  for a, s in enumerate(self.sizes) for b, c in enumerate(self.corners)])
        return res


def eligible_images(probs: np.ndarray, labels: np.ndarray | None, source_class: int | None,
                    target: int) -> np.ndarray:
    """[n] bool: images classified correctly as a source before patching.

    source_class given: top-1 == source_class (and label == source_class where labels are given).
    source_class None: labels required; label >= 0, label != target and top-1 == label.
    """
    pred = probs.argmax(axis=1)
    if source_class is not None:
        ok = pred == source_class
        if labels is not None:
            ok &= np.asarray(labels) == source_class
        return ok & (source_class != target)
    if labels is None:
        raise ConfigError("without a source class the images need labels (every non-target image whose "
                        "label the model predicts is a source image)")
    labels = np.asarray(labels)
    return (labels >= 0) & (labels != target) & (pred == labels)


def evaluate_patch(classify, bgs: list[Image.Image], p_before: np.ndarray, target: int, patch: Image.Image,
                   sizes: Sequence[float], corners: list[tuple[float, float]]) -> PatchAttackResult:
    """Composite `patch` on every background at every (size, corner) and classify (see module doc)."""
    S, C, N = len(sizes), len(corners), len(bgs)
    flipped = np.zeros((N, S, C), bool)
    p_t = np.zeros((N, S, C), np.float64)
    for n, bg in enumerate(bgs):
        imgs = [composite(bg, patch, r, c) for r in sizes for c in corners]
        pr = classify(imgs)
        flipped[n] = (pr.argmax(axis=1) == target).reshape(S, C)
        p_t[n] = pr[:, target].reshape(S, C)
    return PatchAttackResult(sizes=[float(s) for s in sizes], corners=list(corners), flipped=flipped,
                             p_target=p_t, p_before=np.asarray(p_before, np.float64))


def patch_attack(spec, source_images: list[Image.Image], source_labels: np.ndarray | None,
                 source_class: int | None, target: int, patch: Image.Image,
                 sizes: Sequence[float] = DEFAULT_SIZES, corners=4, batch_size: int = 32,
                 seed: int = 0) -> dict:
    """Evaluate a patch and a uniform-noise control patch (method.md §4.3).

    spec: ModelSpec; source_images: RGB PILs (any size: ``spec.preprocess.geometry`` brings them to
    s x s); source_labels: [n] int (-1 unknown) or None; source_class / target: class indices; sizes:
    fractions of the side; corners: 1-4 (the first k of CORNERS) or a list of (px, py).

    Returns a dict: the ``PatchAttackResult.summary()`` keys of the patch (static_success,
    dynamic_success, correct_before, p_target_before, p_target_after [static choice],
    p_target_after_dynamic, per_size, grid, ...), plus ``noise`` (the same keys for
    ``noise_patch(s, seed)`` at the same sizes and corners), ``n_images``, ``source_class``,
    ``target``, ``sizes``, ``corners``. The noise control uses the same eligible images.
    """
    if not sizes:
        raise ConfigError("need at least one patch size")
    sizes = [float(s) for s in sizes]
    for s in sizes:
        if not 0 < s <= 1:
            raise ConfigError(f"patch sizes are fractions of the side in (0, 1], got {s}")
    corners_xy = corner_list(corners)
    if not 0 <= target < spec.num_classes:
        raise ConfigError(f"target class {target} out of range [0, {spec.num_classes})")
    if source_labels is not None and len(source_labels) != len(source_images):
        raise ConfigError(f"{len(source_labels)} labels for {len(source_images)} images")
    classify = Classifier(spec, batch_size)
    bgs = [spec.preprocess.geometry(to_rgb(im)) for im in source_images]
    probs = classify(bgs)
    ok = eligible_images(probs, source_labels, source_class, target) if len(bgs) else np.zeros(0, bool)
    idx = np.flatnonzero(ok)
    chosen = [bgs[k] for k in idx]
    p_before = probs[idx, target] if len(idx) else np.zeros(0)
    res = evaluate_patch(classify, chosen, p_before, target, patch, sizes, corners_xy)
    noise = evaluate_patch(classify, chosen, p_before, target, noise_patch(spec.input_size, seed), sizes,
                           corners_xy)
    out = res.summary()
    out.update(noise=noise.summary(), n_images=len(source_images), source_class=source_class,
               target=int(target), sizes=sizes, corners=[list(c) for c in corners_xy],
               eligible=[int(k) for k in idx])
    return out


# ----------------------------------------------------------------------------------------------
# report

def success_chart(result: dict, width: int = 520, height: int = 340, title: str | None = None) -> Image.Image:
    """A PIL line chart of static success (best corner) vs patch size: patch (blue) vs noise (grey)."""
    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    L, R, T, B = 64, 20, 34, 52
    x0, x1, y0, y1 = L, width - R, height - B, T
    d.line([(x0, y1), (x0, y0), (x1, y0)], fill="black", width=1)
    sizes = [p["size"] for p in result["per_size"]]
    lo, hi = (min(sizes), max(sizes)) if sizes else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.05, hi + 0.05
    fx = lambda s: x0 + (s - lo) / (hi - lo) * (x1 - x0 - 10) + 5  # noqa: E731
    fy = lambda v: y0 - v * (y0 - y1)  # noqa: E731
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        y = fy(v)
        d.line([(x0 - 4, y), (x0, y)], fill="black")
        d.line([(x0 + 1, y), (x1, y)], fill=(230, 230, 230))
        d.text((x0 - 34, y - 6), f"{int(v * 100)}%", fill="black", font=font)
    for s in sizes:
        d.line([(fx(s), y0), (fx(s), y0 + 4)], fill="black")
        d.text((fx(s) - 8, y0 + 7), f"{s:g}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 80, height - 22), "patch size (fraction of image side)", fill="black", font=font)
    lab = Image.new("RGB", (150, 14), "white")
    ImageDraw.Draw(lab).text((2, 1), "static success rate", fill="black", font=font)
    img.paste(lab.rotate(90, expand=True), (6, (y0 + y1) // 2 - 75))
    d.text((x0, 10), title or "patch success vs size (best corner)", fill="black", font=font)
    series = [(result, (31, 100, 200), "patch")]
    if result.get("noise"):
        series.append((result["noise"], (150, 150, 150), "noise control"))
    for k, (r, color, name) in enumerate(series):
        pts = [(fx(p["size"]), fy(p["success"])) for p in r["per_size"] if p["success"] is not None]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly = T + 4 + 14 * k
        d.line([(x1 - 110, ly + 6), (x1 - 90, ly + 6)], fill=color, width=2)
        d.text((x1 - 85, ly), name, fill="black", font=font)
    return img


def jsonable(v):
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def save_report(result: dict, out_dir, name: str = "patch_attack") -> dict:
    """Write <name>.json (the whole result), <name>.csv (one row per patch kind x size x corner) and
    <name>.png (success_chart) under out_dir. Returns {"json": path, "csv": path, "png": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{name}.{k}" for k in ("json", "csv", "png")}
    paths["json"].write_text(json.dumps(jsonable(result), indent=2) + "\n", encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["patch", "size", "corner_x", "corner_y", "correct_before", "flipped", "success",
                    "p_target_before", "p_target_after"])
        for kind, r in (("patch", result), ("noise", result.get("noise"))):
            if not r:
                continue
            for g in r["grid"]:
                w.writerow([kind, g["size"], g["corner"][0], g["corner"][1], r["correct_before"],
                            g["flipped"], g["success"], r["p_target_before"], g["p_target_after"]])
    success_chart(result).save(paths["png"])
    return {k: str(p) for k, p in paths.items()}
