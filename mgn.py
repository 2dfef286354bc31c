r"""mgn.py - monotone gradient networks (Chaudhari, Pranav & Moura 2023, 2025): networks g = grad phi with phi
convex by construction, used to learn gradients of convex functions and optimal transport (Brenier) maps.

Lecture: 001 "Final project - Learning Gradients of Convex Functions with Monotone Gradient Networks": its
experiments are the --task values (docs/mgn.md sets its numbers beside ours); experiment 4, colorization (001:
CIFAR-10, grey -> RGB), is --task colorize on a photograph's pixels, or with --data on the pixels of an image
dataset (color-digits, cifar10, a folder). 000 Part B section 2 (optimal transport).
Run: `python mgn.py --task gradient|ot-gaussian|ot-banana|generate|recolor|colorize [--net cmgn|mmgn]`.

C-MGN (cascaded), one weight W (h, d) shared by all layers, sigma = tanh (nondecreasing) everywhere:
    z_0 = W x + b_0,   z_l = W x + sigma(z_{l-1}) + b_l  (l = 1..L-1),   g(x) = W^T sigma(z_{L-1}) + V^T V x + b_L
  Jacobian. With D_l = diag sigma'(z_{l-1}) >= 0 (D_L for the output): dz_0/dx = W, dz_l/dx = W + D_l dz_{l-1}/dx,
  so dz_{L-1}/dx = (I + D_{L-1} + D_{L-1} D_{L-2} + ... + D_{L-1}...D_1) W and
    J_g(x) = W^T D_L (I + D_{L-1} + D_{L-1} D_{L-2} + ...) W + V^T V = W^T Delta W + V^T V,
  where Delta is a product and sum of nonnegative *diagonal* matrices, hence diagonal with Delta >= 0:
  J_g is symmetric PSD at every x, so g is the gradient of a convex function (a symmetric Jacobian on R^d
  makes g a gradient field; PSD makes its potential convex). The shared W is what makes it symmetric.
M-MGN (modular), K modules W_k (h, d), s(z) = sum_i log cosh z_i, grad s = tanh:
    g(x) = a + V^T V x + sum_k s(W_k x + b_k) W_k^T tanh(W_k x + b_k)
         = grad phi(x),  phi(x) = a^T x + 1/2 |V x|^2 + sum_k 1/2 s(W_k x + b_k)^2,
  convex because s >= 0 is convex (so s^2 is convex). J_g = V^T V + sum_k W_k^T (s_k diag(1 - tanh^2) + t_k t_k^T) W_k.
OT tasks (Brenier): the optimal map for |x - y|^2 from mu to nu is the unique gradient of a convex function with
T#mu = nu, so T = scale * g((x - m_x) / s_x) + m_y is trained to minimise the debiased Sinkhorn divergence
S_eps(T#mu_n, nu_n) between minibatches (written below, log-domain; sinkhorn.py has the full solver). The fixed
scalars s_x, scale > 0 (the pooled per-coordinate stds sqrt(mean_j Var x_j) of source and target) and shifts
(their per-coordinate means) keep the Jacobian (scale / s_x) J_g symmetric PSD: T stays monotone.
Protocol differences from 001: every metric is on held-out samples, W_2 is exact (assignment on 1000 points),
001's "Wasserstein" is read as the mean over coordinates of the 1-D W_1 (`coord_w1` <= W_1 <= W_2: it flatters;
`w2` is the honest comparison); `*_floor`: each metric between two samples of the target itself.
"""
import dataclasses, math, os, time

import matplotlib
import torch
import torch.nn as nn
from matplotlib.figure import Figure

import common
import metrics

TASKS = ("gradient", "ot-gaussian", "ot-banana", "generate", "recolor", "colorize")
TASK_DEFAULTS = {  # width h, layers L (C-MGN) or modules K (M-MGN), eps in standardised units
    "gradient": dict(steps=20000, batch_size=1024, lr=1e-2, width=32, depth=3, eps=0.01),
    "ot-gaussian": dict(steps=2000, batch_size=512, lr=3e-3, width=16, depth=3, eps=0.05),
    "ot-banana": dict(steps=1000, batch_size=512, lr=3e-3, width=32, depth=4, eps=0.1),
    "generate": dict(steps=1500, batch_size=128, lr=1e-3, width=256, depth=10, eps=100.0),
    "recolor": dict(steps=600, batch_size=512, lr=3e-3, width=16, depth=3, eps=0.1),
    "colorize": dict(steps=600, batch_size=512, lr=3e-3, width=16, depth=3, eps=0.1)}
