"""AOTInductor: the model exported with ``torch.export`` (dynamic batch) and compiled ahead of time
into a ``.pt2`` package by ``torch._inductor.aoti_compile_and_package``, then run through
``torch._inductor.aoti_load_package`` - generated C++/Triton code, no Python per layer.

The package holds the model at the requested precision behind a float32 in / float32 out
wrapper, so the graph matches the backend contract. It is cached on disk (``ddpm_engine.cache``) at
``$DDPM_ENGINE_CACHE/aoti`` (default ``~/.cache/ddpm-engine/aoti``), one file per (weights hash,
model structure, sample shape, precision, torch version, device: GPU name and capability, or the
CPU's ISA level, and the TF32 settings, which Inductor bakes in). A build takes seconds on a small
model and minutes on the CIFAR-10 UNet; later engines load the file (one that fails to load is
rebuilt once). The package is loaded with ``run_single_threaded=True`` (see ``load_package``),
so a call can be captured in a CUDA graph.

CUDA: UNVERIFIED here (this project's CI has no GPU); the GPU parity suite (tests/gpu) checks
it. The compiled model runs on the current torch stream. CPU: works with torch 2.13 and a C++
compiler, see tests/engine/backends/test_aoti_backend.py.
"""

from __future__ import annotations

import copy
import inspect
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import cache
from ..errors import ExportError, InvalidRequestError
from .base import Backend, parse_precision

EXAMPLE_BATCH = 2  # not 1: export would specialise the batch axis to 1
MAX_BATCH = 4096


class _Float32IO(nn.Module):
    """float32 x in, float32 output out, ``module`` at its own precision inside."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x, t):
        return self.module(x.to(self.dtype), t).float()


def device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        return f"{props.name} sm{props.major}{props.minor} tf32={tf32}"
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


def cached_path(loaded, device, precision: str, cache_dir=None) -> Path:
    parts = {"weights": loaded.weights_hash, "structure": cache.module_structure(loaded.module),
             "sample_shape": list(loaded.sample_shape), "precision": precision, "torch": torch.__version__,
             "device": device_key(device)}
    name = f"{cache.slug(loaded.name)}-{precision}-{torch.device(device).type}-{cache.key(parts)[:24]}.pt2"
    return cache.folder("aoti", cache_dir) / name


def compile_package(loaded, device, precision: str = "fp32", cache_dir=None) -> Path:
    """Export and AOT-compile ``loaded`` for ``device`` at ``precision``; the .pt2's path (cached)."""
    parse_precision(precision)
    device = torch.device(device)
    return cache.build(cached_path(loaded, device, precision, cache_dir),
                       lambda tmp: _compile(loaded, device, precision, tmp))


def _compile(loaded, device: torch.device, precision: str, out: Path) -> None:
    dtype = parse_precision(precision)
    module = copy.deepcopy(loaded.module).to(device=device, dtype=dtype).eval()
    wrapped = _Float32IO(module, dtype).eval()
    x = torch.randn(EXAMPLE_BATCH, *loaded.sample_shape, device=device)
    t = torch.randint(0, 1000, (EXAMPLE_BATCH,), dtype=torch.int64, device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(wrapped, (x, t), dynamic_shapes=({0: batch}, {0: batch}))
            torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    except Exception as exc:  # export and Inductor raise many unrelated types for an unsupported model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"AOTInductor could not compile {loaded.name!r} for {device} at {precision}: "
                          f"{type(exc).__name__}: {first}; use backend='torch'") from exc


def load_package(path):
    """``aoti_load_package`` with ``run_single_threaded=True`` where torch has the keyword: with
    False, AOTI's runtime keeps a pool of model instances and queries a CUDA event
    (cudaEventQuery) on every call to find a free one, which is illegal while a CUDA graph is
    being captured. Calls are serialised by the backend's lock anyway."""
    kw = {}
    if "run_single_threaded" in inspect.signature(torch._inductor.aoti_load_package).parameters:
        kw["run_single_threaded"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch._inductor.aoti_load_package(str(path), **kw)


class AOTIBackend(Backend):
    name = "aoti"

    def __init__(self, package_path, device, precision: str, sample_shape):
        super().__init__(device, precision)
        self.path = Path(package_path)
        self.sample_shape = tuple(sample_shape)
        self.runner = load_package(self.path)
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.sample_shape or t.shape != (x.shape[0],):
            raise InvalidRequestError(f"aoti backend got x {tuple(x.shape)} and t {tuple(t.shape)}; expected "
                                      f"x [B, {', '.join(map(str, self.sample_shape))}] and t [B]")
        if x.shape[0] > MAX_BATCH:
            raise InvalidRequestError(f"the aoti backend takes batches up to {MAX_BATCH}, got {x.shape[0]}")
        x = x.to(self.device, torch.float32).contiguous()
        t = t.to(self.device, torch.int64).contiguous()
        with self._lock, torch.inference_mode():
            return self.runner(x, t)

    def __repr__(self):
        return f"AOTIBackend({self.path.name}, device={self.device}, precision={self.precision})"


def unavailable_reason(device) -> str | None:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r} is not supported (cpu or cuda)"
    if not hasattr(torch, "_inductor") or not hasattr(torch._inductor, "aoti_compile_and_package"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package (needs torch >= 2.6)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device here"
    return None


def create(loaded, device, precision) -> AOTIBackend:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    parse_precision(precision)
    # a cached package that does not load (truncated, or from an incompatible build) is rebuilt once
    return cache.load(cached_path(loaded, device, precision), lambda tmp: _compile(loaded, device, precision, tmp),
                      lambda path: AOTIBackend(path, device, precision, loaded.sample_shape))
