"""blkback: the block backend (io/blkif.h) as a trio service.

Per connected device one task consumes the ring in batches: every request is
copied out once (``BackRing.take_requests``). READ and WRITE requests whose
I/O cannot wait for a device (an image in memory, or RWF_NOWAIT succeeded) are
validated, pinned, moved and answered by the C fast path
(:mod:`pvio.backends._blkfast`), in the event loop, one call per run of
requests. Every other request takes the reference path: validated by
:func:`pvio.blkif.parse_request`, its segments' grants pinned (in the event
loop thread, so pin counts need no lock), then the file I/O runs in one worker
thread with ``os.preadv``/``os.pwritev``. Both paths move data straight into
and out of the granted pages of the shared pool (no extra copy), serve the
requests in ring order, and the responses go back in one ``produce``.
Blocking I/O never stalls the trio loop or other devices.

Durability (hardening.md #22-24): a write is answered only after ``pwritev``
wrote all of it; ``FLUSH_DISKCACHE`` only after ``fdatasync`` returned 0, and
once ``fdatasync`` has failed every later flush fails too; a flush with data is
flush, then write; ``WRITE_BARRIER`` drains (batches run in order), flushes,
then writes. Discard punches holes. Only what is honoured is advertised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import trio

from pvio import blkif
from pvio._log import RateLimitedLogger
from pvio.backends._blkfast import NOT_FAST, BlkFastPath
from pvio.blkif import BackendFeatures, BlkError, BlkRequest, parse_request
from pvio.layouts import VDISK_READONLY, XEN_PAGE_SIZE, BlkifOp, BlkifRsp
from pvio.ring import (
    BLKIF,
    BackRing,
    BusyPoll,
    EventChannelBlockedError,
    GrantError,
    RemoteProtocolError,
    RingBrokenError,
    wait_for_work,
)
from pvio.ring._lib import ffi, lib
from pvio.xenbus.device import DeviceError
from pvio.xenbus.ringdev import VBD, BackendConnection, RingBackendDriver

log = logging.getLogger("pvio.blkback")
peer_log = RateLimitedLogger(log)

SECTOR = 512


def ensure_image(path: str, size: int) -> None:
    """Create a sparse raw image of ``size`` bytes if it does not exist yet."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size == 0:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


@dataclass
class BlkStats:
    """Per-device counters, published for ``pvio status``."""

    requests: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    in_flight: int = 0
    batches: int = 0
    max_batch: int = 0

    def count(self, op: str, nbytes: int) -> None:
        self.requests[op] = self.requests.get(op, 0) + 1
        self.bytes[op] = self.bytes.get(op, 0) + nbytes


_OP_NAMES = {BlkifOp.READ: "read", BlkifOp.WRITE: "write", BlkifOp.WRITE_BARRIER: "barrier",
             BlkifOp.FLUSH_DISKCACHE: "flush", BlkifOp.DISCARD: "discard",
             BlkifOp.INDIRECT: "indirect"}


