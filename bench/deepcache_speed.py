"""End-to-end speed of reused deep features (``cache_interval``) against the same engine without it.

    python -m bench.deepcache_speed --out bench/results [--backends torch openvino] [--intervals 1 2 3]

The DDPM CIFAR-10 UNet (random weights: the time does not depend on them), batch 1, DDPM respaced
to ``--steps`` (100) steps, on the CPU. The variants run interleaved, ``--reps`` rounds of one run
each after a warm-up run (which builds every graph), and each variant's median wall time is
reported with its ratio to ``cache_interval=1`` of the same backend; the load average before and
after is recorded, as timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

from ddpm_engine import Engine, cpu

from .measure import cifar_loaded, save_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.deepcache_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--backends", nargs="+", default=["torch", "openvino"])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--intervals", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    loaded, load_before = cifar_loaded(), os.getloadavg()
    engines = {b: Engine(loaded, backend=b, device="cpu", precision=args.precision, batching=False)
               for b in args.backends}
    variants = [(b, n) for b in args.backends for n in args.intervals]
    times = {v: [] for v in variants}
    for rep in range(args.reps + 1):  # round 0: warm-up (graph builds, layout choices), not kept
        for backend, n in variants:
            start = time.perf_counter()
            engines[backend].sample([rep], sampler="ddpm", steps=args.steps, cache_interval=n)
            if rep:
                times[(backend, n)].append(time.perf_counter() - start)
                print(f"round {rep}: {backend} cache_interval={n}: {times[(backend, n)][-1]:.3f} s", flush=True)
    rows = []
    for backend, n in variants:
        median = statistics.median(times[(backend, n)])
        base = statistics.median(times[(backend, args.intervals[0])])
        rows.append({"backend": backend, "precision": args.precision, "cache_interval": n, "median_s": median,
                     "runs_s": times[(backend, n)], "speedup_vs_first": base / median})
        print(f"{backend:12s} cache_interval={n}: {median:.3f} s (x{base / median:.2f})", flush=True)
    date = datetime.date.today().isoformat()
    result = {"date": date, "model": "DDPM CIFAR-10 UNet (random weights), batch 1", "sampler": f"ddpm-{args.steps}",
              "cpu": cpu.describe(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "method": f"interleaved, {args.reps} rounds after a warm-up round; medians", "rows": rows}
    path = save_result(args.out, f"deepcache-speed-{date}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
