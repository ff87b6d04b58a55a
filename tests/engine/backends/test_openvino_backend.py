"""What is special to the openvino backend on the CPU (the contract is test_contract.py's): bf16
where the CPU has it, static-shape compiles of the first batch sizes that recur (off the request
path: calls run the dynamic model meanwhile, the compile waits for a quiet moment and is dropped
if the program ends first; ``prepare`` compiles ahead), zero-copy output, its
compiled-model cache (a blob of another model, another OpenVINO version or a corrupt one rebuilt
once; the blob mapped, not read), precision refusals on a CPU faked to lack bf16, the missing-package
error, and the check of the ONNX graph it compiles."""

import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch

pytest.importorskip("openvino")

from ddpm_engine import Engine, backends, cpu  # noqa: E402
from ddpm_engine import cache as cache_module  # noqa: E402
from ddpm_engine.backends import openvino_backend  # noqa: E402
from ddpm_engine.backends.openvino_backend import OpenVINOBackend  # noqa: E402
from ddpm_engine.errors import BackendUnavailableError, MissingDependencyError, ModelLoadError  # noqa: E402

from .helpers import SHAPE, rel_err, small_model  # noqa: E402

NO_BF16 = frozenset({"avx2", "fma", "avx512f"})


@pytest.fixture(scope="module")
def loaded():
    return small_model()


def create(loaded, precision="fp32"):
    return backends.create("openvino", loaded, "cpu", precision)


@pytest.fixture(scope="module")
def backend(loaded, cache):
    return create(loaded)


@pytest.fixture
def at_once(monkeypatch):
    """Static compiles asked for at a size's first call and started without waiting for quiet."""
    monkeypatch.setattr(openvino_backend, "STATIC_AFTER_CALLS", 1)
    monkeypatch.setattr(openvino_backend, "QUIET_S", 0.0)


@pytest.mark.skipif(not cpu.native_bf16(), reason="this CPU has no native bf16 (AVX512_BF16 / AMX)")
def test_bf16_is_bf16_and_close_to_eager(loaded, cache, backend):
    bf16 = create(loaded, "bf16")
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    x, t = torch.randn(4, *SHAPE), torch.randint(0, 1000, (4,))
    with torch.inference_mode():
        want = loaded.module(x, t)
    err = rel_err(bf16(x, t), want)
    assert 1e-5 < err <= 3e-2  # bf16's 8-bit mantissa shows, and stays small
    assert rel_err(backend(x, t), want) <= 1e-5  # the fp32 blob, imported after a bf16 one, is still fp32


def test_outputs_are_written_in_place_and_never_reused(backend):
    x1, x2 = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    t = torch.randint(0, 1000, (2,))
    first = backend(x1, t)
    kept = first.clone()
    assert backend.request_for(2).get_output_tensor(0).data.ctypes.data == first.data_ptr()  # no copy out
    second = backend(x2, t)
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_the_first_batch_sizes_that_recur_run_static_shapes_and_the_rest_the_dynamic_model(loaded, cache,
                                                                                            monkeypatch):
    monkeypatch.setattr(openvino_backend, "STATIC_BATCHES", 2)
    monkeypatch.setattr(openvino_backend, "STATIC_AFTER_CALLS", 2)
    monkeypatch.setattr(openvino_backend, "QUIET_S", 0.0)
    backend = create(loaded)
    for batch in (2, 3, 1, 3, 1, 2):  # 3 and 1 recur first and take the two static slots; 2 runs dynamic shapes
        x, t = torch.randn(batch, *SHAPE), torch.randint(0, 1000, (batch,))
        with torch.inference_mode():
            got, want = backend(x, t), loaded.module(x, t)
        assert rel_err(got, want) <= 1e-5, f"batch {batch}"
    backend.prepare([])  # waits for the compiles the calls started
    static = {b: backend.request_for(b) for b in (1, 2, 3)}
    assert static[2] is backend.request and static[1] is not backend.request and static[3] is not static[1]
    assert all(r.get_compiled_model().input(0).get_partial_shape().is_static for r in (static[1], static[3]))
    assert [d.get_length() for d in static[3].get_compiled_model().input(0).get_partial_shape()] == [3, *SHAPE]
    assert not backend.request.get_compiled_model().input(0).get_partial_shape().is_static


def _deferred(loaded, monkeypatch, quiet_s: float, max_defer_s: float):
    """(a backend whose static compiles wait for ``quiet_s`` / at most ``max_defer_s``, an event set
    when a compile starts, inputs of batch 2)."""
    monkeypatch.setattr(openvino_backend, "QUIET_S", quiet_s)
    monkeypatch.setattr(openvino_backend, "MAX_DEFER_S", max_defer_s)
    started, real = threading.Event(), openvino_backend.compile_static

    def watched(*args):
        started.set()
        return real(*args)

    monkeypatch.setattr(openvino_backend, "compile_static", watched)
    return create(loaded), started, (torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,)))


