"""blkfront end to end, and against a hostile backend.

- Round trips at aligned and unaligned offsets and sizes (1 byte .. several MiB,
  hand-picked and hypothesis-drawn), checked against a model and against the
  image file the backend writes; 64 concurrent writers and readers; bounds.
- Errors are plain :class:`BlkDeviceError` (an ``OSError``), not exception groups.
- Multi-page rings (order 2: 128 slots, all usable at once) and multi-queue.
- :class:`BlockDevice` (``io.RawIOBase``) with ``shutil.copyfileobj`` through a
  :class:`BlockingSession` against a ``python -m pvio serve`` subprocess.
- Hostile backend (hardening.md #11): the vbd service of an in-process daemon is
  replaced by one that answers with an id out of range, an id not outstanding, a
  duplicate, a wrong operation, or an impossible ``rsp_prod``. The BlkFront goes
  to an error state, every pending caller gets BlkDeviceError promptly, and
  later calls raise BlkDeviceError.
- Batches (``read_many``/``write_many``) and zero-copy ``PoolBuffer``s, checked
  against the image file: their requests name the buffer's own grants, foreign
  or closed buffers are refused, a cancelled batch frees every slot.
"""

from __future__ import annotations

import functools
import io
import os
import random
import shutil
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvio.backends import blkback
from pvio.backends.blkback import BlkBackend
from pvio.frontends.blkfront import BlkDeviceError, BlockDevice, PoolBuffer
from pvio.frontends.session import BlockingSession, open_session
from pvio.layouts import BlkifOp, BlkifRsp
from pvio.ring import wait_for_work
from tests.blk_helpers import (
    RSP,
    U64,
    XVDA,
    XVDB,
    attach_blk,
    backend_device,
    blk_error,
    domain,
    leaves,
    paths,
    slow_backend,
    vbd,
)
from tests.evtchn_helpers import blocked_send
from tests.pvio_daemon import ServeProcess, running_daemon, short_tmpdir, watchdog

MIB = 1 << 20
DISK = 8 * MIB
CONFIG = "\n".join([
    domain("g", vbd(XVDA, "g-xvda.img", "8M"), vbd(XVDB, "g-xvdb.img", "1M", "r")),
    domain("ro", vbd(XVDA, "ro-xvda.img", "1M", "r")),
])


@pytest.fixture
async def daemon():
    async with watchdog(30, "blkfront test"), running_daemon(CONFIG) as daemon:
        yield daemon


@pytest.fixture
async def front(daemon):
    async with open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session)
        yield front


def image_bytes(daemon, name: str = "g", devid: int = XVDA) -> bytes:
    with open(backend_device(daemon, name, devid).driver.image, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------- round trips


CASES = [
    (0, 1), (1, 1), (511, 1), (511, 2), (0, 512), (512, 512), (100, 512), (0, 4096),
    (4095, 2), (4096, 4096 * 11), (4096, 4096 * 11 + 1), (3, 4096 * 12), (0, 4096 * 32),
    (0, 4096 * 32 + 512), (777, 4096 * 33), (12345, MIB), (1, 3 * MIB + 5),
    (DISK - 1, 1), (DISK - 513, 513), (DISK - 5 * MIB, 5 * MIB), (0, DISK),
]


@pytest.mark.parametrize(("offset", "length"), CASES)
async def test_round_trip(daemon, front, offset, length):
    data = random.Random(offset * 31 + length).randbytes(length)
    before = image_bytes(daemon)
    assert await front.write(offset, data) == length
    assert await front.read(offset, length) == data
    assert image_bytes(daemon) == before[:offset] + data + before[offset + length:]
    buf = bytearray(length + 10)
    assert await front.readinto(offset, memoryview(buf)[5:5 + length]) == length
    assert buf[5:5 + length] == data and buf[:5] == buf[-5:] == bytes(5)


async def test_zero_length_transfers(front):
    await front.write(123, b"")
    assert await front.read(123, 0) == b""
    assert await front.read(DISK, 0) == b""


@pytest.mark.parametrize(("offset", "length"), [
    (-1, 1), (DISK, 1), (DISK - 1, 2), (0, DISK + 1), (1 << 63, 1), (-(1 << 40), 10),
])
async def test_out_of_bounds_is_refused(front, offset, length):
    with pytest.raises(BlkDeviceError):
        await front.read(offset, length)
    with pytest.raises(BlkDeviceError):
        await front.write(offset, b"x" * length)
    with pytest.raises(BlkDeviceError):
        await front.discard(offset, length)


OFFSETS = st.one_of(st.integers(0, 4096), st.integers(0, DISK - 1),
                    st.sampled_from([DISK - 1, DISK - 512, 4095, 4096, 45056]))
LENGTHS = st.one_of(st.integers(1, 600), st.integers(1, 70_000), st.integers(1, 3 * MIB))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.booleans(), OFFSETS, LENGTHS, st.integers(0, 255)),
                    min_size=1, max_size=6))
