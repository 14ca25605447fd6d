"""OpenVINO target on tiny 32 px models: FP32 parity, FP16 size, INT8 quantization, accuracy control."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from t2tedge.artifact import list_files
from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.models import get_spec
from t2tedge.models.conditioning import well_conditioned
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.export import export_onnx
from t2tedge.pipeline.recipe import QuantizationConfig
from t2tedge.pipeline.store import Artifact
from t2tedge.targets import BuildInputs, get_target

ov = pytest.importorskip("openvino", reason="openvino is not installed")
pytest.importorskip("nncf", reason="nncf is not installed")
from t2tedge.targets.openvino import MODEL_BIN, MODEL_XML, parse_accuracy_control_log  # noqa: E402

SIZE = 32
FAMILIES = {"t2t_vit_7": "t2t_vit", "mobilenet_v2": "mobilenet"}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """24 real Fashion-MNIST training images at 32 px: 16 to calibrate, 8 to compare outputs."""
    dataset = open_dataset("fashion_mnist:train")
    pre = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
    return preprocess(dataset, np.arange(24), pre, "test images")


@pytest.fixture(scope="module")
def onnx_models(images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        paths[name] = root / f"{name}.onnx"
        model = well_conditioned(get_spec(name).create(num_classes=10, image_size=SIZE), images[:16])
        export_onnx(model, SIZE, paths[name])
    return paths


@pytest.fixture(scope="module")
def build(onnx_models: dict[str, Path], images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Build (once per model/precision/config) and return (artifact, facts)."""
    cache: dict[str, tuple[Artifact, dict[str, Any]]] = {}

    def _build(name: str, precision: str, labels: np.ndarray | None = None, **quant: Any) -> tuple[Artifact, dict]:
        key = f"{name}-{precision}-{sorted(quant.items())}"
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{name}-{precision}")
            inputs = BuildInputs(
                onnx_path=onnx_models[name],
                image_size=SIZE,
                num_classes=10,
                hints=get_spec(name).quantization,
                calibration=images[:16] if precision == "int8" else None,
                heldout=images[16:] if labels is not None else None,
                heldout_labels=labels,
            )
            config = QuantizationConfig(**quant).for_target("openvino")
            facts = get_target("openvino").build(inputs, precision, config, out)
            manifest = {"precision": precision, "build": facts, "files": list_files(out)}
            (out / "manifest.json").write_text(json.dumps(manifest))
            cache[key] = (Artifact(out), facts)
        return cache[key]

    return _build


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_ir_matches_onnxruntime_at_f32(build: Any, onnx_models: dict[str, Path], images: np.ndarray) -> None:
    artifact, facts = build("t2t_vit_7", "fp32")
    runner = get_target("openvino").load(artifact, threads=2)
    assert facts["inference_precision_hint"] == facts["inference_precision_used"] == "f32"
    assert runner.runtime_facts["inference_precision_used"] == "f32" and runner.runtime_facts["threads"] == 2
    # a fixed-batch-1 IR still takes any batch
    logits = runner(images[16:19])
    reference = OnnxSession(onnx_models["t2t_vit_7"])(images[16:19])
    assert logits.shape == (3, 10)
    assert np.abs(logits - reference).max() <= 1e-4


def test_fp16_ir_halves_the_weights(build: Any) -> None:
    fp32, _ = build("t2t_vit_7", "fp32")
    fp16, facts = build("t2t_vit_7", "fp16")
    ratio = fp16.file(MODEL_BIN).stat().st_size / fp32.file(MODEL_BIN).stat().st_size
    assert 0.45 < ratio < 0.55
    assert facts["compress_to_fp16"] and facts["inference_precision_used"] in ("bf16", "f16", "f32")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_int8_ir_is_quantized_and_follows_fp32(name: str, build: Any, images: np.ndarray) -> None:
    fp32, _ = build(name, "fp32")
    int8, facts = build(name, "int8")
    xml = int8.file(MODEL_XML).read_text()
    assert facts["fake_quantize_ops"] > 0 and xml.count('type="FakeQuantize"') == facts["fake_quantize_ops"]
    assert facts["quantization"]["model_type"] == ("transformer" if name.startswith("t2t") else "default")
    target = get_target("openvino")
    held_out = images[16:]
    cosine = _cosine(target.load(int8)(held_out), target.load(fp32)(held_out))
    # measured: ~0.999 (T2T-ViT-7), ~0.985 (MobileNetV2); wrong ranges or a broken graph land far lower
    assert cosine.mean() > (0.99 if name.startswith("t2t") else 0.95), cosine


def test_t2t_int8_quantizes_exactly_the_linear_layers(build: Any) -> None:
    artifact, facts = build("t2t_vit_7", "int8")
    ignored = facts["quantization"]["ignored_automatically"]["names"]
    # two token layers x (two random-feature projections + three activation x activation MatMuls), and
    # each of the 7 blocks' attention (OpenVINO fuses q.k^T, softmax and attn.v into one op named after q.k^T)
    assert len(ignored) == 10 + 7
    assert facts["quantization"]["smooth_quant_alpha"] == "off"
    assert "nncf_smooth_quant" not in artifact.file(MODEL_XML).read_text()
    # one FakeQuantize per Linear input (weights are stored quantized): nothing else runs int8
    linears = sum(isinstance(m, torch.nn.Linear) for m in get_spec("t2t_vit_7").create(num_classes=10).modules())
    assert facts["fake_quantize_ops"] == linears == 38


