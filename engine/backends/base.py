"""What every backend is: a callable (x_t, t, *extra) -> model output, and the class-level
contract that the registry (backends/registry.py) and the engine rely on.

A call: x is [B, C, H, W] floating point, t is integer [B] (training timesteps), then the model's
extra inputs in ``export.iospec``'s order (``extra_inputs``: ``class_labels`` integer [B] for a
class-conditional model); the output is float32 [B, C', H, W] (C' = ``out_channels``: C, or 2C
for a model that learned its variance), contiguous, on the backend's device, and stays valid
after the next call. A backend knows nothing about schedules or samplers, keeps its own precision
inside, and never synchronises with the host per call. What a model takes and gives comes from
the load probe (``checkpoints.LoadedModel.io``, given to the constructor as ``io``).

The contract, one home each:

- ``unavailable_reason(device, precision)`` (class method): why this backend cannot run on
  ``device`` at ``precision`` here (a missing package, a device type, a precision the runtime
  cannot honour), or None. Cheap: it may import the backend's runtime, nothing more;
- ``create(loaded, device, precision)`` (class method): the backend for a
  ``checkpoints.LoadedModel``, its artifacts built or reused through ``ddpm_engine.cache``
  (``cache.artifact_path`` names them). Called only after ``unavailable_reason`` said None;
- ``check_inputs(x, t, *extra)``: the one input check (``__call__`` runs it, then ``run``);
- precision: a name of ``PRECISIONS``, validated once at the API boundary (``parse_precision`` in
  ``backends.create``); the classes trust it. A quantized precision (int8: its dtype in
  ``PRECISIONS`` is None) runs only on a backend that names it in ``quantized``; the registry
  refuses it for the others (``quantized_refusal``);
- ``versions(packages)``: the installed versions of the packages that decide a backend's numbers,
  for cache keys, reports and golden files;
- reused deep features (``cache_interval``, engine/deepcache.py): a backend that runs them sets
  ``deep_cache`` and implements ``full(x, t, *extra) -> (output, deep)``, ``shallow(x, t, deep,
  *extra) -> output`` and ``deep_shape(sample_shape)`` (one row's cached features, (C, H, W)); the others
  refuse (``deep_cache_refusal``), and so does one whose model the engine cannot split.
"""

from __future__ import annotations

import importlib.metadata as md

import torch

from ddpm_engine.export import iospec

from ..errors import BackendUnavailableError, InvalidRequestError

# precision name -> the torch dtype a backend computes in; None for a quantized precision: int8 is
# a runtime's integer kernels on a graph calibrated for them, and its I/O stays float32
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": None}

# the packages whose versions decide the numbers a backend gives (``versions``)
PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "openvino", "triton", "tensorrt", "diffusers")
# a package that installs from one of several distributions, in order of preference
DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def parse_precision(precision: str) -> torch.dtype | None:
    """The torch dtype of a precision name (None: quantized); InvalidRequestError for anything
    else. The API boundary's check: deeper layers index ``PRECISIONS`` directly."""
    try:
        return PRECISIONS[precision]
    except (KeyError, TypeError):
        raise InvalidRequestError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}") from None


def quantized_refusal(cls, precision: str) -> str | None:
    """Why backend class ``cls`` cannot run ``precision`` if it is a quantized precision that the
    class does not name in ``quantized``, else None."""
    if PRECISIONS[precision] is not None or precision in cls.quantized:
        return None
    return (f"the {cls.name} backend has no {precision}; {precision} runs on backend='openvino' on the CPU "
            "(pip install ddpm-engine[int8])")


def versions(packages=PACKAGES) -> dict:
    """{package: its installed version, or None}, read from the distributions' metadata (nothing is
    imported); a package of ``DISTRIBUTIONS`` takes the first of its distributions installed."""
    out = {}
    for package in packages:
        out[package] = None
        for dist in DISTRIBUTIONS.get(package, (package,)):
            try:
                out[package] = md.version(dist)
                break
            except md.PackageNotFoundError:
                pass
    return out


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _fits(name: str, v, x) -> bool:
    """Whether extra input ``name`` (export.iospec) fits a call with sample ``x``."""
    if not isinstance(v, torch.Tensor):
        return False
    if iospec.is_integer(name):
        return tuple(v.shape) == (x.shape[0],) and _is_integer(v.dtype)
    return v.shape == x.shape and v.dtype.is_floating_point


