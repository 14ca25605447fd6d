"""The latency stage: time built artifacts on this host (interleaved), relate them to the host's peak.

Results land in each artifact's manifest under ``latency`` keyed by ``<host>/b<batch>-t<threads>``, so a
rerun with the same settings on the same host reuses them, and numbers from other hosts (remote
devices) sit beside local ones. A local record carries this host's fingerprint; on another host (a copied
artifact) it is measured afresh and the old one kept under ``host-<fingerprint>/...``. A number is
``measured`` only when the target's real runtime ran it: an emulated stand-in (TensorRT's Q/DQ graph on
onnxruntime, Core ML's torch emulation) is never timed, its latency is ``unavailable`` with the reason.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from t2tedge.devices.remote_runner import FIXED_BATCH_REASON
from t2tedge.evaluation import host as this_host
from t2tedge.evaluation.accuracy import MEASURED, UNAVAILABLE
from t2tedge.evaluation.host import host_info, host_label
from t2tedge.evaluation.latency import summarize, time_interleaved
from t2tedge.pipeline.recipe import BenchmarkConfig
from t2tedge.pipeline.store import Artifact, read_manifest
from t2tedge.progress import log, progress_task, track
from t2tedge.targets import get_target, load_verified, peak_key

LOCAL = "local"


def point_key(batch: int, threads: int | None) -> str:
    """One measurement point: batch size and requested threads, e.g. ``b1-tall``."""
    return f"b{batch}-t{threads or 'all'}"


def latency_key(host: str, batch: int, threads: int | None) -> str:
    """Where a point measured on ``host`` lives in a manifest's ``latency`` section."""
    return f"{host}/{point_key(batch, threads)}"


def _settings(cfg: BenchmarkConfig) -> dict[str, Any]:
    return {
        k: getattr(cfg, k)
        for k in (
            "warmup",
            "min_iters",
            "min_seconds",
            "round_iters",
            "settle_seconds",
            "round_seconds",
            "steady_ratio",
        )
    }


def _set_aside_foreign(artifact: Artifact, key: str, section: str) -> None:
    """A local record measured on another host (a copied artifact) moves to that host's key, kept and labelled."""
    old = artifact.manifest.get(section, {}).get(key)
    host, at = key.split("/", 1)
    if old is None or host != LOCAL or old.get("host_fingerprint") == this_host.host_fingerprint():
        return
    other = host_label(old.get("host_fingerprint"))
    artifact.update_manifest(**{section: {f"{other}/{at}": {**old, "host": other}}})


def _reused(
    artifact: Artifact, key: str, settings: dict[str, Any], force: bool, records: list[dict[str, Any]], section: str
) -> bool:
    """Append the stored record of this point when it was measured with the same settings (unless forced).

    A local record is reused only when this host's fingerprint measured it.
    """
    manifest = artifact.manifest
    old = manifest.get(section, {}).get(key)
    if force or not old or old.get("settings") != settings or old.get("label") != MEASURED:
        return False
    if key.startswith(f"{LOCAL}/") and old.get("host_fingerprint") != this_host.host_fingerprint():
        return False
    records.append(_record(manifest, artifact, key, old, reused=True))
    return True


def is_stored(path: Path, cfg: BenchmarkConfig, device: str | None = None, section: str = "latency") -> bool:
    """Whether :func:`bench_artifacts` would reuse every point of ``cfg`` for this artifact (none re-timed)."""
    artifact, settings, host = Artifact(Path(path)), _settings(cfg), device or LOCAL
    return all(
        _reused(artifact, latency_key(host, batch, threads), settings, False, [], section)
        for threads in cfg.threads
        for batch in cfg.batch_sizes
    )


@functools.cache
def model_macs(model: str, image_size: int, num_classes: int) -> int:
    """Counted MACs of one forward pass at batch 1 (random init: MACs do not depend on weights)."""
    from t2tedge.models import get_spec
    from t2tedge.models.counting import count_macs

    return count_macs(get_spec(model).create(num_classes=num_classes, image_size=image_size), image_size)


