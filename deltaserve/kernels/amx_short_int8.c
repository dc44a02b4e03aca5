/* Short spans (decode, speculative verify) of an int8 cache on AMX-INT8 tiles, the rows' bytes as stored, in exact
 * integer products (the short kernel's integer path, short_int8.h, on tiles):
 *   S^T [keys][lanes] = K . Q^T   A: 16 K rows as the pool stores them (64 dims a tile); B: q in int16 steps of its
 *                                 row's largest |value|, split q = 256 hi + lo (hi signed, lo unsigned bytes), one
 *                                 product each (tdpbssd, tdpbsud), summed as 256 S_hi + S_lo (exact in int32)
 *   O [lanes][D]     += P . V     A: P x the V row's scale in 16-bit steps (of a bound on the lane's largest in the
 *                                 chunk), split 256 hi + lo (unsigned); B: V's bytes in key quads (tdpbusd)
 * Why: an int8 row is half a bf16 row's bytes, but the short kernel's integer path converts and transposes every K row
 * on vector units (kernel alone, 8 x 8k decode, 30 layers: 49-54 ms against the bf16 AMX short kernel's 63-67 for
 * twice the bytes). Here K rows go into tiles as they lie in the pool, and a decode's rows of several kv heads share
 * one softmax vector (lanes), so the softmax's vector work is not 13 lanes of padding in 16.
 *
 * Same contract as amx_short.c, for an int8 cache (kv_kind 2: D bytes then the row's fp32 scale, kv/quant.py):
 *   q     [num_q_tokens, H, D] float32          k, v  [num_slots, Hkv, D + 4] uint8      slots [sum of kv_len] int64
 *   seqs  [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len      out [num_q_tokens, H, D] float32
 * Query i of a sequence sits at context position kv_len - q_len + i and sees keys 0..that position; rows r = i G + h of
 * kv head g, at most MAXRS a sequence. Lanes: a column tile (coltile) holds 16 rows of one head, or of 16 / R heads
 * where a sequence has R <= 8 rows a head. Work items and split parts as amx_short.c (amx_short_plan.h).
 * Returns 0, 1 when out of memory, 2 for a shape or kind it does not take (more than MAXRS rows a sequence, D not a
 * multiple of 64 up to 256, more than 64 kv heads, a cache other than int8, no AMX).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int paged_attention_amx_short_int8_available(void);

#if !defined(__AMX_TILE__) || !defined(__AMX_INT8__) || !defined(__AVX512BW__) || !defined(__AVX512VBMI__) || \
    !defined(__linux__)
#include "kernel_stub.h"
ATTENTION_KERNEL_STUB(paged_attention_amx_short_int8)
#else
#include <immintrin.h>
#include <math.h>
#include <omp.h>

#include "amx_tiles.h"
#include "simd_exp.h"
#include "transpose16.h"

#define KC 128          /* keys a chunk (a multiple of 64: a P A tile holds 64 keys) */
#define MAXRS 64        /* rows a sequence, a kv head */
#define MAXD 256
#define SPLIT_ITEMS 4   /* fewer items a thread than this: split keys */
#define MIN_PART_KEYS 512
#define LAZY_MAX 8.f    /* as amx_short.c: a lane keeps its softmax reference while P <= 2^8 */
#define PMAX 65535.f    /* P's steps: 16 bits, two bytes */
#define STS 16          /* S^T's row stride (lanes) */

#include "amx_short_plan.h"
#include "int8_rows.h"

/* a chunk's P.V sums in int32: KC keys x (255 x 256 + 255) x 128; S^T's: 256 dims x (128 x 256 + 255) x 128 */
_Static_assert((long long)KC * (255 * 256 + 255) * 128 < 2147483647LL, "P.V sums must stay within int32");

int paged_attention_amx_short_int8_available(void) { return amx_tiles_granted(); }

