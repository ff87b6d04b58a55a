"""The fused Triton step against the torch reference step (TorchStep), per step.

    python -m pytest bench/test_bench_step.py --benchmark-only -q

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1), one program at a time in
Python: those timings say nothing about GPU speed and are here so the suite runs everywhere. On a
GPU the cases report achieved bytes/s from the kernel's traffic (read x and the model output,
write x_prev: 3 * N * 4 bytes in fp32) against a device-to-device copy of the same bytes.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.noise import seed_words  # noqa: E402
from engine.samplers import Prediction, Variance  # noqa: E402
from engine.schedules import Tables, make_betas  # noqa: E402
from engine.stepping import StepSpec, TorchStep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter is slow: small shapes on the CPU, the CIFAR and larger batches on a GPU
SHAPES = {"cpu": [(4, (1, 16, 16))], "cuda": [(1, (3, 32, 32)), (64, (3, 32, 32)), (256, (3, 32, 32))]}[DEVICE]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_inputs(batch, shape):
    tab = Tables.build(make_betas("linear", 1000), 1000).on(DEVICE)
    x = torch.randn(batch, *shape, device=DEVICE)
    out = torch.randn_like(x)
    words = seed_words([random.getrandbits(64) for _ in range(batch)], DEVICE)
    return tab, x, out, words


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("batch,shape", SHAPES)
def test_ddpm_step(benchmark, impl, batch, shape):
    from kernels import TritonStep

    tab, x, out, words = make_inputs(batch, shape)
    spec = StepSpec("ddpm", Prediction.EPSILON, Variance.FIXED_SMALL, True, 0.0)
    step = TorchStep(spec, tab, shape) if impl == "torch" else TritonStep(spec, tab, shape)
    i = torch.full((batch,), 999, device=DEVICE)

    def run():
        i.fill_(999)
        step(x, out, i, words)
        sync()

    benchmark.group = f"ddpm step {DEVICE} batch {batch} {shape}"
    benchmark.pedantic(run, rounds=20 if DEVICE == "cuda" else 3, warmup_rounds=2, iterations=1)
    nbytes = 3 * x.numel() * x.element_size()
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)",
                                bytes_moved=nbytes, gb_per_s=nbytes / benchmark.stats.stats.median / 1e9)
    if DEVICE == "cuda":
        dst = torch.empty(3 * x.numel(), device=DEVICE)
        src = torch.randn_like(dst)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            dst.copy_(src)
        end.record()
        sync()
        copy_s = start.elapsed_time(end) / 20 / 1e3
        benchmark.extra_info["copy_gb_per_s"] = 2 * dst.numel() * 4 / copy_s / 1e9  # read + write
