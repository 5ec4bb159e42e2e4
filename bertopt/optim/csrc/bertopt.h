/* bertopt's native CPU kernels: what pool.c, norm.c, adam.c and lamb.c share.

   Built into one library (one thread pool) on first use by bertopt/optim/native/build.py
   and called through ctypes by bertopt/optim/native/kernels.py. The hyperparameters of a
   call travel in one struct, bertopt_hyper, mirrored field by field by a ctypes.Structure
   (kernels.Hyper); its `version` must equal BERTOPT_ABI_VERSION, checked once at load
   (bertopt_abi_version, bertopt_hyper_size) and again by every kernel (a mismatch
   returns BERTOPT_EVERSION before touching memory). Bump the version with any change
   to this struct or to a kernel's signature. */
#ifndef BERTOPT_H
#define BERTOPT_H

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>

#define BERTOPT_ABI_VERSION 4

/* Return codes of the kernels: nothing was written unless BERTOPT_OK. */
#define BERTOPT_OK 0
#define BERTOPT_ENOMEM (-1)
#define BERTOPT_EVERSION (-2)

typedef struct {
    int32_t version;         /* BERTOPT_ABI_VERSION */
    int32_t n_threads;       /* threads to use, the caller included */
    int64_t chunk;           /* elements per work item; the norm (norm.c) reads only these three fields */
    float lr;
    float beta1, beta2, one_minus_beta1, one_minus_beta2;  /* 1 - beta rounded as torch does */
    float eps, weight_decay;
    float clip;              /* global-norm clip coefficient, if has_clip */
    int32_t has_clip;
    int32_t decoupled;       /* Adam: 1 decay added to the update, 0 L2 on the gradient */
    int32_t has_trust_clip;  /* LAMB: clamp r to [trust_low, trust_high] */
    float trust_low, trust_high;
    int64_t segment;         /* LAMB: elements per cache-sized segment */
} bertopt_hyper;

/* torch's vectorized fmadd is a hardware fused multiply-add where the CPU has one and
   a*b+c otherwise; so is ours (a software fmaf would be exact but very slow). Every
   file is compiled with -ffp-contract=off so that nothing else gets fused. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(FP_FAST_FMAF)
#define FMA(a, b, c) fmaf((a), (b), (c))
#else
#define FMA(a, b, c) ((a) * (b) + (c))
#endif

/* ---- Adam's moment update and direction: written once, used by adam.c and lamb.c ----
   The reference's float32 operations (bertopt/optim/_adam.py adam_direction), in its
   order: torch's add_(x, alpha) and addcmul_ round as fmaf(alpha, x, self) and
   fmaf(value*t1, t2, self); everything else is one IEEE operation. */
static inline void bertopt_moments(float g, float *m, float *v, const bertopt_hyper *h) {
    float mi = *m * h->beta1;
    mi = FMA(h->one_minus_beta1, g, mi);
    float vi = *v * h->beta2;
    vi = FMA(h->one_minus_beta2 * g, g, vi);
    *m = mi;
    *v = vi;
}

/* m_hat / (sqrt(v_hat) + eps), with m_hat = m / bc1 (and v) only if bias_corr. */
static inline float bertopt_direction(float m, float v, float bc1, float bc2, float eps, const int bias_corr) {
    float mh = m, vh = v;
    if (bias_corr) { mh = m / bc1; vh = v / bc2; }
    return mh / (sqrtf(vh) + eps);
}

/* ---- work splitting and the thread pool (pool.c) ---- */

typedef struct { int64_t tensor, start, len; } bertopt_item;

typedef struct bertopt_job bertopt_job;
struct bertopt_job {
    const bertopt_item *items;
    int64_t n_items;
    int64_t total;  /* elements, to decide how many threads are worth waking */
    atomic_long next;
    void (*work)(const bertopt_job *, const bertopt_item *, int64_t);
    void *args;
    /* If set, every participating thread calls this once instead of taking items
       (jobs that schedule their own work, such as LAMB's segments). */
    void (*participate)(bertopt_job *);
};

#define BERTOPT_HIDDEN __attribute__((visibility("hidden")))

BERTOPT_HIDDEN int64_t bertopt_total_elements(const int64_t *numels, int64_t n_tensors);
/* Cut every tensor into items of at most `chunk` elements; caller frees; NULL: no memory. */
BERTOPT_HIDDEN bertopt_item *bertopt_make_items(const int64_t *numels, int64_t n_tensors, int64_t chunk,
                                                int64_t *n_items);
/* Run job->work on every item with up to n_threads threads (the caller is one of them). */
BERTOPT_HIDDEN void bertopt_run_job(bertopt_job *job, int n_threads);

#endif
