"""This host's peak GEMM rate through each runtime, the yardstick for an artifact's efficiency.

One large MatMul (M = K = N = 1024 by default) is built as ONNX in FP32 and, through the same
``onnxruntime.quantization`` QDQ path the INT8 artifacts use, in INT8 (U8S8, per-channel weights).
onnxruntime runs both; OpenVINO reads the same two graphs and runs them at each precision it offers.
An artifact's efficiency is its achieved GMAC/s over the peak of the runtime and precision it ran in.
"""

from __future__ import annotations

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


@functools.cache
def peak_gmacs(threads: int | None = None, size: int = GEMM_SIZE, min_seconds: float = 0.5) -> dict[str, Any]:
    """Peak GMAC/s per ``runtime/precision`` key (e.g. ``onnxruntime/int8``, ``openvino/bf16``), measured once."""
    from t2tedge.targets.onnxruntime import OnnxRuntimeRunner

    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = _gemm_models(size, Path(tmp))
        runners["onnxruntime/fp32"] = OnnxRuntimeRunner(fp32, threads)
        runners["onnxruntime/int8"] = OnnxRuntimeRunner(int8, threads)
        try:
            from t2tedge.targets.openvino import openvino_gemm_runners

            runners.update(openvino_gemm_runners(fp32, int8, threads))
        except ImportError:
            pass
        x = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
        times = time_interleaved(runners, x, warmup=5, min_iters=20, min_seconds=min_seconds, round_iters=5)
    macs = size**3
    peaks = {}
    for key, seconds in times.items():
        stats = summarize(seconds)
        peaks[key] = round(macs / (stats["latency_ms_p10"] / 1000.0) / 1e9, 1)  # p10: the rate it sustains at its best
    return {"gemm": f"{size}x{size}x{size} MatMul", "threads": threads or "runtime default", "gmacs": peaks}
