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
    x0 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
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
    assert torch.allclose(x1.mean(0), m, atol=0.02)
    assert torch.allclose(x1.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.02)
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
    assert torch.allclose(x1.mean(0), m, atol=0.02)
    assert torch.allclose(x1.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.03)


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
    three = torch.tensor([[1.0, 0.5], [-1.0, 0.5], [5.0, 0.5]])
    assert fm.support_frac(three) == pytest.approx(1 / 3)                # (0,0) cell only


def test_2d_and_image_runs(tmp_path):
    rec = fm.main(["--steps", "30", "--out", str(tmp_path), "--n-samples", "100", "--hidden", "32",
                   "--coupling", "both"])
    assert "support_frac" in rec and "by_solver" in rec and "ot/euler" in rec["by_solver"]
    for f in ("samples.png", "samples.pt", "loss.png", "trajectories.png", "path.png", "field.png", "nfe.png"):
        assert (tmp_path / f).exists(), f
    again = fm.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "100", "--coupling", "both"])
    assert again["steps"] == 0 and again["mmd"] == rec["mmd"]                # same weights, same seeded draws
    rec = fm.main(["--data", "digits", "--steps", "5", "--ch", "8", "--out", str(tmp_path / "img"), "--n-samples", "50",
                   "--sample-steps", "3", "--cond", "--guidance", "2"])
    assert "class_accuracy" in rec and rec["network_calls"] == 6          # 3 steps, 2 calls each (guided)
    rec = fm.main(["--steps", "5", "--hidden", "16", "--out", str(tmp_path / "sde"), "--n-samples", "100",
                   "--sampler", "sde"])
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


