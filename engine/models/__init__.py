"""Networks that map (x_t, t) to the model output: the seeds' UNet and the DDPM CIFAR-10 UNet."""

from .seed_unet import SeedUNet

__all__ = ["SeedUNet"]
