"""pvio.blkif: sans-I/O validation of blkif requests (hardening.md #3, #4).

Every request here is built by hand from the offsets in xen-protocol.md §2
(:mod:`tests.blk_helpers`), so a layout mistake in :mod:`pvio.blkif` would
show. Rules: unknown opcode -> ERROR; an optional operation that is not
advertised -> EOPNOTSUPP; writes/discards to a read-only disk -> ERROR;
1 <= nr_segments <= 11 (0 only for flush); first_sect <= last_sect < 8; the end
inside the disk, computed without 64-bit wrap-around; indirect requests need
indirect_op READ/WRITE and 1 <= nr_segments <= feature-max-indirect-segments.
Responses echo id and operation, and serialised responses have zeroed padding.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio import blkif
from pvio.blkif import BackendFeatures, BlkError, BlkRequest, finish_indirect, pack_responses
from pvio.layouts import BlkifOp, BlkifRsp
from tests.blk_helpers import (
    REQ_SIZE,
    RSP,
    RSP_SIZE,
    U64,
    discard_req,
    indirect_req,
    rw_req,
    seg_bytes,
)

SECTORS = 8192  # a 4 MiB disk
FEATS = BackendFeatures(sectors=SECTORS)
RO = BackendFeatures(sectors=SECTORS, readonly=True)
BARE = BackendFeatures(sectors=SECTORS, flush=False, barrier=False, discard=False,
                       max_indirect_segments=0)
RID = 0x1122334455667788
FULL = (7, 0, 7)  # one whole page: gref 7, sectors 0..7


def parse(raw: bytes, feats: BackendFeatures = FEATS):
    assert len(raw) == REQ_SIZE == blkif.REQ_SIZE
    return blkif.parse_request(memoryview(raw), feats)


def assert_error(result, status=BlkifRsp.ERROR, rid=RID, op=None):
    assert isinstance(result, BlkError), result
    assert result.status == status, result
    assert result.id == rid
    if op is not None:
        assert result.op == op


# ------------------------------------------------------------------ layouts


def test_sizes_match_the_headers():
    assert blkif.REQ_SIZE == 112 and blkif.RSP_SIZE == RSP_SIZE == 16
    assert blkif.SEG_OFFSET == 24 and blkif.SEGMENT.size == 8


def test_valid_read_and_write_parse_to_byte_ranges():
    segs = [(10, 0, 7), (11, 2, 5), (12, 7, 7)]
    for op in (BlkifOp.READ, BlkifOp.WRITE):
        req = parse(rw_req(op, RID, 100, segs))
        assert isinstance(req, BlkRequest)
        assert (req.id, req.op, req.kind) == (RID, op, op)
        assert req.offset == 100 * 512
        assert req.length == (8 + 4 + 1) * 512
        assert [(s.gref, s.first_sect, s.last_sect) for s in req.segments] == segs


# ------------------------------------------------------------------ opcodes


@pytest.mark.parametrize("op", [BlkifOp.RESERVED_1, 7, 8, 0x7F, 0x80, 0xFF])
def test_unknown_opcode_is_error(op):
    assert_error(parse(rw_req(op, RID, 0, [FULL])), op=op)


@pytest.mark.parametrize(("raw", "op"), [
    (rw_req(BlkifOp.WRITE_BARRIER, RID, 0, [FULL]), BlkifOp.WRITE_BARRIER),
    (rw_req(BlkifOp.FLUSH_DISKCACHE, RID, 0), BlkifOp.FLUSH_DISKCACHE),
    (rw_req(BlkifOp.FLUSH_DISKCACHE, RID, 0, [FULL]), BlkifOp.FLUSH_DISKCACHE),
    (discard_req(RID, 0, 8), BlkifOp.DISCARD),
    (indirect_req(BlkifOp.READ, RID, 0, 1, [5]), BlkifOp.INDIRECT),
    (indirect_req(BlkifOp.WRITE, RID, 0, 1, [5]), BlkifOp.INDIRECT),
])
def test_unadvertised_optional_operations_get_eopnotsupp(raw, op):
    assert_error(parse(raw, BARE), BlkifRsp.EOPNOTSUPP, op=op)
    # ...and are accepted once advertised
    assert isinstance(parse(raw, FEATS), BlkRequest)


def test_unadvertised_beats_read_only():
    """EOPNOTSUPP (not supported at all) wins over ERROR (read-only) for discard."""
    feats = BackendFeatures(sectors=SECTORS, readonly=True, discard=False)
    assert_error(parse(discard_req(RID, 0, 8), feats), BlkifRsp.EOPNOTSUPP)


# ------------------------------------------------------------------ read-only


@pytest.mark.parametrize("raw", [
    rw_req(BlkifOp.WRITE, RID, 0, [FULL]),
    rw_req(BlkifOp.WRITE_BARRIER, RID, 0, [FULL]),
    discard_req(RID, 0, 8),
    indirect_req(BlkifOp.WRITE, RID, 0, 1, [5]),
], ids=["write", "barrier", "discard", "indirect-write"])
def test_writes_to_a_read_only_disk_are_errors(raw):
    assert_error(parse(raw, RO))


def test_reads_of_a_read_only_disk_are_fine():
    assert isinstance(parse(rw_req(BlkifOp.READ, RID, 0, [FULL]), RO), BlkRequest)
    assert isinstance(parse(indirect_req(BlkifOp.READ, RID, 0, 3, [5]), RO), BlkRequest)


# ------------------------------------------------------------------ segment counts


@pytest.mark.parametrize("op", [BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER])
def test_zero_segments_is_an_error_except_for_flush(op):
    assert_error(parse(rw_req(op, RID, 0, [], nseg=0)), op=op)


def test_flush_without_data_is_fine():
    req = parse(rw_req(BlkifOp.FLUSH_DISKCACHE, RID, 0, [], nseg=0))
    assert isinstance(req, BlkRequest)
    assert (req.id, req.op, req.kind, req.length, req.segments) == (
        RID, BlkifOp.FLUSH_DISKCACHE, BlkifOp.FLUSH_DISKCACHE, 0, [])


def test_flush_with_a_huge_sector_and_no_data_is_fine():
    """With no segments the sector number is meaningless (Linux ignores it too)."""
    assert isinstance(parse(rw_req(BlkifOp.FLUSH_DISKCACHE, RID, U64, [], nseg=0)), BlkRequest)


@pytest.mark.parametrize("op", [BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER,
                                BlkifOp.FLUSH_DISKCACHE])
@pytest.mark.parametrize("nseg", [12, 13, 64, 255])
def test_more_than_eleven_segments_is_an_error(op, nseg):
    # The slot only has room for 11 segments: the count byte alone says 12+.
    assert_error(parse(rw_req(op, RID, 0, [FULL] * 11, nseg=nseg)), op=op)


def test_eleven_segments_is_the_maximum():
    req = parse(rw_req(BlkifOp.WRITE, RID, 0, [(i + 8, 0, 7) for i in range(11)]))
    assert isinstance(req, BlkRequest) and req.length == 11 * 4096


# ------------------------------------------------------------------ segment shapes


@pytest.mark.parametrize(("first", "last", "ok"), [
    (0, 0, True), (0, 7, True), (7, 7, True), (3, 5, True),
    (1, 0, False), (7, 6, False), (0, 8, False), (8, 8, False), (0, 255, False),
    (255, 255, False), (9, 3, False),
])
@pytest.mark.parametrize("position", [0, 10])
def test_segment_sector_bounds(first, last, ok, position):
    segs = [FULL] * 11
    segs[position] = (9, first, last)
    result = parse(rw_req(BlkifOp.READ, RID, 0, segs))
    if ok:
        assert isinstance(result, BlkRequest)
        assert result.length == 10 * 4096 + (last - first + 1) * 512
    else:
        assert_error(result)


def test_segment_bounds_follow_the_sector_size():
    """With 4 KiB sectors a page holds one sector: only first = last = 0 is valid."""
    feats = BackendFeatures(sectors=1024, sector_size=4096)
    assert isinstance(parse(rw_req(BlkifOp.READ, RID, 0, [(9, 0, 0)]), feats), BlkRequest)
    assert_error(parse(rw_req(BlkifOp.READ, RID, 0, [(9, 0, 1)]), feats))
    req = parse(rw_req(BlkifOp.READ, RID, 3, [(9, 0, 0)]), feats)
    assert (req.offset, req.length) == (3 * 4096, 4096)


# ------------------------------------------------------------------ disk bounds


@pytest.mark.parametrize(("sector", "segs", "ok"), [
    (SECTORS - 8, [FULL], True),                    # the last page
    (SECTORS - 1, [(9, 0, 0)], True),               # the last sector
    (SECTORS - 7, [FULL], False),                   # one sector past the end
    (SECTORS, [(9, 0, 0)], False),                  # starts at the end
    (SECTORS - 88, [FULL] * 11, True),
    (SECTORS - 87, [FULL] * 11, False),
    (1 << 55, [FULL], False),                       # sector * 512 == 2**64: wraps to 0 in C
    ((1 << 55) - 1, [FULL], False),                 # end wraps to 3584 in u64
    ((1 << 55) - 8, [FULL], False),                 # end == 2**64 exactly: wraps to 0
    ((1 << 64) - 8, [FULL], False),
    (U64, [(9, 0, 0)], False),
    (U64 - SECTORS, [FULL], False),
])
@pytest.mark.parametrize("op", [BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER,
                                BlkifOp.FLUSH_DISKCACHE])
def test_end_beyond_the_disk_is_an_error(sector, segs, ok, op):
    result = parse(rw_req(op, RID, sector, segs))
    if ok:
        assert isinstance(result, BlkRequest) and result.offset == sector * 512
    else:
        assert_error(result, op=op)


@pytest.mark.parametrize(("sector", "nr", "ok"), [
    (0, SECTORS, True),
    (SECTORS - 1, 1, True),
    (0, 0, False),
    (SECTORS, 1, False),
    (0, SECTORS + 1, False),
    (1, U64, False),                  # sector + nr wraps to 0 in u64
    (U64, 1, False),
    (1 << 55, 1 << 55, False),        # both * 512 wrap
    ((1 << 64) - SECTORS, SECTORS, False),
])
def test_discard_bounds(sector, nr, ok):
    result = parse(discard_req(RID, sector, nr))
    if ok:
        assert isinstance(result, BlkRequest)
        assert (result.kind, result.offset, result.length) == (
            BlkifOp.DISCARD, sector * 512, nr * 512)
    else:
        assert_error(result, op=BlkifOp.DISCARD)


def test_discard_secure_flag_needs_discard_secure():
    assert parse(discard_req(RID, 0, 8, flag=1)).secure is False
    feats = BackendFeatures(sectors=SECTORS, discard_secure=True)
    assert parse(discard_req(RID, 0, 8, flag=1), feats).secure is True
    assert parse(discard_req(RID, 0, 8, flag=0), feats).secure is False


# ------------------------------------------------------------------ indirect


@pytest.mark.parametrize("iop", [BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE,
                                 BlkifOp.RESERVED_1, BlkifOp.DISCARD, BlkifOp.INDIRECT, 200])
def test_indirect_op_must_be_read_or_write(iop):
    assert_error(parse(indirect_req(iop, RID, 0, 4, [5])), op=BlkifOp.INDIRECT)


@pytest.mark.parametrize(("nseg", "ok"), [(0, False), (1, True), (256, True), (257, False),
                                          (512, False), (0xFFFF, False)])
def test_indirect_segment_count_is_bounded_by_the_advertised_maximum(nseg, ok):
    result = parse(indirect_req(BlkifOp.READ, RID, 0, nseg, [5]))
    if ok:
        assert isinstance(result, BlkRequest)
        assert result.nr_indirect_segments == nseg
        assert result.indirect_grefs == [5]
    else:
        assert_error(result, op=BlkifOp.INDIRECT)


def test_indirect_pages_are_ceil_nseg_over_512():
    feats = BackendFeatures(sectors=1 << 30, max_indirect_segments=4096)
    grefs = [11, 12, 13, 14, 15, 16, 17, 18]
    for nseg, pages in [(1, 1), (512, 1), (513, 2), (1024, 2), (4096, 8)]:
        req = parse(indirect_req(BlkifOp.WRITE, RID, 0, nseg, grefs), feats)
        assert req.indirect_grefs == grefs[:pages], nseg


def test_indirect_segment_count_cannot_exceed_eight_pages():
    """A request can only describe 8 * 512 = 4096 segments (8 indirect pages);
    a count beyond that is invalid whatever the backend's maximum is."""
    feats = BackendFeatures(sectors=1 << 30, max_indirect_segments=8192)
    assert_error(parse(indirect_req(BlkifOp.READ, RID, 0, 4097, list(range(8))), feats))


