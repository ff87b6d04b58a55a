"""The fused Triton step against the torch reference step. On the CPU (Triton's interpreter) a smoke
bench; on CUDA the kernel's bytes/s (3 * N * itemsize) against a device copy of as many bytes."""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from ddpm_engine.noise import seed_words  # noqa: E402
from ddpm_engine.samplers import Prediction, Variance  # noqa: E402
from ddpm_engine.schedules import Tables, make_betas  # noqa: E402
from ddpm_engine.stepping import Rows, StepSpec, TorchStep  # noqa: E402

SPECS = {"ddpm": StepSpec("ddpm", Prediction.EPSILON, Variance.FIXED_SMALL, True, 0.0),
         "ddim-eta1": StepSpec("ddim", Prediction.EPSILON, Variance.FIXED_SMALL, True, 1.0)}
GPU_SHAPES = [(1, (3, 32, 32)), (64, (3, 32, 32)), (256, (3, 32, 32)), (16, (3, 256, 256))]


def make_step(impl, sampler, batch, shape, device):
    """(step(), x): one step of ``impl`` on fresh inputs, and its x_t."""
    tab = Tables.build(make_betas("linear", 1000), 1000).on(device)
    x = torch.randn(batch, *shape, device=device)
    out, words = torch.randn_like(x), seed_words([random.getrandbits(64) for _ in range(batch)], device)
    rows = Rows(x, torch.full((batch,), 999, dtype=torch.int64, device=device), words)
    if impl == "torch":
        step = TorchStep(SPECS[sampler], tab, shape)
    else:
        from ddpm_engine.kernels import TritonStep

        step = TritonStep(SPECS[sampler], tab, shape)
    return lambda: step(rows, out), x


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("sampler", list(SPECS))
def test_step_cpu(benchmark, impl, sampler):
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (not set when CUDA is present)")
    step, _ = make_step(impl, sampler, 4, (1, 16, 16), "cpu")
    benchmark.group = f"{sampler} step cpu batch 4 (1, 16, 16)"
    benchmark.extra_info["device"] = "cpu (Triton interpreter)" if impl == "triton" else "cpu"
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)


def cuda_seconds(fn, repeats=50):
    """Mean seconds per call of ``fn`` over ``repeats`` back-to-back calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("sampler", list(SPECS))
@pytest.mark.parametrize("batch,shape", GPU_SHAPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_cuda(benchmark, impl, sampler, batch, shape):
    step, x = make_step(impl, sampler, batch, shape, "cuda")
    benchmark.group = f"{sampler} step cuda batch {batch} {shape}"
    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3, iterations=1)
    step_s, nbytes = cuda_seconds(step), 3 * x.numel() * x.element_size()  # the fused kernel's traffic
    src = torch.randn(nbytes // 2 // 4, device="cuda")  # a copy reads and writes: 2 * src bytes = nbytes
    dst = torch.empty_like(src)
    copy_s = cuda_seconds(lambda: dst.copy_(src))
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), bytes_per_step=nbytes, seconds_per_step=step_s,
        gb_per_s=nbytes / step_s / 1e9, copy_gb_per_s=nbytes / copy_s / 1e9, fraction_of_copy=copy_s / step_s)
