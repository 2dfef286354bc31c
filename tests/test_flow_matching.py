"""Tests of flow_matching.py: the Gaussian path, the CFM target and loss, Euler and midpoint with analytic fields,
classifier-free guidance, the OT and data couplings, and the marginalization trick."""
import math

import pytest
import torch

import common
import flow_matching as fm


def test_conditional_path_mean_and_std():
    g = torch.Generator().manual_seed(0)
    x1 = torch.full((200000, 2), 1.5)
    for t in (0.1, 0.5, 0.9):
        xt, _ = fm.cfm_target(torch.randn(200000, 2, generator=g), x1, torch.full((200000,), t))
        assert torch.allclose(xt.mean(0), t * x1[0], atol=0.01)                 # alpha_t x_1, alpha_t = t
        assert torch.allclose(xt.std(0), torch.full((2,), 1 - t), atol=0.01)    # beta_t = 1 - t


def test_target_is_time_derivative_of_x_t():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    _, target = fm.cfm_target(x0, x1, t)
    fd = (fm.cfm_target(x0, x1, t + h)[0] - fm.cfm_target(x0, x1, t - h)[0]) / (2 * h)
    assert torch.allclose(target, fd, atol=1e-8)
    assert torch.allclose(target, x1 - x0)


def test_cfm_loss_is_the_mean_squared_distance_to_the_target():
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g) + 3
    t = torch.rand(40, generator=g)
    v_theta = lambda x, t, y=None: 2 * x - t[:, None]                    # any fixed field
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    want = ((v_theta(xt, t) - (x1 - x0)) ** 2).mean()                     # the slide's norm / d, over the batch
    assert torch.allclose(fm.cfm_loss(v_theta, x0, x1, t), want)


def gaussian_velocity(m, s):
    """The marginal velocity of the linear path from N(0, I) to data N(m, s^2 I) (independent coupling):
    x_t ~ N(t m, var I), var = t^2 s^2 + (1 - t)^2;
    v = E[x_1 - x_0 | x_t = x] = m + (t s^2 - (1 - t)) / var (x - t m)."""
    def v(x, t):
        var = t * t * s * s + (1 - t) ** 2
        return m + (t * s * s - (1 - t)) / var * (x - t * m)
    return v


def test_euler_and_midpoint_with_the_exact_velocity_transport_to_the_gaussian():
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    x0 = torch.randn(100000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x1, calls = fm.sample(gaussian_velocity(m, s), x0, 200, "euler")
    assert calls == 200
    assert torch.allclose(x1.mean(0), m, atol=0.02)
    assert torch.allclose(x1.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.02)
    x1m, calls = fm.sample(gaussian_velocity(m, s), x0, 20, "midpoint")   # a second-order solver, fewer steps
    assert calls == 40 and torch.allclose(x1m.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.02)


@pytest.mark.parametrize("solver, calls_per_step, factor", [
    ("euler", 1, lambda t, h: 1 + h * t),                                # x + h v(x, t)
    ("midpoint", 2, lambda t, h: 1 + h * (t + h / 2) * (1 + h * t / 2)),  # x + h v(x + h/2 v, t + h/2)
])
def test_each_solver_step_on_dx_dt_equal_t_x(solver, calls_per_step, factor):
    """On v(x, t) = t x each step multiplies x by its solver's factor, written out by hand; exact flow: e^{1/2}."""
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x1, calls = fm.sample(lambda x, t: t * x, x0, 10, solver)
    assert calls == 10 * calls_per_step
    assert torch.allclose(x1, x0 * math.prod(factor(k / 10, 0.1) for k in range(10)), rtol=1e-12)
    assert torch.allclose(x1, x0 * math.exp(0.5), rtol=0.07 if solver == "euler" else 2e-3)   # 1st vs 2nd order


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


def test_ot_pairs_shorten_image_pairs_too():
    """In 784 dimensions noise is about equally far from every digit: the costs differ little from their row and
    column minima. An eps set from the reduced cost still gets most of the exact plan's gain there (an eps from
    the mean cost, about 30 times larger, leaves the plan almost the independent coupling: a sixth of the gain)."""
    import metrics
    g = torch.Generator().manual_seed(5)
    x1 = common.load_images("digits", "train")[0][:64] * 2 - 1
    x0 = torch.randn(x1.shape, generator=g)
    cost = lambda a: float((a - x1).pow(2).flatten(1).sum(1).mean())
    C = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()) ** 2
    exact = float(C[metrics.assignment(C.T), torch.arange(64)].mean())  # the optimal permutation's cost
    gain = cost(x0) - cost(fm.ot_pairs(x0, x1, g))
    assert gain > 0.7 * (cost(x0) - exact), (gain, cost(x0) - exact)


