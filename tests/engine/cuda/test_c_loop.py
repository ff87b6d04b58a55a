"""The C replay loop behind driver="c" (built with a C compiler here; a fake libcuda stands in for the NVIDIA driver)
and, on a GPU, CUDA-graph replay against Engine.sample."""

import ctypes
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ddpm_engine.errors import BackendUnavailableError, EngineError
from ddpm_engine.cuda import c_loop
from ddpm_engine.cuda.graphs import CANARY_TOL

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None
                              and c_loop._find_nvcc(c_loop.cuda_home()) is None,
                              reason="no C compiler here: the C driver cannot be built")
FAKE_LIBCUDA = Path(__file__).with_name("fake_libcuda.c")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("driver-cache")


def has_libcuda() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@needs_cc
def test_driver_builds_loads_and_reports_cleanly(build_dir):
    path = c_loop.build_c_loop(build_dir)
    assert path.exists() and path.parent == build_dir and path.suffix == ".so"
    d = c_loop.CLoopLibrary(path)
    with pytest.raises(c_loop.CudaError, match="handle is 0"):
        d.replay(0, 0, 1)
    if not has_libcuda():  # no NVIDIA driver: a typed error that names the library, no crash
        with pytest.raises(c_loop.CudaError, match="libcuda.so.1") as info:
            d.driver_version()
        assert isinstance(info.value, BackendUnavailableError) and isinstance(info.value, EngineError)
        assert info.value.code == c_loop.NO_LIBCUDA
        with pytest.raises(c_loop.CudaError, match="libcuda.so.1"):
            d.replay(1, 0, 3)
        return
    assert 10000 <= d.driver_version() < 100000  # e.g. 13000 for a CUDA 13.0 driver
    try:
        n = d.device_count()
    except c_loop.CudaError as exc:  # a driver but no GPU: CUDA's own message and code
        assert exc.code != 0 and "code" in str(exc) and not torch.cuda.is_available()
    else:
        assert n == torch.cuda.device_count()  # the driver and torch see the same GPUs


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the fake CUDA driver")
    out = tmp_path_factory.mktemp("fake-libcuda") / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(FAKE_LIBCUDA)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.fake_set_current_ctx.argtypes = [ctypes.c_int]
    return out, lib


def stats(lib) -> dict:
    out = (ctypes.c_int * 5)()
    lib.fake_stats(out)
    return dict(zip(("launches", "syncs", "pushes", "pops", "stream"), out))


@needs_cc
def test_replay_loop_against_a_fake_driver(fake_libcuda, tmp_path):
    """The C loop launches the graph ``steps`` times on the given stream, syncs once, pushes the
    stream's context only on a thread that has none, and stops at the first CUDA error, whose name
    and message come back in a typed error. (Its own build: the driver opens libcuda once per load.)"""
    path, fake = fake_libcuda
    d = c_loop.CLoopLibrary(c_loop.build_c_loop(tmp_path), libcuda=str(path))
    assert d.driver_version() == 13000 and d.device_count() == 1
    stats(fake)
    steps = random.randint(2, 50)
    d.replay(0x1234, 0x42, steps)
    assert stats(fake) == {"launches": steps, "syncs": 1, "pushes": 0, "pops": 0, "stream": 0x42}, steps
    d.replay(0x1234, 0x42, 0)
    assert stats(fake)["syncs"] == 1
    fake.fake_set_current_ctx(0)
    try:
        d.replay(0x1234, 0x42, 3)
        assert stats(fake) == {"launches": 3, "syncs": 1, "pushes": 1, "pops": 1, "stream": 0x42}
    finally:
        fake.fake_set_current_ctx(1)
    with pytest.raises(c_loop.CudaError, match="CUDA_ERROR_ILLEGAL_ADDRESS") as info:
        d.replay(0xBAD, 0x42, 5)
    assert info.value.code == 700 and "illegal memory access" in str(info.value) and "cuGraphLaunch" in str(info.value)
    assert stats(fake)["launches"] == 0 and stats(fake)["syncs"] == 0  # stopped at the first launch
    with pytest.raises(c_loop.CudaError, match="steps"):
        d.replay(0x1234, 0x42, -1)


@needs_cc
def test_cache_is_reused_and_keyed_by_source(build_dir, tmp_path):
    first = c_loop.build_c_loop(build_dir)
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    again = c_loop.build_c_loop(build_dir)
    assert again == first and again.stat().st_mtime_ns == mtime  # not recompiled
    src = tmp_path / "c_loop.c"
    src.write_text(c_loop.SOURCE.read_text() + "\n/* changed */\n")
    changed = c_loop.build_c_loop(build_dir, source=src)
    assert changed != first and changed.exists() and first.exists()
    c_loop.CLoopLibrary(changed)  # loads
    assert not [p for p in build_dir.iterdir() if p.name.startswith(".")]  # no temp files left behind


