"""Core ML target: conversion of tiny models at 32 px, quantized programs, and the torch emulation on Linux."""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import inspect
import json
import pickle
import platform
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from pydantic import ValidationError  # noqa: E402

from t2tedge.artifact import Artifact, sha256_file  # noqa: E402
from t2tedge.data.cache import preprocess  # noqa: E402
from t2tedge.data.datasets import open_dataset  # noqa: E402
from t2tedge.errors import ArtifactError, T2tedgeError, UnknownModelError  # noqa: E402
from t2tedge.models import demo_checkpoint, get_spec, load_model  # noqa: E402
from t2tedge.models.spec import Preprocess, register  # noqa: E402
from t2tedge.pipeline.store import ArtifactStore  # noqa: E402
from t2tedge.pipeline.validate import run_validation  # noqa: E402
from t2tedge.targets import BuildInputs, coreml, get_target  # noqa: E402
from t2tedge.targets.base import DeviceRunner, loader_source  # noqa: E402
from t2tedge.targets.coreml import (  # noqa: E402
    EMULATION_RECIPE,
    EMULATION_TENSORS,
    PACKAGE,
    CoreMLConfig,
    _float_module_configs,
    _model_form,
    device_load,
    reference_images,
)

SIZE = 32
PRE = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
CALIBRATION, HELD_OUT = slice(0, 8), slice(8, 24)
ON_MAC = platform.system() == "Darwin"
# The Performer's kernel math (exp, normalizer, division) breaks with 8-bit activations: w8a8 keeps it float.
PERFORMER_FLOAT = ["tokens_to_token.attention?"]
# W8A8 calibration and conversion are the slow part: the T2T module with its Performers plus two blocks.
# A spec of its own, so that the emulation's load rebuilds the same architecture from the manifest's model.
DEPTH2 = "t2t_vit_7-depth2"


def _depth2_spec() -> None:
    try:
        get_spec(DEPTH2)
    except UnknownModelError:
        base = get_spec("t2t_vit_7")
        register(dataclasses.replace(base, name=DEPTH2, build_kwargs={**base.build_kwargs, "depth": 2}))


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
    _depth2_spec()
    built = {"t2t_vit_7": t2t, DEPTH2: get_spec(DEPTH2).create(num_classes=10, image_size=SIZE)}
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
            model = models[name]
            inputs = BuildInputs(
                onnx_path=Path("unused.onnx"),
                image_size=SIZE,
                num_classes=10,
                calibration=images[0][CALIBRATION],
                torch_model=model,
                # as the Builder passes it: the model's graph form where it has one (soft splits as gathers)
                export_form=model.export_form() if hasattr(model, "export_form") else None,
                preprocess=PRE.to_dict(),
            )
            config = CoreMLConfig(input_type=input_type, **settings)
            with store.build(name, "coreml", precision, {"key": list(key)}) as job:
                job.manifest["build"] = get_target("coreml").build(inputs, precision, config, job.dir)
            built[key] = job.artifact
        return built[key]

    return get


def _torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _bare_inputs(model: torch.nn.Module, calibration: np.ndarray | None = None) -> BuildInputs:
    return BuildInputs(Path("unused.onnx"), SIZE, 10, calibration=calibration, torch_model=model)


def _sha256(logits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(logits, dtype=np.float32).tobytes()).hexdigest()


