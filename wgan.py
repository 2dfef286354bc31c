r"""wgan.py - Wasserstein GAN: the Earth Mover's distance through a 1-Lipschitz critic (Arjovsky et al. 2017),
with weight clipping (Algorithm 1) or the gradient penalty of Gulrajani et al. 2017.

Lectures: 002 "Objective functions - Wasserstein GANs", "Wasserstein GANs" (Kantorovich-Rubinstein duality,
Algorithm 1); 003 Part II (the "Zero Gradient" wall of JSD) and Part III (clipping vs gradient penalty, n_critic);
004 "Problem Setting [Arjovsky et al., 2017]", "Improved WGAN". It builds on gan.py (same generators, data, outputs).
Run: `python wgan.py` (gradient penalty, ring8), `python wgan.py --lipschitz clip`, `python wgan.py --data grid25`.

    duality     W(p_x, p_g) = sup_{|f|_L <= 1} E_x f(x) - E_z f(g(z))                  (002, Kantorovich-Rubinstein)
    critic      minimize E_z f_w(g(z)) - E_x f_w(x)  (+ lambda GP), --n-critic steps per generator step
    generator   minimize -E_z f_w(g(z))
    clip        w <- clip(w, -c, c) after each RMSProp step, c = 0.01, lr 5e-5  (002, Algorithm 1)
    GP          lambda E[(|grad f(x_hat)|_2 - 1)^2], x_hat = eps x + (1 - eps) x_fake, one eps ~ U[0,1] per sample,
                the norm per sample over all non-batch dimensions; lambda = 10, Adam lr 1e-4 betas (0.5, 0.9)  (003)
The critic's estimate E f(x) - E f(g(z)) on a fresh batch is logged every step (wasserstein.png); on 2-D data
it is drawn against the exact W_1 of 500 generated and 500 data points (exact assignment, sinkhorn.py).
With clipping the critic is K-Lipschitz for some unknown K, so its estimate is K * W_1, not W_1 (004).
Difference from Algorithm 1: the loop index runs n_critic times (the pseudo-code's 0..n_critic is n_critic + 1).
The critic has no BatchNorm: the gradient penalty is per sample, and BatchNorm would mix the samples.
Differences from the GP paper's practice: Adam lr 1e-3 decayed linearly to 0 (the paper: 1e-4, constant), which
a 2-CPU-minute run needs (`--lr 1e-4 --no-decay` for the paper's setting; clipping keeps Algorithm 1's 5e-5).
"""
import dataclasses, math, os, time

import torch
from matplotlib.figure import Figure

import common
import gan
import sinkhorn


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("ring8", "dataset (2-D or images)", common.POINT_DATA + common.IMAGE_DATA)
    steps: int = common.arg(2000, "generator steps (images: 600 unless given)")
    batch_size: int = common.arg(256, "examples per step (images: 64 unless given)")
    lr: float = common.arg(1e-3, "learning rate (the GP paper uses 1e-4; with --lipschitz clip the default is 5e-5)")
    lipschitz: str = common.arg("gp", "how the critic is kept Lipschitz", ["gp", "clip"])
    n_critic: int = common.arg(5, "critic steps per generator step")
    clip: float = common.arg(0.01, "c, the weight clipping bound")
    gp_lambda: float = common.arg(10.0, "lambda, the gradient penalty weight")
    z_dim: int = common.arg(0, "latent size (0: 8 for 2-D data, 64 for images)")
    hidden: int = common.arg(256, "hidden units of the 2-D MLPs")
    n_samples: int = common.arg(5000, "samples drawn for the final metrics")
    decay: bool = common.arg(True, "decay both learning rates linearly to 0 over the run")
    exact_every: int = common.arg(200, "2-D: compute the exact W_1 every this many steps (0: never)")

    def defaults(self, given):
        if self.lipschitz == "clip":                                     # Algorithm 1: alpha = 5e-5, constant
            self.lr = self.lr if "--lr" in given else 5e-5
            self.decay = self.decay if "--decay" in given or "--no-decay" in given else False
        if self.data in common.IMAGE_DATA:                               # DCGAN steps fit the CPU
            self.steps = self.steps if "--steps" in given else 600
            self.batch_size = self.batch_size if "--batch-size" in given else 64


# ----------------------------------------------------------------------------- Lipschitz constraint
def gradient_penalty(critic, x, x_fake):
    r"""E[(|grad_x f(x_hat)|_2 - 1)^2] with x_hat = eps x + (1 - eps) x_fake, one eps per sample (003, WGAN-GP)."""
    eps = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device)      # (B, 1, ...): one eps per sample
    x_hat = (eps * x + (1 - eps) * x_fake).requires_grad_(True)
    grad = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)[0]
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()              # norm per sample over all non-batch dims


def clip_weights(critic, c):
    with torch.no_grad():
        for p in critic.parameters():
            p.clamp_(-c, c)                                              # w <- clip(w, -c, c)  (002, Algorithm 1, line 7)


