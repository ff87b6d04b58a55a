"""Models for the CPU bench (random weights: latency does not depend on them): the digits-like
SeedUNet at 16x16 and the DDPM CIFAR-10 UNet at 32x32. ONNX exports go to a temporary cache
unless $DDPM_ENGINE_CACHE is set. OpenMP's wait policy is set once per process: by default torch
is imported first (the peers run as their users run them, spinning; the engine then samples its
torch backend on one thread); ``BENCH_ENGINE_FIRST=1`` imports ddpm_engine first (idle threads
sleep). Each record names the case (``openmp_wait``)."""

import os
import random

import pytest

if os.environ.get("BENCH_ENGINE_FIRST") == "1":
    import ddpm_engine  # noqa: F401  before torch, as README asks: OpenMP's idle threads sleep
import torch

from ddpm_engine.checkpoints import from_module
from ddpm_engine.models import SeedUNet


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    if os.environ.get("DDPM_ENGINE_CACHE"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_ENGINE_CACHE", str(tmp_path_factory.mktemp("ddpm-engine-cache")))
        yield


@pytest.fixture(scope="session")
def digits16():
    torch.manual_seed(random.getrandbits(31))
    return from_module(SeedUNet(1, (32, 64, 128)).eval(), sample_shape=(1, 16, 16), name="digits16")


@pytest.fixture(scope="session")
def cifar32():
    pytest.importorskip("diffusers")
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, cifar10_unet

    return from_module(cifar10_unet(seed=random.getrandbits(31)), CIFAR10_SCHEDULER_CONFIG, (3, 32, 32), "cifar10")

