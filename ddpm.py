r"""ddpm.py - denoising diffusion (Ho et al. 2020): the two algorithms, DDIM (Song et al. 2021) and
classifier-free guidance (Ho & Salimans 2021), with a small U-Net.

Lectures: 002 "Denoising Diffusion Probabilistic Models" (forward kernel, diffusion kernel, reverse process,
"Training and sampling algorithms", "Implementation", "Comments"); 000 Part B section 1 (closed form,
eps-prediction and the score, DDPM and DDIM samplers, classifier-free guidance); 000 section 5 (U-Net).
Run: `python ddpm.py` (digits), `python ddpm.py --device cuda`, `python ddpm.py --cond --guidance 2`,
`python ddpm.py --compare` (DDPM-1000, DDIM-50, DDIM-10 and naive ancestral-50), `--param eps` (Algorithm 1),
`--data color-digits`, `--data cifar10`, `--data folder --data-dir PATH` (colour images: docs/data.md).

Time: t in {1, ..., T}; arrays are indexed by t, index 0 meaning "no noise" (alpha_bar_0 = 1). ab = alpha_bar.
    schedule   beta_t linear from 1e-4 to 0.02 (002, --schedule linear), or cosine (default; 000 1.1):
               beta_t = 1 - f(t)/f(t-1) clipped at 0.999, f(t) = cos^2((t/T + 0.008)/1.008 pi/2); T = 1000;
               alpha_t = 1 - beta_t; alpha_bar_t = prod_{s<=t} alpha_s
    forward    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I)                 (002, forward process)
    kernel     q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)                               (002, diffusion kernel)
    training   t ~ U{1..T}, eps ~ N(0, I): minimize |eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t)|^2
    sampling   x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - ab_t) eps_theta) + sigma_t z  (Algorithm 2),
               sigma_t^2 = beta_t (default) or beta~_t = (1 - ab_{t-1})/(1 - ab_t) beta_t (--sigma beta-tilde)
    DDIM       x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_theta + sigma z on S of the T steps (000 1.4),
               x0_hat = (x_t - sqrt(1 - ab_t) eps_theta)/sqrt(ab_t), sigma from eta (Song et al. eq. 16)
    targets    --param (000 1.2): the U-Net predicts eps, x_0 (default) or v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0
               (000's v = alpha eps - sigma x) by an unweighted MSE; the samplers convert its output to eps_hat
    guidance   eps~ = (1 + w) eps_theta(x, t, y) - w eps_theta(x, t, null)  (000 1.5; w = 0: plain conditional);
               labels dropped to the null token with probability 0.1 per sample. flow_matching.py's w is this w + 1
Notation: x_0 is the data and x_T the noise (flow_matching.py writes x_0 for the noise, x_1 for the data).
The ancestral update is the posterior mean of q(x_{t-1} | x_t, x0_hat): without clipping exactly the slide's
formula (tested); --clip-x0 (default) clips x0_hat to [-1, 1] first, as Ho et al.'s code does. samples.png and
the metrics use Algorithm 2 on 100 of the T steps, jumping t -> s with alpha_t replaced by ab_t/ab_s ("naive"
skipping; all T with --sample-steps 1000); the last step adds no noise (z = 0 at t = 1, as Ho et al.).
Differences from the slides: the default U-Net predicts x_0 (one of 000 1.2's options), not eps (--param eps);
the default schedule is 000 1.1's cosine, not 002's linear (--schedule linear); results: docs/ddpm.md.
Slips: the slide writes sigma_t = 1 - alpha_t (Ho et al.: sigma_t^2 = beta_t = 1 - alpha_t). 002's forward-process
slide takes T = 2000 and beta_T = 0.01 (alpha_T = 1 - 1e-2); its "Comments" slide T = 1000 and beta_T = 0.02 (used).
The loss is the squared error's mean over pixels; pixels in [-1, 1] (002, "Comments"); samples use the EMA weights.
"""
import copy, dataclasses, math, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "dataset", common.IMAGE_DATA)
    steps: int = common.arg(5000, "training steps")
    batch_size: int = common.arg(64, "images per training step")
    lr: float = common.arg(1e-3, "Adam learning rate")
    T: int = common.arg(1000, "number of diffusion steps")
    schedule: str = common.arg("cosine", "beta schedule: cosine (000 1.1) or linear (002's slide)",
                               ["linear", "cosine"])
    width: int = common.arg(16, "U-Net base channels, a multiple of 8 for GroupNorm")
    attn: bool = common.arg(False, "self-attention at the lowest resolution (7x7; 8x8 for 32 and 64)")
    sampler: str = common.arg("ddpm", "sampler for samples.png and the metrics: ddpm (Algorithm 2's ancestral step) or "
                              "ddim", ["ddpm", "ddim"])
    sample_steps: int = common.arg(100, "S, sampling steps (ddpm with S < T: naive skipping); at most T unless given")
    eta: float = common.arg(0.0, "DDIM eta: 0 deterministic, 1 ancestral-like")
    sigma: str = common.arg("beta", "ancestral sigma_t^2", ["beta", "beta-tilde"])
    clip_x0: bool = common.arg(True, "clip the predicted x0 to [-1, 1] in the samplers")
    param: str = common.arg("x0", "what the U-Net predicts: x0, eps (the slide's Algorithm 1) or v = sqrt(ab) eps - "
                            "sqrt(1 - ab) x0", ["eps", "x0", "v"])
    cond: bool = common.arg(False, "class-conditional with classifier-free guidance")
    guidance: float = common.arg(0.0, "w: eps~ = (1 + w) eps(y) - w eps(null)")
    p_uncond: float = common.arg(0.1, "probability of dropping the label to the null token (per sample)")
    ema: float = common.arg(0.999, "largest EMA decay of the sampling weights; the decay at step t is "
                                   "min(ema, (1 + t) / (10 + t)), below 0.999 for t < 8990")
    grad_clip: float = common.arg(1.0, "gradient norm clipping threshold (> 0)")
    n_samples: int = common.arg(1000, "samples for the metrics")
    compare: bool = common.arg(False, "also evaluate ddpm-1000, ddim-50, ddim-10 and naive ancestral-50")
    bf16: bool = common.arg(False, "bf16 autocast for training (CUDA)")
    compile: bool = common.arg(False, "torch.compile the training model (EMA stays uncompiled)")
    gif: bool = common.arg(False, "also write denoising.gif: 8 chains from x_T to x_0, Algorithm 2 (top row) and "
                                  "DDIM-50 (bottom row) from the same x_T")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "T", "schedule", "width", "attn", "param", "cond", "image_size", "grey")

    def defaults(self, given):
        if "--sample-steps" not in given:
            self.sample_steps = min(self.sample_steps, self.T)              # --T 50 alone: all 50 steps


