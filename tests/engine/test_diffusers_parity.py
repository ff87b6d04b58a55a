"""The engine against diffusers' own scheduler loops, end to end: a model saved as diffusers saves
it, loaded into the engine, sampled from the same x_T, gives diffusers' images. DDIM with x0
clipping (both values of ``use_clipped_model_output``, and the scheduler config's default),
DPM-Solver++(2M) and UniPC for each prediction type, SDE-DPM-Solver++(2M) given the same noise, and
DDPM with a learned variance (a 2C-channel UNet) given the same noise."""

import random

import numpy as np
import pytest
import torch

from ddpm_engine import Engine
from ddpm_engine.backends.torch_backend import TorchBackend
from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.noise import SDE_STEP, philox_normal, seed_words
from ddpm_engine.samplers import ROW_STATE, sampler_def

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 8, 8)
# An untrained network's chain is chaotic: diffusers' float32 cumprod of the alphas (ours is float64)
# differs by ~1e-7 and grows along the chain, to ~3e-4 after 20 DDIM steps and ~0.1 after 50 here.
# Ten steps keep that below 1e-4 while x0 clipping still changes the images completely.
STEPS = 10


def save_pipeline(folder, out_channels=1, **scheduler):
    """A random UNet2DModel (1 input channel; 2 output channels for a learned variance) and the
    DDPMScheduler of ``scheduler``, saved as diffusers' DDPMPipeline saves them."""
    torch.manual_seed(random.getrandbits(31))
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8).eval()
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler)).save_pretrained(folder)
    return unet


@torch.inference_mode()
def diffusers_loop(unet, scheduler, x, steps, **step_kw):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = unet(x, t.expand(x.shape[0])).sample
        x = scheduler.step(out, t, x, **step_kw).prev_sample
    return x.clamp(-1, 1)


def nchw(engine):
    """``engine`` with its torch backend in NCHW, as diffusers runs its UNet: both sides then call
    the same convolution kernels and the comparison is of the step rule alone (the CPU layout the
    backend measures, channels_last, differs by ~1e-7 per call, and chaotic untrained chains grow
    that past the tolerance)."""
    engine.backend = TorchBackend(engine.model.module, engine.device)
    return engine


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clipped")
    unet = save_pipeline(folder, clip_sample=True)
    engine = nchw(Engine.from_pretrained(folder, backend="torch", batching=False))
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    # diffusers takes the cumulative product of the alphas in float32, the engine in float64; give
    # diffusers the float64 product rounded once, so the comparison is of the step rule alone
    # (untrained chains are chaotic and would grow the ~1e-7 difference past the tolerance)
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - engine.scheduler.betas())).float()
    return unet, scheduler, engine


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("use_clipped", [None, False, True])
def test_ddim_with_clipping_gives_diffusers_images(clipped, use_clipped, eta):
    """None: the scheduler config's default (False, as in diffusers' DDIMPipeline). At every kept
    timestep both sides step from the same x_t with the same noise (the engine's stream, passed to
    diffusers as ``variance_noise``); with eta = 0 the whole chain is compared too."""
    unet, scheduler, engine = clipped
    seeds = [random.getrandbits(64) for _ in range(3)]
    x_T = torch.randn(3, *SHAPE)
    opts = dict(sampler="ddim", steps=STEPS, eta=eta, x_T=x_T)
    if use_clipped is not None:
        opts["use_clipped_model_output"] = use_clipped
    if eta == 0.0:  # the whole chain: engine.sample against diffusers' loop
        ours = engine.sample(seeds, **opts)
        theirs = diffusers_loop(unet, scheduler, x_T.clone(), STEPS, eta=0.0,
                                use_clipped_model_output=bool(use_clipped))
        # the two step rules round differently (~1e-7 per step) and this untrained chain amplifies
        # that: up to 1.3e-4 after 10 steps (Xeon with AMX, torch 2.13); the rule itself is held
        # to 1e-5 per step below
        assert (ours - theirs).abs().max().item() <= 5e-4
    # every kept timestep: one step from the same x_t (with the same noise where eta = 1)
    plan = engine.plan(**{k: v for k, v in opts.items() if k != "x_T"})
    scheduler.set_timesteps(STEPS)
    x = x_T.clone()
    words = seed_words(seeds)
    rows = plan.start(seeds, x.clone())
    with torch.inference_mode():
        for t in scheduler.timesteps:
            noise = philox_normal(words, rows.i, x[0].numel()).reshape(x.shape)
            out = unet(rows.x, t.expand(3)).sample
            want = scheduler.step(out, t, rows.x, eta=eta, use_clipped_model_output=bool(use_clipped),
                                  variance_noise=noise).prev_sample
            plan.step(rows, out)
            assert (rows.x - want).abs().max().item() <= 1e-5, int(t)


