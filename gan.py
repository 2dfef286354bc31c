r"""gan.py - the adversarial game of Goodfellow et al. (2014), its optimal discriminator, and its failure modes.

Lectures: 002 "GANs - Adversarial training as binary classification", "GAN equilibrium analysis" (D*, JSD),
"Objective functions - Least Square GANS"; 004 "How to build the discriminator and generator" (DCGAN rules),
"Downside of traditional GAN's" (vanishing gradients); 000 section 6.1 (the k-step loop).
Run: `python gan.py` (ring8), `python gan.py --data grid25`, `python gan.py --data digits`, `python gan.py --loss
lsgan`, `python gan.py --g-steps 10 --steps 1000` (mode collapse on purpose, below). Which Gaussian each divergence
prefers (003): divergences.py.

    value       V(D, G) = E_x log D(x) + E_z log(1 - D(G(z)))                  (002, "Loss function")
    D step      maximize V: k steps of binary cross-entropy, real -> 1, fake -> 0   (000 6.1, k = --k)
    G step      saturating:     minimize E_z log(1 - D(G(z)))                    (the minimax as written)
                nonsaturating:  minimize -E_z log D(G(z))    (002, "Equilibrium analysis ... Note"; default)
    LSGAN       L(D) = E (D(x) - b)^2 + E (D(G(z)) - a)^2,  L(G) = E (D(G(z)) - c)^2,  a = 0, b = c = 1
                (002 "Least Square GANS", after Mao et al. without their factors 1/2: the same minimizers)
    optimum     D*(x) = p_data / (p_data + p_g),  V(D*, G) = -log 4 + 2 JSD(p_data, p_g)      (002, proof)
Mode collapse on purpose: 004 ("Mode collapse or mode dropping") says that G trained in the inner loop places all
its mass on the points D finds most likely. --g-steps 10 gives G ten steps per round (against one D step at k = 1):
the whole cloud shrinks to a short streak that chases D's maximum around the plane (progress.png).
D works on logits l (D = sigmoid(l)) for stability: log D = -softplus(-l), log(1 - D) = -softplus(l).
Slip in 004's Algorithm 1 (line 9): it says G is updated by "ascending" the gradient of log(1 - D(G(z))). G
*minimizes* that term (it is the player who lowers V), so the code descends it; ascending would help D.
2-D data use MLPs; images use DCGAN nets (strided convolutions, BatchNorm except the G output and the D input,
ReLU in G, LeakyReLU(0.2) in D, tanh output; pixels mapped to [-1, 1]). Adam(2e-4, betas (0.5, 0.999)).
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
    data: str = common.arg("ring8", "dataset (2-D or images)", common.POINT_DATA + common.IMAGE_DATA)
    steps: int = common.arg(5000, "rounds of --k D steps and --g-steps G steps (images: 2000 unless given)")
    batch_size: int = common.arg(256, "examples per step (images: 64 unless given)")
    lr: float = common.arg(2e-4, "Adam learning rate (both networks)")
    k: int = common.arg(1, "discriminator steps per generator step (Algorithm 1's k)")
    g_steps: int = common.arg(1, "generator steps per round (1 in Algorithm 1; more puts G in the inner loop, "
                                 "where it collapses onto D's favourite points: 004, 'Mode collapse')")
    g_loss: str = common.arg("nonsaturating", "generator loss of the GAN value", ["nonsaturating", "saturating"])
    loss: str = common.arg("gan", "gan: the minimax value; lsgan: least squares (a=0, b=c=1)", ["gan", "lsgan"])
    z_dim: int = common.arg(0, "latent size (0: 8 for 2-D data, 64 for images)")
    width: int = common.arg(256, "hidden units of the 2-D MLPs")
    n_samples: int = common.arg(5000, "samples drawn for the final metrics")
    gif: bool = common.arg(False, "2-D: also write training.gif, G's samples over D's surface at 50 steps of training")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "z_dim", "width", "loss", "image_size", "grey")

    def defaults(self, given):                                           # image data: DCGAN steps fit the CPU
        if self.data in common.IMAGE_DATA:
            self.steps = self.steps if "--steps" in given else 2000
            self.batch_size = self.batch_size if "--batch-size" in given else 64


# ----------------------------------------------------------------------------- data
def batch_sampler(cfg, gen):
    """() -> a real batch in model range, drawn with the torch.Generator gen: 2-D points as they are, images
    mapped from [0, 1] to [-1, 1]."""
    if cfg.data in common.POINT_DATA:
        return lambda: common.sample_2d(cfg.data, cfg.batch_size, gen)
    x = common.load_data(cfg, "train")[0]
    return lambda: x[torch.randint(len(x), (cfg.batch_size,), generator=gen)] * 2 - 1


# ----------------------------------------------------------------------------- models
def mlp(d_in, width, d_out):
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out))


def dcgan_generator(z_dim, channels=1, size=28):
    """z -> 128x7x7 -> 64x14x14 -> 1x28x28 in [-1, 1] with transposed (fractionally strided) convolutions; C x 32 x 32
    from 8x8 the same way, and 64x64 through one more level (64 x 16 x 16 -> 64 x 32 x 32)."""
    s0 = size // 8 if size == 64 else size // 4
    extra = [nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU()] if size == 64 else []
    return nn.Sequential(nn.Linear(z_dim, 128 * s0 * s0), nn.Unflatten(1, (128, s0, s0)), nn.BatchNorm2d(128),
                         nn.ReLU(), nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(), *extra,
                         nn.ConvTranspose2d(64, channels, 4, 2, 1), nn.Tanh())


def dcgan_discriminator(batchnorm=True, channels=1, size=28):
    """1x28x28 -> 64x14x14 -> 128x7x7 -> one logit (32x32: 8x8 at the end; 64x64: one more level to 8x8); no
    BatchNorm on the input layer (and none if batchnorm=False)."""
    norm = nn.BatchNorm2d(128) if batchnorm else nn.Identity()
    s0 = size // 8 if size == 64 else size // 4
    extra = []
    if size == 64:                                                       # one more level, 32 -> 16 -> 8
        extra = [nn.Conv2d(128, 128, 4, 2, 1), nn.BatchNorm2d(128) if batchnorm else nn.Identity(), nn.LeakyReLU(0.2)]
    return nn.Sequential(nn.Conv2d(channels, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1), norm,
                         nn.LeakyReLU(0.2), *extra, nn.Flatten(), nn.Linear(128 * s0 * s0, 1))


def make_nets(cfg, batchnorm=True):
    """(generator, discriminator or critic, z_dim) for the dataset: MLPs for 2-D, DCGAN nets for images."""
    if cfg.data in common.POINT_DATA:
        z_dim = cfg.z_dim or 8
        return mlp(z_dim, cfg.width, 2), mlp(2, cfg.width, 1), z_dim
    z_dim = cfg.z_dim or 64
    channels, size = common.load_data(cfg, "train")[0].shape[1:3]
    return dcgan_generator(z_dim, channels, size), dcgan_discriminator(batchnorm, channels, size), z_dim


# ----------------------------------------------------------------------------- losses (l: D's logits)
def d_loss(l_real, l_fake):
    """-V(D, G) = -[E log D(x) + E log(1 - D(G(z)))], on D's logits: D maximizes V, i.e. minimizes the binary
    cross-entropy with real -> 1, fake -> 0 (002, "Loss function (Goodfellow et al. 2014)")."""
    return F.softplus(-l_real).mean() + F.softplus(l_fake).mean()        # -[E log D(x) + E log(1 - D(G(z)))]


def g_loss_saturating(l_fake):
    """E log(1 - D(G(z))), minimized by G: the minimax value's G term (002, "Loss function (Goodfellow et al.
    2014)")."""
    return -F.softplus(l_fake).mean()                                    # log(1 - D) = -softplus(l)


