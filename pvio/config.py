"""``pvio serve`` configuration: a TOML file, or the embedded default.

Example (every key optional; this is the embedded default)::

    # socket = "/run/pvio/xenbus.sock"   # guest socket; admin socket: <socket>.admin
    # data_dir = "/var/lib/pvio"
    # admin_uids = [0]                    # default: root and the daemon's own uid
    # guest_uids = [1000]                 # default: whoever can open the socket (0600)
    # stall_backoff = 1                   # s a device refuses connects after its frontend
    #                                     # blocked a notification; doubles per repeat, to 60

    # [switch]                            # every vif is a port of the daemon's L2 switch
    # tap = "pvio0"                       # also bridge it to this host TAP device
    # queue_frames = 1024                 # per port queue; a slow reader loses the excess
    # aging = 300                         # seconds a learned MAC stays

    [[domain]]
    name = "guest"                        # a frontend claims it by name
    # uids = [1000]                       # who may claim it (default: any guest)

      [[domain.device]]
      type = "vbd"                        # a disk: a sparse raw image in data_dir
      devid = 51712                       # xvda
      image = "guest-xvda.img"
      size = "64M"
      mode = "w"                          # "r" for read-only
      # sector_size = 4096                # needs a frontend with feature-large-sector-size
      # busy_poll_us = 200                # spin this long for requests before sleeping (0: off)

      [[domain.device]]
      type = "console"                    # a pty; log in data_dir/console/<domain>-<devid>.log
      devid = 0
      # limit = 1048576                   # bytes kept (head + tail) while nobody reads the pty

      [[domain.device]]
      type = "vif"                        # a port on the daemon's switch
      devid = 0
      mac = "00:16:3e:00:00:01"
      # spoof_check = true                # drop frames whose source MAC is not mac
"""

from __future__ import annotations

import os
import pathlib
import re
import tomllib
from dataclasses import dataclass, field

DEFAULT_TOML = __doc__.split("Example (every key optional; this is the embedded default)::")[1]
DEFAULT_TOML = "\n".join(line[4:] for line in DEFAULT_TOML.splitlines())

