"""Datasets behind one small interface: an image folder, a CSV file list, the bundled Fashion-MNIST.

Every dataset yields RGB PIL images and integer labels (-1 when unlabelled), names each sample by a
stable key, and hashes its listing (a cache key for calibration tensors) and its samples (to catch a
calibration image that is also in the validation set). Model transforms are applied separately by
``TransformedDataset``, so one dataset feeds every model and target.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2tedge.data.transforms import to_rgb
from t2tedge.errors import DatasetError
from t2tedge.pipeline.store import sha256_file

BUNDLED_DIR = Path(__file__).parent / "bundled"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
FASHION_MNIST = "fashion_mnist"
RACY_NS = 2_000_000_000  # folders modified less than 2 s before a scan are not cached
ACCEPTED_SOURCES = (
    "'fashion_mnist', 'fashion_mnist:train', 'fashion_mnist:test', "
    "an existing image folder, or a .csv file list (path,label rows)"
)


class ImageDataset(ABC):
    """Common interface: ``load(i)`` gives (RGB image, label); ``dataset[i]`` is the same."""

    classes: list[str]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> tuple[Image.Image, int]:
        """Sample ``index`` as (RGB PIL image, label), label -1 when unlabelled."""

    @abstractmethod
    def key(self, index: int) -> str:
        """Stable identity of sample ``index`` (relative path, or ``fashion_mnist/test/<official index>``)."""

    @abstractmethod
    def listing_hash(self) -> str:
        """sha256 hex over the classes, keys, labels and file sizes/mtimes (or content)."""

    @abstractmethod
    def sample_hash(self, index: int) -> str:
        """sha256 hex of the sample's stored bytes."""

    def encoded(self, index: int) -> bytes:
        """The sample as bytes :func:`decode_image` turns into the image ``load`` gives, pixel for pixel
        (a file's own bytes; lossless PNG for array-backed sets): what travels to a remote worker."""
        image, _ = self.load(index)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()

    def cheap_key(self, index: int) -> object:
        """A key equal for equal samples that costs no read (a file's size): only samples whose cheap keys
        collide need :meth:`sample_hash` to tell whether they are the same."""
        return self.sample_hash(index)

    @property
    def name(self) -> str:
        """How error lines name this dataset."""
        return type(self).__name__

    @property
    @abstractmethod
    def labels(self) -> np.ndarray:
        """All labels as an int64 array (-1 where unlabelled)."""

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)


