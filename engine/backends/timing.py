"""Measured choices on the CPU: time a few UNet calls of each built candidate and take the
fastest, the one timing rule for ``backend="auto"`` (which backend, ``auto.py``) and the torch
backend (which memory format, ``torch_backend.py``).

- ``measure``: one warm-up call at each batch, then ``ROUNDS`` rounds that alternate the
  candidates (fair on a shared machine), each round one call at batch 1 and one at
  ``TYPICAL_BATCH``: 2 x (ROUNDS + 1) UNet calls per candidate at small batches, a few seconds,
  never a sample.
- ``fastest``: a candidate's score is the sum of its two medians, the lowest wins (a tie goes to
  the first candidate).
- ``verdict_path``: what a cached verdict is keyed by (``cache.key``): the model (weights hash,
  structure, sample shape), the precision, the CPU's model and flags, torch's thread count, the
  versions of torch, onnxruntime and openvino, the timing rule itself (``RULE``) and the
  candidates.

- ``measured_choice``: the whole of a measured choice, one verdict (``Verdict``) cached as JSON
  under ``verdict_path``: build the candidates, ``measure``, take the ``fastest``, write it; a
  cached verdict is read back (source "cached"), one that is unreadable or names no candidate is
  measured again once.

Each candidate is timed as the engine samples with it: inside ``threads.yield_cpu_to(backend)``
(torch's thread count while sampling).

Tests replace ``time_call`` with a fake timer (never wall time).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import cache, cpu
from ..threads import yield_cpu_to
from .base import versions

TYPICAL_BATCH = 8
ROUNDS = 3
RULE = 4  # bump when what a measured candidate runs changes (2: OpenVINO static shapes; 3: timed in yield_cpu_to;
#          4: OpenVINO runs batch 8 as two requests in flight)


def time_call(backend, x, t, *extra) -> float:
    """Seconds one call of ``backend`` takes (the CPU backends return finished results)."""
    start = time.perf_counter()
    backend(x, t, *extra)
    return time.perf_counter() - start


def measure(built: dict, sample_shape, num_train_timesteps: int) -> dict:
    """{name: {batch: median ms}} of the built candidates, timed in alternating rounds (each
    given its extra inputs, ``Backend.extra_inputs``: label 0 for a class-conditional model)."""
    gen = torch.Generator().manual_seed(0)
    inputs = {b: (torch.randn(b, *sample_shape, generator=gen),
                  torch.randint(0, num_train_timesteps, (b,), generator=gen)) for b in (1, TYPICAL_BATCH)}

    def args(backend, b):
        x, t = inputs[b]
        return (x, t, *(torch.zeros(b, dtype=torch.int64) for _ in getattr(backend, "extra_inputs", ())))

    with torch.inference_mode():
        for backend in built.values():
            prepare = getattr(backend, "prepare", None)  # Backend.prepare; a bare callable has none
            if prepare is not None:
                prepare(inputs)  # what a first call builds (OpenVINO's static shapes), before the timing
            with yield_cpu_to(backend):
                for b in inputs:
                    backend(*args(backend, b))  # warm-up: first-call allocations, per-shape kernel selection
        times = {name: {b: [] for b in inputs} for name in built}
        for _ in range(ROUNDS):
            for name, backend in built.items():
                with yield_cpu_to(backend):
                    for b in inputs:
                        times[name][b].append(time_call(backend, *args(backend, b)))
    return {name: {b: 1e3 * statistics.median(v) for b, v in by_batch.items()} for name, by_batch in times.items()}


def fastest(ms: dict) -> str:
    """The candidate of ``measure``'s result with the lowest sum of medians."""
    return min(ms, key=lambda name: sum(ms[name].values()))


@dataclass
class Verdict:
    """A measured choice and how it was reached: ``what`` was chosen ("auto" a backend, "torch
    layout" a memory format), ``ms[name] = {batch: median ms}`` of the measured candidates,
    ``skipped[name]`` = why one was not a candidate."""

    choice: str
    source: str  # "measured", "cached", "only candidate", "override (...)", "cuda default", "unmeasured: ..."
    precision: str
    ms: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    cpu: str = ""
    what: str = "auto"

    def report(self) -> str:
        lines = [f"{self.what} ({self.precision}) -> {self.choice} [{self.source}]" + (f" on {self.cpu}" if self.cpu else "")]
        for name, by_batch in self.ms.items():
            cells = ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in by_batch.items())
            lines.append(f"  {name:12s} {cells}{'   <- chosen' if name == self.choice else ''}")
        for name, reason in self.skipped.items():
            lines.append(f"  {name:12s} not a candidate: {reason}")
        return "\n".join(lines)


class Unreadable(ValueError):
    """A cached verdict that does not parse, or names no candidate."""


def verdict_path(kind: str, loaded, precision: str, candidates, cache_dir=None) -> Path:
    """Where the verdict of one measured choice (``kind``: its cache folder) is cached, keyed by
    everything that decides it."""
    parts = {"weights": loaded.weights_hash, "structure": cache.module_structure(loaded.module),
             "sample_shape": list(loaded.sample_shape), "precision": precision, "device": "cpu",
             "cpu": cpu.model(), "flags": sorted(cpu.flags()), "threads": torch.get_num_threads(),
             "versions": versions(("torch", "onnxruntime", "openvino")),
             "rounds": ROUNDS, "typical_batch": TYPICAL_BATCH, "rule": RULE, "candidates": list(candidates)}
    return cache.artifact_path(kind, loaded.name, parts, ".json", (precision,), cache_dir)


def read_verdict(path: Path, candidates) -> Verdict:
    try:
        data = json.loads(path.read_text())
        data["ms"] = {n: {int(b): float(ms) for b, ms in v.items()} for n, v in data["ms"].items()}
        verdict = Verdict(**data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unreadable(str(exc)) from None
    if verdict.choice not in candidates:
        raise Unreadable(f"{path} names {verdict.choice!r}, not one of {list(candidates)}")
    return verdict


def measured_choice(path: Path, what: str, loaded, precision: str, candidates,
                    build: Callable[[dict], dict], skipped: dict | None = None) -> tuple[Verdict, object | None]:
    """(the verdict cached at ``path``, measured first if there is none; the chosen candidate if it
    was built to measure, else None). ``build(skipped)`` returns {name: backend} of the
    ``candidates`` it could build, recording in ``skipped`` why others could not."""
    built, skipped = {}, dict(skipped or {})

    def make(tmp: Path):
        built.update(build(skipped))
        ms = measure(built, loaded.sample_shape, loaded.scheduler.num_train_timesteps)
        verdict = Verdict(fastest(ms), "measured", precision, ms, skipped, cpu.describe(), what)
        tmp.write_text(json.dumps(asdict(verdict), indent=1))

    verdict = cache.load(path, make, lambda p: read_verdict(p, candidates), corrupt=(Unreadable,))
    if not built:
        verdict.source = "cached"
    return verdict, built.get(verdict.choice)
