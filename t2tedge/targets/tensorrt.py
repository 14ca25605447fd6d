"""TensorRT: explicit-quantization (Q/DQ) ONNX plus the scripts that build the engine on the device.

int8 writes a Q/DQ graph TensorRT builds in explicit-quantization mode: symmetric INT8 (zero point 0),
per-channel weight scales on the output-channel axis, per-tensor activation scales, Q/DQ on the inputs of
Conv, Gemm and the MatMuls with a weight; LayerNormalization stays one float op, residual Adds and
Softmax read float tensors. fp16 ships the plain ONNX for a build with the FP16 flag. Both artifacts hold
``build_engine.py`` (TensorRT Python API) and ``trtexec.sh`` so the engine can be built where the GPU is,
and pass the rule lint of :mod:`t2tedge.targets.tensorrt_lint` (an error fails the build).

Engines are built and run only where ``tensorrt`` imports and torch sees a CUDA device. Elsewhere the
Q/DQ graph runs on onnxruntime's CPU provider, labelled ``emulated``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.errors import ArtifactError, T2tedgeError, TargetUnavailableError
from t2tedge.pipeline.store import Artifact, read_manifest, sha256_file
from t2tedge.progress import log
from t2tedge.targets.base import Availability, BuildInputs, check_precision, register_target
from t2tedge.targets.onnxruntime import OnnxRuntimeRunner
from t2tedge.targets.tensorrt_lint import ERROR, lint, summarize

MODEL_FILE = "model.onnx"
BUILD_SCRIPT = "build_engine.py"
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
EMULATION = "onnxruntime CPU running the TensorRT Q/DQ graph (not TensorRT kernels)"
EMULATION_FP16 = "onnxruntime CPU running the FP32 ONNX graph (TensorRT would run FP16 kernels)"
# Ops whose inputs stay float even when a neighbour is quantized. Add: residual connections (TensorRT
# fuses an FP16 add into the preceding layer's epilogue); Softmax and LayerNormalization: INT8 inputs
# cost accuracy for no speed, TensorRT runs them in FP16 either way.
FLOAT_INPUT_OPS = ("Softmax", "Add", "LayerNormalization")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


class EmulatedRunner(OnnxRuntimeRunner):
    """onnxruntime on CPU standing in for a TensorRT engine; its numbers are labelled emulated."""

    label = "emulated"

    def __init__(self, path: Path, emulation: str, threads: int | None = None) -> None:
        super().__init__(path, threads)
        self.emulation = emulation


class TensorRTRunner:
    """Runs a serialized engine on the CUDA device with torch tensors as I/O buffers (TensorRT 10 API)."""

    label = "measured"

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt
        import torch

        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise T2tedgeError(f"TensorRT could not load {engine_path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.fixed_batch = shape[0] >= 0
        self.max_batch = (
            shape[0] if self.fixed_batch else self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
        )
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        outputs = []
        for start in range(0, len(images), self.max_batch):
            chunk = np.ascontiguousarray(images[start : start + self.max_batch], dtype=np.float32)
            count = len(chunk)
            if self.fixed_batch and count < self.max_batch:  # pad the last chunk of a fixed-batch engine
                chunk = np.concatenate([chunk, np.zeros((self.max_batch - count, *chunk.shape[1:]), np.float32)])
            x = torch.from_numpy(chunk).to("cuda", self.input_dtype)
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            y = torch.empty(
                tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device="cuda"
            )
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, y.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise T2tedgeError("TensorRT inference failed")
            stream.synchronize()
            outputs.append(y[:count].float().cpu().numpy())
        return np.concatenate(outputs)


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
    payload = ("model.onnx", BUILD_SCRIPT, TRTEXEC_SCRIPT)

    def availability(self) -> Availability:
        ok, reason = tensorrt_status()
        return Availability(True, ok, "" if ok else reason, can_emulate=True)

    def needs_calibration(self, precision: str) -> bool:
        return precision == "int8"

    def tool_versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        ok, version = tensorrt_status()
        return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "tensorrt": version if ok else "-"}

    def build(self, inputs: BuildInputs, precision: str, out_dir: Path) -> dict[str, Any]:
        check_precision(self, precision)
        model_path = out_dir / MODEL_FILE
        if precision == "int8":
            facts = build_qdq(inputs, model_path, out_dir)
        else:
            shutil.copyfile(inputs.onnx_path, model_path)
            facts = {"format": "ONNX (FP32 weights; TensorRT builds FP16 kernels with the FP16 flag)"}
        findings = lint(model_path)
        errors = [f for f in findings if f.severity == ERROR]
        if errors:
            first = errors[0]
            raise T2tedgeError(
                f"tensorrt/{precision}: the graph breaks TensorRT's rules: node {first.node!r} ({first.op}): "
                f"{first.message}" + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else "")
            )
        shape = input_shape(model_path)
        write_scripts(out_dir, precision, shape)
        facts["lint"] = summarize(findings)
        facts["input"] = {"name": shape[0], "shape": shape[1]}
        facts["trtexec"] = trtexec_command(precision, shape)
        facts["build_script"] = f"python {BUILD_SCRIPT}"
        facts["engine"] = _build_engine_at_build_time(out_dir)
        return facts

    def load(self, artifact: Artifact, threads: int | None = None) -> Any:
        ok, _ = tensorrt_status()
        if ok:
            return TensorRTRunner(ensure_engine(artifact))
        precision = artifact.manifest.get("precision", "int8")
        emulation = EMULATION if precision == "int8" else EMULATION_FP16
        return EmulatedRunner(artifact.file(MODEL_FILE), emulation, threads)


def qdq_settings(config: dict[str, Any]) -> Any:
    """TensorRT's Q/DQ settings from the recipe's quantization dict (optional keys read with defaults).

    ``activation_matmuls`` (default False) also quantizes the activation x activation MatMuls (attention
    scores and attention x values, the T2T Performer products); see the module README text for why not.
    """
    from t2tedge.calibration.onnx_qdq import QdqSettings

    try:
        return QdqSettings(
            method=config.get("method", "minmax"),
            percentile=float(config.get("percentile", 99.999)),
            op_types=QUANTIZED_OPS,
            activation_type="int8",
            activation_symmetric=True,
            per_channel=True,
            nodes_to_exclude=tuple(config.get("exclude_nodes") or ()),
            fp32_op_types=FLOAT_INPUT_OPS,
            activation_matmuls=bool(config.get("activation_matmuls", False)),
            # Q/DQ go on inputs only: TensorRT fuses a Q that follows a layer (and its activation) into that
            # layer's output itself, so an output Q would only put Q/DQ on residual Adds and LayerNorms.
            no_output_quantization_op_types=QUANTIZED_OPS,
            # TensorRT takes biases in float and folds them into the INT8 kernel; INT32 DQ is unsupported.
            extra_options={"QuantizeBias": False},
        )
    except ValueError as exc:
        raise T2tedgeError(f"tensorrt int8: {exc}") from None


def build_qdq(inputs: BuildInputs, model_path: Path, out_dir: Path) -> dict[str, Any]:
    """Calibrate and write the TensorRT Q/DQ graph; honours ``max_accuracy_drop`` with emulated accuracy."""
    from t2tedge.calibration.onnx_qdq import qdq_structure
    from t2tedge.targets.onnxruntime import quantize_with_budget

    facts = quantize_with_budget(inputs, qdq_settings(inputs.config), model_path, out_dir, "tensorrt/int8 (symmetric)")
    if "accuracy_aware" in facts:
        facts["accuracy_aware"]["label"] = "emulated"  # judged on the onnxruntime stand-in
    sort_topologically(model_path)
    return {"format": "Q/DQ ONNX (TensorRT explicit quantization)", **facts, **qdq_structure(model_path)}


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
) -> str:
    """The trtexec (TensorRT 10) command that builds the engine; it also times inference after the build."""
    flags = [f"--onnx={MODEL_FILE}"]
    flags += ["--int8", "--fp16"] if precision == "int8" else ["--fp16"]
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


def write_scripts(out_dir: Path, precision: str, shape: tuple[str, list[int | str]]) -> None:
    """Write ``build_engine.py`` and ``trtexec.sh`` for this artifact."""
    name, dims = shape
    script = (
        BUILD_ENGINE_TEMPLATE.replace("__PRECISION__", repr(precision))
        .replace("__INPUT_NAME__", repr(name))
        .replace("__INPUT_SHAPE__", repr([d if isinstance(d, int) and d > 0 else -1 for d in dims]))
        .replace("__WORKSPACE_MB__", repr(WORKSPACE_MB))
        .replace("__BATCH_PROFILE__", repr(BATCH_PROFILE))
    )
    (out_dir / BUILD_SCRIPT).write_text(script)
    command = trtexec_command(precision, shape)
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


BUILD_ENGINE_TEMPLATE = '''#!/usr/bin/env python3
"""Build a TensorRT engine from this artifact's model.onnx (written by t2tedge).

