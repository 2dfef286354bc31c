r"""cyclegan.py - unpaired image-to-image translation with cycle consistency (Zhu et al. 2017), and paired
translation with pix2pix (Isola et al. 2017, --paired).

Lectures: 002 "Cycle GANs (Zhu 2017)" (the losses below) and "Conditional GANs example - Pix2Pix" (the L1 term);
000 section 6.3. Run: `python cyclegan.py` (built-in digit domains), `python cyclegan.py --paired` (pix2pix on the
built-in pairs), `python cyclegan.py --data-dir PATH` with PATH/trainA and PATH/trainB (e.g. horse2zebra).

Two mappings G: X -> Y and F: Y -> X, two discriminators D_Y (y vs G(x)) and D_X (x vs F(y)):
    least squares  D_Y minimizes 1/2 [E (D_Y(y) - 1)^2 + E D_Y(G(x))^2], G minimizes E (D_Y(G(x)) - 1)^2 (002, "Note:
                   they replaced ... by a mean square error term"; the same for F and D_X)
    cycle          L_cyc(G, F) = E |F(G(x)) - x|_1 + E |G(F(y)) - y|_1                          (002, "Training")
    identity       L_id(G, F) = E |G(y) - y|_1 + E |F(x) - x|_1                    (Zhu et al. section 5.2)
    total          L = L_GAN(G, D_Y) + L_GAN(F, D_X) + lambda L_cyc + lambda_id lambda L_id (lambda 10, lambda_id 0.5)
    pix2pix        one G: X -> Y and D(x, y) seeing the input stacked with the output (002's letters swapped:
                   its condition is y): D maximizes E log D(x, y) + E log(1 - D(x, G(x))), G minimizes
                   -E log D(x, G(x)) + lambda_L1 E |y - G(x)|_1, lambda_L1 = 100 (Isola et al.)
Where each piece comes from: the slide's total loss has no lambda (Zhu et al. eq. 3 has it) and writes the GAN
terms with logs; the squares are the least-squares variant its note names, whose second term lacks its square
(E[D_Y(G(x))] as printed, which D could push to -infinity; squared here). D's 1/2 is Zhu et al.'s code. |.|_1 is
averaged over pixels. D sees fakes from a pool of the last 50 (Shrivastava et al.; --pool 0: off). Adam(2e-4,
(0.5, 0.999)), constant for half the steps, then linearly to 0. pix2pix's G has no noise z and uses -log D (002,
"GAN equilibrium analysis", note); its D's objective is not halved (Isola et al. halve it).
Built-in domains, made from the `digits` (or --data) images, both as 3 channels in [-1, 1]: X = the rendered
glyph, white on black; Y = bold italic, dark blue ink on light orange. X uses train images 0..29999, Y 30000..59999:
no pair is ever seen; their labels only evaluate (the shared evaluator on F(y), one trained on Y on G(x)). The
built-in pairs (--paired) are one glyph rendered both ways. Networks: small versions of the paper's (docstrings of
generator and discriminator).
"""
import dataclasses, os, time

import torch
import torch.nn as nn
import torch.nn.functional as nnf                                      # F is the mapping Y -> X here

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "image data the two built-in domains are made from", common.DIGIT_DATA)
    data_dir: str = common.arg("", "a folder with trainA/ and trainB/ (then no built-in domains), or mnist's IDX files")
    steps: int = common.arg(2400, "training steps (one G/F update and one D_X/D_Y update each)")
    batch_size: int = common.arg(16, "images per domain per step")
    lr: float = common.arg(2e-4, "Adam learning rate, linearly decayed to 0 over the second half")
    lambda_cyc: float = common.arg(10.0, "lambda, the weight of the cycle loss")
    lambda_id: float = common.arg(0.5, "identity loss weight, as a fraction of lambda (0: off)")
    pool: int = common.arg(50, "size of the image pool of fakes shown to D (0: off)")
    width: int = common.arg(16, "base channels of the generators")
    ndf: int = common.arg(32, "base channels of the discriminators")
    n_res: int = common.arg(3, "residual blocks in each generator")
    image_size: int = common.arg(0, "image side, a multiple of 4 (0: 28 for digits, 64 for folders)")
    n_eval: int = common.arg(2000, "test images per domain for the metrics")
    paired: bool = common.arg(False, "pix2pix: train G: X -> Y on true pairs with D(x, y) and the L1 term")
    lambda_l1: float = common.arg(100.0, "pix2pix: lambda_L1, the weight of |y - G(x)|_1")
    MODEL_FLAGS = ("data", "width", "ndf", "n_res", "image_size", "paired")

    def defaults(self, given):
        self.image_size = self.image_size or (64 if is_folder_pair(self.data_dir) else 28)


