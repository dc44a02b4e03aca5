/* The short-query kernel's fp32 path (paged_attention.c, mode bit 0 clear, or a cache / CPU the reduced-precision
 * paths do not take): K/V rows converted (int8 / fp8: dequantized) to fp32 a chunk at a time, both products in fp32
 * FMA, 16 lanes (AVX-512), 8 (AVX2) or scalar. Included by paged_attention.c after CHUNK, kv_rows.h, prefetch.h,
 * exp_approx and simd_exp.h; defines chunk_attend. */
#ifndef DELTASERVE_SHORT_FP32_H
#define DELTASERVE_SHORT_FP32_H
#define PF_AHEAD 16 /* keys ahead whose rows the fp32 path prefetches */

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
    int nvis_of[SHORT_MAX_Q];
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
#endif
