"""A small C kernel for BERT's Adam step on CPU float32, compiled on first use.

Why it exists: an optimizer step is pure memory traffic. Per float32 parameter BERT's
step must read g once for the global norm (4 bytes) and then read p, g, m, v and write
p, m, v (28 bytes): 32 bytes is the floor. torch's fused CPU Adam kernel, when handed
the clip coefficient as ``grad_scale``, also writes the scaled gradient back (36 bytes),
and ``clip_grad_norm_`` + ``AdamW(fused=True)`` moves 40. This kernel moves 32, with
no temporaries, and computes exactly the reference's float32 operations (same order,
the same fused multiply-adds torch uses), so its result equals the reference's bit
for bit when both are given the same clip coefficient.

Work is split into chunks of at most ``_CHUNK`` elements that threads take from a shared
counter, so a core stolen by another process slows the step down by its share only
(a static split would wait for the slowest thread). The helper threads persist between
calls; the caller works too and waits only for helpers that joined, never for one the
OS has not scheduled yet. The squared-norm partials are summed in chunk order, so the
norm does not depend on the thread count or timing.

The C source is compiled with the system compiler into a per-user cache the first time
it is needed (about a second) and loaded with ctypes: no Python headers, no torch
headers, nothing to build at install time. Without a compiler, on non-POSIX systems,
or with ``BERTOPT_NATIVE=0`` in the environment, :func:`library` returns None and the
callers use torch's kernels instead. :func:`status` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

# Elements per work item: 256K floats = 1 MiB per array, large enough that the
# per-item overhead vanishes, small enough to balance two busy cores.
_CHUNK = 1 << 18

C_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#define ABI_VERSION 2

/* torch's vectorized fmadd is a hardware fused multiply-add where the CPU has one and
   a*b+c otherwise; so is ours (a software fmaf would be exact but very slow). */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(FP_FAST_FMAF)
#define FMA(a, b, c) fmaf((a), (b), (c))
#else
#define FMA(a, b, c) ((a) * (b) + (c))
#endif

typedef struct { int64_t tensor, start, len; } item_t;

static int64_t total_elements(const int64_t *numels, int64_t n_tensors) {
    int64_t total = 0;
    for (int64_t t = 0; t < n_tensors; t++) total += numels[t];
    return total;
}

/* Cut every tensor into items of at most `chunk` elements. Caller frees. */
static item_t *make_items(const int64_t *numels, int64_t n_tensors, int64_t chunk, int64_t *n_items) {
    int64_t count = 0;
    for (int64_t t = 0; t < n_tensors; t++) count += (numels[t] + chunk - 1) / chunk;
    item_t *items = malloc((size_t)(count > 0 ? count : 1) * sizeof(item_t));
    if (!items) return NULL;
    int64_t k = 0;
    for (int64_t t = 0; t < n_tensors; t++)
        for (int64_t s = 0; s < numels[t]; s += chunk) {
            items[k].tensor = t;
            items[k].start = s;
            items[k].len = numels[t] - s < chunk ? numels[t] - s : chunk;
            k++;
        }
    *n_items = count;
    return items;
}

typedef struct job job_t;
struct job {
    const item_t *items;
    int64_t n_items;
    int64_t total;  /* elements, to decide how many threads are worth waking */
    atomic_long next;
    void (*work)(const job_t *, const item_t *, int64_t);
    void *args;
    /* If set, every participating thread calls this once instead of taking items
       (jobs that schedule their own work, such as LAMB's two-pass segments). */
    void (*participate)(job_t *);
};

static void drain(job_t *job) {
    if (job->participate) { job->participate(job); return; }
    for (;;) {
        long k = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (k >= job->n_items) break;
        job->work(job, &job->items[k], k);
    }
}

/* A persistent pool of helper threads. The caller publishes a job, works on it itself,
   then closes it and waits only for helpers that actually joined: a helper that has not
   been scheduled yet (the machine is busy) stays out and costs nothing. */
#define MAX_HELPERS 255
#define MIN_ELEMENTS_PER_THREAD (1 << 16)
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_idle = PTHREAD_COND_INITIALIZER;
static job_t *pool_job = NULL;          /* open for joining, or NULL */
static unsigned long pool_generation = 0;
static int pool_wanted = 0, pool_joined = 0, pool_size = 0;

static void *pool_worker(void *unused) {
    (void)unused;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool_lock);
    for (;;) {
        while (pool_job == NULL || pool_generation == seen || pool_joined >= pool_wanted)
            pthread_cond_wait(&pool_wake, &pool_lock);
        seen = pool_generation;
        job_t *job = pool_job;
        pool_joined++;
        pthread_mutex_unlock(&pool_lock);
        drain(job);
        pthread_mutex_lock(&pool_lock);
        if (--pool_joined == 0) pthread_cond_broadcast(&pool_idle);
    }
    return NULL;
}

/* After fork() only the forking thread exists: start a fresh, empty pool in the child. */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pthread_cond_init(&pool_idle, NULL);
    pool_job = NULL;
    pool_wanted = pool_joined = pool_size = 0;
}

__attribute__((constructor)) static void pool_register_fork_handler(void) {
    pthread_atfork(NULL, NULL, pool_after_fork_in_child);
}

/* Run job->work on every item with up to n_threads threads (the caller is one of them). */
static void run_job(job_t *job, int n_threads) {
    int64_t helpers = (int64_t)n_threads - 1;
    if (helpers > job->total / MIN_ELEMENTS_PER_THREAD - 1) helpers = job->total / MIN_ELEMENTS_PER_THREAD - 1;
    if (helpers > job->n_items - 1) helpers = job->n_items - 1;
    if (helpers > MAX_HELPERS) helpers = MAX_HELPERS;
    int published = 0;
    if (helpers > 0) {
        pthread_mutex_lock(&pool_lock);
        if (pool_job == NULL) {  /* else another caller's job is open: do ours alone */
            while (pool_size < helpers) {
                pthread_t t;
                if (pthread_create(&t, NULL, pool_worker, NULL) != 0) break;
                pthread_detach(t);
                pool_size++;
            }
            pool_job = job;
            pool_wanted = (int)helpers;
            pool_generation++;
            published = 1;
            pthread_cond_broadcast(&pool_wake);
        }
        pthread_mutex_unlock(&pool_lock);
    }
    drain(job);
    if (published) {
        pthread_mutex_lock(&pool_lock);
        pool_job = NULL;
        while (pool_joined > 0) pthread_cond_wait(&pool_idle, &pool_lock);
        pthread_mutex_unlock(&pool_lock);
    }
}

/* ---- sum of squares (global gradient norm) ---- */

typedef struct { float *const *x; double *partial; } sumsq_args;

static void sumsq_item(const job_t *job, const item_t *it, int64_t k) {
    const sumsq_args *a = (const sumsq_args *)job->args;
    const float *restrict x = a->x[it->tensor] + it->start;
    /* 16 independent accumulators so the compiler can vectorize without reassociating;
       a float*float product is exact in double, so only the additions round. */
    double acc[16] = {0};
    int64_t i = 0, n = it->len;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += (double)x[i + j] * (double)x[i + j];
    for (; i < n; i++) acc[0] += (double)x[i] * (double)x[i];
    double s = 0.0;
    for (int j = 0; j < 16; j++) s += acc[j];
    a->partial[k] = s;
}

int64_t bertopt_abi_version(void) { return ABI_VERSION; }

/* Sum of x*x over all tensors, in double; returns -1.0 if memory ran out. */
double bertopt_sumsq_f32(float *const *x, const int64_t *numels, int64_t n_tensors, int n_threads, int64_t chunk) {
    int64_t n_items = 0;
    item_t *items = make_items(numels, n_tensors, chunk, &n_items);
    if (!items) return -1.0;
    double *partial = calloc((size_t)(n_items > 0 ? n_items : 1), sizeof(double));
    if (!partial) { free(items); return -1.0; }
    sumsq_args a = {x, partial};
    job_t job = {items, n_items, total_elements(numels, n_tensors), 0, sumsq_item, &a};
    run_job(&job, n_threads);
    double s = 0.0;
    for (int64_t k = 0; k < n_items; k++) s += partial[k];  /* fixed order: deterministic */
    free(partial);
    free(items);
    return s;
}

/* ---- the Adam update ---- */

typedef struct {
    float *const *p; float *const *g; float *const *m; float *const *v;
    const float *bc1; const float *bc2;   /* per tensor: 1 - beta^t, or NULL: no bias correction */
    float clip; int has_clip;
    float lr_neg, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd;
    int decoupled;
} adam_args;

/* The reference implementation's float32 operations, in its order. torch's add_(x, alpha)
   and addcmul_ round as fmaf(alpha, x, self) and fmaf(value*t1, t2, self); everything
   else is one IEEE operation per line. Compiled with -ffp-contract=off so that nothing
   else gets fused. */
static inline void adam_span(float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
                             int64_t n, const adam_args *a, float bc1, float bc2,
                             const int has_clip, const int l2, const int decoupled_wd, const int bias_corr) {
    const float c = a->clip, wd = a->wd, b1 = a->beta1, omb1 = a->one_minus_beta1;
    const float b2 = a->beta2, omb2 = a->one_minus_beta2, eps = a->eps, lr_neg = a->lr_neg;
    for (int64_t i = 0; i < n; i++) {
        const float pi = p[i];
        float gi = g[i];
        if (has_clip) gi = gi * c;
        if (l2) gi = gi + wd * pi;
        float mi = m[i] * b1;
        mi = FMA(omb1, gi, mi);
        float vi = v[i] * b2;
        vi = FMA(omb2 * gi, gi, vi);
        m[i] = mi;
        v[i] = vi;
        float mh = mi, vh = vi;
        if (bias_corr) { mh = mi / bc1; vh = vi / bc2; }
        float u = mh / (sqrtf(vh) + eps);
        if (decoupled_wd) u = u + wd * pi;
        p[i] = FMA(lr_neg, u, pi);
    }
}

static void adam_item(const job_t *job, const item_t *it, int64_t k) {
    (void)k;
    const adam_args *a = (const adam_args *)job->args;
    const int64_t t = it->tensor, s = it->start;
    float *p = a->p[t] + s, *m = a->m[t] + s, *v = a->v[t] + s;
    const float *g = a->g[t] + s;
    const int bias_corr = a->bc1 != NULL;
    const float bc1 = bias_corr ? a->bc1[t] : 1.0f, bc2 = bias_corr ? a->bc2[t] : 1.0f;
    const int has_wd = a->wd != 0.0f;
    const int l2 = has_wd && !a->decoupled, dec = has_wd && a->decoupled;
    /* Constant flags per call site let the compiler emit one branch-free loop each. */
    if (a->has_clip) {
        if (bias_corr) adam_span(p, g, m, v, it->len, a, bc1, bc2, 1, l2, dec, 1);
        else if (dec) adam_span(p, g, m, v, it->len, a, bc1, bc2, 1, 0, 1, 0);
        else if (l2) adam_span(p, g, m, v, it->len, a, bc1, bc2, 1, 1, 0, 0);
        else adam_span(p, g, m, v, it->len, a, bc1, bc2, 1, 0, 0, 0);
    } else {
        if (bias_corr) adam_span(p, g, m, v, it->len, a, bc1, bc2, 0, l2, dec, 1);
        else if (dec) adam_span(p, g, m, v, it->len, a, bc1, bc2, 0, 0, 1, 0);
        else if (l2) adam_span(p, g, m, v, it->len, a, bc1, bc2, 0, 1, 0, 0);
        else adam_span(p, g, m, v, it->len, a, bc1, bc2, 0, 0, 0, 0);
    }
}

/* One Adam step over n_tensors float32 tensors. Returns 0, or -1 if memory ran out. */
int bertopt_adam_f32(float *const *p, float *const *g, float *const *m, float *const *v,
                     const int64_t *numels, int64_t n_tensors,
                     const float *bc1, const float *bc2, int has_clip, float clip,
                     float lr, float beta1, float beta2, float eps, float wd, int decoupled,
                     float one_minus_beta1, float one_minus_beta2, int n_threads, int64_t chunk) {
    int64_t n_items = 0;
    item_t *items = make_items(numels, n_tensors, chunk, &n_items);
    if (!items) return -1;
    adam_args a = {p, g, m, v, bc1, bc2, clip, has_clip, -lr, beta1, one_minus_beta1,
                   beta2, one_minus_beta2, eps, wd, decoupled};
    job_t job = {items, n_items, total_elements(numels, n_tensors), 0, adam_item, &a};
    run_job(&job, n_threads);
    free(items);
    return 0;
}
"""

