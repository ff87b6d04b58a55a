"""The whole reverse chain as one graph launch: kernels/csrc/graph_loop.cu, loaded with ctypes.

``load_graph_loop()`` builds the CUDA source with nvcc (cached like the C driver, see
engine/cuda/driver.py) and returns a ``GraphLoopLibrary``; ``lib.create(step_graph_ptr)`` wraps a
captured step's cudaGraph_t (``torch.cuda.CUDAGraph(keep_graph=True).raw_cuda_graph()``) in a
conditional WHILE node and returns a ``GraphLoop`` whose ``run(stream_ptr, steps)`` launches the
chain once and synchronises once. Needs CUDA >= 12.4 (conditional nodes) at build and run time.

UNVERIFIED on a GPU (this project's CI has nvcc but no GPU): it builds and loads there, and its
argument checks answer without a device; tests/gpu and tests/test_cuda_driver.py's GPU cases
compare its images with the Python replay loop's where a GPU is present.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from ..errors import BackendUnavailableError
from ..kernels import CSRC
from . import driver as _driver

SOURCE = CSRC / "graph_loop.cu"


class GraphLoop:
    """One instantiated looping graph around one captured step; free it with ``close()``."""

    def __init__(self, lib: "GraphLoopLibrary", handle: int):
        self._lib = lib
        self.handle = handle

    def run(self, stream_ptr: int, steps: int) -> None:
        if not self.handle:
            raise _driver.CudaError("graph loop: already closed", 1)
        err = ctypes.create_string_buffer(_driver.ERRLEN)
        code = self._lib.lib.ddpm_loop_run(ctypes.c_void_p(self.handle), ctypes.c_void_p(int(stream_ptr)),
                                           int(steps), err, _driver.ERRLEN)
        _driver.GraphDriver._check(code, err, "graph loop run")

    def close(self) -> None:
        if self.handle:
            err = ctypes.create_string_buffer(_driver.ERRLEN)
            code = self._lib.lib.ddpm_loop_destroy(ctypes.c_void_p(self.handle), err, _driver.ERRLEN)
            self.handle = 0
            _driver.GraphDriver._check(code, err, "graph loop destroy")

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown or CUDA already torn down: nothing left to free
            pass


class GraphLoopLibrary:
    def __init__(self, path):
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise BackendUnavailableError(f"could not load the graph loop library {self.path}: {exc}") from None
        vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        lib.ddpm_loop_supported.argtypes, lib.ddpm_loop_supported.restype = [], ci
        lib.ddpm_loop_create.argtypes, lib.ddpm_loop_create.restype = [vp, ctypes.POINTER(vp), cp, ci], ci
        lib.ddpm_loop_run.argtypes, lib.ddpm_loop_run.restype = [vp, vp, ci, cp, ci], ci
        lib.ddpm_loop_destroy.argtypes, lib.ddpm_loop_destroy.restype = [vp, cp, ci], ci
        self.lib = lib

    @property
    def supported(self) -> bool:
        """Whether it was built with conditional-node support (CUDA >= 12.4)."""
        return bool(self.lib.ddpm_loop_supported())

    def create(self, step_graph_ptr: int) -> GraphLoop:
        if not step_graph_ptr:
            raise _driver.CudaError("graph loop: the step graph handle is 0 (captured without keep_graph=True?)", 1)
        out = ctypes.c_void_p(0)
        err = ctypes.create_string_buffer(_driver.ERRLEN)
        code = self.lib.ddpm_loop_create(ctypes.c_void_p(int(step_graph_ptr)), ctypes.byref(out), err, _driver.ERRLEN)
        _driver.GraphDriver._check(code, err, "graph loop create")
        return GraphLoop(self, out.value)

    def __repr__(self):
        return f"GraphLoopLibrary({self.path})"


_loaded: dict = {}


def build_graph_loop(cache_dir=None, source=None) -> Path:
    if _driver._find_nvcc(_driver.cuda_home()) is None:
        raise BackendUnavailableError("the one-launch graph loop (driver='graph_loop') is CUDA C++ and needs nvcc "
                                      "to build; install the CUDA toolkit or use driver='c'")
    return _driver.build_driver(cache_dir, source=source if source is not None else SOURCE)


def load_graph_loop(path=None, **build_kw) -> GraphLoopLibrary:
    path = Path(path) if path is not None else build_graph_loop(**build_kw)
    if path not in _loaded:
        _loaded[path] = GraphLoopLibrary(path)
    return _loaded[path]