@needs_cc
def test_cache_dir_from_env_and_a_corrupt_library_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    path = c_loop.build_c_loop()
    assert path.parent == tmp_path / "driver"
    good = path.read_bytes()
    path.write_bytes(good[:100])  # truncated: does not load
    d = c_loop.load_c_loop()
    assert d.path == path and path.read_bytes() == good
    assert c_loop.load_c_loop() is d and c_loop.load_c_loop(path) is d


def test_build_error_is_typed(tmp_path):
    with pytest.raises(BackendUnavailableError, match="missing"):
        c_loop.build_c_loop(tmp_path, source=tmp_path / "nope.c")
    if shutil.which("cc") is not None or shutil.which("gcc") is not None:
        bad = tmp_path / "bad.c"
        bad.write_text("int oops( {\n")
        with pytest.raises(BackendUnavailableError, match="building the C graph driver failed"):
            c_loop.build_c_loop(tmp_path, source=bad)


def test_mapped_cudart_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 123 /usr/lib/libc.so.6\n"
                    "7f02-7f03 r-xp 00000000 08:01 456 /site/nvidia/cu13/lib/libcudart.so.13\n"
                    "7f04-7f05 rw-p 00000000 00:00 0 \n")
    assert c_loop.mapped_cudart(maps) == Path("/site/nvidia/cu13/lib/libcudart.so.13")
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 123 /usr/lib/libc.so.6\n")
    assert c_loop.mapped_cudart(maps) is None
    assert c_loop.mapped_cudart(tmp_path / "absent") is None


def test_find_cudart_order(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_CUDART", str(tmp_path / "libcudart.so.99"))
    assert c_loop.find_cudart() == tmp_path / "libcudart.so.99"
    monkeypatch.delenv("DDPM_CUDART")
    monkeypatch.setattr(c_loop, "mapped_cudart", lambda: tmp_path / "mapped" / "libcudart.so.13")
    assert c_loop.find_cudart() == tmp_path / "mapped" / "libcudart.so.13"
    monkeypatch.setattr(c_loop, "mapped_cudart", lambda: None)
    (tmp_path / "lib64").mkdir()
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.13.0.88", "libcudart_static.a"):
        (tmp_path / "lib64" / name).write_bytes(b"")
    monkeypatch.setattr(c_loop, "cuda_home", lambda: tmp_path)
    assert c_loop.find_cudart() == tmp_path / "lib64" / "libcudart.so.13"  # the SONAME file, not the dev link


# ---- GPU: graph replay matches Engine.sample ---------------------------------------------------
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cuda_engine():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.measure import exact_fp32
    from ddpm_engine import Engine
    from ddpm_engine.models import DoubleConvUNet

    torch.manual_seed(0)
    with exact_fp32():  # the tests compare batch sizes and drivers: no TF32, deterministic cuDNN
        yield Engine.from_module(DoubleConvUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch", device="cuda",
                                 scheduler={"clip_sample": True})


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 50, 0.0), ("ddim", 20, 0.0), ("ddim", 20, 1.0)])
def test_graph_replay_matches_engine_sample(cuda_engine, sampler, steps, eta):
    seeds = [random.getrandbits(64) for _ in range(3)]
    ref = cuda_engine.sample(seeds, sampler=sampler, steps=steps, eta=eta, driver="eager")
    gs = cuda_engine.graphed(sampler, steps, eta=eta, max_batch=8)
    py = gs.run(seeds, driver="python")
    assert py.shape == ref.shape and py.device.type == "cuda"
    assert (py - ref).abs().max().item() <= 1e-4, seeds
    c = gs.run(seeds, driver="c")
    assert (c - ref).abs().max().item() <= 1e-4, seeds
    again = gs.run(seeds, driver="python")  # static buffers are refilled: replays do not leak state
    assert (again - py).abs().max().item() <= 1e-6, seeds


