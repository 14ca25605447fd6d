"""NVIDIA ModelOpt's default INT8 Q/DQ placement of one ONNX graph; run inside ModelOpt's own venv.

    .venv-modelopt/bin/python benchmarks/modelopt_quantize.py MODEL.onnx CALIBRATION.npy OUTPUT.onnx
        [--calibration-method max|entropy] [--high-precision-dtype fp32|fp16] [--facts FACTS.json]

``benchmarks/tensorrt_vs_modelopt.py`` runs this in a subprocess: ModelOpt pins onnx and onnxruntime
versions of its own, so it stays out of t2tedge's environment. Everything but the named options is
ModelOpt's default (``quantize_mode="int8"``, pattern-based placement, per-channel weights); calibration
runs on onnxruntime's CPU provider. Imports nothing from t2tedge. ``--facts`` receives the versions, the
options and the seconds taken as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np


def versions(*names: str) -> dict[str, str]:
    """Installed versions of those of ``names`` that are installed (ModelOpt pulls one onnxruntime flavour)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calibration", type=Path, help=".npy of NCHW float32 images")
    parser.add_argument("output", type=Path)
    # ModelOpt's INT8 default is entropy; on T2T-ViT-7 at 224 px it fails ("Too many bins for data range")
    parser.add_argument("--calibration-method", choices=["max", "entropy"], default="max")
    parser.add_argument("--high-precision-dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--facts", type=Path, default=None)
    args = parser.parse_args()

    from modelopt.onnx.quantization import quantize

    calibration = np.load(args.calibration).astype(np.float32)
    options = {
        "quantize_mode": "int8",
        "calibration_method": args.calibration_method,
        "calibration_eps": ["cpu"],
        "high_precision_dtype": args.high_precision_dtype,
    }
    started = time.perf_counter()
    quantize(
        onnx_path=str(args.model),
        calibration_data=calibration,
        output_path=str(args.output),
        log_level="WARNING",
        **options,
    )
    facts = {
        "options": {**options, "calibration_images": len(calibration)},
        "seconds": round(time.perf_counter() - started, 1),
        "versions": versions("nvidia-modelopt", "onnx", "onnxruntime-gpu", "onnxruntime"),
    }
    if args.facts is not None:
        args.facts.write_text(json.dumps(facts, indent=2) + "\n")


if __name__ == "__main__":
    main()
