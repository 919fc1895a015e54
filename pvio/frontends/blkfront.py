"""blkfront: a block device frontend any trio program can embed (io/blkif.h).

``BlkFront`` negotiates with the backend, then offers ``read``/``readinto``,
``write``, ``flush`` and ``discard`` at byte offsets with any size, from any
number of concurrent tasks (up to the ring's size in flight). Each ring slot
owns a set of pool pages granted to the backend once; a request copies the
caller's data into its slot's pages (or, for reads, out of them). Requests
longer than 11 pages use indirect segments when the backend offers
``feature-max-indirect-segments``.

Hardened against a hostile backend (hardening.md #11): responses are copied
once; an impossible ``rsp_prod``, an id out of range or not outstanding, or a
response whose operation does not match puts the device in an error state:
every waiter and every later call gets :class:`BlkDeviceError`.

:class:`BlockDevice` is the blocking facade: a real ``io.RawIOBase``.
"""

from __future__ import annotations

import io
import logging
import struct

import trio

from pvio import blkif
from pvio.layouts import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    VDISK_READONLY,
    XEN_PAGE_SIZE,
    BlkifOp,
    BlkifRsp,
)
from pvio.ring import BLKIF, FrontRing, RingBrokenError, wait_for_work
from pvio.xenbus.ringdev import VBD, RingFrontendDriver

log = logging.getLogger("pvio.blkfront")

_REQ = struct.Struct("<BBH4xQQ")
_DISCARD = struct.Struct("<BBH4xQQQ")
_INDIRECT = struct.Struct("<BBH4xQQHH8I4x")
MAX_INDIRECT_SEGMENTS = 32  # per request, when the backend allows at least this many
#: The backend keys blkfront reads when it attaches.
BLK_KEYS = ("sectors", "sector-size", "info", "feature-flush-cache", "feature-barrier",
            "feature-discard", "feature-max-indirect-segments", "discard-granularity")


class BlkDeviceError(OSError):
    """An I/O failed (the backend answered ERROR) or the device is unusable."""


def _num(raw: bytes | None, default: int = 0) -> int:
    try:
        return int(raw.decode().strip()) if raw else default
    except ValueError:
        return default


class _Slot:
    __slots__ = ("abandoned", "done", "frame", "id", "indirect_frame", "indirect_ref", "op",
                 "queue", "refs", "request", "seq", "status")

    def __init__(self, sid: int, frame: int, refs: list[int], indirect: tuple[int, int]) -> None:
        self.id = sid
        self.frame = frame
        self.refs = refs
        self.indirect_frame, self.indirect_ref = indirect
        self.done = trio.Event()
        self.op = -1
        self.status = 0
        self.request = b""  # the shadow: resubmitted as-is after a reconnect
        self.seq = 0
        self.queue = 0
        self.abandoned = False  # its caller was cancelled; the backend still owns it


