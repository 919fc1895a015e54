"""blkback end to end: an in-process Daemon, guest sessions, BlkFront and raw frontends.

- Data: what a frontend writes is in the image file on disk (pwritev into the
  real file), and what is in the file is what a frontend reads.
- Durability (hardening.md #22-24): FLUSH is answered only after fdatasync
  returned; an injected fdatasync failure fails that flush and every later one
  until the device is reconnected; short and failing pwritev; reads past the
  end of a file that shrank are zero-filled.
- Discard punches holes in the image; indirect requests carry large writes;
  read-only devices refuse writes on the ring; multi-page rings map 4 pages.
- Hostile frontend (hardening.md #3, #8): a raw frontend sends every kind of
  invalid request and bad grant and gets ERROR/EOPNOTSUPP with the right ids,
  while another domain's BlkFront keeps working; a broken ring index closes
  only that device.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import threading

import pytest
import trio

from pvio import blkif
from pvio import daemon as daemon_mod
from pvio.backends import blkback
from pvio.backends.blkback import BlkBackend
from pvio.frontends.blkfront import BLK_KEYS, BlkDeviceError
from pvio.frontends.session import open_session
from pvio.layouts import BlkifOp, BlkifRsp
from pvio.layouts import XenbusState as S
from pvio.xenbus.device import DeviceError
from tests.blk_helpers import (
    PAGE,
    U64,
    XVDA,
    XVDB,
    RawBlkFront,
    attach_blk,
    attach_raw,
    backend_device,
    blk_error,
    discard_req,
    domain,
    indirect_req,
    paths,
    rw_req,
    seg_bytes,
    vbd,
)
from tests.evtchn_helpers import blocked_send
from tests.pvio_daemon import refused_while_backing_off, running_daemon, wait_state, watchdog

OK, ERR, NOTSUPP = BlkifRsp.OKAY, BlkifRsp.ERROR, BlkifRsp.EOPNOTSUPP
R, W, BAR, FL, DIS, IND = (BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER,
                           BlkifOp.FLUSH_DISKCACHE, BlkifOp.DISCARD, BlkifOp.INDIRECT)
MIB = 1 << 20
DISK = 4 * MIB
SECTORS = DISK // 512
RO_DISK = MIB

CONFIG = "\n".join([
    domain("g", vbd(XVDA, "g-xvda.img", "4M"), vbd(XVDB, "g-xvdb.img", "1M", "r")),
    domain("evil", vbd(XVDA, "evil-xvda.img", "4M"), vbd(XVDB, "evil-xvdb.img", "1M", "r")),
    domain("good", vbd(XVDA, "good-xvda.img", "4M")),
])


@pytest.fixture
async def daemon():
    async with watchdog(30, "blkback test"), running_daemon(CONFIG) as daemon:
        yield daemon


def image(daemon, name: str, devid: int = XVDA) -> str:
    return backend_device(daemon, name, devid).driver.image


def file_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def prefill(daemon, image_name: str, size: int) -> bytes:
    """Write a pattern into an image file before its domain is claimed."""
    data = random.Random(image_name).randbytes(size)
    os.makedirs(daemon.config.data_dir, exist_ok=True)
    with open(os.path.join(daemon.config.data_dir, image_name), "wb") as f:
        f.write(data)
    return data


# ---------------------------------------------------------------------- co-tenant


class Cotenant:
    """A well-behaved domain writing and reading back random data in a loop."""

    def __init__(self, front) -> None:
        self.front = front
        self.ok = 0
        self.errors: list[BaseException] = []
        self._progress = trio.Event()

    async def run(self) -> None:
        rng = random.Random(1)
        while True:
            length = rng.choice([1, 512, 4096, 12345, 65536, 200_000])
            offset = rng.randrange(0, DISK - length)
            data = rng.randbytes(length)
            try:
                await self.front.write(offset, data)
                got = await self.front.read(offset, length)
                assert got == data, f"co-tenant read back wrong data at {offset}+{length}"
            except Exception as exc:  # recorded, asserted by the fixture
                self.errors.append(exc)
                return
            self.ok += 1
            self._progress.set()
            await trio.sleep(0.001)

    async def progress(self, rounds: int = 3, timeout: float = 5.0) -> None:
        """Until the co-tenant completed ``rounds`` more write+read rounds."""
        with trio.fail_after(timeout):
            for _ in range(rounds):
                self._progress = trio.Event()
                await self._progress.wait()
        assert not self.errors, self.errors


@pytest.fixture
async def cotenant(daemon):
    async with open_session(daemon.config.socket, "good") as session:
        front, _ = await attach_blk(session)
        tenant = Cotenant(front)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tenant.run)
            yield tenant
            await tenant.progress(1)
            nursery.cancel_scope.cancel()
    assert not tenant.errors, tenant.errors
    assert tenant.ok >= 3


# ---------------------------------------------------------------------- keys


async def test_backend_publishes_features_and_info(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        await attach_blk(s, XVDA)
        await attach_blk(s, XVDB)
        rw_be, _ = paths(s, XVDA)
        ro_be, _ = paths(s, XVDB)

        async def read(path):
            raw = await s.xs.read_or_none(path)
            return None if raw is None else raw.decode()

        assert await read(f"{rw_be}/feature-flush-cache") == "1"
        assert await read(f"{rw_be}/feature-barrier") == "1"
        assert await read(f"{rw_be}/feature-discard") == "1"
        assert await read(f"{rw_be}/feature-max-indirect-segments") == "256"
        assert await read(f"{rw_be}/max-ring-page-order") == "4"
        assert await read(f"{rw_be}/sectors") == str(SECTORS)
        assert await read(f"{rw_be}/sector-size") == "512"
        assert await read(f"{rw_be}/info") == "0"
        assert await read(f"{rw_be}/mode") == "w"
        assert await read(f"{ro_be}/info") == "4"  # VDISK_READONLY
        assert await read(f"{ro_be}/mode") == "r"
        assert await read(f"{ro_be}/feature-discard") is None
        assert await read(f"{ro_be}/sectors") == str(RO_DISK // 512)


def test_backend_without_indirect_does_not_publish_the_node():
    """blkif.h: "A backend that does not support indirect must not publish
    feature-max-indirect-segments" (not even as 0)."""
    backend = BlkBackend(None, "/nonexistent.img", max_indirect_segments=0)
    assert "feature-max-indirect-segments" not in backend.features()


