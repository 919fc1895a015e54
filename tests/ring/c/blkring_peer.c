/* blkring_peer: one end of a blkif ring, written only with Xen's own,
 * unmodified <xen/io/ring.h> and <xen/io/blkif.h> macros, for interop tests
 * against pvio's FrontRing/BackRing across processes.
 *
 *   blkring_peer ROLE MEMFD FRAME PAGES WAIT_EFD NOTIFY_EFD COUNT [START]
 *
 * ROLE        front | back
 * MEMFD       inherited fd of the shared memory (a pvio SharedMemory memfd)
 * FRAME       page offset of the ring inside MEMFD
 * PAGES       ring size in 4 KiB pages (ring-page-order 2^n)
 * WAIT_EFD    eventfd this end sleeps on (our event-channel port)
 * NOTIFY_EFD  eventfd raised to notify the peer (EVTCHNOP_send)
 * COUNT       number of requests to produce (front) / answer (back)
 * START       optional initial ring index (FRONT/BACK_RING_ATTACH), e.g.
 *             4294967200 to wrap the u32 indices mid-run
 *
 * Request i (0 <= i < COUNT) carries a pattern derived from i (see fill_req);
 * the back validates every field it is given and answers with the id and
 * operation echoed and status BLKIF_RSP_OKAY; the front checks that response
 * ids arrive exactly in order 0, 1, 2, ... (nothing lost, duplicated or
 * reordered). Exit status: 0 success, 1 usage, 2 protocol violation by the
 * peer, 3 stalled (no event for STALL_MS), 4 system error.
 *
 * The eventfds may be non-blocking (O_NONBLOCK lives in the open file
 * description shared with the pvio process, so we must not change it): we
 * sleep in poll() and treat EAGAIN from read() as "nothing pending".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Barriers for ring.h (the legacy interface maps xen_mb() to mb()). They are
 * also compiler barriers, so shared indices are re-read after each one. */
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() do { __asm__ __volatile__("" ::: "memory"); \
                   __atomic_thread_fence(__ATOMIC_ACQUIRE); } while (0)
#define wmb() do { __asm__ __volatile__("" ::: "memory"); \
                   __atomic_thread_fence(__ATOMIC_RELEASE); } while (0)

#include <xen/io/ring.h>
#include <xen/io/blkif.h>

#define PAGE 4096u
#define STALL_MS 10000
#define SPIN_ROUNDS 2000

#if defined(__x86_64__) || defined(__i386__)
#define RELAX() __builtin_ia32_pause()
#else
#define RELAX() __asm__ __volatile__("" ::: "memory")
#endif

static const char *role = "?";

#define FAIL(code, ...) do {                                              \
    fprintf(stderr, "blkring_peer %s: ", role);                          \
    fprintf(stderr, __VA_ARGS__);                                         \
    fputc('\n', stderr);                                                  \
    exit(code);                                                           \
} while (0)

/* The pattern of request i; pvio's side of the tests builds the same one. */
static void fill_req(blkif_request_t *req, uint64_t i)
{
    memset(req, 0, sizeof(*req));
    req->operation = (uint8_t)(i & 1);          /* READ / WRITE */
    req->nr_segments = (uint8_t)(1 + i % 11);
    req->handle = (blkif_vdev_t)(i * 7);
    req->id = i;
    req->sector_number = (i * 8) ^ UINT64_C(0x5bd1e9955bd1e995);
    req->seg[0].gref = (grant_ref_t)i;
    req->seg[0].first_sect = (uint8_t)(i & 7);
    req->seg[0].last_sect = 7;
}

