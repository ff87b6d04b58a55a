"""Measuring on a CUDA device (or the CPU), shared by the GPU bench (bench/gpu_check.py) and the GPU
tests (tests/gpu): the math flags of a bench precision, synchronised timing, parity metrics,
the largest batch that fits, and the host's cost per step of each driver. Measuring is the
bench's job: none of this is in the library."""

from __future__ import annotations

import contextlib
import gc
import math
import time

import torch

from ddpm_engine.backends import PRECISIONS
from ddpm_engine.cuda.graphs import DRIVERS as GRAPH_DRIVERS

MODES = (*PRECISIONS, "tf32")  # the bench's precisions: tf32 is an fp32 engine with TF32 math on
TF32_BACKENDS = ("torch", "aoti")  # the backends torch's TF32 flags reach (Inductor included)
PARITY_TIMESTEPS = (999, 500, 100, 10, 0)


def cifar_loaded(seed: int = 0):
    """The DDPM CIFAR-10 UNet (diffusers UNet2DModel, 35.7 M params) with random weights: latency
    does not depend on them."""
    from ddpm_engine.checkpoints import from_module
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, cifar10_unet

    return from_module(cifar10_unet(seed=seed), CIFAR10_SCHEDULER_CONFIG, (3, 32, 32), "cifar10")


def make_engine(loaded, backend: str, precision: str, device="cuda", batching: bool = True):
    """An Engine for ``loaded`` at an engine precision (``engine_precision(mode)`` for a bench one).
    Engines can share one LoadedModel: every backend works on its own copy of the module."""
    from ddpm_engine import Engine

    return Engine(loaded, backend=backend, device=device, precision=precision, batching=batching)


def engine_precision(mode: str) -> str:
    return "fp32" if mode == "tf32" else mode


@contextlib.contextmanager
def torch_flags(matmul_tf32: bool, cudnn_tf32: bool, cudnn_deterministic=None, cudnn_benchmark=None):
    """Set torch's TF32 flags (and, when given, cuDNN's deterministic/benchmark flags) while inside."""
    flags = [((torch.backends.cuda.matmul, "allow_tf32"), matmul_tf32), ((torch.backends.cudnn, "allow_tf32"), cudnn_tf32),
             ((torch.backends.cudnn, "deterministic"), cudnn_deterministic), ((torch.backends.cudnn, "benchmark"), cudnn_benchmark)]
    flags = [(where, value) for where, value in flags if value is not None]
    old = [getattr(obj, name) for (obj, name), _ in flags]
    for (obj, name), value in flags:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for ((obj, name), _), value in zip(flags, old):
            setattr(obj, name, value)


def exact_fp32():
    """fp32 means fp32 and a run repeats exactly: no TF32 in matmuls or cuDNN, and cuDNN picks
    deterministic algorithms without autotuning, so runs compared across batch sizes, drivers and
    repeats differ only by real differences."""
    return torch_flags(False, False, cudnn_deterministic=True, cudnn_benchmark=False)


def math_mode(mode: str):
    """TF32 in matmuls and cuDNN on for "tf32", off for the others, while inside. Build the engine,
    capture its graphs and time it inside: a graph replays the kernels of its capture."""
    if mode not in MODES:
        raise ValueError(f"unknown bench precision {mode!r}; choose one of {MODES}")
    return torch_flags(mode == "tf32", mode == "tf32")


def sync(device="cuda"):
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sync_time(fn, reps: int = 3, warm: bool = True, device="cuda") -> float:
    """Median wall seconds of fn() with a device sync after each call (one untimed call first
    unless ``warm=False``)."""
    if warm:
        fn()
        sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def free(device="cuda"):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's allocator ran out (torch's OutOfMemoryError, or cuBLAS/cuDNN failing to allocate)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("out of memory", "ALLOC_FAILED"))


