"""Core ML: an `.mlpackage` from coremltools; predict on macOS, a torch emulation of the same math elsewhere.

fp32 / fp16 convert the FP32 model's `torch.export` program (fixed 1x3xSxS input). int8-weights
quantizes the fp16 program's weights (symmetric, per-channel int8, `linear_quantize_weights`). w8a8
calibrates coremltools' torch-side `LinearQuantizer` on real images and converts the resulting
quantize/dequantize graph. Core ML cannot predict off macOS, so every build also saves a torch program
doing the artifact's math (`emulation.pt2`); there `load()` runs it and its numbers are `emulated`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import platform
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2tedge.errors import T2tedgeError
from t2tedge.pipeline.store import Artifact, sha256_file
from t2tedge.progress import track
from t2tedge.targets.base import Availability, BuildInputs, check_precision, register_target

PACKAGE = "model.mlpackage"
EMULATION_FILE = "emulation.pt2"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_DEPLOYMENT_TARGET = "iOS17"
# linear_quantize_weights' default: only tensors with more elements than this are quantized.
WEIGHT_THRESHOLD = 2048
QUANTIZED_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "quantize", "dequantize")
DYNAMIC_SHAPE_KEYS = ("dynamic_batch", "dynamic_shapes", "flexible_shapes")
CALIBRATION_BATCH = 32
# Ops renamed with this prefix stay fp32 in fp16 programs (see _fp32_scopes).
FP32_TAG = "t2tedge_fp32__"
EMULATIONS = {
    "fp32": "torch fp32 (the model Core ML was converted from)",
    "fp16": "torch float16 math on CPU (fp32 accumulation in convolutions), fp32 where the package keeps fp32",
    "int8-weights": "torch dequantized int8 weights, float16 math on CPU as for fp16",
    "w8a8": "torch fake-quant (w8a8): the converted quantize/dequantize graph, fp32 between them",
}


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    # Importing coremltools off macOS logs eight "Failed to load ..." warnings about the missing
    # runtime plus version notes; availability() already says what they mean.
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    # coremltools draws a tqdm bar per pass pipeline on stderr; the build has its own progress output.
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _coremltools() -> Any:
    with _quiet_coremltools():
        import coremltools

    return coremltools


class EmulationRunner:
    """Runs the torch program saved next to the package (any batch): a stand-in for Core ML where it cannot run."""

    label = "emulated"

    def __init__(self, path: Path, emulation: str, threads: int | None = None) -> None:
        # w8a8 programs call quantized_decomposed ops, which this import registers with torch.
        import torch.ao.quantization.fx._decomposed  # noqa: F401

        if threads:
            torch.set_num_threads(threads)
        program = torch.export.load(str(path))
        user_input = program.graph_signature.user_inputs[0]
        example = next(n for n in program.graph.nodes if n.name == user_input).meta["val"]
        self.dtype = example.dtype  # float16 programs take float16 images
        self.module = program.module()
        self.emulation = emulation

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.dtype)
        with torch.no_grad():
            return self.module(x).float().numpy()


class CoreMLRunner:
    """Core ML's own runtime (macOS only): one prediction per image, as the package has a fixed batch of 1."""

    label = "measured"

    def __init__(self, path: Path, compute_units: str, image_input: dict[str, Any] | None) -> None:
        ct = _coremltools()
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units])
        self.image_input = image_input

    def _feed(self, image: np.ndarray) -> Any:
        if self.image_input is None:
            return image[None]
        from PIL import Image

        # An ImageType input takes 8-bit RGB: undo the eval normalization the array went through.
        mean = np.asarray(self.image_input["mean"], np.float32)[:, None, None]
        std = np.asarray(self.image_input["std"], np.float32)[:, None, None]
        pixels = np.clip(np.rint((image * std + mean) * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels.transpose(1, 2, 0), "RGB")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        outs = [self.model.predict({INPUT_NAME: self._feed(image)})[OUTPUT_NAME] for image in images]
        return np.concatenate(outs).astype(np.float32)


class CoreMLTarget:
    """`.mlpackage` (ML program) in fp32, fp16, int8 weights or W8A8; predicts on macOS only."""

    name = "coreml"
    precisions = ("fp16", "fp32", "int8-weights", "w8a8")
    payload = ("*.mlpackage",)

    def availability(self) -> Availability:
        try:
            _coremltools()
        except ImportError:
            return Availability(False, False, "coremltools is not installed (pip install coremltools)")
        if platform.system() != "Darwin":
            return Availability(True, False, "Core ML predict needs macOS", can_emulate=True)
        return Availability(True, True)

    def needs_calibration(self, precision: str) -> bool:
        return precision == "w8a8"

    def tool_versions(self) -> dict[str, str]:
        return {"coremltools": _coremltools().__version__, "torch": torch.__version__}

    def build(self, inputs: BuildInputs, precision: str, out_dir: Path) -> dict[str, Any]:
        check_precision(self, precision)
        ct = _coremltools()
        config = inputs.config
        dynamic = [key for key in DYNAMIC_SHAPE_KEYS if config.get(key)]
        if dynamic:
            raise T2tedgeError(f"Core ML artifacts use fixed shapes here (1x3xSxS); drop {', '.join(dynamic)}")
        if inputs.torch_model is None:
            raise T2tedgeError("the coreml target converts from PyTorch, but the build got no torch model")
        deployment_name = str(config.get("minimum_deployment_target", DEFAULT_DEPLOYMENT_TARGET))
        deployment = _deployment_target(ct, deployment_name)
        if precision == "w8a8" and deployment < ct.target.iOS17:
            raise T2tedgeError("coreml w8a8 needs minimum_deployment_target iOS17 / macOS14 or later")
        compute_units = config.get("compute_units", "ALL")
        if compute_units not in ct.ComputeUnit.__members__:
            raise T2tedgeError(f"coreml compute_units must be one of {', '.join(ct.ComputeUnit.__members__)}")
        input_type, input_facts = _input_type(ct, config, inputs.image_size)

        model = copy.deepcopy(inputs.torch_model).float().eval()
        example = torch.zeros(1, 3, inputs.image_size, inputs.image_size)
        scopes = _fp32_scopes(model)
        facts: dict[str, Any] = {}
        if precision == "w8a8":
            model, facts["quantization"] = _calibrated_w8a8(model, inputs.calibration, config, scopes)
        with torch.no_grad():
            program = torch.export.export(model, (example,)).run_decompositions({})
        if precision == "w8a8":
            _register_quantize_per_channel()
        if precision == "fp32":
            compute_precision = ct.precision.FLOAT32
        elif scopes:
            facts["fp32_scopes"] = {"modules": scopes, "ops": _tag_fp32_ops(program, scopes), "why": FP32_WHY}
            compute_precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: FP32_TAG not in op.name)
        else:
            compute_precision = ct.precision.FLOAT16
        with _no_progress_bars():
            mlmodel = ct.convert(
                program,
                inputs=[input_type],
                outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
                convert_to="mlprogram",
                minimum_deployment_target=deployment,
                compute_precision=compute_precision,
            )
        if precision == "int8-weights":
            opt = ct.optimize.coreml
            op_config = opt.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD
            )
            with _no_progress_bars():
                mlmodel = opt.linear_quantize_weights(mlmodel, config=opt.OptimizationConfig(global_config=op_config))
        histogram = _op_histogram(mlmodel._mil_program)
        quantized = {op: histogram[op] for op in QUANTIZED_OPS if op in histogram}
        if precision == "w8a8" and not (quantized.get("quantize") and quantized.get("dequantize")):
            raise T2tedgeError("coreml w8a8: the converted program has no activation quantize/dequantize ops")
        if precision == "int8-weights" and not quantized:
            raise T2tedgeError("coreml int8-weights: no weight was large enough to quantize")
        mlmodel.save(str(out_dir / PACKAGE))

        if precision in ("fp32", "w8a8"):
            emulation = _export_any_batch(model, example)
        else:
            if precision == "int8-weights":
                model = _dequantized_int8_weights(model)
                facts["emulation_weight_check"] = _weight_check(mlmodel._mil_program, model)
            emulation = _export_any_batch(_float16_emulation(model, scopes), example.half())
        torch.export.save(emulation, str(out_dir / EMULATION_FILE))

        return {
            **facts,
            "package": PACKAGE,
            **_package_facts(out_dir / PACKAGE),
            "coremltools": ct.__version__,
            "minimum_deployment_target": deployment_name,
            "compute_precision": "float32" if precision == "fp32" else "float16",
            "compute_units": compute_units,
            "input": {"name": INPUT_NAME, "shape": [1, 3, inputs.image_size, inputs.image_size], **input_facts},
            "output": OUTPUT_NAME,
            "mil_ops": histogram,
            "quantized_ops": quantized,
            "emulation": EMULATIONS[precision],
            "emulation_file": EMULATION_FILE,
        }

    def load(self, artifact: Artifact, threads: int | None = None) -> EmulationRunner | CoreMLRunner:
        facts = artifact.manifest.get("build", {})
        if platform.system() == "Darwin":
            image_input = facts["input"] if facts.get("input", {}).get("type") == "image" else None
            return CoreMLRunner(artifact.file(PACKAGE), facts.get("compute_units", "ALL"), image_input)
        return EmulationRunner(artifact.file(EMULATION_FILE), facts.get("emulation", "torch"), threads)


