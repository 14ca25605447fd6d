"""FP16: the Performer form that stays in range, the FP16 graph emulator and the range check.

The demo T2T-ViT-7 is the trained model here (48 px, Fashion-MNIST); its first Performer's direct form
reaches phi(k) ~ 4e5 and a normalizer ~ 3e9, beyond FP16's 65504.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_t2t_vit import performer_reference

from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.emulation import FP16_MAX, GraphEmulator, audit_fp16, fp16_range_check
from t2tedge.models import demo_checkpoint, get_spec, load_model
from t2tedge.models.t2t_vit import TokenPerformer
from t2tedge.pipeline.export import export_onnx


def direct_performer_forward(self: TokenPerformer, x: torch.Tensor) -> torch.Tensor:
    """The official layer's arithmetic order, in the input's dtype (what `.half()` of that code computes)."""
    k, q, v = self.kqv(self.norm1(x)).split(self.out_dim, dim=-1)

    def phi(u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u @ self.w.t() - (u * u).sum(-1, keepdim=True) / 2) / math.sqrt(self.num_features)

    kp, qp = phi(k), phi(q)
    normalizer = qp @ kp.sum(dim=1).unsqueeze(-1)
    y = (qp @ (v.transpose(1, 2) @ kp).transpose(1, 2)) / (normalizer + 1e-8)
    y = v + self.proj(y)
    return y + self.mlp(self.norm2(y))


@pytest.fixture(scope="module")
def demo() -> tuple[torch.nn.Module, np.ndarray]:
    """The demo T2T-ViT-7 and 128 bundled test images at its 48 px."""
    loaded = load_model(get_spec("t2t_vit_7"), demo_checkpoint("t2t_vit_7"))
    images = preprocess(open_dataset("fashion_mnist:test"), np.arange(128), loaded.preprocess, "test images")
    return loaded.model.eval(), images


@pytest.mark.parametrize(("k_scale", "q_scale"), [(1.0, 1.0), (6.0, 1.0), (1.0, 8.0)])
def test_performer_is_the_official_function_in_float64(k_scale: float, q_scale: float) -> None:
    # k_scale: phi(k) far beyond FP16 (the direct form overflows); q_scale: |q|^2/2 so large that the
    # official normalizer is far below its 1e-8, where the rescaled epsilon decides the output
    torch.manual_seed(0)
    layer = TokenPerformer(147, 64).eval()
    with torch.no_grad():
        layer.norm1.weight.add_(torch.randn(147) * 0.3)
        layer.kqv.weight[:64] *= k_scale
        layer.kqv.weight[64:128] *= q_scale
    x = torch.randn(2, 196, 147, dtype=torch.float64)
    layer.double()
    expected = performer_reference(layer, x)
    with torch.no_grad():
        got = layer(x)
    assert (got - expected).abs().max() <= 1e-9 * max(1.0, float(expected.abs().max()))


def test_demo_t2t_vit_runs_in_pure_fp16(demo: tuple[torch.nn.Module, np.ndarray]) -> None:
    model, images = demo
    with torch.no_grad():
        fp32 = model(torch.from_numpy(images)).numpy()
    logits, record = audit_fp16(model.half(), images)
    model.float()
    assert record["first_nonfinite_op"] is None and np.isfinite(logits).all()
    assert record["outside_fp16"] == [] and record["max_abs"] < FP16_MAX
    assert (logits.argmax(1) == fp32.argmax(1)).mean() == 1.0
    assert np.abs(logits - fp32).max() < 0.1  # FP16 rounding, not a different function


def test_direct_performer_form_overflows_fp16_on_the_demo_model(
    demo: tuple[torch.nn.Module, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the defect the rescaled form fixes, seen by the same audit: the check above can fail
    model, images = demo
    monkeypatch.setattr(TokenPerformer, "forward", direct_performer_forward)
    logits, record = audit_fp16(model.half(), images[:32])
    model.float()
    assert record["first_nonfinite_op"] is not None
    assert record["outside_fp16"] and not np.isfinite(logits).all()


@pytest.fixture(scope="module")
def demo_onnx(demo: tuple[torch.nn.Module, np.ndarray], tmp_path_factory: pytest.TempPathFactory):
    model, images = demo
    path = tmp_path_factory.mktemp("fp16") / "t2t_vit_7.onnx"
    export_onnx(model, 48, path)
    return path


def test_graph_emulator_in_fp32_is_onnxruntime(demo, demo_onnx) -> None:
    _, images = demo
    emulated = GraphEmulator(demo_onnx, float_dtype=torch.float32)(images[:16])
    assert np.abs(emulated - OnnxSession(demo_onnx)(images[:16])).max() < 1e-4


def test_graph_emulator_in_fp16_follows_torch_half(demo, demo_onnx) -> None:
    model, images = demo
    emulated = GraphEmulator(demo_onnx)(images[:32])
    half, _ = audit_fp16(model.half(), images[:32])
    model.float()
    fp32 = OnnxSession(demo_onnx)(images[:32])
    # both round every tensor to FP16: they agree with each other far better than FP16 rounding moves them
    assert np.abs(emulated - half).max() < 0.5 * np.abs(emulated - fp32).max() + 1e-2
    assert 0 < np.abs(emulated - fp32).max() < 0.1


def _graph(path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path)
    return path


def _overflow_graph(tmp_path):
    """y = (x * 1000) * 100 / 1000: the middle tensor leaves FP16's range, the output does not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("a", 1000.0), ("b", 100.0))]
    nodes = [
        helper.make_node("Mul", ["x", "a"], ["big"], name="scale_up"),
        helper.make_node("Mul", ["big", "b"], ["bigger"], name="scale_more"),
        helper.make_node("Div", ["bigger", "a"], ["y"], name="scale_down"),
    ]
    return _graph(tmp_path / "overflow.onnx", nodes, [x], [y], consts)


