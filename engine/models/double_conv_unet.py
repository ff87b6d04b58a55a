"""A classic UNet of double-conv blocks with a sinusoidal time embedding, widths configurable
(saved configs name it ``"type": "seed_unet"``; the bundled digits model is one).

Double conv (conv3x3 + BatchNorm + ReLU, twice) at each level, max-pool down, transposed-conv
up, skip connections by concatenation, and a sinusoidal time embedding passed through a small
MLP and added to the input of every level:
- the embedding table is the standard sin/cos one (sin on even, cos on odd channels), a
  non-persistent buffer (not in the saved weights);
- widths and depth come from ``widths`` (default (64, 128, 256, 512, 1024)); the input side must
  be divisible by 2 ** (len(widths) - 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def sinusoidal_embedding(num_timesteps: int, dim: int) -> torch.Tensor:
    """[T, dim] table: emb[t, 2k] = sin(t / 10000^(2k/dim)), emb[t, 2k+1] = cos(same)."""
    t = torch.arange(num_timesteps, dtype=torch.float64).unsqueeze(1)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    emb = torch.zeros(num_timesteps, dim, dtype=torch.float64)
    emb[:, 0::2] = torch.sin(t * freqs)
    emb[:, 1::2] = torch.cos(t * freqs)[:, : dim // 2]
    return emb.float()


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Transposed-conv upsample of the deeper map, then concatenation with the skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up_scale = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = DoubleConv(2 * cout, cout)

    def forward(self, skip, deep):
        return self.conv(torch.cat([self.up_scale(deep), skip], dim=1))


def time_mlp(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.SiLU(), nn.Linear(dim_out, dim_out))


class DoubleConvUNet(nn.Module):
    """forward(x [B, C, H, W], t int64 [B]) -> predicted noise [B, C, H, W]."""

    def __init__(self, in_channels: int = 1, widths=(64, 128, 256, 512, 1024), num_timesteps: int = 1000,
                 time_emb_dim: int = 100):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.config = dict(in_channels=in_channels, widths=list(widths), num_timesteps=num_timesteps,
                           time_emb_dim=time_emb_dim)
        self.register_buffer("time_table", sinusoidal_embedding(num_timesteps, time_emb_dim), persistent=False)
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(DoubleConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.ups = nn.ModuleList(Up(b, a) for a, b in reversed(list(zip(widths[:-1], widths[1:]))))
        self.out = nn.Conv2d(widths[0], in_channels, 1)
        # one time MLP per level input: the encoder inputs (in_channels, widths[:-1]) and the
        # decoder's deeper inputs (widths[-1], ..., widths[1])
        self.te_down = nn.ModuleList(time_mlp(time_emb_dim, c) for c in (in_channels, *widths[:-1]))
        self.te_up = nn.ModuleList(time_mlp(time_emb_dim, c) for c in reversed(widths[1:]))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_table[t]  # [B, D]

        def add_time(h, mlp):
            return h + mlp(emb)[:, :, None, None]

        h = self.inc(add_time(x, self.te_down[0]))
        skips = [h]
        for down, te in zip(self.downs, self.te_down[1:]):
            h = down(F.max_pool2d(add_time(h, te), 2))
            skips.append(h)
        skips.pop()  # the deepest map is h itself
        for up, te in zip(self.ups, self.te_up):
            h = up(skips.pop(), add_time(h, te))
        return self.out(h)
