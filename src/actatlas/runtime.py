"""Where and how the work runs: device, engine, CPU threads, progress bars, the numba cache.

`Runtime` is applied once, at an entry point (``aa.build_atlas``, the CLI's ``main``, a Ray
worker's start): `Runtime.apply` is the one place that sets process-wide state (torch's thread
count, numba's on-disk cache). Library functions below it take a device as an argument and never
change global state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Runtime:
    """Settings of the process, not of the result (they never change a stage's hash).

    device: torch device for the model ("cpu", "cuda", "cuda:1", "mps").
    engine: "local" (this process) or "ray" (Ray Data actors for collect, Ray tasks for render;
        ``pip install 'actatlas[ray]'``).
    threads: torch CPU threads (None: torch's choice).
    address: Ray cluster address for engine "ray" (None: RAY_ADDRESS or a local Ray).
    progress: show progress bars.
    numba_cache: keep umap-learn's compiled numba functions on disk (`enable_numba_cache`), which
        saves ~50 s of JIT in every fresh process after the first.
    """

    device: str = "cpu"
    engine: str = "local"
    threads: int | None = None
    address: str | None = None
    progress: bool = True
    numba_cache: bool = True

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"threads must be None or an integer >= 1, not {self.threads!r}")

    def apply(self) -> "Runtime":
        """Check the device/engine and set the process-wide state once. Returns self."""
        import torch

        from .devices import resolve_device

        if self.engine == "ray":
            from .ray_engine import require_ray

            require_ray()
            resolve_device("cpu" if str(self.device).startswith("cuda") else self.device)  # GPUs: the workers'
        else:
            resolve_device(self.device)
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.numba_cache:
            enable_numba_cache()
        return self

    @property
    def model_device(self) -> str:
        """Where this process keeps the model: with Ray the workers hold it, the driver a CPU copy."""
        return "cpu" if self.engine == "ray" else self.device


def default_numba_cache_dir() -> str:
    """``$NUMBA_CACHE_DIR``, else ``$ACTATLAS_CACHE/numba``, else ``~/.cache/actatlas/numba``."""
    d = os.environ.get("NUMBA_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("ACTATLAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "actatlas")
    return os.path.join(base, "numba")


_numba_cache_enabled = False


def enable_numba_cache(directory: str | None = None) -> str:
    """Keep numba's compiled code (umap-learn, pynndescent) on disk: an explicit, process-wide switch.

    Sets ``NUMBA_CACHE_DIR`` (unless already set; `directory` overrides), imports umap-learn and
    turns caching on for its and pynndescent's jitted functions, which umap-learn does not cache
    itself. The first fresh process still compiles (~50 s on 2 cores); later ones load in seconds.
    ``ACTATLAS_UMAP_JIT_CACHE=0`` leaves umap's functions uncached. Returns the cache folder.
    """
    global _numba_cache_enabled
    d = directory or default_numba_cache_dir()
    if os.environ.get("NUMBA_CACHE_DIR") != d:
        os.environ["NUMBA_CACHE_DIR"] = d
        if "numba" in sys.modules:  # numba read its config at import; make it re-read it
            try:
                from numba.core import config as numba_config

                numba_config.reload_config()
            except Exception:  # pragma: no cover - numba internals moved  # noqa: BLE001
                log.debug("numba already imported; NUMBA_CACHE_DIR=%s may not take effect", d)
    with contextlib.suppress(OSError):
        os.makedirs(d, exist_ok=True)
    if _numba_cache_enabled or os.environ.get("ACTATLAS_UMAP_JIT_CACHE", "1") == "0":
        return d
    try:
        import umap  # noqa: F401  (its modules must be loaded for their functions to be switched)
        from numba.core.registry import CPUDispatcher
    except ImportError:  # pragma: no cover - umap-learn is a dependency
        return d
    count = 0
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(("umap", "pynndescent")):
            continue
        for obj in list(vars(mod).values()):
            if isinstance(obj, CPUDispatcher) and type(obj._cache).__name__ == "NullCache":
                with contextlib.suppress(Exception):  # e.g. a function that cannot be cached
                    obj.enable_caching()
                    count += 1
    log.debug("numba caching enabled on %d umap/pynndescent functions", count)
    _numba_cache_enabled = True
    return d


def numba_cache_enabled() -> bool:
    """Whether `enable_numba_cache` has switched on the disk cache in this process."""
    return _numba_cache_enabled


__all__ = ["Runtime", "enable_numba_cache", "numba_cache_enabled", "default_numba_cache_dir", "ENGINES"]
