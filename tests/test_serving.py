"""Serving: concurrent callers, coalescing, continuous batching, cancellation, timeouts, bounds."""

import asyncio
import gc
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine import Engine, InvalidRequestError, QueueFullError
from engine.models import SeedUNet
from engine.serving import Server, ServerClosedError

SHAPE = (1, 16, 16)
OPTS = dict(sampler="ddim", steps=20)


@pytest.fixture(scope="module")
def engine():
    """The digits architecture with random weights (the bundled model when present)."""
    try:
        return Engine.from_pretrained("digits", backend="torch")
    except Exception:
        return Engine.from_module(SeedUNet(1, (32, 64, 128)).eval(), sample_shape=SHAPE, backend="torch")


def seeds(n):
    return [random.getrandbits(64) for _ in range(n)]


def close_enough(a, b):
    return (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ["continuous", "coalesce"])
def test_32_threads_get_the_images_their_seeds_give_alone(engine, mode):
    ss = seeds(32)
    serial = [engine.sample([s], **OPTS) for s in ss]
    with Server(engine, mode=mode, max_batch=32, max_wait_ms=20) as server:
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda s: server.sample([s], **OPTS), ss))
        m = server.metrics()
    assert all(close_enough(a, b) for a, b in zip(got, serial))
    assert m["completed"] == 32 and m["batch_rows"]["max"] > 1  # they really were batched


def test_engine_sample_is_thread_safe(engine):
    ss = seeds(32)
    serial = [engine.sample([s], sampler="ddim", steps=5) for s in ss]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda s: engine.sample([s], sampler="ddim", steps=5), ss))
    assert all(torch.equal(a, b) for a, b in zip(got, serial))


def test_a_burst_is_at_least_twice_as_fast_as_one_by_one(engine):
    ss = seeds(32)
    start = time.perf_counter()
    for s in ss:
        engine.sample([s], **OPTS)
    one_by_one = time.perf_counter() - start
    with Server(engine, max_batch=32, max_wait_ms=20) as server:
        start = time.perf_counter()
        futures = [server.submit([s], **OPTS) for s in ss]
        for f in futures:
            f.result()
        burst = time.perf_counter() - start
    assert one_by_one >= 2 * burst, (one_by_one, burst)


def test_continuous_batching_joins_mid_trajectory(engine):
    with Server(engine, mode="continuous", max_batch=16, max_wait_ms=1) as server:
        first = server.submit(seeds(2), sampler="ddpm", steps=40)
        while server.metrics()["running_rows"] == 0:
            time.sleep(0.001)
        time.sleep(0.05)  # the first request is mid-trajectory now
        late_seeds = seeds(3)
        late = server.submit(late_seeds, sampler="ddpm", steps=40)
        other = server.submit([5], sampler="ddim", steps=10)  # another group runs side by side
        a, b, c = first.result(30), late.result(30), other.result(30)
        rows = server.metrics()["batch_rows"]["histogram"]
    assert 5 in rows  # both requests shared steps
    assert close_enough(b, engine.sample(late_seeds, sampler="ddpm", steps=40))
    assert close_enough(c, engine.sample([5], sampler="ddim", steps=10))
    assert a.shape == (2, *SHAPE)


def test_cancellation_pending_and_running(engine):
    with Server(engine, mode="continuous", max_batch=4, max_wait_ms=1) as server:
        running = server.submit(seeds(4), sampler="ddpm", steps=400)
        while server.metrics()["running_rows"] == 0:
            time.sleep(0.001)
        queued = server.submit(seeds(1), **OPTS)  # the batch is full: it waits
        assert queued.cancel() and running.cancel()
        survivor = server.submit([9], **OPTS)
        assert close_enough(survivor.result(30), engine.sample([9], **OPTS))
        time.sleep(0.05)
        m = server.metrics()
    assert running.cancelled() and queued.cancelled()
    assert m["cancelled"] == 2 and m["running_rows"] == 0


def test_timeouts(engine):
    with Server(engine, max_batch=8, max_wait_ms=1) as server:
        slow = server.submit(seeds(1), sampler="ddpm", steps=1000, timeout=0.05)
        with pytest.raises(TimeoutError):
            slow.result(30)
        ok = server.submit([3], timeout=30, **OPTS)
        assert close_enough(ok.result(30), engine.sample([3], **OPTS))
        assert server.metrics()["timed_out"] == 1


def test_full_queue_and_close(engine):
    server = Server(engine, max_batch=32, max_wait_ms=60_000, max_queue=2)  # nothing starts for a minute
    a, b = server.submit([1], **OPTS), server.submit([2], **OPTS)
    with pytest.raises(QueueFullError, match="max_queue"):
        server.submit([3], **OPTS)
    server.close()
    for f in (a, b):
        with pytest.raises(ServerClosedError):
            f.result(5)
    with pytest.raises(ServerClosedError):
        server.submit([4], **OPTS)


def test_bad_request_in_a_burst_is_rejected_alone(engine):
    with Server(engine, max_batch=32, max_wait_ms=10) as server:
        good = [server.submit([s], **OPTS) for s in range(8)]
        for bad in [dict(batch=[-1]), dict(batch=1, sampler="euler"), dict(batch=1, steps=0),
                    dict(batch=1, sampler="ddim", eta=2.0), dict(batch=64), dict(batch=1, timeout=-1)]:
            batch = bad.pop("batch")
            with pytest.raises(InvalidRequestError):
                server.submit(batch, **{**OPTS, **bad})
        good += [server.submit([s], **OPTS) for s in range(8, 16)]
        results = [f.result(30) for f in good]
        assert server.metrics()["rejected"] == 6
    assert close_enough(results[12], engine.sample([12], **OPTS))


def test_asyncio_api(engine):
    async def main():
        return await asyncio.gather(*(engine.sample_async([s], sampler="ddim", steps=5) for s in range(6)))

    try:
        got = asyncio.run(main())
    finally:
        engine.close()
    assert all(close_enough(g, engine.sample([s], sampler="ddim", steps=5)) for s, g in enumerate(got))


def test_engine_submit_returns_a_future(engine):
    try:
        f = engine.submit([4], sampler="ddim", steps=5)
        assert close_enough(f.result(30), engine.sample([4], sampler="ddim", steps=5))
    finally:
        engine.close()


def test_no_leaks_after_a_thousand_requests():
    import tracemalloc

    tiny = Engine.from_module(SeedUNet(1, (4, 8)).eval(), sample_shape=(1, 4, 4), backend="torch")
    threads_before = threading.active_count()
    tracemalloc.start()
    with Server(tiny, max_batch=64, max_wait_ms=1) as server:
        futures = [server.submit([s], sampler="ddim", steps=1) for s in range(500)]
        [f.result(60) for f in futures]
        gc.collect()
        mid = tracemalloc.get_traced_memory()[0]
        futures = [server.submit([s], sampler="ddim", steps=1) for s in range(500)]
        [f.result(60) for f in futures]
        del futures
        gc.collect()
        end = tracemalloc.get_traced_memory()[0]
        assert server.metrics()["completed"] == 1000
    tracemalloc.stop()
    time.sleep(0.05)
    assert threading.active_count() == threads_before
    assert end - mid < 2_000_000, (mid, end)  # the second 500 requests left (almost) nothing behind
