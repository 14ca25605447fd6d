"""T2T-ViT_t-14 through the TensorRT and Core ML targets: lint, conversion, emulated accuracy vs FP32.

    python benchmarks/t2t_vit_t_14_targets.py [--checkpoint PATH] [--epochs 4] [--output-dir DIR]

T2T-ViT_t-14 (21 M parameters) is too large to ship as a demo model, so this trains one the way the
bundled demo models were trained (48 px, from scratch on the bundled Fashion-MNIST subset, no
augmentation) unless ``--checkpoint`` names one, then runs the product's own build for the TensorRT
(fp16, int8 Q/DQ) and Core ML (fp16, int8-weights, w8a8) targets with the ONNX Runtime FP32 artifact
as the measured reference, and writes ``benchmarks/results/t2t_vit_t_14_targets.json``: per artifact
the top-1 (label), its difference to FP32, the TensorRT lint summary and the Core ML sizes and
quantized-op counts. Latency is not measured here (TensorRT and Core ML cannot run on this host).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from t2tedge.data.datasets import open_dataset
from t2tedge.evaluation.host import host_info
from t2tedge.models import get_spec
from t2tedge.pipeline.build import Builder
from t2tedge.pipeline.recipe import Recipe
from t2tedge.pipeline.store import read_manifest
from t2tedge.training import TrainConfig, train

MODEL = "t2t_vit_t_14"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint (default: train one)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", type=Path, default=Path("artifacts-t2t_vit_t_14"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / f"{MODEL}_targets.json")
    args = parser.parse_args()

    checkpoint = args.checkpoint or args.output_dir / f"{MODEL}-fashion_mnist.pt"
    training = None
    if not checkpoint.is_file():
        cfg = TrainConfig(epochs=args.epochs, image_size=48, crop_pct=1.0, lr=1e-3, augment=False,
                          threads=args.threads)  # fmt: skip
        splits = open_dataset("fashion_mnist:train"), open_dataset("fashion_mnist:test")
        training = train(get_spec(MODEL), *splits, checkpoint, cfg)
    elif checkpoint.with_suffix(".json").is_file():
        training = json.loads(checkpoint.with_suffix(".json").read_text())

    recipe = Recipe.model_validate(
        {
            "name": MODEL,
            "output_dir": args.output_dir,
            "models": [{"name": MODEL, "weights": str(checkpoint)}],
            "targets": ["onnxruntime", "tensorrt", "coreml"],
            "precisions": ["fp32", "fp16", "int8", "int8-weights", "w8a8"],
            "benchmark": {"enabled": False},
            "threads": args.threads,
        }
    )
    builder = Builder(recipe)
    rows = builder.run()
    fp32 = builder.model_facts[MODEL]["fp32_torch"]["top1"]
    results = []
    for row in rows:
        if row.target == "onnxruntime" and row.precision != "fp32":
            continue
        build = read_manifest(row.artifact).get("build", {})
        entry = {
            "target": row.target,
            "precision": row.precision,
            "label": row.accuracy["label"],
            "top1": row.accuracy.get("top1"),
            "delta_vs_fp32_torch": round(row.accuracy["top1"] - fp32, 2) if "top1" in row.accuracy else None,
            "note": row.accuracy.get("note", ""),
            "artifact": row.artifact,
        }
        if row.target == "tensorrt":
            entry["lint"] = build.get("lint")
            entry["latency"] = "unavailable: no TensorRT/GPU on this host"
        if row.target == "coreml":
            entry.update({k: build.get(k) for k in ("package_bytes", "quantized_ops", "mil_ops") if k in build})
            entry["latency"] = "unavailable: Core ML predict needs macOS"
        results.append(entry)
    report = {
        "benchmark": f"{MODEL}_targets",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "model": MODEL,
        "weights": "trained here from scratch on the bundled Fashion-MNIST subset (48 px); see training",
        "training": training,
        "fp32_torch_top1": fp32,
        "validation": "fashion_mnist:test (3,000 images)",
        "artifacts": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['target']:12s} {r['precision']:13s} top-1 {r['top1']} ({r['label']}, {r['delta_vs_fp32_torch']:+})")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
