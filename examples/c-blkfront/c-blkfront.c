/* c-blkfront: a minimal Xen blkfront in C for a pvio daemon (`pvio serve`).
 *
 * Built only from Xen's unmodified public headers (Debian libxen-dev) and libc:
 * the shared ring, request and response layouts come from <xen/io/ring.h> and
 * <xen/io/blkif.h>, grant entries from <xen/grant_table.h>, the store's wire
 * from <xen/io/xs_wire.h>, the states from <xen/io/xenbus.h>. Everything else
 * follows pvio's specs: specs/xenbus.md (the store socket, the PVIO_* fd
 * hand-over messages, node layout, state machine) and specs/ring.md (sealed
 * memfds as guest memory and grant table, eventfd event channels).
 *
 *   PVIO_SOCKET=/path/to/xenbus.sock c-blkfront [DEVID]
 *   c-blkfront SOCKET [DEVID]
 *
 * Environment: PVIO_SOCKET (the daemon's guest socket; else the first
 * non-numeric argument), PVIO_DOMAIN (the domain to claim, default "guest"),
 * PVIO_SECTOR (first sector of the test range, default 0). DEVID defaults to
 * the first device/vbd/<devid> of the domain.
 *
 * It claims the domain, connects the vbd, writes a pattern to NSECT sectors,
 * flushes (if offered), reads them back into other pages and compares, then
 * closes the device the orderly way. Exit status: 0 success, 1 failure (the
 * reason is the last line on stderr), 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

/* Barriers for ring.h: without __XEN_INTERFACE_VERSION__ its xen_mb() & co.
 * map to mb()/rmb()/wmb(), which the includer provides. Each is also a
 * compiler barrier, so shared fields are re-read after it. */
#define mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>     /* DEFINE_RING_TYPES(blkif, ...) */
#include <xen/io/protocols.h>
#include <xen/io/xenbus.h>
#include <xen/io/xs_wire.h>

/* ------------------------------------------------------------ parameters */

#define PAGE            4096u           /* XEN_PAGE_SIZE */
#define POOL_PAGES      64u             /* our "guest memory" */
#define GNTTAB_PAGES    1u              /* 512 grant_entry_v1 */
#define NSECT           16u             /* sectors written and read back */
#define MAX_DATA_PAGES  16u             /* NSECT sectors of at most 4096 bytes */
#define SECT_PER_REQ    4u              /* so several requests are in flight */
#define TIMEOUT_MS      10000           /* any wait */
#define EVTCHN_PORT     1u              /* our port: we pick it (specs/xenbus.md 2.1) */

/* The pvio extension messages (specs/xenbus.md 2.1). */
#define PVIO_SHARE_MEMORY 0x70760001u
#define PVIO_BIND_EVTCHN  0x70760002u
#define PVIO_CLAIM        0x70760003u

/* Pool frames: the ring, then the write pages, then the read pages. */
#define RING_FRAME  0u
#define WRITE_FRAME 1u
#define READ_FRAME  (WRITE_FRAME + MAX_DATA_PAGES)
/* Grant refs: 0..7 are reserved (GNTTAB_NR_RESERVED_ENTRIES). */
#define RING_REF    GNTTAB_NR_RESERVED_ENTRIES
#define WRITE_REF   (RING_REF + 1)
#define READ_REF    (WRITE_REF + MAX_DATA_PAGES)

/* ------------------------------------------------------------ logging */

static int in_teardown;
static void backend_gone(int state, const char *when);

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("c-blkfront: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("c-blkfront: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *state_name(int s)
{
    static const char *const names[] = {
        "Unknown", "Initialising", "InitWait", "Initialised", "Connected",
        "Closing", "Closed", "Reconfiguring", "Reconfigured",
    };
    return s >= 0 && s <= XenbusStateReconfigured ? names[s] : "invalid";
}

/* ------------------------------------------------------------ xs_wire client
 *
 * One request at a time: send it, then read messages until its reply (same
 * req_id) arrives. Watch events that come meanwhile only set a flag; the
 * caller re-reads the watched node (a watch is a hint to re-read).
 */

struct xs {
    int fd;
    uint32_t next_id;
    int watch_fired;            /* a WATCH_EVENT with our token arrived */
};

#define WATCH_TOKEN "c-blkfront-be-state"

static struct xs xs = { .fd = -1, .next_id = 1 };
static char payload[XENSTORE_PAYLOAD_MAX + 1];      /* last message's payload, NUL-ended */
static struct xsd_sockmsg hdr;                       /* last message's header */

/* Wait until the socket is readable; dies on timeout. */
static void xs_wait_readable(int64_t deadline, const char *what)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            die("timed out after %d s waiting for %s", TIMEOUT_MS / 1000, what);
        struct pollfd p = { .fd = xs.fd, .events = POLLIN };
        int n = poll(&p, 1, (int)left);
        if (n < 0 && errno != EINTR)
            die("poll on the store socket: %s", strerror(errno));
        if (n > 0)
            return;
    }
}

