"""ExecuTorch: a ``model.pte`` program lowered to the XNNPACK delegate, run by the ExecuTorch runtime.

fp32: ``torch.export`` of the FP32 model (its graph form where it has one: T2T-ViT's soft splits as row
gathers), ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner``, ``to_executorch()``. int8:
PyTorch 2 export quantization (PT2E): ``prepare_pt2e`` with the ``XNNPACKQuantizer``, calibration on the
calibration images, ``convert_pt2e``, then the same lowering. Programs are exported at batch 1 (the
input shape is static in a .pte), so runners feed them one image at a time for logits.

Measured on the AMD EPYC development host (2 threads, batch 1, 224 px, p50, ExecuTorch 1.5.1):

* MobileNetV2: fp32 ~4 ms, PT2E int8 ~2 ms.
* T2T-ViT-7 fp32: 55 ms in the unfold form, 20-23 ms in the export form (row gathers), which is why the
  export form is lowered whenever the pipeline passes one.
* XNNPACK 1.5.1 takes no LayerNorm: as lowered by default, T2T-ViT-7 splits into 54 delegated subgraphs
  and 113 ops stay on ExecuTorch's portable kernels (49 no-op ``expand_copy`` from matmul broadcasting,
  21 ``squeeze_copy``, 19 ``native_layer_norm``, ...). This target drops the no-op expands
  (``RemoveNoopExpandCopyPass``) and computes LayerNorm with ops XNNPACK takes
  (:func:`delegatable_layer_norms`): 20 subgraphs, 49 ops outside. The build records the delegated
  subgraphs and the ops left outside, by op, in the manifest.
* Default int8 (``benchmarks/results/executorch_t2t.json``, demo weights run at 224 px, the lowering
  above): 98.8 % top-1 agreement with the fp32 program on 250 Fashion-MNIST test images; fp32 9.9 ms,
  int8 6.6 ms p50 in one interleaved run (1.49x; min 8.7 vs 5.2 ms, 1.68x; two earlier runs of the same
  code 1.58x p50). Short of 1.6x at p50: what int8 leaves float (attention and Performer products,
  softmax, GELU, the Performer's sums and maxima on portable kernels) bounds it.

Why int8 quantizes only linear and conv2d ops by default (``quantize: linear_conv``): XNNPACK's standard
PT2E recipe (``quantize: standard``: every add, mul, cat... quantized, including the Performer's
``u * u`` and its normalizer ``D + eps``) kept only 17.5 % top-1 agreement with FP32 on T2T-ViT-7, while
Linear-only int8 kept 98.5 % and was also the fastest. With the standard recipe the soft split's
quantized pad also fails to load (``StaticConstantPad ... xnn_status_invalid_parameter``), because its
consumer runs outside the delegate: such a build stops with one line. The default loads as lowered, with
no partitioner workaround. The quantizer is set by op type (``aten.linear``, ``aten.conv2d``), not by
module type: the module-type filter also tests the weight node, and convolutions whose BatchNorm
``prepare_pt2e`` folded in get new weight nodes outside any module, so a MobileNet would keep every
conv in FP32. Weights are symmetric per-channel int8, activations per-tensor int8 (XNNPACK's static
config); the shared ``method`` key picks the activation observer: ``minmax`` only (torchao's PT2E
observers have no percentile or entropy calibration; XNNPACK's own default, a histogram observer that
minimizes the L2 error, is none of the shared methods, so it is not offered).

Delegates other than XNNPACK (Core ML, Vulkan, QNN) are offered only where their toolchain imports;
else the build stops with one line saying why. They lower fp32 only: their int8 needs their own
quantizers, which this target does not drive.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from t2tedge.artifact import Artifact
from t2tedge.errors import T2tedgeError
from t2tedge.targets.base import (
    Availability,
    BuildInputs,
    Capabilities,
    DeviceRunner,
    TargetConfig,
    check_precision,
    register_target,
)

MODEL_FILE = "model.pte"
EXPORT_BATCH = 1
CALIBRATION_BATCH = 16
# calibration images the built program is compared with eager FP32 on (with the ExecuTorch runtime)
CHECK_IMAGES = 4
INSTALL_HINT = "pip install executorch==1.5.1"
# delegate -> (module to import, partitioner class, runtime backend name)
DELEGATES: dict[str, tuple[str, str, str]] = {
    "xnnpack": ("executorch.backends.xnnpack.partition.xnnpack_partitioner", "XnnpackPartitioner", "XnnpackBackend"),
    "coreml": ("executorch.backends.apple.coreml.partition", "CoreMLPartitioner", "CoreMLBackend"),
    "vulkan": ("executorch.backends.vulkan.partitioner.vulkan_partitioner", "VulkanPartitioner", "VulkanBackend"),
    "qnn": ("executorch.backends.qualcomm.partition.qnn_partitioner", "QnnPartitioner", "QnnBackend"),
}
# what each delegate's toolchain needs beyond its partitioner module (imported to decide if it is offered)
TOOLCHAINS: dict[str, tuple[str, ...]] = {
    "xnnpack": (),
    "coreml": ("coremltools",),
    "vulkan": (),
    "qnn": ("executorch.backends.qualcomm.python.PyQnnManagerAdaptor",),
}
QUANTIZE_RECIPES = {
    "linear_conv": "linear and conv2d ops only (nn.Linear, nn.Conv2d with BatchNorm folded, a following ReLU fused); "
    "symmetric per-channel int8 weights, per-tensor int8 activations",
    "standard": "XNNPACK's standard PT2E recipe: every op its quantizer annotates (conv, linear, add, mul, cat, ...)",
}
# ops that only move data: annotated with their input's int8 parameters, not counted as int8 compute
_PASSTHROUGH = frozenset(
    [
        "view",
        "reshape",
        "_unsafe_view",
        "permute",
        "transpose",
        "t",
        "flatten",
        "squeeze",
        "unsqueeze",
        "dropout",
        "clone",
        "contiguous",
        "expand",
        "slice",
        "select",
        "split",
        "split_with_sizes",
        "chunk",
        "alias",
        "identity",
        "max_pool2d",
    ]
)


class ExecuTorchConfig(TargetConfig):
    """`quantization.executorch`: the delegate the program is lowered to and what int8 quantizes."""

    delegate: Literal["xnnpack", "coreml", "vulkan", "qnn"] = Field(
        "xnnpack", description="the backend the program is lowered to (others only where their toolchain imports)"
    )
    quantize: Literal["linear_conv", "standard"] = Field(
        "linear_conv",
        description="int8: linear/conv2d only (keeps T2T-ViT's accuracy, loads as lowered) or XNNPACK's full recipe",
    )


def device_load(kit, directory, request):  # noqa: ANN001, ANN201  (shipped to devices by source: Python 3.8)
    """The ExecuTorch runtime over ``model.pte``: here and on SSH devices alike (batch-1 program)."""
    import os

    import numpy as np

    kit.import_runtime("executorch")
    try:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except Exception as exc:
        raise kit.Unavailable("executorch runtime not importable on {device} (" + type(exc).__name__ + ")") from exc
    try:
        from executorch.version import __version__ as version
    except Exception:
        version = "unknown"
    build = request.get("build") or {}
    runtime = Runtime.get()
    backend = build.get("runtime_backend")
    if backend and not runtime.backend_registry.is_available(backend):
        raise kit.Unavailable("this executorch runtime has no " + backend + " on {device}")
    threads = request.get("threads")
    if threads:
        # process-wide: ExecuTorch's (and XNNPACK's) thread pool is shared by every program in the process
        portable_lib._unsafe_reset_threadpool(int(threads))
    pool = int(portable_lib._threadpool_get_thread_count())
    program = runtime.load_program(os.path.join(directory, "model.pte"))
    method = program.load_method("forward")
    sizes = list(method.metadata.input_tensor_meta(0).sizes())

    def run(x):
        out = method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return np.array(out[0].numpy(), dtype=np.float32)

    facts = {
        "runtime": "executorch",
        "version": version,
        "delegate": build.get("delegate", "xnnpack"),
        "threads": pool if threads else "not set (the process-wide pool has " + str(pool) + ")",
        "threadpool": "process-wide",
    }
    return kit.Model(run, kit.static(sizes[0]), [kit.static(d) for d in sizes[1:]], facts)


class ExecuTorchTarget:
    """fp32 and PT2E int8 programs for ExecuTorch, lowered to XNNPACK (other delegates where installed)."""

    name = "executorch"
    precisions = ("fp32", "int8")
    Config = ExecuTorchConfig
    capabilities = Capabilities(payload=(MODEL_FILE,), device_runtime="executorch", device_loader=device_load, peaks={})

    def availability(self) -> Availability:
        try:
            import executorch.exir  # noqa: F401
            import torchao.quantization.pt2e  # noqa: F401
        except Exception as exc:  # noqa: BLE001  (a broken install raises anything)
            return Availability(False, False, f"executorch is not importable ({type(exc).__name__}; {INSTALL_HINT})")
        try:
            import executorch.runtime  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return Availability(True, False, f"the executorch runtime is not importable ({type(exc).__name__})")
        return Availability(True, True)

    def needs_calibration(self, precision: str) -> bool:
        return precision == "int8"

    def tool_versions(self) -> dict[str, str]:
        import torch

        return {"executorch": _executorch_version(), "torch": torch.__version__, "torchao": _torchao_version()}

    def build(self, inputs: BuildInputs, precision: str, config: Any, out_dir: Path) -> dict[str, Any]:
        check_precision(self, precision)
        config = _as_config(config)
        started = time.perf_counter()
        partitioner, backend = _partitioner(config.delegate, precision)
        model = inputs.export_form if inputs.export_form is not None else inputs.torch_model
        if model is None:
            raise T2tedgeError("executorch builds from the PyTorch model; the pipeline passed none")
        model = model.eval()
        facts: dict[str, Any] = {
            "delegate": config.delegate,
            "runtime_backend": backend,
            "executorch": _executorch_version(),
            "form": "export form" if inputs.export_form is not None else "as trained",
            "batch": EXPORT_BATCH,
            "input_shape": [EXPORT_BATCH, 3, inputs.image_size, inputs.image_size],
        }
        if config.delegate == "xnnpack":
            model, facts["layer_norms_as_matmuls"] = delegatable_layer_norms(model)
        if precision == "int8":
            model, quant_facts = quantize_pt2e(model, inputs, config)
            facts.update(quant_facts)
        program, lowering = lower(model, inputs.image_size, partitioner, config.delegate == "xnnpack")
        facts.update(lowering)
        (out_dir / MODEL_FILE).write_bytes(program)
        facts["program_bytes"] = len(program)
        facts["program_check"] = check_program(out_dir, inputs, facts)
        facts["build_seconds"] = round(time.perf_counter() - started, 1)
        return facts

    def load(self, artifact: Artifact, threads: int | None = None) -> DeviceRunner:
        from t2tedge.devices import remote_runner

        request = {"threads": threads, "build": artifact.manifest.get("build", {})}
        return DeviceRunner(device_load(remote_runner, str(artifact.path), request))


def _as_config(config: Any) -> ExecuTorchConfig:
    if isinstance(config, ExecuTorchConfig):
        return config
    if isinstance(config, TargetConfig):
        config = config.model_dump()
    try:
        return ExecuTorchConfig.model_validate(dict(config or {}))
    except ValueError as exc:
        raise T2tedgeError(f"quantization.executorch: {exc}".splitlines()[0]) from None


def _executorch_version() -> str:
    try:
        from executorch.version import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


def _torchao_version() -> str:
    try:
        import torchao

        return str(torchao.__version__)
    except Exception:  # noqa: BLE001
        return "not installed"


def _partitioner(delegate: str, precision: str) -> tuple[Any, str]:
    """The delegate's partitioner and the runtime backend it needs, or one line saying why not."""
    import importlib

    module_name, class_name, backend = DELEGATES[delegate]
    for needed in (module_name, *TOOLCHAINS[delegate]):
        try:
            with _quiet():
                module = importlib.import_module(needed)
        except Exception as exc:  # noqa: BLE001  (SDK bindings fail in many ways)
            raise T2tedgeError(
                f"executorch delegate {delegate!r} is not available here: {needed} does not import "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''})"
            ) from None
        if needed == module_name:
            partitioner_class = getattr(module, class_name)
    if delegate != "xnnpack" and precision != "fp32":
        raise T2tedgeError(
            f"executorch {precision} is built for the xnnpack delegate only (its PT2E quantizer); "
            f"delegate {delegate!r} offers fp32 here"
        )
    if delegate == "qnn":
        raise T2tedgeError(
            "executorch delegate 'qnn' needs a SoC-specific compile spec (generate_qnn_executorch_compiler_spec) "
            "that this target does not configure; use delegate xnnpack"
        )
    return partitioner_class(), backend


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the export/lowering stack's warnings and log lines (they are not the user's to act on)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _example(image_size: int, batch: int = EXPORT_BATCH) -> Any:
    import torch

    return (torch.zeros(batch, 3, image_size, image_size),)


