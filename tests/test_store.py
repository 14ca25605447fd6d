"""Artifact store: content-addressed, atomic, locked."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from t2tedge.pipeline.store import MANIFEST, Artifact, ArtifactStore, content_hash


def test_content_hash_ignores_key_order() -> None:
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})


def test_build_writes_manifest_and_reuses(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    inputs = {"stage": "x", "n": 1}
    with store.build("m", "t", "fp32", inputs) as job:
        assert not job.done
        (job.dir / "model.bin").write_bytes(b"abc")
        job.manifest["facts"] = {"answer": 42}
    manifest = json.loads((job.final / MANIFEST).read_text())
    assert job.final.name == f"fp32-{content_hash(inputs)[:8]}"
    assert manifest["facts"] == {"answer": 42}
    assert manifest["files"]["model.bin"]["bytes"] == 3
    assert manifest["inputs"] == inputs
    with store.build("m", "t", "fp32", inputs) as again:
        assert again.done and again.final == job.final
    assert [p.name for p in job.final.parent.iterdir() if not p.name.endswith(".lock")] == [job.final.name]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(OSError), store.build("m", "t", "fp32", {"n": 1}) as job:
        (job.dir / "half.bin").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")
    leftovers = [p for p in (tmp_path / "m" / "t").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    assert store.find("m", "t", "fp32", content_hash({"n": 1})) is None


def _slow_build(root: str, marker: str) -> None:
    store = ArtifactStore(root)
    with store.build("m", "t", "fp32", {"n": 1}) as job:
        if not job.done:
            (job.dir / "a.bin").write_bytes(b"1")
            Path(marker).write_text("started")
            time.sleep(60)


def test_killed_build_is_discarded_and_rebuilt(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    proc = mp.get_context("spawn").Process(target=_slow_build, args=(str(tmp_path / "store"), str(marker)))
    proc.start()
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    store = ArtifactStore(tmp_path / "store")
    assert store.find("m", "t", "fp32", content_hash({"n": 1})) is None
    with store.build("m", "t", "fp32", {"n": 1}) as job:
        assert not job.done
        (job.dir / "a.bin").write_bytes(b"1")
    names = sorted(p.name for p in job.final.parent.iterdir() if not p.name.endswith(".lock"))
    assert names == [job.final.name]  # the dead build's staging directory was cleaned away


def _hold(root: str, marker: str, release: str) -> None:
    store = ArtifactStore(root)
    with store.build("m", "t", "fp32", {"n": 2}) as job:
        (job.dir / "a.bin").write_bytes(b"first")
        Path(marker).write_text("holding")
        while not Path(release).exists():
            time.sleep(0.05)


def test_second_build_waits_then_reuses(tmp_path: Path) -> None:
    marker, release = tmp_path / "holding", tmp_path / "release"
    proc = mp.get_context("spawn").Process(target=_hold, args=(str(tmp_path / "s"), str(marker), str(release)))
    proc.start()
    while not marker.exists():
        time.sleep(0.05)
    # Release the holder only after we are blocked on its lock: we must wait, then reuse its result.
    threading.Timer(1.0, release.write_text, ["go"]).start()
    started = time.perf_counter()
    with ArtifactStore(tmp_path / "s").build("m", "t", "fp32", {"n": 2}) as job:
        assert job.done
        assert (job.final / "a.bin").read_bytes() == b"first"
    assert time.perf_counter() - started >= 0.9
    proc.join()


def _update_many(path: str, writer: int, start: str, count: int) -> None:
    artifact = Artifact(Path(path))
    while not Path(start).exists():
        time.sleep(0.001)
    for i in range(count):
        # Nested sections (how validate and bench write) and top-level ones.
        artifact.update_manifest(validation={f"w{writer}-{i}": {"top1": i}}, **{f"section_w{writer}_{i}": i})


def test_concurrent_manifest_updates_keep_every_section(tmp_path: Path) -> None:
    with ArtifactStore(tmp_path).build("m", "t", "fp32", {"n": 3}) as job:
        (job.dir / "a.bin").write_bytes(b"1")
    start, writers, count = tmp_path / "start", 3, 40
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_update_many, args=(str(job.final), w, str(start), count)) for w in range(writers)]
    for proc in procs:
        proc.start()
    start.write_text("go")
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    manifest = json.loads((job.final / MANIFEST).read_text())
    expected = {f"w{w}-{i}" for w in range(writers) for i in range(count)}
    assert set(manifest["validation"]) == expected
    assert all(f"section_w{w}_{i}" in manifest for w in range(writers) for i in range(count))
    assert manifest["files"]["a.bin"]["bytes"] == 1  # the build's own sections survive too
