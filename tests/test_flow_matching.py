"""Tests of flow_matching.py: the Gaussian path, the CFM target, ODE/SDE samplers with analytic fields, CFG, OT."""
import math

import pytest
import torch

import common
import flow_matching as fm


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_conditional_path_mean_and_std(kind):
    g = torch.Generator().manual_seed(0)
    x1 = torch.full((200000, 2), 1.5)
    for t in (0.1, 0.5, 0.9):
        xt, _ = fm.cfm_target(kind, torch.randn(200000, 2, generator=g), x1, torch.full((200000,), t))
        a, b, _, _ = fm.path_coefficients(kind, torch.tensor(t))
        assert torch.allclose(xt.mean(0), a * x1[0], atol=0.01) and torch.allclose(xt.std(0), b.expand(2), atol=0.01)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_target_is_time_derivative_of_x_t(kind):
    g = torch.Generator().manual_seed(1)
    x0, x1, t = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64), \
        torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    _, target = fm.cfm_target(kind, x0, x1, t)
    fd = (fm.cfm_target(kind, x0, x1, t + h)[0] - fm.cfm_target(kind, x0, x1, t - h)[0]) / (2 * h)
    assert torch.allclose(target, fd, atol=1e-8)
    if kind == "linear":
        assert torch.allclose(target, x1 - x0)


