"""``backend="auto"``: the fastest backend for a (model, sample shape, precision, device), measured
once and remembered on disk.

- CUDA: eager torch (the compiled backends are opt-in until the GPU parity suite has passed for
  them on that machine); nothing is measured.
- ``$DDPM_ENGINE_BACKEND`` (``ENV``) names a backend: auto takes it, as if passed as ``backend=``.
- The CPU: the candidates are the backends of ``CPU_CANDIDATES`` that can run the precision here
  (``unavailable_reason(device, precision)`` is None: onnxruntime runs fp32 only, openvino runs
  bf16 / fp16 only where the CPU has them natively). With more than one, each is built and timed
  by the one timing rule (``timing.measure``: a few calls at batch 1 and at a typical batch, in
  alternating rounds; a few seconds, never a sample) and the fastest is taken (``timing.fastest``).
- The verdict (``timing.Verdict``) is cached as JSON in ``$DDPM_ENGINE_CACHE/auto``, keyed by
  ``timing.verdict_path`` (the model, the precision, the CPU's model and flags, the thread count,
  the library versions, the candidates): a new CPU, library or model measures again; an
  unreadable verdict is measured again once (``timing.measured_choice``).
- Reduced precision on a CPU without it natively (no AVX512_BF16 / AMX for bf16, no AVX512-FP16
  for fp16): only torch can run it, emulated through fp32 kernels and slower than fp32 itself;
  auto takes torch and the torch backend warns (``EmulatedPrecisionWarning``). The request is
  honoured (the numerics are those of the precision asked for); the warning says to use fp32
  for speed.

``python -m ddpm_engine info --model M [--precision P]`` prints the verdict (``Verdict.report``).
Tests replace ``timing.time_call`` with a fake timer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import cpu
from ..errors import EngineError, InvalidRequestError
from . import timing
from .timing import Verdict
from .registry import BACKEND_CLASSES, available, create_named

ENV = "DDPM_ENGINE_BACKEND"
CPU_CANDIDATES = ("openvino", "onnxruntime", "torch")  # aoti is opt-in: its compile takes minutes


def verdict_path(loaded, precision: str, candidates, cache_dir=None) -> Path:
    return timing.verdict_path("auto", loaded, precision, candidates, cache_dir)


def override() -> str | None:
    """The backend named by $DDPM_ENGINE_BACKEND, or None."""
    name = os.environ.get(ENV, "").strip()
    if not name or name == "auto":
        return None
    if name not in BACKEND_CLASSES:
        raise InvalidRequestError(f"${ENV}={name!r} is not a backend; use one of {tuple(BACKEND_CLASSES)} or unset it")
    return name


def decide(loaded, device, precision: str) -> tuple[Verdict, object | None]:
    """(auto's verdict, the chosen backend if it had to be built to measure, else None)."""
    device = torch.device(device)
    name = override()
    if name is not None:
        return Verdict(name, f"override (${ENV})", precision), None
    if device.type != "cpu":
        return Verdict("torch", "cuda default", precision), None
    reasons = available(device, precision, CPU_CANDIDATES)
    candidates = [n for n in CPU_CANDIDATES if reasons.get(n) is None]
    skipped = {n: reasons[n] for n in CPU_CANDIDATES if reasons.get(n) is not None}
    if len(candidates) == 1:
        return Verdict(candidates[0], "only candidate", precision, skipped=skipped, cpu=cpu.describe()), None

    def build(skipped: dict) -> dict:
        built = {}
        for n in candidates:
            try:
                built[n] = create_named(n, loaded, device, precision)
            except EngineError as exc:  # e.g. a model the ONNX exporter cannot trace: not a candidate
                skipped[n] = f"failed to build: {exc}"
        return built

    return timing.measured_choice(verdict_path(loaded, precision, candidates), "auto", loaded, precision, candidates,
                                  build, skipped)
