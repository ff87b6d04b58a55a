"""ddpm_engine.testing and `python -m ddpm_engine check`: parity reports of exported backends
against eager torch over whole chains, golden files, the pytest helpers, the CLI's exit codes.

Seeds are drawn at random per run and appear in every report table (and so in every failure
message); DDIM-10 on two seeds keeps each run short. The AOTInductor compiles (slow) happen once
each, in a module-wide cache folder."""

import copy
import dataclasses
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ddpm_engine import checkpoints
from ddpm_engine.__main__ import main
from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.export import onnx_export
from ddpm_engine.models import SeedUNet
from ddpm_engine.testing import (DEFAULT_TOLERANCES, GoldenMismatchError, assert_matches_golden, assert_parity,
                                 compare, compare_golden, save_golden)

diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("cache")]  # one module-wide cache: the AOTI compile of digits happens once
RUN = {"sampler": "ddim", "steps": 10}  # timesteps 900, 800, ..., 0
HAS_CXX = shutil.which("c++") is not None or shutil.which("g++") is not None
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_regression.py"


@pytest.fixture(scope="module")
def seeds():
    return [random.getrandbits(64) for _ in range(2)]


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A small diffusers UNet2DModel (with down- and upsampling) saved as DDPMPipeline does."""
    torch.manual_seed(random.getrandbits(31))
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    folder = tmp_path_factory.mktemp("tiny-diffusers")
    diffusers.DDPMPipeline(unet=unet.eval(), scheduler=diffusers.DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def golden(tmp_path_factory, seeds):
    return save_golden("digits", tmp_path_factory.mktemp("golden") / "digits.npz", seeds=seeds, **RUN)


def perturbed_copy(folder: Path, where: Path) -> Path:
    """A copy of a model folder whose first weight tensor is shifted by 1e-2."""
    shutil.copytree(folder, where)
    state = load_file(where / "model.safetensors")
    first = sorted(state)[0]
    state[first] = state[first] + 1e-2
    save_file(state, where / "model.safetensors")
    return where


# ---- compare -------------------------------------------------------------------------------------

@pytest.mark.parametrize("names", [["onnxruntime"], pytest.param(["onnxruntime", "aoti"], marks=[
    pytest.mark.slow, pytest.mark.skipif(not HAS_CXX, reason="AOTInductor on the CPU needs a C++ compiler")])])
def test_digits_exported_backends_match_torch(seeds, names):
    report = assert_parity("digits", backends=names, seeds=seeds, **RUN)
    assert [r.backend for r in report.results] == names
    for r in report.results:
        assert r.network_error <= 1e-4 and r.trajectory_max_abs <= 1e-3 and r.image_psnr_db > 80, report.table()
        assert r.diverged_t is None and r.nonfinite is None and r.steps == 10, report.table()
    table = report.table()
    assert table.splitlines()[-1].startswith("PASS") and all(n in table for n in names)
    assert " ".join(map(str, seeds)) in table
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["settings"]["seeds"] == seeds
    assert data["model"]["sample_shape"] == [1, 16, 16] and data["versions"]["torch"] == torch.__version__


def test_diffusers_unet_onnxruntime_matches_torch(diffusers_folder, seeds):
    report = assert_parity(diffusers_folder, backends=["onnxruntime"], seeds=seeds, **RUN)
    assert report.results[0].network_error <= 1e-4, report.table()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="AOTInductor on the CPU needs a C++ compiler")
def test_diffusers_unet_aoti_matches_torch(diffusers_folder, seeds):
    assert_parity(diffusers_folder, backends=["aoti"], seeds=seeds, **RUN)


class ShiftedBelow(nn.Module):
    """The network, with its output shifted by 1e-2 at timesteps below ``t_max``."""

    def __init__(self, net: nn.Module, t_max: int):
        super().__init__()
        self.net, self.t_max = net, t_max

    def forward(self, x, t):
        out = self.net(x, t)
        return torch.where((t < self.t_max)[:, None, None, None], out + 1e-2, out)


def test_a_broken_export_fails_at_the_step_it_diverges(seeds, tmp_path, monkeypatch):
    """A broken exported side, made honestly: the graph the onnxruntime backend loads from its
    cache (the path it computes for the real model) is exported from a copy of the network whose
    output is shifted by 1e-2 below t = 300, as a miscompiled or stale graph would be; the torch
    reference runs the real network. The report must name onnxruntime, fail the network check
    with its peak below t = 300, and place the divergence at the step at t = 200 (DDIM-10 runs
    900, 800, ..., 0), checked here against both engines' chains compared directly."""
    from ddpm_engine import Engine

    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))  # not the module's shared cache
    loaded = checkpoints.load("digits")
    broken = dataclasses.replace(loaded, module=ShiftedBelow(copy.deepcopy(loaded.module), 300))
    onnx_export.export_onnx(broken, path=onnx_export.cached_path(loaded))
    report = compare(loaded, backends=["onnxruntime"], seeds=seeds, **RUN)
    r = report.results[0]
    assert not report.passed and r.backend == "onnxruntime", report.table()
    assert r.network_error > 1e-3 and r.network_error_t < 300, report.table()

    atol = DEFAULT_TOLERANCES["fp32"].atol
    chains = []
    for backend in ("torch", "onnxruntime"):
        images, snaps = Engine.from_pretrained(loaded, backend=backend).sample(
            seeds, return_intermediates=list(range(1000)), **RUN)
        snaps = sorted(snaps, key=lambda s: -s.t)
        chains.append([s.x_t for s in snaps[1:]] + [images])  # the state after each step
    after = [snap.t for snap in sorted(snaps, key=lambda s: -s.t)]
    first = next(after[k] for k, (a, b) in enumerate(zip(*chains)) if (a - b).abs().max() > atol)
    assert first == 200 and r.diverged_t == first and r.diverged_step == 8, report.table()
    for text in ("onnxruntime", "network output differs", "t=200", "step 8 of 10"):
        assert text in report.reason, report.table()
    with pytest.raises(AssertionError, match=r"(?s)onnxruntime.*FAIL"):
        assert_parity(loaded, backends=["onnxruntime"], seeds=seeds, **RUN)


