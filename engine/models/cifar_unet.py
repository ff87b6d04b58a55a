"""The DDPM paper's CIFAR-10 UNet: diffusers' ``UNet2DModel`` with the google/ddpm-cifar10-32 config.

Needs the optional package diffusers (pip install 'ddpm-engine[diffusers]').
"""

from __future__ import annotations

from torch import nn

from ..errors import require

# google/ddpm-cifar10-32's unet/config.json (35.7 M parameters)
CIFAR10_UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
# google/ddpm-cifar10-32's scheduler/scheduler_config.json
CIFAR10_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}


class DiffusersUNet(nn.Module):
    """Adapts a diffusers ``UNet2DModel`` to the engine's ``forward(x, t[, class_labels]) ->
    output``: a class-conditional UNet (``num_class_embeds``) takes its labels as the third input
    (export.iospec's ``class_labels``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, class_labels=None):
        return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]


def diffusers_unet(config: dict) -> DiffusersUNet:
    """A randomly initialised UNet2DModel from a diffusers config dict."""
    diffusers = require("diffusers", "the diffusers UNet2DModel", extra="diffusers")
    return DiffusersUNet(diffusers.UNet2DModel(**config))


def cifar10_unet(seed: int | None = 0) -> DiffusersUNet:
    """The DDPM CIFAR-10 UNet with random weights (latency does not depend on them)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    return diffusers_unet(CIFAR10_UNET_CONFIG).eval()
