/* c_loop.c: the C replay loop (driver="c") for a captured CUDA graph (one reverse diffusion step).
 *
 * Python captures one step of the sampling loop in a torch.cuda.CUDAGraph and hands us the raw
 * cudaGraphExec_t and the cudaStream_t it should run on; we launch it `steps` times back to back
 * and synchronise once, so the host cost per step is one cuGraphLaunch and no Python.
 *
 * Launches go through the CUDA DRIVER API, opened at run time with dlopen (libcuda.so.1, or the
 * path given to ddpm_driver_open): the library has no link-time CUDA dependency and needs no CUDA
 * headers, so it builds with any C compiler and loads whatever CUDA layout torch came with (a
 * pip-installed CUDA has libcudart.so.13 but no libcudart.so to link with -lcudart). The CUDA
 * runtime's handles are the driver's (cudaGraphExec_t is CUgraphExec, cudaStream_t is CUstream),
 * so torch's handles are passed through as they are.
 *
 * Every CUDA call is checked; on failure CUDA's error name and string go into err (errlen bytes,
 * always NUL-terminated) and the CUresult is returned (DDPM_NO_LIBCUDA: the driver library could
 * not be opened). Nothing here ever exits. Build: see engine/cuda/c_loop.py.
 */
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define DDPM_EXPORT __attribute__((visibility("default")))
#define DDPM_NO_LIBCUDA (-1)
#define DDPM_BAD_ARG 1 /* CUDA_ERROR_INVALID_VALUE */

typedef int CUresult; /* CUDA_SUCCESS == 0 */
typedef void *CUgraphExec;
typedef void *CUstream;
typedef void *CUcontext;

static struct {
    void *lib;
    CUresult (*init)(unsigned int);
    CUresult (*driver_get_version)(int *);
    CUresult (*device_get_count)(int *);
    CUresult (*graph_launch)(CUgraphExec, CUstream);
    CUresult (*stream_synchronize)(CUstream);
    CUresult (*stream_get_ctx)(CUstream, CUcontext *);
    CUresult (*ctx_get_current)(CUcontext *);
    CUresult (*ctx_push_current)(CUcontext);
    CUresult (*ctx_pop_current)(CUcontext *);
    CUresult (*get_error_name)(CUresult, const char **);
    CUresult (*get_error_string)(CUresult, const char **);
} cu;

static void clear_err(char *err, int errlen) {
    if (err != NULL && errlen > 0) err[0] = '\0';
}

static int fail(char *err, int errlen, int code, const char *msg) {
    if (err != NULL && errlen > 0) snprintf(err, (size_t)errlen, "%s", msg);
    return code;
}

static void set_err(char *err, int errlen, const char *what, CUresult code) {
    const char *name = NULL, *text = NULL;
    if (err == NULL || errlen <= 0) return;
    if (cu.get_error_name == NULL || cu.get_error_name(code, &name) != 0) name = NULL;
    if (cu.get_error_string == NULL || cu.get_error_string(code, &text) != 0) text = NULL;
    snprintf(err, (size_t)errlen, "%s failed: %s (%s, code %d)", what, text ? text : "unknown CUDA error",
             name ? name : "?", (int)code);
}

#define CHECK(name, call)                                    \
    do {                                                     \
        CUresult ddpm_rc_ = (call);                          \
        if (ddpm_rc_ != 0) {                                 \
            set_err(err, errlen, name, ddpm_rc_);            \
            return (int)ddpm_rc_;                            \
        }                                                    \
    } while (0)

#define RESOLVE(field, symbol)                                                                      \
    do {                                                                                            \
        *(void **)(&cu.field) = dlsym(lib, symbol);                                                 \
        if (cu.field == NULL) {                                                                     \
            if (err != NULL && errlen > 0)                                                          \
                snprintf(err, (size_t)errlen, "%s has no %s (a CUDA driver that is too old?)", path, symbol); \
            memset(&cu, 0, sizeof(cu));                                                             \
            dlclose(lib);                                                                           \
            return DDPM_NO_LIBCUDA;                                                                 \
        }                                                                                           \
    } while (0)