LUMA = torch.tensor([0.299, 0.587, 0.114])                               # grey = luminance (ITU-R BT.601)


@dataclasses.dataclass
class Config(common.Config):
    task: str = common.arg("gradient", "experiment to run (001's experiments)", TASKS)
    net: str = common.arg("mmgn", "cmgn: cascaded; mmgn: modular (generate: cmgn unless given)", ["cmgn", "mmgn"])
    data: str = common.arg("", "generate: the images (empty: digits); colorize: colour images whose test images are "
                               "coloured (empty: the photograph --source)", ("",) + common.IMAGE_DATA)
    steps: int = common.arg(0, "Adam steps (0: the task's default, see TASK_DEFAULTS)")
    batch_size: int = common.arg(0, "points per step and per side (0: the task's default)")
    lr: float = common.arg(0.0, "Adam learning rate, cosine-decayed to 0 (0: the task's default)")
    width: int = common.arg(0, "width h of W (C-MGN) or of each W_k (M-MGN) (0: the task's default)")
    depth: int = common.arg(0, "layers L (C-MGN) or modules K (M-MGN) (0: the task's default)")
    eps: float = common.arg(0.0, "Sinkhorn epsilon in standardised units, cost |x - y|^2 (0: the task's default)")
    n_eval: int = common.arg(10000, "held-out points for the metrics (recolor: n_eval / 5 pixels for each S_eps)")
    MODEL_FLAGS = ("task", "net", "width", "depth", "data")
    source: str = common.arg("", "recolor, colorize: source image (default matplotlib's grace_hopper.jpg)")
    target: str = common.arg("", "recolor: target image (default matplotlib's Minduka_Present_Blue_Pack.png); "
                                 "colorize: the image whose colours are learned, empty: the source's own")

    def defaults(self, given):
        for name, value in TASK_DEFAULTS[self.task].items():            # 0: the task's default
            setattr(self, name, getattr(self, name) or value)
        self.net = self.net if "--net" in given or self.task != "generate" else "cmgn"
        self.data = self.data or ("digits" if self.task == "generate" else "")


# ----------------------------------------------------------------------------- data
def f_convex(x):
    """f(x) = x1^4 + x1^2/2 + x1 x2/2 + 3 x2^2/2 - x2^3/3;
    Hessian [[12 x1^2 + 1, 1/2], [1/2, 3 - 2 x2]] > 0 on [0,1]^2."""
    x1, x2 = x[:, 0], x[:, 1]
    return x1 ** 4 + x1 ** 2 / 2 + x1 * x2 / 2 + 1.5 * x2 ** 2 - x2 ** 3 / 3


def grad_f(x):
    x1, x2 = x[:, 0], x[:, 1]
    return torch.stack([4 * x1 ** 3 + x1 + x2 / 2, x1 / 2 + 3 * x2 - x2 ** 2], 1)


GAUSS = (torch.tensor([-6.0, 4.0]), torch.eye(2), torch.tensor([2.0, -3.0]), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))


def sqrtm(S):
    e, v = torch.linalg.eigh(S)
    return v @ torch.diag(e.clamp(min=0).sqrt()) @ v.T


def gaussian_map(m1, S1, m2, S2):
    r"""Brenier map N(m1, S1) -> N(m2, S2) (001, "Theoretical Background"): T(x) = m2 + A (x - m1),
    A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}."""
    r = sqrtm(S1)
    ri = torch.linalg.inv(r)
    A = ri @ sqrtm(r @ S2 @ r) @ ri                                     # symmetric PD: T = grad of 1/2 x^T A x + ...
    return A, m2 - A @ m1


def ot_samplers(task):
    """(source sampler, target sampler): n, generator -> (n, 2)."""
    m1, S1, m2, S2 = GAUSS
    source = lambda n, gen: m1 + torch.randn(n, 2, generator=gen) @ sqrtm(S1)
    if task == "ot-banana":
        return source, lambda n, gen: common.sample_2d("banana", n, gen)
    return source, lambda n, gen: m2 + torch.randn(n, 2, generator=gen) @ sqrtm(S2)


# ----------------------------------------------------------------------------- models
def logcosh(z):
    return z.abs() + nn.functional.softplus(-2 * z.abs()) - math.log(2)  # log cosh z, stable for large |z|