def test_clipping_really_happens_and_the_option_matters(clipped):
    unet, scheduler, engine = clipped
    x_T = torch.randn(2, *SHAPE)
    a = engine.sample([1, 2], sampler="ddim", steps=STEPS, x_T=x_T, use_clipped_model_output=False)
    b = engine.sample([1, 2], sampler="ddim", steps=STEPS, x_T=x_T, use_clipped_model_output=True)
    assert (a - b).abs().max().item() > 1e-2  # x0 was clipped: the two rules give other images


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_gives_diffusers_images(tmp_path, prediction, steps):
    unet = save_pipeline(tmp_path, prediction_type=prediction, clip_sample=True)  # DPM-Solver ignores clip_sample
    engine = nchw(Engine.from_pretrained(tmp_path, backend="torch", batching=False))
    # diffusers' DPMSolverMultistepScheduler with its own defaults (linspace spacing, ...) on the model's betas
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                      prediction_type=prediction)
    x_T = torch.randn(2, *SHAPE)
    ours = engine.sample([5, 6], sampler="dpmpp_2m", steps=steps, x_T=x_T)
    theirs = diffusers_loop(unet, scheduler, x_T.clone(), steps)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def pipeline_for(tmp_path_factory):
    """A saved diffusers pipeline and the engine on it, one per prediction type, made on first use."""
    made = {}

    def get(prediction):
        if prediction not in made:
            folder = tmp_path_factory.mktemp(prediction)
            unet = save_pipeline(folder, prediction_type=prediction)
            made[prediction] = unet, nchw(Engine.from_pretrained(folder, backend="torch", batching=False))
        return made[prediction]
    return get


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_unipc_gives_diffusers_images(pipeline_for, prediction):
    """UniPCMultistepScheduler with its defaults (order 2, bh2, predict_x0, lower_order_final) at
    5, 10 and 20 steps."""
    unet, engine = pipeline_for(prediction)
    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                  prediction_type=prediction)
    for steps in (5, 10, 20):
        x_T = torch.randn(2, *SHAPE)
        ours = engine.sample([5, 6], sampler="unipc", steps=steps, x_T=x_T)
        theirs = diffusers_loop(unet, scheduler, x_T.clone(), steps)
        assert (ours - theirs).abs().max().item() <= 1e-4, steps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpmpp_2m_sde_gives_diffusers_images_given_the_same_noise(pipeline_for, prediction):
    """DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") given, as variance_noise, the noise
    the engine draws: each seed's Philox stream at step counter SDE_STEP + i (i: the step index)."""
    steps = 10
    unet, engine = pipeline_for(prediction)
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                      prediction_type=prediction, algorithm_type="sde-dpmsolver++")
    seeds = [random.getrandbits(64) for _ in range(3)]
    x_T = torch.randn(3, *SHAPE)
    ours = engine.sample(seeds, sampler="dpmpp_2m_sde", steps=steps, x_T=x_T)
    words, x = seed_words(seeds), x_T.clone()
    scheduler.set_timesteps(steps)
    with torch.inference_mode():
        for k, t in enumerate(scheduler.timesteps):
            noise = philox_normal(words, SDE_STEP + steps - 1 - k, x[0].numel()).reshape(x.shape)
            x = scheduler.step(unet(x, t.expand(3)).sample, t, x, variance_noise=noise).prev_sample
    assert (ours - x.clamp(-1, 1)).abs().max().item() <= 1e-4
    # the noise matters: other seeds' noise from the same x_T gives other images
    other = engine.sample([s ^ 1 for s in seeds], sampler="dpmpp_2m_sde", steps=steps, x_T=x_T)
    assert (other - ours).abs().max().item() > 1e-2


