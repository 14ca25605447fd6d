"""Where a number was taken: CPU model, cores, ISA flags and the versions of the runtimes that ran it."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

# ISA extensions that decide which kernels a CPU runtime picks (INT8 dot products, BF16, AMX).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "neon")
RUNTIMES = ("onnxruntime", "openvino", "nncf", "torch", "coremltools", "tensorrt", "numpy")


@functools.cache
def host_info() -> dict[str, Any]:
    """The host's CPU, cores, ISA flags and runtime versions (computed once per process)."""
    return {
        "hostname": socket.gethostname(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "isa": _isa_flags(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "versions": library_versions(),
    }


# What decides a stored number: the CPU, its ISA, cores and the runtimes (not the hostname).
FINGERPRINT_FACTS = ("machine", "processor", "cores", "isa", "versions")


@functools.cache
def host_fingerprint() -> str:
    """A short hash of the CPU model, ISA flags, cores and runtime versions: stored results are reused only
    on the same fingerprint."""
    info = host_info()
    facts = {key: info[key] for key in FINGERPRINT_FACTS}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def has_int8_dot_products() -> bool:
    """Whether this CPU multiplies int8 without int16 saturation: VNNI or AMX on x86; every ARM CPU with
    NEON dot products or not (their kernels widen to int32). x86 AVX2/AVX-512F without VNNI saturate U8S8."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(_isa_flags()))


def host_label(fingerprint: str | None) -> str:
    """How results of another host are named in manifests and reports."""
    return f"host-{fingerprint or 'unrecorded'}"


def library_versions() -> dict[str, str]:
    """Installed versions of the runtimes (from package metadata, without importing them)."""
    versions = {}
    for name in RUNTIMES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _isa_flags() -> list[str]:
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in ISA_FLAGS if flag in present or (flag == "neon" and "asimd" in present)]
    return []
