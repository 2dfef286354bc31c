"""Tests of cyclegan.py: network shapes, the cycle and identity losses by hand, the LSGAN terms, the image
pool, the domains, the folder loader, and runs."""
import json, os

import matplotlib.image
import numpy as np
import pytest
import torch

import common
import metrics
import cyclegan


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_generator_keeps_the_size_and_patchgan_gives_a_map(channels, size):
    torch.manual_seed(0)
    G, D = cyclegan.generator(channels, channels, width=8, n_res=2), cyclegan.discriminator(channels, ndf=8)
    x = torch.randn(2, channels, size, size)
    assert G(x).shape == x.shape                                        # 28 -> 14 -> 7 -> 14 -> 28
    assert G(x).abs().max() <= 1
    out = D(x)
    assert out.shape[:2] == (2, 1) and out.shape[2] == out.shape[3] and out.shape[2] > 1   # one score per patch


def test_cycle_and_identity_losses_equal_hand_values():
    x, y = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    G = lambda t: t + 0.5                                                # X -> Y
    F = lambda t: 2 * t                                                  # Y -> X
    fake_y, fake_x = G(x), F(y)                                          # 0.5 and 2
    # |F(G(x)) - x| = |1 - 0| = 1; |G(F(y)) - y| = |2.5 - 1| = 1.5 (per-pixel means)
    assert cyclegan.cycle_loss(G, F, x, y, fake_y, fake_x).item() == pytest.approx(2.5)
    # |G(y) - y| = 0.5; |F(x) - x| = 0
    assert cyclegan.identity_loss(G, F, x, y).item() == pytest.approx(0.5)


def test_least_squares_terms():
    d_real, d_fake = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0])
    # 1/2 [mean((1-1)^2, (0-1)^2) + mean(0.5^2, 0^2)] = 1/2 [0.5 + 0.125]
    assert cyclegan.lsgan_d_loss(d_real, d_fake).item() == pytest.approx(0.3125)
    assert cyclegan.lsgan_g_loss(d_fake).item() == pytest.approx((0.25 + 1) / 2)


def test_adversarial_loss_pairs_each_mapping_with_the_judge_of_its_output_domain():
    D_X = lambda t: t.mean((1, 2, 3))                                    # judges images of X
    D_Y = lambda t: 3 * t.mean((1, 2, 3))                                # judges images of Y
    fake_x, fake_y = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), 0.2)
    # (D_Y(G(x)) - 1)^2 + (D_X(F(y)) - 1)^2 = (0.6 - 1)^2 + (0.5 - 1)^2
    assert cyclegan.adversarial_loss(D_X, D_Y, fake_x, fake_y).item() == pytest.approx(0.16 + 0.25)


def test_image_pool_returns_stored_images_half_the_time_once_full():
    pool = cyclegan.ImagePool(50, torch.Generator().manual_seed(0))
    first = torch.arange(50.0).view(50, 1, 1, 1)
    assert torch.equal(pool.query(first), first)                        # filling: every image comes back as is
    stored = 0
    for k in range(200):
        new = torch.full((10, 1, 1, 1), 1000.0 + k)
        stored += int((pool.query(new) != new).sum())
    assert abs(stored / 2000 - 0.5) < 0.05
    assert torch.equal(cyclegan.ImagePool(0).query(first), first)       # --pool 0: off


def test_domains_are_different_renderings_of_the_same_glyphs():
    m = torch.zeros(1, 1, 28, 28)
    m[0, 0, 6:22, 13] = 1                                                # a thin vertical stroke
    x, y = cyclegan.domain_x(m), cyclegan.domain_y(m)
    assert x.shape == y.shape == (1, 3, 28, 28) and x.min() >= -1 and y.max() <= 1
    assert torch.equal(x[0, 0], x[0, 1])                                 # X: grey
    corner = (y[0, :, 0, 0] + 1) / 2
    assert torch.allclose(corner, cyclegan.BACKGROUND)                  # Y: light background
    ink = (cyclegan.grey(y) < 0.4).float()[0, 0]
    assert ink.sum() > 2 * m.sum()                                       # bold: thicker
    rows = ink.nonzero()
    top = rows[rows[:, 0] == rows[:, 0].min(), 1].float().mean()                  # mean column of the top row
    bottom = rows[rows[:, 0] == rows[:, 0].max(), 1].float().mean()
    assert top > bottom + 2                                              # italic: the top leans right


