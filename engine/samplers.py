"""The samplers: their reference reverse steps and the registry that is the one place their rules live.

Reference steps: plain PyTorch, readable, and the oracle for every faster path.

The steps take per-sample step indices ``i`` (int64 [B], into a ``Tables``), so the samples of
one batch may sit at different steps. They are pure and sync-free: coefficients are gathered on
the device, the t = 0 case is a mask (no ``if`` on a tensor, no ``.item()``), so a step can be
captured in a CUDA graph. Shapes: x_t, model_output, noise are [B, C, H, W] (any trailing dims).

The registry: ``SAMPLER_DEFS`` maps each name in ``SAMPLERS`` to its ``SamplerDef`` (timestep
spacing, default steps, default clipping, per-row state, noise stream, reference step, torch
step, Triton kernel). Everything that asks "which sampler" asks it (``sampler_def(name)``); a
``StepSpec`` names its sampler and carries the entry (``spec.definition``). Adding a sampler:
docs/extending.md.

Public user-facing API: ``DDPMSampler`` / ``DDIMSampler`` / ``DPMSolverSampler`` / ``UniPCSampler`` (both with
``solver_order`` 2 or 3) with diffusers-like
``timesteps`` and ``step(model_output, timestep, sample[, noise])``, where ``timestep`` holds *training* timesteps
per sample (tensor [B]) and is mapped to step indices on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import InvalidRequestError, quote
from .noise import SDE_STEP
from .schedules import (SPACINGS, TIMESTEP_SPACINGS, DeviceTables, ExplicitSpacing, Prediction, Tables, Variance,
                        make_betas, multistep_grid)


def _gather(column: torch.Tensor, i: torch.Tensor, ndim: int) -> torch.Tensor:
    """column[i] shaped [B, 1, 1, ...] to broadcast against a [B, ...] sample."""
    return column[i].reshape(-1, *([1] * (ndim - 1)))


def model_output_parts(model_output, x_t, variance=None):
    """Where a model's output keeps its prediction and its variance part: (prediction, variance
    part or None), views of ``model_output`` (no copy). The one place that knows the layout.

    A model with a learned variance (Variance.learned; Nichol & Dhariwal 2021, improved-diffusion,
    guided-diffusion, diffusers) outputs 2C channels for C sample channels, [prediction (eps / x0 /
    v), variance part], split along dim 1 as diffusers' ``torch.split(model_output, C, dim=1)``.
    Every sampler reads the prediction, the first C channels; only DDPM with a learned variance
    reads the variance part. ``variance``: the Variance the caller's step uses: a learned one needs
    2C channels and a fixed one C (diffusers' DDPMScheduler); None (a sampler that takes no
    variance) accepts either, as diffusers' pipelines split before DDIM / DPM-Solver / UniPC.
    Host metadata only (no sync); a wrong width raises InvalidRequestError.

    :param model_output: [B, C or 2C, ...]; :param x_t: [B, C, ...].
    """
    C, width = x_t.shape[1], model_output.shape[1] if model_output.ndim > 1 else None
    allowed = (C, 2 * C) if variance is None else ((2 * C,) if Variance(variance).learned else (C,))
    if width not in allowed or model_output.shape[0] != x_t.shape[0] or model_output.shape[2:] != x_t.shape[2:]:
        why = ("" if variance is None else f" for variance type {Variance(variance).value!r}"
               + (" (the model outputs [prediction, variance part])" if Variance(variance).learned else ""))
        want = " or ".join(str((x_t.shape[0], w, *x_t.shape[2:])) for w in allowed)
        raise InvalidRequestError(f"the model output has shape {tuple(model_output.shape)}; expected {want}{why}: "
                                  "a model with a learned variance needs variance_type 'learned' or 'learned_range' "
                                  "in its scheduler config, any other model C output channels")
    if width == C:
        return model_output, None
    return model_output[:, :C], model_output[:, C:]


def predict_x0_and_eps(tab: DeviceTables, x_t, model_output, i, prediction: Prediction):
    """x0 and epsilon implied by the model output at step index i (before any clipping).

    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps  (DDPM eq. 4) is solved for whichever is missing.
    ``model_output`` is the model's as it comes (C channels, or 2C with a learned variance):
    its prediction is read through ``model_output_parts``.
    """
    model_output, _ = model_output_parts(model_output, x_t)
    nd = x_t.ndim
    sa = _gather(tab.sqrt_alphas_cumprod, i, nd)
    s1ma = _gather(tab.sqrt_one_minus_alphas_cumprod, i, nd)
    if prediction is Prediction.EPSILON:
        eps = model_output
        x0 = _gather(tab.sqrt_recip_alphas_cumprod, i, nd) * x_t - _gather(tab.sqrt_recipm1_alphas_cumprod, i, nd) * eps
    elif prediction is Prediction.SAMPLE:
        x0 = model_output
        eps = (x_t - sa * x0) / s1ma
    else:  # v
        x0 = sa * x_t - s1ma * model_output
        eps = sa * model_output + s1ma * x_t
    return x0, eps


def ddpm_step(tab: DeviceTables, x_t, model_output, i, noise, *, prediction=Prediction.EPSILON,
              variance=Variance.FIXED_SMALL, clip_denoised=False):
    """One ancestral DDPM step from step index i: returns (x_prev, pred_x0).

    1. x0 from the model output (eq. 15 for epsilon), optionally clipped to [-1, 1];
    2. posterior mean  mu = coef1 * x0 + coef2 * x_t  (eq. 7);
    3. x_prev = mu + sigma * noise, with the noise masked out where i == 0 (a mask, not a
       product: a learned sigma that overflows there cannot leak in as inf * 0).

    sigma^2 per variance type (``model_output`` has 2C channels for a learned one, split by
    ``model_output_parts``; v is its variance part, per element):

    - fixed_small:   log sigma^2 = posterior_log_variance_clipped[i]  (DDPM eq. 7's beta~);
    - fixed_large:   log sigma^2 = large_log_variance[i]  (beta_i);
    - learned_range: log sigma^2 = f max_log + (1 - f) min_log, f = (v + 1) / 2, with
      min_log = posterior_log_variance_clipped[i] and max_log = large_log_variance[i] (log beta_i
      of the respaced betas): improved-diffusion's and diffusers' LEARNED_RANGE (Nichol & Dhariwal
      2021 eq. 15). Both columns equal theirs on every step that draws noise (i >= 1);
    - learned:       sigma^2 = v, the model outputs the variance itself: diffusers' DDPMScheduler
      ("learned" returns the predicted variance, and step takes its square root), which this
      engine follows since its configs are diffusers' (a negative v gives NaN there and here).
      improved-diffusion's LEARNED reads v as log sigma^2 instead: such a model is served by
      outputting exp(v).
    """
    nd = x_t.ndim
    variance = Variance(variance)
    model_output, v = model_output_parts(model_output, x_t, variance)
    x0, _ = predict_x0_and_eps(tab, x_t, model_output, i, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean = _gather(tab.posterior_mean_coef1, i, nd) * x0 + _gather(tab.posterior_mean_coef2, i, nd) * x_t
    small, large = _gather(tab.posterior_log_variance_clipped, i, nd), _gather(tab.large_log_variance, i, nd)
    if variance is Variance.LEARNED:
        std = torch.sqrt(v)
    elif variance is Variance.LEARNED_RANGE:
        frac = (v + 1) / 2
        std = torch.exp(0.5 * (frac * large + (1 - frac) * small))
    else:
        std = torch.exp(0.5 * (large if variance is Variance.FIXED_LARGE else small))
    nonzero = (i != 0).reshape(-1, *([1] * (nd - 1)))
    x_prev = mean + torch.where(nonzero, std * noise, 0.0)
    return x_prev, x0


def ddim_step(tab: DeviceTables, x_t, model_output, i, noise, *, eta=0.0, prediction=Prediction.EPSILON,
              clip_denoised=False, use_clipped_model_output=False):
    """One DDIM step (Song et al. 2021, eq. 12) from step index i: returns (x_prev, pred_x0).

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)   (eq. 16)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma * noise
    abar_prev is 1 on the last step. With clipping, the direction term keeps the eps implied by the
    model output (diffusers' default) unless ``use_clipped_model_output``: then eps is recomputed
    from the clipped x0, eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) (improved-diffusion's way).
    Both stay finite at abar = 0 (a zero terminal SNR): 1 - abar_prev - sigma^2 is computed as
    (1 - abar_prev) (1 - eta^2 (1 - abar / abar_prev) / (1 - abar)), exactly 0 there with eta = 1
    (the plain difference leaves float32 rounding, ~sqrt(6e-8) after the root).
    """
    nd = x_t.ndim
    x0, eps = predict_x0_and_eps(tab, x_t, model_output, i, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        if use_clipped_model_output:
            sa, s1ma = _gather(tab.sqrt_alphas_cumprod, i, nd), _gather(tab.sqrt_one_minus_alphas_cumprod, i, nd)
            eps = (x_t - sa * x0) / s1ma
    abar = _gather(tab.alphas_cumprod, i, nd)
    abar_prev = _gather(tab.ddim_alphas_cumprod_prev, i, nd)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    dir_xt = torch.sqrt(((1 - abar_prev) * (1 - eta**2 * (1 - abar / abar_prev) / (1 - abar))).clamp_min(0.0)) * eps
    x_prev = torch.sqrt(abar_prev) * x0 + dir_xt + sigma * noise
    return x_prev, x0


def _x0_of(tab, x_t, model_output, i, prediction, clip_denoised):
    x0, _ = predict_x0_and_eps(tab, x_t, model_output, i, prediction)
    return x0.clamp(-1.0, 1.0) if clip_denoised else x0


def _masked(coef, value):
    """coef * value, and exactly 0 where coef is 0: a stale or fresh state (even NaN) cannot leak in."""
    return torch.where(coef != 0, coef * value, 0.0)


def _multistep_update(tab, prefix, x_t, x0, x0_prev, i):
    """coef_x[i] x_t + coef_x0[i] x0 + coef_x0_prev[i] x0_prev, from the columns ``<prefix>_coef_*``."""
    nd = x_t.ndim
    c_x, c_x0, c_prev = (_gather(getattr(tab, f"{prefix}_{name}"), i, nd) for name in ("coef_x", "coef_x0", "coef_x0_prev"))
    return c_x * x_t + c_x0 * x0 + _masked(c_prev, x0_prev)


def dpmpp_2m_step(tab: DeviceTables, x_t, model_output, i, x0_prev, *, prediction=Prediction.EPSILON,
                  clip_denoised=False):
    """One DPM-Solver++(2M) step from step index i: returns (x_prev, x0). No noise: an ODE solver.

    x0 comes from the model output (clipped to [-1, 1] if asked: diffusers' thresholding with
    sample_max_value=1), then (schedules.Tables documents the coefficients)

        x_prev = coef_x[i] * x_t + coef_x0[i] * x0 + coef_x0_prev[i] * x0_prev

    where x0_prev is the x0 this sample's previous step returned; the caller keeps it (engine:
    ``Rows.x0_prev``) and replaces it by the returned x0. On first-order steps (the first step,
    i = steps - 1, and the last, i = 0) coef_x0_prev is 0 and x0_prev is not used at all, so a
    fresh (zeros) or stale buffer cannot leak in, not even a NaN.
    """
    x0 = _x0_of(tab, x_t, model_output, i, prediction, clip_denoised)
    return _multistep_update(tab, "dpmpp", x_t, x0, x0_prev, i), x0


def dpmpp_2m_sde_step(tab: DeviceTables, x_t, model_output, i, x0_prev, noise, *, prediction=Prediction.EPSILON,
                      clip_denoised=False):
    """One SDE-DPM-Solver++(2M) step (diffusers' "sde-dpmsolver++", midpoint): returns (x_prev, x0).

        x_prev = sde_coef_x[i] * x_t + sde_coef_x0[i] * x0 + sde_coef_x0_prev[i] * x0_prev
                 + sde_noise_std[i] * noise

    The same multistep state and first-order steps as ``dpmpp_2m_step``; the noise is standard
    normal (engine: the sample's Philox stream at step counter noise.SDE_STEP + i), and its std is
    0 on the last step, which lands on x0.
    """
    x0 = _x0_of(tab, x_t, model_output, i, prediction, clip_denoised)
    std = _gather(tab.sde_noise_std, i, x_t.ndim)
    return _multistep_update(tab, "sde", x_t, x0, x0_prev, i) + std * noise, x0


def unipc_step(tab: DeviceTables, x_t, model_output, i, x0_prev, corrector, *, prediction=Prediction.EPSILON,
               clip_denoised=False):
    """One UniPC step (bh2, order 2, predict_x0): returns (x_prev, x0, corrector for the next step).

    1. x0 from the model output at the predicted x_t (clipped if asked);
    2. UniC corrects x_t, except on the first step (unipc_corr_x0 = 0 there):
       x_c = corrector + unipc_corr_x0[i] * x0, where ``corrector`` is what the previous step
       stored (its corrected sample, x0 and previous x0 terms; schedules.Tables);
    3. UniP predicts from x_c: the DPM-Solver++(2M) update,
       x_prev = dpmpp_coef_x[i] x_c + dpmpp_coef_x0[i] x0 + dpmpp_coef_x0_prev[i] x0_prev;
    4. the next step's corrector, known part:
       unipc_next_x[i] x_c + unipc_next_x0[i] x0 + unipc_next_x0_prev[i] x0_prev (0 after the last step).

    The caller keeps x0 (``Rows.x0_prev``) and the returned corrector (``Rows.corrector``) per sample;
    neither state is read where its coefficient is 0, so fresh or stale buffers cannot leak in.
    """
    nd = x_t.ndim
    x0 = _x0_of(tab, x_t, model_output, i, prediction, clip_denoised)
    k = _gather(tab.unipc_corr_x0, i, nd)
    x_c = torch.where(k != 0, corrector + k * x0, x_t)
    x_prev = _multistep_update(tab, "dpmpp", x_c, x0, x0_prev, i)
    n_x, n_x0, n_prev = (_gather(getattr(tab, f"unipc_next_{name}"), i, nd) for name in ("x", "x0", "x0_prev"))
    return x_prev, x0, n_x * x_c + n_x0 * x0 + _masked(n_prev, x0_prev)


def _linear_update(tab, i, x_t, terms):
    """sum of column[i] * value over ``terms`` (column name, value, whether the value is a state:
    then masked, never read where its coefficient is 0)."""
    nd, total = x_t.ndim, 0.0
    for column, value, state in terms:
        c = _gather(getattr(tab, column), i, nd)
        total = total + (_masked(c, value) if state else c * value)
    return total


def dpmpp_3m_step(tab: DeviceTables, x_t, model_output, i, x0_prev, x0_prev2, *, prediction=Prediction.EPSILON,
                  clip_denoised=False):
    """One DPM-Solver++(3M) step from step index i: returns (x_prev, x0). No noise: an ODE solver.

        x_prev = dpmpp_coef_x[i] x_t + dpmpp3_coef_x0[i] x0 + dpmpp3_coef_x0_prev[i] x0_prev
                 + dpmpp3_coef_x0_prev2[i] x0_prev2

    (Lu et al. 2022, the third-order multistep update; schedules.Tables derives the columns, and
    which steps are first or second order). x0_prev and x0_prev2 are the x0s of this sample's two
    previous steps (``Rows.x0_prev``, ``Rows.x0_prev2``): the caller shifts them (x0_prev2 <-
    x0_prev <- x0). Neither is read where its coefficient is 0 (the first steps), so fresh or
    stale buffers cannot leak in.
    """
    x0 = _x0_of(tab, x_t, model_output, i, prediction, clip_denoised)
    x_prev = _linear_update(tab, i, x_t, [("dpmpp_coef_x", x_t, False), ("dpmpp3_coef_x0", x0, False),
                                          ("dpmpp3_coef_x0_prev", x0_prev, True),
                                          ("dpmpp3_coef_x0_prev2", x0_prev2, True)])
    return x_prev, x0


def unipc_3_step(tab: DeviceTables, x_t, model_output, i, x0_prev, x0_prev2, corrector, *,
                 prediction=Prediction.EPSILON, clip_denoised=False):
    """One UniPC step at solver_order 3 (bh2, predict_x0): returns (x_prev, x0, the next corrector).

    As ``unipc_step`` with one more previous x0 (schedules.Tables derives the columns):
    1. x0 from the model output at the predicted x_t (clipped if asked);
    2. UniC: x_c = corrector + unipc3_corr_x0[i] x0 (x_c = x_t on the first step);
    3. UniP-p: x_prev = dpmpp_coef_x[i] x_c + unipc3_coef_x0[i] x0 + unipc3_coef_x0_prev[i] x0_prev
       + unipc3_coef_x0_prev2[i] x0_prev2;
    4. the next corrector's known part: unipc_next_x[i] x_c + unipc3_next_x0[i] x0
       + unipc3_next_x0_prev[i] x0_prev + unipc3_next_x0_prev2[i] x0_prev2.

    The caller keeps x0_prev, x0_prev2 (shifted: x0_prev2 <- x0_prev <- x0) and the corrector
    (``Rows``); no state is read where its coefficient is 0.
    """
    nd = x_t.ndim
    x0 = _x0_of(tab, x_t, model_output, i, prediction, clip_denoised)
    k = _gather(tab.unipc3_corr_x0, i, nd)
    x_c = torch.where(k != 0, corrector + k * x0, x_t)
    x_prev = _linear_update(tab, i, x_c, [("dpmpp_coef_x", x_c, False), ("unipc3_coef_x0", x0, False),
                                          ("unipc3_coef_x0_prev", x0_prev, True),
                                          ("unipc3_coef_x0_prev2", x0_prev2, True)])
    nxt = _linear_update(tab, i, x_c, [("unipc_next_x", x_c, False), ("unipc3_next_x0", x0, False),
                                       ("unipc3_next_x0_prev", x0_prev, True),
                                       ("unipc3_next_x0_prev2", x0_prev2, True)])
    return x_prev, x0, nxt


def ipndm_step(tab: DeviceTables, x_t, model_output, i, eps_prev, eps_prev2, eps_prev3, *,
               prediction=Prediction.EPSILON, clip_denoised=False):
    """One iPNDM step (Zhang & Chen 2023, improved PNDM, up to order 4) from step index i:
    returns (x_prev, x0, eps). No noise: an ODE solver.

    1. eps from the model output (with clipping: x0 clipped, then eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar));
    2. x_prev = ipndm_coef_x[i] x_t + ipndm_coef_eps[i] eps + ipndm_coef_eps_prev[i] eps_prev
       + ipndm_coef_eps_prev2[i] eps_prev2 + ipndm_coef_eps_prev3[i] eps_prev3,

    the Adams-Bashforth step x~_{i-1} = x~_i + (sigma_{i-1} - sigma_i) sum_j w_j eps_{i+j} in the
    EDM variables x~ = x / sqrt(abar), sigma = sqrt((1 - abar) / abar), written back in x
    (schedules.Tables). The eps of the three previous steps are the caller's (``Rows.eps_prev``,
    ``eps_prev2``, ``eps_prev3``, shifted by one per step); none is read where its weight is 0 (the
    first three steps run at orders 1, 2, 3).
    """
    nd = x_t.ndim
    x0, eps = predict_x0_and_eps(tab, x_t, model_output, i, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - _gather(tab.sqrt_alphas_cumprod, i, nd) * x0) / _gather(tab.sqrt_one_minus_alphas_cumprod, i, nd)
    x_prev = _linear_update(tab, i, x_t, [("ipndm_coef_x", x_t, False), ("ipndm_coef_eps", eps, False),
                                          ("ipndm_coef_eps_prev", eps_prev, True),
                                          ("ipndm_coef_eps_prev2", eps_prev2, True),
                                          ("ipndm_coef_eps_prev3", eps_prev3, True)])
    return x_prev, x0, eps


# ---- the registry: one entry per sampler ----------------------------------------------------------
@dataclass(frozen=True)
class StepSpec:
    """Everything that fixes the step math of one sampling run."""

    sampler: str  # a name in SAMPLERS
    prediction: Prediction
    variance: Variance
    clip_denoised: bool
    eta: float  # DDIM only
    use_clipped_model_output: bool = False  # DDIM with clipping: eps from the clipped x0 (diffusers' name)

    def __post_init__(self):
        object.__setattr__(self, "_definition", sampler_def(self.sampler))  # an unknown name raises here
        object.__setattr__(self, "variance", Variance.parse(self.variance))

    @property
    def definition(self) -> "SamplerDef":
        """The sampler's registry entry."""
        return self._definition


