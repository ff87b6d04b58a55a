"""The reference steps against seed 003's formulas, against diffusers, and against each other."""

import math
import random

import numpy as np
import pytest
import torch

from ddpm_engine.samplers import (DDIMSampler, DDPMSampler, Prediction, Variance, ddim_step, ddpm_step,
                             predict_x0_and_eps)
from ddpm_engine.schedules import Tables, make_betas


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


@pytest.mark.parametrize("variance,steps", [("fixed_small", 1000), ("fixed_large", 1000), ("fixed_small", 50)])
def test_ddpm_sampler_matches_diffusers(variance, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=True)
    ref.set_timesteps(steps)
    ours = DDPMSampler(variance_type=variance, clip_sample=True, steps=steps)
    assert torch.equal(ours.timesteps, ref.timesteps.long())
    x = torch.randn(2, 3, 8, 8)
    for t in ref.timesteps[[0, len(ref.timesteps) // 2, -2, -1]]:
        eps = torch.randn_like(x)
        g_seed = random.getrandbits(32)
        want = ref.step(eps, t, x, generator=torch.Generator().manual_seed(g_seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(g_seed))
        got = ours.step(eps, t, x, noise)
        # diffusers accumulates alpha-bar in float32 (ours: float64), ~1e-5 relative at t = 999
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, rtol=2e-4, atol=2e-4)


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