class _FileDataset(ImageDataset):
    """Shared part of datasets whose samples are image files."""

    def __init__(self, files: list[str], keys: list[str], labels: Sequence[int], classes: list[str]):
        self.files = files  # path strings: 1.28 M Path objects cost seconds to make
        self.keys = keys
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self._sizes: list[int] | None = None

    @property
    def paths(self) -> list[Path]:
        return [Path(f) for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return decode_image(self.files[index]), int(self._labels[index])

    def encoded(self, index: int) -> bytes:
        path = self.files[index]
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc.strerror}") from None

    def key(self, index: int) -> str:
        return self.keys[index]

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def listing_hash(self) -> str:
        return self._listing_hash

    @cached_property
    def _listing_hash(self) -> str:
        # Size + mtime rather than content: hashing a large folder's bytes on every run is too slow.
        # Stat'ed once per dataset object (a run), so the hash describes the files as they are now.
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        sizes = []
        for path, key, label in zip(self.files, self.keys, self._labels, strict=True):
            try:
                stat = os.stat(path)
            except OSError as exc:
                raise DatasetError(f"cannot stat {path}: {exc.strerror}") from None
            sizes.append(stat.st_size)
            digest.update(f"\n{key}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
        self._sizes = sizes
        return digest.hexdigest()

    def sample_hash(self, index: int) -> str:
        return sha256_file(Path(self.files[index]))

    def cheap_key(self, index: int) -> object:
        if self._sizes is None:
            self._listing_hash  # noqa: B018  (stats every file once, sizes included)
        return self._sizes[index]


def decode_image(source: str | bytes, name: str | None = None) -> Image.Image:
    """An image file (a path, or its bytes) as 8-bit RGB; one ``DatasetError`` line if it does not decode."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Listing reads no pixels: a corrupt file is found here, when it is first decoded.
        raise DatasetError(f"cannot read image {name or source}: {exc}") from None


def _visible(name: str) -> bool:
    return not name.startswith(".")


def listing_cache_dir() -> Path:
    """Where folder listings are cached: ``$T2TEDGE_LISTING_CACHE``, else the user's cache directory."""
    configured = os.environ.get("T2TEDGE_LISTING_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2tedge" / "listings"


class _FolderListing:
    """The files under an image folder by name and extension (no file is opened), cached on disk.

    The cache is revalidated by the modification times of every folder in the tree (adding, removing or
    renaming a file changes its folder's); the files' own sizes and mtimes are read again by
    ``listing_hash`` each run, so a file rewritten in place still changes every key built on it.
    """

    VERSION = 1

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = listing_cache_dir() / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]}.json"
        self.cached = False
        record = self._read_cache()
        if record is None:
            started = time.time_ns()
            record = self._scan()
            # a folder changed within the mtime granularity of the scan could change again unseen: cache
            # only listings whose folders were all last modified well before it (git's racy-entry rule)
            if max(record["dirs"].values()) < started - RACY_NS:
                self._write_cache(record)
        self.classes: list[str] = record["classes"]
        self.files: list[tuple[str, int]] = record["files"]  # [relative path, label] pairs
        self.skipped: int = record["skipped"]

    def _scan(self) -> dict:
        class_dirs = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and _visible(e.name))
        dirs = {".": os.stat(self.root).st_mtime_ns}
        files: list[tuple[str, int]] = []
        skipped = 0
        if class_dirs:
            for label, name in enumerate(class_dirs):
                found, rejected = self._walk(name, dirs)
                files.extend((rel, label) for rel in found)
                skipped += rejected
        else:
            names = sorted(e.name for e in os.scandir(self.root) if e.is_file() and _visible(e.name))
            kept = [n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
            files, skipped = [(n, -1) for n in kept], len(names) - len(kept)
        return {"version": self.VERSION, "classes": class_dirs, "dirs": dirs, "files": files, "skipped": skipped}

    def _walk(self, top: str, dirs: dict[str, int]) -> tuple[list[str], int]:
        found: list[str] = []
        rejected = 0
        pending = [top]
        while pending:
            folder = pending.pop()
            dirs[folder] = os.stat(self.root / folder).st_mtime_ns
            for entry in os.scandir(self.root / folder):
                if not _visible(entry.name):
                    continue
                rel = f"{folder}/{entry.name}"
                if entry.is_dir():
                    pending.append(rel)
                elif entry.is_file():
                    if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                        found.append(rel)
                    else:
                        rejected += 1
        return sorted(found), rejected

    def _read_cache(self) -> dict | None:
        try:
            record = json.loads(self.cache.read_text())
            if record.get("version") != self.VERSION:
                return None
            for folder, mtime in record["dirs"].items():
                if os.stat(self.root / folder).st_mtime_ns != mtime:
                    return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        self.cached = True
        return record

    def _write_cache(self, record: dict) -> None:
        tmp = self.cache.with_name(f".{self.cache.name}.{os.getpid()}.tmp")
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, separators=(",", ":")))
            tmp.replace(self.cache)
        except OSError:
            pass  # a read-only cache only costs the next run a scan
        finally:
            tmp.unlink(missing_ok=True)


