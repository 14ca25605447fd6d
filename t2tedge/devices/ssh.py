"""The system OpenSSH client, so ``~/.ssh/config``, agents and jump hosts work as users expect.

Every call is non-interactive (``BatchMode``), bounded (``ConnectTimeout``, keep-alives, a wall-clock
timeout) and turns ssh's failures into one-line errors. A command that runs past its timeout is killed on
the device too: :meth:`Ssh.run_tracked` records the remote process id and kills its process group.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import uuid
from pathlib import Path
from typing import IO

from t2tedge.devices.config import Device
from t2tedge.errors import T2tedgeError

CONNECT_TIMEOUT_S = 10
KILL_TIMEOUT_S = 20


class DeviceError(T2tedgeError):
    """A remote device that cannot be reached or used."""


class DeviceUnreachableError(DeviceError):
    """ssh could not connect, or the device refused the key."""


class DeviceTimeoutError(DeviceError):
    """A remote command ran past its timeout (and was killed)."""


class DeviceDiskFullError(DeviceError):
    """No space left in the device's work directory."""


class Ssh:
    """Runs commands on one device through ``ssh``."""

    def __init__(self, device: Device, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        self.device = device
        self.connect_timeout_s = connect_timeout_s

    def argv(self, command: str) -> list[str]:
        """The ssh command line that runs ``command`` (a shell string) on the device."""
        d = self.device
        options = [
            "BatchMode=yes",  # never prompt: a refused key fails at once instead of waiting for a password
            f"ConnectTimeout={self.connect_timeout_s}",
            "ServerAliveInterval=5",
            "ServerAliveCountMax=3",
            "LogLevel=ERROR",
            *d.ssh_options,
        ]
        argv = ["ssh", "-T"]
        if d.ssh_config:
            argv += ["-F", d.ssh_config]
        for option in options:
            argv += ["-o", option]
        if d.port:
            argv += ["-p", str(d.port)]
        if d.user:
            argv += ["-l", d.user]
        return [*argv, d.host, command]

    def run(
        self,
        command: str,
        timeout_s: float,
        stdin: bytes | IO[bytes] | None = None,
        what: str = "remote command",
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a shell command there; ssh failures raise one-line errors, the command's own exit code is kept."""
        kwargs = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin or subprocess.DEVNULL}
        try:
            result = subprocess.run(self.argv(command), capture_output=True, timeout=timeout_s, **kwargs)
        except FileNotFoundError:
            raise DeviceError("the OpenSSH client `ssh` is not installed on this machine") from None
        except subprocess.TimeoutExpired:
            message = f"device {self.device.name}: {what} did not finish within {timeout_s:g} s"
            raise DeviceTimeoutError(message) from None
        if result.returncode == 255:
            self._raise_ssh_error(result.stderr.decode(errors="replace"))
        return result

    def run_tracked(
        self, command: str, timeout_s: float, stdin: bytes, pid_dir: str, what: str
    ) -> subprocess.CompletedProcess[bytes]:
        """Like :meth:`run`, for a command that may hang: past ``timeout_s`` the remote process group is killed.

        The remote shell writes its pid to a file in ``pid_dir``; ``command`` runs in the same process group
        (sshd starts each session in a new one), which :meth:`kill` ends as a whole.
        """
        pid_file = quote_path(f"{pid_dir}/{uuid.uuid4().hex}.pid")
        wrapped = (
            f"mkdir -p {quote_path(pid_dir)} && echo $$ > {pid_file} || exit 125; "
            f"{command}; status=$?; rm -f {pid_file}; exit $status"
        )
        try:
            return self.run(f"sh -c {shlex.quote(wrapped)}", timeout_s, stdin, what)
        except DeviceTimeoutError:
            self.kill(pid_file)
            message = f"device {self.device.name}: {what} did not finish within {timeout_s:g} s"
            raise DeviceTimeoutError(f"{message}; the remote process was killed") from None

    def kill(self, pid_file: str) -> None:
        """Kill the process group of the pid in ``pid_file`` (shell-quoted) on the device: TERM, then KILL."""
        f = pid_file
        script = (
            f'p=$(cat {f} 2>/dev/null) || exit 0; [ -n "$p" ] || exit 0; '
            'g=$(ps -o pgid= -p "$p" 2>/dev/null | tr -d " "); '
            'if [ -n "$g" ]; then kill -TERM -"$g" 2>/dev/null; sleep 1; kill -KILL -"$g" 2>/dev/null; fi; '
            f'kill -KILL "$p" 2>/dev/null; rm -f {f}; true'
        )
        # If the device went away, the runner's own alarm() deadline ends the process there.
        with contextlib.suppress(DeviceError):
            self.run(f"sh -c {shlex.quote(script)}", KILL_TIMEOUT_S, what="killing the remote process")

    def _raise_ssh_error(self, stderr: str) -> None:
        d = self.device
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else "ssh exited with status 255"
        where = f"device {d.name} ({d.url})"
        if "Permission denied" in detail or "Too many authentication failures" in detail:
            raise DeviceUnreachableError(f"{where} refused the ssh key: {detail}")
        if "Host key verification failed" in detail or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
            raise DeviceUnreachableError(f"{where}: host key verification failed (check ~/.ssh/known_hosts)")
        if any(
            s in detail
            for s in ("Connection refused", "timed out", "Could not resolve", "No route", "unreachable", "closed by")
        ):
            raise DeviceUnreachableError(f"cannot reach {where}: {detail}")
        raise DeviceError(f"ssh to {where} failed: {detail}")


def quote_path(path: str | Path) -> str:
    """Shell-quote a remote path, leaving a leading ``~/`` to the remote shell."""
    text = str(path)
    if text.startswith("~/"):
        return "~/" + shlex.quote(text[2:])
    return shlex.quote(text)
