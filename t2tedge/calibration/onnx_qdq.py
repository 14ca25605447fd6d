"""Static INT8 quantization of an ONNX graph into QDQ form, shared by every target whose artifact is Q/DQ ONNX.

Built on `onnxruntime.quantization`, with the calibrate and quantize steps split apart so that

- calibration data is fed in chunks sized by memory (ORT's histogram calibrater otherwise keeps every
  intermediate output of every image before histogramming: 7 GB for 32 images of T2T-ViT at 224 px);
- entropy calibration really searches a threshold (ORT's defaults, 128 bins and 128 quantized bins, leave
  one candidate: the min-max range); we run the TensorRT-style KL search over a 2048-bin |x| histogram;
- the calibrated ranges are reused by every quantize call, e.g. per-node sensitivity trials that keep one
  node in FP32 without calibrating again.

ONNX Runtime on x86 runs U8S8 (uint8 activations, int8 weights) fastest; TensorRT wants symmetric int8
activations (zero point 0). Both are settings of :class:`QdqSettings`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from t2tedge.progress import track

METHODS = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES = ("uint8", "int8")
DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")
Q_OP, DQ_OP = "QuantizeLinear", "DequantizeLinear"
# How ONNX Runtime must run a QDQ graph for its MatMuls to run in INT8: its level-1 MatMulAddFusion turns
# DQ -> MatMul -> Add(bias) into a float Gemm before the level-2 QDQ fusions run, so the weights are
# dequantized on every inference and multiplied in FP32. T2T-ViT-7 at 224 px: 30 of 41 quantized MatMuls
# were lost that way (float Gemm + DequantizeLinear, slower than the FP32 model); with the fusion off all 41
# run as MatMulIntegerToFloat. Recorded in the artifact (``build.session_config``) and applied by its loader.
QDQ_SESSION_CONFIG = {"optimization.disable_specified_optimizers": "MatMulAddFusion"}


@dataclass(frozen=True)
class QdqSettings:
    """How to calibrate and quantize. Weights are always int8, symmetric (zero point 0)."""

    method: str = "minmax"
    percentile: float = 99.999
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    activation_type: str = "uint8"
    # TensorRT: True (zero point 0); ORT CPU: False (asymmetric uint8 uses all 256 levels)
    activation_symmetric: bool = False
    per_channel: bool = True
    # 7-bit weights: x86 CPUs without VNNI (AVX2, AVX-512F) multiply U8S8 with vpmaddubsw, whose int16 pair
    # sums saturate for full-range weights (255 * 127 * 2 > 32767); VNNI, AMX, ARM and TensorRT do not.
    reduce_range: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    # No Q/DQ on the inputs of these ops, whatever their neighbours are: ORT fuses DQ -> Softmax -> Q into
    # QLinearSoftmax, slow for the large token attention and a loss of accuracy everywhere.
    fp32_op_types: tuple[str, ...] = ("Softmax",)
    # Float ops that share a quantized op's input read the float tensor in front of its Q -> DQ pair, not the
    # dequantized copy (T2T-ViT's Performer squares k and q for their norms beside k @ w and q @ w: on the
    # dequantized copy ORT runs a DequantizeLinear of each 3136 x 64 token tensor first, and the norms carry
    # the rounding). Only pairs that quantize an op's input: an output pair (Conv -> Q -> DQ -> Add) stays,
    # since a float reader of the Conv's own output would stop ORT fusing it into QLinearConv.
    float_readers_read_float: bool = False
    # MatMuls whose two inputs are both activations (attention scores, attention x values, the Performer
    # feature products of the T2T module) stay FP32 unless this is set: quantizing them drops a T2T-ViT-7
    # trained on Fashion-MNIST (64 px) from 82 to 62 % top-1, and they buy no measurable speed at 224 px.
    activation_matmuls: bool = False
    # With asymmetric activations a Relu/Clip right after a quantized op is folded into that op's output
    # range and removed (MobileNetV2 at 224 px: 12 ms instead of 18 ms with the Clip left in FP32).
    fused_activation_types: tuple[str, ...] = ("Relu", "Clip")
    # Leave MatMul/Gemm outputs float: DQ -> MatMul runs as MatMulIntegerToFloat and DQ -> Gemm as QGemm
    # with a float output, no requantize step before the FP32 bias Add, LayerNorm or Softmax; measured as
    # fast as quantized outputs and as accurate, with a third fewer Q/DQ nodes. Conv keeps its quantized
    # output (QLinearConv needs it).
    no_output_quantization_op_types: tuple[str, ...] = ("MatMul", "Gemm")
    # Linear layers on token tensors export as MatMul + Add(bias). Written as Reshape -> Gemm(bias) -> Reshape
    # before calibration (same function, same node name), ORT runs DQ -> Gemm as one QGemm with the int32
    # bias added in its output step, where DQ -> MatMul becomes MatMulIntegerToFloat followed by a float
    # Add over the whole output (T2T-ViT-7: 30 such Adds, ~1.5 ms of ~19 ms at 224 px). Only where MatMuls
    # are quantized at all (op_types), so "MatMuls float" keeps meaning every Linear layer.
    linear_as_gemm: bool = False
    # Histogram calibration: bins over |x| (TensorRT uses 2048) and the levels a threshold is judged by
    # (128 per side of zero for int8).
    num_bins: int = 2048
    num_quantized_bins: int = 128
    # Calibration feeds this many MB of calibrated activations at a time to the histogram collector.
    chunk_mb: int = 256
    preprocess: bool = True
    extra_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ValueError(f"activation_type must be uint8 or int8, not {self.activation_type!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], not {self.percentile}")
        if self.num_quantized_bins >= self.num_bins:
            raise ValueError("num_quantized_bins must be smaller than num_bins")

    @property
    def quantizer_op_types(self) -> list[str]:
        """Op types handed to ORT's calibrator and quantizer."""
        fused = () if self.activation_symmetric else self.fused_activation_types
        return [*self.op_types, *(t for t in fused if t not in self.op_types)]

    def describe(self) -> dict[str, Any]:
        """The settings as manifest facts (method parameters only where they apply)."""
        facts = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        facts["weight_type"] = "int8"
        facts["weight_symmetric"] = True
        facts["format"] = "QDQ"
        if self.method != "percentile":
            facts.pop("percentile")
        if self.method == "minmax":
            facts.pop("num_bins")
            facts.pop("num_quantized_bins")
        return facts


