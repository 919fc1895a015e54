/* netif fast paths: see cnet.h. Everything read here is a private copy made
 * by the ring helpers, or the backend's own buffers; every field that came
 * from the peer is checked before it is used (the checks of pvio.netif, which
 * the tests run side by side with these). */

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define PVIO_NET_PAGE 4096u
#define PVIO_NET_MAX_TX_SIZE 0xFFFFu
#define PVIO_NET_MAX_RX_SLOTS 18u  /* a 64 KiB packet (16 pages) plus the GSO extra, +1 */

#define NTXF_CSUM_BLANK 1u
#define NTXF_DATA_VALIDATED 2u
#define NTXF_MORE_DATA 4u
#define NTXF_EXTRA_INFO 8u
#define NRXF_DATA_VALIDATED 1u
#define NRXF_CSUM_BLANK 2u
#define NRXF_MORE_DATA 4u
#define NRXF_EXTRA_INFO 8u
#define NEXTRA_GSO 1u
#define NEXTRA_MCAST_ADD 2u
#define NEXTRA_MCAST_DEL 3u
#define NEXTRA_HASH 4u
#define NEXTRA_FLAG_MORE 1u
#define NGSO_TCPV4 1u
#define NGSO_TCPV6 2u
#define NRSP_ERROR (-1)
#define NRSP_OKAY 0
#define NRSP_NULL 1

static inline uint16_t net_ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t net_ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void net_st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void net_st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* Slot layouts: struct pvio_netif_* are generated from pvio/layouts.py
 * (pvio/_cgen.py, prepended by _build.py), so every field offset and slot
 * size below comes from the construct declarations. The slots are byte
 * buffers with no alignment promise: fields go through net_ld / net_st.
 * NET_SIZE(T): the size of a slot of type T, the stride of an array of them;
 * NET_OFF(T, f): offset of field f (u.gso.size etc. for the extra-info union);
 * NET_FIELD(p, T, f): address of field f of the slot of type T at p. */
#define NET_SIZE(T) sizeof(struct pvio_netif_##T)
#define NET_OFF(T, f) offsetof(struct pvio_netif_##T, f)
#define NET_FIELD(p, T, f) ((p) + NET_OFF(T, f))
#define NET_SLOT(base, T, i) ((base) + NET_SIZE(T) * (i))

/* An extra-info slot takes the place of a TX request, or of an RX response. */
_Static_assert(NET_SIZE(extra_info) <= NET_SIZE(tx_request), "extra info in a TX request slot");
_Static_assert(NET_SIZE(extra_info) <= NET_SIZE(rx_response), "extra info in an RX response slot");

static inline void net_tx_rsp(uint8_t *rsp, uint32_t slot, uint16_t id, int16_t status)
{
    uint8_t *o = NET_SLOT(rsp, tx_response, slot);
    net_st16(NET_FIELD(o, tx_response, id), id);
    net_st16(NET_FIELD(o, tx_response, status), (uint16_t)status);
}

static inline int16_t net_tx_rsp_status(const uint8_t *rsp, uint32_t slot)
{
    return (int16_t)net_ld16(NET_FIELD(NET_SLOT(rsp, tx_response, slot), tx_response, status));
}

/* A refused packet: every response of its slots that is not NULL says ERROR. */
static inline void net_tx_rsp_errors(uint8_t *rsp, uint32_t first, uint32_t end)
{
    uint32_t k;
    for (k = first; k < end; k++)
        if (net_tx_rsp_status(rsp, k) != NRSP_NULL)
            net_st16(NET_FIELD(NET_SLOT(rsp, tx_response, k), tx_response, status),
                     (uint16_t)(int16_t)NRSP_ERROR);
}

#define NET_PROBLEM(code, a, b) do { if (!reason) { reason = (code); arg0 = (a); arg1 = (b); } } while (0)