def _deployment_target(ct: Any, name: str) -> Any:
    target = ct.target.__members__.get(name)
    if target is None:
        known = ", ".join(ct.target.__members__)
        raise T2tedgeError(f"unknown coreml minimum_deployment_target {name!r}; coremltools knows: {known}")
    if target < ct.target.iOS15:
        raise T2tedgeError(f"coreml ML programs need iOS15 / macOS12 or later, not {name}")
    return target


def _input_type(ct: Any, config: dict[str, Any], size: int) -> tuple[Any, dict[str, Any]]:
    """The Core ML input: a float32 tensor (default) or an RGB image normalized inside the model."""
    shape = (1, 3, size, size)
    kind = config.get("input_type", "tensor")
    if kind == "tensor":
        return ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32), {"type": "tensor", "dtype": "float32"}
    if kind != "image":
        raise T2tedgeError(f"coreml input_type must be 'tensor' or 'image', not {kind!r}")
    preprocess = config.get("preprocess")
    if not preprocess or "mean" not in preprocess or "std" not in preprocess:
        raise T2tedgeError("coreml input_type 'image' needs the model's mean/std: config 'preprocess' is missing")
    mean = [float(v) for v in preprocess["mean"]]
    std = [float(v) for v in preprocess["std"]]
    # ImageType has one scale for all channels: normalize by the mean std (exact when the stds are equal).
    std_used = sum(std) / len(std)
    image = ct.ImageType(
        name=INPUT_NAME,
        shape=shape,
        scale=1.0 / (255.0 * std_used),
        bias=[-m / std_used for m in mean],
        color_layout=ct.colorlayout.RGB,
    )
    return image, {"type": "image", "mean": mean, "std": std, "std_used": std_used}


