"""Build recipes: YAML validated by pydantic before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from t2tedge.errors import RecipeError

BUNDLED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    name: str
    weights: str = Field(
        "demo",
        description="'demo' (bundled Fashion-MNIST), 'imagenet' (published), 'random', or a checkpoint path",
    )
    image_size: int | None = Field(
        None, gt=0, description="input size; default: the checkpoint's or the spec's"
    )


class DataConfig(_Strict):
    validation: str = Field(
        "fashion_mnist:test", description="labelled set for accuracy: dataset name, folder or CSV"
    )
    calibration: str = Field(
        "fashion_mnist:train", description="calibration images: dataset name, folder or CSV"
    )
    limit: int | None = Field(None, gt=0, description="validate on the first N images only (class-balanced)")


class ExportConfig(_Strict):
    opset: int = Field(18, ge=17, le=21)
    dynamic_batch: bool = False
    parity_images: int = Field(32, gt=0, description="real images used to check the export against PyTorch")


class CalibrationConfig(_Strict):
    size: int = Field(300, gt=0)
    seed: int = 0
    allow_fewer: bool = False


class Recipe(_Strict):
    name: str = "build"
    output_dir: Path = Path("artifacts")
    models: list[ModelEntry] = Field(min_length=1)
    targets: list[str] = Field(default_factory=lambda: ["onnxruntime"], min_length=1)
    precisions: list[str] = Field(default_factory=lambda: ["fp32"], min_length=1)
    data: DataConfig = DataConfig()
    export: ExportConfig = ExportConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    threads: int | None = Field(None, gt=0, description="runtime threads for validation; default: all cores")

    @field_validator("models", mode="before")
    @classmethod
    def _names_to_entries(cls, value: Any) -> Any:
        # `models: [t2t_vit_7, mobilenet_v2]` is shorthand for entries with default weights.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe; CLI overrides replace top-level keys. Errors name the field."""
    path = Path(path)
    if not path.is_file():
        bundled = BUNDLED_RECIPES / f"{path.name}.yaml"
        if bundled.is_file() and path.suffix == "":
            path = bundled
        else:
            raise RecipeError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must be a mapping of recipe keys")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "recipe"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RecipeError(f"{path}: {where}: {first['msg']}{more}") from None
