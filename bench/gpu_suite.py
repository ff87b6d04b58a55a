"""The GPU bench (issue 10): latency, throughput and peers, side by side, in one JSON that one or
more device calls build section by section.

    python -m bench.gpu_suite --out R.json     # the sections in order, until --budget-s (540 s)
    python -m bench.gpu_suite --out R.json     # again, with R.json there: the sections not done yet
    python -m bench.gpu_suite --out R.json --sections latency.cifar10,peers.b1   # only these (prefixes)
    python -m bench.gpu_suite --list           # every section, in order, with its time estimate
    python -m bench.gpu_suite --device cpu --quick --models digits --out R.json  # CPU smoke run
    python -m bench.gpu_suite --flops-only     # the CIFAR UNet's FLOPs per image-step (CPU)
    python -m bench.report R.json              # markdown table + PNG plot beside it

Models: the CIFAR-10 UNet (diffusers UNet2DModel, 35.7 M params, random weights: latency does
not depend on them; needs diffusers) and the bundled digits model.

The matrix, per model x backend x precision x driver:
- precision: fp32 (TF32 off in matmuls and cuDNN: fp32 means fp32), tf32 (a bench-level mode: an
  fp32 engine built, captured and timed with both TF32 flags on, see ``math_mode``; a captured
  graph keeps the kernels chosen at capture), fp16, bf16. cuDNN's benchmark/deterministic flags
  stay at torch's defaults, for the engine and the peers alike.
- driver: auto (``engine.sample(seeds)``, no driver argument: the engine's default path), eager
  (``driver="eager"``), python_graph / c_driver / graph_loop (``GraphedSampler.run`` with
  driver "python" / "c" / "graph_loop"). The graph drivers need CUDA and a graph-capturable
  backend; elsewhere they are skipped with a note.
- latency: seconds per request at batch 1 for ONE step (``ddpm`` with steps=1), DDIM-50 and
  DDPM-1000, all run in full; median of 20 / 5 / 3 runs.
- throughput: images/s at 1000 steps for batches 64, 256 and the largest that fits. Every DDPM
  step does the same device work (same shapes, same kernels; only table entries differ), so a run
  of ``steps_measured`` steps (20; 2 at the largest batch) gives it: images/s = batch /
  (seconds_per_step x 1000), with seconds_per_step = run seconds / steps_measured (the run's fixed
  cost, noise and the final clamp, is spread over those steps: slightly pessimistic). The largest
  batch: doubling from 256 while one eager DDPM step runs without CUDA running out of memory
  (caught, freed), up to --largest-cap and the engine's max_batch; the row says why it stopped
  (``largest_limit``). At the largest batch only eager and c_driver are timed (the GPU is the
  bottleneck there; the graph drivers replay the same graph).
- peers (same weights, same run): diffusers DDPMPipeline fp32 and fp16; the engine's eager loop
  with the UNet under torch.compile(mode="max-autotune") and torch.compile(mode="reduce-overhead")
  (CUDA graphs), at each precision the engine rows have; at batch 1 DDPM-1000 in full (the
  latency target: >= 25x DDPMPipeline fp32, ahead of both compile modes at the same precision)
  and at batch 64 (``steps_measured`` steps, reported at 1000). ``compile_s``: the first, compiling
  call.
- roofline: flops_per_image_step x images/s against ``matmul_peak_tflops`` (bf16 8192^3 matmuls,
  measured in the same run); bench/report.py prints it as % of that peak.
- the other backends (aoti, onnxruntime, tensorrt): one section per model and precision with the
  latency, throughput and parity rows of that engine, so its compile (cached on disk) is paid once.

Sections and time estimates (H100, guesses: CIFAR UNet batch 1 at 1-3 ms per eager step and
~1 ms graphed; fp32 without TF32 ~25 TFLOP/s, bf16 ~150 TFLOP/s on it at large batch; one
torch.compile of it ~100 s max-autotune + ~40 s reduce-overhead; an AOTI compile ~180 s, a
TensorRT build ~300 s): ``--list`` prints them. Order, by importance: FLOPs and the matmul peak;
latency of the CIFAR UNet on torch (~130 s); peers at batch 1 (diffusers ~30 s, compile at fp32
and bf16, ~150 s each) = call 1 (~480 s); then CIFAR throughput on torch (~240 s: at fp32 the
largest batch, ~8192, runs ~4 s per step, and capturing it runs 4 more steps) and the compile
peers at fp16 and tf32; then the batch-64 peers, the digits model, host time per step, parity,
the other backends. A section starts only if the seconds elapsed plus its estimate fit in
--budget-s, else it is skipped with a note (a later, shorter one may still run) and listed in
``sections_left``; running the same
command again with the JSON at --out runs those and merges them in (rows carry their
``section``; a section run again replaces its rows). ``section_seconds`` has the measured times.

Every section runs on its own: one that fails records its error with the traceback under
``errors`` (and stays in ``sections_left``); a failing row adds a note; the JSON is rewritten
after each section.

Rows: latency {model, backend, precision, driver, batch, sampler, steps, seconds, ms_per_step,
reps}; throughput {model, backend, precision, driver, batch, steps (1000), steps_measured,
seconds_per_step, images_per_s, largest (+ largest_limit)}; peers {name, model, precision, batch,
sampler, steps, steps_measured, seconds (per request of ``steps``), images_per_s (+ compile_s)};
each also has the ``section`` that measured it.

JSON keys: device, date, versions, backends (name -> why unusable, or null), models,
flops_per_image_step ({model: FLOPs}, torch.utils.flop_counter, a multiply-add counts 2, attention
through the math SDPA path), matmul_peak_tflops, latency / throughput / peers (rows, fields
above), parity (per model/backend/precision: eps_rel_err = max |out - eager fp32| / max |eager
fp32| of the model output over a few (x_t, t); image_max_abs / psnr_db: a whole DDPM-1000 run
against the eager fp32 run, PSNR over the [-1, 1] range), host_us_per_step (a tiny model at
batch 1: the host's cost per step per driver), notes, errors, section_seconds, sections_done,
sections_left, runs (one entry per call: device, date, sections run and skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import json
import math
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.gpu_timing import host_us_per_step as graph_host_us_per_step
from bench.gpu_timing import sync, sync_time
from bench.sections import run_section, write_json

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("torch", "aoti", "onnxruntime", "tensorrt")
MODELS = ("cifar10", "digits")
MODES = ("fp32", "tf32", "fp16", "bf16")  # bench precisions; tf32 is an fp32 engine with TF32 math on
PRECISIONS = ("fp32", "fp16", "bf16")  # engine precisions
PARITY_TIMESTEPS = (999, 500, 100, 10, 0)
DRIVERS = ("auto", "eager", "python_graph", "c_driver", "graph_loop")
GRAPH_DRIVERS = {"python_graph": "python", "c_driver": "c", "graph_loop": "graph_loop"}  # results name: driver
LARGEST_BATCH_DRIVERS = ("eager", "c_driver")
COMPILE_PEERS = {"torch.compile max-autotune": {"mode": "max-autotune"},
                 "torch.compile reduce-overhead": {"mode": "reduce-overhead"}}
DIFFUSERS_PEER_PRECISIONS = ("fp32", "fp16")
BUDGET_S = 540.0


@dataclass(frozen=True)
class Matrix:
    """What the sections measure: request settings, batches, step counts."""

    steps: int = 1000  # the full run: DDPM-1000; throughput and peers report images/s at this many steps
    latency: tuple = (("ddpm", 1), ("ddim", 50), ("ddpm", 1000))  # (sampler, steps) at batch 1
    throughput_batches: tuple = (64, 256)
    throughput_steps: int = 20  # steps timed per throughput run
    largest_steps: int = 2  # steps timed at the largest batch
    largest_cap: int = 65536
    peer_batch: int = 64  # the peers' throughput batch


FULL = Matrix()
QUICK = Matrix(steps=3, latency=(("ddpm", 1), ("ddim", 2), ("ddpm", 3)), throughput_batches=(2, 4),
               throughput_steps=2, largest_steps=1, largest_cap=8, peer_batch=2)


# ---- helpers the GPU tests share (tests/gpu) ---------------------------------------------------
def cifar_loaded(seed: int = 0):
    from ddpm_engine.checkpoints import from_module
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, cifar10_unet

    return from_module(cifar10_unet(seed=seed), CIFAR10_SCHEDULER_CONFIG, (3, 32, 32), "cifar10")


def make_engine(loaded, backend: str, precision: str, device="cuda", batching: bool = True):
    """An Engine for ``loaded`` on ``device``. Engines can share one LoadedModel: every backend
    works on its own copy of the module (TorchBackend deep-copies it before moving or casting)."""
    from ddpm_engine import Engine

    return Engine(loaded, backend=backend, device=device, precision=precision, batching=batching)


def backend_precisions(name: str) -> tuple:
    return ("fp32",) if name == "onnxruntime" else PRECISIONS


def backend_modes(name: str) -> tuple:
    """The bench precisions of a backend: TF32 flags reach torch and AOTI (Inductor) only."""
    return MODES if name in ("torch", "aoti") else backend_precisions(name)


def engine_precision(mode: str) -> str:
    return "fp32" if mode == "tf32" else mode


@contextlib.contextmanager
def torch_flags(matmul_tf32: bool, cudnn_tf32: bool, cudnn_deterministic=None, cudnn_benchmark=None):
    """Set torch's TF32 flags (and, when given, cuDNN's deterministic/benchmark flags) while
    inside; restore them after."""
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
    """fp32 means fp32, and a run repeats exactly: while inside, no TF32 in matmuls or cuDNN
    convolutions, and cuDNN picks deterministic algorithms without autotuning (benchmark=False),
    so results compared across batch sizes, drivers and runs differ only by real differences."""
    return torch_flags(False, False, cudnn_deterministic=True, cudnn_benchmark=False)


def math_mode(mode: str):
    """The math flags of a bench precision while inside: TF32 in matmuls and cuDNN on for "tf32",
    off for the others (fp32 means fp32; fp16/bf16 engines keep any fp32 leftovers exact). Build
    the engine, capture its graphs and time it inside: a graph replays the kernels of its capture."""
    if mode not in MODES:
        raise ValueError(f"unknown bench precision {mode!r}; choose one of {MODES}")
    return torch_flags(mode == "tf32", mode == "tf32")


@torch.inference_mode()
def eps_rel_err(backend, reference, sample_shape, device, batch: int = 4, seed: int = 0) -> float:
    """Worst over PARITY_TIMESTEPS of max |backend - reference| / max |reference| (model outputs)."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for t0 in PARITY_TIMESTEPS:
        x = torch.randn(batch, *sample_shape, generator=g).to(device)
        t = torch.full((batch,), t0, dtype=torch.int64, device=device)
        ref = reference(x, t).float()
        out = backend(x, t).float()
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    return worst


