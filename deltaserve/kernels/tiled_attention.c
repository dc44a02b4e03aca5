/* Tiled paged attention for CPU: long query spans (prefill chunks, a turn's delta).
 *
 * A turn's delta of ~100 tokens attends to a context of thousands: at 5k context SDPA on
 * gathered K/V ran at ~60 GFLOP/s on 2 cores, and that span dominated a turn. This kernel is
 * flash attention read straight from the token-slot pool:
 *
 *   work item = (sequence, kv head g, block of query positions); its rows are the (position,
 *   head-in-group) pairs, r = i * G + h, so one K/V row serves every head of the GQA group.
 *   Q is packed transposed and pre-scaled, QT [D][RP] (RP = rows rounded up to VL, the fp32 lanes of a
 *   vector), so both products are broadcast-FMA register tiles with no horizontal reductions:
 *     S^T[j][r]  = sum_d K[j][d] * QT[d][r]          (4 keys x up to 4 row vectors a tile; 3 on AVX2)
 *     O^T[d][r] += sum_j V[j][d] * P^T[j][r]         (4 dims x up to 4 row vectors a tile; 3 on AVX2)
 *   and the online softmax runs down the key axis with VL rows a vector.
 *   Keys are visited in chunks of KB; chunks past the block's last visible key are skipped,
 *   chunks that cross the causal diagonal are masked per (key, row). A chunk of real keys that every row sees
 *   takes its row maxima from the score tiles' registers (no pass over S^T for them).
 *
 * Layouts (row-major), as in paged_attention.c:
 *   q     [num_q_tokens, H, D] float32        k, v  [num_slots, Hkv, D] float32 (kv_kind 0) or bfloat16 (1), or
 *                                              [num_slots, Hkv, D + 4] bytes: int8 (2) / fp8 e4m3 (3) rows and
 *                                              their fp32 scale (kv_rows.h), dequantized a key chunk at a time
 *   slots [sum of kv_len] int64                seqs  [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len
 *   out   [num_q_tokens, H, D] float32 (rows of queries not in any listed sequence are untouched)
 * Query i of a sequence sits at context position kv_len - q_len + i and sees keys 0..that position.
 * With a bf16 cache and AVX512-BF16 the products run as bf16 pair dot products (vdpbf16ps, fp32
 * accumulation, twice the fp32 FMA rate): Q is rounded to bf16 (exact for a bf16 model, whose q is
 * bf16) and packed in d-pairs, K pairs are read straight from the cache. mode bit 0 (p_bf16): the softmax
 * numerators are rounded to bf16 for P.V as well (what GPU flash attention does; V pairs packed per
 * chunk); without it P.V stays in fp32. mode bit 1: fp32 products even so (what a CPU without
 * AVX512-BF16 runs, or one where its pair products are slower than fp32 FMA; tests cover that path here with it).
 * The quantized kinds always take the fp32 product path (dequantized rows, no pairs; mode bits ignored).
 * What runs where: with AVX-512 every path, VL = 16; with only AVX2 + FMA (AMD Zen 3, client chips) the fp32
 * product path, VL = 8 and tiles of at most 12 accumulators for the 16 ymm registers (bf16 K/V widened to fp32).
 * Returns 0, 1 when out of memory, 2 when built without AVX-512 or AVX2 + FMA (the caller falls back).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int paged_attention_tiled_available(void);

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
#include "kernel_stub.h"
ATTENTION_KERNEL_STUB(paged_attention_tiled)
#else
#include <immintrin.h>

#define KB 64        /* keys per chunk */
#define MAX_ROWS 128 /* query rows per work item (8 vectors of 16, 16 of 8) */
#define NEG (-3.0e38f)

int paged_attention_tiled_available(void) { return 1; }

#include "bf16.h"
#include "kv_rows.h" /* kv_load_row, kv_row_bytes: a cache row of any kind */
#include "simd_exp.h"
#include "prefetch.h"

/* The fp32 vector of VL rows (or dims) and its operations, as thin wrappers over the AVX-512 or AVX2 intrinsics.
 * A mask (vmask) holds the lanes whose row sees a key: a __mmask16, or all-ones lanes of a __m256. */