async def test_round_trips_against_a_model(ops):
    """Random writes and reads (any offset and size) behave like a bytearray,
    and the image file is that bytearray."""
    async with running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session)
        model = bytearray(DISK)
        for is_write, offset, length, seed in ops:
            length = min(length, DISK - offset)
            if is_write:
                data = random.Random(seed).randbytes(length)
                await front.write(offset, data)
                model[offset:offset + length] = data
            else:
                assert await front.read(offset, length) == model[offset:offset + length]
        assert await front.read(0, DISK) == model
        assert image_bytes(daemon) == model


# ---------------------------------------------------------------------- concurrency


async def test_64_concurrent_writers_then_readers(daemon, front):
    rng = random.Random(64)
    # disjoint regions, unaligned inside, never sharing a sector with another task
    regions = [(i * 120_000 + rng.randrange(0, 1000), rng.randrange(1, 110_000))
               for i in range(64)]
    datas = [rng.randbytes(n) for _, n in regions]

    async def write(i):
        await front.write(regions[i][0], datas[i])

    async def read(i, out):
        out[i] = await front.read(*regions[i])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(write, i)
        got = {}
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(read, i, got)
    assert all(got[i] == datas[i] for i in range(64))
    disk = image_bytes(daemon)
    assert all(disk[o:o + n] == datas[i] for i, (o, n) in enumerate(regions))


async def test_concurrent_mixed_readers_and_writers(daemon, front):
    """32 writers and 32 readers at once, on separate halves of the disk."""
    half = DISK // 2
    stable = random.Random(1).randbytes(half)
    await front.write(0, stable)
    fresh = [random.Random(100 + i).randbytes(65536 + i) for i in range(32)]
    errors = []

    async def writer(i):
        await front.write(half + i * 70_000 + i, fresh[i])

    async def reader(i):
        for _ in range(3):
            off = (i * 61_333) % (half - 200_000)
            if await front.read(off, 150_000 + i) != stable[off:off + 150_000 + i]:
                errors.append(i)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(writer, i)
                nursery.start_soon(reader, i)
    assert not errors
    disk = image_bytes(daemon)
    for i in range(32):
        off = half + i * 70_000 + i
        assert disk[off:off + len(fresh[i])] == fresh[i]


async def test_concurrent_sub_sector_writes_to_disjoint_bytes(front):
    """64 tasks each write their own 8 bytes of the same 512-byte sector. Each
    unaligned write is a read-modify-write of the whole sector; without
    serialising overlapping read-modify-writes, the tasks overwrite each other's
    bytes with the stale copies they read, and writes that "succeeded" are lost."""
    async def write(i):
        await front.write(i * 8, bytes([i + 1]) * 8)

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(write, i)
    got = await front.read(0, 512)
    lost = [i for i in range(64) if got[i * 8:i * 8 + 8] != bytes([i + 1]) * 8]
    assert not lost, f"{len(lost)} of 64 acknowledged writes lost"


