"""The device registry: a small YAML file in the user's config directory.

``$T2TEDGE_CONFIG_DIR/devices.yaml`` when that is set (tests use it), else
``$XDG_CONFIG_HOME/t2tedge/devices.yaml``, else ``~/.config/t2tedge/devices.yaml``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from t2tedge.errors import T2tedgeError

DEFAULT_PYTHON = "python3"
# Relative to the remote user's home directory (where ssh commands start).
DEFAULT_WORKDIR = ".cache/t2tedge"
_URL = re.compile(r"^ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:\[\]]+|\[[0-9a-fA-F:]+\])(?::(?P<port>\d+))?/?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class DeviceConfigError(T2tedgeError):
    """A device name, URL or registry file that is not usable."""


@dataclass
class Device:
    """A remote device reached over the system ``ssh``: where, which python, where to cache files."""

    name: str
    url: str
    python: str = DEFAULT_PYTHON
    workdir: str = DEFAULT_WORKDIR
    # Extra ``-o Key=Value`` options for ssh (IdentityFile, UserKnownHostsFile, ProxyJump, ...).
    ssh_options: list[str] = field(default_factory=list)
    # An ssh client config file used instead of ~/.ssh/config (``ssh -F``); None: ssh's usual files.
    ssh_config: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise DeviceConfigError(f"device name {self.name!r}: use letters, digits, '.', '_' and '-'")
        match = _URL.match(self.url)
        if match is None:
            raise DeviceConfigError(f"device {self.name}: {self.url!r} is not ssh://[user@]host[:port]")
        self.user: str | None = match["user"]
        self.host: str = match["host"].strip("[]")
        if self.host.startswith("-"):
            # ssh would read it as an option (e.g. -oProxyCommand=...), never as a host
            raise DeviceConfigError(f"device {self.name}: host {self.host!r} starts with '-'; that is not a host name")
        self.port: int | None = int(match["port"]) if match["port"] else None
        for option in self.ssh_options:
            if "=" not in option:
                raise DeviceConfigError(f"device {self.name}: ssh option {option!r} is not Key=Value")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("name")
        return data


def config_dir() -> Path:
    """Where t2tedge keeps user settings."""
    if os.environ.get("T2TEDGE_CONFIG_DIR"):
        return Path(os.environ["T2TEDGE_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "t2tedge"


def registry_path() -> Path:
    return config_dir() / "devices.yaml"


def load_devices() -> dict[str, Device]:
    """Every registered device by name (none when the file does not exist yet)."""
    path = registry_path()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DeviceConfigError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    entries = data.get("devices") or {}
    if not isinstance(entries, dict):
        raise DeviceConfigError(f"{path}: 'devices' must be a mapping of name -> settings")
    devices = {}
    for name, entry in entries.items():
        try:
            devices[str(name)] = Device(name=str(name), **(entry or {}))
        except TypeError as exc:
            raise DeviceConfigError(f"{path}: device {name}: {exc}") from None
    return devices


def get_device(name: str) -> Device:
    """A registered device by name; unknown names list the known ones."""
    devices = load_devices()
    if name not in devices:
        known = ", ".join(sorted(devices)) or "none yet (t2tedge device add NAME ssh://user@host)"
        raise DeviceConfigError(f"unknown device {name!r}; registered devices: {known}")
    return devices[name]


def save_devices(devices: dict[str, Device]) -> Path:
    """Write the registry atomically (temp file + rename)."""
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"devices": {name: device.to_dict() for name, device in sorted(devices.items())}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def add_device(device: Device, replace: bool = False) -> Path:
    devices = load_devices()
    if device.name in devices and not replace:
        raise DeviceConfigError(f"device {device.name!r} exists; pass --replace to overwrite it")
    devices[device.name] = device
    return save_devices(devices)


def remove_device(name: str) -> Path:
    devices = load_devices()
    get_device(name)
    del devices[name]
    return save_devices(devices)
