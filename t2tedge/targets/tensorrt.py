"""TensorRT: explicit-quantization (Q/DQ) ONNX plus the scripts that build the engine on the device.

int8 writes a Q/DQ graph TensorRT builds in explicit-quantization mode: symmetric INT8 (zero point 0),
per-channel weight scales on the output-channel axis, per-tensor activation scales, Q/DQ on the inputs of
Conv, Gemm and the MatMuls with a weight; LayerNormalization stays one float op, residual Adds and
Softmax read float tensors. fp16 ships the plain ONNX for a build with the FP16 flag. Both run FP16
wherever a layer is not INT8, so every build runs the FP16 range check on the calibration images: a
tensor beyond 65504 pins its producer and readers to FP32 (``engine.json``, applied by
``build_engine.py`` and ``trtexec.sh`` as layer precision constraints). Both artifacts pass the rule
lint of :mod:`t2tedge.targets.tensorrt_lint` (an error fails the build).

Engines are built and run only where ``tensorrt`` imports and torch sees a CUDA device. Elsewhere the
graph runs in :class:`t2tedge.emulation.GraphEmulator`: FP16 storage as TensorRT's FP16 layers, Q/DQ in
INT8 math, the pinned layers in FP32; its numbers are labelled ``emulated``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from t2tedge.artifact import Artifact, read_manifest, sha256_file, write_json
from t2tedge.errors import ArtifactError, T2tedgeError, TargetUnavailableError
from t2tedge.evaluation.accuracy import EMULATED
from t2tedge.progress import log, track
from t2tedge.targets.base import (
    Availability,
    BuildInputs,
    Capabilities,
    DeviceRunner,
    TargetConfig,
    check_precision,
    register_target,
)
from t2tedge.targets.tensorrt_lint import ERROR, lint, summarize

MODEL_FILE = "model.onnx"
BUILD_SCRIPT = "build_engine.py"
ENGINE_SETTINGS = "engine.json"
RANGES_FILE = "fp16_ranges.json"
TRTEXEC_SCRIPT = "trtexec.sh"
ENGINE_FILE = "model.engine"
TIMING_CACHE = "timing.cache"
# Engines depend on the GPU and the TensorRT version, and the artifact directory is final once built:
# engines t2tedge builds for an artifact live beside it, keyed by the ONNX file's sha256.
ENGINE_CACHE = ".engine-cache"
WORKSPACE_MB = 1024
# Optimization profile for a dynamic batch: tuned for batch 1 (edge latency), valid up to 32.
BATCH_PROFILE = (1, 1, 32)
NO_TENSORRT = "no TensorRT/GPU on this host"
EMULATION = "t2tedge FP16 graph emulator (PyTorch CPU) running model.onnx, not TensorRT kernels"
# Ops whose inputs stay float even when a neighbour is quantized. Add: residual connections (TensorRT
# fuses an FP16 add into the preceding layer's epilogue); Softmax and LayerNormalization: INT8 inputs
# cost accuracy for no speed, TensorRT runs them in FP16 either way.
FLOAT_INPUT_OPS = ("Softmax", "Add", "LayerNormalization")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


class TensorRtConfig(TargetConfig):
    """`quantization.tensorrt`: how the Q/DQ graph is calibrated and which nodes stay FP16."""

    activation_matmuls: bool = Field(False, description="also put Q/DQ on attention MatMuls (off: hurts T2T accuracy)")
    calibration_method: Literal["auto", "minmax", "percentile", "entropy"] | None = Field(
        "auto",
        description="auto: the method whose INT8 graph agrees best with FP32 on the held-out split, under the "
        "FP16 emulator; null: quantization.method",
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="node names kept in FP16")


class EmulatedRunner:
    """The artifact's graph in TensorRT's arithmetic on the CPU, standing in for an engine (labelled emulated)."""

    label = EMULATED

    def __init__(self, path: Path, fp32_nodes: list[str], threads: int | None = None) -> None:
        from t2tedge.emulation import GraphEmulator

        self.emulator = GraphEmulator(path, fp32_nodes, threads=threads or 1)
        self.fixed_batch = self.emulator.fixed_batch
        pinned = f"; {len(fp32_nodes)} nodes pinned to FP32 as the engine pins them" if fp32_nodes else ""
        self.emulation: str | None = f"{EMULATION}: {self.emulator.arithmetic}{pinned}"
        self.runtime_facts: dict[str, Any] = {"runtime": "t2tedge GraphEmulator"}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.emulator(images)


def device_load(kit, directory, request):  # noqa: ANN001, ANN201, C901  (shipped to devices by source: Python 3.8)
    """Build the engine from the artifact's Q/DQ ONNX (cached in ``workdir/engines`` by content hash), run it.

    Timing as trtexec: page-locked host buffers and device buffers allocated once (grown, never per
    iteration), async copies on one stream, CUDA events around the enqueue for the GPU compute time.
    """
    import hashlib
    import os
    import subprocess
    import sys

    import numpy as np

    trt = kit.import_runtime("tensorrt")
    cuda = kit.Cuda()
    gpu = kit.gpu() or "gpu"
    key = hashlib.sha256("{}|{}|{}".format(request["model_sha256"], trt.__version__, gpu).encode()).hexdigest()
    engines = os.path.join(request["workdir"], "engines")
    engine = os.path.join(engines, key[:16] + ".engine")
    built_now = not os.path.isfile(engine)
    if built_now:
        os.makedirs(engines, exist_ok=True)
        staging = f"{engine}.{os.getpid()}.tmp"
        argv = [sys.executable, os.path.join(directory, "build_engine.py"), directory, "--engine", staging]
        argv += ["--timing-cache", os.path.join(engines, "timing.cache")]
        result = subprocess.run(argv, stdout=sys.stderr, stderr=subprocess.PIPE, timeout=kit.remaining())
        if result.returncode != 0 or not os.path.isfile(staging):
            tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise kit.Failure("error", "TensorRT engine build failed: " + (" | ".join(tail) or "no output"))
        os.replace(staging, engine)
    logger = trt.Logger(trt.Logger.WARNING)
    with open(engine, "rb") as fh:
        compiled = trt.Runtime(logger).deserialize_cuda_engine(fh.read())
    if compiled is None:
        raise kit.Failure("error", "TensorRT could not load " + engine + " (another TensorRT version or GPU?)")
    context = compiled.create_execution_context()
    names = [compiled.get_tensor_name(i) for i in range(compiled.num_io_tensors)]
    inp = next(n for n in names if compiled.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if compiled.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    shape = list(compiled.get_tensor_shape(inp))
    fixed = shape[0] if shape[0] > 0 else None
    in_type, out_type = trt.nptype(compiled.get_tensor_dtype(inp)), trt.nptype(compiled.get_tensor_dtype(out))
    buffers = {}
    events = [cuda.event() for _ in range(2)]
    gpu_seconds = []

    def ensure(name, nbytes, dtype):
        if buffers.get(name, (0, 0, None))[1] < nbytes:
            buffers[name] = (cuda.malloc(nbytes), nbytes, cuda.pinned(nbytes, dtype))
            context.set_tensor_address(name, buffers[name][0])
        return buffers[name]

    def run(x):
        x = np.ascontiguousarray(x, dtype=in_type)
        context.set_input_shape(inp, tuple(x.shape))
        out_shape = tuple(context.get_tensor_shape(out))
        out_count = int(np.prod(out_shape))
        y_bytes = out_count * np.dtype(out_type).itemsize
        device_in, _, host_in = ensure(inp, x.nbytes, in_type)
        device_out, _, host_out = ensure(out, y_bytes, out_type)
        host_in[: x.size] = x.ravel()
        # Per iteration: copy in, execute, copy out, synchronized: trtexec's end-to-end "Latency".
        cuda.copy_async(device_in, host_in.ctypes.data, x.nbytes, cuda.H2D)
        cuda.record(events[0])
        if not context.execute_async_v3(cuda.stream.value):
            raise kit.Failure("error", "TensorRT inference failed")
        cuda.record(events[1])
        cuda.copy_async(host_out.ctypes.data, device_out, y_bytes, cuda.D2H)
        cuda.synchronize()
        gpu_seconds.append(cuda.elapsed_ms(events[0], events[1]) / 1000.0)  # trtexec's "GPU Compute Time"
        return host_out[:out_count].reshape(out_shape).astype(np.float32)

    facts = {
        "runtime": "tensorrt",
        "version": trt.__version__,
        "gpu": gpu,
        "engine": {"cache_key": key[:16], "built_now": built_now, "precision": request["build"].get("precision")},
        "timing": "pinned host buffers; host->device copy + execute_async_v3 + device->host copy per iteration "
        "(trtexec 'Latency'); CUDA events around execute_async_v3 (trtexec 'GPU Compute Time')",
    }
    model = kit.Model(run, fixed, [d if d > 0 else None for d in shape[1:]], facts)
    model.gpu_seconds = gpu_seconds
    return model


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) where tensorrt imports and torch sees a CUDA device; else (False, reason)."""
    try:
        import tensorrt
    except Exception:  # not installed, or installed without its CUDA libraries
        return False, NO_TENSORRT
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:
        cuda = False
    if not cuda:
        return False, f"{NO_TENSORRT} (tensorrt {tensorrt.__version__} imports but torch sees no CUDA device)"
    return True, tensorrt.__version__


