/* BERT's Adam step on float32 tensors, one pass: read p, g, m, v; write p, m, v.

   With the norm pass (norm.c, 4 bytes) that is 32 bytes per parameter, the floor: no
   temporaries, and g is never written (the clip coefficient is folded into the update).
   The float32 operations are the reference's (bertopt/optim/_adam.py), in its order, so
   the result equals it bit for bit given the same clip coefficient. */
#include <stdlib.h>

#include "bertopt.h"

typedef struct {
    float *const *p; float *const *g; float *const *m; float *const *v;
    const float *bc1; const float *bc2;  /* per tensor: 1 - beta^t, or NULL: no bias correction */
    const bertopt_hyper *h;
} adam_args;

static inline void adam_span(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
                             int64_t n, const bertopt_hyper *h, float bc1, float bc2,
                             const int has_clip, const int l2, const int decoupled_wd, const int bias_corr) {
    const float c = h->clip, wd = h->weight_decay, eps = h->eps, lr_neg = -h->lr;
    for (int64_t i = 0; i < n; i++) {
        const float pi = p[i];
        float gi = g[i];
        if (has_clip) gi = gi * c;
        if (l2) gi = gi + wd * pi;
        bertopt_moments(gi, &m[i], &v[i], h);
        float u = bertopt_direction(m[i], v[i], bc1, bc2, eps, bias_corr);
        if (decoupled_wd) u = u + wd * pi;
        p[i] = FMA(lr_neg, u, pi);
    }
}

static void adam_item(const bertopt_job *job, const bertopt_item *it, int64_t k) {
    (void)k;
    const adam_args *a = (const adam_args *)job->args;
    const bertopt_hyper *h = a->h;
    const int64_t t = it->tensor, s = it->start;
    float *p = a->p[t] + s, *m = a->m[t] + s, *v = a->v[t] + s;
    const float *g = a->g[t] + s;
    const int bias_corr = a->bc1 != NULL;
    const float bc1 = bias_corr ? a->bc1[t] : 1.0f, bc2 = bias_corr ? a->bc2[t] : 1.0f;
    const int has_wd = h->weight_decay != 0.0f;
    const int l2 = has_wd && !h->decoupled, dec = has_wd && h->decoupled;
    /* Constant flags per call site let the compiler emit one branch-free loop each. */
#define ADAM_SPAN(C, L2, D, B) adam_span(p, g, m, v, it->len, h, bc1, bc2, C, L2, D, B)
    if (h->has_clip) {
        if (bias_corr) ADAM_SPAN(1, l2, dec, 1);
        else if (dec) ADAM_SPAN(1, 0, 1, 0);
        else if (l2) ADAM_SPAN(1, 1, 0, 0);
        else ADAM_SPAN(1, 0, 0, 0);
    } else {
        if (bias_corr) ADAM_SPAN(0, l2, dec, 1);
        else if (dec) ADAM_SPAN(0, 0, 1, 0);
        else if (l2) ADAM_SPAN(0, 1, 0, 0);
        else ADAM_SPAN(0, 0, 0, 0);
    }
#undef ADAM_SPAN
}

/* One Adam step over n_tensors float32 tensors. BERTOPT_OK, or an error with nothing written. */
int bertopt_adam_f32(float *const *p, float *const *g, float *const *m, float *const *v,
                     const int64_t *numels, int64_t n_tensors, const float *bc1, const float *bc2,
                     const bertopt_hyper *h) {
    if (h->version != BERTOPT_ABI_VERSION) return BERTOPT_EVERSION;
    int64_t n_items = 0;
    bertopt_item *items = bertopt_make_items(numels, n_tensors, h->chunk, &n_items);
    if (!items) return BERTOPT_ENOMEM;
    adam_args a = {p, g, m, v, bc1, bc2, h};
    bertopt_job job = {.items = items, .n_items = n_items, .total = bertopt_total_elements(numels, n_tensors),
                       .work = adam_item, .args = &a};
    bertopt_run_job(&job, h->n_threads);
    free(items);
    return BERTOPT_OK;
}
