"""Export stage: PyTorch -> ONNX, checked against PyTorch on real images."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2tedge.evaluation.accuracy import agreement
from t2tedge.models.spec import graph_form

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 18  # the torch.export-based exporter's lowest native opset; has LayerNormalization
# Part of the export stage's cache key: bump when the graph exported for the same weights changes.
# 2: T2T-ViT soft splits as row gathers (T2TViT.export_form).
GRAPH_REVISION = 2
REFERENCE_BATCH = 64  # images per forward of the FP32 reference


def export_onnx(
    model: nn.Module, image_size: int, path: Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False
) -> None:
    """Export with torch.export (fixed spatial shape; batch 1, or a dynamic batch axis).

    A model with an ``export_form()`` (T2T-ViT) is exported in that form: the same function in a graph
    that runtimes execute faster. The export stage checks the result against the model itself.
    """
    model = graph_form(model) or model
    example = (torch.zeros(1, 3, image_size, image_size),)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    # The exporter narrates every step on stdout/logging; keep the CLI's output ours.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.eval(),
                example,
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
                external_data=False,
            )
            program.save(str(path), external_data=False)
    finally:
        quiet.setLevel(level)


def torch_logits(model: nn.Module, images: Any, batch_size: int = REFERENCE_BATCH) -> np.ndarray:
    """FP32 PyTorch logits (of an array or a streamed ``PixelSet``): the reference every artifact is
    compared with."""
    out: np.ndarray | None = None
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(images[i : i + batch_size])).float().numpy()
            if out is None:  # one preallocated array: 50k x 1000 logits are 200 MB, not twice that
                out = np.empty((len(images), *logits.shape[1:]), dtype=np.float32)
            out[i : i + len(logits)] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def parity(reference: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """Export parity numbers for the manifest."""
    return {"images": int(len(reference)), **agreement(logits, reference)}
