"""OpenVINO on CPU: IR in FP32 or FP16-compressed, INT8 through NNCF post-training quantization.

The artifact is ``model.xml``/``model.bin`` plus ``compile.json``, which says how the IR is compiled:
FP32 artifacts always compile with ``INFERENCE_PRECISION_HINT=f32`` (on a CPU with BF16 the plugin
default is bf16, which would silently turn an "fp32" number into a bf16 one); FP16/INT8 artifacts use
the configured hint or the plugin default. What the plugin actually chose is recorded at build time
and exposed on the runner, because the default differs between hosts.

INT8 choices for T2T-ViT. Measured at 224 px, batch 1, on 2-core KVM guests: an AMD EPYC (AVX-512 VNNI
+ BF16) and an Intel Xeon with AMX (int8 and bf16 matrix units), ``benchmarks/openvino_int8.py``:
- ``ModelType.TRANSFORMER``: NNCF quantizes only MatMul inputs; softmax, LayerNorm, GELU and residual
  adds stay in floating point (bf16 on these CPUs). NNCF's default mode quantizes those too (123
  FakeQuantize ops on T2T-ViT-7 instead of 38) and on a trained model's activations it is far off FP32
  (top-1 agreement 71 % vs 96 %, demo weights at 224 px) at about the same speed.
- Attention products stay out of INT8 (``_float_matmuls``, over the modules the model's hints name
  in ``float_matmul_modules``): the Performer kernel of the token layers (its operands span orders
  of magnitude: per-tensor int8 zeroes the small features and can zero the normaliser D) and the
  backbone blocks' q.k^T / attn.v (197 tokens, 12 % of T2T-ViT-7's MACs in small per-head products,
  where quantizing q, k, v and the softmax output cost more than int8 saved: 1-thread CPU time -6 %
  with them in bf16, SmoothQuant off in both, one run). What is left int8 is exactly the Linear
  layers: one FakeQuantize per Linear input. The token transformer's 3136-token attention
  (T2T-ViT_t, ~20 % of the MACs) stays int8.
- SmoothQuant is off by default (NNCF's transformer default is alpha 0.95): its per-channel scales
  are extra executed nodes (27 on T2T-ViT-7 with random weights); on the AMX host, with them and the
  attention in int8, our build was only level with plain ``nncf.quantize``, and turning SmoothQuant
  off cut 1-thread CPU time by 7-12 % in two runs. On the demo T2T-ViT-7 it changed nothing that
  matters (48 px, 3,000 test images: top-1 86.70 % off, 86.73 % on, FP32 86.70 %).
  ``smooth_quant_alpha`` turns it back on for checkpoints whose LayerNorm outputs carry outlier
  channels.

Speed gate of issue 3 (same compile properties for all variants, interleaved, demo weights; AMX host,
three runs): T2T-ViT-7 INT8 2.3-2.8x faster than f32 at p50 (2.6x at p10), and faster than plain
``nncf.quantize`` by 5 % at p10 in every run (p50 0.99-1.06x: that host's noise is larger than the gap).
Most of the f32 gain came from the export form (``T2TViT.export_form``: soft splits as row gathers), not
from quantization settings: the unfold form's Pad/Gather/Transpose nodes were about a fifth of the INT8
time (2.06x with them in a short run here). The AMD host measured 1.90x with the unfold form and the
previous defaults; neither change has been measured there.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from t2tedge.artifact import Artifact, write_json
from t2tedge.calibration.scopes import QUANTIZABLE_OPS
from t2tedge.errors import T2tedgeError
from t2tedge.evaluation.accuracy import topk_accuracy
from t2tedge.progress import log
from t2tedge.targets.base import (
    Availability,
    BuildInputs,
    Capabilities,
    DeviceRunner,
    TargetConfig,
    check_precision,
    register_target,
)

MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
COMPILE_FILE = "compile.json"
SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_MD = "sensitivity.md"
DEVICE = "CPU"


def compile_properties(precision_hint: str | None, threads: int | None) -> dict[str, Any]:
    """CPU compile properties: latency mode, an explicit precision hint when given, a thread count."""
    properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if precision_hint:
        properties["INFERENCE_PRECISION_HINT"] = precision_hint
    if threads:
        properties["INFERENCE_NUM_THREADS"] = int(threads)
    return properties


class IgnoredScope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    names: list[str] = Field(default_factory=list, description="node names kept in higher precision")
    types: list[str] = Field(default_factory=list, description="op types kept in higher precision")
    patterns: list[str] = Field(default_factory=list, description="regexes over node names")


class OpenVinoConfig(TargetConfig):
    """`quantization.openvino`: NNCF's settings and the CPU plugin's precision hint."""

    model_type: Literal["auto", "transformer", "cnn"] = Field(
        "auto", description="NNCF model type; auto = the model's hint (transformer for T2T-ViT, default for CNNs)"
    )
    preset: Literal["performance", "mixed"] = "performance"
    smooth_quant_alpha: float | None = Field(
        None, description="SmoothQuant alpha on MatMuls (transformer mode); None or -1: off, NNCF's own default is 0.95"
    )
    fast_bias_correction: bool = True
    ignored_scope: IgnoredScope = IgnoredScope()
    float_modules: list[str] = Field(
        default_factory=list, description="module-path globs (e.g. 'blocks.*.mlp*') whose Conv/MatMul/Gemm stay float"
    )
    float_matmul_modules: list[str] | None = Field(
        None,
        description="module-path globs whose own activation x activation MatMuls stay float; None: the model's hint",
    )
    inference_precision: Literal["f32", "bf16", "f16"] | None = Field(
        None,
        description="CPU precision hint for fp16/int8 artifacts (fp32 always runs f32); None: plugin default",
    )


def requested_hint(precision: str, config: OpenVinoConfig) -> str | None:
    """FP32 always runs f32; FP16/INT8 take the configured hint, None meaning the plugin default."""
    return "f32" if precision == "fp32" else config.inference_precision


def device_load(kit, directory, request):  # noqa: ANN001, ANN201  (shipped to devices by source: Python 3.8)
    """The IR compiled for the CPU plugin with the artifact's precision hint: here and on SSH devices alike."""
    import json
    import os

    ov = kit.import_runtime("openvino")
    with open(os.path.join(directory, "compile.json")) as fh:
        hint = json.load(fh).get("INFERENCE_PRECISION_HINT")
    properties = {"PERFORMANCE_HINT": "LATENCY"}
    if hint:
        properties["INFERENCE_PRECISION_HINT"] = hint
    if request.get("threads"):
        properties["INFERENCE_NUM_THREADS"] = int(request["threads"])
    core = ov.Core()
    compiled = core.compile_model(core.read_model(os.path.join(directory, "model.xml")), "CPU", properties)
    infer = compiled.create_infer_request()
    dims = [d.get_length() if d.is_static else None for d in compiled.input(0).get_partial_shape()]
    facts = {
        "runtime": "openvino",
        "version": ov.get_version(),
        "device": "CPU",
        "inference_precision_hint": hint or "plugin default",
        # what the plugin actually runs in (bf16 by default on CPUs with AVX-512 BF16 or AMX)
        "inference_precision_used": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
        "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
    }
    # infer() copies outputs out of the request, so reusing one request is safe
    return kit.Model(lambda x: infer.infer({0: x})[0], dims[0], dims[1:], facts)