def _float_dtypes(module: torch.nn.Module, images: np.ndarray) -> set[torch.dtype]:
    """The dtypes of every floating-point ATen result while the module runs on the images."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    seen: set[torch.dtype] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            seen.update(v.dtype for v in tree_flatten(out)[0] if torch.is_tensor(v) and v.is_floating_point())
            return out

    x = torch.from_numpy(images).half()
    with torch.no_grad():
        module(x)  # a first call may set up constants once: not the model's arithmetic
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
    # The manifest lists every file, those inside the package too (what load() verifies); the facts
    # also hash the package as a whole.
    files = artifact.manifest["files"]
    assert {EMULATION_TENSORS, EMULATION_RECIPE, f"{PACKAGE}/Manifest.json"} <= set(files)
    assert {name for name in files if name.startswith(f"{PACKAGE}/")} == {
        p.relative_to(artifact.path).as_posix() for p in package.rglob("*") if p.is_file()
    }
    assert not any(name.endswith((".pt2", ".pt", ".pth", ".pkl")) for name in files)  # nothing to unpickle
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
    inputs = _bare_inputs(model, calibration=images[0][CALIBRATION])
    with pytest.raises(T2tedgeError) as caught:
        get_target("coreml").build(inputs, "fp16", CoreMLConfig(), tmp_path)
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
    artifact = build(DEPTH2, "w8a8", float_modules=PERFORMER_FLOAT)
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
    reference = _torch_logits(models[DEPTH2], held_out)
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
    inputs = BuildInputs(Path("unused.onnx"), size, 10, calibration=calibration, torch_model=loaded.model)
    with pytest.raises(T2tedgeError, match=r"outputs are not finite .* coreml\.float_modules$") as caught:
        get_target("coreml").build(inputs, "w8a8", CoreMLConfig(), tmp_path / "bare")
    assert "\n" not in str(caught.value)
    # the model's own hint (ModelSpec.quantization, as the Builder passes it) keeps that math float
    inputs.hints = get_spec("t2t_vit_7").quantization
    (tmp_path / "hinted").mkdir()
    facts = get_target("coreml").build(inputs, "w8a8", CoreMLConfig(), tmp_path / "hinted")
    assert facts["quantization"]["float_module_patterns"] == ["tokens_to_token.attention?"]
    assert facts["quantization"]["float_modules"] == ["tokens_to_token.attention1", "tokens_to_token.attention2"]


def test_w8a8_emulation_computes_in_float16(build: Callable[..., Artifact], images) -> None:
    # between its quantize/dequantize ops the package computes in FP16, and so does its emulation
    artifact = build(DEPTH2, "w8a8", float_modules=PERFORMER_FLOAT)
    module = coreml.rebuild_emulation(artifact)
    assert _float_dtypes(module, images[0][HELD_OUT][:4]) == {torch.float16}


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
    # a model without an export form (BuildInputs.export_form None) converts its own forward, and the facts say so
    model = models["mobilenet_v2"]
    converted, facts = _model_form(model, None, "gather")
    assert converted is model and facts["soft_split"] == "unfold" and "export_form" in facts["soft_split_note"]
    t2t = models["t2t_vit_7"]
    exported, facts = _model_form(t2t, t2t.export_form(), "gather")
    assert facts == {"soft_split": "gather"} and exported.tokens_to_token.row_splits is not None
    assert _model_form(t2t, t2t.export_form(), "unfold") == (t2t, {"soft_split": "unfold"})


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
    assert target.Config is CoreMLConfig
    # fixed shapes (1x3xSxS): the schema has no dynamic-shape keys, and refuses unknown values
    for bad in ({"dynamic_batch": True}, {"flexible_shapes": True}, {"soft_split": "fold"}, {"compute_units": "NPU"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            CoreMLConfig(**bad)
    with pytest.raises(T2tedgeError, match="mean/std"):
        target.build(_bare_inputs(model), "fp16", CoreMLConfig(input_type="image"), Path("unused"))
    with pytest.raises(T2tedgeError, match="minimum_deployment_target"):
        target.build(_bare_inputs(model), "fp16", CoreMLConfig(minimum_deployment_target="iOS99"), Path("unused"))
    with pytest.raises(T2tedgeError, match="w8a8 needs minimum_deployment_target iOS17"):
        target.build(_bare_inputs(model), "w8a8", CoreMLConfig(minimum_deployment_target="iOS16"), Path("unused"))
    for precision in ("w8a8", "fp16", "int8-weights"):
        with pytest.raises(T2tedgeError, match="calibration images"):
            target.build(_bare_inputs(model), precision, CoreMLConfig(), Path("unused"))


def test_macos_predict_matches_torch(build: Callable[..., Artifact], images, models) -> None:
    if not ON_MAC:
        pytest.skip("Core ML predict needs macOS (coremltools cannot load or run an .mlpackage on Linux)")
    runner = get_target("coreml").load(build("t2t_vit_7", "fp16"))
    held_out = images[0][HELD_OUT]
    logits = runner(held_out)
    assert runner.label == "measured"
    assert _cosine(logits, _torch_logits(models["t2t_vit_7"], held_out)).min() > 0.99


# ---- the emulation on disk: plain tensors, rebuilt from code, verified before it is read -------------------

# (model, precision, settings) of the module's builds: every precision and both soft splits
EMULATED_BUILDS = [
    ("mobilenet_v2", "fp32", {}),
    ("t2t_vit_7", "fp16", {}),
    ("t2t_vit_7", "fp16", {"soft_split": "gather"}),
    ("mobilenet_v2", "int8-weights", {}),
    (DEPTH2, "w8a8", {"float_modules": PERFORMER_FLOAT}),
    ("mobilenet_v3_small", "w8a8", {}),
]


def _emulation_only() -> None:
    if ON_MAC:
        pytest.skip("on macOS load() runs Core ML itself, not the emulation")


@pytest.mark.parametrize(("name", "precision", "settings"), EMULATED_BUILDS)
def test_rebuilt_emulation_is_the_build_time_emulation_bit_for_bit(
    build: Callable[..., Artifact], images, name: str, precision: str, settings: dict[str, Any]
) -> None:
    _emulation_only()
    artifact = build(name, precision, **settings)
    facts = artifact.manifest["build"]
    recipe = json.loads(artifact.file(EMULATION_RECIPE).read_text())
    assert recipe["precision"] == precision and recipe["soft_split"] == facts["soft_split"]
    assert recipe["num_classes"] == 10 and recipe["image_size"] == SIZE
    reference = facts["emulation_reference"]
    x = reference_images(images[0][CALIBRATION], SIZE)
    assert len(x) == reference["images"] == 2
    runner = get_target("coreml").load(artifact)
    # the rebuilt module's logits are those the build-time module gave, to the last bit
    assert _sha256(runner(x)) == reference["logits_sha256"]
    assert np.isfinite(runner(x)).all()
    # the runner contract, as plain attributes
    assert runner.label == "emulated" and runner.emulation == facts["emulation"] and runner.fixed_batch is None
    assert runner.runtime_facts["runtime"] == "torch" and runner.runtime_facts["version"] == torch.__version__
    assert runner.runtime_facts["dtype"] == ("float32" if precision == "fp32" else "float16")


@pytest.mark.parametrize(("name", "precision", "settings"), [EMULATED_BUILDS[2], EMULATED_BUILDS[4]])
def test_emulation_load_unpickles_nothing(
    build: Callable[..., Artifact], images, monkeypatch: pytest.MonkeyPatch, name, precision, settings
) -> None:
    _emulation_only()
    artifact = build(name, precision, **settings)
    expected = artifact.manifest["build"]["emulation_reference"]["logits_sha256"]

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a pickle-based loader was called on the artifact")

    for owner, attribute in [
        (pickle, "Unpickler"),
        (pickle, "load"),
        (pickle, "loads"),
        (torch, "load"),
        (torch.serialization, "load"),
        (torch.export, "load"),
        (torch.jit, "load"),
        (np, "load"),
    ]:
        monkeypatch.setattr(owner, attribute, refuse)
    runner = get_target("coreml").load(artifact)
    assert _sha256(runner(reference_images(images[0][CALIBRATION], SIZE))) == expected


def _copy(artifact: Artifact, tmp_path: Path) -> Artifact:
    copied = tmp_path / artifact.path.name
    shutil.copytree(artifact.path, copied)
    return Artifact(copied)


@pytest.mark.parametrize("tampered", [EMULATION_TENSORS, EMULATION_RECIPE, f"{PACKAGE}/Manifest.json"])
def test_a_tampered_file_is_refused_before_anything_is_loaded(
    build: Callable[..., Artifact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tampered: str
) -> None:
    artifact = _copy(build("t2t_vit_7", "fp16"), tmp_path)
    path = artifact.file(tampered)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    path.write_bytes(bytes(data))

    def never(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a file of the artifact was read before it was verified")

    monkeypatch.setattr(coreml, "rebuild_emulation", never)
    monkeypatch.setattr(coreml, "_read_recipe", never)
    monkeypatch.setattr(coreml, "CoreMLRunner", never)
    with pytest.raises(ArtifactError) as caught:
        get_target("coreml").load(artifact)
    message = str(caught.value)
    assert "\n" not in message and tampered in message and "changed since it was built" in message


def test_emulation_tensors_must_fit_the_rebuilt_module(build: Callable[..., Artifact], tmp_path: Path) -> None:
    # a tensor file that passes the hash check (manifest edited too) but not the strict load is refused
    from safetensors.torch import load_file, save_file

    _emulation_only()
    artifact = _copy(build("mobilenet_v2", "fp32"), tmp_path)
    tensors = load_file(artifact.file(EMULATION_TENSORS))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, artifact.file(EMULATION_TENSORS))
    manifest = artifact.manifest
    manifest["files"][EMULATION_TENSORS]["sha256"] = sha256_file(artifact.file(EMULATION_TENSORS))
    artifact.file("manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"does not fit the rebuilt emulation \(1 tensors missing") as caught:
        get_target("coreml").load(artifact)
    assert dropped in str(caught.value) and "\n" not in str(caught.value)


def test_device_loader_is_self_contained() -> None:
    # SSH devices exec the loader's source alone (Python 3.8, no t2tedge): it must need nothing around it
    capabilities = get_target("coreml").capabilities
    assert capabilities.device_loader is device_load and capabilities.device_runtime == "coremltools"
    assert capabilities.payload == ("*.mlpackage",) and capabilities.device_systems == ("Darwin",)
    assert loader_source(capabilities) == {"name": "device_load", "source": inspect.getsource(device_load)}
    source = inspect.getsource(device_load)
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported <= {"os", "platform", "numpy", "PIL"}  # coremltools: through kit.import_runtime
    namespace: dict[str, Any] = {}
    exec(compile(source, "device_load", "exec"), namespace)  # noqa: S102  (what the device does)

    class Unavailable(Exception):
        pass

    class Kit:
        pass

    Kit.Unavailable = Unavailable
    Kit.import_runtime = staticmethod(lambda module: pytest.fail(f"{module} imported on a system it cannot run"))
    if not ON_MAC:
        with pytest.raises(Unavailable, match="macOS"):
            namespace["device_load"](Kit, "unused", {"threads": None, "build": {}})


def test_macos_runner_is_the_device_loader(
    build: Callable[..., Artifact], images, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Off macOS Core ML cannot predict: a stand-in MLModel checks that load() there runs device_load
    # (the code SSH devices run), feeding the package's input (here an ImageType: 8-bit RGB).
    import coremltools

    opened: list[tuple[str, Any]] = []

    class MLModel:
        def __init__(self, path: str, compute_units: Any) -> None:
            opened.append((path, compute_units))

        def predict(self, feed: dict[str, Any]) -> dict[str, np.ndarray]:
            pixels = np.asarray(feed["images"], np.float32)  # a PIL image of the package's input size
            assert pixels.shape == (SIZE, SIZE, 3)
            return {"logits": np.full((1, 10), pixels.mean(), np.float32)}

    artifact = build("mobilenet_v2", "fp16", "image")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(coremltools.models, "MLModel", MLModel)
    runner = get_target("coreml").load(artifact)
    assert isinstance(runner, DeviceRunner) and runner.label == "measured" and runner.emulation is None
    assert runner.fixed_batch is None  # the package's batch is 1, but it predicts image by image
    assert runner.runtime_facts == {"runtime": "coreml", "version": coremltools.__version__, "compute_units": "ALL"}
    assert opened == [(str(artifact.file(PACKAGE)), coremltools.ComputeUnit.ALL)]
    logits = runner(images[0][HELD_OUT][:3])
    assert logits.shape == (3, 10) and logits.dtype == np.float32 and len(set(logits[:, 0])) == 3
