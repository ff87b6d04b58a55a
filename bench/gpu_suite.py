"""The GPU bench: parity, host time per step, latency, throughput, peers; one JSON per run.

    python -m bench.gpu_suite                       # everything, writes bench/results/<date>-<gpu>.json
    python -m bench.gpu_suite --quick               # fewer batches/steps, no peers (minutes)
    python -m bench.gpu_suite --flops-only          # the model FLOP count only; runs on the CPU too
    python -m bench.report bench/results/<file>.json   # markdown table + PNG plot

Needs a CUDA GPU (it exits with status 2 and a message otherwise, except --flops-only). All
models have random weights except the bundled "digits" model (parity only); latency does not
depend on the weights. fp32 runs with TF32 off, so fp32 means fp32. The CIFAR-10 UNet needs
diffusers (see README, "GPU verification", for bringing it as a wheel).

Every section (the models, the FLOP count, the matmul peak, parity, host time, latency,
throughput, peers) runs on its own: one that fails records its error with the traceback under
``errors`` and the rest still run; the JSON is rewritten after each section.

What each key means:
- parity: per (model, backend, precision): eps_rel_err = max |out - eager fp32| / max |eager fp32|
  of the model output over a few (x_t, t); image_max_abs / psnr_db: a whole DDPM-1000 run with the
  same seeds against the eager fp32 run (PSNR over the [-1, 1] range, i.e. peak-to-peak 2).
- host_us_per_step: wall time per step with a tiny model at batch 1 (the GPU work is a few µs,
  so this is the host's cost per step) for: python (Engine.sample's eager loop), python_graph
  (CUDA-graph replay from a Python loop, driver="python"), c_driver (the C loop of cuGraphLaunch,
  driver="c"), graph_loop (one launch for the whole chain with a conditional WHILE node).
- latency: seconds for one request (sampler, steps, batch) per backend/precision/driver.
- throughput: images/s for full-length runs at large batches (best driver available).
- peers: diffusers DDPMPipeline (fp32, fp16) and eager torch with torch.compile(mode="max-autotune").
- flops_per_image_step: torch.utils.flop_counter on the CIFAR-10 UNet (a multiply-add counts 2;
  attention counted through the math SDPA path so the CPU and GPU counts agree).
- matmul_peak_tflops: measured bf16 8192^3 matmul rate on this GPU (the MFU denominator).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import math
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

from bench.gpu_timing import host_us_per_step as graph_host_us_per_step
from bench.gpu_timing import sync_time
from bench.sections import run_section

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("torch", "aoti", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
PARITY_TIMESTEPS = (999, 500, 100, 10, 0)
GRAPH_DRIVERS = {"python_graph": "python", "c_driver": "c", "graph_loop": "graph_loop"}  # results name: driver


# ---- helpers the GPU tests share (tests/gpu) ---------------------------------------------------
def cifar_loaded(seed: int = 0):
    from ddpm_engine.checkpoints import from_module
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, cifar10_unet

    return from_module(cifar10_unet(seed=seed), CIFAR10_SCHEDULER_CONFIG, (3, 32, 32), "cifar10")


def make_engine(loaded, backend: str, precision: str, device="cuda"):
    """An Engine for ``loaded`` on ``device``. Engines can share one LoadedModel: every backend
    works on its own copy of the module (TorchBackend deep-copies it before moving or casting)."""
    from ddpm_engine import Engine

    return Engine(loaded, backend=backend, device=device, precision=precision)


def backend_precisions(name: str) -> tuple:
    return ("fp32",) if name == "onnxruntime" else PRECISIONS


@contextlib.contextmanager
def exact_fp32():
    """fp32 means fp32, and a run repeats exactly: while inside, no TF32 in matmuls or cuDNN
    convolutions, and cuDNN picks deterministic algorithms without autotuning (benchmark=False),
    so results compared across batch sizes, drivers and runs differ only by real differences."""
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark")
    old = [getattr(obj, name) for obj, name in flags]
    for (obj, name), value in zip(flags, (False, False, True, False)):
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name), value in zip(flags, old):
            setattr(obj, name, value)


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


def free():
    gc.collect()
    torch.cuda.empty_cache()


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


def matmul_peak_tflops(n: int = 8192, iters: int = 50) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version()}
    for pkg in ("triton", "tensorrt", "onnxruntime", "diffusers"):
        try:
            out[pkg] = importlib.import_module(pkg).__version__
        except Exception:  # absent or broken: recorded as None
            out[pkg] = None
    return out


def parity_rows(models: dict, backends: list, seeds: list, notes: list, log) -> list:
    rows = []
    for model_name, loaded in models.items():
        with exact_fp32():
            ref_engine = make_engine(loaded, "torch", "fp32")
            reference = ref_engine.backend
            ref_images = ref_engine.sample(seeds, sampler="ddpm")
            for name in backends:
                for precision in backend_precisions(name):
                    eng = None
                    try:
                        eng = make_engine(loaded, name, precision)
                        row = {"model": model_name, "backend": name, "precision": precision, "driver": "eager",
                               "eps_rel_err": eps_rel_err(eng.backend, reference, loaded.sample_shape, "cuda")}
                        row.update(image_diff(eng.sample(seeds, sampler="ddpm"), ref_images))
                        if name == "torch" and precision == "fp32":
                            rows.append(row)
                            row = dict(row, driver="c_driver", **graph_image_diff(eng, seeds, ref_images))
                        rows.append(row)
                        log(f"parity {row}")
                    except Exception as exc:  # one failing backend must not stop the suite
                        notes.append(f"parity {model_name}/{name}/{precision} failed: {type(exc).__name__}: {exc}")
                        log(notes[-1])
                    finally:
                        eng = None
                        free()
            ref_engine = reference = None
            free()
    return rows


def graph_image_diff(engine, seeds, ref_images) -> dict:
    return image_diff(engine.sample(seeds, sampler="ddpm", driver="c"), ref_images)


def host_us_per_step(steps: int = 200) -> dict:
    """Per-step wall time with a tiny model at batch 1: the host's cost per step for each driver."""
    from ddpm_engine import Engine
    from ddpm_engine.models import SeedUNet

    torch.manual_seed(0)
    eng = Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=(1, 8, 8), backend="torch", device="cuda")
    seeds = [1]
    out = {"python": 1e6 * sync_time(lambda: eng.sample(seeds, sampler="ddim", steps=steps)) / steps}
    graphed = eng.graphed("ddim", steps, max_batch=1)
    for key, driver in GRAPH_DRIVERS.items():
        try:
            res = graph_host_us_per_step(graphed, seeds, driver, reps=3)
            out[key] = res["wall_us_per_step"]
            if "enqueue_us_per_step" in res:
                out[f"{key}_enqueue"] = res["enqueue_us_per_step"]
        except Exception as exc:  # e.g. the graph loop on a driver older than CUDA 12.4
            out[key] = None
            out.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
    return out


