"""Event channels on eventfd (event_channel.h semantics).

An interdomain channel joins port A of one domain to port B of another. Here
each end is an eventfd: ``send`` on A raises B's eventfd, and waiting on A
means waiting for A's own eventfd to become readable. Reading an eventfd
returns and clears the accumulated count, so any number of sends before a wait
coalesce into one pending event, exactly like Xen's pending bit; a handler must
therefore re-check its ring after every wake-up.

Connection follows Xen: one side calls :meth:`EventChannelTable.alloc_unbound`
and hands the pair of fds (with the port number) to its peer; the peer calls
:meth:`EventChannelTable.bind_interdomain`, which **always leaves the new local
port pending**, so an event sent before the bind completed is never lost.

Waiting comes in two flavours: ``await channel.wait()`` for trio code and
``channel.wait_blocking(timeout)`` for plain code. :class:`BusyPoll` adds an
optional spin window in C (GIL released) before sleeping, which turns a
40-70 µs eventfd wake-up into a few µs at queue depth 1; it switches itself off
after consecutive empty windows, so an idle daemon uses no CPU.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import trio

from pvio.layouts import EVTCHN_2L_NR_CHANNELS, EvtchnStatus
from pvio.ring._lib import ffi, lib
from pvio.ring.errors import EventChannelBlockedError, LocalProtocolError

# The eventfd work is one C call each (GIL released, no exception on EAGAIN):
# a sleep and a wake-up sit on every queue-depth-1 round trip.
_consume = lib.pvio_evtchn_consume
_send = lib.pvio_evtchn_send
_wait = lib.pvio_evtchn_wait
_ring_sleep = lib.pvio_ring_sleep
_EINTR = -errno.EINTR
_ETIMEDOUT = -errno.ETIMEDOUT
_SLEEP_WORK = lib.PVIO_SLEEP_WORK
_SLEEP_WOKE_WORK = lib.PVIO_SLEEP_WOKE_WORK


def _oserror(rc: int) -> OSError:
    return OSError(-rc, os.strerror(-rc))


def _send_error(rc: int, fd: int) -> Exception:
    if rc == _ETIMEDOUT:
        return EventChannelBlockedError(
            f"a send to eventfd {fd} waited and was interrupted: the peer made the eventfd "
            "blocking and saturated its counter")
    return _oserror(rc)


#: The signal the send guard interrupts a waiting eventfd write with.
GUARD_SIGNAL = signal.SIGRTMAX - 2


def guard_sends(timeout: float = 0.1, signo: int = GUARD_SIGNAL) -> None:
    """Bound how long a send may wait on a peer's eventfd (once per process).

    The peer shares the eventfd a send writes to, so it can clear
    ``O_NONBLOCK`` and saturate the counter between the send's ``poll`` and its
    ``write``: the write then waits for the peer to read, which a hostile peer
    never does, and the whole thread (a daemon's event loop) stops. With the
    guard, a watchdog thread interrupts such a write after ``timeout`` seconds
    (within about twice ``timeout``) with ``signo``, given a handler that does
    nothing, without ``SA_RESTART``; the send raises :class:`EventChannelBlockedError`,
    a :class:`RemoteProtocolError`, and the service disconnects that peer.

    An honest send never waits, and an eventfd write that does not wait cannot
    be interrupted (a write late only because its thread was preempted
    completes), so a short timeout has no false alarms; a signal sent just
    as a write completed is taken by that send, never by a later call. The
    watchdog scans twice per ``timeout`` while sends happen and sleeps after a
    second without any. Calling again changes the timeout; another ``signo``
    raises ``OSError(EBUSY)``. ``pvio serve`` starts the guard. The backends
    turn the error into a disconnect of that device, blkfront and netfront
    disable the device, so a process that embeds them may start it too (it
    takes ``signo`` for the whole process)."""
    rc = lib.pvio_send_guard_start(int(signo), int(timeout * 1e9))
    if rc:
        raise _oserror(rc)


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class EventChannel:
    """One bound end of an interdomain event channel.

    ``local_fd`` is the eventfd this end waits on; ``remote_fd`` the one it
    raises with :meth:`notify` (``EVTCHNOP_send``).

    ``wake_ahead`` (default on) lets :func:`wait_for_work_blocking` kick the
    peer as soon as a sleep on a ring ends with work, if the peer is waiting
    for the next item this end produces: its halted CPU wakes while this end
    works, instead of after (specs/ring.md §2.8). The peer sees at most one
    extra, spurious, event per batch it consumes; kicks that a peer on our
    own CPU takes at once (wasted) make the ring end back off.
    """

    wake_ahead = True

    def __init__(self, port: int, local_fd: int, remote_fd: int, *, remote_domid: int,
                 remote_port: int, table: EventChannelTable | None = None) -> None:
        self.port = port
        self.local_fd = local_fd
        self.remote_fd = remote_fd
        self.remote_domid = remote_domid
        self.remote_port = remote_port
        self.sent = 0
        self.received = 0
        self.spurious = 0  # wake-ups that found no work (hardening.md #7)
        self.throttled = 0  # times a flood of those made us pause
        self._idle_wakes = 0  # consecutive wake-ups without work
        self._idle_progress: object = None  # the waiting end's progress at the last one
        self._raised = False  # set_pending raised our own port since the last wake-up
        self._table = table  # frees our port when we close
        self._closed = False
        # Set by a ring sleep whose wake-up left the event unread (cring.c,
        # pvio_ring_sleep): anything that reads the eventfd clears it.
        self._stale = ffi.new("int *")
        for fd in (local_fd, remote_fd):
            os.set_blocking(fd, False)

    def notify(self) -> None:
        """``EVTCHNOP_send``: raise the remote end (coalesces with pending events).

        The peer shares the eventfd, so it controls its counter and flags: a
        counter it saturated means an event is pending already (EAGAIN is a
        sent event, not an error), and a peer that made the fd blocking gets
        its notification skipped rather than stalling us (POLLOUT is checked
        first; the fd was made non-blocking when bound). A peer that does so
        between the check and the write makes the write wait; under
        :func:`guard_sends` it raises :class:`EventChannelBlockedError` after
        the guard's timeout."""
        rc = _send(self.remote_fd)
        if rc:
            raise _send_error(rc, self.remote_fd)
        self.sent += 1

    def set_pending(self) -> None:
        """Mark our own port pending (what ``bind_interdomain`` does).

        Our wait-eventfd came from the peer, who may have saturated its counter
        (already pending: fine) or made it blocking (skipped, not stalled), as
        for :meth:`notify`."""
        rc = _send(self.local_fd)
        if rc:
            raise _send_error(rc, self.local_fd)
        self._raised = True

    def consume(self) -> bool:
        """Clear our pending event without blocking; True if one was pending.

        ``RWF_NOWAIT`` makes the read non-blocking even if the peer, who shares
        the fd, cleared ``O_NONBLOCK`` on it (a blocking read would stall our
        whole event loop)."""
        rc = _consume(self.local_fd)
        if rc > 0:
            self._took()
            return True
        self._stale[0] = 0
        if rc == 0:
            return False
        raise _oserror(rc)

    def _took(self) -> None:
        """An event was read from our eventfd: count it, unless a ring sleep's
        wake-up left it there and counted it already."""
        if self._stale[0]:
            self._stale[0] = 0
        else:
            self.received += 1

    #: After this many consecutive wake-ups that found no work, each further
    #: one costs the waiter a pause of SPURIOUS_PAUSE seconds (xenconsoled's
    #: budget is 30 per 200 ms), so a peer that notifies for nothing costs
    #: bounded CPU. Legitimate traffic resets the count: at most one stale
    #: wake-up and one wake-ahead kick (cring.c) come with each batch of real work.
    SPURIOUS_BUDGET = 30
    SPURIOUS_PAUSE = 0.2

    def note_work(self) -> None:
        """A wake-up found work: the peer is not flooding."""
        self._idle_wakes = 0
        self._raised = False

    def note_spurious(self, progress: object = None) -> float:
        """Record a wake-up that found no work; returns how long to pause (0: none).

        The budget is for runs of them the peer caused. The first after we
        raised our own port (:meth:`set_pending`) is not counted. ``progress``
        is the waiting end's :attr:`~pvio.ring.FrontRing.progress` (None:
        unknown); if it moved since the previous idle wake-up, the end took work
        in between and the run starts again from this one: the previous one
        was, e.g., a wake-ahead kick that came just before its work, which the
        end's next take (not a wait) found."""
        self.spurious += 1
        if progress is not None and progress != self._idle_progress:
            self._idle_progress = progress
            self._idle_wakes = 0
        if self._raised:
            self._raised = False
            return 0.0
        self._idle_wakes += 1
        if self._idle_wakes <= self.SPURIOUS_BUDGET:
            return 0.0
        self.throttled += 1
        return self.SPURIOUS_PAUSE

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Block until an event is pending (and clear it); False on timeout.

        One C call sleeps in poll and clears the event (GIL released). A
        signal interrupts it: its Python handler runs (and may raise) before
        the wait resumes with the time left, as for any blocking call (PEP 475).
        """
        if self._sleep(_wait, (self.local_fd,), timeout):
            self._took()
            return True
        return False

    def _sleep(self, fn, args: tuple, timeout: float | None) -> int:
        """Run the C sleep ``fn(*args, timeout_ns)``: its result (>= 0).

        A signal (-EINTR) lets Python run its handlers (which may raise)
        and resumes with the time left; other errors raise OSError."""
        ns = -1 if timeout is None else max(0, int(timeout * 1e9))
        deadline = 0 if timeout is None else time.monotonic_ns() + ns
        rc = fn(*args, ns)
        while rc == _EINTR:
            if timeout is not None:
                ns = max(0, deadline - time.monotonic_ns())
            rc = fn(*args, ns)
        if rc < 0:
            raise _oserror(rc)
        return rc

    async def wait(self) -> None:
        """Wait (trio) until an event is pending, and clear it."""
        while not self.consume():
            await trio.lowlevel.wait_readable(self.local_fd)

    def fileno(self) -> int:
        return self.local_fd

    def close(self) -> None:
        """``EVTCHNOP_close``: close the eventfds and free the port in its table."""
        if not self._closed:
            self._closed = True
            os.close(self.local_fd)
            os.close(self.remote_fd)
            if self._table is not None:
                self._table._forget(self)

    def __repr__(self) -> str:
        return (
            f"<EventChannel port {self.port} -> dom{self.remote_domid}:{self.remote_port} "
            f"sent={self.sent} received={self.received}>"
        )


@dataclass
class UnboundPort:
    """A port from ``alloc_unbound``: waiting for ``remote_domid`` to bind to it.

    :meth:`peer_fds` are the two fds the peer needs (its local end first).
    """

    port: int
    remote_domid: int
    local_fd: int
    peer_local_fd: int
    channel: EventChannel | None = field(default=None, repr=False)

    def peer_fds(self) -> tuple[int, int]:
        """(the peer's local eventfd, the peer's remote eventfd = our local one)."""
        return self.peer_local_fd, self.local_fd


class EventChannelTable:
    """One domain's event-channel ports (port 0 is reserved, as in Xen).

    Thread-safe: port bookkeeping is the only shared state.
    """

    def __init__(self, domid: int, nr_ports: int = EVTCHN_2L_NR_CHANNELS) -> None:
        self.domid = domid
        self.nr_ports = nr_ports
        self._lock = threading.Lock()
        self._ports: dict[int, UnboundPort | EventChannel] = {}

    def _alloc_port(self) -> int:
        for port in range(1, self.nr_ports):
            if port not in self._ports:
                return port
        raise LocalProtocolError(f"dom{self.domid}: all {self.nr_ports} event channels in use")

    def alloc_unbound(self, remote_domid: int) -> UnboundPort:
        """``EVTCHNOP_alloc_unbound``: a port that ``remote_domid`` may bind to.

        The returned port already works as a channel for this end
        (``unbound.channel``): sends before the peer binds are kept pending
        on the peer's eventfd and seen by it once it binds.
        """
        with self._lock:
            port = self._alloc_port()
            local, peer_local = _new_eventfd(), _new_eventfd()
            unbound = UnboundPort(port, remote_domid, local, peer_local)
            unbound.channel = EventChannel(
                port, local, peer_local, remote_domid=remote_domid, remote_port=0, table=self
            )
            self._ports[port] = unbound.channel
            return unbound

    def bind_interdomain(self, remote_domid: int, remote_port: int,
                         fds: tuple[int, int]) -> EventChannel:
        """``EVTCHNOP_bind_interdomain``: bind to a peer's unbound port.

        ``fds`` are the two eventfds received from the peer (ours first); this
        table owns them afterwards. The new local port is left pending.
        """
        local_fd, remote_fd = fds
        with self._lock:
            port = self._alloc_port()
            channel = EventChannel(
                port, local_fd, remote_fd, remote_domid=remote_domid, remote_port=remote_port,
                table=self,
            )
            self._ports[port] = channel
        try:
            channel.set_pending()
        except BaseException:  # e.g. the peer blocked it (EventChannelBlockedError)
            self.close(port)
            raise
        return channel

    def status(self, port: int) -> EvtchnStatus:
        """``EVTCHNOP_status`` for one of our ports."""
        with self._lock:
            entry = self._ports.get(port)
        if entry is None:
            return EvtchnStatus.closed
        return EvtchnStatus.interdomain

    def close(self, port: int) -> None:
        """``EVTCHNOP_close``: free the port and its eventfds."""
        with self._lock:
            entry = self._ports.pop(port, None)
        if isinstance(entry, EventChannel):
            entry.close()

    def close_all(self) -> None:
        for port in list(self._ports):
            self.close(port)

    def _forget(self, channel: EventChannel) -> None:
        with self._lock:
            if self._ports.get(channel.port) is channel:
                del self._ports[channel.port]


class BusyPoll:
    """Adaptive busy-poll policy: spin ``window_us`` before sleeping, unless idle.

    After ``idle_windows`` consecutive windows that found nothing, spinning
    stops until the next wake-up that does find work, so an idle consumer
    sleeps in the kernel and uses no CPU. ``window_us=0`` disables spinning.
    """

    def __init__(self, window_us: float = 30.0, idle_windows: int = 64) -> None:
        self.window_ns = int(window_us * 1000)
        self.idle_windows = idle_windows
        self._misses = 0
        self.hits = 0
        self.misses = 0

    @property
    def active(self) -> bool:
        return self.window_ns > 0 and self._misses < self.idle_windows

    def spin(self, end) -> bool:
        """Spin on ``end`` (anything with ``spin(ns)``); True if work showed up."""
        if not self.active:
            return False
        if end.spin(self.window_ns):
            self._misses = 0
            self.hits += 1
            return True
        self._misses += 1
        self.misses += 1
        return False

    def woke_with_work(self) -> None:
        """An event-channel wake-up found work: the peer is active, spin again."""
        self._misses = 0


def wait_for_work_blocking(end, channel: EventChannel, poll: BusyPoll | None = None,
                           timeout: float | None = None) -> bool:
    """Block until ``end`` (a ring end or reader ByteRing) has something to consume.

    Order matters for no lost wake-up: spin (event not armed, so the producer
    sends nothing), then ``final_check`` arms the event index and re-checks,
    and only then sleep on the event channel. A ring end's wake-up with work
    kicks the peer first if ``channel.wake_ahead`` says so. Returns False on
    timeout. Wake-ups without work count toward the channel's spurious budget
    (:meth:`EventChannel.note_spurious`); ``end.progress``, if the end has
    one, moving in between starts the count again.
    """
    if poll is not None and poll.spin(end):
        channel.note_work()
        return True
    ring = getattr(end, "_sleep_args", None)
    if ring is not None:  # a ring end: check, sleep and check again in one C call
        ahead = channel.remote_fd if channel.wake_ahead else -1
        rc = channel._sleep(_ring_sleep, (*ring, channel.local_fd, channel._stale, ahead),
                            timeout)
        if rc == _SLEEP_WORK:
            channel.note_work()
            return True
        if not rc:
            return False
        channel.received += 1
        work = rc == _SLEEP_WOKE_WORK
    elif _final_check(end):
        channel.note_work()
        return True
    elif not channel.wait_blocking(timeout):
        return False
    else:
        work = _final_check(end)
    if work:
        channel.note_work()
        if poll is not None:
            poll.woke_with_work()  # only a wake that found work re-enables spinning
    else:
        pause = channel.note_spurious(getattr(end, "progress", None))
        if pause > 0:
            time.sleep(pause)
    return True


async def wait_for_work(end, channel: EventChannel, poll: BusyPoll | None = None) -> None:
    """Trio flavour of :func:`wait_for_work_blocking` (the spin blocks the loop
    for at most one window, so keep windows short in shared event loops)."""
    if (poll is not None and poll.spin(end)) or _final_check(end):
        channel.note_work()
        return
    await channel.wait()
    if _final_check(end):
        channel.note_work()
        if poll is not None:
            poll.woke_with_work()
    else:
        pause = channel.note_spurious(getattr(end, "progress", None))
        if pause > 0:
            await trio.sleep(pause)


def _final_check(end) -> int:
    check = getattr(end, "final_check", None)
    return check() if check is not None else end.pending()
