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
from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

from pvio import _cgen, layouts
from pvio.layouts import XEN_PAGE_SIZE, NetifExtraType, NetifRsp, NetRxFlag, NetTxFlag
from pvio.ring._lib import ffi, lib
from pvio.ring.errors import GrantError

TX_REQ = struct.Struct(_cgen.struct_format(layouts.netif_tx_request))  # gref offset flags id size
TX_RSP = struct.Struct(_cgen.struct_format(layouts.netif_tx_response))  # id status
RX_REQ = struct.Struct(_cgen.struct_format(layouts.netif_rx_request))  # id pad gref
RX_RSP = struct.Struct(_cgen.struct_format(layouts.netif_rx_response))  # id offset flags status
# netif_extra_info with its union read as the GSO member: type, flags, gso.size,
# gso.type, gso.pad, gso.features ("<BB6s" with "6s" replaced by the member).
_EXTRA_HEAD = _cgen.struct_format(layouts.netif_extra_info)
EXTRA = struct.Struct(_EXTRA_HEAD.removesuffix("6s")
                      + _cgen.struct_format(layouts.netif_extra_info_gso).removeprefix("<"))
if not _EXTRA_HEAD.endswith("6s") or EXTRA.size != layouts.netif_extra_info.sizeof():
    raise ImportError(f"netif_extra_info is not type, flags, a 6-byte union: {_EXTRA_HEAD}")
TX_REQ_SIZE = TX_REQ.size
#: Where an extra-info slot of the TX ring carries the id its NULL response
#: echoes: the TX request's own ``id`` (netif.h: extra info in a request slot).
TX_ID_OFFSET = _cgen.offsetof(layouts.netif_tx_request, "id")

# Plain ints for the per-packet loops: IntFlag/IntEnum arithmetic costs a
# Python-level call per operation, which showed in the daemon's profile.
TXF_CSUM_BLANK, TXF_DATA_VALIDATED, TXF_MORE_DATA, TXF_EXTRA_INFO = (
    int(NetTxFlag.CSUM_BLANK), int(NetTxFlag.DATA_VALIDATED), int(NetTxFlag.MORE_DATA),
    int(NetTxFlag.EXTRA_INFO))
RXF_DATA_VALIDATED, RXF_CSUM_BLANK, RXF_MORE_DATA, RXF_EXTRA_INFO = (
    int(NetRxFlag.DATA_VALIDATED), int(NetRxFlag.CSUM_BLANK), int(NetRxFlag.MORE_DATA),
    int(NetRxFlag.EXTRA_INFO))
RSP_DROPPED, RSP_ERROR, RSP_OKAY, RSP_NULL = (int(NetifRsp.DROPPED), int(NetifRsp.ERROR),
                                              int(NetifRsp.OKAY), int(NetifRsp.NULL))
