"""Export a loaded UNet to ONNX (fp32, dynamic batch), cached on disk.

Exporter: the TorchScript one (``torch.onnx.export(..., dynamo=False)``) by default. Both it and
the torch.export-based one (``exporter="dynamo"``) export SeedUNet and the diffusers CIFAR-10
UNet with a dynamic batch and match eager PyTorch in ONNX Runtime within the tests' tolerance;
the TorchScript exporter is much faster to export (docs/performance.md). It is deprecated in
torch, so ``exporter="dynamo"`` is kept working for the day it goes. It traces: Python control
flow is frozen at the example batch of 2, which is why the graph is checked against
``export.iospec``, and every backend that serves it is compared with the eager module on the
load probe's batches (``engine.probe.check_graph``). The graph's inputs are the model's
(``LoadedModel.io``: sample, timestep and, for a class-conditional model, class_labels), and its
output has the model's output channels (2C for a learned variance).

Cache (``ddpm_engine.cache``): ``$DDPM_ENGINE_CACHE/onnx`` (default ``~/.cache/ddpm-engine/onnx``),
one file per (weights hash, model structure and code, sample shape, opset, exporter, torch version). Files
are written to a temporary name and renamed, so a crash never leaves a half file that a later run
would reuse; a cached file ONNX Runtime cannot open is re-exported once (backends.onnxruntime_backend).
The weights hash and sample shape go into the file's metadata_props (see ``export.iospec``).

Reused deep features (``cache_interval``, engine/deepcache.py): ``export_onnx(..., part="full")``
and ``part="shallow"`` export the model's full step (a second output, ``deep_features``) and its
shallow step (``deep_features`` its last input), traced from ``deepcache.split``; each is cached
beside the whole model's graph, keyed alike plus the part.

Weights over ``EXTERNAL_DATA_BYTES`` (1 GiB; protobuf cannot serialize a graph over 2 GiB, e.g.
guided-diffusion's 554M-parameter 256x256 UNets) go to one external data file beside the graph,
``<cache key>.onnx.data`` (named by the export's cache key, wherever the graph goes), written
before the graph that names it; ONNX Runtime and OpenVINO read it from there.
"""

from __future__ import annotations

import copy
import os
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ddpm_engine import cache
from ddpm_engine.errors import ExportError, InvalidRequestError, first_line, require

from . import iospec

# torch.onnx.export keeps process-wide state (its GLOBALS.in_onnx_export flag; the warning filters
# set around it): two exports at once, e.g. an engine made in one thread while OpenVINO's background
# compile of another exports, fail with "GLOBALS.in_onnx_export must be False". One at a time.
_EXPORT_LOCK = threading.Lock()

EXPORTERS = ("torchscript", "dynamo")
EXAMPLE_BATCH = 2  # not 1, so the tracer cannot fold the batch size into the graph
PARTS = ("whole", "full", "shallow")  # the model's graph; cache_interval's full and shallow steps
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to an external data file (module docstring)


def cached_path(loaded, opset: int = iospec.DEFAULT_OPSET, exporter: str = "torchscript", cache_dir=None,
                part: str = "whole") -> Path:
    parts = {"weights": loaded.weights_hash, "structure": cache.module_structure(loaded.module),
             "sample_shape": list(loaded.sample_shape), "opset": opset, "exporter": exporter,
             "torch": torch.__version__}
    if part != "whole":  # the whole graph's key stays what it was
        parts["deepcache"] = part
    return cache.artifact_path("onnx", loaded.name, parts, ".onnx", cache_dir=cache_dir)


def export_onnx(loaded, path=None, opset: int = iospec.DEFAULT_OPSET, cache_dir=None,
                exporter: str = "torchscript", part: str = "whole") -> Path:
    """Write ``loaded`` (a ``checkpoints.LoadedModel``) as ONNX and return the file's path.

    With ``path=None`` the file goes to the cache and an existing one is reused; with a
    ``path`` the graph is always (re)written there. ``part``: one of ``PARTS`` (module docstring).
    """
    if not isinstance(opset, int) or opset < iospec.MIN_OPSET:
        raise InvalidRequestError(f"opset must be an int >= {iospec.MIN_OPSET}, got {opset!r}")
    if exporter not in EXPORTERS:
        raise InvalidRequestError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    if part not in PARTS:
        raise InvalidRequestError(f"unknown part {part!r}; choose one of {PARTS}")
    onnx = require("onnx", "ONNX export")
    if path is None:
        path = cached_path(loaded, opset, exporter, cache_dir, part)
        if path.is_file():
            return path
    path = Path(path)
    model_io = loaded.io
    model = _trace(_fp32_cpu(loaded.module), loaded.sample_shape, opset, exporter, model_io.extra_inputs,
                   model_io.num_classes, part)
    inputs, outputs = iospec.from_onnx(model)
    if part != "whole":
        inputs, outputs, deep = iospec.without_deep(inputs, outputs)
        if len(deep) != 1 or isinstance(deep[0][2][0], int):
            raise ExportError(f"the {part} step's ONNX graph of {loaded.name!r} has no dynamic-batch "
                              f"{iospec.DEEP!r} {'output' if part == 'full' else 'input'}")
    problems = iospec.mismatches(inputs, outputs, loaded.sample_shape, model_io.out_channels, model_io.extra_inputs)
    if problems:
        raise ExportError(f"the ONNX graph of {loaded.name!r} does not follow the I/O spec: {'; '.join(problems)}")
    for key, value in iospec.metadata(loaded.weights_hash, loaded.sample_shape, exporter).items():
        model.metadata_props.add(key=key, value=value)
    if sum(t.numel() * t.element_size() for t in (*loaded.module.parameters(), *loaded.module.buffers())) \
            <= EXTERNAL_DATA_BYTES:
        _check(onnx, model, loaded.name)
        return cache.write_bytes(path, model.SerializeToString())
    return _write_with_external_data(onnx, model, path, cached_path(loaded, opset, exporter, part=part).name + ".data",
                                     loaded.name)