class OpenVinoRunner:
    """A compiled IR on CPU; feeds a fixed-batch model in chunks of its batch size."""

    def __init__(self, xml_path: Path, precision_hint: str | None = None, threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(
            core.read_model(xml_path), DEVICE, compile_properties(precision_hint, threads)
        )
        self.precision_hint_requested = precision_hint
        # What the plugin actually runs in (bf16 by default on CPUs with AVX-512 BF16 or AMX).
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.request = self.compiled.create_infer_request()
        batch = self.compiled.input(0).get_partial_shape()[0]
        self.fixed_batch = batch.get_length() if batch.is_static else None

    def _run(self, images: np.ndarray) -> np.ndarray:
        # infer() copies outputs out of the request, so reusing one request is safe.
        return self.request.infer({0: images})[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        step = self.fixed_batch
        if step is None or images.shape[0] == step:
            return self._run(images)
        if len(images) % step:
            raise ValueError(f"batch of {len(images)} images does not split into the model's fixed batch {step}")
        return np.concatenate([self._run(images[i : i + step]) for i in range(0, len(images), step)])


class OpenVinoTarget:
    """OpenVINO IR for the CPU plugin: fp32, fp16 (compressed weights) and int8 (NNCF)."""

    name = "openvino"
    precisions = ("fp32", "fp16", "int8")
    Config = OpenVinoConfig
    capabilities = Capabilities(
        payload=(MODEL_XML, MODEL_BIN, COMPILE_FILE),
        device_runtime="openvino",
        device_loader=device_load,
        peaks={
            "fp32": "openvino/{inference_precision_used}",
            "fp16": "openvino/{inference_precision_used}",
            "int8": "openvino/int8",
        },
        tune_knobs=(
            ("inference_precision", (None, "f32")),  # the float part: the plugin default (bf16 where the ISA has it)
            ("smooth_quant_alpha", (None, 0.5, 0.95)),
            ("float_matmul_modules", (None, [])),  # the model's float MatMul hint, or every MatMul INT8
            ("model_type", ("auto", "cnn")),
            # not preset "mixed": building T2T-ViT-7 with it segfaulted libopenvino twice here (2026-12-02), which
            # takes the whole tune down with it
            ("method", ("minmax", "percentile")),
        ),
    )

    def availability(self) -> Availability:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return Availability(False, False, "openvino is not installed (pip install openvino nncf)")
        return Availability(True, True)

    def needs_calibration(self, precision: str) -> bool:
        return precision == "int8"

    def tool_versions(self) -> dict[str, str]:
        import openvino

        versions = {"openvino": openvino.get_version()}
        try:
            import nncf

            versions["nncf"] = nncf.__version__
        except ImportError:
            pass
        return versions

    def build(self, inputs: BuildInputs, precision: str, config: OpenVinoConfig, out_dir: Path) -> dict[str, Any]:
        import openvino as ov

        check_precision(self, precision)
        model = ov.convert_model(str(inputs.onnx_path))
        facts: dict[str, Any] = {"device": DEVICE}
        if precision == "int8":
            model, facts["quantization"] = quantize(model, inputs, config, out_dir)
            facts["fake_quantize_ops"] = count_ops(model, "FakeQuantize")
        ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=precision == "fp16")
        hint = requested_hint(precision, config)
        write_json(out_dir / COMPILE_FILE, {"precision": precision, "INFERENCE_PRECISION_HINT": hint})
        runner = OpenVinoRunner(out_dir / MODEL_XML, hint)
        facts.update(
            {
                "inference_precision_hint": hint or "plugin default",
                "inference_precision_used": runner.inference_precision,
                "compress_to_fp16": precision == "fp16",
                "ir_bytes": (out_dir / MODEL_XML).stat().st_size + (out_dir / MODEL_BIN).stat().st_size,
                "tools": self.tool_versions(),
            }
        )
        return facts

    def load(self, artifact: Artifact, threads: int | None = None) -> DeviceRunner:
        from t2tedge.devices import remote_runner

        request = {"threads": threads, "build": artifact.manifest.get("build", {})}
        return DeviceRunner(device_load(remote_runner, str(artifact.path), request))


def count_ops(model: Any, op_type: str) -> int:
    return sum(op.get_type_name() == op_type for op in model.get_ordered_ops())


# ---- INT8 -------------------------------------------------------------------------------------------


def quantization_settings(
    inputs: BuildInputs, config: OpenVinoConfig, model: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments for nncf.quantize and a JSON-able record of them for the manifest."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model_type = config.model_type
    transformer = model_type == "transformer" or (model_type == "auto" and inputs.hints.model_type == "transformer")
    scope = config.ignored_scope
    hinted = config.float_matmul_modules
    auto_names = _float_matmuls(
        inputs.onnx_path, model, tuple(inputs.hints.float_matmul_modules if hinted is None else hinted)
    )
    module_names = _float_matmuls(inputs.onnx_path, model, tuple(config.float_modules), QUANTIZABLE_OPS)
    if config.float_modules and not module_names:
        raise T2tedgeError(f"openvino int8: float_modules {config.float_modules} match no Conv/MatMul/Gemm node")
    names = sorted(set(scope.names) | set(auto_names) | set(module_names))
    types, patterns = list(scope.types), list(scope.patterns)

    method = config.method
    advanced, ranges = _activation_ranges(config)
    # t2tedge's default is SmoothQuant off (NNCF's transformer default is 0.95): see the module docstring
    alpha = config.smooth_quant_alpha
    alpha = -1.0 if alpha is None or alpha < 0 else float(alpha)
    advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=alpha)

    kwargs: dict[str, Any] = {
        "preset": nncf.QuantizationPreset(config.preset),
        "fast_bias_correction": config.fast_bias_correction,
        "model_type": nncf.ModelType.TRANSFORMER if transformer else None,
        "subset_size": len(inputs.calibration),
    }
    if names or types or patterns:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=names, types=types, patterns=patterns)
    if advanced:
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(**advanced)
    record = {
        "tool": "nncf",
        "method": method if method in ("minmax", "percentile") else "minmax",
        "activation_ranges": ranges,
        "model_type": "transformer" if transformer else "default",
        "preset": kwargs["preset"].value,
        "fast_bias_correction": kwargs["fast_bias_correction"],
        # NNCF runs SmoothQuant in transformer mode only
        "smooth_quant_alpha": alpha if alpha >= 0 and transformer else "off",
        "subset_size": kwargs["subset_size"],
        "ignored_scope": {"names": names, "types": types, "patterns": patterns},
        "ignored_automatically": {"names": auto_names, "why": FLOAT_MATMUL_WHY} if auto_names else {},
        "float_matmul_modules": "model hint" if hinted is None else list(hinted),
        "float_modules": {"globs": list(config.float_modules), "names": module_names} if config.float_modules else {},
    }
    if method not in ("minmax", "percentile"):
        record["note"] = f"NNCF offers no {method!r} calibration for OpenVINO; used its min/max default"
    return kwargs, record