# ---------------------------------------------------------------------- errors


async def test_io_errors_are_plain_blk_device_errors(daemon, front, monkeypatch):
    """BlkDeviceError is an OSError callers (and io's RawIOBase users) catch with
    ``except OSError``; a failed read or write must raise it, not an
    ExceptionGroup from the nursery that splits a transfer into requests."""
    monkeypatch.setattr(blkback.log, "propagate", False)

    def failing(*args):
        raise OSError(5, "injected EIO")

    monkeypatch.setattr(blkback.BlkBackend, "inline_io", False)  # the worker-thread path
    monkeypatch.setattr(blkback.os, "preadv", failing)
    monkeypatch.setattr(blkback.os, "pwritev", failing)
    with pytest.raises(BlkDeviceError):
        await front.read(0, 4096)
    with pytest.raises(BlkDeviceError):
        await front.write(0, b"x" * 4096)
    with pytest.raises(OSError):
        await front.read(0, 2 * MIB)  # many requests, all failing


async def test_backend_error_does_not_disable_the_device(daemon, front, monkeypatch):
    monkeypatch.setattr(blkback.log, "propagate", False)
    real = os.preadv
    fail = {"on": True}

    def preadv(fd, buffers, offset):
        if fail["on"]:
            raise OSError(5, "injected EIO")
        return real(fd, buffers, offset)

    await front.write(0, b"data")
    monkeypatch.setattr(blkback.BlkBackend, "inline_io", False)  # the worker-thread path
    monkeypatch.setattr(blkback.os, "preadv", preadv)
    with blk_error("backend status -1"):
        await front.read(0, 4)
    fail["on"] = False
    assert front.error is None
    assert await front.read(0, 4) == b"data"


async def test_read_only_device(daemon):
    async with open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session, XVDB)
        assert front.readonly and front.size == MIB
        assert not front.features["feature-discard"]
        with pytest.raises(BlkDeviceError, match="read-only"):
            await front.write(0, b"x")
        with pytest.raises(BlkDeviceError, match="read-only"):
            await front.write(4096, bytes(8192))
        assert await front.read(0, 4096) == bytes(4096)
        await front.discard(0, 4096)  # not advertised: ignored
        assert image_bytes(daemon, "g", XVDB) == bytes(MIB)


async def test_large_sector_disk():
    """A disk with 4096-byte sectors (feature-large-sector-size): unaligned I/O
    is read-modify-written in 4 KiB sectors."""
    config = domain("big", vbd(XVDA, "big.img", "4M").replace(
        'mode = "w"\n', 'mode = "w"\n  sector_size = 4096\n'))
    async with watchdog(20), running_daemon(config) as daemon2, \
            open_session(daemon2.config.socket, "big") as session:
        front, _ = await attach_blk(session)
        assert front.sector_size == 4096 and front.size == 4 * MIB
        model = bytearray(4 * MIB)
        rng = random.Random(4096)
        for offset, length in [(1, 1), (4095, 2), (5000, 100_000), (0, 4096), (12288, 200_000),
                               (4 * MIB - 3, 3)]:
            data = rng.randbytes(length)
            await front.write(offset, data)
            model[offset:offset + length] = data
            assert await front.read(offset, length) == data
        with pytest.raises(BlkDeviceError):
            await front.discard(512, 4096)  # not a whole 4 KiB sector
        await front.discard(8192, 8192)
        model[8192:16384] = bytes(8192)
        assert await front.read(0, 4 * MIB) == model
        assert image_bytes(daemon2, "big") == model


# ---------------------------------------------------------------------- ring shapes


