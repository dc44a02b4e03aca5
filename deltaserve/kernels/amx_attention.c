/* Span attention on AMX tiles (Intel Xeon 4th gen and newer): Q.K^T and P.V as bf16 tile products with fp32
 * accumulation, K/V read from the slot pool and packed a key chunk at a time (never a copy of the whole history).
 *
 * Why: on a 2-core AMX Xeon torch's bf16 GEMM runs at ~2,800 GFLOP/s against ~430 in fp32, and the tiled kernel's
 * vector FMAs reach a fraction of the latter. A turn's delta of 300 tokens over 4k of history is ~86 GFLOP of
 * attention for SmolLM2 (30 layers); tile products make the softmax, not the products, its main cost.
 *
 * Same contract as tiled_attention.c, for bf16 caches (kv_kind 1) and int8 / fp8 ones (2, 3: kv_rows.h's rows,
 * dequantized and rounded to bf16 as they are packed, so the products are those of a bf16 cache of their values):
 *   q     [num_q_tokens, H, D] float32 (holding a bf16 model's values: rounded to bf16 here, exact for those)
 *   k, v  [num_slots, Hkv, D] bfloat16 (or [num_slots, Hkv, D + 4] bytes)     slots [sum of kv_len] int64
 *   seqs  [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len      out [num_q_tokens, H, D] float32
 * Query i of a sequence sits at context position kv_len - q_len + i and sees keys 0..that position.
 *
 * Work item = (sequence, kv head, block of query tokens, range of keys), rows r = i * G + h (one K/V chunk serves
 * the whole GQA group), at most MAXR rows (`plan`: fewer where that leaves threads idle; a verify of one sequence
 * splits its keys into parts, merged by their maxima as in flash decoding). For each chunk of KC keys the item packs
 *   KP [D/2][KC][2]  K^T in pairs of dims (the B operand of S = Q.K^T: row p holds dims 2p, 2p+1 of 16 keys)
 *   VP [KC/2][D][2]  V in pairs of keys (the B operand of O += P.V)
 * then, for each block of 32 rows (two 16-row tiles): S [32][KC] fp32 from tiles, the online softmax in AVX-512
 * (P rounded to bf16, as the tiled kernel's p_bf16 mode and GPU flash attention do), O [32][D] += P.V from tiles.
 * The blocks are pipelined: a block's softmax runs a row at a time between the tile steps of the next block's S and
 * the block before's P.V, so the tile unit computes while the vector units take the exponentials (300 queries over
 * 4k keys, 30 layers, kernel alone: 110.7 -> 94.1 ms on a 2-core AMX Xeon; same results to the bit).
 * Keys past a block's last visible one are skipped a 32-key step at a time; padding keys are zero in KP/VP and
 * masked out of the softmax.
 * Returns 0, 1 when out of memory, 2 for a shape or kind it does not take (the caller uses another kernel): D a
 * multiple of 32 up to 256, a bf16, int8 or fp8 cache. paged_attention_amx_available() asks the kernel for the AMX
 * tile state (arch_prctl ARCH_REQ_XCOMP_PERM) once: 1 when built with AMX and granted, else 0.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int paged_attention_amx_available(void);

#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(__AVX512BF16__) || !defined(__linux__)
#include "kernel_stub.h"
ATTENTION_KERNEL_STUB(paged_attention_amx)
#else
#include <immintrin.h>
#include <math.h>
#include <omp.h>

#include "amx_tiles.h"
#include "kv_rows.h"
#include "prefetch.h"
#include "split_parts.h"
#include "simd_exp.h"
#include "transpose16.h"

#define KC 512   /* keys a chunk (a multiple of 32) */
#define MAXR 512 /* query rows a work item: every item packs its whole context, so the more rows the fewer packs */
#define MIN_ITEM_TOKENS 16
#define SPLIT_ITEMS 4     /* fewer items a thread than this: split keys (see plan) */
#define MIN_PART_KEYS 1024 /* keys a part at least (two chunks) */
#define RB 32    /* rows a block: two tiles of 16 */
#define AHEAD_KEYS 2 /* next-chunk keys fetched a tile step (softmax: one every 32 scores); see `ahead` */
#define MAXD 256
#define LAZY_MAX 8.f /* see softmax_row */

