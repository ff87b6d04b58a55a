"""The AOTInductor backend on the CPU: one compile of a tiny SeedUNet (tens of CPU seconds: Inductor
writes C++ and g++ builds it), then parity with eager at other batch sizes, the on-disk cache, and
a whole Engine run."""

import random
import shutil

import pytest
import torch

from ddpm_engine import Engine, backends
from ddpm_engine.backends import aoti_backend
from ddpm_engine.checkpoints import from_module
from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.models import SeedUNet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="AOTInductor on the CPU needs a C++ compiler (c++/g++)"),
]
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aoti-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_ENGINE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(random.getrandbits(31))
    return from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=SHAPE, name="tiny")


@pytest.fixture(scope="module")
def backend(cache, loaded):
    assert backends.available("cpu")["aoti"] is None
    return backends.create("aoti", loaded, "cpu", "fp32")


def test_matches_eager_at_other_batch_sizes(backend, loaded, cache):
    assert backend.path.parent == cache / "aoti" and backend.path.suffix == ".pt2"
    for b in (1, 3, 7):  # exported at batch 2: the batch axis must be dynamic
        x = torch.randn(b, *SHAPE)
        t = torch.randint(0, 1000, (b,))
        with torch.no_grad():
            ref = loaded.module(x, t)
        out = backend(x, t)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_cache_is_reused(backend, loaded, cache):
    mtime = backend.path.stat().st_mtime_ns
    again = backends.create("aoti", loaded, "cpu", "fp32")
    assert again.path == backend.path and again.path.stat().st_mtime_ns == mtime
    assert [p.name for p in backend.path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files
    other = aoti_backend.cached_path(loaded, "cpu", "bf16")
    assert other != backend.path  # precision keys the cache


def test_engine_sample_matches_torch_backend(backend, loaded):
    seeds = [random.getrandbits(64) for _ in range(3)]
    ref = Engine(loaded, backend="torch", device="cpu").sample(seeds, sampler="ddim", steps=10)
    out = Engine(loaded, backend="aoti", device="cpu").sample(seeds, sampler="ddim", steps=10)
    assert (out - ref).abs().max().item() <= 1e-4


def test_bad_input_is_typed(backend):
    with pytest.raises(InvalidRequestError, match="expected x"):
        backend(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))


def test_cuda_reason_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert "CUDA" in aoti_backend.unavailable_reason("cuda")


def test_corrupt_cached_package_is_rebuilt_once(backend, loaded, monkeypatch):
    good = backend.path.read_bytes()
    builds = []

    def rebuild(loaded_, device, precision, out):  # stands in for the minutes-long compile
        builds.append(out)
        out.write_bytes(good)

    monkeypatch.setattr(aoti_backend, "_compile", rebuild)
    backend.path.write_bytes(good[: len(good) // 3])  # a truncated package, as after a crash of an old version
    again = backends.create("aoti", loaded, "cpu", "fp32")
    assert len(builds) == 1 and again.path == backend.path and again.path.read_bytes() == good
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    torch.testing.assert_close(again(x, t), backend(x, t))


def test_package_is_loaded_single_threaded(monkeypatch, tmp_path):
    """run_single_threaded=False makes AOTI's runtime query a CUDA event per call, which is
    illegal during CUDA-graph capture; the loader must ask for the single-threaded runner."""
    seen = []

    def fake_load(path, run_single_threaded=False, device_index=-1):
        seen.append(run_single_threaded)
        return "runner"

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    assert aoti_backend.load_package(tmp_path / "m.pt2") == "runner" and seen == [True]

    def old_load(path):  # a torch without the keyword
        seen.append("old")
        return "old runner"

    monkeypatch.setattr(torch._inductor, "aoti_load_package", old_load)
    assert aoti_backend.load_package(tmp_path / "m.pt2") == "old runner" and seen[-1] == "old"
