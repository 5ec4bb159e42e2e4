"""LAMB's fast path for float32 CPU tensors: two passes of a small C kernel.

Why: a LAMB step cannot be one pass, since the trust ratio needs ``||u||`` of the whole
tensor before any element of ``p`` may change. Per float32 parameter the floor is

    global grad norm: read g                                    4 bytes
    pass 1: read p, g, m, v; write m, v, and u over g           28 bytes, + sums of p*p, u*u
    pass 2: read p, u; write p - (lr * r) * u                   12 bytes

44 bytes against BertAdam's 32 (``_native``): 1.375x. u goes where g was, as in apex's
FusedLAMB: g's cache line is already loaded, so the store costs no extra read (a separate
workspace measured ~10% slower) and no memory is allocated; after the step ``.grad``
holds u for adapted tensors. Built from torch ops (the torch path in
``_lamb.lamb_fused``) the same step moves about twice as much. Tensors that are not
adapted (r = 1) take pass 1 with the update applied directly: one pass, as Adam, and
their gradient is left alone.

Unsharded tensors take both passes in one call (``bertopt_lamb_step_f32``), a segment
of about 1M elements at a time, so that pass 2 finds p and u still in the cache: the
44 bytes are an upper bound, the cache takes some of pass 2's reads off memory. Each
thread reruns pass 2 on the parts it did in pass 1 (in its own core's caches), which
needs a barrier between the passes; see ``lamb_segment``. Sharded tensors need their
sums of squares reduced across processes between the passes: two calls, ``moments``
and ``apply``.

Every float32 operation is the reference's (``_lamb.lamb_reference``), in its order; only
the norms are summed differently (float within blocks of 1024, double across blocks), so
adapted tensors agree with the reference to a few ulps and the others bit for bit.

The C functions reuse the work splitting of ``_native.C_SOURCE`` (they are compiled
together with it into a second library, cached like the first); if that C interface
changes so that they no longer compile, :func:`library` says so and returns None. ``BERTOPT_NATIVE=0``,
``_native.use_native(False)``, or no C compiler: :func:`library` returns None and the
caller uses the torch path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from bertopt.optim import _native

LAMB_C_SOURCE = r"""
/* ---- LAMB (appended to _native.C_SOURCE: item_t, job_t, make_items, total_elements, run_job) ---- */
#include <sched.h>

typedef struct {
    float *const *p; float *const *g; float *const *m; float *const *v;  /* pass 2 reads u from g */
    const float *bc1; const float *bc2;  /* per tensor 1 - beta^t, or NULL: no bias correction */
    const float *scale;                  /* pass 1: NULL (u over g) or per-tensor lr (apply u); pass 2: lr * r */
    float clip; int has_clip;
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd;
    double *p_sq, *u_sq;                 /* per work item */
} lamb_args;

/* u = m_hat / (sqrt(v_hat) + eps) + wd * p, the reference's float32 operations. */
static inline float lamb_update(float mi, float vi, float pi, float bc1, float bc2, float eps, float wd,
                                const int bias_corr, const int has_wd) {
    float mh = mi, vh = vi;
    if (bias_corr) { mh = mi / bc1; vh = vi / bc2; }
    float u = mh / (sqrtf(vh) + eps);
    if (has_wd) u = u + wd * pi;
    return u;
}

/* Pass 1 on one span. torch's add_(x, alpha) and addcmul_ round as one fused multiply-add
   where the CPU has one (FMA: see _native);
   -ffp-contract=off keeps every other line one IEEE operation. Squares are summed in
   float over blocks of at most 1024 elements (16 lanes: the loop vectorizes) and the
   blocks in double. */
