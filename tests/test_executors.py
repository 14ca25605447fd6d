"""The local and Ray executors: same tasks, same results, one-line errors.

The Ray tests run a real 2-node cluster (a CPU-less head plus two 1-CPU worker nodes) inside a private
network namespace, so all cluster traffic stays on 127.0.0.1; see ray_harness.py. The whole cluster scenario
runs in one script, started once per module, and the tests below each check one thing it saw.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from ray_harness import (
    REPO_ROOT,
    attempts,
    loopback_skip_reason,
    raise_error,
    record_attempt,
    run_in_loopback,
    square,
)
from rich.console import Console

import t2tedge.progress
from t2tedge.errors import RecipeError, T2tedgeError
from t2tedge.pipeline.executors import (
    LocalExecutor,
    RayExecutor,
    Task,
    _check_resources,
    make_executor,
)

RETRIES = 2
SQUARE_TASKS = [Task(square, (i,), label=f"square {i}") for i in range(6)]


def _terminal_console(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Make the progress bars render into a buffer, as they would on a terminal."""
    buffer = io.StringIO()
    monkeypatch.setattr(t2tedge.progress, "console", Console(file=buffer, force_terminal=True, width=100))
    return buffer


# ---- local executor and make_executor ----------------------------------------------------------------------


def test_local_executor_runs_in_order_with_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = _terminal_console(monkeypatch)
    assert LocalExecutor().run(SQUARE_TASKS, description="squaring") == [0, 1, 4, 9, 16, 25]
    assert "squaring" in buffer.getvalue() and "6/6" in buffer.getvalue()


def test_local_executor_passes_t2tedge_errors_through_unchanged(tmp_path: Any) -> None:
    error = RecipeError("recipe 'x.yaml': unknown target 'tpu'")
    tasks = [Task(record_attempt, (str(tmp_path), "first")), Task(raise_error, (error,)), Task(square, (3,))]
    with pytest.raises(RecipeError) as raised:
        LocalExecutor().run(tasks)
    assert raised.value is error
    assert attempts(str(tmp_path), "first") == 1


def test_make_executor_names_the_choices() -> None:
    assert make_executor("local").name == "local"
    with pytest.raises(T2tedgeError) as raised:
        make_executor("dask")
    assert str(raised.value) == "unknown executor 'dask'; choose one of: local, ray"
    with pytest.raises(T2tedgeError, match="takes no address"):
        make_executor("local", address="10.0.0.1:6379")


def test_ray_executor_without_ray_names_the_extra() -> None:
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "from t2tedge.errors import T2tedgeError\n"
        "from t2tedge.pipeline.executors import make_executor\n"
        "try:\n    make_executor('ray')\nexcept T2tedgeError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "the ray executor needs Ray: pip install 't2tedge[ray]'\n"


def test_resources_must_be_offered_together_on_one_node() -> None:
    nodes_offer = [
        {"Resources": {"CPU": 1.0, "memory": 1e9}},
        {"Resources": {"mac": 1.0}},
    ]  # the Mac has no CPU for Ray
    _check_resources([Task(square, (1,)), Task(square, (1,), resources={"CPU": 0, "mac": 1})], nodes_offer)
    with pytest.raises(T2tedgeError) as raised:
        _check_resources([Task(square, (1,), label="coreml", resources={"mac": 1})], nodes_offer)
    assert (
        str(raised.value) == "task 'coreml' needs Ray resources 'CPU' (1), 'mac' (1) on one node, which no node offers"
    )