def gaussian_fields(kind, m, s):
    """Marginal velocity and score of the path from N(0, I) to data N(m, s^2 I) (independent coupling):
    x_t ~ N(alpha m, (alpha^2 s^2 + beta^2) I);  E[x_1 | x] = m + alpha s^2 / var (x - alpha m),
    E[x_0 | x] = beta / var (x - alpha m);  v = alpha' E[x_1|x] + beta' E[x_0|x];  score = -(x - alpha m) / var."""
    def coeffs(t):
        a, b, da, db = fm.path_coefficients(kind, torch.tensor(float(t), dtype=torch.float64))
        return a, b, da, db, a * a * s * s + b * b
    def v(x, t):
        a, b, da, db, var = coeffs(t)
        return da * m + (da * a * s * s + db * b) / var * (x - a * m)
    def score(x, t):
        a, b, da, db, var = coeffs(t)
        return -(x - a * m) / var
    return v, score


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_euler_with_analytic_velocity_transports_to_the_gaussian(kind):
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    v, _ = gaussian_fields(kind, m, s)
    x0 = torch.randn(100000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x1, calls = fm.sample(v, x0, 200, "euler", kind=kind)
    assert calls == 200
    assert torch.allclose(x1.mean(0), m, atol=0.02) and torch.allclose(x1.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.02)
    x1h, calls = fm.sample(v, x0, 20, "heun", kind=kind)                  # a second-order solver, fewer steps
    assert calls == 40 and torch.allclose(x1h.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.02)


@pytest.mark.parametrize("solver, calls_per_step, factor", [
    ("euler", 1, lambda t, h: 1 + h * t),                                # x + h v(x, t)
    ("midpoint", 2, lambda t, h: 1 + h * (t + h / 2) * (1 + h * t / 2)),  # x + h v(x + h/2 v, t + h/2)
    ("heun", 2, lambda t, h: 1 + h / 2 * (t + (t + h) * (1 + h * t))),   # x + h/2 (v + v(x + h v, t + h))
])
def test_each_solver_step_on_dx_dt_equal_t_x(solver, calls_per_step, factor):
    """On v(x, t) = t x each step multiplies x by its solver's factor, written out by hand; exact flow: e^{1/2}."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x1, calls = fm.sample(lambda x, t: t * x, x0, 10, solver)
    assert calls == 10 * calls_per_step
    assert torch.allclose(x1, x0 * math.prod(factor(k / 10, 0.1) for k in range(10)), rtol=1e-12)
    assert torch.allclose(x1, x0 * math.exp(0.5), rtol=0.07 if solver == "euler" else 2e-3)   # 1st vs 2nd order


def test_score_from_velocity_and_sde_sampler():
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    v, score = gaussian_fields("linear", m, s)
    x = torch.randn(10, 2, dtype=torch.float64)
    for t in (0.0, 0.3, 0.8):
        assert torch.allclose(fm.score_from_velocity("linear", x, t, v(x, t)), score(x, t), atol=1e-10)
        assert torch.allclose(fm.score_from_velocity("cosine", x, t, gaussian_fields("cosine", m, s)[0](x, t)),
                              gaussian_fields("cosine", m, s)[1](x, t), atol=1e-10)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(100000, 2, generator=g, dtype=torch.float64)
    x1, _ = fm.sample(v, x0, 500, sampler="sde", sigma=0.7, kind="linear", gen=g)   # same marginals as the ODE
    assert torch.allclose(x1.mean(0), m, atol=0.02) and torch.allclose(x1.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.03)


def test_cfg_combination():
    class Fake(torch.nn.Module):
        n_classes = 10

        def forward(self, x, t, y):
            return torch.where(y == 10, 1.0, 3.0)[:, None] * torch.ones_like(x)
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(fm.velocity(Fake(), x, 0.3, y, 2.0), torch.full_like(x, (1 - 2) * 1.0 + 2 * 3.0))
    assert torch.allclose(fm.velocity(Fake(), x, 0.3, y, 1.0), torch.full_like(x, 3.0))
    assert torch.allclose(fm.velocity(Fake(), x, 0.3, y, 0.0), torch.full_like(x, 1.0))


def test_ot_pairs_are_shorter_than_random_pairs():
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(256, 2, generator=g), common.sample_2d("checkerboard", 256, g)
    paired = fm.ot_pairs(x0, x1, g)
    assert paired.shape == x0.shape and all(any(torch.equal(p, q) for q in x0[:]) for p in paired[:10])
    assert (paired - x1).pow(2).sum(1).mean() < 0.6 * (x0 - x1).pow(2).sum(1).mean()


def test_support_frac():
    assert fm.support_frac(common.sample_2d("checkerboard", 5000)) == 1.0
    assert fm.support_frac(torch.tensor([[1.0, 0.5], [-1.0, 0.5], [5.0, 0.5]])) == pytest.approx(1 / 3)   # (0,0) cell only


def test_2d_and_image_runs(tmp_path):
    rec = fm.main(["--steps", "30", "--out", str(tmp_path), "--n-samples", "100", "--hidden", "32", "--coupling", "both"])
    assert "support_frac" in rec and "by_solver" in rec and "ot/euler" in rec["by_solver"]
    for f in ("samples.png", "samples.pt", "loss.png", "trajectories.png", "path.png", "field.png", "nfe.png"):
        assert (tmp_path / f).exists(), f
    again = fm.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "100", "--coupling", "both"])
    assert again["steps"] == 0 and again["mmd"] == rec["mmd"]                # same weights, same seeded draws
    rec = fm.main(["--data", "digits", "--steps", "5", "--ch", "8", "--out", str(tmp_path / "img"), "--n-samples", "50",
                   "--sample-steps", "3", "--cond", "--guidance", "2"])
    assert "class_accuracy" in rec and rec["network_calls"] == 6          # 3 steps, 2 calls each (guided)
    rec = fm.main(["--steps", "5", "--hidden", "16", "--out", str(tmp_path / "sde"), "--n-samples", "100", "--sampler", "sde"])
    assert math.isfinite(rec["mmd"])


def test_bad_input(tmp_path):
    with pytest.raises(common.UserError, match="--cond needs labelled image data"):
        fm.main(["--cond", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--guidance needs --cond"):
        fm.main(["--guidance", "3", "--out", str(tmp_path)])


def test_own_sinkhorn_plan_matches_sinkhorn_py():
    import sinkhorn
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(50, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(50, 2, generator=g, dtype=torch.float64) + 3
    C = torch.cdist(x0, x1) ** 2
    C = C / C.mean()
    w = torch.full((50,), 1 / 50, dtype=torch.float64)
    P = fm.sinkhorn_plan(C, 0.05, tol=1e-10)
    ref = sinkhorn.sinkhorn(w, w, C, 0.05, tol=1e-10, method="log")["plan"]   # an independent solver
    assert torch.allclose(P, ref, atol=1e-9)
    assert torch.allclose(P.sum(0), w, atol=1e-9) and torch.allclose(P.sum(1), w, atol=1e-9)
