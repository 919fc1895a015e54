/* wake_probe: how fast a sleeping process on another CPU wakes, as a function
 * of how long it has been asleep. benchmarks/README.md ("Why parity") uses it
 * to explain the depth-1 round trip of pvio bench ring without busy-poll.
 *
 *   cc -O2 -o /tmp/wake_probe benchmarks/wake_probe.c && /tmp/wake_probe
 *
 * A child pinned to CPU 1 sleeps in poll() + read() on an eventfd; the parent,
 * pinned to CPU 0, waits (spinning) a given time after the child's last
 * wake-up, writes the eventfd and records how long the write took (the
 * sender's cost) and when the child ran again (CLOCK_MONOTONIC, shared by
 * both CPUs). 3000 wake-ups per delay; percentiles in microseconds.
 * Needs two CPUs; argument "nopin" leaves placement to the scheduler. */
#define _GNU_SOURCE
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define N 3000

struct shared {
    volatile uint64_t woke;
    volatile int ready;
    volatile int stop;
};

static uint64_t now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set))
        perror("sched_setaffinity");
}

int main(int argc, char **argv)
{
    static const int delays_us[] = {0, 2, 4, 5, 6, 7, 8, 10, 15, 20, 50, 100, 1000};
    int pinned = !(argc > 1 && strcmp(argv[1], "nopin") == 0);
    int efd = eventfd(0, 0);
    struct shared *s = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    uint64_t *wake = malloc(N * sizeof *wake), *send = malloc(N * sizeof *send), one = 1, v;
    pid_t child;
    if (efd < 0 || s == MAP_FAILED || !wake || !send)
        return perror("setup"), 1;
    child = fork();
    if (child == 0) {
        struct pollfd p = {efd, POLLIN, 0};
        if (pinned)
            pin(1);
        for (;;) {
            poll(&p, 1, -1);
            if (read(efd, &v, 8) != 8)
                _exit(1);
            s->woke = now();
            if (s->stop)
                _exit(0);
            __sync_synchronize();
            s->ready = 1;
        }
    }
    if (pinned)
        pin(0);
    usleep(10000);
    printf("asleep for   wake-up p50    p90    p99 |  sender's write p50    p90  (us)\n");
    for (size_t d = 0; d < sizeof delays_us / sizeof *delays_us; d++) {
        for (int i = 0; i < N; i++) {
            uint64_t t0, t1, t2;
            s->ready = 0;
            t0 = now();
            while (now() - t0 < (uint64_t)delays_us[d] * 1000u)
                ;
            t1 = now();
            if (write(efd, &one, 8) != 8)
                return perror("write"), 1;
            t2 = now();
            while (!s->ready)
                ;
            wake[i] = s->woke - t1;
            send[i] = t2 - t1;
        }
        qsort(wake, N, sizeof *wake, cmp);
        qsort(send, N, sizeof *send, cmp);
        printf("%7d us  %12.1f %6.1f %6.1f | %18.1f %6.1f\n", delays_us[d], wake[N / 2] / 1e3,
               wake[N * 9 / 10] / 1e3, wake[N * 99 / 100] / 1e3, send[N / 2] / 1e3,
               send[N * 9 / 10] / 1e3);
    }
    s->stop = 1;
    if (write(efd, &one, 8) != 8)
        return 1;
    waitpid(child, NULL, 0);
    return 0;
}
