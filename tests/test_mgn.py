"""Tests of mgn.py: symmetric PSD Jacobians, monotonicity, M-MGN = grad of its potential, the Gaussian
Brenier map, the convex test function, a short gradient run, and smoke runs of every task."""
import json, os

import pytest
import torch

import common
import metrics
import mgn


def jacobians(g, x):
    return torch.func.vmap(torch.func.jacrev(lambda v: g(v[None])[0]))(x)          # (B, d, d)


def assert_monotone_jacobians(g, x):
    J = jacobians(g, x).double()
    assert (J - J.transpose(1, 2)).abs().max() < 1e-4 * (1 + J.abs().max())     # symmetric
    assert torch.linalg.eigvalsh((J + J.transpose(1, 2)) / 2).min() >= -1e-6    # PSD


@pytest.mark.parametrize("net", [mgn.CMGN, mgn.MMGN])
@pytest.mark.parametrize("d", [2, 5])
def test_jacobian_is_symmetric_psd_at_random_init(net, d):
    for seed in range(3):
        torch.manual_seed(seed)
        g = net(d, 8, 4)
        assert_monotone_jacobians(g, 3 * torch.randn(64, d))


def test_an_unconstrained_cascade_is_caught():
    """The public reimplementations gave each layer its own weight: the same check must fail for that."""
    torch.manual_seed(0)
    W1, W2 = torch.randn(8, 2), torch.randn(8, 2)
    bad = lambda x: torch.tanh(x @ W1.T + torch.tanh(x @ W2.T)) @ W1                # W_2 != W_1
    J = jacobians(bad, torch.randn(32, 2))
    assert (J - J.transpose(1, 2)).abs().max() > 1e-2


@pytest.mark.parametrize("net", ["cmgn", "mmgn"])
def test_monotone_on_random_pairs_and_after_training(net, tmp_path):
    rec = mgn.main(["--task", "ot-banana", "--net", net, "--steps", "30", "--batch-size", "128", "--n-eval", "200",
                    "--out", str(tmp_path)])
    assert rec["monotone_violations"] == 0
    T = mgn.Transport((mgn.CMGN if net == "cmgn" else mgn.MMGN)(2, 32, 4), torch.zeros(2, 2), torch.ones(2, 2))
    T.load_state_dict(common.load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))["T"])
    x = mgn.ot_samplers("ot-banana")[0](256, torch.Generator().manual_seed(3))
    assert_monotone_jacobians(T, x)
    a, b = x[:128], x[128:]
    with torch.no_grad():
        assert ((T(a) - T(b)) * (a - b)).sum(1).min() >= -1e-5           # <g(x) - g(y), x - y> >= 0


def test_mmgn_is_the_gradient_of_its_potential():
    torch.manual_seed(0)
    g = mgn.MMGN(3, 5, 2)
    x = torch.randn(10, 3, requires_grad=True)
    grad = torch.autograd.grad(g.potential(x).sum(), x)[0]
    assert torch.allclose(g(x), grad, atol=1e-5)


def test_test_function_is_convex_with_the_stated_gradient():
    x = torch.rand(500, 2, dtype=torch.float64)
    auto = torch.func.vmap(torch.func.grad(lambda v: mgn.f_convex(v[None])[0]))(x)
    assert torch.allclose(auto, mgn.grad_f(x))
    H = torch.func.vmap(torch.func.hessian(lambda v: mgn.f_convex(v[None])[0]))(x)
    assert torch.linalg.eigvalsh(H).min() > 0.5                          # PD on [0, 1]^2