typedef struct {
    uint32_t *qt;   /* [Hkv * 4][D/64][2][16][16] Q^T B tiles of (head g, rows 16c ..): hi bytes, lo bytes */
    float *qs;      /* [lanes] q's step x scale x log2 e, lanes = 16 x column tiles (<= Hkv x MAXRS) */
    float *o;       /* [lanes][D] running output, dims in tile order (unshuffle_row) */
    float *m, *l;   /* [lanes] softmax reference (of scores x scale x log2 e) and denominator */
    uint8_t *kb;    /* [16][D] K rows of a block that is not a run */
    uint32_t *vb;   /* [Hkv][KC/64][D/16][16][16] V in key quads: B tiles */
    int32_t *st;    /* [2][KC][STS] S^T hi and lo; scaled scores written over hi */
    uint32_t *pa;   /* [KC/64][2][16][16] P bytes: A tiles hi, lo */
    float *ks, *vs; /* [KC][Hkv] (+16) K and V rows' scales of the chunk */
    float *vl;      /* [KC][Hkv] (+16) floor(log2) of the V rows' scales */
    float *ps;      /* [16] P's step a lane for the chunk */
    int32_t *ci;    /* [4][16][16] C tiles spilled */
} scratch;

static void scratch_free(void *p) {
    scratch *w = p;
    free(w->qt); free(w->qs); free(w->o); free(w->m); free(w->l); free(w->kb); free(w->vb); free(w->st); free(w->pa);
    free(w->ks); free(w->vs); free(w->vl); free(w->ps); free(w->ci);
    free(w);
}

/* Q^T B tiles of head g's rows r0 .. r0 + nr - 1 (columns past nr zero): each row rounded to int16 against its
 * largest |value|, split as hi * 256 + lo (hi signed, lo unsigned bytes); their steps x scale2 to qs[0 .. nr) */
static void pack_qt(const float *q, int64_t q_start, int r0, int nr, int off, int G, int H, int g, int D,
                    float scale2, uint32_t *qt, float *qs) {
    __m512i hi[4][16], lo[4][16]; /* [64-dim step][lane] */
    for (int i = 0; i < 16; i++) {
        const int live = i >= off && i < off + nr, row = r0 + i - off;
        float qmax = 0.f;
        const float *src = live ? q + ((size_t)(q_start + row / G) * H + (size_t)g * G + row % G) * D : q;
        if (live) {
            __m512 amax = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(src + d)));
            qmax = _mm512_reduce_max_ps(amax);
            qs[i - off] = qmax / 32767.f * scale2;
        }
        const __m512 mul = _mm512_set1_ps(qmax > 0.f ? 32767.f / qmax : 0.f);
        for (int ks = 0; ks < D / 64; ks++) {
            __m128i h[4], l[4];
            for (int u = 0; u < 4; u++) {
                const __m512 y = live ? _mm512_loadu_ps(src + 64 * ks + 16 * u) : _mm512_setzero_ps();
                const __m512i x = _mm512_cvtps_epi32(_mm512_mul_ps(y, mul));
                l[u] = _mm512_cvtepi32_epi8(x);
                h[u] = _mm512_cvtepi32_epi8(_mm512_srai_epi32(x, 8));
            }
            hi[ks][i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(h[1], h[0])),
                                           _mm256_set_m128i(h[3], h[2]), 1);
            lo[ks][i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(l[1], l[0])),
                                           _mm256_set_m128i(l[3], l[2]), 1);
        }
    }
    for (int ks = 0; ks < D / 64; ks++) {
        transpose16_epi32(hi[ks]);
        transpose16_epi32(lo[ks]);
        uint32_t *dst = qt + (size_t)ks * 512;
        for (int p = 0; p < 16; p++) {
            _mm512_store_si512(dst + p * 16, hi[ks][p]);
            _mm512_store_si512(dst + 256 + p * 16, lo[ks][p]);
        }
    }
}

/* S^T hi and lo of column tile t for keys [0, kcp): head g0 + i's B tiles hold its rows in columns i nr .., zero
 * elsewhere, so every head of the tile accumulates into the same two C tiles */