def test_finish_indirect_fills_and_validates_segments():
    req = parse(indirect_req(BlkifOp.WRITE, RID, 16, 3, [5]))
    assert finish_indirect(req, seg_bytes([(20, 0, 7), (21, 0, 7), (22, 1, 1)]), FEATS) is None
    assert [(s.gref, s.first_sect, s.last_sect) for s in req.segments] == [
        (20, 0, 7), (21, 0, 7), (22, 1, 1)]
    assert (req.offset, req.length, req.kind, req.op) == (
        16 * 512, 2 * 4096 + 512, BlkifOp.WRITE, BlkifOp.INDIRECT)


def test_finish_indirect_uses_only_nr_segments_entries():
    req = parse(indirect_req(BlkifOp.READ, RID, 0, 2, [5]))
    garbage = seg_bytes([(20, 0, 7), (21, 0, 7)]) + b"\xff" * 4080
    assert finish_indirect(req, garbage, FEATS) is None
    assert len(req.segments) == 2


@pytest.mark.parametrize(("sector", "segs"), [
    (0, [(20, 0, 7), (21, 3, 2)]),          # last < first
    (0, [(20, 0, 8)]),                      # last >= 8
    (0, [(20, 0, 7)] * 255 + [(21, 9, 9)]),  # the very last one is bad
    (SECTORS - 8, [(20, 0, 7), (21, 0, 0)]),  # one sector past the end
    ((1 << 55) - 8, [(20, 0, 7)]),           # end == 2**64: no wrap
    (U64, [(20, 0, 0)]),
])
def test_finish_indirect_rejects_bad_segments_and_ranges(sector, segs):
    req = parse(indirect_req(BlkifOp.READ, RID, sector, len(segs), [5]))
    assert isinstance(req, BlkRequest), req
    assert_error(finish_indirect(req, seg_bytes(segs), FEATS), op=BlkifOp.INDIRECT)