class BlkFront(RingFrontendDriver):
    """The frontend driver of a vbd device."""

    layout = VBD

    def __init__(self, session, *, ring_page_order: int = 0, queues: int = 1) -> None:
        super().__init__(session, ring_page_order=ring_page_order, queues=queues)
        self.rings: list[FrontRing] = []
        self.sectors = 0
        self.sector_size = 512
        self.readonly = False
        self.features: dict[str, int] = {}
        self.error: str | None = None
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._sem: trio.Semaphore | None = None
        self._data_pages = 0
        self._services: list[trio.CancelScope] = []
        self._online = trio.Event()
        self._seq = 0
        self._rmw_locks: dict[int, trio.Lock] = {}
        self.stats = {"requests": 0, "bytes": 0, "notifications": 0, "resubmitted": 0,
                      "reconnects": 0}

    # ------------------------------------------------------------ handshake

    def frontend_features(self) -> dict[str, str]:
        # We count sectors in the backend's sector-size (blkif.h).
        return {"feature-large-sector-size": "1"}

    @property
    def ring(self) -> FrontRing | None:
        """Queue 0's ring (None while disconnected)."""
        return self.rings[0] if self.rings else None

    def setup(self) -> None:
        self.rings = [FrontRing.init(BLKIF, self.area(0, q)) for q in range(len(self.queues))]
        total = sum(r.nr_ents for r in self.rings)
        if self._slots:
            # Reconnecting: keep the slots, their granted pages and the shadows
            # of requests still in flight (blkfront's blkif_recover).
            if len(self._slots) != total:
                raise BlkDeviceError("ring size or queue count changed across a reconnect")
            for slot in self._slots:
                slot.queue = slot.id % len(self.rings)
            return
        # Each slot owns up to 32 data pages (+1 indirect page), within half of
        # the free guest memory, so big multi-queue rings still fit.
        budget = self.session.pool.free_pages // 2 // total - 1
        if budget < 1:
            raise BlkDeviceError(f"guest memory too small for {total} ring slots")
        pages = min(MAX_INDIRECT_SEGMENTS, budget)
        self._data_pages = pages
        self._slots, self._free = [], []
        for sid in range(total):
            frame = self.session.pool.alloc(pages + 1)
            refs = [self.session.gnttab.grant_access(0, frame + i) for i in range(pages)]
            iref = self.session.gnttab.grant_access(0, frame + pages, readonly=True)
            slot = _Slot(sid, frame, refs, (frame + pages, iref))
            slot.queue = sid % len(self.rings)
            self._slots.append(slot)
            self._free.append(slot)
        self._sem = trio.Semaphore(total)

    async def attach(self, backend: dict[str, bytes | None]) -> None:
        await super().attach(backend)
        self.sectors = _num(backend.get("sectors"))
        self.sector_size = _num(backend.get("sector-size"), 512)
        self.readonly = bool(_num(backend.get("info")) & VDISK_READONLY)
        self.features = {k: _num(backend.get(k)) for k in (
            "feature-flush-cache", "feature-barrier", "feature-discard",
            "feature-max-indirect-segments", "discard-granularity")}
        if self.sector_size < 512 or self.sector_size & (self.sector_size - 1) \
                or self.sector_size > XEN_PAGE_SIZE:
            self.error = f"backend published a bad sector-size {self.sector_size}"
            raise BlkDeviceError(self.error)
        self.error = None
        self._services = [trio.CancelScope() for _ in self.rings]
        for q, scope in enumerate(self._services):
            self.session._nursery.start_soon(self._responses, scope, q)
        self._resubmit()
        self._online.set()

    def _resubmit(self) -> None:
        """Put every request still in flight back on the (new) ring, in submission order."""
        pending = sorted((s for s in self._slots if s.op >= 0 and not s.done.is_set()),
                         key=lambda s: s.seq)
        for q, ring in enumerate(self.rings):
            mine = [s for s in pending if s.queue == q]
            if not mine:
                continue
            put, notify = ring.produce(b"".join(s.request for s in mine))
            assert put == len(mine)
            if notify:
                self.queues[q].channel.notify()
        if pending:
            self.stats["resubmitted"] += len(pending)
            log.info("vbd: resubmitted %d request(s) after reconnecting", len(pending))

    async def connection_lost(self) -> None:
        """The daemon is gone: stop the ring, keep the in-flight shadows."""
        self._online = trio.Event()
        self._stop_services()
        self.stats["reconnects"] += 1
        self.release_transport()
        self.session._nursery.start_soon(self._recovery_watchdog)

    async def _recovery_watchdog(self) -> None:
        with trio.move_on_after(self.session.recovery_timeout):
            await self._online.wait()
            return
        self._fail_all(f"the backend did not come back within "
                       f"{self.session.recovery_timeout:.0f} s")

    async def detach(self) -> None:
        self._online = trio.Event()
        self._stop_services()
        self._fail_all("device detached")
        for slot in self._slots:
            refs = [*slot.refs, slot.indirect_ref]
            if all([self.session.gnttab.end_access(r) for r in refs]):
                self.session.pool.free(slot.frame, self._data_pages + 1)
            else:
                self.session.pool.quarantine(slot.frame, self._data_pages + 1)
        self._slots, self._free = [], []
        await super().detach()

    def _stop_services(self) -> None:
        for scope in self._services:
            scope.cancel()
        self._services = []
        self.rings = []

    @property
    def size(self) -> int:
        return self.sectors * self.sector_size

    # ------------------------------------------------------------ responses

    def _fail_all(self, reason: str) -> None:
        for slot in self._slots:
            if slot.op >= 0 and not slot.done.is_set():
                slot.status = BlkifRsp.ERROR
                slot.done.set()
                if slot.abandoned:
                    self._release_slot(slot)
        if self.error is None and reason != "device detached":
            self.error = reason

    def fail(self, reason: str) -> None:
        """Disable the device: pending and later calls get BlkDeviceError(reason)."""
        self._fail_all(reason)

    async def _responses(self, scope: trio.CancelScope, queue: int) -> None:
        ring, channel = self.rings[queue], self.queues[queue].channel
        with scope:
            while True:
                try:
                    batch = ring.take_responses()
                except RingBrokenError as exc:
                    log.error("vbd: %s; device disabled", exc)
                    self._fail_all(str(exc))
                    return
                if not batch:
                    await wait_for_work(ring, channel)
                    continue
                for rid, op, status in blkif.RSP.iter_unpack(batch):
                    if rid >= len(self._slots) or self._slots[rid].op < 0 \
                            or self._slots[rid].done.is_set() \
                            or self._slots[rid].queue != queue:
                        self._fail_all(f"backend answered id {rid}, which is not outstanding")
                        log.error("vbd: %s; device disabled", self.error)
                        return
                    slot = self._slots[rid]
                    if op != slot.op:
                        self._fail_all(f"backend answered id {rid} with operation {op}, "
                                       f"expected {slot.op}")
                        log.error("vbd: %s; device disabled", self.error)
                        return
                    slot.status = status
                    slot.done.set()
                    if slot.abandoned:
                        self._release_slot(slot)

    # ---------------------------------------------------------- submission

    def _check(self) -> None:
        if self.error is not None:
            raise BlkDeviceError(f"vbd unusable: {self.error}")
        if self.ring is None and not self.session.reconnect:
            raise BlkDeviceError("vbd is not connected")

    async def _submit(self, build, complete=None) -> int:
        """Take a slot, let ``build(slot)`` return (request bytes, op), wait for the
        answer; on success ``complete(slot)`` runs before the slot is reused."""
        self._check()
        await self._sem.acquire()
        slot: _Slot | None = None
        try:
            if not self._online.is_set():
                with trio.move_on_after(self.session.recovery_timeout):
                    await self._online.wait()
            self._check()
            if self.ring is None:
                raise BlkDeviceError("vbd is not connected")
            slot = self._free.pop()
            slot.request, op = build(slot)
            self._seq += 1
            slot.seq = self._seq
            slot.done = trio.Event()
            slot.status = 0
            slot.op = op
            put, notify = self.rings[slot.queue].produce(slot.request)
            assert put == 1
            if notify:
                self.queues[slot.queue].channel.notify()
                self.stats["notifications"] += 1
            await slot.done.wait()
            self.stats["requests"] += 1
            if complete is not None and slot.status == BlkifRsp.OKAY:
                complete(slot)
            return slot.status
        finally:
            if slot is None:
                self._sem.release()
            elif slot.op < 0 or slot.done.is_set():
                self._release_slot(slot)
            else:
                # Cancelled while the backend holds the request: the slot (and
                # its permit) is freed when the answer arrives, not before.
                slot.abandoned = True

    def _release_slot(self, slot: _Slot) -> None:
        slot.op = -1
        slot.abandoned = False
        self._free.append(slot)
        self._sem.release()

    def _pages(self, slot: _Slot, npages: int) -> memoryview:
        return self.session.pool.shm.page(slot.frame, npages)

    def _rw_request(self, slot: _Slot, op: int, sector: int, length: int) -> tuple[bytes, int]:
        nseg = -(-length // XEN_PAGE_SIZE)
        sectors_per_page = XEN_PAGE_SIZE // self.sector_size
        segs = []
        for i in range(nseg):
            last_bytes = min(XEN_PAGE_SIZE, length - i * XEN_PAGE_SIZE)
            segs.append((slot.refs[i], 0, last_bytes // self.sector_size - 1))
        assert all(last < sectors_per_page for _, _, last in segs)
        if nseg <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            req = bytearray(blkif.REQ_SIZE)
            _REQ.pack_into(req, 0, op, nseg, 0, slot.id, sector)
            for i, seg in enumerate(segs):
                blkif.SEGMENT.pack_into(req, blkif.SEG_OFFSET + i * blkif.SEGMENT.size, *seg)
            return bytes(req), op
        page = self.session.pool.shm.page(slot.indirect_frame)
        for i, seg in enumerate(segs):
            blkif.SEGMENT.pack_into(page, i * blkif.SEGMENT.size, *seg)
        req = bytearray(blkif.REQ_SIZE)
        _INDIRECT.pack_into(req, 0, BlkifOp.INDIRECT, op, nseg, slot.id, sector, 0, 0,
                            slot.indirect_ref, 0, 0, 0, 0, 0, 0, 0)
        return bytes(req), BlkifOp.INDIRECT

    def _max_request_bytes(self) -> int:
        indirect = self.features.get("feature-max-indirect-segments", 0)
        segs = min(indirect, MAX_INDIRECT_SEGMENTS) if indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST \
            else BLKIF_MAX_SEGMENTS_PER_REQUEST
        return min(segs, self._data_pages) * XEN_PAGE_SIZE

    async def _aligned_io(self, op: int, offset: int, view: memoryview) -> None:
        """Sector-aligned read into / write from ``view``, split into concurrent
        requests; a failure is one plain BlkDeviceError, not an exception group."""
        chunk = self._max_request_bytes()
        if not view:
            return
        if len(view) <= chunk:
            await self._one_rw(op, offset, view)
            return
        try:
            async with trio.open_nursery() as nursery:
                for pos in range(0, len(view), chunk):
                    nursery.start_soon(self._one_rw, op, offset + pos, view[pos:pos + chunk])
        except BaseExceptionGroup as group:
            matched, rest = group.split(BlkDeviceError)
            if rest is None and matched is not None:
                first = matched
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from group
            raise

    async def _one_rw(self, op: int, offset: int, part: memoryview) -> None:
        length = len(part)

        def build(slot: _Slot):
            if op == BlkifOp.WRITE:
                self._pages(slot, -(-length // XEN_PAGE_SIZE))[:length] = part
            return self._rw_request(slot, op, offset // self.sector_size, length)

        def copy_out(slot: _Slot) -> None:
            part[:] = self._pages(slot, -(-length // XEN_PAGE_SIZE))[:length]

        status = await self._submit(build, copy_out if op == BlkifOp.READ else None)
        if status != BlkifRsp.OKAY:
            why = f"vbd unusable: {self.error}" if self.error else f"backend status {status}"
            raise BlkDeviceError(f"{'read' if op == 0 else 'write'} at {offset}+{length}: "
                                 f"{why}")
        self.stats["bytes"] += length

    def _bounds(self, offset: int, length: int) -> None:
        self._check()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlkDeviceError(f"range {offset}+{length} outside the {self.size}-byte disk")

    async def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` with the disk's bytes at ``offset`` (any alignment)."""
        view = memoryview(buf).cast("B")
        self._bounds(offset, len(view))
        ss = self.sector_size
        start, end = offset // ss * ss, -(-(offset + len(view)) // ss) * ss
        if start == offset and end == offset + len(view):
            await self._aligned_io(BlkifOp.READ, offset, view)
        else:
            tmp = bytearray(end - start)
            await self._aligned_io(BlkifOp.READ, start, memoryview(tmp))
            view[:] = tmp[offset - start: offset - start + len(view)]
        return len(view)

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, buf)
        return bytes(buf)

    async def write(self, offset: int, data) -> int:
        """Write ``data`` at ``offset`` (any alignment: edges are read-modify-written)."""
        view = memoryview(data).cast("B")
        self._bounds(offset, len(view))
        if self.readonly:
            raise BlkDeviceError("the disk is read-only")
        ss = self.sector_size
        start, end = offset // ss * ss, -(-(offset + len(view)) // ss) * ss
        if start == offset and end == offset + len(view):
            await self._aligned_io(BlkifOp.WRITE, offset, view)
        else:
            # Read-modify-write of the edge sectors, serialised per sector so
            # that concurrent small writes to one sector do not undo each other.
            edges = sorted({start, end - ss})
            locks = [self._rmw_locks.setdefault(sector, trio.Lock()) for sector in edges]
            for lock in locks:
                await lock.acquire()
            try:
                tmp = bytearray(end - start)
                await self.readinto(start, memoryview(tmp)[:ss])
                await self.readinto(end - ss, memoryview(tmp)[-ss:])
                tmp[offset - start: offset - start + len(view)] = view
                await self._aligned_io(BlkifOp.WRITE, start, memoryview(tmp))
            finally:
                for lock in reversed(locks):
                    lock.release()
                for sector, lock in zip(edges, locks, strict=True):
                    if not lock.locked() and not lock.statistics().tasks_waiting:
                        self._rmw_locks.pop(sector, None)
        return len(view)

    async def flush(self) -> None:
        """FLUSH_DISKCACHE: returns once the backend's fdatasync succeeded."""
        if self.readonly or not self.features.get("feature-flush-cache"):
            return  # nothing written, or no volatile cache advertised: nothing to flush
        status = await self._submit(lambda slot: (bytes(_req_bytes(
            BlkifOp.FLUSH_DISKCACHE, 0, slot.id, 0)), BlkifOp.FLUSH_DISKCACHE))
        if status == BlkifRsp.EOPNOTSUPP:
            self.features["feature-flush-cache"] = 0
            return
        if status != BlkifRsp.OKAY:
            raise BlkDeviceError(f"flush failed: backend status {status}")

    async def discard(self, offset: int, length: int) -> None:
        """DISCARD whole sectors in ``offset..offset+length`` (a hint; may be a no-op)."""
        self._bounds(offset, length)
        if not self.features.get("feature-discard") or length == 0:
            return
        ss = self.sector_size
        if offset % ss or length % ss:
            raise BlkDeviceError("discard ranges must be sector-aligned")

        def build(slot: _Slot):
            req = bytearray(blkif.REQ_SIZE)
            _DISCARD.pack_into(req, 0, BlkifOp.DISCARD, 0, 0, slot.id, offset // ss, length // ss)
            return bytes(req), BlkifOp.DISCARD

        status = await self._submit(build)
        if status == BlkifRsp.EOPNOTSUPP:
            self.features["feature-discard"] = 0
        elif status != BlkifRsp.OKAY:
            raise BlkDeviceError(f"discard failed: backend status {status}")


def _req_bytes(op: int, nseg: int, rid: int, sector: int) -> bytearray:
    req = bytearray(blkif.REQ_SIZE)
    _REQ.pack_into(req, 0, op, nseg, 0, rid, sector)
    return req


class BlockDevice(io.RawIOBase):
    """Blocking facade: a seekable raw file over a connected :class:`BlkFront`.

    ``portal`` runs coroutines in the trio loop that owns the frontend (e.g.
    :meth:`pvio.frontends.session.BlockingSession.call`).
    """

    def __init__(self, front: BlkFront, call) -> None:
        super().__init__()
        self.front = front
        self._call = call
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self.front.readonly

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = max(0, min(len(memoryview(buf).cast("B")), self.front.size - self._pos))
        if n == 0:
            return 0
        self._call(self.front.readinto, self._pos, memoryview(buf).cast("B")[:n])
        self._pos += n
        return n

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._pos + len(view) > self.front.size:
            raise OSError(28, "No space left on device (end of the pvio disk)")
        self._call(self.front.write, self._pos, view)
        self._pos += len(view)
        return len(view)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.front.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        if not self.closed and self.front.ring is not None:
            self._call(self.front.flush)
