r"""stylegan_lite.py - a small style-based generator (Karras et al. 2019) with every part of the lecture's figure.

Lectures: 002 "Style Gan": "Preliminary: Adaptive Instance Normalization (AdaIN)", "Architecture of Style Gan"
(mapping network, affine transforms A, noise inputs B), "Global architecture of StyleGAN"; 000 section 6.3.
Run: `python stylegan_lite.py` (digits at 28x28), `--data mnist10k --data-dir ../shared/data/mnist`.

    AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y)   per sample and channel; (sigma(y), mu(y)) = (gamma, beta)
                  = A(w), a learned affine map of w per layer                       (002, "AdaIN", "Architecture")
    mapping       w = f(z): PixelNorm(z) = z / sqrt(mean z^2), then --map-layers linear+LeakyReLU layers whose
                  learning rate is 0.01 times the synthesis network's (Karras et al. 2019, Appendix C)
    synthesis     learned constant 7x7 -> blocks 7, 14, 28 (colour data: 8, 16, 32, and 64); each layer:
                  (upsample), 3x3 conv with bias, + noise B, LeakyReLU(0.2), AdaIN with its own style; two layers
                  per block; toRGB (1x1 conv)
    noise B       x <- x + b * n, n ~ N(0, 1) one single-channel image per layer broadcast to all channels
                  (002, "Noise input are single channel images"), b a per-channel scale initialised to 0
    mixing        with probability --mix-prob two latents: layers before a random crossover use w_1, the others w_2
    truncation    w' = w_bar + psi (w - w_bar), w_bar the running mean of w during training (--psi)
    equalized lr  weights drawn N(0, 1) and scaled at run time by the He constant sqrt(2 / fan_in) (folded
                  into the following LeakyReLU's gain, as in the paper's code: scale 1 / sqrt(fan_in))
    loss          non-saturating logistic: D minimizes softplus(D(G(z))) + softplus(-D(x)), G minimizes
                  softplus(-D(G(z))); R1 = gamma/2 E |grad_x D(x)|^2 on real data (Mescheder et al. 2018)
    D             gan.py's DCGAN discriminator (4x4 stride-2 convolutions, ndf and 2 ndf channels, BatchNorm on the
                  second, one logit), its own Adam(--d-lr, betas (0.5, 0.999)); samples from an EMA of G.
Differences from the paper: 28x28 and 6 layers (not 1024x1024 and 18), 128-d z and w (not 512), at most 64
channels in G, no progressive growing, nearest-neighbour upsampling without blur, Adam(4e-3, betas (0, 0.99)) for
G, batch 16; the first layer convolves the constant (the paper starts with noise and AdaIN on it); truncation acts
on all layers (the paper: the coarse ones); R1 is lazy, every 16 steps and scaled x16 (StyleGAN2), gamma 1 (the
paper: 10); no mixing regularisation by default (the paper: 0.9; the style-mixing figure is drawn all the same);
the sqrt(2) gain after LeakyReLU is placed as in StyleGAN2's code; D is DCGAN's, not the paper's (ProGAN's, with a
minibatch-std feature). Results: docs/stylegan_lite.md. The slide's AdaIN names the style
(sigma(y), mu(y)); here it is (gamma, beta) = A(w). R1 takes grad_x D(x) with D in training mode, so BatchNorm's
batch statistics are part of it.
"""
import copy, dataclasses, math, os, time

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "image dataset", common.IMAGE_DATA)
    steps: int = common.arg(9000, "training steps (one D and one G update each)")
    batch_size: int = common.arg(16, "images per step")
    lr: float = common.arg(4e-3, "G's Adam learning rate (the mapping network's: 0.01 x this)")
    d_lr: float = common.arg(4e-4, "D's Adam learning rate")
    z_dim: int = common.arg(128, "size of z and w")
    map_layers: int = common.arg(4, "layers of the mapping network f")
    width: int = common.arg(64, "G's feature channels at 7x7 (half at 14x14, a quarter at 28x28)")
    ndf: int = common.arg(64, "D's width: ndf channels at 14x14, 2 ndf at 7x7 (DCGAN's 64)")
    mix_prob: float = common.arg(0.0, "probability of style mixing regularisation per batch (the paper: 0.9)")
    r1_gamma: float = common.arg(1.0, "R1 penalty weight gamma (0: off; the paper: 10)")
    r1_every: int = common.arg(16, "apply R1 every this many steps (lazy regularisation)")
    ema: float = common.arg(0.999, "largest decay of the moving average of G used for sampling; the decay at "
                                   "step t is min(ema, (1 + t) / (10 + t))")
    psi: float = common.arg(1.0, "truncation psi for samples.png and the metrics (1: none)")
    n_samples: int = common.arg(5000, "samples for the final metrics")
    gif: bool = common.arg(False, "also write style_walk.gif: a walk in W from style_mixing.png's sources A to B, "
                                  "then the crossover moving back")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "z_dim", "map_layers", "width", "ndf", "image_size", "grey")


