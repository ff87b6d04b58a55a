"""SlotBatch (engine/slots.py): requests joining and leaving a running batch, in graph buckets
(the CUDA-graph sampler's buffers, run here without capture) or in exact-size buffers. Whatever
the order of joins and leaves, every request gets the images its seeds give alone; and the
default path of Engine.sample takes the buckets wherever ``plan.graphable``."""

import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm_engine import Engine
from ddpm_engine.cuda.graphs import GraphedSampler, buckets
from ddpm_engine.models import DoubleConvUNet
from ddpm_engine.plan import SamplingPlan
from ddpm_engine.serving import Server
from ddpm_engine.slots import SlotBatch

SHAPE = (1, 8, 8)
MAX_BATCH = 8
PLANS = [("ddpm", 6, 0.0), ("ddim", 5, 0.5), ("dpmpp_2m", 5, 0.0)]


class CountingBackend:
    """Wraps a backend; records the rows of every model call."""

    def __init__(self, inner):
        self.inner = inner
        self.rows = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t):
        self.rows.append(x.shape[0])
        return self.inner(x, t)


def tiny_engine(**kw):
    torch.manual_seed(0)
    eng = Engine.from_module(DoubleConvUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch", device="cpu",
                             step_impl="torch", **kw)
    eng.backend = CountingBackend(eng.backend)  # before the first plan: plans hold the engine's backend
    return eng


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(batching=False)


@dataclass(eq=False)
class Req:
    seeds: list
    remaining: int


def run_schedule(plan, batch, arrivals):
    """arrivals[k]: the batch sizes of the requests that join before step k. Steps until every
    request finished; returns [(seeds, images)] and checks the slot layout after every change."""
    rng = random.Random(len(arrivals))
    out, running, k = [], [], 0
    while k < len(arrivals) or running:
        joining, room = [], MAX_BATCH - batch.live
        for n in arrivals[k] if k < len(arrivals) else []:
            if n <= room:  # as the server: a request that does not fit waits (here: is dropped)
                joining.append(Req([rng.getrandbits(64) for _ in range(n)], plan.steps))
                room -= n
        if joining:
            batch.add(joining)
            running += joining
            check_layout(batch)
        k += 1
        if not running:
            continue
        batch.step()
        for r in running:
            r.remaining -= 1
        done = [r for r in running if r.remaining == 0]
        if done:
            out += [(r.seeds, batch.images(r)) for r in done]
            batch.remove(done)
            running = [r for r in running if r.remaining]
            check_layout(batch)
    return out


def check_layout(batch: SlotBatch):
    spans = sorted(batch.where.values())
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b, spans  # no two requests share a slot
    if spans:
        assert spans[-1][0] + spans[-1][1] <= batch.capacity
    if batch.graphed is None:
        assert batch.capacity == batch.live  # exact buffers: no padding rows
    elif batch.live:
        assert batch.capacity == batch.graphed.bucket_for(batch.live)  # the smallest bucket that holds them
        assert batch.rows is batch.bucket.rows  # the bucket's static buffers: what its graph replays


@pytest.mark.parametrize("graphed", [True, False], ids=["buckets", "exact"])
@pytest.mark.parametrize("sampler,steps,eta", PLANS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=st.lists(st.lists(st.integers(1, 3), max_size=3), min_size=1, max_size=8))
def test_joins_and_leaves_give_the_lone_images(engine, graphed, sampler, steps, eta, arrivals):
    plan = engine.plan(sampler, steps, eta)
    gs = GraphedSampler(plan, max_batch=MAX_BATCH, capture=False) if graphed else None
    batch = SlotBatch(plan, gs)
    for seeds, images in run_schedule(plan, batch, arrivals):
        want = engine.sample(seeds, sampler=sampler, steps=steps, eta=eta, driver="eager")
        assert (images - want).abs().max().item() <= 5e-5, f"seeds {seeds}, arrivals {arrivals}"
    assert batch.live == 0 and batch.rows is None


