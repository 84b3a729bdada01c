"""Chunked, resumable on-disk store of collected activations (design.md "Artifacts of a run directory").

Layout of ``RUN/collect/``::

    .lock                         flock held by the one collect writing here
    shards/shard-000003/          one committed shard = images [3*S, 4*S) of the source
        meta.json                 image range, skipped files, rows per layer
        <layer>/activations.npy   [m, c]
        <layer>/attributions.npy  [m, classes] float16          (--attributions full)
        <layer>/attr_index.npy, attr_value.npy   [m, k]          (--attributions topk)
        <layer>/rows.parquet      provenance of the m rows
    <layer>/...                   the same files for the whole run, written when every shard is in
    complete.json                 summary; its presence means the store is complete

A shard is written into a temporary folder and committed by one ``rename`` (atomic on POSIX), so a
run killed at any instant leaves only whole shards; a rerun skips them and continues. Shards are
consolidated into one memory-mappable ``.npy`` per array at the end and then removed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputPathError, RunLockedError, RunStateError, UserError

ROW_FIELDS = ("row", "image", "path", "label", "layer", "y", "x", "top5", "top5_prob")


def write_json_atomic(path: Path, obj) -> Path:
    """Write JSON to `path` via a temporary file and rename (never a half-written file)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode()
    return write_atomic(path, lambda tmp: _synced(tmp, lambda f: f.write(text)))


