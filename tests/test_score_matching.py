"""Tests of score_matching.py: the conditional score and its loss, the score-velocity conversion, the samplers
from p_t0's mean and scale, Theorem 3 (L_SM and L_CSM have the same gradient), Langevin dynamics, and runs."""
import math

import pytest
import torch

import common
import score_matching as sm


def gaussian_fields(kind, m, s):
    """Marginal velocity and score of the path from N(0, I) to data N(m, s^2 I) (independent coupling):
    x_t ~ N(alpha m, (alpha^2 s^2 + beta^2) I);  E[x_1 | x] = m + alpha s^2 / var (x - alpha m),
    E[x_0 | x] = beta / var (x - alpha m);  v = alpha' E[x_1|x] + beta' E[x_0|x];  score = -(x - alpha m) / var."""
    def coeffs(t):
        a, b, da, db = sm.path_coefficients(kind, torch.tensor(float(t), dtype=torch.float64))
        return a, b, da, db, a * a * s * s + b * b

    def v(x, t):
        a, b, da, db, var = coeffs(t)
        return da * m + (da * a * s * s + db * b) / var * (x - a * m)

    def score(x, t):
        a, b, da, db, var = coeffs(t)
        return -(x - a * m) / var
    return v, score


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_csm_target_is_the_gradient_of_the_conditional_log_density(kind):
    """-(x - alpha_t z) / beta_t^2 = grad_x log N(x; alpha_t z, beta_t^2 I) at x = x_t, by autograd."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.95
    xt, target = sm.csm_target(kind, x0, x1, t)
    a, b, _, _ = sm.path_coefficients(kind, t)
    x = xt.clone().requires_grad_(True)
    log_p = -((x - a[:, None] * x1) ** 2).sum(1) / (2 * b ** 2) - 2 * torch.log(b)   # + const
    assert torch.allclose(target, torch.autograd.grad(log_p.sum(), x)[0], atol=1e-12)
    assert torch.allclose(target, -x0 / b[:, None], atol=1e-12)          # = -eps / beta_t


def test_csm_loss_weightings_by_hand():
    """none: mean |s + x_0/beta|^2 with t scaled into [0, 0.99]; beta2: mean |beta s + x_0|^2 at t itself."""
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(50, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(50, 2, generator=g, dtype=torch.float64)
    t = torch.rand(50, generator=g, dtype=torch.float64)
    s_theta = lambda x, t: -x + t[:, None]                        # any fixed field
    t_none = t * 0.99
    xt = t_none[:, None] * x1 + (1 - t_none[:, None]) * x0
    want = ((s_theta(xt, t_none) + x0 / (1 - t_none[:, None])) ** 2).mean()
    assert torch.allclose(sm.csm_loss("linear", "none", s_theta, x0, x1, t), want, rtol=1e-12)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    want = (((1 - t[:, None]) * s_theta(xt, t) + x0) ** 2).mean()
    assert torch.allclose(sm.csm_loss("linear", "beta2", s_theta, x0, x1, t), want, rtol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_velocity_from_the_exact_score_is_the_exact_velocity_for_a_gaussian(kind):
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    v, score = gaussian_fields(kind, m, s)
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for t in (0.05, 0.3, 0.8, 0.97):
        assert torch.allclose(sm.velocity_from_score(kind, x, t, score(x, t)), v(x, t), atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_from_p_t0s_mean_and_scale_the_samplers_land_on_the_gaussian(kind):
    """Data N(m, s^2 I) with its exact score: started at t0 = 0.05 from beta_t0 eps + alpha_t0 m (p_t0 exactly,
    here), the ODE and the SDE land on N(m, s^2 I). Started from N(0, I) instead, as if it were p_t0, they miss:
    the mean by about alpha_t0 m and the spread by the scale beta_t0 (the test that this start is needed)."""
    m, s = torch.tensor([1.5, -0.7], dtype=torch.float64), 0.6
    _, score = gaussian_fields(kind, m, s)
    eps = torch.randn(40000, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for sigma in (0.0, 0.7):                                             # the ODE, then the SDE
        x1 = sm.sample(score, sm.start(kind, 0.05, eps, m), 200, kind, sigma, 0.05, torch.Generator().manual_seed(12))
        assert torch.allclose(x1.mean(0), m, atol=0.012), sigma
        assert torch.allclose(x1.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.012), sigma
    x1 = sm.sample(score, eps, 200, kind, 0.0, 0.05)                    # N(0, I) standing for p_t0
    assert (x1.std(0) - s).abs().max() > 0.02 or (x1.mean(0) - m).abs().max() > 0.04


def test_start_is_beta_eps_plus_alpha_mean():
    eps, mean = torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 5.0])
    assert torch.allclose(sm.start("linear", 0.2, eps, mean), 0.8 * eps + 0.2 * mean)
    a, b = math.sin(math.pi * 0.1), math.cos(math.pi * 0.1)             # cosine path at t = 0.2
    assert torch.allclose(sm.start("cosine", 0.2, eps, mean), b * eps + a * mean)


def test_euler_maruyama_step_by_hand():
    """One step from t0 = 0.5 to 1 (h = 0.5) is the last, so without noise: x + h (v + sigma^2/2 s). Two steps from
    0: the first adds sqrt(h) sigma eps with eps the generator's first draw."""
    kind, x, sigma = "linear", torch.tensor([[1.0, 2.0]], dtype=torch.float64), 0.8
    s_theta = lambda z, t: -z / 2                                        # a fixed field as the score
    s = s_theta(x, 0.5)
    v = sm.velocity_from_score(kind, x, 0.5, s)
    assert torch.allclose(sm.sample(s_theta, x, 1, kind, sigma, 0.5), x + 0.5 * (v + sigma ** 2 / 2 * s))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t0 = 0.2
    h = (1 - t0) / 2
    s = s_theta(x, t0)
    first = x + h * (sm.velocity_from_score(kind, x, t0, s) + sigma ** 2 / 2 * s) + math.sqrt(h) * sigma * noise
    s = s_theta(first, t0 + h)
    second = first + h * (sm.velocity_from_score(kind, first, t0 + h, s) + sigma ** 2 / 2 * s)
    assert torch.allclose(sm.sample(s_theta, x, 2, kind, sigma, t0, g), second)


