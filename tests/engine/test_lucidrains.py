"""lucidrains' denoising-diffusion-pytorch: ``Engine.from_module(GaussianDiffusion(Unet(...)))``
reads its betas, objective, image size, channels and self-conditioning; its deterministic DDIM
loop (``ddim_sample`` at eta 0, all timesteps) and the engine's DDIM give the same images from the
same noise, self-conditioned too (the previous x0 estimate rides with each row, Rows.x_self_cond,
and reaches every backend's graph as its ``x_self_cond`` input).

The package imports torchvision, accelerate and pytorch_fid at import time for its trainer and FID
code, none of which sampling uses; torchvision has no wheel beside a CPU-only torch. Where they
are missing, this module puts empty stand-ins in sys.modules before importing it (the test only:
the engine never imports the package)."""

import importlib
import sys
import types

import pytest
import torch

from ddpm_engine import Engine, InvalidRequestError
from ddpm_engine.export import iospec

SHAPE = (1, 8, 8)
T = 20


def _import_lucidrains():
    stand_ins = {"torchvision": {"transforms": types.SimpleNamespace(), "utils": types.SimpleNamespace()},
                 "torchvision.transforms": {}, "torchvision.utils": {}, "accelerate": {"Accelerator": object},
                 "pytorch_fid": {}, "pytorch_fid.inception": {"InceptionV3": object},
                 "pytorch_fid.fid_score": {"calculate_frechet_distance": None}}
    added = []
    for name, attrs in stand_ins.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            added.append(name)
    try:
        return importlib.import_module("denoising_diffusion_pytorch")
    finally:  # the stand-ins must not outlive the import: other code asks find_spec("torchvision")
        for name in added:
            sys.modules.pop(name, None)


try:
    ddp = _import_lucidrains()
except ImportError:
    pytest.skip("denoising-diffusion-pytorch is not installed (docs/models.md: lucidrains)", allow_module_level=True)


def diffusion(objective="pred_noise", self_condition=False, sampling_timesteps=None):
    unet = ddp.Unet(dim=8, dim_mults=(1, 2), channels=1, self_condition=self_condition, attn_dim_head=8,
                    attn_heads=2)
    return ddp.GaussianDiffusion(unet, image_size=8, timesteps=T, objective=objective, beta_schedule="cosine",
                                 ddim_sampling_eta=0.0, sampling_timesteps=sampling_timesteps).eval()


def lucidrains_ddim(model, noise, seed):
    """Its own loop on ``noise``: ddim_sample draws its starting noise from torch's generator."""
    torch.manual_seed(seed)
    assert torch.equal(torch.randn(noise.shape), noise)
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.ddim_sample(tuple(noise.shape)) * 2 - 1  # it returns [0, 1] (auto_normalize)


@pytest.mark.parametrize("self_condition", [False, True])
@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_engine_ddim_matches_its_ddim_sample_with_the_same_noise(objective, self_condition, test_seed):
    model = diffusion(objective, self_condition)
    engine = Engine.from_module(model, backend="torch")
    assert engine.sample_shape == SHAPE and engine.num_train_timesteps == T
    assert engine.model.io.self_conditioned == self_condition
    torch.manual_seed(test_seed)
    noise = torch.randn(3, *SHAPE)
    want = lucidrains_ddim(model, noise, test_seed)
    got = engine.sample([1, 2, 3], sampler="ddim", steps=T, x_T=noise)
    # float32 on both sides, rounded apart: its tables are float32 buffers, the engine's float64
    # tables cast once; the first steps divide by sqrt(alpha-bar) near 0 (cosine, T = 20), which
    # magnifies that rounding (typically 3e-7, 1.4e-4 at worst seen over seeds)
    torch.testing.assert_close(got, want, atol=5e-4, rtol=0)


@pytest.mark.parametrize("steps", [5, 4])
def test_fewer_ddim_steps_keep_its_timesteps(steps, test_seed):
    """Its ddim_sample with sampling_timesteps < T keeps linspace(-1, T - 1, steps + 1) and ends at
    alpha-bar 1: diffusers' "trailing" spacing, which the conversion sets in the scheduler config."""
    model = diffusion("pred_v", sampling_timesteps=steps)
    engine = Engine.from_module(model, backend="torch")
    assert engine.plan("ddim", steps).spacing == "trailing"
    torch.manual_seed(test_seed)
    noise = torch.randn(3, *SHAPE)
    want = lucidrains_ddim(model, noise, test_seed)
    torch.testing.assert_close(engine.sample([1, 2, 3], sampler="ddim", steps=steps, x_T=noise), want, atol=5e-4, rtol=0)


def test_self_conditioning_feeds_the_previous_estimate_and_it_matters(test_seed):
    """The parity above means something only if the estimate is fed: the same Unet given zeros
    in its place (never self-conditioned: the issue's bug) samples other images."""
    model = diffusion("pred_noise", self_condition=True)
    unet = model.model

    class Blind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t):
            return self.unet(x, t, torch.zeros_like(x))

    schedule = {"num_train_timesteps": T, "trained_betas": model.betas.double().tolist(),
                "use_clipped_model_output": True}
    bare = Engine.from_module(unet, schedule, SHAPE, backend="torch")
    assert bare.model.io.self_conditioned  # a bare self-conditioned Unet is detected too
    rows = bare.plan("ddim", T).start([1, 2])
    assert torch.equal(rows.x_self_cond, torch.zeros_like(rows.x))  # no estimate before the first step
    fed = bare.sample([1, 2], sampler="ddim", steps=T)
    blind = Engine.from_module(Blind(), schedule, SHAPE, backend="torch").sample([1, 2], sampler="ddim", steps=T)
    torch.testing.assert_close(fed, Engine.from_module(model, backend="torch").sample([1, 2], sampler="ddim", steps=T))
    assert (fed - blind).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_self_conditioned_graphs_take_x_self_cond_and_give_the_torch_images(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    model = diffusion("pred_v", self_condition=True)
    want = Engine.from_module(model, backend="torch").sample([4, 5], sampler="ddim", steps=5)
    engine = Engine.from_module(model, backend=backend)
    assert engine.backend.extra_inputs == (iospec.SELF_COND,)
    torch.testing.assert_close(engine.sample([4, 5], sampler="ddim", steps=5), want, atol=1e-4, rtol=0)


def test_a_gaussian_diffusion_brings_its_own_schedule_and_shape():
    with pytest.raises(InvalidRequestError, match="carries its own schedule"):
        Engine.from_module(diffusion(), scheduler={"beta_schedule": "linear"}, backend="torch")
    with pytest.raises(InvalidRequestError, match="differs from the GaussianDiffusion's"):
        Engine.from_module(diffusion(), sample_shape=(3, 8, 8), backend="torch")
