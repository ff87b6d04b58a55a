"""ONNX Runtime: the exported fp32 graph on the CPU provider, or on CUDA with IOBinding.

CPU: x and t are handed to ORT as zero-copy NumPy views, the output comes back as a tensor that
shares ORT's buffer. Session options: all graph optimisations; threads and spinning from the
engine's CPU policy (``engine/threads.py``: ORT's default count, one per physical core, and no
spinning unless DDPM_ENGINE_THREADS / DDPM_ENGINE_SPIN say otherwise).

CUDA (UNVERIFIED: written against ORT's documented Python API - ``io_binding``,
``bind_input(..., buffer_ptr=...)``, the CUDA provider's ``user_compute_stream`` option and the
``disable_synchronize_execution_providers`` run option - but never run, as this project's CI has
no GPU; needs ``onnxruntime-gpu``): inputs and the output are torch CUDA tensors bound by pointer,
and ORT runs on the torch stream that was current when the session was made, so there is neither
a copy nor a host sync per call. Calling from another torch stream later is not supported, which
is why this backend is not ``graph_capturable`` (CUDA graphs capture on a side stream).

Only fp32: the graph is exported in fp32 and no fp16 conversion is done here.

``cache_interval`` (engine/deepcache.py), on the CPU: the model's full and shallow steps are two
more exported graphs (``export_onnx(..., part=...)``, cached beside the whole one), opened on the
first such request and compared with the eager split before they serve (``deepcache.check_pair``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm_engine.export import iospec

from .. import cache, deepcache, threads
from ..errors import BackendUnavailableError, InvalidRequestError, ModelLoadError, first_line, require
from .base import Backend, extra_dtype, parse_precision


def _ort():
    return require("onnxruntime", "the onnxruntime backend")


def _ort_errors() -> tuple:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def precision_refusal(precision: str) -> str | None:
    """Why ONNX Runtime cannot run ``precision``, or None: it runs the exported fp32 graph only."""
    if precision == "fp32":
        return None
    return "it runs the fp32 graph only; use precision='fp32', or backend='openvino' or 'torch' for reduced precision"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    deep_cache = True
    loaded = None  # the checkpoints.LoadedModel it was made from (``create``): cache_interval exports from it
    graph_capturable = False
    graph_capture_refusal = ("ONNX Runtime's CUDA provider runs on the stream fixed when its session was made "
                             "(user_compute_stream), but a CUDA graph is captured on a side stream, so its work "
                             "would not be recorded; use driver='eager', or backend='torch', 'aoti' or 'tensorrt' "
                             "for CUDA graphs")

    def __init__(self, onnx_path, device="cpu", precision: str = "fp32", expected_hash: str | None = None,
                 expected_shape=None, io=None):
        """Open ``onnx_path``; with ``expected_hash`` / ``expected_shape`` (C, H, W) / ``io`` (the
        model's probe.ModelIO: its extra inputs and output channels) refuse a graph exported from
        another model (``ModelLoadError``). ``precision`` as ``create`` or ``from_file`` checked it
        (fp32). Without ``io`` the extra inputs are the graph's own."""
        super().__init__(device, precision, io=io)
        ort = _ort()
        self.path = Path(onnx_path)
        self.session = self._open(ort)
        self.owns_cpu_threads = self.device.type == "cpu"
        if self.device.type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailableError("ONNX Runtime could not start its CUDA provider (CUDA/cuDNN libraries "
                                          "missing or of another version?); see onnxruntime-gpu's install notes")
        self._run_options = ort.RunOptions()
        if self.device.type == "cuda":  # no host sync per call: ORT runs on torch's current stream
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        meta = self.session.get_modelmeta().custom_metadata_map
        if expected_hash is not None and meta.get(iospec.META_WEIGHTS_HASH) != expected_hash:
            raise ModelLoadError(f"{self.path} was exported from another model (weights hash "
                                 f"{meta.get(iospec.META_WEIGHTS_HASH, 'absent')!r}, expected {expected_hash!r}); "
                                 "delete it or re-export this model")
        inputs, outputs = iospec.from_session(self.session)
        if io is None:
            self.extra_inputs = tuple(n for n, _, _ in inputs[2:] if n in iospec.EXTRA_INPUTS)
        problems = iospec.mismatches(inputs, outputs, expected_shape, self.out_channels, self.extra_inputs)
        if problems:
            raise ModelLoadError(f"{self.path} does not fit this model / ddpm-engine's ONNX I/O spec: "
                                 f"{'; '.join(problems)}; re-export it with export.onnx_export.export_onnx")
        graph_shape = inputs[0][2][1:]
        fixed = all(isinstance(s, int) for s in graph_shape)
        self.sample_shape = tuple(expected_shape) if expected_shape is not None else graph_shape if fixed else None
        out_c = outputs[0][2][1]
        self.out_channels = self.out_channels or (out_c if isinstance(out_c, int) else None)
        self._errors = _ort_errors()
        self._pair = None  # cache_interval's {"full": session, "shallow": session}, opened on first use

    @classmethod
    def unavailable_reason(cls, device, precision: str) -> str | None:
        refusal = precision_refusal(precision)
        if refusal is not None:
            return refusal
        try:
            ort = _ort()
        except ImportError:
            return "the package 'onnxruntime' is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        device = torch.device(device)
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("this onnxruntime has no CUDAExecutionProvider; pip uninstall onnxruntime && "
                    "pip install onnxruntime-gpu")
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type!r} is not supported (cpu or cuda)"
        return None

    @classmethod
    def create(cls, loaded, device, precision) -> OnnxRuntimeBackend:
        """Export ``loaded`` (cached on disk, see ``export.onnx_export``) and open a session on it; a
        cached file that does not open as this model's graph is re-exported once."""
        require("onnx", "the onnxruntime backend (ONNX export)")
        from ddpm_engine.export.onnx_export import cached_path, export_onnx

        backend = cache.load(cached_path(loaded), lambda tmp: export_onnx(loaded, tmp),
                             lambda path: cls(path, device, precision, expected_hash=loaded.weights_hash,
                                              expected_shape=loaded.sample_shape, io=loaded.io),
                             corrupt=(ModelLoadError,))
        backend.loaded = loaded
        return backend

    @classmethod
    def from_file(cls, onnx_path, device="cpu", precision: str = "fp32") -> OnnxRuntimeBackend:
        """Run any ONNX file that follows ``export.iospec`` (no check of which model it came from)."""
        parse_precision(precision)
        refusal = precision_refusal(precision)
        if refusal is not None:
            raise BackendUnavailableError(f"the onnxruntime backend cannot run {precision!r}: {refusal}")
        return cls(onnx_path, device, precision)

    def _open(self, ort, path=None):
        path = self.path if path is None else Path(path)
        if not path.is_file():
            raise ModelLoadError(f"no ONNX file at {path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        threads.onnxruntime_options(options)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except _ort_errors() as exc:
            first = first_line(exc)
            raise ModelLoadError(f"ONNX Runtime cannot load {path} (corrupt or not an ONNX model?): "
                                 f"{first}; delete it and re-export") from None

    def run(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(self.device, torch.float32).contiguous()
        t = t.detach().to(self.device, torch.int64).contiguous()
        extra = [v.detach().to(self.device, extra_dtype(n)).contiguous() for n, v in zip(self.extra_inputs, extra)]
        if self.device.type == "cuda":
            return self._guarded(x, lambda: self._run_cuda(x, t, extra))
        return self._run_cpu(self.session, [iospec.OUTPUT], x, t, extra)[0]

    def _run_cpu(self, session, outputs, x, t, extra, deep=None) -> list:
        x, t = x.detach().to("cpu", torch.float32).contiguous(), t.detach().to("cpu", torch.int64).contiguous()
        feed = {iospec.SAMPLE: x.numpy(), iospec.TIMESTEP: t.numpy(),
                **{name: v.detach().to("cpu", extra_dtype(name)).contiguous().numpy()
                   for name, v in zip(self.extra_inputs, extra)}}
        if deep is not None:
            feed[iospec.DEEP] = deep.detach().to("cpu", torch.float32).contiguous().numpy()
        return self._guarded(x, lambda: [torch.from_numpy(v) for v in session.run(outputs, feed, self._run_options)])

    def _guarded(self, x, call):
        try:
            return call()
        except self._errors as exc:
            first = first_line(exc)
            error = InvalidRequestError if type(exc).__name__ == "InvalidArgument" else BackendUnavailableError
            raise error(f"ONNX Runtime failed on {self.path.name} with x {tuple(x.shape)}: {first}") from None

    # ---- cache_interval: the full and shallow steps' graphs (see the module docstring) ----

    def deep_cache_refusal(self) -> str | None:
        if self.loaded is None:
            return ("an ONNX file opened with from_file has no full/shallow graphs; open the model with "
                    "backend='onnxruntime' (Engine.from_pretrained / from_module)")
        if self.device.type != "cpu":
            return "onnxruntime runs cache_interval on the CPU only; use backend='torch' on CUDA"
        return deepcache.refusal(self.loaded.module)

    def _pair_sessions(self) -> dict:
        if self._pair is None:
            from ddpm_engine.export.onnx_export import load_pair

            ort = _ort()
            pair = load_pair(self.loaded, lambda path: self._open(ort, path), corrupt=(ModelLoadError,))
            deepcache.checked(self, pair, f"the onnxruntime graphs of {self.loaded.name!r} for cache_interval")
        return self._pair

    def run_full(self, x, t, *extra):
        return tuple(self._run_cpu(self._pair_sessions()["full"], [iospec.OUTPUT, iospec.DEEP], x, t, extra))

    def run_shallow(self, x, t, deep, *extra):
        return self._run_cpu(self._pair_sessions()["shallow"], [iospec.OUTPUT], x, t, extra, deep)[0]

    def _run_cuda(self, x, t, extra):  # UNVERIFIED, see the module docstring
        out = x.new_empty((x.shape[0], self.out_channels or x.shape[1], *x.shape[2:]))
        index = self.device.index
        binding = self.session.io_binding()
        binding.bind_input(iospec.SAMPLE, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_input(iospec.TIMESTEP, "cuda", index, np.int64, tuple(t.shape), t.data_ptr())
        for name, v in zip(self.extra_inputs, extra):
            kind = np.int64 if iospec.is_integer(name) else np.float32
            binding.bind_input(name, "cuda", index, kind, tuple(v.shape), v.data_ptr())
        binding.bind_output(iospec.OUTPUT, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding, self._run_options)
        return out

    def __repr__(self):
        return f"OnnxRuntimeBackend({self.path.name}, device={self.device}, precision={self.precision})"

