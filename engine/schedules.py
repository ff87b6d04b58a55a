"""Beta schedules and the coefficient tables of DDPM / DDIM / DPM-Solver++(2M) (ODE and SDE) and (3M) /
UniPC (orders 2 and 3) / iPNDM, computed once in float64.

This module is the one place where the diffusion math's constants live. Named schedules are
frozen: new ones may be added, existing ones never change (improved-diffusion's policy).

Notation (Ho et al. 2020): alpha_t = 1 - beta_t, alphas_cumprod[t] = prod_{s<=t} alpha_s
(written alpha-bar). Training timesteps t run 0..T-1. A sampling run keeps ``steps`` of them
(``timesteps``, ascending); tables are indexed by the *step index* i = 0..steps-1 into that
list, never by t, so respacing only changes the tables and not the step math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from .errors import InvalidRequestError

BETA_SCHEDULES = ("linear", "cosine", "scaled_linear", "squaredcos_cap_v2")


class Prediction(str, Enum):
    """What the network outputs."""
    EPSILON = "epsilon"  # the noise (DDPM default)
    SAMPLE = "sample"    # x0 itself
    V = "v_prediction"   # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)

    @classmethod
    def parse(cls, value) -> "Prediction":
        aliases = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
        try:
            return cls(aliases.get(value, value))
        except ValueError:
            raise InvalidRequestError(f"unknown prediction type {value!r}; use 'epsilon', 'sample' or 'v_prediction'") from None


class Variance(str, Enum):
    """DDPM's reverse variance: fixed (DDPM paper sec. 3.2) or learned by the model (Nichol &
    Dhariwal 2021: the model outputs 2C channels, [its prediction, the variance part])."""
    FIXED_SMALL = "fixed_small"  # sigma^2 = posterior variance beta~_t (DDPM eq. 7; diffusers' default)
    FIXED_LARGE = "fixed_large"  # sigma^2 = beta_t (DDPM sec. 3.2's other choice)
    LEARNED = "learned"  # the second C channels are sigma^2 itself (diffusers' meaning; samplers.ddpm_step)
    LEARNED_RANGE = "learned_range"  # they are v in [-1, 1]: log sigma^2 = v' max + (1 - v') min, v' = (v + 1) / 2

    @property
    def learned(self) -> bool:
        """Whether the model outputs the variance: 2C output channels for C sample channels."""
        return self in (Variance.LEARNED, Variance.LEARNED_RANGE)

    @classmethod
    def parse(cls, value) -> "Variance":
        aliases = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}
        try:
            return cls(aliases.get(value, value))
        except ValueError:
            raise InvalidRequestError(f"unknown variance type {value!r}; use one of "
                                      f"{[v.value for v in cls]}") from None


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM paper's schedule: betas evenly spaced from beta_start to beta_end (float64)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """diffusers' ``scaled_linear``: linear in sqrt(beta)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021) eq. 17: alpha-bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2),
    beta_t = 1 - alpha-bar(t+1)/alpha-bar(t), clipped at ``max_beta`` to avoid a singularity at t = T."""
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.asarray(betas, dtype=np.float64)


def make_betas(beta_schedule: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas=None) -> np.ndarray:
    """Betas (float64, shape [T]) for a named schedule, or the user's own ``trained_betas``."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not np.all((betas > 0) & (betas < 1)):
            raise InvalidRequestError("trained_betas must be a non-empty 1-D sequence of values in (0, 1)")
        return betas
    if beta_schedule == "linear":
        return linear_betas(num_timesteps, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(num_timesteps, beta_start, beta_end)
    if beta_schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise InvalidRequestError(f"unknown beta schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES} "
                              "or pass trained_betas")


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")  # diffusers' timestep_spacing values
SPACINGS = TIMESTEP_SPACINGS + ("karras", "logsnr")  # every spacing= a request may name
ZERO_SNR_ALPHA_BAR = 2.0**-24  # diffusers' multistep schedulers' stand-in for a zero terminal SNR's alpha-bar 0


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha-bar: abar[t] = prod_{s<=t} (1 - beta_s), float64 [T] (DDPM eq. 4's cumulative product)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1),
    diffusers' ``rescale_betas_zero_snr``: sqrt(abar) shifted so its last entry is 0 and scaled so
    its first is unchanged; betas rebuilt from that, so the last beta is 1 and the last alpha-bar 0."""
    sqrt_abar = np.sqrt(alphas_cumprod(betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    abar = ((sqrt_abar - last) * first / (first - last)) ** 2
    return 1.0 - np.append(abar[0], abar[1:] / abar[:-1])


@dataclass(frozen=True, repr=False)
class ExplicitSpacing:
    """A spacing given as the kept training timesteps themselves (improved-diffusion's
    ``SpacedDiffusion(use_timesteps)``, which their ``timestep_respacing`` "N", "N1,N2,..." and
    "ddimN" make: ``openai_format.respaced_timesteps``), where every named spacing computes them.

    Built from any collection of distinct integers >= 0, in any order (theirs is a set; diffusers'
    custom timesteps descend); held ascending. Runs with it keep exactly those timesteps (steps =
    their number; each must be below T, checked where the tables are built). The tables are those
    of any spacing, functions of the kept alpha-bars: DDPM's betas rebuilt as 1 - abar_i / abar_{i-1}
    (their respaced betas), the model sees ``timesteps[i]`` (their ``timestep_map``), and DDIM steps
    to the next kept alpha-bar, then to 1 (their respaced ``alphas_cumprod_prev``). Hashable and
    equal by its timesteps, so plans and caches key on it as on a named spacing."""

    timesteps: tuple

    def __post_init__(self):
        given = self.timesteps.timesteps if isinstance(self.timesteps, ExplicitSpacing) else self.timesteps
        try:
            values = [] if isinstance(given, str) else list(given)
        except TypeError:
            values = []
        whole = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                    or isinstance(v, (float, np.floating)) and float(v).is_integer() for v in values)
        if not values or not whole or min(values) < 0 or len(set(values)) != len(values):
            raise InvalidRequestError(f"explicit timesteps must be a non-empty collection of distinct integers >= 0 "
                                      f"(the training timesteps to keep), got {_short(given)}")
        object.__setattr__(self, "timesteps", tuple(sorted(int(t) for t in values)))

    def __len__(self) -> int:
        return len(self.timesteps)

    def __str__(self) -> str:
        return f"explicit[{_short(self.timesteps)}]"

    __repr__ = __str__

    def kept(self, num_timesteps: int, steps: int | None = None) -> np.ndarray:
        """The timesteps (int64, ascending) of a run of ``steps`` (None: all of them) among T = ``num_timesteps``."""
        if steps is not None and steps != len(self):
            raise InvalidRequestError(f"the explicit spacing keeps {len(self)} timesteps, and the request asks for "
                                      f"steps={steps}: leave steps out, or name another spacing")
        if self.timesteps[-1] >= num_timesteps:
            raise InvalidRequestError(f"the explicit spacing keeps t = {self.timesteps[-1]}, past the model's last "
                                      f"training timestep T - 1 = {num_timesteps - 1}")
        return np.asarray(self.timesteps, dtype=np.int64)


def _short(values) -> str:
    """A few of ``values`` for messages: the first three and last two of a long list."""
    try:
        values = list(values)
    except TypeError:
        return repr(values)
    shown = values if len(values) <= 6 else values[:3] + ["..."] + values[-2:]
    return ", ".join(str(v) for v in shown)


def multistep_grid(spacing: str, multistep: bool | None) -> bool:
    """Whether ``spacing`` is laid out as diffusers' multistep schedulers lay it out (see
    spaced_timesteps). None: "linspace" is, every other spacing is not (the rule from before spacing
    was a choice, kept for callers that name only a spacing)."""
    return spacing == "linspace" if multistep is None else bool(multistep)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading", *, multistep: bool | None = None,
                     steps_offset: int = 0) -> np.ndarray:
    """The kept training timesteps, ascending, exactly ``steps`` of them: diffusers' ``timestep_spacing``
    (Lin et al. 2024, Table 2). The last step always goes from ``timesteps[0]`` to the data (alpha-bar 1).

    - "leading": ``arange(steps) * (T // steps) + steps_offset``, the even spacing of the DDIM paper
      and diffusers' DDPM/DDIM schedulers; t = 0 is kept (without an offset), and ``steps == T`` keeps
      every timestep.
    - "linspace": ``linspace(0, T - 1, steps)`` rounded half to even.
    - "trailing": ``round(T - k T / steps) - 1`` for k < steps: t = T - 1 is kept (diffusers' own
      ``arange(T, 0, -T / steps)``, whose float steps decide the rounding ties, cut to ``steps``: it
      gives one timestep too many, -1, for some step counts such as 61 of 1000).

    ``multistep`` (diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler, where the last
    step goes to sigma = 0 instead of to a kept t): "leading" and "linspace" lay out ``steps + 1``
    points and drop the lowest, so "linspace" is ``linspace(0, T - 1, steps + 1)[1:]`` (diffusers writes
    it descending: ``.round()[::-1][:-1]``) and "leading" ``arange(1, steps + 1) * (T // (steps + 1))
    + steps_offset``; both take at most T - 1 steps. None: see ``multistep_grid``.

    An ``ExplicitSpacing`` keeps its own timesteps (``steps`` must be their number), multistep or not.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise InvalidRequestError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    if isinstance(spacing, ExplicitSpacing):  # the timesteps themselves, on any grid
        return spacing.kept(num_timesteps, steps)
    T, multistep = num_timesteps, multistep_grid(spacing, multistep)
    if spacing == "trailing":
        return (np.round(np.arange(T, 0, -T / steps)[:steps]) - 1).astype(np.int64)[::-1].copy()
    if spacing not in ("leading", "linspace"):
        raise InvalidRequestError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    if multistep and steps > T - 1:
        raise InvalidRequestError(f"the {spacing} timestep spacing of the multistep samplers (DPM-Solver++, UniPC) "
                                  f"takes at most T - 1 = {T - 1} steps, got {steps}; use fewer steps")
    n = steps + 1 if multistep else steps
    if spacing == "linspace":
        grid = np.linspace(0, T - 1, n).round().astype(np.int64)
    else:
        grid = np.arange(n, dtype=np.int64) * (T // n) + int(steps_offset)
        if grid[-1] > T - 1:
            raise InvalidRequestError(f"steps_offset={steps_offset} puts the last of {steps} leading timesteps at "
                                      f"t = {grid[-1]}, past T - 1 = {T - 1}; use fewer steps or another spacing")
    return grid[1:] if multistep else grid


def _sigma_grid(train_abar: np.ndarray, steps: int, spacing: str) -> np.ndarray:
    """The kept noise levels sigma = sqrt((1 - abar) / abar), descending, from the last training
    timestep's to the first's: Karras et al. 2022 eq. 5 (rho = 7), or uniform in log sigma (= uniform
    in log-SNR; Lu et al. 2022, diffusers' ``use_lu_lambdas``)."""
    sigmas = np.sqrt((1.0 - train_abar) / train_abar)
    ramp = np.linspace(0.0, 1.0, steps)
    if spacing == "karras":
        rho = 7.0
        lo, hi = sigmas[0] ** (1 / rho), sigmas[-1] ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho
    lo, hi = np.log(sigmas[0]), np.log(sigmas[-1])
    return np.exp(hi + ramp * (lo - hi))


def kept_schedule(train_abar: np.ndarray, steps: int, spacing: str = "leading", *, multistep: bool | None = None,
                  steps_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, alpha-bars) of one sampling run, ascending, float64 alpha-bars: the one place a
    spacing becomes what the model sees (int64 training timesteps) and what the step math uses.

    - "leading", "linspace", "trailing", an ``ExplicitSpacing``: ``spaced_timesteps``; the alpha-bars are
      the training ones there.
    - "karras", "logsnr": ``steps`` noise levels (``_sigma_grid``) between the last and first training
      timesteps' sigma; the step math uses these exact levels, alpha-bar = 1 / (1 + sigma^2), and the
      model sees each one's training timestep by interpolating log sigma, rounded (diffusers'
      ``_sigma_to_t`` then ``round``).

    A zero terminal SNR (``rescale_zero_terminal_snr``: alpha-bar 0 at t = T - 1) has no sigma; the
    multistep grid and the sigma grids take alpha-bar 2^-24 there, as diffusers' multistep
    schedulers do. DDPM and DDIM keep the 0 (their steps are finite there with a v or x0 prediction).
    """
    train_abar = np.asarray(train_abar, dtype=np.float64)
    T = len(train_abar)
    if spacing in ("karras", "logsnr") or multistep_grid(spacing, multistep):
        train_abar = np.maximum(train_abar, ZERO_SNR_ALPHA_BAR)
    if spacing not in ("karras", "logsnr"):
        timesteps = spaced_timesteps(T, steps, spacing, multistep=multistep, steps_offset=steps_offset)
        return timesteps, train_abar[timesteps]
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise InvalidRequestError(f"steps must be an integer in [1, {T}], got {steps!r}")
    sigmas = _sigma_grid(train_abar, int(steps), spacing)[::-1]
    log_sigmas = 0.5 * (np.log1p(-train_abar) - np.log(train_abar))
    timesteps = np.interp(np.log(sigmas), log_sigmas, np.arange(T)).round().astype(np.int64)
    return timesteps, 1.0 / (1.0 + sigmas**2)


def ddim_alphas_cumprod_prev(train_abar: np.ndarray, timesteps: np.ndarray, abar: np.ndarray, spacing: str,
                             final: float, multistep: bool | None = None) -> np.ndarray:
    """DDIM's alpha-bar to step to from each kept timestep (diffusers' ``DDIMScheduler.step``): for
    DDIM's own timestep grids the training alpha-bar at t - T // steps, and ``final`` below t = 0 (1,
    or alpha-bar at t = 0 without set_alpha_to_one). With "leading" that is the next kept timestep;
    with "linspace" and "trailing" diffusers still steps T // steps back, which can fall between the
    kept timesteps: matched, not repaired. On the sigma grids and the multistep grids (no diffusers
    DDIM there) and an ``ExplicitSpacing`` (improved-diffusion's respaced DDIM): the next kept
    alpha-bar, then ``final``."""
    if spacing in ("karras", "logsnr") or multistep_grid(spacing, multistep) or isinstance(spacing, ExplicitSpacing):
        return np.append(final, abar[:-1])
    prev = timesteps - len(train_abar) // len(timesteps)
    return np.where(prev >= 0, train_abar[np.maximum(prev, 0)], final)


@dataclass(frozen=True)
class Tables:
    """Per-step coefficient tables of one sampling run, float64, each of shape [steps].

    Index i is the step index: the model sees training timestep ``timesteps[i]``; stepping
    from index i produces the sample at index i-1 (x_0 after i = 0).

    DDPM (respaced as improved-diffusion's ``SpacedDiffusion``: betas are rebuilt from the
    kept alpha-bars, beta_i = 1 - abar_i / abar_{i-1}, so the same math serves any step count):

    - ``posterior_variance``  = beta_i (1 - abar_{i-1}) / (1 - abar_i)          (DDPM eq. 7)
    - ``posterior_log_variance_clipped``: log of the posterior variance with its i = 0 entry
      (which is 0) replaced by the i = 1 entry — improved-diffusion's rule. Only used where the
      noise is masked out anyway, it just keeps the log finite.
    - ``large_log_variance``  = log of [posterior_variance[1], beta_1, beta_2, ...]: the
      "fixed_large" choice sigma^2 = beta_t, again finite at i = 0.
    - A learned variance ("learned_range", Nichol & Dhariwal 2021 eq. 15) interpolates between
      these two columns, min_log = posterior_log_variance_clipped and max_log = large_log_variance,
      by the model's output: improved-diffusion's min_log is the same clipped column and its
      max_log is log(betas) of the respaced betas, diffusers' are log of the (unclipped) posterior
      variance and of beta_i: all equal ours on every step that draws noise (i >= 1); at i = 0 the
      noise is masked out, so no column of its own is needed.
    - ``posterior_mean_coef1`` = beta_i sqrt(abar_{i-1}) / (1 - abar_i),
      ``posterior_mean_coef2`` = (1 - abar_{i-1}) sqrt(alpha_i) / (1 - abar_i)  (DDPM eq. 7):
      mean = coef1 * x0 + coef2 * x_t.

    DDIM: ``ddim_alphas_cumprod_prev`` is abar at the next kept timestep (for "linspace" and
    "trailing": at t - T // steps, as diffusers steps; ``ddim_alphas_cumprod_prev``), and 1 for the
    last step (the DDIM paper's convention, diffusers' ``set_alpha_to_one=True``).

    DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095, with diffusers'
    ``DPMSolverMultistepScheduler`` defaults: dpmsolver++, solver_order=2, midpoint,
    lower_order_final, final_sigmas_type="zero"). In VP notation alpha_i = sqrt(abar_i),
    sigma_i = sqrt(1 - abar_i) and the half log-SNR ``dpmpp_lambda`` lambda_i = log(alpha_i / sigma_i).
    Stepping from index i goes to index i - 1, and from i = 0 to the final point alpha = 1,
    sigma = 0 (lambda = +inf). ``dpmpp_h`` is the step in lambda, h_i = lambda_{i-1} - lambda_i
    (+inf at i = 0). With the data-prediction model x0(x, lambda), the ODE's exact solution is
    (Prop. 4.1)  x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0 dlambda.
    Holding x0 constant over the step gives the first-order update (DPM-Solver++(1) = DDIM):

        x_{i-1} = (sigma_{i-1} / sigma_i) x_i + A_i x0_i,      A_i = alpha_{i-1} (1 - e^{-h_i});

    the multistep second-order update (Algorithm 2, DPM-Solver++(2M)) replaces x0_i by
    D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i+1}, where x0_{i+1} is the previous step's x0
    and r_i = h_{i+1} / h_i. So each step is  x_{i-1} = coef_x x_i + coef_x0 x0_i + coef_x0_prev x0_{i+1}:

    - ``dpmpp_coef_x``       = sigma_{i-1} / sigma_i  (0 at i = 0);
    - ``dpmpp_coef_x0``      = A_i (1 + 1 / (2 r_i))  (A_i on first-order steps);
    - ``dpmpp_coef_x0_prev`` = -A_i / (2 r_i)         (0 on first-order steps).

    First-order steps: the first (i = steps - 1: no previous x0) and the last (i = 0: sigma goes to
    0, so coef_x = 0, A = 1 and the result is x0_0 itself; diffusers' lower_order_final /
    final_sigmas_type="zero"). With solver_order 2 no other step is lowered. The order is thus a
    function of each sample's step index, read from the table: no state but the previous x0.

    SDE-DPM-Solver++(2M) (diffusers' ``algorithm_type="sde-dpmsolver++"``, midpoint; Lu et al. 2022
    sec. 5 / Gonzalez et al.): the same step in the same lambda grid, with the SDE's exact linear part
    and noise z drawn per step,

        x_{i-1} = (sigma_{i-1} / sigma_i) e^{-h_i} x_i + A2_i D_i + sigma_{i-1} sqrt(1 - e^{-2 h_i}) z,
        A2_i = alpha_{i-1} (1 - e^{-2 h_i}),

    D_i as above (same r_i, same first-order steps). Columns ``sde_coef_x``, ``sde_coef_x0``,
    ``sde_coef_x0_prev`` and ``sde_noise_std``; the last step (i = 0) again lands on x0, without noise.

    UniPC (Zhao et al. 2023, arXiv:2302.04867; diffusers' ``UniPCMultistepScheduler`` defaults:
    solver_order 2, bh2, predict_x0, lower_order_final, final sigma 0, the corrector after every
    predictor step but the last). Its predictor UniP-2 with B(h) = e^h - 1 (bh2) and rho = 1/2 is
    exactly the DPM-Solver++(2M) step above (same columns, same first-order steps). Its corrector
    UniC, applied at the start of step c (c <= steps - 2) once the model has been evaluated at the
    predicted x_c, recomputes x_c from the previous step's corrected sample x_{c+1}, its x0 m0,
    the x0 before that m1 and this step's x0 m_c (which is taken from the *uncorrected* x_c):

        x_c <- (sigma_c / sigma_{c+1}) x_{c+1} + A_{c+1} (m0 + sum_k rho_k D_k + rho_t (m_c - m0)),

    with D_1 = (m1 - m0) / r_k, r_k = (lambda_{c+2} - lambda_{c+1}) / h_{c+1}, and rho solving
    UniC's order-2 system [[1, 1], [r_k, 1]] rho = (b_1, b_2), b_k from phi-functions of -h_{c+1}
    (order 1 after a first-order predictor: no D term, rho_t = 1/2). Everything but the m_c term is
    known when step c+1 ends, so that step stores it (``Rows.corrector``) and the state stays two
    tensors (x0_prev and the corrector's known part):

    - ``unipc_corr_x0``       = A_{c+1} rho_t at index c: the coefficient of this step's x0 in the
      corrector (0 at the first step, which has no corrector);
    - ``unipc_next_x``, ``unipc_next_x0``, ``unipc_next_x0_prev`` at index j = c + 1: the coefficients
      of this step's corrected x_j, its x0 and its previous x0 in the next step's corrector (0 at
      j = 0: no next step).

    DPM-Solver++(3M) (diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` with its other
    defaults): the same lambda grid and first-order steps; the second step (i = steps - 2: one
    previous x0) is second order as above, and so is the second to last (i = 1) when steps < 15
    (diffusers' lower_order_final); every other step is third order (Lu et al. 2022, Algorithm 2's
    third-order multistep update, diffusers' form). With h = h_i, r0 = h_{i+1} / h, r1 = h_{i+2} / h,
    D1_0 = (x0_i - x0_{i+1}) / r0, D1_1 = (x0_{i+1} - x0_{i+2}) / r1:

        x_{i-1} = (sigma_{i-1} / sigma_i) x_i + A_i x0_i + c1 D1 + c2 D2,
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),   D2 = (D1_0 - D1_1) / (r0 + r1),
        c1 = alpha_{i-1} (1 + (e^{-h} - 1) / h),    c2 = -alpha_{i-1} ((e^{-h} - 1 + h) / h^2 - 1/2),

    which, collected per x0, gives ``dpmpp3_coef_x0``, ``dpmpp3_coef_x0_prev`` (x0_{i+1}) and
    ``dpmpp3_coef_x0_prev2`` (x0_{i+2}); the coefficient of x_i is ``dpmpp_coef_x``. A step below
    third order has 0 in the columns of the states it does not use.

    UniPC at order 3 (diffusers' ``UniPCMultistepScheduler(solver_order=3)``, bh2, predict_x0,
    lower_order_final): the order of step i is p_i = min(3, steps - i, i + 1) (one more per
    earlier x0, one less per remaining step). UniP-p from x_i with h = h_i and
    r_j = (lambda_{i+j} - lambda_i) / h:

        x_{i-1} = (sigma_{i-1} / sigma_i) x_i + A_i x0_i + A_i sum_{j<p} rho_j (x0_{i+j} - x0_i) / r_j,

    rho = 1/2 at order 2, else the solution of UniPC's system [r_j^(k-1)]_{k,j<p} rho = (b_1 .. b_{p-1}),
    b_k = k! phi_{k+1}(-h) / B(h) in diffusers' recursion (B(h) = e^{-h} - 1, bh2): columns
    ``unipc3_coef_x0``, ``unipc3_coef_x0_prev``, ``unipc3_coef_x0_prev2``. UniC at index c, of
    the order q = p_{c+1} of the predictor it corrects, with j = c + 1, h = h_j and
    r_l = (lambda_{j+l} - lambda_j) / h:

        x_c <- (sigma_c / sigma_j) x_j + A_j x0_j + A_j (sum_{l<q} rho_l (x0_{j+l} - x0_j) / r_l + rho_q (m_c - x0_j)),

    rho = 1/2 at q = 1, else the q x q system with the new point's r = 1. As at order 2, the m_c
    term is ``unipc3_corr_x0`` (at index c) and the rest is known when step j ends (the state
    ``Rows.corrector``): ``unipc_next_x`` (the same sigma ratio), ``unipc3_next_x0``,
    ``unipc3_next_x0_prev`` and ``unipc3_next_x0_prev2`` at index j.

    iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
    arXiv:2204.13902, sec. 5 / Alg. 2's improved PNDM): the probability-flow ODE in the
    EDM variables sigma_i = sqrt((1 - abar_i) / abar_i), x~ = x / sqrt(abar), where
    dx~/dsigma = eps. Steps of fixed Adams-Bashforth weights on the eps of this and the up to
    three previous steps, the order k = min(4, steps - i) rising from 1 on the first step:

        x~_{i-1} = x~_i + (sigma_{i-1} - sigma_i) * sum_j w_{k,j} eps_{i+j},
        w_1 = (1), w_2 = (3, -1) / 2, w_3 = (23, -16, 5) / 12, w_4 = (55, -59, 37, -9) / 24,

    with sigma_{-1} = 0 (the last step lands on the data) and abar_{-1} = 1. Back in x:
    ``ipndm_coef_x`` = sqrt(abar_{i-1} / abar_i), and ``ipndm_coef_eps``, ``ipndm_coef_eps_prev``,
    ``ipndm_coef_eps_prev2``, ``ipndm_coef_eps_prev3`` = sqrt(abar_{i-1}) (sigma_{i-1} - sigma_i) w_{k,j}
    (0 where the order does not reach).
    """

    num_train_timesteps: int
    timesteps: np.ndarray
    spacing: str | ExplicitSpacing  # the spacing that kept them (SPACINGS, or the timesteps themselves)
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    large_log_variance: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    ddim_alphas_cumprod_prev: np.ndarray
    dpmpp_lambda: np.ndarray
    dpmpp_h: np.ndarray
    dpmpp_coef_x: np.ndarray
    dpmpp_coef_x0: np.ndarray
    dpmpp_coef_x0_prev: np.ndarray
    sde_coef_x: np.ndarray
    sde_coef_x0: np.ndarray
    sde_coef_x0_prev: np.ndarray
    sde_noise_std: np.ndarray
    unipc_corr_x0: np.ndarray
    unipc_next_x: np.ndarray
    unipc_next_x0: np.ndarray
    unipc_next_x0_prev: np.ndarray
    dpmpp3_coef_x0: np.ndarray
    dpmpp3_coef_x0_prev: np.ndarray
    dpmpp3_coef_x0_prev2: np.ndarray
    unipc3_coef_x0: np.ndarray
    unipc3_coef_x0_prev: np.ndarray
    unipc3_coef_x0_prev2: np.ndarray
    unipc3_corr_x0: np.ndarray
    unipc3_next_x0: np.ndarray
    unipc3_next_x0_prev: np.ndarray
    unipc3_next_x0_prev2: np.ndarray
    ipndm_coef_x: np.ndarray
    ipndm_coef_eps: np.ndarray
    ipndm_coef_eps_prev: np.ndarray
    ipndm_coef_eps_prev2: np.ndarray
    ipndm_coef_eps_prev3: np.ndarray
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    @np.errstate(divide="ignore", invalid="ignore")  # a zero terminal SNR (alpha-bar 0): inf in the epsilon columns
    def build(cls, train_betas: np.ndarray, steps: int | None = None, spacing: str = "leading", *,
              multistep: bool | None = None, steps_offset: int = 0, set_alpha_to_one: bool = True) -> "Tables":
        """The tables of ``steps`` (None: T) reverse steps at the ``spacing`` (``kept_schedule``, with its
        ``multistep`` and ``steps_offset``); every column is a function of the kept alpha-bars, but DDIM's
        step-to alpha-bar (``ddim_alphas_cumprod_prev``, whose last entry ``set_alpha_to_one`` chooses)."""
        train_betas = np.asarray(train_betas, dtype=np.float64)
        T = len(train_betas)
        train_abar = alphas_cumprod(train_betas)
        timesteps, abar = kept_schedule(train_abar, T if steps is None else steps, spacing, multistep=multistep,
                                        steps_offset=steps_offset)
        ddim_prev = ddim_alphas_cumprod_prev(train_abar, timesteps, abar, spacing,
                                             1.0 if set_alpha_to_one else train_abar[0], multistep)
        abar_prev = np.append(1.0, abar[:-1])
        betas = 1.0 - abar / abar_prev
        alphas = 1.0 - betas
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        first_nonzero = post_var[1] if len(post_var) > 1 else betas[0]
        return cls(
            num_train_timesteps=T,
            timesteps=timesteps,
            spacing=spacing,
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.append(first_nonzero, post_var[1:])),
            large_log_variance=np.log(np.append(first_nonzero, betas[1:])),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            ddim_alphas_cumprod_prev=ddim_prev,
            **dpmpp_2m_coefficients(abar),
            **dpmpp_2m_sde_coefficients(abar),
            **unipc_coefficients(abar),
            **dpmpp_3m_coefficients(abar),
            **unipc_3_coefficients(abar),
            **ipndm_coefficients(abar),
        )

    def on(self, device, dtype=torch.float32) -> "DeviceTables":
        """The tables as device tensors, cast once and cached per (device, dtype)."""
        key = (str(torch.device(device)), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = DeviceTables.from_tables(self, torch.device(device), dtype)
        return self._device_cache[key]


def _lambda_and_h(abar: np.ndarray):
    """The half log-SNR lambda_i = log(alpha_i / sigma_i) and the steps h_i = lambda_{i-1} - lambda_i
    (+inf at i = 0: the final step goes to sigma = 0)."""
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    h = np.full(len(abar), np.inf)
    h[1:] = lam[:-1] - lam[1:]
    return lam, h


def _second_order(A: np.ndarray, h: np.ndarray):
    """(coef_x0, coef_x0_prev) of the multistep update A_i D_i, D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i+1},
    r_i = h_{i+1} / h_i: second order on every step but the first (i = n - 1) and the last (i = 0)."""
    n = len(A)
    coef_x0, coef_x0_prev = A.copy(), np.zeros(n)
    second = np.arange(1, n - 1)
    half_inv_r = 0.5 * h[second] / h[second + 1]
    coef_x0[second] = A[second] * (1.0 + half_inv_r)
    coef_x0_prev[second] = -A[second] * half_inv_r
    return coef_x0, coef_x0_prev


def _sigma_ratio(abar: np.ndarray) -> np.ndarray:
    """sigma_{i-1} / sigma_i (0 at i = 0, where sigma goes to 0)."""
    ratio = np.zeros(len(abar))
    ratio[1:] = np.sqrt((1.0 - abar[:-1]) / (1.0 - abar[1:]))
    return ratio


def _data_coefficient(abar: np.ndarray, h: np.ndarray, scale: float) -> np.ndarray:
    """alpha_{i-1} (1 - e^{-scale h_i}); 1 at i = 0 (alpha = 1 and h = inf there)."""
    A = np.ones(len(abar))
    A[1:] = np.sqrt(abar[:-1]) * -np.expm1(-scale * h[1:])
    return A


def dpmpp_2m_coefficients(abar: np.ndarray) -> dict:
    """DPM-Solver++(2M)'s per-step-index columns (see Tables), float64, from the kept alpha-bars."""
    lam, h = _lambda_and_h(abar)
    coef_x0, coef_x0_prev = _second_order(_data_coefficient(abar, h, 1.0), h)
    return dict(dpmpp_lambda=lam, dpmpp_h=h, dpmpp_coef_x=_sigma_ratio(abar), dpmpp_coef_x0=coef_x0,
                dpmpp_coef_x0_prev=coef_x0_prev)


def dpmpp_2m_sde_coefficients(abar: np.ndarray) -> dict:
    """SDE-DPM-Solver++(2M)'s columns (see Tables): e^{-h} on x, A2 with 2h, the noise's std."""
    _, h = _lambda_and_h(abar)
    coef_x0, coef_x0_prev = _second_order(_data_coefficient(abar, h, 2.0), h)
    std = np.zeros(len(abar))
    std[1:] = np.sqrt(1.0 - abar[:-1]) * np.sqrt(-np.expm1(-2.0 * h[1:]))
    return dict(sde_coef_x=_sigma_ratio(abar) * np.exp(-h), sde_coef_x0=coef_x0, sde_coef_x0_prev=coef_x0_prev,
                sde_noise_std=std)


def unipc_coefficients(abar: np.ndarray) -> dict:
    """UniPC's corrector columns (see Tables); its predictor uses the DPM-Solver++(2M) columns."""
    n = len(abar)
    _, h = _lambda_and_h(abar)
    A = _data_coefficient(abar, h, 1.0)
    corr_x0, next_x, next_x0, next_x0_prev = (np.zeros(n) for _ in range(4))
    c = np.arange(n - 1)  # steps with a corrector; it corrects the predictor of step j = c + 1
    j = c + 1
    hh = -h[j]  # UniC's phi-functions of -h (predict_x0)
    B = np.expm1(hh)  # bh2
    phi = B / hh - 1.0
    b1 = phi / B
    b2 = 2.0 * (phi / hh - 0.5) / B
    order2 = j < n - 1  # the predictor of step j was second order (not the first step)
    rk = np.full(len(c), -1.0)
    rk[order2] = -h[j[order2] + 1] / h[j[order2]]  # (lambda_{c+2} - lambda_{c+1}) / h_{c+1}
    rho_d = np.where(order2, (b1 - b2) / (1.0 - rk), 0.0)  # [[1, 1], [rk, 1]] rho = (b1, b2)
    rho_t = np.where(order2, b1 - rho_d, 0.5)
    corr_x0[c] = A[j] * rho_t
    next_x[j] = _sigma_ratio(abar)[j]
    next_x0[j] = A[j] * (1.0 - rho_d / rk - rho_t)
    next_x0_prev[j] = A[j] * rho_d / rk
    return dict(unipc_corr_x0=corr_x0, unipc_next_x=next_x, unipc_next_x0=next_x0, unipc_next_x0_prev=next_x0_prev)


def dpmpp_3m_coefficients(abar: np.ndarray) -> dict:
    """DPM-Solver++(3M)'s columns (see Tables): second-order steps as 2M, third order elsewhere."""
    n = len(abar)
    lam, h = _lambda_and_h(abar)
    A = _data_coefficient(abar, h, 1.0)
    coef_x0, coef_x0_prev = _second_order(A, h)
    coef_x0_prev2 = np.zeros(n)
    third = np.arange(1, n - 2)  # three x0s known (i <= steps - 3), not the last step
    if n < 15:  # diffusers' lower_order_final: the second to last step is second order too
        third = third[third != 1]
    hs, r0, r1 = h[third], h[third + 1] / h[third], h[third + 2] / h[third]
    alpha = np.sqrt(abar[third - 1])
    em1 = np.expm1(-hs)
    c1 = alpha * (1.0 + em1 / hs)
    c2 = -alpha * ((em1 + hs) / hs**2 - 0.5)
    a = c1 * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1)  # coefficient of D1_0
    b = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)  # coefficient of D1_1
    coef_x0[third] = A[third] + a / r0
    coef_x0_prev[third] = -a / r0 + b / r1
    coef_x0_prev2[third] = -b / r1
    return dict(dpmpp3_coef_x0=coef_x0, dpmpp3_coef_x0_prev=coef_x0_prev, dpmpp3_coef_x0_prev2=coef_x0_prev2)


def _unipc_rhs(h: float, order: int) -> np.ndarray:
    """UniPC's b_1 .. b_order for one step h (predict_x0, bh2), diffusers' recursion of the phi-functions."""
    hh = -h
    B = np.expm1(hh)
    h_phi_k, factorial, b = np.expm1(hh) / hh - 1.0, 1.0, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / B)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.asarray(b)


def _unipc_rho(rks: np.ndarray, h: float) -> np.ndarray:
    """rho of UniP (``rks``: the earlier points' r) or UniC (``rks`` ending in the new point's r = 1)."""
    if len(rks) == 1:
        return np.array([0.5])  # UniP-2 and UniC-1 (diffusers' simplified forms)
    R = np.stack([rks ** k for k in range(len(rks))])
    return np.linalg.solve(R, _unipc_rhs(h, len(rks)))


def unipc_3_coefficients(abar: np.ndarray) -> dict:
    """UniPC's columns at solver_order 3 (see Tables): predictor, corrector and the next corrector's known part."""
    n = len(abar)
    lam, h = _lambda_and_h(abar)
    A = _data_coefficient(abar, h, 1.0)
    order = np.minimum(3, np.minimum(n - np.arange(n), np.arange(n) + 1))
    cols = {name: np.zeros(n) for name in ("coef_x0", "coef_x0_prev", "coef_x0_prev2", "corr_x0", "next_x0",
                                           "next_x0_prev", "next_x0_prev2")}
    prev = ("x0_prev", "x0_prev2")
    for i in range(n):  # UniP-p_i from x_i
        cols["coef_x0"][i] = A[i]
        if order[i] > 1:
            rks = np.array([(lam[i + j] - lam[i]) / h[i] for j in range(1, order[i])])
            rho = _unipc_rho(rks, h[i])
            cols["coef_x0"][i] -= A[i] * np.sum(rho / rks)
            for j in range(1, order[i]):
                cols[f"coef_{prev[j - 1]}"][i] = A[i] * rho[j - 1] / rks[j - 1]
    for j in range(1, n):  # UniC at c = j - 1, of the order of the predictor of step j
        q = order[j]
        rks = np.array([(lam[j + m] - lam[j]) / h[j] for m in range(1, q)] + [1.0])
        rho = _unipc_rho(rks, h[j])
        cols["corr_x0"][j - 1] = A[j] * rho[-1]
        cols["next_x0"][j] = A[j] * (1.0 - np.sum(rho[:-1] / rks[:-1]) - rho[-1])
        for m in range(1, q):
            cols[f"next_{prev[m - 1]}"][j] = A[j] * rho[m - 1] / rks[m - 1]
    return {f"unipc3_{name}": v for name, v in cols.items()}


# iPNDM's Adams-Bashforth weights by order: on eps of this step and the 1..3 before it
IPNDM_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm_coefficients(abar: np.ndarray) -> dict:
    """iPNDM's columns (see Tables): the EDM-variable Adams-Bashforth step, back in x."""
    n = len(abar)
    sigma = np.sqrt((1.0 - abar) / abar)
    abar_next, sigma_next = np.append(1.0, abar[:-1]), np.append(0.0, sigma[:-1])  # at index i - 1
    scale = np.sqrt(abar_next) * (sigma_next - sigma)
    coef = np.zeros((4, n))
    for i in range(n):
        for j, w in enumerate(IPNDM_WEIGHTS[min(4, n - i)]):
            coef[j, i] = scale[i] * w
    return dict(ipndm_coef_x=np.sqrt(abar_next / abar), ipndm_coef_eps=coef[0], ipndm_coef_eps_prev=coef[1],
                ipndm_coef_eps_prev2=coef[2], ipndm_coef_eps_prev3=coef[3])


# Columns of the packed device table, in order; kernels index this layout (kernels/ reads COLUMNS).
COLUMNS = (
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "large_log_variance",
    "alphas_cumprod",
    "ddim_alphas_cumprod_prev",
    "dpmpp_coef_x",
    "dpmpp_coef_x0",
    "dpmpp_coef_x0_prev",
    "sde_coef_x",
    "sde_coef_x0",
    "sde_coef_x0_prev",
    "sde_noise_std",
    "unipc_corr_x0",
    "unipc_next_x",
    "unipc_next_x0",
    "unipc_next_x0_prev",
    "dpmpp3_coef_x0",
    "dpmpp3_coef_x0_prev",
    "dpmpp3_coef_x0_prev2",
    "unipc3_coef_x0",
    "unipc3_coef_x0_prev",
    "unipc3_coef_x0_prev2",
    "unipc3_corr_x0",
    "unipc3_next_x0",
    "unipc3_next_x0_prev",
    "unipc3_next_x0_prev2",
    "ipndm_coef_x",
    "ipndm_coef_eps",
    "ipndm_coef_eps_prev",
    "ipndm_coef_eps_prev2",
    "ipndm_coef_eps_prev3",
)


@dataclass(frozen=True)
class DeviceTables:
    """Tables on a device. ``packed`` is [steps, len(COLUMNS)] (one gather per step for a kernel);
    each column is also an attribute (a view into ``packed``), and ``timesteps`` is int64 [steps]."""

    packed: torch.Tensor
    timesteps: torch.Tensor
    columns: dict

    @classmethod
    def from_tables(cls, tables: Tables, device: torch.device, dtype) -> "DeviceTables":
        host = np.stack([getattr(tables, name) for name in COLUMNS], axis=1)
        packed = torch.from_numpy(host).to(device=device, dtype=dtype).contiguous()
        columns = {name: packed[:, k] for k, name in enumerate(COLUMNS)}
        timesteps = torch.from_numpy(tables.timesteps).to(device)
        return cls(packed=packed, timesteps=timesteps, columns=columns)

    def __getattr__(self, name):
        try:
            return self.__dict__["columns"][name]
        except KeyError:
            raise AttributeError(name) from None


# Scheduler config keys (diffusers' scheduler_config.json) that SchedulerConfig reads without a field:
# each is honoured at one value (where diffusers gives it an effect the engine does not have) and
# refused with any other; dynamic_thresholding_ratio and sample_max_value are read only by thresholding.
CONFIG_ONLY_AT = {"thresholding": (False, "dynamic thresholding"), "clip_sample_range": (1.0, "a clip range other than 1")}
CONFIG_READ_WITH_THRESHOLDING = ("dynamic_thresholding_ratio", "sample_max_value")


@dataclass(frozen=True)
class SchedulerConfig:
    """How a model was trained: its noise schedule and what it predicts. Keys follow diffusers'
    ``scheduler_config.json`` so a diffusers folder's config maps one to one; ``from_dict`` honours
    or refuses every key (docs/api.md, "Scheduler config keys")."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: tuple | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    use_clipped_model_output: bool = False  # DDIM with clipping: eps from the clipped x0 (diffusers' name)
    # DDPM's and DDIM's spacing when a request names none (None: their own); an ExplicitSpacing (a list of
    # timesteps in the dict form: improved-diffusion's timestep_respacing) applies to requests of its step count
    timestep_spacing: str | ExplicitSpacing | None = None
    steps_offset: int = 0  # added to "leading" timesteps (diffusers; Stable Diffusion's configs say 1)
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024: betas rescaled to alpha-bar 0 at t = T - 1
    set_alpha_to_one: bool = True  # DDIM's last step goes to alpha-bar 1 (False: to alpha-bar at t = 0)

    def __post_init__(self):
        Prediction.parse(self.prediction_type)
        Variance.parse(self.variance_type)
        if isinstance(self.timestep_spacing, (list, tuple, ExplicitSpacing)):
            object.__setattr__(self, "timestep_spacing", ExplicitSpacing(self.timestep_spacing))
            self.timestep_spacing.kept(self.num_train_timesteps)  # within [0, T)
        elif self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise InvalidRequestError(f"unknown timestep_spacing {self.timestep_spacing!r}; use one of "
                                      f"{TIMESTEP_SPACINGS} or a list of the training timesteps to keep")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, (int, np.integer)) \
                or not 0 <= self.steps_offset < self.num_train_timesteps:
            raise InvalidRequestError(f"steps_offset must be an integer in [0, num_train_timesteps), "
                                      f"got {self.steps_offset!r}")
        for name in ("clip_sample", "use_clipped_model_output", "rescale_betas_zero_snr", "set_alpha_to_one"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.betas()

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """A scheduler config (ddpm-engine's saved one, or diffusers' scheduler_config.json of DDPMScheduler,
        DDIMScheduler or another scheduler with the same keys). Every key is honoured or refused by name:
        metadata (``_class_name``, ``_diffusers_version``, any ``_``-key) is ignored; ``thresholding`` and
        ``clip_sample_range`` are accepted at the values that have no effect here (``CONFIG_ONLY_AT``); a
        key of no field (another scheduler's, such as DPMSolverMultistepScheduler's solver_order) raises
        InvalidRequestError naming it. diffusers' ``variance_type: null`` (DPM-Solver, UniPC) is fixed_small."""
        fields = set(cls.__dataclass_fields__)
        for key, (value, what) in CONFIG_ONLY_AT.items():
            if key in d and d[key] != value:
                raise InvalidRequestError(f"the scheduler config asks for {what} ({key}={d[key]!r}); this engine "
                                          f"clips x0 to [-1, 1] only: set {key}={value!r}, or clip_sample for clipping")
        unknown = sorted(k for k in d if k not in fields and not k.startswith("_")
                         and k not in CONFIG_ONLY_AT and k not in CONFIG_READ_WITH_THRESHOLDING)
        if unknown:
            raise InvalidRequestError(f"scheduler config key(s) {unknown} are not supported (another scheduler's "
                                      f"options?); the keys read are {sorted(fields | set(CONFIG_ONLY_AT))}: remove "
                                      "them, and choose a sampler and spacing per request instead")
        kw = {k: v for k, v in d.items() if k in fields}
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(kw["trained_betas"])
        if "variance_type" in kw and kw["variance_type"] is None:
            kw["variance_type"] = "fixed_small"
        return cls(**kw)

    def to_dict(self) -> dict:
        """The keys as diffusers' configs write them (an unset timestep_spacing is left out: diffusers'
        schedulers take their own default then, as the engine's samplers do)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["trained_betas"] = list(self.trained_betas) if self.trained_betas is not None else None
        if self.timestep_spacing is None:
            del d["timestep_spacing"]
        elif isinstance(self.timestep_spacing, ExplicitSpacing):
            d["timestep_spacing"] = list(self.timestep_spacing.timesteps)
        return d

    def betas(self) -> np.ndarray:
        """The training betas, float64 [num_train_timesteps]: the named schedule or trained_betas, then
        rescaled to a zero terminal SNR if ``rescale_betas_zero_snr`` (its last beta is 1)."""
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end,
                           self.trained_betas)
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> np.ndarray:
        """alpha-bar over the training timesteps, float64 [num_train_timesteps]."""
        return alphas_cumprod(self.betas())