static void xs_recv_exact(void *buf, size_t len, int64_t deadline, const char *what)
{
    char *p = buf;
    while (len) {
        xs_wait_readable(deadline, what);
        ssize_t n = recv(xs.fd, p, len, 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            die("the store closed the connection while we waited for %s "
                "(is the daemon still running?)", what);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("reading from the store: %s", strerror(errno));
        }
        p += n;
        len -= (size_t)n;
    }
}

/* Read one whole message into hdr/payload; a watch event sets the flag. */
static void xs_recv(int64_t deadline, const char *what)
{
    xs_recv_exact(&hdr, sizeof(hdr), deadline, what);
    if (hdr.len > XENSTORE_PAYLOAD_MAX)
        die("the store sent a %" PRIu32 "-byte payload (more than XENSTORE_PAYLOAD_MAX)",
            hdr.len);
    xs_recv_exact(payload, hdr.len, deadline, what);
    payload[hdr.len] = '\0';
    if (hdr.type == XS_WATCH_EVENT) {
        /* "path\0token\0" */
        size_t plen = strnlen(payload, hdr.len);
        if (plen < hdr.len && strcmp(payload + plen + 1, WATCH_TOKEN) == 0)
            xs.watch_fired = 1;
    }
}

/* Send a request (with fds as SCM_RIGHTS on the same sendmsg, so they travel
 * with the message's first byte) and wait for its reply. Returns NULL on
 * success (reply in payload/hdr.len) or the error name of an XS_ERROR reply. */
static const char *xs_request(uint32_t type, uint32_t tx_id, const void *body, size_t len,
                              const int *fds, int nfds, const char *what)
{
    if (len > XENSTORE_PAYLOAD_MAX)
        die("request for %s is too long", what);
    struct xsd_sockmsg req = {
        .type = type, .req_id = xs.next_id++, .tx_id = tx_id, .len = (uint32_t)len,
    };
    struct iovec iov[2] = {
        { .iov_base = &req, .iov_len = sizeof(req) },
        { .iov_base = (void *)body, .iov_len = len },
    };
    union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };
    if (nfds) {
        memset(&ctl, 0, sizeof(ctl));
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
    }
    size_t total = sizeof(req) + len, sent = 0;
    while (sent < total) {
        /* MSG_NOSIGNAL: a vanished daemon is an error message, not SIGPIPE. */
        ssize_t n = sendmsg(xs.fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EPIPE || errno == ECONNRESET)
                die("the store closed the connection before we could send %s "
                    "(is the daemon still running?)", what);
            die("sending %s to the store: %s", what, strerror(errno));
        }
        sent += (size_t)n;
        /* The rest (rare: a full socket buffer) goes without the fds. */
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
        size_t skip = (size_t)n;
        while (msg.msg_iovlen && skip >= msg.msg_iov[0].iov_len) {
            skip -= msg.msg_iov[0].iov_len;
            msg.msg_iov++;
            msg.msg_iovlen--;
        }
        if (msg.msg_iovlen) {
            msg.msg_iov[0].iov_base = (char *)msg.msg_iov[0].iov_base + skip;
            msg.msg_iov[0].iov_len -= skip;
        }
    }
    int64_t deadline = now_ms() + TIMEOUT_MS;
    for (;;) {
        xs_recv(deadline, what);
        if (hdr.type == XS_WATCH_EVENT)
            continue;
        if (hdr.req_id != req.req_id)
            die("the store answered request %" PRIu32 " while we waited for %" PRIu32,
                hdr.req_id, req.req_id);
        if (hdr.type == XS_ERROR)
            return payload;             /* "EINVAL\0" ... */
        if (hdr.type != type)
            die("the store answered %s with message type %#" PRIx32, what, hdr.type);
        return NULL;
    }
}

/* Helpers over xs_request. Paths are absolute. */

static const char *xs_read(const char *path, char *out, size_t outsz)
{
    const char *err = xs_request(XS_READ, 0, path, strlen(path) + 1, NULL, 0, path);
    if (err)
        return err;
    if (hdr.len >= outsz)
        die("%s: value of %" PRIu32 " bytes is too long", path, hdr.len);
    memcpy(out, payload, hdr.len);
    out[hdr.len] = '\0';
    return NULL;
}

