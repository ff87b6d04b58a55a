"""Whole sampling runs: step_impl="triton" and step_impl="torch" give the same images."""

import random

import pytest
import torch

from ddpm_engine import Engine
from ddpm_engine.errors import BackendUnavailableError
from ddpm_engine.models import SeedUNet

from .helpers import DEVICE


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the model is tiny, and on a shared CPU torch's OpenMP threads spin-wait
    for each other (measured: 25 steps take 0.2 s with 1 thread, 7-16 s with 2 on a loaded box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def engine_pair(scheduler, net=None):
    net = SeedUNet(1, (8, 16)).eval() if net is None else net
    kw = dict(sample_shape=(1, 8, 8), backend="torch", device=DEVICE, scheduler=scheduler)
    return Engine.from_module(net, step_impl="torch", **kw), Engine.from_module(net, step_impl="triton", **kw)


@pytest.fixture(scope="module")
def engines():
    return engine_pair({"clip_sample": True})


@pytest.mark.parametrize("sampler,eta,clip,clipped_eps", [
    ("ddpm", 0.0, True, None), ("ddpm", 0.0, False, None), ("ddim", 1.0, True, False), ("ddim", 1.0, True, True),
    ("ddim", 1.0, False, None), ("ddim", 0.0, False, None), ("ddim", 0.0, True, False), ("ddim", 0.0, True, True),
    ("dpmpp_2m", 0.0, False, None), ("dpmpp_2m", 0.0, True, None), ("dpmpp_2m_sde", 0.0, True, None),
    ("unipc", 0.0, False, None), ("dpmpp_3m", 0.0, False, None), ("dpmpp_3m", 0.0, True, None),
    ("unipc_3", 0.0, False, None), ("unipc_3", 0.0, True, None), ("ipndm", 0.0, False, None), ("ipndm", 0.0, True, None)])
def test_same_images(engines, sampler, eta, clip, clipped_eps):
    ref, fused = engines
    seeds = [random.getrandbits(64) for _ in range(3)]
    opts = dict(sampler=sampler, eta=eta, steps=25, clip_denoised=clip, use_clipped_model_output=clipped_eps)
    a, b = ref.sample(seeds, **opts), fused.sample(seeds, **opts)
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler", [{"variance_type": "fixed_large", "prediction_type": "v_prediction"},
                                       {"prediction_type": "sample", "clip_sample": False}])
def test_same_images_other_schedulers(scheduler):
    ref, fused = engine_pair(scheduler)
    seeds = [random.getrandbits(64) for _ in range(2)]
    for sampler, eta in [("ddpm", 0.0), ("ddim", random.uniform(0.1, 0.9))]:
        a = ref.sample(seeds, sampler=sampler, eta=eta, steps=25)
        b = fused.sample(seeds, sampler=sampler, eta=eta, steps=25)
        assert (a - b).abs().max() <= 1e-4, sampler


def test_intermediates_with_triton(engines):
    ref, fused = engines
    a, snaps_a = ref.sample([3], steps=10, return_intermediates=[500])
    b, snaps_b = fused.sample([3], steps=10, return_intermediates=[500])
    assert (snaps_a[0].pred_x0 - snaps_b[0].pred_x0).abs().max() <= 1e-4
    assert (snaps_a[0].x_t - snaps_b[0].x_t).abs().max() <= 1e-4


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU-only check")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        Engine.from_module(SeedUNet(1, (8, 16)), sample_shape=(1, 8, 8), backend="torch",
                           step_impl="triton").sample([1], steps=2)


class LearnedVarianceNet(torch.nn.Module):
    """A tiny random model with a learned variance: [its prediction, v in [-1, 1]] (2C channels)."""

    def __init__(self, channels=1):
        super().__init__()
        self.net = SeedUNet(channels, (8, 16)).eval()
        self.var = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return torch.cat([self.net(x, t), torch.tanh(3 * self.var(x))], 1)


class PredictionOnly(torch.nn.Module):
    """The same model's first C channels: a model with a fixed variance."""

    def __init__(self, learned: LearnedVarianceNet):
        super().__init__()
        self.learned = learned

    def forward(self, x, t):
        return self.learned(x, t)[:, :x.shape[1]]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_same_images_with_a_learned_variance(sampler):
    """Engine.from_module on a 2C-output module with variance_type "learned_range": every sampler
    samples, the fused steps give the torch steps' images, and for DDPM the variance part matters
    (the same prediction with a fixed variance gives other images)."""
    net = LearnedVarianceNet().eval()
    scheduler = {"variance_type": "learned_range", "prediction_type": random.choice(["epsilon", "v_prediction"])}
    ref, fused = engine_pair(scheduler, net)
    seeds = [random.getrandbits(64) for _ in range(2)]
    a, b = ref.sample(seeds, sampler=sampler, steps=25), fused.sample(seeds, sampler=sampler, steps=25)
    assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-4
    if sampler == "ddpm":
        first_c = Engine.from_module(PredictionOnly(net), sample_shape=(1, 8, 8),
                                     backend="torch", device=DEVICE, step_impl="torch",
                                     scheduler={**scheduler, "variance_type": "fixed_small"})
        assert (first_c.sample(seeds, sampler=sampler, steps=25) - a).abs().max() > 1e-2
