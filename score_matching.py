r"""score_matching.py - the diffusion side of 002's flow-matching story: a score network s_theta trained by
conditional score matching and sampled by the SDE (Euler-Maruyama) or the ODE; and Langevin dynamics.

Lecture: 002 "Diffusion models": SDE, "Simulating a SDE" (Euler-Maruyama), "Sampling from a diffusion model",
"Score function", "Langevin dynamics", the diffusion part's Theorem 2 (an SDE that follows the path p_t) and
Theorem 3 (L_SM = L_CSM + C; not the continuity equation's Theorem 3), "Score matching training for Gaussian
probability path". The notation is flow matching's, as on the slides: x_0 ~ N(0, I) the noise, x_1 the data.
Run: `python score_matching.py` (checkerboard), `--weight none` (the slide's loss), `--sampler ode`,
`--data digits`, `--demo langevin` (Langevin dynamics on a 2-D mixture with its exact score; seconds).

    path      x_t = alpha_t x_1 + beta_t x_0: linear alpha_t = t, beta_t = 1 - t (default), or cosine
              alpha_t = sin(pi t/2), beta_t = cos(pi t/2); p_t(x | x_1) = N(alpha_t x_1, beta_t^2 I)
    CSM loss  --weight none: |s_theta(alpha_t z + beta_t eps, t) + eps / beta_t|^2 with z = x_1, eps = x_0 (the
              slide), t ~ U[0, 0.99]: the target's variance 1/beta_t^2 is infinite at t = 1;
              --weight beta2 (default): lambda(t) = beta_t^2 times it, |beta_t s_theta + eps|^2, t ~ U[0, 1]
    v from s  v = alpha'/alpha x - beta (beta' - alpha' beta / alpha) s (002: the vector field and the score "can
              be converted one to the other", for the Gaussian path)
    SDE       dX = [v_t(X) + sigma^2/2 s_t(X)] dt + sigma dW (Theorem 2), Euler-Maruyama:
              X_{t+h} = X_t + h [v + sigma^2/2 s] + sqrt(h) sigma eps_t; --sampler ode: the same with sigma = 0
    start     t_0 = --t0 > 0 (v from s divides by alpha_t, 0 at t = 0), X_{t_0} = beta_{t_0} eps + alpha_{t_0} E[x_1]:
              p_{t_0}'s mean and scale (exact for Gaussian data), E[x_1] the data's mean
    NLL       log p_1(x_1) = log p_t0(x_t0) - int_t0^1 div v_t(x_t) dt, the probability-flow ODE run backwards (002,
              "Continuity equation"), p_t0 taken as the Gaussian with its moments (2-D)
    Langevin  X_{i+1} = X_i + eps grad log p(X_i) + sqrt(2 eps) xi_i, xi_i ~ N(0, I) (002, "Langevin dynamics"),
              beside the naive ascent X + grad log p(X) (002, "Score function") and annealed Langevin (beyond the
              slides: Song & Ermon 2019, with our step rule eps (var + sigma^2)/var; theirs is eps sigma_i^2/sigma_L^2)
Slips on the slides: the Langevin slide writes the noise sqrt(2 alpha) eps_i with "alpha a small constant": the
step must be eps in both places, and even then p is the chain's limit only as eps -> 0: at finite eps the
unadjusted chain is biased by O(eps) (on N(0, I) its variance is 1/(1 - eps/2)); it also says x_K tends to "a
sample from q(x)", meaning p(x). The note under Theorem 2 writes grad p_t(x|z) for the score grad log p_t(x|z).
The "Sampling from a diffusion model" box takes n - 1 steps of h = 1/n (i = 1..n-1) and stops at t = 1 - h; here
n steps reach t = 1, the last from 1 - h (where the score is finite) without noise.
"""
import dataclasses, math, os, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("checkerboard", "dataset (2-D or images)", common.POINT_DATA + common.IMAGE_DATA)
    steps: int = common.arg(15000, "training steps (images: 4500 unless given)")
    batch_size: int = common.arg(512, "examples per step (images: 64 unless given)")
    lr: float = common.arg(1e-3, "Adam learning rate, decayed linearly to 0")
    path: str = common.arg("linear", "Gaussian probability path", ["linear", "cosine"])
    weight: str = common.arg("beta2", "beta2: beta_t^2 |s + eps/beta_t|^2 = |beta_t s + eps|^2 (eps-prediction); "
                             "none: the slide's |s + eps/beta_t|^2, with t <= 0.99", ["beta2", "none"])
    sampler: str = common.arg("sde", "sde: Euler-Maruyama with diffusion --sigma; ode: dx = v dt", ["sde", "ode"])
    sigma: float = common.arg(0.5, "the SDE's diffusion coefficient sigma")
    sample_steps: int = common.arg(20, "SDE (or ODE) steps for samples.png and the metrics")
    t0: float = common.arg(0.05, "the samplers start at this t, in (0, 1)")
    width: int = common.arg(256, "MLP hidden units (2-D), or U-Net base channels (images: 16 unless given)")
    n_samples: int = common.arg(2500, "samples for the metrics (images: 1000 unless given)")
    demo: str = common.arg("none", "langevin: Langevin dynamics with a known score (no training)", ["none", "langevin"])
    nll_steps: int = common.arg(50, "2-D: midpoint steps of the probability-flow ODE for the likelihood (0: none)")
    gif: bool = common.arg(False, "also write sde_ode.gif (the SDE beside the ODE from the same X_t0; --demo "
                                  "langevin: langevin.gif, the chains)")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "path", "weight", "width", "image_size", "grey")

    def defaults(self, given):
        if self.data in common.IMAGE_DATA:
            self.steps = self.steps if "--steps" in given else 4500
            self.batch_size = self.batch_size if "--batch-size" in given else 64
            self.width = self.width if "--width" in given else 16
            self.n_samples = self.n_samples if "--n-samples" in given else 1000


