"""TensorRT lint fusion and FP16-range rules on crafted graphs: each rule fires naming its node, and the
correct variant of the same graph stays clean of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from t2tedge.errors import T2tedgeError
from t2tedge.targets.tensorrt_lint import Finding, lint, load_ranges

FLOAT = TensorProto.FLOAT


class Graph:
    """A small ONNX graph under construction: nodes, initializers, one float input ``x``."""

    def __init__(self, x_shape: list[int]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info("x", FLOAT, x_shape)]

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def qdq(self, tensor: str, name: str) -> str:
        """Per-tensor symmetric INT8 Q -> DQ on an activation; the DQ is ``{name}_dq``."""
        scale = self.const(f"{name}_scale", np.array(0.05, np.float32))
        zero = self.const(f"{name}_zero", np.array(0, np.int8))
        q = self.node("QuantizeLinear", [tensor, scale, zero], f"{name}_q")
        return self.node("DequantizeLinear", [q, scale, zero], f"{name}_dq")

    def weight(self, name: str, shape: tuple[int, ...], axis: int) -> str:
        """An INT8 weight initializer behind a per-channel DQ on ``axis``; the DQ is ``{name}_dq``."""
        rng = np.random.default_rng(0)
        weight = self.const(name, rng.integers(-127, 128, shape).astype(np.int8))
        scale = self.const(f"{name}_scale", np.full(shape[axis], 0.01, np.float32))
        zero = self.const(f"{name}_zero", np.zeros(shape[axis], np.int8))
        return self.node("DequantizeLinear", [weight, scale, zero], f"{name}_dq", axis=axis)

    def save(self, path: Path, output: str) -> Path:
        graph = helper.make_graph(
            self.nodes, "g", self.inputs, [helper.make_tensor_value_info(output, FLOAT, None)], self.inits
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path


def _fired(findings: list[Finding], rule: str) -> list[Finding]:
    return [f for f in findings if f.rule == rule]


def _only(findings: list[Finding], rule: str) -> Finding:
    fired = _fired(findings, rule)
    assert len(fired) == 1, findings
    return fired[0]


# --- weight-only-quantized ---------------------------------------------------------------------------


def _conv(tmp_path: Path, quantize_activation: bool) -> Path:
    g = Graph([1, 3, 8, 8])
    x = g.qdq("x", "x") if quantize_activation else "x"
    g.node("Conv", [x, g.weight("w", (4, 3, 3, 3), axis=0)], "conv")
    return g.save(tmp_path / "conv.onnx", "conv_out")


def _matmul(tmp_path: Path, quantize_activation: bool, transposed_weight: bool) -> Path:
    g = Graph([1, 4, 8])
    x = g.qdq("x", "x") if quantize_activation else "x"
    if transposed_weight:  # a (N, K) weight read through a Transpose: TensorRT moves the DQ past it
        weight = g.node("Transpose", [g.weight("w", (6, 8), axis=0)], "w_t", perm=[1, 0])
    else:
        weight = g.weight("w", (8, 6), axis=1)
    g.node("MatMul", [x, weight], "fc")
    return g.save(tmp_path / "matmul.onnx", "fc_out")


def test_weight_only_conv_is_an_error_naming_the_conv(tmp_path: Path) -> None:
    finding = _only(lint(_conv(tmp_path, quantize_activation=False)), "weight-only-quantized")
    assert (finding.severity, finding.node, finding.op) == ("error", "conv", "Conv")
    assert "'w_dq'" in finding.message and "'x'" in finding.message
    assert lint(_conv(tmp_path, quantize_activation=True)) == []


@pytest.mark.parametrize("transposed_weight", [False, True])
def test_weight_only_matmul_is_an_error_also_through_a_transpose(tmp_path: Path, transposed_weight: bool) -> None:
    findings = lint(_matmul(tmp_path, quantize_activation=False, transposed_weight=transposed_weight))
    finding = _only(findings, "weight-only-quantized")
    assert (finding.severity, finding.node) == ("error", "fc")
    assert lint(_matmul(tmp_path, quantize_activation=True, transposed_weight=transposed_weight)) == []


def test_float_attention_matmul_is_not_weight_only(tmp_path: Path) -> None:
    # q·kᵀ between two activations, as our artifacts leave it: no DQ on either input, plain float
    g = Graph([1, 4, 8])
    kt = g.node("Transpose", ["x"], "k_t", perm=[0, 2, 1])
    g.node("MatMul", ["x", kt], "scores")
    assert lint(g.save(tmp_path / "attention.onnx", "scores_out")) == []


# --- unfusable-qdq -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Softmax", "LayerNormalization"])
def test_dq_into_a_float_only_op_is_unfusable(tmp_path: Path, op: str) -> None:
    def graph(quantized: bool, through_reshape: bool = False) -> Path:
        g = Graph([2, 8])
        x = g.qdq("x", "x") if quantized else "x"
        if through_reshape:  # TensorRT moves the DQ past the Reshape, so it still lands on the float op
            x = g.node("Reshape", [x, g.const("shape", np.array([2, 8], np.int64))], "reshape")
        inputs = [x, g.const("gamma", np.ones(8, np.float32))] if op == "LayerNormalization" else [x]
        g.node(op, inputs, "float_op")
        return g.save(tmp_path / "m.onnx", "float_op_out")

    for through_reshape in (False, True):
        finding = _only(lint(graph(True, through_reshape)), "unfusable-qdq")
        assert (finding.severity, finding.node, finding.op) == ("error", "x_dq", "DequantizeLinear")
        assert finding.message.startswith("float-only consumer") and f"{op} 'float_op'" in finding.message
    assert lint(graph(False)) == []


def test_dq_read_only_by_non_int8_ops_is_unfusable(tmp_path: Path) -> None:
    g = Graph([1, 4, 8])
    dq = g.qdq("x", "x")
    g.node("Sigmoid", [dq], "gate")
    g.node("Mul", [dq, "gate_out"], "swish")
    finding = _only(lint(g.save(tmp_path / "m.onnx", "swish_out")), "unfusable-qdq")
    assert (finding.severity, finding.node) == ("error", "x_dq")
    assert finding.message.startswith("no INT8 consumer") and "Mul, Sigmoid" in finding.message


def test_dq_that_reaches_an_int8_layer_is_fusable(tmp_path: Path) -> None:
    # Through pass-through ops to a MatMul, and shared with a float Mul as the Performer's x·x does in
    # our T2T-ViT artifacts: one INT8 reader is enough for TensorRT to fuse the DQ.
    g = Graph([1, 4, 8])
    dq = g.qdq("x", "x")
    flat = g.node("Reshape", [dq, g.const("shape", np.array([4, 8], np.int64))], "flat")
    relu = g.node("Relu", [flat], "relu")
    g.node("MatMul", [relu, g.weight("w", (8, 6), axis=1)], "fc")
    g.node("Mul", [dq, dq], "square")
    assert lint(g.save(tmp_path / "m.onnx", "fc_out")) == []


@pytest.mark.parametrize("other", ["conv", "quantized", "float"])
def test_dq_into_add_is_fusable_as_a_residual_or_a_quantized_add(tmp_path: Path, other: str) -> None:
    # TensorRT fuses a DQ'd residual into the Conv before the Add, and DQ + DQ -> Add -> Q into an INT8 Add.
    g = Graph([1, 4, 8, 8])
    conv = g.node("Conv", [g.qdq("x", "x"), g.weight("w", (4, 4, 1, 1), axis=0)], "conv")
    if other == "conv":
        g.node("Add", [conv, g.qdq("x", "residual")], "add")
    else:
        left = g.qdq(conv, "conv_out") if other == "quantized" else g.node("Sigmoid", ["x"], "gate")
        g.node("Add", [left, g.qdq("x", "residual")], "add")
        g.node("Conv", [g.qdq("add_out", "sum"), g.weight("w2", (4, 4, 1, 1), axis=0)], "conv2")
    fired = _fired(lint(g.save(tmp_path / "m.onnx", "conv2_out" if other != "conv" else "add_out")), "unfusable-qdq")
    if other == "float":
        assert [(f.node, f.message.split(":")[0]) for f in fired] == [("residual_dq", "no INT8 consumer")]
    else:
        assert fired == []


def test_back_to_back_qdq_is_unfusable_naming_the_second_q(tmp_path: Path) -> None:
    def graph(pairs: int) -> Path:
        g = Graph([1, 3, 8, 8])
        x = "x"
        for i in range(pairs):
            x = g.qdq(x, f"x{i}")
        g.node("Conv", [x, g.weight("w", (4, 3, 3, 3), axis=0)], "conv")
        return g.save(tmp_path / "m.onnx", "conv_out")

    finding = _only(lint(graph(2)), "unfusable-qdq")
    assert (finding.severity, finding.node, finding.op) == ("error", "x1_q", "QuantizeLinear")
    assert finding.message.startswith("back-to-back") and "'x0_dq'" in finding.message
    assert lint(graph(1)) == []


# --- fp16-overflow -----------------------------------------------------------------------------------


@pytest.fixture
def scaled(tmp_path: Path) -> Path:
    """x -> Mul by 1e4 ('scale') -> Relu ('relu'): the Mul's output is the one that leaves FP16's range."""
    g = Graph([1, 8])
    big = g.node("Mul", ["x", g.const("k", np.array(1e4, np.float32))], "scale")
    g.node("Relu", [big], "relu")
    return g.save(tmp_path / "scaled.onnx", "relu_out")


def test_fp16_overflow_names_the_producing_node_and_value(scaled: Path) -> None:
    findings = lint(scaled, {"scale_out": 123456.0, "relu_out": 65504.0})
    finding = _only(findings, "fp16-overflow")
    assert (finding.severity, finding.node, finding.op) == ("error", "scale", "Mul")
    assert "123456" in finding.message and "65504" in finding.message
    assert lint(scaled, {"scale_out": 60000.0, "relu_out": 60000.0}) == []
    assert lint(scaled) == []  # no ranges, no range check
    assert _only(lint(scaled, {"scale_out": float("nan")}), "fp16-overflow").severity == "error"


def test_fp16_overflow_of_a_pinned_tensor_is_info(scaled: Path) -> None:
    finding = _only(lint(scaled, {"scale_out": 123456.0}, fp32_tensors={"scale_out"}), "fp16-overflow")
    assert (finding.severity, finding.node) == ("info", "scale")
    assert "pinned to FP32" in finding.message and "above FP16" in finding.message


def test_ranges_from_another_graph_warn(scaled: Path) -> None:
    finding = _only(lint(scaled, {"not_here": 1.0, "relu_out": 2.0}), "fp16-overflow")
    assert (
        finding.severity == "warning"
        and "1 tensors named in the ranges" in finding.message
        and "'not_here'" in finding.message
    )


def _write_ranges(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_load_ranges_reads_the_calibration_format(tmp_path: Path) -> None:
    data = {"tensors": {"a": {"max_abs": 7e4, "min": -7e4}, "b": {"max_abs": 3}}, "fp32_tensors": ["a"]}
    assert load_ranges(_write_ranges(tmp_path / "r.json", data)) == ({"a": 7e4, "b": 3.0}, {"a"})
    assert load_ranges(_write_ranges(tmp_path / "r.json", {"tensors": {}})) == ({}, set())


@pytest.mark.parametrize(
    "content, says",
    [
        (None, "does not exist"),
        ("{not json", "not readable JSON"),
        ([1, 2], "malformed"),
        ({"fp32_tensors": []}, "malformed"),
        ({"tensors": {}, "fp32_tensors": "a"}, "malformed"),
        ({"tensors": {"a": {"max_abs": "big"}}}, "'a' has no numeric max_abs"),
        ({"tensors": {"a": {"max_abs": True}}}, "'a' has no numeric max_abs"),
        ({"tensors": {"a": 5.0}}, "'a' has no numeric max_abs"),
    ],
)
def test_load_ranges_rejects_a_bad_file_in_one_line(tmp_path: Path, content: object, says: str) -> None:
    path = tmp_path / "r.json"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        _write_ranges(path, content)
    with pytest.raises(T2tedgeError, match=says) as raised:
        load_ranges(path)
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "t2tedge.cli", "tensorrt-lint", *args], capture_output=True, text=True, env=env
    )


def test_cli_ranges_option(scaled: Path, tmp_path: Path) -> None:
    overflow = _write_ranges(tmp_path / "over.json", {"tensors": {"scale_out": {"max_abs": 123456.0}}})
    result = _cli(str(scaled), "--ranges", str(overflow))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fp16-overflow" in result.stdout and "scale" in result.stdout and "123456" in result.stdout
    pinned = _write_ranges(
        tmp_path / "pinned.json", {"tensors": {"scale_out": {"max_abs": 123456.0}}, "fp32_tensors": ["scale_out"]}
    )
    result = _cli(str(scaled), "--ranges", str(pinned))
    assert result.returncode == 0 and "pinned to FP32" in result.stdout, result.stdout + result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = _cli(str(scaled), "--ranges", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "not readable JSON" in result.stderr