/* A decimal key; `dflt` when it is missing. Dies if it is not a number. */
static unsigned long long xs_read_num(const char *path, unsigned long long dflt)
{
    char val[64], *end;
    const char *err = xs_read(path, val, sizeof(val));
    if (err) {
        if (strcmp(err, "ENOENT") == 0)
            return dflt;
        die("cannot read %s: %s", path, err);
    }
    errno = 0;
    unsigned long long v = strtoull(val, &end, 10);
    if (errno || end == val || *end)
        die("%s is not a number: '%s'", path, val);
    return v;
}

static const char *xs_write(const char *path, const char *value, uint32_t tx_id)
{
    char body[XENSTORE_PAYLOAD_MAX];
    size_t plen = strlen(path) + 1, vlen = strlen(value);   /* value unterminated */
    if (plen + vlen > sizeof(body))
        die("%s: value too long", path);
    memcpy(body, path, plen);
    memcpy(body + plen, value, vlen);
    return xs_request(XS_WRITE, tx_id, body, plen + vlen, NULL, 0, path);
}

static void xs_write_must(const char *path, const char *value)
{
    const char *err = xs_write(path, value, 0);
    if (err)
        die("cannot write %s: %s", path, err);
}

/* Two NUL-terminated strings (WATCH's path and token). */
static size_t pack2(char *buf, size_t sz, const char *a, const char *b)
{
    size_t la = strlen(a) + 1, lb = strlen(b) + 1;
    if (la + lb > sz)
        die("path too long: %s", a);
    memcpy(buf, a, la);
    memcpy(buf + la, b, lb);
    return la + lb;
}

/* ------------------------------------------------------------ the device */

static struct {
    char fe[256], be[256];      /* frontend and backend directories */
    unsigned devid;
    unsigned backend_id;        /* the domain we grant to: backend-id (0) */
    int our_state;
    /* guest memory and grant table: sealed memfds, mapped */
    uint8_t *pool;
    grant_entry_v1_t *gnttab;
    unsigned nr_grants;
    /* ring and event channel */
    blkif_front_ring_t front;
    int evt_wait, evt_notify;   /* we poll evt_wait; writing evt_notify signals the backend */
    unsigned notifications;
    /* the disk */
    unsigned long long sectors;
    unsigned sector_size;
    int flush;
    /* requests in flight: id -> operation (ids are never reused) */
    struct { uint64_t id; uint8_t op; int busy; } shadow[32];
    uint64_t next_id;
    unsigned in_flight;
} dev = { .evt_wait = -1, .evt_notify = -1, .next_id = 1 };

static void set_state(int s)
{
    char path[300], val[4];
    snprintf(path, sizeof(path), "%s/state", dev.fe);
    snprintf(val, sizeof(val), "%d", s);
    xs_write_must(path, val);
    say("frontend state -> %s (%d)", state_name(s), s);
    dev.our_state = s;
}

static int read_backend_state(void)
{
    char path[300];
    snprintf(path, sizeof(path), "%s/state", dev.be);
    /* A missing or unparsable state counts as Unknown (specs/xenbus.md 5). */
    char val[16], *end;
    if (xs_read(path, val, sizeof(val)))
        return XenbusStateUnknown;
    long v = strtol(val, &end, 10);
    if (end == val || *end || v < 0 || v > XenbusStateReconfigured)
        return XenbusStateUnknown;
    return (int)v;
}

/* Handle one message from the store that arrived while we were not waiting
 * for a reply; a watch event makes us re-read the backend's state. Returns
 * the backend's state if it was re-read, else -1. */
static int poll_store_once(int64_t deadline, const char *what)
{
    if (!xs.watch_fired)
        xs_recv(deadline, what);
    if (!xs.watch_fired)
        return -1;                       /* a stray reply or someone else's event */
    xs.watch_fired = 0;
    return read_backend_state();
}

/* Wait until the backend's state is one in `want` (a bit mask of states).
 * Closing, Closed and Unknown end the program unless they are wanted. */
static int wait_backend(unsigned want, const char *what)
{
    int64_t deadline = now_ms() + TIMEOUT_MS;
    int last = -1;
    for (;;) {
        int s = poll_store_once(deadline, what);
        if (s < 0)
            continue;
        if (s != last)
            say("backend state %s (%d)", state_name(s), s);
        last = s;
        if (want & (1u << s))
            return s;
        if (s == XenbusStateClosing || s == XenbusStateClosed || s == XenbusStateUnknown)
            backend_gone(s, what);
    }
}

