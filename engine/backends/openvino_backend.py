"""OpenVINO on the CPU: the cached ONNX export (export/onnx_export.py), compiled by OpenVINO's CPU
plugin at the precision asked for.

- ``fp32``: ``INFERENCE_PRECISION_HINT`` f32 (true fp32: OpenVINO would otherwise pick bf16 by
  itself on a CPU that has it);
- ``bf16``: only on a CPU with native bf16 (``cpu.native_bf16``: AVX512_BF16 or AMX); OpenVINO
  would run f32 under a bf16 hint elsewhere, so this backend refuses instead of pretending;
- ``fp16``: only on a CPU with native fp16 (AVX512-FP16 or AMX-FP16; ``backend="auto"`` measures
  whether it is faster). UNVERIFIED: no CPU with AVX512-FP16 was at hand.

Shapes: the blob is compiled with a dynamic batch, and the first ``STATIC_BATCHES`` batch sizes
a backend meets are each compiled once more for exactly that shape (in memory, from the same ONNX
export). OpenVINO plans memory and picks kernels once for a fixed shape, which makes a call at a
static shape faster than at the dynamic one (docs/performance.md has the measurements). Other
batch sizes run the dynamic-shape model.

I/O: x and t are handed to OpenVINO as zero-copy views of the torch tensors (``ov.Tensor(...,
shared_memory=True)``), and the output is written straight into a fresh torch tensor bound as
the request's output tensor: no copy either way.

Threads: OpenVINO runs its own pool (``owns_cpu_threads``, so the engine's per-step torch work
yields to it, see ``threads.yield_cpu_to``), one stream with ``INFERENCE_NUM_THREADS`` from the
engine's CPU thread policy (``threads.openvino_options``: ``DDPM_ENGINE_THREADS``, else
OpenVINO's default of one thread per core).

Compiled-model cache (``ddpm_engine.cache``): ``$DDPM_ENGINE_CACHE/openvino``, one file per
(ONNX export key, precision, thread count, OpenVINO version, CPU model and flags): a JSON header
line naming what the blob was compiled from, then OpenVINO's exported blob. A file whose header
names another model, precision, OpenVINO version or CPU is refused and rebuilt, and so is one
OpenVINO cannot import (corrupt): once, through ``cache.load``. (OpenVINO's own ``CACHE_DIR``
names its blobs by its own hash and would import a stray blob of another model; the engine keeps
the identity check in its hands.)
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import torch

from ddpm_engine.export import iospec

from .. import cache, cpu, threads
from ..errors import BackendUnavailableError, ModelLoadError, first_line, require
from .base import Backend, extra_dtype

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
BLOB_FORMAT = "ddpm-engine-openvino-blob"
STATIC_BATCHES = 4  # how many batch sizes one backend compiles for their exact shape


def _ov():
    return require("openvino", "the openvino backend", extra="openvino")


def config(precision: str) -> dict:
    """The CPU plugin's settings, given both to compile and to import (an imported blob does not
    keep its precision hint: without it OpenVINO would run a fp32 blob in bf16 on a bf16 CPU)."""
    return {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            **threads.openvino_options()}


def precision_refusal(precision: str) -> str | None:
    """Why OpenVINO cannot run ``precision`` natively on this CPU, or None."""
    if precision == "fp32" or cpu.native(precision):
        return None
    need = "AVX512_BF16 or AMX-BF16" if precision == "bf16" else "AVX512-FP16 or AMX-FP16"
    return (f"OpenVINO runs {precision} only on a CPU with native {precision} ({need}); this CPU ({cpu.model()}) "
            f"has none; use precision='fp32', or backend='torch' to run {precision} emulated (slower)")


def identity(loaded, precision: str) -> dict:
    """What a compiled blob must have been compiled from (its cache key and its file header)."""
    from ddpm_engine.export.onnx_export import cached_path

    return {"format": BLOB_FORMAT, "onnx": cached_path(loaded).name, "weights": loaded.weights_hash,
            "precision": precision, "threads": threads.openvino_options()["INFERENCE_NUM_THREADS"],
            "openvino": _ov().get_version(),
            "cpu": cpu.model(), "flags": sorted(cpu.flags())}


def cached_path(loaded, precision: str, cache_dir=None) -> Path:
    return cache.artifact_path("openvino", loaded.name, identity(loaded, precision), ".ovblob", (precision,), cache_dir)


def read_onnx(core, loaded, path):
    """The ONNX graph at ``path`` as an ``openvino.Model``, checked to be ``loaded``'s export that
    follows the I/O spec (``ModelLoadError`` otherwise)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        model = core.read_model(str(path))
    except (RuntimeError, OSError, ValueError, DecodeError) as exc:
        raise ModelLoadError(f"OpenVINO cannot read {path} (corrupt?): {type(exc).__name__}") from None
    if meta.get(iospec.META_WEIGHTS_HASH) != loaded.weights_hash:
        raise ModelLoadError(f"{path} was exported from another model; delete it or re-export this model")
    problems = iospec.mismatches(*iospec.from_openvino(model), loaded.sample_shape, loaded.io.out_channels,
                                 loaded.io.extra_inputs)
    if problems:
        raise ModelLoadError(f"{path} does not fit this model / ddpm-engine's ONNX I/O spec: {'; '.join(problems)}")
    return model


