"""Tests of gan.py and wgan.py: D*, V(D*, G) = -log 4 + 2 JSD, the losses' gradients, the Lipschitz tools, runs."""
import json, math

import pytest
import torch

import common
import gan
import metrics
import wgan

SLOW = pytest.mark.slow  # the lsgan and clipping variants of the 2-D smoke runs; the defaults stay quick


def test_optimal_discriminator_and_value_equal_minus_log4_plus_2jsd():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    D = gan.optimal_discriminator(p, q)
    assert torch.allclose(D, torch.tensor([5 / 6, 5 / 9, 5 / 11, 0.0], dtype=torch.float64))
    assert gan.gan_value(D, p, q) == pytest.approx(-math.log(4) + 2 * gan.jsd(p, q), abs=1e-12)
    # by hand: JSD = 1/2 sum p log(2p/(p+q)) + 1/2 sum q log(2q/(p+q))
    by_hand = 0.5 * sum(float(a) * math.log(2 * a / (a + b)) for a, b in zip(p, q) if a > 0) + \
        0.5 * sum(float(b) * math.log(2 * b / (a + b)) for a, b in zip(p, q) if b > 0)
    assert gan.jsd(p, q) == pytest.approx(by_hand, abs=1e-12)
    assert gan.jsd(p, p) == 0 and gan.gan_value(gan.optimal_discriminator(p, p), p, p) == pytest.approx(-math.log(4))
    for _ in range(20):                                                  # D* maximizes V: any other D does worse
        other = (D + 0.1 * torch.randn(4, dtype=torch.float64)).clamp(0.01, 0.99)
        assert gan.gan_value(other, p, q) <= gan.gan_value(D.clamp(1e-12, 1 - 1e-12), p, q) + 1e-12
    assert gan.jsd(torch.tensor([1.0, 0]), torch.tensor([0, 1.0])) == pytest.approx(math.log(2))   # disjoint: log 2


def test_trained_discriminator_approaches_d_star():
    torch.manual_seed(0)
    D = gan.mlp(1, 32, 1)
    opt = torch.optim.Adam(D.parameters(), 1e-2)
    for _ in range(1500):                                                # p_data = N(0, 1), p_g = N(1, 1)
        x, xg = torch.randn(512, 1), torch.randn(512, 1) + 1
        loss = gan.d_loss(D(x), D(xg))
        opt.zero_grad(), loss.backward(), opt.step()
    t = torch.linspace(-1.5, 2.5, 41)[:, None]
    d_star = gan.optimal_discriminator(torch.exp(-t ** 2 / 2), torch.exp(-(t - 1) ** 2 / 2))  # = sigmoid(1/2 - t)
    with torch.no_grad():
        assert (torch.sigmoid(D(t)) - d_star).abs().max() < 0.05


def test_saturating_loss_vanishes_where_nonsaturating_does_not():
    l_fake = torch.tensor([-8.0], requires_grad=True)                   # D(g(z)) = sigmoid(-8) ~ 3e-4: D wins
    grads = {}
    for kind, loss in (("saturating", gan.g_loss_saturating), ("nonsaturating", gan.g_loss_nonsaturating)):
        grads[kind] = torch.autograd.grad(loss(l_fake), l_fake)[0].abs().item()
    assert grads["saturating"] < 1e-3 and grads["nonsaturating"] > 0.99   # d/dl log(1 - sigmoid(l)) = -sigmoid(l)


def test_lsgan_losses_on_hand_values():
    assert gan.lsgan_d_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])).item() == pytest.approx(0.125 + 0.5)
    assert gan.lsgan_g_loss(torch.tensor([0.0, 1.0])).item() == pytest.approx(0.5)


def test_gradient_penalty_is_per_sample():
    torch.manual_seed(1)
    critic = wgan.make_nets(wgan.Config(data="digits"))[1]
    x, xf = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    torch.manual_seed(2)
    gp = wgan.gradient_penalty(critic, x, xf)
    torch.manual_seed(2)
    eps = torch.rand(6, 1, 1, 1)                                          # the same draws, one per sample
    loop = 0.0
    for i in range(6):                                                   # one sample at a time
        xh = (eps[i] * x[i:i + 1] + (1 - eps[i]) * xf[i:i + 1]).requires_grad_(True)
        g = torch.autograd.grad(critic(xh).sum(), xh)[0]
        loop += (g.norm() - 1) ** 2 / 6
    assert gp.item() == pytest.approx(loop.item(), rel=1e-5)


def test_gradient_penalty_zero_for_unit_linear_critic():
    w = torch.randn(5)
    critic = lambda x: x @ (w / w.norm())                                # |grad| = 1 everywhere
    assert wgan.gradient_penalty(critic, torch.randn(8, 5), torch.randn(8, 5)).item() < 1e-12
    critic2 = lambda x: 3 * x @ (w / w.norm())                           # |grad| = 3: penalty (3 - 1)^2 = 4
    assert wgan.gradient_penalty(critic2, torch.randn(8, 5), torch.randn(8, 5)).item() == pytest.approx(4.0)


