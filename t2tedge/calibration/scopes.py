"""Which ONNX nodes a model's module performs: the exporter's module path of every node, matched by globs.

Placement choices are named by module path (``blocks.*.mlp*``, the model's own names), not by ONNX node
names, which the exporter numbers (``node_MatMul_42``). The torch.export-based exporter records each
node's module scope in ``pkg.torch.onnx.name_scopes``; runtimes that read ONNX keep its node names.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# the ops whose INT8 placement is a choice: what the quantizers put Q/DQ around
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")


def owner_module(node: Any) -> str:
    """The module path of the module whose own forward made ``node`` ('' where the exporter left none)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":  # e.g. "['', 'blocks.0', 'blocks.0.attn', 'matmul']"
            try:
                scopes = [m for m in ast.literal_eval(prop.value)[:-1] if m]
            except (ValueError, SyntaxError):
                return ""
            return scopes[-1] if scopes else ""
    return ""


def module_nodes(onnx_path: Path, globs: Iterable[str], op_types: Sequence[str] = QUANTIZABLE_OPS) -> list[str]:
    """Names of the ``op_types`` nodes made by a module whose path matches one of ``globs`` (in graph order)."""
    import onnx

    patterns = list(globs)
    if not patterns:
        return []
    found = []
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if node.op_type not in op_types:
            continue
        owner = owner_module(node)
        if owner and any(fnmatch.fnmatchcase(owner, p) for p in patterns):
            found.append(node.name)
    return found
