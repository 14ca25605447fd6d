"""Preprocessed images, cached on disk by (dataset listing, transform, selection), read batch by batch.

A selection is stored once as uint8 pixels, the model transform before scaling: (N, 3, S, S), a quarter
of float32's bytes (50k ImageNet images at 224 px: 7.5 GB on disk, not 30 GB in memory). A
:class:`PixelSet` reads it a batch at a time with plain file reads and normalizes each batch on the fly,
so memory does not grow with the number of images. Images that do not decode are skipped and counted
when first read; all of a selection unreadable is one error line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2tedge.data.datasets import ImageDataset
from t2tedge.data.transforms import build_eval_transform, build_pixel_transform, normalize
from t2tedge.errors import DatasetError
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.store import content_hash
from t2tedge.progress import log, track

CACHE_FORMAT = "u8"  # in the file names: caches written by other formats are never read as this one


def preprocess(dataset: ImageDataset, indices: np.ndarray, pre: Preprocess, description: str) -> np.ndarray:
    """Load and transform the selected images into one (N, 3, S, S) float32 array (every image must decode)."""
    transform = build_eval_transform(pre)
    out = np.empty((len(indices), 3, pre.input_size, pre.input_size), dtype=np.float32)
    for row, index in enumerate(track(indices, description, total=len(indices))):
        image, _ = dataset.load(int(index))
        out[row] = transform(image).numpy()
    return out


def tensor_key(dataset: ImageDataset, indices: np.ndarray, pre: Preprocess) -> str:
    """The cache key of a preprocessed selection: what the images are, which, and how transformed."""
    return content_hash({"listing": dataset.listing_hash(), "preprocess": pre.to_dict(), "indices": indices.tolist()})


class PixelSet:
    """The decodable images of a selection as uint8 pixels (in memory or in a ``.npy`` file), served as
    normalized float32: ``len()``, ``pixels[a:b]`` (a float32 batch) and :meth:`to_array`.

    ``kept`` are the positions in the selection that decoded (labels follow them); ``skipped`` lists
    ``[position, key, reason]`` of the others.
    """

    def __init__(
        self,
        pre: Preprocess,
        kept: np.ndarray,
        skipped: list[list[Any]],
        array: np.ndarray | None = None,
        path: Path | None = None,
    ) -> None:
        if (array is None) == (path is None):
            raise ValueError("a PixelSet holds an array or a file, not both")
        self.pre, self.kept, self.skipped = pre, np.asarray(kept, dtype=np.int64), skipped
        self.array, self.path = array, path
        self.item_shape = (3, pre.input_size, pre.input_size)
        self._offset: int | None = None

    def __len__(self) -> int:
        return len(self.kept)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.item_shape)

    def raw(self, start: int, stop: int) -> np.ndarray:
        """uint8 pixels of kept images ``start:stop``."""
        rows = self.kept[start:stop]
        if len(rows) == 0:
            return np.zeros((0, *self.item_shape), dtype=np.uint8)
        first, last = int(rows[0]), int(rows[-1]) + 1
        span = self.array[first:last] if self.array is not None else self._read(first, last)
        return span[rows - first] if last - first != len(rows) else span

    def _read(self, first: int, last: int) -> np.ndarray:
        # plain reads, not a memory map: mapped pages would count as this process's memory
        item = int(np.prod(self.item_shape))
        with open(self.path, "rb") as fh:
            if self._offset is None:
                major, _ = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                read_header(fh)
                self._offset = fh.tell()
            fh.seek(self._offset + first * item)
            out = np.empty((last - first, *self.item_shape), dtype=np.uint8)
            if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise DatasetError(f"{self.path} is shorter than its header says; delete it to rebuild the cache")
        return out

    def __getitem__(self, item: slice | int) -> np.ndarray:
        if isinstance(item, (int, np.integer)):
            index = int(item) + (len(self) if item < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"image {item} of {len(self)}")
            return self[index : index + 1][0]
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a PixelSet is read by indices and contiguous slices")
        start, stop, _ = item.indices(len(self))
        pixels = torch.from_numpy(np.ascontiguousarray(self.raw(start, stop)))
        return normalize(pixels, self.pre).numpy()

    def to_array(self) -> np.ndarray:
        """Every kept image as one float32 array (small sets: calibration, parity)."""
        return self[:]


def cached_pixels(
    dataset: ImageDataset,
    indices: np.ndarray,
    pre: Preprocess,
    cache_dir: Path | None,
    description: str,
) -> tuple[PixelSet, str, bool]:
    """The selection's pixels, decoded once and cached on disk; returns (pixels, cache key, was_cached)."""
    key = tensor_key(dataset, indices, pre)
    if cache_dir is None:
        array, kept, skipped = _decode(dataset, indices, pre, description, None)
        return PixelSet(pre, kept, skipped, array=array), key, False
    path = Path(cache_dir) / f"{key[:16]}.{CACHE_FORMAT}.npy"
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        return PixelSet(pre, np.asarray(record["kept"]), record["skipped"], path=path), key, True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _, kept, skipped = _decode(dataset, indices, pre, description, tmp)
        _write_json_atomic(record_path, {"kept": kept.tolist(), "skipped": skipped})
        tmp.replace(path)  # the record first: an array on disk always has its record
    finally:
        tmp.unlink(missing_ok=True)
    return PixelSet(pre, kept, skipped, path=path), key, False