def test_clipping_keeps_weights_in_range():
    critic = gan.mlp(2, 16, 1)
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(100)
    wgan.clip_weights(critic, 0.01)
    assert all(p.abs().max() <= 0.01 for p in critic.parameters())


def test_mode_metrics_on_collapsed_and_full_samplers():
    full = common.sample_2d("ring8", 2500)
    collapsed = common.MODES["ring8"][0][0] + 0.02 * torch.randn(2500, 2)
    assert metrics.mode_metrics(full, "ring8")["modes_covered"] == 8
    assert metrics.mode_metrics(collapsed, "ring8")["modes_covered"] == 1


@pytest.mark.parametrize("script, extra", [(gan, []), pytest.param(gan, ["--loss", "lsgan", "--k", "2"], marks=SLOW),
                                           (wgan, []), pytest.param(wgan, ["--lipschitz", "clip"], marks=SLOW)])
def test_2d_runs_write_outputs(script, extra, tmp_path):
    rec = script.main(["--steps", "30", "--out", str(tmp_path), "--n-samples", "500", "--width", "32"] + extra)
    for key in ("modes_covered", "high_quality_frac", "mmd", "steps", "seconds"):
        assert key in rec
    for f in ("samples.png", "samples.pt", "loss.png", "progress.png", "checkpoint.pt", "metrics.json"):
        assert (tmp_path / f).exists(), f
    if script is wgan:
        assert (tmp_path / "wasserstein.png").exists()
        assert "w1_exact_final" in rec and json.load(open(tmp_path / "metrics.json"))["config"]["lr"] == \
            (5e-5 if "clip" in extra else wgan.Config.lr)
        if not extra:                                                    # the critic learned f(real) > f(fake):
            assert rec["w_estimate_final"] > 0.1                         # 0.42 here; -1.1 with the loss's sign flipped
    again = script.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "500", "--width", "32"] + extra)
    assert again["steps"] == 0


@pytest.mark.parametrize("script", [gan, wgan])
def test_digits_runs(script, tmp_path):
    rec = script.main(["--data", "digits", "--steps", "5", "--batch-size", "16", "--out", str(tmp_path),
                       "--n-samples", "200"])
    assert torch.load(tmp_path / "samples.pt").shape == (200, 1, 28, 28)
    assert 0 <= rec["digit_confidence"] <= 1 and rec["fd"] > 0


def test_g_steps_puts_the_generator_in_the_inner_loop(tmp_path):
    gan.main(["--steps", "3", "--k", "2", "--g-steps", "4", "--width", "8", "--n-samples", "100",
              "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    step_count = lambda opt: int(opt["state"][0]["step"])
    assert step_count(state["opt_d"]) == 3 * 2 and step_count(state["opt_g"]) == 3 * 4


@pytest.mark.parametrize("script, extra", [(gan, ["--g-steps", "3"]), (wgan, ["--exact-every", "0"])])
def test_d_gets_a_gradient_only_in_its_own_steps(script, extra, tmp_path):
    """G's steps freeze D (its weights' gradients would be thrown away), and D trains again after them."""
    argv = ["--steps", "2", "--width", "8", "--out", str(tmp_path)] + extra
    cfg = common.parse_config(script.Config, argv, script.__name__)
    G, D, z_dim = script.make_nets(cfg)
    calls = []
    next(D.parameters()).register_hook(lambda g: calls.append(1))      # one call per gradient of D's first weight
    script.train(cfg, G, D, z_dim, "cpu")
    assert len(calls) == 2 * (cfg.k if script is gan else cfg.n_critic)   # D's (or f's) steps only


def test_wgan_gp_defaults_differ_by_data(tmp_path):
    cfg = lambda *argv: common.parse_config(wgan.Config, [*argv, "--out", str(tmp_path)], "wgan")
    assert (cfg().lambda_gp, cfg().lr) == (1.0, 2e-3)                   # 2-D: lambda 1, lr 2e-3
    assert (cfg("--data", "digits").lambda_gp, cfg("--data", "digits").lr) == (10.0, 1e-3)   # images: the GP paper's
    assert cfg("--data", "digits", "--lambda-gp", "3").lambda_gp == 3.0  # a given flag wins
    assert cfg("--data", "digits", "--lipschitz", "clip").lr == 5e-5    # Algorithm 1's alpha


def test_wgan_exact_w1_does_not_change_training(tmp_path):
    """--exact-every 6 of 6 steps: after step 1 (mid-training) and step 6; a W_1 that drew from the training
    stream would change steps 2-6 and the samples."""
    run = lambda every: wgan.main(["--steps", "6", "--width", "16", "--n-samples", "300", "--exact-every", every,
                                   "--out", str(tmp_path / every)])
    assert "w1_exact_final" in run("6") and "w1_exact_final" not in run("0")
    assert torch.equal(torch.load(tmp_path / "6" / "samples.pt"), torch.load(tmp_path / "0" / "samples.pt"))


def test_bad_input(tmp_path):
    with pytest.raises(common.UserError, match="--k"):
        gan.main(["--k", "0", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--g-steps"):
        gan.main(["--g-steps", "0", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--n-critic"):
        wgan.main(["--n-critic", "0", "--out", str(tmp_path)])
