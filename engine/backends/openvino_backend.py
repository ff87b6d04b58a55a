"""OpenVINO on the CPU: the cached ONNX export (export/onnx_export.py), compiled by OpenVINO's CPU
plugin at the precision asked for.

- ``fp32``: ``INFERENCE_PRECISION_HINT`` f32 (true fp32: OpenVINO would otherwise pick bf16 by
  itself on a CPU that has it);
- ``bf16``: only on a CPU with native bf16 (``cpu.native_bf16``: AVX512_BF16 or AMX); OpenVINO
  would run f32 under a bf16 hint elsewhere, so this backend refuses instead of pretending;
- ``fp16``: only on a CPU with native fp16 (AVX512-FP16 or AMX-FP16; ``backend="auto"`` measures
  whether it is faster). UNVERIFIED: no CPU with AVX512-FP16 was at hand;
- ``int8``: the export quantized by NNCF's post-training quantization (``nncf.quantize``, the
  ``int8`` extra), calibrated on the inputs of the model's own sampling trajectories
  (``ddpm_engine.calibration``; a model's extra inputs too), each activation's range spanning
  every value it took on them (``ACTIVATION_RANGE``), with the layers of ``KEEP_FLOAT`` left in
  floating point (f32: the quantized graph is compiled under an f32 hint). Fast on a CPU with int8 dot products
  (AVX512-VNNI, AVX-VNNI, AMX-INT8); runs anywhere OpenVINO does. Never chosen by ``auto``
  unless asked for by name. The quantized graph is cached (``int8_path``): keyed by the ONNX
  export, the calibration settings, the layers kept in floating point, the activation range
  estimator and the versions of OpenVINO and NNCF.

Shapes: the blob is compiled with a dynamic batch, and the first ``STATIC_BATCHES`` batch sizes
that recur (a size's ``STATIC_AFTER_CALLS``-th call) are each compiled once more for exactly that
shape (in memory, each from a clone of one graph read once: ``SourceGraph``). OpenVINO plans
memory and picks kernels once for a fixed shape, which makes a call at a static shape faster than
at the dynamic one (docs/performance.md has the measurements). Other batch sizes run the
dynamic-shape model (the passing sizes of continuous batching, where requests join and leave, take
no slot). The static compiles run off the request path, on a background thread, one at a time: a
call never waits for one, it runs the dynamic-shape model until its size's compile is ready
(``request_for``); and a compile waits for a quiet moment (no call for ``QUIET_S``, at most
``MAX_DEFER_S``), so that it does not take the cores from a burst of calls (it would: a compile is
CPU work too, and the first 32-call burst ran 2.5x slower beside four of them); one not started
when the program ends is dropped. ``prepare(batches)`` compiles ahead, at once, and waits.

I/O: x and t are handed to OpenVINO as zero-copy views of the torch tensors (``ov.Tensor(...,
shared_memory=True)``), and the output is written straight into a fresh torch tensor bound as
the request's output tensor: no copy either way.

``cache_interval`` (engine/deepcache.py): the model's full and shallow steps are two more ONNX
exports (``export_onnx(..., part=...)``, cached on disk), compiled at the backend's precision with
a dynamic batch (in memory, on the first such request; no static-shape compiles) and compared
with the eager split before they serve (``deepcache.check_pair``). Not at int8 (its graph is
quantized whole).

Threads: OpenVINO runs its own pool (``owns_cpu_threads``, so the engine's per-step torch work
yields to it, see ``threads.yield_cpu_to``), with ``INFERENCE_NUM_THREADS`` from the engine's
CPU thread policy (``threads.openvino_options``: ``DDPM_ENGINE_THREADS``, else OpenVINO's
default of one thread per core): one stream, except that a static batch of at least
``STREAMS_MIN_BATCH`` images runs as ``STREAMS`` requests in flight, each on its part of the
batch, on as many streams sharing those threads (``streams_for``): their threads synchronise
less often than one request's, a gain measured at batch 8 and more (docs/performance.md).

Compiled-model cache (``ddpm_engine.cache``): ``$DDPM_ENGINE_CACHE/openvino``, one file per
(ONNX export key, precision, thread count, OpenVINO version, CPU model and flags): a JSON header
line naming what the blob was compiled from, then OpenVINO's exported blob. A file whose header
names another model, precision, OpenVINO version or CPU is refused and rebuilt, and so is one
OpenVINO cannot import (corrupt): once, through ``cache.load``. (OpenVINO's own ``CACHE_DIR``
names its blobs by its own hash and would import a stray blob of another model; the engine keeps
the identity check in its hands.)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from ddpm_engine.export import iospec

from .. import cache, calibration, cpu, deepcache, threads
from ..errors import BackendUnavailableError, ModelLoadError, first_line, require
from .base import Backend, extra_dtype, versions

# the CPU plugin's precision hint per precision; int8's quantized layers run int8 whatever the
# hint, the layers it keeps in floating point run f32 (a bf16 hint would round them once more)
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
BLOB_FORMAT = "ddpm-engine-openvino-blob"
INT8_FORMAT = "ddpm-engine-openvino-int8"
STATIC_BATCHES = 4  # how many batch sizes one backend compiles for their exact shape
STATIC_AFTER_CALLS = 4  # a batch size's static compile is asked for at its 4th call
QUIET_S = 0.1  # a static compile starts once no call has run for this long ...
MAX_DEFER_S = 5.0  # ... or this long after it was asked for
STREAMS = 2  # a static batch of at least STREAMS_MIN_BATCH images runs as this many requests in flight
STREAMS_MIN_BATCH = 8
# the layer groups (``float_groups``) int8 keeps in floating point, as measured: docs/performance.md
KEEP_FLOAT = ("first_last_conv", "time_embedding", "attention")
QUANTIZABLE = ("Convolution", "GroupConvolution", "MatMul")  # the op types NNCF quantizes here
# how each activation's int8 range is set from the calibration calls (the name of an
# ``nncf.quantization.range_estimator.RangeEstimatorParametersSet``), in the int8 cache key.
# "minmax": the smallest and largest value over every call, so that no timestep's activations are
# clipped. NNCF's default for per-tensor activations, "mean_minmax" (each call's min and max,
# averaged over the calls), clipped the larger activations of the noisier timesteps: a biased
# network (its samples brighter) and FD 1.28x fp32's at UniPC-20, 1.01x with "minmax" (measured:
# docs/performance.md)
ACTIVATION_RANGE = "minmax"


def _ov():
    return require("openvino", "the openvino backend", extra="openvino")


def _nncf():
    return require("nncf", "the openvino backend's int8", extra="int8")


def config(precision: str, streams: int = 1) -> dict:
    """The CPU plugin's settings, given both to compile and to import (an imported blob does not
    keep its precision hint: without it OpenVINO would run a fp32 blob in bf16 on a bf16 CPU);
    ``streams`` > 1: that many streams sharing the threads, for as many requests in flight."""
    hint = "LATENCY" if streams == 1 else "THROUGHPUT"
    return {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": hint, "NUM_STREAMS": streams,
            **threads.openvino_options()}


def streams_for(batch: int) -> int:
    """How many requests in flight run a static batch of ``batch`` images: ``STREAMS`` where it
    splits evenly, has at least ``STREAMS_MIN_BATCH`` images and OpenVINO a thread per stream,
    else 1 (docs/performance.md has the measurements)."""
    threads_ = threads.openvino_options()["INFERENCE_NUM_THREADS"] or os.cpu_count() or 1
    return STREAMS if batch >= STREAMS_MIN_BATCH and batch % STREAMS == 0 and threads_ >= STREAMS else 1


def precision_refusal(precision: str) -> str | None:
    """Why OpenVINO cannot run ``precision`` natively on this CPU, or None."""
    if precision in ("fp32", "int8") or cpu.native(precision):
        return None
    need = "AVX512_BF16 or AMX-BF16" if precision == "bf16" else "AVX512-FP16 or AMX-FP16"
    return (f"OpenVINO runs {precision} only on a CPU with native {precision} ({need}); this CPU ({cpu.model()}) "
            f"has none; use precision='fp32', or backend='torch' to run {precision} emulated (slower)")


def identity(loaded, precision: str) -> dict:
    """What a compiled blob must have been compiled from (its cache key and its file header)."""
    from ddpm_engine.export.onnx_export import cached_path

    quantized = {"int8": int8_path(loaded).name} if precision == "int8" else {}
    return {"format": BLOB_FORMAT, "onnx": cached_path(loaded).name, "weights": loaded.weights_hash,
            "precision": precision, "threads": threads.openvino_options()["INFERENCE_NUM_THREADS"],
            "openvino": _ov().get_version(), **quantized,
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


def _producers(node):
    return [i.get_source_output().get_node() for i in node.inputs()]


def _consumers(node):
    return [i.get_node() for out in node.outputs() for i in out.get_target_inputs()]


def float_groups(model) -> dict[str, list[str]]:
    """The quantizable ops (``QUANTIZABLE``) of an ``openvino.Model`` of the ONNX I/O spec, by the
    group a quantizer may keep in floating point, found from the graph, not from layer names:

    - ``first_last_conv``: the first and the last convolution (the image in, the output out);
    - ``time_embedding``: the ops that depend on t and not on x (the timestep's MLP and each
      block's projection of it);
    - ``attention``: the matmuls on either side of each softmax (q.k, and the weights times v),
      so that softmax's input and output stay in floating point;
    - ``skip_concat``: the convolutions that take a concatenation (the decoder's first
      convolution of each level, whose input joins the skip connection's features to the
      deeper ones: two ranges under one int8 scale; in a diffusers UNet the resnet's 1x1
      shortcut, its 3x3 convolution taking the concatenation through a GroupNorm)."""
    ops = model.get_ordered_ops()
    x, t = model.get_parameters()[:2]  # the I/O spec's order
    on_x = {x.get_friendly_name()}
    on_t = {t.get_friendly_name()}
    for op in ops:  # topological order: an op's producers come first
        names = {p.get_friendly_name() for p in _producers(op)}
        if names & on_x:
            on_x.add(op.get_friendly_name())
        if names & on_t:
            on_t.add(op.get_friendly_name())
    quantizable = [op for op in ops if op.get_type_name() in QUANTIZABLE]
    convs = [op.get_friendly_name() for op in quantizable if "Convolution" in op.get_type_name()]
    attention = set()
    for softmax in (op for op in ops if op.get_type_name().startswith("Softmax")):
        for step in (_producers, _consumers):
            frontier, seen = step(softmax), set()
            while frontier:  # through the elementwise ops (scale, mask, reshape) to the nearest matmuls
                node = frontier.pop()
                name = node.get_friendly_name()
                if name in seen or node.get_type_name() in ("Parameter", "Constant", "Result"):
                    continue
                seen.add(name)
                if node.get_type_name() == "MatMul":
                    attention.add(name)
                else:
                    frontier.extend(step(node))
    concat = [op.get_friendly_name() for op in quantizable if "Convolution" in op.get_type_name()
              and _producers(op)[0].get_type_name() == "Concat"]
    return {"first_last_conv": sorted({convs[0], convs[-1]}) if convs else [],
            "skip_concat": concat,
            "time_embedding": [op.get_friendly_name() for op in quantizable
                               if op.get_friendly_name() in on_t and op.get_friendly_name() not in on_x],
            "attention": sorted(attention)}


def quantize(model, calls, keep=KEEP_FLOAT, activation_range=ACTIVATION_RANGE, **options):
    """``model`` (an fp32 ``openvino.Model``) quantized to int8 by ``nncf.quantize``, calibrated on
    ``calls`` ([(x, t, *extra)], ``calibration.record``), the groups ``keep`` of ``float_groups`` left
    in floating point, the activations' ranges estimated by ``activation_range`` (see
    ``ACTIVATION_RANGE``); ``options`` go to ``nncf.quantize``."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    groups = float_groups(model)
    names = sorted({n for g in keep for n in groups[g]})
    data = nncf.Dataset(calls, lambda call: tuple(v.numpy() for v in call))
    advanced = options.pop("advanced_parameters", None) or AdvancedQuantizationParameters()
    advanced.activations_range_estimator_params = getattr(RangeEstimatorParametersSet, activation_range.upper())
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.WARNING)  # not a line per op kept in floating point, nor progress bars
    try:
        return nncf.quantize(model, data, subset_size=len(calls), ignored_scope=nncf.IgnoredScope(names=names),
                             advanced_parameters=advanced, **options)
    finally:
        log.setLevel(level)


