r"""cgan.py - the conditional GAN of Mirza & Osindero (2014): generator and discriminator both see the class y.

Lectures: 002 "Conditional GANs (Mirza 2014)" (the loss below) and "Conditional GANs example - Pix2Pix" (the
same loss with y ~ p(y) written out); 000 section 6.3; 003 "Conditional GAN".
Run: `python cgan.py` (digits), `python cgan.py --data mnist10k --data-dir ../shared/data/mnist`.

    min_G max_D L(D, G) = E_{(x,y) ~ p_data} log D(x|y) + E_{z ~ p(z), y ~ p(y)} log(1 - D(G(z|y)|y))   (002)
    D step   minimize -[log D(x|y) + log(1 - D(G(z|y)|y))]: real (x, y) -> 1, (G(z|y), y) -> 0 (BCE on D's logits)
    G step   non-saturating: minimize -E log D(G(z|y)|y)        (default; --g-loss saturating is the minimax)
    LSGAN    --loss lsgan: D minimizes E (D(x|y) - 1)^2 + E D(G(z|y)|y)^2, G minimizes E (D(G(z|y)|y) - 1)^2
How y enters: as in Mirza & Osindero, y is joined to the *input* of both networks. G gets [z, e_G(y)] with
e_G a learned 16-d embedding of y, followed by a DCGAN generator. D gets the image plus a second input
channel e_D(y), a learned 28x28 "label map" (an embedding of y with 784 entries), followed by a DCGAN
discriminator, so its first convolution already compares pixels with the label. p(y) is uniform.
`--d-cond every` also gives D the label at its later layers; `--d-cond projection` adds Miyato & Koyama's
projection term (not in the lecture).
Differences from the paper: DCGAN convolutions instead of MLPs with maxout; learned embeddings instead of
one-hot y; the non-saturating G loss by default (the paper's practice, as in gan.py); Adam at lr 8e-4 (the
lecture names none), decayed linearly to 0 over the second half of training; samples drawn from an
exponential moving average of G's weights with decay min(--ema, (1 + t)/(10 + t)) at step t (common.ema_update;
--ema 0: from G itself); z of size 16 (the lecture names none); D at half DCGAN's width (--ndf 32). Results:
docs/cgan.md.
"""
import copy, dataclasses, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "image dataset", common.IMAGE_DATA)
    steps: int = common.arg(9000, "generator steps (one discriminator step each)")
    batch_size: int = common.arg(16, "images per step")
    lr: float = common.arg(8e-4, "Adam learning rate, betas (0.5, 0.999), both networks")
    z_dim: int = common.arg(16, "size of the noise z")
    emb_dim: int = common.arg(16, "size of G's label embedding e_G(y)")
    g_loss: str = common.arg("nonsaturating", "generator loss", ["nonsaturating", "saturating"])
    loss: str = common.arg("gan", "gan: the conditional minimax value; lsgan: least squares", ["gan", "lsgan"])
    ema: float = common.arg(0.999, "largest decay of the moving average of G used for sampling, in [0, 1) (0: off); "
                                   "the decay at step t is min(ema, (1 + t) / (10 + t))")
    n_samples: int = common.arg(5000, "samples for the final metrics (classes balanced)")
    d_cond: str = common.arg("input", "how D sees y: input (a label map beside the image, the paper's way), every "
                                      "(label maps at every layer), projection (input + a projection term)",
                             ["input", "every", "projection"])
    ndf: int = common.arg(32, "D's width: ndf channels at 14x14, 2 ndf at 7x7 (DCGAN's: 64)")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "z_dim", "emb_dim", "d_cond", "ndf", "image_size", "grey")


# ----------------------------------------------------------------------------- data
def batch_sampler(cfg, gen):
    """() -> (images in [-1, 1] (B, C, S, S), labels (B,)), drawn with replacement from the train split by gen."""
    x, y = common.load_data(cfg, "train")

    def sample():
        i = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        return x[i] * 2 - 1, y[i]
    return sample


