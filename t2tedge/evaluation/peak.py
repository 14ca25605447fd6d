"""This host's peak GEMM rate through each runtime, the yardstick for an artifact's efficiency.

One large MatMul (M = K = N = 1024 by default) is built as ONNX in FP32 and, through the same
``onnxruntime.quantization`` QDQ path the INT8 artifacts use, in INT8 (U8S8, per-channel weights).
onnxruntime runs both; OpenVINO reads the same two graphs and runs them at each precision it offers.
An artifact's efficiency is its achieved GMAC/s over the peak of the runtime and precision it ran in.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.evaluation.latency import summarize, time_interleaved

GEMM_SIZE = 1024


def _gemm_models(size: int, workdir: Path) -> tuple[Path, Path]:
    """FP32 and QDQ-INT8 ONNX files of Y = X @ W with X: (size, size), W: (size, size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from t2tedge.calibration.onnx_qdq import quiet_ort

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="gemm")],
        "peak_gemm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [size, size])],
        [weight],
    )
    fp32 = workdir / "gemm_fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"X": rng.standard_normal((size, size)).astype(np.float32)}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    int8 = workdir / "gemm_int8.onnx"
    with quiet_ort():
        quantize_static(
            str(fp32),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    return fp32, int8


def _openvino_gemm_runners(fp32: Path, int8: Path, threads: int | None) -> dict[str, Any]:
    """The FP32 graph at each float precision OpenVINO's CPU plugin offers, the QDQ graph as INT8.

    Keys name the precision the plugin reports it ran in, as the OpenVINO target's runtime facts do.
    """
    import openvino as ov

    core = ov.Core()
    offered = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    hints = ["f32"] + [hint for capability, hint in (("BF16", "bf16"), ("FP16", "f16")) if capability in offered]
    graphs = [(fp32, hint, f"openvino/{hint}") for hint in hints] + [(int8, None, "openvino/int8")]
    runners = {}
    for path, hint, key in graphs:
        properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if hint:
            properties["INFERENCE_PRECISION_HINT"] = hint
        if threads:
            properties["INFERENCE_NUM_THREADS"] = int(threads)
        request = core.compile_model(core.read_model(path), "CPU", properties).create_infer_request()
        runners[key] = lambda x, request=request: request.infer({0: x})[0]
    return runners


@functools.cache
def peak_gmacs(threads: int | None = None, size: int = GEMM_SIZE, min_seconds: float = 0.5) -> dict[str, Any]:
    """Peak GMAC/s per ``runtime/precision`` key (e.g. ``onnxruntime/int8``, ``openvino/bf16``), measured once."""
    from t2tedge.calibration.onnx_session import OnnxSession

    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = _gemm_models(size, Path(tmp))
        runners["onnxruntime/fp32"] = OnnxSession(fp32, threads)
        runners["onnxruntime/int8"] = OnnxSession(int8, threads)
        with contextlib.suppress(ImportError):
            runners.update(_openvino_gemm_runners(fp32, int8, threads))
        x = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
        times = time_interleaved(runners, x, warmup=5, min_iters=20, min_seconds=min_seconds, round_iters=5)
    macs = size**3
    peaks = {}
    for key, seconds in times.items():
        stats = summarize(seconds)
        peaks[key] = round(macs / (stats["latency_ms_p10"] / 1000.0) / 1e9, 1)  # p10: the rate it sustains at its best
    return {"gemm": f"{size}x{size}x{size} MatMul", "threads": threads or "runtime default", "gmacs": peaks}