class CMGN(nn.Module):
    """C-MGN (001, "Theoretical Background"; Chaudhari et al. 2023): one W shared by all L layers, see the Jacobian."""
    def __init__(self, d, h, L):
        super().__init__()
        self.W = nn.Parameter(torch.randn(h, d) / math.sqrt(d * h))     # small: g starts near V^T V x ~ x
        self.b = nn.Parameter(torch.randn(L, h) * 0.1)                 # b_0 .. b_{L-1}
        self.V = nn.Parameter(torch.eye(d) + torch.randn(d, d) / math.sqrt(d) * 0.1)
        self.b_out = nn.Parameter(torch.zeros(d))                      # b_L

    def forward(self, x):
        wx = x @ self.W.T                                                # W x, shared by every layer (B, h)
        z = wx + self.b[0]                                               # z_0 = W x + b_0
        for l in range(1, len(self.b)):
            z = wx + torch.tanh(z) + self.b[l]                           # z_l = W x + sigma(z_{l-1}) + b_l
        return torch.tanh(z) @ self.W + (x @ self.V.T) @ self.V + self.b_out   # W^T sigma(z_{L-1}) + V^T V x + b_L


class MMGN(nn.Module):
    """M-MGN (001, "Theoretical Background"): g = grad phi, phi = a^T x + 1/2 |V x|^2 + sum_k 1/2 s(W_k x + b_k)^2."""
    def __init__(self, d, h, K):
        super().__init__()
        self.W = nn.Parameter(torch.randn(K, h, d) / math.sqrt(d * h))  # small: s_k ~ 1/2, g starts near x
        self.b = nn.Parameter(torch.randn(K, h) * 0.1)
        self.V = nn.Parameter(torch.eye(d) + torch.randn(d, d) / math.sqrt(d) * 0.1)
        self.a = nn.Parameter(torch.zeros(d))

    def pre(self, x):
        K, h, d = self.W.shape
        return (x @ self.W.view(K * h, d).T).view(-1, K, h) + self.b     # z_k = W_k x + b_k  (B, K, h)

    def potential(self, x):
        return x @ self.a + 0.5 * (x @ self.V.T).pow(2).sum(1) + 0.5 * logcosh(self.pre(x)).sum(2).pow(2).sum(1)

    def forward(self, x):
        K, h, d = self.W.shape
        z = self.pre(x)
        s = logcosh(z).sum(2, keepdim=True)                              # s(W_k x + b_k)  (B, K, 1)
        modules = (s * torch.tanh(z)).view(-1, K * h) @ self.W.view(K * h, d)   # sum_k s_k W_k^T tanh(z_k)
        return self.a + (x @ self.V.T) @ self.V + modules                # a + V^T V x + ...


class Transport(nn.Module):
    """T(x) = scale g((x - m_x) / s_x) + m_y, s_x, scale > 0 fixed: J_T = (scale / s_x) J_g stays PSD (001, Brenier)."""
    def __init__(self, g, x=None, y=None):                                # no data: the identity scaling
        super().__init__()
        self.g, d = g, g.V.shape[0]
        pooled_std = lambda z: z.var(0).mean().sqrt()                   # sqrt(mean_j Var z_j): one scalar
        stats = (torch.zeros(d), 1, torch.zeros(d), 1)
        if x is not None:
            stats = (x.mean(0), pooled_std(x), y.mean(0), pooled_std(y))
        for name, v in zip(("m_x", "s_x", "m_y", "scale"), stats):
            self.register_buffer(name, torch.as_tensor(v, dtype=torch.float32).clone())

    def forward(self, x):
        return self.scale * self.g((x - self.m_x) / self.s_x) + self.m_y