async def test_multi_page_ring_has_128_usable_slots(monkeypatch):
    """Order 2: 128 slots, and all 128 can be in flight at once (the fake
    backend answers nothing until it holds 128 requests)."""
    held = []

    async def behaviour(be):
        held.extend(await be.collect(128))
        be.respond(*[(rid, op, BlkifRsp.OKAY) for rid, op in held])
        while True:  # then a plain "everything is fine" backend
            reqs = be.requests[len(held):]
            if reqs:
                held.extend(reqs)
                be.respond(*[(rid, op, BlkifRsp.OKAY) for rid, op in reqs])
            await be.collect(len(held) + 1)

    monkeypatch.setattr(BlkBackend, "_serve", hostile_service(behaviour))
    async with watchdog(20), running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session, ring_page_order=2)
        assert front.ring.nr_ents == 128
        _, fe = paths(session)
        assert await session.xs.read(f"{fe}/ring-page-order") == b"2"
        assert len(backend_device(daemon, "g").driver.conn.mappings[0].refs) == 4

        async def write(i):
            await front.write(i * 4096, bytes([i]) * 4096)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for i in range(128):
                    nursery.start_soon(write, i)
        assert len({rid for rid, _ in held}) == 128


async def test_multi_queue(daemon):
    async with open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session, queues=2)
        assert len(front.rings) == 2
        driver = backend_device(daemon, "g").driver
        assert len(driver.conn.queues) == 2
        datas = [random.Random(i).randbytes(100_000) for i in range(16)]

        async def write(i):
            await front.write(i * 131072, datas[i])

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(write, i)
        disk = image_bytes(daemon)
        assert all(disk[i * 131072:i * 131072 + 100_000] == datas[i] for i in range(16))
        assert sum(r.req_prod_pvt for r in front.rings) >= 16
        assert all(r.req_prod_pvt > 0 for r in front.rings)


# ---------------------------------------------------------------------- blocking facade


@pytest.fixture(scope="module")
def serve():
    """``python -m pvio serve`` in a short temporary directory, stopped by pid."""
    with short_tmpdir() as root:
        conf = root / "pvio.toml"
        conf.write_text(CONFIG)
        proc = ServeProcess(root, "--config", str(conf))
        proc.start()
        try:
            yield proc
        except BaseException:
            proc.kill()
            raise
        proc.stop()
        proc.assert_graceful()


def test_blockdevice_copyfileobj_through_blocking_session(serve, tmp_path):
    data = random.Random(2).randbytes(3 * MIB + 12345)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    with BlockingSession(serve.socket, "g") as bs:
        front, device = bs.call(functools.partial(attach_blk, bs.session))
        dev = BlockDevice(front, bs.call)
        assert dev.readable() and dev.writable() and dev.seekable()
        with open(src, "rb") as f:
            shutil.copyfileobj(f, dev, 100_003)  # odd chunk size: unaligned writes
        assert dev.tell() == len(data)
        dev.flush()
        image = os.path.join(serve.data_dir, "g-xvda.img")
        with open(image, "rb") as f:
            assert f.read(len(data)) == data
        assert dev.seek(0) == 0
        out = io.BytesIO()
        shutil.copyfileobj(dev, out)  # reads up to the end of the disk
        assert out.getvalue() == data + bytes(DISK - len(data))
        assert dev.seek(-10, io.SEEK_END) == DISK - 10
        assert dev.read(100) == bytes(10)
        assert dev.read(100) == b""
        with pytest.raises(OSError):
            dev.write(b"x" * 11)  # past the end of the disk
        buffered = io.BufferedRandom(dev)
        buffered.seek(1000)
        buffered.write(b"hello, pvio")
        buffered.flush()
        buffered.seek(995)
        assert buffered.read(16) == data[995:1000] + b"hello, pvio"
        buffered.close()
        assert dev.closed
        bs.call(device.close)
    with open(image, "rb") as f:
        f.seek(1000)
        assert f.read(11) == b"hello, pvio"


