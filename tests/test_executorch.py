"""The ExecuTorch target on tiny models: fp32/int8 programs through XNNPACK, run by the ExecuTorch runtime."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.exir", reason="executorch is not installed (pip install executorch==1.5.1)")
pytest.importorskip("executorch.runtime", reason="the executorch runtime is not importable")

from pydantic import ValidationError  # noqa: E402

import t2tedge.targets.executorch as et  # noqa: E402
from t2tedge.artifact import Artifact, write_json  # noqa: E402
from t2tedge.calibration import select_indices  # noqa: E402
from t2tedge.data.cache import preprocess  # noqa: E402
from t2tedge.data.datasets import open_dataset  # noqa: E402
from t2tedge.devices import remote_runner  # noqa: E402
from t2tedge.errors import T2tedgeError  # noqa: E402
from t2tedge.models import get_spec  # noqa: E402
from t2tedge.models.conditioning import well_conditioned  # noqa: E402
from t2tedge.models.spec import Preprocess  # noqa: E402
from t2tedge.targets.base import BuildInputs, get_target  # noqa: E402

SIZE = 32
# a one-block T2T-ViT-7 (both Performer token layers, row-gather soft splits, one backbone block)
TINY_T2T = {"depth": 1, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2.0, "token_dim": 16}
TINY_MNV2 = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]
# measured: the fp32 program is within ~4e-7 of eager (relative to the largest logit)
FP32_RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST images at 32 px: 16 calibration (train), 32 to compare on (test)."""
    pre = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
    train, test = open_dataset("fashion_mnist:train"), open_dataset("fashion_mnist:test")
    calibration = preprocess(train, select_indices(train.labels, 16, seed=0), pre, "calibration")
    return calibration, preprocess(test, select_indices(test.labels, 32, seed=0), pre, "test")


def _inputs(model: torch.nn.Module, calibration: np.ndarray | None) -> BuildInputs:
    form = model.export_form() if hasattr(model, "export_form") else None
    return BuildInputs(
        onnx_path=Path("unused"),
        image_size=SIZE,
        num_classes=10,
        calibration=calibration,
        torch_model=model,
        export_form=form,
    )


def _build(inputs: BuildInputs, precision: str, out: Path, **config: Any) -> Artifact:
    out.mkdir(parents=True)
    facts = et.ExecuTorchTarget().build(inputs, precision, et.ExecuTorchConfig(**config), out)
    write_json(out / "manifest.json", {"target": "executorch", "precision": precision, "build": facts})
    return Artifact(out)


@pytest.fixture(scope="module")
def tiny_t2t(images: tuple[np.ndarray, np.ndarray]) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_spec("t2t_vit_7").create(num_classes=10, image_size=SIZE, **TINY_T2T)


@pytest.fixture(scope="module")
def t2t_fp32(tmp_path_factory: pytest.TempPathFactory, tiny_t2t: torch.nn.Module, images: Any) -> Artifact:
    return _build(_inputs(tiny_t2t, images[0]), "fp32", tmp_path_factory.mktemp("et") / "t2t-fp32")


@pytest.fixture(scope="module")
def t2t_int8(tmp_path_factory: pytest.TempPathFactory, tiny_t2t: torch.nn.Module, images: Any) -> Artifact:
    return _build(_inputs(tiny_t2t, images[0]), "int8", tmp_path_factory.mktemp("et") / "t2t-int8")


def _eager(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == reference.argmax(1)) * 100)


def test_registered_available_and_versions() -> None:
    target = get_target("executorch")
    assert isinstance(target, et.ExecuTorchTarget)
    assert target.precisions == ("fp32", "int8")
    assert target.availability().can_build and target.availability().can_run
    assert set(target.tool_versions()) == {"executorch", "torch", "torchao"}
    assert target.tool_versions()["executorch"].startswith("1.5")
    assert target.capabilities.payload == ("model.pte",)
    assert target.capabilities.device_runtime == "executorch"
    assert target.capabilities.device_loader is et.device_load
    assert target.needs_calibration("int8") and not target.needs_calibration("fp32")


def test_unavailable_without_executorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # makes `import executorch.exir` fail
    availability = et.ExecuTorchTarget().availability()
    assert not availability.can_build and not availability.can_run
    assert "pip install executorch==1.5.1" in availability.reason


