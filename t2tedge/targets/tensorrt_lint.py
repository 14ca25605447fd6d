"""A lint of an ONNX graph against TensorRT's explicit-quantization (Q/DQ) rules and ONNX operator support.

The rules come from TensorRT 10.1's ONNX parser (its operator matrix ships as
``data/tensorrt-onnx-operators.csv``) and its documented Q/DQ constraints: INT8 only through
QuantizeLinear/DequantizeLinear with zero point 0, activations quantized per tensor, weights per tensor or
per channel on the output-channel axis (this project requires per channel). Fusion rules check that every
Q/DQ lands where TensorRT can fuse it into an INT8 layer, and optional per-tensor calibration ranges are
checked against FP16's range. An ``error`` finding means the TensorRT build would fail or silently differ
from what t2tedge promised; ``warning`` and ``info`` findings say what to watch for when building the engine.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.errors import T2tedgeError

OPERATORS_CSV = Path(__file__).resolve().parent / "data" / "tensorrt-onnx-operators.csv"
TENSORRT_VERSION = "10.1"
OPSETS = (9, 20)  # the opsets the operator matrix covers
ERROR, WARNING, INFO = "error", "warning", "info"
Q_OP, DQ_OP = "QuantizeLinear", "DequantizeLinear"
# Quantized element types TensorRT's Q/DQ accept (INT8, FP8 E4M3, INT4); by ONNX TensorProto code.
QDQ_TYPES = {3: "INT8", 17: "FLOAT8E4M3FN", 22: "INT4"}
TYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 10: "FLOAT16", 16: "BFLOAT16", 21: "UINT4"}
# The layers TensorRT runs in INT8 when their inputs arrive through DequantizeLinear.
INT8_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops TensorRT propagates Q/DQ through (DQ forward, Q backward) without a change of scale, so a DQ in front
# of them still reaches an INT8 layer; the pooling ops and Relu are also run in INT8 themselves. Concat keeps
# INT8 only when every input is dequantized.
PASS_THROUGH_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Slice",
        "Split",
        "Gather",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Relu",
        "Pad",
        "Identity",
    }
)
# TensorRT keeps these in float whatever surrounds them: a DQ into one only adds quantization error and a reformat.
FLOAT_ONLY_OPS = frozenset({"Softmax", "LayerNormalization"})
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Finding:
    """One lint result; ``node`` is the ONNX node (or graph input) it is about, empty for the file."""

    severity: str
    node: str
    op: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def supported_operators() -> dict[str, bool]:
    """Operator name -> supported by TensorRT's ONNX parser (from the bundled matrix)."""
    with OPERATORS_CSV.open(newline="") as fh:
        return {row["operator"]: row["supported"].strip() == "Y" for row in csv.DictReader(fh)}


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == ERROR for f in findings)


def summarize(findings: list[Finding]) -> dict[str, Any]:
    """Counts by severity and the findings themselves, for a manifest."""
    counts = {s: sum(f.severity == s for f in findings) for s in (ERROR, WARNING, INFO)}
    return {**counts, "findings": [f.to_dict() for f in findings]}


def load_ranges(path: str | Path) -> tuple[dict[str, float], set[str]]:
    """Read a ranges file: ``{"tensors": {name: {"max_abs": float, ...}}, "fp32_tensors": [names]}``.

    Returns (tensor name -> observed max |value|, the tensors the engine build pins to FP32), the
    arguments :func:`lint` takes. ``fp32_tensors`` may be left out.
    """
    path = Path(path)
    expected = '{"tensors": {name: {"max_abs": float}}, "fp32_tensors": [names]}'
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise T2tedgeError(f"ranges file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise T2tedgeError(
            f"ranges file {path} is not readable JSON ({type(exc).__name__}): expected {expected}"
        ) from None
    tensors = data.get("tensors") if isinstance(data, dict) else None
    pinned = data.get("fp32_tensors", []) if isinstance(data, dict) else None
    if not isinstance(tensors, dict) or not isinstance(pinned, list) or not all(isinstance(n, str) for n in pinned):
        raise T2tedgeError(f"ranges file {path} is malformed: expected {expected}")
    ranges = {}
    for name, entry in tensors.items():
        value = entry.get("max_abs") if isinstance(entry, dict) else None
        # bool is an int to Python, and a true/false range is a bug in whatever wrote the file
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise T2tedgeError(f"ranges file {path}: tensor {name!r} has no numeric max_abs: expected {expected}")
        ranges[name] = float(value)
    return ranges, set(pinned)