int64_t pvio_net_tx_assemble(const uint8_t *slots, uint32_t n, uint32_t max_slots,
                             uint32_t gso_mask, uint32_t min_len, uint32_t *pinfo,
                             uint8_t *rsp, uint32_t *frags, uint32_t *summary)
{
    uint32_t i = 0, npk = 0, nfrags = 0, good = 0, bad = 0, offl = 0;
    uint64_t bytes = 0;
    while (i < n) {
        const uint8_t *s = NET_SLOT(slots, tx_request, i);
        uint32_t gref = net_ld32(NET_FIELD(s, tx_request, gref));
        uint32_t offset = net_ld16(NET_FIELD(s, tx_request, offset));
        uint32_t flags = net_ld16(NET_FIELD(s, tx_request, flags));
        uint32_t total = net_ld16(NET_FIELD(s, tx_request, size)), rest = 0;
        uint32_t reason = 0, arg0 = 0, arg1 = 0, gso_type = 0, gso_size = 0;
        uint32_t slot0 = i, frag0 = nfrags, nresp = 1, k;
        uint32_t *p = pinfo + PVIO_NET_TXP_N * npk;
        int more_extras = (flags & NTXF_EXTRA_INFO) != 0, more;
        net_tx_rsp(rsp, i, net_ld16(NET_FIELD(s, tx_request, id)), NRSP_OKAY);
        i++;
        while (more_extras) {
            const uint8_t *e;
            uint32_t etype, eflags, esize, etype_gso;
            if (i >= n)
                return PVIO_NET_TX_FATAL_EXTRA;
            e = NET_SLOT(slots, tx_request, i);
            etype = e[NET_OFF(extra_info, type)];
            eflags = e[NET_OFF(extra_info, flags)];
            esize = net_ld16(NET_FIELD(e, extra_info, u.gso.size));
            etype_gso = e[NET_OFF(extra_info, u.gso.type)];
            /* its response's id: the slot's bytes at a TX request's id (past the extra) */
            net_tx_rsp(rsp, i, net_ld16(NET_FIELD(e, tx_request, id)), NRSP_NULL);
            nresp++;
            i++;
            more_extras = (eflags & NEXTRA_FLAG_MORE) != 0;
            if (etype == NEXTRA_GSO) {
                if (etype_gso != NGSO_TCPV4 && etype_gso != NGSO_TCPV6)
                    NET_PROBLEM(PVIO_NET_TX_BAD_GSO_TYPE, etype_gso, 0);
                else if (!(gso_mask & (1u << etype_gso)))
                    NET_PROBLEM(PVIO_NET_TX_GSO_NOT_NEGOTIATED, etype_gso, 0);
                else if (esize == 0)
                    NET_PROBLEM(PVIO_NET_TX_GSO_SIZE0, 0, 0);
                else {
                    gso_type = etype_gso;
                    gso_size = esize;
                }
            } else if (etype == NEXTRA_MCAST_ADD || etype == NEXTRA_MCAST_DEL
                       || etype == NEXTRA_HASH) {
                /* multicast filters and hash hints: nothing we rely on */
            } else {
                NET_PROBLEM(PVIO_NET_TX_UNKNOWN_EXTRA, etype, 0);
            }
        }
        /* the first fragment; its size is fixed below */
        frags[3 * nfrags] = gref;
        frags[3 * nfrags + 1] = offset;
        frags[3 * nfrags + 2] = 0;
        nfrags++;
        more = (flags & NTXF_MORE_DATA) != 0;
        while (more) {
            const uint8_t *f;
            if (nresp >= max_slots)
                NET_PROBLEM(PVIO_NET_TX_TOO_MANY_SLOTS, max_slots, 0);
            if (i >= n)
                return PVIO_NET_TX_FATAL_MORE;
            f = NET_SLOT(slots, tx_request, i);
            net_tx_rsp(rsp, i, net_ld16(NET_FIELD(f, tx_request, id)), NRSP_OKAY);
            nresp++;
            /* frags has room for n entries: one per slot at most */
            frags[3 * nfrags] = net_ld32(NET_FIELD(f, tx_request, gref));
            frags[3 * nfrags + 1] = net_ld16(NET_FIELD(f, tx_request, offset));
            frags[3 * nfrags + 2] = net_ld16(NET_FIELD(f, tx_request, size));
            rest += net_ld16(NET_FIELD(f, tx_request, size));
            nfrags++;
            more = (net_ld16(NET_FIELD(f, tx_request, flags)) & NTXF_MORE_DATA) != 0;
            i++;
        }
        if (!reason) {
            if (rest > total) {
                NET_PROBLEM(PVIO_NET_TX_FIRST_TOO_SMALL, total, rest);
            } else {
                frags[3 * frag0 + 2] = total - rest;
                for (k = frag0; k < nfrags; k++) {
                    if (frags[3 * k + 1] + frags[3 * k + 2] > PVIO_NET_PAGE) {
                        NET_PROBLEM(PVIO_NET_TX_CROSSES_PAGE, frags[3 * k + 1], frags[3 * k + 2]);
                        break;
                    }
                }
                if (!reason && total > PVIO_NET_MAX_TX_SIZE)
                    NET_PROBLEM(PVIO_NET_TX_TOO_BIG, total, 0);
                else if (!reason && total < min_len)
                    NET_PROBLEM(PVIO_NET_TX_RUNT, total, 0);
            }
        }
        p[PVIO_NET_TXP_REASON] = reason;
        p[PVIO_NET_TXP_ARG0] = arg0;
        p[PVIO_NET_TXP_ARG1] = arg1;
        p[PVIO_NET_TXP_SIZE] = total;
        p[PVIO_NET_TXP_FLAGS] = flags & (NTXF_CSUM_BLANK | NTXF_DATA_VALIDATED);
        p[PVIO_NET_TXP_GSO_TYPE] = gso_type;
        p[PVIO_NET_TXP_GSO_SIZE] = gso_size;
        p[PVIO_NET_TXP_SLOT0] = slot0;
        p[PVIO_NET_TXP_NSLOTS] = i - slot0;
        if (reason) {
            net_tx_rsp_errors(rsp, slot0, i);
            nfrags = frag0;
            p[PVIO_NET_TXP_DATA_OFF] = 0;
            p[PVIO_NET_TXP_FRAG0] = frag0;
            p[PVIO_NET_TXP_NFRAGS] = 0;
            bad++;
        } else {
            uint32_t w = frag0;
            for (k = frag0; k < nfrags; k++) {  /* XSA-448: no zero-length fragment */
                if (frags[3 * k + 2]) {
                    if (w != k)
                        memcpy(frags + 3 * w, frags + 3 * k, 3 * sizeof(uint32_t));
                    w++;
                }
            }
            nfrags = w;
            p[PVIO_NET_TXP_DATA_OFF] = (uint32_t)bytes;
            p[PVIO_NET_TXP_FRAG0] = frag0;
            p[PVIO_NET_TXP_NFRAGS] = nfrags - frag0;
            bytes += total;
            good++;
            if (p[PVIO_NET_TXP_FLAGS] || gso_type)
                offl++;
        }
        npk++;
    }
    summary[PVIO_NET_TXS_GOOD] = good;
    summary[PVIO_NET_TXS_BAD] = bad;
    summary[PVIO_NET_TXS_OFFLOAD] = offl;
    summary[PVIO_NET_TXS_BYTES] = (uint32_t)bytes;
    summary[PVIO_NET_TXS_NFRAGS] = nfrags;
    return npk;
}

