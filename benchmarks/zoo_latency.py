"""Latency of the model zoo at 224 px: ONNX Runtime, OpenVINO and ExecuTorch, FP32 and INT8, built by the targets.

    python benchmarks/zoo_latency.py [--models t2t_vit_7 ... mobilenet_v3_small] [--calib 64] [--threads 2]
                                     [--warmup 10] [--min-iters 50] [--min-seconds 3] [--round-iters 10]

Each model is exported once (random weights made well-conditioned; latency does not depend on them) and
built six times through ``get_target(...).build``: ONNX Runtime fp32 / int8 (QDQ), OpenVINO fp32
(compiled with ``INFERENCE_PRECISION_HINT=f32``) / int8 (NNCF) and ExecuTorch fp32 / int8 (XNNPACK,
PT2E; skipped where executorch is not installed), with the recipe's default quantization settings and
``--calib`` Fashion-MNIST training images through the model's own eval transform. The artifacts of a
model are loaded with ``target.load(artifact, threads)`` and timed together in interleaved rounds
(``time_interleaved``), so load from other processes hits them alike. Efficiency is the achieved GMAC/s
over this host's peak GEMM rate in the same runtime and precision (``peak_gmacs``, measured before and
after the models; the better of the two).
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

from t2tedge.artifact import list_files, write_json
from t2tedge.calibration import select_indices
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.evaluation.host import host_info
from t2tedge.evaluation.latency import ROUND_SECONDS, SETTLE_SECONDS, STEADY_RATIO, summarize, time_interleaved
from t2tedge.evaluation.peak import peak_gmacs
from t2tedge.models import get_spec, graph_form
from t2tedge.models.conditioning import well_conditioned
from t2tedge.pipeline.bench import _efficiency, model_macs
from t2tedge.pipeline.export import export_onnx
from t2tedge.pipeline.recipe import QuantizationConfig
from t2tedge.pipeline.store import Artifact
from t2tedge.targets import BuildInputs, get_target

MODELS = (
    "t2t_vit_7",
    "t2t_vit_12",
    "t2t_vit_14",
    "t2t_vit_t_14",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
)
VARIANTS = tuple(
    (target, precision)
    for target in ("onnxruntime", "openvino", "executorch")
    for precision in ("fp32", "int8")
    if get_target(target).availability().can_build
)
NUM_CLASSES = 1000


def build_model(name: str, size: int, calibration: np.ndarray, workdir: Path) -> tuple[dict[str, Any], dict]:
    """Export one model and build its variants; returns their runner-less build records and facts."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = well_conditioned(spec.create(num_classes=NUM_CLASSES, image_size=size), calibration[:32])
    params = sum(p.numel() for p in model.parameters())
    onnx_path = workdir / f"{name}.onnx"
    export_onnx(model, size, onnx_path)
    builds: dict[str, Any] = {}
    for target_name, precision in VARIANTS:
        target = get_target(target_name)
        out_dir = workdir / f"{target_name}-{precision}"
        out_dir.mkdir()
        int8 = precision == "int8"
        inputs = BuildInputs(
            onnx_path=onnx_path,
            image_size=size,
            num_classes=NUM_CLASSES,
            calibration=calibration if int8 else None,
            torch_model=model,
            export_form=graph_form(model),
            hints=spec.quantization,
        )
        started = time.perf_counter()
        facts = target.build(inputs, precision, QuantizationConfig().for_target(target_name), out_dir)
        # a manifest as the store writes it: loaders read their build facts, and every file is verified
        manifest = {"model": name, "target": target_name, "precision": precision, "build": facts}
        write_json(out_dir / "manifest.json", {**manifest, "files": list_files(out_dir)})
        builds[f"{target_name}/{precision}"] = {
            "dir": out_dir,
            "build_seconds": round(time.perf_counter() - started, 1),
            "facts": facts,
        }
    return builds, {"params": params, "family": spec.family}