#define STATE(s) (1u << (s))

/* ------------------------------------------------------------ memory and grants */

/* A sealed memfd as specs/ring.md 1 requires: MFD_ALLOW_SEALING, a page
 * multiple, F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL (and no write seal: the
 * daemon maps it read-write). */
static int sealed_memfd(const char *name, size_t size, void **map)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        die("memfd_create: %s", strerror(errno));
    if (ftruncate(fd, (off_t)size) < 0)
        die("ftruncate %s: %s", name, strerror(errno));
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
        die("sealing %s: %s", name, strerror(errno));
    *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (*map == MAP_FAILED)
        die("mmap %s: %s", name, strerror(errno));
    return fd;
}

static void share_memory(const char *kind, int fd)
{
    const char *err = xs_request(PVIO_SHARE_MEMORY, 0, kind, strlen(kind) + 1, &fd, 1, kind);
    if (err)
        die("PVIO_SHARE_MEMORY %s refused: %s", kind, err);
}

/* gnttab_grant_foreign_access_ref: domid and frame, a barrier, then flags. */
static void grant(unsigned ref, unsigned frame, int readonly)
{
    grant_entry_v1_t *e = &dev.gnttab[ref];
    if (ref >= dev.nr_grants || frame >= POOL_PAGES)
        die("internal: grant ref %u / frame %u out of range", ref, frame);
    e->domid = (domid_t)dev.backend_id;
    e->frame = frame;
    wmb();
    __atomic_store_n(&e->flags,
                     (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)),
                     __ATOMIC_RELEASE);
}

/* gnttab_end_foreign_access_ref: CMPXCHG flags to 0 unless the backend still
 * has the page mapped (GTF_reading/GTF_writing). Returns 0 if still in use. */
static int end_access(unsigned ref)
{
    uint16_t *flags = &dev.gnttab[ref].flags;
    uint16_t f = __atomic_load_n(flags, __ATOMIC_ACQUIRE);
    do {
        if (f & (GTF_reading | GTF_writing))
            return 0;
    } while (!__atomic_compare_exchange_n(flags, &f, 0, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    return 1;
}

static unsigned data_pages(void)
{
    return (NSECT * dev.sector_size + PAGE - 1) / PAGE;
}

/* Revoke every grant we made; a page still mapped is reported (and, in a
 * real guest, would be quarantined, never reused). Returns how many failed. */
static int end_all_grants(void)
{
    int stuck = 0;
    unsigned n = dev.sector_size ? data_pages() : 0;
    if (!end_access(RING_REF))
        stuck++;
    for (unsigned i = 0; i < n; i++) {
        stuck += !end_access(WRITE_REF + i);
        stuck += !end_access(READ_REF + i);
    }
    return stuck;
}

/* The backend went away (Closing, Closed or vanished) when it should not
 * have: react as the state machine says (revoke what it no longer maps,
 * Closed), then fail with the reason. */
static void backend_gone(int state, const char *when)
{
    if (!in_teardown) {
        in_teardown = 1;
        int stuck = end_all_grants();
        if (stuck)
            say("%d grant(s) still mapped by the backend; leaving them", stuck);
        if (dev.our_state != XenbusStateClosed)
            set_state(XenbusStateClosed);
    }
    die("the backend went to %s (%d) while waiting for %s%s", state_name(state), state, when,
        state == XenbusStateClosing
            ? " (it refused the connection or is shutting down; see the daemon's log)" : "");
}

/* ------------------------------------------------------------ event channel */

static void notify_backend(void)
{
    uint64_t one = 1;
    if (write(dev.evt_notify, &one, sizeof(one)) != (ssize_t)sizeof(one))
        die("event channel notify: %s", strerror(errno));
    dev.notifications++;
}

/* Sleep until the backend notifies us, the store says something, or the
 * deadline. The store is watched too, so a backend that closes or a daemon
 * that dies is noticed here rather than after a timeout. */
static void check_connected(int s, const char *what)
{
    if (s < 0 || s == XenbusStateConnected)
        return;
    if (s == XenbusStateClosing || s == XenbusStateClosed || s == XenbusStateUnknown)
        backend_gone(s, what);
    die("the backend left Connected for %s (%d) during %s", state_name(s), s, what);
}

static void wait_event(int64_t deadline, const char *what)
{
    if (xs.watch_fired)                 /* an event that came with an earlier reply */
        check_connected(poll_store_once(deadline, what), what);
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            die("timed out after %d s waiting for %s (backend state %s)",
                TIMEOUT_MS / 1000, what, state_name(read_backend_state()));
        struct pollfd p[2] = {
            { .fd = dev.evt_wait, .events = POLLIN },
            { .fd = xs.fd, .events = POLLIN },
        };
        int n = poll(p, 2, (int)left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("poll: %s", strerror(errno));
        }
        if (p[1].revents)
            check_connected(poll_store_once(deadline, what), what);
        if (p[0].revents) {
            uint64_t count;
            /* Non-blocking: EAGAIN means someone consumed it; just re-check. */
            if (read(dev.evt_wait, &count, sizeof(count)) < 0 && errno != EAGAIN)
                die("event channel read: %s", strerror(errno));
            return;
        }
    }
}

/* ------------------------------------------------------------ requests */

struct seg { unsigned ref, first, last; };

static void submit(uint8_t op, uint64_t sector, const struct seg *segs, unsigned nseg)
{
    if (RING_FULL(&dev.front))
        die("internal: ring full");
    unsigned slot = 0;
    while (slot < 32 && dev.shadow[slot].busy)
        slot++;
    if (slot == 32)
        die("internal: too many requests in flight");
    blkif_request_t req;
    memset(&req, 0, sizeof(req));
    req.operation = op;
    req.nr_segments = (uint8_t)nseg;
    req.handle = (blkif_vdev_t)dev.devid;
    req.id = dev.next_id++;
    req.sector_number = sector;
    for (unsigned i = 0; i < nseg; i++) {
        req.seg[i].gref = segs[i].ref;
        req.seg[i].first_sect = (uint8_t)segs[i].first;
        req.seg[i].last_sect = (uint8_t)segs[i].last;
    }
    *RING_GET_REQUEST(&dev.front, dev.front.req_prod_pvt) = req;
    dev.front.req_prod_pvt++;
    dev.shadow[slot].id = req.id;
    dev.shadow[slot].op = op;
    dev.shadow[slot].busy = 1;
    dev.in_flight++;
}

static void push(void)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&dev.front, notify);
    if (notify)
        notify_backend();
}

