"""OpenAI's UNet and checkpoint format (engine/models/openai_unet.py, engine/openai_format.py).

Two kinds of tests:
- everywhere: the key layout of each published checkpoint's flags against a committed list of
  names and shapes (tests/data/openai_unet_keys/<config>.json, written from their code by
  ``python -m tests.engine.test_openai_unet --keys``), the flags' mapping, the attention orders,
  folders and their refusals;
- where their code is importable (``improved_diffusion`` / ``guided_diffusion`` on the path, or a
  checkout named by IMPROVED_DIFFUSION_PATH / GUIDED_DIFFUSION_PATH; skipped otherwise, as in CI):
  strict loads both ways and the network's outputs within 1e-5 for the same random weights, their
  schedules and respacing, and their ``ddim_sample_loop`` / ``p_sample_loop`` against
  ``engine.sample`` from the same noise. ``python -m tests.engine.test_openai_unet --record FILE``
  writes the figures (bench/results/*-openai-unet-parity.json).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_engine import Engine
from ddpm_engine.backends.torch_backend import TorchBackend
from ddpm_engine.errors import InvalidRequestError, ModelLoadError
from ddpm_engine.models.openai_unet import AttentionBlock, OpenAIUNet, timestep_embedding
from ddpm_engine.noise import philox_normal, seed_words
from ddpm_engine.openai_format import from_flags, parse_flags, respaced_timesteps
from ddpm_engine.samplers import SAMPLERS
from ddpm_engine.schedules import ExplicitSpacing, SchedulerConfig, spaced_timesteps
from ddpm_engine.threads import yield_cpu_to

KEYS_DIR = Path(__file__).resolve().parents[1] / "data" / "openai_unet_keys"
# the flags their READMEs give for the published checkpoints (model and diffusion flags)
CONFIGS = {
    "improved-cifar10": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                        "--diffusion_steps 4000 --noise_schedule cosine",
    "improved-imagenet64": "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                           "--diffusion_steps 4000 --noise_schedule cosine",
    "improved-lsun256": "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
                        "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 "
                        "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
    "guided-imagenet64-cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                              "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                              "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                              "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
    "guided-lsun-bedroom256": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
                              "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear "
                              "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
                              "--use_fp16 True --use_scale_shift_norm True",
}
SMALL = {"num_channels": "32", "num_head_channels": "16"}  # forward parity at small widths (2 shared cores)


def small(flags: str) -> str:
    """The same flags at num_channels 32 (and heads of 16 channels where heads are sized)."""
    f = parse_flags(flags)
    f.update({k: v for k, v in SMALL.items() if k == "num_channels" or k in f})
    return " ".join(f"--{k} {v}" for k, v in f.items())


def key_layout(module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def on_meta(build):
    with torch.device("meta"):
        return build()


# ---- everywhere ----

@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_published_config_has_their_key_layout(config):
    """Our network built from the flags has exactly their parameter names and shapes (construction
    only, on the meta device: the 256x256 ones are 550M parameters)."""
    want = json.loads((KEYS_DIR / f"{config}.json").read_text())
    assert want["flags"] == CONFIGS[config]
    ours = key_layout(on_meta(from_flags(CONFIGS[config]).build))
    assert ours == want["keys"]


def test_the_flags_map_onto_the_scheduler_config():
    cifar = from_flags(CONFIGS["improved-cifar10"])
    assert cifar.codebase == "improved-diffusion"
    assert cifar.scheduler == dict(num_train_timesteps=4000, beta_schedule="cosine", variance_type="learned_range",
                                   prediction_type="epsilon", clip_sample=True, use_clipped_model_output=True)
    assert cifar.model["timestep_scale"] == 0.25  # improved-diffusion rescales t to 0..1000 by default
    assert cifar.model["out_channels"] == 6 and cifar.model["channel_mult"] == (1, 2, 2, 2)
    assert cifar.model["attention_resolutions"] == (2, 4)  # "16,8" at 32 pixels
    assert cifar.sample_shape == (3, 32, 32) and cifar.sample_kwargs == {"sampler": "ddpm", "steps": 4000}

    lsun = from_flags(CONFIGS["guided-lsun-bedroom256"])
    assert lsun.codebase == "guided-diffusion" and lsun.model["timestep_scale"] == 1.0
    assert lsun.model["attention_resolutions"] == (8, 16, 32) and lsun.model["num_head_channels"] == 64
    # learn_sigma False: their fixed variance is beta_t ("fixed_large") unless improved's sigma_small
    assert from_flags("--learn_sigma False").scheduler["variance_type"] == "fixed_large"
    assert from_flags("--sigma_small True").scheduler["variance_type"] == "fixed_small"
    assert from_flags("--predict_xstart True").scheduler["prediction_type"] == "sample"
    assert from_flags({"clip_denoised": False}).scheduler["clip_sample"] is False


@pytest.mark.parametrize("steps", [1000, 4000, 250])
def test_their_linear_schedule_is_ho_et_al_scaled_by_1000_over_t(steps):
    """1e-4 .. 0.02 at T = 1000; at other T both ends scale by 1000 / T, so alpha-bar spans the same range."""
    cfg = SchedulerConfig.from_dict(dict(from_flags(f"--diffusion_steps {steps} --learn_sigma False").scheduler))
    betas = cfg.betas()
    assert len(betas) == steps
    assert math.isclose(betas[0], 1e-4 * 1000 / steps, rel_tol=1e-12)
    assert math.isclose(betas[-1], 0.02 * 1000 / steps, rel_tol=1e-12)
    assert np.allclose(np.diff(betas), (betas[-1] - betas[0]) / (steps - 1), rtol=1e-9)


def test_the_codebase_comes_from_the_flags():
    assert from_flags("--image_size 64").codebase == "improved-diffusion"
    assert from_flags("--resblock_updown True").codebase == "guided-diffusion"
    assert from_flags({"codebase": "guided-diffusion"}).model["timestep_scale"] == 1.0
    assert from_flags("--diffusion_steps 4000").model["timestep_scale"] == 0.25
    with pytest.raises(InvalidRequestError, match="mix"):
        from_flags("--sigma_small True --resblock_updown True")
    with pytest.raises(InvalidRequestError, match="no default channel_mult for image_size 32"):
        from_flags("--image_size 32", codebase="guided-diffusion")
    assert from_flags("--image_size 32 --channel_mult 1,2,2").model["channel_mult"] == (1, 2, 2)


@pytest.mark.parametrize("flags, names", [
    ("--classifier_scale 1.0", "classifier_scale"),
    ("--classifier_path models/64x64_classifier.pt", "classifier_path"),
    ("--large_size 256 --small_size 64", "large_size"),
    ("--noise_schedule quadratic", "noise_schedule 'quadratic'"),
    ("--use_ddpm_magic True", "use_ddpm_magic"),
    ("--learn_sigma maybe", "learn_sigma"),
    ("--timestep_respacing ddim600 --diffusion_steps 1000", "no integer stride gives exactly 600"),
    ("--timestep_respacing 5,600", "cannot keep 600"),
])
def test_a_flag_that_changes_sampling_and_is_not_supported_is_refused_by_name(flags, names):
    with pytest.raises(InvalidRequestError, match=names):
        from_flags(flags)


def test_flags_that_only_train_or_run_their_script_change_nothing():
    plain = from_flags(CONFIGS["improved-imagenet64"])
    busy = from_flags(CONFIGS["improved-imagenet64"] + " --lr 1e-4 --batch_size 128 --use_kl True --num_samples 8 "
                      "--schedule_sampler loss-second-moment --rescale_learned_sigmas False --dropout 0.5")
    assert (busy.scheduler, busy.sample_shape, busy.sample_kwargs) == (plain.scheduler, plain.sample_shape,
                                                                       plain.sample_kwargs)
    assert {k: v for k, v in busy.model.items() if k != "dropout"} == \
        {k: v for k, v in plain.model.items() if k != "dropout"}


def test_respacing_keeps_their_timesteps_explicitly():
    """Every respacing maps onto its own kept timesteps (an explicit spacing): in the request of their
    script and in the scheduler config, so that a folder's engine keeps them too."""
    plain = from_flags("--use_ddim True --diffusion_steps 100")
    assert plain.sample_kwargs == {"sampler": "ddim", "steps": 100} and "timestep_spacing" not in plain.scheduler
    for respacing, sampler in [("ddim50", "ddpm"), ("ddim25", "ddim"), ("1000", "ddpm"), ("250", "ddpm"),
                               ("250", "ddim"), ("10,15,20", "ddim")]:
        cfg = from_flags(f"--timestep_respacing {respacing}" + (" --use_ddim True" if sampler == "ddim" else ""))
        kept = respaced_timesteps(1000, respacing)
        assert cfg.sample_kwargs == {"sampler": sampler, "steps": len(kept), "spacing": ExplicitSpacing(kept)}
        assert cfg.scheduler["timestep_spacing"] == kept.tolist()
        assert SchedulerConfig.from_dict(cfg.scheduler).timestep_spacing == ExplicitSpacing(kept)
    # "250": their even fractional stride ends on 999, where the engine's leading spacing ends on 996
    assert from_flags("--timestep_respacing 250").spacing.timesteps[-2:] == (995, 999)
    # their stride 34 keeps 30 (0 .. 986), where the engine's leading spacing keeps 0 .. 957
    assert from_flags("--timestep_respacing ddim30 --use_ddim True").spacing.timesteps[-1] == 986