# Each sampler's torch step: (spec, tab, x_t, model_output, i, noise, *state) -> (x_prev, x0, *new state),
# its reference step called with the spec's options. ``noise`` is None for a sampler that draws none;
# the state is the sampler's SamplerDef.state, in that order.
def _ddpm_torch(spec, tab, x_t, model_output, i, noise):
    return ddpm_step(tab, x_t, model_output, i, noise, prediction=spec.prediction, variance=spec.variance,
                     clip_denoised=spec.clip_denoised)


def _ddim_torch(spec, tab, x_t, model_output, i, noise):
    return ddim_step(tab, x_t, model_output, i, noise, eta=spec.eta, prediction=spec.prediction,
                     clip_denoised=spec.clip_denoised, use_clipped_model_output=spec.use_clipped_model_output)


def _dpmpp_2m_torch(spec, tab, x_t, model_output, i, noise, x0_prev):
    x_prev, x0 = dpmpp_2m_step(tab, x_t, model_output, i, x0_prev, prediction=spec.prediction,
                               clip_denoised=spec.clip_denoised)
    return x_prev, x0, x0


def _dpmpp_2m_sde_torch(spec, tab, x_t, model_output, i, noise, x0_prev):
    x_prev, x0 = dpmpp_2m_sde_step(tab, x_t, model_output, i, x0_prev, noise, prediction=spec.prediction,
                                   clip_denoised=spec.clip_denoised)
    return x_prev, x0, x0


