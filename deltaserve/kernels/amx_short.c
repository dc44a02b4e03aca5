/* Short spans (decode, speculative verify) of a bf16 cache on AMX tiles, with the keys on the rows of the products:
 *   S^T [keys][rows] = K . Q^T   A: 16 K rows as the pool stores them (32 dims a tile); B: Q^T in dim pairs
 *   O [rows][D]     += P . V     A: P in key pairs (S^T's layout transposed); B: V in key pairs
 * Why: a decode or verify step has 3-64 query rows a kv head (q_len x GQA group) against thousands of keys, so its
 * cost is reading K/V. amx_attention.c puts the rows on the tiles' rows and must transpose every K chunk for Q.K^T
 * (for a 4 x 9 verify at 6k, 30 layers, that packing cost ~14 ms of 25 with every row in L3, ~27 of 40 from
 * memory); here K rows go into the tiles as they lie in the pool (a run of 16 consecutive slots is one strided tile
 * load; other rows are copied, never transposed), and the softmax runs down the keys, one vector of rows a key,
 * with no horizontal reductions.
 *
 * Same contract as amx_attention.c, for bf16 caches (kv_kind 1) and fp8 e4m3 ones (3):
 *   q     [num_q_tokens, H, D] float32 (holding a bf16 model's values: rounded to bf16 here, exact for those)
 *   k, v  [num_slots, Hkv, D] bfloat16 (or [num_slots, Hkv, D + 4] bytes)     slots [sum of kv_len] int64
 *   seqs  [n_seqs, 4] int64: q_start, q_len, kv_offset, kv_len      out [num_q_tokens, H, D] float32
 * Query i of a sequence sits at context position kv_len - q_len + i and sees keys 0..that position. Rows r = i * G + h
 * of kv head g (h the head in its group), at most MAXRS a sequence. Lanes (S^T's columns, the softmax's vector): a
 * column tile (amx_short_plan.h's col_tiles) holds 16 rows of one head, or the rows of 16 / R heads where a sequence
 * has R <= 8 a head (a decode's): their products add into one C tile, each head's Q^T zero on the others' lanes, so a
 * decode's softmax is not 13 lanes of padding in 16 (8 x 8k decode, 30 layers, rows in L2: 106 -> 88 ms).
 *
 * Work item = (sequence, range of keys), all kv heads: each chunk of KC keys reads its slots' rows, per group of column
 * tiles (a head's, or one tile's heads) K, then the softmax, then V head by head. A sequence's keys split into parts
 * when there are fewer items than SPLIT_ITEMS a thread; parts end on keys every row sees (so every part has a key for
 * every row) and are merged by their maxima as in flash decoding. q and P are rounded to bf16 (as amx_attention.c and
 * the tiled kernel's p_bf16 mode), sums are fp32.
 * fp8 rows go into the tiles as the exact bf16 bits of value / 256 (kv_rows.h's fp8x32_bf16_div256; K rows copied,
 * never straight from the pool), with K's row scales applied to S^T and V's to P before its bf16 rounding, as the
 * short kernel's pair path does; the denominator sums P unscaled.
 * Returns 0, 1 when out of memory, 2 for a shape or kind it does not take (more than MAXRS rows a sequence, D not a
 * multiple of 32 up to 256, a cache other than bf16 or fp8, no AMX).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int paged_attention_amx_short_available(void);

#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(__AVX512BF16__) || !defined(__linux__)
#include "kernel_stub.h"
ATTENTION_KERNEL_STUB(paged_attention_amx_short)
#else
#include <immintrin.h>
#include <math.h>
#include <omp.h>

#include "amx_tiles.h"
#include "kv_rows.h"
#include "amx_short_rows.h" /* after kv_rows.h */
#include "simd_exp.h"
#include "transpose16.h"

#define KC 128          /* keys a chunk (a multiple of 32) */
#define MAXRS 64        /* rows a sequence: up to 4 column tiles of S^T */
#define MAXD 256
#define SPLIT_ITEMS 4   /* fewer items a thread than this: split keys */
#define MIN_PART_KEYS 512
#define LAZY_MAX 8.f    /* as amx_attention.c: a row keeps its softmax reference while P <= 2^8 */