def test_an_explicit_spacing_is_checked_and_named_shortly():
    assert ExplicitSpacing({30, 0, 10}).timesteps == (0, 10, 30) == ExplicitSpacing(np.array([30, 10, 0])).timesteps
    assert ExplicitSpacing(range(0, 1000, 4)) == ExplicitSpacing(list(range(996, -1, -4)))  # diffusers' order too
    assert str(ExplicitSpacing(range(0, 1000, 4))) == "explicit[0, 4, 8, ..., 992, 996]"
    for bad in ([], [1, 1], [-1, 3], [0.5, 2], [True, 2], "10,20", [[0, 1]], 7.5):
        with pytest.raises(InvalidRequestError, match="distinct integers"):
            ExplicitSpacing(bad)
    with pytest.raises(InvalidRequestError, match="keeps 3 timesteps.*steps=4"):
        spaced_timesteps(10, 4, ExplicitSpacing([0, 5, 9]))
    with pytest.raises(InvalidRequestError, match="t = 10, past .* T - 1 = 9"):
        spaced_timesteps(10, 3, ExplicitSpacing([0, 5, 10]))
    with pytest.raises(InvalidRequestError, match="past"):
        SchedulerConfig(num_train_timesteps=10, timestep_spacing=[0, 5, 10])
    cfg = SchedulerConfig(num_train_timesteps=10, timestep_spacing=(9, 0, 5))
    assert cfg.to_dict()["timestep_spacing"] == [0, 5, 9] and SchedulerConfig.from_dict(cfg.to_dict()) == cfg


