/* Short-query paged attention for CPU: decode (1 query) and speculative verify (k+1 queries).
 *
 * Reads K/V straight from the token-slot pool through each sequence's slot list,
 * so nothing is gathered into a temporary; each K/V row is loaded once and used by
 * every query head of its KV group (GQA) and every query position of the sequence.
 * Keys are split into chunks (flash-decoding): work items (sequence, chunk) run in
 * parallel, each over every kv head in turn (a slot's [Hkv, D] row is read whole, in
 * order), and keep an unnormalised partial (max, sum, acc) per head; a merge pass
 * combines the chunks with log-sum-exp rescaling.
 *
 * Layouts (row-major):
 *   q        [num_q_tokens, H, D] float32
 *   k, v     [num_slots, Hkv, D] float32 (kv_kind 0) or bfloat16 (1), or [num_slots, Hkv, D + 4] bytes of int8 (2)
 *            or fp8 e4m3 (3) rows with their fp32 scale (kv_rows.h, deltaserve/kv/quant.py)
 *   slots    [sum of kv_len] int64, the sequences' slot lists concatenated
 *   seqs     [n_seqs, 4] int64: q_start, q_len, kv_offset (into slots), kv_len
 *   out      [num_q_tokens, H, D] float32 (rows of queries not in any sequence are untouched)
 * Query i of a sequence sits at context position kv_len - q_len + i and sees keys 0..that position.
 * mode bit 0 (pairs), with a bf16, int8 or fp8 cache, AVX512-BF16 and D a multiple of 32: both products run as bf16
 * pair dot products (vdpbf16ps, fp32 accumulation) with keys on lanes, so a bf16 K or V row is used as loaded
 * (int8 / fp8 rows: as their exact bf16 values, the scales applied to scores and P): q and the softmax numerators
 * are rounded to bf16 (q is bf16 in a bf16 model; P rounded as the tiled kernel's p_bf16 mode does). Otherwise K/V rows are converted (int8 / fp8: dequantized) to fp32 a chunk at a time and both
 * products run in fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define HAVE_AVX2_ONLY 1 /* AMD Zen 3, client chips: 8-lane paths below where AVX-512 has 16-lane ones */
#else
#define HAVE_AVX2_ONLY 0
#endif

#define CHUNK 256
#define PF_AHEAD 16 /* keys ahead whose rows the fp32 path prefetches */

#include "bf16.h"
#include "kv_rows.h" /* kv_load_row: a cache row of any kind as fp32 */
#include "prefetch.h"

/* exp(x) as 2^n * 2^f, |f| <= 1/2, with a degree-7 Taylor polynomial (relative error ~1e-7);
 * written without libm so the loops that call it vectorise. Inputs here are <= 0. */
static inline float exp_approx(float x) {
    x = fmaxf(x, -87.f);
    const float t = x * 1.4426950408889634f;
    const float n = floorf(t + 0.5f);
    const float f = t - n;
    float p = 1.5252733804059840e-5f;
    p = p * f + 1.5403530393381608e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * c.f;
}

#include "simd_exp.h" /* exp_approx16: the same polynomial on 16 lanes */

/* Keys j0 .. j0 + n - 1 of a chunk of nk keys are visible to query i of q_len (at context position kv_len - q_len + i;
 * causal): this n, a prefix of the chunk, 0 when the query comes before it. */
static inline int visible_keys(int64_t kv_len, int q_len, int i, int j0, int nk) {
    const int64_t nv = kv_len - q_len + i - j0 + 1;
    return nv < 0 ? 0 : (nv > nk ? nk : (int)nv);
}

#if HAVE_AVX2_ONLY
static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

/* The 8 lanes of each of a..h summed: [sum a, sum b, ..., sum h] (a transpose-add tree, 7 hadds/permutes
 * for 8 reductions instead of 8 separate shuffle chains). */
