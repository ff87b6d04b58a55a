"""Load benchmark for serving: N concurrent clients, bounded in count and time.

    python -m pytest bench/test_bench_load.py --benchmark-only -q -s

Each case runs CLIENTS threads that each send REQUESTS single-image requests back to back (DDIM-20,
the digits architecture at 16x16) and reports throughput and p50/p99 latency for one-by-one calls
(Engine.sample under its lock), request coalescing, and continuous batching. On a small shared CPU,
set OMP_NUM_THREADS=1: torch's OpenMP threads otherwise spin-wait for each other under load.
"""

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_engine import Engine
from ddpm_engine.models import SeedUNet
from ddpm_engine.serving import Server

CLIENTS, REQUESTS, TIME_LIMIT_S = 16, 4, 120
OPTS = dict(sampler="ddim", steps=20)
DIGITS = Path(__file__).resolve().parents[1] / "engine" / "bundled" / "digits" / "config.json"


@pytest.fixture(scope="module")
def engine():
    if DIGITS.exists():
        return Engine.from_pretrained("digits", backend="torch")
    return Engine.from_module(SeedUNet(1, (32, 64, 128)).eval(), sample_shape=(1, 16, 16), backend="torch")


def run_load(call):
    deadline = time.perf_counter() + TIME_LIMIT_S

    def client(k):
        lat = []
        for _ in range(REQUESTS):
            if time.perf_counter() > deadline:
                break
            start = time.perf_counter()
            call([random.getrandbits(64)])
            lat.append(time.perf_counter() - start)
        return lat

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        lats = [x for lat in pool.map(client, range(CLIENTS)) for x in lat]
    wall = time.perf_counter() - start
    return {"images_per_s": len(lats) / wall, "p50_s": float(np.percentile(lats, 50)),
            "p99_s": float(np.percentile(lats, 99)), "requests": len(lats), "wall_s": wall}


@pytest.mark.parametrize("mode", ["one_by_one", "coalesce", "continuous"])
def test_load(benchmark, engine, mode):
    if mode == "one_by_one":
        server = None
        call = lambda s: engine.sample(s, **OPTS)  # noqa: E731
    else:
        server = Server(engine, mode=mode, max_batch=32, max_wait_ms=5)
        call = lambda s: server.sample(s, **OPTS)  # noqa: E731
    try:
        result = benchmark.pedantic(run_load, args=(call,), rounds=1, iterations=1)
    finally:
        if server is not None:
            server.close()
    benchmark.group = "serving load"
    benchmark.extra_info.update(mode=mode, clients=CLIENTS, torch_threads=torch.get_num_threads(), **result)
    print(f"\n{mode:11s} {result['images_per_s']:7.1f} images/s  p50 {result['p50_s'] * 1e3:7.1f} ms  "
          f"p99 {result['p99_s'] * 1e3:7.1f} ms")
