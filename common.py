r"""common.py - the plumbing every script shares (CLI, device, data, outputs, progress, evaluation); no models.
Image tensors are float32 (N, 1, 28, 28) with pixels in [0, 1]; each script maps to its own model range
(e.g. [-1, 1]) and back before saving or evaluating. 2-D data are float32 (N, 2).
"""
import argparse, dataclasses, functools, glob, gzip, hashlib, json, math, os, random, shlex, signal, struct, sys
import threading, time, urllib.request

import matplotlib.image
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

CACHE = os.environ.get("GENMODELS_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))
EVALUATORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluators")   # shipped evaluator weights

# ----------------------------------------------------------------------------- errors and CLI
class UserError(ValueError):
    """Bad input from the person running a script: printed as one line by run(), no traceback."""

def check(ok, message):
    if not ok:
        raise UserError(message)

def arg(default, help, choices=None):
    """A config field that becomes a command-line flag with this help text."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})

@dataclasses.dataclass
class Config:
    """Flags every script has; a script subclasses this and adds (or re-defaults) its own. NOT_FLAGS: fields
    that mean nothing for the script (not offered). MODEL_FLAGS: settings that define the trained model."""
    NOT_FLAGS = ()
    MODEL_FLAGS = ()
    device: str = arg("auto", "auto = cuda, then mps, then cpu", ["auto", "cpu", "cuda", "mps"])
    data: str = arg("digits", "dataset")
    data_dir: str = arg("", "folder with the IDX files of mnist/fashion (default: download to .cache/)")
    steps: int = arg(1000, "training steps (optimizer updates)")
    batch_size: int = arg(128, "examples per training step")
    lr: float = arg(1e-3, "learning rate")
    seed: int = arg(0, "random seed for python, numpy and torch (>= 0)")
    out: str = arg("", "output folder (default runs/<script>)")
    sample_only: bool = arg(False, "skip training: load the checkpoint in --out, sample and evaluate")
    resume: bool = arg(False, "continue the run saved in --out up to --steps steps (its other flags are read from it)")

    def defaults(self, given):
        """Hook: a script sets defaults that depend on other flags, for the flags not in `given` (e.g. {"--lr"})."""

def parse_config(cls, argv, script, doc=""):
    """Parse argv with flags made from the dataclass `cls`; cfg.given: the flags given (e.g. {"--steps"})."""
    p = argparse.ArgumentParser(prog=f"python {script}.py", description=(doc or "").strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        if f.name in cls.NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": type(f.default), "choices": f.metadata["choices"]}
        p.add_argument(flag, default=f.default, help=f.metadata["help"], **kind)
    cfg = cls(**vars(p.parse_args(argv)))
    cfg.argv = list(sys.argv[1:] if argv is None else argv)
    cfg.given = {a.split("=")[0] for a in cfg.argv if a.startswith("--")}
    cfg.defaults(cfg.given)
    check(cfg.steps > 0, f"--steps must be a positive integer, got {cfg.steps}")
    check(cfg.batch_size > 0, f"--batch-size must be a positive integer, got {cfg.batch_size}")
    check(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    check(cfg.seed >= 0, f"--seed must be a non-negative integer, got {cfg.seed}")
    check(not (cfg.resume and cfg.sample_only), "--resume trains and --sample-only does not: give one of them")
    cfg.out = cfg.out or os.path.join("runs", script)
    if not (cfg.resume or cfg.sample_only) and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        print(f"note: this new run replaces the checkpoint in {cfg.out} (to continue that run, add --resume)")
    for folder in (EVALUATORS, CACHE):
        for path in glob.glob(os.path.join(folder, f"classifier_{cfg.data}_*.pt")):
            load_checkpoint(path)                         # a broken evaluator file: an error now, not after training
    return cfg

def run(main):
    """`if __name__ == "__main__": common.run(main)`: bad input (a checkpoint whose shapes do not fit the model too)
    ends in one line on stderr, exit status 1; Ctrl-C in one line too, exit status 130 (during training the run is
    saved first: see Checkpoints)."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:                                            # a checkpoint of other shapes
        if "loading state_dict" not in str(e):
            raise
        first = str(e).splitlines()[1].strip().rstrip(".")              # the first mismatch torch names
        sys.exit(f"error: the checkpoint does not fit this model ({first}); an older version or other settings wrote "
                 f"it: train again, or point --out at another run")
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted (outside the training loop: nothing was saved)", file=sys.stderr)
        sys.exit(130)

# ----------------------------------------------------------------------------- device and seed
def get_device(name="auto"):
    """auto: cuda, then mps (Apple), then cpu. Asking for a device that is not there is an error."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    check(name != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA GPU is visible; use --device cpu")
    check(name != "mps" or has_mps, "--device mps: Apple's MPS backend is not available here; use --device cpu")
    return torch.device(name)

def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                                              # also seeds CUDA

# ----------------------------------------------------------------------------- 2-D data
MODES = {  # name -> (means, std per axis)
    "ring8": (torch.tensor([[2 * math.cos(math.pi * k / 4), 2 * math.sin(math.pi * k / 4)] for k in range(8)]), 0.02),
    "grid25": (torch.tensor([[a, b] for a in range(-4, 5, 2) for b in range(-4, 5, 2)]).float(), 0.05)}
POINT_DATA = ("ring8", "grid25", "checkerboard", "moons", "swissroll", "gaussian", "banana")

def sample_2d(name, n, gen=None):
    r"""n points (n, 2) float32 from a built-in 2-D distribution; `gen` is an optional torch.Generator.

    ring8        mixture of 8 Gaussians, means 2(cos 2pi k/8, sin 2pi k/8), std 0.02 per axis
    grid25       mixture of 25 Gaussians, means {-4,-2,0,2,4}^2, std 0.05
    checkerboard uniform (density 1/32) on the 8 squares of side 2 in [-4,4]^2 with floor(x/2)+floor(y/2) even
    moons        two interleaved half circles (noise 0.1), shifted and scaled by 2.5 to about [-4,4]^2
    swissroll    t = 1.5pi(1 + 2u), u ~ U[0,1], point (t cos t, t sin t)/3.5 + N(0, 0.05^2 I)
    gaussian     N(0, I)
    banana       x, y ~ N(0,1); y <- y + x^2 - 0.5; then rotated counter-clockwise by a = pi/5:
                 (x, y) <- (x cos a - y sin a, x sin a + y cos a)   (the mgn.py target)"""
    check(name in POINT_DATA, f"unknown 2-D dataset {name!r}; choose from {', '.join(POINT_DATA)}")
    randn = lambda *s: torch.randn(*s, generator=gen)
    rand = lambda *s: torch.rand(*s, generator=gen)
    if name in MODES:
        means, std = MODES[name]
        return means[torch.randint(len(means), (n,), generator=gen)] + std * randn(n, 2)
    if name == "checkerboard":
        k = torch.randint(8, (n,), generator=gen)
        row = k // 2                                       # 4 rows of squares, 2 per row
        col = 2 * (k % 2) + row % 2                        # keeps col + row even
        return torch.stack([col, row], 1).float() * 2 - 4 + 2 * rand(n, 2)
    if name == "moons":
        th = math.pi * rand(n)
        upper = rand(n) < 0.5
        x = torch.where(upper, torch.cos(th), 1 - torch.cos(th))
        y = torch.where(upper, torch.sin(th), 0.5 - torch.sin(th))
        return (torch.stack([x - 0.5, y - 0.25], 1) + 0.1 * randn(n, 2)) * 2.5
    if name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * rand(n))
        return torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 3.5 + 0.05 * randn(n, 2)
    if name == "gaussian":
        return randn(n, 2)
    x = randn(n)                                           # banana
    y = randn(n) + x ** 2 - 0.5
    a = math.pi / 5
    return torch.stack([x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)], 1)

# ----------------------------------------------------------------------------- image data
IMAGE_DATA = ("digits", "mnist", "fashion", "mnist10k")
DIGIT_NAMES = "zero one two three four five six seven eight nine".split()

def digit_fonts():
    """matplotlib's bundled TrueType fonts whose glyphs at '0'..'9' really are digits (by glyph name)."""
    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".ttf")]
    is_digit = lambda ft, k: ft.get_glyph_name(ft.get_char_index(ord(str(k)))).startswith(DIGIT_NAMES[k])
    return [p for p in paths if all(is_digit(FT2Font(p), k) for k in range(10))]

