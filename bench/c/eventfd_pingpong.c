/*
 * eventfd_pingpong.c - the kernel wake-up floor for a blocking ping-pong.
 *
 * Two processes, one eventfd each way, blocking read/write (no spinning):
 * A writes efd_ab, B reads it and writes efd_ba, A reads it = one round trip.
 * Each round trip is timed with clock_gettime(CLOCK_MONOTONIC) in A.
 *
 * usage: eventfd_pingpong N_ROUNDTRIPS [CPU_A CPU_B]   (CPU -1 = no pinning)
 * prints one JSON object: {"n":..., "mean_ns":..., "p50_ns":..., ...}
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pp_common.h"

static void xread(int fd)
{
    uint64_t v;
    if (read(fd, &v, 8) != 8) { perror("read"); _exit(2); }
}

static void xwrite(int fd)
{
    uint64_t v = 1;
    if (write(fd, &v, 8) != 8) { perror("write"); _exit(2); }
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int cpu_a = argc > 3 ? atoi(argv[2]) : -1, cpu_b = argc > 3 ? atoi(argv[3]) : -1;
    long warm = n / 10 + 100;
    int ab = eventfd(0, EFD_CLOEXEC), ba = eventfd(0, EFD_CLOEXEC);
    if (ab < 0 || ba < 0) { perror("eventfd"); return 1; }
    uint64_t *lat = malloc(sizeof(uint64_t) * (size_t)n);
    if (!lat) return 1;

    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid == 0) {
        pin(cpu_b);
        for (long i = 0; i < warm + n; i++) { xread(ab); xwrite(ba); }
        _exit(0);
    }
    pin(cpu_a);
    for (long i = 0; i < warm; i++) { xwrite(ab); xread(ba); }
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        xwrite(ab);
        xread(ba);
        lat[i] = now_ns() - t0;
    }
    int st;
    waitpid(pid, &st, 0);
    report("eventfd_pingpong", lat, n);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}
