/* exp on 16 (AVX-512) or 8 (AVX2) fp32 lanes for the native attention kernels, without libm so the loops that call it vectorise:
 * 2^n * 2^f, |f| <= 1/2, with a degree-7 Taylor polynomial (relative error ~1e-7). Inputs here are <= 0;
 * below -87 the result is clamped to exp(-87). */
#ifndef DELTASERVE_SIMD_EXP_H
#define DELTASERVE_SIMD_EXP_H
#ifdef __AVX512F__
#include <immintrin.h>

/* x = (n + f) / ln 2 with n integral and |f| <= 1/2, x clamped below at -87: returns f, n through the pointer. */
static inline __m512 exp_split(__m512 x, __m512 *n) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    *n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_sub_ps(t, *n);
}

/* The low-order end of the Taylor series of 2^f in Horner form, shared by both polynomials:
 * p, the sum of the higher-order terms so far, times f, plus the terms of degree 4 down to 0. */
static inline __m512 exp2_horner_tail(__m512 p, __m512 f) {
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
}

static inline __m512 exp_approx16(__m512 x) {
    __m512 n;
    const __m512 f = exp_split(x, &n);
    __m512 p = _mm512_set1_ps(1.5252733804059840e-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381608e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = exp2_horner_tail(p, f);
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* exp for values that are rounded to bf16 next (the softmax numerators of P.V in bf16 pairs): the same series
 * cut at degree 5 (relative error ~3e-6, far below bf16's 2^-9) and vscalefps for the 2^n. Inputs <= 0. */
static inline __m512 exp_bf16_16(__m512 x) {
    __m512 n;
    const __m512 f = exp_split(x, &n);
    return _mm512_scalef_ps(exp2_horner_tail(_mm512_set1_ps(1.3333558146428443e-3f), f), n);
}

/* 2^t for t <= 8 (the AMX kernels' lazy softmax reference) whose result is rounded to bf16 next: 2^n x a degree-4
 * polynomial in the fraction f, |f| <= 1/2, fitted for relative error (2.8e-6 at most, as the degree-5 Taylor series
 * it replaced; bf16 rounds at 2^-9); vscalefps applies 2^n and goes to 0 for very negative t. */
static inline __m512 exp2_bf16(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.58271982247707e-3f), f, _mm512_set1_ps(5.590607272971921e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4024098740749253e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931242351454795e-1f));
    return _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f)), n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* The same polynomial on 8 lanes, for CPUs without AVX-512 (AMD Zen 3, client chips). Inputs <= 0. */
static inline __m256 exp_approx8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.5252733804059840e-5f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381608e-4f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif
#endif
