"""One sampling plan, one reverse step: what every loop of the engine runs.

A ``SamplingPlan`` is a validated request: the step math (``StepSpec``), the number of steps and
their coefficient tables on the device, the step implementation and the backend. The engine
builds plans in one place, ``Planner.plan``: the sampler's registry entry (samplers.SamplerDef),
``make_spec`` and ``resolve_steps``, once per request, in one call down from ``Engine.plan``. The
eager loop (``run_chain``), the CUDA-graph sampler (engine/cuda/graphs.py) and the serving
scheduler (engine/serving.py) take a plan and never call back into the engine.

``reverse_step(plan, rows)`` is the one reverse step on a batch: gather t = timesteps[i], call
the backend (with the rows' class labels for a class-conditional model, ``Rows.labels``), step
in place. Intermediates, progress bars, graph capture and continuous batching
wrap around it; none re-implements it.

The request checks that are not step math live here too: batches (``parse_batch``: an int or a
list of seeds), devices, and the memory bound that refuses absurd batch sizes at once
(``check_batch_fits``).
"""

from __future__ import annotations

import math
import os
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch

from . import deepcache
from .errors import InvalidRequestError
from .guidance import guided  # noqa: F401  (the reference combination, also as plan.guided)
from .noise import check_seeds, initial_noise, seed_words
from .samplers import SamplerDef, StepSpec, check_eta, default_request, sampler_def
from .schedules import DeviceTables, Prediction, SchedulerConfig, Tables, Variance
from .stepping import Rows, make_step
from .threads import yield_cpu_to

_seed_source = random.SystemRandom()

# Bytes of device memory one image element is assumed to need while a batch is sampled: x, the
# model output, noise and x0 (4 fp32 tensors) plus the network's live activations, which for the
# UNets here stay below ~60 fp32 values per input element in inference mode. An estimate that errs
# high: it only decides which batches are refused before anything is allocated.
WORKING_BYTES_PER_ELEMENT = 4 * 64


# ---- request checks ----------------------------------------------------------------------------
def parse_batch(batch, limit: int | None = None) -> list[int]:
    """An int (that many fresh random seeds) or a list of seeds -> list of seeds (validated once).
    ``limit``: the largest batch allowed; a larger one is refused before any seed is drawn."""
    if isinstance(batch, bool):
        raise InvalidRequestError("batch must be a positive int or a list of seeds, got a bool")
    if isinstance(batch, (int, np.integer)):
        if batch < 1:
            raise InvalidRequestError(f"batch must be at least 1, got {batch}")
        _check_limit(int(batch), limit)
        return [_seed_source.getrandbits(64) for _ in range(int(batch))]
    if isinstance(batch, (list, tuple, torch.Tensor, np.ndarray)):
        seeds = batch.tolist() if hasattr(batch, "tolist") else batch  # a 0-d tensor gives an int: refused below
        if isinstance(seeds, (list, tuple)):
            _check_limit(len(seeds), limit)
        return check_seeds(seeds)
    raise InvalidRequestError(f"batch must be a positive int or a list of seeds, got {type(batch).__name__}")


def parse_labels(class_labels, n: int, num_classes: int | None) -> list[int] | None:
    """A request's ``class_labels`` (one int per seed, in [0, num_classes)) -> list of ints, or
    None for a model without labels (``num_classes`` None). Checked at the call: a model that
    takes labels needs them, a model that takes none refuses them."""
    if num_classes is None:
        if class_labels is not None:
            raise InvalidRequestError("class_labels given, but this model takes no class labels (it is not "
                                      "class-conditional: no num_class_embeds, no forward(x, t, y))")
        return None
    if class_labels is None:
        raise InvalidRequestError(f"this model is class-conditional: pass class_labels=[...], one label in "
                                  f"[0, {num_classes}) per seed")
    labels = class_labels.tolist() if hasattr(class_labels, "tolist") else class_labels
    if not isinstance(labels, (list, tuple)):
        raise InvalidRequestError(f"class_labels must be a list of ints, got {type(class_labels).__name__}")
    if len(labels) != n:
        raise InvalidRequestError(f"class_labels has {len(labels)} labels for {n} seeds; give one per seed")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
            raise InvalidRequestError(f"class label {label!r} is not an int in [0, {num_classes}) (this model's "
                                      f"{num_classes} classes)")
    return [int(label) for label in labels]


