"""The named backends: which module implements each, what can run where, and building one by name.

Each backend module exposes ``unavailable_reason(device, precision) -> str | None`` (why it
cannot run on ``device`` at ``precision`` here, or None) and ``create(loaded, device, precision)
-> Backend``; modules are imported only when asked for, so a missing optional package never
breaks ``import engine``.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import BackendUnavailableError
from .base import Backend

# name -> module (auto's choice: backends/auto.py)
BACKEND_MODULES = {
    "tensorrt": "ddpm_engine.backends.tensorrt_backend",
    "aoti": "ddpm_engine.backends.aoti_backend",
    "onnxruntime": "ddpm_engine.backends.onnxruntime_backend",
    "openvino": "ddpm_engine.backends.openvino_backend",
    "torch": "ddpm_engine.backends.torch_backend",
}
BACKENDS = ("auto", *BACKEND_MODULES)


def _module(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


def available(device, precision: str = "fp32", names=BACKEND_MODULES) -> dict:
    """{backend name (of ``names``): None if usable on ``device`` at ``precision``, else the reason
    it is not}. Asking only for the names wanted imports no other backend's runtime (aoti's check
    imports torch._inductor: 2.6 s)."""
    device = torch.device(device)
    out = {}
    for name in names:
        try:
            out[name] = _module(name).unavailable_reason(device, precision)
        except ImportError as exc:  # the module exists only in a later version
            out[name] = f"not built into this version ({exc})"
    return out


def create_named(name: str, loaded, device, precision: str) -> Backend:
    """Build the backend called ``name`` (not "auto") on ``device`` at ``precision``."""
    try:
        module = _module(name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not built into this version ({exc})") from None
    reason = module.unavailable_reason(device, precision)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {precision} on {device}: {reason}")
    return module.create(loaded, device, precision)
