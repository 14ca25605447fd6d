"""Remote devices over SSH on loopback: registry, check, remote validate/bench, bad input.

A module-scoped SSH server listens on 127.0.0.1 at a free high port with a host key, client key and
authorized_keys generated in a temp directory; no system config is read or changed. It is OpenSSH's
``sshd`` where that is installed (CI), else the asyncssh server of tests/ssh_server.py; the client is always
the system ``ssh``, as in production. The "device" is this machine, its python is this interpreter, so
remote results must equal local ones.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from t2tedge.artifact import list_files
from t2tedge.data.cache import preprocess
from t2tedge.data.datasets import open_dataset
from t2tedge.devices import remote_runner
from t2tedge.devices.config import Device, DeviceConfigError, add_device, get_device, load_devices
from t2tedge.devices.remote import check_device, remote_latency, remote_logits, validate_artifact_remote
from t2tedge.devices.remote_runner import FIXED_BATCH_REASON
from t2tedge.devices.ssh import DeviceDiskFullError, DeviceTimeoutError
from t2tedge.models import get_spec
from t2tedge.models.conditioning import well_conditioned
from t2tedge.models.spec import Preprocess
from t2tedge.pipeline.export import export_onnx
from t2tedge.pipeline.store import Artifact
from t2tedge.pipeline.validate import validate_artifact
from t2tedge.targets import BuildInputs, get_target

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(
    not (shutil.which("ssh") and shutil.which("ssh-keygen")),
    reason="OpenSSH client (ssh, ssh-keygen) not installed: t2tedge reaches devices with the system ssh",
)
SIZE = 32
TARGETS = ("onnxruntime", "openvino")
DATA = "fashion_mnist:test"
LIMIT = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _openssh_sshd(root: Path) -> Iterator[int]:
    """OpenSSH's sshd on 127.0.0.1 at a free port (yielded), with the keys in ``root``."""
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nPrintMotd no\n"
    )
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755)  # sshd's privilege-separation directory (packaged, not config)
    log = open(root / "sshd.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"sshd did not start: {(root / 'sshd.log').read_text()[-500:]}")
        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A throwaway SSH server on loopback, which one (``server``), and the client options that reach it."""
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copyfile(root / "client_key.pub", root / "authorized_keys")
    user = getpass.getuser()
    options = [f"UserKnownHostsFile={root / 'known_hosts'}", "StrictHostKeyChecking=accept-new", "IdentitiesOnly=yes"]
    if Path(SSHD).is_file():
        server = f"OpenSSH {SSHD}"
        serving = _openssh_sshd(root)
    else:
        pytest.importorskip("asyncssh", reason="no sshd here and asyncssh, its stand-in, is not installed")
        from ssh_server import serve

        server = "asyncssh (tests/ssh_server.py; no sshd here)"
        serving = serve(root / "host_key", root / "authorized_keys", user)
    with serving as port:
        print(f"device tests: SSH server {server} on 127.0.0.1:{port}")
        yield {"root": root, "port": port, "options": options, "user": user, "server": server}


@pytest.fixture()
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Devices are registered in a temp config directory, never the user's."""
    monkeypatch.setenv("T2TEDGE_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


def _device(sshd: dict, name: str, workdir: Path, key: str = "client_key", **extra: object) -> Device:
    options = [f"IdentityFile={sshd['root'] / key}", *sshd["options"]]
    device = Device(
        name=name,
        url=f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}",
        python=str(extra.pop("python", sys.executable)),
        workdir=str(workdir),
        ssh_options=options,
        ssh_config="/dev/null",
        **extra,  # type: ignore[arg-type]
    )
    add_device(device, replace=True)
    return device


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 artifacts of one tiny 32 px MobileNetV2 for onnxruntime and openvino, in a store layout."""
    root = tmp_path_factory.mktemp("store")
    pre = Preprocess(input_size=SIZE, resize_size=SIZE, interpolation="bilinear")
    images = preprocess(open_dataset("fashion_mnist:train"), np.arange(16), pre, "test images")
    torch.manual_seed(0)
    model = well_conditioned(get_spec("mobilenet_v2").create(num_classes=10, image_size=SIZE), images)
    onnx_path = root / "model.onnx"
    export_onnx(model, SIZE, onnx_path)
    paths = {}
    for target in TARGETS:
        out = root / "mobilenet_v2" / target / "fp32-0123abcd"
        out.mkdir(parents=True)
        inputs = BuildInputs(onnx_path=onnx_path, image_size=SIZE, num_classes=10)
        facts = get_target(target).build(inputs, "fp32", get_target(target).Config(), out)
        model_io = {"family": "mobilenet", "image_size": SIZE, "num_classes": 10, "preprocess": pre.to_dict()}
        manifest = {"model": "mobilenet_v2", "target": target, "precision": "fp32", "build": facts}
        manifest["model_io"] = model_io
        (out / "manifest.json").write_text(json.dumps({**manifest, "files": list_files(out)}))
        paths[target] = out
    return paths


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "t2tedge.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_device_add_list_check_via_cli(sshd: dict, config_dir: Path, tmp_path: Path) -> None:
    url = f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}"
    options = [
        a for o in [f"IdentityFile={sshd['root'] / 'client_key'}", *sshd["options"]] for a in ("--ssh-option", o)
    ]
    added = _cli("device", "add", "loop", url, "--python", sys.executable, "--workdir", str(tmp_path / "w"),
                 "--ssh-config", "/dev/null", *options)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert (config_dir / "devices.yaml").is_file()
    assert get_device("loop").port == sshd["port"]
    listed = _cli("device", "list")
    assert "loop" in listed.stdout and url in listed.stdout
    checked = _cli("device", "check", "loop")
    assert checked.returncode == 0, checked.stderr
    import onnxruntime
    import openvino

    assert f"onnxruntime {onnxruntime.__version__}" in checked.stdout
    assert f"openvino {openvino.get_version()}" in checked.stdout
    assert "runtime tensorrt" in checked.stdout and "runtime coreml" in checked.stdout
    assert socket.gethostname() in checked.stdout
    assert "pass --replace" in _one_line_error(_cli("device", "add", "loop", url))
    assert "not ssh://" in _one_line_error(_cli("device", "add", "bad", "jetson.local"))
    assert "unknown device 'nope'" in _one_line_error(_cli("device", "check", "nope"))


@pytest.mark.parametrize("target", TARGETS)
def test_remote_validate_and_latency_match_local(
    target: str, sshd: dict, config_dir: Path, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    _device(sshd, "loop", tmp_path / "remote")
    path = artifacts[target]
    local = validate_artifact(path, DATA, LIMIT, threads=1)
    remote = validate_artifact_remote(path, DATA, "loop", LIMIT, threads=1, timeout_s=120)
    assert remote["label"] == "measured" and remote["device"] == "loop"
    assert remote["images"] == local["images"] == LIMIT
    assert remote["top1"] == local["top1"] and remote["top5"] == local["top5"]
    assert remote["host"]["hostname"] == socket.gethostname()
    assert remote["runtime"]["runtime"] == target and remote["runtime"]["threads"] == 1
    if target == "openvino":
        assert remote["runtime"]["inference_precision_used"] == "f32"  # compile.json's hint, as locally
    stored = Artifact(path).manifest["validation"]
    assert any(key.endswith("@loop") for key in stored)

    images = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    logits, info = remote_logits("loop", path, images, threads=1, timeout_s=120)
    expected = get_target(target).load(Artifact(path), threads=1)(images)
    assert info["transfer"]["uploaded_files"] == 1  # the artifact was cached; only the new tensor file went
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # validation streams shards: neither side holds more than one, and each is deleted once used
    five = np.random.default_rng(2).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    sharded, info = remote_logits("loop", path, five, threads=1, timeout_s=120, shard_images=2)
    assert info["shards"] == 3 and len(info["transfer"]) == 3
    local_five = get_target(target).load(Artifact(path), threads=1)(five)
    np.testing.assert_allclose(sharded, local_five, rtol=1e-5, atol=1e-5)
    assert not list((tmp_path / "remote").rglob("images.npy"))

    record = remote_latency("loop", path, 1, 1, warmup=2, min_iters=20, min_seconds=0.05, timeout_s=120)
    assert record["label"] == "measured" and len(record["seconds"]) >= 20
    assert record["host"]["device"] == "loop" and record["runtime"]["runtime"] == target
    runner = get_target(target).load(Artifact(path), threads=1)
    one = images[:1]
    for _ in range(2):
        runner(one)
    local_seconds = []
    for _ in range(20):
        started = time.perf_counter()
        runner(one)
        local_seconds.append(time.perf_counter() - started)
    # Same machine, same runtime and threads: equal within the noise of a busy 2-core host.
    ratio = np.median(record["seconds"]) / np.median(local_seconds)
    assert 0.2 < ratio < 5, ratio


def test_validate_cli_with_device(sshd: dict, config_dir: Path, artifacts: dict[str, Path], tmp_path: Path) -> None:
    _device(sshd, "loop", tmp_path / "remote")
    result = _cli("validate", str(artifacts["onnxruntime"]), "--data", DATA, "--limit", "10", "--threads", "1",
                  "--device", "loop")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(measured on loop)" in result.stdout


def test_bench_on_device_lands_beside_local_numbers_in_the_report(
    sshd: dict, config_dir: Path, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    from t2tedge.report import write_report

    _device(sshd, "loop", tmp_path / "remote")
    paths = [str(artifacts[t]) for t in TARGETS]
    quick = ("--threads", "1", "--warmup", "1", "--min-iters", "10", "--min-seconds", "0")
    for where in (("--device", "loop"), ()):
        result = _cli("bench", *paths, *quick, *where, "--json", str(tmp_path / "b.json"))
        assert result.returncode == 0, result.stderr
    remote = _cli("bench", *paths, *quick, "--device", "loop", "--json", str(tmp_path / "b.json"))
    records = json.loads((tmp_path / "b.json").read_text())["records"]
    assert {r["target"] for r in records} == set(TARGETS)
    assert all(r["host"] == "loop" and r["reused"] for r in records), remote.stdout  # stored, not re-timed
    stored = Artifact(artifacts["openvino"]).manifest["latency"]
    assert stored["loop/b1-t1"]["label"] == "measured" and stored["loop/b1-t1"]["iterations"] >= 10
    assert stored["loop/b1-t1"]["host_info"]["device"] == "loop" and stored["local/b1-t1"]["label"] == "measured"
    # a report over these artifacts shows one latency column group per host
    summary = {
        "recipe": {"name": "t", "benchmark": {"batch_sizes": [1], "threads": [1]}},
        "rows": [{"artifact": p, "accuracy": {"label": "measured", "top1": 50.0}} for p in paths],
        "models": {},
    }
    (tmp_path / "t-summary.json").write_text(json.dumps(summary))
    text = write_report(tmp_path).markdown.read_text()
    assert "p50 ms @local" in text and "p50 ms @loop" in text


def test_unreachable_host_and_refused_key_fail_fast(sshd: dict, config_dir: Path, tmp_path: Path) -> None:
    closed = Device("closed", f"ssh://{sshd['user']}@127.0.0.1:{_free_port()}", ssh_config="/dev/null")
    add_device(closed)
    started = time.monotonic()
    line = _one_line_error(_cli("device", "check", "closed"))
    assert "cannot reach device closed" in line and "Connection refused" in line
    _device(sshd, "wrongkey", tmp_path / "w", key="other_key")
    line = _one_line_error(_cli("device", "check", "wrongkey"))
    assert "refused the ssh key" in line and "Permission denied" in line
    assert time.monotonic() - started < 30


def test_missing_runtime_is_unavailable(
    sshd: dict, config_dir: Path, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "block"
    (blocker / "openvino").mkdir(parents=True)
    (blocker / "openvino" / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    python = tmp_path / "python-without-openvino"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={blocker} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    _device(sshd, "noov", tmp_path / "remote", python=python)
    record = remote_latency("noov", artifacts["openvino"], 1, 1, 1, 5, 0.0, timeout_s=60)
    assert record["label"] == "unavailable" and record["reason"] == "openvino not importable on noov"
    assert record["seconds"] == []
    result = validate_artifact_remote(artifacts["openvino"], DATA, "noov", 10, threads=1, timeout_s=60)
    assert result["label"] == "unavailable" and result["reason"] == "openvino not importable on noov"
    assert remote_latency("noov", artifacts["onnxruntime"], 1, 1, 1, 5, 0.0, timeout_s=60)["label"] == "measured"


def test_corrupted_or_partial_remote_files_are_copied_again(
    sshd: dict, config_dir: Path, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    workdir = tmp_path / "remote"
    _device(sshd, "loop", workdir)
    path = artifacts["onnxruntime"]
    first = remote_latency("loop", path, 1, 1, 1, 3, 0.0, timeout_s=60)
    assert first["transfer"]["uploaded_files"] == 1
    assert remote_latency("loop", path, 1, 1, 1, 3, 0.0, timeout_s=60)["transfer"]["uploaded_files"] == 0
    (cached,) = workdir.glob("artifacts/*/model.onnx")
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])  # as if a copy had been cut off
    again = remote_latency("loop", path, 1, 1, 1, 3, 0.0, timeout_s=60)
    assert again["label"] == "measured" and again["transfer"]["uploaded_files"] == 1
    assert cached.read_bytes() == (path / "model.onnx").read_bytes()
    assert not any((workdir / "incoming").iterdir())


def test_hanging_remote_command_times_out_and_is_killed(sshd: dict, config_dir: Path, tmp_path: Path) -> None:
    marker = "417.25"  # a sleep nobody else runs
    python = tmp_path / "python-that-hangs"
    python.write_text(f"#!/bin/sh\nexec sleep {marker}\n")
    python.chmod(0o755)
    _device(sshd, "hangs", tmp_path / "remote", python=python)
    started = time.monotonic()
    with pytest.raises(DeviceTimeoutError, match="did not finish within 3 s; the remote process was killed"):
        check_device("hangs", timeout_s=3)
    assert time.monotonic() - started < 15

    def sleeping() -> list[str]:
        found = []
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if (proc / "cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                    found.append(proc.name)
        return found

    assert sleeping() == []
    assert not any((tmp_path / "remote" / "run").iterdir())  # the pid file went with the process


def test_full_disk_on_device(sshd: dict, config_dir: Path, artifacts: dict[str, Path], tmp_path: Path) -> None:
    workdir = tmp_path / "full"
    workdir.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(workdir)],
                                           capture_output=True).returncode:  # fmt: skip
        pytest.skip("needs root and tmpfs mounts to make a small disk")
    try:
        _device(sshd, "tiny", workdir)
        with pytest.raises(DeviceDiskFullError, match="device tiny: no space left"):
            remote_latency("tiny", artifacts["onnxruntime"], 1, 1, 1, 3, 0.0, timeout_s=60)
        assert not list(workdir.glob("artifacts/*/*"))
    finally:
        subprocess.run(["umount", str(workdir)], check=False)


@pytest.mark.parametrize("target", TARGETS)
def test_remote_batch_sweep_of_a_fixed_batch_artifact_is_refused(
    target: str, sshd: dict, config_dir: Path, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    # The artifacts have a fixed batch of 1: four batch-1 calls are not batch-4 latency.
    _device(sshd, "loop", tmp_path / "remote")
    record = remote_latency("loop", artifacts[target], 4, 1, 1, 3, 0.0, timeout_s=60)
    assert record["label"] == "unavailable" and record["seconds"] == []
    assert record["reason"] == FIXED_BATCH_REASON.format(fixed=1)
    assert "dynamic_batch: true" in record["reason"]
    assert remote_latency("loop", artifacts[target], 1, 1, 1, 3, 0.0, timeout_s=60)["label"] == "measured"


def test_remote_runner_refuses_to_time_another_batch_than_the_fixed_one() -> None:
    # The runner's own check, for artifacts whose manifest does not tell t2tedge the batch (OpenVINO IR).
    calls = []
    model = remote_runner.Model(lambda x: calls.append(len(x)) or np.zeros((len(x), 10)), 1, [3, 8, 8], {})
    request = {"batch": 4, "image_size": 8, "warmup": 1, "min_iters": 2, "min_seconds": 0}
    with pytest.raises(remote_runner.Unavailable, match=r"fixed batch of 1 \(export with dynamic_batch: true"):
        remote_runner.latency(model, request)
    assert calls == []
    assert len(remote_runner.latency(model, {**request, "batch": 1})) >= 2


def test_registry_refuses_bad_entries(config_dir: Path) -> None:
    with pytest.raises(DeviceConfigError, match="not ssh://"):
        Device("jetson", "nvidia@jetson")
    with pytest.raises(DeviceConfigError, match="Key=Value"):
        Device("jetson", "ssh://nvidia@jetson", ssh_options=["-i key"])
    device = Device("jetson", "ssh://nvidia@[fe80::1]:2222")
    assert (device.user, device.host, device.port) == ("nvidia", "fe80::1", 2222)
    add_device(device)
    with pytest.raises(DeviceConfigError, match="exists"):
        add_device(device)
    assert list(load_devices()) == ["jetson"]
    (config_dir / "devices.yaml").write_text("devices: [1, 2]\n")
    with pytest.raises(DeviceConfigError, match="mapping"):
        load_devices()


def test_registry_refuses_a_host_that_ssh_would_read_as_an_option(config_dir: Path) -> None:
    for url in ("ssh://-oProxyCommand=touch%20x", "ssh://nvidia@-oProxyCommand=id", "ssh://-jetson:22"):
        with pytest.raises(DeviceConfigError, match="starts with '-'") as caught:
            Device("jetson", url)
        assert "\n" not in str(caught.value)
    assert load_devices() == {}
    line = _one_line_error(_cli("device", "add", "evil", "ssh://-oProxyCommand=id"))
    assert "starts with '-'" in line