int paged_attention_amx_available(void) { return amx_tiles_granted(); }

typedef struct {
    uint16_t *qp;   /* [MAXR][D] bf16, rows past the item's zero */
    float *o;       /* [MAXR][D] running output */
    float *m, *l;   /* [MAXR] softmax reference (of scores x scale x log2 e; see softmax_row) and denominator */
    uint16_t *kp;   /* [D/2][KC][2] */
    uint16_t *vp;   /* [KC/2][D][2] */
    float *s;       /* [2][RB][KC] scores: a block's, and the next block's being computed */
    uint16_t *p;    /* [2][RB][KC] bf16 numerators: a block's being written, the one before's read by P.V */
    float *c;       /* [RB][32] one P.V result */
    float *ks;      /* [KC] a quantized cache's K rows' factors (pack_k) */
} scratch;

/* The next chunk's K and V rows of the item's kv head, fetched into L2 a few keys at a time while the current chunk
 * computes: the rows sit wherever their slots put them, out of the hardware prefetchers' reach, and loading a
 * chunk's rows takes about as long as its products (4 x 9 queries over 6k keys, 30 layers: 29 ms with every row in
 * cache, 52 ms from memory). Spread thin (a key or two a step, ~100 steps a chunk) so the prefetches never queue
 * behind each other: in bursts of 8 keys they bought little. */
typedef struct {
    const uint8_t *k, *v;
    const int64_t *sl; /* the next chunk's slots */
    int n, done, Hkv, g, rb; /* rb: bytes a row */
} ahead;

static inline void ahead_step(ahead *a, int keys) {
    for (const int e = a->done + keys < a->n ? a->done + keys : a->n; a->done < e; a->done++) {
        const size_t off = ((size_t)a->sl[a->done] * a->Hkv + a->g) * a->rb;
        prefetch_bytes(a->k + off, a->rb, 1);
        prefetch_bytes(a->v + off, a->rb, 1);
    }
}

#include "amx_span_softmax.h"

/* dims d0 .. d0 + 31 of cache row `row` as bf16: a bf16 row's bits; an int8 / fp8 row's values (byte x its scale,
 * kv_rows.h) rounded to bf16, or where `bytes` the bytes' own values (int8, fp8 / 256: exact in bf16), which
 * kv_row_factor scales */