# ----------------------------------------------------------------------------- the score side (issue 19)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_csm_target_is_the_gradient_of_the_conditional_log_density(kind):
    """-(x - alpha_t z) / beta_t^2 = grad_x log N(x; alpha_t z, beta_t^2 I) at x = x_t, by autograd."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.95
    xt, target = fm.csm_target(kind, x0, x1, t)
    a, b, _, _ = fm.path_coefficients(kind, t)
    x = xt.clone().requires_grad_(True)
    log_p = -((x - a[:, None] * x1) ** 2).sum(1) / (2 * b ** 2) - 2 * torch.log(b)   # + const
    assert torch.allclose(target, torch.autograd.grad(log_p.sum(), x)[0], atol=1e-12)
    assert torch.allclose(target, -x0 / b[:, None], atol=1e-12)          # = -eps / beta_t


def test_csm_loss_weightings_by_hand():
    """none: mean |s + x_0/beta|^2 with t scaled into [0, T_MAX]; beta2: mean |beta s + x_0|^2 at t itself."""
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(50, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(50, 2, generator=g, dtype=torch.float64)
    t = torch.rand(50, generator=g, dtype=torch.float64)
    s_theta = lambda x, t, y=None: -x + t[:, None]                        # any fixed field
    t_none = t * fm.T_MAX
    xt = t_none[:, None] * x1 + (1 - t_none[:, None]) * x0
    want = ((s_theta(xt, t_none) + x0 / (1 - t_none[:, None])) ** 2).mean()
    assert torch.allclose(fm.csm_loss("linear", "none", s_theta, x0, x1, t), want, rtol=1e-12)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    want = (((1 - t[:, None]) * s_theta(xt, t) + x0) ** 2).mean()
    assert torch.allclose(fm.csm_loss("linear", "beta2", s_theta, x0, x1, t), want, rtol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_score_and_velocity_conversions_are_inverse_and_exact_for_a_gaussian(kind):
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    v, score = gaussian_fields(kind, m, s)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for t in (0.05, 0.3, 0.8, 0.97):
        assert torch.allclose(fm.velocity_from_score(kind, x, t, score(x, t)), v(x, t), atol=1e-10)
        w = torch.randn(10, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)   # any field
        assert torch.allclose(fm.velocity_from_score(kind, x, t, fm.score_from_velocity(kind, x, t, w)), w, atol=1e-10)
        assert torch.allclose(fm.score_from_velocity(kind, x, t, fm.velocity_from_score(kind, x, t, w)), w, atol=1e-10)


def test_score_route_samplers_transport_to_the_gaussian():
    """With the exact score of the path to N(m, s^2 I), the ODE (v from s) and the SDE land on N(m, s^2 I), when
    started at t0 = 0.01. (Starting N(0, I) at t0 stands for p_t0, whose mean is t0 m: an O(t0) bias; the default
    T0_SCORE = 0.05 is a trade-off measured with learned scores, README.)"""
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    _, score = gaussian_fields("linear", m, s)
    x0 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for sampler in ("ode", "sde"):
        x1, calls = fm.sample(score, x0, 200, sampler=sampler, sigma=0.7, kind="linear",
                              gen=torch.Generator().manual_seed(12), objective="score", t0=0.01)
        assert calls == 200
        assert torch.allclose(x1.mean(0), m, atol=0.02), sampler
        assert torch.allclose(x1.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.02), sampler


def test_sampler_from_t0_integrates_over_t0_to_1():
    """dx/dt = t from t0 = 0.2: Euler on the grid t0 + k h, h = (1 - t0)/steps, gives x0 + sum_k h t_k exactly."""
    x1, calls = fm.sample(lambda x, t: torch.full_like(x, t), torch.zeros(1, dtype=torch.float64), 8, t0=0.2)
    h = 0.8 / 8
    assert calls == 8 and float(x1) == pytest.approx(sum(h * (0.2 + k * h) for k in range(8)), rel=1e-12)


def mixture_marginal_score(x, t, means, std, weights):
    """grad log p_t for data sum_k w_k N(mu_k, std^2 I) on the linear path: p_t = sum_k w_k N(t mu_k, var_t I),
    var_t = t^2 std^2 + (1 - t)^2 (a closed form, independent of flow_matching.py)."""
    var = (t ** 2 * std ** 2 + (1 - t) ** 2)[:, None]                   # (N, 1)
    diff = t[:, None, None] * means[None] - x[:, None]                  # (N, K, 2)
    logits = -(diff ** 2).sum(-1) / (2 * var) + weights.log()[None]
    return (torch.softmax(logits, 1)[:, :, None] * diff).sum(1) / var


def test_theorem_3_score_matching_and_conditional_score_matching_have_the_same_gradient():
    r"""002 Theorem 3: grad_theta L_SM = grad_theta L_CSM. Monte Carlo over M = 25 batches of 4000 (t, z, eps) with
    t ~ U[0, 0.9], shared by both losses; D_b = grad L_SM(batch b) - grad L_CSM(batch b) has mean 0 under the
    theorem, so each parameter's z = mean(D) / (std(D) / sqrt(M)) is t-distributed with 24 degrees of freedom:
    P(|z| > 5) = 4e-5, so max |z| over the 194 parameters exceeds 5 with probability < 1% (a union bound; the
    parameters are correlated, so mean z^2 is too noisy to test). The same statistic is large for the gradient
    itself (the test is not vacuous) and for a wrong target, -eps/beta^2 (grows with the sample size)."""
    torch.manual_seed(13)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    params = list(net.parameters())
    means = torch.tensor([[-1.0, 0.0], [1.5, 1.0]], dtype=torch.float64)
    weights, std = torch.tensor([0.3, 0.7], dtype=torch.float64), 0.5
    g = torch.Generator().manual_seed(14)

    def grad(loss):
        return torch.cat([p.flatten() for p in torch.autograd.grad(loss, params, retain_graph=True)])
    d_true, d_wrong, g_csm = [], [], []
    for _ in range(25):
        k = torch.multinomial(weights, 4000, replacement=True, generator=g)
        z = means[k] + std * torch.randn(4000, 2, generator=g, dtype=torch.float64)   # z ~ p_1 (the data)
        eps = torch.randn(4000, 2, generator=g, dtype=torch.float64)
        t = 0.9 * torch.rand(4000, generator=g, dtype=torch.float64)
        xt, target = fm.csm_target("linear", eps, z, t)
        s = net(torch.cat([xt, t[:, None]], 1))
        l_sm = ((s - mixture_marginal_score(xt, t, means, std, weights)) ** 2).sum(1).mean()
        l_csm = ((s - target) ** 2).sum(1).mean()
        l_wrong = ((s + eps / (1 - t[:, None]) ** 2) ** 2).sum(1).mean()   # not the conditional score
        g_sm = grad(l_sm)
        g_c = grad(l_csm)
        d_true.append(g_sm - g_c)
        d_wrong.append(g_sm - grad(l_wrong))
        g_csm.append(g_c)

    def z_scores(d):
        d = torch.stack(d)
        return d.mean(0) / (d.std(0) / math.sqrt(len(d)))
    z = z_scores(d_true)
    assert z.abs().max() < 5, z.abs().max()
    assert z_scores(g_csm).abs().median() > 5                            # the gradient itself is far from 0
    assert z_scores(d_wrong).abs().max() > 20                            # a wrong target is caught


def test_mixture_score_and_langevin_stationary_law():
    g = torch.Generator().manual_seed(15)
    means, w = torch.tensor([[-1.0, 0.5], [2.0, 1.0]]), torch.tensor([0.3, 0.7])
    x = torch.randn(8, 2, generator=g).requires_grad_(True)
    d2 = ((x[:, None] - means[None]) ** 2).sum(-1)
    log_p = torch.logsumexp(-d2 / (2 * 0.8) + w.log()[None], 1)
    exact = torch.autograd.grad(log_p.sum(), x)[0]
    assert torch.allclose(fm.mixture_score(x.detach(), means, 0.8, w), exact, atol=1e-5)
    # On N(m, s^2): X' = X - eps (X - m)/s^2 + sqrt(2 eps) xi has the stationary variance v = (1 - eps/s^2)^2 v + 2 eps,
    # v = s^2 / (1 - eps / (2 s^2)) (0.5457 here, not s^2 = 0.49: the discretisation bias), and mean m.
    m, s2, eps, n = torch.tensor([1.0, -2.0]), 0.49, 0.1, 40000
    x = fm.langevin(lambda z: -(z - m) / s2, torch.zeros(n, 2), eps, 300, torch.Generator().manual_seed(16))
    v = s2 / (1 - eps / (2 * s2))
    assert torch.allclose(x.mean(0), m, atol=4 * math.sqrt(v / n))
    assert torch.allclose(x.var(0), torch.full((2,), v), atol=4 * v * math.sqrt(2 / n))   # 4 standard errors


def test_naive_ascent_collapses_and_annealing_fixes_the_weights():
    near, w = torch.tensor([[-1.5, -1.5], [1.5, 1.5]]), torch.tensor([0.2, 0.8])
    x0 = 4 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(17))
    x = fm.naive_ascent(lambda z: fm.mixture_score(z, near, 1.0, w), x0, 20)
    assert torch.cdist(x, near).amin(1).max() < 0.05                    # every point sits on a mode
    far = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
    g = torch.Generator().manual_seed(18)
    plain = fm.langevin(lambda z: fm.mixture_score(z, far, 1.0, w), x0, 0.05, 300, g)
    sigmas = [10 * 0.01 ** (i / 19) for i in range(20)]
    annealed = fm.annealed_langevin(far, 1.0, w, x0, sigmas, 0.05, 50, g)
    assert abs(fm.near_first(plain, far) - 0.2) > 0.15                   # trapped where it started: about 0.5
    assert abs(fm.near_first(annealed, far) - 0.2) < 0.05                # 0.23 measured (its bias: see README)


@pytest.mark.slow  # suite time; the score objective's math has its own quick tests
def test_score_objective_and_langevin_runs(tmp_path):
    rec = fm.main(["--steps", "20", "--hidden", "16", "--out", str(tmp_path), "--n-samples", "100",
                   "--objective", "both"])
    assert set(rec["by_objective"]) == {"velocity/ode", "velocity/sde", "score/ode", "score/sde"}
    assert "score/euler" in rec["by_solver"] and (tmp_path / "objectives.png").exists()
    again = fm.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "100"])
    assert again["by_objective"] == rec["by_objective"]
    rec = fm.main(["--data", "digits", "--steps", "3", "--ch", "8", "--out", str(tmp_path / "img"), "--n-samples", "20",
                   "--sample-steps", "2", "--objective", "score", "--weight", "beta2", "--sampler", "sde"])
    assert math.isfinite(rec["fd"])
    rec = fm.main(["--demo", "langevin", "--n-samples", "300", "--out", str(tmp_path / "lv")])
    assert rec["far_mode1_frac"]["langevin"] > 0.3 and (tmp_path / "lv" / "langevin.png").exists()
    assert rec["steps"] == 0 and (tmp_path / "lv" / "samples.pt").exists()
    with pytest.raises(common.UserError, match="needs --coupling independent"):
        fm.main(["--objective", "score", "--coupling", "ot", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- marginalization trick (issue 20, part 3)
def test_marginal_field_flows_noise_onto_the_points_in_equal_shares():
    angles = torch.arange(8) * 2 * math.pi / 8
    points = 3 * torch.stack([angles.cos(), angles.sin()], 1).double()
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    x1, _ = fm.sample(lambda x, t: fm.marginal_velocity("linear", x, t, points), x0, 100)
    d = torch.cdist(x1, points)
    assert d.amin(1).max() < 0.01                                        # every path ends on one of the points
    shares = torch.bincount(d.argmin(1), minlength=8) / 4000.0
    assert (shares - 1 / 8).abs().max() < 4 * math.sqrt(1 / 8 * 7 / 8 / 4000)   # each gets 1/8, within 4 s.e.


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_marginalization_trick_flow_matching_and_conditional_flow_matching_have_the_same_gradient(kind):
    r"""002 "The marginalization trick": grad L_FM = grad L_CFM, L_FM against the exact u_t of 8 points, L_CFM
    against alpha' z + beta' x_0; the same Monte Carlo statistic as Theorem 3's test (25 batches of 4000)."""
    torch.manual_seed(20)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    params = list(net.parameters())
    points = torch.randn(8, 2, generator=torch.Generator().manual_seed(21), dtype=torch.float64) * 2
    g = torch.Generator().manual_seed(22)

    def grad(loss):
        return torch.cat([p.flatten() for p in torch.autograd.grad(loss, params, retain_graph=True)])
    d_true, g_cfm = [], []
    for _ in range(25):
        z = points[torch.randint(8, (4000,), generator=g)]
        x0 = torch.randn(4000, 2, generator=g, dtype=torch.float64)
        t = 0.9 * torch.rand(4000, generator=g, dtype=torch.float64)
        xt, target = fm.cfm_target(kind, x0, z, t)
        u = fm.marginal_velocity(kind, xt, t, points)
        v = net(torch.cat([xt, t[:, None]], 1))
        g_fm = grad(((v - u) ** 2).sum(1).mean())
        g_c = grad(((v - target) ** 2).sum(1).mean())
        d_true.append(g_fm - g_c)
        g_cfm.append(g_c)
    z_scores = lambda d: torch.stack(d).mean(0) / (torch.stack(d).std(0) / 5)
    assert z_scores(d_true).abs().max() < 5
    assert z_scores(g_cfm).abs().median() > 5                            # not vacuous: the gradient is far from 0