# ----------------------------------------------------------------------------- schedule and forward process
class Schedule:
    """alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s (002, "Forward process - Diffusion kernel"), in
    float64 (1 - ab_t / ab_s cancels badly in float32 at small t), indexed by t = 0..T (index 0: alpha_bar = 1, beta =
    0); sqrt_ab, sqrt_1m_ab in float32 on the device. kind: linear (002, "Comments") or cosine (000 1.1)."""
    def __init__(self, T=1000, kind="linear", device="cpu"):
        if kind == "linear":
            beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        else:                                                            # cosine (Nichol & Dhariwal 2021), s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
            beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.T = T
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.alpha = 1 - self.beta                                       # alpha_t = 1 - beta_t
        self.alpha_bar = torch.cumprod(self.alpha, 0)                    # alpha_bar_t = prod_{s=1..t} alpha_s
        self.sqrt_ab = self.alpha_bar.sqrt().float().to(device)
        self.sqrt_1m_ab = (1 - self.alpha_bar).sqrt().float().to(device)


def q_sample(sch, x0, t, eps):
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, a draw of q(x_t | x_0) (002, "Forward process - Diffusion kernel")."""
    shape = (-1,) + (1,) * (x0.dim() - 1)                                 # (B, 1, 1, 1)
    return sch.sqrt_ab[t].view(shape) * x0 + sch.sqrt_1m_ab[t].view(shape) * eps


# ----------------------------------------------------------------------------- the U-Net eps_theta(x_t, t, y)
def time_embedding(t, dim):
    """Sinusoidal embedding of (possibly fractional) times t (B,), as the transformer's positions (002)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]                            # (B, dim/2)
    return torch.cat([angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]                         # the time (and label) enters every block
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(min(8, c), c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).unbind(1)  # (B, C, HW) each
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), -1)      # (B, HW, HW)
        return x + self.out((v @ a.transpose(1, 2)).view(B, C, H, W))