# ----------------------------------------------------------------------------- losses
def sinkhorn_potentials(C, eps, tol=1e-3, max_iter=2000, tau=30.0):
    r"""Log-domain Sinkhorn between uniform weights a = 1/n, b = 1/m and cost C (n, m) (000, "Sinkhorn Algorithm"):
        f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps),   g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps),
        P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps),
    each log-sum a product with the kernel K_ij = exp((f0_i + g0_j - C_ij)/eps) at reference potentials, rebuilt
    when f or g drift by tau eps; eps-scaling from max C down to eps, each level stopped when the L1 error of P's
    column sums is below tol. Returns f, g and P at eps."""
    a = torch.full((C.shape[0],), 1.0 / C.shape[0], dtype=C.dtype, device=C.device)
    b = torch.full((C.shape[1],), 1.0 / C.shape[1], dtype=C.dtype, device=C.device)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    e = 2 * max(float(C.max()), eps)
    while e > eps:
        e = max(e / 2, eps)
        f0, g0 = f, g
        K = torch.exp((f0[:, None] + g0[None, :] - C) / e)
        for _ in range(max_iter):
            f = f0 - e * torch.log(K @ (b * torch.exp((g - g0) / e)))
            g_new = g0 - e * torch.log(K.T @ (a * torch.exp((f - f0) / e)))
            if not (torch.isfinite(f).all() and torch.isfinite(g_new).all()):   # a kernel row underflowed
                f = -e * torch.logsumexp(torch.log(b)[None, :] + (g[None, :] - C) / e, 1)
                g_new = -e * torch.logsumexp(torch.log(a)[:, None] + (f[:, None] - C) / e, 0)
            err = float((b * torch.expm1((g - g_new) / e)).abs().sum())
            g = g_new
            if err < tol:
                break
            if max(float((f - f0).abs().max()), float((g - g0).abs().max())) > tau * e:
                f0, g0 = f, g                                            # move the reference
                K = torch.exp((f0[:, None] + g0[None, :] - C) / e)
    return f, g, a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - C) / eps)


def ot_eps(x, y, eps, tol=1e-3):
    r"""OT_eps(x, y) = <P, C> + eps KL(P | a b^T) = sum_ij P_ij (f_i + g_j) at the optimum, cost C_ij = |x_i - y_j|^2.
    Envelope theorem: dOT_eps/dC = P: <P, C> with P fixed carries the gradient (000, "Sinkhorn Algorithm")."""
    C = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)                   # (n, m)
    with torch.no_grad():
        f, g, P = sinkhorn_potentials(C, eps, tol)
    pc = (P * C).sum()
    return pc + ((P * (f[:, None] + g[None, :])).sum() - pc).detach()


def sinkhorn_divergence(x, y, eps, tol=1e-3):
    r"""Debiased S_eps(x, y) = OT_eps(x, y) - 1/2 OT_eps(x, x) - 1/2 OT_eps(y, y) >= 0 (Feydy et al. 2019; 001)."""
    return ot_eps(x, y, eps, tol) - 0.5 * ot_eps(x, x, eps, tol) - 0.5 * ot_eps(y, y, eps, tol)


def sinkhorn_loss(Tx, y, T, eps):
    """S_eps between pushed and target points, in the standardised units of T (divide by scale^2)."""
    return sinkhorn_divergence(Tx / T.scale, y / T.scale, eps)


# ----------------------------------------------------------------------------- training
def task_data(cfg):
    """(x sampler, y sampler or None, held-out x, held-out y) for the task; samplers: gen -> a batch."""
    gen_test, n, b = torch.Generator().manual_seed(cfg.seed + 1000), cfg.n_eval, cfg.batch_size
    if cfg.task == "gradient":                                           # regression on [0,1]^2
        return (lambda gen: torch.rand(b, 2, generator=gen)), None, torch.rand(n, 2, generator=gen_test), None
    if cfg.task in ("ot-gaussian", "ot-banana"):
        src, tgt = ot_samplers(cfg.task)
        return (lambda gen: src(b, gen)), (lambda gen: tgt(b, gen)), src(n, gen_test), tgt(n, gen_test)
    if cfg.task == "generate":
        y = common.load_images(cfg.data, "train", cfg.data_dir)[0].flatten(1)            # (N, 784)
        return (lambda gen: torch.randn(b, 784, generator=gen)), \
            (lambda gen: y[torch.randint(len(y), (b,), generator=gen)]), torch.randn(n, 784, generator=gen_test), y
    if cfg.task == "colorize" and cfg.data:                              # grey pixels of colour images -> colours
        return colorize_data(cfg)
    data = os.path.join(matplotlib.get_data_path(), "sample_data")       # recolor, colorize: pixels as RGB points
    x, xs = common.read_rgb(cfg.source or os.path.join(data, "grace_hopper.jpg"))
    pick = lambda z, gen: z[torch.randint(len(z), (b,), generator=gen)]
    if cfg.task == "colorize":                                           # grey pixels (l, l, l) -> colours
        y = common.read_rgb(cfg.target)[1] if cfg.target else xs
        grey = (x @ LUMA)[..., None].expand(-1, -1, 3)                   # (H, W, 3), l = the luminance
        return (lambda gen: pick(xs @ LUMA, gen)[:, None].expand(-1, 3)), (lambda gen: pick(y, gen)), grey, (x, y)
    y_image, y = common.read_rgb(cfg.target or os.path.join(data, "Minduka_Present_Blue_Pack.png"))
    return (lambda gen: pick(xs, gen)), (lambda gen: pick(y, gen)), x, (y_image, y)


