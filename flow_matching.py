r"""flow_matching.py - conditional flow matching: Gaussian probability paths, the CFM loss, Euler and midpoint
sampling, independent / minibatch-OT / data coupling, classifier-free guidance, the marginalization trick, and
the model's likelihood by the continuity equation.

Lecture: 002 "Flow Matching" (ODE, flow, Euler's scheme, probability path, conditional and marginal paths,
"Example: Gaussian conditional probability path", CFM loss, "The marginalization trick", "Data coupling",
"Guidance", "Classifier-free guidance", "Continuity equation"). The diffusion side of 002 (SDE, score,
Langevin): score_matching.py.
Run: `python flow_matching.py` (checkerboard), `--coupling ot`, `--data digits`, `--data digits --cond --guidance 2`,
`--data digits --coupling corrupt` (inpainting), `--demo marginal` (the exact marginal field of 8 points).

    path       x_t = alpha_t x_1 + beta_t x_0, x_0 ~ N(0, I), x_1 ~ data: p_t(x | x_1) = N(alpha_t x_1, beta_t^2 I),
               with the slide's alpha_t = t, beta_t = 1 - t (score_matching.py also has a cosine path)
    CFM loss   |v_theta(x_t, t) - (alpha'_t x_1 + beta'_t x_0)|^2 = |v_theta(x_t, t) - (x_1 - x_0)|^2, t ~ U[0, 1]
    sampling   dx/dt = v_theta(x, t) from t = 0 to 1: Euler x_{t+h} = x_t + h v_theta(x_t, t) (002), or the
               midpoint rule x_{t+h} = x_t + h v_theta(x_t + h/2 v_theta(x_t, t), t + h/2) (two calls a step)
    coupling   independent pairs (x_0, x_1) (default); ot: pairs drawn from an entropic OT plan between the two
               minibatches (the lecture's scaling-form Sinkhorn, below), meant to straighten the paths; corrupt
               (images): the slide's data coupling p_{0,1} = p_{0|1}(x_0 | x_1) p_1(x_1), x_0 = x_1 with its lower
               half masked, + 0.1 eps; sampled from masked test images, it restores them (inpainting)
    guidance   labels dropped to a null token with probability eta = 0.1 per sample; sampling with
               v~ = (1 - w) v_theta(x | null) + w v_theta(x | y)  (002, "Classifier-free guidance"; w = 1: conditional)
    marginal   --demo marginal: for data made of 8 points the marginal field u_t is exact (002, "The
               marginalization trick"): Euler on it carries N(0, I) onto the points; a trained v_theta beside it
    likelihood log p_1(x_1) = log N(x_0; 0, I) - int_0^1 div v_t(x_t) dt along the ODE run backwards from x_1 (002,
               "Continuity equation"); div exact in 2-D, Hutchinson's estimate on images (bits per dimension)
Notation: x_0 is the noise and x_1 the data (ddpm.py writes x_0 for the data). ddpm's --guidance w is this w - 1.
Slip on the CFG slide: its loss |v - alpha'_t eps + beta'_t x_1|^2 has the coefficients exchanged and the x_1 term's
sign flipped (on the linear path it reads |v - eps - x_1|^2); the target is the derivative of x_t,
alpha'_t x_1 + beta'_t x_0 (tested against finite differences): x_1 - x_0 on the linear path.
The data coupling adds noise 0.1 eps to the corrupted image (not on the slide): without it p_0 has no density
(a masked half is constant) and a deterministic flow cannot spread one x_0 over its many possible x_1.
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
    data: str = common.arg("checkerboard", "dataset (2-D or images)", common.POINT_DATA + common.IMAGE_DATA)
    steps: int = common.arg(15000, "training steps (images: 4500 unless given)")
    batch_size: int = common.arg(512, "pairs per step (images: 64 unless given)")
    lr: float = common.arg(1e-3, "Adam learning rate, decayed linearly to 0")
    coupling: str = common.arg("independent", "how x_0 and x_1 are paired (corrupt: x_0 = a corrupted x_1, images)",
                               ["independent", "ot", "corrupt"])
    solver: str = common.arg("euler", "ODE solver for samples.png and the metrics", ["euler", "midpoint"])
    sample_steps: int = common.arg(20, "ODE steps for samples.png and the metrics")
    demo: str = common.arg("none", "marginal: the exact marginal field of 8 points beside a trained v_theta",
                           ["none", "marginal"])
    cond: bool = common.arg(False, "class-conditional (images) with classifier-free guidance")
    guidance: float = common.arg(1.0, "w in (1 - w) v(x|null) + w v(x|y); 1 = plain conditional")
    p_uncond: float = common.arg(0.1, "eta: probability of dropping the label (per sample)")
    width: int = common.arg(256, "MLP hidden units (2-D), or U-Net base channels (images: 16 unless given)")
    n_samples: int = common.arg(2500, "samples for the metrics (images: 1000 unless given)")
    nll_steps: int = common.arg(50, "midpoint steps of the likelihood ODE (0: no likelihood)")
    probes: int = common.arg(1, "images: Rademacher probes per step of Hutchinson's divergence estimate")
    gif: bool = common.arg(False, "also write flow.gif: the samples carried from x_0 to x_1, one frame per ODE step")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "coupling", "cond", "width", "image_size", "grey")

    def defaults(self, given):
        if self.data in common.IMAGE_DATA:
            self.steps = self.steps if "--steps" in given else 4500
            self.batch_size = self.batch_size if "--batch-size" in given else 64
            self.width = self.width if "--width" in given else 16
            self.n_samples = self.n_samples if "--n-samples" in given else 1000


# ----------------------------------------------------------------------------- probability path and loss
def path_coefficients(t):
    """(alpha_t, beta_t, alpha'_t, beta'_t) of the linear path alpha_t = t, beta_t = 1 - t (002, "Training")."""
    return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)


def cfm_target(x0, x1, t):
    """x_t = alpha_t x_1 + beta_t x_0 and its time derivative alpha'_t x_1 + beta'_t x_0, the CFM regression target
    (002, "Example: Gaussian conditional probability path")."""
    a, b, da, db = (c.view(-1, *[1] * (x0.dim() - 1)) for c in path_coefficients(t))   # (B, 1, ...)
    return a * x1 + b * x0, da * x1 + db * x0


def cfm_loss(v_theta, x0, x1, t, y=None):
    """|v_theta(x_t, t) - (alpha'_t x_1 + beta'_t x_0)|^2 / d, averaged over the batch (002, "Training", L_CFM;
    F.mse_loss divides the slide's squared norm by the dimension d: the same minimizer)."""
    xt, target = cfm_target(x0, x1, t)
    return F.mse_loss(v_theta(xt, t, y), target)


# ----------------------------------------------------------------------------- couplings
def sinkhorn_plan(C, eps, tol=1e-4, max_iter=2000):
    r"""Entropic OT plan between two uniform batches of n points, cost C (n, n), by the lecture's scaling form
    (000, "Sinkhorn Algorithm"; sinkhorn.py has the full solver):
        K = exp(-C/eps),   u = a / (K v),   v = b / (K^T u),   P = diag(u) K diag(v),   a = b = 1/n,
    stopping when the column sums of P are within tol of b (L1). C is first reduced by its row and column minima,
    which changes no plan and leaves a 1 in every row and column of K: K v never underflows to 0."""
    C = C - C.amin(1, keepdim=True)
    C = C - C.amin(0, keepdim=True)
    K = torch.exp(-C / eps)
    a = torch.full((len(C),), 1.0 / len(C), dtype=C.dtype, device=C.device)   # = b
    v = torch.ones_like(a)
    for _ in range(max_iter):
        u = a / (K @ v)                                                  # u = a / (K v)
        Ktu = K.T @ u
        err = float((v * Ktu - a).abs().sum())                           # column sums of diag(u) K diag(v) - b
        v = a / Ktu                                                      # v = b / (K^T u)
        if err < tol:
            break
    return u[:, None] * K * v[None, :]


def ot_pairs(x0, x1, gen=None):
    """Minibatch OT coupling: for each x_1[j] draw x_0[i] with probability P_ij / b_j, P the entropic OT plan for
    the cost |x_0 - x_1|^2 reduced by its row and column minima (no plan changes), eps = 0.05 x its mean: the
    scale of how much farther one partner is than the nearest. Returns x_0 re-ordered to pair with x_1.
    OT-CFM (Tong et al. 2023) uses the exact plan and draws the pairs jointly; their SB-CFM is entropic; one
    draw per x_1 is a stratified variant of the joint draw."""
    C = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()) ** 2
    C = C - C.amin(1, keepdim=True)
    C = C - C.amin(0, keepdim=True)
    P = sinkhorn_plan(C, 0.05 * float(C.mean()))
    i = torch.multinomial(P.T.float().cpu() + 1e-30, 1, generator=gen)[:, 0]   # one row i per column j
    return x0[i.to(x0.device)]


