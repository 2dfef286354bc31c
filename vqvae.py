r"""vqvae.py - the VQ-VAE (van den Oord et al. 2017): a discrete codebook in the bottleneck, and the PixelCNN prior
over the codes that makes it a generative model.

Lecture: 002 "Learning discrete distributions: VQ-VAE" (loss function, stop-gradients, straight-through gradient;
its note: "the model requires additional steps", the prior). vae.py holds the continuous VAE.
Run: `python vqvae.py` (digits: the VQ-VAE, then its prior, then samples), `python vqvae.py --no-revive`.

    encoder     z_e(x): a conv net from 28x28 to a 7x7 grid of D-dim vectors (32x32 and 64x64 images: 8x8)
    quantize    z_q(x)_i = e_k, k = argmin_j |z_e(x)_i - e_j|, the nearest of the K codebook entries
    loss        L = |x - Dec(z_q(x))|^2 + |sg(z_e(x)) - z_q(x)|^2 + beta |z_e(x) - sg(z_q(x))|^2  (002, "Loss function")
                  the first term trains decoder and encoder, the second the codebook, the third the encoder
    gradient    grad_{z_e} |x - Dec(z_q)|^2 := grad_{z_q} |x - Dec(z_q)|^2  (straight-through; 002, "Gradients"):
                  in code z_e + sg(z_q - z_e), which is z_q forwards and passes the gradient to z_e backwards
    prior       p(k) = prod_i p(k_i | k_<i) over the 49 (64) code indices in raster order, a PixelCNN (van den Oord
                et al. 2016) with residual blocks: masked convolutions, so that output i sees the inputs < i (all
                of them: no blind spot); trained by cross-entropy on the codes of the training images, computed
                once with the VQ-VAE frozen
    sampling    k_1, k_2, ... drawn one after the other from p(k_i | k_<i), then x = Dec(e_k)
Training: the first --steps minus --prior-steps steps train the VQ-VAE, the last --prior-steps the prior.
Beyond the slides: unused codes are re-initialised from encoder outputs every 100 steps of the first half of the
VQ-VAE's training (--revive, a common remedy for dead codes); the prior is not on the slides (its note says the
model "requires additional steps"). |.|^2 is summed over pixels (the loss per image), averaged over the batch.
Metrics: test_mse (|x - Dec(z_q(x))|^2 per test image), codebook_perplexity (exp of the entropy of the codes'
histogram on the test images; K if all are used equally), codes_used_frac, the image metrics of the samples, and
recon_digit_confidence / recon_fd of the test reconstructions (a ceiling for the samples: the prior's share).
"""
import dataclasses, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "dataset", common.IMAGE_DATA)
    steps: int = common.arg(5000, "training steps: the VQ-VAE's, then the prior's (--prior-steps)")
    lr: float = common.arg(1e-3, "Adam learning rate of the VQ-VAE")
    codes: int = common.arg(64, "K, the codebook size")
    code_dim: int = common.arg(16, "D, the dimension of each code and of z_e")
    beta: float = common.arg(0.25, "beta, the weight of the commitment term")
    revive: bool = common.arg(True, "every 100 steps of the first half, move unused codes onto encoder outputs")
    prior_steps: int = common.arg(2000, "the last steps train the PixelCNN prior over the codes")
    prior_lr: float = common.arg(2e-3, "Adam learning rate of the prior, decayed linearly to 0 over its steps")
    prior_width: int = common.arg(64, "channels of the PixelCNN prior")
    prior_layers: int = common.arg(6, "residual blocks of the prior after its first layer (5 reach the top row)")
    n_eval: int = common.arg(2000, "test images for test_mse and the codebook statistics")
    n_samples: int = common.arg(5000, "samples drawn for the image metrics")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "codes", "code_dim", "prior_width", "prior_layers", "image_size", "grey")


# ----------------------------------------------------------------------------- the VQ-VAE
class VQVAE(nn.Module):
    r"""z_e(x): a conv encoder to a grid of D-dim vectors (7x7 from 28x28, 8x8 from 32x32, and from 64x64 by one
    more stride-2 layer); z_q(x): each replaced by its nearest entry of the codebook e (K x D); Dec: transposed
    convolutions back to the image (002 "Learning discrete distributions"). Images (channels, size, size)."""
    def __init__(self, K, D, channels=1, size=28):
        super().__init__()
        extra = size == 64                                               # one more level down and up
        self.grid = size // 8 if extra else size // 4                    # the code grid's side
        self.encoder = nn.Sequential(nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1),
                                     nn.ReLU(), *([nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU()] if extra else []),
                                     nn.Conv2d(64, D, 1))
        self.codebook = nn.Embedding(K, D)
        nn.init.uniform_(self.codebook.weight, -1 / K, 1 / K)
        self.decoder = nn.Sequential(nn.Conv2d(D, 64, 3, 1, 1), nn.ReLU(),
                                     *([nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU()] if extra else []),
                                     nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Sigmoid())

    def quantize(self, z_e):
        """(k, z_q): k the index of the nearest code at each position, k = argmin_j |z_e - e_j| (B, 7, 7), and z_q = e_k
        (B, D, 7, 7) (002, "Learning discrete distributions: VQ-VAE"); 8x8 for 32x32 and 64x64 images."""
        g = self.grid
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])         # (B * 49, D)
        k = torch.cdist(flat, self.codebook.weight).argmin(1)
        z_q = self.codebook(k).view(len(z_e), g, g, -1).permute(0, 3, 1, 2)   # (B, D, 7, 7)
        return k.view(-1, g, g), z_q


