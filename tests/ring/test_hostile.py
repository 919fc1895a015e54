"""A peer that breaks the rules (hardening.md requirements 1, 2, 8, 11, 20).

- Ring indices: a hostile frontend (against :class:`BackRing`) or backend
  (against :class:`FrontRing`) publishes impossible producer indices: beyond
  the ring, backwards, more responses than requests, arbitrary jumps, around
  the 2**32 wrap. The checking side gets :class:`RingBrokenError` (a
  :class:`RemoteProtocolError`), copies nothing, leaves its consumer index
  alone, and the ring stays dead; a co-tenant ring is unaffected.
- Double fetch: a flipper process rewrites published slots while the pvio
  backend consumes them (see :func:`test_flipper_backend_acts_only_on_its_validated_copy`).
- Grants: bad refs give Xen's ``GNTST_*`` codes, partial multi-ref maps are
  undone, mapped grants cannot be revoked, page-crossing copies are refused,
  frames outside the pool are refused without SIGBUS.
- Memfds: sealed pools cannot be truncated or grown by the peer;
  :meth:`SharedMemory.from_fd` refuses unsafe fds with a typed error and closes
  them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from pvio.layouts import GNTST, GTF
from pvio.ring import (
    BLKIF,
    PAGE_SIZE,
    BackRing,
    CopyOp,
    FrontRing,
    GrantError,
    GrantMapper,
    GrantTable,
    RemoteProtocolError,
    RingBrokenError,
    SharedMemory,
    SharedMemoryError,
    shared_ring_init,
)

U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
REQ = BLKIF.req_size  # 112
RSP = BLKIF.rsp_size  # 16
SLOT = BLKIF.slot_size  # 112
HDR = 64
NR = BLKIF.nr_ents(1)  # 32

# Start indices: 0, around 2**31 and right below the 2**32 wrap.
STARTS = [0, 2**31 - 3, 2**32 - 5, 2**32 - 1, 2**32 - NR]


# --------------------------------------------------------------------- helpers


@pytest.fixture
def shm_pages():
    """Sealed shared memory, closed after the test.

    Ring ends must be gone by then through reference counting alone: these
    tests avoid reference cycles through ring ends, because collecting one
    with ``gc`` can crash CPython < 3.12.6 (see
    :func:`test_ring_end_in_a_garbage_cycle_does_not_crash_the_process`).
    """
    made: list[SharedMemory] = []

    def make(pages: int = 1) -> SharedMemory:
        made.append(SharedMemory.create(pages * PAGE_SIZE, name="hostile"))
        return made[-1]

    yield make
    for shm in made:
        shm.close()


def set_req_prod(buf, value: int) -> None:
    struct.pack_into("<I", buf, 0, value & U32)


def set_rsp_prod(buf, value: int) -> None:
    struct.pack_into("<I", buf, 8, value & U32)


def slot_off(index: int, nr: int = NR) -> int:
    return HDR + (index & (nr - 1)) * SLOT


def pattern_request(index: int) -> bytes:
    """A request whose every byte is derived from its ring index (u32)."""
    body = struct.pack("<BBH4xQQ", index & 1, 1 + index % 11, index & 0xFFFF, index, index * 3)
    return (body + bytes((index + k) & 0xFF for k in range(REQ - len(body))))[:REQ]


def pattern_response(index: int) -> bytes:
    return struct.pack("<QBxh4x", index, index & 1, 0)


def hostile_front_publish(buf, start: int, count: int) -> None:
    """A frontend writing ``count`` requests at ring index ``start`` and publishing them."""
    for i in range(count):
        idx = (start + i) & U32
        buf[slot_off(idx) : slot_off(idx) + REQ] = pattern_request(idx)
    set_req_prod(buf, start + count)


def hostile_back_answer(buf, start: int, count: int) -> None:
    """A backend writing ``count`` responses at index ``start`` and publishing them."""
    for i in range(count):
        idx = (start + i) & U32
        buf[slot_off(idx) : slot_off(idx) + RSP] = pattern_response(idx)
    set_rsp_prod(buf, start + count)


def back_at(shm, start: int) -> BackRing:
    """A BackRing attached at ``start`` on a page whose indices all say ``start``."""
    buf = shm.page(0)
    shared_ring_init(buf)
    struct.pack_into("<IIII", buf, 0, start & U32, (start + 1) & U32, start & U32,
                     (start + 1) & U32)
    return BackRing.attach(BLKIF, buf, start)


def front_at(shm, start: int) -> FrontRing:
    buf = shm.page(0)
    shared_ring_init(buf)
    struct.pack_into("<IIII", buf, 0, start & U32, (start + 1) & U32, start & U32,
                     (start + 1) & U32)
    return FrontRing.attach(BLKIF, buf, start)


def front_produce(front: FrontRing, count: int) -> None:
    first = front.req_prod_pvt
    data = b"".join(pattern_request((first + i) & U32) for i in range(count))
    assert front.put_requests(data) == count
    front.push_requests()


def assert_broken(take, ring, cons_attr: str, cons_before: int, bad_index: int | None) -> None:
    """``take`` raises RingBrokenError, names the bad index and leaves cons alone."""
    try:
        take()
    except RingBrokenError as exc:
        # Drop the frames (they hold the ring): no reference cycle through it.
        exc.__traceback__ = None
        err = exc
    else:
        pytest.fail("no RingBrokenError")
    assert isinstance(err, RemoteProtocolError)
    if bad_index is not None:
        assert err.index == bad_index & U32
    assert ring.broken
    assert getattr(ring, cons_attr) == cons_before & U32


# ------------------------------------------------------- hostile frontend (BackRing)


@pytest.mark.parametrize("start", STARTS)
def test_back_accepts_exactly_a_full_ring(shm_pages, start):
    shm = shm_pages()
    back = back_at(shm, start)
    hostile_front_publish(shm.buf, start, NR)
    got = back.take_requests()
    assert got.nbytes == NR * REQ
    for i in range(NR):
        assert got[i * REQ : (i + 1) * REQ] == pattern_request((start + i) & U32)
    assert back.req_cons == (start + NR) & U32
    assert not back.broken


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("excess", [1, 2, NR, 2**31, 2**32 - NR - 1])
def test_back_prod_beyond_the_ring(shm_pages, start, excess):
    shm = shm_pages()
    back = back_at(shm, start)
    bad = start + NR + excess
    hostile_front_publish(shm.buf, start, NR)
    set_req_prod(shm.buf, bad)
    assert_broken(back.take_requests, back, "req_cons", start, bad)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("answered", [False, True])
@pytest.mark.parametrize("back_by", [1, 2, 5])
def test_back_prod_going_backwards(shm_pages, start, answered, back_by):
    shm = shm_pages()
    back = back_at(shm, start)
    hostile_front_publish(shm.buf, start, 5)
    assert back.take_requests().nbytes == 5 * REQ
    if answered:
        assert back.produce(b"".join(pattern_response(start + i) for i in range(5)))[0] == 5
    bad = start + 5 - back_by
    set_req_prod(shm.buf, bad)
    assert_broken(back.take_requests, back, "req_cons", start + 5, bad)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("jump", [NR + 1, 2**16, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1])
def test_back_index_jumps(shm_pages, start, jump):
    shm = shm_pages()
    back = back_at(shm, start)
    hostile_front_publish(shm.buf, start, 3)
    assert back.take_requests().nbytes == 3 * REQ
    bad = start + 3 + jump
    set_req_prod(shm.buf, bad)
    assert_broken(back.take_requests, back, "req_cons", start + 3, bad)


def test_back_boundaries_match_ring_h_model(shm_pages):
    """Every req_prod near the window, for several (rsp_prod_pvt, req_cons) states.

    ring.h: a frontend can have published at most RING_SIZE requests beyond
    the responses (RING_REQUEST_PROD_OVERFLOW) and never fewer than we already
    consumed. Anything else must break the ring; everything inside is taken.
    """
    shm = shm_pages()
    cases = 0
    for start in (0, 2**32 - 7, 2**32 - 1, 2**31):
        for consumed in (0, 1, NR // 2, NR):
            for answered in sorted({0, consumed // 2, consumed}):
                for delta in range(-3, NR + 4):
                    back = back_at(shm, start)
                    hostile_front_publish(shm.buf, start, consumed)
                    assert back.take_requests().nbytes == consumed * REQ
                    if answered:
                        back.produce(bytes(answered * RSP))
                    cons, rsp_pvt = (start + consumed) & U32, (start + answered) & U32
                    prod = (cons + delta) & U32
                    set_req_prod(shm.buf, prod)
                    legal = ((prod - rsp_pvt) & U32) <= NR and \
                        ((prod - cons) & U32) <= NR - ((cons - rsp_pvt) & U32)
                    if legal:
                        got = back.take_requests()
                        assert got.nbytes == ((prod - cons) & U32) * REQ
                        assert back.req_cons == prod
                    else:
                        assert_broken(back.take_requests, back, "req_cons", cons, prod)
                    cases += 1
                    del back
    assert cases > 1000


def test_back_wraps_at_2_32(shm_pages):
    """A well-behaved frontend across the u32 wrap: requests and responses in order."""
    shm = shm_pages()
    start = 2**32 - 5
    back = back_at(shm, start)
    hostile_front_publish(shm.buf, start, 10)
    assert struct.unpack_from("<I", shm.buf, 0)[0] == 5
    first = bytes(back.take_requests(max_items=4))
    rest = bytes(back.take_requests())
    got = first + rest
    assert len(got) == 10 * REQ
    for i in range(10):
        idx = (start + i) & U32
        assert got[i * REQ : (i + 1) * REQ] == pattern_request(idx)
        assert struct.unpack_from("<Q", got, i * REQ + 8)[0] == idx
    assert back.req_cons == 5
    n, _ = back.produce(b"".join(pattern_response((start + i) & U32) for i in range(10)))
    assert n == 10
    assert struct.unpack_from("<I", shm.buf, 8)[0] == 5  # rsp_prod wrapped too
    for i in range(10):
        idx = (start + i) & U32
        assert bytes(shm.buf[slot_off(idx) : slot_off(idx) + RSP]) == pattern_response(idx)
    # Past the wrap the window is still enforced.
    set_req_prod(shm.buf, 5 + NR + 1)
    assert_broken(back.take_requests, back, "req_cons", 5, 5 + NR + 1)


def test_back_broken_ring_stays_dead_and_copies_nothing(shm_pages):
    shm = shm_pages()
    back = back_at(shm, 0)
    hostile_front_publish(shm.buf, 0, 3)
    view = back.take_requests()
    before = bytes(view)
    # Fresh, different requests sit in the next slots; the index is bogus.
    for i in range(3, NR):
        shm.buf[slot_off(i) : slot_off(i) + REQ] = b"\xee" * REQ
    set_req_prod(shm.buf, 3 + NR + 1)
    for _ in range(3):
        assert_broken(back.take_requests, back, "req_cons", 3, None)
    # The frontend "repairs" the index: the ring must stay dead.
    set_req_prod(shm.buf, 4)
    for max_items in (None, 1, 0):
        assert_broken(lambda m=max_items: back.take_requests(m), back, "req_cons", 3, None)
    # Nothing was copied into the private staging area after the breakage.
    assert bytes(view) == before
    # Stopping means we also owe nothing: no responses beyond the 3 consumed.
    assert back.put_responses(bytes(10 * RSP)) == 3


def test_broken_ring_does_not_affect_a_co_tenant(shm_pages):
    """Requirement 8: only the offending device stops."""
    shm = shm_pages(2)
    good_buf, bad_buf = shm.page(0), shm.page(1)
    shared_ring_init(good_buf)
    shared_ring_init(bad_buf)
    good, bad = BackRing.attach(BLKIF, good_buf), BackRing.attach(BLKIF, bad_buf)
    set_req_prod(bad_buf, 2**31)
    assert_broken(bad.take_requests, bad, "req_cons", 0, 2**31)
    for rnd in range(4):
        hostile_front_publish(good_buf, rnd * 8, 8)
        assert good.take_requests().nbytes == 8 * REQ
        assert good.produce(bytes(8 * RSP))[0] == 8
    assert not good.broken and bad.broken


GC_CYCLE_SCRIPT = textwrap.dedent("""
    import gc, struct, sys
    from pvio.ring import BLKIF, BackRing, RingBrokenError, SharedMemory, shared_ring_init

    class Device:
        def __init__(self, ring):
            self.ring = ring
            self.error = None

        def poll(self):
            try:
                self.ring.take_requests()
            except RingBrokenError as exc:
                self.error = exc  # remember why the device was stopped

    shm = SharedMemory.create(4096)
    shared_ring_init(shm.buf)
    for _ in range(4):
        dev = Device(BackRing.attach(BLKIF, shm.page(0)))
        struct.pack_into("<I", shm.buf, 0, 2**31)  # hostile req_prod
        dev.poll()
        assert dev.error is not None and dev.ring.broken
        struct.pack_into("<I", shm.buf, 0, 0)
        del dev
    gc.collect()
    print("survived", flush=True)