def test_folder_loader_and_run(tmp_path):
    rng = np.random.default_rng(0)
    for d in ("trainA", "trainB"):
        os.makedirs(tmp_path / "data" / d)
        for i in range(3):
            img = rng.random((40, 30, 3)) if i else rng.random((20, 20))   # RGB and grey, other sizes
            matplotlib.image.imsave(tmp_path / "data" / d / f"{i}.png", img, cmap="gray")
    from PIL import Image                                                # matplotlib writes RGBA: make one truly grey
    Image.open(tmp_path / "data" / "trainA" / "0.png").convert("L").save(tmp_path / "data" / "trainA" / "0.png")
    assert matplotlib.image.imread(tmp_path / "data" / "trainA" / "0.png").ndim == 2
    x = cyclegan.load_folder(str(tmp_path / "data" / "trainA"), 16)
    assert x.shape == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 0], x[0, 2])   # the grey image, in all 3 channels
    rec = cyclegan.main(["--data-dir", str(tmp_path / "data"), "--image-size", "16", "--steps", "2",
                         "--batch-size", "2", "--width", "4", "--ndf", "4", "--out", str(tmp_path / "run")])
    assert "cycle_l1_x" in rec and "label_preservation_xy" not in rec   # no labels in folders
    with pytest.raises(common.UserError, match="--image-size must be a multiple of 4"):
        cyclegan.main(["--data-dir", str(tmp_path / "data"), "--image-size", "18", "--out", str(tmp_path / "run")])
    with pytest.raises(common.UserError, match="has no trainA/ and trainB/ folders"):
        cyclegan.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")])


# the quick suite runs cyclegan through test_resume (main, --resume, --sample-only) and self_contained
@pytest.mark.slow
def test_smoke_run_on_digits_and_sample_only(tmp_path):
    args = ["--steps", "3", "--batch-size", "4", "--width", "4", "--ndf", "4", "--n-eval", "200",
            "--out", str(tmp_path)]
    rec = cyclegan.main(args)
    for key in ("label_preservation_xy", "label_preservation_yx", "cycle_l1_x", "cycle_l1_y", "fd_y", "l1_to_true_y"):
        assert key in rec
    for name in ("samples.png", "samples.pt", "translation.png", "loss.png", "checkpoint.pt", "metrics.json"):
        assert os.path.exists(tmp_path / name)
    again = cyclegan.main(args + ["--sample-only"])
    assert again["cycle_l1_x"] == pytest.approx(rec["cycle_l1_x"], abs=1e-5)
    assert json.load(open(tmp_path / "metrics.json"))["steps"] == 0


# ----------------------------------------------------------------------------- pix2pix (--paired)
def test_pix2pix_losses_by_hand():
    l_real = torch.tensor([[0.3, -1.2]])
    l_fake = torch.tensor([[2.0, -0.5]])
    sig = torch.sigmoid
    want_d = -(torch.log(sig(l_real)).mean() + torch.log(1 - sig(l_fake)).mean())   # -[log D(x,y) + log(1 - D(x,G(x)))]
    assert torch.allclose(cyclegan.pix2pix_d_loss(l_real, l_fake), want_d, atol=1e-6)
    fake_y = torch.tensor([0.5, -0.5])
    y = torch.tensor([0.0, 0.0])
    want_g = -torch.log(sig(l_fake)).mean() + 100 * 0.5                  # -log D(x, G(x)) + lambda |y - G(x)|_1
    assert torch.allclose(cyclegan.pix2pix_g_loss(l_fake, fake_y, y, 100.0), want_g, atol=1e-5)


