"""Stand-ins for runtimes that cannot run here, computing in the arithmetic the real runtime uses.

``onnx_fp16`` executes an ONNX graph (plain or Q/DQ) op by op in PyTorch with FP16 storage between ops,
as TensorRT runs a network built with the FP16 flag; ``torch_fp16`` audits a PyTorch module run in
half precision. Both record the range of every intermediate (``ranges``), which the FP16 range check
of the accelerator targets reads.
"""

from t2tedge.emulation.onnx_fp16 import GraphEmulator, RangeCheck, fp16_range_check
from t2tedge.emulation.ranges import FP16_MAX, FP16_TINY, TensorRange
from t2tedge.emulation.torch_fp16 import audit_fp16

__all__ = ["FP16_MAX", "FP16_TINY", "GraphEmulator", "RangeCheck", "TensorRange", "audit_fp16", "fp16_range_check"]
