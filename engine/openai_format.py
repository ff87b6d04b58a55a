"""OpenAI's checkpoint format (improved-diffusion, guided-diffusion): their flags, and a folder of them.

A checkpoint of theirs is a state dict of ``UNetModel`` (``models.openai_unet.OpenAIUNet`` loads it
strictly) plus the command-line flags it was trained and sampled with. ``from_flags`` turns the flags
(a dict, as a ``flags.json`` holds them, or the string ``"--image_size 64 --num_channels 128 ..."``)
into the network's constructor arguments, the engine's scheduler config and the sampling request
their sample script would make:

- defaults per codebase (their ``model_and_diffusion_defaults``): improved-diffusion rescales the
  timesteps (``rescale_timesteps`` True: the model sees t * 1000 / diffusion_steps) and has
  ``sigma_small``; guided-diffusion does not rescale and adds ``num_head_channels``, ``channel_mult``,
  ``resblock_updown``, ``use_new_attention_order``, ``use_fp16``. The codebase is the flags' ``codebase``
  ("improved-diffusion" / "guided-diffusion"), else guided-diffusion if a flag only it has is given,
  else improved-diffusion;
- ``diffusion_steps`` -> num_train_timesteps; ``noise_schedule`` "linear" (Ho et al.'s betas scaled
  by 1000 / diffusion_steps, so that any T spans the same alpha-bar range) or "cosine" (Nichol &
  Dhariwal eq. 17, betas capped at 0.999);
- ``predict_xstart`` -> prediction_type "sample" (else "epsilon");
- ``learn_sigma`` -> variance_type "learned_range" (2C output channels; ``rescale_learned_sigmas``
  only weights the training loss); otherwise "fixed_large", or "fixed_small" with ``sigma_small``;
- their sample script's ``clip_denoised`` (default True) -> clip_sample; their DDIM takes eps from
  the clipped x0, which is ``use_clipped_model_output`` True;
- ``timestep_respacing`` ("" = every step, "N", "N1,N2,..." sections, or "ddimN": the timesteps
  ``respaced_timesteps`` keeps) -> the scheduler config's ``timestep_spacing`` as those timesteps
  (``schedules.ExplicitSpacing``: their ``SpacedDiffusion``), so that a request of their step
  count (or of none) with DDPM or DDIM keeps them; "" sets none (every step). With ``use_ddim`` ->
  the request of their sample script (``OpenAIConfig.sample_kwargs``: sampler "ddpm" or "ddim",
  steps, and the explicit spacing). A folder's engine keeps the timesteps and the step count; its
  default sampler is DDPM (``use_ddim``: pass sampler="ddim").

Flags that only train (``lr``, ``use_kl``, ``dropout``, ``use_checkpoint``, ...) or only run their
script (``batch_size``, ``num_samples``, ...) are accepted and change nothing; ``use_fp16`` weights
load into fp32. A flag that changes sampling and is not supported (classifier guidance,
super-resolution, an unknown schedule, an unknown flag) is refused by name.

A folder holds ``flags.json`` (a JSON object of flags, or ``{"flags": "<the flags string>"}``) or
``flags.txt`` (the string), and the weights: the file named by the ``model_path`` flag (its name
inside the folder), else ``model.pt``, else the folder's only ``*.pt``.
"""

from __future__ import annotations

import json
import pickle
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidRequestError, ModelLoadError, quote
from .models.openai_unet import OpenAIUNet
from .schedules import ExplicitSpacing, SchedulerConfig

IMPROVED, GUIDED = "improved-diffusion", "guided-diffusion"
CODEBASES = (IMPROVED, GUIDED)
NUM_CLASSES = 1000  # their class-conditional models are ImageNet's
# their model_and_diffusion_defaults(), per codebase
_COMMON = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
               attention_resolutions="16,8", dropout=0.0, learn_sigma=False, class_cond=False, diffusion_steps=1000,
               noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
               use_checkpoint=False, use_scale_shift_norm=True)
DEFAULTS = {
    IMPROVED: dict(_COMMON, sigma_small=False, rescale_timesteps=True, rescale_learned_sigmas=True),
    GUIDED: dict(_COMMON, num_head_channels=-1, channel_mult="", resblock_updown=False, use_fp16=False,
                 use_new_attention_order=False, rescale_timesteps=False, rescale_learned_sigmas=False),
}
ONLY_IN = {IMPROVED: {"sigma_small"},
           GUIDED: {"num_head_channels", "channel_mult", "resblock_updown", "use_new_attention_order"}}