def _activation_observer(method: str) -> Any:
    from torchao.quantization.pt2e import MinMaxObserver

    if method != "minmax":
        raise T2tedgeError(
            f"executorch int8 calibrates activations by min/max only (method: minmax), not {method!r}: "
            "torchao's PT2E observers have no percentile or entropy calibration"
        )
    return MinMaxObserver


def quantizer_for(config: ExecuTorchConfig) -> Any:
    """The XNNPACKQuantizer of the chosen recipe (symmetric per-channel int8 weights, int8 activations)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    base = get_symmetric_quantization_config(is_per_channel=True)
    spec = base.input_activation
    observer = _activation_observer(config.method).with_args(eps=2**-12)
    activation = type(spec)(
        dtype=spec.dtype,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        qscheme=spec.qscheme,
        is_dynamic=False,
        observer_or_fake_quant_ctr=observer,
    )
    quant = type(base)(activation, activation, base.weight, base.bias, base.is_qat)
    quantizer = XNNPACKQuantizer()
    if config.quantize == "standard":
        return quantizer.set_global(quant)
    # by op, not by module type: the module-type filter also tests the weight node, and the weights of
    # convolutions whose BatchNorm prepare_pt2e folded in are new nodes outside any module (MobileNets
    # would keep every conv in FP32). XNNPACK's conv/linear patterns fuse a following ReLU.
    for op in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
        quantizer.set_operator_type(op, quant)
    return quantizer


def quantize_pt2e(model: Any, inputs: BuildInputs, config: ExecuTorchConfig) -> tuple[Any, dict[str, Any]]:
    """PT2E int8: export, prepare with the XNNPACK quantizer, calibrate on the images, convert."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if config.max_accuracy_drop is not None:
        raise T2tedgeError(
            "executorch int8 has no accuracy-aware quantization (max_accuracy_drop); "
            "unset it, or choose what is quantized with quantization.executorch.quantize"
        )
    images = inputs.calibration
    if images is None or len(images) == 0:
        raise T2tedgeError("executorch int8 needs calibration images")
    images = np.ascontiguousarray(images, dtype=np.float32)
    quantizer = quantizer_for(config)
    batch = min(CALIBRATION_BATCH, len(images))
    with _quiet(), torch.no_grad():
        try:  # a dynamic batch calibrates in batches; a model that cannot export one calibrates image by image
            batch_dim = torch.export.Dim("batch", min=1, max=max(2, len(images)))
            graph = torch.export.export(
                model, _example(inputs.image_size, max(2, batch)), dynamic_shapes=({0: batch_dim},)
            ).module()
        except Exception:  # noqa: BLE001  (export raises many types on data-dependent shapes)
            graph, batch = torch.export.export(model, _example(inputs.image_size)).module(), 1
        prepared = prepare_pt2e(graph, quantizer)
        annotated = quantized_ops(prepared), quantized_ops(prepared, passthrough=True)
        for start in range(0, len(images), batch):
            prepared(torch.from_numpy(images[start : start + batch]))
        converted = convert_pt2e(prepared)
    facts = {
        "quantize": config.quantize,
        "quantize_recipe": QUANTIZE_RECIPES[config.quantize],
        "calibration": {
            "method": config.method,
            "observer": "MinMaxObserver (per-tensor int8 activations); PerChannelMinMaxObserver (int8 weights)",
            "images": int(len(images)),
            "batch": batch,
        },
        "quantized_ops": annotated[0],
        "quantized_passthrough_ops": annotated[1],
    }
    return converted, facts