def extra_dtype(name: str, float_dtype=torch.float32) -> torch.dtype:
    """The dtype a backend hands its runtime for extra input ``name``: int64, or ``float_dtype``."""
    return torch.int64 if iospec.is_integer(name) else float_dtype


class Backend:
    name = "base"
    # True for a backend that runs its own CPU thread pool (ONNX Runtime on the CPU): the engine
    # then does its per-step torch work on one thread, see engine.threads
    owns_cpu_threads = False
    # whether a call can be recorded in a CUDA graph captured on a side stream (the graph drivers,
    # engine.cuda.graphs); a backend that cannot says why in graph_capture_refusal
    graph_capturable = True
    graph_capture_refusal = ""
    path = None  # the cached artifact it runs (an ONNX graph, a compiled package, ...), or None
    quantized: tuple = ()  # the quantized precisions (PRECISIONS' None dtypes) it runs
    built_from = ()  # the cached artifacts ``path`` was built from (OpenVINO's blob: the ONNX export)
    deep_cache = False  # runs cache_interval's full/shallow pair (engine.deepcache; see the module docstring)
    # a call's memory per image, as a multiple of what torch's tensors held in the eager probe call
    # (probe.PeakBytes): the engine sizes its largest batch with it (plan.bytes_per_image). The
    # torch backend on the CPU, measured on OpenAI's UNets: 1.2-1.8x (docs/openai.md, "The largest batch")
    working_memory_factor = 2

    def __init__(self, device, precision: str, sample_shape=None, batches: tuple[int, int] | None = None, io=None):
        """sample_shape: the (C, H, W) every call must have (None: any); batches: the (least, most)
        images a call takes (None: any); io: the model's ``probe.ModelIO`` (None: (x, t) calls,
        C output channels)."""
        self.device = torch.device(device)
        self.precision = precision
        # validated at the API boundary (parse_precision); a quantized precision's I/O is float32
        self.dtype = PRECISIONS[precision] or torch.float32
        self.sample_shape = None if sample_shape is None else tuple(int(s) for s in sample_shape)
        self.batches = batches
        self.extra_inputs = tuple(io.extra_inputs) if io is not None else ()  # export.iospec names
        self.out_channels = io.out_channels if io is not None else None  # None: x's channels

    # ---- the class-level contract (see the module docstring) ----

    @classmethod
    def unavailable_reason(cls, device: torch.device, precision: str) -> str | None:
        return None

    @classmethod
    def create(cls, loaded, device: torch.device, precision: str) -> Backend:
        raise NotImplementedError(f"{cls.__name__} must implement create(loaded, device, precision)")

    def prepare(self, batches) -> None:
        """Build now whatever a first call at each of ``batches`` would build (nothing here; the
        openvino backend's static-shape compiles), and return when it is done."""

    # ---- a call ----

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, *extra)
        return self.run(x, t, *extra)

    def probe(self, *inputs: torch.Tensor) -> torch.Tensor:
        """A call made by the load check (``probe.check_graph``): an ordinary call unless a
        backend keeps per-shape state that the check must not take (OpenVINO's static shapes)."""
        return self(*inputs)

    def run(self, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """The model output for inputs that passed ``check_inputs``."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(x, t, *extra)")

    def check_inputs(self, x, t, *extra) -> None:
        """InvalidRequestError unless x is a floating [B, C, H, W] tensor (of ``sample_shape`` if
        set), t an integer [B] tensor and ``extra`` one integer [B] tensor per name of
        ``extra_inputs``, with B in ``batches`` if set. Host metadata only: no sync."""
        ok = (isinstance(x, torch.Tensor) and isinstance(t, torch.Tensor) and x.dim() == 4
              and x.dtype.is_floating_point and tuple(t.shape) == (x.shape[0],) and _is_integer(t.dtype)
              and (self.sample_shape is None or tuple(x.shape[1:]) == self.sample_shape)
              and len(extra) == len(self.extra_inputs)
              and all(_fits(name, v, x) for name, v in zip(self.extra_inputs, extra)))
        if not ok:
            named = (("x", x), ("t", t), *zip(self.extra_inputs, extra),
                     *((f"extra input {k}", v) for k, v in enumerate(extra[len(self.extra_inputs):])))
            got = [f"{n} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor)
                   else f"{n} of type {type(v).__name__}" for n, v in named]
            shape = "C, H, W" if self.sample_shape is None else ", ".join(map(str, self.sample_shape))
            wanted = "".join(f", {n} [B] integer" if iospec.is_integer(n) else f", {n} floating as x"
                             for n in self.extra_inputs)
            raise InvalidRequestError(f"{self.name} backend got {' and '.join(got)}; expected x [B, {shape}] "
                                      f"floating point and t [B] integer{wanted}")
        if self.batches is not None and not self.batches[0] <= x.shape[0] <= self.batches[1]:
            raise InvalidRequestError(f"the {self.name} backend takes batches of {self.batches[0]} to "
                                      f"{self.batches[1]} images, got {x.shape[0]}")

    # ---- reused deep features (engine/deepcache.py) ----

    def deep_cache_refusal(self) -> str | None:
        """Why this backend cannot run ``cache_interval`` > 1 for its model, or None."""
        if not self.deep_cache:
            return (f"the {self.name} backend does not run cache_interval; backend='torch', 'onnxruntime' "
                    "and 'openvino' do")
        return None

    def deep_shape(self, sample_shape) -> tuple:
        """(C, H, W) of one row's deep features (the full step's second output) for samples of
        ``sample_shape`` (C, H, W): read off one full step on a zero row, once per shape."""
        shapes = self.__dict__.setdefault("_deep_shapes", {})
        sample_shape = tuple(sample_shape)
        if sample_shape not in shapes:
            x = torch.zeros(1, *sample_shape, device=self.device)
            extra = [torch.zeros(1, dtype=torch.int64, device=self.device) if iospec.is_integer(name)
                     else torch.zeros_like(x) for name in self.extra_inputs]
            _, deep = self.run_full(x, torch.zeros(1, dtype=torch.int64, device=self.device), *extra)
            shapes[sample_shape] = tuple(deep.shape[1:])
        return shapes[sample_shape]

    def full(self, x, t, *extra) -> tuple[torch.Tensor, torch.Tensor]:
        """The full step: (the model output, its deep features float32 [B, C_d, H_d, W_d]),
        contiguous, on the backend's device; the output equals ``self(x, t, *extra)``'s."""
        self.check_inputs(x, t, *extra)
        return self.run_full(x, t, *extra)

    def shallow(self, x, t, deep, *extra) -> torch.Tensor:
        """The shallow step's model output with the cached ``deep`` features (of ``full``)."""
        self.check_inputs(x, t, *extra)
        want = (x.shape[0], *self.deep_shape(tuple(x.shape[1:])))
        if not isinstance(deep, torch.Tensor) or tuple(deep.shape) != want or not deep.dtype.is_floating_point:
            got = f"{tuple(deep.shape)} {deep.dtype}" if isinstance(deep, torch.Tensor) else type(deep).__name__
            raise InvalidRequestError(f"the {self.name} backend's shallow step got deep features {got}; expected "
                                      f"floating {want} (the full step's)")
        return self.run_shallow(x, t, deep, *extra)

    def run_full(self, x, t, *extra):
        raise NotImplementedError(f"{type(self).__name__} does not run cache_interval")

    def run_shallow(self, x, t, deep, *extra):
        raise NotImplementedError(f"{type(self).__name__} does not run cache_interval")

    def check_graph_capturable(self) -> None:
        """Raise BackendUnavailableError (saying why and what to use) if this backend cannot be
        captured in a CUDA graph; the graph drivers call it before capturing."""
        if not self.graph_capturable:
            raise BackendUnavailableError(f"the {self.name} backend cannot run under a CUDA graph driver: "
                                          f"{self.graph_capture_refusal or 'it is not graph-capturable'}")

    def __repr__(self):
        return f"{type(self).__name__}(device={self.device}, precision={self.precision})"