class UNet(nn.Module):
    """28x28 -> 14 -> 7 and back, skip connections by concatenation (000 section 5), ResBlocks with GroupNorm,
    a sinusoidal time embedding (plus a class embedding with n_classes; index n_classes = the null token).
    Images (channels, size, size): 32 -> 16 -> 8 the same way; 64x64 has one more level at the top."""
    def __init__(self, width=16, attn=False, n_classes=0, channels=1, size=28):
        super().__init__()
        c1, c2, e = width, 2 * width, 4 * width
        self.width, self.n_classes, self.shape = width, n_classes, (channels, size, size)
        self.t_mlp = nn.Sequential(nn.Linear(width, e), nn.SiLU(), nn.Linear(e, e))
        self.label = nn.Embedding(n_classes + 1, e) if n_classes else None
        self.inp = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1, self.pool1 = ResBlock(c1, c1, e), nn.Conv2d(c1, c1, 3, 2, 1)       # 28 -> 14
        self.down2, self.pool2 = ResBlock(c1, c2, e), nn.Conv2d(c2, c2, 3, 2, 1)       # 14 -> 7
        self.mid1, self.mid2 = ResBlock(c2, c2, e), ResBlock(c2, c2, e)
        self.attn = Attention(c2) if attn else nn.Identity()
        self.up2 = ResBlock(2 * c2, c2, e)                                # 7 -> 14 after it
        self.up1 = ResBlock(c2 + c2, c1, e)                               # 14 -> 28 after it
        self.up0 = ResBlock(c1 + c1, c1, e)
        self.out = nn.Sequential(nn.GroupNorm(min(8, c1), c1), nn.SiLU(), nn.Conv2d(c1, channels, 3, padding=1))
        self.top = size == 64                                            # 64x64: one more level, 64 -> 32 and back
        if self.top:
            self.down_top, self.pool_top = ResBlock(c1, c1, e), nn.Conv2d(c1, c1, 3, 2, 1)
            self.up_top = ResBlock(c1 + c1, c1, e)

    def forward(self, x, t, y=None):
        emb = self.t_mlp(time_embedding(t, self.width))
        if self.label is not None:
            emb = emb + self.label(y if y is not None else torch.full_like(t, self.n_classes, dtype=torch.long))
        h = self.inp(x)
        if self.top:
            h_top = self.down_top(h, emb)                                 # (B, c1, 64, 64)
            h = self.pool_top(h_top)
        h0 = self.down1(h, emb)                                           # (B, c1, 28, 28)
        h1 = self.down2(self.pool1(h0), emb)                              # (B, c2, 14, 14)
        h2 = self.pool2(h1)                                               # (B, c2, 7, 7)
        h = self.mid2(self.attn(self.mid1(h2, emb)), emb)
        h = F.interpolate(self.up2(torch.cat([h, h2], 1), emb), scale_factor=2.0)      # (B, c2, 14, 14)
        h = F.interpolate(self.up1(torch.cat([h, h1], 1), emb), scale_factor=2.0)      # (B, c1, 28, 28)
        h = self.up0(torch.cat([h, h0], 1), emb)
        if self.top:
            h = self.up_top(torch.cat([F.interpolate(h, scale_factor=2.0), h_top], 1), emb)
        return self.out(h)


# ----------------------------------------------------------------------------- loss
def prediction_target(sch, x0, t, eps, param="eps"):
    r"""What the network learns to predict (000 1.2, "Network Parameterization Options"): eps (Ho et al. and the
    slide), x_0 (this script's default), or the velocity v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (000's
    v = alpha eps - sigma x with alpha = sqrt(ab_t), sigma = sqrt(1 - ab_t); Salimans & Ho 2022)."""
    if param == "eps":
        return eps
    if param == "x0":
        return x0
    shape = (-1,) + (1,) * (x0.dim() - 1)                                 # (B, 1, 1, 1)
    return sch.sqrt_ab[t].view(shape) * eps - sch.sqrt_1m_ab[t].view(shape) * x0