def tiny_engine() -> Engine:
    module = from_flags(TINY).build()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return Engine.from_module(module, scheduler=from_flags(TINY).scheduler, sample_shape=(3, 32, 32),
                              backend="torch", batching=False)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_explicit_timesteps_sample_as_the_named_spacing_that_keeps_them(sampler, spacing, test_seed):
    """DDIM steps to the next kept timestep; diffusers' DDIM at "trailing" and "linspace" steps T // steps
    back, which can fall between them: there only the DDPM tables are the same."""
    engine = tiny_engine()
    named = engine.plan(sampler, steps=7, spacing=spacing)
    explicit = engine.plan(sampler, spacing=list(named.tables.timesteps))
    assert explicit.steps == 7 and explicit.spacing == ExplicitSpacing(named.tables.timesteps)
    assert explicit.name.startswith(f"{sampler}-7 explicit[")
    for column in ("alphas_cumprod", "betas", "posterior_mean_coef1", "posterior_log_variance_clipped",
                   "large_log_variance"):
        assert np.array_equal(getattr(explicit.tables, column), getattr(named.tables, column)), column
    if sampler == "ddpm" or spacing == "leading":
        seeds = [test_seed, test_seed + 1]
        assert torch.equal(engine.sample(seeds, sampler=sampler, spacing=explicit.spacing),
                           engine.sample(seeds, sampler=sampler, steps=7, spacing=spacing))


def test_every_sampler_takes_explicit_timesteps(test_seed):
    engine = tiny_engine()
    kept = respaced_timesteps(100, "2,3")  # their sections: 0, 49 and 50, 74, 99
    for sampler in SAMPLERS:
        images = engine.sample([test_seed], sampler=sampler, spacing=kept)
        assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all(), sampler
        assert engine.plan(sampler, spacing=kept).tables.timesteps.tolist() == kept.tolist()
    with pytest.raises(InvalidRequestError, match="keeps 5 timesteps.*steps=4"):
        engine.sample([test_seed], sampler="ddim", steps=4, spacing=kept)


def test_a_respaced_folder_samples_their_timesteps_by_default(tmp_path, test_seed):
    """from_pretrained keeps their respacing: the default request (DDPM) and DDIM without steps keep their
    timesteps; another step count takes the sampler's own spacing; other samplers are not affected."""
    save_folder(tmp_path / "m", TINY + " --timestep_respacing 3,4 --use_ddim True")
    engine = Engine.from_pretrained(tmp_path / "m", backend="torch", batching=False)
    kept = respaced_timesteps(100, "3,4")
    assert engine.scheduler.timestep_spacing == ExplicitSpacing(kept)
    for sampler in (None, "ddpm", "ddim"):
        assert engine.plan(sampler).tables.timesteps.tolist() == kept.tolist(), sampler
    for sampler in ("ddpm", "ddim"):
        assert engine.plan(sampler, steps=len(kept)).spacing == ExplicitSpacing(kept)
    assert engine.plan("ddim", steps=10).spacing == "leading" and engine.plan("dpmpp_2m").spacing == "linspace"
    cfg = from_flags(TINY + " --timestep_respacing 3,4 --use_ddim True")
    assert torch.equal(engine.sample([test_seed], sampler="ddim"), engine.sample([test_seed], **cfg.sample_kwargs))


