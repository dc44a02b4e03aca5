/* Small-batch bf16 linear on AMX tiles: the weights streamed once, in order, for every row of the batch.
 *
 * A decode or verify step multiplies a few dozen rows by every weight of the model once, so its linears cost the
 * weights' bytes. With the model's KV history streaming through the caches in between, the weights come from
 * memory each step, and oneDNN's packed bf16 GEMM reads them there at ~8-9 GB/s on a 2-core AMX Xeon (90 layers'
 * worth of SmolLM2 weights, 636 MB, M = 1..36) where the machine reads ~32 GB/s. Here each thread reads one
 * contiguous part of a tile-ordered copy of the weight front to back (two sequential streams the hardware
 * prefetchers follow): up to 32 rows the weights' bytes set its time (~21 GB/s there); from 33 rows on, on that
 * VM, the tile products do (a tile product costing ~100 cycles in these chains), about oneDNN's time at 33-64.
 *
 * Layouts (row-major):
 *   w    [N, K] bfloat16, as loaded; packed once by amx_gemm_pack into
 *   wp   [N / 16][K / 32][16][16][2] bfloat16: per block of 16 output features, its K / 32 B tiles in order, each
 *        16 rows of (feature c: dims 2r, 2r + 1) pairs, as tdpbf16ps takes them: wp[nb][t][r][c][e] =
 *        w[16 nb + c][32 t + 2 r + e]
 *   x    [M, K] bfloat16          bias [N] bfloat16 or NULL          y [M, N] bfloat16 (nearest even)
 * The rows are copied into A tiles (zero rows up to a multiple of 16); each step
 * takes two blocks of 16 features (NB) and 32 rows (two A tiles) at a time into four fp32 C tiles, more rows go
 * over the same two blocks again while they sit in L1/L2.
 * Returns 0, 1 when out of memory, 2 when not built with AMX or not granted the tile state, or for shapes it does
 * not take (N % 16, K % 32, M < 1).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int amx_gemm_available(void);

/* wp <- w in B tiles (plain C: runs once at load) */
int amx_gemm_pack(const uint16_t *w, int N, int K, uint16_t *wp) {
    if (N % 16 || K % 32) return 2;
    const int KT = K / 32;
    for (int nb = 0; nb < N / 16; nb++)
        for (int t = 0; t < KT; t++)
            for (int r = 0; r < 16; r++)
                for (int c = 0; c < 16; c++)
                    for (int e = 0; e < 2; e++)
                        wp[((((int64_t)nb * KT + t) * 16 + r) * 16 + c) * 2 + e] =
                            w[(int64_t)(16 * nb + c) * K + 32 * t + 2 * r + e];
    return 0;
}

#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(__AVX512BF16__) || !defined(__linux__)
int amx_gemm_available(void) { return 0; }
int amx_gemm(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, int M, int N, int K, uint16_t *y) {
    (void)x; (void)wp; (void)bias; (void)M; (void)N; (void)K; (void)y;
    return 2;
}
#else
#include <immintrin.h>
#include <omp.h>

#include "amx_tiles.h"

#define NB 2             /* 16-feature blocks a step (two B tiles) */
#define TILE_ELEMS 512   /* bf16 elements of a B tile: 16 rows x 32 */
#define PF_TILES 4       /* B tiles ahead fetched into L2, per stream */

int amx_gemm_available(void) { return amx_tiles_granted(); }

static inline void prefetch_tile(const uint16_t *b) {
    for (int off = 0; off < TILE_ELEMS * 2; off += 64) _mm_prefetch((const char *)b + off, _MM_HINT_T1);
}

/* rows [m0, m0 + rows) of y, features [n0, n0 + 16), from C tile values c [16][16] fp32 (+ bias) */
static inline void store_rows(const float *c, const uint16_t *bias, int n0, int m0, int rows, int N, uint16_t *y) {
    __m512 b = _mm512_setzero_ps();
    if (bias) {
        const __m256i bb = _mm256_loadu_si256((const __m256i *)(bias + n0));
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bb), 16)); /* bf16 -> fp32: exact */
    }
    for (int r = 0; r < rows; r++)
        _mm256_storeu_si256((__m256i *)(y + (int64_t)(m0 + r) * N + n0),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c + 16 * r), b)));
}

