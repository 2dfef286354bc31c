r"""flow_matching.py - conditional flow matching: probability paths, the CFM loss, ODE and SDE samplers,
minibatch OT and data coupling, classifier-free guidance; and the score side of diffusion: score matching,
Langevin dynamics, the marginalization trick.

Lecture: 002 "Flow Matching" (ODE, flow, Euler's scheme, probability path, conditional and marginal paths,
"Example: Gaussian conditional probability path", CFM loss, "The marginalization trick", "Data coupling",
"Guidance", "Classifier-free guidance") and "Diffusion models" (SDE, Euler-Maruyama, "Score function", "Langevin
dynamics", Theorem 3, "Score matching training for Gaussian probability path", and the second "Theorem 2" of 002,
the one of the diffusion part: the SDE with the same path p_t; the first is flow matching's).
Run: `python flow_matching.py` (checkerboard, ~2 CPU minutes), `--coupling both` (independent vs OT),
`--data digits` (a small U-Net), `--data digits --cond --guidance 2`, `--sampler sde --sigma 1`,
`--objective score` (score matching), `--objective both`, `--demo langevin` (no training, seconds),
`--demo marginal` (the marginalization trick on 8 points, seconds), `--data digits --coupling corrupt`.

    path       x_t = alpha_t x_1 + beta_t x_0, x_0 ~ N(0, I), x_1 ~ data: p_t(x | x_1) = N(alpha_t x_1, beta_t^2 I)
               linear: alpha_t = t, beta_t = 1 - t (default); cosine: alpha_t = sin(pi t/2), beta_t = cos(pi t/2)
    CFM loss   |v_theta(x_t, t) - (alpha'_t x_1 + beta'_t x_0)|^2, t ~ U[0, 1]  (linear: target x_1 - x_0)
    sampling   dx/dt = v_theta(x, t) from t = 0 to 1: Euler x_{t+h} = x_t + h v_theta(x_t, t) (002), or midpoint / Heun
    coupling   independent pairs (x_0, x_1) (default), or minibatch OT: pairs drawn from an entropic OT plan between
               the two minibatches (a log-domain Sinkhorn, below; Tong et al. 2023), meant to straighten the paths;
               or (--coupling corrupt, images) the slide's data coupling p_{0,1} = p_{0|1}(x_0 | x_1) p_1(x_1):
               x_0 = corrupt(x_1) + 0.1 eps, the lower half masked or a 2x blur (--corrupt), the same CFM loss;
               sampled from corrupted test images, it restores them (restoration.png, restoration_mae).
    guidance   labels dropped to a null token with probability eta = 0.1 per sample; sampling with
               v~ = (1 - w) v_theta(x | null) + w v_theta(x | y)  (002, "Classifier-free guidance"; w = 1: conditional),
               2 network calls per step when w != 1. Beware: ddpm.py's --guidance w means (1 + w) eps(y) - w eps(null),
               so its w is this w minus 1 (ddpm --guidance 1 = flow_matching --guidance 2).
    SDE        dX = [v_theta + sigma^2/2 s_theta] dt + sigma dW (002, Theorem 2), by Euler-Maruyama, with the score
               s_theta obtained from the velocity. For the Gaussian path E[x_1|x] = (x - beta E[x_0|x])/alpha and
               s(x) = -E[x_0|x]/beta, so v = alpha'/alpha x - beta (beta' - alpha' beta/alpha) s, i.e.
               s = (alpha' x - alpha v) / (beta (alpha beta' - alpha' beta));  linear path: s = (t v - x)/(1 - t).
    score      --objective score trains s_theta instead of v_theta, with the conditional score matching loss
               |s_theta(alpha_t z + beta_t eps, t) + eps / beta_t|^2, z = x_1, eps = x_0: --weight none as the slide
               writes it, but with t ~ U[0, 0.99], since the target's variance 1/beta_t^2 is infinite at t = 1; or
               (the default) --weight beta2, lambda(t) = beta_t^2: |beta_t s_theta + eps|^2, the eps-prediction
               loss, t ~ U[0, 1]. On the checkerboard (15000 steps, 20 Euler steps) none puts 0.73 of the samples
               on the squares and beta2 0.87, as the velocity does (our reading: the slide's weighting spends the
               network on the noisy large targets near t = 1 and leaves s imprecise at small t, where
               v = (x + (1 - t) s)/t, linear path, magnifies its error by 1/t). Sampled with v from s,
               v = alpha'/alpha x - beta (beta' - alpha' beta/alpha) s (the inverse of the conversion above), by the
               ODE or the SDE, from t = 0.05: at t = 0 (alpha = 0) the score is -x whatever the data, so v cannot be
               read from it there, and near it an Euler step of size h multiplies the error of s by about h/t (linear
               path: v = (x + (1 - t) s)/t); starting at 0.05 instead of 0.01 measured better on both the
               checkerboard and digits (README), though x ~ N(0, I) stands for p_0.05 there, an O(t0) approximation
               (mean 0.05 E[x_1] missing). --objective both trains one model of each (same network, same steps).
    marginal   --demo marginal: for data made of 8 points z_i the marginal field is exact,
               u_t(x) = sum_i w_i(x, t) u_t(x | z_i), w_i the posterior weight of z_i given x_t = x (002, "The
               marginalization trick"): Euler on it carries N(0, I) onto the points, and a v_theta trained with the
               CFM loss is drawn beside it (the tests check grad L_FM = grad L_CFM).
    Langevin   --demo langevin: X_{i+1} = X_i + eps grad log p(X_i) + sqrt(2 eps) xi_i on a 2-D mixture of two
               Gaussians with its exact score (002, "Langevin dynamics"), beside the naive ascent X + grad log p(X)
               (002, "Score function") and annealed Langevin (Song & Ermon 2019: beyond the slides).
Notation: x_0 is the noise and x_1 the data here (ddpm.py writes x_0 for the data).
Differences from the slides: the printed CFG training loss |v - alpha'_t eps + beta'_t x_1|^2 swaps the roles of
alpha' and beta' (and its linear-path form |v - eps - x_1|^2 follows that slip); the target used here is the
derivative of x_t, alpha'_t x_1 + beta'_t x_0 (tested against finite differences), x_1 - x_0 on the linear path.
F.mse_loss averages over the d coordinates: it is 1/d of the slide's squared norm (the same minimizer).
Score matching's default loss (--weight beta2) is the slide's times beta_t^2; the slide's own is --weight none.
The data coupling adds noise 0.1 eps to the corrupted image (not on the slide): without it p_0 has no density
(a masked half is constant) and a deterministic flow cannot spread one x_0 over its many possible x_1.
Slips on the Langevin slide: it writes the noise term sqrt(2 alpha) eps_i with "alpha a small constant", but p is
stationary only when alpha equals the step eps (written here sqrt(2 eps) xi_i, xi_i the noise, as eps is the step);
and it says x_K converges to "a sample from q(x)", meaning p(x). The note under Theorem 2 writes grad p_t(x|z) for
the conditional score grad log p_t(x|z).
The score is singular at t = 1 (beta = 0), so the SDE takes its last step from t = 1 - h, where it is finite,
and adds no noise there. The OT coupling draws one x_0 per x_1 from the plan (with replacement), as OT-CFM does,
rather than an exact permutation (exact assignment is too slow per step). On digits it shortens the pairs
very little: mean |x_0 - x_1|^2 over 20 batches of 64 was 1511 for independent pairs, 1503 for ours and 1455
for an exact assignment (in 784 dimensions noise is about equally far from every digit).
"""
import dataclasses, math, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import common


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("checkerboard", "dataset (2-D or images)", common.POINT_DATA + common.IMAGE_DATA)
    steps: int = common.arg(15000, "training steps (images: 4500 unless given)")
    batch_size: int = common.arg(512, "pairs per step (images: 64 unless given)")
    lr: float = common.arg(1e-3, "Adam learning rate, decayed linearly to 0")
    path: str = common.arg("linear", "Gaussian probability path", ["linear", "cosine"])
    coupling: str = common.arg("independent", "how x_0 and x_1 are paired ('both' trains one model each; corrupt: "
                               "x_0 = a corrupted x_1, images)", ["independent", "ot", "both", "corrupt"])
    corrupt: str = common.arg("mask", "--coupling corrupt: mask the lower half, or blur (2x down, up)",
                              ["mask", "blur"])
    solver: str = common.arg("euler", "ODE solver for samples.png", ["euler", "midpoint", "heun"])
    sample_steps: int = common.arg(20, "ODE (or SDE) steps for samples.png and the main metrics")
    sampler: str = common.arg("ode", "ode: dx = v dt; sde: Euler-Maruyama with the score from v", ["ode", "sde"])
    sigma: float = common.arg(0.5, "SDE diffusion coefficient")
    objective: str = common.arg("velocity", "train v_theta (CFM loss), s_theta (score matching), or one of each",
                                ["velocity", "score", "both"])
    weight: str = common.arg("beta2", "score matching: beta2 = beta_t^2 |s + eps/beta|^2 = |beta s + eps|^2 "
                             "(eps-prediction); none = the slide's |s + eps/beta|^2, with t <= 0.99", ["beta2", "none"])
    demo: str = common.arg("none", "langevin: Langevin dynamics on a 2-D mixture; marginal: the exact marginal field "
                           "of 8 points beside a trained v_theta", ["none", "langevin", "marginal"])
    cond: bool = common.arg(False, "class-conditional (images) with classifier-free guidance")
    guidance: float = common.arg(1.0, "w in (1 - w) v(x|null) + w v(x|y); 1 = plain conditional")
    p_uncond: float = common.arg(0.1, "eta: probability of dropping the label (per sample)")
    ch: int = common.arg(16, "U-Net base channels (images)")
    hidden: int = common.arg(256, "MLP hidden units (2-D)")
    n_samples: int = common.arg(2500, "samples for the metrics (images: 1000 unless given)")
    MODEL_FLAGS = ("data", "path", "objective", "corrupt", "cond", "ch", "hidden")

    def defaults(self, given):
        if self.data in common.IMAGE_DATA:
            self.steps = self.steps if "--steps" in given else 4500
            self.batch_size = self.batch_size if "--batch-size" in given else 64
            self.n_samples = self.n_samples if "--n-samples" in given else 1000