_ABI_VERSION = 2
_BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-ffp-contract=off"]

_enabled = True


class BuiltOnce:
    """A kernel library built on first use, once per process (thread-safe), with the
    reason it is or is not available."""

    def __init__(self, build):
        self._build = build  # () -> (CDLL or None, status message)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the library, so the next call builds again (tests)."""
        with self._lock:
            self.lib, self.status, self._tried = None, "not loaded yet", False

    def get(self) -> ctypes.CDLL | None:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self.lib, self.status = self._build()
                    self._tried = True
        return self.lib


def _cache_dir() -> Path:
    root = os.environ.get("BERTOPT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "bertopt"


def _cpu_signature() -> str:
    """What -march=native depends on, so a cache shared between machines stays correct."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _compile(cc: str, out: Path, flags: list[str], source: str) -> str | None:
    """Compile ``source`` to ``out`` atomically; return an error message or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / out.with_suffix(".c").name
        src.write_text(source)
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, str(src), "-o", str(tmp_out), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return proc.stderr.strip()[-2000:] or f"{cc} exited with {proc.returncode}"
        os.replace(tmp_out, out)  # atomic: concurrent processes never load a partial file
    return None


def find_compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc if cc and shutil.which(cc) else None


def build_cached(name: str, source: str, cc: str, extra_flags: tuple[str, ...] = (),
                 accept=lambda lib: None) -> tuple[ctypes.CDLL | None, str]:
    """Compile ``source`` (once: cached under a hash of the source, compiler, flags and CPU)
    and load it. ``-march=native`` first (this CPU's vector width), plain flags if the
    compiler refuses. ``accept(lib)`` may return a reason to reject a loaded library.
    Returns (library, "loaded PATH") or (None, the errors)."""
    version = _compiler_version(cc)
    errors = []
    for march in (["-march=native"], []):
        flags = _BASE_FLAGS + list(extra_flags) + march
        key = hashlib.sha256("\0".join([source, cc, version, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"{name}_{key}.so"
        try:
            if not path.exists():
                err = _compile(cc, path, flags, source)
                if err is not None:
                    errors.append(err)
                    continue
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        rejected = accept(lib)
        if rejected:
            errors.append(f"{path}: {rejected}")
            continue
        return lib, f"loaded {path}"
    return None, " | ".join(errors)


def _build_and_load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("BERTOPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by BERTOPT_NATIVE=0"
    if os.name != "posix":
        return None, f"not built on {os.name} (needs a POSIX C compiler and pthreads)"
    cc = find_compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"

    def right_abi(lib):
        lib.bertopt_abi_version.restype = ctypes.c_int64
        return None if lib.bertopt_abi_version() == _ABI_VERSION else "wrong ABI version"

    lib, message = build_cached("bertopt_adam", C_SOURCE, cc, accept=right_abi)
    if lib is None:
        return None, "compiling the native kernel failed: " + message
    _declare(lib)
    return lib, message


def _declare(lib: ctypes.CDLL) -> None:
    ptrs, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.bertopt_abi_version.restype = i64
    lib.bertopt_sumsq_f32.restype = ctypes.c_double
    lib.bertopt_sumsq_f32.argtypes = [ptrs, ptrs, i64, c_int, i64]
    lib.bertopt_adam_f32.restype = c_int
    lib.bertopt_adam_f32.argtypes = [ptrs, ptrs, ptrs, ptrs, ptrs, i64, ptrs, ptrs, c_int, f32,
                                     f32, f32, f32, f32, f32, c_int, f32, f32, c_int, i64]


_kernel = BuiltOnce(_build_and_load)


def use_native(enabled: bool) -> bool:
    """Switch the native kernel on or off in this process (to compare paths); returns the old setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first call; None if unavailable (see status())."""
    return _kernel.get() if _enabled else None


def status() -> str:
    """Why the native kernel is or is not in use."""
    if not _enabled:
        return "switched off with use_native(False)"
    _kernel.get()
    return _kernel.status


def reset_for_tests() -> None:
    """Forget the loaded library so the next call re-reads BERTOPT_NATIVE (tests only)."""
    _kernel.reset()


def eligible(*tensor_lists: list[Tensor]) -> bool:
    """True if the kernel can work on these tensors in place: CPU, float32, dense, contiguous.

    Tensor subclasses (DTensor, fake tensors under tracing) are left to torch's kernels.
    """
    return all(
        type(t) in _PLAIN_TENSOR_TYPES and t.is_cpu and t.dtype is torch.float32
        and t.layout is torch.strided and t.is_contiguous()
        for tensors in tensor_lists for t in tensors
    )


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _pointer_array(tensors: list[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _numels(tensors: list[Tensor]):
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def sum_of_squares(lib: ctypes.CDLL, tensors: list[Tensor]) -> float:
    """Sum of squares of float32 CPU tensors (``eligible``), accumulated in double."""
    s = lib.bertopt_sumsq_f32(_pointer_array(tensors), _numels(tensors), len(tensors),
                              torch.get_num_threads(), _CHUNK)
    if s == -1.0:
        raise MemoryError("bertopt native kernel: out of memory for its work list")
    return s


@contextlib.contextmanager
def counting_the_step(steps: list[Tensor]):
    """Add 1 to the step counters for a kernel call inside the block; if the kernel refuses
    (ValueError, MemoryError: raised before it writes anything), put them back, so the
    optimizer is as it was and the step can be retried."""
    torch._foreach_add_(steps, 1)
    try:
        yield
    except (MemoryError, ValueError):
        torch._foreach_sub_(steps, 1)
        raise


def _floats(values) -> ctypes.Array:
    # torch turns Python doubles into float32 for float32 math; so do we (c_float rounds).
    return (ctypes.c_float * len(values))(*values)


def bias_correction_arrays(bias_corrections):
    """``(bc1, bc2)`` as the kernels take them: float arrays, or (None, None) for no bias correction."""
    if bias_corrections is None:
        return None, None
    return _floats(bias_corrections[0]), _floats(bias_corrections[1])


def check_sizes(params: list[Tensor], **lists: list[Tensor]) -> list[int]:
    """The parameters' sizes, after checking that every tensor of ``lists`` has its
    parameter's size. The kernels index all of them by the parameter's size: a mismatch
    (say, optimizer state loaded for another model) must stop here, not write out of bounds."""
    n = len(params)
    numels = [t.numel() for t in params]
    for name, tensors in lists.items():
        if len(tensors) != n or any(t.numel() != k for t, k in zip(tensors, numels)):
            bad = next((i for i, (t, k) in enumerate(zip(tensors, numels)) if t.numel() != k), None)
            detail = f"parameter {bad} has {numels[bad]} elements, its {name} {tensors[bad].numel()}" \
                if bad is not None else f"{n} parameters but {len(tensors)} {name} tensors"
            raise ValueError(f"{name} must match its parameter in size: {detail}")
    return numels


def adam_step(lib: ctypes.CDLL, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef: float | None):
    """One in-place BERT Adam update on ``eligible`` tensors (see ``_impl`` for the equations).

    ``bias_corrections`` is None or a pair of per-tensor lists ``(1 - b1**t, 1 - b2**t)``.
    """
    n = len(params)
    numels = check_sizes(params, grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    bc1, bc2 = bias_correction_arrays(bias_corrections)
    err = lib.bertopt_adam_f32(
        _pointer_array(params), _pointer_array(grads), _pointer_array(exp_avgs), _pointer_array(exp_avg_sqs),
        (ctypes.c_int64 * n)(*numels), n, bc1, bc2, clip_coef is not None, 1.0 if clip_coef is None else clip_coef,
        h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled,
        # torch turns the Python double 1 - beta into float32; so do we (c_float rounds).
        1.0 - h.beta1, 1.0 - h.beta2, torch.get_num_threads(), _CHUNK,
    )
    if err != 0:
        raise MemoryError("bertopt native kernel: out of memory for its work list")
    # We wrote through raw pointers; tell autograd, as torch's own in-place ops do, so
    # that a backward through a graph that saved these tensors still raises.
    torch.autograd.graph.increment_version(params)
    torch.autograd.graph.increment_version(exp_avgs)
    torch.autograd.graph.increment_version(exp_avg_sqs)