class BlkBackend(RingBackendDriver):
    layout = VBD
    #: Serve READ and WRITE in the event loop through the C fast path when the
    #: I/O cannot wait for a device (:mod:`pvio.backends._blkfast`); False sends
    #: every request through ``_execute`` and every read and write to a worker thread.
    inline_io = True

    def __init__(self, domain, image: str, mode: str = "w", *, sector_size: int = SECTOR,
                 max_indirect_segments: int = 256, busy_poll_us: float = 200.0) -> None:
        super().__init__(domain)
        self.busy_poll_us = busy_poll_us
        self.image = image
        self.mode = mode
        self.sector_size = sector_size
        self.max_indirect_segments = max_indirect_segments
        self.stats = BlkStats()
        self.flush_failed = False  # sticky, as QEMU's page_cache_inconsistent
        self._fd = -1
        self._wait_scopes: dict[int, trio.CancelScope] = {}
        self._draining = False
        self._running: list[trio.Event] = []
        self._rings: list[BackRing] = []
        self._fast: list = []  # the fast-path contexts of the rings being served

    @property
    def size(self) -> int:
        return os.stat(self.image).st_size

    def toolstack_keys(self) -> dict[str, str]:
        """Keys libxl writes when it creates the backend node."""
        return {"params": self.image, "mode": self.mode, "type": "file",
                "device-type": "disk"}

    def features(self) -> dict[str, str]:
        feats = super().features()
        if self.max_indirect_segments > 0:  # blkif.h: absent when not supported
            feats["feature-max-indirect-segments"] = str(self.max_indirect_segments)
        if self.mode == "w":  # nothing to flush, order or discard on a read-only disk
            feats.update({"feature-flush-cache": "1", "feature-barrier": "1",
                          "feature-discard": "1", "discard-granularity": str(XEN_PAGE_SIZE),
                          "discard-alignment": "0", "discard-secure": "0"})
        return feats

    def _features(self) -> BackendFeatures:
        writable = self.mode == "w"
        return BackendFeatures(
            sectors=self.size // self.sector_size, sector_size=self.sector_size,
            readonly=not writable, flush=writable, barrier=writable, discard=writable,
            max_indirect_segments=self.max_indirect_segments,
        )

    async def start(self, conn: BackendConnection, frontend: dict) -> dict[str, str]:
        protocol = (frontend.get("protocol") or b"x86_64-abi").decode("ascii", "replace")
        if protocol not in ("x86_64-abi", "arm-abi"):
            raise DeviceError(f"unsupported blkif protocol {protocol!r} (native layout only)")
        if self.nursery is None:
            raise DeviceError("blkback needs a nursery to run its service")
        large = (frontend.get("feature-large-sector-size") or b"0").strip() == b"1"
        if self.sector_size != SECTOR and not large:
            raise DeviceError(f"the disk has {self.sector_size}-byte sectors but the frontend "
                              "did not set feature-large-sector-size (blkif.h)")
        flags = os.O_RDONLY if self.mode == "r" else os.O_RDWR
        self._fd = os.open(self.image, flags | os.O_CLOEXEC)
        self.flush_failed = False
        self._draining = False
        self._running = []
        self._rings = []
        for q, queue in enumerate(conn.queues):
            ring = BackRing.attach(BLKIF, queue.mappings[0].buf)
            self._rings.append(ring)
            stopped = trio.Event()
            self._running.append(stopped)
            await self.nursery.start(self._serve, ring, queue.channel, q, stopped)
        info = VDISK_READONLY if self.mode == "r" else 0
        feats = self._features()
        return {"sectors": str(feats.sectors), "info": str(info),
                "sector-size": str(self.sector_size),
                "physical-sector-size": str(self.sector_size)}

    def _fold(self, fast: BlkFastPath) -> None:
        """Move a fast path's counters into :attr:`stats`."""
        for name, (reqs, nbytes) in fast.take_counters().items():
            if reqs:
                self.stats.requests[name] = self.stats.requests.get(name, 0) + reqs
                self.stats.bytes[name] = self.stats.bytes.get(name, 0) + nbytes

    def statistics(self) -> dict[str, int]:
        """Counters for ``<backend>/statistics/`` (what ``pvio status`` shows)."""
        for fast in self._fast:
            self._fold(fast)
        out = {f"{op}_req": n for op, n in self.stats.requests.items()}
        out.update({f"{op}_bytes": n for op, n in self.stats.bytes.items()})
        sent = sum(r.notifications[0] for r in self._rings)
        suppressed = sum(r.notifications[1] for r in self._rings)
        out.update(errors=self.stats.errors, in_flight=self.stats.in_flight,
                   batches=self.stats.batches, max_batch=self.stats.max_batch,
                   ring_occupancy=sum(r.unconsumed_requests + r.pending_responses
                                      for r in self._rings),
                   notify_sent=sent, notify_suppressed=suppressed, queues=len(self._rings))
        return out

    async def stop(self) -> None:
        """Drain: the batches in progress complete and are answered, then the services end."""
        self._draining = True
        for scope in list(self._wait_scopes.values()):
            scope.cancel()
        for stopped in self._running:
            await stopped.wait()
        self._running = []
        self._rings = []  # unmapped next (RingBackendDriver.disconnect)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------- service

    async def _serve(self, ring: BackRing, channel, queue: int, stopped: trio.Event, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        feats = self._features()
        mapper = self.domain.mapper()
        pool = self.domain.memory["pool"].buf
        fast = BlkFastPath(mapper, self._fd, feats)
        self._fast.append(fast)
        # Spin a little (GIL released) before sleeping: a busy frontend then
        # needs no event-channel notification per request (ring.h's req_event
        # stays unarmed); after 64 empty windows the queue sleeps until woken.
        poll = BusyPoll(self.busy_poll_us) if self.busy_poll_us > 0 else None
        out = bytearray(ring.nr_ents * blkif.RSP_SIZE)  # a batch is at most a ring
        dst = ffi.from_buffer(out)
        try:
            task_status.started()
            while not self._draining:
                try:
                    batch = ring.take_requests()
                except RingBrokenError as exc:
                    self._peer_broke(exc)
                    return
                n = len(batch) // blkif.REQ_SIZE
                if n == 0:
                    with trio.CancelScope() as self._wait_scopes[queue]:
                        await wait_for_work(ring, channel, poll)
                    del self._wait_scopes[queue]
                    continue
                if not self.inline_io:  # may be switched off while serving
                    fast.disable()
                # Released after the batch: a pointer into a memoryview must not
                # outlive it in a frame a traceback may keep (gh-77894, see pin_buffer).
                with ffi.from_buffer(batch) as src:
                    i = 0
                    while i < n:
                        i, why = fast.serve(src, i, n, dst)
                        if i == n:
                            break
                        # The fast path stopped at request i: the reference path
                        # answers it (and, when I/O would block, the rest of the
                        # batch too, in one worker thread), then the fast path resumes.
                        stop = i + 1 if why == NOT_FAST else n
                        reqs = [parse_request(batch[k * blkif.REQ_SIZE:(k + 1) * blkif.REQ_SIZE],
                                              feats) for k in range(i, stop)]
                        for k, result in enumerate(await self._execute(reqs, mapper, pool, feats),
                                                   start=i):
                            blkif.RSP.pack_into(out, k * blkif.RSP_SIZE, *result)
                        i = stop
                _, notify = ring.produce(memoryview(out)[:n * blkif.RSP_SIZE])
                if notify:
                    try:
                        channel.notify()
                    except EventChannelBlockedError as exc:
                        self._peer_broke(exc)
                        return
                self.stats.batches += 1
                self.stats.max_batch = max(self.stats.max_batch, n)
                # One checkpoint per batch: inline I/O and a busy-poll that finds
                # work never yield, and a busy frontend would starve every other
                # task of the daemon (other devices, the store).
                await trio.lowlevel.checkpoint()
        finally:
            self._fast.remove(fast)
            self._fold(fast)
            stopped.set()

    def _peer_broke(self, exc: RemoteProtocolError) -> None:
        peer_log.warning(f"ring:{self.domain.domid}", "vbd of dom%d: %s; disconnecting the "
                         "device", self.domain.domid, exc)
        self.peer_failed(exc)

    async def _execute(self, reqs: list, mapper, pool, feats: BackendFeatures) -> list:
        """Pin, do the batch's I/O in one worker thread, unpin; (id, op, status) each."""
        results: list[tuple[int, int, int] | None] = [None] * len(reqs)
        plans: list[tuple[int, BlkRequest, list]] = []
        pinned: list[tuple[int, bool]] = []
        for i, req in enumerate(reqs):
            if isinstance(req, BlkRequest) and req.indirect_grefs:
                req = self._load_indirect(req, mapper, feats)
            if isinstance(req, BlkError):
                peer_log.info(f"req:{self.domain.domid}", "vbd of dom%d: request %d refused: %s",
                              self.domain.domid, req.id, req.reason)
                results[i] = (req.id, req.op, req.status)
                self.stats.errors += 1
                continue
            iov = self._pin(req, mapper, pool, pinned)
            if iov is None:
                results[i] = (req.id, req.op, BlkifRsp.ERROR)
                self.stats.errors += 1
                continue
            plans.append((i, req, iov))
        self.stats.in_flight += len(plans)
        try:  # refused requests alone need no I/O, so no trip to a worker thread
            done = await trio.to_thread.run_sync(self._io, plans) if plans else []
        finally:
            self.stats.in_flight -= len(plans)
            for ref, writable in pinned:
                mapper.unpin(ref, writable)
        for (i, req, _iov), status in zip(plans, done, strict=True):
            results[i] = (req.id, req.op, status)
            if status != BlkifRsp.OKAY:
                self.stats.errors += 1
            else:
                self.stats.count(_OP_NAMES.get(req.kind, "other"), req.length)
        return results

    def _load_indirect(self, req: BlkRequest, mapper, feats) -> BlkRequest | BlkError:
        data = bytearray()
        remaining = req.nr_indirect_segments * blkif.SEGMENT.size
        try:
            for gref in req.indirect_grefs:
                chunk = min(remaining, XEN_PAGE_SIZE)
                data += mapper.copy_from(gref, 0, chunk)
                remaining -= chunk
        except GrantError as exc:
            return BlkError(req.id, req.op, BlkifRsp.ERROR, f"indirect page: {exc}")
        error = blkif.finish_indirect(req, bytes(data), feats)
        return error if error is not None else req

    def _pin(self, req: BlkRequest, mapper, pool, pinned: list) -> list | None:
        """Pin each segment's grant and return the I/O vector into the pool."""
        writable = req.kind == BlkifOp.READ  # a read writes into the guest's page
        mine: list[int] = []
        spans: list[list[int]] = []  # [start, end) byte ranges in the pool
        ss = self.sector_size
        try:
            for seg in req.segments:
                frame = mapper.pin(seg.gref, writable)
                mine.append(seg.gref)
                start = frame * XEN_PAGE_SIZE + seg.first_sect * ss
                end = frame * XEN_PAGE_SIZE + (seg.last_sect + 1) * ss
                if spans and spans[-1][1] == start:
                    spans[-1][1] = end  # contiguous with the previous segment: one iovec
                else:
                    spans.append([start, end])
        except GrantError as exc:
            for ref in mine:
                mapper.unpin(ref, writable)
            # str(exc): a kept exception would pin views of the guest's memory
            peer_log.info(f"grant:{self.domain.domid}", "vbd of dom%d: request %d: %s",
                          self.domain.domid, req.id, str(exc))
            return None
        pinned.extend((ref, writable) for ref in mine)
        return [pool[start:end] for start, end in spans]

    def _io(self, plans: list) -> list[int]:
        """Worker thread: the batch's file I/O, in order."""
        fd = self._fd
        out = []
        for _i, req, iov in plans:
            try:
                if req.kind in (BlkifOp.FLUSH_DISKCACHE, BlkifOp.WRITE_BARRIER):
                    if not self._flush(fd):
                        out.append(BlkifRsp.ERROR)
                        continue
                    if not iov:
                        out.append(BlkifRsp.OKAY)
                        continue
                if req.kind == BlkifOp.READ:
                    got = os.preadv(fd, iov, req.offset)
                    if got < req.length:  # past EOF of a sparse image: zeros
                        _zero_tail(iov, got)
                elif req.kind == BlkifOp.DISCARD:
                    rc = lib.pvio_punch_hole(fd, req.offset, req.length)
                    if rc < 0:
                        raise OSError(-rc, os.strerror(-rc))
                else:  # WRITE, or the data of a flush/barrier
                    _pwritev_all(fd, iov, req.offset, req.length)
                out.append(BlkifRsp.OKAY)
            except OSError as exc:
                log.warning("%s: I/O error at %d+%d: %s", self.image, req.offset,
                            req.length, str(exc))
                out.append(BlkifRsp.ERROR)
        return out

    def _flush(self, fd: int) -> bool:
        if self.flush_failed:
            return False
        try:
            os.fdatasync(fd)
        except OSError as exc:
            log.error("%s: fdatasync failed (%s); every later flush fails until the "
                      "device is reconnected", self.image, str(exc))
            self.flush_failed = True
            return False
        return True


def _pwritev_all(fd: int, iov: list, offset: int, length: int) -> None:
    done = os.pwritev(fd, iov, offset)
    while done < length:  # short write: finish it (rare; regular files)
        rest, skip = [], done
        for buf in iov:
            if skip >= len(buf):
                skip -= len(buf)
                continue
            rest.append(buf[skip:])
            skip = 0
        n = os.pwritev(fd, rest, offset + done)
        if n <= 0:
            raise OSError("short write")
        done += n


def _zero_tail(iov: list, got: int) -> None:
    for buf in iov:
        if got >= len(buf):
            got -= len(buf)
            continue
        buf[got:] = bytes(len(buf) - got)
        got = 0
