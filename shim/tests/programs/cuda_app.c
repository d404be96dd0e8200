/*
 * A CUDA "application" for the shim's tests: it reaches the driver one of four ways (linked
 * with -lcuda, dlopen + dlsym, cuGetProcAddress, or by replaying the exact request sequence
 * NVIDIA's libcudart 12.9 makes) and then runs commands read from stdin, one reply line each,
 * so a test can drive several processes step by step.
 *
 * Usage: cuda_app direct|dlsym|procaddr|cudart [requests-file]
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef void *CUcontext, *CUstream, *CUmodule, *CUfunction, *CUarray, *CUmemoryPool;
typedef uint64_t CUmemGenericAllocationHandle;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type; int requestedHandleTypes; CUmemLocation location; void *win32HandleMetaData;
    unsigned char compressionType, gpuDirectRDMACapable; unsigned short usage; unsigned char reserved[4];
} CUmemAllocationProp;
typedef struct { size_t Width, Height; int Format; unsigned NumChannels; } CUDA_ARRAY_DESCRIPTOR;
typedef struct {
    int allocType; int handleTypes; CUmemLocation location; void *win32SecurityAttributes;
    size_t maxSize; unsigned short usage; unsigned char reserved[54];
} CUmemPoolProps;
typedef struct {
    CUmemPoolProps poolProps; const void *accessDescs; size_t accessDescCount; size_t bytesize; CUdeviceptr dptr;
} CUDA_MEM_ALLOC_NODE_PARAMS;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;

#define DECLARE(ret, name, args) typedef ret (*name##_t) args;
DECLARE(CUresult, cuInit, (unsigned))
DECLARE(CUresult, cuDeviceGet, (CUdevice *, int))
DECLARE(CUresult, cuDevicePrimaryCtxRetain, (CUcontext *, CUdevice))
DECLARE(CUresult, cuDevicePrimaryCtxRelease, (CUdevice))
DECLARE(CUresult, cuCtxSetCurrent, (CUcontext))
DECLARE(CUresult, cuCtxCreate, (CUcontext *, unsigned, CUdevice))
DECLARE(CUresult, cuCtxDestroy, (CUcontext))
DECLARE(CUresult, cuMemAlloc, (CUdeviceptr *, size_t))
DECLARE(CUresult, cuMemAllocManaged, (CUdeviceptr *, size_t, unsigned))
DECLARE(CUresult, cuMemAllocPitch, (CUdeviceptr *, size_t *, size_t, size_t, unsigned))
DECLARE(CUresult, cuMemFree, (CUdeviceptr))
DECLARE(CUresult, cuMemAllocAsync, (CUdeviceptr *, size_t, CUstream))
DECLARE(CUresult, cuMemAllocFromPoolAsync, (CUdeviceptr *, size_t, CUmemoryPool, CUstream))
DECLARE(CUresult, cuMemFreeAsync, (CUdeviceptr, CUstream))
DECLARE(CUresult, cuDeviceGetDefaultMemPool, (CUmemoryPool *, CUdevice))
DECLARE(CUresult, cuMemCreate, (CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long))
DECLARE(CUresult, cuMemRelease, (CUmemGenericAllocationHandle))
DECLARE(CUresult, cuArrayCreate, (CUarray *, const CUDA_ARRAY_DESCRIPTOR *))
DECLARE(CUresult, cuArrayDestroy, (CUarray))
DECLARE(CUresult, cuMemGetInfo, (size_t *, size_t *))
DECLARE(CUresult, cuDeviceTotalMem, (size_t *, CUdevice))
DECLARE(CUresult, cuModuleLoadData, (CUmodule *, const void *))
DECLARE(CUresult, cuModuleGetFunction, (CUfunction *, CUmodule, const char *))
DECLARE(CUresult, cuLaunchKernel, (CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void **, void **))
DECLARE(CUresult, cuGraphCreate, (void **, unsigned))
DECLARE(CUresult, cuGraphDestroy, (void *))
DECLARE(CUresult, cuGraphAddMemAllocNode, (void **, void *, void *const *, size_t, CUDA_MEM_ALLOC_NODE_PARAMS *))
DECLARE(CUresult, cuGetProcAddress_v2, (const char *, void **, int, unsigned long long, int *))

/* Each entry: the table field, the exported symbol, and the (name, version) cudart asks for. */
#define FUNCTIONS(X) \
    X(cuInit, "cuInit", "cuInit", 2000) \
    X(cuDeviceGet, "cuDeviceGet", "cuDeviceGet", 2000) \
    X(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain", 7000) \
    X(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease", 11000) \
    X(cuCtxSetCurrent, "cuCtxSetCurrent", "cuCtxSetCurrent", 4000) \
    X(cuCtxCreate, "cuCtxCreate_v2", "cuCtxCreate", 3020) \
    X(cuCtxDestroy, "cuCtxDestroy_v2", "cuCtxDestroy", 4000) \
    X(cuMemAlloc, "cuMemAlloc_v2", "cuMemAlloc", 3020) \
    X(cuMemAllocManaged, "cuMemAllocManaged", "cuMemAllocManaged", 6000) \
    X(cuMemAllocPitch, "cuMemAllocPitch_v2", "cuMemAllocPitch", 3020) \
    X(cuMemFree, "cuMemFree_v2", "cuMemFree", 3020) \
    X(cuMemAllocAsync, "cuMemAllocAsync", "cuMemAllocAsync", 11020) \
    X(cuMemAllocFromPoolAsync, "cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync", 11020) \
    X(cuMemFreeAsync, "cuMemFreeAsync", "cuMemFreeAsync", 11020) \
    X(cuDeviceGetDefaultMemPool, "cuDeviceGetDefaultMemPool", "cuDeviceGetDefaultMemPool", 11020) \
    X(cuMemCreate, "cuMemCreate", "cuMemCreate", 10020) \
    X(cuMemRelease, "cuMemRelease", "cuMemRelease", 10020) \
    X(cuArrayCreate, "cuArrayCreate_v2", "cuArrayCreate", 3020) \
    X(cuArrayDestroy, "cuArrayDestroy", "cuArrayDestroy", 2000) \
    X(cuMemGetInfo, "cuMemGetInfo_v2", "cuMemGetInfo", 3020) \
    X(cuDeviceTotalMem, "cuDeviceTotalMem_v2", "cuDeviceTotalMem", 3020) \
    X(cuModuleLoadData, "cuModuleLoadData", "cuModuleLoadData", 2000) \
    X(cuModuleGetFunction, "cuModuleGetFunction", "cuModuleGetFunction", 2000) \
    X(cuLaunchKernel, "cuLaunchKernel", "cuLaunchKernel", 4000) \
    X(cuGraphCreate, "cuGraphCreate", "cuGraphCreate", 10000) \
    X(cuGraphDestroy, "cuGraphDestroy", "cuGraphDestroy", 10000) \
    X(cuGraphAddMemAllocNode, "cuGraphAddMemAllocNode", "cuGraphAddMemAllocNode", 11040)

