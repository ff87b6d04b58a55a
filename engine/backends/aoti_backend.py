"""AOTInductor: the model exported with ``torch.export`` (dynamic batch) and compiled ahead of time
into a ``.pt2`` package by ``torch._inductor.aoti_compile_and_package``, then run through
``torch._inductor.aoti_load_package`` - generated C++/Triton code, no Python per layer.

The package serves batch sizes 1..MAX_BATCH. A model that branches on the batch size (diffusers'
``Upsample2D``: ``if batch >= 64``) cannot be exported over that range; ``export_programs`` then
exports one program per range the branches cut it into, all compiled into the one package, and a
call picks its program by comparing the batch size (host metadata, no sync). See
``export_programs``.

The package holds the model at the requested precision behind a float32 in / float32 out
wrapper, so the graph matches the backend contract. It is cached on disk (``ddpm_engine.cache``) at
``$DDPM_ENGINE_CACHE/aoti`` (default ``~/.cache/ddpm-engine/aoti``), one file per (weights hash,
model structure, sample shape, precision, torch version, device: GPU name and capability, or the
CPU's ISA level, and the TF32 settings, which Inductor bakes in). A build is a C++ compile, long
for a large model (docs/performance.md); later engines load the file (one that fails to load is
rebuilt once). The package is loaded with ``run_single_threaded=True`` (see ``load_package``),
so a call can be captured in a CUDA graph.

CUDA: UNVERIFIED here (this project's CI has no GPU); the GPU parity suite (tests/gpu) checks
it. The compiled model runs on the current torch stream. CPU: needs a C++ compiler, see
tests/engine/backends/test_aoti_backend.py.
"""

from __future__ import annotations

import copy
import inspect
import re
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import cache
from ..errors import ExportError, first_line
from .base import PRECISIONS, Backend, extra_dtype

EXAMPLE_BATCH = 2  # not 1: export would specialise the batch axis to 1
MAX_BATCH = 4096
MAX_PROGRAMS = 4  # the most programs (batch ranges, one compile each) for a model that branches on the batch size


