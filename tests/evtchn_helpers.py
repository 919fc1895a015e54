"""Stand-ins for event-channel sends, for the tests of their callers."""

from __future__ import annotations

from pvio.ring import EventChannelBlockedError


def blocked_send(*_args) -> None:
    """What :func:`pvio.ring.guard_sends` makes of a ``notify`` or
    ``set_pending`` whose peer made the eventfd blocking and saturated it
    between our poll and our write: the send raises after the guard's timeout.
    (The guard itself is tested with real eventfds in tests/ring/test_evtchn.py.)"""
    raise EventChannelBlockedError("a send to the peer's eventfd waited (test)")