def test_gaussian_brenier_map_is_a_convex_gradient_and_pushes_the_moments():
    m1, S1, m2, S2 = (t.double() for t in mgn.GAUSS)
    S1 = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)     # a non-identity source too
    A, c = mgn.gaussian_map(m1, S1, m2, S2)
    assert torch.allclose(A, A.T) and torch.linalg.eigvalsh(A).min() > 0  # T = grad(1/2 x^T A x + c^T x), convex
    assert torch.allclose(A @ S1 @ A.T, S2, atol=1e-10) and torch.allclose(A @ m1 + c, m2)
    x = m1 + torch.randn(200000, 2, dtype=torch.float64) @ mgn.sqrtm(S1)
    Tx = x @ A.T + c
    assert torch.allclose(Tx.mean(0), m2, atol=0.02) and torch.allclose(torch.cov(Tx.T), S2, atol=0.02)


def test_short_gradient_run_lowers_the_error_tenfold(tmp_path):
    short = mgn.main(["--task", "gradient", "--steps", "1", "--out", str(tmp_path / "a")])
    longer = mgn.main(["--task", "gradient", "--steps", "300", "--out", str(tmp_path / "b")])
    assert longer["test_mse"] < short["test_mse"] / 10


@pytest.mark.parametrize("task", ["ot-gaussian", "generate", "recolor", "colorize"])
def test_smoke_runs(task, tmp_path):
    args = ["--task", task, "--steps", "3", "--n-eval", "200", "--out", str(tmp_path)]
    rec = mgn.main(args + (["--batch-size", "32", "--width", "16", "--depth", "2"] if task == "generate" else []))
    keys = {"ot-gaussian": ("map_error", "w2", "coord_w1"), "generate": ("fd", "digit_confidence", "class_entropy"),
            "recolor": ("monotone_violations", "S_eps_after"),
            "colorize": ("rmse_colorized", "rmse_best_fixed_map", "S_eps_colorized")}[task]
    assert all(k in rec for k in keys) and rec["monotone_violations"] == 0
    for name in ("samples.png", "samples.pt", "loss.png", "checkpoint.pt", "metrics.json"):
        assert os.path.exists(tmp_path / name)
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["task"] == task


def test_colorize_metrics_best_fixed_map_is_each_grey_levels_mean_colour(tmp_path):
    """E[rgb | l] by brute force over the grey levels; the identity map leaves the grey input unchanged."""
    x = torch.rand(6, 5, 3, generator=torch.Generator().manual_seed(0))
    x[0, :2] = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.5, 0.8]])            # two colours ...
    x[0, 1] *= (x[0, 0] @ mgn.LUMA) / (x[0, 1] @ mgn.LUMA)                  # ... of the same grey level
    grey = (x @ mgn.LUMA)[..., None].expand(-1, -1, 3)
    cfg = mgn.Config(task="colorize", n_eval=200, out=str(tmp_path))
    _, scores = mgn.colorize_metrics(cfg, lambda z: z, grey, (x, x.reshape(-1, 3)))
    truth, level = x.reshape(-1, 3), (grey.reshape(-1, 3)[:, 0] * 255).round()
    best = torch.stack([truth[level == level[p]].mean(0) for p in range(len(truth))])
    assert scores["rmse_best_fixed_map"] == pytest.approx(float((best - truth).pow(2).mean().sqrt()), rel=1e-5)
    assert scores["rmse_colorized"] == scores["rmse_grey"] > scores["rmse_best_fixed_map"]
    assert scores["monotone_violations"] == 0


def test_colorize_on_a_dataset_colours_a_mosaic_of_its_test_images(tmp_path):
    """The test images laid out k x k in order (tile (i, j) = test image k i + j); the best fixed map is fitted on
    the training colours: where the training set has one colour per grey level it is exact on the test images."""
    import matplotlib.image
    colours = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.6, 0.9], [0.2, 0.9, 0.3]])   # three grey levels, one colour each
    for i in range(30):
        im = colours[i % 3].expand(32, 32, 3).clone()
        im[8:16, :] = colours[(i + 1) % 3]
        os.makedirs(tmp_path / "data", exist_ok=True)
        matplotlib.image.imsave(str(tmp_path / "data" / f"{i}.png"), im.numpy())
    argv = ["--task", "colorize", "--data", "folder", "--data-dir", str(tmp_path / "data"), "--steps", "3",
            "--n-eval", "200", "--out", str(tmp_path / "out")]
    mgn.main(argv)
    test = common.load_images("folder", "test", str(tmp_path / "data"))[0]          # 3 images: a 1 x 1 mosaic
    cfg = common.parse_config(mgn.Config, argv, "mgn")
    grey, (x, y) = mgn.colorize_data(cfg)[2:]
    assert torch.equal(x, test[0].permute(1, 2, 0)) and torch.equal(grey[..., 0], x @ mgn.LUMA)
    scores = json.load(open(tmp_path / "out" / "metrics.json"))
    assert scores["rmse_best_fixed_map"] < 1e-3 < 0.1 < scores["rmse_grey"]
    assert torch.load(tmp_path / "out" / "samples.pt").shape == (32, 32, 3)


