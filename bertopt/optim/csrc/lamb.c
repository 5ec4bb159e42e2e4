/* LAMB's step on float32 tensors: Adam's moments (bertopt.h), then the trust ratio.

   A LAMB step cannot be one pass: r = ||p|| / ||u|| needs the norm of the whole update u
   before any element of p may change. Per float32 parameter:

       global grad norm (norm.c): read g                                4 bytes
       pass 1: read p, g, m, v; write m, v; sums of p*p and u*u         24 bytes
       pass 2: read p, m, v; u again from them; write p - (lr * r) * u  16 bytes

   u is not stored: pass 2 recomputes it from p (unchanged until pass 2 writes it) and
   the new m and v, with the same float32 operations, so it is the same u bit for bit.
   Nothing is written over the gradient and no workspace is needed; the extra sqrt and
   division cost compute, not memory. Unsharded tensors take both passes in one call
   (bertopt_lamb_step_f32), a cache-sized segment at a time, so that pass 2 finds p, m, v
   still in the cache: the 44 bytes are an upper bound, reached by tensors larger than the
   cache (a tensor's pass 2 cannot start before its pass 1 ends). Tensors that are not adapted
   (r = 1) take pass 1 with the update applied directly: one pass, as Adam.

   Every float32 operation is the reference's (bertopt/optim/_lamb.py lamb_reference),
   in its order; only the norms are summed differently (float within blocks of 1024,
   double across blocks), so adapted tensors agree with the reference to a few ulps and
   the others bit for bit. */
#include <sched.h>
#include <stdlib.h>

#include "bertopt.h"

/* -DLAMB_U_OVER_G builds the kernel as it was before .grad was only read: pass 1 stores u
   over the gradient and pass 2 reads it back instead of recomputing it (same float32
   results). Never shipped; benchmarks/lamb_grad_ab.py times it against the shipped one. */
#ifdef LAMB_U_OVER_G
#define LAMB_GRAD float  /* pass 1 writes u here */
#define LAMB_KEEP_U(g, i, u) ((g)[i] = (u))
#else
#define LAMB_GRAD const float
#define LAMB_KEEP_U(g, i, u) ((void)0)
#endif

typedef struct {
    float *const *p; float *const *g; float *const *m; float *const *v;
    const float *bc1; const float *bc2;  /* per tensor 1 - beta^t, or NULL: no bias correction */
    const float *scale;                  /* pass 1: NULL (sums only) or per-tensor lr (apply u); pass 2: lr * r */
    const bertopt_hyper *h;
    double *p_sq, *u_sq;                 /* per work item */
} lamb_args;

/* u = m_hat / (sqrt(v_hat) + eps) + wd * p, the reference's float32 operations. */
static inline float lamb_update(float mi, float vi, float pi, float bc1, float bc2, float eps, float wd,
                                const int bias_corr, const int has_wd) {
    float u = bertopt_direction(mi, vi, bc1, bc2, eps, bias_corr);
    if (has_wd) u = u + wd * pi;
    return u;
}

/* Pass 1 on one span. Squares are summed in float over blocks of at most 1024 elements
   (16 lanes: the loop vectorizes) and the blocks in double. */
