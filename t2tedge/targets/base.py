"""The one protocol every target implements, and the registry that finds them by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from t2tedge.errors import ArtifactError, T2tedgeError
from t2tedge.pipeline.store import Artifact


@dataclass(frozen=True)
class Availability:
    """Can this host build the target's artifacts, and can it run them? If not, why."""

    can_build: bool
    can_run: bool
    reason: str = ""
    # Where the real runtime cannot run here, a stand-in may run the same graph or math; its numbers
    # are labelled `emulated`, never `measured`.
    can_emulate: bool = False


class Runner(Protocol):
    """Runs an artifact: NCHW float32 images in, logits out.

    A runner may carry ``label = "emulated"`` and ``emulation = "<how>"`` when it is a stand-in for
    the target's real runtime; without them its numbers count as measured.
    """

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class BuildInputs:
    """What a target build consumes: the exported model and the stage config."""

    onnx_path: Path
    image_size: int
    num_classes: int
    family: str
    config: dict[str, Any]
    calibration: np.ndarray | None = None
    # A held-out split of the calibration source (disjoint from `calibration`): what choices score on.
    heldout: np.ndarray | None = None
    # Their labels: what accuracy-aware quantization scores on (never the validation set).
    heldout_labels: np.ndarray | None = None
    # Targets that convert from PyTorch rather than ONNX (Core ML) get the FP32 model itself.
    torch_model: Any = None
    # The model's quantization hints (ModelSpec.quantization): what must stay float, by module path.
    hints: Any = None
    # For accuracy-aware quantization: a labelled validation subset and its FP32 reference logits.
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None


class Target(Protocol):
    """A deployment target: builds artifacts from the exported model and loads them to run."""

    name: str
    precisions: tuple[str, ...]
    # Glob patterns of the files a device needs to run the artifact (without build-side extras).
    payload: tuple[str, ...]

    def availability(self) -> Availability: ...

    def needs_calibration(self, precision: str) -> bool: ...

    def tool_versions(self) -> dict[str, str]: ...

    def build(self, inputs: BuildInputs, precision: str, out_dir: Path) -> dict[str, Any]:
        """Write the artifact files into ``out_dir``; return facts for the manifest."""
        ...

    def load(self, artifact: Artifact, threads: int | None = None) -> Runner: ...


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Add a target instance to the registry."""
    _TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    """A target by name; unknown names list the known ones."""
    try:
        return _TARGETS[name]
    except KeyError:
        raise T2tedgeError(f"unknown target {name!r}; known targets: {', '.join(sorted(_TARGETS))}") from None


def list_targets() -> list[Target]:
    return list(_TARGETS.values())


def payload_files(target: Target, artifact: Artifact) -> dict[str, Path]:
    """What ships to the device, by path relative to the artifact (directories such as .mlpackage expanded)."""
    files: dict[str, Path] = {}
    for pattern in target.payload:
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