@pytest.mark.parametrize("paired", [False, True])
def test_d_gets_a_gradient_only_in_its_own_step(paired, tmp_path):
    """The generators' step freezes the discriminators (their weights' gradients would be thrown away), and they
    train again after it."""
    argv = ["--steps", "2", "--batch-size", "2", "--width", "4", "--ndf", "4", "--out", str(tmp_path)]
    cfg = common.parse_config(cyclegan.Config, argv + (["--paired"] if paired else []), "cyclegan")
    G = cyclegan.generator(3, 3, cfg.width, cfg.n_res)
    calls = []
    if paired:
        D = cyclegan.discriminator(6, cfg.ndf)
        next(D.parameters()).register_hook(lambda g: calls.append(1))
        cyclegan.train_paired(cfg, G, D, "cpu")
    else:
        F = cyclegan.generator(3, 3, cfg.width, cfg.n_res)
        D_X = cyclegan.discriminator(3, cfg.ndf)
        D_Y = cyclegan.discriminator(3, cfg.ndf)
        for D in (D_X, D_Y):
            next(D.parameters()).register_hook(lambda g: calls.append(1))
        cyclegan.train(cfg, [G, F, D_X, D_Y], "cpu")
    assert len(calls) == 2 * (1 if paired else 2)                       # once per step and D: in D's step only


def test_pairs_are_one_glyph_rendered_both_ways():
    cfg = cyclegan.Config(image_size=28)
    x, y, labels = cyclegan.load_pairs(cfg, "test")
    m = common.load_images("digits", "test")[0][:5]
    assert torch.equal(x[:5], cyclegan.domain_x(m)) and torch.equal(y[:5], cyclegan.domain_y(m))
    assert len(x) == len(y) == len(labels) == 5000


def test_paired_runs_on_the_built_in_pairs_and_refuses_a_folder(tmp_path):
    for d in ("trainA", "trainB"):
        os.makedirs(tmp_path / "p" / d)
        matplotlib.image.imsave(tmp_path / "p" / d / "0.png", np.zeros((12, 12, 3)))
    with pytest.raises(common.UserError, match="--paired trains on the built-in pairs"):
        cyclegan.main(["--paired", "--data-dir", str(tmp_path / "p"), "--out", str(tmp_path / "bad")])
    rec = cyclegan.main(["--paired", "--steps", "3", "--batch-size", "4", "--width", "4", "--ndf", "4",
                         "--n-eval", "100", "--out", str(tmp_path / "digits")])
    assert set(rec) >= {"l1_to_true_y", "label_preservation_xy", "fd_y"}
    again = cyclegan.main(["--sample-only", "--n-eval", "100", "--out", str(tmp_path / "digits")])   # reads --paired
    assert again["l1_to_true_y"] == pytest.approx(rec["l1_to_true_y"], abs=1e-6)


def test_the_y_evaluator_is_the_shipped_one_not_trained(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("the Y evaluator was trained"))
    shipped = common.load_checkpoint(os.path.join(common.EVALUATORS, "classifier_digits_cycleY_v2.pt"))
    net = cyclegan.y_classifier(cyclegan.Config(image_size=28))
    assert all(torch.equal(net.state_dict()[k], shipped[k]) for k in shipped)


@pytest.mark.slow
def test_the_shipped_y_evaluator_is_what_its_recipe_trains(tmp_path, monkeypatch):
    """Retrained from cyclegan's recipe (bit for bit where it was made; elsewhere an equally good net): the two
    agree on the Y test images and both read their labels."""
    cfg = cyclegan.Config(image_size=28)
    monkeypatch.setattr(common, "EVALUATORS", str(tmp_path / "none"))
    monkeypatch.setattr(common, "CACHE", str(tmp_path))
    fresh = cyclegan.y_classifier(cfg)
    monkeypatch.undo()
    shipped = cyclegan.y_classifier(cfg)
    _, y, _, labels = cyclegan.load_domains(cfg, "test")
    called = [metrics.classify(net, cyclegan.grey(y))[1].argmax(1) for net in (fresh, shipped)]
    assert (called[0] == called[1]).float().mean() >= 0.98
    assert min((c == labels).float().mean() for c in called) >= 0.98
