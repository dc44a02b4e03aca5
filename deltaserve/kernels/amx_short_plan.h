/* What the AMX short kernels (amx_short.c: bf16 and fp8 rows, amx_short_int8.c: int8 rows) share: their work items,
 * how a sequence's keys split into them (the parts' sums and merge: split_parts.h), running the items on the threads,
 * the rows' lanes (column tiles), a lane's rescale when its softmax reference moves, the test for a run of slots, and
 * the prefetcher of the next chunk's rows. Include after KC (keys a chunk), MIN_PART_KEYS and SPLIT_ITEMS are defined,
 * and amx_tiles.h (alloc64), where __AMX_TILE__ is. */
#ifndef DELTASERVE_AMX_SHORT_PLAN_H
#define DELTASERVE_AMX_SHORT_PLAN_H
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "split_parts.h"

/* 1 when the 16 slots are consecutive ids (their rows one strided tile load) */
static inline int run16(const int64_t *sl) {
    const __m512i b = _mm512_set1_epi64(sl[0]), lo = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __mmask8 a = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512(sl), _mm512_add_epi64(b, lo));
    const __mmask8 c = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512(sl + 8),
                                               _mm512_add_epi64(b, _mm512_add_epi64(lo, _mm512_set1_epi64(8))));
    return a == 0xFF && c == 0xFF;
}

/* A column tile (16 lanes of S^T's columns, the softmax's vector): heads g0 .. g0 + ng - 1, rows r0 .. r0 + nr - 1
 * of each, head g0 + i's row r0 + x on lane i nr + x. Rows of a decode (R <= 8 a kv head) pack 16 / R heads a tile,
 * so the softmax's lanes are not mostly padding (SmolLM2: 3 rows a head, 3 heads a tile). Lanes past ng nr: padding. */
typedef struct {
    int g0, ng, r0, nr;
} coltile;

/* Column tile c of a sequence with R rows a kv head: 16 / R heads a tile where R <= 8, else a head's ceil(R / 16)
 * tiles one after the other; lane c x 16 + x is lane x of tile c */
static inline coltile col_tile(int R, int Hkv, int c) {
    if (R <= 8) {
        const int per = 16 / R, g = c * per;
        return (coltile){g, Hkv - g < per ? Hkv - g : per, 0, R};
    }
    const int nc = (R + 15) / 16, r0 = c % nc * 16;
    return (coltile){c / nc, 1, r0, R - r0 < 16 ? R - r0 : 16};
}

/* how many column tiles (at most Hkv x 4) */
static inline int n_col_tiles(int R, int Hkv) { return R <= 8 ? (Hkv + 16 / R - 1) / (16 / R) : Hkv * ((R + 15) / 16); }

/* every column tile to ct; returns their count */
static int col_tiles(int R, int Hkv, coltile *ct) {
    const int n = n_col_tiles(R, Hkv);
    for (int c = 0; c < n; c++) ct[c] = col_tile(R, Hkv, c);
    return n;
}

/* the output row of lane x of column tile t: its query token and head */
static inline float *lane_out(float *out, int64_t q_start, const coltile *t, int x, int G, int H, int D) {
    const int g = t->g0 + x / t->nr, r = t->r0 + x % t->nr;
    return out + ((size_t)(q_start + r / G) * H + (size_t)g * G + r % G) * D;
}

/* The next chunk's slot rows (K and V, every kv head), fetched into L2 while the current chunk computes, a key's rows
 * every few steps of every phase: a core streams only ~14 GB/s from memory, and only while it has misses in flight,
 * so the fetches must run through the compute rather than before it (prefetched in a burst, or left to the demand
 * loads, a chunk's rows and its compute take turns). A key at a time, not a line at a time: the line loop's
 * bookkeeping cost more than the fetches (8 x 8k decode with every row in L2: switched off, the kernel took half the
 * time). */