def test_respaced_timesteps_follow_their_sections():
    """Their docstring's example: 300 timesteps, sections [10, 15, 20]: each hundred keeps that many,
    from its first to its last timestep."""
    kept = respaced_timesteps(300, "10,15,20")
    assert len(kept) == 45
    for start, count in [(0, 10), (100, 15), (200, 20)]:
        part = kept[(kept >= start) & (kept < start + 100)]
        assert len(part) == count and part[0] == start and part[-1] == start + 99
    assert list(respaced_timesteps(100, "ddim10")) == list(range(0, 100, 10))
    assert list(respaced_timesteps(10, "")) == list(range(10))


def test_the_flags_string_reads_as_their_argparse_does():
    assert parse_flags("--image_size 64 --learn_sigma=True  --attention_resolutions '32,16,8'") == \
        {"image_size": "64", "learn_sigma": "True", "attention_resolutions": "32,16,8"}
    for bad in ("--image_size", "64 --image_size 64", "--a 1 2"):
        with pytest.raises(InvalidRequestError):
            parse_flags(bad)
    # a flags.json may hold typed values and lists
    cfg = from_flags({"image_size": 64, "learn_sigma": True, "attention_resolutions": [32, 16, 8]})
    assert cfg.model["attention_resolutions"] == (2, 4, 8) and cfg.model["out_channels"] == 6


def test_the_time_embedding_is_cos_then_sin_of_geometric_frequencies():
    t = torch.tensor([0, 1, 17, 999])
    for dim in (32, 33):
        emb = timestep_embedding(t, dim).double()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        args = t.double()[:, None] * freqs
        want = torch.cat([torch.cos(args), torch.sin(args), torch.zeros(4, dim % 2, dtype=torch.float64)], dim=1)
        assert emb.shape == (4, dim) and (emb - want).abs().max() < 1e-4  # fp32 arguments up to ~1000


def test_the_attention_head_orders():
    """Legacy: the 3C channels are [q | k | v] per head; new: [q of every head | k ... | v ...]. One head:
    the same layout. Each is held to softmax(q^T k / sqrt(d)) v written per head."""
    c, heads = 64, 4
    legacy, new = AttentionBlock(c, heads), AttentionBlock(c, heads, new_order=True)
    for p in legacy.parameters():
        torch.nn.init.normal_(p, std=0.1)
    new.load_state_dict(legacy.state_dict())
    x = torch.randn(2, c, 5, 3)
    qkv = legacy.qkv(legacy.norm(x.reshape(2, c, -1)))
    d = c // heads

    def attend(q, k, v):  # [d, T] each
        return v @ torch.softmax(q.T @ k / math.sqrt(d), dim=-1).T

    for block, split in [(legacy, lambda b, h: qkv[b, h * 3 * d:(h + 1) * 3 * d].split(d)),
                         (new, lambda b, h: [qkv[b, j * c + h * d:j * c + (h + 1) * d] for j in range(3)])]:
        heads_out = torch.stack([torch.cat([attend(*split(b, h)) for h in range(heads)]) for b in range(2)])
        want = x.reshape(2, c, -1) + block.proj_out(heads_out)
        with torch.no_grad():
            assert (block(x).reshape(2, c, -1) - want).abs().max() < 1e-5
    with torch.no_grad():
        assert (legacy(x) - new(x)).abs().max() > 1e-3
        one, one_new = AttentionBlock(c, 1), AttentionBlock(c, 1, new_order=True)
        one_new.load_state_dict(one.state_dict())
        assert torch.equal(one(x), one_new(x))


def test_class_labels_are_checked():
    with torch.device("meta"):
        cond = OpenAIUNet(model_channels=32, num_classes=10, channel_mult=(1,))
        plain = OpenAIUNet(model_channels=32, channel_mult=(1,))
    x, t = torch.zeros(1, 3, 8, 8, device="meta"), torch.zeros(1, dtype=torch.int64, device="meta")
    with pytest.raises(InvalidRequestError, match="class-conditional: pass y"):
        cond(x, t)
    with pytest.raises(InvalidRequestError, match="not class-conditional"):
        plain(x, t, torch.zeros(1, dtype=torch.int64, device="meta"))


