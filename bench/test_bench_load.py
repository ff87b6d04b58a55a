"""Load benchmark for serving: N concurrent clients, bounded in count and time.

    python -m pytest bench/test_bench_load.py --benchmark-only -q -s

CLIENTS threads each send REQUESTS single-image DDIM-20 requests (digits) back to back; each case
reports images/s and p50/p99 latency for one-by-one calls (``batching=False``), plain
``Engine.sample``, a coalescing Server and a continuous one. ``test_burst``: 32 concurrent calls of
``engine.sample`` against the same calls one by one, images compared.
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


def make_engine(**kw):
    if DIGITS.exists():
        return Engine.from_pretrained("digits", backend="torch", **kw)
    return Engine.from_module(SeedUNet(1, (32, 64, 128)).eval(), sample_shape=(1, 16, 16), backend="torch", **kw)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


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


@pytest.mark.parametrize("mode", ["one_by_one", "engine.sample", "coalesce", "continuous"])
def test_load(benchmark, engine, mode):
    server = None
    if mode == "one_by_one":
        serial = make_engine(batching=False)
        call = lambda s: serial.sample(s, **OPTS)  # noqa: E731
    elif mode == "engine.sample":
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


def test_burst(benchmark, engine):
    """32 concurrent single-image DDIM-20 calls of plain engine.sample vs the same calls one by one
    (the target: at least 2x), best of two alternating rounds each, images compared (<= 1e-5)."""
    seeds = [random.getrandbits(64) for _ in range(32)]

    def one_by_one():
        return [engine.sample([s], **OPTS) for s in seeds]

    def burst():
        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(lambda s: engine.sample([s], **OPTS), seeds))

    def timed(run):
        start = time.perf_counter()
        images = run()
        return time.perf_counter() - start, images

    rounds = [(timed(one_by_one), timed(burst)) for _ in range(2)]
    (t_serial, alone), (t_burst, together) = min(r[0] for r in rounds), min(r[1] for r in rounds)
    worst = max((a - b).abs().max().item() for a, b in zip(alone, together))
    assert worst <= 1e-5, worst
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.group = "serving load"
    benchmark.extra_info.update(serial_s=t_serial, burst_s=t_burst, speedup=t_serial / t_burst, max_abs_diff=worst)
    print(f"\n32 calls: one by one {t_serial:.2f} s, concurrent engine.sample {t_burst:.2f} s "
          f"= {t_serial / t_burst:.2f}x, max |diff| {worst:.1e}")