def image_diff(images, reference) -> dict:
    """max abs difference and PSNR (peak-to-peak 2 for [-1, 1] images) of two image batches."""
    diff = (images.float() - reference.float())
    mse = diff.pow(2).mean().item()
    return {"image_max_abs": diff.abs().max().item(),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(4.0 / mse),
            "finite": bool(torch.isfinite(images).all().item())}


def free(device="cuda"):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's allocator ran out (torch's OutOfMemoryError, or cuBLAS/cuDNN failing to allocate)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("out of memory", "ALLOC_FAILED"))


# ---- measurements ------------------------------------------------------------------------------
def flops_per_image_step(loaded=None) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    loaded = loaded or cifar_loaded()
    device = next(loaded.module.parameters()).device
    x = torch.randn(1, *loaded.sample_shape, device=device)
    t = torch.tensor([500], device=device)
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


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version()}
    for pkg in ("triton", "tensorrt", "onnxruntime", "diffusers"):
        try:
            out[pkg] = importlib.import_module(pkg).__version__
        except Exception:  # absent or broken: recorded as None
            out[pkg] = None
    return out


def graph_drivers_usable(eng) -> str | None:
    """None if the graph drivers can run this engine (``plan.graphable``), else why not."""
    if eng.plan().graphable:
        return None
    backend = eng.backend
    if eng.device.type != "cuda":
        return "the graph drivers need CUDA"
    return f"the {backend.name} backend cannot be captured: {backend.graph_capture_refusal}"


