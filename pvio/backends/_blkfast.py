"""blkback's C fast path (:file:`pvio/ring/cblk.c`), wrapped for one ring.

``pvio_blk_serve`` validates, pins, moves data and answers a run of READ and
WRITE requests (direct or INDIRECT) in one call, by the same rules as the
reference path (:func:`pvio.blkif.parse_request` and blkback's ``_execute``,
which the tests run side by side with it). It stops at the first request it
does not serve -- another operation, an invalid request, I/O that would wait
for a device or fails -- and says why; blkback answers that one on the
reference path (which logs the reason) and resumes.

I/O is done inline, in the event loop, only when it cannot wait for a device:
an image in memory (tmpfs, ramfs), or ``preadv2``/``pwritev2`` with
``RWF_NOWAIT``, which fail with EAGAIN rather than wait (the request then goes
to a worker thread). Where ``RWF_NOWAIT`` is refused for an operation (ext4
buffered writes, or tmpfs on kernels before 6.x), that operation always uses
the worker thread.
"""

from __future__ import annotations

import os

from pvio.blkif import BackendFeatures
from pvio.ring._lib import ffi, lib

NOT_FAST = lib.PVIO_BLK_NOT_FAST
WOULD_BLOCK = lib.PVIO_BLK_WOULD_BLOCK


class BlkFastPath:
    """The fast path's context for one ring of one device."""

    def __init__(self, mapper, fd: int, feats: BackendFeatures) -> None:
        rd, wr = mapper.pin_counts
        ctx = self._ctx = ffi.new("pvio_blk_ctx *")
        self._keep = (mapper, rd, wr)
        ctx.table, ctx.nr_grants, ctx.domid = mapper.table.ptr, mapper.nr_entries, mapper.domid
        ctx.pool, ctx.pool_frames = mapper.pool.ptr, mapper.pool.pages
        ctx.rd_pins, ctx.wr_pins = rd, wr
        ctx.fd, ctx.disk_bytes, ctx.sector_size = fd, feats.size, feats.sector_size
        ctx.readonly, ctx.max_indirect = int(feats.readonly), feats.max_indirect_segments
        ctx.read_flags = ctx.write_flags = 0 if lib.pvio_fd_in_memory(fd) else os.RWF_NOWAIT
        self._why = ffi.new("int *")

    def disable(self) -> None:
        """Send every read and write to the reference path from now on."""
        self._ctx.read_flags = self._ctx.write_flags = -1

    def serve(self, requests, first: int, n: int, responses) -> tuple[int, int]:
        """Serve ``requests[first:n]`` (private copies, cdata ``uint8_t *``) as far
        as possible, writing each response at its index of ``responses``.

        Returns (index of the first request not served, why: 0 when all were,
        else ``NOT_FAST`` or ``WOULD_BLOCK``).
        """
        done = first + lib.pvio_blk_serve(self._ctx, requests, first, n, responses, self._why)
        return done, self._why[0]

    def take_counters(self) -> dict[str, tuple[int, int]]:
        """(requests, bytes) served per operation since the last call."""
        c = self._ctx.counters
        out = {"read": (c[0], c[1]), "write": (c[2], c[3])}
        c[0:4] = [0, 0, 0, 0]
        return out