def test_colorize_mosaic_order():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    k, s = 2, 2
    x = images.view(k, k, 3, s, s).permute(0, 3, 1, 4, 2).reshape(k * s, k * s, 3)
    for i in range(k):
        for j in range(k):
            assert torch.equal(x[i * s:(i + 1) * s, j * s:(j + 1) * s], images[k * i + j].permute(1, 2, 0))


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(common.UserError, match="image not found: .*missing.png"):
        mgn.main(["--task", "recolor", "--source", str(tmp_path / "missing.png"), "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--width, --depth and --eps must be positive"):
        mgn.main(["--eps", "-1", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="needs colour images"):
        mgn.main(["--task", "colorize", "--data", "digits", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="generate is for 28x28 grey digits"):
        mgn.main(["--task", "generate", "--data", "color-digits", "--out", str(tmp_path)])


def test_cmgn_and_mmgn_forward_by_hand():
    """Both networks with set weights, against their formulas written out: a transposed V (V V^T for V^T V) or a
    dropped term changes the value, though it would keep the Jacobian symmetric PSD."""
    x = torch.tensor([[0.5, -1.0]])
    W, V = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, 0.0]]), torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    c = mgn.CMGN(2, 3, 3)
    with torch.no_grad():
        c.W.copy_(W)
        c.b.copy_(torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.1, 0.2], [0.5, 0.0, -0.5]]))
        c.V.copy_(V)
        c.b_out.copy_(torch.tensor([0.25, -0.75]))
        z = x @ W.T + c.b[0]                                             # z_0 = W x + b_0
        for l in (1, 2):
            z = x @ W.T + torch.tanh(z) + c.b[l]                         # z_l = W x + sigma(z_{l-1}) + b_l
        want = torch.tanh(z) @ W + x @ (V.T @ V) + c.b_out               # W^T sigma(z_2) + V^T V x + b_3
        assert torch.allclose(c(x), want, atol=1e-6)
    m = mgn.MMGN(2, 3, 2)
    with torch.no_grad():
        m.W.copy_(torch.stack([W, -2 * W]))
        m.b.copy_(torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.1, 0.2]]))
        m.V.copy_(V)
        m.a.copy_(torch.tensor([0.25, -0.75]))
        zs = [x @ W.T + m.b[0], x @ (-2 * W).T + m.b[1]]                 # z_k = W_k x + b_k
        s = [torch.log(torch.cosh(z)).sum() for z in zs]                 # s(z) = sum_i log cosh z_i
        want = m.a + x @ (V.T @ V) + s[0] * torch.tanh(zs[0]) @ W + s[1] * torch.tanh(zs[1]) @ (-2 * W)
        assert torch.allclose(m(x), want, atol=1e-6)
        phi = x @ m.a + 0.5 * (x @ V.T).pow(2).sum() + 0.5 * (s[0] ** 2 + s[1] ** 2)
        assert torch.allclose(m.potential(x), phi, atol=1e-6)


