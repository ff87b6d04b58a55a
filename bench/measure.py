"""Measuring on a CUDA device (or the CPU), shared by the GPU bench (bench/gpu_check.py), the GPU
tests (tests/gpu) and the CPU benches: math flags, synchronised timing, parity metrics, the host's
cost per step, serving clients, and the measuring sections. None of this is in the library."""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import json
import math
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm_engine import Engine
from ddpm_engine.backends import BACKENDS, PRECISIONS, available
from ddpm_engine.checkpoints import from_module
from ddpm_engine.cuda.graphs import DRIVERS as GRAPH_DRIVERS
from ddpm_engine.cuda.graphs import GraphedSampler
from ddpm_engine.engine import DRIVERS
from ddpm_engine.errors import require
from ddpm_engine.models import SeedUNet

MODES = (*PRECISIONS, "tf32")  # the bench's precisions: tf32 is an fp32 engine with TF32 math on
TF32_BACKENDS = ("torch", "aoti")  # the backends torch's TF32 flags reach (Inductor included)
FASTEST_FIRST = ("c", "python", "eager")  # the throughput headline takes the first driver that runs
PARITY_TIMESTEPS = (999, 500, 100, 10, 0)
FLAGS = {"matmul_tf32": (torch.backends.cuda.matmul, "allow_tf32"), "cudnn_tf32": (torch.backends.cudnn, "allow_tf32"),
         "deterministic": (torch.backends.cudnn, "deterministic"), "benchmark": (torch.backends.cudnn, "benchmark")}


def cifar_loaded(seed: int = 0):
    """The DDPM CIFAR-10 UNet (diffusers UNet2DModel, 35.7 M params), random weights."""
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, cifar10_unet

    return from_module(cifar10_unet(seed=seed), CIFAR10_SCHEDULER_CONFIG, (3, 32, 32), "cifar10")


def make_engine(loaded, backend: str, precision: str, device="cuda", batching: bool = True):
    """An Engine at an engine precision; engines can share one LoadedModel (each backend copies it)."""
    return Engine(loaded, backend=backend, device=device, precision=precision, batching=batching)


def engine_precision(mode: str) -> str:
    return "fp32" if mode == "tf32" else mode


@contextlib.contextmanager
def torch_flags(**values):
    """Set torch's math flags (``FLAGS``' keys) while inside."""
    old = {k: getattr(*FLAGS[k]) for k in values}
    try:
        for k, v in values.items():
            setattr(*FLAGS[k], v)
        yield
    finally:
        for k, v in old.items():
            setattr(*FLAGS[k], v)


def exact_fp32():
    """No TF32 in matmuls or cuDNN, deterministic cuDNN algorithms without autotuning: runs compared
    across batch sizes, drivers and repeats differ only by real differences."""
    return torch_flags(matmul_tf32=False, cudnn_tf32=False, deterministic=True, benchmark=False)


def math_mode(mode: str):
    """TF32 on for bench precision "tf32", off for the others. Build, capture and time inside."""
    if mode not in MODES:
        raise ValueError(f"unknown bench precision {mode!r}; choose one of {MODES}")
    return torch_flags(matmul_tf32=mode == "tf32", cudnn_tf32=mode == "tf32")


