/* The short-query kernel's integer path for an int8 cache (paged_attention.c, mode bit 0, AVX512-BW): both products
 * in exact integer arithmetic on the rows' bytes as stored.
 *   Q.K: each query row rounded to int16 against its largest |value| (steps of 2^-15 of it: finer than the bf16 pair
 *   path's q), a K row's bytes widened to int16 (one instruction for 32), so q.k is an exact int32 sum (vpdpwssd with
 *   AVX512-VNNI, else vpmaddwd + vpaddd), times q's step, the K row's scale and the softmax scale.
 *   P.V: each softmax numerator times its V row's scale, rounded to int16 against the row's largest such product in
 *   the chunk, times V's bytes widened to int16, two keys a lane pair as in the bf16 pair path; a chunk's sums stay
 *   exact in int32 (CHUNK x 32767 x 128 < 2^31).
 * Why: int8 rows read as bf16 (short_pairs.h) cost 5 instructions per 16 values to convert, more than the products
 * they feed, so int8 decode gained little over bf16 for half the bytes.
 * Included by paged_attention.c after CHUNK, kv_rows.h, simd_exp.h and short_pairs.h; defines HAVE_INT8_DOTS. */
#ifndef DELTASERVE_SHORT_INT8_H
#define DELTASERVE_SHORT_INT8_H
#include "prefetch.h"
#include "reduce16.h"
#include "transpose16.h"
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_INT8_DOTS 1
_Static_assert((long long)CHUNK * 32767 * 128 < 2147483647LL, "a chunk's P.V sums must stay within int32");

/* acc + the products of a's and b's int16 lanes, summed two by two into int32 lanes (exact here: see above) */
static inline __attribute__((always_inline)) __m512i dot_i16(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

/* 32 fp32 values times `mul`, rounded to the nearest int16 (|x * mul| <= 32767 by construction), in order */
static inline __attribute__((always_inline)) __m512i round_i16x32(__m512 lo, __m512 hi, __m512 mul) {
    const __m256i a = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, mul)));
    const __m256i b = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, mul)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

/* Rows of P.V a pass holds in registers for ND = D / 32: 2 * ND int32 accumulators a row, 16 in all. */
/* Prefetch into L2, of whole slot rows (K and V, every kv head's): each item fetches the rows of the next item its
 * thread runs (nx_slots), one key every Hkv keys of its Q.K passes, so the stream spreads over the item's compute;
 * a thread's first item (cold) fetches its own rows this many keys ahead in head 0's pass. */
#ifndef INT8_PREFETCH
#define INT8_PREFETCH 48
#endif
/* Query heads whose Q.K a pass computes from one widened K row (their partial sums for 16 keys sit in L1). */
#define INT8_QK_HEADS 8
#define INT8_PV_ROWS(ND) ((ND) == 1 ? 8 : (ND) == 2 ? 4 : 2)

DEFINE_KT_ROWS4(kt_rows4_i16, __m512i, _mm512_setzero_si512, dot_i16, _mm512_add_epi32)

/* Query rows from which Q.K puts keys on lanes (int8_scores_kt), as the pair path does (PAIRS_KT_MIN_ROWS). */
#define INT8_KT_MIN_ROWS 6

/* Prefetch for key block jb .. jb + 15 of pass g (see INT8_PREFETCH). */
static inline __attribute__((always_inline)) void int8_prefetch(const uint8_t *kb, const uint8_t *vb, int64_t rb,
                                                                const int64_t *slots, int j0, int jb, int nk, int g,
                                                                int Hkv, const int64_t *nx_slots, int nx_n, int cold) {
    for (int t = jb; t < jb + 16; t++) {
        const int u = g * nk + t;
        const int64_t sl = cold && g == 0 && t + INT8_PREFETCH < nk ? slots[j0 + t + INT8_PREFETCH]
                           : u % Hkv == 0 && u / Hkv < nx_n       ? nx_slots[u / Hkv]
                                                                  : -1;
        if (sl >= 0) {
            prefetch_bytes(kb + sl * Hkv * rb, (int)(Hkv * rb), 1);
            prefetch_bytes(vb + sl * Hkv * rb, (int)(Hkv * rb), 1);
        }
    }
}

/* Scores s[qi][0 .. nvis_max) of all nq = q_len * G rows of kv head g, keys on lanes (pairs_scores_kt's scheme in
 * integers): a block's 16 K rows widened to int16 and transposed so that vector l holds dim pair l of each key, then
 * per row the exact int32 products with q's int16 pair l broadcast. Scores past a row's visible keys are garbage (the
 * softmax masks them). Scratch: qp [nq rounded up to 4][D / 2] q's int16 pairs, qstep [same] q's step x scale. */