#ifdef __AVX512F__
#define VL 16
typedef __m512 vfloat;
typedef __m512i vint;
typedef __mmask16 vmask;
#define V(op) _mm512_##op /* V(fmadd_ps): the fp32 op on VL lanes */
#define vexp exp_approx16
#define vexp_bf16 exp_bf16_16
#define vload_i(p) _mm512_loadu_si512((const void *)(p))
#define vload_bf16 bf16x16_load
#define VREG(x) ((void)0)
/* rows whose position is at least key j: they see it */
static inline vmask vsees(int32_t j, vint pos) { return _mm512_cmp_epi32_mask(_mm512_set1_epi32(j), pos, _MM_CMPINT_LE); }
static inline vfloat vmax_masked(vfloat mx, vmask keep, vfloat s) { return _mm512_mask_max_ps(mx, keep, mx, s); }
static inline vfloat vkeep(vmask keep, vfloat p) { return _mm512_maskz_mov_ps(keep, p); }
static inline int vall_equal(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ) == 0; }
#else
#define VL 8
typedef __m256 vfloat;
typedef __m256i vint;
typedef __m256 vmask;
#define V(op) _mm256_##op
#define vexp exp_approx8
#define vexp_bf16 exp_approx8 /* unused: bf16 numerators need AVX512-BF16 */
#define vload_i(p) _mm256_loadu_si256((const __m256i *)(p))
/* Pins a tile's row vector to a register: otherwise GCC folds its load into every FMA, one 256-bit load a FMA,
 * and the tiles run at the load rate rather than the FMA rate. */
#define VREG(x) __asm__("" : "+x"(x))
#define vload_bf16 bf16x8_load
/* pos > j - 1, i.e. j <= pos (j >= 0, so j - 1 does not wrap) */
static inline vmask vsees(int32_t j, vint pos) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(pos, _mm256_set1_epi32(j - 1)));
}
static inline vfloat vmax_masked(vfloat mx, vmask keep, vfloat s) { return _mm256_blendv_ps(mx, _mm256_max_ps(mx, s), keep); }
static inline vfloat vkeep(vmask keep, vfloat p) { return _mm256_and_ps(keep, p); }
static inline int vall_equal(vfloat a, vfloat b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NEQ_UQ)) == 0; }
#endif

/* S^T[j..j+KA)[r0..r0+VL*NV) = K[j..j+KA) . QT[:, r0..]: KA x NV accumulators held in registers.
 * KA x NV is kept near 16 (12 or 8 on AVX2, whose 16 ymm registers also hold the NV row vectors and the broadcast)
 * so enough independent FMA chains hide the FMA latency even for one row vector. */
static inline __attribute__((always_inline)) void qk_tile(const float *restrict QT, int RP, const float *restrict kf,
                                                         int D, int j, int r0, float *restrict ST, const int KA,
                                                         const int NV, float *restrict MX) {
    vfloat acc[16][4];
#pragma GCC unroll 16
    for (int a = 0; a < KA; a++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) acc[a][b] = V(setzero_ps)();
    const float *k0 = kf + (int64_t)j * D;
    for (int d = 0; d < D; d++) {
        const float *qt = QT + (int64_t)d * RP + r0;
        vfloat qv[4];
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) {
            qv[b] = V(loadu_ps)(qt + VL * b);
            VREG(qv[b]);
        }
#pragma GCC unroll 16
        for (int a = 0; a < KA; a++) {
            const vfloat kb = V(set1_ps)(k0[a * D + d]);
#pragma GCC unroll 4
            for (int b = 0; b < NV; b++) acc[a][b] = V(fmadd_ps)(kb, qv[b], acc[a][b]);
        }
    }
#pragma GCC unroll 16
    for (int a = 0; a < KA; a++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) V(storeu_ps)(ST + (int64_t)(j + a) * RP + r0 + VL * b, acc[a][b]);
    if (MX) {
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) {
            vfloat mx = V(loadu_ps)(MX + r0 + VL * b);
#pragma GCC unroll 16
            for (int a = 0; a < KA; a++) mx = V(max_ps)(mx, acc[a][b]);
            V(storeu_ps)(MX + r0 + VL * b, mx);
        }
    }
}

