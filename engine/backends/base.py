"""What every backend is: a callable (x_t, t) -> model output, nothing else.

x is [B, C, H, W] float32 on the backend's device, t is int64 [B] (training timesteps); the
output is float32 of x's shape. A backend knows nothing about schedules or samplers, keeps its
own precision inside, and never synchronises with the host per call.
"""

from __future__ import annotations

import torch

from ..errors import BackendUnavailableError, InvalidRequestError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_precision(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except (KeyError, TypeError):
        raise InvalidRequestError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}") from None


class Backend:
    name = "base"
    # True for a backend that runs its own CPU thread pool (ONNX Runtime on the CPU): the engine
    # then does its per-step torch work on one thread, see engine.threads
    owns_cpu_threads = False
    # whether a call can be recorded in a CUDA graph captured on a side stream (the graph drivers,
    # engine.cuda.graphs); a backend that cannot says why in graph_capture_refusal
    graph_capturable = True
    graph_capture_refusal = ""

    def __init__(self, device: torch.device, precision: str):
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = parse_precision(precision)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(x, t)")

    def check_graph_capturable(self) -> None:
        """Raise BackendUnavailableError (saying why and what to use) if this backend cannot be
        captured in a CUDA graph; the graph drivers call it before capturing."""
        if not self.graph_capturable:
            raise BackendUnavailableError(f"the {self.name} backend cannot run under a CUDA graph driver: "
                                          f"{self.graph_capture_refusal or 'it is not graph-capturable'}")

    def __repr__(self):
        return f"{type(self).__name__}(device={self.device}, precision={self.precision})"
