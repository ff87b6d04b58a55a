"""CPU bench: every backend x precision this CPU runs natively, against diffusers and torch.compile:
one UNet call (``test_call``), the measured design choices (``test_design_choices``) and 10 DDPM
steps end to end in alternating rounds, warm-ups and compiles excluded (``test_sampling``)."""

import os
import random
import statistics

import pytest
import torch

from bench.measure import sync_time
from ddpm_engine import Engine, backends, cpu

E2E_STEPS = 10
E2E_ROUNDS = int(os.environ.get("BENCH_E2E_ROUNDS", "2"))  # 1: a quicker look on a loaded machine
CALL_ROUNDS = {"digits16": 20, "cifar32": 3}
CPU_BACKENDS = ("torch", "onnxruntime", "openvino")  # aoti: minutes per compile; tensorrt: NVIDIA GPUs only
ENGINE_CONFIGS = [(b, p) for b in CPU_BACKENDS for p in backends.PRECISIONS
                  if cpu.native(p) and backends.available("cpu", p, [b])[b] is None]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("config", ENGINE_CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("model", ["digits16", "cifar32"])
def test_call(benchmark, request, model, config, batch):
    loaded, (backend, precision) = request.getfixturevalue(model), config
    run = backends.create(backend, loaded, "cpu", precision)
    x, t = torch.randn(batch, *loaded.sample_shape), torch.randint(0, loaded.scheduler.num_train_timesteps, (batch,))
    benchmark.group = f"call {model} batch {batch}"
    benchmark.extra_info.update(model=model, backend=backend, precision=precision, batch=batch)
    benchmark.pedantic(torch.inference_mode()(lambda: run(x, t)), rounds=CALL_ROUNDS[model], warmup_rounds=2, iterations=1)


def test_design_choices(benchmark, cifar32, monkeypatch):
    """The torch backend's layouts (which ``torch_backend.choose_layout`` measures) and OpenVINO's
    static-shape compiles against the dynamic-batch blob alone, one UNet call in alternating rounds."""
    from ddpm_engine.backends import openvino_backend
    from ddpm_engine.backends.timing import measure
    from ddpm_engine.backends.torch_backend import TorchBackend

    built, rounds = {}, CALL_ROUNDS["cifar32"] * 3
    for p in (p for p in backends.PRECISIONS if cpu.native(p)):
        for name, channels_last in (("NCHW", False), ("channels_last", True)) if backends.PRECISIONS[p] else ():
            built[f"torch {p} {name}"] = TorchBackend(cifar32.module, "cpu", p, channels_last=channels_last)
        if backends.available("cpu", p, ["openvino"])["openvino"] is None:
            static = built[f"openvino {p} static shapes"] = backends.create("openvino", cifar32, "cpu", p)
            built[f"openvino {p} dynamic"] = openvino_backend.OpenVINOBackend(  # no compile_static: dynamic only
                static.path, openvino_backend.identity(cifar32, p), cifar32.sample_shape, p)
    monkeypatch.setattr("ddpm_engine.backends.timing.ROUNDS", rounds)
    ms = measure(built, cifar32.sample_shape, cifar32.scheduler.num_train_timesteps)
    print(f"\nOne CIFAR-10 UNet call, ms, median of {rounds} alternating rounds, on {cpu.describe()}:")
    for name, by_batch in ms.items():
        print(f"  {name:32s} " + "   ".join(f"batch {b}: {v:8.1f}" for b, v in by_batch.items()))
    benchmark.group = "cifar32 design choices, one call"
    benchmark.extra_info.update(ms={n: {str(b): round(v, 2) for b, v in by_b.items()} for n, by_b in ms.items()},
                                rounds=rounds)
    x, t = torch.randn(1, *cifar32.sample_shape), torch.zeros(1, dtype=torch.int64)
    benchmark.pedantic(built[min(ms, key=lambda n: ms[n][1])], (x, t), rounds=1, iterations=1)


def contenders(loaded, batch):
    """{name: run(steps)}: each samples ``batch`` fresh seeds with ``steps`` DDPM steps (respaced)."""
    diffusers = pytest.importorskip("diffusers")
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG

    def engine(backend, precision, compiled=False):
        eng = Engine(loaded, backend=backend, precision=precision, device="cpu", batching=False)
        if compiled:
            eng.backend.module = torch.compile(eng.backend.module)
        return eng, lambda steps: eng.sample([random.getrandbits(64) for _ in range(batch)], sampler="ddpm",
                                             steps=steps, driver="eager")

    out = {f"{b} {p}": engine(b, p)[1] for b, p in ENGINE_CONFIGS}
    for precision in ("fp32", "bf16"):
        eng, run = engine("auto", precision)
        out[f"auto {precision} ({eng.backend.name})"] = run
    pipeline = diffusers.DDPMPipeline(unet=loaded.module.unet,
                                      scheduler=diffusers.DDPMScheduler.from_config(CIFAR10_SCHEDULER_CONFIG))
    pipeline.set_progress_bar_config(disable=True)
    out["DDPMPipeline fp32"] = lambda steps: pipeline(batch_size=batch, num_inference_steps=steps, output_type="np",
                                                      generator=torch.Generator().manual_seed(random.getrandbits(63)))
    return dict(out, **{f"torch.compile {p}": engine("torch", p, compiled=True)[1] for p in ("fp32", "bf16")})


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
    peer, default = median["DDPMPipeline fp32"], median[next(n for n in median if n.startswith("auto fp32"))]
    benchmark.group = f"cifar32 sampling, {E2E_STEPS} DDPM steps, batch {batch}"
    benchmark.extra_info.update(
        batch=batch, steps=E2E_STEPS, rounds=E2E_ROUNDS, median_s={n: round(s, 4) for n, s in median.items()},
        speedup_vs_ddpm_pipeline={n: round(peer / s, 3) for n, s in median.items()},
        speedup_vs_fp32_default={n: round(default / s, 3) for n, s in median.items()},
        first_call_s={n: round(s, 2) for n, s in warm.items()})
    print(f"\nCIFAR-10 UNet, {E2E_STEPS} DDPM steps, batch {batch}, on {cpu.describe()}:")
    for name, s in sorted(median.items(), key=lambda kv: kv[1]):
        print(f"  {name:32s} {s:8.3f} s   x{peer / s:5.2f} DDPMPipeline   x{default / s:5.2f} fp32 default")
    benchmark.pedantic(runs[min(median, key=median.get)], (E2E_STEPS,), rounds=1, iterations=1)