static inline void lamb_moments_span(float *restrict p, LAMB_GRAD *restrict g, float *restrict m,
                                     float *restrict v, int64_t n, const bertopt_hyper *h,
                                     float bc1, float bc2, float apply_scale, double *p_sq, double *u_sq,
                                     const int has_clip, const int bias_corr, const int has_wd, const int apply) {
    const float c = h->clip, eps = h->eps, wd = h->weight_decay;
    double ps = 0.0, us = 0.0;
#define LAMB_ELEMENT(I, LANE)                                                              \
    {                                                                                      \
        const int64_t i = (I);                                                             \
        const float pi = p[i];                                                             \
        float gi = g[i];                                                                   \
        if (has_clip) gi = gi * c;                                                         \
        bertopt_moments(gi, &m[i], &v[i], h);                                              \
        const float u = lamb_update(m[i], v[i], pi, bc1, bc2, eps, wd, bias_corr, has_wd); \
        if (apply) p[i] = pi - u * apply_scale;                                            \
        else LAMB_KEEP_U(g, i, u);                                                         \
        pa[LANE] += pi * pi;                                                               \
        ua[LANE] += u * u;                                                                 \
    }
    for (int64_t b = 0; b < n; b += 1024) {
        const int64_t e = b + 1024 < n ? b + 1024 : n;
        float pa[16] = {0}, ua[16] = {0};
        int64_t i0 = b;
        for (; i0 + 16 <= e; i0 += 16)
            for (int j = 0; j < 16; j++) LAMB_ELEMENT(i0 + j, j)
        for (; i0 < e; i0++) LAMB_ELEMENT(i0, 0)
        for (int j = 0; j < 16; j++) { ps += pa[j]; us += ua[j]; }
    }
#undef LAMB_ELEMENT
    *p_sq = ps;
    *u_sq = us;
}

static void lamb_moments_item(const bertopt_job *job, const bertopt_item *it, int64_t k) {
    const lamb_args *a = (const lamb_args *)job->args;
    const bertopt_hyper *h = a->h;
    const int64_t t = it->tensor, s = it->start, n = it->len;
    float *p = a->p[t] + s, *m = a->m[t] + s, *v = a->v[t] + s;
    LAMB_GRAD *g = a->g[t] + s;
    const int apply = a->scale != NULL;
    const int bc = a->bc1 != NULL;
    const float bc1 = bc ? a->bc1[t] : 1.0f, bc2 = bc ? a->bc2[t] : 1.0f;
    const float sc = apply ? a->scale[t] : 0.0f;
    double *ps = &a->p_sq[k], *us = &a->u_sq[k];
    const int clip = h->has_clip, wd = h->weight_decay != 0.0f;
    /* Constant flags per call site: one branch-free loop each. */
#define LAMB_SPAN(C, B, W, A) lamb_moments_span(p, g, m, v, n, h, bc1, bc2, sc, ps, us, C, B, W, A)
    if (apply) {
        if (clip) { if (bc) { if (wd) LAMB_SPAN(1, 1, 1, 1); else LAMB_SPAN(1, 1, 0, 1); }
                    else    { if (wd) LAMB_SPAN(1, 0, 1, 1); else LAMB_SPAN(1, 0, 0, 1); } }
        else      { if (bc) { if (wd) LAMB_SPAN(0, 1, 1, 1); else LAMB_SPAN(0, 1, 0, 1); }
                    else    { if (wd) LAMB_SPAN(0, 0, 1, 1); else LAMB_SPAN(0, 0, 0, 1); } }
    } else {
        if (clip) { if (bc) { if (wd) LAMB_SPAN(1, 1, 1, 0); else LAMB_SPAN(1, 1, 0, 0); }
                    else    { if (wd) LAMB_SPAN(1, 0, 1, 0); else LAMB_SPAN(1, 0, 0, 0); } }
        else      { if (bc) { if (wd) LAMB_SPAN(0, 1, 1, 0); else LAMB_SPAN(0, 1, 0, 0); }
                    else    { if (wd) LAMB_SPAN(0, 0, 1, 0); else LAMB_SPAN(0, 0, 0, 0); } }
    }
#undef LAMB_SPAN
}

/* Pass 2 on one span: u again from p, m, v (pass 1's operations), p -= u * sc. */
static inline void lamb_apply_span(float *restrict p, const float *restrict m, const float *restrict v,
                                   int64_t n, const bertopt_hyper *h, float bc1, float bc2, float sc,
                                   const int bias_corr, const int has_wd) {
    const float eps = h->eps, wd = h->weight_decay;
#ifdef LAMB_U_OVER_G
    (void)v; (void)bc1; (void)bc2; (void)eps; (void)wd; (void)bias_corr; (void)has_wd;
#endif
    for (int64_t i = n - 1; i >= 0; i--) {
        const float pi = p[i];
#ifdef LAMB_U_OVER_G
        p[i] = pi - m[i] * sc;  /* m is pass 1's u here (lamb_apply_item) */
#else
        p[i] = pi - lamb_update(m[i], v[i], pi, bc1, bc2, eps, wd, bias_corr, has_wd) * sc;
#endif
    }
}

