/* Reading an int8 cache's slot rows (kv/quant.py: D bytes then the row's fp32 scale, Hkv x (D + 4) bytes a slot, so
 * rows do not start on cache lines) for amx_short_int8.c: the next chunk's rows prefetched a few lines at a time, and a
 * chunk's row scales. Include after amx_short_plan.h (run16), where AVX-512 is. */
#ifndef DELTASERVE_INT8_ROWS_H
#define DELTASERVE_INT8_ROWS_H
#include <immintrin.h>
#include <stdint.h>

#include "kv_rows.h"

/* The next chunk's slot rows (K and V, every kv head), fetched into L2 a few lines at every step of the chunk's
 * compute. Rows of consecutive slots are adjacent (Hkv x (D + 4) bytes each, not whole lines): a line shared with the
 * row before is not fetched twice. */
typedef struct {
    const char *k, *v;
    const int64_t *sl;
    int keys, row, per;
    int key;                      /* the key whose rows are being fetched */
    uintptr_t kl, ke, vl, ve;     /* its next K / V line and last ones */
    uintptr_t kdone, vdone;       /* the last K / V line fetched */
} ahead;

static inline void ahead_key(ahead *a) {
    const uintptr_t kb = (uintptr_t)a->k + (uintptr_t)a->sl[a->key] * a->row;
    const uintptr_t vb = (uintptr_t)a->v + (uintptr_t)a->sl[a->key] * a->row;
    const uintptr_t ks = kb & ~(uintptr_t)63, vs = vb & ~(uintptr_t)63;
    a->ke = (kb + a->row - 1) & ~(uintptr_t)63;
    a->ve = (vb + a->row - 1) & ~(uintptr_t)63;
    a->kl = ks <= a->kdone && a->kdone <= a->ke ? a->kdone + 64 : ks;
    a->vl = vs <= a->vdone && a->vdone <= a->ve ? a->vdone + 64 : vs;
}

static inline void ahead_init(ahead *a, const char *k, const char *v, const int64_t *sl, int keys, int row,
                              int steps) {
    a->k = k, a->v = v, a->sl = sl, a->keys = keys, a->row = row, a->key = 0, a->kdone = a->vdone = 0;
    const int lines = keys * 2 * (row + 63) / 64;
    a->per = keys > 0 ? (lines + steps - 1) / steps : 0;
    if (keys > 0) ahead_key(a);
}

static inline void ahead_step(ahead *a) {
    for (int n = 0; n < a->per && a->key < a->keys;) {
        if (a->kl <= a->ke) {
            __builtin_prefetch((const void *)a->kl, 0, 2);
            a->kdone = a->kl, a->kl += 64, n++;
        } else if (a->vl <= a->ve) {
            __builtin_prefetch((const void *)a->vl, 0, 2);
            a->vdone = a->vl, a->vl += 64, n++;
        } else if (++a->key < a->keys) {
            ahead_key(a);
        }
    }
}

/* every kv head's row scales (K or V cache c) of the chunk's keys [0, kcp) (0 past kc) to dst [key][Hkv], and where
 * lg is given floor(log2) of each (-inf for 0) to lg. A run of 16 slots holds its 16 Hkv rows back to back: their
 * scales are gathered 16 at a time. */
static void row_scales(const uint8_t *c, const int64_t *sl, int kc, int kcp, int Hkv, int D, float *dst, float *lg,
                       ahead *ah) {
    const int rb = D + 4;
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(rb));
    for (int j0 = 0; j0 < kcp; j0 += 16) {
        ahead_step(ah);
        if (j0 + 16 <= kc && run16(sl + j0)) {
            const uint8_t *base = c + (size_t)sl[j0] * Hkv * rb + D;
            for (int e = 0; e < 16 * Hkv; e += 16) {
                const __m512 x = _mm512_i32gather_ps(idx, base + (size_t)e * rb, 1);
                _mm512_storeu_ps(dst + j0 * Hkv + e, x);
                if (lg) _mm512_storeu_ps(lg + j0 * Hkv + e, _mm512_getexp_ps(x));
            }
            continue;
        }
        for (int j = j0; j < j0 + 16; j++)
            for (int g = 0; g < Hkv; g++)
                dst[j * Hkv + g] = j < kc ? kv_row_scale(c + ((size_t)sl[j] * Hkv + g) * rb, D) : 0.f;
        if (lg)
            for (int e = 0; e < 16 * Hkv; e += 16)
                _mm512_storeu_ps(lg + j0 * Hkv + e, _mm512_getexp_ps(_mm512_loadu_ps(dst + j0 * Hkv + e)));
    }
}
#endif