def diffusion_loss(model, sch, x0, y=None, p_uncond=0.1, param="eps"):
    """t ~ U{1..T}, eps ~ N(0, I), |eps - eps_theta(x_t, t)|^2 (002, "Training and sampling algorithms"), mean over
    pixels; --param x0 or v: that target instead (unweighted); labels dropped to null w.p. p_uncond (000 1.5)."""
    t = torch.randint(1, sch.T + 1, (len(x0),), device=x0.device)
    eps = torch.randn_like(x0)
    if y is not None:                                                    # classifier-free guidance training:
        drop = torch.rand(len(y), device=y.device) < p_uncond            # drop the label per sample
        y = torch.where(drop, torch.full_like(y, model.n_classes), y)
    return F.mse_loss(model(q_sample(sch, x0, t, eps), t, y), prediction_target(sch, x0, t, eps, param))


# ----------------------------------------------------------------------------- samplers
def eps_from_prediction(sch, x, t, out, param="eps"):
    r"""eps_hat from the network's output at time t, by x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps (000 1.2):
        x0:  eps_hat = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab)
        v:   eps_hat = sqrt(1 - ab) x_t + sqrt(ab) v_hat        (as ab + (1 - ab) = 1)."""
    if param == "eps":
        return out
    ab = float(sch.alpha_bar[t])
    if param == "x0":
        return (x - math.sqrt(ab) * out) / math.sqrt(1 - ab)
    return math.sqrt(1 - ab) * x + math.sqrt(ab) * out                   # v


def guided_eps(model, x, t, y, w, sch=None, param="eps"):
    """eps~ = (1 + w) eps(x, t, y) - w eps(x, t, null) (000 1.5); w = 0 (or no labels): eps(x, t, y). With --param
    x0 or v the outputs are combined first and then converted to eps: the same, as the conversion is affine and
    the weights (1 + w) and -w sum to 1."""
    tt = torch.full((len(x),), t, device=x.device)
    if y is None or w == 0:
        return eps_from_prediction(sch, x, t, model(x, tt, y), param)
    null = torch.full_like(y, model.n_classes)
    e = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))
    e_cond, e_null = e.chunk(2)
    return eps_from_prediction(sch, x, t, (1 + w) * e_cond - w * e_null, param)


def timesteps(T, S):
    """S + 1 times T = tau_S > ... > tau_1 > 0, evenly spaced (S = T: every step): DDIM's skipping (000 1.4)."""
    return [round(i * T / S) for i in range(S, -1, -1)]


def predict_x0(sch, x, t, eps, clip):
    """x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), the diffusion kernel solved for x_0 (000 1.4); clip: to
    the pixels' range [-1, 1]."""
    ab = float(sch.alpha_bar[t])
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    return x0.clamp(-1, 1) if clip else x0


def ancestral_step(sch, x, t, s, eps, z, sigma="beta", clip=True):
    r"""x_t -> x_s (s < t) with the posterior mean of q(x_s | x_t, x0_hat); for s = t - 1 and no clipping this is
    x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - ab_t) eps) + sigma_t z (002, "Training and sampling
    algorithms"; Algorithm 2 of Ho et al.)."""
    ab_t, ab_s = float(sch.alpha_bar[t]), float(sch.alpha_bar[s])      # python floats: float64 arithmetic
    a = ab_t / ab_s                                                       # alpha_t when s = t - 1
    x0 = predict_x0(sch, x, t, eps, clip)
    mean = (math.sqrt(ab_s) * (1 - a) / (1 - ab_t)) * x0 + (math.sqrt(a) * (1 - ab_s) / (1 - ab_t)) * x
    var = (1 - a) if sigma == "beta" else (1 - ab_s) / (1 - ab_t) * (1 - a)   # beta_t or beta~_t
    return mean + (math.sqrt(var) * z if s > 0 else 0)                   # no noise at the last step


def ddim_step(sch, x, t, s, eps, z, eta=0.0, clip=True):
    """x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps + sigma z, sigma from eta (000 1.4; Song et al. 2021)."""
    ab_t, ab_s = float(sch.alpha_bar[t]), float(sch.alpha_bar[s])
    x0 = predict_x0(sch, x, t, eps, clip)
    if clip:                                                             # eps consistent with the clipped x0
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    return math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma ** 2, 0.0)) * eps + sigma * z


