"""Core ML target: conversion of tiny models at 32 px, quantized programs, and the torch emulation on Linux."""

from __future__ import annotations

import copy
import json
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from t2tedge.data.cache import preprocess  # noqa: E402
from t2tedge.data.datasets import open_dataset  # noqa: E402
from t2tedge.errors import T2tedgeError  # noqa: E402
from t2tedge.models import demo_checkpoint, get_spec, load_model  # noqa: E402
from t2tedge.models.spec import Preprocess  # noqa: E402
from t2tedge.pipeline.store import Artifact, ArtifactStore  # noqa: E402
from t2tedge.pipeline.validate import run_validation  # noqa: E402
from t2tedge.targets import BuildInputs, get_target  # noqa: E402
from t2tedge.targets.coreml import EMULATION_FILE, PACKAGE, _float_module_configs, _model_form  # noqa: E402

SIZE = 32
PRE = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
CALIBRATION, HELD_OUT = slice(0, 8), slice(8, 24)
ON_MAC = platform.system() == "Darwin"
# The Performer's kernel math (exp, normalizer, division) breaks with 8-bit activations: w8a8 keeps it float.
PERFORMER_FLOAT = ["tokens_to_token.attention?"]


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST images, preprocessed at 32 px, and their labels."""
    dataset = open_dataset("fashion_mnist:train")
    indices = np.arange(24)
    return preprocess(dataset, indices, PRE, "coreml test images"), dataset.labels[indices]


@pytest.fixture(scope="module")
def models(images: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    t2t = get_spec("t2t_vit_7").create(num_classes=10, image_size=SIZE)
    # Trained T2T-ViTs drive the Performer's exp features far past fp16's range in the direct form;
    # larger token projections make random weights do the same, which the FP16-safe form must absorb.
    with torch.no_grad():
        t2t.tokens_to_token.attention1.kqv.weight.mul_(4)
    # W8A8 calibration and conversion are the slow part: the T2T module with its Performers plus two blocks.
    t2t_depth2 = get_spec("t2t_vit_7").create(num_classes=10, image_size=SIZE, depth=2)
    built = {"t2t_vit_7": t2t, "t2t_vit_7-depth2": t2t_depth2}
    for name in ("mobilenet_v2", "mobilenet_v3_small"):
        mobilenet = get_spec(name).create(num_classes=10, image_size=SIZE)
        # Random MobileNet weights with untouched batch-norm statistics give logits near 1e-10; one pass in
        # train mode sets the statistics so the logits have a scale the comparisons can see.
        mobilenet.train()
        with torch.no_grad():
            mobilenet(torch.from_numpy(images[0]))
        built[name] = mobilenet.eval()
    return built


@pytest.fixture(scope="module")
def build(
    tmp_path_factory: pytest.TempPathFactory, images: tuple[np.ndarray, np.ndarray], models: dict[str, torch.nn.Module]
) -> Callable[..., Artifact]:
    """Build (once per module) a model x precision through the artifact store, as the Builder does."""
    store = ArtifactStore(tmp_path_factory.mktemp("coreml"))
    built: dict[tuple[str, str, str], Artifact] = {}

    def get(name: str, precision: str, input_type: str = "tensor", **settings: Any) -> Artifact:
        key = (name, precision, input_type, json.dumps(settings, sort_keys=True))
        if key not in built:
            config: dict[str, Any] = {"input_type": input_type, "preprocess": PRE.to_dict(), **settings}
            inputs = BuildInputs(
                onnx_path=Path("unused.onnx"),
                image_size=SIZE,
                num_classes=10,
                family=get_spec(name.split("-")[0]).family,
                config=config,
                calibration=images[0][CALIBRATION],
                torch_model=models[name],
            )
            with store.build(name, "coreml", precision, {"key": list(key)}) as job:
                job.manifest["build"] = get_target("coreml").build(inputs, precision, job.dir)
            built[key] = job.artifact
        return built[key]

    return get


def _torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _bare_inputs(model: torch.nn.Module, config: dict[str, Any], calibration: np.ndarray | None = None) -> BuildInputs:
    return BuildInputs(Path("unused.onnx"), SIZE, 10, "mobilenet", config, calibration=calibration, torch_model=model)


def _float_dtypes(program: torch.export.ExportedProgram, images: np.ndarray) -> set[torch.dtype]:
    """The dtypes of every floating-point ATen result while the program runs on the images."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    seen: set[torch.dtype] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            seen.update(v.dtype for v in tree_flatten(out)[0] if torch.is_tensor(v) and v.is_floating_point())
            return out

    module, x = program.module(), torch.from_numpy(images).half()
    with torch.no_grad():
        module(x)  # a loaded program's first call lifts a float32 constant once: not the model's arithmetic
        with Record():
            module(x)
    return seen


