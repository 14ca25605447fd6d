"""Model specs: one record per variant that carries its builder, preprocessing and paper facts.

The preprocessing travels with the spec (as torchvision's weights enums do), so calibration and
validation ask the spec for the transform and nobody re-types mean/std.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from t2tedge.errors import UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize the short side, center-crop, normalize."""

    input_size: int = 224
    resize_size: int = 248
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_crop_pct(cls, input_size: int, crop_pct: float, **kwargs: Any) -> Preprocess:
        """timm's convention: resize to floor(input_size / crop_pct), then crop input_size."""
        return cls(input_size=input_size, resize_size=math.floor(input_size / crop_pct), **kwargs)

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    def at_size(self, input_size: int) -> Preprocess:
        """The same recipe at another input size (keeps crop_pct)."""
        return replace(self, input_size=input_size, resize_size=math.floor(input_size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class PaperFacts:
    """Reference numbers from the paper or the weights' model card (ImageNet-1k, 224 px)."""

    params_m: float | None = None
    macs_g: float | None = None
    top1: float | None = None
    source: str = ""


@dataclass(frozen=True)
class QuantizationHints:
    """What a model tells the targets about quantizing it; targets read these, never model classes.

    ``model_type``: NNCF's model type (``"transformer"``: SmoothQuant-aware handling of MatMuls and
    LayerNorm); None for NNCF's default (CNNs).
    ``float_modules``: module-path globs whose own arithmetic (not their Linear/Conv layers) stays float
    in quantizers that quantize every op (Core ML's w8a8, ExecuTorch's standard recipe): T2T-ViT's
    Performer kernel, whose exponentials and normalizer lose everything at 8 bits.
    ``float_matmul_modules``: module-path globs whose own activation x activation MatMuls (attention
    scores, attention x values, the Performer products) stay out of INT8 in quantizers that would put
    them in (NNCF's transformer mode); their Linear layers are still quantized.
    ``fp16_overflow``: module-path globs known to leave FP16's range in their direct form (informational:
    the FP16 range check finds overflow from data either way).
    ``groups``: ``(name, module-path globs)`` of the layer groups whose INT8 placement is one choice for
    ``t2tedge tune`` (keep the group float or not); empty: tuning tries only the targets' own knobs.
    """

    model_type: str | None = None
    float_modules: tuple[str, ...] = ()
    float_matmul_modules: tuple[str, ...] = ()
    fp16_overflow: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """Everything t2tedge knows about one model variant.

    ``builder(num_classes=..., image_size=..., **kwargs)`` returns an ``nn.Module`` in eval mode.
    ``classifier_key`` names the state-dict entry whose first dimension is the class count, so a
    checkpoint tells us its own ``num_classes``. ``size_multiple`` constrains the input size.
    ``pretrained_url`` is where the published ImageNet weights live (read from the torch hub cache
    when offline). ``checkpoint_filter(state_dict, model)`` adapts a foreign state dict (timm's
    ``checkpoint_filter_fn``); it is the only place where checkpoint keys or shapes are fixed up.
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    preprocess: Preprocess
    paper: PaperFacts = field(default_factory=PaperFacts)
    classifier_key: str = "head.weight"
    size_multiple: int = 1
    min_size: int = 32
    pretrained_url: str | None = None
    checkpoint_filter: Callable[[dict[str, Any], nn.Module], dict[str, Any]] | None = None
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    quantization: QuantizationHints = field(default_factory=QuantizationHints)

    def create(self, num_classes: int = 1000, image_size: int | None = None, **kwargs: Any) -> nn.Module:
        """Build the model (random init) for ``num_classes`` at ``image_size``."""
        size = image_size or self.preprocess.input_size
        self.check_image_size(size)
        model = self.builder(num_classes=num_classes, image_size=size, **{**self.build_kwargs, **kwargs})
        return model.eval()

    def check_image_size(self, size: int) -> None:
        if size < self.min_size or size % self.size_multiple:
            rule = f"a multiple of {self.size_multiple}" if self.size_multiple > 1 else "an integer"
            raise UnknownModelError(
                f"image size {size} is not valid for {self.name}: it must be {rule} and at least {self.min_size}"
            )


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


def list_specs() -> list[ModelSpec]:
    """All registered specs, in registration order."""
    return list(_REGISTRY.values())


def graph_form(model: nn.Module) -> nn.Module | None:
    """The model's graph form (T2T-ViT: the same function with soft splits as row gathers, what ONNX and
    the graph-based targets take), or None where the model has only one form."""
    form = getattr(model, "export_form", None)
    return form().eval() if callable(form) else None
