/* AMX tile state for the AMX kernels (amx_attention.c, amx_short.c, amx_gemm.c): include only where __AMX_TILE__ is
 * defined. */
#ifndef DELTASERVE_AMX_TILES_H
#define DELTASERVE_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 when Linux grants this process the AMX tile state (asked once per library: the grant is the process's), else
 * 0. Every thread that runs tile instructions needs it. */
static int amx_state = -1; /* -1 not asked yet, 0 refused, 1 granted */

static inline int amx_tiles_granted(void) {
    if (amx_state < 0) amx_state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) tile_config;

/* Scratch on a cache-line boundary, its size rounded up to whole lines (aligned_alloc wants a multiple): the AMX
 * attention kernels' per-thread buffers, which tile loads and stores read and write a line at a time. */
static inline void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) & ~(size_t)63); }

/* every tile 16 rows x 64 bytes: A (16 rows x 32 bf16), B (16 pair-rows x 16 columns x 2), C (16 x 16 fp32); the
 * calling thread's, until _tile_release */
static inline void tiles_configure(void) {
    /* volatile: GCC 12 at -O2 has dropped the colsb stores of a config whose only reader is ldtilecfg (seen where
     * this was inlined into a small program's main: ldtilecfg then faults on colsb 0), so every byte is written */
    volatile tile_config c;
    for (size_t i = 0; i < sizeof c; i++) ((volatile uint8_t *)&c)[i] = 0;
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig((const void *)&c);
}
#endif
