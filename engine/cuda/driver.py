"""Build and load the C driver loop (kernels/csrc/graph_driver.c) with ctypes.

``build_driver()`` compiles the C source into a shared library in a cache folder
($DDPM_ENGINE_CACHE/driver, else ~/.cache/ddpm-engine/driver), keyed by the sha256 of the
source, the compiler's version and the link flags, so a second call reuses the file and an
edited source gets a new one. The file is written under a temporary name and renamed, so two
processes building at once never load a half-written library.

``load_driver()`` returns a ``GraphDriver``: ``replay(graph_exec, stream, steps)`` launches a
captured cudaGraphExec_t ``steps`` times and synchronises once; a CUDA failure raises
``CudaError`` (a ``BackendUnavailableError``) carrying CUDA's own message and code.

Build command (nvcc found):
    nvcc -shared -Xcompiler -fPIC -O2 -o <lib> graph_driver.c -L<cuda>/lib64 -lcudart -Xlinker -rpath,<cuda>/lib64
or, without nvcc but with the CUDA headers and libcudart:
    cc -shared -fPIC -O2 -I<cuda>/include -o <lib> graph_driver.c -L<cuda>/lib64 -lcudart -Wl,-rpath,<cuda>/lib64
``cudart=`` (or $DDPM_CUDART) links a specific libcudart.so instead, e.g. the one bundled with
torch's CUDA wheels, so the process holds a single CUDA runtime.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import BackendUnavailableError
from ..kernels import CSRC

SOURCE = CSRC / "graph_driver.c"
ERRLEN = 1024


class CudaError(BackendUnavailableError):
    """A CUDA runtime call in the C driver failed; ``code`` is the cudaError_t, the message CUDA's."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def driver_cache_dir(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("DDPM_ENGINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ddpm-engine") / "driver"


def cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, nvcc's parent, or /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime_api.h").exists():
            return home
    for cand in ("/usr/local/cuda", *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)):
        if (Path(cand) / "include" / "cuda_runtime_api.h").exists():
            return Path(cand)
    return None


def _find_nvcc(home: Path | None) -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    if home is not None and (home / "bin" / "nvcc").exists():
        return str(home / "bin" / "nvcc")
    return None


