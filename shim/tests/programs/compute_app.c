/*
 * A compute workload for the limiter's tests: it launches kernels in a loop — plain, per-thread
 * stream, Ex, cooperative or as a CUDA graph — synchronising after each, for a span of the fake
 * driver's virtual clock, and reports its GPU utilisation per window of that clock (from the
 * driver's own accounting, beneath any shim). Commands on stdin, one reply line each.
 *
 * Usage: compute_app dlsym|procaddr
 *   init <device>                                     -> "init <rc>"
 *   join                                              -> "join 0" (take part in the lockstep)
 *   run <kind> <grid> <block> <span_ms> <window_ms>   -> "run <permille per window>... <launches>"
 *   serve <grid> <period_us> <jitter_us> <delay_ms> <span_ms> <seed>
 *                                   -> "serve <arrivals> <others' permille> <latency ns>..."
 *   leave                                             -> "leave 0"
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUstream, *CUmodule, *CUfunction, *CUgraph, *CUgraphNode, *CUgraphExec;
typedef struct {
    unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    CUstream hStream; void *attrs; unsigned numAttrs;
} CUlaunchConfig;
typedef struct {
    CUfunction func;
    unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    void **kernelParams; void **extra;
} CUDA_KERNEL_NODE_PARAMS;

typedef CUresult (*launch_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **);
typedef CUresult (*coop_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **);
typedef CUresult (*launch_ex_t)(const CUlaunchConfig *, CUfunction, void **, void **);
typedef CUresult (*graph_launch_t)(CUgraphExec, CUstream);

static struct {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxSynchronize)(void);
    CUresult (*cuModuleLoadData)(CUmodule *, const void *);
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*cuGraphCreate)(CUgraph *, unsigned);
    CUresult (*cuGraphAddKernelNode)(CUgraphNode *, CUgraph, const CUgraphNode *, size_t, const CUDA_KERNEL_NODE_PARAMS *);
    CUresult (*cuGraphInstantiateWithFlags)(CUgraphExec *, CUgraph, unsigned long long);
    launch_t cuLaunchKernel, cuLaunchKernel_ptsz;
    coop_t cuLaunchCooperativeKernel;
    launch_ex_t cuLaunchKernelEx;
    graph_launch_t cuGraphLaunch;
    uint64_t (*fakegpu_clock_ns)(void);
    int (*fakegpu_clock_sleep_until_ns)(uint64_t);
    void (*fakegpu_clock_leave)(void);
    uint64_t (*fakegpu_process_busy_ns)(int);
    uint64_t (*fakegpu_device_busy_ns)(int);
} cu;

typedef CUresult (*get_proc_t)(const char *, void **, int, unsigned long long, int *);

static void *find(void *lib, get_proc_t get_proc, const char *symbol, const char *name, int version, unsigned long long flags) {
    if (get_proc && name) {
        void *f = NULL;
        int status = 0;
        if (get_proc(name, &f, version, flags, &status) == 0 && f) return f;
    }
    return dlsym(lib, symbol);
}

static void resolve(const char *way) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) { printf("error dlopen %s\n", dlerror()); fflush(stdout); exit(3); }
    get_proc_t gp = strcmp(way, "procaddr") == 0 ? (get_proc_t)dlsym(lib, "cuGetProcAddress_v2") : NULL;
#define GET(field, symbol, name, version, flags) cu.field = find(lib, gp, symbol, name, version, flags)
    GET(cuInit, "cuInit", "cuInit", 2000, 0);
    GET(cuDeviceGet, "cuDeviceGet", "cuDeviceGet", 2000, 0);
    GET(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain", 7000, 0);
    GET(cuCtxSetCurrent, "cuCtxSetCurrent", "cuCtxSetCurrent", 4000, 0);
    GET(cuCtxSynchronize, "cuCtxSynchronize", "cuCtxSynchronize", 2000, 0);
    GET(cuModuleLoadData, "cuModuleLoadData", "cuModuleLoadData", 2000, 0);
    GET(cuModuleGetFunction, "cuModuleGetFunction", "cuModuleGetFunction", 2000, 0);
    GET(cuGraphCreate, "cuGraphCreate", "cuGraphCreate", 10000, 0);
    GET(cuGraphAddKernelNode, "cuGraphAddKernelNode", "cuGraphAddKernelNode", 10000, 0);
    GET(cuGraphInstantiateWithFlags, "cuGraphInstantiateWithFlags", "cuGraphInstantiateWithFlags", 11040, 0);
    GET(cuLaunchKernel, "cuLaunchKernel", "cuLaunchKernel", 4000, 0);
    GET(cuLaunchKernel_ptsz, "cuLaunchKernel_ptsz", "cuLaunchKernel", 7000, 2);
    GET(cuLaunchCooperativeKernel, "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel", 9000, 0);
    GET(cuLaunchKernelEx, "cuLaunchKernelEx", "cuLaunchKernelEx", 11060, 0);
    GET(cuGraphLaunch, "cuGraphLaunch", "cuGraphLaunch", 10000, 0);
    GET(fakegpu_clock_ns, "fakegpu_clock_ns", NULL, 0, 0);
    GET(fakegpu_clock_sleep_until_ns, "fakegpu_clock_sleep_until_ns", NULL, 0, 0);
    GET(fakegpu_clock_leave, "fakegpu_clock_leave", NULL, 0, 0);
    GET(fakegpu_process_busy_ns, "fakegpu_process_busy_ns", NULL, 0, 0);
    GET(fakegpu_device_busy_ns, "fakegpu_device_busy_ns", NULL, 0, 0);
}

static CUfunction kernel;
static int device_ordinal;

static CUresult init(int ordinal) {
    CUdevice dev;
    CUcontext ctx;
    CUmodule module;
    CUresult rc = cu.cuInit(0);
    if (!rc) rc = cu.cuDeviceGet(&dev, ordinal);
    if (!rc) rc = cu.cuDevicePrimaryCtxRetain(&ctx, dev);
    if (!rc) rc = cu.cuCtxSetCurrent(ctx);
    if (!rc) rc = cu.cuModuleLoadData(&module, "image");
    if (!rc) rc = cu.cuModuleGetFunction(&kernel, module, "work");
    device_ordinal = ordinal;
    return rc;
}

/* One unit of work of the given kind; 0 on success. */
static CUresult launch(const char *kind, unsigned grid, unsigned block, CUgraphExec exec) {
    if (strcmp(kind, "plain") == 0) return cu.cuLaunchKernel(kernel, grid, 1, 1, block, 1, 1, 0, NULL, NULL, NULL);
    if (strcmp(kind, "ptsz") == 0) return cu.cuLaunchKernel_ptsz(kernel, grid, 1, 1, block, 1, 1, 0, NULL, NULL, NULL);
    if (strcmp(kind, "coop") == 0) return cu.cuLaunchCooperativeKernel(kernel, grid, 1, 1, block, 1, 1, 0, NULL, NULL);
    if (strcmp(kind, "ex") == 0) {
        CUlaunchConfig config = {grid, 1, 1, block, 1, 1, 0, NULL, NULL, 0};
        return cu.cuLaunchKernelEx(&config, kernel, NULL, NULL);
    }
    if (strcmp(kind, "graph") == 0) return cu.cuGraphLaunch(exec, NULL);
    return 1;
}

