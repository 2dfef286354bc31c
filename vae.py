r"""vae.py - the variational autoencoder of Kingma & Welling, straight from the ELBO derivation, and the
lectures' autoencoder family around it: undercomplete (= PCA when linear), denoising, sparse, contractive, VQ-VAE.

Lectures: 002 "Variational Auto-Encoders" to "VAE - instantiation example"; 004 "Variational autoencoder";
000 section 7.3. Run: `python vae.py` (digits, ~3 CPU minutes), `python vae.py --latent-dim 2` (latent map),
`python vae.py --data mnist10k --data-dir ../shared/data/mnist --binarize` (real MNIST test files).
The family (`--model`, each in its own section below): ae, dae, sae, cae (004 "Autoencoder" to "Contracting
autoencoders") and vqvae (002 "Learning discrete distributions: VQ-VAE"), e.g. `python vae.py --model ae --linear`.

    prior          p(z) = N(0, I)
    encoder        q_phi(z|x) = N(mu(x), diag sigma^2(x)); the network outputs mu and log sigma^2
    decoder        p_theta(x|z): Bernoulli(sigmoid(logits(z))) (default), or N(mu(z), diag sigma^2) with
                   sigma^2 learned per pixel (--likelihood gaussian) or fixed (--sigma-x S)
    ELBO           V_L = -D_KL(q_phi(z|x) || p(z)) + E_q[log p_theta(x|z)]            (002, "Loss criterion")
    closed form    -D_KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)   (002, "VAE - instantiation example")
    reparam.       z = mu + sigma * eps, eps ~ N(0, I)                         (002, "VAE- reparametrization trick")
    IW bound       log p(x) >= E[log 1/K sum_k p(x, z_k) / q(z_k|x)], z_k ~ q  (002, "Importance sampling ...");
                   the bound holds in expectation over the draws, not for each draw
The loss is -ELBO in nats per image: summed over pixels and latent dimensions, averaged over the batch.
Differences from the slides: the Gaussian log-likelihood keeps the -1/2 log(2 pi) constant (the slide drops it,
and its second form has the sign flipped, i.e. it is -log p), so the nats are true log-densities. With gray
pixels the Bernoulli "likelihood" is the common practice but not a normalized density of gray images;
--binarize (dynamic binarization) gives the setting of published binarized-MNIST numbers.
Networks: MLPs 784 -> hidden -> hidden -> 2J (encoder) and J -> hidden -> hidden -> 784 (decoder), ReLU.
"Samples" (samples.png/.pt and the image metrics) are the decoder means E[x|z], z ~ p(z), not draws from p(x|z).
The loss curve is the -ELBO only for beta = 1 (else the beta-weighted loss, labelled so).

    autoencoder    h_{theta_e}: x -> z, g_{theta_d}: z -> x; min E L(x, g(h(x))), L = |x - g(h(x))|^2  (004 eq. 13-14)
    denoising      L(x, g(h(x~))), x~ a corrupted copy of x: x + noise N(0, I), or pixels zeroed (mask)   (004)
    sparse         L(x, g(h(x))) + Omega(z), Omega(z) = lambda |z|_1, z = h(x)                          (004)
    contractive    L(x, g(h(x))) + lambda sum_i |grad_x h(x)_i|^2                                     (004)
    VQ-VAE         L = |x - Dec(z_q(x))|^2 + |sg(z_e(x)) - z_q(x)|^2 + beta |z_e(x) - sg(z_q(x))|^2; z_q: the
                   nearest codebook entry; straight-through gradient: grad wrt z_e := grad wrt z_q  (002, VQ-VAE)
Beyond the slides: the contractive norm is squared (Rifai et al. 2011; the slide's unsquared norm is not smooth
at 0); unused VQ codes are re-initialised from encoder outputs (--revive, a common remedy for dead codes); and a
VQ-VAE cannot sample by itself (the slide: "the model requires additional steps"), so its last --prior-steps
train a small PixelCNN prior p(k) = prod_i p(k_i | k_<i) over the 7x7 grid of code indices (van den Oord et
al. 2016, 2017), whose samples are decoded. The non-generative models (ae, dae, sae, cae) write their test
reconstructions as samples.png/.pt. test_mse: |x - x_hat|^2 per image (summed over pixels) for every model.
"""
import dataclasses, math, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import common


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "dataset", common.IMAGE_DATA)
    steps: int = common.arg(10000, "training steps (other models than vae: 5000 unless given)")
    lr: float = common.arg(2e-3, "Adam learning rate (other models: 1e-3; ae --linear: 3e-3 and batch 1024; unless "
                                 "given)")
    latent_dim: int = common.arg(10, "J, the dimension of z (other models: 20 unless given; 2 draws latent_map.png)")
    hidden: int = common.arg(512, "hidden units per MLP layer")
    likelihood: str = common.arg("bernoulli", "decoder p(x|z)", ["bernoulli", "gaussian"])
    sigma_x: float = common.arg(0.0, "gaussian decoder: fixed std of p(x|z); 0 = learned per pixel")
    beta: float = common.arg(1.0, "weight of the KL term (beta-VAE); 1 is the ELBO")
    binarize: bool = common.arg(False, "dynamically binarize pixels (x ~ Bernoulli(gray value))")
    iw_k: int = common.arg(100, "K, importance samples for test_nll_iw")
    eval_n: int = common.arg(2000, "test images used for test_nelbo and test_nll_iw")
    n_samples: int = common.arg(5000, "samples drawn for fd / digit_confidence / class_entropy")
    model: str = common.arg("vae", "which autoencoder", ["vae", "ae", "dae", "sae", "cae", "vqvae"])
    linear: bool = common.arg(False, "ae: linear encoder and decoder (then it spans PCA's subspace)")
    corrupt: str = common.arg("gauss", "dae's corruption, also used for test_mse_noisy", ["gauss", "mask"])
    noise: float = common.arg(0.5, "gauss: std of the added noise; mask: probability that a pixel is zeroed")
    lam: float = common.arg(0.0, "lambda of sae's L1 or cae's contractive penalty (0: 0.05 for sae, 0.5 for cae)")
    codes: int = common.arg(64, "vqvae: codebook size K")
    code_dim: int = common.arg(16, "vqvae: dimension D of each code and of z_e")
    vq_beta: float = common.arg(0.25, "vqvae: beta, the weight of the commitment term")
    revive: bool = common.arg(True, "vqvae: every 100 steps of the first half, move unused codes onto encoder outputs")
    prior_steps: int = common.arg(2000, "vqvae: the last steps train the PixelCNN prior over the codes")
    MODEL_FLAGS = ("data", "latent_dim", "hidden", "likelihood", "sigma_x", "model", "linear", "codes", "code_dim")

    def defaults(self, given):
        self.lam = self.lam or {"sae": 0.05, "cae": 0.5}.get(self.model, 0.0)
        if self.model != "vae":                                          # the family keeps its measured settings
            self.steps = self.steps if "--steps" in given else 5000      # within 3 CPU minutes (vqvae: 6)
            self.lr = self.lr if "--lr" in given else 1e-3
            self.latent_dim = self.latent_dim if "--latent-dim" in given else 20
        if self.linear:
            # lr 1e-3 leaves the small initialisation slowly, and batch 128's gradient noise keeps the last
            # directions of the subspace about 6 degrees off PCA's (batch 1024: under 3)
            self.lr = self.lr if "--lr" in given else 3e-3
            self.batch_size = self.batch_size if "--batch-size" in given else 1024


