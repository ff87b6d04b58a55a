"""What is special to the onnxruntime backend on the CPU (the contract is test_contract.py's): any
conforming graph runs through ``from_file``; typed errors for a graph of another model, a corrupt
or missing file, and what ORT itself refuses; fp32 only; the CUDA provider's package; a corrupt
cached graph re-exported once; torch's threads lent to ORT's pool."""

import pytest
import torch

from ddpm_engine import backends
from ddpm_engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from ddpm_engine.errors import BackendUnavailableError, InvalidRequestError, ModelLoadError
from ddpm_engine.export.onnx_export import export_onnx

from .helpers import SHAPE, small_model


@pytest.fixture(scope="module")
def loaded():
    return small_model()


@pytest.fixture(scope="module")
def backend(loaded, cache):
    return backends.create("onnxruntime", loaded, "cpu", "fp32")


def test_available_on_the_cpu_at_fp32_only():
    assert backends.available("cpu")["onnxruntime"] is None
    for precision in ("bf16", "fp16"):
        assert "fp32 graph only" in backends.available("cpu", precision)["onnxruntime"]


def test_cuda_needs_the_gpu_package():
    import onnxruntime as ort

    reason = OnnxRuntimeBackend.unavailable_reason(torch.device("cuda"), "fp32")
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


def test_from_file_refuses_reduced_precision(backend):
    with pytest.raises(BackendUnavailableError, match="fp32 graph only"):
        OnnxRuntimeBackend.from_file(backend.path, "cpu", "fp16")
    with pytest.raises(InvalidRequestError, match="unknown precision"):
        OnnxRuntimeBackend.from_file(backend.path, "cpu", "fp64")


def test_what_ort_itself_refuses_is_a_typed_error(backend, monkeypatch):
    monkeypatch.setattr(backend, "check_inputs", lambda x, t: None)  # past the engine's own check
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
    first = backends.create("onnxruntime", loaded, "cpu", "fp32")
    good = first.path.read_bytes()
    first.path.write_bytes(good[:1000])  # truncated, as by a crash of an older version
    again = backends.create("onnxruntime", loaded, "cpu", "fp32")
    assert again.path == first.path and again.path.read_bytes() == good
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    assert torch.equal(again(x, t), first(x, t))


def test_graph_drivers_are_refused_with_the_reason(backend):
    """ORT's CUDA provider is pinned to one stream, a graph is captured on another: the graph
    sampler checks ``graph_capturable`` and refuses with a typed error that says why."""
    with pytest.raises(BackendUnavailableError, match="stream"):
        backend.check_graph_capturable()
