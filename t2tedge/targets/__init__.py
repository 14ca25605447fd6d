"""Deployment targets, one module each, behind the protocol in `base`."""

from t2tedge.targets import coreml, onnxruntime, openvino, tensorrt  # noqa: F401  (registration side effects)
from t2tedge.targets.base import (
    Availability,
    BuildInputs,
    Runner,
    Target,
    check_precision,
    get_target,
    list_targets,
    payload_bytes,
    payload_files,
)

__all__ = [
    "Availability",
    "BuildInputs",
    "Runner",
    "Target",
    "check_precision",
    "get_target",
    "list_targets",
    "payload_bytes",
    "payload_files",
]