#include "amx_short_plan.h"
#include "int8_rows.h" /* row_scales: an fp8 row has an int8 row's layout */

#define PAS ((size_t)(KC / 32) * 256) /* a set of P's A tiles */

int paged_attention_amx_short_available(void) { return amx_tiles_granted(); }

typedef struct {
    uint32_t *qt; /* [Hkv][4][D/32][16][16] Q^T B tiles of (head g, its rows 16 c ..): row p holds dims 2p, 2p + 1 (of
                   * the 32-dim step) of the tile's lanes, zero on lanes of other heads (col_tiles) */
    float *o;     /* [lanes][D] running output */
    float *m, *l; /* [lanes] softmax reference (of scores x scale x log2 e) and denominator */
    uint16_t *kb; /* [16][D] K rows of a 16-key block that is not a run of slots */
    uint16_t *vb; /* [KC/2][D][2] V in key pairs */
    float *st;    /* [KC][NC * 16] S^T */
    uint32_t *pa; /* [16][KC/32][16][16] P in key pairs: A tiles (row r: 16 pairs of keys), a set per column tile of a
                   * head's NC, or per head of a tile that packs several (its other heads' rows zero) */
    float *ks, *vs; /* [KC][Hkv] (+16) an fp8 cache's K and V rows' factors (scale x 256; 0 past the chunk's keys) */
    coltile *ct;  /* [Hkv x 4] */
} scratch;

static void scratch_free(void *p) {
    scratch *w = p;
    free(w->qt); free(w->o); free(w->m); free(w->l); free(w->kb); free(w->vb); free(w->st); free(w->pa);
    free(w->ks); free(w->vs); free(w->ct);
    free(w);
}

/* Q^T B tiles of head g's rows r0 .. r0 + nr - 1 on lanes off .. off + nr - 1 (other lanes zero): a 16 x 16 dword
 * transpose of 16 lanes' 32-dim slices, a tile per 32 dims */