def g_loss_nonsaturating(l_fake):
    """-E log D(G(z)): the same fixed point, strong gradients where D rejects G's samples (002, "Equilibrium
    analysis (Goodfellow et al. 2014)", note)."""
    return F.softplus(-l_fake).mean()                                    # -log D = softplus(-l)


def lsgan_d_loss(d_real, d_fake):
    """L(D) = E (D(x) - b)^2 + E (D(G(z)) - a)^2, b = 1, a = 0 (002, "Objective functions - Least Square GANS")."""
    return ((d_real - 1) ** 2).mean() + (d_fake ** 2).mean()             # E (D(x) - b)^2 + E (D(G(z)) - a)^2


def lsgan_g_loss(d_fake):
    """L(G) = E (D(G(z)) - c)^2, c = 1 (002, "Objective functions - Least Square GANS")."""
    return ((d_fake - 1) ** 2).mean()                                    # E (D(G(z)) - c)^2, c = 1


def losses(cfg):
    """(D's loss, G's loss) chosen by --loss and --g-loss."""
    if cfg.loss == "lsgan":
        return lsgan_d_loss, lsgan_g_loss
    return d_loss, g_loss_saturating if cfg.g_loss == "saturating" else g_loss_nonsaturating


# ----------------------------------------------------------------------------- theory (discrete densities)
def optimal_discriminator(p_data, p_g):
    """D*(x) = p_data(x) / (p_data(x) + p_g(x)) (002, "Equilibrium analysis (Goodfellow et al. 2014)")."""
    return p_data / (p_data + p_g)                                       # D*(x) = p_data / (p_data + p_g)


