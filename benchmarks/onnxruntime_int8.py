"""ONNX Runtime INT8 (QDQ, U8S8) vs FP32 latency on this CPU, and peak memory of histogram calibration.

    python benchmarks/onnxruntime_int8.py [--models t2t_vit_7 mobilenet_v2] [--threads 2] [--calib 64]
                                          [--min-iters 200] [--min-seconds 10] [--round-iters 20]
                                          [--memory-images 300] [--memory-methods entropy percentile]

Latency: batch 1, ``intra_op_num_threads=threads``; FP32 and INT8 sessions are timed in interleaved rounds
(direction alternating each round) until each has run ``--min-iters`` iterations and ``--min-seconds``
seconds, after ``--warmup`` runs, so load from other processes hits both alike. Weights are random (no
published T2T-ViT weights are reachable here), which does not change latency; calibration uses real
Fashion-MNIST training images through each model's own 224 px eval transform.

Memory: each method calibrates T2T-ViT-7 on ``--memory-images`` images in a fresh child process, which
reports its peak RSS (``ru_maxrss``) before and after calibrating.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2tedge.calibration import select_indices
from t2tedge.calibration.onnx_qdq import QdqSettings, calibrate
from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.evaluation.accuracy import agreement
from t2tedge.evaluation.host import host_info
from t2tedge.evaluation.latency import summarize, time_interleaved
from t2tedge.models import get_spec
from t2tedge.pipeline.export import export_onnx
from t2tedge.pipeline.recipe import QuantizationConfig
from t2tedge.targets import BuildInputs, get_target

RANDOM_WEIGHTS_NOTE = {
    True: "random; output agreement is indicative only",
    False: "random; a random MobileNet's logits collapse to ~1e-10, so output agreement means nothing here",
}


def export_random(name: str, workdir: Path) -> Path:
    spec = get_spec(name)
    torch.manual_seed(0)
    path = workdir / f"{name}.onnx"
    export_onnx(spec.create(num_classes=1000, image_size=spec.preprocess.input_size), spec.preprocess.input_size, path)
    return path


def build_int8(onnx_path: Path, name: str, calibration: np.ndarray, out_dir: Path, **overrides: Any) -> dict:
    """The target's INT8 build with the recipe defaults (plus ``overrides`` of the ORT section)."""
    spec = get_spec(name)
    config = QuantizationConfig(onnxruntime=overrides).for_target("onnxruntime")
    inputs = BuildInputs(onnx_path, spec.preprocess.input_size, 1000, calibration=calibration, hints=spec.quantization)
    out_dir.mkdir()
    started = time.perf_counter()
    facts = get_target("onnxruntime").build(inputs, "int8", config, out_dir)
    facts["build_seconds"] = round(time.perf_counter() - started, 1)
    return facts