def test_blockdevice_on_a_read_only_disk_closes_cleanly(serve):
    """RawIOBase.close() flushes: on a read-only disk that must not raise."""
    with BlockingSession(serve.socket, "ro") as bs:
        front, device = bs.call(functools.partial(attach_blk, bs.session))
        dev = BlockDevice(front, bs.call)
        assert not dev.writable()
        assert dev.read(4096) == bytes(4096)
        with pytest.raises(OSError):
            dev.write(b"x")
        dev.close()
        bs.call(device.close)


# ---------------------------------------------------------------------- hostile backend


class FakeBackend:
    """What a hostile vbd service sees: the backend ring of queue 0 and its channel."""

    def __init__(self, driver, ring, channel, queue: int = 0) -> None:
        self.driver = driver
        self.ring = ring
        self.channel = channel
        self.queue = queue
        self.requests: list[tuple[int, int]] = []  # (id, operation)

    async def collect(self, n: int) -> list[tuple[int, int]]:
        while len(self.requests) < n:
            batch = bytes(self.ring.take_requests())
            if not batch:
                await wait_for_work(self.ring, self.channel)
                continue
            for i in range(0, len(batch), 112):
                op, rid = batch[i], struct.unpack_from("<Q", batch, i + 8)[0]
                self.requests.append((rid, op))
        return self.requests

    def respond(self, *responses: tuple[int, int, int]) -> None:
        put, _ = self.ring.produce(b"".join(RSP.pack(*r) for r in responses))
        assert put == len(responses)
        self.channel.notify()  # always: a hostile backend need not be polite

    def set_rsp_prod(self, value: int) -> None:
        struct.pack_into("<I", self.driver.conn.mappings[0].buf, 8, value & 0xFFFFFFFF)
        self.channel.notify()


def hostile_service(behaviour):
    """A replacement for BlkBackend._serve that runs ``behaviour(FakeBackend)``."""

    async def _serve(self, ring, channel, queue, stopped, *,
                     task_status=trio.TASK_STATUS_IGNORED):
        try:
            with trio.CancelScope() as scope:
                self._wait_scopes[queue] = scope  # BlkBackend.stop() cancels it
                task_status.started()
                await behaviour(FakeBackend(self, ring, channel, queue))
                await trio.sleep_forever()
        finally:
            self._wait_scopes.pop(queue, None)
            stopped.set()

    return _serve


async def _caller(front, kind: str, i: int, outcomes: dict) -> None:
    try:
        if kind == "read":
            await front.read(i * 8192 + 100, 3000)
        elif kind == "bigread":
            await front.read(MIB, 300_000)  # several requests
        elif kind == "write":
            await front.write(2 * MIB, b"w" * 65536)  # indirect
        elif kind == "flush":
            await front.flush()
        elif kind == "discard":
            await front.discard(3 * MIB, 4096)
        outcomes[i] = "ok"
    except BaseException as exc:
        found = leaves(exc)
        if all(isinstance(e, BlkDeviceError) for e in found):
            outcomes[i] = "BlkDeviceError"
        elif all(isinstance(e, trio.Cancelled) for e in found):
            raise
        else:
            outcomes[i] = repr(exc)


KINDS = ["read", "write", "flush", "discard", "read", "bigread"]


async def run_against_hostile_backend(monkeypatch, behaviour, kinds=KINDS,
                                      expect_ok: int = 0, **front_options):
    monkeypatch.setattr(BlkBackend, "_serve", hostile_service(behaviour))
    async with watchdog(30), running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session, **front_options)
        outcomes: dict[int, str] = {}
        with trio.fail_after(5):  # every caller finishes promptly
            async with trio.open_nursery() as nursery:
                for i, kind in enumerate(kinds):
                    nursery.start_soon(_caller, front, kind, i, outcomes)
        assert len(outcomes) == len(kinds)
        assert sorted(outcomes.values()) == sorted(
            ["ok"] * expect_ok + ["BlkDeviceError"] * (len(kinds) - expect_ok)), outcomes
        assert front.error, "the device is not in an error state"
        # later calls fail at once (plain BlkDeviceError, nothing sent)
        with trio.fail_after(1):
            with pytest.raises(BlkDeviceError):
                await front.read(0, 512)
            with pytest.raises(BlkDeviceError):
                await front.write(0, b"x")
            with pytest.raises(BlkDeviceError):
                await front.flush()
            with pytest.raises(BlkDeviceError):
                await front.discard(0, 4096)
        return front


