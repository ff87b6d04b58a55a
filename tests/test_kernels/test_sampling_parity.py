"""Whole sampling runs: step_impl="triton" and step_impl="torch" give the same images."""

import random

import pytest
import torch

from engine import Engine
from engine.errors import BackendUnavailableError
from engine.models import SeedUNet

from .helpers import DEVICE


@pytest.fixture(scope="module")
def engines():
    net = SeedUNet(1, (8, 16)).eval()
    kw = dict(sample_shape=(1, 8, 8), backend="torch", device=DEVICE, scheduler={"clip_sample": True})
    return Engine.from_module(net, step_impl="torch", **kw), Engine.from_module(net, step_impl="triton", **kw)


@pytest.mark.parametrize("sampler,eta,clip", [("ddpm", 0.0, True), ("ddpm", 0.0, False), ("ddim", 1.0, True),
                                              ("ddim", 0.0, False)])
def test_same_images(engines, sampler, eta, clip):
    ref, fused = engines
    seeds = [random.getrandbits(64) for _ in range(3)]
    a = ref.sample(seeds, sampler=sampler, eta=eta, steps=25, clip_denoised=clip)
    b = fused.sample(seeds, sampler=sampler, eta=eta, steps=25, clip_denoised=clip)
    assert (a - b).abs().max() <= 1e-4


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
