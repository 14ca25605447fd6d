"""ExecuTorch (XNNPACK) INT8 vs FP32 on T2T-ViT-7 at 224 px: latency in one process, agreement, delegation.

    python benchmarks/executorch_t2t.py [--threads 2] [--calib 300] [--agreement-images 250]
                                        [--min-iters 300] [--min-seconds 10] [--round-iters 20] [--no-standard]

Both programs are built by the ``executorch`` target (FP32: the export form lowered to XNNPACK; INT8:
the default PT2E recipe, linear and conv2d ops only) and loaded through its device loader with
``threads`` in the runtime's thread pool, batch 1. They are timed in interleaved rounds (direction
alternating each round) after ``--warmup`` runs each, until each has run ``--min-iters`` iterations and
``--min-seconds`` seconds, so load from other processes hits both alike; the load average is recorded.
Weights: the bundled demo T2T-ViT-7 (trained on Fashion-MNIST at 48 px, 10 classes), run at 224 px with
its sinusoid table regenerated (no trained 224 px weights are bundled); so top-1 against the labels is
no accuracy result, and INT8 fidelity is its top-1 agreement with the FP32 program on real test images
through the model's own 224 px eval transform. Calibration: real training images, the same transform.
``--no-standard`` skips building XNNPACK's standard PT2E recipe (recorded: it does not load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2tedge.artifact import Artifact, write_json
from t2tedge.calibration import select_indices
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.errors import T2tedgeError
from t2tedge.evaluation.accuracy import agreement, topk_accuracy
from t2tedge.evaluation.host import host_fingerprint, host_info
from t2tedge.evaluation.latency import summarize, time_interleaved
from t2tedge.models import demo_checkpoint, get_spec, load_model
from t2tedge.targets.base import BuildInputs
from t2tedge.targets.executorch import ExecuTorchConfig, ExecuTorchTarget

IMAGE_SIZE = 224
MODEL = "t2t_vit_7"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def build(target: ExecuTorchTarget, inputs: BuildInputs, precision: str, config: ExecuTorchConfig, out: Path) -> Any:
    out.mkdir(parents=True)
    started = time.perf_counter()
    facts = target.build(inputs, precision, config, out)
    facts["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "manifest.json", {"target": target.name, "precision": precision, "build": facts})
    return Artifact(out), facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=300, help="calibration images (the recipe default)")
    parser.add_argument("--agreement-images", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--min-iters", type=int, default=300)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--round-iters", type=int, default=20)
    parser.add_argument("--no-standard", action="store_true", help="skip the standard-recipe build")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "executorch_t2t.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start, uptime_start = os.getloadavg(), uptime()
    started = time.perf_counter()

    loaded = load_model(get_spec(MODEL), demo_checkpoint(MODEL), image_size=IMAGE_SIZE)
    model = loaded.model.eval()
    train, test = open_dataset("fashion_mnist:train"), open_dataset("fashion_mnist:test")
    calibration = preprocess(
        train, select_indices(train.labels, args.calib, seed=0), loaded.preprocess, "calibration (224 px)"
    )
    test_indices = select_indices(test.labels, args.agreement_images, seed=0)
    images = preprocess(test, test_indices, loaded.preprocess, "test images (224 px)")
    labels = test.labels[test_indices]
    inputs = BuildInputs(
        onnx_path=Path("unused"),
        image_size=IMAGE_SIZE,
        num_classes=loaded.num_classes,
        calibration=calibration,
        torch_model=model,
        export_form=model.export_form(),
        preprocess=loaded.preprocess.to_dict(),
    )
    target = ExecuTorchTarget()
    default = ExecuTorchConfig()
    builds: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="executorch-bench-") as tmp:
        artifacts = {}
        for precision in ("fp32", "int8"):
            artifacts[precision], builds[precision] = build(target, inputs, precision, default, Path(tmp) / precision)
        if not args.no_standard:
            standard = ExecuTorchConfig(quantize="standard")
            try:
                _, facts = build(target, inputs, "int8", standard, Path(tmp) / "int8-standard")
                builds["int8 (standard recipe)"] = facts
            except T2tedgeError as exc:
                builds["int8 (standard recipe)"] = {"quantize": "standard", "build_error": str(exc)}
        runners = {key: target.load(artifact, args.threads) for key, artifact in artifacts.items()}

        with torch.no_grad():
            eager = model(torch.from_numpy(images)).numpy()
        logits = {key: runner(images) for key, runner in runners.items()}
        fidelity = {
            "images": int(len(images)),
            "source": "fashion_mnist:test, class-balanced (select_indices seed 0), 224 px eval transform",
            "int8_vs_fp32_program": agreement(logits["int8"], logits["fp32"]),
            "fp32_program_vs_eager": {
                **agreement(logits["fp32"], eager),
                "max_abs_logit_diff": float(np.max(np.abs(logits["fp32"] - eager))),
            },
            "top1_vs_labels_not_an_accuracy_result": {
                key: topk_accuracy(value, labels, 1) for key, value in {**logits, "eager": eager}.items()
            },
        }

        image = images[:1].copy()
        seconds = time_interleaved(runners, image, args.warmup, args.min_iters, args.min_seconds, args.round_iters)
        latency = {key: summarize(value) for key, value in seconds.items()}
        runtime_facts = {key: runner.runtime_facts for key, runner in runners.items()}

    p50 = {key: latency[key]["latency_ms_p50"] for key in latency}
    speedup = p50["fp32"] / p50["int8"]
    int8_agreement = fidelity["int8_vs_fp32_program"]["top1_agreement"]
    result = {
        "benchmark": "executorch_t2t",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": MODEL,
        "weights": "bundled demo checkpoint (Fashion-MNIST, trained at 48 px, 10 classes), run at 224 px",
        "image_size": IMAGE_SIZE,
        "batch": 1,
        "threads": args.threads,
        "timing": (
            f"one process, fp32 and int8 interleaved in rounds of {args.round_iters} (direction alternating), "
            f"{args.warmup} warm-up runs each, >= {args.min_iters} iterations and >= {args.min_seconds} s each"
        ),
        "calibration": {"images": int(len(calibration)), "source": "fashion_mnist:train, class-balanced, seed 0"},
        "tool_versions": target.tool_versions(),
        "latency": latency,
        "p50_ms": p50,
        "int8_speedup_p50": round(speedup, 3),
        "fidelity": fidelity,
        "targets": {
            "int8_top1_agreement_min": 98.0,
            "int8_speedup_min": 1.6,
            "agreement_met": int8_agreement >= 98.0,
            "speedup_met": speedup >= 1.6,
        },
        "builds": builds,
        "runtime": runtime_facts,
        "host": {
            **host_info(),
            "fingerprint": host_fingerprint(),
            "loadavg_1_5_15_start": load_start,
            "loadavg_1_5_15_end": os.getloadavg(),
            "uptime_start": uptime_start,
            "uptime_end": uptime(),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({"p50_ms": p50, "speedup": result["int8_speedup_p50"], "agreement": int8_agreement}))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
