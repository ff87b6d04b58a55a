"""What is special to the AOTInductor backend on the CPU (the contract is test_contract.py's): one
compile of a tiny SeedUNet (Inductor writes C++ and a C++ compiler builds it: slow) as one
program over every batch size, a cache keyed by precision, a corrupt package rebuilt once, the
single-threaded loader; and a model that branches on the batch size (a tiny diffusers UNet, whose
Upsample2D branches on batch >= 64) compiled as one program per batch range in one package, with
parity on both sides of each branch."""

import copy
import random
import shutil
from types import SimpleNamespace

import pytest
import torch

from torch import nn

from ddpm_engine import backends
from ddpm_engine.backends import aoti_backend
from ddpm_engine.backends.aoti_backend import AOTIBackend
from ddpm_engine.checkpoints import from_module
from ddpm_engine.errors import ExportError
from ddpm_engine.models import SeedUNet
from ddpm_engine.models.cifar_unet import DiffusersUNet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="AOTInductor on the CPU needs a C++ compiler (c++/g++)"),
]
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(random.getrandbits(31))
    return from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=SHAPE, name="tiny")


@pytest.fixture(scope="module")
def backend(cache, loaded):
    assert backends.available("cpu")["aoti"] is None
    return backends.create("aoti", loaded, "cpu", "fp32")


def assert_matches_eager(backend, module, batch_sizes, shape):
    for b in batch_sizes:
        x = torch.randn(b, *shape)
        t = torch.randint(0, 1000, (b,))
        with torch.no_grad():
            ref = module(x, t)
        out = backend(x, t)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5, f"batch {b}"


def test_one_program_serves_every_batch_size(backend, loaded, cache):
    assert backend.path.parent == cache / "aoti" and backend.path.suffix == ".pt2"
    # no branch on the batch size: one program, the package's default model
    assert [p[:2] for p in backend.programs] == [(1, aoti_backend.MAX_BATCH)]
    assert_matches_eager(backend, loaded.module, (1, 3, 7), SHAPE)  # exported at batch 2: the axis is dynamic


def test_precision_keys_the_cache(backend, loaded):
    assert aoti_backend.cached_path(loaded, "cpu", "bf16") != backend.path


