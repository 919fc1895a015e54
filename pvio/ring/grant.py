"""Grant tables (grant_table.h, v1 entries) between processes.

The *granter* (a frontend) owns a table of ``grant_entry_v1`` in shared memory
and a pool of pages. To grant, it writes ``domid`` and ``frame``, then a write
barrier, then ``flags`` (``GTF_permit_access``, plus ``GTF_readonly``). To
revoke, it CMPXCHGs ``flags`` to 0, which fails while the mapper holds
``GTF_reading``/``GTF_writing``: a page in use cannot be taken back.

The *mapper* (a backend) checks every ref it is given the way Xen does
(``_set_status_v1``): the ref is in range, the type is ``permit_access``, the
entry's domid is the mapper's own, and write access is allowed; the check and
the setting of ``GTF_reading``/``GTF_writing`` are one atomic CMPXCHG in C.
Failures return Xen's ``GNTST_*`` codes. The mapper only ever touches pool
frames named by a successfully pinned grant.
"""

from __future__ import annotations

import array
import os
import struct
import threading
from dataclasses import dataclass

from pvio import _cgen, layouts
from pvio.layouts import GNTST, GNTTAB_NR_RESERVED_ENTRIES, GTF
from pvio.ring._lib import ffi, lib
from pvio.ring.errors import GrantError, LocalProtocolError
from pvio.ring.shm import PAGE_SIZE, SharedMemory

ENTRY_SIZE = _cgen.sizeof(layouts.grant_entry_v1)
_ENTRY = _cgen.struct_format(layouts.grant_entry_v1)


@dataclass(frozen=True)
class GrantEntry:
    """A decoded ``grant_entry_v1``."""

    flags: GTF
    domid: int
    frame: int


