"""Layout stage: activation vectors [n, c] -> 2-D positions in [0, 1]^2 (method.md §1.4-1.5).

``compute_layout(acts, LayoutConfig())`` runs UMAP (the article's choice; default settings are the
article's mid-layer ``50_0.05_cosine``), t-SNE or PCA and normalizes the result with the reference
``normalize_layout`` (percentile clip + margin, asymmetric margins reproduced exactly).

Determinism: with ``seed`` set (default 0) and ``deterministic=True`` umap-learn runs its SGD on one
thread, so the same data and seed give a bit-identical layout. ``deterministic=False`` lets it use
all cores (faster on big inputs, not reproducible). t-SNE and PCA are deterministic for a fixed seed.

Aligned layouts (``compute_aligned_layouts``): several layers whose rows are the same samples (a
collect with shared locations) laid out jointly, so that a sample sits at about the same place in
every layer's map. UMAP: umap-learn's ``AlignedUMAP`` with identity relations between consecutive
layers (``_aligned_umap``); PCA: each layer's PCA, rotated or reflected onto the previous layer's by
orthogonal Procrustes (the cheap route, for tests and quick looks). All layers are normalized by one
shared transform, so [0, 1]^2 means the same place in every layer.

numba: umap-learn compiles its kernels on first use in every process (~30-60 s here). This module
changes no global state; call ``actatlas.enable_numba_cache()`` once (``Runtime.apply`` does, at the
CLI's and ``build_atlas``'s start) to keep the compiled code on disk, which turns a warm process's
UMAP JIT from ~30 s into ~1 s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, UserError
from .store import drop_pages, layer_dirname, save_npy_atomic, write_json_atomic

log = logging.getLogger(__name__)

METHODS = ("umap", "tsne", "pca")
ENGINES = ("auto", "umap-learn", "cuml")
METRICS = ("cosine", "euclidean", "correlation", "manhattan", "chebyshev", "canberra", "braycurtis")
MIN_ROWS = 4


# ----------------------------------------------------------------------------------------------
# normalization (§1.5)

def normalize_layout(raw: np.ndarray, min_percentile: float = 1, max_percentile: float = 99,
                     relative_margin: float = 0.1, symmetric: bool = False) -> np.ndarray:
    """Reference layout normalization (Lucid ``normalize_layout``, method.md §1.5), per axis.

    1. ``lo = P_min``, ``hi = P_max`` (``np.percentile``, linear interpolation); R = hi - lo.
    2. ``lo -= margin * R``; then ``hi += margin * (hi - lo_new)``: the upper margin is therefore
       ``margin * (1 + margin) * R`` (0.11 R for 0.1) -- the reference's quirk, kept for fidelity.
       ``symmetric=True`` uses ``margin * R`` on both sides instead.
    3. clip to [lo, hi]; subtract the clipped minimum; divide by the clipped maximum, so every axis
       spans exactly [0, 1] (min 0, max 1).

    A degenerate axis (all values equal after clipping) maps to 0.5 (the reference would give NaN).

    raw: [n, d] (d = 2 for a layout), n >= 1, finite. Returns [n, d] float64 in [0, 1].
    """
    x = np.asarray(raw, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"normalize_layout needs a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("the layout contains NaN or infinite values")
    if not 0 <= min_percentile < max_percentile <= 100:
        raise ConfigError(f"need 0 <= min_percentile < max_percentile <= 100, got {min_percentile}, "
                        f"{max_percentile}")
    if relative_margin < 0:
        raise ConfigError(f"relative_margin must be >= 0, got {relative_margin}")
    lo = np.percentile(x, min_percentile, axis=0)
    hi = np.percentile(x, max_percentile, axis=0)
    span = hi - lo
    lo = lo - relative_margin * span
    hi = hi + relative_margin * (span if symmetric else (hi - lo))
    out = np.clip(x, lo, hi)
    out -= out.min(axis=0)
    top = out.max(axis=0)
    flat = top <= 0
    out /= np.where(flat, 1.0, top)
    out[:, flat] = 0.5
    return out


# ----------------------------------------------------------------------------------------------
# config and result

@dataclass(frozen=True)
class LayoutConfig:
    """Settings of the layout stage (method.md §1.4). Defaults: the article's ``50_0.05_cosine``.

    method:       "umap" | "tsne" | "pca".
    n_neighbors, min_dist, metric: UMAP parameters (metric is also t-SNE's; PCA ignores it).
                  ``n_neighbors >= n`` is clamped to ``n - 1`` with a warning.
    pca_dims:     reduce to this many PCA dimensions before UMAP / t-SNE (None = no pre-reduction).
                  For metric "cosine" the projection is *uncentered* (top eigenvectors of AᵀA/N),
                  which keeps dot products and hence cosines; other metrics use centered PCA.
    seed:         random seed (None = unseeded, not reproducible).
    engine:       "auto" (cuML when importable and a CUDA device exists, else umap-learn),
                  "umap-learn" or "cuml" (an error when it is not usable).
    fit_max:      fit UMAP on a seeded random subset of this many rows and ``transform`` the rest;
                  the cheap route to 1M rows. None = fit on all rows. Not available for t-SNE.
    n_epochs:     UMAP epochs / t-SNE iterations (None = library default).
    perplexity:   t-SNE perplexity (None = min(50, (n - 1) / 3)).
    min_percentile, max_percentile, relative_margin, symmetric_margin: see ``normalize_layout``.
    deterministic: umap-learn single-threaded and bit-reproducible (True) or parallel (False).
    """

    method: str = "umap"
    n_neighbors: int = 50
    min_dist: float = 0.05
    metric: str = "cosine"
    pca_dims: int | None = None
    seed: int | None = 0
    engine: str = "auto"
    fit_max: int | None = None
    n_epochs: int | None = None
    perplexity: float | None = None
    min_percentile: float = 1.0
    max_percentile: float = 99.0
    relative_margin: float = 0.1
    symmetric_margin: bool = False
    deterministic: bool = True

    def __post_init__(self):
        bad = []
        if self.method not in METHODS:
            bad.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.engine not in ENGINES:
            bad.append(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.metric not in METRICS:
            bad.append(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not _is_int(self.n_neighbors) or self.n_neighbors < 2:
            bad.append(f"n_neighbors must be an integer >= 2, got {self.n_neighbors!r}")
        if not isinstance(self.min_dist, (int, float)) or not 0 <= self.min_dist <= 1:
            bad.append(f"min_dist must be in [0, 1], got {self.min_dist!r}")
        if self.pca_dims is not None and (not _is_int(self.pca_dims) or self.pca_dims < 2):
            bad.append(f"pca_dims must be None or an integer >= 2, got {self.pca_dims!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            bad.append(f"seed must be None or an integer >= 0, got {self.seed!r}")
        if self.fit_max is not None and (not _is_int(self.fit_max) or self.fit_max < MIN_ROWS):
            bad.append(f"fit_max must be None or an integer >= {MIN_ROWS}, got {self.fit_max!r}")
        if self.fit_max is not None and self.method == "tsne":
            bad.append("fit_max is not available with method 'tsne' (t-SNE cannot place new points)")
        if self.n_epochs is not None and (not _is_int(self.n_epochs) or self.n_epochs < 1):
            bad.append(f"n_epochs must be None or an integer >= 1, got {self.n_epochs!r}")
        if self.perplexity is not None and not self.perplexity > 0:
            bad.append(f"perplexity must be None or > 0, got {self.perplexity!r}")
        if not 0 <= self.min_percentile < self.max_percentile <= 100:
            bad.append("need 0 <= min_percentile < max_percentile <= 100, got "
                       f"{self.min_percentile}, {self.max_percentile}")
        if not self.relative_margin >= 0:
            bad.append(f"relative_margin must be >= 0, got {self.relative_margin!r}")
        if bad:
            raise ConfigError("invalid layout config: " + "; ".join(bad))

    @classmethod
    def from_dict(cls, d: dict) -> "LayoutConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class AlignConfig:
    """Settings of an aligned layout beyond `LayoutConfig` (umap-learn's ``AlignedUMAP`` names).

    regularisation: ``alignment_regularisation`` (lambda): how strongly a sample is pulled toward its
        place in the neighbouring layers (umap-learn's default 0.01).
    window:         ``alignment_window_size``: how many layers on each side pull (default 3).
    """

    regularisation: float = 1e-2
    window: int = 3

    def __post_init__(self):
        if not isinstance(self.regularisation, (int, float)) or not self.regularisation >= 0:
            raise ConfigError(f"invalid align config: regularisation must be >= 0, got {self.regularisation!r}")
        if not _is_int(self.window) or self.window < 1:
            raise ConfigError(f"invalid align config: window must be an integer >= 1, got {self.window!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "AlignConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


ALIGNED_METHODS = ("umap", "pca")
ALIGNED_EPOCHS = 200      # AlignedUMAP's default n_epochs


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass
class Layout:
    """Result of ``compute_layout``.

    coords:  [n, 2] float32 in [0, 1]^2 (normalized; dim 0 = x, dim 1 = y; see grid.cell_index)
    raw:     [n, 2] float32, the embedding before normalization
    config:  the LayoutConfig asked for
    seconds: wall time of the embedding (excluding reading the input)
    method:  method used; engine: "umap-learn" | "cuml" | "sklearn" | "numpy"
    params:  the parameters actually used (clamped n_neighbors, perplexity, fit rows, ...)
    """

    coords: np.ndarray
    raw: np.ndarray
    config: LayoutConfig
    seconds: float
    method: str
    engine: str
    params: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.coords)


# ----------------------------------------------------------------------------------------------
# numba / umap set-up

def import_umap():
    """umap-learn, or a UserError saying how to install it. Its numba code is cached on disk only
    after an explicit ``actatlas.enable_numba_cache()`` (``Runtime.apply`` calls it)."""
    try:
        import umap
    except ImportError as exc:  # pragma: no cover - umap-learn is a dependency
        raise ConfigError("method 'umap' needs umap-learn: pip install umap-learn") from exc
    return umap


@contextlib.contextmanager
def _umap_quiet(progress: bool):
    """umap-learn prints its progress with print(): send it to stderr, and hide numba's notes about
    functions it cannot cache (they are compiled as before)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot cache compiled function")
        if progress:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            yield


def cuml_available() -> bool:
    """True when cuML imports and a CUDA device is present."""
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        import cuml  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# the stage

def compute_layout(acts: np.ndarray, cfg: LayoutConfig | None = None, progress: bool = True,
                   chunk_rows: int = 65536) -> Layout:
    """Embed activation vectors in 2-D and normalize to [0, 1]^2 (method.md §1.4-1.5).

    acts: [n, c] (any float dtype; a float16 memmap is read in chunks of ``chunk_rows``).
    Returns a Layout with coords [n, 2] float32 in [0, 1]^2 and raw [n, 2] float32.
    """
    cfg = cfg or LayoutConfig()
    if getattr(acts, "ndim", 0) != 2:
        raise ConfigError(f"activations must be a [n, c] array, got shape {getattr(acts, 'shape', None)}")
    n, c = acts.shape
    if n < MIN_ROWS:
        raise ConfigError(f"a layout needs at least {MIN_ROWS} activation rows, got {n}")
    params: dict = {"n": int(n), "c": int(c)}
    t0 = time.perf_counter()
    if cfg.method == "pca":
        raw, engine = _pca_project(acts, 2, center=True, chunk_rows=chunk_rows), "numpy"
        params["explained"] = "centered PCA, components 1-2"
    else:
        x = _features(acts, cfg, params, chunk_rows)
        if cfg.method == "tsne":
            raw, engine = _tsne(x, cfg, params, progress), "sklearn"
        else:
            raw, engine = _umap(x, cfg, params, progress)
    seconds = time.perf_counter() - t0
    raw = np.asarray(raw, dtype=np.float32)
    if not np.isfinite(raw).all():
        raise ConfigError(f"the {cfg.method} embedding produced NaN/inf values; try another seed or "
                        "method, or pca_dims")
    coords = normalize_layout(raw, cfg.min_percentile, cfg.max_percentile, cfg.relative_margin,
                              cfg.symmetric_margin).astype(np.float32)
    log.info("layout %s (%s) of %d x %d in %.1f s", cfg.method, engine, n, c, seconds)
    return Layout(coords=coords, raw=raw, config=cfg, seconds=seconds, method=cfg.method,
                  engine=engine, params=params)


def _features(acts, cfg: LayoutConfig, params: dict, chunk_rows: int) -> np.ndarray:
    """[n, c] input -> [n, d] float32 features for UMAP / t-SNE (optionally PCA-reduced)."""
    n, c = acts.shape
    if cfg.pca_dims is not None and cfg.pca_dims < c:
        center = cfg.metric != "cosine"
        params["pca_dims"] = int(cfg.pca_dims)
        params["pca_centered"] = center
        return _pca_project(acts, cfg.pca_dims, center=center, chunk_rows=chunk_rows)
    if isinstance(acts, np.ndarray) and acts.dtype == np.float32 and acts.flags.c_contiguous \
            and not isinstance(acts, np.memmap):
        return acts
    out = np.empty((n, c), dtype=np.float32)
    for a in range(0, n, chunk_rows):
        out[a:a + chunk_rows] = acts[a:a + chunk_rows]
        drop_pages(acts, a, a + chunk_rows)
    return out


def _pca_project(acts, dims: int, center: bool, chunk_rows: int) -> np.ndarray:
    """Project [n, c] onto its top `dims` principal axes, reading in chunks. Returns [n, dims] float32.

    center=True: eigenvectors of the covariance (mean removed); False: of the second moment AᵀA/N.
    Each axis's sign is fixed so that its largest-magnitude loading is positive (deterministic).
    """
    from .whiten import moment_sums  # local import: whiten imports this module's writer

    n, c = acts.shape
    total, s, _ = moment_sums(acts, chunk_rows=chunk_rows)
    mean = s / n
    m = total / n - (np.outer(mean, mean) if center else 0.0)
    w, v = np.linalg.eigh(m)
    v = v[:, ::-1][:, :dims]
    sign = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
    v = (v * np.where(sign == 0, 1.0, sign)).astype(np.float32)
    shift = mean.astype(np.float32) if center else np.zeros(c, np.float32)
    out = np.empty((n, v.shape[1]), dtype=np.float32)
    for a in range(0, n, chunk_rows):
        out[a:a + chunk_rows] = (np.asarray(acts[a:a + chunk_rows], np.float32) - shift) @ v
        drop_pages(acts, a, a + chunk_rows)
    return out


def _n_neighbors(cfg: LayoutConfig, n_fit: int) -> int:
    k = cfg.n_neighbors
    if k >= n_fit:
        warnings.warn(f"n_neighbors={k} >= number of rows fitted ({n_fit}); using {n_fit - 1}",
                      UserWarning, stacklevel=3)
        k = n_fit - 1
    return k


def _pick_engine(cfg: LayoutConfig) -> str:
    if cfg.engine == "umap-learn":
        return "umap-learn"
    ok = cuml_available()
    if cfg.engine == "cuml" and not ok:
        raise ConfigError("engine 'cuml' needs cuML installed and a CUDA device; use engine 'auto' or "
                        "'umap-learn'")
    return "cuml" if ok else "umap-learn"


def _umap(x: np.ndarray, cfg: LayoutConfig, params: dict, progress: bool) -> tuple[np.ndarray, str]:
    n = len(x)
    engine = _pick_engine(cfg)
    fit_rows = None
    if cfg.fit_max is not None and cfg.fit_max < n:
        rng = np.random.default_rng(cfg.seed)
        fit_rows = np.sort(rng.choice(n, size=cfg.fit_max, replace=False))
    n_fit = n if fit_rows is None else len(fit_rows)
    k = _n_neighbors(cfg, n_fit)
    params.update(n_neighbors=k, min_dist=cfg.min_dist, metric=cfg.metric, n_fit=int(n_fit),
                  n_epochs=cfg.n_epochs, seed=cfg.seed, deterministic=cfg.deterministic)
    kw = dict(n_components=2, n_neighbors=k, min_dist=cfg.min_dist, metric=cfg.metric,
              n_epochs=cfg.n_epochs)
    if engine == "cuml":
        from cuml.manifold import UMAP as CuUMAP  # pragma: no cover - needs a GPU
        model = CuUMAP(random_state=cfg.seed, verbose=progress, **kw)
    else:
        umap = import_umap()
        seeded = cfg.seed is not None and cfg.deterministic
        model = umap.UMAP(random_state=cfg.seed if seeded else None, n_jobs=1 if seeded else -1,
                          transform_seed=cfg.seed if cfg.seed is not None else 42,
                          verbose=progress, low_memory=True, **kw)
    with _umap_quiet(progress):
        if fit_rows is None:
            raw = np.asarray(model.fit_transform(x), dtype=np.float32)
        else:
            raw = np.empty((n, 2), dtype=np.float32)
            raw[fit_rows] = np.asarray(model.fit_transform(x[fit_rows]), dtype=np.float32)
            rest = np.setdiff1d(np.arange(n), fit_rows, assume_unique=True)
            step = 100_000
            for a in range(0, len(rest), step):
                idx = rest[a:a + step]
                raw[idx] = np.asarray(model.transform(x[idx]), dtype=np.float32)
    return raw, engine


# ----------------------------------------------------------------------------------------------
# aligned layouts of several layers

def compute_aligned_layouts(acts: list, cfg: LayoutConfig | None = None, align: AlignConfig | None = None,
                            progress: bool = True, chunk_rows: int = 65536) -> list[Layout]:
    """Lay out several layers jointly: ``acts[l]`` [n, c_l] are the same n samples in layer l (in the
    order the layers are aligned: consecutive layers pull on each other). Returns one `Layout` per
    layer, in the format of `compute_layout` (coords in [0, 1]^2), all normalized by one shared
    transform (`normalize_layout` of the layers' raw embeddings stacked), so a place means the same in
    every layer's map.

    cfg.method "umap": umap-learn's AlignedUMAP with identity relations (`_aligned_umap`); "pca": each
    layer's centered PCA, rotated/reflected onto the previous one by orthogonal Procrustes. ``fit_max``
    and t-SNE have no aligned form (ConfigError); ``n_epochs`` None means AlignedUMAP's 200.
    """
    cfg = cfg or LayoutConfig()
    align = align or AlignConfig()
    if len(acts) < 2:
        raise ConfigError(f"an aligned layout needs two or more layers, got {len(acts)}")
    if cfg.method not in ALIGNED_METHODS:
        raise ConfigError(f"method {cfg.method!r} has no aligned form; aligned layouts use "
                          f"{' or '.join(ALIGNED_METHODS)}")
    if cfg.fit_max is not None:
        raise ConfigError("fit_max is not available for aligned layouts (AlignedUMAP cannot place new points); "
                          "leave it unset, or use pca_dims to make a large layout cheaper")
    shapes = [getattr(a, "shape", None) for a in acts]
    if any(s is None or len(s) != 2 for s in shapes):
        raise ConfigError(f"activations must be [n, c] arrays, got shapes {shapes}")
    n = shapes[0][0]
    if any(s[0] != n for s in shapes):
        raise ConfigError(f"aligned layers must hold the same samples (rows), got row counts {[s[0] for s in shapes]}")
    if n < MIN_ROWS:
        raise ConfigError(f"a layout needs at least {MIN_ROWS} activation rows, got {n}")
    params: dict = {"n": int(n), "c": [int(s[1]) for s in shapes], "layers": len(acts), "normalization": "joint"}
    t0 = time.perf_counter()
    if cfg.method == "pca":
        raws = _aligned_pca([_pca_project(a, 2, center=True, chunk_rows=chunk_rows) for a in acts])
        engine = "numpy"
        params["aligned"] = "centered PCA per layer, orthogonal Procrustes onto the previous layer"
    else:
        if cfg.engine == "cuml":
            raise ConfigError("engine 'cuml' has no aligned UMAP; use engine 'auto' or 'umap-learn'")
        per_layer = [{} for _ in acts]
        xs = [_features(a, cfg, p, chunk_rows) for a, p in zip(acts, per_layer)]
        if any(per_layer):
            params["features"] = per_layer
        raws = _aligned_umap(xs, cfg, align, params, progress)
        engine = "umap-learn"
    seconds = time.perf_counter() - t0
    raws = [np.asarray(r, np.float32) for r in raws]
    if not all(np.isfinite(r).all() for r in raws):
        raise ConfigError(f"the aligned {cfg.method} embedding produced NaN/inf values (samples without "
                          "neighbours); try another seed, n_neighbors or pca_dims")
    joint = normalize_layout(np.concatenate(raws), cfg.min_percentile, cfg.max_percentile, cfg.relative_margin,
                             cfg.symmetric_margin).astype(np.float32)
    log.info("aligned layout %s of %d layers x %d rows in %.1f s", cfg.method, len(acts), n, seconds)
    return [Layout(coords=joint[k * n:(k + 1) * n], raw=r, config=cfg, seconds=seconds, method=cfg.method,
                   engine=engine, params={**params, "aligned_index": k}) for k, r in enumerate(raws)]


def procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """b [n, d] moved by the rotation or reflection (orthogonal R) and translation that bring it
    closest to a [n, d] in the least-squares sense: (b - mean b) R + mean a (no scaling)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    u, _, vt = np.linalg.svd((b - mb).T @ (a - ma))
    return (b - mb) @ (u @ vt) + ma


def _aligned_pca(raws: list[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(raws[0], np.float64)]
    for r in raws[1:]:
        out.append(procrustes(out[-1], r))
    return out


def _aligned_umap(xs: list[np.ndarray], cfg: LayoutConfig, align: AlignConfig, params: dict,
                  progress: bool) -> list[np.ndarray]:
    """Raw [n, 2] embeddings of every layer by umap-learn's ``AlignedUMAP`` with identity relations
    between consecutive layers (row i is the same sample at every layer) and our layout settings.
    ``seed`` None or ``deterministic`` False: unseeded (not reproducible)."""
    import warnings

    from umap.aligned_umap import AlignedUMAP

    import_umap()           # the one clear error when umap-learn is missing
    n, L = len(xs[0]), len(xs)
    k = _n_neighbors(cfg, n)
    n_epochs = cfg.n_epochs if cfg.n_epochs is not None else ALIGNED_EPOCHS
    seed = cfg.seed if cfg.seed is not None and cfg.deterministic else None
    transform_seed = cfg.seed if cfg.seed is not None else 42
    params.update(n_neighbors=k, min_dist=cfg.min_dist, metric=cfg.metric, n_epochs=n_epochs, seed=cfg.seed,
                  deterministic=cfg.deterministic, alignment_regularisation=align.regularisation,
                  alignment_window_size=align.window, algorithm="AlignedUMAP (umap-learn), identity relations")
    identity = {i: i for i in range(n)}
    with _umap_quiet(progress), warnings.catch_warnings():
        warnings.simplefilter("ignore")      # umap-learn's notes on seeds and parallelism
        mapper = AlignedUMAP(n_neighbors=k, min_dist=cfg.min_dist, metric=cfg.metric, n_epochs=n_epochs,
                             alignment_regularisation=align.regularisation, alignment_window_size=int(align.window),
                             random_state=seed, transform_seed=transform_seed, low_memory=True, verbose=progress)
        out = mapper.fit_transform([np.asarray(x, np.float32) for x in xs], relations=[identity] * (L - 1))
    return [np.asarray(emb, np.float32) for emb in out]


def _tsne(x: np.ndarray, cfg: LayoutConfig, params: dict, progress: bool) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = len(x)
    perplexity = cfg.perplexity if cfg.perplexity is not None else min(50.0, (n - 1) / 3)
    if perplexity >= n:
        raise ConfigError(f"t-SNE perplexity {perplexity} must be below the number of rows ({n})")
    kw = dict(n_components=2, metric=cfg.metric, perplexity=perplexity, init="pca",
              learning_rate="auto", random_state=cfg.seed, verbose=1 if progress else 0)
    if cfg.n_epochs is not None:
        kw["max_iter"] = max(250, cfg.n_epochs)
    params.update(perplexity=float(perplexity), metric=cfg.metric, seed=cfg.seed,
                  n_iter=kw.get("max_iter"))
    with contextlib.redirect_stdout(sys.stderr) if progress else contextlib.nullcontext():
        return np.asarray(TSNE(**kw).fit_transform(x), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# artifacts: <dir>/<layer>.npy (coords), <layer>.raw.npy, <layer>.json

def _layout_paths(directory: Path, layer: str) -> tuple[Path, Path, Path]:
    stem = layer_dirname(layer)
    d = Path(directory)
    return d / f"{stem}.npy", d / f"{stem}.raw.npy", d / f"{stem}.json"


def save_layout(layout: Layout, directory: str | Path, layer: str) -> Path:
    """Write ``<dir>/<layer>.npy`` (coords [n,2] float32), ``<layer>.raw.npy`` and ``<layer>.json``
    (method, engine, params, config, seed, seconds, n), each atomically; the JSON is written last.
    Returns the coords path."""
    coords_p, raw_p, meta_p = _layout_paths(directory, layer)
    coords_p.parent.mkdir(parents=True, exist_ok=True)
    save_npy_atomic(coords_p, layout.coords.astype(np.float32, copy=False))
    save_npy_atomic(raw_p, layout.raw.astype(np.float32, copy=False))
    write_json_atomic(meta_p, {
        "layer": layer, "n": layout.n, "method": layout.method, "engine": layout.engine,
        "seed": layout.config.seed, "seconds": round(float(layout.seconds), 4),
        "params": layout.params, "config": asdict(layout.config),
    })
    return coords_p


def load_layout(directory: str | Path, layer: str) -> Layout:
    """Read what ``save_layout`` wrote. UserError when it is missing or inconsistent."""
    coords_p, raw_p, meta_p = _layout_paths(directory, layer)
    if not meta_p.is_file() or not coords_p.is_file():
        raise ConfigError(f"no layout for layer {layer!r} in {directory}")
    meta = json.loads(meta_p.read_text())
    coords = np.load(coords_p)
    raw = np.load(raw_p) if raw_p.is_file() else coords.copy()
    if coords.shape != (meta["n"], 2) or raw.shape != coords.shape:
        raise ConfigError(f"layout files for {layer!r} in {directory} are inconsistent")
    cfg = LayoutConfig.from_dict(meta.get("config", {}))
    return Layout(coords=coords, raw=raw, config=cfg, seconds=float(meta.get("seconds", 0.0)),
                  method=meta["method"], engine=meta.get("engine", ""), params=meta.get("params", {}))