# ----------------------------------------------------------------------------- path and loss
def path_coefficients(kind, t):
    """(alpha_t, beta_t, alpha'_t, beta'_t) of the path, t a tensor in [0, 1] (002, "The Gaussian conditional path")."""
    if kind == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    h = math.pi / 2
    return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)


def csm_target(kind, x0, x1, t):
    """x_t = alpha_t x_1 + beta_t x_0 and the conditional score
        grad log p_t(x_t | x_1) = -(x_t - alpha_t x_1) / beta_t^2 = -x_0 / beta_t
    (002, "Score matching training for Gaussian probability path")."""
    a, b, _, _ = (c.view(-1, *[1] * (x0.dim() - 1)) for c in path_coefficients(kind, t))   # (B, 1, ...)
    xt = a * x1 + b * x0
    return xt, -(xt - a * x1) / b ** 2


def csm_loss(kind, weight, s_theta, x0, x1, t):
    r"""Conditional score matching (002, "Score matching training"), eps = x_0 ~ N(0, I), z = x_1 ~ data, t given:
        none:   |s_theta(alpha_t z + beta_t eps, t) + eps / beta_t|^2, t scaled to U[0, 0.99]  (the slide's loss)
        beta2:  lambda(t) = beta_t^2: |beta_t s_theta + eps|^2                      (the eps-prediction loss)
    F.mse_loss averages over the d coordinates: 1/d of the slide's squared norm (the same minimizer)."""
    if weight == "none":
        t = t * 0.99                                                     # 1/beta_t is infinite at t = 1
    xt, target = csm_target(kind, x0, x1, t)
    s = s_theta(xt, t)
    if weight == "none":
        return F.mse_loss(s, target)                                     # |s_theta + eps / beta_t|^2 / d (mean)
    b = path_coefficients(kind, t)[1].view(-1, *[1] * (x0.dim() - 1))
    return F.mse_loss(b * s, -x0)                                        # |beta_t s_theta + eps|^2 / d (mean)


