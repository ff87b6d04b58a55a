"""Engine.sample end to end on the CPU: seeds, samplers, intermediates, and every bad input."""

import math
import random

import pytest
import torch

from ddpm_engine import Engine, InvalidRequestError, ModelLoadError, Snapshot
from ddpm_engine.errors import BackendUnavailableError, EngineError
from ddpm_engine.models import SeedUNet

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(random.getrandbits(31))
    return Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch",
                              scheduler={"clip_sample": True})


def test_images_shape_range_and_fresh_seeds(engine):
    a = engine.sample(3, steps=10)
    b = engine.sample(3, steps=10)
    assert a.shape == (3, *SHAPE) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, b)  # an int batch draws fresh seeds


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.0)])
def test_a_seed_gives_the_same_image_in_any_batch(engine, sampler, eta):
    s = random.getrandbits(64)
    alone = engine.sample([s], sampler=sampler, eta=eta, steps=20)
    others = [random.getrandbits(64) for _ in range(3)]
    in_batch = engine.sample([others[0], others[1], s, others[2]], sampler=sampler, eta=eta, steps=20)
    assert (alone[0] - in_batch[2]).abs().max() <= 1e-5


def test_ddim_eta0_is_deterministic_given_x_T(engine):
    x_T = torch.randn(2, *SHAPE)
    a = engine.sample([1, 2], sampler="ddim", eta=0.0, steps=10, x_T=x_T)
    b = engine.sample([3, 4], sampler="ddim", eta=0.0, steps=10, x_T=x_T)
    assert torch.equal(a, b)
    c = engine.sample([1, 2], sampler="ddim", eta=1.0, steps=10, x_T=x_T)
    d = engine.sample([3, 4], sampler="ddim", eta=1.0, steps=10, x_T=x_T)
    assert not torch.equal(c, d)  # with eta > 0 the seeds' noise matters


def test_clip_denoised_default_comes_from_the_scheduler_config(engine):
    s = [random.getrandbits(64)]
    assert torch.equal(engine.sample(s, sampler="ddpm", steps=10), engine.sample(s, sampler="ddpm", steps=10, clip_denoised=True))


def test_intermediates_on_request(engine):
    images, snaps = engine.sample([7, 8], steps=50, return_intermediates=[500, 0])
    assert [s.t for s in snaps] == [500, 0] and all(isinstance(s, Snapshot) for s in snaps)
    assert snaps[0].x_t.shape == (2, *SHAPE) and snaps[0].pred_x0.shape == (2, *SHAPE)
    torch.testing.assert_close(snaps[1].pred_x0.clamp(-1, 1), images)  # the last step's x0 is the image
    _, snaps = engine.sample([7], steps=50, return_intermediates=True)
    assert 2 <= len(snaps) <= 10 and snaps[-1].t == 0
    assert isinstance(engine.sample([7], steps=5), torch.Tensor)


def test_progress_bar(engine, capsys):
    engine.sample([1], sampler="ddpm", steps=5, progress=True)
    assert "ddpm-5" in capsys.readouterr().err


def test_matches_a_diffusers_ddim_loop():
    diffusers = pytest.importorskip("diffusers")
    from ddpm_engine.models.cifar_unet import DiffusersUNet

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8).eval()
    engine = Engine.from_module(DiffusersUNet(unet), scheduler={"clip_sample": False}, sample_shape=SHAPE,
                                backend="torch")
    x_T = torch.randn(2, *SHAPE)
    ours = engine.sample([1, 2], sampler="ddim", steps=10, eta=0.0, x_T=x_T)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert (ours - x.clamp(-1, 1)).abs().max() < 1e-4


BAD_CALLS = [
    ({"batch": 0}, InvalidRequestError),
    ({"batch": -3}, InvalidRequestError),
    ({"batch": 2.5}, InvalidRequestError),
    ({"batch": "4"}, InvalidRequestError),
    ({"batch": True}, InvalidRequestError),
    ({"batch": [1, -2]}, InvalidRequestError),
    ({"batch": [2**64]}, InvalidRequestError),
    ({"batch": []}, InvalidRequestError),
    ({"batch": [1.0]}, InvalidRequestError),
    ({"batch": 1, "steps": 0}, InvalidRequestError),
    ({"batch": 1, "steps": 1001}, InvalidRequestError),
    ({"batch": 1, "steps": 2.0}, InvalidRequestError),
    ({"batch": 1, "sampler": "euler"}, InvalidRequestError),
    ({"batch": 1, "sampler": "ddim", "eta": 1.5}, InvalidRequestError),
    ({"batch": 1, "sampler": "ddim", "eta": -0.1}, InvalidRequestError),
    ({"batch": 1, "clip_denoised": "yes"}, InvalidRequestError),
    ({"batch": 2, "x_T": torch.zeros(3, *SHAPE)}, InvalidRequestError),
    ({"batch": 1, "x_T": torch.zeros(1, 1, 4, 4)}, InvalidRequestError),
    ({"batch": 1, "x_T": torch.full((1, *SHAPE), float("nan"))}, InvalidRequestError),
    ({"batch": 1, "x_T": [[0.0]]}, InvalidRequestError),
    ({"batch": 1, "return_intermediates": [5000]}, InvalidRequestError),
]


