r"""metrics.py - how the samples are scored, and the exact optimal transport that serves as ground truth.

Lecture: 004 "Evaluation measures" (Borji's table: IS, FID, MMD, nearest neighbours...) and "Mode collapse";
004 "Optimal transport" and 000 Part B section 2 for the exact solvers. Imported by the scripts; runs nothing.

    evaluator        a small CNN with 11 classes: the ten digits and NOT_DIGIT, trained on the training images,
                     legible variants of half of them (digits too) and "not a digit" images made from them
    fd               ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) of the evaluator's 128-d features
                     (FID's formula, with our evaluator instead of Inception-v3: not comparable with papers)
    digit_confidence the fraction of samples the evaluator calls one of the ten digits with probability >= 0.9
    class_entropy    entropy (nats) of the most likely class over the samples it does not call NOT_DIGIT; log 10 =
                     2.303 is a perfect balance; their share is 1 - not_digit
    inception_score  exp(E_x KL(p(y|x) || p(y))) over the 11 classes (1 to 11)
    nn_ratio         nearest training image distance over the same for held-out images (< 1: copying)
    mmd              unbiased MMD^2 with a sum of Gaussian kernels (2-D data)
    modes            a 2-D sample is good within 3 std of its nearest mode; a mode is covered by one good sample
    likelihood       a 2-D model's test NLL, and where the data's density is known in closed form (log_density_2d)
                     its entropy H(p) and KL(p || p_theta) = NLL - H (nats)
    assignment       exact min-cost assignment by Bertsekas' auction; w_exact = W_p of two equal clouds by it
The evaluators of the built-in digits and colour digits ship in evaluators/ (training is chaotic: every machine must
score with the same net); for mnist, fashion, mnist10k, cifar10 and labelled folders one is trained once by the same
recipe and cached (an unlabelled folder gets nn_ratio only).
"""
import functools, hashlib, math, os

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import common

NOT_DIGIT = 10                           # the evaluator's 11th class: "not one of the ten" (see not_digits)
CLASSIFIER_EPOCHS = {"digits": 1, "mnist": 3, "fashion": 5, "mnist10k": 20, "color-digits": 2}  # >= 98% test accuracy


# ----------------------------------------------------------------------------- the evaluator's training data
def gaussian_blur(x, sigma):
    """x (N, C, H, W) blurred by a Gaussian of std sigma[i] pixels per image (zero padding)."""
    r = torch.arange(-8, 9, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(x.shape[1], 0)   # (N * C, 17)
    n, c, h, w = x.shape
    x = F.conv2d(x.reshape(1, n * c, h, w), k[:, None, None, :], padding=(0, 8), groups=n * c)  # along rows
    x = F.conv2d(x, k[:, None, :, None], padding=(8, 0), groups=n * c)                         # along columns
    return x.reshape(n, c, h, w)


def scribbles(n, gen, size=28):
    """n images of 4-6 random straight strokes 1-2.5 px wide, anywhere but the 3 px at the border."""
    k = 6
    p = 3 + (size - 6) * torch.rand(n, k, 2, 2, generator=gen)          # (N, strokes, ends, xy) in pixels
    r = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(r, r, indexing="xy"), -1).reshape(1, 1, -1, 2)  # (1, 1, H*W, 2): (x, y)
    a, b = p[:, :, None, 0], p[:, :, None, 1]                           # (N, k, 1, 2)
    t = ((grid - a) * (b - a)).sum(-1) / (b - a).pow(2).sum(-1).clamp(min=1e-6)
    dist = (grid - a - t.clamp(0, 1)[..., None] * (b - a)).norm(dim=-1)  # (N, k, H*W): distance to each segment
    width = 0.5 + 0.75 * torch.rand(n, k, 1, generator=gen)
    keep = torch.arange(k) < torch.randint(4, k + 1, (n, 1), generator=gen)  # 4-6 strokes per image
    ink = ((width + 0.5 - dist).clamp(0, 1) * keep[..., None]).amax(1)  # (N, H*W)
    return ink.reshape(n, 1, size, size)


