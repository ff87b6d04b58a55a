"""Shared test setup.

Without a GPU, Triton kernels run in its interpreter: the variable must be set before anything
imports triton, so it is set here, first.

Every random input is seeded: the session draws one seed (or takes ``TEST_SEED`` from the
environment), and each test reseeds ``random``, numpy and torch from it and its own name, so
``TEST_SEED=N pytest path::test`` reproduces a failure's inputs. A failing test's report names
the seed.
"""

import atexit
import os
import random
import shutil
import tempfile
import zlib

import numpy as np
import pytest

import ddpm_engine  # noqa: F401  before torch, as README asks: OpenMP's idle threads sleep, and the
# engine samples on torch's default threads (not one: its policy where torch came first), like
# the peers (diffusers) the parity tests run beside it
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's compile cache (AOTI tests) per test session: another process compiling at the same
# time on the machine must not swap precompiled headers under this one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-engine-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

SESSION_SEED = int(os.environ.get("TEST_SEED") or random.SystemRandom().getrandbits(32))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_seed_everything(SESSION_SEED)  # module- and session-scoped fixtures draw from this


def pytest_report_header(config):
    return f"random inputs: TEST_SEED={SESSION_SEED}"


@pytest.fixture(scope="module", autouse=True)
def module_seed(request):
    """Module-scoped fixtures draw from a seed of the session seed and the module's name."""
    seed = zlib.crc32(f"{SESSION_SEED}:{request.node.nodeid}".encode())
    _seed_everything(seed)
    return seed


@pytest.fixture(autouse=True)
def test_seed(request):
    """This test's seed: a function of the session seed and the test's id."""
    seed = zlib.crc32(f"{SESSION_SEED}:{request.node.nodeid}".encode())
    _seed_everything(seed)
    request.node.test_seed = seed
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("random inputs", f"TEST_SEED={SESSION_SEED} reproduces this test's inputs "
                                                 f"(its own seed: {getattr(item, 'test_seed', 'not set')})"))


@pytest.fixture
def seeded(test_seed):
    """This test's seed, for tests that name it (the reseeding itself is automatic: ``test_seed``)."""
    return test_seed


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh on-disk artifact cache ($DDPM_ENGINE_CACHE) shared by one test module's tests, so a
    module compiles each export once; yields its folder."""
    folder = tmp_path_factory.mktemp("engine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_ENGINE_CACHE", str(folder))
        yield folder
