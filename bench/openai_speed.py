"""OpenAI's published configs on the CPU: the engine against their own sampling loop, and the
largest batch in 24 GiB (docs/openai.md, "Speed on the CPU").

Random weights at the published widths (``CONFIGS`` of tests/engine/test_openai_unet.py), their
code importable (IMPROVED_DIFFUSION_PATH / GUIDED_DIFFUSION_PATH). Per config, in one process, the
variants interleaved round by round, medians of ``--reps`` rounds:

- per call: one network call at batch 1 (a label for the class-conditional one): their UNetModel in
  eager PyTorch (fp32, ``torch.no_grad``), and the engine's backend for each ``--variants`` entry
  (``torch:fp32``, ``openvino:fp32``, ``openvino:bf16``, ``openvino:int8``; one that cannot be built
  is recorded with the reason);
- end to end: their ``ddim_sample_loop`` with ``timestep_respacing`` "<steps>" against
  ``engine.sample(seeds, **cfg.sample_kwargs)`` of the same flags (same timesteps), batch 1;
- ``--memory``: the peak resident memory of two network calls at each of ``--batches``, each in a
  fresh process (the peak reset once the engine is built, ``/proc/self/clear_refs``), the line
  through them (``fit``), and the batch it predicts for 24 GiB, beside the engine's own bound
  (``plan.max_batch_that_fits`` with 24 GiB free);
- ``--verify``: in a fresh process, the largest request the engine admits on this machine
  (``engine.max_batch``, from the memory available when it is built), sampled with one DDIM step:
  it must finish, and its peak is recorded beside the memory that was available;
- ``--footprint``: in a fresh process per ``--memory-variants`` entry, the memory one engine holds
  between requests (our network only, random weights; the cache's files built by a process
  before), and the seconds its build takes: resident before it is built, once built
  and after one call, and after each static shape of ``--static-batches`` is compiled
  (``prepare``), split into anonymous memory (the process's own) and file-backed pages (cached
  files mapped: shared between processes, reclaimable).

int8 is calibrated on ``--int8-calls`` calls (16; the engine's default is 200): its speed does not
depend on its scales, and the 256x256 configs' calls take seconds each.

    python -m bench.openai_speed --out FILE [--configs ...] [--variants ...] [--reps 3] [--steps 2] [--memory] [--verify]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ddpm_engine  # noqa: F401 - first: sets OpenMP's passive wait policy before torch loads (engine/threads.py)
import torch
from ddpm_engine import plan
from ddpm_engine.threads import yield_cpu_to

from .measure import prepare_static

GIB = 2**30
BUDGET = 24 * GIB
DEFAULT_CONFIGS = ("improved-cifar10", "improved-imagenet64", "guided-imagenet64-cond", "improved-lsun256")
DEFAULT_VARIANTS = ("torch:fp32", "openvino:fp32", "openvino:bf16")


def build(config: str, variant: str | None, respacing: str = ""):
    """(their model, their diffusion, the engine or None, its flags' OpenAIConfig) with the same random weights."""
    from ddpm_engine.openai_format import from_flags
    from tests.engine.test_openai_unet import CONFIGS, randomize, theirs

    flags = CONFIGS[config] + (f" --timestep_respacing {respacing} --use_ddim True" if respacing else "")
    torch.manual_seed(0)
    model, diffusion = theirs(flags)
    model = randomize(model, std=0.02)
    cfg = from_flags(flags)
    engine = None
    if variant is not None:
        ours = cfg.build()
        ours.load_state_dict(model.state_dict(), strict=True)
        engine = engine_of(ours, cfg, variant)
    return model, diffusion, engine, cfg


def engine_of(ours, cfg, variant: str):
    """The engine of our network ``ours`` for ``variant`` ("backend:precision"), unbatched."""
    from ddpm_engine import Engine

    backend, precision = variant.split(":")
    return Engine.from_module(ours, scheduler=cfg.scheduler, sample_shape=cfg.sample_shape, backend=backend,
                              precision=precision, batching=False)


def inputs(cfg, batch: int):
    x = torch.randn(batch, *cfg.sample_shape)
    t = torch.full((batch,), cfg.scheduler["num_train_timesteps"] // 2, dtype=torch.int64)
    y = torch.arange(batch, dtype=torch.int64) if cfg.model["num_classes"] else None
    return x, t, y


def _as_sampled(backend, *inputs):
    """One call with torch's thread count as the engine samples with this backend."""
    with yield_cpu_to(backend):
        return backend(*inputs)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(config: str, variants, reps: int, steps: int) -> dict:
    """Per call and end to end, every variant interleaved with their loop, round by round."""
    model, diffusion, _, cfg = build(config, None, str(steps))
    engines, skipped = {}, {}
    for variant in variants:
        try:
            engines[variant] = build(config, variant, str(steps))[2]
            prepare_static(engines[variant].backend, [1])
        except Exception as exc:  # noqa: BLE001 - recorded: a variant that does not build on this CPU
            skipped[variant] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    x, t, y = inputs(cfg, 1)
    kw = {} if y is None else {"y": y}
    labels = None if y is None else y.tolist()
    wrapped = diffusion._wrap_model(model)  # their loop's call: t through their timestep map
    calls = {"theirs (eager fp32)": lambda: wrapped(x, torch.zeros_like(t), **kw)}
    loops = {"theirs (eager fp32)": lambda: diffusion.ddim_sample_loop(model, (1, *cfg.sample_shape),
                                                                       clip_denoised=True, model_kwargs=kw)}
    for variant, engine in engines.items():
        extra = () if y is None else (y,)
        calls[variant] = lambda e=engine, extra=extra: _as_sampled(e.backend, x, t, *extra)
        loops[variant] = lambda e=engine: e.sample([1], class_labels=labels, **cfg.sample_kwargs)
    per_call, end_to_end = {k: [] for k in calls}, {k: [] for k in loops}
    with torch.no_grad():
        for fn in (*calls.values(), *loops.values()):
            fn()  # warm-up (static shapes, lazy init)
        for _ in range(reps):
            for k, fn in calls.items():
                per_call[k].append(timed(fn))
            for k, fn in loops.items():
                end_to_end[k].append(timed(fn))

    def summary(times):
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["theirs (eager fp32)"]
        return {k: {"median_s": round(m, 4), "speedup_vs_theirs": round(base / m, 3),
                    "all_s": [round(v, 4) for v in times[k]]} for k, m in med.items()}
    return {"flags": cfg.flags, "steps": steps, "batch": 1, "per_call": summary(per_call),
            "end_to_end": summary(end_to_end), "skipped": skipped}


def peak(config: str, variant: str, batch: int) -> dict:
    """The engine built (weights resident), the peak RSS reset, two calls at ``batch``: the process's
    peak while it samples (this process only; what the allocator keeps after the first call counts)."""
    _, _, engine, cfg = build(config, variant)
    x, t, y = inputs(cfg, batch)
    extra = () if y is None else (y,)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    with torch.no_grad():
        for _ in range(2):
            _as_sampled(engine.backend, x, t, *extra)
    return {"batch": batch, "rss_before": before, "peak": _status("VmHWM"),
            "engine_max_batch_24gib": BUDGET // plan.bytes_per_image(cfg.sample_shape, engine.model.io.bytes_per_image,
                                                                     engine.backend.working_memory_factor)}


def admitted(config: str, variant: str) -> dict:
    """The largest request the engine admits here (``engine.max_batch``, sized from the memory
    available when it was built), sampled with one DDIM step; the peak against what was available."""
    available = plan.free_bytes(torch.device("cpu"))
    _, _, engine, cfg = build(config, variant)
    Path("/proc/self/clear_refs").write_text("5")
    before, start = _status("VmRSS"), time.perf_counter()
    labels = [i % cfg.model["num_classes"] for i in range(engine.max_batch)] if cfg.model["num_classes"] else None
    engine.sample(list(range(engine.max_batch)), sampler="ddim", steps=1, class_labels=labels)
    return {"max_batch": engine.max_batch, "available_before_build": available, "rss_before": before,
            "peak": _status("VmHWM"), "seconds": round(time.perf_counter() - start, 1)}


def footprint(config: str, variant: str, batches) -> dict:
    """What one engine of our network holds between requests: resident memory (``_resident``)
    before the engine is built (the network itself), once built and after a batch-1 call, then
    after each of ``batches``' static shapes is compiled."""
    from ddpm_engine.openai_format import from_flags
    from tests.engine.test_openai_unet import CONFIGS

    cfg = from_flags(CONFIGS[config])
    torch.manual_seed(0)
    ours = cfg.build()
    rows = [{"after": "network built", **_resident()}]
    start = time.perf_counter()
    engine = engine_of(ours, cfg, variant)
    build_s = time.perf_counter() - start
    x, t, y = inputs(cfg, 1)
    with torch.no_grad():
        _as_sampled(engine.backend, x, t, *(() if y is None else (y,)))
    rows.append({"after": "engine built, one call", **_resident()})
    for batch in batches:
        prepare_static(engine.backend, [batch])
        rows.append({"after": f"static batch {batch} compiled", **_resident()})
    return {"variant": variant, "parameters": sum(p.numel() for p in ours.parameters()),
            "build_s": round(build_s, 2), "rows": rows}


def _resident() -> dict:
    """This process's resident memory now, after a garbage collection: anonymous and file-backed bytes."""
    gc.collect()
    return {"anon": _status("RssAnon"), "file": _status("RssFile")}


def verify(config: str, variant: str) -> dict:
    """``admitted`` in a fresh process."""
    return {"variant": variant, **_fresh("--admit", config, variant)}


def _fresh(*args: str) -> dict:
    """This module run with ``args`` (``--peak``, ``--admit`` or ``--held``) in a fresh process: the JSON it
    printed last, or {"returncode", "error"} (a process killed for memory prints nothing)."""
    out = subprocess.run([sys.executable, "-m", "bench.openai_speed", *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"returncode": out.returncode,
                "error": (out.stderr.strip().splitlines() or [f"killed (returncode {out.returncode}: out of memory?)"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory(config: str, variant: str, batches) -> dict:
    """Peaks at ``batches`` (a fresh process each), the line through them, the batch it predicts for 24 GiB."""
    runs = []
    for batch in batches:
        runs.append({"batch": batch, **_fresh("--peak", config, variant, str(batch))})
        if "error" in runs[-1]:
            break
    done = [r for r in runs if "peak" in r]
    return {"variant": variant, "runs": done, "errors": [r for r in runs if "error" in r], **fit(done)}


def fit(runs) -> dict:
    """The line through the peaks of the two largest batches (what the process held before the
    calls varies with the garbage its building left, which the smallest batch's peak may not
    exceed), and the batch it predicts for 24 GiB, beside the engine's own bound."""
    if len(runs) < 2:
        return {}
    (b0, p0), (b1, p1) = sorted((r["batch"], r["peak"]) for r in runs)[-2:]
    slope = (p1 - p0) / (b1 - b0)
    fixed = p1 - slope * b1
    return {"bytes_per_image": round(slope), "fixed_bytes": round(fixed),
            "predicted_max_batch_24gib": int((BUDGET - fixed) // slope) if slope > 0 else None,
            "engine_max_batch_24gib": runs[0]["engine_max_batch_24gib"]}


def cpu_name() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "Model name" in line), "")
    flags = sorted(f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
                   if f in text.split())
    return {"cpu": name, "cpu_flags": flags, "cores": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="the JSON to write")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="their respacing \"N\" for the end-to-end runs")
    parser.add_argument("--memory", action="store_true", help="also the peak memory against the batch")
    parser.add_argument("--memory-variants", nargs="+", default=["torch:fp32", "openvino:fp32"])
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1, 8, 32 at 32 px, 1, 4, 16 at 64 px, "
                        "else 1, 2, 4")
    parser.add_argument("--verify", action="store_true", help="also sample the largest request the engine admits")
    parser.add_argument("--footprint", action="store_true", help="also the memory one engine holds between requests")
    parser.add_argument("--static-batches", nargs="*", type=int, default=[1, 2, 4, 8],
                        help="--footprint's static shapes, compiled one after another")
    parser.add_argument("--int8-calls", type=int, default=16, help="int8's calibration calls (speed only)")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--peak", nargs=3, metavar=("CONFIG", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--admit", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--held", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from ddpm_engine import calibration

    calibration.SETTINGS = dict(calibration.SETTINGS, calls=args.int8_calls)  # speed only (module docstring)
    from ddpm_engine.openai_format import parse_flags
    from tests.engine.test_openai_unet import CONFIGS

    if args.peak:
        print(json.dumps(peak(args.peak[0], args.peak[1], int(args.peak[2]))))
        return 0
    if args.admit:
        print(json.dumps(admitted(*args.admit)))
        return 0
    if args.held:
        print(json.dumps(footprint(*args.held, args.static_batches)))
        return 0
    data = {"what": __doc__.splitlines()[0], "how": "python -m bench.openai_speed " + " ".join(argv or sys.argv[1:]),
            **cpu_name(), "load_before": Path("/proc/loadavg").read_text().split()[:3], "torch": torch.__version__,
            "python": platform.python_version(), "configs": {}}
    for config in args.configs:
        entry = data["configs"].setdefault(config, {})
        if not args.no_speed:
            entry["speed"] = speed(config, args.variants, args.reps, args.steps)
        if args.memory:
            size = parse_flags(CONFIGS[config])["image_size"]
            batches = args.batches or {"32": [1, 8, 32], "64": [1, 4, 16]}.get(size, [1, 2, 4])
            entry["memory"] = [memory(config, v, batches) for v in args.memory_variants]
        if args.verify:
            entry["admitted"] = [verify(config, v) for v in args.memory_variants]
        if args.footprint:
            batches = [str(b) for b in args.static_batches]
            entry["footprint"] = []
            for v in args.memory_variants:
                _fresh("--held", config, v, "--static-batches")  # builds the cached files: the next one finds them
                entry["footprint"].append({"variant": v, **_fresh("--held", config, v, "--static-batches", *batches)})
        print(json.dumps({config: entry}), flush=True)
        if args.out:
            data["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
            Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