def _activation_ranges(config: OpenVinoConfig) -> tuple[dict[str, Any], str]:
    """NNCF's activation range estimator for the recipe's method, and how the manifest describes it."""
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if config.method != "percentile":
        return {}, "NNCF default: mean over images of per-image min/max"
    outlier = 1.0 - config.percentile / 100.0
    quantile = StatisticsCollectorParameters(
        statistics_type=StatisticsType.QUANTILE, aggregator_type=AggregatorType.MEAN, quantile_outlier_prob=outlier
    )
    estimator = RangeEstimatorParameters(min=quantile, max=quantile)
    return {"activations_range_estimator_params": estimator}, (
        f"mean over images of the {100 * outlier:g}% / {100 - 100 * outlier:g}% quantiles"
    )


FLOAT_MATMUL_WHY = "activation x activation MatMuls of the modules the model's hints keep float (float_matmul_modules)"


def _float_matmuls(
    onnx_path: Path, model: Any, patterns: tuple[str, ...], op_types: tuple[str, ...] = ("MatMul",)
) -> list[str]:
    """MatMuls (or ``op_types``) that a module matching one of ``patterns`` performs itself (not inside a
    child Linear), among the ops OpenVINO kept.

    The exporter records each node's module path (``pkg.torch.onnx.name_scopes``); OpenVINO keeps the
    ONNX node names, so the names found here are the ones NNCF sees.
    """
    from t2tedge.calibration.scopes import module_nodes

    present = {op.get_friendly_name() for op in model.get_ordered_ops()}
    return [name for name in module_nodes(onnx_path, patterns, op_types) if name in present]


