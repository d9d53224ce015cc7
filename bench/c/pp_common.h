/* pp_common.h - shared helpers of the C ping-pong baselines: pinning,
 * a monotonic clock and a JSON percentile report (nearest-rank). */
#ifndef PP_COMMON_H
#define PP_COMMON_H

#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof(s), &s) != 0)
        perror("sched_setaffinity");
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t pct(const uint64_t *s, long n, double p)
{
    long k = (long)(p / 100.0 * (double)n + 0.5);   /* nearest rank, 1-based */
    if (k < 1) k = 1;
    if (k > n) k = n;
    return s[k - 1];
}

static void report(const char *name, uint64_t *lat, long n)
{
    long double sum = 0;
    for (long i = 0; i < n; i++)
        sum += lat[i];
    qsort(lat, (size_t)n, sizeof(uint64_t), cmp_u64);
    printf("{\"name\": \"%s\", \"n\": %ld, \"mean_ns\": %.1Lf, \"p50_ns\": %llu, "
           "\"p90_ns\": %llu, \"p99_ns\": %llu, \"p99.9_ns\": %llu, \"max_ns\": %llu, "
           "\"min_ns\": %llu}\n",
           name, n, sum / n, (unsigned long long)pct(lat, n, 50),
           (unsigned long long)pct(lat, n, 90), (unsigned long long)pct(lat, n, 99),
           (unsigned long long)pct(lat, n, 99.9), (unsigned long long)lat[n - 1],
           (unsigned long long)lat[0]);
}

#endif
