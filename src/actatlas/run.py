"""Reading a run directory: ``actatlas.open_run(RUN)``.

Arrays are memory-mapped (``np.load(mmap_mode="r")``), so opening a run of a million rows is instant
and reading it in chunks keeps memory bounded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .errors import ConfigError, RunStateError
from .models import load_model
from .stages import read_manifest
from .store import layer_dirname


ALIGNED_STAGE = "layout-aligned"     # the stage key of a run's aligned layout (pipeline.run_aligned_layout)
ALIGNED_DIR = "layout-aligned"       # RUN/layout-aligned/<layer>.npy: the aligned layouts


@dataclass(frozen=True)
class Rows:
    """Provenance of a layer's rows, as numpy columns of length n (row i <-> activation i)."""

    image: np.ndarray      # [n] int64, index of the image in the source
    path: np.ndarray       # [n] object (str)
    label: np.ndarray      # [n] int32, -1 when unknown
    y: np.ndarray          # [n] int16, spatial row of the sampled position in the layer's map
    x: np.ndarray          # [n] int16
    top5: np.ndarray       # [n, 5] int32, the model's top-5 classes for the image
    top5_prob: np.ndarray  # [n, 5] float32

    def __len__(self) -> int:
        return len(self.image)


class Run:
    """A run directory. ``layers`` lists the collected layers (labels as given at collect time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.store = self.path / "collect"
        complete = self.store / "complete.json"
        if not complete.is_file():
            if (self.store / "shards").is_dir():
                raise RunStateError(f"{self.path} holds an unfinished collect; run 'actatlas collect' again "
                                "with the same arguments to resume it")
            raise RunStateError(f"{self.path} is not a run directory (no collect/complete.json)")
        self.summary: dict = json.loads(complete.read_text())
        self.manifest: dict = read_manifest(self.path)

    @property
    def config(self) -> dict:
        """The resolved collect config."""
        return self.summary["config"]

    @property
    def layers(self) -> list[str]:
        return list(self.config["layers"])

    @property
    def class_names(self) -> list[str]:
        return list(self.summary["class_names"])

    @property
    def wnids(self) -> list[str] | None:
        return self.summary.get("wnids")

    def _dir(self, layer: str) -> Path:
        if layer not in self.layers:
            raise ConfigError(f"layer {layer!r} was not collected in {self.path}; collected: {', '.join(self.layers)}")
        return self.store / layer_dirname(layer)

    def activations(self, layer: str) -> np.ndarray:
        """[n, c] activation vectors (memory-mapped, dtype as stored)."""
        return np.load(self._dir(layer) / "activations.npy", mmap_mode="r")

    def attributions(self, layer: str) -> np.ndarray | None:
        """[n, classes] float16 attributions (``--attributions full``), or None."""
        p = self._dir(layer) / "attributions.npy"
        return np.load(p, mmap_mode="r") if p.is_file() else None

    def attribution_topk(self, layer: str) -> tuple[np.ndarray, np.ndarray] | None:
        """([n, k] int32 class ids, [n, k] float32 values) for ``--attributions topk``; derived from
        the full matrix when that was stored; None with ``--attributions none``."""
        d = self._dir(layer)
        if (d / "attr_index.npy").is_file():
            return np.load(d / "attr_index.npy", mmap_mode="r"), np.load(d / "attr_value.npy", mmap_mode="r")
        full = self.attributions(layer)
        if full is None:
            return None
        k = int(self.config.get("topk", 10))
        idx = np.argsort(-np.asarray(full, np.float32), axis=1)[:, :k].astype(np.int32)
        return idx, np.take_along_axis(np.asarray(full, np.float32), idx, axis=1)

    @property
    def shared_locations(self) -> bool:
        """Whether every layer sampled the same image locations (``CollectConfig.shared_locations``)."""
        return bool(self.config.get("shared_locations"))

    def locations(self, layer: str) -> np.ndarray | None:
        """float32 [n, 2] the normalized image location (u down, v across) of each row, stored by a
        collect with shared locations (memory-mapped); None otherwise."""
        p = self._dir(layer) / "locations.npy"
        return np.load(p, mmap_mode="r") if p.is_file() else None

    def aligned_layers(self) -> list[str]:
        """The layers whose grid was built on the run's aligned layout, in the aligned order ([] when
        none): the export links these layers' cells to their neighbours'."""
        stages = read_manifest(self.path).get("stages", {})
        st = stages.get(ALIGNED_STAGE)
        if not st or st.get("status") != "complete":
            return []
        return [ly for ly in st.get("config", {}).get("layers", [])
                if (stages.get(f"grid:{ly}") or {}).get("config", {}).get("layout") == st.get("hash")]

    @cached_property
    def _rows_cache(self) -> dict:
        return {}

    def rows(self, layer: str) -> Rows:
        """Provenance columns for `layer` (see `Rows`)."""
        if layer not in self._rows_cache:
            t = pq.read_table(self._dir(layer) / "rows.parquet")
            top5 = t.column("top5").combine_chunks().flatten().to_numpy().reshape(-1, 5)
            top5_prob = t.column("top5_prob").combine_chunks().flatten().to_numpy().reshape(-1, 5)
            self._rows_cache[layer] = Rows(
                image=t.column("image").to_numpy(), path=np.asarray(t.column("path").to_pylist(), dtype=object),
                label=t.column("label").to_numpy(), y=t.column("y").to_numpy(), x=t.column("x").to_numpy(),
                top5=top5, top5_prob=top5_prob)
        return self._rows_cache[layer]

    def rows_table(self, layer: str):
        """The provenance as a pyarrow Table (``.to_pandas()`` when pandas is installed)."""
        return pq.read_table(self._dir(layer) / "rows.parquet")

    def __repr__(self) -> str:
        n = self.summary.get("rows", {})
        return f"Run({str(self.path)!r}, layers={self.layers}, rows={n})"


def open_run(path: str | Path) -> Run:
    """Open a run directory written by ``actatlas collect``."""
    return Run(path)


def load_run_model(run: Run, device: str = "cpu"):
    """The model `run` was collected with (a `ModelSpec`), loaded again by its registered name and
    load arguments; a RunStateError when it was given as an object and cannot be reloaded."""
    cfg = run.config
    load_args = cfg.get("model_info", {}).get("load_args")
    if load_args is None:
        raise RunStateError(f"the model of {run.path} ({cfg.get('model')}) was given as an object, not by name; "
                            "pass it again (spec=...)")
    return load_model(cfg["model"], device=device, **load_args)