static inline void lamb_moments_span(float *restrict p, float *restrict g, float *restrict m,
                                     float *restrict v, int64_t n, const lamb_args *a,
                                     float bc1, float bc2, float apply_scale, double *p_sq, double *u_sq,
                                     const int has_clip, const int bias_corr, const int has_wd, const int apply) {
    const float c = a->clip, b1 = a->beta1, omb1 = a->one_minus_beta1, b2 = a->beta2, omb2 = a->one_minus_beta2;
    const float eps = a->eps, wd = a->wd;
    double ps = 0.0, us = 0.0;
#define LAMB_ELEMENT(I, LANE)                                                          \
    {                                                                                  \
        const int64_t i = (I);                                                         \
        const float pi = p[i];                                                         \
        float gi = g[i];                                                               \
        if (has_clip) gi = gi * c;                                                     \
        float mi = m[i] * b1;                                                          \
        mi = FMA(omb1, gi, mi);                                                        \
        float vi = v[i] * b2;                                                          \
        vi = FMA(omb2 * gi, gi, vi);                                                   \
        m[i] = mi;                                                                     \
        v[i] = vi;                                                                     \
        const float u = lamb_update(mi, vi, pi, bc1, bc2, eps, wd, bias_corr, has_wd); \
        if (apply) p[i] = pi - u * apply_scale;                                        \
        else g[i] = u;                                                                 \
        pa[LANE] += pi * pi;                                                           \
        ua[LANE] += u * u;                                                             \
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

static void lamb_moments_item(const job_t *job, const item_t *it, int64_t k) {
    const lamb_args *a = (const lamb_args *)job->args;
    const int64_t t = it->tensor, s = it->start, n = it->len;
    float *p = a->p[t] + s, *g = a->g[t] + s, *m = a->m[t] + s, *v = a->v[t] + s;
    const int apply = a->scale != NULL;
    const int bc = a->bc1 != NULL;
    const float bc1 = bc ? a->bc1[t] : 1.0f, bc2 = bc ? a->bc2[t] : 1.0f;
    const float sc = apply ? a->scale[t] : 0.0f;
    double *ps = &a->p_sq[k], *us = &a->u_sq[k];
    const int clip = a->has_clip, wd = a->wd != 0.0f;
    /* Constant flags per call site: one branch-free loop each. */
#define LAMB_SPAN(C, B, W, A) lamb_moments_span(p, g, m, v, n, a, bc1, bc2, sc, ps, us, C, B, W, A)
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

/* Pass 1 over n_tensors tensors: new m, v; u written over g (scale == NULL) or applied
   as p - u * scale[t]; per-tensor sums of p*p and u*u into p_sq, u_sq (fixed order:
   deterministic). Returns 0, or -1 if memory ran out. */
int bertopt_lamb_moments_f32(float *const *p, float *const *g, float *const *m, float *const *v,
                             const int64_t *numels, int64_t n_tensors,
                             const float *bc1, const float *bc2, const float *scale, int has_clip, float clip,
                             float beta1, float beta2, float eps, float wd,
                             float one_minus_beta1, float one_minus_beta2,
                             double *p_sq, double *u_sq, int n_threads, int64_t chunk) {
    int64_t n_items = 0;
    item_t *items = make_items(numels, n_tensors, chunk, &n_items);
    if (!items) return -1;
    double *pp = calloc((size_t)(n_items > 0 ? n_items : 1), sizeof(double));
    double *up = calloc((size_t)(n_items > 0 ? n_items : 1), sizeof(double));
    if (!pp || !up) { free(items); free(pp); free(up); return -1; }
    lamb_args a = {.p = p, .g = g, .m = m, .v = v, .bc1 = bc1, .bc2 = bc2, .scale = scale,
                   .clip = clip, .has_clip = has_clip, .beta1 = beta1, .one_minus_beta1 = one_minus_beta1,
                   .beta2 = beta2, .one_minus_beta2 = one_minus_beta2, .eps = eps, .wd = wd,
                   .p_sq = pp, .u_sq = up};
    /* Designated fields: _native's job_t may gain fields; unnamed ones start at 0. */
    job_t job = {.items = items, .n_items = n_items, .total = total_elements(numels, n_tensors),
                 .work = lamb_moments_item, .args = &a};
    run_job(&job, n_threads);
    for (int64_t t = 0; t < n_tensors; t++) { p_sq[t] = 0.0; u_sq[t] = 0.0; }
    for (int64_t k = 0; k < n_items; k++) { p_sq[items[k].tensor] += pp[k]; u_sq[items[k].tensor] += up[k]; }
    free(pp); free(up); free(items);
    return 0;
}

static void lamb_apply_item(const job_t *job, const item_t *it, int64_t k) {
    (void)k;
    const lamb_args *a = (const lamb_args *)job->args;
    const int64_t t = it->tensor, s = it->start, n = it->len;
    float *restrict p = a->p[t] + s;
    const float *restrict u = a->g[t] + s;
    const float sc = a->scale[t];
    for (int64_t i = n - 1; i >= 0; i--) p[i] = p[i] - u[i] * sc;
}

/* Pass 2: p -= u * scale[t] (the reference's p.sub_(u * (lr * r))), u = the g of pass 1.
   Backwards, last item first: pass 1 went forwards, so the p and u it touched last may
   still be cached (measured as a whole with the segments: benchmarks/lamb_segments.py). */
int bertopt_lamb_apply_f32(float *const *p, float *const *u, const int64_t *numels, int64_t n_tensors,
                           const float *scale, int n_threads, int64_t chunk) {
    int64_t n_items = 0;
    item_t *items = make_items(numels, n_tensors, chunk, &n_items);
    if (!items) return -1;
    for (int64_t i = 0, j = n_items - 1; i < j; i++, j--) { item_t tmp = items[i]; items[i] = items[j]; items[j] = tmp; }
    lamb_args a = {.p = p, .g = u, .scale = scale};
    job_t job = {.items = items, .n_items = n_items, .total = total_elements(numels, n_tensors),
                 .work = lamb_apply_item, .args = &a};
    run_job(&job, n_threads);
    free(items);
    return 0;
}

/* lr * r for one tensor, in the float32 operations of _lamb.trust_ratio(...) * lr. */
static float lamb_scale(double p_sq, double u_sq, float lr, int has_trust_clip, float low, float high) {
    const float pn = (float)sqrt(p_sq), un = (float)sqrt(u_sq);
    float r = (pn > 0.0f && un > 0.0f) ? pn / un : 1.0f;
    if (has_trust_clip) r = fminf(fmaxf(r, low), high);
    return r * lr;
}

/* One cache-sized segment of tensors, both passes in one job. Its items are split into
   n_parts consecutive parts; a thread claims parts, runs pass 1 on them, waits until
   every part is done (the last one to finish forms the trust ratios), then runs pass 2
   on the parts it claimed, backwards. Each thread so rereads p and u from its own
   caches; with items taken in any order (run_job's default), pass 2 would mostly read
   lines that the other core loaded. Only claimed parts are waited for, and a part is
   claimed by a running thread, so a helper that never joins cannot stall the others;
   a claimed part whose thread loses its core does hold up the rest (they yield while
   they wait). */
#define LAMB_MAX_PARTS 64
typedef struct {
    lamb_args pass1, pass2;            /* pass1.scale = NULL (u over g), pass2.scale = lr * r */
    const item_t *items;               /* the segment's items: a range of the step's item list */
    int64_t first_item, n_items, n_parts, first_tensor, end_tensor;
    atomic_long next_part, parts_done;
    atomic_int scales_ready;
    double *p_sq, *u_sq;               /* per tensor of the step */
    float lr, trust_low, trust_high;
    int has_trust_clip;
} lamb_segment;

static void lamb_segment_finish_pass1(lamb_segment *s) {
    for (int64_t t = s->first_tensor; t < s->end_tensor; t++) { s->p_sq[t] = 0.0; s->u_sq[t] = 0.0; }
    for (int64_t k = s->first_item; k < s->first_item + s->n_items; k++) {  /* fixed order: deterministic */
        s->p_sq[s->items[k].tensor] += s->pass1.p_sq[k];
        s->u_sq[s->items[k].tensor] += s->pass1.u_sq[k];
    }
    float *scale = (float *)s->pass2.scale;
    for (int64_t t = s->first_tensor; t < s->end_tensor; t++)
        scale[t] = lamb_scale(s->p_sq[t], s->u_sq[t], s->lr, s->has_trust_clip, s->trust_low, s->trust_high);
    atomic_store_explicit(&s->scales_ready, 1, memory_order_release);
}

/* Items [begin, end) of part `part`, as indices into the step's item list. */
static inline int64_t lamb_part_start(const lamb_segment *s, int64_t part) {
    return s->first_item + part * s->n_items / s->n_parts;
}

static void lamb_segment_participate(job_t *job) {
    lamb_segment *s = (lamb_segment *)job->args;
    const job_t pass1 = {.args = &s->pass1}, pass2 = {.args = &s->pass2};
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
   tensors of at most `segment` elements (or one larger tensor) get pass 1, their trust
   ratios and pass 2 while their p and u are still in the cache (lamb_segment). The
   float32 arithmetic of moments + apply; the norms' double sums are grouped by this
   call's items. Everything is allocated before the first tensor is touched: returns -1
   (out of memory) with all tensors unchanged, or 0. */
int bertopt_lamb_step_f32(float *const *p, float *const *g, float *const *m, float *const *v,
                          const int64_t *numels, int64_t n_tensors,
                          const float *bc1, const float *bc2, int has_clip, float clip,
                          float beta1, float beta2, float eps, float wd,
                          float one_minus_beta1, float one_minus_beta2,
                          float lr, int has_trust_clip, float trust_low, float trust_high,
                          int64_t segment, int n_threads, int64_t chunk) {
    const size_t n = (size_t)(n_tensors > 0 ? n_tensors : 1);
    int64_t n_items = 0;
    item_t *items = make_items(numels, n_tensors, chunk, &n_items);  /* items[k].tensor: global index */
    const size_t n_it = (size_t)(n_items > 0 ? n_items : 1);
    double *p_sq = malloc(n * sizeof(double)), *u_sq = malloc(n * sizeof(double));
    double *pp = calloc(n_it, sizeof(double)), *up = calloc(n_it, sizeof(double));
    float *scale = malloc(n * sizeof(float));
    if (!items || !p_sq || !u_sq || !pp || !up || !scale) {
        free(items); free(p_sq); free(u_sq); free(pp); free(up); free(scale);
        return -1;
    }
    const lamb_args a = {.p = p, .g = g, .m = m, .v = v, .bc1 = bc1, .bc2 = bc2,
                         .clip = clip, .has_clip = has_clip, .beta1 = beta1, .one_minus_beta1 = one_minus_beta1,
                         .beta2 = beta2, .one_minus_beta2 = one_minus_beta2, .eps = eps, .wd = wd,
                         .p_sq = pp, .u_sq = up};
    int64_t first_item = 0;
    for (int64_t first = 0; first < n_tensors;) {
        int64_t end = first + 1, total = numels[first];
        while (end < n_tensors && total + numels[end] <= segment) total += numels[end++];
        int64_t end_item = first_item;
        while (end_item < n_items && items[end_item].tensor < end) end_item++;
        int64_t n_parts = 2 * (int64_t)(n_threads > 0 ? n_threads : 1);  /* some slack to balance */
        if (n_parts > LAMB_MAX_PARTS) n_parts = LAMB_MAX_PARTS;
        if (n_parts > end_item - first_item) n_parts = end_item - first_item;
        lamb_segment s = {.pass1 = a, .pass2 = a, .items = items, .first_item = first_item,
                          .n_items = end_item - first_item, .n_parts = n_parts,
                          .first_tensor = first, .end_tensor = end, .p_sq = p_sq, .u_sq = u_sq,
                          .lr = lr, .trust_low = trust_low, .trust_high = trust_high,
                          .has_trust_clip = has_trust_clip};
        s.pass2.scale = scale;
        atomic_init(&s.next_part, 0);
        atomic_init(&s.parts_done, 0);
        atomic_init(&s.scales_ready, 0);
        job_t job = {.items = items, .n_items = n_parts, .total = total, .args = &s,
                     .participate = lamb_segment_participate};
        run_job(&job, n_threads);
        first = end;
        first_item = end_item;
    }
    free(items); free(p_sq); free(u_sq); free(pp); free(up); free(scale);
    return 0;
}
"""

_STRICT_FLAGS = ["-Werror=int-conversion", "-Werror=incompatible-pointer-types", "-Werror=implicit-function-declaration"]


def _build_and_load() -> tuple[ctypes.CDLL | None, str]:
    if _native.library() is None:  # disabled (BERTOPT_NATIVE=0, use_native(False)) or no compiler
        return None, "native kernels unavailable: " + _native.status()
    cc = _native.find_compiler()
    # Mismatches with _native's C internals must fail the build (then we fall back), never
    # compile with a warning into a kernel that silently does nothing.
    lib, message = _native.build_cached("bertopt_lamb", _native.C_SOURCE + LAMB_C_SOURCE, cc,
                                        extra_flags=tuple(_STRICT_FLAGS))
    if lib is None:
        return None, "compiling the LAMB kernel failed: " + message
    ptrs, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.bertopt_lamb_moments_f32.restype = c_int
    lib.bertopt_lamb_moments_f32.argtypes = [ptrs, ptrs, ptrs, ptrs, ptrs, i64, ptrs, ptrs, ptrs, c_int, f32,
                                             f32, f32, f32, f32, f32, f32, ptrs, ptrs, c_int, i64]
    lib.bertopt_lamb_apply_f32.restype = c_int
    lib.bertopt_lamb_apply_f32.argtypes = [ptrs, ptrs, ptrs, i64, ptrs, c_int, i64]
    lib.bertopt_lamb_step_f32.restype = c_int
    lib.bertopt_lamb_step_f32.argtypes = [ptrs, ptrs, ptrs, ptrs, ptrs, i64, ptrs, ptrs, c_int, f32,
                                          f32, f32, f32, f32, f32, f32, f32, c_int, f32, f32, i64, c_int, i64]
    return lib, message


_kernel = _native.BuiltOnce(_build_and_load)


def library() -> ctypes.CDLL | None:
    """The compiled LAMB kernel (built on first call), or None (see :func:`status`)."""
    if _native.library() is None:  # follows _native's switch at every call
        return None
    return _kernel.get()


def status() -> str:
    if _native.library() is None:
        return "native kernels unavailable: " + _native.status()
    _kernel.get()
    return _kernel.status


def moments(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef: float | None,
            apply_scales: list[float] | None):
    """Pass 1 on ``eligible`` tensors; returns per-tensor sums of squares (float64) of p and u.

    u is written over ``grads`` unless ``apply_scales`` is given (then p -= u * scale
    directly and the gradients are left alone).
    """
    n = len(params)
    _native.check_sizes(params, grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    p_sq, u_sq = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    bc1, bc2 = _native.bias_correction_arrays(bias_corrections)
    err = lib.bertopt_lamb_moments_f32(
        _native._pointer_array(params), _native._pointer_array(grads), _native._pointer_array(exp_avgs),
        _native._pointer_array(exp_avg_sqs), _native._numels(params), n, bc1, bc2, None if apply_scales is None else _native._floats(apply_scales),
        clip_coef is not None, 1.0 if clip_coef is None else clip_coef,
        h.beta1, h.beta2, h.eps, h.weight_decay, 1.0 - h.beta1, 1.0 - h.beta2,
        p_sq.data_ptr(), u_sq.data_ptr(), torch.get_num_threads(), _native._CHUNK,
    )
    if err != 0:
        raise MemoryError("bertopt LAMB kernel: out of memory for its work list")
    # We wrote through raw pointers; tell autograd, as torch's in-place ops do.
    torch.autograd.graph.increment_version(exp_avgs)
    torch.autograd.graph.increment_version(exp_avg_sqs)
    torch.autograd.graph.increment_version(params if apply_scales is not None else grads)
    return p_sq, u_sq


def apply(lib, params: list[Tensor], updates: list[Tensor], scales: Tensor) -> None:
    """Pass 2: ``p -= u * scale`` per tensor (``updates``: the grads pass 1 wrote u into;
    ``scales``: float32, one per tensor)."""
    _native.check_sizes(params, update=updates)
    scales = scales.to(torch.float32).contiguous()
    if scales.numel() != len(params):
        raise ValueError(f"one scale per tensor: {len(params)} tensors, {scales.numel()} scales")
    err = lib.bertopt_lamb_apply_f32(_native._pointer_array(params), _native._pointer_array(updates),
                                     _native._numels(params), len(params), scales.data_ptr(),
                                     torch.get_num_threads(), _native._CHUNK)
    if err != 0:
        raise MemoryError("bertopt LAMB kernel: out of memory for its work list")
    torch.autograd.graph.increment_version(params)


# Elements per segment of :func:`step`: pass 1 streams p, g, m, v (16 bytes per element)
# through the cache; with 1M elements (16 MiB) the p and u that pass 2 needs are still in
# a last-level cache of 32 MiB.
SEGMENT_NUMEL = 1 << 20
# Items of 64K elements: a segment splits into parts of nearly equal size.
SEGMENT_CHUNK = 1 << 16


def step(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef: float | None,
         trust_clip: tuple[float, float] | None, segment_numel: int = SEGMENT_NUMEL) -> None:
    """Both passes on unsharded, adapted tensors, a cache-sized segment at a time
    (``bertopt_lamb_step_f32``); u is left in ``grads``."""
    n = len(params)
    _native.check_sizes(params, grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    bc1, bc2 = _native.bias_correction_arrays(bias_corrections)
    low, high = trust_clip if trust_clip is not None else (0.0, 0.0)
    err = lib.bertopt_lamb_step_f32(
        _native._pointer_array(params), _native._pointer_array(grads), _native._pointer_array(exp_avgs),
        _native._pointer_array(exp_avg_sqs), _native._numels(params), n, bc1, bc2,
        clip_coef is not None, 1.0 if clip_coef is None else clip_coef,
        h.beta1, h.beta2, h.eps, h.weight_decay, 1.0 - h.beta1, 1.0 - h.beta2,
        h.lr, trust_clip is not None, low, high, segment_numel, torch.get_num_threads(), SEGMENT_CHUNK,
    )
    if err != 0:  # nothing was written
        raise MemoryError("bertopt LAMB kernel: out of memory for its work list")
    for tensors in (exp_avgs, exp_avg_sqs, params, grads):  # written through raw pointers
        torch.autograd.graph.increment_version(tensors)
