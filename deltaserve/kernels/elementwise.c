/* Fused elementwise ops of a bf16 decoder layer on CPU: RMSNorm, SiLU(gate) * up, RoPE.
 *
 * In PyTorch each of these is several passes over the activations with a bf16 rounding and a fresh
 * tensor after every op (a 2048-token prefill of SmolLM2 spent ~0.35 s of its 1.2 s in them: silu,
 * pow, the casts, the muls). Here each is one pass per row. The roundings are the ones the PyTorch
 * path makes (bf16 after each op it rounds after), so the results match it except where a different
 * but equally accurate exp, rsqrt or summation order lands on the other side of a bf16 rounding edge.
 *
 * Layouts (row-major, bf16 as uint16_t bits):
 *   rms_norm_bf16:  x [T, N] (row stride ldx), w [N]  -> out [T, N]
 *   add_rms_norm_bf16: x, d [T, N] contiguous, w [N]  -> x <- x + d (in place), out [T, N] = rms_norm(x)
 *   silu_mul_bf16:  gu [T, 2I] (gate | up)            -> out [T, I]
 *   rope_qk_bf16:   qkv [T, W] (W >= (H + Hkv) * D: q heads, then k heads), cos, sin [max_pos, D], pos [T]
 *                   -> q32 [T, H, D] float32 (rotated, bf16 values), k [T, Hkv, D] bf16 (rotated); or, given
 *                   bf16 caches [num_slots, Hkv, D] and slots [T], k rotated and v (qkv's next Hkv heads) copied
 *                   straight into cache rows slots[t]
 *   store_quant_rows: x [T, Hkv, D] fp32 or bf16 (token stride ldx, heads contiguous), slots [T]
 *                   -> cache rows [slots[t], h] of an int8 / fp8 KV cache [num_slots, Hkv, D + 4] (kv/quant.py)
 * Rows are split across OpenMP threads when there are enough of them to pay for the fork.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#include "simd_exp.h"

#define PAR_MIN_ELEMS (1 << 15) /* below this a parallel region costs more than it saves */

/* HF LlamaRMSNorm in bf16 on one row: o = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), the statistics in fp32. */
static inline void rms_norm_row(const uint16_t *restrict xr, const uint16_t *restrict w, uint16_t *restrict o, int N,
                                float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < N; i++) ss += bf16_to_f32(xr[i]) * bf16_to_f32(xr[i]);
    const float r = 1.f / sqrtf(ss / (float)N + eps);
#pragma omp simd
    for (int i = 0; i < N; i++) o[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_round(bf16_to_f32(xr[i]) * r));
}

void rms_norm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *out, int64_t T, int N, float eps) {
#pragma omp parallel for schedule(static) if (T * N >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) rms_norm_row(x + t * ldx, w, out + t * (int64_t)N, N, eps);
}

/* The residual add before a norm, fused: x <- bf16(x + d) (what torch's bf16 add rounds to), then out =
 * rms_norm(x), row by row while the row is in L1. Saves the add's pass and its fresh tensor, twice a layer. */
void add_rms_norm_bf16(uint16_t *x, const uint16_t *d, const uint16_t *w, uint16_t *out, int64_t T, int N,
                       float eps) {
#pragma omp parallel for schedule(static) if (T * N >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        uint16_t *restrict xr = x + t * (int64_t)N;
        const uint16_t *restrict dr = d + t * (int64_t)N;
#pragma omp simd
        for (int i = 0; i < N; i++) xr[i] = f32_to_bf16(bf16_to_f32(xr[i]) + bf16_to_f32(dr[i]));
        rms_norm_row(xr, w, out + t * (int64_t)N, N, eps);
    }
}

/* y = bf16(bf16(silu(gate)) * up), silu(g) = g / (1 + exp(-g)) in fp32, as torch computes it for bf16. */
void silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t T, int I) {
#pragma omp parallel for schedule(static) if (T * I >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *restrict g = gu + t * 2 * (int64_t)I;
        const uint16_t *restrict u = g + I;
        uint16_t *restrict o = out + t * (int64_t)I;
        int i = 0;
#ifdef __AVX512F__
        /* the union bit casts of exp keep GCC from vectorising the plain loop, hence intrinsics */
        /* exp(-g) as exp(-g/2)^2: the square overflows to inf exactly where expf(-g) does (g < -88.72),
         * so g / (1 + e) is -0 there as in torch, and finite just above it */
        const __m512 one = _mm512_set1_ps(1.f), hi = _mm512_set1_ps(44.5f), mhalf = _mm512_set1_ps(-0.5f);
        for (; i + 16 <= I; i += 16) {
            const __m512 gv = bf16x16_load(g + i);
            __m512 e = exp_approx16(_mm512_min_ps(_mm512_mul_ps(gv, mhalf), hi));
            e = _mm512_mul_ps(e, e);
            const __m512 sv = bf16x16_round(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
            bf16x16_store(o + i, _mm512_mul_ps(sv, bf16x16_load(u + i)));
        }
#endif
        for (; i < I; i++) {
            const float gv = bf16_to_f32(g[i]);
            o[i] = f32_to_bf16(bf16_round(gv / (1.f + expf(-gv))) * bf16_to_f32(u[i]));
        }
    }
}

/* Neox RoPE on the q and k heads of a fused qkv row, as the PyTorch path rounds it:
 * y = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)). q lands in fp32 (exact bf16 values) for the
 * attention kernels, k in bf16 for the cache. */
/* k_cache, v_cache (NULL: k goes to `k`): bf16 caches of num_slots rows [Hkv, D], written at rows slots[t] (k
 * rotated, v copied as is) instead of index_copy_ afterwards; returns 1, writing nothing, if a slot is out of range,
 * else 0. */
