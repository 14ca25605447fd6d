"""Preprocessed image tensors, cached on disk by (dataset listing, transform, selection)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from t2tedge.data.datasets import ImageDataset
from t2tedge.data.transforms import build_eval_transform
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.store import content_hash
from t2tedge.progress import track


def preprocess(dataset: ImageDataset, indices: np.ndarray, pre: Preprocess, description: str) -> np.ndarray:
    """Load and transform the selected images into one (N, 3, S, S) float32 array."""
    transform = build_eval_transform(pre)
    out = np.empty((len(indices), 3, pre.input_size, pre.input_size), dtype=np.float32)
    for row, index in enumerate(track(indices, description, total=len(indices))):
        image, _ = dataset.load(int(index))
        out[row] = transform(image).numpy()
    return out


def tensor_key(dataset: ImageDataset, indices: np.ndarray, pre: Preprocess) -> str:
    """The cache key of a preprocessed selection: what the images are, which, and how transformed."""
    return content_hash({"listing": dataset.listing_hash(), "preprocess": pre.to_dict(), "indices": indices.tolist()})


def cached_preprocess(
    dataset: ImageDataset,
    indices: np.ndarray,
    pre: Preprocess,
    cache_dir: Path | None,
    description: str,
) -> tuple[np.ndarray, str, bool]:
    """Like :func:`preprocess`, reusing a cached array; returns (array, cache key, was_cached)."""
    key = tensor_key(dataset, indices, pre)
    if cache_dir is None:
        return preprocess(dataset, indices, pre, description), key, False
    path = Path(cache_dir) / f"{key[:16]}.npy"
    if path.is_file():
        return np.load(path), key, True
    array = preprocess(dataset, indices, pre, description)
    save_array(path, array)
    return array, key, False


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` atomically (temp file + rename): a full disk or a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