static int32_t net_copy1(const pvio_net_gnt *g, uint32_t ref, uint32_t off, uint32_t len,
                         uint8_t *local, uint64_t local_size, uint32_t local_off, int to_grant)
{
    int32_t st = 0;
    pvio_gnt_copy_vec(g->table, g->nr, g->domid, g->pool, g->nr_frames, g->rd_pins,
                      g->wr_pins, &ref, &off, &len, local, local_size, &local_off, 1,
                      to_grant, &st);
    return st;
}

int64_t pvio_net_tx_batch(const pvio_net_gnt *g, const uint8_t *slots, uint32_t n,
                          uint32_t max_slots, uint32_t gso_mask, uint32_t min_len,
                          uint32_t *pinfo,
                          uint8_t *rsp, uint32_t *frags, uint32_t *summary,
                          uint8_t *data, uint64_t data_cap, uint32_t *runs,
                          uint32_t *nruns)
{
    int64_t npk = pvio_net_tx_assemble(slots, n, max_slots, gso_mask, min_len, pinfo, rsp,
                                       frags, summary);
    uint32_t j, k, good = 0, r = 0;
    const uint8_t *prev = NULL, *cur;
    *nruns = 0;
    if (npk < 0)
        return npk;
    for (j = 0; j < (uint32_t)npk; j++) {
        uint32_t *p = pinfo + PVIO_NET_TXP_N * j;
        uint32_t pos;
        if (p[PVIO_NET_TXP_REASON])
            continue;
        pos = p[PVIO_NET_TXP_DATA_OFF];
        for (k = p[PVIO_NET_TXP_FRAG0]; k < p[PVIO_NET_TXP_FRAG0] + p[PVIO_NET_TXP_NFRAGS]; k++) {
            int32_t st = net_copy1(g, frags[3 * k], frags[3 * k + 1], frags[3 * k + 2], data,
                                   data_cap, pos, 0);
            if (st != 0) {
                p[PVIO_NET_TXP_REASON] = PVIO_NET_TX_GRANT;
                p[PVIO_NET_TXP_ARG0] = (uint32_t)st;
                p[PVIO_NET_TXP_ARG1] = frags[3 * k];
                net_tx_rsp_errors(rsp, p[PVIO_NET_TXP_SLOT0],
                                  p[PVIO_NET_TXP_SLOT0] + p[PVIO_NET_TXP_NSLOTS]);
                summary[PVIO_NET_TXS_GOOD]--;
                summary[PVIO_NET_TXS_BAD]++;
                summary[PVIO_NET_TXS_BYTES] -= p[PVIO_NET_TXP_SIZE];
                summary[PVIO_NET_TXS_NFRAGS] -= p[PVIO_NET_TXP_NFRAGS];
                if (p[PVIO_NET_TXP_FLAGS] || p[PVIO_NET_TXP_GSO_TYPE])
                    summary[PVIO_NET_TXS_OFFLOAD]--;
                break;
            }
            pos += frags[3 * k + 2];
        }
        if (p[PVIO_NET_TXP_REASON])
            continue;
        /* runs of equal destination + source MAC among the accepted packets
         * (a packet shorter than both MACs is a run of its own) */
        cur = data + p[PVIO_NET_TXP_DATA_OFF];
        if (good > 0 && (p[PVIO_NET_TXP_SIZE] < 12 || prev == NULL
                         || memcmp(prev, cur, 12) != 0))
            runs[r++] = good;
        prev = p[PVIO_NET_TXP_SIZE] < 12 ? NULL : cur;
        good++;
    }
    if (good)
        runs[r++] = good;
    *nruns = r;
    return npk;
}

