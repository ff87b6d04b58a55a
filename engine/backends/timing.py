"""Measured choices on the CPU: time a few UNet calls of each built candidate and take the
fastest, the one timing rule for ``backend="auto"`` (which backend, ``auto.py``) and the torch
backend (which memory format, ``torch_backend.py``).

- ``measure``: one warm-up call at each batch, then ``ROUNDS`` rounds that alternate the
  candidates (fair on a shared machine), each round one call at batch 1 and one at
  ``TYPICAL_BATCH``: 2 x (ROUNDS + 1) UNet calls per candidate at small batches, a few seconds,
  never a sample.
- ``fastest``: a candidate's score is the sum of its two medians, the lowest wins (a tie goes to
  the first candidate).
- ``verdict_parts``: what a cached verdict is keyed by (``cache.key``): the model (weights hash,
  structure, sample shape), the precision, the CPU's model and flags, torch's thread count, the
  versions of torch, onnxruntime and openvino, and the timing rule itself (``RULE``).

Tests replace ``time_call`` with a fake timer (never wall time).
"""

from __future__ import annotations

import importlib.metadata as md
import statistics
import time

import torch

from .. import cache, cpu

TYPICAL_BATCH = 8
ROUNDS = 3
RULE = 2  # bump when what a measured candidate runs changes (2: OpenVINO's static-shape compiles)


def time_call(backend, x, t) -> float:
    """Seconds one call of ``backend`` takes (the CPU backends return finished results)."""
    start = time.perf_counter()
    backend(x, t)
    return time.perf_counter() - start


def measure(built: dict, sample_shape, num_train_timesteps: int) -> dict:
    """{name: {batch: median ms}} of the built candidates, timed in alternating rounds."""
    gen = torch.Generator().manual_seed(0)
    inputs = {b: (torch.randn(b, *sample_shape, generator=gen),
                  torch.randint(0, num_train_timesteps, (b,), generator=gen)) for b in (1, TYPICAL_BATCH)}
    with torch.inference_mode():
        for backend in built.values():
            for x, t in inputs.values():
                backend(x, t)  # warm-up: first-call allocations, per-shape kernel selection
        times = {name: {b: [] for b in inputs} for name in built}
        for _ in range(ROUNDS):
            for name, backend in built.items():
                for b, (x, t) in inputs.items():
                    times[name][b].append(time_call(backend, x, t))
    return {name: {b: 1e3 * statistics.median(v) for b, v in by_batch.items()} for name, by_batch in times.items()}


def fastest(ms: dict) -> str:
    """The candidate of ``measure``'s result with the lowest sum of medians."""
    return min(ms, key=lambda name: sum(ms[name].values()))


def version(dist: str):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def verdict_parts(loaded, precision: str) -> dict:
    return {"weights": loaded.weights_hash, "structure": cache.module_structure(loaded.module),
            "sample_shape": list(loaded.sample_shape), "precision": precision, "device": "cpu",
            "cpu": cpu.model(), "flags": sorted(cpu.flags()), "threads": torch.get_num_threads(),
            "versions": {d: version(d) for d in ("torch", "onnxruntime", "openvino")},
            "rounds": ROUNDS, "typical_batch": TYPICAL_BATCH, "rule": RULE}