@pytest.mark.parametrize("sampler", sorted(ROW_STATE))
def test_multistep_rows_join_mid_run_and_graph_buckets(clipped, sampler):
    """Each sample's multistep state rides in its rows: a server batch that rows join mid-run (each
    starting with its own first-order step), and the graph sampler's padded buckets (without
    capture), give each seed its lone image."""
    _, _, engine = clipped
    seeds = [random.getrandbits(64) for _ in range(5)]
    alone = torch.cat([engine.sample([s], sampler=sampler, steps=15) for s in seeds])
    graphed = engine.graphed(sampler, 15, max_batch=4, capture=False).run(seeds)
    assert (graphed - alone).abs().max().item() <= 1e-4  # batch-size rounding, grown along an untrained chain
    with engine.serve(mode="continuous", max_batch=8, max_wait_ms=0) as server:
        first = server.submit(seeds[:2], sampler=sampler, steps=15)
        late = [server.submit([s], sampler=sampler, steps=15) for s in seeds[2:]]
        got = torch.cat([first.result(60)] + [f.result(60) for f in late])
    assert (got - alone).abs().max().item() <= 1e-4


@pytest.mark.parametrize("sampler", ["unipc", "dpmpp_2m_sde"])
def test_more_steps_than_the_spacing_allows_are_refused(clipped, sampler):
    """linspace spacing keeps at most T - 1 timesteps; the error states the limit, and the engine
    keeps working after it."""
    _, _, engine = clipped
    with pytest.raises(InvalidRequestError, match="at most T - 1 = 999"):
        engine.sample([1], sampler=sampler, steps=1000)
    assert engine.sample([1], sampler=sampler, steps=2).shape == (1, *SHAPE)


