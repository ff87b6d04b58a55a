"""The C replay loop behind ``driver="c"`` (kernels/csrc/c_loop.c): build it and load it with
ctypes; and the build helpers the graph loop (graph_loop.py, ``driver="graph_loop"``) shares.

Words: a *driver* (``Engine.sample(driver=...)``) is how the sampling loop is run; "the C driver"
is this library; the *CUDA driver* is libcuda.so.1 (the NVIDIA driver's API), which it calls.

``build_c_loop()`` compiles the C source into a shared library in the cache
(``ddpm_engine.cache``, folder ``driver``: $DDPM_ENGINE_CACHE/driver, else
~/.cache/ddpm-engine/driver), keyed by the source, the compiler's version and the command, so a
second call reuses the file and an edited source gets a new one; the file is written under a
temporary name and renamed, and a cached library that does not load is rebuilt once.

``trusted_c_loop()`` is what the engine uses: the built library, loaded in this process only after
``probe(path)`` has loaded it in a subprocess, opened libcuda and (on a GPU) replayed a tiny
captured graph through it, so a crash there (a segfault in C) costs a child process, not the
caller's. The verdict is cached per build (beside the library, ``<lib>.probe-<key>.json``; delete
it to probe again) and per process.

``load_c_loop()`` returns a ``CLoopLibrary``: ``replay(graph_exec, stream, steps)`` launches a
captured cudaGraphExec_t ``steps`` times and synchronises once; a CUDA failure raises
``CudaError`` (a ``BackendUnavailableError``) carrying CUDA's own message and code.

Why the driver API: the C loop calls ``cuGraphLaunch`` from ``libcuda.so.1``, opened at run time
with dlopen ($DDPM_LIBCUDA names another file), instead of linking the CUDA runtime. A
pip-installed CUDA (torch's wheels) has ``libcudart.so.13`` but not the ``libcudart.so`` that
``-lcudart`` needs, whereas libcuda.so.1 comes with the NVIDIA driver wherever there is a GPU;
the runtime's handles are the driver's, so torch's graph exec and stream pass through as they
are; and the library needs no CUDA headers, so it builds with any C compiler:

    cc -shared -fPIC -O2 -o <lib> c_loop.c -ldl        (nvcc as the compiler if there is no cc)

The graph loop (CUDA C++ with kernels) needs the runtime; ``find_cudart()`` picks the libcudart
this process already has mapped (torch's), so the process holds a single CUDA runtime.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .. import cache
from ..errors import BackendUnavailableError
from ..kernels import CSRC

SOURCE = CSRC / "c_loop.c"
ERRLEN = 1024
NO_LIBCUDA = -1  # c_loop.c's code for "the CUDA driver library could not be opened"
CACHE_KIND = "driver"


class CudaError(BackendUnavailableError):
    """A CUDA call in a compiled driver failed; ``code`` is CUDA's error code, the message CUDA's."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


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


_CUDART_NAME = re.compile(r"libcudart\.so(\.\d+)*$")


def mapped_cudart(maps: Path = Path("/proc/self/maps")) -> Path | None:
    """The libcudart.so* file this process has mapped (torch's, once torch's CUDA build is
    imported), or None."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if _CUDART_NAME.search(Path(path).name):
            return Path(path)
    return None


def find_cudart() -> Path | None:
    """The libcudart to link the graph loop against: $DDPM_CUDART, else the one this process has
    mapped, else the toolkit's versioned file (libcudart.so.13, not the unversioned dev link)."""
    if os.environ.get("DDPM_CUDART"):
        return Path(os.environ["DDPM_CUDART"])
    mapped = mapped_cudart()
    if mapped is not None:
        return mapped
    home = cuda_home()
    if home is None:
        return None
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        found = sorted(p for p in (home / sub).glob("libcudart.so.*") if re.fullmatch(r"libcudart\.so\.\d+", p.name))
        if found:
            return found[-1]
    return None


@functools.lru_cache(maxsize=None)
def _version(cmd: str) -> str:
    """``cmd --version``'s output (once per process): part of the build cache's key."""
    try:
        return subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendUnavailableError(f"could not run '{cmd} --version' to key the driver cache: {exc}") from None


def _c_compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or _find_nvcc(cuda_home())
    if cc is None:
        raise BackendUnavailableError("the C graph driver needs a C compiler (cc, gcc or nvcc); none was found")
    return cc