@functools.lru_cache(maxsize=1)
def _glyphs():
    """Every digit of every font, 64x64, its ink box scaled to 44 px high and centred; 4 stroke widths.
    Returns (4, n_fonts * 10, 1, 64, 64) in [0, 1]; glyph index = font * 10 + digit."""
    out = []
    for path in digit_fonts():
        ft = FT2Font(path)
        for k in range(10):
            ft.set_size(96, 72)
            ft.set_text(str(k))
            ft.draw_glyphs_to_bitmap()
            g = torch.from_numpy(np.asarray(ft.get_image(), dtype=np.float32) / 255)
            rows, cols = g.sum(1).nonzero(), g.sum(0).nonzero()
            g = g[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            h, w = g.shape
            s = 44 / max(h, w * 44 / 40)                           # fit a 44 (high) x 40 (wide) box
            g = F.interpolate(g[None, None], size=(max(1, round(h * s)), max(1, round(w * s))),
                              mode="bilinear", antialias=True, align_corners=False)[0, 0]
            top, left = (64 - g.shape[0]) // 2, (64 - g.shape[1]) // 2
            out.append(F.pad(g, (left, 64 - g.shape[1] - left, top, 64 - g.shape[0] - top)))  # centred in 64x64
    x = torch.stack(out)[:, None]                                   # (G, 1, 64, 64)
    thin = -F.max_pool2d(-x, 3, 1, 1)                               # erosion
    return torch.stack([thin, x, F.max_pool2d(x, 3, 1, 1), F.max_pool2d(x, 5, 1, 2)]).clamp(0, 1)

def render_digits(n, seed):
    r"""n digit images (n, 1, 28, 28) in [0, 1] and labels 0-9 (balanced, shuffled), deterministic in seed.
    Each is a font glyph with random stroke width (erode, none, dilate 3, dilate 5), then one affine map:
    rotation +-15 deg, height 15-20 px, width x0.75-1.1, shear +-0.3, shift +-1.5 px; drawn at 56x56
    by bilinear sampling and averaged 2x2 down to 28x28 (anti-aliasing)."""
    gen = torch.Generator().manual_seed(seed)
    glyphs = _glyphs()
    n_fonts = glyphs.shape[1] // 10
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=gen)]
    idx = torch.randint(n_fonts, (n,), generator=gen) * 10 + labels
    width = torch.randint(4, (n,), generator=gen)
    rot, height, aspect, shear = u(-0.26, 0.26), u(15, 20), u(0.75, 1.1), u(-0.3, 0.3)
    shift = torch.stack([u(-1.5, 1.5), u(-1.5, 1.5)], 1) * 2 / 28             # pixels -> normalised coords
    sy = (44 / 64) / (height / 28)                                       # output units -> glyph units
    sx = sy / aspect                                                     # (44 px glyph in 64, height px in 28)
    c, s = torch.cos(rot), torch.sin(rot)
    # theta maps output coords to glyph coords: A = scale . shear . rotation, then shift
    A = torch.stack([torch.stack([sx * c, sx * (shear * c - s)], 1), torch.stack([sy * s, sy * c], 1)], 1)  # (n, 2, 2)
    theta = torch.cat([A, -A @ shift[:, :, None]], 2)                                                      # (n, 2, 3)
    images = []
    for i in range(0, n, 4096):
        src = glyphs[width[i:i + 4096], idx[i:i + 4096]]                # (b, 1, 64, 64)
        grid = F.affine_grid(theta[i:i + 4096], (len(src), 1, 56, 56), align_corners=False)
        images.append(F.avg_pool2d(F.grid_sample(src, grid, align_corners=False), 2))
    return torch.cat(images).clamp(0, 1), labels

IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MIRRORS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
           "fashion": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}   # serves no https: MD5 checked
MD5 = {  # of each published .gz file, in the order train images, train labels, test images, test labels
    "mnist": "f68b3c2dcbeaaa9fbdd348bbdeb94873 d53e105ee54ea40749a09fcbcd1e9432 9fb629c4189551a2d022fa330f9573f3 "
             "ec29112dd5afa0611ce80d1b7f02629c",
    "fashion": "8d4fb7e6c68d591d4c3dfef9ec88bf0d 25c81989df183df01b3e8a0aad5dffbe bef4ecab320f06d8554ea6380940ec79 "
               "bb300cfdad3c16e7a12a480ee83cd310"}
MAX_DOWNLOAD = 64 * 2 ** 20                                              # bytes; the largest file is 26 MB

def read_idx(path):
    """One IDX file (gzipped or not) as a numpy uint8 array; magic number and size are checked."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
        magic, n = struct.unpack(">II", raw[:8])
    except (OSError, EOFError, struct.error) as e:
        raise UserError(f"{path} is corrupt or truncated ({e}); delete it and fetch it again")
    check(magic in (2049, 2051), f"{path}: bad magic number {magic} (2049 = labels, 2051 = images), not an IDX file")
    dims, start = ((n,) + struct.unpack(">II", raw[8:16]), 16) if magic == 2051 else ((n,), 8)
    check(len(raw) - start == int(np.prod(dims)), f"{path}: header says {dims} but the file holds "
          f"{len(raw) - start} bytes of data (truncated or corrupt); delete it and fetch it again")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(dims)

def download(name, file, folder):
    """Fetch one IDX file (at most MAX_DOWNLOAD bytes); write it only if its MD5 is that file's published one."""
    with urllib.request.urlopen(MIRRORS[name] + file, timeout=20) as r:
        raw = r.read(MAX_DOWNLOAD + 1)
    md5 = dict(zip(IDX_FILES["train"] + IDX_FILES["test"], MD5[name].split()))[file]
    if len(raw) > MAX_DOWNLOAD or hashlib.md5(raw).hexdigest() != md5:
        raise OSError(f"{file}: too large or checksum mismatch")
    with open(os.path.join(folder, file), "wb") as out:                  # written only once verified
        out.write(raw)

def load_idx_dataset(name, split, data_dir=""):
    """mnist / fashion from the IDX files in data_dir, else in .cache/<name> (downloaded there, never into data_dir)."""
    folder = data_dir or os.path.join(CACHE, name)
    files = IDX_FILES[split]
    missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
    check(not missing or not data_dir, f"{name}: {', '.join(missing)} not found in --data-dir "
          f"{os.path.abspath(folder)}; check the folder, leave --data-dir out to download into {CACHE}, "
          f"or use --data digits")
    if missing:
        try:
            os.makedirs(folder, exist_ok=True)
            for f in missing:
                download(name, f, folder)
        except OSError as e:
            raise UserError(f"{name}: {', '.join(missing)} not found in {os.path.abspath(folder)} and the download "
                            f"failed ({e}); put the files in a folder and pass --data-dir FOLDER, or use "
                            f"--data digits, which needs no files")
    x, y = (read_idx(os.path.join(folder, f)) for f in files)
    check(len(x) == len(y), f"{name} {split}: {len(x)} images but {len(y)} labels")
    return torch.from_numpy(x.astype(np.float32) / 255)[:, None], torch.from_numpy(y.astype(np.int64))

