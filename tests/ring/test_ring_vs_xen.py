"""pvio's FrontRing/BackRing against the io/ring.h macros, compiled from Xen's header.

Part 1 is reference-protocol.md section 7, ring checks 1-8, each computed both
by pvio and by the real macros (and against the literal vectors). Part 2 runs
random legal operation sequences on a pvio ring over one buffer and on the C
macros over another, from arbitrary start indices (near 2**32 too) and for
1..16-page rings of several slot sizes; after every step the two shared pages
must be byte-identical and every decision and count equal.
"""

from __future__ import annotations

import random
import struct

import pytest
from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio import _cgen, layouts
from pvio.ring import (
    BLKIF,
    NETIF_RX,
    NETIF_TX,
    BackRing,
    FrontRing,
    RingBrokenError,
    RingSpec,
    need_notify,
    request_cons_overflow,
    request_prod_overflow,
    response_prod_overflow,
    shared_ring_init,
)

U32 = 0xFFFFFFFF
PAGE = layouts.XEN_PAGE_SIZE

# pvio specs of the ring types compiled into the shim (name = the C tag).
SPECS = {
    "blkif": BLKIF,
    "netif_tx": NETIF_TX,
    "netif_rx": NETIF_RX,
    "xen_netif_ctrl": RingSpec(
        "xen_netif_ctrl", Struct("raw" / Bytes(16)), Struct("raw" / Bytes(12))
    ),
    "tiny": RingSpec("tiny", Struct("v" / Int16ul), Struct("v" / Int8ul)),
    "wide": RingSpec(
        "wide", Struct("v" / Int32ul), Struct("a" / Int64ul, "b" / Int64ul, "c" / Int64ul)
    ),
    "odd": RingSpec(
        "odd", Struct("a" / Int16ul, "b" / Int16ul, "c" / Int16ul), Struct("v" / Int32ul)
    ),
}
# Ring types whose slot is max(request, response): pvio's RingSpec model.
DIFF_TYPES = ["blkif", "netif_tx", "netif_rx", "xen_netif_ctrl", "tiny", "wide"]
PAGES = [1, 2, 4, 8, 16]