# ------------------------------------------------------------------ properties


REQUEST_BYTES = st.binary(min_size=REQ_SIZE, max_size=REQ_SIZE)
FEATURES = st.builds(
    BackendFeatures, sectors=st.integers(1, 1 << 40), sector_size=st.sampled_from([512, 4096]),
    readonly=st.booleans(), flush=st.booleans(), barrier=st.booleans(),
    discard=st.booleans(), discard_secure=st.booleans(),
    max_indirect_segments=st.sampled_from([0, 1, 11, 32, 256, 4096]))


def _interesting_request():
    op = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 255])
    return st.tuples(op, st.integers(0, 255), st.integers(0, U64), st.integers(0, U64),
                     st.binary(min_size=88, max_size=88)).map(
        lambda t: bytes([t[0], t[1]]) + b"\0" * 6 + t[2].to_bytes(8, "little")
        + t[3].to_bytes(8, "little") + t[4])


def _indirect_request():
    return st.tuples(st.sampled_from([0, 1, 2, 3]), st.integers(0, 600),
                     st.one_of(st.integers(0, 1 << 20), st.integers(0, U64))).map(
        lambda t: indirect_req(t[0], RID, t[2], t[1], range(100, 108)))


@settings(max_examples=500, deadline=None)
@given(raw=st.one_of(REQUEST_BYTES, _interesting_request(), _indirect_request()),
       feats=FEATURES, data=st.data())
