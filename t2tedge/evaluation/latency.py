"""Latency measurement: warm-up, then interleaved timed rounds until a minimum count and time are met."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def time_interleaved(
    runners: dict[str, Callable[[np.ndarray], Any]],
    image: np.ndarray,
    warmup: int,
    min_iters: int,
    min_seconds: float,
    round_iters: int,
) -> dict[str, list[float]]:
    """Per-iteration latencies (s) of each runner, measured in alternating interleaved rounds.

    Interleaving (and reversing the order every round) makes machine noise hit every variant alike.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner(image)
    times: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    rounds = 0
    while any(len(t) < min_iters or sum(t) < min_seconds for t in times.values()):
        for key in order if rounds % 2 == 0 else order[::-1]:
            runner, bucket = runners[key], times[key]
            for _ in range(round_iters):
                started = time.perf_counter()
                runner(image)
                bucket.append(time.perf_counter() - started)
        rounds += 1
    return times


def summarize(seconds: list[float]) -> dict[str, Any]:
    """p50/p10/p90/mean/std in milliseconds, iteration count and total seconds."""
    ms = np.asarray(seconds) * 1000.0
    return {
        "latency_ms_p50": round(float(np.median(ms)), 3),
        "latency_ms_p10": round(float(np.percentile(ms, 10)), 3),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 3),
        "latency_ms_mean": round(float(ms.mean()), 3),
        "latency_ms_std": round(float(ms.std()), 3),
        "iterations": int(len(ms)),
        "seconds": round(float(ms.sum() / 1000.0), 1),
    }
