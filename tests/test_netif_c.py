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
        flags = 0
        for bit in FLAG_BITS:
            if rng.random() < (0.5 if bit == 4 else 0.25):
                flags |= bit
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
        flags = 0
        for bit in FLAG_BITS:
            if rng.random() < (0.4 if bit == 4 else 0.15):
                flags |= bit
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