def test_fp32_program_matches_eager(t2t_fp32: Artifact, tiny_t2t: torch.nn.Module, images: Any) -> None:
    runner = et.ExecuTorchTarget().load(t2t_fp32, threads=2)
    assert (runner.label, runner.emulation, runner.fixed_batch) == ("measured", None, 1)
    assert runner.runtime_facts["runtime"] == "executorch"
    assert runner.runtime_facts["threads"] == 2
    test = images[1]
    logits, reference = runner(test), _eager(tiny_t2t, test)  # 32 images through a batch-1 program
    assert logits.shape == (len(test), 10)
    assert np.max(np.abs(logits - reference)) <= FP32_RELATIVE_TOLERANCE * np.max(np.abs(reference))
    build = t2t_fp32.manifest["build"]
    assert build["delegate"] == "xnnpack" and build["form"] == "export form"
    assert build["input_shape"] == [1, 3, SIZE, SIZE]
    assert build["program_check"]["ran"] and build["program_check"]["images"] > 0
    assert (
        build["program_check"]["max_abs_logit_diff"]
        <= FP32_RELATIVE_TOLERANCE * build["program_check"]["max_abs_logit"]
    )


def test_manifest_counts_what_xnnpack_does_not_take(t2t_fp32: Artifact) -> None:
    build = t2t_fp32.manifest["build"]
    assert build["delegated_subgraphs"] >= 1
    assert build["non_delegated_ops"] == sum(build["non_delegated_by_op"].values()) > 0
    assert all(isinstance(v, int) for v in build["non_delegated_by_op"].values())
    # XNNPACK 1.5.1 takes no native LayerNorm, no squeeze and no no-op expand: the target lowers
    # LayerNorm as delegated ops, squeezes as views and drops the expands, so none is left outside
    assert build["layer_norms_as_matmuls"] > 0
    assert not {"native_layer_norm", "squeeze_copy"} & set(build["non_delegated_by_op"])
    assert build["non_delegated_by_op"].get("expand_copy", 0) < build["non_delegated_ops"]
    # the Performer's reductions, its q/k/v split, detaches and the class-token select are rewritten
    # into ops XNNPACK takes; what is left outside is the soft split's gather and scalar constants
    rewritten = build["rewritten_for_xnnpack"]
    assert {"sum", "amax", "detach", "split", "select", "matmul"} <= set(rewritten), rewritten
    outside = {"sum", "amax", "alias_copy", "split_with_sizes_copy", "select_copy", "expand_copy", "mm", "bmm"}
    assert not outside & set(build["non_delegated_by_op"]), build["non_delegated_by_op"]


