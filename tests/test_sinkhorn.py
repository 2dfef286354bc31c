"""Tests of sinkhorn.py against brute force, closed forms and finite differences."""
import itertools, json, math, time, warnings

import pytest
import torch

import common
import metrics
import sinkhorn as sk

D = torch.float64


def clouds(n, m, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 2, generator=g, dtype=D), torch.rand(m, 2, generator=g, dtype=D) + shift
    return x, y, torch.full((n,), 1 / n, dtype=D), torch.full((m,), 1 / m, dtype=D)


@pytest.mark.parametrize("method", ["scaling", "log"])
def test_plan_marginals(method):
    x, y, a, b = clouds(30, 40)
    a = torch.rand(30, dtype=D) + 0.1
    a = a / a.sum()                                                      # non-uniform weights too
    r = sk.sinkhorn(a, b, sk.sq_dist(x, y), 0.05, tol=1e-9, method=method)
    assert r["converged"] and r["method"] == method
    assert torch.allclose(r["plan"].sum(1), a, atol=1e-8) and torch.allclose(r["plan"].sum(0), b, atol=1e-8)
    assert (r["plan"] >= 0).all()


def test_scaling_and_log_agree_and_log_matches_textbook_logsumexp():
    x, y, a, b = clouds(25, 20, seed=1)
    C, eps = sk.sq_dist(x, y), 0.1
    s = sk.sinkhorn(a, b, C, eps, tol=1e-11, method="scaling")
    l = sk.sinkhorn(a, b, C, eps, tol=1e-11, method="log", eps_scaling=False)
    assert torch.allclose(s["plan"], l["plan"], atol=1e-12) and abs(float(s["cost"] - l["cost"])) < 1e-11
    f, g = torch.zeros(25, dtype=D), torch.zeros(20, dtype=D)          # the lecture's update, written plainly
    for _ in range(2000):
        f = -eps * torch.logsumexp((g[None, :] - C) / eps + torch.log(b)[None, :], 1)
        g = -eps * torch.logsumexp((f[:, None] - C) / eps + torch.log(a)[:, None], 0)
    assert torch.allclose(l["f"] + l["g"].mean(), f + g.mean(), atol=1e-9)   # potentials up to a constant
    assert torch.allclose(l["objective"], a @ f + b @ g, atol=1e-10)


def test_objective_is_cost_plus_eps_kl():
    x, y, a, b = clouds(10, 12, seed=2)
    r = sk.sinkhorn(a, b, sk.sq_dist(x, y), 0.2, tol=1e-12)
    P = r["plan"]
    kl = (P * torch.log(P / (a[:, None] * b[None, :]))).sum()
    assert abs(float(r["objective"] - (r["cost"] + 0.2 * kl))) < 1e-10


def test_batched_matches_single():
    xs, ys = torch.rand(3, 8, 2, dtype=D), torch.rand(3, 9, 2, dtype=D)
    a, b = torch.full((3, 8), 1 / 8, dtype=D), torch.full((3, 9), 1 / 9, dtype=D)
    r = sk.sinkhorn(a, b, sk.sq_dist(xs, ys), 0.05, tol=1e-10)
    for k in range(3):
        one = sk.sinkhorn(a[k], b[k], sk.sq_dist(xs[k], ys[k]), 0.05, tol=1e-10)
        assert abs(float(r["cost"][k] - one["cost"])) < 1e-8


def brute_force(C):
    n = len(C)
    return min(sum(float(C[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n))) / n


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_assignment_equals_brute_force(n):
    for seed in range(3):
        x, y, _, _ = clouds(n, n, seed=seed)
        C = sk.sq_dist(x, y)
        perm = metrics.assignment(C)
        assert sorted(perm.tolist()) == list(range(n))                   # a permutation
        assert abs(float(C[torch.arange(n), perm].mean()) - brute_force(C)) < 1e-12


def test_assignment_ties_and_integer_costs():
    C = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, 1]])
    assert sorted(metrics.assignment(C).tolist()) == [0, 1, 2]
    C = torch.randint(0, 5, (6, 6), generator=torch.Generator().manual_seed(0)).double()
    assert abs(float(C[torch.arange(6), metrics.assignment(C)].mean()) - brute_force(C)) < 1e-12


def test_entropic_cost_above_exact_and_decreasing_to_it():
    # <P_eps, C> <= OT_eps <= <P*, C> + eps KL(P* | ab^T) = exact + eps log n  (P* the optimal permutation plan)
    x, y, a, b = clouds(60, 60, seed=3)
    C = sk.sq_dist(x, y)
    exact = float(C[torch.arange(60), metrics.assignment(C)].mean())
    epsilons = (1.0, 0.1, 0.01, 0.003)
    costs = [float(sk.sinkhorn(a, b, C, e, tol=1e-8, max_iter=50000)["cost"]) for e in epsilons]
    assert all(0 <= c - exact <= e * math.log(60) for c, e in zip(costs, epsilons))
    assert all(c1 >= c2 - 1e-9 for c1, c2 in zip(costs, costs[1:]))


