"""The reference steps against seed 003's formulas, against diffusers, and against each other."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_engine import DPMSolverSampler, UniPCSampler  # the single-step API, as users import it
from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.noise import SDE_STEP, philox_normal, seed_words
from ddpm_engine.samplers import (DDIMSampler, DDPMSampler, Prediction, Variance, ddim_step, ddpm_step,
                                  default_steps, dpmpp_2m_step, predict_x0_and_eps, timestep_spacing)
from ddpm_engine.schedules import Tables, make_betas
from ddpm_engine.stepping import Rows, StepSpec, TorchStep


def rand_case(B=4, shape=(3, 5, 7), steps=1000, schedule="linear"):
    betas = make_betas(schedule, 1000)
    tables = Tables.build(betas, steps)
    tab = tables.on("cpu", torch.float64)
    x = torch.randn(B, *shape, dtype=torch.float64)
    out = torch.randn(B, *shape, dtype=torch.float64)
    noise = torch.randn(B, *shape, dtype=torch.float64)
    i = torch.tensor([0] + [random.randrange(tables.steps) for _ in range(B - 1)])
    return betas, tables, tab, x, out, noise, i


def seed003_p_sample(betas, x_t, eps, t, noise, clip):
    """Seed 003's GaussianDiffusion.p_sample, rewritten from its formulas (float64, per-sample t)."""
    betas = torch.tensor(betas)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    log_var_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod)
    coef2 = (1 - alphas_cumprod_prev) * torch.sqrt(1 - betas) / (1 - alphas_cumprod)

    def extract(a):
        return a[t].reshape(-1, 1, 1, 1)

    x0 = extract(torch.sqrt(1 / alphas_cumprod)) * x_t - extract(torch.sqrt(1 / alphas_cumprod - 1)) * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = extract(coef1) * x0 + extract(coef2) * x_t
    nonzero_mask = (t != 0).double().reshape(-1, 1, 1, 1)
    return mean + nonzero_mask * torch.exp(0.5 * extract(log_var_clipped)) * noise, x0


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_seed003(clip):
    betas, tables, tab, x, eps, noise, i = rand_case()
    got, got_x0 = ddpm_step(tab, x, eps, i, noise, clip_denoised=clip)
    want, want_x0 = seed003_p_sample(betas, x, eps, i, noise, clip)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_x0, want_x0, rtol=1e-10, atol=1e-10)


def test_mean_via_x0_and_via_eps_agree():
    """Posterior mean from x0 (eq. 7) equals seed 001's 1/sqrt(alpha) (x - beta/sqrt(1 - abar) eps) (eq. 11)."""
    betas, tables, tab, x, eps, _, i = rand_case(steps=random.choice([1000, 100, 37]))
    zero = torch.zeros_like(x)
    via_x0, _ = ddpm_step(tab, x, eps, i, zero)
    beta = torch.tensor(tables.betas)[i].reshape(-1, 1, 1, 1)
    abar = torch.tensor(tables.alphas_cumprod)[i].reshape(-1, 1, 1, 1)
    via_eps = (x - beta / torch.sqrt(1 - abar) * eps) / torch.sqrt(1 - beta)
    torch.testing.assert_close(via_x0, via_eps, rtol=1e-9, atol=1e-9)


def test_t0_has_no_noise_and_fixed_large_uses_beta():
    betas, tables, tab, x, eps, noise, _ = rand_case()
    i0 = torch.zeros(x.shape[0], dtype=torch.int64)
    a, _ = ddpm_step(tab, x, eps, i0, noise)
    b, _ = ddpm_step(tab, x, eps, i0, torch.zeros_like(noise))
    assert torch.equal(a, b)
    i = torch.full((x.shape[0],), 500)
    small, _ = ddpm_step(tab, x, eps, i, noise, variance=Variance.FIXED_SMALL)
    large, _ = ddpm_step(tab, x, eps, i, noise, variance=Variance.FIXED_LARGE)
    mean, _ = ddpm_step(tab, x, eps, i, torch.zeros_like(noise))
    torch.testing.assert_close(large - mean, math.sqrt(betas[500]) * noise)
    torch.testing.assert_close(small - mean, math.sqrt(tables.posterior_variance[500]) * noise)