EXTRA_GSO, EXTRA_MCAST_ADD, EXTRA_MCAST_DEL, EXTRA_HASH = (
    int(NetifExtraType.GSO), int(NetifExtraType.MCAST_ADD), int(NetifExtraType.MCAST_DEL),
    int(NetifExtraType.HASH))
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
        responses = [(rid, RSP_OKAY)]
        first = TxFragment(gref, offset, size)
        total = size
        problem = ""
        i += 1
        packet = TxPacket([first], total,
                          csum_blank=bool(flags & TXF_CSUM_BLANK),
                          data_validated=bool(flags & TXF_DATA_VALIDATED))
        more_extras = bool(flags & TXF_EXTRA_INFO)
        while more_extras:
            if i >= n:
                raise NetifFatal("extra-info chain runs past the published requests")
            raw = slots[i * TX_REQ_SIZE:(i + 1) * TX_REQ_SIZE]
            etype, eflags, gso_size, gso_type, body = _extra(raw)
            responses.append((struct.unpack_from("<H", raw, TX_ID_OFFSET)[0], RSP_NULL))
            i += 1
            more_extras = bool(eflags & layouts.XEN_NETIF_EXTRA_FLAG_MORE)
            if etype == EXTRA_GSO:
                if gso_type not in (layouts.XEN_NETIF_GSO_TYPE_TCPV4,
                                    layouts.XEN_NETIF_GSO_TYPE_TCPV6):
                    problem = problem or f"bad GSO type {gso_type}"
                elif gso_type not in accept_gso:
                    problem = problem or f"GSO type {gso_type} not negotiated"
                elif gso_size == 0:
                    problem = problem or "GSO size 0"
                else:
                    packet.gso_type, packet.gso_size = gso_type, gso_size
            elif etype in (EXTRA_MCAST_ADD, EXTRA_MCAST_DEL):
                packet.mcast.append((etype, body))
            elif etype == EXTRA_HASH:
                pass  # a hint; nothing to check that we rely on
            else:
                problem = problem or f"unknown extra type {etype}"
        more = bool(flags & TXF_MORE_DATA)
        rest = 0
        while more:
            if len(responses) >= max_slots and not problem:
                problem = f"more than {max_slots} slots"
            if i >= n:
                raise NetifFatal("more_data chain runs past the published requests")
            gref, offset, fflags, fid, fsize = TX_REQ.unpack_from(slots, i * TX_REQ_SIZE)
            responses.append((fid, RSP_OKAY))
            packet.fragments.append(TxFragment(gref, offset, fsize))
            rest += fsize
            more = bool(fflags & TXF_MORE_DATA)
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
            out.append(TxDrop(problem, [(r, RSP_ERROR if s != RSP_NULL else s)
                                        for r, s in responses]))
        else:
            packet.fragments = [f for f in packet.fragments if f.size]  # XSA-448
            packet.responses = responses
            out.append(packet)
    return out


# ------------------------------------------------- the C fast path (cnet.c)

TXP_N = lib.PVIO_NET_TXP_N  # u32 per packet in a TxScratch's pinfo, at these offsets:
TXP_REASON, TXP_ARG0, TXP_ARG1 = (lib.PVIO_NET_TXP_REASON, lib.PVIO_NET_TXP_ARG0,
                                  lib.PVIO_NET_TXP_ARG1)
TXP_SIZE, TXP_DATA_OFF = lib.PVIO_NET_TXP_SIZE, lib.PVIO_NET_TXP_DATA_OFF
TXP_FLAGS, TXP_GSO_TYPE, TXP_GSO_SIZE = (lib.PVIO_NET_TXP_FLAGS, lib.PVIO_NET_TXP_GSO_TYPE,
                                         lib.PVIO_NET_TXP_GSO_SIZE)
_FATAL = {lib.PVIO_NET_TX_FATAL_EXTRA: "extra-info chain runs past the published requests",
          lib.PVIO_NET_TX_FATAL_MORE: "more_data chain runs past the published requests"}


# The C assembler's reason codes and their messages (the words assemble uses),
# formatted with its two arguments a and b.
_TX_REASONS = {
    lib.PVIO_NET_TX_BAD_GSO_TYPE: "bad GSO type {a}",
    lib.PVIO_NET_TX_GSO_NOT_NEGOTIATED: "GSO type {a} not negotiated",
    lib.PVIO_NET_TX_GSO_SIZE0: "GSO size 0",
    lib.PVIO_NET_TX_UNKNOWN_EXTRA: "unknown extra type {a}",
    lib.PVIO_NET_TX_TOO_MANY_SLOTS: "more than {a} slots",
    lib.PVIO_NET_TX_FIRST_TOO_SMALL: "first slot says {a} bytes, the other fragments hold {b}",
    lib.PVIO_NET_TX_CROSSES_PAGE: "fragment {a}+{b} crosses its page",
    lib.PVIO_NET_TX_TOO_BIG: "packet of {a} bytes",
    lib.PVIO_NET_TX_RUNT: "packet of {a} bytes is shorter than an Ethernet header",
}