static void pack_qt(const float *q, int64_t q_start, int r0, int nr, int off, int G, int H, int g, int D,
                    uint32_t *qt) {
    for (int ks = 0; ks < D / 32; ks++) {
        __m512i r[16];
        for (int i = 0; i < 16; i++) {
            const int row = r0 + i - off;
            if (i >= off && i < off + nr) {
                const float *src = q + ((size_t)(q_start + row / G) * H + (size_t)g * G + row % G) * D + 32 * ks;
                r[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
            } else {
                r[i] = _mm512_setzero_si512();
            }
        }
        transpose16_epi32(r);
        for (int p = 0; p < 16; p++) _mm512_store_si512(qt + ((size_t)ks * 16 + p) * 16, r[p]);
    }
}

/* C tile C += A (tile 4) . head's Q^T tile (column tile C, 32-dim step ks) through B tile BT */
#define TDP_COL(C, BT)                                               \
    do {                                                             \
        _tile_loadd(BT, qh + ((size_t)(C) * D / 32 + ks) * 256, 64); \
        _tile_dpbf16ps(C, 4, BT);                                    \
    } while (0)

/* K rows of head g for the 16-key block at j0 as an A tile (*as its stride): a run of slots straight from the pool,
 * other rows copied to kb (an fp8 cache's always, as value / 256), keys past kc zero */
static const uint16_t *k_block(const uint8_t *kc8, int kind, const int64_t *sl, int j0, int kc, int Hkv, int g, int D,
                               uint16_t *kb, size_t *as) {
    *as = (size_t)D * 2;
    if (kind == KV_FP8) {
        for (int j = 0; j < 16; j++) {
            const uint8_t *r = j0 + j < kc ? kc8 + ((size_t)sl[j0 + j] * Hkv + g) * (D + 4) : NULL;
            for (int d = 0; d < D; d += 32)
                _mm512_storeu_si512(kb + (size_t)j * D + d, r ? fp8x32_bf16_div256(r + d) : _mm512_setzero_si512());
        }
        return kb;
    }
    const uint16_t *k = (const uint16_t *)kc8;
    if (j0 + 16 <= kc && run16(sl + j0)) {
        *as = (size_t)Hkv * D * 2;
        return k + ((size_t)sl[j0] * Hkv + g) * D;
    }
    for (int j = 0; j < 16; j++)
        for (int d = 0; d < D; d += 32)
            _mm512_storeu_si512(kb + (size_t)j * D + d, j0 + j < kc ? _mm512_loadu_si512(k + ((size_t)sl[j0 + j] * Hkv
                                                                                                   + g) * D + d)
                                                                    : _mm512_setzero_si512());
    return kb;
}

/* st[0..kcp)[0..NC*16) = S^T of a group's column tiles t[0 .. NC) for keys [0, kcp) of the chunk (zero past kc): the
 * NC tiles of one head's rows, or one tile (NC = 1) of t->ng heads, each head's product accumulated into the same C
 * tile (its Q^T zero on the other heads' lanes). qt: Q^T tiles of (head, column tile) qts apart. An fp8 cache's S^T
 * then times each lane's head's K row factor (ks: head t->g0's, Hkv a key; hidx: a lane's head in the tile). */
static void scores_t(const uint8_t *kc8, int kind, const int64_t *sl, int kc, int kcp, int Hkv, int D,
                     const coltile *t, int NC, const uint32_t *qt, size_t qts, uint16_t *kb, const float *ks,
                     __m512i hidx, float *st, ahead *ah) {
    const int NCS = NC * 16;
    const uint32_t *q0 = qt + (size_t)t->g0 * 4 * qts, *q1 = q0 + 4 * qts; /* heads g0 and g0 + 1, column tile 0 */
    /* D = 64: the Q^T tiles of up to two heads (one tile each) or of a head's two column tiles stay in tiles 4-7 */
    const int res1 = D == 64 && NC == 1, res2 = D == 64 && NC == 2;
    if (res1) {
        _tile_loadd(4, q0, 64);
        _tile_loadd(5, q0 + 256, 64);
        if (t->ng > 1) {
            _tile_loadd(6, q1, 64);
            _tile_loadd(7, q1 + 256, 64);
        }
    } else if (res2) {
        _tile_loadd(4, q0, 64);
        _tile_loadd(5, q0 + 256, 64);
        _tile_loadd(6, q0 + qts, 64);
        _tile_loadd(7, q0 + qts + 256, 64);
    }
    for (int j0 = 0; j0 < kcp; j0 += 16) {
        ahead_step(ah);
        float *dst = st + (size_t)j0 * NCS;
        _tile_zero(0);
        if (NC > 1) _tile_zero(1);
        if (NC > 2) _tile_zero(2);
        if (NC > 3) _tile_zero(3);
        for (int i = 0; i < t->ng; i++) {
            size_t as;
            const uint16_t *a = k_block(kc8, kind, sl, j0, kc, Hkv, t->g0 + i, D, kb, &as);
            const uint32_t *qh = q0 + (size_t)i * 4 * qts;
            if (res1) { /* C in 0, K in 2, a third head's Q^T through 3 */
                _tile_loadd(2, a, as);
                if (i == 0) _tile_dpbf16ps(0, 2, 4);
                else if (i == 1) _tile_dpbf16ps(0, 2, 6);
                else {
                    _tile_loadd(3, qh, 64);
                    _tile_dpbf16ps(0, 2, 3);
                }
                _tile_loadd(2, a + 32, as);
                if (i == 0) _tile_dpbf16ps(0, 2, 5);
                else if (i == 1) _tile_dpbf16ps(0, 2, 7);
                else {
                    _tile_loadd(3, qh + 256, 64);
                    _tile_dpbf16ps(0, 2, 3);
                }
            } else if (res2) { /* C in 0-1, K in 2 */
                _tile_loadd(2, a, as);
                _tile_dpbf16ps(0, 2, 4);
                _tile_dpbf16ps(1, 2, 6);
                _tile_loadd(2, a + 32, as);
                _tile_dpbf16ps(0, 2, 5);
                _tile_dpbf16ps(1, 2, 7);
            } else { /* C in 0-3, K in 4, Q^T through 5-7 */
                for (int ks = 0; ks < D / 32; ks++) {
                    _tile_loadd(4, a + 32 * ks, as);
                    TDP_COL(0, 5);
                    if (NC > 1) TDP_COL(1, 6);
                    if (NC > 2) TDP_COL(2, 7);
                    if (NC > 3) TDP_COL(3, 5);
                }
            }
        }
        _tile_stored(0, dst, NCS * 4);
        if (NC > 1) _tile_stored(1, dst + 16, NCS * 4);
        if (NC > 2) _tile_stored(2, dst + 32, NCS * 4);
        if (NC > 3) _tile_stored(3, dst + 48, NCS * 4);
        if (kind == KV_FP8) scale_rows(dst, NCS, ks + (size_t)j0 * Hkv, Hkv, hidx);
    }
}

/* V rows of head g for keys [0, kcp) in key pairs, keys past kc zero: vb[j/2] holds, for each 32 dims d0.., the
 * pairs (V[j][d], V[j+1][d]) of dims d0 + {0-3, 8-11, 16-19, 24-27} then of d0 + {4-7, 12-15, 20-23, 28-31} (what
 * vpunpcklwd / vpunpckhwd give, one shuffle a vector where an ordered interleave takes three): the output's dims come
 * out in that order, put back by unshuffle_row. An fp8 cache's rows go in as value / 256 (their factors: item). */
static void pack_v(const uint8_t *v, int kind, const int64_t *sl, int kc, int kcp, int Hkv, int g, int D,
                   uint16_t *vb, ahead *ah) {
    const size_t rbytes = kind == KV_FP8 ? (size_t)D + 4 : (size_t)D * 2;
    for (int j = 0; j < kcp; j += 2) {
        ahead_step(ah);
        uint16_t *dst = vb + (size_t)(j / 2) * D * 2;
        const uint8_t *ra = j < kc ? v + ((size_t)sl[j] * Hkv + g) * rbytes : NULL;
        const uint8_t *rb = j + 1 < kc ? v + ((size_t)sl[j + 1] * Hkv + g) * rbytes : NULL;
        for (int d0 = 0; d0 < D; d0 += 32) {
            const __m512i a = v32(ra, kind, d0), b = v32(rb, kind, d0);
            _mm512_storeu_si512(dst + 2 * d0, _mm512_unpacklo_epi16(a, b));
            _mm512_storeu_si512(dst + 2 * d0 + 32, _mm512_unpackhi_epi16(a, b));
        }
    }
}

/* A row of D outputs in pack_v's dim order, put back in order, times `scale`, into dst */
static inline void unshuffle_row(const float *src, int D, float scale, float *dst) {
    const __m512i i0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i i1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int d0 = 0; d0 < D; d0 += 32) {
        const __m512 lo = _mm512_loadu_ps(src + d0), hi = _mm512_loadu_ps(src + d0 + 16);
        _mm512_storeu_ps(dst + d0, _mm512_mul_ps(_mm512_permutex2var_ps(lo, i0, hi), sc));
        _mm512_storeu_ps(dst + d0 + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, i1, hi), sc));
    }
}