def test_marginal_demo_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "MARGINAL_STEPS", 800)                       # the demo trains 3000
    rec = fm.main(["--demo", "marginal", "--n-samples", "300", "--out", str(tmp_path)])
    assert rec["endpoint_to_point_max"] < 0.01 and (tmp_path / "marginal.png").exists()
    assert rec["rel_error_t0.5"] < 0.3 and rec["steps"] == 800           # the trained field approaches u_t


# ----------------------------------------------------------------------------- data coupling (issue 20, part 4)
def test_corruptions():
    g = torch.Generator().manual_seed(23)
    x = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    m = fm.corrupt("mask", x)
    assert torch.equal(m[:, :, :14], x[:, :, :14]) and (m[:, :, 14:] == -1).all()   # lower half black, upper kept
    assert torch.allclose(fm.corrupt("blur", torch.full_like(x, 0.3)), torch.full_like(x, 0.3))
    checker = (torch.arange(28)[:, None] + torch.arange(28)[None]) % 2 * 2.0 - 1   # +-1 at the pixel scale
    assert fm.corrupt("blur", checker.expand(1, 1, 28, 28)).abs().max() < 1e-6     # 2x2 averages remove it


def test_corrupt_coupling_runs(tmp_path):
    rec = fm.main(["--data", "digits", "--coupling", "corrupt", "--corrupt", "blur", "--steps", "3", "--ch", "8",
                   "--n-samples", "20", "--sample-steps", "4", "--solver", "midpoint", "--out", str(tmp_path)])
    assert rec["corrupted_mae"] > 0 and "restoration_mae" in rec and "class_accuracy" in rec
    assert rec["network_calls"] == 8                                     # 4 midpoint steps, 2 calls each
    assert (tmp_path / "restoration.png").exists()
    with pytest.raises(common.UserError, match="--coupling corrupt restores images"):
        fm.main(["--coupling", "corrupt", "--out", str(tmp_path / "pts")])


@pytest.mark.slow  # suite time; test_reliability checks --sample-only reading the model flags
def test_sample_only_of_an_image_run_takes_the_image_defaults(tmp_path):
    """--sample-only reads --data from the checkpoint, and with it the image default of --n-samples (1000, not
    the 2-D 2500): the same samples as the training run."""
    rec = fm.main(["--data", "digits", "--steps", "2", "--ch", "8", "--sample-steps", "2", "--out", str(tmp_path)])
    again = fm.main(["--sample-only", "--sample-steps", "2", "--out", str(tmp_path)])
    assert again["config"]["n_samples"] == 1000 and again["fd"] == rec["fd"]
