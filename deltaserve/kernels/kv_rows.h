/* K/V cache rows as the native attention kernels read them: one (slot, kv head) row of a cache of `kind`
 * (deltaserve/kv/quant.py, KVFormat.kind), converted to fp32 a row at a time (never the whole history at once).
 *   0 fp32, 1 bf16: D elements;
 *   2 int8, 3 fp8 e4m3 (OCP "fn"): D bytes then one little-endian fp32 scale, D + 4 bytes; value = byte * scale.
 * Row r = slot * Hkv + g of a cache sits at base + r * kv_row_bytes(kind, D). Every conversion is exact before the
 * scale multiply, and the product is the one torch's dequantize_rows rounds (vals * scale in fp32), so a kernel
 * reads the values the PyTorch paths read. Needs bf16.h's conversions; included by both kernels. */
#ifndef DELTASERVE_KV_ROWS_H
#define DELTASERVE_KV_ROWS_H
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { KV_FP32 = 0, KV_BF16 = 1, KV_INT8 = 2, KV_FP8 = 3 };

/* bytes one (slot, kv head) row takes */
static inline int64_t kv_row_bytes(int kind, int D) {
    return kind == KV_FP32 ? 4 * (int64_t)D : kind == KV_BF16 ? 2 * (int64_t)D : (int64_t)D + 4;
}

/* the row's fp32 scale (quantized kinds): after the D value bytes, so unaligned in general */
static inline float kv_row_scale(const uint8_t *row, int D) {
    float s;
    memcpy(&s, row + D, sizeof s);
    return s;
}

/* what a quantized row read as its bytes' exact values (int8 as integers, fp8 as value / 256: kv_row_bf16,
 * fp8x32_bf16_div256) is multiplied by to give its values: row `row` of a cache at `base` */
static inline float kv_row_factor(const void *base, int kind, int64_t row, int D) {
    const float sc = kv_row_scale((const uint8_t *)base + row * ((int64_t)D + 4), D);
    return kind == KV_INT8 ? sc : sc * 256.f;
}

/* One float8 e4m3 byte, exactly (the scalar form of the F16C path below, which it must match): 4 exponent bits
 * (bias 7) and 3 mantissa bits; e = 0 is subnormal, m * 2^-9. 0x7F / 0xFF (NaN in e4m3fn) read as +-480, as they do
 * through F16C; quantize_rows never writes them (it clamps to 448). */
static inline float fp8_e4m3_to_f32(uint8_t b) {
    const uint32_t e = (b >> 3) & 15u, m = b & 7u;
    union { uint32_t u; float f; } c;
    c.u = ((e + 120u) << 23) | (m << 20);
    const float mag = e ? c.f : (float)m * 0x1p-9f;
    return (b & 0x80) ? -mag : mag;
}

#ifdef __AVX512F__
/* 16 e4m3 bytes as fp16 bits scaled by 2^-8: the 7 magnitude bits at bit 7 (exponent field bits 10-13, mantissa's
 * top 3 bits), the sign at bit 15. fp16 has the wider exponent range, so every e4m3 value (subnormals included) is
 * an fp16 value, and vcvtph2ps converts fp16 subnormals exactly whatever MXCSR.DAZ says. */
static inline __m512 fp8x16_load_div256(const uint8_t *p) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7),
                                      _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
    return _mm512_cvtph_ps(h);
}
#endif
#if defined(__AVX2__) && defined(__F16C__)
static inline __m256 fp8x8_load_div256(const uint8_t *p) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 7),
                                   _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
    return _mm256_cvtph_ps(h);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 32 e4m3 bytes as the bf16 bits of value / 256, exactly (what fp8x16_load_div256 gives, rounded to bf16 without
 * loss), in integer steps: a normal byte's 7 magnitude bits shifted into bf16's exponent and mantissa fields, its
 * exponent rebiased (7 + 8 -> 127); the subnormals (magnitude < 8: m x 2^-9 / 256 = m x 2^-17, normal in bf16)
 * from a table; the sign moved to bit 15. ~8 instructions for 32 values, where the fp16 route takes ~10 for 16. */
