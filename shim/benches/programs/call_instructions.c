/*
 * Instructions per driver call, for callgrind: one operation repeated, with callgrind's
 * collection on only around the measured loop (so set-up, the shim's start and the fake
 * driver's initialisation are not counted). Functions are resolved as libcudart resolves them:
 * through cuGetProcAddress_v2, so a preloaded shim is reached the way CUDA programs reach it.
 *
 * Usage: valgrind --tool=callgrind --collect-atstart=no call_instructions <op> <iterations>
 *   op: alloc_free (cuMemAlloc_v2 + cuMemFree_v2 of 1 MiB), launch (cuLaunchKernel, one block),
 *       mem_get_info (cuMemGetInfo_v2)
 * Prints "ok <op>" once done.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <valgrind/callgrind.h>

typedef int CUresult;
typedef void *CUcontext, *CUmodule, *CUfunction;
typedef CUresult (*get_proc_t)(const char *, void **, int, unsigned long long, int *);
typedef CUresult (*init_t)(unsigned);
typedef CUresult (*retain_t)(CUcontext *, int);
typedef CUresult (*set_t)(CUcontext);
typedef CUresult (*alloc_t)(uint64_t *, size_t);
typedef CUresult (*free_t)(uint64_t);
typedef CUresult (*info_t)(size_t *, size_t *);
typedef CUresult (*load_t)(CUmodule *, const void *);
typedef CUresult (*getfn_t)(CUfunction *, CUmodule, const char *);
typedef CUresult (*launch_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **);

static get_proc_t get_proc;

static void *resolve(const char *name, int version) {
    void *f = NULL;
    int status = 0;
    if (get_proc(name, &f, version, 0, &status) || !f) {
        fprintf(stderr, "cuGetProcAddress(%s) failed\n", name);
        exit(1);
    }
    return f;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: call_instructions <op> <iterations>\n"); return 2; }
    const char *op = argv[1];
    long iterations = atol(argv[2]);
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    get_proc = (get_proc_t)dlsym(cuda, "cuGetProcAddress_v2");
    if (!get_proc) { fprintf(stderr, "no cuGetProcAddress_v2\n"); return 1; }
    init_t init = resolve("cuInit", 2000);
    retain_t retain = resolve("cuDevicePrimaryCtxRetain", 7000);
    set_t set_current = resolve("cuCtxSetCurrent", 4000);
    alloc_t mem_alloc = resolve("cuMemAlloc", 3020);
    free_t mem_free = resolve("cuMemFree", 3020);
    info_t mem_get_info = resolve("cuMemGetInfo", 3020);
    load_t load = resolve("cuModuleLoadData", 2000);
    getfn_t get_function = resolve("cuModuleGetFunction", 2000);
    launch_t launch = resolve("cuLaunchKernel", 4000);
    CUcontext ctx; CUmodule module; CUfunction kernel;
    if (init(0) || retain(&ctx, 0) || set_current(ctx) || load(&module, "bench") || get_function(&kernel, module, "k")) {
        fprintf(stderr, "driver setup failed\n");
        return 1;
    }
    int which = strcmp(op, "alloc_free") == 0 ? 0 : strcmp(op, "launch") == 0 ? 1 : strcmp(op, "mem_get_info") == 0 ? 2 : -1;
    if (which < 0) { fprintf(stderr, "unknown op %s\n", op); return 2; }
    /* Warm up: first calls take the slow paths once (tables, samplers, the first refresh). */
    for (int round = 0; round < 2; round++) {
        long count = round == 0 ? 1000 : iterations;
        if (round == 1) CALLGRIND_TOGGLE_COLLECT;
        for (long i = 0; i < count; i++) {
            uint64_t p;
            size_t free_bytes, total_bytes;
            CUresult rc = which == 0 ? (mem_alloc(&p, 1 << 20) || mem_free(p))
                        : which == 1 ? launch(kernel, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL)
                        : mem_get_info(&free_bytes, &total_bytes);
            if (rc) { fprintf(stderr, "%s failed: %d\n", op, rc); return 1; }
        }
        if (round == 1) CALLGRIND_TOGGLE_COLLECT;
    }
    printf("ok %s\n", op);
    return 0;
}
