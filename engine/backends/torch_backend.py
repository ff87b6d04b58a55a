"""Eager PyTorch: the reference backend, on the CPU or CUDA.

On CUDA the module runs in channels_last (cuDNN's fast layout for convolutions). Its output then
comes back in the input's logical NCHW shape but with channels-last strides unless C == 1; the
step kernels index flat contiguous buffers, so the output is returned contiguous (one copy fused
with the cast to float32, none when it already is).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, module: nn.Module, device, precision: str = "fp32", channels_last: bool | None = None):
        """channels_last: run the module in that memory format (default: on CUDA only)."""
        super().__init__(device, precision)
        # a private copy: moving or casting must not change the caller's module (or another engine's)
        self.module = copy.deepcopy(module).to(self.device).eval()
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.module = self.module.to(self.dtype) if self.dtype != torch.float32 else self.module

    @torch.inference_mode()
    def __call__(self, x, t):
        out = self.module(x.to(self.dtype), t)
        return out.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def unavailable_reason(device) -> str | None:
    return None


def create(loaded, device, precision):
    return TorchBackend(loaded.module, device, precision)
