"""Serving: concurrent callers, coalescing, continuous batching, cancellation, timeouts, bounds."""

import asyncio
import gc
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext

from pathlib import Path

import pytest
import torch

from ddpm_engine import Engine, EngineError, InvalidRequestError, QueueFullError
from ddpm_engine.models import DoubleConvUNet
from ddpm_engine.plan import SamplingPlan
from ddpm_engine.serving import Server, ServerClosedError

SHAPE = (1, 16, 16)
OPTS = dict(sampler="ddim", steps=20)
DIGITS = Path(__file__).resolve().parents[2] / "engine" / "bundled" / "digits" / "config.json"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core CPU torch's two OpenMP threads spin-wait for each
    other (measured here: DDIM-20 of one 16x16 image takes 0.1 s with 1 thread, 6-7 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, params=["exact", pytest.param("buckets", marks=pytest.mark.slow)])
def layout(request, monkeypatch):
    """Every test twice: rows in exact-size buffers (the CPU default) and in graph-bucket slots
    (engine/slots.py, the CUDA default; run here without capture). The second run is ``slow``: the
    quick loop checks the bucket slots in tests/engine/test_slots.py."""
    if request.param == "buckets":
        monkeypatch.setattr(SamplingPlan, "graphable", property(lambda self: True))
    return request.param


@pytest.fixture(scope="module")
def engine():
    """The bundled digits model when present, else its architecture with random weights."""
    if DIGITS.exists():
        return Engine.from_pretrained("digits", backend="torch")
    return Engine.from_module(DoubleConvUNet(1, (32, 64, 128)).eval(), sample_shape=SHAPE, backend="torch")


def seeds(n):
    return [random.getrandbits(64) for _ in range(n)]


def close_enough(a, b):
    """A seed's image in a batch against alone: oneDNN's fp32 convolutions sum in another order at
    another batch size, and 20 DDIM steps amplify it (measured 1e-6 typically, 1.1e-5 for one seed
    of TEST_SEED=408039136's 32)."""
    return (a - b).abs().max().item() <= 5e-5


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


def test_engine_sample_without_batching_is_thread_safe_and_serial():
    eng = Engine.from_pretrained("digits", backend="torch", batching=False) if DIGITS.exists() else \
        Engine.from_module(DoubleConvUNet(1, (32, 64, 128)).eval(), sample_shape=SHAPE, backend="torch", batching=False)
    ss = seeds(16)
    serial = [eng.sample([s], sampler="ddim", steps=5) for s in ss]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda s: eng.sample([s], sampler="ddim", steps=5), ss))
    assert all(torch.equal(a, b) for a, b in zip(got, serial))  # one call at a time: bitwise the same
    assert eng._auto is None  # no batching server was started


class CountingBackend:
    """Wraps a backend and counts its calls (the model calls of a run)."""

    def __init__(self, backend):
        self.inner, self.calls, self.rows = backend, 0, []
        self.name, self.owns_cpu_threads = backend.name, getattr(backend, "owns_cpu_threads", False)

    def __call__(self, x, t):
        self.calls += 1
        self.rows.append(x.shape[0])
        return self.inner(x, t)


def counting_engine(**kw):
    eng = Engine.from_pretrained("digits", backend="torch", **kw) if DIGITS.exists() else \
        Engine.from_module(DoubleConvUNet(1, (32, 64, 128)).eval(), sample_shape=SHAPE, backend="torch", **kw)
    eng.backend = CountingBackend(eng.backend)  # before the first plan: plans hold the engine's backend
    return eng


def test_concurrent_engine_sample_calls_batch_themselves(layout):
    """32 threads each call plain engine.sample([seed]) (DDIM-20): every caller gets the image its
    seed gives alone, on the engine's device, and far fewer model calls than 32 x 20 ran."""
    eng = counting_engine()
    ss = seeds(32)
    alone = [eng.sample([s], **OPTS) for s in ss]  # one by one: 20 model calls each
    serial_calls, eng.backend.calls = eng.backend.calls, 0
    canary = 2 if layout == "buckets" else 0  # bucket 1's canary: one eager step and one replay, once
    assert serial_calls == 32 * 20 + canary
    barrier = threading.Barrier(32)

    def call(s):
        barrier.wait()
        return eng.sample([s], **OPTS)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, ss))
    assert all(isinstance(g, torch.Tensor) and g.device == eng.device and g.shape == (1, *SHAPE) for g in got)
    worst = max((a - b).abs().max().item() for a, b in zip(got, alone))
    assert worst <= 5e-5, worst  # see close_enough
    assert eng.backend.calls <= serial_calls // 4, (eng.backend.calls, max(eng.backend.rows))
    assert max(eng.backend.rows) > 1  # rows of several callers shared one model call
    eng.close()