# ----------------------------------------------------------------------------- the zero-gradient wall
def jsd_vs_w(ds, s=0.05, n=20000, seed=0):
    """JSD and W_1 between N(0, s^2) and N(d, s^2) for each d: JSD from the two densities on a fine grid
    (gan.jsd), W_1 from samples by sorting (sinkhorn.w1d). JSD saturates at log 2 (zero gradient); W_1 = d."""
    grid = torch.arange(-1.0, float(max(ds)) + 1.0, 0.002, dtype=torch.float64)
    density = lambda m: torch.exp(-(grid - m) ** 2 / (2 * s * s))
    p = density(0.0)
    jsds = [gan.jsd(p / p.sum(), density(d) / density(d).sum()) for d in ds]
    z = s * torch.randn(2, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return jsds, [float(sinkhorn.w1d(z[0], z[1] + d)) for d in ds]


def save_jsd_vs_w(path):
    ds = [i * 0.05 for i in range(61)]
    jsds, ws = jsd_vs_w(ds)
    fig = Figure(figsize=(10, 3.5))
    ax, ax2 = fig.subplots(1, 2)
    ax.plot(ds, jsds, label="JSD"), ax.plot(ds, ws, label="W_1"), ax.axhline(math.log(2), c="k", ls=":", label="log 2")
    ax.set_xlabel("distance d between two narrow Gaussians (std 0.05)"), ax.legend()
    grad = lambda v: [(b - a) / (ds[1] - ds[0]) for a, b in zip(v, v[1:])]
    ax2.plot(ds[1:], grad(jsds), label="d JSD / dd"), ax2.plot(ds[1:], grad(ws), label="d W_1 / dd")
    ax2.set_xlabel("d"), ax2.legend(), ax2.set_title("the generator's learning signal")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return {"jsd_at_d3": jsds[-1], "w1_at_d3": ws[-1]}


# ----------------------------------------------------------------------------- training
def train(cfg, G, critic, z_dim, device):
    real = gan.batch_sampler(cfg)
    if cfg.lipschitz == "gp":
        opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(0.5, 0.9))
        opt_c = torch.optim.Adam(critic.parameters(), cfg.lr, betas=(0.5, 0.9))
    else:
        opt_g, opt_c = torch.optim.RMSprop(G.parameters(), cfg.lr), torch.optim.RMSprop(critic.parameters(), cfg.lr)
    decay = lambda s: 1 - s / cfg.steps if cfg.decay else 1.0
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_c)]
    history, exact, snapshots = {"critic loss": [], "G loss": [], "critic's W estimate": []}, [], []
    progress, ckpt, points = common.Progress(cfg.steps), os.path.join(cfg.out, "checkpoint.pt"), cfg.data in common.POINT_DATA
    snap_at = {round(cfg.steps * f) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 1.0)}
    noise = lambda n: torch.randn(n, z_dim, device=device)
    for step in range(1, cfg.steps + 1):
        for _ in range(cfg.n_critic):
            x = real().to(device)
            x_fake = G(noise(len(x))).detach()
            loss_c = critic(x_fake).mean() - critic(x).mean()           # E f(g(z)) - E f(x)
            if cfg.lipschitz == "gp":
                loss_c = loss_c + cfg.gp_lambda * gradient_penalty(critic, x, x_fake)
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
            if cfg.lipschitz == "clip":
                clip_weights(critic, cfg.clip)
        loss_g = -critic(G(noise(cfg.batch_size))).mean()               # -E f(g(z))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        [sched.step() for sched in scheds]
        with torch.no_grad():                                           # W estimate on a fresh batch
            x = real().to(device)
            w_est = float(critic(x).mean() - critic(G(noise(len(x)))).mean())
        history["critic loss"].append(loss_c.item()), history["G loss"].append(loss_g.item())
        history["critic's W estimate"].append(w_est)
        progress(step, loss_c.item(), ckpt)
        if points and cfg.exact_every and (step % cfg.exact_every == 0 or step == 1):
            with torch.no_grad():
                fake = G(noise(500)).cpu()
            exact.append((step, sinkhorn.w_exact(fake, common.sample_2d(cfg.data, 500), p=1)))
        if points and step in snap_at:
            with torch.no_grad():
                fake = G(noise(1000)).cpu()
            values = gan.surface(lambda p: critic(p.to(device)).cpu())   # the critic as it is at this step
            snapshots.append((values, fake, common.sample_2d(cfg.data, 1000), f"step {step}"))
        if step % 500 == 0 or step == cfg.steps:
            common.save_checkpoint(ckpt, G=G.state_dict(), critic=critic.state_dict(), step=step,
                                   config=dataclasses.asdict(cfg))
    if snapshots:
        gan.save_progress(snapshots, os.path.join(cfg.out, "progress.png"))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(history["critic's W estimate"], lw=0.6, label="critic: E f(x) - E f(g(z)), fresh batch")
    if exact:
        ax.plot(*zip(*exact), "k.-", label="exact W_1, 500 vs 500 points (assignment)")
    ax.set_xlabel("generator step"), ax.legend()
    fig.savefig(os.path.join(cfg.out, "wasserstein.png"), dpi=100, bbox_inches="tight")
    return history, exact


def main(argv=None):
    cfg = common.parse_config(Config, argv, "wgan", __doc__)
    common.check(cfg.n_critic > 0 and cfg.hidden > 0 and cfg.z_dim >= 0 and cfg.n_samples > 1 and cfg.exact_every >= 0,
                 "--n-critic and --hidden must be positive, --z-dim and --exact-every non-negative, --n-samples >= 2")
    common.check(cfg.clip > 0 and cfg.gp_lambda >= 0, "--clip must be positive and --gp-lambda non-negative")
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    G, critic, z_dim = gan.make_nets(cfg, batchnorm=False)
    G, critic, t0, history, extra = G.to(device), critic.to(device), time.time(), {}, {}
    extra.update(save_jsd_vs_w(os.path.join(cfg.out, "jsd_vs_w.png")))
    if cfg.sample_only:
        state = common.load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"))
        G.load_state_dict(state["G"]), critic.load_state_dict(state["critic"])
    else:
        history, exact = train(cfg, G, critic, z_dim, device)
        extra["w_estimate_final"] = sum(history["critic's W estimate"][-50:]) / len(history["critic's W estimate"][-50:])
        if exact:
            extra["w1_exact_final"] = exact[-1][1]
    return gan.finish(cfg, G, z_dim, device, history, t0, extra)


if __name__ == "__main__":
    common.run(main)
