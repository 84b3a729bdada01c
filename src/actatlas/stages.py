"""The one stage engine: config hashing, the manifest, skip, resume, locking and failure.

Every step that writes a result (collect, layout, grid, whiten, render, assemble, and the analysis
views) runs through `run_stage`. A stage is keyed by ``key`` in ``DIR/manifest.json`` and identified
by the hash of its `record` (its own settings plus the hashes of the stages it reads):

- same hash, status "complete", outputs present -> skipped (``StageReport.ran`` False);
- same hash otherwise (a killed or failed earlier try) -> ``fn(resume=True)``: the stage continues
  from what it committed (collect by shard, render by icon batch);
- another hash -> ``conflict(previous entry)`` first (it may refuse, or clear the old outputs),
  then ``fn(resume=False)``.

The whole call holds the directory's lock (`actatlas.store.run_lock`), re-entrant within one
process, so a second process is refused instead of interleaving its writes. A stage is marked
"complete" only after `fn` returns; an exception or an interrupt marks it "failed" with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import RunStateError
from .store import run_lock, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def config_hash(record: dict) -> str:
    """A short, stable hash of a JSON-able settings record (key order does not matter)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


# RunConfig fields added after runs were made whose None default means "as before": left out of a
# record at that value, so the hashes of runs made before they existed do not change
ADDED_SETTINGS = ("redirected_relu",)
PROCESS_FIELDS = ("device", "progress")   # where/how the work runs, not what it computes


def settings_record(cfg) -> dict:
    """A config dataclass as the settings part of a stage record: without the process's fields
    (`PROCESS_FIELDS`) and without later-added settings left at their None default (`ADDED_SETTINGS`)."""
    d = dataclasses.asdict(cfg)
    for k in PROCESS_FIELDS:
        d.pop(k, None)
    for k in ADDED_SETTINGS:
        if k in d and d[k] is None:
            del d[k]
    return d


def read_manifest(directory: str | Path) -> dict:
    """``DIR/manifest.json`` as a dict ({} when there is none yet)."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return {}
    return json.loads(p.read_text())


def update_manifest(directory: str | Path, **fields) -> dict:
    """Set top-level `fields` of the manifest (e.g. the version that wrote it); returns it."""
    manifest = read_manifest(directory)
    manifest.update(fields)
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return manifest


@dataclass
class StageReport:
    """What `run_stage` did: `ran` False when the stage was up to date and skipped."""

    name: str
    ran: bool
    seconds: float
    hash: str


def stage_entry(directory: str | Path, key: str) -> dict | None:
    """The manifest entry of stage `key` ({hash, config, status, seconds[, error]}) or None."""
    return read_manifest(directory).get("stages", {}).get(key)


def stage_hash(directory: str | Path, key: str) -> str:
    """The hash of completed stage `key`; `RunStateError` when it has not completed."""
    st = stage_entry(directory, key)
    if not st or st.get("status") != "complete":
        raise RunStateError(f"stage {key!r} has not completed in {directory}; run it first (or build the atlas)")
    return st["hash"]


def _set_stage(directory: Path, key: str, **fields) -> None:
    manifest = read_manifest(directory)
    entry = manifest.setdefault("stages", {}).setdefault(key, {})
    entry.update(fields)
    if fields.get("status") == "complete":
        entry.pop("error", None)
    write_json_atomic(directory / MANIFEST, manifest)


def run_stage(directory: str | Path, key: str, record: dict, fn: Callable[[bool], None],
              outputs_ok: Callable[[], bool] = lambda: True, *, force: bool = False,
              conflict: Callable[[dict], None] | None = None) -> StageReport:
    """Run stage `key` of `directory` unless it is complete with the same `record` (see module doc).

    Args:
        fn: ``fn(resume)`` computes and writes the stage's outputs.
        outputs_ok: whether the outputs of a complete stage are still on disk (else it reruns).
        force: run even when up to date.
        conflict: called with the previous manifest entry when it was made with other settings,
            before anything runs; it raises to refuse or clears the old outputs.
    """
    directory = Path(directory)
    h = config_hash(record)
    with run_lock(directory, f"stage {key}"):
        st = stage_entry(directory, key)
        if st is not None and st.get("hash") != h and conflict is not None:
            conflict(st)
        if not force and st and st.get("hash") == h and st.get("status") == "complete" and outputs_ok():
            log.info("stage %s unchanged: skipped", key)
            return StageReport(key, False, 0.0, h)
        resume = bool(st and st.get("hash") == h)
        manifest = read_manifest(directory)
        manifest.setdefault("stages", {})[key] = {"hash": h, "config": record, "status": "running"}
        write_json_atomic(directory / MANIFEST, manifest)
        t0 = time.perf_counter()
        try:
            fn(resume)
        except BaseException as exc:
            _set_stage(directory, key, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            raise
        seconds = time.perf_counter() - t0
        _set_stage(directory, key, status="complete", seconds=round(seconds, 3))
    return StageReport(key, True, seconds, h)


__all__ = ["config_hash", "settings_record", "read_manifest", "update_manifest", "StageReport", "stage_entry", "stage_hash",
           "run_stage", "MANIFEST"]
