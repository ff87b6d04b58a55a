"""Step implementations: advance a batch of ``Rows`` by one reverse step, in place.

Each implementation has the same contract so the loops around it do not care which runs:

    pred_x0 = step(rows, model_output, want_x0=False)

``model_output`` is the model's as it comes: C channels, or 2C for a learned variance
(samplers.model_output_parts: its width must fit the spec's variance type, else
InvalidRequestError before anything is written). With classifier-free guidance (a step built
with ``guidance_scale`` other than 1) it holds 2B rows for the B rows stepped: the conditional
rows, then the unconditional ones (``guided``: the layout and the combination); the step combines
them itself, so a fused kernel reads both where it reads the output (kernels/common.py).

It writes x_{t-1} into ``rows.x``, decrements ``rows.i`` (int64 [B], per-sample step index,
saturating at 0) and writes the sampler's per-sample state (samplers.SamplerDef.state: the
multistep samplers' ``rows.x0_prev``, UniPC's also ``rows.corrector``, the third-order ones'
``rows.x0_prev2``, iPNDM's ``rows.eps_prev`` .. ``eps_prev3``; allocated by the caller,
zeros, same shape as x): all in place, so nothing on the host changes between steps and a step
can be captured in a CUDA graph. A caller that keeps x_t clones it first. ``pred_x0`` is
returned only when ``want_x0`` (else None), and may be a buffer the next call reuses: a caller
that keeps it clones it. Noise comes from the per-sample Philox stream (engine.noise) at the step
counter the sampler's entry names (SamplerDef.noise: i, or noise.SDE_STEP + i; none for the ODE
solvers). Neither implementation names a sampler: both ask the spec's registry entry.

- ``TorchStep``: ``guided`` (with guidance), then the reference step (SamplerDef.torch) plus the
  torch Philox generator.
- ``kernels.TritonStep``: the sampler's fused Triton kernel (SamplerDef.kernel), noise made inside.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError
from .noise import philox_normal
from .guidance import conditional_rows, guided
from .samplers import StepSpec, model_output_parts
from .schedules import DeviceTables

STEP_IMPLS = ("auto", "torch", "triton")


@dataclass(eq=False)
class Rows:
    """The per-sample device state of a batch being sampled: one row per image, every field. A
    sampler's state (samplers.SamplerDef.state) names fields here, None where no sampler of the
    batch keeps it; a new kind of state is one more field (every method reads them all)."""

    x: torch.Tensor  # [B, C, H, W] float32: x_t, overwritten with x_{t-1} by each step
    i: torch.Tensor  # int64 [B]: step index into the tables, decremented by each step
    words: torch.Tensor  # int64 [B, 2]: seed words (engine.noise.seed_words)
    x0_prev: torch.Tensor | None = None  # [B, C, H, W]: a multistep sampler's previous x0
    corrector: torch.Tensor | None = None  # [B, C, H, W]: UniPC's next corrector, the part known after a step
    x0_prev2: torch.Tensor | None = None  # [B, C, H, W]: a third-order multistep sampler's x0 of two steps ago
    eps_prev: torch.Tensor | None = None  # [B, C, H, W]: iPNDM's eps of the previous step
    eps_prev2: torch.Tensor | None = None  # [B, C, H, W]: ... of two steps ago
    eps_prev3: torch.Tensor | None = None  # [B, C, H, W]: ... of three steps ago
    labels: torch.Tensor | None = None  # int64 [B]: class labels of a class-conditional model (the model's input)
    x_self_cond: torch.Tensor | None = None  # [B, C, H, W]: a self-conditioned model's previous x0 (its input)
    deep: torch.Tensor | None = None  # [B, k*C_d, H_d, W_d]: cache_interval's cached deep features (engine.deepcache)

    def __post_init__(self):
        # Not a row field: the doubled inputs of a guided model call on these rows ([2B] buffers,
        # plan.GuidedInputs), built at their first guided step and refilled in place by every later one.
        self.model_inputs = None

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
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @staticmethod
    def cat(parts) -> "Rows":
        parts = list(parts)
        return Rows(*(None if vs[0] is None else torch.cat(vs) for vs in zip(*(p.fields() for p in parts))))


class TorchStep:
    """The reference step of the spec's sampler (SamplerDef.torch) on Rows: reads its state, draws
    its Philox noise, writes the state back; with ``guidance_scale`` other than 1, the model
    output's 2B rows are combined first (``guided``)."""

    name = "torch"

    def __init__(self, spec: StepSpec, tab: DeviceTables, sample_shape, guidance_scale: float = 1.0):
        self.spec = spec
        self.sampler = spec.definition
        self.tab = tab
        self.numel = math.prod(sample_shape)
        self.guidance_scale = float(guidance_scale)

    def __call__(self, rows: Rows, model_output, want_x0: bool = False):
        d, x_t, i = self.sampler, rows.x, rows.i
        d.check_state(rows)
        # its rows and width fit the guidance and the variance type (metadata)
        model_output_parts(conditional_rows(model_output, x_t, self.guidance_scale), x_t, self.spec.variance)
        if self.guidance_scale != 1.0:
            model_output = guided(model_output, self.guidance_scale, x_t.shape[1])
        state = [getattr(rows, name) for name in d.state]
        noise = None if d.noise is None else philox_normal(rows.words, i + d.noise, self.numel).reshape(x_t.shape)
        x_prev, x0, *new_state = d.torch(self.spec, self.tab, x_t, model_output, i, noise, *state)
        for buffer, value in zip(state, new_state):
            buffer.copy_(value)
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


def make_step(step_impl: str, spec: StepSpec, tab: DeviceTables, sample_shape, guidance_scale: float = 1.0):
    """The step of a resolved ``step_impl`` ("torch" or "triton": resolve_step_impl's answer);
    ``guidance_scale`` other than 1: it takes a guided call's 2B-row output (``guided``)."""
    if step_impl == "torch":
        return TorchStep(spec, tab, sample_shape, guidance_scale)
    from ddpm_engine.kernels import TritonStep  # import-gated: raises MissingDependencyError without triton

    return TritonStep(spec, tab, sample_shape, guidance_scale)
