"""Named regression tests for blkfront bugs found in review."""

import os
import signal

import pytest
import trio

from pvio.backends import blkback
from pvio.daemon import Daemon
from pvio.frontends.blkfront import BLK_KEYS, BlkDeviceError, BlkFront
from pvio.frontends.session import open_session
from pvio.layouts import XenbusState
from tests.blk_helpers import attach_blk, slow_backend
from tests.pvio_daemon import ServeProcess, running_daemon, short_tmpdir

TOML = """
[[domain]]
name = "guest"
  [[domain.device]]
  type = "vbd"
  devid = 1
  image = "disk.img"
  size = "8M"
"""


async def test_cancelled_request_keeps_its_slot_until_the_backend_answers(monkeypatch):
    """A caller cancelled while the backend still held its request used to put the
    slot back at once: the late answer then disabled the device ("not outstanding")
    or completed a new request that reused the slot with the old status and data."""
    slow_backend(monkeypatch, 0.3)  # the worker thread holds the batch for a while
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as session:
        front = BlkFront(session)
        device = await session.attach(front, 1, BLK_KEYS)
        with trio.fail_after(10):
            await device.connected.wait()
        await front.write(0, b"A" * 4096)
        with trio.move_on_after(0.05) as cancelled:
            await front.read(0, 4096)  # answered after 0.3 s: we give up first
        assert cancelled.cancelled_caught
        with trio.fail_after(10):
            await front.write(4096, b"B" * 4096)  # may reuse slots meanwhile
            assert await front.read(4096, 4096) == b"B" * 4096
            assert await front.read(0, 4096) == b"A" * 4096
        assert front.error is None
        with trio.fail_after(10):  # every slot and permit came back
            while len(front._free) != len(front._slots):
                await trio.sleep(0.01)


async def test_lost_daemon_without_reconnect_fails_pending_calls_instead_of_hanging():
    """With reconnect=False a lost store connection used to end the device loop
    without telling the driver, so requests in flight waited forever."""
    with short_tmpdir() as root:
        (root / "cfg.toml").write_text(TOML)
        serve = ServeProcess(root, "--config", str(root / "cfg.toml")).start()
        try:
            async with open_session(serve.socket) as session:
                front = BlkFront(session)
                device = await session.attach(front, 1, BLK_KEYS)
                with trio.fail_after(10):
                    await device.connected.wait()
                outcome: list[BaseException] = []

                async def keep_writing() -> None:
                    try:
                        while True:
                            await front.write(0, os.urandom(1 << 20))
                    except BlkDeviceError as exc:
                        outcome.append(exc)

                with trio.fail_after(20):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(keep_writing)
                        await trio.sleep(0.3)
                        os.kill(serve.pid, signal.SIGKILL)
                assert len(outcome) == 1
                assert "daemon" in str(outcome[0]) or "not connected" in str(outcome[0])
        finally:
            serve.proc.wait(timeout=20) if serve.proc.poll() is not None else serve.stop()


async def _attached(session) -> BlkFront:
    return (await attach_blk(session, 1, timeout=10))[0]


async def test_regression_an_unaligned_write_inside_one_sector_reads_it_once():
    """The read-modify-write read its two edge sectors one after the other, and
    the same sector twice when the write fell inside one: three requests and
    three round trips where one sector read and one write do."""
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as s:
        front = await _attached(s)
        await front.write(4096, bytes(range(256)) * 2)
        before = front.stats["requests"]
        await front.write(4097, b"w")  # inside sector 4096
        assert front.stats["requests"] - before == 2
        before = front.stats["requests"]
        await front.write(4000, b"x" * 200)  # across two sectors: both edges, then the write
        assert front.stats["requests"] - before == 3
        want = bytearray(range(256)) * 2
        want[1] = ord("w")
        want[:104] = b"x" * 104
        assert await front.read(3584, 512) == b"\0" * 416 + b"x" * 96
        assert await front.read(4096, 512) == bytes(want)


async def test_cancel_while_waiting_for_the_second_edge_lock_releases_the_first(monkeypatch):
    """An unaligned write took its first edge-sector lock, then waited for the
    second one outside the try: cancelled there, it never released the first,
    and every later write to that sector hung."""
    slow_backend(monkeypatch, 0.3)
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as s:
        front = await _attached(s)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(front.write, 4097, b"w")  # holds sector 4096 for a while
            await trio.sleep(0.05)
            with trio.move_on_after(0.05) as scope:
                await front.write(4000, b"c" * 200)  # takes 3584, waits for 4096
            assert scope.cancelled_caught
        with trio.fail_after(5):
            await front.write(3585, b"z")  # sector 3584 only
        assert front._rmw_locks == {}