def onnx_model(core, loaded):
    """``loaded``'s cached ONNX export (re-exported once if it is not this model's graph) as an
    ``openvino.Model``."""
    from ddpm_engine.export.onnx_export import cached_path as onnx_path, export_onnx

    return cache.load(onnx_path(loaded), lambda tmp: export_onnx(loaded, tmp), lambda p: read_onnx(core, loaded, p),
                      corrupt=(ModelLoadError,))


def precision_of(compiled) -> str:
    """The precision OpenVINO runs a compiled model at, as a hint value ("f32", "bf16", "f16")."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def compile_model(core, model, precision: str, what: str):
    """``model`` compiled for the CPU at ``precision``; BackendUnavailableError if OpenVINO chose
    another precision."""
    compiled = core.compile_model(model, "CPU", config(precision))
    got = precision_of(compiled)
    if got != HINTS[precision]:
        raise BackendUnavailableError(f"OpenVINO compiled {what} at {got}, not {HINTS[precision]} "
                                      f"({precision}) as asked; use precision='fp32'")
    return compiled


def compile_blob(loaded, precision: str, path) -> None:
    """Compile ``loaded``'s export with a dynamic batch for the CPU and write header + blob to ``path``."""
    core = _ov().Core()
    compiled = compile_model(core, onnx_model(core, loaded), precision, repr(loaded.name))
    header = json.dumps(identity(loaded, precision), sort_keys=True).encode() + b"\n"
    with open(path, "wb") as f:
        f.write(header)
        f.write(compiled.export_model().getbuffer())


def compile_static(loaded, precision: str, batch: int):
    """``loaded``'s export compiled for exactly ``batch`` images (not cached on disk: importing a
    cached blob would save little over compiling, and each blob would take as much disk as the
    dynamic one)."""
    core = _ov().Core()
    model = onnx_model(core, loaded)
    names = iospec.inputs_of(loaded.io.extra_inputs)  # x, t, then the extra inputs: export.iospec's order
    model.reshape({port.any_name: [batch] if iospec.is_integer(name) else [batch, *loaded.sample_shape]
                   for name, port in zip(names, model.inputs)})
    return compile_model(core, model, precision, f"{loaded.name!r} at batch {batch}")


