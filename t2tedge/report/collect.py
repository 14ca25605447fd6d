"""Gather a build's rows from its summaries and the artifacts' manifests into one report dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2tedge.errors import ArtifactError
from t2tedge.evaluation import host as this_host
from t2tedge.evaluation.accuracy import MEASURED, UNAVAILABLE
from t2tedge.evaluation.host import host_label
from t2tedge.pipeline.bench import LOCAL, point_key
from t2tedge.pipeline.store import Artifact
from t2tedge.targets import get_target, payload_bytes

# The precision each target's other precisions are compared with (its most faithful float build).
BASELINE_PRECISIONS = ("fp32", "fp16")
TARGET_ORDER = ("onnxruntime", "openvino", "tensorrt", "coreml")
PRECISION_ORDER = ("fp32", "fp16", "int8", "int8-weights", "w8a8")


@dataclass
class Row:
    """One artifact: what it is, its accuracy and its latency per host."""

    model: str
    family: str
    target: str
    precision: str
    artifact: str
    size_bytes: int
    accuracy: dict[str, Any]
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> record at the primary point
    sweep: list[dict[str, Any]] = field(default_factory=list)  # every measured point, every host
    runtime: dict[str, Any] = field(default_factory=dict)
    # the FP16 range check of an accelerator build (targets that run FP16 wherever a layer is not INT8)
    fp16_range: dict[str, Any] = field(default_factory=dict)
    fp32_layers: list[str] = field(default_factory=list)

    @property
    def top1(self) -> float | None:
        return self.accuracy.get("top1")

    def p50(self, host: str = LOCAL) -> float | None:
        record = self.latency.get(host, {})
        return record.get("latency_ms_p50") if record.get("label") == MEASURED else None

    def sort_key(self) -> tuple:
        return (_index(TARGET_ORDER, self.target), self.family != "t2t_vit", self.model,
                _index(PRECISION_ORDER, self.precision))  # fmt: skip


def _index(order: tuple[str, ...], value: str) -> int:
    return order.index(value) if value in order else len(order)


@dataclass
class ReportData:
    """Everything the Markdown, the JSON and the plots are made from."""

    build_dir: Path
    rows: list[Row]
    models: dict[str, dict[str, Any]]
    summaries: list[dict[str, Any]]
    hosts: list[str]
    point: dict[str, Any]

    def baseline(self, row: Row) -> Row | None:
        """The same model on the same target at its float baseline precision."""
        for precision in BASELINE_PRECISIONS:
            for other in self.rows:
                if (other.model, other.target, other.precision) == (row.model, row.target, precision):
                    return other
        return None


def load_summaries(build_dir: Path) -> list[dict[str, Any]]:
    paths = sorted(build_dir.glob("*-summary.json"))
    if not paths:
        raise ArtifactError(f"{build_dir} has no build summary (*-summary.json); run `t2tedge build` into it first")
    summaries = []
    for path in paths:
        try:
            summaries.append({**json.loads(path.read_text()), "path": str(path)})
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path} is corrupt ({exc.msg})") from None
    return summaries


def collect(build_dir: str | Path) -> ReportData:
    """Rows of every artifact the build's recipes produced, with fresh accuracy/latency from the manifests."""
    build_dir = Path(build_dir)
    summaries = load_summaries(build_dir)
    rows: dict[str, Row] = {}
    models: dict[str, dict[str, Any]] = {}
    hosts: set[str] = set()
    point: dict[str, Any] = {}
    for summary in summaries:
        models.update(summary.get("models", {}))
        bench = summary.get("recipe", {}).get("benchmark", {})
        point = {"batch": (bench.get("batch_sizes") or [1])[0], "threads": (bench.get("threads") or [None])[0]}
        for item in summary["rows"]:
            path = Path(item["artifact"]) if item.get("artifact") else None
            if path is None or not (path / "manifest.json").is_file():
                continue  # an artifact removed since; the report shows what exists
            row = _row(Artifact(path), item, point, models)
            rows[row.artifact] = row
            hosts.update(row.latency)
    ordered = sorted(rows.values(), key=Row.sort_key)
    host_list = sorted(hosts, key=lambda h: (h != LOCAL, h)) or [LOCAL]
    return ReportData(build_dir, ordered, models, summaries, host_list, point)


def _row(artifact: Artifact, item: dict[str, Any], point: dict[str, Any], models: dict) -> Row:
    manifest = artifact.manifest
    target = get_target(manifest["target"])
    validation = manifest.get("validation", {})
    accuracy = item.get("accuracy") or {}
    # the manifest may hold a newer validation of the same set (e.g. re-validated on a device); this
    # host's numbers come first, another host's are labelled with it
    for record in validation.values():
        if record.get("dataset") == accuracy.get("dataset") and record.get("images") == accuracy.get("images"):
            accuracy = record if _rank(record) >= _rank(accuracy) else accuracy
    if accuracy.get("host_fingerprint") not in (None, this_host.host_fingerprint()):
        accuracy = {**accuracy, "host_label": host_label(accuracy["host_fingerprint"])}
    primary = point_key(point["batch"], point["threads"])
    latency, sweep = {}, []
    for key, record in manifest.get("latency", {}).items():
        host, at = key.split("/", 1)
        if host == LOCAL and record.get("host_fingerprint") != this_host.host_fingerprint():
            host = host_label(record.get("host_fingerprint"))  # measured where the artifact came from
            if f"{host}/{at}" in manifest["latency"]:
                continue
        sweep.append({**record, "host": host})
        if at == primary:
            latency[host] = record
    family = models.get(manifest["model"], {}).get("family") or manifest.get("model_io", {}).get("family", "")
    return Row(
        model=manifest["model"],
        family=family,
        target=manifest["target"],
        precision=manifest["precision"],
        artifact=str(artifact.path),
        size_bytes=payload_bytes(target, artifact),
        accuracy=accuracy or {"label": UNAVAILABLE, "reason": "not validated"},
        latency=latency,
        sweep=sweep,
        runtime=next((r.get("runtime", {}) for r in latency.values() if r.get("runtime")), {}),
        fp16_range=manifest.get("build", {}).get("fp16_range") or {},
        fp32_layers=(manifest.get("build", {}).get("fp32_layers") or {}).get("nodes", []),
    )


def _rank(record: dict[str, Any]) -> tuple[bool, int]:
    here = record.get("host_fingerprint") in (None, this_host.host_fingerprint())
    return here, {"measured": 2, "emulated": 1}.get(record.get("label", ""), 0)
