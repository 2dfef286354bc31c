"""Tests of vae.py: the closed-form KL, the reparametrization, the likelihoods, the IW bound, and runs."""
import json, math

import pytest
import torch

import common
import vae

D = torch.distributions


def test_closed_form_kl_matches_torch_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    q, p = D.Normal(mu, (0.5 * logvar).exp()), D.Normal(torch.zeros(4, 3), torch.ones(4, 3))
    exact = D.kl_divergence(q, p).sum(1)
    assert torch.allclose(vae.kl_to_prior(mu, logvar), exact, atol=1e-5)
    z = q.sample((200000,))                                              # E_q[log q - log p]
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(mc, exact, atol=0.05)


def test_reparametrization_moments_and_gradients():
    torch.manual_seed(1)
    mu = torch.tensor([1.0, -2.0], requires_grad=True)
    logvar = torch.tensor([0.0, math.log(0.25)], requires_grad=True)
    z = vae.reparametrize(mu.expand(100000, 2), logvar.expand(100000, 2))
    assert torch.allclose(z.mean(0), mu.detach(), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([1.0, 0.5]), atol=0.01)
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.full((2,), 100000.0))           # dz/dmu = 1
    assert logvar.grad.abs().min() > 0                                   # dz/dsigma = eps: the gradient reaches sigma


@pytest.mark.parametrize("likelihood, sigma_x", [("bernoulli", 0.0), ("gaussian", 0.0), ("gaussian", 0.2)])
def test_log_likelihood_matches_torch_distributions(likelihood, sigma_x):
    torch.manual_seed(2)
    model = vae.VAE(latent_dim=3, hidden=16, likelihood=likelihood, sigma_x=sigma_x)
    x, z = torch.rand(5, 1, 28, 28), torch.randn(5, 3)
    out = model.decode(z)
    if likelihood == "bernoulli":
        ref = D.Bernoulli(logits=out, validate_args=False).log_prob(x.flatten(1)).sum(1)  # same formula for gray x
    else:
        ref = D.Normal(out[0], (0.5 * out[1]).exp()).log_prob(x.flatten(1)).sum(1)
    assert torch.allclose(vae.log_px_given_z(model, x, z), ref, atol=1e-3)


def test_elbo_below_iw_bound_and_bound_grows_with_k():
    torch.manual_seed(3)
    model = vae.VAE(latent_dim=4, hidden=32)
    x = common.load_images("digits", "test")[0][:64]
    with torch.no_grad():
        elbo = -torch.stack([vae.negative_elbo(model, x)[0] for _ in range(20)]).mean(0)   # E_q ELBO per image
    iw = {k: torch.stack([vae.iw_log_likelihood(model, x, k) for _ in range(5)]).mean(0) for k in (1, 10, 100)}
    assert torch.allclose(iw[1].mean(), elbo.mean(), rtol=0.01)          # K = 1 is the ELBO
    assert (iw[100] >= elbo - 0.5).all() and iw[100].mean() > elbo.mean()
    assert iw[1].mean() < iw[10].mean() < iw[100].mean()


def test_iw_bound_converges_to_log_px_by_quadrature():
    """2-D latent: log p(x) = log of the integral of p(x|z) N(z; 0, I) over z, on a grid (Delta = 0.1 on
    [-7, 7]^2). The IW estimate with K = 2000 must meet it (a missing or doubled - log K is off by 7.6 nats)."""
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=2, hidden=32)
    with torch.no_grad():
        model.decoder[-1].weight.mul_(8)                                 # p(x|z) that really varies with z
    x = common.load_images("digits", "test")[0][:3]
    g = torch.arange(-7, 7.0001, 0.1)
    z = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)    # (141 * 141, 2)
    log_prior = vae.log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    with torch.no_grad():
        exact = torch.stack([torch.logsumexp(vae.log_px_given_z(model, xi[None].expand(len(z), -1, -1, -1), z)
                                             + log_prior, 0) + 2 * math.log(0.1) for xi in x])
        iw = torch.stack([vae.iw_log_likelihood(model, x, 2000) for _ in range(3)]).mean(0)
    assert torch.allclose(iw, exact, atol=0.3), (iw, exact)