class TensorRTTarget:
    """INT8 = Q/DQ ONNX for explicit quantization; FP16 = the plain ONNX built with the FP16 flag."""

    name = "tensorrt"
    precisions = ("fp16", "int8")
    Config = TensorRtConfig
    capabilities = Capabilities(
        payload=(MODEL_FILE, BUILD_SCRIPT, ENGINE_SETTINGS, TRTEXEC_SCRIPT),
        device_runtime="tensorrt",
        device_loader=device_load,
        # the lint and engine script it applies and ships, and the FP16 emulation that range-checks the graph
        rule_files=("targets/tensorrt_lint.py", "targets/tensorrt_build_engine.py", "emulation/*.py"),
    )

    def availability(self) -> Availability:
        ok, reason = tensorrt_status()
        return Availability(True, ok, "" if ok else reason, can_emulate=True)

    def needs_calibration(self, precision: str) -> bool:
        return True  # int8 calibrates; both precisions run the FP16 range check on the calibration images

    def tool_versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        ok, version = tensorrt_status()
        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "tensorrt": version if ok else "-"}

    def build(self, inputs: BuildInputs, precision: str, config: TensorRtConfig, out_dir: Path) -> dict[str, Any]:
        check_precision(self, precision)
        if inputs.calibration is None or len(inputs.calibration) == 0:
            raise T2tedgeError(f"tensorrt/{precision} needs calibration images (the FP16 range check reads them)")
        model_path = out_dir / MODEL_FILE
        if precision == "int8":
            facts = build_qdq(inputs, config, model_path, out_dir)
        else:
            shutil.copyfile(inputs.onnx_path, model_path)
            facts = {"format": "ONNX (FP32 weights; TensorRT builds FP16 kernels with the FP16 flag)"}
        _lint_or_fail(model_path, precision)  # operator and Q/DQ rules first: the range check runs the graph
        check = range_check(model_path, inputs.calibration, f"tensorrt/{precision}")
        write_json(out_dir / RANGES_FILE, check.ranges_json())
        ranges = {r["tensor"]: r["max_abs"] for r in check.record["outside_fp16"]}
        findings = _lint_or_fail(model_path, precision, tensor_ranges=ranges, fp32_tensors=set(check.fp32_tensors))
        shape = input_shape(model_path)
        write_scripts(out_dir, precision, shape, check.fp32_nodes, check.fp32_tensors)
        facts["fp16_range"] = {**check.record, "file": RANGES_FILE}
        facts["fp32_layers"] = {"nodes": check.fp32_nodes, "tensors": check.fp32_tensors}
        facts["lint"] = summarize(findings)
        facts["input"] = {"name": shape[0], "shape": shape[1]}
        facts["trtexec"] = trtexec_command(precision, shape, fp32_nodes=check.fp32_nodes)
        facts["build_script"] = f"python {BUILD_SCRIPT}"
        facts["engine"] = _build_engine_at_build_time(out_dir)
        return facts

    def load(self, artifact: Artifact, threads: int | None = None) -> DeviceRunner | EmulatedRunner:
        ok, _ = tensorrt_status()
        if ok:  # the device loader, as on an SSH device: engines cached beside the artifact
            from t2tedge.devices import remote_runner

            request = {
                "threads": threads,
                "build": {**artifact.manifest.get("build", {}), "precision": artifact.manifest.get("precision")},
                "workdir": str(artifact.path.parent / ENGINE_CACHE),
                "model_sha256": artifact.manifest["files"][MODEL_FILE]["sha256"],
            }
            return DeviceRunner(device_load(remote_runner, str(artifact.path), request))
        pinned = artifact.manifest.get("build", {}).get("fp32_layers", {}).get("nodes", [])
        return EmulatedRunner(artifact.file(MODEL_FILE), pinned, threads)