static const char *op_name(unsigned op)
{
    switch (op) {
    case BLKIF_OP_READ: return "READ";
    case BLKIF_OP_WRITE: return "WRITE";
    case BLKIF_OP_FLUSH_DISKCACHE: return "FLUSH_DISKCACHE";
    default: return "?";
    }
}

/* Collect responses until nothing is in flight. Each response is copied out
 * of the ring once (RING_COPY_RESPONSE) and checked: a known id, the same
 * operation, status OKAY. */
static void complete_all(const char *what)
{
    int64_t deadline = now_ms() + TIMEOUT_MS;
    while (dev.in_flight) {
        RING_IDX rp = dev.front.sring->rsp_prod;
        rmb();                                   /* read responses after rsp_prod */
        if (RING_RESPONSE_PROD_OVERFLOW(&dev.front, rp) ||
            rp - dev.front.rsp_cons > dev.in_flight)
            die("the backend published rsp_prod %u with %u response(s) expected "
                "(rsp_cons %u): broken ring", rp, dev.in_flight, dev.front.rsp_cons);
        for (RING_IDX i = dev.front.rsp_cons; i != rp; i++) {
            blkif_response_t rsp;
            RING_COPY_RESPONSE(&dev.front, i, &rsp);
            unsigned slot = 0;
            while (slot < 32 && !(dev.shadow[slot].busy && dev.shadow[slot].id == rsp.id))
                slot++;
            if (slot == 32)
                die("the backend answered id %" PRIu64 ", which is not in flight", rsp.id);
            if (rsp.operation != dev.shadow[slot].op)
                die("response to id %" PRIu64 " has operation %u, the request was %s",
                    rsp.id, rsp.operation, op_name(dev.shadow[slot].op));
            if (rsp.status != BLKIF_RSP_OKAY)
                die("%s request id %" PRIu64 " failed: status %d (%s)",
                    op_name(rsp.operation), rsp.id, rsp.status,
                    rsp.status == BLKIF_RSP_EOPNOTSUPP ? "EOPNOTSUPP" : "ERROR");
            dev.shadow[slot].busy = 0;
            dev.in_flight--;
        }
        dev.front.rsp_cons = rp;
        if (!dev.in_flight)
            break;
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&dev.front, more);   /* arms rsp_event */
        if (!more)
            wait_event(deadline, what);
    }
}