def test_sampler_from_t0_integrates_over_t0_to_1():
    """The ODE with a score whose velocity is v = t (linear path: v = (x + (1 - t) s)/t, so s = (t^2 - x)/(1 - t)):
    Euler on the grid t0 + k h, h = (1 - t0)/steps, gives x0 + sum_k h t_k exactly."""
    s_theta = lambda x, t: (t * t - x) / (1 - t)
    x1 = sm.sample(s_theta, torch.zeros(1, dtype=torch.float64), 8, "linear", 0.0, 0.2)
    h = 0.8 / 8
    assert float(x1) == pytest.approx(sum(h * (0.2 + k * h) for k in range(8)), rel=1e-12)


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
        xt, target = sm.csm_target("linear", eps, z, t)
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
    assert torch.allclose(sm.mixture_score(x.detach(), means, 0.8, w), exact, atol=1e-5)
    # On N(m, s^2): X' = X - eps (X - m)/s^2 + sqrt(2 eps) xi has the stationary variance v = (1 - eps/s^2)^2 v + 2 eps,
    # v = s^2 / (1 - eps / (2 s^2)) (0.5457 here, not s^2 = 0.49: the discretisation bias), and mean m.
    m, s2, eps, n = torch.tensor([1.0, -2.0]), 0.49, 0.1, 40000
    x = sm.langevin(lambda z: -(z - m) / s2, torch.zeros(n, 2), eps, 300, torch.Generator().manual_seed(16))
    v = s2 / (1 - eps / (2 * s2))
    assert torch.allclose(x.mean(0), m, atol=4 * math.sqrt(v / n))
    assert torch.allclose(x.var(0), torch.full((2,), v), atol=4 * v * math.sqrt(2 / n))   # 4 standard errors


