"""The public entry point: ``Engine.from_pretrained(...).sample(batch)``."""

from __future__ import annotations

import os
import threading
import weakref

import torch

from . import backends, checkpoints
from .errors import BackendUnavailableError, InvalidRequestError
from .plan import Planner, SamplingPlan, Snapshot, max_batch_that_fits, parse_device, run_chain, snapshot_steps
from .samplers import sampler_def
from .schedules import Tables
from .serving import Server
from .stepping import resolve_step_impl

__all__ = ["Engine", "Snapshot"]
DRIVERS = ("auto", "eager", "python", "c", "graph_loop")
FORK_WAIT_S = 60.0  # how long a fork waits for the engines' running steps to finish
_ENGINES = weakref.WeakSet()


def _before_fork():
    """Hold every engine's backend lock across ``fork``, so no backend call is half done in the
    child (a lock the parent's scheduler held at the fork would stay locked there forever)."""
    for engine in list(_ENGINES):
        engine._held_at_fork = engine._backend_lock.acquire(timeout=FORK_WAIT_S)


def _after_fork(child: bool):
    for engine in list(_ENGINES):
        if child:
            engine._plans_lock, engine._server_lock = threading.Lock(), threading.Lock()
            engine._fork_refusal = engine._fork_refusal or _fork_refusal(engine)
        if engine.__dict__.pop("_held_at_fork", False):
            engine._backend_lock.release()


def _fork_refusal(engine) -> str | None:
    """Why ``engine`` cannot sample in a forked child, or None."""
    if not engine.__dict__.get("_held_at_fork", True):
        return (f"the process was forked while this engine was sampling (its backend was still busy after "
                f"{FORK_WAIT_S:.0f} s)")
    if engine.device.type == "cuda":
        return "CUDA does not survive fork()"
    if not getattr(engine.backend, "survives_fork", True):
        return f"the {engine.backend.name} backend does not survive fork()"
    return None


os.register_at_fork(before=_before_fork, after_in_parent=lambda: _after_fork(False),
                    after_in_child=lambda: _after_fork(True))