def corrupt(x1):
    """The slide's "partial image" (002, "Data coupling"): images in [-1, 1] with the lower half set to black."""
    x0 = x1.clone()
    x0[:, :, x1.shape[2] // 2:] = -1.0                                   # (B, C, H, W): rows H/2.. to black
    return x0


# ----------------------------------------------------------------------------- velocity networks
def time_embedding(t, dim):
    """Sinusoidal embedding of real times t (B,), as the transformer's positions: (B, dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]                            # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], 1)


class MLPVelocity(nn.Module):
    """v_theta(x, t) for 2-D data: [x, sinusoidal(t)] -> 3 hidden SiLU layers -> R^2."""
    def __init__(self, width=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 32, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, time_embedding(1000 * t, 32)], 1))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; + the time (and label) embedding; GroupNorm, SiLU, 3x3 conv; + skip."""
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


class UNetVelocity(nn.Module):
    """v_theta(x, t, y) for images: 28x28 -> 14 -> 7 and back with skip connections by concatenation (000
    section 5), t in [0, 1] embedded at 1000 t; with n_classes a label embedding, index n_classes = the null token.
    Images (channels, size, size): 32 -> 16 -> 8 the same way; 64x64 has one more level at the top."""
    def __init__(self, width=16, n_classes=0, channels=1, size=28):
        super().__init__()
        c1, c2, e = width, 2 * width, 4 * width
        self.width, self.n_classes, self.shape = width, n_classes, (channels, size, size)
        self.t_mlp = nn.Sequential(nn.Linear(width, e), nn.SiLU(), nn.Linear(e, e))
        self.label = nn.Embedding(n_classes + 1, e) if n_classes else None
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

    def forward(self, x, t, y=None):
        emb = self.t_mlp(time_embedding(1000 * t, self.width))
        if self.label is not None:
            emb = emb + self.label(y if y is not None else torch.full_like(t, self.n_classes, dtype=torch.long))
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


# ----------------------------------------------------------------------------- guidance and sampling
def velocity(model, x, t, y=None, w=1.0):
    """v~ = (1 - w) v(x | null) + w v(x | y) (002, "Classifier-free guidance"); plain v without labels or w = 1."""
    tt = torch.full((len(x),), float(t), device=x.device)
    if y is None or w == 1.0:
        return model(x, tt, y)
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, model.n_classes)]))
    v_cond, v_null = v.chunk(2)
    return (1 - w) * v_null + w * v_cond


