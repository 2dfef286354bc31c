"""Tests of autoencoders.py: the four losses by hand, the corruptions, the contractive penalty's closed form,
the PCA equivalence of a linear AE, and runs."""
import pytest
import torch

import autoencoders as ae_mod
import common


def identity_ae(kind="ae"):
    """A linear AE with J = 784 and h = g = identity, so g(h(x)) = x: every term is then a hand computation."""
    ae = ae_mod.AE(kind, 784, 8, linear=True)
    with torch.no_grad():
        for layer in (ae.h, ae.g):
            layer.weight.copy_(torch.eye(784))
            layer.bias.zero_()
    return ae


def test_autoencoder_losses_by_hand():
    x = common.load_images("digits", "test")[0][:4]
    x_tilde = ae_mod.corrupt(x, "gauss", 0.3, torch.Generator().manual_seed(0))
    ae = identity_ae()
    assert torch.allclose(ae_mod.ae_loss(ae, x), torch.zeros(4), atol=1e-5)                 # |x - g(h(x))|^2 = 0
    assert torch.allclose(ae_mod.dae_loss(ae, x, x_tilde), (x - x_tilde).pow(2).sum((1, 2, 3)), rtol=1e-5)
    assert torch.allclose(ae_mod.sae_loss(ae, x, 0.1), 0.1 * x.sum((1, 2, 3)), rtol=1e-5)   # lambda |z|_1, z = x >= 0
    half = ae_mod.AE("ae", 3, 8, linear=True)
    with torch.no_grad():
        half.g.weight.zero_()
        half.g.bias.fill_(0.5)                                           # g(h(x)) = 0.5 everywhere
    assert torch.allclose(ae_mod.ae_loss(half, torch.zeros(2, 1, 28, 28)), torch.full((2,), 784 * 0.25))


def test_corruptions_have_the_stated_noise():
    x = torch.full((50, 1, 28, 28), 0.5)
    gauss = ae_mod.corrupt(x, "gauss", 0.3, torch.Generator().manual_seed(1)) - x
    assert abs(float(gauss.mean())) < 0.003 and abs(float(gauss.std()) - 0.3) < 0.003
    mask = ae_mod.corrupt(x, "mask", 0.25, torch.Generator().manual_seed(1))
    assert set(mask.unique().tolist()) == {0.0, 0.5} and abs(float((mask == 0).float().mean()) - 0.25) < 0.01


def test_contractive_penalty_closed_form_equals_autograd():
    torch.manual_seed(0)
    cae = ae_mod.AE("cae", 6, 8)
    x = torch.rand(3, 1, 28, 28)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: cae.h(v[None])[0], xi.flatten()) for xi in x])
    assert torch.allclose(ae_mod.contractive_penalty(cae, x), jac.pow(2).sum((1, 2)), rtol=1e-5)   # |J_h(x)|_F^2


def test_linear_ae_spans_the_pca_subspace():
    """On data with a clear spectral gap, Adam on a linear AE reaches PCA's subspace and PCA's test error."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(784, 3, generator=g))[0]         # 3 strong directions, then small noise
    data = lambda n: ((torch.randn(n, 3, generator=g) * torch.tensor([3.0, 2.0, 1.5])) @ basis.T
                      + 0.05 * torch.randn(n, 784, generator=g) + 0.5).view(n, 1, 28, 28)
    x_train, x_test = data(4000), data(1000)
    torch.manual_seed(0)
    ae = ae_mod.AE("ae", 3, 8, linear=True)
    opt = torch.optim.Adam(ae.parameters(), 1e-2)
    for step in range(4000):                                             # 1.5 degrees and 1.012 at the end
        if step == 3000:
            opt.param_groups[0]["lr"] = 1e-3                             # smaller steps: less SGD noise at the end
        loss = ae_mod.ae_loss(ae, x_train[torch.randint(4000, (128,), generator=g)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    angle, pca_mse = ae_mod.pca_comparison(ae, x_train, x_test)
    with torch.no_grad():
        ratio = float(ae_mod.ae_loss(ae, x_test).mean()) / pca_mse
    assert angle < 5 and ratio < 1.02, (angle, ratio)


@pytest.mark.parametrize("kind, extra", [("ae", ["--linear"]), ("dae", ["--corrupt", "mask"]), ("sae", []),
                                         ("cae", [])])
def test_every_kind_runs_and_writes_its_outputs(kind, extra, tmp_path):
    rec = ae_mod.main(["--kind", kind, "--steps", "6", "--batch-size", "16", "--width", "32", "--n-eval", "50",
                       "--out", str(tmp_path)] + extra)
    assert rec["test_mse"] > 0
    keys = {"ae": ["pca_angle_deg", "pca_mse_ratio"], "sae": ["sparsity"], "dae": ["test_mse_noisy"],
            "cae": ["test_mse_noisy"]}
    assert all(key in rec for key in keys[kind])
    for name in ("samples.png", "samples.pt", "reconstructions.png", "denoising.png", "loss.png", "checkpoint.pt",
                 "metrics.json"):
        assert (tmp_path / name).exists()


def test_sae_and_cae_losses_use_their_own_lambda():
    x = common.load_images("digits", "test")[0][:4]
    ae = identity_ae()
    cfg = lambda kind: ae_mod.Config(kind=kind, lambda_sparse=0.2, lambda_contractive=7.0)
    assert torch.allclose(ae_mod.batch_loss(ae, cfg("sae"), x), 0.2 * x.sum((1, 2, 3)).mean(), rtol=1e-5)
    torch.manual_seed(0)
    cae = ae_mod.AE("cae", 6, 8)
    expected = ae_mod.ae_loss(cae, x) + 7.0 * ae_mod.contractive_penalty(cae, x)
    assert torch.allclose(ae_mod.batch_loss(cae, cfg("cae"), x), expected.mean(), rtol=1e-5)


def test_defaults_and_bad_input(tmp_path):
    cfg = lambda *argv: common.parse_config(ae_mod.Config, [*argv, "--out", str(tmp_path)], "autoencoders")
    assert (cfg().steps, cfg().lr, cfg().latent_dim, cfg().batch_size) == (5000, 1e-3, 20, 128)
    assert (cfg("--linear").lr, cfg("--linear").batch_size) == (3e-3, 1024)     # the PCA comparison's setting
    assert cfg("--linear", "--lr", "3e-4").lr == 3e-4                           # a given flag wins
    with pytest.raises(common.UserError, match="--linear is for --kind ae"):
        ae_mod.main(["--kind", "dae", "--linear", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--lambda-sparse and --lambda-contractive must be >= 0"):
        ae_mod.main(["--kind", "sae", "--lambda-sparse", "-1", "--out", str(tmp_path)])
