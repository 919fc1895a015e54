"""Shared memory: sealed memfd regions and the frontend's page pool.

A pvio frontend exposes only a dedicated shared pool (its "guest memory"),
never its heap. The pool is a memfd sealed with ``F_SEAL_SHRINK | F_SEAL_GROW
| F_SEAL_SEAL`` right after it is sized, so a peer holding the fd can neither
truncate it (which would SIGBUS the other side, see the memfd sealing commit
40e041a2c858) nor grow it. The receiving side checks the seals and the size
with ``F_GET_SEALS``/``fstat`` *before* it maps anything (hardening.md #20).

Pages are Xen pages (``XEN_PAGE_SIZE`` = 4096); a page's index in the pool is
its *frame* number, which is what grant entries carry.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading

from pvio.layouts import XEN_PAGE_SIZE
from pvio.ring._lib import ffi
from pvio.ring.errors import LocalProtocolError, SharedMemoryError

PAGE_SIZE = XEN_PAGE_SIZE
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedMemory:
    """A page-granular, sealed memfd mapping shared with a peer process.

    Create one with :meth:`create` (the owner, e.g. a frontend's pool) or adopt
    one received from a peer with :meth:`from_fd`, which refuses unsealed or
    short files.
    """

    def __init__(self, fd: int, size: int, *, name: str = "pvio") -> None:
        self._fd = fd
        self.size = size
        self.name = name
        self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._mmap)
        self.ptr = ffi.from_buffer("uint8_t[]", self._mmap)

    @classmethod
    def create(cls, size: int, name: str = "pvio") -> SharedMemory:
        """A new zero-filled region of ``size`` bytes (a multiple of 4096), sealed."""
        if size <= 0 or size % PAGE_SIZE:
            raise LocalProtocolError(f"shared memory size {size} is not a positive page multiple")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
            return cls(fd, size, name=name)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, min_size: int = PAGE_SIZE, name: str = "peer") -> SharedMemory:
        """Adopt a peer's memfd after checking seals and size; takes ownership of ``fd``.

        Raises :class:`SharedMemoryError` (and closes ``fd``) if the file is not
        sealed against shrink, grow and further sealing, is smaller than
        ``min_size`` or is not page-granular.
        """
        try:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                raise SharedMemoryError(f"{name}: fd {fd} is not a sealable memfd: {exc}") from exc
            if seals & REQUIRED_SEALS != REQUIRED_SEALS:
                raise SharedMemoryError(
                    f"{name}: memfd seals {seals:#x} lack SHRINK|GROW|SEAL ({REQUIRED_SEALS:#x})"
                )
            size = os.fstat(fd).st_size
            if size < min_size or size % PAGE_SIZE or size == 0:
                raise SharedMemoryError(
                    f"{name}: memfd is {size} bytes, need a page multiple >= {min_size}"
                )
            try:
                return cls(fd, size, name=name)
            except OSError as exc:  # read-only fd, F_SEAL_WRITE / F_SEAL_FUTURE_WRITE
                raise SharedMemoryError(f"{name}: cannot map memfd read-write: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def fileno(self) -> int:
        return self._fd

    def page(self, frame: int, count: int = 1) -> memoryview:
        """A view of ``count`` pages starting at ``frame`` (bounds-checked)."""
        if frame < 0 or count < 1 or frame + count > self.pages:
            raise LocalProtocolError(f"frames {frame}..{frame + count - 1} outside {self.pages}")
        return self.buf[frame * PAGE_SIZE : (frame + count) * PAGE_SIZE]

    def close(self) -> None:
        """Unmap and close. Views and rings over this memory must be gone first
        (otherwise :class:`LocalProtocolError`, and the mapping stays intact)."""
        if self._fd < 0:
            return
        ffi.release(self.ptr)
        self.buf.release()
        try:
            self._mmap.close()
        except BufferError as exc:
            self.buf = memoryview(self._mmap)
            self.ptr = ffi.from_buffer("uint8_t[]", self._mmap)
            raise LocalProtocolError(
                f"{self!r}: still in use by views or rings; release them before closing"
            ) from exc
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SharedMemory {self.name!r} fd={self._fd} pages={self.pages}>"


class PagePool:
    """Page allocator over a :class:`SharedMemory`: the frontend's guest memory.

    Allocations are runs of contiguous frames (first fit). Pages are zeroed on
    allocation, so nothing stale is ever granted (XSA-403). Pages whose grant
    could not be revoked are *quarantined*: never handed out again (XSA-396).
    Thread-safe, so a blocking facade and a trio loop may share one pool.
    """

    def __init__(self, shm: SharedMemory, first_frame: int = 0) -> None:
        self.shm = shm
        self.first_frame = first_frame
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(first_frame, shm.pages - first_frame)]
        self.quarantined = 0

    @property
    def free_pages(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def alloc(self, count: int = 1) -> int:
        """Allocate ``count`` contiguous zeroed pages; returns the first frame."""
        if count < 1:
            raise LocalProtocolError("allocate at least one page")
        with self._lock:
            for i, (start, n) in enumerate(self._free):
                if n >= count:
                    if n == count:
                        del self._free[i]
                    else:
                        self._free[i] = (start + count, n - count)
                    break
            else:
                raise MemoryError(f"page pool exhausted: no run of {count} free pages")
        view = self.shm.page(start, count)
        view[:] = bytes(len(view))
        return start

    def _check_range(self, frame: int, count: int) -> None:
        """Refuse ranges outside the pool or overlapping free pages (double free)."""
        if count < 1 or frame < self.first_frame or frame + count > self.shm.pages:
            raise LocalProtocolError(f"frames {frame}+{count} are not pool pages")
        for start, n in self._free:
            if frame < start + n and start < frame + count:
                raise LocalProtocolError(f"frames {frame}+{count} are already free")

    def free(self, frame: int, count: int = 1) -> None:
        """Return pages to the pool (their grants must have been revoked)."""
        with self._lock:
            self._check_range(frame, count)
            self._free.append((frame, count))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for start, n in self._free:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((start, n))
            self._free = merged

    def revoke_and_free(self, frame: int, count: int, gnttab, refs) -> bool:
        """End every grant in ``refs`` (``gnttab``'s grants of these pages),
        then free the pages; if any grant cannot be ended (the peer still maps
        the page), quarantine them instead (XSA-396). True if freed."""
        if all([gnttab.end_access(r) for r in refs]):  # every ref, even after a failure
            self.free(frame, count)
            return True
        self.quarantine(frame, count)
        return False

    def quarantine(self, frame: int, count: int = 1) -> None:
        """Retire pages a peer still has mapped: they are never reused."""
        with self._lock:
            self._check_range(frame, count)
            self.quarantined += count