def _unipc_torch(spec, tab, x_t, model_output, i, noise, x0_prev, corrector):
    x_prev, x0, corrector = unipc_step(tab, x_t, model_output, i, x0_prev, corrector, prediction=spec.prediction,
                                       clip_denoised=spec.clip_denoised)
    return x_prev, x0, x0, corrector


def _dpmpp_3m_torch(spec, tab, x_t, model_output, i, noise, x0_prev, x0_prev2):
    x_prev, x0 = dpmpp_3m_step(tab, x_t, model_output, i, x0_prev, x0_prev2, prediction=spec.prediction,
                               clip_denoised=spec.clip_denoised)
    return x_prev, x0, x0, x0_prev.clone()  # a copy: the caller overwrites x0_prev before it writes x0_prev2


def _unipc_3_torch(spec, tab, x_t, model_output, i, noise, x0_prev, x0_prev2, corrector):
    x_prev, x0, corrector = unipc_3_step(tab, x_t, model_output, i, x0_prev, x0_prev2, corrector,
                                         prediction=spec.prediction, clip_denoised=spec.clip_denoised)
    return x_prev, x0, x0, x0_prev.clone(), corrector


def _ipndm_torch(spec, tab, x_t, model_output, i, noise, eps_prev, eps_prev2, eps_prev3):
    x_prev, x0, eps = ipndm_step(tab, x_t, model_output, i, eps_prev, eps_prev2, eps_prev3,
                                 prediction=spec.prediction, clip_denoised=spec.clip_denoised)
    return x_prev, x0, eps, eps_prev.clone(), eps_prev2.clone()