Needs only the `tensorrt` Python package (written for TensorRT 10; every call it makes also exists in 8.6)
and a CUDA GPU, e.g. a Jetson with JetPack 6. INT8 artifacts carry their own Q/DQ scales (explicit
quantization): no calibrator runs here.
`python build_engine.py --help` lists the options; `--dry-run` prints the resolved settings only.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

PRECISION = __PRECISION__
INPUT_NAME = __INPUT_NAME__
INPUT_SHAPE = __INPUT_SHAPE__  # -1: dynamic
WORKSPACE_MB = __WORKSPACE_MB__
MIN_BATCH, OPT_BATCH, MAX_BATCH = __BATCH_PROFILE__
HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=f"Build a TensorRT engine ({PRECISION}) from model.onnx.")
    parser.add_argument(
        "artifact", nargs="?", type=Path, default=HERE, help="artifact directory holding model.onnx (default: here)"
    )
    parser.add_argument("--onnx", type=Path, help="ONNX file (default: ARTIFACT/model.onnx)")
    parser.add_argument("--engine", type=Path, help="engine to write (default: ARTIFACT/model.engine)")
    parser.add_argument(
        "--timing-cache", type=Path, help="timing cache, read and updated (default: ARTIFACT/timing.cache)"
    )
    parser.add_argument("--workspace-mb", type=int, default=WORKSPACE_MB, help="workspace memory pool limit in MiB")
    parser.add_argument("--precision", choices=("fp16", "int8"), default=PRECISION)
    parser.add_argument(
        "--no-fp16", action="store_true", help="int8: no FP16 fallback (layers without Q/DQ run in FP32)"
    )
    parser.add_argument("--min-batch", type=int, default=MIN_BATCH, help="optimization profile (dynamic batch only)")
    parser.add_argument("--opt-batch", type=int, default=OPT_BATCH, help="batch the kernels are tuned for")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH)
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log (layer precisions, fusions)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    args = parser.parse_args(argv)
    args.onnx = args.onnx or args.artifact / "model.onnx"
    args.engine = args.engine or args.artifact / "model.engine"
    args.timing_cache = args.timing_cache or args.artifact / "timing.cache"
    if not args.min_batch <= args.opt_batch <= args.max_batch:
        parser.error("need --min-batch <= --opt-batch <= --max-batch")
    return args