def usable_drivers(eng, device, drivers, where: str, notes: list) -> list:
    why = graph_drivers_usable(eng)
    if why is None:
        return list(drivers)
    skipped = [d for d in drivers if d in GRAPH_DRIVERS]
    if skipped:
        notes.append(f"{where}: {', '.join(skipped)} skipped: {why}")
    return [d for d in drivers if d not in GRAPH_DRIVERS]


def graphed_sampler(eng, sampler, steps, batch):
    """A GraphedSampler for one request setting up to ``batch``, its bucket captured now (not
    cached by the engine: dropping it frees its graph memory)."""
    from ddpm_engine.cuda.graphs import GraphedSampler

    return GraphedSampler(eng.plan(sampler, steps), max_batch=batch).warm([batch])


def request_fn(eng, sampler, steps, seeds, driver, graphed=None):
    """The call that runs one request through ``driver`` (one of DRIVERS); the graph drivers
    replay ``graphed`` (``graphed_sampler``)."""
    if driver == "auto":
        return lambda: eng.sample(seeds, sampler=sampler, steps=steps)
    if driver == "eager":
        return lambda: eng.sample(seeds, sampler=sampler, steps=steps, driver="eager")
    return lambda: graphed.run(seeds, driver=GRAPH_DRIVERS[driver])


def time_drivers(eng, sampler, steps, batch, drivers, device, reps, warm, where, notes, log) -> dict:
    """{driver: median seconds of one request (sampler, steps, batch)}; a driver that fails adds a
    note (out-of-memory included) and is left out."""
    seeds = list(range(1, batch + 1))
    out, graphed = {}, None
    for driver in drivers:
        out_of_memory = False
        try:
            if driver in GRAPH_DRIVERS and graphed is None:  # captured once for the three graph drivers
                graphed = graphed_sampler(eng, sampler, steps, batch)
            out[driver] = sync_time(request_fn(eng, sampler, steps, seeds, driver, graphed), reps=reps, warm=warm,
                                    device=device)
        except Exception as exc:  # one driver failing must not drop the others
            notes.append(f"{where}/{driver} {sampler}-{steps} batch {batch} failed: {type(exc).__name__}: {exc}")
            log(notes[-1])
            out_of_memory = is_out_of_memory(exc)
        if out_of_memory:  # here, not in the except clause: the traceback's frames hold the tensors
            graphed = None
            free(device)
    return out


def latency_reps(steps: int) -> int:
    return 20 if steps <= 1 else 5 if steps <= 100 else 3