@dataclass(frozen=True)
class SamplerDef:
    """One sampler, everything the engine asks about it: the one place a sampler's rules live.

    Every loop runs a sampler through ``torch`` (stepping.TorchStep) or ``kernel``
    (kernels.TritonStep); neither, nor the plan, names a sampler.
    """

    name: str
    spacing: str  # its kept timesteps when neither request nor config names any (schedules.SPACINGS)
    steps: int | None  # steps when the caller gives none (at most what the spacing allows); None: T
    config_clip: bool  # whether the scheduler config's clip_sample applies when the caller does not say
    reference: Callable  # the reference step: the specification the torch and Triton steps are held to
    torch: Callable  # the torch step around ``reference`` (its signature above _ddpm_torch)
    kernel: str | None  # its fused Triton step, "module:function" in ddpm_engine.kernels; None: torch only
    state: tuple = ()  # per-sample state kept in stepping.Rows fields (zeros at the start of a run)
    noise: int | None = 0  # its Philox noise: at step counter ``noise + i`` (engine.noise); None: draws none
    eta: bool = False  # whether the request's eta applies (plan names show it)
    spacings: tuple = SPACINGS  # the spacings a request may name for it
    multistep: bool | None = None  # its grids are diffusers' multistep schedulers' (None: if ``spacing`` is "linspace")
    config_spacing: bool = False  # whether the scheduler config's timestep_spacing applies when the request names none

    def default_steps(self, num_train_timesteps: int, spacing: str | None = None) -> int:
        """Steps when the caller gives none: ``steps``, at most T (T - 1 on a multistep "leading" or
        "linspace" grid); T if None. ``spacing``: the run's (None: the sampler's own)."""
        T, spacing = num_train_timesteps, spacing or self.spacing
        if isinstance(spacing, ExplicitSpacing):
            return len(spacing)  # the timesteps it keeps
        if self.steps is None:
            return T
        short = spacing in ("leading", "linspace") and self.multistep_grid
        return min(self.steps, max(1, T - 1 if short else T))

    @property
    def multistep_grid(self) -> bool:
        """Whether its "leading" and "linspace" are laid out as diffusers' multistep schedulers lay them
        out (schedules.spaced_timesteps): ``multistep``, or if None whether its own spacing is "linspace"."""
        return multistep_grid(self.spacing, self.multistep)

    def choose_spacing(self, spacing, timestep_spacing: str | ExplicitSpacing | None, steps=None):
        """The run's spacing: the request's (None: the scheduler config's ``timestep_spacing`` where
        ``config_spacing`` and the config names one, else the sampler's own), refused with the names
        that work if the sampler does not take it. Every sampler takes explicit timesteps (an
        ``ExplicitSpacing``, or a list, tuple, range or array of them); the config's apply to a
        request of their number of ``steps`` (or none), another step count takes the sampler's own."""
        if spacing is None:
            if not self.config_spacing or timestep_spacing is None or (
                    isinstance(timestep_spacing, ExplicitSpacing) and steps not in (None, len(timestep_spacing))):
                return self.spacing
            return timestep_spacing
        if isinstance(spacing, (ExplicitSpacing, list, tuple, range, np.ndarray)):
            return ExplicitSpacing(spacing)
        if not isinstance(spacing, str) or spacing not in self.spacings:
            raise InvalidRequestError(f"the {self.name} sampler takes spacing {' / '.join(map(repr, self.spacings))} "
                                      f"(or None: its default), or the training timesteps to keep as a list, got {quote(spacing)}")
        return spacing

    def default_clip(self, clip_sample: bool) -> bool:
        """Whether x0 is clipped when the caller does not say, given the scheduler config's ``clip_sample``."""
        return bool(clip_sample) and self.config_clip

    def check_state(self, rows) -> None:
        """Rows (stepping.Rows) must carry this sampler's state (a host check of metadata only)."""
        for name in self.state:
            v = getattr(rows, name)
            if v is None or v.shape != rows.x.shape:
                raise InvalidRequestError(f"the {self.name} sampler keeps each sample's multistep state in "
                                          f"rows.{name}: allocate it (zeros, shaped as rows.x) before the first step")