def _check_limit(n: int, limit: int | None):
    if limit is not None and n > limit:
        raise InvalidRequestError(f"a batch of {n} images does not fit in memory here: at most {limit} fit; "
                                  "split the request into smaller batches")


def free_bytes(device: torch.device) -> int:
    """Memory a new batch may use on ``device``: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def bytes_per_image(sample_shape, model_bytes_per_image: int, model_factor: int) -> int:
    """The memory one image of a batch needs: its sampler state and step temporaries
    (``WORKING_BYTES_PER_ELEMENT`` per element) plus ``model_factor`` times the model call's
    measured working memory per image (``probe.ModelIO.bytes_per_image``: what torch's tensors
    held; the backend's ``working_memory_factor`` covers the allocator's and its own scratch,
    which torch does not see)."""
    return math.prod(sample_shape) * WORKING_BYTES_PER_ELEMENT + model_factor * model_bytes_per_image


def max_batch_that_fits(sample_shape, device: torch.device, model_bytes_per_image: int, model_factor: int) -> int:
    """How many images of ``sample_shape`` one batch may hold on ``device`` (at least 1)."""
    return max(1, free_bytes(device) // bytes_per_image(sample_shape, model_bytes_per_image, model_factor))


def check_positive_int(name: str, value, upper: int | None = None) -> int:
    """A count argument (max_batch, max_queue, ...): an int in [1, upper]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidRequestError(f"{name} must be a positive int, got {value!r}")
    if upper is not None and value > upper:
        raise InvalidRequestError(f"{name}={value} is too large: at most {upper} here")
    return int(value)


def parse_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' asked for, but torch sees no CUDA device here; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def make_spec(scheduler: SchedulerConfig, sampler="ddpm", eta=0.0, clip_denoised=None,
              use_clipped_model_output=None) -> StepSpec:
    """The step math of a request: the caller's options over the model's scheduler config."""
    d = sampler_def(sampler)
    eta = check_eta(eta)
    if clip_denoised is None:
        clip_denoised = d.default_clip(scheduler.clip_sample)
    elif not isinstance(clip_denoised, bool):
        raise InvalidRequestError(f"clip_denoised must be True, False or None, got {clip_denoised!r}")
    if use_clipped_model_output is None:
        use_clipped_model_output = bool(getattr(scheduler, "use_clipped_model_output", False))
    elif not isinstance(use_clipped_model_output, bool):
        raise InvalidRequestError(f"use_clipped_model_output must be True, False or None, "
                                  f"got {use_clipped_model_output!r}")
    return StepSpec(sampler=d.name, prediction=Prediction.parse(scheduler.prediction_type),
                    variance=Variance.parse(scheduler.variance_type), clip_denoised=clip_denoised,
                    eta=eta, use_clipped_model_output=use_clipped_model_output)


def resolve_steps(sampler: SamplerDef, steps, num_train_timesteps: int, spacing: str | None = None) -> int:
    """The number of reverse steps: the sampler's default (at ``spacing``) when None, else checked to be in [1, T]."""
    if steps is None:
        return sampler.default_steps(num_train_timesteps, spacing)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_train_timesteps:
        raise InvalidRequestError(f"steps must be an integer in [1, {num_train_timesteps}], got {steps!r}")
    return int(steps)


