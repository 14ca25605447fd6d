"""Build recipes: YAML validated by pydantic before anything runs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from t2tedge.errors import RecipeError
from t2tedge.evaluation.latency import ROUND_SECONDS, SETTLE_SECONDS, STEADY_RATIO
from t2tedge.targets.base import TargetConfig

BUNDLED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    name: str
    weights: str = Field(
        "demo",
        description="'demo' (bundled Fashion-MNIST), 'imagenet' (published), 'random', or a checkpoint path",
    )
    image_size: int | None = Field(None, gt=0, description="input size; default: the checkpoint's or the spec's")


class DataConfig(_Strict):
    validation: str = Field("fashion_mnist:test", description="labelled set for accuracy: dataset name, folder or CSV")
    calibration: str = Field("fashion_mnist:train", description="calibration images: dataset name, folder or CSV")
    limit: int | None = Field(None, gt=0, description="validate on the first N images only (class-balanced)")
    allow_overlap: bool = Field(
        False,
        description="build although calibration images appear in the validation set; affected numbers are marked",
    )


class ExportConfig(_Strict):
    opset: int = Field(18, ge=17, le=21)
    dynamic_batch: bool = False
    parity_images: int = Field(32, gt=0, description="real images used to check the export against PyTorch")


class CalibrationConfig(_Strict):
    size: int = Field(300, gt=0)
    seed: int = 0
    allow_fewer: bool = False
    heldout: int = Field(
        200, ge=0, description="images of the calibration source, disjoint from the calibration set, that score choices"
    )


class QuantizationConfig(TargetConfig):
    """``quantization:``: the settings every target shares, and one section per target (``quantization.<target>``).

    Each section is validated against that target's own ``Config`` when the recipe loads (an unknown
    target or key is an error naming it); :meth:`for_target` returns the target's validated Config, its
    shared keys taken from here unless the section sets them itself.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _target_sections(self) -> QuantizationConfig:
        from t2tedge.targets import target_names

        known = target_names()
        for name, section in (self.model_extra or {}).items():
            if name not in known:
                raise ValueError(
                    f"unknown key {name!r} (shared keys: {', '.join(self.SHARED)}; targets: {', '.join(known)})"
                )
            if section is not None and not isinstance(section, dict):
                raise ValueError(f"{name} must be a mapping of that target's keys")
            self.for_target(name)
        return self

    def for_target(self, target: str) -> TargetConfig:
        """The target's Config: its own section over the shared keys; a bad value raises naming its key."""
        from t2tedge.targets import get_target

        own = (self.model_extra or {}).get(target) or {}
        shared = {key: getattr(self, key) for key in self.SHARED}
        try:
            return get_target(target).Config.model_validate({**shared, **own})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in (target, *first["loc"]))
            raise ValueError(f"{where}: {first['msg']}") from None


class BenchmarkConfig(_Strict):
    """Latency measurement after the build (like benchmark_app: a minimum count and a minimum time)."""

    enabled: bool = True
    warmup: int = Field(10, ge=0, description="untimed iterations per artifact first")
    min_iters: int = Field(200, gt=0, description="at least this many timed iterations per artifact")
    min_seconds: float = Field(10.0, ge=0, description="and at least this many seconds per artifact")
    round_iters: int = Field(10, gt=0, description="iterations per artifact per interleaved round")
    settle_seconds: float = Field(
        SETTLE_SECONDS, ge=0, description="untimed running after each switch between artifacts (steady state only)"
    )
    round_seconds: float = Field(
        ROUND_SECONDS, ge=0, description="and at least this much timed running per round (bounds the settling's share)"
    )
    steady_ratio: float | None = Field(
        STEADY_RATIO,
        gt=1.0,
        description="a round slower than this x its artifact's best round is set aside and timed again "
        "(the host changed speed); null: every round counts",
    )
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    threads: list[int | None] = Field(
        default_factory=lambda: [None], min_length=1, description="thread counts to sweep; null: all cores"
    )
    efficiency: bool = Field(True, description="measure the host's peak GEMM and report each artifact's share")