static struct {
#define FIELD(field, symbol, name, version) field##_t field;
    FUNCTIONS(FIELD)
} cu;

#ifdef DIRECT_LINK
/* Linked with -lcuda: these resolve through the dynamic linker, where a preloaded shim wins. */
#define EXTERN(field, symbol, name, version) extern CUresult field##_linked(void) __asm__(symbol);
FUNCTIONS(EXTERN)
static void resolve_direct(void) {
#define TAKE(field, symbol, name, version) cu.field = (field##_t)(void *)field##_linked;
    FUNCTIONS(TAKE)
}
#endif

static void *libcuda(void) {
    void *handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!handle) { printf("error dlopen %s\n", dlerror()); fflush(stdout); exit(3); }
    return handle;
}

static void resolve_dlsym(void) {
    void *handle = libcuda();
#define LOOK(field, symbol, name, version) cu.field = (field##_t)dlsym(handle, symbol);
    FUNCTIONS(LOOK)
}

static cuGetProcAddress_v2_t get_proc;

static void resolve_procaddr(void) {
    get_proc = (cuGetProcAddress_v2_t)dlsym(libcuda(), "cuGetProcAddress_v2");
    int status;
#define PROC(field, symbol, name, version) get_proc(name, (void **)&cu.field, version, 0, &status);
    FUNCTIONS(PROC)
}