# ---- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """A validated request: everything a loop needs to run the reverse chain (see module doc)."""

    spec: StepSpec
    tables: Tables  # host, float64
    tab: DeviceTables  # the same tables on the device
    step: object  # stepping.TorchStep or kernels.TritonStep
    backend: object  # backends.Backend: (x, t) -> model output
    device: torch.device
    sample_shape: tuple
    lock: threading.Lock  # the backend's: backends with internal buffers are not re-entrant
    max_batch: int  # the largest batch that fits in memory (check_batch_fits)
    num_classes: int | None = None  # a class-conditional model's: rows carry labels in [0, num_classes)
    self_condition: bool = False  # rows carry the previous x0 estimate, fed back to the model (lucidrains)
    guidance_scale: float = 1.0  # classifier-free guidance (1: off): each row also runs with ``null_label``
    null_label: int | None = None  # the class-conditional model's unconditional label, if it has one
    cache_interval: int = 1  # reused deep features (engine.deepcache): the whole UNet every N steps; 1: off
    deep_shape: tuple | None = None  # one row's cached deep features (C, H, W), with cache_interval > 1

    @property
    def steps(self) -> int:
        return self.tables.steps

    @property
    def spacing(self) -> str:
        """The kept timesteps' spacing (schedules.SPACINGS)."""
        return self.tables.spacing

    @property
    def name(self) -> str:
        """"ddpm-1000", "ddim-50 eta=0", "dpmpp_2m-5 karras": the plan as reports name it (the spacing
        where it is not the sampler's own, eta where the sampler uses it)."""
        spec = self.spec
        spacing = f" {self.spacing}" if self.spacing != spec.definition.spacing else ""
        return (f"{spec.sampler}-{self.steps}{spacing}" + (f" eta={spec.eta:g}" if spec.definition.eta else "")
                + (f" cache={self.cache_interval}" if self.cache_interval > 1 else ""))

    @property
    def graphable(self) -> bool:
        """Whether CUDA graphs can serve this plan: on a CUDA device, with a capturable backend,
        without cache_interval (its full and shallow steps run eagerly: graphs.GraphedSampler)."""
        return self.device.type == "cuda" and self.backend.graph_capturable and self.cache_interval == 1

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one batch."""
        return (self.spec, self.steps, self.spacing, self.guidance_scale, self.cache_interval)

    def seeds(self, batch) -> list[int]:
        """A request's batch argument as seeds, refused at once if it cannot fit."""
        return parse_batch(batch, self.max_batch)

    def cadence(self) -> deepcache.Cadence:
        """Which of a running batch's steps are full (host side); every one at cache_interval 1."""
        return deepcache.Cadence(self.cache_interval)

    def labels(self, class_labels, n: int) -> list[int] | None:
        """A request's class labels for ``n`` seeds, checked (``parse_labels``)."""
        return parse_labels(class_labels, n, self.num_classes)

    def start(self, seeds, x_T: torch.Tensor | None = None, labels=None) -> Rows:
        """Fresh rows at the first step: x_T from the seeds (or the given x_T), i = steps - 1, and
        for a class-conditional model their labels (checked ones, ``labels``; None: 0, as static
        buffers and padding rows start)."""
        words = seed_words(seeds, self.device)
        x = initial_noise(words, self.sample_shape) if x_T is None else x_T
        i = torch.full((len(seeds),), self.steps - 1, dtype=torch.int64, device=self.device)
        state = {name: torch.zeros_like(x) for name in self.spec.definition.state}
        if self.num_classes is not None:
            state["labels"] = (torch.zeros(len(seeds), dtype=torch.int64) if labels is None
                               else torch.tensor(labels, dtype=torch.int64)).to(self.device)
        if self.self_condition:
            state["x_self_cond"] = torch.zeros_like(x)  # no estimate before the first step (lucidrains: zeros)
        if self.cache_interval > 1:  # written by the first (full) step; guidance keeps 2 calls' features per row
            k = 2 if self.guidance_scale != 1.0 else 1
            c, h, w = self.deep_shape
            state["deep"] = torch.zeros(len(seeds), k * c, h, w, device=self.device)
        return Rows(x, i, words, **state)


