"""Tuned placements: the per model × target quantization settings ``t2tedge tune`` chose, which ``build``
applies over the recipe's (``tuned: FILE`` in the recipe, or ``t2tedge build --tuned FILE``).

The file is YAML: the host it was tuned on and, per model and target, the keys that differ from the
recipe's own section::

    host_fingerprint: b55bc18d5b0d
    host: AMD EPYC ...
    models:
      t2t_vit_7:
        openvino: {float_modules: ["blocks.*.mlp", "blocks.*.mlp.*"], inference_precision: f32}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from t2tedge.errors import RecipeError
from t2tedge.evaluation import host as this_host
from t2tedge.progress import log
from t2tedge.targets.base import TargetConfig


@dataclass
class TunedPlacements:
    """Overrides by model and target; empty when no file is given."""

    path: Path | None = None
    models: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    host_fingerprint: str | None = None
    host: str | None = None
    fp32_faster: dict[str, list[str]] = field(default_factory=dict)
    _warned: bool = False
    _noted: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def load(cls, path: str | Path | None) -> TunedPlacements:
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"tuned placements not found: {path} (write them with `t2tedge tune RECIPE`)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict) or not all(
            isinstance(t, dict) and all(isinstance(o, dict) for o in t.values()) for t in models.values()
        ):
            raise RecipeError(f"{path}: expected `models: {{MODEL: {{TARGET: {{key: value}}}}}}` (see t2tedge tune)")
        slower = data.get("fp32_faster") or {}
        if not isinstance(slower, dict) or not all(isinstance(t, list) for t in slower.values()):
            raise RecipeError(f"{path}: expected `fp32_faster: {{MODEL: [TARGET, ...]}}` (see t2tedge tune)")
        return cls(path, models, data.get("host_fingerprint"), data.get("host"), slower)

    def override(self, model: str, target: str) -> dict[str, Any]:
        return dict(self.models.get(model, {}).get(target) or {})

    def note_int8(self, model: str, target: str) -> None:
        """One warning line when tune found this model's INT8 build on this target no faster than FP32."""
        if target in self.fp32_faster.get(model, []) and (model, target) not in self._noted:
            self._noted.add((model, target))
            log(
                f"  [yellow]warning:[/] {self.path}: on {self.host or self.host_fingerprint}, no INT8 placement of "
                f"{model} on {target} was faster than FP32 timed beside it; building int8 as the recipe asks"
            )

    def config(self, model: str, target: str, base: TargetConfig) -> TargetConfig:
        """``base`` with this model and target's tuned keys over it (``base`` itself when none)."""
        own = self.override(model, target)
        if not own:
            return base
        if self.host_fingerprint and self.host_fingerprint != this_host.host_fingerprint() and not self._warned:
            self._warned = True
            log(
                f"  [yellow]warning:[/] {self.path} was tuned on another host ({self.host or self.host_fingerprint}); "
                "its placements are applied, but the latencies that chose them were measured there"
            )
        try:
            return type(base).model_validate({**base.model_dump(), **own})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in (model, target, *first["loc"]))
            raise RecipeError(f"{self.path}: {where}: {first['msg']}") from None