#include "amx_short_softmax.h"

/* o[0..NC*16)[0..D) += P . V over keys [0, kcp): 16 rows x 64 dims (four C tiles) at a time, o loaded into them */
static void accumulate_pv(const uint32_t *pa, const uint16_t *vb, int D, int NC, int kcp, float *o) {
    for (int c = 0; c < NC; c++)
        for (int n0 = 0; n0 < D; n0 += 64) {
            float *oc = o + (size_t)c * 16 * D + n0;
            const int four = D - n0 >= 64;
            _tile_loadd(0, oc, D * 4);
            _tile_loadd(1, oc + 16, D * 4);
            if (four) {
                _tile_loadd(2, oc + 32, D * 4);
                _tile_loadd(3, oc + 48, D * 4);
            }
            for (int kb = 0; kb < kcp; kb += 32) {
                const uint16_t *b = vb + ((size_t)(kb / 2) * D + n0) * 2;
                _tile_loadd(4, pa + ((size_t)c * (KC / 32) + kb / 32) * 256, 64);
                _tile_loadd(5, b, D * 4);
                _tile_dpbf16ps(0, 4, 5);
                _tile_loadd(6, b + 32, D * 4);
                _tile_dpbf16ps(1, 4, 6);
                if (four) {
                    _tile_loadd(7, b + 64, D * 4);
                    _tile_dpbf16ps(2, 4, 7);
                    _tile_loadd(5, b + 96, D * 4);
                    _tile_dpbf16ps(3, 4, 5);
                }
            }
            _tile_stored(0, oc, D * 4);
            _tile_stored(1, oc + 16, D * 4);
            if (four) {
                _tile_stored(2, oc + 32, D * 4);
                _tile_stored(3, oc + 48, D * 4);
            }
        }
}

