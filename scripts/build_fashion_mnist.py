"""Build the bundled Fashion-MNIST subset from the Debian package ``dataset-fashion-mnist``.

Keeps the official split: a seeded, class-balanced subset of the official train file and of the
official test file, so the bundled train and test sets never share an image. Writes
``t2tedge/data/bundled/fashion_mnist.npz`` and a JSON record of where it came from.

    python scripts/build_fashion_mnist.py [--train-per-class 1200] [--test-per-class 300] [--seed 0]

The npz is written with fixed zip timestamps, so rebuilding with the same arguments from the same
package gives the same bytes (and the same sha256).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from t2tedge.pipeline.store import sha256_file

PACKAGE = "dataset-fashion-mnist"
SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = Path(__file__).resolve().parents[1] / "t2tedge" / "data" / "bundled"
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MAX_NPZ_BYTES = 10 * 1024 * 1024
# Any fixed date works; zip cannot store dates before 1980.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, then one uint32 per dimension)."""
    data = gzip.decompress(path.read_bytes())
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise SystemExit(f"{path}: not an IDX file of the expected kind (magic {found:#x}, want {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def package_version() -> str:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "(version unknown)"
    return result.stdout.strip()


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of each class, drawn without replacement."""
    chosen = []
    for label in range(len(CLASSES)):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise SystemExit(f"class {label} has only {len(candidates)} samples, {per_class} requested")
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (numpy stamps members with the current time)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def build(source_dir: Path, out_dir: Path, train_per_class: int, test_per_class: int, seed: int) -> dict:
    missing = [name for pair in FILES.values() for name in pair if not (source_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST files missing from {source_dir}: {', '.join(missing)}; "
            f"install them with `apt-get install {PACKAGE}`"
        )
    # One generator, train drawn before test: the record (seed + order) reproduces both subsets.
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    counts = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images_file, labels_file = FILES[split]
        images = read_idx(source_dir / images_file, 0x803)
        labels = read_idx(source_dir / labels_file, 0x801)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise SystemExit(f"{split}: unexpected shapes {images.shape} / {labels.shape}")
        index = balanced_subset(labels, per_class, rng)
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index]
        arrays[f"{split}_index"] = index.astype(np.int32)
        counts[split] = {"total": int(len(index)), "per_class": per_class, "official_total": len(labels)}

    out_dir.mkdir(parents=True, exist_ok=True)
    npz_path = out_dir / "fashion_mnist.npz"
    write_npz(npz_path, arrays)
    size = npz_path.stat().st_size
    if size > MAX_NPZ_BYTES:
        npz_path.unlink()
        raise SystemExit(
            f"{npz_path.name} would be {size / 1e6:.1f} MB (limit {MAX_NPZ_BYTES / 1e6:.1f} MB); "
            "lower --train-per-class / --test-per-class"
        )

    record = {
        "name": "fashion_mnist",
        "licence": "MIT",
        "source": f"Debian package {PACKAGE} {package_version()}, Zalando Research",
        "url": "https://github.com/zalandoresearch/fashion-mnist",
        "classes": CLASSES,
        "image_shape": [28, 28],
        "counts": counts,
        "seed": seed,
        "selection": (
            "numpy.random.default_rng(seed); per split (train, then test) and per class 0..9: "
            "rng.choice(official indices of that class, per_class, replace=False); indices sorted"
        ),
        "source_sha256": {name: sha256_file(source_dir / name) for pair in FILES.values() for name in pair},
        "npz": {"file": npz_path.name, "bytes": size, "sha256": sha256_file(npz_path)},
    }
    (out_dir / "fashion_mnist.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=1200)
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source-dir", type=Path, default=SOURCE_DIR)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    record = build(args.source_dir, args.out_dir, args.train_per_class, args.test_per_class, args.seed)
    print(
        f"wrote {args.out_dir / record['npz']['file']}: {record['npz']['bytes'] / 1e6:.2f} MB, "
        f"train {record['counts']['train']['total']}, test {record['counts']['test']['total']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