@torch.no_grad()
def sample(v, x, steps, solver="euler", trajectory=None):
    """Integrate dx/dt = v(x, t) from t = 0 to 1 in `steps` steps (002, "Flow matching inference"): Euler, or the
    midpoint rule; `trajectory` (a list) collects every x_t. Returns x_1 and the number of calls of v."""
    h = 1.0 / steps
    for k in range(steps):
        t = k * h
        if solver == "euler":
            x = x + h * v(x, t)                                          # x_{t+h} = x_t + h v(x_t, t)
        else:
            x = x + h * v(x + h / 2 * v(x, t), t + h / 2)                # the slope at the midpoint
        if trajectory is not None:
            trajectory.append(x.cpu())
    return x, steps * (1 if solver == "euler" else 2)


# ----------------------------------------------------------------------------- likelihood
def divergence(v, x, t, probes=0, gen=None):
    r"""(div v(x, t), v(x, t)), div v = sum_i dv_i/dx_i (002, "Continuity equation"): exact, one backward pass per
    dimension (probes = 0), or Hutchinson's unbiased estimate mean_k e_k^T (dv/dx) e_k over `probes` Rademacher
    vectors e_k, whose variance per probe is 2 sum_{i != j} S_ij^2, S = the symmetric part of dv/dx."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = v(x, t)
        if probes == 0:
            div = sum(torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1]))
        else:
            div = 0.0
            for _ in range(probes):
                e = torch.randint(0, 2, x.shape, generator=gen).to(x) * 2 - 1
                div = div + (torch.autograd.grad(out, x, e, retain_graph=True)[0] * e).flatten(1).sum(1) / probes
    return div.detach(), out.detach()


def log_likelihood(v, x1, steps, solver="midpoint", probes=0, gen=None):
    r"""log p_1(x_1) of the flow dx/dt = v(x, t) from p_0 = N(0, I) (002, "Continuity equation": along a path
    d/dt log p_t(x_t) = -div v_t(x_t)), integrating the ODE backwards from x_1 at t = 1 to x_0 at t = 0:
        log p_1(x_1) = log N(x_0; 0, I) - int_0^1 div v_t(x_t) dt,
    by Euler or the midpoint rule with `steps` steps; probes > 0: Hutchinson's divergence (images)."""
    h, x, integral = 1.0 / steps, x1, 0.0
    for k in range(steps, 0, -1):
        t = k * h
        if solver == "euler":
            div, vt = divergence(v, x, t, probes, gen)                  # x_{t-h} = x_t - h v(x_t, t)
        else:
            with torch.no_grad():                                        # the slope at the midpoint t - h/2
                div, vt = divergence(v, x - h / 2 * v(x, t), t - h / 2, probes, gen)
        x = x - h * vt
        integral = integral + h * div
    d = x[0].numel()
    log_p0 = -0.5 * (x ** 2).flatten(1).sum(1) - d / 2 * math.log(2 * math.pi)
    return log_p0 - integral


