
/* blkback's fast path: validate, pin, move data and answer a run of READ and
 * WRITE requests (direct or INDIRECT, io/blkif.h) in one call, so a batch
 * costs Python one call instead of a few microseconds per segment.
 *
 * The rules are those of pvio.blkif.parse_request (the reference, which the
 * tests run side by side with this code): the request is read from its
 * private copy; 1 <= nr_segments <= 11 (INDIRECT: <= max_indirect); the
 * indirect pages are copied once before their segments are checked;
 * first_sect <= last_sect < sectors per page; the end, computed without
 * overflow, within the disk; no writes to a read-only disk; every grant
 * checked and pinned (GTF_reading/GTF_writing) for the duration of the I/O.
 * Anything else -- another operation, an invalid request, an I/O that would
 * block, fails or comes up short -- stops the run: the caller answers that
 * request on its reference path (which logs why) and calls again after it.
 * Requests are served in ring order, so nothing overtakes a barrier. */

#include <stddef.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <linux/magic.h>

#define BLK_OP_READ 0
#define BLK_OP_WRITE 1
#define BLK_OP_INDIRECT 6
#define BLK_MAX_SEGS 11
#define BLK_SEGS_PER_FRAME 512u
#define BLK_MAX_INDIRECT_PAGES 8u
#define BLK_FAST_SEGS 1024u  /* IOV_MAX: longer requests take the reference path */
/* The blkif.h limits, checked against the structs generated from pvio/layouts.py. */
#define BLK_ARRAY_LEN(T, f) (sizeof(((T *)0)->f) / sizeof(((T *)0)->f[0]))
_Static_assert(BLK_MAX_SEGS == BLK_ARRAY_LEN(struct pvio_blkif_request, seg),
               "BLKIF_MAX_SEGMENTS_PER_REQUEST");
_Static_assert(BLK_MAX_INDIRECT_PAGES
               == BLK_ARRAY_LEN(struct pvio_blkif_request_indirect, indirect_grefs),
               "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST");
_Static_assert(BLK_SEGS_PER_FRAME == PVIO_PAGE / sizeof(struct pvio_blkif_request_segment),
               "BLKIF_SEGS_PER_INDIRECT_FRAME");

struct blk_pinned {
    uint32_t n;
    uint32_t refs[BLK_FAST_SEGS];
};

static void blk_unpin_all(pvio_blk_ctx *c, struct blk_pinned *p, int writable)
{
    while (p->n)
        pvio_gnt_unpin(c->table, p->refs[--p->n], writable, c->rd_pins, c->wr_pins);
}

/* Copy the segment array of an INDIRECT request out of its indirect pages. */
static int blk_copy_indirect(pvio_blk_ctx *c, const struct pvio_blkif_request_indirect *r,
                             uint32_t nseg, struct pvio_blkif_request_segment *segs)
{
    uint32_t bytes = nseg * (uint32_t)sizeof(*segs), pages, i;
    uint8_t *dst = (uint8_t *)segs;
    pages = (nseg + BLK_SEGS_PER_FRAME - 1) / BLK_SEGS_PER_FRAME;
    for (i = 0; i < pages; i++) {
        uint32_t chunk = bytes > PVIO_PAGE ? PVIO_PAGE : bytes;
        if (gnt_copy_one(c->table, c->nr_grants, c->domid, c->pool, c->pool_frames,
                         c->rd_pins, c->wr_pins, r->indirect_grefs[i], 0, chunk, 0,
                         dst) != GNTST_okay)
            return -1;
        dst += chunk;
        bytes -= chunk;
    }
    return 0;
}

