/* The AMX-INT8 short kernel's softmax (amx_short_int8.c): down the keys of a column tile of S^T (exact int32
 * products), one vector of 16 lanes (rows) a key, the lazy reference as in amx_short.c, P' in 16-bit steps split into
 * hi and lo bytes as A tiles of key quads for P.V. Included by amx_short_int8.c after KC, LAZY_MAX, PMAX, STS,
 * amx_short_plan.h (ahead, rescale_lanes) and simd_exp.h. */
#ifndef DELTASERVE_AMX_SHORT_INT8_SOFTMAX_H
#define DELTASERVE_AMX_SHORT_INT8_SOFTMAX_H

/* vpermt2b indices from (w01, w23) = 16-bit P' of keys (0, 1) and (2, 3) a dword: dword i of the result holds the
 * four keys' low bytes (P_LO) or high bytes (P_HI), in key order */
static const uint8_t P_LO[64] __attribute__((aligned(64))) = {
    0, 2, 64, 66, 4, 6, 68, 70, 8, 10, 72, 74, 12, 14, 76, 78,
    16, 18, 80, 82, 20, 22, 84, 86, 24, 26, 88, 90, 28, 30, 92, 94,
    32, 34, 96, 98, 36, 38, 100, 102, 40, 42, 104, 106, 44, 46, 108, 110,
    48, 50, 112, 114, 52, 54, 116, 118, 56, 58, 120, 122, 60, 62, 124, 126};
static const uint8_t P_HI[64] __attribute__((aligned(64))) = {
    1, 3, 65, 67, 5, 7, 69, 71, 9, 11, 73, 75, 13, 15, 77, 79,
    17, 19, 81, 83, 21, 23, 85, 87, 25, 27, 89, 91, 29, 31, 93, 95,
    33, 35, 97, 99, 37, 39, 101, 103, 41, 43, 105, 107, 45, 47, 109, 111,
    49, 51, 113, 115, 53, 55, 117, 119, 57, 59, 121, 123, 61, 63, 125, 127};

/* Online softmax of a column tile's lanes over the chunk (m, l, o: the lanes' reference, denominator, output [16][D];
 * ks, vs, vl: the tile's first head's scales, Hs apart a key; hidx: each lane's head in the tile; vis: the keys each
 * lane sees). t = S x q's step x the K row's scale (base 2, scaled), written over S^T hi. P' = 2^(t - ref) x the V
 * row's scale, in 16-bit steps of a bound on the lane's largest P' in the chunk (2^(largest t + floor(log2 v_scale)
 * + 1 - ref): at most twice it, whatever the V rows' scales), split into hi, lo bytes as A tiles (pa); the lanes' steps
 * to ps. Lazy reference as in amx_short.c; the denominator sums 2^(t - ref) unrounded (P's 16-bit steps leave a
 * dominant key's weight within 2^-15 of the sum's). */