async def test_a_sector_lock_is_not_replaced_while_a_writer_still_holds_it(monkeypatch):
    """A sector's lock was dropped from the table when nobody held or awaited
    it, although a writer had already taken a reference to it (it was waiting
    for its other edge): the next writer got a fresh lock, and two
    read-modify-writes of one sector ran at once, losing an update."""
    slow_backend(monkeypatch, 0.2)
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as s:
        front = await _attached(s)
        await front.write(0, bytes(8192))
        s1, s2 = 3584, 4096
        async with trio.open_nursery() as nursery:
            nursery.start_soon(front.write, s2 + 2, b"b")  # holds s2
            await trio.sleep(0.1)
            nursery.start_soon(front.write, s1 + 1, b"a")  # holds s1, longer
            await trio.sleep(0.01)
            nursery.start_soon(front.write, s1 + 500, b"c" * 20)  # edges s1 and s2
            await trio.sleep(0.01)
            lock = front._rmw_locks[s2][0]
            with trio.fail_after(5):
                while front._rmw_locks[s2][0] is lock and lock.locked():
                    await trio.sleep(0.005)  # the first writer of s2 is done
            assert front._rmw_locks[s2][0] is lock  # still the lock the third writer holds
            nursery.start_soon(front.write, s2 + 100, b"d")
        got = await front.read(s1, 1024)  # "b" at s2+2 was overwritten by the c's
        assert got[1:2] == b"a" and got[500:520] == b"c" * 20
        assert got[512 + 100:512 + 101] == b"d"


async def test_a_closed_pool_buffer_keeps_its_grants_until_its_requests_are_answered(
        monkeypatch):
    """Closing a PoolBuffer whose read was cancelled while still on the ring
    ended its grants and freed its pages at once; the next buffer() got the
    same grant ref and frame, and the backend, serving the stale read later,
    wrote the disk's bytes into that other buffer."""
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as s:
        front = await _attached(s)
        await front.write(0, b"D" * 4096)
        slow_backend(monkeypatch, 0.3)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(front.read, 8192, 4096)  # keeps the backend busy
            await trio.sleep(0.02)
            with front.buffer(4096) as old:
                with trio.move_on_after(0.05) as scope:
                    await front.readinto(0, old)  # on the ring, not yet served
                assert scope.cancelled_caught
            assert old.in_flight == 1 and old.view is None
            new = front.buffer(4096)
            assert new.refs != old.refs and new.frame != old.frame
            new.view[:] = bytes(4096)
        with trio.fail_after(5):
            while old.in_flight:
                await trio.sleep(0.01)
        assert bytes(new.view) == bytes(4096)
        assert front.error is None
        reused = front.buffer(4096)  # the old pages came back once answered
        assert reused.frame == old.frame
        for buf in (new, reused):
            buf.close()


async def _write_in_flight_across_a_sector_size_change(after) -> bytes:
    """Leave a 512-byte-sector write unanswered, kill the daemon and bring it
    back with 4096-byte sectors; ``after(front)`` runs once the write has
    failed. Returns the disk image as the new daemon left it."""
    def toml(sector_size: int) -> str:
        return TOML.replace('size = "8M"', f'size = "8M"\n  sector_size = {sector_size}')

    with short_tmpdir() as root:
        cfg = root / "cfg.toml"
        cfg.write_text(toml(512))
        serves = [ServeProcess(root, "--config", str(cfg)).start()]
        try:
            async with open_session(serves[0].socket, reconnect=True,
                                    recovery_timeout=20) as s:
                front = await _attached(s)
                outcome: list[BaseException | None] = []

                async def writer():
                    try:
                        await front.write(12288, b"X" * 512)
                        outcome.append(None)
                    except BlkDeviceError as exc:
                        outcome.append(exc)

                os.kill(serves[0].pid, signal.SIGSTOP)  # the write stays unanswered
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer)
                    await trio.sleep(0.2)
                    os.kill(serves[0].pid, signal.SIGKILL)
                    await trio.to_thread.run_sync(serves[0].proc.wait)
                    os.unlink(serves[0].socket)
                    cfg.write_text(toml(4096))
                    serves.append(ServeProcess(root, "--config", str(cfg)).start())
                assert len(outcome) == 1 and isinstance(outcome[0], BlkDeviceError)
                assert "4096-byte sectors" in str(outcome[0])
                await after(front)
            for serve in serves:
                serve.stop()
            with open(os.path.join(serves[-1].data_dir, "disk.img"), "rb") as f:
                return f.read()
        finally:
            for serve in serves:
                if serve.proc.poll() is None:
                    serve.proc.kill()
                    serve.proc.wait()


