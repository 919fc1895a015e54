"""netback: the network backend (io/netif.h), a port of the daemon's switch.

Each vif is one :class:`VifPort` of a :class:`pvio.netswitch.Switch`. Per
queue, the backend consumes the TX ring (frontend -> switch) and fills the RX
ring (switch -> frontend) in copy mode (``request-rx-copy``, the only mode
Linux netback still has):

* **TX**: every published request is copied out once (``take_requests``), the
  batch is assembled and validated by :func:`pvio.netif.assemble` (zero-length
  and oversized fragments, page crossings, slot limits, extras), the data of
  good packets is grant-copied out of the frontend's pages in one batch, then
  switched. A bad packet gets ``XEN_NETIF_RSP_ERROR`` in every slot and the
  port keeps working; a broken ring (impossible indices, a chain past what was
  published) disconnects this one vif.
* **RX**: frames the switch queued for the port are grant-copied into the
  pages the frontend posted, one response per request *in the request's slot*
  (netif.h: Linux netfront finds pages by slot, extras overlay ids). A GSO
  super-packet goes with a GSO extra to a frontend that set
  ``feature-gso-tcpv4/6``, and is segmented in software for one that did not;
  a frame larger than a page needs ``feature-sg``.

The per-queue port deques are bounded: a frontend that stops posting RX
buffers loses frames (counted), never the daemon's memory.
"""

from __future__ import annotations

import logging
from array import array
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, islice, repeat
from operator import itemgetter

import trio

from pvio import _l4
from pvio._log import RateLimitedLogger
from pvio.layouts import (
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_PAGE_SIZE,
)
from pvio.netif import (
    ETH_HLEN,
    NO_OFFLOAD,
    RX_REQ,
    RX_RSP,
    TX_REQ_SIZE,
    TX_RSP,
    TXF_CSUM_BLANK,
    TXF_DATA_VALIDATED,
    TXP_ARG0,
    TXP_ARG1,
    TXP_DATA_OFF,
    TXP_FLAGS,
    TXP_GSO_SIZE,
    TXP_GSO_TYPE,
    TXP_N,
    TXP_REASON,
    TXP_SIZE,
    Frame,
    NetifFatal,
    Offload,
    TxScratch,
    gso_mask,
    rx_flags,
    tx_reason,
)
from pvio.netswitch import Port, Switch
from pvio.ring import (
    NETIF_RX,
    NETIF_TX,
    BackRing,
    GrantError,
    RemoteProtocolError,
    RingBrokenError,
    wait_for_work,
)
from pvio.ring._lib import ffi, lib
from pvio.xenbus.device import DeviceError
from pvio.xenbus.ringdev import VIF, BackendConnection, RingBackendDriver

log = logging.getLogger("pvio.netback")
peer_log = RateLimitedLogger(log)


_GSO_MASK = gso_mask((XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6))
_first = itemgetter(0)
_second = itemgetter(1)
_tuple_new = tuple.__new__  # Frame(data, offload) without NamedTuple's Python-level __new__
_OFFLOADS: dict[tuple[int, int, int], Offload] = {}


def _offload(flags: int, gso_type: int, gso_size: int) -> Offload:
    """A TX packet's offload state (:func:`pvio.netif.offload_of`), shared per value."""
    key = (flags, gso_type, gso_size)
    off = _OFFLOADS.get(key)
    if off is None:
        csum = bool(flags & TXF_CSUM_BLANK)
        off = Offload(csum, csum or bool(flags & TXF_DATA_VALIDATED), gso_type, gso_size)
        if len(_OFFLOADS) < 4096:  # bounded: the values come from frontends
            _OFFLOADS[key] = off
    return off


def _grant_context(mapper, out) -> object:
    """Fill a ``pvio_net_gnt`` with ``mapper``'s grant table (the C fast path
    copies through pvio_gnt_copy_vec, with the mapper's checks and pin counts)."""
    out.table = mapper.table.ptr
    out.nr = mapper.nr_entries
    out.domid = mapper.domid
    out.pool = mapper.pool.ptr
    out.nr_frames = mapper.pool.pages
    out.rd_pins, out.wr_pins = mapper.pin_counts
    return out


