"""Contract tests: every registered target x every precision it offers, and every registered model spec.

A target passes when its build writes an artifact the store can finish, its payload is in the manifest,
its runner honours the Runner contract (label, emulation, fixed batch, runtime facts) and returns finite
logits of the right shape, and its device loader is self-contained (the SSH runner gets its source).
A spec passes when it builds, counts, exports (checked against PyTorch) and round-trips a checkpoint.
"""

from __future__ import annotations

import ast
import builtins
import json
import symtable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from t2tedge.calibration.onnx_session import OnnxSession
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.devices import remote_runner
from t2tedge.models import get_spec, graph_form, list_specs, load_model, save_checkpoint
from t2tedge.models.conditioning import well_conditioned
from t2tedge.models.counting import count_macs
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.export import export_onnx, torch_logits
from t2tedge.pipeline.store import Artifact, ArtifactStore
from t2tedge.targets import (
    EMULATED,
    MEASURED,
    BuildInputs,
    Target,
    TargetConfig,
    list_targets,
    load_verified,
    loader_source,
    payload_files,
)

SIZE = 32
MODEL = "mobilenet_v3_small"
TARGET_PRECISIONS = [(t.name, p) for t in list_targets() for p in t.precisions]


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """24 real Fashion-MNIST images at 32 px and their labels: 8 calibrate, 8 are held out, 8 are run."""
    dataset = open_dataset("fashion_mnist:train")
    pre = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
    return preprocess(dataset, np.arange(24), pre, "images"), dataset.labels[:24]


@pytest.fixture(scope="module")
def model(images: tuple[np.ndarray, np.ndarray]) -> tuple[torch.nn.Module, Path]:
    """A small MobileNetV3 with well-conditioned random weights and its ONNX export."""
    torch.manual_seed(0)
    net = well_conditioned(get_spec(MODEL).create(num_classes=10, image_size=SIZE), images[0][:8])
    path = Path(__import__("tempfile").mkdtemp(prefix="t2tedge-contract-")) / "model.onnx"
    export_onnx(net, SIZE, path)
    return net, path


def _build(target: Target, precision: str, model: Any, images: Any, root: Path) -> Artifact:
    net, onnx_path = model
    pixels, labels = images
    spec = get_spec(MODEL)
    inputs = BuildInputs(
        onnx_path=onnx_path,
        image_size=SIZE,
        num_classes=10,
        calibration=pixels[:8],
        heldout=pixels[8:16],
        heldout_labels=labels[8:16],
        torch_model=net,
        export_form=graph_form(net),
        hints=spec.quantization,
        preprocess=Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear").to_dict(),
    )
    with ArtifactStore(root).build(MODEL, target.name, precision, {"contract": precision}) as job:
        facts = target.build(inputs, precision, target.Config(), job.dir)
        json.dumps(facts)  # manifest-ready
        io = {"family": spec.family, "image_size": SIZE, "num_classes": 10, "classes": [], "preprocess": {}}
        job.manifest.update({"build": facts, "model_io": io})
    return job.artifact


@pytest.mark.parametrize(("target_name", "precision"), TARGET_PRECISIONS)
def test_every_target_and_precision_honours_the_contract(
    target_name: str, precision: str, model: Any, images: Any, tmp_path: Path
) -> None:
    target = next(t for t in list_targets() if t.name == target_name)
    availability = target.availability()
    if not availability.can_build:
        pytest.skip(f"{target_name} cannot build here: {availability.reason}")
    artifact = _build(target, precision, model, images, tmp_path)
    manifest = artifact.manifest
    assert manifest["target"] == target_name and manifest["precision"] == precision
    assert isinstance(manifest["build"], dict)
    payload = payload_files(target, artifact)
    assert payload and set(payload) <= set(manifest["files"])
    if not (availability.can_run or availability.can_emulate):
        pytest.skip(f"{target_name} cannot run or emulate here: {availability.reason}")
    runner = load_verified(target, artifact, threads=1)
    assert runner.label in (MEASURED, EMULATED)
    assert (runner.emulation is None) == (runner.label == MEASURED)
    assert runner.fixed_batch is None or (isinstance(runner.fixed_batch, int) and runner.fixed_batch > 0)
    assert isinstance(runner.runtime_facts, dict) and json.dumps(runner.runtime_facts)
    logits = runner(images[0][16:19])
    assert logits.shape == (3, 10) and np.isfinite(logits).all()
    if availability.can_run and target.capabilities.device_loader is not None:
        # the SSH runner's path: the loader's source alone, exec'd with the runner module as its kit
        request = {
            "target": target_name,
            "loader": loader_source(target.capabilities),
            "threads": 1,
            "build": manifest["build"],
        }
        remote = remote_runner.load(str(artifact.path), request)
        np.testing.assert_array_equal(remote(images[0][16:19]), logits)


