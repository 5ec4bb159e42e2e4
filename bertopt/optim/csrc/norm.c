/* The global gradient norm's sum of squares, at the memory-bandwidth limit.

   Summing every square in double is compute-bound: a double lane holds half as many
   values and the conversions cost as much as the adds (in L2, one thread: 26 GB/s in
   double against 42 GB/s in float). Here squares are summed in float32 over blocks of
   NORM_BLOCK elements, one vector of 8 lanes per block (explicit vectors: the result is
   the same with any vector width), and the blocks' sums are added in double. Each float
   lane adds NORM_BLOCK / 8 = 32 non-negative squares: its relative rounding error is at
   most 32 * 2^-24 (2e-6); measured against a float64 norm on 23M elements it is far
   smaller (tests/optim/test_norm_accuracy.py).

   A core reading one stream does not reach memory bandwidth: the prefetcher keeps too few
   lines in flight (one thread summed 7 GB/s here while an in-place add moved 14 GB/s).
   So a span is read as NORM_STREAMS streams at once, a block from each quarter per
   iteration: 1.46x faster than one stream at 2 threads, 1.49x at 1; eight streams gain
   nothing more (bert-base, benchmarks/norm_streams.py). Partial sums are combined in a
   fixed order: the norm does not depend on the thread count or timing. */
#include <stdlib.h>

#include "bertopt.h"

#define NORM_BLOCK 256
#ifndef NORM_STREAMS  /* benchmarks/norm_streams.py builds other counts to compare */
#define NORM_STREAMS 4
#endif

typedef struct { float *const *x; double *partial; } sumsq_args;

/* Eight float lanes per vector (GCC/Clang vector extension: AVX's ymm where there is AVX,
   two SSE or NEON registers elsewhere). */
typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f x;
    __builtin_memcpy(&x, p, sizeof x);  /* unaligned load */
    return x;
}

static inline double block_sum(v8f a) {
    double s = 0.0;
    for (int j = 0; j < 8; j++) s += (double)a[j];
    return s;
}

/* Sum of x*x: full blocks NORM_STREAMS at a time (one from each of NORM_STREAMS equal
   runs of blocks), then the blocks left over, then the last elements in double. */
static double sumsq_span(const float *restrict x, int64_t n) {
    const int64_t n_blocks = n / NORM_BLOCK, per_stream = n_blocks / NORM_STREAMS;
    double s = 0.0;
    for (int64_t b = 0; b < per_stream; b++) {
        v8f acc[NORM_STREAMS];
        for (int q = 0; q < NORM_STREAMS; q++) acc[q] = (v8f){0};
        for (int64_t i = 0; i < NORM_BLOCK; i += 8)
            for (int q = 0; q < NORM_STREAMS; q++) {
                const v8f y = load8(x + (q * per_stream + b) * NORM_BLOCK + i);
                acc[q] += y * y;
            }
        for (int q = 0; q < NORM_STREAMS; q++) s += block_sum(acc[q]);
    }
    for (int64_t b = NORM_STREAMS * per_stream; b < n_blocks; b++) {
        v8f acc = {0};
        for (int64_t i = 0; i < NORM_BLOCK; i += 8) {
            const v8f y = load8(x + b * NORM_BLOCK + i);
            acc += y * y;
        }
        s += block_sum(acc);
    }
    for (int64_t i = n_blocks * NORM_BLOCK; i < n; i++) s += (double)x[i] * (double)x[i];  /* exact in double */
    return s;
}

static void sumsq_item(const bertopt_job *job, const bertopt_item *it, int64_t k) {
    const sumsq_args *a = (const sumsq_args *)job->args;
    a->partial[k] = sumsq_span(a->x[it->tensor] + it->start, it->len);
}

/* Sum of x*x over all tensors into *out (h: only version, n_threads and chunk are read).
   BERTOPT_OK, or an error with *out not written. */
int bertopt_sumsq_f32(float *const *x, const int64_t *numels, int64_t n_tensors, double *out,
                      const bertopt_hyper *h) {
    if (h->version != BERTOPT_ABI_VERSION) return BERTOPT_EVERSION;
    int64_t n_items = 0;
    bertopt_item *items = bertopt_make_items(numels, n_tensors, h->chunk, &n_items);
    if (!items) return BERTOPT_ENOMEM;
    double *partial = calloc((size_t)(n_items > 0 ? n_items : 1), sizeof(double));
    if (!partial) { free(items); return BERTOPT_ENOMEM; }
    sumsq_args a = {x, partial};
    bertopt_job job = {.items = items, .n_items = n_items, .total = bertopt_total_elements(numels, n_tensors),
                       .work = sumsq_item, .args = &a};
    bertopt_run_job(&job, h->n_threads);
    double s = 0.0;
    for (int64_t k = 0; k < n_items; k++) s += partial[k];  /* fixed order: deterministic */
    free(partial);
    free(items);
    *out = s;
    return BERTOPT_OK;
}
