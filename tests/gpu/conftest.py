"""GPU tests: every test module here is marked ``gpu`` and skipped without a CUDA device.

Run them with ``pytest -m gpu tests/gpu`` on a GPU machine (the default ``-m 'not gpu'`` in
pyproject deselects them). fp32 runs with TF32 off for the whole session, so fp32 means fp32.
The measuring helpers are bench/gpu_suite.py's, so the tests and the bench compute the same numbers.
"""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def suite():
    spec = importlib.util.spec_from_file_location("bench_gpu_suite", ROOT / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def no_tf32():
    if not torch.cuda.is_available():
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


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
