"""Calibration sets: a deterministic, class-balanced selection preprocessed with the model's transform.

A calibration set is (source, model transform, N, seed); the same images feed every target's
quantizer, so accuracy numbers are comparable across targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from t2tedge.data.cache import cached_pixels, tensor_key
from t2tedge.data.datasets import ImageDataset
from t2tedge.errors import DatasetError
from t2tedge.models.spec import Preprocess
from t2tedge.progress import log

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


class CalibrationSet:
    """A planned calibration selection; images are preprocessed (or read from cache) on first use.

    The key is known without touching any image, so an artifact whose inputs hash already exists is
    reused without calibrating at all.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        pre: Preprocess,
        indices: np.ndarray,
        seed: int,
        cache_dir: Path | None,
        what: str = "calibration",
    ) -> None:
        self.what = what
        self.dataset, self.pre, self.indices, self.seed, self.cache_dir = (
            dataset,
            pre,
            indices,
            seed,
            cache_dir,
        )
        self.key = tensor_key(dataset, indices, pre)
        self.cached: bool | None = None  # unknown until the images are needed
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The images that decode, as float32; ``indices`` (and ``labels``) then name only those."""
        if self._images is None:
            pixels, _, self.cached = cached_pixels(
                self.dataset, self.indices, self.pre, self.cache_dir, f"{self.what} images"
            )
            self._images, self.indices = pixels.to_array(), self.indices[pixels.kept]
            log(f"  {self.what}: {'reused cached' if self.cached else 'preprocessed'} {len(self.indices)} images")
        return self._images

    @property
    def labels(self) -> np.ndarray:
        """Labels of :attr:`images`, row for row (decodes the images first: unreadable ones are dropped)."""
        _ = self.images
        return np.asarray(self.dataset.labels)[self.indices]

    def overlap(self, other: ImageDataset, indices: np.ndarray) -> int:
        """How many distinct images are both in this set and among ``other``'s ``indices``.

        Cheap keys (file sizes) first; contents are hashed only where they collide, so a 50k-image
        validation set is not read to learn that none of its files is one of 300 calibration images.
        """
        mine: dict[object, list[int]] = {}
        for i in self.indices:
            mine.setdefault(self.dataset.cheap_key(int(i)), []).append(int(i))
        candidates = [int(j) for j in indices if other.cheap_key(int(j)) in mine]
        if not candidates:
            return 0
        keys = {other.cheap_key(j) for j in candidates}
        hashes = {self.dataset.sample_hash(i) for key in keys for i in mine[key]}
        return len(hashes & {other.sample_hash(j) for j in candidates})

    def describe(self) -> dict[str, object]:
        return {"size": len(self.indices), "seed": self.seed, "key": self.key[:16], "cached": self.cached}

    def heldout(self, size: int) -> CalibrationSet | None:
        """A class-balanced split of the same source, disjoint from these images (None if none is left).

        What chooses between quantization candidates (TensorRT's calibration method) scores on it, so
        neither the calibration images nor the validation set decide a choice.
        """
        labels = np.asarray(self.dataset.labels).copy()
        taken = np.zeros(len(labels), dtype=bool)
        taken[self.indices] = True
        remaining = np.flatnonzero(~taken)
        if size <= 0 or len(remaining) == 0:
            return None
        picked = remaining[select_indices(labels[remaining], min(size, len(remaining)), self.seed + 1)]
        return CalibrationSet(self.dataset, self.pre, np.sort(picked), self.seed + 1, self.cache_dir, "held-out")


def calibration_set(
    dataset: ImageDataset,
    pre: Preprocess,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    cache_dir: Path | None = None,
    allow_fewer: bool = False,
) -> CalibrationSet:
    """Plan a ``size``-image calibration set; fewer usable images is an error unless allowed."""
    if len(dataset) < size and not allow_fewer:
        raise DatasetError(
            f"calibration source has {len(dataset)} usable images, fewer than the {size} asked for "
            "(lower calibration.size, or set calibration.allow_fewer: true)"
        )
    if len(dataset) == 0:
        raise DatasetError("calibration source has no usable images")
    return CalibrationSet(dataset, pre, select_indices(dataset.labels, min(size, len(dataset)), seed), seed, cache_dir)
