"""``python -m ddpm_engine sample``: the output checked before sampling, its seeds printed and kept
in the PNG, the grid scale checked, and argparse's one-line reason last."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_engine.__main__ import main
from ddpm_engine.engine import Engine
from ddpm_engine.images import SEEDS_KEY, read_png_text, save_grid

FAST = ["--model", "digits", "--backend", "torch", "--sampler", "ddim", "--steps", "3", "--quiet"]


def unwritable_folder(tmp_path):
    if os.geteuid() == 0:  # root writes through file modes; /sys refuses new files even to root
        return "/sys"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder)


@pytest.mark.parametrize("case", ["no extension", "jpg", "missing folder", "no permission", "a folder"])
def test_an_unwritable_out_fails_in_one_line_before_sampling(tmp_path, monkeypatch, capsys, case):
    out = {"no extension": tmp_path / "grid", "jpg": tmp_path / "grid.jpg",
           "missing folder": tmp_path / "nowhere" / "grid.png",
           "no permission": f"{unwritable_folder(tmp_path)}/grid.png", "a folder": tmp_path / "dir.png"}[case]
    if case == "a folder":
        out.mkdir()

    def no_engine(*a, **k):
        raise AssertionError("the output must be checked before the engine is built")

    monkeypatch.setattr(Engine, "from_pretrained", no_engine)
    assert main(["sample", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}"), err
    assert case == "a folder" or not os.path.exists(out)


def test_help_shows_the_out_default(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "samples.png in the current folder" in " ".join(capsys.readouterr().out.split())


def test_seeds_are_printed_kept_in_the_png_and_reproduce_the_grid(tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main(["sample", *FAST, "--n", "3", "--out", str(first)]) == 0
    out = capsys.readouterr().out
    seeds = re.search(r"--seeds ([0-9 ]+)$", out, re.M).group(1).split()
    assert len(seeds) == 3 and f"wrote {first.resolve()}\n" in out
    assert read_png_text(first)[SEEDS_KEY].split() == seeds
    assert main(["sample", *FAST, "--seeds", *seeds, "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert main(["sample", *FAST, "--seeds", *seeds, "--out", str(again)]) == 0
    assert "(replaced the file that was there)" in capsys.readouterr().out


@pytest.mark.parametrize("scale", ["0", "-1", "33", "two"])
def test_scale_outside_1_to_32_is_refused(tmp_path, capsys, scale):
    with pytest.raises(SystemExit) as exc:
        main(["sample", *FAST, "--scale", scale, "--out", str(tmp_path / "g.png")])
    assert exc.value.code == 2
    assert "argument --scale" in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_unknown_sampler_ends_with_the_one_line_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--sampler", "euler"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'euler'" in last and "ddim" in last, last


def test_spacing_is_a_flag_and_the_printed_command_repeats_it(tmp_path, capsys):
    out = tmp_path / "k.png"
    assert main(["sample", *FAST, "--spacing", "karras", "--seeds", "3", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ddim-3 karras eta=0" in printed and "--spacing karras" in read_png_text(out)["command"]
    default = tmp_path / "d.png"
    assert main(["sample", *FAST, "--seeds", "3", "4", "--out", str(default)]) == 0
    assert "--spacing leading" in read_png_text(default)["command"]  # the default, spelled out
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(default)))  # the flag is used
    with pytest.raises(SystemExit):
        main(["sample", *FAST, "--spacing", "cosine", "--out", str(out)])  # argparse names the choices


# ---- class labels and guidance: a tiny class-conditional model (tests/engine/test_class_labels.py's) ----
def conditional_folder(path):
    """A diffusers pipeline folder of a tiny UNet2DModel with num_class_embeds=4 (no null label)."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8, num_class_embeds=4).eval()
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(path)
    return str(path)