/* O^T[d0..d0+TD)[r0..] += sum_{j < nk} V[j][d0..d0+TD) * P^T[j][r0..]. */
static inline __attribute__((always_inline)) void pv_tile(float *restrict OT, int RP, const float *restrict vf,
                                                         int D, int nk, int d0, int r0, const float *restrict ST,
                                                         const int TD, const int NV) {
    vfloat acc[16][4];
#pragma GCC unroll 16
    for (int t = 0; t < TD; t++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) acc[t][b] = V(loadu_ps)(OT + (int64_t)(d0 + t) * RP + r0 + VL * b);
    for (int jj = 0; jj < nk; jj++) {
        const float *p = ST + (int64_t)jj * RP + r0;
        vfloat pv[4];
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) {
            pv[b] = V(loadu_ps)(p + VL * b);
            VREG(pv[b]);
        }
        const float *vr = vf + (int64_t)jj * D + d0;
#pragma GCC unroll 16
        for (int t = 0; t < TD; t++) {
            const vfloat vb = V(set1_ps)(vr[t]);
#pragma GCC unroll 4
            for (int b = 0; b < NV; b++) acc[t][b] = V(fmadd_ps)(vb, pv[b], acc[t][b]);
        }
    }
#pragma GCC unroll 16
    for (int t = 0; t < TD; t++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) V(storeu_ps)(OT + (int64_t)(d0 + t) * RP + r0 + VL * b, acc[t][b]);
}

#ifdef __AVX512BF16__
#define HAVE_DP 1
/* S^T[j..j+KA)[r0..] = scale * K[j..j+KA) . Q over d-pairs; KP: the chunk's K rows packed, D2 pairs a row. */
static inline __attribute__((always_inline)) void qk_tile_bf(const uint32_t *restrict QP, int RP,
                                                            const uint32_t *restrict KP, int D2, int j, int r0,
                                                            float scale, float *restrict ST, const int KA,
                                                            const int NV) {
    __m512 acc[16][4];
#pragma GCC unroll 16
    for (int a = 0; a < KA; a++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) acc[a][b] = _mm512_setzero_ps();
    const uint32_t *k0 = KP + (int64_t)j * D2;
    for (int p = 0; p < D2; p++) {
        const uint32_t *qp = QP + (int64_t)p * RP + r0;
        __m512i qv[4];
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) qv[b] = _mm512_loadu_si512((const void *)(qp + 16 * b));
#pragma GCC unroll 16
        for (int a = 0; a < KA; a++) {
            const __m512i kb = _mm512_set1_epi32((int)k0[a * D2 + p]);
#pragma GCC unroll 4
            for (int b = 0; b < NV; b++) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], (__m512bh)qv[b], (__m512bh)kb);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 16
    for (int a = 0; a < KA; a++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++)
            _mm512_storeu_ps(ST + (int64_t)(j + a) * RP + r0 + 16 * b, _mm512_mul_ps(acc[a][b], sc));
}

/* O^T[d0..d0+TD)[r0..] += sum over key pairs of V pair . P pair. */
static inline __attribute__((always_inline)) void pv_tile_bf(float *restrict OT, int RP, const uint32_t *restrict VP,
                                                            int D, int njp, int d0, int r0,
                                                            const uint32_t *restrict PP, const int TD, const int NV) {
    __m512 acc[16][4];
#pragma GCC unroll 16
    for (int t = 0; t < TD; t++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) acc[t][b] = _mm512_loadu_ps(OT + (int64_t)(d0 + t) * RP + r0 + 16 * b);
    for (int jp = 0; jp < njp; jp++) {
        const uint32_t *p = PP + (int64_t)jp * RP + r0;
        __m512i pv[4];
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) pv[b] = _mm512_loadu_si512((const void *)(p + 16 * b));
        const uint32_t *vr = VP + (int64_t)jp * D + d0;
#pragma GCC unroll 16
        for (int t = 0; t < TD; t++) {
            const __m512i vb = _mm512_set1_epi32((int)vr[t]);
#pragma GCC unroll 4
            for (int b = 0; b < NV; b++) acc[t][b] = _mm512_dpbf16_ps(acc[t][b], (__m512bh)pv[b], (__m512bh)vb);
        }
    }
#pragma GCC unroll 16
    for (int t = 0; t < TD; t++)
#pragma GCC unroll 4
        for (int b = 0; b < NV; b++) _mm512_storeu_ps(OT + (int64_t)(d0 + t) * RP + r0 + 16 * b, acc[t][b]);
}