# ----------------------------------------------------------------------------- probability path
def path_coefficients(kind, t):
    """(alpha_t, beta_t, alpha'_t, beta'_t) of the Gaussian path, t a tensor in [0, 1]."""
    if kind == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    h = math.pi / 2
    return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)


def expand(c, x):
    return c.view(-1, *[1] * (x.dim() - 1))                              # (B,) -> (B, 1, ...)


def cfm_target(kind, x0, x1, t):
    """x_t = alpha_t x_1 + beta_t x_0 and its time derivative alpha'_t x_1 + beta'_t x_0 (the CFM regression target)."""
    a, b, da, db = (expand(c, x0) for c in path_coefficients(kind, t))
    return a * x1 + b * x0, da * x1 + db * x0


T_MAX = 0.99        # --weight none draws t ~ U[0, T_MAX]: the slide's 1/beta_t is infinite at t = 1
T0_SCORE = 0.05     # a score-trained model is sampled from t = T0_SCORE: v from s divides by alpha_t, 0 at t = 0


def csm_target(kind, x0, x1, t):
    """x_t = alpha_t x_1 + beta_t x_0 and the conditional score
        grad log p_t(x_t | x_1) = -(x_t - alpha_t x_1) / beta_t^2 = -x_0 / beta_t
    (002, "Score matching training for Gaussian probability path")."""
    a, b, _, _ = (expand(c, x0) for c in path_coefficients(kind, t))
    xt = a * x1 + b * x0
    return xt, -(xt - a * x1) / b ** 2