def likelihood_2d(cfg, model, device):
    """metrics.likelihood_metrics (test NLL, H(p), KL(p || p_theta) in nats) with log p_theta by the midpoint rule
    (--nll-steps), and nll_euler: the test NLL by the sampler's Euler steps (--sample-steps)."""
    field = lambda x, t: velocity(model, x, t)
    midpoint = lambda x: log_likelihood(field, x.to(device), cfg.nll_steps)
    euler = lambda x: log_likelihood(field, x.to(device), cfg.sample_steps, "euler")
    m = metrics.likelihood_metrics(midpoint, cfg.data, cfg.n_samples)
    return dict(m, nll_euler=metrics.likelihood_metrics(euler, cfg.data, cfg.n_samples)["nll"])


def bits_per_dim(cfg, model, device):
    """Bits per dimension of n = min(--n-samples, 200) 8-bit test images x in {0..255}^D under uniform
    dequantisation, y = 2 (x + u)/256 - 1, u ~ U[0, 1)^D: -log2 P(x) <= E_u[-log2 p(y)] - D log2(2/256). Returns the
    mean, its standard error over the images, and the standard deviation of one image's estimate from two
    Hutchinson runs a, b: sqrt(E[(a - b)^2] / 2)."""
    gen, n = torch.Generator().manual_seed(2), min(cfg.n_samples, 200)
    x = torch.round(common.load_data(cfg, "test")[0][:n] * 255)
    y = (2 * (x + torch.rand(x.shape, generator=gen)) / 256 - 1).to(device)
    d = y[0].numel()
    field = lambda x, t: velocity(model, x, t)
    runs = [log_likelihood(field, y, cfg.nll_steps, probes=cfg.probes, gen=gen).cpu() for _ in range(2)]
    bpd = [-(r + d * math.log(2 / 256)) / (d * math.log(2)) for r in runs]
    mean = (bpd[0] + bpd[1]) / 2
    return dict(bpd=float(mean.mean()), bpd_se=float(mean.std() / math.sqrt(n)),
                bpd_probe_sd=float(((bpd[0] - bpd[1]) ** 2 / 2).mean().sqrt()), bpd_images=n)