/* VP[d] = (V_a[d], V_b[d]) as one bf16 pair (V_b may be NULL: a zero key). */
static inline void pack_v_pair(const uint16_t *a, const uint16_t *b, int D, uint32_t *restrict VP) {
    int d = 0;
    if (b != NULL) {
        const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                            55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
        for (; d + 32 <= D; d += 32) {
            const __m512i va = _mm512_loadu_si512((const void *)(a + d));
            const __m512i vb = _mm512_loadu_si512((const void *)(b + d));
            _mm512_storeu_si512((void *)(VP + d), _mm512_permutex2var_epi16(va, lo, vb));
            _mm512_storeu_si512((void *)(VP + d + 16), _mm512_permutex2var_epi16(va, hi, vb));
        }
    }
    for (; d < D; d++) VP[d] = (uint32_t)a[d] | ((uint32_t)(b != NULL ? b[d] : 0) << 16);
}

/* PP[0..16) = (a[r], b[r]) rounded to bf16 pairs, for the 16 rows of a vector. */
static inline void pack_p_pair(__m512 a, __m512 b, uint32_t *restrict PP) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i z = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* [a0..a15, b0..b15] */
    _mm512_storeu_si512((void *)PP, _mm512_permutexvar_epi16(idx, z));
}
#else
#define HAVE_DP 0
#endif

/* Tile shapes by row vectors (nrv): the FMA chains of a tile are its keys (or dims) x row vectors, kept
 * near 16 (AVX2: 8 to 12) so a verify step's single row vector still runs at the FMA rate rather than its latency.
 * Key tiles divide KB: a chunk's keys rounded up to whole tiles stay within the buffers. */
#ifdef __AVX512F__
static inline int keys_per_tile(int nrv) { return nrv == 1 ? 16 : nrv == 2 ? 8 : 4; }

static inline int dims_per_tile(int nrv, int D) {
    if (nrv == 1 && D % 16 == 0) return 16;
    if (nrv <= 2 && D % 8 == 0) return 8;
    return 4;
}

/* One call TILE(r0, W, NV) per register tile of a key (or dim) step: W keys (or dims) x NV row vectors starting
 * at row r0, every argument a compile-time constant so each call inlines to straight-line code. w is
 * keys_per_tile(nrv) or dims_per_tile(nrv, D): 16 only for one row vector, 8 for at most two. */
#define ROW_TILES(w, nrv, TILE)                                           \
    do {                                                                  \
        if ((w) == 16) { TILE(0, 16, 1); break; }                         \
        if ((w) == 8) {                                                   \
            if ((nrv) == 1) TILE(0, 8, 1); else TILE(0, 8, 2);            \
            break;                                                        \
        }                                                                 \
        int b_ = 0;                                                       \
        for (; b_ + 4 <= (nrv); b_ += 4) TILE(VL * b_, 4, 4);             \
        switch ((nrv) - b_) {                                             \
            case 3: TILE(VL * b_, 4, 3); break;                           \
            case 2: TILE(VL * b_, 4, 2); break;                           \
            case 1: TILE(VL * b_, 4, 1); break;                           \
            default: break;                                               \
        }                                                                 \
    } while (0)
#else
/* AVX2: 16 ymm registers hold W x NV accumulators + NV row vectors + 1 broadcast, so at most 4 x 3 (or 8 x 1) */
static inline int keys_per_tile(int nrv) { return nrv == 1 ? 8 : 4; }

static inline int dims_per_tile(int nrv, int D) { return nrv == 1 && D % 8 == 0 ? 8 : 4; }

/* As above, in tiles of 3 row vectors; a remainder of one is taken as 2 + 2 instead of 3 + 1, since a 4 x 1
 * tile has only 4 FMA chains. w is 8 only for one row vector. */
#define ROW_TILES(w, nrv, TILE)                                           \
    do {                                                                  \
        if ((w) == 8) { TILE(0, 8, 1); break; }                           \
        const int n3_ = (nrv) > 1 && (nrv) % 3 == 1 ? (nrv) - 4 : (nrv);  \
        int b_ = 0;                                                       \
        for (; b_ + 3 <= n3_; b_ += 3) TILE(VL * b_, 4, 3);               \
        for (; b_ + 2 <= (nrv); b_ += 2) TILE(VL * b_, 4, 2);             \
        if (b_ < (nrv)) TILE(VL * b_, 4, 1);                              \
    } while (0)
