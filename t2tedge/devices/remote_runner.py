"""Runs a t2tedge artifact on a remote device. Self-contained: needs numpy and the target's runtime only.

t2tedge pipes this file over ssh into the device's python (``python - COMMAND REQUEST``), so nothing is
installed there; it imports nothing from t2tedge and keeps to Python 3.8 (JetPack 5). Commands:

- ``info REQUEST``: host facts and which runtimes import (with versions).
- ``check REQUEST``: sha256 of the cached files under the work directory; a file whose hash differs (an
  interrupted or corrupted copy) is deleted and reported missing, with the free space there.
- ``run REQUEST``: move freshly uploaded files from ``incoming/<id>/`` into place (each checked by hash),
  then time the artifact (``latency``) or compute logits for a tensor file (``logits``).

REQUEST is base64 JSON. The answer is one JSON line on stdout; whatever the runtimes print goes to stderr.

Loading code is not here: each target's module has one ``device_load(kit, directory, request)`` that
t2tedge's own ``load()`` calls locally, and ``run`` receives its source in the request and calls it with
this module as ``kit`` (``Model``, ``Unavailable``, ``Failure``, ``import_runtime``, ``static``,
``Cuda``, ``gpu``, ``remaining``). So a device runs the artifact exactly as a local run does.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time

STALE_INCOMING_S = 24 * 3600
# Why a fixed-batch artifact is not timed at another batch size; t2tedge's local bench says the same.
FIXED_BATCH_REASON = "the artifact has a fixed batch of {fixed} (export with dynamic_batch: true to sweep batch sizes)"


class Unavailable(Exception):
    """The artifact cannot run on this device (a runtime missing, the wrong OS); t2tedge fills in {device}."""


class Failure(Exception):
    """A problem the user can fix; ``kind`` tells t2tedge which."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---- host facts ----------------------------------------------------------------------------------------


def _command_output(argv: list, timeout: float = 5.0) -> str:
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.decode(errors="replace").strip() if result.returncode == 0 else ""


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace").strip("\x00 \n")
    except OSError:
        return ""


