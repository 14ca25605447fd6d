"""TensorRT INT8 Q/DQ placement: ours beside NVIDIA ModelOpt's default INT8, in TensorRT's FP16 arithmetic.

    python benchmarks/tensorrt_vs_modelopt.py [--models t2t_vit_7 t2t_vit_t_14 mobilenet_v2 mobilenet_v3_small]
        [--calib 128] [--images 300] [--threads 1] [--modelopt-calibration max] [--modelopt-venv .venv-modelopt]

Per model at 224 px, three Q/DQ graphs of the same FP32 export: ours (``get_target("tensorrt").build``
with the recipe's minmax settings) and ModelOpt's default INT8 placement with FP32 and with FP16 float
parts (``high_precision_dtype``), calibrated on the same ``--calib`` class-balanced Fashion-MNIST training
images. For each graph: which nodes read a dequantized tensor (by op type, and by name where ours and
ModelOpt's differ, with the PyTorch module each belongs to), our TensorRT lint's findings, and agreement
with FP32 (onnxruntime on the export) on ``--images`` Fashion-MNIST test images, every graph run in
:class:`t2tedge.emulation.GraphEmulator` (FP16 storage between ops, Q/DQ in INT8 math: what TensorRT runs
with the INT8 and FP16 flags); the FP32 export in the same emulation shows what FP16 alone costs. No
TensorRT kernel runs here: every agreement is labelled ``emulated``.

Weights: the bundled demo checkpoints (Fashion-MNIST, trained at 48 px, 10 classes; the positional
table is regenerated for 224 px). T2T-ViT_t-14 has none: random init, 10 classes, every LayerNorm and
Linear parameter perturbed by N(0, 0.05) so no LayerNorm sits at 1/0 and no bias at 0.

ModelOpt stays out of t2tedge's environment (it pins onnx and onnxruntime-gpu): on first use this
creates ``--modelopt-venv`` with ``python3 -m venv`` and ``pip install nvidia-modelopt[onnx]``, and runs
``benchmarks/modelopt_quantize.py`` in it. ModelOpt's INT8 default calibration (entropy) fails on
T2T-ViT-7 at 224 px ("Too many bins for data range"), so the default here is its ``max`` calibration,
the counterpart of our minmax. ``--threads`` sets torch's intra-op threads for the emulator (default 1:
on a shared 2-core host two threads made it up to 50x slower, each op waiting on a descheduled thread).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from t2tedge.calibration import select_indices
from t2tedge.calibration.accuracy_aware import _node_scopes
from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.emulation import GraphEmulator
from t2tedge.errors import T2tedgeError
from t2tedge.evaluation.accuracy import agreement
from t2tedge.evaluation.host import host_info
from t2tedge.models import LoadedModel, demo_checkpoint, get_spec, load_model
from t2tedge.pipeline.export import export_onnx
from t2tedge.progress import log
from t2tedge.targets import BuildInputs, get_target
from t2tedge.targets.tensorrt_lint import lint, summarize

IMAGE_SIZE = 224
MODELS = ("t2t_vit_7", "t2t_vit_t_14", "mobilenet_v2", "mobilenet_v3_small")
MODELOPT_VERSION = "0.47.0"
HELPER = Path(__file__).with_name("modelopt_quantize.py")
REPO = Path(__file__).resolve().parent.parent
# The target's Config with its defaults, minmax named for the target too: its default (auto) picks a
# method on held-out images this build has not.
OUR_CONFIG = {"method": "minmax", "calibration_method": "minmax"}
PERTURBATION_STD = 0.05
GRAPHS = ("ours", "modelopt_fp32", "modelopt_fp16")
Q_OP, DQ_OP = "QuantizeLinear", "DequantizeLinear"
# The layers TensorRT runs in INT8 when their inputs come through DequantizeLinear; other readers of a
# dequantized tensor compute in float (FP16) on its dequantized values.
INT8_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def modelopt_python(venv: Path) -> Path:
    """The venv's interpreter with ModelOpt importable; creates the venv on first use."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import modelopt.onnx.quantization"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log(f"creating {venv} with nvidia-modelopt[onnx]=={MODELOPT_VERSION} (once; several GB, minutes)")
    steps = [
        ["python3", "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", f"nvidia-modelopt[onnx]=={MODELOPT_VERSION}"],
        probe,
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise T2tedgeError(f"setting up {venv} failed at `{' '.join(step[:4])}`: {tail or 'no output'}")
    return python


def run_modelopt(
    python: Path, onnx_path: Path, calibration_npy: Path, out: Path, dtype: str, method: str
) -> dict[str, Any]:
    """ModelOpt's default INT8 of ``onnx_path`` (float parts in ``dtype``) into ``out``; its facts."""
    facts_path = out.with_suffix(".json")
    command = [str(python), str(HELPER), str(onnx_path), str(calibration_npy), str(out)]
    command += ["--high-precision-dtype", dtype, "--calibration-method", method, "--facts", str(facts_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise T2tedgeError(f"ModelOpt int8 ({dtype} float parts) failed on {onnx_path.name}: {tail or 'no output'}")
    return json.loads(facts_path.read_text())


def load(name: str, seed: int) -> tuple[LoadedModel, str]:
    """The model at 224 px and a note on its weights (demo checkpoint, or perturbed random init)."""
    torch.manual_seed(seed)
    try:
        checkpoint = demo_checkpoint(name)
    except T2tedgeError:
        checkpoint = None
    if checkpoint is not None:
        loaded = load_model(get_spec(name), checkpoint, image_size=IMAGE_SIZE)
        note = "bundled demo checkpoint (Fashion-MNIST, trained at 48 px, 10 classes), run at 224 px"
        return loaded, note
    loaded = load_model(get_spec(name), None, image_size=IMAGE_SIZE, num_classes=10)
    with torch.no_grad():
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.LayerNorm | torch.nn.Linear):
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * PERTURBATION_STD)
    loaded.model.eval()
    note = (
        f"no demo checkpoint: random init (seed {seed}, 10 classes), every LayerNorm/Linear parameter "
        f"perturbed by N(0, {PERTURBATION_STD}); agreement is indicative only"
    )
    return loaded, note


def placement(path: Path) -> dict[str, Any]:
    """The nodes reading a dequantized tensor: counts by op type and, per node, which inputs."""
    graph = onnx.load(path, load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    nodes: dict[str, dict[str, Any]] = {}
    for node in graph.node:
        if node.op_type in (Q_OP, DQ_OP):
            continue
        inputs = [i for i, name in enumerate(node.input) if name in producers and producers[name].op_type == DQ_OP]
        if inputs:
            nodes[node.name] = {"op": node.op_type, "inputs": inputs}
    ops = Counter(node.op_type for node in graph.node)
    readers = Counter(n["op"] for n in nodes.values())
    return {
        "quantize_linear_nodes": ops.get(Q_OP, 0),
        "dequantize_linear_nodes": ops.get(DQ_OP, 0),
        "reading_dequantized": dict(sorted(readers.items())),
        "int8_layers": {op: n for op, n in sorted(readers.items()) if op in INT8_LAYERS},
        "float_ops_reading_dequantized": {op: n for op, n in sorted(readers.items()) if op not in INT8_LAYERS},
        "cast_nodes": ops.get("Cast", 0),
        "float16_initializers": sum(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer),
        "nodes": nodes,
    }


def node_kinds(export: Path) -> dict[str, str]:
    """Node name -> its op type, with MatMul/Gemm split into weighted and activation x activation."""
    graph = onnx.load(export, load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    kinds = {}
    for node in graph.node:
        kind = node.op_type
        if kind in ("MatMul", "Gemm"):
            weighted = any(name in constants for name in node.input[:2])
            kind += " (weighted)" if weighted else " (activation x activation)"
        kinds[node.name] = kind
    return kinds


def differences(
    ours: dict[str, Any], theirs: dict[str, Any], scopes: dict[str, str], kinds: dict[str, str]
) -> dict[str, Any]:
    """Nodes one graph feeds through DequantizeLinear and the other does not (or on other inputs).

    Nodes are matched by their name in the export: ORT's pre-processing (ours) renames a MatMul it fuses
    with its bias Add into a Gemm "<name>/MatMulAddFusion".
    """

    def base(name: str) -> str:
        return name.split("/")[0]

    def row(name: str, entry: dict[str, Any], other: dict[str, Any] | None = None) -> dict[str, Any]:
        extra = {"other_inputs": other["inputs"]} if other is not None else {}
        key = base(name)
        return {
            "node": name,
            "op": entry["op"],
            "kind": kinds.get(key, entry["op"]),
            "module": scopes.get(key, ""),
            "inputs": entry["inputs"],
            **extra,
        }

    a = {base(n): (n, e) for n, e in ours["nodes"].items()}
    b = theirs["nodes"]
    only_theirs = [row(n, e) for n, e in b.items() if n not in a]
    only_ours = [row(n, e) for key, (n, e) in a.items() if key not in b]
    other_inputs = [row(n, e, b[key]) for key, (n, e) in a.items() if key in b and e["inputs"] != b[key]["inputs"]]
    return {
        "modelopt_only_by_kind": dict(sorted(Counter(r["kind"] for r in only_theirs).items())),
        "ours_only_by_kind": dict(sorted(Counter(r["kind"] for r in only_ours).items())),
        "different_inputs_by_kind": dict(sorted(Counter(r["kind"] for r in other_inputs).items())),
        "modelopt_only": only_theirs,
        "ours_only": only_ours,
        "different_inputs": other_inputs,
    }


def emulated_agreement(path: Path, images: np.ndarray, reference: np.ndarray, threads: int) -> dict[str, Any]:
    """Top-1 agreement and |Δlogit| with the FP32 reference of the graph run in FP16 storage."""
    started = time.perf_counter()
    logits = GraphEmulator(path, threads=threads)(images)
    seconds = time.perf_counter() - started
    finite = np.isfinite(logits).all(axis=1)
    # an image with a non-finite logit counts as a disagreement; the logit errors are over the others
    record: dict[str, Any] = {
        "top1_agreement": round(float(100.0 * (finite & (logits.argmax(1) == reference.argmax(1))).mean()), 2),
        "non_finite_images": int((~finite).sum()),
    }
    if finite.any():
        full = agreement(logits[finite], reference[finite])
        record |= {
            "logit_abs_err_max": round(full["logit_abs_err_max"], 4),
            "logit_abs_err_mean": round(full["logit_abs_err_mean"], 5),
            "cosine_min": round(full["cosine_min"], 5),
        }
    record |= {"label": "emulated", "seconds": round(seconds, 1)}
    return record


def compare_model(
    name: str, python: Path, train: Any, test: Any, calib: np.ndarray, held: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """Build the three graphs of one model and measure their placement, lint and emulated agreement."""
    loaded, weights = load(name, args.seed)
    calibration = preprocess(train, calib, loaded.preprocess, f"{name} calibration")
    images = preprocess(test, held, loaded.preprocess, f"{name} test images")
    with tempfile.TemporaryDirectory(prefix="t2tedge-vs-modelopt-") as tmp:
        work = Path(tmp)
        export = work / f"{name}.onnx"
        export_onnx(loaded.model, IMAGE_SIZE, export)
        reference = OnnxSession(export, args.threads)(images)
        log(f"  {name}: emulating the FP32 export (FP16 only, no Q/DQ) on {len(images)} images")
        fp16_only = emulated_agreement(export, images, reference, args.threads)
        np.save(work / "calibration.npy", calibration)
        paths = {"ours": work / "ours" / "model.onnx"}
        builds: dict[str, dict[str, Any]] = {}

        started = time.perf_counter()
        paths["ours"].parent.mkdir()
        inputs = BuildInputs(export, IMAGE_SIZE, loaded.num_classes, calibration=calibration)
        target = get_target("tensorrt")
        facts = target.build(inputs, "int8", target.Config(**OUR_CONFIG), paths["ours"].parent)
        builds["ours"] = {
            "settings": {**OUR_CONFIG, "calibration_images": len(calibration)},
            "calibration_method": facts.get("calibration", {}).get("method"),
            "preprocessed": facts.get("preprocessed"),
            "fp32_pinned_nodes": facts["fp32_layers"]["nodes"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        for dtype in ("fp32", "fp16"):
            key = f"modelopt_{dtype}"
            paths[key] = work / f"{key}.onnx"
            log(f"  {name}: ModelOpt int8, {dtype} float parts ({args.modelopt_calibration} calibration)")
            builds[key] = run_modelopt(
                python, export, work / "calibration.npy", paths[key], dtype, args.modelopt_calibration
            )

        scopes, kinds = _node_scopes(export), node_kinds(export)
        graphs: dict[str, dict[str, Any]] = {}
        for key in GRAPHS:
            findings = summarize(lint(paths[key]))
            log(f"  {name}: emulating {key} on {len(images)} images")
            graphs[key] = {
                "build": builds[key],
                "placement": placement(paths[key]),
                "lint": {
                    **{k: findings[k] for k in ("error", "warning", "info")},
                    "rules": dict(sorted(Counter(f["rule"] for f in findings["findings"]).items())),
                    # the message up to its first colon says which case of the rule fired
                    "cases": dict(sorted(Counter(f["message"].split(":")[0] for f in findings["findings"]).items())),
                    "findings": findings["findings"],
                },
                # the emulator runs our graph without the FP32 pins its engine build applies (see build)
                "vs_fp32": emulated_agreement(paths[key], images, reference, args.threads),
            }
    ours = graphs["ours"]["placement"]
    return {
        "weights": weights,
        "num_classes": loaded.num_classes,
        # the same emulation on the FP32 export: what FP16 storage alone costs, before any Q/DQ
        "fp16_only_vs_fp32": fp16_only,
        "graphs": graphs,
        "placement_differences": {
            key: differences(ours, graphs[key]["placement"], scopes, kinds)
            for key in ("modelopt_fp32", "modelopt_fp16")
        },
    }


def git_commit() -> str:
    """The checkout's commit (with "+changes" when the tree differs from it), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def summary_line(name: str, row: dict[str, Any]) -> str:
    parts = [f"fp16 only {row['fp16_only_vs_fp32']['top1_agreement']:.1f}%"]
    for key in GRAPHS:
        vs = row["graphs"][key]["vs_fp32"]
        parts.append(f"{key} {vs['top1_agreement']:.1f}% (max |Δ| {vs.get('logit_abs_err_max', float('nan')):.3f})")
    return f"{name}: " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calib", type=int, default=128, help="calibration images (Fashion-MNIST train)")
    parser.add_argument("--images", type=int, default=300, help="Fashion-MNIST test images for agreement")
    parser.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads (see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modelopt-calibration", choices=["max", "entropy"], default="max")
    parser.add_argument("--modelopt-venv", type=Path, default=REPO / ".venv-modelopt")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "tensorrt_vs_modelopt.json")
    args = parser.parse_args()

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    python = modelopt_python(args.modelopt_venv)
    train, test = open_dataset("fashion_mnist:train"), open_dataset("fashion_mnist:test")
    calib = select_indices(train.labels, args.calib, seed=args.seed)
    held = select_indices(test.labels, args.images, seed=args.seed)
    load_start = os.getloadavg()
    results: dict[str, Any] = {}
    modelopt_versions: dict[str, str] = {}
    for name in args.models:
        model_started = time.perf_counter()
        results[name] = compare_model(name, python, train, test, calib, held, args)
        results[name]["seconds"] = round(time.perf_counter() - model_started, 1)
        modelopt_versions = results[name]["graphs"]["modelopt_fp32"]["build"]["versions"]
        print(summary_line(name, results[name]), flush=True)

    report = {
        "benchmark": "tensorrt_vs_modelopt",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {**host_info(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "versions": {
            "t2tedge": importlib.metadata.version("t2tedge"),
            "t2tedge_commit": git_commit(),
            "onnx": onnx.__version__,
            "onnxruntime": importlib.metadata.version("onnxruntime"),
            "torch": torch.__version__,
            "modelopt_venv": modelopt_versions,
            "python": sys.version.split()[0],
        },
        "settings": {
            "image_size": IMAGE_SIZE,
            "calibration_images": len(calib),
            "calibration_source": "fashion_mnist:train, class-balanced (select_indices), model eval transform",
            "agreement_images": len(held),
            "agreement_source": "fashion_mnist:test, class-balanced (select_indices), model eval transform",
            "reference": "onnxruntime CPU on the FP32 export",
            "emulation": "t2tedge.emulation.GraphEmulator (FP16 storage between ops, Q/DQ in INT8 math), no FP32 pins",
            "threads": args.threads,
            "ours": {"target": "tensorrt", "precision": "int8", "config": OUR_CONFIG},
            "modelopt": {
                "quantize_mode": "int8",
                "calibration_method": args.modelopt_calibration,
                "calibration_method_note": "ModelOpt's default (entropy) fails on T2T-ViT-7 at 224 px",
                "calibration_eps": ["cpu"],
                "high_precision_dtype": ["fp32", "fp16"],
                "everything_else": "ModelOpt defaults",
            },
        },
        "models": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
