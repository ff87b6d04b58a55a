"""ddpm-engine: fast, trustworthy sampling from a trained diffusion UNet."""

import os
import sys

__version__ = "0.1.0"  # the distribution's version too (pyproject.toml reads it from here)

from . import threads as _threads

_threads.configure_openmp(os.environ, sys.modules)  # before torch loads OpenMP: idle threads sleep (engine/threads.py)

from .engine import Engine, Snapshot  # noqa: E402  (after configure_openmp)
from .errors import (BackendUnavailableError, EngineError, InvalidRequestError, MissingDependencyError,
                     ModelLoadError, QueueFullError, RequestTimeoutError)
from .images import make_grid, save_grid, to_pil, to_uint8
from .samplers import (DDIMSampler, DDPMSampler, DPMSolverSampler, UniPCSampler, ddim_step, ddpm_step,
                       dpmpp_2m_sde_step, dpmpp_2m_step, unipc_step)
from .schedules import SchedulerConfig, Tables

__all__ = [
    "Engine", "Snapshot", "EngineError", "InvalidRequestError", "ModelLoadError", "MissingDependencyError",
    "BackendUnavailableError", "QueueFullError", "RequestTimeoutError", "DDPMSampler", "DDIMSampler", "DPMSolverSampler", "UniPCSampler", "ddpm_step",
    "ddim_step", "dpmpp_2m_step", "dpmpp_2m_sde_step", "unipc_step",
    "SchedulerConfig", "Tables", "to_uint8", "to_pil", "make_grid", "save_grid",
]
