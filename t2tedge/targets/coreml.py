"""Core ML: an `.mlpackage` from coremltools; predict on macOS, a torch emulation of the same math elsewhere.

fp32 / fp16 convert the FP32 model's `torch.export` program (fixed 1x3xSxS input). int8-weights
quantizes the fp16 program's weights (symmetric, per-channel int8, `linear_quantize_weights`). w8a8
calibrates coremltools' torch-side `LinearQuantizer` on real images and converts the resulting
quantize/dequantize graph, with int8 activations.

Core ML cannot predict off macOS, so every build also saves the artifact's math as a torch emulation:
plain tensors (`emulation.safetensors`) and how to rebuild the module around them (`emulation.json`:
precision, soft split, float modules, class count, image size). There `load()` verifies every file of
the artifact against its manifest, rebuilds the module from code (the model spec's architecture, then
the build's own transforms: float16 math; for w8a8 the quantizer prepared again with the calibrated
observer state loaded) and loads the tensors strictly; nothing in an artifact is unpickled. Its
numbers are `emulated`; the build records a hash of the emulation's logits on a few images
(`emulation_reference`), which the rebuilt module reproduces bit for bit.

The Neural Engine has no FP32: every op of an fp16, int8-weights or w8a8 package runs in FP16 unless it
is int8, and there is no fp32 fallback to pin an op to. So those builds run their emulation in half
precision on the calibration images first (`audit_fp16`) and stop if any tensor leaves FP16's range;
the manifest holds that record (`fp16_range`) and the package's MIL ops by output dtype.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import io
import json
import logging
import platform
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from t2tedge.artifact import Artifact, sha256_file
from t2tedge.errors import ArtifactError, T2tedgeError, TargetUnavailableError
from t2tedge.evaluation.accuracy import EMULATED
from t2tedge.progress import log, track
from t2tedge.targets.base import (
    MEASURED,
    Availability,
    BuildInputs,
    Capabilities,
    DeviceRunner,
    TargetConfig,
    check_precision,
    register_target,
)

PACKAGE = "model.mlpackage"
# The emulation: plain tensors and the JSON recipe that rebuilds the module holding them.
EMULATION_TENSORS = "emulation.safetensors"
EMULATION_RECIPE = "emulation.json"
EMULATION_FORMAT = 1
# How many images the build's emulation logits are recorded on (their sha256: `emulation_reference`).
REFERENCE_IMAGES = 2
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# linear_quantize_weights' default: only tensors with more elements than this are quantized.
WEIGHT_THRESHOLD = 2048
QUANTIZED_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "quantize", "dequantize")
CALIBRATION_BATCH = 32
# The Neural Engine's int8-int8 path (coremltools' W8A8 docs) takes signed int8 activations.
ACTIVATION_DTYPE = "int8"
# Ops that hold constants or convert dtypes rather than compute: not counted as fp32 compute in a package.
NOT_COMPUTE_OPS = ("const", "cast")
EMULATIONS = {
    "fp32": "torch fp32 (the model Core ML was converted from)",
    "fp16": "torch float16 on CPU: every op computes in fp32 and rounds its result to float16 "
    "(convolutions: float16 inputs and weights, fp32 accumulation)",
    "int8-weights": "torch dequantized int8 weights, float16 math on CPU as for fp16",
    "w8a8": "torch fake-quant (w8a8) in float16: the converted quantize/dequantize graph with int8 activations "
    "quantized from float16 values with float16-rounded scales and dequantized to float16, int8 per-channel "
    "weights dequantized once and rounded to float16, every float op as for fp16",
}
# What emulation.safetensors holds, by precision: the emulation's own state, or (w8a8) the calibrated
# quantizer's state, from which the quantize/dequantize graph is converted again at load.
EMULATION_STATE = {
    "fp32": "emulation",
    "fp16": "emulation",
    "int8-weights": "emulation",
    "w8a8": "calibrated LinearQuantizer",
}


class CoreMLConfig(TargetConfig):
    """The recipe's ``quantization.coreml`` section (plus the shared quantization keys)."""

    minimum_deployment_target: str = Field("iOS17", description="coremltools target, e.g. iOS17 or macOS14")
    input_type: Literal["tensor", "image"] = "tensor"
    compute_units: Literal["ALL", "CPU_ONLY", "CPU_AND_NE", "CPU_AND_GPU"] = Field(
        "ALL", description="used where Core ML can run (macOS)"
    )
    soft_split: Literal["unfold", "gather"] = Field(
        "unfold",
        description="T2T-ViT soft splits: unfold (nn.Unfold, converted to one-hot convolutions the Neural Engine "
        "runs) or gather (the model's export_form(): one row gather per split)",
    )
    float_modules: list[str] = Field(
        default_factory=list,
        description="w8a8: module-path glob patterns whose own ops stay float (FP16); modules inside them that "
        "no pattern matches stay int8; empty: the model's own hint (ModelSpec.quantization.float_modules)",
    )


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


