/* Small-batch bf16 linear: the weights streamed once, in bf16, for all rows, products in fp32 FMA.
 *
 * A decode or short verify step multiplies a few rows by every weight of the model once: the time is the
 * weights' bytes, so they stay in bf16 (half of fp32's bytes) and each one is read once for all the rows.
 * Used where oneDNN's bf16 GEMM is slow for these shapes:
 * - no AVX-512 (AMD Zen 3, client chips): torch's bf16 F.linear runs a generic loop (~10 GFLOP/s on 2 Zen 3
 *   cores), its fp32 sgemm streams twice the bytes;
 * - AVX-512 whose bf16 pair products are slow (`cpu_probe.c`; a 2-core Xeon issues them at a quarter of the FMA
 *   rate): oneDNN's packed bf16 GEMM is compute-bound from a few rows on, at ~110 GFLOP/s.
 *
 * Layouts (row-major):
 *   w      [N, K] bfloat16, as loaded; packed once by small_gemm_pack into
 *   wp     [N / PW][K][PW] bfloat16: panels of PW output features (PW = 16 with AVX-512, 8 with AVX2;
 *          small_gemm_panel_width()), k-major, so y[m][n..n+PW] += x[m][k] * wp[p][k] is one broadcast-FMA
 *          with no horizontal sums
 *   x      [M, K] bfloat16          bias  [N] bfloat16 or NULL          y  [M, N] bfloat16 (nearest even)
 * Each thread takes a contiguous range of panels and streams it from memory once, accumulating in fp32; up to
 * MAX_M rows share each load of a weight vector, more rows go over a block of panels again while it is in cache.
 * Returns 0, 2 when built without AVX2+FMA or for shapes it does not take (N % PW, M out of range).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_M 8
#define PB 12 /* panels a block: a multiple of every tile's panel count (4, 3, 2, 1) */
#ifdef __AVX512F__
#define PW 16
#else
#define PW 8
#endif

int small_gemm_available(void);
int small_gemm_panel_width(void) { return PW; }

/* wp <- w in panels (plain C: runs once at load) */
int small_gemm_pack(const uint16_t *w, int N, int K, uint16_t *wp) {
    if (N % PW) return 2;
    for (int p = 0; p < N / PW; p++)
        for (int k = 0; k < K; k++)
            for (int c = 0; c < PW; c++) wp[((int64_t)p * K + k) * PW + c] = w[(int64_t)(PW * p + c) * K + k];
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

/* The fp32 vector of PW lanes and the three operations the tiles need. */
#ifdef __AVX512F__
typedef __m512 vfloat;
#define vzero _mm512_setzero_ps
#define vfma _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vset1 _mm512_set1_ps
#define vstore _mm512_storeu_ps
#define vload_bf16 bf16x16_load
#else
typedef __m256 vfloat;
#define vzero _mm256_setzero_ps
#define vfma _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vset1 _mm256_set1_ps
#define vstore _mm256_storeu_ps
#define vload_bf16 bf16x8_load
#endif

/* y[m][PW*p..PW*(p+NP)) for all M rows over the whole K: NP panels x M rows of accumulators (<= 12 of the 16
 * ymm registers with AVX2, <= 24 of the 32 zmm with AVX-512), each weight vector loaded once and used by every
 * row. */
static inline __attribute__((always_inline)) void panels(const float *restrict xf, const uint16_t *restrict wp,
                                                        const uint16_t *restrict bias, int p0, int K, int N,
                                                        uint16_t *restrict y, const int M, const int NP) {
    vfloat acc[MAX_M][4];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++)
#pragma GCC unroll 4
        for (int b = 0; b < NP; b++) acc[m][b] = vzero();
    const uint16_t *w0 = wp + (int64_t)p0 * K * PW;
    for (int k = 0; k < K; k++) {
        vfloat wv[4];
#pragma GCC unroll 4
        for (int b = 0; b < NP; b++) wv[b] = vload_bf16(w0 + ((int64_t)b * K + k) * PW);
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const vfloat xb = vset1(xf[(int64_t)m * K + k]);
#pragma GCC unroll 4
            for (int b = 0; b < NP; b++) acc[m][b] = vfma(xb, wv[b], acc[m][b]);
        }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NP; b++) {
        const int n0 = PW * (p0 + b);
        const vfloat bv = bias ? vload_bf16(bias + n0) : vzero();
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            float t[PW];
            vstore(t, vadd(acc[m][b], bv));
            for (int c = 0; c < PW; c++) y[(int64_t)m * N + n0 + c] = f32_to_bf16(t[c]);
        }
    }
}

/* Panels per register tile for M rows: M x NP accumulators <= 12 (AVX2) or <= 24 (AVX-512) */
#define TILE_CASE(MM, NP_)                                                                  \
    case MM:                                                                                \
        for (; p + NP_ <= pe; p += NP_) panels(xg, wp, bias, p, K, N, yg, MM, NP_);          \
        for (; p < pe; p++) panels(xg, wp, bias, p, K, N, yg, MM, 1);                        \
        break;

int small_gemm(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, int M, int N, int K, uint16_t *y) {
    if (M < 1 || N % PW) return 2;
    float *xf = malloc(sizeof(float) * M * K + 64);
    if (!xf) return 1;
    for (int64_t i = 0; i < (int64_t)M * K; i++) xf[i] = bf16_to_f32(x[i]);
    const int np = N / PW;
#pragma omp parallel
    {
        /* contiguous ranges of panels: each thread streams one part of the weight */
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int p1 = (int)((int64_t)np * (t + 1) / nt);
        const int pa = (int)((int64_t)np * t / nt);
        /* blocks of PB panels (PB x PW x 1.1 KB of weights at K = 576: stays in L2) taken by every group of MAX_M
         * rows in turn, so more than MAX_M rows still stream the weights from memory once */
        for (int pb = pa; pb < p1; pb += PB) {
            const int pe = pb + PB < p1 ? pb + PB : p1;
            for (int m0 = 0; m0 < M; m0 += MAX_M) {
                const float *xg = xf + (int64_t)m0 * K; /* [mg, K] */
                uint16_t *yg = y + (int64_t)m0 * N;    /* [mg, N] */
                int p = pb;
                switch (M - m0 < MAX_M ? M - m0 : MAX_M) {
#ifdef __AVX512F__
                    TILE_CASE(1, 4)
                    TILE_CASE(2, 4)
                    TILE_CASE(3, 4)
                    TILE_CASE(4, 4)
                    TILE_CASE(5, 4)
                    TILE_CASE(6, 3)
                    TILE_CASE(7, 3)
                    TILE_CASE(8, 3)
#else
                    TILE_CASE(1, 4)
                    TILE_CASE(2, 4)
                    TILE_CASE(3, 3)
                    TILE_CASE(4, 3)
                    TILE_CASE(5, 2)
                    TILE_CASE(6, 2)
                    TILE_CASE(7, 1)
                    TILE_CASE(8, 1)
#endif
                    default: break;
                }
            }
        }
    }
    free(xf);
    return 0;
}
#endif