# ---------------------------------------------------------------------- data on disk


async def test_image_is_created_sparse_with_the_configured_size(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        path = image(daemon, "g")
        assert os.stat(path).st_size == DISK == front.size
        assert os.stat(path).st_blocks == 0  # nothing written yet: all holes
        assert await front.read(0, 8192) == bytes(8192)


@pytest.mark.parametrize(("offset", "length"), [
    (0, 512), (0, 4096), (4096, 11 * 4096), (512, 12 * 4096), (1, 1), (511, 2),
    (1000, 100_000), (DISK - 1, 1), (DISK - 4096, 4096), (12345, 3 * MIB + 17),
])
async def test_writes_land_in_the_image_and_reads_come_from_it(daemon, offset, length):
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        path = image(daemon, "g")
        data = random.Random(offset ^ length).randbytes(length)
        before = file_bytes(path, 0, DISK)
        await front.write(offset, data)
        after = file_bytes(path, 0, DISK)
        assert after == before[:offset] + data + before[offset + length:]
        # and the other way round: the file's bytes are what a read returns
        fresh = random.Random(7).randbytes(length)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(fresh)
        assert await front.read(offset, length) == fresh


async def test_existing_image_contents_are_served_read_only(daemon):
    data = prefill(daemon, "g-xvdb.img", RO_DISK)
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s, XVDB)
        assert front.readonly and front.size == RO_DISK
        assert await front.read(0, RO_DISK) == data
        assert await front.read(777, 5000) == data[777:5777]
        with pytest.raises(BlkDeviceError):
            await front.write(0, b"x")
        with pytest.raises(BlkDeviceError):
            await front.write(4096, bytes(4096))
        await front.discard(0, 4096)  # not advertised: a no-op hint
        assert file_bytes(image(daemon, "g", XVDB), 0, RO_DISK) == data


async def test_flush_on_a_read_only_device_succeeds(daemon):
    """Nothing to commit on a read-only disk, yet feature-flush-cache is
    advertised; a flush must not fail (BlockDevice.close() flushes, so a failing
    flush makes closing a read-only disk raise)."""
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s, XVDB)
        await front.flush()


# ---------------------------------------------------------------------- durability


async def test_flush_is_answered_only_after_fdatasync_returned(daemon, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    calls = []
    real = os.fdatasync

    def slow_fdatasync(fd):
        calls.append(fd)
        entered.set()
        assert release.wait(10), "test never released fdatasync"
        return real(fd)

    monkeypatch.setattr(blkback.os, "fdatasync", slow_fdatasync)
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        await front.write(0, b"durable" * 100)
        done = trio.Event()

        async def flush():
            await front.flush()
            done.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush)
                assert await trio.to_thread.run_sync(entered.wait, 5)
                await trio.sleep(0.2)
                assert not done.is_set(), "FLUSH answered before fdatasync returned"
                release.set()
                with trio.fail_after(5):
                    await done.wait()
        finally:
            release.set()
        assert len(calls) == 1
        assert calls[0] == backend_device(daemon, "g").driver._fd


