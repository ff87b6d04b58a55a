"""Eager PyTorch: the reference backend, on the CPU or CUDA.

The module runs in channels_last by default on both: cuDNN's fast layout for convolutions, and
oneDNN's on the CPU (one UNet call on a 2-core AMD EPYC Zen 4, loaded machine: digits 10.7 ->
6.2 ms at batch 1, CIFAR-10 UNet 2.9 -> 2.0 s; README, "The CPU: OpenVINO, native bf16 and a
measuring auto"). Its output then comes back in the input's logical NCHW shape but with
channels-last strides unless C == 1; the step kernels index flat contiguous buffers, so the output
is returned contiguous (one copy fused with the cast to float32, none when it already is).

bf16 / fp16 on the CPU: the module is cast and runs oneDNN's bf16 / fp16 kernels, native on a CPU
with AVX512_BF16 / AMX (bf16) or AVX512-FP16 (fp16). Elsewhere torch emulates them through fp32,
slower than fp32 itself: the backend then warns (``EmulatedPrecisionWarning``) and runs.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .. import cpu
from ..errors import EmulatedPrecisionWarning
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, module: nn.Module, device, precision: str = "fp32", channels_last: bool | None = None):
        """channels_last: run the module in that memory format (default: yes)."""
        super().__init__(device, precision)
        if self.device.type == "cpu" and not cpu.native(precision):
            warnings.warn(f"{precision} runs emulated on this CPU ({cpu.model()}: no native {precision} "
                          "instructions), slower than fp32; use precision='fp32' for speed",
                          EmulatedPrecisionWarning, stacklevel=3)
        # a private copy: moving or casting must not change the caller's module (or another engine's)
        self.module = copy.deepcopy(module).to(self.device).eval()
        self.channels_last = True if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.module = self.module.to(self.dtype) if self.dtype != torch.float32 else self.module

    @torch.inference_mode()
    def __call__(self, x, t):
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        out = self.module(x.to(dtype=self.dtype, memory_format=layout), t)
        return out.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def unavailable_reason(device, precision: str = "fp32") -> str | None:
    return None


def create(loaded, device, precision):
    return TorchBackend(loaded.module, device, precision)
