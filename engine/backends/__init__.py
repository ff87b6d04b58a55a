"""Backends: (x_t, t) -> model output, one small class each. ``create`` picks one by name."""

from __future__ import annotations

import importlib.util

import torch

from ..errors import BackendUnavailableError, InvalidRequestError
from .base import PRECISIONS, Backend, parse_precision
from .torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "onnxruntime")


def available(device: torch.device) -> dict:
    """{backend name: None if usable on ``device``, else the reason it is not}."""
    device = torch.device(device)
    out = {"torch": None}
    out["onnxruntime"] = None if importlib.util.find_spec("onnxruntime") else \
        "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu on CUDA)"
    return out


def auto_backend(device: torch.device) -> str:
    """The fastest backend available on ``device``: ONNX Runtime on the CPU (its CPU provider
    ran the UNets faster than eager PyTorch, see bench/), eager torch otherwise."""
    device = torch.device(device)
    if device.type == "cpu" and available(device)["onnxruntime"] is None:
        return "onnxruntime"
    return "torch"


def create(name: str, loaded, device, precision: str = "fp32") -> Backend:
    """Build backend ``name`` for a ``checkpoints.LoadedModel`` on ``device``."""
    if name not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    parse_precision(precision)
    device = torch.device(device)
    if name == "auto":
        name = auto_backend(device)
    if name == "torch":
        return TorchBackend(loaded.module, device, precision)
    reason = available(device).get(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    raise BackendUnavailableError(f"backend {name!r} is not built into this version")
