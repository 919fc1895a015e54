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

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import trio

from pvio import _l4
from pvio._log import RateLimitedLogger
from pvio.layouts import (
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_PAGE_SIZE,
)
from pvio.netif import (
    NO_OFFLOAD,
    RSP_ERROR,
    RSP_NULL,
    RX_REQ,
    RX_RSP,
    RXF_EXTRA_INFO,
    RXF_MORE_DATA,
    TX_REQ_SIZE,
    Frame,
    NetifFatal,
    TxPacket,
    assemble,
    offload_of,
    pack_extra_gso,
    pack_tx_responses,
    rx_flags,
)
from pvio.netswitch import Port, Switch
from pvio.ring import NETIF_RX, NETIF_TX, BackRing, GrantError, RingBrokenError, wait_for_work
from pvio.ring.grant import GNTST
from pvio.xenbus.device import DeviceError
from pvio.xenbus.ringdev import VIF, BackendConnection, RingBackendDriver

log = logging.getLogger("pvio.netback")
peer_log = RateLimitedLogger(log)


_GSO_TYPES = (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6)


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
        dq = self.rx_queues[q]
        if len(dq) >= self.capacity:
            self.stats.dropped += 1
            return False
        dq.append(frame)
        self.stats.tx_frames += 1
        self.stats.tx_bytes += len(frame.data)
        for tap in self.taps:
            tap("out", frame)
        if len(dq) == 1:
            deferred = self.switch.deferred if self.switch is not None else None
            if deferred is not None and self.deliver is not None:
                deferred.append((self.deliver, q))
            elif self.wake[q] is not None:
                self.wake[q]()
        return True

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


class _Work:
    """What one service task waits for (``wait_for_work``'s ``end``)."""

    def __init__(self, queue: _Queue, tx: bool, rx: bool) -> None:
        self.queue, self.tx, self.rx = queue, tx, rx

    def final_check(self) -> int:
        work = 0
        if self.tx:
            work += self.queue.tx.final_check_for_requests()
        if self.rx and self.queue.frames:
            work += self.queue.rx.final_check_for_requests()
        return work