def test_range_check_names_the_overflow_and_pins_it(tmp_path) -> None:
    path = _overflow_graph(tmp_path)
    x = np.array([[1.0, 0.5, -2.0, 0.25]], np.float32)
    check = fp16_range_check(path, x)
    record, pinned = check.record, check.fp32_nodes
    assert [r["tensor"] for r in record["outside_fp16"]] == ["bigger"]
    assert record["outside_fp16"][0]["max_abs"] == pytest.approx(2e5)
    assert pinned == ["scale_down", "scale_more"]  # the producer and the consumer that reads it
    assert check.fp32_tensors == ["bigger", "y"]
    assert not np.isfinite(GraphEmulator(path)(x)).all()  # FP16 storage: 2e5 is inf
    np.testing.assert_allclose(GraphEmulator(path, fp32_nodes=pinned)(x), x * 100, rtol=1e-3)


def test_qdq_rounds_half_to_even_and_saturates(tmp_path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])
    consts = [
        numpy_helper.from_array(np.array(0.5, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    path = _graph(tmp_path / "qdq.onnx", nodes, [x], [y], consts)
    got = GraphEmulator(path)(np.array([[0.25, 0.75, 1.25, 100.0, -100.0]], np.float32))
    np.testing.assert_array_equal(got, [[0.0, 1.0, 1.0, 63.5, -64.0]])  # 0.5, 1.5, 2.5 steps round to even


def test_qdq_scales_stay_fp32_as_tensorrt_keeps_them(tmp_path) -> None:
    # 1/3 is 0.33325 in FP16: a scale rounded to FP16 would dequantize 126 steps to 41.99, not 42
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    consts = [
        numpy_helper.from_array(np.array(1 / 3, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    path = _graph(tmp_path / "scale.onnx", nodes, [x], [y], consts)
    np.testing.assert_array_equal(GraphEmulator(path)(np.array([[42.0]], np.float32)), [[42.0]])