def device_load(kit, directory, request):  # no annotations: its source runs on Python 3.8 devices
    """Compile the .mlpackage and predict with Core ML (macOS only), one image at a time.

    Self-contained (standard library, numpy, PIL; coremltools through ``kit.import_runtime``): SSH
    devices exec its source, and :class:`CoreMLRunner` calls it here. ``kit`` is
    :mod:`t2tedge.devices.remote_runner`.
    """
    import os
    import platform

    import numpy as np

    if platform.system() != "Darwin":
        raise kit.Unavailable("coreml predicts only on macOS; {device} runs " + platform.system())
    ct = kit.import_runtime("coremltools")
    build = request["build"]
    units = request.get("compute_units") or build["compute_units"]
    package = os.path.join(directory, build["package"])
    model = ct.models.MLModel(package, compute_units=ct.ComputeUnit[units])  # compiles the package
    image_input = build["input"] if build["input"]["type"] == "image" else None
    name, output = build["input"]["name"], build["output"]

    def feed(image):
        if image_input is None:
            return image[None]
        from PIL import Image

        # An ImageType input takes 8-bit RGB: undo the eval normalization the array went through.
        mean = np.asarray(image_input["mean"], np.float32)[:, None, None]
        std = np.asarray(image_input["std"], np.float32)[:, None, None]
        pixels = np.clip(np.rint((image * std + mean) * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels.transpose(1, 2, 0), "RGB")

    def run(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate([np.asarray(model.predict({name: feed(i)})[output]) for i in x]).astype(np.float32)

    facts = {"runtime": "coreml", "version": ct.__version__, "compute_units": units}
    # The package has a fixed batch of 1, but run() predicts image by image whatever the batch.
    return kit.Model(run, None, list(build["input"]["shape"][1:]), facts)


class CoreMLRunner(DeviceRunner):
    """Core ML's own runtime (macOS only), through the same :func:`device_load` SSH devices run."""

    def __init__(self, artifact: Artifact, threads: int | None = None) -> None:
        from t2tedge.devices import remote_runner as kit

        request = {"threads": threads, "build": artifact.manifest["build"]}
        try:
            with _quiet_coremltools():
                model = device_load(kit, str(artifact.path), request)
        except kit.Unavailable as exc:
            raise TargetUnavailableError(str(exc).replace("{device}", "this host")) from None
        super().__init__(model, MEASURED)


class EmulationRunner:
    """The artifact's math in torch (any batch), rebuilt from code and plain tensors: where Core ML cannot run."""

    label = EMULATED
    fixed_batch: int | None = None

    def __init__(self, module: nn.Module, precision: str, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.module = module
        self.dtype = torch.float32 if precision == "fp32" else torch.float16  # float16 modules take float16 images
        self.emulation: str | None = EMULATIONS[precision]
        self.runtime_facts: dict[str, Any] = {
            "runtime": "torch",
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "emulation_of": f"coreml {precision}",
        }

    @classmethod
    def from_artifact(cls, artifact: Artifact, threads: int | None = None) -> EmulationRunner:
        recipe = _read_recipe(artifact)
        return cls(rebuild_emulation(artifact, recipe), recipe["precision"], threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return _run_emulation(self.module, self.dtype, images)


class CoreMLTarget:
    """`.mlpackage` (ML program) in fp32, fp16, int8 weights or W8A8; predicts on macOS only."""

    name = "coreml"
    precisions = ("fp16", "fp32", "int8-weights", "w8a8")
    Config = CoreMLConfig
    capabilities = Capabilities(
        payload=("*.mlpackage",),
        device_runtime="coremltools",
        device_loader=device_load,
        device_systems=("Darwin",),  # Core ML predicts on macOS only
        peaks={},
    )

    def availability(self) -> Availability:
        try:
            _coremltools()
        except ImportError:
            return Availability(False, False, "coremltools is not installed (pip install coremltools)")
        if platform.system() != "Darwin":
            return Availability(True, False, "Core ML predict needs macOS", can_emulate=True)
        return Availability(True, True)

    def needs_calibration(self, precision: str) -> bool:
        return precision != "fp32"  # w8a8 calibrates on them, and every FP16 package's range check reads them

    def tool_versions(self) -> dict[str, str]:
        import safetensors

        return {
            "coremltools": _coremltools().__version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
        }

    def build(self, inputs: BuildInputs, precision: str, config: CoreMLConfig, out_dir: Path) -> dict[str, Any]:
        check_precision(self, precision)
        ct = _coremltools()
        deployment, input_type, input_facts = _checked_request(ct, inputs, precision, config)
        source, facts = _model_form(inputs.torch_model, inputs.export_form, config.soft_split)
        model = copy.deepcopy(source).float().eval()
        # the recipe's patterns, else the model's own hint (module paths; the target names no model)
        float_modules = [str(p) for p in (config.float_modules or inputs.hints.float_modules)]
        state = None
        if precision == "w8a8":
            model, state, facts["quantization"] = _calibrated_w8a8(model, inputs.calibration, config, float_modules)
        # What the package computes, in torch: the range check runs it before the (slower) conversion.
        emulated, dequantized = _emulation(model, precision)
        if precision != "fp32":
            facts["fp16_range"] = _fp16_range_check(emulated, inputs.calibration, precision)

        mlmodel = _convert(ct, model, precision, input_type, deployment, inputs.image_size)
        facts.update(_program_facts(mlmodel._mil_program, precision, facts.get("quantization"), dequantized))
        mlmodel.save(str(out_dir / PACKAGE))
        recipe = _emulation_recipe(inputs, precision, facts["soft_split"], float_modules)
        reference = _save_emulation(
            out_dir, recipe, emulated, state, reference_images(inputs.calibration, inputs.image_size)
        )
        return {
            **facts,
            "package": PACKAGE,
            **_package_facts(out_dir / PACKAGE),
            "coremltools": ct.__version__,
            "minimum_deployment_target": config.minimum_deployment_target,
            "compute_precision": "float32" if precision == "fp32" else "float16",
            "compute_units": config.compute_units,
            "input": {"name": INPUT_NAME, "shape": [1, 3, inputs.image_size, inputs.image_size], **input_facts},
            "output": OUTPUT_NAME,
            "emulation": EMULATIONS[precision],
            "emulation_files": [EMULATION_TENSORS, EMULATION_RECIPE],
            "emulation_reference": reference,
        }

    def load(self, artifact: Artifact, threads: int | None = None) -> EmulationRunner | CoreMLRunner:
        artifact.verify()  # every listed file, byte for byte what the build wrote, before any is read
        if platform.system() == "Darwin":
            return CoreMLRunner(artifact, threads)
        return EmulationRunner.from_artifact(artifact, threads)


# ---- build steps ---------------------------------------------------------------------------------------


def _checked_request(ct: Any, inputs: BuildInputs, precision: str, config: CoreMLConfig) -> tuple[Any, Any, dict]:
    """What the schema cannot check: a torch model, the deployment target, the image input's mean/std, images.

    Returns the coremltools deployment target, the input type and its facts.
    """
    if inputs.torch_model is None:
        raise T2tedgeError("the coreml target converts from PyTorch, but the build got no torch model")
    deployment = _deployment_target(ct, config.minimum_deployment_target, precision)
    input_type, input_facts = _input_type(ct, config.input_type, inputs.preprocess, inputs.image_size)
    if precision != "fp32" and (inputs.calibration is None or len(inputs.calibration) == 0):
        raise T2tedgeError(f"coreml {precision} needs calibration images (the FP16 range check reads them)")
    return deployment, input_type, input_facts


def _deployment_target(ct: Any, name: str, precision: str) -> Any:
    target = ct.target.__members__.get(name)
    if target is None:
        known = ", ".join(ct.target.__members__)
        raise T2tedgeError(f"unknown coreml minimum_deployment_target {name!r}; coremltools knows: {known}")
    if target < ct.target.iOS15:
        raise T2tedgeError(f"coreml ML programs need iOS15 / macOS12 or later, not {name}")
    if precision == "w8a8" and target < ct.target.iOS17:
        raise T2tedgeError("coreml w8a8 needs minimum_deployment_target iOS17 / macOS14 or later")
    return target


def _input_type(ct: Any, kind: str, preprocess: dict[str, Any], size: int) -> tuple[Any, dict[str, Any]]:
    """The Core ML input: a float32 tensor (default) or an RGB image normalized inside the model."""
    shape = (1, 3, size, size)
    if kind == "tensor":
        return ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32), {"type": "tensor", "dtype": "float32"}
    if "mean" not in preprocess or "std" not in preprocess:
        raise T2tedgeError("coreml input_type 'image' needs the model's mean/std: the build got no preprocess")
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


def _model_form(model: nn.Module, export_form: nn.Module | None, soft_split: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model Core ML converts (not copied): its own forward (`unfold`) or, for `gather`, its export form.

    A model's own soft splits may be `nn.Unfold`, which coremltools converts to one-hot convolutions
    (Neural Engine ops); its export form (``BuildInputs.export_form``) is the same function with one row
    gather per split.
    """
    if soft_split == "unfold":
        return model, {"soft_split": "unfold"}
    if export_form is None:
        note = "gather was asked for, but the model has no export_form(): its own forward was converted"
        return model, {"soft_split": "unfold", "soft_split_note": note}
    return export_form, {"soft_split": "gather"}


def _emulation(model: nn.Module, precision: str) -> tuple[nn.Module, nn.Module | None]:
    """What the package computes, in torch; and for int8-weights the fp32 round trip of what Core ML quantizes.

    The second (kept to check the package's weights against) is None for the other precisions.
    """
    if precision == "fp32":
        return model, None
    if precision == "w8a8":
        return _float16_w8a8(model), None
    dequantized = _dequantized_int8_weights(copy.deepcopy(model)) if precision == "int8-weights" else None
    return _float16_emulation(copy.deepcopy(model if dequantized is None else dequantized)), dequantized


def _convert(ct: Any, model: nn.Module, precision: str, input_type: Any, deployment: Any, size: int) -> Any:
    """The ML program: coremltools' conversion of the model's torch.export program (int8-weights: quantized)."""
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        program = torch.export.export(model, (example,)).run_decompositions({})
    if precision == "w8a8":
        _register_quantize_per_channel()
    with _no_progress_bars():
        mlmodel = ct.convert(
            program,
            inputs=[input_type],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=deployment,
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        )
    if precision != "int8-weights":
        return mlmodel
    opt = ct.optimize.coreml
    op_config = opt.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD
    )
    with _no_progress_bars():
        return opt.linear_quantize_weights(mlmodel, config=opt.OptimizationConfig(global_config=op_config))


def _program_facts(
    program: Any, precision: str, quantization: dict[str, Any] | None, dequantized: nn.Module | None
) -> dict[str, Any]:
    """The package's MIL ops (by type and output dtype); stops a build whose quantization did not happen."""
    histogram = _op_histogram(program)
    by_dtype = _ops_by_dtype(program)
    quantized = {op: histogram[op] for op in QUANTIZED_OPS if op in histogram}
    facts: dict[str, Any] = {
        "mil_ops": histogram,
        "mil_ops_by_dtype": by_dtype,
        "fp32_compute_ops": _fp32_compute_ops(program),
        "quantized_ops": quantized,
    }
    if precision == "w8a8" and quantization is not None:
        if not (quantized.get("quantize") and quantized.get("dequantize")):
            raise T2tedgeError("coreml w8a8: the converted program has no activation quantize/dequantize ops")
        activation_dtypes = by_dtype["quantize"]
        if set(activation_dtypes) != {ACTIVATION_DTYPE}:
            raise T2tedgeError(
                f"coreml w8a8: the package's quantize ops output {activation_dtypes}; the Neural Engine's "
                f"int8 path takes {ACTIVATION_DTYPE} activations"
            )
        quantization["activation_dtypes"] = activation_dtypes
    if precision == "int8-weights" and dequantized is not None:
        if not quantized:
            raise T2tedgeError("coreml int8-weights: no weight was large enough to quantize")
        facts["emulation_weight_check"] = _weight_check(program, dequantized)
    return facts


# ---- the emulation on disk: plain tensors and a JSON recipe, rebuilt from code ---------------------------


def _emulation_recipe(inputs: BuildInputs, precision: str, soft_split: str, float_modules: list[str]) -> dict:
    """What :func:`rebuild_emulation` needs besides the tensors and the manifest's model name."""
    return {
        "format": EMULATION_FORMAT,
        "precision": precision,
        "state": EMULATION_STATE[precision],
        "soft_split": soft_split,
        "num_classes": inputs.num_classes,
        "image_size": inputs.image_size,
        "float_modules": float_modules if precision == "w8a8" else [],
    }


def _save_emulation(
    out_dir: Path,
    recipe: dict[str, Any],
    emulated: nn.Module,
    state: dict[str, torch.Tensor] | None,
    images: np.ndarray,
) -> dict[str, Any]:
    """Write the tensors (the emulation's state, or ``state``) and the recipe; returns the reference record.

    The record holds the sha256 of the emulation's logits on ``images``: what the rebuilt module gives too.
    """
    from safetensors.torch import save_file

    tensors = emulated.state_dict() if state is None else state
    # clones: safetensors refuses tensors sharing storage, and a state dict may hold views
    save_file({key: value.detach().clone().contiguous() for key, value in tensors.items()}, out_dir / EMULATION_TENSORS)
    (out_dir / EMULATION_RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    return {
        "images": len(images),
        "from": "the first calibration images, else standard normal (numpy default_rng(0))",
        "logits_sha256": _logits_sha256(emulated, recipe["precision"], images),
    }


def reference_images(calibration: np.ndarray | None, size: int) -> np.ndarray:
    """The first calibration images, else seeded standard-normal ones (fp32 builds need no calibration)."""
    if calibration is not None and len(calibration) >= REFERENCE_IMAGES:
        return np.ascontiguousarray(calibration[:REFERENCE_IMAGES], dtype=np.float32)
    return np.random.default_rng(0).standard_normal((REFERENCE_IMAGES, 3, size, size)).astype(np.float32)


def _run_emulation(module: nn.Module, dtype: torch.dtype, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(dtype)
    with torch.no_grad():
        return module(x).float().numpy()


def _logits_sha256(module: nn.Module, precision: str, images: np.ndarray) -> str:
    dtype = torch.float32 if precision == "fp32" else torch.float16
    return hashlib.sha256(np.ascontiguousarray(_run_emulation(module, dtype, images)).tobytes()).hexdigest()


def _read_recipe(artifact: Artifact) -> dict[str, Any]:
    path = artifact.file(EMULATION_RECIPE)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: the artifact predates plain-tensor emulations; rebuild it")
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is corrupt ({exc.msg}); rebuild the artifact") from None
    if recipe.get("format") != EMULATION_FORMAT or recipe.get("precision") not in EMULATIONS:
        raise ArtifactError(f"{path} is not a format-{EMULATION_FORMAT} coreml emulation recipe; rebuild the artifact")
    return recipe


def rebuild_emulation(artifact: Artifact, recipe: dict[str, Any] | None = None) -> nn.Module:
    """The build's emulation module, rebuilt from code with the artifact's tensors loaded strictly.

    The architecture comes from the model spec (``manifest["model"]``) at the recipe's class count and
    image size; then the build's transforms: the export form for `gather`, float16 math, and for w8a8
    the same quantizer preparation, the calibrated state loaded, converted and put in float16 again.
    Reads JSON and safetensors only (call ``artifact.verify()`` first: :meth:`CoreMLTarget.load` does).
    """
    from safetensors.torch import load_file

    from t2tedge.models import get_spec

    recipe = recipe or _read_recipe(artifact)
    precision, size = recipe["precision"], int(recipe["image_size"])
    tensors = load_file(artifact.file(EMULATION_TENSORS))
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; the caller's RNG is left alone
        model = get_spec(artifact.manifest["model"]).create(num_classes=int(recipe["num_classes"]), image_size=size)
    model = model.float().eval()
    if recipe["soft_split"] == "gather":
        model = _export_form_of(model, artifact)
    if precision == "w8a8":
        prepared, qconfig_mapping, _ = _prepare_w8a8(
            model, list(recipe["float_modules"]), torch.zeros(1, 3, size, size)
        )
        _load_strict(prepared, tensors, artifact)
        return _float16_w8a8(_reference_w8a8(prepared, qconfig_mapping))
    emulated = model if precision == "fp32" else _float16_emulation(model)
    _load_strict(emulated, tensors, artifact)
    return emulated


def _export_form_of(model: nn.Module, artifact: Artifact) -> nn.Module:
    """The rebuilt model's graph form (what ``BuildInputs.export_form`` was at build time)."""
    from t2tedge.models import graph_form

    form = graph_form(model)
    if form is None:
        raise ArtifactError(
            f"{artifact.path} was built with soft_split gather, but {artifact.manifest['model']} has no export form"
        )
    return form.float()


def _load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], artifact: Artifact) -> None:
    """Load the artifact's tensors into the rebuilt module: the same names and dtypes, every one, nothing else."""
    own = module.state_dict()
    where = artifact.file(EMULATION_TENSORS)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ArtifactError(
            f"{where} does not fit the rebuilt emulation ({len(missing)} tensors missing, {len(unexpected)} "
            f"unexpected, e.g. {example}); rebuild the artifact"
        )
    wrong = [key for key, value in own.items() if value.dtype != tensors[key].dtype]
    if wrong:
        raise ArtifactError(
            f"{where}: {wrong[0]} is {tensors[wrong[0]].dtype}, the rebuilt emulation holds {own[wrong[0]].dtype}; "
            "rebuild the artifact"
        )
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ArtifactError(f"{where} does not fit the rebuilt emulation ({first}); rebuild the artifact") from None


def _float16_emulation(model: nn.Module) -> nn.Module:
    """The model in float16 math, in place.

    Convolutions compute in fp32 on their fp16 inputs and weights and round the result to fp16: what
    torch's CPU float16 convolution computes too (bit for bit on a CNN here), several times faster.
    """
    model.half()
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            _cast_io(module.float(), inside=torch.float32, outside=torch.float16)  # weights stay fp16-rounded
    return model


def _cast_io(module: nn.Module, inside: torch.dtype, outside: torch.dtype) -> None:
    module.register_forward_pre_hook(lambda _m, args: tuple(a.to(inside) if torch.is_tensor(a) else a for a in args))
    module.register_forward_hook(lambda _m, _args, out: out.to(outside))


def _fp16_range_check(model: nn.Module, images: np.ndarray, precision: str) -> dict[str, Any]:
    """Run the float16 emulation on the calibration images; stop the build if a tensor leaves FP16's range."""
    from t2tedge.emulation import audit_fp16

    log(f"  coreml/{precision}: FP16 range check on {len(images)} calibration images")
    _, record = audit_fp16(model, images, batch_size=CALIBRATION_BATCH)
    if record["outside_fp16"]:
        first = record["outside_fp16"][0]
        module = _module_running_op(model, images, int(first["tensor"].split(":")[0]))
        where = f" (in module {module})" if module else ""
        value = f"{first['max_abs']:.4g}"
        if first["nonfinite"]:
            value = f"inf/nan ({first['nonfinite']} values; largest finite {value})"
        raise T2tedgeError(
            f"coreml {precision}: ATen op {first['tensor']}{where} leaves FP16's range on the calibration images "
            f"(max |value| {value}); the Neural Engine computes in FP16, so there is no FP32 fallback to pin it to"
        )
    return record


def _module_running_op(model: nn.Module, images: np.ndarray, index: int) -> str | None:
    """The innermost module whose forward runs the index-th ATen op of a forward, as audit_fp16 numbers them.

    The audit counts every ATen op of one forward in call order; a rerun of the same batch under a
    dispatch mode counting the same way, with the module stack kept by hooks, finds where that op runs.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    stack = [""]
    found: list[str] = []

    class Locate(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if self.calls == index:
                found.append(stack[-1])
            self.calls += 1
            return func(*args, **(kwargs or {}))

    def enter(name: str) -> Any:
        return lambda _module, _args: stack.append(name)

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:  # registered after the modules' own hooks, so a layer's output cast counts as the layer's
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.no_grad(), Locate():
            model(torch.from_numpy(images[:CALIBRATION_BATCH]).half())
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found and found[0] else None


def _prepare_w8a8(
    model: nn.Module, float_modules: list[str], example: torch.Tensor
) -> tuple[torch.fx.GraphModule, Any, dict[str, Any]]:
    """coremltools' LinearQuantizer prepared on the model, its activation observers made signed int8.

    What it makes depends on the model's structure and the patterns only (the example's values reach
    the observers, which the build then calibrates and the emulation's load overwrites): the build
    prepares, then calibrates; the emulation's load prepares again and loads the calibrated state.
    Returns the prepared model, its qconfig mapping and facts about the preparation.
    """
    from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig
    from coremltools.optimize.torch.quantization import ModuleLinearQuantizerConfig as OpConfig

    op_config = OpConfig(quantization_scheme="symmetric", activation_observer="min_max", weight_observer="min_max")
    by_name, floats = _float_module_configs(model, float_modules, op_config)
    quantizer = LinearQuantizer(model, LinearQuantizerConfig(global_config=op_config, module_name_configs=by_name))
    prepared = quantizer.prepare(example_inputs=(example,))
    prepared.eval()  # batch norm on its running statistics; the observers still record
    scalars = _drop_scalar_observers(prepared, example)
    activation_quantizers = _signed_int8_activations(prepared)
    facts = {
        "activation_quantizers": activation_quantizers,
        "scalar_observers_dropped": scalars,
        "float_module_patterns": float_modules,
        "float_modules": floats,
    }
    return prepared, quantizer._qconfig_mapping, facts


def _reference_w8a8(prepared: torch.fx.GraphModule, qconfig_mapping: Any) -> torch.fx.GraphModule:
    """The calibrated prepared model as a plain-tensor quantize/dequantize graph (observers off)."""
    import torch.ao.quantization as aoq

    # Private, pinned APIs: finalize() gives quantized-tensor modules that torch.export cannot trace
    # ("quantized nyi in meta tensors"); the decomposed reference form uses plain int8 tensors and the
    # quantized_decomposed ops that coremltools' torch.export frontend reads.
    from coremltools.optimize.torch.quantization._backend_config import get_backend_config
    from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx

    prepared.apply(aoq.disable_observer)
    return _convert_to_reference_decomposed_fx(
        prepared, qconfig_mapping=qconfig_mapping, backend_config=get_backend_config()
    )


def _calibrated_w8a8(
    model: nn.Module, calibration: np.ndarray, config: CoreMLConfig, float_modules: list[str]
) -> tuple[torch.fx.GraphModule, dict[str, torch.Tensor], dict[str, Any]]:
    """coremltools' LinearQuantizer calibrated on real images, as a plain-tensor quantize/dequantize graph.

    Also returns the calibrated state (weights and observers, before conversion): what the emulation
    stores and loads into a freshly prepared quantizer to convert the same graph again.
    """
    import torch.ao.quantization as aoq

    prepared, qconfig_mapping, prepare_facts = _prepare_w8a8(model, float_modules, torch.from_numpy(calibration[:1]))
    batches = range(0, len(calibration), CALIBRATION_BATCH)
    finite = True
    with torch.no_grad():
        for start in track(batches, "coreml w8a8 calibration", total=len(batches)):
            out = prepared(torch.from_numpy(calibration[start : start + CALIBRATION_BATCH]))
            finite = finite and bool(torch.isfinite(out).all())
    if not finite:
        raise T2tedgeError(
            "coreml w8a8: with 8-bit activations the model's outputs are not finite on the calibration images "
            "(in fp32, so not an FP16 overflow); keep the modules whose math breaks float: coreml.float_modules"
        )
    prepared.apply(aoq.disable_observer)
    state = {key: value.detach().clone() for key, value in prepared.state_dict().items()}
    reference = _reference_w8a8(prepared, qconfig_mapping)
    facts: dict[str, Any] = {"tool": "coremltools.optimize.torch.quantization.LinearQuantizer", "method": "minmax"}
    if config.method != "minmax":
        facts["method_requested"] = config.method
        facts["method_note"] = "LinearQuantizer offers min/max observers only; minmax was used"
    return (
        reference,
        state,
        {
            **facts,
            "weights": "int8 symmetric per-channel",
            "activations": "int8 symmetric per-tensor",
            "activation_quantizers": prepare_facts["activation_quantizers"],
            "scalar_observers_dropped": prepare_facts["scalar_observers_dropped"],
            "float_module_patterns": float_modules,
            "float_modules": prepare_facts["float_modules"],
            "calibration_images": len(calibration),
        },
    )


def _float_module_configs(model: nn.Module, patterns: list[str], op_config: Any) -> tuple[dict[str, Any], list[str]]:
    """LinearQuantizer module_name_configs for `coreml.float_modules` (module-path globs).

    A matching module's own ops (its forward's arithmetic) stay float; a module inside it that no pattern
    matches keeps the global config, so e.g. the Linear layers of a float block still run int8.
    """
    names = [name for name, _ in model.named_modules() if name]
    floats = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    configs: dict[str, Any] = dict.fromkeys(floats)
    for name in names:
        if name not in configs and any(name.startswith(f"{scope}.") for scope in floats):
            configs[name] = op_config
    return configs, floats


def _drop_scalar_observers(prepared: torch.fx.GraphModule, example: torch.Tensor) -> int:
    """Remove the activation observers the trace put on Python numbers; returns how many.

    FX traces arithmetic on a tensor's shape (a scale of 1 / sqrt(tokens)) as graph values, and the
    quantizer observes them like activations: a number has no range to calibrate, and neither the
    observer nor the converted quantize op accepts one.
    """
    import torch.ao.quantization as aoq

    scalars: list[torch.fx.Node] = []

    class Finder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            if node.op == "call_module" and isinstance(self.module.get_submodule(node.target), aoq.FakeQuantizeBase):
                (value,), _ = self.fetch_args_kwargs_from_env(node)
                if not torch.is_tensor(value):
                    scalars.append(node)
                    return value
            return super().run_node(node)

    with torch.no_grad():
        Finder(prepared).run(example)
    for node in scalars:
        node.replace_all_uses_with(node.args[0])
        prepared.graph.erase_node(node)
    prepared.recompile()
    return len(scalars)


def _signed_int8_activations(prepared: nn.Module) -> int:
    """Make every activation quantizer symmetric int8 ([-128, 127], zero point 0); returns how many.

    coremltools' quantizer observes activations as quint8: zero point 128 for signed tensors (MIL turns
    a quantize -> dequantize pair of those into int8, but not one with a reshape between them) and
    zero point 0 for tensors it knows are non-negative (after ReLU, sigmoid-like ops). The Neural
    Engine's int8 path takes signed int8, so the observers record int8 ranges directly; a non-negative
    tensor then uses int8's [0, 127] (one bit less resolution than uint8 there).
    """
    import torch.ao.quantization as aoq

    low, high = torch.iinfo(torch.int8).min, torch.iinfo(torch.int8).max
    changed = 0
    for module in prepared.modules():
        if not isinstance(module, aoq.FakeQuantizeBase) or module.dtype != torch.quint8:
            continue  # weights are qint8 already
        observer = module.activation_post_process
        if isinstance(module, aoq.FixedQParamsFakeQuantize):
            # the same represented range (sigmoid's [0, 1)), on int8 levels about 0
            zero_point, scale = int(module.zero_point), float(module.scale)
            reach = max(zero_point - module.quant_min, module.quant_max - zero_point) * scale
            for holder in (module, observer):
                holder.scale.fill_(reach / high)
                holder.zero_point.fill_(0)
        else:
            observer.qscheme = module.qscheme = torch.per_tensor_symmetric
            observer.has_customized_qrange = False  # int8's full range: torch's symmetric zero point is 0
        for holder in (module, observer):
            holder.dtype, holder.quant_min, holder.quant_max = torch.qint8, low, high
        changed += 1
    return changed


def _float16_w8a8(reference: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The w8a8 quantize/dequantize graph with its float parts in float16, as the package computes them.

    Activation scales are rounded to float16 (an fp16 program's quantize ops take fp16 scales) and
    dequantize returns float16. Each reference Conv/Linear becomes a plain layer holding its int8 weight
    dequantized (the package's constexpr weight); the rest is the graph in float16 as for fp16.
    """
    from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

    graph_module = copy.deepcopy(reference)
    for name, module in list(graph_module.named_modules()):
        if isinstance(module, ReferenceQuantizedModule):
            parent, _, child = name.rpartition(".")
            setattr(graph_module.get_submodule(parent), child, _plain_layer(module))
    decomposed = torch.ops.quantized_decomposed
    activation_ops = (decomposed.quantize_per_tensor.default, decomposed.dequantize_per_tensor.default)
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in activation_ops:
            value, scale, *rest = node.args
            node.args = (value, float(np.float16(scale)), *rest)
            if node.target == decomposed.dequantize_per_tensor.default:
                node.kwargs = {**node.kwargs, "out_dtype": torch.float16}
    graph_module.recompile()
    return _float16_emulation(graph_module)


CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_layer(module: nn.Module) -> nn.Module:
    """A float Conv/Linear holding a reference quantized layer's int8 weight, dequantized."""
    if isinstance(module, nn.Linear):
        layer: nn.Module = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    elif isinstance(module, CONV_LAYERS):
        base = next(cls for cls in CONV_LAYERS if isinstance(module, cls))  # what the reference layer derives from
        layer = base(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
    else:
        raise T2tedgeError(f"coreml w8a8 emulation has no float form of {type(module).__name__}")
    with torch.no_grad():
        layer.weight.copy_(module.get_weight())
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    return layer


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


def _dtype_name(var: Any) -> str:
    """A MIL value's dtype as coremltools writes it (fp16, fp32, int8, ...); tensors give their element type."""
    from coremltools.converters.mil.mil.types import builtin_to_string

    return builtin_to_string(var.dtype) or getattr(var.dtype, "__name__", str(var.dtype))


def _ops_by_dtype(program: Any) -> dict[str, dict[str, int]]:
    """MIL op type -> {output dtype: op count}; an op whose outputs have several dtypes counts under each."""
    counts: dict[str, Counter] = {}
    for op in _operations(program):
        for dtype in {_dtype_name(var) for var in op.outputs}:
            counts.setdefault(op.op_type, Counter())[dtype] += 1
    return {op_type: dict(sorted(counter.items())) for op_type, counter in sorted(counts.items())}


def _fp32_compute_ops(program: Any) -> int:
    """Ops computing in fp32: an fp32 output, not a constant, a constexpr weight or a cast.

    Casts move data between dtypes: the fp32 input's cast to fp16 and the cast back to the declared fp32
    output are in every fp16 package; what the count looks for is arithmetic left in fp32.
    """
    return sum(
        1
        for op in _operations(program)
        if op.op_type not in NOT_COMPUTE_OPS
        and not op.op_type.startswith("constexpr_")
        and any(_dtype_name(var) == "fp32" for var in op.outputs)
    )


def _package_facts(package: Path) -> dict[str, Any]:
    """Size and a content hash of the .mlpackage directory (its files are in the manifest's list too)."""
    digest = hashlib.sha256()
    total = 0
    files = sorted(p for p in package.rglob("*") if p.is_file())
    for path in files:
        relative = path.relative_to(package).as_posix()
        digest.update(f"{relative}\0{sha256_file(path)}\n".encode())
        total += path.stat().st_size
    return {"package_bytes": total, "package_sha256": digest.hexdigest(), "package_files": len(files)}


register_target(CoreMLTarget())