class PositiveVariance(torch.nn.Module):
    """A UNet with 2C outputs as a "learned" model (diffusers: the variance itself) needs them:
    [its prediction, a small positive variance]."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        out = self.unet(x, t).sample
        C = x.shape[1]
        return torch.cat([out[:, :C], 0.02 * torch.sigmoid(out[:, C:])], 1)


def ddpm_loop_with_noise(model, scheduler, x, words, monkeypatch):
    """diffusers' DDPM loop, its variance noise (``randn_tensor`` in its step) replaced by the
    engine's: each seed's Philox stream at step counter i, the step index (steps - 1 down to 0)."""
    from diffusers.schedulers import scheduling_ddpm

    i = [len(scheduler.timesteps)]

    def engine_noise(shape, generator=None, device=None, dtype=None):
        return philox_normal(words, torch.full((len(words),), i[0]), x[0].numel()).reshape(shape).to(dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", engine_noise)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            i[0] -= 1
            x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance", ["learned_range", "learned"])
def test_learned_variance_ddpm_gives_diffusers_images_given_the_same_noise(tmp_path, monkeypatch, variance,
                                                                           prediction):
    """A 2C-output UNet2DModel saved with DDPMScheduler(variance_type=...): the engine's DDPM chain
    (respaced to 10 steps) against diffusers' DDPMScheduler loop with the engine's noise, from the
    same x_T. "learned_range" loads the saved folder as is; "learned" (the variance itself) wraps
    the UNet so its variance is positive, on both sides."""
    unet = save_pipeline(tmp_path, out_channels=2, variance_type=variance, prediction_type=prediction,
                         clip_sample=True)
    if variance == "learned_range":
        engine = nchw(Engine.from_pretrained(tmp_path, backend="torch", batching=False))
        model = lambda x, t: unet(x, t).sample  # noqa: E731
    else:
        model = PositiveVariance(unet).eval()
        engine = Engine.from_module(model, scheduler=diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler")
                                    .config, sample_shape=SHAPE, backend="torch", batching=False)
        engine = nchw(engine)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - engine.scheduler.betas())).float()
    scheduler.set_timesteps(STEPS)
    seeds = [random.getrandbits(64) for _ in range(3)]
    x_T = torch.randn(3, *SHAPE)
    ours = engine.sample(seeds, sampler="ddpm", steps=STEPS, x_T=x_T)
    theirs = ddpm_loop_with_noise(model, scheduler, x_T.clone(), seed_words(seeds), monkeypatch)
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max().item() <= 1e-4  # measured up to 1.7e-5 (Xeon with AMX, torch 2.13)
    # the learned variance matters: the same noise scaled by the fixed variance gives other images
    fixed = diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler", variance_type="fixed_small")
    fixed.alphas_cumprod = scheduler.alphas_cumprod
    fixed.set_timesteps(STEPS)
    first_c = lambda x, t: model(x, t)[:, :1]  # noqa: E731
    assert (ddpm_loop_with_noise(first_c, fixed, x_T.clone(), seed_words(seeds), monkeypatch) - ours).abs().max() > 1e-2


# ---- timestep spacings (issue 33.2) and the scheduler config's keys (issue 30.5) ----------------
# Each spacing diffusers has, per sampler: step by step (both sides step from diffusers' x with the
# same noise, so the multistep state is the same too) within 1e-5, and the whole chain within 1e-4.
PEERS = {  # sampler -> (diffusers scheduler, its options, the spacings it has)
    "ddpm": ("DDPMScheduler", {}, ("leading", "linspace", "trailing")),
    "ddim": ("DDIMScheduler", {"eta": 1.0}, ("leading", "linspace", "trailing")),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, ("leading", "linspace", "trailing", "karras", "logsnr")),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {}, ("leading", "trailing", "karras", "logsnr")),
    "unipc": ("UniPCMultistepScheduler", {}, ("leading", "linspace", "trailing", "karras")),
}
SPACING_OPTION = {"karras": {"use_karras_sigmas": True}, "logsnr": {"use_lu_lambdas": True}}


def peer(sampler, engine, spacing=None, folder=None, **config):
    """diffusers' scheduler of ``sampler``: from the saved folder's config (as a pipeline swaps
    schedulers) or with the engine's betas, on the engine's float64 alpha-bars (diffusers' own
    float32 product differs by ~1e-7, its 1 - abar near t = 0 by ~1e-4 relative, and an untrained
    chain grows that), with a zero terminal SNR's 2^-24 where diffusers' multistep schedulers put it."""
    cls = getattr(diffusers, PEERS[sampler][0])
    if sampler == "dpmpp_2m_sde":
        config["algorithm_type"] = "sde-dpmsolver++"
    if spacing is not None:
        config.update(SPACING_OPTION.get(spacing, {"timestep_spacing": spacing}))
    if folder is not None:
        scheduler = cls.from_pretrained(folder / "scheduler", **config)
    else:
        scheduler = cls(num_train_timesteps=1000, beta_schedule="linear",
                        prediction_type=engine.scheduler.prediction_type, **config)
    abar = engine.scheduler.alphas_cumprod()
    if "Multistep" in cls.__name__ and abar[-1] == 0:
        abar[-1] = 2.0**-24
    scheduler.alphas_cumprod = torch.from_numpy(abar)
    if hasattr(scheduler, "final_alpha_cumprod") and not scheduler.config.set_alpha_to_one:
        scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    return scheduler


@torch.inference_mode()
def lockstep(engine, unet, scheduler, sampler, spacing, steps, monkeypatch, **options):
    """Every step from diffusers' x with the same noise: the engine's step is held to diffusers' to
    1e-5 (relative where |x| > 1); returns the number of steps diffusers took. ``options``: the
    step's (DDIM's eta), over PEERS'."""
    options = {**PEERS[sampler][1], **options}
    plan = engine.plan(sampler, steps, eta=options.get("eta", 0.0), spacing=spacing,
                       use_clipped_model_output=options.get("use_clipped_model_output"))
    seeds = [random.getrandbits(64) for _ in range(3)]
    words, x = seed_words(seeds), torch.randn(3, *SHAPE)
    rows = plan.start(seeds, x.clone())
    scheduler.set_timesteps(steps)
    assert np.array_equal(scheduler.timesteps.numpy(), plan.tables.timesteps[::-1]), plan.name
    if plan.spacing in SPACING_OPTION:  # diffusers' sigmas in float64 (they are ours to 2e-6: test_schedules)
        abar = plan.tables.alphas_cumprod
        sigmas = np.append(np.sqrt((1 - abar) / abar)[::-1], 0.0)
        torch.testing.assert_close(scheduler.sigmas, torch.from_numpy(sigmas).float(), rtol=2e-6, atol=0)
        scheduler.sigmas = torch.from_numpy(sigmas)
    counter = plan.spec.definition.noise
    for t in scheduler.timesteps:
        noise = philox_normal(words, counter + rows.i, x[0].numel()).reshape(x.shape) if counter is not None else None
        out = unet(x, t.expand(3)).sample
        kw = dict(options)
        if noise is not None and sampler != "ddpm":
            kw["variance_noise"] = noise
        monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: noise)
        want = scheduler.step(out, t, x, **kw).prev_sample
        rows.x.copy_(x)
        plan.step(rows, out)
        # relative: an untrained network's x grows to ~100 along a chain, where float32 rounds at ~1e-5
        torch.testing.assert_close(rows.x, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{plan.name}, t = {int(t)}: {m}")
        x = want
    return len(scheduler.timesteps)


def spacing_cases():
    return [(s, sp) for s, (_, _, spacings) in PEERS.items() for sp in spacings]


@pytest.mark.parametrize("sampler, spacing", spacing_cases())
def test_every_spacing_steps_as_diffusers(pipeline_for, monkeypatch, sampler, spacing):
    unet, engine = pipeline_for("epsilon")
    assert lockstep(engine, unet, peer(sampler, engine, spacing), sampler, spacing, STEPS, monkeypatch) == STEPS
    name = engine.plan(sampler, STEPS, spacing=spacing).name  # names the spacing where it is not the sampler's own
    assert name.startswith(f"{sampler}-{STEPS}") and (f" {spacing}" in name) == (spacing != sampler_def(sampler).spacing)


@pytest.mark.parametrize("sampler, spacing", [("ddim", "trailing"), ("dpmpp_2m", "karras"), ("dpmpp_2m", "logsnr"),
                                              ("unipc", "karras"), ("unipc", "trailing")])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_spacings_give_diffusers_images(pipeline_for, sampler, spacing, prediction):
    """Whole chains: engine.sample against diffusers' loop from the same x_T (deterministic samplers)."""
    unet, engine = pipeline_for(prediction)
    x_T = torch.randn(2, *SHAPE)
    ours = engine.sample([5, 6], sampler=sampler, steps=STEPS, spacing=spacing, x_T=x_T)
    theirs = diffusers_loop(unet, peer(sampler, engine, spacing), x_T.clone(), STEPS, eta=0.0) if sampler == "ddim" \
        else diffusers_loop(unet, peer(sampler, engine, spacing), x_T.clone(), STEPS)
    # 3e-4, float32's floor for these untrained chains: over 12 seeds (Xeon with AMX, torch 2.13)
    # ddim-trailing-epsilon differed by 1.3e-5..5.8e-5 (one seed 1.18e-4), while diffusers' own
    # images moved by 2.2e-5..1.0e-4 when x_T was scaled by one ulp (1 + 2**-23)
    assert (ours - theirs).abs().max().item() <= 3e-4


def test_a_spacing_a_sampler_does_not_take_is_refused_with_the_ones_it_does(pipeline_for):
    _, engine = pipeline_for("epsilon")
    with pytest.raises(InvalidRequestError, match="ddpm sampler takes spacing 'leading' / 'linspace' / 'trailing'"):
        engine.sample([1], sampler="ddpm", steps=5, spacing="karras")
    with pytest.raises(InvalidRequestError, match="'karras' / 'logsnr'"):
        engine.plan("unipc", spacing="uniform")
    a, b = engine.plan("dpmpp_2m", 5), engine.plan("dpmpp_2m", 5, spacing="karras")
    assert a is engine.plan("dpmpp_2m", 5, spacing="linspace") and a.key != b.key
    assert (a.name, b.name) == ("dpmpp_2m-5", "dpmpp_2m-5 karras")
    assert engine.tables(5, "dpmpp_2m", "karras") is b.tables


@pytest.fixture(scope="module")
def zero_snr(tmp_path_factory):
    """A v-prediction model whose pipeline holds a DDIMScheduler config with a zero terminal SNR,
    trailing timesteps, steps_offset 1 and set_alpha_to_one false (Lin et al. 2024's recipe)."""
    folder = tmp_path_factory.mktemp("zero_snr")
    torch.manual_seed(random.getrandbits(31))
    unet = save_pipeline(folder / "unused")
    scheduler = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=1,
                                        set_alpha_to_one=False, prediction_type="v_prediction", clip_sample=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder, unet, nchw(Engine.from_pretrained(folder, backend="torch", batching=False))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "unipc"])
