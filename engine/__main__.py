"""Command line: ``python -m ddpm_engine {sample,export,train,info,check,serve}``."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from .backends.base import PRECISIONS
from .errors import EngineError
from .export.iospec import DEFAULT_OPSET
from .samplers import FEW_STEP_SAMPLER, FEW_STEP_SPACING, FEW_STEPS, SAMPLER_DEFS, SAMPLERS
from .schedules import SPACINGS


MAX_SCALE = 32


def grid_scale(text: str) -> int:
    """--scale: a whole number of pixels per image pixel in [1, MAX_SCALE]."""
    try:
        scale = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= scale <= MAX_SCALE:
        raise argparse.ArgumentTypeError(f"{scale} is outside [1, {MAX_SCALE}]")
    return scale


def non_negative_seconds(text: str) -> float:
    """--grace-s: a finite number of seconds >= 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return seconds


def writable_png(out: str) -> Path:
    """--out, checked before any sampling: a .png name in an existing folder that can be written."""
    from .errors import InvalidRequestError

    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise InvalidRequestError(f"--out {out}: the grid is written as PNG (with its seeds in the metadata); "
                                  "give a file name ending in .png")
    if not path.parent.is_dir():
        raise InvalidRequestError(f"--out {out}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise InvalidRequestError(f"--out {out} is a folder; give a file name ending in .png")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise InvalidRequestError(f"--out {out}: cannot write there ({exc.strerror}); choose another path") from None
    if not existed:
        path.unlink()
    return path.resolve()


def cmd_sample(args) -> int:
    import shlex

    import torch

    from .engine import Engine
    from .images import save_grid

    out = writable_png(args.out)
    replaced = out.exists()
    engine = Engine.from_pretrained(args.model, backend=args.backend, device=args.device, precision=args.precision,
                                    step_impl=args.step_impl)
    options = dict(sampler=args.sampler, steps=args.steps, eta=args.eta,
                   use_clipped_model_output=args.use_clipped_model_output, spacing=args.spacing,
                   guidance_scale=args.guidance_scale, cache_interval=args.cache_interval)
    plan = engine.plan(**options)  # validates the options before any work
    seeds = plan.seeds(args.seeds if args.seeds else args.n)  # drawn here, so they can be printed
    labels = args.class_labels
    if labels is not None and len(labels) == 1:
        labels = labels * len(seeds)  # one label for every image
    options["class_labels"] = labels = plan.labels(labels, len(seeds))  # the engine's checks, before any work
    options["sampler"] = plan.spec.sampler  # the default resolved: the command below names it
    again = ["python", "-m", "ddpm_engine", "sample", "--model", args.model, "--sampler", plan.spec.sampler,
             "--steps", str(plan.steps), "--eta", str(args.eta)]
    if isinstance(plan.spacing, str):  # else the model's own explicit timesteps, its default at these steps
        again[-2:-2] = ["--spacing", plan.spacing]
    if args.use_clipped_model_output is not None:
        again.append("--use-clipped-model-output" if args.use_clipped_model_output else "--no-use-clipped-model-output")
    if plan.guidance_scale != 1.0:
        again += ["--guidance-scale", str(plan.guidance_scale)]
    if plan.cache_interval != 1:
        again += ["--cache-interval", str(plan.cache_interval)]
    again += ["--seeds", *map(str, seeds)]
    if labels is not None:
        again += ["--class-labels", *map(str, labels)]  # one per seed, in the seeds' order
    start = time.perf_counter()
    images = engine.sample(seeds, progress=not args.quiet, **options)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    path = save_grid(images, out, scale=args.scale, seeds=seeds, text={"command": shlex.join(again)})
    print(f"{engine}")
    print(f"{images.shape[0]} images, {plan.name}: {seconds:.2f} s, "
          f"{seconds / plan.steps * 1e3:.2f} ms/step, {images.shape[0] / seconds:.2f} images/s")
    print(f"seeds (in the PNG's metadata too): {shlex.join(again[again.index('--seeds'):])}")  # with their labels
    print(f"wrote {path}" + (" (replaced the file that was there)" if replaced else ""))
    return 0


def cmd_export(args) -> int:
    from . import checkpoints
    from ddpm_engine.export.onnx_export import export_onnx

    loaded = checkpoints.load(args.model)
    path = export_onnx(loaded, path=args.out, opset=args.opset)
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .train import main as train_main

    return train_main([a for a in args.train_args if a != "--"])


def cmd_info(args) -> int:
    import torch

    from . import backends, cpu

    print(f"python {platform.python_version()} on {platform.machine()}")
    for pkg, version in backends.versions().items():
        print(f"  {pkg:16s} {version or 'not installed'}")
    devices = ["cpu"] + [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    if not torch.cuda.is_available():
        print("CUDA: not available (no GPU, or a CPU build of torch)")
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else cpu.describe()
        print(f"device {dev} ({name})")
        for backend, reason in backends.available(dev).items():
            print(f"  {backend:12s} {'available' if reason is None else 'unavailable: ' + reason}")
    if args.model:  # the measured choices for this model (cached on disk: backends/auto.py, torch_backend.py)
        from . import checkpoints
        from .backends.auto import decide
        from .backends.torch_backend import choose_layout

        loaded = checkpoints.load(args.model)
        print(decide(loaded, "cpu", args.precision)[0].report())
        if PRECISIONS[args.precision] is not None:  # the torch backend runs no quantized precision
            print(choose_layout(loaded, args.precision)[0].report())
    print_fast_path(devices[-1])
    return 0


def print_fast_path(device: str) -> None:
    """The default path's report (Engine.fast_path) after one short digits run on ``device``."""
    from .engine import Engine

    try:
        engine = Engine.from_pretrained("digits", device=device, batching=False)
        engine.sample([0], sampler="ddim", steps=2)  # builds and checks the default path once
        reports = engine.fast_path()
        engine.close()
    except Exception as exc:  # info reports; it never fails on this
        print(f"fast path on {device}: not checked ({type(exc).__name__}: {exc})")
        return
    for r in reports:
        print(f"fast path on {device} (digits, {r['plan']}): {r['path']}; graphs: {r['graphs']}; "
              f"C driver: {r['c_driver']}")


def cmd_serve(args) -> int:
    """Serve until SIGTERM or Ctrl-C, then drain: new requests get 503, in-flight ones have
    --grace-s to finish (the rest get 503), Serve and the local Ray stop, and the process exits
    with status 0 (it does not return)."""
    import os
    import signal

    from . import ray_serve
    from .ray_serve import app, serve, start  # first: says what to install when Ray is missing

    import ray

    serving = False
    try:
        start(args.address, host=args.host, port=args.port,
              **({} if args.address else {"include_dashboard": args.dashboard}))
        # a service manager's stop: as Ctrl-C (after ray.init, which installs a handler of its own)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        name = f"ddpm-drain-{os.getpid()}-{time.time_ns()}"
        drain = ray_serve.drain_signal(name)
        serve.run(app(args.model, num_replicas=args.replicas, max_batch_size=args.max_batch_size, device=args.device,
                      backend=args.backend, grace_s=args.grace_s, max_body_bytes=args.max_body_bytes,
                      drain_signal=name), name="ddpm", route_prefix="/")
        serving = True
        where = f"the cluster at {args.address}" if args.address else "a local Ray"
        print(f"serving {args.model} ({args.replicas} replicas on {where}) at http://{args.host}:{args.port}/sample; "
              "Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the drain short
        if serving:
            print(f"draining (up to {args.grace_s:g} s)", flush=True)
            ray_serve.drain(drain, args.replicas, args.grace_s)
        print("stopping", flush=True)
    finally:
        if ray.is_initialized():
            if args.address:  # leave the cluster's Serve to its other applications
                serve.delete("ddpm")
            else:
                serve.shutdown()
                stop_ray_monitor()
            ray.shutdown()
    # Serve and Ray are down; what is left is the interpreter's teardown of torch and Ray's modules,
    # about a second on a small machine: skip it, so that the process ends within grace + 2 s
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop_ray_monitor() -> None:
    """Stop the autoscaler monitor of the Ray started here, before ``ray.shutdown()``: that stops the
    GCS first, and the monitor's SIGTERM handler then waits on the dead GCS until Ray kills it a
    second later (Ray 2.60), a second of the grace + 2 s an orchestrator allows. Ray's private node
    API: where it is missing, ``ray.shutdown()`` does it all, a second slower."""
    import ray

    try:
        ray._private.worker._global_node.kill_monitor(check_alive=False)
    except Exception:  # private, so it may be missing: ray.shutdown() stops it anyway
        pass


def cmd_check(args) -> int:
    """Parity of backends against eager torch, or of this run against a golden file: prints the
    table; 0 when every check passes, 1 when one fails (usage and engine errors: 2, from main)."""
    from pathlib import Path

    from . import testing
    from .errors import InvalidRequestError

    run = {k: getattr(args, k) for k in ("sampler", "steps", "seeds", "eta")}
    tol = {"atol": args.atol, "rtol": args.rtol}
    if args.save_golden:
        if args.backend:
            raise InvalidRequestError("--save-golden writes the run of --reference (default torch); "
                                      "leave out --backend")
        run = {k: v for k, v in run.items() if v is not None}
        path = testing.save_golden(args.model, args.save_golden, backend=args.reference,
                                   precision=args.precision or "fp32", device=args.device, **run)
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
        return 0
    if args.against:
        report = testing.compare_golden(args.model, args.against, backend=args.backend, precision=args.precision,
                                        device=args.device, **run, **tol)
    else:
        defaults = {"sampler": "ddim", "steps": 50, "seeds": list(testing.DEFAULT_SEEDS), "eta": 0.0}
        run = {k: defaults[k] if v is None else v for k, v in run.items()}
        report = testing.compare(args.model, backends=args.backend or "all", reference=args.reference,
                                 precision=args.precision or "fp32", device=args.device, **run, **tol)
    print(report.table())
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_engine", description="Sample from trained diffusion UNets.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample images and write a PNG grid")
    s.add_argument("--model", default="digits", help="bundled model name or model folder (default: digits)")
    s.add_argument("-n", "--n", type=int, default=16, help="number of images (fresh random seeds)")
    s.add_argument("--seeds", type=int, nargs="+", help="explicit 64-bit seeds (overrides -n)")
    s.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: ddpm, or with --steps up to "
                   f"{FEW_STEPS} the best few-step sampler ({FEW_STEP_SAMPLER}, {FEW_STEP_SPACING} spacing)")
    s.add_argument("--steps", type=int, default=None, help="reverse steps (default: the sampler's, " + ", ".join(
        f"{d.steps or 'T'} for {name}" for name, d in SAMPLER_DEFS.items()) + ")")
    s.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="which training timesteps the steps keep (default: the sampler's; DDPM takes the first three)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]")
    s.add_argument("--class-labels", type=int, nargs="+", default=None, metavar="N",
                   help="a class-conditional model's labels: one per image, or one for all")
    s.add_argument("--guidance-scale", type=float, default=1.0, metavar="F",
                   help="classifier-free guidance for a class-conditional model with a null label (default: 1, off)")
    s.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="reused deep features (DeepCache): the whole UNet every N steps, its shallow branch in "
                        "between (default: 1, off)")
    s.add_argument("--use-clipped-model-output", action=argparse.BooleanOptionalAction, default=None,
                   help="DDIM with clipping: eps from the clipped x0 (default: the model's scheduler config)")
    s.add_argument("--backend", default="auto")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    s.add_argument("--step-impl", default="auto", choices=["auto", "torch", "triton"])
    s.add_argument("--out", default="samples.png",
                   help="PNG grid to write, seeds in its metadata (default: samples.png in the current folder)")
    s.add_argument("--scale", type=grid_scale, default=4, help=f"pixel upscale of the grid, 1 to {MAX_SCALE} (default: 4)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("export", help="export a model to ONNX")
    e.add_argument("--model", default="digits")
    e.add_argument("--out", default=None, help="output .onnx path (default: the cache)")
    e.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="train a model (python -m ddpm_engine train --help)", add_help=False)
    t.add_argument("train_args", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="backends and devices available here, and why the others are not")
    i.add_argument("--model", default=None, help="also show the measured CPU choices for this model: auto's backend, "
                   "the torch backend's layout")
    i.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="precision of that choice")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("serve", help="serve over HTTP with Ray Serve replicas (pip install 'ddpm-engine[ray]')")
    v.add_argument("--model", default="digits", help="bundled model name or model folder (default: digits)")
    v.add_argument("--replicas", type=int, default=1, help="engine replicas (one per GPU with --device cuda)")
    v.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0: all interfaces)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--address", default=None, help="join the Ray cluster at this address (default: start Ray here)")
    v.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    v.add_argument("--backend", default="auto")
    v.add_argument("--max-batch-size", type=int, default=32, help="most requests per batch, images per engine call and per request")
    v.add_argument("--dashboard", action="store_true",
                   help="start Ray's dashboard with the local Ray (its processes outlive the exit by a second or two)")
    v.add_argument("--grace-s", type=non_negative_seconds, default=10.0,
                   help="on SIGTERM or Ctrl-C, how long in-flight requests may finish; the rest get 503 (default: 10)")
    v.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="larger request bodies get 413 (default: 4 MiB)")
    v.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="regression check: backends against eager torch, or against a golden file",
                       description="Run whole sampling chains on the reference and on each backend and compare "
                       "them step by step (network error on a shared trajectory, free-running divergence, "
                       "NaN/Inf). Exit status: 0 every check passed, 1 a check failed, 2 usage error.")
    c.add_argument("--model", default="digits", help="bundled model name or model folder (default: digits)")
    c.add_argument("--backend", nargs="+", default=None,
                   help="backends to check (default: every backend usable here; with --against: the golden's)")
    c.add_argument("--reference", default="torch", help="reference backend, run at fp32 (default: torch)")
    c.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="precision of the backends under test (default fp32; with --against: the golden's)")
    c.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: ddim")
    c.add_argument("--steps", type=int, default=None, help="default: 50")
    c.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 3")
    c.add_argument("--eta", type=float, default=None, help="DDIM eta (default: 0)")
    c.add_argument("--atol", type=float, default=None, help="override the precision's chain / image tolerance")
    c.add_argument("--rtol", type=float, default=None, help="override the precision's per-step network tolerance")
    c.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    c.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    golden = c.add_mutually_exclusive_group()
    golden.add_argument("--save-golden", metavar="FILE", help="write a golden file (.npz) of the reference's run")
    golden.add_argument("--against", metavar="FILE", help="compare this run with a golden file")
    c.set_defaults(func=cmd_check)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer owns its flags (argparse.REMAINDER drops leading --options)
        argv = ["train", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
