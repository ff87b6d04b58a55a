"""The public entry point: ``Engine.from_pretrained(...).sample(batch)``."""

from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch

from . import backends, checkpoints
from .errors import InvalidRequestError
from .noise import check_seeds, initial_noise, seed_words
from .samplers import SAMPLERS, Prediction, Variance, check_eta
from .schedules import Tables
from .stepping import Rows, StepSpec, make_step, resolve_step_impl

_seed_source = random.SystemRandom()
DRIVERS = ("eager", "python", "c", "graph_loop")


@dataclass
class Snapshot:
    """The state at one step of a run: x_t fed to the model at training timestep t, and the x0
    the step predicted from it (seed 001's t = 500 snapshot, seed 003's x0 epilogue)."""

    t: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = None


@contextlib.contextmanager
def yield_cpu_to(backend):
    """While a backend with its own CPU thread pool (ONNX Runtime) samples, torch's per-step work
    (small elementwise ops) runs on one thread: torch's OpenMP workers otherwise spin after each op
    and steal cores from the backend's pool (2-core CPU, CIFAR-10 UNet, 10 steps: 1.36 s -> 0.98 s).
    torch's thread count is process-wide; it is restored when the last such run ends."""
    global _threads_users, _threads_saved
    if not getattr(backend, "owns_cpu_threads", False):
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def fresh_seeds(n: int) -> list[int]:
    return [_seed_source.getrandbits(64) for _ in range(n)]


def parse_batch(batch) -> list[int]:
    """An int (that many fresh random seeds) or a list of seeds -> list of seeds."""
    if isinstance(batch, bool):
        raise InvalidRequestError("batch must be a positive int or a list of seeds, got a bool")
    if isinstance(batch, (int, np.integer)):
        if batch < 1:
            raise InvalidRequestError(f"batch must be at least 1, got {batch}")
        return fresh_seeds(int(batch))
    if isinstance(batch, (list, tuple, torch.Tensor, np.ndarray)):
        return check_seeds(batch.tolist() if hasattr(batch, "tolist") else batch)
    raise InvalidRequestError(f"batch must be a positive int or a list of seeds, got {type(batch).__name__}")


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