def test_a_static_compile_waits_until_no_call_has_run_for_quiet_s(loaded, cache, monkeypatch):
    backend, started, inputs = _deferred(loaded, monkeypatch, 1.0, 600.0)
    end = time.perf_counter() + 2.5
    while time.perf_counter() < end:  # a burst: the compile is asked for at the 4th call, and waits
        backend(*inputs)
    assert list(backend._compiling) == [2] and not started.is_set()
    assert started.wait(60)  # the calls stopped: it starts
    backend.prepare([])
    assert backend.request_for(2) is not backend.request


def test_a_static_compile_waits_at_most_max_defer_s(loaded, cache, monkeypatch):
    backend, started, inputs = _deferred(loaded, monkeypatch, 600.0, 0.5)
    while not started.is_set():  # never quiet: it starts after MAX_DEFER_S all the same
        backend(*inputs)
    backend.prepare([])
    assert backend.request_for(2) is not backend.request


def test_a_backend_dropped_before_the_quiet_moment_compiles_nothing(loaded, cache, monkeypatch):
    """The waiting compile holds its backend weakly: an engine dropped meanwhile frees it at once,
    and the thread ends without compiling."""
    backend, started, inputs = _deferred(loaded, monkeypatch, 600.0, 600.0)
    for _ in range(openvino_backend.STATIC_AFTER_CALLS):
        backend(*inputs)
    thread, dropped = backend._compiling[2], weakref.ref(backend)
    del backend
    gc.collect()
    assert dropped() is None
    thread.join(10)
    assert not thread.is_alive() and not started.is_set()


def test_a_program_that_ends_before_the_quiet_moment_compiles_nothing_and_exits(tmp_path):
    script = f"""
import torch
from ddpm_engine import backends
from ddpm_engine.backends import openvino_backend
from tests.engine.backends.helpers import SHAPE, small_model
openvino_backend.QUIET_S = openvino_backend.MAX_DEFER_S = 600.0
def refuse(*args):
    print("compiled at exit", flush=True)
    raise RuntimeError("compiled at exit")
openvino_backend.compile_static = refuse
backend = backends.create("openvino", small_model(), "cpu", "fp32")
x, t = torch.randn(2, *SHAPE), torch.zeros(2, dtype=torch.int64)
for _ in range(openvino_backend.STATIC_AFTER_CALLS):
    backend(x, t)
assert list(backend._compiling) == [2]
print("done")
"""
    # waiting for the quiet moment at exit would take 600 s: the timeout fails the test
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DDPM_ENGINE_CACHE": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stdout + out.stderr


def test_a_failed_static_compile_warns_and_runs_the_dynamic_model(loaded, cache, monkeypatch, at_once):
    def fails(*a):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(openvino_backend, "compile_static", fails)
    backend = create(loaded)
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    with pytest.warns(RuntimeWarning, match="simulated compile failure"):
        got = backend(x, t)
        backend.prepare([])  # the compile runs on a background thread: wait for its warning
    with torch.inference_mode():
        assert rel_err(got, loaded.module(x, t)) <= 1e-5
    assert backend.request_for(2) is backend.request


def test_a_first_call_runs_the_dynamic_model_while_its_static_shape_compiles(loaded, cache, monkeypatch,
                                                                             at_once):
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = openvino_backend.compile_static

    def slow_compile(*args):
        started.set()
        release.wait(60)
        try:
            return real(*args)
        finally:
            finished.set()

    monkeypatch.setattr(openvino_backend, "compile_static", slow_compile)
    backend = create(loaded)
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    with torch.inference_mode():
        want = loaded.module(x, t)
    try:
        for _ in range(3):  # a burst of one new batch size: each call returns before the compile ends
            assert rel_err(backend(x, t), want) <= 1e-5
        assert started.wait(60) and not finished.is_set()
        assert backend.request_for(2) is backend.request and list(backend._compiling) == [2]  # one compile, pending
    finally:
        release.set()
    backend.prepare([2])
    assert finished.is_set() and backend.request_for(2) is not backend.request and not backend._compiling
    assert backend.request_for(2).get_compiled_model().input(0).get_partial_shape().is_static
    assert rel_err(backend(x, t), want) <= 1e-5


def test_prepare_compiles_ahead(loaded, cache):
    backend = create(loaded)
    backend.prepare([1, 5])
    assert sorted(backend._static) == [1, 5] and not backend._compiling
    assert all(backend.request_for(b) is not backend.request for b in (1, 5))