def test_availability_says_what_runs_here() -> None:
    availability = get_target("coreml").availability()
    assert availability.can_build
    if not ON_MAC:
        assert not availability.can_run and availability.can_emulate
        assert "macOS" in availability.reason


@pytest.mark.parametrize("name", ["t2t_vit_7", "mobilenet_v2"])
def test_fp16_converts(name: str, build: Callable[..., Artifact]) -> None:
    # MobileNet goes through the ImageType input, T2T-ViT through the default tensor input.
    artifact = build(name, "fp16", "image" if name == "mobilenet_v2" else "tensor")
    facts = artifact.manifest["build"]
    package = artifact.file(PACKAGE)
    assert package.is_dir() and (package / "Manifest.json").is_file()
    # The store lists plain top-level files; the package directory is covered by the facts instead.
    assert EMULATION_FILE in artifact.manifest["files"] and PACKAGE not in artifact.manifest["files"]
    on_disk = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    assert facts["package_bytes"] == on_disk and len(facts["package_sha256"]) == 64
    assert facts["compute_precision"] == "float16" and facts["minimum_deployment_target"] == "iOS17"
    assert facts["mil_ops"]["conv" if name == "mobilenet_v2" else "linear"] > 0
    assert facts["quantized_ops"] == {}
    assert facts["input"]["type"] == ("image" if name == "mobilenet_v2" else "tensor")
    assert facts["fp16_range"]["images"] == 8 and facts["fp16_range"]["outside_fp16"] == []


def test_fp16_t2t_vit_package_computes_nothing_in_fp32(build: Callable[..., Artifact], images, models) -> None:
    # The Neural Engine has no FP32: the FP16-safe Performer lets the whole package, its kernel math
    # included, convert to fp16 (no fp32 islands). The only fp32 ops are the casts of input and output.
    facts = build("t2t_vit_7", "fp16").manifest["build"]
    by_dtype = facts["mil_ops_by_dtype"]
    assert facts["fp32_compute_ops"] == 0
    assert by_dtype["cast"] == {"fp16": 1, "fp32": 1}
    for op in ("exp", "real_div", "matmul", "linear", "layer_norm", "softmax", "conv"):
        assert by_dtype[op] == {"fp16": facts["mil_ops"][op]}, op
    assert facts["soft_split"] == "unfold" and by_dtype["conv"] == {"fp16": 3}  # nn.Unfold as one-hot convs
    runner = get_target("coreml").load(build("t2t_vit_7", "fp16"))
    held_out = images[0][HELD_OUT]
    reference = _torch_logits(models["t2t_vit_7"], held_out)
    logits = runner(held_out)
    assert runner.label == "emulated" and "float16" in runner.emulation
    assert _cosine(logits, reference).min() > 0.999
    assert not np.allclose(logits, reference, rtol=0, atol=1e-7)  # it really is half precision


def test_fp32_compute_ops_count_an_fp32_package(build: Callable[..., Artifact]) -> None:
    # the counter the fp16 test reads as 0 does count: an fp32 package computes everything in fp32
    facts = build("mobilenet_v2", "fp32").manifest["build"]
    assert facts["mil_ops_by_dtype"]["conv"] == {"fp32": facts["mil_ops"]["conv"]}
    assert facts["fp32_compute_ops"] >= facts["mil_ops"]["conv"] + facts["mil_ops"]["linear"]
    assert "fp16_range" not in facts  # fp32 packages run where fp32 exists: nothing to check


