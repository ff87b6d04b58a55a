"""TensorRT: an engine built from the exported ONNX graph (export/tensorrt_build.py), CUDA only.

UNVERIFIED: written against TensorRT 10's documented Python API (``Runtime.deserialize_cuda_engine``,
``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) but never
run: ``tensorrt`` does not install on this project's CI machine, which has no GPU either. The GPU
parity suite (tests/gpu) checks it where it can run.

A call binds torch buffers by address (``set_tensor_address``) and enqueues on the current torch
stream (``execute_async_v3`` = enqueueV3): no copy, no host sync, and nothing TensorRT-side that
a CUDA graph capture cannot record, as long as the batch size does not change between the
warm-up and the capture (the first enqueue at a new shape may allocate; GraphedSampler warms up
each bucket before capturing it).
"""

from __future__ import annotations

import threading

import torch

from ddpm_engine.export import iospec

from .. import cache
from ..errors import BackendUnavailableError, ModelLoadError, require
from .base import Backend


def _trt():
    return require("tensorrt", "the tensorrt backend (a TensorRT 10 build for your CUDA version)")


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, plan_path, device, precision: str, sample_shape, profile, io=None):
        super().__init__(device, precision, sample_shape, batches=(profile.min, profile.max), io=io)
        trt = _trt()
        self.path = plan_path
        self.profile = profile
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                raise ModelLoadError(f"TensorRT could not load {plan_path} (built by another TensorRT version or "
                                     "for another GPU?); delete it and it is rebuilt")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(k) for k in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted([*iospec.inputs_of(self.extra_inputs), iospec.OUTPUT]):
            raise ModelLoadError(f"{plan_path} has I/O tensors {names}, not ddpm-engine's ONNX I/O spec")
        self._t_dtype = torch.int32 if self.engine.get_tensor_dtype(iospec.TIMESTEP) == trt.DataType.INT32 \
            else torch.int64
        self._shape = None
        self._lock = threading.Lock()  # one execution context: one call at a time

    @classmethod
    def unavailable_reason(cls, device, precision: str) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return "TensorRT runs on NVIDIA GPUs only; use backend='onnxruntime' or 'torch' on the CPU"
        try:
            _trt()
        except ImportError:
            return "the package 'tensorrt' is not installed (pip install tensorrt, TensorRT 10 for your CUDA version)"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device here"
        return None

    @classmethod
    def create(cls, loaded, device, precision, profile=None) -> TensorRTBackend:
        """Build (or reuse the cached) engine for ``loaded`` on ``device`` and open it."""
        from ddpm_engine.export.tensorrt_build import DEFAULT_PROFILE, plan_builder

        profile = DEFAULT_PROFILE if profile is None else profile
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        plan, make = plan_builder(loaded, device, precision, profile)
        # a plan TensorRT cannot deserialize (another TensorRT version, a truncated file) is rebuilt once
        return cache.load(plan, make, lambda path: cls(path, device, precision, loaded.sample_shape, profile,
                                                       io=loaded.io),
                          corrupt=(ModelLoadError,))

    def run(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x.to(self.device, torch.float32).contiguous()
        t = t.to(self.device, self._t_dtype).contiguous()
        extra = [v.to(self.device, self._t_dtype if iospec.is_integer(n) else torch.float32).contiguous()
                 for n, v in zip(self.extra_inputs, extra)]  # int labels as t's int type
        out = x.new_empty((b, self.out_channels or x.shape[1], *x.shape[2:]))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with self._lock:
            ctx = self.context
            if self._shape != tuple(x.shape):
                ctx.set_input_shape(iospec.SAMPLE, tuple(x.shape))
                for name in (iospec.TIMESTEP, *self.extra_inputs):
                    ctx.set_input_shape(name, (b,) if iospec.is_integer(name) else tuple(x.shape))
                self._shape = tuple(x.shape)
            ctx.set_tensor_address(iospec.SAMPLE, x.data_ptr())
            ctx.set_tensor_address(iospec.TIMESTEP, t.data_ptr())
            for name, v in zip(self.extra_inputs, extra):
                ctx.set_tensor_address(name, v.data_ptr())
            ctx.set_tensor_address(iospec.OUTPUT, out.data_ptr())
            if not ctx.execute_async_v3(stream):
                raise BackendUnavailableError(f"TensorRT execute_async_v3 failed on {self.path.name} with x "
                                              f"{tuple(x.shape)}; see the TensorRT log above")
        return out

    def __repr__(self):
        return f"TensorRTBackend({self.path.name}, device={self.device}, precision={self.precision})"