static inline __m256 hsum8x8(__m256 a, __m256 b, __m256 c, __m256 d, __m256 e, __m256 f, __m256 g, __m256 h) {
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d); /* [a01 a23 b01 b23 | a45 a67 b45 b67] */
    const __m256 ef = _mm256_hadd_ps(e, f), gh = _mm256_hadd_ps(g, h);
    const __m256 abcd = _mm256_hadd_ps(ab, cd), efgh = _mm256_hadd_ps(ef, gh); /* [a b c d | a b c d] halves */
    return _mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20), _mm256_permute2f128_ps(abcd, efgh, 0x31));
}
#endif

/* s[0..n) <- exp(s - max), returns (max, sum) through the pointers. n > 0. */
static inline void softmax_numerators(float *restrict s, int n, float *m_out, float *l_out) {
#ifdef __AVX512F__
    __m512 mv = _mm512_set1_ps(-3.0e38f);
    int j = 0;
    for (; j + 16 <= n; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + j));
    if (j < n) mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, (__mmask16)((1u << (n - j)) - 1), s + j));
    const float m = _mm512_reduce_max_ps(mv);
    const __m512 mb = _mm512_set1_ps(m);
    __m512 lv = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
        const __m512 p = exp_approx16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mb));
        _mm512_storeu_ps(s + j, p);
        lv = _mm512_add_ps(lv, p);
    }
    if (j < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
        const __m512 p = exp_approx16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mb));
        _mm512_mask_storeu_ps(s + j, k, p);
        lv = _mm512_add_ps(lv, _mm512_maskz_mov_ps(k, p));
    }
    *m_out = m;
    *l_out = _mm512_reduce_add_ps(lv);
#elif HAVE_AVX2_ONLY
    __m256 mv = _mm256_set1_ps(-3.0e38f);
    int j = 0;
    for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    float m = hmax8(mv);
    for (int t = j; t < n; t++) m = s[t] > m ? s[t] : m;
    const __m256 mb = _mm256_set1_ps(m);
    __m256 lv = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 p = exp_approx8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mb));
        _mm256_storeu_ps(s + j, p);
        lv = _mm256_add_ps(lv, p);
    }
    float l = hsum8(lv);
    for (; j < n; j++) {
        s[j] = exp_approx(s[j] - m);
        l += s[j];
    }
    *m_out = m;
    *l_out = l;
#else
    float m = -3.0e38f, l = 0.f;
    for (int j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    for (int j = 0; j < n; j++) {
        s[j] = exp_approx(s[j] - m);
        l += s[j];
    }
    *m_out = m;
    *l_out = l;
#endif
}

/* q . k over D floats. The AVX-512 path reduces with a shuffle tree; GCC's own reduction
 * epilogue for `omp simd` was a scalar chain that cost more than the multiplies. */