@pytest.mark.parametrize("step_fn", ["ddpm", "ddim"])
def test_prediction_types_are_consistent(step_fn):
    """An epsilon, an x0 and a v output describing the same (x0, eps) give the same step."""
    _, tables, tab, x, eps, noise, i = rand_case(steps=50)
    x0, _ = predict_x0_and_eps(tab, x, eps, i, Prediction.EPSILON)
    sa = tab.sqrt_alphas_cumprod[i].reshape(-1, 1, 1, 1)
    s1 = tab.sqrt_one_minus_alphas_cumprod[i].reshape(-1, 1, 1, 1)
    v = sa * eps - s1 * x0
    outs = {Prediction.EPSILON: eps, Prediction.SAMPLE: x0, Prediction.V: v}
    results = []
    for pred, out in outs.items():
        if step_fn == "ddpm":
            results.append(ddpm_step(tab, x, out, i, noise, prediction=pred, clip_denoised=True))
        else:
            results.append(ddim_step(tab, x, out, i, noise, eta=0.7, prediction=pred, clip_denoised=True))
    for r in results[1:]:
        torch.testing.assert_close(r[0], results[0][0], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(r[1], results[0][1], rtol=1e-8, atol=1e-8)


def test_ddim_eta1_is_ddpm_posterior_and_eta0_is_deterministic():
    _, tables, tab, x, eps, noise, i = rand_case(steps=random.choice([1000, 50, 13]))
    ddim, _ = ddim_step(tab, x, eps, i, noise, eta=1.0)
    ddpm, _ = ddpm_step(tab, x, eps, i, noise)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-8, atol=1e-8)
    a, _ = ddim_step(tab, x, eps, i, noise, eta=0.0)
    b, _ = ddim_step(tab, x, eps, i, torch.randn_like(noise), eta=0.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("variance,steps,prediction", [
    ("fixed_small", 1000, "epsilon"), ("fixed_large", 1000, "epsilon"), ("fixed_small", 50, "epsilon")] + [
    (learned, steps, prediction) for learned in ("learned_range", "learned") for steps in (1000, 50)
    for prediction in ("epsilon", "sample", "v_prediction")])
def test_ddpm_sampler_matches_diffusers(variance, steps, prediction):
    """DDPMSampler.step against diffusers' DDPMScheduler.step with the same noise (its generator's
    draw) at the first, a middle, the second-to-last and the last kept timestep, respaced too. A
    learned variance: the model's 2C-channel output, [prediction, variance part]."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=True,
                                  prediction_type=prediction)
    ref.set_timesteps(steps)
    ours = DDPMSampler(variance_type=variance, clip_sample=True, steps=steps, prediction_type=prediction)
    assert torch.equal(ours.timesteps, ref.timesteps.long())
    x = torch.randn(2, 3, 8, 8)
    for t in ref.timesteps[[0, len(ref.timesteps) // 2, -2, -1]]:
        out = torch.randn_like(x)
        if Variance(variance).learned:
            out = torch.cat([out, variance_part(x.shape, variance)], 1)
        g_seed = random.getrandbits(32)
        want = ref.step(out, t, x, generator=torch.Generator().manual_seed(g_seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(g_seed))
        got = ours.step(out, t, x, noise)
        # diffusers accumulates alpha-bar in float32 (ours: float64), ~1e-5 relative at t = 999
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, rtol=2e-4, atol=2e-4)
        if Variance(variance).learned and t == ref.timesteps[-2]:  # the variance part matters (beta far from beta~)
            fixed = DDPMSampler(clip_sample=True, steps=steps, prediction_type=prediction).step(out[:, :3], t, x, noise)
            assert (fixed.prev_sample - got.prev_sample).abs().max() > 1e-3


def variance_part(shape, variance: str):
    """A fresh variance part: v in [-1, 1] for "learned_range", the variance itself (positive, up to
    about beta_max) for "learned"."""
    v = torch.rand(shape)
    return 2 * v - 1 if variance == "learned_range" else 0.03 * v + 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_sampler_matches_diffusers(eta):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(50)
    ours = DDIMSampler(eta=eta, steps=50)
    assert torch.equal(ours.timesteps, ref.timesteps.long())
    x = torch.randn(2, 3, 8, 8)
    for t in ref.timesteps[[0, 10, -1]]:
        eps, noise = torch.randn_like(x), torch.randn_like(x)
        want = ref.step(eps, t, x, eta=eta, variance_noise=noise)
        got = ours.step(eps, t, x, noise)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-5, atol=1e-5)


def test_mixed_timesteps_in_one_batch_equal_separate_steps():
    _, tables, tab, x, eps, noise, i = rand_case(B=6, steps=100)
    together, _ = ddpm_step(tab, x, eps, i, noise, clip_denoised=True)
    for b in range(6):
        alone, _ = ddpm_step(tab, x[b:b + 1], eps[b:b + 1], i[b:b + 1], noise[b:b + 1], clip_denoised=True)
        assert torch.equal(alone[0], together[b])


def test_cosine_schedule_steps_are_finite():
    _, tables, tab, x, eps, noise, _ = rand_case(schedule="cosine")
    i = torch.arange(4) * 333
    out, x0 = ddpm_step(tab, x, eps, i, noise, clip_denoised=True)
    assert torch.isfinite(out).all() and np.isfinite(tables.posterior_log_variance_clipped).all()


# ---- against diffusers, whole loops: DDIM's use_clipped_model_output and DPM-Solver++(2M) ----

LINEAR_ABAR = torch.from_numpy(np.cumprod(1 - make_betas("linear", 1000)))


def fixed_model(prediction: str, overshoot: float = 0.0):
    """A deterministic "network": the smooth denoiser x0 = (1 + overshoot t / T) tanh(1.3 x + 0.5 sin 3x),
    written as an epsilon, x0 or v output with the (float64) linear alpha-bars, so every prediction
    type describes the same model. overshoot > 0: x0 often leaves [-1, 1] at large t, so clipping
    matters there, while the final images stay inside."""
    def model(x, t):
        a = LINEAR_ABAR[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        scale = 1 + overshoot * t.to(x.dtype).reshape(a.shape) / 1000
        x0 = scale * torch.tanh(1.3 * x + 0.5 * torch.sin(3 * x))
        if prediction == "sample":
            return x0
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    return model


def fixed_random_model(prediction: str, shape):
    """A fixed random output (plus a little of x), scaled so that x0 is often far outside [-1, 1]:
    with clipping, whether eps is recomputed from the clipped x0 changes the images a lot."""
    out = torch.randn(shape) * (1.0 if prediction == "epsilon" else 1.5)
    return lambda x, t: out + 0.1 * x


def run_diffusers(scheduler, model, x, noises=None, **step_kw):
    for k, t in enumerate(scheduler.timesteps):
        if noises is not None:
            step_kw["variance_noise"] = noises[k]
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **step_kw).prev_sample
    return x


def run_single_step(sampler, model, x, noises=None):
    """Our single-step API's loop, as run_diffusers: noise per step when given."""
    for k, t in enumerate(sampler.timesteps):
        kw = {} if noises is None else {"noise": noises[k]}
        x = sampler.step(model(x, t.expand(x.shape[0])), t.expand(x.shape[0]), x, **kw).prev_sample
    return x


def run_torch_step(spec, tables, model, x, words):
    """The engine's loop in miniature: Rows updated in place by TorchStep (engine.stepping)."""
    rows = Rows(x.clone(), torch.full((x.shape[0],), tables.steps - 1), words, torch.zeros_like(x), torch.zeros_like(x))
    tab, step = tables.on("cpu"), TorchStep(spec, tables.on("cpu"), x.shape[1:])
    for _ in range(tables.steps):
        step(rows, model(rows.x, tab.timesteps[rows.i]))
    return rows.x


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_use_clipped_model_output_matches_diffusers(seeded, use_clipped, clip, eta):
    """DDIM-10 loops from one x_T with the same noise: diffusers' DDIMScheduler.step(...,
    use_clipped_model_output=...) and DDIMSampler (constructor option, and the step kwarg)."""
    diffusers = pytest.importorskip("diffusers")
    prediction = random.choice(["epsilon", "v_prediction"])
    model = fixed_random_model(prediction, (2, 3, 8, 8))
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, set_alpha_to_one=True,
                                  prediction_type=prediction)
    ref.set_timesteps(10)
    x_T = torch.randn(2, 3, 8, 8)
    noises = torch.randn(10, *x_T.shape)
    want = run_diffusers(ref, model, x_T, noises, eta=eta, use_clipped_model_output=use_clipped)
    for ours in (DDIMSampler(eta=eta, steps=10, clip_sample=clip, prediction_type=prediction,
                             use_clipped_model_output=use_clipped),
                 DDIMSampler(eta=eta, steps=10, clip_sample=clip, prediction_type=prediction)):
        kw = {} if ours.use_clipped_model_output else {"use_clipped_model_output": use_clipped}
        x = x_T
        for k, t in enumerate(ours.timesteps):
            x = ours.step(model(x, t.expand(2)), t.expand(2), x, noises[k], **kw).prev_sample
        # float32 round-off; unclipped, this "model" drives x to |x| ~ 300 (measured: |diff| <= 1.5e-5 + 2e-6 |x|)
        torch.testing.assert_close(x, want, rtol=2e-6, atol=1e-4, msg=prediction)
    if clip:  # the option is not a no-op here: the other value gives another image
        other = run_diffusers(ref, model, x_T, noises, eta=eta, use_clipped_model_output=not use_clipped)
        assert (other - want).abs().max() > 0.05


