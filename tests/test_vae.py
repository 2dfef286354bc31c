"""Tests of vae.py: the closed-form KL, the reparametrization, the likelihoods, beta, the IW bound, and runs."""
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
    model = vae.VAE(latent_dim=3, width=16, likelihood=likelihood, sigma_x=sigma_x)
    x, z = torch.rand(5, 1, 28, 28), torch.randn(5, 3)
    out = model.decode(z)
    if likelihood == "bernoulli":
        ref = D.Bernoulli(logits=out, validate_args=False).log_prob(x.flatten(1)).sum(1)  # same formula for gray x
    else:
        ref = D.Normal(out[0], (0.5 * out[1]).exp()).log_prob(x.flatten(1)).sum(1)
    assert torch.allclose(vae.log_px_given_z(model, x, z), ref, atol=1e-3)


def test_elbo_below_iw_bound_and_bound_grows_with_k():
    torch.manual_seed(3)
    model = vae.VAE(latent_dim=4, width=32)
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
    model = vae.VAE(latent_dim=2, width=32)
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
    args = ["--out", str(tmp_path), "--n-eval", "300", "--iw-k", "10", "--n-samples", "500", "--width", "128"]
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
    vae.main(["--out", str(tmp_path), "--latent-dim", "2", "--steps", "20", "--n-eval", "50", "--iw-k", "4",
              "--n-samples", "100", "--width", "32"])
    assert (tmp_path / "latent_map.png").exists() and (tmp_path / "latent_scatter.png").exists()
    rec = vae.main(["--out", str(tmp_path / "g"), "--likelihood", "gaussian", "--binarize", "--steps", "20",
                    "--n-eval", "50", "--iw-k", "4", "--n-samples", "100", "--width", "32"])
    assert math.isfinite(rec["test_nelbo"])


def test_beta_weighs_the_kl_term_only():
    """beta-VAE: loss = -E_q log p(x|z) + beta KL; beta = 1 is the -ELBO. A beta on the reconstruction instead, or
    a KL with the wrong sign, gives another number."""
    torch.manual_seed(4)
    model = vae.VAE(latent_dim=3, width=16)
    x = common.load_images("digits", "test")[0][:8]
    loss, recon, kl = vae.negative_elbo(model, x, beta=0.3)
    assert torch.allclose(loss, recon + 0.3 * kl) and (kl > 0).all() and (recon > 0).all()
    torch.manual_seed(5)
    one = vae.negative_elbo(model, x, beta=1.0)
    torch.manual_seed(5)
    mu, logvar = model.encode(x)
    z = vae.reparametrize(mu, logvar)
    assert torch.allclose(one[0], -vae.log_px_given_z(model, x, z) + vae.kl_to_prior(mu, logvar), rtol=1e-5)


def test_a_checkpoint_of_a_model_that_moved_names_its_new_script(tmp_path):
    common.save_checkpoint(str(tmp_path / "checkpoint.pt"), script="vae", step=3, config={"model": "vqvae"})
    with pytest.raises(common.UserError, match="--model vqvae run: that model now lives in .*vqvae.py"):
        vae.main(["--sample-only", "--out", str(tmp_path)])


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(common.UserError, match="--latent-dim must be a positive integer"):
        vae.main(["--latent-dim", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        vae.main(["--likelihood", "poisson"])
    assert "invalid choice: 'poisson'" in capsys.readouterr().err
    with pytest.raises(common.UserError, match="no checkpoint"):
        vae.main(["--sample-only", "--out", str(tmp_path / "empty")])


def test_latent_walk_passes_through_each_digits_reconstruction(tmp_path):
    from PIL import Image
    import numpy as np
    vae.main(["--out", str(tmp_path), "--steps", "2", "--width", "16", "--n-eval", "20", "--iw-k", "2",
              "--n-samples", "20", "--gif"])
    model = vae.VAE(10, 16)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    x, y = common.load_images("digits", "test")
    walk = vae.latent_walk(model, x, y, torch.device("cpu"))
    assert walk.shape == (81, 1, 28, 28) and torch.equal(walk[0], walk[-1])
    with torch.no_grad():
        mu = model.encode(torch.stack([x[y == c][0] for c in (0, 1, 7)]))[0]
        assert torch.allclose(walk[[0, 8, 56]], model.mean(mu), atol=1e-6)                  # on each mu(x)
        assert torch.allclose(walk[4], model.mean((mu[:1] + mu[1:2]) / 2)[0], atol=1e-6)     # half way 0 -> 1
    gif = Image.open(tmp_path / "latent_walk.gif")
    assert gif.n_frames == 81
    gif.seek(8)
    assert np.array_equal(np.array(gif.convert("RGB")), common.image_frame(walk[8:9], nrow=1, scale=6))
