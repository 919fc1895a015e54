"""pvio's byte rings against Xen's C: flex rings (io/ring.h) and the console (io/console.h).

Flex: pvio's ``flex_rings`` ends against ``DEFINE_XEN_FLEX_RING(test)``'s own
``test_write_packet``/``test_read_packet``/``test_queued``, driven the way
pvcalls and 9pfs drive them (space from ``_queued``, then one packet call).
The packet functions only move masked indices in the caller's variables, so
the data areas are compared byte for byte and pvio's *published* indices are
compared with the C caller's full and masked indices.

Console: pvio's ``console_rings`` ends against a reader/writer written the way
Linux hvc_xen and xenconsoled use ``MASK_XENCONS_IDX`` on a real
``struct xencons_interface``; there both sides publish, so whole pages compare.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio import _cgen, layouts
from pvio.ring import RingBrokenError, console_rings, flex_queued, flex_rings

U32 = 0xFFFFFFFF
ORDERS = [0, 1, 2, 3]
INTF = {f.name: f.offset for f in _cgen.fields(layouts.flex_ring_intf)}
CONS = {f.name: f.offset for f in _cgen.fields(layouts.xencons_interface)}


def u32(buf, off) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def put_u32(buf, off, v) -> None:
    struct.pack_into("<I", buf, off, v & U32)


# ---------------------------------------------------------------------------
# Sizes, masks, queued
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_flex_ring_size(xen, order):
    assert layouts.flex_ring_size(order) == xen.lib.shim_flex_ring_size(order)
    assert layouts.flex_ring_size(order) == [2048, 4096, 8192, 16384][order]
    intf, data = bytearray(4096), bytearray(2 * layouts.flex_ring_size(order))
    for ring in flex_rings(intf, data, order, frontend=True):
        assert ring.size == xen.lib.shim_flex_ring_size(order)


@pytest.mark.parametrize("order", ORDERS)
def test_flex_queued_edge_cases(xen, order):
    size = layouts.flex_ring_size(order)
    cases = [
        (0, 0, 0),  # empty
        (size, 0, size),  # full: masked indices equal, raw indices differ
        (7, 7, 0),
        (U32, U32, 0),
        (size + 5, 5, size),
        (2 * size, 0, size),  # a bogus gap that also masks to equal
        (1, 0, 1),
        (3, U32, 4),  # across 2**32
        (0, U32 - size + 1, size),  # full across 2**32
        (size - 1, 0, size - 1),
    ]
    for prod, cons, expected in cases:
        assert flex_queued(prod, cons, size) == expected, (prod, cons)
        assert xen.lib.test_queued(prod, cons, size) == expected, (prod, cons)
    # garbage (a consumer ahead of the producer) still agrees with C
    for prod, cons in [(0, 1), (5, 9), (0, size + 1)]:
        assert flex_queued(prod, cons, size) == xen.lib.test_queued(prod, cons, size)


@settings(max_examples=300, deadline=None)
@given(
    prod=st.integers(0, U32),
    cons=st.integers(0, U32),
    shift=st.integers(0, 24),
    near=st.booleans(),
    gap=st.integers(0, 1 << 25),
)
def test_flex_queued_matches_c(xen, prod, cons, shift, near, gap):
    size = 1 << shift
    if near:  # the interesting region: cons a little behind prod
        cons = (prod - gap % (2 * size + 1)) & U32
    assert flex_queued(prod, cons, size) == xen.lib.test_queued(prod, cons, size)


@settings(max_examples=100, deadline=None)
@given(idx=st.integers(0, U32))
def test_flex_and_console_masks(xen, idx):
    for order in ORDERS:
        size = layouts.flex_ring_size(order)
        assert xen.lib.test_mask(idx, size) == idx & (size - 1)
    assert xen.lib.shim_mask_xencons_in(idx) == idx & (layouts.XENCONS_IN_SIZE - 1)
    assert xen.lib.shim_mask_xencons_out(idx) == idx & (layouts.XENCONS_OUT_SIZE - 1)


def test_console_sizes_and_masks(xen):
    assert xen.struct_size["xencons_interface"] == 3088 == _cgen.sizeof(layouts.xencons_interface)
    assert xen.lib.shim_mask_xencons_in(U32) == 1023
    assert xen.lib.shim_mask_xencons_out(U32) == 2047
    page = bytearray(4096)
    tx, rx = console_rings(page, frontend=True)  # guest: writes out, reads in
    assert (tx.size - 1, rx.size - 1) == (2047, 1023)
    tx, rx = console_rings(page, frontend=False)
    assert (tx.size - 1, rx.size - 1) == (1023, 2047)


# ---------------------------------------------------------------------------
# Flex rings: pvio ends vs test_write_packet / test_read_packet
# ---------------------------------------------------------------------------


class CFlex:
    """One flex direction as pvcalls/9pfs drive it with the header's functions."""

    def __init__(self, xen, size: int, start: int, junk: bytes) -> None:
        self.xen, self.size = xen, size
        self.prod = self.cons = start
        self.data = bytearray(junk)
        self.ptr = xen.ffi.from_buffer("unsigned char[]", self.data)

    def write(self, src: bytes) -> tuple[int, int]:
        lib, ffi = self.xen.lib, self.xen.ffi
        space = self.size - lib.test_queued(self.prod, self.cons, self.size)
        n = min(len(src), space)
        masked_prod = ffi.new("RING_IDX *", lib.test_mask(self.prod, self.size))
        lib.test_write_packet(self.ptr, src, n, masked_prod, lib.test_mask(self.cons, self.size),
                              self.size)
        self.prod = (self.prod + n) & U32
        return n, masked_prod[0]

    def read(self, want: int) -> tuple[bytes, int]:
        lib, ffi = self.xen.lib, self.xen.ffi
        n = min(want, lib.test_queued(self.prod, self.cons, self.size))
        out = ffi.new("unsigned char[]", max(n, 1))
        masked_cons = ffi.new("RING_IDX *", lib.test_mask(self.cons, self.size))
        lib.test_read_packet(out, self.ptr, n, lib.test_mask(self.prod, self.size), masked_cons,
                             self.size)
        self.cons = (self.cons + n) & U32
        return bytes(ffi.buffer(out, n)), masked_cons[0]