class Planner:
    """The plans of one engine: requests resolved against its model, backend and device (each
    default and check once per request), and cached with their tables. The engine hands a request
    down here and gets the plan back; nothing here calls back up."""

    def __init__(self, scheduler: SchedulerConfig, backend, device: torch.device, sample_shape, step_impl: str,
                 lock: threading.Lock, max_batch: int, num_classes: int | None = None, self_condition: bool = False,
                 null_label: int | None = None):
        self.scheduler = scheduler
        self.num_classes = num_classes  # a class-conditional model's (LoadedModel.io), else None
        self.self_condition = self_condition  # the model takes its previous x0 estimate (LoadedModel.io)
        self.null_label = null_label  # the label of "no class" for classifier-free guidance (LoadedModel.io)
        self.train_betas = scheduler.betas()
        self.backend, self.device, self.sample_shape = backend, device, tuple(sample_shape)
        self.step_impl = step_impl  # resolved: "torch" or "triton" (stepping.resolve_step_impl)
        self.lock, self.max_batch = lock, max_batch
        self._tables: dict[tuple, Tables] = {}  # (steps, spacing, multistep) -> Tables
        self.plans: dict[tuple, SamplingPlan] = {}  # SamplingPlan.key -> SamplingPlan

    @property
    def num_train_timesteps(self) -> int:
        return len(self.train_betas)

    def tables(self, sampler: SamplerDef, steps, spacing=None) -> Tables:
        """The coefficient tables of ``steps`` (None: the sampler's default) reverse steps of ``sampler``
        at ``spacing`` (None: the sampler's or the scheduler config's; ``SamplerDef.choose_spacing``)."""
        spacing = sampler.choose_spacing(spacing, self.scheduler.timestep_spacing, steps)
        return self._tables_of(sampler, resolve_steps(sampler, steps, self.num_train_timesteps, spacing), spacing)

    def _tables_of(self, sampler: SamplerDef, steps: int, spacing: str) -> Tables:
        key = (steps, spacing, sampler.multistep_grid)
        if key not in self._tables:
            self._tables[key] = Tables.build(self.train_betas, steps, spacing, multistep=key[2],
                                             steps_offset=self.scheduler.steps_offset,
                                             set_alpha_to_one=self.scheduler.set_alpha_to_one)
        return self._tables[key]

    def plan(self, sampler=None, steps=None, eta=0.0, clip_denoised=None,
             use_clipped_model_output=None, spacing=None, guidance_scale=1.0, cache_interval=1) -> SamplingPlan:
        """The plan of a request (built on first use; callers hold the engine's plans lock). ``sampler``
        None: samplers.default_request(steps) (DDPM, or for a few steps the best few-step sampler and
        its spacing, unless the request names a spacing). ``cache_interval`` > 1 is refused where
        the backend or its model cannot split (``check_deep_cache``)."""
        if sampler is None:
            sampler, few_step_spacing = default_request(steps)
            spacing = few_step_spacing if spacing is None else spacing
        spec = make_spec(self.scheduler, sampler, eta, clip_denoised, use_clipped_model_output)
        spacing = spec.definition.choose_spacing(spacing, self.scheduler.timestep_spacing, steps)
        steps = resolve_steps(spec.definition, steps, self.num_train_timesteps, spacing)
        guidance_scale = check_guidance(guidance_scale, self.num_classes, self.null_label)
        cache_interval = deepcache.check_interval(cache_interval)
        key = (spec, steps, spacing, guidance_scale, cache_interval)
        if key not in self.plans:
            with self.lock:  # its first call runs the backend once (the backend's calls are not re-entrant)
                deep_shape = check_deep_cache(self.backend, cache_interval, self.sample_shape)
            tables = self._tables_of(spec.definition, steps, spacing)
            check_defined(spec, tables)
            tab = tables.on(self.device)
            self.plans[key] = SamplingPlan(
                spec=spec, tables=tables, tab=tab,
                step=make_step(self.step_impl, spec, tab, self.sample_shape, guidance_scale),
                backend=self.backend, device=self.device, sample_shape=self.sample_shape, lock=self.lock,
                max_batch=self.max_batch, num_classes=self.num_classes, self_condition=self.self_condition,
                guidance_scale=guidance_scale, null_label=self.null_label, cache_interval=cache_interval,
                deep_shape=deep_shape)
        return self.plans[key]