TINY = "--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 --diffusion_steps 100"


def save_folder(folder: Path, flags: str, dtype=torch.float32, name="model.pt", as_json=True) -> OpenAIUNet:
    folder.mkdir(parents=True, exist_ok=True)
    module = from_flags(flags).build()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    torch.save({k: v.to(dtype) for k, v in module.state_dict().items()}, folder / name)
    if as_json:
        (folder / "flags.json").write_text(json.dumps({"flags": flags}))
    else:
        (folder / "flags.txt").write_text(flags)
    return module


def test_a_folder_of_fp16_weights_opens_in_fp32_and_samples(tmp_path):
    module = save_folder(tmp_path / "m", TINY + " --use_fp16 True --channel_mult 1,2,2", torch.float16)
    engine = Engine.from_pretrained(tmp_path / "m", backend="torch", batching=False)
    loaded = engine.model.module
    assert isinstance(loaded, OpenAIUNet) and engine.sample_shape == (3, 32, 32)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, module.state_dict()[k].half().float()), k
    assert engine.scheduler.num_train_timesteps == 100 and engine.scheduler.variance_type == "fixed_large"
    images = engine.sample([1, 2], sampler="ddim", steps=3)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_a_folder_names_its_checkpoint(tmp_path):
    save_folder(tmp_path / "a", TINY, name="ema_0.9999_500000.pt", as_json=False)
    assert Engine.from_pretrained(tmp_path / "a", backend="torch").sample_shape == (3, 32, 32)  # the only *.pt
    save_folder(tmp_path / "a", TINY, name="other.pt", as_json=False)
    with pytest.raises(ModelLoadError, match="2 \\*.pt files and no model.pt"):
        Engine.from_pretrained(tmp_path / "a", backend="torch")
    (tmp_path / "a" / "flags.txt").write_text(TINY + " --model_path /elsewhere/other.pt")
    assert Engine.from_pretrained(tmp_path / "a", backend="torch").sample_shape == (3, 32, 32)


@pytest.mark.parametrize("change, match", [
    ("--num_channels 64", "do not fit the network its flags describe.*other shape"),
    ("--num_res_blocks 2", "missing [1-9][0-9]* \\(input_blocks"),
    ("--class_cond True", "missing .*label_emb"),
    ("--timestep_respacing 101", "timestep_respacing '101'"),
])
def test_a_folder_whose_flags_do_not_fit_is_refused_saying_why(tmp_path, change, match):
    save_folder(tmp_path / "m", TINY)
    (tmp_path / "m" / "flags.json").write_text(json.dumps({"flags": TINY + " " + change}))
    with pytest.raises(ModelLoadError, match=match):
        Engine.from_pretrained(tmp_path / "m", backend="torch")


def test_a_folder_with_unreadable_files_is_refused(tmp_path):
    save_folder(tmp_path / "m", TINY)
    (tmp_path / "m" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        Engine.from_pretrained(tmp_path / "m", backend="torch")
    (tmp_path / "m" / "flags.txt").write_text(TINY)
    with pytest.raises(ModelLoadError, match="one of"):
        Engine.from_pretrained(tmp_path / "m", backend="torch")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_network_exports_and_samples_on_the_export_backends(backend, cache):
    """Up/down ResBlocks and the new head order through an exported graph: the torch backend's images."""
    pytest.importorskip(backend)
    cfg = from_flags(TINY + " --num_heads 2 --attention_resolutions 16,8 --channel_mult 1,2 --resblock_updown True "
                            "--use_new_attention_order True")
    module = cfg.build()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    images = {b: Engine.from_module(module, scheduler=cfg.scheduler, sample_shape=cfg.sample_shape, backend=b,
                                    batching=False).sample([1, 2], sampler="ddim", steps=5)
              for b in ("torch", backend)}
    assert (images[backend] - images["torch"]).abs().max().item() <= 1e-5


# ---- against their code, where it is importable ----

PATH_VARIABLES = {"improved_diffusion": "IMPROVED_DIFFUSION_PATH", "guided_diffusion": "GUIDED_DIFFUSION_PATH"}


def their_package(name: str, skip=True):
    """Their ``script_util`` and ``respace`` modules, or a skip that says how to run the test."""
    try:
        return importlib.import_module(f"{name}.script_util"), importlib.import_module(f"{name}.respace")
    except ImportError:
        checkout = os.environ.get(PATH_VARIABLES[name])
        if checkout and Path(checkout, name).is_dir():
            sys.path.insert(0, checkout)
            return their_package(name, skip)
        if not skip:
            raise
        pytest.skip(f"{name} is not importable (the reference code, not a dependency): set "
                    f"{PATH_VARIABLES[name]} to a checkout of openai/{name.replace('_', '-')}")


def theirs(flags: str):
    """Their (model, diffusion) from the flags, through their own argparse and create_model_and_diffusion, fp32."""
    cfg = from_flags(flags)
    script_util, _ = their_package(cfg.codebase.replace("-", "_"))
    defaults = script_util.model_and_diffusion_defaults()
    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, defaults)
    args = vars(parser.parse_known_args(shlex.split(flags))[0])  # their sample script's own flags: ours
    if "use_fp16" in args:  # fp32 parity: their fp16 torso (convert_to_fp16) is a GPU option
        args["use_fp16"] = False
    return script_util.create_model_and_diffusion(**{k: args[k] for k in defaults})


