"""Where pipeline tasks run: in this process (``local``) or fanned out over a Ray cluster (``ray``).

Both executors take the same ``Task`` list and return results in task order, so a stage is written once and
the recipe picks where it runs. Ray is imported only when the Ray executor is made: t2tedge works without it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from t2tedge.errors import T2tedgeError
from t2tedge.progress import track

RAY_EXTRA_HINT = "pip install 't2tedge[ray]'"

# Ray takes these three as keyword options of their own; everything else is a custom resource.
_BUILTIN_RESOURCE_OPTIONS = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}
# A gRPC (HTTP/2) server answers the client preface with a SETTINGS frame; Ray's GCS is one.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HTTP2_SETTINGS_FRAME_TYPE = 0x04


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args)``, where ``fn`` is a module-level (importable, picklable) function."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    label: str = ""  # shown in progress and in error lines
    resources: Mapping[str, float] = field(default_factory=dict)  # e.g. {"CPU": 1, "mac": 1}
    # Ray node labels the task's node must carry (Ray's label selector: "v", "!v", "in(a,b)", "!in(a,b)")
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. {"t2tedge/role": "mac"}

    @property
    def name(self) -> str:
        """The label, or the function's name where the task has none."""
        return self.label or getattr(self.fn, "__qualname__", repr(self.fn))


@dataclass(frozen=True)
class Deferred:
    """A task argument computed on the driver just before its task starts (``fn(*args)``): a validation
    shard's pixels are read when the shard is submitted, so the driver never holds them all at once."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "args", args)


def _resolved(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(arg.fn(*arg.args) if isinstance(arg, Deferred) else arg for arg in args)


class Executor(Protocol):
    """Runs tasks and returns their results in task order."""

    name: str

    def run(self, tasks: Sequence[Task], description: str = "tasks") -> list[Any]: ...

    def share(self, value: Any) -> Any:
        """``value`` as a task argument many tasks read (Ray: stored once in the object store)."""
        ...

    def require(self, tasks: Sequence[Task]) -> None:
        """Raise one line, before any work, if a task asks for resources or node labels nothing here offers."""
        ...

    def close(self) -> None: ...


class _ClosingContext:
    def __enter__(self):  # noqa: ANN204  (returns the concrete executor)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release whatever the executor holds."""


class LocalExecutor(_ClosingContext):
    """Runs tasks one after another in this process; resources and labels are ignored and exceptions
    propagate as raised."""

    name = "local"

    def run(self, tasks: Sequence[Task], description: str = "tasks") -> list[Any]:
        """Run ``tasks`` in order with a progress bar."""
        return [task.fn(*_resolved(task.args)) for task in track(tasks, description, total=len(tasks))]

    def share(self, value: Any) -> Any:
        return value

    def require(self, tasks: Sequence[Task]) -> None:
        """This process runs anything it is given: resources and labels are a cluster's concern."""