def test_own_sinkhorn_plan_has_the_marginals_and_the_form_of_the_entropic_plan():
    """P = diag(u) K diag(v), K = exp(-C / eps), with both marginals 1/n: log P + C / eps = log u_i + log v_j has
    no interaction term; and sinkhorn.py's log-domain solver, where it is present, finds the same plan."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(50, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(50, 2, generator=g, dtype=torch.float64) + 3
    C = torch.cdist(x0, x1) ** 2
    C = C / C.mean()
    P = fm.sinkhorn_plan(C, 0.05, tol=1e-10)
    w = torch.full((50,), 1 / 50, dtype=torch.float64)
    assert torch.allclose(P.sum(0), w, atol=1e-9) and torch.allclose(P.sum(1), w, atol=1e-9)
    L = P.log() + C / 0.05
    assert torch.allclose(L - L[:, :1] - L[:1] + L[0, 0], torch.zeros_like(L), atol=1e-6)
    sinkhorn = pytest.importorskip("sinkhorn", reason="sinkhorn.py is not beside this test")
    ref = sinkhorn.sinkhorn(w, w, C, 0.05, tol=1e-10, method="log")["plan"]   # an independent solver
    assert torch.allclose(fm.sinkhorn_plan(C, 0.05, tol=1e-10), ref, atol=1e-9)


def test_2d_and_image_runs(tmp_path):
    rec = fm.main(["--steps", "30", "--out", str(tmp_path), "--n-samples", "100", "--width", "32", "--coupling", "ot"])
    assert "support_frac" in rec and rec["network_calls"] == 20
    for f in ("samples.png", "samples.pt", "loss.png", "trajectories.png"):
        assert (tmp_path / f).exists(), f
    again = fm.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "100"])
    assert again["steps"] == 0 and again["mmd"] == rec["mmd"]                # same weights, same seeded draws
    assert again["config"]["coupling"] == "ot"                              # read from the checkpoint
    rec = fm.main(["--data", "digits", "--steps", "5", "--width", "8", "--out", str(tmp_path / "img"),
                   "--n-samples", "50", "--sample-steps", "3", "--cond", "--guidance", "2"])
    assert "class_accuracy" in rec and rec["network_calls"] == 6          # 3 steps, 2 calls each (guided)


def test_bad_input(tmp_path):
    with pytest.raises(common.UserError, match="--cond needs labelled image data"):
        fm.main(["--cond", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--guidance needs --cond"):
        fm.main(["--guidance", "3", "--out", str(tmp_path)])


def test_a_score_checkpoint_names_score_matching(tmp_path):
    common.save_checkpoint(str(tmp_path / "checkpoint.pt"), script="flow_matching", step=3,
                           config={"objective": "score"})
    with pytest.raises(common.UserError, match="--objective score run: that model now lives in score_matching.py"):
        fm.main(["--sample-only", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- the marginalization trick
def test_marginal_field_flows_noise_onto_the_points_in_equal_shares():
    angles = torch.arange(8) * 2 * math.pi / 8
    points = 3 * torch.stack([angles.cos(), angles.sin()], 1).double()
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    x1, _ = fm.sample(lambda x, t: fm.marginal_velocity(x, t, points), x0, 100)
    d = torch.cdist(x1, points)
    assert d.amin(1).max() < 0.01                                        # every path ends on one of the points
    shares = torch.bincount(d.argmin(1), minlength=8) / 4000.0
    assert (shares - 1 / 8).abs().max() < 4 * math.sqrt(1 / 8 * 7 / 8 / 4000)   # each gets 1/8, within 4 s.e.


def test_marginal_velocity_of_two_points_by_hand():
    """Points z_1 = (2, 0), z_2 = (-2, 0), x = (0.5, 0) at t = 0.5: the posterior weights are a softmax of
    -|x - alpha z_i|^2 / (2 beta^2) = -0.5, -4.5, and u = w_1 u(x|z_1) + w_2 u(x|z_2),
    u(x|z) = z - (x - t z)/(1 - t)."""
    points = torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    w1 = 1 / (1 + math.exp(-4.0))
    u1, u2 = 2 - (0.5 - 1.0) / 0.5, -2 - (0.5 + 1.0) / 0.5
    want = torch.tensor([[w1 * u1 + (1 - w1) * u2, 0.0]], dtype=torch.float64)
    assert torch.allclose(fm.marginal_velocity(x, 0.5, points), want, atol=1e-12)


def test_marginalization_trick_flow_matching_and_conditional_flow_matching_have_the_same_gradient():
    r"""002 "The marginalization trick": grad L_FM = grad L_CFM, L_FM against the exact u_t of 8 points, L_CFM
    against alpha' z + beta' x_0. Monte Carlo over 25 batches of 4000: D_b = grad L_FM(b) - grad L_CFM(b) has mean 0,
    so each parameter's z = mean(D) / (std(D) / 5) is t-distributed with 24 degrees of freedom, and max |z| over the
    parameters exceeds 5 with probability < 1% (a union bound); the gradient itself gives large z (not vacuous)."""
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
        xt, target = fm.cfm_target(x0, z, t)
        u = fm.marginal_velocity(xt, t, points)
        v = net(torch.cat([xt, t[:, None]], 1))
        g_fm = grad(((v - u) ** 2).sum(1).mean())
        g_c = grad(((v - target) ** 2).sum(1).mean())
        d_true.append(g_fm - g_c)
        g_cfm.append(g_c)
    z_scores = lambda d: torch.stack(d).mean(0) / (torch.stack(d).std(0) / 5)
    assert z_scores(d_true).abs().max() < 5
    assert z_scores(g_cfm).abs().median() > 5                            # not vacuous: the gradient is far from 0


def test_marginal_demo_runs(tmp_path):
    rec = fm.main(["--demo", "marginal", "--n-samples", "300", "--out", str(tmp_path)])
    assert rec["endpoint_to_point_max"] < 0.01 and (tmp_path / "marginal.png").exists()
    assert rec["rel_error_t0.5"] < 0.3 and rec["steps"] == 3000           # the trained field approaches u_t


# ----------------------------------------------------------------------------- data coupling
def test_corrupt_masks_the_lower_half():
    g = torch.Generator().manual_seed(23)
    x = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    m = fm.corrupt(x)
    assert torch.equal(m[:, :, :14], x[:, :, :14]) and (m[:, :, 14:] == -1).all()   # lower half black, upper kept
    assert not torch.equal(m, x)


def test_corrupt_coupling_runs(tmp_path):
    rec = fm.main(["--data", "digits", "--coupling", "corrupt", "--steps", "3", "--width", "8", "--n-samples", "20",
                   "--sample-steps", "4", "--solver", "midpoint", "--out", str(tmp_path)])
    assert rec["corrupted_mae"] > 0 and "restoration_mae" in rec and "class_accuracy" in rec
    assert rec["network_calls"] == 8                                     # 4 midpoint steps, 2 calls each
    assert (tmp_path / "restoration.png").exists()
    with pytest.raises(common.UserError, match="--coupling corrupt restores images"):
        fm.main(["--coupling", "corrupt", "--out", str(tmp_path / "pts")])


@pytest.mark.slow  # suite time; test_reliability checks --sample-only reading the model flags
def test_sample_only_of_an_image_run_takes_the_image_defaults(tmp_path):
    """--sample-only reads --data from the checkpoint, and with it the image default of --n-samples (1000, not
    the 2-D 2500): the same samples as the training run."""
    rec = fm.main(["--data", "digits", "--steps", "2", "--width", "8", "--sample-steps", "2", "--out", str(tmp_path)])
    again = fm.main(["--sample-only", "--sample-steps", "2", "--out", str(tmp_path)])
    assert again["config"]["n_samples"] == 1000 and again["fd"] == rec["fd"]


def gaussian_field(m, s):
    """The exact marginal field of the linear path from N(0, I) to N(m, diag s^2): x_t ~ N(t m, sigma_t^2),
    sigma_t^2 = t^2 s^2 + (1 - t)^2, v_t(x) = m + sigma_t'/sigma_t (x - t m), sigma_t sigma_t' = t s^2 - (1 - t)."""
    def v(x, t):
        var = t * t * s * s + (1 - t) ** 2
        return m + (t * s * s - (1 - t)) / var * (x - t * m)
    return v


def test_log_likelihood_of_the_exact_field_is_the_gaussian_log_density():
    m, s = torch.tensor([1.5, -0.7]), torch.tensor([0.6, 1.3])
    x1 = m + s * torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    exact = torch.distributions.Normal(m, s).log_prob(x1).sum(1)
    assert torch.allclose(fm.log_likelihood(gaussian_field(m, s), x1, 200), exact, atol=2e-3)
    euler = fm.log_likelihood(gaussian_field(m, s), x1, 2000, "euler")
    assert torch.allclose(euler, exact, atol=2e-2)                         # first order: converges, more slowly
    assert (euler - exact).abs().mean() > 10 * (fm.log_likelihood(gaussian_field(m, s), x1, 2000) - exact).abs().mean()


def test_hutchinson_is_unbiased_with_the_stated_variance_and_autograd_is_exact():
    A = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    v = lambda x, t: x @ A.T                                              # div v = trace A
    x = torch.randn(20000, 5)
    exact, _ = fm.divergence(v, x, 0.5)
    assert torch.allclose(exact, torch.full((20000,), float(A.trace())), atol=1e-5)
    est, _ = fm.divergence(v, x, 0.5, probes=1, gen=torch.Generator().manual_seed(2))
    S = (A + A.T) / 2
    var = 2 * (S.pow(2).sum() - S.diag().pow(2).sum())                     # 2 sum_{i != j} S_ij^2
    assert abs(float(est.mean() - A.trace())) < 4 * math.sqrt(var / 20000)
    assert abs(float(est.var() / var) - 1) < 0.05


def test_kl_of_a_gaussian_flow_to_gaussian_data_is_the_closed_form_and_nonnegative():
    m, s = torch.tensor([1.5, -0.7]), torch.tensor([0.6, 1.3])            # the model's Gaussian
    for m2, s2 in ((m, s), (torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.8]))):   # the data's
        x = m2 + s2 * torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))
        data, model = torch.distributions.Normal(m2, s2), torch.distributions.Normal(m, s)
        log_ratio = data.log_prob(x).sum(1) - fm.log_likelihood(gaussian_field(m, s), x, 100)
        kl = torch.distributions.kl_divergence(data, model).sum()
        se = float(log_ratio.std()) / math.sqrt(4000)
        assert abs(float(log_ratio.mean() - kl)) < 4 * se + 1e-3 and float(log_ratio.mean()) > -4 * se - 1e-3


def test_likelihood_and_gif_of_a_run(tmp_path):
    from PIL import Image
    import numpy as np
    rec = fm.main(["--steps", "30", "--out", str(tmp_path), "--n-samples", "600", "--width", "32", "--gif",
                   "--sample-steps", "4", "--nll-steps", "10"])
    assert rec["kl"] > -4 * rec["kl_se"] and rec["data_entropy"] == pytest.approx(math.log(32), abs=1e-6)
    assert rec["nll"] - rec["data_entropy"] == pytest.approx(rec["kl"], abs=1e-3)
    gif = Image.open(tmp_path / "flow.gif")
    assert gif.n_frames == 5 and (tmp_path / "density.png").exists()
    gif.seek(4)
    ref = common.sample_2d("checkerboard", 2500, torch.Generator().manual_seed(0))
    samples = torch.load(tmp_path / "samples.pt")
    assert np.array_equal(np.array(gif.convert("RGB")), common.points_frame(samples[:500], ref))
    gif.seek(0)
    assert not np.array_equal(np.array(gif.convert("RGB")), common.points_frame(samples[:500], ref))


def test_bits_per_dim_of_the_exact_field_for_independent_pixels():
    cfg = fm.Config(data="digits", nll_steps=40, n_samples=20)
    x = torch.round(common.load_images("digits", "test")[0][:20] * 255)
    y = 2 * (x + torch.rand(x.shape, generator=torch.Generator().manual_seed(2))) / 256 - 1
    m, s = torch.tensor(-0.3), torch.tensor(0.8)
    field = gaussian_field(m, s)

    class Model(torch.nn.Module):                                          # v(x, t) of N(m, s^2 I) on every pixel
        def forward(self, x, t, y=None):
            return field(x, float(t[0]))
    out = fm.bits_per_dim(cfg, Model(), torch.device("cpu"))
    d = 784
    log_p = torch.distributions.Normal(m, s).log_prob(y).flatten(1).sum(1)
    expected = -(log_p + d * math.log(2 / 256)) / (d * math.log(2))
    assert out["bpd"] == pytest.approx(float(expected.mean()), abs=2e-4) and out["bpd_probe_sd"] < 1e-3
    assert out["bpd_images"] == 20
