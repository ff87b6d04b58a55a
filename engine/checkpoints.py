"""Model folders: read and write them.

Formats:
- the project's own: a folder with ``config.json`` ({"format": "ddpm-engine", "model": {"type":
  ..., <constructor kwargs>}, "scheduler": {...}, "sample_shape": [C, H, W]}) and
  ``model.safetensors``;
- diffusers' pipeline folder as ``DDPMPipeline.save_pretrained`` writes it (model_index.json,
  unet/, scheduler/), and the older single folder (config.json of the UNet2DModel beside
  scheduler_config.json and the weights); the scheduler config is honoured (beta schedule,
  variance_type, clip_sample, prediction_type). Needs the optional package diffusers;
- any ``nn.Module`` with ``forward(x, t)`` (or ``forward(x, t, y)``: class labels), given with
  its scheduler config and sample shape; lucidrains' ``GaussianDiffusion`` (denoising-diffusion-pytorch)
  with its ``Unet``, whose schedule, objective, image size and self-conditioning it carries.

A Hugging Face Hub id ("google/ddpm-cifar10-32") resolves through huggingface_hub as in
diffusers: its cache (HF_HOME / HF_HUB_CACHE), HF_HUB_OFFLINE, and a ``revision``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import openai_format
from . import probe
from .errors import InvalidRequestError, ModelLoadError
from .probe import ModelIO
from .schedules import SchedulerConfig

PROJECT_FORMAT = "ddpm-engine"
BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED = {"digits": BUNDLED_DIR / "digits"}


@dataclass
class LoadedModel:
    """A network with everything needed to sample from it, checked once here (``engine.probe``):
    ``module`` is what every backend runs and exports (the network itself, or ``probe.Adapter``
    around it when its output needs normalising), ``io`` what the probe learned (its inputs,
    output channels, labels; the probe's outputs, which every exported graph is compared with).
    A model is probed again when its module is replaced (``dataclasses.replace``)."""

    module: nn.Module
    scheduler: SchedulerConfig
    sample_shape: tuple  # (C, H, W)
    name: str
    weights_hash: str  # sha256 of the weights: keys export caches
    io: ModelIO | None = None  # None: probed now
    num_classes: int | None = None  # the labels' range of a forward(x, t, y) without a num_classes attribute
    null_label: int | None = None  # its "no class" label (classifier-free guidance) without a null_label attribute

    def __post_init__(self):
        if self.io is None or self.io.module_id != id(self.module):
            self.module, self.io = probe.inspect(self.module, self.scheduler, tuple(self.sample_shape),
                                                 self.num_classes, self.name, self.null_label)


def weights_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_module(model_cfg: dict) -> nn.Module:
    from .models import DoubleConvUNet

    kw = dict(model_cfg)
    kind = kw.pop("type", None)
    if kind == "seed_unet":  # the saved name of DoubleConvUNet (kept: saved folders must load)
        return DoubleConvUNet(**kw)
    raise ModelLoadError(f"unknown model type {kind!r} in config.json; known: 'seed_unet'")


def from_module(module: nn.Module, scheduler: SchedulerConfig | dict | None = None, sample_shape=None,
                name: str = "module", num_classes: int | None = None, null_label: int | None = None) -> LoadedModel:
    """Wrap any ``nn.Module`` with ``forward(x, t)`` or ``forward(x, t, class_labels)`` (a diffusers
    UNet2DModel too), or lucidrains' ``GaussianDiffusion`` (no scheduler or sample_shape: it has
    them); ``num_classes``: the labels' range where the module has no ``num_classes``."""
    if not isinstance(module, nn.Module):
        raise InvalidRequestError(f"expected a torch.nn.Module with forward(x, t), got {type(module).__name__}")
    if is_lucidrains_diffusion(module):
        module, scheduler, sample_shape = _from_lucidrains(module, scheduler, sample_shape)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise InvalidRequestError(f"num_classes must be a positive int, got {num_classes!r}")
    if sample_shape is None or len(tuple(sample_shape)) != 3:
        raise InvalidRequestError("pass sample_shape=(C, H, W) with a bare nn.Module")
    if scheduler is None:
        scheduler = SchedulerConfig()
    elif isinstance(scheduler, dict):
        scheduler = SchedulerConfig.from_dict(scheduler)
    module.eval()
    return LoadedModel(module, scheduler, tuple(int(s) for s in sample_shape), name, weights_hash(module),
                       num_classes=num_classes, null_label=null_label)


