/*
 * cacheline_pingpong.c - the hardware floor for a busy-poll ping-pong.
 *
 * Two processes share one 64-byte line of a MAP_SHARED|MAP_ANONYMOUS mapping.
 * A stores an odd counter (release), B spins until it sees it (acquire) and
 * stores the next even value, A spins until it sees that = one round trip:
 * two cache-line transfers between the cores, no syscalls.
 *
 * usage: cacheline_pingpong N_ROUNDTRIPS [CPU_A CPU_B]   (CPU -1 = no pinning)
 * prints one JSON object like eventfd_pingpong.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pp_common.h"

static inline void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int cpu_a = argc > 3 ? atoi(argv[2]) : -1, cpu_b = argc > 3 ? atoi(argv[3]) : -1;
    long warm = n / 10 + 100;
    long total = warm + n;
    volatile uint64_t *line = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (line == MAP_FAILED) { perror("mmap"); return 1; }
    uint64_t *lat = malloc(sizeof(uint64_t) * (size_t)n);
    if (!lat) return 1;

    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid == 0) {
        pin(cpu_b);
        for (uint64_t i = 0; i < (uint64_t)total; i++) {
            while (__atomic_load_n(line, __ATOMIC_ACQUIRE) != 2 * i + 1)
                relax();
            __atomic_store_n(line, 2 * i + 2, __ATOMIC_RELEASE);
        }
        _exit(0);
    }
    pin(cpu_a);
    for (uint64_t i = 0; i < (uint64_t)total; i++) {
        uint64_t t0 = now_ns();
        __atomic_store_n(line, 2 * i + 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(line, __ATOMIC_ACQUIRE) != 2 * i + 2)
            relax();
        if (i >= (uint64_t)warm)
            lat[i - warm] = now_ns() - t0;
    }
    int st;
    waitpid(pid, &st, 0);
    report("cacheline_pingpong", lat, n);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}