static void lamb_apply_item(const bertopt_job *job, const bertopt_item *it, int64_t k) {
    (void)k;
    const lamb_args *a = (const lamb_args *)job->args;
    const int64_t t = it->tensor, s = it->start, n = it->len;
    float *p = a->p[t] + s;
#ifdef LAMB_U_OVER_G
    const float *m = a->g[t] + s, *v = a->v[t] + s;
#else
    const float *m = a->m[t] + s, *v = a->v[t] + s;
#endif
    const int bc = a->bc1 != NULL, wd = a->h->weight_decay != 0.0f;
    const float bc1 = bc ? a->bc1[t] : 1.0f, bc2 = bc ? a->bc2[t] : 1.0f, sc = a->scale[t];
    if (bc) { if (wd) lamb_apply_span(p, m, v, n, a->h, bc1, bc2, sc, 1, 1); else lamb_apply_span(p, m, v, n, a->h, bc1, bc2, sc, 1, 0); }
    else    { if (wd) lamb_apply_span(p, m, v, n, a->h, bc1, bc2, sc, 0, 1); else lamb_apply_span(p, m, v, n, a->h, bc1, bc2, sc, 0, 0); }
}

/* Pass 1 over n_tensors tensors: new m, v; the update applied as p - u * scale[t] if
   scale is given (else nothing else is written); per-tensor sums of p*p and u*u into
   p_sq, u_sq (fixed order: deterministic). BERTOPT_OK or an error with nothing written. */
int bertopt_lamb_moments_f32(float *const *p, float *const *g, float *const *m, float *const *v,
                             const int64_t *numels, int64_t n_tensors,
                             const float *bc1, const float *bc2, const float *scale,
                             double *p_sq, double *u_sq, const bertopt_hyper *h) {
    if (h->version != BERTOPT_ABI_VERSION) return BERTOPT_EVERSION;
    int64_t n_items = 0;
    bertopt_item *items = bertopt_make_items(numels, n_tensors, h->chunk, &n_items);
    if (!items) return BERTOPT_ENOMEM;
    double *pp = calloc((size_t)(n_items > 0 ? n_items : 1), sizeof(double));
    double *up = calloc((size_t)(n_items > 0 ? n_items : 1), sizeof(double));
    if (!pp || !up) { free(items); free(pp); free(up); return BERTOPT_ENOMEM; }
    lamb_args a = {.p = p, .g = g, .m = m, .v = v, .bc1 = bc1, .bc2 = bc2, .scale = scale, .h = h,
                   .p_sq = pp, .u_sq = up};
    bertopt_job job = {.items = items, .n_items = n_items, .total = bertopt_total_elements(numels, n_tensors),
                       .work = lamb_moments_item, .args = &a};
    bertopt_run_job(&job, h->n_threads);
    for (int64_t t = 0; t < n_tensors; t++) { p_sq[t] = 0.0; u_sq[t] = 0.0; }
    for (int64_t k = 0; k < n_items; k++) { p_sq[items[k].tensor] += pp[k]; u_sq[items[k].tensor] += up[k]; }
    free(pp); free(up); free(items);
    return BERTOPT_OK;
}

/* Pass 2: p -= u * scale[t], u recomputed from p and pass 1's m, v. Backwards, last item
   first: pass 1 went forwards, so what it touched last may still be cached. */
