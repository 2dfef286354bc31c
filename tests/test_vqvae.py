"""Tests of vqvae.py: the three loss terms and where each gradient goes, the straight-through gradient, the
PixelCNN's causal masks, and runs."""
import pytest
import torch

import common
import vqvae


def small_vqvae():
    torch.manual_seed(0)
    model = vqvae.VQVAE(8, 4)
    with torch.no_grad():
        model.codebook.weight.normal_()
    return model


def test_vq_terms_by_hand_and_where_each_gradient_goes():
    model = small_vqvae()
    x = common.load_images("digits", "test")[0][:2]
    recon, codebook, commit, k = vqvae.vq_loss(model, x, 0.25)
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
    recon, codebook, commit, k = vqvae.vq_loss(model, x, 0.25)
    enc, book, dec = grads(codebook)                                     # |sg(z_e) - z_q|^2: the codebook only
    assert book.abs().sum() > 0 and (enc is None or enc.abs().sum() == 0)
    recon, codebook, commit, k = vqvae.vq_loss(model, x, 0.25)
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
    vqvae.squared_error(x, model.decoder(dec_in)).sum().backward()
    assert torch.equal(z_e.grad, dec_in.grad) and z_e.grad.abs().sum() > 0


def test_prior_output_i_sees_every_input_before_i_and_none_after():
    """Causal (nothing at or after i reaches logit i) and without a blind spot (everything before i does), for
    every position of the 7x7 grid, by autograd on the layers after the embedding."""
    torch.manual_seed(0)
    prior = vqvae.PixelPrior(8, width=8, layers=5)                       # 5 blocks reach the top row
    net = lambda h: prior.head(prior.blocks(prior.first(h)))
    for i in range(49):
        h = torch.randn(1, 8, 7, 7, requires_grad=True)
        r, c = divmod(i, 7)
        grad, = torch.autograd.grad(net(h)[0, :, r, c].sum(), h)
        seen = grad.abs().sum(1)[0].flatten() > 0                        # (49,) which inputs position i sees
        assert not seen[i:].any() and seen[:i].all(), i


def test_stacked_3x3_masks_alone_have_a_blind_spot():
    """Why the first layer spans the whole row above: a 3x3 type-A layer and 3x3 type-B layers never reach the
    position two to the right in the row above."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(vqvae.MaskedConv2d("A", 4, 4, 3, 3), vqvae.MaskedConv2d("B", 4, 4, 3, 3),
                              vqvae.MaskedConv2d("B", 4, 4, 3, 3))
    h = torch.randn(1, 4, 7, 7, requires_grad=True)
    grad, = torch.autograd.grad(net(h)[0, :, 3, 2].sum(), h)
    assert grad[0, :, 2, 4].abs().sum() == 0 and grad[0, :, 2, 3].abs().sum() > 0


def test_sample_codes_draws_in_raster_order_from_each_conditional():
    """A stand-in prior: p(k_i | k_<i) puts all its mass on k_{i-1} + 1 (mod K), k_1 = 3, so the codes must read
    3, 4, 5, ... along the raster order; then a prior of 1/4 on code 0 and 3/4 on code 1 at every position."""
    K = 8

    def chain(k):                                                        # (n, 7, 7) -> logits (n, K, 7, 7)
        target = (k.flatten(1).roll(1, dims=1) + 1) % K
        target[:, 0] = 3
        return 50.0 * torch.nn.functional.one_hot(target, K).permute(0, 2, 1).reshape(len(k), K, 7, 7).float()

    torch.manual_seed(0)
    k = vqvae.sample_codes(chain, 5, "cpu")
    assert k.shape == (5, 7, 7)
    assert torch.equal(k.flatten(1), ((torch.arange(49) + 3) % K).expand(5, 49))

    def coin(k):
        logits = torch.full((len(k), K, 7, 7), -1e4)
        logits[:, 0], logits[:, 1] = torch.log(torch.tensor(0.25)), torch.log(torch.tensor(0.75))
        return logits

    k = vqvae.sample_codes(coin, 400, "cpu")
    assert set(k.unique().tolist()) == {0, 1}
    assert float(k.float().mean()) == pytest.approx(0.75, abs=0.02)   # drawn, not the most likely code


def test_codes_are_the_nearest_codes_of_the_encoder():
    model = small_vqvae()
    x = common.load_images("digits", "test")[0][:30]
    assert torch.equal(vqvae.encode(model, x, "cpu", batch=7), model.quantize(model.encoder(x))[0])


def test_runs_writes_its_outputs_and_reloads(tmp_path):
    args = ["--steps", "6", "--prior-steps", "3", "--batch-size", "16", "--n-samples", "20", "--n-eval", "50",
            "--out", str(tmp_path)]
    rec = vqvae.main(args)
    assert rec["test_mse"] > 0 and 1 <= rec["codebook_perplexity"] <= 64
    assert {"codes_used_frac", "digit_confidence", "class_entropy", "fd"} <= set(rec)
    for name in ("samples.png", "samples.pt", "reconstructions.png", "loss.png", "checkpoint.pt", "metrics.json"):
        assert (tmp_path / name).exists()
    assert torch.load(tmp_path / "samples.pt").shape == (20, 1, 28, 28)
    again = vqvae.main(["--sample-only", "--n-samples", "20", "--n-eval", "50", "--out", str(tmp_path)])
    assert again["test_mse"] == rec["test_mse"] and again["fd"] == rec["fd"]
    with pytest.raises(common.UserError, match="--prior-steps must be in 1..--steps - 1"):
        vqvae.main(["--steps", "5", "--prior-steps", "5", "--out", str(tmp_path / "x")])