def latency_rows(loaded, model, backend, mode, device, matrix=FULL, drivers=DRIVERS, notes=None, log=print) -> list:
    """Seconds per request at batch 1 for each (sampler, steps) of ``matrix.latency`` and driver."""
    notes = [] if notes is None else notes
    where = f"latency {model}/{backend}/{mode}"
    rows = []
    with math_mode(mode):
        eng = make_engine(loaded, backend, engine_precision(mode), device)
        try:
            drivers = usable_drivers(eng, device, drivers, where, notes)
            for sampler, steps in matrix.latency:
                times = time_drivers(eng, sampler, steps, 1, drivers, device, latency_reps(steps), steps <= 100,
                                     where, notes, log)
                for driver, seconds in times.items():
                    rows.append({"model": model, "backend": backend, "precision": mode, "driver": driver, "batch": 1,
                                 "sampler": sampler, "steps": steps, "seconds": seconds,
                                 "ms_per_step": 1e3 * seconds / steps, "reps": latency_reps(steps)})
                    log(f"latency {rows[-1]}")
        finally:
            eng.close()
            eng = None
            free(device)
    return rows


def largest_batch(eng, start: int, cap: int, device) -> tuple[int, str]:
    """The largest batch start * 2^k (k >= 0; or start / 2^k if start does not fit) that runs one
    eager DDPM step of ``eng``, at most min(cap, eng.max_batch); and why the next doubling was not
    taken. Any error counts as not fitting (out of memory, the engine refusing a size, a failing
    kernel), with the error in the reason, so one refusal never ends the section."""
    from ddpm_engine.plan import reverse_step

    plan = eng.plan("ddpm")
    limit = min(cap, eng.max_batch)

    def step(b: int) -> str | None:
        try:
            with torch.inference_mode():
                reverse_step(plan, plan.start(list(range(1, b + 1))))
            sync(device)
            return None
        except Exception as exc:
            return "out of memory" if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"

    def fails(b: int) -> str | None:
        why = step(b)
        free(device)  # after step() returned: its traceback, holding the tensors, is gone
        return why

    b = min(start, limit)
    failed = None  # why the last halving was needed
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
    return b, f"the cap: at most {limit} (min of --largest-cap {cap} and the engine's max_batch {eng.max_batch})"


def throughput_rows(loaded, model, backend, mode, device, matrix=FULL, drivers=DRIVERS, notes=None, log=print) -> list:
    """images/s at ``matrix.steps`` DDPM steps for the throughput batches and the largest batch
    that fits, from runs of ``throughput_steps`` (``largest_steps``) steps."""
    notes = [] if notes is None else notes
    where = f"throughput {model}/{backend}/{mode}"
    rows = []
    with math_mode(mode):
        eng = make_engine(loaded, backend, engine_precision(mode), device)
        try:
            drivers = usable_drivers(eng, device, drivers, where, notes)
            largest, limit = largest_batch(eng, max(matrix.throughput_batches), matrix.largest_cap, device)
            log(f"{where}: largest batch {largest} ({limit})")
            runs = [(b, drivers, matrix.throughput_steps, 3) for b in matrix.throughput_batches if b <= largest]
            if largest not in matrix.throughput_batches:
                runs.append((largest, [d for d in drivers if d in LARGEST_BATCH_DRIVERS], matrix.largest_steps, 1))
            for b in matrix.throughput_batches:
                if b > largest:
                    notes.append(f"{where}: batch {b} skipped: above the largest batch that fits ({largest}, {limit})")
            for batch, batch_drivers, steps, reps in sorted(runs, reverse=True):  # the largest first, memory clean
                times = time_drivers(eng, "ddpm", steps, batch, batch_drivers, device, reps, True, where, notes, log)
                for driver, seconds in times.items():
                    per_step = seconds / steps
                    row = {"model": model, "backend": backend, "precision": mode, "driver": driver, "batch": batch,
                           "steps": matrix.steps, "steps_measured": steps, "seconds_per_step": per_step,
                           "images_per_s": batch / (per_step * matrix.steps), "largest": batch == largest}
                    if batch == largest:
                        row["largest_limit"] = limit
                    rows.append(row)
                    log(f"throughput {row}")
                free(device)
        finally:
            eng.close()
            eng = None
            free(device)
    return rows


def peer_row(name, model, precision, batch, steps, steps_measured, seconds_measured, **extra) -> dict:
    """A peer's request of ``steps`` DDPM steps, from a timed run of ``steps_measured`` steps."""
    seconds = seconds_measured * steps / steps_measured
    return {"name": name, "model": model, "precision": precision, "batch": batch, "sampler": "ddpm", "steps": steps,
            "steps_measured": steps_measured, "seconds": seconds, "images_per_s": batch / seconds, **extra}


def diffusers_scheduler(loaded):
    """diffusers' DDPMScheduler with the model's scheduler config."""
    import inspect

    import diffusers

    cfg = loaded.scheduler.to_dict()
    keys = inspect.signature(diffusers.DDPMScheduler.__init__).parameters
    return diffusers.DDPMScheduler(**{k: v for k, v in cfg.items() if k in keys})


