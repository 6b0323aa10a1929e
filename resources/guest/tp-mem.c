/*
 * tp-mem: the default guest's memory workload helper (built static by resources/guest/build.sh).
 *
 *   tp-mem alloc MIB [HOLD_MS] [thp|nothp]
 *
 * Maps MIB MiB of anonymous memory, writes a per-page pattern into every 4 KiB page, reads it all back,
 * optionally holds it for HOLD_MS milliseconds, then unmaps it. Prints one marker line per phase to
 * stdout so a host test can follow along on the serial console:
 *
 *   TIDEPOOL-ALLOC-TOUCHED mib=<n> ms=<t>
 *   TIDEPOOL-ALLOC-VERIFIED mib=<n> bad_pages=<k>
 *   TIDEPOOL-ALLOC-FREED mib=<n>
 *
 * Exits 0 when every page read back what was written, 1 on a bad page, 2 on a usage or mmap error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096UL

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int usage(void)
{
    fprintf(stderr, "usage: tp-mem alloc MIB [HOLD_MS] [thp|nothp]\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 3 || strcmp(argv[1], "alloc") != 0)
        return usage();
    char *end = NULL;
    unsigned long mib = strtoul(argv[2], &end, 10);
    if (!end || *end || mib == 0 || mib > (1UL << 20))
        return usage();
    unsigned long hold_ms = 0;
    if (argc > 3) {
        hold_ms = strtoul(argv[3], &end, 10);
        if (!end || *end)
            return usage();
    }
    int thp = 1;
    if (argc > 4) {
        if (strcmp(argv[4], "nothp") == 0)
            thp = 0;
        else if (strcmp(argv[4], "thp") != 0)
            return usage();
    }

    size_t len = mib << 20;
    uint64_t t0 = now_ms();
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        printf("TIDEPOOL-ALLOC-FAILED mib=%lu errno=%d (%s)\n", mib, errno, strerror(errno));
        fflush(stdout);
        return 2;
    }
    (void)madvise(p, len, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    size_t pages = len / PAGE;
    for (size_t i = 0; i < pages; i++) {
        uint64_t *w = (uint64_t *)(p + i * PAGE);
        w[0] = 0x74696465706f6f6cULL ^ i; /* "tidepool" ^ page index */
        w[PAGE / 8 - 1] = ~(uint64_t)i;
    }
    printf("TIDEPOOL-ALLOC-TOUCHED mib=%lu ms=%" PRIu64 "\n", mib, now_ms() - t0);
    fflush(stdout);

    size_t bad = 0;
    for (size_t i = 0; i < pages; i++) {
        const uint64_t *w = (const uint64_t *)(p + i * PAGE);
        if (w[0] != (0x74696465706f6f6cULL ^ i) || w[PAGE / 8 - 1] != ~(uint64_t)i)
            bad++;
    }
    printf("TIDEPOOL-ALLOC-VERIFIED mib=%lu bad_pages=%zu\n", mib, bad);
    fflush(stdout);

    if (hold_ms) {
        struct timespec ts = { .tv_sec = (time_t)(hold_ms / 1000), .tv_nsec = (long)(hold_ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
    munmap(p, len);
    printf("TIDEPOOL-ALLOC-FREED mib=%lu\n", mib);
    fflush(stdout);
    return bad ? 1 : 0;
}