def test_transport_standardises_the_source_and_rescales_to_the_target():
    torch.manual_seed(0)
    g = mgn.CMGN(2, 4, 2)
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, -1.0]])
    y = torch.tensor([[1.0, 1.0], [3.0, 0.0], [-2.0, 2.0]])
    T = mgn.Transport(g, x, y)
    s_x, s_y = x.var(0).mean().sqrt(), y.var(0).mean().sqrt()           # pooled stds: one scalar each
    z = torch.tensor([[0.3, -0.2], [5.0, 1.0]])
    with torch.no_grad():
        assert torch.allclose(T(z), s_y * g((z - x.mean(0)) / s_x) + y.mean(0), atol=1e-6)


def textbook_ot(x, y, eps, iters=5000):
    """OT_eps and its plan by the lecture's log-domain loop, written plainly (uniform weights)."""
    C = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
    a, b = torch.full((len(x),), 1 / len(x), dtype=C.dtype), torch.full((len(y),), 1 / len(y), dtype=C.dtype)
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for _ in range(iters):
        f = -eps * torch.logsumexp((g[None, :] - C) / eps + b.log()[None, :], 1)
        g = -eps * torch.logsumexp((f[:, None] - C) / eps + a.log()[:, None], 0)
    return a @ f + b @ g, a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - C) / eps)


def test_own_ot_eps_and_sinkhorn_divergence_against_the_textbook_loop():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64) + 1
    value, P = textbook_ot(x.detach(), y, 0.5)
    ours = mgn.ot_eps(x, y, 0.5, tol=1e-12)
    assert ours.item() == pytest.approx(value.item(), rel=1e-9)
    grad, = torch.autograd.grad(ours, x)
    assert torch.allclose(grad, 2 * (P.sum(1)[:, None] * x.detach() - P @ y), atol=1e-8)   # sum_j P_ij dC_ij/dx_i
    want = value - 0.5 * textbook_ot(x.detach(), x.detach(), 0.5)[0] - 0.5 * textbook_ot(y, y, 0.5)[0]
    assert mgn.sinkhorn_divergence(x.detach(), y, 0.5, tol=1e-12).item() == pytest.approx(want.item(), rel=1e-8)


def test_own_sinkhorn_divergence_matches_sinkhorn_py_and_its_gradient(monkeypatch):
    sinkhorn = pytest.importorskip("sinkhorn", reason="sinkhorn.py is not beside this test")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64) * 1.5 + 1
    with monkeypatch.context() as m:                   # the matrix-vector path alone: no exact-logsumexp fallback
        m.setattr(torch, "logsumexp", lambda *a, **k: pytest.fail("mgn fell back to the exact logsumexp"))
        ours = mgn.sinkhorn_divergence(x, y, 0.5, tol=1e-10)
    ref = sinkhorn.sinkhorn_divergence(x, y, 0.5, tol=1e-9, method="log")   # an independent solver
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    g_ours, = torch.autograd.grad(ours, x)
    g_ref, = torch.autograd.grad(ref, x)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
    assert abs(float(mgn.sinkhorn_divergence(y, y, 0.5, tol=1e-10))) < 1e-8


def test_map_error_is_the_distance_to_the_brenier_map(tmp_path):
    """ot_metrics' map_error: 0 for the closed-form map itself, and the mean |T(x) - T*(x)| for another map."""
    A, c = mgn.gaussian_map(*mgn.GAUSS)
    cfg = mgn.Config(task="ot-gaussian", out=str(tmp_path))
    src, tgt = mgn.ot_samplers("ot-gaussian")
    x = src(300, torch.Generator().manual_seed(0))
    y = tgt(300, torch.Generator().manual_seed(1))
    exact = lambda v: v @ A.T + c
    assert mgn.ot_metrics(cfg, exact, x, y)[1]["map_error"] < 1e-5
    shift = mgn.GAUSS[2] - mgn.GAUSS[0]
    translate = lambda v: v + shift                                      # moves the mean, keeps the shape
    expected = float((x + shift - exact(x)).norm(dim=1).mean())
    assert mgn.ot_metrics(cfg, translate, x, y)[1]["map_error"] == pytest.approx(expected, rel=1e-6)
    assert expected > 0.1
