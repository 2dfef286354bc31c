"""Tests of wgan.py: the critic's and generator's losses, the gradient penalty, clipping, runs."""
import json

import pytest
import torch

import common
import wgan

SLOW = pytest.mark.slow  # the clipping variant of the 2-D smoke run; the default stays quick


def test_losses_on_hand_values():
    f_real, f_fake = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 0.0])
    assert wgan.critic_loss(f_real, f_fake).item() == pytest.approx(0.5 - 3.0)   # E f(g(z)) - E f(x)
    assert wgan.generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)   # -E f(g(z))


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
    critic = wgan.make_nets(wgan.Config())[1]
    with torch.no_grad():
        for p in critic.parameters():
            p.mul_(100)
    wgan.clip_weights(critic, 0.01)
    assert all(p.abs().max() <= 0.01 for p in critic.parameters())


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


@pytest.mark.parametrize("extra", [[], pytest.param(["--lipschitz", "clip"], marks=SLOW)])
def test_2d_runs_write_outputs(extra, tmp_path):
    rec = wgan.main(["--steps", "30", "--out", str(tmp_path), "--n-samples", "500", "--width", "32"] + extra)
    for key in ("modes_covered", "high_quality_frac", "mmd", "steps", "seconds", "w1_exact_final"):
        assert key in rec
    for f in ("samples.png", "samples.pt", "loss.png", "progress.png", "wasserstein.png", "checkpoint.pt",
              "metrics.json"):
        assert (tmp_path / f).exists(), f
    assert json.load(open(tmp_path / "metrics.json"))["config"]["lr"] == (5e-5 if "clip" in extra else wgan.Config.lr)
    if not extra:                                                        # the critic learned f(real) > f(fake):
        assert rec["w_estimate_final"] > 0.1                             # 0.42 here; -1.1 with the loss's sign flipped
    again = wgan.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "500", "--width", "32"] + extra)
    assert again["steps"] == 0


def test_digits_runs(tmp_path):
    rec = wgan.main(["--data", "digits", "--steps", "5", "--batch-size", "16", "--out", str(tmp_path),
                     "--n-samples", "200"])
    assert torch.load(tmp_path / "samples.pt").shape == (200, 1, 28, 28)
    assert 0 <= rec["digit_confidence"] <= 1 and rec["fd"] > 0


def test_the_critic_gets_a_gradient_only_in_its_own_steps(tmp_path):
    """G's steps freeze the critic (its weights' gradients would be thrown away), and it trains again after them."""
    cfg = common.parse_config(wgan.Config, ["--steps", "2", "--width", "8", "--exact-every", "0", "--out",
                                            str(tmp_path)], "wgan")
    G, critic, z_dim = wgan.make_nets(cfg)
    calls = []
    next(critic.parameters()).register_hook(lambda g: calls.append(1))  # one call per gradient of f's first weight
    wgan.train(cfg, G, critic, z_dim, "cpu")
    assert len(calls) == 2 * cfg.n_critic                                # the critic's steps only


def test_bad_input(tmp_path):
    with pytest.raises(common.UserError, match="--n-critic"):
        wgan.main(["--n-critic", "0", "--out", str(tmp_path)])


def test_gif_films_training_and_ends_on_the_last_progress_panel(tmp_path):
    from PIL import Image
    import numpy as np
    wgan.main(["--steps", "50", "--out", str(tmp_path), "--n-samples", "100", "--width", "16", "--gif"])
    gif = Image.open(tmp_path / "training.gif")
    assert gif.n_frames == 50
    values, fake, x_look, title = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["snapshots"][-1]
    assert title == "step 50"
    gif.seek(49)
    assert np.array_equal(np.array(gif.convert("RGB")), common.points_frame(fake, x_look, values))
