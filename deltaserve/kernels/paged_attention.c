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
 * Returns 0; 1 when out of memory for the work buffers; 3, touching nothing, when a sequence has more than
 * SHORT_MAX_Q queries.
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
#define SHORT_MAX_Q 64 /* queries a sequence at most (short_fp32.h keeps per-query state in arrays this long) */

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

#include "short_fp32.h"  /* chunk_attend: fp32 products */
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
    /* mode bit 0: int8 rows take integer products on the bytes as stored (short_int8.h, any AVX-512 CPU); bf16 rows
     * take pair products as stored, fp8 rows (and int8 where the integer path is not built) as their bf16 values */
    const int ints = HAVE_INT8_DOTS && (mode & 1) && kv_kind == KV_INT8 && D % 32 == 0 && D <= 128;
    const int pairs = !ints && HAVE_PAIRS && (mode & 1) && kv_kind != KV_FP32 && D % 32 == 0 && D <= 128;
    /* work items: (seq, chunk of keys), each over every kv head in turn, so it reads whole slot rows
     * ([Hkv, D] contiguous) rather than one head's slice of each. Partial (item w, head g) sits at w * Hkv + g. */
    int64_t n_items = 0, max_q = 1;
    for (int s = 0; s < n_seqs; s++) {
        n_items += (seqs[4 * s + 3] + CHUNK - 1) / CHUNK;
        if (seqs[4 * s + 1] > max_q) max_q = seqs[4 * s + 1];
    }
    if (max_q > SHORT_MAX_Q) return 3;
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
         * [nq_max rounded up to 8][CHUNK] int16, the scales, P's step for each query row [nq_max], q's int16 pairs
         * [nq_max rounded up to 4][D / 2] and their steps */
        const int64_t pp_n = (ints ? (nq_max + 7) & ~7 : nq_max) * CHUNK / 2, vp_n = ints ? 0 : CHUNK / 2 * D;
        const int64_t nq4 = (nq_max + 3) & ~3;
        float *row = scratch(6, sizeof(float) * (ints    ? pp_n + 2 * CHUNK + nq_max + nq4 * (D / 2 + 1)
                                                 : pairs ? pp_n + vp_n + CHUNK * D / 2 + 2 * CHUNK + nq4 * (D / 2)
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
                                   (int16_t *)row, row + pp_n, row + pp_n + CHUNK, row + pp_n + 2 * CHUNK,           \
                                   (int32_t *)(row + pp_n + 2 * CHUNK + nq_max),                                     \
                                   row + pp_n + 2 * CHUNK + nq_max + nq4 * (D / 2), nx_slots, nx_n, cold)
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
