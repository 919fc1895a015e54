"""The console frontend (ConsoleFront, open_console) end to end, and against a
hostile backend.

- Round trips through the backend's pty; the keys the frontend publishes; the
  stream closes (blocked callers get ClosedResourceError, no hang) when the
  device is closed or the daemon shuts down; a console that is not offered
  fails at once.
- Hostile backend (hardening.md #7, #11): the backend's end of the xencons page
  of an in-process daemon is scribbled on directly (``in_prod`` far ahead,
  ``out_cons`` beyond ``out_prod``), or the console service is replaced by one
  that publishes a bogus ``in_prod``, or by one that notifies in a tight loop
  without data. The guest's stream raises trio.BrokenResourceError (cause: the
  RingBrokenError) and stays broken; the notify flood is throttled and costs
  the guest bounded wake-ups.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from pvio.backends.consoleback import ConsoleBackend
from pvio.console import ConsoleStream
from pvio.frontends.console import ConsoleFront, open_console
from pvio.frontends.session import open_session
from pvio.layouts import XenbusState as S
from pvio.ring import RingBrokenError
from pvio.xenbus.device import DeviceError, backend_path, frontend_path
from tests.console_helpers import (
    IN_CONS,
    IN_PROD,
    IN_SIZE,
    OUT_CONS,
    OUT_PROD,
    console_driver,
    consoles,
    get_u32,
    open_tty,
    read_exactly,
    set_u32,
    write_all,
)
from tests.pvio_daemon import running_daemon, wait_state, watchdog

CONFIG = consoles("g", "other")


@pytest.fixture
async def daemon():
    async with watchdog(30, "console frontend test"), running_daemon(CONFIG) as daemon:
        yield daemon


async def test_round_trip_through_the_backend_pty(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        assert isinstance(front, ConsoleFront) and isinstance(front.stream, ConsoleStream)
        fd = open_tty(console_driver(daemon, "g").tty)
        try:
            for size in (1, 100, IN_SIZE, 3 * IN_SIZE + 7, 100_000):
                data = os.urandom(size)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(front.stream.send_all, data)
                    assert await read_exactly(fd, size) == data
                got = bytearray()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write_all, fd, data)
                    while len(got) < size:
                        got += await front.stream.receive_some()
                assert got == data
        finally:
            os.close(fd)


async def test_frontend_publishes_ring_ref_and_port(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        fe = frontend_path("console", s.domid, 0)
        ref = await s.xs.read(f"{fe}/ring-ref")
        port = await s.xs.read(f"{fe}/port")
        assert int(ref) == front.queues[0].areas[0][2][0]
        assert int(port) == front.channel.port
        assert await s.xs.read(f"{fe}/state") == str(int(S.Connected)).encode()


async def test_closing_the_device_wakes_a_blocked_reader(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        stream = front.stream
        async with trio.open_nursery() as nursery:

            async def reader():
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                await front.device.close()
        assert front.stream is None
        be = backend_path("console", s.domid, 0)
        await wait_state(s.xs, f"{be}/state", S.Closed)


async def test_daemon_shutdown_closes_the_guest_stream(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        stream = front.stream
        async with trio.open_nursery() as nursery:

            async def reader():
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                await daemon.shutdown()
        with trio.fail_after(5):
            await front.device.closed.wait()


async def test_a_console_that_is_not_offered_fails_at_once(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        t0 = time.monotonic()
        with pytest.raises(DeviceError):
            await open_console(s, devid=7, timeout=5)
        assert time.monotonic() - t0 < 1


# ---------------------------------------------------------------- hostile backend


def backend_page(daemon, name: str = "g"):
    """The backend's mapping of the guest's xencons page (what a hostile backend writes)."""
    return console_driver(daemon, name).conn.mappings[0].buf


async def test_in_prod_far_ahead_breaks_the_guest_stream(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        page = backend_page(daemon)
        set_u32(page, IN_PROD, get_u32(page, IN_PROD) + IN_SIZE + 1)
        console_driver(daemon, "g").conn.channel.notify()
        for _ in range(2):  # and it stays broken
            with pytest.raises(trio.BrokenResourceError) as caught, trio.fail_after(5):
                await front.stream.receive_some()
            assert isinstance(caught.value.__cause__, RingBrokenError)


async def test_out_cons_beyond_out_prod_breaks_the_guest_stream(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        await front.stream.send_all(b"abc")
        page = backend_page(daemon)
        set_u32(page, OUT_CONS, get_u32(page, OUT_PROD) + 1)  # consumed the future
        with pytest.raises(trio.BrokenResourceError) as caught, trio.fail_after(5):
            await front.stream.send_all(b"more")
        assert isinstance(caught.value.__cause__, RingBrokenError)
    # another domain's console is unaffected
    async with open_session(daemon.config.socket, "other") as s:
        front = await open_console(s)
        fd = open_tty(console_driver(daemon, "other").tty)
        try:
            await front.stream.send_all(b"fine")
            assert await read_exactly(fd, 4) == b"fine"
        finally:
            os.close(fd)


def hostile_service(behaviour):
    """A replacement for ConsoleBackend._serve: ``behaviour(backend)`` runs with
    the page mapped and the channel bound, until the device stops."""

    async def _serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            with trio.CancelScope() as self._scope:
                task_status.started()
                await behaviour(self)
                await trio.sleep_forever()
        finally:
            self._stopped.set()

    return _serve


async def test_hostile_backend_publishing_a_bogus_in_prod(monkeypatch):
    async def behaviour(be):
        page = be.conn.mappings[0].buf
        page[0:5] = b"hello"
        set_u32(page, IN_PROD, 5)
        be.conn.channel.notify()
        with trio.move_on_after(10):  # until the frontend took it (it attaches after us)
            while get_u32(page, IN_CONS) != 5:
                await trio.sleep(0.01)
        set_u32(page, IN_PROD, 0x80000000)
        be.conn.channel.notify()

    monkeypatch.setattr(ConsoleBackend, "_serve", hostile_service(behaviour))
    async with running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        with trio.fail_after(5):
            assert await front.stream.receive_some() == b"hello"
            with pytest.raises(trio.BrokenResourceError):
                await front.stream.receive_some()


def _flood(fd: int, stop: threading.Event) -> int:
    n = 0
    while not stop.is_set():
        for _ in range(100):
            os.eventfd_write(fd, 1)
        n += 100
    return n


async def test_hostile_backend_notify_flood_is_throttled(monkeypatch):
    seconds = 1.0
    stop = threading.Event()
    sent = []

    async def behaviour(be):
        sent.append(await trio.to_thread.run_sync(_flood, be.conn.channel.remote_fd, stop))

    monkeypatch.setattr(ConsoleBackend, "_serve", hostile_service(behaviour))
    async with running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as s:
        front = await open_console(s)
        stream = front.stream
        before = stream.channel.received
        await trio.sleep(seconds)
        stop.set()
        wakeups = stream.channel.received - before
        with trio.fail_after(5):
            while not sent:
                await trio.sleep(0.01)
        assert sent[0] > 10_000
        assert stream.throttled >= 3
        assert wakeups <= 2 * 31 * (seconds / 0.2 + 2), wakeups