def diffusers_peer_rows(loaded, model, device, batch, steps, steps_measured, precisions=DIFFUSERS_PEER_PRECISIONS,
                        notes=None, log=print) -> list:
    """diffusers' DDPMPipeline with the model's UNet2DModel (``loaded.module.unet``) and scheduler."""
    from ddpm_engine.backends.base import parse_precision
    from ddpm_engine.errors import require

    diffusers = require("diffusers", "the DDPMPipeline peer", extra="diffusers")
    notes = [] if notes is None else notes
    unet0 = getattr(loaded.module, "unet", None)
    if not isinstance(unet0, diffusers.UNet2DModel):
        raise TypeError(f"the DDPMPipeline peer needs a diffusers UNet2DModel; model {model!r} has "
                        f"{type(loaded.module).__name__}")
    rows = []
    for precision in precisions:
        pipe = None
        try:
            with math_mode(precision):
                unet = copy.deepcopy(unet0).to(device, parse_precision(precision))
                pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers_scheduler(loaded))
                pipe.set_progress_bar_config(disable=True)
                run = lambda n: pipe(batch_size=batch, num_inference_steps=n, output_type="np")  # noqa: E731
                run(min(10, steps_measured))  # warm: cuDNN's first calls, the allocator
                seconds = sync_time(lambda: run(steps_measured), reps=3, warm=False, device=device)
            rows.append(peer_row("diffusers DDPMPipeline", model, precision, batch, steps, steps_measured, seconds))
            log(f"peer {rows[-1]}")
        except Exception as exc:
            notes.append(f"peer DDPMPipeline {model}/{precision} batch {batch} failed: {type(exc).__name__}: {exc}")
            log(notes[-1])
        finally:
            pipe = unet = None
            free(device)
    return rows


def compile_peer_rows(loaded, model, device, mode, batch, steps, steps_measured, compilers=COMPILE_PEERS,
                      notes=None, log=print) -> list:
    """The engine's eager loop (same step kernels) with its UNet under ``torch.compile(**kwargs)``
    for each compiler; the first call (10 steps) compiles and is timed as ``compile_s``."""
    notes = [] if notes is None else notes
    seeds = list(range(1, batch + 1))
    rows = []
    for name, kwargs in compilers.items():
        eng = None
        try:
            with math_mode(mode):
                eng = make_engine(loaded, "torch", engine_precision(mode), device, batching=False)
                eng.backend.module = torch.compile(eng.backend.module, **kwargs)
                run = lambda n: eng.sample(seeds, sampler="ddpm", steps=n, driver="eager")  # noqa: E731
                t0 = time.perf_counter()
                run(min(10, steps_measured))
                sync(device)
                compile_s = time.perf_counter() - t0
                seconds = sync_time(lambda: run(steps_measured), reps=3, warm=False, device=device)
            rows.append(peer_row(f"{name} (Python loop)", model, mode, batch, steps, steps_measured, seconds,
                                 compile_s=compile_s))
            log(f"peer {rows[-1]}")
        except Exception as exc:
            notes.append(f"peer {name} {model}/{mode} batch {batch} failed: {type(exc).__name__}: {exc}")
            log(notes[-1])
        finally:
            import torch._dynamo as dynamo

            eng = None
            dynamo.reset()  # drop the compiled graphs (and their CUDA graphs' memory)
            free(device)
    return rows


def parity_rows(loaded, model, backend, modes, seeds, device, steps: int = 1000, notes=None, log=print) -> list:
    """Each bench precision of ``backend`` against eager fp32 (TF32 off) on the same device."""
    notes = [] if notes is None else notes
    rows = []
    with exact_fp32():
        ref_engine = make_engine(loaded, "torch", "fp32", device)
        try:
            reference = ref_engine.backend
            ref_images = ref_engine.sample(seeds, sampler="ddpm", steps=steps, driver="eager")
            for mode in modes:
                eng = None
                try:
                    with math_mode(mode):
                        eng = make_engine(loaded, backend, engine_precision(mode), device)
                        row = {"model": model, "backend": backend, "precision": mode, "driver": "eager",
                               "eps_rel_err": eps_rel_err(eng.backend, reference, loaded.sample_shape, device)}
                        row.update(image_diff(eng.sample(seeds, sampler="ddpm", steps=steps, driver="eager"), ref_images))
                        rows.append(row)
                        if backend == "torch" and mode == "fp32" and graph_drivers_usable(eng) is None:
                            images = eng.sample(seeds, sampler="ddpm", steps=steps, driver="c")
                            rows.append(dict(row, driver="c_driver", **image_diff(images, ref_images)))
                    log(f"parity {rows[-1]}")
                except Exception as exc:  # one failing precision must not stop the others
                    notes.append(f"parity {model}/{backend}/{mode} failed: {type(exc).__name__}: {exc}")
                    log(notes[-1])
                finally:
                    if eng is not None:
                        eng.close()
                    eng = None
                    free(device)
        finally:
            ref_engine.close()
            ref_engine = reference = None
            free(device)
    return rows