/* Replays libcudart 12.9's requests in order; like cudart, it switches to the
 * cuGetProcAddress the driver hands back for itself and uses it from then on. */
static void resolve_cudart(const char *path) {
    get_proc = (cuGetProcAddress_v2_t)dlsym(libcuda(), "cuGetProcAddress_v2");
    FILE *file = fopen(path, "r");
    if (!file) { printf("error cannot open %s\n", path); fflush(stdout); exit(3); }
    char line[256], name[128];
    int version, requests = 0, found = 0;
    unsigned long long flags;
    while (fgets(line, sizeof line, file)) {
        if (line[0] == '"') { strcpy(name, ""); if (sscanf(line, "\"\" %d %llu", &version, &flags) != 2) continue; }
        else if (sscanf(line, "%127s %d %llu", name, &version, &flags) != 3) continue;
        void *fn = NULL;
        int status = -1;
        CUresult rc = get_proc(name, &fn, version, flags, &status);
        requests++;
        if (rc == 0 && fn) found++;
        if (rc == 0 && fn && strcmp(name, "cuInit") == 0) ((cuInit_t)fn)(0);
        if (rc == 0 && fn && strcmp(name, "cuGetProcAddress") == 0 && version >= 12000) get_proc = (cuGetProcAddress_v2_t)fn;
        if (rc == 0 && fn && flags == 0) {
#define KEEP(field, symbol, nm, ver) if (strcmp(name, nm) == 0 && version == ver) cu.field = (field##_t)fn;
            FUNCTIONS(KEEP)
        }
    }
    fclose(file);
    printf("replayed %d %d\n", requests, found);
    /* The pointer cudart ended up using for cuGetProcAddress must be the shim's, if one is loaded. */
    Dl_info info;
    int in_shim = dladdr((void *)get_proc, &info) && info.dli_fname && strstr(info.dli_fname, "libtessera");
    printf("getproc-is-shim %d\n", in_shim);
}

static CUdeviceptr pointers[4096];
static CUmemGenericAllocationHandle handles[4096];
static CUarray arrays[4096];
static CUcontext contexts[64];
static int npointers, nhandles, narrays, ncontexts;

static void nvml_query(void) {
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib) { printf("nvml error dlopen\n"); return; }
    int (*init)(void) = dlsym(lib, "nvmlInit_v2");
    int (*by_index)(unsigned, void **) = dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
    int (*info)(void *, nvmlMemory_t *) = dlsym(lib, "nvmlDeviceGetMemoryInfo");
    int (*info2)(void *, nvmlMemory_v2_t *) = dlsym(lib, "nvmlDeviceGetMemoryInfo_v2");
    void *device = NULL;
    int rc = init();
    if (rc == 0) rc = by_index(0, &device);
    nvmlMemory_t m = {0};
    nvmlMemory_v2_t m2 = {0};
    m2.version = (unsigned)sizeof(nvmlMemory_v2_t) | (2u << 24);
    int rc1 = rc ? rc : info(device, &m);
    int rc2 = rc ? rc : info2(device, &m2);
    printf("nvml %d %llu %llu %llu %d %llu %llu %llu\n", rc1, m.total, m.used, m.free, rc2, m2.total, m2.used, m2.free);
}

static CUresult init_device(int ordinal) {
    CUdevice device;
    CUcontext ctx;
    CUresult rc = cu.cuInit(0);
    if (rc == 0) rc = cu.cuDeviceGet(&device, ordinal);
    if (rc == 0) rc = cu.cuDevicePrimaryCtxRetain(&ctx, device);
    if (rc == 0) rc = cu.cuCtxSetCurrent(ctx);
    return rc;
}

