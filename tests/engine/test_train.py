"""The trainer: a short run writes a loadable model, resumes where it stopped, keeps EMA weights."""

import pytest
import torch
from safetensors.torch import load_file

from ddpm_engine import Engine
from ddpm_engine.data import load_digits_images
from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.train import TrainConfig, diffusion_loss, main, train


def small(steps, **kw):
    return TrainConfig(steps=steps, batch_size=16, widths=[8, 16], time_emb_dim=16, save_every=5, warmup=2, **kw)


def test_short_run_writes_a_loadable_model_and_resumes(tmp_path):
    first = train(tmp_path, small(10), progress=False)
    assert first["step"] == 10 and len(first["losses"]) == 10
    assert all(torch.isfinite(torch.tensor(first["losses"])))
    engine = Engine.from_pretrained(tmp_path, backend="torch", device="cpu")
    assert engine.sample([1], sampler="ddim", steps=3).shape == (1, 1, 16, 16)
    again = train(tmp_path, small(14), progress=False)  # resumes at 10, runs 4 more
    assert again["step"] == 14 and len(again["losses"]) == 4
    done = train(tmp_path, small(14), progress=False)
    assert done["step"] == 14 and done["losses"] == []
    fresh = train(tmp_path, small(3), resume=False, progress=False)  # starts over in the same folder
    assert fresh["step"] == 3 and len(fresh["losses"]) == 3


def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(tmp_path):
    straight = train(tmp_path / "a", small(12), progress=False)
    part = train(tmp_path / "b", small(12), progress=False, stop_at=7)
    assert part["step"] == 7
    rest = train(tmp_path / "b", small(12), progress=False)
    assert rest["step"] == 12 and part["losses"] + rest["losses"] == straight["losses"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_another_architecture_is_refused(tmp_path):
    train(tmp_path, small(2), progress=False)
    with pytest.raises(InvalidRequestError, match="widths"):
        train(tmp_path, small(4), widths=[8, 32], progress=False)
    with pytest.raises(InvalidRequestError, match="unknown training option"):
        train(tmp_path, small(4), step=4, progress=False)


def test_ema_differs_from_raw_weights(tmp_path):
    train(tmp_path, small(12, ema_decay=0.9), progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    diffs = [(state["model"][k] - state["ema"][k]).abs().max() for k in state["model"] if
             state["model"][k].dtype.is_floating_point]
    assert max(diffs) > 0
    saved = load_file(tmp_path / "model.safetensors")  # the project folder holds the EMA weights
    assert all(torch.equal(saved[k], state["ema"][k]) for k in saved)


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    x = load_digits_images()[0][:16]
    result = train(tmp_path, steps=60, batch_size=16, widths=[8, 16], time_emb_dim=16, lr=3e-3, warmup=5,
                   save_every=1000, progress=False, data=x)
    losses = result["losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--widths", "8", "16", "--quiet"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert (tmp_path / "config.json").is_file() and (tmp_path / "checkpoint.pt").is_file()


def test_the_loss_is_epsilon_mse():
    """A network that outputs the true noise has zero loss; one that outputs zeros has loss E[eps^2] ~ 1."""
    x0 = torch.randn(64, 1, 8, 8)
    abar = torch.linspace(0.99, 0.01, 1000)

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t):  # recover eps from x_t: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
            a = abar[t].view(-1, 1, 1, 1)
            return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    class Zero(torch.nn.Module):
        def forward(self, x_t, t):
            return torch.zeros_like(x_t)

    assert diffusion_loss(Oracle(), x0, abar.sqrt(), (1 - abar).sqrt()).item() < 1e-8
    assert abs(diffusion_loss(Zero(), x0, abar.sqrt(), (1 - abar).sqrt()).item() - 1.0) < 0.1
