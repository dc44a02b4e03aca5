/* The AMX span kernel's online softmax (amx_attention.c): one row's chunk of scores to bf16 numerators with the lazy
 * reference, and a 32-row block's rows as a job done a few rows at a time between the tile steps of the blocks beside
 * it. Included by amx_attention.c after KC, RB, LAZY_MAX, simd_exp.h and its `ahead` prefetcher. */
#ifndef DELTASERVE_AMX_SPAN_SOFTMAX_H
#define DELTASERVE_AMX_SPAN_SOFTMAX_H

static inline __mmask16 lanes(int left) { return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1); }

/* P = 2^(s x scale2 - ref) of the first `vis` keys, 0 for the rest of [0, kend), rounded to bf16 into p; returns the
 * sum of the rounded values and the largest exponent s x scale2 - ref seen in *tmax. */
static inline float exp_pass(const float *s, int vis, int kend, float scale2, float ref, uint16_t *p, ahead *a,
                             float *tmax) {
    const __m512 sc = _mm512_set1_ps(scale2), mv = _mm512_set1_ps(ref);
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80); /* bf16 1.0 */
    const int vfull = vis & ~15;
    __m512 sum = _mm512_setzero_ps(), sum2 = sum, tm = _mm512_set1_ps(-INFINITY), tm2 = tm;
    int j = 0;
    for (; j + 32 <= vfull; j += 32) {
        ahead_step(a, 1);
        const __m512 t = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, mv);
        const __m512 t2 = _mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), sc, mv);
        tm = _mm512_max_ps(tm, t);
        tm2 = _mm512_max_ps(tm2, t2);
        const __m512 e = exp2_bf16(t), e2 = exp2_bf16(t2);
        const __m512bh pb = _mm512_cvtne2ps_pbh(e2, e);
        /* the sum of the rounded values, which P.V weighs: a row dominated by one key then gets that key's V
         * exactly (with the lazy reference its P is not 1, and its rounding would scale the whole row) */
        if (j & 32)
            sum2 = _mm512_dpbf16_ps(sum2, pb, ones);
        else
            sum = _mm512_dpbf16_ps(sum, pb, ones);
        _mm512_storeu_si512(p + j, (__m512i)pb);
    }
    for (; j < kend; j += 16) {
        const __mmask16 live = lanes(vis - j);
        const __m512 t = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, mv);
        tm = _mm512_mask_max_ps(tm, live, tm, t);
        const __m512 e = _mm512_maskz_mov_ps(live, exp2_bf16(t));
        const __m256bh pb = _mm512_cvtneps_pbh(e);
        sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(pb));
        _mm256_storeu_si256((__m256i *)(p + j), (__m256i)pb);
    }
    *tmax = _mm512_reduce_max_ps(_mm512_max_ps(tm, tm2));
    return _mm512_reduce_add_ps(_mm512_add_ps(sum, sum2));
}

/* Online softmax of one row's chunk scores, in base 2 (the running reference m is of scores x scale x log2 e): the
 * first `vis` keys are visible, the rest of [0, kend) get P = 0. Lazy reference: a row that has one already keeps
 * it while no score of the chunk passes it by more than 2^LAZY_MAX (P <= 256, exact enough in fp32 sums and bf16
 * P), which spares the pass for the chunk's maximum; else (and on the row's first chunk) the reference becomes the
 * running maximum and the row's output is rescaled by 2^(m_old - m_new). */
static void softmax_row(const float *s, int vis, int kend, float scale2, float *m, float *l, float *orow, int D,
                        uint16_t *p, ahead *a) {
    float tmax;
    if (*m != -INFINITY) {
        const float sum = exp_pass(s, vis, kend, scale2, *m, p, a, &tmax);
        if (tmax <= LAZY_MAX) {
            *l += sum;
            return;
        }
    }
    /* four running maxima: one would chain every load of the row through the max's latency */
    __m512 mx = _mm512_set1_ps(-INFINITY), mx1 = mx, mx2 = mx, mx3 = mx;
    const int vfull = vis & ~15;
    int j = 0;
    for (; j + 64 <= vfull; j += 64) {
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
        mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(s + j + 16));
        mx2 = _mm512_max_ps(mx2, _mm512_loadu_ps(s + j + 32));
        mx3 = _mm512_max_ps(mx3, _mm512_loadu_ps(s + j + 48));
    }
    for (; j < vfull; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
    if (vfull < vis) mx = _mm512_mask_max_ps(mx, lanes(vis - vfull), mx, _mm512_loadu_ps(s + vfull));
    mx = _mm512_max_ps(_mm512_max_ps(mx, mx1), _mm512_max_ps(mx2, mx3));
    const float m_new = fmaxf(*m, _mm512_reduce_max_ps(mx) * scale2); /* scale2 > 0: the max commutes with it */
    const float alpha = *m == -INFINITY ? 0.f : exp2f(*m - m_new);
    *l = *l * alpha + exp_pass(s, vis, kend, scale2, m_new, p, a, &tmax);
    *m = m_new;
    if (alpha != 1.f) {
        const __m512 av = _mm512_set1_ps(alpha);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), av));
    }
}

/* The softmax of one block's rows (S to P), done a few rows at a time between the tile products of the blocks beside
 * it, so the tile unit works through its products while the vector units run the exponentials. */
typedef struct {
    float *s;         /* [RB][KC] the block's scores */
    uint16_t *p;      /* [RB][KC] */
    const float *ks;  /* a quantized cache's K factors, else NULL */
    int rb, rows, kend, done; /* the block's first row, its real rows, keys of the chunk it covers, rows done */
} sm_job;

typedef struct {
    float *m, *l, *o; /* the item's rows' state */
    int64_t vis1;     /* keys of the chunk that row 0's token sees: row r's token sees vis1 + r / G */
    int G, kc, D;
    float scale2;
} sm_ctx;

/* the job's rows up to `upto` */
static void sm_upto(sm_job *j, const sm_ctx *c, int upto, ahead *a) {
    if (!j) return;
    if (upto > RB) upto = RB;
    for (; j->done < upto; j->done++) {
        const int r = j->done, rg = j->rb + r;
        float *sr = j->s + (size_t)r * KC;
        uint16_t *pr = j->p + (size_t)r * KC;
        int64_t vis = r < j->rows ? c->vis1 + rg / c->G : 0;
        if (vis > c->kc) vis = c->kc;
        if (vis <= 0) {
            memset(pr, 0, (size_t)j->kend * 2);
            continue;
        }
        if (j->ks)
            for (int x = 0; x < j->kend; x += 16)
                _mm512_storeu_ps(sr + x, _mm512_mul_ps(_mm512_loadu_ps(sr + x), _mm512_loadu_ps(j->ks + x)));
        softmax_row(sr, (int)vis, j->kend, c->scale2, c->m + rg, c->l + rg, c->o + (size_t)rg * c->D, c->D, pr, a);
    }
}

#endif