async def test_fdatasync_failure_makes_every_later_flush_fail(daemon, monkeypatch):
    """hardening.md #24 (QEMU page_cache_inconsistent): once fdatasync failed,
    later flushes fail too, although fdatasync would now succeed, until the
    device is reconnected (the file reopened)."""
    state = {"fail": False, "calls": 0}
    real = os.fdatasync

    def fdatasync(fd):
        state["calls"] += 1
        if state["fail"]:
            raise OSError(errno.EIO, "injected EIO")
        return real(fd)

    monkeypatch.setattr(blkback.os, "fdatasync", fdatasync)
    async with open_session(daemon.config.socket, "g") as s:
        front, device = await attach_blk(s)
        await front.write(0, b"a" * 4096)
        await front.flush()
        assert state["calls"] == 1
        state["fail"] = True
        await front.write(0, b"b" * 4096)
        with pytest.raises(BlkDeviceError):
            await front.flush()
        assert state["calls"] == 2
        state["fail"] = False  # the disk "recovered": fdatasync works again
        for _ in range(5):
            with pytest.raises(BlkDeviceError):
                await front.flush()
        assert backend_device(daemon, "g").driver.flush_failed
        # concurrent flushes all fail as well
        failures = []

        async def flush():
            try:
                await front.flush()
            except BlkDeviceError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(flush)
        assert len(failures) == 8
        # reconnecting reopens the file: flushes work again
        await device.close()
        front2, _ = await attach_blk(s)
        await front2.flush()
        assert await front2.read(0, 4096) == b"b" * 4096


async def test_short_pwritev_is_completed_before_okay(daemon, monkeypatch):
    real = os.pwritev
    calls = []

    def short_pwritev(fd, buffers, offset):
        """Write at most 1000 bytes per call (a legal short write)."""
        out, left = [], 1000
        for buf in buffers:
            if left <= 0:
                break
            piece = memoryview(buf)[:left]
            out.append(piece)
            left -= len(piece)
        calls.append(offset)
        return real(fd, out, offset)

    monkeypatch.setattr(blkback.BlkBackend, "inline_io", False)  # the worker-thread path
    monkeypatch.setattr(blkback.os, "pwritev", short_pwritev)
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        data = random.Random(3).randbytes(11 * 4096)
        await front.write(8192, data)
        assert len(calls) > 40
        assert file_bytes(image(daemon, "g"), 8192, len(data)) == data


def inject_pwritev_error(monkeypatch) -> dict:
    real = os.pwritev
    fail = {"on": True}

    def pwritev(fd, buffers, offset):
        if fail["on"]:
            raise OSError(errno.ENOSPC, "injected ENOSPC")
        return real(fd, buffers, offset)

    monkeypatch.setattr(blkback.BlkBackend, "inline_io", False)  # the worker-thread path
    monkeypatch.setattr(blkback.os, "pwritev", pwritev)
    return fail


async def test_pwritev_error_fails_that_write_only(daemon, monkeypatch):
    # Keep pytest's log capture from retaining the I/O error (see the next test).
    monkeypatch.setattr(blkback.log, "propagate", False)
    fail = inject_pwritev_error(monkeypatch)
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        with blk_error("backend status -1"):
            await front.write(0, b"x" * 4096)
        assert file_bytes(image(daemon, "g"), 0, 4096) == bytes(4096)
        fail["on"] = False
        await front.write(0, b"y" * 4096)  # the device is still usable
        assert await front.read(0, 4096) == b"y" * 4096
        assert backend_device(daemon, "g").status.state == S.Connected


async def test_io_error_then_domain_leaves_does_not_crash_the_daemon(daemon, monkeypatch,
                                                                     caplog):
    """blkback logs the OSError object of a failed I/O; a handler that keeps
    log records (pytest's caplog here; a MemoryHandler, an error reporter) keeps
    its traceback, whose frames hold memoryviews of the guest's pool. When the
    domain then leaves, Domain.close() cannot unmap the pool and the
    LocalProtocolError escapes XenstoreServer._release: the whole daemon dies."""
    fail = inject_pwritev_error(monkeypatch)
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        with blk_error():
            await front.write(0, b"x" * 4096)
        fail["on"] = False
    await trio.sleep(0.2)
    async with open_session(daemon.config.socket, "good") as s:  # the daemon still serves
        front, _ = await attach_blk(s)
        await front.write(0, b"alive")
        assert await front.read(0, 5) == b"alive"


async def test_reads_past_the_end_of_a_shrunk_file_are_zero_filled(daemon):
    """If the image shrinks under a connected device, a read past the new end
    gets zeros, not whatever an earlier request left in the granted pages."""
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        await front.write(DISK - 8192, b"\xab" * 8192)  # leaves 0xab in a slot's pages
        os.truncate(image(daemon, "g"), DISK - 6144)
        got = await front.read(DISK - 8192, 8192)
        assert got == b"\xab" * 2048 + bytes(6144)


# ---------------------------------------------------------------------- discard


