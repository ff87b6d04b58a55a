"""Regression checks for your own CI, with ddpm_engine.testing.

    python -m pytest examples/test_regression.py

Two checks a model owner keeps:

1. every exported backend still matches eager PyTorch over whole sampling chains (the network at
   every step, the images at the end, NaN/Inf);
2. today's images still match a golden file written once and committed: "did upgrading torch,
   onnxruntime or ddpm-engine change our images?". The first run writes the file and skips.

Put your model folder in MODEL. The project's own test run does not collect this file (its
testpaths are tests/).
"""

from pathlib import Path

import pytest

from ddpm_engine.testing import assert_matches_golden, assert_parity, save_golden

MODEL = "digits"  # a bundled name or your model folder
GOLDEN = Path(__file__).with_name("golden") / "digits-ddim10.npz"


def test_backends_match_eager_torch():
    assert_parity(MODEL, backends=["onnxruntime"], sampler="ddim", steps=10)


def test_images_match_the_golden_file():
    if not GOLDEN.exists():
        save_golden(MODEL, GOLDEN, sampler="ddim", steps=10)
        pytest.skip(f"wrote {GOLDEN}; commit it")
    assert_matches_golden(MODEL, GOLDEN)