def int8_identity(loaded) -> dict:
    """What a quantized graph must have been made from (its cache key and its file header)."""
    from ddpm_engine.export.onnx_export import cached_path as onnx_path

    return {"format": INT8_FORMAT, "onnx": onnx_path(loaded).name, "weights": loaded.weights_hash,
            "calibration": dict(calibration.SETTINGS), "keep_float": list(KEEP_FLOAT),
            "activation_range": ACTIVATION_RANGE,
            **versions(("openvino", "nncf"))}


def int8_path(loaded, cache_dir=None) -> Path:
    return cache.artifact_path("openvino", loaded.name, int8_identity(loaded), ".ovint8", ("int8",), cache_dir)


def write_int8(loaded, path) -> None:
    """Calibrate, quantize and write ``loaded``'s int8 graph to ``path``: a JSON header line
    (``int8_identity``), the IR's XML length as one decimal line, the XML, then the weights."""
    ov = _ov()
    core = ov.Core()
    model = quantize(onnx_model(core, loaded), calibration.record(loaded, calibration.SETTINGS))
    with tempfile.TemporaryDirectory() as tmp:
        ov.save_model(model, f"{tmp}/m.xml", compress_to_fp16=False)
        xml, weights = Path(f"{tmp}/m.xml").read_bytes(), Path(f"{tmp}/m.bin").read_bytes()
    with open(path, "wb") as f:
        f.write(json.dumps(int8_identity(loaded), sort_keys=True).encode() + b"\n")
        f.write(b"%d\n" % len(xml) + xml + weights)


