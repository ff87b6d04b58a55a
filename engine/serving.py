"""Serving many callers at once: request coalescing and continuous batching at step granularity.

A ``Server`` owns one scheduler thread. Callers ``submit`` requests (a list of seeds plus sampler
options) from any thread or coroutine and get a ``concurrent.futures.Future`` of their images.
Because each sample's noise comes from its own seed and each sample carries its own step index,
rows of different requests can share one batch and every caller still gets exactly the images its
seeds give alone.

- ``mode="coalesce"``: pending requests with the same (sampler options, steps) are gathered into
  one batch (up to ``max_batch`` rows, waiting at most ``max_wait_ms`` for more), which runs to
  completion before the next batch forms.
- ``mode="continuous"``: a new request joins a running batch at its first step while the others
  are mid-trajectory, and a finished request leaves at once. Different (options, steps) groups run
  side by side, one step each in turn.

Requests are validated at submission (typed errors, nothing else disturbed), the queue is bounded
(``QueueFullError``), each request may carry a timeout (it then fails with ``RequestTimeoutError``, a ``TimeoutError``, and its
rows are dropped), and ``future.cancel()`` works until the result is set: the future stays pending
while its rows are being computed, and a cancelled request's rows are dropped at the next step.
If the model raises mid-batch (out of memory, say), that batch's requests fail with ``EngineError``
and the server goes on serving the others. Results come back on the CPU (``results="cpu"``) or on
the engine's device (``results="device"``, what ``Engine.sample``'s own batching uses).

Lifecycle: every server still open at interpreter exit is closed and its thread joined (an
``atexit`` hook: a daemon thread inside torch while the interpreter finalizes aborts the process).
A caller of ``Server.sample`` interrupted by Ctrl-C drops its request and stops its batch (the
other riders get ``BatchInterruptedError``). In a forked child a server starts afresh: new locks,
no requests (the parent's belong to the parent's callers), a new thread on the next submit.

The server builds every request's ``SamplingPlan`` through its planner (``Engine.plan``); each
group's rows live in a ``SlotBatch`` (engine/slots.py), stepped by ``reverse_step`` or, on CUDA
with a capturable backend, by replaying the CUDA graph of its batch bucket, so rows joining and
leaving keep the batch on the graph path. It never reaches into the engine.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import EngineError, InvalidRequestError, QueueFullError, RequestTimeoutError, quote
from .plan import SamplingPlan, check_positive_int
from .threads import yield_cpu_to
from .slots import SlotBatch

MODES = ("continuous", "coalesce")
MAX_QUEUE = 1_000_000  # requests; a larger bound is a typo, not a plan
KEPT_GRAPHS = 4  # graph samplers (one per plan, its captured buckets) kept for plans no longer running


class ServerClosedError(EngineError, RuntimeError):
    """The server was closed before the request finished."""


class BatchInterruptedError(EngineError, RuntimeError):
    """A caller riding the same batch was interrupted (Ctrl-C), which stops the batch; retry."""


_LIVE = weakref.WeakSet()  # servers not closed yet


@atexit.register
def close_all() -> None:
    """Close every live server and join its scheduler thread, at interpreter exit (before the
    interpreter tears down, after the non-daemon threads have been joined). A daemon thread still
    inside torch when the interpreter finalizes is killed there mid-call, which aborts the process
    ("terminate called without an active exception")."""
    for server in list(_LIVE):
        server.close()


def _reset_in_child() -> None:
    """After ``fork``, in the child: the scheduler threads did not come along, and the parent's
    queued and running requests belong to the parent's callers."""
    for server in list(_LIVE):
        server._forget_parent()


os.register_at_fork(after_in_child=_reset_in_child)


class _CpuLoan:
    """``yield_cpu_to(backend)`` (engine/threads.py), held by the scheduler thread while it has work."""

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self.held = False

    def take(self, backend):
        if not self.held:
            self._stack.enter_context(yield_cpu_to(backend))
            self.held = True

    def give_back(self):
        self._stack.close()
        self.held = False


@dataclass(eq=False)
class Request:
    seeds: list
    plan: SamplingPlan
    future: Future
    submitted: float
    deadline: float | None
    admitted: float | None = None
    remaining: int = 0  # steps still to run once admitted
    labels: list | None = None  # a class-conditional model's: one label per seed (they ride with the rows)
    resolved: bool = False  # its future has its result, error, or cancellation (notified) already


