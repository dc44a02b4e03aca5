/* The stub an attention kernel library builds where the CPU lacks its instructions: `NAME_available()` says 0 and
 * NAME refuses every call with 2 ("not a shape or kind it takes"), so paged_attention.py binds the library as it
 * binds every attention kernel (one C signature, below) and then leaves it out. */
#ifndef DELTASERVE_KERNEL_STUB_H
#define DELTASERVE_KERNEL_STUB_H
#include <stdint.h>

#define ATTENTION_KERNEL_STUB(NAME)                                                                               \
    int NAME##_available(void) { return 0; }                                                                      \
    int NAME(const float *q, const void *k, const void *v, int kv_kind, const int64_t *slots, const int64_t *seqs,  \
             int n_seqs, int H, int Hkv, int D, float scale, float *out, int mode) {                              \
        (void)q; (void)k; (void)v; (void)kv_kind; (void)slots; (void)seqs; (void)n_seqs; (void)H; (void)Hkv;        \
        (void)D; (void)scale; (void)out; (void)mode;                                                              \
        return 2;                                                                                                 \
    }
#endif
