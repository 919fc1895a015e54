/* Prototypes of pvio's C ring helpers. This text is both cffi's cdef and part
 * of the compiled source, so it must stay within the C subset cffi parses.
 * The struct pvio_* wire layouts are generated from pvio/layouts.py and are
 * prepended by pvio/ring/_build.py. */

/* Private state of one end of a request/response ring (io/ring.h
 * front_ring/back_ring), plus the first protocol violation seen. */
typedef struct {
    struct pvio_sring_header *sring;  /* the shared page(s) */
    uint8_t *slots;                   /* sring + sizeof(struct pvio_sring_header): ring[] */
    uint32_t nr_ents;                 /* power of two */
    uint32_t slot_size;               /* sizeof(union X_sring_entry) */
    uint32_t prod_pvt;                /* front: req_prod_pvt, back: rsp_prod_pvt */
    uint32_t cons;                    /* front: rsp_cons,     back: req_cons */
    int32_t error;                    /* 0, or PVIO_RING_E_* once the peer broke the rules */
    uint32_t bad_prod;                /* the offending producer index */
    uint64_t notify_sent;             /* push decided the peer must be notified */
    uint64_t notify_suppressed;       /* push decided no notification was needed */
    uint64_t wake_ahead_sent;         /* peer kicked by pvio_ring_sleep's wake-ahead */
    uint64_t wake_ahead_wasted;       /* kicks the peer had handled before the kicker ran on */
    uint32_t kicked_event;            /* the peer's armed event index we last kicked */
    uint32_t kick_skip;               /* wake-ahead backed off: kicks still to skip */
    uint32_t kick_backoff;            /* and the length of the current back-off */
} pvio_ring;

/* A byte-stream ring (console in/out, one direction of a flex ring). The
 * index we own is kept privately and only published; the peer's is re-read. */
typedef struct {
    uint8_t *buf;
    uint32_t size;                    /* power of two */
    uint32_t *prod;                   /* shared producer index */
    uint32_t *cons;                   /* shared consumer index */
    uint32_t pvt;                     /* our own index (prod if writer, cons if reader) */
    int32_t error;
    uint32_t bad_index;
} pvio_bytering;

typedef struct {
    uint32_t ref;       /* grant ref on the granter's table */
    uint32_t offset;    /* byte offset within the granted page */
    uint32_t len;       /* bytes to copy */
    uint32_t to_grant;  /* 1: local -> granted page; 0: granted page -> local */
    uint8_t *local;     /* the local (private) buffer */
    int32_t status;     /* GNTST_* result, per element */
} pvio_gnt_copy_op;

#define PVIO_RING_E_REQ_PROD_OVERFLOW 1
#define PVIO_RING_E_RSP_PROD_OVERFLOW 2
#define PVIO_RING_E_CONS_OVERFLOW 3
#define PVIO_RING_E_BYTES_GAP 4

/* io/ring.h: __RING_SIZE for a slot size and total ring bytes. */
uint32_t pvio_ring_nr_ents(uint32_t ring_bytes, uint32_t slot_size);
/* SHARED_RING_INIT */
void pvio_shared_ring_init(void *sring);
/* FRONT_RING_ATTACH / BACK_RING_ATTACH (same private layout, roles differ). */
int pvio_ring_attach(pvio_ring *r, void *sring, uint32_t ring_bytes,
                     uint32_t slot_size, uint32_t start);

/* Front end. */
uint32_t pvio_front_free_requests(pvio_ring *r);
uint32_t pvio_front_unconsumed_responses(pvio_ring *r);
uint32_t pvio_front_put_requests(pvio_ring *r, const uint8_t *src, uint32_t n,
                                 uint32_t req_size);
int pvio_front_push_requests(pvio_ring *r);
int64_t pvio_front_take_responses(pvio_ring *r, uint8_t *dst, uint32_t max,
                                  uint32_t rsp_size);
uint32_t pvio_front_final_check(pvio_ring *r);
int pvio_front_spin(pvio_ring *r, uint32_t spin_ns);

/* Back end. */
uint32_t pvio_back_unconsumed_requests(pvio_ring *r);
int64_t pvio_back_take_requests(pvio_ring *r, uint8_t *dst, uint32_t max,
                                uint32_t req_size);
uint32_t pvio_back_put_responses(pvio_ring *r, const uint8_t *src, uint32_t n,
                                 uint32_t rsp_size);
int pvio_back_push_responses(pvio_ring *r);
uint32_t pvio_back_final_check(pvio_ring *r);
int pvio_back_spin(pvio_ring *r, uint32_t spin_ns);

