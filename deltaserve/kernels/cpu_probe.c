/* How fast this CPU runs bf16 pair dot products (AVX512-BF16 vdpbf16ps) against fp32 FMA, per FLOP.
 *
 * Having the instruction says nothing about its rate: on a 2-core AMD EPYC (Zen 4) vdpbf16ps issues as often as
 * vfmadd231ps and so does twice the FLOPs, while on a 2-core Intel Xeon (family 6 model 207) it issues a quarter as
 * often (measured 1.28 vs 5.24 G instructions/s), half the FLOPs of fp32 FMA: there bf16 oneDNN GEMMs ran at 106
 * GFLOP/s against fp32's 268, and the attention kernels ran 1.85x faster with fp32 products. The kernels and
 * `layers.linear` pick their product form from this ratio.
 *
 * Both loops keep 12 independent accumulator chains in registers (enough to hide either instruction's latency),
 * read no memory, and are timed alternately; each form's best of `reps` rounds is kept, so a round slowed by
 * another process on the core does not decide.
 * Returns dp FLOP/s divided by FMA FLOP/s (> 1: the pair products are faster), 0 when built without AVX512-BF16.
 */
#include <stdint.h>
#include <time.h>

double bf16_dot_speed(int iters, int reps);

#if !defined(__AVX512BF16__) || !defined(__AVX512F__)
double bf16_dot_speed(int iters, int reps) { (void)iters; (void)reps; return 0.0; }
#else
#include <immintrin.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Twelve named accumulators (an array would be spilled to the stack, and the loop would time stores); the asm
 * statements keep each one live in a register, so the compiler can neither fold a chain nor drop it, and the sum
 * is returned so no loop is dead code. */
#define CHAINS(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
#define DECL(i) __m512 a##i = _mm512_set1_ps((float)(i) * 1e-3f);
#define SUM(i) s = _mm512_add_ps(s, a##i);

static float fma_loop(int iters) {
    CHAINS(DECL)
    const __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
#define STEP(i) a##i = _mm512_fmadd_ps(x, y, a##i); __asm__("" : "+v"(a##i));
    for (int n = 0; n < iters; n++) { CHAINS(STEP) }
#undef STEP
    __m512 s = _mm512_setzero_ps();
    CHAINS(SUM)
    return _mm512_reduce_add_ps(s);
}

static float dp_loop(int iters) {
    CHAINS(DECL)
    const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80); /* (1.0, 1.0) */
    const __m512bh y = x;
#define STEP(i) a##i = _mm512_dpbf16_ps(a##i, x, y); __asm__("" : "+v"(a##i));
    for (int n = 0; n < iters; n++) { CHAINS(STEP) }
#undef STEP
    __m512 s = _mm512_setzero_ps();
    CHAINS(SUM)
    return _mm512_reduce_add_ps(s);
}

volatile float probe_sink;

double bf16_dot_speed(int iters, int reps) {
    double best_fma = 1e30, best_dp = 1e30;
    for (int r = 0; r < reps; r++) {
        double t = now();
        probe_sink = fma_loop(iters);
        const double tf = now() - t;
        t = now();
        probe_sink = dp_loop(iters);
        const double td = now() - t;
        if (tf < best_fma) best_fma = tf;
        if (td < best_dp) best_dp = td;
    }
    /* the same instruction count each: a dp does 64 FLOPs (16 lanes x 2 products x 2), an FMA 32 */
    return 2.0 * best_fma / best_dp;
}
#endif
