"""Eager PyTorch: the reference backend, on the CPU or CUDA.

Memory format:
- CUDA: channels_last, cuDNN's fast layout for convolutions.
- The CPU: whichever of NCHW and channels_last measures faster for this model, precision and CPU
  (``choose_layout``: the one measured choice of ``timing.py``, a few calls of each at batch 1
  and 8, cached on disk in ``$DDPM_ENGINE_CACHE/torch-layout`` keyed like auto's verdicts).
  Neither wins on every CPU and load (docs/performance.md has the measurements).
  ``TorchBackend(module, ...)`` built directly runs NCHW unless told (``channels_last=True``).

A channels_last module's output comes back in the input's logical NCHW shape but with
channels-last strides unless C == 1; the step kernels index flat contiguous buffers, so the output
is returned contiguous (one copy fused with the cast to float32, none when it already is).

bf16 / fp16 on the CPU: the module is cast and runs oneDNN's bf16 / fp16 kernels, native on a CPU
with AVX512_BF16 / AMX (bf16) or AVX512-FP16 (fp16). Elsewhere torch emulates them through fp32,
slower than fp32 itself: the backend then warns (``EmulatedPrecisionWarning``) and runs.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import cpu, deepcache
from ..errors import EmulatedPrecisionWarning
from . import timing
from .base import Backend

LAYOUTS = ("nchw", "channels_last")  # a tie in the measurement keeps the plain layout


class TorchBackend(Backend):
    name = "torch"
    deep_cache = True  # cache_interval: engine.deepcache's split of the module, eagerly

    def __init__(self, module: nn.Module, device, precision: str = "fp32", channels_last: bool | None = None,
                 sample_shape=None, io=None):
        """channels_last: run the module in that memory format (default: on CUDA only);
        sample_shape: the (C, H, W) calls must have (None: any); io: the model's probe.ModelIO
        (its extra inputs; None: (x, t))."""
        super().__init__(device, precision, sample_shape, io=io)
        if self.device.type == "cpu" and not cpu.native(precision):
            warnings.warn(f"{precision} runs emulated on this CPU ({cpu.model()}: no native {precision} "
                          "instructions), slower than fp32; use precision='fp32' for speed",
                          EmulatedPrecisionWarning, stacklevel=3)
        # a private copy: moving or casting must not change the caller's module (or another engine's)
        self.module = copy.deepcopy(module).to(self.device).eval()
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.module = self.module.to(self.dtype) if self.dtype != torch.float32 else self.module

    @classmethod
    def create(cls, loaded, device, precision) -> TorchBackend:
        """On CUDA: channels_last. On the CPU: the layout of ``choose_layout`` (measured once, cached)."""
        if torch.device(device).type != "cpu":
            return cls(loaded.module, device, precision, sample_shape=loaded.sample_shape, io=loaded.io)
        verdict, backend = choose_layout(loaded, precision)
        if backend is None:  # a cached verdict
            backend = cls(loaded.module, "cpu", precision, channels_last=verdict.choice == "channels_last",
                          sample_shape=loaded.sample_shape, io=loaded.io)
        return backend

    def _in(self, x):
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(dtype=self.dtype, memory_format=layout)

    @staticmethod
    def _out(y):
        return y.to(dtype=torch.float32, memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def run(self, x, t, *extra):
        return self._out(self.module(self._in(x), t, *extra))

    # ---- cache_interval: the module's full/shallow pair (engine.deepcache) ----

    def deep_cache_refusal(self) -> str | None:
        return deepcache.refusal(self.module)

    @functools.cached_property
    def pair(self) -> deepcache.Split:
        return deepcache.split(self.module)

    @torch.inference_mode()
    def run_full(self, x, t, *extra):
        out, deep = self.pair.full(self._in(x), t, *extra)
        return self._out(out), self._out(deep)

    @torch.inference_mode()
    def run_shallow(self, x, t, deep, *extra):
        return self._out(self.pair.shallow(self._in(x), t, self._in(deep), *extra))


def layout_path(loaded, precision: str, cache_dir=None) -> Path:
    return timing.verdict_path("torch-layout", loaded, precision, LAYOUTS, cache_dir)


def choose_layout(loaded, precision: str) -> tuple[timing.Verdict, TorchBackend | None]:
    """(the CPU layout verdict, measured once and cached: ``timing.measured_choice``; the chosen
    backend if it had to be built to measure, else None). A model that fails a probe call runs
    NCHW, unmeasured (the source says why), and is measured again next time."""
    def build(skipped: dict) -> dict:
        return {layout: TorchBackend(loaded.module, "cpu", precision, channels_last=layout == "channels_last",
                                     sample_shape=loaded.sample_shape, io=loaded.io)
                for layout in LAYOUTS}

    try:
        return timing.measured_choice(layout_path(loaded, precision), "torch layout", loaded, precision, LAYOUTS, build)
    except Exception as exc:  # the model failed a probe call (out of memory, a batch it refuses): plain layout
        return timing.Verdict("nchw", f"unmeasured: {type(exc).__name__}: {exc}", precision, what="torch layout"), None