class NetBackend(RingBackendDriver):
    """One vif: a port of ``switch`` named ``vif<domid>.<devid>`` (Xen's naming)."""

    layout = VIF

    def __init__(self, domain, mac: str, switch: Switch | None = None, *, devid: int = 0,
                 queue_frames: int = 1024, max_slots: int = 20) -> None:
        super().__init__(domain)
        self.mac = mac
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
        self._rsp = bytearray()

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
        self._queues = []
        for q, qc in enumerate(conn.queues):
            queue = _Queue(q, BackRing.attach(NETIF_TX, qc.mappings[0].buf),
                           BackRing.attach(NETIF_RX, qc.mappings[1].buf),
                           self.port.rx_queues[q], (qc.channel, qc.rx_channel))
            self._queues.append(queue)
            self.port.wake[q] = qc.rx_channel.set_pending
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
                except (RingBrokenError, NetifFatal) as exc:
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
        if self._draining or q >= len(self._queues) or self.conn is None:
            return
        queue = self._queues[q]
        try:
            self._rx(queue, self.domain.mapper())
        except (RingBrokenError, NetifFatal) as exc:
            self._broken(queue, exc)
            return
        if queue.frames:
            queue.channels[1].set_pending()

    def _broken(self, queue: _Queue, exc: Exception) -> None:
        self.stats.last_error = str(exc)
        peer_log.warning(f"ring:{self.domain.domid}", "%s queue %d: %s; disconnecting the vif",
                         self.port_name, queue.index, exc)
        if self.on_failure is not None:
            self.nursery.start_soon(self.on_failure, str(exc))

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
        results = assemble(batch, max_slots=self.max_slots, accept_gso=_GSO_TYPES)
        refs: list[int] = []
        offs: list[int] = []
        lens: list[int] = []
        spans = []
        for r in results:
            if isinstance(r, TxPacket):
                start = len(refs)
                for f in r.fragments:
                    refs.append(f.gref)
                    offs.append(f.offset)
                    lens.append(f.size)
                spans.append((r, start, len(refs)))
            else:
                self._refuse(r.reason)
        self.switch.begin_batch()
        try:
            if refs:
                local_offs = list(itertools.accumulate(lens, initial=0))
                buf = bytearray(local_offs.pop())
                statuses = mapper.copy_vec(refs, offs, lens, buf, local_offs, to_grant=False)
                view = memoryview(buf)
                for packet, a, b in spans:
                    bad = next((st for st in statuses[a:b] if st != GNTST.okay), None)
                    if bad is not None:
                        ref = refs[a + statuses[a:b].index(bad)]
                        self._refuse(str(GrantError(bad, ref)))
                        packet.responses = [(rid, RSP_ERROR if st != RSP_NULL else st)
                                            for rid, st in packet.responses]
                        continue
                    data = bytes(view[local_offs[a]:local_offs[a] + packet.size])
                    self.stats.tx_packets += 1
                    self.stats.tx_bytes += len(data)
                    self.switch.forward(self.port, data, offload_of(packet))
            _, notify = queue.tx.produce(pack_tx_responses(results, self._rsp))
            if notify:
                queue.channels[0].notify()
        finally:
            self.switch.end_batch()  # the destinations' RX copies, one pass per port
        return len(batch) // TX_REQ_SIZE

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
        plan: list[tuple[Frame, int]] = []
        need = 0
        while frames:
            frame = self._fit(frames[0], frames)
            if frame is None:
                frames.popleft()
                self.stats.rx_dropped += 1
                continue
            slots = -(-len(frame.data) // XEN_PAGE_SIZE) + (1 if frame.offload.gso_type else 0)
            if need + slots > avail:
                frames[0] = frame
                break
            frames.popleft()
            plan.append((frame, slots))
            need += slots
        if not plan:
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
        out = bytearray(need * RX_RSP.size)
        src = b"".join(frame.data for frame, _ in plan)
        refs: list[int] = []
        lens: list[int] = []
        src_offs: list[int] = []
        slot = pos = 0
        firsts = []
        for frame, _ in plan:
            length = len(frame.data)
            firsts.append((slot, len(refs)))
            chunks = -(-length // XEN_PAGE_SIZE)
            flags = rx_flags(frame.offload)
            gso = frame.offload.gso_type
            for c in range(chunks):
                rid, _, gref = RX_REQ.unpack_from(reqs, slot * RX_REQ.size)
                size = min(XEN_PAGE_SIZE, length - c * XEN_PAGE_SIZE)
                refs.append(gref)
                lens.append(size)
                src_offs.append(pos)
                pos += size
                f = flags if c == 0 else 0
                if c < chunks - 1:
                    f |= RXF_MORE_DATA
                if c == 0 and gso:
                    f |= RXF_EXTRA_INFO
                RX_RSP.pack_into(out, slot * RX_RSP.size, rid, 0, f, size)
                slot += 1
                if c == 0 and gso:
                    pack_extra_gso(out, slot * RX_RSP.size, gso, frame.offload.gso_size)
                    slot += 1
        statuses = mapper.copy_vec(refs, [0] * len(refs), lens, src, src_offs, to_grant=True)
        for (frame, _), (first, op0) in zip(plan, firsts, strict=True):
            n_ops = -(-len(frame.data) // XEN_PAGE_SIZE)
            bad = next((st for st in statuses[op0:op0 + n_ops] if st != GNTST.okay), None)
            if bad is not None:
                self.stats.rx_errors += 1
                peer_log.info(f"rx:{self.domain.domid}", "%s: rx copy failed: %s",
                              self.port_name, GrantError(bad, refs[op0]))
                k, s = first, 0
                while s < n_ops:  # every fragment slot of the packet says ERROR
                    rid, off, f, _ = RX_RSP.unpack_from(out, k * RX_RSP.size)
                    RX_RSP.pack_into(out, k * RX_RSP.size, rid, off, f, RSP_ERROR)
                    k += 2 if (s == 0 and frame.offload.gso_type) else 1
                    s += 1
            else:
                self.stats.rx_packets += 1
                self.stats.rx_bytes += len(frame.data)
        _, notify = queue.rx.produce(out)
        if notify:
            queue.channels[1].notify()
        return len(plan)
