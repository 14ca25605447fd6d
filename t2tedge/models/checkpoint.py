"""Checkpoint loading: one safe path from a file to a strictly loaded model.

Official T2T-ViT checkpoints are `.pth.tar` files written by timm 0.3.x: a dict holding
`state_dict_ema` and/or `state_dict` (keys prefixed `module.` when trained with DDP). Our own
checkpoints add a `t2tedge` metadata dict (model name, class names, image size, preprocessing).
Every load uses `weights_only=True`: a file that needs pickled code is refused, never executed.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2tedge.errors import CheckpointError
from t2tedge.models.spec import ModelSpec, Preprocess

_STATE_KEYS = ("state_dict_ema", "state_dict", "model")


@dataclass
class Checkpoint:
    """A state dict plus whatever metadata the file carried."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    source_key: str = "bare"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file safely and pick its state dict (EMA first, as the paper reports)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Only a GLOBAL reference (a class or function to import) means "needs code"; other
        # unpickler complaints are plain corruption.
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(
                f"refused {path}: it needs pickled Python code to load (weights_only=True); "
                "re-save it as a plain state dict"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt, or not a PyTorch file)") from None
    except Exception as exc:  # noqa: BLE001  (a corrupt file can fail anywhere inside the unpickler)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("t2tedge", {}) if isinstance(obj.get("t2tedge"), dict) else {}
    source_key = next((k for k in _STATE_KEYS if isinstance(obj.get(k), dict)), "bare")
    state = obj[source_key] if source_key != "bare" else obj
    tensors = {_strip_prefix(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors (looked in {', '.join(_STATE_KEYS)} and the top level)")
    return Checkpoint(state_dict=tensors, meta=meta, source_key=source_key)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file, `module.` prefixes stripped."""
    return read_checkpoint(path).state_dict


def _strip_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def num_classes_of(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> int:
    """The class count a checkpoint was trained for, read from its classifier weight."""
    weight = state_dict.get(spec.classifier_key)
    if weight is None:
        raise CheckpointError(
            f"checkpoint has no {spec.classifier_key!r}: it is not a {spec.name} checkpoint "
            f"(first keys: {', '.join(list(state_dict)[:3])})"
        )
    return int(weight.shape[0])


def load_into(model: nn.Module, spec: ModelSpec, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Strictly load a state dict, naming the first mismatches when it is for another architecture."""
    if spec.checkpoint_filter is not None:
        state_dict = spec.checkpoint_filter(dict(state_dict), model)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
        raise CheckpointError(f"{origin} does not fit {spec.name}: " + ", ".join(parts))
    model.load_state_dict(state_dict, strict=True)


@dataclass
class LoadedModel:
    """A model ready for export, with the facts needed to feed it."""

    spec: ModelSpec
    model: nn.Module
    num_classes: int
    image_size: int
    preprocess: Preprocess
    classes: list[str] = field(default_factory=list)
    weights: str = "random"


def load_model(
    spec: ModelSpec,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build ``spec`` and load a checkpoint into it (random init when ``checkpoint`` is None).

    Class count, image size and preprocessing come from the checkpoint's own metadata when it has
    some (t2tedge checkpoints do), else from the classifier shape and the spec's defaults.
    """
    if checkpoint is None:
        size = image_size or spec.preprocess.input_size
        model = spec.create(num_classes=num_classes or 1000, image_size=size)
        pre = spec.preprocess if size == spec.preprocess.input_size else spec.preprocess.at_size(size)
        return LoadedModel(spec, model, num_classes or 1000, size, pre)
    ckpt = read_checkpoint(checkpoint)
    meta = ckpt.meta
    if meta.get("model") and meta["model"] != spec.name:
        raise CheckpointError(f"{checkpoint} was trained as {meta['model']!r}, not {spec.name!r}")
    classes_found = num_classes_of(spec, ckpt.state_dict)
    if num_classes is not None and num_classes != classes_found:
        raise CheckpointError(f"{checkpoint} has {classes_found} classes, not the {num_classes} asked for")
    pre = _preprocess_of(meta["preprocess"], checkpoint) if "preprocess" in meta else spec.preprocess
    classes = meta.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{checkpoint}: its metadata 'classes' is not a list of class names")
    if image_size is not None and image_size != pre.input_size:
        pre = pre.at_size(image_size)
    model = spec.create(num_classes=classes_found, image_size=pre.input_size)
    load_into(model, spec, ckpt.state_dict, str(checkpoint))
    return LoadedModel(
        spec,
        model.eval(),
        classes_found,
        pre.input_size,
        pre,
        classes=list(classes),
        weights=str(checkpoint),
    )


def _preprocess_of(data: Any, checkpoint: str | Path) -> Preprocess:
    """The preprocessing a checkpoint's metadata names; a clear error when it is not one."""
    problem = f"{checkpoint}: its metadata 'preprocess' is unusable"
    if not isinstance(data, dict):
        raise CheckpointError(f"{problem} (a {type(data).__name__}, not a mapping)")
    sizes = [data.get("input_size"), data.get("resize_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 8192 for v in sizes):
        raise CheckpointError(f"{problem} (input_size and resize_size must be whole numbers of pixels)")
    for key in ("mean", "std"):
        values = data.get(key)
        numbers = isinstance(values, list | tuple) and len(values) == 3
        if not numbers or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{problem} ({key} must be three numbers)")
    if not isinstance(data.get("interpolation"), str) or not all(v != 0 for v in data["std"]):
        raise CheckpointError(f"{problem} (interpolation must be a name and std non-zero)")
    return Preprocess.from_dict(data)


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save in the official layout (`state_dict` + our metadata), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), "t2tedge": meta}, tmp)
    tmp.replace(path)