def lint(
    model_path: str | Path,
    tensor_ranges: dict[str, float] | None = None,
    fp32_tensors: frozenset[str] | set[str] = frozenset(),
) -> list[Finding]:
    """Check an ONNX file against TensorRT's operator support, Q/DQ and fusion rules; errors first.

    ``tensor_ranges`` (tensor name -> max |value| observed on calibration images) adds the FP16 range check;
    ``fp32_tensors`` are tensors the engine build pins to FP32, which may exceed it.
    """
    import onnx

    path = Path(model_path)
    if not path.is_file():
        return [Finding(ERROR, "", "", "onnx-file", f"{path} does not exist")]
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a file that is not ONNX
        return [Finding(ERROR, "", "", "onnx-file", f"{path} is not an ONNX model ({type(exc).__name__})")]
    if not model.graph.node:
        return [Finding(ERROR, "", "", "onnx-file", f"{path} is not an ONNX model (no graph nodes)")]
    findings = [*_check_opset(model), *_check_io(model), *_check_order(model)]
    findings += _check_operators(model)
    malformed = _check_structure(model)
    # The Q/DQ rules read scales, zero points and weights: only a well-formed graph has them to read.
    findings += malformed or _QdqRules(model).check()
    if tensor_ranges is not None or fp32_tensors:
        findings += _check_fp16_ranges(model, tensor_ranges or {}, fp32_tensors)
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    return sorted(findings, key=lambda f: order[f.severity])


def _check_structure(model: Any) -> list[Finding]:
    """What the ONNX parser rejects before any TensorRT rule applies: Q/DQ arity, tensors that do not decode."""
    from onnx import numpy_helper

    findings = []
    for node in model.graph.node:
        wrong = (node.op_type in (Q_OP, DQ_OP) and (len(node.input) < 2 or len(node.output) != 1)) or (
            node.op_type == "Constant" and len(node.output) != 1
        )
        if wrong:
            findings.append(
                Finding(
                    ERROR,
                    node.name,
                    node.op_type,
                    "malformed-graph",
                    f"{node.op_type} with {len(node.input)} inputs and {len(node.output)} outputs: not a valid "
                    "ONNX node (TensorRT's parser rejects the model)",
                )
            )
    constants = [*model.graph.initializer]
    constants += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for tensor in constants:
        try:
            numpy_helper.to_array(tensor)
        except Exception as exc:  # noqa: BLE001  (onnx raises several types for a tensor that does not decode)
            findings.append(
                Finding(
                    ERROR,
                    tensor.name,
                    "initializer",
                    "malformed-graph",
                    f"tensor {tensor.name!r} does not decode (dtype {tensor.data_type}, dims {list(tensor.dims)}: "
                    f"{type(exc).__name__}): TensorRT's parser rejects the model",
                )
            )
    return findings


def _check_opset(model: Any) -> list[Finding]:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < 17:
        return [
            Finding(
                WARNING,
                "",
                "",
                "opset",
                f"opset {opset} has no LayerNormalization: a transformer's LayerNorm arrives decomposed "
                "(ReduceMean/Sub/Pow/Sqrt), which overflows in FP16; re-export with opset >= 17",
            )
        ]
    if opset is None or opset <= OPSETS[1]:
        return []
    return [
        Finding(
            WARNING,
            "",
            "",
            "opset",
            f"opset {opset} is outside {OPSETS[0]}-{OPSETS[1]}, the range TensorRT {TENSORRT_VERSION}'s ONNX parser "
            "documents; a newer TensorRT may parse it, or re-export with --opset 18",
        )
    ]


