"""Re-validate an existing artifact on another labelled dataset."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.calibration import select_indices
from t2tedge.data.cache import PixelSet, cached_pixels, no_readable_images, tensor_key, warn_skipped
from t2tedge.data.datasets import ImageDataset, open_dataset
from t2tedge.errors import ArtifactError, DatasetError
from t2tedge.evaluation import host as this_host
from t2tedge.evaluation.accuracy import MEASURED, accuracy_report, run_batched, unavailable
from t2tedge.evaluation.host import host_label
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.executors import Deferred, Executor, Task
from t2tedge.pipeline.store import Artifact, read_manifest
from t2tedge.pipeline.tasks import artifact_payload, encoded_samples, shard_logits
from t2tedge.targets import Target, get_target, load_verified


@dataclass
class Selection:
    """Samples of a dataset picked for validation, before anything is decoded: which, their labels, how
    the model transforms them and the tensor cache key that names the selection."""

    dataset: ImageDataset
    indices: np.ndarray
    labels: np.ndarray
    pre: Preprocess
    key: str


@dataclass
class Sharded:
    """Shard results merged: the logits of the samples that decoded, their positions in the selection."""

    logits: np.ndarray
    kept: np.ndarray
    skipped: list[list[Any]]
    parts: list[dict[str, Any]]


def run_validation(
    target: Target,
    artifact: Artifact,
    images: np.ndarray | PixelSet,
    labels: np.ndarray,
    reference: np.ndarray | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Accuracy of an artifact, labelled measured / emulated / unavailable by what could run it here."""
    availability = target.availability()
    if not (availability.can_run or availability.can_emulate):
        return unavailable(availability.reason)
    runner = load_verified(target, artifact, threads)
    logits = run_batched(runner, images)
    return _report(logits, labels, runner.label, runner.emulation, dict(runner.runtime_facts), reference)


def _report(
    logits: np.ndarray,
    labels: np.ndarray,
    label: str,
    emulation: str | None,
    runtime: dict[str, Any],
    reference: np.ndarray | None,
) -> dict[str, Any]:
    """The accuracy record of one run: emulated numbers carry how they were emulated, all the runtime."""
    note = (emulation or "") if label != MEASURED else ""
    result = accuracy_report(logits, labels, label, reference, note=note)
    result["runtime"] = runtime
    return result


