"""Reused deep features: ``cache_interval=N`` (DeepCache, Ma et al. 2024, arXiv 2312.00858).

Between adjacent reverse steps a UNet's deep features change little (the paper's fig. 2); its
shallow skip branch carries the detail that changes. So the network runs whole every N steps (a
*full* step) and keeps its deep features, and the N - 1 steps after it run only the *shallow*
branch on the cached ones (the paper's eq. 4-5, with m = 1, its "skip branch" at the shallowest
level):

- full step ``full(x, t, *extra) -> (output, deep)``: the whole UNet, computed exactly as the
  eager module computes it, also returning ``deep``, the input the shallowest up block takes
  from the deep path (the paper's cached F_up^{m+1});
- shallow step ``shallow(x, t, deep, *extra) -> output``: the time embedding, the input
  convolution and the rest of the first level's encoder (the skips the shallowest up block
  reads: diffusers' first down block, OpenAI's first-level ResBlocks, none more for the
  double-conv UNet), the shallowest up block on the cached ``deep``, and the output head.

``split(module)`` gives the pair (a ``Split``) for each architecture the engine can split:
diffusers' ``UNet2DModel`` (``DiffusersSplit``), the double-conv UNet of engine/models
(``DoubleConvSplit``: the bundled digits model) and OpenAI's UNet (``OpenAISplit``); any other
module is refused (``refusal`` says why). Each split reads the module's own submodules, so a
backend's cast or moved copy splits as it is; ``FullGraph`` and ``ShallowGraph`` are the two
halves as modules, for the exporters (export/onnx_export.py, the graph ``deep_cache`` names).

State and schedule:

- a row's cached features are its own state, ``stepping.Rows.deep`` [B, k * C_d, H_d, W_d]
  (float32, zeros at the start; k = 2 under classifier-free guidance: the conditional and the
  unconditional row's features side by side along the channels, ``fold`` / ``unfold``), so they
  move with their row when batches are repacked;
- which step is full is decided on the host, never read back from the device: a ``Cadence`` per
  running batch makes the first step after it (re)starts full, then every N-th. The eager loop
  starts one per run; the serving batches (engine/slots.py) restart theirs whenever rows join, so
  a batch with a fresh row always runs a full step, and the rows already there only refresh
  their cache early.

``call(backend, deep, full, x, t, *extra)`` is the one place the model call takes this path
(``plan.model_output``): with ``deep`` None (N = 1) it is the plain backend call.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InvalidRequestError


def check_interval(cache_interval) -> int:
    """A request's ``cache_interval``: an int >= 1 (1: every step is full, the feature is off)."""
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise InvalidRequestError(f"cache_interval must be an int >= 1 (1: off; N: the whole UNet every N steps, "
                                  f"its shallow branch in between), got {cache_interval!r}")
    return cache_interval


class Cadence:
    """Which steps of one running batch are full, on the host: the first after ``restart``, then
    every ``interval``-th (full, N - 1 shallow, full, ...)."""

    def __init__(self, interval: int):
        self.interval = interval
        self.age: int | None = None  # shallow steps since the last full one; None: a full step is due

    def restart(self) -> None:
        """Fresh rows joined (their cache is empty): the next step is full."""
        self.age = None

    def next(self) -> bool:
        """Whether the step about to run is full; counts it."""
        full = self.age is None or self.age >= self.interval - 1
        self.age = 0 if full else self.age + 1
        return full


