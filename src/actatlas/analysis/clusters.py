"""How many separated clusters a class's activations form on an atlas layout (method.md §3.1, §7 B7).

The article's fireboat analysis: on the full atlas, the cells attributed to "fireboat" form one main
cluster at mixed5b (red boats with spray) but several at mixed4d (windows, water/spray, cranes; the
windows cluster attributes even more strongly to "streetcar"). Here the class's activations are the
"top" filter of method.md §3.2 (``classes.top_rows``: the rows with the largest positive attribution to
the class, the bright part of the class heatmap of §3.1), placed at their positions on the layer's full
layout, and counted by one deterministic rule (`count_clusters`):

* k-means (scikit-learn, ``n_init=10``, seeded) on the [n, 2] layout positions for k = 2 .. k_max;
* k = the one with the highest mean silhouette (Rousseeuw 1987);
* k = 1 when even that silhouette is below ``MIN_SILHOUETTE`` = 0.5, the bound under which Kaufman and
  Rousseeuw (1990) call a clustering's structure weak or possibly artificial: the rows form one group.

Clusters are numbered by size, largest first; ``largest_share`` says whether one of them dominates.
k-means looks for compact groups: a long or curved group (a band or ring on the layout) is cut into
pieces, so for such shapes the count is an upper estimate; the figure (`cluster_figure`) shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError
from ..store import ensure_dir, save_png_atomic

MIN_SILHOUETTE = 0.5     # mean silhouette below this: one cluster (Kaufman & Rousseeuw 1990)
K_MAX = 8                # most clusters tried
DOMINANT_SHARE = 0.5     # "one dominant cluster": the largest holds at least this share of the rows
_INSET = 4               # px between a panel's frame and its outermost dots
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34))


@dataclass
class Clusters:
    """The result of `count_clusters` on n points.

    k:           the number of clusters chosen
    labels:      [n] int64 cluster of each point, 0 = the largest (ties: the lower k-means label)
    shares:      [k] fraction of the points in each cluster, descending
    silhouettes: k -> mean silhouette of the k-means clustering with k clusters (k >= 2 tried)
    """

    k: int
    labels: np.ndarray
    shares: list[float]
    silhouettes: dict[int, float] = field(default_factory=dict)

    @property
    def largest_share(self) -> float:
        return self.shares[0] if self.shares else 0.0


def count_clusters(points: np.ndarray, k_max: int = K_MAX, min_silhouette: float = MIN_SILHOUETTE,
                   seed: int = 0) -> Clusters:
    """Count the clusters of [n, 2] (or [n, d]) `points` by the rule in the module doc.

    k runs from 2 to min(k_max, distinct points - 1) (silhouettes need 2 <= k <= n - 1); with fewer
    than 3 distinct points the answer is one cluster. Deterministic for a given seed.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(points, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"points must be a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("points contain NaN or infinite values")
    if k_max < 1:
        raise ConfigError(f"k_max must be >= 1, got {k_max}")
    n = len(x)
    distinct = len(np.unique(x, axis=0))
    best_k, best_s, best_labels, sil = 1, -np.inf, np.zeros(n, np.int64), {}
    for k in range(2, min(int(k_max), distinct - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        if len(np.unique(labels)) < 2:
            continue
        s = float(silhouette_score(x, labels))
        sil[k] = round(s, 4)
        if s > best_s:
            best_k, best_s, best_labels = k, s, labels
    if best_s < min_silhouette:
        best_k, best_labels = 1, np.zeros(n, np.int64)
    counts = np.bincount(best_labels, minlength=best_k)
    order = np.argsort(-counts, kind="stable")          # renumber: 0 = the largest
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    labels = rank[best_labels].astype(np.int64)
    shares = [round(float(c) / n, 4) for c in counts[order]]
    return Clusters(k=int(best_k), labels=labels, shares=shares, silhouettes=sil)


@dataclass
class ClassClusters:
    """A class's clusters on one layer's layout (`class_clusters`).

    layer:    the layer
    rows:     [m] int64 rows of the layer's collection kept (the "top" filter)
    clusters: `Clusters` over their layout positions
    top:      per cluster (largest first): [(class index, mean attribution)] of its members' mean
              attribution vector, highest first
    """

    layer: str
    rows: np.ndarray
    clusters: Clusters
    top: list[list[tuple[int, float]]]

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        def name(c: int):
            return class_names[c] if class_names is not None and 0 <= c < len(class_names) else c

        return {"rows": int(len(self.rows)), "clusters": self.clusters.k,
                "largest_share": self.clusters.largest_share, "shares": self.clusters.shares,
                "silhouettes": {str(k): v for k, v in self.clusters.silhouettes.items()},
                "cluster_top_classes": [[name(c) for c, _ in t] for t in self.top]}


def class_clusters(layer: str, coords: np.ndarray, attributions: np.ndarray, rows: np.ndarray, seed: int = 0,
                   n_top: int = 3) -> ClassClusters:
    """The clusters of a class's activations on a layer's layout.

    coords: [n, 2] the layer's layout; attributions: [n, classes] (memmap ok); rows: [m] the class's
    rows (e.g. ``classes.top_rows(attributions, cls, top)``: largest positive attribution to the class),
    m >= 1. Each cluster's top classes are the `n_top` largest entries of its members' mean attribution
    (the article: the mixed4d windows cluster's is streetcar).
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or getattr(attributions, "shape", (0,))[0] != len(coords):
        raise ConfigError(f"layout [n, 2] and attributions [n, classes] must have the same rows, got "
                          f"{coords.shape} and {getattr(attributions, 'shape', None)}")
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= len(coords):
        raise ConfigError(f"rows must be a non-empty list of row indices below {len(coords)}")
    cl = count_clusters(coords[rows], seed=seed)
    attr = np.asarray(attributions[rows], np.float32)
    tops = []
    for q in range(cl.k):
        mean = attr[cl.labels == q].mean(axis=0)
        best = np.argsort(-mean, kind="stable")[:n_top]
        tops.append([(int(c), round(float(mean[c]), 6)) for c in best])
    return ClassClusters(layer=layer, rows=rows, clusters=cl, top=tops)


def cluster_figure(path: str | Path, panels: Sequence[tuple[str, np.ndarray, ClassClusters]],
                   size: int = 360) -> Path:
    """A PNG of panels side by side: per (title, layout coords [n, 2], ClassClusters), every row of the
    layout as a light grey dot and the class's rows coloured by cluster (x = layout dim 0 rightward,
    y = dim 1 upward, as the atlas grid draws them)."""
    font = ImageFont.load_default()
    pad, head = 8, 30
    img = Image.new("RGB", (len(panels) * (size + pad) + pad, size + head + pad), "white")
    d = ImageDraw.Draw(img)
    for p, (title, coords, cc) in enumerate(panels):
        x0 = pad + p * (size + pad)
        d.rectangle([x0 - 1, head - 1, x0 + size, head + size], outline=(160, 160, 160))
        d.text((x0, 2), title, fill="black", font=font)
        d.text((x0, 15), f"{cc.clusters.k} cluster(s), largest {cc.clusters.largest_share:.0%} "
                         f"of {len(cc.rows)} rows", fill=(60, 60, 60), font=font)
        xy = np.clip(np.asarray(coords, np.float64), 0.0, 1.0)
        inner = size - 1 - 2 * _INSET          # dots stay inside the frame
        px = x0 + _INSET + xy[:, 0] * inner
        py = head + _INSET + (1.0 - xy[:, 1]) * inner
        for a, b in zip(px, py):
            d.ellipse([a - 1, b - 1, a + 1, b + 1], fill=(205, 205, 205))
        for r, q in zip(cc.rows, cc.clusters.labels):
            a, b = float(px[r]), float(py[r])
            d.ellipse([a - 2.5, b - 2.5, a + 2.5, b + 2.5], fill=PALETTE[int(q) % len(PALETTE)])
    ensure_dir(Path(path).parent, "figure folder")
    return save_png_atomic(path, img)


__all__ = ["Clusters", "ClassClusters", "count_clusters", "class_clusters", "cluster_figure", "MIN_SILHOUETTE",
           "K_MAX", "DOMINANT_SHARE"]