SAMPLE_DEFAULTS = dict(clip_denoised=True, use_ddim=False, model_path="")  # their image_sample.py
# flags of their training and sampling scripts that do not change what is sampled
IGNORED = {"data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch",
           "ema_rate", "log_interval", "save_interval", "resume_checkpoint", "use_fp16", "fp16_scale_growth",
           "num_samples", "iterations", "anneal_lr", "classifier_use_fp16", "classifier_width", "classifier_depth",
           "classifier_attention_resolutions", "classifier_use_scale_shift_norm", "classifier_resblock_updown",
           "classifier_pool", "codebase"}
REFUSED = {
    "classifier_path": "classifier guidance is not supported: sample without the classifier",
    "classifier_scale": "classifier guidance is not supported: sample without the classifier",
    "large_size": "super-resolution models (a low-resolution image as input) are not supported",
    "small_size": "super-resolution models (a low-resolution image as input) are not supported",
}
CHANNEL_MULT = {  # their create_model's channel_mult per image_size
    IMPROVED: {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
    GUIDED: {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
}


@dataclass(frozen=True)
class OpenAIConfig:
    """What a checkpoint's flags say: the codebase, every flag (defaults filled in), the network's
    constructor arguments, the scheduler config, the sample shape and the request of their script."""

    codebase: str
    flags: dict
    model: dict  # OpenAIUNet(**model)
    scheduler: dict  # SchedulerConfig.from_dict(scheduler)
    sample_shape: tuple  # (C, H, W)
    sampler: str  # "ddpm" (their p_sample_loop) or "ddim" (ddim_sample_loop, eta 0)
    steps: int
    spacing: ExplicitSpacing | None = None  # the timesteps their timestep_respacing keeps (None: every one)

    @property
    def sample_kwargs(self) -> dict:
        """``engine.sample(seeds, **cfg.sample_kwargs)`` samples as their script would."""
        spacing = {} if self.spacing is None else {"spacing": self.spacing}
        return {"sampler": self.sampler, "steps": self.steps, **spacing}

    def build(self) -> OpenAIUNet:
        """The network, randomly initialised."""
        return OpenAIUNet(**self.model).eval()


def parse_flags(text: str) -> dict:
    """``"--image_size 64 --learn_sigma=True"`` -> {"image_size": "64", "learn_sigma": "True"} (strings)."""
    words, flags = shlex.split(text), {}
    for k, word in enumerate(words):
        if not word.startswith("--"):
            if k == 0 or not words[k - 1].startswith("--") or "=" in words[k - 1]:
                raise InvalidRequestError(f"flags string: {quote(word)} is not a --flag or a flag's value")
            continue
        name, eq, value = word[2:].partition("=")
        if not eq:
            if k + 1 == len(words) or words[k + 1].startswith("--"):
                raise InvalidRequestError(f"flags string: --{name} has no value (write --{name} True)")
            value = words[k + 1]
        flags[name] = value
    return flags


def _coerce(name: str, value, default):
    """A flag's value as the type of its default (their argparse's ``str2bool`` for booleans)."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            word = str(value).lower()
            if word in ("yes", "true", "t", "y", "1"):
                return True
            if word in ("no", "false", "f", "n", "0"):
                return False
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(value, (list, tuple)):  # "16,8" written as a JSON list
            return ",".join(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"flag {name}: {quote(value)} is not a {type(default).__name__}") from None


def codebase_of(flags: dict) -> str:
    """The codebase the flags belong to (see the module docstring)."""
    named = flags.get("codebase")
    if named is not None:
        if named not in CODEBASES:
            raise InvalidRequestError(f"codebase {quote(named)} is not one of {CODEBASES}")
        return named
    hits = {c: sorted(ONLY_IN[c] & set(flags)) for c in CODEBASES}
    if hits[IMPROVED] and hits[GUIDED]:
        raise InvalidRequestError(f"the flags mix improved-diffusion's {hits[IMPROVED]} and guided-diffusion's "
                                  f"{hits[GUIDED]}; name the codebase with a \"codebase\" flag")
    return GUIDED if hits[GUIDED] else IMPROVED


def respaced_timesteps(num_timesteps: int, respacing: str) -> np.ndarray:
    """The training timesteps their ``timestep_respacing`` keeps, ascending.

    "" keeps all. "ddimN": the DDIM paper's stride, range(0, T, s) for the smallest s giving N of them.
    "N1,N2,...": T cut into as many near-equal sections (the first T % k one longer), section j keeping
    N_j timesteps at a fractional stride (size - 1) / (N_j - 1) from its start, each rounded (Python's
    round, half to even, of the running sum: that is how their list comes out).
    """
    respacing = str(respacing).strip()
    if not respacing:
        return np.arange(num_timesteps, dtype=np.int64)
    try:
        counts = [int(c) for c in respacing.removeprefix("ddim").split(",")]
    except ValueError:
        raise InvalidRequestError(f"timestep_respacing {quote(respacing)} is not \"\", \"N\", \"N1,N2,...\" or "
                                  "\"ddimN\"") from None
    if respacing.startswith("ddim"):
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == counts[0] and len(counts) == 1:
                return np.arange(0, num_timesteps, stride, dtype=np.int64)
        raise InvalidRequestError(f"timestep_respacing {quote(respacing)}: no integer stride gives exactly "
                                  f"{counts[0]} of {num_timesteps} timesteps")
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for j, count in enumerate(counts):
        section = size + (j < extra)
        if not 1 <= count <= section:
            raise InvalidRequestError(f"timestep_respacing {quote(respacing)}: cannot keep {count} of a section "
                                      f"of {section} timesteps")
        stride, pos = (section - 1) / (count - 1) if count > 1 else 1.0, 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += section
    return np.asarray(sorted(set(kept)), dtype=np.int64)


def from_flags(flags, codebase: str | None = None) -> OpenAIConfig:
    """An ``OpenAIConfig`` from their flags: a dict (values typed or strings) or the flags string."""
    if isinstance(flags, str):
        flags = parse_flags(flags)
    if not isinstance(flags, dict):
        raise InvalidRequestError(f"flags must be a dict or a flags string, got {type(flags).__name__}")
    flags = dict(flags) if codebase is None else dict(flags, codebase=codebase)
    for name in flags:
        if name in REFUSED:
            raise InvalidRequestError(f"flag {name}: {REFUSED[name]}")
    codebase = codebase_of(flags)
    known = dict(DEFAULTS[codebase], **SAMPLE_DEFAULTS)
    unknown = sorted(set(flags) - set(known) - IGNORED)
    if unknown:
        raise InvalidRequestError(f"unknown {codebase} flag(s) {unknown}: this engine does not know what they do "
                                  "to sampling; remove them if they only train")
    f = {name: _coerce(name, flags.get(name, default), default) for name, default in known.items()}

    size = f["image_size"]
    if f.get("channel_mult"):
        channel_mult = tuple(float(m) if "." in m else int(m) for m in f["channel_mult"].split(","))
    elif size in CHANNEL_MULT[codebase]:
        channel_mult = CHANNEL_MULT[codebase][size]
    else:
        raise InvalidRequestError(f"{codebase} has no default channel_mult for image_size {size} (it knows "
                                  f"{sorted(CHANNEL_MULT[codebase])}); pass channel_mult")
    try:
        attention = tuple(size // int(r) for r in f["attention_resolutions"].split(",") if r.strip())
    except (ValueError, ZeroDivisionError):
        raise InvalidRequestError(f"attention_resolutions {quote(f['attention_resolutions'])} is not a list of "
                                  "pixel sizes such as \"16,8\"") from None
    steps_t = f["diffusion_steps"]
    model = dict(image_size=size, in_channels=3, model_channels=f["num_channels"],
                 out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
                 attention_resolutions=attention, dropout=f["dropout"], channel_mult=channel_mult,
                 num_classes=NUM_CLASSES if f["class_cond"] else None, num_heads=f["num_heads"],
                 num_head_channels=f.get("num_head_channels", -1), num_heads_upsample=f["num_heads_upsample"],
                 use_scale_shift_norm=f["use_scale_shift_norm"], resblock_updown=f.get("resblock_updown", False),
                 use_new_attention_order=f.get("use_new_attention_order", False),
                 timestep_scale=1000.0 / steps_t if f["rescale_timesteps"] else 1.0)

    if f["noise_schedule"] == "linear":  # Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T
        scale = 1000 / steps_t
        schedule = dict(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02)
    elif f["noise_schedule"] == "cosine":
        schedule = dict(beta_schedule="cosine")
    else:
        raise InvalidRequestError(f"noise_schedule {quote(f['noise_schedule'])} is not supported: "
                                  "\"linear\" or \"cosine\"")
    if f["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if f.get("sigma_small") else "fixed_large"
    scheduler = dict(num_train_timesteps=steps_t, **schedule, variance_type=variance,
                     prediction_type="sample" if f["predict_xstart"] else "epsilon",
                     clip_sample=f["clip_denoised"], use_clipped_model_output=True)
    kept = respaced_timesteps(steps_t, f["timestep_respacing"])
    spacing = ExplicitSpacing(kept) if f["timestep_respacing"].strip() else None
    if spacing is not None:
        scheduler["timestep_spacing"] = list(spacing.timesteps)
    return OpenAIConfig(codebase, f, model, scheduler, (3, size, size), "ddim" if f["use_ddim"] else "ddpm",
                        len(kept), spacing)


# ---- folders ----

FLAG_FILES = ("flags.json", "flags.txt")


def is_folder(folder: Path) -> bool:
    """Whether ``folder`` holds their flags (``flags.json`` or ``flags.txt``)."""
    return any((Path(folder) / name).is_file() for name in FLAG_FILES)


def read_flags(folder: Path) -> dict:
    """The flags of a folder (see the module docstring), as a dict."""
    folder = Path(folder)
    present = [folder / name for name in FLAG_FILES if (folder / name).is_file()]
    if len(present) != 1:
        raise ModelLoadError(f"{folder} must hold one of {FLAG_FILES} (their flags), found {len(present)}")
    path = present[0]
    try:
        text = path.read_text()
        if path.suffix == ".txt":
            return parse_flags(text)
        flags = json.loads(text)
        if not isinstance(flags, dict):
            raise InvalidRequestError("not a JSON object of flags")
        if isinstance(flags.get("flags"), str):
            flags = dict(parse_flags(flags["flags"]), **{k: v for k, v in flags.items() if k != "flags"})
        return flags
    except (json.JSONDecodeError, UnicodeDecodeError, InvalidRequestError) as exc:
        raise ModelLoadError(f"{path} is not a flags file this engine reads ({exc})") from None


def weights_file(folder: Path, flags: dict) -> Path:
    """The checkpoint: the ``model_path`` flag's file name in the folder, else model.pt, else the only *.pt."""
    folder = Path(folder)
    if flags.get("model_path"):
        path = folder / Path(str(flags["model_path"])).name
        if not path.is_file():
            raise ModelLoadError(f"the model_path flag names {Path(str(flags['model_path'])).name}, which is not in "
                                 f"{folder}")
        return path
    if (folder / "model.pt").is_file():
        return folder / "model.pt"
    found = sorted(folder.glob("*.pt"))
    if len(found) != 1:
        raise ModelLoadError(f"{folder} has {len(found)} *.pt files and no model.pt; name the checkpoint with the "
                             "model_path flag")
    return found[0]


def load_state_dict(path: Path) -> dict:
    """Their checkpoint's tensors, floating ones in float32 (a ``use_fp16`` model's weights may be fp16)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # tensors only: no code runs
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint this engine can read "
                             f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} is not a state dict (a dict of tensors), as their training saves")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_weights(module: OpenAIUNet, state: dict, where) -> None:
    """Strict load; a mismatch says which keys, so the flag that differs can be found."""
    mine = module.state_dict()
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    shapes = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def few(keys):
            return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        raise ModelLoadError(f"the weights in {where} do not fit the network its flags describe: missing "
                             f"{few(missing)}, unexpected {few(unexpected)}, other shape {few(shapes)}; check "
                             "image_size, num_channels, num_res_blocks, attention_resolutions, learn_sigma, "
                             "class_cond, resblock_updown and channel_mult against the flags it was trained with")
    module.load_state_dict(state, strict=True)


def open_folder(folder) -> tuple:
    """(network with the checkpoint's weights, SchedulerConfig, sample shape) of one of their folders."""
    folder = Path(folder)
    flags = read_flags(folder)
    try:
        cfg = from_flags(flags)
    except InvalidRequestError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from None
    try:
        scheduler = SchedulerConfig.from_dict(cfg.scheduler)
    except InvalidRequestError as exc:
        raise ModelLoadError(f"{folder}: its flags ask for {exc}") from None
    module = cfg.build()
    path = weights_file(folder, flags)
    load_weights(module, load_state_dict(path), path)
    return module.eval(), scheduler, cfg.sample_shape
