"""Raw block peers for the conformance kit and for tests: blkif wire bytes built
straight from the offsets in Xen's ``io/blkif.h`` (x86_64; deliberately *not*
from :mod:`pvio.blkif`'s structs, so a layout mistake there shows), and
:class:`RawBlkFront`, a frontend that runs the real transport handshake and then
lets the caller put any bytes on the ring (strict or hostile).
"""

from __future__ import annotations

import struct

import trio

from pvio.frontends.blkfront import BLK_KEYS
from pvio.layouts import BlkifOp
from pvio.ring import BLKIF, FrontRing, wait_for_work
from pvio.testing._raw import attach_driver, granted_page
from pvio.xenbus.ringdev import VBD, RingFrontendDriver

PAGE = 4096
SECTOR = 512
U64 = (1 << 64) - 1
XVDA, XVDB = 51712, 51728

# --- wire layouts (io/blkif.h, x86_64) ----------------------------------------
REQ_SIZE = 112
RSP_SIZE = 16
_RW_HDR = struct.Struct("<BBH4xQQ")  # operation@0 nr_segments@1 handle@2 id@8 sector@16
_SEG = struct.Struct("<IBB2x")  # gref@0 first_sect@4 last_sect@5
_DISCARD = struct.Struct("<BBH4xQQQ")  # op flag handle id sector nr_sectors@24
_INDIRECT = struct.Struct("<BBH4xQQH2x8I")  # op indirect_op nseg@2 id sector handle@24 grefs@28
RSP = struct.Struct("<QBxh4x")  # id@0 operation@8 status@10


def rw_req(op: int, rid: int, sector: int, segs=(), nseg: int | None = None,
           handle: int = 0) -> bytes:
    """A ``blkif_request``; ``segs`` are (gref, first_sect, last_sect)."""
    buf = bytearray(REQ_SIZE)
    _RW_HDR.pack_into(buf, 0, op, len(segs) if nseg is None else nseg, handle, rid, sector)
    for i, seg in enumerate(segs[:11]):
        _SEG.pack_into(buf, 24 + 8 * i, *seg)
    return bytes(buf)


def discard_req(rid: int, sector: int, nr_sectors: int, flag: int = 0) -> bytes:
    buf = bytearray(REQ_SIZE)
    _DISCARD.pack_into(buf, 0, BlkifOp.DISCARD, flag, 0, rid, sector, nr_sectors)
    return bytes(buf)


def indirect_req(indirect_op: int, rid: int, sector: int, nseg: int, grefs=()) -> bytes:
    grefs = [*grefs, *([0] * (8 - len(grefs)))]
    buf = bytearray(REQ_SIZE)
    _INDIRECT.pack_into(buf, 0, BlkifOp.INDIRECT, indirect_op, nseg, rid, sector, 0, *grefs)
    return bytes(buf)


def seg_bytes(segs) -> bytes:
    return b"".join(_SEG.pack(*seg) for seg in segs)


# --- a raw (possibly hostile) frontend ------------------------------------------------------


class RawBlkFront(RingFrontendDriver):
    """The generic transport driver for a vbd, plus a FrontRing the test drives by hand."""

    def __init__(self, session, **kwargs) -> None:
        super().__init__(session, VBD, **kwargs)
        self.ring: FrontRing | None = None
        self._views: list[memoryview] = []

    def setup(self) -> None:
        self.ring = FrontRing.init(BLKIF, self.area(0))

    def release_transport(self) -> None:
        """Release the views this frontend handed out, so the pool can be closed."""
        for view in self._views:
            view.release()
        self._views = []
        if self.ring is not None:
            self.ring.release()
            self.ring = None
        super().release_transport()

    def area(self, i: int, queue: int = 0) -> memoryview:
        view = super().area(i, queue)
        self._views.append(view)
        return view

    # grants --------------------------------------------------------------
    def page(self, *, readonly: bool = False, domid: int = 0, fill: bytes | None = None):
        """A fresh pool page granted to ``domid``: (frame, gref, memoryview of the page)."""
        return granted_page(self.session, self._views, readonly=readonly, domid=domid,
                            fill=fill)

    # ring ----------------------------------------------------------------
    def send(self, *requests: bytes) -> None:
        assert self.ring is not None and self.channel is not None
        put, notify = self.ring.produce(b"".join(requests))
        assert put == len(requests)
        if notify:
            self.channel.notify()

    async def responses(self, n: int, timeout: float = 5.0) -> list[tuple[int, int, int]]:
        """The next ``n`` responses as (id, operation, status)."""
        out: list[tuple[int, int, int]] = []
        with trio.fail_after(timeout):
            while len(out) < n:
                batch = self.ring.take_responses()
                if batch:
                    out.extend(RSP.iter_unpack(bytes(batch)))
                    continue
                await wait_for_work(self.ring, self.channel)
        return out

    async def call(self, *requests: bytes, timeout: float = 5.0) -> list[tuple[int, int, int]]:
        """Send ``requests`` (a ring's worth at a time) and collect their responses."""
        out: list[tuple[int, int, int]] = []
        for start in range(0, len(requests), self.ring.nr_ents):
            chunk = requests[start:start + self.ring.nr_ents]
            self.send(*chunk)
            out += await self.responses(len(chunk), timeout)
        return out


async def attach_raw(session, devid: int = XVDA, timeout: float = 5.0, **kwargs):
    """A connected RawBlkFront on vbd ``devid``: (raw, FrontendDevice)."""
    return await attach_driver(session, RawBlkFront(session, **kwargs), "vbd", devid,
                               BLK_KEYS, timeout)