def write_atomic(path: str | Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary path beside `path`, then rename it into place: readers see
    the old file or the whole new one, never a part. The one atomic-write primitive of the package."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _synced(tmp: Path, dump) -> None:
    with open(tmp, "wb") as f:
        dump(f)
        f.flush()
        os.fsync(f.fileno())


def save_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` to `path` atomically (fsynced)."""
    return write_atomic(path, lambda tmp: _synced(tmp, lambda f: np.save(f, np.ascontiguousarray(array))))


def save_npz_atomic(path: str | Path, **arrays) -> Path:
    """``np.savez`` of `arrays` to `path` atomically (fsynced)."""
    return write_atomic(path, lambda tmp: _synced(tmp, lambda f: np.savez(f, **arrays)))


def save_png_atomic(path: str | Path, image) -> Path:
    """A PIL image (or uint8 [h, w, 3] array) as a PNG at `path`, atomically."""
    if isinstance(image, np.ndarray):
        from PIL import Image

        image = Image.fromarray(image)
    return write_atomic(path, lambda tmp: _synced(tmp, lambda f: image.save(f, format="PNG")))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def layer_dirname(layer: str) -> str:
    """A layer label as a folder name (dots are fine on every filesystem; slashes are not)."""
    return layer.replace("/", "_")


class RunLock:
    """Exclusive, non-blocking lock on a run directory. Released by the OS if the process dies.

    Re-entrant within one process: a stage that holds the run's lock (e.g. ``build``) can call other
    stages that take the same lock (layout, grid, render) without refusing itself. Another process
    (a second ``build``, or ``actatlas grid`` while a build renders) is refused with one line.
    """

    _held: dict[str, list] = {}   # resolved lock path -> [fd, depth] for locks this process holds

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self.what = what
        self._key: str | None = None

    def __enter__(self):
        ensure_dir(self.path.parent)
        key = str(self.path.resolve())
        held = RunLock._held.get(key)
        if held is not None:
            held[1] += 1
            self._key = key
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputPathError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                try:
                    holder = self.path.read_text().strip()
                except OSError:
                    holder = "?"
                raise RunLockedError(
                    f"another actatlas process (pid {holder}) is writing into {self.path.parent}; "
                    f"{self.what} refused: wait for it to finish or use another run directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        RunLock._held[key] = [fd, 1]
        self._key = key
        return self

    def __exit__(self, *exc):
        if self._key is None:
            return
        held = RunLock._held[self._key]
        held[1] -= 1
        if held[1] == 0:
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
            del RunLock._held[self._key]
        self._key = None


def run_lock(run_dir: str | Path, what: str) -> RunLock:
    """The one lock of a run directory (``RUN/.lock``), taken by every stage that writes into it."""
    return RunLock(Path(run_dir) / ".lock", what)


def ensure_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create directory `path` (and parents) and check that it is a writable directory.

    Every problem (a file in the way, a parent that is a file, no permission, a read-only file
    system) is one `UserError` naming the path and the reason."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(f"{what} {path} exists and is not a directory") from None
    except NotADirectoryError:
        raise OutputPathError(f"cannot create {what} {path}: a parent of it is a file, not a directory") from None
    except OSError as exc:
        raise OutputPathError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise OutputPathError(f"{what} {path} exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path} is not writable (permission denied)")
    return path


@dataclass
class LayerBatch:
    """Rows for one layer from one batch of images (all arrays share the first dimension m)."""

    activations: np.ndarray          # [m, c]
    image: np.ndarray                # [m] int64 image index in the source
    y: np.ndarray                    # [m] int16
    x: np.ndarray                    # [m] int16
    top5: np.ndarray                 # [m, 5] int32 predicted classes of the image
    top5_prob: np.ndarray            # [m, 5] float32
    attributions: np.ndarray | None = None   # [m, classes] float16 (full)
    attr_index: np.ndarray | None = None     # [m, k] int32 (topk)
    attr_value: np.ndarray | None = None     # [m, k] float32 (topk)
    locations: np.ndarray | None = None      # [m, 2] float32 shared image locations (u, v)


class ShardWriter:
    """Accumulates the rows of one shard and commits them atomically."""

    def __init__(self, store_dir: Path, shard_id: int, start: int, stop: int, layers: list[str],
                 act_dtype: np.dtype, widths: dict[str, dict[str, int]]):
        """`widths`: layer -> {array file stem: row width} for every array the store keeps
        (``activations``, ``attributions`` or ``attr_index``/``attr_value``, ``locations``), so a shard whose
        images all failed to decode still stores 0 rows of the right width."""
        self.store_dir = Path(store_dir)
        self.shard_id, self.start, self.stop = shard_id, start, stop
        self.layers = layers
        self.act_dtype = np.dtype(act_dtype)
        self.widths = widths
        self.parts: dict[str, list[LayerBatch]] = {name: [] for name in layers}
        self.skipped: list[dict] = []

    def add(self, layer: str, batch: LayerBatch) -> None:
        self.parts[layer].append(batch)

    def skip(self, index: int, path: str, reason: str) -> None:
        self.skipped.append({"image": int(index), "path": path, "reason": reason})

    def commit(self, paths: list[str], labels: np.ndarray) -> None:
        """Write everything into a temp folder, then rename it into place. `paths`/`labels` are
        indexed by source image index."""
        shards = self.store_dir / "shards"
        final = shards / f"shard-{self.shard_id:06d}"
        tmp = shards / f".tmp-shard-{self.shard_id:06d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        rows_per_layer = {}
        for layer in self.layers:
            d = tmp / layer_dirname(layer)
            d.mkdir()
            parts = self.parts[layer]
            for name, width in self.widths[layer].items():
                dtype = self.act_dtype if name == "activations" else _ARRAY_DTYPES[name]
                arrays = [getattr(p, name) for p in parts]
                if any(a is None for a in arrays):
                    raise ValueError(f"a batch of layer {layer!r} lacks {name}")
                arr = _concat(arrays, dtype) if arrays else np.zeros((0, width), dtype)
                if arr.shape[1:] != (width,):
                    raise ValueError(f"{name} of layer {layer!r} has rows of shape {arr.shape[1:]}, "
                                     f"expected ({width},)")
                np.save(d / f"{name}.npy", arr)
            cat = lambda attr, dt=None: _concat([getattr(p, attr) for p in parts], dt)  # noqa: E731
            image = cat("image", np.int64) if parts else np.zeros(0, np.int64)
            table = rows_table(
                layer=layer, image=image,
                path=[paths[i] for i in image], label=labels[image] if len(image) else np.zeros(0, np.int32),
                y=cat("y", np.int16) if parts else np.zeros(0, np.int16),
                x=cat("x", np.int16) if parts else np.zeros(0, np.int16),
                top5=cat("top5", np.int32) if parts else np.zeros((0, 5), np.int32),
                top5_prob=cat("top5_prob", np.float32) if parts else np.zeros((0, 5), np.float32),
            )
            pq.write_table(table, d / "rows.parquet")
            rows_per_layer[layer] = int(len(image))
        write_json_atomic(tmp / "meta.json", {
            "shard": self.shard_id, "start": self.start, "stop": self.stop,
            "skipped": self.skipped, "rows": rows_per_layer,
        })
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(shards)


_ARRAY_DTYPES = {"attributions": np.float16, "attr_index": np.int32, "attr_value": np.float32,
                 "locations": np.float32}


def _concat(arrays: list[np.ndarray], dtype=None) -> np.ndarray:
    arrays = [a for a in arrays if a is not None]
    out = np.concatenate(arrays, axis=0) if arrays else np.zeros((0,))
    return out.astype(dtype, copy=False) if dtype is not None else out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rows_table(*, layer: str, image, path, label, y, x, top5, top5_prob, row_offset: int = 0) -> pa.Table:
    """The provenance table: one row per collected vector."""
    n = len(image)
    return pa.table({
        "row": pa.array(np.arange(row_offset, row_offset + n, dtype=np.int64)),
        "image": pa.array(np.asarray(image, np.int64)),
        "path": pa.array(list(path), pa.string()),
        "label": pa.array(np.asarray(label, np.int32)),
        "layer": pa.array([layer] * n, pa.string()),
        "y": pa.array(np.asarray(y, np.int16)),
        "x": pa.array(np.asarray(x, np.int16)),
        "top5": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(top5, np.int32).reshape(-1)), 5),
        "top5_prob": pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray(top5_prob, np.float32).reshape(-1)), 5),
    })


def committed_shards(store_dir: Path) -> dict[int, dict]:
    """shard id -> meta of every committed shard. Stale temp folders are removed (caller holds the lock)."""
    shards = Path(store_dir) / "shards"
    out: dict[int, dict] = {}
    if not shards.is_dir():
        return out
    for p in shards.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith("shard-") and (p / "meta.json").is_file():
            meta = json.loads((p / "meta.json").read_text())
            out[int(meta["shard"])] = meta
    return out


def consolidate(store_dir: Path, layers: list[str], n_shards: int) -> dict:
    """Merge shards 0..n_shards-1 into one array file per layer (streamed, bounded memory).

    Returns {"rows": {layer: n}, "skipped": [...]}. Idempotent: safe to rerun after a crash.
    """
    store_dir = Path(store_dir)
    shard_dirs = [store_dir / "shards" / f"shard-{i:06d}" for i in range(n_shards)]
    metas = [json.loads((d / "meta.json").read_text()) for d in shard_dirs]
    rows = {}
    for layer in layers:
        ld = layer_dirname(layer)
        out_dir = store_dir / ld
        tmp_dir = store_dir / f".tmp-{ld}-{os.getpid()}"
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
        names = sorted({f.name for d in shard_dirs for f in (d / ld).iterdir() if f.suffix == ".npy"})
        total = sum(m["rows"][layer] for m in metas)
        for fname in sorted(names):
            _concat_npy([d / ld / fname for d in shard_dirs], tmp_dir / fname, total)
        writer = None
        offset = 0
        try:
            for d in shard_dirs:
                t = pq.read_table(d / ld / "rows.parquet")
                t = t.set_column(0, "row", pa.array(np.arange(offset, offset + len(t), dtype=np.int64)))
                offset += len(t)
                if writer is None:
                    writer = pq.ParquetWriter(tmp_dir / "rows.parquet", t.schema)
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp_dir, out_dir)
        rows[layer] = total
    skipped = [s for m in metas for s in m["skipped"]]
    return {"rows": rows, "skipped": skipped}


def _concat_npy(parts: list[Path], dest: Path, total: int) -> None:
    """Concatenate .npy files along axis 0 into `dest` with plain writes, one part in memory at a time.

    Not through a writable memmap: its dirty pages stay mapped into the process, so peak RSS would
    grow with the size of the store (1 GB at 1M x 512 float16) instead of the size of one shard."""
    # The row shape comes from the first part with rows: a shard with no rows may have been written by
    # an older version as a flat (0,) array, which holds nothing to merge. A part may be missing only
    # when its shard holds no rows (no image of it decoded).
    loaded = [np.load(p, mmap_mode="r") for p in parts if p.is_file()]
    shaped = next((a for a in loaded if len(a) > 0), None)
    if shaped is None:
        shaped = next((a for a in loaded if a.ndim > 1), loaded[0] if loaded else None)
    del loaded
    if shaped is None:
        raise RunStateError(f"no shard holds {dest.name}; the store is inconsistent")
    header = np.lib.format.header_data_from_array_1_0(shaped)
    header["shape"] = (total,) + shaped.shape[1:]
    header["fortran_order"] = False
    dtype = shaped.dtype
    del shaped
    with open(dest, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        written = 0
        for p in parts:
            if not p.is_file() or len(np.load(p, mmap_mode="r")) == 0:
                continue
            part = np.load(p)
            if part.dtype != dtype or part.shape[1:] != header["shape"][1:]:
                raise RunStateError(f"shard array {p} has dtype/shape {part.dtype}{part.shape}, expected "
                                f"{dtype}[*, {header['shape'][1:]}]; the store is inconsistent")
            f.write(np.ascontiguousarray(part).data)
            written += len(part)
            del part
        f.flush()
        os.fsync(f.fileno())
    if written != total:
        raise RunStateError(f"{dest.name}: shards hold {written} rows, their metadata says {total}")


def remove_shards(store_dir: Path) -> None:
    shutil.rmtree(Path(store_dir) / "shards", ignore_errors=True)


def drop_pages(array, start: int, stop: int) -> None:
    """Unmap the pages of rows [start, stop) of a read-only memory-mapped array after a chunked read.

    The file's pages stay in the OS page cache; only this process's mapping of them goes, so a
    chunked pass over a 1 GB store does not leave 1 GB counted in its resident set (VmRSS/VmHWM).
    A no-op for in-memory arrays, writable maps and platforms without madvise."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") \
            or getattr(array, "mode", "r") != "r" or array.ndim < 1 or not array.flags.c_contiguous:
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        row = array.strides[0]
        stop = min(stop, len(array))
        if stop <= start:
            return
        lo = array.ctypes.data - base + start * row
        hi = array.ctypes.data - base + stop * row
        page = mmap.PAGESIZE
        lo, hi = (lo // page) * page, min(-(-hi // page) * page, len(mm))
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError, TypeError, BufferError):  # e.g. a closed map: nothing to drop
        return