@pytest.mark.parametrize("kwargs,error", BAD_CALLS, ids=[str(k)[:60] for k, _ in BAD_CALLS])
def test_bad_requests_raise_typed_errors_and_the_engine_keeps_working(engine, kwargs, error):
    kwargs = dict(kwargs)
    batch = kwargs.pop("batch")
    kwargs.setdefault("steps", 5)
    with pytest.raises(error) as info:
        engine.sample(batch, **kwargs)
    assert isinstance(info.value, EngineError) and str(info.value)
    assert engine.sample([11], steps=5).shape == (1, *SHAPE)  # still works


@pytest.mark.parametrize("kwargs", [{"backend": "tensorflow"}, {"precision": "fp8"}, {"step_impl": "cuda"},
                                    {"device": "tpu"}, {"device": "cuda:0"} if not torch.cuda.is_available() else
                                    {"precision": "int4"}])
def test_bad_engine_options(kwargs):
    with pytest.raises(InvalidRequestError):
        Engine.from_module(SeedUNet(1, (8, 16)), sample_shape=SHAPE, **kwargs)


def test_bad_models():
    with pytest.raises(InvalidRequestError):
        Engine.from_module(object(), sample_shape=SHAPE)
    with pytest.raises(InvalidRequestError):
        Engine.from_module(SeedUNet(1, (8, 16)))  # no sample_shape
    with pytest.raises(ModelLoadError):
        Engine.from_pretrained("/nonexistent/model/folder")
    with pytest.raises(InvalidRequestError):
        Engine.from_pretrained(42)


def test_missing_optional_package_names_it(monkeypatch):
    import sys

    from ddpm_engine.errors import MissingDependencyError
    from ddpm_engine.models import cifar_unet

    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(MissingDependencyError, match="pip install"):
        cifar_unet.cifar10_unet()


def test_backend_unavailable_is_typed(monkeypatch):
    from ddpm_engine import backends

    monkeypatch.setattr(backends, "available", lambda device, precision="fp32": {"torch": None, "onnxruntime": "not installed"})
    monkeypatch.setattr(backends.backend_class("torch"), "unavailable_reason",
                        classmethod(lambda cls, device, precision: "pretend it is missing"))
    with pytest.raises(BackendUnavailableError, match="pretend"):
        Engine.from_module(SeedUNet(1, (8, 16)), sample_shape=SHAPE, backend="torch")


def test_flat_memory_no_per_step_history(engine, monkeypatch):
    """Without intermediates nothing is kept per step: every step's tensors are freed (seed 003 kept them all)."""
    import gc
    import weakref

    refs = []
    backend = engine.backend

    def recording_backend(x, t):
        out = backend(x, t)
        refs.extend([weakref.ref(out), weakref.ref(x)])
        return out

    monkeypatch.setattr(engine, "backend", recording_backend)
    engine.sample([1, 2], steps=40)
    gc.collect()
    assert len(refs) == 80 and sum(r() is not None for r in refs) <= 2


def test_graph_drivers_need_cuda(engine):
    with pytest.raises(InvalidRequestError):
        engine.sample([1], driver="cpp")
    with pytest.raises(InvalidRequestError):
        engine.sample([1], driver="c", x_T=torch.zeros(1, *SHAPE))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            engine.sample([1], steps=5, driver="python")
    assert engine.sample([1], steps=5).shape == (1, *SHAPE)


def test_a_sampler_is_one_registry_entry(engine, monkeypatch):
    """A sampler added to the registry alone (here DDIM's step under a new name, "linspace" timesteps,
    7 default steps and no Triton kernel) samples through the engine's plan, eager loop and torch
    step: the same images as a hand-written loop of its reference step."""
    import dataclasses

    from ddpm_engine.noise import initial_noise, seed_words
    from ddpm_engine.samplers import SAMPLER_DEFS, ddim_step, sampler_def
    from ddpm_engine.schedules import Tables

    entry = dataclasses.replace(sampler_def("ddim"), name="ddim_linspace", spacing="linspace", steps=7, kernel=None)
    monkeypatch.setitem(SAMPLER_DEFS, entry.name, entry)
    seeds = [random.getrandbits(64) for _ in range(2)]
    images = engine.sample(seeds, sampler="ddim_linspace", driver="eager")
    assert engine.plan("ddim_linspace").name == "ddim_linspace-7 eta=0"

    tab = Tables.build(engine.scheduler.betas(), 7, "linspace").on("cpu")
    x = initial_noise(seed_words(seeds, torch.device("cpu")), SHAPE)
    with torch.inference_mode():
        for k in range(6, -1, -1):
            i = torch.full((2,), k)
            x, _ = ddim_step(tab, x, engine.backend(x, tab.timesteps[i]), i, torch.zeros_like(x), clip_denoised=True)
    torch.testing.assert_close(images, x.clamp(-1, 1), rtol=0, atol=1e-6)


def test_an_unknown_sampler_names_the_registered_ones(engine):
    from ddpm_engine.samplers import SAMPLERS

    with pytest.raises(InvalidRequestError, match="unknown sampler 'euler'") as err:
        engine.sample([1], sampler="euler")
    assert all(name in str(err.value) for name in SAMPLERS)