int bertopt_lamb_apply_f32(float *const *p, float *const *m, float *const *v, const int64_t *numels,
                           int64_t n_tensors, const float *bc1, const float *bc2, const float *scale,
                           const bertopt_hyper *h) {
    if (h->version != BERTOPT_ABI_VERSION) return BERTOPT_EVERSION;
    int64_t n_items = 0;
    bertopt_item *items = bertopt_make_items(numels, n_tensors, h->chunk, &n_items);
    if (!items) return BERTOPT_ENOMEM;
    for (int64_t i = 0, j = n_items - 1; i < j; i++, j--) { bertopt_item tmp = items[i]; items[i] = items[j]; items[j] = tmp; }
    lamb_args a = {.p = p, .m = m, .v = v, .bc1 = bc1, .bc2 = bc2, .scale = scale, .h = h};
    bertopt_job job = {.items = items, .n_items = n_items, .total = bertopt_total_elements(numels, n_tensors),
                       .work = lamb_apply_item, .args = &a};
    bertopt_run_job(&job, h->n_threads);
    free(items);
    return BERTOPT_OK;
}

/* lr * r for one tensor, in the float32 operations of _lamb.trust_ratio(...) * lr. */
static float lamb_scale(double p_sq, double u_sq, const bertopt_hyper *h) {
    const float pn = (float)sqrt(p_sq), un = (float)sqrt(u_sq);
    float r = (pn > 0.0f && un > 0.0f) ? pn / un : 1.0f;
    if (h->has_trust_clip) r = fminf(fmaxf(r, h->trust_low), h->trust_high);
    return r * h->lr;
}

/* One cache-sized segment of tensors, both passes in one job. Its items are split into
   n_parts consecutive parts; a thread claims parts, runs pass 1 on them, waits until
   every part is done (the last one to finish forms the trust ratios), then runs pass 2
   on the parts it claimed, backwards. Each thread so rereads p, m, v from its own
   caches; with items taken in any order, pass 2 would mostly read lines that the other
   core loaded. Only claimed parts are waited for, and a part is claimed by a running
   thread, so a helper that never joins cannot stall the others; a claimed part whose
   thread loses its core does hold up the rest (they yield while they wait). */
#define LAMB_MAX_PARTS 64
typedef struct {
    lamb_args pass1, pass2;            /* pass1.scale = NULL (sums only), pass2.scale = lr * r */
    const bertopt_item *items;         /* the segment's items: a range of the step's item list */
    int64_t first_item, n_items, n_parts, first_tensor, end_tensor;
    atomic_long next_part, parts_done;
    atomic_int scales_ready;
    double *p_sq, *u_sq;               /* per tensor of the step */
} lamb_segment;

static void lamb_segment_finish_pass1(lamb_segment *s) {
    for (int64_t t = s->first_tensor; t < s->end_tensor; t++) { s->p_sq[t] = 0.0; s->u_sq[t] = 0.0; }
    for (int64_t k = s->first_item; k < s->first_item + s->n_items; k++) {  /* fixed order: deterministic */
        s->p_sq[s->items[k].tensor] += s->pass1.p_sq[k];
        s->u_sq[s->items[k].tensor] += s->pass1.u_sq[k];
    }
    float *scale = (float *)s->pass2.scale;
    for (int64_t t = s->first_tensor; t < s->end_tensor; t++)
        scale[t] = lamb_scale(s->p_sq[t], s->u_sq[t], s->pass1.h);
    atomic_store_explicit(&s->scales_ready, 1, memory_order_release);
}

/* Items [begin, end) of part `part`, as indices into the step's item list. */
static inline int64_t lamb_part_start(const lamb_segment *s, int64_t part) {
    return s->first_item + part * s->n_items / s->n_parts;
}