# ----------------------------------------------------------------------------- metrics and pictures
def evaluate(cfg, model, device, trajectory=None):
    """Samples x_1 (2-D points, or images in [0, 1]) and their metrics, by --solver with --sample-steps steps;
    `trajectory` (a list) collects x_0, ..., x_1 of the first 500."""
    gen, points = torch.Generator().manual_seed(1), cfg.data in common.POINT_DATA
    y = torch.arange(cfg.n_samples, device=device) % model.n_classes if cfg.cond else None
    shape = (cfg.n_samples, 2) if points else (cfg.n_samples,) + model.shape
    model.eval()
    x, calls = [], 0
    for i in range(0, cfg.n_samples, 500):
        yb = y[i:i + 500] if y is not None else None
        x0 = torch.randn((min(500, cfg.n_samples - i),) + shape[1:], generator=gen).to(device)
        traj = trajectory if i == 0 and trajectory is not None else None
        if traj is not None:
            traj.append(x0.cpu())
        xb, calls = sample(lambda x, t: velocity(model, x, t, yb, cfg.guidance), x0, cfg.sample_steps, cfg.solver, traj)
        x.append(xb.cpu())
    x = torch.cat(x)
    calls *= 2 if cfg.cond and cfg.guidance != 1.0 else 1               # guidance: v(x|y) and v(x|null) per call
    if points:
        return x, dict(metrics.point_metrics(x, cfg.data), network_calls=calls)
    x = (x.clamp(-1, 1) + 1) / 2
    m = metrics.image_metrics(x, cfg.data, labels=y.cpu() if y is not None else None, data_dir=cfg.data_dir,
                              out=cfg.out)
    return x, dict(m, network_calls=calls)


def evaluate_restoration(cfg, model, device, traj):
    """--coupling corrupt: integrate dx/dt = v_theta from corrupted test images (t = 0) to t = 1; the mean absolute
    pixel error (in [0, 1]) of the corrupted and of the restored images, the image metrics of the restorations
    (class_accuracy: the clean image's label); restoration.png, rows x_0, x_t at t = 1/4, 1/2, 3/4, x_1, clean."""
    x_test, y_test = common.load_data(cfg, "test")
    clean = x_test[:cfg.n_samples] * 2 - 1                               # (N, C, S, S) in [-1, 1]
    gen = torch.Generator().manual_seed(1)
    x0 = corrupt(clean) + 0.1 * torch.randn(clean.shape, generator=gen)   # as in training
    model.eval()
    field = lambda x, t: velocity(model, x.to(device), t).cpu()
    traj.append(x0)
    restored, calls = sample(field, x0, cfg.sample_steps, cfg.solver, trajectory=traj)
    keep = [traj[round(f * cfg.sample_steps)][:10] for f in (0, 0.25, 0.5, 0.75, 1.0)] + [clean[:10]]
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2
    common.save_images(to01(torch.cat(keep)), os.path.join(cfg.out, "restoration.png"))
    m = metrics.image_metrics(to01(restored), cfg.data, labels=y_test[:cfg.n_samples], data_dir=cfg.data_dir,
                              out=cfg.out)
    m.update(corrupted_mae=float((to01(x0) - to01(clean)).abs().mean()),
             restoration_mae=float((to01(restored) - to01(clean)).abs().mean()), network_calls=calls)
    return to01(restored), m


