"""Latency measurement: both the minimum count and the minimum time are honoured, for every variant."""

from __future__ import annotations

import time

import numpy as np

from t2tedge.artifact import list_files
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
        settle_seconds=0,  # the order of calls below: no untimed settling between rounds here
        round_seconds=0,  # rounds of exactly round_iters
    )
    assert len(times["slow"]) >= 25 and sum(times["slow"]) >= 0.05  # time-bound, not count-bound
    assert len(times["fast"]) >= 10 and sum(times["fast"]) >= 0.05
    timed = calls[4:]  # after the warm-up calls
    assert timed[:5] == ["fast"] * 5 and timed[5:15] == ["slow"] * 10  # order reverses each round
    stats = summarize(times["slow"])
    assert stats["latency_ms_p50"] >= 2.0 and stats["iterations"] == len(times["slow"])


def test_iterations_right_after_a_switch_are_not_timed() -> None:
    """A runner is slow for its first 3 calls after another one ran (as an ONNX Runtime session is while
    the previous session's threads still spin): only its steady state is timed, whatever its place in the
    order; without settling, the middle runner (never run twice in a row) is timed mostly slow."""
    last: list[str] = [""]

    def runner(name: str):  # noqa: ANN202
        state = {"since_switch": 0}

        def run(_: np.ndarray) -> None:
            state["since_switch"] = 0 if last[0] != name else state["since_switch"] + 1
            last[0] = name
            time.sleep(0.02 if state["since_switch"] < 3 else 0.001)

        return run

    def p50s(settle_seconds: float) -> dict[str, float]:
        runners = {name: runner(name) for name in ("a", "b", "c")}
        times = time_interleaved(runners, np.zeros(1), 0, 20, 0.0, 4, settle_seconds=settle_seconds, round_seconds=0)
        return {name: summarize(t)["latency_ms_p50"] for name, t in times.items()}

    settled = p50s(0.1)
    assert all(ms < 10 for ms in settled.values()), settled
    unsettled = p50s(0)
    assert unsettled["b"] > 15, unsettled


def test_settling_is_a_bounded_share_of_a_fast_models_run() -> None:
    """A round lasts at least round_seconds, so a ~1 ms runner is not switched (and settled) every few
    iterations: settling 0.05 s per switch, at most ~0.2 / 0.05 + 1 rounds each, not ~0.2 / (4 x 1 ms)."""
    switches = {"a": 0, "b": 0}
    last = [""]

    def runner(name: str):  # noqa: ANN202
        def run(_: np.ndarray) -> None:
            switches[name] += last[0] != name
            last[0] = name
            time.sleep(0.001)

        return run

    times = time_interleaved(
        {n: runner(n) for n in switches}, np.zeros(1), 0, 4, 0.2, 4, settle_seconds=0.05, round_seconds=0.05
    )
    assert all(sum(t) >= 0.2 for t in times.values())
    assert all(1 <= n <= 5 for n in switches.values()), switches  # 4-iteration rounds alone: ~45 each


def test_rounds_from_a_slow_spell_of_the_host_are_set_aside_and_timed_again() -> None:
    """The host runs 2x slower for a while (as our 2-vCPU VMs do for seconds to minutes): rounds in that
    spell are set aside, the artifact is timed again, and the record says how many rounds were dropped."""
    start = time.perf_counter()

    def runner(_: np.ndarray) -> None:
        spell = 0.05 < time.perf_counter() - start < 0.25
        time.sleep(0.004 if spell else 0.002)

    def fast(_: np.ndarray) -> None:
        time.sleep(0.001)

    rounds: dict[str, dict] = {}
    times = time_interleaved(
        {"a": runner, "b": fast}, np.zeros(1), 0, 10, 0.2, 5, settle_seconds=0, round_seconds=0, rounds_out=rounds
    )
    a = rounds["a"]
    assert a["steady"] and a["rounds_set_aside"] >= 3 and a["iterations_kept"] == len(times["a"])
    assert summarize(times["a"])["latency_ms_p90"] < 3.5  # only rounds outside the spell (a third ran 4 ms)
    assert sum(times["a"]) >= 0.2 and rounds["b"]["rounds_set_aside"] == 0


