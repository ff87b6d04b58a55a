"""The whole reverse chain as one graph launch: kernels/csrc/while_loop.cu, loaded with ctypes.

``load_graph_loop()`` builds the CUDA source with nvcc (cached like the C loop, see
engine/cuda/c_loop.py; real sm_XX code for this GPU, default sm_90, plus its PTX; linked against
the libcudart this process already has, ``c_loop.find_cudart``) and returns a
``GraphLoopLibrary``; ``lib.create(step_graph_ptr)`` wraps a captured step's cudaGraph_t (``torch.cuda.CUDAGraph(keep_graph=True).raw_cuda_graph()``) in a
conditional WHILE node and returns a ``GraphLoop`` whose ``run(stream_ptr, steps)`` launches the
chain once and synchronises once. Needs CUDA >= 12.4 (conditional nodes) at build and run time.

UNVERIFIED on a GPU (this project's CI has nvcc but no GPU): it builds and loads there, and its
argument checks answer without a device; tests/gpu and tests/engine/cuda/test_c_loop.py's GPU cases
compare its images with the Python replay loop's where a GPU is present.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from ..errors import BackendUnavailableError
from ..kernels import CSRC
from . import c_loop as _c_loop

SOURCE = CSRC / "while_loop.cu"
DEFAULT_ARCH = 90
FATBIN_MAGIC = 0xBA55ED50


class GraphLoop:
    """One instantiated looping graph around one captured step; free it with ``close()``."""

    def __init__(self, lib: "GraphLoopLibrary", handle: int):
        self._lib = lib
        self.handle = handle

    def run(self, stream_ptr: int, steps: int) -> None:
        if not self.handle:
            raise _c_loop.CudaError("graph loop: already closed", 1)
        err = ctypes.create_string_buffer(_c_loop.ERRLEN)
        code = self._lib.lib.ddpm_loop_run(ctypes.c_void_p(self.handle), ctypes.c_void_p(int(stream_ptr)),
                                           int(steps), err, _c_loop.ERRLEN)
        _c_loop.CLoopLibrary._check(code, err, "graph loop run")

    def close(self) -> None:
        if self.handle:
            err = ctypes.create_string_buffer(_c_loop.ERRLEN)
            code = self._lib.lib.ddpm_loop_destroy(ctypes.c_void_p(self.handle), err, _c_loop.ERRLEN)
            self.handle = 0
            _c_loop.CLoopLibrary._check(code, err, "graph loop destroy")

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
            raise _c_loop.CudaError("graph loop: the step graph handle is 0 (captured without keep_graph=True?)", 1)
        out = ctypes.c_void_p(0)
        err = ctypes.create_string_buffer(_c_loop.ERRLEN)
        code = self.lib.ddpm_loop_create(ctypes.c_void_p(int(step_graph_ptr)), ctypes.byref(out), err, _c_loop.ERRLEN)
        _c_loop.CLoopLibrary._check(code, err, "graph loop create")
        return GraphLoop(self, out.value)

    def __repr__(self):
        return f"GraphLoopLibrary({self.path})"


_loaded: dict = {}


def embedded_device_code(path) -> list[tuple[str, int]]:
    """The device code a built library carries, e.g. [("ptx", 90), ("sm", 90)]: "sm" is machine
    code (a cubin) for that compute capability, "ptx" is PTX that newer GPUs JIT-compile. Read from
    the fatbin container nvcc embeds (magic 0xBA55ED50; entries of kind 1 = PTX, 2 = cubin, with
    the SM version at byte 28 of each entry's header)."""
    data = Path(path).read_bytes()
    entries, start = set(), 0
    while (start := data.find(struct.pack("<I", FATBIN_MAGIC), start)) >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, start)
        pos, end = start + header, min(start + header + size, len(data))
        while pos + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
            if kind in (1, 2):
                entries.add(("ptx" if kind == 1 else "sm", struct.unpack_from("<I", data, pos + 28)[0]))
            if entry_header == 0:
                break
            pos += entry_header + payload
        start = max(end, start + 4)
    return sorted(entries)


def cuda_arch() -> int:
    """The SM version to build real code for: $DDPM_CUDA_ARCH (e.g. 90), else the current GPU's
    compute capability, else 90 (H100)."""
    if os.environ.get("DDPM_CUDA_ARCH"):
        return int(os.environ["DDPM_CUDA_ARCH"])
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 10 * major + minor
    except Exception:  # no torch CUDA build or no device: the default below
        pass
    return DEFAULT_ARCH


def nvcc_command(out: str, source: Path, arch: int, cudart: Path) -> list[str]:
    """nvcc command line: sm_<arch> machine code plus compute_<arch> PTX (JIT-compiled by newer
    GPUs), linked against the given libcudart file by its exact name (-cudart none: no static
    runtime, no -lcudart, which needs the unversioned libcudart.so a pip-installed CUDA lacks)."""
    nvcc = _c_loop._find_nvcc(_c_loop.cuda_home())
    return [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O2", "-cudart", "none",
            "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-gencode", f"arch=compute_{arch},code=compute_{arch}",
            "-o", out, str(source), f"-L{cudart.parent}", f"-l:{cudart.name}", "-Xlinker", f"-rpath,{cudart.parent}"]


def _library(cache_dir=None, source=None, arch=None, cudart=None):
    if _c_loop._find_nvcc(_c_loop.cuda_home()) is None:
        raise BackendUnavailableError("the one-launch graph loop (driver='graph_loop') is CUDA C++ and needs nvcc "
                                      "to build; install the CUDA toolkit or use driver='c'")
    cudart = Path(cudart) if cudart is not None else _c_loop.find_cudart()
    if cudart is None or not cudart.exists():
        raise BackendUnavailableError(f"the graph loop links the CUDA runtime, but no libcudart was found "
                                      f"({cudart or 'none mapped, none in the toolkit'}); set DDPM_CUDART to "
                                      "torch's libcudart.so.* (see /proc/self/maps)")
    source = Path(source) if source is not None else SOURCE
    arch = int(arch) if arch is not None else cuda_arch()
    return _c_loop.library(source, lambda out: nvcc_command(out, source, arch, cudart), cache_dir,
                           what="the graph loop")


def build_graph_loop(cache_dir=None, source=None, arch=None, cudart=None) -> Path:
    """Compile while_loop.cu for ``arch`` (default ``cuda_arch()``) against ``cudart`` (default
    ``c_loop.find_cudart()``) into the cache; the library's path."""
    return _c_loop.build(_library(cache_dir, source, arch, cudart))


def load_graph_loop(path=None, **build_kw) -> GraphLoopLibrary:
    """The loaded graph loop at ``path``, or built (if needed) into the cache; loaded once per path."""
    if path is None:
        return _c_loop.load(_library(**build_kw), GraphLoopLibrary, _loaded)
    path = Path(path)
    if path not in _loaded:
        _loaded[path] = GraphLoopLibrary(path)
    return _loaded[path]