def not_digits(x, y, n, seed):
    r"""n "not a digit" images made from images x (labels y) for the evaluator's class NOT_DIGIT, a fifth each:
    ghosts (two images of different classes overlaid 3-6 px apart), blobs (Gaussian blur of std 2.5-4 px rescaled
    to full ink), fragments (an image with its ink on one side of a random line near the ink's centre erased),
    scribbles (4-6 random strokes) and noise (smooth random shapes in the digit's box). Other kinds (warped,
    cut-up digits) are held out to test that it rejects what it has not seen."""
    gen = torch.Generator().manual_seed(seed)
    m = n // 5
    i = torch.randint(len(x), (m,), generator=gen)
    j = torch.randint(len(x), (m,), generator=gen)
    j = torch.where(y[j] == y[i], torch.randint(len(x), (m,), generator=gen), j)   # mostly different classes
    angle = 2 * math.pi * torch.rand(m, generator=gen)
    dist = 3 + 3 * torch.rand(m, generator=gen)                          # pixels between the two
    shift = torch.stack([dist * angle.cos(), dist * angle.sin()], 1) * 2 / x.shape[-1]   # normalised coords
    theta = torch.cat([torch.eye(2).expand(m, 2, 2), shift[:, :, None]], 2)            # (m, 2, 3)
    moved = F.grid_sample(x[j], F.affine_grid(theta, x[j].shape, align_corners=False), align_corners=False)
    ghost = torch.maximum(x[i], moved)
    k = torch.randint(len(x), (m,), generator=gen)
    blob = gaussian_blur(x[k], 2.5 + 1.5 * torch.rand(m, generator=gen))
    blob = blob / blob.amax((1, 2, 3), keepdim=True).clamp(min=1e-6)
    k = torch.randint(len(x), (m,), generator=gen)
    r = torch.linspace(-1, 1, x.shape[-1])
    normal = 2 * math.pi * torch.rand(m, 1, 1, generator=gen)
    side = r[None, None, :] * normal.cos() + r[None, :, None] * normal.sin()            # (m, H, W)
    ink = x[k].mean(1) / x[k].mean(1).sum((1, 2), keepdim=True).clamp(min=1e-6)
    centre = (ink * side).sum((1, 2), keepdim=True)                      # the ink's centre along the normal
    fragment = x[k] * (side > centre + 0.2 * torch.rand(m, 1, 1, generator=gen) - 0.1)[:, None]
    coarse = torch.rand(n - 4 * m, x.shape[1], 6, 6, generator=gen)
    noise = F.interpolate(coarse, size=x.shape[-1] - 8, mode="bicubic", align_corners=False)
    noise = F.pad(noise, (4, 4, 4, 4))                                  # a 4 px border
    noise = ((noise - 0.55) * 6).clamp(0, 1)
    scribble = scribbles(m, gen, x.shape[-1]).expand(-1, x.shape[1], -1, -1)
    return torch.cat([ghost, blob, fragment, scribble, noise]).clamp(0, 1)


def legible_variants(x, seed):
    """Each image of x changed the ways a generated digit may differ from the training set and still be legible:
    a gentle smooth warp (std 0.06 of the frame at 4x4 control points), a little blur (std 0-1 px) and speckle
    (2% of pixels set to random grey). The evaluator learns these as digits, so NOT_DIGIT means broken, not merely
    unlike the training images."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    d = torch.randn(n, 2, 4, 4, generator=gen) * 0.06
    d = F.interpolate(d, size=x.shape[-1], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)  # (N, H, W, 2)
    grid = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), x.shape, align_corners=False)
    x = F.grid_sample(x, grid + d, align_corners=False)
    x = gaussian_blur(x, 0.01 + torch.rand(n, generator=gen))
    speckle = torch.rand(x.shape, generator=gen) < 0.02
    return torch.where(speckle, torch.rand(x.shape, generator=gen), x).clamp(0, 1)


def with_negatives(x, y, fraction=0.2, seed=0, none=NOT_DIGIT):
    """The evaluator's training set: (x, y), legible_variants() of half of it, and fraction * len(x) not_digits()
    (at least 50) labelled none (the class after the data's own)."""
    half = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:len(x) // 2]
    neg = not_digits(x, y, max(int(fraction * len(x)), 50), seed)       # (at least 10 of each kind)
    labels = torch.cat([y, y[half], torch.full((len(neg),), none)])
    return torch.cat([x, legible_variants(x[half], seed), neg]), labels


# ----------------------------------------------------------------------------- the evaluator
def make_classifier(channels=1, size=28, classes=11):
    """Small CNN: 28x28 -> 14 -> 7 (32 -> 8, 64 -> 16) with strided convs, a 128-d feature layer net[:-1] (for fd),
    one logit per class: the data's classes, then the last, NOT_DIGIT (none of them)."""
    return nn.Sequential(nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 128),
                         nn.ReLU(), nn.Linear(128, classes))


