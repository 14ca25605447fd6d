"""The one protocol every target implements, the runner contract, and the registry that finds targets.

A target is one module: its typed ``Config`` (defaults in one place), its capabilities as data, a
``build`` that writes files and a ``load`` that returns a :class:`Runner`. Nothing here knows a target
or a model by name; models speak through :class:`~t2tedge.models.spec.QuantizationHints`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from t2tedge.artifact import Artifact
from t2tedge.errors import ArtifactError, T2tedgeError
from t2tedge.evaluation.accuracy import MEASURED

if TYPE_CHECKING:  # the models package imports torch and torchvision: not at recipe validation
    from t2tedge.models.spec import QuantizationHints


@dataclass(frozen=True)
class Availability:
    """Can this host build the target's artifacts, and can it run them? If not, why."""

    can_build: bool
    can_run: bool
    reason: str = ""
    # Where the real runtime cannot run here, a stand-in may run the same graph or math; its numbers
    # are labelled `emulated`, never `measured`.
    can_emulate: bool = False


class TargetConfig(BaseModel):
    """Settings every target shares (the recipe's ``quantization.*`` keys); a target's Config extends it.

    The recipe validates ``quantization.<target>`` against the target's Config when it is loaded; the
    target receives the validated object, so its defaults live here and in its own Config only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["minmax", "percentile", "entropy"] = Field("minmax", description="calibration range method")
    percentile: float = Field(99.999, gt=50, le=100, description="kept share of |activations| for 'percentile'")
    max_accuracy_drop: float | None = Field(
        None, gt=0, description="top-1 points; enables accuracy-aware quantization (scored on calibration.heldout)"
    )
    accuracy_subset: int = Field(300, gt=0, description="held-out images accuracy-aware quantization scores on")

    # the shared keys, by name: the recipe puts them at `quantization.<key>` and each target inherits them
    SHARED: ClassVar[tuple[str, ...]] = ("method", "percentile", "max_accuracy_drop", "accuracy_subset")


class Runner(Protocol):
    """Runs an artifact: NCHW float32 images in, logits out. Read by bench/validate as plain attributes.

    ``label``: ``measured`` (the target's runtime ran it) or ``emulated`` (a stand-in, in the target's
    arithmetic). ``emulation``: how, for emulated runners (None when measured). ``fixed_batch``: the
    batch the artifact was built for (None: any). ``runtime_facts``: what the runtime really used
    (version, device, precision actually run, threads), recorded with every result.
    """

    label: str
    emulation: str | None
    fixed_batch: int | None
    runtime_facts: dict[str, Any]

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class DeviceRunner:
    """A :class:`Runner` over a target's device loader: the same code runs locally and on an SSH device."""

    emulation: str | None = None

    def __init__(self, model: Any, label: str = MEASURED) -> None:
        self.model = model
        self.label = label
        self.fixed_batch: int | None = model.fixed_batch
        self.runtime_facts: dict[str, Any] = dict(model.facts)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.model(images)


@dataclass(frozen=True)
class Capabilities:
    """What a target offers, as data that bench, validate, the report and the device runner read.

    ``payload``: glob patterns of the files a device needs (without build-side extras).
    ``device_runtime``: the Python module a device must import to run the artifact.
    ``device_loader``: a self-contained function ``(kit, directory, request) -> kit.Model`` (standard
    library, numpy and the runtime only; Python 3.8), shipped by source to SSH devices and called by the
    target's own ``load()`` here, so both run the same loading code. ``kit`` is
    :mod:`t2tedge.devices.remote_runner` (``Model``, ``Unavailable``, ``import_runtime``, ``static``);
    ``request`` holds ``threads`` and ``build`` (the manifest's build facts), and on devices more.
    ``device_systems``: the ``platform.system()`` values a device must run (empty: any).
    ``rule_files``: package-relative globs of the files whose rules decide the artifact besides the
    target's own module (a lint, a shipped script, an emulation): they are part of the artifact's key.
    ``peaks``: precision -> the key of the host peak GEMM rate the artifact is measured against, with
    ``{fact}`` placeholders filled from the runner's ``runtime_facts``; a precision absent has no peak.
    ``tune_knobs``: ``(config key, values)`` of the int8 settings ``t2tedge tune`` tries, one at a time
    and then combined; ``float_modules`` in the Config (module-path globs kept float) is how it tries
    the model's layer groups, so a target without that key gets no group choices.
    """

    payload: tuple[str, ...]
    device_runtime: str
    device_loader: Callable[..., Any] | None = None
    device_systems: tuple[str, ...] = ()
    rule_files: tuple[str, ...] = ()
    peaks: Mapping[str, str] = field(default_factory=dict)
    tune_knobs: tuple[tuple[str, tuple[Any, ...]], ...] = ()


