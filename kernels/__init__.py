"""Fused Triton kernels for the per-step posterior update, each beside its torch reference.

- ddpm_step.py: DDPM ancestral step (both variances, x0 clipping, the t = 0 mask, eps/x0/v);
- ddim_step.py: DDIM step, any eta;
- philox.py: the engine's per-sample Philox noise, generated inside the kernels.

``TritonStep`` is the engine-facing wrapper with the same contract as engine.stepping.TorchStep.
Importing this package does not import triton; building a TritonStep does (and says what to
install, or to set TRITON_INTERPRET=1 on a machine without a GPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddpm_engine.errors import BackendUnavailableError, require

CSRC = Path(__file__).parent / "csrc"  # C and CUDA sources of the graph drivers (engine/cuda builds them)


class TritonStep:
    """``x0 = step(rows, model_output, want_x0=False)`` (engine.stepping's contract): one fused
    kernel launch writes x_prev in place into rows.x (zero allocations per step), then a tiny launch
    decrements i on the device (see ddpm_step.advance for why it is a second launch). x0 is written
    only when ``want_x0`` (else None is returned), into a buffer reused by later calls: a caller
    that keeps it clones it. x_t must be contiguous (the engine's x always is)."""

    name = "triton"

    def __init__(self, spec, tab, sample_shape):
        require("triton", "the fused Triton step (step_impl='triton')", extra="triton")
        device = tab.packed.device
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(
                "step_impl='triton' on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported, or use step_impl='torch'")
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(f"step_impl='triton' runs on CUDA (or ROCm) GPUs, or on the CPU in "
                                          f"Triton's interpreter, not on {device.type}; use step_impl='torch'")
        from . import ddim_step, ddpm_step
        from ddpm_engine.samplers import Prediction

        self.spec = spec
        self.table = tab.packed if tab.packed.dtype == torch.float32 else tab.packed.float()
        self.prediction = {Prediction.EPSILON: ddpm_step.PRED_EPSILON, Prediction.SAMPLE: ddpm_step.PRED_SAMPLE,
                           Prediction.V: ddpm_step.PRED_V}[spec.prediction]
        self._ddpm, self._ddim, self._advance = ddpm_step.ddpm_step, ddim_step.ddim_step, ddpm_step.advance
        self._x0 = None

    def __call__(self, rows, model_output, want_x0: bool = False):
        s, x_t, i, seed_words = self.spec, rows.x, rows.i, rows.words
        if want_x0 and (self._x0 is None or self._x0.shape != x_t.shape):
            self._x0 = torch.empty_like(x_t)
        common = dict(prediction=self.prediction, clip_denoised=s.clip_denoised, x_prev=x_t,
                      x0=self._x0 if want_x0 else None, store_x0=want_x0)
        if s.sampler == "ddpm":
            x_prev, x0 = self._ddpm(x_t, model_output, i, seed_words, self.table, variance=s.variance.value, **common)
        else:
            x_prev, x0 = self._ddim(x_t, model_output, i, seed_words, self.table, eta=s.eta, **common)
        self._advance(i)
        return x0