static void check_req(const blkif_request_t *req, uint64_t expect)
{
    blkif_request_t want;
    fill_req(&want, expect);
    if (req->id != expect)
        FAIL(2, "request id %" PRIu64 ", expected %" PRIu64 " (lost, duplicated or reordered)",
             (uint64_t)req->id, expect);
    if (req->operation != want.operation || req->nr_segments != want.nr_segments ||
        req->handle != want.handle || req->sector_number != want.sector_number ||
        req->seg[0].gref != want.seg[0].gref ||
        req->seg[0].first_sect != want.seg[0].first_sect ||
        req->seg[0].last_sect != want.seg[0].last_sect)
        FAIL(2, "request %" PRIu64 " has a corrupted body (op %u nseg %u handle %u "
             "sector %#" PRIx64 " gref %u first %u last %u)", expect, req->operation,
             req->nr_segments, req->handle, (uint64_t)req->sector_number,
             req->seg[0].gref, req->seg[0].first_sect, req->seg[0].last_sect);
}

static unsigned long arg_ul(const char *s, const char *what)
{
    char *end;
    unsigned long v;
    errno = 0;
    v = strtoul(s, &end, 0);
    if (errno || *end || end == s)
        FAIL(1, "bad %s: %s", what, s);
    return v;
}

static void notify(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) != sizeof(one))
        FAIL(4, "eventfd write: %s", strerror(errno));
}

/* Sleep until our port is pending, then clear it (coalesced events). */
static void wait_event(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    uint64_t v;
    for (;;) {
        ssize_t n = read(fd, &v, sizeof(v));
        if (n == sizeof(v))
            return;
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            FAIL(4, "eventfd read: %s", strerror(errno));
        n = poll(&p, 1, STALL_MS);
        if (n == 0)
            FAIL(3, "stalled: no event for %d ms (lost wake-up?)", STALL_MS);
        if (n < 0 && errno != EINTR)
            FAIL(4, "poll: %s", strerror(errno));
    }
}

/* Spin a little while the producer index stays at `seen` (saves a sleep when
 * the peer is busy); the caller still does FINAL_CHECK before sleeping. */
static void spin_while(const RING_IDX *prod, RING_IDX seen)
{
    int i;
    for (i = 0; i < SPIN_ROUNDS; i++) {
        if (*(const volatile RING_IDX *)prod != seen)
            return;
        RELAX();
    }
}

static int run_back(blkif_sring_t *sring, size_t size, int wait_fd, int notify_fd,
                    uint64_t count, RING_IDX start)
{
    blkif_back_ring_t br;
    uint64_t done = 0;

    BACK_RING_ATTACH(&br, sring, start, size);
    while (done < count) {
        RING_IDX rc, rp;
        int more, do_notify;

        rp = sring->req_prod;
        rmb(); /* see the requests up to rp, not older contents */
        if (RING_REQUEST_PROD_OVERFLOW(&br, rp))
            FAIL(2, "frontend published req_prod %#x with rsp_prod_pvt %#x (ring of %u)",
                 rp, br.rsp_prod_pvt, RING_SIZE(&br));
        rc = br.req_cons;
        while (rc != rp) {
            blkif_request_t req;
            blkif_response_t *rsp;

            if (RING_REQUEST_CONS_OVERFLOW(&br, rc))
                break;
            RING_COPY_REQUEST(&br, rc, &req);
            br.req_cons = ++rc;
            if (done >= count)
                FAIL(2, "more than %" PRIu64 " requests", count);
            check_req(&req, done);
            rsp = RING_GET_RESPONSE(&br, br.rsp_prod_pvt);
            memset(rsp, 0, sizeof(*rsp));
            rsp->id = req.id;
            rsp->operation = req.operation;
            rsp->status = BLKIF_RSP_OKAY;
            br.rsp_prod_pvt++;
            done++;
        }
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&br, do_notify);
        if (do_notify)
            notify(notify_fd);
        if (done == count)
            break;
        spin_while(&sring->req_prod, br.req_cons);
        RING_FINAL_CHECK_FOR_REQUESTS(&br, more);
        if (!more)
            wait_event(wait_fd);
    }
    return 0;
}