@pytest.mark.parametrize("use_clipped", [False, True])
def test_engine_ddim_step_honours_use_clipped_model_output(seeded, use_clipped):
    """TorchStep (the engine's step) with StepSpec.use_clipped_model_output against diffusers, with
    the engine's own Philox noise handed to diffusers as variance_noise."""
    diffusers = pytest.importorskip("diffusers")
    x_T = torch.randn(2, 1, 6, 6)
    model = fixed_random_model("epsilon", x_T.shape)
    tables = Tables.build(make_betas("linear", 1000), 10, timestep_spacing("ddim"))
    words = seed_words([random.getrandbits(64) for _ in range(2)], "cpu")
    noises = [philox_normal(words, torch.full((2,), i), x_T[0].numel()).reshape(x_T.shape) for i in range(9, -1, -1)]
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True)
    ref.set_timesteps(10)
    want = run_diffusers(ref, model, x_T, noises, eta=1.0, use_clipped_model_output=use_clipped)
    spec = StepSpec("ddim", Prediction.EPSILON, Variance.FIXED_SMALL, True, 1.0, use_clipped_model_output=use_clipped)
    got = run_torch_step(spec, tables, model, x_T, words)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_sampler_matches_diffusers(seeded, prediction, steps, clip, order):
    """DPMSolverSampler against diffusers' DPMSolverMultistepScheduler with its defaults (clipping =
    thresholding with sample_max_value 1) at solver_order 2 and 3: same timesteps, and whole runs
    within 1e-4."""
    diffusers = pytest.importorskip("diffusers")
    model = fixed_model(prediction, overshoot=1.0 if clip else 0.0)
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type=prediction,
                                                thresholding=clip, sample_max_value=1.0, solver_order=order)
    ref.set_timesteps(steps)
    ours = DPMSolverSampler(steps=steps, prediction_type=prediction, clip_sample=clip, solver_order=order)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_T = torch.randn(2, 3, 8, 8)
    want, x = run_diffusers(ref, model, x_T), run_single_step(ours, model, x_T)
    # measured max |diff| 3.8e-6 (float32 on both sides; the tables are float64 cast once)
    assert (x - want).abs().max() <= 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_engine_dpmpp_2m_step_matches_diffusers(seeded, prediction):
    """The engine's path: default steps and spacing from samplers, Rows.x0_prev, TorchStep."""
    diffusers = pytest.importorskip("diffusers")
    steps = default_steps("dpmpp_2m", 1000)
    tables = Tables.build(make_betas("linear", 1000), steps, timestep_spacing("dpmpp_2m"))
    ref = diffusers.DPMSolverMultistepScheduler(prediction_type=prediction)
    ref.set_timesteps(steps)
    assert np.array_equal(tables.timesteps[::-1], ref.timesteps.numpy())
    model = fixed_model(prediction)
    x_T = torch.randn(3, 1, 6, 6)
    spec = StepSpec("dpmpp_2m", Prediction.parse(prediction), Variance.FIXED_SMALL, False, 0.0)
    got = run_torch_step(spec, tables, model, x_T, seed_words([1, 2, 3], "cpu"))
    assert (got - run_diffusers(ref, model, x_T)).abs().max() <= 1e-4


