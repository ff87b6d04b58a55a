"""iPNDM (Zhang & Chen 2023) against the paper's formulas, and against a peer that runs it on a
VP model: zju-pi's diff-sampler ``ipndm_sampler`` (EDM form), when a copy of it is at PEER."""

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_engine.samplers import Prediction, ipndm_step
from ddpm_engine.schedules import Tables, make_betas

pytestmark = pytest.mark.usefixtures("seeded")

PEER = Path("/work/ref/zju-pi+diff-sampler/diff-solvers-main")
# Adams-Bashforth weights (the paper's iPNDM, Alg. 2: orders 1 to 4 on this and earlier eps)
PAPER_WEIGHTS = [[1], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24]]


def paper_chain(abar, model, x, spacing_t):
    """The paper's iPNDM written from its formulas, float64: in x~ = x / sqrt(abar) and
    sigma = sqrt((1 - abar) / abar), d = eps, x~' = x~ + (sigma' - sigma) * sum_j w_j d_j, the order
    min(4, k + 1) on the k-th step, the last step to sigma = 0."""
    sigma = np.sqrt((1 - abar) / abar)
    sig = list(sigma[::-1]) + [0.0]
    ts, history = list(spacing_t[::-1]), []
    xt = x / np.sqrt(abar[-1])
    for k in range(len(ts)):
        eps = model(xt * np.sqrt(abar[::-1][k]), k)
        history.insert(0, eps)
        w = PAPER_WEIGHTS[min(4, k + 1) - 1]
        xt = xt + (sig[k + 1] - sig[k]) * sum(wj * d for wj, d in zip(w, history))
    return xt  # sigma = 0: x~ = x


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_reference_steps_are_the_paper_s_formulas(steps):
    """A whole chain of reference steps (state shifted by the caller, as Rows are) equals the
    paper's iPNDM written from its formulas, with a model that depends on x and the step."""
    tables = Tables.build(make_betas(random.choice(["linear", "cosine"]), 1000), steps, "leading")
    tab = tables.on("cpu", torch.float64)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    weights = torch.randn(steps, dtype=torch.float64)
    model = lambda x, k: torch.tanh(x) * weights[k] + 0.1 * k  # noqa: E731
    want = paper_chain(tables.alphas_cumprod, model, x.clone(), tables.timesteps)
    state = [torch.zeros_like(x) for _ in range(3)]
    for k in range(steps):
        i = torch.full((3,), steps - 1 - k)
        x, _, eps = ipndm_step(tab, x, model(x, k), i, *state)
        state = [eps, state[0], state[1]]
    torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-10)


def test_the_first_steps_read_no_older_eps():
    """Orders 1, 2, 3 on the first three steps: NaN in the eps they do not use cannot leak in."""
    steps = 9
    tab = Tables.build(make_betas("linear", 1000), steps, "leading").on("cpu", torch.float64)
    x, out = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    nan, ok = torch.full_like(x, float("nan")), torch.randn_like(x)
    for k, state in enumerate([(nan, nan, nan), (ok, nan, nan), (ok, ok, nan)]):
        x_prev, _, _ = ipndm_step(tab, x, out, torch.full((2,), steps - 1 - k), *state)
        assert torch.isfinite(x_prev).all(), k


@pytest.mark.parametrize("prediction", list(Prediction))
def test_every_prediction_type_steps_alike(prediction):
    """The same eps given as each prediction type gives the same step."""
    tables = Tables.build(make_betas("linear", 1000), 10, "leading")
    tab = tables.on("cpu", torch.float64)
    x, eps = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    i = torch.tensor([9, 5, 1, 0])
    sa = torch.from_numpy(np.sqrt(tables.alphas_cumprod))[i].view(-1, 1, 1)
    s1 = torch.sqrt(1 - sa**2)
    x0 = (x - s1 * eps) / sa
    out = {Prediction.EPSILON: eps, Prediction.SAMPLE: x0, Prediction.V: sa * eps - s1 * x0}[prediction]
    state = [torch.randn_like(x) for _ in range(3)]
    want, _, _ = ipndm_step(tab, x, eps, i, *state)
    got, _, got_eps = ipndm_step(tab, x, out, i, *state, prediction=prediction)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_eps, eps)


def load_peer():
    if not (PEER / "solvers.py").is_file():
        pytest.skip(f"the peer iPNDM (zju-pi diff-sampler) is not at {PEER}")
    sys.path.insert(0, str(PEER))
    try:
        spec = importlib.util.spec_from_file_location("diff_sampler_solvers", PEER / "solvers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(PEER))
    return module.ipndm_sampler


@pytest.mark.parametrize("steps", [3, 5, 10])
def test_engine_chain_matches_the_peer_ipndm_sampler(steps):
    """The engine's iPNDM run (plan.start / plan.step) and the peer's ``ipndm_sampler`` (max_order 4)
    on the same VP network, given our sigmas (and 0) as its t_steps and our x_T in its variables."""
    ipndm_sampler = load_peer()
    from ddpm_engine import Engine
    from ddpm_engine.models import SeedUNet

    torch.manual_seed(random.getrandbits(31))
    engine = Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=(1, 8, 8), backend="torch", device="cpu")
    plan = engine.plan("ipndm", steps)
    abar = torch.from_numpy(plan.tables.alphas_cumprod)
    sigma, ts = ((1 - abar) / abar).sqrt(), torch.from_numpy(plan.tables.timesteps)
    net = engine.model.module

    def denoiser(x, s, class_labels=None):  # the peer's D(x; sigma) of our eps network
        k = int(torch.argmin((sigma - s).abs()))
        eps = net((x * abar[k].sqrt()).float(), ts[k].expand(len(x))).double()
        return x - s * eps

    x_T = torch.randn(3, 1, 8, 8)
    theirs = ipndm_sampler(denoiser, (x_T / (1 - abar[-1]).sqrt()).double(),
                           t_steps=torch.cat([sigma.flip(0), torch.zeros(1, dtype=sigma.dtype)]), max_order=4)
    rows = plan.start([1, 2, 3], x_T.clone())
    with torch.inference_mode():
        for _ in range(steps):
            plan.step(rows, net(rows.x, plan.tab.timesteps[rows.i]))
    scale = max(1.0, theirs.abs().max().item())
    assert (rows.x - theirs.float()).abs().max().item() <= 1e-5 * scale