def test_labels_pick_the_nodes_whose_resources_count() -> None:
    nodes = [
        {"Resources": {"CPU": 4.0}, "Labels": {"ray.io/node-id": "a", "t2tedge/os": "linux"}},
        {"Resources": {"CPU": 1.0, "mac": 1.0}, "Labels": {"ray.io/node-id": "b", "t2tedge/os": "macos"}},
    ]
    mac = {"t2tedge/os": "macos"}
    _check_resources([Task(square, (1,), labels=mac), Task(square, (1,), labels={"t2tedge/os": "in(linux,macos)"})],
                     nodes)  # fmt: skip
    _check_resources([Task(square, (1,), resources={"CPU": 4}, labels={"t2tedge/os": "!macos"})], nodes)
    with pytest.raises(T2tedgeError) as raised:
        _check_resources([Task(square, (1,), label="coreml", labels={"t2tedge/os": "ios"})], nodes)
    assert str(raised.value) == (
        "task 'coreml' needs a Ray node labelled t2tedge/os=ios, which no node is "
        "(nodes carry: t2tedge/os=linux, t2tedge/os=macos)"
    )
    with pytest.raises(T2tedgeError) as raised:  # the 4-CPU node is not a Mac
        _check_resources([Task(square, (1,), label="coreml", resources={"CPU": 4}, labels=mac)], nodes)
    assert str(raised.value) == (
        "task 'coreml' needs Ray resource 'CPU' (4) on a node labelled t2tedge/os=macos, "
        "but no such node offers more than 1"
    )
    with pytest.raises(T2tedgeError) as raised:
        _check_resources([Task(square, (1,), label="x", resources={"mac": 1}, labels={"t2tedge/os": "!macos"})], nodes)
    assert str(raised.value).startswith(
        "task 'x' needs Ray resource 'mac' (1) on a node labelled t2tedge/os=!macos, which no such node offers"
    )


# ---- connecting to nothing ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("listener", ["nobody", "silent"])
def test_no_cluster_at_address_is_one_line_within_the_timeout(listener: str) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 't2tedge[ray]')")
    import ray

    with socket.socket() as server:
        if listener == "silent":  # accepts TCP connections (kernel backlog) and never answers, like a hung GCS
            server.bind(("127.0.0.1", 0))
            server.listen(8)
            port = server.getsockname()[1]
        else:
            port = _free_port()
        started = time.monotonic()
        with pytest.raises(T2tedgeError) as raised:
            RayExecutor(address=f"127.0.0.1:{port}", connect_timeout_s=3)
        elapsed_s = time.monotonic() - started
    assert str(raised.value) == f"no Ray cluster answers at 127.0.0.1:{port} (waited 3 s)"
    assert 3 <= elapsed_s < 6
    assert not ray.is_initialized()


# ---- a real 2-node cluster on loopback ---------------------------------------------------------------------


