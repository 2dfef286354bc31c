r"""wgan.py - Wasserstein GAN: the Earth Mover's distance through a 1-Lipschitz critic (Arjovsky et al. 2017),
with weight clipping (Algorithm 1) or the gradient penalty of Gulrajani et al. 2017.

Lectures: 002 "Objective functions - Wasserstein GANs", "Wasserstein GANs" (Kantorovich-Rubinstein duality,
Algorithm 1); 003 Part III (clipping vs gradient penalty, n_critic); 004 "Problem Setting [Arjovsky et al., 2017]",
"Improved WGAN". Why W at all (003 Part II, the JSD's "Zero Gradient" wall): divergences.py.
Run: `python wgan.py` (gradient penalty, ring8), `python wgan.py --lipschitz clip`, `python wgan.py --data digits`.

    duality     W(p_x, p_g) = sup_{|f|_L <= 1} E_x f(x) - E_z f(g(z))                  (002, Kantorovich-Rubinstein)
    critic      minimize E_z f_w(g(z)) - E_x f_w(x)  (+ lambda GP), --n-critic steps per generator step
    generator   minimize -E_z f_w(g(z))
    clip        w <- clip(w, -c, c) after each RMSProp step, c = 0.01, lr 5e-5  (002, Algorithm 1)
    GP          lambda E[(|grad f(x_hat)|_2 - 1)^2], x_hat = eps x + (1 - eps) x_fake, one eps ~ U[0,1] per sample,
                the norm per sample over all non-batch dimensions   (003, "Gradient Penalty (WGAN-GP)")
003 gives the penalty but no lambda and no optimizer; ours: Adam betas (0.5, 0.9) (the GP paper: beta_1 = 0).
004's "Improved WGAN" slide penalises the gradient at *real* points x ~ P_r; the code follows 003 and Gulrajani
et al. and penalises it at the interpolates x_hat. Slip in 003 ("Step 2: The Critic Loss"): the critic loss is
already written as E f(G(z)) - E f(x), to be minimized; its note "minimize the negative of this loss" would
make the critic minimize the distance. The code minimizes E f(G(z)) - E f(x).
The critic's estimate E f(x) - E f(g(z)) on a fresh batch is logged every step (wasserstein.png); on 2-D data
it is drawn against the exact W_1 of 500 generated and 500 data points (metrics.w_exact, exact assignment).
With clipping the critic is K-Lipschitz for some unknown K, so a trained critic's estimate is at most K * W_1 (004),
and a clipped, finitely trained network usually gives less.
Difference from Algorithm 1: the loop index runs n_critic times (the pseudo-code's 0..n_critic is n_critic + 1).
The critic has no BatchNorm: the gradient penalty is per sample, and BatchNorm would mix the samples.
Differences from the GP paper's practice (lambda = 10, Adam lr 1e-4, constant), for short CPU runs: lr 2e-3 on
2-D data and 1e-3 on images, decayed linearly to 0; lambda = 1 on 2-D data (10 on images). The paper's setting:
`--lambda-gp 10 --lr 1e-4 --no-decay`. Clipping keeps Algorithm 1's constant 5e-5.
"""
import dataclasses, math, os, time

