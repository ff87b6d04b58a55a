"""A model, checked once at load: what it takes, what it gives, and that every graph made of it
computes the same.

- ``inspect(module, scheduler, sample_shape)``: the eager probe. It reads the extra inputs the
  forward needs (``_extra_inputs``: diffusers' ``num_class_embeds``, a third parameter of
  ``forward(x, t, y)``, lucidrains' ``x_self_cond`` where ``self_condition`` is set), calls the
  module once on a probe batch (batch 2 at two far-apart timesteps, T - 1 and 0; its second row
  alone follows when a graph is checked), and checks the output: a tensor, a
  1-tuple, a dict with ``sample`` or diffusers' ``UNet2DOutput`` (``as_tensor``), of shape
  [B, C, H, W] for a fixed variance and [B, 2C, H, W] for a learned one
  (``schedules.Variance.learned``). It returns the module every backend runs and exports (the
  module itself, or an ``Adapter`` that normalises its output and passes the extra inputs in
  ``export.iospec``'s order) and a ``ModelIO``: what the probe learned, with its inputs and
  outputs kept for the graph check. A refusal is a ``ModelLoadError`` that says what to change.
  The probe call also measures the model's working memory (``PeakBytes``: the most bytes its
  tensors held at once), from which the engine sizes the largest batch it accepts.
- ``check_graph(backend, io, name)``: a backend that serves an exported or cached graph (its
  ``path`` is set) is run on the probe's two batches and compared with the eager outputs before
  it serves; a mismatch names its likely cause (a graph from before the model's code changed,
  Python control flow the tracer froze, or the precision). ``checked(create, io, name)`` is how
  ``backends.create`` runs it: a stale cached graph is removed and built again once.

Nothing here imports a backend or the engine: backends.create calls ``check_graph``.
"""

from __future__ import annotations

import inspect as _inspect
import time
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ddpm_engine.export import iospec

from .errors import ModelLoadError, first_line
from .schedules import SchedulerConfig, Variance

# names a label parameter of a forward(x, t, <name>=None) may have (guided-diffusion's ``y``,
# diffusers' ``class_labels``); a required third parameter is taken as the labels whatever its name
LABEL_PARAMETERS = ("y", "class_labels", "labels", "label", "classes")
# the largest relative L2 difference between a graph's output and the eager module's on the probe
# batches: loose enough for a precision's rounding, far below a frozen branch or another model
# (int8: its relative error on the probe, t = T - 1 and 0, was 0.097 on the bundled digits model)
GRAPH_TOLERANCE = {"fp32": 5e-2, "bf16": 0.25, "fp16": 0.25, "int8": 0.25}


@dataclass(eq=False)
class ModelIO:
    """What the probe learned about a model: its graph's inputs (``export.iospec`` names, in call
    order), its output channels, the labels it takes, and the probe's inputs and outputs."""

    inputs: tuple  # (iospec.SAMPLE, iospec.TIMESTEP[, iospec.CLASS_LABELS][, iospec.SELF_COND])
    out_channels: int
    num_classes: int | None = None  # labels are ints in [0, num_classes) (None: the model takes none)
    null_label: int | None = None  # the label of "no class" (classifier-free guidance), if the model has one
    output_kind: str = "tensor"  # "tensor", "tuple", "dict" or "attribute": what the module returned
    probes: tuple = field(default=(), repr=False)  # ((inputs..., eager output), ...) on the CPU, float32
    module_id: int = 0  # id() of the module probed: a LoadedModel whose module is replaced is probed again
    pending: object = field(default=None, repr=False)  # () -> the probes not run yet (graph_probes runs them)
    working_bytes: int = 0  # the most bytes the batch-2 probe call's tensors held at once (PeakBytes); 0: unknown

    @property
    def bytes_per_image(self) -> int:
        """The model call's working memory per image: half the batch-2 probe's peak (0: unknown)."""
        return self.working_bytes // 2

    def graph_probes(self) -> tuple:
        """Every probe batch with its eager output; the one-row probe is run at the first call
        (only a graph check needs it, so a torch-backend load does not pay for it)."""
        if self.pending is not None:
            self.probes, self.pending = (*self.probes, *self.pending()), None
        return self.probes

    @property
    def extra_inputs(self) -> tuple:
        """The graph inputs after ``sample`` and ``timestep``."""
        return self.inputs[2:]

    @property
    def takes_labels(self) -> bool:
        return iospec.CLASS_LABELS in self.inputs

    @property
    def self_conditioned(self) -> bool:
        """Whether the model takes its previous x0 estimate (lucidrains' self_condition)."""
        return iospec.SELF_COND in self.inputs


