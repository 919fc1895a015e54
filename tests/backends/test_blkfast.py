"""blkback's C fast path (pvio/ring/cblk.c) against the reference path.

For random requests -- valid ones, and ones that break each validation rule,
with grants that are good, read-only, for another domain or out of range --
the fast path must serve exactly the requests the reference path
(:func:`pvio.blkif.parse_request` plus Xen's grant checks) accepts, move the
same bytes, answer OKAY with the request's id and operation, and leave no pin
and no GTF_reading/GTF_writing behind. Everything else it must hand back.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pvio import blkif
from pvio.backends._blkfast import NOT_FAST, WOULD_BLOCK, BlkFastPath
from pvio.blkif import BackendFeatures, BlkError, parse_request
from pvio.layouts import GTF, XEN_PAGE_SIZE, BlkifOp
from pvio.ring import GrantError, GrantMapper, GrantTable, PagePool, SharedMemory
from pvio.ring._lib import ffi

DOMID = 0
FRAMES = 24
DISK = 40 * XEN_PAGE_SIZE + 1024  # not a whole number of pages: the end matters
MAX_INDIRECT = 32


class Rig:
    """A granter (table + pool), our mapper, and an image file."""

    def __init__(self, directory: str, sector_size: int = 512, readonly: bool = False) -> None:
        self.table = GrantTable.create(64)
        self.pool = PagePool(SharedMemory.create(FRAMES * XEN_PAGE_SIZE))
        self.mapper = GrantMapper(self.table.shm, self.pool.shm, DOMID)
        self.path = os.path.join(directory, "disk.img")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.pwrite(self.fd, os.urandom(DISK), 0)
        self.feats = BackendFeatures(sectors=DISK // sector_size, sector_size=sector_size,
                                     readonly=readonly, max_indirect_segments=MAX_INDIRECT)
        self.fast = BlkFastPath(self.mapper, self.fd, self.feats)
        frames = [self.pool.alloc() for _ in range(FRAMES)]
        self.pool.shm.buf[:] = os.urandom(FRAMES * XEN_PAGE_SIZE)
        self.rw = [self.table.grant_access(DOMID, f) for f in frames[:12]]
        self.ro = [self.table.grant_access(DOMID, f, readonly=True) for f in frames[12:16]]
        self.foreign = [self.table.grant_access(7, f) for f in frames[16:18]]
        # an indirect page per ref, read-only as blkfront grants them
        self.indirect = [self.table.grant_access(DOMID, f, readonly=True) for f in frames[18:]]
        self.indirect_frames = frames[18:]
        self.bad = [0, 63, 64, 1 << 31]  # reserved, never granted, out of range

    def close(self) -> None:
        self.mapper.close()
        self.table.close()
        self.pool.shm.close()
        os.close(self.fd)

    def pins_released(self) -> bool:
        rd, wr = self.mapper.pin_counts
        flags = [self.table.entry(r).flags for r in range(8, 64)]
        return (not any(rd[i] or wr[i] for i in range(64))
                and not any(f & (GTF.reading | GTF.writing) for f in flags))


@pytest.fixture(params=["/dev/shm", "tmp"], ids=["tmpfs-inline", "disk-rwf-nowait"])
def rig(request, tmp_path):
    directory = str(tmp_path) if request.param == "tmp" else request.param
    if request.param == "/dev/shm":
        directory = os.path.join("/dev/shm", f"pvio-blkfast-{os.getpid()}")
        os.makedirs(directory, exist_ok=True)
    r = Rig(directory)
    yield r
    r.close()
    if request.param == "/dev/shm":
        os.unlink(r.path)
        os.rmdir(directory)


def valid_segment(rig: Rig):
    bounds = st.integers(0, 7).flatmap(lambda f: st.tuples(st.just(f), st.integers(f, 7)))
    return st.tuples(st.sampled_from(rig.rw), bounds).map(lambda t: (t[0], *t[1]))


@st.composite
def segments(draw, rig: Rig, n: int):
    """``n`` valid segments; half the time one of them gets a bad grant or bounds."""
    segs = draw(st.lists(valid_segment(rig), min_size=n, max_size=n))
    if segs and draw(st.booleans()):
        i = draw(st.integers(0, n - 1))
        gref, first, last = segs[i]
        how = draw(st.sampled_from(["read-only", "foreign", "bad-ref", "bounds"]))
        if how == "bounds":
            first, last = draw(st.sampled_from([(1, 0), (0, 8), (7, 9), (9, 9)]))
        else:
            pool = {"read-only": rig.ro, "foreign": rig.foreign, "bad-ref": rig.bad}[how]
            gref = draw(st.sampled_from(pool))
        segs[i] = (gref, first, last)
    return segs


@st.composite
def requests(draw, rig: Rig):
    ops = [BlkifOp.READ, BlkifOp.WRITE, BlkifOp.INDIRECT, BlkifOp.FLUSH_DISKCACHE,
           BlkifOp.WRITE_BARRIER, BlkifOp.DISCARD, 4, 7, 255]
    op = draw(st.sampled_from(ops[:3] * 8 + ops[3:]))
    rid = draw(st.integers(0, (1 << 64) - 1))
    end_sector = DISK // 512
    sector = draw(st.one_of(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40),
                            st.integers(end_sector - 40, end_sector + 2),
                            st.sampled_from([(1 << 64) - 1, (1 << 55) + 3])))
    raw = bytearray(blkif.REQ_SIZE)
    if op == BlkifOp.INDIRECT:
        iop = draw(st.sampled_from([BlkifOp.READ, BlkifOp.WRITE] * 6 + [3, 9]))
        nseg = draw(st.one_of(st.integers(1, 20), st.integers(1, 20),
                              st.integers(0, MAX_INDIRECT + 2)))
        segs = draw(segments(rig, nseg))
        page = rig.pool.shm.page(rig.indirect_frames[0])
        page[:] = bytes(XEN_PAGE_SIZE)
        for i, seg in enumerate(segs):
            blkif.SEGMENT.pack_into(page, i * blkif.SEGMENT.size, seg[0] & 0xFFFFFFFF, *seg[1:])
        iref = draw(st.sampled_from([rig.indirect[0]] * 12 + rig.bad[:2] + rig.foreign[:1]))
        struct.pack_into("<BBH4xQQHH8I4x", raw, 0, op, iop, nseg, rid, sector, 0, 0,
                         iref & 0xFFFFFFFF, 0, 0, 0, 0, 0, 0, 0)
        return bytes(raw)
    nseg = draw(st.one_of(st.integers(1, 11), st.integers(1, 11), st.integers(0, 14)))
    segs = draw(segments(rig, min(nseg, 11)))
    struct.pack_into("<BBH4xQQ", raw, 0, op, nseg, 0, rid, sector)
    for i, seg in enumerate(segs):
        blkif.SEGMENT.pack_into(raw, blkif.SEG_OFFSET + i * blkif.SEGMENT.size,
                                seg[0] & 0xFFFFFFFF, *seg[1:])
    return bytes(raw)


def reference(rig: Rig, raw: bytes):
    """The reference path's verdict: a validated request with its segments, or None."""
    req = parse_request(memoryview(raw), rig.feats)
    if isinstance(req, BlkError) or req.kind not in (BlkifOp.READ, BlkifOp.WRITE):
        return None
    if req.indirect_grefs:
        try:
            data = b"".join(rig.mapper.copy_from(g, 0, XEN_PAGE_SIZE)
                            for g in req.indirect_grefs)
        except GrantError:
            return None
        if blkif.finish_indirect(req, data, rig.feats) is not None:
            return None
    writable = req.kind == BlkifOp.READ
    for seg in req.segments:
        try:
            rig.mapper.pin(seg.gref, writable)
        except GrantError:
            return None
        rig.mapper.unpin(seg.gref, writable)
    return req