def test_1d_sorting_equals_exact_solver():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, generator=g, dtype=D), 2 * torch.rand(50, generator=g, dtype=D)
    for p in (1, 2):
        C = (x[:, None] - y[None, :]).abs() ** p
        exact = float(C[torch.arange(50), metrics.assignment(C)].mean()) ** (1 / p)
        assert abs(float(sk.w1d(x, y, p)) - exact) < 1e-9
    assert abs(metrics.w_exact(x[:, None], y[:, None], p=1) - float(sk.w1d(x, y))) < 1e-9


def test_sliced_wasserstein_zero_and_permutation_invariant():
    x, y, _, _ = clouds(100, 100, seed=5)
    g = lambda: torch.Generator().manual_seed(0)
    assert float(sk.sliced_wasserstein(x, x, gen=g())) == 0
    perm = torch.randperm(100, generator=g())
    assert abs(float(sk.sliced_wasserstein(x, y, gen=g()) - sk.sliced_wasserstein(x[perm], y, gen=g()))) < 1e-12
    # a translation by t: every projection moves by <theta, t>, so SW_1 = E|<theta, t>| = 2|t|/pi in 2-D
    t = torch.tensor([3.0, 0.0], dtype=D)
    sw = float(sk.sliced_wasserstein(x, x + t, n_proj=20000, gen=g()))
    assert abs(sw - 2 * 3 / math.pi) < 0.03


def test_sinkhorn_divergence_nonnegative_zero_and_gradient():
    x, y, _, _ = clouds(6, 7, seed=6)
    kw = dict(eps=0.5, tol=1e-13)
    assert abs(float(sk.sinkhorn_divergence(x, x, **kw))) < 1e-10
    for seed in range(5):
        xs, ys, _, _ = clouds(6, 7, seed=seed)
        assert float(sk.sinkhorn_divergence(xs, ys, **kw)) > 0
    x = x.clone().requires_grad_(True)
    sk.sinkhorn_divergence(x, y, **kw).backward()
    h, fd = 1e-6, torch.zeros_like(x)
    for i, j in itertools.product(range(6), range(2)):
        e = torch.zeros_like(x)
        e[i, j] = h
        plus = sk.sinkhorn_divergence(x.detach() + e, y, **kw)
        minus = sk.sinkhorn_divergence(x.detach() - e, y, **kw)
        fd[i, j] = (plus - minus) / (2 * h)
    assert torch.allclose(x.grad, fd, atol=1e-7)


def test_barycentric_map_is_the_plans_row_average_on_the_samples():
    """T(x_i) = sum_j P_ij y_j / a_i with weights a, b that are not uniform and n != m: a slip in the normalisation
    (by b_j, by n, or the rows of P^T) changes the answer."""
    x, y, _, _ = clouds(12, 9, seed=7)
    a = torch.arange(1, 13, dtype=D) / 78
    b = torch.arange(9, 0, -1, dtype=D) / 45
    r = sk.sinkhorn(a, b, torch.cdist(x, y) ** 2, 0.05, tol=1e-12)
    want = r["plan"] @ y / a[:, None]
    assert torch.allclose(sk.barycentric_map(x, y, b, r["g"], 0.05), want, atol=1e-9)


def test_ot_eps_is_the_entropic_objective_and_its_gradient_the_plans():
    """The value is <P, C> + eps KL(P | a b^T); d/dx_i = sum_j P_ij 2 (x_i - y_j) (the envelope theorem)."""
    x, y, a, b = clouds(7, 5, seed=8)
    r = sk.sinkhorn(a, b, sk.sq_dist(x, y), 0.3, tol=1e-13)
    x = x.clone().requires_grad_(True)
    value = sk.ot_eps(x, y, 0.3, tol=1e-13)
    assert abs(value.item() - float(r["objective"])) < 1e-12
    value.backward()
    P = r["plan"]
    assert torch.allclose(x.grad, 2 * (P.sum(1)[:, None] * x.detach() - P @ y), atol=1e-10)


def test_far_apart_clouds_give_finite_correct_cost():
    g = torch.Generator().manual_seed(7)
    n = 200
    x = torch.randn(n, 2, generator=g, dtype=D) + torch.tensor([-6.0, 4.0], dtype=D)
    y = torch.randn(n, 2, generator=g, dtype=D) + torch.tensor([2.0, -3.0], dtype=D)
    C, w = sk.sq_dist(x, y), torch.full((n,), 1 / n, dtype=D)
    r = sk.sinkhorn(w, w, C, 0.05)
    exact = float(C[torch.arange(n), metrics.assignment(C)].mean())
    assert r["converged"] and r["method"] == "log" and math.isfinite(float(r["cost"]))
    assert 0 <= float(r["cost"]) / exact - 1 < 0.005
    assert (torch.exp(-C / 0.05) < 1e-200).all()          # why the scaling form fails: u = a / (K v) overflows
    with pytest.warns(UserWarning, match="did not converge"):
        bad = sk.sinkhorn(w, w, C, 0.05, method="scaling")
    assert not bad["converged"]                                          # reported, not a silent 0


