"""Coefficient tables against independent closed forms (plain Python floats, no numpy)."""

import math
import random

import numpy as np
import pytest
import torch

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.samplers import SAMPLERS, default_steps, timestep_spacing
from ddpm_engine.schedules import (COLUMNS, SchedulerConfig, Tables, alphas_cumprod, cosine_betas, kept_schedule,
                                   linear_betas, make_betas, spaced_timesteps)


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
    with pytest.raises(InvalidRequestError, match="unknown variance type"):
        SchedulerConfig(variance_type="learned_log")
    for learned in ("learned", "learned_range"):  # a model that outputs its variance: served (samplers.ddpm_step)
        assert SchedulerConfig.from_dict(SchedulerConfig(variance_type=learned).to_dict()).variance_type == learned


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


# ---- timestep spacings: diffusers' grids, Karras and log-SNR sigmas, steps_offset ----

def diffusers_schedule(cls_name, T, steps, **config):
    """diffusers' kept timesteps (ascending) and sigmas (descending, then the final 0) of ``steps``
    steps, its scheduler on the float64 alpha-bars (its own are a float32 product, whose 1 - abar
    near t = 0 is off by ~1e-4 relative: that would be measured instead of the spacing)."""
    diffusers = pytest.importorskip("diffusers")
    ref = getattr(diffusers, cls_name)(num_train_timesteps=T, **config)
    ref.alphas_cumprod = torch.from_numpy(alphas_cumprod(ref.betas.double().numpy()))
    ref.set_timesteps(steps)
    return ref.timesteps.numpy()[::-1], getattr(ref, "sigmas", None)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("cls_name, multistep", [("DDPMScheduler", False), ("DDIMScheduler", False),
                                                 ("DPMSolverMultistepScheduler", True),
                                                 ("UniPCMultistepScheduler", True)])