def save_gif(cfg, trajectory, path):
    """flow.gif: one frame per ODE step, x_0 first and the samples x_1 last (the first 500 points over the data,
    or the first 32 images)."""
    if cfg.data in common.POINT_DATA:
        ref = common.sample_2d(cfg.data, 2500, torch.Generator().manual_seed(0))
        frames = [common.points_frame(x, ref) for x in trajectory]
    else:
        frames = [common.image_frame((x[:32].clamp(-1, 1) + 1) / 2, nrow=8) for x in trajectory]
    common.save_gif(frames, path, ms=150)


def save_trajectories(cfg, model, device):
    """trajectories.png: 300 paths of the learned flow from x_0 ~ N(0, I) to x_1 (002's "Euler integration" figure)."""
    traj = [torch.randn(300, 2, generator=torch.Generator().manual_seed(5))]
    sample(lambda z, t: velocity(model, z.to(device), t).cpu(), traj[0], cfg.sample_steps, cfg.solver, traj)
    paths = torch.stack(traj).numpy()                                    # (steps + 1, 300, 2)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot(paths[:, :, 0], paths[:, :, 1], c="0.5", lw=0.4, alpha=0.6)
    ax.scatter(*paths[0].T, s=3, c="tab:blue", label="x_0 ~ N(0, I)")
    ax.scatter(*paths[-1].T, s=3, c="tab:red", label="x_1")
    ax.set(xlim=(-5, 5), ylim=(-5, 5), aspect="equal", title=f"the flow of v_theta, {cfg.solver}")
    ax.legend()
    fig.savefig(os.path.join(cfg.out, "trajectories.png"), dpi=100, bbox_inches="tight")


# ----------------------------------------------------------------------------- the marginalization trick (--demo)
def marginal_velocity(x, t, points):
    r"""The exact marginal field of data made of the points z_i (equal weights) on the Gaussian path (002, "The
    marginalization trick"): u_t(x) = sum_i w_i(x, t) u_t(x | z_i), with
        u_t(x | z) = alpha'_t z + beta'_t (x - alpha_t z) / beta_t     (the conditional field, x_0 = (x - alpha z)/beta)
        w_i(x, t) = N(x; alpha_t z_i, beta_t^2 I) / sum_j N(x; alpha_t z_j, beta_t^2 I)   (a softmax over i).
    x (N, d); t in [0, 1), a float or one per row (N,)."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))                 # (N,)
    a, b, da, db = (c.view(-1, 1, 1) for c in path_coefficients(t))   # (N, 1, 1) each
    d2 = ((x[:, None, :] - a * points[None]) ** 2).sum(-1)              # (N, n) squared distances to alpha z_i
    w = torch.softmax(-d2 / (2 * b[:, :, 0] ** 2), 1)                    # (N, n) posterior weights of the z_i
    u = da * points[None] + db * (x[:, None, :] - a * points[None]) / b  # (N, n, d) conditional fields
    return (w[:, :, None] * u).sum(1)


def marginal_demo(cfg):
    """8 points on a circle of radius 3: Euler integration of the exact u_t from N(0, I); a v_theta trained with the
    CFM loss on them (3000 steps), drawn beside u_t at t = 0.25, 0.5, 0.75, 0.9 (marginal.png)."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    common.seed_all(cfg.seed)                                            # v_theta's initial weights
    os.makedirs(cfg.out, exist_ok=True)

    # the exact field carries N(0, I) onto the points
    angles = torch.arange(8) * 2 * math.pi / 8
    points = 3 * torch.stack([angles.cos(), angles.sin()], 1)           # (8, 2)
    x0 = torch.randn(cfg.n_samples, 2, generator=gen)
    x1, _ = sample(lambda x, t: marginal_velocity(x, t, points), x0, 100)
    to_point = torch.cdist(x1, points).amin(1)                           # distance of each endpoint to its nearest z_i

    # a v_theta trained with the CFM loss on the 8 points
    model = MLPVelocity(128)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3000):
        z = points[torch.randint(8, (256,), generator=gen)]
        t = torch.rand(256, generator=gen)
        loss = cfm_loss(model, torch.randn(256, 2, generator=gen), z, t)
        opt.zero_grad()
        loss.backward()
        opt.step()

    # the two fields side by side
    scores = {"endpoint_to_point_mean": float(to_point.mean()), "endpoint_to_point_max": float(to_point.max())}
    fig = Figure(figsize=(16, 4))
    g = torch.linspace(-4, 4, 17)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)     # (289, 2)
    for ax, t in zip(fig.subplots(1, 4), (0.25, 0.5, 0.75, 0.9)):
        xt = cfm_target(torch.randn(2000, 2, generator=gen), points[torch.randint(8, (2000,), generator=gen)],
                        torch.full((2000,), t))[0]                       # samples of p_t, where the field matters
        u = marginal_velocity(xt, t, points)
        with torch.no_grad():
            v = model(xt, torch.full((2000,), t))
            v_grid = model(grid, torch.full((289,), t))
        scores[f"rel_error_t{t}"] = float((v - u).norm(dim=1).mean() / u.norm(dim=1).mean())
        ax.scatter(*xt.numpy().T, s=1, c="0.8")
        ax.quiver(*grid.numpy().T, *marginal_velocity(grid, t, points).numpy().T, color="tab:blue",
                  angles="xy", label="exact u_t")
        ax.quiver(*grid.numpy().T, *v_grid.numpy().T, color="tab:red", angles="xy", alpha=0.6, label="trained v_theta")
        ax.set(title=f"t = {t}: |v - u| / |u| = {scores[f'rel_error_t{t}']:.2f}", aspect="equal", xticks=[], yticks=[])
        ax.legend(loc="lower left", fontsize=7)
    fig.savefig(os.path.join(cfg.out, "marginal.png"), dpi=90, bbox_inches="tight")
    common.save_points(x1, os.path.join(cfg.out, "samples.png"), ref=points, title="Euler on the exact u_t, 100 steps")
    return common.finish(dataclasses.replace(cfg, steps=3000), scores, t0, "cpu", samples=x1)