# ---- the per-row cache ---------------------------------------------------------------------------
def fold(deep: torch.Tensor, rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """A model call's deep features [k * rows, C, H, W] (k calls' worth: guidance's conditional then
    unconditional rows) as one row each: [rows, k * C, H, W]; written into ``out`` (no allocation)
    if given."""
    k = deep.shape[0] // rows
    if out is None:
        return deep if k == 1 else torch.cat(deep.chunk(k), dim=1)
    out.unflatten(1, (k, -1)).copy_(deep.unflatten(0, (k, rows)).transpose(0, 1))
    return out


def unfold(deep: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of ``fold`` for a model call of ``batch`` rows."""
    k = batch // deep.shape[0]
    return deep if k == 1 else torch.cat(deep.chunk(k, dim=1), dim=0)


def call(backend, deep: torch.Tensor | None, full: bool, x, t, *extra) -> torch.Tensor:
    """The model output of one call: the plain backend call when ``deep`` is None (no cache);
    else a full step that refreshes ``deep`` (the rows' cache, in place) or a shallow step that
    reads it. No host work."""
    if deep is None:
        return backend(x, t, *extra)
    if full:
        out, new = backend.full(x, t, *extra)
        fold(new, deep.shape[0], out=deep)
        return out
    return backend.shallow(x, t, unfold(deep, x.shape[0]), *extra)


# ---- the splits ----------------------------------------------------------------------------------
class Split(nn.Module):
    """A UNet's full/shallow pair (module docstring); ``forward`` is the full step's output."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def full(self, x, t, *extra) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def shallow(self, x, t, deep, *extra) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, t, *extra):
        return self.full(x, t, *extra)[0]


class DoubleConvSplit(Split):
    """engine/models/double_conv_unet.py: the shallowest up block (``ups[-1]``) reads the input
    level's map (``inc``) and, from the deep path, the map of the up block below it (or of the
    bottleneck); its time embedding is added in the shallow step, at the current t."""

    @staticmethod
    def refusal(net) -> str | None:
        return "it has a single level (widths of length 1): no deep path to cache" if len(net.ups) < 1 else None

    def _head(self, x, t):
        net = self.module
        emb = net.time_table[t]
        h = net.inc(x + net.te_down[0](emb)[:, :, None, None])
        return net, emb, h

    def _tail(self, net, emb, skip, deep):
        deep = deep + net.te_up[-1](emb)[:, :, None, None]
        return net.out(net.ups[-1](skip, deep))

    def full(self, x, t):
        net, emb, h = self._head(x, t)
        skips = [h]
        for down, te in zip(net.downs, net.te_down[1:]):
            h = down(nn.functional.max_pool2d(h + te(emb)[:, :, None, None], 2))
            skips.append(h)
        skips.pop()
        for up, te in zip(net.ups[:-1], net.te_up[:-1]):
            h = up(skips.pop(), h + te(emb)[:, :, None, None])
        return self._tail(net, emb, skips.pop(), h), h

    def shallow(self, x, t, deep):
        net, emb, h = self._head(x, t)
        return self._tail(net, emb, h, deep)


class DiffusersSplit(Split):
    """diffusers' ``UNet2DModel`` (through ``DiffusersUNet``), its forward step by step: the
    shallowest up block (``up_blocks[-1]``) reads ``conv_in``'s map and the first down block's
    res samples, and from the deep path the output of ``up_blocks[-2]``."""

    @staticmethod
    def refusal(unet) -> str | None:
        blocks = [*unet.down_blocks, *unet.up_blocks]
        if any(hasattr(b, "skip_conv") for b in blocks):
            return "its skip blocks (AttnSkipDownBlock2D / SkipUpBlock2D) carry a second skip path"
        if len(unet.up_blocks) < 2:
            return "it has a single up block: no deep path to cache"
        if len(unet.up_blocks[-1].resnets) > 1 + len(unet.down_blocks[0].resnets):
            return "its shallowest up block reads skips from below the first down block"
        return None

    def _embedding(self, unet, sample, timestep, class_labels):
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timestep * torch.ones(sample.shape[0], dtype=timestep.dtype, device=timestep.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            if unet.config.class_embed_type == "timestep":
                class_labels = unet.time_proj(class_labels)
            emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
        return sample, timesteps, emb

    def _tail(self, unet, sample, res, emb, timesteps):
        sample = unet.up_blocks[-1](sample, res[:len(unet.up_blocks[-1].resnets)], emb)
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        if unet.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))
        return sample

    def full(self, x, t, class_labels=None):
        unet = self.module.unet
        sample, timesteps, emb = self._embedding(unet, x, t, class_labels)
        sample = unet.conv_in(sample)
        res = (sample,)
        for block in unet.down_blocks:
            sample, more = block(hidden_states=sample, temb=emb)
            res += more
        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb)
        for block in unet.up_blocks[:-1]:
            n = len(block.resnets)
            sample, res = block(sample, res[-n:], emb), res[:-n]
        return self._tail(unet, sample, res, emb, timesteps), sample

    def shallow(self, x, t, deep, class_labels=None):
        unet = self.module.unet
        sample, timesteps, emb = self._embedding(unet, x, t, class_labels)
        sample = unet.conv_in(sample)
        _, more = unet.down_blocks[0](hidden_states=sample, temb=emb)
        return self._tail(unet, deep, (sample, *more), emb, timesteps)


class OpenAISplit(Split):
    """engine/models/openai_unet.py: the first level's output blocks (the last ``j`` of them, ``j``
    = the input convolution plus the first level's ResBlocks) read those input blocks' maps, and
    from the deep path the output of the output block before them."""

    @staticmethod
    def first_down(net) -> int | None:
        """The index of the first downsampling input block (= j), or None."""
        from .models.openai_unet import Downsample, ResBlock

        for k, block in enumerate(net.input_blocks):
            if any(isinstance(m, Downsample) or (isinstance(m, ResBlock) and m.updown) for m in block):
                return k
        return None

    @classmethod
    def refusal(cls, net) -> str | None:
        return "it has a single level (no downsampling): no deep path to cache" if cls.first_down(net) is None else None

    def _embedding(self, net, t, y):
        from .models.openai_unet import timestep_embedding

        if (y is None) != (net.num_classes is None):
            raise InvalidRequestError("this model is class-conditional: pass y, one label per sample"
                                      if y is None else "this model is not class-conditional: y must be None")
        t = t.float() * net.timestep_scale if net.timestep_scale != 1.0 else t
        emb = net.time_embed(timestep_embedding(t, net.model_channels))
        return emb + net.label_emb(y) if y is not None else emb

    def _tail(self, net, h, hs, emb):
        for block in net.output_blocks[len(net.output_blocks) - len(hs):]:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return net.out(h)

    def full(self, x, t, y=None):
        net, j = self.module, self.first_down(self.module)
        emb = self._embedding(net, t, y)
        hs, h = [], x
        for block in net.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = net.middle_block(h, emb)
        for block in net.output_blocks[:len(net.output_blocks) - j]:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self._tail(net, h, hs, emb), h

    def shallow(self, x, t, deep, y=None):
        net, j = self.module, self.first_down(self.module)
        emb = self._embedding(net, t, y)
        hs, h = [], x
        for block in net.input_blocks[:j]:
            h = block(h, emb)
            hs.append(h)
        return self._tail(net, deep, hs, emb)


SPLITTABLE = "diffusers' UNet2DModel, ddpm_engine's DoubleConvUNet (the bundled digits model) or OpenAIUNet"


def _split_class(module: nn.Module):
    """(the Split class for ``module``, the network its refusal reads) or (None, None)."""
    from .models.cifar_unet import DiffusersUNet
    from .models.double_conv_unet import DoubleConvUNet
    from .models.openai_unet import OpenAIUNet

    if isinstance(module, DiffusersUNet):
        return DiffusersSplit, module.unet
    if isinstance(module, DoubleConvUNet):
        return DoubleConvSplit, module
    if isinstance(module, OpenAIUNet):
        return OpenAISplit, module
    return None, None


def refusal(module: nn.Module) -> str | None:
    """Why ``module`` (a backend's, as ``checkpoints.LoadedModel.module`` gives it) cannot be split
    into the full/shallow pair, or None."""
    cls, net = _split_class(module)
    if cls is None:
        return (f"cache_interval needs a UNet the engine can split ({SPLITTABLE}); this model is a "
                f"{type(module).__name__}")
    why = cls.refusal(net)
    return None if why is None else f"cache_interval cannot split this {type(net).__name__}: {why}"


def split(module: nn.Module) -> Split:
    """The full/shallow pair of ``module`` (sharing its parameters); InvalidRequestError if it
    cannot be split (``refusal``)."""
    why = refusal(module)
    if why is not None:
        raise InvalidRequestError(why)
    return _split_class(module)[0](module).train(module.training)  # a mode change must not reach module


class FullGraph(nn.Module):
    """The full step as a module for an exporter: forward(x, t, *extra) -> (output, deep)."""

    def __init__(self, pair: Split):
        super().__init__()
        self.pair = pair

    def forward(self, x, t, *extra):
        return self.pair.full(x, t, *extra)


class ShallowGraph(nn.Module):
    """The shallow step as a module for an exporter: forward(x, t, *extra, deep) -> output (the
    deep features last: export.iospec's order)."""

    def __init__(self, pair: Split):
        super().__init__()
        self.pair = pair

    def forward(self, x, t, *extra_then_deep):
        *extra, deep = extra_then_deep
        return self.pair.shallow(x, t, deep, *extra)


def check_pair(backend, module: nn.Module, io, tolerance: float, what: str) -> None:
    """Compare ``backend``'s full and shallow steps (its exported pair) with the eager split of
    ``module`` on the load probe's first batch; ModelLoadError naming ``what`` past
    ``tolerance`` (relative L2, as ``probe.check_graph``)."""
    from .errors import ModelLoadError
    from .probe import relative_error

    x, t, *extra = io.graph_probes()[0][:-1]
    pair = split(module)
    with torch.inference_mode():
        out, deep = pair.full(x, t, *extra)
        shallow = pair.shallow(x, t, deep, *extra)
        got_out, got_deep = backend.run_full(x, t, *extra)
        got_shallow = backend.run_shallow(x, t, deep, *extra)
    for name, got, want in (("full step", got_out, out), ("deep features", got_deep, deep),
                            ("shallow step", got_shallow, shallow)):
        err = relative_error(got.cpu(), want)
        if not err <= tolerance:
            raise ModelLoadError(f"{what}: its {name} differs from the eager module's by {err:.3g} (relative L2, "
                                 f"tolerance {tolerance:g}); delete the cached graphs and retry, or use "
                                 "backend='torch' for cache_interval")


def checked(backend, pair: dict, what: str) -> dict:
    """``pair`` (an exporting backend's opened full/shallow graphs) as ``backend._pair``, kept only if
    ``check_pair`` finds it matches the eager split at the backend's precision (probe.GRAPH_TOLERANCE);
    else the ModelLoadError, and the next request opens it again."""
    from .errors import ModelLoadError
    from .probe import GRAPH_TOLERANCE

    backend._pair = pair
    try:
        check_pair(backend, backend.loaded.module, backend.loaded.io, GRAPH_TOLERANCE[backend.precision], what)
    except ModelLoadError:
        backend._pair = None
        raise
    return pair
