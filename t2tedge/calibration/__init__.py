"""Calibration sets: a deterministic, class-balanced selection preprocessed with the model's transform.

A calibration set is (source, model transform, N, seed); the same images feed every target's
quantizer, so accuracy numbers are comparable across targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2tedge.data.cache import cached_preprocess
from t2tedge.data.datasets import ImageDataset
from t2tedge.errors import DatasetError
from t2tedge.models.spec import Preprocess

DEFAULT_SIZE = 300  # NNCF's default subset size


def select_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Pick ``n`` indices: round-robin over classes (each shuffled by ``seed``) when labelled."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if len(labels) == 0 or (labels < 0).all():
        return np.sort(rng.permutation(len(labels))[:n])
    pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels[labels >= 0])]
    chosen: list[int] = []
    while len(chosen) < n and any(pools):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return np.sort(np.asarray(chosen, dtype=np.int64))


@dataclass
class CalibrationSet:
    """Preprocessed calibration images and where they came from."""

    images: np.ndarray
    indices: np.ndarray
    key: str
    cached: bool

    def describe(self) -> dict[str, object]:
        return {"size": len(self.indices), "key": self.key[:16], "cached": self.cached}


def calibration_set(
    dataset: ImageDataset,
    pre: Preprocess,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    cache_dir: Path | None = None,
    allow_fewer: bool = False,
) -> CalibrationSet:
    """Select and preprocess ``size`` images; fewer usable images is an error unless allowed."""
    if len(dataset) < size and not allow_fewer:
        raise DatasetError(
            f"calibration source has {len(dataset)} usable images, fewer than the {size} asked for "
            "(lower the calibration size or allow fewer explicitly)"
        )
    indices = select_indices(dataset.labels, min(size, len(dataset)), seed)
    images, key, cached = cached_preprocess(dataset, indices, pre, cache_dir, "calibration images")
    return CalibrationSet(images, indices, key, cached)