def test_class_labels_one_per_image_or_one_for_all_and_the_printed_command_repeats_them(tmp_path, capsys):
    model = conditional_folder(tmp_path / "cond")
    opts = ["--model", model, "--backend", "torch", "--sampler", "ddim", "--steps", "3", "--quiet"]
    mixed, same, again = tmp_path / "mixed.png", tmp_path / "same.png", tmp_path / "again.png"
    assert main(["sample", *opts, "--seeds", "3", "4", "--class-labels", "0", "3", "--out", str(mixed)]) == 0
    printed = capsys.readouterr().out
    assert "--seeds 3 4 --class-labels 0 3" in printed
    command = read_png_text(mixed)["command"]
    assert command.endswith("--seeds 3 4 --class-labels 0 3") and "--guidance-scale" not in command
    want = Engine.from_pretrained(model, backend="torch").sample([3, 4], class_labels=[0, 3], sampler="ddim", steps=3)
    save_grid(want, again, scale=4)
    np.testing.assert_array_equal(np.asarray(Image.open(mixed)), np.asarray(Image.open(again)))  # the labels are used
    assert main(["sample", *opts, "--seeds", "3", "4", "--class-labels", "3", "--out", str(same)]) == 0
    assert read_png_text(same)["command"].endswith("--seeds 3 4 --class-labels 3 3")  # one for all, spelled out
    grids = [np.asarray(Image.open(p)).astype(int) for p in (mixed, same)]
    half = grids[0].shape[1] // 2  # the grid's two images side by side: seed 4 has label 3 in both
    assert np.array_equal(grids[0][:, half:], grids[1][:, half:]) and not np.array_equal(grids[0], grids[1])


@pytest.mark.parametrize("flags, message", [
    (["--model", "digits", "--class-labels", "1"], "takes no class labels"),
    (["--model", "digits", "--guidance-scale", "2"], "guidance_scale needs a class-conditional model"),
    (["--model", "COND", "--class-labels", "0", "1"], "2 labels for 3 seeds"),
    (["--model", "COND", "--class-labels", "4"], r"class label 4 is not an int in \[0, 4\)"),
    (["--model", "COND", "--class-labels", "1", "--guidance-scale", "2"], "needs the model's null label"),
    (["--model", "COND", "--class-labels", "1", "--guidance-scale", "-1"], "guidance_scale must be"),
])
def test_labels_or_guidance_the_model_cannot_take_are_refused_in_one_line_before_sampling(tmp_path, monkeypatch,
                                                                                          capsys, flags, message):
    flags = [conditional_folder(tmp_path / "cond") if f == "COND" else f for f in flags]
    monkeypatch.setattr(Engine, "sample", lambda *a, **k: pytest.fail("refused before sampling"))
    out = tmp_path / "g.png"
    assert main(["sample", *flags, "--backend", "torch", "--sampler", "ddim", "--steps", "3", "--seeds", "1", "2", "3",
                 "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not out.exists()


def test_guidance_scale_is_passed_to_the_engine_and_repeated(tmp_path, monkeypatch, capsys):
    """A forward(x, t, y) module with a null label (a folder cannot name one): the CLI's grid is the
    engine's guided sampling."""
    from torch import nn

    from ddpm_engine import checkpoints

    class WithY(nn.Module):
        num_classes, null_label = 3, 2

        def __init__(self):
            super().__init__()
            self.conv, self.embed = nn.Conv2d(1, 1, 3, padding=1), nn.Embedding(3, 1)

        def forward(self, x, t, y):
            return self.conv(x) * torch.cos(t.float() / 300)[:, None, None, None] + self.embed(y)[:, :, None, None]

    loaded = checkpoints.from_module(WithY(), sample_shape=(1, 8, 8), name="withy")
    from_pretrained = Engine.from_pretrained
    monkeypatch.setattr(Engine, "from_pretrained", lambda model, **kw: from_pretrained(loaded, **kw))
    opts = ["--model", "withy", "--backend", "torch", "--sampler", "ddim", "--steps", "3", "--quiet"]
    guided, want_png = tmp_path / "guided.png", tmp_path / "want.png"
    assert main(["sample", *opts, "--guidance-scale", "3.5", "--class-labels", "0", "1", "--seeds", "5", "6",
                 "--out", str(guided)]) == 0
    assert "--guidance-scale 3.5 --seeds 5 6 --class-labels 0 1" in read_png_text(guided)["command"]
    engine = from_pretrained(loaded, backend="torch")
    want = engine.sample([5, 6], class_labels=[0, 1], guidance_scale=3.5, sampler="ddim", steps=3)
    unguided = engine.sample([5, 6], class_labels=[0, 1], sampler="ddim", steps=3)
    assert (want - unguided).abs().max() > 1e-2  # the scale matters
    save_grid(want, want_png, scale=4)
    np.testing.assert_array_equal(np.asarray(Image.open(guided)), np.asarray(Image.open(want_png)))
