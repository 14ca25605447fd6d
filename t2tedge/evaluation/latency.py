"""Latency measurement: warm-up, then interleaved timed rounds until a minimum count and time are met."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# A runtime switched to after another one ran is slow for its first iterations (likely: ONNX Runtime's
# intra-op threads of the session that ran before still spin; caches are cold). Measured on the
# AVX-512 VNNI AMD EPYC (2 cores, T2T-ViT-7 INT8 at 224 px, 10-iteration rounds between three sessions):
# the median of a round's 1st..10th iteration went 9.5, 9.7, 9.1, 8.8, 8.8, 6.5, 6.1, 5.0, 4.9, 5.0 ms,
# ~60 ms to settle; counted, it made the same artifact 27 % slower or faster depending on its place in
# the order. Untimed iterations for this long after each switch keep only the steady state.
SETTLE_SECONDS = 0.1
# A timed round lasts at least this long, so the settling after each switch stays a small share of the
# run (<= 20 % at the defaults). With 10-iteration rounds alone, a 0.2 ms MobileNet switched every 2 ms
# and settled 98 % of the time: the demo's 21-artifact latency pass took 10 min instead of ~30 s.
ROUND_SECONDS = 0.5


def time_interleaved(
    runners: Mapping[str, Callable[[np.ndarray], Any]],
    image: np.ndarray | Mapping[str, np.ndarray],
    warmup: int,
    min_iters: int,
    min_seconds: float,
    round_iters: int,
    on_round: Callable[[], None] | None = None,
    settle_seconds: float = SETTLE_SECONDS,
    round_seconds: float = ROUND_SECONDS,
) -> dict[str, list[float]]:
    """Per-iteration latencies (s) of each runner, measured in alternating interleaved rounds.

    ``image`` is one input for all runners or one per runner (models of different input sizes).
    Interleaving (and reversing the order every round) makes machine noise hit every variant alike.
    After a switch from another runner, each runs untimed for ``settle_seconds`` (at least once) before
    its round is timed: what a deployed model alone never pays is not counted (see SETTLE_SECONDS). A
    round is ``round_iters`` iterations and at least ``round_seconds`` of timed running (ROUND_SECONDS),
    or ``min_seconds`` where that is less.
    """
    inputs = image if isinstance(image, Mapping) else dict.fromkeys(runners, image)
    for key, runner in runners.items():
        for _ in range(warmup):
            runner(inputs[key])
    times: dict[str, list[float]] = {key: [] for key in runners}
    order = list(runners)
    round_floor = min(round_seconds, min_seconds)  # a count-bound run (min_seconds 0) keeps count-bound rounds
    rounds = 0
    previous = None
    while any(len(t) < min_iters or sum(t) < min_seconds for t in times.values()):
        for key in order if rounds % 2 == 0 else order[::-1]:
            runner, bucket, x = runners[key], times[key], inputs[key]
            if len(bucket) >= min_iters and sum(bucket) >= min_seconds:
                continue  # done; keep timing the others without spending more time here
            if key != previous and settle_seconds > 0:
                settle_until = time.perf_counter() + settle_seconds
                runner(x)
                while time.perf_counter() < settle_until:
                    runner(x)
            previous = key
            done, spent = 0, 0.0
            while done < round_iters or spent < round_floor:
                started = time.perf_counter()
                runner(x)
                bucket.append(time.perf_counter() - started)
                done, spent = done + 1, spent + bucket[-1]
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