async def test_discard_punches_holes_in_the_image(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        path = image(daemon, "g")
        await front.write(0, b"\x11" * (3 * MIB))
        await front.flush()
        blocks = os.stat(path).st_blocks
        assert blocks >= 3 * MIB // 512
        await front.discard(MIB, MIB)
        assert await front.read(MIB, MIB) == bytes(MIB)
        assert await front.read(0, MIB) == b"\x11" * MIB
        assert await front.read(2 * MIB, MIB) == b"\x11" * MIB
        assert os.stat(path).st_blocks <= blocks - MIB // 512
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, MIB, os.SEEK_HOLE) == MIB
            assert os.lseek(fd, MIB, os.SEEK_DATA) == 2 * MIB
        finally:
            os.close(fd)


async def test_discard_of_partial_blocks_zeroes_exactly_the_range(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        await front.write(0, b"\xff" * 8192)
        await front.discard(512, 1024)
        assert file_bytes(image(daemon, "g"), 0, 8192) == (
            b"\xff" * 512 + bytes(1024) + b"\xff" * (8192 - 1536))
        with pytest.raises(BlkDeviceError):
            await front.discard(100, 512)  # not sector-aligned
        with pytest.raises(BlkDeviceError):
            await front.discard(DISK - 512, 1024)  # beyond the disk


# ---------------------------------------------------------------------- indirect


def spy_operations(front) -> list[int]:
    """Record the operation byte of every request the frontend puts on its ring."""
    ops: list[int] = []
    produce = front.ring.produce

    def spy(data):
        ops.extend(bytes(data)[i] for i in range(0, len(data), 112))
        return produce(data)

    front.ring.produce = spy
    return ops


async def test_large_writes_go_as_indirect_requests(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        stats = backend_device(daemon, "g").driver.stats
        ops = spy_operations(front)
        await front.write(0, b"\x01" * (11 * 4096))  # 44 KiB: one direct request
        assert ops == [W]
        ops.clear()
        data = random.Random(5).randbytes(32 * 4096)
        await front.write(65536, data)  # 128 KiB: one indirect request of 32 segments
        assert ops == [IND]
        assert stats.requests.get("write") == 2  # counted by what they do
        assert stats.bytes.get("write") == 11 * 4096 + len(data)
        assert file_bytes(image(daemon, "g"), 65536, len(data)) == data
        ops.clear()
        await front.readinto(65536, got := bytearray(len(data)))
        assert got == data and ops == [IND]
        ops.clear()
        big = random.Random(6).randbytes(2 * MIB + 3)
        await front.write(100, big)  # unaligned: read-modify-write of the edges
        assert IND in ops
        assert file_bytes(image(daemon, "g"), 100, len(big)) == big


async def test_backend_without_indirect_support(monkeypatch):
    monkeypatch.setattr(daemon_mod, "BlkBackend",
                        functools.partial(BlkBackend, max_indirect_segments=0))
    async with watchdog(20), running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "evil") as s:
        front, _ = await attach_blk(s)
        assert not front.features["feature-max-indirect-segments"]
        ops = spy_operations(front)
        data = random.Random(8).randbytes(100 * 4096)
        await front.write(0, data)
        assert set(ops) == {W} and len(ops) == 10  # ceil(100 / 11)
        assert await front.read(0, len(data)) == data
        assert file_bytes(image(daemon, "evil"), 0, len(data)) == data
        raw, _ = await attach_raw(s, XVDB)
        _, ref, _ = raw.page()
        rsp = await raw.call(indirect_req(R, 77, 0, 1, [ref]))
        assert rsp == [(77, IND, NOTSUPP)]


async def test_smaller_indirect_maximum_is_respected(monkeypatch):
    monkeypatch.setattr(daemon_mod, "BlkBackend",
                        functools.partial(BlkBackend, max_indirect_segments=16))
    async with watchdog(20), running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s)
        assert front.features["feature-max-indirect-segments"] == 16
        ops = spy_operations(front)
        data = random.Random(9).randbytes(64 * 4096)
        await front.write(0, data)
        assert ops == [IND] * 4  # 16 segments each
        stats = backend_device(daemon, "g").driver.stats
        assert stats.requests.get("write") == 4 and stats.errors == 0
        assert await front.read(0, len(data)) == data


# ---------------------------------------------------------------------- multi-page ring