def check_defined(spec: StepSpec, tables: Tables) -> None:
    """Refuse a run whose first step has alpha-bar 0 (a zero terminal SNR reached by DDPM or DDIM),
    where an epsilon prediction defines no x0 (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar))."""
    if spec.prediction is Prediction.EPSILON and tables.alphas_cumprod[-1] == 0.0:
        raise InvalidRequestError(
            f"the {spec.sampler} run at spacing {tables.spacing!r} starts at t = {tables.timesteps[-1]}, where the "
            "zero terminal SNR (rescale_betas_zero_snr) makes alpha-bar 0 and an epsilon prediction gives no x0; "
            "choose a spacing that does not keep t = T - 1 (such as 'leading' with fewer steps than T), a "
            "multistep sampler (dpmpp_2m, unipc: alpha-bar 2^-24 there, as diffusers), or a v_prediction model "
            "(Lin et al. 2024)")


def check_deep_cache(backend, cache_interval: int, sample_shape) -> tuple | None:
    """One row's deep-feature shape for ``cache_interval`` > 1 (None at 1), or InvalidRequestError
    saying why ``backend`` cannot run it (the backend's or the model's refusal)."""
    if cache_interval == 1:
        return None
    why = backend.deep_cache_refusal()
    if why is not None:
        raise InvalidRequestError(f"cache_interval={cache_interval} cannot run here: {why}; use cache_interval=1")
    return backend.deep_shape(sample_shape)