# ----------------------------------------------------------------------------- models
class Generator(nn.Module):
    """G(z|y) = DCGAN generator of [z, e_G(y)]: (B, z_dim), (B,) -> 128x7x7 -> 64x14x14 -> (B, 1, 28, 28) in [-1, 1];
    C x 32 x 32 from 8x8, and 64x64 through one more 64-channel level."""
    def __init__(self, z_dim, emb_dim, n_classes=10, channels=1, size=28):
        super().__init__()
        s0 = size // 8 if size == 64 else size // 4
        extra = [nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU()] if size == 64 else []
        self.embed = nn.Embedding(n_classes, emb_dim)
        self.net = nn.Sequential(nn.Linear(z_dim + emb_dim, 128 * s0 * s0), nn.Unflatten(1, (128, s0, s0)),
                                 nn.BatchNorm2d(128), nn.ReLU(),
                                 nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(), *extra,
                                 nn.ConvTranspose2d(64, channels, 4, 2, 1), nn.Tanh())

    def forward(self, z, y):
        return self.net(torch.cat([z, self.embed(y)], 1))               # (B, z_dim + emb_dim)


class Discriminator(nn.Module):
    """D(x|y) as a logit: a DCGAN discriminator ((2, 28, 28) -> (ndf, 14, 14) -> (2 ndf, 7, 7) -> 1, no BatchNorm on
    the input layer) on [x, e_D(y)], e_D(y) a learned 1x28x28 label map. cond "every" also joins a 14x14 label
    map to the second layer's input and one-hot y to the last; "projection" adds <V e(y), phi(x)> to the logit,
    phi(x) the last features (Miyato & Koyama 2018; not in the lecture). C x 32 x 32 images end at 8x8; 64x64 ones
    pass one more 2 ndf level to 8x8."""
    def __init__(self, n_classes=10, cond="input", ndf=32, channels=1, size=28):
        super().__init__()
        self.cond = cond
        self.n_classes = n_classes
        self.size = size
        every = cond == "every"
        extra_map = 1 if every else 0                                    # the 14x14 label map, one more channel
        extra_y = n_classes if every else 0                              # one-hot y beside the last features
        s0 = size // 8 if size == 64 else size // 4                      # the last feature map's side
        extra = [nn.Conv2d(2 * ndf, 2 * ndf, 4, 2, 1), nn.BatchNorm2d(2 * ndf), nn.LeakyReLU(0.2)] if size == 64 else []
        self.label_map = nn.Embedding(n_classes, size * size)
        self.conv1 = nn.Sequential(nn.Conv2d(channels + 1, ndf, 4, 2, 1), nn.LeakyReLU(0.2))   # image, label map
        self.conv2 = nn.Sequential(nn.Conv2d(ndf + extra_map, 2 * ndf, 4, 2, 1), nn.BatchNorm2d(2 * ndf),
                                   nn.LeakyReLU(0.2), *extra, nn.Flatten())
        self.linear = nn.Linear(2 * ndf * s0 * s0 + extra_y, 1)
        if every:
            self.label_map_14 = nn.Embedding(n_classes, (size // 2) ** 2)
        if cond == "projection":
            self.project = nn.Embedding(n_classes, 2 * ndf * s0 * s0)

    def forward(self, x, y):
        s = self.size
        h = self.conv1(torch.cat([x, self.label_map(y).view(-1, 1, s, s)], 1))   # (B, 2, 28, 28) -> (B, ndf, 14, 14)
        if self.cond == "every":
            h = torch.cat([h, self.label_map_14(y).view(-1, 1, s // 2, s // 2)], 1)   # (B, ndf + 1, 14, 14)
        phi = self.conv2(h)                                                      # (B, 2 ndf * 7 * 7)
        if self.cond == "every":
            phi = torch.cat([phi, F.one_hot(y, self.n_classes).float()], 1)     # (B, 2 ndf * 7 * 7 + 10)
        logit = self.linear(phi)                                                 # (B, 1)
        if self.cond == "projection":
            logit = logit + (self.project(y) * phi).sum(1, keepdim=True)
        return logit


# ----------------------------------------------------------------------------- losses (l: D's logits, D = sigmoid(l))
def d_loss(l_real, l_fake):
    """-[E log D(x|y) + E log(1 - D(G(z|y)|y))] on D's logits: real pairs -> 1, fake pairs -> 0 (002, "Conditional
    GANs (Mirza 2014)")."""
    # log D = -softplus(-l), log(1 - D) = -softplus(l)
    return F.softplus(-l_real).mean() + F.softplus(l_fake).mean()


def g_loss(l_fake, saturating=False):
    """Non-saturating -E log D(G(z|y)|y), or the minimax's E log(1 - D(G(z|y)|y)) (002, "Conditional GANs (Mirza
    2014)"; the non-saturating form: "Equilibrium analysis (Goodfellow et al. 2014)", note)."""
    if saturating:
        return -F.softplus(l_fake).mean()                                # E log(1 - D(G(z|y)|y)), minimized
    return F.softplus(-l_fake).mean()                                    # -E log D(G(z|y)|y)


def lsgan_d_loss(d_real, d_fake):
    """E (D(x|y) - 1)^2 + E D(G(z|y)|y)^2: least squares, a = 0, b = 1 (002, "Objective functions - Least Square
    GANS", with the label as in "Conditional GANs (Mirza 2014)")."""
    return ((d_real - 1) ** 2).mean() + (d_fake ** 2).mean()             # E (D(x|y) - 1)^2 + E D(G(z|y)|y)^2


def lsgan_g_loss(d_fake):
    """E (D(G(z|y)|y) - 1)^2: least squares, c = 1 (002, "Objective functions - Least Square GANS")."""
    return ((d_fake - 1) ** 2).mean()                                    # E (D(G(z|y)|y) - 1)^2


def discriminator_loss(D, x, y, x_fake, y_fake, lsgan=False):
    """D's loss on a batch (002, "Conditional GANs (Mirza 2014)"): D sees each real image x with its own label y,
    and each fake G(z|y_fake) with the label y_fake it was made for; the fakes carry no gradient back to G."""
    l_real = D(x, y)
    l_fake = D(x_fake.detach(), y_fake)
    return lsgan_d_loss(l_real, l_fake) if lsgan else d_loss(l_real, l_fake)


# ----------------------------------------------------------------------------- sampling and pictures
@torch.no_grad()
def sample(G, z, y, batch_size=1000):
    """G(z|y) mapped back to [0, 1], in batches, on the CPU."""
    G.eval()
    dev = next(G.parameters()).device
    out = [(G(zb.to(dev), yb.to(dev)).cpu() + 1) / 2 for zb, yb in zip(z.split(batch_size), y.split(batch_size))]
    return torch.cat(out)


def class_grid(G, z_dim, seed=0):
    """10 rows (class y = 0..9; K rows for K classes) x 10 columns (one fixed z per column): (100, C, S, S)."""
    z = torch.randn(10, z_dim, generator=torch.Generator().manual_seed(seed))
    k = G.embed.num_embeddings
    return sample(G, z.repeat(k, 1), torch.arange(k).repeat_interleave(10))   # row y, column z


def interpolation_grid(G, z_dim, seed=1, n=10):
    """Row y: G((1 - t) z_0 + t z_1 | y) for t in [0, 1], the same z_0, z_1 for every row."""
    z0, z1 = torch.randn(2, z_dim, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(0, 1, n)[:, None]
    k = G.embed.num_embeddings
    z = ((1 - t) * z0 + t * z1).repeat(k, 1)                            # (10 n, z_dim)
    return sample(G, z, torch.arange(k).repeat_interleave(n)), n


# ----------------------------------------------------------------------------- training
def train(cfg, G, D, G_ema, device, state=None):
    """cfg.steps steps of the conditional game; state: a saved run to continue (--resume)."""
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    real = batch_sampler(cfg, gen)
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=(0.5, 0.999))
    decay = lambda step: min(1.0, 2 * (1 - step / cfg.steps))            # constant, then linear to 0 (2nd half)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_d)]
    history = {"D loss": [], "G loss": []}
    lsgan = cfg.loss == "lsgan"
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt_g=opt_g, opt_d=opt_d, sched_g=scheds[0], sched_d=scheds[1])
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "cgan", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):

            # real pairs (x, y) ~ p_data; fake pairs (G(z|y), y), z ~ N(0, I), y ~ p(y) uniform
            x, y = (t.to(device) for t in real())
            z = torch.randn(cfg.batch_size, cfg.z_dim, device=device)
            y_fake = torch.randint(D.n_classes, (cfg.batch_size,), device=device)
            x_fake = G(z, y_fake)

            # one discriminator step: real -> 1, fake -> 0 (002, the conditional value)
            loss_d = discriminator_loss(D, x, y, x_fake, y_fake, lsgan)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()

            # one generator step; grads pass through D, not into it
            D.requires_grad_(False)
            l_fake = D(x_fake, y_fake)
            loss_g = lsgan_g_loss(l_fake) if lsgan else g_loss(l_fake, cfg.g_loss == "saturating")
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            D.requires_grad_(True)

            # the moving average of G (its warm-up forgets the random init), learning rates, record, checkpoint
            common.ema_update(G_ema, G, step, cfg.ema)
            for s in scheds:
                s.step()
            history["D loss"].append(loss_d.item())
            history["G loss"].append(loss_g.item())
            progress(step, loss_d.item() + loss_g.item())
            save(step, lambda: dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(),
                                    opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), sched_g=scheds[0].state_dict(),
                                    sched_d=scheds[1].state_dict(), history=history, rng=common.rng_states(gen)))
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "cgan", __doc__)
    common.check(cfg.z_dim > 0 and cfg.emb_dim > 0 and cfg.ndf > 0 and cfg.n_samples >= 10,
                 "--z-dim, --emb-dim and --ndf must be positive and --n-samples at least 10")
    common.check(0 <= cfg.ema < 1, f"--ema must be in [0, 1) (0: no averaging), got {cfg.ema}")
    state = common.load_run(cfg, "cgan") if cfg.sample_only or cfg.resume else None  # flags from the checkpoint

    # G, D and the moving average of G
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    x_train, y_train = common.load_data(cfg, "train")
    common.check(common.labelled(y_train), f"cgan needs labelled data: {cfg.data_dir} has no class subfolders (put "
                 f"each class's images in a subfolder of its own)")
    k, c, size = int(y_train.max()) + 1, x_train.shape[1], x_train.shape[-1]      # classes, channels, side
    G = Generator(cfg.z_dim, cfg.emb_dim, k, c, size).to(device)
    D = Discriminator(k, cfg.d_cond, cfg.ndf, c, size).to(device)
    G_ema = copy.deepcopy(G)

    # train, or load the trained networks
    t0 = time.time()
    history = {}
    if state:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        G_ema.load_state_dict(state["G_ema"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
    else:
        history = train(cfg, G, D, G_ema, device, state)

    # samples of balanced classes from the average (= G if --ema 0), their scores, the pictures
    G = G_ema
    y = torch.arange(cfg.n_samples) % k
    x = sample(G, torch.randn(cfg.n_samples, cfg.z_dim), y)
    scores = metrics.image_metrics(x, cfg.data, labels=y, data_dir=cfg.data_dir, out=cfg.out)
    common.save_images(class_grid(G, cfg.z_dim), os.path.join(cfg.out, "samples.png"))
    grid, n = interpolation_grid(G, cfg.z_dim)
    common.save_images(grid, os.path.join(cfg.out, "interpolation.png"), nrow=n)
    return common.finish(cfg, scores, t0, device, samples=x, history=history)   # sample i has class i % k


if __name__ == "__main__":
    common.run(main)
