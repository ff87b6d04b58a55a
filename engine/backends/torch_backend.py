"""Eager PyTorch: the reference backend, on the CPU or CUDA."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, module: nn.Module, device, precision: str = "fp32"):
        super().__init__(device, precision)
        # a private copy: moving or casting must not change the caller's module (or another engine's)
        self.module = copy.deepcopy(module).to(self.device).eval()
        if self.device.type == "cuda":
            self.module = self.module.to(memory_format=torch.channels_last)
        self.module = self.module.to(self.dtype) if self.dtype != torch.float32 else self.module

    @torch.inference_mode()
    def __call__(self, x, t):
        return self.module(x.to(self.dtype), t).float()


def unavailable_reason(device) -> str | None:
    return None


def create(loaded, device, precision):
    return TorchBackend(loaded.module, device, precision)