@dataclass
class CalibratedModel:
    """A pre-processed model and its calibrated activation ranges, ready to be quantized any number of times."""

    model_path: Path
    settings: QdqSettings
    ranges: Any  # onnxruntime.quantization.calibrate.TensorsData
    facts: dict[str, Any]

    def excluded(self) -> list[str]:
        """Nodes of the allowed op types kept FP32 by the settings: named ones, then activation MatMuls."""
        model = onnx.load(self.model_path, load_external_data=False)
        # a name from the exported graph also matches the node pre-processing fused it into ("name/Fusion")
        wanted = set(self.settings.nodes_to_exclude)
        named = [n.name for n in model.graph.node if n.name in wanted or n.name.split("/")[0] in wanted]
        return named + [n for n in _activation_matmuls(model, self.settings) if n not in named]

    def candidates(self) -> list[onnx.NodeProto]:
        """Nodes the quantizer will quantize (op type allowed, not excluded), in graph order."""
        excluded = set(self.excluded())
        model = onnx.load(self.model_path, load_external_data=False)
        return [n for n in model.graph.node if n.op_type in self.settings.op_types and n.name not in excluded]

    def quantize(
        self, model_out: Path, keep_fp32: Sequence[str] = (), keep_removable_activations: bool = False
    ) -> dict[str, Any]:
        """Write the QDQ model; nodes named in ``keep_fp32`` stay FP32 (on top of the settings' exclusions).

        ``keep_removable_activations`` leaves Relu/Clip in the graph instead of folding them into the
        preceding Q/DQ pair, so that :func:`with_fp32_nodes` can bypass pairs without losing them.
        """
        started = time.perf_counter()
        excluded = self.excluded()
        extra = [n for n in keep_fp32 if n not in excluded]
        settings = self.settings
        if keep_removable_activations:
            settings = replace(settings, extra_options={**settings.extra_options, "QDQKeepRemovableActivations": True})
        _quantize_with_ranges(self.model_path, Path(model_out), self.ranges, settings, [*excluded, *extra])
        return {
            **qdq_structure(Path(model_out), self.settings.op_types),
            "nodes_excluded": [*excluded, *extra],
            "quantize_seconds": round(time.perf_counter() - started, 2),
        }


