"""INT8 QDQ quantization for ONNX Runtime on tiny models and real Fashion-MNIST images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from t2tedge.calibration import select_indices
from t2tedge.calibration.accuracy_aware import SENSITIVITY_JSON, SENSITIVITY_MD
from t2tedge.calibration.onnx_qdq import QdqSettings, calibrate, entropy_threshold, qdq_structure, quantize_qdq
from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.evaluation.host import has_int8_dot_products
from t2tedge.models import get_spec
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.export import export_onnx
from t2tedge.pipeline.recipe import QuantizationConfig
from t2tedge.targets import BuildInputs, get_target

SIZE = 32
ALLOWED = {"Conv", "MatMul", "Gemm"}


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """48 real, class-balanced Fashion-MNIST images preprocessed at 32 px, and their labels."""
    dataset = open_dataset("fashion_mnist:train")
    indices = select_indices(dataset.labels, 48, seed=0)
    pre = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
    return preprocess(dataset, indices, pre, "images"), dataset.labels[indices]


def _export(name: str, path: Path) -> Path:
    torch.manual_seed(0)
    export_onnx(get_spec(name).create(num_classes=10, image_size=SIZE), SIZE, path)
    return path


@pytest.fixture(scope="module")
def t2t_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export("t2t_vit_7", tmp_path_factory.mktemp("t2t") / "t2t_vit_7.onnx")


@pytest.fixture(scope="module")
def mobilenet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export("mobilenet_v2", tmp_path_factory.mktemp("mnv2") / "mobilenet_v2.onnx")


def _cosine(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine of INT8 and FP32 logits around the FP32 mean logit.

    Random-weight models give nearly the same logits for every image; centring keeps only what depends
    on the image, so a quantization that loses it scores near 0 (clipping at the 60th percentile: ~0.0),
    while the defaults score ~0.98.
    """
    mean = reference.mean(0)
    a, b = logits - mean, reference - mean
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def _optimized_op_types(path: Path, tmp_path: Path) -> set[str]:
    """Op types after ONNX Runtime's own graph optimizations (the QDQ fusions)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}


def _check_qdq_graph(path: Path, activation_dtype: int) -> onnx.GraphProto:
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)  # valid ONNX, nodes in topological order
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and any(n.op_type == "QuantizeLinear" for n in graph.node)
    for dq in dqs:
        users = consumers.get(dq.output[0], [])
        source = dq.input[0]
        # every Q/DQ pair is there for a Conv/MatMul/Gemm: it feeds one (others may share the value)
        # or quantizes one's output
        quantized_by = producers.get(producers[source].input[0]) if source in producers else None
        assert any(u.op_type in ALLOWED for u in users) or (quantized_by and quantized_by.op_type in ALLOWED)
        assert not any(u.op_type == "Softmax" for u in users)
        if source in inits:
            data = numpy_helper.to_array(inits[source])
            if data.dtype == np.int8 and data.ndim >= 2:  # a weight: int8, per output channel
                scale = numpy_helper.to_array(inits[dq.input[1]])
                axis = next(a.i for a in dq.attribute if a.name == "axis")
                assert scale.shape == (data.shape[axis],) and data.shape[axis] > 1
                assert not numpy_helper.to_array(inits[dq.input[2]]).any()  # symmetric: zero point 0
        else:
            assert producers[source].op_type == "QuantizeLinear"
            assert inits[producers[source].input[2]].data_type == activation_dtype
    return graph


def test_t2t_qdq_structure_and_accuracy(
    t2t_onnx: Path, images: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calib, _ = images
    out = tmp_path / "int8.onnx"
    with caplog.at_level(logging.INFO):
        facts = quantize_qdq(t2t_onnx, out, calib[:16], QdqSettings())
    # ORT's optional pre-processing cannot infer the Performer's opset-18 ReduceMax: said in the facts,
    # not warned on every build
    assert facts["preprocessed"].startswith("no: ORT's quantization pre-processing failed")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert list(tmp_path.iterdir()) == [out]  # no temporary files next to the artifact
    graph = _check_qdq_graph(out, TensorProto.UINT8)
    assert facts["quantize_linear_nodes"] > 0 and facts["dequantize_linear_nodes"] > facts["quantize_linear_nodes"]
    assert set(facts["quantized_nodes"]) >= {"Gemm"} and facts["settings"]["activation_type"] == "uint8"
    # attention and Performer feature products (two activation inputs) stay FP32
    inits = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def dequantized(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    weights = inits | {n for n in producers if dequantized(n) and producers[n].input[0] in inits}
    activation_matmuls = [n for n in graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    assert len(activation_matmuls) >= 6 + 2 * 7  # 3 per Performer token layer, 2 per backbone block
    for node in activation_matmuls:
        assert not any(dequantized(i) for i in node.input), node.name
    assert facts["nodes_excluded"], "the activation x activation MatMuls are reported as excluded"
    ops = _optimized_op_types(out, tmp_path)
    assert "QLinearSoftmax" not in ops and "Softmax" in ops
    assert ops & {"QGemm", "MatMulIntegerToFloat", "QLinearMatMul"}

    reference = OnnxSession(t2t_onnx)(calib[16:])
    logits = OnnxSession(out)(calib[16:])
    assert _cosine(logits, reference) > 0.93


def test_mobilenet_qdq_outputs_close_to_fp32(mobilenet_onnx: Path, images: tuple, tmp_path: Path) -> None:
    calib, _ = images
    out = tmp_path / "int8.onnx"
    # 7-bit weights where this CPU's U8S8 kernels would saturate (x86 without VNNI/AMX): ORT's own default
    facts = quantize_qdq(mobilenet_onnx, out, calib[:16], QdqSettings(reduce_range=not has_int8_dot_products()))
    assert facts["preprocessed"] is True
    _check_qdq_graph(out, TensorProto.UINT8)
    assert facts["quantized_nodes"].get("Conv", 0) >= 40
    assert "QLinearConv" in _optimized_op_types(out, tmp_path)
    reference = OnnxSession(mobilenet_onnx)(calib[16:])
    assert _cosine(OnnxSession(out)(calib[16:]), reference) > 0.93


def test_symmetric_int8_activations_for_tensorrt(t2t_onnx: Path, images: tuple, tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    settings = QdqSettings(activation_type="int8", activation_symmetric=True)
    quantize_qdq(t2t_onnx, out, images[0][:8], settings)
    graph = _check_qdq_graph(out, TensorProto.INT8)
    inits = {i.name: i for i in graph.initializer}
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        assert not numpy_helper.to_array(inits[q.input[2]]).any()  # zero point 0


def _heavy_tailed_matmul(path: Path) -> Path:
    """input (1, 3, 8, 8) @ W (8, 8): calibrating it measures the input's range directly."""
    weight = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["input", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_entropy_and_percentile_clip_heavy_tails(tmp_path: Path) -> None:
    model = _heavy_tailed_matmul(tmp_path / "mm.onnx")
    data = np.random.default_rng(0).standard_t(2, size=(64, 3, 8, 8)).astype(np.float32)
    ranges = {}
    for method in ("minmax", "entropy", "percentile"):
        # a small chunk budget: the histograms are fed and merged over several chunks
        settings = QdqSettings(method=method, percentile=99.9, chunk_mb=0, preprocess=False)
        calibrated = calibrate(model, data, settings, tmp_path / method)
        ranges[method] = np.array([float(np.ravel(v)[0]) for v in calibrated.ranges.data["input"].range_value])
        if method != "minmax":
            assert calibrated.facts["calibration"]["chunk_images"] == 1
    assert np.allclose(ranges["minmax"], [data.min(), data.max()])
    for method in ("entropy", "percentile"):
        low, high = ranges[method]
        assert data.min() < low < 0 < high < data.max()
        assert high - low < 0.5 * (data.max() - data.min())
    assert not np.allclose(ranges["entropy"], ranges["percentile"])


def test_entropy_threshold_keeps_a_plain_distribution() -> None:
    # no outliers: the best threshold keeps (nearly) the whole range
    counts = np.ones(512)
    assert entropy_threshold(counts, np.linspace(0, 1, 513), 128) > 0.9


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods_quantize_t2t(method: str, t2t_onnx: Path, images: tuple, tmp_path: Path) -> None:
    calib, _ = images
    out = tmp_path / "int8.onnx"
    settings = QdqSettings(method=method, num_bins=256, num_quantized_bins=64)
    facts = quantize_qdq(t2t_onnx, out, calib[:8], settings)
    assert facts["calibration"]["method"] == method and facts["calibration"]["tensors"] > 10
    reference = OnnxSession(t2t_onnx)(calib[16:])
    assert _cosine(OnnxSession(out)(calib[16:]), reference) > 0.85


def test_target_int8_build_with_recipe_defaults(t2t_onnx: Path, images: tuple, tmp_path: Path) -> None:
    target = get_target("onnxruntime")
    assert "int8" in target.precisions and target.needs_calibration("int8")
    config = QuantizationConfig().for_target("onnxruntime")
    inputs = BuildInputs(t2t_onnx, SIZE, 10, calibration=images[0][:8])
    facts = target.build(inputs, "int8", config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert facts["settings"]["method"] == "minmax" and facts["settings"]["op_types"] == ["Conv", "MatMul", "Gemm"]
    assert facts["model_bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert json.dumps(facts)  # manifest-ready


def test_accuracy_aware_keeps_sensitive_nodes_fp32(mobilenet_onnx: Path, images: tuple, tmp_path: Path) -> None:
    calib, _ = images
    # labels = the FP32 predictions: FP32 top-1 is 100 %, so a tiny budget forbids any flipped prediction
    # (a random MobileNetV2's logits are close together: INT8 flips some)
    validation = calib[16:48]
    labels = OnnxSession(mobilenet_onnx)(validation).argmax(1)
    config = QuantizationConfig(max_accuracy_drop=0.01).for_target("onnxruntime")
    inputs = BuildInputs(mobilenet_onnx, SIZE, 10, calibration=calib[:8], heldout=validation, heldout_labels=labels)
    facts = get_target("onnxruntime").build(inputs, "int8", config, tmp_path)
    aware = facts["accuracy_aware"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", SENSITIVITY_JSON, SENSITIVITY_MD]
    report = json.loads((tmp_path / SENSITIVITY_JSON).read_text())
    assert (tmp_path / SENSITIVITY_MD).read_text().startswith("# INT8 sensitivity")
    assert aware["fp32_top1"] == 100.0 and aware["int8_top1_all_quantized"] < 100.0
    assert len(aware["nodes_kept_fp32"]) >= 1
    # independently of what the search reports: the artifact, run on the same images, keeps every
    # FP32 prediction (a 0.01-point budget on 32 images allows no flip)
    achieved_top1 = 100.0 * float((OnnxSession(tmp_path / "model.onnx")(validation).argmax(1) == labels).mean())
    assert 100.0 - achieved_top1 <= 0.01
    assert aware["met"] and aware["int8_top1"] == pytest.approx(achieved_top1)
    assert aware["accuracy_drop"] == pytest.approx(100.0 - achieved_top1)
    assert len(report["nodes"]) == aware["candidates"]
    assert {n["node"] for n in report["nodes"] if n["kept_fp32"]} == set(aware["nodes_kept_fp32"])
    assert set(report["nodes"][0]) >= {"node", "op_type", "top1_gain", "logit_mse_reduction", "kept_fp32"}
    assert set(aware["nodes_kept_fp32"]) <= set(facts["nodes_excluded"])
    # the artifact is the model with those nodes in FP32, and it runs
    assert OnnxSession(tmp_path / "model.onnx")(validation[:2]).shape == (2, 10)


def test_accuracy_aware_search_scores_on_the_heldout_split(mobilenet_onnx: Path, images: tuple, tmp_path: Path) -> None:
    from t2tedge.errors import T2tedgeError

    calib, _ = images
    heldout = calib[16:48]
    labels = OnnxSession(mobilenet_onnx)(heldout).argmax(1)
    config = QuantizationConfig(max_accuracy_drop=0.01).for_target("onnxruntime")
    inputs = BuildInputs(mobilenet_onnx, SIZE, 10, calibration=calib[:8], heldout=heldout, heldout_labels=labels)
    aware = get_target("onnxruntime").build(inputs, "int8", config, tmp_path)["accuracy_aware"]
    assert aware["tuned_on"] == "calibration.heldout" and aware["images"] == 32
    assert aware["fp32_top1"] == 100.0 and len(aware["nodes_kept_fp32"]) >= 1
    assert "(calibration.heldout)" in (tmp_path / SENSITIVITY_MD).read_text()
    # without labelled held-out images the search refuses, naming the setting
    (tmp_path / "again").mkdir()
    with pytest.raises(T2tedgeError, match=r"calibration\.heldout > 0"):
        get_target("onnxruntime").build(
            BuildInputs(mobilenet_onnx, SIZE, 10, calibration=calib[:8], heldout=heldout),
            "int8",
            config,
            tmp_path / "again",
        )


def test_every_quantized_product_runs_on_an_integer_kernel(t2t_onnx: Path, images: tuple, tmp_path: Path) -> None:
    from t2tedge.calibration.onnx_qdq import QDQ_SESSION_CONFIG
    from t2tedge.targets.onnxruntime import runtime_int8_ops

    config = QuantizationConfig().for_target("onnxruntime")
    facts = get_target("onnxruntime").build(BuildInputs(t2t_onnx, SIZE, 10, calibration=images[0][:8]), "int8",
                                            config, tmp_path)  # fmt: skip
    quantized = sum(facts["quantized_nodes"].get(op, 0) for op in ("MatMul", "Gemm", "Conv"))
    ran = facts["runtime_int8"]
    assert facts["session_config"] == QDQ_SESSION_CONFIG and config.reduce_range == (not has_int8_dot_products())
    # the artifact's loader runs it with that config: each quantized product is an integer kernel there
    assert sum(ran["integer_kernels"].values()) == quantized > 10 and not ran["float_products_on_dequantized_inputs"]
    # every Linear layer with a bias (2 token layers x 4, the token projection, 3 per block: 30) is one QGemm
    # that adds its bias itself; the head was a Gemm already; what is left as MatMulIntegerToFloat has no bias
    assert facts["linears_as_gemm"] == 30 and ran["integer_kernels"]["QGemm"] == 31
    assert ran["integer_kernels"]["MatMulIntegerToFloat"] == quantized - 31
    # the Performer's norms of k and q read the float k and q, not the dequantized copies the MatMuls read
    assert facts["fp32_nodes_reading_dequantized"] == {} and ran["float_products"] == {"MatMul": 7, "FusedMatMul": 13}
    # without the config, ORT's MatMul+Add fusion turns quantized MatMuls of the plain MatMul + Add form into
    # float Gemms on dequantized weights
    matmul_form = tmp_path / "matmul_form.onnx"
    quantize_qdq(t2t_onnx, matmul_form, images[0][:8], QdqSettings(reduce_range=config.reduce_range))
    assert qdq_structure(matmul_form)["fp32_nodes_reading_dequantized"] == {"Mul": 4}
    plain = runtime_int8_ops(matmul_form, {})
    assert plain["float_products_on_dequantized_inputs"]["Gemm"] == 30
    assert not runtime_int8_ops(matmul_form, QDQ_SESSION_CONFIG)["float_products_on_dequantized_inputs"]
    from t2tedge.devices import remote_runner
    from t2tedge.targets.onnxruntime import device_load

    model = device_load(remote_runner, str(tmp_path), {"threads": 1, "build": json.loads(json.dumps(facts))})
    assert model.facts["session_config"] == QDQ_SESSION_CONFIG  # what the loader ran it with, in its facts
    # the bias now travels as int32 at the scale of input x weight: the outputs stay those of the FP32 graph
    reference = OnnxSession(t2t_onnx)(images[0][16:])
    assert _cosine(model(images[0][16:]), reference) > 0.93


def test_mobilenet_convs_keep_their_quantized_outputs(mobilenet_onnx: Path, images: tuple, tmp_path: Path) -> None:
    """Float readers of a quantized op's output (the residual Adds) keep reading the DQ: reading the Conv's
    float output instead would stop ORT fusing that Conv into a QLinearConv."""
    config = QuantizationConfig().for_target("onnxruntime")
    facts = get_target("onnxruntime").build(BuildInputs(mobilenet_onnx, SIZE, 10, calibration=images[0][:8]), "int8",
                                            config, tmp_path)  # fmt: skip
    ran = facts["runtime_int8"]
    assert facts["quantized_nodes"]["Conv"] == ran["integer_kernels"]["QLinearConv"] == 52
    # the residual Adds and the pooling read Conv outputs: their pairs stay
    assert facts["fp32_nodes_reading_dequantized"] == {"Add": 10, "ReduceMean": 1} and not ran["float_products"]


def _linear_graph(extra_reader: bool = False, bias_shape: tuple[int, ...] = (3,)) -> onnx.ModelProto:
    """x [1, 5, 4] -> MatMul(W [4, 3]) -> Add(b) -> y (plus a second reader of the MatMul when asked)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "b"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="fc"), helper.make_node("Add", ["b", "xw"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 3])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["xw"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 5, 3]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 4])],
                              outputs, inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_linear_layers_become_gemms_with_their_bias() -> None:
    from t2tedge.calibration.onnx_qdq import linears_as_gemm

    x = np.random.default_rng(1).standard_normal((1, 5, 4)).astype(np.float32)
    model = _linear_graph()
    before = _run(model, x)
    assert linears_as_gemm(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [(n.op_type, n.name) for n in model.graph.node]
    assert ops == [("Reshape", "fc/to_rows"), ("Gemm", "fc"), ("Reshape", "fc/from_rows")]  # the name stays
    gemm = model.graph.node[1]
    assert list(gemm.input[1:]) == ["W", "b"] and not gemm.attribute  # no transB: W is [K, N] as MatMul had it
    np.testing.assert_allclose(_run(model, x)[0], before[0], rtol=1e-6, atol=1e-6)
    # not a Linear layer: a MatMul read by more than its Add, or a bias that is not one value per column
    for kept in (_linear_graph(extra_reader=True), _linear_graph(bias_shape=(5, 3))):
        assert linears_as_gemm(kept) == 0 and [n.op_type for n in kept.graph.node][:2] == ["MatMul", "Add"]