def _check_io(model: Any) -> list[Finding]:
    findings = []
    initializers = {i.name for i in model.graph.initializer}
    for value in [v for v in model.graph.input if v.name not in initializers]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
        dynamic = [i for i, d in enumerate(tensor.shape.dim) if not d.HasField("dim_value") or d.dim_value <= 0]
        if dynamic == [0]:
            findings.append(
                Finding(
                    INFO,
                    value.name,
                    "input",
                    "dynamic-shape",
                    f"input {value.name!r} has a dynamic batch ({'x'.join(dims)}): TensorRT needs an optimization "
                    "profile; build_engine.py sets one (--min/--opt/--max-batch) and trtexec.sh passes "
                    "--minShapes/--optShapes/--maxShapes",
                )
            )
        elif dynamic:
            findings.append(
                Finding(
                    WARNING,
                    value.name,
                    "input",
                    "dynamic-shape",
                    f"input {value.name!r} has dynamic dims {dynamic} ({'x'.join(dims)}): TensorRT needs an "
                    "optimization profile for every one; build_engine.py only profiles the batch axis, so "
                    "export with a fixed image size",
                )
            )
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == 2:
            findings.append(
                Finding(
                    INFO,
                    value.name,
                    "input" if value in model.graph.input else "output",
                    "uint8-io",
                    f"{value.name!r} is UINT8: TensorRT allows UINT8 only as a network input/output type (cast "
                    "to float inside the network), which is the case here",
                )
            )
    return findings


def _check_order(model: Any) -> list[Finding]:
    """Nodes must come after their inputs' producers (ONNX requires it; polygraphy and onnx.checker reject it)."""
    graph = model.graph
    known = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    produced = {out for node in graph.node for out in node.output}
    for node in graph.node:
        late = [i for i in node.input if i not in known and i in produced]
        if late:
            return [
                Finding(
                    WARNING,
                    node.name,
                    node.op_type,
                    "topological-order",
                    f"node reads {late[0]!r} before the node producing it: the graph is not topologically sorted "
                    "(TensorRT's parser sorts it; onnx.checker and polygraphy reject it)",
                )
            ]
        known.update(node.output)
    return []


def _check_fp16_ranges(model: Any, ranges: dict[str, float], fp32_tensors: frozenset[str] | set[str]) -> list[Finding]:
    findings = []
    known = {v.name for v in model.graph.input}
    for node in model.graph.node:
        known.update(node.output)
        for name in [o for o in node.output if o in ranges or o in fp32_tensors]:
            value = ranges.get(name)
            # `not <=` also catches NaN, which an FP16 engine would not survive either
            overflows = value is not None and not value <= FP16_MAX
            seen = "" if value is None else f"max |value| {value:.6g}"
            if name in fp32_tensors:
                fits = "" if value is None else f" ({seen}, {'above' if overflows else 'within'} FP16's {FP16_MAX:g})"
                message = f"{name!r} is pinned to FP32 in the engine build{fits}"
                findings.append(Finding(INFO, node.name, node.op_type, "fp16-overflow", message))
            elif overflows:
                message = (
                    f"{name!r} reaches {seen} on the calibration images, above FP16's {FP16_MAX:g}: an FP16 "
                    "engine makes it inf; pin it to FP32 in the engine build (fp32_tensors) or rescale it"
                )
                findings.append(Finding(ERROR, node.name, node.op_type, "fp16-overflow", message))
    # A ranges file recorded on another graph would otherwise pass silently, checking nothing.
    unknown = sorted((set(ranges) | set(fp32_tensors)) - known)
    if unknown:
        message = (
            f"{len(unknown)} tensors named in the ranges are not in this graph (e.g. {unknown[0]!r}): were they "
            "recorded on another export?"
        )
        findings.append(Finding(WARNING, "", "", "fp16-overflow", message))
    return findings