def test_training_lowers_test_nelbo_and_writes_outputs(tmp_path):
    args = ["--out", str(tmp_path), "--eval-n", "300", "--iw-k", "10", "--n-samples", "500", "--hidden", "128"]
    before = vae.main(args + ["--steps", "1"])
    after = vae.main(args + ["--steps", "300"])
    assert after["test_nelbo"] < before["test_nelbo"] - 150              # untrained ~545 nats, 300 steps ~ 250
    assert after["test_nll_iw"] <= after["test_nelbo"] + 1
    saved = json.load(open(tmp_path / "metrics.json"))
    for key in ("test_nelbo", "test_nll_iw", "test_kl", "test_recon", "fd", "digit_confidence", "class_entropy",
                "steps", "seconds", "device"):
        assert key in saved
    for f in ("samples.png", "samples.pt", "loss.png", "reconstructions.png", "interpolation.png", "checkpoint.pt"):
        assert (tmp_path / f).exists()
    samples = torch.load(tmp_path / "samples.pt")
    assert samples.shape == (500, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    again = vae.main(args + ["--sample-only"])                           # reloads the checkpoint
    assert abs(again["test_nelbo"] - after["test_nelbo"]) < 5 and again["steps"] == 0


@pytest.mark.slow  # suite time; the default run and test_resume cover main()
def test_latent_dim_2_and_gaussian_binarized_runs(tmp_path):
    vae.main(["--out", str(tmp_path), "--latent-dim", "2", "--steps", "20", "--eval-n", "50", "--iw-k", "4",
              "--n-samples", "100", "--hidden", "32"])
    assert (tmp_path / "latent_map.png").exists() and (tmp_path / "latent_scatter.png").exists()
    rec = vae.main(["--out", str(tmp_path / "g"), "--likelihood", "gaussian", "--binarize", "--steps", "20",
                    "--eval-n", "50", "--iw-k", "4", "--n-samples", "100", "--hidden", "32"])
    assert math.isfinite(rec["test_nelbo"])


def test_vae_and_family_defaults_differ(tmp_path):
    cfg = lambda *argv: common.parse_config(vae.Config, [*argv, "--out", str(tmp_path)], "vae")
    assert (cfg().steps, cfg().lr, cfg().latent_dim) == (10000, 2e-3, 10)    # the VAE's measured default (README)
    family = cfg("--model", "dae")
    assert (family.steps, family.lr, family.latent_dim) == (5000, 1e-3, 20)  # the family's rows' settings
    assert cfg("--model", "sae", "--latent-dim", "7", "--lr", "3e-4").latent_dim == 7   # a given flag wins
    assert cfg("--model", "sae", "--lr", "3e-4").lr == 3e-4
    assert cfg("--model", "ae", "--linear").lr == 3e-3                 # PCA's setting


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(common.UserError, match="--latent-dim must be a positive integer"):
        vae.main(["--latent-dim", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        vae.main(["--likelihood", "poisson"])
    assert "invalid choice: 'poisson'" in capsys.readouterr().err
    with pytest.raises(common.UserError, match="no checkpoint"):
        vae.main(["--sample-only", "--out", str(tmp_path / "empty")])


# ----------------------------------------------------------------------------- the autoencoder family
def identity_ae(model="ae"):
    """A linear AE with J = 784 and h = g = identity, so g(h(x)) = x: every term is then a hand computation."""
    ae = vae.AE(model, 784, 8, linear=True)
    with torch.no_grad():
        for layer in (ae.h, ae.g):
            layer.weight.copy_(torch.eye(784))
            layer.bias.zero_()
    return ae


def test_autoencoder_losses_by_hand():
    x = common.load_images("digits", "test")[0][:4]
    x_tilde = vae.corrupt(x, "gauss", 0.3, torch.Generator().manual_seed(0))
    ae = identity_ae()
    assert torch.allclose(vae.ae_loss(ae, x), torch.zeros(4), atol=1e-5)                 # |x - g(h(x))|^2 = 0
    assert torch.allclose(vae.dae_loss(ae, x, x_tilde), (x - x_tilde).pow(2).sum((1, 2, 3)), rtol=1e-5)
    assert torch.allclose(vae.sae_loss(ae, x, 0.1), 0.1 * x.sum((1, 2, 3)), rtol=1e-5)   # lambda |z|_1, z = x >= 0
    half = vae.AE("ae", 3, 8, linear=True)
    with torch.no_grad():
        half.g.weight.zero_()
        half.g.bias.fill_(0.5)                                           # g(h(x)) = 0.5 everywhere
    assert torch.allclose(vae.ae_loss(half, torch.zeros(2, 1, 28, 28)), torch.full((2,), 784 * 0.25))


def test_corruptions_have_the_stated_noise():
    x = torch.full((50, 1, 28, 28), 0.5)
    gauss = vae.corrupt(x, "gauss", 0.3, torch.Generator().manual_seed(1)) - x
    assert abs(float(gauss.mean())) < 0.003 and abs(float(gauss.std()) - 0.3) < 0.003
    mask = vae.corrupt(x, "mask", 0.25, torch.Generator().manual_seed(1))
    assert set(mask.unique().tolist()) == {0.0, 0.5} and abs(float((mask == 0).float().mean()) - 0.25) < 0.01


def test_contractive_penalty_closed_form_equals_autograd():
    torch.manual_seed(0)
    cae = vae.AE("cae", 6, 8)
    x = torch.rand(3, 1, 28, 28)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: cae.h(v[None])[0], xi.flatten()) for xi in x])
    assert torch.allclose(vae.contractive_penalty(cae, x), jac.pow(2).sum((1, 2)), rtol=1e-5)   # |J_h(x)|_F^2