def csm_loss(kind, weight, s_theta, x0, x1, t, y=None):
    r"""Conditional score matching loss (002), eps = x_0 ~ N(0, I), z = x_1 ~ data:
        none:   |s_theta(alpha_t z + beta_t eps, t) + eps / beta_t|^2, t ~ U[0, T_MAX]  (the slide's loss; its variance
                grows as 1/beta_t^2, so t stops at T_MAX)
        beta2:  lambda(t) = beta_t^2: |beta_t s_theta + eps|^2, t ~ U[0, 1]   (the eps-prediction loss of ddpm.py)"""
    if weight == "none":
        t = t * T_MAX
    xt, target = csm_target(kind, x0, x1, t)
    s = s_theta(xt, t, y)
    if weight == "none":
        return F.mse_loss(s, target)                                     # |s_theta + eps / beta_t|^2 / d (mean)
    b = expand(path_coefficients(kind, t)[1], x0)
    return F.mse_loss(b * s, -x0)                                        # |beta_t s_theta + eps|^2 / d (mean)


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


CORRUPT_NOISE = 0.1    # --coupling corrupt: x_0 = corrupt(x_1) + 0.1 eps, so that p_0 has a density to transport


def corrupt(kind, x1):
    """The slide's "partial / noisy image" (002, "Data coupling"): images in [-1, 1] with the lower half set to
    black (mask, inpainting), or 2x downsampled by averaging and upsampled bilinearly (blur, super-resolution)."""
    if kind == "mask":
        x0 = x1.clone()
        x0[:, :, x1.shape[2] // 2:] = -1.0                               # (B, C, H, W): rows H/2.. to black
        return x0
    small = F.avg_pool2d(x1, 2)                                          # (B, C, H/2, W/2)
    return F.interpolate(small, size=x1.shape[2:], mode="bilinear", align_corners=False)


def ot_pairs(x0, x1, gen=None):
    """Minibatch OT coupling: for each x_1[j] draw x_0[i] with probability P_ij / b_j, P the entropic OT plan
    (cost |x_0 - x_1|^2 divided by its mean, eps = 0.05). Returns x_0 re-ordered to pair with x_1."""
    C = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()) ** 2
    P = sinkhorn_plan(C / C.mean(), 0.05)
    i = torch.multinomial(P.T.float().cpu() + 1e-30, 1, generator=gen)[:, 0]   # one row i per column j
    return x0[i.to(x0.device)]