def _decode(
    dataset: ImageDataset, indices: np.ndarray, pre: Preprocess, description: str, out: Path | None
) -> tuple[np.ndarray | None, np.ndarray, list[list[Any]]]:
    """Decode the selection into memory or, streaming, into the ``.npy`` file ``out``."""
    array, kept, skipped = decode_rows(dataset, indices, pre, description, out)
    if not len(kept):
        no_readable_images(dataset, len(skipped))
    warn_skipped(skipped, len(indices), description)
    return array, kept, skipped


def decode_rows(
    dataset: Any, indices: np.ndarray, pre: Preprocess, description: str, out: Path | None = None
) -> tuple[np.ndarray | None, np.ndarray, list[list[Any]]]:
    """The selection as uint8 pixels (in memory, or streamed into the ``.npy`` file ``out``), the rows
    that decoded and ``[row, key, reason]`` of those that did not (left blank). ``dataset`` needs only
    ``load(i)`` and ``key(i)``."""
    transform = build_pixel_transform(pre)
    shape = (len(indices), 3, pre.input_size, pre.input_size)
    array = np.zeros(shape, dtype=np.uint8) if out is None else None
    kept: list[int] = []
    skipped: list[list[Any]] = []
    blank = np.zeros(shape[1:], dtype=np.uint8)
    with open(out, "wb") if out is not None else contextlib.nullcontext() as fh:
        if fh is not None:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_2_0(fh, header)
        for row, index in enumerate(track(indices, description, total=len(indices))):
            try:
                image, _ = dataset.load(int(index))
                pixels = transform(image).numpy()
                kept.append(row)
            except DatasetError as exc:
                skipped.append([row, dataset.key(int(index)), str(exc)])
                pixels = blank
            if fh is not None:
                fh.write(np.ascontiguousarray(pixels).tobytes())
            else:
                array[row] = pixels
    return array, np.asarray(kept, dtype=np.int64), skipped


def no_readable_images(dataset: Any, skipped: int) -> None:
    """The one error line of a selection none of whose images decode."""
    total = skipped + int(getattr(dataset, "skipped", 0))
    raise DatasetError(f"{dataset.name} has no readable images ({total} files skipped)")


def warn_skipped(skipped: list[list[Any]], selected: int, description: str) -> None:
    """The one warning line of a selection some of whose images do not decode."""
    if skipped:
        first = skipped[0][2]
        log(f"  [yellow]warning:[/] {len(skipped)} of {selected} {description} do not decode, skipped ({first})")


def cached_preprocess(
    dataset: ImageDataset,
    indices: np.ndarray,
    pre: Preprocess,
    cache_dir: Path | None,
    description: str,
) -> tuple[np.ndarray, str, bool]:
    """Like :func:`cached_pixels`, as one float32 array of the images that decode (small selections)."""
    pixels, key, cached = cached_pixels(dataset, indices, pre, cache_dir, description)
    return pixels.to_array(), key, cached


def _write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