def colorize_data(cfg):
    """colorize on an image dataset: T learns from the training images' pixels (grey levels in, colours out, not
    paired); it colours a mosaic of the first 64 test images, shown and scored as one photograph."""
    images = common.load_images(cfg.data, "train", cfg.data_dir)[0]
    common.check(images.shape[1] == 3, f"--task colorize needs colour images: --data {cfg.data} is grey")
    test = common.load_images(cfg.data, "test", cfg.data_dir)[0][:64]
    k = math.isqrt(len(test))
    s = test.shape[-1]
    x = test[:k * k].view(k, k, 3, s, s).permute(0, 3, 1, 4, 2).reshape(k * s, k * s, 3)   # (H, W, 3), k x k images

    def pixels(n, gen):
        """n random pixels of the training images: their colours (n, 3)."""
        i = torch.randint(len(images), (n,), generator=gen)
        row = torch.randint(s, (n,), generator=gen)
        col = torch.randint(s, (n,), generator=gen)
        return images[i, :, row, col]

    y = pixels(200000, torch.Generator().manual_seed(cfg.seed + 1000))                      # target colours
    grey = (x @ LUMA)[..., None].expand(-1, -1, 3)
    b = cfg.batch_size
    return (lambda gen: (pixels(b, gen) @ LUMA)[:, None].expand(-1, 3)), (lambda gen: pixels(b, gen)), grey, (x, y)


def train(cfg, T, sample_x, sample_y, device, state=None):
    """Adam with a cosine learning rate over --steps; returns the loss history. state: a run to continue."""
    gen = torch.Generator().manual_seed(cfg.seed)                         # the batches
    opt = torch.optim.Adam(T.parameters(), cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    history = []
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt=opt, sched=sched)
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "mgn", every=500) as save:
        for step in range(start + 1, cfg.steps + 1):

            # the loss: MSE to grad f (gradient), or S_eps(T#mu_n, nu_n) between minibatches (transport)
            x = sample_x(gen).to(device)
            if sample_y is None:
                loss = (T(x) - grad_f(x)).pow(2).mean()
            else:
                loss = sinkhorn_loss(T(x), sample_y(gen).to(device), T, cfg.eps)

            # one Adam step, the cosine schedule, record, checkpoint
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            history.append(loss.item())
            progress(step, loss.item())
            save(step, lambda: dict(T=T.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                    history=history, rng=common.rng_states(gen)))
    return history


# ----------------------------------------------------------------------------- evaluation and pictures
def monotone_violations(T, x, n_pairs=100000, seed=0):
    """Fraction of random pairs with <T(a) - T(b), a - b> < -1e-6 (float round-off allowed; 0 for a monotone map)."""
    gen = torch.Generator().manual_seed(seed)
    i, j = torch.randint(len(x), (2, n_pairs), generator=gen)
    with torch.no_grad():
        Tx = T(x)
    return float((((Tx[i] - Tx[j]) * (x[i] - x[j])).sum(1) < -1e-6).float().mean())