def host_us_per_step(device="cuda", steps: int = 200) -> dict:
    """Per-step wall time with a tiny model at batch 1: the host's cost per step for each driver."""
    from ddpm_engine import Engine
    from ddpm_engine.models import SeedUNet

    torch.manual_seed(0)
    eng = Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=(1, 8, 8), backend="torch", device=device)
    seeds = [1]
    out = {"python": 1e6 * sync_time(lambda: eng.sample(seeds, sampler="ddim", steps=steps, driver="eager"),
                                     device=device) / steps}
    why = graph_drivers_usable(eng)
    graphed = None if why else graphed_sampler(eng, "ddim", steps, 1)
    for key, driver in GRAPH_DRIVERS.items():
        try:
            if why:
                raise RuntimeError(why)
            res = graph_host_us_per_step(graphed, seeds, driver, reps=3)
            out[key] = res["wall_us_per_step"]
            if "enqueue_us_per_step" in res:
                out[f"{key}_enqueue"] = res["enqueue_us_per_step"]
        except Exception as exc:  # e.g. the graph loop on a driver older than CUDA 12.4
            out[key] = None
            out.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
    eng.close()
    return out


# ---- sections ----------------------------------------------------------------------------------
@dataclass
class Context:
    """What every section gets: the device, the loaded models, the matrix, the notes, a logger."""

    device: torch.device
    models: dict
    matrix: Matrix = FULL
    notes: list = field(default_factory=list)
    log: Callable = print
    backends: dict = field(default_factory=dict)  # name -> None (usable) or why not
    seeds: list = field(default_factory=list)

    def model(self, name: str):
        if name not in self.models:
            raise RuntimeError(f"model {name!r} is not loaded (see errors['models'] and notes)")
        return self.models[name]

    def backend(self, name: str) -> bool:
        """True if usable; else a note says why the section does nothing."""
        why = self.backends.get(name, "not checked")
        if why is not None:
            self.notes.append(f"backend {name} skipped: {why}")
        return why is None

    def cuda(self, what: str) -> bool:
        if self.device.type != "cuda":
            self.notes.append(f"{what} skipped: it needs CUDA (device {self.device})")
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Section:
    name: str
    estimate_s: float  # on an H100 (module docstring: the assumptions)
    run: Callable  # run(ctx) -> the value of results[name], or {field: rows} when ``fields``
    fields: tuple = ()  # the row lists it adds to (latency, throughput, peers, parity); () for a value


COMPILE_S = {"torch": 0, "aoti": 180, "tensorrt": 300, "onnxruntime": 30}  # building a CIFAR engine (digits: half)
ESTIMATE_S = {  # (kind, model): {mode: seconds} on torch
    ("latency", "cifar10"): {"fp32": 40, "tf32": 30, "fp16": 30, "bf16": 30},
    ("throughput", "cifar10"): {"fp32": 130, "tf32": 50, "fp16": 30, "bf16": 30},
    ("latency", "digits"): dict.fromkeys(MODES, 15),
    ("throughput", "digits"): dict.fromkeys(MODES, 20),
}
COMPILE_PEER_S = 150  # one batch, one precision: max-autotune + reduce-overhead compiles, then the runs
SECTION_ORDER = ("fp32", "tf32", "bf16", "fp16")


def rows_section(kind: str, model: str, backend: str, mode: str) -> Section:
    """latency.<model>.torch.<mode> / throughput.<model>.torch.<mode>."""
    fn = latency_rows if kind == "latency" else throughput_rows

    def run(ctx):
        if not ctx.backend(backend):
            return {kind: []}
        return {kind: fn(ctx.model(model), model, backend, mode, ctx.device, ctx.matrix, notes=ctx.notes, log=ctx.log)}

    return Section(f"{kind}.{model}.{backend}.{mode}", ESTIMATE_S[kind, model][mode] + COMPILE_S[backend], run, (kind,))


def backend_section(backend: str, model: str, mode: str) -> Section:
    """<backend>.<model>.<mode> for a compiled backend: latency, throughput and parity of one engine
    setting in one section, so its compile (cached on disk) is paid once per call."""
    def run(ctx):
        if not ctx.backend(backend):
            return {}
        loaded, m = ctx.model(model), ctx.matrix
        kw = {"notes": ctx.notes, "log": ctx.log}
        return {"latency": latency_rows(loaded, model, backend, mode, ctx.device, m, **kw),
                "throughput": throughput_rows(loaded, model, backend, mode, ctx.device, m, **kw),
                "parity": parity_rows(loaded, model, backend, (mode,), ctx.seeds, ctx.device, m.steps, **kw)}

    scale = 1.0 if model == "cifar10" else 0.5
    estimate = scale * COMPILE_S[backend] + ESTIMATE_S["latency", model][mode] + ESTIMATE_S["throughput", model][mode] + 10
    return Section(f"{backend}.{model}.{mode}", estimate, run, ("latency", "throughput", "parity"))


