"""CPU bench: what a learned variance and class labels cost (issue 30: within 5% of an unconditional
model). One UNet architecture (the DDPM CIFAR-10 UNet's blocks, random weights; ``BENCH_KIND_MODEL``:
"small", the default, with a quarter of its channels, where the engine's own share of the time is
largest, or "cifar", the full model) unconditional, with a learned variance (2C output channels,
``learned_range``), class-conditional (``num_class_embeds``) and both; one UNet call
(``test_model_kinds_call``) and DDPM end to end at a few steps (``test_model_kinds_sampling``), the
kinds in alternating rounds, medians, each kind's ratio to the unconditional model. What the model
itself adds is counted apart (FLOPs per image and step)."""

import os
import random
import statistics
import time

import pytest
import torch

from ddpm_engine import Engine, cpu
from ddpm_engine.checkpoints import from_module
from ddpm_engine.threads import yield_cpu_to

ROUNDS = int(os.environ.get("BENCH_KIND_ROUNDS", "9"))
STEPS = 5
SIZES = {"small": {"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8}, "cifar": {}}
SIZE = os.environ.get("BENCH_KIND_MODEL", "small")
BACKENDS = ("torch", "openvino")
KINDS = {"unconditional": {}, "learned variance": {"out_channels": 6}, "class labels": {"num_class_embeds": 10},
         "learned variance + class labels": {"out_channels": 6, "num_class_embeds": 10}}


def kind_models(seed: int) -> dict:
    """{kind: LoadedModel}: one architecture, the same weights wherever the kinds share a layer."""
    pytest.importorskip("diffusers")
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, CIFAR10_UNET_CONFIG, diffusers_unet

    out = {}
    for kind, extra in KINDS.items():
        torch.manual_seed(seed)
        module = diffusers_unet({**CIFAR10_UNET_CONFIG, **SIZES[SIZE], **extra}).eval()
        variance = "learned_range" if extra.get("out_channels") == 6 else "fixed_small"
        out[kind] = from_module(module, {**CIFAR10_SCHEDULER_CONFIG, "variance_type": variance}, (3, 32, 32), kind)
    return out


def gflops(loaded, labels) -> float:
    """The model's GFLOP per image and step (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loaded.module(x, t, *[y[:1] for y in labels])
    return counter.get_total_flops() / 1e9


def alternate(runs: dict) -> tuple:
    """Medians of ``runs`` timed in ``ROUNDS`` alternating rounds after one untimed call each:
    ({name: wall seconds}, {name: the process's CPU seconds}). With the engine's one torch thread
    (the bench imports torch first: bench/conftest.py) CPU seconds are the work done, the figure
    that holds on a machine shared with other jobs; wall seconds add the waits for a core."""
    for run in runs.values():
        run()
    wall, cpu_s = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - t0)
            cpu_s[name].append(time.process_time() - c0)
    return ({n: statistics.median(v) for n, v in wall.items()}, {n: statistics.median(v) for n, v in cpu_s.items()})


def report(benchmark, what, timed, flops, backend, batch):
    wall, cpu_s = timed
    ratio = {kind: round(s / wall["unconditional"], 4) for kind, s in wall.items()}
    cpu_ratio = {kind: round(s / cpu_s["unconditional"], 4) for kind, s in cpu_s.items()}
    benchmark.extra_info.update(model=SIZE, backend=backend, batch=batch, rounds=ROUNDS,
                                wall_ratio=ratio, cpu_ratio=cpu_ratio,
                                median_wall_s={k: round(s, 5) for k, s in wall.items()},
                                median_cpu_s={k: round(s, 5) for k, s in cpu_s.items()},
                                gflop_per_image_step=flops, load=os.getloadavg())
    print(f"\n{what} ({SIZE} UNet), {backend} fp32, batch {batch}, median of {ROUNDS} alternating rounds, on "
          f"{cpu.describe()}, load {os.getloadavg()[0]:.1f}:")
    for kind in wall:
        print(f"  {kind:32s} wall {1e3 * wall[kind]:9.1f} ms x{ratio[kind]:.3f}   cpu {1e3 * cpu_s[kind]:9.1f} ms "
              f"x{cpu_ratio[kind]:.3f}   ({flops[kind]:.3f} GFLOP per image step)")


@pytest.fixture(scope="module")
def models():
    return kind_models(random.getrandbits(31))


@pytest.fixture(scope="module")
def built():
    return {}


def engines(models, built, backend):
    """{kind: Engine} on ``backend``, built once per module (the torch backend measures its layout)."""
    if backend not in built:
        built[backend] = {kind: Engine(loaded, backend=backend, device="cpu", precision="fp32", batching=False)
                          for kind, loaded in models.items()}
    return built[backend]


@torch.inference_mode()
def call(eng, inputs):
    with yield_cpu_to(eng.backend):
        return eng.backend(*inputs)


def labels_for(loaded, batch):
    return [[random.randrange(10) for _ in range(batch)]] if loaded.io.num_classes else []


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_kinds_call(benchmark, models, built, backend, batch):
    """One model call as the engine makes it (its thread policy: ``threads.yield_cpu_to``)."""
    engs = engines(models, built, backend)
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
    inputs = {kind: (x, t, *[torch.tensor(y) for y in labels_for(models[kind], batch)]) for kind in engs}
    runs = {kind: lambda e=eng, k=kind: call(e, inputs[k]) for kind, eng in engs.items()}
    timed = alternate(runs)
    flops = {kind: gflops(models[kind], inputs[kind][2:]) for kind in engs}
    benchmark.group = f"model kinds, one call, {backend} batch {batch}"
    report(benchmark, "One UNet call", timed, flops, backend, batch)
    benchmark.pedantic(runs["unconditional"], rounds=1, iterations=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_kinds_sampling(benchmark, models, built, backend, batch):
    engs = engines(models, built, backend)
    seeds = [random.getrandbits(64) for _ in range(batch)]
    runs = {kind: lambda e=eng, k=kind: e.sample(seeds, sampler="ddpm", steps=STEPS, driver="eager",
                                                 class_labels=(labels_for(models[k], batch) or [None])[0])
            for kind, eng in engs.items()}
    timed = alternate(runs)
    flops = {kind: gflops(models[kind], [torch.tensor(y) for y in labels_for(models[kind], 1)]) for kind in engs}
    benchmark.group = f"model kinds, DDPM-{STEPS} end to end, {backend} batch {batch}"
    report(benchmark, f"DDPM-{STEPS} end to end", timed, flops, backend, batch)
    benchmark.pedantic(runs["unconditional"], rounds=1, iterations=1)
