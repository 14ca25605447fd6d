"""Latency measurement: warm-up, then interleaved timed rounds until a minimum count and time are met."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def time_interleaved(
    runners: Mapping[str, Callable[[np.ndarray], Any]],
    image: np.ndarray | Mapping[str, np.ndarray],
    warmup: int,
    min_iters: int,
    min_seconds: float,
    round_iters: int,
    on_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Per-iteration latencies (s) of each runner, measured in alternating interleaved rounds.

    ``image`` is one input for all runners or one per runner (models of different input sizes).
    Interleaving (and reversing the order every round) makes machine noise hit every variant alike.
    """
    inputs = image if isinstance(image, Mapping) else dict.fromkeys(runners, image)
    for key, runner in runners.items():
        for _ in range(warmup):
            runner(inputs[key])
    times: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    rounds = 0
    while any(len(t) < min_iters or sum(t) < min_seconds for t in times.values()):
        for key in order if rounds % 2 == 0 else order[::-1]:
            runner, bucket, x = runners[key], times[key], inputs[key]
            if len(bucket) >= min_iters and sum(bucket) >= min_seconds:
                continue  # done; keep timing the others without spending more time here
            for _ in range(round_iters):
                started = time.perf_counter()
                runner(x)
                bucket.append(time.perf_counter() - started)
        rounds += 1
        if on_round is not None:
            on_round()
    return times


def summarize(seconds: list[float], batch: int = 1) -> dict[str, Any]:
    """min/mean/std/p10/p50/p90/p99 in milliseconds, throughput (images/s), iteration count and total seconds."""
    ms = np.asarray(seconds) * 1000.0
    return {
        "latency_ms_min": round(float(ms.min()), 3),
        "latency_ms_p10": round(float(np.percentile(ms, 10)), 3),
        "latency_ms_p50": round(float(np.median(ms)), 3),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 3),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 3),
        "latency_ms_mean": round(float(ms.mean()), 3),
        "latency_ms_std": round(float(ms.std()), 3),
        "throughput_ips": round(float(batch * 1000.0 / ms.mean()), 2),
        "batch": batch,
        "iterations": int(len(ms)),
        "seconds": round(float(ms.sum() / 1000.0), 2),
    }