class Engine:
    """Samples images from a trained diffusion UNet.

    >>> engine = Engine.from_pretrained("digits")
    >>> images = engine.sample([1, 2, 3], sampler="ddim", steps=50)   # [3, 1, 16, 16] in [-1, 1]
    """

    def __init__(self, loaded: checkpoints.LoadedModel, backend="auto", device=None, precision="fp32",
                 step_impl="auto"):
        self.model = loaded
        self.device = parse_device(device)
        self.step_impl = resolve_step_impl(step_impl, self.device)
        self.backend = backends.create(backend, loaded, self.device, precision)
        self.precision = precision
        self.scheduler = loaded.scheduler
        self.sample_shape = loaded.sample_shape
        self._train_betas = loaded.scheduler.betas()
        self._tables: dict[int, Tables] = {}
        self._lock = threading.Lock()  # backends with internal buffers are not re-entrant
        self._server = None
        self._server_lock = threading.Lock()
        self._graphed = {}  # (StepSpec, steps, max_batch) -> engine.cuda.graphs.GraphedSampler

    @classmethod
    def from_pretrained(cls, path_or_name, backend="auto", device=None, precision="fp32", step_impl="auto"):
        """Open a bundled model ("digits") or a model folder (ddpm-engine or diffusers format)."""
        return cls(checkpoints.load(path_or_name), backend=backend, device=device, precision=precision,
                   step_impl=step_impl)

    @classmethod
    def from_module(cls, module, scheduler=None, sample_shape=None, **kw):
        """Wrap any ``nn.Module`` with ``forward(x, t)``; ``scheduler`` is a SchedulerConfig or dict."""
        return cls(checkpoints.from_module(module, scheduler, sample_shape), **kw)

    @property
    def num_train_timesteps(self) -> int:
        return len(self._train_betas)

    def tables(self, steps: int | None) -> Tables:
        steps = self.num_train_timesteps if steps is None else steps
        if steps not in self._tables:
            self._tables[steps] = Tables.build(self._train_betas, steps)
        return self._tables[steps]

    def step_spec(self, sampler="ddpm", eta=0.0, clip_denoised=None) -> StepSpec:
        if sampler not in SAMPLERS:
            raise InvalidRequestError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        eta = check_eta(eta)
        if clip_denoised is None:
            clip_denoised = bool(self.scheduler.clip_sample)
        elif not isinstance(clip_denoised, bool):
            raise InvalidRequestError(f"clip_denoised must be True, False or None, got {clip_denoised!r}")
        return StepSpec(sampler=sampler, prediction=Prediction.parse(self.scheduler.prediction_type),
                        variance=Variance.parse(self.scheduler.variance_type), clip_denoised=clip_denoised,
                        eta=eta)

    def _check_x_T(self, x_T, n: int) -> torch.Tensor:
        if not isinstance(x_T, torch.Tensor):
            raise InvalidRequestError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
        want = (n, *self.sample_shape)
        if tuple(x_T.shape) != want:
            raise InvalidRequestError(f"x_T has shape {tuple(x_T.shape)}, expected {want} (batch, C, H, W)")
        if not torch.isfinite(x_T).all():
            raise InvalidRequestError("x_T contains NaN or Inf")
        return x_T.to(self.device, torch.float32).clone()

    def _snapshot_steps(self, return_intermediates, tables: Tables) -> set:
        """Training timesteps at which to keep a Snapshot."""
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
        snap = set()
        for t in wanted:  # snap each asked-for timestep to the nearest kept one
            if not 0 <= t < self.num_train_timesteps:
                raise InvalidRequestError(f"intermediate timestep {t} is outside [0, {self.num_train_timesteps})")
            snap.add(int(kept[np.abs(kept - t).argmin()]))
        return snap

    def sample(self, batch, *, sampler="ddpm", steps=None, eta=0.0, clip_denoised=None, x_T=None,
               return_intermediates=False, progress=False, driver="eager"):
        """Run the reverse chain and return images [B, C, H, W] in [-1, 1] (float32, on the engine's device).

        batch: an int (that many fresh random seeds) or a list of 64-bit seeds; a seed gives the
            same image whatever batch it rides in.
        sampler: "ddpm" (ancestral, the model's variance type) or "ddim" (with ``eta``).
        steps: number of reverse steps (default T for DDPM, 50 for DDIM); fewer than T respaces.
        clip_denoised: clip predicted x0 to [-1, 1]; None takes the model's scheduler config.
        x_T: optional starting noise [B, C, H, W] (default: drawn from the seeds).
        return_intermediates: False, True (about ten snapshots), or a list of training timesteps;
            when set, returns ``(images, [Snapshot, ...])``.
        progress: show a tqdm progress bar.
        driver: "eager" (a Python loop of backend + step calls), or on CUDA "python" / "c" /
            "graph_loop": one reverse step captured in a CUDA graph and replayed from a Python
            loop, from the compiled C loop (kernels/csrc/graph_driver.c), or as one launch of a
            conditional WHILE node (CUDA >= 12.4); not with x_T, return_intermediates or progress.
        """
        seeds = parse_batch(batch)
        if driver not in DRIVERS:
            raise InvalidRequestError(f"unknown driver {driver!r}; choose one of {DRIVERS}")
        if driver != "eager":
            if x_T is not None or return_intermediates not in (False, None) or progress:
                raise InvalidRequestError(f"driver={driver!r} (CUDA graphs) takes no x_T, return_intermediates "
                                          "or progress; use driver='eager' for those")
            return self.graphed(sampler, steps, eta, clip_denoised).run(seeds, driver=driver)
        spec = self.step_spec(sampler, eta, clip_denoised)
        if steps is None:
            steps = self.num_train_timesteps if sampler == "ddpm" else min(50, self.num_train_timesteps)
        tables = self.tables(steps)
        snap_at = self._snapshot_steps(return_intermediates, tables)
        x = None if x_T is None else self._check_x_T(x_T, len(seeds))
        with self._lock, yield_cpu_to(self.backend):
            images, snaps = self._run(seeds, spec, tables, x, snap_at, progress)
        return (images, snaps) if return_intermediates not in (False, None) else images

    def graphed(self, sampler="ddpm", steps=None, eta=0.0, clip_denoised=None, max_batch=64):
        """The CUDA-graph sampler for one (sampler, steps) setting, captured lazily and cached."""
        from .cuda.graphs import GraphedSampler

        spec = self.step_spec(sampler, eta, clip_denoised)
        if steps is None:
            steps = self.num_train_timesteps if sampler == "ddpm" else min(50, self.num_train_timesteps)
        steps = self.tables(steps).steps
        key = (spec, steps, max_batch)
        if key not in self._graphed:
            self._graphed[key] = GraphedSampler(self, spec, steps, max_batch=max_batch)
        return self._graphed[key]

    @torch.inference_mode()
    def _run(self, seeds, spec: StepSpec, tables: Tables, x, snap_at, progress):
        dev = self.device
        tab = tables.on(dev)
        words = seed_words(seeds, dev)
        if x is None:
            x = initial_noise(words, self.sample_shape)
        step = make_step(self.step_impl, spec, tab, self.sample_shape, dev)
        n = tables.steps
        rows = Rows(x, torch.full((len(seeds),), n - 1, dtype=torch.int64, device=dev), words)
        snaps = []
        loop = range(n - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            loop = tqdm(loop, total=n, desc=f"{spec.sampler}-{n}", unit="step")
        for k in loop:  # k is the (host-known) step index all samples share in this run
            t = tab.timesteps[rows.i]
            out = self.backend(rows.x, t)
            snap_t = int(tables.timesteps[k])
            if snap_t in snap_at:
                x_t = rows.x.clone()  # the step writes x_prev in place
                x0 = step(rows, out, want_x0=True)
                snaps.append(Snapshot(snap_t, x_t, x0.clone()))
            else:
                step(rows, out)
        x = rows.x
        return x.clamp_(-1.0, 1.0), snaps

    # ---- serving: many callers, one batch (engine/serving.py) ---------------------------------
    def serve(self, *, mode="continuous", max_batch=32, max_wait_ms=5.0, max_queue=1024):
        """Start (or restart with new settings) the engine's batching server and return it."""
        from .serving import Server

        with self._server_lock:
            if self._server is not None:
                self._server.close()
            self._server = Server(self, mode=mode, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
            return self._server

    def _default_server(self):
        with self._server_lock:
            if self._server is None:
                from .serving import Server

                self._server = Server(self)
            return self._server

    def submit(self, batch, **kw):
        """Queue a request on the batching server; returns a concurrent.futures.Future of its images."""
        return self._default_server().submit(batch, **kw)

    async def sample_async(self, batch, **kw):
        """``await engine.sample_async(seeds, ...)``: batched with other concurrent callers."""
        return await self._default_server().sample_async(batch, **kw)

    def close(self):
        """Stop the batching server if one runs (the engine itself stays usable)."""
        with self._server_lock:
            if self._server is not None:
                self._server.close()
                self._server = None

    def __repr__(self):
        return (f"Engine(model={self.model.name!r}, backend={self.backend.name}, device={self.device}, "
                f"precision={self.precision}, step_impl={self.step_impl})")
