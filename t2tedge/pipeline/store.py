"""Artifact store: one directory per artifact, named by the hash of what went into it.

`<root>/<model>/<target>/<precision>-<hash8>/` holds the artifact files and `manifest.json`.
A build writes into a hidden staging directory and renames it into place only when complete, so an
interrupted build (Ctrl-C, SIGKILL, full disk) never leaves a directory that looks finished. A file
lock per artifact makes a second concurrent build of the same artifact wait, then reuse the result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2tedge.errors import ArtifactError

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hash(inputs: dict[str, Any]) -> str:
    """Hex sha256 of a JSON-able description of a stage's inputs (key order does not matter)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Artifact:
    """A finished artifact directory and its manifest."""

    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def update_manifest(self, **sections: Any) -> None:
        """Merge sections (e.g. validation results) into the manifest, atomically.

        The read-modify-write holds the artifact's manifest lock, so a ``bench`` and a ``validate``
        updating the same artifact at once keep each other's sections.
        """
        # A lock file of its own: a build holding the artifact's build lock may update the manifest.
        with _locked(self.path.parent / f".{self.path.name}.manifest.lock", waiting=None):
            data = self.manifest
            for key, value in sections.items():
                if isinstance(value, dict) and isinstance(data.get(key), dict):
                    data[key] = {**data[key], **value}
                else:
                    data[key] = value
            write_json(self.path / MANIFEST, data)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory; a clear error when it is not one."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{path} is not a t2tedge artifact (no {MANIFEST})")
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest} is corrupt ({exc.msg})") from None


class ArtifactStore:
    """Content-addressed artifact directories under one root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def artifact_dir(self, model: str, target: str, precision: str, key: str) -> Path:
        return self.root / model / target / f"{precision}-{key[:8]}"

    def find(self, model: str, target: str, precision: str, key: str) -> Artifact | None:
        """The finished artifact for these inputs, if one exists."""
        path = self.artifact_dir(model, target, precision, key)
        return Artifact(path) if (path / MANIFEST).is_file() else None

    @contextlib.contextmanager
    def build(self, model: str, target: str, precision: str, inputs: dict[str, Any]) -> Iterator[BuildJob]:
        """Reserve the artifact for ``inputs`` and yield a :class:`BuildJob`.

        When ``job.done`` is already true the artifact exists and nothing is to be done. Otherwise
        the caller writes its files into ``job.dir`` and its facts into ``job.manifest``; on normal
        exit the manifest is completed and the directory renamed into place, on any error the
        staging directory is removed and nothing is left behind.
        """
        key = content_hash(inputs)
        final = self.artifact_dir(model, target, precision, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(final.parent / f".{final.name}.lock"):
            if (final / MANIFEST).is_file():
                yield BuildJob(dir=final, final=final, manifest={}, done=True)
                return
            # We hold the lock, so any staging directory left for this artifact is from a dead build.
            for stale in final.parent.glob(f".{final.name}.staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a directory without manifest is never a finished artifact
                shutil.rmtree(final)
            staging = final.parent / f".{final.name}.staging-{os.getpid()}"
            staging.mkdir()
            job = BuildJob(dir=staging, final=final, manifest={})
            try:
                yield job
                data = {
                    "artifact": final.name,
                    "model": model,
                    "target": target,
                    "precision": precision,
                    "hash": key,
                    "inputs": inputs,
                    **job.manifest,
                    "files": {
                        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                        for p in sorted(staging.iterdir())
                        if p.is_file() and p.name != MANIFEST
                    },
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                }
                write_json(staging / MANIFEST, data)
                _fsync_tree(staging)
                staging.rename(final)
                job.dir = final
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class BuildJob:
    """One reserved artifact: write files into ``dir`` and facts into ``manifest``."""

    dir: Path
    final: Path
    manifest: dict[str, Any]
    done: bool = False

    @property
    def artifact(self) -> Artifact:
        return Artifact(self.final)


@contextlib.contextmanager
def _locked(lock_path: Path, waiting: str | None = "waiting for another build holding {name} ...") -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Another process holds it: wait for it (a build: then reuse what it wrote).
            if waiting:
                print(waiting.format(name=lock_path.name), flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