def test_timestep_spacings_match_diffusers(seeded, spacing, cls_name, multistep):
    """Each of diffusers' timestep_spacing values, with steps_offset where "leading" adds it, on the
    DDPM/DDIM grid or the multistep schedulers' (steps + 1 points, the lowest dropped)."""
    for T in (1000, 37):
        offset = random.choice([0, 1])
        top = T - 1 if multistep else T
        for steps in {1, 2, 10, top - offset if spacing == "leading" else top, random.randrange(3, top)}:
            if spacing == "leading" and (steps - 1) * (T // (steps + multistep)) + multistep * (T // (steps + 1)) \
                    + offset > T - 1:
                continue  # the offset pushes the last one past T - 1: refused below
            want, _ = diffusers_schedule(cls_name, T, steps, timestep_spacing=spacing, steps_offset=offset)
            if spacing == "trailing" and len(want) == steps + 1:  # diffusers' extra t = -1 (test below)
                assert want[0] == -1
                want = want[1:]
            got = spaced_timesteps(T, steps, spacing, multistep=multistep, steps_offset=offset)
            assert np.array_equal(got, want), (T, steps, offset)
            assert len(got) == steps and np.all(np.diff(got) > 0) and 0 <= got[0] and got[-1] <= T - 1
    with pytest.raises(InvalidRequestError, match="steps_offset=1"):
        spaced_timesteps(1000, 1000, "leading", multistep=False, steps_offset=1)


def test_trailing_keeps_exactly_steps_where_diffusers_keeps_one_more():
    """diffusers' arange(T, 0, -T / steps) gives steps + 1 entries for some counts (61 of 1000: the
    last is t = -1); the kept timesteps are its first ``steps``."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    assert np.array_equal(spaced_timesteps(1000, 61, "trailing"), ref.timesteps.numpy()[:-1][::-1])


@pytest.mark.parametrize("spacing, cls_name, option", [("karras", "DPMSolverMultistepScheduler", "use_karras_sigmas"),
                                                      ("karras", "UniPCMultistepScheduler", "use_karras_sigmas"),
                                                      ("logsnr", "DPMSolverMultistepScheduler", "use_lu_lambdas")])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_sigma_grids_match_diffusers(seeded, spacing, cls_name, option, schedule):
    """Karras sigmas and uniform log-SNR: the model sees diffusers' rounded timesteps, the step math
    uses its exact sigmas (diffusers stores them in float32: 1e-6 relative)."""
    betas = make_betas(schedule, 1000, 1e-4 if schedule == "linear" else 0.00085, 0.02 if schedule == "linear" else 0.012)
    for steps in (1, 5, 10, random.randrange(2, 60)):
        timesteps, abar = kept_schedule(alphas_cumprod(betas), steps, spacing)
        want_t, want_sigmas = diffusers_schedule(cls_name, 1000, steps, trained_betas=list(betas), **{option: True})
        assert np.array_equal(timesteps, want_t), steps
        np.testing.assert_allclose(np.sqrt((1 - abar) / abar)[::-1], want_sigmas.numpy()[:-1], rtol=2e-6)
        assert want_sigmas[-1] == 0  # the final step goes to sigma = 0, as ours does from i = 0
        tab = Tables.build(betas, steps, spacing)
        assert np.array_equal(tab.timesteps, timesteps) and np.array_equal(tab.alphas_cumprod, abar)
        assert np.isfinite(tab.on("cpu").packed.numpy()).all()


def test_sigma_grids_closed_forms():
    """Karras et al. 2022 eq. 5 (rho = 7) between the training sigmas' ends, and uniform in log sigma;
    DDIM steps to the next kept alpha-bar on them (diffusers has no DDIM there)."""
    abar_train = alphas_cumprod(linear_betas(1000))
    sig = np.sqrt((1 - abar_train) / abar_train)
    steps = 7
    _, abar = kept_schedule(abar_train, steps, "karras")
    k = np.arange(steps)[::-1]  # ascending index i holds ramp position steps - 1 - i
    want = (sig[-1] ** (1 / 7) + k / (steps - 1) * (sig[0] ** (1 / 7) - sig[-1] ** (1 / 7))) ** 7
    np.testing.assert_allclose(np.sqrt((1 - abar) / abar), want, rtol=1e-12)
    _, abar = kept_schedule(abar_train, steps, "logsnr")
    log_snr = np.log(abar / (1 - abar))
    np.testing.assert_allclose(np.diff(log_snr), np.full(steps - 1, -(log_snr[0] - log_snr[-1]) / (steps - 1)))
    assert log_snr[0] == pytest.approx(np.log(abar_train[0] / (1 - abar_train[0])))
    tab = Tables.build(linear_betas(1000), steps, "karras")
    assert np.array_equal(tab.ddim_alphas_cumprod_prev, np.append(1.0, tab.alphas_cumprod[:-1]))


def test_ddim_steps_back_t_minus_T_over_steps_as_diffusers_does():
    """diffusers' DDIMScheduler.step goes to alpha-bar at t - T // steps (below 0: 1, or alpha-bar at
    t = 0 without set_alpha_to_one) whatever the spacing kept: with linspace that is not the next
    kept timestep, and it is matched."""
    betas = linear_betas(1000)
    abar = alphas_cumprod(betas)
    tab = Tables.build(betas, 10, "linspace", multistep=False, set_alpha_to_one=False)
    assert list(tab.timesteps[-2:]) == [888, 999]
    assert tab.ddim_alphas_cumprod_prev[-1] == abar[899] and tab.ddim_alphas_cumprod_prev[0] == abar[0]
    lead = Tables.build(betas, 10, "leading", multistep=False, steps_offset=1)
    assert list(lead.timesteps[:2]) == [1, 101] and lead.ddim_alphas_cumprod_prev[1] == abar[1]
    assert lead.ddim_alphas_cumprod_prev[0] == 1.0


def test_zero_terminal_snr_matches_diffusers_and_the_multistep_floor():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as theirs

    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        cfg = SchedulerConfig(beta_schedule=schedule, rescale_betas_zero_snr=True, prediction_type="v_prediction")
        betas = cfg.betas()
        want = theirs(torch.from_numpy(make_betas(schedule, 1000)))  # float64 in, float64 out
        np.testing.assert_allclose(betas, want.numpy(), rtol=1e-10, atol=1e-12)
        assert betas[-1] == 1.0 and cfg.alphas_cumprod()[-1] == 0.0
        assert cfg.alphas_cumprod()[0] == pytest.approx(alphas_cumprod(make_betas(schedule, 1000))[0])
    ddpm = Tables.build(betas, 10, "trailing", multistep=False)
    assert ddpm.alphas_cumprod[-1] == 0.0 and ddpm.posterior_mean_coef2[-1] == 0.0  # x_t has no weight there
    assert np.isfinite(ddpm.posterior_log_variance_clipped).all() and np.isfinite(ddpm.posterior_mean_coef1).all()
    multi = Tables.build(betas, 10, "trailing", multistep=True)
    assert multi.alphas_cumprod[-1] == 2.0**-24  # diffusers' DPM-Solver / UniPC stand-in
    assert np.isfinite(multi.on("cpu").packed.numpy()).all()


# ---- scheduler config keys: every one honoured or refused ----

@pytest.mark.parametrize("cls_name", ["DDPMScheduler", "DDIMScheduler"])
def test_every_key_of_diffusers_ddpm_and_ddim_configs_is_read(cls_name):
    diffusers = pytest.importorskip("diffusers")
    config = dict(getattr(diffusers, cls_name)(timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True,
                                               prediction_type="v_prediction").config)
    config["_class_name"], config["_diffusers_version"] = cls_name, diffusers.__version__
    cfg = SchedulerConfig.from_dict(config)
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.rescale_betas_zero_snr) == ("trailing", 1, True)
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
    for key, value, what in [("thresholding", True, "dynamic thresholding"), ("clip_sample_range", 2.0, "clip range"),
                             ("timestep_spacing", "karras", "timestep_spacing"), ("steps_offset", -1, "steps_offset"),
                             ("rescale_betas_zero_snr", "yes", "rescale_betas_zero_snr")]:
        with pytest.raises(InvalidRequestError, match=what):
            SchedulerConfig.from_dict({**config, key: value})


def test_other_schedulers_keys_are_refused_by_name():
    diffusers = pytest.importorskip("diffusers")
    config = dict(diffusers.DPMSolverMultistepScheduler().config)
    with pytest.raises(InvalidRequestError, match="'solver_order'") as err:
        SchedulerConfig.from_dict(config)
    assert "use_karras_sigmas" in str(err.value) and "spacing" in str(err.value)
    with pytest.raises(InvalidRequestError, match=r"\['skip_prk_steps'\]"):
        SchedulerConfig.from_dict({"skip_prk_steps": True, "set_alpha_to_one": False})
    assert SchedulerConfig.from_dict({"variance_type": None}).variance_type == "fixed_small"  # DPM-Solver's null


def test_saved_configs_without_the_new_keys_still_load():
    old = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
           "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
           "use_clipped_model_output": False}
    cfg = SchedulerConfig.from_dict(old)
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.rescale_betas_zero_snr, cfg.set_alpha_to_one) == \
        (None, 0, False, True)
