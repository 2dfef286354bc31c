"""Tests of gan.py: D*, V(D*, G) = -log 4 + 2 JSD, the losses on hand values and their gradients, runs."""
import math

import pytest
import torch

import common
import gan

SLOW = pytest.mark.slow  # the lsgan variant of the 2-D smoke run; the default stays quick


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


def test_losses_on_hand_values():
    """Logits and outputs away from 0 and 1/2: a flipped sign, swapped arguments or a target a <-> b changes them."""
    l_real, l_fake = torch.tensor([2.0, -0.5]), torch.tensor([1.0, -3.0])
    sig = torch.sigmoid
    want_d = -(torch.log(sig(l_real)).mean() + torch.log(1 - sig(l_fake)).mean())   # -[E log D(x) + E log(1 - D(G(z)))]
    assert gan.d_loss(l_real, l_fake).item() == pytest.approx(want_d.item(), rel=1e-6)
    assert gan.g_loss_saturating(l_fake).item() == pytest.approx(torch.log(1 - sig(l_fake)).mean().item(), rel=1e-6)
    assert gan.g_loss_nonsaturating(l_fake).item() == pytest.approx(-torch.log(sig(l_fake)).mean().item(), rel=1e-6)
    d_real, d_fake = torch.tensor([0.9, 0.2]), torch.tensor([0.3, -0.4])
    # E (D(x) - 1)^2 + E D(G(z))^2 = (0.01 + 0.64) / 2 + (0.09 + 0.16) / 2
    assert gan.lsgan_d_loss(d_real, d_fake).item() == pytest.approx(0.325 + 0.125)
    assert gan.lsgan_g_loss(d_fake).item() == pytest.approx((0.49 + 1.96) / 2)    # E (D(G(z)) - 1)^2


@pytest.mark.parametrize("extra", [[], pytest.param(["--loss", "lsgan", "--k", "2"], marks=SLOW)])
def test_2d_runs_write_outputs(extra, tmp_path):
    rec = gan.main(["--steps", "30", "--out", str(tmp_path), "--n-samples", "500", "--width", "32"] + extra)
    for key in ("modes_covered", "high_quality_frac", "mmd", "steps", "seconds"):
        assert key in rec
    for f in ("samples.png", "samples.pt", "loss.png", "progress.png", "checkpoint.pt", "metrics.json"):
        assert (tmp_path / f).exists(), f
    again = gan.main(["--sample-only", "--out", str(tmp_path), "--n-samples", "500", "--width", "32"] + extra)
    assert again["steps"] == 0


def test_digits_runs(tmp_path):
    rec = gan.main(["--data", "digits", "--steps", "5", "--batch-size", "16", "--out", str(tmp_path),
                    "--n-samples", "200"])
    assert torch.load(tmp_path / "samples.pt").shape == (200, 1, 28, 28)
    assert 0 <= rec["digit_confidence"] <= 1 and rec["fd"] > 0


def test_g_steps_puts_the_generator_in_the_inner_loop(tmp_path):
    gan.main(["--steps", "3", "--k", "2", "--g-steps", "4", "--width", "8", "--n-samples", "100",
              "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    step_count = lambda opt: int(opt["state"][0]["step"])
    assert step_count(state["opt_d"]) == 3 * 2 and step_count(state["opt_g"]) == 3 * 4


def test_d_gets_a_gradient_only_in_its_own_steps(tmp_path):
    """G's steps freeze D (its weights' gradients would be thrown away), and D trains again after them."""
    cfg = common.parse_config(gan.Config, ["--steps", "2", "--width", "8", "--g-steps", "3", "--out", str(tmp_path)],
                              "gan")
    G, D, z_dim = gan.make_nets(cfg)
    calls = []
    next(D.parameters()).register_hook(lambda g: calls.append(1))      # one call per gradient of D's first weight
    gan.train(cfg, G, D, z_dim, "cpu")
    assert len(calls) == 2 * cfg.k                                       # D's steps only


def test_bad_input(tmp_path):
    with pytest.raises(common.UserError, match="--k"):
        gan.main(["--k", "0", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--g-steps"):
        gan.main(["--g-steps", "0", "--out", str(tmp_path)])


def test_gif_films_training_and_ends_on_the_last_progress_panel(tmp_path):
    from PIL import Image
    import numpy as np
    gan.main(["--steps", "50", "--out", str(tmp_path), "--n-samples", "100", "--width", "16", "--gif"])
    gif = Image.open(tmp_path / "training.gif")
    assert gif.n_frames == 50
    values, fake, x_look, title = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["snapshots"][-1]
    assert title == "step 50"
    gif.seek(49)
    assert np.array_equal(np.array(gif.convert("RGB")), common.points_frame(fake, x_look, values))
    with pytest.raises(common.UserError, match="--gif films the training on 2-D data"):
        gan.main(["--data", "digits", "--gif", "--out", str(tmp_path / "d")])