def _cpu() -> str:
    if platform.system() == "Darwin":
        return _command_output(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.machine()
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return _read("/proc/device-tree/model") or platform.processor() or platform.machine()


def _gpu() -> str | None:
    names = _command_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if names:
        return "; ".join(n.strip() for n in names.splitlines())
    board = _read("/proc/device-tree/model")
    if "jetson" in board.lower() or "nvidia" in board.lower():
        return board + " (integrated GPU)"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return _cpu() + " (integrated GPU, Neural Engine)"
    return None


def runtime_version(module) -> str:
    """The version of an imported runtime module."""
    version = getattr(module, "__version__", None)
    if version is None and callable(getattr(module, "get_version", None)):
        version = module.get_version()
    return str(version or "unknown")


def runtimes(wanted: dict) -> dict:
    """For each target, whether its runtime module imports here (with its version), or why not.

    ``wanted``: target -> {"module": name, "systems": [platform.system() values it runs on, empty: any]}.
    """
    found = {}
    for target, need in wanted.items():
        module = need["module"]
        systems = need.get("systems") or []
        if systems and platform.system() not in systems:
            # It cannot run here whatever is installed (and importing coremltools with torch takes ~10 s).
            found[target] = {"module": module, "error": target + " runs only on " + "/".join(systems)}
            with contextlib.suppress(Exception):
                from importlib.metadata import version

                found[target]["installed"] = version(need.get("distribution") or module)
            continue
        try:
            found[target] = {"module": module, "version": runtime_version(__import__(module))}
        except Exception as exc:  # ImportError, or a broken install raising anything else
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            found[target] = {"module": module, "error": reason[:200]}
    return found


def host_facts(wanted: dict) -> dict:
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "gpu": _gpu(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": numpy_version,
        "runtimes": runtimes(wanted),
    }


# ---- hash-checked file cache ------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe(workdir: str, relative: str) -> str:
    path = os.path.normpath(os.path.join(workdir, relative))
    if os.path.isabs(relative) or relative.split("/")[0] == ".." or not path.startswith(os.path.normpath(workdir)):
        raise Failure("error", "refusing a path outside the work directory: " + relative)
    return path


def check(request: dict) -> dict:
    """Which of the expected files are missing or differ (those are deleted), and the free space."""
    workdir = os.path.expanduser(request["workdir"])
    os.makedirs(workdir, exist_ok=True)
    missing = []
    for relative, expected in sorted(request["files"].items()):
        path = _safe(workdir, relative)
        if os.path.isfile(path) and sha256_file(path) == expected:
            continue
        if os.path.isfile(path):
            os.unlink(path)  # a truncated or corrupted copy is never reused
        missing.append(relative)
    incoming = os.path.join(workdir, "incoming")
    if os.path.isdir(incoming):  # uploads that died long ago
        for name in os.listdir(incoming):
            path = os.path.join(incoming, name)
            with contextlib.suppress(OSError):
                if time.time() - os.stat(path).st_mtime > STALE_INCOMING_S:
                    shutil.rmtree(path, ignore_errors=True)
    return {"missing": missing, "free_bytes": shutil.disk_usage(workdir).free}


def commit(workdir: str, upload: str, files: dict) -> None:
    """Move uploaded files into place, each only after its sha256 matches."""
    staging = _safe(workdir, "incoming/" + upload)
    try:
        for relative, expected in sorted(files.items()):
            source = os.path.join(staging, relative)
            if not os.path.isfile(source):
                continue
            got = sha256_file(source)
            if got != expected:
                raise Failure("corrupt", f"uploaded {relative} arrived with sha256 {got}, expected {expected}")
            target = _safe(workdir, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for relative in files:
        path = _safe(workdir, relative)
        if not os.path.isfile(path):
            raise Failure("corrupt", f"{relative} is missing on the device after the upload")


# ---- runners: images in (NCHW float32), logits out ----------------------------------------------------------


class Model:
    """A loaded artifact: ``run(batch)`` -> logits, a fixed batch (or None), the input shape, runtime facts."""

    def __init__(self, run, fixed_batch, input_shape, facts: dict) -> None:
        self.run = run
        self.fixed_batch = fixed_batch
        self.input_shape = input_shape  # (C, H, W)
        self.facts = facts
        # runtimes that time the device itself (TensorRT: CUDA events) append one entry per run() here
        self.gpu_seconds = None

    def __call__(self, images):
        """Logits for any number of images; a fixed-batch model runs them in chunks of its batch.

        Chunking is right for logits, never for timing: :func:`latency` refuses a batch the model does not have.
        """
        import numpy as np

        images = np.ascontiguousarray(images, dtype=np.float32)
        step = self.fixed_batch
        if step is None or len(images) == step:
            return self.run(images)
        return np.concatenate([self.run(images[i : i + step]) for i in range(0, len(images), step)])


def import_runtime(module: str):
    """A target runtime's module, or Unavailable (t2tedge fills in {device})."""
    try:
        return __import__(module)
    except Exception as exc:
        raise Unavailable(module + " not importable on {device}") from exc


def static(dim):
    """A static dimension (a positive int), else None."""
    return dim if isinstance(dim, int) and dim > 0 else None


class _Cuda:
    """The few CUDA runtime calls a TensorRT engine needs, through ctypes (no torch/pycuda on the device)."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12", "libcudart.so.11.0"]
        for name in filter(None, names):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise Unavailable("tensorrt: libcudart (CUDA runtime) not found on {device}")
        self.lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        self.stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise Failure("error", f"{what} failed with CUDA error {status}")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return pointer.value

    def pinned(self, nbytes: int, dtype):
        """A page-locked host buffer as a flat numpy array (what trtexec copies from and to)."""
        import numpy as np

        pointer = ctypes.c_void_p()
        self._check(self.lib.cudaHostAlloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes), 0), "cudaHostAlloc")
        return np.frombuffer((ctypes.c_char * nbytes).from_address(pointer.value), dtype=dtype)

    def copy_async(self, dst, src, nbytes: int, kind: int) -> None:
        self._check(
            self.lib.cudaMemcpyAsync(
                ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind, self.stream
            ),
            "cudaMemcpyAsync",
        )

    def event(self):
        event = ctypes.c_void_p()
        self._check(self.lib.cudaEventCreate(ctypes.byref(event)), "cudaEventCreate")
        return event

    def record(self, event) -> None:
        self._check(self.lib.cudaEventRecord(event, self.stream), "cudaEventRecord")

    def elapsed_ms(self, start, end) -> float:
        ms = ctypes.c_float()
        self._check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
        return float(ms.value)

    def synchronize(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


Cuda = _Cuda
gpu = _gpu


def load(directory: str, request: dict) -> Model:
    """Run the target's own loader, whose source t2tedge sent in the request (see the module docstring)."""
    loader = request["loader"]
    namespace = {"__name__": "t2tedge_device_loader"}
    exec(compile(loader["source"], "<" + request["target"] + " device_load>", "exec"), namespace)
    return namespace[loader["name"]](sys.modules[__name__], directory, request)


def latency(model: Model, request: dict) -> list:
    """Warm-up, then timed iterations until both the minimum count and the minimum time are met."""
    import numpy as np

    batch = int(request.get("batch") or 1)
    if model.fixed_batch is not None and model.fixed_batch != batch:
        # N calls of a batch-1 model are not batch-N latency
        raise Unavailable(FIXED_BATCH_REASON.format(fixed=model.fixed_batch))
    size = request.get("image_size") or 224
    channels, height, width = [d or default for d, default in zip(model.input_shape, [3, size, size])]  # noqa: B905
    image = np.random.default_rng(0).standard_normal((batch, channels, height, width)).astype(np.float32)
    for _ in range(int(request["warmup"])):
        model(image)
    seconds = []
    while len(seconds) < int(request["min_iters"]) or sum(seconds) < float(request["min_seconds"]):
        started = time.perf_counter()
        model(image)
        seconds.append(time.perf_counter() - started)
    return seconds


def logits(model: Model, path: str, batch_size: int = 32) -> str:
    import numpy as np

    images = np.load(path)
    out = np.concatenate([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    buffer = io.BytesIO()
    np.save(buffer, out.astype(np.float32))
    return base64.b64encode(buffer.getvalue()).decode()


def run(request: dict) -> dict:
    workdir = request["workdir"] = os.path.expanduser(request["workdir"])
    if request.get("upload"):
        commit(workdir, request["upload"], request["files"])
    else:
        for relative, expected in request["files"].items():
            path = _safe(workdir, relative)
            if not os.path.isfile(path) or sha256_file(path) != expected:
                raise Failure("corrupt", f"{relative} changed on the device since it was checked")
    directory = _safe(workdir, request["artifact"])
    facts = host_facts(request.get("runtimes", {}))
    try:
        try:
            import numpy  # noqa: F401
        except ImportError:
            raise Unavailable("numpy not importable on {device}") from None
        model = load(directory, request)
        seconds = latency(model, request) if request["mode"] == "latency" else None
    except Unavailable as exc:
        return {"ok": True, "host": facts, "unavailable": str(exc)}
    answer = {"ok": True, "host": facts, "runtime": model.facts}
    if seconds is not None:
        answer["seconds"] = seconds
        if model.gpu_seconds is not None:
            answer["gpu_compute_seconds"] = model.gpu_seconds[-len(answer["seconds"]) :]
    else:
        images = _safe(workdir, request["images"])
        answer["logits_npy_b64"] = logits(model, images)
        if request.get("discard"):  # a validation shard: used once
            shutil.rmtree(os.path.dirname(images), ignore_errors=True)
    return answer


# ---- entry point -------------------------------------------------------------------------------------------

_DEADLINE = [None]


def remaining() -> float | None:
    return None if _DEADLINE[0] is None else max(1.0, _DEADLINE[0] - time.monotonic())


def main(argv: list) -> int:
    # The answer owns stdout; runtimes that print (build logs, warnings) are sent to stderr.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        command = argv[1]
        request = json.loads(base64.b64decode(argv[2]).decode()) if len(argv) > 2 else {}
        if request.get("deadline_s") and hasattr(signal, "alarm"):
            # A last resort if the ssh side cannot kill us: SIGALRM's default action ends the process even
            # while a runtime holds the GIL in native code.
            signal.alarm(int(request["deadline_s"]))
            _DEADLINE[0] = time.monotonic() + float(request["deadline_s"])
        if command == "info":
            answer = {"ok": True, "host": host_facts(request.get("runtimes", {}))}
        elif command == "check":
            answer = {"ok": True, **check(request)}
        elif command == "run":
            answer = run(request)
        else:
            answer = {"ok": False, "kind": "error", "message": f"unknown command {command!r}"}
    except Failure as exc:
        answer = {"ok": False, "kind": exc.kind, "message": str(exc)}
    except OSError as exc:
        kind = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "error"
        answer = {"ok": False, "kind": kind, "message": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        answer = {"ok": False, "kind": "error", "message": f"{type(exc).__name__}: {exc}"}
    with os.fdopen(answer_fd, "w") as out:
        out.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