def randomize(module, std=0.03):
    """Random weights everywhere (their init zeroes the last conv of every block and of the network)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module.eval()


def forward_parity(flags: str, batch: int = 2) -> dict:
    """Their network with random weights, loaded strictly into ours and back; outputs on random x, two
    far-apart timesteps (and labels): the max abs difference and the output's scale."""
    model, diffusion = theirs(flags)
    model = randomize(model)
    cfg = from_flags(flags)
    ours = cfg.build()
    ours.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(ours.state_dict(), strict=True)
    T = cfg.scheduler["num_train_timesteps"]
    x = torch.randn(batch, *cfg.sample_shape)
    t = torch.tensor([0, T - 1] * batch)[:batch]
    kw = {"y": torch.randint(0, 1000, (batch,))} if cfg.model["num_classes"] else {}
    with torch.no_grad():
        # their timesteps as their sampler feeds them: through the respacing wrapper, rescaled or not
        want = diffusion._wrap_model(model)(x, t, **kw)
        got = ours(x, t, kw.get("y"))
    return {"max_abs_error": (got - want).abs().max().item(), "output_max_abs": want.abs().max().item()}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_their_key_layout_is_the_committed_one(config):
    model, _ = on_meta(lambda: theirs(CONFIGS[config]))
    assert key_layout(model) == json.loads((KEYS_DIR / f"{config}.json").read_text())["keys"]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_their_state_dict_loads_both_ways_and_the_outputs_match(config):
    """Each published config at num_channels 32 (every other flag theirs): within 1e-5 in fp32."""
    figures = forward_parity(small(CONFIGS[config]))
    assert figures["output_max_abs"] > 1e-2  # the random weights reach the output
    assert figures["max_abs_error"] <= 1e-5, figures


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_published_widths_match_too(config):
    """Batch 1; the 256x256 ones (110M and 550M parameters) take minutes on a shared 2-core machine."""
    figures = forward_parity(CONFIGS[config], batch=1)
    assert figures["max_abs_error"] <= 1e-5, figures


def test_their_schedules_and_respacing_are_the_engines():
    for flags in (CONFIGS["improved-cifar10"], CONFIGS["guided-lsun-bedroom256"], "--diffusion_steps 250"):
        cfg = from_flags(flags)
        their_package(cfg.codebase.replace("-", "_"))
        gd = importlib.import_module(cfg.codebase.replace("-", "_") + ".gaussian_diffusion")
        ours = SchedulerConfig.from_dict(dict(cfg.scheduler, variance_type="fixed_small"))
        want = gd.get_named_beta_schedule(cfg.flags["noise_schedule"], cfg.flags["diffusion_steps"])
        assert np.array_equal(ours.betas(), want), flags
    _, respace = their_package("improved_diffusion")
    for T in (1000, 4000, 37):
        for spacing in ("", "250", "10,15,20", "ddim50", "ddim25", "7", "3,1", str(T)):
            try:
                want = sorted(respace.space_timesteps(T, spacing or [T]))
            except ValueError:
                with pytest.raises(InvalidRequestError):
                    respaced_timesteps(T, spacing)
                continue
            assert list(respaced_timesteps(T, spacing)) == want, (T, spacing)


# at a small width: the CIFAR-10 flags with a fixed variance (rescaled timesteps, T = 4000), their linear
# schedule at T = 1000, a learned variance, and guided-diffusion's class-conditional network with labels
CHAIN_FLAGS = {"cifar10-cosine-4000": "--image_size 32 --num_channels 32 --num_res_blocks 1 --dropout 0.3 "
                                      "--diffusion_steps 4000 --noise_schedule cosine",
               "linear-1000": "--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16,8 "
                              "--diffusion_steps 1000 --noise_schedule linear --rescale_timesteps False",
               "learned-sigma-cosine": "--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True "
                                       "--diffusion_steps 1000 --noise_schedule cosine --rescale_learned_sigmas True",
               "guided-class-cond": "--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True "
                                    "--class_cond True --attention_resolutions 16,8 --num_head_channels 32 --channel_mult 1,2 "
                                    "--resblock_updown True --use_scale_shift_norm True --diffusion_steps 1000 "
                                    "--noise_schedule cosine"}