def loader_source(capabilities: Capabilities) -> dict[str, str]:
    """The device loader as the SSH runner receives it: its function name and self-contained source."""
    import inspect
    import textwrap

    loader = capabilities.device_loader
    if loader is None:
        raise T2tedgeError("this target has no device loader")
    return {"name": loader.__name__, "source": textwrap.dedent(inspect.getsource(loader))}


def peak_key(capabilities: Capabilities, precision: str, runtime_facts: Mapping[str, Any]) -> str | None:
    """The peak a measured artifact is compared with, or None (no peak for it, or a fact missing)."""
    pattern = capabilities.peaks.get(precision)
    if pattern is None:
        return None
    try:
        return pattern.format(**runtime_facts)
    except (KeyError, IndexError):
        return None


def _no_hints() -> QuantizationHints:
    from t2tedge.models.spec import QuantizationHints

    return QuantizationHints()


@dataclass
class BuildInputs:
    """What a target build consumes besides its Config: the exported model, data and the model's hints."""

    onnx_path: Path
    image_size: int
    num_classes: int
    calibration: np.ndarray | None = None
    # A held-out split of the calibration source (disjoint from `calibration`): what choices score on.
    heldout: np.ndarray | None = None
    # Their labels: what accuracy-aware quantization scores on (never the validation set).
    heldout_labels: np.ndarray | None = None
    # Targets that convert from PyTorch rather than ONNX (Core ML, ExecuTorch) get the FP32 model itself.
    torch_model: Any = None
    # The same model in its graph form (T2T-ViT: soft splits as row gathers, what ONNX was exported from);
    # None where the model has no other form.
    export_form: Any = None
    # The model's quantization hints (ModelSpec.quantization): what must stay float, NNCF's model type.
    hints: QuantizationHints = field(default_factory=_no_hints)
    # The model's eval preprocessing ({"mean": [...], "std": [...], ...}), for targets that take images.
    preprocess: dict[str, Any] = field(default_factory=dict)


class Target(Protocol):
    """A deployment target: builds artifacts from the exported model and loads them to run."""

    name: str
    precisions: tuple[str, ...]
    Config: type[TargetConfig]
    capabilities: Capabilities

    def availability(self) -> Availability: ...

    def needs_calibration(self, precision: str) -> bool: ...

    def tool_versions(self) -> dict[str, str]: ...

    def build(self, inputs: BuildInputs, precision: str, config: Any, out_dir: Path) -> dict[str, Any]:
        """Write the artifact files into ``out_dir``; return facts for the manifest."""
        ...

    def load(self, artifact: Artifact, threads: int | None = None) -> Runner: ...


_TARGETS: dict[str, Target] = {}
# name -> module that registers it when first asked for (a target's module may import torch; a recipe
# that names no target section, or `t2tedge --help`, should not pay for that)
_MODULES: dict[str, str] = {}


def register_target(target: Target) -> Target:
    """Add a target instance to the registry (its module calls this when imported)."""
    _TARGETS[target.name] = target
    return target


def register_module(name: str, module: str) -> None:
    """Name a target and the module that registers it; the module is imported when the target is needed."""
    _MODULES[name] = module


def target_names() -> list[str]:
    """Every registered target's name, without importing any target module."""
    return sorted(set(_TARGETS) | set(_MODULES))


def get_target(name: str) -> Target:
    """A target by name; unknown names list the known ones."""
    if name not in _TARGETS and name in _MODULES:
        import importlib

        importlib.import_module(_MODULES[name])
    try:
        return _TARGETS[name]
    except KeyError:
        raise T2tedgeError(f"unknown target {name!r}; known targets: {', '.join(target_names())}") from None


def list_targets() -> list[Target]:
    """Every registered target, in registration order (their modules imported)."""
    return [get_target(name) for name in dict.fromkeys([*_MODULES, *_TARGETS])]


def load_verified(target: Target, artifact: Artifact, threads: int | None = None) -> Runner:
    """``target.load`` after every file of the artifact was checked against its manifest's sha256."""
    artifact.verify()
    return target.load(artifact, threads)


def payload_files(target: Target, artifact: Artifact) -> dict[str, Path]:
    """What ships to the device, by path relative to the artifact (directories such as .mlpackage expanded)."""
    files: dict[str, Path] = {}
    for pattern in target.capabilities.payload:
        matches = sorted(artifact.path.glob(pattern))
        if not matches:
            raise ArtifactError(f"{artifact.path} has no {pattern}; rebuild the artifact")
        for path in matches:
            inside = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            files.update({p.relative_to(artifact.path).as_posix(): p for p in inside})
    return files


def payload_bytes(target: Target, artifact: Artifact) -> int:
    """Size on disk of what ships to the device."""
    return sum(p.stat().st_size for p in payload_files(target, artifact).values())


def check_precision(target: Target, precision: str) -> None:
    """Refuse a precision the target does not offer, listing the ones it does."""
    if precision not in target.precisions:
        raise T2tedgeError(
            f"target {target.name} has no precision {precision!r}; it offers: {', '.join(target.precisions)}"
        )
