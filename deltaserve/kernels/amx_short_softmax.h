/* The AMX short kernel's softmax (amx_short.c): down the keys of a column tile of S^T, one vector of 16 lanes (rows)
 * a key, with the lazy reference a head at a time, P rounded to bf16 into A tiles of key pairs for P.V. Included by
 * amx_short.c after KC, LAZY_MAX, PAS, amx_short_plan.h (ahead, rescale_lanes), simd_exp.h and transpose16.h. */
#ifndef DELTASERVE_AMX_SHORT_SOFTMAX_H
#define DELTASERVE_AMX_SHORT_SOFTMAX_H

/* P = 2^(s x scale2 - ref) down the keys [0, kcp) of column tile c of st (keys j >= vis on a lane get 0), rounded
 * to bf16 and written as A tiles of key pairs: lane r's row to the set pa + (r / nr) x PAS (lanes past ng nr not
 * written); returns the lanes' sums of the rounded values and their largest exponent in *tmax. vs (an fp8 cache's V
 * factors of the tile's first head, Hs a key; hidx: a lane's head in the tile) or NULL: P x the lane's factor is
 * rounded instead, and the sums are of P. */
static __m512 exp_cols(const float *st, int NCS, int kcp, __m512 scale2, __m512 ref, __m512i vis, int masked,
                       const float *vs, int Hs, __m512i hidx, int nr, int ng, uint32_t *pa, __m512 *tmax,
                       ahead *ah) {
    /* word 2r of the pair vector = even key's P of row r, word 2r + 1 the odd key's */
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i ones = _mm512_set1_epi16(0x3F80); /* bf16 1.0 */
    __m512 sum = _mm512_setzero_ps(), sum2 = sum, tm = _mm512_set1_ps(-INFINITY), tm2 = tm;
    for (int kb = 0; kb < kcp; kb += 32) {
        __m512i w[16];
        for (int jp = 0; jp < 16; jp++) {
            ahead_step(ah);
            const int j = kb + 2 * jp;
            const __m512 t0 = _mm512_fmsub_ps(_mm512_loadu_ps(st + (size_t)j * NCS), scale2, ref);
            const __m512 t1 = _mm512_fmsub_ps(_mm512_loadu_ps(st + (size_t)(j + 1) * NCS), scale2, ref);
            __m512 e0, e1;
            if (masked) {
                const __mmask16 v0 = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j));
                const __mmask16 v1 = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j + 1));
                tm = _mm512_mask_max_ps(tm, v0, tm, t0);
                tm2 = _mm512_mask_max_ps(tm2, v1, tm2, t1);
                e0 = _mm512_maskz_mov_ps(v0, exp2_bf16(t0));
                e1 = _mm512_maskz_mov_ps(v1, exp2_bf16(t1));
            } else {
                tm = _mm512_max_ps(tm, t0);
                tm2 = _mm512_max_ps(tm2, t1);
                e0 = exp2_bf16(t0);
                e1 = exp2_bf16(t1);
            }
            if (vs) { /* fp8: P x the V row's factor is what meets V's bytes; the denominator sums P */
                sum = _mm512_add_ps(sum, e0);
                sum2 = _mm512_add_ps(sum2, e1);
                const __m512 f0 = _mm512_permutexvar_ps(hidx, _mm512_loadu_ps(vs + (size_t)j * Hs));
                const __m512 f1 = _mm512_permutexvar_ps(hidx, _mm512_loadu_ps(vs + (size_t)(j + 1) * Hs));
                w[jp] = _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(e1, f1),
                                                                                     _mm512_mul_ps(e0, f0)));
                continue;
            }
            w[jp] = _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            /* the sum of the rounded values, which P.V weighs: a row dominated by one key then gets that key's V
             * exactly (with the lazy reference its P is not 1, and its rounding would scale the whole row) */
            if (jp & 1)
                sum2 = _mm512_dpbf16_ps(sum2, (__m512bh)w[jp], (__m512bh)ones);
            else
                sum = _mm512_dpbf16_ps(sum, (__m512bh)w[jp], (__m512bh)ones);
        }
        transpose16_epi32(w); /* w[r] = row r's 16 key pairs */
        for (int r = 0; r < ng * nr; r++)
            _mm512_store_si512(pa + (size_t)(r / nr) * PAS + ((size_t)(kb / 32) * 16 + r) * 16, w[r]);
    }
    *tmax = _mm512_max_ps(tm, tm2);
    return _mm512_add_ps(sum, sum2);
}

/* Online softmax of column tile c's 16 lanes over the chunk (m, l, o: those lanes' reference, denominator, output
 * [16][D]); the lanes of a head in a tile that packs several are nr apart (ng heads), else nr = 16 and ng = 1. Lazy
 * reference as in amx_attention.c, a head at a time: its lanes keep theirs while no P of the chunk passes 2^LAZY_MAX;
 * else (and on the first chunk) each of them takes its running maximum and its output is rescaled. */
static void softmax_cols(const float *st, int NCS, int c, int kcp, float scale2, __m512i vis, int masked, int nr,
                         int ng, __m512i hidx, float *m, float *l, float *o, int D, const float *vs, int Hs,
                         uint32_t *pa, ahead *ah) {
    const __m512 sc = _mm512_set1_ps(scale2);
    const __m512 mv = _mm512_loadu_ps(m);
    __m512 tmax;
    __mmask16 moved = 0xFFFF; /* lanes whose reference may move: the heads with a P past 2^LAZY_MAX */
    if (!_mm512_cmp_ps_mask(mv, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ)) {
        const __m512 sum = exp_cols(st + c * 16, NCS, kcp, sc, mv, vis, masked, vs, Hs, hidx, nr, ng, pa, &tmax, ah);
        const __mmask16 far = _mm512_cmp_ps_mask(tmax, _mm512_set1_ps(LAZY_MAX), _CMP_GT_OQ);
        moved = 0;
        for (int i = 0; i < ng; i++) {
            const __mmask16 head = nr >= 16 ? 0xFFFF : (__mmask16)(((1u << nr) - 1) << (i * nr));
            if (far & head) moved |= head;
        }
        if (!moved) {
            _mm512_storeu_ps(l, _mm512_add_ps(_mm512_loadu_ps(l), sum));
            return;
        }
    }
    __m512 cm = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < kcp; j++) {
        const __mmask16 live = masked ? _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j)) : 0xFFFF;
        cm = _mm512_mask_max_ps(cm, live, cm, _mm512_loadu_ps(st + (size_t)j * NCS + c * 16));
    }
    /* scale2 > 0: the max commutes with it; lanes not moved keep theirs (their P, sums and output unchanged) */
    const __m512 mnew = _mm512_mask_max_ps(mv, moved, mv, _mm512_mul_ps(cm, sc));
    rescale_lanes(mv, mnew, l, o, D);
    const __m512 sum = exp_cols(st + c * 16, NCS, kcp, sc, mnew, vis, masked, vs, Hs, hidx, nr, ng, pa, &tmax, ah);
    _mm512_storeu_ps(l, _mm512_add_ps(_mm512_loadu_ps(l), sum));
    _mm512_storeu_ps(m, mnew);
}

#endif
