"""An artifact on disk: its directory, its manifest and the files it lists, each with its sha256.

The leaf both sides use: the pipeline's store writes artifacts, targets read them. A file is loaded
only after :meth:`Artifact.verify` found it byte for byte what the build wrote (a copy, a partial scp
or an edit is refused, and nothing in an artifact is ever unpickled).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
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


def list_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``directory`` (inside sub-directories such as .mlpackage too) but the manifest,
    with its size and sha256: the manifest's ``files`` section, what :meth:`Artifact.verify` checks."""
    return {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@dataclass(frozen=True)
class Artifact:
    """A finished artifact directory and its manifest."""

    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    def verify(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Check files (default: every file the manifest lists) against the manifest's sha256.

        Returns each checked file's sha256; raises :class:`ArtifactError` naming the first file that is
        missing, changed or not listed.
        """
        listed = self.manifest.get("files", {})
        verified = {}
        for name in listed if names is None else names:
            entry = listed.get(name)
            path = self.path / name
            if not isinstance(entry, dict) or "sha256" not in entry:
                raise ArtifactError(f"{path} is not in the artifact's manifest; rebuild the artifact")
            if not path.is_file():
                raise ArtifactError(f"{path} is missing; copy the whole artifact directory or rebuild it")
            if sha256_file(path) != entry["sha256"]:
                raise ArtifactError(
                    f"{path} changed since it was built (sha256 differs from the manifest); re-copy or rebuild it"
                )
            verified[name] = entry["sha256"]
        return verified

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