static void lamb_segment_participate(bertopt_job *job) {
    lamb_segment *s = (lamb_segment *)job->args;
    const bertopt_job pass1 = {.args = &s->pass1}, pass2 = {.args = &s->pass2};
    int64_t mine[LAMB_MAX_PARTS];
    int64_t n_mine = 0;
    for (;;) {
        const long part = atomic_fetch_add(&s->next_part, 1);
        if (part >= s->n_parts) break;
        for (int64_t k = lamb_part_start(s, part); k < lamb_part_start(s, part + 1); k++)
            lamb_moments_item(&pass1, &s->items[k], k);
        if (n_mine < LAMB_MAX_PARTS) mine[n_mine++] = part;  /* always: n_parts <= LAMB_MAX_PARTS */
        if (atomic_fetch_add(&s->parts_done, 1) + 1 == s->n_parts) lamb_segment_finish_pass1(s);
    }
    if (n_mine == 0) return;
    while (!atomic_load_explicit(&s->scales_ready, memory_order_acquire)) sched_yield();
    for (int64_t j = n_mine - 1; j >= 0; j--)
        for (int64_t k = lamb_part_start(s, mine[j] + 1) - 1; k >= lamb_part_start(s, mine[j]); k--)
            lamb_apply_item(&pass2, &s->items[k], k);
}

/* A whole LAMB step on adapted, unsharded tensors, segment by segment: consecutive
   tensors of at most h->segment elements (or one larger tensor) get pass 1, their trust
   ratios and pass 2 while their p, m, v are still in the cache (lamb_segment). The
   float32 arithmetic of moments + apply; the norms' double sums are grouped by this
   call's items. Everything is allocated before the first tensor is touched:
   BERTOPT_OK, or an error with all tensors unchanged. */
int bertopt_lamb_step_f32(float *const *p, float *const *g, float *const *m, float *const *v,
                          const int64_t *numels, int64_t n_tensors, const float *bc1, const float *bc2,
                          const bertopt_hyper *h) {
    if (h->version != BERTOPT_ABI_VERSION) return BERTOPT_EVERSION;
    const size_t n = (size_t)(n_tensors > 0 ? n_tensors : 1);
    int64_t n_items = 0;
    bertopt_item *items = bertopt_make_items(numels, n_tensors, h->chunk, &n_items);  /* .tensor: global index */
    const size_t n_it = (size_t)(n_items > 0 ? n_items : 1);
    double *p_sq = malloc(n * sizeof(double)), *u_sq = malloc(n * sizeof(double));
    double *pp = calloc(n_it, sizeof(double)), *up = calloc(n_it, sizeof(double));
    float *scale = malloc(n * sizeof(float));
    if (!items || !p_sq || !u_sq || !pp || !up || !scale) {
        free(items); free(p_sq); free(u_sq); free(pp); free(up); free(scale);
        return BERTOPT_ENOMEM;
    }
    const lamb_args a = {.p = p, .g = g, .m = m, .v = v, .bc1 = bc1, .bc2 = bc2, .h = h, .p_sq = pp, .u_sq = up};
    const int n_threads = h->n_threads > 0 ? h->n_threads : 1;
    int64_t first_item = 0;
    for (int64_t first = 0; first < n_tensors;) {
        int64_t end = first + 1, total = numels[first];
        while (end < n_tensors && total + numels[end] <= h->segment) total += numels[end++];
        int64_t end_item = first_item;
        while (end_item < n_items && items[end_item].tensor < end) end_item++;
        int64_t n_parts = 2 * (int64_t)n_threads;  /* some slack to balance */
        if (n_parts > LAMB_MAX_PARTS) n_parts = LAMB_MAX_PARTS;
        if (n_parts > end_item - first_item) n_parts = end_item - first_item;
        lamb_segment s = {.pass1 = a, .pass2 = a, .items = items, .first_item = first_item,
                          .n_items = end_item - first_item, .n_parts = n_parts,
                          .first_tensor = first, .end_tensor = end, .p_sq = p_sq, .u_sq = u_sq};
        s.pass2.scale = scale;
        atomic_init(&s.next_part, 0);
        atomic_init(&s.parts_done, 0);
        atomic_init(&s.scales_ready, 0);
        bertopt_job job = {.items = items, .n_items = n_parts, .total = total, .args = &s,
                           .participate = lamb_segment_participate};
        bertopt_run_job(&job, n_threads);
        first = end;
        first_item = end_item;
    }
    free(items); free(p_sq); free(u_sq); free(pp); free(up); free(scale);
    return BERTOPT_OK;
}