def read_int8(core, loaded, path):
    """The int8 graph at ``path`` as an ``openvino.Model``; ModelLoadError if its header names
    another model, calibration or library version, or OpenVINO cannot read it."""
    with open(path, "rb") as f:
        header, size = f.readline(), f.readline()
        rest = f.read()
    try:
        found, size = json.loads(header), int(size)
        model = core.read_model(rest[:size].decode(), _ov().Tensor(np.frombuffer(rest[size:], np.uint8).copy()))
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"OpenVINO cannot read the int8 graph {path} (corrupt?): {type(exc).__name__}") from None
    if found != int8_identity(loaded):
        raise ModelLoadError(f"{path} is the int8 graph of something else; delete it and rebuild")
    return model


def int8_model(core, loaded):
    """``loaded``'s int8 graph (quantized once, then cached) as an ``openvino.Model``; a model with
    extra inputs (class labels, self-conditioning) is calibrated on them too (``calibration``)."""
    return cache.load(int8_path(loaded), lambda tmp: write_int8(loaded, tmp), lambda p: read_int8(core, loaded, p),
                      corrupt=(ModelLoadError,))


def source_model(core, loaded, precision: str):
    """The graph OpenVINO compiles for ``precision``: the int8 graph, else the ONNX export."""
    return int8_model(core, loaded) if precision == "int8" else onnx_model(core, loaded)