class OverflowsInHalf(nn.Module):
    """Finite in fp32; in fp16, 1000 / (t + 1) * 100 exceeds fp16's 65504 at t = 0 only, and
    0 * inf is NaN: the model output is NaN at the last step."""

    def __init__(self):
        super().__init__()
        self.net = SeedUNet(1, (8, 16))

    def forward(self, x, t):
        scale = x.new_tensor(1000.0) / (t + 1).to(x.dtype) * 100
        return self.net(x, t) + 0 * scale.view(-1, 1, 1, 1)


@pytest.mark.filterwarnings("ignore::ddpm_engine.errors.EmulatedPrecisionWarning")  # fp16 on purpose: it overflows in half
def test_nan_is_reported_with_its_step(seeds):
    torch.manual_seed(random.getrandbits(31))
    loaded = checkpoints.from_module(OverflowsInHalf(), {}, (1, 8, 8), name="overflows")
    report = compare(loaded, backends=["torch"], precision="fp16", seeds=seeds, **RUN)
    r = report.results[0]
    assert not report.passed and r.nonfinite == "model output at t=0", report.table()
    assert "NaN/Inf in the model output at t=0" in report.reason
    assert json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))["passed"] is False


def test_bad_arguments_are_typed_errors(seeds):
    with pytest.raises(InvalidRequestError, match="atol"):
        compare("digits", backends=["torch"], atol=-1.0, seeds=seeds, **RUN)
    with pytest.raises(InvalidRequestError, match="backend"):
        compare("digits", backends=[], seeds=seeds, **RUN)
    with pytest.raises(InvalidRequestError, match="nn.Module"):
        compare(SeedUNet(1, (8, 16)), backends=["torch"])


# ---- golden files --------------------------------------------------------------------------------

def test_golden_round_trip(golden, seeds):
    report = assert_matches_golden("digits", golden)
    r = report.results[0]
    assert (r.backend, r.precision, r.network_error, r.image_max_abs) == ("torch", "fp32", 0.0, 0.0), report.table()
    assert report.settings["seeds"] == seeds and "golden digits.npz" in report.reference
    assert not any("weights differ" in n for n in report.notes)
    assert_matches_golden("digits", golden, backend=["onnxruntime"])


