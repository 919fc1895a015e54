"""netif (io/netif.h): TX packet assembly and validation, sans-I/O.

A guest sends a packet as a chain of TX requests: the first slot's ``size`` is
the whole packet, ``NETTXF_extra_info`` says ``netif_extra_info`` slots follow
(chained by ``XEN_NETIF_EXTRA_FLAG_MORE``), and ``NETTXF_more_data`` says
another fragment follows, whose ``size`` is its own length. The first
fragment's length is the total minus the others.

:class:`TxAssembler` consumes a batch of request slots (already copied out of
the ring) and yields, per packet, either a validated :class:`TxPacket`
(fragments to copy, offload flags, GSO info) or a :class:`TxDrop` with the
reason; either way every slot of the packet gets its response, in order, with
``XEN_NETIF_RSP_NULL`` for extra-info slots (netif.h). Checks follow Linux
netback (``xenvif_count_requests``, ``xenvif_get_extras``,
``xenvif_tx_build_gops``) and XSA-423/432/448: zero-length fragments, a
fragment crossing its page, a first slot smaller than the rest, a total over
``XEN_NETIF_MAX_TX_SIZE`` or under an Ethernet header, more slots than the
backend accepts, unknown or malformed extras. A chain that runs past what the
frontend has published is a protocol violation of the ring (:class:`NetifFatal`):
the vif must be disconnected, as Linux netback does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pvio import _cgen, layouts
from pvio.layouts import XEN_PAGE_SIZE, NetifExtraType, NetifRsp, NetTxFlag

TX_REQ = struct.Struct(_cgen.struct_format(layouts.netif_tx_request))  # gref offset flags id size
TX_RSP = struct.Struct(_cgen.struct_format(layouts.netif_tx_response))
EXTRA = struct.Struct("<BBHBBH")  # type, flags, gso.size, gso.type, gso.pad, gso.features
TX_REQ_SIZE = TX_REQ.size
ETH_HLEN = 14
MAX_SLOTS = 20  # per packet; netback must accept at least XEN_NETIF_NR_SLOTS_MIN (18)

assert layouts.XEN_NETIF_NR_SLOTS_MIN <= MAX_SLOTS


class NetifFatal(Exception):
    """The frontend broke the TX ring protocol: disconnect the vif."""


@dataclass(slots=True)
class TxFragment:
    gref: int
    offset: int
    size: int


@dataclass(slots=True)
class TxPacket:
    fragments: list[TxFragment]
    size: int
    csum_blank: bool = False
    data_validated: bool = False
    gso_type: int = 0
    gso_size: int = 0
    mcast: list[tuple[int, bytes]] = field(default_factory=list)
    responses: list[tuple[int, int]] = field(default_factory=list)  # (id, status) per slot


@dataclass(slots=True)
class TxDrop:
    reason: str
    responses: list[tuple[int, int]]  # (id, status) per slot


def _extra(raw: bytes) -> tuple[int, int, int, int, bytes]:
    etype, eflags, gso_size, gso_type, _pad, _features = EXTRA.unpack_from(raw)
    return etype, eflags, gso_size, gso_type, bytes(raw[2:8])


def assemble(slots: memoryview, *, max_slots: int = MAX_SLOTS,
             accept_gso: tuple[int, ...] = ()) -> list[TxPacket | TxDrop]:
    """Turn a batch of TX request slots into packets (each slot answered once).

    ``slots`` must hold only whole packets: the caller takes every request the
    frontend published. Raises :class:`NetifFatal` if a chain is cut off.
    """
    n = len(slots) // TX_REQ_SIZE
    out: list[TxPacket | TxDrop] = []
    i = 0
    while i < n:
        gref, offset, flags, rid, size = TX_REQ.unpack_from(slots, i * TX_REQ_SIZE)
        responses = [(rid, NetifRsp.OKAY)]
        first = TxFragment(gref, offset, size)
        total = size
        problem = ""
        i += 1
        packet = TxPacket([first], total,
                          csum_blank=bool(flags & NetTxFlag.CSUM_BLANK),
                          data_validated=bool(flags & NetTxFlag.DATA_VALIDATED))
        more_extras = bool(flags & NetTxFlag.EXTRA_INFO)
        while more_extras:
            if i >= n:
                raise NetifFatal("extra-info chain runs past the published requests")
            raw = slots[i * TX_REQ_SIZE:(i + 1) * TX_REQ_SIZE]
            etype, eflags, gso_size, gso_type, body = _extra(raw)
            responses.append((struct.unpack_from("<H", raw, 8)[0], NetifRsp.NULL))
            i += 1
            more_extras = bool(eflags & layouts.XEN_NETIF_EXTRA_FLAG_MORE)
            if etype == NetifExtraType.GSO:
                if gso_type not in (layouts.XEN_NETIF_GSO_TYPE_TCPV4,
                                    layouts.XEN_NETIF_GSO_TYPE_TCPV6):
                    problem = problem or f"bad GSO type {gso_type}"
                elif gso_type not in accept_gso:
                    problem = problem or f"GSO type {gso_type} not negotiated"
                elif gso_size == 0:
                    problem = problem or "GSO size 0"
                else:
                    packet.gso_type, packet.gso_size = gso_type, gso_size
            elif etype in (NetifExtraType.MCAST_ADD, NetifExtraType.MCAST_DEL):
                packet.mcast.append((etype, body))
            elif etype == NetifExtraType.HASH:
                pass  # a hint; nothing to check that we rely on
            else:
                problem = problem or f"unknown extra type {etype}"
        more = bool(flags & NetTxFlag.MORE_DATA)
        rest = 0
        while more:
            if len(responses) >= max_slots and not problem:
                problem = f"more than {max_slots} slots"
            if i >= n:
                raise NetifFatal("more_data chain runs past the published requests")
            gref, offset, fflags, fid, fsize = TX_REQ.unpack_from(slots, i * TX_REQ_SIZE)
            responses.append((fid, NetifRsp.OKAY))
            packet.fragments.append(TxFragment(gref, offset, fsize))
            rest += fsize
            more = bool(fflags & NetTxFlag.MORE_DATA)
            i += 1
        if not problem:
            if rest > total:
                problem = f"first slot says {total} bytes, the other fragments hold {rest}"
            else:
                first.size = total - rest
                for frag in packet.fragments:
                    if frag.offset + frag.size > XEN_PAGE_SIZE:
                        problem = f"fragment {frag.offset}+{frag.size} crosses its page"
                        break
                if not problem and total > layouts.XEN_NETIF_MAX_TX_SIZE:
                    problem = f"packet of {total} bytes"
                elif not problem and total < ETH_HLEN:
                    problem = f"packet of {total} bytes is shorter than an Ethernet header"
        if problem:
            out.append(TxDrop(problem, [(r, NetifRsp.ERROR if s != NetifRsp.NULL else s)
                                        for r, s in responses]))
        else:
            packet.fragments = [f for f in packet.fragments if f.size]  # XSA-448
            packet.responses = responses
            out.append(packet)
    return out


def pack_tx_responses(results: list[TxPacket | TxDrop], out: bytearray) -> memoryview:
    """All responses of ``results``, in slot order (zeroed padding)."""
    pairs = [pair for r in results for pair in r.responses]
    need = len(pairs) * TX_RSP.size
    if len(out) < need:
        out.extend(bytes(need - len(out)))
    for k, (rid, status) in enumerate(pairs):
        TX_RSP.pack_into(out, k * TX_RSP.size, rid, status)
    return memoryview(out)[:need]


def tx_request(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return TX_REQ.pack(gref, offset, flags, rid, size)


def gso_extra(rid: int, gso_size: int, gso_type: int, more: bool = False) -> bytes:
    """An extra-info slot (12 bytes: the 8-byte netif_extra_info, then the id
    the backend echoes in its NULL response, at the request's id offset)."""
    raw = bytearray(TX_REQ_SIZE)
    EXTRA.pack_into(raw, 0, NetifExtraType.GSO,
                    layouts.XEN_NETIF_EXTRA_FLAG_MORE if more else 0, gso_size, gso_type, 0, 0)
    struct.pack_into("<H", raw, 8, rid)
    return bytes(raw)
