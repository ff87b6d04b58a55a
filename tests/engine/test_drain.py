"""``Server.close(grace_s=...)``: a drain. New requests are refused at once, the accepted ones
finish within the grace period with their lone images, and those still running when it ends
fail with ServerClosedError, their batches stopped. The CLI's drain on SIGTERM, in real
processes: tests/engine/test_lifecycle.py."""

import threading
import time

import pytest

from ddpm_engine import Engine, InvalidRequestError
from ddpm_engine.serving import Server, ServerClosedError


def same(a, b) -> bool:
    """A batched request's images are its lone images (to float rounding in batched matmuls)."""
    return a.shape == b.shape and (a - b).abs().max().item() <= 5e-5


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("digits", device="cpu", backend="torch")


def test_a_drain_refuses_new_requests_and_lets_the_accepted_ones_finish(engine):
    server = Server(engine, max_batch=8)
    accepted = {k: server.submit([k], sampler="ddim", steps=100) for k in range(3)}
    closing = threading.Thread(target=server.close, kwargs=dict(grace_s=60.0))
    closing.start()
    refused = None
    for k in range(3, 1000):  # accepted until the drain begins, then refused
        try:
            accepted[k] = server.submit([k], sampler="ddim", steps=3)
        except ServerClosedError as exc:
            refused, running = exc, not accepted[0].done()
            break
        time.sleep(0.002)
    closing.join(60)
    assert refused is not None and "shutting down" in str(refused)
    assert running  # refused while the first requests still ran
    assert not closing.is_alive()
    for k, future in accepted.items():
        steps = 100 if k < 3 else 3
        assert same(future.result(0), engine.sample([k], sampler="ddim", steps=steps)), k
    with pytest.raises(ServerClosedError):
        server.submit([1], sampler="ddim", steps=3)


def test_what_outlasts_the_grace_period_fails_and_its_batch_stops(engine):
    server = Server(engine, max_batch=8)
    short = server.submit([1], sampler="ddim", steps=5)
    long = server.submit(list(range(8)), sampler="ddpm")  # 1000 steps: seconds on a CPU
    time.sleep(0.2)
    start = time.monotonic()
    server.close(grace_s=0.3)
    elapsed = time.monotonic() - start
    assert same(short.result(0), engine.sample([1], sampler="ddim", steps=5))
    with pytest.raises(ServerClosedError):
        long.result(0)
    assert 0.3 <= elapsed < 2.0, elapsed  # the grace, then the step in progress
    assert not server._thread.is_alive()  # its batch stopped: no step runs past the close
    assert server.metrics()["failed"] == 1


def test_close_without_grace_fails_what_is_unfinished_at_once(engine):
    server = Server(engine, max_batch=8)
    long = server.submit([1], sampler="ddpm")
    time.sleep(0.1)
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 1.0
    with pytest.raises(ServerClosedError):
        long.result(0)


@pytest.mark.parametrize("grace_s", [-1, True, float("inf"), float("nan"), "10"])
def test_a_bad_grace_period_is_refused(engine, grace_s):
    server = Server(engine, max_batch=8)
    with pytest.raises(InvalidRequestError, match="grace_s must be a number of seconds"):
        server.close(grace_s=grace_s)
    server.close()
