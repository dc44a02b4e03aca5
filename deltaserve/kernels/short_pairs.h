/* The short-query kernel's bf16 pair-product path (paged_attention.c, mode bit 0): keys on lanes, so bf16 K and V rows
 * are used as stored. int8 / fp8 rows are bf16 values times their row's scale (kv_row_bf16, exact): a chunk's K rows
 * are converted once for every query row, with the K scale applied to the scores, the V scale to P before it is
 * rounded to bf16. Included by paged_attention.c after CHUNK, bf16.h, kv_rows.h and simd_exp.h; defines HAVE_PAIRS. */
#include "prefetch.h"
#include "reduce16.h"
#include "transpose16.h"
#ifndef DELTASERVE_SHORT_PAIRS_H
#define DELTASERVE_SHORT_PAIRS_H
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_PAIRS 1
static inline __attribute__((always_inline)) __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
DEFINE_KT_ROWS4(kt_rows4_bf16, __m512, _mm512_setzero_ps, dot_bf16, _mm512_add_ps)

/* Query rows from which Q.K puts keys on lanes (pairs_scores_kt): a 16-key block costs two 16 x 16 transposes (128
 * shuffles) shared by every row, then 2 * ND pair products a row and key; the one-row form pays reduce16's ~46 ops a
 * row and block instead. Even at 3 rows; a verify's 15-27 rows run ~2x faster (see the commit that added it). */
#define PAIRS_KT_MIN_ROWS 6

/* The first row's fetches (see chunk_attend_pairs) for keys jb .. jb + 15 of pass g. */
static inline __attribute__((always_inline)) void pairs_prefetch(const void *kc, const void *vc, int quant, int64_t srow,
                                                                 const int64_t *slots, int j0, int jb, int nk, int g,
                                                                 int Hkv, int D, const int64_t *nx_slots, int nx_n,
                                                                 int cold) {
    for (int u = g * nk + jb; u < g * nk + jb + 16; u++)
        if (u % Hkv == 0 && u / Hkv < nx_n) {
            prefetch_bytes((const char *)kc + nx_slots[u / Hkv] * srow, (int)srow, 1);
            prefetch_bytes((const char *)vc + nx_slots[u / Hkv] * srow, (int)srow, 1);
        }
    const uint16_t *k = (const uint16_t *)kc, *v = (const uint16_t *)vc;
    if (quant) { /* K from kq, converted (and fetched, when cold) before */
    } else if (g == 0 && cold) {
        for (int t = jb + 16; t < jb + 32 && t < nk; t++) prefetch_bytes(k + slots[j0 + t] * Hkv * D, 2 * Hkv * D, 0);
        for (int t = jb; t < jb + 16 && t < nk; t++) prefetch_bytes(v + slots[j0 + t] * Hkv * D, 2 * Hkv * D, 1);
    } else {
        for (int t = jb + 16; t < jb + 32 && t < nk; t++) prefetch_bytes(k + (slots[j0 + t] * Hkv + g) * D, 2 * D, 0);
    }
}

/* Scores s[qi][0 .. nvis_max) (scale, and K's row scale when quant, applied) of all nq = q_len * G rows of kv head g,
 * keys on lanes: a block's 16 K rows transposed so that vector l holds dim pair l of each key, then per row the pair
 * products with q's pair l broadcast: no horizontal sums. Scores past a row's visible keys are garbage; the softmax
 * masks them. qp: scratch [nq rounded up to 4][D / 2] for q's bf16 pairs. */