# ----------------------------------------------------------------------------- data
def batch_sampler(cfg, gen):
    """() -> a batch (B, C, S, S) in [-1, 1] drawn by gen."""
    x = common.load_data(cfg, "train")[0]
    return lambda: x[torch.randint(len(x), (cfg.batch_size,), generator=gen)] * 2 - 1


def to_image(x):
    """Generator output (B, C, S, S) in about [-1, 1] -> [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------- model: building blocks
class EqLinear(nn.Module):
    """Equalized learning rate: w ~ N(0, 1/lr_mul^2), used as w * lr_mul / sqrt(fan_in) (lr_mul = 0.01: mapping)."""
    def __init__(self, d_in, d_out, lr_mul=1.0, bias_init=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((d_out,), float(bias_init)) / lr_mul)
        self.scale, self.lr_mul = lr_mul / math.sqrt(d_in), lr_mul

    def forward(self, x):
        """y = (lr_mul / sqrt(fan_in)) W x + lr_mul b: the weights scaled at run time (Karras et al. 2019, equalized
        learning rate)."""
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqConv2d(nn.Module):
    """Equalized learning rate convolution: w ~ N(0, 1), used as w / sqrt(c_in k^2); 'same' padding."""
    def __init__(self, c_in, c_out, k):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = 1 / math.sqrt(c_in * k * k)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.weight.shape[-1] // 2)


def pixel_norm(z, eps=1e-8):
    """PixelNorm(z) = z / sqrt(mean_i z_i^2 + eps) per sample: the mapping network's input (Karras et al. 2019)."""
    return z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + eps)      # z / sqrt(mean_i z_i^2)


def adain(x, gamma, beta, eps=1e-8):
    r"""AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y), mu and sigma per sample and channel (002,
    "Preliminary: Adaptive Instance Normalization (AdaIN)")."""
    mu = x.mean((2, 3), keepdim=True)                                    # (B, C, 1, 1)
    x_c = x - mu
    sigma = (x_c.pow(2).mean((2, 3), keepdim=True) + eps).sqrt()         # (B, C, 1, 1); faster on a CPU than x.var
    return gamma[:, :, None, None] * x_c / sigma + beta[:, :, None, None]


class MappingNetwork(nn.Module):
    """f: z -> w, PixelNorm then an MLP with LeakyReLU(0.2), learning rate x0.01 (equalized, lr_mul)."""
    def __init__(self, z_dim, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(EqLinear(z_dim, z_dim, lr_mul=0.01) for _ in range(n_layers))

    def forward(self, z):
        w = pixel_norm(z)
        for layer in self.layers:
            w = F.leaky_relu(layer(w), 0.2) * math.sqrt(2)              # sqrt(2): He gain of LeakyReLU
        return w


class StyleLayer(nn.Module):
    """(upsample), 3x3 conv with bias, + noise B, LeakyReLU, AdaIN with (gamma, beta) = A(w)."""
    def __init__(self, c_in, c_out, w_dim, upsample):
        super().__init__()
        self.upsample, self.conv = upsample, EqConv2d(c_in, c_out, 3)
        self.noise_scale = nn.Parameter(torch.zeros(1, c_out, 1, 1))    # B's per-channel factor, 0 at init
        self.A = EqLinear(w_dim, 2 * c_out, bias_init=0.0)              # the affine map A: w -> (gamma, beta)
        with torch.no_grad():
            self.A.bias[:c_out] = 1.0                                    # gamma starts at 1, beta at 0

    def forward(self, x, w, noise=None):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv(x)
        if noise is None:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device)   # one image per sample
        x = F.leaky_relu(x + self.noise_scale * noise, 0.2) * math.sqrt(2)
        gamma, beta = self.A(w).chunk(2, 1)                              # style y = (sigma(y), mu(y))
        return adain(x, gamma, beta)


