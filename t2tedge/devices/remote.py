"""Run artifacts on a registered device: copy what is missing (hash-checked), run, bring the numbers back.

On the device everything lives under its work directory::

    artifacts/<hash16>/...    the files an artifact's target needs (hash16: of their names and sha256s)
    data/<sha16>/images.npy   a shard of preprocessed validation tensors (deleted once its logits are back)
    engines/                  TensorRT engines built there, keyed by ONNX sha256, TensorRT version and GPU
    incoming/<id>/            uploads in flight; a file moves into place only after its sha256 matched
    run/<id>.pid              the pid of a running command, so a timed-out one can be killed

Before each run the device re-hashes the files it holds, so an interrupted or corrupted copy is sent again.
:mod:`t2tedge.devices.remote_runner` is the script that runs there.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.artifact import Artifact, read_manifest, sha256_file
from t2tedge.devices.config import Device, get_device
from t2tedge.devices.remote_runner import FIXED_BATCH_REASON
from t2tedge.devices.ssh import DeviceDiskFullError, DeviceError, Ssh, quote_path
from t2tedge.evaluation.accuracy import MEASURED, UNAVAILABLE, accuracy_report
from t2tedge.progress import track
from t2tedge.targets import Target, get_target, list_targets, loader_source, payload_files

RUNNER_SOURCE = Path(__file__).with_name("remote_runner.py").read_bytes()
# What each target's runner reads from the artifact directory (a directory is sent with all its files).
INFO_TIMEOUT_S = 60.0
# images per validation shard sent to a device: 256 at 224 px is 154 MB of float32 (an 8 GB Jetson holds it)
SHARD_IMAGES = 256
CHECK_TIMEOUT_S = 120.0
# Headroom kept free on the device beyond the bytes being uploaded.
DISK_MARGIN_BYTES = 16 << 20


def runtimes_wanted(targets: list[Target]) -> dict[str, dict[str, Any]]:
    """What the device runner checks per target: the runtime module and the systems it runs on."""
    return {
        t.name: {"module": t.capabilities.device_runtime, "systems": list(t.capabilities.device_systems)}
        for t in targets
    }


def artifact_files(path: Path, target: str) -> dict[str, Path]:
    """The files of an artifact its target needs on the device, by path relative to the artifact."""
    files = payload_files(get_target(target), Artifact(path))
    # ONNX external data (large models) travels with the graph.
    files.update({p.name: p for p in sorted(path.glob("model.onnx.*")) if p.is_file() and "model.onnx" in files})
    return files


class RemoteDevice:
    """One registered device: its facts, its hash-checked file cache, and runs of the remote runner."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.ssh = Ssh(device)

    def _python(self, command: str, request: dict[str, Any], timeout_s: float) -> dict:
        """Pipe the runner into the device's python, run ``command``, return its JSON answer."""
        encoded = base64.b64encode(json.dumps(request).encode()).decode()
        line = f"{quote_path(self.device.python)} - {command} {encoded}"
        pid_dir = f"{self.device.workdir}/run"
        result = self.ssh.run_tracked(line, timeout_s, RUNNER_SOURCE, pid_dir, f"the remote runner ({command})")
        stdout = result.stdout.decode(errors="replace").strip().splitlines()
        stderr = [s for s in result.stderr.decode(errors="replace").strip().splitlines() if s.strip()]
        try:
            answer = json.loads(stdout[-1])
        except (IndexError, json.JSONDecodeError):
            name = self.device.name
            if result.returncode == 125:
                raise DeviceError(f"device {name}: cannot write to its work directory {self.device.workdir}") from None
            if result.returncode == 127:
                raise DeviceError(
                    f"device {name}: python {self.device.python!r} not found there "
                    f"(t2tedge device add {name} URL --python PATH --replace)"
                ) from None
            detail = stderr[-1] if stderr else f"exit status {result.returncode}"
            raise DeviceError(f"device {name}: the remote runner failed: {detail}") from None
        if not answer.get("ok"):
            message = f"device {self.device.name}: {answer.get('message', 'unknown error')}"
            if answer.get("kind") == "disk_full":
                raise DeviceDiskFullError(f"{message} (work directory {self.device.workdir})")
            raise DeviceError(message)
        return answer

    def info(self, targets: list[str] | None = None, timeout_s: float = INFO_TIMEOUT_S) -> dict[str, Any]:
        """Host facts and which target runtimes import there, with versions."""
        wanted = [get_target(t) for t in targets] if targets else list_targets()
        return self._python("info", {"runtimes": runtimes_wanted(wanted)}, timeout_s)["host"]

    def sync(
        self, files: dict[str, Path], timeout_s: float, known: dict[str, str] | None = None
    ) -> tuple[dict[str, str], str | None, dict[str, int]]:
        """Make ``files`` (remote path relative to the work directory -> local file) present on the device.

        ``known``: sha256s already computed (e.g. verified against a manifest), by remote path.
        Returns their sha256s, the id of the upload still to be moved into place by the next run (None when
        everything was there already) and transfer counts.
        """
        known = known or {}
        shas = {relative: known.get(relative) or sha256_file(local) for relative, local in files.items()}
        answer = self._python("check", {"workdir": self.device.workdir, "files": shas}, min(timeout_s, CHECK_TIMEOUT_S))
        missing = answer["missing"]
        size = sum(files[relative].stat().st_size for relative in missing)
        stats = {"uploaded_files": len(missing), "uploaded_bytes": size, "reused_files": len(files) - len(missing)}
        if not missing:
            return shas, None, stats
        if size + DISK_MARGIN_BYTES > answer["free_bytes"]:
            raise DeviceDiskFullError(
                f"device {self.device.name}: no space left for {size / 2**20:.1f} MiB in {self.device.workdir} "
                f"({answer['free_bytes'] / 2**20:.1f} MiB free); free space there or choose another --workdir"
            )
        upload = uuid.uuid4().hex
        incoming = f"{self.device.workdir}/incoming/{upload}"
        with tempfile.TemporaryFile() as fh:
            with tarfile.open(fileobj=fh, mode="w") as tar:
                for relative in missing:
                    tar.add(files[relative], arcname=relative, recursive=False)
            fh.seek(0)
            command = f"mkdir -p {quote_path(incoming)} && tar -xf - -C {quote_path(incoming)}"
            result = self.ssh.run(command, timeout_s, fh, what=f"copying {size / 2**20:.1f} MiB")
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()
            with contextlib.suppress(DeviceError):
                self.ssh.run(f"rm -rf {quote_path(incoming)}", CHECK_TIMEOUT_S)
            if "No space left" in detail or "Disk quota" in detail:
                raise DeviceDiskFullError(
                    f"device {self.device.name}: no space left in {self.device.workdir} while copying "
                    f"{size / 2**20:.1f} MiB; free space there or choose another --workdir"
                )
            last = detail.splitlines()[-1] if detail else f"exit status {result.returncode}"
            raise DeviceError(f"device {self.device.name}: copying files failed: {last}")
        return shas, upload, stats

    def execute(
        self, artifact_dir: Path, mode: str, timeout_s: float, images: np.ndarray | None = None, **settings: Any
    ) -> dict[str, Any]:
        """Copy the artifact (and images) over, run ``mode`` (latency / logits) there, return the answer."""
        manifest = read_manifest(artifact_dir)
        target = manifest.get("target", "")
        local = artifact_files(Path(artifact_dir), target)
        # what leaves for the device is byte for byte what the build wrote (the device re-checks each hash)
        verified = Artifact(Path(artifact_dir)).verify(local)
        listing = json.dumps(sorted(verified.items()))
        remote_dir = f"artifacts/{hashlib.sha256(listing.encode()).hexdigest()[:16]}"
        files = {f"{remote_dir}/{name}": p for name, p in local.items()}
        known = {f"{remote_dir}/{name}": sha for name, sha in verified.items()}
        with tempfile.TemporaryDirectory(prefix="t2tedge-remote-") as tmp:
            request: dict[str, Any] = {}
            if images is not None:
                tensor = Path(tmp) / "images.npy"
                np.save(tensor, np.ascontiguousarray(images, dtype=np.float32))
                request["images"] = f"data/{sha256_file(tensor)[:16]}/images.npy"
                files[request["images"]] = tensor
            shas, upload, transfer = self.sync(files, timeout_s, known)
        onnx = f"{remote_dir}/model.onnx"
        request.update(
            {
                "workdir": self.device.workdir,
                "files": shas,
                "upload": upload,
                "target": target,
                "loader": loader_source(get_target(target).capabilities),
                "runtimes": runtimes_wanted([get_target(target)]),
                "artifact": remote_dir,
                "mode": mode,
                "build": manifest.get("build", {}),
                "image_size": manifest.get("model_io", {}).get("image_size"),
                "model_sha256": shas.get(onnx),
                # The device ends the runner itself a little after the local side gave up on it.
                "deadline_s": int(timeout_s) + 30,
                **settings,
            }
        )
        answer = self._python("run", request, timeout_s)
        answer["transfer"] = transfer
        answer["host"] = {"device": self.device.name, **answer["host"]}
        if "unavailable" in answer:
            answer["unavailable"] = answer["unavailable"].replace("{device}", self.device.name)
        return answer


