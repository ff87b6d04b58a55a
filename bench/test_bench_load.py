"""Serving under load: CLIENTS threads each send REQUESTS single-image DDIM-20 requests (digits) back
to back to one-by-one calls, ``Engine.sample``, a coalescing and a continuous Server (images/s,
p50/p99 latency); ``test_burst``: 32 concurrent ``engine.sample`` calls against the same one by one."""

import random
import statistics
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


@pytest.mark.parametrize("backend", ["auto", "openvino"])
def test_burst(benchmark, backend):
    """32 concurrent single-image DDIM-20 calls of plain engine.sample against the same calls one by
    one, each on a fresh engine (its first burst: static compiles, first calls) and again (warm),
    in alternating rounds, medians; images compared (<= 1e-5). The target: the first burst >= 3x."""
    seeds, rounds = [random.getrandbits(64) for _ in range(32)], 3

    def one_by_one(eng):
        return [eng.sample([s], **OPTS) for s in seeds]

    def burst(eng):
        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(lambda s: eng.sample([s], **OPTS), seeds))

    seconds, images = {k: [] for k in ("serial first", "serial warm", "burst first", "burst warm")}, {}
    for _ in range(rounds):
        for name, run, batching in (("serial", one_by_one, False), ("burst", burst, True)):
            with Engine.from_pretrained("digits", backend=backend, batching=batching) as eng:
                for when in ("first", "warm"):
                    start = time.perf_counter()
                    images[name] = run(eng)
                    seconds[f"{name} {when}"].append(time.perf_counter() - start)
    worst = max((a - b).abs().max().item() for a, b in zip(images["serial"], images["burst"]))
    assert worst <= 1e-5, worst
    median = {k: statistics.median(v) for k, v in seconds.items()}
    speedup = {w: median[f"serial {w}"] / median[f"burst {w}"] for w in ("first", "warm")}
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.group = "serving load"
    benchmark.extra_info.update(backend=eng.backend.name, seconds=seconds, speedup=speedup, max_abs_diff=worst)
    print(f"\n32 calls, {backend} ({eng.backend.name}), medians of {rounds} rounds: one by one {median['serial first']:.2f} s"
          f" first / {median['serial warm']:.2f} s warm; concurrent engine.sample {median['burst first']:.2f} s first /"
          f" {median['burst warm']:.2f} s warm: {speedup['first']:.2f}x first, {speedup['warm']:.2f}x warm, "
          f"max |diff| {worst:.1e}")
