"""The graph sampler's own logic on the CPU: buckets, padding rows, static buffers, the in-place
step, the device-side step index and chunking above max_batch run without capture
(``capture=False`` replays the very function a GPU run captures) and must give Engine.sample's
images. Only capture and replay themselves are left for the GPU (tests/gpu)."""

import random

import pytest
import torch

from ddpm_engine import Engine
from ddpm_engine.cuda import graphs
from ddpm_engine.cuda.graphs import GraphedSampler, GraphsRefused, buckets, canary_mismatch
from ddpm_engine.errors import BackendUnavailableError, InvalidRequestError
from ddpm_engine.models import DoubleConvUNet
from ddpm_engine.stepping import Rows

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine.from_module(DoubleConvUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch", device="cpu",
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


def test_engine_graphed_and_the_graph_drivers_share_one_sampler_per_plan(engine):
    """capture=None is the plan's default (no capture on the CPU): the same cached sampler as the
    explicit value, so a bench that warms ``engine.graphed(...)`` times the sampler it captured."""
    assert engine.graphed("ddim", 5, max_batch=2) is engine._graphed(engine.plan("ddim", 5), 2, capture=False)


# ---- the canary and the fallback: faulty buckets injected on the CPU ---------------------------
def corrupt(bucket):
    bucket.one_step()
    bucket.rows.x.add_(0.01)  # far above the fp32 tolerance, small enough to look plausible


def nan(bucket):
    bucket.one_step()
    bucket.rows.x[0].fill_(float("nan"))


def raises(bucket):
    raise RuntimeError("an illegal memory access was encountered")


@pytest.mark.parametrize("fault,why", [(corrupt, "differs from one eager reverse_step"), (nan, "NaN"),
                                       (raises, "illegal memory access")])
def test_a_faulty_replay_is_caught_and_the_eager_loop_gives_the_same_images(engine, monkeypatch, fault, why):
    seeds = [random.getrandbits(64) for _ in range(3)]
    want = engine.sample(seeds, sampler="ddpm", steps=6, driver="eager")
    monkeypatch.setattr(graphs.Bucket, "replay", fault)
    gs = GraphedSampler(engine.plan("ddpm", 6), max_batch=4, capture=False)
    with pytest.warns(RuntimeWarning, match=why) as warned:
        got = gs.run(seeds)
        again = gs.run(seeds)  # refused for good: no second canary, no second warning
    assert len(warned) == 1
    assert torch.equal(got, want) and torch.equal(again, want), seeds
    report = gs.report()
    assert report["path"] == "eager" and report["graphs"].startswith("refused: bucket 4:") and why in report["graphs"]
    with pytest.raises(GraphsRefused, match=why):  # an explicit driver says so instead of running eagerly
        gs.run(seeds, driver="python")


def test_the_canary_runs_on_the_real_rows_of_a_request(engine, monkeypatch):
    """A replay wrong only for some rows (here: rows of one seed) is caught on that request."""
    plan = engine.plan("ddim", 4)
    seeds = [random.getrandbits(64) for _ in range(2)]
    target = plan.start(seeds[1:]).words[0]

    def wrong_for_one_seed(bucket):
        bucket.one_step()
        hit = (bucket.rows.words == target).all(dim=1)
        bucket.rows.x[hit] += 1.0

    monkeypatch.setattr(graphs.Bucket, "replay", wrong_for_one_seed)
    gs = GraphedSampler(plan, max_batch=2, capture=False)
    with pytest.warns(RuntimeWarning, match="differs"):
        got = gs.run(seeds)
    assert torch.equal(got, engine.sample(seeds, sampler="ddim", steps=4, driver="eager")), seeds


def test_a_replay_that_fails_after_the_canary_falls_back_too(engine, monkeypatch):
    calls = []

    def fails_later(bucket):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("replay failed at step 2")
        bucket.one_step()

    monkeypatch.setattr(graphs.Bucket, "replay", fails_later)
    gs = GraphedSampler(engine.plan("ddim", 5), max_batch=2, capture=False)
    seeds = [random.getrandbits(64)]
    with pytest.warns(RuntimeWarning, match="replay failed at step 2"):
        got = gs.run(seeds)
    assert torch.equal(got, engine.sample(seeds, sampler="ddim", steps=5, driver="eager")), seeds
    assert "replay with driver 'python'" in gs.report()["graphs"]


def test_a_good_bucket_is_verified_and_reported(engine):
    gs = GraphedSampler(engine.plan("ddim", 3), max_batch=4, capture=False)
    assert gs.report() == {"plan": "ddim-3 eta=0", "path": "graphs",
                           "graphs": "no bucket built yet (uncaptured: capture=False)",
                           "c_driver": "not used without capture"}
    gs.run([1, 2, 3])
    assert gs.report()["graphs"] == "verified by the canary: buckets [4] (uncaptured: capture=False)"


def test_canary_tolerance_is_per_precision(engine):
    rows = engine.plan("ddim", 3).start([1, 2])
    off = Rows.cat([rows])
    off.x += 1e-3  # about bf16's rounding: a failure in fp32, within reduced precision's tolerance
    assert "differs" in canary_mismatch(off, rows, "fp32")
    assert canary_mismatch(off, rows, "bf16") is None and canary_mismatch(rows, rows, "fp32") is None
    off = Rows.cat([rows])
    off.i -= 1
    assert "step indices" in canary_mismatch(off, rows, "fp32")


def test_fast_path_and_server_metrics_report_a_refusal(monkeypatch):
    from ddpm_engine.serving import Server

    torch.manual_seed(0)
    eng = Engine.from_module(DoubleConvUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch", device="cpu",
                             step_impl="torch", batching=False)
    seeds = [random.getrandbits(64) for _ in range(2)]
    want = eng.sample(seeds, sampler="ddim", steps=3, driver="eager")
    assert eng.fast_path() == [{"plan": "ddim-3 eta=0", "path": "eager", "graphs": "not used: no CUDA graphs on cpu",
                                "c_driver": "not used"}]
    monkeypatch.setattr(graphs.Bucket, "replay", corrupt)
    with Server(eng, max_batch=4, max_wait_ms=1, graphs=True) as server:
        with pytest.warns(RuntimeWarning, match="differs"):
            got = server.submit(seeds, sampler="ddim", steps=3).result(60)
        assert torch.equal(got, want), seeds  # the batch went on without graphs: the eager images
        (report,) = server.metrics()["fast_path"]
        assert report["plan"] == "ddim-3 eta=0" and report["path"] == "eager" and "differs" in report["graphs"]
        eng._server = server  # as engine.serve() would hold it
        assert eng.fast_path() == [report]
        eng._server = None