def diffusers_peer_section(batch_name: str) -> Section:
    def run(ctx):
        m = ctx.matrix
        batch, measured = (1, m.steps) if batch_name == "b1" else (m.peer_batch, m.throughput_steps)
        return {"peers": diffusers_peer_rows(ctx.model("cifar10"), "cifar10", ctx.device, batch, m.steps, measured,
                                             notes=ctx.notes, log=ctx.log)}

    return Section(f"peers.{batch_name}.diffusers", 30 if batch_name == "b1" else 20, run, ("peers",))


def compile_peer_section(batch_name: str, mode: str) -> Section:
    def run(ctx):
        if not ctx.cuda(f"peers.{batch_name}.compile.{mode}"):
            return {"peers": []}
        m = ctx.matrix
        batch, measured = (1, m.steps) if batch_name == "b1" else (m.peer_batch, m.throughput_steps)
        return {"peers": compile_peer_rows(ctx.model("cifar10"), "cifar10", ctx.device, mode, batch, m.steps, measured,
                                           notes=ctx.notes, log=ctx.log)}

    return Section(f"peers.{batch_name}.compile.{mode}", COMPILE_PEER_S, run, ("peers",))


def torch_parity_section() -> Section:
    def run(ctx):
        return {"parity": [row for name, loaded in ctx.models.items()
                           for row in parity_rows(loaded, name, "torch", MODES, ctx.seeds, ctx.device, ctx.matrix.steps,
                                                  notes=ctx.notes, log=ctx.log)]}

    return Section("parity.torch", 60, run, ("parity",))


def all_sections(backends=BACKENDS, models=MODELS, modes=MODES) -> list[Section]:
    """Every section, most important first (see the module docstring)."""
    def rows(kind, model):
        return [rows_section(kind, model, "torch", m) for m in SECTION_ORDER
                if m in modes and model in models and "torch" in backends]

    def compile_peers(batch_name, order):
        return [compile_peer_section(batch_name, m) for m in order if m in modes and "cifar10" in models]

    def diffusers_peers(batch_name):
        return [diffusers_peer_section(batch_name)] if "cifar10" in models else []

    out = [Section("flops_per_image_step", 10, lambda ctx: {n: flops_per_image_step(lm) for n, lm in ctx.models.items()}),
           Section("matmul_peak_tflops", 10, lambda ctx: matmul_peak_tflops(
               ctx.device, *((8192, 50) if ctx.device.type == "cuda" else (256, 3))))]
    out += rows("latency", "cifar10")
    out += diffusers_peers("b1") + compile_peers("b1", ("fp32", "bf16"))
    out += rows("throughput", "cifar10")
    out += compile_peers("b1", ("fp16", "tf32"))
    out += diffusers_peers("b64") + compile_peers("b64", ("bf16", "fp32"))
    out += rows("latency", "digits") + rows("throughput", "digits")
    out += [Section("host_us_per_step", 15, lambda ctx: host_us_per_step(ctx.device))]
    out += [torch_parity_section()] if "torch" in backends else []
    out += compile_peers("b64", ("fp16", "tf32"))
    out += [backend_section(b, model, m) for b in BACKENDS if b != "torch" and b in backends
            for model in MODELS if model in models for m in SECTION_ORDER if m in modes and m in backend_modes(b)]
    return out


def select(sections: list[Section], wanted: list[str]) -> list[Section]:
    """The sections named by ``wanted`` (exact names or dotted prefixes: "peers.b1"), in suite order."""
    unknown = [w for w in wanted if not any(s.name == w or s.name.startswith(w + ".") for s in sections)]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; `python -m bench.gpu_suite --list` lists them")
    return [s for s in sections if any(s.name == w or s.name.startswith(w + ".") for w in wanted)]


def run_suite(results: dict, sections: list[Section], ctx: Context, out: Path, budget_s: float, t0: float) -> dict:
    """Run ``sections`` in order into ``results`` (written to ``out`` after each); a section whose
    estimate does not fit in what is left of ``budget_s`` (seconds since ``t0``) is skipped."""
    done = results.setdefault("sections_done", {})
    ran, skipped = [], []
    for sec in sections:
        elapsed = time.monotonic() - t0
        if elapsed + sec.estimate_s > budget_s:
            ctx.notes.append(f"section {sec.name} skipped: {elapsed:.0f} s elapsed + its estimate {sec.estimate_s:.0f} s "
                             f"> --budget-s {budget_s:.0f}; run the suite again to measure it")
            ctx.log(ctx.notes[-1])
            skipped.append(sec.name)
            continue
        ctx.log(f"section {sec.name} (estimate {sec.estimate_s:.0f} s)")
        results.get("errors", {}).pop(sec.name, None)
        run_section(results, sec.name, lambda: sec.run(ctx), ctx.log)
        if sec.fields:
            rows = results.pop(sec.name, None)
            if rows is not None:  # replaces the section's rows from an earlier call
                for name in sec.fields:
                    kept = [r for r in results.get(name, []) if r.get("section") != sec.name]
                    results[name] = kept + [dict(r, section=sec.name) for r in rows.get(name, [])]
        if sec.name not in results.get("errors", {}):
            done[sec.name] = {"seconds": results["section_seconds"][sec.name], "device": device_name(ctx.device),
                              "date": datetime.date.today().isoformat()}
        else:
            done.pop(sec.name, None)
        ran.append(sec.name)
        write_json(out, results)
        free(ctx.device)
    return {"ran": ran, "skipped": skipped}