class _Reductions(torch.nn.Module):
    """Every op ``delegatable_reductions`` rewrites, each in the forms it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 12), requires_grad=False)
        self.column = torch.nn.Parameter(torch.randn(12, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = x.split(4, dim=-1)  # (B, T, 4) each
        d, e = x.split([5, 7], dim=-1)
        shift = (x @ self.w.t()).amax(dim=1, keepdim=True).detach()  # (B, 1, 6)
        peak = x.amax(dim=-1, keepdim=True).detach()  # (B, T, 1)
        total = (a * b).sum(dim=-1, keepdim=True) + c.sum(dim=1).unsqueeze(-1).mean() + d.sum(dim=1).sum()
        first = x.select(1, 0)  # (B, 12)
        return (x @ self.column) * total - peak + shift.sum(dim=-1, keepdim=True) + first[:, None, :1] + e[..., :1]


def test_delegatable_reductions_are_the_same_function() -> None:
    torch.manual_seed(0)
    model, x = _Reductions().eval(), torch.randn(1, 9, 12)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        counts = et.delegatable_reductions(exported)
        assert counts == {"split": 1, "split_with_sizes": 1, "matmul": 2, "amax": 2, "detach": 2, "sum": 4, "select": 1}
        targets = {node.target for node in exported.graph_module.graph.nodes if node.op == "call_function"}
        ops = torch.ops.aten
        gone = {ops.sum.dim_IntList, ops.amax.default, ops.split.Tensor, ops.select.int, ops.detach.default}
        assert not gone & targets
        # max and the slices are exact; mean times n rounds differently from sum
        assert torch.allclose(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
        changed = x.clone()
        changed[0, 3, 5] += 1.0  # the rewritten graph is a function of its input, not of the example
        assert torch.allclose(exported.module()(changed), model(changed), rtol=1e-5, atol=1e-5)


def test_delegatable_layer_norm_is_the_same_function() -> None:
    norm = torch.nn.LayerNorm(24, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    model, swapped = et.delegatable_layer_norms(torch.nn.Sequential(norm))
    assert swapped == 1 and not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    x = torch.randn(2, 7, 24) * 3 + 5  # an offset the centring must remove; outputs are O(1)
    with torch.no_grad():
        assert torch.max(torch.abs(model(x) - norm(x))) < 1e-5  # float32 rounding (1/C as a constant)


def test_int8_t2t_loads_and_follows_fp32(
    t2t_int8: Artifact, t2t_fp32: Artifact, tiny_t2t: torch.nn.Module, images: Any
) -> None:
    build = t2t_int8.manifest["build"]
    assert build["quantize"] == "linear_conv"
    # the default recipe computes Linear layers in int8 and nothing else (no Performer add/mul)
    assert set(build["quantized_ops"]) == {"linear"}
    assert build["quantized_ops"]["linear"] >= 10
    assert build["calibration"] == {**build["calibration"], "method": "minmax", "images": 16}
    runner = et.ExecuTorchTarget().load(t2t_int8, threads=1)  # no partitioner workaround needed
    test = images[1]
    logits, reference = runner(test), _eager(tiny_t2t, test)
    assert np.isfinite(logits).all()
    assert _agreement(logits, reference) >= 85.0
    assert np.max(np.abs(logits - reference)) <= 0.1 * np.max(np.abs(reference))
    # the int8 program is not the fp32 one: its Linear weights are int8
    assert build["program_bytes"] < 0.5 * t2t_fp32.manifest["build"]["program_bytes"]


def test_int8_mobilenet(tmp_path: Path, images: Any) -> None:
    torch.manual_seed(0)
    # MobileNetV2's blocks (expansion, depthwise, projection, residual add), three stages of them
    model = get_spec("mobilenet_v2").create(num_classes=10, image_size=SIZE, inverted_residual_setting=TINY_MNV2)
    model = well_conditioned(model, images[0])
    artifact = _build(_inputs(model, images[0]), "int8", tmp_path / "mnv2-int8")
    build = artifact.manifest["build"]
    assert build["form"] == "as trained"
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert build["quantized_ops"].get("conv2d", 0) == convs  # every conv, BatchNorm folded in
    assert not {"mul", "cat"} & set(build["quantized_ops"])
    assert build["delegated_subgraphs"] == 1 and build["non_delegated_ops"] == 0
    runner = et.ExecuTorchTarget().load(artifact, threads=2)
    test = images[1]
    logits, reference = runner(test), _eager(model, test)
    assert np.isfinite(logits).all()
    assert _agreement(logits, reference) >= 75.0


class _Toy(torch.nn.Module):
    """Linear + the elementwise ops XNNPACK's standard recipe quantizes and the default leaves float."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.a(x)
        return self.b(u * u + u)


def _toy_quantized_ops(config: et.ExecuTorchConfig) -> dict[str, int]:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    graph = torch.export.export(_Toy().eval(), (x,)).module()
    prepared = prepare_pt2e(graph, et.quantizer_for(config))
    return et.quantized_ops(prepared)


def test_default_recipe_is_linear_conv_not_standard() -> None:
    assert et.ExecuTorchConfig().quantize == "linear_conv"
    default = _toy_quantized_ops(et.ExecuTorchConfig())
    standard = _toy_quantized_ops(et.ExecuTorchConfig(quantize="standard"))
    assert set(default) == {"linear"}, default
    assert {"mul", "add"} <= set(standard), standard  # the recipe that loses T2T-ViT's Performer


class _SoftSplit(torch.nn.Module):
    """T2T-ViT's pattern in small: a Linear, the Performer's elementwise ops, a row-gather soft split (pad)."""

    def __init__(self) -> None:
        super().__init__()
        from t2tedge.models.t2t_vit import RowGatherSplit

        self.a, self.split, self.b = torch.nn.Linear(3, 4), RowGatherSplit(8, 4, 3, 2, 1), torch.nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.a(x.flatten(2).transpose(1, 2))
        return self.b(self.split(u * u + u)).mean(1)


