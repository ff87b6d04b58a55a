"""Fused Triton kernels for the per-step update, each beside its torch reference.

- ``<name>_step.py``: one module per sampler kernel, named by the sampler's registry entry
  (engine.samplers.SamplerDef.kernel, "module:function"). Each imports its reference step as
  ``reference`` (the tests hold the kernel to it) and defines its launcher and ``step_rows``,
  the engine's step of a batch of rows (triton_step.py documents the signature);
- common.py: what they share (table columns, prediction codes, the per-sample prologue, x0/eps,
  in-kernel noise, launch checks, the step-index advance);
- philox.py: the engine's per-sample Philox noise, generated inside the kernels;
- options.py: the compile options every launch passes (floating-point fusion);
- triton_step.py: ``TritonStep``, the engine-facing wrapper with the same contract as
  engine.stepping.TorchStep.

Each module with a kernel also lists, in ``launches(t)`` beside its launcher, one launch per
compile-time choice the launcher can make: tests/kernels/test_compile_sm90.py compiles them all
for sm_90.

Importing this package does not import triton; building a TritonStep does (and says what to
install, or to set TRITON_INTERPRET=1 on a machine without a GPU).
"""

from __future__ import annotations

from pathlib import Path

from .triton_step import TritonStep

CSRC = Path(__file__).parent / "csrc"  # C and CUDA sources of the graph drivers (engine/cuda builds them)

__all__ = ["CSRC", "TritonStep"]
