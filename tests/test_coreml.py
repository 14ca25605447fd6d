"""Core ML target: conversion of tiny models at 32 px, quantized programs, and the torch emulation on Linux."""

from __future__ import annotations

import copy
import platform
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
from t2tedge.models import get_spec  # noqa: E402
from t2tedge.models.spec import Preprocess  # noqa: E402
from t2tedge.pipeline.store import Artifact, ArtifactStore  # noqa: E402
from t2tedge.pipeline.validate import run_validation  # noqa: E402
from t2tedge.targets import BuildInputs, get_target  # noqa: E402
from t2tedge.targets.coreml import EMULATION_FILE, PACKAGE, _float16_emulation, _fp32_scopes  # noqa: E402

SIZE = 32
PRE = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
CALIBRATION, HELD_OUT = slice(0, 8), slice(8, 24)
ON_MAC = platform.system() == "Darwin"


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
    # Trained T2T-ViTs drive the Performer's exp features past fp16's range; larger token projections
    # make random weights do the same, so the fp16 tests see the overflow the package must avoid.
    with torch.no_grad():
        t2t.tokens_to_token.attention1.kqv.weight.mul_(4)
    # W8A8 calibration and conversion are the slow part: the T2T module with its Performers plus two blocks.
    t2t_depth2 = get_spec("t2t_vit_7").create(num_classes=10, image_size=SIZE, depth=2)
    mobilenet = get_spec("mobilenet_v2").create(num_classes=10, image_size=SIZE)
    # Random MobileNet weights with untouched batch-norm statistics give logits near 1e-10; one pass in
    # train mode sets the statistics so the logits have a scale the comparisons can see.
    mobilenet.train()
    with torch.no_grad():
        mobilenet(torch.from_numpy(images[0]))
    return {"t2t_vit_7": t2t, "t2t_vit_7-depth2": t2t_depth2, "mobilenet_v2": mobilenet.eval()}


@pytest.fixture(scope="module")
def build(
    tmp_path_factory: pytest.TempPathFactory, images: tuple[np.ndarray, np.ndarray], models: dict[str, torch.nn.Module]
) -> Callable[..., Artifact]:
    """Build (once per module) a model x precision through the artifact store, as the Builder does."""
    store = ArtifactStore(tmp_path_factory.mktemp("coreml"))
    built: dict[tuple[str, str, str], Artifact] = {}

    def get(name: str, precision: str, input_type: str = "tensor") -> Artifact:
        key = (name, precision, input_type)
        if key not in built:
            config: dict[str, Any] = {"input_type": input_type, "preprocess": PRE.to_dict()}
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


def _bare_inputs(model: torch.nn.Module, config: dict[str, Any]) -> BuildInputs:
    return BuildInputs(Path("unused.onnx"), SIZE, 10, "mobilenet", config, torch_model=model)


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


def test_fp16_keeps_performer_math_fp32(build: Callable[..., Artifact], images, models) -> None:
    artifact = build("t2t_vit_7", "fp16")
    scopes = artifact.manifest["build"]["fp32_scopes"]
    assert scopes["modules"] == ["tokens_to_token.attention1", "tokens_to_token.attention2"] and scopes["ops"] > 20
    runner = get_target("coreml").load(artifact)
    held_out = images[0][HELD_OUT]
    reference = _torch_logits(models["t2t_vit_7"], held_out)
    with torch.no_grad():
        all_half = copy.deepcopy(models["t2t_vit_7"]).half()(torch.from_numpy(held_out).half())
    assert not torch.isfinite(all_half).all()  # overflow (and eps flushed to 0): what the fp32 scopes avoid
    logits = runner(held_out)
    assert runner.label == "emulated" and "float16" in runner.emulation
    assert _cosine(logits, reference).min() > 0.999
    assert not np.allclose(logits, reference, rtol=0, atol=1e-7)  # it really is half precision


def test_fp32_scopes_keep_their_exact_tensors(models) -> None:
    # A round trip through float16 would turn the Performer's 1e-8 normalizer guard into 0.
    model = models["t2t_vit_7"]
    scopes = _fp32_scopes(model)
    mixed = _float16_emulation(copy.deepcopy(model), scopes)
    assert mixed.blocks[0].attn.qkv.weight.dtype == torch.float16
    for scope in scopes:
        original, kept = model.get_submodule(scope), mixed.get_submodule(scope)
        assert kept.kqv.weight.dtype == torch.float16
        for name, tensor in [*original.named_parameters(recurse=False), *original.named_buffers(recurse=False)]:
            assert torch.equal(getattr(kept, name), tensor), name


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
    artifact = build("t2t_vit_7-depth2", "w8a8")
    facts = artifact.manifest["build"]
    ops = facts["quantized_ops"]
    assert ops["quantize"] > 30 and ops["dequantize"] > 30 and ops["constexpr_affine_dequantize"] > 15
    assert facts["quantization"]["calibration_images"] == 8
    assert facts["quantization"]["float_scopes"] == ["tokens_to_token.attention1", "tokens_to_token.attention2"]
    assert facts["fp32_scopes"]["ops"] > 20  # and that float math is fp32, not fp16
    runner = get_target("coreml").load(artifact)
    held_out = images[0][HELD_OUT]
    logits = runner(held_out)
    reference = _torch_logits(models["t2t_vit_7-depth2"], held_out)
    assert runner.label == "emulated" and runner.emulation.startswith("torch fake-quant (w8a8)")
    assert np.isfinite(logits).all()
    assert _cosine(logits, reference).min() > 0.98
    assert not np.allclose(logits, reference, rtol=0, atol=1e-6)  # the fake-quant really quantizes


def test_fixed_shapes_and_image_normalization_are_required(models) -> None:
    target = get_target("coreml")
    model = models["mobilenet_v2"]
    with pytest.raises(T2tedgeError, match="fixed shapes"):
        target.build(_bare_inputs(model, {"dynamic_batch": True}), "fp16", Path("unused"))
    with pytest.raises(T2tedgeError, match="mean/std"):
        target.build(_bare_inputs(model, {"input_type": "image"}), "fp16", Path("unused"))
    with pytest.raises(T2tedgeError, match="minimum_deployment_target"):
        target.build(_bare_inputs(model, {"minimum_deployment_target": "iOS99"}), "fp16", Path("unused"))
    with pytest.raises(T2tedgeError, match="calibration"):
        target.build(_bare_inputs(model, {}), "w8a8", Path("unused"))


def test_macos_predict_matches_torch(build: Callable[..., Artifact], images, models) -> None:
    if not ON_MAC:
        pytest.skip("Core ML predict needs macOS (coremltools cannot load or run an .mlpackage on Linux)")
    runner = get_target("coreml").load(build("t2t_vit_7", "fp16"))
    held_out = images[0][HELD_OUT]
    logits = runner(held_out)
    assert runner.label == "measured"
    assert _cosine(logits, _torch_logits(models["t2t_vit_7"], held_out)).min() > 0.99