class ImageFolderDataset(_FileDataset):
    """Images under ``root``: one subfolder per class (sorted names = class indices), searched
    recursively; or, without subfolders, an unlabelled folder of images (labels -1, no classes).

    Listing reads names only: files without an image extension are skipped and counted in ``skipped``;
    hidden files and folders are ignored; with class subfolders, loose files in ``root`` are ignored (as
    torchvision does). A file with an image extension that does not decode is found when it is first
    read: preprocessing skips and counts it (``t2tedge.data.cache``).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DatasetError(f"dataset folder {self.root} does not exist")
        if not self.root.is_dir():
            raise DatasetError(f"dataset path {self.root} is not a folder")
        try:
            listing = _FolderListing(self.root)
        except OSError as exc:
            raise DatasetError(f"cannot list dataset folder {self.root}: {exc.strerror}") from None
        self.skipped = listing.skipped
        self.listing_cached = listing.cached
        if not listing.files and not self.skipped:
            raise DatasetError(f"dataset folder {self.root} is empty")
        if not listing.files:
            raise DatasetError(f"dataset folder {self.root} has no readable images ({self.skipped} files skipped)")
        base = f"{self.root}{os.sep}"
        super().__init__(
            files=[base + rel for rel, _ in listing.files],
            keys=[rel for rel, _ in listing.files],
            labels=[label for _, label in listing.files],
            classes=listing.classes,
        )

    @property
    def name(self) -> str:
        return f"dataset folder {self.root}"


class FileListDataset(_FileDataset):
    """Images listed in a CSV of ``path,label`` rows (header ``path,label`` optional).

    Paths are relative to the CSV's folder. Labels are class indices or class names. Without
    ``classes``, names map to indices in sorted order and integer-only lists get classes
    ``["0", ..., str(max)]``; mixing names and integers needs ``classes``. A CSV whose rows all
    have a path only is unlabelled. Errors name the CSV line.
    """

    def __init__(self, csv_path: str | Path, classes: Sequence[str] | None = None):
        self.csv_path = Path(csv_path).expanduser()
        if not self.csv_path.is_file():
            raise DatasetError(f"file list {self.csv_path} does not exist")
        base = self.csv_path.parent
        rows: list[tuple[int, str, str | None]] = []
        with self.csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for cells in reader:
                cells = [c.strip() for c in cells]
                if not any(cells):
                    continue
                if not rows and cells[0].lower() == "path":
                    continue  # header
                if len(cells) not in (1, 2) or not cells[0]:
                    raise DatasetError(f"{self.csv_path} line {reader.line_num}: expected 'path,label'")
                rows.append((reader.line_num, cells[0], cells[1] if len(cells) == 2 else None))
        if not rows:
            raise DatasetError(f"file list {self.csv_path} lists no images")
        if len({label is None for _, _, label in rows}) > 1:
            line = next(line for line, _, label in rows if label is None)
            raise DatasetError(f"{self.csv_path} line {line}: label missing (other rows have one)")

        class_names = list(classes) if classes is not None else self._infer_classes(rows)
        paths, keys, labels = [], [], []
        for line, rel, raw_label in rows:
            path = base / rel
            if not path.is_file():
                raise DatasetError(f"{self.csv_path} line {line}: {path} does not exist")
            paths.append(path)
            keys.append(Path(rel).as_posix())
            labels.append(-1 if raw_label is None else self._parse_label(raw_label, class_names, line))
        super().__init__(files=[str(p) for p in paths], keys=keys, labels=labels, classes=class_names)

    @property
    def name(self) -> str:
        return f"file list {self.csv_path}"

    def _infer_classes(self, rows: list[tuple[int, str, str | None]]) -> list[str]:
        raw = [(line, label) for line, _, label in rows if label is not None]
        names = sorted({label for _, label in raw if not _is_int(label)})
        if names and any(_is_int(label) for _, label in raw):
            line = next(line for line, label in raw if _is_int(label))
            raise DatasetError(f"{self.csv_path} line {line}: integer label in a list of class names; pass classes")
        if names:
            return names
        ints = [int(label) for _, label in raw]
        return [str(i) for i in range(max(ints) + 1)] if ints else []

    def _parse_label(self, raw: str, classes: list[str], line: int) -> int:
        if _is_int(raw):
            label = int(raw)
            if not 0 <= label < len(classes):
                raise DatasetError(f"{self.csv_path} line {line}: label {label} out of range 0..{len(classes) - 1}")
            return label
        try:
            return classes.index(raw)
        except ValueError:
            raise DatasetError(f"{self.csv_path} line {line}: unknown class {raw!r}") from None


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class BundledFashionMNIST(ImageDataset):
    """The bundled, class-balanced Fashion-MNIST subset (see ``scripts/build_fashion_mnist.py``).

    Images are 28x28 grayscale served as RGB. Keys use the index into the official IDX file, so
    they stay valid if the subset is rebuilt with other counts.
    """

    def __init__(self, split: str = "test"):
        if split not in ("train", "test"):
            raise DatasetError(f"fashion_mnist has splits 'train' and 'test', not {split!r}")
        npz_path, json_path = BUNDLED_DIR / "fashion_mnist.npz", BUNDLED_DIR / "fashion_mnist.json"
        if not (npz_path.is_file() and json_path.is_file()):
            raise DatasetError(
                f"bundled Fashion-MNIST is missing from {BUNDLED_DIR}; rebuild it with scripts/build_fashion_mnist.py"
            )
        self.split = split
        self.record = json.loads(json_path.read_text())
        self.classes = list(self.record["classes"])
        with np.load(npz_path) as data:
            self.images = data[f"{split}_images"]
            self._labels = data[f"{split}_labels"].astype(np.int64)
            self.source_index = data[f"{split}_index"].astype(np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return to_rgb(Image.fromarray(self.images[index])), int(self._labels[index])

    def key(self, index: int) -> str:
        return f"{FASHION_MNIST}/{self.split}/{self.source_index[index]}"

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @cached_property
    def _listing_hash(self) -> str:
        # Content-based: the arrays are small and immutable once loaded.
        digest = hashlib.sha256(json.dumps([FASHION_MNIST, self.split, self.classes]).encode())
        for array in (self.source_index, self._labels, self.images):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def listing_hash(self) -> str:
        return self._listing_hash

    def sample_hash(self, index: int) -> str:
        return hashlib.sha256(self.images[index].tobytes()).hexdigest()

    @property
    def name(self) -> str:
        return f"{FASHION_MNIST}:{self.split}"


class SubsetDataset(ImageDataset):
    """A view of ``dataset`` restricted to ``indices`` (same classes, keys and hashes)."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self.dataset.load(int(self.indices[index]))

    def key(self, index: int) -> str:
        return self.dataset.key(int(self.indices[index]))

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels[self.indices]

    def listing_hash(self) -> str:
        digest = hashlib.sha256(self.dataset.listing_hash().encode())
        digest.update(self.indices.tobytes())
        return digest.hexdigest()

    def sample_hash(self, index: int) -> str:
        return self.dataset.sample_hash(int(self.indices[index]))

    def encoded(self, index: int) -> bytes:
        return self.dataset.encoded(int(self.indices[index]))

    def cheap_key(self, index: int) -> object:
        return self.dataset.cheap_key(int(self.indices[index]))

    @property
    def name(self) -> str:
        return self.dataset.name