class ExecutorConfig(_Strict):
    """``executor:``: where compile and validation tasks run (``t2tedge build --executor`` overrides ``kind``)."""

    kind: Literal["local", "ray"] = Field("local", description="local: this process; ray: tasks on a Ray cluster")
    address: str | None = Field(None, description="Ray cluster address (host:port); default: RAY_ADDRESS or local")
    shard_images: int = Field(512, gt=0, multiple_of=32, description="images per validation task (a multiple of 32)")
    retries: int = Field(2, ge=0, description="re-runs of a task whose worker or node died")
    resources: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Ray resources per target, e.g. {coreml: {mac: 1}}: its tasks run on nodes offering them",
    )
    labels: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Ray node labels per target, e.g. {coreml: {t2tedge/os: macos}}: its tasks run only on nodes "
        "carrying them (Ray label selectors: value, !value, in(a,b), !in(a,b))",
    )

    @model_validator(mode="after")
    def _known_targets(self) -> ExecutorConfig:
        from t2tedge.targets import target_names

        for key, per_target in (("resources", self.resources), ("labels", self.labels)):
            for name in per_target:
                if name not in target_names():
                    raise ValueError(f"{key}: unknown target {name!r} (targets: {', '.join(target_names())})")
        return self


class TuneConfig(_Strict):
    """``tune:``: what ``t2tedge tune`` searches and which point of the front it chooses."""

    targets: list[str] | None = Field(None, description="targets to tune; default: the recipe's targets with int8")
    heldout: int = Field(
        500, gt=0, description="images of the calibration source, disjoint from the calibration set, that score points"
    )
    max_agreement_drop: float | None = Field(
        4.0, ge=0, description="points of top-1 agreement with FP32 PyTorch the chosen point may lose (100 - this)"
    )
    max_top1_drop: float | None = Field(None, ge=0, description="top-1 points vs FP32 PyTorch it may lose instead")
    objective: Literal["latency"] = "latency"
    groups: bool = Field(True, description="try keeping each of the model's layer groups float")
    knobs: bool = Field(True, description="try each target's own knobs (calibration method, precision hint, ...)")
    max_candidates: int = Field(24, gt=0, description="at most this many candidates per model and target")
    seconds: float = Field(3.0, gt=0, description="timing: at least this many seconds per candidate")

    @model_validator(mode="after")
    def _one_rule(self) -> TuneConfig:
        if self.max_top1_drop is not None and self.max_agreement_drop is not None:
            # the recipe's own max_top1_drop replaces the default agreement rule
            object.__setattr__(self, "max_agreement_drop", None)
        return self


class Recipe(_Strict):
    name: str = "build"
    output_dir: Path = Path("artifacts")
    models: list[ModelEntry] = Field(min_length=1)
    targets: list[str] = Field(default_factory=lambda: ["onnxruntime"], min_length=1)
    precisions: list[str] = Field(default_factory=lambda: ["fp32"], min_length=1)
    data: DataConfig = DataConfig()
    export: ExportConfig = ExportConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    threads: int | None = Field(None, gt=0, description="runtime threads for validation; default: all cores")
    benchmark: BenchmarkConfig = BenchmarkConfig()
    executor: ExecutorConfig = ExecutorConfig()
    tune: TuneConfig = TuneConfig()
    tuned: Path | None = Field(None, description="tuned placements (written by `t2tedge tune`) that build applies")

    @field_validator("models", mode="before")
    @classmethod
    def _names_to_entries(cls, value: Any) -> Any:
        # `models: [t2t_vit_7, mobilenet_v2]` is shorthand for entries with default weights.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_variables(value: Any, variables: Mapping[str, str], source: Path) -> Any:
    """Replace ``${NAME}`` in every string of a recipe (paths as arguments); unset names are an error."""
    if isinstance(value, dict):
        return {k: expand_variables(v, variables, source) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_variables(v, variables, source) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise RecipeError(f"{source} needs ${{{name}}}: pass --var {name}=VALUE or set it in the environment")
        return variables[name]

    return _VARIABLE.sub(lookup, value)


def load_recipe(
    path: str | Path, overrides: dict[str, Any] | None = None, variables: Mapping[str, str] | None = None
) -> Recipe:
    """Read and validate a recipe; CLI overrides replace top-level keys. Errors name the field.

    ``${NAME}`` in the recipe's strings is taken from ``variables``, then from the environment.
    """
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
    data = expand_variables(data, {**os.environ, **(variables or {})}, path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "recipe"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RecipeError(f"{path}: {where}: {message}{more}") from None