/* Issue `op` for sectors [first, first + NSECT) through the pages at `frame`
 * (granted as `ref0`...), SECT_PER_REQ sectors per request, all at once. */
static void transfer(uint8_t op, uint64_t first, unsigned ref0)
{
    unsigned ss = dev.sector_size, per_page = PAGE / ss;
    for (unsigned s = 0; s < NSECT; s += SECT_PER_REQ) {
        struct seg segs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
        unsigned nseg = 0, end = s + SECT_PER_REQ < NSECT ? s + SECT_PER_REQ : NSECT;
        for (unsigned k = s; k < end; ) {   /* one segment per page touched */
            unsigned page = k / per_page, in_page = k % per_page;
            unsigned count = per_page - in_page < end - k ? per_page - in_page : end - k;
            segs[nseg].ref = ref0 + page;
            segs[nseg].first = in_page;
            segs[nseg].last = in_page + count - 1;
            nseg++;
            k += count;
        }
        submit(op, first + s, segs, nseg);
    }
    push();
}

/* The pattern: each sector starts with a readable tag; every other byte at
 * absolute disk offset o is (o % 251) ^ (o / 4096) (mod 256). The test
 * recomputes it from the image file. */
static void fill_pattern(uint8_t *buf, uint64_t first)
{
    unsigned ss = dev.sector_size;
    for (unsigned s = 0; s < NSECT; s++) {
        uint8_t *sec = buf + (size_t)s * ss;
        uint64_t base = (first + s) * ss;
        for (unsigned i = 0; i < ss; i++)
            sec[i] = (uint8_t)(((base + i) % 251) ^ ((base + i) / 4096));
        char tag[32];
        memset(tag, 0, sizeof(tag));
        snprintf(tag, sizeof(tag), "pvio c-blkfront sector %" PRIu64, first + s);
        memcpy(sec, tag, sizeof(tag));
    }
}

/* ------------------------------------------------------------ main */