DEVICE_TYPES = ("vbd", "console", "vif")
_SIZE = re.compile(r"^(\d+)([KMGT]?)$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


@dataclass(frozen=True)
class DeviceConfig:
    type: str
    devid: int
    options: dict


@dataclass(frozen=True)
class DomainConfig:
    name: str
    uids: frozenset[int] | None
    devices: tuple[DeviceConfig, ...]


@dataclass(frozen=True)
class SwitchConfig:
    tap: str | None = None
    queue_frames: int = 1024
    aging: float = 300.0


@dataclass
class Config:
    socket: str
    data_dir: str
    admin_uids: set[int] | None = None
    guest_uids: set[int] | None = None
    domains: dict[str, DomainConfig] = field(default_factory=dict)
    source: str = "embedded default"
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    stall_backoff: float = 1.0

    @property
    def admin_socket(self) -> str:
        return admin_socket_for(self.socket)


def admin_socket_for(guest_socket: str) -> str:
    return guest_socket + ".admin"


def default_socket() -> str:
    if os.geteuid() == 0:
        return "/run/pvio/xenbus.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/pvio-{os.getuid()}"
    return str(pathlib.Path(runtime) / "pvio" / "xenbus.sock")


def default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/pvio"
    base = os.environ.get("XDG_DATA_HOME") or str(pathlib.Path.home() / ".local" / "share")
    return str(pathlib.Path(base) / "pvio")


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text).strip().upper())
    if not m:
        raise ConfigError(f"bad size {text!r} (use e.g. 512, 64M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " "))


def _uids(value, where: str) -> set[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(u, int) and u >= 0 for u in value):
        raise ConfigError(f"{where}: must be a list of uids")
    return set(value)


_DEVICE_KEYS = {
    "vbd": {"image", "size", "mode", "sector_size", "busy_poll_us"},
    "vif": {"mac", "spoof_check"},
    "console": {"log", "limit"},
}
_DOMAIN_KEYS = {"name", "uids", "device"}


def _no_unknown(raw: dict, allowed: set[str], where: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _device(raw: dict, where: str) -> DeviceConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    if raw.get("type") in _DEVICE_KEYS:
        _no_unknown(raw, {"type", "devid"} | _DEVICE_KEYS[raw["type"]], where)
    opts = dict(raw)
    dtype = opts.pop("type", None)
    if dtype not in DEVICE_TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(DEVICE_TYPES)}")
    devid = opts.pop("devid", 0)
    if not isinstance(devid, int) or not 0 <= devid < 1 << 31:
        raise ConfigError(f"{where}: devid must be a non-negative integer")
    if dtype == "vbd":
        opts.setdefault("image", f"vbd-{devid}.img")
        try:
            opts["size"] = parse_size(opts.get("size", "64M"))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if opts["size"] <= 0 or opts["size"] % 512:
            raise ConfigError(f"{where}: size must be a positive multiple of 512")
        if opts.setdefault("mode", "w") not in ("r", "w"):
            raise ConfigError(f"{where}: mode must be 'r' or 'w'")
        if opts.setdefault("sector_size", 512) not in (512, 1024, 2048, 4096):
            raise ConfigError(f"{where}: sector_size must be 512, 1024, 2048 or 4096")
        if opts["size"] % opts["sector_size"]:
            raise ConfigError(f"{where}: size must be a multiple of sector_size")
        poll = opts.setdefault("busy_poll_us", 200)
        if not isinstance(poll, (int, float)) or isinstance(poll, bool) or not 0 <= poll <= 10000:
            raise ConfigError(f"{where}: busy_poll_us must be a number of microseconds "
                              "in 0..10000 (0 turns busy-polling off)")
    if dtype == "console":
        limit = opts.setdefault("limit", 1 << 20)
        if not isinstance(limit, int) or limit < 64:
            raise ConfigError(f"{where}: limit must be an integer >= 64 (bytes)")
    if dtype == "vif":
        mac = str(opts.setdefault("mac", f"00:16:3e:00:00:{devid % 256:02x}")).lower()
        if not _MAC.match(mac):
            raise ConfigError(f"{where}: bad mac {mac!r}")
        opts["mac"] = mac
        if not isinstance(opts.setdefault("spoof_check", True), bool):
            raise ConfigError(f"{where}: spoof_check must be true or false (false lets the "
                              "guest send with any source MAC, e.g. when it bridges)")
    return DeviceConfig(dtype, devid, opts)


def _seconds(value, where: str, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not low <= value <= high:
        raise ConfigError(f"{where}: must be a number of seconds in {low:g}..{high:g}")
    return float(value)


def _switch(raw, where: str) -> SwitchConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _no_unknown(raw, {"tap", "queue_frames", "aging"}, where)
    tap = raw.get("tap")
    if tap is not None and not (isinstance(tap, str) and re.match(r"^[A-Za-z0-9_.-]{1,15}$", tap)):
        raise ConfigError(f"{where}: tap must be an interface name of 1-15 characters")
    frames = raw.get("queue_frames", 1024)
    if not isinstance(frames, int) or not 1 <= frames <= 1 << 20:
        raise ConfigError(f"{where}: queue_frames must be an integer in 1..1048576")
    aging = raw.get("aging", 300)
    if not isinstance(aging, (int, float)) or aging <= 0:
        raise ConfigError(f"{where}: aging must be a positive number of seconds")
    return SwitchConfig(tap, frames, float(aging))


def parse(text: str, *, source: str = "config", socket: str | None = None,
          data_dir: str | None = None) -> Config:
    """Parse and validate a TOML configuration; command-line paths override it."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    known = {"socket", "data_dir", "admin_uids", "guest_uids", "domain", "switch",
             "stall_backoff"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    cfg = Config(
        socket=socket or raw.get("socket") or default_socket(),
        data_dir=data_dir or raw.get("data_dir") or default_data_dir(),
        admin_uids=_uids(raw.get("admin_uids"), f"{source}: admin_uids"),
        guest_uids=_uids(raw.get("guest_uids"), f"{source}: guest_uids"),
        source=source,
        switch=_switch(raw.get("switch", {}), f"{source}: switch"),
        stall_backoff=_seconds(raw.get("stall_backoff", 1.0),
                                   f"{source}: stall_backoff", 0, 60),
    )
    for i, dom in enumerate(raw.get("domain", [])):
        where = f"{source}: domain[{i}]"
        if not isinstance(dom, dict):
            raise ConfigError(f"{where}: must be a table")
        _no_unknown(dom, _DOMAIN_KEYS, where)
        name = dom.get("name")
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]{1,64}$", name):
            raise ConfigError(f"{where}: name must be 1-64 characters of [A-Za-z0-9_-]")
        if name in cfg.domains:
            raise ConfigError(f"{where}: duplicate domain name {name!r}")
        devices = tuple(_device(d, f"{where}.device[{j}]")
                        for j, d in enumerate(dom.get("device", [])))
        seen = set()
        for dev in devices:
            if (dev.type, dev.devid) in seen:
                raise ConfigError(f"{where}: duplicate device {dev.type} {dev.devid}")
            seen.add((dev.type, dev.devid))
        uids = _uids(dom.get("uids"), f"{where}.uids")
        cfg.domains[name] = DomainConfig(name, frozenset(uids) if uids is not None else None,
                                         devices)
    return cfg


def load(path: str | None, *, socket: str | None = None, data_dir: str | None = None) -> Config:
    if path is None:
        return parse(DEFAULT_TOML, source="embedded default", socket=socket, data_dir=data_dir)
    try:
        text = pathlib.Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse(text, source=path, socket=socket, data_dir=data_dir)