@torch.no_grad()
def sample(model, sch, n, cfg, device, y=None, sampler=None, steps=None, trajectory=None):
    """n images in [-1, 1] from x_T ~ N(0, I); `trajectory` (a list) collects (t, x_t) from t = T on."""
    sampler, steps = sampler or cfg.sampler, steps or cfg.sample_steps
    x = torch.randn(n, *model.shape, device=device)
    ts = timesteps(sch.T, steps)
    if trajectory is not None:
        trajectory.append((sch.T, x.cpu()))
    for t, s in zip(ts[:-1], ts[1:]):
        eps = guided_eps(model, x, t, y, cfg.guidance, sch, cfg.param)
        z = torch.randn_like(x)
        x = ancestral_step(sch, x, t, s, eps, z, cfg.sigma, cfg.clip_x0) if sampler == "ddpm" else \
            ddim_step(sch, x, t, s, eps, z, cfg.eta, cfg.clip_x0)
        if trajectory is not None:
            trajectory.append((s, x.cpu()))
    return x


# ----------------------------------------------------------------------------- pictures
def save_forward(sch, x0, path):
    """The forward process destroying real images: x_t ~ q(x_t | x_0) at t = 0, T/4, T/2, 3T/4, T."""
    ts = [0, sch.T // 4, sch.T // 2, 3 * sch.T // 4, sch.T]
    eps = torch.randn_like(x0)
    rows = [q_sample(sch, x0, torch.full((len(x0),), t, device=x0.device), eps) for t in ts]
    common.save_images((torch.stack(rows, 1).flatten(0, 1) + 1) / 2, path, nrow=len(ts))   # (n * 5, C, S, S)


def save_chains_gif(ema, sch, cfg, device, path):
    """8 chains x_T -> x_0 of Algorithm 2 (every T/50-th x_t: 51 frames, top row) above DDIM-50's 51 x_t, both from
    the same x_T (seeded by --seed). Returns the two runs' x_0 (the last frame), in [-1, 1]."""
    chains = []
    y = torch.arange(8, device=device) % ema.n_classes if cfg.cond else None
    for sampler, steps in (("ddpm", cfg.T), ("ddim", 50)):
        torch.manual_seed(cfg.seed)                                       # the same x_T for both samplers
        trajectory = []
        sample(ema, sch, 8, cfg, device, y, sampler, steps, trajectory)
        chains.append([trajectory[round(k * steps / 50)][1] for k in range(51)])   # t = T, ..., 0
    frames = [common.image_frame((torch.cat([a, b]).clamp(-1, 1) + 1) / 2, nrow=8) for a, b in zip(*chains)]
    common.save_gif(frames, path)
    return chains[0][-1], chains[1][-1]


# ----------------------------------------------------------------------------- training
def train(model, ema, sch, cfg, x_train, y_train, device, state=None):
    """Algorithm 1 for cfg.steps steps; state: a saved run to continue (--resume)."""
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    net = torch.compile(model) if cfg.compile else model
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    history = {"loss": []}
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt=opt)
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "ddpm", every=500) as save:
        for step in range(start + 1, cfg.steps + 1):

            # x_0 ~ data, pixels in [-1, 1] (and labels, with --cond)
            idx = torch.randint(len(x_train), (cfg.batch_size,), generator=gen)
            x0 = (x_train[idx] * 2 - 1).to(device)
            y = y_train[idx].to(device) if cfg.cond else None

            # Algorithm 1's loss, one Adam step on the clipped gradient
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                loss = diffusion_loss(net, sch, x0, y, cfg.p_uncond, cfg.param)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()

            # the moving average of the weights (warmed up over the first steps), record, checkpoint
            common.ema_update(ema, model, step, cfg.ema)
            history["loss"].append(loss.item())
            progress(step, loss.item())
            save(step, lambda: dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                    history=history, rng=common.rng_states(gen)))
    return history


def evaluate(ema, sch, cfg, device, sampler, steps):
    """Samples (in [0, 1]), metrics and the number of network calls of one sampler."""
    t0 = time.time()
    y = None
    if cfg.cond:
        y = torch.arange(cfg.n_samples, device=device) % ema.n_classes
    x = torch.cat([sample(ema, sch, len(b), cfg, device, b if y is not None else None, sampler, steps)
                   for b in (y if y is not None else torch.zeros(cfg.n_samples)).split(500)]).cpu()
    x = (x.clamp(-1, 1) + 1) / 2
    m = metrics.image_metrics(x, cfg.data, labels=y.cpu() if y is not None else None, data_dir=cfg.data_dir,
                             out=cfg.out)
    calls = steps * (2 if cfg.cond and cfg.guidance else 1)
    return x, dict(m, network_calls=calls, sampling_seconds=round(time.time() - t0, 2)), y


