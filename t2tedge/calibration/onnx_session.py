"""An ONNX Runtime CPU session over a file or serialized graph: what export parity, calibration searches,
peak measurement and emulation references run. Targets load their artifacts through their own loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxSession:
    """An onnxruntime CPU session; feeds a fixed-batch model in chunks of its batch."""

    def __init__(self, model: Path | bytes, threads: int | None = None, config: dict[str, str] | None = None) -> None:
        """``config``: session config entries (e.g. :data:`onnx_qdq.QDQ_SESSION_CONFIG`), as the artifact's."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
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