/* One request; 0 if served (answered OKAY), else the PVIO_BLK_* reason. */
static int blk_serve_one(pvio_blk_ctx *c, const uint8_t *raw)
{
    static __thread struct pvio_blkif_request_segment segs[BLK_FAST_SEGS];
    static __thread struct iovec iov[BLK_FAST_SEGS];
    static __thread struct blk_pinned pinned;
    const struct pvio_blkif_request *req = (const void *)raw;
    const struct pvio_blkif_request_segment *seg;
    uint32_t nseg, i, niov = 0, spp, ss = c->sector_size;
    uint64_t total = 0, start, end;
    int op = req->operation, writable, flags;
    ssize_t got;

    if (op == BLK_OP_READ || op == BLK_OP_WRITE) {
        nseg = req->nr_segments;
        if (nseg < 1 || nseg > BLK_MAX_SEGS)
            return PVIO_BLK_NOT_FAST;
        seg = req->seg;
    } else if (op == BLK_OP_INDIRECT) {
        const struct pvio_blkif_request_indirect *ind = (const void *)raw;
        uint32_t cap = BLK_SEGS_PER_FRAME * BLK_MAX_INDIRECT_PAGES;
        op = ind->indirect_op;
        nseg = ind->nr_segments;
        if (c->max_indirect < cap)
            cap = c->max_indirect;
        if ((op != BLK_OP_READ && op != BLK_OP_WRITE) || nseg < 1 || nseg > cap
            || nseg > BLK_FAST_SEGS)
            return PVIO_BLK_NOT_FAST;
        if (blk_copy_indirect(c, ind, nseg, segs) < 0)
            return PVIO_BLK_NOT_FAST;
        seg = segs;
    } else {
        return PVIO_BLK_NOT_FAST;
    }
    if (op == BLK_OP_WRITE && c->readonly)
        return PVIO_BLK_NOT_FAST;
    spp = PVIO_PAGE / ss;
    for (i = 0; i < nseg; i++) {
        if (seg[i].last_sect < seg[i].first_sect || seg[i].last_sect >= spp)
            return PVIO_BLK_NOT_FAST;
        total += (uint64_t)(seg[i].last_sect - seg[i].first_sect + 1) * ss;
    }
    if (__builtin_mul_overflow(req->sector_number, (uint64_t)ss, &start)
        || __builtin_add_overflow(start, total, &end) || end > c->disk_bytes)
        return PVIO_BLK_NOT_FAST;

    writable = op == BLK_OP_READ;  /* a read writes into the guest's page */
    pinned.n = 0;
    for (i = 0; i < nseg; i++) {
        uint32_t frame;
        uint8_t *base;
        size_t len = (size_t)(seg[i].last_sect - seg[i].first_sect + 1) * ss;
        if (pvio_gnt_pin(c->table, c->nr_grants, seg[i].gref, c->domid, writable,
                         c->pool_frames, c->rd_pins, c->wr_pins, &frame) != GNTST_okay) {
            blk_unpin_all(c, &pinned, writable);
            return PVIO_BLK_NOT_FAST;
        }
        pinned.refs[pinned.n++] = seg[i].gref;
        base = c->pool + (size_t)frame * PVIO_PAGE + (size_t)seg[i].first_sect * ss;
        if (niov && (uint8_t *)iov[niov - 1].iov_base + iov[niov - 1].iov_len == base) {
            iov[niov - 1].iov_len += len;  /* contiguous with the previous segment */
        } else {
            iov[niov].iov_base = base;
            iov[niov].iov_len = len;
            niov++;
        }
    }
    flags = op == BLK_OP_READ ? c->read_flags : c->write_flags;
    if (flags < 0) {  /* valid (grants included), but this file's I/O is not done inline */
        blk_unpin_all(c, &pinned, writable);
        return PVIO_BLK_WOULD_BLOCK;
    }
    if (op == BLK_OP_READ)
        got = preadv2(c->fd, iov, (int)niov, (off_t)start, flags);
    else
        got = pwritev2(c->fd, iov, (int)niov, (off_t)start, flags);
    blk_unpin_all(c, &pinned, writable);
    if (got < 0 && errno == EOPNOTSUPP) {  /* RWF_NOWAIT refused: never inline again */
        *(op == BLK_OP_READ ? &c->read_flags : &c->write_flags) = -1;
        return PVIO_BLK_WOULD_BLOCK;
    }
    if (got < 0 || (uint64_t)got != total)
        return PVIO_BLK_WOULD_BLOCK;  /* EAGAIN, short, or an error: the reference path */
    c->counters[op == BLK_OP_READ ? 0 : 2]++;
    c->counters[op == BLK_OP_READ ? 1 : 3] += total;
    return 0;
}

uint32_t pvio_blk_serve(pvio_blk_ctx *ctx, const uint8_t *reqs, uint32_t first, uint32_t n,
                        uint8_t *rsps, int *why)
{
    uint32_t i;
    *why = 0;
    for (i = first; i < n; i++) {
        const uint8_t *raw = reqs + (size_t)i * sizeof(struct pvio_blkif_request);
        struct pvio_blkif_response *rsp = (void *)(rsps + (size_t)i * sizeof(*rsp));
        int rc = blk_serve_one(ctx, raw);
        if (rc) {
            *why = rc;
            break;
        }
        memset(rsp, 0, sizeof(*rsp));  /* no stale bytes in the padding (XSA-216) */
        memcpy(&rsp->id, raw + offsetof(struct pvio_blkif_request, id), sizeof(rsp->id));
        rsp->operation = raw[offsetof(struct pvio_blkif_request, operation)];
        rsp->status = 0;  /* BLKIF_RSP_OKAY */
    }
    return i - first;
}

int pvio_fd_in_memory(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st) < 0)
        return 0;
    return st.f_type == TMPFS_MAGIC || st.f_type == RAMFS_MAGIC;
}