def latency_rows(loaded, backends, configs, notes, log) -> list:
    """configs: [(sampler, steps, batches)]; one row per backend/precision/driver/batch/config."""
    rows = []
    for name in backends:
        for precision in backend_precisions(name):
            eng = gs = None
            try:
                eng = make_engine(loaded, name, precision)
                for sampler, steps, batches in configs:
                    gs = eng.graphed(sampler, steps, max_batch=max(batches))
                    for b in batches:
                        seeds = list(range(1, b + 1))
                        runs = {"python": lambda: eng.sample(seeds, sampler=sampler, steps=steps)}
                        runs.update({k: (lambda d=d: gs.run(seeds, driver=d)) for k, d in GRAPH_DRIVERS.items()})
                        for driver, fn in runs.items():
                            try:
                                seconds = sync_time(fn)
                            except Exception as exc:  # one driver failing must not drop the others
                                notes.append(f"latency {name}/{precision}/{driver} failed: {type(exc).__name__}: {exc}")
                                log(notes[-1])
                                continue
                            row = {"backend": name, "precision": precision, "driver": driver, "batch": b,
                                   "sampler": sampler, "steps": steps, "seconds": seconds}
                            rows.append(row)
                            log(f"latency {row}")
                    gs = None
                    free()
            except Exception as exc:
                notes.append(f"latency {name}/{precision} failed: {type(exc).__name__}: {exc}")
                log(notes[-1])
            finally:
                eng = gs = None
                free()
    return rows


def throughput_rows(loaded, backends, batches, steps, notes, log) -> list:
    """images/s of a full DDPM run, replayed through the C driver."""
    driver = "c"
    rows = []
    for name in backends:
        for precision in backend_precisions(name):
            eng = gs = None
            try:
                eng = make_engine(loaded, name, precision)
                gs = eng.graphed("ddpm", steps, max_batch=max(batches))
                for b in batches:
                    seeds = list(range(1, b + 1))
                    seconds = sync_time(lambda: gs.run(seeds, driver=driver), reps=1)
                    row = {"backend": name, "precision": precision, "batch": b, "steps": steps,
                           "driver": driver, "images_per_s": b / seconds}
                    rows.append(row)
                    log(f"throughput {row}")
            except Exception as exc:
                notes.append(f"throughput {name}/{precision} failed: {type(exc).__name__}: {exc}")
                log(notes[-1])
            finally:
                eng = gs = None
                free()
    return rows


