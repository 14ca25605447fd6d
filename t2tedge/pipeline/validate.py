"""Re-validate an existing artifact on another labelled dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.calibration import select_indices
from t2tedge.data.cache import cached_preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.errors import ArtifactError, DatasetError
from t2tedge.evaluation import host as this_host
from t2tedge.evaluation.accuracy import MEASURED, accuracy_report, run_batched, unavailable
from t2tedge.evaluation.host import host_label
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.store import Artifact, read_manifest
from t2tedge.targets import Target, get_target, load_verified


def run_validation(
    target: Target,
    artifact: Artifact,
    images: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Accuracy of an artifact, labelled measured / emulated / unavailable by what could run it here."""
    availability = target.availability()
    if not (availability.can_run or availability.can_emulate):
        return unavailable(availability.reason)
    runner = load_verified(target, artifact, threads)
    note = (runner.emulation or "") if runner.label != MEASURED else ""
    result = accuracy_report(run_batched(runner, images), labels, runner.label, reference, note=note)
    result["runtime"] = dict(runner.runtime_facts)
    return result


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


def labelled_images(path: str | Path, data: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The artifact's model transform applied to a labelled dataset: (images, labels, tensor cache key).

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
    cache = tensor_cache_dir(Path(path), manifest)
    images, key, _ = cached_preprocess(
        dataset, indices, Preprocess.from_dict(io["preprocess"]), cache, "validation images"
    )
    return images, dataset.labels[indices], key


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
    path: str | Path, data: str, limit: int | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Top-1/top-5 of a built artifact on ``data``; the result is also stored in its manifest."""
    images, labels, key = labelled_images(path, data, limit)
    artifact = Artifact(Path(path))
    result = run_validation(get_target(artifact.manifest["target"]), artifact, images, labels, None, threads)
    result["dataset"] = data
    store_validation(artifact, key[:16], result)
    return result
