"""ONNX Runtime on CPU: the generic edge target. FP32 = the exported graph; INT8 = static QDQ (U8S8)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from t2tedge.artifact import Artifact
from t2tedge.errors import T2tedgeError
from t2tedge.evaluation.host import has_int8_dot_products
from t2tedge.targets.base import Availability, BuildInputs, Capabilities, DeviceRunner, TargetConfig, register_target

MODEL_FILE = "model.onnx"


class OnnxRuntimeConfig(TargetConfig):
    """`quantization.onnxruntime`: which ops get Q/DQ and in which form."""

    op_types: list[str] = Field(
        default_factory=lambda: ["Conv", "MatMul", "Gemm"],
        description="op types to quantize (LayerNorm/Softmax/Add hurt accuracy and speed)",
    )
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="uint8 = U8S8, the fast form on x86")
    per_channel: bool = True
    reduce_range: bool = Field(
        default_factory=lambda: not has_int8_dot_products(),
        description="7-bit weights; default: on x86 CPUs without VNNI/AMX (AVX2, AVX-512F), whose U8S8 kernels "
        "saturate int16 sums of full-range weights, chosen on the host that builds (set it for another device)",
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="node names kept in FP32")
    float_modules: list[str] = Field(
        default_factory=list, description="module-path globs (e.g. 'blocks.*.mlp*') whose Conv/MatMul/Gemm stay FP32"
    )


def device_load(kit, directory, request):  # noqa: ANN001, ANN201  (shipped to devices by source: Python 3.8)
    """An onnxruntime CPU session over ``model.onnx``: here and on SSH devices alike."""
    import os

    ort = kit.import_runtime("onnxruntime")
    threads = request.get("threads")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    config = (request.get("build") or {}).get("session_config", {})
    for key, value in config.items():
        options.add_session_config_entry(key, value)  # how the build said its graph must run (QDQ: INT8 MatMuls)
    session = ort.InferenceSession(os.path.join(directory, "model.onnx"), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    facts = {
        "runtime": "onnxruntime",
        "version": ort.__version__,
        "providers": session.get_providers(),
        "threads": int(threads) if threads else "runtime default",
        "session_config": config,
    }
    shape = [kit.static(d) for d in inp.shape]
    return kit.Model(lambda x: session.run(None, {inp.name: x})[0], shape[0], shape[1:], facts)


class OnnxRuntimeTarget:
    """FP32 = the exported graph as is; INT8 = QDQ from calibrated ranges, optionally accuracy-aware."""

    name = "onnxruntime"
    precisions = ("fp32", "int8")
    Config = OnnxRuntimeConfig
    capabilities = Capabilities(
        payload=(MODEL_FILE,),
        device_runtime="onnxruntime",
        device_loader=device_load,
        peaks={"fp32": "onnxruntime/fp32", "int8": "onnxruntime/int8"},
        tune_knobs=(
            ("op_types", (["Conv", "MatMul", "Gemm"], ["Conv", "Gemm"])),  # MatMuls INT8, or all of them float
            ("per_channel", (True, False)),
            ("reduce_range", (True, False)),
            ("method", ("minmax", "percentile")),
        ),
    )

    def availability(self) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return Availability(False, False, "onnxruntime is not installed (pip install onnxruntime)")
        return Availability(True, True)

    def needs_calibration(self, precision: str) -> bool:
        return precision == "int8"

    def tool_versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}

    def build(self, inputs: BuildInputs, precision: str, config: OnnxRuntimeConfig, out_dir: Path) -> dict[str, Any]:
        if precision == "int8":
            return build_int8(inputs, config, out_dir)
        shutil.copyfile(inputs.onnx_path, out_dir / MODEL_FILE)
        return {"providers": ["CPUExecutionProvider"]}

    def load(self, artifact: Artifact, threads: int | None = None) -> DeviceRunner:
        from t2tedge.devices import remote_runner

        request = {"threads": threads, "build": artifact.manifest.get("build", {})}
        return DeviceRunner(device_load(remote_runner, str(artifact.path), request))


def qdq_settings(config: OnnxRuntimeConfig, module_nodes: tuple[str, ...] = ()) -> Any:
    """ONNX Runtime's Q/DQ settings: U8S8 by default (asymmetric uint8 activations, int8 weights);
    ``module_nodes``: the nodes of ``float_modules``, kept FP32 with ``exclude_nodes``."""
    from t2tedge.calibration.onnx_qdq import QdqSettings

    try:
        return QdqSettings(
            method=config.method,
            percentile=config.percentile,
            op_types=tuple(config.op_types),
            activation_type=config.activation_type,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            linear_as_gemm=True,  # bias in QGemm's output step, not a float Add after MatMulIntegerToFloat
            float_readers_read_float=True,  # no DequantizeLinear for a float op beside a quantized one
            nodes_to_exclude=tuple(dict.fromkeys([*config.exclude_nodes, *module_nodes])),
        )
    except ValueError as exc:
        raise T2tedgeError(f"onnxruntime int8: {exc}") from None


def build_int8(inputs: BuildInputs, config: OnnxRuntimeConfig, out_dir: Path) -> dict[str, Any]:
    """ONNX Runtime's QDQ graph from the recipe's settings, within the accuracy budget when one is set."""
    from t2tedge.calibration.accuracy_aware import quantize_with_budget
    from t2tedge.calibration.onnx_qdq import QDQ_SESSION_CONFIG
    from t2tedge.calibration.scopes import module_nodes

    kept = tuple(module_nodes(inputs.onnx_path, config.float_modules))
    if config.float_modules and not kept:
        raise T2tedgeError(f"onnxruntime int8: float_modules {config.float_modules} match no Conv/MatMul/Gemm node")
    settings = qdq_settings(config, kept)
    facts = quantize_with_budget(
        inputs, settings, out_dir / MODEL_FILE, out_dir, "onnxruntime/int8", config.max_accuracy_drop,
        QDQ_SESSION_CONFIG,
    )  # fmt: skip
    facts["session_config"] = dict(QDQ_SESSION_CONFIG)
    facts["runtime_int8"] = runtime_int8_ops(out_dir / MODEL_FILE, QDQ_SESSION_CONFIG)
    if config.float_modules:
        facts["float_modules"] = {"globs": list(config.float_modules), "nodes": list(kept)}
    return {"providers": ["CPUExecutionProvider"], **facts}


# ONNX Runtime CPU kernels that compute in integers (what a QDQ graph's quantized nodes become when fused)
INTEGER_KERNELS = ("MatMulIntegerToFloat", "QGemm", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger")
FLOAT_PRODUCTS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Conv", "FusedConv", "NhwcFusedConv")


def runtime_int8_ops(model: Path, session_config: dict[str, str]) -> dict[str, Any]:
    """What this host's ONNX Runtime really runs the graph as, after its graph optimizations: integer
    kernels vs float products (a quantized node it could not fuse computes in FP32 on dequantized inputs)."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="t2tedge-ort-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its warning that the optimized file is host-specific: it is read here
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        for key, value in session_config.items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    lost = collections.Counter(
        n.op_type for n in nodes if n.op_type in FLOAT_PRODUCTS and any(i in dequantized for i in n.input)
    )
    return {
        "integer_kernels": {k: ops[k] for k in INTEGER_KERNELS if ops[k]},
        "float_products": {k: ops[k] for k in FLOAT_PRODUCTS if ops[k]},
        # quantized products ORT could not fuse: FP32 arithmetic on inputs dequantized at every inference
        "float_products_on_dequantized_inputs": dict(lost),
        "note": "op counts of the graph this host's onnxruntime optimized; float products include the ones kept FP32",
    }


register_target(OnnxRuntimeTarget())
