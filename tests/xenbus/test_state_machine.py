"""The XenbusState machine: the tables row by row, then odd and hostile sequences
end to end (hardening.md #8, #14; specs/xenbus.md §5).

The end-to-end tests run an in-process daemon and play the frontend either
with a real session (``session.attach``) or by hand: publishing the transport
with the session's driver and writing the frontend's ``state`` node directly,
in whatever order a broken or hostile frontend would. What the backend does is
read from its ``state`` node, as any peer sees it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from pvio.frontends.session import open_session
from pvio.layouts import XenbusState as S
from pvio.xenbus.client import open_client
from pvio.xenbus.device import backend_path, frontend_path
from pvio.xenbus.state import (
    ANY,
    BACKEND_TABLE,
    FRONTEND_TABLE,
    Action,
    Row,
    parse_state,
    step,
)
from pvio.xenbus.store import XenstoreError
from tests.pvio_daemon import running_daemon, wait_state, watchdog

TEST_TIMEOUT = 60
VBD = 51712

# ------------------------------------------------------------------ tables


def _cases(table: tuple[Row, ...]):
    for i, row in enumerate(table):
        for ours in sorted(row.ours, key=int):
            yield pytest.param(row, ours, id=f"row{i}-peer={row.peer.name}-ours={ours.name}")


@pytest.mark.parametrize(("row", "ours"), _cases(BACKEND_TABLE))
def test_backend_table_row(row: Row, ours: S):
    goto = row.goto if row.goto is not None else ours
    assert step(BACKEND_TABLE, ours, row.peer) == (row.action, goto)


@pytest.mark.parametrize(("row", "ours"), _cases(FRONTEND_TABLE))
def test_frontend_table_row(row: Row, ours: S):
    goto = row.goto if row.goto is not None else ours
    assert step(FRONTEND_TABLE, ours, row.peer) == (row.action, goto)


@pytest.mark.parametrize("table", [BACKEND_TABLE, FRONTEND_TABLE], ids=["backend", "frontend"])
def test_no_row_is_shadowed_and_unmatched_pairs_do_nothing(table):
    covered = {}
    for row in table:
        for ours in row.ours:
            assert (row.peer, ours) not in covered, f"{row} overlaps {covered[row.peer, ours]}"
            covered[row.peer, ours] = row
    for peer in S:
        for ours in S:
            if (peer, ours) not in covered:
                assert step(table, ours, peer) == (Action.NONE, ours), (peer, ours)


def test_backend_table_follows_hardening_14():
    b = BACKEND_TABLE
    # Normal life.
    assert step(b, S.InitWait, S.Initialising) == (Action.NONE, S.InitWait)
    assert step(b, S.InitWait, S.Initialised) == (Action.CONNECT, S.Connected)
    # A frontend that skips Initialised.
    assert step(b, S.InitWait, S.Connected) == (Action.CONNECT, S.Connected)
    # Duplicates: nothing to do.
    assert step(b, S.Connected, S.Initialised) == (Action.NONE, S.Connected)
    assert step(b, S.Connected, S.Connected) == (Action.NONE, S.Connected)
    assert step(b, S.Closing, S.Closing) == (Action.NONE, S.Closing)
    assert step(b, S.Closed, S.Closed) == (Action.NONE, S.Closed)
    # Straight to Closed, from anywhere; a vanished frontend counts as Closed.
    for ours in ANY - {S.Closed}:
        assert step(b, ours, S.Closed) == (Action.DISCONNECT, S.Closed)
        assert step(b, ours, S.Unknown) == (Action.DISCONNECT, S.Closed)
    # Re-initialisation after a close: back to InitWait.
    assert step(b, S.Closed, S.Initialising) == (Action.REINIT, S.InitWait)
    assert step(b, S.Closing, S.Initialising) == (Action.REINIT, S.InitWait)
    assert step(b, S.Connected, S.Initialising) == (Action.DISCONNECT, S.InitWait)


def test_frontend_table_follows_hardening_14():
    f = FRONTEND_TABLE
    assert step(f, S.Initialising, S.InitWait) == (Action.PUBLISH, S.Initialised)
    assert step(f, S.Initialised, S.Connected) == (Action.ATTACH, S.Connected)
    # A backend that skips InitWait.
    assert step(f, S.Initialising, S.Connected) == (Action.PUBLISH_ATTACH, S.Connected)
    # A backend that restarted.
    assert step(f, S.Connected, S.InitWait) == (Action.DISCONNECT, S.Initialising)
    # Duplicates.
    assert step(f, S.Initialised, S.InitWait) == (Action.NONE, S.Initialised)
    assert step(f, S.Connected, S.Connected) == (Action.NONE, S.Connected)
    for ours in ANY - {S.Closed}:
        for peer in (S.Closing, S.Closed, S.Unknown):
            assert step(f, ours, peer) == (Action.DISCONNECT, S.Closed)


@pytest.mark.parametrize(("raw", "state"), [
    (None, S.Unknown), (b"", S.Unknown), (b"4", S.Connected), (b"4\0", S.Connected),
    (b"6", S.Closed), (b"0", S.Unknown), (b"8", S.Reconfigured), (b"9", S.Unknown),
    (b"-1", S.Unknown), (b"garbage", S.Unknown), (b"\xff\xfe", S.Unknown),
    (b"4x", S.Unknown), (b"99999999999999999999", S.Unknown),
])
def test_parse_state(raw, state):
    assert parse_state(raw) == state


# -------------------------------------------------------------- end to end

CONFIG = """
[[domain]]
name = "guest"
  [[domain.device]]
  type = "vbd"
  devid = 51712
  image = "guest.img"
  size = "1M"
  [[domain.device]]
  type = "console"
  devid = 0

