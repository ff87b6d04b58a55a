"""Train a UNet with the seeds' loss: ``python -m engine train``.

Loss (DDPM eq. 14, the "simple" objective): draw t ~ U{0..T-1} and eps ~ N(0, I), form
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4) and regress the network's output on eps with
MSE. AdamW, an exponential moving average of the weights (the saved model is the EMA), a tqdm bar,
and a resumable checkpoint (model, EMA, optimizer, step, RNG state) in the output folder.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from .checkpoints import save_project_folder
from .data import DIGITS_SHAPE, load_digits_images
from .models import SeedUNet
from .schedules import SchedulerConfig

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    widths: list = field(default_factory=lambda: [32, 64, 128])
    time_emb_dim: int = 64
    seed: int = 0
    save_every: int = 1000
    warmup: int = 200


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
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


def train(out_dir, cfg: TrainConfig | None = None, *, resume: bool = True, progress: bool = True,
          data: torch.Tensor | None = None) -> dict:
    """Train (or resume) in ``out_dir``; writes the EMA model in the project format there.

    Returns {"step", "loss" (EMA of the training loss), "losses" (per step of this call)}."""
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    x_all = load_digits_images()[0] if data is None else data
    scheduler = SchedulerConfig(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                clip_sample=True, prediction_type="epsilon")
    abar = torch.tensor(scheduler.betas()).neg().add(1).cumprod(0)
    sqrt_abar, sqrt_1m_abar = abar.sqrt().float(), (1 - abar).sqrt().float()

    model_cfg = {"type": "seed_unet", "in_channels": x_all.shape[1], "widths": list(cfg.widths),
                 "num_timesteps": 1000, "time_emb_dim": cfg.time_emb_dim}
    model = SeedUNet(**{k: v for k, v in model_cfg.items() if k != "type"})
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, loss_avg = 0, None
    ckpt = out / CHECKPOINT
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, loss_avg = state["step"], state["loss"]

    def lr_at(s):  # linear warm-up, then cosine decay to 10%
        if s < cfg.warmup:
            return cfg.lr * (s + 1) / cfg.warmup
        frac = (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def save():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "generator": gen.get_state(), "step": step, "loss": loss_avg, "config": asdict(cfg)}, ckpt)
        save_project_folder(out, ema, model_cfg, scheduler, tuple(x_all.shape[1:]), name=out.name)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    losses = []
    model.train()
    while step < cfg.steps:
        idx = torch.randint(0, x_all.shape[0], (cfg.batch_size,), generator=gen)
        x0 = x_all[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = diffusion_loss(model, x0, sqrt_abar, sqrt_1m_abar, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
        step += 1
        losses.append(loss.item())
        loss_avg = losses[-1] if loss_avg is None else 0.98 * loss_avg + 0.02 * losses[-1]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
    if bar is not None:
        bar.close()
    if not losses:  # nothing left to do: still make sure the model folder exists
        save()
    return {"step": step, "loss": loss_avg, "losses": losses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine train",
                                description="Train a SeedUNet on scikit-learn's handwritten digits (16x16).")
    d = TrainConfig()
    p.add_argument("--out", default="runs/digits", help="output folder (checkpoint + model)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--widths", type=int, nargs="+", default=d.widths)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema_decay, widths=a.widths,
                      seed=a.seed)
    result = train(a.out, cfg, resume=not a.no_resume, progress=not a.quiet)
    print(f"trained to step {result['step']}, loss {result['loss']:.4f}; model in {a.out}")
    return 0