# lucidrains' GaussianDiffusion objective -> the scheduler config's prediction_type
LUCIDRAINS_OBJECTIVES = {"pred_noise": "epsilon", "pred_x0": "sample", "pred_v": "v_prediction"}


def is_lucidrains_diffusion(module) -> bool:
    """Whether ``module`` is a ``denoising_diffusion_pytorch.GaussianDiffusion`` (read by its
    attributes: the package itself is never imported here)."""
    return all(hasattr(module, a) for a in ("model", "betas", "objective", "image_size", "num_timesteps",
                                            "self_condition"))


def _from_lucidrains(diffusion, scheduler, sample_shape) -> tuple:
    """(its Unet, the scheduler config, the sample shape) of lucidrains' GaussianDiffusion: its
    betas (as trained_betas), objective, image size, channels; clip_sample and
    use_clipped_model_output as its samplers do (x_start clipped, the noise derived again from
    it). Its self_condition comes with the Unet (probe: ``x_self_cond``)."""
    objective = LUCIDRAINS_OBJECTIVES.get(diffusion.objective)
    if objective is None:
        raise ModelLoadError(f"GaussianDiffusion's objective {diffusion.objective!r} is not one of "
                             f"{sorted(LUCIDRAINS_OBJECTIVES)}")
    if type(diffusion).__name__ != "GaussianDiffusion":
        raise ModelLoadError(f"{type(diffusion).__name__} is not lucidrains' GaussianDiffusion (learned-variance, "
                             "continuous-time and elucidated variants sample otherwise); pass its Unet with a "
                             "scheduler config and sample_shape")
    h, w = (diffusion.image_size, diffusion.image_size) if isinstance(diffusion.image_size, int) \
        else tuple(diffusion.image_size)
    shape = (int(diffusion.channels), int(h), int(w))
    if sample_shape is not None and tuple(int(s) for s in sample_shape) != shape:
        raise InvalidRequestError(f"sample_shape={tuple(sample_shape)} differs from the GaussianDiffusion's "
                                  f"(channels, *image_size) = {shape}; leave it out")
    if scheduler is not None:
        raise InvalidRequestError("a GaussianDiffusion carries its own schedule; pass no scheduler")
    cfg = {"num_train_timesteps": int(diffusion.num_timesteps), "trained_betas": diffusion.betas.double().tolist(),
           "prediction_type": objective, "variance_type": "fixed_small", "clip_sample": True,
           "use_clipped_model_output": True, "timestep_spacing": "trailing"}  # its ddim_sample's timesteps
    return diffusion.model, cfg, shape


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); re-save the model") from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is corrupt or not a safetensors file ({exc}); re-save the model") from None