@pytest.mark.parametrize("spacing", [None, "leading"])
def test_scheduler_config_keys_run_as_in_diffusers(zero_snr, monkeypatch, sampler, spacing):
    """rescale_betas_zero_snr (alpha-bar 0 at t = 999: DDPM and DDIM step from it with the v
    prediction, DPM-Solver++ and UniPC take 2^-24 there), timestep_spacing (the default of DDPM and
    DDIM, as their diffusers schedulers read it; the multistep samplers keep linspace), steps_offset
    (added to leading timesteps) and set_alpha_to_one, against diffusers' schedulers made from the
    same saved config."""
    folder, unet, engine = zero_snr
    assert engine.scheduler.alphas_cumprod()[-1] == 0.0
    if sampler in ("ddpm", "ddim") and spacing is None:
        assert engine.plan(sampler, STEPS).spacing == "trailing" and engine.plan(sampler, STEPS).tables.timesteps[-1] == 999
    chosen = spacing if spacing is not None else ("trailing" if sampler in ("ddpm", "ddim") else "linspace")
    scheduler = peer(sampler, engine, chosen, folder=folder)
    assert lockstep(engine, unet, scheduler, sampler, spacing, STEPS, monkeypatch) == STEPS
    if spacing == "leading" and sampler in ("ddpm", "ddim"):
        assert engine.plan(sampler, STEPS, spacing=spacing).tables.timesteps[0] == 1  # steps_offset