[[domain]]
name = "other"
  [[domain.device]]
  type = "vbd"
  devid = 51712
  image = "other.img"
  size = "1M"
  [[domain.device]]
  type = "vif"
  devid = 0
"""


@pytest.fixture
async def daemon():
    async with watchdog(TEST_TIMEOUT), running_daemon(CONFIG) as daemon:
        yield daemon


@pytest.fixture
def no_daemon_errors(caplog):
    """No ERROR (tracebacks of crashed handlers) from pvio's loggers."""
    caplog.set_level(logging.INFO, logger="pvio")
    yield caplog
    errors = [r for r in caplog.records
              if r.name.startswith("pvio") and r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def backend_status(daemon, name: str, type_: str):
    """The daemon's own view of a backend device (its DeviceStatus): the daemon
    publishes no error node, so a refused connect's reason is read here."""
    for device in daemon._claimed[name].devices:
        if device.driver.type == type_:
            return device.status
    raise AssertionError(f"no {type_} device for {name}")


class Frontend:
    """A hand-driven frontend for one device of a session."""

    def __init__(self, session, type_: str = "vbd", devid: int = VBD) -> None:
        self.session = session
        self.xs = session.xs
        self.type = type_
        self.devid = devid
        self.fe = frontend_path(type_, session.domid, devid)
        self.be = backend_path(type_, session.domid, devid)
        self.driver = None

    async def state(self, state: S | str) -> None:
        await self.xs.write(f"{self.fe}/state", str(int(state)) if isinstance(state, S)
                            else state)

    async def backend(self) -> S:
        return parse_state(await self.xs.read_or_none(f"{self.be}/state"))

    async def wait(self, state: S, timeout: float = 5.0) -> S:
        return await wait_state(self.xs, f"{self.be}/state", state, timeout)

    async def publish(self) -> None:
        """Allocate, grant and publish the transport with pvio's own driver."""
        offered = next(d for d in await self.session.devices()
                       if (d.type, d.devid) == (self.type, self.devid))
        self.driver = self.session.driver_for(offered)
        await self.driver.publish(self.xs, self.fe)

    async def connect(self) -> None:
        await self.wait(S.InitWait)
        await self.publish()
        await self.state(S.Initialised)
        await self.wait(S.Connected)


def drain(chan) -> list:
    got = []
    while True:
        try:
            got.append(chan.receive_nowait())
        except trio.WouldBlock:
            return got


async def connect_all(session) -> list:
    devices = [await session.attach(session.driver_for(d), d.devid)
               for d in await session.devices()]
    with trio.fail_after(10):
        for device in devices:
            await device.connected.wait()
    return devices


async def test_normal_handshake_end_to_end(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        devices = await connect_all(session)
        for device in devices:
            be = backend_path(device.driver.type, session.domid, device.devid)
            assert parse_state(await session.xs.read(f"{be}/state")) == S.Connected
            assert [h[1] for h in device.status.history][-2:] == ["Initialised", "Connected"]
        for device in devices:
            await device.close()
            assert device.status.state == S.Closed
            be = backend_path(device.driver.type, session.domid, device.devid)
            assert parse_state(await session.xs.read(f"{be}/state")) == S.Closed


async def test_frontend_goes_straight_to_closed_from_initialising(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        fe = Frontend(session)
        await fe.wait(S.InitWait)
        await fe.state(S.Initialising)
        await fe.state(S.Closed)
        assert await fe.wait(S.Closed) == S.Closed
        # It may come back: Initialising sends the backend to InitWait.
        await fe.state(S.Initialising)
        assert await fe.wait(S.InitWait) == S.InitWait
        await fe.publish()
        await fe.state(S.Initialised)
        assert await fe.wait(S.Connected) == S.Connected


async def test_frontend_skips_initialised(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        fe = Frontend(session)
        await fe.wait(S.InitWait)
        await fe.publish()
        await fe.state(S.Connected)  # Initialising -> Connected, no Initialised
        assert await fe.wait(S.Connected) == S.Connected
        # The backend really connected: it published the disk's info.
        assert int(await session.xs.read(f"{fe.be}/sectors")) == (1 << 20) // 512
        assert backend_status(daemon, "guest", "vbd").last_error == ""


async def test_duplicate_state_writes_change_nothing(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        fe = Frontend(session)
        await fe.wait(S.InitWait)
        async with session.xs.watch(f"{fe.be}/state") as changes:
            await fe.state(S.Initialising)
            await fe.state(S.Initialising)
            await fe.publish()
            for state in (S.Initialised, S.Initialised):
                await fe.state(state)
            await fe.wait(S.Connected)
            drain(changes)
            for state in (S.Initialised, S.Connected, S.Connected, S.Initialised,
                          S.Connected):
                await fe.state(state)
            # A transition as a marker: the daemon handles one device's events in
            # order, so once the backend is Closing it has seen every duplicate.
            await fe.state(S.Closing)
            await fe.wait(S.Closing)
            await session.xs.read("domid")  # every event before this reply is routed
            assert len(drain(changes)) == 1, "the backend wrote its state more than once"
            await fe.state(S.Closing)
            await fe.state(S.Closed)
            await fe.state(S.Closed)
            await fe.wait(S.Closed)
            await session.xs.read("domid")
            assert len(drain(changes)) == 1
        status = backend_status(daemon, "guest", "vbd")
        assert [h[1] for h in status.history] == ["InitWait", "Connected", "Closing", "Closed"]


async def test_frontend_reinitialises_after_closed(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        fe = Frontend(session)
        await fe.connect()
        await fe.state(S.Closing)
        await fe.wait(S.Closing)
        await fe.driver.detach()
        await fe.state(S.Closed)
        await fe.wait(S.Closed)
        # Re-initialise: the backend goes back to InitWait, then connects afresh.
        await fe.state(S.Initialising)
        assert await fe.wait(S.InitWait) == S.InitWait
        await fe.publish()
        await fe.state(S.Initialised)
        assert await fe.wait(S.Connected) == S.Connected
        status = backend_status(daemon, "guest", "vbd")
        assert [h[1] for h in status.history] == [
            "InitWait", "Connected", "Closing", "Closed", "InitWait", "Connected"]


async def test_frontend_reinitialises_while_connected(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        fe = Frontend(session)
        await fe.connect()
        await fe.driver.detach()
        await fe.state(S.Initialising)
        assert await fe.wait(S.InitWait) == S.InitWait
        await fe.publish()
        await fe.state(S.Initialised)
        assert await fe.wait(S.Connected) == S.Connected


async def test_real_frontend_reattaches_after_a_close(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        offered = {d.type: d for d in await session.devices()}
        for _ in range(3):
            device = await session.attach(session.driver_for(offered["vbd"]), VBD)
            with trio.fail_after(10):
                await device.connected.wait()
            await device.close()
            assert device.status.state == S.Closed
        be = backend_path("vbd", session.domid, VBD)
        assert parse_state(await session.xs.read(f"{be}/state")) == S.Closed


@pytest.mark.parametrize("removed", ["state", "device directory"])
async def test_frontend_state_node_removed(daemon, no_daemon_errors, removed):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        fe = Frontend(session)
        await fe.connect()
        await session.xs.rm(f"{fe.fe}/state" if removed == "state" else fe.fe)
        # Unknown counts as Closed: the backend disconnects.
        assert await fe.wait(S.Closed) == S.Closed
        assert backend_status(daemon, "guest", "vbd").peer_state == S.Unknown
        # The other device of the domain is unaffected and still works.
        console = Frontend(session, "console", 0)
        await console.connect()


async def test_frontend_state_garbage_counts_as_unknown(daemon, no_daemon_errors):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        fe = Frontend(session)
        await fe.connect()
        await fe.state("not-a-state")
        assert await fe.wait(S.Closed) == S.Closed
        await fe.state("99")
        await fe.state(S.Initialising)
        assert await fe.wait(S.InitWait) == S.InitWait


_CHILD = textwrap.dedent("""
    import sys, trio
    from pvio.frontends.session import open_session

    async def main(sock, mode):
        async with open_session(sock, "guest", pool_pages=64) as s:
            if mode == "connected":
                devices = [await s.attach(s.driver_for(d), d.devid) for d in await s.devices()]
                for device in devices:
                    await device.connected.wait()
            elif mode == "initialised":
                for d in await s.devices():
                    fe = f"device/{d.type}/{d.devid}"
                    await s.driver_for(d).publish(s.xs, fe)
                    await s.xs.write(f"{fe}/state", "3")
            print(s.domid, flush=True)
            await trio.sleep_forever()

    trio.run(main, sys.argv[1], sys.argv[2])
""")


@pytest.mark.parametrize("mode", ["claimed", "initialised", "connected"])
async def test_frontend_connection_dropped(daemon, no_daemon_errors, mode):
    # A frontend process killed (SIGKILL) at some point of the handshake: its
    # domain is released, the backend disconnects and removes its nodes, and
    # the daemon keeps serving (the name can be claimed again).
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CHILD, daemon.config.socket, mode],
        stdout=subprocess.PIPE)
    try:
        with trio.fail_after(20):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some()
                assert chunk, "the frontend process exited early"
                line += chunk
        domid = int(line)
        async with open_client(daemon.config.admin_socket) as admin:
            be = backend_path("vbd", domid, VBD)
            if mode != "claimed":
                assert await wait_state(admin, f"{be}/state", S.Connected) == S.Connected
            os.kill(proc.pid, signal.SIGKILL)
            with trio.fail_after(10):
                await proc.wait()
            with trio.fail_after(5):
                while await admin.read_or_none(f"/local/domain/{domid}") is not None:
                    await trio.sleep(0.02)
            for path in (be, f"/local/domain/0/backend/vbd/{domid}",
                         f"/local/domain/0/backend/console/{domid}"):
                assert await admin.read_or_none(path) is None, path
            assert "guest" not in daemon._claimed
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            with trio.move_on_after(10):
                await proc.wait()
        await proc.stdout.aclose()
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        await connect_all(session)


BAD_KEYS = [
    pytest.param({"ring-ref": "garbage"}, "bad ring-ref", id="ring-ref-garbage"),
    pytest.param({"ring-ref": "-1"}, "bad ring-ref", id="ring-ref-negative"),
    pytest.param({"ring-ref": ""}, "bad ring-ref", id="ring-ref-empty"),
    pytest.param({"ring-ref": "99999999999"}, "bad ring-ref", id="ring-ref-over-u32"),
    pytest.param({"ring-ref": "4000"}, "cannot map ring-ref", id="ring-ref-not-granted"),
    pytest.param({"ring-ref": None}, "did not publish ring-ref", id="ring-ref-missing"),
    pytest.param({"event-channel": "garbage"}, "bad event-channel", id="evtchn-garbage"),
    pytest.param({"event-channel": "5000"}, "bad event-channel", id="evtchn-out-of-range"),
    pytest.param({"event-channel": "77"}, "was not handed over", id="evtchn-not-handed-over"),
    pytest.param({"event-channel": None}, "did not publish event-channel", id="evtchn-missing"),
    pytest.param({"ring-page-order": "9"}, "bad ring-page-order", id="order-too-big"),
    pytest.param({"ring-page-order": "1"}, "did not publish ring-ref0", id="order-without-refs"),
    pytest.param({"protocol": "x86_32-abi"}, "unsupported blkif protocol", id="protocol"),
]


@pytest.mark.parametrize(("keys", "error"), BAD_KEYS)
async def test_garbage_transport_keys_close_only_that_device(daemon, no_daemon_errors,
                                                            keys, error):
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as guest, \
            open_session(daemon.config.socket, "other", pool_pages=64) as other:
        console = Frontend(guest, "console", 0)
        await console.connect()
        fe = Frontend(guest)
        await fe.wait(S.InitWait)
        await fe.publish()
        for key, value in keys.items():
            if value is None:
                await guest.xs.rm(f"{fe.fe}/{key}")
            else:
                await guest.xs.write(f"{fe.fe}/{key}", value)
        await fe.state(S.Initialised)
        assert await fe.wait(S.Closing) == S.Closing
        status = backend_status(daemon, "guest", "vbd")
        assert error in status.last_error, status.last_error
        assert "sectors" not in await guest.xs.directory(fe.be)
        # The domain's other device, and another domain, are served normally.
        assert await console.backend() == S.Connected
        await connect_all(other)
        # The frontend acknowledges; the backend closes.
        await fe.driver.detach()
        await fe.state(S.Closed)
        assert await fe.wait(S.Closed) == S.Closed
        assert await console.backend() == S.Connected


async def test_frontend_recovers_after_the_backend_refused_its_keys(daemon, no_daemon_errors):
    # A real frontend whose first publish is broken (an ungranted ring-ref
    # alongside a properly handed-over event channel): the backend refuses,
    # both close. Attaching again with a correct driver must connect.
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as session:
        offered = {d.type: d for d in await session.devices()}
        broken = session.driver_for(offered["vbd"])
        publish = broken.publish

        async def publish_bad_ring_ref(xs, path):
            await publish(xs, path)
            await xs.write(f"{path}/ring-ref", "4000")

        broken.publish = publish_bad_ring_ref
        device = await session.attach(broken, VBD)
        with trio.fail_after(10):
            await device.closed.wait()
        assert device.status.state == S.Closed
        assert not device.connected.is_set()
        assert "cannot map ring-ref" in backend_status(daemon, "guest", "vbd").last_error

        device = await session.attach(session.driver_for(offered["vbd"]), VBD)
        with trio.move_on_after(10):
            await device.connected.wait()
        assert device.connected.is_set(), (
            f"frontend {device.status.state.name} ({device.status.last_error}); backend "
            f"{backend_status(daemon, 'guest', 'vbd').state.name}")


async def test_daemon_keeps_serving_while_a_frontend_misbehaves(daemon, no_daemon_errors):
    # Interleave a hostile frontend's sequence with a well-behaved domain.
    async with open_session(daemon.config.socket, "guest", pool_pages=64) as guest, \
            open_session(daemon.config.socket, "other", pool_pages=64) as other:
        fe = Frontend(guest)
        await fe.wait(S.InitWait)
        for state in ("3", "4", "garbage", "7", "8", "0", "6", "1", "5", "2", "1"):
            await fe.state(state)
        devices = await connect_all(other)
        assert all(d.status.state == S.Connected for d in devices)
        with pytest.raises(XenstoreError):
            await guest.xs.write(f"{fe.be}/state", "4")