def test_dpmpp_2m_step_is_ddim_on_first_order_steps(seeded):
    """On its first-order steps DPM-Solver++ is DDIM (eta = 0): the paper's first-order solver."""
    tab = Tables.build(make_betas("linear", 1000), 50, "linspace").on("cpu", torch.float64)
    x, out = torch.randn(2, 3, 3, 5, 7, dtype=torch.float64)
    i = torch.tensor([49, 49, 0])
    stale = torch.full_like(x, float("nan"))
    got, x0 = dpmpp_2m_step(tab, x, out, i, stale)
    want, want_x0 = ddim_step(tab, x, out, i, torch.zeros_like(x), eta=0.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x0, want_x0)
    torch.testing.assert_close(got[2], x0[2])  # the final step lands on x0 (sigma = 0)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_sampler_matches_diffusers(seeded, prediction, clip, order):
    """UniPCSampler against diffusers' UniPCMultistepScheduler with its defaults (clipping =
    thresholding with sample_max_value 1) at solver_order 2 and 3: same timesteps, and whole runs
    within 1e-4."""
    diffusers = pytest.importorskip("diffusers")
    steps = random.choice([3, 5, 10, 20])
    model = fixed_model(prediction, overshoot=1.0 if clip else 0.0)
    ref = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type=prediction,
                                            thresholding=clip, sample_max_value=1.0, solver_order=order)
    ref.set_timesteps(steps)
    ours = UniPCSampler(steps=steps, prediction_type=prediction, clip_sample=clip, solver_order=order)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_T = torch.randn(2, 3, 8, 8)
    assert (run_single_step(ours, model, x_T) - run_diffusers(ref, model, x_T)).abs().max() <= 1e-4, steps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sde_dpm_solver_sampler_matches_diffusers_given_the_noise(seeded, prediction):
    """DPMSolverSampler(algorithm_type="sde-dpmsolver++").step(..., noise=z) against diffusers'
    step(..., variance_noise=z): whole runs within 1e-4, and the noise changes the image."""
    diffusers = pytest.importorskip("diffusers")
    steps = random.choice([5, 10, 20])
    model = fixed_model(prediction)
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type=prediction,
                                                algorithm_type="sde-dpmsolver++")
    ref.set_timesteps(steps)
    ours = DPMSolverSampler(steps=steps, prediction_type=prediction, algorithm_type="sde-dpmsolver++")
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_T = torch.randn(2, 3, 8, 8)
    noises = torch.randn(steps, *x_T.shape)
    x = run_single_step(ours, model, x_T, noises)
    assert (x - run_diffusers(ref, model, x_T, noises)).abs().max() <= 1e-4, steps
    ours.set_timesteps(steps)
    quiet = run_single_step(ours, model, x_T)  # noise=None: zeros
    assert (quiet - x).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "unipc"])
