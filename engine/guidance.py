"""Classifier-free guidance's layout: a guided model call outputs 2B rows for the B rows stepped,
the conditional rows then the unconditional ones (Ho & Salimans 2022). ``guided`` is the
combination's specification (stepping.TorchStep applies it before the reference step; the fused
kernels apply it where they load the output, kernels/common.py::load_output, and are tested
against it); ``conditional_rows`` checks the rows. No step math here: both steps import it.
"""

from __future__ import annotations

import torch

from .errors import InvalidRequestError


def guided(output: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): ``output`` holds the conditional rows
    then the unconditional ones; the prediction is uncond + scale * (cond - uncond). Of a
    learned-variance output (2C channels) only the prediction's C channels are guided, the
    variance is the conditional one's (GLIDE, diffusers). The specification the fused kernels
    are held to."""
    cond, uncond = output.chunk(2)
    pred = torch.lerp(uncond[:, :channels], cond[:, :channels], scale)
    return pred if cond.shape[1] == channels else torch.cat([pred, cond[:, channels:]], dim=1)


def conditional_rows(model_output, x_t, guidance_scale: float = 1.0):
    """The rows of ``model_output`` that line up with ``x_t``'s: all of it without guidance (scale
    1), else the first B of its 2B rows (``guided``'s layout), a view. Host metadata only; an
    output with another number of rows raises InvalidRequestError."""
    if guidance_scale == 1.0:
        return model_output
    B = x_t.shape[0]
    if not isinstance(model_output, torch.Tensor) or model_output.ndim < 1 or model_output.shape[0] != 2 * B:
        got = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise InvalidRequestError(f"with classifier-free guidance the model output holds {2 * B} rows for {B} rows "
                                  f"stepped (the conditional rows, then the unconditional ones), got {got}")
    return model_output[:B]