uint32_t pvio_net_rx_slots(uint32_t len, uint32_t gso)
{
    return (len + PVIO_NET_PAGE - 1) / PVIO_NET_PAGE + (gso ? 1u : 0u);
}

int64_t pvio_net_rx_fill(const pvio_net_gnt *g, const uint8_t *reqs, uint32_t nreqs,
                         const uint8_t *data, uint64_t data_size, const uint32_t *lens,
                         const uint32_t *meta, uint32_t npkts, uint8_t *rsp,
                         int32_t *pkt_status, uint32_t *pkt_ref, uint64_t *ok_bytes)
{
    uint32_t p, need = 0, slot = 0;
    uint64_t pos = 0, ok = 0;
    for (p = 0; p < npkts; p++) {
        need += pvio_net_rx_slots(lens[p], meta ? meta[2 * p] >> 16 : 0);
        pos += lens[p];
    }
    if (need > nreqs || pos > data_size)
        return -1;
    pos = 0;
    for (p = 0; p < npkts; p++) {
        uint32_t len = lens[p], chunks = (len + PVIO_NET_PAGE - 1) / PVIO_NET_PAGE, c;
        uint32_t flags = meta ? meta[2 * p] & 0xFFFFu : 0, gso = meta ? meta[2 * p] >> 16 : 0;
        uint32_t first = slot;
        int32_t failed = 0;
        uint32_t failed_ref = 0;
        for (c = 0; c < chunks; c++) {
            const uint8_t *q = NET_SLOT(reqs, rx_request, slot);
            uint16_t id = net_ld16(NET_FIELD(q, rx_request, id));
            uint32_t gref = net_ld32(NET_FIELD(q, rx_request, gref));
            uint32_t size = len - c * PVIO_NET_PAGE;
            uint32_t f = c == 0 ? flags : 0;
            int32_t st;
            uint8_t *o = NET_SLOT(rsp, rx_response, slot);
            if (size > PVIO_NET_PAGE)
                size = PVIO_NET_PAGE;
            if (c < chunks - 1)
                f |= NRXF_MORE_DATA;
            if (c == 0 && gso)
                f |= NRXF_EXTRA_INFO;
            net_st16(NET_FIELD(o, rx_response, id), id);
            net_st16(NET_FIELD(o, rx_response, offset), 0);
            net_st16(NET_FIELD(o, rx_response, flags), (uint16_t)f);
            net_st16(NET_FIELD(o, rx_response, status), (uint16_t)size);
            st = net_copy1(g, gref, 0, size, (uint8_t *)data, data_size, (uint32_t)pos, 1);
            if (st != 0 && !failed) {
                failed = st;
                failed_ref = gref;
            }
            pos += size;
            slot++;
            if (c == 0 && gso) {
                uint8_t *x = NET_SLOT(rsp, rx_response, slot);
                x[NET_OFF(extra_info, type)] = NEXTRA_GSO;
                x[NET_OFF(extra_info, flags)] = 0;
                net_st16(NET_FIELD(x, extra_info, u.gso.size), (uint16_t)(meta[2 * p + 1]));
                x[NET_OFF(extra_info, u.gso.type)] = (uint8_t)gso;
                x[NET_OFF(extra_info, u.gso.pad)] = 0;
                net_st16(NET_FIELD(x, extra_info, u.gso.features), 0);
                slot++;
            }
        }
        pkt_status[p] = failed;
        pkt_ref[p] = failed_ref;
        if (failed) {  /* every fragment slot of the packet says ERROR */
            uint32_t s = first;
            for (c = 0; c < chunks; c++) {
                net_st16(NET_FIELD(NET_SLOT(rsp, rx_response, s), rx_response, status),
                         (uint16_t)(int16_t)NRSP_ERROR);
                s += (c == 0 && gso) ? 2 : 1;
            }
        } else {
            ok += len;
        }
    }
    *ok_bytes = ok;
    return slot;
}

/* ------------------------------------------------------------ netfront */