def _nreq(kinds) -> int:
    """Requests the callers put on the ring at once (bigread: 3 requests of 32 pages)."""
    return sum(3 if k == "bigread" else 1 for k in kinds)


NREQ = _nreq(KINDS)


async def test_hostile_response_id_out_of_range(monkeypatch):
    async def behaviour(be):
        reqs = await be.collect(NREQ)
        be.respond((be.ring.nr_ents + 5, reqs[0][1], BlkifRsp.OKAY))

    front = await run_against_hostile_backend(monkeypatch, behaviour)
    assert "not outstanding" in front.error


async def test_hostile_response_id_huge(monkeypatch):
    async def behaviour(be):
        reqs = await be.collect(NREQ)
        be.respond((U64, reqs[0][1], BlkifRsp.OKAY))

    await run_against_hostile_backend(monkeypatch, behaviour)


async def test_hostile_response_id_not_outstanding(monkeypatch):
    async def behaviour(be):
        reqs = await be.collect(NREQ)
        idle = next(i for i in range(be.ring.nr_ents) if i not in {r for r, _ in reqs})
        be.respond((idle, BlkifOp.READ, BlkifRsp.OKAY))

    await run_against_hostile_backend(monkeypatch, behaviour)


async def test_hostile_duplicate_response_in_one_batch(monkeypatch):
    kinds = ["read", "write", "flush", "discard", "read", "read"]

    async def behaviour(be):
        reqs = await be.collect(len(kinds))
        rid, op = reqs[0]
        be.respond((rid, op, BlkifRsp.OKAY), (rid, op, BlkifRsp.OKAY))

    # the first answer was legitimate: that caller (a one-request call) succeeds
    await run_against_hostile_backend(monkeypatch, behaviour, kinds, expect_ok=1)


async def test_hostile_duplicate_response_after_completion(monkeypatch):
    kinds = ["read", "write", "flush", "discard", "read", "read"]

    async def behaviour(be):
        reqs = await be.collect(len(kinds))
        rid, op = reqs[0]
        be.respond((rid, op, BlkifRsp.OKAY))
        await trio.sleep(0.2)  # that caller is done and its slot is free again
        be.respond((rid, op, BlkifRsp.OKAY))

    await run_against_hostile_backend(monkeypatch, behaviour, kinds, expect_ok=1)


async def test_hostile_response_with_the_wrong_operation(monkeypatch):
    async def behaviour(be):
        reqs = await be.collect(NREQ)
        rid, op = reqs[0]
        be.respond((rid, BlkifOp.WRITE if op != BlkifOp.WRITE else BlkifOp.READ,
                    BlkifRsp.OKAY))

    front = await run_against_hostile_backend(monkeypatch, behaviour)
    assert "operation" in front.error


async def test_hostile_indirect_answered_as_plain_write(monkeypatch):
    async def behaviour(be):
        reqs = await be.collect(1)
        rid, op = reqs[0]
        assert op == BlkifOp.INDIRECT
        be.respond((rid, BlkifOp.WRITE, BlkifRsp.OKAY))

    await run_against_hostile_backend(monkeypatch, behaviour, ["write"])


@pytest.mark.parametrize("jump", ["overflow", "far", "backwards", "more_than_requests"])
async def test_hostile_rsp_prod(monkeypatch, jump):
    async def behaviour(be):
        reqs = await be.collect(NREQ)
        prod = be.ring.rsp_prod_pvt
        be.set_rsp_prod({"overflow": prod + be.ring.nr_ents + 1,
                         "far": prod + 0x80000000,
                         "backwards": prod - 1,
                         "more_than_requests": prod + len(reqs) + 1}[jump])

    front = await run_against_hostile_backend(monkeypatch, behaviour)
    assert "ring" in front.error