static inline __m512i fp8x32_bf16_div256(const uint8_t *p) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7F));
    const __m512i sub = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         0x3860, 0x3840, 0x3820, 0x3800, 0x37C0, 0x3780, 0x3700, 0);
    __m512i r = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(112 << 7));
    r = _mm512_mask_permutexvar_epi16(r, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag, sub);
    /* r | (w << 8 & 0x8000): the sign */
    return _mm512_ternarylogic_epi32(r, _mm512_slli_epi16(w, 8), _mm512_set1_epi16((short)0x8000), 0xF8);
}
#endif

#ifdef __AVX512F__
/* Row `row` of an int8 / fp8 cache as bf16 bits dst[0..D) (D a multiple of 16), value = dst * the returned factor.
 * Exact: int8 values are integers below 2^8 and e4m3 ones have 4 significant bits, both bf16 values (fp8 is read as
 * value / 256, hence scale * 256); the fp32 -> bf16 step only drops zero bits. For the bf16 pair products. */
static inline __attribute__((always_inline)) float kv_row_bf16(const void *base, int kind, int64_t row, int D,
                                                               uint16_t *restrict dst) {
    const uint8_t *r = (const uint8_t *)base + row * ((int64_t)D + 4);
    int d0 = 0;
#ifdef __AVX512BW__
    if (kind != KV_INT8)
        for (; d0 + 32 <= D; d0 += 32) _mm512_storeu_si512(dst + d0, fp8x32_bf16_div256(r + d0));
#endif
    for (int d = d0; d < D; d += 16) {
        const __m512 x = kind == KV_INT8
                             ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(r + d))))
                             : fp8x16_load_div256(r + d);
        _mm256_storeu_si256((__m256i *)(dst + d), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16)));
    }
    return kv_row_factor(base, kind, row, D);
}
#endif

/* dst[0..D) <- row `row` (= slot * Hkv + g) of a cache of `kind`, as fp32. Always inlined so callers with a constant
 * D get straight-line conversions. */
static inline __attribute__((always_inline)) void kv_load_row(const void *base, int kind, int64_t row, int D,
                                                              float *restrict dst) {
    if (kind == KV_FP32) {
        memcpy(dst, (const float *)base + row * D, sizeof(float) * D);
        return;
    }
    int d = 0;
    if (kind == KV_BF16) {
        const uint16_t *s = (const uint16_t *)base + row * D;
#ifdef __AVX512F__
        for (; d + 16 <= D; d += 16) _mm512_storeu_ps(dst + d, bf16x16_load(s + d));
#elif defined(__AVX2__)
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, bf16x8_load(s + d));
#endif
        for (; d < D; d++) dst[d] = bf16_to_f32(s[d]);
        return;
    }
    const uint8_t *r = (const uint8_t *)base + row * ((int64_t)D + 4);
    const float sc = kv_row_scale(r, D);
    if (kind == KV_INT8) {
#ifdef __AVX512F__
        const __m512 vs = _mm512_set1_ps(sc);
        for (; d + 16 <= D; d += 16)
            _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                        _mm_loadu_si128((const __m128i *)(r + d)))), vs));
#elif defined(__AVX2__)
        const __m256 vs = _mm256_set1_ps(sc);
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                        _mm_loadl_epi64((const __m128i *)(r + d)))), vs));
#endif
        for (; d < D; d++) dst[d] = (float)(int8_t)r[d] * sc;
        return;
    }
    /* fp8: the SIMD forms convert to value / 256 and multiply by scale * 256 (exact: a power of two), the same
     * product as value * scale */
#ifdef __AVX512F__
    const __m512 vs = _mm512_set1_ps(sc * 256.f);
    for (; d + 16 <= D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(fp8x16_load_div256(r + d), vs));
#elif defined(__AVX2__) && defined(__F16C__)
    const __m256 vs = _mm256_set1_ps(sc * 256.f);
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(fp8x8_load_div256(r + d), vs));
#endif
    for (; d < D; d++) dst[d] = fp8_e4m3_to_f32(r[d]) * sc;
}
#endif
