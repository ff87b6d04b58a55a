"""AOTInductor: the model exported with ``torch.export`` (dynamic batch) and compiled ahead of time
into a ``.pt2`` package by ``torch._inductor.aoti_compile_and_package``, then run through
``torch._inductor.aoti_load_package`` - generated C++/Triton code, no Python per layer.

The package holds the model at the requested precision behind a float32 in / float32 out
wrapper, so the graph matches the backend contract. It is cached on disk at
``$DDPM_ENGINE_CACHE/aoti`` (default ``~/.cache/ddpm-engine/aoti``), one file per (weights hash,
model structure, sample shape, precision, torch version, device: GPU name and capability, or the
CPU's ISA level, and the TF32 settings, which Inductor bakes in). A build takes seconds on a small
model and minutes on the CIFAR-10 UNet; later engines load the file.

CUDA: UNVERIFIED here (this project's CI has no GPU); the GPU parity suite (tests/gpu) checks
it. The compiled model runs on the current torch stream. CPU: works with torch 2.13 and a C++
compiler, see tests/test_aoti_cpu.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

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


def cache_dir_default() -> Path:
    root = os.environ.get("DDPM_ENGINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ddpm-engine") / "aoti"


def device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        return f"{props.name} sm{props.major}{props.minor} tf32={tf32}"
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


def _structure(module: nn.Module) -> str:
    configs = [dict(m.config) for m in module.modules() if isinstance(getattr(m, "config", None), dict)]
    return repr(module) + json.dumps(configs, sort_keys=True, default=str)


def cached_path(loaded, device, precision: str, cache_dir=None) -> Path:
    parts = {"weights": loaded.weights_hash, "structure": _structure(loaded.module),
             "sample_shape": list(loaded.sample_shape), "precision": precision, "torch": torch.__version__,
             "device": device_key(device)}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", loaded.name)[:40] or "model"
    folder = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    return folder / f"{name}-{precision}-{torch.device(device).type}-{key[:24]}.pt2"


def compile_package(loaded, device, precision: str = "fp32", cache_dir=None) -> Path:
    """Export and AOT-compile ``loaded`` for ``device`` at ``precision``; the .pt2's path (cached)."""
    dtype = parse_precision(precision)
    device = torch.device(device)
    path = cached_path(loaded, device, precision, cache_dir)
    if path.is_file():
        return path
    module = copy.deepcopy(loaded.module).to(device=device, dtype=dtype).eval()
    wrapped = _Float32IO(module, dtype).eval()
    x = torch.randn(EXAMPLE_BATCH, *loaded.sample_shape, device=device)
    t = torch.randint(0, 1000, (EXAMPLE_BATCH,), dtype=torch.int64, device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.pt2")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(wrapped, (x, t), dynamic_shapes=({0: batch}, {0: batch}))
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, path)
    except Exception as exc:  # export and Inductor raise many unrelated types for an unsupported model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"AOTInductor could not compile {loaded.name!r} for {device} at {precision}: "
                          f"{type(exc).__name__}: {first}; use backend='torch'") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


class AOTIBackend(Backend):
    name = "aoti"

    def __init__(self, package_path, device, precision: str, sample_shape):
        super().__init__(device, precision)
        self.path = Path(package_path)
        self.sample_shape = tuple(sample_shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.runner = torch._inductor.aoti_load_package(str(self.path))
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
    return AOTIBackend(compile_package(loaded, device, precision), device, precision, loaded.sample_shape)