def test_engine_multistep_step_matches_diffusers(seeded, sampler):
    """The engine's path for the new samplers: default steps and spacing, Rows state, TorchStep; the
    SDE's noise is the engine's own (Philox at SDE_STEP + i), handed to diffusers."""
    diffusers = pytest.importorskip("diffusers")
    steps = default_steps(sampler, 1000)
    tables = Tables.build(make_betas("linear", 1000), steps, timestep_spacing(sampler))
    if sampler == "unipc":
        ref = diffusers.UniPCMultistepScheduler()
    else:
        ref = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    ref.set_timesteps(steps)
    assert np.array_equal(tables.timesteps[::-1], ref.timesteps.numpy())
    model = fixed_model("epsilon")
    x_T = torch.randn(3, 1, 6, 6)
    words = seed_words([random.getrandbits(64) for _ in range(3)], "cpu")
    noises = [philox_normal(words, SDE_STEP + steps - 1 - k, x_T[0].numel()).reshape(x_T.shape) for k in range(steps)]
    spec = StepSpec(sampler, Prediction.EPSILON, Variance.FIXED_SMALL, False, 0.0)
    got = run_torch_step(spec, tables, model, x_T, words)
    assert (got - run_diffusers(ref, model, x_T, noises if sampler == "dpmpp_2m_sde" else None)).abs().max() <= 1e-4