# ----------------------------------------------------------------------------- velocity networks
def time_embedding(t, dim):
    """Sinusoidal embedding of real times t (B,), as the transformer's positions: (B, dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]                            # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], 1)


class MLPVelocity(nn.Module):
    """v_theta(x, t) (or s_theta with --objective score) for 2-D data: [x, sinusoidal(t)] -> 3 hidden SiLU layers
    -> R^2."""
    def __init__(self, hidden=256):
        super().__init__()
        self.n_classes = 0
        self.net = nn.Sequential(nn.Linear(2 + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

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
    """v_theta(x, t, y) (or s_theta) for images: 28x28 -> 14 -> 7 and back with skip connections by concatenation
    (000 section 5), t in [0, 1] embedded at 1000 t; with n_classes a label embedding, index n_classes = the null
    token."""
    def __init__(self, ch=16, n_classes=0):
        super().__init__()
        c1, c2, e = ch, 2 * ch, 4 * ch
        self.ch, self.n_classes = ch, n_classes
        self.t_mlp = nn.Sequential(nn.Linear(ch, e), nn.SiLU(), nn.Linear(e, e))
        self.label = nn.Embedding(n_classes + 1, e) if n_classes else None
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1, self.pool1 = ResBlock(c1, c1, e), nn.Conv2d(c1, c1, 3, 2, 1)       # 28 -> 14
        self.down2, self.pool2 = ResBlock(c1, c2, e), nn.Conv2d(c2, c2, 3, 2, 1)       # 14 -> 7
        self.mid1, self.mid2 = ResBlock(c2, c2, e), ResBlock(c2, c2, e)
        self.up2 = ResBlock(2 * c2, c2, e)                                # 7 -> 14 after it
        self.up1 = ResBlock(c2 + c2, c1, e)                               # 14 -> 28 after it
        self.up0 = ResBlock(c1 + c1, c1, e)
        self.out = nn.Sequential(nn.GroupNorm(min(8, c1), c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x, t, y=None):
        emb = self.t_mlp(time_embedding(1000 * t, self.ch))
        if self.label is not None:
            emb = emb + self.label(y if y is not None else torch.full_like(t, self.n_classes, dtype=torch.long))
        h0 = self.down1(self.inp(x), emb)                                 # (B, c1, 28, 28)
        h1 = self.down2(self.pool1(h0), emb)                              # (B, c2, 14, 14)
        h2 = self.pool2(h1)                                               # (B, c2, 7, 7)
        h = self.mid2(self.mid1(h2, emb), emb)
        h = F.interpolate(self.up2(torch.cat([h, h2], 1), emb), scale_factor=2.0)      # (B, c2, 14, 14)
        h = F.interpolate(self.up1(torch.cat([h, h1], 1), emb), scale_factor=2.0)      # (B, c1, 28, 28)
        return self.out(self.up0(torch.cat([h, h0], 1), emb))


def velocity(model, x, t, y=None, w=1.0):
    """v~ = (1 - w) v(x | null) + w v(x | y) (002, classifier-free guidance); plain v without labels or at w = 1.
    For a score model the same combination of s (its conversion to v is affine with weights 1 - w + w = 1)."""
    tt = torch.full((len(x),), float(t), device=x.device)
    if y is None or w == 1.0:
        return model(x, tt, y)
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, model.n_classes)]))
    v_cond, v_null = v.chunk(2)
    return (1 - w) * v_null + w * v_cond


def score_from_velocity(kind, x, t, v):
    """s = (alpha' x - alpha v) / (beta (alpha beta' - alpha' beta)) for the Gaussian path (derivation: docstring)."""
    a, b, da, db = path_coefficients(kind, torch.tensor(float(t), dtype=torch.float64))
    return (da * x - a * v) / (b * (a * db - da * b))


def velocity_from_score(kind, x, t, s):
    """v = alpha'/alpha x - beta (beta' - alpha' beta / alpha) s, the inverse of score_from_velocity (002: "the vector
    field and the score function can be converted one to the other"); singular at t = 0, where alpha = 0."""
    a, b, da, db = path_coefficients(kind, torch.tensor(float(t), dtype=torch.float64))
    return da / a * x - b * (db - da * b / a) * s


# ----------------------------------------------------------------------------- samplers
@torch.no_grad()
def sample(net, x, steps, solver="euler", sampler="ode", sigma=0.0, kind="linear", gen=None, trajectory=None,
           objective="velocity", t0=None):
    """Integrate from t = t0 to 1 in `steps` steps; net(x, t) -> v_theta, or s_theta with objective 'score' (then
    v comes from s, and t0 must be > 0; by default 0 for v, T0_SCORE for s). Returns x_1 and the number of network
    calls."""
    t0 = t0 if t0 is not None else (T0_SCORE if objective == "score" else 0.0)
    vfield = net if objective == "velocity" else lambda z, t: velocity_from_score(kind, z, t, net(z, t))
    h = (1.0 - t0) / steps
    calls = 0
    for k in range(steps):
        t = t0 + k * h
        out = net(x, t)
        v = out if objective == "velocity" else velocity_from_score(kind, x, t, out)
        calls += 1
        if sampler == "sde":                                             # Euler-Maruyama (002, "Simulating a SDE")
            s = out if objective == "score" else score_from_velocity(kind, x, t, v)
            drift = v + sigma ** 2 / 2 * s                               # v + sigma^2/2 grad log p_t (Theorem 2)
            noise = torch.randn(x.shape, generator=gen).to(x.device) if k < steps - 1 else 0   # none on the last step
            x = x + h * drift + sigma * math.sqrt(h) * noise
        elif solver == "euler":
            x = x + h * v                                                # x_{t+h} = x_t + h v(x_t, t)
        elif solver == "midpoint":
            x = x + h * vfield(x + h / 2 * v, t + h / 2)
            calls += 1
        else:                                                            # Heun: average of the two slopes
            x_e = x + h * v
            x = x + h / 2 * (v + vfield(x_e, t + h))
            calls += 1
        if trajectory is not None:
            trajectory.append(x.cpu())
    return x, calls


# ----------------------------------------------------------------------------- metrics and pictures
def support_frac(x):
    """Fraction of 2-D samples on the checkerboard's 8 squares: |x|, |y| <= 4 and floor(x/2) + floor(y/2) even."""
    cells = torch.floor(x / 2)
    inside = (x.abs() <= 4).all(1) & ((cells[:, 0] + cells[:, 1]) % 2 == 0)
    return float(inside.float().mean())


def point_scores(cfg, x):
    n = min(len(x), 2500)                                                # as many fresh data points as samples
    m = {"mmd": common.mmd(x[:n], common.sample_2d(cfg.data, n, torch.Generator().manual_seed(99)))}
    return dict(m, support_frac=support_frac(x)) if cfg.data == "checkerboard" else m


def save_path_and_field(cfg, model, device, out):
    """path.png: the marginal path p_t at t = 0, 1/4, 1/2, 3/4, 1 (exact samples alpha_t x_1 + beta_t x_0, 002's
    figure); field.png: the network's arrows at the same times (v_theta, or s_theta for a score model)."""
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    x1 = common.sample_2d(cfg.data, 5000)
    x0 = torch.randn(5000, 2)
    fig, fig2 = Figure(figsize=(15, 3)), Figure(figsize=(15, 3))
    g = torch.linspace(-4.5, 4.5, 19)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)     # (361, 2)
    for ax, ax2, t in zip(fig.subplots(1, 5), fig2.subplots(1, 5), ts):
        xt, _ = cfm_target(cfg.path, x0, x1, torch.full((5000,), t))
        ax.hist2d(*xt.numpy().T, bins=80, range=[[-5, 5], [-5, 5]], cmap="viridis")
        with torch.no_grad():
            v = velocity(model, grid.to(device), t).cpu()
        ax2.quiver(*grid.numpy().T, *v.numpy().T, angles="xy")
        for a in (ax, ax2):
            a.set(title=f"t = {t}", aspect="equal", xticks=[], yticks=[])
    fig.savefig(os.path.join(out, "path.png"), dpi=90, bbox_inches="tight")
    fig2.savefig(os.path.join(out, "field.png"), dpi=90, bbox_inches="tight")