def test_any_request_bytes_give_a_result_that_echoes_id_and_operation(raw, feats, data):
    """Nothing raises; id (u64 @8) and operation (u8 @0) are echoed; a request
    that passes (for indirect: also ``finish_indirect`` over arbitrary segment
    bytes) stays inside the disk and inside the pages its segments name."""
    result = parse(raw, feats)
    rid = int.from_bytes(raw[8:16], "little")
    assert isinstance(result, BlkRequest | BlkError)
    assert result.id == rid
    assert result.op == raw[0]
    if isinstance(result, BlkRequest) and raw[0] == BlkifOp.INDIRECT:
        assert result.kind in (BlkifOp.READ, BlkifOp.WRITE)
        assert 1 <= result.nr_indirect_segments <= feats.max_indirect_segments
        nbytes = result.nr_indirect_segments * 8
        segs = data.draw(st.one_of(
            st.binary(min_size=nbytes, max_size=nbytes),
            st.lists(st.tuples(st.integers(0, 99), st.integers(0, 8), st.integers(0, 8)),
                     min_size=result.nr_indirect_segments,
                     max_size=result.nr_indirect_segments).map(seg_bytes)))
        result = finish_indirect(result, segs, feats) or result
        assert result.id == rid and result.op == raw[0]
    if isinstance(result, BlkError):
        assert result.status in (BlkifRsp.ERROR, BlkifRsp.EOPNOTSUPP)
        return
    assert 0 <= result.offset <= feats.size
    assert result.offset + result.length <= feats.size
    if raw[0] in (BlkifOp.WRITE, BlkifOp.WRITE_BARRIER, BlkifOp.DISCARD) or (
            raw[0] == BlkifOp.INDIRECT and raw[1] == BlkifOp.WRITE):
        assert not feats.readonly
    for seg in result.segments:
        assert 0 <= seg.first_sect <= seg.last_sect < feats.sectors_per_page