def tx_reason(code: int, arg0: int, arg1: int) -> str:
    """The message of a refused TX packet, from the C assembler's reason code
    (the same words :func:`assemble` uses)."""
    if code == lib.PVIO_NET_TX_GRANT:
        return str(GrantError(arg0 - (1 << 32) if arg0 >= 1 << 31 else arg0, arg1))
    text = _TX_REASONS.get(code)
    return text.format(a=arg0, b=arg1) if text else f"refused (reason {code})"


def gso_mask(accept_gso: tuple[int, ...]) -> int:
    mask = 0
    for t in accept_gso:
        mask |= 1 << t
    return mask


class TxScratch:
    """Private buffers for the C TX path of one ring of ``nr_ents`` slots (a batch
    never holds more): per-packet info, responses, fragments, gathered data."""

    def __init__(self, nr_ents: int) -> None:
        self.nr_ents = nr_ents
        self.pinfo = bytearray(4 * TXP_N * nr_ents)
        self.pinfo_v = memoryview(self.pinfo).cast("I")
        self.rsp = bytearray(TX_RSP.size * nr_ents)
        self.rsp_v = memoryview(self.rsp)
        self.frags = bytearray(12 * nr_ents)
        self.summary = bytearray(4 * lib.PVIO_NET_TXS_N)
        self.summary_v = memoryview(self.summary).cast("I")
        self.data = bytearray(XEN_PAGE_SIZE * nr_ents)
        self.data_v = memoryview(self.data)
        self.runs = bytearray(4 * nr_ents)
        self.runs_v = memoryview(self.runs).cast("I")
        self.nruns = ffi.new("uint32_t *")
        self.p_pinfo = ffi.from_buffer("uint32_t[]", self.pinfo)
        self.p_rsp = ffi.from_buffer("uint8_t[]", self.rsp)
        self.p_frags = ffi.from_buffer("uint32_t[]", self.frags)
        self.p_summary = ffi.from_buffer("uint32_t[]", self.summary)
        self.p_data = ffi.from_buffer("uint8_t[]", self.data)
        self.p_runs = ffi.from_buffer("uint32_t[]", self.runs)

    def assemble(self, slots, *, max_slots: int = MAX_SLOTS, gso: int = 0,
                 min_len: int = ETH_HLEN) -> int:
        """:func:`pvio.netif.assemble` in C (no data copied): returns the number of
        packets, whose info is in ``pinfo_v`` and responses in ``rsp``."""
        n = len(slots) // TX_REQ_SIZE
        if n > self.nr_ents:
            raise ValueError(f"{n} slots for a scratch of {self.nr_ents}")
        npk = lib.pvio_net_tx_assemble(ffi.from_buffer("uint8_t[]", slots), n, max_slots, gso,
                                       min_len, self.p_pinfo, self.p_rsp, self.p_frags,
                                       self.p_summary)
        if npk < 0:
            raise NetifFatal(_FATAL[npk])
        return npk

    def batch(self, gnt, slots, *, max_slots: int = MAX_SLOTS, gso: int = 0,
              min_len: int = ETH_HLEN) -> int:
        """Assemble and grant-copy a batch (``pvio_net_tx_batch``); ``gnt`` is a
        ``pvio_net_gnt *``. Returns the number of packets."""
        n = len(slots) // TX_REQ_SIZE
        if n > self.nr_ents:
            raise ValueError(f"{n} slots for a scratch of {self.nr_ents}")
        npk = lib.pvio_net_tx_batch(gnt, ffi.from_buffer("uint8_t[]", slots), n, max_slots,
                                    gso, min_len, self.p_pinfo, self.p_rsp, self.p_frags,
                                    self.p_summary, self.p_data, len(self.data), self.p_runs,
                                    self.nruns)
        if npk < 0:
            raise NetifFatal(_FATAL[npk])
        return npk

    def results(self, npk: int) -> list[TxPacket | TxDrop]:
        """The packets of the last :meth:`assemble` as :func:`assemble` returns them
        (multicast extras are validated, not collected: netback floods)."""
        out: list[TxPacket | TxDrop] = []
        pv = self.pinfo_v
        fv = memoryview(self.frags).cast("I")
        for j in range(npk):
            (reason, a0, a1, size, _off, flags, gso_type, gso_size, frag0, nfrags, slot0,
             nslots) = pv[j * TXP_N:(j + 1) * TXP_N].tolist()
            responses = [TX_RSP.unpack_from(self.rsp, TX_RSP.size * s)
                         for s in range(slot0, slot0 + nslots)]
            if reason:
                out.append(TxDrop(tx_reason(reason, a0, a1), responses))
                continue
            frags = [TxFragment(*fv[3 * k:3 * k + 3].tolist())
                     for k in range(frag0, frag0 + nfrags)]
            out.append(TxPacket(frags, size, csum_blank=bool(flags & TXF_CSUM_BLANK),
                                data_validated=bool(flags & TXF_DATA_VALIDATED),
                                gso_type=gso_type, gso_size=gso_size, responses=responses))
        return out