#endif

/* The next chunk's K and V rows, prefetched a few at a time between register tiles: a burst of ~256 prefetches at
 * a chunk's start waits for free line fill buffers. */
typedef struct {
    const char *k, *v;
    const int64_t *slots; /* the next chunk's slots */
    int64_t n, done;      /* rows to prefetch, rows prefetched */
    int64_t row_mul;      /* row offset in bytes = slot * row_mul + head_off */
    int64_t head_off;
    int bytes;            /* bytes a row (one kv head) */
} Prefetch;

static inline void prefetch_upto(Prefetch *pf, int64_t upto) {
    if (upto > pf->n) upto = pf->n;
    for (; pf->done < upto; pf->done++) {
        const int64_t off = pf->slots[pf->done] * pf->row_mul + pf->head_off;
        prefetch_bytes(pf->k + off, pf->bytes, 0);
        prefetch_bytes(pf->v + off, pf->bytes, 0);
    }
}

/* Every row vector against keys [0, nka) of the chunk (nka a multiple of keys_per_tile(nrv)). */
static void qk_chunk(const float *QT, int RP, const float *kf, int D, int nka, int nrv, float *ST, float *MX,
                     Prefetch *pf) {
    const int ka = keys_per_tile(nrv);
#define QK(r0, W, NV) qk_tile(QT, RP, kf, D, j, r0, ST, W, NV, MX)
    /* half of the prefetches during Q.K, spread over its key steps */
    for (int j = 0; j < nka; j += ka) {
        if (pf) prefetch_upto(pf, (pf->n * (j + ka) + 2 * nka - 1) / (2 * nka));
        ROW_TILES(ka, nrv, QK);
    }
#undef QK
}

/* O^T += V^T P^T over the chunk's nk keys. */
static void pv_chunk(float *OT, int RP, const float *vf, int D, int nk, int nrv, const float *ST, Prefetch *pf) {
    const int td = dims_per_tile(nrv, D);
#define PV(r0, W, NV) pv_tile(OT, RP, vf, D, nk, d0, r0, ST, W, NV)
    /* the other half during P.V */
    for (int d0 = 0; d0 < D; d0 += td) {
        if (pf) prefetch_upto(pf, pf->n / 2 + (pf->n - pf->n / 2) * (d0 + td) / D);
        ROW_TILES(td, nrv, PV);
    }
#undef PV
}

#if HAVE_DP
static void qk_chunk_bf(const uint32_t *QP, int RP, const uint32_t *KP, int D2, int nka, int nrv, float scale,
                        float *ST) {
    const int ka = keys_per_tile(nrv);
#define QK(r0, W, NV) qk_tile_bf(QP, RP, KP, D2, j, r0, scale, ST, W, NV)
    for (int j = 0; j < nka; j += ka) ROW_TILES(ka, nrv, QK);
#undef QK
}

/* O^T += V^T P^T over the chunk's njp key pairs. */
static void pv_chunk_bf(float *OT, int RP, const uint32_t *VP, int D, int njp, int nrv, const uint32_t *PP) {
    const int td = dims_per_tile(nrv, D);
#define PV(r0, W, NV) pv_tile_bf(OT, RP, VP, D, njp, d0, r0, PP, W, NV)
    for (int d0 = 0; d0 < D; d0 += td) ROW_TILES(td, nrv, PV);
#undef PV
}
#endif

/* Per-thread work buffers. */
typedef struct {
    float *QT, *OT, *ST, *kf, *vf, *m, *l, *mx;
    int32_t *pos;
    uint32_t *QP, *PP, *VP, *KP;
} Buffers;