def save_trajectories(traj, path):
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    paths = torch.stack(traj)[:, :300].numpy()                          # (steps + 1, 300, 2)
    ax.plot(paths[:, :, 0], paths[:, :, 1], c="0.5", lw=0.4, alpha=0.6)
    ax.scatter(*paths[0].T, s=3, c="tab:blue", label="x_0 ~ N(0, I)")
    ax.scatter(*paths[-1].T, s=3, c="tab:red", label="x_1")
    ax.set_aspect("equal")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


def evaluate_restoration(cfg, model, device):
    """--coupling corrupt: corrupt --n-samples test images, integrate dx/dt = v_theta from them (t = 0) to t = 1, and
    compare with the clean images: mean absolute pixel error (pixels in [0, 1]) of the corrupted and of the
    restored images, and the image metrics of the restorations (class_accuracy: against the clean image's label).
    restoration.png: one column per image; rows x_0, x_t at t = 1/4, 1/2, 3/4, the restoration x_1, the clean image."""
    x_test, y_test = common.load_images(cfg.data, "test", cfg.data_dir)
    clean = x_test[:cfg.n_samples] * 2 - 1                               # (N, 1, 28, 28) in [-1, 1]
    gen = torch.Generator().manual_seed(1)
    x0 = corrupt(cfg.corrupt, clean) + CORRUPT_NOISE * torch.randn(clean.shape, generator=gen)
    model.eval()
    field = lambda x, t: velocity(model, x.to(device), t).cpu()
    restored = []
    for i in range(0, len(x0), 500):
        xb, calls = sample(field, x0[i:i + 500], cfg.sample_steps, cfg.solver)
        restored.append(xb)
    restored = torch.cat(restored)
    traj = [x0[:10]]
    sample(field, x0[:10], cfg.sample_steps, cfg.solver, trajectory=traj)
    keep = [traj[0]] + [traj[round(f * cfg.sample_steps)] for f in (0.25, 0.5, 0.75, 1.0)] + [clean[:10]]
    to01 = lambda x: (x.clamp(-1, 1) + 1) / 2
    common.save_images(to01(torch.cat(keep)), os.path.join(cfg.out, "restoration.png"))
    m = common.image_metrics(to01(restored), cfg.data, labels=y_test[:cfg.n_samples], data_dir=cfg.data_dir,
                             out=cfg.out)
    m.update(corrupted_mae=float((to01(x0) - to01(clean)).abs().mean()),
             restoration_mae=float((to01(restored) - to01(clean)).abs().mean()), network_calls=calls)
    return to01(restored), m


def compare_objectives(cfg, models, device):
    """--objective both: the velocity-trained and the score-trained model, each sampled by the ODE and by the SDE
    (--sigma) with --sample-steps steps; metrics by 'objective/sampler', pictures in objectives.png."""
    table, pictures = {}, []
    for n, model in models.items():
        for sampler in ("ode", "sde"):
            x, m = evaluate(cfg, model, device, cfg.solver, cfg.sample_steps, sampler, objective=objective_of(n))
            table[f"{objective_of(n)}/{sampler}"] = m
            pictures.append((f"{objective_of(n)}-trained, {sampler}", x))
    path = os.path.join(cfg.out, "objectives.png")
    if cfg.data in common.IMAGE_DATA:                                    # two rows of 10 per model and sampler
        common.save_images(torch.cat([x[:20] for _, x in pictures]), path)
        return table
    fig = Figure(figsize=(16, 4))
    ref = common.sample_2d(cfg.data, 2500)
    for ax, (title, x) in zip(fig.subplots(1, len(pictures)), pictures):
        ax.scatter(*ref.numpy().T, s=1, c="0.7")
        ax.scatter(*x[:2500].numpy().T, s=1, c="tab:blue")
        ax.set(xlim=(-5, 5), ylim=(-5, 5), aspect="equal", title=title, xticks=[], yticks=[])
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return table


# ----------------------------------------------------------------------------- training
def run_names(cfg):
    """The models one command trains: a velocity model is named by its coupling, the score model 'score'."""
    if cfg.coupling == "both":
        return ["independent", "ot"]
    if cfg.objective == "both":
        return ["independent", "score"]
    return ["score"] if cfg.objective == "score" else [cfg.coupling]


def objective_of(name):
    return "score" if name == "score" else "velocity"


