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

Importing this module does not touch CUDA; constructing a GraphedSampler without CUDA raises
``BackendUnavailableError``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailableError, InvalidRequestError
from ..noise import check_seeds, initial_noise, seed_words
from ..stepping import Rows, StepSpec, make_step

DRIVERS = ("python", "c", "graph_loop")
WARMUP_ITERS = 3


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidRequestError(f"max_batch must be a positive int, got {max_batch!r}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


@dataclass
class _Bucket:
    size: int
    x: torch.Tensor  # [b, *sample_shape] float32: x_t in, x_{t-1} out, every replay
    i: torch.Tensor  # int64 [b]: per-sample step index, decremented in place by the step
    words: torch.Tensor  # int64 [b, 2]: seed words
    graph: "torch.cuda.CUDAGraph"
    loop: object = None  # engine.cuda.graph_loop.GraphLoop, built on the first driver="graph_loop" run


class GraphedSampler:
    """Sample with a captured reverse step: ``GraphedSampler(engine, "ddim", 50).run(seeds)``.

    engine: an ``Engine`` on a CUDA device. spec: a ``StepSpec`` or a sampler name ("ddpm"/"ddim",
    with the model's defaults). steps: number of reverse steps (respaced as Engine.sample does).
    """

    def __init__(self, engine, spec, steps: int, max_batch: int = 64):
        if not torch.cuda.is_available():
            raise BackendUnavailableError("CUDA graphs need a CUDA device; torch sees none here")
        if engine.device.type != "cuda":
            raise BackendUnavailableError(
                f"CUDA graphs need an engine on a CUDA device; this one is on {engine.device}")
        if isinstance(spec, str):
            spec = engine.step_spec(spec)
        if not isinstance(spec, StepSpec):
            raise InvalidRequestError(f"spec must be a StepSpec or a sampler name, got {type(spec).__name__}")
        self.engine = engine
        self.spec = spec
        self.tables = engine.tables(steps)
        self.steps = self.tables.steps
        self.device = engine.device
        self.sample_shape = tuple(engine.sample_shape)
        self.tab = self.tables.on(self.device)
        self.buckets = buckets(max_batch)
        self.max_batch = max_batch
        self._graphs: dict[int, _Bucket] = {}
        self._lock = threading.Lock()
        self._driver = None
        self._graph_loop = None

    # ---- capture ---------------------------------------------------------------------------
    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise InvalidRequestError(f"batch of {n} is above max_batch={self.max_batch}")

    @torch.inference_mode()
    def _capture(self, b: int) -> _Bucket:
        dev, eng = self.device, self.engine
        x = torch.zeros((b, *self.sample_shape), dtype=torch.float32, device=dev)
        i = torch.full((b,), self.steps - 1, dtype=torch.int64, device=dev)
        words = seed_words([0] * b, dev)
        rows = Rows(x, i, words)
        step = make_step(eng.step_impl, self.spec, self.tab, self.sample_shape, dev)
        timesteps = self.tab.timesteps

        def one_step():
            t = timesteps[i]
            out = eng.backend(x, t)
            step(rows, out)

        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: lazy inits, cudnn autotune, Triton compiles
            for _ in range(WARMUP_ITERS):
                one_step()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph(keep_graph=True)  # keep the cudaGraph_t for the graph loop
        with eng._lock, torch.cuda.graph(graph):  # the backend's internal buffers are not re-entrant
            one_step()
        graph.instantiate()
        return _Bucket(b, x, i, words, graph)

    def _bucket(self, b: int) -> _Bucket:
        if b not in self._graphs:
            self._graphs[b] = self._capture(b)
        return self._graphs[b]

    def warm(self, sizes=None):
        """Capture the graphs for the given bucket sizes (default: all) ahead of traffic."""
        with self._lock:
            for b in (self.buckets if sizes is None else sorted({self.bucket_for(n) for n in sizes})):
                self._bucket(b)
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

    def run(self, seeds, driver: str = "python") -> torch.Tensor:
        """Images [n, C, H, W] in [-1, 1] for the seeds, on the engine's device."""
        if driver not in DRIVERS:
            raise InvalidRequestError(f"unknown driver {driver!r}; choose one of {DRIVERS}")
        seeds = check_seeds(list(seeds) if not isinstance(seeds, list) else seeds)
        if len(seeds) > self.max_batch:  # one graph run per chunk of max_batch
            return torch.cat([self.run(seeds[k:k + self.max_batch], driver)
                              for k in range(0, len(seeds), self.max_batch)])
        with self._lock:
            return self._run_bucket(seeds, driver)

    @torch.inference_mode()
    def _run_bucket(self, seeds, driver):
        n = len(seeds)
        bk = self._bucket(self.bucket_for(n))
        words = seed_words(seeds + [0] * (bk.size - n), self.device)  # padding rows: seed 0, dropped
        stream = torch.cuda.current_stream(self.device)
        bk.words.copy_(words)
        bk.x.copy_(initial_noise(words, self.sample_shape))
        bk.i.fill_(self.steps - 1)
        if driver == "python":
            for _ in range(self.steps):
                bk.graph.replay()
            stream.synchronize()
        elif driver == "graph_loop":
            if bk.loop is None:
                bk.loop = self.graph_loop().create(bk.graph.raw_cuda_graph())
            bk.loop.run(stream.cuda_stream, self.steps)
        else:
            if not hasattr(bk.graph, "raw_cuda_graph_exec"):
                raise BackendUnavailableError(
                    f"driver='c' needs torch.cuda.CUDAGraph.raw_cuda_graph_exec (torch {torch.__version__} lacks it); "
                    "use driver='python'")
            self.driver().replay(bk.graph.raw_cuda_graph_exec(), stream.cuda_stream, self.steps)
        return bk.x[:n].clamp(-1.0, 1.0)

    def host_us_per_step(self, seeds, driver: str = "python", reps: int = 5) -> dict:
        """Wall time per step of ``run`` (median over ``reps`` after one warm run), in microseconds,
        plus the host-only time to enqueue the steps for the Python loop (launches, no sync)."""
        self.run(seeds, driver)
        walls = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self.run(seeds, driver)
            walls.append(time.perf_counter() - t0)
        walls.sort()
        res = {"driver": driver, "steps": self.steps, "batch": len(seeds),
               "wall_us_per_step": 1e6 * walls[len(walls) // 2] / self.steps}
        if driver == "python":
            with self._lock:
                bk = self._bucket(self.bucket_for(len(seeds)))
                torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                for _ in range(self.steps):
                    bk.graph.replay()
                res["enqueue_us_per_step"] = 1e6 * (time.perf_counter() - t0) / self.steps
                torch.cuda.synchronize(self.device)
        return res

    def __repr__(self):
        return (f"GraphedSampler({self.spec.sampler}-{self.steps}, buckets={self.buckets}, "
                f"captured={sorted(self._graphs)})")
