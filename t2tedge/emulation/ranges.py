"""Per-tensor value ranges against FP16's limits, merged over batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FP16_MAX = 65504.0
# Smallest positive normal FP16 value: below it values are subnormal (fewer significant bits) or flush to 0.
FP16_TINY = 6.103515625e-05
# A tensor most of whose nonzero values are subnormal in FP16 has lost most of its precision.
SUBNORMAL_DOMINATED = 0.5


@dataclass
class TensorRange:
    """What one tensor held over the images seen: its largest magnitude, non-finite and subnormal counts."""

    name: str
    producer: str
    op: str
    max_abs: float = 0.0
    elements: int = 0
    nonzero: int = 0
    subnormal: int = 0
    nonfinite: int = 0

    def update(self, value: torch.Tensor) -> None:
        """Merge one batch's FP32 value of the tensor (before it is rounded to FP16)."""
        finite = torch.isfinite(value)
        self.nonfinite += int((~finite).sum())
        magnitude = value.abs().masked_fill(~finite, 0)
        self.elements += value.numel()
        if value.numel():
            self.max_abs = max(self.max_abs, float(magnitude.max()))
        self.nonzero += int((magnitude > 0).sum())
        self.subnormal += int(((magnitude > 0) & (magnitude < FP16_TINY)).sum())

    @property
    def overflows(self) -> bool:
        return self.max_abs > FP16_MAX or self.nonfinite > 0

    @property
    def subnormal_fraction(self) -> float:
        return self.subnormal / self.nonzero if self.nonzero else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.name,
            "node": self.producer,
            "op": self.op,
            "max_abs": self.max_abs,
            "nonfinite": self.nonfinite,
            "subnormal_fraction": round(self.subnormal_fraction, 4),
        }


def summarize_ranges(ranges: dict[str, TensorRange], images: int) -> dict[str, Any]:
    """The manifest's FP16 range record: the tensors outside FP16's range and those dominated by subnormals."""
    outside = [r.to_dict() for r in ranges.values() if r.overflows]
    subnormal = [r.to_dict() for r in ranges.values() if not r.overflows and r.subnormal_fraction > SUBNORMAL_DOMINATED]
    widest = max(ranges.values(), key=lambda r: r.max_abs, default=None)
    return {
        "images": images,
        "tensors_checked": len(ranges),
        "fp16_max": FP16_MAX,
        "max_abs": widest.max_abs if widest else 0.0,
        "widest_tensor": widest.name if widest else None,
        "outside_fp16": outside,
        "subnormal_dominated": subnormal,
    }
