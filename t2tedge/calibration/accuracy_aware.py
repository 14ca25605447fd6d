"""Accuracy-aware Q/DQ quantization: calibrate once, keep the most sensitive nodes float until a top-1 budget holds.

Shared by every target whose artifact is a Q/DQ ONNX graph. The search scores on the held-out split of
the calibration source, never on the validation set; ``sensitivity.json``/``.md`` record what it did.
"""

from __future__ import annotations

import ast
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.errors import T2tedgeError
from t2tedge.evaluation.accuracy import topk_accuracy
from t2tedge.progress import log, track

SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_MD = "sensitivity.md"
# Per-node sensitivity is judged by logit error, which ranks nodes well on a few images; the search for
# how many nodes to keep FP32 uses the whole held-out subset.
SENSITIVITY_IMAGES = 64


def quantize_with_budget(
    inputs: Any,
    settings: Any,
    model_path: Path,
    out_dir: Path,
    what: str,
    budget: float | None = None,
    session_config: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Calibrate, write the QDQ graph and, with ``max_accuracy_drop`` set, keep the most sensitive nodes FP32.

    Shared by every target whose artifact is a Q/DQ ONNX graph. ``budget`` is the configured maximum
    top-1 drop (None: no search); ``subset`` the most held-out images the search scores on;
    ``session_config``: how the target's ONNX Runtime runs the graph, which the search scores it with.
    """
    from t2tedge.calibration.onnx_qdq import calibrate

    if inputs.calibration is None or len(inputs.calibration) == 0:
        raise T2tedgeError(f"{what} needs calibration images")
    with tempfile.TemporaryDirectory(prefix="t2tedge-qdq-") as tmp:
        log(f"  {what}: calibrating on {len(inputs.calibration)} images ({settings.method})")
        calibrated = calibrate(inputs.onnx_path, inputs.calibration, settings, Path(tmp) / "calibrated")
        structure = calibrated.quantize(model_path)
        facts: dict[str, Any] = dict(calibrated.facts)
        if budget is not None:
            search = AccuracyAwareSearch(calibrated, inputs, float(budget), Path(tmp) / "trials", what, session_config)
            facts["accuracy_aware"] = search.run(model_path, out_dir)
            structure = facts["accuracy_aware"].pop("structure")
    return {**facts, **structure}


HELDOUT = "calibration.heldout"


def tuning_set(inputs: Any, what: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The labelled images accuracy-aware quantization scores on, and where they come from.

    Only the held-out split of the calibration source (``inputs.heldout``/``heldout_labels``): the
    validation set is seen only by the final measurement.
    """
    if inputs.heldout is not None and inputs.heldout_labels is not None and len(inputs.heldout):
        return inputs.heldout, np.asarray(inputs.heldout_labels), HELDOUT
    raise T2tedgeError(
        f"{what}: accuracy-aware quantization (max_accuracy_drop) needs labelled held-out images "
        "(calibration.heldout > 0, from a labelled calibration source)"
    )


class AccuracyAwareSearch:
    """Keeps the quantized nodes that cost most accuracy in FP32 until the top-1 drop is within budget.

    Sensitivity of a node = the logit error (vs the FP32 model) with that node alone reading float inputs
    and weights, on the calibrated ranges of the full quantization (no re-calibration, no re-quantization
    of weights: see :func:`with_fp32_nodes`). Nodes are ranked by how much they lower the error; the
    smallest prefix of the ranking that meets the budget on all images is found by doubling then
    bisecting. The final model is quantized again with that prefix excluded and measured once more.
    """

    def __init__(
        self,
        calibrated: Any,
        inputs: Any,
        budget: float,
        work_dir: Path,
        what: str,
        session_config: dict[str, str] | None = None,
    ) -> None:
        import onnx

        self.session_config = session_config
        self.calibrated = calibrated
        self.what = what
        self.images, self.labels, self.tuned_on = tuning_set(inputs, what)
        self.budget = budget
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.float_model = onnx.load(calibrated.model_path)
        self.reference = OnnxSession(inputs.onnx_path)(self.images)
        self.fp32_top1 = topk_accuracy(self.reference, self.labels, 1)
        self.scopes = _node_scopes(inputs.onnx_path)
        self.trials = 0

    def run(self, model_path: Path, out_dir: Path) -> dict[str, Any]:
        import onnx

        started = time.perf_counter()
        int8 = self._score(onnx.load(model_path))
        candidates = self.calibrated.candidates()
        nodes: list[dict[str, Any]] = []
        steps: list[dict[str, Any]] = [{"kept_fp32": 0, "top1": int8["top1"]}]
        chosen: list[str] = []
        if self.fp32_top1 - int8["top1"] > self.budget:
            trial_base = self.work_dir / "trial_base.onnx"
            self.calibrated.quantize(trial_base, keep_removable_activations=True)
            quantized = onnx.load(trial_base)
            nodes = self._sensitivity(candidates, quantized)
            ranked = [n["node"] for n in nodes]
            chosen = ranked[: self._smallest_prefix(quantized, ranked, steps)]
        structure = self.calibrated.quantize(model_path, keep_fp32=chosen)
        final = self._score(onnx.load(model_path)) if chosen else int8
        for entry in nodes:
            entry["kept_fp32"] = entry["node"] in chosen
        drop = self.fp32_top1 - final["top1"]
        summary = {
            "what": self.what,
            "max_accuracy_drop": self.budget,
            "tuned_on": self.tuned_on,
            "images": int(len(self.labels)),
            "sensitivity_images": int(min(SENSITIVITY_IMAGES, len(self.labels))),
            "fp32_top1": self.fp32_top1,
            "int8_top1_all_quantized": int8["top1"],
            "int8_top1": final["top1"],
            "accuracy_drop": round(drop, 4),
            "met": drop <= self.budget,
            "candidates": len(candidates),
            "nodes_kept_fp32": chosen,
            "search": steps,
            "trials": self.trials,
            "seconds": round(time.perf_counter() - started, 2),
        }
        _write_json(out_dir / SENSITIVITY_JSON, {**summary, "nodes": nodes})
        (out_dir / SENSITIVITY_MD).write_text(_sensitivity_markdown(summary, nodes))
        verdict = "met" if summary["met"] else "NOT met"
        log(
            f"  {self.what}: top-1 drop {drop:.2f} (budget {self.budget}) {verdict}; "
            f"{len(chosen)} of {len(candidates)} nodes kept FP32"
        )
        return {**summary, "structure": structure}

    def _score(self, model: Any, count: int | None = None) -> dict[str, float]:
        """Top-1 and logit mean squared error (vs FP32) of a model on the first ``count`` images (all)."""
        self.trials += 1
        images, labels, reference = self.images[:count], self.labels[:count], self.reference[:count]
        logits = OnnxSession(model.SerializeToString(), config=self.session_config)(images)
        finite = np.isfinite(reference).all(1) & np.isfinite(logits).all(1)
        error = float(np.mean((logits[finite] - reference[finite]) ** 2)) if finite.any() else float("inf")
        return {"top1": topk_accuracy(logits, labels, 1), "logit_mse": error}

    def _trial(self, quantized: Any, keep_fp32: list[str], count: int | None = None) -> dict[str, float]:
        from t2tedge.calibration.onnx_qdq import with_fp32_nodes

        model = with_fp32_nodes(quantized, self.float_model, keep_fp32, self.calibrated.settings.op_types)
        return self._score(model, count)

    def _sensitivity(self, candidates: list[Any], quantized: Any) -> list[dict[str, Any]]:
        subset = min(SENSITIVITY_IMAGES, len(self.labels))
        base = self._score(quantized, subset)
        nodes = []
        for node in track(candidates, "sensitivity", total=len(candidates)):
            score = self._trial(quantized, [node.name], subset)
            nodes.append(
                {
                    "node": node.name,
                    "op_type": node.op_type,
                    "scope": self.scopes.get(node.name.split("/")[0], ""),
                    "top1_subset": score["top1"],
                    "top1_gain": round(score["top1"] - base["top1"], 4),
                    "logit_mse": score["logit_mse"],
                    "logit_mse_reduction": base["logit_mse"] - score["logit_mse"],
                }
            )
        nodes.sort(key=lambda n: (-n["logit_mse_reduction"], -n["top1_gain"]))
        return nodes

    def _smallest_prefix(self, quantized: Any, ranked: list[str], steps: list[dict[str, Any]]) -> int:
        """Fewest top-ranked nodes kept FP32 that meet the budget (all of them if none does)."""
        if not ranked:
            return 0
        meets_cache: dict[int, bool] = {}

        def meets(count: int) -> bool:
            if count not in meets_cache:
                score = self._trial(quantized, ranked[:count])
                steps.append({"kept_fp32": count, "top1": score["top1"]})
                meets_cache[count] = self.fp32_top1 - score["top1"] <= self.budget
            return meets_cache[count]

        low, high = 0, 1  # low fails (the all-quantized model did); find a high that meets
        while high < len(ranked) and not meets(high):
            low, high = high, min(2 * high, len(ranked))
        if high == len(ranked) and not meets(high):
            return high
        while high - low > 1:
            middle = (low + high) // 2
            if meets(middle):
                high = middle
            else:
                low = middle
        return high


def _node_scopes(onnx_path: Path) -> dict[str, str]:
    """Node name -> PyTorch module path, from the exporter's metadata (empty where it has none)."""
    import onnx

    scopes = {}
    for node in onnx.load(onnx_path, load_external_data=False).graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":  # e.g. "['', 'blocks.0', 'blocks.0.attn', 'linear']"
                with contextlib.suppress(ValueError, SyntaxError):
                    modules = [m for m in ast.literal_eval(prop.value)[:-1] if m]
                    scopes[node.name] = modules[-1] if modules else ""
    return scopes


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _sensitivity_markdown(summary: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    verdict = "met" if summary["met"] else "not met (every candidate kept FP32)"
    lines = [
        f"# INT8 sensitivity ({summary['what']})",
        "",
        f"FP32 top-1 {summary['fp32_top1']:.2f} %, all-INT8 top-1 {summary['int8_top1_all_quantized']:.2f} %, "
        f"final top-1 {summary['int8_top1']:.2f} % on {summary['images']} images "
        f"({summary['tuned_on']}): drop "
        f"{summary['accuracy_drop']:.2f} points, budget {summary['max_accuracy_drop']} — {verdict}.",
        f"{len(summary['nodes_kept_fp32'])} of {summary['candidates']} quantized nodes kept FP32.",
        "",
    ]
    if not nodes:
        lines.append("The fully quantized model was within budget; no per-node analysis was needed.")
        return "\n".join(lines) + "\n"
    lines += [
        f"Per node: the node alone kept FP32, on {summary['sensitivity_images']} images; ranked by how much "
        "that lowers the logit mean squared error against the FP32 model.",
        "",
        "| rank | node | op | module | top-1 gain | logit MSE | MSE reduction | kept FP32 |",
        "|---:|---|---|---|---:|---:|---:|:---:|",
    ]
    for rank, n in enumerate(nodes, 1):
        lines.append(
            f"| {rank} | `{n['node']}` | {n['op_type']} | {n['scope'] or '-'} | {n['top1_gain']:+.2f} | "
            f"{n['logit_mse']:.4g} | {n['logit_mse_reduction']:+.4g} | {'yes' if n['kept_fp32'] else ''} |"
        )
    return "\n".join(lines) + "\n"