def validate_sharded(
    executor: Executor,
    target: Target,
    artifact: Artifact,
    selection: Selection,
    reference: np.ndarray | None,
    threads: int | None,
    shard_images: int,
    resources: dict[str, float],
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`run_validation` as executor tasks: one per shard of ``shard_images`` samples, each carrying
    the samples' stored bytes; the worker decodes them with the model's pixel transform, loads the
    artifact from its files (shipped once) and returns the logits of the samples that decode. They merge,
    in order, into the numbers one local pass gives (a shard's batches are the local run's batches), and
    undecodable samples are skipped and counted as the local tensor cache does."""
    availability = target.availability()
    if not (availability.can_run or availability.can_emulate):
        return unavailable(availability.reason)
    payload = executor.share(artifact_payload(artifact.path))
    threads = threads or max(1, int(resources.get("CPU", 1)))  # a task's runtime uses the CPUs it holds
    shards = run_shards(
        executor,
        selection,
        shard_images,
        lambda samples: (shard_logits, (target.name, payload, samples, selection.pre.to_dict(), threads)),
        f"validate {artifact.path.parent.name}/{artifact.path.name}",
        resources,
        f"validating {artifact.path.name}",
        labels,
    )
    first = next((shard for shard in shards.parts if len(shard["kept"])), shards.parts[0])
    if reference is not None and len(reference) == len(selection.indices):
        reference = reference[shards.kept]
    result = _report(
        shards.logits, selection.labels[shards.kept], first["label"], first["emulation"], first["runtime"], reference
    )
    result["shards"] = {"count": len(shards.parts), "images": shard_images, "executor": executor.name}
    result["skipped"] = len(shards.skipped)
    return result


def run_shards(
    executor: Executor,
    selection: Selection,
    shard_images: int,
    task: Callable[[Deferred], tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]],
    label: str,
    resources: dict[str, float],
    description: str,
    labels: Mapping[str, str] | None = None,
) -> Sharded:
    """Run ``task(samples)`` over the selection in shards of ``shard_images`` samples (their bytes are read
    on the driver as each shard goes out) and merge the shards' ``logits``/``kept``/``skipped`` in order.
    None decodable is the tensor cache's one error line; some not, its one warning line."""
    tasks = []
    for start in range(0, len(selection.indices), shard_images):
        fn, args = task(Deferred(encoded_samples, selection.dataset, selection.indices[start : start + shard_images]))
        tasks.append(Task(fn, args, label=f"{label} images {start}+", resources=resources, labels=labels or {}))
    parts = executor.run(tasks, description)
    kept: list[np.ndarray] = []
    skipped: list[list[Any]] = []
    for start, part in zip(range(0, len(selection.indices), shard_images), parts, strict=True):
        kept.append(np.asarray(part["kept"], dtype=np.int64) + start)
        skipped.extend([start + row, key, reason] for row, key, reason in part["skipped"])
    rows = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    if not len(rows):
        no_readable_images(selection.dataset, len(skipped))
    warn_skipped(skipped, len(selection.indices), "validation images")
    logits = np.concatenate([part["logits"] for part in parts if len(part["kept"])])
    return Sharded(logits, rows, skipped, parts)


def stored_validation(artifact: Artifact, key: str) -> dict[str, Any] | None:
    """The stored validation of this set, if this host (same fingerprint) measured it."""
    record = artifact.manifest.get("validation", {}).get(key)
    if record is None or record.get("host_fingerprint") != this_host.host_fingerprint():
        return None
    return record


def store_validation(artifact: Artifact, key: str, result: dict[str, Any]) -> None:
    """Store a validation under ``key`` with this host's fingerprint; another host's record there is kept
    under ``key@host-<fingerprint>``."""
    result["host_fingerprint"] = this_host.host_fingerprint()
    old = artifact.manifest.get("validation", {}).get(key)
    section = {key: result}
    if old is not None and old.get("host_fingerprint") != result["host_fingerprint"]:
        other = host_label(old.get("host_fingerprint"))
        section[f"{key}@{other}"] = {**old, "host_label": other}
    artifact.update_manifest(validation=section)


def labelled_images(path: str | Path, data: str, limit: int | None = None) -> tuple[PixelSet, np.ndarray, str]:
    """The artifact's model transform applied to a labelled dataset: (images, labels, tensor cache key).

    The images stream from the tensor cache batch by batch; images that do not decode are skipped, and
    the labels are those of the ones kept."""
    selection = labelled_selection(path, data, limit)
    cache = tensor_cache_dir(Path(path), read_manifest(path))
    images, key, _ = cached_pixels(selection.dataset, selection.indices, selection.pre, cache, "validation images")
    return images, selection.labels[images.kept], key


def labelled_selection(path: str | Path, data: str, limit: int | None = None) -> Selection:
    """Which samples of a labelled dataset validate an artifact (nothing decoded yet).

    Refuses exports (not compiled artifacts), unlabelled data and datasets with more classes than the model.
    """
    manifest = read_manifest(path)
    io = manifest.get("model_io")
    if io is None:
        raise ArtifactError(f"{path} is not a compiled artifact (an export? validate the target artifacts)")
    dataset = open_dataset(data)
    if (dataset.labels < 0).all():
        raise DatasetError(f"{data} has no labels; validation needs class subfolders or a labelled CSV")
    if len(dataset.classes) > io["num_classes"]:
        raise DatasetError(f"{data} has {len(dataset.classes)} classes but the model predicts {io['num_classes']}")
    check_classes(io.get("classes") or [], dataset.classes, data)
    indices = select_indices(dataset.labels, limit, seed=0) if limit else np.arange(len(dataset), dtype=np.int64)
    pre = Preprocess.from_dict(io["preprocess"])
    return Selection(dataset, indices, dataset.labels[indices], pre, tensor_key(dataset, indices, pre))


def check_classes(model_classes: list[str], dataset_classes: list[str], data: str) -> None:
    """Refuse a dataset whose class names differ from the model's (label i must mean the model's class i)."""
    if not model_classes or not dataset_classes or list(model_classes) == list(dataset_classes):
        return
    if set(model_classes) == set(dataset_classes):
        raise DatasetError(
            f"{data} has the model's classes in another order ({', '.join(dataset_classes[:3])}, ... vs "
            f"{', '.join(model_classes[:3])}, ...): its labels would be permuted; order them as the model does"
        )
    missing = [c for c in dataset_classes if c not in model_classes]
    raise DatasetError(
        f"{data}'s classes differ from the model's ({len(missing)} not among them, e.g. {missing[0]!r})"
        if missing
        else f"{data}'s classes differ from the model's"
    )


def tensor_cache_dir(path: Path, manifest: dict[str, Any]) -> Path:
    """The store's tensor cache for an artifact inside a store; else the user's cache directory."""
    store = path.resolve().parent.parent.parent
    in_store = (
        path.resolve().parent.name == manifest.get("target")
        and path.resolve().parent.parent.name == manifest.get("model")
        and (store / ".cache").is_dir()
    )
    if in_store:
        return store / ".cache" / "tensors"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "t2tedge" / "tensors"


def validate_artifact(
    path: str | Path,
    data: str,
    limit: int | None = None,
    threads: int | None = None,
    executor: Executor | None = None,
    shard_images: int = 512,
) -> dict[str, Any]:
    """Top-1/top-5 of a built artifact on ``data``; the result is also stored in its manifest.

    With an executor other than the local one, the images are validated in shards as its tasks."""
    artifact = Artifact(Path(path))
    target = get_target(artifact.manifest["target"])
    if executor is None or executor.name == "local":
        images, labels, key = labelled_images(path, data, limit)
        result = run_validation(target, artifact, images, labels, None, threads)
        result["skipped"] = len(images.skipped)
    else:  # nothing is decoded here: the workers decode their shards
        selection = labelled_selection(path, data, limit)
        key = selection.key
        result = validate_sharded(executor, target, artifact, selection, None, threads, shard_images, {"CPU": 1.0})
    result["dataset"] = data
    store_validation(artifact, key[:16], result)
    return result
