r"""vae.py - the variational autoencoder of Kingma & Welling, straight from the ELBO derivation.

Lectures: 002 "Variational Auto-Encoders" to "VAE - instantiation example"; 004 "Variational autoencoder";
000 section 7.3. The rest of the autoencoder family: autoencoders.py (AE, DAE, SAE, CAE) and vqvae.py.
Run: `python vae.py` (digits), `python vae.py --latent-dim 2` (latent map),
`python vae.py --data mnist10k --data-dir ../shared/data/mnist --binarize` (real MNIST test files).

    prior          p(z) = N(0, I)
    encoder        q_phi(z|x) = N(mu(x), diag sigma^2(x)); the network outputs mu and log sigma^2
    decoder        p_theta(x|z): Bernoulli(sigmoid(logits(z))) (default), or N(mu(z), diag sigma^2) with
                   sigma^2 learned per pixel (--likelihood gaussian) or fixed (--sigma-x S)
    ELBO           V_L = -D_KL(q_phi(z|x) || p(z)) + E_q[log p_theta(x|z)]            (002, "Loss criterion")
    closed form    -D_KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)   (002, "VAE - instantiation example")
    reparam.       z = mu + sigma * eps, eps ~ N(0, I)                         (002, "VAE- reparametrization trick")
    beta-VAE       loss = -E_q[log p(x|z)] + beta D_KL (--beta; beta = 1 is the -ELBO)
    IW bound       log p(x) >= E[log 1/K sum_k p(x, z_k) / q(z_k|x)], z_k ~ q  (002, "Importance sampling ...");
                   the bound holds in expectation over the draws, not for each draw
The loss is -ELBO in nats per image: summed over pixels and latent dimensions, averaged over the batch.
Networks: MLPs D -> width -> width -> 2J (encoder) and J -> width -> width -> D (decoder), ReLU; D = C S^2 pixels.
"Samples" (samples.png/.pt and the image metrics) are the decoder means E[x|z], z ~ p(z), not draws from p(x|z).
Differences from the slides: the Gaussian log-likelihood keeps the -1/2 log(2 pi) constant (the slide drops it,
and its second form has the sign flipped, i.e. it is -log p), so the nats are true log-densities. With gray
pixels the Bernoulli "likelihood" is the common practice but not a normalized density of gray images;
--binarize (dynamic binarization) gives the setting of published binarized-MNIST numbers.
"""
import dataclasses, math, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "dataset", common.IMAGE_DATA)
    steps: int = common.arg(10000, "training steps")
    lr: float = common.arg(2e-3, "Adam learning rate")
    latent_dim: int = common.arg(10, "J, the dimension of z (2 also draws latent_map.png)")
    width: int = common.arg(512, "hidden units per MLP layer")
    likelihood: str = common.arg("bernoulli", "decoder p(x|z)", ["bernoulli", "gaussian"])
    sigma_x: float = common.arg(0.0, "gaussian decoder: fixed std of p(x|z); 0 = learned per pixel")
    beta: float = common.arg(1.0, "weight of the KL term (beta-VAE); 1 is the ELBO")
    binarize: bool = common.arg(False, "dynamically binarize pixels (x ~ Bernoulli(gray value))")
    iw_k: int = common.arg(100, "K, importance samples for test_nll_iw")
    n_eval: int = common.arg(2000, "test images for test_nelbo, test_nll_iw and test_mse")
    n_samples: int = common.arg(5000, "samples drawn for the image metrics")
    gif: bool = common.arg(False, "also write latent_walk.gif: g(z) along lines through mu(x) of a 0, 1, ..., 9, 0")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "latent_dim", "width", "likelihood", "sigma_x", "image_size", "grey")


# ----------------------------------------------------------------------------- model
def mlp(d_in, width, d_out):
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, d_out))


class VAE(nn.Module):
    def __init__(self, latent_dim=20, width=512, likelihood="bernoulli", sigma_x=0.0, shape=(1, 28, 28)):
        super().__init__()
        self.likelihood, self.sigma_x, self.shape = likelihood, sigma_x, shape
        d = math.prod(shape)                                             # D pixels (784 for 28x28 grey)
        learned_var = likelihood == "gaussian" and sigma_x == 0
        self.encoder = mlp(d, width, 2 * latent_dim)                      # -> (mu, log sigma^2)
        self.decoder = mlp(latent_dim, width, 2 * d if learned_var else d)

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
        """E[x|z] as images (B, C, S, S) in [0, 1]."""
        out = self.decode(z)
        return (torch.sigmoid(out) if self.likelihood == "bernoulli" else out[0]).view(-1, *self.shape)


