"""Fuzzing (hypothesis): what a user can hand t2tedge fails with a clean error, never a crash.

Example counts (the whole file runs in well under a minute on 2 cores):

- recipe loading: 300 examples (random YAML structures with known and unknown keys, and mangled YAML text)
- checkpoint loading: 80 examples (random bytes, truncated and bit-flipped copies of a tiny real checkpoint,
  and well-formed torch files with random contents and metadata)
- tensorrt-lint: 300 examples (random small ONNX graphs: op types incl. Q/DQ, random wiring, malformed
  initializers)

A "clean error" is a :class:`~t2tedge.errors.T2tedgeError` (RecipeError, CheckpointError); the lint returns
findings and never raises.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis (dev extra) is not installed")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from t2tedge.errors import CheckpointError, RecipeError  # noqa: E402
from t2tedge.models import get_spec, load_model, read_checkpoint, save_checkpoint  # noqa: E402
from t2tedge.pipeline.recipe import Recipe, load_recipe  # noqa: E402
from t2tedge.targets.tensorrt_lint import Finding, lint  # noqa: E402

RECIPE_EXAMPLES = 300
CHECKPOINT_EXAMPLES = 80
LINT_EXAMPLES = 300
FUZZ = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

# ---- recipes -----------------------------------------------------------------------------------------------

KNOWN_KEYS = [
    "name", "output_dir", "models", "targets", "precisions", "data", "export", "calibration", "quantization",
    "threads", "benchmark", "weights", "image_size", "validation", "limit", "allow_overlap", "opset",
    "dynamic_batch", "parity_images", "size", "seed", "allow_fewer", "heldout", "method", "percentile",
    "max_accuracy_drop", "accuracy_subset", "openvino", "onnxruntime", "tensorrt", "coreml", "model_type",
    "preset", "ignored_scope", "names", "types", "patterns", "exclude_nodes", "warmup", "min_iters",
    "min_seconds", "batch_sizes", "enabled", "efficiency", "input_type", "compute_units",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["t2t_vit_7", "mobilenet_v2", "onnxruntime", "int8", "fp32", "${HOME}", "${NOPE_VAR}", "$", "{"]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers(-3, 3), st.booleans())
structures = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=25
)
recipes = st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), structures, max_size=8)


_YAML_PUNCTUATION = ":-[]{}&*!|>%@`'\"\t\n #"


def _recipe_text(draw_structure: object, mangle: bytes) -> str:
    text = yaml.safe_dump(draw_structure, allow_unicode=True)
    if not mangle:
        return text
    # Overwrite a few characters: half-broken YAML (indentation, colons, anchors, tags).
    chars = list(text)
    for i, byte in enumerate(mangle):
        if chars:
            chars[(byte * 7919 + i) % len(chars)] = _YAML_PUNCTUATION[byte % len(_YAML_PUNCTUATION)]
    return "".join(chars)


@settings(max_examples=RECIPE_EXAMPLES, **FUZZ)
@given(structure=st.one_of(recipes, structures), mangle=st.binary(max_size=6))
def test_recipe_loading_gives_a_recipe_or_a_recipe_error(structure: object, mangle: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(_recipe_text(structure, mangle))
        try:
            recipe = load_recipe(path, variables={"HOME": "/home/x"})
        except RecipeError as exc:
            assert str(exc).strip(), "an empty error message"
        else:
            assert isinstance(recipe, Recipe)


# ---- checkpoints -------------------------------------------------------------------------------------------

_TINY: dict[str, bytes] = {}


def _tiny_checkpoint() -> bytes:
    """A real t2tedge checkpoint of a small MobileNetV3 (3 classes, 32 px), made once per session."""
    if "bytes" not in _TINY:
        torch.manual_seed(0)
        model = get_spec("mobilenet_v3_small").create(num_classes=3, image_size=32)
        pre = {"input_size": 32, "resize_size": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny.pt"
            save_checkpoint(path, model, {"model": "mobilenet_v3_small", "classes": ["a", "b", "c"], "preprocess": pre})
            _TINY["bytes"] = path.read_bytes()
    return _TINY["bytes"]


def _torch_file(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(-10, 10) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
preprocess_like = st.fixed_dictionaries(
    {},
    optional={
        "input_size": json_like,
        "resize_size": json_like,
        "interpolation": st.sampled_from(["bilinear", "bicubic", "nearest", "wobbly"]) | json_like,
        "mean": st.lists(st.floats(-2, 2), max_size=4) | json_like,
        "std": st.lists(st.floats(-2, 2), max_size=4) | json_like,
        "crop_pct": json_like,
    },
)
meta_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["mobilenet_v3_small", "t2t_vit_7"]) | json_like,
        "classes": json_like,
        "preprocess": preprocess_like | json_like,
    },
)


@st.composite
def checkpoint_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "bitflip", "structured"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    real = _tiny_checkpoint()
    if kind == "truncated":
        return real[: draw(st.integers(0, len(real) - 1))]
    if kind == "bitflip":
        data = bytearray(real)
        # The zip headers sit at both ends; flips there change the structure, flips inside change tensors.
        where = st.integers(0, 4095) | st.integers(len(real) - 4096, len(real) - 1) | st.integers(0, len(real) - 1)
        for position in draw(st.lists(where, min_size=1, max_size=8)):
            data[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    state = torch.load(io.BytesIO(real), weights_only=True)
    tensors = dict(state["state_dict"])
    for name in draw(st.lists(st.sampled_from(sorted(tensors)), max_size=3)):
        tensors[name] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)))  # wrong shapes
    container = draw(st.sampled_from(["state_dict", "state_dict_ema", "model", "bare"]))
    obj: object = tensors if container == "bare" else {container: tensors}
    if isinstance(obj, dict) and draw(st.booleans()):
        obj["t2tedge"] = draw(meta_like)
    if draw(st.booleans()):
        obj = draw(json_like)  # a torch file holding no state dict at all
    return _torch_file(obj)


@settings(max_examples=CHECKPOINT_EXAMPLES, **FUZZ)
@given(data=checkpoint_bytes(), image_size=st.none() | st.sampled_from([32, 48]))
def test_checkpoint_loading_gives_a_model_or_a_checkpoint_error(data: bytes, image_size: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.pt"
        path.write_bytes(data)
        try:
            read_checkpoint(path)
            loaded = load_model(get_spec("mobilenet_v3_small"), path, image_size=image_size)
        except CheckpointError as exc:
            assert str(exc).strip()
        else:
            with torch.no_grad():
                out = loaded.model(torch.zeros(1, 3, loaded.image_size, loaded.image_size))
            assert out.shape == (1, loaded.num_classes)


# ---- tensorrt-lint -----------------------------------------------------------------------------------------

OPS = [
    "QuantizeLinear", "DequantizeLinear", "Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Reshape", "Transpose",
    "Softmax", "LayerNormalization", "Concat", "Gather", "Identity", "Constant", "NotAnOnnxOp",
]  # fmt: skip
DTYPES = [1, 2, 3, 6, 7, 9, 10, 11, 16, 0, 99]  # float, uint8, int8, int32, int64, bool, fp16, double, bf16, bad


@st.composite
def initializers(draw: st.DrawFn, name: str):  # noqa: ANN201
    from onnx import TensorProto, helper

    dtype = draw(st.sampled_from(DTYPES))
    dims = draw(st.lists(st.integers(0, 4), max_size=4))
    count = int(np.prod(dims)) if dims else 1
    if draw(st.booleans()):  # raw bytes, of the right length or not
        size = draw(st.sampled_from([count, count * 4, 0, 3, count + 1]))
        tensor = TensorProto(
            name=name, data_type=dtype, dims=dims, raw_data=draw(st.binary(min_size=size, max_size=size))
        )
    elif dtype in (1, 10, 11, 16):
        tensor = helper.make_tensor(name, 1, dims, [0.0] * count)
        tensor.data_type = dtype
        if draw(st.booleans()):
            tensor.float_data.extend([1.0] * draw(st.integers(0, 3)))  # more values than the dims say
    else:
        tensor = TensorProto(name=name, data_type=dtype, dims=dims)
        tensor.int32_data.extend(draw(st.lists(st.integers(-128, 255), max_size=count + 2)))
    return tensor


@st.composite
def onnx_graphs(draw: st.DrawFn) -> bytes:
    from onnx import TensorProto, helper

    names = ["x"]
    inits = []
    for i in range(draw(st.integers(0, 5))):
        inits.append(draw(initializers(f"w{i}")))
        names.append(f"w{i}")
    dims = draw(st.lists(st.one_of(st.integers(-1, 8), st.sampled_from(["batch", ""])), max_size=4))
    inputs = [
        helper.make_tensor_value_info("x", draw(st.sampled_from([1, 10, 7, 0])), dims if draw(st.booleans()) else None)
    ]
    nodes = []
    for i in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(OPS))
        ins = draw(st.lists(st.sampled_from(names) | st.sampled_from(["", "missing"]), max_size=3))
        outs = [f"t{i}"] if draw(st.integers(0, 9)) else draw(st.lists(st.sampled_from(names), min_size=0, max_size=2))
        attrs = {}
        if op in ("QuantizeLinear", "DequantizeLinear") and draw(st.booleans()):
            attrs["axis"] = draw(st.integers(-5, 5))
        if op == "Constant" and draw(st.booleans()):
            attrs["value"] = draw(initializers(f"c{i}"))
        if op == "Transpose" and draw(st.booleans()):
            attrs["perm"] = draw(st.lists(st.integers(-2, 4), min_size=1, max_size=4))
        nodes.append(helper.make_node(op, ins, outs, name=draw(st.sampled_from([f"n{i}", "", "n0"])), **attrs))
        names.extend(o for o in outs if o not in names)
    output_names = draw(st.lists(st.sampled_from(names), min_size=0, max_size=2))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in output_names]
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, initializer=inits)
    opset = draw(st.integers(1, 23))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


@settings(max_examples=LINT_EXAMPLES, **FUZZ)
@given(
    model=onnx_graphs(),
    ranges=st.none() | st.dictionaries(st.sampled_from(["x", "t0", "t1", "w0"]), st.floats(allow_nan=True), max_size=3),
    fp32=st.sets(st.sampled_from(["x", "t0", "n0"]), max_size=2),
)
# found by this test: a pass-through Relu with no input, read by a Conv (the lint looked back through it)
@example(
    model=b'\x08\x0e:p\n\x0e\x12\x02t0\x1a\x02n0"\x04Relu\n\x0e\x12\x02t1\x1a\x02n1"\x04Conv\n\x1e\n\x01x\n\x01x'
    b'\x12\x02t2\x1a\x02n2"\x0eQuantizeLinear\n\n\x1a\x02n3"\x04Conv\n\x11\n\x01x\n\x02t0\x1a\x02n4"\x04Conv\x12'
    b"\x04fuzzZ\t\n\x01x\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x01",
    ranges=None,
    fp32=set(),
)
def test_tensorrt_lint_returns_findings_and_never_raises(model: bytes, ranges: dict | None, fp32: set) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        findings = lint(path, ranges, fp32)
    assert isinstance(findings, list) and all(isinstance(f, Finding) for f in findings)
