/* Reading an int8 or fp8 cache's slot rows (kv/quant.py: D bytes then the row's fp32 scale, Hkv x (D + 4) bytes a
 * slot, so rows do not start on cache lines) for the AMX short kernels: a chunk's row scales. Include after
 * amx_short_plan.h (run16, ahead), where AVX-512 is. */
#ifndef DELTASERVE_INT8_ROWS_H
#define DELTASERVE_INT8_ROWS_H
#include <immintrin.h>
#include <stdint.h>

#include "kv_rows.h"

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
