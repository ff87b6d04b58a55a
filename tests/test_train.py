"""The trainer: a short run writes a loadable model, resumes where it stopped, keeps EMA weights."""

import torch

from engine import Engine
from engine.data import load_digits_images
from engine.train import TrainConfig, diffusion_loss, train


def small(steps, **kw):
    return TrainConfig(steps=steps, batch_size=16, widths=[8, 16], time_emb_dim=16, save_every=5, warmup=2, **kw)


def test_short_run_writes_a_loadable_model_and_resumes(tmp_path):
    first = train(tmp_path, small(10), progress=False)
    assert first["step"] == 10 and len(first["losses"]) == 10
    engine = Engine.from_pretrained(tmp_path, backend="torch")
    assert engine.sample([1], sampler="ddim", steps=3).shape == (1, 1, 16, 16)
    again = train(tmp_path, small(14), progress=False)  # resumes at 10, runs 4 more
    assert again["step"] == 14 and len(again["losses"]) == 4
    done = train(tmp_path, small(14), progress=False)
    assert done["step"] == 14 and done["losses"] == []
    fresh = train(tmp_path / "fresh", small(3), resume=False, progress=False)
    assert fresh["step"] == 3


def test_ema_differs_from_raw_weights(tmp_path):
    train(tmp_path, small(12, ema_decay=0.9), progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    diffs = [(state["model"][k] - state["ema"][k]).abs().max() for k in state["model"] if
             state["model"][k].dtype.is_floating_point]
    assert max(diffs) > 0


def test_loss_goes_down_on_a_fixed_batch(tmp_path):
    x = load_digits_images()[0][:16]
    result = train(tmp_path, TrainConfig(steps=60, batch_size=16, widths=[8, 16], time_emb_dim=16, lr=3e-3,
                                         warmup=5, save_every=1000), progress=False, data=x)
    losses = result["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


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