import torch
import torch.nn as nn
from matplotlib.figure import Figure

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("ring8", "dataset (2-D or images)", common.POINT_DATA + common.IMAGE_DATA)
    steps: int = common.arg(2500, "generator steps (images: 600 unless given)")
    batch_size: int = common.arg(256, "examples per step (images: 64 unless given)")
    lr: float = common.arg(2e-3, "learning rate (images: 1e-3 unless given; --lipschitz clip: 5e-5)")
    lipschitz: str = common.arg("gp", "how the critic is kept Lipschitz", ["gp", "clip"])
    n_critic: int = common.arg(5, "critic steps per generator step")
    clip: float = common.arg(0.01, "c, the weight clipping bound")
    lambda_gp: float = common.arg(1.0, "lambda, the gradient penalty weight (images: 10 unless given, the GP paper's)")
    z_dim: int = common.arg(0, "latent size (0: 8 for 2-D data, 64 for images)")
    width: int = common.arg(128, "hidden units of the 2-D MLPs")
    n_samples: int = common.arg(5000, "samples drawn for the final metrics")
    decay: bool = common.arg(True, "decay both learning rates linearly to 0 over the run")
    exact_every: int = common.arg(500, "2-D: compute the exact W_1 every this many steps (0: never)")
    gif: bool = common.arg(False, "2-D: also write training.gif, G's samples over the critic at 50 steps of training")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "z_dim", "width", "image_size", "grey")

    def defaults(self, given):
        if self.lipschitz == "clip":                                     # Algorithm 1: alpha = 5e-5, constant
            self.lr = self.lr if "--lr" in given else 5e-5
            self.decay = self.decay if "--decay" in given or "--no-decay" in given else False
        if self.data in common.IMAGE_DATA:                               # DCGAN steps that fit the CPU
            self.steps = self.steps if "--steps" in given else 600
            self.batch_size = self.batch_size if "--batch-size" in given else 64
            self.lambda_gp = self.lambda_gp if "--lambda-gp" in given else 10.0
            self.lr = self.lr if "--lr" in given or self.lipschitz == "clip" else 1e-3


# ----------------------------------------------------------------------------- data
def batch_sampler(cfg, gen):
    """() -> a real batch in model range, drawn with the torch.Generator gen: 2-D points as they are, images
    mapped from [0, 1] to [-1, 1]."""
    if cfg.data in common.POINT_DATA:
        return lambda: common.sample_2d(cfg.data, cfg.batch_size, gen)
    x = common.load_data(cfg, "train")[0]
    return lambda: x[torch.randint(len(x), (cfg.batch_size,), generator=gen)] * 2 - 1


# ----------------------------------------------------------------------------- generator and critic
def mlp(d_in, width, d_out):
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out))


def make_nets(cfg):
    """(generator g, critic f, z_dim): MLPs for 2-D data; for images a DCGAN generator (z -> 128x7x7 -> 64x14x14
    -> 1x28x28, tanh) and a DCGAN-like critic with no BatchNorm and no sigmoid: f(x) is any real number. C x 32 x 32
    images start from 8x8; 64x64 ones pass one more 64-channel level (G) and 128-channel level (critic)."""
    if cfg.data in common.POINT_DATA:
        z_dim = cfg.z_dim or 8
        return mlp(z_dim, cfg.width, 2), mlp(2, cfg.width, 1), z_dim
    z_dim = cfg.z_dim or 64
    c, size = common.load_data(cfg, "train")[0].shape[1:3]
    s0 = size // 8 if size == 64 else size // 4
    extra = size == 64
    G = nn.Sequential(nn.Linear(z_dim, 128 * s0 * s0), nn.Unflatten(1, (128, s0, s0)), nn.BatchNorm2d(128), nn.ReLU(),
                      nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                      *([nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU()] if extra else []),
                      nn.ConvTranspose2d(64, c, 4, 2, 1), nn.Tanh())
    critic = nn.Sequential(nn.Conv2d(c, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 128, 4, 2, 1),
                           nn.LeakyReLU(0.2), *([nn.Conv2d(128, 128, 4, 2, 1), nn.LeakyReLU(0.2)] if extra else []),
                           nn.Flatten(), nn.Linear(128 * s0 * s0, 1))
    return G, critic, z_dim


# ----------------------------------------------------------------------------- losses and the Lipschitz constraint
def critic_loss(f_real, f_fake):
    """E f(g(z)) - E f(x): the critic maximizes E f(x) - E f(g(z)), the dual of W (002, "Wasserstein GANs",
    Algorithm 1; 003, "Step 2: The Critic Loss")."""
    return f_fake.mean() - f_real.mean()                                 # E f(g(z)) - E f(x)


def generator_loss(f_fake):
    """-E f(g(z)): the generator lowers W by raising the critic's value of its samples (002, "Wasserstein GANs",
    Algorithm 1)."""
    return -f_fake.mean()                                                # -E f(g(z))