def train_classifier(x, y, epochs, seed=0, batch_size=128):
    """Adam, random +-2 px shifts as augmentation; deterministic in seed (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = make_classifier(x.shape[1], x.shape[-1], int(y.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * math.ceil(len(x) / batch_size))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            loss = F.cross_entropy(net(torch.roll(x[idx], (dx, dy), (2, 3))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def cached_classifier(path, make_data, epochs):
    """An evaluator CNN: the shipped one, evaluators/<the file name of path>, if there is one; else trained once on
    make_data() -> (x, y) and cached at path. A broken file: one line. Training is chaotic: the same seed on another
    CPU or thread count ends in another net of the same accuracy that scores samples differently, so the built-in
    data's evaluators are trained once and shipped, and every machine measures with the same one."""
    shipped = os.path.join(common.EVALUATORS, os.path.basename(path))
    if os.path.exists(shipped):
        path = shipped
    elif not os.path.exists(path):
        x, y = make_data()
        with torch.random.fork_rng():                  # training it must not change the caller's random stream
            os.makedirs(os.path.dirname(path), exist_ok=True)
            common.save_checkpoint(path, **train_classifier(x, y, epochs).state_dict())
    state = common.load_checkpoint(path)                               # a corrupt file: one line naming it
    shape = state["0.weight"].shape[1], 4 * math.isqrt(state["7.weight"].shape[1] // 64), state["9.weight"].shape[0]
    with torch.random.fork_rng():                      # nor must building it (its random initial weights)
        net = make_classifier(*shape)
    net.load_state_dict(state)
    return net.eval()


def get_classifier(data, data_dir="", size=0, channels=0):
    """The shared evaluator for an image dataset (at size and channels: 0 = its own): trained once on
    with_negatives() of its train split (the images, legible variants of half of them, 20% as many not_digits()
    labelled as the class after the data's own); the colour digits' negatives are the grey digits' coloured.
    Shipped in evaluators/ for digits and color-digits at their own shape, else cached (for cifar10 and folders,
    under a hash of the training images)."""
    own = (3, 32) if data == "color-digits" else (1, 28)
    shape = (channels or own[0], size or own[1])
    name = data if shape == own else f"{data}_{shape[1]}x{shape[0]}"
    make_data = lambda: with_negatives(*common.load_images(data, "train", data_dir, size, channels))
    if data in ("cifar10", "folder"):
        x, y = common.load_images(data, "train", data_dir, size, channels)
        digest = hashlib.md5(x.numpy())                                  # (the buffers, not copies)
        digest.update(y.numpy())
        name = f"{data}_{digest.hexdigest()[:12]}"
        make_data = lambda: with_negatives(x, y, none=int(y.max()) + 1)
    elif name == "color-digits":
        make_data = color_digits_with_negatives
    path = os.path.join(common.CACHE, f"classifier_{name}_v2.pt")         # v2: bump it when the recipe changes
    epochs = CLASSIFIER_EPOCHS[data] if data in CLASSIFIER_EPOCHS else min(30, math.ceil(500000 / len(x)))
    net = cached_classifier(path, make_data, epochs)
    net.file = os.path.basename(path)                                   # named in metrics.json
    return net


def color_digits_with_negatives():
    """with_negatives() of the grey train digits padded to 32x32, coloured as common.color_digits colours them (the
    first 60000 are the color-digits train split)."""
    g, y = common.render_digits(60000, 0)
    x, y = with_negatives(F.pad(g, (2, 2, 2, 2)), y)
    return common.colorize(x, 0), y


@torch.no_grad()
def classify(net, x, batch_size=1000):
    """(features (N, 128), class probabilities (N, classes), the last NOT_DIGIT) of images x (N, C, S, S) in [0, 1]."""
    feats = torch.cat([net[:-1](b.float().cpu()) for b in x.split(batch_size)])
    return feats, net[-1](feats).softmax(1)


# ----------------------------------------------------------------------------- image metrics (004, evaluation)
def frechet_distance(f1, f2):
    r"""||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}), the FID formula (004, "Evaluation of GAN's"), in float64.
    Tr (S_1 S_2)^{1/2} = sum sqrt(eig(S_1^{1/2} S_2 S_1^{1/2})), which is symmetric PSD."""
    f1 = f1.double()
    f2 = f2.double()
    m1, s1 = f1.mean(0), torch.cov(f1.T)
    m2, s2 = f2.mean(0), torch.cov(f2.T)
    e, v = torch.linalg.eigh(s1)
    r1 = v @ torch.diag(e.clamp(min=0).sqrt()) @ v.T                  # S_1^{1/2}
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float((m1 - m2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


@functools.lru_cache(maxsize=4)
def real_features(data, data_dir, n_real, cache, size=0, channels=0):
    """The evaluator's features of the first n_real test images and its accuracy on them (over the data's classes),
    computed once per process (and cache folder)."""
    x, y = common.load_images(data, "test", data_dir, size, channels)
    feats, probs = classify(get_classifier(data, data_dir, size, channels), x[:n_real])
    return feats, float((probs.argmax(1) == y[:n_real]).float().mean())


def inception_score(probs):
    r"""IS = exp(E_x KL(p(y|x) || p(y))), p(y) = the mean of p(y|x) over the samples (004, Borji's table: "KLD
    between conditional and marginal label distributions"): 1 if every p(y|x) is the same, the number of classes
    for confident predictions spread evenly. Computed with the shared evaluator, not Inception-v3: our numbers do
    not compare with papers' Inception Scores."""
    log_p = probs.clamp(min=1e-12).log()
    log_p_y = probs.mean(0, keepdim=True).clamp(min=1e-12).log()
    return float((probs * (log_p - log_p_y)).sum(1).mean().exp())


def class_entropy(probs):
    """Entropy (nats) of the histogram of the most likely class over the samples whose most likely class is a
    digit (those called NOT_DIGIT are left out: their share is not_digit); 0 if there are none. log 10 for equal
    shares, 0 for one class (004, "Mode collapse causes low output diversity")."""
    none = probs.shape[1] - 1                                            # NOT_DIGIT
    top = probs.argmax(1)
    top = top[top != none]
    if len(top) == 0:
        return 0.0
    hist = torch.bincount(top, minlength=none).float() / len(top)
    entropy = -(hist * hist.clamp(min=1e-12).log()).sum()
    return max(float(entropy), 0.0)                                      # not -0.0 for a single class


def nn_ratio(x, train, test, batch=500):
    """Memorisation check (004, "Evaluation of GAN's": nearest neighbours): the mean pixel distance from each sample
    to its nearest training image, divided by the same for as many held-out test images. About 1 for a model that
    generalises like fresh data; < 1 flags samples closer to the training set than new data are (copying)."""
    train = train.flatten(1).float()                                     # (N, 784)
    train_sq = (train * train).sum(1)                                    # once per call (cdist redoes it per batch)

    def mean_nn(a):
        nearest = []
        for b in a.flatten(1).float().split(batch):                      # |b - t|^2 = |b|^2 + |t|^2 - 2 b.t
            d2 = (b * b).sum(1, keepdim=True) + train_sq[None] - 2 * b @ train.T
            nearest.append(d2.amin(1).clamp(min=0).sqrt())
        return torch.cat(nearest).mean()
    return float(mean_nn(x.cpu()) / mean_nn(test[:len(x)]))


def class_spread(feats, labels, real_feats, real_labels, n=300):
    """Variety within a class (004, "Mode collapse causes low output diversity"): the mean distance between the
    evaluator's features of two samples of class y, over the same for two real images of class y, averaged over
    the classes with at least 2 samples (n of each at most). About 1 for samples as varied as real digits; near 0
    when G draws one image per class whatever z is."""
    ratios = []
    for c in labels.unique():
        f = feats[labels == c][:n]
        r = real_feats[real_labels == c][:n]
        if len(f) > 1:
            ratios.append(torch.pdist(f).mean() / torch.pdist(r).mean())
    return float(torch.stack(ratios).mean())


def image_metrics(x, data, labels=None, data_dir="", n_real=10000, out=""):
    """fd (vs held-out test images), digit_confidence, not_digit (the share whose most likely class is NOT_DIGIT),
    class_entropy (over the others), inception_score, nn_ratio; with labels (the classes asked for),
    class_accuracy (NOT_DIGIT counts as wrong) and class_spread. With out, also writes out/scored.png. The data
    is read at the shape of x. cifar10 and folders add the evaluator's file and its test accuracy; an unlabelled
    folder has no evaluator: nn_ratio only."""
    size, channels = x.shape[-1], x.shape[1]
    x_train, y_train = common.load_images(data, "train", data_dir, size, channels)
    x_test, y_test = common.load_images(data, "test", data_dir, size, channels)
    if not common.labelled(y_train):
        return {"nn_ratio": nn_ratio(x, x_train, x_test)}
    net = get_classifier(data, data_dir, size, channels)
    feats, probs = classify(net, x)
    if out:
        save_scored(x, probs, os.path.join(out, "scored.png"))
    real_feats, accuracy = real_features(data, data_dir, n_real, common.CACHE, size, channels)
    none = probs.shape[1] - 1                                            # NOT_DIGIT
    metrics = {"fd": frechet_distance(feats, real_feats),
               "digit_confidence": float((probs[:, :none].max(1).values >= 0.9).float().mean()),
               "not_digit": float((probs.argmax(1) == none).float().mean()),
               "class_entropy": class_entropy(probs),
               "inception_score": inception_score(probs),
               "nn_ratio": nn_ratio(x, x_train, x_test)}
    if data in ("cifar10", "folder"):
        metrics.update(evaluator=net.file, evaluator_accuracy=accuracy)
    if labels is not None:
        metrics["class_accuracy"] = float((probs.argmax(1) == labels.cpu()).float().mean())
        if torch.bincount(labels.cpu()).max() > 1:                      # two samples of one class to compare
            metrics["class_spread"] = class_spread(feats, labels.cpu(), real_feats, y_test[:n_real])
    return metrics


def save_scored(x, probs, path, n=40):
    """n images of x spread evenly over the evaluator's ranking (most confident first), each titled with its most
    likely class ("not" = NOT_DIGIT) and that class's probability; a frame marks those digit_confidence counts
    (green) and those it does not (red). Drawn as one picture of pixels (fast), the titles as text."""
    score = probs[:, :-1].max(1).values
    order = score.argsort(descending=True)
    pick = order[torch.linspace(0, len(x) - 1, min(n, len(x))).round().long()]
    h, w = x.shape[-2:]
    cell_h, cell_w = h + 12, w + 6                                      # room for the frame, the gap and the title
    rows = math.ceil(len(pick) / 10)
    grid = torch.ones(rows * cell_h, 10 * cell_w, 3)                   # (H, W, RGB), white
    fig = Figure(figsize=(10, rows * cell_h / cell_w))                  # 10 inches wide, the grid's aspect
    ax = fig.add_axes((0, 0, 1, 1))
    for i, k in enumerate(pick.tolist()):
        top = (i // 10) * cell_h + 10
        left = (i % 10) * cell_w + 3
        frame = (0.17, 0.63, 0.17) if score[k] >= 0.9 else (0.84, 0.15, 0.16)   # tab:green, tab:red
        grid[top - 1:top + h + 1, left - 1:left + w + 1] = torch.tensor(frame)
        grid[top:top + h, left:left + w] = x[k].detach().float().cpu().clamp(0, 1).permute(1, 2, 0)   # grey -> RGB
        c = int(probs[k].argmax())
        ax.text(left + w / 2, top - 2, f"{'not' if c == len(probs[k]) - 1 else c} {float(probs[k, c]):.2f}", fontsize=8,
                ha="center", va="bottom")
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_axis_off()
    fig.savefig(path, dpi=80)


# ----------------------------------------------------------------------------- 2-D metrics
def mmd(x, y, bandwidths=(0.1, 0.3, 1.0, 3.0)):
    r"""Unbiased MMD^2 with k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) over the bandwidths h (004, "MMD")."""
    x = x.double().cpu()
    y = y.double().cpu()
    k = lambda d2: sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)      # d2: squared distances, computed once
    d2 = lambda a, b: torch.cdist(a, b) ** 2
    within = lambda a: (k(d2(a, a)).sum() - len(a) * len(bandwidths)) / (len(a) * (len(a) - 1))  # drop k(a_i, a_i)
    return float(within(x) + within(y) - 2 * k(d2(x, y)).mean())


def mode_metrics(x, name):
    """A sample is high quality if within 3 std of its nearest mode; a mode is covered if it is the nearest
    mode of at least one high-quality sample (004, "Evaluation of GAN's": distances to mode centres; the VEEGAN /
    PacGAN protocol, on 2500 samples)."""
    means, std = common.MODES[name]
    d, nearest = torch.cdist(x.detach().float().cpu(), means).min(1)
    good = d < 3 * std
    return {"modes_covered": int(nearest[good].unique().numel()), "high_quality_frac": float(good.float().mean())}


def support_frac(x):
    """Fraction of 2-D samples on the checkerboard's 8 squares: |x|, |y| <= 4 and floor(x/2) + floor(y/2) even."""
    cells = torch.floor(x / 2)
    inside = (x.abs() <= 4).all(1) & ((cells[:, 0] + cells[:, 1]) % 2 == 0)
    return float(inside.float().mean())


def point_metrics(x, name, seed=12345):
    """2-D metrics: mmd of (up to) 2500 samples against as many fresh data points; the mode metrics on ring8 and
    grid25; support_frac on the checkerboard."""
    n = min(len(x), 2500)
    out = {"mmd": mmd(x[:n], common.sample_2d(name, n, torch.Generator().manual_seed(seed)))}
    if name in common.MODES:
        out.update(mode_metrics(x[:2500], name))
    if name == "checkerboard":
        out["support_frac"] = support_frac(x)
    return out


def log_density_2d(name, x):
    """log p(x) (N,) of the built-in 2-D distribution `name` where it has a closed form (ring8, grid25, checkerboard,
    gaussian, banana), else None (moons, swissroll: their noise is added after a curve, no closed form)."""
    log_normal = lambda z, std: -0.5 * (z / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))   # per axis
    if name in common.MODES:
        means, std = common.MODES[name]
        per_mode = log_normal(x[:, None, :] - means[None], std).sum(-1)  # (N, K)
        return torch.logsumexp(per_mode, 1) - math.log(len(means))
    if name == "checkerboard":
        inside = (x.abs() <= 4).all(1) & ((torch.floor(x[:, 0] / 2) + torch.floor(x[:, 1] / 2)) % 2 == 0)
        return torch.where(inside, -math.log(32.0), -math.inf)
    if name == "gaussian":
        return log_normal(x, 1.0).sum(1)
    if name == "banana":                                   # undo the rotation, then y - x^2 + 0.5 ~ N(0, 1)
        a = math.pi / 5
        u, w = x[:, 0] * math.cos(a) + x[:, 1] * math.sin(a), -x[:, 0] * math.sin(a) + x[:, 1] * math.cos(a)
        return log_normal(u, 1.0) + log_normal(w - u ** 2 + 0.5, 1.0)   # both maps preserve area
    return None

def likelihood_metrics(log_p_theta, name, n):
    """Test NLL (nats) of n fresh points of the 2-D set `name` (seed 2) under a model's log-density log_p_theta
    (x -> (n,)); where the data's density is known, its entropy H(p) (Monte Carlo, 10^5 points, seed 3) and
    KL(p || p_theta) = E_p[log p - log p_theta] = NLL - H, with standard errors over the n points."""
    x = common.sample_2d(name, n, torch.Generator().manual_seed(2))
    nll = -log_p_theta(x).cpu().double()
    out = dict(nll=float(nll.mean()), nll_se=float(nll.std() / math.sqrt(n)))
    log_p = log_density_2d(name, x.double())
    if log_p is not None:
        ratio = log_p + nll                                              # log p - log p_theta, per point
        h = -log_density_2d(name, common.sample_2d(name, 100000, torch.Generator().manual_seed(3)).double())
        out.update(data_entropy=float(h.mean()), kl=float(ratio.mean()), kl_se=float(ratio.std() / math.sqrt(n)))
    return out


# ----------------------------------------------------------------------------- exact optimal transport
def w1_sorted(x, y):
    """W_1 between equal-size uniform 1-D samples, per column of (n, d) inputs: sort both, mean |x_(i) - y_(i)|
    (004, "Special case: 1D distribution")."""
    common.check(x.shape == y.shape, f"w1_sorted needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (torch.sort(x, 0)[0] - torch.sort(y, 0)[0]).abs().mean(0)


def assignment(C, eps_final=None, factor=5.0, max_rounds=10 ** 7):
    r"""Exact min-cost assignment perm[i] = j for a square C (n, n), by Bertsekas' auction with eps-scaling (an
    evaluation tool: the lectures give no solver). Every unassigned person i bids for its best object j (value
    -C_ij - price_j), raising its price by best - second best + eps; the highest bidder wins, the previous owner
    is freed. C is first reduced by its row and column minima (no assignment changes: every one pays the same
    sums), then the cost ends within n eps of the optimum: eps_final = 1e-9 max C_red / n bounds the gap by
    1e-9 max C_red, whatever constant C is offset by."""
    common.check(C.dim() == 2 and C.shape[0] == C.shape[1], f"assignment needs a square cost matrix, got "
                 f"{tuple(C.shape)}")
    common.check(bool(torch.isfinite(C).all()), "assignment needs a finite cost matrix (it holds NaN or inf)")
    C, n = C.double().cpu(), C.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    C = C - C.amin(1, keepdim=True)
    C = C - C.amin(0, keepdim=True)                                     # >= 0, a zero in every row and column
    scale = float(C.max()) or 1.0
    eps_final = eps_final or 1e-9 * scale / n
    price, eps, rounds = torch.zeros(n, dtype=torch.float64), scale / 2, 0
    while True:
        obj_of, owner = torch.full((n,), -1), torch.full((n,), -1)
        while (free := (obj_of < 0).nonzero()[:, 0]).numel():
            rounds += 1
            common.check(rounds <= max_rounds, f"assignment: no solution after {max_rounds} bidding rounds")
            top = (-C[free] - price).topk(2, dim=1)                    # best and second-best values (k, 2)
            j = top.indices[:, 0]
            bid = price[j] + top.values[:, 0] - top.values[:, 1] + eps
            best = torch.full((n,), -math.inf, dtype=torch.float64).scatter_reduce(0, j, bid, "amax")
            winner = torch.full((n,), -1)
            won = bid >= best[j]
            winner[j[won]] = free[won]                                  # one winner per object
            objs = (winner >= 0).nonzero()[:, 0]
            old = owner[objs]
            obj_of[old[old >= 0]] = -1
            owner[objs] = winner[objs]
            obj_of[winner[objs]] = objs
            price[objs] = best[objs]
        if eps <= eps_final:
            return obj_of
        eps = max(eps / factor, eps_final)


def w_exact(x, y, p=2):
    """W_p between two uniform clouds of equal size: (mean_i |x_i - y_perm(i)|^p)^{1/p}, perm from `assignment`: for
    uniform weights an optimal plan is a permutation (004, "Kantorovich relaxation")."""
    C = torch.cdist(x.double(), y.double()) ** p
    return float(C[torch.arange(len(x)), assignment(C)].mean() ** (1 / p))
