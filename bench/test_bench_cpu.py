"""CPU bench: every backend x precision this CPU runs natively, against diffusers and torch.compile:
one UNet call (``test_call``), the measured design choices (``test_design_choices``), 10 DDPM
steps end to end in alternating rounds, warm-ups and compiles excluded, with and without reused
deep features (``test_sampling``); the roofline: the CPU's matmul peaks and the UNet's share of
them (``test_roofline``), and where OpenVINO's time goes, layer by layer (``test_profile``)."""

import os
import random
import statistics
from collections import defaultdict

import pytest
import torch

from bench.measure import ddpm_pipeline, flops_per_image_step, matmul_peak_tflops, prepare_static, sync_time
from ddpm_engine import Engine, backends, cpu

E2E_STEPS = 10
E2E_ROUNDS = int(os.environ.get("BENCH_E2E_ROUNDS", "2"))  # 1: a quicker look on a loaded machine
CALL_ROUNDS = {"digits16": 20, "cifar32": 3}
CPU_BACKENDS = ("torch", "onnxruntime", "openvino")  # aoti: minutes per compile; tensorrt: NVIDIA GPUs only
PEAK_N, PEAK_ITERS = 2048, 5  # the peaks' n x n x n matmul, timed in runs of PEAK_ITERS (median of 3 runs)
CACHE_INTERVAL, CACHE_BACKENDS = 3, ("torch", "openvino")  # reused deep features (int8 graphs have no split)
SPEED_CALIBRATION = 16  # int8's calibration calls where only its speed is measured (its scales do not change it)
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


def call_ms(benchmark, built: dict, loaded, monkeypatch) -> dict:
    """{name: {batch: median ms}} of one call of each built backend, in alternating rounds at batch
    1 and 8 (``backends.timing.measure``); the benchmark runs the fastest once at batch 1."""
    from ddpm_engine.backends.timing import measure

    monkeypatch.setattr("ddpm_engine.backends.timing.ROUNDS", CALL_ROUNDS["cifar32"] * 3)
    ms = measure(built, loaded.sample_shape, loaded.scheduler.num_train_timesteps)
    x, t = torch.randn(1, *loaded.sample_shape), torch.zeros(1, dtype=torch.int64)
    benchmark.pedantic(built[min(ms, key=lambda n: ms[n][1])], (x, t), rounds=1, iterations=1)
    benchmark.extra_info.update(rounds=CALL_ROUNDS["cifar32"] * 3, load=os.getloadavg())
    return ms


def test_design_choices(benchmark, cifar32, monkeypatch):
    """The torch backend's layouts (which ``torch_backend.choose_layout`` measures), OpenVINO's
    static-shape compiles against the dynamic-batch blob alone, and its two requests in flight at
    batch 8 (``openvino_backend.streams_for``) against one; one UNet call in alternating rounds."""
    from ddpm_engine.backends import openvino_backend
    from ddpm_engine.backends.torch_backend import TorchBackend

    built = {}
    for p in (p for p in backends.PRECISIONS if cpu.native(p)):
        for name, channels_last in (("NCHW", False), ("channels_last", True)) if backends.PRECISIONS[p] else ():
            built[f"torch {p} {name}"] = TorchBackend(cifar32.module, "cpu", p, channels_last=channels_last)
        if backends.available("cpu", p, ["openvino"])["openvino"] is None:
            static = built[f"openvino {p} static shapes"] = backends.create("openvino", cifar32, "cpu", p)
            built[f"openvino {p} dynamic"] = openvino_backend.OpenVINOBackend(  # no compile_static: dynamic only
                static.path, openvino_backend.identity(cifar32, p), cifar32.sample_shape, p)
            with monkeypatch.context() as one_stream:
                one_stream.setattr(openvino_backend, "STREAMS", 1)
                built[f"openvino {p} static, 1 stream"] = backends.create("openvino", cifar32, "cpu", p)
                built[f"openvino {p} static, 1 stream"].prepare([1, 8])
    ms = call_ms(benchmark, built, cifar32, monkeypatch)
    print(f"\nOne CIFAR-10 UNet call, ms, median of alternating rounds, on {cpu.describe()}:")
    for name, by_batch in ms.items():
        print(f"  {name:32s} " + "   ".join(f"batch {b}: {v:8.1f}" for b, v in by_batch.items()))
    benchmark.group = "cifar32 design choices, one call"
    benchmark.extra_info.update(ms={n: {str(b): round(v, 2) for b, v in by_b.items()} for n, by_b in ms.items()})