def settings(args):
    dynamic = any(d < 0 for d in INPUT_SHAPE)
    return {
        "onnx": str(args.onnx),
        "engine": str(args.engine),
        "timing_cache": str(args.timing_cache),
        "precision": args.precision,
        "flags": ["INT8", "FP16"][: 1 if args.no_fp16 else 2] if args.precision == "int8" else ["FP16"],
        "workspace_mb": args.workspace_mb,
        "input": {"name": INPUT_NAME, "shape": INPUT_SHAPE},
        "profile": [args.min_batch, args.opt_batch, args.max_batch] if dynamic else None,
    }


def main(argv=None):
    args = parse_args(argv)
    plan = settings(args)
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    try:
        import tensorrt as trt
    except ImportError:
        print("error: the tensorrt Python package is not installed (JetPack ships it; pip install tensorrt)",
              file=sys.stderr)
        return 2
    if not args.onnx.is_file():
        print(f"error: {args.onnx} not found", file=sys.stderr)
        return 2
    logger = trt.Logger(trt.Logger.VERBOSE if args.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(args.onnx)):
        for i in range(parser.num_errors):
            print(f"error: {parser.get_error(i)}", file=sys.stderr)
        return 1
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace_mb << 20)
    if args.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the Q/DQ nodes
    if "FP16" in plan["flags"]:
        config.set_flag(trt.BuilderFlag.FP16)  # layers without Q/DQ (LayerNorm, Softmax, attention) run FP16
    cache_bytes = args.timing_cache.read_bytes() if args.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    if plan["profile"]:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            if any(d < 0 for d in dims[1:]):
                print(f"error: input {tensor.name} has dynamic dims besides the batch: {dims}", file=sys.stderr)
                return 2
            profile.set_shape(
                tensor.name, *[(batch, *dims[1:]) for batch in (args.min_batch, args.opt_batch, args.max_batch)]
            )
        config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        print("error: TensorRT could not build the engine (rerun with --verbose)", file=sys.stderr)
        return 1
    args.engine.parent.mkdir(parents=True, exist_ok=True)
    staging = args.engine.with_name(f".{args.engine.name}.{os.getpid()}.tmp")
    staging.write_bytes(memoryview(serialized))
    staging.replace(args.engine)  # never leaves a half-written engine behind
    args.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    args.timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - started
    print(f"wrote {args.engine} ({args.engine.stat().st_size / 2**20:.1f} MiB) in {seconds:.0f} s with "
          f"TensorRT {trt.__version__}, flags {'+'.join(plan['flags'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


register_target(TensorRTTarget())
