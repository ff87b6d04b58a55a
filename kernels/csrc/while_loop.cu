/* while_loop.cu: the whole reverse chain as ONE graph launch, with a conditional WHILE node.
 *
 * Python captures one reverse step in a torch.cuda.CUDAGraph(keep_graph=True) and hands us its
 * cudaGraph_t. We build an outer graph:
 *
 *     init kernel (remaining = steps; condition = steps > 0)
 *       -> WHILE(condition) { step graph (child node, cloned)  ->  tick kernel (--remaining; condition = remaining > 0) }
 *
 * and instantiate it once. A run sets `steps` in the init node's parameters (host-side, no copy),
 * launches the outer graph once and synchronises once: the host cost of a run is O(1), not
 * O(steps). Needs conditional graph nodes (CUDA >= 12.4 here; driver >= 12.4 at run time); with an
 * older toolkit the functions return cudaErrorNotSupported with a message.
 *
 * Every CUDA call is checked; on failure the message goes into err (errlen bytes, NUL-terminated)
 * and the cudaError_t is returned. Nothing here exits. Built with nvcc by engine/cuda/graph_loop.py.
 * UNVERIFIED on a GPU: this project's CI machine has nvcc but no GPU; it builds and loads there.
 */
#include <stdio.h>
#include <stdlib.h>
#include <cuda_runtime.h>

#define DDPM_EXPORT extern "C" __attribute__((visibility("default")))

static void set_err(char *err, int errlen, const char *what, cudaError_t code) {
    if (err == NULL || errlen <= 0) return;
    snprintf(err, (size_t)errlen, "%s failed: %s (%s, code %d)", what, cudaGetErrorString(code),
             cudaGetErrorName(code), (int)code);
}

static int fail(char *err, int errlen, int code, const char *msg) {
    if (err != NULL && errlen > 0) snprintf(err, (size_t)errlen, "%s", msg);
    return code;
}