async def test_hostile_response_on_the_wrong_queue(monkeypatch):
    """With two queues, an id outstanding on queue 1 answered on queue 0."""
    seen: dict[int, list] = {}
    both = trio.Event()

    async def behaviour(be):
        seen[be.queue] = await be.collect(1)
        if len(seen) == 2:
            both.set()
        await both.wait()
        if be.queue == 0:
            rid, op = seen[1][0]
            be.respond((rid, op, BlkifRsp.OKAY))

    front = await run_against_hostile_backend(monkeypatch, behaviour, ["read"] * 6, queues=2)
    assert "not outstanding" in front.error


async def test_hostile_backend_with_more_callers_than_slots(monkeypatch):
    """40 callers on a 32-slot ring: 32 in flight, 8 waiting for a slot; all fail."""
    async def behaviour(be):
        reqs = await be.collect(be.ring.nr_ents)
        be.respond((be.ring.nr_ents + 1, reqs[0][1], BlkifRsp.OKAY))

    await run_against_hostile_backend(monkeypatch, behaviour, ["read"] * 40)


async def test_silent_backend_that_closes_fails_pending_callers(monkeypatch):
    """A backend that never answers and then closes the device: nobody hangs."""
    async def behaviour(be):
        await be.collect(4)
        # as blkback does it: from the device's nursery, not from the service itself
        be.driver.nursery.start_soon(be.driver.on_failure, "test: backend gives up")

    monkeypatch.setattr(BlkBackend, "_serve", hostile_service(behaviour))
    async with watchdog(30), running_daemon(CONFIG) as daemon, \
            open_session(daemon.config.socket, "g") as session:
        front, device = await attach_blk(session)
        outcomes: dict[int, str] = {}
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(_caller, front, "read", i, outcomes)
        assert list(outcomes.values()) == ["BlkDeviceError"] * 4
        with trio.fail_after(5):
            await device.closed.wait()
        with pytest.raises(BlkDeviceError):
            await front.read(0, 512)


# ------------------------------------------- batches (read_many/write_many), PoolBuffers


async def test_a_backend_that_blocks_our_notification_disables_only_that_vbd(daemon):
    """Under the send guard, a notification the backend blocked (its eventfd
    made blocking and saturated between our poll and our write) raises
    EventChannelBlockedError. blkfront let it escape from read and write and
    kept using the device; now it disables the device as for a broken ring:
    the caller gets BlkDeviceError, so do later calls, and the session's
    other vbd keeps working."""
    async with open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session)
        other, _ = await attach_blk(session, XVDB)
        front.queues[0].channel.notify = blocked_send
        with trio.fail_after(5), pytest.raises(BlkDeviceError, match="waited"):
            await front.write(0, b"x" * 4096)
        assert "waited" in front.error
        with pytest.raises(BlkDeviceError, match="unusable"):
            await front.read(0, 512)
        assert await other.read(0, 4096) == image_bytes(daemon, devid=XVDB)[:4096]