def gradient_penalty(critic, x, x_fake):
    r"""E[(|grad_x f(x_hat)|_2 - 1)^2] with x_hat = eps x + (1 - eps) x_fake, one eps per sample (003, "Gradient
    Penalty (WGAN-GP)")."""
    eps = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device)      # (B, 1, ...): one eps per sample
    x_hat = (eps * x + (1 - eps) * x_fake).requires_grad_(True)
    grad = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)[0]
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()              # norm per sample over all non-batch dims


def clip_weights(critic, c):
    """w <- clip(w, -c, c) for every weight of the critic, after each of its steps (002, "Wasserstein GANs",
    Algorithm 1)."""
    with torch.no_grad():
        for p in critic.parameters():
            p.clamp_(-c, c)                                              # w <- clip(w, -c, c)  (002, Algorithm 1)


# ----------------------------------------------------------------------------- pictures
def save_w_estimate(history, exact, path):
    """The critic's running W estimate against the exact W_1 (2-D data)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(history["critic's W estimate"], lw=0.6, label="critic: E f(x) - E f(g(z)), fresh batch")
    if exact:
        ax.plot(*zip(*exact), "k.-", label="exact W_1, 500 vs 500 points (assignment)")
    ax.set_xlabel("generator step")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


# ----------------------------------------------------------------------------- training
def train(cfg, G, critic, z_dim, device, state=None):
    """Algorithm 1 (clip) or its gradient-penalty form for cfg.steps steps; state: a saved run to continue."""
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    real = batch_sampler(cfg, gen)
    if cfg.lipschitz == "gp":
        opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(0.5, 0.9))
        opt_c = torch.optim.Adam(critic.parameters(), cfg.lr, betas=(0.5, 0.9))
    else:
        opt_g = torch.optim.RMSprop(G.parameters(), cfg.lr)
        opt_c = torch.optim.RMSprop(critic.parameters(), cfg.lr)
    decay = lambda s: 1 - s / cfg.steps if cfg.decay else 1.0           # over --steps (a resumed run's new --steps)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_c)]
    history = {"critic loss": [], "G loss": [], "critic's W estimate": []}
    exact = []
    snapshots = []
    points = cfg.data in common.POINT_DATA
    snap_at = {round(cfg.steps * f) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 1.0)}
    film, film_at = [], {round(cfg.steps * k / 50) for k in range(1, 51)} if cfg.gif else set()   # --gif's frames
    z_look = torch.randn(1000, z_dim, generator=torch.Generator().manual_seed(1))    # the same z in every snapshot
    x_look = common.sample_2d(cfg.data, 1000, torch.Generator().manual_seed(2)) if points else None
    noise = lambda n: torch.randn(n, z_dim, device=device)
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt_g=opt_g, opt_c=opt_c, sched_g=scheds[0], sched_c=scheds[1])
        exact = state["exact"]
        snapshots, film = state["snapshots"], state.get("film", [])
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "wgan", every=500) as save:
        for step in range(start + 1, cfg.steps + 1):

            # n_critic critic steps: minimize E f(g(z)) - E f(x) (+ lambda GP), or clip after each (Algorithm 1)
            for _ in range(cfg.n_critic):
                x = real().to(device)
                x_fake = G(noise(len(x))).detach()
                loss_c = critic_loss(f_fake=critic(x_fake), f_real=critic(x))   # E f(g(z)) - E f(x)
                if cfg.lipschitz == "gp":
                    loss_c = loss_c + cfg.lambda_gp * gradient_penalty(critic, x, x_fake)
                opt_c.zero_grad()
                loss_c.backward()
                opt_c.step()
                if cfg.lipschitz == "clip":
                    clip_weights(critic, cfg.clip)

            # one generator step: minimize -E f(g(z)); grads pass through f, not into it
            critic.requires_grad_(False)
            loss_g = generator_loss(critic(G(noise(cfg.batch_size))))   # -E f(g(z))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            critic.requires_grad_(True)
            for sched in scheds:
                sched.step()

            # record: the critic's W estimate on a fresh batch
            with torch.no_grad():
                x = real().to(device)
                w_est = float(critic(x).mean() - critic(G(noise(len(x)))).mean())
            history["critic loss"].append(loss_c.item())
            history["G loss"].append(loss_g.item())
            history["critic's W estimate"].append(w_est)
            progress(step, loss_c.item() + loss_g.item())               # guards both losses against NaN

            # for the pictures, not the algorithm (2-D data): the exact W_1 and the critic's surface; checkpoint
            if points and cfg.exact_every and (step % cfg.exact_every == 0 or step == 1):
                with torch.no_grad():
                    fake = G(z_look[:500].to(device)).cpu()                 # fixed z and x: --exact-every
                exact.append((step, metrics.w_exact(fake, x_look[:500], p=1)))  # leaves the training stream alone
            if points and (step in snap_at or step in film_at):
                with torch.no_grad():
                    fake = G(z_look.to(device)).cpu()
                values = common.surface(lambda p: critic(p.to(device)).cpu())   # the critic as it is at this step
                if step in snap_at:
                    snapshots.append((values, fake, x_look, f"step {step}"))
                if step in film_at:
                    film.append((values, fake))
            save(step, lambda: dict(G=G.state_dict(), critic=critic.state_dict(), opt_g=opt_g.state_dict(),
                                    opt_c=opt_c.state_dict(), sched_g=scheds[0].state_dict(),
                                    sched_c=scheds[1].state_dict(), history=history, exact=exact,
                                    snapshots=snapshots, film=film, rng=common.rng_states(gen)))
    if snapshots:
        common.save_progress(snapshots, os.path.join(cfg.out, "progress.png"))
    if film:                                                             # the last frame: progress.png's last panel
        common.save_gif([common.points_frame(f, x_look, v) for v, f in film], os.path.join(cfg.out, "training.gif"))
    save_w_estimate(history, exact, os.path.join(cfg.out, "wasserstein.png"))
    return history, exact


def main(argv=None):
    cfg = common.parse_config(Config, argv, "wgan", __doc__)
    common.check(cfg.n_critic > 0 and cfg.width > 0 and cfg.z_dim >= 0 and cfg.n_samples > 1 and cfg.exact_every >= 0,
                 "--n-critic and --width must be positive, --z-dim and --exact-every non-negative, --n-samples >= 2")
    common.check(cfg.clip > 0 and cfg.lambda_gp >= 0, "--clip must be positive and --lambda-gp non-negative")
    common.check(not cfg.gif or (cfg.data in common.POINT_DATA and not cfg.sample_only), "--gif films the training on "
                 "2-D data: train a run with it (e.g. --data ring8 --gif), without --sample-only")
    state = common.load_run(cfg, "wgan") if cfg.sample_only or cfg.resume else None  # flags from the checkpoint

    # the generator and the critic
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    G, critic, z_dim = make_nets(cfg)
    G = G.to(device)
    critic = critic.to(device)

    # train, or load the trained networks (and their record of W during training)
    t0 = time.time()
    if state:
        G.load_state_dict(state["G"])
        critic.load_state_dict(state["critic"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
        history = state.get("history", {})
        exact = state.get("exact", [])
    else:
        history, exact = train(cfg, G, critic, z_dim, device, state)
    extra = {}
    if history:
        last = history["critic's W estimate"][-50:]
        extra["w_estimate_final"] = sum(last) / len(last)
    if exact:
        extra["w1_exact_final"] = exact[-1][1]

    # samples x = g(z), z ~ N(0, I), in batches, and their scores
    G.eval()
    with torch.no_grad():
        batches = math.ceil(cfg.n_samples / 1000)
        x = torch.cat([G(torch.randn(1000, z_dim, device=device)).cpu() for _ in range(batches)])
    x = x[:cfg.n_samples]
    if cfg.data in common.POINT_DATA:
        scores = metrics.point_metrics(x, cfg.data)
        common.save_points(x[:2500], os.path.join(cfg.out, "samples.png"), ref=common.sample_2d(cfg.data, 2500),
                           title=", ".join(f"{k} {v:.3g}" for k, v in scores.items()))
    else:
        x = (x + 1) / 2                                                  # back to [0, 1]
        scores = metrics.image_metrics(x, cfg.data, data_dir=cfg.data_dir, out=cfg.out)
        common.save_images(x[:100], os.path.join(cfg.out, "samples.png"))
    return common.finish(cfg, dict(scores, **extra), t0, device, samples=x, history=history)


if __name__ == "__main__":
    common.run(main)