def test_cuda_reason_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert "CUDA" in AOTIBackend.unavailable_reason("cuda", "fp32")


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
    illegal during CUDA-graph capture; the loader must ask for the single-threaded runner, through
    load_pt2 (every model of the package) or, on a torch without it, aoti_load_package."""
    from torch.export.pt2_archive import _package

    seen, whole = [], [(1, aoti_backend.MAX_BATCH, "runner")]

    def fake_load_pt2(path, *, run_single_threaded=False, num_runners=1, device_index=-1):
        seen.append(("load_pt2", run_single_threaded))
        return SimpleNamespace(aoti_runners={"model": "runner"})

    def fake_load(path, run_single_threaded=False, device_index=-1):
        seen.append(("aoti_load_package", run_single_threaded))
        return "runner"

    def old_load(path):  # a torch without the keyword
        seen.append(("aoti_load_package", "old"))
        return "runner"

    monkeypatch.setattr(_package, "load_pt2", fake_load_pt2)
    assert aoti_backend.load_package(tmp_path / "m.pt2") == whole and seen == [("load_pt2", True)]
    monkeypatch.delattr(_package, "load_pt2")
    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    assert aoti_backend.load_package(tmp_path / "m.pt2") == whole and seen[-1] == ("aoti_load_package", True)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", old_load)
    assert aoti_backend.load_package(tmp_path / "m.pt2") == whole and seen[-1] == ("aoti_load_package", "old")


# ---- a model that branches on the batch size ------------------------------------------------------

class BatchBranches(nn.Module):
    """Computes something else from batch 5 and again from batch 100 on, as diffusers' Upsample2D
    does (there the branch is a no-op, so only a model like this one shows a wrong program)."""

    def __init__(self, cuts=(5, 100)):
        super().__init__()
        self.cuts = cuts
        self.scale = nn.Parameter(torch.randn(1))

    def forward(self, x, t):
        y = x * self.scale + t.float().view(-1, 1, 1, 1) / 1000
        for i, cut in enumerate(self.cuts):
            if x.shape[0] >= cut:
                y = y * (i + 2)
        return y


def test_export_cuts_the_batch_range_where_the_model_branches():
    module = BatchBranches().eval()
    with torch.no_grad():
        programs = aoti_backend.export_programs(module, SHAPE, torch.device("cpu"))
        assert [p[:2] for p in programs] == [(1, 4), (5, 99), (100, aoti_backend.MAX_BATCH)]
        for lo, hi, program in programs:
            for b in (lo, hi) if hi < 200 else (lo, lo + 1):
                x, t = torch.randn(b, *SHAPE), torch.randint(0, 1000, (b,))
                torch.testing.assert_close(program.module()(x, t), module(x, t), msg=f"batch {b} in {lo}..{hi}")


def test_too_many_batch_ranges_is_a_typed_export_error(cache):
    cuts = tuple(range(10, 10 * (aoti_backend.MAX_PROGRAMS + 1), 10))  # one range more than MAX_PROGRAMS
    loaded = from_module(BatchBranches(cuts), sample_shape=SHAPE, name="many-branches")
    with pytest.raises(ExportError, match="branches on the batch size.*backend='torch'"):  # before any compile
        backends.create("aoti", loaded, "cpu", "fp32")


def test_a_package_that_does_not_cover_every_batch_size_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(aoti_backend, "_load_runners", lambda path: {"batch_1_63": "runner"})
    with pytest.raises(ExportError, match="1..4096"):
        aoti_backend.load_package(tmp_path / "m.pt2")
    monkeypatch.setattr(aoti_backend, "_load_runners", lambda path: {"batch_64_4096": "b", "batch_1_63": "a"})
    assert aoti_backend.load_package(tmp_path / "m.pt2") == [(1, 63, "a"), (64, 4096, "b")]


@pytest.fixture(scope="module")
def diffusers_loaded():
    """The tiny diffusers UNet of tests/engine/test_checkpoints.py (with an Upsample2D), at random weights."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(random.getrandbits(31))
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    return from_module(DiffusersUNet(unet).eval(), sample_shape=SHAPE, name="tiny-diffusers")


@pytest.fixture(scope="module")
def diffusers_backend(cache, diffusers_loaded):
    return backends.create("aoti", diffusers_loaded, "cpu", "fp32")


def test_diffusers_unet_matches_eager_on_both_sides_of_its_batch_branch(diffusers_backend, diffusers_loaded):
    assert [p[:2] for p in diffusers_backend.programs] == [(1, 63), (64, aoti_backend.MAX_BATCH)]
    assert_matches_eager(diffusers_backend, diffusers_loaded.module, (3, 65), SHAPE)


def test_each_batch_size_runs_the_program_of_its_range(diffusers_backend):
    """Upsample2D's branch is a no-op, so parity alone cannot see a wrong program: record the calls."""
    calls = []

    def recording(name, runner):
        return lambda x, t: calls.append((name, x.shape[0])) or runner(x, t)

    backend = copy.copy(diffusers_backend)
    backend.programs = [(lo, hi, recording(f"{lo}..{hi}", runner)) for lo, hi, runner in backend.programs]
    for b in (1, 63, 64, 65):
        backend(torch.randn(b, *SHAPE), torch.randint(0, 1000, (b,)))
    assert calls == [("1..63", 1), ("1..63", 63), ("64..4096", 64), ("64..4096", 65)]


def test_split_package_is_cached_as_one_file(diffusers_backend, diffusers_loaded, monkeypatch):
    monkeypatch.setattr(aoti_backend, "_compile", lambda *args: pytest.fail("the cached package was rebuilt"))
    again = backends.create("aoti", diffusers_loaded, "cpu", "fp32")
    assert again.path == diffusers_backend.path == aoti_backend.cached_path(diffusers_loaded, "cpu", "fp32")
    assert [p[:2] for p in again.programs] == [p[:2] for p in diffusers_backend.programs]