def segment_spans(rig: Rig, req) -> list[tuple[int, int]]:
    """[start, end) in the pool of each segment, in order."""
    spans = []
    for seg in req.segments:
        base = rig.table.entry(seg.gref).frame * XEN_PAGE_SIZE
        spans.append((base + seg.first_sect * 512, base + (seg.last_sect + 1) * 512))
    return spans


def expected_after(rig: Rig, req, file: bytes, pool: bytes) -> tuple[bytes, bytes]:
    """The image and pool after the reference path's preadv/pwritev of ``req``
    (segments may alias one page: later ones win, as in an iovec)."""
    file, pool, pos = bytearray(file), bytearray(pool), req.offset
    for start, end in segment_spans(rig, req):
        if req.kind == BlkifOp.READ:
            pool[start:end] = file[pos:pos + end - start]
        else:
            file[pos:pos + end - start] = pool[start:end]
        pos += end - start
    return bytes(file), bytes(pool)


def run_fast(rig: Rig, raw: bytes) -> tuple[int, int, bytes]:
    rsp = bytearray(blkif.RSP_SIZE)
    rsp[:] = b"\xee" * blkif.RSP_SIZE
    done, why = rig.fast.serve(ffi.from_buffer(raw), 0, 1, ffi.from_buffer(rsp))
    return done, why, bytes(rsp)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_serves_exactly_what_the_reference_accepts(rig, data):
    raw = data.draw(requests(rig))
    expect = reference(rig, raw)
    before_file = os.pread(rig.fd, DISK, 0)
    before_pool = bytes(rig.pool.shm.buf)
    done, why, rsp = run_fast(rig, raw)
    event(f"verdict: {'refused' if expect is None else 'valid'}, fast path: {(done, why)}")
    assert rig.pins_released()
    if expect is None:
        assert (done, why) == (0, NOT_FAST), "the fast path served a request the reference refuses"
        assert os.pread(rig.fd, DISK, 0) == before_file
        assert bytes(rig.pool.shm.buf) == before_pool
        return
    if why == WOULD_BLOCK:  # only an operation this file cannot do inline
        assert done == 0 and expect.kind == BlkifOp.WRITE and rig.fast._ctx.write_flags == -1
        assert os.pread(rig.fd, DISK, 0) == before_file
        return
    assert (done, why) == (1, 0)
    assert rsp == blkif.RSP.pack(expect.id, raw[0], 0)
    file, pool = expected_after(rig, expect, before_file, before_pool)
    assert os.pread(rig.fd, DISK, 0) == file
    assert bytes(rig.pool.shm.buf) == pool
    counters = rig.fast.take_counters()
    name = "read" if expect.kind == BlkifOp.READ else "write"
    assert counters[name] == (1, expect.length)


