"""Shared helpers of the blkif / blkback / blkfront tests.

- Hand-built blkif wire bytes, straight from the offsets in
  ``/work/shared/reference/xen-protocol.md`` §2 (deliberately *not* from
  :mod:`pvio.blkif`'s own struct definitions, so a layout mistake there shows).
- TOML configurations for in-process daemons.
- :class:`RawBlkFront`: a frontend that attaches a vbd with the generic
  transport driver (handshake, ring pages, event channel) and then drives the
  :class:`~pvio.ring.FrontRing` itself, so a test can put any bytes on the ring.
"""

from __future__ import annotations

import struct

import trio

from pvio.frontends.blkfront import BLK_KEYS, BlkFront
from pvio.layouts import BlkifOp
from pvio.ring import BLKIF, FrontRing, wait_for_work
from pvio.xenbus.device import backend_path, frontend_path
from pvio.xenbus.ringdev import VBD, RingFrontendDriver

PAGE = 4096
SECTOR = 512
U64 = (1 << 64) - 1
XVDA, XVDB = 51712, 51728

# --- wire layouts (xen-protocol.md §2, x86_64) ----------------------------------------
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


# --- configurations ----------------------------------------------------------------------


def vbd(devid: int = XVDA, image: str = "disk.img", size: str = "4M", mode: str = "w") -> str:
    return (f'  [[domain.device]]\n  type = "vbd"\n  devid = {devid}\n'
            f'  image = "{image}"\n  size = "{size}"\n  mode = "{mode}"\n')


def domain(name: str, *devices: str) -> str:
    return f'[[domain]]\nname = "{name}"\n' + "".join(devices)


# --- daemon-side introspection -------------------------------------------------------------


def backend_device(daemon, name: str, devid: int = XVDA):
    """The daemon's BackendDevice of ``name``'s vbd ``devid`` (its driver is a BlkBackend)."""
    for device in daemon._claimed[name].devices:
        if device.driver.type == "vbd" and device.devid == devid:
            return device
    raise KeyError((name, devid))


async def attach_blk(session, devid: int = XVDA, timeout: float = 5.0, **kwargs):
    """A connected BlkFront on ``devid``: (front, FrontendDevice)."""
    front = BlkFront(session, **kwargs)
    device = await session.attach(front, devid, BLK_KEYS)
    with trio.fail_after(timeout):
        await device.connected.wait()
    return front, device


# --- a raw (possibly hostile) frontend ------------------------------------------------------


class RawBlkFront(RingFrontendDriver):
    """The generic transport driver for a vbd, plus a FrontRing the test drives by hand."""

    def __init__(self, session, **kwargs) -> None:
        super().__init__(session, VBD, **kwargs)
        self.ring: FrontRing | None = None

    def setup(self) -> None:
        self.ring = FrontRing.init(BLKIF, self.area(0))

    # grants --------------------------------------------------------------
    def page(self, *, readonly: bool = False, domid: int = 0, fill: bytes | None = None):
        """A fresh pool page granted to ``domid``: (frame, gref, memoryview of the page)."""
        frame = self.session.pool.alloc(1)
        view = self.session.pool.shm.page(frame)
        view[:] = (fill * (PAGE // len(fill)))[:PAGE] if fill else bytes(PAGE)
        ref = self.session.gnttab.grant_access(domid, frame, readonly=readonly)
        return frame, ref, view

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
    """A connected RawBlkFront, attached through ``session.driver_for``'s machinery."""
    offered = {d.devid: d for d in await session.devices() if d.type == "vbd"}
    assert devid in offered, offered
    assert isinstance(session.driver_for(offered[devid]), RingFrontendDriver)
    raw = RawBlkFront(session, **kwargs)
    device = await session.attach(raw, devid, BLK_KEYS)
    with trio.fail_after(timeout):
        await device.connected.wait()
    return raw, device


def paths(session, devid: int = XVDA) -> tuple[str, str]:
    """(backend dir, frontend dir) of ``session``'s vbd ``devid``."""
    return backend_path("vbd", session.domid, devid), frontend_path("vbd", session.domid, devid)



def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (itself if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


class blk_error:
    """``with blk_error():`` the block raises BlkDeviceError, possibly wrapped in
    exception groups by trio nurseries (see test_blkfront's
    ``test_io_errors_are_plain_blk_device_errors`` for the strict form)."""

    def __init__(self, match: str | None = None) -> None:
        self.match = match
        self.value: BaseException | None = None

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        from pvio.frontends.blkfront import BlkDeviceError

        if exc is None:
            raise AssertionError("BlkDeviceError not raised")
        found = leaves(exc)
        if not all(isinstance(e, BlkDeviceError) for e in found):
            return False  # re-raise the unexpected exception
        self.value = found[0]
        if self.match is not None:
            assert any(self.match in str(e) for e in found), found
        return True