# ----------------------------------------------------------------------------- loss
def reparametrize(mu, logvar):
    """z = mu + sigma * eps, eps ~ N(0, I), sigma = exp(logvar / 2): a sample of q(z|x) that the gradient flows
    through to mu and sigma (002, "VAE- reparametrization trick")."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)           # z = mu + sigma * eps


def kl_to_prior(mu, logvar):
    """D_KL(q(z|x) || N(0, I)) = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2), per row, in closed form
    (002, "VAE - instantiation example")."""
    return -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)           # -1/2 sum_j (1 + log s^2 - mu^2 - s^2)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)) = -sum_j [1/2 log(2 pi sigma_j^2) + (z_j - mu_j)^2 / (2 sigma_j^2)], over the last
    dimension (002, "Gaussian priors and posteriors")."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


def log_px_given_z(model, x, z):
    """log p_theta(x|z) summed over pixels, (B,): Bernoulli, sum_j x_j log p_j + (1 - x_j) log(1 - p_j) with
    p = sigmoid(logits(z)); or Gaussian, log N(x; mu(z), diag sigma^2) (002, "VAE - instantiation example")."""
    x, out = x.flatten(1), model.decode(z)
    if model.likelihood == "bernoulli":                                  # sum_j x_j log p_j + (1 - x_j) log(1 - p_j)
        return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
    mean, logvar = out
    return log_normal(x, mean, logvar)                                   # the slide's Gaussian log p(x|z), with 2 pi


def negative_elbo(model, x, beta=1.0):
    """-V_L = -E_q[log p(x|z)] + beta * D_KL(q(z|x) || p(z)), one z sample per image (002, "Loss criterion");
    returns (loss, recon, kl) per image."""
    mu, logvar = model.encode(x)
    recon = -log_px_given_z(model, x, reparametrize(mu, logvar))
    kl = kl_to_prior(mu, logvar)
    return recon + beta * kl, recon, kl


@torch.no_grad()
def iw_log_likelihood(model, x, K=100):
    r"""log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x); (B,)
    (002, "Importance sampling and the variational approximation")."""
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


# ----------------------------------------------------------------------------- sampling and pictures
@torch.no_grad()
def sample(model, n, latent_dim, device):
    """E[x|z], z ~ p(z) = N(0, I), in batches of 1000."""
    return torch.cat([model.mean(torch.randn(min(1000, n - i), latent_dim, device=device)) for i in range(0, n, 1000)])


@torch.no_grad()
def pictures(model, cfg, x_test, y_test, device):
    """reconstructions.png, interpolation.png (a line in z); with J = 2 latent_map.png and latent_scatter.png."""
    out, J = cfg.out, cfg.latent_dim
    x = x_test[:10].to(device)
    common.save_images(torch.cat([x, model.mean(model.encode(x)[0])]), os.path.join(out, "reconstructions.png"))
    mu = model.encode(x_test[:2].to(device))[0]
    t = torch.linspace(0, 1, 10, device=device)[:, None]
    common.save_images(model.mean((1 - t) * mu[0] + t * mu[1]), os.path.join(out, "interpolation.png"))
    if J == 2:
        u = torch.linspace(0.03, 0.97, 20)
        g = torch.distributions.Normal(0, 1).icdf(u)                      # grid evenly spaced in prior probability
        z = torch.stack(torch.meshgrid(g, -g, indexing="xy"), -1).view(-1, 2).to(device)   # (400, 2)
        common.save_images(model.mean(z), os.path.join(out, "latent_map.png"), nrow=20)
        mu = torch.cat([model.encode(xb.to(device))[0] for xb in x_test[:5000].split(1000)]).cpu()
        fig = Figure(figsize=(6, 6))
        ax = fig.subplots()
        fig.colorbar(ax.scatter(mu[:, 0], mu[:, 1], c=y_test[:5000], cmap="tab10", s=3), ax=ax)
        ax.set_title("test encodings mu(x), coloured by label")
        fig.savefig(os.path.join(out, "latent_scatter.png"), dpi=100, bbox_inches="tight")


@torch.no_grad()
def latent_walk(model, x_test, y_test, device, per_segment=8):
    """The film of --gif: g(z) for z on straight lines through mu(x) of the first test image of each class, 0, 1, ...,
    9 and back to 0 (per_segment frames a line): (10 per_segment + 1, C, S, S). Frame 0 and the last are g(mu(x)) of
    the first 0: its reconstruction. (Other labelled data: one image of each of its classes.)"""
    firsts = torch.stack([x_test[y_test == c][0] for c in y_test.unique()]).to(device)
    mu = model.encode(firsts)[0]
    mu = torch.cat([mu, mu[:1]])                                         # (11, J): back to the start
    t = torch.arange(per_segment, device=device)[:, None] / per_segment
    z = torch.cat([(1 - t) * mu[c] + t * mu[c + 1] for c in range(len(firsts))] + [mu[:1]])
    return model.mean(z).cpu()


# ----------------------------------------------------------------------------- training
def train(model, cfg, x_train, device, state=None):
    """Adam on the -ELBO (or the beta-VAE loss) for cfg.steps steps; state: a saved run to continue (--resume)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    name = "-ELBO (nats/image)" if cfg.beta == 1 else f"beta-VAE loss, beta = {cfg.beta:g} (nats/image)"
    history = {name: []}
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt=opt)
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "vae", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):

            # a batch (dynamic binarization: a fresh draw each time)
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), generator=gen)].to(device)
            if cfg.binarize:
                x = torch.bernoulli(x)

            # the loss -V_L (002, "Loss criterion"), then one Adam step
            loss = negative_elbo(model, x, cfg.beta)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

            # record and checkpoint
            history[name].append(loss.item())
            progress(step, loss.item())
            save(step, lambda: dict(model=model.state_dict(), opt=opt.state_dict(), history=history,
                                    rng=common.rng_states(gen)))
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "vae", __doc__)
    common.check(cfg.latent_dim > 0, f"--latent-dim must be a positive integer, got {cfg.latent_dim}")
    common.check(cfg.width > 0 and cfg.iw_k > 0 and cfg.n_eval > 0 and cfg.n_samples > 1,
                 "--width, --iw-k, --n-eval must be positive and --n-samples at least 2")
    common.check(cfg.sigma_x >= 0 and cfg.beta >= 0, "--sigma-x and --beta must be non-negative")
    state = common.load_run(cfg, "vae") if cfg.sample_only or cfg.resume else None   # flags from the checkpoint

    # data: the test images are binarized once, seeded
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    x_train, _ = common.load_data(cfg, "train")
    x_test, y_test = common.load_data(cfg, "test")
    common.check(not cfg.gif or common.labelled(y_test), "--gif walks through one image per class: it needs labelled "
                 "data (a folder with one subfolder per class)")
    x_eval = x_test[:cfg.n_eval]
    if cfg.binarize:
        x_eval = torch.bernoulli(x_eval, generator=torch.Generator().manual_seed(1234))

    # train, or load the trained model
    model = VAE(cfg.latent_dim, cfg.width, cfg.likelihood, cfg.sigma_x, x_train.shape[1:]).to(device)
    t0 = time.time()
    history = {}
    if state:
        model.load_state_dict(state["model"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
    else:
        history = train(model, cfg, x_train, device, state)
    train_seconds = time.time() - t0

    # the bounds on the test images, samples, reconstructions by the means g(mu(x))
    model.eval()
    scores = evaluate(model, x_eval.to(device), cfg.iw_k)
    samples = sample(model, cfg.n_samples, cfg.latent_dim, device).cpu()
    with torch.no_grad():
        x_hat = model.mean(model.encode(x_eval.to(device))[0]).cpu()
    scores["test_mse"] = float((x_eval - x_hat).pow(2).flatten(1).sum(1).mean())   # |x - x_hat|^2 per image
    pictures(model, cfg, x_test, y_test, device)
    if cfg.gif:
        frames = [common.image_frame(x[None], nrow=1, scale=6) for x in latent_walk(model, x_test, y_test, device)]
        common.save_gif(frames, os.path.join(cfg.out, "latent_walk.gif"))

    # score the samples and write the outputs
    scores.update(metrics.image_metrics(samples, cfg.data, data_dir=cfg.data_dir, out=cfg.out))
    common.save_images(samples[:100], os.path.join(cfg.out, "samples.png"))
    scores["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, scores, t0, device, samples=samples, history=history)


if __name__ == "__main__":
    common.run(main)
