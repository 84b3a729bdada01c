"""Whitening of the activation space for feature visualization (method.md §1.8).

The reference uses ``S = inv(AᵀA / N)``: the inverse of the *uncentered* second moment of the
activations A [N, C], no mean subtraction, no ridge, in float32. The icon target becomes
``v' = v @ S``, i.e. a dot product in whitened coordinates.

Here the moment is accumulated in float64, chunk by chunk (A may be a float16 memmap of 1M rows),
and inverted through a symmetric eigendecomposition M = Q diag(w) Qᵀ:

    S = Q diag(1 / (w + λ)) Qᵀ,    λ = ridge · trace(M) / C

so ``ridge`` is relative to the mean eigenvalue of M. ``ridge=0`` is the reference's exact inverse
(UserError when M is singular, e.g. with dead ReLU channels); the default 1e-2 keeps S finite and
bounded (no direction is amplified more than 100x the mean-eigenvalue scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, UserError
from .store import drop_pages

DEFAULT_RIDGE = 1e-2
_BLOCK_ELEMS = 1 << 22  # float64 elements per block cast (32 MB)


def moment_sums(acts: np.ndarray, chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunked sums over the rows of A [n, c]: (AᵀA [c, c] float64, Σ rows [c] float64, n).

    Reads at most ``chunk_rows`` rows at a time and casts them to float64 in blocks of ~32 MB.
    """
    if getattr(acts, "ndim", 0) != 2:
        raise ConfigError(f"activations must be a [n, c] array, got shape {getattr(acts, 'shape', None)}")
    n, c = acts.shape
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    total = np.zeros((c, c), dtype=np.float64)
    s = np.zeros(c, dtype=np.float64)
    block = max(1, min(chunk_rows, _BLOCK_ELEMS // max(c, 1)))
    for a in range(0, n, chunk_rows):
        chunk = acts[a:a + chunk_rows]
        for b in range(0, len(chunk), block):
            x = np.asarray(chunk[b:b + block], dtype=np.float64)
            total += x.T @ x
            s += x.sum(axis=0)
        drop_pages(acts, a, a + chunk_rows)
    return total, s, int(n)


def second_moment(acts: np.ndarray, chunk_rows: int = 65536) -> np.ndarray:
    """M = AᵀA / N, the uncentered second moment (method.md §1.8). acts: [n, c] -> [c, c] float64."""
    total, _, n = moment_sums(acts, chunk_rows)
    if n == 0:
        raise ConfigError("cannot compute a second moment of zero rows")
    return total / n


@dataclass
class Whitening:
    """S [c, c] float32 (the whitening matrix; target v' = v @ S), moment M [c, c] float64,
    ridge (relative, as given), ridge_lambda (absolute λ added to M's diagonal), n_rows used."""

    S: np.ndarray
    moment: np.ndarray
    ridge: float
    ridge_lambda: float
    n_rows: int

    def apply(self, v: np.ndarray) -> np.ndarray:
        """Whitened target direction(s): v [..., c] -> v @ S [..., c] (method.md §1.8)."""
        return np.asarray(v, dtype=np.float32) @ self.S


def whitening_from_moment(moment: np.ndarray, ridge: float = DEFAULT_RIDGE,
                          n_rows: int = 0) -> Whitening:
    """Invert a second moment M [c, c]: S = (M + λI)⁻¹ with λ = ridge · trace(M) / c (symmetric eigh)."""
    m = np.asarray(moment, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ConfigError(f"second moment must be a non-empty square matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ConfigError("second moment contains NaN or infinite values")
    if not ridge >= 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    c = m.shape[0]
    m = (m + m.T) / 2
    w, q = np.linalg.eigh(m)
    scale = float(np.trace(m)) / c
    if scale <= 0:
        raise ConfigError("the activations are all zero; nothing to whiten")
    lam = float(ridge) * scale
    d = w + lam
    tiny = max(float(w[-1]), 0.0) * c * np.finfo(np.float64).eps
    if d[0] <= tiny:
        dead = int(np.sum(w <= tiny))
        raise ConfigError(f"the activation second moment is singular ({dead} of {c} directions have ~zero "
                        "energy, e.g. dead channels); use a ridge > 0 (e.g. 1e-2)")
    s = (q / d) @ q.T
    s = (s + s.T) / 2
    return Whitening(S=s.astype(np.float32), moment=m, ridge=float(ridge), ridge_lambda=lam,
                     n_rows=int(n_rows))


def whitening_matrix(acts: np.ndarray, ridge: float = DEFAULT_RIDGE,
                     chunk_rows: int = 65536) -> Whitening:
    """Whitening of activations [n, c] (memmap ok): ``Whitening.S`` = (AᵀA/N + λI)⁻¹, [c, c] float32.

    ridge=0 reproduces the reference ``inv(AᵀA/N)`` (UserError when singular); see module docstring.
    """
    total, _, n = moment_sums(acts, chunk_rows)
    if n == 0:
        raise ConfigError("cannot whiten zero rows")
    return whitening_from_moment(total / n, ridge=ridge, n_rows=n)