def precision_of(compiled) -> str:
    """The precision OpenVINO runs a compiled model at, as a hint value ("f32", "bf16", "f16")."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def compile_model(core, model, precision: str, what: str, streams: int = 1):
    """``model`` compiled for the CPU at ``precision`` (``config``); BackendUnavailableError if
    OpenVINO chose another precision."""
    compiled = core.compile_model(model, "CPU", config(precision, streams))
    got = precision_of(compiled)
    if got != HINTS[precision]:
        raise BackendUnavailableError(f"OpenVINO compiled {what} at {got}, not {HINTS[precision]} "
                                      f"({precision}) as asked; use precision='fp32'")
    return compiled


def compile_blob(loaded, precision: str, path) -> None:
    """Compile ``loaded``'s export with a dynamic batch for the CPU and write header + blob to ``path``."""
    core = _ov().Core()
    compiled = compile_model(core, source_model(core, loaded, precision), precision, repr(loaded.name))
    header = json.dumps(identity(loaded, precision), sort_keys=True).encode() + b"\n"
    with open(path, "wb") as f:
        f.write(header)
        f.write(compiled.export_model().getbuffer())


def import_blob(core, path, offset: int, precision: str):
    """(the compiled model, the mapping it runs from) of the blob in ``path`` from byte ``offset``
    on. The file is memory-mapped (privately: nothing is written back), not read: the compiled
    model keeps its weights in the file's pages, which other processes of the same model share and
    the kernel can reclaim, where a read would hold them as a private copy (measured:
    docs/performance.md, "Memory an engine holds between requests"). OpenVINO holds no reference
    to the mapping: the caller keeps it for as long as the compiled model lives. The cache replaces
    its files, never rewrites them (``cache.build``), so the file does not change under the
    mapping. An OpenVINO whose ``import_model`` takes no tensor (older releases) is given the
    bytes (mapping None). RuntimeError or ValueError: not a blob OpenVINO can import (corrupt or
    empty)."""
    mapping = np.memmap(path, np.uint8, mode="c", offset=offset)
    try:
        return core.import_model(_ov().Tensor(mapping, shared_memory=True), "CPU", config(precision)), mapping
    except TypeError:
        return core.import_model(bytes(mapping), "CPU", config(precision)), None