def test_standard_recipe_fails_cleanly_where_the_default_loads(tmp_path: Path) -> None:
    """XNNPACK 1.5.1 cannot load a quantized soft-split pad: one clean error, never a broken artifact."""
    torch.manual_seed(0)
    calibration = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    inputs = BuildInputs(Path("unused"), 8, 5, calibration=calibration, torch_model=_SoftSplit().eval())
    (tmp_path / "default").mkdir()
    facts = et.ExecuTorchTarget().build(inputs, "int8", et.ExecuTorchConfig(), tmp_path / "default")
    assert facts["program_check"]["ran"] and facts["program_check"]["finite"]
    assert facts["quantized_ops"]["linear"] == 2 and "mul" not in facts["quantized_ops"]
    (tmp_path / "standard").mkdir()
    with pytest.raises(T2tedgeError, match="does not load.*linear_conv loads") as info:
        et.ExecuTorchTarget().build(inputs, "int8", et.ExecuTorchConfig(quantize="standard"), tmp_path / "standard")
    assert "\n" not in str(info.value)


def test_device_load_is_self_contained(t2t_fp32: Artifact, images: Any) -> None:
    source = inspect.getsource(et.device_load)
    tree = ast.parse(source, feature_version=(3, 8))
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    assert all(arg.annotation is None for arg in function.args.args) and function.returns is None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert all(n.split(".")[0] in {"os", "numpy", "torch", "executorch"} for n in names), names
    namespace: dict[str, Any] = {}
    exec(compile(source, "<device_load>", "exec"), namespace)  # noqa: S102  (what an SSH device does)
    request = {"threads": 1, "build": t2t_fp32.manifest["build"]}
    remote = namespace["device_load"](remote_runner, str(t2t_fp32.path), request)
    local = et.ExecuTorchTarget().load(t2t_fp32, threads=1)
    x = images[1][:3]
    np.testing.assert_array_equal(remote(x), local(x))
    assert remote.fixed_batch == 1 and remote.input_shape == [3, SIZE, SIZE]


def test_device_load_refuses_a_runtime_without_the_backend(t2t_fp32: Artifact) -> None:
    build = {**t2t_fp32.manifest["build"], "runtime_backend": "NoSuchBackend"}
    with pytest.raises(remote_runner.Unavailable, match="NoSuchBackend"):
        et.device_load(remote_runner, str(t2t_fp32.path), {"threads": None, "build": build})


def test_config_rejects_unknown_keys_and_values() -> None:
    with pytest.raises(ValidationError):
        et.ExecuTorchConfig(bogus=1)
    with pytest.raises(ValidationError):
        et.ExecuTorchConfig(delegate="metal")
    with pytest.raises(ValidationError):
        et.ExecuTorchConfig(quantize="everything")
    config = et.ExecuTorchConfig()
    assert (config.delegate, config.quantize, config.method) == ("xnnpack", "linear_conv", "minmax")
    assert issubclass(et.ExecuTorchTarget.Config, et.TargetConfig)


@pytest.mark.parametrize(
    ("precision", "config", "message"),
    [
        ("fp32", {"bogus": 1}, "quantization.executorch"),
        ("int8", {"delegate": "qnn"}, "qnn"),
        ("int8", {"delegate": "vulkan"}, "xnnpack delegate only"),
        ("int8", {}, "needs calibration images"),
        ("int8", {"max_accuracy_drop": 1.0}, "max_accuracy_drop"),
        ("int8", {"method": "percentile"}, "min/max only"),
        ("fp16", {}, "no precision"),
    ],
)
def test_refusals_are_one_clean_line(
    tmp_path: Path, tiny_t2t: torch.nn.Module, images: Any, precision: str, config: dict, message: str
) -> None:
    calibration = None if message == "needs calibration images" else images[0]
    with pytest.raises(T2tedgeError, match=message) as info:
        et.ExecuTorchTarget().build(_inputs(tiny_t2t, calibration), precision, config, tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model.pte").exists()