@torch.inference_mode()
def eps_rel_err(backend, reference, sample_shape, device, batch: int = 4, seed: int = 0) -> float:
    """Worst over PARITY_TIMESTEPS of max |backend - reference| / max |reference| (model outputs)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for t0 in PARITY_TIMESTEPS:
        x = torch.randn(batch, *sample_shape, generator=g).to(device)
        t = torch.full((batch,), t0, dtype=torch.int64, device=device)
        ref = reference(x, t).float()
        worst = max(worst, ((backend(x, t).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    return worst


def image_diff(images, reference) -> dict:
    """max abs difference and PSNR (peak-to-peak 2 for [-1, 1] images) of two image batches."""
    diff = images.float() - reference.float()
    mse = diff.pow(2).mean().item()
    return {"image_max_abs": diff.abs().max().item(), "psnr_db": math.inf if mse == 0 else 10 * math.log10(4.0 / mse),
            "finite": bool(torch.isfinite(images).all().item())}


def flops_per_image_step(loaded) -> float:
    """The model's FLOPs for one image and one step (torch.utils.flop_counter: a multiply-add
    counts 2; attention through the math SDPA path)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(loaded.module.parameters()).device
    x, t = torch.randn(1, *loaded.sample_shape, device=device), torch.tensor([500], device=device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loaded.module(x, t)
    return float(counter.get_total_flops())


def matmul_peak_tflops(device="cuda", n: int = 8192, iters: int = 50) -> float:
    """Measured bf16 n^3 matmul rate (TFLOP/s), the roofline's denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def matmuls():
        for _ in range(iters):
            a @ b

    return 2 * n ** 3 * iters / sync_time(matmuls, reps=3, device=device) / 1e12


@contextlib.contextmanager
def built(loaded, backend: str, mode: str, device, batching: bool = True):
    """An engine at bench precision ``mode``, built and used under its math flags, closed and its
    memory freed after."""
    with math_mode(mode):
        eng = make_engine(loaded, backend, engine_precision(mode), device, batching)
        try:
            yield eng
        finally:
            eng.close()
            free(device)


def graphs_refusal(eng) -> str | None:
    """None if the graph drivers can run this engine (``plan.graphable``), else why not."""
    if eng.plan().graphable:
        return None
    if eng.device.type != "cuda":
        return "the graph drivers need CUDA"
    return f"the {eng.backend.name} backend cannot be captured: {eng.backend.graph_capture_refusal}"


def graphed_sampler(eng, sampler, steps, batch):
    """A GraphedSampler for one request setting up to ``batch``, its bucket captured now (not
    cached by the engine: dropping it frees its graph memory)."""
    from ddpm_engine.cuda.graphs import GraphedSampler

    return GraphedSampler(eng.plan(sampler, steps), max_batch=batch).warm([batch])


def time_drivers(eng, sampler, steps, batch, drivers, reps=3, warm=True, notes=None, log=print) -> dict:
    """{driver (the engine's names): median seconds of one request}. The graph drivers replay one
    sampler captured before the timing; a driver that fails (out of memory included) adds a note
    and is left out."""
    seeds, out, graphed = list(range(1, batch + 1)), {}, None
    for driver in drivers:
        out_of_memory = False
        try:
            if driver in GRAPH_DRIVERS:
                graphed = graphed or graphed_sampler(eng, sampler, steps, batch)
                run = lambda d=driver: graphed.run(seeds, driver=d)  # noqa: E731
            else:
                run = lambda d=driver: eng.sample(seeds, sampler=sampler, steps=steps, driver=d)  # noqa: E731
            out[driver] = sync_time(run, reps=reps, warm=warm, device=eng.device)
        except Exception as exc:  # one driver failing must not drop the others
            msg = f"{driver} {sampler}-{steps} batch {batch} failed: {type(exc).__name__}: {exc}"
            log(msg)
            if notes is not None:
                notes.append(msg)
            out_of_memory = is_out_of_memory(exc)
        if out_of_memory:  # here, not in the except clause: the traceback's frames hold the tensors
            graphed = None
            free(eng.device)
    return out


def largest_batch(eng, start: int, cap: int) -> tuple[int, str]:
    """The largest batch start * 2^k (or start / 2^k if start does not fit) that runs one eager
    DDPM step of ``eng``, at most min(cap, eng.max_batch), and why the next doubling was not
    taken. Any error counts as not fitting, with the error in the reason."""
    from ddpm_engine.plan import reverse_step

    plan, limit = eng.plan("ddpm"), min(cap, eng.max_batch)

    def fails(b: int) -> str | None:
        why = None
        try:
            with torch.inference_mode():
                reverse_step(plan, plan.start(list(range(1, b + 1))))
            sync(eng.device)
        except Exception as exc:
            why = "out of memory" if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"
        free(eng.device)  # after the except clause: its traceback, holding the tensors, is gone
        return why

    b, failed = min(start, limit), None
    while (why := fails(b)) is not None:
        if b == 1:
            raise RuntimeError(f"one image does not run: {why}")
        failed, b = why, b // 2
    if failed is not None:
        return b, f"{failed} at {2 * b}"
    while 2 * b <= limit:
        if (why := fails(2 * b)) is not None:
            return b, f"{why} at {2 * b}"
        b *= 2
    return b, f"the cap: at most {limit} (min of the bench's cap {cap} and the engine's max_batch {eng.max_batch})"


def host_us_per_step(graphed, seeds, driver: str = "python", reps: int = 5) -> dict:
    """Wall µs per step of ``graphed.run(seeds, driver)`` (median over ``reps`` after one warm run);
    for ``driver="python"`` also the host-only time to enqueue the steps (one
    ``graphed.bucket(len(seeds)).graph.replay()`` per step, no sync)."""
    seeds = list(seeds)
    graphed.run(seeds, driver)
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        graphed.run(seeds, driver)
        walls.append(time.perf_counter() - t0)
    steps = graphed.steps
    res = {"driver": driver, "steps": steps, "batch": len(seeds), "wall_us_per_step": 1e6 * sorted(walls)[reps // 2] / steps}
    if driver == "python":
        graph = graphed.bucket(len(seeds)).graph
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        res["enqueue_us_per_step"] = 1e6 * (time.perf_counter() - t0) / steps
        torch.cuda.synchronize()
    return res