# ----------------------------------------------------------------------------- score networks
def time_embedding(t, dim):
    """Sinusoidal embedding of real times t (B,), as the transformer's positions: (B, dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]                            # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], 1)


class MLPScore(nn.Module):
    """s_theta(x, t) for 2-D data: [x, sinusoidal(t)] -> 3 hidden SiLU layers -> R^2."""
    def __init__(self, width=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 32, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, time_embedding(1000 * t, 32)], 1))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; + the time embedding; GroupNorm, SiLU, 3x3 conv; + skip."""
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNetScore(nn.Module):
    """s_theta(x, t) for images: 28x28 -> 14 -> 7 and back, skips by concatenation (000 section 5), t at 1000 t.
    Images (channels, size, size): 32 -> 16 -> 8 the same way; 64x64 has one more level at the top."""
    def __init__(self, width=16, channels=1, size=28):
        super().__init__()
        c1, c2, e = width, 2 * width, 4 * width
        self.width, self.shape = width, (channels, size, size)
        self.t_mlp = nn.Sequential(nn.Linear(width, e), nn.SiLU(), nn.Linear(e, e))
        self.inp = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1, self.pool1 = ResBlock(c1, c1, e), nn.Conv2d(c1, c1, 3, 2, 1)       # 28 -> 14
        self.down2, self.pool2 = ResBlock(c1, c2, e), nn.Conv2d(c2, c2, 3, 2, 1)       # 14 -> 7
        self.mid1, self.mid2 = ResBlock(c2, c2, e), ResBlock(c2, c2, e)
        self.up2 = ResBlock(2 * c2, c2, e)                                # 7 -> 14 after it
        self.up1 = ResBlock(c2 + c2, c1, e)                               # 14 -> 28 after it
        self.up0 = ResBlock(c1 + c1, c1, e)
        self.out = nn.Sequential(nn.GroupNorm(min(8, c1), c1), nn.SiLU(), nn.Conv2d(c1, channels, 3, padding=1))
        self.top = size == 64                                            # 64x64: one more level, 64 -> 32 and back
        if self.top:
            self.down_top, self.pool_top = ResBlock(c1, c1, e), nn.Conv2d(c1, c1, 3, 2, 1)
            self.up_top = ResBlock(c1 + c1, c1, e)

    def forward(self, x, t):
        emb = self.t_mlp(time_embedding(1000 * t, self.width))
        h = self.inp(x)
        if self.top:
            h_top = self.down_top(h, emb)                                 # (B, c1, 64, 64)
            h = self.pool_top(h_top)
        h0 = self.down1(h, emb)                                           # (B, c1, 28, 28)
        h1 = self.down2(self.pool1(h0), emb)                              # (B, c2, 14, 14)
        h2 = self.pool2(h1)                                               # (B, c2, 7, 7)
        h = self.mid2(self.mid1(h2, emb), emb)
        h = F.interpolate(self.up2(torch.cat([h, h2], 1), emb), scale_factor=2.0)      # (B, c2, 14, 14)
        h = F.interpolate(self.up1(torch.cat([h, h1], 1), emb), scale_factor=2.0)      # (B, c1, 28, 28)
        h = self.up0(torch.cat([h, h0], 1), emb)
        if self.top:
            h = self.up_top(torch.cat([F.interpolate(h, scale_factor=2.0), h_top], 1), emb)
        return self.out(h)


# ----------------------------------------------------------------------------- score <-> velocity, samplers
def velocity_from_score(kind, x, t, s):
    """v = alpha'/alpha x - beta (beta' - alpha' beta / alpha) s for the Gaussian path (002: "the vector field and
    the score function can be converted one to the other"); singular at t = 0, where alpha = 0."""
    a, b, da, db = path_coefficients(kind, torch.tensor(float(t), dtype=torch.float64))
    return da / a * x - b * (db - da * b / a) * s


def start(kind, t0, eps, mean):
    """X_{t_0} = beta_{t_0} eps + alpha_{t_0} E[x_1], p_{t_0}'s mean, scale (002, "Sampling from the marginal path")."""
    a, b, _, _ = path_coefficients(kind, torch.tensor(t0, dtype=torch.float64))
    return float(b) * eps + float(a) * mean