static inline __attribute__((always_inline)) void int8_scores_kt(
    const float *q, const uint8_t *kb, const uint8_t *vb, const int64_t *slots, int64_t q_start, int q_len, int j0,
    int nk, int nvis_max, int g, int H, int Hkv, const int ND, float scale, const float *ks, float *restrict scores,
    int32_t *restrict qp, float *restrict qstep, const int64_t *nx_slots, int nx_n, int cold) {
    const int G = H / Hkv, D = 32 * ND, nq = q_len * G, nq4 = (nq + 3) & ~3;
    const int64_t rb = (int64_t)D + 4;
    for (int qi = 0; qi < nq4; qi++) { /* q rows in int16 steps of qmax / 32767; rows past nq zero */
        float qmax = 0.f;
        const float *qv = q + ((q_start + qi / G) * H + g * G + qi % G) * D;
        if (qi < nq) {
            __m512 amax = _mm512_setzero_ps();
            for (int c = 0; c < 2 * ND; c++) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(qv + 16 * c)));
            qmax = _mm512_reduce_max_ps(amax);
        }
        const __m512 qmul = _mm512_set1_ps(qmax > 0.f ? 32767.f / qmax : 0.f);
        for (int c = 0; c < ND; c++)
            _mm512_storeu_si512((void *)(qp + (int64_t)qi * (D / 2) + 16 * c),
                                qi < nq ? round_i16x32(_mm512_loadu_ps(qv + 32 * c), _mm512_loadu_ps(qv + 32 * c + 16), qmul)
                                        : _mm512_setzero_si512());
        qstep[qi] = scale * (qmax / 32767.f);
    }
    for (int jb = 0; jb < nvis_max; jb += 16) {
        int8_prefetch(kb, vb, rb, slots, j0, jb, nk, g, Hkv, nx_slots, nx_n, cold);
        __m512i kt[4 * 16]; /* kt[16 c + l]: dim pair 16 c + l of the block's 16 keys, in int16 */
        for (int c = 0; c < ND; c++) {
            __m512i r[16];
#pragma GCC unroll 16
            for (int t = 0; t < 16; t++)
                r[t] = jb + t < nk ? _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                         (const __m256i *)(kb + (slots[j0 + jb + t] * Hkv + g) * rb + 32 * c)))
                                   : _mm512_setzero_si512();
            transpose16_epi32(r);
            for (int l = 0; l < 16; l++) kt[16 * c + l] = r[l];
        }
        const __m512 ksv = _mm512_loadu_ps(ks + jb);
        for (int r0 = 0; r0 < nq; r0 += 4) {
            __m512i sum[4];
            kt_rows4_i16(kt, qp + (int64_t)r0 * (D / 2), D / 2, 16 * ND, sum);
            for (int r = 0; r < 4 && r0 + r < nq; r++) /* q . (k * k_scale) * scale */
                _mm512_storeu_ps(scores + (r0 + r) * CHUNK + jb,
                                 _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum[r]), _mm512_set1_ps(qstep[r0 + r])),
                                               ksv));
        }
    }
}

/* chunk_attend_pairs' contract for int8 rows, ND = D / 32. K and V rows are read from the cache where they are (no
 * converted copy). Scratch: scores [nq][CHUNK] fp32; pp [nq rounded up to 8][CHUNK] int16 P (rows past nq are
 * zeroed here); ks, vs [CHUNK] the rows' scales; pscale [nq] P's step a query row. */
