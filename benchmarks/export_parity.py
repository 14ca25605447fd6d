"""Export parity at full size: ONNX (onnxruntime CPU) vs PyTorch FP32 on real images, as JSON.

    python benchmarks/export_parity.py [--models t2t_vit_7 t2t_vit_t_14 mobilenet_v2] [--images 16]

Weights are random (no published T2T-ViT weights are reachable here); images are real Fashion-MNIST
test images through each model's own 224 px eval transform.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from t2tedge.calibration import select_indices
from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.evaluation.host import host_info
from t2tedge.models import get_spec
from t2tedge.pipeline.export import export_onnx, parity, torch_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["t2t_vit_7", "t2t_vit_t_14", "mobilenet_v2"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "export_parity.json")
    args = parser.parse_args()
    dataset = open_dataset("fashion_mnist:test")
    indices = select_indices(dataset.labels, args.images, seed=0)
    rows = []
    for name in args.models:
        spec = get_spec(name)
        torch.manual_seed(0)
        model = spec.create()
        images = preprocess(dataset, indices, spec.preprocess, name)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            export_onnx(model, spec.preprocess.input_size, Path(tmp) / "m.onnx")
            seconds = time.perf_counter() - started
            check = parity(torch_logits(model, images), OnnxSession(Path(tmp) / "m.onnx")(images))
        rows.append(
            {"model": name, "image_size": spec.preprocess.input_size, "export_seconds": round(seconds, 1), **check}
        )
        print(f"{name}: max |Δlogit| {check['logit_abs_err_max']:.2e}, export {seconds:.1f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "export_parity", "label": "measured", "weights": "random (seed 0)", "host": host_info(),
              "torch": torch.__version__, "rows": rows, "max_abs_diff_limit": 1e-4,
              "passed": all(r["logit_abs_err_max"] <= 1e-4 for r in rows)}  # fmt: skip
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
