"""Deployment targets, one module each, behind the protocol in `base`."""

from t2tedge.evaluation.accuracy import EMULATED, MEASURED
from t2tedge.targets.base import (
    Availability,
    BuildInputs,
    Capabilities,
    Runner,
    Target,
    TargetConfig,
    check_precision,
    get_target,
    list_targets,
    load_verified,
    loader_source,
    payload_bytes,
    payload_files,
    peak_key,
    register_module,
    target_names,
)

# One line per target: its name and the module that registers it (imported when the target is needed).
register_module("onnxruntime", "t2tedge.targets.onnxruntime")
register_module("openvino", "t2tedge.targets.openvino")
register_module("tensorrt", "t2tedge.targets.tensorrt")
register_module("coreml", "t2tedge.targets.coreml")
register_module("executorch", "t2tedge.targets.executorch")

__all__ = [
    "EMULATED",
    "MEASURED",
    "Availability",
    "BuildInputs",
    "Capabilities",
    "Runner",
    "Target",
    "TargetConfig",
    "check_precision",
    "get_target",
    "list_targets",
    "load_verified",
    "loader_source",
    "payload_bytes",
    "payload_files",
    "peak_key",
    "target_names",
]
