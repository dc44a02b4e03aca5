/* How the AMX short kernel (amx_short.c) reaches its cache rows: the prefetcher that fetches the next chunk's slot
 * rows through every phase of the current one, for rows of any width (bf16, or fp8 with its scale: not whole lines),
 * and an fp8 cache's rows as exact bf16 values (V a row at a time; K's row factors applied to S^T). Included by
 * amx_short.c after kv_rows.h. */
#ifndef DELTASERVE_AMX_SHORT_ROWS_H
#define DELTASERVE_AMX_SHORT_ROWS_H

/* The next chunk's slot rows (K and V, every kv head), fetched into L2 while the current chunk computes, a few
 * lines at every step of every phase: a core streams only ~14 GB/s from memory, and only while it has misses in
 * flight, so the fetches must run through the compute rather than before it (prefetched in a burst, or left to
 * the demand loads, a chunk's rows and its compute take turns). */
typedef struct {
    const char *k, *v;
    const int64_t *sl; /* the next chunk's slots */
    int keys, row;     /* keys of the next chunk; bytes a slot's row (Hkv x D x 2, or Hkv x (D + 4) for fp8) */
    int key, line;     /* the next line to fetch: of key `key`'s K row, then (line >= lines_of(row)) its V row */
    int per;           /* lines a step */
} ahead;

/* fetches a slot's row takes: its 64-byte steps, and its last byte where the row is not whole lines (an fp8 row of
 * 3 x 68 bytes may touch 5 lines wherever it starts) */
static inline int lines_of(int row) { return row % 64 ? row / 64 + 2 : row / 64; }

static inline void ahead_step(ahead *a) {
    const int lr = lines_of(a->row);
    for (int n = 0; n < a->per && a->key < a->keys; n++) {
        const int ln = a->line < lr ? a->line : a->line - lr;
        const size_t off = (size_t)a->sl[a->key] * a->row + (ln * 64 < a->row ? (size_t)ln * 64 : (size_t)a->row - 1);
        __builtin_prefetch((a->line < lr ? a->k : a->v) + off, 0, 2);
        if (++a->line == 2 * lr) a->line = 0, a->key++;
    }
}

/* S^T rows j of a 16-key block (NCS lanes a row) times their K rows' factors: lane x's is f[j fs + hidx[x]] (its
 * head's in a tile that packs several; one head: hidx zero) */
static inline void scale_rows(float *st, int NCS, const float *f, int fs, __m512i hidx) {
    for (int j = 0; j < 16; j++) {
        const __m512 fj = _mm512_permutexvar_ps(hidx, _mm512_loadu_ps(f + (size_t)j * fs));
        for (int c = 0; c < NCS; c += 16)
            _mm512_storeu_ps(st + (size_t)j * NCS + c, _mm512_mul_ps(_mm512_loadu_ps(st + (size_t)j * NCS + c), fj));
    }
}

/* dims d0 .. d0 + 31 of a V row as bf16 (an fp8 row's as value / 256); zero for a missing row */
static inline __m512i v32(const uint8_t *row, int kind, int d0) {
    if (!row) return _mm512_setzero_si512();
    return kind == KV_FP8 ? fp8x32_bf16_div256(row + d0) : _mm512_loadu_si512(row + 2 * d0);
}

#endif
