"""CUDA-graph replay of the reverse chain: capture ONE reverse step, replay it ``steps`` times.

Every step of a run does the same device work on the same buffers: the per-sample step index
``i`` lives on the device and the step decrements it in place, ``t = timesteps[i]`` is a
gather, noise comes from the seed words and ``i`` (engine.noise), and the t = 0 case is a mask.
So one captured step, replayed ``steps`` times, is the whole run, and the host does one graph
launch per step (``driver="python"``) or one C call for the whole run (``driver="c"``, the
compiled loop in kernels/csrc/c_loop.c), or the device loops by itself (``driver="graph_loop"``:
the step graph inside a conditional WHILE node, one launch per run, kernels/csrc/while_loop.cu,
CUDA >= 12.4, UNVERIFIED on a GPU).

Batch sizes are bucketed (1, 2, 4, ... up to ``max_batch``); a request is padded to the next
bucket with seed-0 rows that are dropped afterwards. Each seed's image does not depend on the
batch it rides in (per-sample Philox noise, eval-mode model), so padding changes nothing.
One graph (and one set of static buffers x, i, words, and the labels of a class-conditional
model) per bucket, captured on first use.

About torch's raw graph handles (torch 2.13 here; see torch/cuda/graphs.py):
``CUDAGraph.raw_cuda_graph_exec()`` returns the cudaGraphExec_t as an int, and
``raw_cuda_graph()`` the cudaGraph_t, which exists only with ``keep_graph=True``; the graph loop
needs it, so steps are captured with ``keep_graph=True`` and ``instantiate()`` is called right
after capture (with ``keep_graph=False`` ``capture_end`` would instantiate and drop the graph).
Calling ``instantiate()`` again destroys a returned exec, so the handle is re-read for every run
rather than cached.

The fast path checks itself (README, "The fast path checks itself"). The first time a bucket is
built, its replay is a canary: one replay on a copy of the real rows it was built for, compared
with one eager ``reverse_step`` on the same rows at ``CANARY_TOL[precision]`` (the GPU parity
tests' graph tolerance). A mismatch, a NaN, or an exception in warm-up, capture, instantiate or
that replay refuses graphs for the plan (``refused``: the reason; warned once): ``run()`` with
the default driver then runs the eager loop (the same images as ``driver="eager"``), and an
explicit driver raises ``GraphsRefused``. The C driver is trusted only after a subprocess has
loaded and exercised the same build (``c_loop.trusted_c_loop``); if it fails, the default driver
is Python replay. ``report()`` says which path the plan takes and why.

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
from ..plan import SamplingPlan, check_positive_int, parse_batch, reverse_step, run_chain
from ..stepping import Rows

DRIVERS = ("python", "c", "graph_loop")
WARMUP_ITERS = 3
# The canary's tolerance per precision: max |replay - eager| over one reverse step, relative to
# max(1, max |eager|); the GPU parity tests hold the graph drivers to the same numbers.
CANARY_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}


class GraphsRefused(BackendUnavailableError):
    """CUDA graphs are refused for a plan: a bucket's capture or canary failed (the message says how)."""