def test_zero_snr_with_an_epsilon_model_is_refused_where_x0_is_undefined(zero_snr):
    folder, _, engine = zero_snr
    eps = Engine.from_module(engine.model.module, scheduler={**engine.scheduler.to_dict(), "prediction_type": "epsilon"},
                             sample_shape=SHAPE, backend="torch")
    with pytest.raises(InvalidRequestError, match="alpha-bar 0 and an epsilon prediction"):
        eps.sample([1], sampler="ddim", steps=5)  # trailing: starts at t = 999
    eps.sample([1], sampler="ddim", steps=5, spacing="leading")  # never reaches t = 999
    eps.sample([1], sampler="dpmpp_2m", steps=5, spacing="trailing")  # 2^-24 there


def test_a_diffusers_folder_with_thresholding_or_another_schedulers_keys_is_refused_at_load(tmp_path):
    """Every key of the scheduler config is honoured or refused by name (SchedulerConfig.from_dict)."""
    import json

    from ddpm_engine.errors import ModelLoadError

    save_pipeline(tmp_path)
    path = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    for extra, match in [({"thresholding": True}, "dynamic thresholding"), ({"solver_order": 3}, "'solver_order'")]:
        path.write_text(json.dumps({**config, **extra}))
        with pytest.raises(ModelLoadError, match=match):
            Engine.from_pretrained(tmp_path, backend="torch")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m_sde", "unipc"])
def test_the_fused_steps_take_every_spacing_and_a_zero_terminal_snr(zero_snr, sampler):
    """The Triton steps (in the interpreter here) read the same tables: every spacing the sampler
    takes, with alpha-bar 0 (or 2^-24) at t = 999 and the inf epsilon columns beside it, gives the
    torch step's images."""
    folder, _, engine = zero_snr
    fused = nchw(Engine.from_pretrained(folder, backend="torch", batching=False, step_impl="triton"))
    for spacing in sampler_def(sampler).spacings:
        seeds, x_T = [random.getrandbits(64) for _ in range(2)], torch.randn(2, *SHAPE)
        opts = dict(sampler=sampler, steps=5, spacing=spacing, eta=1.0 if sampler == "ddim" else 0.0, x_T=x_T)
        ours, theirs = fused.sample(seeds, **opts), engine.sample(seeds, **opts)
        assert torch.isfinite(ours).all() and (ours - theirs).abs().max().item() <= 1e-4, spacing


@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_from_alpha_bar_zero_with_clipping_and_noise_is_diffusers(zero_snr, monkeypatch, use_clipped):
    """DDIM's first step from alpha-bar 0 (zero terminal SNR, trailing) with eta = 1 and x0 clipping:
    its direction coefficient is exactly 0 there and eps from the clipped x0 is x_t, as diffusers."""
    folder, unet, engine = zero_snr
    clipping = nchw(Engine.from_module(engine.model.module, scheduler={**engine.scheduler.to_dict(), "clip_sample": True},
                                       sample_shape=SHAPE, backend="torch", batching=False))
    scheduler = peer("ddim", clipping, "trailing", folder=folder, clip_sample=True)
    assert lockstep(clipping, unet, scheduler, "ddim", None, STEPS, monkeypatch, eta=1.0,
                    use_clipped_model_output=use_clipped) == STEPS
def diffusers_steps(unet, scheduler, x, steps):
    """diffusers' loop, every x_t on the way (its last, unclamped)."""
    scheduler.set_timesteps(steps)
    xs = []
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t.expand(x.shape[0])).sample, t, x).prev_sample
            xs.append(x)
    return xs