# ----------------------------------------------------------------------------- data
INK, BACKGROUND = torch.tensor([0.1, 0.15, 0.45]), torch.tensor([1.0, 0.85, 0.55])


def is_folder_pair(path):
    return bool(path) and os.path.isdir(os.path.join(path, "trainA")) and os.path.isdir(os.path.join(path, "trainB"))


def domain_x(m):
    """Grey glyphs m (N, 1, H, W) in [0, 1] -> X: white on black, 3 channels, in [-1, 1]."""
    return m.repeat(1, 3, 1, 1) * 2 - 1


def domain_y(m, shear=0.3):
    """Grey glyphs -> Y: bold (3x3 max filter), italic (x <- x + shear y), dark ink on a light background."""
    m = nnf.max_pool2d(m, 3, 1, 1)                                        # bold
    theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]).expand(len(m), 2, 3)
    m = nnf.grid_sample(m, nnf.affine_grid(theta, m.shape, align_corners=False), align_corners=False)   # italic
    img = BACKGROUND.view(1, 3, 1, 1) + (INK - BACKGROUND).view(1, 3, 1, 1) * m    # (N, 3, H, W)
    return img * 2 - 1


def load_folder(path, size):
    """All .png/.jpg images in a folder, sorted by name, as RGB (grey copied to 3 channels, alpha dropped), each
    resized to size x size (so mixed sizes are fine), in [-1, 1]. A file that is not a readable image is an error."""
    files = sorted(f for f in os.listdir(path) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    common.check(files, f"no .png or .jpg images in {path}")
    out = []
    for name in files:
        im = common.read_rgb(os.path.join(path, name), grey_ok=True)[0].permute(2, 0, 1)[None]   # (1, 3, H, W)
        im = nnf.interpolate(im, size=(size, size), mode="bilinear", antialias=True)
        out.append(im.clamp(0, 1) * 2 - 1)
    return torch.cat(out)


def load_pairs(cfg, split):
    """pix2pix data: (x, y, labels), y[i] the Y rendering of the glyph of x[i], images in [-1, 1]."""
    m, labels = common.load_images(cfg.data, split, cfg.data_dir)
    m = m[:len(m) // 2]                                                  # the glyphs X is made of
    m = m if cfg.image_size == 28 else nnf.interpolate(m, size=cfg.image_size, mode="bilinear")
    return domain_x(m), domain_y(m), labels[:len(m)]


def load_domains(cfg, split):
    """(x, y, labels of x or None, labels of y or None), images (N, 3, S, S) in [-1, 1]."""
    if is_folder_pair(cfg.data_dir):
        name = "train" if split == "train" else "test"
        get = lambda d: os.path.join(cfg.data_dir, name + d) if os.path.isdir(os.path.join(cfg.data_dir, name + d)) \
            else os.path.join(cfg.data_dir, "train" + d)                # no testA/testB: evaluate on train
        return load_folder(get("A"), cfg.image_size), load_folder(get("B"), cfg.image_size), None, None
    m, labels = common.load_images(cfg.data, split, cfg.data_dir)
    half = len(m) // 2                                                   # X and Y from disjoint halves
    resize = lambda t: t if cfg.image_size == 28 else nnf.interpolate(t, size=cfg.image_size, mode="bilinear")
    return domain_x(resize(m[:half])), domain_y(resize(m[half:])), labels[:half], labels[half:]


# ----------------------------------------------------------------------------- models
def conv_norm_relu(c_in, c_out, k, stride=1, transpose=False):
    conv = nn.ConvTranspose2d(c_in, c_out, k, stride, 1, output_padding=1) if transpose else \
        nn.Conv2d(c_in, c_out, k, stride, k // 2, padding_mode="reflect" if stride == 1 else "zeros")
    return [conv, nn.InstanceNorm2d(c_out, affine=True), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + conv-IN-ReLU-conv-IN(x) (He et al.), the body of the CycleGAN generator."""
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(*conv_norm_relu(c, c, 3), nn.Conv2d(c, c, 3, 1, 1, padding_mode="reflect"),
                                  nn.InstanceNorm2d(c, affine=True))

    def forward(self, x):
        return x + self.body(x)


def generator(c_in=3, c_out=3, width=16, n_res=3):
    """Encoder (c7s1, two stride-2 convs), residual blocks at 1/4 size, decoder (two transposed convs, c7s1, tanh),
    instance norm, reflection padding: c7s1-16, d32, d64, 3 residual blocks, u32, u16, c7s1-3 (the paper: 64 base
    channels, 9 blocks)."""
    w = width
    return nn.Sequential(*conv_norm_relu(c_in, w, 7), *conv_norm_relu(w, 2 * w, 3, 2),
                         *conv_norm_relu(2 * w, 4 * w, 3, 2), *[ResidualBlock(4 * w) for _ in range(n_res)],
                         *conv_norm_relu(4 * w, 2 * w, 3, 2, transpose=True),
                         *conv_norm_relu(2 * w, w, 3, 2, transpose=True),
                         nn.Conv2d(w, c_out, 7, 1, 3, padding_mode="reflect"), nn.Tanh())


def discriminator(c_in=3, ndf=32):
    """PatchGAN (C32, C64, C128, then a map of patch scores): each output pixel scores one overlapping patch of the
    input as real (1) or fake (0); at 28x28 a patch is 34x34 px, the whole digit."""
    return nn.Sequential(nn.Conv2d(c_in, ndf, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(ndf, 2 * ndf, 4, 2, 1), nn.InstanceNorm2d(2 * ndf, affine=True), nn.LeakyReLU(0.2),
                         nn.Conv2d(2 * ndf, 4 * ndf, 4, 1, 1), nn.InstanceNorm2d(4 * ndf, affine=True),
                         nn.LeakyReLU(0.2),
                         nn.Conv2d(4 * ndf, 1, 4, 1, 1))


class ImagePool:
    """History of generated images: until full, store and return each new image; then with probability 1/2
    return a stored image (replacing it by the new one), else the new image (Zhu et al. section 4)."""
    def __init__(self, size, gen=None):
        self.size, self.images, self.gen = size, [], gen

    def query(self, batch):
        if self.size == 0:
            return batch.detach()                                        # D's loss must not reach G
        out = []
        for img in batch.detach():
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif torch.rand(1, generator=self.gen).item() < 0.5:
                i = torch.randint(self.size, (1,), generator=self.gen).item()
                out.append(self.images[i])
                self.images[i] = img
            else:
                out.append(img)
        return torch.stack(out)


# ----------------------------------------------------------------------------- losses
def lsgan_d_loss(d_real, d_fake):
    """1/2 [E (D_Y(y) - 1)^2 + E D_Y(G(x))^2]: real -> 1, fake -> 0 (002, "Cycle GANs (Zhu 2017)", Training, the
    note)."""
    return 0.5 * (((d_real - 1) ** 2).mean() + (d_fake ** 2).mean())


def lsgan_g_loss(d_fake):
    """E (D_Y(G(x)) - 1)^2: G wants its fakes called real (002, "Cycle GANs (Zhu 2017)", Training, the note)."""
    return ((d_fake - 1) ** 2).mean()


def adversarial_loss(D_X, D_Y, fake_x, fake_y):
    """L_GAN(G, D_Y) + L_GAN(F, D_X): D_Y judges G(x), D_X judges F(y) (002, "Cycle GANs (Zhu 2017)", Training)."""
    return lsgan_g_loss(D_Y(fake_y)) + lsgan_g_loss(D_X(fake_x))


def cycle_loss(G, F, x, y, fake_y, fake_x):
    """L_cyc(G, F) = E |F(G(x)) - x|_1 + E |G(F(y)) - y|_1, given G(x) and F(y) (002, "Cycle GANs (Zhu 2017)",
    Training)."""
    return (F(fake_y) - x).abs().mean() + (G(fake_x) - y).abs().mean()


def identity_loss(G, F, x, y):
    """L_id(G, F) = E |G(y) - y|_1 + E |F(x) - x|_1: each mapping leaves its own target domain alone (Zhu et al.
    section 5.2)."""
    return (G(y) - y).abs().mean() + (F(x) - x).abs().mean()


def pix2pix_d_loss(l_real, l_fake):
    """-[log D(x, y) + log(1 - D(x, G(x)))] on logits l, means over patches (002, "Conditional GANs example -
    Pix2Pix")."""
    return nnf.softplus(-l_real).mean() + nnf.softplus(l_fake).mean()


def pix2pix_g_loss(l_fake, fake_y, y, lam_l1):
    """-log D(x, G(x)) + lambda_L1 |y - G(x)|_1 (002, "Conditional GANs example - Pix2Pix", "Final loss"; |.|_1
    averaged over pixels)."""
    return nnf.softplus(-l_fake).mean() + lam_l1 * (y - fake_y).abs().mean()


# ----------------------------------------------------------------------------- training
def train_paired(cfg, G, D, device, state=None):
    """pix2pix for cfg.steps steps, each one D step and one G step on a batch of true pairs; state: --resume."""
    x_all, y_all, _ = load_pairs(cfg, "train")
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr, betas=(0.5, 0.999))
    decay = lambda step: min(1.0, 2 * (1 - step / cfg.steps))            # as for CycleGAN
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_d)]
    history = {"G loss": [], "D loss": []}
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt_g=opt_g, opt_d=opt_d, sched_g=scheds[0], sched_d=scheds[1])
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "cyclegan", every=500) as save:
        for step in range(start + 1, cfg.steps + 1):

            # a batch of true pairs (x, y), and G(x)
            idx = torch.randint(len(x_all), (cfg.batch_size,), generator=gen)
            x = x_all[idx].to(device)
            y = y_all[idx].to(device)
            fake_y = G(x)

            # one D step on the stacked pairs: (x, y) -> 1, (x, G(x)) -> 0
            loss_d = pix2pix_d_loss(D(torch.cat([x, y], 1)), D(torch.cat([x, fake_y.detach()], 1)))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()

            # one G step: -log D(x, G(x)) + lambda_L1 |y - G(x)|_1; grads pass through D, not into it
            D.requires_grad_(False)
            loss_g = pix2pix_g_loss(D(torch.cat([x, fake_y], 1)), fake_y, y, cfg.lambda_l1)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            D.requires_grad_(True)

            # learning rates, record, checkpoint
            for s in scheds:
                s.step()
            history["G loss"].append(loss_g.item())
            history["D loss"].append(loss_d.item())
            progress(step, loss_g.item() + loss_d.item())
            save(step, lambda: dict(G=G.state_dict(), D=D.state_dict(), opt_g=opt_g.state_dict(),
                                    opt_d=opt_d.state_dict(), sched_g=scheds[0].state_dict(),
                                    sched_d=scheds[1].state_dict(), history=history, rng=common.rng_states(gen)))
    return history