def squared_error(x, x_hat):
    return (x - x_hat).pow(2).flatten(1).sum(1)                          # |x - x_hat|^2, per image


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
def encode(model, x, device, batch=1000):
    """The code indices k (N, 7, 7) of images x, in batches."""
    return torch.cat([model.quantize(model.encoder(b.to(device)))[0] for b in x.split(batch)])


@torch.no_grad()
def revive_dead_codes(model, x, used):
    """Codes unused since the last call (used: (K,) bool) are moved onto random encoder outputs z_e of the batch."""
    flat = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, model.codebook.weight.shape[1])   # (B * 49, D)
    dead = (~used).nonzero()[:, 0]
    model.codebook.weight[dead] = flat[torch.randint(len(flat), (len(dead),)).to(flat.device)]


# ----------------------------------------------------------------------------- the PixelCNN prior
class MaskedConv2d(nn.Conv2d):
    """A convolution whose output at a position sees only the positions before it in raster order (type A), or
    the position itself too (type B): PixelCNN's mask (van den Oord et al. 2016, the prior that 002's VQ-VAE note
    "the model requires additional steps" asks for). Kernel (kh, kw) with kh, kw odd."""
    def __init__(self, kind, c_in, c_out, kh, kw):
        """The mask: 1 above the centre row and left of the centre in its row (type B: the centre too), 0 after
        (002, "Learning discrete distributions: VQ-VAE", its note: the prior over the codes)."""
        super().__init__(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))
        mask = torch.ones_like(self.weight)
        mask[:, :, kh // 2, kw // 2 + (kind == "B"):] = 0                 # the rest of the centre row
        mask[:, :, kh // 2 + 1:] = 0                                       # the rows below
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ResidualBlock(nn.Module):
    """h + 1x1 conv(ReLU(masked 3x3 conv, type B (ReLU(h)))): PixelCNN's residual block, causal like its input."""
    def __init__(self, width):
        super().__init__()
        self.conv = MaskedConv2d("B", width, width, 3, 3)
        self.out = nn.Conv2d(width, width, 1)

    def forward(self, h):
        return h + self.out(F.relu(self.conv(F.relu(h))))


class PixelPrior(nn.Module):
    """p(k) = prod_i p(k_i | k_<i) over the 7x7 code grid in raster order: codes (B, 7, 7) -> logits (B, K, 7, 7).
    The first layer (type A, 3 rows by 13 columns) sees the whole row above and the left of its own row, and each
    residual block one row further up: with 5 blocks or more no earlier position is out of sight (stacked 3x3
    masks alone miss a wedge to the upper right, PixelCNN's blind spot)."""
    def __init__(self, K, width=64, layers=6):
        super().__init__()
        self.embed = nn.Embedding(K, width)
        self.first = MaskedConv2d("A", width, width, 3, 13)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(width, K, 1))

    def forward(self, k):
        h = self.first(self.embed(k).permute(0, 3, 1, 2))                # (B, 7, 7, width) -> (B, width, 7, 7)
        return self.head(self.blocks(h))


@torch.no_grad()
def sample_codes(prior, n, device, g=7):
    """k_1, ..., k_49 (g x g) drawn one after the other from p(k_i | k_<i) in raster order: ancestral sampling of the
    prior p(k) = prod_i p(k_i | k_<i) (002, VQ-VAE "additional steps": the prior)."""
    k = torch.zeros(n, g, g, dtype=torch.long, device=device)
    for i in range(g * g):
        r, c = divmod(i, g)
        k[:, r, c] = torch.multinomial(prior(k)[:, :, r, c].softmax(1), 1)[:, 0]
    return k


@torch.no_grad()
def sample(model, prior, n, device):
    """x = Dec(e_k), k ~ p(k): (n, C, S, S) in [0, 1]."""
    k = sample_codes(prior, n, device, model.grid)
    z_q = model.codebook(k).permute(0, 3, 1, 2)                          # (n, 7, 7, D) -> (n, D, 7, 7)
    return model.decoder(z_q)


@torch.no_grad()
def evaluate(model, cfg, x):
    """test_mse, codebook_perplexity = exp(entropy of the code histogram), codes_used_frac, and the scores of the
    reconstructions Dec(z_q(x)) (recon_digit_confidence, recon_fd): about what a perfect prior would reach."""
    k, z_q = model.quantize(model.encoder(x))
    x_hat = model.decoder(z_q)
    p = torch.bincount(k.flatten(), minlength=cfg.codes).float() / k.numel()
    recon = metrics.image_metrics(x_hat.cpu(), cfg.data, data_dir=cfg.data_dir)
    return {"test_mse": float(squared_error(x, x_hat).mean()),
            "codebook_perplexity": float(torch.exp(-(p * p.clamp(min=1e-12).log()).sum())),
            "codes_used_frac": float((p > 0).float().mean()),
            **{"recon_" + key: recon[key] for key in ("digit_confidence", "fd") if key in recon}}   # with an evaluator


# ----------------------------------------------------------------------------- training
def train(model, prior, cfg, x_train, device, state=None):
    """The VQ-VAE for cfg.steps - cfg.prior_steps steps, then its prior (the VQ-VAE frozen); state: a saved run to
    continue (--resume)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    opt_prior = torch.optim.Adam(prior.parameters(), lr=cfg.prior_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_prior, lambda s: 1 - s / cfg.prior_steps)   # over phase 2
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    history = {"VQ-VAE loss L (per image)": [], "prior: -log p(k) (nats per code)": []}
    used = torch.zeros(cfg.codes, dtype=torch.bool, device=device)      # the codes used since the last revival
    codes = None                                                         # phase 2: the codes of every image
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt=opt, opt_prior=opt_prior, sched=sched)
        used = state["used"].to(device)
    vq_steps = cfg.steps - cfg.prior_steps
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "vqvae", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):
            idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)

            # phase 1: the VQ-VAE, L = recon + codebook + commitment (002); dead codes revived in its first half
            if step <= vq_steps:
                x = x_train[idx].to(device)
                recon, codebook, commit, k = vq_loss(model, x, cfg.beta)
                used[k.unique()] = True
                loss = (recon + codebook + commit).mean()
                optimizer, key = opt, "VQ-VAE loss L (per image)"
                if cfg.revive and step % 100 == 0 and step <= vq_steps // 2:
                    revive_dead_codes(model, x, used)
                    used.zero_()

            # phase 2: the prior, -log p(k) / 49 on the codes of the batch (the VQ-VAE frozen: its codes once)
            else:
                if codes is None:
                    codes = encode(model, x_train, device)
                k = codes[idx.to(device)]                               # (B, 7, 7)
                loss = F.cross_entropy(prior(k), k)
                optimizer, key = opt_prior, "prior: -log p(k) (nats per code)"
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step > vq_steps:
                sched.step()

            # record and checkpoint
            history[key].append(loss.item())
            progress(step, loss.item())
            save(step, lambda: dict(model=model.state_dict(), prior=prior.state_dict(), opt=opt.state_dict(),
                                    opt_prior=opt_prior.state_dict(), sched=sched.state_dict(), history=history,
                                    used=used, rng=common.rng_states(gen)))
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "vqvae", __doc__)
    common.check(cfg.codes > 1 and cfg.code_dim > 0 and cfg.beta >= 0, "--codes must be > 1, --code-dim > 0 and "
                 "--beta >= 0")
    common.check(0 < cfg.prior_steps < cfg.steps, f"--prior-steps must be in 1..--steps - 1 ({cfg.steps - 1}), "
                 f"got {cfg.prior_steps}")
    common.check(cfg.prior_width > 0 and cfg.prior_layers >= 0 and cfg.n_eval > 0 and cfg.n_samples > 1 and
                 cfg.prior_lr > 0, "--prior-width, --prior-lr and --n-eval must be positive, --prior-layers >= 0, "
                 "--n-samples at least 2")
    state = common.load_run(cfg, "vqvae") if cfg.sample_only or cfg.resume else None   # flags from the checkpoint

    # data and the two networks
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    x_train, _ = common.load_data(cfg, "train")
    x_eval = common.load_data(cfg, "test")[0][:cfg.n_eval]
    model = VQVAE(cfg.codes, cfg.code_dim, x_train.shape[1], x_train.shape[-1]).to(device)
    prior = PixelPrior(cfg.codes, cfg.prior_width, cfg.prior_layers).to(device)

    # train, or load the trained networks
    t0 = time.time()
    history = {}
    if state:
        model.load_state_dict(state["model"])
        prior.load_state_dict(state["prior"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)
    else:
        history = train(model, prior, cfg, x_train, device, state)
    train_seconds = time.time() - t0

    # reconstructions and codebook statistics on the test images
    model.eval()
    scores = evaluate(model, cfg, x_eval.to(device))
    with torch.no_grad():
        x = x_eval[:10].to(device)
        x_hat = model.decoder(model.quantize(model.encoder(x))[1])
    common.save_images(torch.cat([x, x_hat]), os.path.join(cfg.out, "reconstructions.png"))

    # samples from the prior, decoded, and their scores
    samples = sample(model, prior.eval(), cfg.n_samples, device).cpu()
    scores.update(metrics.image_metrics(samples, cfg.data, data_dir=cfg.data_dir, out=cfg.out))
    common.save_images(samples[:100], os.path.join(cfg.out, "samples.png"))
    scores["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, scores, t0, device, samples=samples, history=history)


if __name__ == "__main__":
    common.run(main)