void pvio_netfront_tx_init(pvio_netfront_tx *t, uint32_t nr, uint16_t *free_ids,
                           uint8_t *in_flight, uint8_t *pages, const uint32_t *refs)
{
    uint32_t k;
    t->nr = nr;
    t->nfree = nr;
    t->free_ids = free_ids;
    t->in_flight = in_flight;
    t->pages = pages;
    t->refs = refs;
    for (k = 0; k < nr; k++) {  /* the first id handed out is 0 */
        free_ids[k] = (uint16_t)(nr - 1 - k);
        in_flight[k] = 0;
    }
}

static inline void net_tx_req(uint8_t *o, uint32_t gref, uint16_t off, uint16_t flags,
                              uint16_t id, uint16_t size)
{
    net_st32(NET_FIELD(o, tx_request, gref), gref);
    net_st16(NET_FIELD(o, tx_request, offset), off);
    net_st16(NET_FIELD(o, tx_request, flags), flags);
    net_st16(NET_FIELD(o, tx_request, id), id);
    net_st16(NET_FIELD(o, tx_request, size), size);
}

/* Queue one frame of len bytes on the TX ring: its chunks go in the pages of
 * the ids on top of the free stack (copied from src, or already read there
 * when src is NULL), the first request carries the whole length and flags f0,
 * MORE_DATA chains the rest, and a GSO extra (type gso, size gso_size) follows
 * the first. The caller has checked there are enough ids and slots. Returns
 * the slots written at req. */
static uint32_t tx_queue_frame(pvio_netfront_tx *t, uint8_t *req, const uint8_t *src,
                               uint32_t len, uint32_t f0, uint32_t gso, uint16_t gso_size)
{
    uint32_t c, used = 0, chunks = (len + PVIO_NET_PAGE - 1) / PVIO_NET_PAGE;
    for (c = 0; c < chunks; c++) {
        uint16_t id = t->free_ids[--t->nfree];
        uint32_t size = len - c * PVIO_NET_PAGE;
        uint32_t f = c == 0 ? f0 : 0;
        if (size > PVIO_NET_PAGE)
            size = PVIO_NET_PAGE;
        t->in_flight[id] = 1;
        if (src != NULL)
            memcpy(t->pages + (size_t)id * PVIO_NET_PAGE, src + (size_t)c * PVIO_NET_PAGE, size);
        if (c < chunks - 1)
            f |= NTXF_MORE_DATA;
        if (c == 0 && gso)
            f |= NTXF_EXTRA_INFO;
        net_tx_req(NET_SLOT(req, tx_request, used), t->refs[id], 0, (uint16_t)f, id,
                   (uint16_t)(c == 0 ? len : size));
        used++;
        if (c == 0 && gso) {
            uint8_t *x = NET_SLOT(req, tx_request, used);
            memset(x, 0, NET_SIZE(tx_request));
            x[NET_OFF(extra_info, type)] = NEXTRA_GSO;
            net_st16(NET_FIELD(x, extra_info, u.gso.size), gso_size);
            x[NET_OFF(extra_info, u.gso.type)] = (uint8_t)gso;
            used++;
        }
    }
    return used;
}

uint32_t pvio_netfront_tx_put(pvio_netfront_tx *t, const uint8_t *data, const uint32_t *lens,
                              const uint32_t *meta, uint32_t nframes, uint32_t free_slots,
                              uint8_t *req, uint32_t *nreq, uint64_t *bytes)
{
    uint32_t fr, slots_used = 0;
    uint64_t pos = 0, placed_bytes = 0;
    for (fr = 0; fr < nframes; fr++) {
        uint32_t len = lens[fr], chunks = (len + PVIO_NET_PAGE - 1) / PVIO_NET_PAGE;
        uint32_t csum = meta ? meta[2 * fr] & (NTXF_CSUM_BLANK | NTXF_DATA_VALIDATED) : 0;
        uint32_t gso = meta ? meta[2 * fr] >> 16 : 0;
        uint32_t slots = chunks + (gso ? 1 : 0);
        if (chunks > t->nfree || slots > free_slots - slots_used)
            break;
        slots_used += tx_queue_frame(t, NET_SLOT(req, tx_request, slots_used), data + pos, len,
                                     csum, gso, meta ? (uint16_t)meta[2 * fr + 1] : 0);
        pos += len;
        placed_bytes += len;
    }
    *nreq = slots_used;
    *bytes = placed_bytes;
    return fr;
}

/* The L4 header of a frame as pvio._l4.parse finds it, reading only the first
 * avail bytes: 1 found (*l4 its offset, *proto, *version), 0 not offloadable,
 * -1 the headers reach past avail (let the caller decide in Python). */
