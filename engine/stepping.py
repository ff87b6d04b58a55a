"""Step implementations: turn (x_t, model output, step index, seeds) into x_{t-1}.

Each implementation has the same contract so the driver loop does not care which runs:

    x_prev, pred_x0 = step(x_t, model_output, i, seed_words, want_x0=False)

and ``i`` (int64 [B], per-sample step index) is decremented in place, saturating at 0, so
nothing on the host changes between steps. An implementation may write x_prev in place into
x_t (the Triton one does), so a caller that keeps x_t clones it first. ``pred_x0`` is only
guaranteed when ``want_x0`` is true. Noise comes from the per-sample Philox stream
(engine.noise) at step counter i.

- ``TorchStep``: the reference (engine.samplers) plus the torch Philox generator.
- ``kernels.TritonStep``: one fused Triton kernel with in-kernel noise (kernels/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError
from .noise import philox_normal
from .samplers import Prediction, Variance, ddim_step, ddpm_step
from .schedules import DeviceTables

STEP_IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class StepSpec:
    """Everything that fixes the step math of one sampling run."""

    sampler: str  # "ddpm" | "ddim"
    prediction: Prediction
    variance: Variance
    clip_denoised: bool
    eta: float  # DDIM only


class TorchStep:
    name = "torch"

    def __init__(self, spec: StepSpec, tab: DeviceTables, sample_shape):
        self.spec = spec
        self.tab = tab
        self.numel = math.prod(sample_shape)

    def __call__(self, x_t, model_output, i, seed_words, want_x0: bool = False):
        s = self.spec
        noise = philox_normal(seed_words, i, self.numel).reshape(x_t.shape)
        if s.sampler == "ddpm":
            x_prev, x0 = ddpm_step(self.tab, x_t, model_output, i, noise, prediction=s.prediction,
                                   variance=s.variance, clip_denoised=s.clip_denoised)
        else:
            x_prev, x0 = ddim_step(self.tab, x_t, model_output, i, noise, eta=s.eta, prediction=s.prediction,
                                   clip_denoised=s.clip_denoised)
        i.sub_(1).clamp_(min=0)
        return x_prev, x0


def resolve_step_impl(step_impl: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when triton is installed, else 'torch'."""
    if step_impl not in STEP_IMPLS:
        raise InvalidRequestError(f"unknown step_impl {step_impl!r}; choose one of {STEP_IMPLS}")
    if step_impl != "auto":
        return step_impl
    if torch.device(device).type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is not None:
            return "triton"
    return "torch"


def make_step(step_impl: str, spec: StepSpec, tab: DeviceTables, sample_shape, device):
    impl = resolve_step_impl(step_impl, device)
    if impl == "torch":
        return TorchStep(spec, tab, sample_shape)
    from ddpm_engine.kernels import TritonStep  # import-gated: raises MissingDependencyError without triton

    return TritonStep(spec, tab, sample_shape)