def engine_and_theirs(flags: str):
    """(the engine on our network with their random weights, their loops' model, their diffusion).

    Their loops run the same network as the engine, called as their code calls it (the timesteps their
    wrapper mapped and rescaled; ``timestep_scale`` 1 so they are not rescaled twice), and ``chain``
    runs them with torch's thread count as the engine samples, so that a chain compares the two
    sampling loops alone; the two networks' parity is ``forward_parity``'s. Outputs equal only to
    rounding would not do: this untrained network's chain is ill-conditioned, and outputs 5e-7 apart
    (two networks, or one network at 1 and at 2 threads) end in images far apart for some seeds
    (measured: docs/openai.md, "How it is checked")."""
    model, diffusion = theirs(flags)
    model = randomize(model, std=0.02)
    cfg = from_flags(flags)
    ours = cfg.build().eval()
    ours.load_state_dict(model.state_dict(), strict=True)
    engine = Engine.from_module(ours, scheduler=cfg.scheduler, sample_shape=cfg.sample_shape, backend="torch",
                                batching=False)
    engine.backend = TorchBackend(engine.model.module, engine.device, io=engine.model.io)  # NCHW, as their loop runs it
    as_they_call_it = copy.copy(ours)  # shares the weights; its own timestep_scale
    as_they_call_it.timestep_scale = 1.0
    return engine, as_they_call_it, diffusion


def their_noise_is(words, steps: int):
    """A stand-in for torch.randn_like that gives their p_sample, called once per step from step index
    steps - 1 down to 0, the engine's noise of the same seeds and step (counter-based, per seed)."""
    step = [steps]

    def engine_noise(x):
        step[0] -= 1
        return philox_normal(words, torch.full((x.shape[0],), step[0]), x[0].numel()).reshape(x.shape)
    return engine_noise


def chain(flags: str, sampler: str, respacing: str = "ddim10") -> dict:
    """Their ddim_sample_loop (eta 0) or p_sample_loop (respaced by their ``timestep_respacing``, their
    per-step noise replaced by the engine's), clip_denoised, against engine.sample from the same x_T, both
    on one network (``engine_and_theirs``); and each step alone, both sides stepping from the same x_t
    with the same model output."""
    respaced = flags + f" --timestep_respacing {respacing}" + (" --use_ddim True" if sampler == "ddim" else "")
    engine, model, diffusion = engine_and_theirs(respaced)
    cfg = from_flags(respaced)
    steps = cfg.steps
    assert cfg.sample_kwargs == {"sampler": sampler, "steps": steps, "spacing": ExplicitSpacing(diffusion.timestep_map)}
    seeds, shape = [5, 6, 7], (3, *cfg.sample_shape)
    x_T, words = torch.randn(shape), seed_words([5, 6, 7])
    labels = torch.tensor([0, 999, 417]) if cfg.flags["class_cond"] else None  # guided-diffusion's y
    kw = {} if labels is None else {"model_kwargs": {"y": labels}}
    ours = engine.sample(seeds, x_T=x_T, class_labels=None if labels is None else labels.tolist(), **cfg.sample_kwargs)
    loop, one_step = {"ddim": (diffusion.ddim_sample_loop, diffusion.ddim_sample),
                      "ddpm": (diffusion.p_sample_loop, diffusion.p_sample)}[sampler]
    # their loop with torch's threads as the engine sets them while it samples (engine_and_theirs says why)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad(), yield_cpu_to(engine.backend):
        mp.setattr(torch, "randn_like", their_noise_is(words, steps))
        want = loop(model, shape, noise=x_T.clone(), clip_denoised=True, **kw)
        plan = engine.plan(**cfg.sample_kwargs)
        rows, step_error = plan.start(seeds, x_T.clone()), 0.0
        mp.setattr(torch, "randn_like", their_noise_is(words, steps))
        for i in reversed(range(steps)):
            x = rows.x.clone()
            theirs_ = one_step(model, x, torch.full((3,), i), clip_denoised=True, **kw)["sample"]
            # one network output for both sides, as their step computed it: the two step rules alone
            plan.step(rows, diffusion._wrap_model(model)(x, torch.full((3,), i), **kw.get("model_kwargs", {})))
            step_error = max(step_error, (rows.x - theirs_).abs().max().item())
    return {"sampler": sampler, "respacing": respacing, "steps": steps,
            "max_abs_error": (ours - want.clamp(-1, 1)).abs().max().item(), "step_max_abs_error": step_error}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("flags", sorted(CHAIN_FLAGS))