def library(source: Path, command, cache_dir=None, what: str = "the C graph driver"):
    """(the cached library's path, ``make(out)`` that compiles it into ``out``) for ``source`` built
    with ``command(out_path) -> argv``, keyed by (source, compiler version, command). Build
    failures raise BackendUnavailableError."""
    source = Path(source)
    if not source.exists():
        raise BackendUnavailableError(f"the source of {what} is missing: {source}")
    placeholder = "OUT.so"
    argv = command(placeholder)
    parts = {"source": source.read_bytes(), "compiler": _version(argv[0]),
             "command": [a for a in argv[1:] if a not in (placeholder, str(source))]}
    target = cache.folder(CACHE_KIND, cache_dir) / f"{source.stem}-{cache.key(parts)[:16]}.so"

    def make(out: Path) -> None:
        cmd = [str(out) if a == placeholder else a for a in argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendUnavailableError(f"building {what} failed: {' '.join(cmd)}: {exc}") from None
        if proc.returncode != 0:
            raise BackendUnavailableError(f"building {what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                                          f"{proc.stderr.strip() or proc.stdout.strip()}")

    return target, make


_build_lock = threading.Lock()


def build(lib) -> Path:
    """Compile a ``library(...)`` into the cache if absent; its path."""
    with _build_lock:
        return cache.build(*lib)


def load(lib, open_, loaded: dict):
    """``open_(path)`` of a ``library(...)``, built if absent and rebuilt once if the cached file does
    not load; memoised in ``loaded`` per path."""
    target, make = lib
    with _build_lock:
        if target not in loaded:
            loaded[target] = cache.load(target, make, open_, corrupt=(BackendUnavailableError,))
        return loaded[target]


def _c_loop_library(cache_dir=None, source=None):
    source = Path(source) if source is not None else SOURCE
    cc = _c_compiler()
    flags = ["-shared", "-Xcompiler", "-fPIC", "-O2"] if Path(cc).name == "nvcc" else ["-shared", "-fPIC", "-O2"]
    return library(source, lambda out: [cc, *flags, "-o", out, str(source), "-ldl"], cache_dir)


def build_c_loop(cache_dir=None, *, source=None) -> Path:
    """Compile the C driver (once per source + compiler + command) and return the library's path."""
    return build(_c_loop_library(cache_dir, source))


class CLoopLibrary:
    """ctypes front of the compiled driver; every call raises CudaError on a CUDA failure. The CUDA
    driver library (``libcuda``: a path, else $DDPM_LIBCUDA, else libcuda.so.1) is opened on first
    use, so a driver builds and loads on a machine without one and says so when called."""

    def __init__(self, path, libcuda: str | None = None):
        self.path = Path(path)
        self.libcuda = libcuda or os.environ.get("DDPM_LIBCUDA") or "libcuda.so.1"
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise BackendUnavailableError(f"could not load the C graph driver {self.path}: {exc}") from None
        vp, cp, ci, pi = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
        lib.ddpm_driver_open.argtypes, lib.ddpm_driver_open.restype = [cp, cp, ci], ci
        lib.ddpm_graph_replay.argtypes, lib.ddpm_graph_replay.restype = [vp, vp, ci, cp, ci], ci
        lib.ddpm_driver_version.argtypes, lib.ddpm_driver_version.restype = [pi, cp, ci], ci
        lib.ddpm_device_count.argtypes, lib.ddpm_device_count.restype = [pi, cp, ci], ci
        self._lib = lib
        self._opened = False
        self._open_lock = threading.Lock()

    @staticmethod
    def _check(code: int, err, what: str):
        if code != 0:
            msg = err.value.decode(errors="replace") or f"CUDA error {code}"
            raise CudaError(f"{what}: {msg}", code)

    def _open(self):
        if not self._opened:
            with self._open_lock:
                err = ctypes.create_string_buffer(ERRLEN)
                self._check(self._lib.ddpm_driver_open(self.libcuda.encode(), err, ERRLEN), err, "opening the CUDA driver")
                self._opened = True
        return self._lib

    def replay(self, graph_exec_ptr: int, stream_ptr: int, steps: int) -> None:
        """Launch the cudaGraphExec_t ``graph_exec_ptr`` ``steps`` times on ``stream_ptr``; sync once."""
        if not graph_exec_ptr:
            raise CudaError("graph replay: the graph exec handle is 0 (graph not instantiated?)", 1)
        lib = self._open()
        err = ctypes.create_string_buffer(ERRLEN)
        code = lib.ddpm_graph_replay(ctypes.c_void_p(int(graph_exec_ptr)), ctypes.c_void_p(int(stream_ptr)),
                                     int(steps), err, ERRLEN)
        self._check(code, err, "graph replay")

    def driver_version(self) -> int:
        """The installed CUDA driver's version (cuDriverGetVersion), e.g. 13000 for 13.0; needs no GPU,
        but the driver library (raises CudaError without it)."""
        v = ctypes.c_int(0)
        err = ctypes.create_string_buffer(ERRLEN)
        self._check(self._open().ddpm_driver_version(ctypes.byref(v), err, ERRLEN), err, "cuDriverGetVersion")
        return v.value

    def device_count(self) -> int:
        """Number of CUDA devices; without a GPU/driver, raises CudaError with CUDA's message."""
        n = ctypes.c_int(0)
        err = ctypes.create_string_buffer(ERRLEN)
        self._check(self._open().ddpm_device_count(ctypes.byref(n), err, ERRLEN), err, "cuDeviceGetCount")
        return n.value

    def __repr__(self):
        return f"CLoopLibrary({self.path}, libcuda={self.libcuda})"


_loaded: dict[Path, CLoopLibrary] = {}


def load_c_loop(path=None, *, cache_dir=None, source=None) -> CLoopLibrary:
    """The loaded driver at ``path``, or built (if needed) into the cache; loaded once per path."""
    if path is None:
        return load(_c_loop_library(cache_dir, source), CLoopLibrary, _loaded)
    path = Path(path)
    with _build_lock:
        if path not in _loaded:
            _loaded[path] = CLoopLibrary(path)
        return _loaded[path]


# ---- trust: probe a build in a subprocess before loading it here ----------------------------------
PROBE_TIMEOUT_S = 180
_verdicts: dict[tuple, dict] = {}


def probe_child(path: str, libcuda: str) -> None:
    """The probe's body (in the subprocess): load the library, open libcuda, and on a GPU replay a
    captured one-kernel graph 3 times through it; prints a JSON line; any failure exits non-zero."""
    d = CLoopLibrary(path, libcuda)
    out = {"driver_version": d.driver_version()}
    import torch

    if torch.cuda.is_available():
        out["device_count"] = d.device_count()
        x = torch.zeros(1, device="cuda")
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            x.add_(1)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.add_(1)
        x.zero_()
        d.replay(graph.raw_cuda_graph_exec(), torch.cuda.current_stream().cuda_stream, 3)
        if x.item() != 3.0:
            raise RuntimeError(f"3 replays of x += 1 gave {x.item()}")
        out["replayed"] = 3
    print(json.dumps(out), flush=True)


def _probe_in_subprocess(path: Path, libcuda: str) -> dict:
    code = "import sys; from ddpm_engine.cuda.c_loop import probe_child; probe_child(sys.argv[1], sys.argv[2])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path), libcuda], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"the probe process hung (killed after {PROBE_TIMEOUT_S} s)"}
    except OSError as exc:
        return {"ok": False, "reason": f"the probe process could not start: {exc}"}
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:500]
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else proc.returncode
        return {"ok": False, "reason": f"the probe process died of {name} (a crash in the C driver or the CUDA "
                                       f"driver under it){': ' + tail if tail else ''}"}
    if proc.returncode != 0:
        return {"ok": False, "reason": f"the probe failed (exit {proc.returncode}): {tail}"}
    return {"ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def probe(path, libcuda: str | None = None) -> dict:
    """{"ok": bool, "reason" (if not ok), ...}: the verdict of ``probe_child`` on the build at ``path``
    run in a subprocess; cached beside the library (one file per build and libcuda) and per process."""
    path = Path(path)
    libcuda = libcuda or os.environ.get("DDPM_LIBCUDA") or "libcuda.so.1"
    memo = (path, libcuda)
    with _build_lock:
        if memo not in _verdicts:
            record = path.with_name(f"{path.name}.probe-{cache.key({'libcuda': libcuda})[:8]}.json")
            try:
                verdict = json.loads(record.read_text())
            except (OSError, ValueError):  # not probed yet (or a foreign file): probe now
                verdict = _probe_in_subprocess(path, libcuda)
                cache.write_bytes(record, json.dumps(verdict).encode())
            _verdicts[memo] = verdict
        return _verdicts[memo]


def trusted_c_loop(cache_dir=None) -> CLoopLibrary:
    """The C driver, built if needed, loaded here only once ``probe`` passed on the same build;
    BackendUnavailableError with the probe's reason otherwise."""
    path = build_c_loop(cache_dir)
    verdict = probe(path)
    if not verdict.get("ok"):
        raise BackendUnavailableError(f"the C graph driver {path.name} failed its probe in a subprocess: "
                                      f"{verdict.get('reason')}")
    return load_c_loop(path)
