"""The C fast paths of netif (pvio/ring/cnet.c) against the Python references
in pvio.netif, on hand-picked and random (hostile) slots: same packets, same
responses, same refusals, same protocol errors."""

from __future__ import annotations

import random
import struct

import pytest

from pvio import netif
from pvio.layouts import (
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_PAGE_SIZE,
)
from pvio.netif import (
    EXTRA,
    RX_RSP,
    TX_REQ,
    NetifFatal,
    RxProtocolError,
    TxPacket,
    assemble,
    assemble_c,
    parse_rx_responses,
    parse_rx_responses_c,
)

FLAG_BITS = (1, 2, 4, 8)


def _random_flags(rng: random.Random, p_more_data: float, p_other: float) -> int:
    """Slot flags, each bit drawn on its own (bit 4, more_data, with its own odds)."""
    return sum(bit for bit in FLAG_BITS
               if rng.random() < (p_more_data if bit == 4 else p_other))


def _tx_slots(rng: random.Random, count: int) -> bytes:
    out = []
    for _ in range(count):
        if rng.random() < 0.2:  # an extra-info slot
            raw = bytearray(12)
            etype = rng.choice((1, 1, 1, 2, 3, 4, 0, 5, 255))
            gso_type = rng.choice((1, 2, 0, 3))
            EXTRA.pack_into(raw, 0, etype, rng.choice((0, XEN_NETIF_EXTRA_FLAG_MORE)),
                            rng.choice((0, 1448, 65535)), gso_type, 0, 0)
            struct.pack_into("<H", raw, 8, rng.randrange(65536))
            out.append(bytes(raw))
            continue
        flags = _random_flags(rng, 0.5, 0.25)
        size = rng.choice((0, 10, 14, 60, 1500, 4096, 4097, 9000, 65535, rng.randrange(65536)))
        offset = rng.choice((0, 0, 0, 100, 4000, 4096, rng.randrange(65536)))
        out.append(TX_REQ.pack(rng.randrange(1 << 32), offset, flags, rng.randrange(65536),
                               size))
    return b"".join(out)


def _same_tx(slots: bytes, **kw) -> None:
    try:
        want = assemble(memoryview(slots), **kw)
    except NetifFatal as exc:
        with pytest.raises(NetifFatal) as got:
            assemble_c(slots, **kw)
        assert str(got.value) == str(exc)
        return
    for r in want:
        if isinstance(r, TxPacket):
            r.mcast = []  # the C path validates multicast extras; netback floods
    assert assemble_c(slots, **kw) == want


@pytest.mark.parametrize("seed", range(300))
def test_tx_assemble_matches_the_python_reference(seed):
    rng = random.Random(seed)
    slots = _tx_slots(rng, rng.randrange(1, 40))
    accept = rng.choice(((), (XEN_NETIF_GSO_TYPE_TCPV4,),
                         (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6)))
    _same_tx(slots, max_slots=rng.choice((2, 18, 20)), accept_gso=accept)