def quantize(model: Any, inputs: BuildInputs, config: OpenVinoConfig, out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """nncf.quantize, or quantize_with_accuracy_control when a maximum accuracy drop is configured."""
    import nncf

    if inputs.calibration is None or not len(inputs.calibration):
        raise T2tedgeError("openvino int8 needs calibration images")
    kwargs, record = quantization_settings(inputs, config, model)
    calibration = nncf.Dataset(_batches(inputs.calibration))
    max_drop = config.max_accuracy_drop
    if max_drop is not None:
        tuning_set(inputs)  # a clear error before NNCF starts
    try:
        if max_drop is None:
            with quiet_nncf():
                return nncf.quantize(model, calibration, **kwargs), record
        quantized, sensitivity = _quantize_with_accuracy_control(model, calibration, inputs, kwargs, float(max_drop))
    except nncf.ValidationError as exc:  # e.g. an ignored-scope name that is not in the model
        raise T2tedgeError(f"openvino int8: {str(exc).splitlines()[0]}") from None
    write_json(out_dir / SENSITIVITY_JSON, sensitivity)
    (out_dir / SENSITIVITY_MD).write_text(sensitivity_markdown(sensitivity))
    record["accuracy_control"] = {
        k: sensitivity[k]
        for k in (
            "max_drop_points",
            "tuned_on",
            "fp32_top1",
            "int8_top1_before",
            "int8_top1",
            "achieved_drop_points",
            "images",
        )
    }
    record["accuracy_control"]["reverted_operations"] = sensitivity["reverted_operations"]
    log(
        f"  openvino int8 accuracy control: top-1 {sensitivity['fp32_top1']:.2f}% -> {sensitivity['int8_top1']:.2f}% "
        f"({len(sensitivity['reverted_operations'])} operations kept in floating point)"
    )
    return quantized, record


def tuning_set(inputs: BuildInputs) -> tuple[np.ndarray, np.ndarray, str]:
    """What accuracy control scores on: the held-out split of the calibration source, never the validation set."""
    if inputs.heldout is not None and inputs.heldout_labels is not None and len(inputs.heldout):
        return inputs.heldout, np.asarray(inputs.heldout_labels), "calibration.heldout"
    raise T2tedgeError(
        "openvino int8: accuracy-aware quantization (max_accuracy_drop) needs labelled held-out images "
        "(calibration.heldout > 0, from a labelled calibration source)"
    )


def _batches(images: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(images[i : i + 1], dtype=np.float32) for i in range(len(images))]


def _top1(compiled: Any, items: Any) -> float:
    """Top-1 as a fraction, the metric NNCF's accuracy control compares (absolute drop)."""
    logits, labels = [], []
    request = compiled.create_infer_request()
    for image, label in items:
        logits.append(request.infer({0: image})[0])
        labels.append(label)
    return topk_accuracy(np.concatenate(logits), np.asarray(labels), 1) / 100.0


def _quantize_with_accuracy_control(
    model: Any, calibration: Any, inputs: BuildInputs, kwargs: dict[str, Any], max_drop_points: float
) -> tuple[Any, dict[str, Any]]:
    import nncf
    import openvino as ov

    images, labels, tuned_on = tuning_set(inputs)
    items = list(zip(_batches(images), labels.tolist(), strict=True))
    # validation_fn sees (image, label) items; NNCF's own inference on the set sees the image only.
    validation = nncf.Dataset(items, lambda item: item[0])
    advanced = kwargs.pop("advanced_parameters", None)
    # Validated at the plugin's default precision hint, as NNCF compiles the models it compares.
    core = ov.Core()
    fp32_top1 = _top1(core.compile_model(model, DEVICE, compile_properties(None, None)), items)
    with quiet_nncf(capture=True) as records:
        quantized = nncf.quantize_with_accuracy_control(
            model,
            calibration,
            validation,
            _top1,
            max_drop=max_drop_points / 100.0,
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=advanced,
            **kwargs,
        )
    final_compiled = core.compile_model(quantized, DEVICE, compile_properties(None, None))
    final_top1 = _top1(final_compiled, items)
    sensitivity = parse_accuracy_control_log(records)
    initial_drop = sensitivity.pop("initial_drop")
    sensitivity = {
        "metric": "top-1 (%)",
        "tuned_on": tuned_on,
        "images": int(len(labels)),
        "inference_precision": final_compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
        "max_drop_points": max_drop_points,
        "fp32_top1": 100.0 * fp32_top1,
        "int8_top1_before": None if initial_drop is None else 100.0 * (fp32_top1 - initial_drop),
        "int8_top1": 100.0 * final_top1,
        "achieved_drop_points": 100.0 * (fp32_top1 - final_top1),
        **sensitivity,
    }
    return quantized, sensitivity


def parse_accuracy_control_log(messages: list[str]) -> dict[str, Any]:
    """Per-step record of NNCF's greedy revert loop, read from its log (NNCF returns only the model).

    Each step reverts one group of operations to floating point and re-validates. ``recovered_points``
    is the top-1 that group won back relative to the model it was applied to; a step that made things
    worse is undone by NNCF (``kept: false``) unless it directly follows another undone step.
    """
    initial_drop: float | None = None
    steps: list[dict[str, Any]] = []
    nncf_final: list[str] | None = None
    exhausted = False
    for message in messages:
        head, _, rest = message.partition("\n")
        names = [line.strip() for line in rest.splitlines() if line.strip()]
        drop = _DROP.search(head)
        if head.startswith("Accuracy drop: ") and drop:
            initial_drop = float(drop.group(1))
        elif head.startswith("Reverted ") and "floating-point precision" in head:
            steps.append({"step": len(steps) + 1, "reverted": names, "drop_after_points": None})
        elif steps and drop and head.startswith(_DROP_AFTER_STEP):
            steps[-1]["drop_after_points"] = 100.0 * float(drop.group(1))
        elif head.startswith("All layers have been checked"):
            exhausted = True
        elif " were reverted back to the floating-point precision" in head:
            nncf_final = names
    # Replay NNCF's accept/undo rule (QuantizationAccuracyRestorer._apply) over the logged drops.
    accepted = nncf_previous = None if initial_drop is None else 100.0 * initial_drop
    step_back = True
    for index, step in enumerate(steps):
        after = step["drop_after_points"]
        step["recovered_points"] = None if accepted is None or after is None else accepted - after
        last = index == len(steps) - 1
        step["kept"] = last or after is None or step_back or nncf_previous is None or after <= nncf_previous
        if step["kept"]:
            accepted, step_back = after, False
        else:
            step_back = True
        nncf_previous = after
    kept = list(dict.fromkeys(name for step in steps if step["kept"] for name in step["reverted"]))
    return {
        "initial_drop": initial_drop,
        "reverted_operations": nncf_final if nncf_final is not None else kept,
        "all_layers_checked": exhausted,
        "steps": steps,
    }


# NNCF's messages carry the drop as a fraction followed by the drop type: "... 0.0123 (DropType.ABSOLUTE)".
_DROP = re.compile(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?) \(")
_DROP_AFTER_STEP = ("Accuracy drop with the new quantization scope is ", "Algorithm completed: achieved required")


def sensitivity_markdown(data: dict[str, Any]) -> str:
    """A short human-readable version of sensitivity.json."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines = [
        "# INT8 accuracy control (NNCF)",
        "",
        f"Top-1 on {data['images']} validation images: FP32 {pct(data['fp32_top1'])}%, "
        f"INT8 before {pct(data['int8_top1_before'])}%, after {pct(data['int8_top1'])}% "
        f"(drop {pct(data['achieved_drop_points'])} points; allowed {data['max_drop_points']}).",
        "",
    ]
    if data.get("all_layers_checked"):
        lines += ["NNCF reverted every group it ranked without reaching the allowed drop.", ""]
    if not data["steps"]:
        lines.append("No layer was reverted: the fully quantized model was within the allowed drop.")
    else:
        lines += ["| step | reverted to floating point | drop after (points) | recovered (points) | kept |"]
        lines += ["|---|---|---|---|---|"]
        for step in data["steps"]:
            lines.append(
                f"| {step['step']} | {', '.join(step['reverted'])} | {pct(step['drop_after_points'])} | "
                f"{pct(step['recovered_points'])} | {'yes' if step['kept'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def quiet_nncf(capture: bool = False) -> Iterator[list[str]]:
    """Keep NNCF off stdout (the CLI owns it): progress bars and warnings go to stderr, INFO is dropped.

    With ``capture``, NNCF's INFO messages are collected into the yielded list instead.
    """
    from nncf.common.logging import nncf_logger

    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    saved = [(handler, handler.level) for handler in nncf_logger.handlers]
    saved_level = nncf_logger.level
    collector = _Collect(logging.INFO)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("nncf %(levelname)s: %(message)s"))
    for handler, _ in saved:  # NNCF's own handler prints everything, warnings included, to stdout
        handler.setLevel(logging.CRITICAL + 1)
    nncf_logger.addHandler(warnings)
    if capture:
        nncf_logger.addHandler(collector)
        nncf_logger.setLevel(logging.INFO)
    try:
        # NNCF's rich progress bars write to whatever sys.stdout is when they draw.
        with contextlib.redirect_stdout(sys.stderr):
            yield messages
    finally:
        nncf_logger.removeHandler(collector)
        nncf_logger.removeHandler(warnings)
        nncf_logger.setLevel(saved_level)
        for handler, level in saved:
            handler.setLevel(level)


register_target(OpenVinoTarget())