class VifPort(Port):
    """A switch port with one bounded deque per queue (flows stay on one queue).

    ``wake[q]`` is called when queue ``q``'s deque becomes non-empty; while the
    switch is switching a batch, ``deliver(q)`` is deferred to the batch's end
    instead (one copy pass for the batch, and no wake-up of our own task).
    """

    def __init__(self, name: str, capacity: int, queues: int, switch: Switch | None = None,
                 deliver=None) -> None:
        super().__init__(name, capacity)
        self.rx_queues: list[deque[Frame]] = [deque() for _ in range(queues)]
        self.wake: list = [None] * queues
        self.switch = switch
        self.deliver = deliver

    def enqueue(self, frame: Frame) -> bool:
        n = len(self.rx_queues)
        q = 0 if n == 1 else hash(bytes(frame.data[26:38])) % n
        queued, was_empty = self._admit(self.rx_queues[q], [frame], len(frame.data))
        if was_empty:
            self._ready(q)
        return queued == 1

    def _ready(self, q: int) -> None:
        """Queue ``q`` was empty and has frames: deliver them at the end of the
        switch's batch, or wake its service now."""
        deferred = self.switch.deferred if self.switch is not None else None
        if deferred is not None and self.deliver is not None:
            deferred.append((self.deliver, q))
        elif self.wake[q] is not None:
            self.wake[q]()

    def enqueue_many(self, frames: list[Frame], nbytes: int) -> int:
        if len(self.rx_queues) != 1:  # frames spread over queues by flow
            return sum(1 for frame in frames if self.enqueue(frame))
        queued, was_empty = self._admit(self.rx_queues[0], frames, nbytes)
        if was_empty:
            self._ready(0)
        return queued

    @property
    def queued(self) -> int:
        return sum(len(dq) for dq in self.rx_queues)


@dataclass
class NetStats:
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0  # packets the frontend sent that were refused (error status)
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0  # frames lost copying into the frontend's pages (bad rx grant)
    rx_dropped: int = 0  # frames the frontend cannot take (too big without feature-sg)
    gso_segmented: int = 0  # super-packets cut in software for a frontend without GSO
    last_error: str = ""
    errors_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _Queue:
    index: int
    tx: BackRing
    rx: BackRing
    frames: deque
    channels: tuple
    held: bytes = b""  # rx requests taken off the ring, not enough for the next frame yet
    txs: TxScratch | None = None
    rxs: _RxScratch | None = None

    def __post_init__(self) -> None:
        self.txs = TxScratch(self.tx.nr_ents)
        self.rxs = _RxScratch(self.rx.nr_ents)


class _RxScratch:
    """Private buffers of the C RX fill for a ring of ``nr`` slots."""

    def __init__(self, nr: int) -> None:
        self.rsp = bytearray(RX_RSP.size * nr)
        self.rsp_v = memoryview(self.rsp)
        self.status = array("i", bytes(4 * nr))
        self.ref = array("I", bytes(4 * nr))
        self.p_rsp = ffi.from_buffer("uint8_t[]", self.rsp)
        self.p_status = ffi.from_buffer("int32_t[]", self.status)
        self.p_ref = ffi.from_buffer("uint32_t[]", self.ref)
        self.ok_bytes = ffi.new("uint64_t *")


class _Work:
    """What one service task waits for (``wait_for_work``'s ``end``)."""

    def __init__(self, queue: _Queue, tx: bool, rx: bool) -> None:
        self.queue, self.tx, self.rx = queue, tx, rx

    @property
    def progress(self) -> tuple[int | None, int | None]:
        """The served rings' consumer indices only: work on a ring this task
        does not wait for must not excuse wake-ups on its channel."""
        q = self.queue
        return (q.tx.progress if self.tx else None), (q.rx.progress if self.rx else None)

    def final_check(self) -> int:
        work = 0
        if self.tx:
            work += self.queue.tx.final_check_for_requests()
        if self.rx and self.queue.frames:
            work += self.queue.rx.final_check_for_requests()
        return work