static inline __attribute__((always_inline)) void pairs_scores_kt(
    const float *q, const void *kc, const void *vc, const uint16_t *kq, int quant, const int64_t *slots,
    int64_t q_start, int q_len, int j0, int nk, int nvis_max, int g, int H, int Hkv, const int ND, float scale,
    const float *ks, float *restrict scores, uint32_t *restrict qp, const int64_t *nx_slots, int nx_n, int cold) {
    const int G = H / Hkv, D = 32 * ND, nq = q_len * G, nq4 = (nq + 3) & ~3;
    const uint16_t *k = (const uint16_t *)kc;
    for (int qi = 0; qi < nq4; qi++) /* q rows as bf16 pairs, rows past nq zero */
        for (int c = 0; c < ND; c++) {
            __m512bh qb = (__m512bh)_mm512_setzero_si512();
            if (qi < nq) {
                const float *qv = q + ((q_start + qi / G) * H + g * G + qi % G) * D;
                qb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qv + 32 * c + 16), _mm512_loadu_ps(qv + 32 * c));
            }
            _mm512_storeu_si512((void *)(qp + (int64_t)qi * (D / 2) + 16 * c), (__m512i)qb);
        }
    const int64_t srow = quant ? Hkv * ((int64_t)D + 4) : 2 * (int64_t)Hkv * D; /* bytes of a slot's rows */
    const __m512 sc = _mm512_set1_ps(scale);
    for (int jb = 0; jb < nvis_max; jb += 16) {
        pairs_prefetch(kc, vc, quant, srow, slots, j0, jb, nk, g, Hkv, D, nx_slots, nx_n, cold);
        __m512i kt[4 * 16]; /* kt[16 c + l]: dim pair 16 c + l of the block's 16 keys */
        for (int c = 0; c < ND; c++) {
            __m512i r[16];
#pragma GCC unroll 16
            for (int t = 0; t < 16; t++) {
                const uint16_t *kr = quant ? kq + (int64_t)(jb + t) * D : k + (slots[j0 + jb + t] * Hkv + g) * D;
                r[t] = jb + t < nk ? _mm512_loadu_si512((const void *)(kr + 32 * c)) : _mm512_setzero_si512();
            }
            transpose16_epi32(r);
            for (int l = 0; l < 16; l++) kt[16 * c + l] = r[l];
        }
        const __m512 ksc = quant ? _mm512_mul_ps(sc, _mm512_loadu_ps(ks + jb)) : sc; /* q . (k * k_scale) */
        for (int r0 = 0; r0 < nq; r0 += 4) {
            __m512 sum[4];
            kt_rows4_bf16(kt, (const int32_t *)qp + (int64_t)r0 * (D / 2), D / 2, 16 * ND, sum);
            for (int r = 0; r < 4 && r0 + r < nq; r++)
                _mm512_storeu_ps(scores + (r0 + r) * CHUNK + jb, _mm512_mul_ps(sum[r], ksc));
        }
    }
}

/* chunk_attend with bf16 pair products, ND = D / 32 vectors a row (a vector holds 32 bf16 = 16 pairs).
 * Q.K: per query row and 16 keys, 16 pair-product vectors reduced by reduce16, so scores come out with keys on
 * lanes. P.V: V rows of a key pair interleaved with unpacklo/hi_epi16 (lane i of the lo half holds dims
 * 8(i/4) + i%4 of its 32, the hi half those + 4), times the broadcast P pair; dims are put back in order once
 * per row at the end. Scratch: scores [nq][CHUNK] fp32, pp [nq][CHUNK/2] P pairs, vp [CHUNK/2][D] V pairs; quantized
 * rows (quant = 1, kind 2 or 3) also kq [CHUNK][D] bf16 K rows and ks, vs [CHUNK] their K and V scales. */