@torch.no_grad()
def sample(s_theta, x, steps, kind="linear", sigma=0.5, t0=0.05, gen=None, trajectory=None):
    """Integrate from t_0 to 1 in `steps` steps (002, "Sampling from a diffusion model"), x = X_{t_0}: Euler-Maruyama
    on dX = [v + sigma^2/2 s] dt + sigma dW (Theorem 2) with v from s; sigma = 0 is Euler on the ODE dX = v dt.
    `trajectory` (a list) collects X_{t_0}, ..., X_1."""
    h = (1.0 - t0) / steps
    if trajectory is not None:
        trajectory.append(x.cpu())
    for k in range(steps):
        t = t0 + k * h
        s = s_theta(x, t)
        v = velocity_from_score(kind, x, t, s)
        noise = torch.randn(x.shape, generator=gen).to(x.device) if sigma > 0 and k < steps - 1 else 0   # not last
        # X_{t+h} = X_t + h [v + sigma^2/2 s] + sqrt(h) sigma eps_t
        x = x + h * (v + sigma ** 2 / 2 * s) + math.sqrt(h) * sigma * noise
        if trajectory is not None:
            trajectory.append(x.cpu())
    return x


def evaluate(cfg, model, device):
    """--n-samples samples (2-D points, or images in [0, 1]) by --sampler from --t0, and their metrics."""
    gen, points = torch.Generator().manual_seed(1), cfg.data in common.POINT_DATA
    shape = (2,) if points else model.shape
    if points:                                                           # E[x_1]: of 100 000 fresh points
        mean = common.sample_2d(cfg.data, 100000, torch.Generator().manual_seed(0)).mean(0).to(device)
    else:                                                                # or of the training images in [-1, 1]
        mean = (common.load_data(cfg, "train")[0].mean(0) * 2 - 1).to(device)
    model.eval()
    field = lambda x, t: model(x, torch.full((len(x),), float(t), device=x.device))
    x = []
    for i in range(0, cfg.n_samples, 500):
        eps = torch.randn((min(500, cfg.n_samples - i),) + shape, generator=gen).to(device)
        first = eps if i == 0 else first
        x0 = start(cfg.path, cfg.t0, eps, mean)
        sigma = cfg.sigma if cfg.sampler == "sde" else 0.0
        x.append(sample(field, x0, cfg.sample_steps, cfg.path, sigma, cfg.t0, gen).cpu())
    x = torch.cat(x)
    if cfg.gif:
        save_gif(cfg, field, start(cfg.path, cfg.t0, first, mean), os.path.join(cfg.out, "sde_ode.gif"))
    if points:
        return x, metrics.point_metrics(x, cfg.data)
    x = (x.clamp(-1, 1) + 1) / 2
    return x, metrics.image_metrics(x, cfg.data, data_dir=cfg.data_dir, out=cfg.out)


def save_gif(cfg, field, x0, path):
    """sde_ode.gif: from the same X_{t_0} (the first 500 samples' start), Euler-Maruyama with --sigma (left) beside the
    ODE (right), one frame per step; the last frame's SDE (or, --sampler ode, ODE) half shows the first samples."""
    gen = torch.Generator().manual_seed(1)
    torch.randn(x0.shape, generator=gen)                                 # evaluate()'s draw of X_{t_0}: the same noise
    sde, ode = [], []
    sample(field, x0, cfg.sample_steps, cfg.path, cfg.sigma, cfg.t0, gen, sde)
    sample(field, x0, cfg.sample_steps, cfg.path, 0.0, cfg.t0, None, ode)
    if cfg.data in common.POINT_DATA:
        ref = common.sample_2d(cfg.data, 2500, torch.Generator().manual_seed(0))
        frames = [np.concatenate([common.points_frame(a, ref), common.points_frame(b, ref)], 1)
                  for a, b in zip(sde, ode)]
    else:
        to01 = lambda x: (x[:16].clamp(-1, 1) + 1) / 2
        frames = [common.image_frame(torch.cat([to01(a), to01(b)]), nrow=8) for a, b in zip(sde, ode)]
    common.save_gif(frames, path, ms=150)