def train(cfg, name, model, device, runs, names):
    r"""Trains one model for cfg.steps steps: v_theta with the coupling `name`, or s_theta if name is 'score';
    returns the loss history. runs: {name: its saved state}, what the checkpoint holds for this run (names: all
    the models it trains); a model found in runs is continued (--resume)."""
    coupling = "independent" if name == "score" else name
    points = cfg.data in common.POINT_DATA
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / cfg.steps)   # planned over --steps
    gen = torch.Generator().manual_seed(cfg.seed)                         # data, noise, t and the OT draws
    if not points:
        x_train, y_train = common.load_images(cfg.data, "train", cfg.data_dir)
    history = []
    start = 0
    if name in runs:                                                     # --resume: continue the saved run
        history, start = common.resume(runs[name], gen, model=model, opt=opt, sched=sched)

    def state():                                                         # saved: this model beside the others
        runs[name] = dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                          history=history, step=step, rng=common.rng_states(gen))
        least = min(runs[n]["step"] if n in runs else 0 for n in names)   # the run's step: its least trained model
        return {"runs": runs, "rng": runs[name]["rng"], "step": least}
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "flow_matching", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):
            y = None
            if points:
                x1 = common.sample_2d(cfg.data, cfg.batch_size, gen).to(device)
            else:
                idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
                x1 = (x_train[idx] * 2 - 1).to(device)                    # pixels to [-1, 1]
                if cfg.cond:                                              # drop labels to null, per sample
                    y = y_train[idx].to(device)
                    drop = torch.rand(len(y), generator=gen).to(device) < cfg.p_uncond
                    y = torch.where(drop, torch.full_like(y, 10), y)
            x0 = torch.randn(x1.shape, generator=gen).to(device)          # x_0 ~ p_0 = N(0, I)
            if coupling == "ot":
                x0 = ot_pairs(x0, x1, gen)
            elif coupling == "corrupt":                                   # p_{0,1} = p_{0|1}(x_0 | x_1) p_1(x_1)
                x0 = corrupt(cfg.corrupt, x1) + CORRUPT_NOISE * x0
            t = torch.rand(len(x1), generator=gen).to(device)            # t ~ U[0, 1]
            if name == "score":
                loss = csm_loss(cfg.path, cfg.weight, model, x0, x1, t, y)
            else:
                xt, target = cfm_target(cfg.path, x0, x1, t)
                loss = F.mse_loss(model(xt, t, y), target)   # |v_theta(x_t, t) - (alpha' x_1 + beta' x_0)|^2 / d
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            history.append(loss.item())
            progress(step, loss.item())
            save(step, state)
    return history


def evaluate(cfg, model, device, solver, steps, sampler="ode", gen_seed=1, objective="velocity"):
    """Samples x_1 (2-D points, or images in [0, 1]) and their metrics for one solver and step count; a score model
    (objective 'score') is integrated from t = T0_SCORE (sample's default)."""
    gen, points = torch.Generator().manual_seed(gen_seed), cfg.data in common.POINT_DATA
    y = torch.arange(cfg.n_samples, device=device) % 10 if cfg.cond else None
    shape = (cfg.n_samples, 2) if points else (cfg.n_samples, 1, 28, 28)
    model.eval()
    x, calls = [], 0
    for i in range(0, cfg.n_samples, 500):
        yb = y[i:i + 500] if y is not None else None
        x0 = torch.randn((min(500, cfg.n_samples - i),) + shape[1:], generator=gen).to(device)
        xb, calls = sample(lambda x, t: velocity(model, x, t, yb, cfg.guidance), x0, steps, solver, sampler,
                           cfg.sigma, cfg.path, gen, objective=objective)
        x.append(xb.cpu())
    x = torch.cat(x)
    calls *= 2 if cfg.cond and cfg.guidance != 1.0 else 1               # guidance: v(x|y) and v(x|null) per call
    if points:
        return x, dict(point_scores(cfg, x), network_calls=calls)
    x = (x.clamp(-1, 1) + 1) / 2
    m = common.image_metrics(x, cfg.data, labels=y.cpu() if y is not None else None, data_dir=cfg.data_dir,
                             out=cfg.out)
    return x, dict(m, network_calls=calls)


# ----------------------------------------------------------------------------- Langevin dynamics (--demo langevin)
def mixture_score(x, means, var, weights):
    """grad log p(x) of the mixture p = sum_k w_k N(mu_k, var I) (002, "Score function"): sum_k r_k(x) (mu_k - x) / var,
    r_k the posterior weight of component k at x."""
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)                   # (N, K) squared distances
    r = torch.softmax(-d2 / (2 * var) + weights.log()[None], 1)         # (N, K) responsibilities
    return (r[:, :, None] * (means[None] - x[:, None])).sum(1) / var


def langevin(score, x, eps, n_steps, gen=None, trajectory=None):
    """X_{i+1} = X_i + eps grad log p(X_i) + sqrt(2 eps) xi_i, xi_i ~ N(0, I) (002, "Langevin dynamics"; the slide
    writes sqrt(2 alpha): p is stationary only for alpha = eps, see the docstring)."""
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
    with variance var + sigma^2, and the step is eps (var + sigma^2) / var, as large as p_sigma's scale allows."""
    for sigma in sigmas:
        v = var + sigma ** 2
        x = langevin(lambda z: mixture_score(z, means, v, weights), x, eps * v / var, n_steps, gen)
    return x


