"""CPU bench: every backend x precision this CPU runs natively, against diffusers and torch.compile.

    python -m pytest bench/test_bench_cpu.py --benchmark-only -q -s [--benchmark-json out.json]

Records name the CPU (``cpu.describe``), torch's threads and the versions (``extra_info``).
``test_call``: one UNet call per engine config (the backends x precisions usable here, natively)
at batch 1 and 8, digits-like SeedUNet at 16x16 and the CIFAR-10 UNet at 32x32 (random weights).
``test_design_choices``: torch NCHW vs channels_last, OpenVINO with and without static shapes.
``test_sampling``: the CIFAR-10 UNet, 10 DDPM steps at batch 1 and 8: every engine config,
``backend="auto"`` at fp32 and bf16, DDPMPipeline fp32 and torch.compile at fp32 and bf16, timed
in alternating rounds; the medians and speed-ups go to ``extra_info`` and are printed. Warm-up
runs and torch.compile's compile are excluded.
"""

import os
import random
import statistics

import pytest
import torch

from bench.measure import sync_time
from ddpm_engine import Engine, backends, cpu, threads
from ddpm_engine.testing import versions

E2E_STEPS = 10
E2E_ROUNDS = int(os.environ.get("BENCH_E2E_ROUNDS", "2"))  # 1: a quicker look on a loaded machine
CALL_ROUNDS = {"digits16": 20, "cifar32": 3}
CPU_BACKENDS = ("torch", "onnxruntime", "openvino")  # aoti: minutes per compile; tensorrt: NVIDIA GPUs only
ENGINE_CONFIGS = [(b, p) for b in CPU_BACKENDS for p in backends.PRECISIONS
                  if cpu.native(p) and backends.available("cpu", p, [b])[b] is None]