static int net_parse_l4(const uint8_t *f, uint32_t avail, uint32_t len, uint32_t *l4_out,
                        uint32_t *proto_out, uint32_t *version_out)
{
    uint32_t l3 = 14, ethertype, proto, l4, version, need;
#define NEED(n) do { if ((n) > avail) return -1; } while (0)
    if (len < 14 + 20)
        return 0;
    NEED(14);
    ethertype = (uint32_t)f[12] << 8 | f[13];
    if (ethertype == 0x8100) {
        NEED(18);
        ethertype = (uint32_t)f[16] << 8 | f[17];
        l3 += 4;
    }
    if (ethertype == 0x0800) {
        uint32_t ihl;
        NEED(l3 + 1);
        ihl = (f[l3] & 0xFu) * 4;
        if (f[l3] >> 4 != 4 || ihl < 20 || len < l3 + ihl)
            return 0;
        NEED(l3 + 10);
        if ((((uint32_t)f[l3 + 6] << 8) | f[l3 + 7]) & 0x3FFF)
            return 0;
        proto = f[l3 + 9];
        l4 = l3 + ihl;
        version = 4;
    } else if (ethertype == 0x86DD) {
        if (len < l3 + 40)
            return 0;
        NEED(l3 + 40);
        if (f[l3] >> 4 != 6)
            return 0;
        proto = f[l3 + 6];
        l4 = l3 + 40;
        version = 6;
        while ((proto == 0 || proto == 43 || proto == 60) && len >= l4 + 8) {
            NEED(l4 + 2);
            proto = f[l4];
            l4 += ((uint32_t)f[l4 + 1] + 1) * 8;
        }
    } else {
        return 0;
    }
    need = proto == 6 ? 20 : 8;
    if ((proto != 6 && proto != 17) || len < l4 + need)
        return 0;
    NEED(l4 + need);
#undef NEED
    *l4_out = l4;
    *proto_out = proto;
    *version_out = version;
    return 1;
}

#define VNET_HDR_LEN 10u
#define VNET_MAX_CHUNKS 17u  /* pages for the largest frame a TAP read may give */
#define VNET_TAIL (PVIO_VNET_READ_MAX - VNET_HDR_LEN - VNET_MAX_CHUNKS * PVIO_NET_PAGE)
_Static_assert(VNET_TAIL == 256, "PVIO_VNET_READ_MAX: header + 17 pages + a 256-byte tail");

/* The TX flags (| gso_type << 16) of a virtio-net-headed frame of len bytes
 * whose first avail bytes are f, as Tap.from_vnet maps it; -1: not for the
 * fast path. */
static int64_t vnet_tx_meta(const uint8_t *hdr, const uint8_t *f, uint32_t avail, uint32_t len,
                            int gso_ok)
{
    uint32_t flags = hdr[0], gso = hdr[1] & ~0x80u, gso_size = net_ld16(hdr + 4);
    uint32_t csum_start = net_ld16(hdr + 6), csum_offset = net_ld16(hdr + 8);
    uint32_t csum = flags & 1u, valid = (flags & 2u) || csum, l4 = 0, proto = 0, version = 0;
    int parsed = 0;
    if (len < 14 || len > PVIO_NET_MAX_TX_SIZE)
        return -1;
    if (csum || gso) {
        parsed = net_parse_l4(f, avail, len, &l4, &proto, &version);
        if (parsed < 0)
            return -1;
    }
    if (csum && (!parsed || l4 != csum_start || (proto == 6 ? 16u : 6u) != csum_offset))
        return -1;  /* a checksum Python finishes */
    if (gso == 0)
        return csum ? (NTXF_CSUM_BLANK | NTXF_DATA_VALIDATED) : valid ? NTXF_DATA_VALIDATED : 0;
    if (!gso_ok || gso_size == 0 || !parsed || proto != 6)
        return -1;
    if (gso == 1 && version == 4)
        return (int64_t)(NTXF_CSUM_BLANK | NTXF_DATA_VALIDATED | NGSO_TCPV4 << 16);
    if (gso == 4 && version == 6)
        return (int64_t)(NTXF_CSUM_BLANK | NTXF_DATA_VALIDATED | NGSO_TCPV6 << 16);
    return -1;
}

