"""Train a UNet with DDPM's simple loss: ``python -m ddpm_engine train``.

Loss (DDPM eq. 14, the "simple" objective): draw t ~ U{0..T-1} and eps ~ N(0, I), form
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4) and regress the network's output on eps with
MSE. AdamW with a short linear warm-up and a cosine decay to 10% of the learning rate, an
exponential moving average of the weights (the saved model is the EMA), a tqdm bar, and a
resumable checkpoint (model, EMA, optimizer, step, RNG state) in the output folder.

No augmentation: flips change a digit's identity, and the digits are already centred.

The bundled model (engine/bundled/digits) is ``python -m ddpm_engine train --out runs/digits`` with the
defaults below.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from . import threads
from .checkpoints import save_project_folder
from .data import load_digits_images
from .errors import InvalidRequestError
from .models import DoubleConvUNet
from .schedules import SchedulerConfig

CHECKPOINT = "checkpoint.pt"
# what the network is; a checkpoint made with other values cannot be resumed
ARCHITECTURE_FIELDS = ("widths", "time_emb_dim")


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    widths: list = field(default_factory=lambda: [32, 64, 128])
    time_emb_dim: int = 64
    seed: int = 0
    save_every: int = 1000
    warmup: int = 200


def scheduler_config() -> SchedulerConfig:
    """The noise schedule the trainer uses: DDPM's linear betas, T = 1000, epsilon prediction."""
    return SchedulerConfig(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                           variance_type="fixed_small", clip_sample=True, prediction_type="epsilon")


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters and BatchNorm running stats."""
    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(p, alpha=1 - decay)
            else:
                e.copy_(p)


def diffusion_loss(model, x0: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_1m_abar: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The epsilon-MSE loss on one batch (eq. 14)."""
    T = len(sqrt_abar)
    t = torch.randint(0, T, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = sqrt_abar[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_abar[t].view(-1, 1, 1, 1) * eps
    return F.mse_loss(model(x_t, t), eps)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 10% at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def make_config(cfg: TrainConfig | None, overrides: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidRequestError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    cfg = replace(cfg or TrainConfig(), **overrides)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.save_every < 1 or not cfg.lr > 0 or not 0 <= cfg.ema_decay < 1:
        raise InvalidRequestError(f"need steps, batch_size, save_every >= 1, lr > 0 and 0 <= ema_decay < 1; got {cfg}")
    return cfg


def model_config(cfg: TrainConfig, in_channels: int, scheduler: SchedulerConfig) -> dict:
    """The ``model`` entry of the saved config.json; ``"seed_unet"`` is DoubleConvUNet's saved name."""
    return {"type": "seed_unet", "in_channels": in_channels, "widths": list(cfg.widths),
            "num_timesteps": scheduler.num_train_timesteps, "time_emb_dim": cfg.time_emb_dim}


@dataclass
class TrainState:
    """What a checkpoint holds: the network, its EMA, the optimizer, the batch generator, the step
    reached and the running average of the loss."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int = 0
    loss: float | None = None

    @classmethod
    def new(cls, cfg: TrainConfig, model_cfg: dict) -> "TrainState":
        """Seeded initial weights (``cfg.seed``), without touching the caller's global RNG."""
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            model = DoubleConvUNet(**{k: v for k, v in model_cfg.items() if k != "type"})
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return cls(model, copy.deepcopy(model).eval(), opt, torch.Generator().manual_seed(cfg.seed))

    def load(self, ckpt: Path, cfg: TrainConfig) -> None:
        """Resume from ``ckpt``; refused if it holds another architecture (ARCHITECTURE_FIELDS)."""
        state = torch.load(ckpt, weights_only=False)
        saved = state.get("config", {})
        mismatch = [n for n in ARCHITECTURE_FIELDS
                    if n in saved and _same(saved[n]) != _same(getattr(cfg, n))]
        if mismatch:
            raise InvalidRequestError(f"{ckpt} holds a model with other {', '.join(mismatch)} "
                                      f"({', '.join(f'{n}={saved[n]}' for n in mismatch)}); "
                                      "use another output folder, or resume=False (--no-resume) to start over")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.step, self.loss = state["step"], state["loss"]

    def save(self, ckpt: Path, cfg: TrainConfig) -> None:
        """Write ``ckpt`` atomically: an interrupted save leaves the old checkpoint whole."""
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                 "generator": self.gen.get_state(), "step": self.step, "loss": self.loss, "config": asdict(cfg)}
        torch.save(state, ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)


def train_step(state: TrainState, cfg: TrainConfig, x_all: torch.Tensor, sqrt_abar: torch.Tensor,
               sqrt_1m_abar: torch.Tensor) -> float:
    """One optimizer step on a batch drawn from ``x_all``, then the EMA update; returns the loss."""
    idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=state.gen)
    for g in state.opt.param_groups:
        g["lr"] = learning_rate(cfg, state.step)
    loss = diffusion_loss(state.model, x_all[idx], sqrt_abar, sqrt_1m_abar, state.gen)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    state.opt.step()
    ema_update(state.ema, state.model, cfg.ema_decay if state.step >= cfg.warmup else 0.0)
    state.step += 1
    value = loss.item()
    state.loss = value if state.loss is None else 0.98 * state.loss + 0.02 * value
    return value


def train(out_dir, cfg: TrainConfig | None = None, *, resume: bool = True, progress: bool = True,
          data: torch.Tensor | None = None, stop_at: int | None = None, **overrides) -> dict:
    """Train (or resume) in ``out_dir``; writes the EMA model in the project format there.

    cfg: a TrainConfig; keyword ``overrides`` (steps=, batch_size=, lr=, ema_decay=, widths=, seed=,
        ...) replace its fields. The learning-rate schedule spans ``cfg.steps``.
    resume: continue from ``out_dir/checkpoint.pt`` if it exists (False starts over).
    data: training images [N, C, H, W] in [-1, 1] (default: the 16x16 digits).
    stop_at: stop early at this step, as if interrupted (checkpoint saved); a later call resumes.

    Returns {"step", "loss" (running average of the training loss), "losses" (per step of this call)}."""
    cfg = make_config(cfg, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_all = load_digits_images()[0] if data is None else data
    scheduler = scheduler_config()
    abar = torch.from_numpy(scheduler.alphas_cumprod())
    sqrt_abar, sqrt_1m_abar = abar.sqrt().float(), (1 - abar).sqrt().float()
    model_cfg = model_config(cfg, x_all.shape[1], scheduler)
    state = TrainState.new(cfg, model_cfg)
    ckpt = out / CHECKPOINT
    if resume and ckpt.is_file():
        state.load(ckpt, cfg)

    def save():
        state.save(ckpt, cfg)
        save_project_folder(out, state.ema, model_cfg, scheduler, tuple(x_all.shape[1:]), name=out.name)

    last = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    bar = _progress_bar(cfg.steps, state.step) if progress else None
    losses = []
    state.model.train()
    while state.step < last:
        losses.append(train_step(state, cfg, x_all, sqrt_abar, sqrt_1m_abar))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{state.loss:.4f}")
        if state.step % cfg.save_every == 0 or state.step == last:
            save()
    if bar is not None:
        bar.close()
    if not losses:  # nothing left to do: still make sure the model folder exists
        save()
    return {"step": state.step, "loss": state.loss, "losses": losses}


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step")


def _same(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_engine train",
                                description="Train a DoubleConvUNet on scikit-learn's handwritten digits (16x16). "
                                            "Resumes from OUT/checkpoint.pt if present.")
    d = TrainConfig()
    p.add_argument("--out", default="runs/digits", help="output folder: checkpoint.pt, config.json, model.safetensors")
    p.add_argument("--steps", type=int, default=d.steps, help=f"total optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help=f"default {d.ema_decay}")
    p.add_argument("--widths", type=int, nargs="+", default=d.widths, help="UNet channel widths per level")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period in steps")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    threads.apply_torch()  # DDPM_ENGINE_THREADS (engine/threads.py)
    result = train(a.out, resume=not a.no_resume, progress=not a.quiet, steps=a.steps, batch_size=a.batch_size,
                   lr=a.lr, ema_decay=a.ema_decay, widths=a.widths, seed=a.seed, save_every=a.save_every)
    print(f"trained to step {result['step']}, loss {result['loss']:.4f}; model in {a.out}")
    return 0