def gan_value(D, p_data, p_g):
    """V(D, G) = sum_x p_data(x) log D(x) + p_g(x) log(1 - D(x)) for densities on a finite set (0 log 0 = 0)
    (002, "Loss function (Goodfellow et al. 2014)")."""
    term = lambda p, d: torch.where(p > 0, p * torch.log(d), torch.zeros_like(p))
    return float(term(p_data, D).sum() + term(p_g, 1 - D).sum())


def jsd(p, q):
    """JSD(p, q) = 1/2 KL(p | m) + 1/2 KL(q | m), m = (p + q) / 2, for discrete distributions, in nats (002,
    "Equilibrium analysis": V(D*, G) = -log 4 + 2 JSD)."""
    kl_to_m = lambda a, b: torch.where(a > 0, a * torch.log(2 * a / (a + b)), torch.zeros_like(a)).sum()  # KL(a|m)
    return float(0.5 * kl_to_m(p, q) + 0.5 * kl_to_m(q, p))


# ----------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(G, n, z_dim, device):
    """x = G(z), z ~ N(0, I), in batches of 1000, on the CPU."""
    G.eval()
    return torch.cat([G(torch.randn(1000, z_dim, device=device)).cpu() for _ in range(math.ceil(n / 1000))])[:n]


# ----------------------------------------------------------------------------- training
def train(cfg, G, D, z_dim, device, state=None):
    """Algorithm 1 for cfg.steps steps; state: a saved run to continue (--resume)."""
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    real = batch_sampler(cfg, gen)
    loss_of_d, loss_of_g = losses(cfg)
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=(0.5, 0.999))
    history = {"D loss": [], "G loss": []}
    snapshots = []
    z_look = torch.randn(1000, z_dim, generator=torch.Generator().manual_seed(1))    # the same z in every snapshot
    x_look = None
    if cfg.data in common.POINT_DATA:                                    # the same real points in every snapshot
        x_look = common.sample_2d(cfg.data, 1000, torch.Generator().manual_seed(2))
    snap_at = {round(cfg.steps * f) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 1.0)}
    film, film_at = [], {round(cfg.steps * k / 50) for k in range(1, 51)} if cfg.gif else set()   # --gif's frames
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt_g=opt_g, opt_d=opt_d)
        snapshots, film = state["snapshots"], state.get("film", [])
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "gan", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):

            # k discriminator steps: maximize V, i.e. minimize D's loss (Algorithm 1, 000 6.1)
            for _ in range(cfg.k):
                x = real().to(device)
                z = torch.randn(cfg.batch_size, z_dim, device=device)
                loss_d = loss_of_d(D(x), D(G(z).detach()))
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()

            # generator steps (Algorithm 1: one), descending G's loss; grads pass through D, not into it
            D.requires_grad_(False)
            for _ in range(cfg.g_steps):
                loss_g = loss_of_g(D(G(torch.randn(cfg.batch_size, z_dim, device=device))))
                opt_g.zero_grad()
                loss_g.backward()                                        # descends: see the docstring's note
                opt_g.step()
            D.requires_grad_(True)

            # record; for the pictures (2-D data): D's surface and G's samples at a few steps; checkpoint
            history["D loss"].append(loss_d.item())
            history["G loss"].append(loss_g.item())
            progress(step, loss_d.item() + loss_g.item())
            if (step in snap_at or step in film_at) and x_look is not None:
                with torch.no_grad():
                    fake = G(z_look.to(device)).cpu()
                prob = lambda p: torch.sigmoid(D(p.to(device))).cpu() if cfg.loss == "gan" else D(p.to(device)).cpu()
                values = common.surface(prob)
                if step in snap_at:
                    snapshots.append((values, fake, x_look, f"step {step}"))
                if step in film_at:
                    film.append((values, fake))
            save(step, lambda: dict(G=G.state_dict(), D=D.state_dict(), opt_g=opt_g.state_dict(),
                                    opt_d=opt_d.state_dict(), history=history, snapshots=snapshots, film=film,
                                    rng=common.rng_states(gen)))
    if snapshots:
        common.save_progress(snapshots, os.path.join(cfg.out, "progress.png"))
    if film:                                                             # the last frame: progress.png's last panel
        common.save_gif([common.points_frame(f, x_look, v) for v, f in film], os.path.join(cfg.out, "training.gif"))
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "gan", __doc__)
    common.check(cfg.k > 0 and cfg.g_steps > 0 and cfg.width > 0 and cfg.z_dim >= 0 and cfg.n_samples > 1,
                 "--k, --g-steps and --width must be positive, --z-dim non-negative, --n-samples at least 2")
    common.check(not cfg.gif or (cfg.data in common.POINT_DATA and not cfg.sample_only), "--gif films the training on "
                 "2-D data: train a run with it (e.g. --data ring8 --gif), without --sample-only")
    state = common.load_run(cfg, "gan") if cfg.sample_only or cfg.resume else None   # flags from the checkpoint

    # the two networks
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    G, D, z_dim = make_nets(cfg)
    G = G.to(device)
    D = D.to(device)

    # train, or load the trained networks
    t0 = time.time()
    history = {}
    if state:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
    else:
        history = train(cfg, G, D, z_dim, device, state)

    # D on real and generated data: the equilibrium says D = 1/2 on both
    D.eval()
    with torch.no_grad():
        x = batch_sampler(cfg, torch.Generator().manual_seed(cfg.seed))().to(device)
        l_real = D(x)
        l_fake = D(G.eval()(torch.randn(len(x), z_dim, device=device)))
    squash = torch.sigmoid if cfg.loss == "gan" else (lambda l: l)

    # samples and their scores
    x = sample(G, cfg.n_samples, z_dim, device)
    if cfg.data in common.POINT_DATA:
        scores = metrics.point_metrics(x, cfg.data)
        common.save_points(x[:2500], os.path.join(cfg.out, "samples.png"), ref=common.sample_2d(cfg.data, 2500),
                           title=", ".join(f"{k} {v:.3g}" for k, v in scores.items()))
    else:
        x = (x + 1) / 2                                                  # back to [0, 1]
        scores = metrics.image_metrics(x, cfg.data, data_dir=cfg.data_dir, out=cfg.out)
        common.save_images(x[:100], os.path.join(cfg.out, "samples.png"))
    scores.update(D_real=float(squash(l_real).mean()), D_fake=float(squash(l_fake).mean()))
    return common.finish(cfg, scores, t0, device, samples=x, history=history)


if __name__ == "__main__":
    common.run(main)