def measure_calibration_memory(onnx_path: Path, images_path: Path, method: str) -> dict[str, Any]:
    """Calibrate in a fresh child process; its peak RSS is the calibration's."""
    command = [sys.executable, __file__, "--calibration-child", method, str(onnx_path), str(images_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_now_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def calibration_child(method: str, onnx_path: str, images_path: str) -> None:
    images = np.load(images_path, mmap_mode="r")
    before_kb = _rss_now_kb()
    with tempfile.TemporaryDirectory() as tmp:
        calibrated = calibrate(Path(onnx_path), images, QdqSettings(method=method), Path(tmp))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "method": method,
                "images": int(len(images)),
                "peak_rss_mb": round(peak_kb / 1024, 1),
                # the process after its imports, before calibrating (the peak may predate calibration)
                "rss_before_calibration_mb": round(before_kb / 1024, 1),
                **calibrated.facts["calibration"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["t2t_vit_7", "mobilenet_v2"])
    parser.add_argument("--calib", type=int, default=64, help="calibration images for the timed INT8 models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--min-iters", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--round-iters", type=int, default=20, help="iterations per variant per round")
    parser.add_argument("--s8s8", action="store_true", help="also time int8 activations (S8S8)")
    parser.add_argument("--fidelity-images", type=int, default=16, help="held-out images to compare outputs on")
    parser.add_argument("--memory-images", type=int, default=300, help="0 skips the calibration memory runs")
    parser.add_argument("--memory-methods", nargs="+", default=["entropy", "percentile"])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "onnxruntime_int8.json")
    parser.add_argument("--calibration-child", nargs=3, metavar=("METHOD", "ONNX", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calibration_child:
        calibration_child(*args.calibration_child)
        return

    train, test = open_dataset("fashion_mnist:train"), open_dataset("fashion_mnist:test")
    load_start = os.getloadavg()
    results: dict[str, Any] = {}
    memory: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ort-int8-bench-") as tmp:
        workdir = Path(tmp)
        for name in args.models:
            spec = get_spec(name)
            calibration = preprocess(
                train, select_indices(train.labels, args.calib, seed=0), spec.preprocess, f"{name} calibration"
            )
            held_out = preprocess(
                test, select_indices(test.labels, args.fidelity_images, seed=0), spec.preprocess, f"{name} held-out"
            )
            onnx_path = export_random(name, workdir)
            builds = {"int8 (U8S8)": build_int8(onnx_path, name, calibration, workdir / f"{name}-u8s8")}
            if args.s8s8:
                builds["int8 (S8S8)"] = build_int8(
                    onnx_path, name, calibration, workdir / f"{name}-s8s8", activation_type="int8"
                )
            runners = {"fp32": OnnxSession(onnx_path, args.threads)}
            for key in builds:
                folder = "u8s8" if "U8S8" in key else "s8s8"
                runners[key] = OnnxSession(workdir / f"{name}-{folder}" / "model.onnx", args.threads)
            reference = runners["fp32"](held_out)
            times = time_interleaved(
                runners, calibration[:1], args.warmup, args.min_iters, args.min_seconds, args.round_iters
            )
            rows = {key: summarize(times[key]) for key in runners}
            for key, build in builds.items():
                rows[key]["speedup_vs_fp32"] = round(rows["fp32"]["latency_ms_p50"] / rows[key]["latency_ms_p50"], 3)
                rows[key]["p10_speedup_vs_fp32"] = round(
                    rows["fp32"]["latency_ms_p10"] / rows[key]["latency_ms_p10"], 3
                )
                rows[key]["vs_fp32_outputs"] = agreement(runners[key](held_out), reference)
                rows[key]["build"] = build
            results[name] = {
                "image_size": spec.preprocess.input_size,
                "weights": RANDOM_WEIGHTS_NOTE[spec.family == "t2t_vit"],
                "variants": rows,
                "int8_speedup_vs_fp32": rows["int8 (U8S8)"]["speedup_vs_fp32"],
            }
            print(f"{name}: " + ", ".join(f"{key} {row['latency_ms_p50']:.2f} ms" for key, row in rows.items()))

        if args.memory_images:
            spec = get_spec("t2t_vit_7")
            onnx_path = workdir / "t2t_vit_7.onnx"
            if not onnx_path.exists():
                onnx_path = export_random("t2t_vit_7", workdir)
            images = preprocess(
                train, select_indices(train.labels, args.memory_images, seed=0), spec.preprocess, "memory calibration"
            )
            images_path = workdir / "memory_images.npy"
            np.save(images_path, images)
            del images
            for method in args.memory_methods:
                memory.append({"model": "t2t_vit_7", **measure_calibration_memory(onnx_path, images_path, method)})
                print(f"calibration memory: {memory[-1]}")

    import onnxruntime

    report = {
        "benchmark": "onnxruntime_int8",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {**host_info(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "settings": {
            "batch": 1,
            "threads": args.threads,
            "warmup": args.warmup,
            "min_iters": args.min_iters,
            "min_seconds": args.min_seconds,
            "round_iters": args.round_iters,
            "calibration_images": args.calib,
            "calibration_source": "fashion_mnist:train, model eval transform",
            "quantization": QuantizationConfig().for_target("onnxruntime").model_dump(),
        },
        "models": results,
        "calibration_memory": memory,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
