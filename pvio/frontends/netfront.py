"""netfront: a network device frontend any trio program can embed (io/netif.h).

``nic = await open_netfront(session)`` attaches vif 0 of a domain session and
waits for Connected. Then::

    await nic.send(frame)              # an Ethernet frame (bytes or pvio.netif.Frame)
    frame = await nic.receive()        # a pvio.netif.Frame (data, offload)
    async for frame in nic: ...

``send`` waits while the transmit backlog is full (backpressure); when the
program stops calling ``receive``, netfront stops posting receive buffers, so
the backend's bounded port queue drops the excess (counted there), as a real
NIC does. ``nic.mac`` is the address the toolstack gave the vif.

Each queue's TX and RX rings own fixed pages granted to the backend once
(TX read-only, RX writable); a frame is copied into TX pages, split at page
boundaries into a ``NETTXF_more_data`` chain (``feature-sg``); RX pages are
found by ring slot, as Linux netfront does. With ``offloads=True`` netfront
advertises GSO and checksum offload and passes :class:`pvio.netif.Offload`
through both ways (what ``pvio netfront-tap`` maps to virtio-net headers);
otherwise it sets ``feature-no-csum-offload`` and receives plain frames.

Hardened against a hostile backend: responses are copied once; a TX response
for an id not in flight, an RX response leaving its page, a bogus extra or an
impossible ring index puts the device in an error state (every waiter gets
:class:`NetDeviceError`).

:class:`BlockingNetFront` is the blocking facade for plain code.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate, islice, repeat
from operator import itemgetter

import trio

from pvio.layouts import XEN_NETIF_MAX_TX_SIZE, XEN_PAGE_SIZE
from pvio.netif import (
    ETH_HLEN,
    NO_OFFLOAD,
    RX_REQ,
    RX_RSP,
    RXP_N,
    TX_REQ,
    TX_RSP,
    TXF_CSUM_BLANK,
    TXF_DATA_VALIDATED,
    Frame,
    Offload,
    RxProtocolError,
    RxScratch,
)
from pvio.ring import (
    NETIF_RX,
    NETIF_TX,
    EventChannelBlockedError,
    FrontRing,
    RingBrokenError,
    wait_for_work,
)
from pvio.ring._lib import ffi, lib, pin_buffer
from pvio.xenbus.ringdev import DOM0, VIF, RingFrontendDriver

log = logging.getLogger("pvio.netfront")

#: The backend keys netfront reads when it attaches.
NET_KEYS = ("mac", "feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-rx-copy",
            "feature-split-event-channels", "multi-queue-max-queues")


class NetDeviceError(OSError):
    """The device is unusable: the backend broke the protocol, or it is gone."""


#: What a backend that breaks the protocol makes the ring code raise.
_BACKEND_FAULTS = (RingBrokenError, RxProtocolError, EventChannelBlockedError, NetDeviceError)

_first = itemgetter(0)
_second = itemgetter(1)
_tuple_new = tuple.__new__  # Frame(data, offload) without NamedTuple's Python-level __new__
_RX_OFFLOADS: dict[tuple[int, int, int], Offload] = {}


def _rx_offload(flags: int, gso_type: int, gso_size: int) -> Offload:
    key = (flags, gso_type, gso_size)
    off = _RX_OFFLOADS.get(key)
    if off is None:
        off = Offload(bool(flags & 1), bool(flags & 2), gso_type, gso_size)
        if len(_RX_OFFLOADS) < 4096:  # bounded: the values come from the backend
            _RX_OFFLOADS[key] = off
    return off


class _TxState:
    """A queue's TX ids, in-flight set and granted pages, kept in C
    (``pvio_netfront_tx``): one call puts a batch of frames on the ring, one
    accounts a batch of responses."""

    def __init__(self, nr: int, pages: memoryview, refs: list[int]) -> None:
        self.nr = nr
        self._free = ffi.new("uint16_t[]", nr)
        self._flight = ffi.new("uint8_t[]", nr)
        self._refs = ffi.new("uint32_t[]", refs)
        self._pages, _, self._pages_keep = pin_buffer(pages)
        self.c = ffi.new("pvio_netfront_tx *")
        lib.pvio_netfront_tx_init(self.c, nr, self._free, self._flight, self._pages, self._refs)
        self.req = bytearray(TX_REQ.size * nr)
        self.req_v = memoryview(self.req)
        self.p_req = ffi.from_buffer("uint8_t[]", self.req)
        self.nreq = ffi.new("uint32_t *")
        self.nbytes = ffi.new("uint64_t *")
        self.errors = ffi.new("uint32_t *")
        self.bad_id = ffi.new("uint32_t *")
        self.slow: bytearray | None = None  # send_vnet_from_fd's frame for Python
        self.p_slow = ffi.NULL
        self.slow_len = ffi.new("uint32_t *")
        self.why = ffi.new("uint32_t *")

    @property
    def slow_v(self) -> memoryview:
        return memoryview(self.slow)

    def release(self) -> None:
        ffi.release(self._pages_keep)

    @property
    def free(self) -> int:
        return self.c.nfree

    @property
    def in_flight(self) -> set[int]:
        return {i for i, busy in enumerate(ffi.unpack(self._flight, self.nr)) if busy}


@dataclass(eq=False)
class _Queue:
    index: int
    tx: FrontRing
    rx: FrontRing
    tx_pages: list[memoryview]
    tx_refs: list[int]
    rx_pages: list[memoryview]
    rx_refs: list[int]
    channels: tuple
    txc: _TxState
    rxs: RxScratch
    rx_pages_ptr: object  # the RX pages, contiguous (page j for ring slot j % nr_ents)
    rx_pages_keep: object  # what keeps rx_pages_ptr valid (pin_buffer)
    rx_refs_c: object
    backlog: deque = field(default_factory=deque)
    idle: bool = False  # the queue's task sleeps: a new frame must wake it
    want_room: int = 0  # callers of wait_tx_room: completions must wake the task
    carry: bytes = b""  # rx responses of a packet not wholly published yet
    carry_start: int = 0
    space: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    @property
    def in_flight(self) -> set[int]:
        """TX ids the backend has not answered yet."""
        return self.txc.in_flight


class _Work:
    def __init__(self, front: NetFront, queue: _Queue, tx: bool, rx: bool) -> None:
        self.front, self.queue, self.tx, self.rx = front, queue, tx, rx

    @property
    def progress(self) -> tuple[int | None, int | None]:
        """The served rings' consumer indices only: work on a ring this task
        does not wait for must not excuse wake-ups on its channel."""
        q = self.queue
        return (q.tx.progress if self.tx else None), (q.rx.progress if self.rx else None)

    def final_check(self) -> int:
        q = self.queue
        work = 0
        if self.tx:
            if q.backlog and q.txc.free and q.tx.free_requests:
                return 1
            if q.backlog or q.want_room:  # blocked on ids or slots: woken by completions
                work += q.tx.final_check_for_responses()
            # otherwise completions are reclaimed lazily, at the next send (Linux
            # netfront also defers its tx_buf_gc): no wake-up per answered batch
        if self.rx and not self.front._rx_full:
            work += q.rx.final_check_for_responses()
        return work


@dataclass
class NetFrontStats:
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0  # packets the backend answered with an error
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0  # packets the backend failed (negative status)


class NetFront(RingFrontendDriver):
    layout = VIF

    def __init__(self, session, *, queues: int = 1, split_event_channels: bool = True,
                 offloads: bool = False, tx_backlog: int = 256, rx_backlog: int = 1024) -> None:
        super().__init__(session, queues=queues, split_event_channels=split_event_channels)
        self.offloads = offloads
        self.tx_backlog = tx_backlog
        self.rx_backlog = rx_backlog
        self.mac = ""
        self.mtu = 1500
        self.stats = NetFrontStats()
        self._q: list[_Queue] = []
        self._buffers: list[tuple[int, list[int]]] = []  # (frame, refs) to free
        self._wholes: list[memoryview] = []
        self._rx_frames: deque[Frame] = deque()
        self._rx_full = False
        self._rx_lot = trio.lowlevel.ParkingLot()
        self._error: NetDeviceError | None = None
        self._scopes: list[trio.CancelScope] = []
        self._gso_ok = False

    # ------------------------------------------------------------ handshake

    def frontend_features(self) -> dict[str, str]:
        feats = {**super().frontend_features(), "feature-sg": "1"}
        if self.offloads:
            feats.update({"feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1",
                          "feature-ipv6-csum-offload": "1"})
        else:
            feats["feature-no-csum-offload"] = "1"
        return feats

    async def publish(self, xs, path: str) -> None:
        raw = await xs.read_or_none(f"{path}/mac")
        self.mac = raw.decode("ascii", "replace") if raw else ""
        mtu = await xs.read_or_none(f"{path}/mtu")
        # Linux netfront's max_mtu: a frame (MTU + Ethernet header) must fit netif's
        # 16-bit packet size.
        limit = XEN_NETIF_MAX_TX_SIZE - ETH_HLEN
        self.mtu = int(mtu) if mtu and mtu.isdigit() and 68 <= int(mtu) <= limit else 1500
        await super().publish(xs, path)

    def _grant_pages(self, count: int, readonly: bool
                     ) -> tuple[list[memoryview], list[int], memoryview]:
        first = self.session.pool.alloc(count)
        refs = [self.session.gnttab.grant_access(DOM0, first + i, readonly=readonly)
                for i in range(count)]
        self._buffers.append((first, refs))
        whole = self.session.pool.shm.page(first, count)  # the pool hands out contiguous runs
        return [whole[i * XEN_PAGE_SIZE:(i + 1) * XEN_PAGE_SIZE] for i in range(count)], refs, \
            whole

    def setup(self) -> None:
        self._q = []
        for q, fq in enumerate(self.queues):
            tx = FrontRing.init(NETIF_TX, self.area(0, q))
            rx = FrontRing.init(NETIF_RX, self.area(1, q))
            tx_pages, tx_refs, tx_whole = self._grant_pages(tx.nr_ents, readonly=True)
            rx_pages, rx_refs, rx_whole = self._grant_pages(rx.nr_ents, readonly=False)
            rx_ptr, _, rx_keep = pin_buffer(rx_whole)
            queue = _Queue(q, tx, rx, tx_pages, tx_refs, rx_pages, rx_refs,
                           (fq.channel, fq.rx_channel), _TxState(tx.nr_ents, tx_whole, tx_refs),
                           RxScratch(rx.nr_ents), rx_ptr, rx_keep, ffi.new("uint32_t[]", rx_refs))
            self._wholes.extend((tx_whole, rx_whole))
            # Every RX slot holds a request for its own page: slot j <-> page j % N.
            posts = bytearray(rx.nr_ents * RX_REQ.size)
            for i, ref in enumerate(rx_refs):
                RX_REQ.pack_into(posts, i * RX_REQ.size, i, 0, ref)
            rx.put_requests(posts)
            rx.push_requests()
            self._q.append(queue)

    async def attach(self, backend: dict[str, bytes | None]) -> None:
        await super().attach(backend)
        if (backend.get("feature-rx-copy") or b"0").strip() != b"1":
            raise NetDeviceError("the backend does not offer feature-rx-copy")
        self._gso_ok = self.offloads
        self._error = None
        self._scopes = []
        for queue in self._q:
            tx_ch, rx_ch = queue.channels
            pairs = [(tx_ch, True, True)] if tx_ch is rx_ch else [(tx_ch, True, False),
                                                                  (rx_ch, False, True)]
            for channel, tx, rx in pairs:
                scope = trio.CancelScope()
                self._scopes.append(scope)
                self.session._nursery.start_soon(self._serve, scope, queue, channel,
                                                 _Work(self, queue, tx, rx))
            self._send_event(rx_ch.notify)  # the backend may have missed the first RX posts
        self._check()

    async def detach(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes = []
        self._fail(NetDeviceError("the device is closed"), quiet=True)
        await super().detach()

    def release_transport(self) -> None:
        for queue in self._q:
            queue.tx.release()
            queue.rx.release()
            queue.txc.release()
            ffi.release(queue.rx_pages_keep)
            for view in queue.tx_pages + queue.rx_pages:
                view.release()
        for view in self._wholes:
            view.release()
        self._wholes = []
        for first, refs in self._buffers:
            self.session.pool.revoke_and_free(first, len(refs), self.session.gnttab, refs)
        self._buffers = []
        self._q = []
        super().release_transport()

    @property
    def carrier(self) -> bool:
        """Link state: the device is connected and usable."""
        return bool(self._scopes) and self._error is None

    # ------------------------------------------------------------ user API

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._q:
            raise NetDeviceError("the device is not connected")

    async def send(self, frame: bytes | Frame, offload: Offload = NO_OFFLOAD) -> None:
        """Queue one Ethernet frame for transmission (waits while the backlog is full)."""
        await self.send_many([frame if isinstance(frame, Frame) else Frame(bytes(frame), offload)])

    async def send_many(self, frames: list[Frame | bytes]) -> None:
        """Queue several frames (one wake-up of the ring task for all of them).
        They are all checked first: a bad one raises ValueError, nothing queued."""
        self._check()
        frames = [f if isinstance(f, Frame) else Frame(bytes(f)) for f in frames]
        if not frames:
            await trio.lowlevel.checkpoint()
            return
        lens = list(map(len, map(_first, frames)))
        if min(lens) < 14 or max(lens) > 0xFFFF:
            bad = next(n for n in lens if not 14 <= n <= 0xFFFF)
            raise ValueError(f"a frame must be 14..65535 bytes, not {bad}")
        offloads = list(map(_second, frames))
        if offloads.count(NO_OFFLOAD) != len(offloads) and not self._gso_ok and \
                any(off.gso_type for off in offloads):
            raise ValueError("GSO frames need NetFront(offloads=True)")
        n = len(self._q)
        if n == 1:
            await self._queue_frames(self._q[0], frames)
        else:
            by_queue: dict[int, list[Frame]] = {}
            for frame in frames:
                by_queue.setdefault(hash(bytes(frame.data[26:38])) % n, []).append(frame)
            for q, some in by_queue.items():
                await self._queue_frames(self._q[q], some)
        await trio.lowlevel.checkpoint()

    async def _queue_frames(self, queue: _Queue, frames: list[Frame]) -> None:
        pos = 0
        while pos < len(frames):
            room = self.tx_backlog - len(queue.backlog)
            if room <= 0:
                self._push_tx(queue)
                while len(queue.backlog) >= self.tx_backlog:
                    await queue.space.park()
                    self._check()
                continue
            queue.backlog.extend(islice(frames, pos, pos + room))
            pos += room
        self._push_tx(queue)

    def _push_tx(self, queue: _Queue) -> None:
        """Put the backlog on the ring now, in the caller's task (no wake-up of our
        own ring task); the task is woken only if something is left waiting."""
        if self._error is None:
            try:
                self._tx_responses(queue)
                self._tx_send(queue)
            except _BACKEND_FAULTS as exc:
                self._broke(exc)
                return
        if queue.backlog:
            self._wake_tx(queue)

    def send_vnet_from_fd(self, fd: int, limit: int = 64) -> tuple[int, int, bytes | None] | None:
        """Move frames a TAP-like ``fd`` holds (``IFF_VNET_HDR``: a 10-byte
        ``struct virtio_net_hdr`` before each frame, one frame per read) onto
        the ring without blocking, each read straight into free TX pages (one C
        call for the batch; :func:`pvio.tap.Tap.from_vnet`'s mapping of the
        header). Returns ``(sent, why, raw)``: ``why`` is ``lib.PVIO_VNET_*``
        (EMPTY: the fd has nothing more; LIMIT: ``limit`` frames sent; FULL: the
        ring is short of room, use :meth:`send_many`; SLOW: ``raw`` is a frame,
        header first, that needs :meth:`pvio.tap.Tap.from_vnet` and
        :meth:`send_many`). None when this path does not apply now (several
        queues, or frames waiting in the backlog, which must go first)."""
        self._check()
        if len(self._q) != 1 or self._q[0].backlog:
            return None
        queue = self._q[0]
        txc = queue.txc
        self._push_tx(queue)  # the backlog is empty: this reclaims ids (completions are lazy)
        self._check()
        if txc.slow is None:
            txc.slow = bytearray(lib.PVIO_VNET_READ_MAX)
            txc.p_slow = ffi.from_buffer("uint8_t[]", txc.slow)
        sent = lib.pvio_netfront_tx_from_vnet_fd(
            txc.c, fd, limit, queue.tx.free_requests, self._gso_ok, txc.p_req, txc.nreq,
            txc.nbytes, txc.p_slow, lib.PVIO_VNET_READ_MAX, txc.slow_len, txc.why)
        why = txc.why[0]
        if sent:
            self._publish_tx(queue, sent, txc.nreq[0], txc.nbytes[0])
            self._check()
        if why == lib.PVIO_VNET_ERROR:
            err = txc.slow_len[0]
            raise OSError(err, os.strerror(err))
        raw = bytes(txc.slow_v[:txc.slow_len[0]]) if why == lib.PVIO_VNET_SLOW else None
        return sent, why, raw

    async def wait_tx_room(self) -> None:
        """Wait until the backend has answered some transmitted frames (after
        :meth:`send_vnet_from_fd` said FULL): the ring's task is woken by TX
        completions meanwhile, which it otherwise reclaims lazily."""
        self._check()
        queue = self._q[0]
        queue.want_room += 1
        try:
            self._wake_tx(queue)  # re-run its final check, which now arms rsp_event
            await queue.space.park()
        finally:
            queue.want_room -= 1
        self._check()

    def _wake_tx(self, queue: _Queue) -> None:
        if queue.idle:
            queue.idle = False
            self._send_event(queue.channels[0].set_pending)

    async def receive(self) -> Frame:
        """The next received frame (waits for one)."""
        return (await self.receive_many(1))[0]

    async def receive_many(self, limit: int = 64) -> list[Frame]:
        """Up to ``limit`` received frames (waits for at least one). Always a trio
        checkpoint, so a consumer loop cannot starve its sibling tasks."""
        if not self._rx_frames:
            while not self._rx_frames:
                self._check()
                await self._rx_lot.park()
        else:
            await trio.lowlevel.checkpoint()
        frames = self._rx_frames
        out = [frames.popleft() for _ in range(min(limit, len(frames)))]
        if self._rx_full and len(frames) < self.rx_backlog // 2:
            self._rx_full = False
            for queue in self._q:
                self._send_event(queue.channels[1].set_pending)
        return out

    def __aiter__(self):
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self.receive()
        except NetDeviceError:
            raise StopAsyncIteration from None

    # ------------------------------------------------------------ service

    def _send_event(self, send) -> None:
        """``send()``: a channel's ``notify`` or ``set_pending``. A send the
        backend blocked (its eventfd made blocking and saturated;
        :class:`EventChannelBlockedError` under :func:`pvio.ring.guard_sends`)
        breaks the device like a broken ring; callers check it afterwards."""
        try:
            send()
        except EventChannelBlockedError as exc:
            self._broke(exc)

    def _broke(self, exc: Exception) -> None:
        """The backend broke the protocol (one of ``_BACKEND_FAULTS``)."""
        self._fail(exc if isinstance(exc, NetDeviceError)
                   else NetDeviceError(f"backend broke the protocol: {exc}"))

    def _fail(self, exc: NetDeviceError, quiet: bool = False) -> None:
        if self._error is None:
            self._error = exc
            if not quiet:
                log.error("vif: %s; the device is unusable", exc)
        self._rx_lot.unpark_all()
        for queue in self._q:
            queue.space.unpark_all()

    async def _serve(self, scope: trio.CancelScope, queue: _Queue, channel,
                     work: _Work) -> None:
        with scope:
            while self._error is None:
                try:
                    done = 0
                    if work.tx:
                        done += self._tx_responses(queue) + self._tx_send(queue)
                    if work.rx:
                        done += self._rx(queue)
                except _BACKEND_FAULTS as exc:
                    self._broke(exc)
                    return
                if done:
                    await trio.lowlevel.checkpoint()
                    continue
                if work.tx:
                    queue.idle = True
                await wait_for_work(work, channel)
                if work.tx:
                    queue.idle = False

    def _tx_responses(self, queue: _Queue) -> int:
        raw = queue.tx.take_responses()
        n = len(raw) // TX_RSP.size
        if not n:
            return 0
        txc = queue.txc
        freed = lib.pvio_netfront_tx_done(txc.c, ffi.from_buffer("uint8_t[]", raw), n,
                                          txc.errors, txc.bad_id)
        self.stats.tx_errors += txc.errors[0]
        if freed < 0:
            raise NetDeviceError(f"tx response for id {txc.bad_id[0]}, which is not in flight")
        if queue.want_room:
            queue.space.unpark_all()
        return n

    def _tx_send(self, queue: _Queue) -> int:
        """Put as much of the backlog on the ring as ids and slots allow (pages
        filled and requests written in one C call)."""
        backlog = queue.backlog
        txc = queue.txc
        if not backlog or not txc.free:
            return 0
        free_slots = queue.tx.free_requests
        k = min(len(backlog), free_slots)
        if not k:
            return 0
        batch = list(backlog) if k == len(backlog) else list(islice(backlog, k))
        datas = list(map(_first, batch))
        offloads = list(map(_second, batch))
        if offloads.count(NO_OFFLOAD) == k:
            meta = ffi.NULL
        else:
            words = array("I")
            for off in offloads:
                flags = (TXF_CSUM_BLANK | TXF_DATA_VALIDATED if off.csum_blank
                         else TXF_DATA_VALIDATED if off.data_validated else 0)
                words.append(flags | off.gso_type << 16)
                words.append(off.gso_size if off.gso_type else 0)
            meta = ffi.from_buffer("uint32_t[]", words)
        lens = array("I", map(len, datas))
        p_lens = ffi.from_buffer("uint32_t[]", lens)
        nbytes = sum(lens)
        if nbytes <= 2048 * k:  # small frames: one buffer, one call
            sent = lib.pvio_netfront_tx_put(txc.c, ffi.from_buffer("uint8_t[]", b"".join(datas)),
                                            p_lens, meta, k, free_slots, txc.p_req, txc.nreq,
                                            txc.nbytes)
            nreq, nbytes = txc.nreq[0], txc.nbytes[0]
        else:  # big frames: a call each, straight from the frame (no joined copy)
            sent = nreq = nbytes = 0
            for i, data in enumerate(datas):
                if not lib.pvio_netfront_tx_put(
                        txc.c, ffi.from_buffer("uint8_t[]", data), p_lens + i,
                        meta if meta == ffi.NULL else meta + 2 * i, 1, free_slots - nreq,
                        txc.p_req + TX_REQ.size * nreq, txc.nreq, txc.nbytes):
                    break
                sent += 1
                nreq += txc.nreq[0]
                nbytes += txc.nbytes[0]
        if not sent:
            return 0
        if sent == len(backlog):
            backlog.clear()
        else:
            for _ in range(sent):
                backlog.popleft()
        self._publish_tx(queue, sent, nreq, nbytes)
        return sent

    def _publish_tx(self, queue: _Queue, sent: int, nreq: int, nbytes: int) -> None:
        """Push the ``nreq`` requests staged in ``queue.txc`` (``sent`` frames of
        ``nbytes``) onto the TX ring, notify if ring.h says so, wake senders."""
        self.stats.tx_packets += sent
        self.stats.tx_bytes += nbytes
        _, notify = queue.tx.produce(queue.txc.req_v[:nreq * TX_REQ.size])
        if notify:
            self._send_event(queue.channels[0].notify)
        queue.space.unpark_all()

    def _rx(self, queue: _Queue) -> int:
        if self._rx_full:
            return 0
        ring = queue.rx
        raw = ring.take_responses()
        if not raw and not queue.carry:
            return 0
        if queue.carry:  # a chain the backend had not finished publishing last time
            raw = queue.carry + bytes(raw)
        start = queue.carry_start if queue.carry else ring.rsp_cons - len(raw) // RX_RSP.size
        n_ents = ring.nr_ents
        sc = queue.rxs
        # parsed, checked (ids by slot, offsets in the page, extras) and copied
        # out of the RX pages in one C call
        npk, used = sc.parse(raw, start, gso_ok=self._gso_ok, nr_ents=n_ents,
                             pages=queue.rx_pages_ptr)
        queue.carry = bytes(raw[used * RX_RSP.size:])
        queue.carry_start = start + used
        if npk:
            self._rx_deliver(sc, npk)
        if used:  # re-post every consumed slot for its own page
            lib.pvio_netfront_rx_posts(start & 0xFFFFFFFF, used, n_ents, queue.rx_refs_c,
                                       sc.p_posts)
            ring.put_requests(memoryview(sc.posts)[:used * RX_REQ.size])
            if ring.push_requests():
                self._send_event(queue.channels[1].notify)
        if len(self._rx_frames) >= self.rx_backlog:
            self._rx_full = True
        return npk

    def _rx_deliver(self, sc: RxScratch, npk: int) -> None:
        pv = sc.pkts_v
        lens = pv[1:npk * RXP_N:RXP_N].tolist()
        flags = pv[2:npk * RXP_N:RXP_N].tolist()
        gso = pv[3:npk * RXP_N:RXP_N].tolist()
        errors = pv[5:npk * RXP_N:RXP_N].tolist()
        if flags.count(0) == npk and gso.count(0) == npk and errors.count(0) == npk:
            ends = list(accumulate(lens))
            whole = bytes(sc.data_v[:ends[-1]])
            datas = list(map(whole.__getitem__, map(slice, [0, *ends[:-1]], ends)))
            frames = list(map(_tuple_new, repeat(Frame), zip(datas, repeat(NO_OFFLOAD))))
            nbytes = ends[-1]
        else:
            frames = []
            nbytes = 0
            view = sc.data_v
            for j in range(npk):
                if errors[j]:
                    self.stats.rx_errors += 1
                    continue
                off = pv[j * RXP_N]
                offload = (NO_OFFLOAD if not flags[j] and not gso[j] else
                           _rx_offload(flags[j], gso[j], pv[j * RXP_N + 4]))
                frames.append(_tuple_new(Frame, (bytes(view[off:off + lens[j]]), offload)))
                nbytes += lens[j]
        if frames:
            self.stats.rx_packets += len(frames)
            self.stats.rx_bytes += nbytes
            self._rx_frames.extend(frames)
            self._rx_lot.unpark_all()


async def open_netfront(session, devid: int = 0, *, timeout: float = 10.0,
                        **kwargs) -> NetFront:
    """Attach vif ``devid`` of ``session`` and wait until it is connected."""
    front = NetFront(session, **kwargs)
    device = await session.attach(front, devid, NET_KEYS)
    await device.wait_connected(timeout)
    front.device = device
    return front


class BlockingNetFront:
    """:class:`NetFront` for plain code (a trio loop in a background thread).

    ``with BlockingNetFront(socket_path, "guest") as nic: nic.send(frame);
    frame = nic.receive(timeout=1)``.
    """

    def __init__(self, socket_path: str, name: str = "guest", devid: int = 0,
                 **kwargs) -> None:
        from pvio.frontends.session import BlockingSession

        self._session = BlockingSession(socket_path, name)
        self._devid = devid
        self._kwargs = kwargs
        self.front: NetFront | None = None

    def __enter__(self) -> BlockingNetFront:
        self._session.__enter__()
        try:
            self.front = self._session.call(self._open)
        except BaseException:
            self._session.__exit__(None, None, None)
            raise
        return self

    async def _open(self) -> NetFront:
        return await open_netfront(self._session.session, self._devid, **self._kwargs)

    @property
    def mac(self) -> str:
        return self.front.mac

    def send(self, frame: bytes | Frame) -> None:
        self._session.call(self.front.send, frame)

    def receive(self, timeout: float | None = None) -> Frame:
        """The next frame; raises TimeoutError after ``timeout`` seconds."""
        async def one() -> Frame:
            if timeout is None:
                return await self.front.receive()
            with trio.fail_after(timeout):
                return await self.front.receive()

        try:
            return self._session.call(one)
        except trio.TooSlowError:
            raise TimeoutError(f"no frame within {timeout} s") from None

    def __exit__(self, *exc: object) -> None:
        self._session.__exit__(*exc)


__all__ = ["BlockingNetFront", "NetDeviceError", "NetFront", "open_netfront"]