# ----------------------------------------------------------------------------- model
def mlp(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


class VAE(nn.Module):
    def __init__(self, latent_dim=20, hidden=512, likelihood="bernoulli", sigma_x=0.0, d=784):
        super().__init__()
        self.likelihood, self.sigma_x = likelihood, sigma_x
        learned_var = likelihood == "gaussian" and sigma_x == 0
        self.encoder = mlp(d, hidden, 2 * latent_dim)                     # -> (mu, log sigma^2)
        self.decoder = mlp(latent_dim, hidden, 2 * d if learned_var else d)

    def encode(self, x):
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)           # (B, J) each
        return mu, logvar

    def decode(self, z):
        """Parameters of p(x|z): Bernoulli logits (B, D), or Gaussian (mean in [0, 1], log sigma^2)."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            return out
        if self.sigma_x > 0:
            return torch.sigmoid(out), torch.full_like(out, 2 * math.log(self.sigma_x))
        mean, logvar = out.chunk(2, dim=1)
        return torch.sigmoid(mean), logvar.clamp(min=-9.0)               # sigma >= 0.011: no variance collapse

    def mean(self, z):
        """E[x|z] as images (B, 1, 28, 28) in [0, 1]."""
        out = self.decode(z)
        return (torch.sigmoid(out) if self.likelihood == "bernoulli" else out[0]).view(-1, 1, 28, 28)


# ----------------------------------------------------------------------------- loss
def reparametrize(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)           # z = mu + sigma * eps  (002, reparam.)


def kl_to_prior(mu, logvar):
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)           # D_KL(q(z|x) || N(0,I)), closed form (002)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)) = -sum_j [1/2 log(2 pi sigma_j^2) + (z_j - mu_j)^2 / (2 sigma_j^2)]."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


def log_px_given_z(model, x, z):
    """log p_theta(x|z) summed over pixels, (B,)."""
    x, out = x.flatten(1), model.decode(z)
    if model.likelihood == "bernoulli":                                  # sum_j x_j log p_j + (1 - x_j) log(1 - p_j)
        return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
    mean, logvar = out
    return log_normal(x, mean, logvar)                                   # the slide's Gaussian log p(x|z), with 2 pi


def negative_elbo(model, x, beta=1.0):
    """-V_L = -E_q[log p(x|z)] + beta * D_KL(q(z|x) || p(z)), one z sample per image;
    returns (loss, recon, kl) per image."""
    mu, logvar = model.encode(x)
    recon = -log_px_given_z(model, x, reparametrize(mu, logvar))
    kl = kl_to_prior(mu, logvar)
    return recon + beta * kl, recon, kl


@torch.no_grad()
def iw_log_likelihood(model, x, K=100):
    r"""log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x); (B,)."""
    mu, logvar = model.encode(x)
    z = reparametrize(mu.expand(K, *mu.shape), logvar.expand(K, *mu.shape))             # (K, B, J), z_k ~ q
    log_pxz = log_px_given_z(model, x.repeat(K, 1, 1, 1), z.flatten(0, 1)).view(K, -1)  # (K, B)
    log_w = log_pxz + log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - log_normal(z, mu, logvar)
    return torch.logsumexp(log_w, 0) - math.log(K)


@torch.no_grad()
def evaluate(model, x, K, batch=100):
    """test_nelbo, test_recon, test_kl, test_nll_iw in nats per image (one z for the ELBO: a true ELBO sample)."""
    parts = [(*[t.sum() for t in negative_elbo(model, xb)], -iw_log_likelihood(model, xb, K).sum())
             for xb in x.split(batch)]
    nelbo, recon, kl, nll = (float(sum(p[i] for p in parts)) / len(x) for i in range(4))
    return {"test_nelbo": nelbo, "test_recon": recon, "test_kl": kl, "test_nll_iw": nll}


# ----------------------------------------------------------------------------- autoencoders (004)
class AE(nn.Module):
    r"""Encoder h_{theta_e}: x -> z and decoder g_{theta_d}: z -> x (004 "Autoencoder"), MLPs as in the VAE with a
    sigmoid output. --linear: one linear map each (no sigmoid). cae: h(x) = sigmoid(W x + b), one layer, so its
    Jacobian has a closed form. sae: a ReLU on the code, so code units can be exactly 0."""
    def __init__(self, model, latent_dim, hidden, linear=False):
        super().__init__()
        if linear:
            self.h = nn.Linear(784, latent_dim)
            self.g = nn.Linear(latent_dim, 784)
            return
        self.h = mlp(784, hidden, latent_dim)
        if model == "cae":
            self.h = nn.Sequential(nn.Linear(784, latent_dim), nn.Sigmoid())
        if model == "sae":
            self.h.append(nn.ReLU())
        self.g = nn.Sequential(mlp(latent_dim, hidden, 784), nn.Sigmoid())

    def forward(self, x):
        return self.g(self.h(x.flatten(1))).view_as(x)


def squared_error(x, x_hat):
    return (x - x_hat).pow(2).flatten(1).sum(1)                          # L(x, x_hat) = |x - x_hat|^2, per image


def ae_loss(model, x):
    return squared_error(x, model(x))                                    # L(x, g(h(x)))  (004 eq. 14)


def corrupt(x, kind, noise, gen=None):
    """x~, a corrupted copy of x: x + noise * N(0, I) (gauss), or each pixel zeroed with probability noise (mask)."""
    if kind == "gauss":
        return x + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return x * (torch.rand(x.shape, generator=gen) >= noise).to(x.device)


def dae_loss(model, x, x_tilde):
    return squared_error(x, model(x_tilde))                              # L(x, g(h(x~)))  (004, "Denoising")


def sae_loss(model, x, lam):
    z = model.h(x.flatten(1))                                            # z = h(x), (B, J)
    return squared_error(x, model.g(z).view_as(x)) + lam * z.abs().sum(1)   # L + lambda |z|_1  (004, "Sparse")


def contractive_penalty(model, x):
    r"""sum_i |grad_x h(x)_i|^2 = |J_h(x)|_F^2; for h = sigmoid(W x + b), grad_x h_i = h_i (1 - h_i) W_i, so it is
    sum_i (h_i (1 - h_i))^2 |W_i|^2 (closed form, tested against autograd); (B,)."""
    z = model.h(x.flatten(1))                                            # (B, J)
    return ((z * (1 - z)) ** 2 * model.h[0].weight.pow(2).sum(1)).sum(1)


def cae_loss(model, x, lam):
    return ae_loss(model, x) + lam * contractive_penalty(model, x)       # L + lambda sum_i |grad h_i|^2 (004, squared)


@torch.no_grad()
def pca_comparison(model, x_train, x_test):
    r"""(largest principal angle in degrees between the linear decoder's columns and the top-J principal subspace
    of the training data, PCA's test MSE); PCA reconstructs x as m + U U^T (x - m)."""
    X = x_train.flatten(1).double()
    m = X.mean(0)
    J = model.g.weight.shape[1]
    U = torch.linalg.eigh((X - m).T @ (X - m))[1][:, -J:]                # (784, J) top-J eigenvectors
    Q = torch.linalg.qr(model.g.weight.double().cpu())[0]               # (784, J) basis of the decoder's columns
    cos = torch.linalg.svdvals(U.T @ Q).clamp(max=1)                    # cosines of the principal angles
    Xt = x_test.flatten(1).double() - m
    pca_mse = float((Xt - Xt @ U @ U.T).pow(2).sum(1).mean())
    return math.degrees(math.acos(float(cos.min()))), pca_mse


# ----------------------------------------------------------------------------- VQ-VAE (002)
class VQVAE(nn.Module):
    r"""z_e(x): a conv encoder to a 7x7 grid of D-dim vectors; z_q(x): each replaced by its nearest entry of the
    codebook e (K x D); Dec: transposed convolutions back to 28x28 (002 "Learning discrete distributions")."""
    def __init__(self, K, D):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                     nn.Conv2d(64, D, 1))
        self.codebook = nn.Embedding(K, D)
        nn.init.uniform_(self.codebook.weight, -1 / K, 1 / K)
        self.decoder = nn.Sequential(nn.Conv2d(D, 64, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1),
                                     nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())

    def quantize(self, z_e):
        """(k, z_q): the index of the nearest code at each position (B, 7, 7) and the codes (B, D, 7, 7)."""
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])         # (B * 49, D)
        k = torch.cdist(flat, self.codebook.weight).argmin(1)
        z_q = self.codebook(k).view(len(z_e), 7, 7, -1).permute(0, 3, 1, 2)   # (B, D, 7, 7)
        return k.view(-1, 7, 7), z_q


