"""A per-model fitted few-step spacing: the training timesteps a sampler keeps, searched on the
model itself (docs/performance.md, "Five steps: the timestep levers").

``fit_spacing(engine, "ipndm", 5)`` searches the kept timesteps of a deterministic sampler's
``steps``-step run that bring its images closest to a many-step solution of the same
probability-flow ODE from the same noise, and returns them as a ``schedules.ExplicitSpacing``
(whole training timesteps: it runs as any other spacing, on every backend).

- The objective: the mean over the calibration seeds of the L2 distance between the candidate's
  images and the reference run's (``REFERENCE``: DPM-Solver++(2M), 50 steps uniform in log-SNR),
  both from the seeds' own x_T. It never looks at a quality metric or at evaluation seeds.
- The search: Nelder-Mead (scipy) over the kept timesteps' log-sigmas (sigma^2 = (1 - abar) /
  abar), from the multistep "leading" layout (T // (steps + 1) apart), each point rounded to the
  training timestep of nearest log-sigma before it runs (so the search sees what the engine will
  run; points that round to repeated timesteps are refused, and each rounded schedule is sampled
  once). At most ``max_evals`` points.
- The cache: the result is written as JSON under ``$DDPM_ENGINE_CACHE/fitted`` (engine/cache.py),
  keyed by the weights' hash, the module's structure, the noise schedule, the sampler, the steps
  and the search settings; a second call reads it and samples nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import cache
from .errors import InvalidRequestError, require
from .samplers import FEW_STEPS, sampler_def
from .schedules import ZERO_SNR_ALPHA_BAR, ExplicitSpacing, spaced_timesteps

CALIBRATION_SEEDS = tuple(range(5_000_000, 5_000_064))  # disjoint from bench/quality.py's evaluation seeds
REFERENCE = ("dpmpp_2m", 50, "logsnr")  # (sampler, steps, spacing) of the ODE solution the search approaches
MAX_EVALS = 300  # Nelder-Mead points at most
SIMPLEX_STEP = 0.25  # the first simplex's edge in log-sigma (about a quarter more or less noise)
FORMAT = 1  # the cached file's layout; a new one refits


def _check(engine, sampler: str, steps, seeds, reference, max_evals) -> tuple:
    """The request checked at the API boundary: (sampler def, seeds list, reference triple)."""
    d = sampler_def(sampler)
    if d.noise is not None and not d.eta:
        raise InvalidRequestError(f"{sampler!r} draws fresh noise at each step, so no spacing makes it follow the "
                                  "ODE's solution; fit a deterministic sampler (ipndm, unipc_3, dpmpp_2m, ddim, ...)")
    T = engine.num_train_timesteps
    top = min(FEW_STEPS, T - 1)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= top:
        raise InvalidRequestError(f"fit_spacing takes steps in [1, {top}] (a few-step run; at more steps the named "
                                  f"spacings are already close to the ODE's solution), got {steps!r}")
    if not isinstance(max_evals, (int, np.integer)) or isinstance(max_evals, bool) or max_evals < 1:
        raise InvalidRequestError(f"max_evals must be a positive integer, got {max_evals!r}")
    try:
        ref_sampler, ref_steps, ref_spacing = reference
    except (TypeError, ValueError):
        raise InvalidRequestError(f"reference must be (sampler, steps, spacing), e.g. {REFERENCE}, "
                                  f"got {reference!r}") from None
    rd = sampler_def(ref_sampler)
    if rd.noise is not None and not rd.eta:
        raise InvalidRequestError(f"the reference sampler {ref_sampler!r} draws fresh noise at each step; "
                                  f"name a deterministic one, e.g. {REFERENCE}")
    seeds = engine.plan(sampler, steps, spacing="leading").seeds(list(seeds) if not isinstance(seeds, int) else seeds)
    return d, seeds, (ref_sampler, int(ref_steps), ref_spacing)


def cached_path(engine, sampler: str, steps: int, seeds, reference, max_evals: int, cache_dir=None) -> Path:
    """Where the fit of this model, sampler, step count and search settings is cached."""
    loaded = engine.model
    module = getattr(loaded, "module", None)
    parts = {"format": FORMAT, "weights": loaded.weights_hash,
             "structure": cache.module_structure(module) if module is not None else None,
             "scheduler": engine.scheduler.to_dict(), "sampler": sampler, "steps": int(steps),
             "seeds": [int(s) for s in seeds], "reference": [str(v) for v in reference],
             "max_evals": int(max_evals), "simplex_step": SIMPLEX_STEP}
    return cache.artifact_path("fitted", loaded.name, parts, ".json", (sampler, f"{steps}steps"), cache_dir)


def _images(engine, seeds, sampler, steps, spacing) -> torch.Tensor:
    return engine.sample(list(seeds), sampler=sampler, steps=steps, spacing=spacing).double().flatten(1)


def search(engine, sampler: str, steps: int, seeds, reference=REFERENCE, max_evals: int = MAX_EVALS) -> dict:
    """Run the search (no cache): {"timesteps", "start", "objective", "start_objective", "runs",
    "evaluations"}. ``runs`` counts the ``steps``-step sampling runs it made (one per distinct
    rounded schedule), besides the one reference run."""
    minimize = require("scipy.optimize", "Engine.fit_spacing (its Nelder-Mead search)", extra="fit").minimize

    T = engine.num_train_timesteps
    train_abar = np.maximum(np.asarray(engine.scheduler.alphas_cumprod(), dtype=np.float64), ZERO_SNR_ALPHA_BAR)
    log_sigma = 0.5 * (np.log1p(-train_abar) - np.log(train_abar))  # increasing in t
    reference_images = _images(engine, seeds, *reference)
    seen = {}  # rounded timesteps -> objective

    def rounded(x) -> tuple:
        order = np.argsort(x)
        t = np.clip(np.searchsorted(log_sigma, np.asarray(x)[order]), 1, T - 1)
        t = np.where(log_sigma[t] - np.asarray(x)[order] > np.asarray(x)[order] - log_sigma[t - 1], t - 1, t)
        return tuple(int(v) for v in t)

    def objective(x) -> float:
        t = rounded(x)
        if len(set(t)) != len(t):
            return float("inf")
        if t not in seen:
            images = _images(engine, seeds, sampler, steps, ExplicitSpacing(t))
            seen[t] = float((images - reference_images).norm(dim=1).mean())
        return seen[t]

    start = spaced_timesteps(T, steps, "leading", multistep=True)
    x0 = log_sigma[start]
    simplex = np.vstack([x0] + [x0 + SIMPLEX_STEP * np.eye(steps)[i] for i in range(steps)])
    result = minimize(objective, x0, method="Nelder-Mead",
                      options={"maxfev": int(max_evals), "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-6})
    start_t = tuple(int(v) for v in start)
    best = min(seen, key=seen.get)  # the best rounded schedule sampled (Nelder-Mead's x rounds to one of them)
    return {"timesteps": list(best), "objective": seen[best], "start": list(start_t),
            "start_objective": objective(x0), "runs": len(seen), "evaluations": int(result.nfev)}


def fit_spacing(engine, sampler: str = "ipndm", steps: int = 5, *, seeds=CALIBRATION_SEEDS, reference=REFERENCE,
                max_evals: int = MAX_EVALS, cache_dir=None, refit: bool = False) -> ExplicitSpacing:
    """The fitted spacing of ``sampler`` at ``steps`` steps on ``engine``'s model (module
    docstring), read from the cache when it was fitted before (``refit=True`` searches again).

    Cost of a first fit: one reference run (``reference[1]`` network calls on ``len(seeds)``
    images) and at most ``max_evals`` runs of ``steps`` network calls each (fewer: a rounded
    schedule is sampled once). The default (64 seeds, 300 points, 5 steps) is up to 1500 network
    calls on 64 images; on the bundled digits model about 2-7 minutes of a loaded 2-core CPU.
    """
    d, seeds, reference = _check(engine, sampler, steps, seeds, reference, max_evals)
    path = cached_path(engine, d.name, steps, seeds, reference, max_evals, cache_dir)
    if refit:
        path.unlink(missing_ok=True)

    def make(tmp: Path):
        found = search(engine, d.name, steps, seeds, reference, max_evals)
        found.update(sampler=d.name, steps=int(steps), reference=list(reference), seeds=len(seeds),
                     backend=engine.backend.name, precision=engine.precision, format=FORMAT)
        tmp.write_text(json.dumps(found, indent=1))

    def open_(p: Path) -> ExplicitSpacing:
        data = json.loads(p.read_text())
        spacing = ExplicitSpacing(data["timesteps"])
        if data.get("format") != FORMAT or len(spacing) != steps or spacing.timesteps[-1] >= engine.num_train_timesteps:
            raise ValueError(f"{p} is not a fit of {steps} steps")
        return spacing

    return cache.load(path, make, open_, corrupt=(ValueError, KeyError, TypeError, InvalidRequestError))