def check_guidance(guidance_scale, num_classes: int | None, null_label: int | None) -> float:
    """A request's classifier-free guidance scale: a finite number >= 0 (1: no guidance), and
    other than 1 only for a class-conditional model with a null label."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InvalidRequestError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {guidance_scale!r}")
    guidance_scale = float(guidance_scale)
    if guidance_scale != 1.0 and num_classes is None:
        raise InvalidRequestError("guidance_scale needs a class-conditional model (classifier-free guidance runs each "
                                  "row with its label and with the null label); this model takes no labels")
    if guidance_scale != 1.0 and null_label is None:
        raise InvalidRequestError("guidance_scale needs the model's null label (the label it was trained with for "
                                  "'no class'): give the module a null_label attribute or pass null_label= to "
                                  "from_module")
    return guidance_scale


class GuidedInputs:
    """The inputs of a guided model call on one batch of rows, as static [2B] buffers: x, t and
    the extra inputs twice, the second half with the null label (``guidance.guided``'s layout:
    conditional rows, then unconditional ones). Built once per Rows (``Rows.model_inputs``, at their
    first guided step) and refilled in place each step (x as one broadcast copy, t gathered
    straight into the buffer, the labels' first half): no allocation per step, and a captured
    CUDA graph reads the same buffers at every replay. The labels are copied each step (B int64)
    because a serving batch's slots take new rows, with their labels, between steps."""

    def __init__(self, rows: Rows, timesteps: torch.Tensor, null_label: int):
        B = len(rows)
        self.x = rows.x.new_empty((2 * B, *rows.x.shape[1:]))
        self.t = timesteps.new_empty(2 * B)
        self.labels = torch.full((2 * B,), null_label, dtype=rows.labels.dtype, device=rows.labels.device)
        self.x_self_cond = None if rows.x_self_cond is None else self.x.new_empty(self.x.shape)

    def __len__(self):
        return self.x.shape[0]

    def fill(self, rows: Rows, timesteps: torch.Tensor) -> list:
        """The call's inputs for ``rows`` at their step indices (export.iospec's order)."""
        B = len(rows)
        self.x.unflatten(0, (2, B)).copy_(rows.x)
        torch.index_select(timesteps, 0, rows.i, out=self.t[:B])
        self.t[B:].copy_(self.t[:B])
        self.labels[:B].copy_(rows.labels)
        if self.x_self_cond is None:
            return [self.x, self.t, self.labels]
        self.x_self_cond.unflatten(0, (2, B)).copy_(rows.x_self_cond)
        return [self.x, self.t, self.labels, self.x_self_cond]


def model_output(plan: SamplingPlan, rows: Rows, full: bool = True) -> torch.Tensor:
    """The backend's output for ``rows`` at t = timesteps[i], with the rows' extra inputs
    (export.iospec's order: labels, previous x0). With guidance, the conditional and
    unconditional rows go through one batched call (``GuidedInputs``) and the output's 2B rows go
    to the step as they are: the step combines them (``guidance.guided``; the fused kernels as
    they load the output). With cache_interval (``rows.deep`` set) the call is a full or a
    shallow step (``full``, deepcache.call)."""
    if plan.guidance_scale == 1.0:
        extra = [v for v in (rows.labels, rows.x_self_cond) if v is not None]
        return deepcache.call(plan.backend, rows.deep, full, rows.x, plan.tab.timesteps[rows.i], *extra)
    if rows.model_inputs is None or len(rows.model_inputs) != 2 * len(rows):
        rows.model_inputs = GuidedInputs(rows, plan.tab.timesteps, plan.null_label)
    return deepcache.call(plan.backend, rows.deep, full, *rows.model_inputs.fill(rows, plan.tab.timesteps))


def reverse_step(plan: SamplingPlan, rows: Rows, want_x0: bool = False, full: bool = True):
    """One reverse step on a batch, in place: the model call at t = timesteps[i] (``model_output``:
    the rows' extra inputs, guidance; with cache_interval a full step or, ``full`` False, a
    shallow one, as the caller's ``plan.cadence()`` says), the step; a self-conditioned model's
    rows keep the step's x0 for the next call. Returns the predicted x0 when ``want_x0`` (else
    None). No host work: capturable."""
    out = model_output(plan, rows, full)
    if rows.x_self_cond is None:
        return plan.step(rows, out, want_x0)
    x0 = plan.step(rows, out, True)
    rows.x_self_cond.copy_(x0)
    return x0 if want_x0 else None


@dataclass
class Snapshot:
    """The state at one step of a run: x_t fed to the model at training timestep t, and the x0
    the step predicted from it (seed 001's t = 500 snapshot, seed 003's x0 epilogue)."""

    t: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor


def snapshot_steps(return_intermediates, tables: Tables) -> set:
    """Training timesteps at which to keep a Snapshot: none, about ten, or each asked-for
    timestep snapped to the nearest kept one."""
    if return_intermediates is False or return_intermediates is None:
        return set()
    kept = tables.timesteps
    if return_intermediates is True:  # about ten, evenly spread, always including the last step
        pick = np.unique(np.linspace(0, len(kept) - 1, num=min(10, len(kept))).round().astype(int))
        return {int(kept[k]) for k in pick}
    try:
        wanted = [int(t) for t in return_intermediates]
    except (TypeError, ValueError):
        raise InvalidRequestError("return_intermediates must be a bool or a list of timesteps") from None
    T = tables.num_train_timesteps
    for t in wanted:
        if not 0 <= t < T:
            raise InvalidRequestError(f"intermediate timestep {t} is outside [0, {T})")
    return {int(kept[np.abs(kept - t).argmin()]) for t in wanted}


@torch.inference_mode()
def run_chain(plan: SamplingPlan, rows: Rows, snap_at=frozenset(), progress: bool = False):
    """The eager loop: ``plan.steps`` reverse steps on ``rows``, holding the plan's backend lock and
    with the CPU's threads lent as the thread policy says (``yield_cpu_to``); returns (images,
    snapshots). Snapshots are taken only at the training timesteps in ``snap_at``."""
    with plan.lock, yield_cpu_to(plan.backend):
        return _chain(plan, rows, snap_at, progress)


def _chain(plan: SamplingPlan, rows: Rows, snap_at, progress: bool):
    snaps, cadence = [], plan.cadence()
    loop = range(plan.steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        loop = tqdm(loop, total=plan.steps, desc=f"{plan.spec.sampler}-{plan.steps}", unit="step")
    for k in loop:  # k: the step index all rows share in this run, known on the host
        t = int(plan.tables.timesteps[k])
        if t in snap_at:
            x_t = rows.x.clone()  # the step writes x_{t-1} in place
            snaps.append(Snapshot(t, x_t, reverse_step(plan, rows, want_x0=True, full=cadence.next()).clone()))
        else:
            reverse_step(plan, rows, full=cadence.next())
    return rows.x.clamp_(-1.0, 1.0), snaps
