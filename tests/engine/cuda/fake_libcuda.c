/* A stand-in for libcuda.so.1 on a machine without an NVIDIA driver: just the driver-API entry
 * points kernels/csrc/graph_driver.c opens, recording what they were called with, so the C loop's
 * logic (launch count, one sync, error propagation, context push) is tested on the CPU.
 * A graph exec handle of 0xBAD fails its launch with CUDA_ERROR_ILLEGAL_ADDRESS (700). */
#include <stddef.h>
#include <stdint.h>

typedef int CUresult;
static int launches, syncs, pushes, pops, has_ctx = 1;
static void *last_stream;

CUresult cuInit(unsigned int flags) { return flags == 0 ? 0 : 1; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuGraphLaunch(void *exec, void *stream) {
    if ((uintptr_t)exec == 0xBAD) return 700;
    launches++;
    last_stream = stream;
    return 0;
}
CUresult cuStreamSynchronize(void *stream) { syncs++; last_stream = stream; return 0; }
CUresult cuStreamGetCtx(void *stream, void **ctx) { *ctx = (void *)0xC0; return 0; }
CUresult cuCtxGetCurrent(void **ctx) { *ctx = has_ctx ? (void *)0xC0 : NULL; return 0; }
CUresult cuCtxPushCurrent_v2(void *ctx) { pushes++; return 0; }
CUresult cuCtxPopCurrent_v2(void **ctx) { pops++; *ctx = (void *)0xC0; return 0; }
CUresult cuGetErrorName(CUresult code, const char **s) {
    *s = code == 700 ? "CUDA_ERROR_ILLEGAL_ADDRESS" : "CUDA_ERROR_UNKNOWN";
    return 0;
}
CUresult cuGetErrorString(CUresult code, const char **s) {
    *s = code == 700 ? "an illegal memory access was encountered" : "unknown error";
    return 0;
}

/* for the test: counters, then reset */
void fake_stats(int *out) {
    out[0] = launches; out[1] = syncs; out[2] = pushes; out[3] = pops; out[4] = (int)(uintptr_t)last_stream;
    launches = syncs = pushes = pops = 0;
}
void fake_set_current_ctx(int present) { has_ctx = present; }
