/* graph_driver.c: a C-level driver loop for a captured CUDA graph (one reverse diffusion step).
 *
 * Python captures one step of the sampling loop in a torch.cuda.CUDAGraph and hands us the raw
 * cudaGraphExec_t and the cudaStream_t it should run on; we launch it `steps` times back to back
 * and synchronise once, so the host cost per step is one cudaGraphLaunch and no Python.
 *
 * Every CUDA call is checked; on failure the CUDA error string goes into err (errlen bytes,
 * always NUL-terminated) and the cudaError_t code is returned. Nothing here ever exits.
 * Plain C (C99) against the CUDA runtime API; build: see engine/cuda/driver.py.
 */
#include <stdio.h>
#include <string.h>
#include <cuda_runtime_api.h>

#define DDPM_EXPORT __attribute__((visibility("default")))

static void set_err(char *err, int errlen, const char *what, cudaError_t code) {
    if (err == NULL || errlen <= 0) return;
    snprintf(err, (size_t)errlen, "%s failed: %s (%s, code %d)", what, cudaGetErrorString(code),
             cudaGetErrorName(code), (int)code);
}

#define CHECK(call)                                          \
    do {                                                     \
        cudaError_t ddpm_rc_ = (call);                       \
        if (ddpm_rc_ != cudaSuccess) {                       \
            set_err(err, errlen, #call, ddpm_rc_);           \
            return (int)ddpm_rc_;                            \
        }                                                    \
    } while (0)

static int bad_arg(char *err, int errlen, const char *msg) {
    if (err != NULL && errlen > 0) snprintf(err, (size_t)errlen, "%s", msg);
    return (int)cudaErrorInvalidValue;
}

/* Launch graph_exec `steps` times on `stream`, then wait for the stream once. */
DDPM_EXPORT int ddpm_graph_replay(void *graph_exec, void *stream, int steps, char *err, int errlen) {
    if (err != NULL && errlen > 0) err[0] = '\0';
    if (graph_exec == NULL) return bad_arg(err, errlen, "ddpm_graph_replay: graph_exec is NULL");
    if (steps < 0) return bad_arg(err, errlen, "ddpm_graph_replay: steps must be >= 0");
    cudaGraphExec_t exec = (cudaGraphExec_t)graph_exec;
    cudaStream_t s = (cudaStream_t)stream;
    for (int k = 0; k < steps; ++k) {
        CHECK(cudaGraphLaunch(exec, s));
    }
    CHECK(cudaStreamSynchronize(s));
    return 0;
}

/* The CUDA runtime version this library runs against (e.g. 13000 for 13.0). Needs no device. */
DDPM_EXPORT int ddpm_driver_version(int *runtime_version, char *err, int errlen) {
    if (err != NULL && errlen > 0) err[0] = '\0';
    if (runtime_version == NULL) return bad_arg(err, errlen, "ddpm_driver_version: NULL output pointer");
    CHECK(cudaRuntimeGetVersion(runtime_version));
    return 0;
}

/* Number of CUDA devices; on a machine without a GPU or driver this returns CUDA's error code
 * (cudaErrorNoDevice, cudaErrorInsufficientDriver, ...) with its message, and *n = 0. */
DDPM_EXPORT int ddpm_device_count(int *n, char *err, int errlen) {
    if (err != NULL && errlen > 0) err[0] = '\0';
    if (n == NULL) return bad_arg(err, errlen, "ddpm_device_count: NULL output pointer");
    *n = 0;
    CHECK(cudaGetDeviceCount(n));
    return 0;
}