def _flex_pair(xen, order, direction, start, seed):
    """pvio's writer/reader of one direction, and the C model of the same."""
    size = layouts.flex_ring_size(order)
    rng = random.Random(seed)
    junk = rng.randbytes(2 * size)
    intf, data = bytearray(rng.randbytes(4096)), bytearray(junk)
    prefix = direction  # "in" or "out"
    put_u32(intf, INTF[f"{prefix}_prod"], start)
    put_u32(intf, INTF[f"{prefix}_cons"], start)
    front_tx, front_rx = flex_rings(intf, data, order, frontend=True)
    back_tx, back_rx = flex_rings(intf, data, order, frontend=False)
    # out: the frontend writes, the backend reads; in: the reverse
    writer, reader = (front_tx, back_rx) if direction == "out" else (back_tx, front_rx)
    half = slice(size, 2 * size) if direction == "out" else slice(0, size)
    model = CFlex(xen, size, start, junk[half])
    return intf, data, half, writer, reader, model, rng


def _check_flex(intf, data, half, model, direction, what):
    size = model.size
    assert data[half] == model.data, f"{what}: data areas differ"
    prod, cons = u32(intf, INTF[f"{direction}_prod"]), u32(intf, INTF[f"{direction}_cons"])
    assert (prod, cons) == (model.prod, model.cons), what
    return prod & (size - 1), cons & (size - 1)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("direction", ["in", "out"])
