"""The rows of a running batch, kept at slots of one buffer, so requests can join and leave it.

The serving scheduler (engine/serving.py) runs one ``SlotBatch`` per group of requests that share
a plan. Each request's rows sit in a contiguous run of slots ``[start, start + n)``; a step
advances every slot; a request that finishes is read out of its slots and frees them.

- With a ``GraphedSampler`` (engine/cuda/graphs.py), the buffer is the static rows of one of its
  buckets (capacity 1, 2, 4, ... max_batch) and a step is that bucket's captured graph replayed:
  requests joining and leaving never take the batch off the graph path. Joining rows go into a
  free run of slots if there is one; otherwise the live rows are repacked, in request order, into
  the bucket that fits them all. When the live rows fit a smaller bucket, they move down to it
  (fewer padded rows to compute). Free slots keep being stepped with whatever they hold (finished
  or padding rows, each row's computation is its own) and are never read.
- Without one, the buffer holds exactly the live rows: every join or leave repacks (a
  concatenation or a gather) and a step is ``reverse_step`` on them.

With ``cache_interval`` (engine/deepcache.py) the batch's ``Cadence`` decides on the host which
steps are full; rows joining restart it, so the batch's next step is full and every row's cached
deep features are its own (they move with the row when slots are repacked).

Repacking happens only when requests join or leave, never in a step; it reads the slots by
slices, so it needs no index tensor from the host. A bucket built for the first time is checked
by its canary on the rows about to move in (engine/cuda/graphs.py); if capturing or the canary
fails, graphs are off for the plan (warned once, recorded in the sampler's report) and the batch
goes on without them (the rows are kept).
"""

from __future__ import annotations

import warnings

import torch

from .cuda.graphs import GraphsRefused
from .plan import SamplingPlan, reverse_step
from .stepping import Rows


class SlotBatch:
    """One group's running rows; ``graphed``: a GraphedSampler of the plan, or None (see module doc)."""

    def __init__(self, plan: SamplingPlan, graphed=None):
        self.plan = plan
        self.graphed = None if graphed is None or graphed.refused else graphed  # a refused plan runs eagerly
        self.rows: Rows | None = None  # the buffer: ``capacity`` slots
        self.bucket = None  # the graphs.Bucket whose static rows are the buffer (graphed only)
        self.where: dict = {}  # request -> (start, n), in slot order
        self.cadence = plan.cadence()  # which steps are full (cache_interval)

    @property
    def live(self) -> int:
        """Rows that belong to a request."""
        return sum(n for _, n in self.where.values())

    @property
    def capacity(self) -> int:
        """Slots stepped each step (live rows plus free slots)."""
        return 0 if self.rows is None else len(self.rows)

    def __len__(self):
        return self.live

    # ---- joining and leaving ---------------------------------------------------------------
    @torch.inference_mode()  # the buckets' static rows are inference tensors
    def add(self, requests) -> None:
        """Start the rows of ``requests`` (``plan.start`` of their seeds, in order) in free slots."""
        sizes = [len(r.seeds) for r in requests]
        labels = None if self.plan.num_classes is None else [c for r in requests for c in r.labels]
        fresh = self.plan.start([s for r in requests for s in r.seeds], labels=labels)
        m = len(fresh)
        start = self._free_run(m)
        if start is None:
            start = self.live
            self._repack(fresh)
        else:
            self.rows.write(start, fresh)
        self.cadence.restart()  # the fresh rows' cache is empty: the next step is full
        for req, n in zip(requests, sizes):
            self.where[req] = (start, n)
            start += n
        self.where = dict(sorted(self.where.items(), key=lambda kv: kv[1][0]))

    def images(self, req) -> torch.Tensor:
        """The request's current x, clamped to [-1, 1] (a new tensor: later steps do not change it)."""
        start, n = self.where[req]
        return self.rows.x[start:start + n].clamp(-1.0, 1.0)

    @torch.inference_mode()
    def remove(self, requests) -> None:
        """Free the slots of ``requests``; then move the rest to a smaller buffer if one fits them."""
        for req in requests:
            del self.where[req]
        if not self.where:
            self.rows = self.bucket = None
        elif self._capacity_for(self.live) < self.capacity:
            self._repack(None)

    def clear(self) -> None:
        self.where.clear()
        self.rows = self.bucket = None

    # ---- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One reverse step of every slot (no host work: a graph replay or ``reverse_step``)."""
        full = self.cadence.next()
        if self.bucket is not None:  # graphs serve no cache_interval plan: every step is full here
            self.bucket.replay()
        else:
            reverse_step(self.plan, self.rows, full=full)

    # ---- layout ------------------------------------------------------------------------------
    def _capacity_for(self, n: int) -> int:
        return n if self.graphed is None else self.graphed.bucket_for(n)

    def _free_run(self, m: int) -> int | None:
        """The first slot of a run of ``m`` free slots in the buffer (graphed only), or None."""
        if self.bucket is None:
            return None
        end = 0
        for start, n in self.where.values():
            if start - end >= m:
                return end
            end = start + n
        return end if self.capacity - end >= m else None

    def _repack(self, fresh: Rows | None) -> None:
        """Live rows in slot order, then ``fresh``, into slots 0.. of a buffer that fits them."""
        parts = [self.rows.part(start, start + n) for start, n in self.where.values()]
        parts += [] if fresh is None else [fresh]
        packed = Rows.cat(parts)  # new tensors: safe to write back into the same bucket
        start = 0
        for req, (_, n) in self.where.items():
            self.where[req] = (start, n)
            start += n
        if self.graphed is not None:
            try:  # built, captured and checked by the canary on first use, on these very rows
                bucket = self.graphed.bucket(len(packed), sample=packed)
            except Exception as exc:  # capture or canary failed: keep serving without graphs
                if not isinstance(exc, GraphsRefused):  # a refusal was warned about (and recorded) once
                    warnings.warn(f"CUDA-graph bucket of {self.graphed.bucket_for(len(packed))} rows could not be "
                                  f"built ({type(exc).__name__}: {exc}); this batch goes on without graphs",
                                  RuntimeWarning, stacklevel=2)
                self.graphed = None
            else:
                bucket.rows.write(0, packed)
                self.rows, self.bucket = bucket.rows, bucket
                return
        self.rows, self.bucket = packed, None
