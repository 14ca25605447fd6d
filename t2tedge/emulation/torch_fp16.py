"""Audit a PyTorch module run in half precision: the range of every op's result, the first non-finite one.

PyTorch's CPU float16 kernels compute each op in FP32 internally and round its result to FP16, the
same storage rule as :mod:`t2tedge.emulation.onnx_fp16`. A dispatch mode sees every ATen op, so the
audit covers the intermediates inside a module's forward (the Performer's exponentials), not only the
module outputs a forward hook would see.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from t2tedge.emulation.ranges import TensorRange, summarize_ranges


class Fp16Audit(TorchDispatchMode):
    """Records, per ATen op (by name and call order within a forward), the range of its FP16 results."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges: dict[str, TensorRange] = {}
        self.first_nonfinite: str | None = None
        self._calls = 0

    def start_forward(self) -> None:
        self._calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = f"{self._calls:05d}:{func.__name__}"
        self._calls += 1
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
                entry = self.ranges.setdefault(name, TensorRange(name, name, func.__name__))
                entry.update(value.float())
                if entry.nonfinite and self.first_nonfinite is None:
                    self.first_nonfinite = name
        return out


def audit_fp16(module: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, dict[str, Any]]:
    """Logits of ``module`` (already ``.half()``) and the range record of every intermediate."""
    audit = Fp16Audit()
    outs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).half()
            with audit:
                audit.start_forward()
                outs.append(module(x).float().numpy())
    record = summarize_ranges(audit.ranges, len(images))
    record["first_nonfinite_op"] = audit.first_nonfinite
    return np.concatenate(outs), record
