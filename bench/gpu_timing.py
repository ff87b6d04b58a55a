"""Wall-clock timing on a CUDA device (or the CPU): a synchronised median, and the host's cost per step of a
graph driver (moved here from engine.cuda.graphs: measuring is the bench's job)."""

from __future__ import annotations

import time

import torch


def sync(device="cuda"):
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sync_time(fn, reps: int = 3, warm: bool = True, device="cuda") -> float:
    """Median wall seconds of fn() with a device sync after each call (one untimed call first
    unless ``warm=False``)."""
    if warm:
        fn()
        sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def host_us_per_step(graphed, seeds, driver: str = "python", reps: int = 5) -> dict:
    """Wall time per step of ``graphed.run(seeds, driver)`` (median over ``reps`` after one warm
    run that captures), in microseconds; for ``driver="python"`` also the host-only time to
    enqueue the steps (``graphed.bucket(len(seeds)).graph.replay()`` per step, no sync).

    graphed: what ``engine.graphed(sampler, steps, ...)`` returns (``.run``, ``.steps``, ``.bucket``).
    """
    seeds = list(seeds)
    graphed.run(seeds, driver)
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        graphed.run(seeds, driver)
        walls.append(time.perf_counter() - t0)
    walls.sort()
    steps = graphed.steps
    res = {"driver": driver, "steps": steps, "batch": len(seeds),
           "wall_us_per_step": 1e6 * walls[len(walls) // 2] / steps}
    if driver == "python":
        graph = graphed.bucket(len(seeds)).graph
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        res["enqueue_us_per_step"] = 1e6 * (time.perf_counter() - t0) / steps
        torch.cuda.synchronize()
    return res