static CUresult make_graph(unsigned grid, unsigned block, CUgraphExec *exec) {
    CUgraph graph;
    CUgraphNode first, second;
    CUDA_KERNEL_NODE_PARAMS p = {kernel, grid, 1, 1, block, 1, 1, 0, NULL, NULL};
    CUresult rc = cu.cuGraphCreate(&graph, 0);
    if (!rc) rc = cu.cuGraphAddKernelNode(&first, graph, NULL, 0, &p);
    if (!rc) rc = cu.cuGraphAddKernelNode(&second, graph, &first, 1, &p);
    if (!rc) rc = cu.cuGraphInstantiateWithFlags(exec, graph, 0);
    return rc;
}

static void run(const char *kind, unsigned grid, unsigned block, uint64_t span_ms, uint64_t window_ms) {
    CUgraphExec exec = NULL;
    if (strcmp(kind, "graph") == 0 && make_graph(grid, block, &exec)) { printf("run -1\n"); return; }
    uint64_t start = cu.fakegpu_clock_ns(), end = start + span_ms * 1000000ull;
    uint64_t window = window_ms * 1000000ull, mark = start, busy_mark = cu.fakegpu_process_busy_ns(device_ordinal);
    long launches = 0;
    printf("run");
    for (;;) {
        CUresult rc = launch(kind, grid, block, exec);
        if (rc) { printf(" -%d\n", rc); return; }
        launches++;
        cu.cuCtxSynchronize();
        uint64_t now = cu.fakegpu_clock_ns();
        if (now >= mark + window) {
            uint64_t busy = cu.fakegpu_process_busy_ns(device_ordinal);
            printf(" %llu", (unsigned long long)((busy - busy_mark) * 1000 / (now - mark)));
            mark = now;
            busy_mark = busy;
        }
        if (now >= end) break;
    }
    /* Done: stop holding the other processes' clocks back while this one waits for stdin. */
    cu.fakegpu_clock_leave();
    printf(" %ld\n", launches);
}

