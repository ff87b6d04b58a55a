"""``TritonStep``: the fused kernels behind engine.stepping's step contract.

    x0 = step(rows, model_output, want_x0=False)

The spec's sampler names its kernel in its registry entry (``SamplerDef.kernel``,
"module:function" in this package); that function steps the rows in place with one fused
launch (zero allocations per step), then a tiny launch decrements i on the device (see
common.advance for why it is a second launch). Each kernel module's step function has one
signature:

    x0 = step_rows(spec, prediction, table, rows, model_output, x0, guidance_scale=1.0)

``prediction`` a code of common.PREDICTION_CODE, ``table`` DeviceTables.packed (fp32), ``x0`` a
buffer for the predicted x0 or None when the caller does not want it; it returns the x0 it wrote
(into ``x0``, or a multistep sampler's state buffer rows.x0_prev), or None. The buffer is reused
by later calls: a caller that keeps x0 clones it. ``guidance_scale`` other than 1: the output
holds 2B rows, conditional then unconditional (engine.guidance.guided), and the kernel combines
them as it loads them (common.load_output). x_t must be contiguous (the engine's x always
is). Building a TritonStep imports triton and the kernel's module (and says what to install, or
to set TRITON_INTERPRET=1 on a machine without a GPU); importing this module does not.
"""

from __future__ import annotations

import importlib
import os

import torch

from ddpm_engine.errors import BackendUnavailableError, require
from ddpm_engine.samplers import model_output_parts
from ddpm_engine.guidance import conditional_rows


class TritonStep:
    name = "triton"

    def __init__(self, spec, tab, sample_shape, guidance_scale: float = 1.0):
        require("triton", "the fused Triton step (step_impl='triton')", extra="triton")
        device = tab.packed.device
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(
                "step_impl='triton' on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported, or use step_impl='torch'")
        if device.type not in ("cpu", "cuda"):
            raise BackendUnavailableError(f"step_impl='triton' runs on CUDA (or ROCm) GPUs, or on the CPU in "
                                          f"Triton's interpreter, not on {device.type}; use step_impl='torch'")
        self.spec = spec
        self.sampler = spec.definition
        if self.sampler.kernel is None:
            raise BackendUnavailableError(f"the {self.sampler.name} sampler has no fused Triton step; "
                                          "use step_impl='torch'")
        from . import common

        module, function = self.sampler.kernel.split(":")
        self._step = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        self.table = tab.packed if tab.packed.dtype == torch.float32 else tab.packed.float()
        self.prediction = common.PREDICTION_CODE[spec.prediction]
        self._advance = common.advance
        self._x0 = None
        self.guidance_scale = float(guidance_scale)

    def __call__(self, rows, model_output, want_x0: bool = False):
        self.sampler.check_state(rows)
        # its rows and width fit the guidance and the variance type (metadata)
        model_output_parts(conditional_rows(model_output, rows.x, self.guidance_scale), rows.x, self.spec.variance)
        if want_x0 and (self._x0 is None or self._x0.shape != rows.x.shape):
            self._x0 = torch.empty_like(rows.x)
        x0 = self._step(self.spec, self.prediction, self.table, rows, model_output, self._x0 if want_x0 else None,
                        guidance_scale=self.guidance_scale)
        self._advance(rows.i)
        return x0
