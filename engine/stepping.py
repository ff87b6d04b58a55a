"""Step implementations: advance a batch of ``Rows`` by one reverse step, in place.

Each implementation has the same contract so the loops around it do not care which runs:

    pred_x0 = step(rows, model_output, want_x0=False)

It writes x_{t-1} into ``rows.x``, decrements ``rows.i`` (int64 [B], per-sample step index,
saturating at 0) and, for a multistep sampler (samplers.ROW_STATE), writes this step's x0 into
``rows.x0_prev`` and, for UniPC, its corrector's known part into ``rows.corrector`` (allocated by
the caller, zeros, same shape as x): all in place, so
nothing on the host changes between steps and a step can be captured in a CUDA graph. A caller
that keeps x_t clones it first. ``pred_x0`` is returned only when ``want_x0`` (else None), and
may be a buffer the next call reuses: a caller that keeps it clones it. Noise comes from the
per-sample Philox stream (engine.noise) at step counter i (SDE-DPM-Solver++: noise.SDE_STEP + i;
DPM-Solver++ and UniPC draw none).

- ``TorchStep``: the reference (engine.samplers) plus the torch Philox generator.
- ``kernels.TritonStep``: one fused Triton kernel with in-kernel noise (kernels/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError
from .noise import SDE_STEP, philox_normal
from .samplers import ROW_STATE, check_state, ddim_step, ddpm_step, dpmpp_2m_sde_step, dpmpp_2m_step, unipc_step
from .schedules import DeviceTables, Prediction, Variance

STEP_IMPLS = ("auto", "torch", "triton")


@dataclass(eq=False)
class Rows:
    """The per-sample device state of a batch being sampled: one row per image, every field."""

    x: torch.Tensor  # [B, C, H, W] float32: x_t, overwritten with x_{t-1} by each step
    i: torch.Tensor  # int64 [B]: step index into the tables, decremented by each step
    words: torch.Tensor  # int64 [B, 2]: seed words (engine.noise.seed_words)
    x0_prev: torch.Tensor | None = None  # [B, C, H, W]: a multistep sampler's previous x0
    corrector: torch.Tensor | None = None  # [B, C, H, W]: UniPC's next corrector, the part known after a step

    def __len__(self):
        return self.x.shape[0]

    def part(self, start: int, stop: int) -> "Rows":
        """Rows start..stop-1, as views."""
        return Rows(*(None if v is None else v[start:stop] for v in self.fields()))

    def write(self, start: int, src: "Rows") -> None:
        """Copy ``src`` into rows start.., in place (static buffers stay where they are)."""
        for dst, v in zip(self.fields(), src.fields()):
            if dst is not None:
                dst[start:start + len(src)].copy_(v)

    def fields(self):
        return (self.x, self.i, self.words, self.x0_prev, self.corrector)

    @staticmethod
    def cat(parts) -> "Rows":
        parts = list(parts)
        return Rows(*(None if vs[0] is None else torch.cat(vs) for vs in zip(*(p.fields() for p in parts))))


@dataclass(frozen=True)
class StepSpec:
    """Everything that fixes the step math of one sampling run."""

    sampler: str  # a name in samplers.SAMPLERS
    prediction: Prediction
    variance: Variance
    clip_denoised: bool
    eta: float  # DDIM only
    use_clipped_model_output: bool = False  # DDIM with clipping: eps from the clipped x0 (diffusers' name)


class TorchStep:
    name = "torch"

    def __init__(self, spec: StepSpec, tab: DeviceTables, sample_shape):
        self.spec = spec
        self.tab = tab
        self.numel = math.prod(sample_shape)

    def __call__(self, rows: Rows, model_output, want_x0: bool = False):
        s, x_t, i = self.spec, rows.x, rows.i
        check_state(s.sampler, rows)
        opts = dict(prediction=s.prediction, clip_denoised=s.clip_denoised)
        if s.sampler == "dpmpp_2m":  # an ODE solver: no noise; the previous x0 lives in rows.x0_prev
            x_prev, x0 = dpmpp_2m_step(self.tab, x_t, model_output, i, rows.x0_prev, **opts)
        elif s.sampler == "dpmpp_2m_sde":
            noise = philox_normal(rows.words, i + SDE_STEP, self.numel).reshape(x_t.shape)
            x_prev, x0 = dpmpp_2m_sde_step(self.tab, x_t, model_output, i, rows.x0_prev, noise, **opts)
        elif s.sampler == "unipc":
            x_prev, x0, corrector = unipc_step(self.tab, x_t, model_output, i, rows.x0_prev, rows.corrector, **opts)
            rows.corrector.copy_(corrector)
        else:
            noise = philox_normal(rows.words, i, self.numel).reshape(x_t.shape)
            if s.sampler == "ddpm":
                x_prev, x0 = ddpm_step(self.tab, x_t, model_output, i, noise, variance=s.variance, **opts)
            else:
                x_prev, x0 = ddim_step(self.tab, x_t, model_output, i, noise, eta=s.eta,
                                       use_clipped_model_output=s.use_clipped_model_output, **opts)
        if s.sampler in ROW_STATE:
            rows.x0_prev.copy_(x0)
            x0 = rows.x0_prev
        x_t.copy_(x_prev)
        i.sub_(1).clamp_(min=0)
        return x0 if want_x0 else None


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
