"""Fused Triton kernels for the per-step posterior update (see ddpm_step.py, ddim_step.py)."""
