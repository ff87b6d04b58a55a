"""The one-launch graph loop (kernels/csrc/while_loop.cu): built with nvcc and loaded here without
a GPU; its argument checks and a CUDA failure come back as typed errors, not crashes. Running it
needs a GPU (tests/gpu)."""

import re
import shutil
import subprocess

import pytest
import torch

from ddpm_engine.cuda import c_loop
from ddpm_engine.cuda import graph_loop
from ddpm_engine.errors import BackendUnavailableError

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and c_loop._find_nvcc(c_loop.cuda_home()) is None,
                                reason="no nvcc here: the graph loop (CUDA C++) cannot be built")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return graph_loop.load_graph_loop(cache_dir=tmp_path_factory.mktemp("loop-cache"))


@needs_nvcc
def test_builds_loads_and_checks_arguments(lib):
    assert lib.path.suffix == ".so" and lib.path.exists()
    assert lib.supported  # this toolkit (CUDA 13) has conditional WHILE nodes
    with pytest.raises(c_loop.CudaError, match="handle is 0"):
        lib.create(0)
    loop = graph_loop.GraphLoop(lib, 0)
    with pytest.raises(c_loop.CudaError, match="closed"):
        loop.run(0, 10)
    loop.close()  # closing an empty loop is a no-op


@needs_nvcc
def test_cuda_failure_is_a_typed_error_without_a_gpu(lib):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: a bogus graph handle would not fail cleanly")
    with pytest.raises(c_loop.CudaError) as info:  # the first CUDA call (cudaMalloc) fails: no driver/device
        lib.create(1)
    assert isinstance(info.value, BackendUnavailableError) and info.value.code != 0
    assert "failed" in str(info.value) and "code" in str(info.value)


@needs_nvcc
def test_builds_sm90_machine_code_plus_ptx_linked_to_a_versioned_cudart(lib):
    code = graph_loop.embedded_device_code(lib.path)
    if not torch.cuda.is_available():  # the default arch without a GPU: 90 (H100)
        assert code == [("ptx", 90), ("sm", 90)]
    else:
        assert code == [("ptx", graph_loop.cuda_arch()), ("sm", graph_loop.cuda_arch())]
    needed = subprocess.run(["readelf", "-d", str(lib.path)], capture_output=True, text=True).stdout
    if needed:
        assert re.search(r"NEEDED.*\[libcudart\.so\.\d+\]", needed), needed  # linked by SONAME, not libcudart.so
        assert "RUNPATH" in needed or "RPATH" in needed


@needs_nvcc
def test_arch_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_CUDA_ARCH", "80")
    assert graph_loop.cuda_arch() == 80
    cmd = graph_loop.nvcc_command("out.so", graph_loop.SOURCE, 80, c_loop.find_cudart())
    assert "arch=compute_80,code=sm_80" in cmd and "arch=compute_80,code=compute_80" in cmd
    assert "-cudart" in cmd and cmd[cmd.index("-cudart") + 1] == "none" and "-lcudart" not in cmd


def test_missing_cudart_is_a_typed_error(monkeypatch, tmp_path):
    monkeypatch.setattr(c_loop, "find_cudart", lambda: None)
    monkeypatch.setattr(c_loop, "_find_nvcc", lambda home: "/usr/bin/nvcc")
    with pytest.raises(BackendUnavailableError, match="DDPM_CUDART"):
        graph_loop.build_graph_loop(tmp_path)


def test_without_nvcc_the_error_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(c_loop, "_find_nvcc", lambda home: None)
    with pytest.raises(BackendUnavailableError, match="needs nvcc"):
        graph_loop.build_graph_loop(tmp_path)


def test_graph_loop_is_a_graph_driver():
    from ddpm_engine.cuda import graphs

    assert "graph_loop" in graphs.DRIVERS