def near_first(x, means):
    """Fraction of the points nearer to mu_1 than to mu_2: the weight that the samples give mode 1."""
    return float(((x - means[0]).norm(dim=1) < (x - means[1]).norm(dim=1)).float().mean())


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
    exact = {}
    for name, means in (("near", near), ("far", far)):                  # exact samples of p: the reference
        k = torch.multinomial(w, n, replacement=True, generator=gen)
        exact[name] = means[k] + torch.randn(n, 2, generator=gen)
    score_near = lambda z: mixture_score(z, near, 1.0, w)
    traj = [4 * torch.randn(n, 2, generator=gen)]                        # x_0 ~ N(0, 4^2 I), then every X_i
    traj_ascent = [4 * torch.randn(n, 2, generator=gen)]
    x_near = langevin(score_near, traj[0], eps, 1000, gen, traj)
    x_ascent = naive_ascent(score_near, traj_ascent[0], 20, traj_ascent)
    x_far = langevin(lambda z: mixture_score(z, far, 1.0, w), 4 * torch.randn(n, 2, generator=gen), eps, 1000, gen)
    sigmas = [10 * 0.01 ** (i / 19) for i in range(20)]                  # 20 levels from 10 down to 0.1
    x_annealed = annealed_langevin(far, 1.0, w, 4 * torch.randn(n, 2, generator=gen), sigmas, eps, 50, gen)
    metrics = {"near_mode1_frac": {"exact": near_first(exact["near"], near), "langevin": near_first(x_near, near)},
               "far_mode1_frac": {"exact": near_first(exact["far"], far), "langevin": near_first(x_far, far),
                                  "annealed_langevin": near_first(x_annealed, far)},
               "ascent_mean_dist_to_mode": float(torch.cdist(x_ascent, near).amin(1).mean()),
               "mmd_near": common.mmd(x_near, exact["near"]), "mmd_far_langevin": common.mmd(x_far, exact["far"]),
               "mmd_far_annealed": common.mmd(x_annealed, exact["far"])}
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
    m = metrics["far_mode1_frac"]
    for ax, x, title in ((axes[2], x_far, f"far modes, Langevin: {m['langevin']:.2f} in mode 1"),
                         (axes[3], x_annealed, f"annealed Langevin: {m['annealed_langevin']:.2f} in mode 1")):
        ax.scatter(*exact["far"][:1000].numpy().T, s=2, c="0.7", label=f"p: {m['exact']:.2f} in mode 1")
        ax.scatter(*x[:1000].numpy().T, s=2, c="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    for ax in axes:
        ax.set(xlim=(-9, 9), ylim=(-9, 9), aspect="equal")
    fig.savefig(os.path.join(cfg.out, "langevin.png"), dpi=90, bbox_inches="tight")
    common.save_points(x_near, os.path.join(cfg.out, "samples.png"), ref=exact["near"], title="Langevin samples")
    return common.finish(dataclasses.replace(cfg, steps=0), metrics, t0, "cpu", samples=x_near)   # nothing trained


# ----------------------------------------------------------------------------- marginalization trick (--demo marginal)
def marginal_velocity(kind, x, t, points):
    r"""The exact marginal field of data made of the points z_i (equal weights) on the Gaussian path (002, "The
    marginalization trick"): u_t(x) = sum_i w_i(x, t) u_t(x | z_i), with
        u_t(x | z) = alpha'_t z + beta'_t (x - alpha_t z) / beta_t     (the conditional field, x_0 = (x - alpha z)/beta)
        w_i(x, t) = N(x; alpha_t z_i, beta_t^2 I) / sum_j N(x; alpha_t z_j, beta_t^2 I)   (a softmax over i).
    x (N, d); t in [0, 1), a float or one per row (N,)."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))                 # (N,)
    a, b, da, db = (c.view(-1, 1, 1) for c in path_coefficients(kind, t))   # (N, 1, 1) each
    d2 = ((x[:, None, :] - a * points[None]) ** 2).sum(-1)              # (N, n) squared distances to alpha z_i
    w = torch.softmax(-d2 / (2 * b[:, :, 0] ** 2), 1)                    # (N, n) posterior weights of the z_i
    u = da * points[None] + db * (x[:, None, :] - a * points[None]) / b  # (N, n, d) conditional fields
    return (w[:, :, None] * u).sum(1)


MARGINAL_STEPS = 3000  # training steps of the demo's v_theta


def marginal_demo(cfg):
    """8 points on a circle of radius 3: Euler integration of the exact u_t from N(0, I); a v_theta trained with the
    CFM loss on them (MARGINAL_STEPS steps), drawn beside u_t at t = 0.25, 0.5, 0.75, 0.9 (marginal.png)."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    common.seed_all(cfg.seed)                                            # v_theta's initial weights
    os.makedirs(cfg.out, exist_ok=True)
    angles = torch.arange(8) * 2 * math.pi / 8
    points = 3 * torch.stack([angles.cos(), angles.sin()], 1)           # (8, 2)
    x0 = torch.randn(cfg.n_samples, 2, generator=gen)
    x1, _ = sample(lambda x, t: marginal_velocity(cfg.path, x, t, points), x0, 100)
    to_point = torch.cdist(x1, points).amin(1)                           # distance of each endpoint to its nearest z_i
    model = MLPVelocity(128)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(MARGINAL_STEPS):                                      # the CFM loss on the 8 points
        z = points[torch.randint(8, (256,), generator=gen)]
        t = torch.rand(256, generator=gen)
        xt, target = cfm_target(cfg.path, torch.randn(256, 2, generator=gen), z, t)
        loss = F.mse_loss(model(xt, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    metrics = {"endpoint_to_point_mean": float(to_point.mean()), "endpoint_to_point_max": float(to_point.max())}
    fig = Figure(figsize=(16, 4))
    g = torch.linspace(-4, 4, 17)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)     # (289, 2)
    for ax, t in zip(fig.subplots(1, 4), (0.25, 0.5, 0.75, 0.9)):
        xt = cfm_target(cfg.path, torch.randn(2000, 2, generator=gen), points[torch.randint(8, (2000,), generator=gen)],
                        torch.full((2000,), t))[0]                       # samples of p_t, where the field matters
        u = marginal_velocity(cfg.path, xt, t, points)
        with torch.no_grad():
            v = model(xt, torch.full((2000,), t))
        metrics[f"rel_error_t{t}"] = float((v - u).norm(dim=1).mean() / u.norm(dim=1).mean())
        ax.scatter(*xt.numpy().T, s=1, c="0.8")
        ax.quiver(*grid.numpy().T, *marginal_velocity(cfg.path, grid, t, points).numpy().T, color="tab:blue",
                  angles="xy", label="exact u_t")
        with torch.no_grad():
            ax.quiver(*grid.numpy().T, *model(grid, torch.full((289,), t)).numpy().T, color="tab:red", angles="xy",
                      alpha=0.6, label="trained v_theta")
        ax.set(title=f"t = {t}: |v - u| / |u| = {metrics[f'rel_error_t{t}']:.2f}", aspect="equal", xticks=[], yticks=[])
        ax.legend(loc="lower left", fontsize=7)
    fig.savefig(os.path.join(cfg.out, "marginal.png"), dpi=90, bbox_inches="tight")
    common.save_points(x1, os.path.join(cfg.out, "samples.png"), ref=points, title="Euler on the exact u_t, 100 steps")
    return common.finish(dataclasses.replace(cfg, steps=MARGINAL_STEPS), metrics, t0, "cpu", samples=x1)


def main(argv=None):
    cfg = common.parse_config(Config, argv, "flow_matching", __doc__)
    common.check(cfg.sample_steps > 0 and cfg.n_samples > 1 and cfg.hidden > 0 and cfg.ch >= 8,
                 "--sample-steps and --hidden must be positive, --n-samples >= 2, --ch >= 8")
    common.check(cfg.sigma >= 0 and 0 <= cfg.p_uncond < 1, "--sigma must be >= 0 and --p-uncond in [0, 1)")
    common.check(not cfg.cond or cfg.data in common.IMAGE_DATA, "--cond needs labelled image data (e.g. --data digits)")
    common.check(cfg.guidance == 1.0 or cfg.cond, "--guidance needs --cond (a class-conditional model)")
    common.check(cfg.sampler == "ode" or cfg.coupling == "independent",
                 "--sampler sde needs --coupling independent: the score is recovered from the velocity by a formula "
                 "that holds only when x_0 and x_1 are independent (OT-coupled pairs are not)")
    common.check(cfg.objective == "velocity" or cfg.coupling == "independent",
                 "--objective score or both needs --coupling independent: the score target -x_0/beta_t is that of "
                 "p_t(x | x_1) = N(alpha_t x_1, beta_t^2 I), which needs x_0 independent of x_1")
    common.check(cfg.demo == "none" or not (cfg.sample_only or cfg.resume), "--demo writes no checkpoint: drop "
                 "--sample-only and --resume")
    if cfg.demo == "langevin":
        return langevin_demo(cfg)
    if cfg.demo == "marginal":
        return marginal_demo(cfg)
    state = common.load_run(cfg, "flow_matching") if cfg.sample_only or cfg.resume else None   # flags from it
    names = run_names(cfg)
    common.check(cfg.coupling != "corrupt" or (cfg.data in common.IMAGE_DATA and not cfg.cond),
                 "--coupling corrupt restores images: it needs image data (e.g. --data digits) and no --cond")
    runs = state["runs"] if state else {}
    common.check(not cfg.sample_only or all(n in runs for n in names),
                 f"the checkpoint in {cfg.out} holds no model for --coupling {cfg.coupling} --objective "
                 f"{cfg.objective}: train it first")
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    points = cfg.data in common.POINT_DATA
    t0 = time.time()
    models = {n: (MLPVelocity(cfg.hidden) if points else UNetVelocity(cfg.ch, 10 if cfg.cond else 0)).to(device)
              for n in names}
    histories = {}
    for n in names:
        if cfg.sample_only:
            models[n].load_state_dict(runs[n]["model"])
        else:
            loss_name = f"CSM loss (score, weight {cfg.weight})" if n == "score" else f"CFM loss ({n})"
            histories[loss_name] = train(cfg, n, models[n], device, runs, names)
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
    train_seconds = time.time() - t0
    model = models[names[0]]
    if cfg.coupling == "corrupt":
        x, metrics = evaluate_restoration(cfg, model, device)
    else:
        x, metrics = evaluate(cfg, model, device, cfg.solver, cfg.sample_steps, cfg.sampler,
                              objective=objective_of(names[0]))
    if not points:
        labels = torch.arange(len(x[:100])) % 10 if cfg.cond else None           # evaluate() asks class i % 10
        common.save_images(x[:100], os.path.join(cfg.out, "samples.png"), labels=labels)
    else:
        common.save_points(x[:2500], os.path.join(cfg.out, "samples.png"), ref=common.sample_2d(cfg.data, 2500),
                           title=f"{cfg.sampler} {cfg.solver}, {cfg.sample_steps} steps")
        traj = [torch.randn(300, 2, generator=torch.Generator().manual_seed(5))]
        field = lambda z, t: velocity(model, z.to(device), t).cpu()
        sample(field, traj[0], cfg.sample_steps, cfg.solver, trajectory=traj, objective=objective_of(names[0]),
               kind=cfg.path)
        save_trajectories(traj, os.path.join(cfg.out, "trajectories.png"))
        save_path_and_field(cfg, model, device, cfg.out)
        table = {}
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for n in names:                                                  # quality vs network calls
            for solver in ("euler", "midpoint", "heun"):
                rows = [evaluate(cfg, models[n], device, solver, k, objective=objective_of(n))[1]
                        for k in (1, 2, 4, 8, 20, 100)]
                table[f"{n}/{solver}"] = {str(k): r for k, r in zip((1, 2, 4, 8, 20, 100), rows)}
                calls = [r["network_calls"] for r in rows]
                ax.loglog(calls, [max(r["mmd"], 1e-5) for r in rows], "o-", label=f"{n}, {solver}")
        ax.set(xlabel="network calls (NFE)", ylabel="MMD^2 to data")
        ax.legend(fontsize=7)
        fig.savefig(os.path.join(cfg.out, "nfe.png"), dpi=100, bbox_inches="tight")
        metrics["by_solver"] = table
    if cfg.objective == "both":
        metrics["by_objective"] = compare_objectives(cfg, models, device)
    metrics["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, metrics, t0, device, samples=x, history=histories)


if __name__ == "__main__":
    common.run(main)