class OpenVINOBackend(Backend):
    name = "openvino"
    owns_cpu_threads = True
    graph_capturable = False
    graph_capture_refusal = "OpenVINO runs on the CPU only; CUDA graphs need a CUDA backend"

    def __init__(self, blob_path, expected: dict, sample_shape, precision: str = "fp32", compile_static=None,
                 io=None):
        """Import the compiled blob at ``blob_path``; a header other than ``expected`` or a blob
        OpenVINO cannot import raises ``ModelLoadError``. ``compile_static(batch)``: a compiled
        model for exactly that batch (None: the dynamic-shape blob runs every batch). ``io``: the
        model's probe.ModelIO (its extra inputs and output channels; None: (x, t) -> C channels)."""
        super().__init__("cpu", precision, sample_shape, io=io)
        ov = _ov()
        self.path = Path(blob_path)
        with open(self.path, "rb") as f:
            header, blob = f.readline(), f.read()
        try:
            found = json.loads(header)
        except ValueError:
            found = None
        if found != expected:
            differs = sorted(k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k])
            raise ModelLoadError(f"{self.path} is a compiled model of something else (differs in {differs}); "
                                 "delete it and rebuild")
        try:
            self.compiled = ov.Core().import_model(blob, "CPU", config(precision))
        except RuntimeError as exc:
            first = first_line(exc)
            raise ModelLoadError(f"OpenVINO cannot import {self.path} (corrupt?): {first}") from None
        got = precision_of(self.compiled)
        if got != HINTS[precision]:
            raise ModelLoadError(f"{self.path} imported at {got}, not {HINTS[precision]}; delete it and rebuild")
        self.request = self.compiled.create_infer_request()  # the dynamic-shape model's
        self._compile_static = compile_static
        self._static = {}  # batch -> infer request of its static-shape compile (or the dynamic one, if that failed)
        self._static_lock = threading.Lock()
        self._tensor = ov.Tensor

    @classmethod
    def unavailable_reason(cls, device, precision: str) -> str | None:
        try:
            _ov()
        except ImportError:
            return "the package 'openvino' is not installed (pip install openvino, or ddpm-engine[openvino])"
        if torch.device(device).type != "cpu":
            return "the openvino backend runs on the CPU only; use backend='torch', 'aoti' or 'tensorrt' on CUDA"
        return precision_refusal(precision)

    @classmethod
    def create(cls, loaded, device, precision) -> OpenVINOBackend:
        """Export ``loaded`` to ONNX (cached), compile it for the CPU at ``precision`` (cached) and open it."""
        from ddpm_engine.export.onnx_export import cached_path as onnx_path

        expected = identity(loaded, precision)
        backend = cache.load(cached_path(loaded, precision), lambda tmp: compile_blob(loaded, precision, tmp),
                             lambda path: cls(path, expected, loaded.sample_shape, precision,
                                              lambda batch: compile_static(loaded, precision, batch), io=loaded.io),
                             corrupt=(ModelLoadError,))
        backend.built_from = (onnx_path(loaded),)  # the ONNX export its blobs are compiled from
        return backend

    def request_for(self, batch: int):
        """The infer request that runs ``batch`` images: its static-shape compile, made at the
        first call of one of the first ``STATIC_BATCHES`` sizes; else the dynamic-shape model's."""
        request = self._static.get(batch)
        if request is not None:
            return request
        with self._static_lock:
            if batch not in self._static:
                if self._compile_static is None or len(self._static) >= STATIC_BATCHES:
                    return self.request
                try:
                    self._static[batch] = self._compile_static(batch).create_infer_request()
                except (RuntimeError, BackendUnavailableError, ModelLoadError) as exc:
                    first = first_line(exc)
                    warnings.warn(f"OpenVINO could not compile {self.path.name} for batch {batch} ({first}); "
                                  "that batch runs the dynamic-shape model", RuntimeWarning, stacklevel=3)
                    self._static[batch] = self.request
            return self._static[batch]

    def run(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return self._infer(self.request_for(x.shape[0]), x, t, *extra)

    def probe(self, *inputs) -> torch.Tensor:
        """The load check's call (``probe.check_graph``) on the dynamic-shape model, so it takes
        none of the static-shape slots the first served batch sizes get."""
        self.check_inputs(*inputs)
        return self._infer(self.request, *inputs)

    def _infer(self, request, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        inputs = [x, t.detach().to("cpu", torch.int64).contiguous(),
                  *(v.detach().to("cpu", extra_dtype(n)).contiguous() for n, v in zip(self.extra_inputs, extra))]
        out = torch.empty((x.shape[0], self.out_channels or x.shape[1], *x.shape[2:]), dtype=torch.float32)
        for k, v in enumerate(inputs):  # export.iospec's order: x, t, then the extra inputs
            request.set_input_tensor(k, self._tensor(v.numpy(), shared_memory=True))
        request.set_output_tensor(0, self._tensor(out.numpy(), shared_memory=True))
        try:
            request.infer()
        except RuntimeError as exc:
            first = first_line(exc)
            raise BackendUnavailableError(f"OpenVINO failed on {self.path.name} with x {tuple(x.shape)}: "
                                          f"{first}") from None
        return out

    def __repr__(self):
        return f"OpenVINOBackend({self.path.name}, precision={self.precision})"

