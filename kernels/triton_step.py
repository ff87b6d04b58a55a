"""``TritonStep``: the fused kernels behind engine.stepping's step contract.

    x0 = step(rows, model_output, want_x0=False)

One fused kernel launch writes x_prev in place into rows.x (zero allocations per step), then a
tiny launch decrements i on the device (see common.advance for why it is a second launch).
DDPM / DDIM write x0 only when ``want_x0`` (else None is returned), into a buffer reused by later
calls: a caller that keeps it clones it. The multistep samplers (DPM-Solver++(2M), ODE and SDE, and
UniPC) always write x0, into rows.x0_prev (their multistep state; UniPC also rows.corrector), and
return that buffer when ``want_x0``. x_t must be contiguous (the engine's x
always is). Building one imports triton (and says what to install, or to set TRITON_INTERPRET=1
on a machine without a GPU); importing this module does not.
"""

from __future__ import annotations

import os

import torch

from ddpm_engine.errors import BackendUnavailableError, require
from ddpm_engine.samplers import ROW_STATE, check_state


class TritonStep:
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
        from . import common, ddim_step, ddpm_step, dpmpp_step, unipc_step

        self.spec = spec
        self.table = tab.packed if tab.packed.dtype == torch.float32 else tab.packed.float()
        self.prediction = common.PREDICTION_CODE[spec.prediction]
        self._ddpm, self._ddim, self._dpmpp = ddpm_step.ddpm_step, ddim_step.ddim_step, dpmpp_step.dpmpp_2m_step
        self._unipc = unipc_step.unipc_step
        self._advance = common.advance
        self._x0 = None

    def __call__(self, rows, model_output, want_x0: bool = False):
        s, x_t, i = self.spec, rows.x, rows.i
        if s.sampler in ROW_STATE:
            check_state(s.sampler, rows)
            kw = dict(prediction=self.prediction, clip_denoised=s.clip_denoised, x_prev=x_t)
            if s.sampler == "unipc":
                self._unipc(x_t, model_output, i, rows.x0_prev, rows.corrector, self.table, **kw)
            else:
                self._dpmpp(x_t, model_output, i, rows.x0_prev, self.table,
                            seed_words=rows.words if s.sampler == "dpmpp_2m_sde" else None, **kw)
            self._advance(i)
            return rows.x0_prev if want_x0 else None
        if want_x0 and (self._x0 is None or self._x0.shape != x_t.shape):
            self._x0 = torch.empty_like(x_t)
        kw = dict(prediction=self.prediction, clip_denoised=s.clip_denoised, x_prev=x_t,
                      x0=self._x0 if want_x0 else None, store_x0=want_x0)
        if s.sampler == "ddpm":
            _, x0 = self._ddpm(x_t, model_output, i, rows.words, self.table, variance=s.variance, **kw)
        else:
            _, x0 = self._ddim(x_t, model_output, i, rows.words, self.table, eta=s.eta,
                               use_clipped_model_output=s.use_clipped_model_output, **kw)
        self._advance(i)
        return x0