/* A request-serving loop, as a live inference server runs: requests arrive every period_us
 * (each moved by up to ±jitter_us, uniformly, from a generator seeded with seed), for
 * delay_ms + span_ms; each is one kernel, launched at its arrival and synchronised. Only the last
 * span_ms is measured (the first delay_ms lets everyone settle): the latency of each request, from
 * arrival to completion on the virtual clock, and the GPU time the device ran for every other
 * process, per mille of the span. A request that arrives while the previous one is still being
 * served is dropped, as a video pipeline drops a frame: the reply counts the measured arrivals,
 * and lists the latencies of those served. */
static void serve(unsigned grid, uint64_t period_us, uint64_t jitter_us, uint64_t delay_ms, uint64_t span_ms, uint64_t seed) {
    uint64_t now = cu.fakegpu_clock_ns();
    uint64_t measured = now + delay_ms * 1000000ull, end = measured + span_ms * 1000000ull;
    uint64_t period = period_us * 1000ull, jitter = jitter_us * 1000ull, state = seed | 1;
    size_t capacity = span_ms * 1000 / (period_us ? period_us : 1) + 2, served = 0, arrivals = 0;
    uint64_t *latency = calloc(capacity, sizeof *latency);
    if (!latency) { printf("serve -1\n"); return; }
    uint64_t others_from = 0, measuring_since = 0;
    for (uint64_t k = 1;; k++) {
        /* xorshift64: the same arrivals for the same seed, whatever the shim does. */
        state ^= state << 13; state ^= state >> 7; state ^= state << 17;
        uint64_t arrival = now + k * period;
        if (jitter) arrival = arrival - jitter + state % (2 * jitter + 1);
        if (arrival >= end) break;
        int counted = arrival >= measured;
        if (counted) arrivals++;
        if (arrival < cu.fakegpu_clock_ns()) continue;
        cu.fakegpu_clock_sleep_until_ns(arrival);
        if (counted && !measuring_since) {
            measuring_since = cu.fakegpu_clock_ns();
            others_from = cu.fakegpu_device_busy_ns(device_ordinal) - cu.fakegpu_process_busy_ns(device_ordinal);
        }
        CUresult rc = launch("plain", grid, 256, NULL);
        if (rc) { printf("serve -%d\n", rc); free(latency); return; }
        cu.cuCtxSynchronize();
        if (counted && served < capacity) latency[served++] = cu.fakegpu_clock_ns() - arrival;
    }
    cu.fakegpu_clock_sleep_until_ns(end);
    uint64_t others = cu.fakegpu_device_busy_ns(device_ordinal) - cu.fakegpu_process_busy_ns(device_ordinal) - others_from;
    uint64_t elapsed = cu.fakegpu_clock_ns() - measuring_since;
    cu.fakegpu_clock_leave();
    printf("serve %zu %llu", arrivals, (unsigned long long)(elapsed ? others * 1000 / elapsed : 0));
    for (size_t i = 0; i < served; i++) printf(" %llu", (unsigned long long)latency[i]);
    printf("\n");
    free(latency);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: compute_app dlsym|procaddr\n"); return 2; }
    resolve(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[256], kind[32];
    while (fgets(line, sizeof line, stdin)) {
        int ordinal;
        unsigned grid, block;
        unsigned long long span, window, period, jitter, delay, seed;
        if (sscanf(line, "init %d", &ordinal) == 1) printf("init %d\n", init(ordinal));
        else if (strncmp(line, "join", 4) == 0) printf("join %d\n", cu.fakegpu_clock_sleep_until_ns(0));
        else if (sscanf(line, "run %31s %u %u %llu %llu", kind, &grid, &block, &span, &window) == 5) run(kind, grid, block, span, window);
        else if (sscanf(line, "serve %u %llu %llu %llu %llu %llu", &grid, &period, &jitter, &delay, &span, &seed) == 6) serve(grid, period, jitter, delay, span, seed);
        else if (strncmp(line, "leave", 5) == 0) { cu.fakegpu_clock_leave(); printf("leave 0\n"); }
        else if (strncmp(line, "quit", 4) == 0) break;
        else printf("error unknown command\n");
    }
    return 0;
}