class NetBackend(RingBackendDriver):
    """One vif: a port of ``switch`` named ``vif<domid>.<devid>`` (Xen's naming).

    With ``spoof_check`` (the default) the port takes only frames whose source
    MAC is the vif's ``mac``; the others are dropped and counted
    (``tx_spoofed``), as Xen's vif scripts do with ebtables."""

    layout = VIF
    #: The shortest TX packet accepted (netif.h: an Ethernet header). Lowering it
    #: makes a non-conforming backend, which the conformance kit's tests need.
    min_tx_frame = ETH_HLEN

    def __init__(self, domain, mac: str, switch: Switch | None = None, *, devid: int = 0,
                 queue_frames: int = 1024, max_slots: int = 20,
                 spoof_check: bool = True) -> None:
        super().__init__(domain)
        self.mac = mac
        self.spoof_check = spoof_check
        self.switch = switch if switch is not None else Switch()
        self.devid = devid
        self.queue_frames = queue_frames
        self.max_slots = max_slots
        self.stats = NetStats()
        self.port: VifPort | None = None
        self._queues: list[_Queue] = []
        self._wait_scopes: set[trio.CancelScope] = set()
        self._running: list[trio.Event] = []
        self._draining = False
        self._fe: dict[str, bool] = {}
        self._gnt = ffi.new("pvio_net_gnt *")

    @property
    def port_name(self) -> str:
        return f"vif{self.domain.domid}.{self.devid}"

    def toolstack_keys(self) -> dict[str, str]:
        return {"mac": self.mac, "handle": str(self.devid)}

    def features(self) -> dict[str, str]:
        feats = super().features()
        feats.update({"feature-sg": "1", "feature-gso-tcpv4": "1", "feature-gso-tcpv6": "1",
                      "feature-ipv6-csum-offload": "1", "feature-rx-copy": "1",
                      "feature-rx-flip": "0"})
        return feats

    async def start(self, conn: BackendConnection, frontend: dict) -> dict[str, str]:
        def flag(key: str) -> bool:
            return (frontend.get(key) or b"0").strip() == b"1"

        if not flag("request-rx-copy"):
            raise DeviceError("frontend did not set request-rx-copy=1: pvio netback only "
                              "copies (rx flip is gone from Xen's netback too)")
        if not flag("feature-rx-notify"):
            raise DeviceError("frontend did not set feature-rx-notify=1 (netif.h: mandatory)")
        if self.nursery is None:
            raise DeviceError("netback needs a nursery to run its service")
        self._fe = {"sg": flag("feature-sg"), "gso4": flag("feature-gso-tcpv4"),
                    "gso6": flag("feature-gso-tcpv6"), "no_csum": flag("feature-no-csum-offload"),
                    "ipv6_csum": flag("feature-ipv6-csum-offload")}
        self._draining = False
        self._running = []
        self.port = VifPort(self.port_name, self.queue_frames, len(conn.queues), self.switch,
                            self._deliver)
        if self.spoof_check:
            self.port.source = bytes.fromhex(self.mac.replace(":", ""))
        self._queues = []
        for q, qc in enumerate(conn.queues):
            queue = _Queue(q, BackRing.attach(NETIF_TX, qc.mappings[0].buf),
                           BackRing.attach(NETIF_RX, qc.mappings[1].buf),
                           self.port.rx_queues[q], (qc.channel, qc.rx_channel))
            self._queues.append(queue)
            self.port.wake[q] = partial(self._wake_rx, queue)
        self.switch.attach_port(self.port)
        for queue in self._queues:
            tx_ch, rx_ch = queue.channels
            if tx_ch is rx_ch:
                await self._start_task(queue, tx_ch, tx=True, rx=True)
            else:
                await self._start_task(queue, tx_ch, tx=True, rx=False)
                await self._start_task(queue, rx_ch, tx=False, rx=True)
        log.info("%s up (mac %s, %d queue(s)%s%s)", self.port_name, self.mac,
                 len(self._queues), ", split event channels" if
                 self._queues[0].channels[0] is not self._queues[0].channels[1] else "",
                 ", sg" if self._fe["sg"] else "")
        return {}

    async def _start_task(self, queue: _Queue, channel, *, tx: bool, rx: bool) -> None:
        stopped = trio.Event()
        self._running.append(stopped)
        await self.nursery.start(self._serve, queue, channel, _Work(queue, tx, rx), stopped)

    def statistics(self) -> dict[str, int]:
        s = self.stats
        port = self.port.stats if self.port is not None else None
        return {"tx_packets": s.tx_packets, "tx_bytes": s.tx_bytes, "tx_errors": s.tx_errors,
                "rx_packets": s.rx_packets, "rx_bytes": s.rx_bytes, "rx_errors": s.rx_errors,
                "rx_dropped": s.rx_dropped + (port.dropped if port else 0),
                "tx_spoofed": port.spoofed if port else 0,
                "gso_segmented": s.gso_segmented, "queues": len(self._queues),
                "rx_queued": self.port.queued if self.port is not None else 0,
                # what the frontend has posted and we have not used yet (held: taken
                # off the ring, too few for the next frame)
                "rx_posted": sum(q.rx.unconsumed_requests + len(q.held) // RX_REQ.size
                                 for q in self._queues if not q.rx.broken),
                "tx_pending": sum(q.tx.unconsumed_requests for q in self._queues
                                  if not q.tx.broken)}

    async def stop(self) -> None:
        self._draining = True
        for scope in list(self._wait_scopes):
            scope.cancel()
        for stopped in self._running:
            await stopped.wait()
        self._running = []
        self._queues = []  # their rings are unmapped next (RingBackendDriver.disconnect)
        if self.port is not None:
            self.switch.remove_port(self.port)
            for dq in self.port.rx_queues:
                dq.clear()
            self.port.wake = [None] * len(self.port.wake)

    # ------------------------------------------------------------- service

    async def _serve(self, queue: _Queue, channel, work: _Work, stopped: trio.Event, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
        mapper = self.domain.mapper()
        try:
            task_status.started()
            while not self._draining:
                try:
                    done = 0
                    if work.tx:
                        done += self._tx(queue, mapper)
                    if work.rx:
                        done += self._rx(queue, mapper)
                except (RemoteProtocolError, NetifFatal) as exc:  # a bad ring, a blocked send
                    self._broken(queue, exc)
                    return
                if done:
                    await trio.lowlevel.checkpoint()
                    continue
                scope = trio.CancelScope()
                self._wait_scopes.add(scope)
                with scope:
                    await wait_for_work(work, channel)
                self._wait_scopes.discard(scope)
        finally:
            stopped.set()

    def _deliver(self, q: int) -> None:
        """Copy the frames a switched batch queued for us into our RX ring now
        (called at the end of another vif's TX batch); our task is woken only
        if frames are left waiting for RX buffers."""
        if self._draining or q >= len(self._queues):
            return
        queue = self._queues[q]
        try:
            self._rx(queue, self.domain.mapper())
        except (RemoteProtocolError, NetifFatal) as exc:  # a bad ring, a blocked send
            self._broken(queue, exc)
            return
        if queue.frames:
            self._wake_rx(queue)

    def _wake_rx(self, queue: _Queue) -> None:
        """Wake the queue's RX task (frames wait for RX buffers, or came outside
        a switch batch). Called in another vif's task or whoever forwarded, so
        a send the guest blocked is handled here."""
        try:
            queue.channels[1].set_pending()
        except RemoteProtocolError as exc:
            self._broken(queue, exc)

    def _broken(self, queue: _Queue, exc: Exception) -> None:
        self.stats.last_error = str(exc)
        peer_log.warning(f"ring:{self.domain.domid}", "%s queue %d: %s; disconnecting the vif",
                         self.port_name, queue.index, exc)
        self.peer_failed(exc)

    def _refuse(self, reason: str) -> None:
        self.stats.tx_errors += 1
        self.stats.last_error = reason
        self.stats.errors_by_reason[reason] = self.stats.errors_by_reason.get(reason, 0) + 1
        peer_log.info(f"tx:{self.domain.domid}", "%s: dropped a packet: %s", self.port_name,
                      reason)

    # TX: frontend -> switch ------------------------------------------------

    def _tx(self, queue: _Queue, mapper) -> int:
        batch = queue.tx.take_requests()
        if not batch:
            return 0
        n = len(batch) // TX_REQ_SIZE
        sc = queue.txs
        # assembled, validated (from the private copy) and grant-copied in C
        npk = sc.batch(_grant_context(mapper, self._gnt), batch, max_slots=self.max_slots,
                       gso=_GSO_MASK, min_len=self.min_tx_frame)
        good, bad, offloaded, nbytes, _ = sc.summary_v.tolist()
        pv = sc.pinfo_v
        if bad:
            for j in range(npk):
                base = j * TXP_N
                if pv[base + TXP_REASON]:
                    self._refuse(tx_reason(pv[base + TXP_REASON], pv[base + TXP_ARG0],
                                           pv[base + TXP_ARG1]))
        self.switch.begin_batch()
        try:
            if good:
                self._switch_tx(sc, npk, good, bad, offloaded, nbytes)
            _, notify = queue.tx.produce(sc.rsp_v[:n * TX_RSP.size])
            if notify:
                queue.channels[0].notify()
        finally:
            self.switch.end_batch()  # the destinations' RX copies, one pass per port
        return n

    def _switch_tx(self, sc: TxScratch, npk: int, good: int, bad: int, offloaded: int,
                   nbytes: int) -> None:
        """Hand the accepted packets of a TX batch to the switch, a run of packets
        with the same MAC addresses at a time (one decision per run)."""
        pv = sc.pinfo_v
        if bad:  # refused packets leave gaps in the data: use each one's offset
            keep = [j for j in range(npk) if not pv[j * TXP_N + TXP_REASON]]
            sizes = [pv[j * TXP_N + TXP_SIZE] for j in keep]
            starts = [pv[j * TXP_N + TXP_DATA_OFF] for j in keep]
            ends = [a + b for a, b in zip(starts, sizes, strict=True)]
        else:
            keep = None
            sizes = pv[TXP_SIZE:npk * TXP_N:TXP_N].tolist()
            ends = list(accumulate(sizes))
            starts = [0, *ends[:-1]]
        if nbytes <= 2048 * good:  # small frames: one copy out, then cheap slices
            whole = bytes(sc.data_v[:ends[-1]])
            datas = list(map(whole.__getitem__, map(slice, starts, ends)))
        else:  # big frames: one copy each
            view = sc.data_v
            datas = [bytes(view[a:b]) for a, b in zip(starts, ends, strict=True)]
        if not offloaded:
            frames = list(map(_tuple_new, repeat(Frame), zip(datas, repeat(NO_OFFLOAD))))
        else:
            idx = keep if keep is not None else range(npk)
            offloads = [_offload(pv[j * TXP_N + TXP_FLAGS], pv[j * TXP_N + TXP_GSO_TYPE],
                                 pv[j * TXP_N + TXP_GSO_SIZE]) for j in idx]
            frames = list(map(_tuple_new, repeat(Frame), zip(datas, offloads, strict=True)))
        self.stats.tx_packets += good
        self.stats.tx_bytes += nbytes
        if self.min_tx_frame < ETH_HLEN:  # runts possible: the switch counts them
            for frame in frames:
                self.switch.forward(self.port, frame.data, frame.offload)
            return
        runs = sc.runs_v[:sc.nruns[0]].tolist()
        if len(runs) == 1:
            self.switch.forward_run(self.port, frames, nbytes)
            return
        prev = 0
        for end in runs:
            self.switch.forward_run(self.port, frames[prev:end], sum(sizes[prev:end]))
            prev = end

    # RX: switch -> frontend ------------------------------------------------

    def _fit(self, frame: Frame, frames: deque) -> Frame | None:
        """Make ``frame`` (``frames[0]``) something this frontend can take, or None
        to drop it. A super-packet is replaced at the head of ``frames`` by its
        segments, unless they would not fit in the queue's capacity."""
        off = frame.offload
        if off.gso_type and not (self._fe["gso4"] if off.gso_type == XEN_NETIF_GSO_TYPE_TCPV4
                                 else self._fe["gso6"]):
            info = _l4.parse(frame.data)
            if info is None or info.proto != _l4.IPPROTO_TCP:
                return None
            payload = len(frame.data) - _l4.tcp_header_end(frame.data, info)
            if max(1, -(-payload // off.gso_size)) > self.queue_frames - len(frames) + 1:
                return None  # the segments would overflow the bounded queue
            segments = _l4.segment(frame.data, off.gso_size)
            if not segments:
                return None
            self.stats.gso_segmented += 1
            frames.popleft()
            frames.extendleft(Frame(bytes(s), NO_OFFLOAD._replace(data_validated=True))
                              for s in reversed(segments))
            frame = frames[0]
        elif off.csum_blank and self._needs_csum(frame.data):
            data = bytearray(frame.data)
            _l4.complete_checksum(data)
            frame = Frame(bytes(data), off._replace(csum_blank=False, data_validated=True))
        if len(frame.data) > XEN_PAGE_SIZE and not self._fe["sg"]:
            return None
        return frame

    def _needs_csum(self, data: bytes) -> bool:
        """netif.h: IPv4 checksum offload is on unless the frontend set
        feature-no-csum-offload; IPv6 checksum offload is off unless it set
        feature-ipv6-csum-offload. True: complete the checksum here."""
        v4_ok, v6_ok = not self._fe["no_csum"], self._fe["ipv6_csum"]
        if v4_ok == v6_ok:
            return not v4_ok
        info = _l4.parse(data)
        return not (v6_ok if info is not None and info.version == 6 else v4_ok)

    def _rx(self, queue: _Queue, mapper) -> int:
        frames = queue.frames
        if not frames:
            return 0
        held = len(queue.held) // RX_REQ.size
        avail = held + queue.rx.unconsumed_requests
        k = min(len(frames), avail)
        datas = meta = None
        if k:
            # The common case in one go: frames that need nothing from _fit (no
            # offload state, at most a page each) take one slot each.
            head = list(frames) if k == len(frames) else list(islice(frames, k))
            if list(map(_second, head)).count(NO_OFFLOAD) == k:
                datas = list(map(_first, head))
                lens = list(map(len, datas))
                if max(lens) <= XEN_PAGE_SIZE:
                    need = k
                    if k == len(frames):
                        frames.clear()
                    else:
                        for _ in range(k):
                            frames.popleft()
                else:
                    datas = None
        if datas is None:
            datas, lens, meta, need = self._plan_rx(frames, avail)
        if not datas:
            if avail > held:
                # Too few for the next frame: hold them, so that the final check
                # arms req_event for the next request instead of reporting work
                # that cannot be done (a busy loop that froze the daemon). Only the
                # ones counted: more may have been posted since, and taking those
                # too would hold every buffer with nobody left to wake us.
                queue.held += bytes(queue.rx.take_requests(avail - held))
            return 0
        if need > held:
            reqs = queue.held + bytes(queue.rx.take_requests(need - held))
        else:
            reqs = queue.held
        if len(reqs) // RX_REQ.size < need:  # the ring broke while we looked
            raise RingBrokenError("rx requests vanished")
        queue.held = reqs[need * RX_REQ.size:]
        npk = len(datas)
        sc = queue.rxs
        lens_a = array("I", lens)
        g = _grant_context(mapper, self._gnt)
        p_reqs = ffi.from_buffer("uint8_t[]", reqs)
        p_lens = ffi.from_buffer("uint32_t[]", lens_a)
        p_meta = ffi.NULL if meta is None else ffi.from_buffer("uint32_t[]", meta)
        total = sum(lens)
        if total <= 2048 * npk:  # small frames: one buffer, one call
            src = b"".join(datas)
            used = lib.pvio_net_rx_fill(g, p_reqs, need, ffi.from_buffer("uint8_t[]", src),
                                        total, p_lens, p_meta, npk, sc.p_rsp, sc.p_status,
                                        sc.p_ref, sc.ok_bytes)
            ok_bytes = sc.ok_bytes[0]
        else:  # big frames: a call each, straight from the frame (no joined copy)
            used = ok_bytes = 0
            for i, data in enumerate(datas):
                got = lib.pvio_net_rx_fill(
                    g, p_reqs + 8 * used, need - used, ffi.from_buffer("uint8_t[]", data),
                    lens[i], p_lens + i, p_meta if meta is None else p_meta + 2 * i, 1,
                    sc.p_rsp + 8 * used, sc.p_status + i, sc.p_ref + i, sc.ok_bytes)
                if got < 0:
                    break
                used += got
                ok_bytes += sc.ok_bytes[0]
        if used != need:
            raise RuntimeError(f"rx fill used {used} slots, planned {need}")  # a bug of ours
        if ok_bytes != total:  # some copies failed: those frames said ERROR
            statuses = sc.status[:npk].tolist()
            for st, ref in zip(statuses, sc.ref[:npk].tolist(), strict=True):
                if st:
                    self.stats.rx_errors += 1
                    peer_log.info(f"rx:{self.domain.domid}", "%s: rx copy failed: %s",
                                  self.port_name, GrantError(st, ref))
            npk -= sum(1 for st in statuses if st)
        self.stats.rx_packets += npk
        self.stats.rx_bytes += ok_bytes
        _, notify = queue.rx.produce(sc.rsp_v[:need * RX_RSP.size])
        if notify:
            queue.channels[1].notify()
        return len(datas)

    def _plan_rx(self, frames: deque, avail: int):
        """Frames (made fit for this frontend by :meth:`_fit`) for ``avail`` posted
        buffers: their data, lengths, C meta (flags | gso_type << 16, gso_size)
        and the slots they need."""
        datas: list[bytes] = []
        lens: list[int] = []
        meta = array("I")
        need = 0
        while frames:
            frame = self._fit(frames[0], frames)
            if frame is None:
                frames.popleft()
                self.stats.rx_dropped += 1
                continue
            data, off = frame
            gso = off.gso_type
            slots = -(-len(data) // XEN_PAGE_SIZE) + (1 if gso else 0)
            if need + slots > avail:
                frames[0] = frame
                break
            frames.popleft()
            datas.append(data)
            lens.append(len(data))
            meta.append(rx_flags(off) | gso << 16)
            meta.append(off.gso_size if gso else 0)
            need += slots
        return datas, lens, meta, need