def test_smooth_quant_alpha_turns_smooth_quant_on(build: Any) -> None:
    artifact, facts = build("t2t_vit_7", "int8", openvino={"smooth_quant_alpha": 0.95})
    assert facts["quantization"]["smooth_quant_alpha"] == 0.95
    assert "nncf_smooth_quant" in artifact.file(MODEL_XML).read_text()
    assert facts["fake_quantize_ops"] == 38  # SmoothQuant adds scales, not quantizers


def test_accuracy_control_writes_sensitivity(build: Any, images: np.ndarray) -> None:
    # Labels = the FP32 model's own predictions, so FP32 scores 100% and any INT8 flip is a drop.
    fp32, _ = build("t2t_vit_7", "fp32")
    labels = get_target("openvino").load(fp32)(images[16:]).argmax(1)
    artifact, facts = build("t2t_vit_7", "int8", labels=labels, max_accuracy_drop=0.01)
    sensitivity = json.loads(artifact.file("sensitivity.json").read_text())
    assert sensitivity["fp32_top1"] == pytest.approx(100.0)
    assert sensitivity["achieved_drop_points"] == pytest.approx(100.0 - sensitivity["int8_top1"])
    assert sensitivity["images"] == 8 and isinstance(sensitivity["steps"], list)
    assert artifact.file("sensitivity.md").read_text().startswith("# INT8 accuracy control")
    assert facts["quantization"]["accuracy_control"]["max_drop_points"] == 0.01
    # The budget is honoured, measured independently: the INT8 artifact, run on the same images, keeps every
    # FP32 prediction (0.01 points on 8 images allows no flip), and the recorded drop is the one it has.
    achieved_top1 = 100.0 * float((get_target("openvino").load(artifact)(images[16:]).argmax(1) == labels).mean())
    assert 100.0 - achieved_top1 <= 0.01
    assert sensitivity["achieved_drop_points"] == pytest.approx(100.0 - achieved_top1)


def test_accuracy_control_log_is_read_per_step() -> None:
    # The messages NNCF logs while it reverts groups of operations; step 2 made things worse and was undone.
    messages = [
        "Accuracy drop: 0.05 (DropType.ABSOLUTE)",
        "Reverted 1 operations to the floating-point precision: \n\tnode_a",
        "Accuracy drop with the new quantization scope is 0.03 (DropType.ABSOLUTE)",
        "Reverted 1 operations to the floating-point precision: \n\tnode_x",
        "Accuracy drop with the new quantization scope is 0.04 (DropType.ABSOLUTE)",
        "Re-calculating ranking scores for remaining groups",
        "Reverted 2 operations to the floating-point precision: \n\tnode_b\n\tnode_c",
        "Algorithm completed: achieved required accuracy drop 0.005 (DropType.ABSOLUTE)",
        "3 out of 40 were reverted back to the floating-point precision:\n\tnode_a\n\tnode_b\n\tnode_c",
    ]
    parsed = parse_accuracy_control_log(messages)
    assert parsed["initial_drop"] == 0.05 and not parsed["all_layers_checked"]
    assert parsed["reverted_operations"] == ["node_a", "node_b", "node_c"]
    first, undone, last = parsed["steps"]
    assert first["kept"] and first["recovered_points"] == pytest.approx(2.0)
    assert not undone["kept"] and undone["recovered_points"] == pytest.approx(-1.0)
    assert last["kept"] and last["reverted"] == ["node_b", "node_c"]
    assert last["drop_after_points"] == pytest.approx(0.5) and last["recovered_points"] == pytest.approx(2.5)


def test_unavailable_without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    availability = get_target("openvino").availability()
    assert not availability.can_build and not availability.can_run
    assert "pip install openvino" in availability.reason


def test_accuracy_control_scores_on_the_heldout_split(
    build: Any, onnx_models: dict[str, Path], images: np.ndarray, tmp_path: Path
) -> None:
    from t2tedge.errors import T2tedgeError

    fp32, _ = build("mobilenet_v2", "fp32")
    heldout = images[16:]
    labels = get_target("openvino").load(fp32)(heldout).argmax(1)
    config = QuantizationConfig(max_accuracy_drop=50.0).for_target("openvino")

    def inputs(**extra: Any) -> BuildInputs:
        return BuildInputs(onnx_models["mobilenet_v2"], SIZE, 10, calibration=images[:16], **extra)

    facts = get_target("openvino").build(inputs(heldout=heldout, heldout_labels=labels), "int8", config, tmp_path)
    control = facts["quantization"]["accuracy_control"]
    assert control["tuned_on"] == "calibration.heldout" and control["images"] == len(heldout)
    (tmp_path / "again").mkdir()
    with pytest.raises(T2tedgeError, match=r"calibration\.heldout > 0"):
        get_target("openvino").build(inputs(heldout=heldout), "int8", config, tmp_path / "again")
