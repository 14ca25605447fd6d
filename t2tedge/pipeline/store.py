"""Artifact store: one directory per artifact, named by the hash of what went into it.

`<root>/<model>/<target>/<precision>-<hash8>/` holds the artifact files and `manifest.json`.
A build writes into a hidden staging directory and renames it into place only when complete, so an
interrupted build (Ctrl-C, SIGKILL, full disk) never leaves a directory that looks finished. A file
lock per artifact makes a second concurrent build of the same artifact wait, then reuse the result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2tedge.artifact import (  # noqa: F401  (re-exported: the store's callers read artifacts too)
    MANIFEST,
    Artifact,
    _locked,
    content_hash,
    list_files,
    read_manifest,
    sha256_file,
    write_json,
)


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
                    # every file, inside directories (.mlpackage) too: what Artifact.verify checks before a load
                    "files": list_files(staging),
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


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