_DEFINITIONS = (
    # DDPM: diffusers' DDPMScheduler; noise at counter i (its variance)
    SamplerDef("ddpm", spacing="leading", steps=None, config_clip=True, reference=ddpm_step, torch=_ddpm_torch,
               kernel="ddpm_step:step_rows", spacings=TIMESTEP_SPACINGS, config_spacing=True),
    # DDIM: diffusers' DDIMScheduler; noise at counter i (scaled by eta)
    SamplerDef("ddim", spacing="leading", steps=50, config_clip=True, reference=ddim_step, torch=_ddim_torch,
               kernel="ddim_step:step_rows", eta=True, config_spacing=True),
    # DPM-Solver++(2M), ODE and SDE, and UniPC: diffusers' defaults. Their schedulers have no
    # clip_sample option (they threshold instead), so the config's is not read; nor is its
    # timestep_spacing (DDPMScheduler's, "leading" in nearly every saved config): they keep linspace
    SamplerDef("dpmpp_2m", spacing="linspace", steps=20, config_clip=False, reference=dpmpp_2m_step,
               torch=_dpmpp_2m_torch, kernel="dpmpp_step:step_rows", state=("x0_prev",), noise=None, multistep=True),
    SamplerDef("dpmpp_2m_sde", spacing="linspace", steps=20, config_clip=False, reference=dpmpp_2m_sde_step,
               torch=_dpmpp_2m_sde_torch, kernel="dpmpp_step:step_rows_sde", state=("x0_prev",), noise=SDE_STEP,
               multistep=True),
    SamplerDef("unipc", spacing="linspace", steps=20, config_clip=False, reference=unipc_step, torch=_unipc_torch,
               kernel="unipc_step:step_rows", state=("x0_prev", "corrector"), noise=None, multistep=True),
    # DPM-Solver++(3M) and UniPC-3: the same schedulers at solver_order=3, their other defaults
    SamplerDef("dpmpp_3m", spacing="linspace", steps=20, config_clip=False, reference=dpmpp_3m_step,
               torch=_dpmpp_3m_torch, kernel="dpmpp_3m_step:step_rows", state=("x0_prev", "x0_prev2"), noise=None,
               multistep=True),
    SamplerDef("unipc_3", spacing="linspace", steps=20, config_clip=False, reference=unipc_3_step,
               torch=_unipc_3_torch, kernel="unipc_3_step:step_rows", state=("x0_prev", "x0_prev2", "corrector"),
               noise=None, multistep=True),
    # iPNDM (Zhang & Chen 2023), order up to 4, on the model's own alpha-bars; the last step to sigma 0.
    # "leading" (DDIM's grid): its fixed Adams-Bashforth weights assume even steps, and "linspace"'s first
    # step (from sigma ~ 158 at t = 999) is too long for them at <= 10 steps (docs/performance.md, quality)
    SamplerDef("ipndm", spacing="leading", steps=20, config_clip=False, reference=ipndm_step, torch=_ipndm_torch,
               kernel="ipndm_step:step_rows", state=("eps_prev", "eps_prev2", "eps_prev3"), noise=None,
               multistep=False),
)
SAMPLER_DEFS = {d.name: d for d in _DEFINITIONS}
SAMPLERS = tuple(SAMPLER_DEFS)  # the sampler names the engine accepts
ROW_STATE = {d.name: d.state for d in _DEFINITIONS if d.state}  # the samplers that keep per-sample state


