"""Shared helpers of the console tests (pvio.console, consoleback, the console frontend).

- The ``xencons_interface`` offsets straight from
  ``/work/shared/reference/xen-protocol.md`` §4 (deliberately *not* from
  :mod:`pvio.layouts`, so a layout mistake there shows), and u32 accessors.
- :func:`stream_pair`: two :class:`~pvio.console.ConsoleStream` ends (guest and
  backend) over one page and a pair of event channels, with their pumps running.
- TOML for in-process daemons with console devices; the daemon's console driver
  and tty of a domain.
- Non-blocking tty helpers for trio tests: open, write everything, read an exact
  amount, read until the line goes quiet.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import time

import trio

from pvio.console import ConsoleStream
from pvio.ring import EventChannelTable, console_rings

# --- io/console.h (xen-protocol.md §4) ---------------------------------------------------
IN_OFF, IN_SIZE = 0, 1024  # backend -> guest
OUT_OFF, OUT_SIZE = 1024, 2048  # guest -> backend
IN_CONS, IN_PROD, OUT_CONS, OUT_PROD = 3072, 3076, 3080, 3084
XENCONS_SIZE = 3088
U32 = struct.Struct("<I")


def get_u32(page, offset: int) -> int:
    return U32.unpack_from(page, offset)[0]


def set_u32(page, offset: int, value: int) -> None:
    U32.pack_into(page, offset, value & 0xFFFFFFFF)


# --- a stream pair over one page ---------------------------------------------------------


def make_pair(page=None, *, start: int | None = None, **kwargs):
    """(guest end, backend end, page, channels) over one xencons page; no pumps.

    ``start`` presets all four indices (e.g. near 2**32 to test the wrap).
    The backend's eventfds are dups, as if they had crossed a Unix socket.
    """
    page = bytearray(4096) if page is None else page
    if start is not None:
        for off in (IN_CONS, IN_PROD, OUT_CONS, OUT_PROD):
            set_u32(page, off, start)
    gtx, grx = console_rings(page, frontend=True)
    btx, brx = console_rings(page, frontend=False)
    guest_table, back_table = EventChannelTable(1), EventChannelTable(0)
    unbound = guest_table.alloc_unbound(0)
    fds = tuple(os.dup(fd) for fd in unbound.peer_fds())
    back_channel = back_table.bind_interdomain(1, unbound.port, fds)
    guest = ConsoleStream(gtx, grx, unbound.channel, **kwargs)
    back = ConsoleStream(btx, brx, back_channel, **kwargs)
    return guest, back, page, (guest_table, back_table)


@contextlib.asynccontextmanager
async def stream_pair(page=None, *, start: int | None = None, **kwargs):
    """:func:`make_pair` with both pumps running; yields (guest, backend, page)."""
    guest, back, page, tables = make_pair(page, start=start, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(guest.pump)
            await nursery.start(back.pump)
            yield guest, back, page
            nursery.cancel_scope.cancel()
    finally:
        for table in tables:
            table.close_all()


async def echo_forever(stream) -> None:
    """A guest that echoes whatever arrives on its console."""
    while True:
        data = await stream.receive_some()
        await stream.send_all(data)


# --- daemon configurations ----------------------------------------------------------------


def console(devid: int = 0, *, limit: int | None = None, log: str | None = None) -> str:
    out = f'  [[domain.device]]\n  type = "console"\n  devid = {devid}\n'
    if limit is not None:
        out += f"  limit = {limit}\n"
    if log is not None:
        out += f'  log = "{log}"\n'
    return out


def domain(name: str, *devices: str) -> str:
    return f'[[domain]]\nname = "{name}"\n' + "".join(devices)


def consoles(*names: str, limit: int | None = None) -> str:
    """One domain per name, each with console 0."""
    return "\n".join(domain(name, console(limit=limit)) for name in names)


def console_device(daemon, name: str, devid: int = 0):
    """The daemon's BackendDevice of ``name``'s console ``devid``."""
    for device in daemon._claimed[name].devices:
        if device.driver.type == "console" and device.devid == devid:
            return device
    raise KeyError((name, devid))


def console_driver(daemon, name: str, devid: int = 0):
    return console_device(daemon, name, devid).driver


def log_path(daemon, name: str, devid: int = 0) -> str:
    return os.path.join(daemon.config.data_dir, "console", f"{name}-{devid}.log")


# --- ttys -------------------------------------------------------------------------------


def open_tty(path: str) -> int:
    """The backend's pty, as an operator opens it (never our controlling tty)."""
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


async def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


async def read_some(fd: int, max_bytes: int = 65536) -> bytes:
    while True:
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def read_exactly(fd: int, n: int, timeout: float = 10.0) -> bytes:
    out = bytearray()
    with trio.fail_after(timeout):
        while len(out) < n:
            out += await read_some(fd, n - len(out))
    return bytes(out)


async def read_until_quiet(fd: int, quiet: float = 0.5, timeout: float = 10.0) -> bytes:
    """Everything the tty delivers until nothing came for ``quiet`` seconds."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with trio.move_on_after(quiet) as waited:
            try:
                out += await read_some(fd)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                break
        if waited.cancelled_caught:
            break
    return bytes(out)


def numbered_lines(total: int) -> bytes:
    """``total`` bytes of ``%07d\\n`` lines: any fragment shows where it came from."""
    lines = b"".join(b"%07d\n" % i for i in range(total // 8 + 1))
    return lines[:total]


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]