static void softmax_cols(int32_t *st, int kcp, const float *qs, const float *ks, const float *vs, const float *vl,
                         int Hs, __m512i hidx, __m512i vis, int masked, float *m, float *l, float *o, int D,
                         uint32_t *pa, float *ps, ahead *ah) {
    float *pf = (float *)st;
    const int32_t *lo = st + (size_t)KC * STS;
    const __m512 qsv = _mm512_loadu_ps(qs);
    __m512 cm = _mm512_set1_ps(-INFINITY), cu = cm; /* the lanes' largest t and t + floor(log2 v_scale) */
    for (int j = 0; j < kcp; j++) {
        if ((j & 7) == 0) ahead_step(ah);
        const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(_mm512_loadu_si512(pf + (size_t)j * STS), 8),
                                           _mm512_loadu_si512(lo + (size_t)j * STS));
        const __m512 kv = _mm512_permutexvar_ps(hidx, _mm512_loadu_ps(ks + (size_t)j * Hs));
        const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(qsv, kv));
        _mm512_storeu_ps(pf + (size_t)j * STS, t);
        const __m512 u = _mm512_add_ps(t, _mm512_permutexvar_ps(hidx, _mm512_loadu_ps(vl + (size_t)j * Hs)));
        if (masked) {
            const __mmask16 live = _mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j));
            cm = _mm512_mask_max_ps(cm, live, cm, t);
            cu = _mm512_mask_max_ps(cu, live, cu, u);
        } else {
            cm = _mm512_max_ps(cm, t);
            cu = _mm512_max_ps(cu, u);
        }
    }
    __m512 mv = _mm512_loadu_ps(m);
    const __mmask16 far = _mm512_cmp_ps_mask(_mm512_sub_ps(cm, mv), _mm512_set1_ps(LAZY_MAX), _CMP_GT_OQ);
    if (far || _mm512_cmp_ps_mask(mv, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ)) {
        const __m512 mnew = _mm512_max_ps(mv, cm);
        rescale_lanes(mv, mnew, l, o, D);
        _mm512_storeu_ps(m, mnew);
        mv = mnew;
    }
    /* a bound on each lane's P' = 2^(t - ref) x v_scale in the chunk, at most twice its largest: 2^(cu + 1 - ref);
     * none (no visible key, or every visible V row zero: cu = -inf) leaves the lane's P' all 0 */
    const __mmask16 live = _mm512_cmp_ps_mask(cu, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 bound = exp2_bf16(_mm512_maskz_sub_ps(live, _mm512_add_ps(cu, _mm512_set1_ps(1.f)), mv));
    const __mmask16 pos = live & _mm512_cmp_ps_mask(bound, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 mul = _mm512_maskz_div_ps(pos, _mm512_set1_ps(PMAX), bound);
    _mm512_storeu_ps(ps, _mm512_maskz_div_ps(pos, bound, _mm512_set1_ps(PMAX)));
    const __m512i ilo = _mm512_load_si512(P_LO), ihi = _mm512_load_si512(P_HI);
    const __m512i top = _mm512_set1_epi32((int)PMAX);
    __m512 sum = _mm512_setzero_ps();
    for (int kb = 0; kb < kcp; kb += 64) {
        __m512i wh[16], wl[16];
        for (int u = 0; u < 16; u++) {
            const int j = kb + 4 * u;
            if ((u & 1) == 0) ahead_step(ah);
            __m512i x[4];
            for (int t = 0; t < 4; t++) {
                __m512 e = exp2_bf16(_mm512_sub_ps(_mm512_loadu_ps(pf + (size_t)(j + t) * STS), mv));
                if (masked) e = _mm512_maskz_mov_ps(_mm512_cmpgt_epi32_mask(vis, _mm512_set1_epi32(j + t)), e);
                sum = _mm512_add_ps(sum, e);
                const __m512 vv = _mm512_permutexvar_ps(hidx, _mm512_loadu_ps(vs + (size_t)(j + t) * Hs));
                x[t] = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(e, _mm512_mul_ps(vv, mul))), top);
            }
            const __m512i w01 = _mm512_or_si512(x[0], _mm512_slli_epi32(x[1], 16));
            const __m512i w23 = _mm512_or_si512(x[2], _mm512_slli_epi32(x[3], 16));
            wl[u] = _mm512_permutex2var_epi8(w01, ilo, w23);
            wh[u] = _mm512_permutex2var_epi8(w01, ihi, w23);
        }
        transpose16_epi32(wh);
        transpose16_epi32(wl);
        uint32_t *dst = pa + (size_t)(kb / 64) * 512;
        for (int r = 0; r < 16; r++) {
            _mm512_store_si512(dst + r * 16, wh[r]);
            _mm512_store_si512(dst + 256 + r * 16, wl[r]);
        }
    }
    _mm512_storeu_ps(l, _mm512_add_ps(_mm512_loadu_ps(l), sum));
}

#endif
