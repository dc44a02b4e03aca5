/* What the AMX short kernels (amx_short.c: bf16 rows, amx_short_int8.c: int8 rows) share: their work items, how a
 * sequence's keys split into them, where split parts leave their sums, and the test for a run of slots. Include
 * after KC (keys a chunk) and MIN_PART_KEYS are defined, where __AMX_TILE__ is. */
#ifndef DELTASERVE_AMX_SHORT_PLAN_H
#define DELTASERVE_AMX_SHORT_PLAN_H
#include <immintrin.h>
#include <stdint.h>

/* 1 when the 16 slots are consecutive ids (their rows one strided tile load) */
static inline int run16(const int64_t *sl) {
    const __m512i b = _mm512_set1_epi64(sl[0]), lo = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __mmask8 a = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512(sl), _mm512_add_epi64(b, lo));
    const __mmask8 c = _mm512_cmpeq_epi64_mask(_mm512_loadu_si512(sl + 8),
                                               _mm512_add_epi64(b, _mm512_add_epi64(lo, _mm512_set1_epi64(8))));
    return a == 0xFF && c == 0xFF;
}

/* Keys [k0, k1) of sequence s; part < 0: all its keys, normalised output to out; else unnormalised output,
 * reference and denominator to partial slot `part`. */
typedef struct {
    int s, part;
    int64_t k0, k1;
} work;

/* A split part's sums, Hkv x MAXRS rows a slot (the kernel's row order): */
typedef struct {
    float *o; /* [n_slots][Hkv * MAXRS][D] */
    float *m; /* [n_slots][Hkv * MAXRS] */
    float *l;
} partials;

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
#endif