def bench_artifacts(
    paths: list[Path],
    cfg: BenchmarkConfig,
    force: bool = False,
    device: str | None = None,
    timeout_s: float = 1800.0,
    section: str = "latency",
) -> list[dict[str, Any]]:
    """Latency of each artifact at each batch size x thread count of ``cfg``, measured or reused.

    Locally, artifacts measured at the same (batch, threads) are timed together in interleaved rounds;
    with ``device`` each artifact is timed on that SSH device (see ``t2tedge device``).
    Returns one record per artifact and point; each is also written into the artifact's manifest, under
    ``section``: ``latency`` (what reports show) unless a caller keeps its own timings apart (``tune``
    times with its own settings; sharing the section, a ``bench`` of the same artifact would replace them).
    """
    artifacts = [Artifact(Path(p)) for p in paths]
    for artifact in artifacts:
        read_manifest(artifact.path)  # a clear error for a directory that is not an artifact
    settings = _settings(cfg)
    if device is not None:
        return _bench_remote(artifacts, cfg, settings, force, device, timeout_s, section)
    records: list[dict[str, Any]] = []
    peaks: dict[int | None, dict[str, Any]] = {}
    for threads in cfg.threads:
        for batch in cfg.batch_sizes:
            key = latency_key(LOCAL, batch, threads)
            runners: dict[str, Any] = {}
            inputs: dict[str, np.ndarray] = {}
            pending: dict[str, tuple[Artifact, dict[str, Any]]] = {}
            for artifact in artifacts:
                _set_aside_foreign(artifact, key, section)
                if _reused(artifact, key, settings, force, records, section):
                    continue
                manifest = artifact.manifest
                record, runner = _prepare(artifact, manifest, batch, threads, settings)
                if runner is None:
                    artifact.update_manifest(**{section: {key: record}})
                    records.append(_record(manifest, artifact, key, record, reused=False))
                    continue
                name = str(artifact.path)
                runners[name] = runner
                size = manifest["model_io"]["image_size"]
                inputs[name] = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
                pending[name] = (artifact, record)
            if not runners:
                continue
            if cfg.efficiency and threads not in peaks:
                from t2tedge.evaluation.peak import peak_gmacs

                log(f"  measuring this host's peak GEMM rate ({threads or 'all'} threads)")
                peaks[threads] = peak_gmacs(threads)
            rounds: dict[str, dict[str, Any]] = {}
            times = _time(runners, inputs, cfg, batch, threads, rounds)
            _say_unsteady(rounds)
            for name, (artifact, record) in pending.items():
                manifest = artifact.manifest
                record.update(summarize(times[name], batch))
                record["rounds"] = rounds[name]
                _efficiency(record, manifest, peaks.get(threads))
                artifact.update_manifest(**{section: {key: record}})
                records.append(_record(manifest, artifact, key, record, reused=False))
    return records


def _bench_remote(
    artifacts: list[Artifact],
    cfg: BenchmarkConfig,
    settings: dict[str, Any],
    force: bool,
    device: str,
    timeout_s: float,
    section: str,
) -> list[dict[str, Any]]:
    """Each artifact timed on a device over SSH, one after the other (the device runs nothing else)."""
    from t2tedge.devices.remote import remote_latency

    records = []
    points = [(t, b, a) for t in cfg.threads for b in cfg.batch_sizes for a in artifacts]
    for threads, batch, artifact in track(points, f"benchmarking on {device}", total=len(points)):
        key = latency_key(device, batch, threads)
        if _reused(artifact, key, settings, force, records, section):
            continue
        manifest = artifact.manifest
        result = remote_latency(
            device, artifact.path, batch, threads, cfg.warmup, cfg.min_iters, cfg.min_seconds, timeout_s
        )
        record: dict[str, Any] = {
            "host": device,
            "host_info": result["host"],
            "batch": batch,
            "threads_requested": threads or "all",
            "settings": settings,
            "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "label": result["label"],
            "runtime": result.get("runtime", {}),
        }
        if result["label"] == MEASURED:
            record.update(summarize(result["seconds"], batch))
            if result.get("gpu_compute_seconds"):  # TensorRT: CUDA-event time of the enqueue, like trtexec
                gpu = summarize(result["gpu_compute_seconds"], batch)
                record["gpu_compute"] = {k: v for k, v in gpu.items() if k.startswith("latency_ms")}
            _efficiency(record, manifest, None)  # no peak GEMM is measured on devices
        else:
            record["reason"] = result.get("reason", "")
        artifact.update_manifest(**{section: {key: record}})
        records.append(_record(manifest, artifact, key, record, reused=False))
    return records


