"""Decoding images into model-ready uint8 batches on background threads.

Decode + resize run in a thread pool (Pillow releases the GIL) a few batches ahead of the model, so
on a CPU the network, not JPEG decoding, sets the pace.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from .data import ImageDecodeError, ImageSource
from .models.spec import Preprocess


@dataclass
class DecodedBatch:
    """One batch: `pixels` uint8 [b, 3, s, s] for the decodable images `index` [b]; `skipped` lists
    (index, reason) for the others. `key` is the caller's tag for the batch (e.g. a shard id)."""

    key: object
    index: np.ndarray
    pixels: torch.Tensor | None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    requested: int = 0


def load_for(source: ImageSource, preprocess: Preprocess, item):
    """Decode `item` of `source` for `preprocess`: an `ImageSource` is asked for the short side the
    geometry needs (JPEGs then decode at a reduced DCT scale); other objects with a ``load(item)``
    method decode at full size."""
    if isinstance(source, ImageSource):
        return source.load(item, min_side=preprocess.decode_side)
    return source.load(item)


def _decode(source: ImageSource, preprocess: Preprocess, i: int):
    try:
        return i, preprocess.to_uint8(load_for(source, preprocess, source[i])), None
    except ImageDecodeError as exc:
        return i, None, str(exc)


def decode_batch(source: ImageSource, preprocess: Preprocess, key: object, idx: Sequence[int],
                 pool: ThreadPoolExecutor | None = None) -> DecodedBatch:
    """Decode the images `idx` of `source` into one `DecodedBatch` (on `pool`'s threads if given).

    The same function the local engine's `iter_batches` uses, for engines that decode elsewhere
    (e.g. a Ray decode actor)."""
    if pool is None:
        results = [_decode(source, preprocess, int(i)) for i in idx]
    else:
        results = list(pool.map(lambda i: _decode(source, preprocess, int(i)), idx))
    return _assemble(key, idx, results)


def _assemble(key, idx, results) -> DecodedBatch:
    good = [(i, a) for i, a, err in results if err is None]
    return DecodedBatch(
        key=key,
        index=np.array([i for i, _ in good], dtype=np.int64),
        pixels=torch.from_numpy(np.stack([a for _, a in good])) if good else None,
        skipped=[(i, err) for i, _, err in results if err is not None],
        requested=len(idx),
    )


def iter_batches(source: ImageSource, preprocess: Preprocess, plan: Sequence[tuple[object, Sequence[int]]],
                 threads: int = 2, ahead: int = 2) -> Iterator[DecodedBatch]:
    """Yield a `DecodedBatch` for each (key, image indices) of `plan`, decoding `ahead` batches early."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        queue: deque = deque()

        def submit(j):
            queue.append([pool.submit(_decode, source, preprocess, int(i)) for i in plan[j][1]])

        for j in range(min(ahead, len(plan))):
            submit(j)
        for j, (key, idx) in enumerate(plan):
            futures = queue.popleft()
            if j + ahead < len(plan):
                submit(j + ahead)
            yield _assemble(key, idx, [f.result() for f in futures])