def _lint_or_fail(model_path: Path, precision: str, **kwargs: Any) -> list[Any]:
    """The lint's findings; an error fails the build with one line naming the node."""
    findings = lint(model_path, **kwargs)
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        first = errors[0]
        raise T2tedgeError(
            f"tensorrt/{precision}: the graph breaks TensorRT's rules: node {first.node!r} ({first.op}): "
            f"{first.message}" + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else "")
        )
    return findings


def range_check(model_path: Path, calibration: np.ndarray, what: str) -> Any:
    """The FP16 range check of the graph on the calibration images; says which layers it pins to FP32."""
    from t2tedge.emulation import fp16_range_check

    log(f"  {what}: FP16 range check on {len(calibration)} calibration images")
    check = fp16_range_check(model_path, calibration)
    outside = check.record["outside_fp16"]
    if outside:
        worst = max(outside, key=lambda r: r["max_abs"])
        log(
            f"  [yellow]{what}:[/] {len(outside)} tensors leave FP16's range (e.g. {worst['tensor']!r} of "
            f"{worst['node']!r} reaches {worst['max_abs']:.3g}); {len(check.fp32_nodes)} layers pinned to FP32"
        )
    return check


def qdq_settings(config: TensorRtConfig, method: str | None = None) -> Any:
    """TensorRT's Q/DQ settings: symmetric INT8, Q/DQ on the inputs of Conv/Gemm/weight MatMuls.

    ``activation_matmuls`` (default False) also quantizes the activation x activation MatMuls (attention
    scores and attention x values, the T2T Performer products); see the module README text for why not.
    """
    from t2tedge.calibration.onnx_qdq import QdqSettings

    try:
        return QdqSettings(
            method=method or config.method,
            percentile=config.percentile,
            op_types=QUANTIZED_OPS,
            activation_type="int8",
            activation_symmetric=True,
            per_channel=True,
            nodes_to_exclude=tuple(config.exclude_nodes),
            fp32_op_types=FLOAT_INPUT_OPS,
            activation_matmuls=config.activation_matmuls,
            # Q/DQ go on inputs only: TensorRT fuses a Q that follows a layer (and its activation) into that
            # layer's output itself, so an output Q would only put Q/DQ on residual Adds and LayerNorms.
            no_output_quantization_op_types=QUANTIZED_OPS,
            # TensorRT takes biases in float and folds them into the INT8 kernel; INT32 DQ is unsupported.
            extra_options={"QuantizeBias": False},
        )
    except ValueError as exc:
        raise T2tedgeError(f"tensorrt int8: {exc}") from None