class GrantTable:
    """The granter's side: a table of v1 entries in a sealed shared region.

    Refs below ``GNTTAB_NR_RESERVED_ENTRIES`` are never handed out by
    :meth:`grant_access` (Xen reserves them, e.g. ``GNTTAB_RESERVED_CONSOLE``);
    use :meth:`grant_access_ref` to fill one deliberately.
    """

    def __init__(self, shm: SharedMemory) -> None:
        self.shm = shm
        self.nr_entries = shm.size // ENTRY_SIZE
        self._lock = threading.Lock()
        self._free = list(range(self.nr_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))

    @classmethod
    def create(cls, nr_entries: int = 4096, name: str = "pvio-gnttab") -> GrantTable:
        pages = -(-nr_entries * ENTRY_SIZE // PAGE_SIZE)
        return cls(SharedMemory.create(pages * PAGE_SIZE, name=name))

    def entry(self, ref: int) -> GrantEntry:
        """Decode entry ``ref`` (a snapshot; the mapper may change flags any time)."""
        self._check_ref(ref)
        flags, domid, frame = struct.unpack_from(_ENTRY, self.shm.buf, ref * ENTRY_SIZE)
        return GrantEntry(GTF(flags), domid, frame)

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise LocalProtocolError(f"grant ref {ref} outside table of {self.nr_entries}")

    def grant_access_ref(self, ref: int, domid: int, frame: int, readonly: bool = False) -> None:
        """Fill entry ``ref``: domid, frame, wmb, flags (gnttab_grant_foreign_access_ref)."""
        self._check_ref(ref)
        lib.pvio_gnt_grant(self.shm.ptr, ref, domid, frame, int(readonly))

    def grant_access(self, domid: int, frame: int, readonly: bool = False) -> int:
        """Grant ``domid`` access to ``frame`` of our pool; returns the new ref."""
        with self._lock:
            if not self._free:
                raise GrantError(GNTST.no_space, what="grant table full")
            ref = self._free.pop()
        self.grant_access_ref(ref, domid, frame, readonly)
        return ref

    def end_access(self, ref: int) -> bool:
        """Revoke ``ref`` and recycle it. False (nothing changed) if it is still mapped.

        A caller that gets False must not reuse the page: quarantine it
        (:meth:`pvio.ring.shm.PagePool.quarantine`) or retry later (XSA-396).
        """
        self._check_ref(ref)
        if not lib.pvio_gnt_end_access(self.shm.ptr, ref):
            return False
        if ref >= GNTTAB_NR_RESERVED_ENTRIES:
            with self._lock:
                self._free.append(ref)
        return True

    def make_readonly(self, ref: int) -> bool:
        """Downgrade a writable grant; False while a writer holds it."""
        self._check_ref(ref)
        return bool(lib.pvio_gnt_make_readonly(self.shm.ptr, ref))

    def close(self) -> None:
        self.shm.close()


@dataclass
class CopyOp:
    """One ``GNTTABOP_copy`` element between a granted page and a local buffer.

    ``to_grant`` copies ``local`` into the granted page (needs a writable
    grant); otherwise the page's bytes are copied into ``local``.
    """

    ref: int
    offset: int
    local: bytearray | memoryview | bytes
    to_grant: bool = False
    status: int = GNTST.okay


class GrantMapping:
    """A contiguous mapping of granted pages (what Xen's multi-page map gives).

    The pages are mmap'd from the granter's pool with the protection the grant
    allows, so a read-only grant is read-only in hardware too. Use ``buf``
    only until :meth:`GrantMapper.unmap`; after that the address is gone.
    """

    def __init__(self, mapper: GrantMapper, refs: tuple[int, ...], writable: bool,
                 addr) -> None:
        self._mapper = mapper
        self.refs = refs
        self.writable = writable
        self._addr = addr
        self.buf = ffi.buffer(addr, len(refs) * PAGE_SIZE)

    @property
    def mapped(self) -> bool:
        return self._addr is not None

    def close(self) -> None:
        self._mapper.unmap(self)

    def __enter__(self) -> GrantMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GrantMapper:
    """The mapper's side: map and copy a granter's pages, Xen-checked.

    ``table`` and ``pool`` are the granter's shared regions (received from the
    peer and checked by :meth:`SharedMemory.from_fd`); ``domid`` is *our*
    domain id, which every entry we use must name.
    """

    def __init__(self, table: SharedMemory, pool: SharedMemory, domid: int) -> None:
        self.table = table
        self.pool = pool
        self.domid = domid
        self.nr_entries = table.size // ENTRY_SIZE
        self._rd = ffi.new("uint32_t[]", self.nr_entries)
        self._wr = ffi.new("uint32_t[]", self.nr_entries)
        self._mappings: set[GrantMapping] = set()

    def pin(self, ref: int, writable: bool) -> int:
        """Pin one grant (sets GTF_reading/writing); returns its frame or raises GrantError."""
        frame = ffi.new("uint32_t *")
        st = lib.pvio_gnt_pin(self.table.ptr, self.nr_entries, ref, self.domid, int(writable),
                              self.pool.pages, self._rd, self._wr, frame)
        if st != GNTST.okay:
            raise GrantError(st, ref)
        return frame[0]

    def unpin(self, ref: int, writable: bool) -> None:
        lib.pvio_gnt_unpin(self.table.ptr, ref, int(writable), self._rd, self._wr)

    @property
    def pin_counts(self) -> tuple[object, object]:
        """The per-ref read and write pin counts (``uint32_t[]``), for C fast
        paths that pin and unpin through ``pvio_gnt_pin``/``pvio_gnt_unpin``."""
        return self._rd, self._wr

    def map(self, refs, writable: bool = True) -> GrantMapping:
        """Map ``refs`` as one contiguous area (e.g. ``ring-ref0..N-1``).

        All or nothing: if any ref fails its check, the ones already pinned
        are released and :class:`GrantError` carries the failing ref's status.
        """
        refs = tuple(refs)
        if not refs:
            raise LocalProtocolError("map needs at least one grant ref")
        frames: list[int] = []
        try:
            for ref in refs:
                frames.append(self.pin(ref, writable))
        except GrantError:
            for ref in refs[: len(frames)]:
                self.unpin(ref, writable)
            raise
        frame_arr = ffi.new("uint32_t[]", frames)
        addr = lib.pvio_map_frames(self.pool.fileno(), frame_arr, len(frames), int(writable))
        if addr == ffi.NULL:
            err = ffi.errno
            for ref in refs:
                self.unpin(ref, writable)
            raise OSError(err, f"mmap of granted frames failed: {os.strerror(err)}")
        mapping = GrantMapping(self, refs, writable, addr)
        self._mappings.add(mapping)
        return mapping

    def unmap(self, mapping: GrantMapping) -> None:
        """Unmap and unpin (``GNTTABOP_unmap_grant_ref``); idempotent."""
        if mapping._addr is None:
            return
        lib.pvio_unmap(mapping._addr, len(mapping.refs))
        mapping._addr = None
        for ref in mapping.refs:
            self.unpin(ref, mapping.writable)
        self._mappings.discard(mapping)

    def copy(self, ops: list[CopyOp]) -> list[int]:
        """``GNTTABOP_copy`` batch: each op gets its own status (also set on the op).

        An op whose ``offset + len`` crosses the page gets ``GNTST_bad_copy_arg``;
        a bad ref or access gets Xen's code; the others still run.
        """
        cops = ffi.new("pvio_gnt_copy_op[]", len(ops))
        keep = []
        for cop, op in zip(cops, ops, strict=True):
            local = ffi.from_buffer("uint8_t[]", op.local, require_writable=not op.to_grant)
            keep.append(local)
            cop.ref, cop.len, cop.local = op.ref & 0xFFFFFFFF, len(local), local
            # An offset C cannot represent is as bad as one past the page.
            cop.offset = op.offset if 0 <= op.offset < PAGE_SIZE else PAGE_SIZE
            cop.to_grant = int(op.to_grant)
        lib.pvio_gnt_copy(self.table.ptr, self.nr_entries, self.domid, self.pool.ptr,
                          self.pool.pages, self._rd, self._wr, cops, len(ops))
        for cop, op in zip(cops, ops, strict=True):
            op.status = cop.status
        return [op.status for op in ops]

    def copy_vec(self, refs, offsets, lengths, local, local_offsets, *,
                 to_grant: bool) -> list[int]:
        """``GNTTABOP_copy`` of many fragments to or from one local buffer in one C
        call (the per-packet path of netback): fragment ``i`` is ``lengths[i]``
        bytes at ``offsets[i]`` of grant ``refs[i]`` and at ``local_offsets[i]`` of
        ``local``. Returns the GNTST code of each; the same checks as :meth:`copy`."""
        n = len(refs)
        if not n:
            return []
        arrays = [array.array("I", [x & 0xFFFFFFFF for x in refs]),
                  array.array("I", [x if 0 <= x < PAGE_SIZE else PAGE_SIZE for x in offsets]),
                  array.array("I", lengths), array.array("I", local_offsets)]
        if any(len(a) != n for a in arrays):
            raise LocalProtocolError("copy_vec needs one offset, length and local offset "
                                     "per ref")
        status = array.array("i", bytes(4 * n))
        buf = ffi.from_buffer("uint8_t[]", local, require_writable=not to_grant)
        c = [ffi.from_buffer("uint32_t[]", a) for a in arrays]
        lib.pvio_gnt_copy_vec(self.table.ptr, self.nr_entries, self.domid, self.pool.ptr,
                              self.pool.pages, self._rd, self._wr, c[0], c[1], c[2], buf,
                              len(buf), c[3], n, int(to_grant),
                              ffi.from_buffer("int32_t[]", status))
        return status.tolist()

    def copy_from(self, ref: int, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of granted page ``ref`` (raises GrantError)."""
        buf = bytearray(length)
        (status,) = self.copy([CopyOp(ref, offset, buf)])
        if status != GNTST.okay:
            raise GrantError(status, ref)
        return bytes(buf)

    def copy_to(self, ref: int, offset: int, data) -> None:
        """Write ``data`` at ``offset`` of granted page ``ref`` (raises GrantError)."""
        (status,) = self.copy([CopyOp(ref, offset, data, to_grant=True)])
        if status != GNTST.okay:
            raise GrantError(status, ref)

    def close(self) -> None:
        """Unmap everything still mapped, so the granter can revoke."""
        for mapping in list(self._mappings):
            self.unmap(mapping)
