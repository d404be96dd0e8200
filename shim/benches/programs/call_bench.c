/*
 * Times the driver calls the shim sits on: cuMemAlloc_v2 + cuMemFree_v2 pairs and
 * cuLaunchKernel, from N threads at once, reaching the driver through dlopen + dlsym (so a
 * preloaded shim is in the path exactly as it is for real programs).
 *
 * Usage: call_bench <threads> <iterations>
 * Prints: "alloc_free <ns per pair per thread>" and "launch <ns per launch per thread>".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef int CUresult;
typedef void *CUcontext, *CUmodule, *CUfunction;
typedef CUresult (*init_t)(unsigned);
typedef CUresult (*retain_t)(CUcontext *, int);
typedef CUresult (*set_t)(CUcontext);
typedef CUresult (*alloc_t)(uint64_t *, size_t);
typedef CUresult (*free_t)(uint64_t);
typedef CUresult (*load_t)(CUmodule *, const void *);
typedef CUresult (*getfn_t)(CUfunction *, CUmodule, const char *);
typedef CUresult (*launch_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **);

static retain_t retain; static set_t set_current; static alloc_t mem_alloc; static free_t mem_free; static launch_t launch;
static CUfunction kernel;
static long iterations;
static pthread_barrier_t start, middle;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec; }

/* Each thread times its own loops: a main thread descheduled between a barrier and its clock
 * read (a loaded machine) must not shorten or lengthen what is measured. */
static double spent[256][2];

static void *worker(void *arg) {
    long index = (long)arg;
    CUcontext ctx;
    if (retain(&ctx, 0) || set_current(ctx)) { fprintf(stderr, "context failed\n"); exit(1); }
    pthread_barrier_wait(&start);
    double t0 = now();
    for (long i = 0; i < iterations; i++) {
        uint64_t p;
        if (mem_alloc(&p, 4096) || mem_free(p)) { fprintf(stderr, "alloc/free failed\n"); exit(1); }
    }
    double t1 = now();
    pthread_barrier_wait(&middle);
    double t2 = now();
    for (long i = 0; i < iterations; i++) {
        if (launch(kernel, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL)) { fprintf(stderr, "launch failed\n"); exit(1); }
    }
    spent[index][0] = t1 - t0;
    spent[index][1] = now() - t2;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    iterations = argc > 2 ? atol(argv[2]) : 100000;
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    init_t init = (init_t)dlsym(cuda, "cuInit");
    retain = (retain_t)dlsym(cuda, "cuDevicePrimaryCtxRetain");
    set_current = (set_t)dlsym(cuda, "cuCtxSetCurrent");
    mem_alloc = (alloc_t)dlsym(cuda, "cuMemAlloc_v2");
    mem_free = (free_t)dlsym(cuda, "cuMemFree_v2");
    launch = (launch_t)dlsym(cuda, "cuLaunchKernel");
    load_t load = (load_t)dlsym(cuda, "cuModuleLoadData");
    getfn_t get_function = (getfn_t)dlsym(cuda, "cuModuleGetFunction");
    CUcontext ctx; CUmodule module;
    if (init(0) || retain(&ctx, 0) || set_current(ctx) || load(&module, "bench") || get_function(&kernel, module, "k")) {
        fprintf(stderr, "driver setup failed\n");
        return 1;
    }
    pthread_barrier_init(&start, NULL, threads + 1);
    pthread_barrier_init(&middle, NULL, threads + 1);
    pthread_t ids[256];
    if (threads < 1 || threads > 256) { fprintf(stderr, "1 to 256 threads\n"); return 1; }
    for (long t = 0; t < threads; t++) pthread_create(&ids[t], NULL, worker, (void *)t);
    pthread_barrier_wait(&start);
    pthread_barrier_wait(&middle);
    double alloc = 0, launched = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        alloc += spent[t][0];
        launched += spent[t][1];
    }
    printf("alloc_free %.1f\nlaunch %.1f\n", alloc / threads / iterations, launched / threads / iterations);
    return 0;
}