static int is_number(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: PVIO_SOCKET=SOCKET c-blkfront [DEVID]\n"
            "       c-blkfront SOCKET [DEVID]\n"
            "env: PVIO_DOMAIN (default guest), PVIO_SECTOR (default 0)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *sock_path = getenv("PVIO_SOCKET");
    const char *name = getenv("PVIO_DOMAIN");
    const char *devid_arg = NULL;
    uint64_t first = 0;
    char path[300], val[256];

    if (sock_path && !*sock_path)
        sock_path = NULL;
    if (!name || !*name)
        name = "guest";
    for (int i = 1; i < argc; i++) {
        if (is_number(argv[i]) && !devid_arg)
            devid_arg = argv[i];
        else if (!is_number(argv[i]) && !sock_path && argv[i][0] != '-')
            sock_path = argv[i];
        else
            usage();
    }
    if (!sock_path)
        usage();
    if (getenv("PVIO_SECTOR")) {
        if (!is_number(getenv("PVIO_SECTOR")))
            usage();
        first = strtoull(getenv("PVIO_SECTOR"), NULL, 10);
    }

    /* 1. Connect: this connection is our domain. */
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(sock_path) >= sizeof(addr.sun_path))
        die("socket path too long: %s", sock_path);
    strcpy(addr.sun_path, sock_path);
    xs.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (xs.fd < 0 || connect(xs.fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("cannot connect to the pvio store at %s: %s (is `pvio serve` running?)",
            sock_path, strerror(errno));
    say("connected to %s", sock_path);

    /* 2. Guest memory and grant table: sealed memfds, handed over. */
    void *map;
    int pool_fd = sealed_memfd("c-blkfront-pool", (size_t)POOL_PAGES * PAGE, &map);
    dev.pool = map;
    int gnt_fd = sealed_memfd("c-blkfront-gnttab", (size_t)GNTTAB_PAGES * PAGE, &map);
    dev.gnttab = map;
    dev.nr_grants = GNTTAB_PAGES * PAGE / sizeof(grant_entry_v1_t);
    share_memory("pool", pool_fd);
    share_memory("gnttab", gnt_fd);
    say("handed over guest memory (%u pages) and grant table (%u entries)", POOL_PAGES,
        dev.nr_grants);

    /* 3. Claim the domain; the reply is our domid. */
    const char *err = xs_request(PVIO_CLAIM, 0, name, strlen(name) + 1, NULL, 0, "PVIO_CLAIM");
    if (err) {
        const char *why =
            !strcmp(err, "ENOENT") ? "the daemon has no domain of that name" :
            !strcmp(err, "EBUSY") ? "another process has attached it" :
            !strcmp(err, "EACCES") ? "this uid may not claim it" : "refused";
        die("cannot claim domain '%s': %s (%s)", name, err, why);
    }
    char *end;
    unsigned long domid = strtoul(payload, &end, 10);
    if (end == payload || *end)
        die("PVIO_CLAIM reply is not a domid: '%s'", payload);
    say("claimed domain '%s': we are dom%lu", name, domid);

    /* 4. Find the vbd and its backend. */
    if (!devid_arg) {
        snprintf(path, sizeof(path), "/local/domain/%lu/device/vbd", domid);
        err = xs_request(XS_DIRECTORY, 0, path, strlen(path) + 1, NULL, 0, path);
        if (err || hdr.len == 0)
            die("domain '%s' has no vbd device (%s: %s)", name, path, err ? err : "empty");
        if (!is_number(payload))        /* the first child */
            die("unexpected vbd name '%s'", payload);
        dev.devid = (unsigned)strtoul(payload, NULL, 10);
    } else {
        dev.devid = (unsigned)strtoul(devid_arg, NULL, 10);
    }
    snprintf(dev.fe, sizeof(dev.fe), "/local/domain/%lu/device/vbd/%u", domid, dev.devid);
    snprintf(path, sizeof(path), "%s/backend", dev.fe);
    if (xs_read(path, dev.be, sizeof(dev.be)))
        die("domain '%s' has no vbd %u (%s is missing)", name, dev.devid, path);
    snprintf(path, sizeof(path), "%s/backend-id", dev.fe);
    dev.backend_id = (unsigned)xs_read_num(path, 0);
    dev.our_state = XenbusStateInitialising;    /* what the daemon created */
    say("vbd %u: frontend %s, backend %s (dom%u)", dev.devid, dev.fe, dev.be, dev.backend_id);

    /* 5. Watch the backend's state; wait for InitWait (its features are out). */
    char body[600];
    snprintf(path, sizeof(path), "%s/state", dev.be);
    size_t blen = pack2(body, sizeof(body), path, WATCH_TOKEN);
    if ((err = xs_request(XS_WATCH, 0, body, blen, NULL, 0, "WATCH")))
        die("cannot watch %s: %s", path, err);
    wait_backend(STATE(XenbusStateInitWait) | STATE(XenbusStateConnected), "backend InitWait");

    /* 6. The ring: one page of our pool, initialised, granted to the backend. */
    blkif_sring_t *sring = (blkif_sring_t *)(dev.pool + RING_FRAME * PAGE);
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&dev.front, sring, PAGE);
    grant(RING_REF, RING_FRAME, 0);

    /* 7. The event channel: two eventfds, the backend's end first. */
    dev.evt_notify = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);   /* the backend waits on it */
    dev.evt_wait = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);     /* we wait on it */
    if (dev.evt_notify < 0 || dev.evt_wait < 0)
        die("eventfd: %s", strerror(errno));
    int efds[2] = { dev.evt_notify, dev.evt_wait };
    snprintf(val, sizeof(val), "%u", EVTCHN_PORT);
    if ((err = xs_request(PVIO_BIND_EVTCHN, 0, val, strlen(val) + 1, efds, 2,
                          "PVIO_BIND_EVTCHN")))
        die("PVIO_BIND_EVTCHN refused: %s", err);
    say("ring: frame %u, grant ref %u, %u slots; event channel port %u", RING_FRAME, RING_REF,
        RING_SIZE(&dev.front), EVTCHN_PORT);

    /* 8. Publish the transport in one transaction, then Initialised. */
    char ring_ref[16], port[16];
    snprintf(ring_ref, sizeof(ring_ref), "%u", RING_REF);
    snprintf(port, sizeof(port), "%u", EVTCHN_PORT);
    const char *const keys[][2] = {
        { "ring-ref", ring_ref }, { "event-channel", port },
        { "protocol", XEN_IO_PROTO_ABI_X86_64 },
        { "feature-large-sector-size", "1" },   /* we count in sector-size units */
    };
    for (int attempt = 0;; attempt++) {
        if ((err = xs_request(XS_TRANSACTION_START, 0, "", 1, NULL, 0, "TRANSACTION_START")))
            die("TRANSACTION_START: %s", err);
        uint32_t tx = (uint32_t)strtoul(payload, NULL, 10);
        for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
            snprintf(path, sizeof(path), "%s/%s", dev.fe, keys[k][0]);
            if ((err = xs_write(path, keys[k][1], tx)))
                die("cannot write %s: %s", path, err);
        }
        err = xs_request(XS_TRANSACTION_END, tx, "T", 2, NULL, 0, "TRANSACTION_END");
        if (!err)
            break;
        if (strcmp(err, "EAGAIN") || attempt == 4)
            die("TRANSACTION_END: %s", err);
    }
    say("published ring-ref %u, event-channel %u, protocol %s", RING_REF, EVTCHN_PORT,
        XEN_IO_PROTO_ABI_X86_64);
    set_state(XenbusStateInitialised);

    /* 9. Wait for Connected; read the disk's geometry. */
    wait_backend(STATE(XenbusStateConnected), "backend Connected");
    snprintf(path, sizeof(path), "%s/sectors", dev.be);
    dev.sectors = xs_read_num(path, 0);
    snprintf(path, sizeof(path), "%s/sector-size", dev.be);
    dev.sector_size = (unsigned)xs_read_num(path, 512);
    snprintf(path, sizeof(path), "%s/info", dev.be);
    unsigned long long info = xs_read_num(path, 0);
    snprintf(path, sizeof(path), "%s/feature-flush-cache", dev.be);
    dev.flush = xs_read_num(path, 0) == 1;
    if (dev.sector_size < 512 || dev.sector_size > PAGE ||
        (dev.sector_size & (dev.sector_size - 1)))
        die("the backend published a bad sector-size %u", dev.sector_size);
    say("disk: %llu sectors of %u bytes, info %#llx, flush %s", dev.sectors, dev.sector_size,
        info, dev.flush ? "yes" : "no");
    set_state(XenbusStateConnected);
    if (info & VDISK_READONLY)
        die("the disk is read-only (info has VDISK_READONLY); cannot write the test pattern");
    if (first + NSECT > dev.sectors)
        die("sectors %" PRIu64 "..%" PRIu64 " are beyond the disk (%llu sectors)", first,
            first + NSECT - 1, dev.sectors);

    /* 10. Write the pattern: pages granted read-only (the backend only reads them). */
    unsigned npages = data_pages();
    uint8_t *wbuf = dev.pool + WRITE_FRAME * PAGE, *rbuf = dev.pool + READ_FRAME * PAGE;
    fill_pattern(wbuf, first);
    for (unsigned i = 0; i < npages; i++) {
        grant(WRITE_REF + i, WRITE_FRAME + i, 1);
        grant(READ_REF + i, READ_FRAME + i, 0);
    }
    transfer(BLKIF_OP_WRITE, first, WRITE_REF);
    unsigned nreq = dev.in_flight;
    complete_all("WRITE responses");
    say("wrote sectors %" PRIu64 "..%" PRIu64 " (%u requests in flight at once)", first,
        first + NSECT - 1, nreq);

    if (dev.flush) {
        submit(BLKIF_OP_FLUSH_DISKCACHE, 0, NULL, 0);
        push();
        complete_all("FLUSH_DISKCACHE response");
        say("flushed the disk cache");
    }

    /* 11. Read them back into other (zeroed) pages, compare. */
    memset(rbuf, 0, (size_t)npages * PAGE);
    transfer(BLKIF_OP_READ, first, READ_REF);
    complete_all("READ responses");
    size_t nbytes = (size_t)NSECT * dev.sector_size;
    for (size_t i = 0; i < nbytes; i++)
        if (rbuf[i] != wbuf[i])
            die("read-back mismatch at byte %zu of sector %" PRIu64 ": wrote %#x, read %#x",
                i % dev.sector_size, first + i / dev.sector_size, wbuf[i], rbuf[i]);
    say("read back and verified %zu bytes (%u notifications sent)", nbytes,
        dev.notifications);

    /* 12. Close: Closing; the backend unmaps and goes Closing; we revoke our
     * grants (only now, specs/xenbus.md 5) and go Closed. */
    in_teardown = 1;
    set_state(XenbusStateClosing);
    wait_backend(STATE(XenbusStateClosing) | STATE(XenbusStateClosed) |
                 STATE(XenbusStateUnknown), "backend Closing");
    int stuck = end_all_grants();
    if (stuck)
        die("%d grant(s) are still mapped by the backend after it closed", stuck);
    say("revoked all grants");
    set_state(XenbusStateClosed);
    wait_backend(STATE(XenbusStateClosed) | STATE(XenbusStateUnknown), "backend Closed");
    close(dev.evt_wait);
    close(dev.evt_notify);
    close(xs.fd);
    say("ok: device closed");
    return 0;
}