static inline __attribute__((always_inline)) float dot(const float *restrict a, const float *restrict b, int D) {
#ifdef __AVX512F__
    if ((D & 15) == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
        for (int d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

#if HAVE_AVX2_ONLY
/* s[j] = scale * q . K[j] for the first nvis rounded down to 8 keys, 8 keys at a time: q held in registers
 * (D <= 64: 8 vectors), one accumulator a key (8 independent FMA chains hide the FMA latency), the 8 sums
 * reduced together. Returns the number of keys done. */
static inline __attribute__((always_inline)) int scores8(const float *restrict qv, const float *restrict rows, int D,
                                                        int nvis, float scale, float *restrict s) {
    __m256 qr[8];
    const int nc = D / 8;
    for (int c = 0; c < nc; c++) qr[c] = _mm256_loadu_ps(qv + 8 * c);
    const __m256 sc = _mm256_set1_ps(scale);
    int j = 0;
    for (; j + 8 <= nvis; j += 8) {
        __m256 acc[8];
        const float *k0 = rows + (int64_t)j * D;
        for (int a = 0; a < 8; a++) acc[a] = _mm256_mul_ps(qr[0], _mm256_loadu_ps(k0 + a * D));
        for (int c = 1; c < nc; c++)
            for (int a = 0; a < 8; a++) acc[a] = _mm256_fmadd_ps(qr[c], _mm256_loadu_ps(k0 + a * D + 8 * c), acc[a]);
        _mm256_storeu_ps(s + j, _mm256_mul_ps(hsum8x8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]), sc));
    }
    return j;
}
#endif

/* a[0..D) = sum_jj s[jj] * rows[jj][0..D) over the nvis visible keys, the D / W accumulators held in registers
 * (VT: a vector of W fp32 lanes, PFX: its intrinsics' prefix); D / W <= 8. */
#define PV_REGS(VT, W, PFX)                                                                          \
    do {                                                                                             \
        VT acc[8];                                                                                   \
        for (int c = 0; c < D / (W); c++) acc[c] = PFX##_setzero_ps();                               \
        for (int jj = 0; jj < nvis; jj++) {                                                          \
            const VT p = PFX##_set1_ps(s[jj]);                                                       \
            const float *r = rows + jj * D;                                                          \
            for (int c = 0; c < D / (W); c++) acc[c] = PFX##_fmadd_ps(p, PFX##_loadu_ps(r + (W) * c), acc[c]); \
        }                                                                                            \
        for (int c = 0; c < D / (W); c++) PFX##_storeu_ps(a + (W) * c, acc[c]);                      \
    } while (0)

/* One work item: queries of (seq, kv head g) against keys [j0, j1). Always inlined into
 * callers with a constant D so the per-row loops unroll into a few vector instructions. */
static inline __attribute__((always_inline)) void chunk_attend(const float *q, const void *k, const void *v, int kind, const int64_t *slots,
                         int64_t q_start, int q_len, int64_t kv_len, int j0, int j1, int g, int H, int Hkv,
                         int D, float scale, float *restrict m_out, float *restrict l_out, float *restrict acc_out,
                         float *restrict scores, float *restrict rows) {
    const int G = H / Hkv;
    const int nk = j1 - j0;
    /* K rows of the chunk, converted (dequantized) to fp32 once and shared by every query of the group. Rows sit
     * wherever their slots put them: head 0 prefetches the whole slot rows ahead (every head's, contiguous; V's into
     * L2), the later heads find them in L2. */
    const int64_t rb = kv_row_bytes(kind, D);
    for (int jj = 0; jj < nk; jj++) {
        if (g == 0 && jj + PF_AHEAD < nk) {
            prefetch_bytes((const char *)k + slots[j0 + jj + PF_AHEAD] * Hkv * rb, (int)(Hkv * rb), 0);
            prefetch_bytes((const char *)v + slots[j0 + jj + PF_AHEAD] * Hkv * rb, (int)(Hkv * rb), 1);
        }
        kv_load_row(k, kind, slots[j0 + jj] * Hkv + g, D, rows + jj * D);
    }
    int nvis_of[64];
    for (int i = 0; i < q_len; i++) {
        /* keys j0 .. j0 + nvis - 1 are visible to query i (a prefix of the chunk; causal) */
        const int nvis = visible_keys(kv_len, q_len, i, j0, nk);
        nvis_of[i] = nvis;
        for (int h = 0; h < G; h++) {
            const int qi = i * G + h;
            const float *qv = q + ((q_start + i) * H + g * G + h) * D;
            float *restrict s = scores + qi * CHUNK;
            int jj = 0;
#if HAVE_AVX2_ONLY
            if ((D & 7) == 0 && D <= 64) jj = scores8(qv, rows, D, nvis, scale, s);
#endif
            for (; jj < nvis; jj++) s[jj] = dot(qv, rows + jj * D, D) * scale;
            float m = -3.0e38f, l = 0.f;
            if (nvis > 0) softmax_numerators(s, nvis, &m, &l);
            m_out[qi] = m;
            l_out[qi] = l; /* 0 when no key of the chunk is visible: the merge skips it */
        }
    }
    /* V rows, then acc[qi] = sum_j p[qi][j] * V[j] with the accumulator held in registers */
    for (int jj = 0; jj < nk; jj++) kv_load_row(v, kind, slots[j0 + jj] * Hkv + g, D, rows + jj * D);
    for (int i = 0; i < q_len; i++) {
        const int nvis = nvis_of[i];
        for (int h = 0; h < G; h++) {
            const int qi = i * G + h;
            const float *restrict s = scores + qi * CHUNK;
            float *restrict a = acc_out + qi * D;
#ifdef __AVX512F__
            if ((D & 15) == 0 && D <= 128) {
                PV_REGS(__m512, 16, _mm512);
                continue;
            }
#elif HAVE_AVX2_ONLY
            if ((D & 7) == 0 && D <= 64) {
                PV_REGS(__m256, 8, _mm256);
                continue;
            }
#endif
            for (int d = 0; d < D; d++) a[d] = 0.f;
            for (int jj = 0; jj < nvis; jj++) {
                const float p = s[jj];
                const float *r = rows + jj * D;
#pragma omp simd
                for (int d = 0; d < D; d++) a[d] += p * r[d];
            }
        }
    }
}

#include "short_pairs.h" /* chunk_attend_pairs: the bf16 pair-product path */
#include "short_int8.h"  /* chunk_attend_int8: integer products on int8 rows */


/* Buffer `which` of the calling thread, at least `bytes` long, kept for the next call: the work buffers of a
 * decode step are ~100 KB-1 MB, which malloc serves with fresh mmap'd pages (zeroed by the kernel, page-faulted
 * in) on every call. Never freed; NULL when out of memory. */
static void *scratch(int which, size_t bytes) {
    static __thread void *buf[8];
    static __thread size_t cap[8];
    if (cap[which] < bytes) {
        free(buf[which]);
        buf[which] = malloc(bytes);
        cap[which] = buf[which] ? bytes : 0;
    }
    return buf[which];
}

int paged_attention_short(const float *q, const void *k, const void *v, int kv_kind, const int64_t *slots,
                          const int64_t *seqs, int n_seqs, int H, int Hkv, int D, float scale, float *out,
                          int mode) {
    const int G = H / Hkv;
    /* pair products: bf16 rows as stored, int8 / fp8 rows as their bf16 values and scales */
    /* int8 rows with mode bit 0: integer products on the bytes as stored (short_int8.h), on any AVX-512 CPU */
    const int ints = HAVE_INT8_DOTS && (mode & 1) && kv_kind == KV_INT8 && D % 32 == 0 && D <= 128;
    const int pairs = !ints && HAVE_PAIRS && (mode & 1) && kv_kind != KV_FP32 && D % 32 == 0 && D <= 128;
    /* work items: (seq, chunk of keys), each over every kv head in turn, so it reads whole slot rows
     * ([Hkv, D] contiguous) rather than one head's slice of each. Partial (item w, head g) sits at w * Hkv + g. */
    int64_t n_items = 0, max_q = 1;
    for (int s = 0; s < n_seqs; s++) {
        n_items += (seqs[4 * s + 3] + CHUNK - 1) / CHUNK;
        if (seqs[4 * s + 1] > max_q) max_q = seqs[4 * s + 1];
    }
    const int64_t nq_max = G * max_q, n_part = n_items * Hkv;
    int64_t *item_seq = scratch(0, sizeof(int64_t) * 2 * (n_items + 1));
    float *m_buf = scratch(1, sizeof(float) * (n_part * nq_max + 1));
    float *l_buf = scratch(2, sizeof(float) * (n_part * nq_max + 1));
    float *acc_buf = scratch(3, sizeof(float) * (n_part * nq_max * D + 1));
    int64_t *first_item = scratch(4, sizeof(int64_t) * (n_seqs + 1));
    if (!item_seq || !m_buf || !l_buf || !acc_buf || !first_item) return 1;
    int64_t it = 0;
    for (int s = 0; s < n_seqs; s++) {
        first_item[s] = it;
        const int64_t nchunks = (seqs[4 * s + 3] + CHUNK - 1) / CHUNK;
        for (int64_t c = 0; c < nchunks; c++, it++) {
            item_seq[2 * it] = s;
            item_seq[2 * it + 1] = c;
        }
    }
    first_item[n_seqs] = it;

    int failed = 0;
#pragma omp parallel
    {
        float *scores = scratch(5, sizeof(float) * nq_max * CHUNK);
        /* fp32 K/V rows, or in pairs mode the P pairs [nq_max][CHUNK / 2] and V pairs [CHUNK / 2][D], then for
         * quantized rows the chunk's bf16 K rows [CHUNK][D] and the K and V scales [CHUNK] each, and q's bf16 pairs
         * [nq_max rounded up to 4][D / 2]; the int8 path: P
         * [nq_max rounded up to 8][CHUNK] int16, the scales, P's step for each query row [nq_max] */
        const int64_t pp_n = (ints ? (nq_max + 7) & ~7 : nq_max) * CHUNK / 2, vp_n = ints ? 0 : CHUNK / 2 * D;
        float *row = scratch(6, sizeof(float) * (ints    ? pp_n + 2 * CHUNK + nq_max
                                                 : pairs ? pp_n + vp_n + CHUNK * D / 2 + 2 * CHUNK + ((nq_max + 3) & ~3) * D / 2
                                                         : CHUNK * D));
        if (!scores || !row) {
#pragma omp atomic write
            failed = 1;
        }
#if HAVE_INT8_DOTS || HAVE_PAIRS
        if (ints || pairs) {
            /* contiguous runs of items a thread (as schedule(static)), so an item knows the next one this thread
             * runs and fetches its rows ahead (into L2, spread over its own compute) */
            const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
            const int64_t w0 = n_items * tid / nt, w1 = n_items * (tid + 1) / nt;
            for (int64_t w = w0; w < w1 && scores && row; w++) {
                const int64_t *sq = seqs + 4 * item_seq[2 * w];
                const int64_t kv_len = sq[3], c = item_seq[2 * w + 1];
                const int j0 = (int)(c * CHUNK), j1 = (int)((c + 1) * CHUNK < kv_len ? (c + 1) * CHUNK : kv_len);
                const int64_t *nx_slots = NULL;
                int nx_n = 0;
                if (w + 1 < w1) {
                    const int64_t *nq = seqs + 4 * item_seq[2 * w + 2], nc = item_seq[2 * w + 3];
                    nx_slots = slots + nq[2] + nc * CHUNK;
                    nx_n = (int)((nc + 1) * CHUNK < nq[3] ? CHUNK : nq[3] - nc * CHUNK);
                }
                const int cold = w == w0;
                for (int g = 0; g < Hkv; g++) {
                    const int64_t pw = w * Hkv + g;
#if HAVE_INT8_DOTS
#define INTS(ND) chunk_attend_int8(q, k, v, slots + sq[2], sq[0], (int)sq[1], kv_len, j0, j1, g, H, Hkv, ND, scale, \
                                   m_buf + pw * nq_max, l_buf + pw * nq_max, acc_buf + pw * nq_max * D, scores,      \
                                   (int16_t *)row, row + pp_n, row + pp_n + CHUNK, row + pp_n + 2 * CHUNK, nx_slots, nx_n, \
                                   cold)
                    if (ints) {
                        if (D == 64) INTS(2);
                        else if (D == 128) INTS(4);
                        else if (D == 32) INTS(1);
                        else INTS(3);
                        continue;
                    }
#undef INTS
#endif
#if HAVE_PAIRS
#define PAIRS_Q(ND, QU) chunk_attend_pairs(q, k, v, QU, kv_kind, slots + sq[2], sq[0], (int)sq[1], kv_len, j0, j1, g, \
                                           H, Hkv, ND, scale, m_buf + pw * nq_max, l_buf + pw * nq_max,              \
                                           acc_buf + pw * nq_max * D, scores, (uint32_t *)row,                      \
                                           (uint32_t *)row + pp_n, (uint16_t *)(row + pp_n + vp_n),                 \
                                           row + pp_n + vp_n + CHUNK * D / 2, row + pp_n + vp_n + CHUNK * D / 2 + CHUNK, \
                                           (uint32_t *)(row + pp_n + vp_n + CHUNK * D / 2 + 2 * CHUNK), nx_slots, nx_n, cold)
#define PAIRS(ND)                                   \
    do {                                            \
        if (kv_kind == KV_BF16) PAIRS_Q(ND, 0);     \
        else PAIRS_Q(ND, 1);                        \
    } while (0)
                    if (D == 64) PAIRS(2);
                    else if (D == 128) PAIRS(4);
                    else if (D == 32) PAIRS(1);
                    else PAIRS(3);
#undef PAIRS_Q
#undef PAIRS
#endif
                }
            }
        } else
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items; w++) {
            if (!scores || !row) continue;
            const int64_t s = item_seq[2 * w], c = item_seq[2 * w + 1];
            const int64_t *sq = seqs + 4 * s;
            const int64_t kv_len = sq[3];
            const int j0 = (int)(c * CHUNK);
            const int j1 = (int)((c + 1) * CHUNK < kv_len ? (c + 1) * CHUNK : kv_len);
            for (int g = 0; g < Hkv; g++) {
                const int64_t pw = w * Hkv + g;
#define ATTEND(DD) chunk_attend(q, k, v, kv_kind, slots + sq[2], sq[0], (int)sq[1], kv_len, j0, j1, g, H, Hkv, \
                                DD, scale, m_buf + pw * nq_max, l_buf + pw * nq_max, acc_buf + pw * nq_max * D, \
                                scores, row)
                if (D == 64)
                    ATTEND(64);
                else if (D == 128)
                    ATTEND(128);
                else
                    ATTEND(D);
#undef ATTEND
            }
        }
    }
    if (failed) return 1;

    /* merge the chunks of each (seq, g) */
    for (int s = 0; s < n_seqs; s++) {
        const int64_t *sq = seqs + 4 * s;
        const int q_len = (int)sq[1];
        const int64_t nchunks = (sq[3] + CHUNK - 1) / CHUNK;
        for (int g = 0; g < Hkv; g++)
            for (int i = 0; i < q_len; i++)
                for (int h = 0; h < G; h++) {
                    const int qi = i * G + h;
#define PART(c) (((first_item[s] + (c)) * Hkv + g) * nq_max + qi)
                    float M = -3.0e38f;
                    for (int64_t c = 0; c < nchunks; c++) {
                        if (l_buf[PART(c)] == 0.f) continue;
                        const float m = m_buf[PART(c)];
                        M = m > M ? m : M;
                    }
                    float *o = out + ((sq[0] + i) * H + g * G + h) * D;
                    for (int d = 0; d < D; d++) o[d] = 0.f;
                    float L = 0.f;
                    for (int64_t c = 0; c < nchunks; c++) {
                        if (l_buf[PART(c)] == 0.f) continue;
                        const float f = exp_approx(m_buf[PART(c)] - M);
                        L += f * l_buf[PART(c)];
                        const float *a = acc_buf + PART(c) * D;
#pragma omp simd
                        for (int d = 0; d < D; d++) o[d] += f * a[d];
                    }
#undef PART
                    const float inv = 1.f / L;
#pragma omp simd
                    for (int d = 0; d < D; d++) o[d] *= inv;
                }
    }
    return 0;
}
