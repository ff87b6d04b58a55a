"""Models for the CPU bench: the digits-like SeedUNet at 16x16 and the DDPM CIFAR-10 UNet at 32x32,
both with random weights (latency does not depend on them). ONNX exports go to a temporary
cache unless $DDPM_ENGINE_CACHE is set.

OpenMP's wait policy is set once per process, for the engine and its torch-based peers alike:
- by default torch is imported first, so the peers (diffusers, torch.compile) run as their users
  run them, with OpenMP's spinning default, and the engine, by its rule for that case, samples
  its torch backend on one thread (its other backends run their own pools): ratios to the peers
  are the conservative ones;
- ``BENCH_ENGINE_FIRST=1`` imports ddpm_engine first, as README asks users: OpenMP's idle
  threads sleep, which is the engine's torch default and slows the peers' many small calls.
Each record names the case (``openmp_wait``: "spinning" or "engine")."""

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