async def test_requests_in_flight_are_not_replayed_in_another_sector_size():
    """Shadows count sectors in the unit of the backend they were made for: a
    daemon that came back with 4096-byte sectors replayed a 512-byte-sector
    write at 8x its offset and answered OKAY."""
    async def nothing(front) -> None:
        pass

    image = await _write_in_flight_across_a_sector_size_change(nothing)
    assert image == bytes(len(image))  # nothing landed anywhere


async def test_regression_a_sector_size_change_fails_the_requests_in_flight_not_the_device():
    """Failing the requests in flight also disabled the device for good
    ("vbd unusable: the backend came back with 4096-byte sectors ...") and
    quarantined every PoolBuffer closed after it; with nothing in flight the
    same reconnect was accepted. Only the requests fail."""
    async def use(front) -> None:
        assert front.error is None and front.sector_size == 4096
        await front.write(8192, b"Y" * 4096)
        assert await front.read(8192, 4096) == b"Y" * 4096

    image = await _write_in_flight_across_a_sector_size_change(use)
    assert image[8192:12288] == b"Y" * 4096 and image.count(0) == len(image) - 4096


async def test_callers_waiting_for_a_slot_when_the_device_is_detached_fail_instead_of_hanging(
        monkeypatch):
    """With reconnect=True, callers parked for a free slot when the device was
    detached waited on the old free list forever (and a woken one could put a
    slot of the dead ring into the next ring's list)."""
    slow_backend(monkeypatch, 0.3)
    async with running_daemon(TOML) as daemon, \
            open_session(daemon.config.socket, reconnect=True) as s:
        front = BlkFront(s)
        device = await s.attach(front, 1, BLK_KEYS)
        with trio.fail_after(10):
            await device.connected.wait()
        slots = len(front._slots)
        outcomes: list[BaseException | None] = []

        async def reader(i: int) -> None:
            try:
                await front.read(i * 4096, 4096)
                outcomes.append(None)
            except BlkDeviceError as exc:
                outcomes.append(exc)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(slots + 8):
                    nursery.start_soon(reader, i)
                await trio.sleep(0.1)
                assert front._slots_wanted == 8
                await device.close()
        assert len(outcomes) == slots + 8
        failed = [o for o in outcomes if o is not None]
        assert len(failed) >= 8 and all("detached" in str(o) or "not attached" in str(o)
                                        for o in failed)
        with pytest.raises(BlkDeviceError, match="not attached"):
            await front.read(0, 512)


@pytest.mark.parametrize(("key", "value"), [("sector-size", "1000"), ("sectors", "-8")])
async def test_bad_disk_geometry_closes_the_device_and_the_daemon_survives(
        monkeypatch, key, value):
    """A backend publishing an impossible sector-size or sectors: blkfront kept
    the bad sector-size before checking it (the next attach compared against
    it) and accepted any sectors. The frontend then closed the device before it
    connected, the daemon unmapped the rings, and its statistics task read the
    rings' indices from the unmapped pages: a segfault of the whole process."""
    monkeypatch.setattr(Daemon, "STATISTICS_INTERVAL", 0.02)
    start = blkback.BlkBackend.start

    async def publishes_bad_geometry(self, conn, frontend):
        return {**await start(self, conn, frontend), key: value}

    monkeypatch.setattr(blkback.BlkBackend, "start", publishes_bad_geometry)
    async with running_daemon(TOML) as daemon, open_session(daemon.config.socket) as session:
        front = BlkFront(session)
        device = await session.attach(front, 1, BLK_KEYS)
        with trio.fail_after(10):
            while device.status.state != XenbusState.Closed:
                await trio.sleep(0.01)
        assert device.status.last_error == f"backend published a bad {key} {value}"
        assert not device.connected.is_set()
        assert (front.sector_size, front.sectors) == (512, 0)  # nothing bad was kept
        await trio.sleep(0.2)  # the statistics task runs ten times meanwhile
        monkeypatch.undo()
        assert (await _attached(session)).size == 8 << 20  # the daemon still serves