""")


def test_ring_end_in_a_garbage_cycle_does_not_crash_the_process():
    """Requirement 8: stopping a device broken by a hostile peer must not kill the daemon.

    The everyday way to stop a device, keeping the RingBrokenError on it,
    makes a reference cycle (error -> traceback -> frame -> device -> ring).
    When the garbage collector breaks that cycle, the process must survive.
    (Runs in a child process so that a crash fails this test only.)
    """
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", GC_CYCLE_SCRIPT],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "survived" in res.stdout, (
        f"exit {res.returncode}: {res.stderr[-600:]}")


# ------------------------------------------------------- hostile backend (FrontRing)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("produced", [0, 1, 3, NR])
@pytest.mark.parametrize("extra", [1, 2, NR, 2**31])
def test_front_more_responses_than_requests(shm_pages, start, produced, extra):
    shm = shm_pages()
    front = front_at(shm, start)
    if produced:
        front_produce(front, produced)
    bad = start + produced + extra
    hostile_back_answer(shm.buf, start, min(produced, NR))
    set_rsp_prod(shm.buf, bad)
    assert_broken(front.take_responses, front, "rsp_cons", start, bad)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("back_by", [1, 3, 2**31])
def test_front_rsp_prod_going_backwards(shm_pages, start, back_by):
    shm = shm_pages()
    front = front_at(shm, start)
    front_produce(front, 5)
    hostile_back_answer(shm.buf, start, 3)
    assert front.take_responses().nbytes == 3 * RSP
    bad = start + 3 - back_by
    set_rsp_prod(shm.buf, bad)
    assert_broken(front.take_responses, front, "rsp_cons", start + 3, bad)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("jump", [NR + 1, 2**31 - 1, 2**31, 2**32 - 1])
def test_front_index_jumps(shm_pages, start, jump):
    shm = shm_pages()
    front = front_at(shm, start)
    front_produce(front, NR)
    bad = start + jump
    set_rsp_prod(shm.buf, bad)
    assert_broken(front.take_responses, front, "rsp_cons", start, bad)


def test_front_boundaries_match_ring_h_model(shm_pages):
    """rsp_prod may only move within (rsp_cons, req_prod_pvt]: everything else breaks."""
    shm = shm_pages()
    cases = 0
    for start in (0, 2**32 - 7, 2**32 - 1, 2**31):
        for outstanding in (0, 1, NR // 2, NR):
            for consumed in sorted({0, outstanding // 2, outstanding}):
                for delta in range(-3, NR + 4):
                    front = front_at(shm, start)
                    if outstanding:
                        front_produce(front, outstanding)
                    hostile_back_answer(shm.buf, start, consumed)
                    assert front.take_responses().nbytes == consumed * RSP
                    cons = (start + consumed) & U32
                    prod = (cons + delta) & U32
                    set_rsp_prod(shm.buf, prod)
                    legal = ((prod - cons) & U32) <= outstanding - consumed
                    if legal:
                        assert front.take_responses().nbytes == ((prod - cons) & U32) * RSP
                        assert front.rsp_cons == prod
                    else:
                        assert_broken(front.take_responses, front, "rsp_cons", cons, prod)
                    cases += 1
                    del front
    assert cases > 1000


def test_front_wraps_at_2_32(shm_pages):
    shm = shm_pages()
    start = 2**32 - 5
    front = front_at(shm, start)
    front_produce(front, 10)
    assert struct.unpack_from("<I", shm.buf, 0)[0] == 5  # req_prod wrapped
    for i in range(10):
        idx = (start + i) & U32
        assert bytes(shm.buf[slot_off(idx) : slot_off(idx) + REQ]) == pattern_request(idx)
    hostile_back_answer(shm.buf, start, 10)
    got = bytes(front.take_responses())
    assert [struct.unpack_from("<Q", got, i * RSP)[0] for i in range(10)] == [
        (start + i) & U32 for i in range(10)
    ]
    assert front.rsp_cons == 5
    assert front.free_requests == NR
    set_rsp_prod(shm.buf, 6)
    assert_broken(front.take_responses, front, "rsp_cons", 5, 6)


def test_front_broken_ring_stays_dead_and_copies_nothing(shm_pages):
    shm = shm_pages()
    front = front_at(shm, 0)
    front_produce(front, 8)
    hostile_back_answer(shm.buf, 0, 2)
    view = front.take_responses()
    before = bytes(view)
    for i in range(2, 8):
        shm.buf[slot_off(i) : slot_off(i) + RSP] = b"\xee" * RSP
    set_rsp_prod(shm.buf, 9)  # 7 responses for 6 outstanding requests
    for _ in range(3):
        assert_broken(front.take_responses, front, "rsp_cons", 2, None)
    set_rsp_prod(shm.buf, 3)  # now plausible again: still dead
    for max_items in (None, 1, 0):
        assert_broken(lambda m=max_items: front.take_responses(m), front, "rsp_cons", 2, None)
    assert bytes(view) == before


# ----------------------------------------------------------------- double fetch

FLIPPER_SRC = r"""
/* flipper MEMFD FRAME NR_ENTS SLOT_SIZE PATTERN_FILE SEED
 * Rewrites the slots of a ring (never its indices) forever: complete foreign
 * patterns, byte-by-byte copies (torn while in progress), half patterns (torn
 * for good), garbage and single flipped bytes. Counts rewrites in the u64 at
 * the start of the page after the ring. Stopped with SIGKILL by the test. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
    int fd = atoi(argv[1]);
    long frame = atol(argv[2]);
    uint32_t nr = (uint32_t)atoi(argv[3]), slot = (uint32_t)atoi(argv[4]);
    uint64_t x = strtoull(argv[6], NULL, 0) | 1;
    FILE *f = fopen(argv[5], "rb");
    static uint8_t pats[1 << 16];
    size_t npat, i;
    uint8_t *map;
    volatile uint8_t *ring;
    volatile uint64_t *beat;

    if (argc != 7 || !f)
        return 1;
    npat = fread(pats, 1, sizeof(pats), f) / slot;
    fclose(f);
    if (npat == 0)
        return 1;
    map = mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, frame * 4096);
    if (map == MAP_FAILED)
        return 1;
    ring = map + 64;
    beat = (volatile uint64_t *)(map + 4096);
    for (;;) {
        uint32_t s, mode, spin;
        const uint8_t *p;
        volatile uint8_t *d;
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        s = (uint32_t)(x % nr);
        mode = (uint32_t)((x >> 20) % 8);
        p = pats + ((x >> 32) % npat) * slot;
        d = ring + (size_t)s * slot;
        switch (mode) {
        case 0: case 1: case 2:
            memcpy((void *)d, p, slot);
            break;
        case 3:
            for (i = 0; i < slot; i++)
                d[i] = p[i];
            break;
        case 4:
            memcpy((void *)d, p, slot / 2);
            break;
        case 5:
            memcpy((void *)(d + slot / 2), p + slot / 2, slot - slot / 2);
            break;
        case 6:
            for (i = 0; i + 8 <= slot; i += 8) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                *(volatile uint64_t *)(d + i) = x;
            }
            break;
        default:
            d[(x >> 40) % slot] ^= (uint8_t)(1u << ((x >> 50) & 7));
        }
        *beat = *beat + 1;
        for (spin = (uint32_t)((x >> 44) % 48); spin; spin--)
            __asm__ __volatile__("" ::: "memory");
    }
}
"""

FLIP_MARK = 1 << 63
MIX = 0x9E3779B97F4A7C15
_REQ_HEAD = struct.Struct("<BBH")


def make_request(rid: int, salt: int) -> bytes:
    """A self-consistent request: CRC32 (in blkif's pad at offset 4) over all other bytes."""
    op, nseg = rid & 1, 1 + rid % 11
    head = _REQ_HEAD.pack(op, nseg, (rid * 7) & 0xFFFF)
    body = struct.pack("<Q", rid) + struct.pack("<Q", ((rid ^ salt) * MIX) & U64) * 12
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def parse_checked(req) -> tuple | None:
    """Validate a request: checksum, opcode, segment count. The fields acted on, or None."""
    crc = zlib.crc32(req[8:], zlib.crc32(req[:4]))
    op, nseg, handle, stored, rid, sector = struct.unpack_from("<BBHIQQ", req)
    if crc != stored or op > 1 or not 1 <= nseg <= 11:
        return None
    segs = struct.unpack_from(f"<{nseg}Q", req, 24)
    return (op, nseg, handle, rid, sector, segs)


def parse_for_io(req) -> tuple:
    """What the I/O path reads when it executes a request (no validation here)."""
    op, nseg, handle, _, rid, sector = struct.unpack_from("<BBHIQQ", req)
    segs = struct.unpack_from(f"<{min(nseg, 11)}Q", req, 24)
    return (op, nseg, handle, rid, sector, segs)


class Executor:
    """A backend's request handling, split the way real backends do it.

    ``validate`` checks each request of a batch, then ``execute`` runs the
    valid ones, re-reading fields from the request object it was handed (as
    an I/O path does when it builds the bio/iovec from the segment list).
    Anything executed that differs from what was validated is an
    *inconsistent execution*: a double fetch.
    """

    def __init__(self, n_originals: int, flip_patterns: dict[int, bytes]) -> None:
        self.n_originals = n_originals
        self.flip_patterns = flip_patterns
        self.originals = self.flipped = self.rejected = 0
        self.inconsistent: list[str] = []

    def run_batch(self, reqs: list, first_index: int | None, yield_cpu: bool) -> list[int]:
        checked = [parse_checked(r) for r in reqs]
        # Time passes between validation and execution (a busy backend):
        # give a concurrent writer every chance to change what we hold, even
        # if it has to share our CPU.
        if yield_cpu:
            os.sched_yield()
        t_end = time.perf_counter() + 20e-6
        while time.perf_counter() < t_end:
            pass
        status = []
        for k, (req, ok) in enumerate(zip(reqs, checked, strict=True)):
            if ok is None:
                self.rejected += 1
                status.append(-1)
                continue
            acted = parse_for_io(req)
            if acted != ok:
                self.inconsistent.append(f"validated {ok[:5]} but executed {acted[:5]}")
                status.append(-1)
                continue
            rid = acted[3]
            raw = bytes(req)
            if rid & FLIP_MARK:
                want = self.flip_patterns.get(rid)
                self.flipped += 1
            else:
                want = make_request(rid, 0) if rid < self.n_originals else None
                if first_index is not None and rid != first_index + k:
                    want = None  # an original in the wrong slot
                self.originals += 1
            if raw != want:
                self.inconsistent.append(f"executed a torn or misplaced request id {rid:#x}")
            status.append(0)
        return status


@pytest.fixture(scope="module")
def flipper_bin(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("flipper")
    src, out = d / "flipper.c", d / "flipper"
    src.write_text(FLIPPER_SRC)
    res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return out


class Flipper:
    """The flipper process on page 0 of ``shm`` (its heartbeat on page 1)."""

    def __init__(self, flipper_bin: Path, shm: SharedMemory, patterns: list[bytes],
                 tmp_path: Path) -> None:
        pat_file = tmp_path / "patterns.bin"
        pat_file.write_bytes(b"".join(patterns))
        self.shm = shm
        self.proc = subprocess.Popen(
            [str(flipper_bin), str(shm.fileno()), "0", str(NR), str(SLOT), str(pat_file),
             str(0x2545F4914F6CDD1D)],
            pass_fds=(shm.fileno(),),
        )

    @property
    def beats(self) -> int:
        return struct.unpack_from("<Q", self.shm.buf, PAGE_SIZE)[0]

    def wait_running(self) -> None:
        deadline = time.monotonic() + 10
        while self.beats == 0:
            assert self.proc.poll() is None, f"flipper exited {self.proc.returncode}"
            assert time.monotonic() < deadline, "flipper never started"
            time.sleep(0.001)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def test_flipper_backend_acts_only_on_its_validated_copy(shm_pages, flipper_bin, tmp_path):
    """Requirement 1 / XSA-155 under a live flipper, 300,000 requests.

    Design. Every request is self-consistent: a CRC32 over all its other bytes
    sits in blkif's 4 padding bytes. The frontend (here, in-process) publishes
    originals (id = ring index); a separate flipper process rewrites the
    slots of published requests at random with complete foreign patterns
    (valid CRC, id with bit 63 set), byte-by-byte copies, half patterns,
    garbage and single-bit flips. A memcpy of a slot can legitimately race
    with the flipper, so a torn *copy* is allowed: the backend must then reject
    it (the CRC fails on the copy).

    The property under test is that what the backend *acts on* is the private
    copy it validated: the backend validates a whole batch returned by
    ``take_requests``, waits, then executes each request by re-reading its
    fields from the same object. pvio passes iff that object is private
    memory. The control experiment below runs the identical backend logic on
    the shared slots themselves (what parsing ``RING_GET_REQUEST`` in place
    would do) and requires it to be caught, which shows the check can fail.
    Also checked: every executed request is byte-for-byte an original at its
    own ring index or a complete flipper pattern (never a torn mix), every
    index was consumed exactly once, and the flipper really interfered.
    """
    shm = shm_pages(2)
    ring_buf = shm.page(0)
    patterns = [make_request(FLIP_MARK | s, 0xABCDEF) for s in range(256)]
    flip_patterns = {struct.unpack_from("<Q", p, 8)[0]: p for p in patterns}
    n_req = 300_000

    front = FrontRing.init(BLKIF, ring_buf)
    back = BackRing.attach(BLKIF, ring_buf)
    flipper = Flipper(flipper_bin, shm, patterns, tmp_path)
    try:
        flipper.wait_running()
        beats0 = flipper.beats
        ex = Executor(n_req, flip_patterns)
        produced = consumed = batches = 0
        deadline = time.monotonic() + 40
        while consumed < n_req:
            k = min(front.free_requests, n_req - produced)
            if k:
                front.produce(b"".join(make_request(produced + i, 0) for i in range(k)))
                produced += k
            # The backend's wake-up latency: published requests sit in the
            # shared ring for a moment, exposed to the flipper (which gets our
            # CPU now and then, in case it has to share one with us).
            batches += 1
            if batches % 16 == 0:
                os.sched_yield()
            t_end = time.perf_counter() + 3e-6
            while time.perf_counter() < t_end:
                pass
            view = back.take_requests()
            n = view.nbytes // REQ
            reqs = [view[i * REQ : (i + 1) * REQ] for i in range(n)]
            status = ex.run_batch(reqs, consumed, yield_cpu=batches % 16 == 8)
            rsp = b"".join(struct.pack("<QBxh4x", consumed + i, 0, st)
                           for i, st in enumerate(status))
            assert back.produce(rsp)[0] == n
            consumed += n
            front.take_responses()  # the flipper scribbles on these too; no matter
            assert time.monotonic() < deadline, "flipper run too slow"
        beats = flipper.beats - beats0

        # Control: the same backend logic on the shared slots themselves.
        control = Executor(n_req, flip_patterns)
        t_end = time.monotonic() + 5
        while not control.inconsistent and time.monotonic() < t_end:
            control.run_batch([ring_buf[slot_off(i) : slot_off(i) + REQ] for i in range(NR)],
                              None, yield_cpu=True)
    finally:
        flipper.stop()

    assert not ex.inconsistent, ex.inconsistent[:5]
    assert back.req_cons == back.rsp_prod_pvt == consumed == n_req
    assert not back.broken
    assert ex.originals + ex.flipped + ex.rejected == n_req
    assert ex.originals > 0, "no original survived: the test saw only the flipper"
    assert ex.flipped + ex.rejected > 0, "the flipper never interfered"
    assert beats > 1000
    assert control.inconsistent, "control backend reading shared memory was not caught"
    print(f"\nflipper: {beats} rewrites; originals {ex.originals}, flipper patterns "
          f"{ex.flipped}, rejected {ex.rejected}; control caught: {control.inconsistent[0]}")


def test_private_copy_ignores_later_slot_writes(shm_pages):
    """ring.h conformance 9: mutating the shared slot after the copy has no effect."""
    shm = shm_pages()
    back = back_at(shm, 0)
    hostile_front_publish(shm.buf, 0, 4)
    view = back.take_requests()
    snapshot = bytes(view)
    for i in range(4):
        shm.buf[slot_off(i) : slot_off(i) + REQ] = b"\x5a" * REQ
    assert bytes(view) == snapshot
    front = front_at(shm, 0)
    front_produce(front, 4)
    hostile_back_answer(shm.buf, 0, 4)
    rview = front.take_responses()
    rsnap = bytes(rview)
    for i in range(4):
        shm.buf[slot_off(i) : slot_off(i) + RSP] = b"\xa5" * RSP
    assert bytes(rview) == rsnap


# ------------------------------------------------------------------- grant abuse

BACK_DOM, FRONT_DOM, OTHER_DOM = 1, 2, 3


class Grants:
    """A frontend's grant table and pool, and a backend mapper over received fds."""

    def __init__(self) -> None:
        self.table = GrantTable.create(nr_entries=64)
        self.pool = SharedMemory.create(8 * PAGE_SIZE, name="pool")
        # The backend adopts the regions the way it would from a socket.
        self.peer_table = SharedMemory.from_fd(os.dup(self.table.shm.fileno()))
        self.peer_pool = SharedMemory.from_fd(os.dup(self.pool.fileno()))
        self.mapper = GrantMapper(self.peer_table, self.peer_pool, BACK_DOM)
        for frame in range(self.pool.pages):
            self.pool.buf[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE] = bytes([frame + 1]) * \
                PAGE_SIZE

    def flags(self, ref: int) -> GTF:
        return self.table.entry(ref).flags

    def raw_entry(self, ref: int, flags: int, domid: int, frame: int) -> None:
        struct.pack_into("<HHI", self.table.shm.buf, ref * 8, flags, domid, frame)

    def close(self) -> None:
        self.mapper.close()
        for shm in (self.peer_table, self.peer_pool, self.table.shm, self.pool):
            shm.close()


@pytest.fixture
def grants():
    g = Grants()
    yield g
    g.close()


PINNED = GTF.reading | GTF.writing


def bad_ref_cases(g: Grants) -> dict[str, tuple[int, int, bool]]:
    """name -> (ref, expected GNTST, writable) for every kind of bad ref."""
    wrong_dom = g.table.grant_access(OTHER_DOM, 1)
    never = 40  # never granted: GTF_invalid
    transfer = 41
    g.raw_entry(transfer, GTF.accept_transfer, BACK_DOM, 1)
    transitive = 42
    g.raw_entry(transitive, GTF.transitive, BACK_DOM, 1)
    readonly = g.table.grant_access(BACK_DOM, 2, readonly=True)
    return {
        "out_of_range": (g.table.nr_entries, GNTST.bad_gntref, False),
        "far_out_of_range": (U32, GNTST.bad_gntref, False),
        "wrong_domid": (wrong_dom, GNTST.general_error, False),
        "invalid_type": (never, GNTST.general_error, False),
        "accept_transfer_type": (transfer, GNTST.general_error, False),
        "transitive_type": (transitive, GNTST.general_error, False),
        "write_to_readonly": (readonly, GNTST.general_error, True),
    }


CASES = ["out_of_range", "far_out_of_range", "wrong_domid", "invalid_type",
         "accept_transfer_type", "transitive_type", "write_to_readonly"]


@pytest.mark.parametrize("case", CASES)
def test_bad_grant_ref_gets_xen_status(grants, case):
    ref, status, writable = bad_ref_cases(grants)[case]
    before = grants.flags(ref) if ref < grants.table.nr_entries else None
    with pytest.raises(GrantError) as info:
        grants.mapper.map([ref], writable=writable)
    assert info.value.status == status
    assert info.value.ref == ref
    # A failed map leaves no pin behind.
    if before is not None:
        assert grants.flags(ref) == before
    # GNTTABOP_copy reports the same status per element.
    buf = bytearray(16)
    assert grants.mapper.copy([CopyOp(ref, 0, buf, to_grant=writable)]) == [status]
    assert buf == bytearray(16)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("position", [0, 2, 4])
def test_multi_ref_map_with_one_bad_ref_unpins_the_others(grants, case, position):
    ref_bad, status, writable = bad_ref_cases(grants)[case]
    good = [grants.table.grant_access(BACK_DOM, 3 + i) for i in range(4)]
    refs = [*good[:position], ref_bad, *good[position:]]
    with pytest.raises(GrantError) as info:
        grants.mapper.map(refs, writable=writable)
    assert info.value.status == status and info.value.ref == ref_bad
    for ref in good:
        assert not grants.flags(ref) & PINNED, f"ref {ref} left pinned: {grants.flags(ref)!r}"
    # The mapper's own pin counts are consistent too: map+unmap, then revoke.
    with grants.mapper.map(good, writable=True) as m:
        assert bytes(m.buf[:1]) == bytes([4])
        assert all(grants.flags(r) & PINNED == PINNED for r in good)
    for ref in good:
        assert grants.table.end_access(ref), f"ref {ref} cannot be revoked"


def test_revoke_of_a_mapped_ref_fails(grants):
    ref = grants.table.grant_access(BACK_DOM, 5)
    m1 = grants.mapper.map([ref], writable=True)
    m2 = grants.mapper.map([ref], writable=False)
    for mapping in (m1, m2):
        assert not grants.table.end_access(ref)
        assert not grants.table.make_readonly(ref) or mapping is m2
        entry = grants.table.entry(ref)
        assert entry.flags & GTF.type_mask == GTF.permit_access
        assert entry.flags & GTF.reading
        assert (entry.domid, entry.frame) == (BACK_DOM, 5)
        mapping.close()
    assert grants.table.end_access(ref)
    assert grants.table.entry(ref).flags == GTF.invalid
    # A revoked ref cannot be mapped any more.
    with pytest.raises(GrantError) as info:
        grants.mapper.map([ref])
    assert info.value.status == GNTST.general_error


def test_page_crossing_copy_is_refused(grants):
    ref = grants.table.grant_access(BACK_DOM, 6)
    with pytest.raises(GrantError) as info:
        grants.mapper.copy_from(ref, PAGE_SIZE - 100, 200)
    assert info.value.status == GNTST.bad_copy_arg
    with pytest.raises(GrantError) as info:
        grants.mapper.copy_to(ref, 1, bytes(PAGE_SIZE))
    assert info.value.status == GNTST.bad_copy_arg
    ok1, cross, ok2 = bytearray(8), bytearray(2), bytearray(4)
    ops = [CopyOp(ref, 0, ok1), CopyOp(ref, PAGE_SIZE - 1, cross),
           CopyOp(ref, PAGE_SIZE - 4, ok2), CopyOp(ref, -1, bytearray(1)),
           CopyOp(ref, PAGE_SIZE, bytearray(0)), CopyOp(ref, 2**40, bytearray(1))]
    assert grants.mapper.copy(ops) == [0, GNTST.bad_copy_arg, 0, GNTST.bad_copy_arg,
                                        GNTST.bad_copy_arg, GNTST.bad_copy_arg]
    assert ok1 == bytes([7]) * 8 and ok2 == bytes([7]) * 4 and cross == bytearray(2)
    # The pool page after frame 6 was not written by a crossing copy_to.
    assert bytes(grants.pool.buf[7 * PAGE_SIZE : 7 * PAGE_SIZE + 8]) == bytes([8]) * 8
    assert not grants.flags(ref) & PINNED
    assert grants.table.end_access(ref)


@pytest.mark.parametrize("frame", [8, 9, 2**20, U32])
def test_frame_beyond_the_pool_is_an_error_not_sigbus(grants, frame):
    ref = grants.table.grant_access(BACK_DOM, frame)
    for writable in (False, True):
        with pytest.raises(GrantError) as info:
            grants.mapper.map([ref], writable=writable)
        # Xen answers GNTST_bad_page for a frame the granter does not own;
        # pvio answers GNTST_general_error. Either way, an error, no mapping.
        assert info.value.status in (GNTST.general_error, GNTST.bad_page)
        assert not grants.flags(ref) & PINNED
    buf = bytearray(8)
    (status,) = grants.mapper.copy([CopyOp(ref, 0, buf)])
    assert status in (GNTST.general_error, GNTST.bad_page)
    assert not grants.flags(ref) & PINNED
    assert grants.table.end_access(ref)


# ------------------------------------------------------------------------- memfd

REQUIRED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
F_SEAL_FUTURE_WRITE = 0x0010  # linux/fcntl.h; not exported by Python's fcntl

PEER_TRUNCATE = textwrap.dedent("""
    import errno, json, os, sys
    fd, size = int(sys.argv[1]), int(sys.argv[2])
    sizes = [0, size - 4096, 1, size + 4096, 2 * size, size // 2 + 7]
    eperm, other = 0, []
    for i in range(1000):
        new = sizes[i % len(sizes)]
        try:
            os.ftruncate(fd, new)
            other.append(f"ftruncate({new}) succeeded")
        except OSError as e:
            if e.errno == errno.EPERM:
                eperm += 1
            else:
                other.append(f"ftruncate({new}): {e}")
    extra = {}
    # Reopening the memfd gives a new file description on the same sealed inode.
    fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    for what, fn in [("reopen_shrink", lambda: os.ftruncate(fd2, 0)),
                     ("fallocate_grow", lambda: os.posix_fallocate(fd, size, 4096)),
                     ("unseal", lambda: __import__("fcntl").fcntl(fd, 1033, 8))]:
        try:
            fn()
            extra[what] = "succeeded"
        except OSError as e:
            extra[what] = errno.errorcode[e.errno]
    print(json.dumps({"eperm": eperm, "other": other, "extra": extra,
                      "size": os.fstat(fd).st_size}))
""")


def test_peer_cannot_truncate_or_grow_a_pvio_memfd():
    shm = SharedMemory.create(4 * PAGE_SIZE, name="victim")
    try:
        shm.buf[-1] = 0x7E
        res = subprocess.run(
            [sys.executable, "-c", PEER_TRUNCATE, str(shm.fileno()), str(shm.size)],
            pass_fds=(shm.fileno(),), capture_output=True, text=True, timeout=20,
        )
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["eperm"] == 1000, out["other"][:5]
        assert out["other"] == []
        # F_ADD_SEALS (1033) with F_SEAL_WRITE: blocked by F_SEAL_SEAL.
        assert out["extra"] == {"reopen_shrink": "EPERM", "fallocate_grow": "EPERM",
                                "unseal": "EPERM"}
        assert out["size"] == shm.size == os.fstat(shm.fileno()).st_size
        # Still fully mapped: touching the last byte does not SIGBUS.
        assert shm.buf[-1] == 0x7E
        shm.buf[-1] = 0
        assert fcntl.fcntl(shm.fileno(), fcntl.F_GET_SEALS) & REQUIRED == REQUIRED
    finally:
        shm.close()


def assert_closed(fd: int) -> None:
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def memfd(size: int, seals: int, allow_sealing: bool = True) -> int:
    fd = os.memfd_create("peer", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if allow_sealing
                                                    else 0))
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize(
    ("size", "seals", "allow"),
    [
        (PAGE_SIZE, 0, True),  # unsealed
        (PAGE_SIZE, 0, False),  # sealing not even allowed (seals = F_SEAL_SEAL)
        (PAGE_SIZE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, True),  # can still be unsealed
        (PAGE_SIZE, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL, True),  # can shrink
        (PAGE_SIZE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL, True),  # can grow
    ],
    ids=["unsealed", "no_allow_sealing", "no_seal_seal", "no_shrink_seal", "no_grow_seal"],
)
def test_from_fd_rejects_unsealed_memfd_and_closes_it(size, seals, allow):
    fd = memfd(size, seals, allow)
    with pytest.raises(SharedMemoryError) as info:
        SharedMemory.from_fd(fd)
    assert isinstance(info.value, RemoteProtocolError)
    assert_closed(fd)


@pytest.mark.parametrize(("size", "min_size"), [
    (PAGE_SIZE, 2 * PAGE_SIZE), (0, PAGE_SIZE), (0, 0), (PAGE_SIZE + 1, PAGE_SIZE),
    (5000, 4096), (3 * PAGE_SIZE, 16 * PAGE_SIZE),
])
def test_from_fd_rejects_too_small_or_ragged_memfd(size, min_size):
    fd = memfd(size, REQUIRED)
    with pytest.raises(SharedMemoryError):
        SharedMemory.from_fd(fd, min_size=min_size)
    assert_closed(fd)


@pytest.mark.parametrize("kind", ["pipe", "eventfd", "regular_file", "socket"])
def test_from_fd_rejects_non_memfd_and_closes_it(kind, tmp_path):
    keep: list[int] = []
    if kind == "pipe":
        fd, w = os.pipe()
        keep.append(w)
    elif kind == "eventfd":
        fd = os.eventfd(0)
    elif kind == "regular_file":
        path = tmp_path / "f"
        path.write_bytes(bytes(2 * PAGE_SIZE))
        fd = os.open(path, os.O_RDWR)
    else:
        import socket

        a, b = socket.socketpair()
        fd = a.detach()
        keep.append(b.detach())
    try:
        with pytest.raises(SharedMemoryError):
            SharedMemory.from_fd(fd)
        assert_closed(fd)
        for other in keep:
            os.fstat(other)  # only the fd handed over was closed
    finally:
        for other in keep:
            os.close(other)


@pytest.mark.parametrize("how", ["seal_write", "seal_future_write", "read_only_fd"])
def test_from_fd_unmappable_memfd_is_a_typed_error(how):
    """A correctly sealed memfd that cannot be mapped writable is the peer's fault too.

    Requirement 8: a hostile peer must get a RemoteProtocolError (so only its
    device is stopped), never a stray OSError out of mmap.
    """
    if how == "seal_write":
        fd = memfd(2 * PAGE_SIZE, REQUIRED | fcntl.F_SEAL_WRITE)
    elif how == "seal_future_write":
        fd = memfd(2 * PAGE_SIZE, REQUIRED | F_SEAL_FUTURE_WRITE)
    else:
        rw = memfd(2 * PAGE_SIZE, REQUIRED)
        fd = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(rw)
    with pytest.raises(SharedMemoryError):
        SharedMemory.from_fd(fd)
    assert_closed(fd)


def test_from_fd_accepts_a_sealed_memfd_and_owns_it():
    fd = memfd(3 * PAGE_SIZE, REQUIRED)
    shm = SharedMemory.from_fd(fd, min_size=2 * PAGE_SIZE)
    try:
        assert shm.pages == 3 and shm.fileno() == fd
        shm.buf[0] = 1
    finally:
        shm.close()
    assert_closed(fd)