def _error(run: Any) -> dict[str, str] | None:
    try:
        run()
    except T2tedgeError as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def two_node_scenario(marker_dir: str) -> None:
    """Runs inside the network namespace: everything the tests check, on one cluster."""
    import ray
    from ray_harness import always_die, busy, die_on_first_attempt, emit, loopback_cluster

    out: dict[str, Any] = {}
    started = time.perf_counter()
    with loopback_cluster([{"n0": 1}, {"n1": 1}], [{"t2tedge/role": "n0"}, {"t2tedge/role": "n1"}]) as cluster:
        out["startup_s"] = time.perf_counter() - started
        executor = RayExecutor(address=cluster.address, retries=RETRIES, connect_timeout_s=20)
        out["connect_s"] = time.perf_counter() - started - out["startup_s"]
        out["node_addresses"] = [node["NodeManagerAddress"] for node in ray.nodes()]
        out["node_of"] = {
            name: node["NodeID"] for node in ray.nodes() for name in ("n0", "n1") if name in node["Resources"]
        }

        buffer = io.StringIO()
        t2tedge.progress.console = Console(file=buffer, force_terminal=True, width=100)
        out["squares"] = executor.run(SQUARE_TASKS, description="squaring on ray")
        out["progress"] = buffer.getvalue()

        executor.run([Task(busy, (0.01,), resources={"n0": 1}), Task(busy, (0.01,), resources={"n1": 1})])  # warm
        for key, resources in (("two_nodes", {}), ("one_node", {"n0": 0.25})):
            began = time.perf_counter()
            ran = executor.run([Task(busy, (1.0,), label=f"busy {i}", resources=resources) for i in range(4)])
            out[f"{key}_s"] = time.perf_counter() - began
            out[f"{key}_used"] = sorted({result["node"] for result in ran})

        labelled = [Task(busy, (0.01,), label=f"on n1 {i}", labels={"t2tedge/role": "n1"}) for i in range(4)]
        out["labelled_used"] = sorted({result["node"] for result in executor.run(labelled)})
        unlabelled = Task(record_attempt, (marker_dir, "no_label"), label="on a mac", labels={"t2tedge/role": "mac"})
        out["no_label"] = _error(lambda: executor.run([Task(record_attempt, (marker_dir, "no_label")), unlabelled]))
        out["no_label_ran"] = attempts(marker_dir, "no_label")

        out["die_once"] = executor.run([Task(die_on_first_attempt, (marker_dir,), label="die once")])
        out["die_once_attempts"] = attempts(marker_dir, "die_once")
        out["always_die"] = _error(lambda: executor.run([Task(always_die, (marker_dir,), label="always die")]))
        out["always_die_attempts"] = attempts(marker_dir, "always_die")

        for key, resources in (("no_mac", {"CPU": 1, "mac": 1}), ("two_cpus", {"CPU": 2})):
            innocent = Task(record_attempt, (marker_dir, key), label="innocent")
            greedy = Task(record_attempt, (marker_dir, key), label="compile t2t_vit_7/coreml/fp16", resources=resources)
            out[key] = _error(lambda tasks=[innocent, greedy]: executor.run(tasks))
            time.sleep(0.5)  # time for a wrongly submitted innocent task to leave its marker
            out[f"{key}_ran"] = attempts(marker_dir, key)

        negative = Task(square, (1,), label="negative", resources={"CPU": -1})
        out["negative_cpu"] = _error(lambda: executor.run([Task(square, (2,)), negative]))

        recipe_error = RecipeError("recipe 'edge.yaml': target 'tpu' is not registered")
        out["recipe_error"] = _error(lambda: executor.run([Task(raise_error, (recipe_error,), label="recipe")]))
        value_error = ValueError("scale must be positive\nsecond line")
        failing = Task(raise_error, (value_error, marker_dir, "value_error"), label="calibrate mobilenet")
        out["value_error"] = _error(lambda: executor.run([failing]))
        out["value_error_attempts"] = attempts(marker_dir, "value_error")

        executor.close()
        out["closed_its_own_ray"] = not ray.is_initialized()
        ray.init(address=cluster.address, log_to_driver=False)
        RayExecutor().close()
        out["left_anothers_ray_open"] = ray.is_initialized()
    emit(out)


def local_start_scenario() -> None:
    """Runs inside the network namespace: the executor starts a Ray of its own and shuts it down."""
    import ray
    from ray_harness import emit

    started = time.perf_counter()
    executor = RayExecutor()
    out: dict[str, Any] = {"start_s": time.perf_counter() - started}
    out["node_addresses"] = [node["NodeManagerAddress"] for node in ray.nodes()]
    out["squares"] = executor.run(SQUARE_TASKS)
    executor.close()
    out["closed"] = not ray.is_initialized()
    emit(out)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = loopback_skip_reason()
    if reason:
        pytest.skip(reason)
    marker_dir = tmp_path_factory.mktemp("markers")
    began = time.perf_counter()
    seen = run_in_loopback(f"from test_executors import two_node_scenario; two_node_scenario({str(marker_dir)!r})")
    print(
        f"\n2-node loopback cluster: start-up {seen['startup_s']:.1f} s, connect {seen['connect_s']:.2f} s; "
        f"4 x 1-s CPU tasks: 2 nodes {seen['two_nodes_s']:.2f} s, 1 node {seen['one_node_s']:.2f} s; "
        f"script {time.perf_counter() - began:.1f} s"
    )
    return seen


def test_cluster_stays_on_loopback(two_nodes: dict[str, Any]) -> None:
    assert len(two_nodes["node_addresses"]) == 3
    assert set(two_nodes["node_addresses"]) == {"127.0.0.1"}