def quantize_qdq(model_in: Path, model_out: Path, calibration: np.ndarray, settings: QdqSettings) -> dict[str, Any]:
    """Calibrate ``model_in`` on ``calibration`` (N, C, H, W float32) and write the QDQ model to ``model_out``.

    Temporary files live in a temporary directory, never next to ``model_out``. Returns manifest facts.
    """
    with tempfile.TemporaryDirectory(prefix="t2tedge-qdq-") as tmp:
        calibrated = calibrate(Path(model_in), calibration, settings, Path(tmp))
        facts = calibrated.quantize(Path(model_out))
    return {**calibrated.facts, **facts}


def calibrate(model_in: Path, calibration: np.ndarray, settings: QdqSettings, work_dir: Path) -> CalibratedModel:
    """Pre-process the model into ``work_dir`` and compute activation ranges with the settings' method."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    model_path = work_dir / "model.onnx"
    skipped = _preprocess(Path(model_in), model_path) if settings.preprocess else "off in the settings"
    preprocessed = skipped is None
    if not preprocessed:
        onnx.save(onnx.load(model_in), model_path)
    rewritten = 0
    if settings.linear_as_gemm and "MatMul" in settings.op_types:
        model = onnx.load(model_path)
        rewritten = linears_as_gemm(model)
        onnx.save(model, model_path)
    calibrator = _create_calibrator(model_path, settings, work_dir / "augmented.onnx")
    batch = _model_batch(calibrator)
    # Histograms copy each chunk's outputs about three times; min/max only keeps reductions.
    chunk = max(1, int(settings.chunk_mb * 2**20 // (3 * _bytes_per_image(calibrator))))
    if settings.method == "minmax":
        chunk = max(chunk, 64)
    chunk = -(-chunk // batch) * batch
    starts = range(0, len(calibration) - batch + 1, chunk)
    if not starts:
        raise ValueError(f"calibration needs at least {batch} images (the model's batch size)")
    with quiet_ort():
        for start in track(starts, f"calibrating ({settings.method})", total=len(starts)):
            calibrator.collect_data(_Reader(calibrator, calibration[start : start + chunk], batch))
        if settings.method == "entropy":
            thresholds = {}
            for name, histogram in calibrator.collector.histogram_dict.items():
                low, high = _entropy_range(histogram, settings)
                thresholds[name] = TensorData(lowest=low, highest=high)
            ranges = TensorsData(CalibrationMethod.Entropy, thresholds)
        else:
            ranges = calibrator.compute_data()
    tensors = len(ranges.data)
    del calibrator
    facts = {
        "calibration": {
            "method": settings.method,
            **({"percentile": settings.percentile} if settings.method == "percentile" else {}),
            **(
                {"num_bins": settings.num_bins, "num_quantized_bins": settings.num_quantized_bins}
                if settings.method != "minmax"
                else {}
            ),
            "images": int(len(calibration)),
            "chunk_images": int(min(chunk, len(calibration))),
            "tensors": tensors,
            "seconds": round(time.perf_counter() - started, 2),
        },
        "preprocessed": preprocessed if preprocessed else f"no: {skipped}",
        **({"linears_as_gemm": rewritten} if settings.linear_as_gemm else {}),
        "settings": settings.describe(),
    }
    return CalibratedModel(model_path, settings, ranges, facts)


def qdq_structure(model_path: Path, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> dict[str, Any]:
    """Counts that describe a QDQ graph: Q/DQ nodes, quantized nodes per op type, size.

    A node of ``op_types`` reading a dequantized tensor is quantized; other nodes reading one (a float
    op sharing a quantized MatMul's input, say) are counted apart, since they compute in FP32.
    """
    model = onnx.load(model_path, load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    ops = Counter(node.op_type for node in model.graph.node)
    quantized: Counter[str] = Counter()
    float_readers: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type not in (Q_OP, DQ_OP) and any(
            producers.get(i) is not None and producers[i].op_type == DQ_OP for i in node.input
        ):
            (quantized if node.op_type in op_types else float_readers)[node.op_type] += 1
    return {
        "quantize_linear_nodes": ops.get(Q_OP, 0),
        "dequantize_linear_nodes": ops.get(DQ_OP, 0),
        "quantized_nodes": dict(sorted(quantized.items())),
        "fp32_nodes_reading_dequantized": dict(sorted(float_readers.items())),
        "model_bytes": model_path.stat().st_size,
    }


def linears_as_gemm(model: onnx.ModelProto) -> int:
    """Rewrite each Linear layer exported as MatMul(x, W) + Add(b) (W a constant [K, N], b a constant [N],
    x of rank >= 2 with static dims past the batch) as Reshape(x, [-1, K]) -> Gemm(., W, b) ->
    Reshape(., [-1, ..., N]), in place; the Gemm keeps the MatMul's name. Returns how many were rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    constants = {init.name: init for init in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    nodes: list[onnx.NodeProto] = []
    folded: set[str] = set()  # output names of the bias Adds taken into a Gemm
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in folded:
            continue
        add, bias = _bias_add(node, constants, readers, outputs)
        shape = shapes.get(node.input[0]) if add is not None else None
        if add is None or not shape or len(shape) < 2 or not all(shape[1:]):
            nodes.append(node)
            continue
        k, n = constants[node.input[1]].dims
        rows, out, rows_shape, tokens_shape = (f"{node.name}/{s}" for s in ("rows", "gemm", "rows_shape", "out_shape"))
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([-1, k], np.int64), rows_shape),
                numpy_helper.from_array(np.array([-1, *shape[1:-1], n], np.int64), tokens_shape),
            ]
        )
        if len(readers[bias]) > 1:
            # the exporter shares equal constants (zero biases of LayerNorms and Linears): the quantizer turns a
            # Gemm's bias into int32 + DequantizeLinear, which its other readers must not read
            copy = graph.initializer.add()
            copy.CopyFrom(constants[bias])
            copy.name = bias = f"{node.name}/bias"
        nodes += [
            helper.make_node("Reshape", [node.input[0], rows_shape], [rows], name=f"{node.name}/to_rows"),
            helper.make_node("Gemm", [rows, node.input[1], bias], [out], name=node.name),
            helper.make_node("Reshape", [out, tokens_shape], [add.output[0]], name=f"{node.name}/from_rows"),
        ]
        for prop in node.metadata_props:  # the module scope travels with the name (scopes.module_nodes)
            nodes[-2].metadata_props.add().CopyFrom(prop)
        folded.add(add.output[0])
    del graph.node[:]
    graph.node.extend(nodes)
    return len(folded)


