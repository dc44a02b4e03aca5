/* Software prefetch for the attention kernels: K/V rows sit wherever their slots put them, out of the hardware
 * prefetchers' reach. */
#ifndef DELTASERVE_PREFETCH_H
#define DELTASERVE_PREFETCH_H

/* Prefetch the n bytes at p, a cache line at a time: into L1 (l2 = 0) or L2 (l2 = 1). */
static inline __attribute__((always_inline)) void prefetch_bytes(const void *p, int n, int l2) {
    for (int off = 0; off < n; off += 64) {
        if (l2) __builtin_prefetch((const char *)p + off, 0, 2);
        else __builtin_prefetch((const char *)p + off, 0, 3);
    }
}
#endif