class CRing:
    """Both ends of a ring driven by the io/ring.h macros over ``page``."""

    def __init__(self, xen, t: str, page: bytearray, start: int | None) -> None:
        self.xen, self.t, self.page = xen, t, page
        ffi = xen.ffi
        self.ptr = ffi.from_buffer("uint8_t[]", page)
        self.front = ffi.new(f"struct {t}_front_ring *")
        self.back = ffi.new(f"struct {t}_back_ring *")
        if start is None:
            self.fn("front_init")(self.front, self.ptr, len(page))
            self.fn("back_init")(self.back, self.ptr, len(page))
        else:
            self.fn("front_attach")(self.front, self.ptr, len(page), start)
            self.fn("back_attach")(self.back, self.ptr, len(page), start)
        self.req_size = self.fn("req_size")()
        self.rsp_size = self.fn("rsp_size")()

    def fn(self, name):
        return self.xen.ring(self.t, name)

    def put_requests(self, data: bytes) -> int:
        return self.fn("front_put")(self.front, data, len(data) // self.req_size)

    def push_requests(self) -> bool:
        return bool(self.fn("front_push_check")(self.front))

    def take_requests(self, m: int) -> bytes | None:
        buf = self.xen.ffi.new("uint8_t[]", max(m, 1) * self.req_size)
        n = self.fn("back_take")(self.back, buf, m)
        return None if n < 0 else bytes(self.xen.ffi.buffer(buf, n * self.req_size))

    def put_responses(self, data: bytes) -> None:
        self.fn("back_put")(self.back, data, len(data) // self.rsp_size)

    def push_responses(self) -> bool:
        return bool(self.fn("back_push_check")(self.back))

    def take_responses(self, m: int) -> bytes | None:
        buf = self.xen.ffi.new("uint8_t[]", max(m, 1) * self.rsp_size)
        n = self.fn("front_take")(self.front, buf, m)
        return None if n < 0 else bytes(self.xen.ffi.buffer(buf, n * self.rsp_size))

    def final_check_for_responses(self) -> int:
        return self.fn("front_final_check")(self.front)

    def final_check_for_requests(self) -> int:
        return self.fn("back_final_check")(self.back)

    @property
    def free_requests(self) -> int:
        return self.fn("free_requests")(self.front)

    @property
    def full(self) -> bool:
        return bool(self.fn("full")(self.front))

    @property
    def unconsumed_responses(self) -> int:
        return self.fn("unconsumed_responses")(self.front)

    @property
    def unconsumed_requests(self) -> int:
        return self.fn("unconsumed_requests")(self.back)


def header(page) -> tuple[int, int, int, int]:
    """(req_prod, req_event, rsp_prod, rsp_event) of a shared page."""
    return struct.unpack_from("<IIII", page, 0)


def set_header(page, req_prod=None, req_event=None, rsp_prod=None, rsp_event=None):
    for off, v in ((0, req_prod), (4, req_event), (8, rsp_prod), (12, rsp_event)):
        if v is not None:
            struct.pack_into("<I", page, off, v & U32)


def assert_pages_equal(py: bytearray, cpage: bytearray, slot_size: int, what: str) -> None:
    if py == cpage:
        return
    first = next(i for i in range(len(py)) if py[i] != cpage[i])
    where = "header" if first < 64 else f"slot {(first - 64) // slot_size}"
    raise AssertionError(
        f"{what}: shared pages differ first at byte {first} ({where}): "
        f"pvio {py[first:first + 16].hex()} vs C {cpage[first:first + 16].hex()}"
    )


# ---------------------------------------------------------------------------
# Section 7, ring checks 1-8
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", list(SPECS))
def test_check1_sring_header_offsets(xen, t):
    s = f"{t}_sring"
    names = ["req_prod", "req_event", "rsp_prod", "rsp_event", "pvt", "__pad", "ring"]
    expected = [0, 4, 8, 12, 16, 20, 64]
    assert [xen.member_offset[s, n] for n in names] == expected
    pvio_off = {f.name: f.offset for f in _cgen.fields(layouts.sring_header)}
    assert [pvio_off[n] for n in names[:-1]] == expected[:-1]
    assert layouts.SRING_HEADER_SIZE == xen.ring(t, "ring_offset")() == 64


@pytest.mark.parametrize("t", list(SPECS))
def test_ring_spec_sizes_equal_c(xen, t):
    spec = SPECS[t]
    assert spec.req_size == xen.ring(t, "req_size")()
    assert spec.rsp_size == xen.ring(t, "rsp_size")()


@pytest.mark.parametrize("t", list(SPECS))
def test_slot_size_is_sizeof_the_sring_entry_union(xen, t):
    """RingSpec.slot_size claims to be ``sizeof(union X_sring_entry)``.

    For ``odd`` (6-byte request of u16s, 4-byte u32 response) C pads the union
    to 8 bytes for the response's alignment; max(req, rsp) is 6.
    """
    assert SPECS[t].slot_size == xen.ring(t, "slot_size")()
    # ... and hence where the slots are and how many fit in a page
    assert SPECS[t].nr_ents(1) == xen.ring(t, "const_ring_size")(PAGE)


NR_ENTS = {  # reference section 1 table; 16 pages continue the doubling
    "blkif": [32, 64, 128, 256, 512],
    "netif_tx": [256, 512, 1024, 2048, 4096],
    "netif_rx": [256, 512, 1024, 2048, 4096],
    "xen_netif_ctrl": [128, 256, 512, 1024, 2048],
}


@pytest.mark.parametrize("t", DIFF_TYPES)
def test_check2_nr_ents(xen, t):
    for i, pages in enumerate(PAGES):
        size = pages * PAGE
        c_n = xen.ring(t, "const_ring_size")(size)
        if t in NR_ENTS:
            assert c_n == NR_ENTS[t][i]
        assert SPECS[t].nr_ents(pages) == c_n, pages
        # and as attached (__RING_SIZE on the actual pointer)
        cpage = bytearray(size)
        cr = CRing(xen, t, cpage, None)
        assert cr.front.nr_ents == cr.back.nr_ents == c_n
        py = bytearray(size)
        assert FrontRing.init(SPECS[t], py).nr_ents == c_n
        assert BackRing.attach(SPECS[t], py).nr_ents == c_n


@pytest.mark.parametrize("t", DIFF_TYPES)
def test_check3_init_state(xen, t):
    base = bytes(range(256)) * (2 * PAGE // 256)
    py, cpage = bytearray(base), bytearray(base)
    FrontRing.init(SPECS[t], py)
    CRing(xen, t, cpage, None)
    assert py == cpage
    assert header(py) == (0, 1, 0, 1)
    assert py[16:64] == bytes(48)
    assert py[64:] == base[64:]  # the slots are not touched
    other = bytearray(base)
    shared_ring_init(other)
    assert other == py


NOTIFY_VECTORS = [
    ((0, 1, 1), True),
    ((1, 5, 1), False),
    ((1, 5, 2), True),
    ((5, 6, 7), False),
    ((0, 0, 1), False),
    ((10, 20, 20), True),
    ((10, 20, 21), False),
    ((10, 20, 11), True),
    ((10, 20, 10), False),
    ((0xFFFFFFFE, 2, 0xFFFFFFFF), True),
    ((0xFFFFFFFE, 2, 3), False),
]


@pytest.mark.parametrize(("vector", "expected"), NOTIFY_VECTORS)
def test_check4_notify_vectors(xen, vector, expected):
    old, new, event = vector
    assert need_notify(old, new, event) is expected
    # requests: old published req_prod, new = req_prod_pvt, event = req_event
    py, cpage = bytearray(PAGE), bytearray(PAGE)
    for page in (py, cpage):
        set_header(page, req_prod=old, req_event=event, rsp_prod=old, rsp_event=event)
    front = FrontRing.attach(BLKIF, py, new)
    cr = CRing(xen, "blkif", cpage, new)
    assert front.push_requests() is expected
    assert cr.push_requests() is expected
    # responses: the mirror image on the back end
    back = BackRing.attach(BLKIF, py, new)
    assert back.push_responses() is expected
    assert cr.push_responses() is expected
    assert header(py) == header(cpage) == (new, event, new, event)
    assert py == cpage


@pytest.mark.parametrize(("prod", "work", "event"), [(7, 0, 8), (9, 2, 0x55)])
def test_check5_final_check(xen, prod, work, event):
    for side in ("responses", "requests"):
        py, cpage = bytearray(PAGE), bytearray(PAGE)
        for page in (py, cpage):
            set_header(page, req_prod=prod, req_event=0x55, rsp_prod=prod, rsp_event=0x55)
        cr = CRing(xen, "blkif", cpage, 7)
        if side == "responses":
            front = FrontRing.attach(BLKIF, py, 7)
            assert front.final_check_for_responses() == work
            assert cr.final_check_for_responses() == work
            assert header(py)[3] == header(cpage)[3] == event
        else:
            back = BackRing.attach(BLKIF, py, 7)
            assert back.final_check_for_requests() == work
            assert cr.final_check_for_requests() == work
            assert header(py)[1] == header(cpage)[1] == event
        assert py == cpage


def test_check6_unconsumed_requests(xen):
    py, cpage = bytearray(PAGE), bytearray(PAGE)
    for page in (py, cpage):
        set_header(page, req_prod=60)
    back = BackRing.attach(BLKIF, py, 40)  # rsp_prod_pvt = req_cons = 40
    cr = CRing(xen, "blkif", cpage, 40)
    assert len(back.take_requests()) == 20 * BLKIF.req_size  # req_cons = 60
    assert len(cr.take_requests(32)) == 20 * BLKIF.req_size
    for page in (py, cpage):
        set_header(page, req_prod=100)
    assert (back.req_cons, back.rsp_prod_pvt) == (cr.back.req_cons, cr.back.rsp_prod_pvt)
    assert back.unconsumed_requests == cr.unconsumed_requests == 12
    assert back.final_check_for_requests() == cr.final_check_for_requests() == 12


@pytest.mark.parametrize(
    ("rsp_prod_pvt", "cons", "expected"), [(10, 41, False), (10, 42, True)]
)
def test_check7_request_cons_overflow(xen, rsp_prod_pvt, cons, expected):
    cr = CRing(xen, "blkif", bytearray(PAGE), rsp_prod_pvt)
    assert request_cons_overflow(cons, rsp_prod_pvt, 32) is expected
    assert bool(xen.ring("blkif", "request_cons_overflow")(cr.back, cons)) is expected


@pytest.mark.parametrize(
    ("rsp_prod_pvt", "prod", "expected"),
    [(10, 42, False), (10, 43, True), (10, 9, True), (0xFFFFFFF0, 0x10, False),
     (0xFFFFFFF0, 0x11, True)],
)
def test_check7_request_prod_overflow(xen, rsp_prod_pvt, prod, expected):
    assert request_prod_overflow(prod, rsp_prod_pvt, 32) is expected
    py, cpage = bytearray(PAGE), bytearray(PAGE)
    for page in (py, cpage):
        set_header(page, req_prod=prod)
    cr = CRing(xen, "blkif", cpage, rsp_prod_pvt)
    assert bool(xen.ring("blkif", "request_prod_overflow")(cr.back, prod)) is expected
    # and as a backend sees it: a bogus req_prod is fatal, nothing is consumed
    back = BackRing.attach(BLKIF, py, rsp_prod_pvt)
    got = cr.take_requests(64)
    if expected:
        assert got is None
        with pytest.raises(RingBrokenError):
            back.take_requests()
        assert back.broken and back.req_cons == rsp_prod_pvt
    else:
        assert len(got) == len(back.take_requests()) == ((prod - rsp_prod_pvt) & U32) * 112
        assert back.req_cons == cr.back.req_cons == prod


@pytest.mark.parametrize(("prod", "expected"), [(37, False), (38, True)])
def test_check7_response_prod_overflow(xen, prod, expected):
    assert response_prod_overflow(prod, 5, 32) is expected
    py, cpage = bytearray(PAGE), bytearray(PAGE)
    cr = CRing(xen, "blkif", cpage, 5)
    assert bool(xen.ring("blkif", "response_prod_overflow")(cr.front, prod)) is expected
    # a frontend with all 32 requests outstanding, seeing rsp_prod = prod
    front = FrontRing.attach(BLKIF, py, 5)
    reqs = bytes(32 * 112)
    assert front.put_requests(reqs) == cr.put_requests(reqs) == 32
    front.push_requests()
    cr.push_requests()
    for page in (py, cpage):
        set_header(page, rsp_prod=prod)
    got = cr.take_responses(64)
    if expected:
        assert got is None
        with pytest.raises(RingBrokenError):
            front.take_responses()
        assert front.broken and front.rsp_cons == 5
    else:
        assert len(got) == len(front.take_responses()) == 32 * 16


@pytest.mark.parametrize("start", [0, 7, 0xFFFFFFF0])
def test_check8_free_full_and_slot_of_index(xen, start):
    py, cpage = bytearray(PAGE), bytearray(PAGE)
    front = FrontRing.attach(BLKIF, py, start)
    cr = CRing(xen, "blkif", cpage, start)
    assert front.free_requests == cr.free_requests == 32
    reqs = bytes(range(112)) * 33
    assert front.put_requests(reqs) == cr.put_requests(reqs) == 32  # the 33rd does not fit
    assert (front.req_prod_pvt - front.rsp_cons) & U32 == 32
    assert front.free_requests == cr.free_requests == 0
    assert front.full and cr.full
    assert py == cpage


def test_check8_index_33_is_slot_1(xen):
    cr = CRing(xen, "blkif", bytearray(PAGE), 0)
    assert xen.ring("blkif", "request_offset")(cr.front, 33) == 64 + 1 * 112
    assert xen.ring("blkif", "response_offset")(cr.back, 33) == 64 + 1 * 112
    py, cpage = bytearray(PAGE), bytearray(PAGE)
    front = FrontRing.attach(BLKIF, py, 33)
    cr = CRing(xen, "blkif", cpage, 33)
    marker = bytes([0xA5]) * 112
    assert front.put_requests(marker) == cr.put_requests(marker) == 1
    assert py[64 + 112:64 + 224] == marker
    assert py == cpage


# ---------------------------------------------------------------------------
# Differential: random legal operation sequences
# ---------------------------------------------------------------------------

START = st.one_of(
    st.none(),  # XEN_FRONT_RING_INIT / BACK_RING_INIT
    st.integers(0, 64),
    st.integers(2**32 - 300, 2**32 - 1),  # wraps through 2**32 during the run
    st.integers(0, U32),
)
OPS = ["put", "push_req", "back_take", "back_put", "push_rsp", "front_take",
       "front_final", "back_final"]


class Differential:
    def __init__(self, xen, t, pages, start, events, seed):
        self.spec = spec = SPECS[t]
        self.rng = random.Random(seed)
        size = pages * PAGE
        base = self.rng.randbytes(size)  # slots hold junk: untouched bytes must stay
        self.py, self.cpage = bytearray(base), bytearray(base)
        if start is not None:
            for page in (self.py, self.cpage):
                set_header(page, req_prod=start, req_event=events[0], rsp_prod=start,
                           rsp_event=events[1])
            self.front = FrontRing.attach(spec, self.py, start)
        else:
            self.front = FrontRing.init(spec, self.py)
        self.back = BackRing.attach(spec, self.py, start or 0)
        self.c = CRing(xen, t, self.cpage, start)
        self.check("attach")

    def check(self, what):
        f, b, c = self.front, self.back, self.c
        assert_pages_equal(self.py, self.cpage, self.spec.slot_size, what)
        assert (f.req_prod_pvt, f.rsp_cons) == (c.front.req_prod_pvt, c.front.rsp_cons), what
        assert (b.rsp_prod_pvt, b.req_cons) == (c.back.rsp_prod_pvt, c.back.req_cons), what
        assert f.nr_ents == b.nr_ents == c.front.nr_ents == c.back.nr_ents
        assert f.free_requests == c.free_requests, what
        assert f.full == c.full, what
        assert f.unconsumed_responses == c.unconsumed_responses, what
        assert b.unconsumed_requests == c.unconsumed_requests, what
        # RING_HAS_UNCONSUMED_* are counts too (XEN_RING_HAS_UNCONSUMED_IS_BOOL unset)
        assert f.unconsumed_responses == c.fn("has_unconsumed_responses")(c.front), what
        assert b.unconsumed_requests == c.fn("has_unconsumed_requests")(c.back), what

    def step(self, op, n):
        f, b, c, spec = self.front, self.back, self.c, self.spec
        if op == "put":
            data = self.rng.randbytes(n * spec.req_size)
            assert f.put_requests(data) == c.put_requests(data)
        elif op == "push_req":
            assert f.push_requests() == c.push_requests()
        elif op == "back_take":
            assert bytes(b.take_requests(n)) == c.take_requests(n)
        elif op == "back_put":
            data = self.rng.randbytes(n * spec.rsp_size)
            assert b.put_responses(data) == n
            c.put_responses(data)
        elif op == "push_rsp":
            assert b.push_responses() == c.push_responses()
        elif op == "front_take":
            assert bytes(f.take_responses(n)) == c.take_responses(n)
        elif op == "front_final":
            assert f.final_check_for_responses() == c.final_check_for_responses()
        elif op == "back_final":
            assert b.final_check_for_requests() == c.final_check_for_requests()
        self.check(f"{op}({n})")

    def bound(self, op) -> int:
        """The largest legal count for ``op`` now."""
        f, b = self.front, self.back
        if op == "put":
            return f.free_requests + 2  # put stops at RING_FULL on both sides
        if op == "back_put":
            return b.pending_responses
        return f.nr_ents  # takes are bounded by what is there


@pytest.mark.parametrize("t", DIFF_TYPES)
@settings(max_examples=100, deadline=None)
@given(
    pages=st.sampled_from(PAGES),
    start=START,
    events=st.tuples(st.integers(0, U32), st.integers(0, U32)),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_random_operation_sequences_match_c(xen, t, pages, start, events, seed, data):
    if start is not None and data.draw(st.booleans(), label="events follow start"):
        events = (start + 1, start + 1)
    d = Differential(xen, t, pages, start, events, seed)
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(st.sampled_from(OPS), label="op")
        bound = d.bound(op)
        n = data.draw(st.integers(0, bound), label="n") if bound else 0
        d.step(op, n)


@pytest.mark.parametrize("t", DIFF_TYPES)
@pytest.mark.parametrize("pages", PAGES)
def test_full_cycles_across_the_2_32_wrap(xen, t, pages):
    """Fill the ring, answer everything, several times, crossing 2**32 midway."""
    nr = SPECS[t].nr_ents(pages)
    start = (2**32 - nr - nr // 2) & U32
    d = Differential(xen, t, pages, start, (start + 1, start + 1), seed=pages)
    for _ in range(3):
        for op, n in (("put", nr), ("push_req", 0), ("back_take", nr), ("back_final", 0),
                      ("back_put", nr), ("push_rsp", 0), ("front_take", nr),
                      ("front_final", 0)):
            d.step(op, n)
    assert (d.front.rsp_cons - start) & U32 == 3 * nr
