/* How the AMX short kernel (amx_short.c) reads an fp8 cache's rows: as exact bf16 values (V a row at a time; K's row
 * factors applied to S^T). Included by amx_short.c after kv_rows.h. */
#ifndef DELTASERVE_AMX_SHORT_ROWS_H
#define DELTASERVE_AMX_SHORT_ROWS_H

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
