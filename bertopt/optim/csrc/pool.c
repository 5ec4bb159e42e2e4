/* One thread pool for every kernel of the library, and the work splitting they share.

   Work is split into items of at most `chunk` elements that threads take from a shared
   counter, so a core stolen by another process slows a step down by its share only (a
   static split would wait for the slowest thread). The helper threads persist between
   calls; the caller works too and waits only for helpers that joined, never for one the
   OS has not scheduled yet. */
#include <pthread.h>
#include <stdlib.h>

#include "bertopt.h"

int64_t bertopt_total_elements(const int64_t *numels, int64_t n_tensors) {
    int64_t total = 0;
    for (int64_t t = 0; t < n_tensors; t++) total += numels[t];
    return total;
}

bertopt_item *bertopt_make_items(const int64_t *numels, int64_t n_tensors, int64_t chunk, int64_t *n_items) {
    int64_t count = 0;
    for (int64_t t = 0; t < n_tensors; t++) count += (numels[t] + chunk - 1) / chunk;
    bertopt_item *items = malloc((size_t)(count > 0 ? count : 1) * sizeof(bertopt_item));
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

static void drain(bertopt_job *job) {
    if (job->participate) { job->participate(job); return; }
    for (;;) {
        long k = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (k >= job->n_items) break;
        job->work(job, &job->items[k], k);
    }
}

/* The caller publishes a job, works on it itself, then closes it and waits only for
   helpers that actually joined: a helper that has not been scheduled yet (the machine is
   busy) stays out and costs nothing. */
#define MAX_HELPERS 255
#define MIN_ELEMENTS_PER_THREAD (1 << 16)
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_idle = PTHREAD_COND_INITIALIZER;
static bertopt_job *pool_job = NULL;    /* open for joining, or NULL */
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
        bertopt_job *job = pool_job;
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

void bertopt_run_job(bertopt_job *job, int n_threads) {
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

/* What build.py checks at load: the struct layout the Python side mirrors. */
int64_t bertopt_abi_version(void) { return BERTOPT_ABI_VERSION; }
int64_t bertopt_hyper_size(void) { return (int64_t)sizeof(bertopt_hyper); }
