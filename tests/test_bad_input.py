"""The bad-input matrix: every case runs the real CLI in a subprocess on a tiny T2T-ViT-7 (32 px, 10 classes).

A bad input must give exactly one line on stderr starting with `error:`, a non-zero exit and no partial
artifact (no staging directory, no temp file, no artifact directory whose manifest does not match its
files). Inputs that must work (grayscale / CMYK / RGBA images, a rerun after SIGKILL, two builds at once)
must succeed with artifact files identical to an uninterrupted build. The README's Reliability section
lists the matrix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from t2tedge.models import get_spec, save_checkpoint
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.store import MANIFEST, ArtifactStore, sha256_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
# Runs the CLI after optionally hiding modules (BLOCK_MODULES: as if not installed) and pausing the
# onnxruntime INT8 build once its model.onnx is in the staging directory (PAUSE_MARKER is written, then
# the process waits for PAUSE_RELEASE to exist), so a test can kill it or race it at a known point.
CLI_WRAPPER = """
import os, sys, time
from pathlib import Path
for name in filter(None, os.environ.get("BLOCK_MODULES", "").split(",")):
    sys.modules[name] = None
if os.environ.get("PAUSE_MARKER"):
    import t2tedge.calibration.accuracy_aware as target
    quantize = target.quantize_with_budget
    def paused(*args, **kwargs):
        facts = quantize(*args, **kwargs)
        Path(os.environ["PAUSE_MARKER"]).write_text(str(os.getpid()))
        while not Path(os.environ.get("PAUSE_RELEASE", "/nonexistent")).exists():
            time.sleep(0.05)
        return facts
    target.quantize_with_budget = paused
