"""An SSH server on 127.0.0.1 for the device tests where OpenSSH's ``sshd`` is not installed.

The system ``ssh`` stays the client, so t2tedge talks to this server exactly as to a device. It behaves
like the ``sshd`` of tests/test_devices.py where t2tedge relies on it: public-key logins for one user with
the keys of one authorized_keys file (any other key or user is refused), each command run by a shell in
the user's home directory with sshd's small environment, in a new session (its own process group, which
``Ssh.kill`` ends), binary stdin/stdout/stderr and the exit status or signal sent back. Like sshd without
a pty, it does not kill a command whose client went away, so the hanging-command test still checks
t2tedge's own kill; whatever is left when the server stops is killed then, so nothing outlives the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh

CHUNK_BYTES = 1 << 16
STOP_TIMEOUT_S = 30.0


class _Login(asyncssh.SSHServer):
    """One connection: only ``user`` may log in, only with a key from ``authorized_keys``."""

    def __init__(self, user: str, authorized_keys: Path, connections: set[asyncssh.SSHServerConnection]) -> None:
        self.user = user
        self.authorized_keys = authorized_keys
        self.connections = connections
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self.conn)

    def begin_auth(self, username: str) -> bool:
        # Other users get no keys, so every key they offer is refused, as sshd refuses a key it has not seen.
        if username == self.user:
            self.conn.set_authorized_keys(str(self.authorized_keys))
        return True

    def public_key_auth_supported(self) -> bool:
        return True


class _Sessions:
    """Runs each session's command and remembers the ones still running, to kill them at shutdown."""

    def __init__(self) -> None:
        account = pwd.getpwuid(os.getuid())
        self.home = account.pw_dir
        # What sshd (without PAM) gives a session; nothing of the test process leaks into the "device".
        self.env = {
            "HOME": account.pw_dir,
            "USER": account.pw_name,
            "LOGNAME": account.pw_name,
            "SHELL": "/bin/sh",
            "PATH": "/usr/local/bin:/usr/bin:/bin",
        }
        self.running: dict[asyncio.Task, asyncio.subprocess.Process] = {}

    async def __call__(self, session: asyncssh.SSHServerProcess) -> None:
        if session.command is None:
            session.stderr.write(b"this test server runs commands only (ssh HOST COMMAND)\n")
            session.exit(1)
            return
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            session.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.home,
            env=self.env,
            start_new_session=True,  # sshd starts each session in a new one; Ssh.kill ends its process group
        )
        task = asyncio.current_task()
        self.running[task] = proc
        feeding = asyncio.ensure_future(_feed(session.stdin, proc.stdin))
        try:
            await asyncio.gather(_forward(proc.stdout, session.stdout), _forward(proc.stderr, session.stderr))
            status = await proc.wait()
        finally:
            feeding.cancel()
            del self.running[task]
        # A client that went away gets nothing; the channel is closed already.
        with contextlib.suppress(OSError, asyncssh.Error):
            if status < 0:
                session.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))
            else:
                session.exit(status)

    def kill_all(self) -> list[asyncio.Task]:
        """SIGKILL the process group of every command still running; their tasks, to wait for."""
        for proc in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        return list(self.running)


async def _feed(source: asyncssh.SSHReader, sink: asyncio.StreamWriter) -> None:
    """Client -> command's stdin, then EOF; a command that stops reading drops the rest (as under sshd)."""
    with contextlib.suppress(OSError, asyncssh.Error):
        while data := await source.read(CHUNK_BYTES):
            sink.write(data)
            await sink.drain()
    sink.close()


async def _forward(source: asyncio.StreamReader, sink: asyncssh.SSHWriter) -> None:
    """Command's stdout or stderr -> client, until the command closes it.

    Once the client is gone the output is read and dropped, so the command never blocks on a full pipe.
    """
    while data := await source.read(CHUNK_BYTES):
        with contextlib.suppress(OSError, asyncssh.Error):
            sink.write(data)
            await sink.drain()


@contextlib.contextmanager
def serve(host_key: Path, authorized_keys: Path, user: str) -> Iterator[int]:
    """Run the server on 127.0.0.1 at a free port (yielded) in a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ssh-server", daemon=True)
    thread.start()
    sessions = _Sessions()
    connections: set[asyncssh.SSHServerConnection] = set()

    async def start() -> asyncssh.SSHAcceptor:
        return await asyncssh.listen(
            "127.0.0.1",  # loopback only: it runs any command of whoever holds the test key
            0,
            server_factory=lambda: _Login(user, authorized_keys, connections),
            server_host_keys=[str(host_key)],
            process_factory=sessions,
            encoding=None,  # tar archives and numpy tensors pass through stdin/stdout
            allow_pty=False,
            agent_forwarding=False,
            config=None,
        )

    async def stop(acceptor: asyncssh.SSHAcceptor) -> None:
        acceptor.close()
        await acceptor.wait_closed()
        left = sessions.kill_all()
        for conn in list(connections):
            conn.close()
        if left:
            await asyncio.wait(left, timeout=STOP_TIMEOUT_S)

    try:
        acceptor = asyncio.run_coroutine_threadsafe(start(), loop).result(STOP_TIMEOUT_S)
        try:
            yield acceptor.get_port()
        finally:
            asyncio.run_coroutine_threadsafe(stop(acceptor), loop).result(STOP_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)
        loop.close()
