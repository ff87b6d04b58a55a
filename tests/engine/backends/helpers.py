"""What the backend tests share: a small SeedUNet with non-trivial BatchNorm statistics (so folding
them into the exported graph is exercised) and the error measures."""

import random

import torch

from ddpm_engine.checkpoints import from_module
from ddpm_engine.models import SeedUNet

SHAPE = (1, 8, 8)


def small_model(widths=(8, 16), shape=SHAPE, name="small"):
    """A ``LoadedModel`` of a SeedUNet at random weights (drawn from the test's seed)."""
    torch.manual_seed(random.getrandbits(31))
    module = SeedUNet(shape[0], widths).eval()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return from_module(module, {"clip_sample": True}, shape, name=name)


def rel_err(a, b) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def max_rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    return float((a - b).abs().max() / b.abs().max())
