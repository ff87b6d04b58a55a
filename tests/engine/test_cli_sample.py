"""``python -m ddpm_engine sample``: the output checked before sampling, its seeds printed and kept
in the PNG, the grid scale checked, and argparse's one-line reason last."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from ddpm_engine.__main__ import main
from ddpm_engine.engine import Engine
from ddpm_engine.images import SEEDS_KEY, read_png_text

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
