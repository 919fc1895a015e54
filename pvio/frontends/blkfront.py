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
from pvio.ring import (
    BLKIF,
    BusyPoll,
    EventChannelBlockedError,
    FrontRing,
    RingBrokenError,
    wait_for_work,
)
from pvio.xenbus.ringdev import VBD, RingFrontendDriver

log = logging.getLogger("pvio.blkfront")

_REQ = struct.Struct("<BBH4xQQ")
_DISCARD = struct.Struct("<BBH4xQQQ")
_INDIRECT = struct.Struct("<BBH4xQQHH8I4x")
_INDIRECT_PAD = bytes(blkif.REQ_SIZE - _INDIRECT.size)
_PAD = [bytes(blkif.REQ_SIZE - _REQ.size - n * blkif.SEGMENT.size)
        for n in range(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)]
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


class _Waiter:
    """One call's requests: how many are unanswered, what to do with each answer
    (``complete(slot)``, e.g. copy a read out of the slot's pages), the first
    failure, and the event set when the last answer is in."""

    __slots__ = ("complete", "event", "failed", "pending")

    def __init__(self, pending: int, complete) -> None:
        self.event = trio.Event()
        self.pending = pending
        self.complete = complete
        # the first failure: (part, status, why -- None when the backend said so)
        self.failed: tuple[object, int, str | None] | None = None


class _Slot:
    __slots__ = ("abandoned", "buf", "frame", "id", "indirect_frame", "indirect_ref",
                 "indirect_segs", "op", "pages", "part", "queue", "refs", "request", "segs", "seq",
                 "waiter")

    def __init__(self, sid: int, frame: int, refs: list[int], indirect: tuple[int, int],
                 pages: memoryview) -> None:
        self.id = sid
        self.frame = frame
        self.refs = refs
        self.pages = pages  # its data pages, granted to the backend once
        self.indirect_frame, self.indirect_ref = indirect
        self.indirect_segs = b""  # what its indirect page holds now
        self.segs: dict[tuple[int, int], bytes] = {}  # (length, sector size) -> segments
        self.op = -1  # -1: free; else outstanding (on the ring, or to resubmit)
        self.waiter: _Waiter | None = None
        self.part = None  # what the caller asked for
        self.buf: PoolBuffer | None = None  # the PoolBuffer its request names
        self.request = b""  # the shadow: resubmitted as-is after a reconnect
        self.seq = 0
        self.queue = 0
        self.abandoned = False  # its caller was cancelled; the backend still owns it