def _bias_add(
    node: onnx.NodeProto,
    constants: dict[str, onnx.TensorProto],
    readers: dict[str, list[onnx.NodeProto]],
    outputs: set[str],
) -> tuple[onnx.NodeProto | None, str]:
    """The Add that alone reads a MatMul by a constant 2-D weight [K, N], and its bias, when that is a
    constant [N]; (None, "") otherwise."""
    if node.op_type != "MatMul" or node.input[1] not in constants or len(constants[node.input[1]].dims) != 2:
        return None, ""
    users = readers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in outputs:
        return None, ""
    add = users[0]
    bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    n = constants[node.input[1]].dims[1]
    return (add, bias) if bias in constants and list(constants[bias].dims) == [n] else (None, "")


# --- calibration -------------------------------------------------------------------------------------


def _preprocess(model_in: Path, model_out: Path) -> str | None:
    """ORT's quantization pre-processing (shape inference + graph optimization); why it was skipped, or None.

    It is optional: the graph is quantized as exported when it fails. It fails on every T2T-ViT export:
    ORT's symbolic shape inference gives no shape to an opset-18 ReduceMax (axes as an input), the
    Performer's shifts. The build facts say so (``preprocessed``); a warning on every build would only
    be noise.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet_ort():
            quant_pre_process(model_in, model_out)
    except Exception as exc:  # a failed optional step must not fail the build
        reason = f"ORT's quantization pre-processing failed ({type(exc).__name__}: {exc})"
        logging.getLogger(__name__).info("%s; quantizing the graph as exported", reason)
        return reason
    return None


def _create_calibrator(model_path: Path, settings: QdqSettings, augmented: Path):
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

    op_types = settings.quantizer_op_types
    if settings.method == "minmax":
        calibrator = MinMaxCalibrater(
            model_path, op_types, augmented_model_path=str(augmented), symmetric=settings.activation_symmetric
        )
    elif settings.method == "percentile":
        calibrator = PercentileCalibrater(
            model_path,
            op_types,
            augmented_model_path=str(augmented),
            symmetric=settings.activation_symmetric,
            num_bins=settings.num_bins,
            percentile=settings.percentile,
        )
    else:
        # A signed histogram, symmetric around zero: folded into |x| it has num_bins bins per side.
        calibrator = EntropyCalibrater(
            model_path,
            op_types,
            augmented_model_path=str(augmented),
            num_bins=2 * settings.num_bins,
            num_quantized_bins=settings.num_quantized_bins,
        )
    calibrator.augment_graph()
    calibrator.create_inference_session()
    return calibrator


def _model_batch(calibrator: Any) -> int:
    """The model's fixed batch size (1 when the batch axis is dynamic)."""
    size = calibrator.infer_session.get_inputs()[0].shape[0]
    return size if isinstance(size, int) and size > 0 else 1


