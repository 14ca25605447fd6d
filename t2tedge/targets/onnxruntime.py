"""ONNX Runtime on CPU: the generic edge target."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.pipeline.store import Artifact
from t2tedge.targets.base import Availability, BuildInputs, register_target

MODEL_FILE = "model.onnx"


class OnnxRuntimeRunner:
    """An onnxruntime CPU session; feeds a fixed-batch model one image at a time."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.fixed_batch is None or images.shape[0] == self.fixed_batch:
            return self.session.run(None, {self.input_name: images})[0]
        step = self.fixed_batch
        return np.concatenate(
            [self.session.run(None, {self.input_name: images[i : i + step]})[0] for i in range(0, len(images), step)]
        )


class OnnxRuntimeTarget:
    """FP32 = the exported graph as is; INT8 comes with the calibration stage."""

    name = "onnxruntime"
    precisions = ("fp32",)

    def availability(self) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return Availability(False, False, "onnxruntime is not installed (pip install onnxruntime)")
        return Availability(True, True)

    def needs_calibration(self, precision: str) -> bool:
        return precision == "int8"

    def tool_versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def build(self, inputs: BuildInputs, precision: str, out_dir: Path) -> dict[str, Any]:
        shutil.copyfile(inputs.onnx_path, out_dir / MODEL_FILE)
        return {"providers": ["CPUExecutionProvider"]}

    def load(self, artifact: Artifact, threads: int | None = None) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(artifact.file(MODEL_FILE), threads)


register_target(OnnxRuntimeTarget())
