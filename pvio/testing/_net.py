"""A raw netfront for the conformance kit and the tests: netif wire bytes built
straight from the offsets in Xen's ``io/netif.h`` and the shared-ring header
from ``io/ring.h`` (req_prod@0 req_event@4 rsp_prod@8 rsp_event@12, slots from
64), deliberately *not* from :mod:`pvio.netif`'s structs, so a layout mistake
there shows; and :class:`RawNetFront`, which attaches a vif with the generic
transport driver (handshake, ring pages, event channels, ``request-rx-copy``,
``feature-rx-notify``) and then drives both rings by hand, byte by byte, so the
caller can put any request on the ring, grant any page and read every
response slot.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import trio

from pvio.frontends.netfront import NET_KEYS
from pvio.testing._raw import attach_driver, granted_page
from pvio.xenbus.ringdev import VIF, RingFrontendDriver

PAGE = 4096
U32 = 0xFFFFFFFF

# --- io/netif.h ------------------------------------------------------------------------
NETTXF_CSUM_BLANK = 1 << 0
NETTXF_DATA_VALIDATED = 1 << 1
NETTXF_MORE_DATA = 1 << 2
NETTXF_EXTRA_INFO = 1 << 3
NETRXF_DATA_VALIDATED = 1 << 0
NETRXF_CSUM_BLANK = 1 << 1
NETRXF_MORE_DATA = 1 << 2
NETRXF_EXTRA_INFO = 1 << 3
EXTRA_TYPE_NONE, EXTRA_TYPE_GSO, EXTRA_TYPE_MCAST_ADD, EXTRA_TYPE_MCAST_DEL = 0, 1, 2, 3
EXTRA_TYPE_HASH, EXTRA_TYPE_MAX = 4, 5
EXTRA_FLAG_MORE = 1 << 0
GSO_TYPE_NONE, GSO_TYPE_TCPV4, GSO_TYPE_TCPV6 = 0, 1, 2
RSP_DROPPED, RSP_ERROR, RSP_OKAY, RSP_NULL = -2, -1, 0, 1
NR_SLOTS_MIN = 18
MAX_TX_SIZE = 0xFFFF

TX_SLOT = 12  # union { netif_tx_request (12 B); netif_tx_response (4 B) }
RX_SLOT = 8  # union { netif_rx_request (8 B); netif_rx_response (8 B) }
SRING_HEADER = 64
TX_REQ = struct.Struct("<IHHHH")  # gref@0 offset@4 flags@6 id@8 size@10
TX_RSP = struct.Struct("<Hh")  # id@0 status@2
RX_REQ = struct.Struct("<HHI")  # id@0 pad@2 gref@4
RX_RSP = struct.Struct("<HHHh")  # id@0 offset@2 flags@4 status@6
EXTRA = struct.Struct("<BBHBBH")  # type@0 flags@1 gso.size@2 gso.type@4 gso.pad@5 features@6


def ring_entries(slot: int) -> int:
    """``__RING_SIZE`` of a one-page ring: (4096 - 64) / slot, rounded down to 2^k."""
    n = (PAGE - SRING_HEADER) // slot
    return 1 << (n.bit_length() - 1)


TX_ENTS = ring_entries(TX_SLOT)
RX_ENTS = ring_entries(RX_SLOT)
assert TX_ENTS == RX_ENTS == 256  # xen-protocol.md §1 table


def tx_req(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return TX_REQ.pack(gref, offset, flags, rid, size)


class ExtraSlot(bytes):
    """A TX slot that holds a ``netif_extra_info`` (answered XEN_NETIF_RSP_NULL)."""


def extra_slot(etype: int, *, flags: int = 0, gso_size: int = 0, gso_type: int = 0,
               features: int = 0, body: bytes | None = None) -> ExtraSlot:
    """A 12-byte TX slot holding a ``netif_extra_info`` (8 bytes) and 4 bytes of padding."""
    raw = bytearray(TX_SLOT)
    if body is not None:
        raw[0], raw[1] = etype, flags
        raw[2:2 + len(body)] = body
    else:
        EXTRA.pack_into(raw, 0, etype, flags, gso_size, gso_type, 0, features)
    return ExtraSlot(raw)


def refused(slots) -> list[int]:
    """The statuses of a refused packet's slots: ERROR, and NULL for its extras."""
    return [RSP_NULL if isinstance(slot, ExtraSlot) else RSP_ERROR for slot in slots]