int amx_gemm(const uint16_t *x, const uint16_t *wp, const uint16_t *bias, int M, int N, int K, uint16_t *y) {
    if (M < 1 || N % 16 || K % 32 || !amx_gemm_available()) return 2;
    const int Mp = (M + 15) & ~15, KT = K / 32, nblocks = N / 16;
    /* x as A tiles [Mp / 16][KT][16][32], rows past M zero: each tile load reads 1 KB in order (tiles loaded
     * straight from x, rows K * 2 bytes apart, took 8-15% longer at 36-64 rows with the weights in L3) */
    uint16_t *xp = aligned_alloc(64, (size_t)Mp * K * 2);
    if (!xp) return 1;
    for (int mt = 0; mt < Mp / 16; mt++)
        for (int t = 0; t < KT; t++)
            for (int r = 0; r < 16; r++) {
                uint16_t *dst = xp + (((size_t)mt * KT + t) * 16 + r) * 32;
                const int m = 16 * mt + r;
                if (m < M) memcpy(dst, x + (size_t)m * K + 32 * t, 64);
                else memset(dst, 0, 64);
            }
#pragma omp parallel
    {
        float c[4][256] __attribute__((aligned(64)));
        tiles_configure();
        /* a contiguous run of block pairs a thread: it streams that part of wp once */
        const int nt = omp_get_num_threads(), th = omp_get_thread_num(), pairs = (nblocks + NB - 1) / NB;
        const int b0 = pairs * th / nt * NB, b1 = pairs * (th + 1) / nt * NB < nblocks ? pairs * (th + 1) / nt * NB
                                                                                          : nblocks;
        for (int nb = b0; nb < b1; nb += NB) {
            const int two = nb + 1 < b1;
            const uint16_t *w0 = wp + (size_t)nb * KT * TILE_ELEMS, *w1 = w0 + (size_t)KT * TILE_ELEMS;
            for (int m0 = 0; m0 < Mp; m0 += 32) {
                const int both = m0 + 16 < Mp; /* a second A tile of rows */
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int t = 0; t < KT; t++) {
                    if (m0 == 0) { /* the first pass over these blocks reads them from memory */
                        prefetch_tile(w0 + (size_t)(t + PF_TILES) * TILE_ELEMS);
                        if (two) prefetch_tile(w1 + (size_t)(t + PF_TILES) * TILE_ELEMS);
                    }
                    _tile_loadd(4, xp + ((size_t)(m0 / 16) * KT + t) * TILE_ELEMS, 64);
                    _tile_loadd(6, w0 + (size_t)t * TILE_ELEMS, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (two) {
                        _tile_loadd(7, w1 + (size_t)t * TILE_ELEMS, 64);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                    if (both) {
                        _tile_loadd(5, xp + ((size_t)(m0 / 16 + 1) * KT + t) * TILE_ELEMS, 64);
                        _tile_dpbf16ps(2, 5, 6);
                        if (two) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, c[0], 64);
                _tile_stored(1, c[1], 64);
                _tile_stored(2, c[2], 64);
                _tile_stored(3, c[3], 64);
                const int r0 = M - m0 < 16 ? M - m0 : 16, r1 = M - m0 - 16 < 16 ? M - m0 - 16 : 16;
                store_rows(c[0], bias, 16 * nb, m0, r0, N, y);
                if (two) store_rows(c[1], bias, 16 * (nb + 1), m0, r0, N, y);
                if (r1 > 0) {
                    store_rows(c[2], bias, 16 * nb, m0 + 16, r1, N, y);
                    if (two) store_rows(c[3], bias, 16 * (nb + 1), m0 + 16, r1, N, y);
                }
            }
        }
        _tile_release();
    }
    free(xp);
    return 0;
}
#endif