#define QK_HEAD(BH, BL)                          \
    do {                                         \
        _tile_dpbssd(0, 2, BH);                  \
        _tile_dpbsud(1, 2, BL);                  \
    } while (0)
static void scores_t(const uint8_t *k, const int64_t *sl, int kc, int kcp, int Hkv, int D, const coltile *t,
                     const uint32_t *qt, uint8_t *kb, int32_t *st, ahead *ah) {
    const size_t rb = (size_t)D + 4, qts = (size_t)D / 64 * 512;
    const uint32_t *q0 = qt + ((size_t)t->g0 * 4 + t->r0 / 16) * qts;
    const size_t qh = 4 * qts; /* the next head's tiles */
    const int resident = D == 64;
    if (resident) {
        _tile_loadd(4, q0, 64);
        _tile_loadd(5, q0 + 256, 64);
        if (t->ng > 1) {
            _tile_loadd(6, q0 + qh, 64);
            _tile_loadd(7, q0 + qh + 256, 64);
        }
    }
    for (int j0 = 0; j0 < kcp; j0 += 16) {
        ahead_step(ah);
        const int run = j0 + 16 <= kc && run16(sl + j0);
        _tile_zero(0);
        _tile_zero(1);
        for (int i = 0; i < t->ng; i++) {
            const int g = t->g0 + i;
            const uint8_t *a = kb;
            size_t as = (size_t)D;
            if (run) {
                a = k + ((size_t)sl[j0] * Hkv + g) * rb;
                as = (size_t)Hkv * rb;
            } else {
                for (int j = 0; j < 16; j++) {
                    const uint8_t *src = j0 + j < kc ? k + ((size_t)sl[j0 + j] * Hkv + g) * rb : NULL;
                    for (int d = 0; d < D; d += 64)
                        _mm512_storeu_si512(kb + (size_t)j * D + d,
                                            src ? _mm512_loadu_si512(src + d) : _mm512_setzero_si512());
                }
            }
            for (int s = 0; s < D / 64; s++) {
                _tile_loadd(2, a + 64 * s, as);
                if (resident && i == 0) {
                    QK_HEAD(4, 5);
                } else if (resident && i == 1) {
                    QK_HEAD(6, 7);
                } else {
                    const uint32_t *b = q0 + i * qh + (size_t)s * 512;
                    _tile_loadd(3, b, 64);
                    _tile_dpbssd(0, 2, 3);
                    _tile_loadd(3, b + 256, 64);
                    _tile_dpbsud(1, 2, 3);
                }
            }
        }
        _tile_stored(0, st + (size_t)j0 * STS, STS * 4);
        _tile_stored(1, st + (size_t)(KC + j0) * STS, STS * 4);
    }
}

/* V rows of every kv head for keys [0, kcp) as B tiles of key quads (keys past kc zero), head g's at vb + g KC D / 4:
 * tile (kb/64, t) row kq holds, for its 16 columns i, the bytes of keys 4kq..4kq+3 at dim
 * 64 * (t / 4) + 16 * (i / 4) + 4 * (t % 4) + i % 4 (what vpunpck{l,h}bw then vpunpck{l,h}wd give: two shuffle
 * rounds where an ordered interleave takes more; the output's dims are put back by unshuffle_row) */
