"""The units of work an executor runs on a worker: compile one artifact, compute logits of one shard.

Both are plain functions of picklable arguments that touch no store: what they make comes back to the
driver as data (files as bytes, logits as arrays), and only the driver commits into the store, with the
store's atomic rules. So no shared filesystem is needed, and a worker that dies mid-task leaves nothing
behind: its task is retried and the store never sees a partial artifact.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.artifact import Artifact
from t2tedge.targets import BuildInputs, get_target, load_verified

# images per validation shard: 512 at 224 px is 77 MB of uint8 pixels; a multiple of the batch of 32, so
# a shard's batches are the batches the local executor runs
SHARD_IMAGES = 512


def compile_artifact(
    target_name: str, inputs: BuildInputs, precision: str, config: Any
) -> tuple[dict[str, Any], dict[str, bytes], float]:
    """``target.build`` into a private directory: its facts, every file it wrote (by relative path) and
    the seconds it took."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="t2tedge-compile-") as tmp:
        facts = get_target(target_name).build(inputs, precision, config, Path(tmp))
        files = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    return facts, files, time.perf_counter() - started


def artifact_payload(path: Path) -> dict[str, bytes]:
    """Every file of a finished artifact (manifest included), to rebuild it on a worker."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def encoded_samples(dataset: Any, indices: np.ndarray) -> list[bytes]:
    """The stored bytes of ``dataset``'s samples at ``indices`` (run on the driver as a shard goes out):
    a JPEG is a few KB where its decoded 224 px crop is 150 KB, and the workers decode in parallel."""
    return [dataset.encoded(int(i)) for i in indices]


# one loaded artifact per worker process, reused by the next shard of the same artifact and threads
_LOADED: dict[str, Any] = {}


def _runner(target_name: str, payload: dict[str, bytes], threads: int | None) -> Any:
    key = hashlib.sha256(payload["manifest.json"] + repr((target_name, threads)).encode()).hexdigest()
    if key not in _LOADED:
        for held in _LOADED.values():
            held[1].cleanup()
        _LOADED.clear()
        tmp = tempfile.TemporaryDirectory(prefix="t2tedge-shard-")
        for name, data in payload.items():
            (Path(tmp.name) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp.name) / name).write_bytes(data)
        # hash-checked against its manifest before anything loads
        _LOADED[key] = (load_verified(get_target(target_name), Artifact(Path(tmp.name)), threads), tmp)
    return _LOADED[key][0]


def shard_logits(
    target_name: str,
    payload: dict[str, bytes],
    images: np.ndarray | list[bytes],
    preprocess: dict[str, Any],
    threads: int | None,
) -> dict[str, Any]:
    """Logits of one shard through the artifact rebuilt from ``payload``, and how the runner ran it.

    ``images``: uint8 pixels (the tensor cache's), or encoded samples decoded here with the same pixel
    transform (the same pixels: the same decoder on the same bytes)."""
    import torch

    from t2tedge.data.datasets import decode_image
    from t2tedge.data.transforms import build_pixel_transform, normalize
    from t2tedge.evaluation.accuracy import run_batched
    from t2tedge.models.spec import Preprocess

    pre = Preprocess.from_dict(preprocess)
    if isinstance(images, list):
        transform = build_pixel_transform(pre)
        size = pre.input_size
        pixels = np.empty((len(images), 3, size, size), dtype=np.uint8)
        for row, data in enumerate(images):
            pixels[row] = transform(decode_image(data, f"sample {row} of the shard")).numpy()
    else:
        pixels = np.ascontiguousarray(images)
    runner = _runner(target_name, payload, threads)
    with torch.inference_mode():
        batch = normalize(torch.from_numpy(pixels), pre).numpy()
    logits = run_batched(runner, batch)
    return {
        "logits": logits,
        "label": runner.label,
        "emulation": runner.emulation,
        "runtime": dict(runner.runtime_facts),
    }