/* The predicates of io/ring.h, once, in u32 arithmetic. */
int pvio_need_notify(uint32_t old, uint32_t new_, uint32_t event);
int pvio_request_cons_overflow(uint32_t cons, uint32_t rsp_prod_pvt, uint32_t nr_ents);
int pvio_request_prod_overflow(uint32_t prod, uint32_t rsp_prod_pvt, uint32_t nr_ents);
int pvio_response_prod_overflow(uint32_t prod, uint32_t rsp_cons, uint32_t nr_ents);

/* Event channels on a shared eventfd: never block on the peer's say-so;
 * 0/1 or -errno (see cring.c). */
int pvio_evtchn_consume(int fd);
int pvio_evtchn_send(int fd);
int pvio_evtchn_write(int fd);
int pvio_send_guard_start(int signo, int64_t timeout_ns);
uint64_t pvio_send_guard_fired(void);
void pvio_send_guard_test_pause(int64_t ns);
int pvio_evtchn_wait(int fd, int64_t timeout_ns);
/* RING_FINAL_CHECK_FOR_* plus the sleep on the end's eventfd, in one call;
 * *stale: the eventfd may hold an event a wake-up left unread; ahead_fd: the
 * peer's eventfd for wake-ahead, or -1 (see cring.c). */
#define PVIO_SLEEP_WORK 1
#define PVIO_SLEEP_WOKE_WORK 2
#define PVIO_SLEEP_WOKE_IDLE 3
int pvio_ring_sleep(pvio_ring *r, int back, int fd, int *stale, int ahead_fd,
                    int64_t timeout_ns);

/* Byte rings (console.h, ring.h flex rings). */
void pvio_bytering_attach(pvio_bytering *b, uint8_t *buf, uint32_t size,
                          uint32_t *prod, uint32_t *cons, int writer);
int64_t pvio_bytering_write(pvio_bytering *b, const uint8_t *src, uint32_t len);
int64_t pvio_bytering_read(pvio_bytering *b, uint8_t *dst, uint32_t max);
int64_t pvio_bytering_pending(pvio_bytering *b);
int pvio_bytering_spin(pvio_bytering *b, uint32_t spin_ns);
uint32_t pvio_flex_queued(uint32_t prod, uint32_t cons, uint32_t ring_size);

/* Grant table (grant_table.h v1 semantics). */
void pvio_gnt_grant(uint8_t *table, uint32_t ref, uint16_t domid, uint32_t frame,
                    int readonly);
int pvio_gnt_end_access(uint8_t *table, uint32_t ref);
int pvio_gnt_make_readonly(uint8_t *table, uint32_t ref);
int32_t pvio_gnt_pin(uint8_t *table, uint32_t nr, uint32_t ref, uint16_t domid,
                     int writable, uint32_t nr_frames, uint32_t *rd_pins,
                     uint32_t *wr_pins, uint32_t *frame_out);
void pvio_gnt_unpin(uint8_t *table, uint32_t ref, int writable,
                    uint32_t *rd_pins, uint32_t *wr_pins);
int pvio_gnt_copy(uint8_t *table, uint32_t nr, uint16_t domid, uint8_t *pool,
                  uint32_t nr_frames, uint32_t *rd_pins, uint32_t *wr_pins,
                  pvio_gnt_copy_op *ops, uint32_t n);
/* GNTTABOP_copy of n fragments between granted pages and one local buffer:
 * fragment i is lens[i] bytes at offs[i] of the page granted by refs[i], and
 * at local_offs[i] of local (local_size bytes). status[i] gets its GNTST code;
 * returns the number of failures. */
int pvio_gnt_copy_vec(uint8_t *table, uint32_t nr, uint16_t domid, uint8_t *pool,
                      uint32_t nr_frames, uint32_t *rd_pins, uint32_t *wr_pins,
                      const uint32_t *refs, const uint32_t *offs, const uint32_t *lens,
                      uint8_t *local, uint64_t local_size, const uint32_t *local_offs,
                      uint32_t n, int to_grant, int32_t *status);

/* Contiguous mapping of (possibly scattered) pool frames: Xen's multi-page
 * map. Returns NULL and sets errno on failure. */
void *pvio_map_frames(int fd, const uint32_t *frames, uint32_t n, int writable);
int pvio_unmap(void *addr, uint32_t n);

/* Block helpers: fallocate(PUNCH_HOLE|KEEP_SIZE) for discard; -errno on failure. */
int pvio_punch_hole(int fd, int64_t offset, int64_t len);

/* RFC 1071 ones'-complement sum of buf, added to sum (not folded, not inverted). */
uint64_t pvio_csum_partial(const uint8_t *buf, size_t len, uint64_t sum);