def sampler_def(name) -> SamplerDef:
    """The registry entry of a sampler name; an unknown name raises InvalidRequestError listing the names."""
    try:
        return SAMPLER_DEFS[name]
    except (KeyError, TypeError):
        raise InvalidRequestError(f"unknown sampler {name!r}; choose one of {SAMPLERS}") from None


# The sampler a request gets when it names none (Planner.plan asks ``default_request``): DDPM without
# steps (its whole chain, T steps), and for a few steps (1..FEW_STEPS) the sampler and timestep spacing
# with the lowest Fréchet distance at 5 steps in the quality table of every sampler x spacing
# (docs/performance.md, "Five steps": 1000 images of the bundled digits model,
# bench/results/quality-2026-12-03-torch-fp32-spacings.json). More steps keep DDPM respaced.
FEW_STEPS = 10
FEW_STEP_SAMPLER = "unipc_3"
FEW_STEP_SPACING = "leading"


def default_request(steps) -> tuple[str, str | None]:
    """(sampler, spacing or None: the sampler's own) of a request that names no sampler:
    (FEW_STEP_SAMPLER, FEW_STEP_SPACING) for 1..FEW_STEPS steps, else ("ddpm", None)."""
    few = isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and 1 <= steps <= FEW_STEPS
    return (FEW_STEP_SAMPLER, FEW_STEP_SPACING) if few else ("ddpm", None)