def as_tensor(out):
    """The model output inside what a forward returned (a tensor, a 1-tuple, a dict with
    ``sample``, an object with ``.sample`` such as diffusers' UNet2DOutput), or None."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 1 and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and isinstance(out.get("sample"), torch.Tensor):
        return out["sample"]
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _output_kind(out) -> str:
    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(out, (tuple, list)):
        return "tuple"
    return "dict" if isinstance(out, Mapping) else "attribute"


class Adapter(nn.Module):
    """``forward(x, t, *extra) -> tensor``: the user's module with its output normalised
    (``as_tensor``) and the extra inputs passed positionally, as export.iospec orders them. Every
    backend runs it and every exporter traces it, so all of them see one output."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x, t, *extra):
        return as_tensor(self.module(x, t, *extra))


def _diffusers_unet(module) -> bool:
    return type(module).__name__ == "UNet2DModel" and hasattr(module, "config")


def _extra_inputs(module: nn.Module) -> tuple[tuple, int | None]:
    """(the extra graph inputs ``module`` takes, export.iospec names; the number of its classes)."""
    from .models.cifar_unet import DiffusersUNet

    inner = module.unet if isinstance(module, DiffusersUNet) else module
    if _diffusers_unet(inner):
        cfg = inner.config
        if cfg.get("class_embed_type") is not None and cfg.get("num_class_embeds") is None:
            raise ModelLoadError(f"the UNet2DModel's class_embed_type={cfg.get('class_embed_type')!r} takes "
                                 "continuous class embeddings; this engine takes integer labels only "
                                 "(num_class_embeds, class_embed_type=None)")
        n = cfg.get("num_class_embeds")
        return ((iospec.CLASS_LABELS,), int(n)) if n is not None else ((), None)
    params = list(_inspect.signature(module.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(required) > 3 or (len(required) == 3 and len(positional) < 3):
        raise ModelLoadError(f"{type(module).__name__}.forward needs {[p.name for p in required]}; the engine "
                             "calls forward(x, t) or forward(x, t, class_labels): give the others defaults")
    third = positional[2] if len(positional) >= 3 else None
    if third is None:
        return (), None
    if third.name == iospec.SELF_COND and getattr(module, "self_condition", False) is True:
        return (iospec.SELF_COND,), None  # lucidrains' Unet(self_condition=True): forward(x, time, x_self_cond)
    n = getattr(module, "num_classes", None)
    n = int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    if third.default is not third.empty and (third.name not in LABEL_PARAMETERS or n is None):
        return (), None  # an optional input that is not a label (or a model without classes)
    return (iospec.CLASS_LABELS,), n


def _probe_inputs(sample_shape, num_train_timesteps: int, extra=(), num_classes: int | None = None):
    """The probe batches: batch 2 at t = T - 1 and 0 (labels num_classes - 1 and 0, a previous
    x0 estimate in [-1, 1]), then its second row alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *sample_shape, generator=g)
    t = torch.tensor([num_train_timesteps - 1, 0], dtype=torch.int64)
    values = {iospec.CLASS_LABELS: lambda: torch.tensor([(num_classes or 1) - 1, 0], dtype=torch.int64),
              iospec.SELF_COND: lambda: torch.rand(2, *sample_shape, generator=g) * 2 - 1}
    args = (x, t, *(values[name]() for name in iospec.inputs_of(extra)[2:]))
    return [args, tuple(v[1:] for v in args)]


def _call(module: nn.Module, inputs):
    p = next(iter([*module.parameters(), *module.buffers()]), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x, *rest = inputs
    with torch.inference_mode():
        return module(x.to(device, dtype), *(v.to(device, dtype) if v.is_floating_point() else v.to(device)
                                              for v in rest))


def inspect(module: nn.Module, scheduler: SchedulerConfig, sample_shape, num_classes: int | None = None,
            name: str = "model", null_label: int | None = None) -> tuple[nn.Module, ModelIO]:
    """(the module every backend runs, what the probe learned): see the module docstring.
    ``num_classes``: the labels' range for a module with ``forward(x, t, y)`` that has no
    ``num_classes`` attribute; ``null_label``: its "no class" label where the module has no
    ``null_label`` attribute."""
    from .models.cifar_unet import DiffusersUNet

    if _diffusers_unet(module):
        module = DiffusersUNet(module).eval()
    extra, n = _extra_inputs(module)
    labels = iospec.CLASS_LABELS in extra
    if labels:
        n = n if n is not None else num_classes
        if n is None:
            raise ModelLoadError(f"{name!r} takes class labels ({type(module).__name__}.forward's third parameter) "
                                 "but their number is unknown: set its num_classes attribute, or pass "
                                 "num_classes= to from_module")
    inputs = iospec.inputs_of(extra)
    null = null_label if null_label is not None else getattr(module, "null_label", None)
    if null is not None and (not labels or isinstance(null, bool) or not isinstance(null, int)
                             or not 0 <= null < n):
        raise ModelLoadError(f"null_label={null!r} is not a label of {name!r} (an int in [0, {n}) of a "
                             "class-conditional model)")
    c, h, w = sample_shape
    variance = Variance.parse(scheduler.variance_type)
    want = 2 * c if variance.learned else c
    first, second = _probe_inputs(sample_shape, scheduler.num_train_timesteps, extra, n)
    with PeakBytes() as peak:
        raw, out = _probe_call(module, first, name, scheduler, (c, h, w), want)
    kind = _output_kind(raw)

    def rest():  # the one-row probe, run only when a graph is checked (load time of the torch backend)
        return ((*second, _probe_call(module, second, name, scheduler, (c, h, w), want)[1]),)

    if kind != "tensor":
        module = Adapter(module).eval()
    return module, ModelIO(inputs, want, n if labels else None, null, kind, ((*first, out),), id(module), rest,
                           peak.peak)


class PeakBytes(TorchDispatchMode):
    """The most bytes the tensors made inside the ``with`` block held at once (``peak``): every
    op's new storage counts from the op until its tensor is freed (views and in-place results
    add nothing). It sees what torch allocates, not a library's own scratch memory: the engine
    sizes batches with a margin over it (plan.max_batch_that_fits)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._owned = {}  # storage data_ptr -> bytes, while its tensor lives

    def _free(self, ptr: int) -> None:
        self.live -= self._owned.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for v in tree_leaves(out):
            if isinstance(v, torch.Tensor) and v._base is None:
                storage = v.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self._owned:
                    self._owned[ptr] = storage.nbytes()
                    self.live += self._owned[ptr]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(v, self._free, ptr)
        return out


def _probe_call(module, args, name, scheduler, sample_shape, want):
    """(what the module returned, its output as a float32 CPU tensor) on probe inputs ``args``,
    checked: a ModelLoadError says what is wrong."""
    c, h, w = sample_shape
    learned = Variance.parse(scheduler.variance_type).learned
    try:
        raw = _call(module, args)
    except Exception as exc:  # a user's forward raises anything
        extra = "".join(f", class_labels {v.tolist()}" if not v.is_floating_point() else ", x_self_cond"
                        for v in args[2:])
        raise ModelLoadError(f"{name!r} failed on a probe batch (x {tuple(args[0].shape)}, t {args[1].tolist()}"
                             f"{extra}): {type(exc).__name__}: {first_line(exc)}") from None
    out = as_tensor(raw)
    if out is None:
        raise ModelLoadError(f"{name!r} returned a {type(raw).__name__}; the engine takes a tensor, a 1-tuple, "
                             "a dict with 'sample' or diffusers' UNet2DOutput")
    b = args[0].shape[0]
    if out.dim() == 4 and tuple(out.shape) == (b, 2 * c, h, w) and not learned:
        raise ModelLoadError(f"{name!r} outputs {2 * c} channels for a {c}-channel sample: it learned its "
                             f"variance, but its scheduler config says variance_type={scheduler.variance_type!r}; "
                             "set variance_type='learned_range' (improved-diffusion, diffusers) or 'learned'")
    if tuple(out.shape) != (b, want, h, w):
        raise ModelLoadError(f"{name!r} returned shape {tuple(out.shape)} for x {tuple(args[0].shape)}; expected "
                             f"{(b, want, h, w)} ({'2C: the prediction and the variance' if learned else 'C'}"
                             f" channels for variance_type={scheduler.variance_type!r})")
    if not out.is_floating_point():
        raise ModelLoadError(f"{name!r} returned {out.dtype}; expected floating point")
    return raw, out.detach().float().cpu()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (relative L2), in float32 on the CPU side of ``want``."""
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-12))


def check_graph(backend, io: ModelIO, name: str, cached: bool = False) -> None:
    """Run ``backend`` (one that serves an exported or cached graph: ``backend.path`` is set) on
    the probe batches and compare with the eager outputs; ModelLoadError naming the likely cause
    if they differ by more than the precision's ``GRAPH_TOLERANCE``. ``cached``: the graph came
    from the cache rather than from an export made now."""
    tol = GRAPH_TOLERANCE.get(backend.precision, GRAPH_TOLERANCE["fp32"])
    for *inputs, want in io.graph_probes():
        args = [v.to(backend.device) for v in inputs]
        with torch.inference_mode():
            got = backend.probe(*args).detach().float().cpu()
        if tuple(got.shape) != tuple(want.shape):
            raise ModelLoadError(f"the {backend.name} graph {backend.path} of {name!r} returned shape "
                                 f"{tuple(got.shape)} for x {tuple(inputs[0].shape)}, the module {tuple(want.shape)}; "
                                 f"delete {backend.path} to rebuild it")
        err = relative_error(got, want)
        if err > tol:
            raise ModelLoadError(_mismatch(backend, name, err, tol, inputs, cached))


def _mismatch(backend, name, err, tol, inputs, cached: bool) -> str:
    what = (f"the {backend.name} graph {backend.path} differs from {name!r}'s eager module by {err:.3g} (relative "
            f"L2; at most {tol:g} at {backend.precision}) on x {tuple(inputs[0].shape)} at t {inputs[1].tolist()}")
    if cached:
        return (f"{what}: a stale cache (the graph was built from other code than the module now has); "
                f"delete {backend.path} and load again")
    if backend.precision != "fp32":
        return f"{what}: the precision: {backend.precision} is too coarse for this model; use precision='fp32'"
    return (f"{what}: traced control flow (the forward branches in Python on its inputs, and the export "
            "froze the branch its example took); make the forward branch-free (torch.where) or use backend='torch'")


def checked(create, io: ModelIO | None, name: str):
    """``create()``'s backend, compared with the eager module (``check_graph``) if it serves a
    graph file. A cached file that differs is stale: it is removed and built again once (with a
    warning); a graph built now that differs raises, naming the cause."""
    started = time.time()
    backend = create()
    path = getattr(backend, "path", None)
    if path is None or io is None:
        return backend
    files = [Path(p) for p in (path, *getattr(backend, "built_from", ()))]
    cached = any(p.is_file() and p.stat().st_mtime < started for p in files)
    try:
        check_graph(backend, io, name, cached)
        return backend
    except ModelLoadError as exc:
        for p in files:  # wrong for this module whatever the cause: never served again
            p.unlink(missing_ok=True)
        if not cached:
            raise
        warnings.warn(f"{exc}; rebuilt", RuntimeWarning, stacklevel=3)
    backend = create()
    check_graph(backend, io, name)
    return backend
