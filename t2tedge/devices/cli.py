"""`t2tedge device add/list/check/remove`: the registry of SSH devices."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

device_app = typer.Typer(help="Remote devices reached over SSH (Jetson, Mac, any Linux box).", no_args_is_help=True)
# As in t2tedge.cli: wide tables when stdout is a file or pipe.
out = Console(width=None if sys.stdout.isatty() else 160)


@device_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="a short name, e.g. jetson")],
    url: Annotated[str, typer.Argument(help="ssh://[user@]host[:port] (host may be an alias from ~/.ssh/config)")],
    python: Annotated[str, typer.Option(help="python on the device (needs numpy and the target's runtime)")] = (
        "python3"
    ),
    workdir: Annotated[str, typer.Option(help="cache directory on the device (relative: to the home)")] = (
        ".cache/t2tedge"
    ),
    ssh_option: Annotated[
        list[str] | None, typer.Option(help="extra ssh -o Key=Value, repeatable (e.g. IdentityFile=~/.ssh/jetson)")
    ] = None,
    ssh_config: Annotated[str | None, typer.Option(help="ssh client config to use instead of ~/.ssh/config")] = None,
    replace: Annotated[bool, typer.Option(help="overwrite a device of that name")] = False,
) -> None:
    """Register a device; nothing is contacted (run `t2tedge device check NAME` for that)."""
    from t2tedge.devices.config import Device, add_device

    device = Device(name, url, python, workdir, list(ssh_option or []), ssh_config)
    path = add_device(device, replace=replace)
    out.print(f"device {name} -> {url} saved in {path}")


@device_app.command("list")
def list_devices() -> None:
    """The registered devices."""
    from t2tedge.devices.config import load_devices, registry_path

    devices = load_devices()
    if not devices:
        out.print(f"no devices registered ({registry_path()}); add one with: t2tedge device add NAME ssh://user@host")
        return
    table = Table(title=f"devices ({registry_path()})")
    for column in ("name", "url", "python", "workdir", "ssh options"):
        table.add_column(column, overflow="fold")
    for device in devices.values():
        table.add_row(device.name, device.url, device.python, device.workdir, " ".join(device.ssh_options) or "-")
    out.print(table)


@device_app.command("check")
def check(
    name: Annotated[str, typer.Argument(help="a registered device")],
    timeout: Annotated[float, typer.Option(help="seconds before giving up")] = 60.0,
) -> None:
    """Connect and report OS, CPU/GPU, python and which target runtimes import there (with versions)."""
    from t2tedge.devices.remote import check_device

    facts = check_device(name, timeout)
    table = Table(title=f"device {name}: {facts['hostname']}")
    table.add_column("fact")
    table.add_column("value", overflow="fold")
    for key in ("os", "machine", "cpu", "cpu_count", "gpu", "python", "python_executable", "numpy"):
        table.add_row(key, str(facts.get(key) if facts.get(key) is not None else "-"))
    for target, runtime in facts["runtimes"].items():
        found = runtime.get("version")
        value = f"{runtime['module']} {found}" if found else f"not importable ({runtime.get('error', '')})"
        if runtime.get("installed"):
            value = f"{runtime['module']} {runtime['installed']} installed; {runtime['error']}"
        table.add_row(f"runtime {target}", value)
    out.print(table)


@device_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="a registered device")]) -> None:
    """Forget a device (its remote cache directory stays where it is)."""
    from t2tedge.devices.config import remove_device

    out.print(f"device {name} removed from {remove_device(name)}")
