"""OpenVINO INT8 latency on this CPU: our NNCF build vs FP32 (f32 and default hint) and plain nncf.quantize.

    python benchmarks/openvino_int8.py [--models t2t_vit_7 mobilenet_v2] [--calib 300] [--threads 2]
                                       [--min-iters 200] [--min-seconds 10] [--round-iters 20]

Batch 1, ``INFERENCE_NUM_THREADS=threads``, PERFORMANCE_HINT=LATENCY. The four variants of a model are
timed in interleaved rounds (direction alternating each round) until every one has run at least
``--min-iters`` iterations and ``--min-seconds`` seconds, so load from other processes hits them alike.
Weights are random (no published T2T-ViT weights are reachable here), which does not change latency;
calibration uses real Fashion-MNIST training images through each model's own 224 px eval transform.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2tedge.calibration import select_indices
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.evaluation.accuracy import agreement
from t2tedge.evaluation.host import host_info
from t2tedge.evaluation.latency import summarize, time_interleaved
from t2tedge.models import get_spec
from t2tedge.models.conditioning import well_conditioned
from t2tedge.pipeline.export import export_onnx
from t2tedge.pipeline.recipe import QuantizationConfig
from t2tedge.pipeline.store import Artifact
from t2tedge.targets import BuildInputs, get_target
from t2tedge.targets.openvino import MODEL_XML, OpenVinoRunner, count_ops, quiet_nncf


def build_variants(name: str, calibration: np.ndarray, threads: int, workdir: Path) -> dict[str, dict[str, Any]]:
    """The four compiled variants of one model, each with what it is and how it was built."""
    import nncf
    import openvino as ov

    spec = get_spec(name)
    size = spec.preprocess.input_size
    torch.manual_seed(0)
    onnx_path = workdir / f"{name}.onnx"
    export_onnx(well_conditioned(spec.create(num_classes=1000, image_size=size), calibration[:32]), size, onnx_path)
    target = get_target("openvino")
    variants: dict[str, dict[str, Any]] = {}

    fp32_dir = workdir / "fp32"
    fp32_dir.mkdir()
    inputs = BuildInputs(onnx_path=onnx_path, image_size=size, num_classes=1000, family=spec.family, config={})
    fp32_facts = target.build(inputs, "fp32", fp32_dir)
    variants["fp32 (f32 hint)"] = {"runner": OpenVinoRunner(fp32_dir / MODEL_XML, "f32", threads), "build": fp32_facts}
    variants["fp32 (default hint)"] = {"runner": OpenVinoRunner(fp32_dir / MODEL_XML, None, threads)}

    int8_dir = workdir / "int8"
    int8_dir.mkdir()
    inputs.config = QuantizationConfig().for_target("openvino")
    inputs.calibration = calibration
    started = time.perf_counter()
    int8_facts = target.build(inputs, "int8", int8_dir)
    int8_facts["build_seconds"] = round(time.perf_counter() - started, 1)
    variants["int8 (t2tedge)"] = {"runner": target.load(Artifact(int8_dir), threads), "build": int8_facts}

    plain_dir = workdir / "plain"
    plain_dir.mkdir()
    started = time.perf_counter()
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    with quiet_nncf():
        plain = nncf.quantize(ov.convert_model(str(onnx_path)), dataset)  # everything at NNCF's defaults
    seconds = round(time.perf_counter() - started, 1)
    ov.save_model(plain, plain_dir / MODEL_XML, compress_to_fp16=False)
    variants["int8 (nncf.quantize defaults)"] = {
        "runner": OpenVinoRunner(plain_dir / MODEL_XML, None, threads),
        "build": {"fake_quantize_ops": count_ops(plain, "FakeQuantize"), "build_seconds": seconds},
    }
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["t2t_vit_7", "mobilenet_v2"])
    parser.add_argument("--calib", type=int, default=300, help="calibration images (Fashion-MNIST train)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--min-iters", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--round-iters", type=int, default=20, help="iterations per variant per round")
    parser.add_argument("--fidelity-images", type=int, default=16, help="held-out images to compare outputs on")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "openvino_int8.json")
    args = parser.parse_args()

    train, test = open_dataset("fashion_mnist:train"), open_dataset("fashion_mnist:test")
    calib_indices = select_indices(train.labels, args.calib, seed=0)
    test_indices = select_indices(test.labels, args.fidelity_images, seed=0)
    load_start = os.getloadavg()
    results: dict[str, Any] = {}
    for name in args.models:
        spec = get_spec(name)
        calibration = preprocess(train, calib_indices, spec.preprocess, f"{name} calibration")
        held_out = preprocess(test, test_indices, spec.preprocess, f"{name} held-out")
        with tempfile.TemporaryDirectory() as tmp:
            variants = build_variants(name, calibration, args.threads, Path(tmp))
            runners = {key: v["runner"] for key, v in variants.items()}
            reference = runners["fp32 (f32 hint)"](held_out)
            times = time_interleaved(
                runners, calibration[:1], args.warmup, args.min_iters, args.min_seconds, args.round_iters
            )
        base = np.median(times["fp32 (f32 hint)"])
        rows = {}
        for key, variant in variants.items():
            runner = variant["runner"]
            rows[key] = {
                "precision_hint_requested": runner.precision_hint_requested or "plugin default",
                "inference_precision": runner.inference_precision,
                "threads": runner.threads,
                **summarize(times[key]),
                "speedup_vs_fp32_f32": round(float(base / np.median(times[key])), 3),
                "vs_fp32_f32_outputs": agreement(runner(held_out), reference),
                **({"build": variant["build"]} if "build" in variant else {}),
            }
        fp32, ours, plain = rows["fp32 (f32 hint)"], rows["int8 (t2tedge)"], rows["int8 (nncf.quantize defaults)"]
        results[name] = {
            "image_size": spec.preprocess.input_size,
            "weights": "random (BatchNorm re-estimated, residual branches damped); agreement is indicative only",
            "variants": rows,
            "int8_speedup_vs_fp32_f32": ours["speedup_vs_fp32_f32"],
            "int8_speedup_vs_nncf_defaults": round(plain["latency_ms_p50"] / ours["latency_ms_p50"], 3),
            # p10 approximates the latency in the quieter moments of a shared host
            "p10_int8_speedup_vs_fp32_f32": round(fp32["latency_ms_p10"] / ours["latency_ms_p10"], 3),
            "p10_int8_speedup_vs_nncf_defaults": round(plain["latency_ms_p10"] / ours["latency_ms_p10"], 3),
        }
        summary = [f"{key} {row['latency_ms_p50']:.2f} ms [{row['inference_precision']}]" for key, row in rows.items()]
        print(f"{name}: " + ", ".join(summary))

    import nncf
    import openvino as ov

    report = {
        "benchmark": "openvino_int8",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {**host_info(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "versions": {"openvino": ov.get_version(), "nncf": nncf.__version__, "torch": torch.__version__},
        "settings": {
            "batch": 1,
            "threads": args.threads,
            "performance_hint": "LATENCY",
            "warmup": args.warmup,
            "min_iters": args.min_iters,
            "min_seconds": args.min_seconds,
            "round_iters": args.round_iters,
            "calibration_images": len(calib_indices),
            "calibration_source": "fashion_mnist:train, model eval transform",
        },
        "models": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
