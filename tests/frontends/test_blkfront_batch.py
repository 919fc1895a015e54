"""blkfront's batch calls (read_many/write_many) and zero-copy PoolBuffers,
end to end against an in-process daemon, checked against the image file."""

from __future__ import annotations

import random

import pytest
import trio

from pvio.frontends.blkfront import BlkDeviceError, PoolBuffer
from pvio.frontends.session import open_session
from tests.blk_helpers import XVDA, XVDB, attach_blk, backend_device, domain, slow_backend, vbd
from tests.pvio_daemon import running_daemon, watchdog

MIB = 1 << 20
CONFIG = "\n".join([domain("g", vbd(XVDA, "g-xvda.img", "8M"), vbd(XVDB, "g-xvdb.img", "1M", "r")),
                    domain("h", vbd(XVDA, "h-xvda.img", "1M"))])


@pytest.fixture
async def daemon():
    async with watchdog(30, "blkfront batch test"), running_daemon(CONFIG) as daemon:
        yield daemon


@pytest.fixture
async def front(daemon):
    async with open_session(daemon.config.socket, "g") as session:
        front, _ = await attach_blk(session)
        yield front


def image(daemon, devid: int = XVDA) -> bytes:
    with open(backend_device(daemon, "g", devid).driver.image, "rb") as f:
        return f.read()


async def test_write_many_then_read_many_match_the_image(daemon, front):
    """More items than the ring has slots, sizes from one sector to several
    slots' worth: every one lands where it should."""
    rng = random.Random(5)
    offsets = rng.sample(range(0, 7 * MIB // 65536), 100)  # disjoint, below the last item
    items = [(o * 65536, rng.randbytes(rng.choice([512, 4096, 12288, 65536]))) for o in offsets]
    items.append((7 * MIB, rng.randbytes(300 * 1024)))  # split into several requests
    await front.write_many(items)
    disk = image(daemon)
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
        assert image(daemon)[4096:4096 + len(data)] == data
        buf.view[:] = bytes(len(buf))
        await front.readinto(4096, buf)
        assert bytes(buf.view) == data
        # and in batches, mixed with plain buffers
        with front.buffer(4096) as small:
            plain = bytearray(4096)
            await front.read_many([(0, small), (4096, plain), (8192, buf)])
            assert bytes(small.view) == image(daemon)[:4096]
            assert plain == data[:4096]
            assert bytes(buf.view) == image(daemon)[8192:8192 + len(buf)]


async def test_pool_buffer_requests_name_the_buffers_own_grants(daemon, front):
    """Zero copy means the backend is handed the PoolBuffer's pages: reading
    into it must not touch the ring slots' pages at all."""
    with front.buffer(8192) as buf:
        for slot in front._slots:
            slot.pages[:] = b"\xaa" * len(slot.pages)
        await front.readinto(0, buf)
        assert bytes(buf.view) == image(daemon)[:8192]
        assert all(bytes(slot.pages) == b"\xaa" * len(slot.pages) for slot in front._slots)


async def test_closed_pool_buffer_and_foreign_buffers_are_refused(daemon, front):
    buf = front.buffer(4096)
    buf.close()
    with pytest.raises(BlkDeviceError, match="closed"):
        await front.readinto(0, buf)
    async with open_session(daemon.config.socket, "h") as other:
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
    assert await front.read(0, 512) == image(daemon)[:512]
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
