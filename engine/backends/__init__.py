"""Backends: (x_t, t) -> model output, one small class each, all on the contract of
``base.Backend``. ``create`` is the API boundary: it checks the name, the precision and the
device once, then builds one by name (backends/registry.py) or measures for "auto"
(backends/auto.py)."""

from __future__ import annotations

import torch

from .. import threads
from ..errors import InvalidRequestError
from .base import PACKAGES, PRECISIONS, Backend, parse_precision, versions
from .registry import BACKEND_CLASSES, BACKENDS, available, backend_class, create_named


def create(name: str, loaded, device, precision: str = "fp32") -> Backend:
    """Build backend ``name`` for a ``checkpoints.LoadedModel`` on ``device``; "auto" measures the
    candidates once per model, precision and CPU (``backends.auto``)."""
    if name not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    parse_precision(precision)
    device = torch.device(device)
    threads.cpu_policy()  # a bad DDPM_ENGINE_THREADS / DDPM_ENGINE_SPIN fails here, before any work
    if name != "auto":
        return create_named(name, loaded, device, precision)
    from .auto import decide

    verdict, built = decide(loaded, device, precision)
    return built if built is not None else create_named(verdict.choice, loaded, device, precision)