static inline __m512i row32(const uint8_t *c, int kind, int64_t row, int D, int d0, int bytes) {
    if (kind == KV_BF16) return _mm512_loadu_si512(c + (size_t)row * 2 * D + 2 * d0);
    const uint8_t *r = c + (size_t)row * (D + 4);
    if (bytes && kind == KV_FP8) return fp8x32_bf16_div256(r + d0);
    const float sc = bytes ? 1.f : kv_row_scale(r, D);
    __m512 lo, hi;
    if (kind == KV_INT8) {
        const __m512 s = _mm512_set1_ps(sc);
        const __m128i b0 = _mm_loadu_si128((const __m128i *)(r + d0));
        const __m128i b1 = _mm_loadu_si128((const __m128i *)(r + d0 + 16));
        lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0)), s);
        hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1)), s);
    } else {
        const __m512 s = _mm512_set1_ps(bytes ? 1.f : sc * 256.f);
        lo = _mm512_mul_ps(fp8x16_load_div256(r + d0), s);
        hi = _mm512_mul_ps(fp8x16_load_div256(r + d0 + 16), s);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* K^T of keys [c0, c0 + kc) of the item's context in dim pairs, 16 keys x 16 pairs a transpose; keys kc .. kcp zero.
 * A quantized cache's rows go in as their bytes' exact values, their factors to ks (the scores are scaled by them in
 * fp32): K itself is never rounded to bf16. */
static void pack_k(const uint8_t *k, int kind, const int64_t *sl, int kc, int Hkv, int g, int D, uint32_t *kp,
                   float *ks) {
    const int kcp = (kc + 31) & ~31;
    if (kind != KV_BF16)
        for (int j = 0; j < kcp; j++) ks[j] = j < kc ? kv_row_factor(k, kind, sl[j] * Hkv + g, D) : 0.f;
    for (int j0 = 0; j0 < kcp; j0 += 16)
        for (int p0 = 0; p0 < D / 2; p0 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = j0 + i < kc ? row32(k, kind, sl[j0 + i] * Hkv + g, D, 2 * p0, 1) : _mm512_setzero_si512();
            transpose16_epi32(r);
            for (int p = 0; p < 16; p++) _mm512_store_si512(kp + (size_t)(p0 + p) * KC + j0, r[p]);
        }
}

/* V of keys [c0, c0 + kc) in key pairs: VP[j/2][d] = (V[j][d], V[j+1][d]); a missing odd key and keys past kc zero */
static void pack_v(const uint8_t *v, int kind, const int64_t *sl, int kc, int Hkv, int g, int D, uint16_t *vp) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                        55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    const int kcp = (kc + 31) & ~31;
    for (int j = 0; j < kcp; j += 2) {
        uint16_t *dst = vp + (size_t)(j / 2) * D * 2;
        for (int d0 = 0; d0 < D; d0 += 32) {
            const __m512i a = j < kc ? row32(v, kind, sl[j] * Hkv + g, D, d0, 0) : _mm512_setzero_si512();
            const __m512i b = j + 1 < kc ? row32(v, kind, sl[j + 1] * Hkv + g, D, d0, 0) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + 2 * d0, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(dst + 2 * d0 + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* S[0..32)[0..kend) = Qp[rb..rb+32) . K^T of the packed chunk; between its steps, job j's rows up to `upto` */
static void scores(const uint16_t *qp, const uint16_t *kp, int D, int kend, float *s, ahead *a, sm_job *j,
                   const sm_ctx *c, int upto) {
    const int steps = kend / 32, base = j ? j->done : 0;
    for (int n0 = 0; n0 < kend; n0 += 32) {
        ahead_step(a, AHEAD_KEYS);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int p0 = 0; p0 < D / 2; p0 += 16) {
            _tile_loadd(4, qp + 2 * p0, D * 2);
            _tile_loadd(5, qp + 16 * D + 2 * p0, D * 2);
            _tile_loadd(6, kp + ((size_t)p0 * KC + n0) * 2, KC * 4);
            _tile_loadd(7, kp + ((size_t)p0 * KC + n0 + 16) * 2, KC * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, s + n0, KC * 4);
        _tile_stored(1, s + n0 + 16, KC * 4);
        _tile_stored(2, s + 16 * KC + n0, KC * 4);
        _tile_stored(3, s + 16 * KC + n0 + 16, KC * 4);
        if (j) sm_upto(j, c, base + ((upto - base) * (n0 / 32 + 1) + steps - 1) / steps, a);
    }
}

/* o[0..32)[0..D) += P[0..32)[0..kend) . V of the packed chunk */
static void accumulate_pv(const uint16_t *p, const uint16_t *vp, int D, int kend, float *c, float *o, ahead *a,
                          sm_job *j, const sm_ctx *ctx, int upto) {
    const int steps = D / 32 * (kend / 32), base = j ? j->done : 0;
    int step = 0;
    for (int d0 = 0; d0 < D; d0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int k0 = 0; k0 < kend; k0 += 32) {
            ahead_step(a, AHEAD_KEYS);
            _tile_loadd(4, p + k0, KC * 2);
            _tile_loadd(5, p + 16 * KC + k0, KC * 2);
            _tile_loadd(6, vp + ((size_t)(k0 / 2) * D + d0) * 2, D * 4);
            _tile_loadd(7, vp + ((size_t)(k0 / 2) * D + d0 + 16) * 2, D * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            if (j) sm_upto(j, ctx, base + ((upto - base) * ++step + steps - 1) / steps, a);
        }
        _tile_stored(0, c, 32 * 4);
        _tile_stored(1, c + 16, 32 * 4);
        _tile_stored(2, c + 16 * 32, 32 * 4);
        _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
        for (int r = 0; r < RB; r++) {
            float *orow = o + (size_t)r * D + d0;
            _mm512_storeu_ps(orow, _mm512_add_ps(_mm512_loadu_ps(orow), _mm512_loadu_ps(c + r * 32)));
            _mm512_storeu_ps(orow + 16, _mm512_add_ps(_mm512_loadu_ps(orow + 16), _mm512_loadu_ps(c + r * 32 + 16)));
        }
    }
}

/* One work item: tokens [i0, i0 + nt) of sequence (q_start, q_len, slots sl, kv_len L), kv head g, keys
 * [k0, k1) of its context. part < 0: the item holds all of its rows' keys and writes their normalised output to
 * out; else it writes its unnormalised output, softmax reference and denominator to partial slot `part` (split
 * keys). */
typedef struct {
    int s, i0, nt, g, part;
    int64_t k0, k1;
} work;


static void item(const float *q, const uint8_t *k, const uint8_t *v, int kind, const int64_t *sl, int64_t q_start,
                 int64_t q_len, int64_t L, const work *it, int H, int Hkv, int D, float scale, float *out,
                 const partials *pt, scratch *w) {
    const int G = H / Hkv, R = it->nt * G, RP = (R + RB - 1) / RB * RB, i0 = it->i0, g = it->g;
    const int64_t first = L - q_len; /* context position of the span's token 0 */
    for (int r = 0; r < RP; r++) {
        uint16_t *dst = w->qp + (size_t)r * D;
        if (r < R) {
            const float *src = q + ((size_t)(q_start + i0 + r / G) * H + (size_t)g * G + r % G) * D;
            for (int d = 0; d < D; d += 16)
                _mm256_storeu_si256((__m256i *)(dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + d)));
        } else {
            memset(dst, 0, (size_t)D * 2);
        }
        w->m[r] = -INFINITY;
        w->l[r] = 0.f;
    }
    memset(w->o, 0, (size_t)RP * D * sizeof(float));
    int64_t end = first + i0 + it->nt; /* keys the item's last token sees */
    if (end > it->k1) end = it->k1;
    for (int64_t c0 = it->k0; c0 < end; c0 += KC) {
        const int kc = (int)(end - c0 < KC ? end - c0 : KC);
        pack_k(k, kind, sl + c0, kc, Hkv, g, D, (uint32_t *)w->kp, w->ks);
        pack_v(v, kind, sl + c0, kc, Hkv, g, D, w->vp);
        const int64_t nx = end - c0 - kc < KC ? end - c0 - kc : KC;
        ahead a = {k, v, sl + c0 + kc, nx > 0 ? (int)nx : 0, 0, Hkv, g, (int)kv_row_bytes(kind, D)};
        /* the blocks that see keys of this chunk: the last nb (a block's last row sees the most keys) */
        int rb0 = 0;
        while (rb0 < R && first + i0 + ((rb0 + RB < R ? rb0 + RB : R) - 1) / G + 1 - c0 <= 0) rb0 += RB;
        const int nb = (R - rb0 + RB - 1) / RB;
        const sm_ctx ctx = {w->m, w->l, w->o, first + i0 + 1 - c0, G, kc, D, scale * 1.4426950408889634f};
        /* round b: S(b) from tiles, with half the softmax of block b - 1 between its steps; P(b - 2).V with the
         * other half (S and P double-buffered by b's parity) */
        sm_job jobs[3];
        for (int b = 0; b <= nb + 1; b++) {
            sm_job *prev = b >= 1 && b <= nb ? &jobs[(b - 1) % 3] : NULL;
            if (b < nb) {
                const int rb = rb0 + b * RB, last = (rb + RB < R ? rb + RB : R) - 1;
                const int64_t vis_max = first + i0 + last / G + 1 - c0;
                const int kend = (int)((vis_max < kc ? vis_max : kc) + 31) & ~31;
                float *sb = w->s + (size_t)(b & 1) * RB * KC;
                scores(w->qp + (size_t)rb * D, w->kp, D, kend, sb, &a, prev, &ctx, RB / 2);
                const sm_job nj = {sb, w->p + (size_t)(b & 1) * RB * KC, kind != KV_BF16 ? w->ks : NULL, rb,
                                   R - rb < RB ? R - rb : RB, kend, 0};
                jobs[b % 3] = nj;
            }
            if (b >= 2) {
                const sm_job *pj = &jobs[(b - 2) % 3];
                accumulate_pv(pj->p, w->vp, D, pj->kend, w->c, w->o + (size_t)pj->rb * D, &a, prev, &ctx, RB);
            }
            sm_upto(prev, &ctx, RB, &a);
        }
    }
    if (it->part >= 0) {
        memcpy(pt->o + (size_t)it->part * MAXR * D, w->o, (size_t)R * D * sizeof(float));
        memcpy(pt->m + (size_t)it->part * MAXR, w->m, (size_t)R * sizeof(float));
        memcpy(pt->l + (size_t)it->part * MAXR, w->l, (size_t)R * sizeof(float));
        return;
    }
    for (int r = 0; r < R; r++) {
        float *dst = out + ((size_t)(q_start + i0 + r / G) * H + (size_t)g * G + r % G) * D;
        const __m512 inv = _mm512_set1_ps(1.f / w->l[r]);
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(w->o + (size_t)r * D + d), inv));
    }
}

/* Rows of a split item group (its parts in slots part0 .. part0 + n_parts - 1) merged through their references. A
 * part in which a row sees no key has m = -inf, l = 0, o = 0, and weighs nothing (part 0 holds each row's first
 * key). */
static void merge(const partials *pt, int part0, int n_parts, int row, int D, float *dst) {
    const __m512 inv = _mm512_set1_ps(1.f / merge_parts(pt, part0, n_parts, MAXR, (size_t)row, D, dst));
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(dst + d), inv));
}