def _check_operators(model: Any) -> list[Finding]:
    supported = supported_operators()
    findings = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            findings.append(
                Finding(
                    ERROR,
                    node.name,
                    node.op_type,
                    "custom-op",
                    f"{node.domain}.{node.op_type} is not a standard ONNX op: TensorRT needs a plugin for it "
                    "(quantize without ONNX Runtime-specific fusions)",
                )
            )
        elif node.op_type not in supported:
            findings.append(
                Finding(
                    ERROR,
                    node.name,
                    node.op_type,
                    "unsupported-op",
                    f"{node.op_type} is not in TensorRT {TENSORRT_VERSION}'s ONNX operator list",
                )
            )
        elif not supported[node.op_type]:
            findings.append(
                Finding(
                    ERROR,
                    node.name,
                    node.op_type,
                    "unsupported-op",
                    f"TensorRT {TENSORRT_VERSION}'s ONNX parser does not support {node.op_type}"
                    + (
                        ": express INT8 as QuantizeLinear/DequantizeLinear around float ops (QDQ format)"
                        if node.op_type.startswith(("QLinear", "Dynamic")) or node.op_type.endswith("Integer")
                        else ""
                    ),
                )
            )
    return findings


# Which input of a consumer is its weight, and the axis holding its output channels.
def _weight_axis(consumer: Any, index: int, rank: int) -> int | None:
    attrs = {a.name: a.i for a in consumer.attribute if a.type == 2}  # INT attributes
    if consumer.op_type == "Conv" and index == 1:
        return 0
    if consumer.op_type == "ConvTranspose" and index == 1:
        return 1
    if consumer.op_type == "Gemm" and index == 1:
        return 0 if attrs.get("transB", 0) else 1
    if consumer.op_type == "MatMul" and index == 1:
        return rank - 1  # (K, N): the output columns
    return None