def test_dpm_solver_sampler_refuses_what_it_cannot_do():
    with pytest.raises(InvalidRequestError, match="algorithm_type"):
        DPMSolverSampler(steps=5, algorithm_type="dpmsolver")
    sampler = DPMSolverSampler(steps=5)  # the ODE: no noise to take
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(InvalidRequestError, match="sde-dpmsolver"):
        sampler.step(torch.zeros_like(x), sampler.timesteps[0], x, noise=torch.randn_like(x))
    for make in (lambda: UniPCSampler(steps=1000), lambda: DPMSolverSampler(steps=1000, algorithm_type="sde-dpmsolver++")):
        with pytest.raises(InvalidRequestError, match="at most T - 1 = 999"):
            make()


@pytest.mark.parametrize("make", [DPMSolverSampler, UniPCSampler,
                                  lambda steps: DPMSolverSampler(steps=steps, algorithm_type="sde-dpmsolver++")])
def test_multistep_sampler_keeps_its_state_per_run(make):
    sampler = make(steps=5)
    x = torch.randn(2, 1, 4, 4)
    t = sampler.timesteps[0].expand(2)
    sampler.step(torch.randn_like(x), t, x)
    with pytest.raises(InvalidRequestError, match="set_timesteps"):
        sampler.step(torch.randn(3, 1, 4, 4), sampler.timesteps[1].expand(3), torch.randn(3, 1, 4, 4))
    sampler.set_timesteps(5)  # a new run: any batch
    out = sampler.step(torch.zeros(3, 1, 4, 4), t[:1].expand(3), torch.randn(3, 1, 4, 4))
    assert out.prev_sample.shape == (3, 1, 4, 4)


def test_single_step_api_refuses_a_timestep_it_did_not_keep():
    sampler = DDIMSampler(steps=10)
    kept = int(sampler.timesteps[0])
    x = torch.randn(2, 1, 4, 4)
    sampler.step(torch.zeros_like(x), torch.tensor([kept, kept]), x)  # a kept timestep works
    for bad in (kept + 1, -1, 1000, [kept, kept - 1]):
        with pytest.raises(InvalidRequestError, match="timesteps"):
            sampler.step(torch.zeros_like(x), torch.tensor(bad), x)


def test_each_sampler_s_defaults_live_in_its_registry_entry():
    """Timestep spacing, default steps (capped by what the spacing allows), and whether the scheduler
    config's clip_sample applies: diffusers' defaults for each scheduler."""
    from ddpm_engine.samplers import SAMPLER_DEFS

    got = {name: (d.spacing, d.default_steps(1000), d.default_clip(True), d.default_clip(False), d.state)
           for name, d in SAMPLER_DEFS.items()}
    assert got == {"ddpm": ("leading", 1000, True, False, ()), "ddim": ("leading", 50, True, False, ()),
                   "dpmpp_2m": ("linspace", 20, False, False, ("x0_prev",)),
                   "dpmpp_2m_sde": ("linspace", 20, False, False, ("x0_prev",)),
                   "unipc": ("linspace", 20, False, False, ("x0_prev", "corrector")),
                   "dpmpp_3m": ("linspace", 20, False, False, ("x0_prev", "x0_prev2")),
                   "unipc_3": ("linspace", 20, False, False, ("x0_prev", "x0_prev2", "corrector")),
                   "ipndm": ("leading", 20, False, False, ("eps_prev", "eps_prev2", "eps_prev3"))}
    assert [default_steps(s, 10) for s in ("ddpm", "ddim", "unipc")] == [10, 10, 9]  # "linspace" keeps T - 1
    assert default_steps("dpmpp_2m", 1) == 1 and timestep_spacing("dpmpp_2m_sde") == "linspace"


def test_an_unknown_sampler_is_refused_where_a_spec_is_made():
    with pytest.raises(InvalidRequestError, match=r"unknown sampler 'euler'; choose one of \('ddpm', 'ddim'"):
        StepSpec("euler", Prediction.EPSILON, Variance.FIXED_SMALL, False, 0.0)
    with pytest.raises(InvalidRequestError, match="unknown sampler"):
        default_steps(["ddim"], 1000)  # not a name at all: the same refusal, no TypeError


# ---- learned variance: the model outputs [prediction, variance part] (2C channels) ----

