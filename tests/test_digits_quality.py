"""The bundled model's samples look like digits to a classifier trained on the real digits."""

import random

import numpy as np
import pytest

from engine import Engine
from engine.data import load_digits_images

sklearn = pytest.importorskip("sklearn")
CONFIDENT = 0.8  # the judge's probability for its answer


@pytest.fixture(scope="module")
def classifier():
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits_images()
    x = x.flatten(1).numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y.numpy(), test_size=0.25, random_state=random.randrange(1000),
                                              stratify=y.numpy())
    clf = MLPClassifier((256,), max_iter=500, random_state=random.randrange(1000)).fit(x_tr, y_tr)
    held_out = clf.score(x_te, y_te)
    assert held_out >= 0.95, f"the judge itself is weak: {held_out:.3f} on held-out real digits"
    proba = clf.predict_proba(x_te)
    assert (proba.max(1) >= CONFIDENT).mean() >= 0.9  # real digits are recognised with confidence
    return clf


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("digits")


@pytest.mark.parametrize("sampler,steps,n", [("ddpm", 1000, 48), ("ddim", 50, 100)])
def test_samples_are_recognised_digits(classifier, engine, sampler, steps, n):
    images = engine.sample([random.getrandbits(64) for _ in range(n)], sampler=sampler, steps=steps)
    proba = classifier.predict_proba(images.flatten(1).cpu().numpy())
    confident = proba.max(1) >= CONFIDENT
    digits = set(np.argmax(proba, 1)[confident].tolist())
    assert confident.mean() >= 0.7, f"only {confident.mean():.2f} of {sampler}-{steps} samples look like digits"
    # all ten digits appear among the 100 DDIM samples; at least nine among the 48 slower DDPM-1000 ones
    assert len(digits) >= (10 if n >= 100 else 9), sorted(digits)