async def test_write_many_then_read_many_match_the_image(daemon, front):
    """More items than the ring has slots, sizes from one sector to several
    slots' worth: every one lands where it should."""
    rng = random.Random(5)
    offsets = rng.sample(range(0, 7 * MIB // 65536), 100)  # disjoint, below the last item
    items = [(o * 65536, rng.randbytes(rng.choice([512, 4096, 12288, 65536]))) for o in offsets]
    items.append((7 * MIB, rng.randbytes(300 * 1024)))  # split into several requests
    await front.write_many(items)
    disk = image_bytes(daemon)
    assert all(disk[o:o + len(d)] == d for o, d in items)
    bufs = [bytearray(len(d)) for _, d in items]
    await front.read_many([(o, b) for (o, _), b in zip(items, bufs, strict=True)])
    assert [bytes(b) for b in bufs] == [d for _, d in items]


async def test_pool_buffers_move_data_without_a_copy(daemon, front):
    with front.buffer(20 * 4096) as buf:
        assert isinstance(buf, PoolBuffer) and len(buf) == 20 * 4096
        data = random.Random(1).randbytes(len(buf))
        buf.view[:] = data
        await front.write(4096, buf)
        assert image_bytes(daemon)[4096:4096 + len(data)] == data
        buf.view[:] = bytes(len(buf))
        await front.readinto(4096, buf)
        assert bytes(buf.view) == data
        # and in batches, mixed with plain buffers
        with front.buffer(4096) as small:
            plain = bytearray(4096)
            await front.read_many([(0, small), (4096, plain), (8192, buf)])
            assert bytes(small.view) == image_bytes(daemon)[:4096]
            assert plain == data[:4096]
            assert bytes(buf.view) == image_bytes(daemon)[8192:8192 + len(buf)]


async def test_pool_buffer_requests_name_the_buffers_own_grants(daemon, front):
    """Zero copy means the backend is handed the PoolBuffer's pages: reading
    into it must not touch the ring slots' pages at all."""
    with front.buffer(8192) as buf:
        for slot in front._slots:
            slot.pages[:] = b"\xaa" * len(slot.pages)
        await front.readinto(0, buf)
        assert bytes(buf.view) == image_bytes(daemon)[:8192]
        assert all(bytes(slot.pages) == b"\xaa" * len(slot.pages) for slot in front._slots)


async def test_closed_pool_buffer_and_foreign_buffers_are_refused(daemon, front):
    buf = front.buffer(4096)
    buf.close()
    with pytest.raises(BlkDeviceError, match="closed"):
        await front.readinto(0, buf)
    async with open_session(daemon.config.socket, "ro") as other:
        front2, _ = await attach_blk(other)
        with front2.buffer(4096) as theirs, pytest.raises(BlkDeviceError, match="another"):
            await front.readinto(0, theirs)


async def test_batches_must_be_sector_aligned_and_in_bounds(front):
    with pytest.raises(BlkDeviceError, match="aligned"):
        await front.read_many([(0, bytearray(512)), (100, bytearray(512))])
    with pytest.raises(BlkDeviceError, match="outside"):
        await front.write_many([(8 * MIB, b"x" * 512)])


async def test_write_many_on_a_read_only_disk(daemon):
    async with open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session, XVDB)
        with pytest.raises(BlkDeviceError, match="read-only"):
            await front.write_many([(0, b"x" * 512)])


async def test_cancelled_batch_frees_every_slot(daemon, front, monkeypatch):
    """A batch cancelled mid-flight (more items than slots: some submitted and
    held by a slow backend, the rest waiting for a slot) gives every slot back
    once the answers are in, and nothing is copied into the abandoned buffers."""
    await front.write(0, b"\x5a" * (100 * 65536))  # so a copy into a buffer would show
    slow_backend(monkeypatch, 0.2)
    bufs = [bytearray(65536) for _ in range(100)]
    with trio.move_on_after(0.05) as scope:
        await front.read_many([(i * 65536, b) for i, b in enumerate(bufs)])
    assert scope.cancelled_caught
    assert len(front._free) < len(front._slots)  # the backend still holds some
    with trio.fail_after(10):
        while len(front._free) != len(front._slots):
            await trio.sleep(0.01)
    assert not any(any(b) for b in bufs)
    assert await front.read(0, 512) == image_bytes(daemon)[:512]
    assert front.error is None


async def test_many_callers_with_large_batches_do_not_deadlock(daemon, front):
    """Each call takes only the slots that are free and never waits for more
    while holding unsubmitted ones: eight callers of 3x the ring complete."""
    async def caller(k):
        await front.read_many([((k * 96 + i) * 4096, bytearray(4096)) for i in range(96)])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(caller, k)
    assert len(front._free) == len(front._slots)