def test_static_shapes_compile_clones_of_one_source_graph_read_once(loaded, cache, monkeypatch, test_seed):
    reads, real = [], openvino_backend.source_model

    def counted(*args):
        reads.append(args[-1])
        return real(*args)

    monkeypatch.setattr(openvino_backend, "source_model", counted)
    backend = create(loaded)
    backend.prepare([1, 2, 3])  # three compiles at once, on three threads
    assert reads == ["fp32"] and sorted(backend._static) == [1, 2, 3]
    x, t = torch.randn(3, *SHAPE), torch.randint(0, 1000, (3,))
    alone = openvino_backend.compile_static(openvino_backend.SourceGraph(loaded, "fp32"), 3)  # read for it alone
    assert len(reads) == 2
    with torch.inference_mode():
        assert torch.equal(backend(x, t), _run(alone, x, t))
        assert rel_err(backend(x, t), loaded.module(x, t)) <= 1e-5


def test_a_large_static_batch_runs_as_requests_in_flight_each_on_its_part(loaded, cache, monkeypatch):
    monkeypatch.setattr(openvino_backend, "STREAMS_MIN_BATCH", 4)
    monkeypatch.setattr(openvino_backend.threads, "openvino_options", lambda: {"INFERENCE_NUM_THREADS": 2})
    assert [openvino_backend.streams_for(b) for b in (2, 3, 4, 5, 6)] == [1, 1, 2, 1, 2]
    backend = create(loaded)
    backend.prepare([6])
    parts = backend.request_for(6)
    assert isinstance(parts, tuple) and len(parts) == 2
    assert all([d.get_length() for d in r.get_compiled_model().input(0).get_partial_shape()] == [3, *SHAPE]
               for r in parts)
    x, t = torch.randn(6, *SHAPE), torch.randint(0, 1000, (6,))
    with torch.inference_mode():
        assert rel_err(backend(x, t), loaded.module(x, t)) <= 1e-5
    monkeypatch.setattr(openvino_backend.threads, "openvino_options", lambda: {"INFERENCE_NUM_THREADS": 1})
    assert openvino_backend.streams_for(6) == 1  # one thread: one stream


def replace(path, data: bytes) -> None:
    """A cached file replaced as the cache replaces files (never rewritten in place: a backend made
    from it runs from its mapping, ``import_blob``)."""
    cache_module.write_bytes(path, data)


def _header(path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.readline())


def test_a_blob_of_another_model_or_openvino_version_is_rebuilt(backend, loaded, cache):
    other = small_model()
    foreign = create(other)
    good = backend.path.read_bytes()
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    want = backend(x, t)
    with pytest.raises(ModelLoadError, match="something else"):  # refused when opened directly
        OpenVINOBackend(foreign.path, openvino_backend.identity(loaded, "fp32"), SHAPE)
    replace(backend.path, foreign.path.read_bytes())  # another model's blob under this model's name
    rebuilt = create(loaded)
    assert _header(rebuilt.path)["weights"] == loaded.weights_hash
    assert rel_err(rebuilt(x, t), want) <= 1e-5

    header, _, blob = good.partition(b"\n")
    old = dict(json.loads(header), openvino="2020.1.0")
    replace(backend.path, json.dumps(old).encode() + b"\n" + blob)  # written by another OpenVINO
    rebuilt = create(loaded)
    assert _header(rebuilt.path)["openvino"] == openvino_backend._ov().get_version()