def _load_state(module: nn.Module, state: dict, where: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelLoadError(f"the weights in {where} do not fit the model in its config.json ({first})") from None


def load_project_folder(folder: Path) -> LoadedModel:
    cfg = _read_json(folder / "config.json")
    if cfg.get("format") != PROJECT_FORMAT:
        raise ModelLoadError(f"{folder / 'config.json'} is not a ddpm-engine config (no \"format\": \"ddpm-engine\")")
    try:
        module = build_module(cfg["model"])
        scheduler = SchedulerConfig.from_dict(cfg.get("scheduler", {}))
        sample_shape = tuple(int(s) for s in cfg["sample_shape"])
    except (KeyError, TypeError, InvalidRequestError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is incomplete or invalid ({exc!r})") from None
    _load_state(module, _load_safetensors(folder / "model.safetensors"), folder)
    module.eval()
    return LoadedModel(module, scheduler, sample_shape, cfg.get("name", folder.name), weights_hash(module))


def save_project_folder(folder, module: nn.Module, model_cfg: dict, scheduler: SchedulerConfig, sample_shape,
                        name: str | None = None) -> Path:
    """Write the project's format: config.json + model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"format": PROJECT_FORMAT, "name": name or folder.name, "model": model_cfg,
           "scheduler": scheduler.to_dict(), "sample_shape": list(sample_shape)}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def load(path_or_name, revision: str | None = None) -> LoadedModel:
    """Open a model: a bundled name ("digits"), a folder in any supported format, or a Hugging Face
    Hub id ("google/ddpm-cifar10-32": an "org/name" that is not a local path), resolved through
    huggingface_hub's cache at ``revision`` (a branch, tag or commit; default "main")."""
    if isinstance(path_or_name, LoadedModel):
        return path_or_name
    if isinstance(path_or_name, str) and path_or_name in BUNDLED:
        return load_project_folder(BUNDLED[path_or_name])
    if not isinstance(path_or_name, (str, Path)):
        raise InvalidRequestError(f"expected a model folder path, a Hub id or a bundled name, "
                                  f"got {type(path_or_name).__name__}")
    if is_hub_id(path_or_name):
        return load_folder(hub_snapshot(path_or_name, revision), name=path_or_name)
    folder = Path(path_or_name)
    if not folder.is_dir():
        raise ModelLoadError(f"no model folder at {folder} (bundled models: {sorted(BUNDLED)}; a Hugging Face Hub "
                             "id looks like 'org/name')")
    return load_folder(folder)


def load_folder(folder: Path, name: str | None = None) -> LoadedModel:
    """A model folder in any supported format (see the module docstring)."""
    name = name or folder.name
    layout = folder_layout(folder)
    if layout == "ddpm-engine":
        return load_project_folder(folder)
    if layout == "diffusers-pipeline":
        return load_diffusers_folder(folder / "unet", folder / "scheduler" / "scheduler_config.json", name)
    if layout == "diffusers-single":
        return load_diffusers_folder(folder, folder / "scheduler_config.json", name)
    if layout == "openai":  # improved-/guided-diffusion: *.pt + their flags (openai_format.py)
        return from_module(*openai_format.open_folder(folder), name=name)
    missing = _missing_scheduler_config(folder)
    if missing:
        raise ModelLoadError(missing)
    raise ModelLoadError(f"{folder} holds no model this engine can read: expected config.json + model.safetensors "
                         "(ddpm-engine), a diffusers folder, or OpenAI's *.pt + flags.json")


def folder_layout(folder: Path) -> str | None:
    """"ddpm-engine", "diffusers-pipeline" (model_index.json, unet/, scheduler/), "diffusers-single"
    (a UNet's config.json beside scheduler_config.json), "openai" (improved-/guided-diffusion: flags.json
    or flags.txt beside a *.pt), or None, from the folder's config files."""
    cfg_path = folder / "config.json"
    if cfg_path.is_file() and _read_json(cfg_path).get("format") == PROJECT_FORMAT:
        return "ddpm-engine"
    if (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file():
        return "diffusers-pipeline"
    if cfg_path.is_file() and (folder / "scheduler_config.json").is_file():
        return "diffusers-single"
    return "openai" if openai_format.is_folder(folder) else None


def _missing_scheduler_config(folder: Path) -> str | None:
    """Why a folder that holds a diffusers model's config.json cannot load, or None."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or not ("_diffusers_version" in cfg or "_class_name" in cfg):
        return None
    return (f"{folder} holds a diffusers {cfg.get('_class_name', 'model')} (config.json) but no "
            f"{folder / 'scheduler_config.json'}: the scheduler config (its beta schedule and prediction type) is "
            "missing; save the pipeline with DDPMPipeline.save_pretrained, or write the DDPMScheduler's config "
            "there (scheduler.save_pretrained(folder))")


# ---- Hugging Face Hub ids ----

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HUB_CONFIG_FILES = ["model_index.json", "config.json", "scheduler_config.json", "unet/config.json",
                    "scheduler/scheduler_config.json"]
HUB_WEIGHTS = {  # per layout, in order of preference
    "ddpm-engine": ["model.safetensors"],
    "diffusers-pipeline": ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"],
    "diffusers-single": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"],
}


def is_hub_id(name) -> bool:
    """An "org/name" string that is not a local path (as diffusers' from_pretrained decides)."""
    return isinstance(name, str) and HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a Hub model repo, downloading only what loading needs (the config
    files, then one weights file) into huggingface_hub's cache (HF_HOME / HF_HUB_CACHE) unless it is
    there already; with HF_HUB_OFFLINE=1 the cache alone is used."""
    from .errors import require

    hub = require("huggingface_hub", f"loading {repo_id!r} from the Hugging Face Hub", extra="diffusers")
    from huggingface_hub import errors

    def fetch(rev, patterns) -> Path:
        return Path(hub.snapshot_download(repo_id, revision=rev, allow_patterns=patterns))

    try:
        folder = fetch(revision, HUB_CONFIG_FILES)
        layout = folder_layout(folder)
        if layout is None:
            raise ModelLoadError(f"the Hub repo {repo_id!r} (revision {revision or 'main'}) holds no model this engine "
                                 "can read: expected a DDPMPipeline (model_index.json, unet/, scheduler/) or a "
                                 "UNet2DModel config.json beside scheduler_config.json")
        for weights in HUB_WEIGHTS[layout]:
            folder = fetch(folder.name, [weights])  # folder.name: the snapshot's commit hash
            if (folder / weights).is_file():
                return folder
        raise ModelLoadError(f"the cached snapshot of {repo_id!r} at {folder} has no weights "
                             f"({' or '.join(HUB_WEIGHTS[layout])}); download it where the Hub can be reached")
    except ModelLoadError:  # ours, from above (an OSError too)
        raise
    except errors.RevisionNotFoundError:
        raise ModelLoadError(f"the Hub repo {repo_id!r} has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise ModelLoadError(f"no Hub repo {repo_id!r} (and no local folder of that name); if it is private or "
                             "gated, log in first (`hf auth login`)") from None
    except errors.LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{repo_id!r} is neither a local folder nor in the Hugging Face cache ({hub.constants.HF_HUB_CACHE}), "
            f"and the Hub cannot be reached (HF_HUB_OFFLINE={'1' if hub.constants.HF_HUB_OFFLINE else '0'}). "
            f"Get it where there is network: `hf download {repo_id}` fills that cache (copy it here, or point "
            f"HF_HOME / HF_HUB_CACHE at it), or save it with DDPMPipeline.save_pretrained(folder) and pass the "
            "folder") from None
    except (errors.HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face Hub: {first}") from None


def _sample_shape_from_unet_config(cfg: dict) -> tuple:
    size = cfg.get("sample_size")
    if size is None:
        raise ModelLoadError("the UNet config has no sample_size; cannot tell the image size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg.get("in_channels", 3)), int(h), int(w))


def load_diffusers_folder(unet_dir: Path, scheduler_json: Path, name: str) -> LoadedModel:
    """A diffusers UNet2DModel folder plus its scheduler_config.json."""
    from .errors import require
    from .models.cifar_unet import DiffusersUNet

    diffusers = require("diffusers", f"loading the diffusers folder {unet_dir}", extra="diffusers")
    unet_cfg = _read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ModelLoadError(f"{unet_dir} holds a {unet_cfg.get('_class_name')}; only UNet2DModel is supported")
    sched_cfg = _read_json(scheduler_json)
    try:  # every key honoured or refused there (thresholding, another scheduler's keys, ...)
        scheduler = SchedulerConfig.from_dict(sched_cfg)
    except InvalidRequestError as exc:
        raise ModelLoadError(f"{scheduler_json} is not a scheduler config this engine supports ({exc})") from None
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load the diffusers UNet in {unet_dir}: {first}") from None
    module = DiffusersUNet(unet).eval()
    return LoadedModel(module, scheduler, _sample_shape_from_unet_config(unet_cfg), name, weights_hash(module))
