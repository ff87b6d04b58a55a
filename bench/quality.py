"""Sample quality against network calls on the bundled digits model, measured with the digits judge.

    python -m bench.quality --out bench/results [--n 500] [--configs ddpm:1000 ddim:20 ...]
                            [--spacings trailing karras ...] [--reuse earlier.json] [--cache-interval N]

Per (sampler, steps[, spacing]): the share of ``--n`` images from fixed seeds that ``DigitsJudge``
recognises, the class spread (normalised entropy: 1 = all ten equally often), the Fréchet distance
to the real digits (``DigitsJudge.frechet_distance``: lower is better), the wall time and the time
per image; JSON and PNG. ``--spacings``: each configuration below T steps once per timestep
spacing, passed to ``engine.sample`` as ``spacing=`` (without it, no ``spacing`` argument: each
sampler's own; a T-step run keeps every timestep and runs once, without it).
``--cache-interval N``: every run with ``engine.sample(cache_interval=N)`` (reused deep features).
``--reuse``: rows of an earlier result with the same (sampler, steps, spacing, samples) are copied,
not measured again (DDPM-1000 takes ~10 min of CPU at n = 1000).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_engine import Engine, backends, cpu
from ddpm_engine.data import DigitsJudge
from ddpm_engine.errors import require

from .measure import save_result

CONFIGS = [("ddpm", 1000)] + [(s, n) for s in ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc") for n in (5, 10, 15, 20)]
# The few-step table (docs/performance.md, "Five steps"): DDPM-1000, then every other sampler at 3, 5 and 10 steps
FEW_STEP_CONFIGS = [("ddpm", 1000)] + [(s, n) for s in ("ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "dpmpp_3m",
                                                       "unipc_3", "ipndm") for n in (3, 5, 10)]
SEED0 = 10_000


def measure(engine, judge, sampler: str, steps: int, n: int, chunk: int = 250, spacing: str | None = None,
            cache_interval: int = 1) -> dict:
    seeds, start = list(range(SEED0, SEED0 + n)), time.perf_counter()
    options = dict(sampler=sampler, steps=steps) | ({} if spacing is None else {"spacing": spacing})
    options |= {} if cache_interval == 1 else {"cache_interval": cache_interval}  # asked for only when on
    images = torch.cat([engine.sample(seeds[k:k + chunk], **options) for k in range(0, n, chunk)])
    wall = time.perf_counter() - start
    ok, digit = judge.recognise(images)
    counts = np.bincount(digit[ok], minlength=10)
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {"sampler": sampler, "steps": steps, "network_calls": steps, "samples": n, "pass_rate": float(ok.mean()),
            "digits_found": int((counts > 0).sum()), "per_digit": counts.tolist(),
            "class_entropy": float(-(p * np.log(p)).sum() / np.log(10)), "frechet": judge.frechet_distance(images),
            "wall_s": wall, "ms_per_image": 1000 * wall / n, "spacing": spacing, "cache_interval": cache_interval}


def row_key(row: dict) -> tuple:
    """What makes two rows the same measurement."""
    return row["sampler"], row["steps"], row.get("spacing"), row["samples"], row.get("cache_interval", 1)


def plot(rows: list, path: Path) -> Path:
    require("matplotlib", "bench/quality.py's plot").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        rs = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["network_calls"])
        ax.plot([r["network_calls"] for r in rs], [100 * r["pass_rate"] for r in rs], "o-", label=sampler)
    ax.set(xscale="log", xlabel="network calls per image (steps)", ylabel="recognised as digits (%)",
           title="bundled digits model: quality against steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--n", type=int, default=500, help="samples per configuration")
    ap.add_argument("--backend", default="auto", choices=backends.BACKENDS)
    ap.add_argument("--precision", default="fp32", choices=list(backends.PRECISIONS))
    ap.add_argument("--configs", nargs="+", default=None, help="sampler:steps pairs (default: DDPM-1000, then each "
                    "few-step sampler at 5, 10, 15 and 20 steps), or 'few-step': DDPM-1000 and every other "
                    "sampler at 3, 5 and 10 steps")
    ap.add_argument("--spacings", nargs="+", default=None, help="timestep spacings: each configuration once per "
                    "spacing, passed as engine.sample(spacing=...) (default: none passed, each sampler's own)")
    ap.add_argument("--reuse", default=None, help="an earlier result JSON: its rows of the same configuration and "
                    "--n are copied instead of measured")
    ap.add_argument("--cache-interval", type=int, default=1, help="engine.sample(cache_interval=N) in every run")
    args = ap.parse_args(argv)
    if args.configs == ["few-step"]:
        configs = FEW_STEP_CONFIGS
    else:
        configs = CONFIGS if args.configs is None else [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs]
    spacings = args.spacings or [None]
    earlier = {} if args.reuse is None else {row_key(r): r for r in json.loads(Path(args.reuse).read_text())["rows"]}
    engine = Engine.from_pretrained("digits", device="cpu", batching=False, backend=args.backend,
                                    precision=args.precision)
    judge, rows = DigitsJudge(), []
    T = engine.scheduler.num_train_timesteps
    for sampler, steps in configs:
        for spacing in spacings if steps < T else [None]:  # T steps keep every timestep: nothing to space
            r = earlier.get((sampler, steps, spacing, args.n, args.cache_interval))
            reused = r is not None
            if reused:
                r = {"ms_per_image": 1000 * r["wall_s"] / r["samples"], **r, "reused_from": Path(args.reuse).name}
            else:
                r = measure(engine, judge, sampler, steps, args.n, spacing=spacing, cache_interval=args.cache_interval)
            rows.append(r)
            print(f"{sampler:12s} {steps:5d} steps{'' if spacing is None else ' ' + spacing}: "
                  f"{100 * r['pass_rate']:5.1f}% recognised, {r['digits_found']} digits, entropy {r['class_entropy']:.3f}, "
                  f"FD {r['frechet']:.1f}, {r['wall_s']:.1f} s{' (reused)' if reused else ''}", flush=True)
    date = datetime.date.today().isoformat()
    result = {"date": date, "model": "digits (bundled)", "backend": engine.backend.name,
              "precision": engine.backend.precision, "cpu": cpu.describe(),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "judge": "DigitsJudge: MLP and 10-NN agree with p >= 0.8", "rows": rows}
    cached = "" if args.cache_interval == 1 else f"-cache{args.cache_interval}"
    name = f"quality-{date}-{engine.backend.name}-{engine.backend.precision}{cached}.json"
    path = save_result(args.out, name, result)
    print(f"wrote {path} and {plot(rows, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
