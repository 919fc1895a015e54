/* netif fast paths (io/netif.h): whole batches of TX/RX slots per C call, for
 * pvio.backends.netback and pvio.frontends.netfront. This text is both cffi's
 * cdef and part of the compiled source: plain declarations only.
 *
 * Every slot handed in is a private copy (RING_COPY_REQUEST/RESPONSE): nothing
 * here reads a shared ring. The Python references these are tested against:
 * pvio.netif.assemble (TX), pvio.netif.rx_responses (RX fill),
 * pvio.netif.parse_rx_responses (netfront RX). */

/* Why a TX packet was refused (pvio_net_tx_assemble's per-packet reason). */
enum {
    PVIO_NET_TX_OK = 0,
    PVIO_NET_TX_BAD_GSO_TYPE = 1,       /* arg0: type */
    PVIO_NET_TX_GSO_NOT_NEGOTIATED = 2, /* arg0: type */
    PVIO_NET_TX_GSO_SIZE0 = 3,
    PVIO_NET_TX_UNKNOWN_EXTRA = 4,      /* arg0: type */
    PVIO_NET_TX_TOO_MANY_SLOTS = 5,     /* arg0: max_slots */
    PVIO_NET_TX_FIRST_TOO_SMALL = 6,    /* arg0: total, arg1: rest */
    PVIO_NET_TX_CROSSES_PAGE = 7,       /* arg0: offset, arg1: size */
    PVIO_NET_TX_TOO_BIG = 8,            /* arg0: total */
    PVIO_NET_TX_RUNT = 9,               /* arg0: total */
    PVIO_NET_TX_GRANT = 10,             /* arg0: GNTST status (signed), arg1: ref */
    PVIO_NET_TX_FATAL_EXTRA = -1,       /* an extra-info chain runs past the batch */
    PVIO_NET_TX_FATAL_MORE = -2         /* a more_data chain runs past the batch */
};

/* u32 fields of one packet in pvio_net_tx_assemble's pinfo (PVIO_NET_TXP_N each). */
enum {
    PVIO_NET_TXP_REASON = 0, PVIO_NET_TXP_ARG0 = 1, PVIO_NET_TXP_ARG1 = 2,
    PVIO_NET_TXP_SIZE = 3, PVIO_NET_TXP_DATA_OFF = 4, PVIO_NET_TXP_FLAGS = 5,
    PVIO_NET_TXP_GSO_TYPE = 6, PVIO_NET_TXP_GSO_SIZE = 7, PVIO_NET_TXP_FRAG0 = 8,
    PVIO_NET_TXP_NFRAGS = 9, PVIO_NET_TXP_SLOT0 = 10, PVIO_NET_TXP_NSLOTS = 11,
    PVIO_NET_TXP_N = 12
};

/* u32 fields of pvio_net_tx_assemble's summary. */
enum {
    PVIO_NET_TXS_GOOD = 0,     /* packets accepted */
    PVIO_NET_TXS_BAD = 1,      /* packets refused */
    PVIO_NET_TXS_OFFLOAD = 2,  /* accepted packets with csum flags or GSO */
    PVIO_NET_TXS_BYTES = 3,    /* bytes of accepted packets (their data, back to back) */
    PVIO_NET_TXS_NFRAGS = 4,   /* fragments of accepted packets */
    PVIO_NET_TXS_N = 5
};

/* One domain's grant table as the mapper sees it (pvio.ring.GrantMapper). */
typedef struct {
    uint8_t *table;
    uint32_t nr;
    uint16_t domid;
    uint8_t *pool;
    uint32_t nr_frames;
    uint32_t *rd_pins;
    uint32_t *wr_pins;
} pvio_net_gnt;

/* Assemble and validate a batch of n TX request slots (a struct
 * pvio_netif_tx_request each; an extra info takes a whole slot) into packets,
 * as pvio.netif.assemble does (Linux xenvif_count_requests / get_extras /
 * tx_build_gops, XSA-423/432/448). pinfo gets PVIO_NET_TXP_N u32 per packet
 * (at most n packets); rsp gets one struct pvio_netif_tx_response per slot,
 * in slot order (NULL for extras, ERROR for every slot of a refused
 * packet); frags gets (ref, offset, len) per non-empty fragment of accepted
 * packets. Accepted packets get consecutive data_off (their sizes back to
 * back). gso_mask: bit t set = GSO type t negotiated; min_len: the shortest
 * packet accepted (an Ethernet header, 14). Returns the number of
 * packets, or PVIO_NET_TX_FATAL_* if a chain is cut off. */
