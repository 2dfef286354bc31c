"""Tests of cgan.py: G and D really use y, the conditional loss, a short run learns the labels, outputs."""
import copy, json, os

import pytest
import torch

import cgan
import common
import metrics


def test_generator_and_discriminator_use_the_label():
    torch.manual_seed(0)
    G, D = cgan.Generator(8, 4).eval(), cgan.Discriminator().eval()
    z = torch.randn(5, 8)
    y0, y1 = torch.zeros(5, dtype=torch.long), torch.full((5,), 3)
    with torch.no_grad():
        x0, x1 = G(z, y0), G(z, y1)
        assert x0.shape == (5, 1, 28, 28) and x0.abs().max() <= 1
        assert (x0 - x1).abs().mean() > 1e-3                           # same z, other class: another image
        assert (D(x0, y0) - D(x0, y1)).abs().max() > 1e-4              # same image, other class: another score
        assert D(x0, y0).shape == (5, 1)


def test_discriminator_conditioning_variants():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        every = cgan.Discriminator(cond="every").eval()
        every.label_map.weight.zero_()                                  # no label at the input ...
        one_hot_weights = every.linear.weight[:, -10:].clone()
        every.linear.weight[:, -10:] = 0                                # ... nor at the last layer:
        assert (every(x, y) - every(x, (y + 1) % 10)).abs().min() > 1e-4  # the 14x14 map alone carries y
        every.linear.weight[:, -10:] = one_hot_weights
        every.label_map_14.weight.zero_()
        assert (every(x, y) - every(x, (y + 1) % 10)).abs().min() > 1e-4  # the one-hot y alone carries it
        proj = cgan.Discriminator(cond="projection").eval()
        phi = proj.conv2(proj.conv1(torch.cat([x, proj.label_map(y).view(-1, 1, 28, 28)], 1)))
        by_hand = proj.linear(phi) + (proj.project(y) * phi).sum(1, keepdim=True)   # psi(phi) + <V e(y), phi>
        assert torch.allclose(proj(x, y), by_hand, atol=1e-5)
        assert (proj(x, y) - proj.linear(phi)).abs().min() > 1e-3       # the projection term is really added


def test_every_cond_flag_and_width_run_and_are_model_flags(tmp_path):
    rec = cgan.main(["--steps", "2", "--n-samples", "20", "--d-cond", "every", "--ndf", "8", "--out", str(tmp_path)])
    D = torch.load(tmp_path / "checkpoint.pt")["D"]
    assert D["conv1.0.weight"].shape[0] == 8                           # ndf channels out of the first layer
    assert D["conv2.0.weight"].shape[:2] == (16, 9)                      # 2 ndf out; ndf + the 14x14 label map in
    with pytest.raises(common.UserError):
        cgan.main(["--sample-only", "--d-cond", "input", "--out", str(tmp_path)])   # the checkpoint says "every"
    with pytest.raises(common.UserError):
        cgan.main(["--sample-only", "--ndf", "16", "--out", str(tmp_path)])          # ... and width 8
    again = cgan.main(["--sample-only", "--n-samples", "20", "--out", str(tmp_path)])   # both read from the checkpoint
    assert again["fd"] == pytest.approx(rec["fd"])


def test_conditional_loss_is_the_minimax_value_on_hand_logits():
    l_real, l_fake = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    D_real, D_fake = torch.sigmoid(l_real), torch.sigmoid(l_fake)
    value = torch.log(D_real) + torch.log(1 - D_fake)                   # log D(x|y) + log(1 - D(G(z|y)|y))
    assert cgan.d_loss(l_real, l_fake).item() == pytest.approx(-value.item(), abs=1e-6)
    assert cgan.g_loss(l_fake).item() == pytest.approx(-torch.log(D_fake).item(), abs=1e-6)
    assert cgan.g_loss(l_fake, saturating=True).item() == pytest.approx(torch.log(1 - D_fake).item(), abs=1e-6)
    assert cgan.lsgan_d_loss(torch.tensor([0.5]), torch.tensor([0.25])).item() == pytest.approx(0.25 + 0.0625)
    assert cgan.lsgan_g_loss(torch.tensor([0.2])).item() == pytest.approx(0.64)   # (D - 1)^2, not D^2