def test_a_bad_call_fails_alone_and_at_once_while_others_batch():
    eng = counting_engine()
    ss = seeds(8)
    alone = {s: eng.sample([s], **OPTS) for s in ss}
    with ThreadPoolExecutor(9) as pool:
        good = [pool.submit(eng.sample, [s], **OPTS) for s in ss]
        for bad in (dict(steps=0), dict(sampler="euler"), dict(eta=2.0)):
            with pytest.raises(InvalidRequestError):
                eng.sample([1], **{**OPTS, **bad})
        with pytest.raises(InvalidRequestError, match="fit"):
            eng.sample(10**12, **OPTS)  # refused before a single seed is drawn
        results = [f.result(60) for f in good]
    assert all(close_enough(r, alone[s]) for r, s in zip(results, ss))
    eng.close()


def test_a_lone_call_runs_its_own_batch_at_once(layout):
    """A lone caller is not held back waiting for company: its batch is admitted immediately
    (max_wait 0), and it is the only row of every model call."""
    eng = counting_engine()
    eng.sample([5], **OPTS)
    canary = 2 if layout == "buckets" else 0  # bucket 1's canary: one eager step and one replay
    assert eng._auto.max_wait == 0.0 and eng.backend.rows == [1] * (20 + canary)
    eng.close()


def test_continuous_batching_joins_mid_trajectory(engine):
    ddpm = dict(sampler="ddpm", steps=100)
    with Server(engine, mode="continuous", max_batch=16, max_wait_ms=1) as server:
        first_seeds, late_seeds = seeds(2), seeds(3)
        first = server.submit(first_seeds, **ddpm)
        while server.metrics()["batch_rows"]["histogram"].get(2, 0) < 5:  # first is mid-trajectory
            time.sleep(0.001)
        late = server.submit(late_seeds, **ddpm)
        other = server.submit([5], sampler="ddim", steps=10)  # another group runs side by side
        a, b, c = first.result(60), late.result(60), other.result(60)
        rows = server.metrics()["batch_rows"]["histogram"]
    assert 5 in rows and 3 in rows  # late joined first's batch; first left it as soon as it finished
    assert close_enough(a, engine.sample(first_seeds, **ddpm))
    assert close_enough(b, engine.sample(late_seeds, **ddpm))
    assert close_enough(c, engine.sample([5], sampler="ddim", steps=10))


def test_cancellation_pending_and_running(engine):
    with Server(engine, mode="continuous", max_batch=4, max_wait_ms=1) as server:
        running = server.submit(seeds(4), sampler="ddpm", steps=400)
        while server.metrics()["running_rows"] == 0:
            time.sleep(0.001)
        queued = server.submit(seeds(1), **OPTS)  # the batch is full: it waits
        assert queued.cancel() and running.cancel()
        done, _ = wait([running, queued], timeout=30)  # the server notifies waiters of cancellations
        assert len(done) == 2
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
    assert a.cancel()  # a cancelled request frees its slot
    c = server.submit([3], **OPTS)
    server.close()
    for f in (b, c):
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


class Flaky(torch.nn.Module):
    """A tiny UNet that raises while ``fail`` is set."""

    def __init__(self):
        super().__init__()
        self.net, self.fail = DoubleConvUNet(1, (4, 8)).eval(), False

    def forward(self, x, t):
        if self.fail:
            raise RuntimeError("simulated out of memory")
        return self.net(x, t)


def test_a_failing_batch_fails_alone_and_the_server_goes_on(layout):
    tiny = Engine.from_module(Flaky(), sample_shape=(1, 4, 4), backend="torch")
    flaky = tiny.backend.module  # the backend runs its own copy of the module
    opts = dict(sampler="ddim", steps=3)
    # in graph-bucket slots the failure comes first in the bucket's build: graphs are refused, with a
    # warning, and the eager loop then fails too
    refused = pytest.warns(RuntimeWarning, match="CUDA graphs are off") if layout == "buckets" else nullcontext()
    with Server(tiny, max_batch=8, max_wait_ms=1) as server:
        flaky.fail = True
        with refused, pytest.raises(EngineError, match="simulated out of memory"):
            server.sample([1, 2], **opts)
        flaky.fail = False
        assert close_enough(server.sample([3], **opts), tiny.sample([3], **opts))
        assert server.metrics()["failed"] == 1


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

    tiny = Engine.from_module(DoubleConvUNet(1, (4, 8)).eval(), sample_shape=(1, 4, 4), backend="torch")
    threads_before = set(threading.enumerate())
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
    assert set(threading.enumerate()) - threads_before == set()  # the scheduler thread is gone
    assert end - mid < 2_000_000, (mid, end)  # the second 500 requests left (almost) nothing behind
