"""ONNX export: a valid graph with a dynamic batch, the model's identity in its metadata, and a
disk cache keyed by the weights that is reused and never left half-written."""

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddpm_engine import cache
from ddpm_engine.checkpoints import from_module
from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.models import SeedUNet
from ddpm_engine.export import iospec, onnx_export
from ddpm_engine.export.onnx_export import export_onnx

SHAPE = (1, 8, 8)


def small_model(seed=None):
    torch.manual_seed(random.getrandbits(31) if seed is None else seed)
    module = SeedUNet(1, (8, 16)).eval()
    for m in module.modules():  # non-trivial BatchNorm statistics, so folding them is tested too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return from_module(module, sample_shape=SHAPE, name="small")


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ort_vs_eager(path, loaded, batch):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, *loaded.sample_shape)
    t = torch.randint(0, 1000, (batch,))
    got = session.run([iospec.OUTPUT], {iospec.SAMPLE: x.numpy(), iospec.TIMESTEP: t.numpy()})[0]
    with torch.no_grad():
        want = loaded.module(x, t).numpy()
    return rel_err(got, want)


def test_graph_passes_checker_with_dynamic_batch_and_identity(tmp_path):
    loaded = small_model()
    path = export_onnx(loaded, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    inputs, outputs = iospec.from_onnx(model)
    assert inputs == [("sample", "float32", ("batch", *SHAPE)), ("timestep", "int64", ("batch",))]
    assert outputs == [("model_output", "float32", ("batch", *SHAPE))]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[iospec.META_WEIGHTS_HASH] == loaded.weights_hash
    assert iospec.sample_shape_from_metadata(meta) == SHAPE
    for batch in (1, 3):  # traced at batch 2: other batch sizes must still match eager
        assert ort_vs_eager(path, loaded, batch) <= 1e-5


def test_cache_is_reused_and_keyed_by_the_weights(tmp_path, monkeypatch):
    calls = []
    trace = onnx_export._trace
    monkeypatch.setattr(onnx_export, "_trace", lambda *a: calls.append(1) or trace(*a))
    loaded = small_model()
    first = export_onnx(loaded, cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert export_onnx(loaded, cache_dir=tmp_path) == first and len(calls) == 1
    assert first.stat().st_mtime_ns == mtime

    with torch.no_grad():
        loaded.module.out.bias.add_(0.5)
    changed = from_module(loaded.module, sample_shape=SHAPE, name="small")
    second = export_onnx(changed, cache_dir=tmp_path)
    assert second != first and first.is_file() and len(calls) == 2
    assert ort_vs_eager(second, changed, 2) <= 1e-5
    assert export_onnx(changed, cache_dir=tmp_path, opset=17) != second  # the opset is in the key too


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    path = export_onnx(small_model())
    assert path.parent == tmp_path / "onnx" and path.is_file()


def test_a_crash_while_writing_leaves_no_file_to_reuse(tmp_path, monkeypatch):
    loaded = small_model()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(loaded, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file
    monkeypatch.undo()
    path = export_onnx(loaded, cache_dir=tmp_path)
    onnx.checker.check_model(str(path))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidRequestError, match="opset"):
        export_onnx(small_model(), tmp_path / "m.onnx", opset=13)
    with pytest.raises(InvalidRequestError, match="exporter"):
        export_onnx(small_model(), tmp_path / "m.onnx", exporter="tensorflow")


def test_dynamo_exporter_also_matches_eager(tmp_path):
    loaded = small_model()
    path = export_onnx(loaded, cache_dir=tmp_path, exporter="dynamo")
    onnx.checker.check_model(str(path))
    assert iospec.mismatches(*iospec.from_onnx(onnx.load(str(path))), SHAPE) == []
    for batch in (1, 3):
        assert ort_vs_eager(path, loaded, batch) <= 1e-5


@pytest.mark.slow
def test_cifar10_unet_export_matches_eager(tmp_path):
    pytest.importorskip("diffusers")
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, cifar10_unet

    loaded = from_module(cifar10_unet(seed=random.getrandbits(31)), CIFAR10_SCHEDULER_CONFIG, (3, 32, 32), "cifar10")
    path = export_onnx(loaded, cache_dir=tmp_path)
    for batch in (1, 3):
        assert ort_vs_eager(path, loaded, batch) <= 1e-5


def test_exports_in_several_threads_at_once_all_succeed(tmp_path):
    """torch's exporter keeps process-wide state: exports from other threads (an engine made in
    each, OpenVINO's background compile) take turns instead of failing."""
    from concurrent.futures import ThreadPoolExecutor

    models = [small_model(seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda k: export_onnx(models[k], tmp_path / f"m{k}.onnx"), range(4)))
    for loaded, path in zip(models, paths):
        assert ort_vs_eager(path, loaded, 2) <= 1e-5


def test_weights_over_the_limit_go_to_one_external_data_file_that_the_runtimes_read(tmp_path, monkeypatch):
    """Over EXTERNAL_DATA_BYTES (for protobuf's 2 GiB limit; 0 here) the weights (every tensor over
    1 KiB) are written to <cache key>.onnx.data beside the graph; ONNX Runtime and OpenVINO read it,
    also from the cache (built under a temporary name, then renamed)."""
    from ddpm_engine import backends

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path / "cache"))
    loaded = small_model()
    path = export_onnx(loaded, tmp_path / "out" / "m.onnx")
    data = path.parent / (onnx_export.cached_path(loaded).name + ".data")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, data.name])  # no staging left
    graph = onnx.load(str(path), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and sum(t.ByteSize() for t in graph.graph.initializer if t not in external) < 64 * 1024
    assert data.stat().st_size > sum(p.numel() * 4 for p in loaded.module.parameters()) // 2
    onnx.checker.check_model(str(path))
    for batch in (1, 3):
        assert ort_vs_eager(path, loaded, batch) <= 1e-5
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    with torch.no_grad():
        want = loaded.module(x, t).numpy()
    ran = []
    for name in ("onnxruntime", "openvino"):
        if backends.available("cpu", "fp32", [name])[name] is None:
            assert rel_err(backends.create(name, loaded, "cpu", "fp32")(x, t).numpy(), want) <= 1e-5, name
            ran.append(name)
    cached = onnx_export.cached_path(loaded)
    assert ran and cached.is_file() and (cached.parent / (cached.name + ".data")).is_file()
