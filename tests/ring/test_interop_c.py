"""Interop across processes: pvio ring ends against Xen's own ring.h macros.

``c/blkring_peer.c`` is one end of a blkif ring written only with the
unmodified ``<xen/io/ring.h>`` / ``<xen/io/blkif.h>`` macros (Debian
libxen-dev). It runs as a separate process on a pvio :class:`SharedMemory`
memfd (inherited with ``pass_fds``) and eventfd event channels allocated by
:class:`EventChannelTable`. Both directions are tested:

- C front -> pvio back: the pvio backend (in the pytest process) handles every
  request in Python, checks the ids arrive 0, 1, 2, ... and the body matches
  the pattern, and echoes the id with ``BLKIF_RSP_OKAY``; the C front checks
  the same ordering on the responses.
- pvio front -> C back: the mirror image.

Every run also checks that nothing outside the ring's pages was written. A
stall (lost wake-up) fails through timeouts on both sides (C: 10 s without an
event; pvio: an overall deadline), never a hang.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pvio.ring import (
    BLKIF,
    PAGE_SIZE,
    BackRing,
    BusyPoll,
    EventChannelTable,
    FrontRing,
    SharedMemory,
    shared_ring_init,
    wait_for_work_blocking,
)

PEER_SRC = Path(__file__).resolve().parent / "c" / "blkring_peer.c"
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
SECTOR_XOR = 0x5BD1E9955BD1E995

REQ_SIZE = BLKIF.req_size  # 112
RSP_SIZE = BLKIF.rsp_size  # 16
# operation, nr_segments, handle, id, sector_number, seg[0].gref/first/last
REQ_HEAD = struct.Struct("<BBH4xQQIBB")
RSP = struct.Struct("<QBxh4x")  # id, operation, status

SHM_PAGES = 8
RING_FRAME = 3  # the ring does not start at page 0 of the memfd
DEADLINE_S = 25.0

RATES: dict[str, float] = {}


def req_fields(i: int) -> tuple[int, ...]:
    """The body of request ``i``: the same pattern as ``fill_req`` in the C peer."""
    return (
        i & 1,
        1 + i % 11,
        (i * 7) & 0xFFFF,
        i,
        ((i * 8) ^ SECTOR_XOR) & U64,
        i & U32,
        i & 7,
        7,
    )


@pytest.fixture(scope="module")
def peer_bin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blkring") / "blkring_peer"
    res = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), "-I/usr/include",
         str(PEER_SRC)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return out


@contextmanager
def running(argv: list[str], pass_fds: tuple[int, ...]):
    """Start a peer process; always stop it (by pid) and reap it on the way out."""
    proc = subprocess.Popen(argv, pass_fds=pass_fds, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stderr.close()


def finish(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait for the C peer to exit on its own and require success."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("C peer did not finish (stalled?)")
    assert rc == 0, f"C peer failed with {rc}: {proc.stderr.read()}"


def check_alive(proc: subprocess.Popen, deadline: float, what: str) -> None:
    if proc.poll() is not None:
        pytest.fail(f"C peer exited early ({proc.returncode}) during {what}: "
                    f"{proc.stderr.read()}")
    if time.monotonic() > deadline:
        pytest.fail(f"{what}: deadline passed (stall or far too slow)")


class Link:
    """A sealed memfd with a ring at RING_FRAME and one event channel.

    pvio (dom0) allocates the unbound port; the C peer (dom1) gets the other
    ends as plain eventfd numbers: it sleeps on ``peer_wait`` and raises
    ``peer_notify``.
    """

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.shm = SharedMemory.create(SHM_PAGES * PAGE_SIZE, name="interop")
        self.ring_buf = self.shm.page(RING_FRAME, pages)
        self.table = EventChannelTable(domid=0)
        unbound = self.table.alloc_unbound(remote_domid=1)
        self.chan = unbound.channel
        self.peer_wait, self.peer_notify = unbound.peer_fds()

    def argv(self, peer_bin: Path, role: str, count: int, start: int | None) -> list[str]:
        argv = [str(peer_bin), role, str(self.shm.fileno()), str(RING_FRAME), str(self.pages),
                str(self.peer_wait), str(self.peer_notify), str(count)]
        if start is not None:
            argv.append(str(start))
        return argv

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.shm.fileno(), self.peer_wait, self.peer_notify)

    def assert_outside_ring_untouched(self) -> None:
        buf = self.shm.buf
        lo, hi = RING_FRAME * PAGE_SIZE, (RING_FRAME + self.pages) * PAGE_SIZE
        assert not any(buf[:lo]), "bytes before the ring were written"
        assert not any(buf[hi:]), "bytes after the ring were written"

    def close(self) -> None:
        self.ring_buf.release()
        self.table.close_all()
        self.shm.close()


@pytest.fixture
def link(request):
    made: list[Link] = []

    def make(pages: int) -> Link:
        made.append(Link(pages))
        return made[-1]

    yield make
    for lk in made:
        lk.close()


def pvio_backend(link: Link, proc: subprocess.Popen, count: int, start: int) -> BackRing:
    """A pvio backend answering ``count`` requests, each parsed and checked in Python."""
    deadline = time.monotonic() + DEADLINE_S
    # The C front initialises the shared ring and then notifies: only then may
    # the backend look at the page (xenstore plays this role in real life).
    while not link.chan.wait_blocking(0.5):
        check_alive(proc, deadline, "waiting for the C front to connect")
    back = BackRing.attach(BLKIF, link.ring_buf, start)
    poll = BusyPoll(window_us=50)
    rsp = bytearray(back.nr_ents * RSP_SIZE)
    rsp_view = memoryview(rsp)
    unpack, pack = REQ_HEAD.unpack_from, RSP.pack_into
    expected = 0
    batches = 0
    while expected < count:
        reqs = back.take_requests()
        n = len(reqs) // REQ_SIZE
        if n == 0:
            if not wait_for_work_blocking(back, link.chan, poll, timeout=0.5):
                check_alive(proc, deadline, "pvio backend")
            continue
        batches += 1
        for k in range(n):
            fields = unpack(reqs, k * REQ_SIZE)
            rid = fields[3]
            if rid != expected:
                pytest.fail(f"pvio backend got request id {rid}, expected {expected} "
                            "(lost, duplicated or reordered)")
            if fields != req_fields(rid):
                pytest.fail(f"request {rid} body corrupted: {fields} != {req_fields(rid)}")
            pack(rsp, k * RSP_SIZE, rid, fields[0], 0)
            expected += 1
        assert back.put_responses(rsp_view[: n * RSP_SIZE]) == n
        if back.push_responses():
            link.chan.notify()
        if time.monotonic() > deadline:
            check_alive(proc, deadline, "pvio backend")
    assert back.take_requests().nbytes == 0, "requests beyond the count"
    assert back.req_cons == (start + count) & U32 == back.rsp_prod_pvt
    assert batches >= count // back.nr_ents
    return back


def pvio_frontend(link: Link, proc: subprocess.Popen, front: FrontRing, count: int) -> None:
    """A pvio frontend issuing ``count`` requests, checking each response id in order."""
    deadline = time.monotonic() + DEADLINE_S
    poll = BusyPoll(window_us=50)
    reqbuf = bytearray(front.nr_ents * REQ_SIZE)
    reqview = memoryview(reqbuf)
    pack, unpack = REQ_HEAD.pack_into, RSP.unpack_from
    next_id = expect = 0
    while expect < count:
        k = min(front.free_requests, count - next_id)
        if k:
            for j in range(k):
                pack(reqbuf, j * REQ_SIZE, *req_fields(next_id + j))
            assert front.put_requests(reqview[: k * REQ_SIZE]) == k
            next_id += k
            if front.push_requests():
                link.chan.notify()
        rsps = front.take_responses()
        m = len(rsps) // RSP_SIZE
        if m:
            for j in range(m):
                rid, op, status = unpack(rsps, j * RSP_SIZE)
                if rid != expect:
                    pytest.fail(f"pvio frontend got response id {rid}, expected {expect} "
                                "(lost, duplicated or reordered)")
                assert (op, status) == (expect & 1, 0), f"response {rid}: op {op} st {status}"
                expect += 1
            if time.monotonic() > deadline:
                check_alive(proc, deadline, "pvio frontend")
            continue
        if not wait_for_work_blocking(front, link.chan, poll, timeout=0.5):
            check_alive(proc, deadline, "pvio frontend")
    assert front.take_responses().nbytes == 0, "responses beyond the count"
    assert front.free_requests == front.nr_ents


def run_c_front_pvio_back(peer_bin, link, count: int, start: int | None) -> float:
    t0 = time.perf_counter()
    with running(link.argv(peer_bin, "front", count, start), link.fds) as proc:
        pvio_backend(link, proc, count, start or 0)
        finish(proc)
    elapsed = time.perf_counter() - t0
    link.assert_outside_ring_untouched()
    return count / elapsed


def run_pvio_front_c_back(peer_bin, link, count: int, start: int | None) -> float:
    if start is None:
        front = FrontRing.init(BLKIF, link.ring_buf)
    else:
        shared_ring_init(link.ring_buf)
        s = start & U32
        struct.pack_into("<IIII", link.ring_buf, 0, s, (s + 1) & U32, s, (s + 1) & U32)
        front = FrontRing.attach(BLKIF, link.ring_buf, start)
    t0 = time.perf_counter()
    with running(link.argv(peer_bin, "back", count, start), link.fds) as proc:
        pvio_frontend(link, proc, front, count)
        finish(proc)
    elapsed = time.perf_counter() - t0
    link.assert_outside_ring_untouched()
    assert front.rsp_cons == front.req_prod_pvt == ((start or 0) + count) & U32
    return count / elapsed


def report(name: str, rate: float) -> None:
    RATES[name] = rate
    print(f"\n{name}: {rate:,.0f} requests/s")


@pytest.mark.slow
def test_c_front_pvio_back_million(peer_bin, link):
    report("C front -> pvio back, 1 page", run_c_front_pvio_back(peer_bin, link(1), 1_000_000,
                                                                  None))


@pytest.mark.slow
def test_pvio_front_c_back_million(peer_bin, link):
    report("pvio front -> C back, 1 page", run_pvio_front_c_back(peer_bin, link(1), 1_000_000,
                                                                  None))


def test_c_front_pvio_back_four_pages(peer_bin, link):
    lk = link(4)
    report("C front -> pvio back, 4 pages", run_c_front_pvio_back(peer_bin, lk, 200_000, None))


def test_pvio_front_c_back_four_pages(peer_bin, link):
    lk = link(4)
    report("pvio front -> C back, 4 pages", run_pvio_front_c_back(peer_bin, lk, 200_000, None))


@pytest.mark.parametrize("pages", [1, 4])
def test_c_front_pvio_back_wrap_2_32(peer_bin, link, pages):
    """Indices start 1000 below 2**32 and wrap mid-run on both sides."""
    run_c_front_pvio_back(peer_bin, link(pages), 50_000, 2**32 - 1000)


@pytest.mark.parametrize("pages", [1, 4])
def test_pvio_front_c_back_wrap_2_32(peer_bin, link, pages):
    run_pvio_front_c_back(peer_bin, link(pages), 50_000, 2**32 - 1000)


def test_c_peer_rejects_bogus_pvio_indices(peer_bin, link):
    """The C peer is a real checker, not a rubber stamp: a bogus req_prod makes it fail."""
    lk = link(1)
    front = FrontRing.init(BLKIF, lk.ring_buf)
    with running(lk.argv(peer_bin, "back", 10, None), lk.fds) as proc:
        struct.pack_into("<I", lk.ring_buf, 0, front.nr_ents + 5)  # req_prod past the ring
        lk.chan.notify()
        rc = proc.wait(timeout=10)
        err = proc.stderr.read()
        assert rc == 2, err
        assert "req_prod" in err
