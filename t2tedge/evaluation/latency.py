"""Latency measurement: warm-up, then interleaved timed rounds until a minimum count and time are met."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


# Our 2-vCPU build hosts switch for seconds to minutes into a state where two-thread runs take ~2x as
# long while one-thread runs do not change (measured on the AVX-512 VNNI AMD EPYC: MobileNetV2 at 48 px
# through ONNX Runtime, 2 threads 0.18 -> 0.35 ms, 1 thread 0.25 ms throughout; no steal time shows).
# Interleaving spreads short noise over every artifact, not a state that lasts longer than a round: a
# round whose median exceeds STEADY_RATIO x the artifact's best round median is set aside and the
# artifact timed again, up to PATIENCE x the time it needed (then every round counts, and it is said).
STEADY_RATIO = 1.25
PATIENCE = 3.0


@dataclass
class RoundLog:
    """One artifact's timed rounds (seconds per iteration), and which of them are steady."""

    rounds: list[list[float]] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)
    sums: list[float] = field(default_factory=list)

    def add(self, times: list[float]) -> None:
        self.rounds.append(times)
        self.medians.append(float(np.median(times)))
        self.sums.append(sum(times))

    def steady_rounds(self, ratio: float | None) -> list[int]:
        """Indices of the rounds whose median is within ``ratio`` x the best round's (all: ratio None)."""
        limit = ratio * min(self.medians) if ratio and self.medians else float("inf")
        return [i for i, m in enumerate(self.medians) if m <= limit]

    def totals(self, rounds: Sequence[int]) -> tuple[int, float]:
        """(iterations, seconds) of these rounds, from per-round sums (cheap)."""
        return sum(len(self.rounds[i]) for i in rounds), sum(self.sums[i] for i in rounds)

    def times(self, rounds: Sequence[int]) -> list[float]:
        return [t for i in rounds for t in self.rounds[i]]

    def summary(self, kept: list[int], steady: bool) -> dict[str, Any]:
        """What the record keeps about the rounds: how many, how many were set aside, the p50 of all."""
        return {
            "rounds": len(self.rounds),
            "rounds_set_aside": len(self.rounds) - len(kept),
            "steady": steady,  # False: not enough steady rounds within the patience; every round counted
            "iterations_kept": self.totals(kept)[0],
            "latency_ms_p50_all_rounds": round(float(np.median(self.times(range(len(self.rounds))))) * 1000.0, 3),
        }


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
    steady_ratio: float | None = STEADY_RATIO,
    rounds_out: dict[str, dict[str, Any]] | None = None,
) -> dict[str, list[float]]:
    """Per-iteration latencies (s) of each runner, measured in alternating interleaved rounds.

    ``image`` is one input for all runners or one per runner (models of different input sizes).
    Interleaving (and reversing the order every round) makes machine noise hit every variant alike.
    After a switch from another runner, each runs untimed for ``settle_seconds`` (at least once) before
    its round is timed: what a deployed model alone never pays is not counted (see SETTLE_SECONDS). A
    round is ``round_iters`` iterations and at least ``round_seconds`` of timed running (ROUND_SECONDS),
    or ``min_seconds`` where that is less. Rounds slower than ``steady_ratio`` x the runner's best round
    are set aside and timed again (STEADY_RATIO; None keeps every round); ``rounds_out`` receives each
    runner's :meth:`RoundLog.summary`.
    """
    inputs = image if isinstance(image, Mapping) else dict.fromkeys(runners, image)
    for key, runner in runners.items():
        for _ in range(warmup):
            runner(inputs[key])
    logs = {key: RoundLog() for key in runners}
    order = list(runners)
    round_floor = min(round_seconds, min_seconds)  # a count-bound run (min_seconds 0) keeps count-bound rounds

    def enough(iterations: int, seconds: float) -> bool:
        return iterations >= min_iters and seconds >= min_seconds

    def steady(log: RoundLog) -> bool:
        return bool(log.rounds) and enough(*log.totals(log.steady_rounds(steady_ratio)))

    def finished(key: str) -> bool:
        log = logs[key]
        if not log.rounds or steady(log):
            return bool(log.rounds)
        # out of patience: PATIENCE x what it needed (at its typical round's speed), steady or not
        all_n, all_s = log.totals(log.steady_rounds(None))
        needed = max(min_seconds, min_iters * float(np.median(log.medians)))
        return enough(all_n, all_s) and all_s >= PATIENCE * needed

    rounds = 0
    previous = None
    while not all(finished(key) for key in order):
        for key in order if rounds % 2 == 0 else order[::-1]:
            if finished(key):
                continue  # done; keep timing the others without spending more time here
            runner, x = runners[key], inputs[key]
            if key != previous and settle_seconds > 0:
                settle_until = time.perf_counter() + settle_seconds
                runner(x)
                while time.perf_counter() < settle_until:
                    runner(x)
            previous = key
            bucket: list[float] = []
            spent = 0.0
            while len(bucket) < round_iters or spent < round_floor:
                started = time.perf_counter()
                runner(x)
                bucket.append(time.perf_counter() - started)
                spent += bucket[-1]
            logs[key].add(bucket)
        rounds += 1
        if on_round is not None:
            on_round()
    times = {}
    for key, log in logs.items():
        ran_steadily = steady(log)
        kept = log.steady_rounds(steady_ratio if ran_steadily else None)  # never steady: every round counts
        times[key] = log.times(kept)
        if rounds_out is not None:
            rounds_out[key] = {**log.summary(kept, ran_steadily), "steady_ratio": steady_ratio}
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
