"""The graph sampler's own logic on the CPU: buckets, padding rows, static buffers, the in-place
step, the device-side step index and chunking above max_batch run without capture
(``capture=False`` replays the very function a GPU run captures) and must give Engine.sample's
images. Only capture and replay themselves are left for the GPU (tests/gpu)."""

import random

import pytest
import torch

from ddpm_engine import Engine
from ddpm_engine.cuda.graphs import GraphedSampler, buckets
from ddpm_engine.errors import BackendUnavailableError, InvalidRequestError
from ddpm_engine.models import SeedUNet

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch", device="cpu",
                              step_impl="torch", batching=False)


def test_buckets():
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(1) == [1]
    for bad in (0, -3, 2.0, True, "8"):
        with pytest.raises(InvalidRequestError):
            buckets(bad)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 12), ("ddim", 6)])
def test_uncaptured_graph_sampler_gives_engine_sample_images(engine, sampler, steps):
    """Batches of 1, 3 (padded to bucket 4), 4, and 9 (chunks of 4, 4, 1) against the eager loop."""
    seed = random.getrandbits(32)
    rng = random.Random(seed)
    graphed = engine.graphed(sampler, steps, max_batch=4, capture=False)
    assert graphed.capture is False and graphed.buckets == [1, 2, 4]
    for n in (1, 3, 4, 9):
        seeds = [rng.getrandbits(64) for _ in range(n)]
        want = engine.sample(seeds, sampler=sampler, steps=steps, driver="eager")
        got = graphed.run(seeds)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5, f"n={n}, seed={seed}"
    assert sorted(graphed._graphs) == [1, 4]  # bucket 1 for the lone and the last chunk, 4 for the rest
    again = graphed.run(seeds)  # static buffers are reset between runs
    assert torch.equal(again, got), f"seed={seed}"


def test_static_buffers_and_device_step_index(engine):
    graphed = GraphedSampler(engine.plan("ddim", 5), max_batch=2, capture=False)
    bucket = graphed.bucket(2)
    x_ptr = bucket.rows.x.data_ptr()
    graphed.run([1, 2])
    assert bucket.rows.x.data_ptr() == x_ptr  # the step wrote x in place: what a graph replays
    assert bucket.rows.i.tolist() == [0, 0]  # i walked down on the device and saturated at 0
    graphed.run([3])  # bucket 1: a different set of buffers
    assert bucket.rows.i.tolist() == [0, 0] and sorted(graphed._graphs) == [1, 2]


def test_capture_and_graph_drivers_need_cuda(engine):
    plan = engine.plan("ddim", 5)
    graphed = GraphedSampler(plan, max_batch=2, capture=False)
    for driver in ("c", "graph_loop"):
        with pytest.raises(BackendUnavailableError, match="captured"):
            graphed.run([1], driver=driver)
    with pytest.raises(InvalidRequestError):
        graphed.run([1], driver="cpp")
    with pytest.raises(InvalidRequestError):
        GraphedSampler(engine, max_batch=2)  # takes a plan, not an engine
    with pytest.raises(InvalidRequestError, match="too large"):
        GraphedSampler(plan, max_batch=plan.max_batch + 1, capture=False)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            GraphedSampler(plan, capture=True)