def _lib_dir(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if list((home / sub).glob("libcudart.so*")):
            return home / sub
    return home / "lib64"


def _version(cmd: str) -> str:
    try:
        return subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendUnavailableError(f"could not run '{cmd} --version' to key the driver cache: {exc}") from None


def _command(source: Path, out: Path, cudart: str | None) -> tuple[list[str], str]:
    """(compile command with '{out}' for the output, compiler version) or BackendUnavailableError."""
    home = cuda_home()
    nvcc = _find_nvcc(home)
    if cudart is not None:
        cudart = str(Path(cudart).resolve())
        if not Path(cudart).exists():
            raise BackendUnavailableError(f"the libcudart given to link against does not exist: {cudart}")
        link = [f"-L{Path(cudart).parent}", f"-Wl,-l:{Path(cudart).name}", f"-Wl,-rpath,{Path(cudart).parent}"]
    elif home is not None:
        lib = _lib_dir(home)
        link = [f"-L{lib}", "-lcudart", f"-Wl,-rpath,{lib}"]
    else:
        link = None
    if nvcc is not None:
        if link is None:
            link = ["-lcudart"]
        nvlink = [a if not a.startswith("-Wl,") else "-Xlinker=" + a[4:] for a in link]
        cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O2", "-o", str(out), str(source), *nvlink]
        return cmd, _version(nvcc)
    if home is None or not (home / "include" / "cuda_runtime_api.h").exists():
        raise BackendUnavailableError(
            "the C graph driver needs the CUDA toolkit to build: no nvcc on PATH and no CUDA headers "
            "(cuda_runtime_api.h) under $CUDA_HOME or /usr/local/cuda; install the CUDA toolkit or set CUDA_HOME")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BackendUnavailableError("the C graph driver needs nvcc or a C compiler (cc/gcc); neither was found")
    cmd = [cc, "-shared", "-fPIC", "-O2", f"-I{home / 'include'}", "-o", str(out), str(source), *link]
    return cmd, _version(cc)


_build_lock = threading.Lock()


def build_driver(cache_dir=None, *, source=None, cudart=None) -> Path:
    """Compile the C driver (once per source + compiler + link flags) and return the library's path."""
    folder = driver_cache_dir(cache_dir)
    source = Path(source) if source is not None else SOURCE
    if not source.exists():
        raise BackendUnavailableError(f"the C graph driver source is missing: {source}")
    cudart = cudart if cudart is not None else os.environ.get("DDPM_CUDART") or None
    src = source.read_bytes()
    placeholder = folder / "OUT.so"
    cmd, version = _command(source, placeholder, cudart)
    key = hashlib.sha256()
    for part in (src, version.encode(), " ".join(cmd[:1] + cmd[2:]).replace(str(source), "").encode()):
        key.update(part)
        key.update(b"\0")
    target = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    with _build_lock:
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=folder)
        os.close(fd)
        cmd = [tmp if a == str(placeholder) else a for a in cmd]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise BackendUnavailableError(
                    f"building the C graph driver failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                    f"{proc.stderr.strip() or proc.stdout.strip()}")
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendUnavailableError(f"building the C graph driver failed: {' '.join(cmd)}: {exc}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


class GraphDriver:
    """ctypes front of the compiled driver; every call raises CudaError on a CUDA failure."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise BackendUnavailableError(f"could not load the C graph driver {self.path}: {exc}") from None
        lib.ddpm_graph_replay.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.ddpm_graph_replay.restype = ctypes.c_int
        lib.ddpm_driver_version.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
        lib.ddpm_driver_version.restype = ctypes.c_int
        lib.ddpm_device_count.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
        lib.ddpm_device_count.restype = ctypes.c_int
        self._lib = lib

    @staticmethod
    def _check(code: int, err, what: str):
        if code != 0:
            msg = err.value.decode(errors="replace") or f"CUDA error {code}"
            raise CudaError(f"{what}: {msg}", code)

    def replay(self, graph_exec_ptr: int, stream_ptr: int, steps: int) -> None:
        """Launch the cudaGraphExec_t ``graph_exec_ptr`` ``steps`` times on ``stream_ptr``; sync once."""
        if not graph_exec_ptr:
            raise CudaError("graph replay: the graph exec handle is 0 (graph not instantiated?)", 1)
        err = ctypes.create_string_buffer(ERRLEN)
        code = self._lib.ddpm_graph_replay(ctypes.c_void_p(int(graph_exec_ptr)), ctypes.c_void_p(int(stream_ptr)),
                                           int(steps), err, ERRLEN)
        self._check(code, err, "graph replay")

    def runtime_version(self) -> int:
        """CUDA runtime version the library runs against, e.g. 13000 for 13.0 (needs no GPU)."""
        v = ctypes.c_int(0)
        err = ctypes.create_string_buffer(ERRLEN)
        self._check(self._lib.ddpm_driver_version(ctypes.byref(v), err, ERRLEN), err, "cudaRuntimeGetVersion")
        return v.value

    def device_count(self) -> int:
        """Number of CUDA devices; without a GPU/driver, raises CudaError with CUDA's message."""
        n = ctypes.c_int(0)
        err = ctypes.create_string_buffer(ERRLEN)
        self._check(self._lib.ddpm_device_count(ctypes.byref(n), err, ERRLEN), err, "cudaGetDeviceCount")
        return n.value

    def __repr__(self):
        return f"GraphDriver({self.path})"


_loaded: dict[Path, GraphDriver] = {}


def load_driver(path=None, **build_kw) -> GraphDriver:
    """Build (if needed) and load the driver; the loaded library is cached per path."""
    path = Path(path) if path is not None else build_driver(**build_kw)
    with _build_lock:
        if path not in _loaded:
            _loaded[path] = GraphDriver(path)
        return _loaded[path]
