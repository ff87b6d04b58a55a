"""The C graph driver (built with nvcc here, no GPU needed) and, on a GPU, CUDA-graph replay."""

import os
import random
import shutil
import time

import pytest
import torch

from ddpm_engine.errors import BackendUnavailableError, EngineError
from ddpm_engine.cuda import driver as drv

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and drv.cuda_home() is None,
                                reason="no nvcc and no CUDA toolkit here: the C driver cannot be built")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("driver-cache")


@needs_nvcc
def test_driver_builds_loads_and_reports_cleanly(cache):
    path = drv.build_driver(cache)
    assert path.exists() and path.parent == cache and path.suffix == ".so"
    d = drv.GraphDriver(path)
    v = d.runtime_version()
    assert 10000 <= v < 100000  # e.g. 13000 for CUDA 13.0
    try:
        n = d.device_count()
    except drv.CudaError as exc:  # no GPU / no driver: CUDA's own message, a typed error, no crash
        assert isinstance(exc, BackendUnavailableError) and isinstance(exc, EngineError)
        assert exc.code != 0 and "cudaGetDeviceCount" in str(exc) and "code" in str(exc)
        if not torch.cuda.is_available():
            with pytest.raises(drv.CudaError):  # steps=0: only the stream sync, which fails too
                d.replay(1, 0, 0)
    else:
        assert n >= 0 and (n > 0 or not torch.cuda.is_available())
    with pytest.raises(drv.CudaError, match="handle is 0"):
        d.replay(0, 0, 1)


@needs_nvcc
def test_cache_is_reused_and_keyed_by_source(cache, tmp_path):
    first = drv.build_driver(cache)
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    again = drv.build_driver(cache)
    assert again == first and again.stat().st_mtime_ns == mtime  # not recompiled
    src = tmp_path / "graph_driver.c"
    src.write_text(drv.SOURCE.read_text() + "\n/* changed */\n")
    changed = drv.build_driver(cache, source=src)
    assert changed != first and changed.exists() and first.exists()
    assert drv.GraphDriver(changed).runtime_version() == drv.GraphDriver(first).runtime_version()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left behind


@needs_nvcc
def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    assert drv.driver_cache_dir() == tmp_path / "driver"
    path = drv.build_driver()
    assert path.parent == tmp_path / "driver"
    assert drv.load_driver(path) is drv.load_driver(path)


def test_build_error_is_typed(tmp_path):
    with pytest.raises(BackendUnavailableError, match="missing"):
        drv.build_driver(tmp_path, source=tmp_path / "nope.c")
    if shutil.which("nvcc") is not None or drv.cuda_home() is not None:
        bad = tmp_path / "bad.c"
        bad.write_text("int oops( {\n")
        with pytest.raises(BackendUnavailableError, match="building the C graph driver failed"):
            drv.build_driver(tmp_path, source=bad)


def test_graphs_import_is_cuda_free_and_construct_needs_cuda():
    from ddpm_engine.cuda import graphs

    assert graphs.buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graphs.buckets(6) == [1, 2, 4, 6]
    if not torch.cuda.is_available():
        from ddpm_engine import Engine
        from ddpm_engine.models import SeedUNet

        eng = Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=(1, 8, 8), backend="torch", device="cpu")
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            graphs.GraphedSampler(eng.plan("ddpm", 10), capture=True)


# ---- GPU: graph replay matches Engine.sample ---------------------------------------------------
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cuda_engine():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ddpm_engine import Engine
    from ddpm_engine.models import SeedUNet

    torch.manual_seed(0)
    return Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=SHAPE, backend="torch", device="cuda",
                              scheduler={"clip_sample": True})


@pytest.mark.gpu
@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 50, 0.0), ("ddim", 20, 0.0), ("ddim", 20, 1.0)])
def test_graph_replay_matches_engine_sample(cuda_engine, sampler, steps, eta):
    from ddpm_engine.cuda.graphs import GraphedSampler

    seeds = [random.getrandbits(64) for _ in range(3)]
    ref = cuda_engine.sample(seeds, sampler=sampler, steps=steps, eta=eta)
    gs = GraphedSampler(cuda_engine, cuda_engine.step_spec(sampler, eta), steps, max_batch=8)
    py = gs.run(seeds, driver="python")
    assert py.shape == ref.shape and py.device.type == "cuda"
    assert (py - ref).abs().max().item() <= 1e-4
    c = gs.run(seeds, driver="c")
    assert (c - ref).abs().max().item() <= 1e-4
    again = gs.run(seeds, driver="python")  # static buffers are refilled: replays do not leak state
    assert (again - py).abs().max().item() <= 1e-6


@pytest.mark.gpu
def test_padding_to_a_bucket_does_not_change_an_image(cuda_engine):
    from ddpm_engine.cuda.graphs import GraphedSampler

    gs = GraphedSampler(cuda_engine, "ddim", 20, max_batch=8)
    s = random.getrandbits(64)
    alone = gs.run([s])  # bucket 1
    in5 = gs.run([1, 2, s, 3, 4])  # bucket 8, 3 padding rows
    assert sorted(gs._graphs) == [1, 8]
    assert (alone[0] - in5[2]).abs().max().item() <= 1e-5
    many = gs.run([s] + list(range(1, 12)))  # above max_batch: chunked
    assert many.shape[0] == 12 and (many[0] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.gpu
def test_c_driver_sees_the_gpu_and_times(cuda_engine):
    from ddpm_engine.cuda.graphs import GraphedSampler

    assert drv.load_driver().device_count() >= 1
    gs = GraphedSampler(cuda_engine, "ddim", 20, max_batch=4)
    for d in ("python", "c"):
        r = gs.host_us_per_step([1, 2, 3, 4], driver=d, reps=3)
        assert r["wall_us_per_step"] > 0
