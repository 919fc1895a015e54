"""Byte-stream rings: the console interface (io/console.h) and flex rings (io/ring.h).

A byte ring is a power-of-two buffer with two free-running u32 indices in
shared memory. The writer owns ``prod`` and the reader owns ``cons``; each end
keeps its own index privately and only *publishes* it, so a peer scribbling on
our index cannot confuse us, and it re-reads the peer's index once per call and
checks it: a gap larger than the buffer ("prod - cons > sizeof(buf)", the
check of Linux hvc_xen and xenconsoled) breaks the ring for good.
"""

from __future__ import annotations

from pvio import _cgen, layouts
from pvio.ring._lib import ffi, lib, pin_buffer
from pvio.ring.errors import LocalProtocolError, RingBrokenError


class ByteRing:
    """One direction of a byte ring, seen from the writer or from the reader."""

    def __init__(self, data, data_offset: int, size: int, indices, prod_offset: int,
                 cons_offset: int, *, writer: bool, name: str = "byte ring") -> None:
        """``data[data_offset:data_offset+size]`` is the buffer; the u32 indices
        live at ``prod_offset``/``cons_offset`` of ``indices`` (the same page for
        the console, the index page for a flex ring)."""
        if size <= 0 or size & (size - 1):
            raise LocalProtocolError(f"byte ring size {size} is not a power of two")
        self.name, self.size, self.writer = name, size, writer
        dbase, dlen, dkeep = pin_buffer(data)
        ibase, ilen, ikeep = pin_buffer(indices)
        self._keep = (dkeep, ikeep)
        if data_offset < 0 or data_offset + size > dlen:
            raise LocalProtocolError(f"{name}: data area outside the shared buffer")
        for off in (prod_offset, cons_offset):
            if off < 0 or off + 4 > ilen or off % 4:
                raise LocalProtocolError(f"{name}: index offset {off} outside the shared area")
        self._b = ffi.new("pvio_bytering *")
        lib.pvio_bytering_attach(
            self._b,
            dbase + data_offset,
            size,
            ffi.cast("uint32_t *", ibase + prod_offset),
            ffi.cast("uint32_t *", ibase + cons_offset),
            int(writer),
        )

    @property
    def broken(self) -> bool:
        return self._b.error != 0

    @property
    def peer_index(self) -> int:
        """The peer's index as it is in shared memory now (a hint, e.g. to tell
        a wake-up that moved data from a spurious one; never trusted for access)."""
        return (self._b.cons if self.writer else self._b.prod)[0]

    @property
    def index(self) -> int:
        """Our own free-running index (prod for the writer, cons for the reader)."""
        return self._b.pvt

    @property
    def progress(self) -> int | None:
        """What :func:`~pvio.ring.wait_for_work` compares across wake-ups without
        work (see :attr:`pvio.ring.FrontRing.progress`): a reader's ``cons``,
        which moves only when it takes data the peer wrote. None for a writer,
        whose own ``prod`` moves without the peer doing anything."""
        return None if self.writer else self._b.pvt

    def _raise_broken(self) -> None:
        raise RingBrokenError(
            f"{self.name}: peer index is more than {self.size} bytes away from ours",
            self._b.bad_index,
        )

    def write(self, data) -> int:
        """Copy as much of ``data`` as fits and publish it; returns bytes written."""
        if not self.writer:
            raise LocalProtocolError(f"{self.name}: this end reads")
        n = lib.pvio_bytering_write(self._b, ffi.from_buffer("uint8_t[]", data), len(data))
        if n < 0:
            self._raise_broken()
        return n

    def readinto(self, buf) -> int:
        """Copy up to ``len(buf)`` waiting bytes into ``buf`` and publish cons."""
        if self.writer:
            raise LocalProtocolError(f"{self.name}: this end writes")
        with ffi.from_buffer("uint8_t[]", buf, require_writable=True) as view:
            n = lib.pvio_bytering_read(self._b, view, len(view))  # (gh-77894: released)
        if n < 0:
            self._raise_broken()
        return n

    def read(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` waiting bytes (all of them by default)."""
        buf = bytearray(self.size if max_bytes is None else min(max_bytes, self.size))
        return bytes(buf[: self.readinto(buf)])

    def pending(self) -> int:
        """Bytes in the ring now (prod - cons); raises if the gap is impossible."""
        n = lib.pvio_bytering_pending(self._b)
        if n < 0:
            self._b.error = lib.PVIO_RING_E_BYTES_GAP
            self._raise_broken()
        return n

    def free(self) -> int:
        """Space a writer could fill now."""
        return self.size - self.pending()

    def spin(self, ns: int) -> bool:
        """Reader: busy-poll (GIL released) up to ``ns`` for the writer to publish."""
        return bool(lib.pvio_bytering_spin(self._b, ns))


_CONS = layouts.xencons_interface


def console_rings(page, *, frontend: bool) -> tuple[ByteRing, ByteRing]:
    """The two directions of a ``xencons_interface`` page as (tx, rx) for one side.

    The guest (frontend) produces ``out`` and consumes ``in``; the backend the
    reverse (io/console.h, ``MASK_XENCONS_IDX``).
    """
    off = {f.name: f.offset for f in _cgen.fields(_CONS)}
    out_ring = ByteRing(page, off["out"], layouts.XENCONS_OUT_SIZE, page, off["out_prod"],
                        off["out_cons"], writer=frontend, name="console out")
    in_ring = ByteRing(page, off["in"], layouts.XENCONS_IN_SIZE, page, off["in_prod"],
                       off["in_cons"], writer=not frontend, name="console in")
    return (out_ring, in_ring) if frontend else (in_ring, out_ring)


def flex_rings(intf, data, order: int, *, frontend: bool) -> tuple[ByteRing, ByteRing]:
    """The two directions of a flex ring (``DEFINE_XEN_FLEX_RING_AND_INTF``) as (tx, rx).

    ``intf`` is the index page, ``data`` the ``2 * XEN_FLEX_RING_SIZE(order)``
    data area: ``in`` is its first half, ``out`` its second. As in pvcalls and
    9pfs, the frontend produces ``out`` and consumes ``in``.
    """
    size = layouts.flex_ring_size(order)
    if len(data) < 2 * size:
        raise LocalProtocolError(f"flex ring of order {order} needs {2 * size} data bytes")
    off = {f.name: f.offset for f in _cgen.fields(layouts.flex_ring_intf)}
    ring_in = ByteRing(data, 0, size, intf, off["in_prod"], off["in_cons"],
                       writer=not frontend, name="flex in")
    ring_out = ByteRing(data, size, size, intf, off["out_prod"], off["out_cons"],
                        writer=frontend, name="flex out")
    return (ring_out, ring_in) if frontend else (ring_in, ring_out)


def flex_queued(prod: int, cons: int, ring_size: int) -> int:
    """``name##_queued`` of ``DEFINE_XEN_FLEX_RING``: bytes queued, masked-equal = full."""
    return lib.pvio_flex_queued(prod & 0xFFFFFFFF, cons & 0xFFFFFFFF, ring_size)