typedef struct {
    const char *k, *v;
    const int64_t *sl; /* the next chunk's slots */
    int keys, row;     /* keys of the next chunk; bytes a slot's row (Hkv x D x 2, or Hkv x (D + 4) for int8 / fp8) */
    int key;           /* the next key to fetch */
    int credit, per;   /* keys owed and keys a step, in 1/256 keys */
} ahead;

/* a prefetcher for `keys` keys (their rows `row` bytes) spread over about `steps` calls of ahead_step */
static inline ahead ahead_new(const char *k, const char *v, const int64_t *sl, int keys, int row, int steps) {
    const ahead a = {k, v, sl, keys > 0 ? keys : 0, row, 0, 0, keys > 0 ? (keys * 256 + steps - 1) / steps : 0};
    return a;
}

/* every line of the row at p: its 64-byte steps, and its last byte where the row is not whole lines (an fp8 or int8
 * row of 3 x 68 bytes may touch 5 lines wherever it starts) */
static inline void fetch_row(const char *p, int row) {
    for (int o = 0; o < row; o += 64) __builtin_prefetch(p + o, 0, 2);
    if (((uintptr_t)p | (uintptr_t)row) % 64) __builtin_prefetch(p + row - 1, 0, 2);
}

static inline void ahead_step(ahead *a) {
    a->credit += a->per;
    for (; a->credit >= 256 && a->key < a->keys; a->credit -= 256) {
        const size_t off = (size_t)a->sl[a->key++] * a->row;
        fetch_row(a->k + off, a->row);
        fetch_row(a->v + off, a->row);
    }
}

/* Keys [k0, k1) of sequence s; part < 0: all its keys, normalised output to out; else unnormalised output,
 * reference and denominator to partial slot `part`. */
typedef struct {
    int s, part;
    int64_t k0, k1;
} work;


/* Items: each sequence's keys in `parts` ranges (fewer where a part would hold under MIN_PART_KEYS), split only
 * within the keys every row sees (0 .. kv_len - q_len), the last part running to the end. Returns the count
 * (items NULL: count only); *n_slots the partial slots. */
static int plan(const int64_t *seqs, int n_seqs, int parts, work *items, int *n_slots) {
    int n = 0, slot = 0;
    for (int s = 0; s < n_seqs; s++) {
        const int64_t q_len = seqs[4 * s + 1], L = seqs[4 * s + 3], all = L - q_len + 1;
        if (q_len <= 0) continue;
        int np = parts;
        if (np > 1 && all / np < MIN_PART_KEYS) np = (int)(all / MIN_PART_KEYS);
        if (np < 1) np = 1;
        const int64_t per = ((all + np - 1) / np + KC - 1) / KC * KC;
        np = (int)((all + per - 1) / per);
        for (int p = 0; p < np; p++) {
            if (items) {
                work *it = items + n;
                it->s = s, it->k0 = p * per, it->k1 = p == np - 1 ? L : (p + 1) * per;
                it->part = np > 1 ? slot + p : -1;
            }
            n++;
        }
        if (np > 1) slot += np;
    }
    *n_slots = slot;
    return n;
}

/* 16 lanes' softmax references move from mv to mnew: each lane's denominator (l [16], in place) and output row (o
 * [16][D]) scaled by 2^(m_old - m_new), where it moves (a lane that had none, m_old = -inf, starts from 0) */
static inline void rescale_lanes(__m512 mv, __m512 mnew, float *l, float *o, int D) {
    float mo[16], mn[16];
    _mm512_storeu_ps(mo, mv);
    _mm512_storeu_ps(mn, mnew);
    for (int r = 0; r < 16; r++) {
        if (mo[r] == mn[r]) continue;
        const float alpha = mo[r] == -INFINITY ? 0.f : exp2f(mo[r] - mn[r]);
        l[r] *= alpha;
        const __m512 av = _mm512_set1_ps(alpha);
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(o + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)r * D + d), av));
    }
}

/* A call's work items and its split parts' sums */
typedef struct {
    work *items;
    int n_items;
    partials pt;
} schedule;

