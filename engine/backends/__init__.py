"""Backends: (x_t, t) -> model output, one small class each. ``create`` picks one by name.

Each backend module exposes ``unavailable_reason(device) -> str | None`` (why it cannot run on
``device`` here, or None) and ``create(loaded, device, precision) -> Backend``; modules are
imported only when asked for, so a missing optional package never breaks ``import engine``.
"""

from __future__ import annotations

import importlib

import torch

from .. import threads
from ..errors import BackendUnavailableError, InvalidRequestError
from .base import PRECISIONS, Backend, parse_precision

# name -> module; the order is auto's order of preference on CUDA
BACKEND_MODULES = {
    "tensorrt": "ddpm_engine.backends.tensorrt_backend",
    "aoti": "ddpm_engine.backends.aoti_backend",
    "onnxruntime": "ddpm_engine.backends.onnxruntime_backend",
    "torch": "ddpm_engine.backends.torch_backend",
}
BACKENDS = ("auto", *BACKEND_MODULES)


def _module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def available(device) -> dict:
    """{backend name: None if usable on ``device``, else the reason it is not}."""
    device = torch.device(device)
    out = {}
    for name in BACKEND_MODULES:
        try:
            out[name] = _module(name).unavailable_reason(device)
        except ImportError as exc:  # the module exists only in a later version
            out[name] = f"not built into this version ({exc})"
    return out


def auto_backend(device) -> str:
    """The fastest backend usable on ``device``: on the CPU, ONNX Runtime (its CPU provider ran
    the UNets faster than eager PyTorch, see bench/); on CUDA, eager torch (the compiled
    backends are opt-in until the GPU parity suite has passed for them on that machine)."""
    device = torch.device(device)
    avail = available(device)
    if device.type == "cpu" and avail.get("onnxruntime") is None:
        return "onnxruntime"
    return "torch"


def create(name: str, loaded, device, precision: str = "fp32") -> Backend:
    """Build backend ``name`` for a ``checkpoints.LoadedModel`` on ``device``."""
    if name not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    parse_precision(precision)
    device = torch.device(device)
    threads.cpu_policy()  # a bad DDPM_ENGINE_THREADS / DDPM_ENGINE_SPIN fails here, before any work
    if name == "auto":
        name = auto_backend(device)
    try:
        module = _module(name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not built into this version ({exc})") from None
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device}: {reason}")
    return module.create(loaded, device, precision)