def test_golden_catches_changed_weights(golden, tmp_path, capsys):
    changed = perturbed_copy(checkpoints.BUNDLED["digits"], tmp_path / "digits-changed")
    report = compare_golden(changed, golden)
    assert not report.passed and report.results[0].diverged_t is not None, report.table()
    assert any("weights differ" in n for n in report.notes)
    assert main(["check", "--model", str(changed), "--against", str(golden)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_golden_of_another_model_or_settings_is_refused(golden, diffusers_folder, capsys):
    with pytest.raises(GoldenMismatchError, match="sample_shape: golden \\[1, 16, 16\\], this model \\[1, 8, 8\\]"):
        compare_golden(diffusers_folder, golden)
    with pytest.raises(GoldenMismatchError, match="sampler: golden 'ddim', asked 'ddpm'"):
        compare_golden("digits", golden, sampler="ddpm")
    assert main(["check", "--model", str(diffusers_folder), "--against", str(golden)]) == 2
    assert "another model" in capsys.readouterr().err


def test_missing_or_corrupt_golden_file(golden, tmp_path):
    with pytest.raises(InvalidRequestError, match="no golden file"):
        compare_golden("digits", tmp_path / "absent.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(golden.read_bytes()[:500])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(InvalidRequestError, match="not a readable golden file"):
            compare_golden("digits", broken)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], "the broken file was left open"


# ---- the CLI -------------------------------------------------------------------------------------

def test_cli_check_passes_and_writes_json(seeds, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["check", "--model", "digits", "--backend", "onnxruntime", "--steps", "10", "--json", str(out),
            "--seeds", *map(str, seeds)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed and "PASS" in printed
    data = json.loads(out.read_text())
    assert data["passed"] and data["results"][0]["backend"] == "onnxruntime"


def test_cli_golden_save_then_check(seeds, tmp_path, capsys):
    path = tmp_path / "g.npz"
    assert main(["check", "--save-golden", str(path), "--steps", "10", "--seeds", *map(str, seeds)]) == 0
    assert main(["check", "--against", str(path), "--backend", "torch", "onnxruntime"]) == 0
    assert capsys.readouterr().out.count("pass") == 2


@pytest.mark.parametrize("argv", [
    ["check", "--backend", "nonesuch"],                              # unknown backend (EngineError)
    ["check", "--backend", "onnxruntime", "--precision", "fp16"],    # cannot run: BackendUnavailableError
    ["check", "--backend", "torch", "--steps", "0"],                 # invalid request
    ["check", "--save-golden", "x.npz", "--backend", "torch"],       # the golden's backend is --reference
    ["check", "--against", "absent.npz"],                            # no golden file
])
def test_cli_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("argv", [["check", "--precision", "fp64"],
                                  ["check", "--against", "a.npz", "--save-golden", "b.npz"]])
def test_cli_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.mark.slow
def test_the_example_test_file_runs(tmp_path, cache):
    """examples/test_regression.py, copied away from the repository beside a golden file made as
    its own first run would make it: both of its tests pass."""
    example = tmp_path / EXAMPLE.name
    shutil.copy(EXAMPLE, example)
    save_golden("digits", tmp_path / "golden" / "digits-ddim10.npz", sampler="ddim", steps=10)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)]
    run = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "DDPM_ENGINE_CACHE": str(cache)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout + run.stderr


def test_a_golden_of_another_scheduler_names_only_the_differing_keys():
    from ddpm_engine.testing import _check_same_model, model_identity

    now = model_identity(checkpoints.load("digits"))
    golden = copy.deepcopy(now)
    golden["scheduler"]["beta_schedule"] = "cosine"
    golden["scheduler"]["clip_sample"] = not now["scheduler"]["clip_sample"]
    with pytest.raises(GoldenMismatchError) as exc:
        _check_same_model("g.npz", golden, now)
    message = str(exc.value)
    assert "scheduler.beta_schedule: golden 'cosine', this model 'linear'" in message
    assert f"scheduler.clip_sample: golden {golden['scheduler']['clip_sample']!r}" in message
    assert message.count("scheduler.") == 2 and "beta_end" not in message, message