int64_t pvio_net_tx_assemble(const uint8_t *slots, uint32_t n, uint32_t max_slots,
                             uint32_t gso_mask, uint32_t min_len, uint32_t *pinfo,
                             uint8_t *rsp, uint32_t *frags, uint32_t *summary);

/* pvio_net_tx_assemble, then GNTTABOP_copy of every accepted packet's
 * fragments into data (data_cap bytes) at its data_off. A packet with a
 * failed copy becomes PVIO_NET_TX_GRANT (its slots answered ERROR, the
 * summary updated). runs gets, per run of consecutive accepted packets whose
 * first 12 bytes (destination and source MAC) are equal, the index (among
 * accepted packets) one past its end; *nruns their number. */
int64_t pvio_net_tx_batch(const pvio_net_gnt *g, const uint8_t *slots, uint32_t n,
                          uint32_t max_slots, uint32_t gso_mask, uint32_t min_len,
                          uint32_t *pinfo,
                          uint8_t *rsp, uint32_t *frags, uint32_t *summary,
                          uint8_t *data, uint64_t data_cap, uint32_t *runs,
                          uint32_t *nruns);

/* RX fill (backend): npkts frames (lens[i] bytes each, back to back in data)
 * into the nreqs RX requests (a struct pvio_netif_rx_request each) the
 * frontend posted, in order: one response per request in the request's slot,
 * a page per fragment, a GSO extra after the first fragment of a GSO frame.
 * meta: NULL, or 2 u32 per frame: NETRXF_* flags of the first response |
 * gso_type << 16, gso_size. rsp gets a struct pvio_netif_rx_response (or the
 * extra info) per slot used. A frame whose copy failed has every fragment
 * answered ERROR: pkt_status[i] gets its GNTST (0 when fine) and pkt_ref[i]
 * the ref that failed. *ok_bytes: bytes of the frames delivered. Returns the
 * slots used, or -1 if the requests do not cover the frames (nothing written
 * to the frontend then). */
int64_t pvio_net_rx_fill(const pvio_net_gnt *g, const uint8_t *reqs, uint32_t nreqs,
                         const uint8_t *data, uint64_t data_size, const uint32_t *lens,
                         const uint32_t *meta, uint32_t npkts, uint8_t *rsp,
                         int32_t *pkt_status, uint32_t *pkt_ref, uint64_t *ok_bytes);

/* Slots a frame of len bytes needs (a GSO frame one more, for its extra). */
uint32_t pvio_net_rx_slots(uint32_t len, uint32_t gso);

/* netfront TX: ids, in-flight set and the granted pages of one queue. */
typedef struct {
    uint32_t nr;          /* ring slots = ids = pages */
    uint32_t nfree;
    uint16_t *free_ids;   /* a stack: the next id is free_ids[nfree - 1] */
    uint8_t *in_flight;   /* per id */
    uint8_t *pages;       /* page of id i: pages + i * 4096 */
    const uint32_t *refs; /* grant ref of page i */
} pvio_netfront_tx;

void pvio_netfront_tx_init(pvio_netfront_tx *t, uint32_t nr, uint16_t *free_ids,
                           uint8_t *in_flight, uint8_t *pages, const uint32_t *refs);
/* Copy frames (lens[i] bytes, back to back in data) into free TX pages and
 * write their requests (a struct pvio_netif_tx_request per slot) to req: a
 * page-sized fragment per slot chained by NETTXF_more_data, a GSO extra after
 * the first. meta: NULL or 2 u32 per frame: NETTXF_* csum flags | gso_type <<
 * 16, gso_size. Stops at the first frame that does not fit in the free ids or
 * free_slots. *nreq: slots written; *bytes: bytes placed. Returns the frames
 * placed. */
uint32_t pvio_netfront_tx_put(pvio_netfront_tx *t, const uint8_t *data, const uint32_t *lens,
                              const uint32_t *meta, uint32_t nframes, uint32_t free_slots,
                              uint8_t *req, uint32_t *nreq, uint64_t *bytes);
/* Account n TX responses (a struct pvio_netif_tx_response each): ids back to
 * the free stack; NULL responses skipped. *errors: non-OKAY statuses. Returns
 * the ids freed, or -1 - k if response k names an id not in flight (*bad_id:
 * that id; the responses before k are accounted). */
int64_t pvio_netfront_tx_done(pvio_netfront_tx *t, const uint8_t *rsp, uint32_t n,
                              uint32_t *errors, uint32_t *bad_id);

