"""bench/quality.py's sweep options: ``--spacings`` reaches engine.sample only when given, and
``--reuse`` copies an earlier run's rows instead of measuring them again."""

import json

import numpy as np
import pytest
import torch

from bench import quality


class FakeEngine:
    """Records each engine.sample call's options; images are zeros."""

    backend = type("B", (), {"name": "fake", "precision": "fp32"})()
    scheduler = type("S", (), {"num_train_timesteps": 1000})()

    def __init__(self, *args, **kwargs):
        self.calls = []

    def sample(self, seeds, **options):
        self.calls.append(options)
        return torch.zeros(len(seeds), 1, 4, 4)


class FakeJudge:
    def recognise(self, images):
        return np.ones(len(images), bool), np.arange(len(images)) % 10

    def frechet_distance(self, images):
        return 123.0


def test_spacing_reaches_engine_sample_only_when_given():
    engine = FakeEngine()
    plain = quality.measure(engine, FakeJudge(), "unipc", 5, 4, chunk=2)
    spaced = quality.measure(engine, FakeJudge(), "unipc", 5, 4, chunk=2, spacing="karras")
    assert engine.calls[:2] == [{"sampler": "unipc", "steps": 5}] * 2
    assert engine.calls[2:] == [{"sampler": "unipc", "steps": 5, "spacing": "karras"}] * 2
    assert (plain["spacing"], spaced["spacing"]) == (None, "karras")
    assert plain["ms_per_image"] == pytest.approx(1000 * plain["wall_s"] / 4)


def test_spacings_multiply_the_few_step_configurations_and_reuse_copies_rows(tmp_path, monkeypatch):
    engines = []
    monkeypatch.setattr(quality.Engine, "from_pretrained", lambda *a, **k: engines.append(FakeEngine()) or engines[-1])
    monkeypatch.setattr(quality, "DigitsJudge", FakeJudge)
    monkeypatch.setattr(quality, "plot", lambda rows, path: path)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"rows": [{"sampler": "ddpm", "steps": 1000, "samples": 4, "frechet": 164.0,
                                             "pass_rate": 0.7, "digits_found": 10, "class_entropy": 0.98,
                                             "wall_s": 600.0}]}))
    out = tmp_path / "out"
    assert quality.main(["--out", str(out), "--n", "4", "--configs", "ddpm:1000", "ddim:3",
                         "--spacings", "trailing", "karras", "--reuse", str(earlier)]) == 0
    rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
    assert [(r["sampler"], r.get("spacing")) for r in rows] == [("ddpm", None), ("ddim", "trailing"), ("ddim", "karras")]
    assert rows[0]["frechet"] == 164.0 and rows[0]["reused_from"] == "earlier.json"  # copied, not measured
    assert [o.get("spacing") for o in engines[0].calls] == ["trailing", "karras"]  # only DDIM-3 ran
    assert all(o["sampler"] == "ddim" for o in engines[0].calls)
