"""The console protocol (io/console.h) as a trio stream, for both sides.

A console is one ``xencons_interface`` page (``in`` 1024 bytes: backend to
guest, ``out`` 2048 bytes: guest to backend) and one event channel, raised
after every publish in either direction. :class:`ConsoleStream` turns the two
byte rings and the channel into a ``trio.abc.HalfCloseableStream``:
``send_all`` writes as much as fits and waits for the peer to make room,
``receive_some`` waits for data. One pump task per stream turns event-channel
wake-ups into wake-ups of the waiting senders and receivers, and caps how many
*spurious* wake-ups it honours per 200 ms (xenconsoled's budget: 30 per 200
ms): a wake-up after which neither of the peer's indices moved counts against
the budget (hardening.md #7: wake-ups with no work), unless the wake-up before
it saw a move (whose notification may have been still in flight); an index
only moves when it goes past its highest value so far. So a peer that notifies
for nothing is throttled and costs bounded work (30 wake-ups per 200 ms plus
two per move, and moves need data), while real traffic, however chatty, is
not throttled (each notification comes with a move, and a wake-up that sees a
move excuses the next); every console runs in its own tasks, so none starves
another.

Xen's console has no end-of-file message; ``send_eof`` sends what a terminal
sends for end of input, Ctrl-D (0x04), then refuses further sends.

A peer that publishes an impossible index (the "prod - cons larger than the
buffer" check) breaks the stream: calls raise ``trio.BrokenResourceError``
with the :class:`~pvio.ring.RingBrokenError` as its cause.
"""

from __future__ import annotations

import time

import trio

from pvio.ring import (
    ByteRing,
    EventChannel,
    EventChannelBlockedError,
    RemoteProtocolError,
    RingBrokenError,
)

EOT = b"\x04"
RATE_EVENTS = 30  # xenconsoled: at most 30 events ...
RATE_WINDOW = 0.2  # ... per 200 ms


class ConsoleStream(trio.abc.HalfCloseableStream):
    """A byte stream over a console's ``tx``/``rx`` byte rings and event channel."""

    def __init__(self, tx: ByteRing, rx: ByteRing, channel: EventChannel, *,
                 rate_events: int = RATE_EVENTS, rate_window: float = RATE_WINDOW) -> None:
        self.tx = tx
        self.rx = rx
        self.channel = channel
        self.rate_events = rate_events
        self.rate_window = rate_window
        self._changed = trio.Event()
        self._closed = False
        self._eof_sent = False
        self._send_conflict = _OneAtATime("another task is already sending")
        self._recv_conflict = _OneAtATime("another task is already receiving")
        self.throttled = 0  # wake-ups delayed by the rate limit
        self._recv_error: trio.BrokenResourceError | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    async def pump(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run (in a nursery) for the stream's life: event channel -> waiters."""
        window_start, events = time.monotonic(), 0
        rings = (self.rx, self.tx)
        highest = [ring.peer_index for ring in rings]  # the peer's prod (rx), cons (tx)
        moved = False
        task_status.started()
        while not self._closed:
            await self.channel.wait()
            now = time.monotonic()
            if now - window_start >= self.rate_window:
                window_start, events = now, 0
            # A move is an index that went past its highest value so far (one
            # the peer sets back and forth moves no data) to a legal place: at
            # most a ring-full away from ours ("prod - cons > size" is the byte
            # rings' own check), so that moves are bounded by the data we
            # exchange. Many ring-fulls may pass between two wake-ups.
            advanced = False
            for k, ring in enumerate(rings):
                index = ring.peer_index
                gap = (ring.index - index) if ring.writer else (index - ring.index)
                if 0 < (index - highest[k]) & 0xFFFFFFFF < 0x80000000 and \
                        gap & 0xFFFFFFFF <= ring.size:
                    highest[k] = index
                    advanced = True
            # A wake-up that moved nothing is spurious, unless the one before
            # it moved something: that one may have seen a move whose
            # notification was still on its way (the peer publishes, then
            # notifies), and this is that notification.
            if not advanced and not moved:
                events += 1
            moved = advanced
            if events > self.rate_events:
                self.throttled += 1
                await trio.sleep(window_start + self.rate_window - now)
            self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _broken(self, exc: RemoteProtocolError) -> trio.BrokenResourceError:
        err = trio.BrokenResourceError(f"console peer broke the protocol: {exc}")
        err.__cause__ = exc
        return err

    def _notify(self) -> None:
        try:
            self.channel.notify()
        except EventChannelBlockedError as exc:
            raise self._broken(exc) from exc

    async def send_all(self, data) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("console stream is closed")
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was called")
            view = memoryview(data).cast("B")
            while view:
                changed = self._changed
                try:
                    n = self.tx.write(view)
                except RingBrokenError as exc:
                    raise self._broken(exc) from exc
                if n:
                    self._notify()
                    self.bytes_out += n
                    view = view[n:]
                    await trio.lowlevel.checkpoint_if_cancelled()
                else:
                    await changed.wait()
                if self._closed:
                    raise trio.ClosedResourceError("console stream closed while sending")
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("console stream is closed")
                changed = self._changed
                try:
                    if self.tx.free():
                        return
                except RingBrokenError as exc:
                    raise self._broken(exc) from exc
                await changed.wait()

    async def send_eof(self) -> None:
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        await self.send_all(EOT)
        self._eof_sent = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._recv_conflict:
            size = self.rx.size if max_bytes is None else max_bytes
            if size < 1:
                raise ValueError("max_bytes must be positive")
            buf = bytearray(min(size, 65536))
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("console stream is closed")
                if self._recv_error is not None:
                    raise self._recv_error
                changed = self._changed
                try:
                    n = self.rx.readinto(buf)
                except RingBrokenError as exc:
                    raise self._broken(exc) from exc
                if n:
                    try:
                        self._notify()  # room for the writer
                    except trio.BrokenResourceError as exc:
                        self._recv_error = exc  # for the next call: these bytes are taken
                    self.bytes_in += n
                    # The bytes are consumed: no cancellation may lose them now.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return bytes(buf[:n])
                await changed.wait()

    async def aclose(self) -> None:
        self._closed = True
        self._wake()
        await trio.lowlevel.checkpoint()


class _OneAtATime:
    """trio's stream rule: one sender and one receiver at a time (BusyResourceError)."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.held = False

    def __enter__(self) -> None:
        if self.held:
            raise trio.BusyResourceError(self.message)
        self.held = True

    def __exit__(self, *exc: object) -> None:
        self.held = False


class HeadTailBuffer:
    """Bytes waiting for a reader, bounded: keeps the first and the last
    ``limit // 2`` bytes and counts what it dropped in between (what
    xenconsoled's buffer lacks: it loses the start of a crash)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        self.total_dropped = 0

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def append(self, data: bytes) -> None:
        half = self.limit // 2
        if len(self.head) < half and not self.tail and not self.dropped:
            take = min(half - len(self.head), len(data))
            self.head += data[:take]
            data = data[take:]
        if not data:
            return
        self.tail += data
        excess = len(self.tail) - (self.limit - len(self.head))
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess
            self.total_dropped += excess

    def take(self) -> bytes:
        """Everything buffered, with a marker where bytes were dropped; then empty."""
        marker = (f"\r\n[pvio: {self.dropped} bytes dropped]\r\n".encode()
                  if self.dropped else b"")
        out = bytes(self.head) + marker + bytes(self.tail)
        self.head.clear()
        self.tail.clear()
        self.dropped = 0
        return out