def test_learned_range_spans_the_two_fixed_variances():
    """v = -1 is fixed_small (the clipped posterior log-variance), v = +1 fixed_large (log beta of
    the respaced betas), v = 0 their geometric mean: improved-diffusion's min_log and max_log."""
    _, tables, tab, x, eps, noise, _ = rand_case(steps=random.choice([1000, 40]))
    i = torch.tensor([1, 7, tables.steps // 2, tables.steps - 1])
    ones = torch.ones_like(eps)
    learned = {v: ddpm_step(tab, x, torch.cat([eps, v * ones], 1), i, noise, variance=Variance.LEARNED_RANGE)[0]
               for v in (-1.0, 0.0, 1.0)}
    small, _ = ddpm_step(tab, x, eps, i, noise, variance=Variance.FIXED_SMALL)
    large, _ = ddpm_step(tab, x, eps, i, noise, variance=Variance.FIXED_LARGE)
    mean, _ = ddpm_step(tab, x, eps, i, torch.zeros_like(noise))
    torch.testing.assert_close(learned[-1.0], small, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(learned[1.0], large, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((learned[0.0] - mean) ** 2, (small - mean).abs() * (large - mean).abs())


def test_learned_variance_is_masked_at_the_last_step_even_when_it_overflows():
    """At i = 0 no noise is added whatever the variance part holds (inf or NaN included): a mask, not
    a product with 0."""
    _, tables, tab, x, eps, noise, _ = rand_case()
    i0 = torch.zeros(x.shape[0], dtype=torch.int64)
    mean, _ = ddpm_step(tab, x, eps, i0, torch.zeros_like(noise))
    for variance, bad in [(Variance.LEARNED_RANGE, 1e4), (Variance.LEARNED, float("inf")),
                          (Variance.LEARNED, float("nan"))]:
        got, _ = ddpm_step(tab, x, torch.cat([eps, torch.full_like(eps, bad)], 1), i0, noise, variance=variance)
        assert torch.equal(got, mean), (variance, bad)


def test_model_output_parts_is_the_one_split():
    """[prediction, variance part] along dim 1, as views; the other samplers read the first C
    channels of a 2C output; a width that does not fit the variance type is refused."""
    from ddpm_engine.samplers import model_output_parts

    x = torch.randn(2, 3, 4, 5)
    wide = torch.randn(2, 6, 4, 5)
    pred, var = model_output_parts(wide, x, Variance.LEARNED_RANGE)
    assert pred.data_ptr() == wide.data_ptr() and torch.equal(pred, wide[:, :3]) and torch.equal(var, wide[:, 3:])
    assert model_output_parts(wide[:, :3], x, Variance.FIXED_SMALL)[1] is None
    assert model_output_parts(wide, x)[0].shape == x.shape  # None: either width (a sampler without a variance)
    for out, variance in [(wide, Variance.FIXED_SMALL), (wide[:, :3], Variance.LEARNED), (wide[:, :4], None),
                          (wide[:1], Variance.LEARNED_RANGE)]:
        with pytest.raises(InvalidRequestError, match="the model output has shape"):
            model_output_parts(out, x, variance)
    _, tables, tab, x, eps, noise, i = rand_case(steps=50)
    for sampler in (DDIMSampler(steps=50, eta=0.5), DPMSolverSampler(steps=20), UniPCSampler(steps=20)):
        t = sampler.timesteps[3]
        out = torch.randn(4, 3, 5, 7)
        a = sampler.step(torch.cat([out, torch.full_like(out, float("nan"))], 1), t, x.float()).prev_sample
        sampler.set_timesteps(sampler.tables.steps)
        b = sampler.step(out, t, x.float()).prev_sample
        assert torch.equal(a, b), type(sampler).__name__


def improved_diffusion():
    """improved-diffusion's gaussian_diffusion and respace modules from a checkout named by
    $IMPROVED_DIFFUSION (never part of this project), or None."""
    import importlib
    import os
    import sys

    root = os.environ.get("IMPROVED_DIFFUSION")
    if not root or not os.path.isdir(os.path.join(root, "improved_diffusion")):
        return None
    sys.path.insert(0, root)
    try:
        return (importlib.import_module("improved_diffusion.gaussian_diffusion"),
                importlib.import_module("improved_diffusion.respace"))
    except ImportError:
        return None
    finally:
        sys.path.remove(root)


@pytest.mark.parametrize("steps", [1000, 50, 37])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_learned_range_matches_improved_diffusion(seeded, steps, prediction):
    """improved-diffusion's p_sample (ModelVarType.LEARNED_RANGE) through its SpacedDiffusion on our
    kept timesteps, with our noise (its th.randn_like replaced), float64, every step index.
    Skipped unless $IMPROVED_DIFFUSION names a checkout of github.com/openai/improved-diffusion."""
    found = improved_diffusion()
    if found is None:
        pytest.skip("set IMPROVED_DIFFUSION to a checkout of openai/improved-diffusion")
    gd, respace = found
    betas = make_betas(random.choice(["linear", "cosine"]), 1000)
    tables = Tables.build(betas, steps)
    theirs = respace.SpacedDiffusion(
        use_timesteps=tables.timesteps.tolist(), betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON if prediction == "epsilon" else gd.ModelMeanType.START_X,
        model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE)
    tab = tables.on("cpu", torch.float64)
    B = 6
    x = torch.randn(B, 3, 5, 5, dtype=torch.float64)
    out = torch.cat([torch.randn_like(x), 2 * torch.rand_like(x) - 1], 1)
    noise = torch.randn_like(x)
    i = torch.tensor([0, 1, steps - 1] + [random.randrange(steps) for _ in range(B - 3)])
    import unittest.mock

    with unittest.mock.patch.object(gd.th, "randn_like", lambda like: noise):
        want = theirs.p_sample(lambda x_, t_: out, x, i, clip_denoised=True)
    got, got_x0 = ddpm_step(tab, x, out, i, noise, prediction=Prediction.parse(prediction),
                            variance=Variance.LEARNED_RANGE, clip_denoised=True)
    # its _extract_into_tensor casts each gathered coefficient to float32 (relative 6e-8), and
    # sqrt(1 / abar) reaches ~160 at t = 999: x0 = 160 x - 160 eps agrees to ~1e-5 there, ~1e-7 elsewhere
    torch.testing.assert_close(got, want["sample"], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got_x0, want["pred_xstart"], rtol=1e-6, atol=1e-4)
QUALITY_TABLE = (Path(__file__).resolve().parents[2] / "bench" / "results"
                 / "quality-2026-12-03-torch-fp32-spacings.json")


def test_a_request_without_a_sampler_gets_ddpm_or_the_few_step_default():
    """sampler=None: DDPM-T without steps, DDPM respaced above FEW_STEPS, and the few-step default
    for 1..FEW_STEPS steps, which is the sampler with the lowest 5-step Fréchet distance in the
    committed quality table (docs/performance.md)."""
    import json

    from ddpm_engine import Engine
    from ddpm_engine.models import SeedUNet
    from ddpm_engine.samplers import FEW_STEP_SAMPLER, FEW_STEP_SPACING, FEW_STEPS, SAMPLER_DEFS, default_sampler

    engine = Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=(1, 8, 8), backend="torch", device="cpu",
                                batching=False)
    assert (engine.plan().spec.sampler, engine.plan().steps) == ("ddpm", 1000)
    assert [engine.plan(steps=n).spec.sampler for n in (1, 5, FEW_STEPS)] == [FEW_STEP_SAMPLER] * 3
    assert engine.plan(steps=FEW_STEPS + 1).spec.sampler == "ddpm"
    assert engine.plan("ddim", steps=5).spec.sampler == "ddim"  # a named sampler is never replaced
    assert default_sampler(True) == "ddpm" and default_sampler(None) == "ddpm"
    seeds = [random.getrandbits(64) for _ in range(2)]
    assert engine.plan(steps=5).spacing == FEW_STEP_SPACING and engine.plan(steps=5, spacing="karras").spacing == "karras"
    assert torch.equal(engine.sample(seeds, steps=5),
                       engine.sample(seeds, sampler=FEW_STEP_SAMPLER, steps=5, spacing=FEW_STEP_SPACING))
    rows = [r for r in json.loads(QUALITY_TABLE.read_text())["rows"] if r["steps"] == 5 and r["sampler"] != "ddpm"]
    assert {r["sampler"] for r in rows} == set(SAMPLER_DEFS) - {"ddpm"}  # every few-step sampler was measured
    best = min(rows, key=lambda r: r["frechet"])
    assert (best["sampler"], best["spacing"]) == (FEW_STEP_SAMPLER, FEW_STEP_SPACING)