def test_a_corrupt_blob_is_rebuilt_once(backend, loaded, monkeypatch):
    good = backend.path.read_bytes()
    header, _, blob = good.partition(b"\n")
    replace(backend.path, header + b"\n" + blob[: len(blob) // 3])  # truncated
    rebuilt = create(loaded)
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    assert torch.equal(rebuilt(x, t), backend(x, t))

    def broken_compile(loaded, precision, path):  # a compiler that writes garbage every time
        path.write_bytes(header + b"\n" + b"not a blob")

    monkeypatch.setattr(openvino_backend, "compile_blob", broken_compile)
    replace(backend.path, b"garbage")
    with pytest.raises(ModelLoadError, match="cannot import"):  # rebuilt once, then the error is raised
        create(loaded)
    backend.path.unlink()


def _imported_from_bytes(path, precision="fp32"):
    """The blob at ``path`` imported as a read (not mapped) copy: the reference for ``import_blob``."""
    with open(path, "rb") as f:
        f.readline()
        data = f.read()
    return openvino_backend._ov().Core().import_model(data, "CPU", openvino_backend.config(precision))


def _run(compiled, x, t):
    return torch.from_numpy(compiled.create_infer_request().infer([x.numpy(), t.numpy()])[0].copy())


def test_the_blob_runs_from_a_mapping_of_the_cached_file_as_a_read_copy_would(loaded, cache, test_seed):
    backend = create(loaded)
    maps = "/proc/self/maps"
    if os.path.exists(maps):  # file-backed pages, not a private copy
        with open(maps) as f:
            assert str(backend.path) in f.read()
    x, t = torch.randn(3, *SHAPE), torch.randint(0, 1000, (3,))
    gc.collect()  # nothing but the backend holds the mapping now: it must outlive the compiled model
    assert torch.equal(backend(x, t), _run(_imported_from_bytes(backend.path), x, t))


def test_an_openvino_that_imports_no_tensor_is_given_the_bytes(loaded, cache, test_seed):
    backend, real = create(loaded), openvino_backend._ov().Core()

    class OldCore:  # import_model(bytes) only, as in older OpenVINO releases
        def import_model(self, blob, device, config):
            if not isinstance(blob, bytes):
                raise TypeError("import_model(): incompatible function arguments")
            return real.import_model(blob, device, config)

    with open(backend.path, "rb") as f:
        offset = len(f.readline())
    compiled, mapping = openvino_backend.import_blob(OldCore(), backend.path, offset, "fp32")
    assert mapping is None
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    assert torch.equal(_run(compiled, x, t), backend(x, t))


def test_a_blob_with_nothing_after_its_header_is_refused_as_corrupt(loaded, cache, tmp_path):
    backend = create(loaded)
    with open(backend.path, "rb") as f:
        header = f.readline()
    for rest in (b"", b"x"):
        (tmp_path / "short.ovblob").write_bytes(header + rest)
        with pytest.raises(ModelLoadError, match="cannot import"):
            OpenVINOBackend(tmp_path / "short.ovblob", openvino_backend.identity(loaded, "fp32"), SHAPE)


def test_processes_that_build_run_and_drop_mapped_backends_end_cleanly(tmp_path):
    script = """
import gc, sys
import torch
from ddpm_engine import backends
from tests.engine.backends.helpers import SHAPE, small_model
loaded = small_model()
x, t = torch.randn(2, *SHAPE), torch.zeros(2, dtype=torch.int64)
kept = []
for k in range(3):
    backend = backends.create("openvino", loaded, "cpu", "fp32")
    backend.prepare([2])
    out = backend(x, t)
    if k == 1:
        kept.append(backend)  # alive at exit
    del backend
    gc.collect()
    assert torch.isfinite(out).all()
print("done")
"""
    for _ in range(3):  # the first builds the cache; the later ones map its files
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "DDPM_ENGINE_CACHE": str(tmp_path)})
        assert out.returncode == 0 and out.stdout.strip() == "done", out.stdout + out.stderr


def test_reduced_precision_needs_it_natively(loaded, monkeypatch):
    monkeypatch.setattr(cpu, "flags", lambda: NO_BF16)
    for precision in ("bf16", "fp16"):
        reason = OpenVINOBackend.unavailable_reason("cpu", precision)
        assert reason is not None and "native" in reason and "fp32" in reason
        with pytest.raises(BackendUnavailableError, match="native"):
            Engine(loaded, backend="openvino", device="cpu", precision=precision)
    assert OpenVINOBackend.unavailable_reason("cpu", "fp32") is None
    assert "CPU only" in OpenVINOBackend.unavailable_reason("cuda", "fp32")


def test_missing_package_names_it(loaded, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    assert "pip install openvino" in OpenVINOBackend.unavailable_reason("cpu", "fp32")
    with pytest.raises(MissingDependencyError, match="'openvino'.*ddpm-engine\\[openvino\\]"):
        openvino_backend.identity(loaded, "fp32")
    with pytest.raises(BackendUnavailableError, match="pip install openvino"):
        Engine(loaded, backend="openvino", device="cpu")


def test_an_onnx_graph_of_another_model_or_shape_is_refused(backend, loaded, tmp_path):
    from ddpm_engine.export.onnx_export import cached_path, export_onnx

    core = openvino_backend._ov().Core()
    assert openvino_backend.read_onnx(core, loaded, cached_path(loaded)) is not None
    with pytest.raises(ModelLoadError, match="another model"):
        openvino_backend.read_onnx(core, small_model(), cached_path(loaded))
    wider = dataclasses.replace(small_model(shape=(1, 16, 16)), weights_hash=loaded.weights_hash)
    with pytest.raises(ModelLoadError, match="shape"):  # the right hash, another sample shape
        openvino_backend.read_onnx(core, loaded, export_onnx(wider, tmp_path / "wider.onnx"))
    (tmp_path / "broken.onnx").write_bytes(cached_path(loaded).read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="corrupt"):
        openvino_backend.read_onnx(core, loaded, tmp_path / "broken.onnx")
