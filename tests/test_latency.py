"""Latency measurement: both the minimum count and the minimum time are honoured, for every variant."""

from __future__ import annotations

import time

import numpy as np

from t2tedge.evaluation.latency import summarize, time_interleaved


def test_interleaved_rounds_meet_count_and_time() -> None:
    calls: list[str] = []

    def runner(name: str, seconds: float):  # noqa: ANN202
        def run(_: np.ndarray) -> None:
            calls.append(name)
            time.sleep(seconds)

        return run

    times = time_interleaved(
        {"fast": runner("fast", 0.0005), "slow": runner("slow", 0.002)},
        np.zeros(1),
        warmup=2,
        min_iters=10,
        min_seconds=0.05,
        round_iters=5,
    )
    assert len(times["slow"]) >= 25 and sum(times["slow"]) >= 0.05  # time-bound, not count-bound
    assert len(times["fast"]) >= 10 and sum(times["fast"]) >= 0.05
    timed = calls[4:]  # after the warm-up calls
    assert timed[:5] == ["fast"] * 5 and timed[5:15] == ["slow"] * 10  # order reverses each round
    stats = summarize(times["slow"])
    assert stats["latency_ms_p50"] >= 2.0 and stats["iterations"] == len(times["slow"])