# ----------------------------------------------------------------------------- likelihood (2-D)
def log_likelihood(kind, s_theta, x1, steps, t0, mean, cov):
    r"""log p_1(x_1) (N,) of the probability-flow ODE dx/dt = v_t(x), v from s_theta, for 2-D x_1 (002, "Continuity
    equation": d/dt log p_t(x_t) = -div v_t(x_t)), by the midpoint rule from t = 1 back to t_0, div by autograd:
        log p_1(x_1) = log p_{t_0}(x_{t_0}) - int_{t_0}^1 div v_t(x_t) dt,
    p_{t_0} taken as N(alpha mean, beta^2 I + alpha^2 cov), the Gaussian with p_{t_0}'s moments (exact for Gaussian
    data; v from s is singular at t = 0)."""
    def v_and_div(x, t):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = velocity_from_score(kind, x, t, s_theta(x, torch.full((len(x),), float(t), device=x.device)))
            div = sum(torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2))
        return v.detach().float(), div.detach()

    h, x, integral = (1.0 - t0) / steps, x1, 0.0
    for k in range(steps, 0, -1):
        t = t0 + k * h
        v, div = v_and_div(x - h / 2 * v_and_div(x, t)[0], t - h / 2)    # the slope at the midpoint t - h/2
        x = x - h * v
        integral = integral + h * div
    a, b, _, _ = path_coefficients(kind, torch.tensor(t0, dtype=torch.float64))
    p_t0 = torch.distributions.MultivariateNormal(float(a) * mean, float(b) ** 2 * torch.eye(2) + float(a) ** 2 * cov)
    return p_t0.log_prob(x.cpu()) - integral.cpu()


def model_log_density(cfg, model):
    """x -> log p_theta(x) (2-D) of the probability-flow ODE by log_likelihood (--nll-steps), p_t0's moments from
    10^5 fresh points of the data."""
    data = common.sample_2d(cfg.data, 100000, torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    return lambda x: log_likelihood(cfg.path, model, x.to(device), cfg.nll_steps, cfg.t0, data.mean(0), data.T.cov())


# ----------------------------------------------------------------------------- Langevin dynamics (--demo langevin)
def mixture_score(x, means, var, weights):
    """grad log p(x) of the mixture p = sum_k w_k N(mu_k, var I) (002, "Score function"): sum_k r_k(x) (mu_k - x) / var,
    r_k the posterior weight of component k at x."""
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)                   # (N, K) squared distances
    r = torch.softmax(-d2 / (2 * var) + weights.log()[None], 1)         # (N, K) responsibilities
    return (r[:, :, None] * (means[None] - x[:, None])).sum(1) / var


def langevin(score, x, eps, n_steps, gen=None, trajectory=None):
    """X_{i+1} = X_i + eps grad log p(X_i) + sqrt(2 eps) xi_i, xi_i ~ N(0, I) (002, "Langevin dynamics"; the slide
    writes sqrt(2 alpha): the step eps belongs in both places, and the limit is p only as eps -> 0)."""
    for _ in range(n_steps):
        x = x + eps * score(x) + math.sqrt(2 * eps) * torch.randn(x.shape, generator=gen)
        if trajectory is not None:
            trajectory.append(x)
    return x


def naive_ascent(score, x, n_steps, trajectory=None):
    """X_{i+1} = X_i + grad log p(X_i) (002, "Score function"): no noise, so every point climbs to a mode."""
    for _ in range(n_steps):
        x = x + score(x)
        if trajectory is not None:
            trajectory.append(x)
    return x


def annealed_langevin(means, var, weights, x, sigmas, eps, n_steps, gen=None):
    """Beyond the slide (Song & Ermon 2019): Langevin on p_sigma = p * N(0, sigma^2 I) for sigma_1 > ... > sigma_L,
    n_steps at each level, each level started where the previous one ended. The mixture's p_sigma is the mixture
    with variance var + sigma^2; the step is eps (var + sigma^2) / var, as large as p_sigma's scale allows (our
    rule: Song & Ermon take eps sigma_i^2 / sigma_L^2)."""
    for sigma in sigmas:
        v = var + sigma ** 2
        x = langevin(lambda z: mixture_score(z, means, v, weights), x, eps * v / var, n_steps, gen)
    return x