def test_range_check_stops_an_overflowing_build(models, images, tmp_path: Path) -> None:
    model = copy.deepcopy(models["t2t_vit_7"])
    with torch.no_grad():
        model.tokens_to_token.attention1.kqv.weight.mul_(1e4)  # k*k / 2 then reaches ~1e9
    inputs = _bare_inputs(model, {}, calibration=images[0][CALIBRATION])
    with pytest.raises(T2tedgeError) as caught:
        get_target("coreml").build(inputs, "fp16", tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    # the first op past 65504 is the Performer's own arithmetic on k, not a layer inside it
    assert re.search(r"ATen op \d{5}:\w+\.\w+ \(in module tokens_to_token\.attention1\) leaves FP16's range", message)
    assert "(max |value| inf" in message and "Neural Engine computes in FP16" in message
    assert not any(tmp_path.iterdir())  # stopped before converting anything


def test_fp32_emulation_matches_torch(build: Callable[..., Artifact], images, models) -> None:
    target = get_target("coreml")
    artifact = build("mobilenet_v2", "fp32")
    held_out, labels = images[0][HELD_OUT], images[1][HELD_OUT]
    reference = _torch_logits(models["mobilenet_v2"], held_out)
    logits = target.load(artifact)(held_out)
    assert np.abs(logits - reference).max() <= 1e-5 * (1 + np.abs(reference).max())
    if not ON_MAC:
        report = run_validation(target, artifact, held_out, labels, reference)
        assert report["label"] == "emulated" and report["note"].startswith("torch fp32")
        assert report["vs_fp32_torch"]["top1_agreement"] == 100.0


def test_int8_weights_package_is_a_third_of_fp32(build: Callable[..., Artifact], images, models) -> None:
    fp32 = build("mobilenet_v2", "fp32").manifest["build"]
    artifact = build("mobilenet_v2", "int8-weights")
    int8 = artifact.manifest["build"]
    assert int8["quantized_ops"]["constexpr_affine_dequantize"] >= 40
    assert int8["package_bytes"] <= 0.35 * fp32["package_bytes"]
    # The emulation's weights are the package's int8 weights, up to one rounding step.
    assert int8["emulation_weight_check"]["tensors_compared"] >= 1
    assert int8["emulation_weight_check"]["max_error_in_steps"] <= 1.1
    held_out = images[0][HELD_OUT]
    logits = get_target("coreml").load(artifact)(held_out)
    assert _cosine(logits, _torch_logits(models["mobilenet_v2"], held_out)).min() > 0.99


def test_w8a8_program_quantizes_activations(build: Callable[..., Artifact], images, models) -> None:
    artifact = build("t2t_vit_7-depth2", "w8a8", float_modules=PERFORMER_FLOAT)
    facts = artifact.manifest["build"]
    ops = facts["quantized_ops"]
    assert ops["quantize"] > 30 and ops["dequantize"] > 30 and ops["constexpr_affine_dequantize"] > 15
    quantization = facts["quantization"]
    assert quantization["calibration_images"] == 8
    assert quantization["float_modules"] == ["tokens_to_token.attention1", "tokens_to_token.attention2"]
    # the Neural Engine's int8 path: every activation quantize op outputs signed int8
    assert quantization["activation_dtypes"] == facts["mil_ops_by_dtype"]["quantize"] == {"int8": ops["quantize"]}
    assert facts["fp32_compute_ops"] == 0 and facts["fp16_range"]["outside_fp16"] == []
    runner = get_target("coreml").load(artifact)
    held_out = images[0][HELD_OUT]
    logits = runner(held_out)
    reference = _torch_logits(models["t2t_vit_7-depth2"], held_out)
    assert runner.label == "emulated" and runner.emulation.startswith("torch fake-quant (w8a8) in float16")
    assert np.isfinite(logits).all()
    assert _cosine(logits, reference).min() > 0.98
    assert not np.allclose(logits, reference, rtol=0, atol=1e-6)  # the fake-quant really quantizes


def test_w8a8_of_the_demo_t2t_vit_needs_float_modules(tmp_path: Path) -> None:
    # Without float_modules the quantizer puts 8-bit activations into the Performer's kernel math: on the
    # trained demo model the outputs are no longer finite (10.5 % top-1 on 1000 test images, fp32
    # fake-quant), so the build stops with one line saying what to set.
    loaded = load_model(get_spec("t2t_vit_7"), demo_checkpoint("t2t_vit_7"))
    calibration = preprocess(open_dataset("fashion_mnist:train"), np.arange(8), loaded.preprocess, "calibration")
    size = loaded.image_size
    inputs = BuildInputs(Path("unused.onnx"), size, 10, "t2t_vit", {}, calibration, torch_model=loaded.model)
    with pytest.raises(T2tedgeError, match=r"outputs are not finite .* coreml\.float_modules$") as caught:
        get_target("coreml").build(inputs, "w8a8", tmp_path / "bare")
    assert "\n" not in str(caught.value)
    # the model's own hint (ModelSpec.quantization, as the Builder passes it) keeps that math float
    inputs.hints = get_spec("t2t_vit_7").quantization
    (tmp_path / "hinted").mkdir()
    facts = get_target("coreml").build(inputs, "w8a8", tmp_path / "hinted")
    assert facts["quantization"]["float_module_patterns"] == ["tokens_to_token.attention?"]
    assert facts["quantization"]["float_modules"] == ["tokens_to_token.attention1", "tokens_to_token.attention2"]


def test_w8a8_emulation_computes_in_float16(build: Callable[..., Artifact], images) -> None:
    # between its quantize/dequantize ops the package computes in FP16, and so does its emulation
    artifact = build("t2t_vit_7-depth2", "w8a8", float_modules=PERFORMER_FLOAT)
    program = torch.export.load(str(artifact.file(EMULATION_FILE)))
    assert _float_dtypes(program, images[0][HELD_OUT][:4]) == {torch.float16}


def test_w8a8_non_negative_activations_are_int8_too(build: Callable[..., Artifact], images, models) -> None:
    # coremltools gives ReLU outputs uint8 (zero point 0) and hard-sigmoid outputs a fixed uint8 range;
    # the Neural Engine's int8 path takes int8, and so does every quantize op of the package
    artifact = build("mobilenet_v3_small", "w8a8")
    facts = artifact.manifest["build"]
    quantize = facts["quantized_ops"]["quantize"]
    assert facts["mil_ops"]["relu"] > 0 and facts["mil_ops"]["sigmoid_hard"] > 0
    assert quantize > 40 and facts["mil_ops_by_dtype"]["quantize"] == {"int8": quantize}
    assert facts["fp32_compute_ops"] == 0
    held_out = images[0][HELD_OUT]
    logits = get_target("coreml").load(artifact)(held_out)
    assert _cosine(logits, _torch_logits(models["mobilenet_v3_small"], held_out)).min() > 0.95


def test_soft_split_gather_matches_unfold(build: Callable[..., Artifact], images, models) -> None:
    gather = build("t2t_vit_7", "fp16", soft_split="gather")
    facts = gather.manifest["build"]
    assert facts["soft_split"] == "gather" and facts["fp32_compute_ops"] == 0
    assert facts["mil_ops"]["gather"] == 3 and "conv" not in facts["mil_ops"]  # no one-hot convolutions
    held_out = images[0][HELD_OUT]
    target = get_target("coreml")
    from_gather, from_unfold = target.load(gather)(held_out), target.load(build("t2t_vit_7", "fp16"))(held_out)
    fp16_noise = np.abs(from_unfold - _torch_logits(models["t2t_vit_7"], held_out)).max()
    assert 0 < np.abs(from_gather - from_unfold).max() <= 2 * fp16_noise  # same function, FP16 rounding apart


def test_soft_split_gather_needs_an_export_form(models) -> None:
    # a model without export_form() converts its own forward, and the facts say so
    model = models["mobilenet_v2"]
    converted, facts = _model_form(model, "gather")
    assert converted is model and facts["soft_split"] == "unfold" and "export_form" in facts["soft_split_note"]
    exported, facts = _model_form(models["t2t_vit_7"], "gather")
    assert facts == {"soft_split": "gather"} and exported.tokens_to_token.row_splits is not None


def test_float_modules_keep_own_ops_float_and_inner_layers_int8(models) -> None:
    configs, floats = _float_module_configs(models["t2t_vit_7"], PERFORMER_FLOAT, "int8")
    assert floats == ["tokens_to_token.attention1", "tokens_to_token.attention2"]
    assert configs["tokens_to_token.attention1"] is None and configs["tokens_to_token.attention2"] is None
    assert configs["tokens_to_token.attention1.kqv"] == configs["tokens_to_token.attention2.mlp.0"] == "int8"
    assert not any(name.startswith(("blocks", "tokens_to_token.project")) for name in configs)
    assert _float_module_configs(models["t2t_vit_7"], [], "int8") == ({}, [])


def test_fixed_shapes_and_image_normalization_are_required(models, images) -> None:
    target = get_target("coreml")
    model = models["mobilenet_v2"]
    with pytest.raises(T2tedgeError, match="fixed shapes"):
        target.build(_bare_inputs(model, {"dynamic_batch": True}), "fp16", Path("unused"))
    with pytest.raises(T2tedgeError, match="mean/std"):
        target.build(_bare_inputs(model, {"input_type": "image"}), "fp16", Path("unused"))
    with pytest.raises(T2tedgeError, match="minimum_deployment_target"):
        target.build(_bare_inputs(model, {"minimum_deployment_target": "iOS99"}), "fp16", Path("unused"))
    with pytest.raises(T2tedgeError, match="soft_split must be 'unfold' or 'gather'"):
        target.build(_bare_inputs(model, {"soft_split": "fold"}), "fp16", Path("unused"))
    for precision in ("w8a8", "fp16", "int8-weights"):
        with pytest.raises(T2tedgeError, match="calibration images"):
            target.build(_bare_inputs(model, {}), precision, Path("unused"))


def test_macos_predict_matches_torch(build: Callable[..., Artifact], images, models) -> None:
    if not ON_MAC:
        pytest.skip("Core ML predict needs macOS (coremltools cannot load or run an .mlpackage on Linux)")
    runner = get_target("coreml").load(build("t2t_vit_7", "fp16"))
    held_out = images[0][HELD_OUT]
    logits = runner(held_out)
    assert runner.label == "measured"
    assert _cosine(logits, _torch_logits(models["t2t_vit_7"], held_out)).min() > 0.99
