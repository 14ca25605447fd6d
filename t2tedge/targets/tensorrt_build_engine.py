#!/usr/bin/env python3
"""Build a TensorRT engine from a t2tedge artifact's model.onnx; t2tedge copies this file in as build_engine.py.

Needs only the `tensorrt` Python package (written for TensorRT 10; every call it makes also exists in 8.6)
and a CUDA GPU, e.g. a Jetson with JetPack 6. The artifact's settings come from `engine.json` beside
this script: precision, input, optimization profile and the layers the FP16 range check pinned to FP32
(built with precision constraints obeyed, so TensorRT cannot run them in FP16). INT8 artifacts carry
their own Q/DQ scales (explicit quantization): no calibrator runs here.
`python build_engine.py --help` lists the options; `--dry-run` prints the resolved settings only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SETTINGS_FILE = "engine.json"


def load_settings(artifact: Path) -> dict[str, Any]:
    """The artifact's engine settings (written by t2tedge at build time)."""
    return json.loads((artifact / SETTINGS_FILE).read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build a TensorRT engine from a t2tedge artifact's model.onnx.")
    parser.add_argument(
        "artifact", nargs="?", type=Path, default=HERE, help="artifact directory holding model.onnx (default: here)"
    )
    parser.add_argument("--onnx", type=Path, help="ONNX file (default: ARTIFACT/model.onnx)")
    parser.add_argument("--engine", type=Path, help="engine to write (default: ARTIFACT/model.engine)")
    parser.add_argument(
        "--timing-cache", type=Path, help="timing cache, read and updated (default: ARTIFACT/timing.cache)"
    )
    parser.add_argument("--workspace-mb", type=int, help="workspace memory pool limit in MiB (default: engine.json)")
    parser.add_argument("--precision", choices=("fp16", "int8"), help="default: the artifact's precision")
    parser.add_argument(
        "--no-fp16", action="store_true", help="int8: no FP16 fallback (layers without Q/DQ run in FP32)"
    )
    parser.add_argument("--min-batch", type=int, help="optimization profile (dynamic batch only)")
    parser.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for")
    parser.add_argument("--max-batch", type=int)
    parser.add_argument(
        "--no-fp32-pins", action="store_true", help="do not pin the layers the FP16 range check keeps in FP32"
    )
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log (layer precisions, fusions)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    args = parser.parse_args(argv)
    try:
        stored = load_settings(args.artifact)
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.artifact / SETTINGS_FILE}: {exc}")
    args.stored = stored
    args.onnx = args.onnx or args.artifact / "model.onnx"
    args.engine = args.engine or args.artifact / "model.engine"
    args.timing_cache = args.timing_cache or args.artifact / "timing.cache"
    args.workspace_mb = args.workspace_mb or stored["workspace_mb"]
    args.precision = args.precision or stored["precision"]
    profile = stored["batch_profile"]
    args.min_batch = args.min_batch or profile[0]
    args.opt_batch = args.opt_batch or profile[1]
    args.max_batch = args.max_batch or profile[2]
    if not args.min_batch <= args.opt_batch <= args.max_batch:
        parser.error("need --min-batch <= --opt-batch <= --max-batch")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the build will do, resolved from engine.json and the command line."""
    shape = args.stored["input"]["shape"]
    dynamic = any(d < 0 for d in shape)
    flags = ["INT8", "FP16"][: 1 if args.no_fp16 else 2] if args.precision == "int8" else ["FP16"]
    pinned = [] if args.no_fp32_pins else list(args.stored.get("fp32_tensors", []))
    return {
        "onnx": str(args.onnx),
        "engine": str(args.engine),
        "timing_cache": str(args.timing_cache),
        "precision": args.precision,
        "flags": flags + (["OBEY_PRECISION_CONSTRAINTS"] if pinned and "FP16" in flags else []),
        "workspace_mb": args.workspace_mb,
        "input": {"name": args.stored["input"]["name"], "shape": shape},
        "profile": [args.min_batch, args.opt_batch, args.max_batch] if dynamic else None,
        "fp32_tensors": pinned,
    }


def pin_fp32_layers(trt: Any, network: Any, tensors: set[str]) -> int:
    """Run every layer that produces one of ``tensors`` in FP32 with FP32 outputs; returns how many."""
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not any(out.name in tensors for out in outputs):
            continue
        layer.precision = trt.float32
        for j, out in enumerate(outputs):
            if out.dtype in floats:  # shape and index outputs keep their integer type
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = settings(args)
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    try:
        import tensorrt as trt
    except ImportError:
        print(
            "error: the tensorrt Python package is not installed (JetPack ships it; pip install tensorrt)",
            file=sys.stderr,
        )
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
        config.set_flag(trt.BuilderFlag.FP16)  # layers without Q/DQ run FP16, unless pinned below
    if "OBEY_PRECISION_CONSTRAINTS" in plan["flags"]:
        pinned = pin_fp32_layers(trt, network, set(plan["fp32_tensors"]))
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        print(f"pinned {pinned} layers to FP32 (their values leave FP16's range on the calibration images)")
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
    print(
        f"wrote {args.engine} ({args.engine.stat().st_size / 2**20:.1f} MiB) in {seconds:.0f} s with "
        f"TensorRT {trt.__version__}, flags {'+'.join(plan['flags'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