/* Open the CUDA driver library (path, or "libcuda.so.1" if NULL) once; later calls are no-ops. */
DDPM_EXPORT int ddpm_driver_open(const char *path, char *err, int errlen) {
    clear_err(err, errlen);
    if (cu.lib != NULL) return 0;
    if (path == NULL || path[0] == '\0') path = "libcuda.so.1";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        const char *why = dlerror();
        if (err != NULL && errlen > 0)
            snprintf(err, (size_t)errlen, "cannot open the CUDA driver library %s: %s (no NVIDIA driver here?)",
                     path, why ? why : "unknown dlopen error");
        return DDPM_NO_LIBCUDA;
    }
    RESOLVE(init, "cuInit");
    RESOLVE(driver_get_version, "cuDriverGetVersion");
    RESOLVE(device_get_count, "cuDeviceGetCount");
    RESOLVE(graph_launch, "cuGraphLaunch");
    RESOLVE(stream_synchronize, "cuStreamSynchronize");
    RESOLVE(stream_get_ctx, "cuStreamGetCtx");
    RESOLVE(ctx_get_current, "cuCtxGetCurrent");
    RESOLVE(ctx_push_current, "cuCtxPushCurrent_v2");
    RESOLVE(ctx_pop_current, "cuCtxPopCurrent_v2");
    RESOLVE(get_error_name, "cuGetErrorName");
    RESOLVE(get_error_string, "cuGetErrorString");
    cu.lib = lib;
    return 0;
}

static int launch_loop(CUgraphExec exec, CUstream s, int steps, char *err, int errlen) {
    for (int k = 0; k < steps; ++k) {
        CHECK("cuGraphLaunch", cu.graph_launch(exec, s));
    }
    CHECK("cuStreamSynchronize", cu.stream_synchronize(s));
    return 0;
}

/* Launch graph_exec `steps` times on `stream`, then wait for the stream once. The calling thread
 * needs the stream's context current; if it has none (a thread that never touched CUDA), the
 * stream's context is pushed for the call and popped after. */
DDPM_EXPORT int ddpm_graph_replay(void *graph_exec, void *stream, int steps, char *err, int errlen) {
    clear_err(err, errlen);
    if (cu.lib == NULL) return fail(err, errlen, DDPM_NO_LIBCUDA, "ddpm_graph_replay: call ddpm_driver_open first");
    if (graph_exec == NULL) return fail(err, errlen, DDPM_BAD_ARG, "ddpm_graph_replay: graph_exec is NULL");
    if (steps < 0) return fail(err, errlen, DDPM_BAD_ARG, "ddpm_graph_replay: steps must be >= 0");
    CUcontext current = NULL, ctx = NULL;
    CHECK("cuCtxGetCurrent", cu.ctx_get_current(&current));
    if (current != NULL || stream == NULL) return launch_loop(graph_exec, stream, steps, err, errlen);
    CHECK("cuStreamGetCtx", cu.stream_get_ctx(stream, &ctx));
    CHECK("cuCtxPushCurrent", cu.ctx_push_current(ctx));
    int rc = launch_loop(graph_exec, stream, steps, err, errlen);
    CUcontext popped = NULL;
    CUresult pop = cu.ctx_pop_current(&popped);
    if (rc == 0 && pop != 0) {
        set_err(err, errlen, "cuCtxPopCurrent", pop);
        return (int)pop;
    }
    return rc;
}

/* The version of the installed CUDA driver (e.g. 13000 for 13.0): cuDriverGetVersion, no device needed. */
DDPM_EXPORT int ddpm_driver_version(int *version, char *err, int errlen) {
    clear_err(err, errlen);
    if (cu.lib == NULL) return fail(err, errlen, DDPM_NO_LIBCUDA, "ddpm_driver_version: call ddpm_driver_open first");
    if (version == NULL) return fail(err, errlen, DDPM_BAD_ARG, "ddpm_driver_version: NULL output pointer");
    *version = 0;
    CHECK("cuDriverGetVersion", cu.driver_get_version(version));
    return 0;
}

/* Number of CUDA devices; with a driver but no GPU this returns CUDA's error (CUDA_ERROR_NO_DEVICE,
 * ...) with its message, and *n = 0. */
DDPM_EXPORT int ddpm_device_count(int *n, char *err, int errlen) {
    clear_err(err, errlen);
    if (cu.lib == NULL) return fail(err, errlen, DDPM_NO_LIBCUDA, "ddpm_device_count: call ddpm_driver_open first");
    if (n == NULL) return fail(err, errlen, DDPM_BAD_ARG, "ddpm_device_count: NULL output pointer");
    *n = 0;
    CHECK("cuInit", cu.init(0));
    CHECK("cuDeviceGetCount", cu.device_get_count(n));
    return 0;
}