static inline __attribute__((always_inline)) void chunk_attend_int8(
    const float *q, const void *kc, const void *vc, const int64_t *slots, int64_t q_start, int q_len, int64_t kv_len,
    int j0, int j1, int g, int H, int Hkv, const int ND, float scale, float *restrict m_out, float *restrict l_out,
    float *restrict acc_out, float *restrict scores, int16_t *restrict pp, float *restrict ks, float *restrict vs,
    float *restrict pscale, int32_t *restrict qp, float *restrict qstep, const int64_t *nx_slots, int nx_n,
    int cold) {
    const int G = H / Hkv, D = 32 * ND, nq = q_len * G;
    const int nk = j1 - j0;
    const int nk32 = (nk + 31) & ~31; /* P padded with zeros to whole 32-key vectors */
    const int64_t rb = (int64_t)D + 4;
    const uint8_t *kb = (const uint8_t *)kc, *vb = (const uint8_t *)vc;
#define KROW(j) (kb + (slots[j0 + (j)] * Hkv + g) * rb)
#define VROW(j) (vb + (slots[j0 + (j)] * Hkv + g) * rb)
    /* the rows' scales (past the chunk's keys: 0, so that P stays 0 there; 0 * a garbage scale may be NaN) */
    for (int jj = 0; jj < nk; jj++) {
        ks[jj] = kv_row_scale(KROW(jj), D);
        vs[jj] = kv_row_scale(VROW(jj), D);
    }
    for (int jj = nk; jj < nk32; jj++) ks[jj] = vs[jj] = 0.f;
    int nvis_max = 0;
    for (int i = 0; i < q_len; i++) {
        const int nvis = visible_keys(kv_len, q_len, i, j0, nk);
        nvis_max = nvis > nvis_max ? nvis : nvis_max;
    }
    const int kt_rows = nq >= INT8_KT_MIN_ROWS;
    if (kt_rows)
        int8_scores_kt(q, kb, vb, slots, q_start, q_len, j0, nk, nvis_max, g, H, Hkv, ND, scale, ks, scores, qp, qstep,
                       nx_slots, nx_n, cold);
    for (int i = 0; i < q_len; i++) {
        const int nvis = visible_keys(kv_len, q_len, i, j0, nk);
        /* scores of the G heads' rows, HB heads a pass: a K row is widened once for all of them */
        for (int h0 = 0; h0 < (kt_rows ? 0 : G); h0 += INT8_QK_HEADS) {
            const int hn = G - h0 < INT8_QK_HEADS ? G - h0 : INT8_QK_HEADS;
            __m512i qw[INT8_QK_HEADS][4];
            __m512 sc[INT8_QK_HEADS];
            for (int h = 0; h < hn; h++) { /* q in int16 steps of qmax / 32767 */
                const float *qv = q + ((q_start + i) * H + g * G + h0 + h) * D;
                __m512 amax = _mm512_setzero_ps();
                for (int c = 0; c < 2 * ND; c++) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(qv + 16 * c)));
                const float qmax = _mm512_reduce_max_ps(amax);
                const __m512 qmul = _mm512_set1_ps(qmax > 0.f ? 32767.f / qmax : 0.f);
                for (int c = 0; c < ND; c++)
                    qw[h][c] = round_i16x32(_mm512_loadu_ps(qv + 32 * c), _mm512_loadu_ps(qv + 32 * c + 16), qmul);
                sc[h] = _mm512_set1_ps(scale * (qmax / 32767.f));
            }
            for (int jb = 0; jb < nvis; jb += 16) {
                if (i == 0 && h0 == 0) int8_prefetch(kb, vb, rb, slots, j0, jb, nk, g, Hkv, nx_slots, nx_n, cold);
                __m512i part[INT8_QK_HEADS][16];
                for (int t = 0; t < 16; t++) {
                    if (jb + t >= nvis) { /* the last block's invisible keys: score 0, masked below */
                        for (int h = 0; h < hn; h++) part[h][t] = _mm512_setzero_si512();
                        continue;
                    }
                    const uint8_t *kr = KROW(jb + t);
                    __m512i kw[4];
#pragma GCC unroll 4
                    for (int c = 0; c < ND; c++) kw[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(kr + 32 * c)));
                    for (int h = 0; h < hn; h++) {
                        __m512i a = dot_i16(_mm512_setzero_si512(), kw[0], qw[h][0]);
#pragma GCC unroll 4
                        for (int c = 1; c < ND; c++) a = dot_i16(a, kw[c], qw[h][c]);
                        part[h][t] = a;
                    }
                }
                const __m512 ksv = _mm512_loadu_ps(ks + jb);
                for (int h = 0; h < hn; h++) /* q . (k * k_scale) * scale */
                    _mm512_storeu_ps(scores + (i * G + h0 + h) * CHUNK + jb,
                                     _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(reduce16_epi32(part[h])), sc[h]), ksv));
            }
        }
        for (int h = 0; h < G; h++) {
            const int qi = i * G + h;
            float *restrict s = scores + qi * CHUNK;
            /* softmax numerators over the visible keys (zeros after them, to nk32), times V's row scales */
            __mmask16 tail;
            const float m = row_max16(s, nvis, &tail);
            const __m512 mb = _mm512_set1_ps(m);
            int j;
            __m512 lv = _mm512_setzero_ps(), pmv = _mm512_setzero_ps();
            for (j = 0; j < nk32; j += 16) {
                const __mmask16 keep = j + 16 <= nvis ? (__mmask16)0xFFFF : j < nvis ? tail : (__mmask16)0;
                /* exp_bf16_16: relative error ~3e-6, below P's int16 steps */
                const __m512 p = _mm512_maskz_mov_ps(keep, exp_bf16_16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mb)));
                lv = _mm512_add_ps(lv, p);
                const __m512 pv = _mm512_mul_ps(p, _mm512_loadu_ps(vs + j));
                pmv = _mm512_max_ps(pmv, pv);
                _mm512_storeu_ps(s + j, pv);
            }
            m_out[qi] = nvis > 0 ? m : -3.0e38f;
            l_out[qi] = nvis > 0 ? _mm512_reduce_add_ps(lv) : 0.f; /* 0: the merge skips this chunk */
            /* P * v_scale in int16 steps of its largest value / 32767 */
            const float pmax = _mm512_reduce_max_ps(pmv);
            const __m512 pmul = _mm512_set1_ps(pmax > 0.f ? 32767.f / pmax : 0.f);
            pscale[qi] = pmax / 32767.f;
            for (j = 0; j < nk32; j += 32)
                _mm512_storeu_si512((void *)(pp + (int64_t)qi * CHUNK + j),
                                    round_i16x32(_mm512_loadu_ps(s + j), _mm512_loadu_ps(s + j + 16), pmul));
        }
    }
    /* acc[row] = sum over key pairs of P pair . V pair in int32, R rows a pass with their 2 * ND accumulators in
     * registers. A key pair's V rows are widened to int16 and interleaved once a pass (unpacklo/hi_epi16: lane i of the
     * lo half holds dims 8(i/4) + i%4 of its 32, the hi half those + 4, put back in order at the end); a missing
     * partner key is a zero row. Rows past nq get P = 0 (their sums are dropped). */
    const int R = INT8_PV_ROWS(ND), njp = (nvis_max + 1) / 2;
    for (int r = nq; r < ((nq + R - 1) / R) * R; r++) memset(pp + (int64_t)r * CHUNK, 0, sizeof(int16_t) * nk32);
    const __m512i lo_idx = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int r0 = 0; r0 < nq; r0 += R) {
        __m512i acc[16];
#pragma GCC unroll 16
        for (int c = 0; c < 16; c++) acc[c] = _mm512_setzero_si512();
        const int32_t *pr = (const int32_t *)(pp + (int64_t)r0 * CHUNK); /* row r's (P[2i], P[2i+1]) at r * CHUNK / 2 + i */
        for (int jp = 0; jp < njp; jp++) {
            const uint8_t *va = VROW(2 * jp), *vb2 = 2 * jp + 1 < nk ? VROW(2 * jp + 1) : NULL;
            __m512i vv[8];
#pragma GCC unroll 4
            for (int c = 0; c < ND; c++) {
                const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(va + 32 * c)));
                const __m512i b = vb2 ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vb2 + 32 * c)))
                                      : _mm512_setzero_si512();
                vv[2 * c] = _mm512_unpacklo_epi16(a, b);
                vv[2 * c + 1] = _mm512_unpackhi_epi16(a, b);
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const __m512i pb = _mm512_set1_epi32(pr[r * (CHUNK / 2) + jp]);
#pragma GCC unroll 8
                for (int c = 0; c < 2 * ND; c++) acc[r * 2 * ND + c] = dot_i16(acc[r * 2 * ND + c], vv[c], pb);
            }
        }
        for (int r = 0; r < R && r0 + r < nq; r++) {
            const __m512 ps = _mm512_set1_ps(pscale[r0 + r]);
            float *a = acc_out + (r0 + r) * D;
            for (int c = 0; c < ND; c++) { /* to fp32 in P's steps; lanes back to dims 0..31 of the vector */
                const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r * 2 * ND + 2 * c]), ps);
                const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r * 2 * ND + 2 * c + 1]), ps);
                _mm512_storeu_ps(a + 32 * c, _mm512_permutex2var_ps(x, lo_idx, y));
                _mm512_storeu_ps(a + 32 * c + 16, _mm512_permutex2var_ps(x, hi_idx, y));
            }
        }
    }
#undef KROW
#undef VROW
}
#else
#define HAVE_INT8_DOTS 0
#endif
#endif
