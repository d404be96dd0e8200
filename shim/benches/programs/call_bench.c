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

static void *worker(void *arg) {
    (void)arg;
    CUcontext ctx;
    if (retain(&ctx, 0) || set_current(ctx)) { fprintf(stderr, "context failed\n"); exit(1); }
    pthread_barrier_wait(&start);
    for (long i = 0; i < iterations; i++) {
        uint64_t p;
        if (mem_alloc(&p, 4096) || mem_free(p)) { fprintf(stderr, "alloc/free failed\n"); exit(1); }
    }
    pthread_barrier_wait(&middle);
    for (long i = 0; i < iterations; i++) {
        if (launch(kernel, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL)) { fprintf(stderr, "launch failed\n"); exit(1); }
    }
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
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, worker, NULL);
    pthread_barrier_wait(&start);
    double t0 = now();
    pthread_barrier_wait(&middle);
    double t1 = now();
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    double t2 = now();
    printf("alloc_free %.1f\nlaunch %.1f\n", (t1 - t0) / iterations, (t2 - t1) / iterations);
    return 0;
}