@pytest.mark.gpu
def test_padding_to_a_bucket_does_not_change_an_image(cuda_engine):
    gs = cuda_engine.graphed("ddim", 20, max_batch=8)
    s = random.getrandbits(64)
    alone = gs.run([s])  # bucket 1
    in5 = gs.run([1, 2, s, 3, 4])  # bucket 8, 3 padding rows
    # Across batch sizes, not exact: cuDNN's deterministic mode (exact_fp32) makes a run repeat,
    # but it picks the convolution algorithm per shape, so batch 1 and batch 8 may sum in
    # different orders (fp32 rounding, ~1e-6 per layer, grown over 20 steps). The tolerance is the
    # graph path's fp32 one (the canary's), as for graph replay against the eager loop.
    tol = CANARY_TOL["fp32"]
    assert (alone[0] - in5[2]).abs().max().item() <= tol, s
    many = gs.run([s] + list(range(1, 12)))  # above max_batch: chunked, the first chunk in bucket 8
    assert many.shape[0] == 12 and (many[0] - alone[0]).abs().max().item() <= tol, s


@pytest.mark.gpu
def test_c_driver_sees_the_gpu_and_a_new_enough_driver(cuda_engine):
    d = c_loop.load_c_loop()
    assert d.device_count() == torch.cuda.device_count()
    runtime_major = int(torch.version.cuda.split(".")[0])
    assert d.driver_version() >= 1000 * runtime_major  # the driver runs torch's CUDA runtime


# ---- trust: the C driver is probed in a subprocess before this process loads it ------------------
CRASHES_ON_LOAD = """
#include <signal.h>
__attribute__((constructor)) static void crash(void) { raise(SIGSEGV); }
"""


@pytest.fixture
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(c_loop, "_verdicts", {})


@needs_cc
def test_a_driver_that_crashes_its_process_is_refused_with_the_reason(tmp_path, fresh_verdicts, monkeypatch):
    """Loading this library in-process would kill the caller; the probe's child dies instead."""
    src = tmp_path / "crash.c"
    src.write_text(CRASHES_ON_LOAD)
    lib = tmp_path / "c_loop-crash.so"
    subprocess.run([shutil.which("cc") or shutil.which("gcc"), "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    verdict = c_loop.probe(lib)
    assert verdict["ok"] is False and "SIGSEGV" in verdict["reason"]
    monkeypatch.setattr(c_loop, "build_c_loop", lambda cache_dir=None: lib)
    with pytest.raises(BackendUnavailableError, match="failed its probe in a subprocess.*SIGSEGV"):
        c_loop.trusted_c_loop()
    assert lib not in c_loop._loaded  # never loaded here


def test_a_driver_that_does_not_load_is_refused_and_the_verdict_is_cached(tmp_path, fresh_verdicts, monkeypatch):
    lib = tmp_path / "c_loop-garbage.so"
    lib.write_bytes(b"not an ELF file")
    verdict = c_loop.probe(lib)
    assert verdict["ok"] is False and "could not load the C graph driver" in verdict["reason"]
    records = list(tmp_path.glob("c_loop-garbage.so.probe-*.json"))
    assert len(records) == 1  # one verdict per build, beside it
    monkeypatch.setattr(c_loop, "_probe_in_subprocess", lambda *a: pytest.fail("probed twice"))
    assert c_loop.probe(lib) == verdict  # this process: memo
    monkeypatch.setattr(c_loop, "_verdicts", {})
    assert c_loop.probe(lib) == verdict  # a new process: the file


@needs_cc
def test_a_sound_driver_passes_its_probe_and_loads(build_dir, fake_libcuda, fresh_verdicts, monkeypatch):
    path = c_loop.build_c_loop(build_dir)
    monkeypatch.setenv("DDPM_LIBCUDA", str(fake_libcuda[0]))
    verdict = c_loop.probe(path)
    assert verdict["ok"] is True and verdict["driver_version"] == 13000, verdict  # the fake's version
    monkeypatch.setattr(c_loop, "build_c_loop", lambda cache_dir=None: path)
    assert c_loop.trusted_c_loop().path == path


def test_the_graph_sampler_records_why_the_c_driver_is_not_trusted(monkeypatch):
    from ddpm_engine import Engine
    from ddpm_engine.cuda.graphs import GraphedSampler
    from ddpm_engine.models import DoubleConvUNet

    def refused(cache_dir=None):
        raise BackendUnavailableError("the C graph driver x.so failed its probe in a subprocess: died of SIGSEGV")

    monkeypatch.setattr(c_loop, "trusted_c_loop", refused)
    eng = Engine.from_module(DoubleConvUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch", device="cpu")
    gs = GraphedSampler(eng.plan("ddim", 2), max_batch=2, capture=False)
    with pytest.raises(BackendUnavailableError, match="SIGSEGV"):
        gs.driver()
    assert gs.report()["c_driver"].startswith("failed: ") and "SIGSEGV" in gs.report()["c_driver"]
