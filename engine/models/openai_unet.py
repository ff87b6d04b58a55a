"""OpenAI's diffusion UNet (improved-diffusion, guided-diffusion), written from the papers and the flags.

The network of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic Models", sec. 3-4
and appendix A) and Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", sec. 3, the "ADM"
architecture): the DDPM UNet (Ho et al. 2020, appendix B) with

- a sinusoidal time embedding [cos | sin] of width ``model_channels`` (the first half cosines,
  frequencies 10000^(-k / half)), then Linear, SiLU, Linear to ``4 * model_channels``; a class
  embedding (``num_classes``) is added to it;
- ResBlocks: GroupNorm(32), SiLU, conv3x3; the embedding through SiLU, Linear, either added to the
  features or, with ``use_scale_shift_norm`` (the paper's AdaGN), split into (scale, shift) that
  modulate the second GroupNorm: norm(h) * (1 + scale) + shift; SiLU, dropout, conv3x3; a skip
  that is the identity, or a 1x1 (3x3 with ``use_conv``) conv where the width changes;
- ``resblock_updown`` (BigGAN-style): the resampling between levels is a ResBlock whose features and
  skip are resampled (nearest up, 2x2 average down) between its first norm/SiLU and its first conv;
  otherwise a strided conv3x3 down and a nearest upsample followed by a conv3x3 up;
- self-attention at the downsample rates in ``attention_resolutions``, with ``num_heads`` heads, or
  heads of ``num_head_channels`` channels; one 1x1 conv makes q, k, v. The *legacy* order (all of
  improved-diffusion, guided-diffusion unless ``use_new_attention_order``) lays the 3C channels out
  per head as [q | k | v]; the new order lays them out as [q heads | k heads | v heads];
- 2 x C output channels when the model learns its variance (``out_channels``: the flags' learn_sigma).

Parameter names and shapes are theirs, so their state dicts load with strict key matching:
``time_embed.{0,2}``, ``label_emb``, ``input_blocks.N.M``, ``middle_block.{0,1,2}``,
``output_blocks.N.M``, ``out.{0,2}``; inside a ResBlock ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``; inside an attention block ``norm``, ``qkv``, ``proj_out``
(1-D convs); ``op`` (strided conv) and ``conv`` in the plain resamplers. The constructor takes their
``UNetModel``'s arguments; ``use_fp16`` and ``use_checkpoint`` (training options) are accepted and
change nothing: the network runs in the dtype of its weights, fp32 unless the engine casts it.

``forward(x [B, C, H, W], t [B], y [B] labels or None) -> [B, out_channels, H, W]``, t the training
timestep; ``timestep_scale`` multiplies it before the embedding (improved-diffusion's
``rescale_timesteps``: 1000 / diffusion_steps), in float32 as their code does.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidRequestError

NORM_GROUPS = 32  # every GroupNorm of the architecture


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B, dim] = [cos(t f_k) | sin(t f_k)], f_k = max_period^(-k / half), k < half = dim // 2, a zero
    column appended for odd dim. float32 throughout: at t ~ 1000 the argument's rounding is ~1e-4, so
    the embedding of a checkpoint is the one it was trained with only in the same precision."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels)


class TimestepSequential(nn.Sequential):
    """Layers applied in turn; the ResBlocks among them also take the embedding."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class Downsample(nn.Module):
    """Halves H and W: a 3x3 conv of stride 2 (key ``op``), or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Doubles H and W (nearest), then a 3x3 conv (key ``conv``) if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; + the embedding (added, or AdaGN's scale and shift); GroupNorm, SiLU,
    dropout, conv; + the skip. ``up`` / ``down`` resample both paths after the first norm/SiLU."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.resample = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1) * out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3 if use_conv else 1, padding=1 if use_conv else 0)

    def forward(self, x, emb):
        norm_act, conv = self.in_layers[:2], self.in_layers[2]
        if self.updown:
            h = conv(self.resample(norm_act(x)))
            x = self.resample(x)
        else:
            h = conv(norm_act(x))
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = rest(norm(h + emb_out))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, residual: x + proj_out(attention(qkv(norm(x))))."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, new_order: bool = False):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise InvalidRequestError(f"num_head_channels {num_head_channels} does not divide the {channels} "
                                          "channels of an attention block")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise InvalidRequestError(f"num_heads {num_heads} does not divide the {channels} channels of an "
                                      "attention block")
        self.num_heads, self.new_order = num_heads, new_order
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # [B, 3C, T]
        heads, ch, length = self.num_heads, c // self.num_heads, x.shape[-1]
        # q, k, v as [B, heads, T, ch], copied so that ch is the contiguous dimension: the fused
        # attention kernels want it (the CPU's ran far slower on the strided views: docs/openai.md)
        if self.new_order:  # [q of every head | k ... | v ...]
            q, k, v = qkv.reshape(b, 3, heads, ch, length).transpose(-1, -2).contiguous().unbind(1)
        else:  # legacy: per head [q | k | v]
            q, k, v = qkv.reshape(b, heads, 3, ch, length).transpose(-1, -2).contiguous().unbind(2)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(ch)) v, per head
        h = self.proj_out(h.transpose(-1, -2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class OpenAIUNet(nn.Module):
    """OpenAI's ``UNetModel`` (see the module docstring); the arguments are theirs.

    attention_resolutions: the downsample rates (1, 2, 4, ...) with attention, not pixel sizes: the
        flags' "16,8" at image_size 64 is (4, 8) (``openai_format`` converts).
    channel_mult: width of each level in units of model_channels (0.5 allowed, as in their 512x512).
    num_heads_upsample: heads of the decoder's attention (-1: num_heads; ignored with num_head_channels).
    """

    def __init__(self, image_size=None, in_channels=3, model_channels=128, out_channels=3, num_res_blocks=2,
                 attention_resolutions=(), dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, timestep_scale=1.0):
        super().__init__()
        if dims != 2:
            raise InvalidRequestError(f"only 2-D images are supported (dims=2), got dims={dims}")
        del image_size, use_checkpoint, use_fp16  # their bookkeeping / training options
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.model_channels, self.num_classes = model_channels, num_classes
        self.timestep_scale = float(timestep_scale)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(cin, cout=None, **kw):
            return ResBlock(cin, emb_dim, dropout, cout, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(channels, heads):
            return AttentionBlock(channels, heads, num_head_channels, use_new_attention_order)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1  # the widths the decoder concatenates, in order; the downsample rate
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepSequential(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch), attn(ch, num_heads), res(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is None) != (self.num_classes is None):
            raise InvalidRequestError("this model is class-conditional: pass y, one label per sample"
                                      if y is None else "this model is not class-conditional: y must be None")
        t = t.float() * self.timestep_scale if self.timestep_scale != 1.0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