@settings(max_examples=200, deadline=None)
@given(results=st.lists(st.tuples(st.integers(0, U64), st.integers(0, 255),
                                  st.sampled_from([0, -1, -2, 1, -32768, 32767])),
                        max_size=64),
       slack=st.integers(-16 * 64, 16 * 64), fill=st.integers(1, 255))
def test_pack_responses_zeroes_padding(results, slack, fill):
    """XSA-216: whatever was in the output buffer before, the padding bytes
    (9 and 12..15 of each response) are zero and the fields round-trip."""
    out = bytearray([fill]) * max(0, len(results) * RSP_SIZE + slack)
    view = pack_responses(results, out)
    assert len(view) == len(results) * RSP_SIZE
    data = bytes(view)
    for i, (rid, op, status) in enumerate(results):
        rec = data[i * RSP_SIZE:(i + 1) * RSP_SIZE]
        assert RSP.unpack(rec) == (rid, op, status)
        assert rec[9] == 0 and rec[12:16] == b"\0\0\0\0", rec.hex()


def test_pack_responses_reuses_a_buffer_with_stale_bytes():
    out = bytearray()
    pack_responses([(U64, 0xFF, -1)] * 4, out)
    out[:] = b"\xee" * len(out)
    view = pack_responses([(1, 0, 0)], out)
    assert bytes(view) == (1).to_bytes(8, "little") + b"\0" * 8
