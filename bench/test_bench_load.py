"""Serving under load: CLIENTS threads each send REQUESTS single-image DDIM-20 requests (digits) back
to back to one-by-one calls, ``Engine.sample``, a coalescing and a continuous Server (images/s,
p50/p99 latency); ``test_burst``: 32 concurrent ``engine.sample`` calls against the same one by one."""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.measure import client_load
from ddpm_engine import Engine
from ddpm_engine.serving import Server

CLIENTS, REQUESTS, TIME_LIMIT_S = 16, 4, 120
OPTS = dict(sampler="ddim", steps=20)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("digits", backend="torch")


@pytest.mark.parametrize("mode", ["one_by_one", "engine.sample", "coalesce", "continuous"])
def test_load(benchmark, engine, mode):
    server = Server(engine, mode=mode, max_batch=32, max_wait_ms=5) if mode in ("coalesce", "continuous") else None
    target = server if server is not None else (
        Engine.from_pretrained("digits", backend="torch", batching=False) if mode == "one_by_one" else engine)
    try:
        result = benchmark.pedantic(client_load, (lambda s: target.sample(s, **OPTS), CLIENTS, REQUESTS, TIME_LIMIT_S),
                                    rounds=1, iterations=1)
    finally:
        if server is not None:
            server.close()
    benchmark.group = "serving load"
    benchmark.extra_info.update(mode=mode, clients=CLIENTS, **result)
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