def test_discriminator_loss_pairs_real_images_with_their_labels_and_fakes_with_theirs():
    D = lambda x, y: x.mean((1, 2, 3)) + 0.1 * y.float()                 # a logit that reads the image and the label
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    x_fake, y_fake = torch.ones(2, 1, 2, 2).requires_grad_(True), torch.tensor([5, 7])
    loss = cgan.discriminator_loss(D, x, y, x_fake, y_fake)
    assert loss.item() == pytest.approx(cgan.d_loss(D(x, y), D(x_fake, y_fake)).item())
    assert loss.item() != pytest.approx(cgan.d_loss(D(x, y), D(x_fake, y)).item())   # not the real labels
    assert not loss.requires_grad                                        # x_fake detached: D's step leaves G alone
    lsgan = cgan.discriminator_loss(D, x, y, x_fake, y_fake, lsgan=True)
    assert lsgan.item() == pytest.approx(cgan.lsgan_d_loss(D(x, y), D(x_fake, y_fake)).item())


def test_grids_put_classes_in_rows_and_z_in_columns():
    torch.manual_seed(0)
    G = cgan.Generator(8, 4)
    grid = cgan.class_grid(G, 8)
    assert grid.shape == (100, 1, 28, 28) and grid.min() >= 0 and grid.max() <= 1
    interp, n = cgan.interpolation_grid(G, 8)
    assert interp.shape == (10 * n, 1, 28, 28)


def test_short_run_learns_the_labels_with_the_default_ema(tmp_path):
    """The default sampling path (the EMA of G, warmed up). Its --sample-only and --resume: tests/test_resume.py."""
    rec = cgan.main(["--steps", "120", "--batch-size", "64", "--n-samples", "500", "--out", str(tmp_path)])
    x = torch.load(tmp_path / "samples.pt")
    p = metrics.classify(metrics.get_classifier("digits"), x)[1][:, :10]  # the ten classes: rough shapes at 120 steps
    assert (p.argmax(1) == torch.arange(500) % 10).float().mean() > 0.2    # chance 0.1; measured 0.566 (ndf 32)
    assert 0 <= rec["class_accuracy"] <= 1 and rec["not_digit"] > 0     # honest: 22% "not a digit" yet (measured)
    for name in ("samples.png", "samples.pt", "interpolation.png", "loss.png", "checkpoint.pt", "metrics.json"):
        assert os.path.exists(tmp_path / name)
    assert json.load(open(tmp_path / "metrics.json"))["steps"] == 120
    x = torch.load(tmp_path / "samples.pt")
    assert x.shape == (500, 1, 28, 28) and 0 <= x.min() and x.max() <= 1


def test_d_gets_a_gradient_only_in_its_own_step(tmp_path):
    """G's step freezes D (its weights' gradients would be thrown away), and D trains again after it."""
    cfg = common.parse_config(cgan.Config, ["--steps", "2", "--batch-size", "8", "--ndf", "8", "--out", str(tmp_path)],
                              "cgan")
    G = cgan.Generator(cfg.z_dim, cfg.emb_dim)
    D = cgan.Discriminator(cond=cfg.d_cond, ndf=cfg.ndf)
    calls = []
    D.conv1[0].weight.register_hook(lambda g: calls.append(1))
    cgan.train(cfg, G, D, copy.deepcopy(G), "cpu")
    assert len(calls) == 2                                              # once per step: in D's step only


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(common.UserError, match="--z-dim, --emb-dim and --ndf must be positive"):
        cgan.main(["--z-dim", "0", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--ndf must be positive"):
        cgan.main(["--ndf", "0", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--steps must be a positive integer, got -1"):
        cgan.main(["--steps", "-1", "--out", str(tmp_path)])