class _QdqRules:
    """Q/DQ checks over one graph: types, zero points, scales, per-tensor / per-channel placement, fusion."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.constants = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.to_array = numpy_helper.to_array
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, index))
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
        self.types.update({name: t.data_type for name, t in self.constants.items()})
        self.graph_nodes = list(graph.node)
        self.nodes = [n for n in self.graph_nodes if n.op_type in (Q_OP, DQ_OP)]

    def check(self) -> list[Finding]:
        findings: list[Finding] = []
        for node in self.nodes:
            findings += self._type_and_zero_point(node)
            findings += self._scale(node)
            findings += self._fusion(node)
        for node in self.graph_nodes:
            findings += self._weight_only(node)
        return findings

    def _dequantized(self, tensor: str, seen: frozenset[str] = frozenset()) -> Any | None:
        """The DequantizeLinear a tensor comes from, looking back through pass-through ops; None if float."""
        node = self.producers.get(tensor)
        if node is None or tensor in seen:
            return None
        if node.op_type == "Concat":
            found = [self._dequantized(i, seen | {tensor}) for i in node.input]
            return found[0] if found and all(found) else None
        if node.op_type in PASS_THROUGH_OPS:  # (a malformed one may have no input: then nothing to look back to)
            return self._dequantized(node.input[0], seen | {tensor}) if node.input else None
        return node if node.op_type == DQ_OP else None

    def _readers(self, tensor: str) -> list[tuple[Any, int]]:
        """(node, input index) of the ops that read a tensor, looking forward through pass-through ops."""
        found, stack, seen = [], [tensor], {tensor}
        while stack:
            for node, index in self.consumers.get(stack.pop(), []):
                if node.op_type not in PASS_THROUGH_OPS:
                    found.append((node, index))
                    continue
                stack += [o for o in node.output if o not in seen]
                seen.update(node.output)
        return found

    def _runs_int8(self, node: Any, index: int) -> bool:
        if node.op_type in INT8_OPS or node.op_type == Q_OP:  # DQ -> Q is the back-to-back rule's to judge
            return True
        if node.op_type != "Add":
            return False
        # Not in INT8_OPS, yet TensorRT fuses two Add patterns in INT8: the residual of a weighted layer
        # (Conv + Add with the DQ'd residual, as in ResNet) and an Add between DQs whose output is quantized.
        others = [t for i, t in enumerate(node.input) if i != index]
        residual = any((p := self.producers.get(t)) is not None and p.op_type in INT8_OPS for t in others)
        quantized_out = any(c.op_type == Q_OP for c, _ in self.consumers.get(node.output[0], []))
        return residual or (quantized_out and all(self._dequantized(t) for t in others))

    def _fusion(self, node: Any) -> list[Finding]:
        """Q/DQ that TensorRT cannot fuse into an INT8 layer (rule ``unfusable-qdq``)."""
        if node.op_type == Q_OP:
            source = self.producers.get(node.input[0])
            if source is None or source.op_type != DQ_OP:
                return []
            if not any(c.op_type == DQ_OP for c, _ in self.consumers.get(node.output[0], [])):
                return []
            message = (
                f"back-to-back Q/DQ: re-quantizes the output of DequantizeLinear {source.name!r} with nothing "
                "between; TensorRT has no layer to fuse that DQ -> Q into and runs it as a separate INT8 rescale, "
                "so drop one pair"
            )
            return [Finding(ERROR, node.name, node.op_type, "unfusable-qdq", message)]
        readers = self._readers(node.output[0])
        float_only = [n for n, _ in readers if n.op_type in FLOAT_ONLY_OPS]
        if float_only:
            first = float_only[0]
            message = (
                f"float-only consumer: feeds {first.op_type} {first.name!r}, which TensorRT keeps in float; "
                "the Q/DQ only adds a quantization error and a reformat (exclude it from quantization)"
            )
            return [Finding(ERROR, node.name, node.op_type, "unfusable-qdq", message)]
        if not readers or any(self._runs_int8(n, i) for n, i in readers):
            return []
        ops = ", ".join(sorted({n.op_type for n, _ in readers}))
        message = (
            f"no INT8 consumer: read only by {ops}, which TensorRT does not run in INT8; the Q/DQ only adds a "
            "quantization error and a reformat"
        )
        return [Finding(ERROR, node.name, node.op_type, "unfusable-qdq", message)]

    def _weight_only(self, node: Any) -> list[Finding]:
        """A weighted layer with a dequantized weight but a float activation (rule ``weight-only-quantized``)."""
        if node.op_type not in INT8_OPS or len(node.input) < 2:
            return []
        sources = [self._dequantized(t) for t in node.input[:2]]
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = 1 if sources[1] is not None else None
        else:  # MatMul/Gemm: the weight is the constant side; two activations are attention, not weights
            weight = next((i for i in (1, 0) if sources[i] is not None and self._is_weight(sources[i])), None)
        if weight is None or sources[1 - weight] is not None:
            return []
        message = (
            f"weight {node.input[weight]!r} is dequantized ({sources[weight].name!r}) but activation "
            f"{node.input[1 - weight]!r} has no Q->DQ: TensorRT runs the layer in float on dequantized weights, "
            "not INT8, so the artifact is not the INT8 layer it claims; quantize the activation or neither"
        )
        return [Finding(ERROR, node.name, node.op_type, "weight-only-quantized", message)]

    def _array(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else self.to_array(tensor)

    def _quantized_type(self, node: Any) -> int:
        """TensorProto element type of the quantized side of a Q or DQ node."""
        if len(node.input) > 2 and node.input[2]:
            zero = self.constants.get(node.input[2])
            if zero is not None:
                return zero.data_type
            if node.input[2] in self.types:
                return self.types[node.input[2]]
        if node.op_type == DQ_OP:
            source = node.input[0]
            if source in self.types and self.types[source]:
                return self.types[source]
            producer = self.producers.get(source)
            if producer is not None and producer.op_type == Q_OP:
                return self._quantized_type(producer)
        output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
        return output_dtype or 2  # ONNX's default without a zero point: UINT8

    def _type_and_zero_point(self, node: Any) -> list[Finding]:
        qtype = self._quantized_type(node)
        findings = []
        if qtype not in QDQ_TYPES:
            name = TYPE_NAMES.get(qtype, f"type {qtype}")
            if qtype == 2:
                why = (
                    "UINT8 Q/DQ is not supported: quantize activations as symmetric INT8 (TensorRT accepts UINT8 "
                    "only as a network input/output type, never inside the network)"
                )
            elif qtype == 6:
                why = "INT32 DequantizeLinear (a quantized bias) is not supported: keep biases in float"
            else:
                why = f"{name} Q/DQ is not supported (TensorRT takes INT8, FP8 or INT4)"
            findings.append(Finding(ERROR, node.name, node.op_type, "qdq-type", f"{name}: {why}"))
        if len(node.input) > 2 and node.input[2]:
            zero = self._array(node.input[2])
            if zero is None:
                findings.append(
                    Finding(
                        ERROR,
                        node.name,
                        node.op_type,
                        "qdq-zero-point",
                        f"zero point {node.input[2]!r} is not a constant: TensorRT needs it at build time (and 0)",
                    )
                )
            elif np.any(zero.astype(np.float64) != 0):
                values = np.unique(zero).tolist()[:4]
                findings.append(
                    Finding(
                        ERROR,
                        node.name,
                        node.op_type,
                        "qdq-zero-point",
                        f"zero point {values} is not 0: TensorRT supports symmetric quantization only "
                        "(quantize with activation_symmetric=True)",
                    )
                )
        return findings

    def _is_weight(self, node: Any) -> bool:
        """A Q/DQ on a constant: an initializer DQ, or the Q -> DQ pair of a float weight."""
        source = node.input[0]
        if source in self.constants:
            return True
        producer = self.producers.get(source)
        return node.op_type == DQ_OP and producer is not None and producer.op_type == Q_OP and self._is_weight(producer)

    def _scale(self, node: Any) -> list[Finding]:
        scale = self._array(node.input[1])
        if scale is None:
            return [
                Finding(
                    ERROR,
                    node.name,
                    node.op_type,
                    "qdq-scale",
                    f"scale {node.input[1]!r} is not a constant: TensorRT needs Q/DQ scales at build time",
                )
            ]
        findings = []
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            findings.append(
                Finding(ERROR, node.name, node.op_type, "qdq-scale", "scale has zero, negative or non-finite values")
            )
        if not self._is_weight(node):
            if scale.size != 1:
                findings.append(
                    Finding(
                        ERROR,
                        node.name,
                        node.op_type,
                        "activation-per-tensor",
                        f"activation scale has {scale.size} values: TensorRT quantizes activations per tensor only",
                    )
                )
            return findings
        if node.op_type == DQ_OP:
            findings += self._weight_axis(node, scale)
        return findings

    def _weight_axis(self, node: Any, scale: np.ndarray) -> list[Finding]:
        weight = self._array(node.input[0])
        if weight is None:  # a float weight behind its own Q
            weight = self._array(self.producers[node.input[0]].input[0])
        rank = weight.ndim
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        axis = axis + rank if axis < 0 else axis
        findings = []
        for consumer, index in self.consumers.get(node.output[0], []):
            expected = _weight_axis(consumer, index, rank)
            if expected is None:
                continue
            where = f"weight of {consumer.op_type} {consumer.name!r}"
            if scale.size == 1:
                findings.append(
                    Finding(
                        ERROR,
                        node.name,
                        node.op_type,
                        "weight-per-channel",
                        f"per-tensor scale on the {where}: per-channel scales on axis {expected} "
                        f"({weight.shape[expected]} output channels) are required",
                    )
                )
            elif axis != expected or scale.size != weight.shape[expected]:
                findings.append(
                    Finding(
                        ERROR,
                        node.name,
                        node.op_type,
                        "weight-per-channel",
                        f"per-channel scale on axis {axis} ({scale.size} values) for the {where}: its output "
                        f"channels are axis {expected} ({weight.shape[expected]} values)",
                    )
                )
        return findings
