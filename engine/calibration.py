"""Calibration inputs for post-training quantization: the (x_t, t, *extra) a model meets on its
own sampling trajectories, recorded from the eager module (fp32) and the reference DDPM step.

A quantizer sets each activation's int8 range from what it sees, so it must see what sampling
feeds the network: x_t from pure noise at t = T - 1 down to nearly clean images at t = 0, with
the timestep that goes with each. Random inputs would calibrate the ranges of t = T - 1 only.

``record(loaded, settings)``: one DDPM trajectory of ``settings["batch"]`` images, respaced to
``settings["calls"]`` steps (so its timesteps span the whole training range evenly), from
``settings["seed"]``; every model call's inputs are kept, in order. DDPM's ancestral noise keeps
x_t on the forward process's marginals, which every sampler's trajectories also follow. The
settings are part of a quantized graph's cache key (``backends.openvino_backend``).

A model with extra inputs (``export.iospec.EXTRA_INPUTS``) gets them as sampling feeds them:
``class_labels``, one label per image drawn uniformly from the model's labels (its "no class"
label among them, where it has one: guidance's unconditional rows); ``x_self_cond``, the x0 the
previous step predicted (zeros at the first call, as ``plan.reverse_step`` feeds it).
"""

from __future__ import annotations

import torch

from .samplers import DDPMSampler

# NNCF's default subset size is 300 samples; 200 calls of 2 images see 400 images at 200 timesteps
SETTINGS = {"sampler": "ddpm", "calls": 200, "batch": 2, "seed": 0}


def record(loaded, settings: dict = SETTINGS) -> list[tuple[torch.Tensor, ...]]:
    """[(x_t float32 [batch, C, H, W], t int64 [batch], *extra)] of each model call of the
    trajectory of ``settings`` (see the module docstring), first call (t = T - 1 side) first;
    ``extra``: the model's extra inputs in ``export.iospec``'s order (labels int64 [batch], then
    the previous x0 float32 [batch, C, H, W])."""
    cfg, io = loaded.scheduler, loaded.io
    sampler = DDPMSampler(cfg.betas(), variance_type=cfg.variance_type, prediction_type=cfg.prediction_type,
                          clip_sample=cfg.clip_sample, steps=int(settings["calls"]))
    gen = torch.Generator().manual_seed(int(settings["seed"]))
    batch = int(settings["batch"])
    x = torch.randn((batch, *loaded.sample_shape), generator=gen)
    labels = torch.randint(0, io.num_classes, (batch,), generator=gen) if io.takes_labels else None
    x0 = torch.zeros_like(x) if io.self_conditioned else None
    calls = []
    with torch.inference_mode():
        for timestep in sampler.timesteps:
            t = timestep.reshape(1).expand(batch).to(torch.int64).contiguous()
            inputs = (x, t, *(v for v in (labels, x0) if v is not None))
            calls.append(inputs)
            out = loaded.module(*inputs).float()
            step = sampler.step(out, t, x, noise=torch.randn(x.shape, generator=gen))
            x, x0 = step.prev_sample, None if x0 is None else step.pred_original_sample
    return calls