class SourceGraph:
    """One backend's ``source_model``, read on the first ``clone()`` and kept: each static shape
    compiles a clone of it, and clones share its weights, so a compile neither reads the file
    again nor holds a copy of the weights of its own (measured: docs/performance.md, "Memory an
    engine holds between requests"). Thread-safe (``prepare`` compiles on several threads at once)."""

    def __init__(self, loaded, precision: str):
        self.loaded, self.precision = loaded, precision
        self._model = None
        self._lock = threading.Lock()

    def clone(self):
        with self._lock:
            if self._model is None:
                self._model = source_model(_ov().Core(), self.loaded, self.precision)
            return self._model.clone()


def compile_static(source: SourceGraph, batch: int, streams: int = 1):
    """``source``'s graph (a clone of it) compiled for exactly ``batch`` images, with ``streams``
    streams (not cached on disk: importing a cached blob would save little over compiling, and
    each blob would take as much disk as the dynamic one)."""
    loaded, model = source.loaded, source.clone()
    names = iospec.inputs_of(loaded.io.extra_inputs)  # x, t, then the extra inputs: export.iospec's order
    model.reshape({port.any_name: [batch] if iospec.is_integer(name) else [batch, *loaded.sample_shape]
                   for name, port in zip(names, model.inputs)})
    return compile_model(_ov().Core(), model, source.precision, f"{loaded.name!r} at batch {batch}", streams)


def _compile_when_quiet(backend_ref, batch: int, deferred: bool) -> None:
    """A static-shape compile's thread. ``deferred``: one at a time (the backend's ``_compile_lock``),
    after a moment without calls (``_quiet``); it holds its backend only weakly until it compiles,
    so a backend dropped meanwhile (its engine gone) compiles nothing, and a program that ends
    meanwhile neither."""
    backend = backend_ref()
    if backend is None:
        return
    if not deferred:
        return backend._build_static(batch)
    lock, backend = backend._compile_lock, None
    with lock:
        quiet = _quiet(backend_ref)
        backend = backend_ref()
        if backend is not None:
            backend._build_static(batch, build=quiet)