def contenders(loaded, batch):
    """{name: run(steps)}: each samples ``batch`` fresh seeds with ``steps`` DDPM steps (respaced)."""
    pytest.importorskip("diffusers")

    def engine(backend, precision, compiled=False, cache_interval=1):
        eng = Engine(loaded, backend=backend, precision=precision, device="cpu", batching=False)
        if compiled:
            eng.backend.module = torch.compile(eng.backend.module)
        prepare_static(eng.backend, [batch])
        return eng, lambda steps: eng.sample([random.getrandbits(64) for _ in range(batch)], sampler="ddpm",
                                             steps=steps, driver="eager", cache_interval=cache_interval)

    out = {f"{b} {p}": engine(b, p)[1] for b, p in ENGINE_CONFIGS}
    out.update({f"{b} {p} cache_interval={CACHE_INTERVAL}": engine(b, p, cache_interval=CACHE_INTERVAL)[1]
                for b, p in ENGINE_CONFIGS if b in CACHE_BACKENDS and p != "int8"})
    for precision in ("fp32", "bf16"):
        eng, run = engine("auto", precision)
        out[f"auto {precision} ({eng.backend.name})"] = run
    pipeline = ddpm_pipeline(loaded)
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


def openvino_matmul_tflops(precision: str) -> float:
    """An n x n x n matmul's TFLOP/s through OpenVINO's CPU plugin at ``precision``; int8: the Linear
    layer quantized by NNCF (int8 weights and activations: VNNI or AMX kernels, see test_profile)."""
    from ddpm_engine.backends import openvino_backend

    ov, (linear, x) = openvino_backend._ov(), (torch.nn.Linear(PEAK_N, PEAK_N, bias=False).eval(), torch.randn(PEAK_N, PEAK_N))
    model = ov.convert_model(linear, example_input=x)
    if precision == "int8":
        nncf = openvino_backend._nncf()
        model = nncf.quantize(model, nncf.Dataset([x.numpy()]), subset_size=1)
    request = openvino_backend.compile_model(ov.Core(), model, precision, "the peak matmul").create_infer_request()
    run = lambda: [request.infer([x.numpy()]) for _ in range(PEAK_ITERS)]  # noqa: E731
    return 2 * PEAK_N ** 3 * PEAK_ITERS / sync_time(run, device="cpu") / 1e12


def measure_peaks() -> dict:
    """{precision: {"torch": GFLOP/s, "openvino": GFLOP/s, "peak": the best}} through both (torch:
    oneDNN on every core; int8: ``torch._int_mm``), for the precisions this CPU has."""
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    try:
        for p in (p for p in ("fp32", "bf16", "int8") if cpu.native(p)):
            row = {"openvino": 1e3 * openvino_matmul_tflops(p)}
            dtype = torch.int8 if p == "int8" else backends.PRECISIONS[p]  # int8: torch._int_mm
            if dtype is not None:
                row["torch"] = 1e3 * matmul_peak_tflops("cpu", PEAK_N, PEAK_ITERS, dtype)
            out[p] = dict(row, peak=max(row.values()))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def quick_int8(monkeypatch):
    """int8 calibrated on SPEED_CALIBRATION calls (a cache key of its own): for speed, not quality."""
    from ddpm_engine import calibration

    monkeypatch.setattr(calibration, "SETTINGS", dict(calibration.SETTINGS, calls=SPEED_CALIBRATION))