def build_qdq(inputs: BuildInputs, config: TensorRtConfig, model_path: Path, out_dir: Path) -> dict[str, Any]:
    """Calibrate and write the TensorRT Q/DQ graph; honours ``max_accuracy_drop`` with emulated accuracy.

    ``calibration_method: auto`` calibrates with every method and keeps the one whose graph agrees best
    with FP32 on the held-out split of the calibration source, run in the FP16 emulator.
    """
    from t2tedge.calibration.accuracy_aware import quantize_with_budget
    from t2tedge.calibration.onnx_qdq import qdq_structure

    requested = config.calibration_method or config.method
    choice = None
    if requested == "auto":
        choice = choose_calibration_method(inputs, config)
        requested = choice["chosen"]
    settings = qdq_settings(config, requested)
    facts = quantize_with_budget(
        inputs, settings, model_path, out_dir, "tensorrt/int8 (symmetric)", config.max_accuracy_drop
    )
    if "accuracy_aware" in facts:
        facts["accuracy_aware"]["label"] = "emulated"  # judged on the onnxruntime FP32 stand-in
    if choice is not None:
        facts["calibration_choice"] = choice
    sort_topologically(model_path)
    return {"format": "Q/DQ ONNX (TensorRT explicit quantization)", **facts, **qdq_structure(model_path)}