/* Work items: every (sequence, block of query tokens, kv head), with as many tokens a block as MAXR rows hold,
 * halved while that leaves fewer than two items a thread (MIN_ITEM_TOKENS at least). Where even then there are
 * fewer than SPLIT_ITEMS items a thread (a verify of one or two sequences: GQA leaves 2-3 kv heads), each item's
 * keys are split into parts of at least MIN_PART_KEYS, merged after. Returns the count (items NULL: count only). */
static int plan(const int64_t *seqs, int n_seqs, int Hkv, int tokens, int parts, work *items, int *n_slots) {
    int n = 0, slot = 0;
    for (int s = 0; s < n_seqs; s++) {
        const int64_t q_len = seqs[4 * s + 1], first = seqs[4 * s + 3] - q_len;
        for (int64_t i0 = 0; i0 < q_len; i0 += tokens) {
            const int nt = (int)(q_len - i0 < tokens ? q_len - i0 : tokens);
            const int64_t end = first + i0 + nt, chunks = (end + KC - 1) / KC;
            int np = parts;
            if (np > 1 && chunks * KC / np < MIN_PART_KEYS) np = (int)(chunks * KC / MIN_PART_KEYS);
            if (np < 1) np = 1;
            const int64_t per = (chunks + np - 1) / np * KC; /* keys a part, whole chunks */
            np = (int)((end + per - 1) / per);
            for (int g = 0; g < Hkv; g++) {
                for (int p = 0; p < np; p++) {
                    if (items) {
                        work *it = items + n;
                        it->s = s, it->i0 = (int)i0, it->nt = nt, it->g = g;
                        it->k0 = p * per, it->k1 = (p + 1) * per;
                        it->part = np > 1 ? slot + p : -1;
                    }
                    n++;
                }
                if (np > 1) slot += np; /* a group of slots per kv head */
            }
        }
    }
    *n_slots = slot;
    return n;
}

