"""Run an ONNX graph in TensorRT's FP16 arithmetic on the CPU, op by op in PyTorch.

onnxruntime's CPU provider is no FP16 emulator: it computes most float16 ops in float32 and its graph
optimizer removes the casts that would round and overflow. This interpreter gives every tensor the
storage TensorRT gives it in a network built with the FP16 (and INT8) flag:

* every float tensor between two ops is rounded to FP16 (beyond 65504 it becomes inf, below 6.1e-5 it
  goes subnormal or to 0), float weights included;
* each op computes in FP32 on those FP16 values and rounds its result: what FP16 kernels with FP32
  accumulation give (TensorRT's GEMM/convolution tactics accumulate in FP32 or wider);
* QuantizeLinear / DequantizeLinear run their INT8 math exactly (round half to even, saturate) with
  FP32 scales and weights quantized from FP32, so the quantized layers see the values the INT8 kernels
  see (fake quantization);
* nodes pinned to FP32 (``fp32_nodes``: what the engine build pins with layer precision constraints)
  read their inputs in FP32 and keep an FP32 output.

The interpreter covers the ops t2tedge's exports contain and refuses others with one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from t2tedge.emulation.ranges import TensorRange, summarize_ranges
from t2tedge.errors import T2tedgeError

ARITHMETIC = (
    "FP16 storage: every float tensor between ops (weights included) rounded to FP16, overflow to inf; "
    "each op computed in FP32 on those values (FP16 kernels with FP32 accumulation); Q/DQ in exact INT8 math"
)
_FLOAT_TYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
_INT_TYPES = {2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64, 9: torch.bool}


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _tensor(proto: Any) -> torch.Tensor:
    from onnx import numpy_helper

    return torch.from_numpy(np.array(numpy_helper.to_array(proto)))


def _axes(value: torch.Tensor | None, attrs: dict[str, Any]) -> list[int] | None:
    if value is not None:
        return [int(a) for a in value.reshape(-1).tolist()]
    axes = attrs.get("axes")
    return [int(a) for a in axes] if axes is not None else None


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def op(attrs: dict[str, Any], x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = _axes(axes, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not dims:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.ndim))
        return fn(x, dims, keep)

    return op


def _conv(attrs: dict[str, Any], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    pads = list(attrs.get("pads", [0] * (2 * (x.ndim - 2))))
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    if begin != end:  # asymmetric padding: pad explicitly (F.pad takes the last dim first)
        x = F.pad(x, [p for pair in zip(reversed(begin), reversed(end), strict=True) for p in pair])
        begin = [0] * half
    return F.conv2d(
        x,
        w,
        b,
        stride=attrs.get("strides", 1),
        padding=begin,
        dilation=attrs.get("dilations", 1),
        groups=attrs.get("group", 1),
    )


def _gemm(attrs: dict[str, Any], a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out + attrs.get("beta", 1.0) * c if c is not None else out


def _layer_norm(
    attrs: dict[str, Any], x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    axis = attrs.get("axis", -1) % x.ndim
    return F.layer_norm(x, x.shape[axis:], scale, bias, eps=attrs.get("epsilon", 1e-5))


def _slice(
    _attrs: dict[str, Any],
    x: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    axes: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    axes_list = axes.tolist() if axes is not None else list(range(len(starts)))
    steps_list = steps.tolist() if steps is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes_list, steps_list, strict=True):
        if step != 1:
            raise T2tedgeError(f"the FP16 emulator supports Slice with step 1 only, not {step}")
        size = x.shape[axis]
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        index[axis] = slice(start, end)
    return x[tuple(index)]


def _split(attrs: dict[str, Any], x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    axis = attrs.get("axis", 0)
    if split is not None:
        return torch.split(x, split.tolist(), dim=axis)
    sizes = attrs.get("split")
    if sizes is not None:
        return torch.split(x, list(sizes), dim=axis)
    parts = attrs["num_outputs"]
    return torch.split(x, -(-x.shape[axis] // parts), dim=axis)


def _reshape(attrs: dict[str, Any], x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = shape.tolist()
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _pad(
    attrs: dict[str, Any],
    x: torch.Tensor,
    pads: torch.Tensor,
    value: torch.Tensor | None = None,
    axes: torch.Tensor | None = None,
) -> torch.Tensor:
    if attrs.get("mode", b"constant") not in (b"constant", "constant"):
        raise T2tedgeError(f"the FP16 emulator supports constant Pad only, not {attrs['mode']!r}")
    axes_list = [a % x.ndim for a in axes.tolist()] if axes is not None else list(range(x.ndim))
    amounts = pads.tolist()
    half = len(amounts) // 2
    torch_pads: list[int] = []
    for axis in reversed(range(x.ndim)):  # F.pad wants (last begin, last end, previous begin, ...)
        if axis in axes_list:
            i = axes_list.index(axis)
            torch_pads += [amounts[i], amounts[i + half]]
        else:
            torch_pads += [0, 0]
    return F.pad(x, torch_pads, value=float(value) if value is not None and value.numel() else 0.0)


def _quantize(_attrs: dict[str, Any], x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None):
    dtype = zero.dtype if zero is not None else torch.uint8
    info = torch.iinfo(dtype)
    scale, zero_f = _per_axis(_attrs, x, scale), _per_axis(_attrs, x, zero) if zero is not None else 0
    q = torch.round(x.float() / scale.float()) + zero_f  # torch.round is round half to even, as ONNX
    return q.clamp(info.min, info.max).to(dtype)


def _dequantize(_attrs: dict[str, Any], x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None):
    zero_f = _per_axis(_attrs, x, zero).float() if zero is not None else 0.0
    return (x.float() - zero_f) * _per_axis(_attrs, x, scale).float()


def _per_axis(attrs: dict[str, Any], x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if param.ndim == 0 or param.numel() == 1:
        return param.reshape(())
    shape = [1] * x.ndim
    shape[attrs.get("axis", 1) % x.ndim] = -1
    return param.reshape(shape)


def _clip(_attrs: dict[str, Any], x: torch.Tensor, low: torch.Tensor | None = None, high: torch.Tensor | None = None):
    return x.clamp(
        min=float(low) if low is not None and low.numel() else None,
        max=float(high) if high is not None and high.numel() else None,
    )


def _hard_sigmoid(attrs: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    return (attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5)).clamp(0.0, 1.0)


def _squeeze(attrs: dict[str, Any], x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    dims = _axes(axes, attrs)
    return x.squeeze() if dims is None else x.squeeze(tuple(d % x.ndim for d in dims))


def _unsqueeze(attrs: dict[str, Any], x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    dims = _axes(axes, attrs) or []
    rank = x.ndim + len(dims)
    for axis in sorted(d % rank for d in dims):
        x = x.unsqueeze(axis)
    return x


def _gather(attrs: dict[str, Any], x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = attrs.get("axis", 0) % x.ndim
    flat = indices.reshape(-1).long() % x.shape[axis]  # negative indices count from the end
    return torch.index_select(x, axis, flat).reshape([*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]])


def _div(_attrs: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point() or y.is_floating_point():
        return x / y
    return torch.div(x, y, rounding_mode="trunc")  # integer Div (shape arithmetic) truncates


def _cast(attrs: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    to = attrs["to"]
    if to in _FLOAT_TYPES:
        return x.float()  # float casts keep the node's float storage (FP16 unless pinned)
    return x.to(_INT_TYPES[to])


OPS: dict[str, Callable[..., Any]] = {
    "Add": lambda _a, x, y: x + y,
    "Sub": lambda _a, x, y: x - y,
    "Mul": lambda _a, x, y: x * y,
    "Div": _div,
    "Pow": lambda _a, x, y: torch.pow(x, y),
    "Neg": lambda _a, x: -x,
    "Sqrt": lambda _a, x: torch.sqrt(x),
    "Exp": lambda _a, x: torch.exp(x),
    "Erf": lambda _a, x: torch.erf(x),
    "Tanh": lambda _a, x: torch.tanh(x),
    "Sigmoid": lambda _a, x: torch.sigmoid(x),
    "Relu": lambda _a, x: torch.relu(x),
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda _a, x: x * (x / 6 + 0.5).clamp(0.0, 1.0),
    "Identity": lambda _a, x: x,
    "MatMul": lambda _a, x, y: torch.matmul(x, y),
    "Gemm": _gemm,
    "Conv": _conv,
    "LayerNormalization": _layer_norm,
    "Softmax": lambda a, x: torch.softmax(x, dim=a.get("axis", -1)),
    "ReduceMax": _reduce(lambda x, dims, keep: x.amax(dim=dims, keepdim=keep)),
    "ReduceMean": _reduce(lambda x, dims, keep: x.mean(dim=dims, keepdim=keep)),
    "ReduceSum": _reduce(lambda x, dims, keep: x.sum(dim=dims, keepdim=keep)),
    "GlobalAveragePool": lambda _a, x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "Flatten": lambda a, x: x.reshape(int(np.prod(x.shape[: a.get("axis", 1)])), -1),
    "Reshape": _reshape,
    "Transpose": lambda a, x: x.permute(a["perm"]) if "perm" in a else x.permute(*reversed(range(x.ndim))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Pad": _pad,
    "Shape": lambda _a, x: torch.tensor(x.shape, dtype=torch.int64),
    "Cast": _cast,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
}


class GraphEmulator:
    """An ONNX graph run in FP16 storage (see the module docstring); NCHW float32 images in, logits out.

    ``float_dtype=torch.float32`` runs the same interpreter without rounding, which the range check
    uses to see the values a tensor would need before FP16 clips them.
    """

    def __init__(
        self,
        path: str | Path,
        fp32_nodes: Iterable[str] = (),
        float_dtype: torch.dtype = torch.float16,
        threads: int = 1,
    ) -> None:
        import onnx

        # One intra-op thread by default: the graph runs as many small ops, where OpenMP's spinning
        # workers cost far more than they give (20x slower with 2 threads on 2 busy cores, measured).
        self.threads = threads

        model = onnx.load(str(path))
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - set(OPS))
        if unsupported:
            raise T2tedgeError(f"{path}: the FP16 emulator does not implement {', '.join(unsupported)}")
        self.path = Path(path)
        self.nodes = list(graph.node)
        self.attrs = [_attrs(n) for n in self.nodes]
        self.constants: dict[str, torch.Tensor] = {i.name: _tensor(i) for i in graph.initializer}
        for node, attrs in zip(self.nodes, self.attrs, strict=True):
            if node.op_type == "Constant":
                self.constants[node.output[0]] = _tensor(attrs["value"])
        graph_input = next(i for i in graph.input if i.name not in self.constants)
        self.input_name = graph_input.name
        batch_dim = graph_input.type.tensor_type.shape.dim[0]
        # a fixed-batch export (batch 1 by default) bakes the batch into its Reshapes: run it chunk by chunk
        self.fixed_batch: int | None = batch_dim.dim_value if batch_dim.HasField("dim_value") else None
        self.output_name = graph.output[0].name
        self.fp32_nodes = frozenset(fp32_nodes)
        unknown = self.fp32_nodes - {n.name for n in self.nodes}
        if unknown:
            raise T2tedgeError(f"{path}: no node named {sorted(unknown)[0]!r} to pin to FP32")
        self.float_dtype = float_dtype
        # weights as an FP16 layer holds them, rounded once
        self.stored_constants = {
            name: value.to(float_dtype).float() if value.is_floating_point() else value
            for name, value in self.constants.items()
        }
        self.arithmetic = ARITHMETIC if float_dtype == torch.float16 else f"{float_dtype} throughout"

    def run(self, images: np.ndarray, observe: Callable[[Any, str, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run images; ``observe(node, tensor_name, fp32_value)`` sees every float result before rounding."""
        step = self.fixed_batch or len(images)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            if step <= 0 or len(images) <= step:
                return self._run(images, observe)
            return torch.cat([self._run(images[i : i + step], observe) for i in range(0, len(images), step)])
        finally:
            torch.set_num_threads(previous)

    def _run(self, images: np.ndarray, observe: Callable[[Any, str, torch.Tensor], None] | None = None) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        values[self.input_name] = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        with torch.no_grad():
            for node, attrs in zip(self.nodes, self.attrs, strict=True):
                if node.op_type == "Constant":
                    continue
                pinned = node.name in self.fp32_nodes
                storage = torch.float32 if pinned else self.float_dtype
                # TensorRT keeps Q/DQ scales and quantizes weights in FP32 at build time: their constants are exact
                exact = pinned or node.op_type in ("QuantizeLinear", "DequantizeLinear")
                constants = self.constants if exact else self.stored_constants
                args = [
                    (constants[name] if name in constants else self._read(values, name, storage)) if name else None
                    for name in node.input
                ]
                out = OPS[node.op_type](attrs, *args)
                outs = out if isinstance(out, tuple | list) else (out,)
                for name, value in zip(node.output, outs, strict=False):
                    if value.is_floating_point():
                        if observe is not None:
                            observe(node, name, value)
                        value = value.to(storage)
                    values[name] = value
        return values[self.output_name].float()

    @staticmethod
    def _read(values: dict[str, torch.Tensor], name: str, storage: torch.dtype) -> torch.Tensor:
        # A float input is held (FP16 weights, FP16 activations) in the node's storage; the op computes in FP32.
        value = values[name]
        return value.to(storage).float() if value.is_floating_point() else value

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run(images).numpy()