def choose_calibration_method(inputs: BuildInputs, config: TensorRtConfig) -> dict[str, Any]:
    """Score minmax / percentile / entropy on the held-out split; the best top-1 agreement wins, then logit error."""
    import tempfile

    from t2tedge.calibration.onnx_qdq import METHODS, quantize_qdq
    from t2tedge.calibration.onnx_session import OnnxSession
    from t2tedge.emulation import GraphEmulator
    from t2tedge.evaluation.accuracy import agreement

    if inputs.heldout is None or len(inputs.heldout) == 0:
        return {"chosen": "minmax", "reason": "no held-out images (calibration.heldout: 0 or no images left)"}
    reference = OnnxSession(inputs.onnx_path)(inputs.heldout)
    candidates = []
    with tempfile.TemporaryDirectory(prefix="t2tedge-trt-method-") as tmp:
        for method in track(METHODS, "tensorrt int8: choosing the calibration method", total=len(METHODS)):
            path = Path(tmp) / f"{method}.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_qdq(inputs.onnx_path, path, inputs.calibration, qdq_settings(config, method))
            scores = agreement(GraphEmulator(path)(inputs.heldout), reference)
            candidates.append({"method": method, **scores})
    usable = [c for c in candidates if np.isfinite(c["logit_abs_err_mean"])] or candidates
    best = max(usable, key=lambda c: (c["top1_agreement"], -c["logit_abs_err_mean"]))
    log(
        f"  tensorrt/int8: calibration {best['method']} (held-out agreement with FP32 "
        f"{best['top1_agreement']:.1f} %: "
        + ", ".join(f"{c['method']} {c['top1_agreement']:.1f}" for c in candidates)
        + ")"
    )
    return {
        "chosen": best["method"],
        "heldout_images": int(len(inputs.heldout)),
        "scored_by": "top-1 agreement with the FP32 export (then mean |dlogit|), FP16 graph emulator, held-out split",
        "candidates": candidates,
    }


def sort_topologically(model_path: Path) -> None:
    """Reorder nodes so each follows its inputs' producers (ORT's quantizer appends Q/DQ nodes at the end)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    graph = model.graph
    ready = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            raise T2tedgeError(f"{model_path}: the graph has a cycle or a missing input at node {remaining[0].name!r}")
        pending = remaining
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)
    onnx.save(model, model_path)


def input_shape(model_path: Path) -> tuple[str, list[int | str]]:
    """The first graph input's name and dims (a dim_param name where a dim is dynamic)."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    value = next(v for v in graph.input if v.name not in initializers)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]
    return value.name, dims


def trtexec_command(
    precision: str,
    shape: tuple[str, list[int | str]],
    workspace_mb: int = WORKSPACE_MB,
    batch: tuple[int, int, int] = BATCH_PROFILE,
    fp32_nodes: list[str] | tuple[str, ...] = (),
) -> str:
    """The trtexec (TensorRT 10) command that builds the engine; it also times inference after the build.

    ``fp32_nodes`` become layer precision constraints (trtexec names a layer after its ONNX node).
    """
    flags = [f"--onnx={MODEL_FILE}"]
    flags += ["--int8", "--fp16"] if precision == "int8" else ["--fp16"]
    if fp32_nodes:
        pins = ",".join(f"{name}:fp32" for name in fp32_nodes)
        flags += ["--precisionConstraints=obey", f"--layerPrecisions={pins}", f"--layerOutputTypes={pins}"]
    flags += [
        f"--saveEngine={ENGINE_FILE}",
        f"--timingCacheFile={TIMING_CACHE}",
        f"--memPoolSize=workspace:{workspace_mb}M",
    ]
    name, dims = shape
    if any(not isinstance(d, int) or d <= 0 for d in dims):
        for flag, size in zip(("--minShapes", "--optShapes", "--maxShapes"), batch, strict=True):
            flags.append(f"{flag}={name}:{'x'.join(str(d) for d in [size, *dims[1:]])}")
    return "trtexec " + " ".join(shlex.quote(f) for f in flags)


