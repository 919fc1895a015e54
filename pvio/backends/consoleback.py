"""The console backend (io/console.h): a pty per console, a log, bounded capture.

What xenconsoled gives an operator, and what it lacks:

* a pty per console, its path published in the store as ``tty`` (attach with
  ``pvio console``, ``screen``, ``minicom`` or pexpect);
* a log file with a timestamp on every line, holding the output from the very
  first byte whether or not anybody is attached; reopened on SIGHUP (logrotate);
* output that nobody reads is kept in a bounded buffer (``limit`` bytes, also
  published) that keeps the head and the tail and says how much it dropped;
* a flooding frontend is rate limited (30 events per 200 ms, as xenconsoled)
  without starving other consoles: each console has its own tasks;
* a frontend that publishes impossible indices gets its console disconnected.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import termios
import tty

import trio

from pvio._log import RateLimitedLogger
from pvio.console import ConsoleStream, HeadTailBuffer
from pvio.ring import console_rings
from pvio.xenbus.device import DeviceError
from pvio.xenbus.ringdev import CONSOLE, BackendConnection, RingBackendDriver

log = logging.getLogger("pvio.consoleback")
peer_log = RateLimitedLogger(log)

DEFAULT_LIMIT = 1 << 20


class ConsoleLog:
    """A console log file: every line starts with a UTC timestamp."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = None
        self._at_line_start = True
        self.reopen()

    def reopen(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives with the console

    def write(self, data: bytes) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("[%Y-%m-%dT%H:%M:%S.%fZ] ").encode()
        out = bytearray()
        for line in data.splitlines(keepends=True):
            if self._at_line_start:
                out += stamp
            out += line
            self._at_line_start = line.endswith(b"\n")
        self._file.write(bytes(out))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ConsoleBackend(RingBackendDriver):
    layout = CONSOLE

    def __init__(self, domain, *, log_path: str | None = None,
                 limit: int = DEFAULT_LIMIT) -> None:
        super().__init__(domain)
        self.log_path = log_path
        self.limit = limit
        self.log: ConsoleLog | None = None
        self.buffer = HeadTailBuffer(limit)
        self.stream: ConsoleStream | None = None
        self.tty = ""
        self._master = -1
        self._slave = -1
        self._scope: trio.CancelScope | None = None
        self._buffered = trio.Event()
        self._stopped = trio.Event()
        self._stopped.set()

    def toolstack_keys(self) -> dict[str, str]:
        return {"type": "xenconsoled", "protocol": "vt100", "limit": str(self.limit)}

    async def start(self, conn: BackendConnection, frontend: dict) -> dict[str, str]:
        if self.nursery is None:
            raise DeviceError("the console backend needs a nursery")
        tx, rx = console_rings(conn.mappings[0].buf, frontend=False)
        self.stream = ConsoleStream(tx, rx, conn.channel)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave, termios.TCSANOW)  # the guest's bytes pass unchanged
        os.set_blocking(self._master, False)
        self.tty = os.ttyname(self._slave)
        if self.log is None and self.log_path is not None:
            self.log = ConsoleLog(self.log_path)
        self._stopped = trio.Event()
        await self.nursery.start(self._serve)
        return {"tty": self.tty}

    def reopen_log(self) -> None:
        """SIGHUP: reopen the log file (after logrotate moved it)."""
        if self.log is not None:
            self.log.reopen()

    async def _serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.stream.pump)
                    nursery.start_soon(self._guest_to_pty)
                    nursery.start_soon(self._drain_to_pty)
                    nursery.start_soon(self._pty_to_guest)
                    task_status.started()
        except* (trio.BrokenResourceError, OSError) as group:
            reason = "; ".join(str(exc) for exc in group.exceptions)
            peer_log.warning(f"console:{self.domain.domid}", "console of dom%d: %s; "
                             "disconnecting it", self.domain.domid, reason)
            self.peer_failed(*group.exceptions)
        finally:
            self._stopped.set()

    async def _guest_to_pty(self) -> None:
        """Everything the guest writes goes into the log at once and into the
        bounded buffer; the drain task moves it to the pty as fast as a reader
        takes it. The guest is never slowed down by an absent reader."""
        while True:
            data = await self.stream.receive_some()
            if self.log is not None:
                self.log.write(data)
            self.buffer.append(data)
            self._buffered.set()

    async def _drain_to_pty(self) -> None:
        pending = b""  # taken from the buffer, not yet accepted by the pty
        while True:
            if not pending:
                if not len(self.buffer):
                    self._buffered = trio.Event()
                    await self._buffered.wait()
                pending = self.buffer.take()
            await trio.lowlevel.wait_writable(self._master)
            try:
                pending = pending[os.write(self._master, pending):]
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                await trio.sleep(0.05)  # no reader on the other side yet

    async def _pty_to_guest(self) -> None:
        """What the operator types on the pty goes to the guest's input ring."""
        while True:
            await trio.lowlevel.wait_readable(self._master)
            try:
                data = os.read(self._master, 1024)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    await trio.sleep(0.05)
                    continue
                raise
            if data:
                await self.stream.send_all(data)

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()
            self._scope = None
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None
        if self.log is not None:  # reopened (appending) if the frontend reconnects
            self.log.close()
            self.log = None

    def statistics(self) -> dict[str, int]:
        stream = self.stream
        return {
            "bytes_from_guest": stream.bytes_in if stream else 0,
            "bytes_to_guest": stream.bytes_out if stream else 0,
            "buffered": len(self.buffer),
            "dropped": self.buffer.total_dropped,
            "throttled": stream.throttled if stream else 0,
        }
