"""The units of work an executor runs on a worker: export a model, compile one artifact, compute the
logits of one shard (through an artifact, or the FP32 PyTorch reference).

All are plain functions of picklable arguments that touch no store: what they make comes back to the
driver as data (files as bytes, logits as arrays), and only the driver commits into the store, with the
store's atomic rules. So no shared filesystem is needed, and a worker that dies mid-task leaves nothing
behind: its task is retried and the store never sees a partial artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.artifact import Artifact
from t2tedge.errors import DatasetError
from t2tedge.targets import BuildInputs, get_target, load_verified

# images per validation shard: 512 at 224 px is 77 MB of uint8 pixels; a multiple of the batch of 32, so
# a shard's batches are the batches the local executor runs
SHARD_IMAGES = 512
EXPORT_DIR = "export"  # where a worker puts the shipped export's files


def compile_artifact(
    target_name: str,
    inputs: BuildInputs,
    precision: str,
    config: Any,
    export_files: dict[str, bytes] | None = None,
) -> tuple[dict[str, Any], dict[str, bytes], float]:
    """``target.build`` into a private directory: its facts, every file it wrote (by relative path) and
    the seconds it took.

    With ``export_files`` (the export artifact's files, shipped from the driver) the ONNX model is read
    from a private copy of them, not from ``inputs.onnx_path``: a worker needs no filesystem shared with
    the driver."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="t2tedge-compile-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        if export_files is not None:
            write_files(Path(tmp) / EXPORT_DIR, export_files)
            inputs = dataclasses.replace(inputs, onnx_path=Path(tmp) / EXPORT_DIR / inputs.onnx_path.name)
        facts = get_target(target_name).build(inputs, precision, config, out)
        files = artifact_payload(out)
    return facts, files, time.perf_counter() - started


def export_model(
    model: Any, image_size: int, opset: int, dynamic_batch: bool, parity_images: np.ndarray
) -> tuple[dict[str, bytes], dict[str, Any], float]:
    """Export ``model`` to ONNX and check it against PyTorch on ``parity_images`` (float32): the files,
    the parity record and the seconds it took."""
    from t2tedge.calibration.onnx_session import OnnxSession
    from t2tedge.pipeline.export import ONNX_FILE, export_onnx, parity, torch_logits

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="t2tedge-export-") as tmp:
        export_onnx(model, image_size, Path(tmp) / ONNX_FILE, opset, dynamic_batch)
        onnx_logits = OnnxSession(Path(tmp) / ONNX_FILE)(parity_images)
        record = parity(torch_logits(model, parity_images), onnx_logits)
        files = artifact_payload(Path(tmp))
    return files, record, time.perf_counter() - started


def artifact_payload(path: Path) -> dict[str, bytes]:
    """Every file of a finished artifact (manifest included), to rebuild it on a worker."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def write_files(root: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative path -> bytes, as :func:`artifact_payload` gives them) under ``root``."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def encoded_samples(dataset: Any, indices: np.ndarray) -> list[tuple[str, bytes | str]]:
    """``(key, stored bytes)`` of ``dataset``'s samples at ``indices``, run on the driver as a shard goes
    out: a JPEG is a few KB where its decoded 224 px crop is 150 KB, and the workers decode in parallel.
    A file that cannot be read travels as its error line, and the worker counts it as skipped."""
    out: list[tuple[str, bytes | str]] = []
    for index in indices:
        try:
            out.append((dataset.key(int(index)), dataset.encoded(int(index))))
        except DatasetError as exc:
            out.append((dataset.key(int(index)), str(exc)))
    return out


class _EncodedSamples:
    """A shard's samples as a dataset :func:`decode_rows` reads: ``load`` decodes the shipped bytes."""

    def __init__(self, samples: list[tuple[str, bytes | str]]) -> None:
        self.samples = samples

    def load(self, index: int) -> tuple[Any, int]:
        from t2tedge.data.datasets import decode_image

        key, data = self.samples[index]
        if isinstance(data, str):
            raise DatasetError(data)
        return decode_image(data, key), -1

    def key(self, index: int) -> str:
        return self.samples[index][0]


def decoded_shard(samples: list[tuple[str, bytes | str]], preprocess: dict[str, Any]) -> Any:
    """A shard's samples decoded with the model's pixel transform (the same pixels as the driver's tensor
    cache: the same decoder on the same bytes), as a :class:`PixelSet` of the rows that decode."""
    from t2tedge.data.cache import PixelSet, decode_rows
    from t2tedge.models.spec import Preprocess

    pre = Preprocess.from_dict(preprocess)
    pixels, kept, skipped = decode_rows(_EncodedSamples(samples), np.arange(len(samples)), pre, "decoding")
    return PixelSet(pre, kept, skipped, array=pixels)


# one loaded artifact (or model) per worker process, reused by the next shard of the same one
_LOADED: dict[str, Any] = {}


def _runner(target_name: str, payload: dict[str, bytes], threads: int | None) -> Any:
    key = hashlib.sha256(payload["manifest.json"] + repr((target_name, threads)).encode()).hexdigest()
    if key not in _LOADED:
        for held in _LOADED.values():
            held[1].cleanup()
        _LOADED.clear()
        tmp = tempfile.TemporaryDirectory(prefix="t2tedge-shard-")
        write_files(Path(tmp.name), payload)
        # hash-checked against its manifest before anything loads
        _LOADED[key] = (load_verified(get_target(target_name), Artifact(Path(tmp.name)), threads), tmp)
    return _LOADED[key][0]


def shard_logits(
    target_name: str,
    payload: dict[str, bytes],
    samples: list[tuple[str, bytes | str]],
    preprocess: dict[str, Any],
    threads: int | None,
) -> dict[str, Any]:
    """Logits of one shard's decodable samples through the artifact rebuilt from ``payload``, which of
    them decoded (``kept``, ``skipped``) and how the runner ran them. Decoded, normalized and run a
    batch at a time, as the local executor streams its tensor cache."""
    from t2tedge.evaluation.accuracy import run_batched

    images = decoded_shard(samples, preprocess)
    runner = _runner(target_name, payload, threads)
    return {
        "logits": run_batched(runner, images),
        "kept": images.kept,
        "skipped": images.skipped,
        "label": runner.label,
        "emulation": runner.emulation,
        "runtime": dict(runner.runtime_facts),
    }


def shard_reference(
    model: Any, samples: list[tuple[str, bytes | str]], preprocess: dict[str, Any], threads: int
) -> dict[str, Any]:
    """FP32 PyTorch logits of one shard's decodable samples (the reference artifacts are compared with),
    in the local reference's batches, on ``threads`` torch threads."""
    import torch

    from t2tedge.pipeline.export import torch_logits

    images = decoded_shard(samples, preprocess)
    torch.set_num_threads(threads)
    return {
        "logits": torch_logits(model, images),
        "kept": images.kept,
        "skipped": images.skipped,
        "threads": torch.get_num_threads(),
    }