static void pack_v(const uint8_t *v, const int64_t *sl, int kc, int kcp, int Hkv, int D, uint32_t *vb, ahead *ah) {
    const size_t rb = (size_t)D + 4;
    for (int j = 0; j < kcp; j += 4) {
        if ((j & 7) == 0) ahead_step(ah);
        const uint8_t *r[4];
        for (int u = 0; u < 4; u++) r[u] = j + u < kc ? v + (size_t)sl[j + u] * Hkv * rb : NULL;
        uint32_t *base = vb + (size_t)(j / 64) * (D / 16) * 256 + (size_t)((j % 64) / 4) * 16;
        for (int g = 0; g < Hkv; g++) {
            for (int d0 = 0; d0 < D; d0 += 64) {
                __m512i x[4];
                for (int u = 0; u < 4; u++)
                    x[u] = r[u] ? _mm512_loadu_si512(r[u] + g * rb + d0) : _mm512_setzero_si512();
                const __m512i ablo = _mm512_unpacklo_epi8(x[0], x[1]), abhi = _mm512_unpackhi_epi8(x[0], x[1]);
                const __m512i cdlo = _mm512_unpacklo_epi8(x[2], x[3]), cdhi = _mm512_unpackhi_epi8(x[2], x[3]);
                uint32_t *dst = base + (size_t)g * KC * D / 4 + (size_t)(d0 / 16) * 256;
                _mm512_store_si512(dst, _mm512_unpacklo_epi16(ablo, cdlo));
                _mm512_store_si512(dst + 256, _mm512_unpackhi_epi16(ablo, cdlo));
                _mm512_store_si512(dst + 512, _mm512_unpacklo_epi16(abhi, cdhi));
                _mm512_store_si512(dst + 768, _mm512_unpackhi_epi16(abhi, cdhi));
            }
        }
    }
}

/* A row of D outputs in tile order put back in order, times scale */
static inline void unshuffle_row(const float *src, int D, float scale, float *dst) {
    for (int d0 = 0; d0 < D; d0 += 64)
        for (int t = 0; t < 4; t++)
            for (int i = 0; i < 16; i++) dst[d0 + 16 * (i / 4) + 4 * t + i % 4] = src[d0 + 16 * t + i] * scale;
}

#include "amx_short_int8_softmax.h"

/* o lanes [x0, x0 + nx) += P . V (head g's packed V) over the chunk: two dim tiles (32 dims) at a time */
static void accumulate_pv(const uint32_t *pa, const uint32_t *vb, int D, int kcp, const float *ps, int x0, int nx,
                          float *o, int32_t *ci, ahead *ah) {
    for (int t0 = 0; t0 < D / 16; t0 += 2) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int kb = 0; kb < kcp; kb += 64) {
            ahead_step(ah);
            const uint32_t *b = vb + ((size_t)(kb / 64) * (D / 16) + t0) * 256;
            _tile_loadd(4, pa + (size_t)(kb / 64) * 512, 64);
            _tile_loadd(5, pa + (size_t)(kb / 64) * 512 + 256, 64);
            _tile_loadd(6, b, 64);
            _tile_loadd(7, b + 256, 64);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 5, 6);
            _tile_dpbusd(2, 4, 7);
            _tile_dpbusd(3, 5, 7);
        }
        _tile_stored(0, ci, 128);
        _tile_stored(1, ci + 512, 128);
        _tile_stored(2, ci + 16, 128);
        _tile_stored(3, ci + 512 + 16, 128);
        for (int r = x0; r < x0 + nx; r++) {
            const __m512 st = _mm512_set1_ps(ps[r]);
            float *or_ = o + (size_t)r * D + t0 * 16;
            for (int h = 0; h < 2; h++) {
                const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(_mm512_loadu_si512(ci + r * 32 + 16 * h), 8),
                                                   _mm512_loadu_si512(ci + 512 + r * 32 + 16 * h));
                const __m512 acc = _mm512_loadu_ps(or_ + 16 * h);
                _mm512_storeu_ps(or_ + 16 * h, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), st, acc));
            }
        }
    }
}

/* Keys [k0, k1) of sequence s (amx_short_plan.h's work), every kv head, a chunk of KC keys at a time: V packed, then
 * per column tile S^T, the softmax and P.V per head of the tile. */