FP32_WHY = (
    "Performer kernel math overflows fp16: exp features reach ~1e5 and the normalizer ~1e8 on trained "
    "weights (fp16 max 65504), and tiny normalizers flush to zero"
)


def _fp32_scopes(model: nn.Module) -> list[str]:
    """Modules whose own ops (not their child layers) must not run in fp16 or 8-bit: T2T-ViT's Performers."""
    from t2tedge.models.t2t_vit import TokenPerformer

    return [name for name, module in model.named_modules() if isinstance(module, TokenPerformer)]


def _tag_fp32_ops(program: torch.export.ExportedProgram, scopes: list[str]) -> int:
    """Rename the ops a scope runs itself so the fp16 pass can leave them fp32 (MIL op names keep the prefix)."""
    tagged = 0
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        is_output = any(user.op == "output" for user in node.users)
        if node.op == "call_function" and stack and not is_output and list(stack.values())[-1][0] in scopes:
            node._rename(FP32_TAG + node.name)
            tagged += 1
    program.graph_module.recompile()
    return tagged


def _float16_emulation(model: nn.Module, scopes: list[str]) -> nn.Module:
    """The model in float16 math, except the scopes' own ops in fp32 (their child layers stay float16).

    Convolutions compute in fp32 on their fp16 inputs and weights and round the result to fp16 (what an
    fp16 kernel with fp32 accumulators gives): torch's CPU float16 convolution is a slow reference loop.
    """
    own = {}
    for scope in scopes:
        module = model.get_submodule(scope)
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        own[scope] = {name: tensor.detach().clone() for name, tensor in tensors}
    model.half()
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            _cast_io(module.float(), inside=torch.float32, outside=torch.float16)  # weights stay fp16-rounded
    for scope in scopes:
        module = model.get_submodule(scope).float()
        with torch.no_grad():
            for name, value in own[scope].items():
                getattr(module, name).copy_(value)  # exact: the Performer's eps (1e-8) is 0 in float16
        _cast_io(module, inside=torch.float32, outside=torch.float16)
        for child in module.children():
            _cast_io(child.half(), inside=torch.float16, outside=torch.float32)
    return model


