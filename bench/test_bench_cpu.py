"""CPU bench: per-step latency of each backend, and CIFAR-10 sampling, engine vs diffusers.

    python -m pytest bench/test_bench_cpu.py --benchmark-only -q [--benchmark-json out.json]

1. One UNet call (x_t, t) -> eps through the torch and onnxruntime backends, at batch 1 and 4,
   for the digits-like SeedUNet(1, (32, 64, 128)) at 16x16 and the DDPM CIFAR-10 UNet at 32x32.
2. The CIFAR-10 UNet sampled end to end, 10 DDPM steps at batch 1, through Engine(backend="auto")
   and through diffusers' DDPMPipeline with the same UNet weights. The two are timed in
   alternation (fair on a shared machine); the medians and their ratio are in the benchmark's
   extra_info ("speedup_auto_vs_ddpm_pipeline", target >= 1.5) and printed.
Warm-up runs are excluded everywhere.
"""

import random
import statistics
import time

import pytest
import torch

from ddpm_engine import Engine, backends

STEP_ROUNDS = {"digits16": 100, "cifar32": 8}
E2E_STEPS = 10
E2E_ROUNDS = 4


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("model", ["digits16", "cifar32"])
def test_step_latency(benchmark, request, model, backend, batch):
    loaded = request.getfixturevalue(model)
    run = backends.create(backend, loaded, "cpu")
    x = torch.randn(batch, *loaded.sample_shape)
    t = torch.randint(0, loaded.scheduler.num_train_timesteps, (batch,))
    benchmark.group = f"step {model} batch {batch}"
    benchmark.extra_info.update(model=model, backend=backend, batch=batch, threads=torch.get_num_threads())

    def step():
        with torch.inference_mode():
            return run(x, t)

    benchmark.pedantic(step, rounds=STEP_ROUNDS[model], warmup_rounds=3, iterations=1)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_cifar10_sampling_engine_auto_vs_ddpm_pipeline(benchmark, cifar32):
    diffusers = pytest.importorskip("diffusers")
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG

    engine = Engine(cifar32, backend="auto", device="cpu")
    pipeline = diffusers.DDPMPipeline(unet=cifar32.module.unet,
                                      scheduler=diffusers.DDPMScheduler.from_config(CIFAR10_SCHEDULER_CONFIG))
    pipeline.set_progress_bar_config(disable=True)

    def run_auto():
        return engine.sample([random.getrandbits(64)], sampler="ddpm", steps=E2E_STEPS)

    def run_pipeline():
        generator = torch.Generator().manual_seed(random.getrandbits(63))
        return pipeline(batch_size=1, num_inference_steps=E2E_STEPS, generator=generator, output_type="np")

    run_auto(), run_pipeline()  # warm-up
    auto_s, pipeline_s = [], []
    for _ in range(E2E_ROUNDS):
        auto_s.append(timed(run_auto))
        pipeline_s.append(timed(run_pipeline))
    auto, pipe = statistics.median(auto_s), statistics.median(pipeline_s)
    benchmark.group = f"cifar32 sampling, {E2E_STEPS} DDPM steps, batch 1"
    benchmark.extra_info.update(backend=engine.backend.name, engine_auto_median_s=round(auto, 4),
                                ddpm_pipeline_median_s=round(pipe, 4), speedup_auto_vs_ddpm_pipeline=round(pipe / auto, 3))
    print(f"\nCIFAR-10 UNet, {E2E_STEPS} steps, batch 1: engine auto ({engine.backend.name}) {auto:.3f} s, "
          f"DDPMPipeline {pipe:.3f} s, speedup {pipe / auto:.2f}x")
    benchmark.pedantic(run_auto, rounds=E2E_ROUNDS, warmup_rounds=0, iterations=1)