def _say_unsteady(rounds: dict[str, dict[str, Any]]) -> None:
    """One line when the host's speed changed during the run (rounds set aside, or never steady)."""
    set_aside = sum(r["rounds_set_aside"] for r in rounds.values())
    unsteady = [name for name, r in rounds.items() if not r["steady"]]
    if set_aside:
        total = sum(r["rounds"] for r in rounds.values())
        log(
            f"  [yellow]the host's speed changed while timing[/]: {set_aside} of {total} rounds ran slower than "
            f"{next(iter(rounds.values()))['steady_ratio']}x their artifact's best and were timed again"
        )
    if unsteady:
        log(
            f"  [yellow]{len(unsteady)} artifact(s) never ran steadily[/]: their p50 counts every round "
            "(`rounds.steady: false` in the record); rerun `bench --force` when the host is quiet"
        )


def _time(
    runners: dict[str, Any],
    inputs: dict[str, np.ndarray],
    cfg: BenchmarkConfig,
    batch: int,
    threads: int | None,
    rounds: dict[str, dict[str, Any]],
) -> dict[str, list[float]]:
    planned = max(1, math.ceil(cfg.min_seconds / cfg.round_seconds)) if cfg.round_seconds > 0 else 1
    estimate = (max(cfg.min_seconds, 0.0) + planned * cfg.settle_seconds) * len(runners)  # timed + settling
    log(
        f"  timing {len(runners)} artifacts at batch {batch}, {threads or 'all'} threads "
        f"(interleaved; ≥{cfg.min_iters} iterations and ≥{cfg.min_seconds:g} s each, ~{estimate:.0f} s)"
    )
    with progress_task("benchmarking", total=max(estimate, 1.0)) as advance:
        clock = [time.perf_counter()]

        def on_round() -> None:
            now = time.perf_counter()
            advance(now - clock[0])
            clock[0] = now

        return time_interleaved(
            runners, inputs, cfg.warmup, cfg.min_iters, cfg.min_seconds, cfg.round_iters, on_round,
            cfg.settle_seconds, cfg.round_seconds, cfg.steady_ratio, rounds,
        )  # fmt: skip


def _prepare(
    artifact: Artifact, manifest: dict[str, Any], batch: int, threads: int | None, settings: dict[str, Any]
) -> tuple[dict, Any]:
    """The start of a latency record and a runner, or an `unavailable` record and no runner."""
    target = get_target(manifest["target"])
    base: dict[str, Any] = {
        "host": LOCAL,
        "host_info": host_info(),
        "host_fingerprint": this_host.host_fingerprint(),
        "batch": batch,
        "threads_requested": threads or "all",
        "settings": settings,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    availability = target.availability()
    if not availability.can_run:
        why = availability.reason or "its runtime cannot run on this host"
        return {**base, "label": UNAVAILABLE, "reason": f"not measurable here: {why}"}, None
    runner = load_verified(target, artifact, threads)
    if runner.label != MEASURED:
        return {**base, "label": UNAVAILABLE, "reason": "only an emulation runs here; emulations are not timed"}, None
    if runner.fixed_batch is not None and runner.fixed_batch != batch:
        reason = FIXED_BATCH_REASON.format(fixed=runner.fixed_batch)
        return {**base, "label": UNAVAILABLE, "reason": reason}, None
    return {**base, "label": MEASURED, "runtime": dict(runner.runtime_facts)}, runner


def _efficiency(record: dict[str, Any], manifest: dict[str, Any], peaks: dict[str, Any] | None) -> None:
    io = manifest["model_io"]
    macs = model_macs(manifest["model"], io["image_size"], io["num_classes"])
    achieved = macs * record["batch"] / (record["latency_ms_p50"] / 1000.0) / 1e9
    record["gmacs_per_image"] = round(macs / 1e9, 4)
    record["achieved_gmacs_per_s"] = round(achieved, 2)
    key = peak_key(get_target(manifest["target"]).capabilities, manifest["precision"], record.get("runtime", {}))
    if peaks and key in peaks["gmacs"]:
        record["peak"] = {"key": key, "gmacs_per_s": peaks["gmacs"][key], "gemm": peaks["gemm"]}
        record["efficiency_pct"] = round(100.0 * achieved / peaks["gmacs"][key], 2)


def _record(
    manifest: dict[str, Any], artifact: Artifact, key: str, latency: dict[str, Any], reused: bool
) -> dict[str, Any]:
    return {
        "key": key,
        "model": manifest["model"],
        "target": manifest["target"],
        "precision": manifest["precision"],
        "artifact": str(artifact.path),
        "reused": reused,
        **latency,
    }