async def test_multi_page_ring_maps_four_pages(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        front, _ = await attach_blk(s, ring_page_order=2)
        assert front.ring.nr_ents == 128
        _, fe = paths(s)
        assert (await s.xs.read(f"{fe}/ring-page-order")) == b"2"
        refs = [int(await s.xs.read(f"{fe}/ring-ref{i}")) for i in range(4)]
        assert await s.xs.read_or_none(f"{fe}/ring-ref") is None
        driver = backend_device(daemon, "g").driver
        assert driver.conn.ring_page_order == 2
        assert len(driver.conn.queues) == 1
        assert list(driver.conn.mappings[0].refs) == refs
        # 128 requests in flight at once: more than a one-page ring could hold
        async def write(i):
            await front.write(i * 4096, bytes([i]) * 4096)

        async with trio.open_nursery() as nursery:
            for i in range(128):
                nursery.start_soon(write, i)
        assert driver.stats.max_batch > 32
        on_disk = file_bytes(image(daemon, "g"), 0, 128 * 4096)
        assert on_disk == b"".join(bytes([i]) * 4096 for i in range(128))


async def test_ring_page_order_above_the_maximum_is_refused(daemon):
    async with open_session(daemon.config.socket, "g") as s:
        raw = RawBlkFront(s, ring_page_order=5)  # max-ring-page-order is 4
        device = await s.attach(raw, XVDA, BLK_KEYS)
        be, _ = paths(s)
        await wait_state(s.xs, f"{be}/state", lambda st: st in (S.Closing, S.Closed))
        assert not device.connected.is_set()
        assert "ring-page-order" in backend_device(daemon, "g").status.last_error
        assert backend_device(daemon, "g").driver.conn is None


async def test_frontend_can_connect_after_a_refused_connect(daemon):
    """After the backend refused the frontend's keys, the frontend fixes them and
    runs the handshake again. The refused attempt had handed over its event
    channel fds; the backend never took them (it failed before binding), so the
    recycled port number is refused with EEXIST and the device can never connect."""
    async with open_session(daemon.config.socket, "g") as s:
        raw = RawBlkFront(s, ring_page_order=5)
        device = await s.attach(raw, XVDA, BLK_KEYS)
        be, _ = paths(s)
        await wait_state(s.xs, f"{be}/state", lambda st: st in (S.Closing, S.Closed))
        await device.close()
        raw2, _ = await attach_raw(s, XVDA, ring_page_order=4)
        _, ref, _ = raw2.page()
        assert await raw2.call(rw_req(R, 1, 0, [(ref, 0, 7)])) == [(1, R, OK)]


# ---------------------------------------------------------------------- hostile frontend


async def test_hostile_requests_get_errors_with_their_ids(daemon, cotenant):
    async with open_session(daemon.config.socket, "evil") as s:
        raw, _ = await attach_raw(s, XVDA)
        ro, _ = await attach_raw(s, XVDB)
        gnt = s.gnttab
        _, good, good_page = raw.page(fill=b"G")
        _, good2, _ = raw.page()
        _, ro_ref, _ = raw.page(readonly=True, fill=b"R")
        _, other_dom, _ = raw.page(domid=7)
        bad_frame = gnt.grant_access(0, s.pool.shm.pages + 10)
        not_granted = gnt.nr_entries - 1
        assert gnt.entry(not_granted).flags == 0
        full = lambda ref: (ref, 0, 7)  # noqa: E731
        # indirect pages: one fine, one with a bad segment, one naming a bad gref
        _, ind_ok, ind_ok_page = raw.page(readonly=True)
        ind_ok_page[:16] = seg_bytes([full(good), full(good2)])
        _, ind_badseg, page = raw.page(readonly=True)
        page[:16] = seg_bytes([full(good), (good2, 5, 2)])
        _, ind_badref, page = raw.page(readonly=True)
        page[:16] = seg_bytes([full(good), full(not_granted)])
        _, ind_other, _ = raw.page(domid=7)
        _, revoked, _ = raw.page()  # last: a revoked ref is recycled by the next grant
        assert gnt.end_access(revoked)

        cases = [  # (request, id, expected op, expected status)
            (rw_req(4, 1, 0, [full(good)]), 1, 4, ERR),
            (rw_req(7, 2, 0, [full(good)]), 2, 7, ERR),
            (rw_req(255, U64, 0, [full(good)]), U64, 255, ERR),
            (rw_req(R, 3, 0, [], nseg=0), 3, R, ERR),
            (rw_req(W, 4, 0, [], nseg=0), 4, W, ERR),
            (rw_req(BAR, 5, 0, [], nseg=0), 5, BAR, ERR),
            (rw_req(R, 6, 0, [full(good)] * 11, nseg=12), 6, R, ERR),
            (rw_req(W, 7, 0, [full(good)] * 11, nseg=255), 7, W, ERR),
            (rw_req(R, 8, 0, [(good, 4, 3)]), 8, R, ERR),
            (rw_req(W, 9, 0, [full(good), (good, 0, 8)]), 9, W, ERR),
            (rw_req(R, 10, SECTORS - 7, [full(good)]), 10, R, ERR),
            (rw_req(R, 11, (1 << 55) - 1, [full(good)]), 11, R, ERR),
            (rw_req(W, 12, U64, [(good, 0, 0)]), 12, W, ERR),
            (rw_req(W, 13, 1 << 55, [full(good)]), 13, W, ERR),
            (discard_req(14, 0, 0), 14, DIS, ERR),
            (discard_req(15, SECTORS - 1, 2), 15, DIS, ERR),
            (discard_req(16, 1, U64), 16, DIS, ERR),
            (indirect_req(BAR, 17, 0, 2, [ind_ok]), 17, IND, ERR),
            (indirect_req(DIS, 18, 0, 2, [ind_ok]), 18, IND, ERR),
            (indirect_req(R, 19, 0, 0, [ind_ok]), 19, IND, ERR),
            (indirect_req(R, 20, 0, 257, [ind_ok]), 20, IND, ERR),
            (indirect_req(W, 21, 0, 2, [ind_badseg]), 21, IND, ERR),
            (indirect_req(W, 22, 0, 2, [ind_badref]), 22, IND, ERR),
            (indirect_req(R, 23, 0, 2, [not_granted]), 23, IND, ERR),
            (indirect_req(R, 24, 0, 2, [ind_other]), 24, IND, ERR),
            (indirect_req(R, 25, 0, 2, [0xFFFFFFFF]), 25, IND, ERR),
            (indirect_req(R, 26, SECTORS - 8, 2, [ind_ok]), 26, IND, ERR),
            # bad grants
            (rw_req(R, 30, 0, [full(gnt.nr_entries)]), 30, R, ERR),
            (rw_req(R, 31, 0, [full(10**6)]), 31, R, ERR),
            (rw_req(R, 32, 0, [full(0xFFFFFFFF)]), 32, R, ERR),
            (rw_req(R, 33, 0, [full(not_granted)]), 33, R, ERR),
            (rw_req(R, 34, 0, [full(0)]), 34, R, ERR),  # reserved, never granted
            (rw_req(W, 35, 0, [full(revoked)]), 35, W, ERR),
            (rw_req(R, 36, 0, [full(ro_ref)]), 36, R, ERR),  # read needs a writable page
            (rw_req(R, 37, 0, [full(other_dom)]), 37, R, ERR),
            (rw_req(W, 38, 0, [full(other_dom)]), 38, W, ERR),
            (rw_req(W, 39, 0, [full(bad_frame)]), 39, W, ERR),
            (rw_req(R, 40, 0, [full(good), full(good2), full(not_granted)]), 40, R, ERR),
        ]
        responses = await raw.call(*(c[0] for c in cases))
        assert sorted(responses) == sorted((rid, op, st) for _, rid, op, st in cases)
        await cotenant.progress()

        # A read-only grant is fine for a WRITE (the backend only reads it).
        assert await raw.call(rw_req(W, 50, 8, [full(ro_ref)])) == [(50, W, OK)]
        # Valid requests still work after all that, on the same ring.
        good_page[:] = b"V" * PAGE
        assert await raw.call(rw_req(W, 51, 0, [full(good)])) == [(51, W, OK)]
        good_page[:] = bytes(PAGE)
        assert await raw.call(rw_req(R, 52, 0, [full(good)])) == [(52, R, OK)]
        assert bytes(good_page) == b"V" * PAGE
        assert await raw.call(rw_req(FL, 53, 0, [], nseg=0)) == [(53, FL, OK)]
        assert await raw.call(rw_req(BAR, 54, 16, [full(good)])) == [(54, BAR, OK)]
        assert await raw.call(indirect_req(W, 55, 24, 2, [ind_ok])) == [(55, IND, OK)]
        assert await raw.call(discard_req(56, 64, 8)) == [(56, DIS, OK)]
        path = image(daemon, "evil")
        assert file_bytes(path, 0, PAGE) == b"V" * PAGE
        assert file_bytes(path, 8 * 512, PAGE) == b"R" * PAGE
        assert file_bytes(path, 16 * 512, PAGE) == b"V" * PAGE
        assert file_bytes(path, 24 * 512, 2 * PAGE) == b"V" * PAGE + bytes(PAGE)

        # The read-only disk: writes of any kind are refused on the ring; barrier,
        # flush and discard are not advertised there, so they are EOPNOTSUPP.
        ro_cases = [
            (rw_req(W, 60, 0, [full(good)]), 60, W, ERR),
            (rw_req(BAR, 61, 0, [full(good)]), 61, BAR, NOTSUPP),
            (indirect_req(W, 62, 0, 2, [ind_ok]), 62, IND, ERR),
            (discard_req(63, 0, 8), 63, DIS, NOTSUPP),
            (rw_req(R, 64, 0, [full(good)]), 64, R, OK),
            (rw_req(R, 65, RO_DISK // 512, [(good, 0, 0)]), 65, R, ERR),
        ]
        responses = await ro.call(*(c[0] for c in ro_cases))
        assert sorted(responses) == sorted((rid, op, st) for _, rid, op, st in ro_cases)
        assert file_bytes(image(daemon, "evil", XVDB), 0, RO_DISK) == bytes(RO_DISK)

        # Nothing stayed pinned after the error paths: every data grant can be revoked.
        for ref in (good, good2, ro_ref, other_dom, bad_frame, ind_ok, ind_badseg,
                    ind_badref, ind_other):
            assert gnt.end_access(ref), f"grant {ref} still pinned by the backend"
        for name, devid in (("evil", XVDA), ("evil", XVDB)):
            assert backend_device(daemon, name, devid).status.state == S.Connected
        assert backend_device(daemon, "evil").driver.stats.errors >= len(cases)
        await cotenant.progress()


async def test_hostile_flood_of_invalid_requests(daemon, cotenant):
    """Thousands of random-garbage requests: each gets exactly one response
    with its own id, and the co-tenant keeps going."""
    rng = random.Random(42)
    async with open_session(daemon.config.socket, "evil") as s:
        raw, _ = await attach_raw(s, XVDA)
        _, ref, _ = raw.page()
        for rnd in range(60):
            batch = []
            for i in range(32):
                body = bytearray(rng.randbytes(112))
                body[8:16] = (rnd * 32 + i).to_bytes(8, "little")
                if rng.random() < 0.5:  # make grant refs plausible half the time
                    for k in range(11):
                        body[24 + 8 * k:28 + 8 * k] = ref.to_bytes(4, "little")
                batch.append(bytes(body))
            got = await raw.call(*batch)
            assert sorted(r[0] for r in got) == list(range(rnd * 32, rnd * 32 + 32))
            for (rid, op, status), req in zip(sorted(got), batch, strict=True):
                assert op == req[0], rid
                assert status in (OK, ERR, NOTSUPP)
        assert backend_device(daemon, "evil").status.state == S.Connected
        assert s.gnttab.end_access(ref)
        await cotenant.progress()


async def test_read_into_its_own_ring_page(daemon, cotenant):
    """A frontend names its own (already mapped) ring page as a READ target: the
    disk's 0xff bytes overwrite the ring's indices. That frontend breaks its
    own device at worst; the daemon and the other domain carry on."""
    path = os.path.join(daemon.config.data_dir, "evil-xvda.img")
    with open(path, "wb") as f:
        f.write(b"\xff" * PAGE)
        f.truncate(DISK)
    async with open_session(daemon.config.socket, "evil") as s:
        raw, _ = await attach_raw(s, XVDA)
        ring_ref = raw.queues[0].areas[0][2][0]
        raw.send(rw_req(R, 1, 0, [(ring_ref, 0, 7)]))
        be, _ = paths(s, XVDA)
        await wait_state(s.xs, f"{be}/state", lambda st: st in (S.Closing, S.Closed))
        assert "overflow" in backend_device(daemon, "evil").status.last_error
        await cotenant.progress(5)


async def test_broken_ring_index_closes_only_that_device(daemon, cotenant):
    async with open_session(daemon.config.socket, "evil") as s:
        raw, device = await attach_raw(s, XVDA)
        ro, _ = await attach_raw(s, XVDB)
        _, ref, _ = raw.page()
        assert await raw.call(rw_req(R, 1, 0, [(ref, 0, 7)])) == [(1, R, OK)]
        be, _ = paths(s, XVDA)
        area = raw.area(0)
        prod = int.from_bytes(area[0:4], "little")
        area[0:4] = ((prod + 1000) & 0xFFFFFFFF).to_bytes(4, "little")  # req_prod far beyond
        raw.channel.notify()
        await wait_state(s.xs, f"{be}/state", lambda st: st in (S.Closing, S.Closed))
        backend = backend_device(daemon, "evil", XVDA)
        assert ("Connected", "Closing") in backend.status.history
        assert "overflow" in backend.status.last_error
        assert backend.driver.conn is None  # ring unmapped, channel closed
        with trio.fail_after(5):
            await device.closed.wait()
        # the same domain's other device and the other domain keep working
        _, ref2, _ = ro.page()
        assert await ro.call(rw_req(R, 2, 0, [(ref2, 0, 7)])) == [(2, R, OK)]
        assert backend_device(daemon, "evil", XVDB).status.state == S.Connected
        await cotenant.progress(5)
    # and a new session of the offending domain can attach again
    async with open_session(daemon.config.socket, "evil") as s:
        front, _ = await attach_blk(s)
        await front.write(0, b"again")
        assert await front.read(0, 5) == b"again"


async def _backs_off_then_attaches_again(daemon) -> None:
    """The evil domain stalled the daemon through its vbd: a new session is
    refused while the device backs off, and attaches (and works) after that."""
    async with open_session(daemon.config.socket, "evil") as s:
        await refused_while_backing_off(daemon, s, attach_blk, "evil", "vbd", XVDA)
    async with open_session(daemon.config.socket, "evil") as s:
        front, _ = await attach_blk(s)
        await front.write(0, b"again")
        assert await front.read(0, 5) == b"again"


async def test_a_frontend_that_blocks_our_notification_loses_only_that_device(
        daemon, cotenant):
    """Until the send guard, a notification the frontend blocked froze the
    daemon's event loop; now the send raises, and the device is disconnected
    like one with a broken ring, nothing else. Each such stall held the daemon
    for the guard's timeout, so the device then refuses connects for a while
    (StallBackoff): a new session is refused at once, and attaches after it."""
    async with open_session(daemon.config.socket, "evil") as s:
        raw, _ = await attach_raw(s, XVDA)
        ro, _ = await attach_raw(s, XVDB)
        be, _ = paths(s, XVDA)
        backend = backend_device(daemon, "evil", XVDA)
        backend.driver.conn.queues[0].channel.notify = blocked_send
        _, ref, _ = raw.page()
        raw.send(rw_req(R, 1, 0, [(ref, 0, 7)]))  # answered, then the notify fails
        await wait_state(s.xs, f"{be}/state", lambda st: st in (S.Closing, S.Closed))
        assert "waited" in backend.status.last_error
        _, ref2, _ = ro.page()
        assert await ro.call(rw_req(R, 2, 0, [(ref2, 0, 7)])) == [(2, R, OK)]
        await cotenant.progress(5)
    await _backs_off_then_attaches_again(daemon)


async def test_regression_a_frontend_that_stalls_the_bind_backs_off_too(daemon, monkeypatch):
    """bind_interdomain raises the new port on an eventfd the frontend handed
    over; a frontend that blocks that send stalls the daemon for the guard's
    timeout at every connect. It was refused like any bad connect, with no
    back-off, so it could stall the daemon once per handshake. (Review finding.)"""
    from pvio.ring import EventChannel

    monkeypatch.setattr(EventChannel, "set_pending", blocked_send)
    async with open_session(daemon.config.socket, "evil") as s:
        with pytest.raises(DeviceError, match="closed before it connected"):
            await attach_blk(s)
        assert backend_device(daemon, "evil", XVDA).backoff.count == 1
    monkeypatch.undo()
    await _backs_off_then_attaches_again(daemon)


async def test_regression_two_queues_breaking_at_once_close_the_device_once(daemon, cotenant):
    # Both queue services found their ring broken and called on_failure together; the
    # second disconnect found conn already None mid-stop and the daemon died with
    # AttributeError (found by the netback tests, shared RingBackendDriver.disconnect).
    async with open_session(daemon.config.socket, "evil") as s:
        raw, device = await attach_raw(s, XVDA, queues=2)
        assert len(raw.queues) == 2
        be, _ = paths(s, XVDA)
        for q in range(2):
            area = raw.area(0, q)
            prod = int.from_bytes(area[0:4], "little")
            area[0:4] = ((prod + 1000) & 0xFFFFFFFF).to_bytes(4, "little")
        for q in range(2):
            raw.queues[q].channel.notify()
        await wait_state(s.xs, f"{be}/state", lambda st: st in (S.Closing, S.Closed))
        with trio.fail_after(5):
            await device.closed.wait()
        assert backend_device(daemon, "evil", XVDA).driver.conn is None
        await cotenant.progress(5)  # the daemon is alive and serving


async def test_regression_a_frontend_that_keeps_the_ring_busy_does_not_starve_the_daemon(
        daemon, cotenant):
    """A frontend in another thread (as if in another process) refills its ring
    as fast as answers come back. With the inline fast path and busy-poll the
    vbd's service never reached a trio checkpoint: it always found more work,
    and every other task of the daemon (here the co-tenant's device) starved."""
    async with open_session(daemon.config.socket, "evil") as s:
        raw, _ = await attach_raw(s, XVDA)
        _, ref, _ = raw.page()
        ring, channel = raw.ring, raw.channel
        stop = threading.Event()
        answered = [0]

        def refill() -> None:
            rid = 0
            while not stop.is_set():
                answered[0] += len(ring.take_responses()) // blkif.RSP_SIZE
                reqs = []
                while ring.free_requests > len(reqs):
                    reqs.append(rw_req(R, rid, 0, [(ref, 0, 7)]))
                    rid += 1
                if reqs:
                    _, notify = ring.produce(b"".join(reqs))
                    if notify:
                        channel.notify()

        thread = threading.Thread(target=refill)
        thread.start()
        try:
            await cotenant.progress(3, timeout=10)
        finally:
            stop.set()
            await trio.to_thread.run_sync(thread.join)
        assert answered[0] > 0
        assert backend_device(daemon, "evil").status.state == S.Connected