def sync_time(fn, reps: int = 3, warm: bool = True, device="cuda") -> float:
    """Median wall seconds of fn() with a device sync after each call (one untimed call first if ``warm``)."""
    times = []
    for _ in range(reps + warm):
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times[warm:])[reps // 2]


def free(device="cuda"):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def eps_rel_err(backend, reference, sample_shape, device, batch: int = 4, seed: int = 0) -> float:
    """Worst over PARITY_TIMESTEPS of max |backend - reference| / max |reference| (model outputs)."""
    g, worst = torch.Generator().manual_seed(seed), 0.0
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
    """The model's FLOPs for one image and one step (a multiply-add counts 2; attention via math SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(loaded.module.parameters()).device
    x, t = torch.randn(1, *loaded.sample_shape, device=device), torch.tensor([500], device=device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loaded.module(x, t)
    return float(counter.get_total_flops())


def matmul_peak_tflops(device="cuda", n: int = 8192, iters: int = 50, dtype=torch.bfloat16) -> float:
    """Measured n^3 matmul rate (TFLOP/s) at ``dtype`` (bf16: the GPU roofline's denominator; int8:
    ``torch._int_mm``, int8 in, int32 out)."""
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (n, n), device=device, dtype=dtype) for _ in range(2))
        return 2 * n ** 3 * iters / sync_time(lambda: [torch._int_mm(a, b) for _ in range(iters)], device=device) / 1e12
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 * iters / sync_time(lambda: [a @ b for _ in range(iters)], device=device) / 1e12


@contextlib.contextmanager
def built(loaded, backend: str, mode: str, device, batching: bool = True):
    """An engine at bench precision ``mode``, used under its math flags, closed and freed after."""
    with math_mode(mode):
        eng = make_engine(loaded, backend, engine_precision(mode), device, batching)
        try:
            yield eng
        finally:
            eng.close()
            free(device)


def usable(eng, drivers, notes, where) -> list:
    """``drivers`` without the graph drivers (and a note why) where they cannot run ``eng``."""
    if not (dropped := [d for d in drivers if d in GRAPH_DRIVERS]) or eng.plan().graphable:
        return list(drivers)
    why = "the graph drivers need CUDA" if eng.device.type != "cuda" else \
        f"the {eng.backend.name} backend cannot be captured: {eng.backend.graph_capture_refusal}"
    notes.append(f"{where}: {', '.join(dropped)} skipped: {why}")
    return [d for d in drivers if d not in dropped]


def time_drivers(eng, sampler, steps, batch, drivers, reps, warm, notes) -> dict:
    """{driver: median seconds of one request}. The graph drivers replay one sampler captured before
    the timing (not the engine's cached one: dropping it frees its memory); a driver that fails
    (out of memory included) adds a note and is left out."""
    seeds, out, graphed = list(range(1, batch + 1)), {}, None
    for driver in drivers:
        failed = False
        try:
            if driver in GRAPH_DRIVERS:
                if graphed is None:
                    graphed = GraphedSampler(eng.plan(sampler, steps), max_batch=batch).warm([batch])
                run = lambda d=driver: graphed.run(seeds, driver=d)  # noqa: E731
            else:
                run = lambda d=driver: eng.sample(seeds, sampler=sampler, steps=steps, driver=d)  # noqa: E731
            out[driver] = sync_time(run, reps=reps, warm=warm, device=eng.device)
        except Exception as exc:  # one driver failing must not drop the others
            notes.append(f"{driver} {sampler}-{steps} batch {batch} failed: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
            failed = True
        if failed:  # a fresh capture for the next driver; here, not in the except clause, whose
            graphed = None  # traceback's frames hold the tensors
            free(eng.device)
    return out


def host_us_per_step(graphed, seeds, driver: str = "python", reps: int = 5) -> dict:
    """Wall µs per step of ``graphed.run(seeds, driver)`` (median of ``reps`` after a warm run); for
    "python" also the host-only time to enqueue the steps (one graph replay per step, no sync)."""
    seeds, steps = list(seeds), graphed.steps
    wall = sync_time(lambda: graphed.run(seeds, driver), reps=reps, device="cpu")
    res = {"driver": driver, "steps": steps, "batch": len(seeds), "wall_us_per_step": 1e6 * wall / steps}
    if driver == "python":
        graph = graphed.bucket(len(seeds)).graph
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        res["enqueue_us_per_step"] = 1e6 * (time.perf_counter() - t0) / steps
        torch.cuda.synchronize()
    return res


def client_load(call, clients: int, requests: int, time_limit_s: float) -> dict:
    """``clients`` threads each ``call([seed])`` up to ``requests`` times back to back (until the time
    limit): images/s and p50/p99 latency."""
    deadline, start = time.perf_counter() + time_limit_s, time.perf_counter()

    def client(_):
        return [sync_time(lambda: call([random.getrandbits(64)]), 1, warm=False, device="cpu")
                for _ in range(requests) if time.perf_counter() <= deadline]

    with ThreadPoolExecutor(clients) as pool:
        lats = [x for lat in pool.map(client, range(clients)) for x in lat]
    wall = time.perf_counter() - start
    return {"images_per_s": len(lats) / wall, "p50_s": float(np.percentile(lats, 50)),
            "p99_s": float(np.percentile(lats, 99)), "requests": len(lats), "wall_s": wall}


# ---- the measuring sections: generators of (part name, its function); rows have a ``kind`` --------
@dataclass(frozen=True)
class Scale:
    """What the measuring sections run: the GPU's settings, or the CPU smoke run's."""

    device: str = "cuda"
    steps: int = 1000  # DDPM-1000: the latency headline, and the step count images/s are given at
    batch: int = 256  # the throughput headline's batch
    steps_measured: int = 50  # steps timed per headline throughput run (every DDPM step does the same work)
    latency: tuple = (("ddpm", 1), ("ddim", 50), ("ddpm", 1000))  # matrix: (sampler, steps) at batch 1
    batches: tuple = (64, 256, 1024)  # matrix: throughput batches
    matrix_steps: int = 20
    host_steps: int = 200
    matmul: tuple = (8192, 50)  # n, iterations


GPU = Scale()
SMOKE = Scale("cpu", steps=2, batch=2, steps_measured=1, latency=(("ddpm", 1), ("ddim", 2)), batches=(2,), matrix_steps=1,
              host_steps=3, matmul=(64, 2))


def rows(loaded, backend, mode, scale, notes, latency=None, batches=None, drivers=DRIVERS, steps_timed=None) -> list:
    """For each driver that runs: latency rows (seconds per request at batch 1, each (sampler, steps)
    of ``latency``) and throughput rows (images/s at ``scale.steps`` DDPM steps from runs of
    ``steps_timed`` steps, each of ``batches``). Defaults: ``scale``'s."""
    out, n = [], steps_timed or scale.matrix_steps
    with built(loaded, backend, mode, scale.device) as eng:
        drivers = usable(eng, drivers, notes, f"{backend}/{mode}")
        for sampler, steps in scale.latency if latency is None else latency:
            reps = 20 if steps <= 1 else 5 if steps <= 100 else 3
            out += [{"kind": "latency", "model": loaded.name, "backend": backend, "precision": mode, "driver": driver,
                     "batch": 1, "sampler": sampler, "steps": steps, "seconds": s, "ms_per_step": 1e3 * s / steps,
                     "reps": reps} for driver, s in time_drivers(eng, sampler, steps, 1, drivers, reps, True, notes).items()]
        for batch in scale.batches if batches is None else batches:  # a batch that does not fit: a note
            out += [{"kind": "throughput", "model": loaded.name, "backend": backend, "precision": mode, "driver": driver,
                     "batch": batch, "steps": scale.steps, "steps_measured": n, "seconds_per_step": s / n,
                     "images_per_s": batch * n / (s * scale.steps)}
                    for driver, s in time_drivers(eng, "ddpm", n, batch, drivers, 3, True, notes).items()]
            free(scale.device)
    return out


def ddpm_pipeline(loaded, precision: str = "fp32", device="cpu"):
    """diffusers' DDPMPipeline with a copy of the model's UNet2DModel (``loaded.module.unet``) at
    ``precision`` on ``device`` and the model's scheduler, its progress bar off."""
    diffusers = require("diffusers", "the DDPMPipeline peer", extra="diffusers")
    if not isinstance(getattr(loaded.module, "unet", None), diffusers.UNet2DModel):
        raise TypeError(f"the DDPMPipeline peer needs a diffusers UNet2DModel; {loaded.name!r} has "
                        f"{type(loaded.module).__name__}")
    keys = inspect.signature(diffusers.DDPMScheduler.__init__).parameters
    scheduler = diffusers.DDPMScheduler(**{k: v for k, v in loaded.scheduler.to_dict().items() if k in keys})
    pipe = diffusers.DDPMPipeline(unet=copy.deepcopy(loaded.module.unet).to(device, PRECISIONS[precision]),
                                  scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_peer_row(loaded, precision, batch, scale, steps_measured) -> dict:
    """``ddpm_pipeline``'s request of ``scale.steps`` DDPM steps, from timed runs of ``steps_measured`` steps."""
    try:
        with math_mode(precision):
            pipe = ddpm_pipeline(loaded, precision, scale.device)
            run = lambda n: pipe(batch_size=batch, num_inference_steps=n, output_type="np")  # noqa: E731
            run(min(10, steps_measured))  # warm: cuDNN's first calls, the allocator
            seconds = sync_time(lambda: run(steps_measured), reps=3, warm=False, device=scale.device)
    finally:
        pipe = None
        free(scale.device)
    seconds *= scale.steps / steps_measured
    return {"kind": "peers", "name": "diffusers DDPMPipeline", "model": loaded.name, "precision": precision,
            "batch": batch, "sampler": "ddpm", "steps": scale.steps, "steps_measured": steps_measured, "seconds": seconds,
            "images_per_s": batch / seconds}


def _model(scale, state):
    """The CIFAR-10 UNet (random weights), loaded once per section."""
    def load():
        state.update(loaded=cifar_loaded(seed=0), notes=[])
        device = torch.cuda.get_device_name() if scale.device == "cuda" else f"CPU ({platform.machine()})"
        return {"model": "CIFAR-10 UNet (diffusers UNet2DModel, random weights), 3x32x32", "device": device,
                "scale": "gpu" if scale == GPU else "cpu smoke: numbers measure nothing"}

    return "model", load


def section_latency(scale, state):
    """Batch-1 DDPM-1000 on the CIFAR-10 UNet, fp32 (TF32 off), each of the engine's drivers its own
    part; the engine's fast_path(); diffusers' DDPMPipeline fp32; the host's cost per step."""
    def driver_row(driver):
        if driver in GRAPH_DRIVERS and scale.device != "cuda":  # the torch backend is graphable on CUDA
            return {"skipped": "the graph drivers need CUDA"}
        notes = []
        found = rows(state["loaded"], "torch", "fp32", scale, notes, [("ddpm", scale.steps)], [], [driver])
        if not found:
            raise RuntimeError("; ".join(notes))
        return found[0]

    def fast_path():
        with built(state["loaded"], "torch", "fp32", scale.device, batching=False) as eng:
            eng.sample([1], sampler="ddpm", steps=scale.steps)  # the default path, once
            return eng.fast_path()

    yield _model(scale, state)
    for driver in DRIVERS:
        yield driver, lambda d=driver: driver_row(d)
    yield "fast_path", fast_path
    yield "diffusers_ddpm_pipeline_fp32", lambda: diffusers_peer_row(state["loaded"], "fp32", 1, scale, scale.steps)
    yield "host_us_per_step", lambda: host_table(scale)


def host_table(scale) -> dict:
    """Wall µs per step of eager and of each graph driver (replaying one captured step; for python
    also the enqueue-only time) with a tiny model at batch 1: the host's cost per step."""
    torch.manual_seed(0)
    notes = []
    with built(from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=(1, 8, 8)), "torch", "fp32", scale.device) as eng:
        run = lambda: eng.sample([1], sampler="ddim", steps=scale.host_steps, driver="eager")  # noqa: E731
        out = {"eager": 1e6 * sync_time(run, device=scale.device) / scale.host_steps}
        if drivers := usable(eng, GRAPH_DRIVERS, notes, "host"):
            graphed = GraphedSampler(eng.plan("ddim", scale.host_steps), max_batch=1).warm([1])
        for driver in drivers:
            try:
                res = host_us_per_step(graphed, [1], driver, reps=3)
                out[driver] = res["wall_us_per_step"]
                if "enqueue_us_per_step" in res:
                    out[f"{driver}_enqueue"] = res["enqueue_us_per_step"]
            except Exception as exc:  # e.g. the graph loop on a driver older than CUDA 12.4
                notes.append(f"{driver}: {type(exc).__name__}: {exc}")
    return dict(out, **({"notes": notes} if notes else {}))


def section_throughput(scale, state):
    """The bf16 matmul peak; images/s at 1000 DDPM steps at batch 256, fp32 and bf16, with the
    fastest driver that runs, from runs of ``scale.steps_measured`` steps."""
    def rate(mode):
        notes = []
        for driver in FASTEST_FIRST:  # the first that runs is the row
            if found := rows(state["loaded"], "torch", mode, scale, notes, [], [scale.batch], [driver],
                             steps_timed=scale.steps_measured):
                return dict(found[0], notes=notes)
        raise RuntimeError("no driver ran: " + "; ".join(notes))

    yield "matmul_peak_tflops_bf16", lambda: matmul_peak_tflops(scale.device, *scale.matmul)
    name, load = _model(scale, state)
    yield name, lambda: dict(load(), flops_per_image_step=flops_per_image_step(state["loaded"]))
    for mode in ("fp32", "bf16"):
        yield f"b{scale.batch}_{mode}", lambda m=mode: rate(m)


def section_matrix(scale, state):
    """Latency (``scale.latency``) and throughput (``scale.batches``) rows for every driver, backend (torch
    first) and bench precision that ``backends.available`` says runs (compiles are cached on disk)."""
    yield _model(scale, state)
    for backend in ("torch", *(b for b in BACKENDS if b not in ("auto", "torch"))):
        for mode in (m for m in ("fp32", "bf16", "tf32", "fp16") if m != "tf32" or backend in TF32_BACKENDS):
            why = available(scale.device, engine_precision(mode), [backend])[backend]
            yield f"{backend}_{mode}", (lambda w=why: {"skipped": w}) if why else (
                lambda b=backend, m=mode: rows(state["loaded"], b, m, scale, state["notes"]))
    yield "notes", lambda: state["notes"]


def save_result(out_dir, name: str, result: dict) -> Path:
    """Write a bench result as indented JSON to ``out_dir / name`` (the folder made if needed)."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def prepare_static(backend, batches) -> None:
    """Compile an OpenVINO backend's static shapes for ``batches`` now (other backends: nothing), so
    that the compile does not run in the background while other contenders are timed."""
    if hasattr(backend, "prepare"):
        backend.prepare(batches)