class PoolBuffer:
    """A buffer in the frontend's shared pool, granted to the backend for its lifetime.

    ``readinto``/``write``/``read_many``/``write_many`` given a ``PoolBuffer``
    name its own pages in the requests (Linux blkfront's persistent grants, in
    the other direction): the backend's ``preadv``/``pwritev`` move the data
    straight between the image and this memory, with no copy in this process.
    Get one from :meth:`BlkFront.buffer`; use ``view`` (a writable memoryview)
    to fill or read it; :meth:`close` (or ``with``) returns the pages.
    """

    def __init__(self, front: BlkFront, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError("a PoolBuffer needs at least one byte")
        self._front = front
        self.npages = -(-nbytes // XEN_PAGE_SIZE)
        pool = front.session.pool
        self.frame = pool.alloc(self.npages)
        self.refs = [front.session.gnttab.grant_access(0, self.frame + i)
                     for i in range(self.npages)]
        self.view = pool.shm.page(self.frame, self.npages)[:nbytes]
        # the segments of a request: sector size -> the whole buffer's;
        # (first byte, length, sector size) -> a part's
        self.segs: dict[int | tuple[int, int, int], bytes] = {}
        self.in_flight = 0  # requests naming its grants, not answered yet
        self._closing = False

    def __len__(self) -> int:
        return len(self.view)

    def __enter__(self) -> PoolBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Revoke the grants and return the pages (quarantined if the backend
        still has one pinned, as Linux does with a grant it cannot end).

        Safe at any time, e.g. when a call using it was cancelled: while
        requests naming it are in flight the view goes away at once, but the
        grants stay until the last of them is answered (else the backend could
        later write a stale read into whoever reuses the pages)."""
        if self.view is None:
            return
        self.view.release()
        self.view = None
        if self.in_flight:
            self._closing = True
        else:
            self._return_pages()

    def _answered(self) -> None:
        """A request naming this buffer was answered (or never submitted)."""
        self.in_flight -= 1
        if self._closing and not self.in_flight:
            self._closing = False
            self._return_pages()

    def _return_pages(self) -> None:
        front = self._front
        pool = front.session.pool
        if front.error is not None:
            # A failed device's backend may still hold requests naming these
            # grants: keep them granted (never reused) and the pages aside.
            pool.quarantine(self.frame, self.npages)
        else:
            pool.revoke_and_free(self.frame, self.npages, front.session.gnttab, self.refs)


class BlkFront(RingFrontendDriver):
    """The frontend driver of a vbd device."""

    layout = VBD

    def __init__(self, session, *, ring_page_order: int = 0, queues: int = 1,
                 busy_poll_us: float = 20.0) -> None:
        super().__init__(session, ring_page_order=ring_page_order, queues=queues)
        #: Before sleeping on a queue's event channel, spin this long (GIL
        #: released) for answers -- only while no other task of the program is
        #: runnable, so it never delays one; after 64 empty windows it stops
        #: until woken. 0 turns it off.
        self.busy_poll_us = busy_poll_us
        self.rings: list[FrontRing] = []
        self.sectors = 0
        self.sector_size = 512
        self.readonly = False
        self.features: dict[str, int] = {}
        self.error: str | None = None
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._slot_waiters = trio.lowlevel.ParkingLot()  # callers waiting for a free slot
        self._slots_wanted = 0  # how many (cheaper to test than the ParkingLot)
        self._data_pages = 0
        self._services: list[trio.CancelScope] = []
        self._online = trio.Event()
        self._seq = 0
        self._rmw_locks: dict[int, list] = {}  # sector -> [trio.Lock, users]
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
            slot = _Slot(sid, frame, refs, (frame + pages, iref),
                         self.session.pool.shm.page(frame, pages))
            slot.queue = sid % len(self.rings)
            self._slots.append(slot)
            self._free.append(slot)

    async def attach(self, backend: dict[str, bytes | None]) -> None:
        await super().attach(backend)
        previous = self.sector_size
        sectors = _num(backend.get("sectors"))
        sector_size = _num(backend.get("sector-size"), 512)
        # Checked before anything keeps them: a bad unit must not become the
        # "previous" one the next attach compares against.
        if sector_size < 512 or sector_size & (sector_size - 1) \
                or sector_size > XEN_PAGE_SIZE:
            self.error = f"backend published a bad sector-size {sector_size}"
            raise BlkDeviceError(self.error)
        if sectors < 0 or sectors * sector_size >= 1 << 63:  # beyond any file offset
            self.error = f"backend published a bad sectors {sectors}"
            raise BlkDeviceError(self.error)
        self.sectors, self.sector_size = sectors, sector_size
        self.readonly = bool(_num(backend.get("info")) & VDISK_READONLY)
        self.features = {k: _num(backend.get(k)) for k in (
            "feature-flush-cache", "feature-barrier", "feature-discard",
            "feature-max-indirect-segments", "discard-granularity")}
        self.error = None
        if self.sector_size != previous and any(slot.op >= 0 for slot in self._slots):
            # The shadows count sectors in the old unit: replaying them would
            # write acknowledged data at the wrong offsets.
            self._fail_outstanding(f"the backend came back with {self.sector_size}-byte sectors "
                           f"instead of {previous}; the requests in flight were not replayed")
        self._services = [trio.CancelScope() for _ in self.rings]
        for q, scope in enumerate(self._services):
            self.session._nursery.start_soon(self._responses, scope, q)
        self._resubmit()
        self._online.set()

    def _resubmit(self) -> None:
        """Put every request still in flight back on the (new) ring, in submission order."""
        pending = sorted((s for s in self._slots if s.op >= 0),
                         key=lambda s: s.seq)
        for q, ring in enumerate(self.rings):
            mine = [s for s in pending if s.queue == q]
            if not mine:
                continue
            put, notify = ring.produce(b"".join(s.request for s in mine))
            assert put == len(mine)
            if notify:
                self._notify(q)
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
        self.fail(f"the backend did not come back within "
                       f"{self.session.recovery_timeout:.0f} s")

    async def detach(self) -> None:
        self._online = trio.Event()
        self._stop_services()
        self._fail_outstanding("device detached")
        for slot in self._slots:
            slot.pages.release()
            self.session.pool.revoke_and_free(slot.frame, self._data_pages + 1,
                                              self.session.gnttab,
                                              [*slot.refs, slot.indirect_ref])
        self._slots, self._free = [], []
        self._slot_waiters.unpark_all()  # they find no slots and fail
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

    def _fail_outstanding(self, reason: str) -> None:
        """Answer every request in flight with an error (``reason``); the device
        itself stays as it is (detach, a reconnect in another sector size)."""
        for slot in self._slots:
            if slot.op >= 0:
                self._answer(slot, BlkifRsp.ERROR, reason)

    def _notify(self, q: int) -> None:
        """Raise queue ``q``'s event channel. A send the backend blocked (its
        eventfd made blocking and saturated; :class:`EventChannelBlockedError`
        under :func:`pvio.ring.guard_sends`) breaks the protocol like a broken
        ring: the device is disabled and its callers get BlkDeviceError."""
        try:
            self.queues[q].channel.notify()
        except EventChannelBlockedError as exc:
            log.error("vbd: %s; device disabled", exc)
            self.fail(str(exc))

    def fail(self, reason: str) -> None:
        """Disable the device: pending and later calls get BlkDeviceError(reason)."""
        self._fail_outstanding(reason)
        if self.error is None:
            self.error = reason

    def _answer(self, slot: _Slot, status: int, why: str | None = None) -> None:
        """The request in ``slot`` is answered (by the backend, or failed here
        ``why``): complete it, free the slot at once (a long call recycles its
        slots), wake the caller after the last one."""
        waiter = slot.waiter
        if slot.abandoned:
            pass  # its caller is gone (cancelled): nothing to copy
        elif status:
            if waiter.failed is None:
                waiter.failed = (slot.part, status, why)
        elif waiter.complete is not None:
            try:
                waiter.complete(slot)
            except Exception as exc:  # e.g. the caller's buffer went away: that call fails
                if waiter.failed is None:
                    waiter.failed = (slot.part, BlkifRsp.ERROR, f"completing it: {exc}")
        self._release_slot(slot)
        waiter.pending -= 1
        if not waiter.pending:
            waiter.event.set()

    async def _responses(self, scope: trio.CancelScope, queue: int) -> None:
        ring, channel = self.rings[queue], self.queues[queue].channel
        slots = self._slots
        poll = BusyPoll(self.busy_poll_us) if self.busy_poll_us > 0 else None
        statistics = trio.lowlevel.current_statistics
        answered = False
        with scope:
            while True:
                try:
                    batch = ring.take_responses()
                except RingBrokenError as exc:
                    log.error("vbd: %s; device disabled", exc)
                    self.fail(str(exc))
                    return
                if not batch:
                    if answered and poll is not None:
                        # Let the callers just answered run first: they often
                        # submit more at once, and then spinning costs nobody.
                        answered = False
                        await trio.lowlevel.checkpoint()
                        continue
                    idle = poll is not None and not statistics().tasks_runnable
                    await wait_for_work(ring, channel, poll if idle else None)
                    continue
                answered = True
                nslots, answer = len(slots), self._answer
                for rid, op, status in blkif.RSP.iter_unpack(batch):
                    slot = slots[rid] if rid < nslots else None
                    if slot is None or slot.op != op or slot.queue != queue:
                        self.fail(self._bad_answer(slot, rid, op))
                        log.error("vbd: %s; device disabled", self.error)
                        return
                    answer(slot, status)

    @staticmethod
    def _bad_answer(slot: _Slot | None, rid: int, op: int) -> str:
        if slot is None or slot.op < 0:
            return f"backend answered id {rid}, which is not outstanding"
        if slot.op != op:
            return f"backend answered id {rid} with operation {op}, expected {slot.op}"
        return f"backend answered id {rid} on a queue where it is not outstanding"

    # ---------------------------------------------------------- submission

    def _check(self) -> None:
        if self.error is not None:
            raise BlkDeviceError(f"vbd unusable: {self.error}")
        if not self._slots:
            raise BlkDeviceError("vbd is not attached")
        if self.ring is None and not self.session.reconnect:
            raise BlkDeviceError("vbd is not connected")

    async def _take_slots(self, want: int) -> list[_Slot]:
        """1..want free slots: all that are free now, waiting only if none is.

        A call never waits for more slots while holding some it has not
        submitted, so concurrent callers cannot starve each other."""
        while not self._free:
            if not self._slots:  # detached (and maybe attached again later)
                raise BlkDeviceError("vbd is not attached")
            self._slots_wanted += 1
            try:
                await self._slot_waiters.park()
            finally:
                self._slots_wanted -= 1
        free = self._free
        taken = free[-want:]
        del free[-want:]
        return taken

    async def _run(self, parts: list, build, complete=None) -> _Waiter:
        """Submit one request per part and wait until every one is answered.

        ``build(slot, part)`` returns (request bytes, op) and runs just before
        its slot is queued; ``complete(slot)`` runs for each successful answer,
        before the slot is reused. Requests go on the ring in waves (all the
        free slots at once, one push and at most one notification per queue),
        and each slot is freed as soon as its answer is in, so a call may have
        any number of parts. Returns the waiter (``failed``: the first failure).
        If the call is cancelled, the slots the backend still holds are freed
        when their answers arrive. Callers check the device first.
        """
        waiter = _Waiter(len(parts), complete)
        slots: list[_Slot] = []
        unsubmitted: list[_Slot] = []
        try:
            while len(slots) < len(parts):
                taken = unsubmitted = await self._take_slots(len(parts) - len(slots))
                wave = parts[len(slots):len(slots) + len(taken)]
                slots += taken
                if not self._online.is_set():
                    with trio.move_on_after(self.session.recovery_timeout):
                        await self._online.wait()
                self._check()
                if self.ring is None:
                    raise BlkDeviceError("vbd is not connected")
                built = [build(slot, part) for slot, part in zip(taken, wave, strict=True)]
                by_queue: list[list[bytes]] = [[] for _ in self.rings]
                seq = self._seq
                for slot, part, (request, slot.op) in zip(taken, wave, built, strict=True):
                    seq += 1
                    slot.request, slot.seq, slot.part, slot.waiter = request, seq, part, waiter
                    by_queue[slot.queue].append(request)
                self._seq = seq
                notify = [q for q, reqs in enumerate(by_queue)
                          if reqs and self.rings[q].produce(b"".join(reqs))[1]]
                unsubmitted = []  # on the ring: only their answers free them now
                for q in notify:
                    self._notify(q)
                    self.stats["notifications"] += 1
            await waiter.event.wait()
            self.stats["requests"] += len(slots)
            return waiter
        except BaseException:
            for slot in unsubmitted:
                self._release_slot(slot)
            for slot in slots:
                if slot.waiter is waiter and slot.op >= 0:
                    # Cancelled while the backend holds the request: the slot
                    # (and its permit) is freed when the answer arrives.
                    slot.abandoned = True
            raise

    def _release_slot(self, slot: _Slot) -> None:
        buf = slot.buf
        if buf is not None:
            slot.buf = None
            buf._answered()
        slot.op = -1
        slot.abandoned = False
        slot.waiter = None
        slots = self._slots
        if slot.id >= len(slots) or slots[slot.id] is not slot:
            return  # a slot of a detached ring: its pages are gone, never reuse it
        self._free.append(slot)
        if self._slots_wanted:
            self._slot_waiters.unpark()

    @staticmethod
    def _segments(refs: list[int], length: int, ss: int) -> bytes:
        """The packed ``blkif_request_segment`` array for ``length`` bytes through
        the pages granted by ``refs`` (whole pages, the last one partly), in
        ``ss``-byte sectors."""
        nseg = -(-length // XEN_PAGE_SIZE)
        full = XEN_PAGE_SIZE // ss - 1
        tail = (length - (nseg - 1) * XEN_PAGE_SIZE) // ss - 1
        pack = blkif.SEGMENT.pack
        return b"".join([pack(refs[i], 0, full) for i in range(nseg - 1)]) \
            + pack(refs[nseg - 1], 0, tail)

    def _indirect_request(self, slot: _Slot, op: int, sector: int,
                          segs: bytes) -> tuple[bytes, int]:
        """An INDIRECT READ or WRITE at ``sector`` of the segments ``segs`` (more
        than 11), which go in the slot's indirect page."""
        nseg = len(segs) >> 3
        if slot.indirect_segs != segs:
            page = self.session.pool.shm.page(slot.indirect_frame)
            page[:len(segs)] = segs
            page.release()
            slot.indirect_segs = segs
        return _INDIRECT.pack(BlkifOp.INDIRECT, op, nseg, slot.id, sector, 0, 0,
                              slot.indirect_ref, 0, 0, 0, 0, 0, 0, 0) + _INDIRECT_PAD, \
            BlkifOp.INDIRECT

    def _max_request_bytes(self) -> int:
        indirect = self.features.get("feature-max-indirect-segments", 0)
        segs = min(indirect, MAX_INDIRECT_SEGMENTS) if indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST \
            else BLKIF_MAX_SEGMENTS_PER_REQUEST
        return min(segs, self._data_pages) * XEN_PAGE_SIZE

    async def _aligned_io(self, op: int, items, *, check_alignment: bool = False) -> None:
        """READs into / WRITEs from each (offset, buffer) of ``items``: checked
        (open PoolBuffer of this device, within the disk, sector-aligned when
        ``check_alignment``), split into requests of at most a slot's size and
        submitted together. A PoolBuffer's own grants go in the requests (no
        copy); other buffers go through the slots' pages. One BlkDeviceError
        for the first failure, if any."""
        self._check()
        write = op == BlkifOp.WRITE
        if write and self.readonly:
            raise BlkDeviceError("the disk is read-only")
        chunk = self._max_request_bytes()
        ss, size = self.sector_size, self.size
        # (offset, view, segments, PoolBuffer), or (offset, view, None, None) for
        # data that goes through the slot's pages
        parts = []
        total = 0
        copies = False  # some part goes through the slots' pages
        for offset, buf in items:
            if type(buf) is PoolBuffer:
                view = buf.view
                if view is None:
                    raise BlkDeviceError("PoolBuffer is closed")
                if buf._front is not self:
                    raise BlkDeviceError("PoolBuffer belongs to another device")
            else:
                view, buf = memoryview(buf).cast("B"), None
            n = len(view)
            if offset < 0 or offset + n > size:
                raise BlkDeviceError(f"range {offset}+{n} outside the {size}-byte disk")
            if check_alignment and (offset % ss or n % ss):
                raise BlkDeviceError(f"read_many/write_many need {ss}-byte aligned offsets "
                                     f"and lengths (got {offset}+{n})")
            if not n:
                continue
            total += n
            if n <= chunk:  # one request: the common case, kept lean
                if buf is None:
                    parts.append((offset, view, None, None))
                    copies = True
                    continue
                segs = buf.segs.get(ss)  # the whole buffer
                if segs is None:
                    segs = buf.segs[ss] = self._segments(buf.refs, n, ss)
                parts.append((offset, view, segs, buf))
                continue
            copies = copies or buf is None
            for pos in range(0, n, chunk):
                part = view[pos:pos + chunk]
                segs = None
                if buf is not None:
                    key = (pos, len(part), ss)
                    segs = buf.segs.get(key)
                    if segs is None:
                        segs = buf.segs[key] = self._segments(buf.refs[pos // XEN_PAGE_SIZE:],
                                                              len(part), ss)
                parts.append((offset + pos, part, segs, buf))
        if not parts:
            return
        indirect_request, pack, pads = self._indirect_request, _REQ.pack, _PAD

        def build(slot: _Slot, part) -> tuple[bytes, int]:
            offset, view, segs, buf = part
            if self.sector_size != ss:  # reconnected to a disk with other sectors meanwhile
                raise BlkDeviceError("the disk's sector size changed during the call")
            if buf is not None:
                buf.in_flight += 1
                slot.buf = buf
            elif segs is None:
                length = len(view)
                segs = slot.segs.get((length, ss))
                if segs is None:
                    segs = slot.segs[length, ss] = self._segments(slot.refs, length, ss)
                if write:
                    slot.pages[:length] = view
            nseg = len(segs) >> 3
            if nseg <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
                return pack(op, nseg, 0, slot.id, offset // ss) + segs + pads[nseg], op
            return indirect_request(slot, op, offset // ss, segs)

        def copy_out(slot: _Slot) -> None:
            _, view, segs, _ = slot.part
            if segs is None:  # a PoolBuffer's pages already hold the data
                view[:] = slot.pages[:len(view)]

        waiter = await self._run(parts, build, copy_out if copies and not write else None)
        if waiter.failed is not None:
            (offset, view, _, _), status, why = waiter.failed
            if self.error:
                why = f"vbd unusable: {self.error}"
            elif why is None:
                why = f"backend status {status}"
            raise BlkDeviceError(f"{'write' if write else 'read'} at {offset}+{len(view)}: "
                                 f"{why}")
        self.stats["bytes"] += total

    def _bounds(self, offset: int, length: int) -> None:
        self._check()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlkDeviceError(f"range {offset}+{length} outside the {self.size}-byte disk")

    @staticmethod
    def _view(buf) -> memoryview:
        if type(buf) is PoolBuffer:
            if buf.view is None:
                raise BlkDeviceError("PoolBuffer is closed")
            return buf.view
        return memoryview(buf).cast("B")

    def buffer(self, nbytes: int) -> PoolBuffer:
        """A zero-copy buffer of ``nbytes`` in the shared pool (see :class:`PoolBuffer`)."""
        return PoolBuffer(self, nbytes)

    async def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` (any writable buffer, or a :class:`PoolBuffer` for no copy)
        with the disk's bytes at ``offset`` (any alignment)."""
        view = self._view(buf)
        ss = self.sector_size
        if not offset % ss and not len(view) % ss:  # _aligned_io checks the rest
            await self._aligned_io(BlkifOp.READ, [(offset, buf)])
            return len(view)
        self._bounds(offset, len(view))
        start, end = offset // ss * ss, -(-(offset + len(view)) // ss) * ss
        tmp = bytearray(end - start)
        await self._aligned_io(BlkifOp.READ, [(start, tmp)])
        view[:] = tmp[offset - start: offset - start + len(view)]
        return len(view)

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, buf)
        return bytes(buf)

    async def read_many(self, items) -> None:
        """READ into each (offset, buffer) of ``items`` in one go: every request
        is put on the ring before the first answer is awaited (one push, one
        notification), as ``io_submit`` does. Offsets and lengths must be
        sector-aligned; a :class:`PoolBuffer` avoids the copy. Raises one
        BlkDeviceError if any request failed (the others still completed)."""
        await self._aligned_io(BlkifOp.READ, items, check_alignment=True)

    async def write_many(self, items) -> None:
        """WRITE each (offset, buffer) of ``items`` in one go (see :meth:`read_many`).
        Like concurrent writes, they may reach the disk in any order."""
        await self._aligned_io(BlkifOp.WRITE, items, check_alignment=True)

    async def write(self, offset: int, data) -> int:
        """Write ``data`` (any buffer, or a :class:`PoolBuffer` for no copy) at
        ``offset`` (any alignment: edges are read-modify-written)."""
        view = self._view(data)
        ss = self.sector_size
        if not offset % ss and not len(view) % ss:  # _aligned_io checks the rest
            await self._aligned_io(BlkifOp.WRITE, [(offset, data)])
            return len(view)
        self._bounds(offset, len(view))
        if self.readonly:
            raise BlkDeviceError("the disk is read-only")
        start, end = offset // ss * ss, -(-(offset + len(view)) // ss) * ss
        # Read-modify-write of the edge sectors, serialised per sector so
        # that concurrent small writes to one sector do not undo each other.
        # An entry is [lock, users] and goes away when its last user is done,
        # so every writer of a sector always meets the same lock.
        edges = sorted({start, end - ss})
        entries = []
        for sector in edges:
            entry = self._rmw_locks.setdefault(sector, [trio.Lock(), 0])
            entry[1] += 1
            entries.append(entry)
        held: list[trio.Lock] = []
        try:
            for entry in entries:
                await entry[0].acquire()
                held.append(entry[0])
            tmp = bytearray(end - start)
            await self._aligned_io(BlkifOp.READ, [(sector, memoryview(tmp)[sector - start:
                                                                          sector - start + ss])
                                                  for sector in edges])
            tmp[offset - start: offset - start + len(view)] = view
            await self._aligned_io(BlkifOp.WRITE, [(start, tmp)])
        finally:
            for lock in reversed(held):
                lock.release()
            for sector, entry in zip(edges, entries, strict=True):
                entry[1] -= 1
                if not entry[1]:
                    del self._rmw_locks[sector]
        return len(view)

    async def _one(self, build) -> int:
        """Submit one request ``build(slot)`` makes; its status."""
        self._check()
        waiter = await self._run([None], lambda slot, _part: build(slot))
        return BlkifRsp.OKAY if waiter.failed is None else waiter.failed[1]

    async def flush(self) -> None:
        """FLUSH_DISKCACHE: returns once the backend's fdatasync succeeded."""
        if self.readonly or not self.features.get("feature-flush-cache"):
            return  # nothing written, or no volatile cache advertised: nothing to flush
        status = await self._one(lambda slot: (
            _REQ.pack(BlkifOp.FLUSH_DISKCACHE, 0, 0, slot.id, 0) + _PAD[0],
            BlkifOp.FLUSH_DISKCACHE))
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

        status = await self._one(build)
        if status == BlkifRsp.EOPNOTSUPP:
            self.features["feature-discard"] = 0
        elif status != BlkifRsp.OKAY:
            raise BlkDeviceError(f"discard failed: backend status {status}")


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
