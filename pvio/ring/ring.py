"""Request/response rings: ``FrontRing`` and ``BackRing`` (io/ring.h).

Sans-I/O: a ring end is a plain object over a shared buffer. It moves batches
of slots between the shared ring and private memory with one C call each, and
returns decisions ("notify the peer", "n items ready"); it never touches an fd.
Event channels and waiting live in :mod:`pvio.ring.evtchn`.

Each ring.h macro has its counterpart here:

=====================================  =========================================
io/ring.h                              pvio
=====================================  =========================================
``SHARED_RING_INIT``                   :func:`shared_ring_init`
``XEN_FRONT_RING_INIT`` / ``_ATTACH``  :meth:`FrontRing.init` / ``attach``
``BACK_RING_INIT`` / ``_ATTACH``       :meth:`BackRing.attach`
``__CONST_RING_SIZE``                  :meth:`RingSpec.nr_ents`
``RING_FREE_REQUESTS`` / ``FULL``      :attr:`FrontRing.free_requests` / ``full``
``XEN_RING_NR_UNCONSUMED_*``           ``unconsumed_responses`` / ``_requests``
``RING_COPY_REQUEST`` (+ GET)          :meth:`BackRing.take_requests`
``RING_COPY_RESPONSE`` (+ GET)         :meth:`FrontRing.take_responses`
``RING_PUSH_*_AND_CHECK_NOTIFY``       ``push_requests`` / ``push_responses``
``RING_FINAL_CHECK_FOR_*``             ``final_check_for_*``
``RING_*_OVERFLOW``                    :func:`request_cons_overflow` etc.
=====================================  =========================================

Indices are 32-bit and free-running: all arithmetic is done in C on
``uint32_t``, so wraps through 2**32 behave exactly as in Xen.
"""

from __future__ import annotations

from dataclasses import dataclass

import construct

from pvio import _cgen, layouts
from pvio.layouts import SRING_HEADER_SIZE, XEN_PAGE_SIZE
from pvio.ring._lib import ffi, lib, pin_buffer
from pvio.ring.errors import LocalProtocolError, RingBrokenError

U32 = 0xFFFFFFFF
_U8 = ffi.typeof("uint8_t[]")
_from_buffer = ffi.from_buffer

_ERRORS = {
    lib.PVIO_RING_E_REQ_PROD_OVERFLOW: "request producer index overflows the ring "
    "(RING_REQUEST_PROD_OVERFLOW)",
    lib.PVIO_RING_E_RSP_PROD_OVERFLOW: "response producer index overflows the ring "
    "(RING_RESPONSE_PROD_OVERFLOW, or more responses than requests)",
    lib.PVIO_RING_E_CONS_OVERFLOW: "request producer index went backwards "
    "(RING_REQUEST_CONS_OVERFLOW)",
}


