"""blkif (io/blkif.h): request parsing and validation, sans-I/O.

The backend core takes a batch of requests *already copied* out of the ring
(``BackRing.take_requests``) and turns each into either a validated
:class:`BlkRequest` (byte offset, segments to pin) or an immediate error
response. Nothing here touches shared memory or files; the trio service in
:mod:`pvio.backends.blkback` does the I/O.

Validation follows Linux blkback (``dispatch_rw_block_io``,
``dispatch_discard_io``) and QEMU's ``xen_block_parse_request``
(hardening.md #3): known opcode; 1 <= nr_segments <= 11 (0 only for flush),
or <= ``feature-max-indirect-segments`` for indirect; ``first_sect <= last_sect
< sectors per page``; the end, in Python integers (no overflow), within the
disk; no writes to a read-only disk. Optional operations that are not
advertised get ``BLKIF_RSP_EOPNOTSUPP``; everything else invalid gets
``BLKIF_RSP_ERROR``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pvio import _cgen, layouts
from pvio.layouts import BLKIF_DISCARD_SECURE, XEN_PAGE_SIZE, BlkifOp, BlkifRsp

REQ_SIZE = _cgen.sizeof(layouts.blkif_request)
RSP_SIZE = _cgen.sizeof(layouts.blkif_response)
# Header views of the 112-byte request, each derived from its declaration.
_HDR = struct.Struct("<BBH4xQQ")  # operation, nr_segments, handle, id, sector_number
_DISCARD = struct.Struct(_cgen.struct_format(layouts.blkif_request_discard))
_INDIRECT = struct.Struct(_cgen.struct_format(layouts.blkif_request_indirect))
RSP = struct.Struct(_cgen.struct_format(layouts.blkif_response))
SEGMENT = struct.Struct(_cgen.struct_format(layouts.blkif_request_segment))

SEG_OFFSET = _cgen.offsetof(layouts.blkif_request, "seg")
assert _HDR.size == SEG_OFFSET == 24


@dataclass(frozen=True)
class BackendFeatures:
    """What a blkback advertises (and therefore honours)."""

    sectors: int  # in units of sector_size
    sector_size: int = 512
    readonly: bool = False
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    discard_secure: bool = False
    max_indirect_segments: int = 256

    @property
    def size(self) -> int:
        return self.sectors * self.sector_size

    @property
    def sectors_per_page(self) -> int:
        return XEN_PAGE_SIZE // self.sector_size


@dataclass(slots=True)
class Segment:
    gref: int
    first_sect: int
    last_sect: int


@dataclass(slots=True)
class BlkRequest:
    """A validated request, ready for I/O."""

    id: int
    op: int  # the opcode to echo in the response
    kind: int  # READ, WRITE, FLUSH_DISKCACHE, WRITE_BARRIER, DISCARD
    offset: int  # byte offset on the disk
    length: int  # bytes (discard: bytes to punch)
    segments: list[Segment] = field(default_factory=list)
    indirect_grefs: list[int] = field(default_factory=list)
    nr_indirect_segments: int = 0
    secure: bool = False


@dataclass(slots=True)
class BlkError:
    """A request answered at once with ``status`` (no I/O)."""

    id: int
    op: int
    status: int
    reason: str


def _segments(raw, feats: BackendFeatures) -> tuple[list[Segment], int] | str:
    """Segments from the packed ``blkif_request_segment`` array ``raw``."""
    segs, total = [], 0
    for i, (gref, first, last) in enumerate(SEGMENT.iter_unpack(raw)):
        if last < first or last >= feats.sectors_per_page:
            return f"segment {i}: first_sect {first}, last_sect {last}"
        segs.append(Segment(gref, first, last))
        total += (last - first + 1) * feats.sector_size
    return segs, total


def _range_ok(sector: int, length: int, feats: BackendFeatures) -> bool:
    return sector * feats.sector_size + length <= feats.size


def parse_request(raw: memoryview, feats: BackendFeatures) -> BlkRequest | BlkError:
    """Validate one request from its private copy (``REQ_SIZE`` bytes)."""
    op, nseg, _handle, rid, sector = _HDR.unpack_from(raw)
    if op in (BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE):
        if op == BlkifOp.WRITE_BARRIER and not feats.barrier:
            return BlkError(rid, op, BlkifRsp.EOPNOTSUPP, "barrier not advertised")
        if op == BlkifOp.FLUSH_DISKCACHE and not feats.flush:
            return BlkError(rid, op, BlkifRsp.EOPNOTSUPP, "flush not advertised")
        if op != BlkifOp.READ and feats.readonly:
            return BlkError(rid, op, BlkifRsp.ERROR, "write to a read-only disk")
        if nseg == 0 and op == BlkifOp.FLUSH_DISKCACHE:
            return BlkRequest(rid, op, BlkifOp.FLUSH_DISKCACHE, 0, 0)
        if not 1 <= nseg <= layouts.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return BlkError(rid, op, BlkifRsp.ERROR, f"{nseg} segments")
        parsed = _segments(raw[SEG_OFFSET : SEG_OFFSET + nseg * SEGMENT.size], feats)
        if isinstance(parsed, str):
            return BlkError(rid, op, BlkifRsp.ERROR, parsed)
        segs, total = parsed
        if not _range_ok(sector, total, feats):
            return BlkError(rid, op, BlkifRsp.ERROR, f"sector {sector}+{total} beyond the disk")
        kind = BlkifOp.READ if op == BlkifOp.READ else op
        return BlkRequest(rid, op, kind, sector * feats.sector_size, total, segs)
    if op == BlkifOp.DISCARD:
        if not feats.discard:
            return BlkError(rid, op, BlkifRsp.EOPNOTSUPP, "discard not advertised")
        if feats.readonly:
            return BlkError(rid, op, BlkifRsp.ERROR, "discard on a read-only disk")
        _op, flag, _h, rid, sector, nr_sectors = _DISCARD.unpack_from(raw)
        if nr_sectors == 0 or not _range_ok(sector, nr_sectors * feats.sector_size, feats):
            return BlkError(rid, op, BlkifRsp.ERROR, f"discard {sector}+{nr_sectors} invalid")
        secure = bool(flag & BLKIF_DISCARD_SECURE) and feats.discard_secure
        return BlkRequest(rid, op, BlkifOp.DISCARD, sector * feats.sector_size,
                          nr_sectors * feats.sector_size, secure=secure)
    if op == BlkifOp.INDIRECT:
        if not feats.max_indirect_segments:
            return BlkError(rid, op, BlkifRsp.EOPNOTSUPP, "indirect not advertised")
        _op, iop, nseg, rid, sector, _h, _p, *grefs, _p3 = _INDIRECT.unpack_from(raw)
        if iop not in (BlkifOp.READ, BlkifOp.WRITE):
            return BlkError(rid, op, BlkifRsp.ERROR, f"indirect_op {iop}")
        if iop == BlkifOp.WRITE and feats.readonly:
            return BlkError(rid, op, BlkifRsp.ERROR, "write to a read-only disk")
        cap = min(feats.max_indirect_segments,
                  layouts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
                  * layouts.BLKIF_SEGS_PER_INDIRECT_FRAME)
        if not 1 <= nseg <= cap:
            return BlkError(rid, op, BlkifRsp.ERROR, f"{nseg} indirect segments")
        pages = -(-nseg // layouts.BLKIF_SEGS_PER_INDIRECT_FRAME)
        return BlkRequest(rid, op, iop, sector * feats.sector_size, 0,
                          indirect_grefs=grefs[:pages], nr_indirect_segments=nseg)
    return BlkError(rid, op, BlkifRsp.ERROR, f"unknown operation {op}")


def finish_indirect(req: BlkRequest, seg_bytes: bytes, feats: BackendFeatures) -> BlkError | None:
    """Fill an indirect request's segments from its (privately copied) indirect pages."""
    need = req.nr_indirect_segments * SEGMENT.size
    if len(seg_bytes) < need:
        return BlkError(req.id, req.op, BlkifRsp.ERROR, "indirect pages too short")
    parsed = _segments(memoryview(seg_bytes)[:need], feats)
    if isinstance(parsed, str):
        return BlkError(req.id, req.op, BlkifRsp.ERROR, parsed)
    req.segments, req.length = parsed
    if not _range_ok(req.offset // feats.sector_size, req.length, feats):
        return BlkError(req.id, req.op, BlkifRsp.ERROR, "indirect request beyond the disk")
    return None


def pack_responses(results: list[tuple[int, int, int]], out: bytearray) -> memoryview:
    """Serialise (id, op, status) triples into ``out`` (zeroed padding, XSA-216)."""
    need = len(results) * RSP_SIZE
    if len(out) < need:
        out.extend(bytes(need - len(out)))
    view = memoryview(out)
    for i, (rid, op, status) in enumerate(results):
        RSP.pack_into(out, i * RSP_SIZE, rid, op, status)
    return view[:need]
