"""A learning L2 switch, sans-I/O: the heart of pvio's network backend.

Frames come in on a port; the switch learns the source MAC on that port (with
aging), then forwards to the port that owns the destination MAC, or floods
broadcast, multicast and unknown destinations to every other port. Each port
has a bounded queue of frames waiting for its consumer: a consumer that stops
reading loses frames (counted in ``dropped``), never the daemon's memory
(XSA-392/424: a hard per-queue cap).

A port may be bound to one source MAC (``Port.source``: a vif's configured
MAC): a frame from it with any other source is dropped (counted in
``spoofed``) and never learned, so a guest cannot take another's traffic by
sending with its MAC (what Xen's vif scripts do with ebtables).

Queued items are :class:`pvio.netif.Frame` (bytes plus offload state), so a
checksum-offloaded or GSO frame keeps its flags from one vif to the next.
Taps (``pvio net capture``) see every frame a port sends and every frame
queued to it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pvio.netif import NO_OFFLOAD, Frame, Offload

Tap = Callable[[str, Frame], None]  # (direction "in"|"out" seen from the port, frame)

BROADCAST = b"\xff" * 6


@dataclass
class PortStats:
    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    dropped: int = 0  # frames lost because the port's queue was full
    runts: int = 0  # frames shorter than an Ethernet header
    spoofed: int = 0  # frames dropped: their source MAC is not the port's ``source``


@dataclass(eq=False)
class Port:
    name: str
    capacity: int
    queue: deque = field(default_factory=deque)
    stats: PortStats = field(default_factory=PortStats)
    on_ready: Callable[[], None] | None = None  # called when the queue becomes non-empty
    source: bytes | None = None  # the only source MAC this port may send (None: any)

    taps: list[Tap] = field(default_factory=list)

    def enqueue(self, frame: Frame) -> bool:
        return self.enqueue_many([frame], len(frame.data)) == 1

    def enqueue_many(self, frames: list[Frame], nbytes: int) -> int:
        """Queue ``frames`` (``nbytes`` in all) as :meth:`enqueue` would, one by one;
        returns how many were queued (the rest are dropped: the queue is full)."""
        queued, was_empty = self._admit(self.queue, frames, nbytes)
        if was_empty and self.on_ready is not None:
            self.on_ready()
        return queued

    def _admit(self, queue, frames: list[Frame], nbytes: int) -> tuple[int, bool]:
        """Append what fits of ``frames`` to ``queue`` (the rest are dropped and
        counted), count them and show them to the taps: (how many, whether
        ``queue`` was empty before)."""
        room = self.capacity - len(queue)
        if room < len(frames):
            self.stats.dropped += len(frames) - max(room, 0)
            frames = frames[:max(room, 0)]
            nbytes = sum(len(f.data) for f in frames)
        if not frames:
            return 0, False
        was_empty = not queue
        queue.extend(frames)
        self.stats.tx_frames += len(frames)
        self.stats.tx_bytes += nbytes
        for frame in frames if self.taps else ():
            for tap in self.taps:
                tap("out", frame)
        return len(frames), was_empty

    def take(self, max_frames: int) -> list[Frame]:
        out = []
        while self.queue and len(out) < max_frames:
            out.append(self.queue.popleft())
        return out


class Switch:
    def __init__(self, *, aging: float = 300.0, queue_frames: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.aging = aging
        self.queue_frames = queue_frames
        self.clock = clock
        self.ports: dict[str, Port] = {}
        self._fdb: dict[bytes, tuple[Port, float]] = {}
        #: While a batch is being switched (:meth:`batch`), ports that can deliver
        #: in one go (a vif) record themselves here instead of waking their consumer.
        self.deferred: list | None = None

    def add_port(self, name: str, capacity: int | None = None) -> Port:
        return self.attach_port(Port(name, capacity or self.queue_frames))

    def attach_port(self, port: Port) -> Port:
        """Plug in a port built elsewhere (e.g. a vif's per-queue port)."""
        if port.name in self.ports:
            raise ValueError(f"port {port.name!r} exists")
        self.ports[port.name] = port
        return port

    def remove_port(self, port: Port) -> None:
        if self.ports.get(port.name) is port:
            del self.ports[port.name]
        port.queue.clear()
        for tap in list(port.taps):  # a capture of this port ends with it
            close = getattr(tap, "close", None)
            if close is not None:
                close()
        self._fdb = {mac: entry for mac, entry in self._fdb.items() if entry[0] is not port}

    def lookup(self, mac: bytes) -> Port | None:
        entry = self._fdb.get(mac)
        if entry is None:
            return None
        port, seen = entry
        if self.clock() - seen > self.aging:
            del self._fdb[mac]
            return None
        return port

    def forward(self, ingress: Port, data: bytes, offload: Offload = NO_OFFLOAD) -> list[Port]:
        """Switch one frame; returns the ports it was queued on."""
        ingress.stats.rx_frames += 1
        ingress.stats.rx_bytes += len(data)
        if len(data) < 14:
            ingress.stats.runts += 1
            return []
        frame = Frame(data, offload)
        for tap in ingress.taps:
            tap("in", frame)
        if self._spoofed(ingress, data, 1):
            return []
        return [p for p in self._targets(ingress, data) if p.enqueue(frame)]

    @staticmethod
    def _spoofed(ingress: Port, data, count: int) -> bool:
        """``count`` frames from ``ingress`` with ``data``'s source MAC are not
        its ``source``: drop them (counted)."""
        if ingress.source is None or data[6:12] == ingress.source:
            return False
        ingress.stats.spoofed += count
        return True

    def _targets(self, ingress: Port, data) -> list[Port]:
        """Learn the source MAC of a frame from ``ingress``; the ports it goes to."""
        dst, src = data[:6], data[6:12]
        if not src[0] & 1:  # never learn a multicast source
            self._fdb[bytes(src)] = (ingress, self.clock())
        target = None if dst[0] & 1 else self.lookup(bytes(dst))
        if target is not None:
            return [] if target is ingress else [target]
        return [p for p in self.ports.values() if p is not ingress]

    def forward_run(self, ingress: Port, frames: list[Frame], nbytes: int) -> None:
        """Switch a run of frames from ``ingress`` that share their destination and
        source MAC (netback's C TX path finds the runs of a batch): one learning
        and one forwarding decision for the run, one queueing per target port.
        Each frame must be at least an Ethernet header long (``nbytes``: their
        total length). The same effect as :meth:`forward` on each frame in turn."""
        ingress.stats.rx_frames += len(frames)
        ingress.stats.rx_bytes += nbytes
        for frame in frames if ingress.taps else ():
            for tap in ingress.taps:
                tap("in", frame)
        if self._spoofed(ingress, frames[0].data, len(frames)):
            return
        for port in self._targets(ingress, frames[0].data):
            port.enqueue_many(frames, nbytes)

    def begin_batch(self) -> None:
        """Frames forwarded until :meth:`end_batch` are delivered per port at the end."""
        if self.deferred is None:
            self.deferred = []

    def end_batch(self) -> None:
        deferred, self.deferred = self.deferred, None
        for flush, arg in dict.fromkeys(deferred or ()):
            flush(arg)

    def fdb(self) -> dict[str, str]:
        """The learned table (MAC -> port name), aged entries excluded."""
        now = self.clock()
        return {mac.hex(":"): port.name for mac, (port, seen) in self._fdb.items()
                if now - seen <= self.aging}