def select(dataset: ImageDataset, indices: Sequence[int]) -> SubsetDataset:
    """The samples of ``dataset`` at ``indices``, in that order."""
    return SubsetDataset(dataset, indices)


class TransformedDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` pairs; where data comes from stays apart from how a model wants it."""

    def __init__(self, dataset: ImageDataset, transform: Callable[[Image.Image], torch.Tensor]):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset.load(index)
        return self.transform(image), label


def open_dataset(source: str, split: str | None = None) -> ImageDataset:
    """Open ``source``: ``fashion_mnist`` (``split`` default ``test``), ``fashion_mnist:<split>``,
    an image folder or a ``.csv`` file list. ``split`` applies to the bundled set only: a folder or
    file list is already one split, so it is ignored there.
    """
    name, _, suffix = source.partition(":")
    if name == FASHION_MNIST:
        if suffix and split and suffix != split:
            raise DatasetError(f"dataset {source!r} conflicts with split {split!r}")
        return BundledFashionMNIST(suffix or split or "test")
    path = Path(source).expanduser()
    if path.is_dir():
        return ImageFolderDataset(path)
    if path.suffix.lower() == ".csv":
        return FileListDataset(path)
    raise DatasetError(f"cannot open dataset {source!r}; accepted: {ACCEPTED_SOURCES}")