def train(cfg, nets, device, state=None):
    """cfg.steps steps of the two games and the cycle; state: a saved run to continue (--resume)."""
    G, F, D_X, D_Y = nets
    x_all, y_all, _, _ = load_domains(cfg, "train")
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order and the image pools
    batch = lambda t: t[torch.randint(len(t), (cfg.batch_size,), generator=gen)].to(device)   # independent draws
    opt_g = torch.optim.Adam(list(G.parameters()) + list(F.parameters()), cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(list(D_X.parameters()) + list(D_Y.parameters()), cfg.lr, betas=(0.5, 0.999))
    decay = lambda step: min(1.0, 2 * (1 - step / cfg.steps))            # 1 for the first half, then linear to 0
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_d)]
    pool_x = ImagePool(cfg.pool, gen)
    pool_y = ImagePool(cfg.pool, gen)
    history = {"G+F loss": [], "D_X+D_Y loss": []}
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt_g=opt_g, opt_d=opt_d, sched_g=scheds[0], sched_d=scheds[1])
        pool_x.images = [img.to(device) for img in state["pool_x"]]
        pool_y.images = [img.to(device) for img in state["pool_y"]]
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "cyclegan", every=500) as save:
        for step in range(start + 1, cfg.steps + 1):

            # independent batches of X and Y, and their translations
            x = batch(x_all)
            y = batch(y_all)
            fake_y = G(x)
            fake_x = F(y)

            # one step of G and F: grads pass through D_X and D_Y, not into them
            D_X.requires_grad_(False)
            D_Y.requires_grad_(False)
            # L_GAN(G, D_Y) + L_GAN(F, D_X) + lambda L_cyc (+ lambda_id lambda L_id)
            loss_g = adversarial_loss(D_X, D_Y, fake_x, fake_y)
            loss_g = loss_g + cfg.lambda_cyc * cycle_loss(G, F, x, y, fake_y, fake_x)
            if cfg.lambda_id > 0:
                loss_g = loss_g + cfg.lambda_id * cfg.lambda_cyc * identity_loss(G, F, x, y)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            D_X.requires_grad_(True)
            D_Y.requires_grad_(True)

            # one step of D_X and D_Y, on real images and fakes from the pools
            loss_d = lsgan_d_loss(D_Y(y), D_Y(pool_y.query(fake_y))) + lsgan_d_loss(D_X(x), D_X(pool_x.query(fake_x)))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()

            # learning rates, record, checkpoint
            for s in scheds:
                s.step()
            history["G+F loss"].append(loss_g.item())
            history["D_X+D_Y loss"].append(loss_d.item())
            progress(step, loss_g.item() + loss_d.item())
            save(step, lambda: dict({k: n.state_dict() for k, n in zip(("G", "F", "D_X", "D_Y"), nets)},
                                    opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), sched_g=scheds[0].state_dict(),
                                    sched_d=scheds[1].state_dict(), pool_x=pool_x.images, pool_y=pool_y.images,
                                    history=history, rng=common.rng_states(gen)))
    return history


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def translate(net, x, batch_size=500):
    net.eval()
    dev = next(net.parameters()).device
    return torch.cat([net(b.to(dev)).cpu() for b in x.split(batch_size)])