def fixed_batch(artifact_dir: Path) -> int | None:
    """The batch size an artifact's input is fixed to, from its manifest or its ONNX graph (None: dynamic/unknown)."""
    manifest = read_manifest(artifact_dir)
    shape = manifest.get("build", {}).get("input", {}).get("shape")
    if shape is None and "model.onnx" in artifact_files(Path(artifact_dir), manifest.get("target", "")):
        import onnx

        graph = onnx.load(str(Path(artifact_dir) / "model.onnx"), load_external_data=False).graph
        dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    if shape and isinstance(shape[0], int) and shape[0] > 0:
        return shape[0]
    return None


def check_device(name: str, timeout_s: float = INFO_TIMEOUT_S) -> dict[str, Any]:
    """Connect to a registered device and report its OS, CPU/GPU, python and target runtimes."""
    return RemoteDevice(get_device(name)).info(timeout_s=timeout_s)


def remote_latency(
    device_name: str,
    artifact_dir: Path,
    batch: int,
    threads: int | None,
    warmup: int,
    min_iters: int,
    min_seconds: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Per-iteration latencies (s) of an artifact timed on a device, with the device's facts.

    Returns ``seconds``, ``host``, ``label`` (measured / unavailable), ``reason`` when unavailable, and
    ``runtime`` (what the runtime actually used: precision, threads, engine). Unreachable devices,
    timeouts and full disks raise one-line :class:`~t2tedge.devices.ssh.DeviceError` s.
    """
    fixed = fixed_batch(Path(artifact_dir))
    if fixed is not None and fixed != batch:
        # Refused here, before any copy; the runner refuses it too where the manifest could not tell.
        get_device(device_name)
        return {
            "host": {"device": device_name},
            "transfer": {"uploaded_files": 0, "uploaded_bytes": 0, "reused_files": 0},
            "batch": batch,
            "seconds": [],
            "label": UNAVAILABLE,
            "reason": FIXED_BATCH_REASON.format(fixed=fixed),
            "runtime": {},
        }
    settings = {"batch": batch, "threads": threads, "warmup": warmup, "min_iters": min_iters}
    answer = RemoteDevice(get_device(device_name)).execute(
        Path(artifact_dir), "latency", timeout_s, min_seconds=min_seconds, **settings
    )
    result = {"host": answer["host"], "transfer": answer["transfer"], "batch": batch}
    if "unavailable" in answer:
        return {**result, "seconds": [], "label": UNAVAILABLE, "reason": answer["unavailable"], "runtime": {}}
    result.update({"seconds": answer["seconds"], "label": MEASURED, "runtime": answer["runtime"]})
    if answer.get("gpu_compute_seconds"):
        result["gpu_compute_seconds"] = answer["gpu_compute_seconds"]
    return result


def remote_logits(
    device_name: str,
    artifact_dir: Path,
    images: Any,
    threads: int | None,
    timeout_s: float,
    shard_images: int = SHARD_IMAGES,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Logits of ``images`` (an array or a streamed ``PixelSet``) computed on a device, and how (label,
    host, runtime, transfer). The images go over in shards of ``shard_images``, each deleted on the device
    once its logits are back, so neither side holds more than one shard."""
    remote = RemoteDevice(get_device(device_name))
    outs: list[np.ndarray] = []
    transfer: list[dict[str, Any]] = []
    answer: dict[str, Any] = {}
    starts = range(0, len(images), shard_images)
    for start in track(starts, f"validating on {device_name}", total=len(starts)):
        shard = np.ascontiguousarray(images[start : start + shard_images], dtype=np.float32)
        answer = remote.execute(Path(artifact_dir), "logits", timeout_s, images=shard, threads=threads, discard=True)
        transfer.append(answer["transfer"])
        if "unavailable" in answer:
            info = {"host": answer["host"], "transfer": answer["transfer"]}
            return None, {**info, "label": UNAVAILABLE, "reason": answer["unavailable"], "runtime": {}}
        outs.append(np.load(io.BytesIO(base64.b64decode(answer["logits_npy_b64"]))))
    info = {"host": answer["host"], "transfer": transfer[0] if len(transfer) == 1 else transfer, "shards": len(outs)}
    return np.concatenate(outs), {**info, "label": MEASURED, "runtime": answer["runtime"]}


def validate_artifact_remote(
    path: str | Path,
    data: str,
    device_name: str,
    limit: int | None = None,
    threads: int | None = None,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Like :func:`t2tedge.pipeline.validate.validate_artifact`, with the artifact run on a device.

    The images are preprocessed here (the model's own transform, the same tensor cache), streamed to the
    device in shards, and the logits come back; the result is stored in the manifest under
    ``<tensor key>@<device>`` beside the local validations.
    """
    from t2tedge.pipeline.validate import labelled_images

    get_device(device_name)  # an unknown device fails before any image is read
    images, labels, key = labelled_images(path, data, limit)
    logits, info = remote_logits(device_name, Path(path), images, threads, timeout_s)
    if logits is None:
        result: dict[str, Any] = {"label": UNAVAILABLE, "reason": info["reason"]}
    else:
        result = accuracy_report(logits, labels, MEASURED)
    result.update({"dataset": data, "device": device_name, "host": info["host"], "runtime": info["runtime"]})
    Artifact(Path(path)).update_manifest(validation={f"{key[:16]}@{device_name}": result})
    return result