# ----------------------------------------------------------------------------- training
def train(cfg, model, device, state=None):
    """Adam on the CFM loss for cfg.steps steps; state: a saved run to continue (--resume)."""
    points = cfg.data in common.POINT_DATA
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / cfg.steps)   # planned over --steps
    gen = torch.Generator().manual_seed(cfg.seed)                         # data, noise, t and the OT draws
    if not points:
        x_train, y_train = common.load_data(cfg, "train")
    history = []
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, model=model, opt=opt, sched=sched)
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "flow_matching", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):

            # x_1 ~ data (images to [-1, 1]; with --cond, labels dropped to null with probability eta)
            y = None
            if points:
                x1 = common.sample_2d(cfg.data, cfg.batch_size, gen).to(device)
            else:
                idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
                x1 = (x_train[idx] * 2 - 1).to(device)
                if cfg.cond:
                    y = y_train[idx].to(device)
                    drop = torch.rand(len(y), generator=gen).to(device) < cfg.p_uncond
                    y = torch.where(drop, torch.full_like(y, model.n_classes), y)   # the null token

            # x_0 ~ p_0 = N(0, I), paired with x_1 by the coupling
            x0 = torch.randn(x1.shape, generator=gen).to(device)
            if cfg.coupling == "ot":
                x0 = ot_pairs(x0, x1, gen)
            elif cfg.coupling == "corrupt":                               # p_{0,1} = p_{0|1}(x_0 | x_1) p_1(x_1)
                x0 = corrupt(x1) + 0.1 * x0                              # + 0.1 eps: p_0 has a density

            # t ~ U[0, 1], the CFM loss, one Adam step
            t = torch.rand(len(x1), generator=gen).to(device)
            loss = cfm_loss(model, x0, x1, t, y)
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
    cfg = common.parse_config(Config, argv, "flow_matching", __doc__)
    common.check(cfg.sample_steps > 0 and cfg.n_samples > 1 and cfg.width >= 8 and 0 <= cfg.p_uncond < 1,
                 "--sample-steps must be positive, --width >= 8, --n-samples >= 2 and --p-uncond in [0, 1)")
    common.check(cfg.nll_steps >= 0 and cfg.probes > 0, "--nll-steps must be >= 0 (0: no likelihood), --probes >= 1")
    common.check(not cfg.cond or cfg.data in common.IMAGE_DATA, "--cond needs labelled image data (e.g. --data digits)")
    common.check(cfg.guidance == 1.0 or cfg.cond, "--guidance needs --cond (a class-conditional model)")
    common.check(cfg.demo == "none" or not (cfg.sample_only or cfg.resume), "--demo writes no checkpoint: drop "
                 "--sample-only and --resume")
    if cfg.demo == "marginal":
        return marginal_demo(cfg)
    state = common.load_run(cfg, "flow_matching") if cfg.sample_only or cfg.resume else None   # flags from it
    common.check(cfg.coupling != "corrupt" or (cfg.data in common.IMAGE_DATA and not cfg.cond),
                 "--coupling corrupt restores images: it needs image data (e.g. --data digits) and no --cond")

    # the model: an MLP for 2-D data, a U-Net for images
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    points = cfg.data in common.POINT_DATA
    if points:
        model = MLPVelocity(cfg.width).to(device)
    else:
        x_train, y_train = common.load_data(cfg, "train")
        common.check(not cfg.cond or common.labelled(y_train), "--cond needs labelled data: put each class's images "
                     "in a subfolder of their own")
        k = int(y_train.max()) + 1 if cfg.cond else 0                     # classes
        model = UNetVelocity(cfg.width, k, x_train.shape[1], x_train.shape[-1]).to(device)

    # train, or load the trained model
    t0 = time.time()
    history = {}
    if cfg.sample_only:
        model.load_state_dict(state["model"])
        common.restore_rng(cfg, state)                                   # the training run's own samples
    else:
        history = {f"CFM loss ({cfg.coupling})": train(cfg, model, device, state)}
    train_seconds = time.time() - t0

    # samples (or restorations) and their metrics
    trajectory = []
    if cfg.coupling == "corrupt":
        x, scores = evaluate_restoration(cfg, model, device, trajectory)
    else:
        x, scores = evaluate(cfg, model, device, trajectory)

    # the likelihood by the continuity equation (not for guided or restoring flows: no p_0 = N(0, I) density)
    if cfg.nll_steps and not cfg.cond and cfg.coupling != "corrupt":
        scores.update(likelihood_2d(cfg, model, device) if points else bits_per_dim(cfg, model, device))

    # pictures; on 2-D data also the trajectories
    if not points:
        labels = torch.arange(len(x[:100])) % model.n_classes if cfg.cond else None   # evaluate() asks class i % k
        common.save_images(x[:100], os.path.join(cfg.out, "samples.png"), labels=labels)
    else:
        common.save_points(x[:2500], os.path.join(cfg.out, "samples.png"), ref=common.sample_2d(cfg.data, 2500),
                           title=f"{cfg.solver}, {cfg.sample_steps} steps")
        save_trajectories(cfg, model, device)
        if cfg.nll_steps and cfg.coupling != "corrupt":                   # density.png: p_theta beside p_data
            log_p = lambda x: log_likelihood(lambda z, t: velocity(model, z, t), x.to(device), cfg.nll_steps)
            common.save_density(log_p, lambda x: metrics.log_density_2d(cfg.data, x), "p_theta (continuity equation)",
                                os.path.join(cfg.out, "density.png"))
    if cfg.gif:
        save_gif(cfg, trajectory, os.path.join(cfg.out, "flow.gif"))
    scores["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, scores, t0, device, samples=x, history=history)


if __name__ == "__main__":
    common.run(main)