def test_roofline(benchmark, cifar32, monkeypatch, quick_int8):
    """One CIFAR-10 UNet call per precision through OpenVINO (static shapes, alternating rounds,
    batch 1 and 8): its GFLOP/s and its share of the precision's peak, the peaks measured before
    and after the calls (a shared machine's load drifts: the higher of the two counts)."""
    from ddpm_engine.backends.openvino_backend import OpenVINOBackend

    before = measure_peaks()
    built = {p: OpenVINOBackend.create(cifar32, "cpu", p) for p in before}  # speed only: no load-time check
    ms, flops = call_ms(benchmark, built, cifar32, monkeypatch), flops_per_image_step(cifar32)
    after = measure_peaks()
    peaks = {p: dict(row, before=before[p]["peak"], after=after[p]["peak"], peak=max(before[p]["peak"], after[p]["peak"]))
             for p, row in after.items()}
    calls = {p: {b: {"ms": v, "gflop_per_s": flops * b / v / 1e6, "share": flops * b / v / 1e6 / peaks[p]["peak"]}
                 for b, v in by_batch.items()} for p, by_batch in ms.items()}
    benchmark.group = "cifar32 roofline"
    benchmark.extra_info.update(peaks_gflop_per_s=peaks, gflop_per_image=flops / 1e9, calls=calls)
    print(f"\nMatmul peaks (n={PEAK_N}), GFLOP/s, on {cpu.describe()}, load {os.getloadavg()[0]:.1f}:")
    for p, row in peaks.items():
        print(f"  {p:5s} " + "   ".join(f"{k} {v:8.1f}" for k, v in row.items()))
    print(f"One CIFAR-10 UNet call ({flops / 1e9:.2f} GFLOP per image), OpenVINO static shapes:")
    for p, by_batch in calls.items():
        print(f"  {p:5s} " + "   ".join(f"batch {b}: {r['ms']:7.1f} ms {r['gflop_per_s']:7.1f} GFLOP/s "
                                        f"{100 * r['share']:5.1f}% of peak" for b, r in by_batch.items()))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_profile(benchmark, cifar32, precision, quick_int8, calls=20, top=10):
    """OpenVINO's per-layer counters (PERF_COUNT) over ``calls`` batch-1 calls of the CIFAR-10 UNet:
    ms per call by layer type, and the ``top`` layers with the kernel each ran (exec_type)."""
    from ddpm_engine.backends import openvino_backend

    if backends.available("cpu", precision, ["openvino"])["openvino"] or not cpu.native(precision):
        pytest.skip(f"no native {precision} through OpenVINO here")
    core = openvino_backend._ov().Core()
    model = openvino_backend.source_model(core, cifar32, precision)
    model.reshape({model.inputs[0].any_name: [1, *cifar32.sample_shape], model.inputs[1].any_name: [1]})
    request = core.compile_model(model, "CPU", dict(openvino_backend.config(precision), PERF_COUNT=True)).create_infer_request()
    x, t = torch.randn(1, *cifar32.sample_shape).numpy(), torch.tensor([500]).numpy()
    request.infer([x, t])  # warm-up, not counted
    by_layer, by_type, kind = defaultdict(float), defaultdict(float), {}
    for _ in range(calls):
        request.infer([x, t])
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3 / calls
            by_layer[info.node_name] += ms
            by_type[info.node_type] += ms
            kind[info.node_name] = f"{info.node_type} {info.exec_type}"
    total = sum(by_type.values())
    layers = [{"name": n, "kind": kind[n], "ms": ms, "share": ms / total}
              for n, ms in sorted(by_layer.items(), key=lambda kv: -kv[1])[:top]]
    benchmark.group = "cifar32 OpenVINO profile"
    benchmark.extra_info.update(precision=precision, ms_per_call=total, top_layers=layers,
                                by_type=dict(sorted(by_type.items(), key=lambda kv: -kv[1])))
    print(f"\n{precision}: {total:.1f} ms per call; by type: " + ", ".join(
        f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:6]))
    for r in layers:
        print(f"  {r['ms']:6.2f} ms {100 * r['share']:5.1f}%  {r['kind']:40s} {r['name']}")
    benchmark.pedantic(request.infer, ([x, t],), rounds=1, iterations=1)