def grey(x):
    """[-1, 1] 3-channel images -> their channel mean in [0, 1], the evaluator's input (N, 1, S, S)."""
    return ((x.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)


def y_classifier(cfg):
    """The shared evaluator CNN trained (3 epochs) on the channel mean of the Y train images; shipped in evaluators/
    for digits, else cached in .cache/."""
    path = os.path.join(common.CACHE, f"classifier_{cfg.data}_cycleY_v2.pt")   # v2: bump when the recipe changes

    def y_train():
        _, y, _, labels = load_domains(cfg, "train")
        return grey(y), labels
    return metrics.cached_classifier(path, y_train, epochs=3)


def evaluate(cfg, G, F=None):
    """G(x) (and F(y), the cycles, without --paired) on held-out images: the cycles' L1; on the built-in domains the
    labels kept by G (Y's evaluator) and F (X's), fd_y, and the L1 to the true partner y of each x.
    translation.png rows: x, G(x), F(G(x)), y, F(y), G(F(y)); --paired: x, G(x), the true y."""
    x, y, lx, ly = (load_pairs(cfg, "test") + (None,)) if cfg.paired else load_domains(cfg, "test")
    x, y = x[:cfg.n_eval], y[:cfg.n_eval]
    fake_y = translate(G, x)
    rows = [x[:10], fake_y[:10], y[:10]]
    scores = {"l1_to_true_y": float((fake_y - y).abs().mean() / 2)} if cfg.paired else {}   # in [0, 1] pixel units
    if not cfg.paired:
        fake_x = translate(F, y)
        rec_x = translate(F, fake_y)
        rec_y = translate(G, fake_x)
        rows = [x[:10], fake_y[:10], rec_x[:10], y[:10], fake_x[:10], rec_y[:10]]
        scores = {"cycle_l1_x": float((rec_x - x).abs().mean() / 2),                # in [0, 1] pixel units
                  "cycle_l1_y": float((rec_y - y).abs().mean() / 2)}
    if lx is not None and cfg.image_size == 28:
        net_y = y_classifier(cfg)                                       # trained on Y
        feats_fake, p_fake = metrics.classify(net_y, grey(fake_y))
        feats_real, p_real = metrics.classify(net_y, grey(y))
        scores.update(label_preservation_xy=float((p_fake.argmax(1) == lx[:cfg.n_eval]).float().mean()),
                      fd_y=metrics.frechet_distance(feats_fake, feats_real))
    if lx is not None and cfg.image_size == 28 and not cfg.paired:
        p_back = metrics.classify(metrics.get_classifier(cfg.data, cfg.data_dir), grey(fake_x))[1]   # X's evaluator
        scores.update(label_preservation_yx=float((p_back.argmax(1) == ly[:cfg.n_eval]).float().mean()),
                      evaluator_y_accuracy=float((p_real.argmax(1) == ly[:cfg.n_eval]).float().mean()),
                      l1_to_true_y=float((fake_y - load_pairs(cfg, "test")[1][:cfg.n_eval]).abs().mean() / 2))
    common.save_images((torch.cat(rows) + 1) / 2, os.path.join(cfg.out, "translation.png"))
    common.save_images((fake_y[:100] + 1) / 2, os.path.join(cfg.out, "samples.png"))
    return scores, (fake_y + 1) / 2


def main(argv=None):
    cfg = common.parse_config(Config, argv, "cyclegan", __doc__)
    common.check(cfg.image_size % 4 == 0 and cfg.image_size >= 16, f"--image-size must be a multiple of 4 and at "
                 f"least 16 (two stride-2 steps), got {cfg.image_size}")
    common.check(cfg.lambda_cyc >= 0 and cfg.lambda_id >= 0 and cfg.lambda_l1 >= 0 and cfg.pool >= 0 and cfg.n_res >= 0
                 and min(cfg.width, cfg.ndf, cfg.n_eval) > 0, "--lambda-cyc, --lambda-id, --lambda-l1, --pool, --n-res "
                 "must be >= 0 and --width, --ndf, --n-eval > 0")
    common.check(not cfg.data_dir or is_folder_pair(cfg.data_dir) or cfg.data != "digits",
                 f"--data-dir {cfg.data_dir} has no trainA/ and trainB/ folders (digits need no --data-dir)")
    common.check(not (cfg.paired and is_folder_pair(cfg.data_dir)), "--paired trains on the built-in pairs: a folder "
                 "holds no pairs (leave out --data-dir)")
    state = common.load_run(cfg, "cyclegan") if cfg.sample_only or cfg.resume else None   # flags from the checkpoint

    # the networks: G, F, D_X, D_Y; pix2pix: G and D(x, y)
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.paired:
        nets = [generator(3, 3, cfg.width, cfg.n_res).to(device), discriminator(6, cfg.ndf).to(device)]
        keys = ("G", "D")
    else:
        nets = [generator(3, 3, cfg.width, cfg.n_res).to(device) for _ in range(2)] + \
            [discriminator(3, cfg.ndf).to(device) for _ in range(2)]
        keys = ("G", "F", "D_X", "D_Y")

    # train, or load the trained networks
    t0 = time.time()
    history = {}
    if state:
        for key, net in zip(keys, nets):
            net.load_state_dict(state[key])
    if cfg.sample_only:
        common.restore_rng(cfg, state)                                   # the training run's own samples
    elif cfg.paired:
        history = train_paired(cfg, nets[0], nets[1], device, state)
    else:
        history = train(cfg, nets, device, state)

    # translations of the test images and their scores
    scores, samples = evaluate(cfg, *nets[:1 if cfg.paired else 2])
    return common.finish(cfg, scores, t0, device, samples=samples, history=history)


if __name__ == "__main__":
    common.run(main)