static int run_front(blkif_sring_t *sring, size_t size, int wait_fd, int notify_fd,
                     uint64_t count, RING_IDX start)
{
    blkif_front_ring_t fr;
    uint64_t next = 0, expect = 0;

    SHARED_RING_INIT(sring);
    if (start) {
        /* Reconnect-style attach: both shared producers at start. */
        sring->req_prod = sring->rsp_prod = start;
        sring->req_event = sring->rsp_event = start + 1;
    }
    FRONT_RING_ATTACH(&fr, sring, start, size);

    while (expect < count) {
        RING_IDX rp;
        int more, do_notify, got = 0;

        while (next < count && !RING_FULL(&fr)) {
            fill_req(RING_GET_REQUEST(&fr, fr.req_prod_pvt), next);
            fr.req_prod_pvt++;
            next++;
        }
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, do_notify);
        if (do_notify)
            notify(notify_fd);

        rp = sring->rsp_prod;
        rmb(); /* see the responses up to rp */
        if (RING_RESPONSE_PROD_OVERFLOW(&fr, rp) ||
            (RING_IDX)(rp - fr.rsp_cons) > (RING_IDX)(fr.req_prod_pvt - fr.rsp_cons))
            FAIL(2, "backend published rsp_prod %#x with rsp_cons %#x req_prod_pvt %#x",
                 rp, fr.rsp_cons, fr.req_prod_pvt);
        while (fr.rsp_cons != rp) {
            blkif_response_t rsp;

            RING_COPY_RESPONSE(&fr, fr.rsp_cons, &rsp);
            fr.rsp_cons++;
            if (rsp.id != expect)
                FAIL(2, "response id %" PRIu64 ", expected %" PRIu64
                     " (lost, duplicated or reordered)", (uint64_t)rsp.id, expect);
            if (rsp.operation != (uint8_t)(expect & 1) || rsp.status != BLKIF_RSP_OKAY)
                FAIL(2, "response %" PRIu64 ": operation %u status %d", expect,
                     rsp.operation, rsp.status);
            expect++;
            got++;
        }
        if (got || expect == count)
            continue;
        spin_while(&sring->rsp_prod, fr.rsp_cons);
        RING_FINAL_CHECK_FOR_RESPONSES(&fr, more);
        if (!more)
            wait_event(wait_fd);
    }
    return 0;
}

int main(int argc, char **argv)
{
    unsigned long fd, frame, pages, wait_fd, notify_fd;
    uint64_t count;
    RING_IDX start = 0;
    size_t size;
    void *map;

    if (argc != 8 && argc != 9) {
        fprintf(stderr, "usage: %s front|back MEMFD FRAME PAGES WAIT_EFD NOTIFY_EFD COUNT "
                "[START]\n", argv[0]);
        return 1;
    }
    role = argv[1];
    if (strcmp(role, "front") && strcmp(role, "back"))
        FAIL(1, "role must be front or back");
    fd = arg_ul(argv[2], "memfd");
    frame = arg_ul(argv[3], "frame");
    pages = arg_ul(argv[4], "pages");
    wait_fd = arg_ul(argv[5], "wait eventfd");
    notify_fd = arg_ul(argv[6], "notify eventfd");
    count = strtoull(argv[7], NULL, 0);
    if (argc == 9)
        start = (RING_IDX)arg_ul(argv[8], "start");
    if (pages == 0 || pages > 256)
        FAIL(1, "bad page count %lu", pages);
    size = pages * PAGE;

    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, (int)fd,
               (off_t)frame * PAGE);
    if (map == MAP_FAILED)
        FAIL(4, "mmap memfd %lu frame %lu: %s", fd, frame, strerror(errno));

    if (!strcmp(role, "back"))
        return run_back(map, size, (int)wait_fd, (int)notify_fd, count, start);
    return run_front(map, size, (int)wait_fd, (int)notify_fd, count, start);
}