def write_scripts(
    out_dir: Path,
    precision: str,
    shape: tuple[str, list[int | str]],
    fp32_nodes: list[str] | tuple[str, ...] = (),
    fp32_tensors: list[str] | tuple[str, ...] = (),
) -> None:
    """Write ``build_engine.py`` (a copy of :mod:`t2tedge.targets.tensorrt_build_engine`), ``engine.json``
    and ``trtexec.sh`` for this artifact."""
    name, dims = shape
    settings = {
        "precision": precision,
        "input": {"name": name, "shape": [d if isinstance(d, int) and d > 0 else -1 for d in dims]},
        "workspace_mb": WORKSPACE_MB,
        "batch_profile": list(BATCH_PROFILE),
        "fp32_nodes": list(fp32_nodes),
        "fp32_tensors": list(fp32_tensors),
    }
    write_json(out_dir / ENGINE_SETTINGS, settings)
    shutil.copyfile(Path(__file__).with_name("tensorrt_build_engine.py"), out_dir / BUILD_SCRIPT)
    command = trtexec_command(precision, shape, fp32_nodes=fp32_nodes)
    (out_dir / TRTEXEC_SCRIPT).write_text(
        "#!/usr/bin/env bash\n"
        "# Build this artifact's TensorRT engine with trtexec (TensorRT 10) and time inference on this GPU.\n"
        "# Jetson: trtexec lives in /usr/src/tensorrt/bin (set TRTEXEC=... to use another one).\n"
        "# Extra arguments are passed on, e.g. ./trtexec.sh --useCudaGraph --noDataTransfers\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"\n'
        f'"$TRTEXEC" {command.removeprefix("trtexec ")} "$@"\n'
    )
    for path in (out_dir / BUILD_SCRIPT, out_dir / TRTEXEC_SCRIPT):
        path.chmod(0o755)


def _build_engine_at_build_time(out_dir: Path) -> dict[str, Any]:
    """Build ``model.engine`` into the artifact where TensorRT runs; else say why not."""
    ok, version = tensorrt_status()
    if not ok:
        return {"status": f"unavailable: {NO_TENSORRT}"}
    started = time.perf_counter()
    _run_build_script(out_dir, out_dir / ENGINE_FILE, out_dir.parent / ENGINE_CACHE / TIMING_CACHE)
    return {
        "status": "built",
        "tensorrt": version,
        "device": _device_name(),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _run_build_script(artifact_dir: Path, engine: Path, timing_cache: Path) -> None:
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(artifact_dir / BUILD_SCRIPT),
        str(artifact_dir),
        "--engine",
        str(engine),
        "--timing-cache",
        str(timing_cache),
    ]
    log(f"  tensorrt: building the engine ({engine.name}); this takes minutes")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not engine.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise T2tedgeError(f"TensorRT engine build failed for {artifact_dir}: {' | '.join(tail) or 'no output'}")


def ensure_engine(artifact: Artifact) -> Path:
    """The artifact's engine for this GPU and TensorRT: built with it, cached beside it, or built now."""
    ok, version = tensorrt_status()
    if not ok:
        raise TargetUnavailableError(
            f"cannot build a TensorRT engine: {version}; copy {artifact.path} to the device and run "
            f"`python {BUILD_SCRIPT}` or `./{TRTEXEC_SCRIPT}` there"
        )
    device = _device_name()
    built = artifact.manifest.get("build", {}).get("engine", {})
    own = artifact.file(ENGINE_FILE)
    if own.is_file() and built.get("tensorrt") == version and built.get("device") == device:
        return own
    key = hashlib.sha256(f"{sha256_file(artifact.file(MODEL_FILE))}|{version}|{device}".encode()).hexdigest()
    cache = artifact.path.parent / ENGINE_CACHE
    engine = cache / key[:16] / ENGINE_FILE
    if engine.is_file():
        return engine
    engine.parent.mkdir(parents=True, exist_ok=True)
    staging = engine.with_name(f".{ENGINE_FILE}.{os.getpid()}.tmp")
    try:
        _run_build_script(artifact.path, staging, cache / TIMING_CACHE)
        staging.replace(engine)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
    (engine.parent / "engine.json").write_text(
        json.dumps({"artifact": str(artifact.path), "tensorrt": version, "device": device}, indent=2) + "\n"
    )
    return engine


def build_engine(artifact: str | Path) -> Path:
    """Build (or find) the TensorRT engine of a tensorrt artifact; a clear error where TensorRT cannot run."""
    path = Path(artifact)
    manifest = read_manifest(path)
    if manifest.get("target") != "tensorrt":
        raise ArtifactError(f"{path} is not a tensorrt artifact (target {manifest.get('target')!r})")
    return ensure_engine(Artifact(path))


register_target(TensorRTTarget())