def _quiet(backend_ref) -> bool:
    """Wait for a moment without calls (``QUIET_S``, at most ``MAX_DEFER_S``); False if the
    program ended meanwhile (its main thread done: the interpreter is joining threads) or the
    backend was dropped."""
    deadline = time.perf_counter() + MAX_DEFER_S
    while threading.main_thread().is_alive():
        backend = backend_ref()
        if backend is None:
            return False
        (start, end), backend = backend._last_call, None
        now = time.perf_counter()
        if now >= deadline or (end >= start and now - end >= QUIET_S):
            return True
        time.sleep(min(QUIET_S, deadline - now, 0.05))  # short naps: the end of the program shows soon
    return False


class OpenVINOBackend(Backend):
    name = "openvino"
    deep_cache = True
    loaded = None  # the checkpoints.LoadedModel it was made from (``create``): cache_interval exports from it
    quantized = ("int8",)
    owns_cpu_threads = True
    graph_capturable = False
    graph_capture_refusal = "OpenVINO runs on the CPU only; CUDA graphs need a CUDA backend"
    # OpenVINO's own buffers (its dynamic-shape model, fp32), measured per image against the eager
    # probe's: 1.9-2.2x on OpenAI's CIFAR-10, ImageNet-64 and LSUN-256 UNets, 4.8x on guided-
    # diffusion's 64x64 one (attention at 32x32); twice admitted batches that did not fit
    # (docs/openai.md, "The largest batch")
    working_memory_factor = 6

    def __init__(self, blob_path, expected: dict, sample_shape, precision: str = "fp32", compile_static=None,
                 io=None):
        """Import the compiled blob at ``blob_path``; a header other than ``expected`` or a blob
        OpenVINO cannot import raises ``ModelLoadError``. ``compile_static(batch, streams)``: a
        compiled model for exactly that batch (None: the dynamic-shape blob runs every batch). ``io``: the
        model's probe.ModelIO (its extra inputs and output channels; None: (x, t) -> C channels)."""
        super().__init__("cpu", precision, sample_shape, io=io)
        ov = _ov()
        self.path = Path(blob_path)
        with open(self.path, "rb") as f:
            header = f.readline()
        try:
            found = json.loads(header)
        except ValueError:
            found = None
        if found != expected:
            differs = sorted(k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k])
            raise ModelLoadError(f"{self.path} is a compiled model of something else (differs in {differs}); "
                                 "delete it and rebuild")
        try:
            self.compiled, blob = import_blob(ov.Core(), self.path, len(header), precision)
        except (RuntimeError, ValueError) as exc:
            first = first_line(exc)
            raise ModelLoadError(f"OpenVINO cannot import {self.path} (corrupt?): {first}") from None
        got = precision_of(self.compiled)
        if got != HINTS[precision]:
            raise ModelLoadError(f"{self.path} imported at {got}, not {HINTS[precision]}; delete it and rebuild")
        self.request = self.compiled.create_infer_request()  # the dynamic-shape model's
        self._compile_static = compile_static
        self._static = {}  # batch -> infer request(s) of its static-shape compile (or the dynamic one, if that failed)
        self._compiling = {}  # batch -> the thread compiling its static shape
        self._calls = {}  # batch -> calls so far, while it has no static compile
        self._static_lock = threading.Lock()
        self._compile_lock = threading.Lock()  # one deferred compile at a time
        self._last_call = (0.0, 0.0)  # perf_counter at the latest call's start and end (a compile's quiet moment)
        self._tensor = ov.Tensor
        self._pair = None  # cache_interval's {"full": request, "shallow": request}, compiled on first use
        self._deep_out = None  # (C, H, W) of the full graph's deep_features output
        # the blob's mapping (``import_blob``): the compiled model points into it without holding it;
        # set last, so that the compiled model and its requests are released before it
        self._blob = blob

    @classmethod
    def unavailable_reason(cls, device, precision: str) -> str | None:
        try:
            _ov()
        except ImportError:
            return "the package 'openvino' is not installed (pip install openvino, or ddpm-engine[openvino])"
        if torch.device(device).type != "cpu":
            return "the openvino backend runs on the CPU only; use backend='torch', 'aoti' or 'tensorrt' on CUDA"
        if precision == "int8" and importlib.util.find_spec("nncf") is None:
            return "int8 needs the package 'nncf' to quantize the model (pip install nncf, or ddpm-engine[int8])"
        return precision_refusal(precision)

    @classmethod
    def create(cls, loaded, device, precision) -> OpenVINOBackend:
        """Export ``loaded`` to ONNX (cached), compile it for the CPU at ``precision`` (cached) and open it."""
        from ddpm_engine.export.onnx_export import cached_path as onnx_path

        expected = identity(loaded, precision)
        source = SourceGraph(loaded, precision)
        backend = cache.load(cached_path(loaded, precision), lambda tmp: compile_blob(loaded, precision, tmp),
                             lambda path: cls(path, expected, loaded.sample_shape, precision,
                                              lambda *shape: compile_static(source, *shape), io=loaded.io),
                             corrupt=(ModelLoadError,))
        backend.built_from = (onnx_path(loaded),)  # the ONNX export its blobs are compiled from
        backend.loaded = loaded
        return backend

    def request_for(self, batch: int):
        """The infer request that runs ``batch`` images now, never waiting for a compile: its
        static-shape compile's if that is ready (a tuple of ``streams_for(batch)`` requests, each
        running its part of the batch, where that is more than 1), else the dynamic-shape model's. The
        ``STATIC_AFTER_CALLS``-th call of a size, while fewer than ``STATIC_BATCHES`` sizes have
        one, asks for that size's static compile (``_start_compile``: deferred to a quiet moment)."""
        request = self._static.get(batch)
        if request is not None:
            return request
        with self._static_lock:
            self._calls[batch] = self._calls.get(batch, 0) + 1
            if self._calls[batch] >= STATIC_AFTER_CALLS:
                self._start_compile(batch, deferred=True)
        return self._static.get(batch, self.request)

    def _start_compile(self, batch: int, deferred: bool) -> None:
        """Under ``_static_lock``: start ``batch``'s static compile on a background thread unless it
        has one, is compiling, or the ``STATIC_BATCHES`` slots are taken."""
        if (batch in self._static or batch in self._compiling or self._compile_static is None
                or len(self._static) + len(self._compiling) >= STATIC_BATCHES):
            return
        # not a daemon even when started from one (the batching server's): the interpreter joins
        # it at exit instead of finalizing under a compile inside OpenVINO
        thread = threading.Thread(target=_compile_when_quiet, args=(weakref.ref(self), batch, deferred),
                                  name=f"openvino-static-batch-{batch}", daemon=False)
        self._compiling[batch] = thread
        thread.start()

    def _build_static(self, batch: int, build: bool = True) -> None:
        """Compile ``batch``'s static shape (``build``; else record that none was) and serve it: a
        compile that fails warns and leaves the batch to the dynamic-shape model."""
        request = None
        if build:
            try:
                streams = streams_for(batch)
                compiled = self._compile_static(batch // streams, streams)
                request = tuple(compiled.create_infer_request() for _ in range(streams))
                request = request[0] if streams == 1 else request
            except (RuntimeError, BackendUnavailableError, ModelLoadError) as exc:
                first = first_line(exc)
                warnings.warn(f"OpenVINO could not compile {self.path.name} for batch {batch} ({first}); "
                              "that batch runs the dynamic-shape model", RuntimeWarning, stacklevel=2)
                request = self.request
        with self._static_lock:
            if request is not None:
                self._static[batch] = request
            del self._compiling[batch]

    def prepare(self, batches) -> None:
        """Compile the static shapes of ``batches`` (within ``STATIC_BATCHES``) now, not waiting
        for a quiet moment, and return when every pending compile is done: for a caller that
        knows its batch sizes ahead (a server, a benchmark), so that no call runs the dynamic
        model while one compiles."""
        with self._static_lock:
            for batch in batches:
                self._start_compile(int(batch), deferred=False)
        while True:
            with self._static_lock:
                pending = list(self._compiling.values())
            if not pending:
                return
            for thread in pending:
                thread.join()

    def run(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        self._last_call = (time.perf_counter(), self._last_call[1])
        try:
            return self._infer(self.request_for(x.shape[0]), x, t, *extra)
        finally:
            self._last_call = (self._last_call[0], time.perf_counter())

    def probe(self, *inputs) -> torch.Tensor:
        """The load check's call (``probe.check_graph``) on the dynamic-shape model, so it takes
        none of the static-shape slots the first served batch sizes get."""
        self.check_inputs(*inputs)
        return self._infer(self.request, *inputs)

    def _infer(self, request, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor, deep=None, deep_out=None):
        """Run ``request`` (or each of a tuple of requests on its equal part of the batch, in flight
        together) on zero-copy views of the inputs, into a fresh output tensor (with ``deep_out``
        (C, H, W): and the full graph's deep features); ``deep``: the shallow graph's deep-features
        input."""
        x = x.detach().to("cpu", torch.float32).contiguous()
        inputs = [x, t.detach().to("cpu", torch.int64).contiguous(),
                  *(v.detach().to("cpu", extra_dtype(n)).contiguous() for n, v in zip(self.extra_inputs, extra))]
        if deep is not None:
            inputs.append(deep.detach().to("cpu", torch.float32).contiguous())
        out = torch.empty((x.shape[0], self.out_channels or x.shape[1], *x.shape[2:]), dtype=torch.float32)
        outs = [out] if deep_out is None else [out, torch.empty((x.shape[0], *deep_out), dtype=torch.float32)]
        parts = request if isinstance(request, tuple) else (request,)
        n = x.shape[0] // len(parts)
        for start, part in zip(range(0, x.shape[0], n), parts):  # rows [start, start + n): contiguous views
            for k, v in enumerate(inputs):  # export.iospec's order: x, t, the extra inputs (then deep_features)
                part.set_input_tensor(k, self._tensor(v[start:start + n].numpy(), shared_memory=True))
            for k, v in enumerate(outs):
                part.set_output_tensor(k, self._tensor(v[start:start + n].numpy(), shared_memory=True))
        try:
            if len(parts) == 1:
                parts[0].infer()
            else:
                for part in parts:
                    part.start_async()
                for part in parts:
                    part.wait()
        except RuntimeError as exc:
            first = first_line(exc)
            raise BackendUnavailableError(f"OpenVINO failed on {self.path.name} with x {tuple(x.shape)}: "
                                          f"{first}") from None
        return out if deep_out is None else tuple(outs)

    # ---- cache_interval: the full and shallow steps' graphs (see the module docstring) ----

    def deep_cache_refusal(self) -> str | None:
        if self.loaded is None:
            return "this openvino backend was not made from a model (backends.create), so it has no full/shallow graphs"
        if self.precision == "int8":
            return "int8's graph is calibrated and quantized whole; use precision='fp32' or 'bf16' with cache_interval"
        return deepcache.refusal(self.loaded.module)

    def _pair_requests(self) -> dict:
        if self._pair is None:
            from ddpm_engine.export.onnx_export import load_pair

            loaded, core = self.loaded, _ov().Core()
            models = load_pair(loaded, lambda path: core.read_model(str(path)), corrupt=(RuntimeError,))
            compiled = {part: compile_model(core, model, self.precision, f"{loaded.name!r}'s {part} step")
                        for part, model in models.items()}
            self._deep_out = tuple(d.get_length() for d in compiled["full"].outputs[1].get_partial_shape()[1:])
            deepcache.checked(self, {part: c.create_infer_request() for part, c in compiled.items()},
                              f"the openvino graphs of {loaded.name!r} for cache_interval")
        return self._pair

    def run_full(self, x, t, *extra):
        request = self._pair_requests()["full"]
        return self._infer(request, x, t, *extra, deep_out=self._deep_out)

    def run_shallow(self, x, t, deep, *extra):
        return self._infer(self._pair_requests()["shallow"], x, t, *extra, deep=deep)

    def __repr__(self):
        return f"OpenVINOBackend({self.path.name}, precision={self.precision})"