def test_a_host_that_never_settles_counts_every_round_and_says_so() -> None:
    """Each round slower than the last: no steady share ever suffices, so after PATIENCE x the time it
    needed every round counts, and ``steady: false`` says the number mixes speeds."""
    calls = [0]

    def slowing(_: np.ndarray) -> None:
        calls[0] += 1
        time.sleep(0.001 * 1.5 ** (calls[0] // 5))  # 1.5x slower every round of 5

    rounds: dict[str, dict] = {}
    times = time_interleaved({"a": slowing}, np.zeros(1), 0, 10, 0.0, 5, settle_seconds=0, rounds_out=rounds)
    assert rounds["a"]["steady"] is False and rounds["a"]["rounds_set_aside"] == 0
    assert len(times["a"]) == rounds["a"]["iterations_kept"] == 5 * rounds["a"]["rounds"] > 10
    # with the filter off every round counts from the start
    plain = time_interleaved({"a": slowing}, np.zeros(1), 0, 10, 0.0, 5, settle_seconds=0, steady_ratio=None)
    assert len(plain["a"]) == 10


def test_stored_results_are_reused_only_on_the_same_host(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import json

    import torch

    from t2tedge.evaluation import host
    from t2tedge.models import get_spec
    from t2tedge.models.spec import Preprocess
    from t2tedge.pipeline.bench import bench_artifacts
    from t2tedge.pipeline.export import export_onnx
    from t2tedge.pipeline.recipe import BenchmarkConfig
    from t2tedge.pipeline.store import Artifact
    from t2tedge.pipeline.validate import stored_validation, validate_artifact

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    torch.manual_seed(0)
    path = tmp_path / "copied-int8"
    path.mkdir()
    export_onnx(get_spec("mobilenet_v3_small").create(num_classes=10, image_size=32), 32, path / "model.onnx")
    pre = Preprocess(input_size=32, resize_size=32, interpolation="bilinear")
    io = {"family": "mobilenet", "image_size": 32, "num_classes": 10, "classes": [], "preprocess": pre.to_dict()}
    manifest = {"model": "mobilenet_v3_small", "target": "onnxruntime", "precision": "fp32", "model_io": io}
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": list_files(path)}))
    cfg = BenchmarkConfig(warmup=1, min_iters=3, min_seconds=0, efficiency=False, threads=[1])
    here = host.host_fingerprint()
    (first,) = bench_artifacts([path], cfg)
    assert first["host_fingerprint"] == here and not first["reused"]
    assert bench_artifacts([path], cfg)[0]["reused"]  # same host: reused
    result = validate_artifact(path, "fashion_mnist:test", limit=8, threads=1)
    assert result["host_fingerprint"] == here
    (key,) = Artifact(path).manifest["validation"]
    assert stored_validation(Artifact(path), key) is not None

    monkeypatch.setattr(host, "host_fingerprint", lambda: "0therh0st000")  # the artifact copied elsewhere
    (again,) = bench_artifacts([path], cfg)
    assert not again["reused"] and again["host_fingerprint"] == "0therh0st000"
    latency = Artifact(path).manifest["latency"]
    assert latency[f"host-{here}/b1-t1"]["latency_ms_p50"] == first["latency_ms_p50"]  # kept, under its host
    assert latency[f"host-{here}/b1-t1"]["host"] == f"host-{here}"
    assert latency["local/b1-t1"]["host_fingerprint"] == "0therh0st000"
    assert stored_validation(Artifact(path), key) is None  # another host's accuracy is not reused
    validate_artifact(path, "fashion_mnist:test", limit=8, threads=1)
    validation = Artifact(path).manifest["validation"]
    assert validation[key]["host_fingerprint"] == "0therh0st000"
    assert validation[f"{key}@host-{here}"]["host_fingerprint"] == here