# ----------------------------------------------------------------------------- model: generator and critic
class Generator(nn.Module):
    """Mapping f, synthesis g from a learned constant; 6 style layers (two per resolution 7, 14, 28); 32x32 images
    start from 8x8, and 64x64 ones have two more layers (a block at 64, ch / 4 channels)."""
    def __init__(self, z_dim=128, map_layers=4, ch=64, channels=1, size=28):
        super().__init__()
        s0 = 7 if size == 28 else 8
        self.mapping = MappingNetwork(z_dim, map_layers)
        self.const = nn.Parameter(torch.randn(1, ch, s0, s0))
        chans = [ch, ch, ch // 2, ch // 2, ch // 4, ch // 4] + [ch // 4, ch // 4] * (size == 64)   # 7 7 14 14 28 28
        self.resolutions = [s0 * 2 ** (i // 2) for i in range(len(chans))]
        self.layers = nn.ModuleList(StyleLayer(c_in, c_out, z_dim, upsample=(i % 2 == 0 and i > 0))
                                    for i, (c_in, c_out) in enumerate(zip([ch] + chans[:-1], chans)))
        self.to_rgb = EqConv2d(chans[-1], channels, 1)
        self.register_buffer("w_avg", torch.zeros(z_dim))               # running mean of w, for truncation

    def styles(self, z, z2=None, crossover=None, psi=1.0):
        """Per-layer styles (B, L, w_dim), L layers (6; 8 at 64x64): w = f(z) (002, "Architecture of Style Gan"), or
        w_1 before the crossover layer and w_2 from it on; then truncation w' = w_bar + psi (w - w_bar) (Karras et al.
        2019)."""
        w = self.mapping(z)[:, None].repeat(1, len(self.layers), 1)      # (B, L, w_dim)
        if z2 is not None:
            w[:, crossover:] = self.mapping(z2)[:, None]                 # style mixing
        return self.w_avg + psi * (w - self.w_avg)                       # truncation w' = w_bar + psi (w - w_bar)

    def synthesis(self, ws, noise=None):
        x = self.const.expand(len(ws), -1, -1, -1)                       # (B, ch, 7, 7)
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i], None if noise is None else noise[i])
        return self.to_rgb(x)                                            # (B, C, S, S)

    def forward(self, z, z2=None, crossover=None, psi=1.0, noise=None):
        return self.synthesis(self.styles(z, z2, crossover, psi), noise)


def discriminator(ndf=64, channels=1, size=28):
    """D(x) as a logit: (1, 28, 28) -> (ndf, 14, 14) -> (2 ndf, 7, 7) -> 1, no BatchNorm on the input layer (DCGAN);
    32x32 ends at 8x8, and 64x64 passes one more 2 ndf level to 8x8."""
    s0 = size // 8 if size == 64 else size // 4
    extra = [nn.Conv2d(2 * ndf, 2 * ndf, 4, 2, 1), nn.BatchNorm2d(2 * ndf), nn.LeakyReLU(0.2)] if size == 64 else []
    return nn.Sequential(nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(ndf, 2 * ndf, 4, 2, 1),
                         nn.BatchNorm2d(2 * ndf), nn.LeakyReLU(0.2), *extra, nn.Flatten(),
                         nn.Linear(2 * ndf * s0 * s0, 1))


# ----------------------------------------------------------------------------- losses
def d_loss(l_real, l_fake):
    """D's logistic loss on logits: softplus(-D(x)) + softplus(D(G(z))) = -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
    (002, "Loss function (Goodfellow et al. 2014)")."""
    return F.softplus(-l_real).mean() + F.softplus(l_fake).mean()


def g_loss(l_fake):
    """G's non-saturating logistic loss: softplus(-D(G(z))) = -log sigmoid(D(G(z))) (002, "Equilibrium analysis
    (Goodfellow et al. 2014)", note)."""
    return F.softplus(-l_fake).mean()


def r1_penalty(D, x):
    r"""R1 = 1/2 E |grad_x D(x)|^2 on real data (Mescheder et al. 2018), times gamma in train()."""
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    return 0.5 * grad.pow(2).sum((1, 2, 3)).mean()


# ----------------------------------------------------------------------------- sampling and pictures
def sample_latents(G, n, device, mix_prob):
    """z_1 and, with probability mix_prob, z_2 with a random crossover layer in 1..L-1 (style mixing)."""
    z = torch.randn(n, G.w_avg.numel(), device=device)
    if torch.rand(()) < mix_prob:
        return z, torch.randn_like(z), int(torch.randint(1, len(G.layers), ()))
    return z, None, None


@torch.no_grad()
def generate(G, n, psi=1.0, seed=0, batch_size=500):
    gen = torch.Generator().manual_seed(seed)
    dev = G.w_avg.device
    out = [to_image(G(torch.randn(min(batch_size, n - i), G.w_avg.numel(), generator=gen).to(dev), psi=psi)).cpu()
           for i in range(0, n, batch_size)]
    return torch.cat(out)


@torch.no_grad()
def style_mixing_grid(G, n=5, seed=1, coarse=2):
    """Top row sources A, left column sources B; cell (i, j): layers < coarse (the 7x7 ones) from B_i, the rest
    from A_j."""
    gen = torch.Generator().manual_seed(seed)
    dev = G.w_avg.device
    zA, zB = (torch.randn(n, G.w_avg.numel(), generator=gen).to(dev) for _ in range(2))
    wA, wB = G.styles(zA), G.styles(zB)
    first = to_image(G.synthesis(wA)).cpu()
    rows = [torch.cat([torch.ones(1, *first.shape[1:]), first])]
    for i in range(n):
        ws = wA.clone()
        ws[:, :coarse] = wB[i:i + 1, :coarse]                            # coarse styles from B_i
        rows.append(torch.cat([to_image(G.synthesis(wB[i:i + 1])).cpu(), to_image(G.synthesis(ws)).cpu()]))
    return torch.cat(rows), n + 1


@torch.no_grad()
def style_walk(G, n=5, seed=1, steps=24):
    """The film of --gif: the sources A and B of style_mixing_grid (same seed), one noise draw for all frames.
    Frames 0..steps: a straight walk in W, w = (1 - t) w_A + t w_B, t = k/steps; then the crossover moving back,
    c = L - 1, ..., 0: layers < c from B, the others from A (c = 2 is style_mixing.png's diagonal; c = 0: A again).
    Returns (frames, n, C, S, S) images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    dev = G.w_avg.device
    zA, zB = (torch.randn(n, G.w_avg.numel(), generator=gen).to(dev) for _ in range(2))
    wA, wB = G.styles(zA), G.styles(zB)
    gen = torch.Generator().manual_seed(4)
    noise = [torch.randn(1, 1, r, r, generator=gen).to(dev).expand(n, -1, -1, -1) for r in G.resolutions]
    frames = [G.synthesis((1 - k / steps) * wA + k / steps * wB, noise) for k in range(steps + 1)]   # walk in W
    for c in range(len(G.layers) - 1, -1, -1):                           # the crossover moving
        ws = wA.clone()
        ws[:, :c] = wB[:, :c]
        frames.append(G.synthesis(ws, noise))
    return torch.stack([to_image(f).cpu() for f in frames])


@torch.no_grad()
def truncation_grid(G, n_rows=6, n_psi=8, seed=2):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, G.w_avg.numel(), generator=gen).to(G.w_avg.device)
    psi = torch.linspace(0, 1, n_psi, device=z.device)[:, None, None]      # one psi per column
    rows = [to_image(G(z[i:i + 1].repeat(n_psi, 1), psi=psi)).cpu() for i in range(n_rows)]
    return torch.cat(rows), n_psi


@torch.no_grad()
def save_noise_figure(G, path, n_w=4, n_draws=6, n_std=32, seed=3):
    """Each row: one w with several noise draws, then the per-pixel std over n_std draws."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_w, G.w_avg.numel(), generator=gen).to(G.w_avg.device)
    fig = Figure(figsize=(1.4 * (n_draws + 1), 1.5 * n_w))
    axes = fig.subplots(n_w, n_draws + 1, squeeze=False)
    for i in range(n_w):
        x = to_image(G(z[i:i + 1].repeat(n_std, 1))).cpu()              # the same w, n_std noise draws
        for j in range(n_draws):
            axes[i, j].imshow(common.image_grid(x[j:j + 1], 1)[2:-2, 2:-2], cmap="gray", vmin=0, vmax=1)
        axes[i, -1].imshow(x.std(0).mean(0).numpy(), cmap="magma")
        for ax in axes[i]:
            ax.set(xticks=[], yticks=[])
    axes[0, -1].set_title("std over draws", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")


# ----------------------------------------------------------------------------- training
def train(cfg, G, D, G_ema, device, state=None):
    """cfg.steps steps of the game with lazy R1; state: a saved run to continue (--resume)."""
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    real = batch_sampler(cfg, gen)
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(D.parameters(), cfg.d_lr, betas=(0.5, 0.999))
    history = {"D loss": [], "G loss": []}
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt_g=opt_g, opt_d=opt_d)
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "stylegan_lite", every=500) as save:
        for step in range(start + 1, cfg.steps + 1):

            # one D step: the logistic loss on real x and G(z), + lazy R1 every r1_every steps, scaled up
            x = real().to(device)
            with torch.no_grad():
                fake = G(*sample_latents(G, cfg.batch_size, device, cfg.mix_prob))
            loss_d = d_loss(D(x), D(fake))                               # -log D(x) - log(1 - D(G(z)))
            if cfg.r1_gamma > 0 and step % cfg.r1_every == 0:
                loss_d = loss_d + cfg.r1_gamma * cfg.r1_every * r1_penalty(D, x)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()

            # one G step, non-saturating: -log D(G(z)); grads pass through D, not into it
            z, z2, crossover = sample_latents(G, cfg.batch_size, device, cfg.mix_prob)
            D.requires_grad_(False)
            loss_g = g_loss(D(G(z, z2, crossover)))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            D.requires_grad_(True)

            # w_bar, the running mean of w (for truncation); the EMA of G (w_avg copied); record; checkpoint
            with torch.no_grad():
                G.w_avg.lerp_(G.mapping(z).mean(0), 0.005)
            common.ema_update(G_ema, G, step, cfg.ema)
            history["D loss"].append(loss_d.item())
            history["G loss"].append(loss_g.item())
            progress(step, loss_d.item() + loss_g.item())
            save(step, lambda: dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(),  # w_bar is in G
                                    opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), history=history,
                                    rng=common.rng_states(gen)))
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "stylegan_lite", __doc__)
    positive = min(cfg.z_dim, cfg.map_layers, cfg.r1_every, cfg.ndf) > 0
    common.check(positive and cfg.width >= 4 and cfg.n_samples >= 10,
                 "--z-dim, --map-layers, --r1-every and --ndf must be positive, --width >= 4, --n-samples >= 10")
    common.check(0 <= cfg.mix_prob <= 1 and 0 <= cfg.ema < 1 and cfg.r1_gamma >= 0 and cfg.d_lr > 0,
                 "--mix-prob must be in [0, 1], --ema in [0, 1), --r1-gamma >= 0, --d-lr > 0")
    state = common.load_run(cfg, "stylegan_lite") if cfg.sample_only or cfg.resume else None   # flags from it

    # G, D and the moving average of G
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    # channels_last: the channel index fastest in memory, images laid out (B, H, W, C), weights (C_out, k, k, C_in);
    # the same function, and the CPU's convolutions run faster so
    c, size = common.load_data(cfg, "train")[0].shape[1:3]
    G = Generator(cfg.z_dim, cfg.map_layers, cfg.width, c, size).to(device, memory_format=torch.channels_last)
    D = discriminator(cfg.ndf, c, size).to(device, memory_format=torch.channels_last)
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

    # samples from the EMA of G, their scores, and the pictures
    G_ema.eval()
    x = generate(G_ema, cfg.n_samples, cfg.psi)
    scores = metrics.image_metrics(x, cfg.data, data_dir=cfg.data_dir, out=cfg.out)
    common.save_images(x[:100], os.path.join(cfg.out, "samples.png"))
    grid, n = style_mixing_grid(G_ema)
    common.save_images(grid, os.path.join(cfg.out, "style_mixing.png"), nrow=n)
    grid, n = truncation_grid(G_ema)
    common.save_images(grid, os.path.join(cfg.out, "truncation.png"), nrow=n)
    save_noise_figure(G_ema, os.path.join(cfg.out, "noise.png"))
    if cfg.gif:
        frames = [common.image_frame(images, nrow=len(images), scale=3) for images in style_walk(G_ema)]
        common.save_gif(frames, os.path.join(cfg.out, "style_walk.gif"))
    return common.finish(cfg, scores, t0, device, samples=x, history=history)


if __name__ == "__main__":
    common.run(main)
