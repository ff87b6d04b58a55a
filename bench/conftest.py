"""The CPU benches' models (random weights), a temporary ONNX cache, the machine in every record.
torch is imported first (the peers spin, as their users run them) unless BENCH_ENGINE_FIRST=1."""

import os
import random

import pytest

if os.environ.get("BENCH_ENGINE_FIRST") == "1":
    import ddpm_engine  # noqa: F401  before torch: OpenMP's idle threads sleep
import torch

from ddpm_engine import cpu, threads
from ddpm_engine.checkpoints import from_module
from ddpm_engine.models import SeedUNet
from ddpm_engine.testing import versions


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("DDPM_ENGINE_CACHE"):
            mp.setenv("DDPM_ENGINE_CACHE", str(tmp_path_factory.mktemp("ddpm-engine-cache")))
        yield


@pytest.fixture(autouse=True)
def machine(request):
    """Every benchmark's record names the CPU, torch's threads, OpenMP's wait policy and the versions."""
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(
            cpu=cpu.describe(), torch_threads=torch.get_num_threads(), openmp_wait=threads.OPENMP_WAIT, versions=versions())


@pytest.fixture(scope="session")
def digits16():
    torch.manual_seed(random.getrandbits(31))
    return from_module(SeedUNet(1, (32, 64, 128)).eval(), sample_shape=(1, 16, 16), name="digits16")


@pytest.fixture(scope="session")
def cifar32():
    pytest.importorskip("diffusers")
    from bench.measure import cifar_loaded

    return cifar_loaded(seed=random.getrandbits(31))
