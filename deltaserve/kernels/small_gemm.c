/* Small-batch bf16 linear for CPUs where oneDNN has no bf16 kernel (no AVX-512: AMD Zen 3, client chips).
 *
 * A decode or short verify step multiplies a few rows by every weight of the model once: the time is the
 * weights' bytes, so they stay in bf16 (half of fp32's bytes) and each one is read once for all the rows.
 * There torch's bf16 F.linear runs a generic loop (~10 GFLOP/s on 2 Zen 3 cores) and its fp32 sgemm streams
 * twice the bytes.
 *
 * Layouts (row-major):
 *   w      [N, K] bfloat16, as loaded; packed once by small_gemm_pack into
 *   wp     [N / 8][K][8] bfloat16: panels of 8 output features, k-major, so y[m][n..n+8] += x[m][k] * wp[p][k]
 *          is one broadcast-FMA with no horizontal sums
 *   x      [M, K] bfloat16          bias  [N] bfloat16 or NULL          y  [M, N] bfloat16 (nearest even)
 * Each thread takes a contiguous range of panels and streams it from memory once, accumulating in fp32; up to
 * MAX_M rows share each load of a weight vector, more rows go over a block of panels again while it is in cache. Returns 0, 2 when built without AVX2+FMA or for shapes it does not take (N % 8, M out of range).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_M 8
#define PB 12 /* panels a block: a multiple of every tile's panel count (4, 3, 2, 1) */

int small_gemm_available(void);

/* wp <- w in panels (plain C: runs once at load) */
int small_gemm_pack(const uint16_t *w, int N, int K, uint16_t *wp) {
    if (N % 8) return 2;
    for (int p = 0; p < N / 8; p++)
        for (int k = 0; k < K; k++)
            for (int c = 0; c < 8; c++) wp[((int64_t)p * K + k) * 8 + c] = w[(int64_t)(8 * p + c) * K + k];
    return 0;
}

#if !(defined(__AVX2__) && defined(__FMA__))
int small_gemm_available(void) { return 0; }
int small_gemm(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, int M, int N, int K, uint16_t *y) {
    (void)x; (void)wp; (void)bias; (void)M; (void)N; (void)K; (void)y;
    return 2;
}
#else
#include <immintrin.h>
#include <omp.h>

#include "bf16.h"

int small_gemm_available(void) { return 1; }

static inline __m256 bf16x8_load(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* y[m][8p..8p+8*NP) for all M rows over the whole K: NP panels x M rows of accumulators (<= 12 of the 16
 * ymm registers), each weight vector loaded once and used by every row. */
static inline __attribute__((always_inline)) void panels(const float *restrict xf, const uint16_t *restrict wp,
                                                        const uint16_t *restrict bias, int p0, int K, int N,
                                                        uint16_t *restrict y, const int M, const int NP) {
    __m256 acc[MAX_M][4];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++)
#pragma GCC unroll 4
        for (int b = 0; b < NP; b++) acc[m][b] = _mm256_setzero_ps();
    const uint16_t *w0 = wp + (int64_t)p0 * K * 8;
    for (int k = 0; k < K; k++) {
        __m256 wv[4];
#pragma GCC unroll 4
        for (int b = 0; b < NP; b++) wv[b] = bf16x8_load(w0 + ((int64_t)b * K + k) * 8);
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const __m256 xb = _mm256_broadcast_ss(xf + (int64_t)m * K + k);
#pragma GCC unroll 4
            for (int b = 0; b < NP; b++) acc[m][b] = _mm256_fmadd_ps(xb, wv[b], acc[m][b]);
        }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NP; b++) {
        const int n0 = 8 * (p0 + b);
        const __m256 bv = bias ? bf16x8_load(bias + n0) : _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            float t[8];
            _mm256_storeu_ps(t, _mm256_add_ps(acc[m][b], bv));
            for (int c = 0; c < 8; c++) y[(int64_t)m * N + n0 + c] = f32_to_bf16(t[c]);
        }
    }
}

/* Panels per register tile for M rows: M x NP accumulators <= 12 */
#define TILE_CASE(MM, NP_)                                                                  \
    case MM:                                                                                \
        for (; p + NP_ <= pe; p += NP_) panels(xg, wp, bias, p, K, N, yg, MM, NP_);          \
        for (; p < pe; p++) panels(xg, wp, bias, p, K, N, yg, MM, 1);                        \
        break;

int small_gemm(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, int M, int N, int K, uint16_t *y) {
    if (M < 1 || N % 8) return 2;
    float *xf = malloc(sizeof(float) * M * K + 64);
    if (!xf) return 1;
    for (int64_t i = 0; i < (int64_t)M * K; i++) xf[i] = bf16_to_f32(x[i]);
    const int np = N / 8;
#pragma omp parallel
    {
        /* contiguous ranges of panels: each thread streams one part of the weight */
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int p1 = (int)((int64_t)np * (t + 1) / nt);
        const int pa = (int)((int64_t)np * t / nt);
        /* blocks of PB panels (PB x 9 KB of weights at K = 576: stays in L1/L2) taken by every group of MAX_M
         * rows in turn, so more than MAX_M rows still stream the weights from memory once */
        for (int pb = pa; pb < p1; pb += PB) {
            const int pe = pb + PB < p1 ? pb + PB : p1;
            for (int m0 = 0; m0 < M; m0 += MAX_M) {
                const float *xg = xf + (int64_t)m0 * K; /* [mg, K] */
                uint16_t *yg = y + (int64_t)m0 * N;    /* [mg, N] */
                int p = pb;
                switch (M - m0 < MAX_M ? M - m0 : MAX_M) {
                    TILE_CASE(1, 4)
                    TILE_CASE(2, 4)
                    TILE_CASE(3, 3)
                    TILE_CASE(4, 3)
                    TILE_CASE(5, 2)
                    TILE_CASE(6, 2)
                    TILE_CASE(7, 1)
                    TILE_CASE(8, 1)
                    default: break;
                }
            }
        }
    }
    free(xf);
    return 0;
}
#endif