def test_tx_assemble_well_formed_batches_match():
    """Mostly valid traffic (what fuzzing rarely produces): chains, GSO, csum."""
    rng = random.Random(7)
    for _ in range(200):
        slots = []
        for _ in range(rng.randrange(1, 12)):
            total = rng.randrange(14, 20000)
            chunks = -(-total // XEN_PAGE_SIZE)
            gso = rng.random() < 0.3
            flags = rng.choice((0, 1, 2, 3))
            first = flags | (4 if chunks > 1 else 0) | (8 if gso else 0)
            slots.append(TX_REQ.pack(rng.randrange(100), 0, first, rng.randrange(256), total))
            if gso:
                slots.append(netif.gso_extra(rng.randrange(256), 1448, rng.choice((1, 2))))
            for c in range(1, chunks):
                size = min(XEN_PAGE_SIZE, total - c * XEN_PAGE_SIZE)
                slots.append(TX_REQ.pack(rng.randrange(100), 0, 4 if c < chunks - 1 else 0,
                                         rng.randrange(256), size))
        _same_tx(b"".join(slots), accept_gso=(1, 2))


def test_tx_fatal_chains():
    cut = TX_REQ.pack(1, 0, 4, 1, 100)  # more_data, nothing follows
    with pytest.raises(NetifFatal, match="more_data"):
        assemble_c(cut)
    with pytest.raises(NetifFatal, match="extra-info"):
        assemble_c(TX_REQ.pack(1, 0, 8, 1, 100))


def _rx_slots(rng: random.Random, count: int) -> bytes:
    out = []
    for _ in range(count):
        if rng.random() < 0.15:
            raw = bytearray(8)
            EXTRA.pack_into(raw, 0, rng.choice((1, 1, 2)),
                            rng.choice((0, 0, XEN_NETIF_EXTRA_FLAG_MORE)),
                            rng.choice((0, 1448, 1448)), rng.choice((1, 2, 2, 3)), 0, 0)
            out.append(bytes(raw))
            continue
        flags = _random_flags(rng, 0.4, 0.15)
        hostile = rng.random() < 0.05
        status = rng.randrange(-32768, 32768) if hostile else rng.choice((0, 60, 1500, 4096, -1))
        offset = rng.randrange(65536) if hostile else rng.choice((0, 0, 0, 10))
        out.append(RX_RSP.pack(rng.randrange(65536), offset, flags, status))
    return b"".join(out)


@pytest.mark.parametrize("seed", range(300))
def test_rx_parse_matches_the_python_reference(seed):
    rng = random.Random(seed)
    raw = _rx_slots(rng, rng.randrange(1, 30))
    first = rng.choice((0, 5, 0xFFFFFFF0))
    gso_ok = rng.random() < 0.7
    try:
        want = parse_rx_responses(memoryview(raw), first, gso_ok=gso_ok)
    except RxProtocolError as exc:
        with pytest.raises(RxProtocolError) as got:
            parse_rx_responses_c(raw, first, gso_ok=gso_ok)
        assert str(got.value) == str(exc)
        return
    assert parse_rx_responses_c(raw, first, gso_ok=gso_ok) == want


# ---------------------------------------------------------------- RX fill (netback)
# The reference: netback's RX fill as it was written in Python (one response per
# posted request, in its slot; a page per fragment; a GSO extra after the first;
# every fragment ERROR when a copy failed).

RX_REQ = netif.RX_REQ


def _rx_fill_reference(reqs: bytes, frames, failed: set[int]):
    out = bytearray()
    copies = []
    slot = 0
    for p, (data, flags, gso_type, gso_size) in enumerate(frames):
        chunks = -(-len(data) // XEN_PAGE_SIZE)
        first = slot
        for c in range(chunks):
            rid, _, gref = RX_REQ.unpack_from(reqs, slot * RX_REQ.size)
            size = min(XEN_PAGE_SIZE, len(data) - c * XEN_PAGE_SIZE)
            f = flags if c == 0 else 0
            if c < chunks - 1:
                f |= netif.RXF_MORE_DATA
            if c == 0 and gso_type:
                f |= netif.RXF_EXTRA_INFO
            out += RX_RSP.pack(rid, 0, f, size)
            copies.append((gref, data[c * XEN_PAGE_SIZE:c * XEN_PAGE_SIZE + size]))
            slot += 1
            if c == 0 and gso_type:
                extra = bytearray(RX_RSP.size)
                netif.pack_extra_gso(extra, 0, gso_type, gso_size)
                out += extra
                slot += 1
        if p in failed:
            k = first
            for c in range(chunks):
                rid, off, f, _ = RX_RSP.unpack_from(out, k * RX_RSP.size)
                RX_RSP.pack_into(out, k * RX_RSP.size, rid, off, f, netif.RSP_ERROR)
                k += 2 if (c == 0 and gso_type) else 1
    return bytes(out), copies


@pytest.mark.parametrize("seed", range(40))
def test_rx_fill_matches_the_python_reference(seed):
    from array import array

    from pvio.ring import GrantMapper, GrantTable, PagePool, SharedMemory
    from pvio.ring._lib import ffi, lib

    rng = random.Random(seed)
    pool = PagePool(SharedMemory.create(64 * XEN_PAGE_SIZE))
    table = GrantTable.create(64)
    mapper = GrantMapper(table.shm, pool.shm, 0)
    try:
        frames = []
        for _ in range(rng.randrange(1, 6)):
            size = rng.choice((14, 60, 1514, 4096, 5000, 9000, 20000))
            gso = rng.choice((0, 0, 1, 2))
            frames.append((rng.randbytes(size), rng.choice((0, 1, 3)), gso, 1448 if gso else 0))
        need = sum(-(-len(d) // XEN_PAGE_SIZE) + (1 if g else 0) for d, _, g, _ in frames)
        failed = set()
        reqs = bytearray()
        pages = {}
        readonly = set()
        for _ in range(need):
            frame = pool.alloc()
            # a buffer the backend may not write: that frame's copy fails
            ref = table.grant_access(0, frame, readonly=rng.random() < 0.1)
            if table.entry(ref).flags & 4:  # GTF_readonly
                readonly.add(ref)
            pages[ref] = frame
            reqs += RX_REQ.pack(rng.randrange(256), 0, ref)
        # which frames the reference should fail: one with a read-only buffer
        slot = 0
        for p, (data, _, gso, _) in enumerate(frames):
            for c in range(-(-len(data) // XEN_PAGE_SIZE)):
                _, _, ref = RX_REQ.unpack_from(reqs, slot * RX_REQ.size)
                if ref in readonly:
                    failed.add(p)
                slot += 2 if (c == 0 and gso) else 1
        want_rsp, copies = _rx_fill_reference(bytes(reqs), frames, failed)

        gnt = ffi.new("pvio_net_gnt *")
        gnt.table, gnt.nr, gnt.domid = mapper.table.ptr, mapper.nr_entries, 0
        gnt.pool, gnt.nr_frames = mapper.pool.ptr, mapper.pool.pages
        gnt.rd_pins, gnt.wr_pins = mapper._rd, mapper._wr
        src = b"".join(d for d, _, _, _ in frames)
        lens = array("I", [len(d) for d, _, _, _ in frames])
        meta = array("I")
        for _, flags, gso, gso_size in frames:
            meta.extend((flags | gso << 16, gso_size))
        rsp = bytearray(need * RX_RSP.size)
        status = array("i", bytes(4 * len(frames)))
        refs = array("I", bytes(4 * len(frames)))
        ok = ffi.new("uint64_t *")
        used = lib.pvio_net_rx_fill(gnt, ffi.from_buffer(reqs), need, src, len(src),
                                    ffi.from_buffer("uint32_t[]", lens),
                                    ffi.from_buffer("uint32_t[]", meta), len(frames),
                                    ffi.from_buffer(rsp), ffi.from_buffer("int32_t[]", status),
                                    ffi.from_buffer("uint32_t[]", refs), ok)
        assert used == need
        assert bytes(rsp) == want_rsp
        assert {p for p, st in enumerate(status) if st} == failed
        assert ok[0] == sum(len(d) for p, (d, _, _, _) in enumerate(frames) if p not in failed)
        for ref, chunk in copies:
            if ref not in readonly:
                assert bytes(pool.shm.page(pages[ref])[:len(chunk)]) == chunk
        # too few requests for the frames: refused, nothing written
        assert lib.pvio_net_rx_fill(gnt, ffi.from_buffer(reqs), need - 1, src, len(src),
                                    ffi.from_buffer("uint32_t[]", lens),
                                    ffi.from_buffer("uint32_t[]", meta), len(frames),
                                    ffi.from_buffer(rsp), ffi.from_buffer("int32_t[]", status),
                                    ffi.from_buffer("uint32_t[]", refs), ok) == -1
    finally:
        mapper.close()
        table.close()
        pool.shm.close()


# ---------------------------------------------------------------- netfront TX
# The reference: netfront's TX fill as it was written in Python (ids from a
# stack, a page per fragment, the first slot's size is the frame's, a GSO extra
# after the first slot), and its response accounting.


def _tx_put_reference(free_ids: list[int], frames, free_slots: int):
    out = bytearray()
    pages = {}
    sent = 0
    for data, flags, gso_type, gso_size in frames:
        chunks = -(-len(data) // XEN_PAGE_SIZE)
        slots = chunks + (1 if gso_type else 0)
        if chunks > len(free_ids) or slots > free_slots:
            break
        free_slots -= slots
        for c in range(chunks):
            rid = free_ids.pop()
            piece = data[c * XEN_PAGE_SIZE:(c + 1) * XEN_PAGE_SIZE]
            pages[rid] = piece
            f = flags if c == 0 else 0
            if c < chunks - 1:
                f |= netif.TXF_MORE_DATA
            if c == 0 and gso_type:
                f |= netif.TXF_EXTRA_INFO
            out += TX_REQ.pack(1000 + rid, 0, f, rid, len(data) if c == 0 else len(piece))
            if c == 0 and gso_type:
                extra = bytearray(TX_REQ.size)
                netif.pack_extra_gso(extra, 0, gso_type, gso_size)
                out += extra
        sent += 1
    return sent, bytes(out), pages


@pytest.mark.parametrize("seed", range(40))
def test_netfront_tx_put_and_done_match_the_python_reference(seed):
    from array import array

    from pvio.ring._lib import ffi, lib

    rng = random.Random(seed)
    nr = 32
    pages = bytearray(nr * XEN_PAGE_SIZE)
    refs = ffi.new("uint32_t[]", [1000 + i for i in range(nr)])
    free = ffi.new("uint16_t[]", nr)
    flight = ffi.new("uint8_t[]", nr)
    tx = ffi.new("pvio_netfront_tx *")
    lib.pvio_netfront_tx_init(tx, nr, free, flight, ffi.from_buffer(pages), refs)
    ref_free = list(range(nr - 1, -1, -1))
    in_flight: set[int] = set()
    req = bytearray(nr * TX_REQ.size)
    nreq, nbytes = ffi.new("uint32_t *"), ffi.new("uint64_t *")
    errors, bad_id = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    for _ in range(6):
        frames = []
        for _ in range(rng.randrange(1, 8)):
            gso = rng.choice((0, 0, 1, 2))
            frames.append((rng.randbytes(rng.choice((14, 60, 1514, 4096, 4097, 9000, 30000))),
                           rng.choice((0, 2, 3)), gso, 1448 if gso else 0))
        free_slots = rng.randrange(0, nr + 1)
        want_sent, want_req, want_pages = _tx_put_reference(ref_free, frames, free_slots)
        in_flight |= set(want_pages)
        src = b"".join(d for d, _, _, _ in frames)
        lens = array("I", [len(d) for d, _, _, _ in frames])
        meta = array("I")
        for _, flags, gso, gso_size in frames:
            meta.extend((flags | gso << 16, gso_size))
        sent = lib.pvio_netfront_tx_put(tx, src, ffi.from_buffer("uint32_t[]", lens),
                                        ffi.from_buffer("uint32_t[]", meta), len(frames),
                                        free_slots, ffi.from_buffer(req), nreq, nbytes)
        assert sent == want_sent
        assert bytes(req[:nreq[0] * TX_REQ.size]) == want_req
        assert nbytes[0] == sum(len(d) for d, _, _, _ in frames[:sent])
        for rid, piece in want_pages.items():
            assert pages[rid * XEN_PAGE_SIZE:rid * XEN_PAGE_SIZE + len(piece)] == piece
        assert tx.nfree == len(ref_free)
        # the backend answers some of them, in any order, NULL for extras
        answered = rng.sample(sorted(in_flight), rng.randrange(len(in_flight) + 1))
        rsp = b"".join(netif.TX_RSP.pack(rid, rng.choice((0, 0, -1))) for rid in answered)
        rsp += netif.TX_RSP.pack(rng.randrange(65536), netif.RSP_NULL)
        want_errors = sum(1 for k in range(len(answered))
                          if netif.TX_RSP.unpack_from(rsp, 4 * k)[1] != 0)
        freed = lib.pvio_netfront_tx_done(tx, rsp, len(answered) + 1, errors, bad_id)
        assert (freed, errors[0]) == (len(answered), want_errors)
        ref_free.extend(answered)
        in_flight -= set(answered)
        assert {i for i in range(nr) if flight[i]} == in_flight
    # an id not in flight: refused at that response, the ones before it accounted
    if len(in_flight) == nr:  # every id out: answer one, so that one is not in flight
        rid = min(in_flight)
        assert lib.pvio_netfront_tx_done(tx, netif.TX_RSP.pack(rid, 0), 1, errors, bad_id) == 1
        in_flight.discard(rid)
    gone = next(i for i in range(nr) if i not in in_flight)
    first = sorted(in_flight)[:1]
    rsp = b"".join(netif.TX_RSP.pack(rid, 0) for rid in [*first, gone])
    assert lib.pvio_netfront_tx_done(tx, rsp, len(first) + 1, errors, bad_id) == -1 - len(first)
    assert bad_id[0] == gone
    assert lib.pvio_netfront_tx_done(tx, netif.TX_RSP.pack(nr + 5, 0), 1, errors, bad_id) == -1
