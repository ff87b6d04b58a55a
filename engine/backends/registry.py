"""The named backends: one line each, name -> the class that implements the contract of
``base.Backend``; what can run where, and building one by name.

A class is imported only when its name is asked for, so a missing optional package never breaks
``import ddpm_engine``, and asking about some backends imports no other backend's runtime (aoti's
``unavailable_reason`` imports torch._inductor, seconds of startup).
"""

from __future__ import annotations

import importlib

import torch

from .. import probe
from ..errors import BackendUnavailableError
from .base import Backend, quantized_refusal

# name -> "module:Class" (``available`` and ``info`` list them in this order)
BACKEND_CLASSES = {
    "tensorrt": "ddpm_engine.backends.tensorrt_backend:TensorRTBackend",
    "aoti": "ddpm_engine.backends.aoti_backend:AOTIBackend",
    "onnxruntime": "ddpm_engine.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "openvino": "ddpm_engine.backends.openvino_backend:OpenVINOBackend",
    "torch": "ddpm_engine.backends.torch_backend:TorchBackend",
}
BACKENDS = ("auto", *BACKEND_CLASSES)


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (not "auto"), imported now."""
    module, _, cls = BACKEND_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def available(device, precision: str = "fp32", names=BACKEND_CLASSES) -> dict:
    """{backend name (of ``names``): None if usable on ``device`` at ``precision``, else the reason
    it is not}. Asking only for the names wanted imports no other backend's runtime."""
    device = torch.device(device)
    out = {}
    for name in names:
        try:
            cls = backend_class(name)
            out[name] = quantized_refusal(cls, precision) or cls.unavailable_reason(device, precision)
        except ImportError as exc:  # the module exists only in a later version
            out[name] = f"not built into this version ({exc})"
    return out


def create_named(name: str, loaded, device: torch.device, precision: str) -> Backend:
    """Build the backend called ``name`` (not "auto") on ``device`` at ``precision`` (both checked
    by the caller, ``backends.create``), or raise BackendUnavailableError saying why it cannot run.
    A backend that serves an exported or cached graph (its ``path``) is compared with the eager
    module on the load probe first (``probe.checked``: a stale cached graph is rebuilt once, a
    graph that still differs is a ModelLoadError naming the cause)."""
    try:
        cls = backend_class(name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} is not built into this version ({exc})") from None
    reason = quantized_refusal(cls, precision) or cls.unavailable_reason(device, precision)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {precision} on {device}: {reason}")
    return probe.checked(lambda: cls.create(loaded, device, precision), getattr(loaded, "io", None), loaded.name)