def _bytes_per_image(calibrator: Any) -> int:
    """Bytes of calibrated activations one image produces (from the inferred shapes)."""
    total = 0
    for output in calibrator.infer_session.get_outputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in output.shape]
        total += int(np.prod(dims, dtype=np.int64)) * 4
    return max(total // _model_batch(calibrator), 1)


class _Reader:
    """CalibrationDataReader over one chunk of images, ``batch`` images per run (a trailing rest is dropped)."""

    def __init__(self, calibrator: Any, images: np.ndarray, batch: int) -> None:
        self.name = calibrator.infer_session.get_inputs()[0].name
        self.batches = iter([images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        images = next(self.batches, None)
        return None if images is None else {self.name: np.ascontiguousarray(images, dtype=np.float32)}


def _entropy_range(histogram: tuple, settings: QdqSettings) -> tuple[np.float32, np.float32]:
    """Range whose |x| threshold minimises KL(P || Q) between the |x| histogram and its quantized form.

    ``histogram`` is ORT's (counts, edges, min, max, threshold) over [-t, t], an even number of bins
    symmetric around zero. Non-negative tensors with asymmetric (uint8) activations get twice the levels.
    """
    counts, edges, low, high = histogram[0], histogram[1], histogram[2], histogram[3]
    half = len(counts) // 2
    magnitude, magnitude_edges = counts[half:] + counts[:half][::-1], edges[half:]
    # ORT widens a histogram at its first bin width when a later chunk reaches further (to 10^5 bins on
    # Performer features); merge bins back to at most num_bins, which also bounds the O(bins^2) search.
    factor = -(-len(magnitude) // settings.num_bins)
    if factor > 1:
        magnitude = np.pad(magnitude, (0, (-len(magnitude)) % factor)).reshape(-1, factor).sum(1)
        width = (magnitude_edges[1] - magnitude_edges[0]) * factor
        magnitude_edges = magnitude_edges[0] + width * np.arange(len(magnitude) + 1)
    levels = settings.num_quantized_bins
    if low >= 0 and not settings.activation_symmetric:
        levels *= 2
    threshold = entropy_threshold(magnitude, magnitude_edges, levels)
    if settings.activation_symmetric:
        return np.float32(-threshold), np.float32(threshold)
    return np.float32(max(low, -threshold)), np.float32(min(high, threshold))


def entropy_threshold(counts: np.ndarray, edges: np.ndarray, levels: int = 128) -> float:
    """TensorRT's calibration threshold for a histogram of |x| (``edges[0]`` = 0).

    For every candidate i >= levels, P is the first i bins with the outliers added to the last one and Q is
    P's bins merged into ``levels`` equal groups, spread back over the non-empty bins; the threshold is the
    right edge of the candidate with the smallest KL(P || Q) (the largest such candidate on ties).
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = len(counts)
    if n <= levels or counts.sum() == 0:
        return float(edges[-1])
    outliers = counts.sum() - np.cumsum(counts)
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1):
        p = counts[:i].copy()
        p[-1] += outliers[i - 1]
        groups = (np.arange(i) * levels) // i
        nonzero = counts[:i] > 0
        sums = np.bincount(groups, weights=counts[:i], minlength=levels)
        filled = np.bincount(groups, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[groups] / np.maximum(filled[groups], 1), 0.0)
        q_total = q.sum()
        if q_total == 0:
            continue
        mask = p > 0
        if not np.all(q[mask] > 0):
            continue  # P has mass where Q has none: infinite divergence
        p_mask = p[mask] / p.sum()
        kl = float(np.sum(p_mask * np.log(p_mask / (q[mask] / q_total))))
        if kl <= best_kl:
            best_i, best_kl = i, kl
    return float(edges[best_i])


# --- quantization --------------------------------------------------------------------------------------


def _activation_matmuls(model: onnx.ModelProto, settings: QdqSettings) -> list[str]:
    """Names of the MatMuls with no constant input, unless the settings quantize them."""
    if settings.activation_matmuls or "MatMul" not in settings.op_types:
        return []
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def _quantize_with_ranges(
    model_path: Path, model_out: Path, ranges: Any, settings: QdqSettings, nodes_to_exclude: Sequence[str]
) -> None:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    # ORT writes an inferred copy next to the model it loads: do it in a temporary directory.
    with tempfile.TemporaryDirectory(prefix="t2tedge-qdq-") as tmp:
        local = Path(tmp) / "model.onnx"
        local.write_bytes(Path(model_path).read_bytes())
        model = load_model_with_shape_infer(local)
    extra = {
        "ActivationSymmetric": settings.activation_symmetric,
        "WeightSymmetric": True,
        "OpTypesToExcludeOutputQuantization": list(settings.no_output_quantization_op_types),
        **settings.extra_options,
    }
    activation = QuantType.QUInt8 if settings.activation_type == "uint8" else QuantType.QInt8
    quantizer = QDQQuantizer(
        model,
        settings.per_channel,
        settings.reduce_range,
        QuantType.QInt8,
        activation,
        # the quantizer edits the ranges it is given (Relu/Clip/Softmax adjustments): hand it a copy
        TensorsData(ranges.calibration_method, dict(ranges.data)),
        [],
        list(nodes_to_exclude),
        settings.quantizer_op_types,
        extra,
    )
    with quiet_ort():
        quantizer.quantize_model()
    model = quantizer.model.model
    if settings.fp32_op_types:
        _float_inputs_for(model, lambda node: node.op_type in settings.fp32_op_types)
    if settings.float_readers_read_float:
        quantized_or_qdq = {*settings.quantizer_op_types, Q_OP, DQ_OP}
        _float_inputs_for(model, lambda node: node.op_type not in quantized_or_qdq, settings.quantizer_op_types)
    _sort_topologically(model.graph)  # ORT's quantizer appends Q/DQ nodes after their readers
    onnx.save(model, str(model_out))


def _float_source(name: str, producers: dict[str, onnx.NodeProto]) -> tuple[onnx.NodeProto | None, str | None]:
    """For a tensor made by DequantizeLinear: that DQ node, and the float tensor in front of its Q (if any)."""
    dq = producers.get(name)
    if dq is None or dq.op_type != DQ_OP:
        return None, None
    q = producers.get(dq.input[0])
    return dq, (q.input[0] if q is not None and q.op_type == Q_OP else None)


def _float_inputs_for(
    model: onnx.ModelProto, reads_float: Callable[[onnx.NodeProto], bool], keep_outputs_of: Sequence[str] = ()
) -> None:
    """Feed the nodes ``reads_float`` picks the float tensor in front of their Q -> DQ pairs, except pairs
    on the output of an op of ``keep_outputs_of``; drop pairs left unused."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if not reads_float(node):
            continue
        for index, name in enumerate(node.input):
            _, source = _float_source(name, producers)
            if source is not None and (source not in producers or producers[source].op_type not in keep_outputs_of):
                node.input[index] = source
    _prune(model)


def with_fp32_nodes(
    quantized: onnx.ModelProto,
    float_model: onnx.ModelProto,
    names: Sequence[str],
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
) -> onnx.ModelProto:
    """A copy of a QDQ model in which the nodes ``names`` compute in FP32 again (a cheap trial).

    Their activation inputs come from in front of the Q -> DQ pair, their weights and biases from
    ``float_model`` (the graph that was quantized), and their outputs skip the Q -> DQ pair for every
    reader that is not a quantized node (one of ``op_types`` not in ``names``). Unlike quantizing again
    with the nodes excluded, no weight is re-quantized, which makes per-node sensitivity trials cheap.
    ``quantized`` must keep its Relu/Clip nodes (``keep_removable_activations``): a folded one lives only
    in the range of a Q/DQ pair that may be bypassed here.
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    float_nodes = {node.name: node for node in float_model.graph.node}
    float_inits = {init.name: init for init in float_model.graph.initializer}
    present = {init.name for init in graph.initializer}
    wanted = set(names)

    def quantized_reader(node: onnx.NodeProto) -> bool:
        return node.op_type in op_types and node.name not in wanted

    for node in graph.node:
        if node.name not in wanted:
            continue
        for index, name in enumerate(node.input):
            dq, source = _float_source(name, producers)
            if dq is None:
                continue
            if source is not None:
                node.input[index] = source
                continue
            original = float_nodes[node.name].input[index]
            if original in float_inits:
                # the quantizer may have named the DQ output after the float initializer it replaced
                restored = f"{original}_fp32" if original in producers else original
                if restored not in present:
                    init = graph.initializer.add()
                    init.CopyFrom(float_inits[original])
                    init.name = restored
                    present.add(restored)
                node.input[index] = restored
        for output in node.output:
            for q in (r for r in readers.get(output, []) if r.op_type == Q_OP):
                for dq in (r for r in readers.get(q.output[0], []) if r.op_type == DQ_OP):
                    for reader in readers.get(dq.output[0], []):
                        if not quantized_reader(reader):
                            reader.input[:] = [output if i == dq.output[0] else i for i in reader.input]
    _prune(model)
    return model


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Order nodes so each follows the producers of its inputs, otherwise keeping their order."""
    nodes = list(graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output}
    needs = [sorted({producer[i] for i in node.input if i in producer}, reverse=True) for node in nodes]
    done = [False] * len(nodes)
    order: list[int] = []
    for root in range(len(nodes)):
        stack = [(root, False)]
        while stack:
            index, ready = stack.pop()
            if ready:
                if not done[index]:
                    done[index] = True
                    order.append(index)
            elif not done[index]:
                stack.append((index, True))
                stack.extend((need, False) for need in needs[index] if not done[need])
    copies = [onnx.NodeProto.FromString(nodes[i].SerializeToString()) for i in order]
    del graph.node[:]
    graph.node.extend(copies)


def _prune(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads, then initializers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for node in graph.node for i in node.input} | outputs
        dead = [n for n in graph.node if n.op_type in (Q_OP, DQ_OP) and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for node in graph.node for i in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """ORT's quantization tools print progress on stdout and log warnings; keep the CLI's output ours."""
    log = logging.getLogger()
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)
