/* Where the AMX attention kernels (amx_attention.c, amx_short.c, amx_short_int8.c) leave the sums of a sequence's
 * keys split into parts, and their merge, as in flash decoding: a row's unnormalised output, its softmax reference
 * (base 2) and denominator, slot_rows rows a part's slot in each kernel's own row order. Where AVX-512 is. */
#ifndef DELTASERVE_SPLIT_PARTS_H
#define DELTASERVE_SPLIT_PARTS_H
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

typedef struct {
    float *o; /* [n_slots][slot_rows][D] */
    float *m; /* [n_slots][slot_rows] */
    float *l;
} partials;

/* Row x (of slot_rows a slot) of a split sequence merged from its parts (slots part0 ..) through their references, as
 * in flash decoding: the unnormalised sum to acc [D], the denominator returned. A part in which the row sees no key
 * (m = -inf) weighs nothing. */
static float merge_parts(const partials *pt, int part0, int n_parts, size_t slot_rows, size_t x, int D, float *acc) {
    float m = -INFINITY, l = 0.f;
    for (int p = 0; p < n_parts; p++) m = fmaxf(m, pt->m[(size_t)(part0 + p) * slot_rows + x]);
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(acc + d, _mm512_setzero_ps());
    for (int p = 0; p < n_parts; p++) {
        const size_t at = (size_t)(part0 + p) * slot_rows + x;
        if (pt->m[at] == -INFINITY) continue;
        const float wgt = exp2f(pt->m[at] - m);
        l += wgt * pt->l[at];
        const __m512 wv = _mm512_set1_ps(wgt);
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(acc + d,
                             _mm512_fmadd_ps(_mm512_loadu_ps(pt->o + at * D + d), wv, _mm512_loadu_ps(acc + d)));
    }
    return l;
}
#endif