def engine_steps(engine, sampler, steps, x_T):
    """The engine's plan stepped by hand from x_T: every x_t on the way."""
    plan = engine.plan(sampler, steps)
    rows, xs = plan.start(list(range(len(x_T))), x_T.clone()), []
    with torch.inference_mode():
        for t in plan.tables.timesteps[::-1]:
            plan.step(rows, engine.model.module(rows.x, torch.full((len(x_T),), int(t))))
            xs.append(rows.x.clone())
    return xs


THIRD_ORDER = {"dpmpp_3m": lambda **kw: diffusers.DPMSolverMultistepScheduler(solver_order=3, **kw),
               "unipc_3": lambda **kw: diffusers.UniPCMultistepScheduler(solver_order=3, **kw)}


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler", sorted(THIRD_ORDER))
def test_third_order_solvers_give_diffusers_images_step_by_step(pipeline_for, sampler, prediction):
    """DPMSolverMultistepScheduler / UniPCMultistepScheduler(solver_order=3) with their other
    defaults (lower_order_final: below 15 steps the last two steps are lowered, UniPC's always),
    from the same x_T: every x_t of the chain, the last one the image before clamping, within 1e-5
    relative to its scale where that is over 1 (an untrained network's x_t reach ~300, where an
    fp32 ulp is 3e-5, so a clamped image's pixel inside [-1, 1] can carry an absolute 1e-5 too)
    at 3, 5, 8 and 10 steps (orders 1, 2, 3 and the lowered ends all reached). diffusers is given
    the float64 alpha-bars rounded once, so that the comparison is of the step rule alone."""
    unet, engine = pipeline_for(prediction)
    for steps in (3, 5, 8, 10):
        scheduler = THIRD_ORDER[sampler](num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction)
        scheduler.alphas_cumprod = torch.from_numpy(engine.scheduler.alphas_cumprod()).float()
        x_T = torch.randn(2, *SHAPE)
        theirs = diffusers_steps(unet, scheduler, x_T.clone(), steps)
        ours = engine_steps(engine, sampler, steps, x_T)
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), (steps, k)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler", sorted(THIRD_ORDER))
def test_third_order_solvers_give_diffusers_images_whole_chain(pipeline_for, sampler, prediction):
    """engine.sample against diffusers' own loop with its own float32 tables, 15 and 20 steps (no
    lowered second to last step for DPM-Solver++ there)."""
    unet, engine = pipeline_for(prediction)
    scheduler = THIRD_ORDER[sampler](num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction)
    for steps in (15, 20):
        x_T = torch.randn(2, *SHAPE)
        ours = engine.sample([5, 6], sampler=sampler, steps=steps, x_T=x_T)
        theirs = diffusers_loop(unet, scheduler, x_T.clone(), steps)
        assert (ours - theirs).abs().max().item() <= 1e-4, steps


@pytest.mark.parametrize("sampler", sorted(THIRD_ORDER))
def test_third_order_solvers_give_diffusers_images_on_the_trained_digits_model(sampler):
    """On a trained model (the bundled digits one, epsilon, images near [-1, 1]) the images of
    the engine and of diffusers' solver_order=3 scheduler, from the same x_T, agree within 4e-5
    absolute at 5 and 10 steps: float32's floor for these chains. Over 100 seeds the median was
    1.8e-6 and the largest 9.1e-6 (unipc_3), one seed reached 1.56e-5, while diffusers' own images
    move by 1.1e-5 when x_T is scaled by one ulp (1 + 2**-23); Xeon with AMX, torch 2.13."""
    from types import SimpleNamespace

    engine = nchw(Engine.from_pretrained("digits", backend="torch", batching=False))
    module = engine.model.module
    unet = lambda x, t: SimpleNamespace(sample=module(x, t))  # noqa: E731  (diffusers' UNet call)
    for steps in (5, 10):
        scheduler = THIRD_ORDER[sampler](num_train_timesteps=1000, beta_schedule="linear")
        scheduler.alphas_cumprod = torch.from_numpy(engine.scheduler.alphas_cumprod()).float()
        x_T = torch.randn(4, *engine.sample_shape)
        theirs = diffusers_steps(unet, scheduler, x_T.clone(), steps)[-1].clamp(-1, 1)
        ours = engine.sample([1, 2, 3, 4], sampler=sampler, steps=steps, x_T=x_T)
        assert (ours - theirs).abs().max().item() <= 4e-5, steps
