"""Top-1 / top-5 accuracy of a model on labelled images (``actatlas eval``)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .batches import iter_batches
from .data import ImageSource
from .errors import DataError
from .models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Accuracy over the `n` labelled, decodable images; `images_per_s` counts decode + forward."""

    top1: float
    top5: float
    n: int
    skipped: int
    unlabelled: int
    seconds: float
    images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(spec: ModelSpec, source: ImageSource, batch_size: int = 32, loader_threads: int = 2,
             progress: bool = True) -> EvalResult:
    """Classify every labelled image of `source` and score the model's top-1 / top-5."""
    labels = source.labels(spec.class_names, spec.wnids)
    keep = np.flatnonzero(labels >= 0)
    if len(keep) == 0:
        raise DataError(f"no image of {source.description} has a label this model knows "
                        "(labels come from wnid file-name prefixes like n01440764_*.JPEG or class sub-folders)")
    device = next(spec.module.parameters()).device
    plan = [(None, keep[a:a + batch_size]) for a in range(0, len(keep), batch_size)]
    t0 = time.perf_counter()
    hit1 = hit5 = n = skipped = 0
    bar = tqdm(total=len(keep), disable=not progress, unit="img", desc=f"eval {spec.name}")
    for batch in iter_batches(source, spec.preprocess, plan, threads=loader_threads):
        skipped += len(batch.skipped)
        if batch.pixels is not None:
            x = spec.preprocess.normalize(batch.pixels.to(device))
            if spec.info.get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                top = spec.module(x).topk(min(5, spec.num_classes), dim=1).indices.cpu().numpy()
            y = labels[batch.index][:, None]
            hit1 += int((top[:, :1] == y).any(1).sum())
            hit5 += int((top == y).any(1).sum())
            n += len(batch.index)
        bar.update(batch.requested)
    bar.close()
    seconds = time.perf_counter() - t0
    if n == 0:
        raise DataError("no labelled image could be decoded")
    return EvalResult(hit1 / n, hit5 / n, n, skipped, int(len(labels) - len(keep)), seconds, n / seconds)
