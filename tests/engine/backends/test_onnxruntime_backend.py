"""The onnxruntime backend on the CPU: parity with eager per step and over whole trajectories,
and typed errors for a graph of another model, a corrupt file, bad precision and bad inputs."""

import random

import pytest
import torch

from ddpm_engine import Engine, backends
from ddpm_engine.backends import onnxruntime_backend
from ddpm_engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from ddpm_engine.checkpoints import from_module
from ddpm_engine.errors import BackendUnavailableError, InvalidRequestError, ModelLoadError
from ddpm_engine.models import SeedUNet
from ddpm_engine.export.onnx_export import export_onnx

SHAPE = (1, 8, 8)


def small_model(widths=(8, 16), shape=SHAPE):
    torch.manual_seed(random.getrandbits(31))
    module = SeedUNet(shape[0], widths).eval()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return from_module(module, {"clip_sample": True}, shape, name="small")


@pytest.fixture(scope="module")
def loaded():
    return small_model()


@pytest.fixture(scope="module")
def backend(loaded, cache):
    return onnxruntime_backend.create(loaded, torch.device("cpu"), "fp32")


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("batch", [1, 3])
def test_each_step_matches_eager(backend, loaded, batch):
    for _ in range(3):
        x = torch.randn(batch, *SHAPE)
        t = torch.randint(0, 1000, (batch,))
        with torch.inference_mode():
            got = backend(x, t)
            want = loaded.module(x, t)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_trajectories_match_the_torch_backend(loaded, cache, sampler):
    seeds = [random.getrandbits(64) for _ in range(3)]
    fast = Engine(loaded, backend="onnxruntime", device="cpu").sample(seeds, sampler=sampler, steps=10)
    ref = Engine(loaded, backend="torch", device="cpu").sample(seeds, sampler=sampler, steps=10)
    assert (fast - ref).abs().max() <= 1e-4


def test_available_on_the_cpu_at_fp32_only():
    assert onnxruntime_backend.unavailable_reason(torch.device("cpu")) is None
    assert backends.available("cpu")["onnxruntime"] is None
    assert "fp32" in backends.available("cpu", "bf16")["onnxruntime"]


def test_cuda_needs_the_gpu_package():
    import onnxruntime as ort

    reason = onnxruntime_backend.unavailable_reason(torch.device("cuda"))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert reason is None
    else:
        assert "onnxruntime-gpu" in reason


def test_from_file_runs_any_conforming_graph(backend, loaded):
    other = OnnxRuntimeBackend.from_file(backend.path)
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    assert torch.equal(other(x, t), backend(x, t))


def test_a_graph_of_another_model_is_refused(backend, loaded, tmp_path):
    with pytest.raises(ModelLoadError, match="another model"):
        OnnxRuntimeBackend(backend.path, "cpu", expected_hash="0" * 64)
    wider = small_model(shape=(1, 16, 16))
    path = export_onnx(wider, tmp_path / "wider.onnx")
    with pytest.raises(ModelLoadError, match="shape"):
        OnnxRuntimeBackend(path, "cpu", expected_shape=SHAPE)


def test_corrupt_or_missing_file_is_a_model_load_error(backend, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(backend.path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="re-export"):
        OnnxRuntimeBackend.from_file(broken)
    with pytest.raises(ModelLoadError, match="no ONNX file"):
        OnnxRuntimeBackend.from_file(tmp_path / "absent.onnx")


def test_only_fp32(loaded, cache):
    with pytest.raises(BackendUnavailableError, match="fp32"):
        Engine(loaded, backend="onnxruntime", device="cpu", precision="fp16")


def test_bad_inputs_are_typed_errors(backend, monkeypatch):
    with pytest.raises(InvalidRequestError, match="expected x"):
        backend(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(InvalidRequestError, match="expected x"):
        backend(torch.randn(2, *SHAPE), torch.zeros(3, dtype=torch.int64))
    monkeypatch.setattr(backend, "_check", lambda x, t: None)  # what ORT itself says, typed
    with pytest.raises(InvalidRequestError, match="ONNX Runtime failed"):
        backend(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))


def test_torch_threads_are_lent_to_ort_and_restored():
    """During an ORT-on-CPU run the engine's own torch work uses one thread; afterwards the
    process's setting is back, also after an error."""
    import torch

    from ddpm_engine.threads import yield_cpu_to

    class OwnsPool:
        owns_cpu_threads = True

    before = torch.get_num_threads()
    with yield_cpu_to(OwnsPool()):
        assert torch.get_num_threads() == 1
        with yield_cpu_to(OwnsPool()):  # nested / concurrent runs
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    try:
        with yield_cpu_to(OwnsPool()):
            raise ValueError("boom")
    except ValueError:
        pass
    assert torch.get_num_threads() == before
    with yield_cpu_to(object()):  # other backends: untouched
        assert torch.get_num_threads() == before


def test_a_corrupt_cached_graph_is_re_exported_once(loaded, cache):
    first = onnxruntime_backend.create(loaded, torch.device("cpu"), "fp32")
    good = first.path.read_bytes()
    first.path.write_bytes(good[:1000])  # truncated, as by a crash of an older version
    again = onnxruntime_backend.create(loaded, torch.device("cpu"), "fp32")
    assert again.path == first.path and again.path.read_bytes() == good
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    assert torch.equal(again(x, t), first(x, t))


def test_graph_drivers_are_refused_with_the_reason(backend):
    """ORT's CUDA provider is pinned to one stream, a graph is captured on another: the graph
    sampler checks ``graph_capturable`` and refuses with a typed error that says why."""
    from ddpm_engine.backends.aoti_backend import AOTIBackend
    from ddpm_engine.backends.base import Backend
    from ddpm_engine.backends.tensorrt_backend import TensorRTBackend
    from ddpm_engine.backends.torch_backend import TorchBackend

    assert OnnxRuntimeBackend.graph_capturable is False and backend.graph_capturable is False
    assert [cls.graph_capturable for cls in (Backend, TorchBackend, AOTIBackend, TensorRTBackend)] == [True] * 4
    with pytest.raises(BackendUnavailableError, match="stream"):
        backend.check_graph_capturable()
    TorchBackend(torch.nn.Identity(), "cpu").check_graph_capturable()  # no error