/* Keys [k0, k1) of sequence s (amx_short_plan.h's work), every kv head, a chunk of KC keys at a time; per group of
 * column tiles (a head's NC, or one that packs several heads): S^T, the softmax, then per head V packed and P.V. */
static void item(const float *q, const uint8_t *k, const uint8_t *v, int kind, const int64_t *sl, int64_t q_start,
                 int64_t q_len, int64_t L, const work *it, int H, int Hkv, int D, float scale, float *out,
                 const partials *pt, scratch *w) {
    const int G = H / Hkv, R = (int)q_len * G;
    const int64_t first = L - q_len; /* context position of the span's token 0 */
    const size_t qts = (size_t)D / 32 * 256;
    coltile *ct = w->ct;
    const int n_ct = col_tiles(R, Hkv, ct), lanes = n_ct * 16;
    const int NC = R <= 8 ? 1 : (R + 15) / 16, packed = R <= 8 && ct[0].ng > 1;
    for (int c = 0; c < n_ct; c++)
        for (int i = 0; i < ct[c].ng; i++)
            pack_qt(q, q_start, ct[c].r0, ct[c].nr, i * ct[c].nr, G, H, ct[c].g0 + i, D,
                    w->qt + ((size_t)(ct[c].g0 + i) * 4 + ct[c].r0 / 16) * qts);
    for (int x = 0; x < lanes; x++) w->m[x] = -INFINITY, w->l[x] = 0.f;
    memset(w->o, 0, (size_t)lanes * D * sizeof(float));
    if (packed) memset(w->pa, 0, (size_t)ct[0].ng * PAS * 4); /* a head's set: the other heads' rows stay zero */
    const float scale2 = scale * 1.4426950408889634f;
    for (int64_t c0 = it->k0; c0 < it->k1; c0 += KC) {
        const int kc = (int)(it->k1 - c0 < KC ? it->k1 - c0 : KC), kcp = (kc + 31) & ~31;
        const int64_t nx = it->k1 - c0 - kc < KC ? it->k1 - c0 - kc : KC;
        /* ahead_step calls, about: scores_t, pack_v, the softmax (and row_scales twice for fp8) */
        const int steps = (n_ct / NC + (kind == KV_FP8 ? 2 : 0)) * kcp / 16 + Hkv * kcp / 2 + n_ct * kcp / 2;
        ahead ah = ahead_new((const char *)k, (const char *)v, sl + c0 + kc, (int)nx, Hkv * (int)kv_row_bytes(kind, D),
                             steps);
        if (kind == KV_FP8) { /* the rows' factors (kv_row_factor): their scales x 256, exact */
            row_scales(k, sl + c0, kc, kcp, Hkv, D, w->ks, NULL, &ah);
            row_scales(v, sl + c0, kc, kcp, Hkv, D, w->vs, NULL, &ah);
            for (int e = 0; e < kcp * Hkv; e += 16) {
                _mm512_storeu_ps(w->ks + e, _mm512_mul_ps(_mm512_loadu_ps(w->ks + e), _mm512_set1_ps(256.f)));
                _mm512_storeu_ps(w->vs + e, _mm512_mul_ps(_mm512_loadu_ps(w->vs + e), _mm512_set1_ps(256.f)));
            }
        }
        for (int c = 0; c < n_ct; c += NC) {
            const coltile *t = ct + c;
            /* keys of the chunk each lane sees; padding lanes see them all (their Q is zero, their output unused).
             * Masks are needed where a lane sees fewer than kcp: every lane does when kc is not a multiple of 32. */
            int visr[4 * 16], hid[16];
            int masked = 0;
            for (int x = 0; x < NC * 16; x++) {
                const coltile *tx = t + x / 16;
                const int lx = x % 16;
                int64_t vis = lx < tx->ng * tx->nr ? first + (tx->r0 + lx % tx->nr) / G + 1 - c0 : kc;
                if (vis > kc) vis = kc;
                visr[x] = (int)vis;
                masked |= vis < kcp;
                if (x < 16) hid[x] = x < t->ng * t->nr ? x / t->nr : 0;
            }
            const __m512i hidx = _mm512_loadu_si512(hid);
            scores_t(k, kind, sl + c0, kc, kcp, Hkv, D, t, NC, w->qt, qts, w->kb, w->ks + t->g0, hidx, w->st, &ah);
            for (int cc = 0; cc < NC; cc++)
                softmax_cols(w->st, NC * 16, cc, kcp, scale2, _mm512_loadu_si512(visr + cc * 16), masked,
                             packed ? t->nr : 16, t->ng, hidx, w->m + (c + cc) * 16, w->l + (c + cc) * 16,
                             w->o + (size_t)(c + cc) * 16 * D, D, kind == KV_FP8 ? w->vs + t->g0 : NULL, Hkv,
                             w->pa + cc * PAS, &ah);
            for (int i = 0; i < t->ng; i++) {
                pack_v(v, kind, sl + c0, kc, kcp, Hkv, t->g0 + i, D, w->vb, &ah);
                accumulate_pv(w->pa + i * PAS, w->vb, D, NC, kcp, w->o + (size_t)c * 16 * D);
            }
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
    w->qt = alloc64((size_t)Hkv * 4 * D / 32 * 256 * 4);
    w->o = alloc64((size_t)Hkv * MAXRS * D * 4);
    w->m = alloc64((size_t)Hkv * MAXRS * 4);
    w->l = alloc64((size_t)Hkv * MAXRS * 4);
    w->kb = alloc64((size_t)16 * D * 2);
    w->vb = alloc64((size_t)KC * D * 2);
    w->st = alloc64((size_t)KC * MAXRS * 4);
    w->pa = alloc64(16 * PAS * 4);
    w->ks = alloc64(((size_t)KC * Hkv + 16) * 4);
    w->vs = alloc64(((size_t)KC * Hkv + 16) * 4);
    w->ct = malloc((size_t)Hkv * 4 * sizeof(coltile));
    if (w->qt && w->o && w->m && w->l && w->kb && w->vb && w->st && w->pa && w->ks && w->vs && w->ct) return w;
    scratch_free(w);
    return NULL;
}

static void run_item(const call *c, const work *it, const partials *pt, void *w) {
    const int64_t *sq = c->seqs + 4 * it->s;
    item(c->q, (const uint8_t *)c->k, (const uint8_t *)c->v, c->kind, c->slots + sq[2], sq[0], sq[1], sq[3], it, c->H,
         c->Hkv, c->D, c->scale, c->out, pt, w);
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

int paged_attention_amx_short(const float *q, const void *k, const void *v, int kv_kind, const int64_t *slots,
                              const int64_t *seqs, int n_seqs, int H, int Hkv, int D, float scale, float *out,
                              int mode) {
    (void)mode;
    if ((kv_kind != KV_BF16 && kv_kind != KV_FP8) || D % 32 != 0 || D > MAXD || H % Hkv != 0 ||
        !paged_attention_amx_short_available())
        return 2;
    const call c = {q, k, v, slots, seqs, n_seqs, H, Hkv, D, scale, out, kv_kind};
    const kernel_ops ops = {scratch_new, scratch_free, run_item, merge_lanes};
    return run_items(&c, MAXRS, &ops);
}
#endif