static void item(const float *q, const uint8_t *k, const uint8_t *v, const int64_t *sl, int64_t q_start,
                 int64_t q_len, int64_t L, const work *it, int H, int Hkv, int D, float scale, float *out,
                 const partials *pt, scratch *w) {
    const int G = H / Hkv, R = (int)q_len * G;
    const int64_t first = L - q_len;
    const size_t qts = (size_t)D / 64 * 512;
    const float scale2 = scale * 1.4426950408889634f;
    coltile ct[4 * 64];
    const int n_ct = col_tiles(R, Hkv, ct), lanes = n_ct * 16;
    for (int c = 0; c < n_ct; c++) {
        for (int i = 0; i < ct[c].ng; i++)
            pack_qt(q, q_start, ct[c].r0, ct[c].nr, i * ct[c].nr, G, H, ct[c].g0 + i, D, scale2,
                    w->qt + ((size_t)(ct[c].g0 + i) * 4 + ct[c].r0 / 16) * qts, w->qs + c * 16 + i * ct[c].nr);
        for (int x = ct[c].ng * ct[c].nr; x < 16; x++) w->qs[c * 16 + x] = 0.f;
    }
    for (int x = 0; x < lanes; x++) w->m[x] = -INFINITY, w->l[x] = 0.f;
    memset(w->o, 0, (size_t)lanes * D * sizeof(float));
    for (int64_t c0 = it->k0; c0 < it->k1; c0 += KC) {
        const int kc = (int)(it->k1 - c0 < KC ? it->k1 - c0 : KC), kcp = (kc + 63) & ~63;
        const int64_t nx = it->k1 - c0 - kc < KC ? it->k1 - c0 - kc : KC;
        /* ahead_step calls in the chunk, about: pack_v, 2 row_scales, and per column tile scores_t, the softmax's two
         * passes and P.V. The V rows' scales are read right after pack_v brings the rows in, the K rows' after the
         * first column tile's tile loads (read first, they stalled on memory: 8 x 8k decode, best of 7, 44.2-44.5 ->
         * 42.1-42.2 ms) */
        const int steps = kcp / 8 + kcp / 8 + n_ct * (kcp / 16 + kcp / 8 + kcp / 8 + Hkv / n_ct * D / 32 * kcp / 64);
        ahead ah = ahead_new((const char *)k, (const char *)v, sl + c0 + kc, (int)nx, Hkv * (D + 4), steps);
        pack_v(v, sl + c0, kc, kcp, Hkv, D, w->vb, &ah);
        row_scales(v, sl + c0, kc, kcp, Hkv, D, w->vs, w->vl, &ah);
        for (int c = 0; c < n_ct; c++) {
            const coltile *t = ct + c;
            int visr[16], hid[16], masked = 0;
            for (int x = 0; x < 16; x++) {
                int64_t vis = kc;
                hid[x] = 0;
                if (x < t->ng * t->nr) {
                    vis = first + (t->r0 + x % t->nr) / G + 1 - c0;
                    hid[x] = x / t->nr;
                }
                if (vis > kc) vis = kc;
                visr[x] = (int)vis;
                masked |= vis < kcp;
            }
            scores_t(k, sl + c0, kc, kcp, Hkv, D, t, w->qt, w->kb, w->st, &ah);
            if (c == 0) row_scales(k, sl + c0, kc, kcp, Hkv, D, w->ks, NULL, &ah);
            softmax_cols(w->st, kcp, w->qs + c * 16, w->ks + t->g0, w->vs + t->g0, w->vl + t->g0, Hkv,
                         _mm512_loadu_si512(hid), _mm512_loadu_si512(visr), masked, w->m + c * 16, w->l + c * 16,
                         w->o + (size_t)c * 16 * D, D, w->pa, w->ps, &ah);
            for (int i = 0; i < t->ng; i++)
                accumulate_pv(w->pa, w->vb + (size_t)(t->g0 + i) * KC * D / 4, D, kcp, w->ps, i * t->nr, t->nr,
                              w->o + (size_t)c * 16 * D, w->ci, &ah);
        }
    }
    if (it->part >= 0) {
        const size_t base = (size_t)it->part * Hkv * MAXRS;
        memcpy(pt->o + base * D, w->o, (size_t)lanes * D * sizeof(float));
        memcpy(pt->m + base, w->m, (size_t)lanes * sizeof(float));
        memcpy(pt->l + base, w->l, (size_t)lanes * sizeof(float));
        return;
    }
    for (int c = 0; c < n_ct; c++)
        for (int x = 0; x < ct[c].ng * ct[c].nr; x++)
            unshuffle_row(w->o + ((size_t)c * 16 + x) * D, D, 1.f / w->l[c * 16 + x],
                          lane_out(out, q_start, ct + c, x, G, H, D));
}