@dataclass(frozen=True)
class RingSpec:
    """A ring type: what ``DEFINE_RING_TYPES(name, req, rsp)`` declares."""

    name: str
    request: construct.Construct
    response: construct.Construct

    @property
    def req_size(self) -> int:
        return _cgen.sizeof(self.request)

    @property
    def rsp_size(self) -> int:
        return _cgen.sizeof(self.response)

    @property
    def slot_size(self) -> int:
        """``sizeof(union X_sring_entry)``: the larger of request and response,
        rounded up to the union's alignment (as a C compiler lays it out)."""
        align = max(_cgen.alignof(self.request), _cgen.alignof(self.response))
        return -(-max(self.req_size, self.rsp_size) // align) * align

    def nr_ents(self, pages: int = 1) -> int:
        """``__CONST_RING_SIZE`` for a ring of ``pages`` 4 KiB pages."""
        return lib.pvio_ring_nr_ents(pages * XEN_PAGE_SIZE, self.slot_size)


BLKIF = RingSpec("blkif", layouts.blkif_request, layouts.blkif_response)
NETIF_TX = RingSpec("netif_tx", layouts.netif_tx_request, layouts.netif_tx_response)
NETIF_RX = RingSpec("netif_rx", layouts.netif_rx_request, layouts.netif_rx_response)


def shared_ring_init(buf) -> None:
    """``SHARED_RING_INIT``: prods 0, events 1, private and pad bytes zeroed."""
    ptr, size, keep = pin_buffer(buf)
    if size < SRING_HEADER_SIZE:
        raise LocalProtocolError(f"{size} bytes cannot hold a shared ring header")
    lib.pvio_shared_ring_init(ptr)
    ffi.release(keep)


def need_notify(old: int, new: int, event: int) -> bool:
    """The ``RING_PUSH_*_AND_CHECK_NOTIFY`` predicate: is ``event`` in (old, new]?"""
    return bool(lib.pvio_need_notify(old & U32, new & U32, event & U32))


def request_cons_overflow(cons: int, rsp_prod_pvt: int, nr_ents: int) -> bool:
    """``RING_REQUEST_CONS_OVERFLOW``."""
    return bool(lib.pvio_request_cons_overflow(cons & U32, rsp_prod_pvt & U32, nr_ents))


def request_prod_overflow(prod: int, rsp_prod_pvt: int, nr_ents: int) -> bool:
    """``RING_REQUEST_PROD_OVERFLOW``: a frontend published an impossible index."""
    return bool(lib.pvio_request_prod_overflow(prod & U32, rsp_prod_pvt & U32, nr_ents))


def response_prod_overflow(prod: int, rsp_cons: int, nr_ents: int) -> bool:
    """``RING_RESPONSE_PROD_OVERFLOW``: a backend published an impossible index."""
    return bool(lib.pvio_response_prod_overflow(prod & U32, rsp_cons & U32, nr_ents))


class _RingEnd:
    """State shared by both ends: the C private struct and the staging buffer."""

    _in_size: int
    _out_size: int
    _BACK: int  # 0: the front end, 1: the back end (for the C sleep)

    def __init__(self, spec: RingSpec, buf, start: int) -> None:
        self.spec = spec
        self._buf, size, self._keep = pin_buffer(buf)
        if size < SRING_HEADER_SIZE + spec.slot_size:
            raise LocalProtocolError(f"{size} bytes cannot hold a {spec.name} ring")
        self._r = ffi.new("pvio_ring *")
        if lib.pvio_ring_attach(self._r, self._buf, size, spec.slot_size, start & U32):
            raise LocalProtocolError(f"cannot attach a {spec.name} ring to {size} bytes")
        # Private staging area: slots are copied here once (RING_COPY_*) and
        # only ever parsed from here.
        self._staging = bytearray(self._r.nr_ents * self._in_size)
        self._staging_ptr = ffi.from_buffer("uint8_t[]", self._staging)
        self._staging_view = memoryview(self._staging)
        # What pvio.ring.evtchn's waiters pass to the C sleep (pvio_ring_sleep).
        self._sleep_args = (self._r, self._BACK)
        self._nr_ents = self._r.nr_ents

    def release(self) -> None:
        """Drop this end's hold on the shared memory (so it can be unmapped);
        the ring end is unusable afterwards."""
        ffi.release(self._keep)

    @property
    def nr_ents(self) -> int:
        """``RING_SIZE``: slots in the ring (a power of two)."""
        return self._r.nr_ents

    @property
    def progress(self) -> int:
        """This end's free-running consumer index (``rsp_cons`` or ``req_cons``):
        it moves whenever the end takes items. :func:`wait_for_work` uses it to
        tell a kick that came just before its work from a flood of events."""
        return self._r.cons

    @property
    def broken(self) -> bool:
        """True once the peer published an impossible index; the ring is dead."""
        return self._r.error != 0

    @property
    def notifications(self) -> tuple[int, int]:
        """(sent, suppressed) decisions taken by the push operations."""
        return self._r.notify_sent, self._r.notify_suppressed

    @property
    def wake_ahead_stats(self) -> tuple[int, int]:
        """(sent, wasted) wake-ahead kicks (see :class:`EventChannel`): wasted
        ones the peer had taken before this end ran on (it shares our CPU)."""
        return self._r.wake_ahead_sent, self._r.wake_ahead_wasted

    def _raise_broken(self) -> None:
        raise RingBrokenError(
            f"{self.spec.name} ring: " + _ERRORS.get(self._r.error, "broken"), self._r.bad_prod
        )

    def _items(self, data) -> tuple[object, int]:
        ptr = _from_buffer(_U8, data)
        size = len(ptr)  # bytes, whatever the item format of a memoryview
        if size % self._out_size:
            # A pointer into a caller's memoryview must not outlive the call in
            # the traceback's frame (gh-77894, see pin_buffer).
            ffi.release(ptr)
            raise LocalProtocolError(
                f"{size} bytes is not a whole number of {self._out_size}-byte items"
            )
        return ptr, size // self._out_size

    def _take(self, fn, max_items: int | None) -> memoryview:
        limit = self._nr_ents
        if max_items is not None and max_items < limit:
            limit = max_items
        n = fn(self._r, self._staging_ptr, limit, self._in_size)
        if n < 0:
            self._raise_broken()
        return self._staging_view[: n * self._in_size]

    def __repr__(self) -> str:
        r = self._r
        state = " BROKEN" if r.error else ""
        return (
            f"<{type(self).__name__} {self.spec.name} nr_ents={r.nr_ents} "
            f"prod_pvt={r.prod_pvt:#x} cons={r.cons:#x}{state}>"
        )


class FrontRing(_RingEnd):
    """The frontend (requester) end of a ring: produces requests, consumes responses."""

    _BACK = 0

    def __init__(self, spec: RingSpec, buf, *, start: int = 0) -> None:
        self._in_size, self._out_size = spec.rsp_size, spec.req_size
        super().__init__(spec, buf, start)

    @classmethod
    def init(cls, spec: RingSpec, buf) -> FrontRing:
        """``XEN_FRONT_RING_INIT``: initialise the shared page and attach at 0."""
        shared_ring_init(buf)
        return cls(spec, buf)

    @classmethod
    def attach(cls, spec: RingSpec, buf, start: int) -> FrontRing:
        """``FRONT_RING_ATTACH``: both private indices start at ``start``."""
        return cls(spec, buf, start=start)

    @property
    def req_prod_pvt(self) -> int:
        return self._r.prod_pvt

    @property
    def rsp_cons(self) -> int:
        return self._r.cons

    @property
    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``."""
        return lib.pvio_front_free_requests(self._r)

    @property
    def full(self) -> bool:
        """``RING_FULL``."""
        return lib.pvio_front_free_requests(self._r) == 0

    @property
    def unconsumed_responses(self) -> int:
        """``XEN_RING_NR_UNCONSUMED_RESPONSES`` (a raw u32 difference, unchecked)."""
        return lib.pvio_front_unconsumed_responses(self._r)

    def put_requests(self, data) -> int:
        """Copy whole requests into free slots (not yet visible); returns how many fit."""
        ptr, n = self._items(data)
        return lib.pvio_front_put_requests(self._r, ptr, n, self._out_size)

    def push_requests(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish; True if the peer needs an event."""
        return bool(lib.pvio_front_push_requests(self._r))

    def produce(self, data) -> tuple[int, bool]:
        """Put and push in one go: returns (requests put, notify needed)."""
        n = self.put_requests(data)
        return n, (self.push_requests() if n else False)

    def take_responses(self, max_items: int | None = None) -> memoryview:
        """Copy available responses out of the ring (``RING_COPY_RESPONSE``).

        Returns a view of private memory holding ``k * rsp_size`` bytes, valid
        until the next call. Raises :class:`RingBrokenError` if the backend
        published an impossible ``rsp_prod``; the ring then stays broken.
        """
        return self._take(lib.pvio_front_take_responses, max_items)

    def final_check_for_responses(self) -> int:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: re-arm ``rsp_event``; >0 if work arrived."""
        return lib.pvio_front_final_check(self._r)

    def spin(self, ns: int) -> bool:
        """Busy-poll (GIL released) up to ``ns`` for ``rsp_prod`` to move."""
        return bool(lib.pvio_front_spin(self._r, ns))


class BackRing(_RingEnd):
    """The backend (responder) end of a ring: consumes requests, produces responses."""

    _BACK = 1

    def __init__(self, spec: RingSpec, buf, *, start: int = 0) -> None:
        self._in_size, self._out_size = spec.req_size, spec.rsp_size
        super().__init__(spec, buf, start)

    @classmethod
    def attach(cls, spec: RingSpec, buf, start: int = 0) -> BackRing:
        """``BACK_RING_ATTACH`` (``BACK_RING_INIT`` when ``start`` is 0)."""
        return cls(spec, buf, start=start)

    @property
    def rsp_prod_pvt(self) -> int:
        return self._r.prod_pvt

    @property
    def req_cons(self) -> int:
        return self._r.cons

    @property
    def unconsumed_requests(self) -> int:
        """``XEN_RING_NR_UNCONSUMED_REQUESTS`` (bounded by free response slots)."""
        return lib.pvio_back_unconsumed_requests(self._r)

    @property
    def pending_responses(self) -> int:
        """Requests consumed but not answered yet."""
        return (self._r.cons - self._r.prod_pvt) & U32

    def take_requests(self, max_items: int | None = None) -> memoryview:
        """Copy available requests out of the ring (``RING_COPY_REQUEST``).

        The returned view (``k * req_size`` bytes of private memory, valid until
        the next call) is the only copy anything may parse; the shared slots are
        never read again. Raises :class:`RingBrokenError` if the frontend
        published an impossible ``req_prod``; the ring then stays broken.
        """
        return self._take(lib.pvio_back_take_requests, max_items)

    def put_responses(self, data) -> int:
        """Copy whole responses into the ring (not yet visible); bounded by requests owed."""
        ptr, n = self._items(data)
        return lib.pvio_back_put_responses(self._r, ptr, n, self._out_size)

    def push_responses(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: publish; True if the peer needs an event."""
        return bool(lib.pvio_back_push_responses(self._r))

    def produce(self, data) -> tuple[int, bool]:
        """Put and push in one go: returns (responses put, notify needed)."""
        n = self.put_responses(data)
        return n, (self.push_responses() if n else False)

    def final_check_for_requests(self) -> int:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: re-arm ``req_event``; >0 if work arrived."""
        return lib.pvio_back_final_check(self._r)

    def spin(self, ns: int) -> bool:
        """Busy-poll (GIL released) up to ``ns`` for ``req_prod`` to move."""
        return bool(lib.pvio_back_spin(self._r, ns))


# The consumer side of each end under one name, for code (waiters, benchmarks)
# that works with either end.
FrontRing.final_check = FrontRing.final_check_for_responses
BackRing.final_check = BackRing.final_check_for_requests
