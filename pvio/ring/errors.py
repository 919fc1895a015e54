"""Exception types of :mod:`pvio.ring`.

Following h11, errors are split by *whose* fault they are:
:class:`RemoteProtocolError` means the peer broke the protocol (a hostile or
buggy frontend/backend) and the device it came from must be stopped;
:class:`LocalProtocolError` means this process misused the API.
"""

from __future__ import annotations

from pvio.layouts import GNTST


class PvioError(Exception):
    """Base class of every pvio error."""


class LocalProtocolError(PvioError):
    """This process asked for something the protocol does not allow."""


class RemoteProtocolError(PvioError):
    """The peer violated the protocol; stop processing the offending device."""


class RingBrokenError(RemoteProtocolError):
    """A peer published an impossible ring index (io/ring.h ``*_PROD_OVERFLOW``).

    Once raised, the ring stays broken: every later take/read raises again,
    nothing more from that ring is processed.
    """

    def __init__(self, reason: str, index: int) -> None:
        super().__init__(f"{reason} (peer index {index:#010x})")
        self.reason = reason
        self.index = index


class EventChannelBlockedError(RemoteProtocolError):
    """A send on an event channel waited: the peer, who shares the eventfd,
    made it blocking and saturated its counter (see :func:`guard_sends`)."""


class GrantError(PvioError):
    """A grant operation failed with a ``GNTST_*`` status (grant_table.h)."""

    def __init__(self, status: int, ref: int | None = None, what: str = "") -> None:
        try:
            name = f"GNTST_{GNTST(status).name}"
        except ValueError:
            name = f"GNTST({status})"
        where = f" on grant ref {ref}" if ref is not None else ""
        super().__init__(f"{name}{where}{': ' + what if what else ''}")
        self.status = status
        self.ref = ref


class SharedMemoryError(RemoteProtocolError):
    """A peer handed over shared memory that is unsafe to map (size or seals)."""