def langevin_demo(cfg):
    """Two mixtures of two unit Gaussians, weights 0.2 / 0.8: close modes (+-1.5, +-1.5) and far ones (+-5, +-5).
    From x ~ N(0, 4^2 I): Langevin (eps = 0.05, K = 1000), naive ascent, and (far modes) annealed Langevin with the
    same number of score evaluations (20 levels of 50 steps)."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    w = torch.tensor([0.2, 0.8])                                         # the mode weights
    n = cfg.n_samples
    eps = 0.05                                                           # the Langevin step
    near = torch.tensor([[-1.5, -1.5], [1.5, 1.5]])
    far = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
    near_first = lambda x, m: float(((x - m[0]).norm(dim=1) < (x - m[1]).norm(dim=1)).float().mean())   # mode 1's share

    # exact samples of p: the reference
    exact = {}
    for name, means in (("near", near), ("far", far)):
        k = torch.multinomial(w, n, replacement=True, generator=gen)
        exact[name] = means[k] + torch.randn(n, 2, generator=gen)

    # the three chains from x_0 ~ N(0, 4^2 I)
    score_near = lambda z: mixture_score(z, near, 1.0, w)
    traj = [4 * torch.randn(n, 2, generator=gen)]
    traj_ascent = [4 * torch.randn(n, 2, generator=gen)]
    x_near = langevin(score_near, traj[0], eps, 1000, gen, traj)
    x_ascent = naive_ascent(score_near, traj_ascent[0], 20, traj_ascent)
    x_far = langevin(lambda z: mixture_score(z, far, 1.0, w), 4 * torch.randn(n, 2, generator=gen), eps, 1000, gen)
    sigmas = [10 * 0.01 ** (i / 19) for i in range(20)]                  # 20 levels from 10 down to 0.1
    x_annealed = annealed_langevin(far, 1.0, w, 4 * torch.randn(n, 2, generator=gen), sigmas, eps, 50, gen)
    scores = {"near_mode1_frac": {"exact": near_first(exact["near"], near), "langevin": near_first(x_near, near)},
              "far_mode1_frac": {"exact": near_first(exact["far"], far), "langevin": near_first(x_far, far),
                                 "annealed_langevin": near_first(x_annealed, far)},
              "ascent_mean_dist_to_mode": float(torch.cdist(x_ascent, near).amin(1).mean()),
              "mmd_near": metrics.mmd(x_near, exact["near"]), "mmd_far_langevin": metrics.mmd(x_far, exact["far"]),
              "mmd_far_annealed": metrics.mmd(x_annealed, exact["far"])}

    # langevin.png: paths over the density and the score arrows; far modes with and without annealing
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 4)
    g = torch.linspace(-6, 6, 121)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)     # (121^2, 2)
    d2 = ((grid[:, None] - near[None]) ** 2).sum(-1)
    density = (w[None] * torch.exp(-d2 / 2) / (2 * math.pi)).sum(1).view(121, 121)
    arrows = grid.view(121, 121, 2)[::8, ::8].reshape(-1, 2)            # (16^2, 2) arrow feet
    for ax, trajectory, title in ((axes[0], traj[:201], "Langevin, eps = 0.05: 200 of K = 1000 steps"),
                                  (axes[1], traj_ascent, "naive ascent X + grad log p(X), 20 steps")):
        paths = torch.stack(trajectory)[:, :6].numpy()                   # (steps + 1, 6, 2)
        ax.plot(paths[:, :, 0], paths[:, :, 1], lw=0.7, alpha=0.8)
        ax.scatter(*paths[0].T, s=12, c="tab:red", zorder=3)             # where the 6 paths start
        ax.scatter(*trajectory[-1][:500].numpy().T, s=2, c="k", zorder=3)   # 500 points after the last step
        ax.contour(g.numpy(), g.numpy(), density.numpy(), 8, cmap="viridis", zorder=4)
        ax.quiver(*arrows.numpy().T, *score_near(arrows).numpy().T, angles="xy", color="0.4", zorder=2)
        ax.set_title(title, fontsize=9)
    m = scores["far_mode1_frac"]
    for ax, x, title in ((axes[2], x_far, f"far modes, Langevin: {m['langevin']:.2f} in mode 1"),
                         (axes[3], x_annealed, f"annealed Langevin: {m['annealed_langevin']:.2f} in mode 1")):
        ax.scatter(*exact["far"][:1000].numpy().T, s=2, c="0.7", label=f"p: {m['exact']:.2f} in mode 1")
        ax.scatter(*x[:1000].numpy().T, s=2, c="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    for ax in axes:
        ax.set(xlim=(-9, 9), ylim=(-9, 9), aspect="equal")
    fig.savefig(os.path.join(cfg.out, "langevin.png"), dpi=90, bbox_inches="tight")
    if cfg.gif:                                                          # every 20th step: 51 frames, x_0 to x_K
        frames = [common.points_frame(x, exact["near"]) for x in traj[::20]]
        common.save_gif(frames, os.path.join(cfg.out, "langevin.gif"))
    common.save_points(x_near, os.path.join(cfg.out, "samples.png"), ref=exact["near"], title="Langevin samples")
    return common.finish(dataclasses.replace(cfg, steps=0), scores, t0, "cpu", samples=x_near)   # nothing trained


# ----------------------------------------------------------------------------- training
def train(cfg, model, device, state=None):
    """Adam on the conditional score matching loss for cfg.steps steps; state: a saved run to continue."""
    points = cfg.data in common.POINT_DATA
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / cfg.steps)   # planned over --steps
    gen = torch.Generator().manual_seed(cfg.seed)                         # data, noise and t
    if not points:
        x_train = common.load_data(cfg, "train")[0]
    history = []
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, model=model, opt=opt, sched=sched)
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "score_matching", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):

            # z = x_1 ~ data (images in [-1, 1]), eps = x_0 ~ N(0, I), t ~ U[0, 1]
            if points:
                x1 = common.sample_2d(cfg.data, cfg.batch_size, gen).to(device)
            else:
                x1 = (x_train[torch.randint(len(x_train), (cfg.batch_size,), generator=gen)] * 2 - 1).to(device)
            x0 = torch.randn(x1.shape, generator=gen).to(device)
            t = torch.rand(len(x1), generator=gen).to(device)

            # the CSM loss (002), one Adam step
            loss = csm_loss(cfg.path, cfg.weight, model, x0, x1, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

            # record and checkpoint
            history.append(loss.item())
            progress(step, loss.item())
            save(step, lambda: dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                    history=history, rng=common.rng_states(gen)))
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "score_matching", __doc__)
    common.check(cfg.sample_steps > 0 and cfg.n_samples > 1 and cfg.width >= 8 and cfg.sigma >= 0 and 0 < cfg.t0 < 1,
                 "--sample-steps must be positive, --width >= 8, --n-samples >= 2, --sigma >= 0, --t0 in (0, 1)")
    common.check(cfg.nll_steps >= 0, f"--nll-steps must be >= 0 (0: no likelihood), got {cfg.nll_steps}")
    common.check(cfg.demo == "none" or not (cfg.sample_only or cfg.resume), "--demo writes no checkpoint: drop "
                 "--sample-only and --resume")
    if cfg.demo == "langevin":
        return langevin_demo(cfg)
    state = common.load_run(cfg, "score_matching") if cfg.sample_only or cfg.resume else None   # flags from it

    # the model: an MLP for 2-D data, a U-Net for images
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    points = cfg.data in common.POINT_DATA
    if points:
        model = MLPScore(cfg.width).to(device)
    else:
        c, size = common.load_data(cfg, "train")[0].shape[1:3]
        model = UNetScore(cfg.width, c, size).to(device)

    # train, or load the trained model
    t0 = time.time()
    history = {}
    if cfg.sample_only:
        model.load_state_dict(state["model"])
        common.restore_rng(cfg, state)                                   # the training run's own samples
    else:
        history = {f"CSM loss (weight {cfg.weight})": train(cfg, model, device, state)}
    train_seconds = time.time() - t0

    # samples, their metrics and pictures; on 2-D data the likelihood by the probability-flow ODE
    x, scores = evaluate(cfg, model, device)
    if points and cfg.nll_steps:
        log_p = model_log_density(cfg, model)
        scores.update(metrics.likelihood_metrics(log_p, cfg.data, cfg.n_samples))
        common.save_density(log_p, lambda x: metrics.log_density_2d(cfg.data, x), "p_theta (probability-flow ODE)",
                            os.path.join(cfg.out, "density.png"))
    if points:
        common.save_points(x[:2500], os.path.join(cfg.out, "samples.png"), ref=common.sample_2d(cfg.data, 2500),
                           title=f"{cfg.sampler}, {cfg.sample_steps} steps from t = {cfg.t0:g}")
    else:
        common.save_images(x[:100], os.path.join(cfg.out, "samples.png"))
    scores["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, scores, t0, device, samples=x, history=history)


if __name__ == "__main__":
    common.run(main)