def gpu_slug() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


def load_models(names, notes) -> dict:
    from ddpm_engine.checkpoints import load

    models = {}
    for name in names:
        try:
            models[name] = cifar_loaded() if name == "cifar10" else load(name)
        except Exception as exc:  # the sections of a model that did not load note it; the others run
            notes.append(f"model {name} not loaded: {type(exc).__name__}: {exc}")
    return models


def csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", default=None, help="results JSON; merged into when it exists "
                                                "(default bench/results/<date>-<gpu>.json)")
    ap.add_argument("--sections", default=None, help="comma-separated section names or dotted prefixes "
                                                     "(default: every section not done yet in --out)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no section that would end after this "
                                                                     "many seconds (by its estimate)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run: no graph drivers, no "
                                                     "compile peers)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    ap.add_argument("--precisions", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--quick", action="store_true", help="tiny batches and 1-3 steps: checks every path, measures nothing")
    ap.add_argument("--list", action="store_true", help="print the sections in order with their estimates and exit")
    ap.add_argument("--flops-only", action="store_true", help="print the CIFAR UNet's FLOPs per image-step and exit")
    args = ap.parse_args(argv)

    picked = {"models": csv(args.models), "backends": csv(args.backends), "precisions": csv(args.precisions)}
    for key, allowed in (("models", MODELS), ("backends", BACKENDS), ("precisions", MODES)):
        if not picked[key] or set(picked[key]) - set(allowed):
            ap.error(f"--{key} takes a comma-separated subset of {','.join(allowed)}, got {getattr(args, key)!r}")
    sections = all_sections(picked["backends"], picked["models"], picked["precisions"])
    if args.list:
        for s in sections:
            print(f"{s.estimate_s:6.0f} s  {s.name}")
        print(f"{sum(s.estimate_s for s in sections):6.0f} s  in all (estimates for an H100; --budget-s per call)")
        return 0
    if args.flops_only:
        print(f"flops_per_image_step: {flops_per_image_step():.4g} (CIFAR-10 UNet, a multiply-add counts 2)")
        return 0
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a device; use cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"python -m bench.gpu_suite needs a CUDA GPU: torch {torch.__version__} sees none here "
              f"(torch.version.cuda={torch.version.cuda}); run it on a GPU machine, or use `--device cpu` "
              "for a smoke run, `--flops-only`, or the CPU benches in bench/test_bench_cpu.py", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        ap.error(f"--device {args.device!r}: use cuda or cpu")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t0 = time.monotonic()
    slug = gpu_slug() if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"{datetime.date.today().isoformat()}-{slug}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    notes = results.setdefault("notes", [])
    here = device_name(device)
    if results.get("device", here) != here:
        notes.append(f"this call ran on {here}, earlier ones on {results['device']}: compare rows by sections_done[...]"
                     "['device']")
    results.setdefault("device", here)
    results.setdefault("date", datetime.date.today().isoformat())
    results.setdefault("model", "DDPM CIFAR-10 UNet (35.7 M params, random weights), 3x32x32; digits (bundled)")
    results.setdefault("seeds", [str(random.getrandbits(64)) for _ in range(4)])
    results["versions"] = versions()
    try:
        wanted = select(sections, csv(args.sections)) if args.sections else \
            [s for s in sections if s.name not in results.get("sections_done", {})]
    except ValueError as exc:
        ap.error(str(exc))
    log(f"{here}: {len(wanted)} section(s), budget {args.budget_s:.0f} s, writing {out}")

    from ddpm_engine.backends import available

    ctx = Context(device=device, models=load_models(picked["models"], notes), matrix=QUICK if args.quick else FULL,
                  notes=notes, log=log, backends=available(device), seeds=[int(s) for s in results["seeds"]])
    results["backends"] = ctx.backends
    results["models"] = sorted(ctx.models)
    report = run_suite(results, wanted, ctx, out, args.budget_s, t0)
    results["sections_left"] = [s.name for s in sections if s.name not in results["sections_done"]]
    results.setdefault("runs", []).append({"device": here, "date": datetime.date.today().isoformat(),
                                           "argv": list(sys.argv[1:] if argv is None else argv),
                                           "wall_s": round(time.monotonic() - t0, 1), **report})
    write_json(out, results)
    log(f"wrote {out}; {len(results['sections_left'])} section(s) left")
    try:
        from bench import report as report_module

        md, png = report_module.write_report(out)
        log(f"wrote {md} and {png}")
    except ImportError as exc:  # matplotlib absent: the JSON is the result
        log(f"no report: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