@dataclass(eq=False)
class Group:
    """The requests of one plan (equal ``plan.key``): queued ones, and the running ones' rows."""

    plan: SamplingPlan
    batch: SlotBatch
    pending: collections.deque = field(default_factory=collections.deque)
    running: list = field(default_factory=list)  # requests admitted, in admission order
    interrupted: bool = False  # a running request's caller was interrupted: stop the batch at the next step

    @property
    def rows(self) -> int:
        return self.batch.live


class Metrics:
    """Rolling serving statistics (bounded memory)."""

    def __init__(self, window: int = 10_000):
        self.started = time.perf_counter()
        self.queue_wait = collections.deque(maxlen=window)
        self.latency = collections.deque(maxlen=window)
        self.batch_rows = collections.deque(maxlen=window)
        self.counts = collections.Counter()
        self.images = 0
        self.lock = threading.Lock()

    def snapshot(self) -> dict:
        def pct(values, q):
            return float(np.percentile(np.fromiter(values, float), q)) if values else None

        with self.lock:
            elapsed = time.perf_counter() - self.started
            rows = list(self.batch_rows)
            return {
                "submitted": self.counts["submitted"], "completed": self.counts["completed"],
                "rejected": self.counts["rejected"], "cancelled": self.counts["cancelled"],
                "timed_out": self.counts["timed_out"], "failed": self.counts["failed"],
                "images": self.images, "images_per_s": self.images / elapsed if elapsed > 0 else 0.0,
                "queue_wait_s": {"p50": pct(self.queue_wait, 50), "p99": pct(self.queue_wait, 99)},
                "latency_s": {"p50": pct(self.latency, 50), "p90": pct(self.latency, 90),
                              "p99": pct(self.latency, 99)},
                "batch_rows": {"mean": float(np.mean(rows)) if rows else None, "max": max(rows) if rows else None,
                               "histogram": dict(sorted(collections.Counter(rows).items()))},
            }