def canary_mismatch(got: Rows, want: Rows, precision: str | None) -> str | None:
    """Why rows after one replay (``got``) are not those after one eager step (``want``), or None
    (an unknown precision gets the loosest tolerance). Host syncs: once per bucket, never per step."""
    tol = CANARY_TOL.get(precision, max(CANARY_TOL.values()))
    x, ref = got.x.float(), want.x.float()
    if not bool(torch.isfinite(x).all()):
        return "the replay wrote NaN or Inf"
    err = (x - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    if not err <= tol:
        return f"the replay differs from one eager reverse_step by {err:.3g} (tolerance {tol:g} at {precision})"
    if not torch.equal(got.i, want.i):
        return "the replay left other step indices than one eager reverse_step"
    return None


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
        self.refused: str | None = None  # why graphs are off for this plan (then run() samples eagerly)
        self.c_driver: str | None = None  # the C driver's verdict: None until asked for
        if plan.cache_interval > 1:  # one captured step cannot alternate full and shallow steps
            self.refused = (f"cache_interval={plan.cache_interval} runs its full and shallow steps in the "
                            "eager loop")

    # ---- buckets -----------------------------------------------------------------------------
    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise InvalidRequestError(f"batch of {n} is above max_batch={self.max_batch}")

    def bucket(self, n: int, sample: Rows | None = None) -> Bucket:
        """The bucket that serves a batch of ``n``, built, captured and checked by the canary on first
        use (on ``sample``, the real rows it is built for, padded with seed-0 rows; default: those
        alone). Raises GraphsRefused (graphs are then off for the plan) if any of that fails."""
        b = self.bucket_for(n)
        if self.refused is not None:
            raise GraphsRefused(f"CUDA graphs are off for {self.plan.name}: {self.refused}")
        if b not in self._graphs:
            try:
                bk = self._build(b)
                why = self._canary(bk, sample)
            except Exception as exc:  # warm-up, capture, instantiate or the first replay failed
                why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                self._refuse(f"bucket {b}: {why}")
                raise GraphsRefused(f"CUDA graphs are off for {self.plan.name}: {self.refused}")
            self._graphs[b] = bk
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

    @torch.inference_mode()
    def _canary(self, bk: Bucket, sample: Rows | None) -> str | None:
        """Replay ``bk`` once on a copy of ``sample`` (padded to the bucket) and compare it with one
        eager reverse_step on another copy; the reason for a mismatch, or None."""
        plan = self.plan
        rows = plan.start([0] * bk.size)
        if sample is not None:
            rows.write(0, sample.part(0, min(len(sample), bk.size)))
        want = Rows.cat([rows])  # a copy
        with plan.lock:
            reverse_step(plan, want)
        bk.rows.write(0, rows)
        bk.replay()
        if self.capture:
            torch.cuda.current_stream(plan.device).synchronize()
        return canary_mismatch(bk.rows, want, getattr(plan.backend, "precision", None))

    def _refuse(self, reason: str) -> None:
        if self.refused is None:
            self.refused = reason
            warnings.warn(f"CUDA graphs are off for {self.plan.name} on this engine ({reason}); it samples "
                          "with the eager loop (the same images)", RuntimeWarning, stacklevel=4)

    def report(self) -> dict:
        """Which path this plan takes and why: {"plan", "path": "graphs" | "eager", "graphs", "c_driver"}."""
        if self.refused is not None:
            graphs = f"refused: {self.refused}"
        elif self._graphs:
            graphs = f"verified by the canary: buckets {sorted(self._graphs)}"
        else:
            graphs = "no bucket built yet"
        if not self.capture:
            graphs += " (uncaptured: capture=False)"
        return {"plan": self.plan.name, "path": "eager" if self.refused else "graphs", "graphs": graphs,
                "c_driver": self.c_driver or ("not used without capture" if not self.capture else "not asked for yet")}

    def warm(self, sizes=None):
        """Build (and capture) the buckets for the given batch sizes (default: all) ahead of traffic."""
        with self._lock:
            for n in (self.buckets if sizes is None else sorted(set(sizes))):
                self.bucket(n)
        return self

    # ---- run ---------------------------------------------------------------------------------
    def driver(self):
        """The C driver, once a subprocess has loaded and exercised the same build (its verdict cached
        per build); raises BackendUnavailableError, recorded in ``c_driver``, if it failed."""
        if self._driver is None:
            from .c_loop import trusted_c_loop

            try:
                self._driver = trusted_c_loop()
            except EngineError as exc:
                self.c_driver = f"failed: {exc}"
                raise
            self.c_driver = "verified: loaded and replayed in a subprocess first"
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
            except EngineError as exc:  # no C compiler, no libcuda, a failed probe: Python replay still works
                warnings.warn(f"the C graph driver is unavailable ({exc}); replaying from Python",
                              RuntimeWarning, stacklevel=2)
                self._fastest = "python"
        return self._fastest

    def run(self, seeds, driver: str | None = None, class_labels=None) -> torch.Tensor:
        """Images [n, C, H, W] in [-1, 1] for the seeds, on the plan's device. driver: one of
        DRIVERS, default ``fastest_driver()``; with the default, a refused or failing graph path
        runs the eager loop instead (the same images); an explicit driver raises. class_labels:
        one per seed for a class-conditional model (they ride in the buckets' static rows)."""
        explicit = driver is not None
        if explicit and driver not in DRIVERS:
            raise InvalidRequestError(f"unknown driver {driver!r}; choose one of {DRIVERS}")
        if explicit and driver != "python" and not self.capture:
            raise BackendUnavailableError(f"driver={driver!r} replays captured CUDA graphs; without capture "
                                          "only driver='python' runs")
        seeds = parse_batch(list(seeds) if isinstance(seeds, (list, tuple)) else seeds, self.plan.max_batch)
        labels = self.plan.labels(class_labels, len(seeds))
        chunks = [(seeds[k:k + self.max_batch], None if labels is None else labels[k:k + self.max_batch])
                  for k in range(0, len(seeds), self.max_batch)]
        with self._lock:
            if self.refused is None:
                try:
                    driver = self.fastest_driver() if driver is None else driver
                    return torch.cat([self._run_bucket(chunk, driver, chunk_labels) for chunk, chunk_labels in chunks])
                except GraphsRefused:
                    if explicit:
                        raise
                except Exception as exc:  # a replay that raised: graphs off for this plan, the eager loop runs
                    if explicit:
                        raise
                    self._refuse(f"replay with driver {driver!r}: {type(exc).__name__}: {exc}")
            elif explicit:
                raise GraphsRefused(f"CUDA graphs are off for {self.plan.name}: {self.refused}")
            images, _ = run_chain(self.plan, self.plan.start(seeds, labels=labels))
            return images

    @torch.inference_mode()
    def _run_bucket(self, seeds, driver, labels=None):
        n = len(seeds)
        pad = [0] * (self.bucket_for(n) - n)  # padding rows: seed 0 (label 0), dropped
        start = self.plan.start(seeds + pad, labels=None if labels is None else labels + pad)
        bk = self.bucket(n, sample=start)
        rows = bk.rows
        rows.write(0, start)
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