def ot_metrics(cfg, T, x, y):
    """map_error (Gaussian), w2 (exact, 1000 points), coord_w1 (mean over coordinates), and their target floors."""
    with torch.no_grad():
        Tx = T(x)
    y2 = ot_samplers(cfg.task)[1](len(x), torch.Generator().manual_seed(cfg.seed + 2000))   # fresh target
    out = {"w2": metrics.w_exact(Tx[:1000], y[:1000]), "w2_floor": metrics.w_exact(y2[:1000], y[:1000]),
           "coord_w1": float(metrics.w1_sorted(Tx, y).mean()), "coord_w1_floor": float(metrics.w1_sorted(y2, y).mean())}
    if cfg.task == "ot-gaussian":
        A, c = gaussian_map(*GAUSS)
        out["map_error"] = float((Tx - (x @ A.T + c)).norm(dim=1).mean())   # mean |T_theta(x) - T(x)|
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 4)
    colours = ("tab:blue", "tab:orange", "tab:green")
    for ax, p, title, c in zip(axes, (x, y, Tx), ("source", "target", "pushed T(x)"), colours):
        ax.scatter(*p[:2000].numpy().T, s=2, c=c)
        ax.set_title(title)
    k = torch.arange(0, len(x), len(x) // 150)[:150]
    d = Tx[k] - x[k]
    axes[3].quiver(*x[k].numpy().T, *d.numpy().T, angles="xy", scale_units="xy", scale=1, width=0.003, alpha=0.6)
    axes[3].scatter(*y[:2000].numpy().T, s=1, c="tab:orange", alpha=0.3)
    axes[3].set_title("displacement T(x) - x")
    both = torch.cat([x[:2000], y[:2000]])
    lo, hi = (both.min(0).values - 1).tolist(), (both.max(0).values + 1).tolist()
    for ax in axes:
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal")
    fig.savefig(os.path.join(cfg.out, "samples.png"), dpi=90, bbox_inches="tight")
    return Tx, out


def gradient_metrics(cfg, T, x):
    g = torch.linspace(0, 1, 100)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)   # (100*100, 2)
    with torch.no_grad():
        err = T(x) - grad_f(x)
        e = (T(grid) - grad_f(grid)).norm(dim=1).view(100, 100)
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    fig.colorbar(ax.imshow(e.log10().numpy(), origin="lower", extent=(0, 1, 0, 1)), ax=ax, label="log10 |g - grad f|")
    ax.set_title(f"{cfg.net}: test MSE {err.pow(2).mean():.2e}")
    fig.savefig(os.path.join(cfg.out, "samples.png"), dpi=100, bbox_inches="tight")
    return T(x).detach(), {"test_mse": float(err.pow(2).mean()), "test_mae": float(err.abs().mean())}