@settings(max_examples=30, deadline=None)
@given(
    start=st.one_of(st.integers(0, 4096), st.integers(2**32 - 40000, U32), st.integers(0, U32)),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_flex_wrapped_transfers_match_c(xen, order, direction, start, seed, data):
    intf, area, half, writer, reader, model, rng = _flex_pair(xen, order, direction, start, seed)
    other = bytes(area[slice(0, model.size) if half.start else slice(model.size, None)])
    size = model.size
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        n = data.draw(
            st.one_of(st.integers(0, 64), st.integers(0, size + 64)), label="n"
        )
        if data.draw(st.booleans(), label="write"):
            payload = rng.randbytes(n)
            got = writer.write(payload)
            want, masked_prod = model.write(payload)
            assert got == want
            mp, _ = _check_flex(intf, area, half, model, direction, f"write({n})")
            assert mp == masked_prod  # pvio published what C's masked_prod says
        else:
            got = reader.read(n)
            want, masked_cons = model.read(n)
            assert got == want
            _, mc = _check_flex(intf, area, half, model, direction, f"read({n})")
            assert mc == masked_cons
    # the other direction's half and indices were not touched
    assert bytes(area[slice(0, size) if half.start else slice(size, None)]) == other


@pytest.mark.parametrize("order", ORDERS)
def test_flex_write_that_wraps_is_two_copies_like_c(xen, order):
    size = layouts.flex_ring_size(order)
    start = (2**32 - 10) & U32  # the masked index is size - 10: a 30-byte write wraps
    intf, area, half, writer, reader, model, _ = _flex_pair(xen, order, "out", start, 1)
    payload = bytes(range(1, 31))
    assert writer.write(payload) == model.write(payload)[0] == 30
    _check_flex(intf, area, half, model, "out", "wrapped write")
    assert area[half][size - 10:] == payload[:10]
    assert area[half][:20] == payload[10:]
    assert reader.read(30) == model.read(30)[0] == payload
    # fill to exactly full: queued == size on both sides, then nothing fits
    big = bytes(range(256)) * (size // 256)
    assert writer.write(big) == model.write(big)[0] == size
    assert xen.lib.test_queued(model.prod, model.cons, size) == size
    assert flex_queued(u32(intf, INTF["out_prod"]), u32(intf, INTF["out_cons"]), size) == size
    assert writer.write(b"x") == model.write(b"x")[0] == 0
    _check_flex(intf, area, half, model, "out", "full")


# ---------------------------------------------------------------------------
# Console: pvio ends vs hvc_xen/xenconsoled-style C over MASK_XENCONS_IDX
# ---------------------------------------------------------------------------


def _c_console(xen, page):
    ffi, lib = xen.ffi, xen.lib
    ptr = ffi.from_buffer("char[]", page)

    def write(direction, data):
        return getattr(lib, f"shim_cons_write_{direction}")(ptr, data, len(data))

    def read(direction, n):
        out = ffi.new("char[]", max(n, 1))
        got = getattr(lib, f"shim_cons_read_{direction}")(ptr, out, n)
        return None if got < 0 else ffi.buffer(out, got)[:]

    return write, read


@settings(max_examples=60, deadline=None)
@given(
    starts=st.tuples(*[st.one_of(st.integers(0, 5000), st.integers(0, U32))] * 2),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_console_transfers_match_c(xen, starts, seed, data):
    rng = random.Random(seed)
    base = rng.randbytes(4096)
    py, cpage = bytearray(base), bytearray(base)
    for page in (py, cpage):
        for direction, s in zip(("in", "out"), starts, strict=True):
            put_u32(page, CONS[f"{direction}_prod"], s)
            put_u32(page, CONS[f"{direction}_cons"], s)
    guest_tx, guest_rx = console_rings(py, frontend=True)  # writes out, reads in
    back_tx, back_rx = console_rings(py, frontend=False)  # writes in, reads out
    writers = {"out": guest_tx, "in": back_tx}
    readers = {"out": back_rx, "in": guest_rx}
    c_write, c_read = _c_console(xen, cpage)
    for _ in range(data.draw(st.integers(1, 16), label="steps")):
        direction = data.draw(st.sampled_from(["in", "out"]), label="direction")
        n = data.draw(st.one_of(st.integers(0, 100), st.integers(0, 2200)), label="n")
        if data.draw(st.booleans(), label="write"):
            payload = rng.randbytes(n)
            assert writers[direction].write(payload) == c_write(direction, payload)
        else:
            assert readers[direction].read(n) == c_read(direction, n)
        assert py == cpage, f"{direction}: console pages differ"


@pytest.mark.parametrize("direction", ["in", "out"])
@pytest.mark.parametrize("gap_over", [1, 2, 1000, 2**31])
@pytest.mark.parametrize("end", ["writer", "reader"])
def test_console_gap_larger_than_buffer_is_refused(xen, direction, gap_over, end):
    size = {"in": layouts.XENCONS_IN_SIZE, "out": layouts.XENCONS_OUT_SIZE}[direction]
    prod = 0x10
    cons = (prod - size - gap_over) & U32
    py, cpage = bytearray(4096), bytearray(4096)
    for page in (py, cpage):
        put_u32(page, CONS[f"{direction}_prod"], prod)
        put_u32(page, CONS[f"{direction}_cons"], cons)
    guest = dict(zip(("out", "in"), console_rings(py, frontend=True), strict=True))
    back = dict(zip(("in", "out"), console_rings(py, frontend=False), strict=True))
    ring = {("out", "writer"): guest["out"], ("out", "reader"): back["out"],
            ("in", "writer"): back["in"], ("in", "reader"): guest["in"]}[direction, end]
    c_write, c_read = _c_console(xen, cpage)
    if end == "writer":
        assert c_write(direction, b"x") == -1
        with pytest.raises(RingBrokenError):
            ring.write(b"x")
    else:
        assert c_read(direction, 16) is None
        with pytest.raises(RingBrokenError):
            ring.read()
    assert py == cpage  # neither side moved anything
    # pvio stays broken even after the peer repairs its index
    put_u32(py, CONS[f"{direction}_cons"], prod)
    with pytest.raises(RingBrokenError):
        ring.write(b"x") if end == "writer" else ring.read()


@pytest.mark.parametrize("direction", ["in", "out"])
def test_console_exactly_full_is_not_a_gap(xen, direction):
    size = {"in": layouts.XENCONS_IN_SIZE, "out": layouts.XENCONS_OUT_SIZE}[direction]
    prod = 5
    cons = (prod - size) & U32
    base = bytes(range(256)) * 16
    py, cpage = bytearray(base), bytearray(base)
    for page in (py, cpage):
        put_u32(page, CONS[f"{direction}_prod"], prod)
        put_u32(page, CONS[f"{direction}_cons"], cons)
    guest = dict(zip(("out", "in"), console_rings(py, frontend=True), strict=True))
    back = dict(zip(("in", "out"), console_rings(py, frontend=False), strict=True))
    writer = guest["out"] if direction == "out" else back["in"]
    reader = back["out"] if direction == "out" else guest["in"]
    c_write, c_read = _c_console(xen, cpage)
    assert writer.write(b"x") == c_write(direction, b"x") == 0
    assert reader.read() == c_read(direction, size)
    assert py == cpage
