/* pvio's C ring helpers: the hot loops of io/ring.h, console.h and
 * grant_table.h, so that Python touches batches, never an index or a barrier.
 *
 * Everything a peer can write is read exactly once through a volatile access
 * and then checked (XSA-155: no double fetch). Slots are copied to private
 * memory before anything looks at them (RING_COPY_REQUEST/RESPONSE).
 *
 * Barriers follow io/ring.h: wmb before publishing a producer index, a full mb
 * between publishing and reading the peer's event index (and in FINAL_CHECK),
 * rmb between reading a producer index and reading the slots it covers. */

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/uio.h>

#define PVIO_MB() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define PVIO_WMB() __atomic_thread_fence(__ATOMIC_RELEASE)
#define PVIO_RMB() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define RD32(p) (*(volatile uint32_t *)&(p))
#define WR32(p, v) (*(volatile uint32_t *)&(p) = (v))

#if defined(__x86_64__) || defined(__i386__)
#define PVIO_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define PVIO_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define PVIO_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#define GTF_permit_access 1u
#define GTF_type_mask 3u
#define GTF_readonly (1u << 2)
#define GTF_reading (1u << 3)
#define GTF_writing (1u << 4)
#define GNTST_okay 0
#define GNTST_general_error (-1)
#define GNTST_bad_gntref (-3)
#define GNTST_bad_page (-9)
#define GNTST_bad_copy_arg (-10)
#define PVIO_PAGE 4096u

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spin until *word != seen or spin_ns elapsed. The caller releases the GIL
 * (cffi does for every call). Returns 1 if the word changed. */
static int spin_while_equal(const uint32_t *word, uint32_t seen, uint32_t spin_ns)
{
    uint64_t deadline;
    unsigned i;
    if (*(const volatile uint32_t *)word != seen)
        return 1;
    if (spin_ns == 0)
        return 0;
    deadline = now_ns() + spin_ns;
    for (;;) {
        for (i = 0; i < 64; i++) {
            if (*(const volatile uint32_t *)word != seen)
                return 1;
            PVIO_RELAX();
        }
        if (now_ns() >= deadline)
            return *(const volatile uint32_t *)word != seen;
        /* If the peer shares our CPU, let it run (returns at once when alone). */
        sched_yield();
    }
}

/* __RD32: round down to a power of two. */
static uint32_t rd32(uint32_t x)
{
    uint32_t p = 1;
    if (x == 0)
        return 0;
    while (p <= x / 2)
        p <<= 1;
    return p;
}

uint32_t pvio_ring_nr_ents(uint32_t ring_bytes, uint32_t slot_size)
{
    if (slot_size == 0 || ring_bytes < sizeof(struct pvio_sring_header))
        return 0;
    return rd32((ring_bytes - (uint32_t)sizeof(struct pvio_sring_header)) / slot_size);
}

void pvio_shared_ring_init(void *sring)
{
    struct pvio_sring_header *s = sring;
    WR32(s->req_prod, 0);
    WR32(s->rsp_prod, 0);
    WR32(s->req_event, 1);
    WR32(s->rsp_event, 1);
    memset(s->pvt.pvt_pad, 0, sizeof(s->pvt.pvt_pad));
    memset(s->__pad, 0, sizeof(s->__pad));
}

int pvio_ring_attach(pvio_ring *r, void *sring, uint32_t ring_bytes,
                     uint32_t slot_size, uint32_t start)
{
    uint32_t n = pvio_ring_nr_ents(ring_bytes, slot_size);
    if (n == 0)
        return -EINVAL;
    memset(r, 0, sizeof(*r));
    r->sring = sring;
    r->slots = (uint8_t *)sring + sizeof(struct pvio_sring_header);
    r->nr_ents = n;
    r->slot_size = slot_size;
    r->prod_pvt = start;
    r->cons = start;
    /* No kick yet: the value a peer arms is prod_pvt + 1, which reaches start
     * again only after 2^32 items without a single kick. */
    r->kicked_event = start;
    return 0;
}

int pvio_need_notify(uint32_t old, uint32_t new_, uint32_t event)
{
    return (uint32_t)(new_ - event) < (uint32_t)(new_ - old);
}

/* RING_REQUEST_CONS_OVERFLOW: would consuming at cons overrun the responses? */
int pvio_request_cons_overflow(uint32_t cons, uint32_t rsp_prod_pvt, uint32_t nr_ents)
{
    return (uint32_t)(cons - rsp_prod_pvt) >= nr_ents;
}

/* RING_REQUEST_PROD_OVERFLOW: can the frontend have produced this many? */
int pvio_request_prod_overflow(uint32_t prod, uint32_t rsp_prod_pvt, uint32_t nr_ents)
{
    return (uint32_t)(prod - rsp_prod_pvt) > nr_ents;
}

/* RING_RESPONSE_PROD_OVERFLOW: can the backend have produced this many? */
int pvio_response_prod_overflow(uint32_t prod, uint32_t rsp_cons, uint32_t nr_ents)
{
    return (uint32_t)(prod - rsp_cons) > nr_ents;
}

static void copy_in(pvio_ring *r, uint32_t idx, const uint8_t *src, uint32_t n,
                    uint32_t size)
{
    uint32_t i;
    for (i = 0; i < n; i++)
        memcpy(r->slots + (size_t)((idx + i) & (r->nr_ents - 1)) * r->slot_size,
               src + (size_t)i * size, size);
}

/* RING_COPY_*: one volatile-free memcpy per slot into private memory; the
 * compiler cannot re-read the shared slot later because nothing refers to it. */
