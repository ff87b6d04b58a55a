"""Model folders: the project's format, diffusers folders (both layouts), Hub ids, corrupt and foreign files."""

import json
import random
import shutil

import pytest
import torch

from ddpm_engine import Engine, ModelLoadError, SchedulerConfig, checkpoints
from ddpm_engine.models import DoubleConvUNet

diffusers = pytest.importorskip("diffusers")


def tiny_diffusers_unet():
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8).eval()


def test_project_format_round_trip(tmp_path):
    net = DoubleConvUNet(1, (8, 16)).eval()
    sched = SchedulerConfig(beta_schedule="cosine", variance_type="fixed_large", clip_sample=False)
    checkpoints.save_project_folder(tmp_path / "m", net, {"type": "seed_unet", **net.config}, sched, (1, 8, 8))
    loaded = checkpoints.load(tmp_path / "m")
    assert loaded.scheduler == sched and loaded.sample_shape == (1, 8, 8)
    assert loaded.weights_hash == checkpoints.weights_hash(net)
    x, t = torch.randn(2, 1, 8, 8), torch.randint(0, 1000, (2,))
    with torch.no_grad():
        assert torch.equal(loaded.module(x, t), net(x, t))


@pytest.mark.parametrize("layout", ["pipeline", "single"])
def test_diffusers_folders_and_their_scheduler_config(tmp_path, layout):
    unet = tiny_diffusers_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule="squaredcos_cap_v2",
                                    variance_type="fixed_large", clip_sample=False, prediction_type="v_prediction")
    if layout == "pipeline":
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    else:  # the older single folder: config.json + scheduler_config.json + weights side by side
        unet.save_pretrained(tmp_path)
        sched.save_config(tmp_path)
    engine = Engine.from_pretrained(tmp_path, backend="torch")
    cfg = engine.scheduler
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.variance_type, cfg.clip_sample, cfg.prediction_type) == \
        (200, "squaredcos_cap_v2", "fixed_large", False, "v_prediction")
    assert engine.sample_shape == (1, 8, 8)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 50, 199])
    with torch.no_grad():
        torch.testing.assert_close(engine.backend(x, t), unet(x, t).sample)
    assert engine.sample([random.getrandbits(64)], steps=10).shape == (1, 1, 8, 8)


def test_missing_and_corrupt_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        checkpoints.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no model"):
        checkpoints.load(tmp_path / "empty")

    net = DoubleConvUNet(1, (8, 16))
    good = checkpoints.save_project_folder(tmp_path / "m", net, {"type": "seed_unet", **net.config},
                                           SchedulerConfig(), (1, 8, 8))
    weights = good / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated download
    with pytest.raises(ModelLoadError, match="corrupt"):
        checkpoints.load(good)
    weights.write_bytes(blob)
    cfg = json.loads((good / "config.json").read_text())
    cfg["model"]["widths"] = [8, 32]  # weights of another model
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not fit"):
        checkpoints.load(good)
    (good / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        checkpoints.load(good)
    cfg["model"]["type"] = "transformer"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unknown model type"):
        checkpoints.load(good)


def test_corrupt_diffusers_weights(tmp_path):
    diffusers.DDPMPipeline(unet=tiny_diffusers_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    w = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError):
        checkpoints.load(tmp_path)


# ---- Hugging Face Hub ids, resolved through a local hub cache (no download in tests) ----

def put_in_hub_cache(cache, repo_id, folder, commit, refs=("main",)):
    """Lay out ``folder`` as huggingface_hub caches a download: models--org--name/snapshots/<commit>/...
    and refs/<branch or tag> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty hub cache at tmp_path/hub, offline: HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the
    environment and in huggingface_hub.constants (read once at import, as diffusers users set them)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_loads_from_the_cache_at_a_revision(tmp_path, offline_hub_cache):
    unets = [tiny_diffusers_unet(), tiny_diffusers_unet()]  # two commits with different weights
    commits = ["%040x" % random.getrandbits(160) for _ in unets]
    for k, (unet, commit) in enumerate(zip(unets, commits)):
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100 * (k + 1))) \
            .save_pretrained(tmp_path / f"src{k}")
        put_in_hub_cache(offline_hub_cache, "org/tiny-ddpm", tmp_path / f"src{k}", commit,
                         refs=("main",) if k == 0 else ("v2",))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 50])
    for revision, k in [(None, 0), ("main", 0), ("v2", 1), (commits[1], 1)]:
        loaded = checkpoints.load("org/tiny-ddpm", revision=revision)
        assert loaded.name == "org/tiny-ddpm" and loaded.scheduler.num_train_timesteps == 100 * (k + 1)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(x, t), unets[k](x, t).sample)
    assert Engine.from_pretrained("org/tiny-ddpm", backend="torch").sample([1], steps=2).shape == (1, 1, 8, 8)


def test_hub_id_in_the_single_folder_layout(tmp_path, offline_hub_cache):
    unet = tiny_diffusers_unet()
    unet.save_pretrained(tmp_path / "src")
    diffusers.DDPMScheduler(clip_sample=False).save_config(tmp_path / "src")
    put_in_hub_cache(offline_hub_cache, "org/single", tmp_path / "src", "%040x" % random.getrandbits(160))
    loaded = checkpoints.load("org/single")
    assert loaded.scheduler.clip_sample is False and loaded.sample_shape == (1, 8, 8)


def test_hub_id_offline_and_not_cached_says_how_to_get_it(offline_hub_cache):
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1") as err:
        checkpoints.load("google/ddpm-cifar10-32")
    assert "hf download google/ddpm-cifar10-32" in str(err.value) and str(offline_hub_cache) in str(err.value)
    with pytest.raises(ModelLoadError, match="no model folder"):  # not an org/name: a missing local path
        checkpoints.load("runs/a/b")