def main(argv=None):
    cfg = common.parse_config(Config, argv, "ddpm", __doc__)
    state = common.load_run(cfg, "ddpm") if cfg.sample_only or cfg.resume else None  # flags from the checkpoint
    common.check(cfg.T > 1 and cfg.n_samples > 1 and cfg.grad_clip > 0, "--T must be > 1, --n-samples >= 2 and "
                 "--grad-clip must be positive (a norm threshold)")
    common.check(cfg.width >= 8 and cfg.width % 8 == 0,
                 f"--width must be a multiple of 8 (GroupNorm uses 8 groups), got {cfg.width}")
    common.check(not (cfg.compare or cfg.gif) or cfg.T >= 50, f"--compare and --gif run 50-step samplers: they need "
                 f"--T >= 50, got {cfg.T}")
    common.check(0 < cfg.sample_steps <= cfg.T, f"--sample-steps must be in 1..T={cfg.T}, got {cfg.sample_steps}")
    common.check(cfg.eta >= 0 and 0 <= cfg.p_uncond < 1 and 0 <= cfg.ema < 1,
                 "need --eta >= 0, 0 <= --p-uncond < 1, 0 <= --ema < 1")
    common.check(cfg.guidance == 0 or cfg.cond, "--guidance needs --cond (a class-conditional model)")

    # the schedule, the data, the U-Net and its moving average
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    sch = Schedule(cfg.T, cfg.schedule, device)
    x_train, y_train = common.load_data(cfg, "train")
    common.check(not cfg.cond or common.labelled(y_train), "--cond needs labelled data: put each class's images in a "
                 "subfolder of their own")
    k = int(y_train.max()) + 1 if cfg.cond else 0                         # classes
    model = UNet(cfg.width, cfg.attn, k, x_train.shape[1], x_train.shape[-1]).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)

    # train, or load the trained weights
    t0 = time.time()
    history = {}
    if state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
    else:
        history = train(model, ema, sch, cfg, x_train, y_train, device, state)
    train_seconds = time.time() - t0

    # samples by --sampler and their scores
    print(f"trained in {train_seconds:.0f}s; sampling {cfg.n_samples} with {cfg.sampler}-{cfg.sample_steps}")
    x, scores, y = evaluate(ema, sch, cfg, device, cfg.sampler, cfg.sample_steps)
    common.save_images(x[:100], os.path.join(cfg.out, "samples.png"), labels=y[:100].cpu() if y is not None else None)

    # pictures: the forward process, one chain of Algorithm 2 with all T steps, a row per guidance weight
    save_forward(sch, x_train[:4].to(device) * 2 - 1, os.path.join(cfg.out, "forward.png"))
    trajectory = []
    y3 = torch.tensor([min(3, k - 1)], device=device) if cfg.cond else None
    sample(ema, sch, 1, cfg, device, y3, "ddpm", cfg.T, trajectory)
    T = cfg.T
    keep = [x for t, x in trajectory if t in {0, T // 50, T // 20, T // 10, T // 4, T // 2, 3 * T // 4}]
    common.save_images((torch.cat(keep) + 1) / 2, os.path.join(cfg.out, "denoising.png"), nrow=len(keep))
    if cfg.cond:
        rows = []
        for w in (0.0, 1.0, 2.0, 4.0):
            g = dataclasses.replace(cfg, guidance=w)
            rows.append(sample(ema, sch, min(10, k), g, device, torch.arange(min(10, k), device=device)).cpu())
        common.save_images((torch.cat(rows).clamp(-1, 1) + 1) / 2, os.path.join(cfg.out, "guidance.png"))

    # --compare: the other samplers on the same weights
    if cfg.compare:
        table = {}
        for name, sampler, steps in (("ddpm-1000", "ddpm", cfg.T), ("ddim-50", "ddim", 50), ("ddim-10", "ddim", 10),
                                     ("ancestral-50-skipped", "ddpm", 50)):
            table[name] = evaluate(ema, sch, cfg, device, sampler, steps)[1]
            print(name, table[name])
        scores["compare"] = table

    # --gif: the chains as a film
    if cfg.gif:
        save_chains_gif(ema, sch, cfg, device, os.path.join(cfg.out, "denoising.gif"))
    scores["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, scores, t0, device, samples=x, history=history)


if __name__ == "__main__":
    common.run(main)