def test_their_sample_loops_give_the_engines_images(flags, sampler):
    """Each step within 1e-5; the whole chain of this untrained network (whose x0 at t ~ T is x_t / sqrt(abar)
    ~ 150 x_t before clipping), on one network and thread count, amplifies the two DDIM step rules'
    rounding to at most 1.5e-5 after 10 steps (8 seeds, linear-1000; DDPM's chains came out identical)."""
    figures = chain(CHAIN_FLAGS[flags], sampler)
    assert figures["step_max_abs_error"] <= 1e-5, figures
    assert figures["max_abs_error"] <= 5e-5, figures


# plain "N" (a fractional stride that ends on T - 1) and sections, which no named spacing keeps
RESPACINGS = ("10", "3,4,3")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("respacing", RESPACINGS)
@pytest.mark.parametrize("flags", ["learned-sigma-cosine", "linear-1000"])
def test_their_respaced_sample_loops_give_the_engines_images(flags, respacing, sampler):
    """Their SpacedDiffusion from "N" and section lists: the engine keeps the same timesteps explicitly
    (the model sees their timestep_map) and rebuilds the same betas from them."""
    figures = chain(CHAIN_FLAGS[flags], sampler, respacing)
    assert figures["step_max_abs_error"] <= 1e-5, figures
    assert figures["max_abs_error"] <= 5e-5, figures


# ---- the data files and the recorded figures ----

def write_keys() -> None:
    """tests/data/openai_unet_keys/<config>.json from THEIR code (run once, where it is importable)."""
    KEYS_DIR.mkdir(parents=True, exist_ok=True)
    for config, flags in CONFIGS.items():
        model, _ = on_meta(lambda: theirs(flags))
        data = {"flags": flags, "codebase": from_flags(flags).codebase,
                "parameters": sum(p.numel() for p in model.parameters()), "keys": key_layout(model)}
        (KEYS_DIR / f"{config}.json").write_text(json.dumps(data, indent=1) + "\n")


def record(path: str, published_widths: bool = True) -> None:
    """The parity figures of this module's reference tests, as JSON (``published_widths`` False: the
    forward parity at num_channels 32 only, without the minutes-long published widths)."""
    import platform
    import subprocess

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    torch.manual_seed(0)
    forward = {c: dict(forward_parity(small(f)), flags=small(f)) for c, f in sorted(CONFIGS.items())}
    for c in sorted(CONFIGS) if published_widths else ():
        forward[c + " (published width, batch 1)"] = dict(forward_parity(CONFIGS[c], batch=1), flags=CONFIGS[c])
    chains = {name: {"flags": f, "runs": [chain(f, sampler, respacing) for respacing in ("ddim10", *RESPACINGS)
                                          for sampler in ("ddim", "ddpm")]}
              for name, f in sorted(CHAIN_FLAGS.items())}
    data = {"what": "OpenAIUNet and openai_format against improved-diffusion / guided-diffusion themselves: "
                    "random weights, fp32, CPU; state dicts load both ways strictly",
            "how": "python -m tests.engine.test_openai_unet --record FILE",
            "cpu": next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), ""),
            "cpu_flags": sorted(f for f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
                                if f in cpu.split()),
            "torch": torch.__version__, "python": platform.python_version(),
            "tolerance": 1e-5, "forward": forward, "chains": chains,
            "chains_how": "their ddim_sample_loop / p_sample_loop (their noise replaced by the engine's) against "
                          "engine.sample from the same x_T, 3 images, clip_denoised, both loops on the engine's "
                          "network (called as their code calls it) at the engine's torch thread count; "
                          "step_max_abs_error: each step alone from the same x_t and network output; "
                          "respacing: their timestep_respacing "
                          "(\"ddim10\", plain \"10\" ending on T - 1, sections \"3,4,3\"), kept explicitly by the engine"}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", action="store_true", help="write tests/data/openai_unet_keys/ from their code")
    parser.add_argument("--record", metavar="FILE", help="write the parity figures to FILE")
    parser.add_argument("--small-widths-only", action="store_true", help="--record without the published widths")
    opts = parser.parse_args()
    for name in PATH_VARIABLES:
        their_package(name, skip=False)
    if opts.keys:
        write_keys()
    if opts.record:
        record(opts.record, published_widths=not opts.small_widths_only)
