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
from ddpm_engine.samplers import ROW_STATE

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