def test_a_run_stops_at_the_first_request_not_served(rig):
    """Ring order: a run stops at a flush, and the requests after it wait for the
    reference path, so nothing overtakes it."""
    def rw(op, rid, sector, ref):
        raw = bytearray(blkif.REQ_SIZE)
        struct.pack_into("<BBH4xQQ", raw, 0, op, 1, 0, rid, sector)
        blkif.SEGMENT.pack_into(raw, blkif.SEG_OFFSET, ref, 0, 7)
        return bytes(raw)

    batch = rw(BlkifOp.READ, 1, 0, rig.rw[0]) + rw(BlkifOp.READ, 2, 8, rig.rw[1]) \
        + rw(BlkifOp.FLUSH_DISKCACHE, 3, 0, 0) + rw(BlkifOp.READ, 4, 16, rig.rw[2])
    rsp = bytearray(4 * blkif.RSP_SIZE)
    done, why = rig.fast.serve(ffi.from_buffer(batch), 0, 4, ffi.from_buffer(rsp))
    assert (done, why) == (2, NOT_FAST)
    assert [blkif.RSP.unpack_from(rsp, i * blkif.RSP_SIZE) for i in range(2)] == [
        (1, BlkifOp.READ, 0), (2, BlkifOp.READ, 0)]
    assert rsp[2 * blkif.RSP_SIZE:] == bytes(2 * blkif.RSP_SIZE)  # untouched
    done, why = rig.fast.serve(ffi.from_buffer(batch), 3, 4, ffi.from_buffer(rsp))
    assert (done, why) == (4, 0)


def test_io_errors_go_to_the_reference_path(tmp_path):
    """An I/O the kernel refuses (here: writing through a read-only fd) is not
    answered by the fast path; the reference path retries it and reports it."""
    rig = Rig(str(tmp_path))
    try:
        ro = os.open(rig.path, os.O_RDONLY)
        fast = BlkFastPath(rig.mapper, ro, rig.feats)
        raw = bytearray(blkif.REQ_SIZE)
        struct.pack_into("<BBH4xQQ", raw, 0, BlkifOp.WRITE, 1, 0, 9, 0)
        blkif.SEGMENT.pack_into(raw, blkif.SEG_OFFSET, rig.rw[0], 0, 7)
        fast._ctx.write_flags = 0  # inline, as on tmpfs: the write reaches the kernel
        done, why = fast.serve(ffi.from_buffer(bytes(raw)), 0, 1,
                               ffi.from_buffer(bytearray(blkif.RSP_SIZE)))
        assert (done, why) == (0, WOULD_BLOCK)
        assert rig.pins_released()
        os.close(ro)
    finally:
        rig.close()