static int buffers_alloc(Buffers *b, int D) {
    b->QT = aligned_alloc(64, sizeof(float) * D * MAX_ROWS);
    b->OT = aligned_alloc(64, sizeof(float) * D * MAX_ROWS);
    b->ST = aligned_alloc(64, sizeof(float) * KB * MAX_ROWS);
    b->kf = aligned_alloc(64, sizeof(float) * KB * D);
    b->vf = aligned_alloc(64, sizeof(float) * KB * D);
    b->m = aligned_alloc(64, sizeof(float) * MAX_ROWS);
    b->l = aligned_alloc(64, sizeof(float) * MAX_ROWS);
    b->mx = aligned_alloc(64, sizeof(float) * MAX_ROWS);
    b->pos = aligned_alloc(64, sizeof(int32_t) * MAX_ROWS);
    b->QP = aligned_alloc(64, sizeof(uint32_t) * D * MAX_ROWS); /* [D/2][MAX_ROWS], rounded up */
    b->PP = aligned_alloc(64, sizeof(uint32_t) * KB * MAX_ROWS);
    b->VP = aligned_alloc(64, sizeof(uint32_t) * KB * D);
    b->KP = aligned_alloc(64, sizeof(uint16_t) * KB * D); /* [KB][D/2] pairs: the chunk's K rows, packed */
    return b->QT && b->OT && b->ST && b->kf && b->vf && b->m && b->l && b->mx && b->pos && b->QP && b->PP && b->VP && b->KP;
}

static void buffers_free(Buffers *b) {
    free(b->QT); free(b->OT); free(b->ST); free(b->kf); free(b->vf); free(b->m); free(b->l); free(b->mx); free(b->pos);
    free(b->QP); free(b->PP); free(b->VP); free(b->KP);
}

