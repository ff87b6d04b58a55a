"""Networks that map (x_t, t) to the model output: a double-conv UNet (engine/models/double_conv_unet.py)
and the DDPM CIFAR-10 UNet (engine/models/cifar_unet.py, needs diffusers)."""

from .double_conv_unet import DoubleConvUNet

SeedUNet = DoubleConvUNet  # its earlier name, still public (the README's and users' code)

__all__ = ["DoubleConvUNet", "SeedUNet"]