def test_buckets_grow_reuse_holes_and_shrink(engine):
    plan = engine.plan("ddim", 4)
    batch = SlotBatch(plan, GraphedSampler(plan, max_batch=MAX_BATCH, capture=False))
    a, b, c = Req([1, 2, 3], 4), Req([4], 4), Req([5, 6], 4)
    batch.add([a])
    assert batch.capacity == 4 and batch.where[a] == (0, 3)
    batch.add([b])  # the free slot 3
    assert batch.capacity == 4 and batch.where[b] == (3, 1)
    batch.add([c])  # 6 rows: repacked into bucket 8, in slot order
    assert batch.capacity == 8 and [batch.where[r] for r in (a, b, c)] == [(0, 3), (3, 1), (4, 2)]
    batch.remove([a])  # 3 live rows fit bucket 4: moved down, packed
    assert batch.capacity == 4 and [batch.where[r] for r in (b, c)] == [(0, 1), (1, 2)]
    batch.remove([b])  # a hole at slot 0; bucket 2 fits c: moved down again
    assert batch.capacity == 2 and batch.where[c] == (0, 2)


def test_a_bucket_that_cannot_be_built_falls_back_to_exact_buffers(engine):
    plan = engine.plan("ddim", 3)

    class Broken(GraphedSampler):
        def _build(self, b):
            raise RuntimeError("capture failed")

    graphed = Broken(plan, max_batch=MAX_BATCH, capture=False)
    batch = SlotBatch(plan, graphed)
    r = Req([7, 8], 3)
    with pytest.warns(RuntimeWarning, match="capture failed") as warned:
        batch.add([r])
    assert len(warned) == 1  # once, by the sampler, which records why
    assert batch.graphed is None and batch.capacity == 2
    assert graphed.report()["path"] == "eager" and "capture failed" in graphed.report()["graphs"]
    assert SlotBatch(plan, graphed).graphed is None  # the next batch of the plan starts without graphs
    for _ in range(3):
        batch.step()
    want = engine.sample(r.seeds, sampler="ddim", steps=3, driver="eager")
    assert (batch.images(r) - want).abs().max().item() <= 5e-5


def test_server_on_graph_buckets_batches_callers_with_their_lone_images():
    eng = tiny_engine(batching=False)
    seed = random.getrandbits(32)
    rng = random.Random(seed)
    reqs = [[rng.getrandbits(64) for _ in range(rng.randint(1, 3))] for _ in range(12)]
    alone = [eng.sample(s, sampler="ddpm", steps=8, driver="eager") for s in reqs]
    eng.backend.rows.clear()
    with Server(eng, max_batch=MAX_BATCH, max_wait_ms=5, graphs=True) as server:
        futures = [server.submit(s, sampler="ddpm", steps=8) for s in reqs]
        got = [f.result(60) for f in futures]
    worst = max((a - b).abs().max().item() for a, b in zip(got, alone))
    assert worst <= 5e-5, f"seed={seed}: {worst}"
    assert set(eng.backend.rows) <= set(buckets(MAX_BATCH)), eng.backend.rows  # every step was a bucket
    assert max(eng.backend.rows) > 3  # several requests shared a bucket


@pytest.fixture
def graphable(monkeypatch):
    """Pretend every plan can be served by CUDA graphs: on the CPU the buckets then run without capture."""
    monkeypatch.setattr(SamplingPlan, "graphable", property(lambda self: True))


def test_graphable_is_cuda_with_a_capturable_backend(engine):
    plan = engine.plan("ddim", 3)
    assert plan.graphable is False  # on the CPU
    on_cuda = SamplingPlan(**{**plan.__dict__, "device": torch.device("cuda")})
    assert on_cuda.graphable is True
    engine.backend.inner.graph_capturable = False  # an instance attribute, as onnxruntime's class one
    try:
        assert on_cuda.graphable is False
    finally:
        del engine.backend.inner.graph_capturable


@pytest.mark.parametrize("batching", [True, False])
def test_default_path_takes_the_graph_buckets_where_graphable(graphable, batching):
    eng = tiny_engine(batching=batching)
    seeds = [11, 12, 13]
    want = eng.sample(seeds, sampler="ddim", steps=4, driver="eager")
    assert eng.backend.rows == [3] * 4
    eng.backend.rows.clear()
    got = eng.sample(seeds, sampler="ddim", steps=4)  # driver="auto": bucket 4 holds the 3 rows
    assert eng.backend.rows == [4] * (2 + 4)  # bucket 4's canary (one eager step, one replay), then 4 steps
    assert (got - want).abs().max().item() <= 5e-5
    eng.backend.rows.clear()
    eng.sample(seeds, sampler="ddim", steps=4, progress=False, x_T=torch.randn(3, *SHAPE))
    assert eng.backend.rows == [3] * 4  # x_T: graphs cannot serve it, the eager loop does
    eng.close()
    assert not eng._graph_samplers  # close drops the captured buckets
    again = eng.sample(seeds, sampler="ddim", steps=4)  # and the engine goes on
    assert torch.equal(again, got)