/* lane x of a split sequence (its parts in slots part0 ..) merged through their references */
static void merge(const partials *pt, int part0, int n_parts, int Hkv, int x, int D, float *dst) {
    float acc[MAXD];
    const float l = merge_parts(pt, part0, n_parts, (size_t)Hkv * MAXRS, (size_t)x, D, acc);
    unshuffle_row(acc, D, 1.f / l, dst);
}

static void *scratch_new(const call *c) {
    const int Hkv = c->Hkv, D = c->D;
    scratch *w = calloc(1, sizeof(scratch));
    if (!w) return NULL;
    w->qt = alloc64((size_t)Hkv * 4 * D / 64 * 512 * 4);
    w->qs = alloc64((size_t)Hkv * MAXRS * 4);
    w->o = alloc64((size_t)Hkv * MAXRS * D * 4);
    w->m = alloc64((size_t)Hkv * MAXRS * 4);
    w->l = alloc64((size_t)Hkv * MAXRS * 4);
    w->kb = alloc64((size_t)16 * D);
    w->vb = alloc64((size_t)Hkv * KC * D);
    w->st = alloc64((size_t)2 * KC * STS * 4);
    w->pa = alloc64((size_t)(KC / 64) * 512 * 4);
    w->ks = alloc64(((size_t)KC * Hkv + 16) * 4);
    w->vs = alloc64(((size_t)KC * Hkv + 16) * 4);
    w->vl = alloc64(((size_t)KC * Hkv + 16) * 4);
    w->ps = alloc64(MAXRS * 4);
    w->ci = alloc64(1024 * 4);
    if (w->qt && w->qs && w->o && w->m && w->l && w->kb && w->vb && w->st && w->pa && w->ks && w->vs && w->vl &&
        w->ps && w->ci)
        return w;
    scratch_free(w);
    return NULL;
}

static void run_item(const call *c, const work *it, const partials *pt, void *w) {
    const int64_t *sq = c->seqs + 4 * it->s;
    item(c->q, (const uint8_t *)c->k, (const uint8_t *)c->v, c->slots + sq[2], sq[0], sq[1], sq[3], it, c->H, c->Hkv,
         c->D, c->scale, c->out, pt, w);
}

static void merge_lanes(const call *c, const work *it, int n_parts, const partials *pt) {
    const int64_t *sq = c->seqs + 4 * it->s;
    const int G = c->H / c->Hkv, R = (int)sq[1] * G;
    for (int t = 0; t < n_col_tiles(R, c->Hkv); t++) {
        const coltile ct = col_tile(R, c->Hkv, t);
        for (int x = 0; x < ct.ng * ct.nr; x++)
            merge(pt, it->part, n_parts, c->Hkv, t * 16 + x, c->D, lane_out(c->out, sq[0], &ct, x, G, c->H, c->D));
    }
}

int paged_attention_amx_short_int8(const float *q, const void *k, const void *v, int kv_kind, const int64_t *slots,
                                   const int64_t *seqs, int n_seqs, int H, int Hkv, int D, float scale, float *out,
                                   int mode) {
    (void)mode;
    if (kv_kind != 2 || D % 64 != 0 || D > MAXD || Hkv > 64 || H % Hkv != 0 ||
        !paged_attention_amx_short_int8_available())
        return 2;
    const call c = {q, k, v, slots, seqs, n_seqs, H, Hkv, D, scale, out, kv_kind};
    const kernel_ops ops = {scratch_new, scratch_free, run_item, merge_lanes};
    return run_items(&c, MAXRS, &ops);
}
#endif
