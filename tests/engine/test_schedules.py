"""Coefficient tables against independent closed forms (plain Python floats, no numpy)."""

import math
import random

import numpy as np
import pytest
import torch

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.samplers import SAMPLERS, default_steps, timestep_spacing
from ddpm_engine.schedules import (COLUMNS, SchedulerConfig, Tables, cosine_betas, linear_betas, make_betas,
                                   spaced_timesteps)


def closed_forms(betas, t):
    """Every table entry at training step t from its definition, in Python floats."""
    abar = math.prod(1.0 - b for b in betas[: t + 1])
    abar_prev = math.prod(1.0 - b for b in betas[:t]) if t > 0 else 1.0
    beta = betas[t]
    return {
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": math.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / math.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / abar - 1),
        "posterior_variance": beta * (1 - abar_prev) / (1 - abar),
        "posterior_mean_coef1": beta * math.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar),
    }


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_tables_match_closed_forms(schedule):
    betas = make_betas(schedule, 1000)
    tab = Tables.build(betas)
    for t in [0, 1, 2, random.randrange(3, 999), 999]:
        for name, want in closed_forms(list(betas), t).items():
            assert getattr(tab, name)[t] == pytest.approx(want, rel=1e-10, abs=1e-15), (name, t)
    # improved-diffusion's clipping rule: entry 0 replaced by entry 1, everything else the log
    assert tab.posterior_log_variance_clipped[0] == pytest.approx(math.log(tab.posterior_variance[1]))
    assert np.allclose(tab.posterior_log_variance_clipped[1:], np.log(tab.posterior_variance[1:]))
    assert np.allclose(tab.large_log_variance[1:], np.log(betas[1:]))
    assert all(np.isfinite(getattr(tab, n)).all() for n in ("posterior_log_variance_clipped", "large_log_variance"))


def test_linear_and_cosine_closed_forms():
    b = linear_betas(1000)
    assert b[0] == 1e-4 and b[-1] == pytest.approx(0.02) and b.dtype == np.float64
    c = cosine_betas(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    t = random.randrange(0, 900)  # far from the clipped end
    assert math.prod(1 - x for x in c[: t + 1]) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert c.max() <= 0.999 and c[-1] == 0.999


def test_respacing_rebuilds_betas_from_kept_alpha_bars():
    betas = linear_betas(1000)
    tab = Tables.build(betas, steps=50)
    assert list(tab.timesteps) == list(range(0, 1000, 20))
    abar_full = np.cumprod(1 - betas)
    assert np.allclose(tab.alphas_cumprod, abar_full[tab.timesteps], rtol=1e-12)
    # beta_i = 1 - abar_i / abar_{i-1}: the products of the new alphas give back the kept alpha-bars
    assert np.allclose(np.cumprod(1 - tab.betas), tab.alphas_cumprod, rtol=1e-12)
    assert tab.ddim_alphas_cumprod_prev[0] == 1.0  # DDIM's last step goes to alpha-bar = 1
    assert np.allclose(tab.ddim_alphas_cumprod_prev[1:], tab.alphas_cumprod[:-1])


def test_steps_validation_and_spacing():
    assert len(spaced_timesteps(1000, 300)) == 300
    for bad in (0, -1, 1001, 2.5, True, "10"):
        with pytest.raises(InvalidRequestError):
            spaced_timesteps(1000, bad)


def test_user_betas_and_bad_schedules():
    betas = np.random.uniform(1e-4, 0.05, size=37)
    assert np.array_equal(make_betas(trained_betas=betas), betas)
    with pytest.raises(InvalidRequestError):
        make_betas("quadratic")
    with pytest.raises(InvalidRequestError):
        make_betas(trained_betas=[0.5, 1.5])
    cfg = SchedulerConfig(trained_betas=tuple(betas), num_train_timesteps=37)
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(variance_type="learned")


def test_device_tables_are_cached_and_cast_once():
    tab = Tables.build(linear_betas(100), steps=10)
    d1, d2 = tab.on("cpu"), tab.on("cpu")
    assert d1 is d2
    assert d1.packed.dtype.is_floating_point and d1.packed.shape[0] == 10
    assert float(d1.alphas_cumprod[3]) == pytest.approx(tab.alphas_cumprod[3], rel=1e-6)


# ---- DPM-Solver++(2M): linspace timesteps and the multistep coefficients ----

def test_linspace_timesteps_match_diffusers(seeded):
    diffusers = pytest.importorskip("diffusers")
    for T in (1000, 37):
        for steps in {1, 2, T - 1, random.randrange(3, T - 1)}:
            ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T)
            ref.set_timesteps(steps)
            got = spaced_timesteps(T, steps, "linspace")
            assert np.array_equal(got[::-1], ref.timesteps.numpy()), (T, steps)
            assert np.all(np.diff(got) > 0)
    with pytest.raises(InvalidRequestError, match="T - 1"):
        spaced_timesteps(1000, 1000, "linspace")  # would round two entries onto one timestep
    with pytest.raises(InvalidRequestError, match="spacing"):
        spaced_timesteps(1000, 10, "karras")  # a sigma grid, not a timestep spacing: kept_schedule


def dpmpp_closed_form(abar, i, steps):
    """x_{i-1} = cx x_i + c0 x0_i + c1 x0_{i+1} from DPM-Solver++(2M)'s definitions, in Python floats."""
    def lam(k):
        return math.log(math.sqrt(abar[k]) / math.sqrt(1 - abar[k]))

    if i == 0:  # to sigma = 0: x0 itself
        return 0.0, 1.0, 0.0
    h = lam(i - 1) - lam(i)
    sigma_ratio = math.sqrt(1 - abar[i - 1]) / math.sqrt(1 - abar[i])
    A = math.sqrt(abar[i - 1]) * (1 - math.exp(-h))
    if i == steps - 1:  # first step: first order
        return sigma_ratio, A, 0.0
    r = (lam(i) - lam(i + 1)) / h
    return sigma_ratio, A * (1 + 1 / (2 * r)), -A / (2 * r)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_coefficients_match_closed_forms(seeded, schedule):
    steps = random.choice([20, 7, 50])
    tab = Tables.build(make_betas(schedule, 1000), steps, "linspace")
    abar = list(tab.alphas_cumprod)
    for i in {0, 1, steps - 2, steps - 1, random.randrange(steps)}:
        want = dpmpp_closed_form(abar, i, steps)
        got = (tab.dpmpp_coef_x[i], tab.dpmpp_coef_x0[i], tab.dpmpp_coef_x0_prev[i])
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), i
    # in the device table, next to the DDPM / DDIM columns
    packed = tab.on("cpu", torch.float64).packed
    for name in ("dpmpp_coef_x", "dpmpp_coef_x0", "dpmpp_coef_x0_prev"):
        assert np.array_equal(packed[:, COLUMNS.index(name)].numpy(), getattr(tab, name))


def test_every_sampler_default_builds_its_tables():
    betas = make_betas("linear", 1000)
    for sampler in SAMPLERS:
        for T in (1000, 20, 2):
            steps = default_steps(sampler, T)
            tab = Tables.build(betas[:T], steps, timestep_spacing(sampler))
            assert tab.steps == steps and np.all(np.diff(tab.timesteps) > 0), (sampler, T)
            assert np.isfinite(tab.on("cpu").packed.numpy()).all()


def test_scheduler_config_reads_use_clipped_model_output():
    assert SchedulerConfig().use_clipped_model_output is False
    cfg = SchedulerConfig.from_dict({"clip_sample": True, "use_clipped_model_output": True, "_class_name": "X"})
    assert cfg.use_clipped_model_output is True
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