def machine() -> dict:
    return {"cpu": cpu.describe(), "torch_threads": torch.get_num_threads(), "openmp_wait": threads.OPENMP_WAIT,
            "versions": versions()}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("config", ENGINE_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("model", ["digits16", "cifar32"])
def test_call(benchmark, request, model, config, batch):
    loaded = request.getfixturevalue(model)
    backend, precision = config
    run = backends.create(backend, loaded, "cpu", precision)
    x = torch.randn(batch, *loaded.sample_shape)
    t = torch.randint(0, loaded.scheduler.num_train_timesteps, (batch,))
    benchmark.group = f"call {model} batch {batch}"
    benchmark.extra_info.update(model=model, backend=backend, precision=precision, batch=batch, **machine())

    def call():
        with torch.inference_mode():
            return run(x, t)

    benchmark.pedantic(call, rounds=CALL_ROUNDS[model], warmup_rounds=2, iterations=1)


def test_design_choices(benchmark, cifar32, monkeypatch):
    """The two measured design choices, one UNet call side by side in alternating rounds: the
    torch backend's CPU layout (NCHW vs channels_last, which ``torch_backend.choose_layout``
    measures per model and CPU) and OpenVINO's static-shape compiles (vs the dynamic-batch blob
    alone), at each precision the CPU runs natively, batch 1 and 8."""
    from ddpm_engine.backends import openvino_backend
    from ddpm_engine.backends.timing import measure
    from ddpm_engine.backends.torch_backend import TorchBackend

    precisions = [p for p in backends.PRECISIONS if cpu.native(p)]
    built = {}
    for p in precisions:
        built[f"torch {p} NCHW"] = TorchBackend(cifar32.module, "cpu", p, channels_last=False)
        built[f"torch {p} channels_last"] = TorchBackend(cifar32.module, "cpu", p, channels_last=True)
    if backends.available("cpu", "fp32", ["openvino"])["openvino"] is None:
        for p in precisions:
            static = built[f"openvino {p} static shapes"] = backends.create("openvino", cifar32, "cpu", p)
            built[f"openvino {p} dynamic"] = openvino_backend.OpenVINOBackend(  # no compile_static: dynamic only
                static.path, openvino_backend.identity(cifar32, p), cifar32.sample_shape, p)
    with monkeypatch.context() as mp:
        mp.setattr("ddpm_engine.backends.timing.ROUNDS", CALL_ROUNDS["cifar32"] * 3)
        ms = measure(built, cifar32.sample_shape, cifar32.scheduler.num_train_timesteps)
    print(f"\nOne CIFAR-10 UNet call, ms, median of {CALL_ROUNDS['cifar32'] * 3} alternating rounds, on {cpu.describe()} "
          f"(OpenMP wait: {threads.OPENMP_WAIT}):")
    for name, by_batch in ms.items():
        print(f"  {name:32s} " + "   ".join(f"batch {b}: {v:8.1f}" for b, v in by_batch.items()))
    benchmark.group = "cifar32 design choices, one call"
    benchmark.extra_info.update(ms={n: {str(b): round(v, 2) for b, v in by_batch.items()} for n, by_batch in ms.items()},
                                rounds=CALL_ROUNDS["cifar32"] * 3, **machine())
    fastest = min(ms, key=lambda n: ms[n][1])
    x, t = torch.randn(1, *cifar32.sample_shape), torch.zeros(1, dtype=torch.int64)
    benchmark.pedantic(lambda: built[fastest](x, t), rounds=1, warmup_rounds=0, iterations=1)


def contenders(loaded, batch):
    """{name: run(steps)}: each samples ``batch`` fresh seeds with ``steps`` DDPM steps (respaced)."""
    diffusers = pytest.importorskip("diffusers")
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG

    out = {}

    def engine_runner(engine):
        return lambda steps: engine.sample([random.getrandbits(64) for _ in range(batch)], sampler="ddpm",
                                           steps=steps, driver="eager")

    for backend, precision in ENGINE_CONFIGS:
        out[f"{backend} {precision}"] = engine_runner(Engine(loaded, backend=backend, precision=precision,
                                                             device="cpu", batching=False))
    for precision in ("fp32", "bf16"):
        engine = Engine(loaded, backend="auto", precision=precision, device="cpu", batching=False)
        out[f"auto {precision} ({engine.backend.name})"] = engine_runner(engine)
    pipeline = diffusers.DDPMPipeline(unet=loaded.module.unet,
                                      scheduler=diffusers.DDPMScheduler.from_config(CIFAR10_SCHEDULER_CONFIG))
    pipeline.set_progress_bar_config(disable=True)
    out["DDPMPipeline fp32"] = lambda steps: pipeline(batch_size=batch, num_inference_steps=steps, output_type="np",
                                                      generator=torch.Generator().manual_seed(random.getrandbits(63)))
    for precision in ("fp32", "bf16"):
        engine = Engine(loaded, backend="torch", precision=precision, device="cpu", batching=False)
        engine.backend.module = torch.compile(engine.backend.module)
        out[f"torch.compile {precision}"] = engine_runner(engine)
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_sampling(benchmark, cifar32, batch):
    runs = contenders(cifar32, batch)
    timed = lambda fn: sync_time(fn, 1, warm=False, device="cpu")  # noqa: E731  one call, its seconds
    warm = {name: timed(lambda: run(1)) for name, run in runs.items()}  # compiles torch.compile's UNets
    seconds = {name: [] for name in runs}
    for _ in range(E2E_ROUNDS):
        for name, run in runs.items():
            seconds[name].append(timed(lambda: run(E2E_STEPS)))
    median = {name: statistics.median(v) for name, v in seconds.items()}
    default = next(name for name in median if name.startswith("auto fp32"))
    benchmark.group = f"cifar32 sampling, {E2E_STEPS} DDPM steps, batch {batch}"
    benchmark.extra_info.update(
        batch=batch, steps=E2E_STEPS, rounds=E2E_ROUNDS, median_s={n: round(s, 4) for n, s in median.items()},
        speedup_vs_ddpm_pipeline={n: round(median["DDPMPipeline fp32"] / s, 3) for n, s in median.items()},
        speedup_vs_fp32_default={n: round(median[default] / s, 3) for n, s in median.items()},
        first_call_s={n: round(s, 2) for n, s in warm.items()}, **machine())
    print(f"\nCIFAR-10 UNet, {E2E_STEPS} DDPM steps, batch {batch}, on {cpu.describe()} "
          f"(OpenMP wait: {threads.OPENMP_WAIT}):")
    for name, s in sorted(median.items(), key=lambda kv: kv[1]):
        print(f"  {name:32s} {s:8.3f} s   x{median['DDPMPipeline fp32'] / s:5.2f} DDPMPipeline   "
              f"x{median[default] / s:5.2f} fp32 default")
    fastest = min(median, key=median.get)
    benchmark.pedantic(lambda: runs[fastest](E2E_STEPS), rounds=1, warmup_rounds=0, iterations=1)