#define CHECK(call)                                          \
    do {                                                     \
        cudaError_t ddpm_rc_ = (call);                       \
        if (ddpm_rc_ != cudaSuccess) {                       \
            set_err(err, errlen, #call, ddpm_rc_);           \
            return (int)ddpm_rc_;                            \
        }                                                    \
    } while (0)

DDPM_EXPORT int ddpm_loop_supported(void) {
#if CUDART_VERSION >= 12040
    return 1;
#else
    return 0;
#endif
}

#if CUDART_VERSION >= 12040

__global__ void ddpm_loop_init(cudaGraphConditionalHandle cond, int *remaining, int steps) {
    *remaining = steps;
    cudaGraphSetConditional(cond, steps > 0 ? 1u : 0u);
}

__global__ void ddpm_loop_tick(cudaGraphConditionalHandle cond, int *remaining) {
    int left = *remaining - 1;
    *remaining = left;
    cudaGraphSetConditional(cond, left > 0 ? 1u : 0u);
}

typedef struct {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaGraphNode_t init_node;
    cudaGraphConditionalHandle cond;
    int *remaining; /* device counter */
    int steps;      /* the value now in init_node's parameters */
} ddpm_loop;

static cudaKernelNodeParams init_params(ddpm_loop *loop, void **args) {
    cudaKernelNodeParams p = {0};
    args[0] = &loop->cond;
    args[1] = &loop->remaining;
    args[2] = &loop->steps;
    p.func = (void *)ddpm_loop_init;
    p.gridDim = dim3(1, 1, 1);
    p.blockDim = dim3(1, 1, 1);
    p.kernelParams = args;
    return p;
}

static int build(ddpm_loop *loop, cudaGraph_t step_graph, char *err, int errlen) {
    CHECK(cudaMalloc((void **)&loop->remaining, sizeof(int)));
    CHECK(cudaGraphCreate(&loop->graph, 0));
    CHECK(cudaGraphConditionalHandleCreate(&loop->cond, loop->graph, 0, 0));

    void *iargs[3];
    cudaKernelNodeParams ip = init_params(loop, iargs);
    CHECK(cudaGraphAddKernelNode(&loop->init_node, loop->graph, NULL, 0, &ip));

    cudaGraphNodeParams wp = {};
    wp.type = cudaGraphNodeTypeConditional;
    wp.conditional.handle = loop->cond;
    wp.conditional.type = cudaGraphCondTypeWhile;
    wp.conditional.size = 1;
    cudaGraphNode_t while_node;
#if CUDART_VERSION >= 13000 /* 13.0: cudaGraphAddNode takes edge data (NULL: default edges) */
    CHECK(cudaGraphAddNode(&while_node, loop->graph, &loop->init_node, NULL, 1, &wp));
#else
    CHECK(cudaGraphAddNode(&while_node, loop->graph, &loop->init_node, 1, &wp));
#endif
    cudaGraph_t body = wp.conditional.phGraph_out[0]; /* owned by the conditional node */

    cudaGraphNode_t step_node, tick_node;
    CHECK(cudaGraphAddChildGraphNode(&step_node, body, NULL, 0, step_graph)); /* clones step_graph */
    void *targs[2] = {&loop->cond, &loop->remaining};
    cudaKernelNodeParams tp = {0};
    tp.func = (void *)ddpm_loop_tick;
    tp.gridDim = dim3(1, 1, 1);
    tp.blockDim = dim3(1, 1, 1);
    tp.kernelParams = targs;
    CHECK(cudaGraphAddKernelNode(&tick_node, body, &step_node, 1, &tp));
    CHECK(cudaGraphInstantiate(&loop->exec, loop->graph, 0));
    return 0;
}

/* Build the looping graph around step_graph (a cudaGraph_t; it is cloned, the caller keeps it). */
DDPM_EXPORT int ddpm_loop_create(void *step_graph, void **loop_out, char *err, int errlen) {
    if (err != NULL && errlen > 0) err[0] = '\0';
    if (loop_out == NULL) return fail(err, errlen, (int)cudaErrorInvalidValue, "ddpm_loop_create: NULL loop_out");
    *loop_out = NULL;
    if (step_graph == NULL) return fail(err, errlen, (int)cudaErrorInvalidValue, "ddpm_loop_create: step_graph is NULL");
    ddpm_loop *loop = (ddpm_loop *)calloc(1, sizeof(ddpm_loop));
    if (loop == NULL) return fail(err, errlen, (int)cudaErrorMemoryAllocation, "ddpm_loop_create: out of host memory");
    int rc = build(loop, (cudaGraph_t)step_graph, err, errlen);
    if (rc != 0) { /* free what was made; keep the first error's message */
        if (loop->exec) cudaGraphExecDestroy(loop->exec);
        if (loop->graph) cudaGraphDestroy(loop->graph);
        if (loop->remaining) cudaFree(loop->remaining);
        free(loop);
        return rc;
    }
    *loop_out = loop;
    return 0;
}

/* Run `steps` reverse steps with one graph launch on `stream`, then wait for the stream once. */
DDPM_EXPORT int ddpm_loop_run(void *handle, void *stream, int steps, char *err, int errlen) {
    if (err != NULL && errlen > 0) err[0] = '\0';
    ddpm_loop *loop = (ddpm_loop *)handle;
    if (loop == NULL) return fail(err, errlen, (int)cudaErrorInvalidValue, "ddpm_loop_run: loop is NULL");
    if (steps < 0) return fail(err, errlen, (int)cudaErrorInvalidValue, "ddpm_loop_run: steps must be >= 0");
    cudaStream_t s = (cudaStream_t)stream;
    if (steps != loop->steps) {
        loop->steps = steps;
        void *iargs[3];
        cudaKernelNodeParams ip = init_params(loop, iargs);
        CHECK(cudaGraphExecKernelNodeSetParams(loop->exec, loop->init_node, &ip));
    }
    CHECK(cudaGraphLaunch(loop->exec, s));
    CHECK(cudaStreamSynchronize(s));
    return 0;
}

DDPM_EXPORT int ddpm_loop_destroy(void *handle, char *err, int errlen) {
    if (err != NULL && errlen > 0) err[0] = '\0';
    ddpm_loop *loop = (ddpm_loop *)handle;
    if (loop == NULL) return 0;
    cudaError_t a = loop->exec ? cudaGraphExecDestroy(loop->exec) : cudaSuccess;
    cudaError_t b = loop->graph ? cudaGraphDestroy(loop->graph) : cudaSuccess;
    cudaError_t c = loop->remaining ? cudaFree(loop->remaining) : cudaSuccess;
    free(loop);
    CHECK(a);
    CHECK(b);
    CHECK(c);
    return 0;
}

#else /* CUDART_VERSION < 12040: no conditional nodes */

DDPM_EXPORT int ddpm_loop_create(void *step_graph, void **loop_out, char *err, int errlen) {
    if (loop_out != NULL) *loop_out = NULL;
    return fail(err, errlen, (int)cudaErrorNotSupported,
                "the one-launch graph loop needs CUDA >= 12.4 (conditional WHILE nodes); this build has an older one");
}
DDPM_EXPORT int ddpm_loop_run(void *handle, void *stream, int steps, char *err, int errlen) {
    return fail(err, errlen, (int)cudaErrorNotSupported, "the one-launch graph loop needs CUDA >= 12.4");
}
DDPM_EXPORT int ddpm_loop_destroy(void *handle, char *err, int errlen) { return 0; }

#endif