def gso_slot(gso_size: int, gso_type: int = GSO_TYPE_TCPV4, more: bool = False) -> ExtraSlot:
    return extra_slot(EXTRA_TYPE_GSO, flags=EXTRA_FLAG_MORE if more else 0, gso_size=gso_size,
                      gso_type=gso_type)


def rx_req(rid: int, gref: int) -> bytes:
    return RX_REQ.pack(rid, 0, gref)


# --- a raw (possibly hostile) frontend ------------------------------------------------------


class RawRing:
    """The frontend end of a one-page shared ring, by hand from io/ring.h."""

    def __init__(self, page: memoryview, slot: int) -> None:
        self.page = page
        self.slot = slot
        self.nr_ents = ring_entries(slot)
        self.req_prod_pvt = 0
        self.rsp_cons = 0

    def init(self) -> None:
        """SHARED_RING_INIT: prods 0, events 1, everything else zero."""
        self.page[:] = bytes(len(self.page))
        struct.pack_into("<IIII", self.page, 0, 0, 1, 0, 1)

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.page, off)[0]

    @property
    def req_prod(self) -> int:
        return self._u32(0)

    @property
    def req_event(self) -> int:
        return self._u32(4)

    @property
    def rsp_prod(self) -> int:
        return self._u32(8)

    def set_req_prod(self, value: int) -> None:
        """Publish any index, possible or not."""
        struct.pack_into("<I", self.page, 0, value & U32)

    def put(self, *requests: bytes) -> None:
        for req in requests:
            assert len(req) <= self.slot
            assert (self.req_prod_pvt - self.rsp_cons) & U32 < self.nr_ents, "ring full"
            at = SRING_HEADER + (self.req_prod_pvt % self.nr_ents) * self.slot
            self.page[at:at + self.slot] = req.ljust(self.slot, b"\0")
            self.req_prod_pvt = (self.req_prod_pvt + 1) & U32

    def push(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old, new = self.req_prod, self.req_prod_pvt
        self.set_req_prod(new)
        return (new - self.req_event) & U32 < (new - old) & U32

    @property
    def free(self) -> int:
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & U32)

    def unconsumed(self) -> int:
        n = (self.rsp_prod - self.rsp_cons) & U32
        assert n <= self.nr_ents, f"backend published an impossible rsp_prod {self.rsp_prod}"
        return n

    def arm(self) -> None:
        struct.pack_into("<I", self.page, 12, (self.rsp_cons + 1) & U32)

    def take(self, n: int) -> list[tuple[int, bytes]]:
        """The next ``n`` response slots as (ring index, raw slot bytes)."""
        out = []
        for _ in range(n):
            at = SRING_HEADER + (self.rsp_cons % self.nr_ents) * self.slot
            out.append((self.rsp_cons, bytes(self.page[at:at + self.slot])))
            self.rsp_cons = (self.rsp_cons + 1) & U32
        return out


@dataclass
class RxSlot:
    """One RX response slot: the response fields and the raw 8 bytes (an extra overlays them)."""

    index: int
    raw: bytes
    id: int = field(init=False)
    offset: int = field(init=False)
    flags: int = field(init=False)
    status: int = field(init=False)

    def __post_init__(self) -> None:
        self.id, self.offset, self.flags, self.status = RX_RSP.unpack(self.raw)


@dataclass
class RxPacketSeen:
    slots: list[RxSlot]  # fragments and extras, in ring order
    data: bytes
    extras: list[bytes]  # the raw 8-byte netif_extra_info slots

    @property
    def first(self) -> RxSlot:
        return self.slots[0]