static void copy_out(pvio_ring *r, uint32_t idx, uint8_t *dst, uint32_t n,
                     uint32_t size)
{
    uint32_t i;
    for (i = 0; i < n; i++)
        memcpy(dst + (size_t)i * size,
               r->slots + (size_t)((idx + i) & (r->nr_ents - 1)) * r->slot_size, size);
    __asm__ __volatile__("" ::: "memory");
}

/* ---------------------------------------------------------------- front */

uint32_t pvio_front_free_requests(pvio_ring *r)
{
    return r->nr_ents - (r->prod_pvt - r->cons);
}

uint32_t pvio_front_unconsumed_responses(pvio_ring *r)
{
    return RD32(r->sring->rsp_prod) - r->cons;
}

uint32_t pvio_front_put_requests(pvio_ring *r, const uint8_t *src, uint32_t n,
                                 uint32_t req_size)
{
    uint32_t space = pvio_front_free_requests(r);
    if (n > space)
        n = space;
    copy_in(r, r->prod_pvt, src, n, req_size);
    r->prod_pvt += n;
    return n;
}

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY */
int pvio_front_push_requests(pvio_ring *r)
{
    uint32_t old = RD32(r->sring->req_prod);
    uint32_t new_ = r->prod_pvt;
    int notify;
    PVIO_WMB();
    WR32(r->sring->req_prod, new_);
    PVIO_MB();
    notify = pvio_need_notify(old, new_, RD32(r->sring->req_event));
    if (notify)
        r->notify_sent++;
    else if (new_ != old)
        r->notify_suppressed++;
    return notify;
}

/* Consume up to max responses into dst. Checks RING_RESPONSE_PROD_OVERFLOW on
 * the one value of rsp_prod read; -1 once the backend broke the ring. */
int64_t pvio_front_take_responses(pvio_ring *r, uint8_t *dst, uint32_t max,
                                  uint32_t rsp_size)
{
    uint32_t prod, n;
    if (r->error)
        return -1;
    prod = RD32(r->sring->rsp_prod);
    PVIO_RMB();
    n = prod - r->cons;
    /* Responses can only answer requests we produced: stricter than
     * RING_RESPONSE_PROD_OVERFLOW alone, which it includes. */
    if (pvio_response_prod_overflow(prod, r->cons, r->nr_ents) ||
        n > r->prod_pvt - r->cons) {
        r->error = PVIO_RING_E_RSP_PROD_OVERFLOW;
        r->bad_prod = prod;
        return -1;
    }
    if (n > max)
        n = max;
    copy_out(r, r->cons, dst, n, rsp_size);
    r->cons += n;
    return n;
}

/* RING_FINAL_CHECK_FOR_RESPONSES */
uint32_t pvio_front_final_check(pvio_ring *r)
{
    uint32_t work = RD32(r->sring->rsp_prod) - r->cons;
    if (work)
        return work;
    WR32(r->sring->rsp_event, r->cons + 1);
    PVIO_MB();
    return RD32(r->sring->rsp_prod) - r->cons;
}

int pvio_front_spin(pvio_ring *r, uint32_t spin_ns)
{
    return spin_while_equal(&r->sring->rsp_prod, r->cons, spin_ns);
}

/* ----------------------------------------------------------------- back */

/* XEN_RING_NR_UNCONSUMED_REQUESTS */
uint32_t pvio_back_unconsumed_requests(pvio_ring *r)
{
    uint32_t req = RD32(r->sring->req_prod) - r->cons;
    uint32_t rsp = r->nr_ents - (r->cons - r->prod_pvt);
    return req < rsp ? req : rsp;
}

/* Consume up to max requests into dst. Checks RING_REQUEST_PROD_OVERFLOW on
 * the one value of req_prod read, and never consumes past
 * RING_REQUEST_CONS_OVERFLOW; -1 once the frontend broke the ring. */
int64_t pvio_back_take_requests(pvio_ring *r, uint8_t *dst, uint32_t max,
                                uint32_t req_size)
{
    uint32_t prod, n, room;
    if (r->error)
        return -1;
    prod = RD32(r->sring->req_prod);
    PVIO_RMB();
    if (pvio_request_prod_overflow(prod, r->prod_pvt, r->nr_ents)) {
        r->error = PVIO_RING_E_REQ_PROD_OVERFLOW;
        r->bad_prod = prod;
        return -1;
    }
    n = prod - r->cons;
    room = r->nr_ents - (r->cons - r->prod_pvt);
    if (n > room) {
        /* prod is behind req_cons: the index went backwards. */
        r->error = PVIO_RING_E_CONS_OVERFLOW;
        r->bad_prod = prod;
        return -1;
    }
    if (n > max)
        n = max;
    copy_out(r, r->cons, dst, n, req_size);
    r->cons += n;
    return n;
}