class Engine:
    """Samples images from a trained diffusion UNet.

    >>> engine = Engine.from_pretrained("digits")
    >>> images = engine.sample([1, 2, 3], sampler="ddim", steps=50)   # [3, 1, 16, 16] in [-1, 1]
    """

    def __init__(self, loaded: checkpoints.LoadedModel, backend="auto", device=None, precision="fp32",
                 step_impl="auto", batching=True):
        if not isinstance(batching, bool):
            raise InvalidRequestError(f"batching must be True or False, got {batching!r}")
        self.model = loaded
        self.batching = batching
        self.device = parse_device(device)
        self.step_impl = resolve_step_impl(step_impl, self.device)
        backend = backends.create(backend, loaded, self.device, precision)
        self.precision = precision
        self.scheduler = loaded.scheduler
        self.sample_shape = loaded.sample_shape
        # larger batches are refused: they would not fit beside the model's measured working memory
        self.max_batch = max_batch_that_fits(self.sample_shape, self.device, loaded.io.bytes_per_image,
                                             backend.working_memory_factor)
        self._plans_lock = threading.Lock()  # guards the planner's caches and the graph samplers
        self._backend_lock = threading.Lock()  # backends with internal buffers are not re-entrant
        self._planner = Planner(self.scheduler, backend, self.device, self.sample_shape, self.step_impl,
                                self._backend_lock, self.max_batch, num_classes=loaded.io.num_classes,
                                self_condition=loaded.io.self_conditioned, null_label=loaded.io.null_label)
        self._server = None  # the explicit server of serve() / submit()
        self._auto = None  # the server behind sample()'s own batching of concurrent calls
        self._server_lock = threading.Lock()
        self._graph_samplers = {}  # (plan key, max_batch, capture) -> cuda.graphs.GraphedSampler
        self._fork_refusal = None  # in a forked child: why this engine cannot sample here
        _ENGINES.add(self)

    @classmethod
    def from_pretrained(cls, path_or_name, backend="auto", device=None, precision="fp32", step_impl="auto",
                        batching=True, revision=None):
        """Open a bundled model ("digits"), a model folder (ddpm-engine or diffusers format), or a
        Hugging Face hub id ("google/ddpm-cifar10-32", at ``revision``; the hub cache and
        ``HF_HUB_OFFLINE`` work as in diffusers). batching=False runs concurrent ``sample`` calls
        one after another instead of batching them."""
        return cls(checkpoints.load(path_or_name, revision=revision), backend=backend, device=device,
                   precision=precision, step_impl=step_impl, batching=batching)

    @classmethod
    def from_module(cls, module, scheduler=None, sample_shape=None, num_classes=None, null_label=None, **kw):
        """Wrap any ``nn.Module`` with ``forward(x, t)`` or ``forward(x, t, y)`` (a diffusers
        UNet2DModel too); ``scheduler`` is a SchedulerConfig or dict; ``num_classes``: the labels'
        range of a ``forward(x, t, y)`` whose module has no ``num_classes`` attribute; ``null_label``:
        its label for "no class" (classifier-free guidance), where the module has no ``null_label``
        attribute. docs/models.md."""
        return cls(checkpoints.from_module(module, scheduler, sample_shape, num_classes=num_classes,
                                           null_label=null_label), **kw)

    @property
    def backend(self):
        """The backend: (x, t) -> model output. Plans made after it is replaced take the new one."""
        return self._planner.backend

    @backend.setter
    def backend(self, backend):
        self._planner.backend = backend

    @property
    def num_train_timesteps(self) -> int:
        return self._planner.num_train_timesteps

    def tables(self, steps: int | None = None, sampler: str = "ddpm", spacing: str | None = None) -> Tables:
        """The coefficient tables of ``steps`` reverse steps of ``sampler`` at ``spacing`` (built once, cached)."""
        with self._plans_lock:
            return self._planner.tables(sampler_def(sampler), steps, spacing)

    def plan(self, sampler=None, steps=None, eta=0.0, clip_denoised=None,
             use_clipped_model_output=None, spacing=None, guidance_scale=1.0, cache_interval=1) -> SamplingPlan:
        """The validated plan of a request (every default and check in one place), cached.

        sampler: one of ``samplers.SAMPLERS``; steps: default per sampler (``SamplerDef.default_steps``);
        clip_denoised / use_clipped_model_output: None takes the model's scheduler config;
        spacing: the kept timesteps (``schedules.SPACINGS``; None: ``SamplerDef.choose_spacing``);
        cache_interval: reused deep features (``sample``'s option).
        """
        if self._fork_refusal:
            raise BackendUnavailableError(f"this engine came through a fork: {self._fork_refusal}; open the engine "
                                          "in the child process, or start children with multiprocessing's 'spawn'")
        with self._plans_lock:
            return self._planner.plan(sampler, steps, eta, clip_denoised, use_clipped_model_output, spacing,
                                      guidance_scale, cache_interval)

    def fit_spacing(self, sampler="ipndm", steps=5, *, seeds=None, reference=None, max_evals=None, cache_dir=None,
                    refit=False):
        """The timesteps ``sampler`` should keep at ``steps`` steps on this model, searched once and
        cached on disk (engine/fitting.py): a ``schedules.ExplicitSpacing`` to pass as ``spacing=``.
        ``engine.sample(seeds, sampler="ipndm", steps=5, spacing=engine.fit_spacing("ipndm", 5))``
        is the best 5-step run measured (docs/performance.md). A first fit costs up to
        ``max_evals`` (default 300) runs of ``steps`` network calls on ``seeds`` (default the 64
        ``fitting.CALIBRATION_SEEDS``) and one ``reference`` run (default ``fitting.REFERENCE``,
        DPM-Solver++(2M) at 50 log-SNR steps); a later call with the same settings reads the
        cache and samples nothing. ``refit=True`` searches again."""
        from . import fitting

        return fitting.fit_spacing(self, sampler, steps, seeds=fitting.CALIBRATION_SEEDS if seeds is None else seeds,
                                   reference=fitting.REFERENCE if reference is None else reference,
                                   max_evals=fitting.MAX_EVALS if max_evals is None else max_evals,
                                   cache_dir=cache_dir, refit=refit)

    def _check_x_T(self, x_T, n: int) -> torch.Tensor:
        if not isinstance(x_T, torch.Tensor):
            raise InvalidRequestError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
        want = (n, *self.sample_shape)
        if tuple(x_T.shape) != want:
            raise InvalidRequestError(f"x_T has shape {tuple(x_T.shape)}, expected {want} (batch, C, H, W)")
        if not torch.isfinite(x_T).all():
            raise InvalidRequestError("x_T contains NaN or Inf")
        return x_T.to(self.device, torch.float32).clone()

    def sample(self, batch, *, sampler=None, steps=None, eta=0.0, clip_denoised=None,
               use_clipped_model_output=None, x_T=None, return_intermediates=False, progress=False,
               driver="auto", spacing=None, class_labels=None, guidance_scale=1.0, cache_interval=1):
        """Run the reverse chain and return images [B, C, H, W] in [-1, 1] (float32, on the engine's device).

        batch: an int (that many fresh random seeds) or a list of 64-bit seeds; a seed gives the
            same image whatever batch it rides in. A batch too large to fit in memory is refused
            at once (the error says how many fit).
        sampler: one of ``ddpm_engine.samplers.SAMPLERS``: "ddpm" (ancestral, the model's variance
            type), "ddim" (with ``eta``), ...; None: ``samplers.default_request(steps)``, DDPM, or
            the best few-step sampler and spacing of the quality table when 1..``samplers.FEW_STEPS`` steps.
        steps: number of reverse steps (default: ``samplers.default_steps``: T for DDPM, 50 for
            DDIM); fewer than T respaces.
        clip_denoised: clip predicted x0 to [-1, 1]; None takes the model's scheduler config.
        use_clipped_model_output: DDIM with clipping: recompute eps from the clipped x0 (diffusers'
            option of the same name); None takes the scheduler config (default False).
        spacing: which training timesteps the steps keep (docs/api.md, "Timestep spacing"):
            "leading", "linspace", "trailing" (diffusers' timestep_spacing), "karras" (Karras
            sigmas) or "logsnr" (uniform in log-SNR); DDPM takes the first three. None: the
            sampler's own ("leading" for DDPM and DDIM, where the scheduler config's
            timestep_spacing applies; "linspace" for DPM-Solver++ and UniPC). Any sampler also
            takes the training timesteps to keep, as a list (``schedules.ExplicitSpacing``;
            improved-diffusion's respacing, docs/openai.md).
        x_T: optional starting noise [B, C, H, W] (default: drawn from the seeds).
        return_intermediates: False, True (about ten snapshots), or a list of training timesteps;
            when set, returns ``(images, [Snapshot, ...])``.
        progress: show a tqdm progress bar.
        driver: "auto" (the default: the fast path, below), "eager" (a Python loop of backend +
            step calls), or on CUDA "python" / "c" / "graph_loop": one reverse step captured in a
            CUDA graph and replayed from a Python loop, from the compiled C loop
            (kernels/csrc/c_loop.c), or as one launch of a conditional WHILE node
            (CUDA >= 12.4); the graph drivers take no x_T, return_intermediates or progress.

        The default path: on CUDA with a graph-capturable backend (``plan.graphable``; not
        onnxruntime), the run replays one captured reverse step per batch bucket (1, 2, 4, ...):
        through the batching server below, or with ``batching=False`` through the C driver
        (Python replay if it cannot be built). The eager loop runs where graphs cannot serve:
        on the CPU, with x_T, return_intermediates or a progress bar. The graph path on a GPU is
        UNVERIFIED (README, "The CUDA path"); ``driver="eager"`` always takes the eager loop.

        class_labels: for a class-conditional model (diffusers' ``num_class_embeds``, a
            ``forward(x, t, y)``), one int label per seed in [0, num_classes); a seed with a label
            gives the same image alone or in any batch. Refused for a model without labels.
        guidance_scale: classifier-free guidance for a class-conditional model with a null label
            (``from_module(..., null_label=)``): 1 (the default) is off; s gives
            uncond + s * (cond - uncond), both halves from one batched model call.
        cache_interval: reused deep features (DeepCache, engine/deepcache.py): 1 (the default) is
            off; N runs the whole UNet every N steps and in between only its shallow branch on
            the deep features cached by the last full step (each row's own: a row joining a
            running batch starts with a full step). Faster, slightly different images
            (docs/performance.md). For diffusers' UNet2DModel and the engine's own UNets, on the
            torch, onnxruntime and openvino backends; refused elsewhere. CUDA graphs do not
            serve it (the eager loop runs).

        Concurrent calls from several threads batch themselves (``batching=True``, the default):
        a call that arrives while another runs joins the running batch at its next step, with
        the same images it would get alone; a lone call starts at once. Calls with x_T,
        intermediates, a progress bar or an explicit driver run on their own.
        """
        plan = self.plan(sampler, steps, eta, clip_denoised, use_clipped_model_output, spacing, guidance_scale,
                         cache_interval)
        if driver not in DRIVERS:
            raise InvalidRequestError(f"unknown driver {driver!r}; choose one of {DRIVERS}")
        alone = x_T is not None or return_intermediates not in (False, None) or progress
        graph_driver = None if driver in ("auto", "eager") else driver  # an explicit CUDA-graph driver
        if graph_driver is not None and alone:
            raise InvalidRequestError(f"driver={driver!r} (CUDA graphs) takes no x_T, return_intermediates "
                                      "or progress; use driver='eager' for those")
        if driver == "auto" and not alone and self.batching:
            return self._batcher().sample(batch, plan=plan, class_labels=class_labels)
        if graph_driver is not None or (driver == "auto" and not alone and plan.graphable):
            capture = True if graph_driver is not None else None  # an explicit driver needs captured graphs
            return self._graphed(plan, capture=capture).run(plan.seeds(batch), driver=graph_driver,
                                                            class_labels=class_labels)
        seeds = plan.seeds(batch)
        labels = plan.labels(class_labels, len(seeds))
        snap_at = snapshot_steps(return_intermediates, plan.tables)
        x = None if x_T is None else self._check_x_T(x_T, len(seeds))
        images, snaps = run_chain(plan, plan.start(seeds, x, labels), snap_at, progress)
        return (images, snaps) if return_intermediates not in (False, None) else images

    def graphed(self, sampler=None, steps=None, eta=0.0, clip_denoised=None, use_clipped_model_output=None,
                max_batch=64, capture=None, spacing=None):
        """The CUDA-graph sampler for one request setting (engine.cuda.graphs), built lazily and cached."""
        return self._graphed(self.plan(sampler, steps, eta, clip_denoised, use_clipped_model_output, spacing),
                             max_batch, capture)

    def _graphed(self, plan: SamplingPlan, max_batch=64, capture=None):
        from .cuda.graphs import GraphedSampler

        capture = plan.device.type == "cuda" if capture is None else bool(capture)  # one sampler for None and its value
        key = (plan.key, max_batch, capture)
        with self._plans_lock:
            if key not in self._graph_samplers:
                self._graph_samplers[key] = GraphedSampler(plan, max_batch=max_batch, capture=capture)
            return self._graph_samplers[key]

    def fast_path(self) -> list[dict]:
        """Which path each plan this engine has made takes, and why: one dict per plan, {"plan",
        "path": "graphs" | "eager", "graphs": verified (buckets) / refused with the reason / why
        not used, "c_driver": verified / failed with the reason / not used}. README, "The fast
        path checks itself"."""
        with self._server_lock:
            servers = [s for s in (self._server, self._auto) if s is not None]
        with self._plans_lock:
            plans = list(self._planner.plans.values())
            reports = [gs.report() for gs in self._graph_samplers.values()]
        reports += [r for server in servers for r in server.fast_path()]
        by_plan = {}  # one report per plan: a refusal wins, then the one that built buckets
        for r in sorted(reports, key=lambda r: (r["path"] != "eager", not r["graphs"].startswith("verified"))):
            by_plan.setdefault(r["plan"], r)
        reports = list(by_plan.values())
        for plan in plans:
            if plan.name not in by_plan:
                why = ("not used yet" if plan.graphable else "not used: " + (
                    f"no CUDA graphs on {plan.device}" if plan.device.type != "cuda"
                    else f"cache_interval={plan.cache_interval} runs in the eager loop" if plan.cache_interval > 1
                    else f"the {plan.backend.name} backend cannot be captured"))
                reports.append({"plan": plan.name, "path": "graphs" if plan.graphable else "eager",
                                "graphs": why, "c_driver": "not used"})
        return reports

    # ---- serving: many callers, one batch (engine/serving.py) ---------------------------------
    def serve(self, *, mode="continuous", max_batch=32, max_wait_ms=5.0, max_queue=1024):
        """Start (or restart with new settings) the engine's batching server and return it (it
        keeps the engine alive until one of them is closed)."""
        server = Server(self, mode=mode, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
        with self._server_lock:
            old, self._server = self._server, server
        if old is not None:
            old.close()
        return server

    def _default_server(self) -> Server:
        with self._server_lock:
            if self._server is None:
                self._server = Server(weakref.proxy(self))
            return self._server

    def _batcher(self) -> Server:
        """The server behind ``sample``: continuous batching, no added wait, results on the device."""
        with self._server_lock:
            if self._auto is None:
                self._auto = Server(weakref.proxy(self), mode="continuous", max_batch=self.max_batch, max_wait_ms=0.0,
                                    results="device", idle_exit_s=1.0)
            return self._auto

    def submit(self, batch, **kw):
        """Queue a request on the batching server; returns a concurrent.futures.Future of its images."""
        return self._default_server().submit(batch, **kw)

    async def sample_async(self, batch, **kw):
        """``await engine.sample_async(seeds, ...)``: batched with other concurrent callers."""
        return await self._default_server().sample_async(batch, **kw)

    def close(self):
        """Stop the batching servers if any run (their threads joined) and drop the captured graphs
        (their buffers and memory pools); the engine itself stays usable and captures again when
        asked. Garbage collection and the end of ``with Engine.from_pretrained(...) as engine:``
        close it too."""
        if not hasattr(self, "_server_lock"):  # __init__ raised
            return
        with self._server_lock:
            servers, self._server, self._auto = (self._server, self._auto), None, None
        with self._plans_lock:
            self._graph_samplers.clear()
        for server in servers:
            if server is not None:
                server.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()  # the servers of sample() and submit() hold it weakly: their threads do not keep it alive

    def __repr__(self):
        return (f"Engine(model={self.model.name!r}, backend={self.backend.name}, device={self.device}, "
                f"precision={self.precision}, step_impl={self.step_impl})")