/* One work item: query positions [i0, i0 + ni) of a sequence, kv head g. */
static void attend_block(const float *q, const void *k, const void *v, int kind, const int64_t *slots,
                         int64_t q_start, int64_t q_len, int64_t kv_len, int64_t i0, int ni, int g, int H, int Hkv,
                         int D, float scale, float *out, Buffers *B, int dp, int pbf) {
    const int G = H / Hkv;
    const int rows = ni * G;
    const int nrv = (rows + VL - 1) / VL;
    const int RP = nrv * VL;
    const int ka = keys_per_tile(nrv);
    const int64_t first_pos = kv_len - q_len + i0; /* context position of the block's first query */
    const int64_t nkeys = first_pos + ni;          /* keys 0 .. first_pos + ni - 1 are visible to someone */
    float *QT = B->QT, *OT = B->OT, *ST = B->ST, *kf = B->kf, *vf = B->vf, *m = B->m, *l = B->l;
    int32_t *pos = B->pos;

    for (int r = 0; r < RP; r++) {
        const float *qv = r < rows ? q + ((q_start + i0 + r / G) * H + (int64_t)g * G + r % G) * D : NULL;
        if (dp) {
#if HAVE_DP
            for (int p = 0; p < D / 2; p++)
                B->QP[(int64_t)p * RP + r] = qv ? f32_to_bf16(qv[2 * p]) | ((uint32_t)f32_to_bf16(qv[2 * p + 1]) << 16) : 0u;
#endif
        } else {
            for (int d = 0; d < D; d++) QT[(int64_t)d * RP + r] = qv ? qv[d] * scale : 0.f;
        }
        /* padding rows: zero queries that see every key, their output is dropped */
        pos[r] = (int32_t)(qv ? first_pos + r / G : nkeys - 1);
        m[r] = NEG;
        l[r] = 0.f;
    }
    memset(OT, 0, sizeof(float) * D * RP);

    for (int64_t j0 = 0; j0 < nkeys; j0 += KB) {
        const int nk = (int)(nkeys - j0 < KB ? nkeys - j0 : KB);
        const int nka = (nk + ka - 1) / ka * ka; /* keys rounded up to whole tiles; the extra keys are zero */
        /* K/V rows sit wherever their slots put them, out of the hardware prefetchers' reach: the next chunk's K
         * rows and this chunk's V rows (read after the softmax with pair products) are asked for now. Spans of at
         * most 32 query rows (verify: two 16-lane or four 8-lane row vectors) with fp32 products, which copy K and
         * V at a chunk's start and have little compute a chunk to hide the wait, take the next chunk's K and V a
         * few rows between tiles instead (kernel alone, 4 x 9 queries x 6000 keys: 3.76 -> 3.33 ms; Zen 3, whole
         * steps, verify 4 x 9 @6k: 361 -> 301 ms; the same for a 2048-token prefill, whose K/V sit in L2: 27.7 ->
         * 29.9 ms, hence only for short spans). */
        const int64_t nnext = nkeys - j0 - KB < KB ? nkeys - j0 - KB : KB;
        const int64_t rb = kv_row_bytes(kind, D); /* bytes a (slot, kv head) row, scale included */
        Prefetch pfs, *pf = NULL;
        if (pbf || RP > 32) {
            for (int jj = 0; jj < nnext; jj++) prefetch_bytes((const char *)k + (slots[j0 + KB + jj] * Hkv + g) * rb, (int)rb, 0);
            for (int jj = 0; jj < nk; jj++) prefetch_bytes((const char *)v + (slots[j0 + jj] * Hkv + g) * rb, (int)rb, 0);
        } else {
            pfs = (Prefetch){(const char *)k, (const char *)v, slots + j0 + KB, nnext > 0 ? nnext : 0, 0,
                             (int64_t)Hkv * rb, (int64_t)g * rb, (int)rb};
            pf = &pfs;
        }
        for (int jj = 0; jj < nk; jj++) {
            const int64_t row = slots[j0 + jj] * Hkv + g;
            if (dp) memcpy(B->KP + (int64_t)jj * (D / 2), (const uint16_t *)k + row * D, sizeof(uint16_t) * D);
            else kv_load_row(k, kind, row, D, kf + (int64_t)jj * D);
            if (!pbf) kv_load_row(v, kind, row, D, vf + (int64_t)jj * D);
        }
        if (dp)
            memset(B->KP + (int64_t)nk * (D / 2), 0, sizeof(uint16_t) * D * (nka - nk));
        else
            memset(kf + (int64_t)nk * D, 0, sizeof(float) * D * (nka - nk));
        /* does any (key, row) of this chunk fall past its row's causal limit? */
        const int masked = j0 + nk - 1 > first_pos;
        /* scores */
        int fused = 0;
#if HAVE_DP
        if (dp) qk_chunk_bf(B->QP, RP, B->KP, D / 2, nka, nrv, scale, ST);
        else
#endif
        {
            /* the chunk's row maxima come out of the score tiles when every key is real and visible to every row */
            fused = nka == nk && !masked;
            if (fused)
                for (int r = 0; r < RP; r += VL) V(storeu_ps)(B->mx + r, V(set1_ps)(NEG));
            qk_chunk(QT, RP, kf, D, nka, nrv, ST, fused ? B->mx : NULL, pf);
        }
        /* online softmax down the key axis, VL rows a vector; P^T overwrites S^T */
        for (int b = 0; b < nrv; b++) {
            const int r0 = VL * b;
            const vint pv = vload_i(pos + r0);
            vfloat mx = V(set1_ps)(NEG);
            if (fused) mx = V(loadu_ps)(B->mx + r0);
            else for (int jj = 0; jj < nk; jj++) {
                const vfloat s = V(loadu_ps)(ST + (int64_t)jj * RP + r0);
                if (masked) {
                    mx = vmax_masked(mx, vsees((int32_t)(j0 + jj), pv), s);
                } else {
                    mx = V(max_ps)(mx, s);
                }
            }
            const vfloat mold = V(loadu_ps)(m + r0);
            const vfloat mnew = V(max_ps)(mold, mx);
            const vfloat alpha = vexp(V(sub_ps)(mold, mnew));
            vfloat sum = V(setzero_ps)();
#define NUMERATOR(jj, p)                                                                                            \
    do {                                                                                                            \
        const vfloat x_ = V(sub_ps)(V(loadu_ps)(ST + (int64_t)(jj) * RP + r0), mnew);                               \
        p = pbf ? vexp_bf16(x_) : vexp(x_);                                                                         \
        if (masked) p = vkeep(vsees((int32_t)(j0 + (jj)), pv), p);                                                  \
    } while (0)
            if (pbf) {
#if HAVE_DP
                /* P straight into bf16 pairs for P.V: PP[jp][r] = (P[2jp][r], P[2jp+1][r]) */
                for (int jj = 0; jj < nk; jj += 2) {
                    __m512 pa, pb = _mm512_setzero_ps();
                    NUMERATOR(jj, pa);
                    sum = _mm512_add_ps(sum, pa);
                    if (jj + 1 < nk) {
                        NUMERATOR(jj + 1, pb);
                        sum = _mm512_add_ps(sum, pb);
                    }
                    pack_p_pair(pa, pb, B->PP + (int64_t)(jj / 2) * RP + r0);
                }
#endif
            } else {
                for (int jj = 0; jj < nk; jj++) {
                    vfloat p;
                    NUMERATOR(jj, p);
                    V(storeu_ps)(ST + (int64_t)jj * RP + r0, p);
                    sum = V(add_ps)(sum, p);
                }
            }
#undef NUMERATOR
            V(storeu_ps)(m + r0, mnew);
            V(storeu_ps)(l + r0, V(fmadd_ps)(V(loadu_ps)(l + r0), alpha, sum));
            /* alpha is exactly 1 in every lane when no row's max moved (most chunks after the first few) */
            if (vall_equal(mnew, mold)) continue;
            for (int d = 0; d < D; d++) {
                float *o = OT + (int64_t)d * RP + r0;
                V(storeu_ps)(o, V(mul_ps)(V(loadu_ps)(o), alpha));
            }
        }
        /* O^T += V^T P^T */
        if (pbf) {
#if HAVE_DP
            const int njp = (nk + 1) / 2;
            for (int jp = 0; jp < njp; jp++) {
                const int ja = 2 * jp, jb = 2 * jp + 1;
                const uint16_t *va = (const uint16_t *)v + (slots[j0 + ja] * Hkv + g) * D;
                const uint16_t *vb = jb < nk ? (const uint16_t *)v + (slots[j0 + jb] * Hkv + g) * D : NULL;
                pack_v_pair(va, vb, D, B->VP + (int64_t)jp * D);
            }
            pv_chunk_bf(OT, RP, B->VP, D, njp, nrv, B->PP);
#endif
            continue;
        }
        pv_chunk(OT, RP, vf, D, nk, nrv, ST, pf);
    }
    for (int r = 0; r < rows; r++) {
        const int i = r / G, h = r % G;
        float *o = out + ((q_start + i0 + i) * H + (int64_t)g * G + h) * D;
        const float inv = 1.f / l[r];
        for (int d = 0; d < D; d++) o[d] = OT[(int64_t)d * RP + r] * inv;
    }
}