int paged_attention_amx(const float *q, const void *k, const void *v, int kv_kind, const int64_t *slots,
                        const int64_t *seqs, int n_seqs, int H, int Hkv, int D, float scale, float *out, int mode) {
    (void)mode;
    if (kv_kind < KV_BF16 || kv_kind > KV_FP8 || D % 32 != 0 || D > MAXD || H % Hkv != 0 ||
        !paged_attention_amx_available())
        return 2;
    const int G = H / Hkv, threads = omp_get_max_threads();
    if (G > MAXR) return 2;
    int tokens = MAXR / G, n_slots, n_items;
    for (;;) {
        n_items = plan(seqs, n_seqs, Hkv, tokens, 1, NULL, &n_slots);
        if (n_items >= 2 * threads || tokens / 2 < MIN_ITEM_TOKENS) break;
        tokens /= 2;
    }
    if (n_items == 0) return 0;
    const int parts = n_items < SPLIT_ITEMS * threads ? (SPLIT_ITEMS * threads + n_items - 1) / n_items : 1;
    n_items = plan(seqs, n_seqs, Hkv, tokens, parts, NULL, &n_slots);
    work *items = malloc((size_t)n_items * sizeof(work));
    partials pt = {NULL, NULL, NULL};
    if (n_slots) {
        pt.o = alloc64((size_t)n_slots * MAXR * D * sizeof(float));
        pt.m = alloc64((size_t)n_slots * MAXR * sizeof(float));
        pt.l = alloc64((size_t)n_slots * MAXR * sizeof(float));
    }
    int failed = !items || (n_slots && !(pt.o && pt.m && pt.l));
    if (!failed) plan(seqs, n_seqs, Hkv, tokens, parts, items, &n_slots);
#pragma omp parallel if (!failed)
    {
        scratch w;
        w.qp = alloc64((size_t)MAXR * D * 2);
        w.o = alloc64((size_t)MAXR * D * 4);
        w.m = alloc64(MAXR * 4);
        w.l = alloc64(MAXR * 4);
        w.kp = alloc64((size_t)D * KC * 2);
        w.vp = alloc64((size_t)D * KC * 2);
        w.s = alloc64((size_t)2 * RB * KC * 4);
        w.p = alloc64((size_t)2 * RB * KC * 2);
        w.c = alloc64(RB * 32 * 4);
        w.ks = alloc64(KC * 4);
        const int ok = !failed && w.qp && w.o && w.m && w.l && w.kp && w.vp && w.s && w.p && w.c && w.ks;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        if (ok) tiles_configure();
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_items; i++) {
            if (!ok) continue;
            const int64_t *sq = seqs + 4 * items[i].s;
            item(q, (const uint8_t *)k, (const uint8_t *)v, kv_kind, slots + sq[2], sq[0], sq[1], sq[3], items + i, H,
                 Hkv, D, scale, out, &pt, &w);
        }
        if (ok) _tile_release();
        /* split groups: the first part of each lists the group; its rows merged into out */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_items; i++) {
            const work *it = items + i;
            if (failed || it->part < 0 || it->k0 != 0) continue;
            int np = 1;
            while (i + np < n_items && items[i + np].k0 != 0) np++; /* the group's parts follow its first */
            const int64_t *sq = seqs + 4 * it->s;
            for (int r = 0; r < it->nt * G; r++)
                merge(&pt, it->part, np, r, D,
                      out + ((size_t)(sq[0] + it->i0 + r / G) * H + (size_t)it->g * G + r % G) * D);
        }
        free(w.qp); free(w.o); free(w.m); free(w.l); free(w.kp); free(w.vp); free(w.s); free(w.p); free(w.c);
        free(w.ks);
    }
    free(items);
    free(pt.o); free(pt.m); free(pt.l);
    return failed ? 1 : 0;
}
#endif
