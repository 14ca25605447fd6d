"""T2T-ViT in pure FP16 arithmetic: every intermediate in range, accuracy and agreement vs FP32, float64 parity.

PyTorch's `.half()` on CPU computes in FP16 (each op rounds its result to FP16); `t2tedge.emulation.audit_fp16`
watches every ATen op's FP16 result. Three checks per model:

* pure FP16: non-finite values anywhere, the largest |value| of any intermediate, top-1 (where the data
  is the model's own) and top-1 agreement with FP32 on the test images;
* float64 parity: our Performer form vs the official layer's arithmetic (the direct form), max |Δlogit|;
* the direct form in FP16 on a few images: what the rescaled form fixes.

Models: the demo T2T-ViT-7 (trained on Fashion-MNIST at 48 px) at 48 px on all 3,000 test images; and at
224 px on 500: the demo T2T-ViT-7 (positional table regenerated), T2T-ViT-14 with the demo model's trained
token layers transplanted (its backbone random with perturbed norms) and T2T-ViT_t-14 (random, perturbed,
token attention sharpened). No published T2T-ViT weights are reachable here; the JSON says which is which.

    python benchmarks/fp16_t2t_vit.py            # writes benchmarks/results/fp16_t2t_vit.json
    python benchmarks/fp16_t2t_vit.py --only t2t_vit_14@224 --images-224 250   # one row, merged in
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2tedge.calibration import select_indices
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.emulation import audit_fp16
from t2tedge.evaluation.host import host_info
from t2tedge.models import demo_checkpoint, get_spec, load_model
from t2tedge.models.t2t_vit import TokenPerformer

RESULTS = Path(__file__).parent / "results" / "fp16_t2t_vit.json"


def direct_performer_forward(self: TokenPerformer, x: torch.Tensor) -> torch.Tensor:
    """The official layer's arithmetic order (phi(k), phi(q), D + 1e-8), in the input's dtype."""
    k, q, v = self.kqv(self.norm1(x)).split(self.out_dim, dim=-1)

    def phi(u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u @ self.w.t() - (u * u).sum(-1, keepdim=True) / 2) / math.sqrt(self.num_features)

    kp, qp = phi(k), phi(q)
    normalizer = qp @ kp.sum(dim=1).unsqueeze(-1)
    y = (qp @ (v.transpose(1, 2) @ kp).transpose(1, 2)) / (normalizer + 1e-8)
    y = v + self.proj(y)
    return y + self.mlp(self.norm2(y))


def logits(model: torch.nn.Module, images: np.ndarray, dtype: torch.dtype, batch: int = 16) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            outs.append(model(torch.from_numpy(images[start : start + batch]).to(dtype)).float().numpy())
    return np.concatenate(outs)


def float64_parity(model: torch.nn.Module, images: np.ndarray) -> float:
    """Max |Δlogit| between our forward and the direct (official) Performer arithmetic, both in float64."""
    model = model.double()
    ours = logits(model, images, torch.float64)
    original = TokenPerformer.forward
    TokenPerformer.forward = direct_performer_forward
    try:
        direct = logits(model, images, torch.float64)
    finally:
        TokenPerformer.forward = original
    model.float()
    return float(np.abs(ours - direct).max())


def direct_form_in_fp16(model: torch.nn.Module, images: np.ndarray) -> dict[str, Any]:
    original = TokenPerformer.forward
    TokenPerformer.forward = direct_performer_forward
    try:
        out, record = audit_fp16(model.half(), images)
    finally:
        TokenPerformer.forward = original
        model.float()
    return {
        "images": len(images),
        "nonfinite_logits_images": int((~np.isfinite(out)).any(1).sum()),
        "first_nonfinite_op": record["first_nonfinite_op"],
        "max_abs_finite": record["max_abs"],
    }


def check(name: str, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray | None, weights: str) -> dict:
    started = time.perf_counter()
    model.eval()
    fp32 = logits(model, images, torch.float32)
    fp16, record = audit_fp16(model.half(), images, batch_size=16)
    model.float()
    result: dict[str, Any] = {
        "model": name,
        "weights": weights,
        "image_size": model.img_size,
        "images": len(images),
        "pure_fp16": {
            "arithmetic": "PyTorch CPU float16 (each op's result rounded to FP16), every ATen op audited",
            "nonfinite_logits_images": int((~np.isfinite(fp16)).any(1).sum()),
            "first_nonfinite_op": record["first_nonfinite_op"],
            "tensors_outside_fp16": len(record["outside_fp16"]),
            "max_abs_intermediate": record["max_abs"],
            "widest_op": record["widest_tensor"],
            "subnormal_dominated_ops": len(record["subnormal_dominated"]),
            "top1_agreement_with_fp32": float(100 * (fp16.argmax(1) == fp32.argmax(1)).mean()),
            "logit_abs_err_max": float(np.abs(fp16 - fp32).max()),
        },
        "float64_parity_vs_direct_form_max_abs_dlogit": float64_parity(model, images[:16]),
        "direct_form_fp16": direct_form_in_fp16(model, images[:16]),
    }
    if labels is not None:
        result["top1_fp32"] = float(100 * (fp32.argmax(1) == labels).mean())
        result["top1_fp16"] = float(100 * (fp16.argmax(1) == labels).mean())
        result["top1_drop_points"] = round(result["top1_fp32"] - result["top1_fp16"], 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: result[k] for k in ("model", "image_size", "pure_fp16")}, indent=1), flush=True)
    return result


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random weights with LayerNorms away from 1/0 (trained models' norms are never the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def save_row(path: Path, row: dict[str, Any], threads: int) -> None:
    """Merge one row into the results file (rows are keyed by model and size; runs may go in parallel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
        rows = [r for r in data["rows"] if (r["model"], r["image_size"]) != (row["model"], row["image_size"])]
        data = {"host": host_info(), "threads_per_run": threads, "rows": [*rows, {**row, "threads": threads}]}
        path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-224", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: several runs side by side)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="rows to run, e.g. t2t_vit_7@48 t2t_vit_14@224 (default: all)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = set(args.only) if args.only else None

    def run(key: str) -> bool:
        return wanted is None or key in wanted

    test = open_dataset("fashion_mnist:test")
    indices = select_indices(test.labels, args.images_224, seed=0)
    if run("t2t_vit_7@48"):
        demo = load_model(get_spec("t2t_vit_7"), demo_checkpoint("t2t_vit_7"))
        images = preprocess(test, np.arange(len(test)), demo.preprocess, "test images (48 px)")
        row = check("t2t_vit_7", demo.model, images, test.labels, "demo (Fashion-MNIST, 48 px)")
        save_row(args.output, row, args.threads)

    at224 = load_model(get_spec("t2t_vit_7"), demo_checkpoint("t2t_vit_7"), image_size=224)
    images = preprocess(test, indices, at224.preprocess, "test images (224 px)")
    if run("t2t_vit_7@224"):
        row = check("t2t_vit_7", at224.model, images, None, "demo (trained at 48 px), run at 224 px")
        save_row(args.output, row, args.threads)

    if run("t2t_vit_14@224"):
        torch.manual_seed(0)
        t14 = perturbed(get_spec("t2t_vit_14").create(num_classes=10, image_size=224))
        trained = {k: v for k, v in at224.model.state_dict().items() if k.startswith("tokens_to_token.attention")}
        t14.load_state_dict(trained, strict=False)
        weights = "demo T2T-ViT-7 token layers (trained); backbone random, perturbed"
        save_row(args.output, check("t2t_vit_14", t14, images, None, weights), args.threads)

    if run("t2t_vit_t_14@224"):
        torch.manual_seed(0)
        t14t = perturbed(get_spec("t2t_vit_t_14").create(num_classes=10, image_size=224))
        with torch.no_grad():  # sharper token attention than random init gives: 3136-token softmax logits of ~10
            for layer in (t14t.tokens_to_token.attention1, t14t.tokens_to_token.attention2):
                layer.attn.qkv.weight.mul_(4.0)
        weights = "random, perturbed, token attention qkv x4"
        save_row(args.output, check("t2t_vit_t_14", t14t, images, None, weights), args.threads)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