from t2tedge.cli import main
sys.argv[0] = "t2tedge"
main()
"""
PRECISIONS = ["fp32", "int8"]
ARTIFACT_NAME = re.compile(r"[a-z0-9-]+-[0-9a-f]{8}")


def _cli(*args: str | Path, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLI_WRAPPER, *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=180,
        **kwargs,
    )


@pytest.fixture
def cli_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The console entry point run in this process: same `main()`, without paying ~4 s of imports per case.

    Used for inputs refused before any build work; cases that build, kill, race or limit a process use `_cli`.
    """
    from t2tedge.cli import main

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        monkeypatch.setattr(sys, "argv", ["t2tedge", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(sys.argv, exit_info.value.code, captured.out, captured.err)

    return run


def _start(*args: str | Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", CLI_WRAPPER, *map(str, args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**ENV, **(env or {})},
        )


def _wait_for(condition: Any, what: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _one_line_error(result: subprocess.CompletedProcess[str], *expected: str, after_progress: bool = False) -> str:
    """The error line; it must be stderr's only line, or (``after_progress``) the last after status lines."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and [line.startswith("error:") for line in lines].count(True) == 1
    assert len(lines) == 1 or after_progress, result.stderr
    assert lines[-1].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def _artifacts(root: Path, staging_allowed: bool = False) -> dict[str, Path]:
    """The finished artifacts under ``root`` ('model/target/name' -> dir), after checking nothing is partial.

    Partial means: a temp file, a staging directory (unless allowed: a SIGKILLed build leaves its hidden
    staging directory for the next build to remove), or an artifact directory whose manifest is missing,
    unreadable, or does not match the files beside it.
    """
    if not root.exists():
        return {}
    temps = [p for p in root.rglob("*") if p.name.endswith(".tmp") or (".staging-" in p.name and not staging_allowed)]
    assert temps == [], temps
    found = {}
    for path in sorted(root.glob("*/*/*")):  # <model>/<target>/<precision>-<hash8>
        if not (path.is_dir() and ARTIFACT_NAME.fullmatch(path.name) and not path.parts[-3].startswith(".")):
            continue
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["artifact"] == path.name and manifest["files"], path
        for name, fact in manifest["files"].items():
            assert sha256_file(path / name) == fact["sha256"], path / name
        found[path.relative_to(root).as_posix()] = path
    return found


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        f"{key}/{name}": fact["sha256"]
        for key, path in _artifacts(root).items()
        for name, fact in json.loads((path / MANIFEST).read_text())["files"].items()
    }


def _checkpoint(path: Path, name: str = "t2t_vit_7", meta: bool = True, **extra: Any) -> Path:
    torch.manual_seed(0)
    model = get_spec(name).create(num_classes=10, image_size=32)
    if meta:
        pre = Preprocess(input_size=32, resize_size=32, interpolation="bilinear")
        info = {"model": name, "classes": [str(i) for i in range(10)], "preprocess": pre.to_dict()}
        save_checkpoint(path, model, info)
    else:
        torch.save({"state_dict": model.state_dict(), **extra}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("weights") / "t2t_vit_7.pt")


def _recipe(folder: Path, weights: Path, **changes: Any) -> Path:
    """A recipe building onnxruntime fp32 + int8 of the tiny model into ``folder/artifacts`` in seconds."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(folder / "artifacts"),
        "models": [{"name": "t2t_vit_7", "weights": str(weights), "image_size": 32}],
        "targets": ["onnxruntime"],
        "precisions": PRECISIONS,
        "data": {"limit": 20},
        "export": {"parity_images": 4},
        "calibration": {"size": 16},
        "benchmark": {"enabled": False},
        "threads": 1,
    }
    for key, value in changes.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """An uninterrupted build: the artifact store others are compared with."""
    folder = tmp_path_factory.mktemp("reference")
    result = _cli("build", _recipe(folder, checkpoint))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder / "artifacts"


# --- checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_checkpoint(tmp_path: Path, checkpoint: Path, damage: str, cli_here: Any) -> None:
    bad = tmp_path / "bad.pt"
    data = checkpoint.read_bytes()
    bad.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    line = _one_line_error(cli_here("build", _recipe(tmp_path, bad)), str(bad), "not a readable checkpoint")
    assert "truncated or corrupt" in line or damage == "garbage"
    assert not (tmp_path / "artifacts").exists()


def test_checkpoint_of_another_architecture(tmp_path: Path, cli_here: Any) -> None:
    # A bare official-layout T2T-ViT-7 state dict (no metadata saying what it is) given as T2T-ViT-12.
    weights = _checkpoint(tmp_path / "t2t_vit_7.pth", meta=False)
    recipe = _recipe(tmp_path, weights, models=[{"name": "t2t_vit_12", "weights": str(weights), "image_size": 32}])
    _one_line_error(cli_here("build", recipe), "does not fit t2t_vit_12", "missing (e.g. blocks.7.")
    assert not (tmp_path / "artifacts").exists()


class _RunsCode:
    """Pickles as a call of exec(): torch.load without weights_only would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pickle code ran')",))


def test_pickle_checkpoint_is_refused_without_running_code(tmp_path: Path, cli_here: Any) -> None:
    marker = tmp_path / "pwned"
    weights = _checkpoint(tmp_path / "evil.pt", meta=False, payload=_RunsCode(marker))
    _one_line_error(cli_here("build", _recipe(tmp_path, weights)), "refused", "needs pickled Python code")
    assert not marker.exists()
    assert not (tmp_path / "artifacts").exists()
    torch.load(weights, weights_only=False)  # the file really is dangerous: a plain unpickle runs it
    assert marker.read_text() == "pickle code ran"


# --- calibration images ----------------------------------------------------------------------------------


def test_empty_calibration_folder(tmp_path: Path, checkpoint: Path, cli_here: Any) -> None:
    (tmp_path / "calib").mkdir()
    recipe = _recipe(tmp_path, checkpoint, data={"calibration": str(tmp_path / "calib")})
    _one_line_error(cli_here("build", recipe), f"dataset folder {tmp_path / 'calib'} is empty")
    assert not (tmp_path / "artifacts").exists()


def test_calibration_folder_with_only_non_images(tmp_path: Path, checkpoint: Path, cli_here: Any) -> None:
    folder = tmp_path / "calib" / "shirts"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "photo.jpg").write_text("text with an image's extension")
    (folder / "weights.bin").write_bytes(os.urandom(256))
    recipe = _recipe(tmp_path, checkpoint, data={"calibration": str(tmp_path / "calib")})
    # listing reads names only: photo.jpg is found out when the first images are decoded, after the model loaded
    _one_line_error(cli_here("build", recipe), "has no readable images (3 files skipped)", after_progress=True)
    assert _artifacts(tmp_path / "artifacts") == {}  # nothing finished, nothing partial


def test_grayscale_cmyk_rgba_images_build(tmp_path: Path, checkpoint: Path) -> None:
    rng = np.random.default_rng(0)
    modes = {"L": "png", "CMYK": "jpg", "RGBA": "png", "LA": "png", "P": "png", "I;16": "png"}
    count = 0
    for label in ("coats", "shirts"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for mode, ext in modes.items():
            for i in range(2):
                rgb = Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
                image = rgb.convert("I;16") if mode == "I;16" else rgb.convert(mode)
                image.save(tmp_path / "images" / label / f"{mode.replace(';', '')}-{i}.{ext}")
                count += 1
    images = str(tmp_path / "images")
    # one folder for both: allowed only when the recipe says so, and every affected number is marked
    data = {"calibration": images, "validation": images, "limit": None, "allow_overlap": True}
    recipe = _recipe(tmp_path, checkpoint, data=data)
    result = _cli("build", recipe)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    built = _artifacts(tmp_path / "artifacts")
    assert sorted(k.split("/")[1] for k in built) == ["export", "onnxruntime", "onnxruntime"]
    int8 = next(p for k, p in built.items() if "/int8-" in k)
    manifest = json.loads((int8 / MANIFEST).read_text())
    assert manifest["calibration"]["size"] == 16
    (accuracy,) = manifest["validation"].values()
    assert accuracy["images"] == count and np.isfinite(accuracy["top1"])
    assert accuracy["calibration_overlap"] == 16


# --- names -------------------------------------------------------------------------------------------------


def test_unknown_target(tmp_path: Path, checkpoint: Path, cli_here: Any) -> None:
    result = cli_here("build", _recipe(tmp_path, checkpoint), "--target", "tflite")
    _one_line_error(result, "unknown target 'tflite'", "onnxruntime", "openvino")
    assert not (tmp_path / "artifacts").exists()


def test_unknown_precision(tmp_path: Path, checkpoint: Path, cli_here: Any) -> None:
    result = cli_here("build", _recipe(tmp_path, checkpoint), "--precision", "int4")
    _one_line_error(result, "no precision 'int4'", "fp32, int8")
    assert not (tmp_path / "artifacts").exists()


# --- toolchains --------------------------------------------------------------------------------------------


def test_target_whose_toolchain_is_missing(tmp_path: Path, checkpoint: Path) -> None:
    recipe = _recipe(tmp_path, checkpoint, targets=["onnxruntime", "openvino"], precisions=["fp32"])
    result = _cli("build", recipe, env={"BLOCK_MODULES": "openvino"})
    _one_line_error(result, "openvino cannot build here", "not installed", "pip install openvino")
    assert not (tmp_path / "artifacts").exists()  # refused before any export or onnxruntime build


def test_tensorrt_engine_without_tensorrt(reference: Path) -> None:
    # A tensorrt fp16 artifact is the exported graph plus scripts; the engine build needs TensorRT and a GPU.
    (export,) = (path for key, path in _artifacts(reference).items() if key.startswith("t2t_vit_7/export/"))
    with ArtifactStore(reference).build("t2t_vit_7", "tensorrt", "fp16", {"export": export.name}) as job:
        shutil.copyfile(export / "model.onnx", job.dir / "model.onnx")
    before = sorted(p.relative_to(reference) for p in reference.rglob("*"))
    line = _one_line_error(_cli("tensorrt-engine", job.final, env={"BLOCK_MODULES": "tensorrt"}))
    assert "cannot build a TensorRT engine" in line and "build_engine.py" in line
    assert sorted(p.relative_to(reference) for p in reference.rglob("*")) == before  # no engine, no cache dir


# --- interrupted, concurrent and starved builds ---------------------------------------------------------------


def _manifest_differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _manifest_differences(a.get(k), b.get(k), f"{path}.{k}")]
    return [path.lstrip(".")] if a != b else []


# Timings, a build's own clock, and whether calibration images came from the cache (the killed build
# filled it) may differ between two builds of the same inputs; nothing else in a manifest may.
VOLATILE = ("created", "seconds", "cached")


def test_sigkill_mid_build_then_rerun(tmp_path: Path, checkpoint: Path, reference: Path) -> None:
    recipe, marker = _recipe(tmp_path, checkpoint), tmp_path / "paused"
    out = tmp_path / "artifacts"
    proc = _start("build", recipe, log=tmp_path / "killed.log", env={"PAUSE_MARKER": str(marker)})
    try:
        _wait_for(marker.exists, "the int8 build to reach its staging directory", proc, tmp_path / "killed.log")
        staging = list(out.glob("t2t_vit_7/onnxruntime/.int8-*.staging-*"))
        assert len(staging) == 1 and (staging[0] / "model.onnx").is_file()  # written, manifest not yet
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = _artifacts(out, staging_allowed=True)
    assert sorted(k.split("/")[2].split("-")[0] for k in partial) == ["fp32", "onnx"]  # int8 never appeared

    rerun = _cli("build", recipe)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    assert "export: reused" in rerun.stderr and "onnxruntime/fp32: reused" in rerun.stderr
    assert "onnxruntime/int8: built" in rerun.stderr
    hashes, expected = _file_hashes(out), _file_hashes(reference)
    assert len(hashes) == 3 and hashes == {k: v for k, v in expected.items() if "/tensorrt/" not in k}
    for key, path in _artifacts(out).items():
        ours = json.loads((path / MANIFEST).read_text())
        theirs = json.loads((reference / key / MANIFEST).read_text())
        differences = _manifest_differences(ours, theirs)
        assert all(d.rsplit(".", 1)[-1].endswith(VOLATILE) for d in differences), (key, differences)


def test_two_concurrent_builds_into_one_directory(tmp_path: Path, checkpoint: Path, reference: Path) -> None:
    recipe, marker, release = _recipe(tmp_path, checkpoint), tmp_path / "paused", tmp_path / "release"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _start("build", recipe, log=first_log, env={"PAUSE_MARKER": str(marker), "PAUSE_RELEASE": str(release)})
    second = None
    try:
        # The second starts once the first holds the int8 artifact's lock (started together, the second
        # could win every lock and the first would never reach its pause).
        _wait_for(marker.exists, "the first build to hold the int8 artifact", first, first_log)
        second = _start("build", recipe, log=second_log)
        waiting = "waiting for another build holding .int8-"
        _wait_for(lambda: waiting in second_log.read_text(), "the second to wait", second, second_log)
        release.write_text("go")
        assert first.wait(timeout=180) == 0, first_log.read_text()[-4000:]
        assert second.wait(timeout=180) == 0, second_log.read_text()[-4000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert "onnxruntime/int8: built" in first_log.read_text()
    assert "onnxruntime/int8: reused" in second_log.read_text()
    hashes = _file_hashes(tmp_path / "artifacts")
    assert hashes == {k: v for k, v in _file_hashes(reference).items() if "/tensorrt/" not in k}


def _limit_file_size() -> None:
    # Writes past 8 MB fail with EFBIG (as a full disk fails them with ENOSPC) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))


def test_disk_full_during_artifact_write(tmp_path: Path, checkpoint: Path, reference: Path) -> None:
    recipe = _recipe(tmp_path, checkpoint, precisions=["fp32"])
    out = tmp_path / "artifacts"
    # Start from the reference's export (and cache), so the write that fails is the onnxruntime artifact's.
    shutil.copytree(reference / "t2t_vit_7" / "export", out / "t2t_vit_7" / "export")
    shutil.copytree(reference / ".cache", out / ".cache")
    result = _cli("build", recipe, preexec_fn=_limit_file_size)  # its 16 MB model.onnx cannot be written
    line = _one_line_error(result, os.strerror(errno.EFBIG), "unfinished artifacts", after_progress=True)
    assert "onnxruntime" in line, line
    assert [key.split("/")[1] for key in _artifacts(out)] == ["export"]  # and no fp32 directory, staging or temp
    rerun = _cli("build", recipe)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    assert sorted(k.split("/")[1] for k in _artifacts(out)) == ["export", "onnxruntime"]


def test_disk_full_while_caching_tensors_leaves_no_half_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Cached tensors (preprocessed images, FP32 reference logits) are reused by later builds: half a file
    # there would poison every rerun, so they are written like artifacts, to a temp file renamed at the end.
    from t2tedge.data import cache

    def disk_full(fh: Any, array: np.ndarray) -> None:
        fh.write(b"\x93NUMPY half a header")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache.np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cache.save_array(tmp_path / "reference" / "logits.npy", np.zeros((2, 10), np.float32))
    assert list((tmp_path / "reference").iterdir()) == []