/* Why pvio_netfront_tx_from_vnet_fd stopped (its *why). */
enum {
    PVIO_VNET_EMPTY = 1,  /* the fd has nothing more to read (EAGAIN) */
    PVIO_VNET_LIMIT = 2,  /* max_frames placed */
    PVIO_VNET_FULL = 3,   /* too few free ids or slots for a frame of the largest size */
    PVIO_VNET_SLOW = 4,   /* a frame the fast path leaves to the caller: it is in slow
                           * (*slow_len bytes, virtio-net header first) */
    PVIO_VNET_ERROR = 5   /* the read failed: *slow_len is the errno */
};
/* netfront TX from a TAP-like fd (IFF_VNET_HDR, 10-byte struct virtio_net_hdr
 * before each frame, one frame per read): each frame is read straight into
 * free TX pages (no copy on the way) and its requests written to req, as
 * pvio_netfront_tx_put would write them for the frame pvio.tap.Tap.from_vnet
 * makes of it. Only frames whose mapping needs nothing but header checks take
 * this path: no offload, DATA_VALID, NEEDS_CSUM at the parsed L4 checksum
 * field, or TCPV4/TCPV6 GSO (non-zero gso_size, gso_ok set) of a TCP frame of
 * that IP version, 14..65535 bytes, headers within the first page. Any other
 * frame stops the call with PVIO_VNET_SLOW and its bytes in slow (slow_cap
 * bytes at most; its ids stay free). Returns the frames placed; *nreq, *bytes
 * as for pvio_netfront_tx_put. */
/* The most one read of pvio_netfront_tx_from_vnet_fd takes (the 10-byte
 * virtio-net header, 17 pages, a 256-byte tail only a frame too big for
 * netif reaches): the size its slow buffer must have. */
#define PVIO_VNET_READ_MAX 69898
int64_t pvio_netfront_tx_from_vnet_fd(pvio_netfront_tx *t, int fd, uint32_t max_frames,
                                      uint32_t free_slots, int gso_ok, uint8_t *req,
                                      uint32_t *nreq, uint64_t *bytes, uint8_t *slow,
                                      uint32_t slow_cap, uint32_t *slow_len, uint32_t *why);

/* Why netfront refused the RX responses (pvio_netfront_rx_parse's err[0]). */
enum {
    PVIO_NETFRONT_RX_LEAVES_PAGE = 1,   /* err: code, slot, offset, status */
    PVIO_NETFRONT_RX_BAD_EXTRA = 2,     /* err: code, slot, type, gso_type, gso_size */
    PVIO_NETFRONT_RX_TOO_LONG = 3,      /* err: code, first slot, max slots */
    PVIO_NETFRONT_RX_BAD_ID = 4         /* err: code, slot, id, expected id */
};

/* u32 fields of one packet in pvio_netfront_rx_parse's pkts. */
enum {
    PVIO_NETFRONT_RXP_DATA_OFF = 0, PVIO_NETFRONT_RXP_LEN = 1, PVIO_NETFRONT_RXP_FLAGS = 2,
    PVIO_NETFRONT_RXP_GSO_TYPE = 3, PVIO_NETFRONT_RXP_GSO_SIZE = 4,
    PVIO_NETFRONT_RXP_ERROR = 5, PVIO_NETFRONT_RXP_SLOTS = 6, PVIO_NETFRONT_RXP_CHUNK0 = 7,
    PVIO_NETFRONT_RXP_NCHUNKS = 8, PVIO_NETFRONT_RXP_N = 9
};

/* Split n RX responses (a struct pvio_netif_rx_response each, private copies;
 * the first sits in ring slot first_slot) into packets, as
 * pvio.netif.parse_rx_responses does. pkts gets PVIO_NETFRONT_RXP_N u32 per
 * packet (flags: 1 csum_blank, 2
 * data_validated; error: the packet's first negative status, as int32);
 * chunks gets (slot, offset, length, id) per response carrying data. With
 * nr_ents > 0, a chunk's id must be its slot % nr_ents (Linux netfront finds
 * pages by slot) and, with pages non-NULL, the data of packets without error
 * is copied from page (slot % nr_ents) into data (data_cap bytes, at least
 * n * 4096). *used: slots of the complete packets (a chain cut off at the end
 * is left). Returns the number of packets, or -1 with err[] set. */
int64_t pvio_netfront_rx_parse(const uint8_t *raw, uint32_t n, uint32_t first_slot,
                               uint32_t nr_ents, int gso_ok, const uint8_t *pages,
                               uint8_t *data, uint64_t data_cap, uint32_t *pkts,
                               uint32_t *chunks, uint32_t *used, uint32_t *err);

/* RX requests re-posting n slots from ring index start, each for its own page
 * (id = slot % nr_ents, gref = refs[id]), a struct pvio_netif_rx_request each
 * into out. */
void pvio_netfront_rx_posts(uint32_t start, uint32_t n, uint32_t nr_ents,
                            const uint32_t *refs, uint8_t *out);