def peer_rows(loaded, batch, steps, notes, log) -> list:
    rows = []
    try:
        import diffusers

        from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG

        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            unet = copy.deepcopy(loaded.module.unet).to("cuda", dtype)
            pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**CIFAR10_SCHEDULER_CONFIG))
            pipe.set_progress_bar_config(disable=True)
            seconds = sync_time(lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="np"), reps=1)
            rows.append({"name": "diffusers DDPMPipeline", "precision": precision, "batch": batch, "steps": steps,
                         "seconds": seconds, "images_per_s": batch / seconds})
            log(f"peer {rows[-1]}")
            pipe = unet = None
            free()
    except Exception as exc:
        notes.append(f"peer diffusers failed: {type(exc).__name__}: {exc}")
        log(notes[-1])
    eng = None
    try:
        eng = make_engine(loaded, "torch", "fp16")
        eng.backend.module = torch.compile(eng.backend.module, mode="max-autotune")
        seeds = list(range(1, batch + 1))
        seconds = sync_time(lambda: eng.sample(seeds, sampler="ddpm", steps=steps), reps=1)
        rows.append({"name": "torch.compile max-autotune (eager loop)", "precision": "fp16", "batch": batch,
                     "steps": steps, "seconds": seconds, "images_per_s": batch / seconds})
        log(f"peer {rows[-1]}")
    except Exception as exc:
        notes.append(f"peer torch.compile failed: {type(exc).__name__}: {exc}")
        log(notes[-1])
    finally:
        eng = None
        free()
    return rows


def usable_backends(wanted) -> list:
    from ddpm_engine import backends

    avail = backends.available("cuda")
    return [b for b in wanted if avail.get(b) is None]


def gpu_slug() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batches 1,8 / steps 100 / no peers: a smoke run")
    ap.add_argument("--flops-only", action="store_true", help="print the CIFAR UNet's FLOPs per image-step and exit")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default=None, help="results path (default bench/results/<date>-<gpu>.json)")
    args = ap.parse_args(argv)

    if args.flops_only:
        print(f"flops_per_image_step: {flops_per_image_step():.4g} (CIFAR-10 UNet, a multiply-add counts 2)")
        return 0
    if not torch.cuda.is_available():
        print(f"python -m bench.gpu_suite needs a CUDA GPU: torch {torch.__version__} sees none here "
              f"(torch.version.cuda={torch.version.cuda}); run it on a GPU machine, or use "
              "`--flops-only` / the CPU benches in bench/test_bench_cpu.py", file=sys.stderr)
        return 2

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    notes = []
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    batches = (1, 8) if args.quick else (1, 4, 16, 64)
    tput_batches = (16,) if args.quick else (16, 64, 256)
    tput_steps = 100 if args.quick else 1000
    configs = [("ddim", 50, batches)] + ([] if args.quick else [("ddpm", 1000, (1,))])
    seeds = [random.getrandbits(64) for _ in range(4)]

    results = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "model": "DDPM CIFAR-10 UNet (35.7 M params, random weights), 3x32x32",
               "seeds": [str(s) for s in seeds], "notes": notes}
    out = Path(args.out) if args.out else RESULTS / f"{results['date']}-{gpu_slug()}.json"
    log(f"{results['device']}: writing {out}")
    models = {}

    def cifar():
        if "cifar10" not in models:
            raise RuntimeError(f"the CIFAR-10 model is not loaded (see errors['models']: "
                               f"{results.get('errors', {}).get('models', {}).get('error', 'unknown')})")
        return models["cifar10"]

    def load_models():
        from ddpm_engine.checkpoints import load

        try:
            models["digits"] = load("digits")
        except Exception as exc:  # the CIFAR model is the one the sections need
            notes.append(f"digits model not loaded: {type(exc).__name__}: {exc}")
        models["cifar10"] = cifar_loaded()
        return sorted(models)

    def usable():
        from ddpm_engine.backends import available

        names = usable_backends(wanted)
        for b in sorted(set(wanted) - set(names)):
            notes.append(f"backend {b} skipped: {available('cuda').get(b, 'unknown backend')}")
        return names

    sections = [
        ("versions", versions),
        ("backends", usable),
        ("models", load_models),
        ("flops_per_image_step", lambda: flops_per_image_step(cifar())),
        ("matmul_peak_tflops", matmul_peak_tflops),
        ("parity", lambda: parity_rows(models, results.get("backends") or [], seeds, notes, log)),
        ("host_us_per_step", host_us_per_step),
        ("latency", lambda: latency_rows(cifar(), results.get("backends") or [], configs, notes, log)),
        ("throughput", lambda: throughput_rows(cifar(), results.get("backends") or [], tput_batches, tput_steps,
                                               notes, log)),
    ]
    if not (args.quick or args.no_peers):
        sections.append(("peers", lambda: peer_rows(cifar(), tput_batches[0], tput_steps, notes, log)))
    for key, fn in sections:
        log(f"section {key}")
        run_section(results, key, fn, log, out)
        free()
    log(f"wrote {out}")
    try:
        from bench import report

        md, png = report.write_report(out)
        log(f"wrote {md} and {png}")
    except ImportError as exc:
        log(f"no report: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
