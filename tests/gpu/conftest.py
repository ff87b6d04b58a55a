"""GPU tests: every test module here is marked ``gpu`` and skipped without a CUDA device.

Run them with ``pytest -m "gpu or not gpu" tests/gpu`` on a GPU machine (the default
``-m 'not gpu'`` in pyproject deselects them). The whole session runs under
``bench.measure.exact_fp32``: no TF32 in matmuls or cuDNN, deterministic cuDNN algorithms
without autotuning, so fp32 means fp32 and runs compared across batch sizes, drivers and repeats
differ only by real differences. The measuring helpers are bench/measure.py's, so the tests and
the bench compute the same numbers.
"""

import random

import pytest
import torch

from bench import measure


@pytest.fixture(scope="session")
def suite():
    return measure


@pytest.fixture(scope="session", autouse=True)
def exact_math():
    if not torch.cuda.is_available():
        yield
        return
    with measure.exact_fp32():
        yield


@pytest.fixture(scope="session")
def models(suite):
    """name -> LoadedModel, loaded on first use: the CIFAR-10 UNet (random weights) and digits."""
    cache = {}

    def get(name):
        if name not in cache:
            if name == "cifar10":
                pytest.importorskip("diffusers")
                cache[name] = suite.cifar_loaded(seed=0)
            else:
                from ddpm_engine.checkpoints import load

                try:
                    cache[name] = load(name)
                except Exception as exc:  # the bundled model is trained by a separate step
                    pytest.skip(f"model {name!r} cannot be loaded here: {exc}")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def seeds():
    return [random.getrandbits(64) for _ in range(4)]