int64_t pvio_netfront_tx_from_vnet_fd(pvio_netfront_tx *t, int fd, uint32_t max_frames,
                                      uint32_t free_slots, int gso_ok, uint8_t *req,
                                      uint32_t *nreq, uint64_t *bytes, uint8_t *slow,
                                      uint32_t slow_cap, uint32_t *slow_len, uint32_t *why)
{
    uint32_t placed = 0, slots_used = 0;
    uint64_t placed_bytes = 0;
    uint8_t hdr[VNET_HDR_LEN], tail[VNET_TAIL];
    struct iovec iov[VNET_MAX_CHUNKS + 2];
    *slow_len = 0;
    for (;;) {
        uint32_t c, len, gso, f0;
        int64_t meta;
        ssize_t got;
        if (placed >= max_frames) {
            *why = PVIO_VNET_LIMIT;
            break;
        }
        if (t->nfree < VNET_MAX_CHUNKS || free_slots - slots_used < VNET_MAX_CHUNKS + 1) {
            *why = PVIO_VNET_FULL;
            break;
        }
        iov[0].iov_base = hdr;
        iov[0].iov_len = VNET_HDR_LEN;
        for (c = 0; c < VNET_MAX_CHUNKS; c++) {  /* the ids tx_put would take, in order */
            iov[c + 1].iov_base = t->pages + (size_t)t->free_ids[t->nfree - 1 - c] * PVIO_NET_PAGE;
            iov[c + 1].iov_len = PVIO_NET_PAGE;
        }
        iov[VNET_MAX_CHUNKS + 1].iov_base = tail;
        iov[VNET_MAX_CHUNKS + 1].iov_len = sizeof(tail);
        do
            got = readv(fd, iov, VNET_MAX_CHUNKS + 2);
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                *why = PVIO_VNET_EMPTY;
            } else {
                *why = PVIO_VNET_ERROR;
                *slow_len = (uint32_t)errno;
            }
            break;
        }
        len = got >= (ssize_t)VNET_HDR_LEN ? (uint32_t)got - VNET_HDR_LEN : 0;
        meta = (uint32_t)got < VNET_HDR_LEN ? -1 :
            vnet_tx_meta(hdr, iov[1].iov_base, len < PVIO_NET_PAGE ? len : PVIO_NET_PAGE, len,
                         gso_ok);
        if (meta < 0) {  /* hand the frame, as read, to the caller */
            uint32_t n = (uint32_t)got, at = 0, i;
            if (n > slow_cap)
                n = slow_cap;
            for (i = 0; i < VNET_MAX_CHUNKS + 2 && at < n; i++) {
                uint32_t k = (uint32_t)iov[i].iov_len;
                if (k > n - at)
                    k = n - at;
                memcpy(slow + at, iov[i].iov_base, k);
                at += k;
            }
            *slow_len = n;
            *why = PVIO_VNET_SLOW;
            break;
        }
        gso = (uint32_t)meta >> 16;
        f0 = (uint32_t)meta & (NTXF_CSUM_BLANK | NTXF_DATA_VALIDATED);
        slots_used += tx_queue_frame(t, NET_SLOT(req, tx_request, slots_used), NULL, len, f0, gso,
                                     net_ld16(hdr + 4));  /* read into the pages already */
        placed++;
        placed_bytes += len;
    }
    *nreq = slots_used;
    *bytes = placed_bytes;
    return placed;
}

int64_t pvio_netfront_tx_done(pvio_netfront_tx *t, const uint8_t *rsp, uint32_t n,
                              uint32_t *errors, uint32_t *bad_id)
{
    uint32_t k, freed = 0, errs = 0;
    for (k = 0; k < n; k++) {
        uint16_t id = net_ld16(NET_FIELD(NET_SLOT(rsp, tx_response, k), tx_response, id));
        int16_t status = net_tx_rsp_status(rsp, k);
        if (status == NRSP_NULL)
            continue;
        if (id >= t->nr || !t->in_flight[id]) {
            *errors = errs;
            *bad_id = id;
            return -1 - (int64_t)k;
        }
        t->in_flight[id] = 0;
        t->free_ids[t->nfree++] = id;
        freed++;
        if (status != NRSP_OKAY)
            errs++;
    }
    *errors = errs;
    return freed;
}