def recolor_metrics(cfg, T, x, target):
    (y_image, y), xs = target, x.reshape(-1, 3)                          # (H*W, 3)
    with torch.no_grad():
        out = torch.cat([T(c) for c in xs.split(65536)]).clamp(0, 1)
    gen = torch.Generator().manual_seed(cfg.seed + 3000)
    pick = lambda z: z[torch.randint(len(z), (cfg.n_eval // 5,), generator=gen)]   # 2000 pixels by default
    xt, yt, ot = pick(xs), pick(y), pick(out)
    scores = {"monotone_violations": monotone_violations(T, xs[::7]),
              "S_eps_before": float(sinkhorn_divergence(xt.double(), yt.double(), 0.01, tol=1e-4)),
              "S_eps_after": float(sinkhorn_divergence(ot.double(), yt.double(), 0.01, tol=1e-4))}
    fig = Figure(figsize=(16, 8))
    for i, (c, title) in enumerate(((xt, "source"), (yt, "target"), (ot, "result"))):
        ax = fig.add_subplot(2, 3, i + 1)
        ax.imshow((x, y_image, out.view(x.shape))[i].numpy())
        ax.set(title=title, xticks=[], yticks=[])
        ax = fig.add_subplot(2, 3, 4 + i, projection="3d")
        ax.scatter(*c.numpy().T, c=c.numpy(), s=2)                       # its colours as points in RGB
        ax.set(xlabel="R", ylabel="G", zlabel="B", xlim=(0, 1), ylim=(0, 1), zlim=(0, 1))
    fig.savefig(os.path.join(cfg.out, "samples.png"), dpi=80, bbox_inches="tight")
    return out.view(x.shape), scores


def colorize_metrics(cfg, T, grey, target):
    """001 experiment 4: the colourised photograph against its true colours (RMSE per channel, in [0, 1]) and
    S_eps of its colours to the learned ones y, beside the grey input and the best fixed colour map E[rgb | l]:
    each of 256 grey levels l coloured with the mean of the colours y of that level. For the photograph's own
    colours that is the least-squares best of any map of l alone; for a dataset, fitted on its training pixels."""
    (x, y), gs, truth = target, grey.reshape(-1, 3), target[0].reshape(-1, 3)
    with torch.no_grad():
        out = torch.cat([T(c) for c in gs.split(65536)]).clamp(0, 1)
    level = (gs[:, 0] * 255).round().long()
    y_level = (y @ LUMA * 255).round().long()
    count = torch.bincount(y_level, minlength=256)
    level_mean = torch.zeros(256, 3).index_add_(0, y_level, y) / count.clamp(min=1)[:, None]   # E[rgb | l]
    best = level_mean[level]
    gen = torch.Generator().manual_seed(cfg.seed + 3000)
    i = torch.randint(len(truth), (cfg.n_eval // 5,), generator=gen)
    j = torch.randint(len(y), (cfg.n_eval // 5,), generator=gen)
    scores = {"monotone_violations": monotone_violations(T, gs[::7])}
    for name, c in (("grey", gs), ("colorized", out), ("best_fixed_map", best)):
        scores[f"rmse_{name}"] = float((c - truth).pow(2).mean().sqrt())
        scores[f"S_eps_{name}"] = float(sinkhorn_divergence(c[i].double(), y[j].double(), 0.01, tol=1e-4))
    fig = Figure(figsize=(20, 4))
    axes = fig.subplots(1, 5)
    titles = ("grey input", "colorized by T", "best fixed map E[rgb | l]", "true colours")
    for ax, c, title in zip(axes, (gs, out, best, truth), titles):
        ax.imshow(c.view(x.shape).numpy())
        ax.set(title=title, xticks=[], yticks=[])
    l = torch.linspace(0, 1, 256)
    with torch.no_grad():
        curve = T(l[:, None].expand(-1, 3)).clamp(0, 1)
    for k, colour in enumerate(("red", "green", "blue")):
        axes[4].plot(l, curve[:, k], c=colour)
        axes[4].plot(l[count > 0], level_mean[count > 0, k], c=colour, ls=":")
    axes[4].set(xlabel="grey level l", title="T(l) (solid) and E[rgb | l] (dotted)")
    fig.savefig(os.path.join(cfg.out, "samples.png"), dpi=80, bbox_inches="tight")
    return out.view(x.shape), scores


def main(argv=None):
    cfg = common.parse_config(Config, argv, "mgn", __doc__)
    common.check(cfg.width > 0 and cfg.depth > 0 and cfg.eps > 0 and cfg.n_eval >= 200,
                 "--width, --depth and --eps must be positive and --n-eval at least 200")
    state = common.load_run(cfg, "mgn") if cfg.sample_only or cfg.resume else None   # flags from the checkpoint
    common.check(cfg.task != "generate" or cfg.data in common.DIGIT_DATA, f"--task generate is for 28x28 grey "
                 f"digits ({', '.join(common.DIGIT_DATA)}), not --data {cfg.data}")
    common.check(cfg.data == "" or cfg.task in ("generate", "colorize"), "--data is for --task generate or colorize")

    # the task's data and the map T (its fixed scalings from 8 batches)
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    sample_x, sample_y, x_test, y_test = task_data(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    x0 = torch.cat([sample_x(gen) for _ in range(8)])
    y0 = torch.cat([sample_y(gen) for _ in range(8)]) if sample_y else None
    g = (CMGN if cfg.net == "cmgn" else MMGN)(x0.shape[1], cfg.width, cfg.depth)
    T = Transport(g, *((x0, y0) if sample_y else ()))                   # gradient: plain regression

    # train, or load the trained map
    t0 = time.time()
    history = []
    if state:
        T.load_state_dict(state["T"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own evaluation
    else:
        history = train(cfg, T.to(device), sample_x, sample_y, device, state)

    # the task's metrics and picture, on the CPU
    T = T.cpu().eval()
    if cfg.task == "gradient":
        result, scores = gradient_metrics(cfg, T, x_test)
    elif cfg.task == "generate":
        with torch.no_grad():
            result = torch.cat([T(z) for z in x_test.split(1000)]).clamp(0, 1).view(-1, 1, 28, 28)
        scores = metrics.image_metrics(result, cfg.data, data_dir=cfg.data_dir, out=cfg.out)
        common.save_images(result[:100], os.path.join(cfg.out, "samples.png"))
    elif cfg.task == "recolor":
        result, scores = recolor_metrics(cfg, T, x_test, y_test)
    elif cfg.task == "colorize":
        result, scores = colorize_metrics(cfg, T, x_test, y_test)
    else:
        result, scores = ot_metrics(cfg, T, x_test, y_test)
    if cfg.task not in ("recolor", "colorize"):
        scores["monotone_violations"] = monotone_violations(T, x_test)
    scores["parameters"] = sum(p.numel() for p in T.parameters())
    return common.finish(cfg, scores, t0, device, samples=result,
                         history={"loss": history} if history else None, logy=True)


if __name__ == "__main__":
    common.run(main)
