/* transpose16_epi32: a 16 x 16 matrix of 32-bit elements held in 16 vectors (r[i] = row i) transposed in place
 * (r[j] = column j): four rounds of 16 shuffles. The short kernel's multi-row Q.K uses it to put a block of 16 keys'
 * bf16 dim pairs on lanes (one vector a dim pair), so a query row's 16 scores come out of plain pair products with no
 * horizontal sums. */
#ifndef DELTASERVE_TRANSPOSE16_H
#define DELTASERVE_TRANSPOSE16_H
#ifdef __AVX512F__
#include <immintrin.h>

static inline __attribute__((always_inline)) void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    /* t[2i] 128-bit lane L: (r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]); t[2i+1] the same from 4L+2 */
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* r[4i + k] lane L: column 4L + k of rows 4i .. 4i + 3 */
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* t[k] = lanes 0, 1 of r[k] then of r[4 + k]; t[4 + k] lanes 2, 3; t[8 + k], t[12 + k] the same of r[8 + k], r[12 + k] */
    for (int k = 0; k < 4; k++) {
        t[k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44);
        t[4 + k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE);
        t[8 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
        t[12 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
    }
    /* column 4L + k: lane L of r[k], r[4 + k], r[8 + k], r[12 + k] */
    for (int k = 0; k < 4; k++) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xDD);
        r[8 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0xDD);
    }
}

/* The products after the transpose: out[r] = the sum over dim pairs l < npairs of kt[l] times query row r's pair l
 * broadcast (rows qstride pairs apart in qa), for 4 rows at once, even and odd pairs in separate chains (8 in all, to
 * cover the products' latency). One template for bf16 pairs into fp32 (short_pairs.h) and int16 pairs into exact
 * int32 (short_int8.h): T the sum vector, DOT(acc, kt vector, broadcast pair), ADD to join the chains. */
#define DEFINE_KT_ROWS4(NAME, T, ZERO, DOT, ADD)                                                                   \
    static inline __attribute__((always_inline)) void NAME(const __m512i *kt, const int32_t *qa, int qstride,       \
                                                           int npairs, T out[4]) {                                 \
        T a[4], b[4];                                                                                              \
        for (int r = 0; r < 4; r++) a[r] = b[r] = ZERO();                                                          \
        _Pragma("GCC unroll 2") for (int l = 0; l < npairs; l += 2) {                                              \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {                                                  \
                a[r] = DOT(a[r], kt[l], _mm512_set1_epi32(qa[r * qstride + l]));                                   \
                b[r] = DOT(b[r], kt[l + 1], _mm512_set1_epi32(qa[r * qstride + l + 1]));                           \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < 4; r++) out[r] = ADD(a[r], b[r]);                                                      \
    }
#endif
#endif
