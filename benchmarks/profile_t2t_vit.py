"""Where T2T-ViT-7's time goes at 224 px, per op type, in the runtimes' own profilers: ONNX Runtime's
node trace and OpenVINO's per-layer performance counters, for the FP32 and INT8 builds ``tune`` timed.

    python benchmarks/profile_t2t_vit.py [--tune-result benchmarks/results/tune_t2t_vit.json]
                                         [--iters 100] [--threads 2] [--output ...]

It reads the artifacts named in a ``tune_t2t_vit.py`` result (run that with ``--keep DIR`` so that they
still exist; the plain ``nncf.quantize`` IR is taken from ``DIR/plain-nncf``), runs each ``--iters`` times
at batch 1 with its profiler on and sums each node's time per iteration, by op type and by class:

- ``gemm``: matrix products and convolutions (what INT8 speeds up);
- ``quantize``: quantize/dequantize/requantize steps INT8 adds;
- ``other``: everything else (LayerNorm, Softmax, GELU, the Performer's exp, reshapes, transposes, ...).

The bound it reports is Amdahl's: the FP32 build's total over its non-GEMM time is the speed-up an INT8
build could reach if its products took no time at all. Profiled times include the profilers' own
overhead, so they are compared as shares within one build, not against the interleaved latencies.
Results go to ``benchmarks/results/profile_t2t_vit.json`` with the host.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent

GEMM_OPS = {
    # ONNX Runtime (after its graph optimizations and Q/DQ fusions)
    "MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "MatMulInteger", "MatMulIntegerToFloat",
    "QLinearMatMul", "QGemm", "QLinearConv", "ConvInteger", "DynamicQuantizeMatMul", "NhwcFusedConv",
    # OpenVINO (CPU plugin layer types)
    "FullyConnected", "FullyConnectedQuantizedLegacy", "FullyConnectedQuantized", "Convolution",
    "GroupConvolution",
}  # fmt: skip
QUANTIZE_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "FakeQuantize", "QLinearAdd"}


def op_class(op_type: str) -> str:
    if op_type in GEMM_OPS:
        return "gemm"
    if op_type in QUANTIZE_OPS:
        return "quantize"
    return "other"


def summarize(per_op_us: dict[str, float], iters: int) -> dict[str, Any]:
    """Per-iteration milliseconds by op type and class, and each class's share of the profiled total."""
    per_op = {op: us / iters / 1000.0 for op, us in per_op_us.items()}
    total = sum(per_op.values())
    classes: dict[str, float] = defaultdict(float)
    for op, ms in per_op.items():
        classes[op_class(op)] += ms
    return {
        "profiled_ms_per_iter": round(total, 3),
        "by_class_ms": {k: round(v, 3) for k, v in sorted(classes.items())},
        "by_class_pct": {k: round(100.0 * v / total, 1) for k, v in sorted(classes.items())},
        "by_op_ms": {k: round(v, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
    }


def profile_onnxruntime(directory: Path, image: np.ndarray, iters: int, threads: int) -> dict[str, Any]:
    """The artifact in ``directory`` run as its loader runs it (its ``build.session_config`` applied)."""
    import onnxruntime as ort

    build = json.loads((directory / "manifest.json").read_text()).get("build", {})
    model = directory / "model.onnx"

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        for key, value in build.get("session_config", {}).items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(10):  # warm-up: excluded below by counting only the last ``iters`` runs
            session.run(None, {name: image})
        for _ in range(iters):
            session.run(None, {name: image})
        trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-iters]["ts"]  # nodes of the timed runs only
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < start:
            continue
        op = event["args"]["op_name"]
        per_op[op] += event["dur"]
    return {**summarize(per_op, iters), "session_config": build.get("session_config", {})}


def profile_openvino(xml: Path, hint: str | None, image: np.ndarray, iters: int, threads: int) -> dict[str, Any]:
    import openvino as ov

    from t2tedge.targets.openvino import DEVICE, compile_properties

    core = ov.Core()
    properties = {**compile_properties(hint, threads), "PERF_COUNT": True}
    compiled = core.compile_model(core.read_model(str(xml)), DEVICE, properties)
    request = compiled.create_infer_request()
    for _ in range(10):
        request.infer({0: image})
    per_op: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for _ in range(iters):
        request.infer({0: image})
        for info in request.profiling_info:  # the counters of this (the last) inference
            if info.status != info.Status.EXECUTED:
                continue
            us = info.real_time.total_seconds() * 1e6
            per_op[info.node_type] += us
            kernels[f"{info.node_type}:{info.exec_type}"] += us
    result = summarize(per_op, iters)
    result["by_kernel_ms"] = {
        k: round(v / iters / 1000.0, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]) if v / iters > 20
    }
    result["inference_precision_used"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return result


def bounds_of(builds: dict[str, Any]) -> dict[str, Any]:
    """Per runtime: the FP32 build's product share, Amdahl's bound, and the INT8 builds' product time."""
    bounds = {}
    for runtime, reference in (("onnxruntime", "onnxruntime fp32"), ("openvino", "openvino fp32 (f32)")):
        if reference in builds:
            ms = builds[reference]["by_class_ms"]
            total = builds[reference]["profiled_ms_per_iter"]
            non_gemm = total - ms.get("gemm", 0.0)
            bounds[runtime] = {
                "fp32_gemm_share_pct": builds[reference]["by_class_pct"].get("gemm", 0.0),
                "max_speedup_if_products_were_free": round(total / non_gemm, 2) if non_gemm > 0 else None,
                "int8_gemm_ms": {
                    n: b["by_class_ms"].get("gemm") for n, b in builds.items() if n.startswith(runtime) and "int8" in n
                },
                "fp32_gemm_ms": ms.get("gemm"),
            }
    return bounds


def reclassify(path: Path) -> None:
    """Recompute the classes and bounds of a result from its stored per-op times (no new measurement)."""
    result = json.loads(path.read_text())
    for build in result["builds"].values():
        build.update(summarize({op: ms * 1000.0 for op, ms in build["by_op_ms"].items()}, 1))
    result["bounds"] = bounds_of(result["builds"])
    result["reclassified"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["bounds"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune-result", type=Path, default=REPO / "benchmarks" / "results" / "tune_t2t_vit.json")
    parser.add_argument("--plain-nncf", type=Path, help="plain nncf.quantize IR (default: next to the artifacts)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "profile_t2t_vit.json")
    parser.add_argument("--reclassify", type=Path, help="recompute classes/bounds of this result's stored times")
    args = parser.parse_args()
    if args.reclassify:
        return reclassify(args.reclassify)

    from t2tedge.evaluation.host import host_fingerprint, host_info

    tune = json.loads(args.tune_result.read_text())
    fronts = tune["tune"]["fronts"]
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    builds: dict[str, Any] = {}

    def chosen(target: str) -> dict[str, Any] | None:
        return fronts[target]["chosen"]

    def recipe_point(target: str) -> dict[str, Any]:
        return next(p for p in fronts[target]["points"] if p["name"] == "recipe")

    def fp32_artifact(target: str) -> Path:
        if "fp32" in fronts[target]:
            return Path(fronts[target]["fp32"]["artifact"])
        # results written before the front kept its FP32 artifact: the one FP32 build beside the candidates
        (path,) = Path(recipe_point(target)["artifact"]).parent.glob("fp32-*[!.lock]")
        return path

    if "onnxruntime" in fronts:
        ort_fp32 = fp32_artifact("onnxruntime")
        builds["onnxruntime fp32"] = profile_onnxruntime(ort_fp32, image, args.iters, args.threads)
        for label, point in (("recipe", recipe_point("onnxruntime")), ("tuned", chosen("onnxruntime"))):
            if point:
                path = Path(point["artifact"])
                builds[f"onnxruntime int8 ({label}: {point['name']})"] = profile_onnxruntime(
                    path, image, args.iters, args.threads
                )
    if "openvino" in fronts:
        ov_fp32 = fp32_artifact("openvino")
        builds["openvino fp32 (f32)"] = profile_openvino(ov_fp32 / "model.xml", "f32", image, args.iters, args.threads)
        builds["openvino fp32 (plugin default)"] = profile_openvino(
            ov_fp32 / "model.xml", None, image, args.iters, args.threads
        )
        for label, point in (("recipe", recipe_point("openvino")), ("tuned", chosen("openvino"))):
            if point:
                directory = Path(point["artifact"])
                hint = json.loads((directory / "compile.json").read_text()).get("INFERENCE_PRECISION_HINT")
                builds[f"openvino int8 ({label}: {point['name']})"] = profile_openvino(
                    directory / "model.xml", hint, image, args.iters, args.threads
                )
        plain = args.plain_nncf or ov_fp32.parent.parent / "plain-nncf" / "model.xml"
        if plain.is_file():
            builds["openvino int8 (plain nncf.quantize)"] = profile_openvino(
                plain, None, image, args.iters, args.threads
            )

    bounds = bounds_of(builds)
    result = {
        "benchmark": "profile_t2t_vit",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "t2t_vit_7 (demo checkpoint, run at 224 px), batch 1",
        "threads": args.threads,
        "iters": args.iters,
        "tune_result": str(args.tune_result),
        "bounds": bounds,
        "builds": builds,
        "host": {**host_info(), "fingerprint": host_fingerprint()},
    }
    if tune.get("host", {}).get("fingerprint") != result["host"]["fingerprint"]:
        result["warning"] = "profiled on another host than the tune result's: shares only, no ratio across the two"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(bounds, indent=1))
    for name, build in builds.items():
        print(f"{name}: {build['profiled_ms_per_iter']} ms/iter, {build['by_class_pct']}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