def default_sampler(steps) -> str:
    """The sampler of a request that names none (``default_request``)."""
    return default_request(steps)[0]


def default_steps(sampler: str, num_train_timesteps: int) -> int:
    """Steps when the caller gives none: T for DDPM, 50 for DDIM, 20 for DPM-Solver++ and UniPC."""
    return sampler_def(sampler).default_steps(num_train_timesteps)


def timestep_spacing(sampler: str) -> str:
    """Which kept timesteps a sampler uses: "leading" (DDPM, DDIM) or "linspace" (DPM-Solver++, UniPC)."""
    return sampler_def(sampler).spacing


@dataclass
class StepOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class _Sampler:
    """Shared part of the user-facing samplers: tables on a device, the t -> index map, and the
    step through the sampler's registry entry. A sampler that keeps state (SamplerDef.state) keeps
    it itself, per sample, like diffusers: call ``set_timesteps`` to start each new run, then
    ``step`` once per timestep in order."""

    sampler = "ddpm"  # the name in SAMPLERS: its registry entry gives the defaults and the step

    def __init__(self, betas=None, *, num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                 beta_end=0.02, steps=None, prediction_type="epsilon", clip_sample=False, device="cpu"):
        train_betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, betas)
        self.train_betas = train_betas
        self.prediction = Prediction.parse(prediction_type)
        self.clip_sample = bool(clip_sample)
        self.device = torch.device(device)
        self.set_timesteps(steps or sampler_def(self.sampler).default_steps(len(train_betas)))

    def set_timesteps(self, steps: int, device=None):
        """Choose how many steps to sample with (respaces the tables); starts a new run."""
        if device is not None:
            self.device = torch.device(device)
        d = sampler_def(self.sampler)
        self.tables = Tables.build(self.train_betas, steps, d.spacing, multistep=d.multistep_grid)
        self.tab = self.tables.on(self.device)
        T = self.tables.num_train_timesteps
        index = torch.full((T,), -1, dtype=torch.int64)
        index[torch.from_numpy(self.tables.timesteps)] = torch.arange(self.tables.steps)
        self._index_of_t = index.to(self.device)
        self.timesteps = torch.from_numpy(self.tables.timesteps[::-1].copy()).to(self.device)
        self._state = None

    def index_of(self, timestep) -> torch.Tensor:
        """Step indices [B] of training timesteps, each one of ``self.timesteps``. This is the
        user-facing single-step API, so it checks its input on the host (the engine's own loop
        never calls it): an unknown timestep raises instead of indexing a wrong table row."""
        t = torch.as_tensor(timestep, device=self.device).long().reshape(-1)
        T = len(self._index_of_t)
        if ((t < 0) | (t >= T)).any() or (self._index_of_t[t.clamp(0, T - 1)] < 0).any():
            raise InvalidRequestError(f"timestep {timestep!r} is not one of this sampler's timesteps "
                                      f"(set_timesteps kept {self.tables.steps} of {T}); use sampler.timesteps")
        return self._index_of_t[t]

    def _spec(self, **options) -> StepSpec:
        """The step math of this sampler's settings (``options``: StepSpec fields that override them)."""
        return StepSpec(**{**dict(sampler=self.sampler, prediction=self.prediction, variance=Variance.FIXED_SMALL,
                                  clip_denoised=self.clip_sample, eta=0.0), **options})

    def _step(self, spec: StepSpec, model_output, timestep, sample, noise) -> StepOutput:
        d = spec.definition
        i = self.index_of(timestep)
        if torch.as_tensor(timestep).numel() == 1:
            i = i.expand(sample.shape[0])
        if d.noise is not None and noise is None:
            noise = torch.zeros_like(sample)
        x_prev, x0, *state = d.torch(spec, self.tab, sample, model_output, i, noise, *self._state_for(d, sample))
        self._state = state
        return StepOutput(x_prev, x0)

    def _state_for(self, d: SamplerDef, sample) -> list:
        if self._state is None:
            return [torch.zeros_like(sample) for _ in d.state]
        if self._state and self._state[0].shape != sample.shape:
            raise InvalidRequestError(f"sample has shape {tuple(sample.shape)} but this run started with "
                                      f"{tuple(self._state[0].shape)}; call set_timesteps to start a new run")
        return self._state