int64_t pvio_netfront_rx_parse(const uint8_t *raw, uint32_t n, uint32_t first_slot,
                               uint32_t nr_ents, int gso_ok, const uint8_t *pages,
                               uint8_t *data, uint64_t data_cap, uint32_t *pkts,
                               uint32_t *chunks, uint32_t *used, uint32_t *err)
{
    uint32_t i = 0, npk = 0, nch = 0;
    uint64_t dpos = 0;
    *used = 0;
    while (i < n) {
        uint32_t start = i, ch0 = nch, c;
        const uint8_t *r = NET_SLOT(raw, rx_response, i);
        uint32_t rid = net_ld16(NET_FIELD(r, rx_response, id));
        uint32_t offset = net_ld16(NET_FIELD(r, rx_response, offset));
        uint32_t flags = net_ld16(NET_FIELD(r, rx_response, flags));
        int32_t status = (int16_t)net_ld16(NET_FIELD(r, rx_response, status));
        int32_t error = 0;
        uint32_t oflags = 0, gso_type = 0, gso_size = 0, len = 0;
        int extra = (flags & NRXF_EXTRA_INFO) != 0, complete = 0;
        uint32_t *p;
        if (flags & NRXF_CSUM_BLANK)
            oflags |= 1;
        if (flags & (NRXF_DATA_VALIDATED | NRXF_CSUM_BLANK))
            oflags |= 2;
        for (;;) {
            uint32_t slot = first_slot + i;
            if (status < 0) {
                if (!error)
                    error = status;
                offset = 0;
                status = 0;
            } else if (offset + (uint32_t)status > PVIO_NET_PAGE) {
                err[0] = PVIO_NETFRONT_RX_LEAVES_PAGE;
                err[1] = slot;
                err[2] = offset;
                err[3] = (uint32_t)status;
                return -1;
            }
            if (nr_ents && rid != slot % nr_ents) {
                err[0] = PVIO_NETFRONT_RX_BAD_ID;
                err[1] = slot;
                err[2] = rid;
                err[3] = slot % nr_ents;
                return -1;
            }
            chunks[4 * nch] = slot;
            chunks[4 * nch + 1] = offset;
            chunks[4 * nch + 2] = (uint32_t)status;
            chunks[4 * nch + 3] = rid;
            nch++;
            len += (uint32_t)status;
            i++;
            while (extra) {
                const uint8_t *e;
                uint32_t etype, eflags, esize, egso;
                if (i >= n)
                    break;
                e = NET_SLOT(raw, rx_response, i);
                etype = e[NET_OFF(extra_info, type)];
                eflags = e[NET_OFF(extra_info, flags)];
                esize = net_ld16(NET_FIELD(e, extra_info, u.gso.size));
                egso = e[NET_OFF(extra_info, u.gso.type)];
                if (etype != NEXTRA_GSO || !gso_ok || (egso != NGSO_TCPV4 && egso != NGSO_TCPV6)
                        || esize == 0) {
                    err[0] = PVIO_NETFRONT_RX_BAD_EXTRA;
                    err[1] = first_slot + i;
                    err[2] = etype;
                    err[3] = egso;
                    err[4] = esize;
                    return -1;
                }
                gso_type = egso;
                gso_size = esize;
                extra = (eflags & NEXTRA_FLAG_MORE) != 0;
                i++;
            }
            if (extra)
                break;
            if (i - start > PVIO_NET_MAX_RX_SLOTS) {
                err[0] = PVIO_NETFRONT_RX_TOO_LONG;
                err[1] = first_slot + start;
                err[2] = PVIO_NET_MAX_RX_SLOTS;
                return -1;
            }
            if (!(flags & NRXF_MORE_DATA)) {
                complete = 1;
                break;
            }
            if (i >= n)
                break;
            r = NET_SLOT(raw, rx_response, i);
            rid = net_ld16(NET_FIELD(r, rx_response, id));
            offset = net_ld16(NET_FIELD(r, rx_response, offset));
            flags = net_ld16(NET_FIELD(r, rx_response, flags));
            status = (int16_t)net_ld16(NET_FIELD(r, rx_response, status));
        }
        if (!complete) {
            *used = start;
            return npk;
        }
        p = pkts + PVIO_NETFRONT_RXP_N * npk;
        p[PVIO_NETFRONT_RXP_DATA_OFF] = (uint32_t)dpos;
        p[PVIO_NETFRONT_RXP_FLAGS] = oflags;
        p[PVIO_NETFRONT_RXP_GSO_TYPE] = gso_type;
        p[PVIO_NETFRONT_RXP_GSO_SIZE] = gso_size;
        p[PVIO_NETFRONT_RXP_ERROR] = (uint32_t)error;
        p[PVIO_NETFRONT_RXP_SLOTS] = i - start;
        p[PVIO_NETFRONT_RXP_CHUNK0] = ch0;
        p[PVIO_NETFRONT_RXP_NCHUNKS] = nch - ch0;
        if (error) {
            p[PVIO_NETFRONT_RXP_LEN] = 0;
        } else {
            p[PVIO_NETFRONT_RXP_LEN] = len;
            if (pages != NULL && nr_ents) {
                if (dpos + len > data_cap) {  /* the caller's buffer is too small */
                    err[0] = 0;
                    return -1;
                }
                for (c = ch0; c < nch; c++) {
                    memcpy(data + dpos,
                           pages + (size_t)(chunks[4 * c] % nr_ents) * PVIO_NET_PAGE
                           + chunks[4 * c + 1], chunks[4 * c + 2]);
                    dpos += chunks[4 * c + 2];
                }
            }
        }
        npk++;
    }
    *used = i;
    return npk;
}

void pvio_netfront_rx_posts(uint32_t start, uint32_t n, uint32_t nr_ents,
                            const uint32_t *refs, uint8_t *out)
{
    uint32_t k;
    for (k = 0; k < n; k++) {
        uint32_t id = (start + k) % nr_ents;
        uint8_t *o = NET_SLOT(out, rx_request, k);
        net_st16(NET_FIELD(o, rx_request, id), (uint16_t)id);
        net_st16(NET_FIELD(o, rx_request, pad), 0);
        net_st32(NET_FIELD(o, rx_request, gref), refs[id]);
    }
}