static void schedule_free(schedule *sc) {
    free(sc->items);
    free(sc->pt.o); free(sc->pt.m); free(sc->pt.l);
}

/* What both kernels do first: their items, a sequence's keys split into parts where fewer than SPLIT_ITEMS items a
 * thread would leave threads idle, and the parts' buffers (rows a slot: Hkv x max_rows). Returns 0 with *sc set, -1
 * when no sequence has a query (nothing allocated), 2 when one has more than max_rows rows a kv head (nothing
 * allocated), 1 when out of memory (what it got freed). */
static int schedule_items(const int64_t *seqs, int n_seqs, int G, int Hkv, int D, int max_rows, schedule *sc) {
    int active = 0;
    for (int s = 0; s < n_seqs; s++) {
        if (seqs[4 * s + 1] * G > max_rows) return 2;
        active += seqs[4 * s + 1] > 0;
    }
    if (active == 0) return -1;
    const int threads = omp_get_max_threads();
    const int parts = active < SPLIT_ITEMS * threads ? (SPLIT_ITEMS * threads + active - 1) / active : 1;
    int n_slots;
    sc->n_items = plan(seqs, n_seqs, parts, NULL, &n_slots);
    sc->items = malloc((size_t)sc->n_items * sizeof(work));
    sc->pt = (partials){NULL, NULL, NULL};
    if (n_slots) {
        const size_t rows = (size_t)n_slots * Hkv * max_rows;
        sc->pt.o = alloc64(rows * D * sizeof(float));
        sc->pt.m = alloc64(rows * sizeof(float));
        sc->pt.l = alloc64(rows * sizeof(float));
    }
    if (!sc->items || (n_slots && !(sc->pt.o && sc->pt.m && sc->pt.l))) {
        schedule_free(sc);
        return 1;
    }
    plan(seqs, n_seqs, parts, sc->items, &n_slots);
    return 0;
}

/* One call's arguments, as the kernels' entry points take them */
typedef struct {
    const float *q;
    const void *k, *v;
    const int64_t *slots, *seqs;
    int n_seqs, H, Hkv, D;
    float scale;
    float *out;
    int kind; /* the cache's rows (kv_rows.h), for a kernel that takes more than one */
} call;

/* A kernel's side of run_items: a thread's scratch (NULL when out of memory), one work item, and the rows of a split
 * sequence merged from its n_parts parts (the first of them `it`) into out. */
typedef struct {
    void *(*scratch_new)(const call *c);
    void (*scratch_free)(void *w);
    void (*item)(const call *c, const work *it, const partials *pt, void *w);
    void (*merge)(const call *c, const work *it, int n_parts, const partials *pt);
} kernel_ops;

/* The call on the threads: the items (dynamic schedule, the tile state configured per thread), then the split
 * sequences' merges (a group's parts follow its first, the one with k0 = 0). Returns the kernels' code (0, 1 out of
 * memory, 2 more than max_rows rows a kv head). */
static int run_items(const call *c, int max_rows, const kernel_ops *ops) {
    schedule sc;
    const int rc = schedule_items(c->seqs, c->n_seqs, c->H / c->Hkv, c->Hkv, c->D, max_rows, &sc);
    if (rc != 0) return rc < 0 ? 0 : rc;
    int failed = 0;
#pragma omp parallel
    {
        void *w = ops->scratch_new(c);
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
        if (w) tiles_configure();
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < sc.n_items; i++)
            if (w) ops->item(c, sc.items + i, &sc.pt, w);
        if (w) _tile_release();
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < sc.n_items; i++) {
            const work *it = sc.items + i;
            if (failed || it->part < 0 || it->k0 != 0) continue;
            int np = 1;
            while (i + np < sc.n_items && sc.items[i + np].k0 != 0) np++;
            ops->merge(c, it, np, &sc.pt);
        }
        if (w) ops->scratch_free(w);
    }
    schedule_free(&sc);
    return failed ? 1 : 0;
}
#endif