def test_a_changed_file_is_refused_before_it_is_loaded(model: Any, images: Any, tmp_path: Path) -> None:
    from t2tedge.errors import ArtifactError

    target = next(t for t in list_targets() if t.name == "onnxruntime")
    artifact = _build(target, "fp32", model, images, tmp_path)
    path = artifact.file("model.onnx")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="changed since it was built"):
        load_verified(target, artifact)


@pytest.mark.parametrize("target", list_targets(), ids=lambda t: t.name)
def test_every_target_declares_its_config_and_capabilities(target: Target) -> None:
    assert issubclass(target.Config, TargetConfig)
    config = target.Config()
    assert set(TargetConfig.SHARED) <= set(type(config).model_fields)
    assert target.Config.model_validate(config.model_dump()) == config  # defaults round-trip
    with pytest.raises(ValidationError):
        target.Config(no_such_key=1)
    caps = target.capabilities
    assert caps.payload and isinstance(caps.device_runtime, str) and caps.device_runtime
    assert set(caps.peaks) <= set(target.precisions)
    assert set(target.precisions) and all(isinstance(target.needs_calibration(p), bool) for p in target.precisions)


def _free_globals(source: str) -> set[str]:
    """Global names a module's functions read, nested functions included (not attributes)."""
    names: set[str] = set()
    stack = list(symtable.symtable(source, "<loader>", "exec").get_children())
    while stack:
        table = stack.pop()
        if table.get_type() == "function":
            names |= {n for n in table.get_globals()}
        stack.extend(table.get_children())
    return names


@pytest.mark.parametrize(
    "target", [t for t in list_targets() if t.capabilities.device_loader is not None], ids=lambda t: t.name
)
def test_device_loaders_are_self_contained_python_3_8(target: Target) -> None:
    source = loader_source(target.capabilities)["source"]
    ast.parse(source, feature_version=(3, 8))  # JetPack 5's python
    module_level = {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    missing = _free_globals(source) - set(dir(builtins)) - module_level
    assert not missing, f"{target.name}'s device loader reads names it does not define: {sorted(missing)}"


SPECS = [spec.name for spec in list_specs()]


@pytest.mark.parametrize("name", SPECS)
def test_every_model_spec_builds_counts_exports_and_round_trips(name: str, tmp_path: Path) -> None:
    spec = get_spec(name)
    size = max(SIZE, spec.size_multiple or 1)
    torch.manual_seed(0)
    net = spec.create(num_classes=10, image_size=size)
    assert count_macs(net, size) > 0
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    reference = torch_logits(net, x)
    assert reference.shape == (2, 10)
    export_onnx(net, size, tmp_path / "model.onnx")
    exported = OnnxSession(tmp_path / "model.onnx")(x)
    scale = float(np.abs(reference).max())
    assert np.abs(exported - reference).max() <= 1e-4 * max(scale, 1.0)
    save_checkpoint(tmp_path / "model.pth", net, {"model": name})
    loaded = load_model(spec, tmp_path / "model.pth", image_size=size)
    assert loaded.num_classes == 10
    np.testing.assert_array_equal(torch_logits(loaded.model, x), reference)


TARGETS_DIR = Path(__file__).resolve().parent.parent / "t2tedge" / "targets"


@pytest.mark.parametrize("target", list_targets(), ids=lambda t: t.name)
def test_a_target_imports_no_other_target_and_names_no_model(target: Target) -> None:
    import inspect

    import t2tedge.models.mobilenet
    import t2tedge.models.t2t_vit

    module = inspect.getmodule(type(target))
    source = Path(module.__file__).read_text()
    own = {module.__name__.rpartition(".")[2], target.name}
    for node in ast.walk(ast.parse(source)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name.startswith("t2tedge.targets.") and name != "t2tedge.targets.base":
                leaf = name.rpartition(".")[2]
                assert any(leaf.startswith(f"{o}_") for o in own), f"{target.name} imports {name}"
            # models are an earlier layer: registry lookups only, never their modules' classes
            assert name not in ("t2tedge.models.t2t_vit", "t2tedge.models.mobilenet"), f"{target.name} imports {name}"
    model_classes = {
        name
        for mod in (t2tedge.models.t2t_vit, t2tedge.models.mobilenet)
        for name, obj in vars(mod).items()
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__ == mod.__name__
    }
    families = {spec.family for spec in list_specs()}
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None
    }
    # code, not prose: names, attributes and string values (a family compared, a class looked up)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }
    named = used & (model_classes | families)
    assert not named, f"{target.name} names {sorted(named)}"