def small_vqvae():
    torch.manual_seed(0)
    model = vae.VQVAE(8, 4)
    with torch.no_grad():
        model.codebook.weight.normal_()
    return model


def test_vq_terms_by_hand_and_where_each_gradient_goes():
    model = small_vqvae()
    x = common.load_images("digits", "test")[0][:2]
    recon, codebook, commit, k = vae.vq_loss(model, x, 0.25)
    z_e = model.encoder(x).detach()
    e = model.codebook.weight.detach()
    d2 = ((z_e.permute(0, 2, 3, 1)[..., None, :] - e) ** 2).sum(-1)      # (B, 7, 7, K) squared distances
    assert torch.equal(k, d2.argmin(-1))                                 # the nearest code
    assert torch.allclose(codebook, d2.min(-1).values.sum((1, 2)), rtol=1e-5)
    assert torch.allclose(commit, 0.25 * d2.min(-1).values.sum((1, 2)), rtol=1e-5)
    grads = lambda term: torch.autograd.grad(term.sum(), [model.encoder[0].weight, model.codebook.weight,
                                                          model.decoder[0].weight], allow_unused=True)
    enc, book, dec = grads(commit)                                       # beta |z_e - sg(z_q)|^2: the encoder only
    assert enc.abs().sum() > 0 and (book is None or book.abs().sum() == 0) and (dec is None or dec.abs().sum() == 0)
    recon, codebook, commit, k = vae.vq_loss(model, x, 0.25)
    enc, book, dec = grads(codebook)                                     # |sg(z_e) - z_q|^2: the codebook only
    assert book.abs().sum() > 0 and (enc is None or enc.abs().sum() == 0)
    recon, codebook, commit, k = vae.vq_loss(model, x, 0.25)
    enc, book, dec = grads(recon)                                        # |x - Dec(z_q)|^2: decoder and encoder
    assert enc.abs().sum() > 0 and dec.abs().sum() > 0 and (book is None or book.abs().sum() == 0)