uint32_t pvio_back_put_responses(pvio_ring *r, const uint8_t *src, uint32_t n,
                                 uint32_t rsp_size)
{
    uint32_t owed = r->cons - r->prod_pvt;  /* requests consumed, not yet answered */
    if (n > owed)
        n = owed;
    copy_in(r, r->prod_pvt, src, n, rsp_size);
    r->prod_pvt += n;
    return n;
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY */
int pvio_back_push_responses(pvio_ring *r)
{
    uint32_t old = RD32(r->sring->rsp_prod);
    uint32_t new_ = r->prod_pvt;
    int notify;
    PVIO_WMB();
    WR32(r->sring->rsp_prod, new_);
    PVIO_MB();
    notify = pvio_need_notify(old, new_, RD32(r->sring->rsp_event));
    if (notify)
        r->notify_sent++;
    else if (new_ != old)
        r->notify_suppressed++;
    return notify;
}

/* RING_FINAL_CHECK_FOR_REQUESTS */
uint32_t pvio_back_final_check(pvio_ring *r)
{
    uint32_t work = pvio_back_unconsumed_requests(r);
    if (work)
        return work;
    WR32(r->sring->req_event, r->cons + 1);
    PVIO_MB();
    return pvio_back_unconsumed_requests(r);
}

int pvio_back_spin(pvio_ring *r, uint32_t spin_ns)
{
    return spin_while_equal(&r->sring->req_prod, r->cons, spin_ns);
}

/* ------------------------------------------------------- event channels */

/* An event channel end is an eventfd that both peers share, open file
 * description (and so O_NONBLOCK) included. None of these calls may block on
 * the peer's say-so, and none raises a Python exception on the hot path:
 * they return -errno and the Python wrapper raises. */

/* Clear a pending event: 1 if one was pending, 0 if not, -errno on error.
 * RWF_NOWAIT keeps the read non-blocking even if the peer cleared O_NONBLOCK. */
int pvio_evtchn_consume(int fd)
{
    uint64_t counter;
    struct iovec io = {&counter, sizeof counter};
    ssize_t n = preadv2(fd, &io, 1, -1, RWF_NOWAIT);
    if (n == (ssize_t)sizeof counter)
        return 1;
    if (n >= 0)
        return -EIO;
    return errno == EAGAIN ? 0 : -errno;
}

/* ---------------------------------------------------------- send guard
 *
 * The peer shares the eventfd we write to, so it can clear O_NONBLOCK and
 * saturate the counter between our poll(POLLOUT) and our write: the write then
 * waits until the peer reads, which a hostile peer never does, and the thread
 * (a daemon's whole event loop) is stuck. No flag or call makes one eventfd
 * write non-blocking on our side (pwritev2 RWF_NOWAIT: EOPNOTSUPP), so the
 * guard bounds the wait instead: each write records when it started, and a
 * watchdog thread (pvio_send_guard_start) interrupts with a signal a write
 * that has waited longer than the timeout. The write then fails with EINTR,
 * which only a waiting eventfd write can return (eventfd_write looks for
 * signals only inside its wait), and the send fails with -ETIMEDOUT: the
 * caller disconnects that peer.
 *
 * A signal sent just as the write completed must not interrupt a later call
 * of that thread: the watchdog decides and signals under the slot's lock, the
 * writer clears its slot under the same lock, and a writer that was signalled
 * but not interrupted takes the signal while it is blocked (sigtimedwait).
 *
 * The watchdog scans every half timeout while sends happen and parks on a
 * futex after a second without any, so an idle process is never woken; the
 * first send after that wakes it (one syscall). Cost per send otherwise: a
 * vDSO clock read, an uncontended lock and a few atomic operations. */
#include <linux/futex.h>
#include <sys/syscall.h>

#define PVIO_GUARD_SLOTS 128
#define PVIO_GUARD_IDLE_NS 1000000000ull

struct pvio_guard_slot {
    pthread_mutex_t lock;
    _Atomic uint64_t since;  /* ns (CLOCK_MONOTONIC) the write began; 0: none */
    _Atomic int used;
    int signalled;           /* under lock: the watchdog signalled this write */
    pthread_t thread;
};

static struct pvio_guard_slot guard_slots[PVIO_GUARD_SLOTS];
static _Atomic int guard_signo;  /* 0: the guard is off */
static _Atomic int64_t guard_timeout_ns;
static _Atomic uint64_t guard_sends;   /* sends begun: the watchdog's sign of life */
static _Atomic int guard_parked;
static _Atomic uint64_t guard_fired;   /* writes the guard ended (EINTR) */
static _Atomic uint32_t guard_bell;    /* futex word the parked watchdog sleeps on */
static int guard_key_made;
static pthread_key_t guard_key;
static __thread struct pvio_guard_slot *guard_mine;
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;

static void guard_interrupt(int signo) { (void)signo; }

static void guard_release(void *p)
{
    struct pvio_guard_slot *slot = p;
    pthread_mutex_lock(&slot->lock);
    atomic_store(&slot->since, 0);
    atomic_store(&slot->used, 0);
    pthread_mutex_unlock(&slot->lock);
}

/* The child of a fork has no watchdog: the guard is off there, and may be
 * started again; the slots of the parent's threads are free. */
static void guard_after_fork(void)
{
    atomic_store(&guard_signo, 0);
    atomic_store(&guard_parked, 0);
    guard_mine = NULL;
    if (guard_key_made)  /* or this thread's exit would free a slot another owns */
        pthread_setspecific(guard_key, NULL);
    pthread_mutex_init(&guard_lock, NULL);
    for (int i = 0; i < PVIO_GUARD_SLOTS; i++) {
        pthread_mutex_init(&guard_slots[i].lock, NULL);
        atomic_store(&guard_slots[i].since, 0);
        atomic_store(&guard_slots[i].used, 0);
        guard_slots[i].signalled = 0;
    }
}

static struct pvio_guard_slot *guard_slot(void)
{
    if (guard_mine == NULL) {
        for (int i = 0; i < PVIO_GUARD_SLOTS; i++) {
            int free_ = 0;
            if (atomic_compare_exchange_strong(&guard_slots[i].used, &free_, 1)) {
                pthread_mutex_lock(&guard_slots[i].lock);
                guard_slots[i].thread = pthread_self();
                guard_slots[i].signalled = 0;
                pthread_mutex_unlock(&guard_slots[i].lock);
                pthread_setspecific(guard_key, &guard_slots[i]);
                guard_mine = &guard_slots[i];
                break;
            }
        }
    }
    return guard_mine;  /* NULL if more than PVIO_GUARD_SLOTS threads send: unguarded */
}

/* A write that began before our clock read and has waited longer than the
 * timeout (one that began after it looks 2^64 ns old in u64). */
static int guard_overdue(uint64_t since, uint64_t now, int64_t timeout)
{
    return since && since < now && now - since > (uint64_t)timeout;
}

static void *guard_watch(void *arg)
{
    uint64_t seen = atomic_load(&guard_sends), quiet_since = now_ns();
    (void)arg;
    for (;;) {
        int64_t timeout = atomic_load(&guard_timeout_ns);
        struct timespec nap = {(time_t)(timeout / 2000000000), (long)(timeout / 2 % 1000000000)};
        uint64_t now, sends;
        int busy = 0;
        nanosleep(&nap, NULL);
        now = now_ns();
        for (int i = 0; i < PVIO_GUARD_SLOTS; i++) {
            struct pvio_guard_slot *slot = &guard_slots[i];
            uint64_t since = atomic_load(&slot->since);
            if (!since)
                continue;
            busy = 1;
            if (!guard_overdue(since, now, timeout))
                continue;
            /* Again at every scan while the same write is overdue: a signal that
             * reached the thread before it entered write(2) (it was preempted
             * there) ran the handler and was gone, and the write then waits. */
            pthread_mutex_lock(&slot->lock);  /* the writer clears since under it */
            if (atomic_load(&slot->since) == since) {
                slot->signalled = 1;
                pthread_kill(slot->thread, atomic_load(&guard_signo));
            }
            pthread_mutex_unlock(&slot->lock);
        }
        sends = atomic_load(&guard_sends);
        if (sends != seen || busy) {
            seen = sends;
            quiet_since = now;
        } else if (now - quiet_since > PVIO_GUARD_IDLE_NS) {
            uint32_t bell = atomic_load(&guard_bell);
            atomic_store(&guard_parked, 1);
            if (atomic_load(&guard_sends) == seen)  /* else a sender missed the flag */
                syscall(SYS_futex, &guard_bell, FUTEX_WAIT_PRIVATE, bell, NULL, NULL, 0);
            atomic_store(&guard_parked, 0);
            seen = atomic_load(&guard_sends);
            quiet_since = now_ns();
        }
    }
    return NULL;
}

/* Start the send guard (once per process; again with the same signal: a new
 * timeout). signo gets a handler that does nothing, installed without
 * SA_RESTART so that it interrupts the write. 0, -EBUSY (running with another
 * signal) or -errno. */
int pvio_send_guard_start(int signo, int64_t timeout_ns)
{
    int rc = 0;
    if (timeout_ns < 1000000 || signo <= 0 || signo >= NSIG)
        return -EINVAL;
    pthread_mutex_lock(&guard_lock);
    if (atomic_load(&guard_signo) && signo != atomic_load(&guard_signo)) {
        rc = -EBUSY;
    } else if (!atomic_load(&guard_signo)) {
        struct sigaction sa;
        sigset_t all, old;
        pthread_t watcher;
        pthread_attr_t attr;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = guard_interrupt;
        sigemptyset(&sa.sa_mask);
        if (sigaction(signo, &sa, NULL))
            rc = -errno;
        else if (!guard_key_made && (rc = -pthread_key_create(&guard_key, guard_release)) == 0)
            guard_key_made = 1;
        if (!rc) {
            static int atfork_set;
            if (!atfork_set && (rc = -pthread_atfork(NULL, NULL, guard_after_fork)) == 0)
                atfork_set = 1;
        }
        if (!rc) {
            atomic_store(&guard_timeout_ns, timeout_ns);
            /* The watchdog takes no process signal: it must not steal a
             * handler's run from the threads that wait for one. */
            sigfillset(&all);
            pthread_sigmask(SIG_SETMASK, &all, &old);
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            rc = -pthread_create(&watcher, &attr, guard_watch, NULL);
            pthread_attr_destroy(&attr);
            pthread_sigmask(SIG_SETMASK, &old, NULL);
        }
        if (!rc)
            atomic_store(&guard_signo, signo);  /* started */
    } else {
        atomic_store(&guard_timeout_ns, timeout_ns);
    }
    pthread_mutex_unlock(&guard_lock);
    return rc;
}

/* How many writes the guard has ended (interrupted after the timeout) since the
 * process started. A write that was only late (its thread preempted on a busy
 * machine) is signalled too, completes, and is not counted. */
uint64_t pvio_send_guard_fired(void)
{
    return atomic_load(&guard_fired);
}

/* Signals the watchdog sent for a write that is over: take every one still
 * pending now, while the signal is blocked, rather than let one interrupt a
 * later call of this thread (a real-time signal queues: one per scan). */
static void guard_take_signal(int signo)
{
    sigset_t set, old;
    struct timespec zero = {0, 0};
    sigemptyset(&set);
    sigaddset(&set, signo);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    while (sigtimedwait(&set, NULL, &zero) >= 0 || errno == EINTR)
        ;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Tests only: sleep this long between marking a write and starting it, so
 * that the watchdog's signal lands before write(2) (a preempted writer). */
static _Atomic int64_t guard_test_pause_ns;

void pvio_send_guard_test_pause(int64_t ns)
{
    atomic_store(&guard_test_pause_ns, ns);
}

/* Add 1 to an eventfd, under the send guard if it runs. A counter at its
 * limit with O_NONBLOCK set means an event is pending already (0). 0, or
 * -ETIMEDOUT (the write waited: the peer blocked it), or -errno. */
int pvio_evtchn_write(int fd)
{
    int signo = atomic_load_explicit(&guard_signo, memory_order_relaxed);
    struct pvio_guard_slot *slot = signo ? guard_slot() : NULL;
    uint64_t one = 1;
    ssize_t n;
    int err, signalled = 0;
    if (slot) {
        atomic_store(&slot->since, now_ns() | 1);
        atomic_fetch_add(&guard_sends, 1);
        if (atomic_load(&guard_parked)) {
            atomic_store(&guard_parked, 0);
            atomic_fetch_add(&guard_bell, 1);
            syscall(SYS_futex, &guard_bell, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        }
        int64_t ns = atomic_load_explicit(&guard_test_pause_ns, memory_order_relaxed);
        if (ns > 0) {
            struct timespec pause = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
            nanosleep(&pause, NULL);  /* the signal lands here, its handler runs */
        }
    }
    n = write(fd, &one, sizeof one);
    err = errno;
    if (slot) {
        pthread_mutex_lock(&slot->lock);
        atomic_store(&slot->since, 0);
        signalled = slot->signalled;
        slot->signalled = 0;
        pthread_mutex_unlock(&slot->lock);
        if (signalled) {
            if (n < 0 && err == EINTR)
                atomic_fetch_add(&guard_fired, 1);
            guard_take_signal(signo);  /* the rest (late, preempted, or several scans) */
        }
    }
    if (n == (ssize_t)sizeof one)
        return 0;
    if (n >= 0)
        return -EIO;
    if (err == EINTR)
        return -ETIMEDOUT;
    return err == EAGAIN ? 0 : -err;
}

/* EVTCHNOP_send: add 1 to the peer's eventfd. A counter the peer saturated
 * means an event is pending already (0, as for a sent one); the write is only
 * tried when poll says it cannot block, so a peer that cleared O_NONBLOCK
 * cannot stall us, except in the race the send guard bounds. 0 on success,
 * -ETIMEDOUT (see pvio_evtchn_write), -errno on error (a closed fd: -EBADF). */
int pvio_evtchn_send(int fd)
{
    struct pollfd p = {fd, POLLOUT, 0};
    int rc;
    while ((rc = poll(&p, 1, 0)) < 0 && errno == EINTR)
        ;
    if (rc < 0)
        return -errno;
    if (p.revents & POLLNVAL)
        return -EBADF;
    if (!(p.revents & POLLOUT))
        return 0;
    return pvio_evtchn_write(fd);
}

/* ppoll fd for POLLIN until deadline (timeout_ns < 0: forever). 1: readable,
 * 0: timed out, -errno (-EINTR: a signal). */
static int poll_in(int fd, int64_t timeout_ns, uint64_t deadline)
{
    struct pollfd p = {fd, POLLIN, 0};
    struct timespec ts, *tsp = NULL;
    int rc;
    if (timeout_ns >= 0) {
        uint64_t now = now_ns();
        uint64_t left = now < deadline ? deadline - now : 0;
        ts.tv_sec = (time_t)(left / 1000000000u);
        ts.tv_nsec = (long)(left % 1000000000u);
        tsp = &ts;
    }
    rc = ppoll(&p, 1, tsp, NULL);
    if (rc < 0)
        return -errno;
    if (rc == 0)
        return 0;
    if (p.revents & POLLNVAL)
        return -EBADF;
    return 1;
}

/* Sleep until the eventfd is readable, then consume the event (as
 * pvio_evtchn_consume). timeout_ns < 0 waits forever; 0 only looks. Poll comes
 * first: a sleeper pays poll + read, never a failed read before the poll.
 * 1: an event was consumed; 0: timed out; -EINTR: a signal arrived (the
 * caller lets its handlers run and calls again with the time left); -errno:
 * error. The GIL is released (cffi does for every call). */
int pvio_evtchn_wait(int fd, int64_t timeout_ns)
{
    uint64_t deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : 0;
    int rc;
    for (;;) {
        rc = poll_in(fd, timeout_ns, deadline);
        if (rc <= 0)
            return rc;
        rc = pvio_evtchn_consume(fd);
        if (rc != 0)
            return rc;
        /* Readable, yet someone else cleared it first: sleep again. */
    }
}

/* Wake-ahead's test: the peer has consumed everything this end produced and
 * armed its event index for the next item (io/ring.h RING_FINAL_CHECK_FOR_*:
 * event = cons + 1), and was not kicked for that armed value yet. A peer
 * kicked while we work re-arms the same value when it goes back to sleep;
 * kicking it again for every later wake-up of ours would make it wake once
 * per wake-up without work, until its spurious-event budget throttles it
 * (a backend that answers late wakes once per request). While backing off
 * (kick_peer), an armed value passed over counts as one skipped kick and is
 * recorded too, so a late answer's wake-ups do not use up the skips. */
static int kick_wanted(pvio_ring *r, int back)
{
    uint32_t event = back ? RD32(r->sring->rsp_event) : RD32(r->sring->req_event);
    if (r->error || event != r->prod_pvt + 1 || event == r->kicked_event)
        return 0;
    r->kicked_event = event;
    if (r->kick_skip) {
        r->kick_skip--;
        return 0;
    }
    return 1;
}

/* The cap trades two costs. Pinned to one CPU, every probe is a wasted kick
 * (a probe per 257 armed values stays under 0.4% of round trips, clear of
 * p99). When two ends the scheduler put on one CPU for a while are spread
 * again, halving from the cap takes about twice the cap in armed values to
 * kick again: ~20 ms at depth 1 on two vCPUs with 256, ~90 ms with 1024,
 * which cost the depth-1 p99 whenever the load moved (pvio bench ring with
 * --slices 32: p99 vs socketpair, median of 6 and 5 runs, 1.05 -> 1.01). */
#define PVIO_KICK_BACKOFF_MAX 256

/* Kick the peer (wake-ahead), then look whether the kick is still pending.
 * A peer on another CPU is still waking up: pending, the kick pays. A peer
 * that shares our CPU (pinned, or put there by the scheduler while another
 * process keeps the other CPUs busy) was switched to at once, found nothing,
 * took the event and slept again before we ran on: two context switches for
 * nothing, which halved the depth-1 round-trip rate on one CPU. Then back
 * off: pass over the next 1, 2, 4 ... 256 armed values without a kick, and
 * try again; a kick found pending halves the back-off. */
static void kick_peer(pvio_ring *r, int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    int rc = pvio_evtchn_send(fd);
    if (rc == -ETIMEDOUT) {  /* the peer blocked the kick: no more of them */
        r->kick_backoff = r->kick_skip = UINT32_MAX;
        return;
    }
    if (rc != 0)
        return;
    r->wake_ahead_sent++;
    rc = poll(&p, 1, 0);
    if (rc < 0 || (p.revents & POLLNVAL))
        return;  /* no verdict */
    if (rc > 0) {
        r->kick_backoff /= 2;  /* one pending kick is weak evidence: a peer on */
        return;                /* our CPU may simply not have run yet */
    }
    r->wake_ahead_wasted++;
    r->kick_backoff = r->kick_backoff ? r->kick_backoff * 2 : 1;
    if (r->kick_backoff > PVIO_KICK_BACKOFF_MAX)
        r->kick_backoff = PVIO_KICK_BACKOFF_MAX;
    r->kick_skip = r->kick_backoff;
}

/* The consumer's whole sleep (RING_FINAL_CHECK_FOR_*, then the event
 * channel, then the check again) in one call, so that a wake-up reaches the
 * caller without a detour through Python: the queue-depth-1 round trip pays
 * two of them. back selects the end (0: front, waits for responses; 1: back,
 * waits for requests); fd is the end's own eventfd.
 *
 * A wake-up that finds work returns at once and leaves the event in the
 * eventfd (*stale = 1): reading it would put a syscall between the wake-up
 * and the caller's work. The next sleep clears it before it arms the event
 * index and re-checks, so nothing is lost: a notification merged into the
 * cleared counter was sent after its work was published, and the check that
 * follows the clearing sees that work.
 *
 * Wake-ahead (ahead_fd >= 0, the peer's eventfd; a pvio extension, Xen has
 * no such thing): a wake-up that finds work also kicks the peer at once if
 * it has armed its event index for the very next item this end will produce
 * (rsp_event, or req_event, == our prod_pvt + 1: it consumed all we gave it
 * and sleeps, or is about to, until we give it more). Its CPU, halted while
 * idle, then wakes while we do the work, and the notification that follows
 * finds it awake. Waking a halted vCPU costs the notifier ~8 us and the
 * sleeper ~20 us on a 2-vCPU VM; a kicked one ~1.5 us: this is what makes
 * an AF_UNIX socketpair fast at depth 1 (a read wakes the writer's wait
 * queue, unix_write_space). The kick is a spurious event to the peer, which
 * the protocol allows; only a wake-up with work sends one, so two ends that
 * both do it cannot kick each other in a loop, and at most one is sent per
 * value the peer arms (kick_wanted), so a peer gets at most one spurious
 * wake-up per batch of items it consumes. Kicks a peer on our own CPU takes
 * at once are wasted: then wake-ahead backs off (kick_peer).
 *
 * Returns PVIO_SLEEP_WORK (work was there, no sleep), PVIO_SLEEP_WOKE_WORK,
 * PVIO_SLEEP_WOKE_IDLE (an event, but no work: spurious, and cleared), 0 on
 * timeout, or -errno (-EINTR: a signal; call again). */
int pvio_ring_sleep(pvio_ring *r, int back, int fd, int *stale, int ahead_fd,
                    int64_t timeout_ns)
{
    uint32_t (*check)(pvio_ring *) = back ? pvio_back_final_check : pvio_front_final_check;
    uint64_t deadline;
    int rc;
    for (;;) {
        if (check(r))
            return PVIO_SLEEP_WORK;
        if (!*stale)
            break;
        rc = pvio_evtchn_consume(fd);
        if (rc < 0)
            return rc;
        *stale = 0;
    }
    deadline = timeout_ns >= 0 ? now_ns() + (uint64_t)timeout_ns : 0;
    for (;;) {
        rc = poll_in(fd, timeout_ns, deadline);
        if (rc <= 0)
            return rc;
        *stale = 1;
        if (check(r)) {
            if (ahead_fd >= 0 && kick_wanted(r, back))
                kick_peer(r, ahead_fd);
            return PVIO_SLEEP_WOKE_WORK;
        }
        rc = pvio_evtchn_consume(fd);
        if (rc < 0)
            return rc;
        *stale = 0;
        if (rc > 0)
            return PVIO_SLEEP_WOKE_IDLE;
        /* Readable, yet someone else cleared it first: sleep again. */
    }
}

/* ----------------------------------------------------------- byte rings */

void pvio_bytering_attach(pvio_bytering *b, uint8_t *buf, uint32_t size,
                          uint32_t *prod, uint32_t *cons, int writer)
{
    memset(b, 0, sizeof(*b));
    b->buf = buf;
    b->size = size;
    b->prod = prod;
    b->cons = cons;
    b->pvt = writer ? RD32(*prod) : RD32(*cons);
}

/* Writer: copy as much of src as fits, publish prod. -1 if the reader's
 * index claims more data than the buffer holds (console.h "prod - cons >
 * sizeof(buffer)" check). */
int64_t pvio_bytering_write(pvio_bytering *b, const uint8_t *src, uint32_t len)
{
    uint32_t cons, used, n, at, first;
    if (b->error)
        return -1;
    cons = RD32(*b->cons);
    PVIO_MB();
    used = b->pvt - cons;
    if (used > b->size) {
        b->error = PVIO_RING_E_BYTES_GAP;
        b->bad_index = cons;
        return -1;
    }
    n = b->size - used;
    if (n > len)
        n = len;
    at = b->pvt & (b->size - 1);
    first = b->size - at;
    if (first > n)
        first = n;
    memcpy(b->buf + at, src, first);
    memcpy(b->buf, src + first, n - first);
    PVIO_WMB();
    b->pvt += n;
    WR32(*b->prod, b->pvt);
    return n;
}

/* Reader: copy up to max bytes out, publish cons. -1 on a bogus prod. */
int64_t pvio_bytering_read(pvio_bytering *b, uint8_t *dst, uint32_t max)
{
    uint32_t prod, avail, n, at, first;
    if (b->error)
        return -1;
    prod = RD32(*b->prod);
    PVIO_MB();
    avail = prod - b->pvt;
    if (avail > b->size) {
        b->error = PVIO_RING_E_BYTES_GAP;
        b->bad_index = prod;
        return -1;
    }
    n = avail < max ? avail : max;
    at = b->pvt & (b->size - 1);
    first = b->size - at;
    if (first > n)
        first = n;
    memcpy(dst, b->buf + at, first);
    memcpy(dst + first, b->buf, n - first);
    PVIO_MB();
    b->pvt += n;
    WR32(*b->cons, b->pvt);
    return n;
}

/* Bytes waiting (reader) or free space (writer is not covered: use size -
 * pending on the writer's own view). -1 on a bogus peer index. */
int64_t pvio_bytering_pending(pvio_bytering *b)
{
    uint32_t prod = RD32(*b->prod), cons = RD32(*b->cons), d = prod - cons;
    return d > b->size ? -1 : (int64_t)d;
}

int pvio_bytering_spin(pvio_bytering *b, uint32_t spin_ns)
{
    return spin_while_equal(b->prod, b->pvt, spin_ns);
}

/* DEFINE_XEN_FLEX_RING's name##_queued, for the differential tests and for
 * flex-ring users that need its exact "masked equal means full" answer. */
uint32_t pvio_flex_queued(uint32_t prod, uint32_t cons, uint32_t ring_size)
{
    if (prod == cons)
        return 0;
    prod &= ring_size - 1;
    cons &= ring_size - 1;
    if (prod == cons)
        return ring_size;
    return prod > cons ? prod - cons : ring_size - (cons - prod);
}

/* ---------------------------------------------------------- grant table */

static struct pvio_grant_entry_v1 *gnt_entry(uint8_t *table, uint32_t ref)
{
    return (struct pvio_grant_entry_v1 *)(table
                                          + (size_t)ref * sizeof(struct pvio_grant_entry_v1));
}

/* pvio_gnt_pin's CMPXCHG word: flags in its low half, domid in its high half. */
_Static_assert(offsetof(struct pvio_grant_entry_v1, flags) == 0
               && offsetof(struct pvio_grant_entry_v1, domid) == 2,
               "grant_entry_v1: flags then domid, one 32-bit word");

/* Granter: domid and frame first, wmb, then flags (grant_table.h). */
void pvio_gnt_grant(uint8_t *table, uint32_t ref, uint16_t domid, uint32_t frame,
                    int readonly)
{
    struct pvio_grant_entry_v1 *e = gnt_entry(table, ref);
    *(volatile uint16_t *)&e->domid = domid;
    WR32(e->frame, frame);
    PVIO_WMB();
    __atomic_store_n(&e->flags,
                     (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)),
                     __ATOMIC_RELEASE);
}

/* Granter: revoke an unused entry with CMPXCHG on flags; fails (returns 0)
 * while the mapper holds GTF_reading/GTF_writing (Linux
 * gnttab_end_foreign_access_ref_v1). */
int pvio_gnt_end_access(uint8_t *table, uint32_t ref)
{
    uint16_t *pflags = &gnt_entry(table, ref)->flags;
    uint16_t flags = __atomic_load_n(pflags, __ATOMIC_ACQUIRE);
    do {
        if (flags & (GTF_reading | GTF_writing))
            return 0;
    } while (!__atomic_compare_exchange_n(pflags, &flags, 0, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_ACQUIRE));
    return 1;
}

/* Granter: writable -> read-only, only while no writer holds it. */
int pvio_gnt_make_readonly(uint8_t *table, uint32_t ref)
{
    uint16_t *pflags = &gnt_entry(table, ref)->flags;
    uint16_t flags = __atomic_load_n(pflags, __ATOMIC_ACQUIRE);
    do {
        if (flags & GTF_writing)
            return 0;
    } while (!__atomic_compare_exchange_n(pflags, &flags, flags | GTF_readonly, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE));
    return 1;
}

/* Mapper: validate the entry and set GTF_reading (and GTF_writing) in one
 * CMPXCHG on the flags+domid word, as Xen's _set_status_v1 does, so that the
 * check and the pin see the same entry. Pins are counted privately by the
 * mapper; the shared flags are only a signal to the granter. */
int32_t pvio_gnt_pin(uint8_t *table, uint32_t nr, uint32_t ref, uint16_t domid,
                     int writable, uint32_t nr_frames, uint32_t *rd_pins,
                     uint32_t *wr_pins, uint32_t *frame_out)
{
    uint32_t *word, scombo, nscombo, frame;
    int retries = 0;
    if (ref >= nr)
        return GNTST_bad_gntref;
    word = (uint32_t *)gnt_entry(table, ref);
    scombo = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        uint32_t flags = scombo & 0xffffu, sdom = scombo >> 16;
        if ((flags & GTF_type_mask) != GTF_permit_access || sdom != domid)
            return GNTST_general_error;
        nscombo = scombo | GTF_reading;
        if (writable) {
            if (flags & GTF_readonly)
                return GNTST_general_error;
            nscombo |= GTF_writing;
        }
        if (__atomic_compare_exchange_n(word, &scombo, nscombo, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_ACQUIRE))
            break;
        if (++retries == 4)  /* "Shared grant entry is unstable" */
            return GNTST_general_error;
    }
    rd_pins[ref]++;
    if (writable)
        wr_pins[ref]++;
    PVIO_RMB();
    frame = RD32(gnt_entry(table, ref)->frame);
    if (frame >= nr_frames) {  /* Xen's get_paged_frame: not a page of the granter */
        pvio_gnt_unpin(table, ref, writable, rd_pins, wr_pins);
        return GNTST_bad_page;
    }
    *frame_out = frame;
    return GNTST_okay;
}

void pvio_gnt_unpin(uint8_t *table, uint32_t ref, int writable,
                    uint32_t *rd_pins, uint32_t *wr_pins)
{
    uint16_t *pflags = &gnt_entry(table, ref)->flags;
    uint16_t clear = 0;
    if (writable && wr_pins[ref] && --wr_pins[ref] == 0)
        clear |= GTF_writing;
    if (rd_pins[ref] && --rd_pins[ref] == 0)
        clear |= GTF_reading | GTF_writing;
    if (clear)
        __atomic_fetch_and(pflags, (uint16_t)~clear, __ATOMIC_SEQ_CST);
}

/* GNTTABOP_copy between granted pages and local buffers. Each element gets
 * its own status; a failed element does not stop the others (XSA-361 style:
 * the caller checks every status). */
/* One GNTTABOP_copy element: check, pin, copy, unpin; its GNTST code. */
static int32_t gnt_copy_one(uint8_t *table, uint32_t nr, uint16_t domid, uint8_t *pool,
                            uint32_t nr_frames, uint32_t *rd_pins, uint32_t *wr_pins,
                            uint32_t ref, uint32_t offset, uint32_t len, int to_grant,
                            uint8_t *local)
{
    uint32_t frame;
    int32_t st;
    if (offset >= PVIO_PAGE || len > PVIO_PAGE - offset)
        return GNTST_bad_copy_arg;
    st = pvio_gnt_pin(table, nr, ref, domid, to_grant != 0, nr_frames, rd_pins, wr_pins,
                      &frame);
    if (st != GNTST_okay)
        return st;
    if (to_grant)
        memcpy(pool + (size_t)frame * PVIO_PAGE + offset, local, len);
    else
        memcpy(local, pool + (size_t)frame * PVIO_PAGE + offset, len);
    pvio_gnt_unpin(table, ref, to_grant != 0, rd_pins, wr_pins);
    return GNTST_okay;
}

int pvio_gnt_copy(uint8_t *table, uint32_t nr, uint16_t domid, uint8_t *pool,
                  uint32_t nr_frames, uint32_t *rd_pins, uint32_t *wr_pins,
                  pvio_gnt_copy_op *ops, uint32_t n)
{
    uint32_t i;
    int failures = 0;
    for (i = 0; i < n; i++) {
        pvio_gnt_copy_op *op = &ops[i];
        op->status = gnt_copy_one(table, nr, domid, pool, nr_frames, rd_pins, wr_pins,
                                  op->ref, op->offset, op->len, op->to_grant, op->local);
        failures += op->status != GNTST_okay;
    }
    return failures;
}

int pvio_gnt_copy_vec(uint8_t *table, uint32_t nr, uint16_t domid, uint8_t *pool,
                      uint32_t nr_frames, uint32_t *rd_pins, uint32_t *wr_pins,
                      const uint32_t *refs, const uint32_t *offs, const uint32_t *lens,
                      uint8_t *local, uint64_t local_size, const uint32_t *local_offs,
                      uint32_t n, int to_grant, int32_t *status)
{
    uint32_t i;
    int failures = 0;
    for (i = 0; i < n; i++) {
        if ((uint64_t)local_offs[i] + lens[i] > local_size)
            status[i] = GNTST_bad_copy_arg;
        else
            status[i] = gnt_copy_one(table, nr, domid, pool, nr_frames, rd_pins, wr_pins,
                                     refs[i], offs[i], lens[i], to_grant,
                                     local + local_offs[i]);
        failures += status[i] != GNTST_okay;
    }
    return failures;
}

void *pvio_map_frames(int fd, const uint32_t *frames, uint32_t n, int writable)
{
    uint8_t *base;
    uint32_t i;
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    if (n == 0) {
        errno = EINVAL;
        return NULL;
    }
    base = mmap(NULL, (size_t)n * PVIO_PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS,
                -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    for (i = 0; i < n; i++) {
        void *p = mmap(base + (size_t)i * PVIO_PAGE, PVIO_PAGE, prot,
                       MAP_SHARED | MAP_FIXED, fd, (off_t)frames[i] * PVIO_PAGE);
        if (p == MAP_FAILED) {
            int saved = errno;
            munmap(base, (size_t)n * PVIO_PAGE);
            errno = saved;
            return NULL;
        }
    }
    return base;
}

int pvio_unmap(void *addr, uint32_t n)
{
    return munmap(addr, (size_t)n * PVIO_PAGE);
}


int pvio_punch_hole(int fd, int64_t offset, int64_t len)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len) < 0)
        return -errno;
    return 0;
}

uint64_t pvio_csum_partial(const uint8_t *buf, size_t len, uint64_t sum)
{
    size_t i = 0;
    for (; i + 1 < len; i += 2)
        sum += (uint32_t)buf[i] << 8 | buf[i + 1];
    if (i < len)
        sum += (uint32_t)buf[i] << 8;
    return sum;
}