def time_model(
    name: str, size: int, builds: dict[str, Any], image: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """Load the artifacts, time them interleaved, and summarize each (with a manifest-like record)."""
    runners = {}
    for key, build in builds.items():
        runners[key] = get_target(key.split("/")[0]).load(Artifact(build["dir"]), args.threads)
    rounds: dict[str, dict[str, Any]] = {}
    times = time_interleaved(
        runners, image, args.warmup, args.min_iters, args.min_seconds, args.round_iters, rounds_out=rounds
    )
    rows: dict[str, Any] = {}
    for key, runner in runners.items():
        target_name, precision = key.split("/")
        # what the runtime really used (OpenVINO: the precision the plugin ran in)
        record: dict[str, Any] = {"batch": args.batch, "threads": args.threads, "runtime": runner.runtime_facts}
        record.update(summarize(times[key], args.batch))
        record["rounds"] = rounds[key]  # slow-host rounds set aside (STEADY_RATIO)
        manifest = {
            "model": name,
            "target": target_name,
            "precision": precision,
            "model_io": {"image_size": size, "num_classes": NUM_CLASSES},
        }
        record["manifest"] = manifest  # for the efficiency, once the host's peak is known
        facts = builds[key]["facts"]
        record["build_seconds"] = builds[key]["build_seconds"]
        if "quantization" in facts:
            record["quantization"] = facts["quantization"]
        if "fake_quantize_ops" in facts:
            record["fake_quantize_ops"] = facts["fake_quantize_ops"]
        rows[key] = record
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    header = (
        "| model | params (M) | GMACs | ORT fp32 p50 ms | ORT int8 p50 ms | ORT int8 speed-up | OV f32 p50 ms "
        "| OV int8 p50 ms | OV int8 speed-up | ET fp32 p50 ms | ET int8 p50 ms | ET int8 speed-up "
        "| efficiency % (ORT fp32 / int8, OV f32 / int8) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        v = entry["variants"]
        p50 = {key: row["latency_ms_p50"] for key, row in v.items()}
        eff = " / ".join(f"{v[key].get('efficiency_pct', float('nan')):.1f}" for key in v if "efficiency_pct" in v[key])
        nan = float("nan")
        et = f"| {p50.get('executorch/fp32', nan):.2f} | {p50.get('executorch/int8', nan):.2f} "
        et += f"| {entry.get('et_int8_speedup', nan):.2f}x "
        lines.append(
            f"| {name} | {entry['params_m']:.1f} | {entry['gmacs']:.2f} "
            f"| {p50['onnxruntime/fp32']:.2f} | {p50['onnxruntime/int8']:.2f} | {entry['ort_int8_speedup']:.2f}x "
            f"| {p50['openvino/fp32']:.2f} | {p50['openvino/int8']:.2f} | {entry['ov_int8_speedup']:.2f}x {et}| {eff} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calib", type=int, default=64, help="calibration images (Fashion-MNIST train)")
    parser.add_argument("--batch", type=int, default=1, choices=[1], help="the exports have a fixed batch of 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--min-iters", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--round-iters", type=int, default=10, help="iterations per variant per round")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "zoo_latency.json")
    args = parser.parse_args()

    train = open_dataset("fashion_mnist:train")
    calib_indices = select_indices(train.labels, args.calib, seed=0)
    load_start = os.getloadavg()
    started = time.perf_counter()
    peaks_start = peak_gmacs(args.threads)
    results: dict[str, Any] = {}
    for name in args.models:
        spec = get_spec(name)
        size = spec.preprocess.input_size  # 224 for every model of the zoo
        calibration = preprocess(train, calib_indices, spec.preprocess, f"{name} calibration")
        with tempfile.TemporaryDirectory(prefix="zoo-latency-") as tmp:
            builds, info = build_model(name, size, calibration, Path(tmp))
            rows = time_model(name, size, builds, calibration[: args.batch], args)
        p50 = {key: row["latency_ms_p50"] for key, row in rows.items()}
        results[name] = {
            "image_size": size,
            "family": info["family"],
            "params_m": round(info["params"] / 1e6, 2),
            "gmacs": round(model_macs(name, size, NUM_CLASSES) / 1e9, 3),
            "variants": rows,
            "ort_int8_speedup": round(p50["onnxruntime/fp32"] / p50["onnxruntime/int8"], 3),
            "ov_int8_speedup": round(p50["openvino/fp32"] / p50["openvino/int8"], 3),
        }
        if "executorch/int8" in p50:
            results[name]["et_int8_speedup"] = round(p50["executorch/fp32"] / p50["executorch/int8"], 3)
        print(f"{name}: " + ", ".join(f"{key} {ms:.2f} ms" for key, ms in p50.items()), flush=True)

    # The peak GEMM rate is measured before and after the models; on a shared host the better of the two
    # is the closer estimate of what the host can do (a peak taken during a busy spell inflates efficiency).
    peaks_end = peak_gmacs(args.threads, min_seconds=1.0)
    peaks = {
        **peaks_start,
        "gmacs": {k: max(v, peaks_end["gmacs"].get(k, 0.0)) for k, v in peaks_start["gmacs"].items()},
        "measured": {"start": peaks_start["gmacs"], "end": peaks_end["gmacs"]},
    }
    for entry in results.values():
        for record in entry["variants"].values():
            _efficiency(record, record.pop("manifest"), peaks)

    report = {
        "benchmark": "zoo_latency",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {**host_info(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "settings": {
            "batch": args.batch,
            "threads": args.threads,
            "warmup": args.warmup,
            "min_iters": args.min_iters,
            "min_seconds": args.min_seconds,
            "round_iters": args.round_iters,
            "settle_seconds": SETTLE_SECONDS,
            "round_seconds": ROUND_SECONDS,
            "steady_ratio": STEADY_RATIO,
            "timing": "the variants of a model interleaved (time_interleaved), direction alternating per round",
            "weights": "random, well_conditioned (BatchNorm re-estimated, residual branches damped)",
            "calibration_images": len(calib_indices),
            "calibration_source": "fashion_mnist:train, class-balanced (seed 0), model eval transform",
            "quantization": "recipe defaults (QuantizationConfig) through each target's build",
            "openvino_fp32": "INFERENCE_PRECISION_HINT=f32; int8 at the plugin's default hint",
        },
        "peak_gmacs": peaks,
        "models": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    host = report["host"]
    print(
        f"\nHost: {host['processor']}, {host['cores']} cores ({', '.join(host['isa'])}), {args.threads} threads, "
        f"batch {args.batch}; load average {load_start[0]:.2f} at start, {report['host']['loadavg_1_5_15_end'][0]:.2f} "
        f"at end\n"
    )
    print(markdown_table(results))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