class _Float32IO(nn.Module):
    """float32 x in, float32 output out, ``module`` at its own precision inside."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x, t, extra1=None, extra2=None):  # export.iospec's extra inputs: torch.export takes no *args
        extra = [v.to(self.dtype) if v.is_floating_point() else v for v in (extra1, extra2) if v is not None]
        return self.module(x.to(self.dtype), t, *extra).float()


def device_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        return f"{props.name} sm{props.major}{props.minor} tf32={tf32}"
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


def cached_path(loaded, device, precision: str, cache_dir=None) -> Path:
    parts = {"weights": loaded.weights_hash, "structure": cache.module_structure(loaded.module),
             "sample_shape": list(loaded.sample_shape), "precision": precision, "torch": torch.__version__,
             "device": device_key(device)}
    return cache.artifact_path("aoti", loaded.name, parts, ".pt2", (precision, torch.device(device).type), cache_dir)


def _example(sample_shape, device, batch: int, io=None):
    """Example inputs (x, t and the model's extra inputs, ``probe.ModelIO``) of ``batch`` images."""
    from ddpm_engine.export.onnx_export import example_inputs

    extra, classes = (io.extra_inputs, io.num_classes) if io is not None else ((), None)
    return example_inputs(sample_shape, extra, classes, batch, device)


def _export(wrapped, sample_shape, device, lo: int, hi: int, io=None):
    """``wrapped`` exported for every batch size in lo..hi (one named dynamic batch axis)."""
    batch = torch.export.Dim("batch", min=lo, max=hi)
    example = _example(sample_shape, device, min(max(lo, EXAMPLE_BATCH), hi), io)
    return torch.export.export(wrapped, example, dynamic_shapes=tuple({0: batch} for _ in example))


def _is_batch_range_refused(exc: Exception) -> bool:
    """Whether ``exc`` is torch.export refusing the declared batch range because a guard (the model
    branches on the batch size) holds on part of it only."""
    from torch._dynamo.exc import UserError, UserErrorType

    return isinstance(exc, UserError) and exc.error_type == UserErrorType.CONSTRAINT_VIOLATION


def _guarded_max(wrapped, sample_shape, device, lo: int, io=None) -> int:
    """The largest batch size that takes the same branches as batch ``max(lo, 2)``: exported with
    ``Dim.DYNAMIC``, torch.export narrows the batch range to the one its guards hold on."""
    batch = torch.export.Dim.DYNAMIC
    example = _example(sample_shape, device, max(lo, EXAMPLE_BATCH), io)
    program = torch.export.export(wrapped, example, dynamic_shapes=tuple({0: batch} for _ in example))
    x_name = program.graph_signature.user_inputs[0]
    size = next(n for n in program.graph.nodes if n.name == x_name).meta["val"].shape[0]
    upper = program.range_constraints[size.node.expr].upper  # DYNAMIC raises where export specialises
    return MAX_BATCH if upper >= MAX_BATCH else int(upper)


def export_programs(wrapped, sample_shape, device, io=None) -> list[tuple[int, int, object]]:
    """``[(lo, hi, exported program)]`` that cover batch sizes 1..MAX_BATCH in order.

    One program over the whole range where torch.export accepts it (most models). A model that
    branches on the batch size (diffusers' ``Upsample2D``: ``if batch >= 64: .contiguous()``) makes
    torch.export refuse the range; then the range is cut where the guards cut it, one program per
    piece (1..63 and 64..MAX_BATCH for a diffusers UNet), at most MAX_PROGRAMS of them."""
    programs, lo = [], 1
    while lo <= MAX_BATCH:
        try:
            hi, program = MAX_BATCH, _export(wrapped, sample_shape, device, lo, MAX_BATCH, io)
        except Exception as exc:
            if not _is_batch_range_refused(exc):
                raise
            if len(programs) + 1 >= MAX_PROGRAMS:
                raise RuntimeError(f"the model branches on the batch size into more than {MAX_PROGRAMS} ranges "
                                   f"of 1..{MAX_BATCH}, one compile each") from exc
            hi = _guarded_max(wrapped, sample_shape, device, lo, io)
            if not lo <= hi < MAX_BATCH:
                raise
            program = _export(wrapped, sample_shape, device, lo, hi, io)
        programs.append((lo, hi, program))
        lo = hi + 1
    return programs


def _program_name(lo: int, hi: int) -> str:
    return f"batch_{lo}_{hi}"


def _package(programs, out: Path) -> None:
    """AOT-compile the programs into one .pt2: a single whole-range program as the package's
    default model "model" (``aoti_compile_and_package``, as always), several as models named
    ``batch_<lo>_<hi>`` (the multi-model recipe of ``aoti_compile_and_package``'s docstring)."""
    if len(programs) == 1:
        torch._inductor.aoti_compile_and_package(programs[0][2], package_path=str(out))
        return
    if _load_pt2() is None:
        raise RuntimeError(f"the model branches on the batch size, so it needs {len(programs)} programs in one "
                           f"package, which torch {torch.__version__} cannot load (needs torch >= 2.8)")
    from torch._inductor.package import package_aoti

    files = {}
    for lo, hi, program in programs:
        args, kwargs = program.example_inputs
        files[_program_name(lo, hi)] = torch._inductor.aot_compile(program.module(), args, kwargs,
                                                                   options={"aot_inductor.package": True})
    package_aoti(str(out), files)


def _compile(loaded, device: torch.device, precision: str, out: Path) -> None:
    dtype = PRECISIONS[precision]
    module = copy.deepcopy(loaded.module).to(device=device, dtype=dtype).eval()
    wrapped = _Float32IO(module, dtype).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            _package(export_programs(wrapped, loaded.sample_shape, device, loaded.io), out)
    except Exception as exc:  # export and Inductor raise many unrelated types for an unsupported model
        first = first_line(exc)
        raise ExportError(f"AOTInductor could not compile {loaded.name!r} for {device} at {precision}: "
                          f"{type(exc).__name__}: {first}; use backend='torch'") from exc


def _load_pt2():
    """torch's loader of every model in a .pt2 (torch >= 2.8), or None."""
    try:
        from torch.export.pt2_archive._package import load_pt2
    except ImportError:
        return None
    return load_pt2


def _load_runners(path) -> dict:
    """Every model in the package by name, loaded with ``run_single_threaded=True`` where torch
    has the keyword: with False, AOTI's runtime keeps a pool of model instances and queries a CUDA
    event (cudaEventQuery) on every call to find a free one, which is illegal while a CUDA graph is
    being captured. Calls are serialised by the backend's lock anyway. ``load_pt2`` (torch >= 2.8)
    loads all models of a package at once; without it, the default model only."""
    load_pt2 = _load_pt2()
    load = load_pt2 or torch._inductor.aoti_load_package
    kw = {"run_single_threaded": True} if "run_single_threaded" in inspect.signature(load).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if load_pt2 is not None:
            return dict(load_pt2(str(path), **kw).aoti_runners)
        return {"model": torch._inductor.aoti_load_package(str(path), **kw)}


def load_package(path) -> list[tuple[int, int, object]]:
    """``[(lo, hi, runner)]``, the package's programs by the batch sizes lo..hi they serve, in
    order; a package whose programs do not cover 1..MAX_BATCH exactly raises ExportError."""
    runners = _load_runners(path)
    programs = []
    for name, runner in runners.items():
        if name == "model":
            programs.append((1, MAX_BATCH, runner))
        elif match := re.fullmatch(r"batch_(\d+)_(\d+)", name):
            programs.append((int(match[1]), int(match[2]), runner))
    programs.sort(key=lambda p: p[0])
    starts = [1] + [hi + 1 for _, hi, _ in programs[:-1]]
    if not programs or [lo for lo, _, _ in programs] != starts or programs[-1][1] != MAX_BATCH:
        raise ExportError(f"{Path(path).name} holds the models {sorted(runners)}, which do not cover batch sizes "
                          f"1..{MAX_BATCH} one each; delete it to rebuild")
    return programs


class AOTIBackend(Backend):
    name = "aoti"

    def __init__(self, package_path, device, precision: str, sample_shape, io=None):
        super().__init__(device, precision, sample_shape, batches=(1, MAX_BATCH), io=io)
        self.path = Path(package_path)
        self.programs = load_package(self.path)
        self._lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls, device, precision: str) -> str | None:
        """Imports torch._inductor (seconds): ``backends.available`` asks only when aoti is named."""
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type!r} is not supported (cpu or cuda)"
        if not hasattr(torch, "_inductor") or not hasattr(torch._inductor, "aoti_compile_and_package"):
            return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package (needs torch >= 2.6)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device here"
        return None

    @classmethod
    def create(cls, loaded, device, precision) -> AOTIBackend:
        """Export and AOT-compile ``loaded`` for ``device`` at ``precision`` (cached) and load it."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # a cached package that does not load (truncated, or from an incompatible build) is rebuilt once
        return cache.load(cached_path(loaded, device, precision), lambda tmp: _compile(loaded, device, precision, tmp),
                          lambda path: cls(path, device, precision, loaded.sample_shape, loaded.io))

    def run(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        for _, hi, runner in self.programs:  # a host-side compare of the shape: no sync
            if batch <= hi:
                break
        x = x.to(self.device, torch.float32).contiguous()
        t = t.to(self.device, torch.int64).contiguous()
        extra = [v.to(self.device, extra_dtype(n)).contiguous() for n, v in zip(self.extra_inputs, extra)]
        with self._lock, torch.inference_mode():
            return runner(x, t, *extra)

    def __repr__(self):
        return (f"AOTIBackend({self.path.name}, device={self.device}, precision={self.precision}, "
                f"batch ranges={[p[:2] for p in self.programs]})")