class Server:
    """Batches the requests of many callers onto one engine; see the module docstring."""

    def __init__(self, planner, *, mode: str = "continuous", max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, results: str = "cpu", idle_exit_s: float | None = None,
                 graphs: bool | None = None):
        """planner: builds a request's SamplingPlan (an ``Engine``: ``planner.plan(sampler=...)``).
        idle_exit_s: stop the scheduler thread after this long without work (it restarts on the
        next request); None keeps it until ``close``. graphs: run each batch in CUDA-graph buckets
        (engine/slots.py); None: wherever ``plan.graphable`` (CUDA, a capturable backend); True
        off CUDA runs the same buckets without capture."""
        if mode not in MODES:
            raise InvalidRequestError(f"unknown serving mode {mode!r}; choose one of {MODES}")
        if results not in ("cpu", "device"):
            raise InvalidRequestError(f"results must be 'cpu' or 'device', got {results!r}")
        if graphs not in (None, True, False):
            raise InvalidRequestError(f"graphs must be True, False or None, got {graphs!r}")
        if not callable(getattr(planner, "plan", None)) or not isinstance(getattr(planner, "max_batch", None), int):
            raise InvalidRequestError("a Server needs a planner with a plan(...) method and a max_batch, such as "
                                      "an Engine")
        check_positive_int("max_batch", max_batch, upper=planner.max_batch)
        check_positive_int("max_queue", max_queue, upper=MAX_QUEUE)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 60_000:
            raise InvalidRequestError(f"max_wait_ms must be a number in [0, 60000], got {max_wait_ms!r}")
        self.planner = planner
        self.mode = mode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.results = results
        self.idle_exit_s = idle_exit_s
        self.graphs = graphs
        self._graphed = collections.OrderedDict()  # plan.key -> GraphedSampler, least recently used first
        self._groups: dict = {}
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False  # close(grace_s=...) runs: new requests are refused, accepted ones finish
        self._metrics = Metrics()
        self._thread = None
        _LIVE.add(self)
        with self._cond:
            self._start_thread()

    def _start_thread(self):
        """Under the lock: (re)start the scheduler thread if it is not running."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="ddpm-engine-scheduler", daemon=True)
            self._thread.start()

    # ---- submission (any thread) -------------------------------------------------------------
    def submit(self, batch, *, sampler=None, steps=None, eta=0.0, clip_denoised=None,
               use_clipped_model_output=None, timeout: float | None = None,
               plan: SamplingPlan | None = None, spacing=None, class_labels=None, guidance_scale=1.0,
               cache_interval=1) -> Future:
        """Queue a request; returns a Future of its images [n, C, H, W] in [-1, 1] (on the CPU, or
        on the device with ``results="device"``). ``plan`` (from ``Engine.plan``) replaces the
        sampler options. ``class_labels``: one per seed, for a class-conditional model (requests
        with different labels share a batch: the labels ride with their rows)."""
        try:
            if plan is None:
                plan = self.planner.plan(sampler, steps, eta, clip_denoised, use_clipped_model_output, spacing,
                                         guidance_scale, cache_interval)
            seeds = plan.seeds(batch)
            if len(seeds) > self.max_batch:
                raise InvalidRequestError(f"a request of {len(seeds)} images exceeds max_batch={self.max_batch}; "
                                          "split it or raise max_batch")
            labels = plan.labels(class_labels, len(seeds))
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                        or not 0 < timeout < float("inf")):
                raise InvalidRequestError(f"timeout must be a positive number of seconds, got {timeout!r}")
        except InvalidRequestError:
            self._count("rejected")
            raise
        now = time.perf_counter()
        req = Request(seeds, plan, Future(), now, None if timeout is None else now + timeout, labels=labels)
        with self._cond:
            if self._closed:
                raise ServerClosedError("the server is closed; create a new one")
            if self._draining:
                raise ServerClosedError("the server is shutting down (draining its running requests); "
                                        "send this request to another server")
            if self._queued >= self.max_queue:
                self._drop_stale_pending()  # cancelled requests free their slots
            if self._queued >= self.max_queue:
                self._count("rejected")
                raise QueueFullError(f"the queue holds {self._queued} requests (max_queue={self.max_queue}); "
                                     "retry later or raise max_queue")
            group = self._groups.get(plan.key)
            if group is None:
                group = self._groups[plan.key] = Group(plan, SlotBatch(plan, self._graphed_sampler(plan)))
            group.pending.append(req)
            self._queued += 1
            self._count("submitted")
            self._start_thread()
            self._cond.notify()
        return req.future

    def sample(self, batch, **kw) -> torch.Tensor:
        """Blocking: submit and wait for the images. Interrupted while waiting (Ctrl-C: the
        KeyboardInterrupt is raised at once), the request is dropped and the batch it rides in
        stops at its next step: its other callers get BatchInterruptedError."""
        timeout = kw.get("timeout")
        future = self.submit(batch, **kw)
        try:
            return future.result(timeout=None if timeout is None else timeout + 1.0)
        except (KeyboardInterrupt, SystemExit):
            self._interrupt(future)
            raise

    def _interrupt(self, future: Future):
        future.cancel()
        with self._cond:
            for g in self._groups.values():
                if any(req.future is future for req in g.running):
                    g.interrupted = True
            self._cond.notify()

    async def sample_async(self, batch, **kw) -> torch.Tensor:
        """``await server.sample_async(seeds, ...)``; cancelling the task cancels the request."""
        return await asyncio.wrap_future(self.submit(batch, **kw))

    def metrics(self) -> dict:
        """Counts, images/s, queue wait and latency percentiles (seconds), batch sizes in rows, and
        ``fast_path``: which path each plan's batches take and why (``fast_path()``)."""
        out = self._metrics.snapshot()
        with self._cond:
            out["queued"] = self._queued
            out["running_rows"] = sum(g.rows for g in self._groups.values())
        out["fast_path"] = self.fast_path()
        return out

    def close(self, timeout: float = 10.0, *, grace_s: float | None = None) -> None:
        """Stop the scheduler thread (after the step it is running) and join it; unfinished
        requests fail with ServerClosedError. With ``grace_s``, drain first: new requests are
        refused at once (ServerClosedError), the queued and running ones have up to ``grace_s``
        seconds to finish, and only those still unfinished then fail."""
        if grace_s is not None:
            if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not 0 <= grace_s < float("inf"):
                raise InvalidRequestError(f"grace_s must be a number of seconds >= 0, got {quote(grace_s)}")
            self._drain(grace_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        _LIVE.discard(self)
        thread = self._thread
        if thread is not None and threading.current_thread() is not thread:  # a done-callback cannot join
            thread.join(timeout)

    def _drain(self, grace_s: float) -> None:
        """Refuse new requests, then wait up to ``grace_s`` for the accepted ones to finish (not
        from the scheduler thread itself: it could not finish them while it waits)."""
        deadline = time.monotonic() + grace_s
        with self._cond:
            self._draining = True
            while (self._queued or any(g.running for g in self._groups.values())) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or threading.current_thread() is self._thread:
                    break
                self._cond.wait(min(left, 0.02))  # the scheduler does not signal each finished request

    def _forget_parent(self):
        """In a forked child: fresh locks, no requests, no thread (the next submit starts one)."""
        self._cond = threading.Condition()
        self._metrics.lock = threading.Lock()
        self._groups.clear()
        self._graphed.clear()  # CUDA graphs do not survive a fork
        self._queued = 0
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _graphed_sampler(self, plan: SamplingPlan):
        """Under the lock: the plan's GraphedSampler (its buckets are captured on first use and
        kept for the next group of the same plan), or None where graphs do not serve it."""
        if not (plan.graphable if self.graphs is None else self.graphs):
            return None
        from .cuda.graphs import GraphedSampler

        gs = self._graphed.pop(plan.key, None) or GraphedSampler(plan, max_batch=self.max_batch)
        self._graphed[plan.key] = gs
        while len(self._graphed) > KEPT_GRAPHS:  # a running group keeps its own reference
            self._graphed.popitem(last=False)
        return None if gs.refused else gs  # refused (capture or canary failed): the plan runs eagerly

    def fast_path(self) -> list[dict]:
        """The graph samplers' reports (GraphedSampler.report) of the plans this server kept."""
        with self._cond:
            samplers = list(self._graphed.values())
        return [gs.report() for gs in samplers]

    # ---- the scheduler thread ----------------------------------------------------------------
    def _loop(self):
        cpu = _CpuLoan()
        try:
            while True:
                with self._cond:
                    ready = self._wait_for_work(cpu)
                    if ready is None:
                        if not self._closed:
                            return  # idle for idle_exit_s: the next submit starts a new thread
                        break
                    joining = {g: self._admit(g) for g in ready}
                self._step_groups(ready, joining, cpu)
        except BaseException as exc:  # never leave callers hanging
            with self._cond:
                self._closed = True
            self._fail_all(EngineError(f"the serving thread stopped: {exc!r}"))
            raise
        finally:
            cpu.give_back()
        self._fail_all(ServerClosedError("the server was closed before this request finished"))

    def _wait_for_work(self, cpu: _CpuLoan) -> list | None:
        """Under the lock: wait until some group has a step to run or requests to admit, and return
        those groups; None when the thread should stop: the server is closed, or it was idle for
        ``idle_exit_s`` (``self._thread`` is then None). Gives the CPU back while there are no groups."""
        idle_since = None
        while not self._closed:
            self._stop_interrupted_batches()
            self._drop_stale_pending()
            ready = [g for g in self._groups.values() if g.running or self._should_admit(g)]
            if ready:
                return ready
            if not self._groups:
                cpu.give_back()
                now = time.perf_counter()
                idle_since = idle_since or now
                if self.idle_exit_s is not None and now - idle_since >= self.idle_exit_s:
                    self._thread = None  # the next submit starts a new one
                    return None
            idle_wait = self.idle_exit_s is not None and not self._groups
            self._cond.wait(self.idle_exit_s if idle_wait else self._wait_time())
        return None

    def _stop_interrupted_batches(self):
        """Under the lock: a group whose caller was interrupted fails its running requests."""
        for g in self._groups.values():
            if g.interrupted:
                g.interrupted = False
                self._fail_running(g, lambda: BatchInterruptedError(
                    "another caller of this batch was interrupted (Ctrl-C), which stopped the batch; retry"))

    def _step_groups(self, ready: list, joining: dict, cpu: _CpuLoan):
        """Outside the lock: place each ready group's newly admitted rows (this may capture a
        graph), run one step, and retire what finished. A group whose step raises (out of memory,
        say) fails as a whole; the others go on."""
        for g in ready:
            if not g.running:
                continue
            cpu.take(g.plan.backend)
            try:
                if joining[g]:
                    g.batch.add(joining[g])
                self._step(g)
            except Exception as exc:
                self._fail_group(g, exc)
                continue
            self._retire(g)

    def _wait_time(self):
        """Sleep until the oldest pending request may start, or the next deadline (None: until notified)."""
        wake = []
        for g in self._groups.values():
            if g.pending:
                wake.append(g.pending[0].submitted + self.max_wait)
                wake.extend(r.deadline for r in g.pending if r.deadline is not None)
        return None if not wake else max(min(wake) - time.perf_counter(), 0.0005)

    def _should_admit(self, g: Group) -> bool:
        """Admit pending requests now? Continuous mode: whenever there are rows free. Coalesce
        mode: only between batches. An idle group waits up to max_wait for a fuller batch."""
        if not g.pending:
            return False
        if g.running:
            return self.mode == "continuous" and g.rows < self.max_batch
        waiting_rows = sum(len(r.seeds) for r in g.pending)
        return waiting_rows >= self.max_batch or time.perf_counter() - g.pending[0].submitted >= self.max_wait

    def _admit(self, g: Group) -> list:
        """Under the lock: move the pending requests that fit from the queue to ``g.running``;
        returns them (their rows are placed in ``g.batch`` outside the lock)."""
        if not self._should_admit(g):
            return []
        now = time.perf_counter()
        new = []
        while g.pending and g.rows + sum(len(r.seeds) for r in new) + len(g.pending[0].seeds) <= self.max_batch:
            req = g.pending.popleft()
            self._queued -= 1
            if req.future.cancelled():
                self._fail(req, None, "cancelled")
                continue
            req.admitted, req.remaining = now, g.plan.steps
            with self._metrics.lock:
                self._metrics.queue_wait.append(now - req.submitted)
            new.append(req)
        g.running.extend(new)
        return new

    def _drop_stale_pending(self):
        """Under the lock: drop pending requests that were cancelled or are past their deadline
        (running ones are checked after each step), and forget idle groups (bounded memory
        whatever options clients send)."""
        now = time.perf_counter()
        for key, g in list(self._groups.items()):
            stale = [r for r in g.pending if r.future.cancelled() or (r.deadline is not None and now > r.deadline)]
            for req in stale:
                g.pending.remove(req)
                self._queued -= 1
                self._timeout(req)  # a cancelled one is counted as cancelled
            if not g.pending and not g.running:
                del self._groups[key]

    def _step(self, g: Group):
        """One step of the group's batch (may raise: the group is then failed as a whole)."""
        with g.plan.lock:
            g.batch.step()

    def _retire(self, g: Group):
        """After a step: hand finished requests their rows, drop cancelled and expired ones, and
        free their slots. O(requests) host work."""
        with self._metrics.lock:
            self._metrics.batch_rows.append(g.rows)
        now = time.perf_counter()
        leaving = []
        for req in g.running:
            req.remaining -= 1
            if req.future.cancelled():
                self._fail(req, None, "cancelled")
            elif req.deadline is not None and now > req.deadline:
                self._timeout(req)
            elif req.remaining == 0:
                images = g.batch.images(req)
                self._finish(req, images.cpu() if self.results == "cpu" else images, now)
            else:
                continue
            leaving.append(req)
        if leaving:
            g.batch.remove(leaving)
            with self._cond:
                g.running = [req for req in g.running if req in g.batch.where]

    def _finish(self, req: Request, images: torch.Tensor, now: float):
        req.resolved = True
        if req.future.set_running_or_notify_cancel():
            req.future.set_result(images)
            with self._metrics.lock:
                self._metrics.counts["completed"] += 1
                self._metrics.images += len(req.seeds)
                self._metrics.latency.append(now - req.submitted)
        else:
            self._count("cancelled")

    def _fail_group(self, g: Group, exc: Exception):
        """The model or step raised: the group's running requests fail with it; others go on."""
        n = len(g.running)

        def error():
            err = EngineError(f"sampling failed for this batch of {n} requests: {exc!r}")
            err.__cause__ = exc
            return err

        self._fail_running(g, error)

    def _fail_running(self, g: Group, error):
        """The scheduler thread: drop the group's running rows; each of their requests fails with
        an ``error()`` of its own."""
        with self._cond:
            reqs, g.running = g.running, []
            g.batch.clear()
        for req in reqs:
            self._fail(req, error(), "failed")

    def _timeout(self, req: Request):
        self._fail(req, RequestTimeoutError(f"request of {len(req.seeds)} images did not finish within its timeout "
                                            "and its rows were dropped; raise its timeout or retry when the server "
                                            "is less busy"), "timed_out")

    def _fail(self, req: Request, exc: Exception | None, what: str):
        """Resolve a request with ``exc`` (counted as ``what``), or, if it was cancelled, notify
        its waiters (``concurrent.futures.wait`` needs that) and count it as cancelled. Once only."""
        if req.resolved:
            return
        req.resolved = True
        if req.future.set_running_or_notify_cancel():
            req.future.set_exception(exc)
            self._count(what)
        else:
            self._count("cancelled")

    def _count(self, what: str):
        with self._metrics.lock:
            self._metrics.counts[what] += 1

    def _fail_all(self, exc: Exception):
        with self._cond:
            reqs = list(itertools.chain.from_iterable(list(g.pending) + g.running for g in self._groups.values()))
            self._groups.clear()
            self._queued = 0
        for req in reqs:
            self._fail(req, exc, "failed")