def _cast_io(module: nn.Module, inside: torch.dtype, outside: torch.dtype) -> None:
    module.register_forward_pre_hook(lambda _m, args: tuple(a.to(inside) if torch.is_tensor(a) else a for a in args))
    module.register_forward_hook(lambda _m, _args, out: out.to(outside))


def _calibrated_w8a8(
    model: nn.Module, calibration: np.ndarray | None, config: dict[str, Any], float_scopes: list[str]
) -> tuple[Any, dict]:
    """coremltools' LinearQuantizer calibrated on real images, as a plain-tensor quantize/dequantize graph."""
    if calibration is None or len(calibration) == 0:
        raise T2tedgeError("coreml w8a8 needs calibration images")
    import torch.ao.quantization as aoq
    from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig as OpConfig

    # Private, pinned APIs: finalize() gives quantized-tensor modules that torch.export cannot trace
    # ("quantized nyi in meta tensors"); the decomposed reference form uses plain int8 tensors and the
    # quantized_decomposed ops that coremltools' torch.export frontend reads.
    from coremltools.optimize.torch.quantization._backend_config import get_backend_config
    from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx

    op_config = OpConfig(quantization_scheme="symmetric", activation_observer="min_max", weight_observer="min_max")
    # The Performer's kernel math stays float (see _fp32_scopes): a per-tensor 8-bit normalizer also
    # rounds small values to zero and the division blows up. Its Linear layers are int8.
    by_name: dict[str, OpConfig | None] = {}
    for scope in float_scopes:
        by_name[scope] = None
        for child, module in model.get_submodule(scope).named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                by_name[f"{scope}.{child}"] = op_config
    quantizer = LinearQuantizer(model, LinearQuantizerConfig(global_config=op_config, module_name_configs=by_name))
    prepared = quantizer.prepare(example_inputs=(torch.from_numpy(calibration[:1]),))
    prepared.eval()  # batch norm on its running statistics; the observers still record
    batches = range(0, len(calibration), CALIBRATION_BATCH)
    with torch.no_grad():
        for start in track(batches, "coreml w8a8 calibration", total=len(batches)):
            prepared(torch.from_numpy(calibration[start : start + CALIBRATION_BATCH]))
    prepared.apply(aoq.disable_observer)
    reference = _convert_to_reference_decomposed_fx(
        prepared, qconfig_mapping=quantizer._qconfig_mapping, backend_config=get_backend_config()
    )
    facts: dict[str, Any] = {"tool": "coremltools.optimize.torch.quantization.LinearQuantizer", "method": "minmax"}
    if config.get("method", "minmax") != "minmax":
        facts["method_requested"] = config["method"]
        facts["method_note"] = "LinearQuantizer offers min/max observers only; minmax was used"
    return reference, {
        **facts,
        "weights": "int8 symmetric per-channel",
        "activations": "uint8 symmetric (zero point 128 for signed tensors, 0 for non-negative)",
        "float_scopes": float_scopes,
        "calibration_images": len(calibration),
    }