def test_ray_results_equal_local_results_with_progress(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["squares"] == LocalExecutor().run(SQUARE_TASKS)
    assert "squaring on ray" in two_nodes["progress"] and "6/6" in two_nodes["progress"]


def test_tasks_spread_over_both_nodes_and_custom_resources_pin_them(two_nodes: dict[str, Any]) -> None:
    node_of = two_nodes["node_of"]
    assert two_nodes["two_nodes_used"] == sorted([node_of["n0"], node_of["n1"]])
    assert two_nodes["one_node_used"] == [node_of["n0"]]


def test_node_labels_pin_tasks_and_unmatched_labels_are_refused_before_anything_runs(
    two_nodes: dict[str, Any],
) -> None:
    assert two_nodes["labelled_used"] == [two_nodes["node_of"]["n1"]]
    assert two_nodes["no_label"] == {
        "type": "T2tedgeError",
        "message": "task 'on a mac' needs a Ray node labelled t2tedge/role=mac, which no node is "
        "(nodes carry: t2tedge/role=n0, t2tedge/role=n1)",
    }
    assert two_nodes["no_label_ran"] == 0


def test_a_killed_worker_is_retried(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["die_once"] == [2]
    assert two_nodes["die_once_attempts"] == 2


def test_a_task_whose_worker_keeps_dying_fails_in_one_line(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["always_die"] == {
        "type": "T2tedgeError",
        "message": f"task 'always die' died {RETRIES + 1} times on the Ray cluster "
        "(its worker process or node was killed or crashed)",
    }
    assert two_nodes["always_die_attempts"] == RETRIES + 1


def test_unoffered_resources_are_refused_before_anything_runs(two_nodes: dict[str, Any]) -> None:
    no_mac = two_nodes["no_mac"]
    assert no_mac["message"].startswith(
        "task 'compile t2t_vit_7/coreml/fp16' needs Ray resource 'mac' (1), which no node offers (nodes offer: CPU, "
    )
    assert "n0" in no_mac["message"] and "\n" not in no_mac["message"]
    assert two_nodes["two_cpus"]["message"] == (
        "task 'compile t2t_vit_7/coreml/fp16' needs Ray resource 'CPU' (2), but no node offers more than 1"
    )
    assert two_nodes["no_mac_ran"] == two_nodes["two_cpus_ran"] == 0


def test_resources_ray_refuses_are_one_line(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["negative_cpu"]["message"].startswith("task 'negative' has resources Ray refuses: ValueError: ")
    assert "\n" not in two_nodes["negative_cpu"]["message"]


def test_t2tedge_errors_arrive_as_the_same_line(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["recipe_error"] == {
        "type": "RecipeError",
        "message": "recipe 'edge.yaml': target 'tpu' is not registered",
    }


def test_application_errors_are_one_line_and_not_retried(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["value_error"] == {
        "type": "T2tedgeError",
        "message": "task 'calibrate mobilenet' failed on the Ray cluster: ValueError: scale must be positive",
    }
    assert two_nodes["value_error_attempts"] == 1


def test_close_shuts_down_only_the_ray_it_started(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["closed_its_own_ray"]
    assert two_nodes["left_anothers_ray_open"]


def test_ray_executor_starts_a_local_ray_when_given_no_address() -> None:
    reason = loopback_skip_reason()
    if reason:
        pytest.skip(reason)
    seen = run_in_loopback("from test_executors import local_start_scenario; local_start_scenario()")
    print(f"\nlocal Ray start: {seen['start_s']:.1f} s")
    assert seen["node_addresses"] == ["127.0.0.1"]
    assert seen["squares"] == [0, 1, 4, 9, 16, 25]
    assert seen["closed"]


def test_results_are_copied_out_of_the_object_store() -> None:
    import numpy as np

    from t2tedge.pipeline.executors import _owned

    pinned = np.arange(6.0)
    pinned.flags.writeable = False  # how ray.get hands back an array that lives in the object store
    owned = _owned({"logits": pinned, "rows": [pinned, 3], "label": "measured"})
    assert owned["logits"].flags.writeable and owned["rows"][0].flags.writeable and owned["rows"][1] == 3
    np.testing.assert_array_equal(owned["logits"], pinned)
    mine = np.zeros(2)
    assert _owned(mine) is mine  # an array the driver owns is not copied
