/* bf16 <-> fp32 for the native kernels: bf16 travels as uint16_t bits; rounding is to nearest even, what torch's
 * conversion does for finite values. The 8-lane load exists with AVX2, the 16-lane forms only with AVX-512. */
#ifndef DELTASERVE_BF16_H
#define DELTASERVE_BF16_H
#include <stdint.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = ((uint32_t)x) << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float x) {
    union { float f; uint32_t u; } c = {x};
    return (uint16_t)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

/* x rounded to bf16, kept in fp32 */
static inline float bf16_round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>

static inline __m256 bf16x8_load(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

#ifdef __AVX512F__
static inline __m512 bf16x16_load(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* the 16 lanes rounded to bf16 (nearest even), kept in fp32 */
static inline __m512 bf16x16_round(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline void bf16x16_store(uint16_t *p, __m512 x) {
    const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(bf16x16_round(x)), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
#endif
#endif