static inline __attribute__((always_inline)) void chunk_attend_pairs(
    const float *q, const void *kc, const void *vc, const int quant, int kind, const int64_t *slots, int64_t q_start,
    int q_len, int64_t kv_len, int j0, int j1, int g, int H, int Hkv, const int ND, float scale,
    float *restrict m_out, float *restrict l_out, float *restrict acc_out, float *restrict scores,
    uint32_t *restrict pp, uint32_t *restrict vp, uint16_t *restrict kq, float *restrict ks, float *restrict vs,
    uint32_t *restrict qp, const int64_t *nx_slots, int nx_n, int cold) {
    const int G = H / Hkv, D = 32 * ND;
    const int nk = j1 - j0;
    const int nk32 = (nk + 31) & ~31; /* scores padded with zeros to whole 32-key P vectors */
    const __m512 sc = _mm512_set1_ps(scale);
    const uint16_t *k = (const uint16_t *)kc, *v = (const uint16_t *)vc; /* bf16 rows (quant = 0) */
    if (quant) {
        const int64_t rb = (int64_t)D + 4;
        const float vmul = kind == KV_INT8 ? 1.f : 256.f; /* kv_row_bf16 reads fp8 as value / 256 */
        for (int jj = 0; jj < nk; jj++) {
            /* a thread's first item: head 0 fetches its whole slot rows (every head's, contiguous) ahead; the later
             * heads find them in L2 (later items were fetched by the one before: below) */
            if (cold && g == 0 && jj + 16 < nk) {
                prefetch_bytes((const uint8_t *)kc + slots[j0 + jj + 16] * Hkv * rb, (int)(Hkv * rb), 0);
                prefetch_bytes((const uint8_t *)vc + slots[j0 + jj + 16] * Hkv * rb, (int)(Hkv * rb), 1);
            }
            const int64_t row = slots[j0 + jj] * Hkv + g;
            ks[jj] = kv_row_bf16(kc, kind, row, D, kq + (int64_t)jj * D);
            vs[jj] = kv_row_scale((const uint8_t *)vc + row * rb, D) * vmul;
        }
        /* past the chunk's keys: P is 0 there and must stay so (0 * a garbage scale may be NaN) */
        for (int jj = nk; jj < nk32; jj++) ks[jj] = vs[jj] = 0.f;
    }
    int nvis_max = 0;
    for (int i = 0; i < q_len; i++) {
        const int nvis = visible_keys(kv_len, q_len, i, j0, nk);
        nvis_max = nvis > nvis_max ? nvis : nvis_max;
    }
    /* The first row's passes fetch the rows of the next item this thread runs (nx_slots) into L2, whole slot rows of K
     * and V (every head's), one key every Hkv keys of the Hkv passes, so the stream spreads over this item's compute.
     * A thread's first item (cold) has head 0 fetch its own rows ahead; the later heads' rows then come from L2, and
     * they bring theirs into L1 ahead of use. */
    const int64_t srow = quant ? Hkv * ((int64_t)D + 4) : 2 * (int64_t)Hkv * D; /* bytes of a slot's rows */
    const int kt_rows = q_len * G >= PAIRS_KT_MIN_ROWS;
    if (kt_rows)
        pairs_scores_kt(q, kc, vc, kq, quant, slots, q_start, q_len, j0, nk, nvis_max, g, H, Hkv, ND, scale, ks, scores,
                        qp, nx_slots, nx_n, cold);
    for (int i = 0; i < q_len; i++) {
        const int nvis = visible_keys(kv_len, q_len, i, j0, nk);
        for (int h = 0; h < G; h++) {
            const int qi = i * G + h;
            const float *qv = q + ((q_start + i) * H + g * G + h) * D;
            __m512bh qb[4];
            for (int c = 0; c < ND; c++)
                qb[c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qv + 32 * c + 16), _mm512_loadu_ps(qv + 32 * c));
            float *restrict s = scores + qi * CHUNK;
            for (int jb = 0; jb < (kt_rows ? 0 : nvis); jb += 16) { /* one row at a time, keys reduced by reduce16 */
                if (qi == 0) pairs_prefetch(kc, vc, quant, srow, slots, j0, jb, nk, g, Hkv, D, nx_slots, nx_n, cold);
                __m512 part[16];
                if (jb + 16 <= nvis) {
#pragma GCC unroll 16
                    for (int t = 0; t < 16; t++) {
                        const uint16_t *kr = quant ? kq + (int64_t)(jb + t) * D : k + (slots[j0 + jb + t] * Hkv + g) * D;
                        part[t] = _mm512_setzero_ps();
#pragma GCC unroll 4
                        for (int c = 0; c < ND; c++)
                            part[t] = _mm512_dpbf16_ps(part[t], (__m512bh)_mm512_loadu_si512((const void *)(kr + 32 * c)),
                                                       qb[c]);
                    }
                } else {
                    for (int t = 0; t < 16; t++) {
                        part[t] = _mm512_setzero_ps();
                        if (jb + t >= nvis) continue;
                        const uint16_t *kr = quant ? kq + (int64_t)(jb + t) * D : k + (slots[j0 + jb + t] * Hkv + g) * D;
                        for (int c = 0; c < ND; c++)
                            part[t] = _mm512_dpbf16_ps(part[t], (__m512bh)_mm512_loadu_si512((const void *)(kr + 32 * c)),
                                                       qb[c]);
                    }
                }
                __m512 sv = _mm512_mul_ps(reduce16(part), sc);
                if (quant) sv = _mm512_mul_ps(sv, _mm512_loadu_ps(ks + jb)); /* q . (k * k_scale) */
                _mm512_storeu_ps(s + jb, sv);
            }
            /* softmax numerators over the visible keys; zeros after them, to nk32 */
            __mmask16 tail;
            const float m = row_max16(s, nvis, &tail);
            const __m512 mb = _mm512_set1_ps(m);
            int j;
            __m512 lv = _mm512_setzero_ps();
            for (j = 0; j < nk32; j += 16) {
                const __mmask16 keep = j + 16 <= nvis ? (__mmask16)0xFFFF : j < nvis ? tail : (__mmask16)0;
                const __m512 p = _mm512_maskz_mov_ps(keep, exp_bf16_16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mb)));
                _mm512_storeu_ps(s + j, p);
                lv = _mm512_add_ps(lv, p);
            }
            m_out[qi] = nvis > 0 ? m : -3.0e38f;
            l_out[qi] = nvis > 0 ? _mm512_reduce_add_ps(lv) : 0.f; /* 0: the merge skips this chunk */
            /* P pairs (p[2i], p[2i+1]) rounded to bf16, in key order (quantized V: P * v_scale, so that the pairs
             * multiply V's bf16 values) */
            for (j = 0; j < nk32; j += 32) {
                __m512 pa = _mm512_loadu_ps(s + j), pb = _mm512_loadu_ps(s + j + 16);
                if (quant) {
                    pa = _mm512_mul_ps(pa, _mm512_loadu_ps(vs + j));
                    pb = _mm512_mul_ps(pb, _mm512_loadu_ps(vs + j + 16));
                }
                _mm512_storeu_si512((void *)(pp + qi * (CHUNK / 2) + j / 2), (__m512i)_mm512_cvtne2ps_pbh(pb, pa));
            }
        }
    }
    /* V pairs of the visible keys (a missing partner key is a zero row: its P is 0, and 0 * garbage may be NaN) */
    const int njp = (nvis_max + 1) / 2;
    uint16_t ta[128], tb[128]; /* a quantized pair's rows as bf16 */
    for (int jp = 0; jp < njp; jp++) {
        const uint16_t *va, *vb;
        if (quant) {
            kv_row_bf16(vc, kind, slots[j0 + 2 * jp] * Hkv + g, D, ta);
            va = ta;
            vb = 2 * jp + 1 < nk ? (kv_row_bf16(vc, kind, slots[j0 + 2 * jp + 1] * Hkv + g, D, tb), tb) : NULL;
        } else {
            va = v + (slots[j0 + 2 * jp] * Hkv + g) * D;
            vb = 2 * jp + 1 < nk ? v + (slots[j0 + 2 * jp + 1] * Hkv + g) * D : NULL;
        }
        for (int c = 0; c < ND; c++) {
            const __m512i a = _mm512_loadu_si512((const void *)(va + 32 * c));
            const __m512i b = vb ? _mm512_loadu_si512((const void *)(vb + 32 * c)) : _mm512_setzero_si512();
            _mm512_storeu_si512((void *)(vp + jp * D + 32 * c), _mm512_unpacklo_epi16(a, b));
            _mm512_storeu_si512((void *)(vp + jp * D + 32 * c + 16), _mm512_unpackhi_epi16(a, b));
        }
    }
    /* acc[qi] = sum over key pairs of P pair . V pair, 2 * ND accumulators a row held in registers */
    const __m512i lo_idx = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int qi = 0; qi < q_len * G; qi++) {
        /* even and odd key pairs into separate accumulators: 4 * ND independent dp chains, not 2 * ND */
        __m512 acc[8], acc2[8];
#pragma GCC unroll 8
        for (int c = 0; c < 2 * ND; c++) acc[c] = acc2[c] = _mm512_setzero_ps();
        const uint32_t *pr = pp + qi * (CHUNK / 2);
        int jp = 0;
        for (; jp + 2 <= njp; jp += 2) {
            const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pr[jp]);
            const __m512bh pb2 = (__m512bh)_mm512_set1_epi32((int)pr[jp + 1]);
#pragma GCC unroll 8
            for (int c = 0; c < 2 * ND; c++) {
                acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512((const void *)(vp + jp * D + 16 * c)), pb);
                acc2[c] = _mm512_dpbf16_ps(acc2[c], (__m512bh)_mm512_loadu_si512((const void *)(vp + (jp + 1) * D + 16 * c)),
                                           pb2);
            }
        }
        if (jp < njp) {
            const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pr[jp]);
#pragma GCC unroll 8
            for (int c = 0; c < 2 * ND; c++)
                acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512((const void *)(vp + jp * D + 16 * c)), pb);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 2 * ND; c++) acc[c] = _mm512_add_ps(acc[c], acc2[c]);
        float *a = acc_out + qi * D;
        for (int c = 0; c < ND; c++) { /* lanes back to dims 0..31 of the vector */
            _mm512_storeu_ps(a + 32 * c, _mm512_permutex2var_ps(acc[2 * c], lo_idx, acc[2 * c + 1]));
            _mm512_storeu_ps(a + 32 * c + 16, _mm512_permutex2var_ps(acc[2 * c], hi_idx, acc[2 * c + 1]));
        }
    }
}
#else
#define HAVE_PAIRS 0
#endif
#endif