int main(int argc, char **argv) {
    const char *way = argc > 1 ? argv[1] : "dlsym";
    if (strcmp(way, "direct") == 0) {
#ifdef DIRECT_LINK
        resolve_direct();
#else
        printf("error not built with -lcuda\n");
        return 2;
#endif
    } else if (strcmp(way, "dlsym") == 0) resolve_dlsym();
    else if (strcmp(way, "procaddr") == 0) resolve_procaddr();
    else if (strcmp(way, "cudart") == 0 && argc > 2) resolve_cudart(argv[2]);
    else { printf("error unknown way %s\n", way); return 2; }
    printf("ready\n");
    fflush(stdout);

    char line[256], cmd[64];
    unsigned long long a, b;
    while (fgets(line, sizeof line, stdin)) {
        a = b = 0;
        if (sscanf(line, "%63s %llu %llu", cmd, &a, &b) < 1) continue;
        CUresult rc = -1;
        if (!strcmp(cmd, "init")) { printf("init %d\n", init_device((int)a)); }
        else if (!strcmp(cmd, "alloc")) { CUdeviceptr p = 0; rc = cu.cuMemAlloc(&p, a); if (!rc) pointers[npointers] = p; printf("alloc %d %d\n", rc, rc ? -1 : npointers++); }
        else if (!strcmp(cmd, "managed")) { CUdeviceptr p = 0; rc = cu.cuMemAllocManaged(&p, a, 1); if (!rc) pointers[npointers] = p; printf("managed %d %d\n", rc, rc ? -1 : npointers++); }
        else if (!strcmp(cmd, "pitch")) { CUdeviceptr p = 0; size_t pitch = 0; rc = cu.cuMemAllocPitch(&p, &pitch, a, b, 4); if (!rc) pointers[npointers] = p; printf("pitch %d %d %zu\n", rc, rc ? -1 : npointers++, pitch); }
        else if (!strcmp(cmd, "async")) { CUdeviceptr p = 0; rc = cu.cuMemAllocAsync(&p, a, NULL); if (!rc) pointers[npointers] = p; printf("async %d %d\n", rc, rc ? -1 : npointers++); }
        else if (!strcmp(cmd, "pool")) {
            CUmemoryPool pool = NULL; CUdeviceptr p = 0;
            rc = cu.cuDeviceGetDefaultMemPool(&pool, 0);
            if (!rc) rc = cu.cuMemAllocFromPoolAsync(&p, a, pool, NULL);
            if (!rc) pointers[npointers] = p;
            printf("pool %d %d\n", rc, rc ? -1 : npointers++);
        }
        else if (!strcmp(cmd, "free")) { printf("free %d\n", cu.cuMemFree(a < 4096 ? pointers[a] : (CUdeviceptr)a)); }
        else if (!strcmp(cmd, "freeasync")) { printf("freeasync %d\n", cu.cuMemFreeAsync(pointers[a], NULL)); }
        else if (!strcmp(cmd, "vmm")) {
            CUmemAllocationProp prop; memset(&prop, 0, sizeof prop);
            prop.type = 1; prop.location.type = 1; prop.location.id = (int)b;
            CUmemGenericAllocationHandle h = 0;
            rc = cu.cuMemCreate(&h, a, &prop, 0);
            if (!rc) handles[nhandles] = h;
            printf("vmm %d %d\n", rc, rc ? -1 : nhandles++);
        }
        else if (!strcmp(cmd, "vmmfree")) { printf("vmmfree %d\n", cu.cuMemRelease(handles[a])); }
        else if (!strcmp(cmd, "array")) {
            CUDA_ARRAY_DESCRIPTOR d = { a, b, 0x20, 1 };
            CUarray arr = NULL;
            rc = cu.cuArrayCreate(&arr, &d);
            if (!rc) arrays[narrays] = arr;
            printf("array %d %d\n", rc, rc ? -1 : narrays++);
        }
        else if (!strcmp(cmd, "arrayfree")) { printf("arrayfree %d\n", cu.cuArrayDestroy(arrays[a])); }
        else if (!strcmp(cmd, "ctx")) { CUcontext c = NULL; rc = cu.cuCtxCreate(&c, 0, (CUdevice)a); if (!rc) contexts[ncontexts] = c; printf("ctx %d %d\n", rc, rc ? -1 : ncontexts++); }
        else if (!strcmp(cmd, "ctxdestroy")) { printf("ctxdestroy %d\n", cu.cuCtxDestroy(contexts[a])); }
        else if (!strcmp(cmd, "release")) { printf("release %d\n", cu.cuDevicePrimaryCtxRelease((CUdevice)a)); }
        else if (!strcmp(cmd, "info")) { size_t f = 0, t = 0; rc = cu.cuMemGetInfo(&f, &t); printf("info %d %zu %zu\n", rc, f, t); }
        else if (!strcmp(cmd, "total")) { size_t t = 0; rc = cu.cuDeviceTotalMem(&t, (CUdevice)a); printf("total %d %zu\n", rc, t); }
        else if (!strcmp(cmd, "launch")) {
            CUmodule m = NULL; CUfunction f = NULL;
            rc = cu.cuModuleLoadData(&m, "fake-image");
            if (!rc) rc = cu.cuModuleGetFunction(&f, m, "kernel");
            for (unsigned long long i = 0; !rc && i < (a ? a : 1); i++) rc = cu.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
            printf("launch %d\n", rc);
        }
        else if (!strcmp(cmd, "nvml")) { nvml_query(); }
        else if (!strcmp(cmd, "physical")) {
            /* The fake driver's own view of the card, which no interposer touches. */
            unsigned long long (*used)(int) = (unsigned long long (*)(int))dlsym(libcuda(), "fakegpu_device_memory_used");
            printf("physical %llu\n", used ? used((int)a) : 0ULL);
        }
        else if (!strcmp(cmd, "managedused")) {
            /* The fake driver's managed memory on the card's account (node-wide), and this
               process's managed memory advised to prefer the host. */
            unsigned long long (*managed)(int) = (unsigned long long (*)(int))dlsym(libcuda(), "fakegpu_managed_memory_used");
            unsigned long long (*host)(void) = (unsigned long long (*)(void))dlsym(libcuda(), "fakegpu_process_managed_host_preferred");
            printf("managedused %llu %llu\n", managed ? managed((int)a) : 0ULL, host ? host() : 0ULL);
        }
        else if (!strcmp(cmd, "fork")) {
            /* The child initialises CUDA afresh (as CUDA requires after fork) and allocates. */
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0) {
                CUresult crc = init_device(0);
                CUdeviceptr p = 0;
                if (!crc) crc = cu.cuMemAlloc(&p, a);
                if (!crc) crc = cu.cuMemFree(p);
                _exit(crc & 0xff);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            printf("fork %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        }
        /* A graph with one memory allocation node of `a` bytes on device 0, then destroyed. */
        else if (!strcmp(cmd, "graphalloc")) {
            void *graph = NULL, *node = NULL;
            CUDA_MEM_ALLOC_NODE_PARAMS params;
            memset(&params, 0, sizeof params);
            params.poolProps.allocType = 1; /* CU_MEM_ALLOCATION_TYPE_PINNED */
            params.poolProps.location.type = 1; /* CU_MEM_LOCATION_TYPE_DEVICE */
            params.bytesize = a;
            rc = cu.cuGraphCreate && cu.cuGraphAddMemAllocNode ? cu.cuGraphCreate(&graph, 0) : -1;
            if (rc == 0) {
                rc = cu.cuGraphAddMemAllocNode(&node, graph, NULL, 0, &params);
                cu.cuGraphDestroy(graph);
            }
            printf("graphalloc %d %d\n", rc, params.dptr != 0);
        }
        /* What a daemonising helper does: close every descriptor from `a` on, ours or not. */
        else if (!strcmp(cmd, "closefrom")) { printf("closefrom %ld\n", syscall(SYS_close_range, (unsigned)a, ~0U, 0)); }
        else if (!strcmp(cmd, "quit")) { break; }
        else printf("error unknown command %s\n", cmd);
        fflush(stdout);
    }
    return 0;
}
