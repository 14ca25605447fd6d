"""TensorRT target: Q/DQ graph structure, the rule lint, the engine scripts and the emulated runner.

Tiny 32 px models and real Fashion-MNIST images. Engine tests run only where TensorRT and a CUDA GPU are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from t2tedge.artifact import list_files
from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.errors import T2tedgeError, TargetUnavailableError
from t2tedge.models import get_spec
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.export import export_onnx
from t2tedge.pipeline.store import Artifact
from t2tedge.targets import BuildInputs, get_target
from t2tedge.targets.tensorrt import (
    BUILD_SCRIPT,
    ENGINE_CACHE,
    ENGINE_FILE,
    TRTEXEC_SCRIPT,
    TensorRtConfig,
    build_engine,
    input_shape,
    tensorrt_status,
    trtexec_command,
    write_scripts,
)
from t2tedge.targets.tensorrt_lint import has_errors, lint

SIZE = 32
MODELS = ("t2t_vit_7", "mobilenet_v2")
TRT_OK, TRT_REASON = tensorrt_status()
needs_tensorrt = pytest.mark.skipif(not TRT_OK, reason="no TensorRT/GPU on this host")
# The target's own Config with its defaults, as QuantizationConfig().for_target("tensorrt") gives it.
CONFIG = TensorRtConfig()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """16 real Fashion-MNIST images at 32 px: the first 8 calibrate, the last 8 are held out."""
    dataset = open_dataset("fashion_mnist:train")
    pre = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
    return preprocess(dataset, np.arange(16), pre, "images")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> dict[str, tuple[Path, Path, dict]]:
    """Model name -> (fp32 ONNX, int8 artifact dir, build facts)."""
    target = get_target("tensorrt")
    result = {}
    for name in MODELS:
        root = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        fp32 = root / "export.onnx"
        export_onnx(get_spec(name).create(num_classes=10, image_size=SIZE), SIZE, fp32)
        out = root / "int8"
        out.mkdir()
        facts = target.build(BuildInputs(fp32, SIZE, 10, calibration=images[:8]), "int8", CONFIG, out)
        manifest = {"target": "tensorrt", "precision": "int8", "build": facts, "files": list_files(out)}
        (out / "manifest.json").write_text(json.dumps(manifest))
        result[name] = (fp32, out, facts)
    return result


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", MODELS)
def test_qdq_structure_is_what_tensorrt_wants(built: dict, name: str) -> None:
    _, out, facts = built[name]
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model)  # also: nodes topologically sorted
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def from_dq(tensor: str) -> onnx.NodeProto | None:
        node = producers.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:  # symmetric INT8 everywhere, no INT32 bias DQ
        zero = consts[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name
        if node.op_type == "QuantizeLinear":
            assert consts[node.input[1]].size == 1, f"{node.name}: activations are per tensor"
    weighted = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        has_weight = node.input[1] in consts or (from_dq(node.input[1]) and from_dq(node.input[1]).input[0] in consts)
        if node.op_type == "MatMul" and not has_weight:
            # attention / Performer products stay FP16 in TensorRT: no Q/DQ on either input
            assert not any(from_dq(i) for i in node.input), node.name
            continue
        weighted += 1
        assert from_dq(node.input[0]), f"{node.name}: activation input not quantized"
        dq = from_dq(node.input[1])
        assert dq is not None, f"{node.name}: weight not quantized"
        weight, scale = consts[dq.input[0]], consts[dq.input[1]]
        expected = {"Conv": 0, "MatMul": 1, "Gemm": 0 if _attrs(node).get("transB", 0) else 1}[node.op_type]
        assert _attrs(dq).get("axis", 1) == expected, node.name
        assert scale.size == weight.shape[expected] and weight.dtype == np.int8, node.name
        if len(node.input) > 2 and node.input[2]:
            assert not from_dq(node.input[2]), f"{node.name}: bias must stay float"
    assert weighted >= (30 if name == "t2t_vit_7" else 50)
    ops = {n.op_type for n in graph.node}
    for node in graph.node:
        if node.op_type in ("Softmax", "Add", "LayerNormalization"):
            assert not any(from_dq(i) for i in node.input), f"{node.op_type} {node.name} reads a DQ"
    if name == "t2t_vit_7":
        assert {"LayerNormalization", "Softmax"} <= ops
        assert "ReduceMean" not in ops  # LayerNorm kept as one op, not decomposed
    else:
        assert "Add" in ops  # residuals, float
    assert facts["lint"]["error"] == 0
    assert facts["settings"]["activation_type"] == "int8" and facts["settings"]["activation_symmetric"]
    assert facts["quantize_linear_nodes"] > 0 and facts["dequantize_linear_nodes"] > 0
    assert facts["engine"]["status"] == ("built" if TRT_OK else "unavailable: no TensorRT/GPU on this host")
    assert facts["trtexec"].startswith("trtexec --onnx=model.onnx --int8 --fp16")


@pytest.mark.parametrize("name", MODELS)
def test_lint_passes_on_built_graph(built: dict, name: str) -> None:
    findings = lint(built[name][1] / "model.onnx")
    assert not has_errors(findings), [f for f in findings if f.severity == "error"]
    assert not [f for f in findings if f.severity == "warning"]


def test_polygraphy_lint_passes(built: dict) -> None:
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent))
    if polygraphy is None:
        pytest.skip("polygraphy is not installed (pip install t2tedge[tensorrt])")
    result = subprocess.run(
        [polygraphy, "check", "lint", str(built["mobilenet_v2"][1] / "model.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- seeded violations -------------------------------------------------------------------------------


def _first(graph: onnx.GraphProto, op: str) -> onnx.NodeProto:
    return next(n for n in graph.node if n.op_type == op)


def _replace_initializer(graph: onnx.GraphProto, tensor: onnx.TensorProto) -> None:
    old = next(i for i in graph.initializer if i.name == tensor.name)
    graph.initializer.remove(old)
    graph.initializer.append(tensor)


def _weight_dq(graph: onnx.GraphProto, consumer_op: str) -> onnx.NodeProto:
    consumer = _first(graph, consumer_op)
    return next(n for n in graph.node if n.output[0] == consumer.input[1])


def _nonzero_zero_point(graph: onnx.GraphProto) -> str:
    q = _first(graph, "QuantizeLinear")
    _replace_initializer(graph, numpy_helper.from_array(np.array(5, np.int8), q.input[2]))
    return q.name


def _uint8_activation(graph: onnx.GraphProto) -> str:
    q = _first(graph, "QuantizeLinear")
    graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), "seeded_uint8_zero"))
    q.input[2] = "seeded_uint8_zero"
    return q.name


def _per_tensor_weight(graph: onnx.GraphProto) -> str:
    dq = _weight_dq(graph, "Conv")
    graph.initializer.append(numpy_helper.from_array(np.array(0.01, np.float32), "seeded_scalar_scale"))
    dq.input[1] = "seeded_scalar_scale"
    del dq.attribute[:]
    return dq.name


def _wrong_weight_axis(graph: onnx.GraphProto) -> str:
    dq = _weight_dq(graph, "Gemm")  # classifier: transB=1, output channels on axis 0
    del dq.attribute[:]
    dq.attribute.append(helper.make_attribute("axis", 1))
    return dq.name


def _qlinear_matmul(graph: onnx.GraphProto) -> str:
    q = _first(graph, "QuantizeLinear")
    a, scale, zero = q.output[0], q.input[1], q.input[2]
    node = helper.make_node(
        "QLinearMatMul", [a, scale, zero, a, scale, zero, scale, zero], ["seeded_out"], name="seeded_qlinear_matmul"
    )
    graph.node.append(node)
    return node.name


def _made_up_op(graph: onnx.GraphProto) -> str:
    graph.node.append(helper.make_node("FrobnicateLinear", [graph.input[0].name], ["seeded_out"], name="seeded_frob"))
    return "seeded_frob"


def _ort_contrib_op(graph: onnx.GraphProto) -> str:
    node = helper.make_node("QGemm", [graph.input[0].name], ["seeded_out"], name="seeded_qgemm", domain="com.microsoft")
    graph.node.append(node)
    return node.name


SEEDED = {
    "nonzero-zero-point": (_nonzero_zero_point, "qdq-zero-point"),
    "uint8-activation": (_uint8_activation, "qdq-type"),
    "per-tensor-weight": (_per_tensor_weight, "weight-per-channel"),
    "wrong-weight-axis": (_wrong_weight_axis, "weight-per-channel"),
    "qlinear-matmul": (_qlinear_matmul, "unsupported-op"),
    "made-up-op": (_made_up_op, "unsupported-op"),
    "ort-contrib-op": (_ort_contrib_op, "custom-op"),
}


@pytest.mark.parametrize("case", SEEDED)
def test_lint_fails_naming_the_node(built: dict, tmp_path: Path, case: str) -> None:
    seed, rule = SEEDED[case]
    model = onnx.load(built["mobilenet_v2"][1] / "model.onnx")
    node = seed(model.graph)
    path = tmp_path / "seeded.onnx"
    onnx.save(model, path)
    findings = lint(path)
    assert has_errors(findings)
    named = [f for f in findings if f.severity == "error" and f.node == node]
    assert named and named[0].rule == rule, findings[:3]
    if case == "uint8-activation":
        assert "network input/output" in named[0].message


def test_lint_rejects_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("not a protobuf at all\n")
    (finding,) = lint(path)
    assert finding.severity == "error" and finding.rule == "onnx-file" and "not an ONNX model" in finding.message
    assert lint(tmp_path / "missing.onnx")[0].rule == "onnx-file"


def test_cli_lint_exits_1_naming_the_node(built: dict, tmp_path: Path) -> None:
    model = onnx.load(built["mobilenet_v2"][1] / "model.onnx")
    node = _qlinear_matmul(model.graph)
    onnx.save(model, tmp_path / "bad.onnx")
    result = _cli("tensorrt-lint", str(tmp_path / "bad.onnx"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert node in result.stdout and "QLinearMatMul" in result.stdout


def test_build_fails_on_lint_error(built: dict, images: np.ndarray, tmp_path: Path) -> None:
    model = onnx.load(built["mobilenet_v2"][0])
    node = _made_up_op(model.graph)
    onnx.save(model, tmp_path / "bad.onnx")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(T2tedgeError, match=node):
        get_target("tensorrt").build(
            BuildInputs(tmp_path / "bad.onnx", SIZE, 10, calibration=images[:8]), "fp16", CONFIG, out
        )


# --- engine scripts ----------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "t2tedge.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _dry_run(artifact: Path, *flags: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(artifact / BUILD_SCRIPT), str(artifact), *flags, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_build_engine_script_runs_without_tensorrt(built: dict, tmp_path: Path) -> None:
    out = built["mobilenet_v2"][1]
    script = out / BUILD_SCRIPT
    py_compile.compile(str(script), cfile=str(tmp_path / "build_engine.pyc"), doraise=True)
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0, help_text.stderr
    for flag in ("--engine", "--timing-cache", "--workspace-mb", "--min-batch", "--opt-batch", "--max-batch"):
        assert flag in help_text.stdout
    plan = _dry_run(out, "--workspace-mb", "512", "--engine", str(tmp_path / "x.engine"))
    assert plan["onnx"] == str(out / "model.onnx") and plan["engine"] == str(tmp_path / "x.engine")
    assert plan["timing_cache"] == str(out / "timing.cache")
    assert plan["workspace_mb"] == 512 and plan["flags"] == ["INT8", "FP16"] and plan["profile"] is None
    assert plan["input"] == {"name": "input", "shape": [1, 3, SIZE, SIZE]}
    assert _dry_run(out, "--no-fp16")["flags"] == ["INT8"]
    if importlib.util.find_spec("tensorrt") is None:  # asked to build where it cannot: clear error, no engine
        args = [sys.executable, str(script), "--engine", str(tmp_path / "y.engine")]
        failed = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert failed.returncode == 2 and "tensorrt Python package is not installed" in failed.stderr
        assert not (tmp_path / "y.engine").exists()


def test_trtexec_commands_and_dynamic_batch(built: dict, tmp_path: Path) -> None:
    fp32, out, facts = built["mobilenet_v2"]
    static = facts["trtexec"]
    for flag in ("--onnx=model.onnx", "--int8", "--fp16", "--saveEngine=model.engine"):
        assert flag in static.split()
    assert "--timingCacheFile=timing.cache" in static and "--memPoolSize=workspace:1024M" in static
    assert "Shapes" not in static
    sh = (out / TRTEXEC_SCRIPT).read_text()
    assert static.removeprefix("trtexec ") in sh
    assert subprocess.run(["bash", "-n", str(out / TRTEXEC_SCRIPT)], timeout=30).returncode == 0
    assert "--int8" not in trtexec_command("fp16", input_shape(fp32)).split()

    model = onnx.load(out / "model.onnx")
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    dynamic = tmp_path / "model.onnx"
    onnx.save(model, dynamic)
    findings = lint(dynamic)
    assert not has_errors(findings)
    assert any(
        f.rule == "dynamic-shape" and f.node == "input" and "optimization profile" in f.message for f in findings
    )
    command = trtexec_command("int8", input_shape(dynamic))
    for flag in ("--minShapes=input:1x3x32x32", "--optShapes=input:1x3x32x32", "--maxShapes=input:32x3x32x32"):
        assert flag in command.split()
    write_scripts(tmp_path, "int8", input_shape(dynamic))
    assert _dry_run(tmp_path)["profile"] == [1, 1, 32]
    assert _dry_run(tmp_path, "--min-batch", "2", "--opt-batch", "4", "--max-batch", "8")["profile"] == [2, 4, 8]
    bad = subprocess.run(
        [sys.executable, str(tmp_path / BUILD_SCRIPT), "--min-batch", "9", "--max-batch", "8", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--min-batch" in bad.stderr


def test_fp16_artifact_is_the_plain_graph(built: dict, images: np.ndarray, tmp_path: Path) -> None:
    fp32 = built["mobilenet_v2"][0]
    facts = get_target("tensorrt").build(BuildInputs(fp32, SIZE, 10, calibration=images[:8]), "fp16", CONFIG, tmp_path)
    assert (tmp_path / "model.onnx").read_bytes() == fp32.read_bytes()
    assert facts["trtexec"].split()[:3] == ["trtexec", "--onnx=model.onnx", "--fp16"]
    assert _dry_run(tmp_path)["flags"] == ["FP16"]
    assert facts["fp16_range"]["images"] == 8 and facts["fp16_range"]["outside_fp16"] == []
    assert facts["fp32_layers"] == {"nodes": [], "tensors": []}


def test_fp16_build_needs_calibration_images(built: dict, tmp_path: Path) -> None:
    with pytest.raises(T2tedgeError, match="FP16 range check"):
        get_target("tensorrt").build(BuildInputs(built["mobilenet_v2"][0], SIZE, 10), "fp16", CONFIG, tmp_path)


# --- runners -----------------------------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_availability_and_emulated_runner(built: dict, images: np.ndarray) -> None:
    target = get_target("tensorrt")
    availability = target.availability()
    assert availability.can_build and availability.can_emulate
    assert availability.can_run == TRT_OK
    if not TRT_OK:
        assert "no TensorRT/GPU on this host" in availability.reason
    fp32, out, _ = built["t2t_vit_7"]
    held_out = images[8:]
    reference = OnnxSession(fp32)(held_out)
    runner = target.load(Artifact(out))
    if TRT_OK:
        assert getattr(runner, "label", "measured") == "measured"
        return
    assert runner.label == "emulated"
    assert runner.emulation.startswith("t2tedge FP16 graph emulator") and "FP16 storage" in runner.emulation
    logits = runner(held_out)
    assert logits.shape == reference.shape and np.isfinite(logits).all()
    assert _cosine(logits, reference).min() > 0.99
    # the input-dependent part too (random-init logits share a large per-class offset)
    offset = reference.mean(0)
    assert _cosine((logits - offset).ravel(), (reference - offset).ravel()) > 0.9


def test_accuracy_aware_budget_is_honoured(built: dict, images: np.ndarray, tmp_path: Path) -> None:
    fp32 = built["mobilenet_v2"][0]
    dataset = open_dataset("fashion_mnist:test")
    pre = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
    heldout = preprocess(dataset, np.arange(40), pre, "held-out images")
    # labels = the FP32 predictions: FP32 top-1 is 100 %, and on 40 images one flipped prediction costs
    # 2.5 points, so a 2-point budget allows none; all-INT8 flips some (checked), so the budget binds.
    labels = OnnxSession(fp32)(heldout).argmax(1)
    inputs = BuildInputs(fp32, SIZE, 10, calibration=images[:8], heldout=heldout, heldout_labels=labels)
    facts = get_target("tensorrt").build(inputs, "int8", TensorRtConfig(max_accuracy_drop=2.0), tmp_path)
    aware = facts["accuracy_aware"]
    assert aware["label"] == "emulated" and aware["fp32_top1"] == 100.0
    assert aware["int8_top1_all_quantized"] < 100.0 - 2.0
    # independently: the artifact's graph, run on the same images in the arithmetic the search judged
    # (onnxruntime's FP32 stand-in), stays within the budget
    achieved_top1 = 100.0 * float((OnnxSession(tmp_path / "model.onnx")(heldout).argmax(1) == labels).mean())
    assert 100.0 - achieved_top1 <= 2.0
    assert aware["met"] and aware["accuracy_drop"] == pytest.approx(100.0 - achieved_top1)
    assert facts["lint"]["error"] == 0


def test_engine_build_refused_without_tensorrt(built: dict) -> None:
    if TRT_OK:
        pytest.skip("TensorRT and a GPU are here: the refusal path does not apply")
    out = built["mobilenet_v2"][1]
    with pytest.raises(TargetUnavailableError, match="no TensorRT/GPU on this host"):
        build_engine(out)
    assert not (out / ENGINE_FILE).exists() and not (out.parent / ENGINE_CACHE).exists()
    result = _cli("tensorrt-engine", str(out))
    assert result.returncode == 2 and "no TensorRT/GPU on this host" in result.stderr
    assert not (out / ENGINE_FILE).exists()


@needs_tensorrt
@pytest.mark.parametrize("name", MODELS)
def test_engine_builds_and_matches_emulation(built: dict, images: np.ndarray, name: str) -> None:
    fp32, out, facts = built[name]
    assert facts["engine"]["status"] == "built" and (out / ENGINE_FILE).stat().st_size > 0
    assert build_engine(out) == out / ENGINE_FILE
    runner = get_target("tensorrt").load(Artifact(out))
    assert runner.label == "measured"
    logits = runner(images)
    emulated = OnnxSession(out / "model.onnx")(images)
    assert _cosine(logits, emulated).min() > 0.98


def test_uint8_graph_input_is_allowed(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Relu", ["x"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    findings = lint(tmp_path / "m.onnx")
    assert not has_errors(findings) and [f.rule for f in findings] == ["uint8-io"]


# --- FP16 range check ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> tuple[Path, dict]:
    """A tensorrt fp16 artifact of a tiny T2T-ViT whose classifier is scaled so its logits exceed 65504."""
    root = tmp_path_factory.mktemp("overflow")
    torch.manual_seed(0)
    model = get_spec("t2t_vit_7").create(num_classes=10, image_size=SIZE, depth=1)
    with torch.no_grad():
        model.head.weight.mul_(1e7)
    fp32 = root / "export.onnx"
    export_onnx(model, SIZE, fp32)
    out = root / "fp16"
    out.mkdir()
    facts = get_target("tensorrt").build(BuildInputs(fp32, SIZE, 10, calibration=images[:8]), "fp16", CONFIG, out)
    manifest = {
        "target": "tensorrt",
        "precision": "fp16",
        "build": facts,
        "model_io": {
            "family": "t2t_vit",
            "image_size": SIZE,
            "num_classes": 10,
            "classes": [],
            "preprocess": Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear").to_dict(),
        },
    }
    (out / "manifest.json").write_text(json.dumps({**manifest, "files": list_files(out)}))
    return out, facts


def test_range_check_pins_the_overflowing_layer_in_every_script(overflowing: tuple[Path, dict]) -> None:
    out, facts = overflowing
    outside = facts["fp16_range"]["outside_fp16"]
    assert [r["tensor"] for r in outside] == ["logits"] and outside[0]["max_abs"] > 65504
    gemm = outside[0]["node"]
    assert facts["fp32_layers"] == {"nodes": [gemm], "tensors": ["logits"]}
    assert f"--layerPrecisions={gemm}:fp32" in facts["trtexec"].split()
    assert "--precisionConstraints=obey" in (out / TRTEXEC_SCRIPT).read_text()
    plan = _dry_run(out)
    assert plan["fp32_tensors"] == ["logits"] and plan["flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert _dry_run(out, "--no-fp32-pins")["flags"] == ["FP16"]
    ranges = json.loads((out / "fp16_ranges.json").read_text())
    assert ranges["fp32_tensors"] == ["logits"] and ranges["tensors"]["logits"]["max_abs"] > 65504
    assert any(f["rule"] == "fp16-overflow" and f["severity"] == "info" for f in facts["lint"]["findings"])
    # the CLI reads the artifact's ranges by itself: clean while pinned, an error naming the node if not
    clean = _cli("tensorrt-lint", str(out / "model.onnx"))
    assert clean.returncode == 0 and "FP16 ranges from" in clean.stdout, clean.stdout + clean.stderr
    unpinned = {**ranges, "fp32_tensors": []}
    (out.parent / "unpinned.json").write_text(json.dumps(unpinned))
    broken = _cli("tensorrt-lint", str(out / "model.onnx"), "--ranges", str(out.parent / "unpinned.json"))
    assert broken.returncode == 1 and gemm in broken.stdout and "fp16-overflow" in broken.stdout


def test_pinned_emulation_is_finite_and_unpinned_validation_fails(
    overflowing: tuple[Path, dict], images: np.ndarray, tmp_path: Path
) -> None:
    from t2tedge.emulation import GraphEmulator
    from t2tedge.pipeline.validate import run_validation

    out, _ = overflowing
    target = get_target("tensorrt")
    labels = np.arange(8) % 10
    if TRT_OK:
        pytest.skip("a real engine runs here")
    pinned = run_validation(target, Artifact(out), images[8:], labels)
    assert pinned["label"] == "emulated" and "top1" in pinned and "pinned to FP32" in pinned["note"]
    # the same graph in FP16 without the pin: inf logits, which must be a failure, not a top-1
    assert not np.isfinite(GraphEmulator(out / "model.onnx")(images[8:])).all()
    unpinned = tmp_path / "unpinned"
    shutil.copytree(out, unpinned)
    manifest = json.loads((unpinned / "manifest.json").read_text())
    manifest["build"]["fp32_layers"] = {"nodes": [], "tensors": []}
    (unpinned / "manifest.json").write_text(json.dumps({**manifest, "files": list_files(unpinned)}))
    result = run_validation(target, Artifact(unpinned), images[8:], labels)
    assert result["status"] == "failed" and "top1" not in result
    assert result["reason"] == "non-finite logits (NaN/Inf) for 8 of 8 images"
    cli = _cli("validate", str(unpinned), "--data", "fashion_mnist:test", "--limit", "10")
    assert cli.returncode == 1, cli.stderr
    assert cli.stderr.strip().splitlines()[-1].startswith("error:") and "non-finite logits" in cli.stderr


def test_calibration_method_is_chosen_on_the_heldout_split(built: dict, images: np.ndarray, tmp_path: Path) -> None:
    fp32 = built["mobilenet_v2"][0]
    inputs = BuildInputs(fp32, SIZE, 10, calibration=images[:8], heldout=images[8:])
    facts = get_target("tensorrt").build(inputs, "int8", CONFIG, tmp_path)
    choice = facts["calibration_choice"]
    assert [c["method"] for c in choice["candidates"]] == ["minmax", "percentile", "entropy"]
    best = max(choice["candidates"], key=lambda c: (c["top1_agreement"], -c["logit_abs_err_mean"]))
    assert choice["chosen"] == best["method"] == facts["settings"]["method"]
    assert choice["heldout_images"] == 8
    # a method set in the recipe is used as it is, without a choice
    fixed = BuildInputs(fp32, SIZE, 10, calibration=images[:8], heldout=images[8:])
    (tmp_path / "fixed").mkdir()
    facts = get_target("tensorrt").build(
        fixed, "int8", TensorRtConfig(calibration_method="entropy"), tmp_path / "fixed"
    )
    assert "calibration_choice" not in facts and facts["settings"]["method"] == "entropy"