def assemble_c(slots, *, max_slots: int = MAX_SLOTS,
               accept_gso: tuple[int, ...] = ()) -> list[TxPacket | TxDrop]:
    """:func:`assemble` through the C fast path (what netback runs), for tests."""
    scratch = TxScratch(max(1, len(slots) // TX_REQ_SIZE))
    return scratch.results(scratch.assemble(slots, max_slots=max_slots, gso=gso_mask(accept_gso)))


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
    EXTRA.pack_into(raw, 0, EXTRA_GSO,
                    layouts.XEN_NETIF_EXTRA_FLAG_MORE if more else 0, gso_size, gso_type, 0, 0)
    struct.pack_into("<H", raw, TX_ID_OFFSET, rid)
    return bytes(raw)


# ---------------------------------------------------------------- offloads


class Offload(NamedTuple):
    """What a frame carries besides its bytes (netif.h flags and GSO extra).

    ``csum_blank``: the L4 checksum is not filled in yet (the sender offloaded
    it; NETTXF_csum_blank / NETRXF_csum_blank). ``data_validated``: the
    checksum is known good (NETTXF_data_validated / NETRXF_data_validated).
    ``gso_type``/``gso_size``: a TCP super-packet to be cut into segments of
    ``gso_size`` payload bytes (XEN_NETIF_EXTRA_TYPE_GSO).
    """

    csum_blank: bool = False
    data_validated: bool = False
    gso_type: int = layouts.XEN_NETIF_GSO_TYPE_NONE
    gso_size: int = 0


NO_OFFLOAD = Offload()


class Frame(NamedTuple):
    """An Ethernet frame and its offload state, as the switch and the frontends pass it."""

    data: bytes
    offload: Offload = NO_OFFLOAD


def pack_extra_gso(out, pos: int, gso_type: int, gso_size: int, more: bool = False) -> None:
    """A ``netif_extra_info`` GSO slot at ``out[pos:pos+8]``."""
    EXTRA.pack_into(out, pos, EXTRA_GSO,
                    layouts.XEN_NETIF_EXTRA_FLAG_MORE if more else 0, gso_size, gso_type, 0, 0)


def rx_flags(offload: Offload) -> int:
    """NETRXF_* of a packet's first response (the checksum bits swap places vs TX)."""
    flags = 0
    if offload.csum_blank:
        flags |= RXF_CSUM_BLANK | RXF_DATA_VALIDATED
    elif offload.data_validated:
        flags |= RXF_DATA_VALIDATED
    return flags


def offload_of(packet: TxPacket) -> Offload:
    if not (packet.csum_blank or packet.data_validated or packet.gso_type):
        return NO_OFFLOAD
    return Offload(packet.csum_blank, packet.data_validated or packet.csum_blank,
                   packet.gso_type, packet.gso_size)


class RxProtocolError(Exception):
    """The backend broke the RX protocol (netfront then stops using the device)."""


@dataclass(slots=True)
class RxChunk:
    slot: int  # ring index the response sits in (== the request's slot)
    offset: int
    length: int  # 0 for a fragment the backend failed
    id: int  # the response's id (must echo the slot's request)


@dataclass(slots=True)
class RxPacket:
    """One received packet as netfront assembles it from consecutive responses."""

    chunks: list[RxChunk]
    offload: Offload
    error: int = 0  # a negative XEN_NETIF_RSP_* when the backend failed the packet
    slots: int = 0  # responses consumed (fragments and extras)


def parse_rx_responses(raw: memoryview, first_slot: int, *, gso_ok: bool
                       ) -> tuple[list[RxPacket], int]:
    """Split copied RX responses into packets; returns them and how many slots
    they used (a chain cut off at the end is left for the next call).

    Hostile-backend checks: an offset or size that leaves the page, a chain
    longer than a 64 KiB packet can need, an unknown extra, GSO the frontend
    did not ask for: :class:`RxProtocolError`.
    """
    n = len(raw) // RX_RSP.size
    out: list[RxPacket] = []
    i = 0
    while i < n:
        start = i
        rid, offset, flags, status = RX_RSP.unpack_from(raw, i * RX_RSP.size)
        chunks: list[RxChunk] = []
        error = 0
        offload = Offload(bool(flags & RXF_CSUM_BLANK),
                          bool(flags & (RXF_DATA_VALIDATED | RXF_CSUM_BLANK)))
        extra = bool(flags & RXF_EXTRA_INFO)
        complete = False
        while True:
            if status < 0:
                error = error or status
                chunks.append(RxChunk(first_slot + i, 0, 0, rid))
            elif offset + status > XEN_PAGE_SIZE:
                raise RxProtocolError(f"rx response {first_slot + i}: {offset}+{status} "
                                      "leaves its page")
            else:
                chunks.append(RxChunk(first_slot + i, offset, status, rid))
            i += 1
            while extra:
                if i >= n:
                    break
                etype, eflags, gso_size, gso_type, _, _ = EXTRA.unpack_from(raw, i * RX_RSP.size)
                if etype != EXTRA_GSO or not gso_ok or gso_type not in (
                        layouts.XEN_NETIF_GSO_TYPE_TCPV4, layouts.XEN_NETIF_GSO_TYPE_TCPV6) \
                        or gso_size == 0:
                    raise RxProtocolError(f"rx response {first_slot + i}: bad extra "
                                          f"(type {etype}, gso {gso_type}/{gso_size})")
                offload = offload._replace(gso_type=gso_type, gso_size=gso_size)
                extra = bool(eflags & layouts.XEN_NETIF_EXTRA_FLAG_MORE)
                i += 1
            if extra:
                break
            if i - start > MAX_RX_SLOTS:
                raise RxProtocolError(f"rx packet at slot {first_slot + start} spans more "
                                      f"than {MAX_RX_SLOTS} slots")
            if not flags & RXF_MORE_DATA:
                complete = True
                break
            if i >= n:
                break
            rid, offset, flags, status = RX_RSP.unpack_from(raw, i * RX_RSP.size)
        if not complete:
            return out, start
        out.append(RxPacket(chunks, offload, error, i - start))
    return out, i


MAX_RX_SLOTS = -(-0x10000 // XEN_PAGE_SIZE) + 2  # a 64 KiB packet, plus GSO extra


RXP_N = lib.PVIO_NETFRONT_RXP_N  # u32 per packet in an RxScratch's pkts
_U32 = 0xFFFFFFFF


# pvio_netfront_rx_parse's error codes and their messages.
_RX_ERRORS = {
    lib.PVIO_NETFRONT_RX_LEAVES_PAGE: "rx response {slot}: {a}+{b} leaves its page",
    lib.PVIO_NETFRONT_RX_BAD_EXTRA: "rx response {slot}: bad extra (type {a}, gso {b}/{c})",
    lib.PVIO_NETFRONT_RX_TOO_LONG: "rx packet at slot {slot} spans more than {a} slots",
    lib.PVIO_NETFRONT_RX_BAD_ID: "rx response in slot {slot} has id {a}, expected {b}",
}


class RxScratch:
    """Private buffers for netfront's C RX path over a ring of ``nr_ents`` slots
    (a batch of responses never holds more, plus a carried partial chain)."""

    def __init__(self, nr_ents: int) -> None:
        cap = 2 * nr_ents
        self.cap = cap
        self.pkts = bytearray(4 * RXP_N * cap)
        self.pkts_v = memoryview(self.pkts).cast("I")
        self.chunks = bytearray(16 * cap)
        self.data = bytearray(XEN_PAGE_SIZE * cap)
        self.data_v = memoryview(self.data)
        self.err = array("I", bytes(4 * 5))
        self.used = ffi.new("uint32_t *")
        self.posts = bytearray(RX_REQ.size * cap)
        self.p_pkts = ffi.from_buffer("uint32_t[]", self.pkts)
        self.p_chunks = ffi.from_buffer("uint32_t[]", self.chunks)
        self.p_data = ffi.from_buffer("uint8_t[]", self.data)
        self.p_err = ffi.from_buffer("uint32_t[]", self.err)
        self.p_posts = ffi.from_buffer("uint8_t[]", self.posts)

    def parse(self, raw, first_slot: int, *, gso_ok: bool, nr_ents: int = 0,
              pages=ffi.NULL) -> tuple[int, int]:
        """``pvio_netfront_rx_parse``: returns (packets, slots used); raises
        :class:`RxProtocolError` as :func:`parse_rx_responses` does (and, with
        ``nr_ents``, for a response whose id is not its slot's)."""
        n = len(raw) // RX_RSP.size
        if n > self.cap:
            raise ValueError(f"{n} responses for a scratch of {self.cap}")
        npk = lib.pvio_netfront_rx_parse(ffi.from_buffer("uint8_t[]", raw), n,
                                         first_slot & _U32, nr_ents, int(gso_ok), pages,
                                         self.p_data, len(self.data), self.p_pkts,
                                         self.p_chunks, self.used, self.p_err)
        if npk < 0:
            raise RxProtocolError(self._error(first_slot))
        return npk, self.used[0]

    def _error(self, first: int) -> str:
        code, slot, a, b, c = self.err.tolist()
        slot = first + ((slot - first) & _U32)
        text = _RX_ERRORS.get(code, "rx responses do not fit netfront's buffer")
        return text.format(slot=slot, a=a, b=b, c=c)

    def packets(self, npk: int, first_slot: int) -> list[RxPacket]:
        """The packets of the last :meth:`parse` as :func:`parse_rx_responses` gives them."""
        cv = memoryview(self.chunks).cast("I")
        out = []
        for j in range(npk):
            (_off, _len, flags, gso_type, gso_size, error, slots, ch0,
             nch) = self.pkts_v[j * RXP_N:(j + 1) * RXP_N].tolist()
            chunks = []
            for k in range(ch0, ch0 + nch):
                slot, offset, length, rid = cv[4 * k:4 * k + 4].tolist()
                chunks.append(RxChunk(first_slot + ((slot - first_slot) & _U32), offset,
                                      length, rid))
            offload = Offload(bool(flags & 1), bool(flags & 2), gso_type, gso_size)
            error = error - (1 << 32) if error >= 1 << 31 else error
            out.append(RxPacket(chunks, offload, error, slots))
        return out


def parse_rx_responses_c(raw, first_slot: int, *, gso_ok: bool
                         ) -> tuple[list[RxPacket], int]:
    """:func:`parse_rx_responses` through the C fast path (what netfront runs), for tests."""
    scratch = RxScratch(max(1, len(raw) // RX_RSP.size))
    npk, used = scratch.parse(raw, first_slot, gso_ok=gso_ok)
    return scratch.packets(npk, first_slot), used
