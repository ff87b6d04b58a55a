"""The engine against diffusers' own scheduler loops, end to end: a model saved as diffusers saves
it, loaded into the engine, sampled from the same x_T, gives diffusers' images. DDIM with x0
clipping (both values of ``use_clipped_model_output``, and the scheduler config's default),
DPM-Solver++(2M) and UniPC for each prediction type, and SDE-DPM-Solver++(2M) given the same noise."""

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


def save_pipeline(folder, **scheduler):
    torch.manual_seed(random.getrandbits(31))
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
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
    the engine and of diffusers' solver_order=3 scheduler, from the same x_T, agree within 1e-5
    absolute at 5 and 10 steps."""
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
        assert (ours - theirs).abs().max().item() <= 1e-5, steps
