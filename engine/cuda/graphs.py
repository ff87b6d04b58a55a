"""CUDA-graph replay of the reverse chain: capture ONE reverse step, replay it ``steps`` times.

Every step of a run does the same device work on the same buffers: the per-sample step index
``i`` lives on the device and the step decrements it in place, ``t = timesteps[i]`` is a
gather, noise comes from the seed words and ``i`` (engine.noise), and the t = 0 case is a mask.
So one captured step, replayed ``steps`` times, is the whole run, and the host does one graph
launch per step (``driver="python"``) or one C call for the whole run (``driver="c"``, the
compiled loop in kernels/csrc/graph_driver.c), or the device loops by itself (``driver="graph_loop"``:
the step graph inside a conditional WHILE node, one launch per run, kernels/csrc/graph_loop.cu,
CUDA >= 12.4, UNVERIFIED on a GPU).

Batch sizes are bucketed (1, 2, 4, ... up to ``max_batch``); a request is padded to the next
bucket with seed-0 rows that are dropped afterwards. Each seed's image does not depend on the
batch it rides in (per-sample Philox noise, eval-mode model), so padding changes nothing.
One graph (and one set of static buffers x, i, words) per bucket, captured on first use.

About torch's raw graph handles (torch 2.13 here; see torch/cuda/graphs.py):
``CUDAGraph.raw_cuda_graph_exec()`` returns the cudaGraphExec_t as an int, and
``raw_cuda_graph()`` the cudaGraph_t, which exists only with ``keep_graph=True``; the graph loop
needs it, so steps are captured with ``keep_graph=True`` and ``instantiate()`` is called right
after capture (with ``keep_graph=False`` ``capture_end`` would instantiate and drop the graph).
Calling ``instantiate()`` again destroys a returned exec, so the handle is re-read for every run
rather than cached.

Everything but capture and replay runs on the CPU too: ``GraphedSampler(plan, capture=False)``
keeps the buckets, padding rows, static buffers, in-place step, device-side step index and
chunking above ``max_batch``, and "replays" by calling the same step function directly, so CI
checks that logic against ``Engine.sample`` without a GPU. Importing this module does not touch
CUDA; asking for capture without CUDA raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError, EngineError, InvalidRequestError
from ..plan import SamplingPlan, check_positive_int, parse_batch, reverse_step
from ..stepping import Rows

DRIVERS = ("python", "c", "graph_loop")
WARMUP_ITERS = 3


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    check_positive_int("max_batch", max_batch)
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


@dataclass
class Bucket:
    """One batch size's static buffers and its captured step (``graph`` is None without capture:
    ``replay`` then runs the same step function eagerly)."""

    size: int
    rows: Rows  # static: x_t in, x_{t-1} out, i decremented in place, every replay
    one_step: object  # the function that was captured
    graph: "torch.cuda.CUDAGraph | None" = None
    loop: object = None  # engine.cuda.graph_loop.GraphLoop, built on the first driver="graph_loop" run

    def replay(self):
        if self.graph is None:
            self.one_step()
        else:
            self.graph.replay()


class GraphedSampler:
    """Sample a plan with a captured reverse step: ``GraphedSampler(plan).run(seeds)``.

    plan: a ``SamplingPlan`` (``Engine.plan(...)``). max_batch: the largest bucket; larger
    requests run in chunks. capture: capture CUDA graphs (default: when the plan is on CUDA);
    ``capture=False`` runs the same buffers and step function eagerly (the CPU path tests use).
    """

    def __init__(self, plan: SamplingPlan, max_batch: int = 64, capture: bool | None = None):
        if not isinstance(plan, SamplingPlan):
            raise InvalidRequestError(f"GraphedSampler takes a SamplingPlan (Engine.plan(...)), got {type(plan).__name__}")
        check_positive_int("max_batch", max_batch, upper=plan.max_batch)
        capture = plan.device.type == "cuda" if capture is None else bool(capture)
        if capture:
            if not torch.cuda.is_available() or plan.device.type != "cuda":
                raise BackendUnavailableError(
                    f"CUDA graphs need a plan on a CUDA device; this one is on {plan.device} (use capture=False)")
            plan.backend.check_graph_capturable()
        self.plan = plan
        self.capture = capture
        self.steps = plan.steps
        self.buckets = buckets(max_batch)
        self.max_batch = max_batch
        self._graphs: dict[int, Bucket] = {}
        self._lock = threading.Lock()
        self._driver = None
        self._graph_loop = None
        self._fastest = None  # fastest_driver(), decided on first use

    # ---- buckets -----------------------------------------------------------------------------
    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise InvalidRequestError(f"batch of {n} is above max_batch={self.max_batch}")

    def bucket(self, n: int) -> Bucket:
        """The bucket that serves a batch of ``n`` (built and captured on first use)."""
        b = self.bucket_for(n)
        if b not in self._graphs:
            self._graphs[b] = self._build(b)
        return self._graphs[b]

    @torch.inference_mode()
    def _build(self, b: int) -> Bucket:
        plan = self.plan
        rows = plan.start([0] * b)  # static buffers; every run overwrites them

        def one_step():
            reverse_step(plan, rows)

        if not self.capture:
            return Bucket(b, rows, one_step)
        dev = plan.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with plan.lock, torch.cuda.stream(side):  # warm-up: lazy inits, cudnn autotune, Triton compiles
            for _ in range(WARMUP_ITERS):
                one_step()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph(keep_graph=True)  # keep the cudaGraph_t for the graph loop
        # plan.lock: the backend's internal buffers are not re-entrant. thread_local: other threads
        # (callers reading results, the serving scheduler's neighbours) may sync while this captures
        with plan.lock, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            one_step()
        graph.instantiate()
        return Bucket(b, rows, one_step, graph)

    def warm(self, sizes=None):
        """Build (and capture) the buckets for the given batch sizes (default: all) ahead of traffic."""
        with self._lock:
            for n in (self.buckets if sizes is None else sorted(set(sizes))):
                self.bucket(n)
        return self

    # ---- run ---------------------------------------------------------------------------------
    def driver(self):
        if self._driver is None:
            from .driver import load_driver

            self._driver = load_driver()
        return self._driver

    def graph_loop(self):
        if self._graph_loop is None:
            from .graph_loop import load_graph_loop

            self._graph_loop = load_graph_loop()
        return self._graph_loop

    def fastest_driver(self) -> str:
        """The driver ``run`` uses by default: "c" with captured graphs when the C driver loads
        (one C call per run), else "python" (a Python loop of replays, or of steps without capture)."""
        if not self.capture:
            return "python"
        if self._fastest is None:
            try:
                self.driver()
                self._fastest = "c"
            except EngineError as exc:  # no C compiler or no libcuda: Python replay still works
                warnings.warn(f"the C graph driver is unavailable ({exc}); replaying from Python",
                              RuntimeWarning, stacklevel=2)
                self._fastest = "python"
        return self._fastest

    def run(self, seeds, driver: str | None = None) -> torch.Tensor:
        """Images [n, C, H, W] in [-1, 1] for the seeds, on the plan's device. driver: one of
        DRIVERS, default ``fastest_driver()``."""
        driver = self.fastest_driver() if driver is None else driver
        if driver not in DRIVERS:
            raise InvalidRequestError(f"unknown driver {driver!r}; choose one of {DRIVERS}")
        if driver != "python" and not self.capture:
            raise BackendUnavailableError(f"driver={driver!r} replays captured CUDA graphs; without capture "
                                          "only driver='python' runs")
        seeds = parse_batch(list(seeds) if isinstance(seeds, (list, tuple)) else seeds, self.plan.max_batch)
        chunks = [seeds[k:k + self.max_batch] for k in range(0, len(seeds), self.max_batch)]
        with self._lock:
            return torch.cat([self._run_bucket(chunk, driver) for chunk in chunks])

    @torch.inference_mode()
    def _run_bucket(self, seeds, driver):
        n = len(seeds)
        bk = self.bucket(n)
        rows = bk.rows
        rows.write(0, self.plan.start(seeds + [0] * (bk.size - n)))  # padding rows: seed 0, dropped
        if driver == "python":
            for _ in range(self.steps):
                bk.replay()
            if self.capture:
                torch.cuda.current_stream(self.plan.device).synchronize()
        elif driver == "graph_loop":
            if bk.loop is None:
                bk.loop = self.graph_loop().create(bk.graph.raw_cuda_graph())
            bk.loop.run(torch.cuda.current_stream(self.plan.device).cuda_stream, self.steps)
        else:
            if not hasattr(bk.graph, "raw_cuda_graph_exec"):
                raise BackendUnavailableError(
                    f"driver='c' needs torch.cuda.CUDAGraph.raw_cuda_graph_exec (torch {torch.__version__} lacks it); "
                    "use driver='python'")
            self.driver().replay(bk.graph.raw_cuda_graph_exec(), torch.cuda.current_stream(self.plan.device).cuda_stream,
                                 self.steps)
        return rows.x[:n].clamp(-1.0, 1.0)

    def __repr__(self):
        return (f"GraphedSampler({self.plan.spec.sampler}-{self.steps}, buckets={self.buckets}, "
                f"capture={self.capture}, built={sorted(self._graphs)})")