class RayExecutor(_ClosingContext):
    """Fans tasks out over a Ray cluster: the one at ``address``, or a local Ray started for this process.

    ``retries`` re-runs a task whose worker process or node died; exceptions raised by the task itself are
    never retried. Every resource and node label a task asks for is checked against the cluster before anything
    is submitted.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        retries: int = 2,
        connect_timeout_s: float = 30.0,
        runtime_env: dict | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise T2tedgeError(f"the ray executor needs Ray: {RAY_EXTRA_HINT}") from None
        if retries < 0:
            raise T2tedgeError(f"the ray executor needs retries >= 0, not {retries}")
        self.retries = retries
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self._owns_ray = False
        if ray.is_initialized():  # someone in this process already connected: use that, leave it to them
            return
        if self.address not in (None, "auto", "local"):
            _wait_for_gcs(self.address, connect_timeout_s)
        init_options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if runtime_env is not None:
            init_options["runtime_env"] = runtime_env
        if self.address is None:
            init_options["include_dashboard"] = False
        try:
            ray.init(address=self.address, **init_options)
        except Exception as exc:
            if ray.is_initialized():
                ray.shutdown()
            where = f"at {self.address}" if self.address else "on this machine"
            raise T2tedgeError(f"could not start or reach Ray {where}: {_one_line(exc)}") from None
        self._owns_ray = True

    def run(self, tasks: Sequence[Task], description: str = "tasks") -> list[Any]:
        """Check every task's resources against the cluster, submit all tasks and gather results in order."""
        import ray

        if not tasks:
            return []
        _check_resources(tasks, [node for node in ray.nodes() if node.get("Alive")])
        remote_fns: dict[Callable[..., Any], Any] = {}
        calls = []  # every task's options are checked before the first one is submitted
        for task in tasks:
            if task.fn not in remote_fns:
                remote_fns[task.fn] = ray.remote(task.fn)
            try:
                calls.append(
                    remote_fns[task.fn].options(
                        name=task.name, max_retries=self.retries, retry_exceptions=False, **_ray_resource_options(task)
                    )
                )
            except (ValueError, TypeError) as exc:
                raise T2tedgeError(f"task {task.name!r} has resources Ray refuses: {_one_line(exc)}") from None
        # at most two tasks per cluster CPU in flight: Deferred arguments (shards) are read as they go out
        cpus = sum(node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive"))
        window = max(2, int(2 * cpus))
        index_of: dict[Any, int] = {}
        results: list[Any] = [None] * len(tasks)
        pending: list[Any] = []
        queued = iter(range(len(tasks)))

        def submit() -> None:
            for i in queued:
                ref = calls[i].remote(*_resolved(tasks[i].args))
                index_of[ref] = i
                pending.append(ref)
                if len(pending) >= window:
                    return

        def finished() -> Iterator[Any]:
            submit()
            while pending:
                ready, pending[:] = ray.wait(pending, num_returns=1)
                submit()
                yield from ready

        try:
            for ref in track(finished(), description, total=len(tasks)):
                i = index_of.pop(ref)  # no reference kept: the object store may free the result
                results[i] = _owned(self._get(ref, tasks[i]))
        except BaseException:
            for ref in pending:  # one task failed (or ctrl-C): the rest would be wasted work
                ray.cancel(ref)
            raise
        return results

    def share(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def require(self, tasks: Sequence[Task]) -> None:
        import ray

        _check_resources(tasks, [node for node in ray.nodes() if node.get("Alive")])

    def _get(self, ref: Any, task: Task) -> Any:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, T2tedgeError):
                raise cause.with_traceback(None) from None
            raise T2tedgeError(f"task {task.name!r} failed on the Ray cluster: {_one_line(cause or exc)}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError):
            raise T2tedgeError(
                f"task {task.name!r} died {self.retries + 1} times on the Ray cluster "
                "(its worker process or node was killed or crashed)"
            ) from None
        except ray.exceptions.RayError as exc:
            raise T2tedgeError(f"task {task.name!r} failed on the Ray cluster: {_one_line(exc)}") from None

    def close(self) -> None:
        """Shut Ray down if this executor started or connected it; otherwise leave it be."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False


_EXECUTORS: dict[str, Callable[[str | None, int], Executor]] = {
    "local": lambda address, retries: LocalExecutor(),
    "ray": lambda address, retries: RayExecutor(address=address, retries=retries),
}


def make_executor(name: str, address: str | None = None, retries: int = 2) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``); ``address`` is the Ray cluster to connect to,
    ``retries`` how often a task whose worker died is re-run."""
    if name not in _EXECUTORS:
        raise T2tedgeError(f"unknown executor {name!r}; choose one of: {', '.join(_EXECUTORS)}")
    if address is not None and name != "ray":
        raise T2tedgeError(f"the {name} executor runs in this process and takes no address (got {address!r})")
    return _EXECUTORS[name](address, retries)


def _owned(value: Any) -> Any:
    """``value`` with its arrays copied out of Ray's object store: ``ray.get`` returns numpy arrays as
    read-only views that pin their object in the store, so holding every shard's logits until the last
    one arrives would fill the store and spill it to disk (measured: 2 nodes no faster than 1 at 50k
    images)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value if value.flags.writeable else value.copy()
    if isinstance(value, dict):
        return {key: _owned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_owned(item) for item in value)
    return value


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _ray_resource_options(task: Task) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": task.resources.get("CPU", 1)}
    if task.labels:
        options["label_selector"] = dict(task.labels)
    custom = {}
    for resource, amount in task.resources.items():
        if resource in _BUILTIN_RESOURCE_OPTIONS:
            options[_BUILTIN_RESOURCE_OPTIONS[resource]] = amount
        else:
            custom[resource] = amount
    if custom:
        options["resources"] = custom
    return options


def _needed_resources(task: Task) -> dict[str, float]:
    return {resource: amount for resource, amount in {"CPU": 1, **task.resources}.items() if amount > 0}


def _check_resources(tasks: Sequence[Task], nodes: list[dict[str, Any]]) -> None:
    """Refuse, before anything runs, a task that no alive node could ever schedule: no node carries its
    labels, or none of those that do offers its resources."""
    for task in tasks:
        eligible = [node for node in nodes if _selects(task.labels, node.get("Labels") or {})]
        if not eligible:
            raise T2tedgeError(
                f"task {task.name!r} needs a Ray node labelled {_selector_text(task.labels)}, which no node is"
                f" (nodes carry: {_carried(nodes) or 'no labels of their own'})"
            )
        where = f" on a node labelled {_selector_text(task.labels)}" if task.labels else ""
        such = "such " if task.labels else ""
        offers = [node.get("Resources", {}) for node in eligible]
        offered = sorted({name for offer in offers for name in offer if not name.startswith("node:")})
        needed = _needed_resources(task)
        for resource, amount in needed.items():
            most = max((offer.get(resource, 0) for offer in offers), default=0)
            if most >= amount:
                continue
            if most > 0:
                raise T2tedgeError(
                    f"task {task.name!r} needs Ray resource {resource!r} ({amount:g}){where}, "
                    f"but no {such}node offers more than {most:g}"
                )
            raise T2tedgeError(
                f"task {task.name!r} needs Ray resource {resource!r} ({amount:g}){where}, which no {such}node "
                f"offers (nodes offer: {', '.join(offered) or 'nothing'})"
            )
        if not any(all(offer.get(r, 0) >= a for r, a in needed.items()) for offer in offers):
            wanted = ", ".join(f"{r!r} ({a:g})" for r, a in needed.items())
            raise T2tedgeError(
                f"task {task.name!r} needs Ray resources {wanted} on one node{where}, which no {such}node offers"
            )


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a node with ``labels`` satisfies a Ray label selector (``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``)."""
    for key, expression in selector.items():
        negated = expression.startswith("!")
        body = expression[1:] if negated else expression
        listed = body.startswith("in(") and body.endswith(")")
        allowed = {v.strip() for v in body[3:-1].split(",")} if listed else {body}
        if (labels.get(key) in allowed) == negated:
            return False
    return True


def _selector_text(selector: Mapping[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(selector.items()))


def _carried(nodes: list[dict[str, Any]]) -> str:
    """The labels the nodes carry, Ray's own ``ray.io/`` ones left out."""
    labels = {f"{k}={v}" for node in nodes for k, v in (node.get("Labels") or {}).items()}
    return ", ".join(sorted(label for label in labels if not label.startswith("ray.io/")))


def _wait_for_gcs(address: str, timeout_s: float) -> None:
    """Wait until a gRPC server answers at ``address``; Ray's own connect would retry for minutes."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise T2tedgeError(f"a Ray address is HOST:PORT, not {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise T2tedgeError(f"no Ray cluster answers at {address} (waited {timeout_s:g} s)")
        if _answers_http2(host.strip("[]"), int(port), min(remaining, 2.0)):
            return
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _answers_http2(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_HTTP2_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[3] == _HTTP2_SETTINGS_FRAME_TYPE