int rope_qk_bf16(const uint16_t *qkv, int64_t W, const uint16_t *cos_t, const uint16_t *sin_t, const int64_t *pos,
                 float *q32, uint16_t *k, int64_t T, int H, int Hkv, int D, uint16_t *k_cache, uint16_t *v_cache,
                 const int64_t *slots, int64_t num_slots) {
    const int half = D / 2;
    if (k_cache)
        for (int64_t t = 0; t < T; t++)
            if (slots[t] < 0 || slots[t] >= num_slots) return 1;
#pragma omp parallel for schedule(static) if (T * (H + Hkv) * D >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *c = cos_t + pos[t] * D, *s = sin_t + pos[t] * D;
        for (int h = 0; h < H + Hkv; h++) {
            const uint16_t *x = qkv + t * W + (int64_t)h * D;
            float y[512];
#pragma omp simd
            for (int d = 0; d < half; d++) {
                const float x1 = bf16_to_f32(x[d]), x2 = bf16_to_f32(x[d + half]);
                y[d] = bf16_round(bf16_round(x1 * bf16_to_f32(c[d])) + bf16_round(-x2 * bf16_to_f32(s[d])));
                y[d + half] = bf16_round(bf16_round(x2 * bf16_to_f32(c[d + half])) + bf16_round(x1 * bf16_to_f32(s[d + half])));
            }
            if (h < H) {
                float *o = q32 + (t * H + h) * (int64_t)D;
#pragma omp simd
                for (int d = 0; d < D; d++) o[d] = y[d];
            } else {
                uint16_t *o = k_cache ? k_cache + (slots[t] * Hkv + (h - H)) * (int64_t)D
                                      : k + (t * Hkv + (h - H)) * (int64_t)D;
#pragma omp simd
                for (int d = 0; d < D; d++) o[d] = f32_to_bf16(y[d]);
            }
        }
        if (v_cache) /* v: the Hkv heads after k's, one contiguous run of Hkv * D values */
            memcpy(v_cache + slots[t] * Hkv * (int64_t)D, qkv + t * W + (int64_t)(H + Hkv) * D,
                   sizeof(uint16_t) * Hkv * (int64_t)D);
    }
    return 0;
}

/* fp32 y (|y| <= 448, the caller clamps) as a float8 e4m3fn byte, rounded to nearest even as torch's
 * .to(torch.float8_e4m3fn) does: below 2^-6 the subnormal steps of 2^-9 (q = 8 is 2^-6, byte 0x08, where the
 * normals continue); above, fp32's mantissa rounded to 3 bits and the exponent rebiased (127 -> 7). */
static inline uint8_t fp8_e4m3_from_f32(float y) {
    union { float f; uint32_t u; } c = {y};
    const uint8_t sign = (uint8_t)((c.u >> 24) & 0x80);
    c.u &= 0x7FFFFFFFu;
    if (c.f < 0x1p-6f) return sign | (uint8_t)nearbyintf(c.f * 512.f);
    c.u += 0x7FFFFu + ((c.u >> 20) & 1u); /* round half to even at mantissa bit 20 */
    return sign | (uint8_t)((((c.u >> 23) - 120u) << 3) | ((c.u >> 20) & 7u));
}

/* One step's K or V rows quantized straight into an int8 (kind 2) or fp8 e4m3 (kind 3) cache, bit for bit as
 * kv/quant.py's quantize_rows (then index_copy_) writes them: scale = amax / top (127 or 448), the multiplier
 * (1 / amax) * top (torch's scalar / tensor is a reciprocal times the scalar); int8 bytes round(x * multiplier)
 * half to even, clamped to +-127; fp8 bytes x * multiplier clamped to +-448, rounded to e4m3 half to even. An
 * all-zero row keeps scale 0 and zero bytes (fp8: -0.0 keeps its sign, as in torch). In PyTorch that was ~12 ops
 * a layer (a fresh tensor each), ~4 ms of an 8 x 8k int8 decode step for SmolLM2 and ~9 ms of an fp8 one at any
 * context; rows are few (tokens x kv heads), so one thread. NaN inputs are not handled as torch does. */
void store_quant_rows(const void *x, int bf16, int64_t ldx, int64_t T, int Hkv, int D, uint8_t *cache,
                      const int64_t *slots, int kind) {
    const float top = kind == 2 ? 127.0f : 448.0f;
    float v[512];
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < Hkv; h++) {
            const int64_t off = t * ldx + (int64_t)h * D;
            for (int d = 0; d < D; d++)
                v[d] = bf16 ? bf16_to_f32(((const uint16_t *)x)[off + d]) : ((const float *)x)[off + d];
            float amax = 0.f;
            for (int d = 0; d < D; d++) amax = fmaxf(amax, fabsf(v[d]));
            const float scale = amax / top;
            const float mul = amax > 0.f ? (1.0f / amax) * top : 0.f;
            uint8_t *dst = cache + (slots[t] * Hkv + h) * ((int64_t)D + 4);
            if (kind == 2)
                for (int d = 0; d < D; d++) {
                    const float y = fminf(fmaxf(nearbyintf(v[d] * mul), -127.f), 127.f);
                    dst[d] = (uint8_t)(int8_t)y;
                }
            else
                for (int d = 0; d < D; d++) {
                    const float y = v[d] * mul;
                    dst[d] = fp8_e4m3_from_f32(y > 448.f ? 448.f : y < -448.f ? -448.f : y);
                }
            memcpy(dst + D, &scale, sizeof scale);
        }
}

int elementwise_max_head_dim(void) { return 512; }
