/*
 * Proves that a program linked with -lcuda binds to the fake driver the way it would bind to
 * NVIDIA's: by the soname libcuda.so.1 and the real symbol names (the versioned ones cuda.h's
 * #defines select). Prints one line per step; exits non-zero at the first unexpected result.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream;

CUresult cuInit(unsigned int flags);
CUresult cuDriverGetVersion(int *version);
CUresult cuDeviceGetCount(int *count);
CUresult cuDeviceGetName(char *name, int len, CUdevice dev);
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev);
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev);
CUresult cuCtxSetCurrent(CUcontext ctx);
CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes);
CUresult cuMemFree_v2(CUdeviceptr ptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t bytes);
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t bytes);
CUresult cuMemGetInfo_v2(size_t *free, size_t *total);
CUresult cuModuleLoadData(CUmodule *module, const void *image);
CUresult cuModuleGetFunction(CUfunction *f, CUmodule module, const char *name);
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream stream, void **params, void **extra);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status);
CUresult cuGetErrorName(CUresult error, const char **name);
unsigned long long fakegpu_device_memory_used(int ordinal);
unsigned long long fakegpu_launch_count(void);

static int step = 0;

static void expect(const char *what, CUresult rc, CUresult wanted) {
    step++;
    if (rc != wanted) {
        const char *name = "?";
        cuGetErrorName(rc, &name);
        printf("FAIL %s: %d (%s), expected %d\n", what, rc, name, wanted);
        exit(step);
    }
}

int main(void) {
    int version = 0, count = 0, status = -1;
    char name[96];
    size_t total = 0, free_bytes = 0, card = 0;
    CUcontext ctx;
    CUdeviceptr a = 0, b = 0;
    CUmodule module;
    CUfunction kernel;

    expect("cuDriverGetVersion", cuDriverGetVersion(&version), 0);
    expect("cuMemAlloc before cuInit", cuMemAlloc_v2(&a, 16), 3);
    expect("cuInit", cuInit(0), 0);
    expect("cuDeviceGetCount", cuDeviceGetCount(&count), 0);
    expect("cuDeviceGetName", cuDeviceGetName(name, sizeof name, 0), 0);
    expect("cuDeviceTotalMem", cuDeviceTotalMem_v2(&card, 0), 0);
    printf("driver %d devices %d name %s memory %zu\n", version, count, name, card);

    expect("cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain(&ctx, 0), 0);
    expect("cuCtxSetCurrent", cuCtxSetCurrent(ctx), 0);
    expect("cuMemAlloc", cuMemAlloc_v2(&a, 1 << 20), 0);

    /* The same call reached through cuGetProcAddress, as libcudart reaches it. */
    CUresult (*alloc)(CUdeviceptr *, size_t) = NULL;
    expect("cuGetProcAddress_v2", cuGetProcAddress_v2("cuMemAlloc", (void **)&alloc, 12000, 0, &status), 0);
    expect("alloc through cuGetProcAddress", alloc(&b, 1 << 20), 0);

    char out[64] = "through the fake device", back[64] = {0};
    expect("cuMemcpyHtoD", cuMemcpyHtoD_v2(a, out, sizeof out), 0);
    expect("cuMemcpyDtoH", cuMemcpyDtoH_v2(back, a, sizeof back), 0);
    if (strcmp(out, back) != 0) { printf("FAIL round trip\n"); return 100; }
    expect("cuMemGetInfo", cuMemGetInfo_v2(&free_bytes, &total), 0);
    printf("used %llu free %zu total %zu\n", fakegpu_device_memory_used(0), free_bytes, total);

    expect("cuModuleLoadData", cuModuleLoadData(&module, "image"), 0);
    expect("cuModuleGetFunction", cuModuleGetFunction(&kernel, module, "k"), 0);
    expect("cuLaunchKernel", cuLaunchKernel(kernel, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL), 0);
    expect("cuLaunchKernel with no function", cuLaunchKernel(NULL, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL), 1);
    printf("launches %llu\n", fakegpu_launch_count());

    expect("cuMemFree", cuMemFree_v2(a), 0);
    expect("cuMemFree", cuMemFree_v2(b), 0);
    expect("cuMemFree twice", cuMemFree_v2(b), 1);
    printf("used %llu\n", fakegpu_device_memory_used(0));
    printf("ok\n");
    return 0;
}