def _register_quantize_per_channel() -> None:
    """Teach coremltools' torch.export frontend the weight quantize op of the decomposed graph."""
    from coremltools.converters.mil.frontend.torch import quantization_ops
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    alias = "quantized_decomposed::quantize_per_channel"
    if _TORCH_OPS_REGISTRY.get_func(alias) is not None:
        return

    # The weight is a constant, so MIL folds quantize(weight) and dequantize() turns the int8 result
    # into a constexpr_affine_dequantize weight.
    @register_torch_op(torch_alias=[alias, "quantized_decomposed.quantize_per_channel"])
    def t2tedge_quantize_per_channel(context: Any, node: Any) -> None:
        x, scale, zero_point, axis, _qmin, _qmax, dtype = _get_inputs(context, node, expected=7)
        quantization_ops._quantize_general(context, node, x, scale, zero_point, dtype, int(axis.val))


def _export_any_batch(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Export with a dynamic batch, so emulated validation runs batched (the example needs batch >= 2)."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(model, (example.expand(2, -1, -1, -1),), dynamic_shapes=({0: batch},))


def _int8_symmetric(weight: torch.Tensor) -> torch.Tensor:
    """Quantize -> dequantize as linear_quantize_weights does: per output channel (axis 0), range +-127."""
    dims = tuple(range(1, weight.ndim))
    scale = weight.abs().amax(dim=dims, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def _dequantized_int8_weights(model: nn.Module) -> nn.Module:
    """The model with every tensor Core ML quantizes replaced by its int8 round trip.

    Per-channel symmetric scales commute with a per-channel factor, so quantizing a conv weight before
    batch-norm folding gives the same values as Core ML quantizing the folded weight.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() > WEIGHT_THRESHOLD:
                tensor.copy_(_int8_symmetric(tensor))
    return model


def _weight_check(program: Any, emulated: nn.Module) -> dict[str, Any]:
    """Compare the emulation's weights with the package's int8 weights (matched by export name).

    Core ML quantizes the fp16-rounded weight with an fp16 scale, so a value on a rounding edge may land
    one step away; more than that means the emulation does not follow the package.
    """
    tensors = {"p_" + name.replace(".", "_"): t for name, t in emulated.state_dict().items()}
    compared, worst = 0, 0.0
    for op in _operations(program):
        if op.op_type != "constexpr_affine_dequantize":
            continue
        name = op.name.removesuffix("_quantized").removesuffix("_to_fp16")
        if name not in tensors:
            continue  # a converter-made constant (e.g. nn.Unfold's one-hot kernel) or a folded weight
        data = op.quantized_data.val.astype(np.float32)
        shape = [1] * data.ndim
        shape[int(op.axis.val)] = -1
        scale = np.asarray(op.scale.val, np.float32)
        scale = scale.reshape(shape) if scale.ndim else scale
        zero_point = np.asarray(op.zero_point.val, np.float32)
        zero_point = zero_point.reshape(shape) if zero_point.ndim else zero_point
        dequantized = (data - zero_point) * scale
        steps = np.abs(dequantized - tensors[name].float().numpy()) / scale
        worst = max(worst, float(steps.max()))
        compared += 1
    return {"tensors_compared": compared, "max_error_in_steps": round(worst, 3)}


def _operations(program: Any) -> Iterator[Any]:
    def walk(block: Any) -> Iterator[Any]:
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    for function in program.functions.values():
        yield from walk(function)


def _op_histogram(program: Any) -> dict[str, int]:
    """MIL op type -> count, most common first."""
    return dict(Counter(op.op_type for op in _operations(program)).most_common())


def _package_facts(package: Path) -> dict[str, Any]:
    """Size and a content hash of the .mlpackage directory (the store's file list covers plain files only)."""
    digest = hashlib.sha256()
    total = 0
    files = sorted(p for p in package.rglob("*") if p.is_file())
    for path in files:
        relative = path.relative_to(package).as_posix()
        digest.update(f"{relative}\0{sha256_file(path)}\n".encode())
        total += path.stat().st_size
    return {"package_bytes": total, "package_sha256": digest.hexdigest(), "package_files": len(files)}


register_target(CoreMLTarget())
