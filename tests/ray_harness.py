"""A multi-node Ray cluster on loopback only, for tests of the Ray executor.

Ray binds the machine's interface address, so the cluster runs inside a fresh network namespace
(``unshare -n``) where ``lo`` is the only interface: nothing it sends can leave the machine. A test hands
``run_in_loopback`` a short script; the script starts ``loopback_cluster`` and prints one JSON line with what
it saw, which comes back parsed. The task functions below are module-level so Ray workers can import them
(the cluster's processes get ``tests/`` and the repo root on ``PYTHONPATH``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 100 * 1024**2
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def loopback_skip_reason() -> str | None:
    """Why a loopback-only Ray cluster cannot run on this host, or None when it can."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 't2tedge[ray]')"
    if os.geteuid() != 0:
        return "a private network namespace (unshare -n) needs root"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on this host to build a loopback-only network namespace"
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare -n` does not work here: {exc}"
    if probe.returncode != 0:
        return f"`unshare -n` does not work here: {probe.stderr.strip() or probe.returncode}"
    return None


def run_in_loopback(script: str, timeout: float = 240) -> dict[str, Any]:
    """Run ``script`` with this Python in a network namespace that has only ``lo``; return its last JSON line."""
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's unix socket paths must stay under 108 bytes
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=ray_tmp,
        PYTHONUNBUFFERED="1",
    )
    # unshare execs sh, which execs Python: one pid, so a terminate reaches Ray's own cleanup handler
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable, script]
    proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AssertionError(f"loopback script ran past {timeout:g} s; stderr tail:\n{stderr[-3000:]}") from None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"loopback script exited {proc.returncode}; stderr tail:\n{stderr[-3000:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AssertionError(f"loopback script did not end with a JSON line: {lines[-1][:300]!r}") from None


@contextlib.contextmanager
def loopback_cluster(
    worker_resources: Sequence[Mapping[str, float]] = ({}, {}),
    worker_labels: Sequence[Mapping[str, str]] | None = None,
) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster``: a CPU-less head plus one 1-CPU worker node per entry, all on 127.0.0.1.

    Each entry holds that worker node's custom resources; ``worker_labels`` (one entry per worker node) its
    Ray node labels. The driver is not connected; shutdown at exit.
    """
    import ray
    from ray.cluster_utils import Cluster

    small = {"node_ip_address": LOOPBACK, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **small})
    try:
        labels = worker_labels or [{}] * len(worker_resources)
        for resources, node_labels in zip(worker_resources, labels, strict=True):
            cluster.add_node(num_cpus=1, resources=dict(resources), labels=dict(node_labels), **small)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def emit(result: Mapping[str, Any]) -> None:
    """Print the script's result as the one JSON line ``run_in_loopback`` reads."""
    print(json.dumps(result), flush=True)


# ---- task functions the workers run -------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def busy(seconds: float) -> dict[str, Any]:
    """Keep one CPU busy for ``seconds``; say where that happened."""
    import ray

    end = time.perf_counter() + seconds
    spins = 0
    while time.perf_counter() < end:
        spins += 1
    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "spins": spins}


def record_attempt(marker_dir: str, name: str) -> int:
    """Append one line to ``marker_dir/name``; the attempt's number (1 for the first)."""
    with open(Path(marker_dir) / name, "a") as marker:
        marker.write(f"{os.getpid()}\n")
    return attempts(marker_dir, name)


def attempts(marker_dir: str, name: str) -> int:
    path = Path(marker_dir) / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def die_on_first_attempt(marker_dir: str) -> int:
    """Kill this worker process the first time; return the attempt number afterwards."""
    attempt = record_attempt(marker_dir, "die_once")
    if attempt == 1:
        os._exit(1)
    return attempt


def always_die(marker_dir: str) -> None:
    record_attempt(marker_dir, "always_die")
    os._exit(1)


def raise_error(error: BaseException, marker_dir: str | None = None, name: str = "raised") -> None:
    if marker_dir is not None:
        record_attempt(marker_dir, name)
    raise error