int paged_attention_tiled(const float *q, const void *k, const void *v, int kv_kind, const int64_t *slots,
                          const int64_t *seqs, int n_seqs, int H, int Hkv, int D, float scale, float *out,
                          int mode) {
    const int G = H / Hkv;
    if (G > MAX_ROWS || (D & 3) != 0) return 2;
    const int dp = HAVE_DP && kv_kind == KV_BF16 && !(mode & 2); /* bf16 pair products for Q.K */
    const int pbf = dp && (mode & 1);                  /* ... and for P.V */
    const int QB = MAX_ROWS / G; /* query positions per work item */
    int64_t n_items = 0;
    for (int s = 0; s < n_seqs; s++) n_items += Hkv * ((seqs[4 * s + 1] + QB - 1) / QB);
    int64_t *items = malloc(sizeof(int64_t) * 3 * (n_items ? n_items : 1));
    if (!items) return 1;
    int64_t it = 0;
    /* the last query blocks of a sequence see the most keys: list them first for the dynamic schedule */
    for (int s = 0; s < n_seqs; s++) {
        const int64_t nb = (seqs[4 * s + 1] + QB - 1) / QB;
        for (int64_t blk = nb - 1; blk >= 0; blk--)
            for (int g = 0; g < Hkv; g++, it++) {
                items[3 * it] = s;
                items[3 * it + 1] = g;
                items[3 * it + 2] = blk;
            }
    }
    int failed = 0;
#pragma omp parallel
    {
        Buffers B;
        const int ok = buffers_alloc(&B, D);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items; w++) {
            if (!ok) continue;
            const int64_t *sq = seqs + 4 * items[3 * w];
            const int64_t i0 = items[3 * w + 2] * QB;
            const int ni = (int)(sq[1] - i0 < QB ? sq[1] - i0 : QB);
            attend_block(q, k, v, kv_kind, slots + sq[2], sq[0], sq[1], sq[3], i0, ni, (int)items[3 * w + 1], H,
                         Hkv, D, scale, out, &B, dp, pbf);
        }
        buffers_free(&B);
    }
    free(items);
    return failed ? 1 : 0;
}
#endif