def test_straight_through_copies_the_decoder_input_gradient_to_z_e():
    model = small_vqvae()
    x = common.load_images("digits", "test")[0][:2]
    z_e = model.encoder(x)
    z_e.retain_grad()
    _, z_q = model.quantize(z_e)
    dec_in = z_e + (z_q - z_e).detach()
    dec_in.retain_grad()
    assert torch.allclose(dec_in, z_q, atol=1e-6)                        # the forward pass sees z_q (to rounding)
    vae.squared_error(x, model.decoder(dec_in)).sum().backward()
    assert torch.equal(z_e.grad, dec_in.grad) and z_e.grad.abs().sum() > 0


def test_prior_output_i_depends_only_on_inputs_before_i():
    torch.manual_seed(0)
    prior = vae.PixelPrior(8, ch=8, layers=2)
    for i in range(49):
        h = torch.randn(1, 8, 7, 7, requires_grad=True)
        r, c = divmod(i, 7)
        grad, = torch.autograd.grad(prior.net(h)[0, :, r, c].sum(), h)
        seen = grad.abs().sum(1)[0].flatten() > 0                        # (49,) which inputs position i sees
        assert not seen[i:].any() and (i == 0 or seen[:i].any())


def test_linear_ae_spans_the_pca_subspace():
    """On data with a clear spectral gap, Adam on a linear AE reaches PCA's subspace and PCA's test error."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(784, 3, generator=g))[0]         # 3 strong directions, then small noise
    data = lambda n: ((torch.randn(n, 3, generator=g) * torch.tensor([3.0, 2.0, 1.5])) @ basis.T
                      + 0.05 * torch.randn(n, 784, generator=g) + 0.5).view(n, 1, 28, 28)
    x_train, x_test = data(4000), data(1000)
    torch.manual_seed(0)
    ae = vae.AE("ae", 3, 8, linear=True)
    opt = torch.optim.Adam(ae.parameters(), 1e-2)
    for step in range(4000):                                             # 1.5 degrees and 1.012 at the end
        if step == 3000:
            opt.param_groups[0]["lr"] = 1e-3                             # smaller steps: less SGD noise at the end
        loss = vae.ae_loss(ae, x_train[torch.randint(4000, (128,), generator=g)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    angle, pca_mse = vae.pca_comparison(ae, x_train, x_test)
    with torch.no_grad():
        ratio = float(vae.ae_loss(ae, x_test).mean()) / pca_mse
    assert angle < 5 and ratio < 1.02, (angle, ratio)


@pytest.mark.parametrize("model, extra", [("ae", ["--linear"]), ("dae", ["--corrupt", "mask"]), ("sae", []),
                                          ("cae", []), ("vqvae", ["--prior-steps", "3", "--n-samples", "20"])])
def test_every_model_runs_and_writes_its_outputs(model, extra, tmp_path):
    rec = vae.main(["--model", model, "--steps", "6", "--batch-size", "16", "--hidden", "32", "--eval-n", "50",
                    "--out", str(tmp_path)] + extra)
    assert rec["test_mse"] > 0
    keys = {"ae": ["pca_angle_deg", "pca_mse_ratio"], "sae": ["sparsity"], "dae": ["test_mse_noisy"],
            "cae": ["test_mse_noisy"], "vqvae": ["codebook_perplexity", "codes_used_frac", "digit_confidence"]}
    assert all(key in rec for key in keys[model])
    for name in ("samples.png", "samples.pt", "reconstructions.png", "loss.png", "checkpoint.pt", "metrics.json"):
        assert (tmp_path / name).exists()
    with pytest.raises(common.UserError, match="--linear is for --model ae"):
        vae.main(["--model", "dae", "--linear", "--out", str(tmp_path)])