def test_non_convergence_is_reported():
    x, y, a, b = clouds(50, 50, seed=8)
    with pytest.warns(UserWarning, match="did not converge"):
        r = sk.sinkhorn(a, b, sk.sq_dist(x, y), 0.001, max_iter=3)
    assert not r["converged"] and r["iterations"] <= 3 * 20 and r["err"] > 1e-6


@pytest.mark.parametrize("a, b, C, eps, words", [
    (torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]), torch.ones(2, 2), 1.0, "must sum to 1"),
    (torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5]), torch.ones(2, 2), 1.0, "non-negative"),
    (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), torch.ones(3, 2), 1.0, "shape mismatch"),
    (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), torch.ones(2, 2), 0.0, "eps must be positive"),
])
def test_bad_input_is_a_clear_error(a, b, C, eps, words):
    with pytest.raises(common.UserError, match=words):
        sk.sinkhorn(a, b, C, eps)


def test_float32_and_sinkhorn_never_silently_nan():
    x, y, a, b = clouds(40, 40, seed=9)
    r = sk.sinkhorn(a.float(), b.float(), sk.sq_dist(x, y).float(), 0.005, tol=1e-4)
    assert r["converged"] and torch.isfinite(r["plan"]).all() and r["plan"].dtype == torch.float32


@pytest.mark.parametrize("demo", ["plan", "color"])
def test_demos_run(demo, tmp_path):
    args = ["--demo", demo, "--out", str(tmp_path), "--batch-size", "40", "--pixels", "100", "--eps", "1,0.1"]
    rec = sk.main(args)
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["demo"] == demo and (tmp_path / "samples.png").exists()
    if demo == "plan":
        assert saved["exact_cost"] <= saved["entropic"]["0.1"]["cost"] <= saved["entropic"]["1"]["cost"]
        assert torch.load(tmp_path / "samples.pt").shape == (40, 2) and (tmp_path / "loss.png").exists()
    if demo == "color":
        assert torch.load(tmp_path / "samples.pt").shape[-1] == 3


def test_displacement_interpolation_is_a_w2_geodesic():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(60, 2, generator=g).double(), common.sample_2d("moons", 60, g).double()
    sigma = metrics.assignment(torch.cdist(x, y) ** 2)
    total = metrics.w_exact(x, y)
    for s in (0.25, 0.6):
        mid = sk.displacement_interpolation(x, y, sigma, s)
        assert metrics.w_exact(x, mid) == pytest.approx(s * total, rel=1e-6)           # W_2(mu_0, mu_s) = s W_2
        assert metrics.w_exact(mid, y) == pytest.approx((1 - s) * total, rel=1e-6)
    assert torch.equal(sk.displacement_interpolation(x, y, sigma, 1.0), y[sigma])


def test_gif_moves_the_source_onto_the_target(tmp_path):
    from PIL import Image
    import numpy as np
    sk.main(["--out", str(tmp_path), "--batch-size", "40", "--eps", "1", "--gif"])
    gif = Image.open(tmp_path / "interpolation.gif")
    assert gif.n_frames == 41
    gen = torch.Generator().manual_seed(0)                                 # the demo's clouds
    x = (common.sample_2d("gaussian", 40, gen) - torch.tensor([2.0, 0])).double()
    y = common.sample_2d("moons", 40, gen).double()
    for k, points in ((0, x), (40, y)):
        gif.seek(k)
        assert np.array_equal(np.array(gif.convert("RGB")), common.points_frame(points, y))
    with pytest.raises(common.UserError, match="--gif films the plan demo"):
        sk.main(["--demo", "color", "--gif", "--out", str(tmp_path)])


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(common.UserError, match="--eps must be comma-separated positive numbers"):
        sk.main(["--eps", "1,x", "--out", str(tmp_path)])


@pytest.mark.slow
def test_benchmark_against_pot():
    """Side by side with POT (only if installed; POT is not a dependency). Prints a table of both."""
    ot = pytest.importorskip("ot")
    import numpy as np
    for n in (1000, 4000):
        rng = np.random.default_rng(0)
        x, y = rng.random((n, 2)), rng.random((n, 2))
        M, a = ot.dist(x, y), np.full(n, 1 / n)
        t0 = time.time()
        ot.sinkhorn2(a, a, M, 0.05, stopThr=1e-9)
        t1 = time.time()
        pot_log = ot.sinkhorn2(a, a, M, 0.05, method="sinkhorn_log", stopThr=1e-9)
        t2 = time.time()
        ours = sk.sinkhorn(torch.tensor(a), torch.tensor(a), torch.tensor(M), 0.05, tol=1e-9, method="log")
        t3 = time.time()
        print(f"n={n}: POT sinkhorn2 {t1 - t0:.3f}s, POT sinkhorn_log {t2 - t1:.3f}s, ours (log) {t3 - t2:.3f}s")
        assert abs(float(ours["cost"]) - float(pot_log)) / float(pot_log) < 1e-6   # the times are reported only