def vq_loss(model, x, beta):
    """The three terms of L per image (002, VQ-VAE "Loss function"; their sum is L), and the code indices k."""
    z_e = model.encoder(x)
    k, z_q = model.quantize(z_e)
    x_hat = model.decoder(z_e + (z_q - z_e).detach())   # forward: Dec(z_q); backward: the gradient of z_q copied to z_e
    recon = squared_error(x, x_hat)                                      # |x - Dec(z_q(x))|^2: decoder and encoder
    codebook = (z_e.detach() - z_q).pow(2).flatten(1).sum(1)             # |sg(z_e(x)) - z_q(x)|^2: the codebook only
    commit = beta * (z_e - z_q.detach()).pow(2).flatten(1).sum(1)        # beta |z_e(x) - sg(z_q(x))|^2: encoder only
    return recon, codebook, commit, k


@torch.no_grad()
def revive_dead_codes(model, x, used):
    """Codes unused since the last call (used: (K,) bool) are moved onto random encoder outputs z_e of the batch."""
    flat = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, model.codebook.weight.shape[1])   # (B * 49, D)
    dead = (~used).nonzero()[:, 0]
    model.codebook.weight[dead] = flat[torch.randint(len(flat), (len(dead),)).to(flat.device)]


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the positions before the centre in raster order (type A), or the centre too
    (type B): PixelCNN's mask, so output i depends on inputs < i only (the first layer is type A)."""
    def __init__(self, kind, c_in, c_out, k):
        super().__init__(c_in, c_out, k, padding=k // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, k // 2, k // 2 + (kind == "B"):] = 0                  # the rest of the centre row
        mask[:, :, k // 2 + 1:] = 0                                       # the rows below
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelPrior(nn.Module):
    """p(k) = prod_i p(k_i | k_<i) over the 7x7 code grid in raster order: codes (B, 7, 7) -> logits (B, K, 7, 7)."""
    def __init__(self, K, ch=32, layers=4):
        super().__init__()
        self.embed = nn.Embedding(K, ch)
        net = [MaskedConv2d("A", ch, ch, 7), nn.ReLU()]
        for _ in range(layers):
            net += [MaskedConv2d("B", ch, ch, 3), nn.ReLU()]
        self.net = nn.Sequential(*net, nn.Conv2d(ch, K, 1))

    def forward(self, k):
        return self.net(self.embed(k).permute(0, 3, 1, 2))               # (B, 7, 7, ch) -> (B, ch, 7, 7)


@torch.no_grad()
def sample_codes(prior, n, device):
    """k_1, ..., k_49 drawn one after the other from p(k_i | k_<i)."""
    k = torch.zeros(n, 7, 7, dtype=torch.long, device=device)
    for i in range(49):
        r, c = divmod(i, 7)
        k[:, r, c] = torch.multinomial(prior(k)[:, :, r, c].softmax(1), 1)[:, 0]
    return k


# ----------------------------------------------------------------------------- sampling and pictures
@torch.no_grad()
def sample(model, n, latent_dim, device):
    return torch.cat([model.mean(torch.randn(min(1000, n - i), latent_dim, device=device)) for i in range(0, n, 1000)])


@torch.no_grad()
def pictures(model, cfg, x_test, y_test, device):
    out, J = cfg.out, cfg.latent_dim
    x = x_test[:10].to(device)
    common.save_images(torch.cat([x, model.mean(model.encode(x)[0])]), os.path.join(out, "reconstructions.png"))
    mu = model.encode(x_test[:2].to(device))[0]
    t = torch.linspace(0, 1, 10, device=device)[:, None]
    common.save_images(model.mean((1 - t) * mu[0] + t * mu[1]), os.path.join(out, "interpolation.png"))  # a line in z
    if J == 2:
        u = torch.linspace(0.03, 0.97, 20)
        g = torch.distributions.Normal(0, 1).icdf(u)                      # grid evenly spaced in prior probability
        z = torch.stack(torch.meshgrid(g, -g, indexing="xy"), -1).view(-1, 2).to(device)   # (400, 2)
        common.save_images(model.mean(z), os.path.join(out, "latent_map.png"), nrow=20)
        mu = torch.cat([model.encode(xb.to(device))[0] for xb in x_test[:5000].split(1000)]).cpu()
        save_scatter(mu, y_test[:5000], os.path.join(out, "latent_scatter.png"), "test encodings mu(x)")


def save_scatter(z, labels, path, title):
    """2-D codes z (N, 2) as points coloured by their labels."""
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    fig.colorbar(ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=3), ax=ax)
    ax.set_title(f"{title}, coloured by label")
    fig.savefig(path, dpi=100, bbox_inches="tight")


@torch.no_grad()
def family_metrics(model, cfg, x_train, x, device):
    """test_mse (clean input), test_mse_noisy (x~ in, x out), sparsity (sae), the PCA comparison (ae --linear);
    vqvae: test_mse, codebook_perplexity = exp(entropy of the code histogram) and codes_used_frac."""
    x = x.to(device)
    if cfg.model == "vqvae":
        k, z_q = model.quantize(model.encoder(x))
        p = torch.bincount(k.flatten(), minlength=cfg.codes).float() / k.numel()
        return {"test_mse": float(squared_error(x, model.decoder(z_q)).mean()),
                "codebook_perplexity": float(torch.exp(-(p * p.clamp(min=1e-12).log()).sum())),
                "codes_used_frac": float((p > 0).float().mean())}
    x_tilde = corrupt(x, cfg.corrupt, cfg.noise, torch.Generator().manual_seed(1234))   # the same x~ for every model
    out = {"test_mse": float(ae_loss(model, x).mean()), "test_mse_noisy": float(dae_loss(model, x, x_tilde).mean())}
    if cfg.model == "sae":
        out["sparsity"] = float((model.h(x.flatten(1)).abs() < 1e-2).float().mean())   # near-zero code units
    if cfg.linear:
        angle, pca_mse = pca_comparison(model, x_train, x.cpu())
        out.update(pca_angle_deg=angle, pca_mse_ratio=out["test_mse"] / pca_mse)
    return out


@torch.no_grad()
def family_pictures(model, cfg, x_test, y_test, device):
    """reconstructions.png (inputs, outputs); denoising.png (x~, g(h(x~)), x); latent_scatter.png if J = 2."""
    x = x_test[:10].to(device)
    if cfg.model == "vqvae":
        x_hat = model.decoder(model.quantize(model.encoder(x))[1])
    else:
        x_hat = model(x)
        x_tilde = corrupt(x, cfg.corrupt, cfg.noise, torch.Generator().manual_seed(1234))
        rows = [x_tilde.clamp(0, 1), model(x_tilde), x]
        common.save_images(torch.cat(rows), os.path.join(cfg.out, "denoising.png"))
        if cfg.latent_dim == 2:
            z = model.h(x_test[:5000].flatten(1).to(device)).cpu()
            save_scatter(z, y_test[:5000], os.path.join(cfg.out, "latent_scatter.png"), "test codes h(x)")
    common.save_images(torch.cat([x, x_hat]), os.path.join(cfg.out, "reconstructions.png"))


# ----------------------------------------------------------------------------- training
def batch_loss(model, cfg, x, used):
    """The mean loss of cfg.model on a batch, each written in its section above; used: vqvae's codes seen."""
    if cfg.model == "vae":
        return negative_elbo(model, x, cfg.beta)[0].mean()               # -ELBO, nats per image
    if cfg.model == "ae":
        return ae_loss(model, x).mean()
    if cfg.model == "dae":
        return dae_loss(model, x, corrupt(x, cfg.corrupt, cfg.noise)).mean()   # a fresh x~ every time
    if cfg.model == "sae":
        return sae_loss(model, x, cfg.lam).mean()
    if cfg.model == "cae":
        return cae_loss(model, x, cfg.lam).mean()
    recon, codebook, commit, k = vq_loss(model, x, cfg.vq_beta)
    used[k.unique()] = True
    return (recon + codebook + commit).mean()


def train(model, cfg, x_train, device, state=None, prior=None):
    """Adam on the model's loss for cfg.steps steps (vqvae: its last cfg.prior_steps train the prior over codes
    instead); state: a saved run to continue (--resume)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    opt_prior = torch.optim.Adam(prior.parameters(), lr=cfg.lr) if prior else None
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    name = "-ELBO (nats/image)" if cfg.beta == 1 else f"beta-VAE loss, beta = {cfg.beta:g} (nats/image)"
    name = name if cfg.model == "vae" else f"{cfg.model} loss (per image)"
    history = {name: [], "prior: -log p(k) (nats per code)": []} if prior else {name: []}
    used = torch.zeros(cfg.codes, dtype=torch.bool, device=device)      # vqvae: codes used since the last revival
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt=opt)
        if prior:
            opt_prior.load_state_dict(state["opt_prior"])
        used = state["used"].to(device)

    def run_state():                                                     # what a resumed run needs
        out = dict(model=model.state_dict(), opt=opt.state_dict(), history=history, used=used,
                   rng=common.rng_states(gen))
        if prior:
            out.update(prior=prior.state_dict(), opt_prior=opt_prior.state_dict())
        return out
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "vae", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), generator=gen)].to(device)
            if cfg.binarize:
                x = torch.bernoulli(x)                                   # dynamic binarization: a fresh draw each time
            if prior and step > cfg.steps - cfg.prior_steps:             # vqvae, phase 2: fit p(k) to the codes
                with torch.no_grad():
                    k = model.quantize(model.encoder(x))[0]              # (B, 7, 7)
                loss = F.cross_entropy(prior(k), k)                      # -log p(k) / 49
                optimizer = opt_prior
                key = "prior: -log p(k) (nats per code)"
            else:
                loss = batch_loss(model, cfg, x, used)
                optimizer = opt
                key = name
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if prior and cfg.revive and step % 100 == 0 and step <= (cfg.steps - cfg.prior_steps) // 2:
                revive_dead_codes(model, x, used)
                used.zero_()
            history[key].append(loss.item())
            progress(step, loss.item())
            save(step, run_state)
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "vae", __doc__)
    common.check(cfg.latent_dim > 0, f"--latent-dim must be a positive integer, got {cfg.latent_dim}")
    common.check(cfg.hidden > 0 and cfg.iw_k > 0 and cfg.eval_n > 0 and cfg.n_samples > 1,
                 "--hidden, --iw-k, --eval-n must be positive and --n-samples at least 2")
    common.check(cfg.sigma_x >= 0 and cfg.beta >= 0, "--sigma-x and --beta must be non-negative")
    common.check(not cfg.linear or cfg.model == "ae", "--linear is for --model ae (the PCA equivalence)")
    common.check(cfg.noise >= 0 and cfg.codes > 1 and cfg.code_dim > 0 and cfg.vq_beta >= 0 and cfg.lam >= 0,
                 "--noise, --lam, --vq-beta must be >= 0, --codes > 1, --code-dim > 0")
    common.check(cfg.model != "vqvae" or 0 < cfg.prior_steps < cfg.steps,
                 f"--prior-steps must be in 1..--steps - 1 ({cfg.steps - 1}), got {cfg.prior_steps}")
    state = common.load_run(cfg, "vae") if cfg.sample_only or cfg.resume else None   # flags from the checkpoint
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    x_train, _ = common.load_images(cfg.data, "train", cfg.data_dir)
    x_test, y_test = common.load_images(cfg.data, "test", cfg.data_dir)
    x_eval = x_test[:cfg.eval_n]
    if cfg.binarize:                                                     # the test set is binarized once, seeded
        x_eval = torch.bernoulli(x_eval, generator=torch.Generator().manual_seed(1234))
    if cfg.model == "vae":
        model = VAE(cfg.latent_dim, cfg.hidden, cfg.likelihood, cfg.sigma_x).to(device)
    elif cfg.model == "vqvae":
        model = VQVAE(cfg.codes, cfg.code_dim).to(device)
    else:
        model = AE(cfg.model, cfg.latent_dim, cfg.hidden, cfg.linear).to(device)
    prior = PixelPrior(cfg.codes).to(device) if cfg.model == "vqvae" else None
    t0 = time.time()
    history = {}
    if state:
        model.load_state_dict(state["model"])
        if prior:
            prior.load_state_dict(state["prior"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
    else:
        history = train(model, cfg, x_train, device, state, prior)
    train_seconds = time.time() - t0
    model.eval()
    if cfg.model == "vae":
        metrics = evaluate(model, x_eval.to(device), cfg.iw_k)
        samples = sample(model, cfg.n_samples, cfg.latent_dim, device).cpu()
        with torch.no_grad():                                            # reconstruction by the means: g(mu(x))
            x_hat = model.mean(model.encode(x_eval.to(device))[0]).cpu()
        metrics["test_mse"] = float(squared_error(x_eval, x_hat).mean())
        pictures(model, cfg, x_test, y_test, device)
    else:
        metrics = family_metrics(model, cfg, x_train, x_eval, device)
        family_pictures(model, cfg, x_test, y_test, device)
        with torch.no_grad():                                            # vqvae: decoded prior samples; else: recons
            if prior:
                z_q = model.codebook(sample_codes(prior.eval(), cfg.n_samples, device)).permute(0, 3, 1, 2)
                samples = model.decoder(z_q).cpu()                       # (n, D, 7, 7) -> (n, 1, 28, 28)
            else:
                samples = model(x_eval.to(device)).clamp(0, 1).cpu()
    if cfg.model in ("vae", "vqvae"):
        metrics.update(common.image_metrics(samples, cfg.data, data_dir=cfg.data_dir, out=cfg.out))
    common.save_images(samples[:100], os.path.join(cfg.out, "samples.png"))
    metrics["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, metrics, t0, device, samples=samples, history=history)


if __name__ == "__main__":
    common.run(main)