@functools.lru_cache(maxsize=8)
def load_images(name, split="train", data_dir=""):
    """(x, y): x (N, 1, 28, 28) float32 in [0, 1], y (N,) int64. Cached in memory: do not modify in place.
    digits    rendered here: train 60000 (seed 0), test 10000 (seed 1); no files, no network
    mnist, fashion   the standard IDX files (train 60000 / test 10000)
    mnist10k  only the 10000-image MNIST test files (t10k-*), permuted with seed 0: train 8000 / test 2000"""
    check(name in IMAGE_DATA, f"unknown image dataset {name!r}; choose from {', '.join(IMAGE_DATA)}")
    check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return render_digits(60000 if split == "train" else 10000, 0 if split == "train" else 1)
    if name == "mnist10k":
        x, y = load_idx_dataset("mnist", "test", data_dir)
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        keep = keep[:8000] if split == "train" else keep[8000:]
        return x[keep], y[keep]
    return load_idx_dataset(name, split, data_dir)

# ----------------------------------------------------------------------------- outputs
def save_images(x, path, labels=None, nrow=10):
    """Image grid of x (N, C, H, W) in [0, 1]; with labels, one row per class (first nrow of each)."""
    x = x.detach().float().cpu().clamp(0, 1)
    if labels is not None:
        x = torch.cat([x[labels.cpu() == c][:nrow] for c in labels.unique()])
    n, c, h, w = x.shape
    grid = torch.full((c, math.ceil(n / nrow) * (h + 2) + 2, nrow * (w + 2) + 2), 0.5)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = x[i]
    grid = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()  # (H, W) or (H, W, 3)
    matplotlib.image.imsave(path, grid, cmap="gray", vmin=0, vmax=1)

def save_scored(x, probs, path, n=40):
    """n images of x spread evenly over the evaluator's ranking (most confident first), each titled with its most
    likely class ("not" = NOT_DIGIT) and that class's probability; a frame marks those digit_confidence counts
    (green) and those it does not (red). One picture drawn as pixels: 40 small plots took 1.3 s, this 0.1 s."""
    score = probs[:, :NOT_DIGIT].max(1).values
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
        grid[top:top + h, left:left + w] = x[k, 0].detach().float().cpu().clamp(0, 1)[:, :, None]   # grey -> RGB
        c = int(probs[k].argmax())
        ax.text(left + w / 2, top - 2, f"{'not' if c == NOT_DIGIT else c} {float(probs[k, c]):.2f}", fontsize=8,
                ha="center", va="bottom")
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_axis_off()
    fig.savefig(path, dpi=80)

def save_points(x, path, ref=None, title=""):
    """Scatter plot of 2-D samples x (N, 2), over reference data ref (grey) if given."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    if ref is not None:
        ax.scatter(*ref.cpu().numpy().T, s=2, c="0.7", label="data")
    ax.scatter(*x.detach().cpu().numpy().T, s=2, c="tab:blue", label="samples")
    ax.set(xlim=(-5, 5), ylim=(-5, 5), aspect="equal", title=title)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100, bbox_inches="tight")

def save_losses(history, path, logy=False):
    """history: {name: [values per step]} -> one curve per name (log y axis if logy)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, values in history.items():
        ax.plot(values, label=name, lw=0.8)
    ax.set(xlabel="step", yscale="log" if logy else "linear")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")

def finish(cfg, metrics, t0, device, samples=None, history=None, logy=False):
    """End of a run: samples.pt (data range), loss.png, metrics.json (+ steps, seconds, device, seed, config)."""
    if samples is not None:
        torch.save(samples, os.path.join(cfg.out, "samples.pt"))
    if history:
        save_losses(history, os.path.join(cfg.out, "loss.png"), logy)
    record = dict(metrics, steps=0 if cfg.sample_only else cfg.steps, seconds=round(time.time() - t0, 2),
                  device=str(device), seed=cfg.seed, torch_version=torch.__version__, config=dataclasses.asdict(cfg))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(" ".join(f"{k} {v:.4g}" for k, v in numbers.items()), f"({record['seconds']}s)")
    return record

# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, **state):
    """Save via path.tmp and a rename (atomic); non-finite weights are refused and the old file is kept."""
    for key, value in state.items():
        for name, t in (value.items() if isinstance(value, dict) else [(key, value)]):
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"not saving {path}: {key} {name} holds NaN or inf (training diverged); the last "
                                f"good checkpoint is kept; try a smaller --lr")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path, script=None):
    """The dict saved by save_checkpoint; with script, it must have been written by that script."""
    check(os.path.exists(path), f"no checkpoint at {path}: train first (without --sample-only) or set --out to a run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)         # tensors and plain types only
    except Exception as e:                                                    # any unpickling or zip error
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it (and train again)")
    written_by = state.get("script") if isinstance(state, dict) else None
    check(script is None or written_by == script, f"{path} was not written by {script}.py (it says "
          f"{written_by or 'nothing'}); point --out at a {script}.py run folder")
    return state

RESUME_FREE = ("device", "out", "steps", "resume", "sample_only")      # flags a resumed run may change

def load_run(cfg, script):
    r"""The checkpoint in cfg.out, with cfg made to agree with it. --sample-only: the MODEL_FLAGS are read from it.
    --resume: every flag but --device, --out and --steps is, and --steps defaults to the saved run's. A given flag
    that differs from the saved one is an error that names it."""
    path = os.path.join(cfg.out, "checkpoint.pt")
    check(os.path.exists(path) or not cfg.resume,
          f"--resume: no checkpoint at {path}; start the run without --resume (it saves there as it trains)")
    state = load_checkpoint(path, script)
    saved = state.get("config", {})
    fields = cfg.MODEL_FLAGS if cfg.sample_only else [f for f in saved if f not in RESUME_FREE and hasattr(cfg, f)]
    for field in fields:
        value = saved.get(field, getattr(cfg, field))
        flag = "--" + field.replace("_", "-")
        given = {flag, "--no-" + flag[2:]} & cfg.given                  # --name, or --no-name for a switch
        check(not given or getattr(cfg, field) == value,
              f"{flag} {getattr(cfg, field)} contradicts the checkpoint in {cfg.out}, trained with {flag} {value}; "
              f"leave {flag} out (it is read from the checkpoint)")
        setattr(cfg, field, value)
    if cfg.sample_only:                                 # defaults that follow the saved data (images: --n-samples)
        cfg.defaults(cfg.given)
    if cfg.resume:
        check("rng" in state, f"{path} holds weights only (an older version wrote it): it cannot be continued")
        cfg.steps = cfg.steps if "--steps" in cfg.given else saved["steps"]
        check(state["step"] < cfg.steps, f"the run in {cfg.out} already has {state['step']} steps: continue it with "
              f"a larger --steps, or sample it with --sample-only")
    return state

# ----------------------------------------------------------------------------- resume and Ctrl-C
def rng_states(*generators):
    """Every random state of a run: python, numpy, torch (CPU and CUDA; not MPS) and the script's torch.Generators."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [g.get_state() for g in generators]}

def set_rng_states(states, *generators):
    """Undo rng_states: every random stream continues exactly where it was saved."""
    random.setstate(states["python"])
    keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for g, s in zip(generators, states["generators"]):
        g.set_state(s)

def resume(state, gen, **objects):
    """--resume: each object (optimizer, scheduler) loads its state_dict from state[name], and the random states
    (global and gen's) are set back; returns the saved (history, step) to continue from."""
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    set_rng_states(state["rng"], gen)
    return state["history"], state["step"]

def restore_rng(cfg, state):
    """--sample-only: the random state at the end of the saved run, so the samples are the training run's own
    (with --seed given: fresh ones from that seed)."""
    if "--seed" not in cfg.given and "rng" in state:                   # (checkpoints of older versions have none)
        set_rng_states(state["rng"])

class Interrupted(Exception):
    """Ctrl-C while training, after the run was saved: run() prints the message alone, exit status 130."""

class Checkpoints:
    r"""`with Checkpoints(cfg, script, every) as save:` around the training loop and `save(step, state)` at the end
    of each step, where state() returns all the run needs to continue (called only when saving). It saves to
    cfg.out/checkpoint.pt every `every` steps, at the last step, and after Ctrl-C: inside the block SIGINT only
    sets a flag, so the step in progress finishes and is saved, then Interrupted stops the run."""
    def __init__(self, cfg, script, every):
        self.cfg = cfg
        self.script = script
        self.every = every
        self.stop = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():       # only the main thread can catch signals
            self.previous = signal.signal(signal.SIGINT, self.request_stop)
        return self

    def request_stop(self, signum=None, frame=None):
        self.stop = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def __call__(self, step, state):
        if self.stop or step % self.every == 0 or step == self.cfg.steps:
            record = {"script": self.script, "step": step, "config": dataclasses.asdict(self.cfg), **state()}
            save_checkpoint(os.path.join(self.cfg.out, "checkpoint.pt"), **record)
        if self.stop:
            flags = [shlex.quote(a) for a in self.cfg.argv if a != "--resume"] + ["--resume"]
            again = " ".join(["python", f"{self.script}.py"] + flags)
            raise Interrupted(f"interrupted at step {step}/{self.cfg.steps}; continue with: {again}")

# ----------------------------------------------------------------------------- moving average of weights
@torch.no_grad()
def ema_update(ema, model, step, max_decay):
    r"""theta_ema <- d theta_ema + (1 - d) theta, d = min(max_decay, (1 + step) / (10 + step)): the warm-up forgets
    the random initial weights. Buffers (BatchNorm statistics, a running w_avg) are copied. Returns d."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
    return decay

# ----------------------------------------------------------------------------- images from files
def read_rgb(path, grey_ok=False, dtype=torch.float32):
    """An image file as (image (H, W, 3), colours of its opaque pixels (alpha > 0.5) (N, 3)), in [0, 1].
    A greyscale image is copied to 3 channels if grey_ok, else refused: its pixels are not colours."""
    check(os.path.isfile(path), f"image not found: {path}")
    try:
        im = matplotlib.image.imread(path)
    except Exception as e:                                                   # PIL and matplotlib raise many kinds
        raise UserError(f"{path} is not an image that matplotlib can read ({type(e).__name__}); remove it")
    im = torch.tensor(im.copy(), dtype=dtype) / (255.0 if im.dtype.kind == "u" else 1.0)
    im = im[..., None] if im.ndim == 2 else im                            # (H, W, C): C = 1, 2 (grey, alpha), 3, 4
    channels = im.shape[-1]
    check(grey_ok or channels >= 3, f"{path} is a greyscale image; it has no colours: give an RGB or RGBA image")
    rgb = im[..., :3] if channels >= 3 else im[..., :1].expand(-1, -1, 3)
    if channels in (2, 4):
        return rgb, rgb[im[..., -1] > 0.5]
    return rgb, rgb.reshape(-1, 3)

# ----------------------------------------------------------------------------- 2-D pictures
@torch.no_grad()
def surface(f):
    """f (D's probability or the critic) on a 120x120 grid over [-5, 5]^2, evaluated now: (120, 120)."""
    g = torch.linspace(-5, 5, 120)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)          # (120*120, 2)
    return f(grid).view(120, 120)

def save_progress(snapshots, path):
    """One panel per (surface values, fake points, real points, title): heat map, real black, generated yellow."""
    fig = Figure(figsize=(3 * len(snapshots), 3.2))
    for ax, (values, x_fake, x_real, title) in zip(fig.subplots(1, len(snapshots)), snapshots):
        im = ax.imshow(values.numpy(), extent=(-5, 5, -5, 5), origin="lower", cmap="coolwarm", alpha=0.8)
        ax.scatter(*x_real.numpy().T, s=1, c="k", alpha=0.3)
        ax.scatter(*x_fake.numpy().T, s=2, c="yellow")
        ax.set(xlim=(-5, 5), ylim=(-5, 5), xticks=[], yticks=[])
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.savefig(path, dpi=100, bbox_inches="tight")

# ----------------------------------------------------------------------------- progress
class Progress:
    """Call once per step with the loss: raises on NaN/inf, prints a line 20 times per run."""
    def __init__(self, total, start=0, lines=20):
        self.total = total
        self.start = start
        self.every = max(1, total // lines)
        self.t0 = time.time()

    def __call__(self, step, loss):
        loss = float(loss)
        if not math.isfinite(loss):
            raise UserError(f"loss became {loss} at step {step}: training diverged (the checkpoints saved before it "
                            f"are kept); try a smaller --lr")
        if step % self.every == 0 or step == self.total:
            rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
            print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} steps/s  "
                  f"ETA {(self.total - step) / max(rate, 1e-9):.0f}s", flush=True)

# ----------------------------------------------------------------------------- evaluation
NOT_DIGIT = 10                           # the evaluator's 11th class: "not one of the ten" (see not_digits)

def gaussian_blur(x, sigma):
    """x (N, 1, H, W) blurred by a Gaussian of std sigma[i] pixels per image (zero padding)."""
    r = torch.arange(-8, 9, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                                      # (N, 17)
    n, _, h, w = x.shape
    x = F.conv2d(x.reshape(1, n, h, w), k[:, None, None, :], padding=(0, 8), groups=n)  # along rows
    x = F.conv2d(x, k[:, None, :, None], padding=(8, 0), groups=n)                     # along columns
    return x.reshape(n, 1, h, w)

def scribbles(n, gen, size=28):
    """n images of 4-6 random straight strokes 1-2.5 px wide, anywhere in the central 22x22 px."""
    k = 6
    p = 3 + 22 * torch.rand(n, k, 2, 2, generator=gen)                  # (N, strokes, ends, xy) in pixels
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
    ink = x[k, 0] / x[k, 0].sum((1, 2), keepdim=True).clamp(min=1e-6)
    centre = (ink * side).sum((1, 2), keepdim=True)                      # the ink's centre along the normal
    fragment = x[k] * (side > centre + 0.2 * torch.rand(m, 1, 1, generator=gen) - 0.1)[:, None]
    coarse = torch.rand(n - 4 * m, 1, 6, 6, generator=gen)
    noise = F.pad(F.interpolate(coarse, size=20, mode="bicubic", align_corners=False), (4, 4, 4, 4))  # in 20x20
    noise = ((noise - 0.55) * 6).clamp(0, 1)
    return torch.cat([ghost, blob, fragment, scribbles(m, gen, x.shape[-1]), noise]).clamp(0, 1)

def make_classifier():
    """Small CNN: 28x28 -> 14 -> 7 with strided convs, a 128-d feature layer net[:-1] (for fd), 11 logits
    (ten classes and NOT_DIGIT)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(),
                         nn.Linear(128, 11))

def train_classifier(x, y, epochs, seed=0, batch_size=128):
    """Adam, random +-2 px shifts as augmentation; deterministic in seed (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = make_classifier()
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

CLASSIFIER_EPOCHS = {"digits": 1, "mnist": 3, "fashion": 5, "mnist10k": 20}  # >= 98% test accuracy

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

def with_negatives(x, y, fraction=0.2, seed=0):
    """The evaluator's training set: (x, y), legible_variants() of half of it, and fraction * len(x) not_digits()
    labelled NOT_DIGIT."""
    half = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:len(x) // 2]
    neg = not_digits(x, y, int(fraction * len(x)), seed)
    labels = torch.cat([y, y[half], torch.full((len(neg),), NOT_DIGIT)])
    return torch.cat([x, legible_variants(x[half], seed), neg]), labels

def cached_classifier(path, make_data, epochs):
    """An evaluator CNN: the shipped one, evaluators/<the file name of path>, if there is one; else trained once on
    make_data() -> (x, y) and cached at path. A broken file: one line. Training is chaotic: the same seed on another
    CPU or thread count ends in another net of the same accuracy that scores samples differently (README), so the
    built-in data's evaluators are trained once and shipped, and every machine measures with the same one."""
    shipped = os.path.join(EVALUATORS, os.path.basename(path))
    if os.path.exists(shipped):
        path = shipped
    elif not os.path.exists(path):
        x, y = make_data()
        with torch.random.fork_rng():                  # training it must not change the caller's random stream
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_checkpoint(path, **train_classifier(x, y, epochs).state_dict())
    with torch.random.fork_rng():                      # nor must building it (its random initial weights)
        net = make_classifier()
    net.load_state_dict(load_checkpoint(path))                         # a corrupt file: one line naming it
    return net.eval()

def get_classifier(data, data_dir=""):
    """The shared evaluator for an image dataset: trained once on with_negatives() of its train split (the images,
    legible variants of half of them, 20% as many not_digits()); shipped in evaluators/ for digits, else cached."""
    path = os.path.join(CACHE, f"classifier_{data}_v2.pt")                # v2: bump it when the recipe changes
    make_data = lambda: with_negatives(*load_images(data, "train", data_dir))
    return cached_classifier(path, make_data, CLASSIFIER_EPOCHS[data])

@torch.no_grad()
def classify(net, x, batch_size=1000):
    """(features (N, 128), class probabilities (N, 11), the last NOT_DIGIT) of images x (N, 1, 28, 28) in [0, 1]."""
    feats = torch.cat([net[:-1](b.float().cpu()) for b in x.split(batch_size)])
    return feats, net[-1](feats).softmax(1)

def frechet_distance(f1, f2):
    r"""||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}), the FID formula, in float64.
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
def real_features(data, data_dir, n_real, cache):
    """The evaluator's features of the first n_real test images, computed once per process (and cache folder)."""
    return classify(get_classifier(data, data_dir), load_images(data, "test", data_dir)[0][:n_real])[0]

def inception_score(probs):
    r"""IS = exp(E_x KL(p(y|x) || p(y))), p(y) = the mean of p(y|x) over the samples (004, Borji's table: "KLD
    between conditional and marginal label distributions"): 1 if every p(y|x) is the same, the number of classes
    for confident predictions spread evenly. Computed with the shared evaluator, not Inception-v3: our numbers do
    not compare with papers' Inception Scores."""
    log_p = probs.clamp(min=1e-12).log()
    log_p_y = probs.mean(0, keepdim=True).clamp(min=1e-12).log()
    return float((probs * (log_p - log_p_y)).sum(1).mean().exp())

def nn_ratio(x, train, test, batch=500):
    """Memorisation check: the mean pixel distance from each sample to its nearest training image, divided by the
    same for as many held-out test images. About 1 for a model that generalises like fresh data; < 1 flags
    samples closer to the training set than new data are (copying)."""
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
    """Variety within a class: the mean distance between the evaluator's features of two samples of class y, over
    the same for two real images of class y, averaged over the classes with at least 2 samples (n of each at most).
    About 1 for samples as varied as real digits; near 0 when G draws one image per class whatever z is."""
    ratios = []
    for c in labels.unique():
        f = feats[labels == c][:n]
        r = real_feats[real_labels == c][:n]
        if len(f) > 1:
            ratios.append(torch.pdist(f).mean() / torch.pdist(r).mean())
    return float(torch.stack(ratios).mean())

def image_metrics(x, data, labels=None, data_dir="", n_real=10000, out=""):
    """fd (vs held-out test images); digit_confidence (the fraction the evaluator calls one of the ten classes with
    probability >= 0.9); not_digit (the fraction whose most likely class is NOT_DIGIT); class_entropy (nats) of
    the most likely of the ten classes; inception_score over the ten; nn_ratio; if labels, class_accuracy (a
    sample called NOT_DIGIT counts as wrong) and class_spread (variety within each asked-for class). With out, also
    writes out/scored.png (save_scored)."""
    net = get_classifier(data, data_dir)
    feats, probs = classify(net, x)
    if out:
        save_scored(x, probs, os.path.join(out, "scored.png"))
    digit_probs = probs[:, :NOT_DIGIT] / probs[:, :NOT_DIGIT].sum(1, keepdim=True)  # p(y | x, a digit)
    real_feats = real_features(data, data_dir, n_real, CACHE)
    hist = torch.bincount(digit_probs.argmax(1), minlength=10).float() / len(x)
    metrics = {"fd": frechet_distance(feats, real_feats),
               "digit_confidence": float((probs[:, :NOT_DIGIT].max(1).values >= 0.9).float().mean()),
               "not_digit": float((probs.argmax(1) == NOT_DIGIT).float().mean()),
               "class_entropy": float(-(hist * hist.clamp(min=1e-12).log()).sum()),
               "inception_score": inception_score(digit_probs),
               "nn_ratio": nn_ratio(x, load_images(data, "train", data_dir)[0], load_images(data, "test", data_dir)[0])}
    if labels is not None:
        metrics["class_accuracy"] = float((probs.argmax(1) == labels.cpu()).float().mean())
        if torch.bincount(labels.cpu()).max() > 1:                      # two samples of one class to compare
            real_labels = load_images(data, "test", data_dir)[1][:n_real]
            metrics["class_spread"] = class_spread(feats, labels.cpu(), real_feats, real_labels)
    return metrics

def mmd(x, y, bandwidths=(0.1, 0.3, 1.0, 3.0)):
    r"""Unbiased MMD^2 with k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) over the bandwidths h."""
    x = x.double().cpu()
    y = y.double().cpu()
    k = lambda d2: sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)      # d2: squared distances, computed once
    d2 = lambda a, b: torch.cdist(a, b) ** 2
    within = lambda a: (k(d2(a, a)).sum() - len(a) * len(bandwidths)) / (len(a) * (len(a) - 1))  # drop k(a_i, a_i)
    return float(within(x) + within(y) - 2 * k(d2(x, y)).mean())

def mode_metrics(x, name):
    """A sample is high quality if within 3 std of its nearest mode; a mode is covered if it is the nearest
    mode of at least one high-quality sample (the VEEGAN / PacGAN protocol, on 2500 samples)."""
    means, std = MODES[name]
    d, nearest = torch.cdist(x.detach().float().cpu(), means).min(1)
    good = d < 3 * std
    return {"modes_covered": int(nearest[good].unique().numel()), "high_quality_frac": float(good.float().mean())}

def point_metrics(x, name, seed=12345):
    """2-D metrics: mmd of (up to) 2500 samples against as many fresh data points, and the mode metrics on ring8 /
    grid25."""
    n = min(len(x), 2500)
    out = {"mmd": mmd(x[:n], sample_2d(name, n, torch.Generator().manual_seed(seed)))}
    return dict(out, **mode_metrics(x[:2500], name)) if name in MODES else out

# ----------------------------------------------------------------------------- exact optimal transport (metrics)
def w1_sorted(x, y):
    """W_1 between equal-size uniform 1-D samples, per column of (n, d) inputs: sort both, mean |x_(i) - y_(i)|."""
    check(x.shape == y.shape, f"w1_sorted needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (torch.sort(x, 0)[0] - torch.sort(y, 0)[0]).abs().mean(0)

def assignment(C, eps_final=None, factor=5.0, max_rounds=10 ** 7):
    r"""Exact min-cost assignment perm[i] = j for a square C (n, n), by Bertsekas' auction with eps-scaling (an
    evaluation tool: the lectures give no solver). Every unassigned person i bids for its best object j (value
    -C_ij - price_j), raising its price by best - second best + eps; the highest bidder wins, the previous owner
    is freed. The cost ends within n eps of the optimum: eps_final = 1e-9 max|C| / n bounds the gap by 1e-9 max|C|."""
    check(C.dim() == 2 and C.shape[0] == C.shape[1], f"assignment needs a square cost matrix, got {tuple(C.shape)}")
    check(bool(torch.isfinite(C).all()), "assignment needs a finite cost matrix (it holds NaN or inf)")
    C, n = C.double().cpu(), C.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    scale = float(C.abs().max()) or 1.0
    eps_final = eps_final or 1e-9 * scale / n
    price, eps, rounds = torch.zeros(n, dtype=torch.float64), scale / 2, 0
    while True:
        obj_of, owner = torch.full((n,), -1), torch.full((n,), -1)
        while (free := (obj_of < 0).nonzero()[:, 0]).numel():
            rounds += 1
            check(rounds <= max_rounds, f"assignment: no solution after {max_rounds} bidding rounds")
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
    """W_p between two uniform clouds of equal size: (mean_i |x_i - y_perm(i)|^p)^{1/p}, perm from `assignment`."""
    C = torch.cdist(x.double(), y.double()) ** p
    return float(C[torch.arange(len(x)), assignment(C)].mean() ** (1 / p))