class RawNetFront(RingFrontendDriver):
    """The generic transport driver for a vif, plus both rings driven by hand.

    ``features`` overrides or adds frontend keys (``feature-sg``,
    ``feature-gso-tcpv4``...; even ``request-rx-copy``).
    """

    def __init__(self, session, *, features: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(session, VIF, **kwargs)
        self.extra_features = dict(features or {})
        self.tx: list[RawRing] = []
        self.rx: list[RawRing] = []
        # per queue: ring index -> (id, gref, page view) of the posted rx request
        self.rx_posted: list[dict[int, tuple[int, int, memoryview | None]]] = []
        self._rx_seen: list[list[RxSlot]] = []
        self._views: list[memoryview] = []
        self.mac = ""

    def frontend_features(self) -> dict[str, str]:
        return {**super().frontend_features(), **self.extra_features}

    async def publish(self, xs, path: str) -> None:
        raw = await xs.read_or_none(f"{path}/mac")
        self.mac = raw.decode() if raw else ""
        await super().publish(xs, path)

    def release_transport(self) -> None:
        """Drop this driver's views of the session's memory (so the session can
        close its pool), then the generic transport release."""
        for view in self._views:
            view.release()
        self._views = []
        super().release_transport()

    def setup(self) -> None:
        self.tx, self.rx, self.rx_posted, self._rx_seen = [], [], [], []
        for q in range(len(self.queues)):
            tx, rx = RawRing(self.area(0, q), TX_SLOT), RawRing(self.area(1, q), RX_SLOT)
            self._views += [tx.page, rx.page]
            tx.init()
            rx.init()
            self.tx.append(tx)
            self.rx.append(rx)
            self.rx_posted.append({})
            self._rx_seen.append([])

    def tx_channel(self, queue: int = 0):
        return self.queues[queue].channel

    def rx_channel(self, queue: int = 0):
        return self.queues[queue].rx_channel

    # grants --------------------------------------------------------------
    def page(self, *, readonly: bool = False, domid: int = 0, fill: bytes | None = None):
        """A fresh pool page granted to ``domid``: (frame, gref, memoryview of the page)."""
        return granted_page(self.session, self._views, readonly=readonly, domid=domid,
                            fill=fill)

    def data_pages(self, data: bytes, offsets: list[int] | None = None,
                   sizes: list[int] | None = None) -> list[tuple[int, int, int]]:
        """Put ``data`` into fresh read-only granted pages: fragment k of ``sizes[k]``
        bytes at ``offsets[k]``; returns (gref, offset, size) per fragment."""
        if sizes is None:
            sizes = [min(PAGE, len(data) - i) for i in range(0, len(data), PAGE)] or [0]
        offsets = offsets or [0] * len(sizes)
        assert sum(sizes) == len(data)
        out, pos = [], 0
        for off, size in zip(offsets, sizes, strict=True):
            _, ref, view = self.page(readonly=True, fill=b"\xee")
            view[off:off + size] = data[pos:pos + size]
            out.append((ref, off, size))
            pos += size
        return out

    # tx --------------------------------------------------------------------
    def send(self, *slots: bytes, queue: int = 0) -> None:
        """Put request slots on the TX ring, publish them, notify if asked to."""
        ring = self.tx[queue]
        ring.put(*slots)
        if ring.push():
            self.tx_channel(queue).notify()

    def packet_slots(self, data: bytes, *, rid: int = 0, flags: int = 0,
                     offsets: list[int] | None = None, sizes: list[int] | None = None,
                     extras: tuple[bytes, ...] = ()) -> list[bytes]:
        """The TX slots of one well-formed packet: first slot size = total, then extras,
        then the more_data chain (ids rid, rid+1, ...)."""
        frags = self.data_pages(data, offsets, sizes)
        slots = []
        for k, (ref, off, size) in enumerate(frags):
            f = flags if k == 0 else 0
            if k < len(frags) - 1:
                f |= NETTXF_MORE_DATA
            if k == 0 and extras:
                f |= NETTXF_EXTRA_INFO
            slots.append(tx_req(ref, off, f, rid + k, len(data) if k == 0 else size))
            if k == 0:
                slots.extend(extras)
        return slots

    async def tx_responses(self, n: int, queue: int = 0, timeout: float = 5.0
                           ) -> list[tuple[int, int]]:
        """The next ``n`` TX responses as (id, status), in slot order."""
        ring = self.tx[queue]
        out: list[tuple[int, int]] = []
        with trio.fail_after(timeout):
            while len(out) < n:
                avail = ring.unconsumed()
                if not avail:
                    ring.arm()
                    if not ring.unconsumed():
                        await self.tx_channel(queue).wait()
                    continue
                out += [TX_RSP.unpack_from(raw) for _, raw in ring.take(min(avail, n - len(out)))]
        return out

    async def call(self, *slots: bytes, queue: int = 0, timeout: float = 5.0
                   ) -> list[tuple[int, int]]:
        self.send(*slots, queue=queue)
        return await self.tx_responses(len(slots), queue, timeout)

    # rx --------------------------------------------------------------------
    def post_rx(self, *requests: tuple[int, int], views: list | None = None,
                queue: int = 0) -> list[int]:
        """Post RX requests (id, gref); returns the ring indices they occupy."""
        ring = self.rx[queue]
        indices = []
        for k, (rid, gref) in enumerate(requests):
            indices.append(ring.req_prod_pvt)
            self.rx_posted[queue][ring.req_prod_pvt] = (rid, gref, views[k] if views else None)
            ring.put(rx_req(rid, gref))
        if ring.push():
            self.rx_channel(queue).notify()
        return indices

    def post_rx_pages(self, count: int, queue: int = 0, first_id: int = 0) -> list[int]:
        """Grant ``count`` fresh writable pages and post them (ids first_id, ...)."""
        reqs, views = [], []
        for k in range(count):
            _, ref, view = self.page(fill=b"\xdd")
            reqs.append(((first_id + k) & 0xFFFF, ref))
            views.append(view)
        return self.post_rx(*reqs, views=views, queue=queue)

    async def rx_responses(self, n: int, queue: int = 0, timeout: float = 5.0) -> list[RxSlot]:
        """The next ``n`` RX response slots (raw, in ring order)."""
        ring = self.rx[queue]
        seen = self._rx_seen[queue]
        with trio.fail_after(timeout):
            while len(seen) < n:
                avail = ring.unconsumed()
                if not avail:
                    ring.arm()
                    if not ring.unconsumed():
                        await self.rx_channel(queue).wait()
                    continue
                seen += [RxSlot(i, raw) for i, raw in ring.take(avail)]
        out, seen[:] = seen[:n], seen[n:]
        return out

    async def receive(self, queue: int = 0, timeout: float = 5.0) -> RxPacketSeen:
        """One received packet: its slots (each checked to sit in its request's slot,
        echoing that request's id), the extras, and the data from the posted pages."""
        slots: list[RxSlot] = []
        extras: list[bytes] = []
        data = b""
        (first,) = await self.rx_responses(1, queue, timeout)
        slots.append(first)
        cur = first
        want_extra = bool(first.flags & NETRXF_EXTRA_INFO)
        while True:
            rid, _gref, view = self.rx_posted[queue].pop(cur.index)
            assert cur.id == rid, f"rx response in slot {cur.index}: id {cur.id}, request {rid}"
            if cur.status > 0:
                assert cur.offset + cur.status <= PAGE
                data += bytes(view[cur.offset:cur.offset + cur.status])
            while want_extra:
                (ext,) = await self.rx_responses(1, queue, timeout)
                self.rx_posted[queue].pop(ext.index)
                slots.append(ext)
                extras.append(ext.raw)
                want_extra = bool(ext.raw[1] & EXTRA_FLAG_MORE)
            if not cur.flags & NETRXF_MORE_DATA:
                return RxPacketSeen(slots, data, extras)
            (cur,) = await self.rx_responses(1, queue, timeout)
            slots.append(cur)


async def receive_matching(raw: RawNetFront, pred, limit: int = 100) -> RxPacketSeen:
    """The next packet ``raw`` receives whose data satisfies ``pred`` (others skipped)."""
    for _ in range(limit):
        pkt = await raw.receive()
        if pred(pkt.data):
            return pkt
    raise AssertionError("no matching packet")


async def attach_raw(session, devid: int = 0, timeout: float = 5.0, **kwargs):
    """A connected RawNetFront: (raw, FrontendDevice)."""
    return await attach_driver(session, RawNetFront(session, **kwargs), "vif", devid,
                               NET_KEYS, timeout)