@dataclass
class RangeCheck:
    """The FP16 range check of one graph: every float tensor's range and the nodes that must run in FP32."""

    ranges: dict[str, TensorRange]
    record: dict[str, Any]
    # the producers of tensors beyond FP16's range and every node that reads such a tensor
    fp32_nodes: list[str]
    # the float outputs of those nodes: what an engine build pins to FP32 (TensorRT names layers' outputs so)
    fp32_tensors: list[str]

    def ranges_json(self) -> dict[str, Any]:
        """The ranges in the format ``t2tedge tensorrt-lint --ranges`` reads."""
        return {
            "tensors": {name: r.to_dict() for name, r in self.ranges.items()},
            "fp32_tensors": self.fp32_tensors,
            "images": self.record["images"],
        }


def fp16_range_check(
    path: str | Path, images: np.ndarray, batch_size: int = 32, fp32_nodes: Sequence[str] = ()
) -> RangeCheck:
    """Ranges of every float tensor of a graph on ``images``, computed in FP32 (what FP16 would have to hold)."""
    emulator = GraphEmulator(path, fp32_nodes, float_dtype=torch.float32)
    ranges: dict[str, TensorRange] = {}
    consumers: dict[str, list[str]] = {}
    for node in emulator.nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)

    def observe(node: Any, name: str, value: torch.Tensor) -> None:
        if name not in ranges:
            ranges[name] = TensorRange(name, node.name, node.op_type)
        ranges[name].update(value)

    for start in range(0, len(images), batch_size):
        emulator.run(images[start : start + batch_size], observe)
    pinned: list[str] = []
    for r in ranges.values():
        if r.overflows:
            pinned += [r.producer, *consumers.get(r.name, [])]
    pinned = sorted(dict.fromkeys(pinned))
    wanted = set(pinned)
    tensors = [name for name, r in ranges.items() if r.producer in wanted]
    return RangeCheck(ranges, summarize_ranges(ranges, len(images)), pinned, tensors)