def _check(onnx, model, name: str) -> None:
    """onnx.checker on ``model`` (a ModelProto, or a file's path: the 2 GiB limit does not apply)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the ONNX graph of {name!r} fails onnx.checker: {exc}") from None


def _write_with_external_data(onnx, model, path: Path, data_name: str, name: str) -> Path:
    """``model`` at ``path`` with every tensor over 1 KiB in ``path.parent / data_name``: staged in a
    temporary folder beside it, checked, then the data file and the graph renamed into place, in
    that order (a graph never names data that is not there yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as staging:
        staged = Path(staging) / "graph.onnx"
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024, convert_attribute=True)  # large Constants too
        _check(onnx, str(staged), name)
        os.chmod(Path(staging) / data_name, staged.stat().st_mode & 0o777)  # onnx writes it owner-only
        os.replace(Path(staging) / data_name, path.parent / data_name)
        os.replace(staged, path)
    return path


def load_pair(loaded, open_, corrupt=(Exception,)) -> dict:
    """{"full": ..., "shallow": ...}: ``open_(path)`` of each of cache_interval's two graphs of
    ``loaded``, exported to the cache first if needed (a cached file ``open_`` refuses with
    ``corrupt`` is re-exported once, ``cache.load``)."""
    return {part: cache.load(cached_path(loaded, part=part), lambda tmp, part=part: export_onnx(loaded, tmp, part=part),
                             open_, corrupt=corrupt) for part in PARTS[1:]}


def _fp32_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """The module in eval mode, fp32 on the CPU; a copy if it is elsewhere (another backend may hold it)."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(p.device.type != "cpu" or (p.is_floating_point() and p.dtype != torch.float32) for p in tensors):
        module = copy.deepcopy(module).to("cpu").float()
    return module.eval()


def example_inputs(sample_shape, extra=(), num_classes: int | None = None, batch: int = EXAMPLE_BATCH,
                   device="cpu") -> tuple:
    """Random example inputs of a graph (``export.iospec`` order): x, t and the extra inputs."""
    x = torch.randn(batch, *sample_shape, device=device)
    t = torch.randint(0, 1000, (batch,), dtype=torch.int64, device=device)
    values = {iospec.CLASS_LABELS: torch.randint(0, num_classes or 1, (batch,), dtype=torch.int64, device=device),
              iospec.SELF_COND: torch.rand(batch, *sample_shape, device=device) * 2 - 1}
    return (x, t, *(values[name] for name in iospec.inputs_of(extra)[2:]))


def _part(module, part: str, inputs: tuple) -> tuple:
    """(the module to trace for ``part``, its example inputs, its input names' tail, its output names' tail)."""
    if part == "whole":
        return module, inputs, [], []
    from ddpm_engine import deepcache

    pair = deepcache.split(module)
    if part == "full":
        return deepcache.FullGraph(pair).eval(), inputs, [], [iospec.DEEP]
    with torch.no_grad():
        deep = pair.full(*inputs)[1]
    return deepcache.ShallowGraph(pair).eval(), (*inputs, deep), [iospec.DEEP], []


def _trace(module, sample_shape, opset: int, exporter: str, extra=(), num_classes=None, part: str = "whole"):
    import onnx

    module, inputs, more_in, more_out = _part(module, part, example_inputs(sample_shape, extra, num_classes))
    in_names = [*iospec.inputs_of(extra), *more_in]
    names = dict(input_names=in_names, output_names=[iospec.OUTPUT, *more_out], opset_version=opset)
    try:
        with _EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)  # constant-folding and axis-naming notes
            if exporter == "dynamo":
                batch = torch.export.Dim(iospec.BATCH_AXIS, min=1, max=65536)
                program = torch.onnx.export(module, inputs, dynamo=True,
                                            dynamic_shapes=tuple({0: batch} for _ in inputs), verbose=False, **names)
                return program.model_proto
            axes = {n: {0: iospec.BATCH_AXIS} for n in (*in_names, *names["output_names"])}
            with tempfile.TemporaryDirectory(prefix="ddpm-engine-export-") as folder:
                # a file, not a buffer: over 2 GiB of weights torch writes them as external data beside it
                traced = os.path.join(folder, "graph.onnx")
                torch.onnx.export(module, inputs, traced, dynamo=False, dynamic_axes=axes, do_constant_folding=True,
                                  **names)
                return onnx.load(traced)  # with any external data, into memory
    except Exception as exc:  # the exporters raise many unrelated types for an unsupported model
        first = first_line(exc)
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {type(exc).__name__}: {first}; "
                          f"try exporter={'dynamo' if exporter == 'torchscript' else 'torchscript'!r} "
                          "or backend='torch'") from exc