def test_naive_ascent_collapses_and_annealing_fixes_the_weights():
    near, w = torch.tensor([[-1.5, -1.5], [1.5, 1.5]]), torch.tensor([0.2, 0.8])
    x0 = 4 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(17))
    x = sm.naive_ascent(lambda z: sm.mixture_score(z, near, 1.0, w), x0, 20)
    assert torch.cdist(x, near).amin(1).max() < 0.05                    # every point sits on a mode
    far = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
    g = torch.Generator().manual_seed(18)
    plain = sm.langevin(lambda z: sm.mixture_score(z, far, 1.0, w), x0, 0.05, 300, g)
    sigmas = [10 * 0.01 ** (i / 19) for i in range(20)]
    annealed = sm.annealed_langevin(far, 1.0, w, x0, sigmas, 0.05, 50, g)
    near_first = lambda x: float(((x - far[0]).norm(dim=1) < (x - far[1]).norm(dim=1)).float().mean())
    assert abs(near_first(plain) - 0.2) > 0.15                           # trapped where it started: about 0.5
    assert abs(near_first(annealed) - 0.2) < 0.05                        # near the weight 0.2 (the chain's bias)


def test_runs_write_their_outputs_and_reload(tmp_path):
    rec = sm.main(["--steps", "20", "--width", "16", "--out", str(tmp_path), "--n-samples", "100"])
    assert {"mmd", "support_frac"} <= set(rec)
    for f in ("samples.png", "samples.pt", "loss.png", "checkpoint.pt", "metrics.json"):
        assert (tmp_path / f).exists(), f
    again = sm.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "100"])
    assert again["mmd"] == rec["mmd"] and again["steps"] == 0
    rec = sm.main(["--data", "digits", "--steps", "3", "--width", "8", "--out", str(tmp_path / "img"),
                   "--n-samples", "20", "--sample-steps", "2", "--weight", "none", "--sampler", "ode"])
    assert math.isfinite(rec["fd"]) and torch.load(tmp_path / "img" / "samples.pt").shape == (20, 1, 28, 28)


def test_langevin_demo_runs(tmp_path):
    rec = sm.main(["--demo", "langevin", "--n-samples", "300", "--out", str(tmp_path)])
    assert rec["far_mode1_frac"]["langevin"] > 0.3 and (tmp_path / "langevin.png").exists()
    assert rec["steps"] == 0 and (tmp_path / "samples.pt").exists()
    with pytest.raises(common.UserError, match="--t0 in"):
        sm.main(["--t0", "0", "--out", str(tmp_path)])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_probability_flow_likelihood_of_the_exact_score_is_the_gaussian_log_density(kind):
    m, s = torch.tensor([1.5, -0.7]), 0.6
    _, score = gaussian_fields(kind, m, s)
    s_theta = lambda x, t: score(x, float(t[0])).float()
    x1 = m + s * torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    got = sm.log_likelihood(kind, s_theta, x1, 100, 0.05, m, s * s * torch.eye(2))
    exact = torch.distributions.Normal(m, s).log_prob(x1).sum(1)
    assert torch.allclose(got.float(), exact, atol=5e-3)


def test_gif_and_likelihood_of_a_run(tmp_path):
    from PIL import Image
    import numpy as np
    rec = sm.main(["--steps", "20", "--width", "16", "--out", str(tmp_path), "--n-samples", "500", "--gif",
                   "--sample-steps", "3", "--nll-steps", "5"])
    assert rec["kl"] > -4 * rec["kl_se"] and rec["nll"] - rec["data_entropy"] == pytest.approx(rec["kl"], abs=1e-3)
    gif = Image.open(tmp_path / "sde_ode.gif")
    assert gif.n_frames == 4 and (tmp_path / "density.png").exists()
    gif.seek(3)
    last = np.array(gif.convert("RGB"))
    ref = common.sample_2d("checkerboard", 2500, torch.Generator().manual_seed(0))
    samples = torch.load(tmp_path / "samples.pt")
    assert np.array_equal(last[:, :240], common.points_frame(samples, ref))          # the SDE half ends on them
    assert not np.array_equal(last[:, 240:], last[:, :240])                         # the ODE half does not
    rec = sm.main(["--demo", "langevin", "--n-samples", "200", "--out", str(tmp_path / "l"), "--gif"])
    gif = Image.open(tmp_path / "l" / "langevin.gif")
    assert gif.n_frames == 51
    blue = lambda frame: (frame == np.array([31, 119, 180], np.uint8)).all(-1)    # the chains' pixels
    samples = torch.load(tmp_path / "l" / "samples.pt")
    gif.seek(50)
    assert np.array_equal(blue(np.array(gif.convert("RGB"))), blue(common.points_frame(samples)))