def _op_name(target: Any) -> str:
    """``aten::linear`` -> ``linear``; edge ops likewise (their schema names the aten op)."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return (getattr(target, "__name__", None) or str(target)).split(".")[0]


def quantized_ops(graph: Any, passthrough: bool = False) -> dict[str, int]:
    """Ops the quantizer annotated in a prepared PT2E graph (what the recipe quantizes), by op.

    ``passthrough=False``: the computing ops; ``True``: the data-movement ops (reshape, permute, dropout,
    ...) that share their input's int8 parameters. Ops the quantizer did not annotate are not counted,
    even between int8 tensors (a GELU between two quantized Linears computes in float).
    """
    counts: Counter[str] = Counter()
    for node in graph.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        if node.op != "call_function" or annotation is None or not getattr(annotation, "_annotated", False):
            continue
        name = _op_name(node.target)
        if (name in _PASSTHROUGH) == passthrough:
            counts[name] += 1
    return dict(sorted(counts.items()))


def lower(model: Any, image_size: int, partitioner: Any, xnnpack: bool = True) -> tuple[bytes, dict[str, Any]]:
    """Export at batch 1, lower to the delegate, serialize; and what stayed outside the delegate."""
    import torch
    from executorch.exir import to_edge_transform_and_lower

    with _quiet(), torch.no_grad():
        try:
            exported = torch.export.export(model, _example(image_size))
            rewritten = delegatable_reductions(exported) if xnnpack else {}
            edge = to_edge_transform_and_lower(exported, partitioner=[partitioner], transform_passes=_edge_passes())
            facts = {"rewritten_for_xnnpack": rewritten, **delegation(edge.exported_program().graph_module)}
            program = edge.to_executorch().buffer
        except T2tedgeError:
            raise
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise T2tedgeError(f"executorch lowering failed: {type(exc).__name__}: {first}") from None
    return program, facts


def delegatable_reductions(exported: Any) -> dict[str, int]:
    """Rewrite ops XNNPACK 1.5.1 does not take into equal ones it does, in the exported ATen graph.

    Each op left outside the delegate runs on the portable kernels and splits the graph into one more
    delegate call. By op, whatever the model (counts returned for the manifest):

    - ``sum`` over one dim of a 3-d tensor -> ``mean`` over the two inner dims of a 4-d view, times the
      dim's size (XNNPACK's mean is a global average pool; a non-last dim is permuted last first);
    - ``amax`` likewise -> ``max.dim`` over dim 2 of the 4-d view (XNNPACK's only 4-d, dims 2 or 3);
    - ``matmul`` of a 3-d (or more) by a constant 2-d tensor -> ``view``, ``mm``, ``view``, and by the
      transpose of one -> ``linear`` (else it decomposes into an ``expand`` of the 2-d operand and a
      batched matmul; the int8 recipe quantized before this, so such a ``linear`` stays float);
    - ``split`` -> one ``slice`` per part, ``select`` -> ``slice`` + ``view``;
    - ``detach`` / ``alias`` (identities in an inference graph) -> removed;
    - ``expand`` that only prepends size-1 dims -> ``view``.

    ``max`` and the slices are exact; ``mean`` times n differs from ``sum`` by float rounding only
    (T2T-ViT-7 at 224 px: max |dlogit| 5e-6 against eager).
    """
    import torch

    aten = torch.ops.aten
    graph = exported.graph_module.graph
    counts: Counter[str] = Counter()
    splits = (aten.split.Tensor, aten.split_with_sizes.default)

    def add(target: Any, args: tuple[Any, ...], value: Any) -> Any:
        node = graph.call_function(target, args)
        node.meta["val"] = value
        return node

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        value = node.meta.get("val")
        source = node.args[0] if node.args else None
        source_value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        replacement = None
        with graph.inserting_before(node):
            if node.target in (aten.detach.default, aten.alias.default):
                replacement = source
            elif node.target == aten.expand.default and source_value is not None:
                extra = value.dim() - source_value.dim()
                if extra > 0 and list(value.shape) == [1] * extra + list(source_value.shape):
                    replacement = add(aten.view.default, (source, list(value.shape)), value)
            elif node.target in (aten.sum.dim_IntList, aten.amax.default) and source_value is not None:
                dims = node.args[1] if len(node.args) > 1 else None
                if source_value.dim() == 3 and dims is not None and len(dims) == 1 and node.kwargs.get("dtype") is None:
                    replacement = _reduce_4d(add, aten, node, source, source_value, dims[0] % 3, value)
            elif node.target == aten.matmul.default and source_value is not None:
                right = node.args[1]
                other = right.meta.get("val")
                transposed = right.op == "call_function" and right.target in (aten.t.default, aten.numpy_T.default)
                if source_value.dim() >= 3 and other is not None and other.dim() == 2 and transposed:
                    # x @ w.t() is linear(x, w): XNNPACK's fully connected layer, weights as they are
                    replacement = add(aten.linear.default, (source, right.args[0]), value)
                elif source_value.dim() >= 3 and other is not None and other.dim() == 2 and right.op == "placeholder":
                    rows = source_value.reshape(-1, source_value.shape[-1])
                    flat = add(aten.view.default, (source, list(rows.shape)), rows)
                    product = add(aten.mm.default, (flat, right), rows @ other)
                    replacement = add(aten.view.default, (product, list(value.shape)), value)
            elif node.target in splits and source_value is not None:
                dim = (node.args[2] if len(node.args) > 2 else 0) % source_value.dim()
                sizes = node.args[1]
                if isinstance(sizes, int):
                    length = source_value.shape[dim]
                    sizes = [min(sizes, length - start) for start in range(0, length, sizes)]
                start, parts = 0, []
                for size in sizes:
                    part = source_value.narrow(dim, start, size)
                    parts.append(add(aten.slice.Tensor, (source, dim, start, start + size), part))
                    start += size
                for user in list(node.users):
                    if user.target is not operator.getitem:
                        break
                else:
                    for user in list(node.users):
                        user.replace_all_uses_with(parts[user.args[1]])
                        graph.erase_node(user)
                    replacement = "erased"
                for part in parts:
                    if not part.users:
                        graph.erase_node(part)
            elif node.target == aten.select.int and source_value is not None:
                dim, index = node.args[1] % source_value.dim(), node.args[2] % source_value.shape[node.args[1]]
                sliced = add(aten.slice.Tensor, (source, dim, index, index + 1), source_value.narrow(dim, index, 1))
                replacement = add(aten.view.default, (sliced, list(value.shape)), value)
        if replacement is None:
            continue
        if replacement != "erased":
            node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        counts[_op_name(node.target)] += 1
    graph.lint()
    exported.graph_module.recompile()
    return dict(counts)


def _reduce_4d(add: Any, aten: Any, node: Any, source: Any, source_value: Any, dim: int, value: Any) -> Any:
    """``sum``/``amax`` over ``dim`` of a 3-d tensor through the 4-d ops XNNPACK takes: the reduced dim
    moved last (a permute, if it is not), a (B, N, D, 1) view reduced over dim 2, a view to the result."""
    size = source_value.shape[dim]
    if dim != 2:
        order = [d for d in range(3) if d != dim] + [dim]
        source_value = source_value.permute(order)
        source = add(aten.permute.default, (source, order), source_value)
    shape4 = list(source_value.shape) + [1]
    view4_value = source_value.reshape(shape4)
    view4 = add(aten.view.default, (source, shape4), view4_value)
    if node.target == aten.amax.default:
        reduced_value = view4_value.max(2, keepdim=True)
        reduced = add(aten.max.dim, (view4, 2, True), tuple(reduced_value))
        result = add(operator.getitem, (reduced, 0), reduced_value[0])
    else:
        mean_value = view4_value.mean([2, 3], keepdim=True)
        mean = add(aten.mean.dim, (view4, [2, 3], True), mean_value)
        result = add(aten.mul.Tensor, (mean, float(size)), mean_value * size)
    return add(aten.view.default, (result, list(value.shape)), value)


def delegatable_layer_norms(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` whose last-dim ``nn.LayerNorm`` layers compute with ops XNNPACK delegates.

    XNNPACK 1.5.1 takes no ``native_layer_norm``: each one runs on the portable kernels and splits the
    graph into two delegate calls. The same function as matmuls with a 1/C column (the mean and the
    variance), a subtraction, a product and ``rsqrt`` stays inside the delegate: T2T-ViT-7 at 224 px
    went from 38 delegated subgraphs to 20, fp32 10.9 -> 9.9 ms and int8 7.6 -> 6.5 ms (p50, 2 threads,
    interleaved, AMD EPYC), max |dlogit| 4e-7 against eager. The matmuls are not ``aten.linear``, so
    the default int8 recipe leaves them float.
    """
    import copy

    import torch
    from torch import nn

    class MatmulLayerNorm(nn.Module):
        def __init__(self, norm: nn.LayerNorm) -> None:
            super().__init__()
            (features,) = norm.normalized_shape
            self.eps = norm.eps
            self.register_buffer("mean_column", torch.full((features, 1), 1.0 / features))
            self.weight, self.bias = norm.weight, norm.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            centred = x - torch.matmul(x, self.mean_column)
            variance = torch.matmul(centred * centred, self.mean_column)
            out = centred * torch.rsqrt(variance + self.eps)
            if self.weight is not None:
                out = out * self.weight
            return out + self.bias if self.bias is not None else out

    model = copy.deepcopy(model)
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                setattr(module, name, MatmulLayerNorm(child))
                swapped += 1
    return model.eval(), swapped


def _edge_passes() -> list[Any]:
    """Edge passes before partitioning: drop the no-op ``expand_copy`` that decomposing a batched matmul
    leaves (same shape in and out) and turn ``squeeze_copy`` into ``view_copy``; both would otherwise run
    as copies on the portable kernels, between two delegate calls."""
    from executorch.backends.xnnpack._passes.remove_noop_expand_copy_pass import RemoveNoopExpandCopyPass
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass, PassResult

    squeezes = {
        exir_ops.edge.aten.squeeze_copy.dims,
        exir_ops.edge.aten.squeeze_copy.dim,
        exir_ops.edge.aten.squeeze_copy.default,
    }

    class SqueezeAsViewPass(ExportPass):
        """``squeeze_copy`` (XNNPACK takes none; ``unbind`` of attention's q, k, v makes one per head
        split) as the ``view_copy`` of its static output shape, which XNNPACK takes."""

        def call(self, graph_module: Any) -> Any:
            graph = graph_module.graph
            for node in list(graph.nodes):
                value = node.meta.get("val")
                if node.op != "call_function" or node.target not in squeezes or value is None:
                    continue
                with graph.inserting_before(node):
                    view = graph.call_function(
                        exir_ops.edge.aten.view_copy.default, (node.args[0], [int(d) for d in value.shape])
                    )
                view.meta = dict(node.meta)
                node.replace_all_uses_with(view)
                graph.erase_node(node)
            graph.lint()
            graph_module.recompile()
            return PassResult(super().call(graph_module).graph_module, True)

    return [RemoveNoopExpandCopyPass(), SqueezeAsViewPass()]


def delegation(graph_module: Any) -> dict[str, Any]:
    """Delegated subgraphs and the ops that run outside them (ExecuTorch's portable kernels), by op."""
    subgraphs = 0
    outside: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            subgraphs += 1
        elif name != "getitem":
            outside[name] += 1
    return {
        "delegated_subgraphs": subgraphs,
        "non_delegated_ops": sum(outside.values()),
        "non_delegated_by_op": dict(outside.most_common()),
    }


def check_program(out_dir: Path, inputs: BuildInputs, build: dict[str, Any]) -> dict[str, Any]:
    """The written .pte run by the ExecuTorch runtime (the same loader as every run) vs the eager FP32 model."""
    import torch

    from t2tedge.devices import remote_runner

    images = inputs.calibration[:CHECK_IMAGES] if inputs.calibration is not None else None
    if images is None or len(images) == 0:
        generator = np.random.default_rng(0)
        images = generator.standard_normal((2, 3, inputs.image_size, inputs.image_size)).astype(np.float32)
        source = "random normal images (no calibration images given)"
    else:
        source = "calibration images"
    images = np.ascontiguousarray(images, dtype=np.float32)
    try:
        model = device_load(remote_runner, str(out_dir), {"threads": None, "build": build})
    except getattr(remote_runner, "Unavailable", RuntimeError) as exc:
        return {"ran": False, "reason": str(exc).replace("{device}", "this host")}
    except Exception as exc:  # noqa: BLE001  (the runtime raises RuntimeError and friends at load)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        hint = ""
        if build.get("quantize") == "standard":
            hint = (
                " (the standard recipe quantizes ops next to ones XNNPACK does not take, such as T2T-ViT's "
                "soft-split pad; quantize: linear_conv loads)"
            )
        raise T2tedgeError(f"the executorch program does not load: {type(exc).__name__}: {first}{hint}") from None
    logits = model(images)
    reference_model = inputs.torch_model if inputs.torch_model is not None else inputs.export_form
    with torch.no_grad():
        reference = reference_model.eval()(torch.from_numpy(images)).numpy()
    return {
        "ran": True,
        "runtime": "executorch.runtime.Runtime (threads: " + str(model.facts["threads"]) + ")",
        "images": int(len(images)),
        "images_from": source,
        "reference": "eager FP32 torch model",
        "max_abs_logit_diff": float(np.max(np.abs(logits - reference))),
        "max_abs_logit": float(np.max(np.abs(reference))),
        "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1)) * 100.0),
        "finite": bool(np.isfinite(logits).all()),
    }


register_target(ExecuTorchTarget())
