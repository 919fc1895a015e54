"""netif TX assembly and validation (io/netif.h; Linux netback; XSA-423/432/448)."""

import pytest

from pvio import netif
from pvio.layouts import XEN_NETIF_GSO_TYPE_TCPV4, NetifRsp, NetTxFlag
from pvio.netif import NetifFatal, TxDrop, TxPacket, assemble, gso_extra, tx_request

MORE = NetTxFlag.MORE_DATA
EXTRA = NetTxFlag.EXTRA_INFO


def run(*slots, **kw):
    return assemble(memoryview(b"".join(slots)), **kw)


def test_single_slot_packet():
    (pkt,) = run(tx_request(9, 100, NetTxFlag.CSUM_BLANK, 1, 60))
    assert isinstance(pkt, TxPacket)
    assert [(f.gref, f.offset, f.size) for f in pkt.fragments] == [(9, 100, 60)]
    assert pkt.csum_blank and not pkt.data_validated
    assert pkt.responses == [(1, NetifRsp.OKAY)]


def test_first_fragment_is_total_minus_the_rest():
    (pkt,) = run(tx_request(1, 0, MORE, 1, 3000), tx_request(2, 0, MORE, 2, 1000),
                 tx_request(3, 0, 0, 3, 500))
    assert [f.size for f in pkt.fragments] == [1500, 1000, 500]
    assert pkt.size == 3000
    assert [r for r, _ in pkt.responses] == [1, 2, 3]


def test_extras_are_answered_null_and_gso_is_parsed():
    (pkt,) = run(tx_request(1, 0, EXTRA | MORE, 1, 9000),
                 gso_extra(7, 1448, XEN_NETIF_GSO_TYPE_TCPV4),
                 tx_request(2, 0, MORE, 2, 4096), tx_request(3, 0, 0, 3, 808),
                 accept_gso=(XEN_NETIF_GSO_TYPE_TCPV4,))
    assert isinstance(pkt, TxPacket), pkt
    assert (pkt.gso_type, pkt.gso_size) == (XEN_NETIF_GSO_TYPE_TCPV4, 1448)
    assert [f.size for f in pkt.fragments] == [4096, 4096, 808]
    assert [s for _, s in pkt.responses] == [NetifRsp.OKAY, NetifRsp.NULL, NetifRsp.OKAY,
                                             NetifRsp.OKAY]


def test_gso_not_negotiated_drops_the_packet_only():
    first, second = run(tx_request(1, 0, EXTRA, 1, 9000),
                        gso_extra(7, 1448, XEN_NETIF_GSO_TYPE_TCPV4),
                        tx_request(2, 0, 0, 2, 100))
    assert isinstance(first, TxDrop) and "not negotiated" in first.reason
    assert [s for _, s in first.responses] == [NetifRsp.ERROR, NetifRsp.NULL]
    assert isinstance(second, TxPacket)


@pytest.mark.parametrize(
    ("slots", "reason"),
    [
        ((tx_request(1, 4000, 0, 1, 200),), "crosses its page"),
        ((tx_request(1, 0, MORE, 1, 100), tx_request(2, 0, 0, 2, 200)), "other fragments"),
        ((tx_request(1, 0, 0, 1, 10),), "shorter than an Ethernet header"),
        ((tx_request(1, 0, EXTRA, 1, 100), bytes(12)), "unknown extra type 0"),
        ((tx_request(1, 0, EXTRA, 1, 100), gso_extra(2, 0, 9)), "bad GSO type"),
    ],
)
def test_bad_packets_are_dropped_with_errors_for_each_slot(slots, reason):
    (drop,) = run(*slots, accept_gso=(XEN_NETIF_GSO_TYPE_TCPV4,))
    assert isinstance(drop, TxDrop)
    assert reason in drop.reason
    assert len(drop.responses) == len(slots)
    assert all(s in (NetifRsp.ERROR, NetifRsp.NULL) for _, s in drop.responses)


def test_too_many_slots_dropped_but_18_accepted():
    def chain(n):
        return [tx_request(i, 0, MORE if i < n - 1 else 0, i, 100 * n if i == 0 else 100)
                for i in range(n)]

    (ok,) = run(*chain(18))
    assert isinstance(ok, TxPacket) and len(ok.fragments) == 18
    (drop,) = run(*chain(netif.MAX_SLOTS + 1))
    assert isinstance(drop, TxDrop) and "more than" in drop.reason


def test_zero_length_fragments_are_skipped_not_fatal():
    (pkt,) = run(tx_request(1, 0, MORE, 1, 100), tx_request(2, 0, MORE, 2, 0),
                 tx_request(3, 0, 0, 3, 40))
    assert [f.size for f in pkt.fragments] == [60, 40]
    assert len(pkt.responses) == 3


@pytest.mark.parametrize("last_flags", [MORE, EXTRA])
def test_a_chain_cut_off_by_the_ring_is_fatal(last_flags):
    with pytest.raises(NetifFatal):
        run(tx_request(1, 0, last_flags, 1, 100))


def test_responses_pack_in_slot_order_with_zero_padding():
    results = run(tx_request(1, 0, MORE, 11, 200), tx_request(2, 0, 0, 12, 100),
                  tx_request(3, 4000, 0, 13, 200))
    out = bytearray(b"\xff" * 64)
    raw = bytes(netif.pack_tx_responses(results, out))
    assert raw == (netif.TX_RSP.pack(11, 0) + netif.TX_RSP.pack(12, 0)
                   + netif.TX_RSP.pack(13, NetifRsp.ERROR))