class DDPMSampler(_Sampler):
    """DDPM ancestral sampling, diffusers-style (``DDPMScheduler``-like names)."""

    sampler = "ddpm"

    def __init__(self, betas=None, *, variance_type="fixed_small", **kw):
        self.variance = Variance.parse(variance_type)
        super().__init__(betas, **kw)

    def step(self, model_output, timestep, sample, noise=None) -> StepOutput:
        return self._step(self._spec(variance=self.variance), model_output, timestep, sample, noise)


class DDIMSampler(_Sampler):
    """DDIM sampling with eta in [0, 1] (eta = 0: deterministic; eta = 1: DDPM-like variance).
    ``use_clipped_model_output`` as diffusers' ``DDIMScheduler.step`` (a constructor default that
    ``step(..., use_clipped_model_output=...)`` overrides)."""

    sampler = "ddim"

    def __init__(self, betas=None, *, eta=0.0, use_clipped_model_output=False, **kw):
        self.eta = check_eta(eta)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        super().__init__(betas, **kw)

    def step(self, model_output, timestep, sample, noise=None, *, use_clipped_model_output=None) -> StepOutput:
        if use_clipped_model_output is None:
            use_clipped_model_output = self.use_clipped_model_output
        spec = self._spec(eta=self.eta, use_clipped_model_output=bool(use_clipped_model_output))
        return self._step(spec, model_output, timestep, sample, noise)


class DPMSolverSampler(_Sampler):
    """DPM-Solver++(2M), diffusers' ``DPMSolverMultistepScheduler`` with its defaults (20 steps,
    "linspace" timesteps, final sigma 0, midpoint). ``algorithm_type="sde-dpmsolver++"`` is its
    stochastic form: ``step(..., noise=z)`` takes standard normal noise as ``DDPMSampler.step`` does
    (diffusers' ``variance_noise``; None: zeros). ``solver_order=3`` is DPM-Solver++(3M) (the ODE
    form only). ``clip_sample=True`` clips x0 to [-1, 1] (diffusers: thresholding=True,
    sample_max_value=1.0)."""

    ALGORITHMS = {("dpmsolver++", 2): "dpmpp_2m", ("sde-dpmsolver++", 2): "dpmpp_2m_sde", ("dpmsolver++", 3): "dpmpp_3m"}

    def __init__(self, betas=None, *, algorithm_type="dpmsolver++", solver_order=2, **kw):
        if (algorithm_type, solver_order) not in self.ALGORITHMS:
            raise InvalidRequestError(f"unknown (algorithm_type, solver_order) {(algorithm_type, solver_order)!r}; "
                                      f"choose one of {tuple(self.ALGORITHMS)}")
        self.sampler = self.ALGORITHMS[algorithm_type, solver_order]
        super().__init__(betas, **kw)

    def step(self, model_output, timestep, sample, noise=None) -> StepOutput:
        spec = self._spec()
        if noise is not None and spec.definition.noise is None:
            raise InvalidRequestError("noise is only used by the stochastic solver: "
                                      "DPMSolverSampler(..., algorithm_type='sde-dpmsolver++')")
        return self._step(spec, model_output, timestep, sample, noise)


class UniPCSampler(_Sampler):
    """UniPC, diffusers' ``UniPCMultistepScheduler`` with its defaults (solver_order 2, bh2,
    predict_x0, lower_order_final, 20 "linspace" steps, final sigma 0); ``solver_order=3`` is its
    third-order form. ``clip_sample=True`` clips x0 to [-1, 1] (diffusers: thresholding=True,
    sample_max_value=1.0)."""

    sampler = "unipc"  # solver_order=2; an instance's own is set from its solver_order
    ORDERS = {2: "unipc", 3: "unipc_3"}

    def __init__(self, betas=None, *, solver_order=2, **kw):
        if solver_order not in self.ORDERS:
            raise InvalidRequestError(f"solver_order must be one of {tuple(self.ORDERS)}, got {solver_order!r}")
        self.sampler = self.ORDERS[solver_order]
        super().__init__(betas, **kw)

    def step(self, model_output, timestep, sample) -> StepOutput:
        return self._step(self._spec(), model_output, timestep, sample, None)


def check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
        raise InvalidRequestError(f"eta must be a number in [0, 1], got {eta!r}")
    return float(eta)
