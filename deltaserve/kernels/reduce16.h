/* reduce16: 16 vectors of 16 lanes to one vector of their 16 lane sums (lane j <- the sum of v[j]'s lanes), for the
 * short kernel's Q.K with keys on lanes: a transpose-and-add tree (46 ops for 16 sums, against 16 horizontal
 * reductions of ~8 ops each). Two forms from one template: fp32 (short_pairs.h) and exact int32 (short_int8.h).
 * Also row_max16, the largest value of a row. */
#ifndef DELTASERVE_REDUCE16_H
#define DELTASERVE_REDUCE16_H
#ifdef __AVX512F__
#include <immintrin.h>

/* the shuffles of either form, on the fp32 bit pattern (a shuffle moves bits, so it serves int32 lanes too) */
#define R16_SH4(T, a, b, imm) (T)_mm512_shuffle_f32x4((__m512)(a), (__m512)(b), imm)
#define R16_SHPS(T, a, b, imm) (T)_mm512_shuffle_ps((__m512)(a), (__m512)(b), imm)

#define DEFINE_REDUCE16(NAME, T, ADD)                                                                               \
    static inline __attribute__((always_inline)) T NAME(T v[16]) {                                                 \
        T w[8], x[4], y[2];                                                                                         \
        for (int i = 0; i < 8; i++) /* w[i]: v[2i] partials in the low 256 bits, v[2i+1] in the high */             \
            w[i] = ADD(R16_SH4(T, v[2 * i], v[2 * i + 1], 0x44), R16_SH4(T, v[2 * i], v[2 * i + 1], 0xEE));          \
        for (int i = 0; i < 4; i++) /* x[i]: quarter k holds 4 partials of v[4i + k] */                             \
            x[i] = ADD(R16_SH4(T, w[2 * i], w[2 * i + 1], 0x88), R16_SH4(T, w[2 * i], w[2 * i + 1], 0xDD));          \
        for (int i = 0; i < 2; i++) /* y[i]: quarter k holds 2 partials of v[8i + k], then 2 of v[8i + 4 + k] */    \
            y[i] = ADD(R16_SHPS(T, x[2 * i], x[2 * i + 1], 0x44), R16_SHPS(T, x[2 * i], x[2 * i + 1], 0xEE));        \
        /* z: lane 4k + t holds the sum of v[4t + k] */                                                             \
        const T z = ADD(R16_SHPS(T, y[0], y[1], 0x88), R16_SHPS(T, y[0], y[1], 0xDD));                              \
        const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);                 \
        return (T)_mm512_permutexvar_ps(idx, (__m512)z);                                                            \
    }

DEFINE_REDUCE16(reduce16, __m512, _mm512_add_ps)
DEFINE_REDUCE16(reduce16_epi32, __m512i, _mm512_add_epi32)
#undef DEFINE_REDUCE16

/* The largest of s[0 .. n) (n > 0 for a meaningful answer), and through `tail` the mask of the last partial 16-block
 * (n % 16 lanes): the short kernel's softmax over a row's visible keys. */
static inline __attribute__((always_inline)) float row_max16(const float *s, int n, __mmask16 *tail) {
    __m512 mv = _mm512_set1_ps(-3.0e38f);
    int j = 0;
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    *tail = (__mmask16)((1u << (n - j)) - 1);
    if (j < n) mv = _mm512_mask_max_ps(mv, *tail, mv, _mm512_loadu_ps(s + j));
    return _mm512_reduce_max_ps(mv);
}
#endif
#endif
