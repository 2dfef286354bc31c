r"""common.py - the plumbing every script shares: errors and the command line, device and seed, data, output
files, checkpoints, --resume and Ctrl-C, the moving average of weights, progress lines, 2-D pictures. No model,
no loss and no metric lives here (metrics.py scores the samples).
Image tensors are float32 (N, C, S, S) with pixels in [0, 1] (C = 1 or 3; S = 28, 32 or 64); each script maps
to its own model range (e.g. [-1, 1]) and back before saving or evaluating. 2-D data are float32 (N, 2).
"""
import argparse, dataclasses, functools, glob, gzip, hashlib, json, math, os, pickle, random, shlex, signal, struct
import sys, tarfile, threading, time, urllib.request

import matplotlib.image
import numpy as np
import torch
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
    data_dir: str = arg("", "folder of the data: mnist/fashion's IDX files, cifar10's batches, --data folder's "
                            "images; empty: download into .cache/")
    steps: int = arg(1000, "training steps (optimizer updates)")
    batch_size: int = arg(128, "examples per training step")
    lr: float = arg(1e-3, "learning rate")
    seed: int = arg(0, "random seed for python, numpy and torch (>= 0)")
    out: str = arg("", "output folder; empty: runs/<script>")
    sample_only: bool = arg(False, "skip training: load the checkpoint in --out, sample and evaluate")
    resume: bool = arg(False, "continue the run saved in --out up to --steps steps (its other flags are read from it)")

    def defaults(self, given):
        """Hook: a script sets defaults that depend on other flags, for the flags not in `given` (e.g. {"--lr"})."""

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except an empty one (there is nothing to show)."""
    def _get_help_string(self, action):
        return action.help if action.default in ("", None) else super()._get_help_string(action)

def parse_config(cls, argv, script, doc=""):
    """Parse argv with flags made from the dataclass `cls`; cfg.given: the flags given (e.g. {"--steps"})."""
    p = argparse.ArgumentParser(prog=f"python {script}.py", description=(doc or "").strip().split("\n\n")[0],
                                formatter_class=HelpFormatter, allow_abbrev=False)
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
DIGIT_DATA = ("digits", "mnist", "fashion", "mnist10k")                  # 28x28 grey digit sets
IMAGE_DATA = DIGIT_DATA + ("color-digits", "cifar10", "folder")
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

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"                           # of the published .tar.gz (163 MB)
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SIZES = (28, 32, 64)                                                     # image sides the networks are built for
IMAGE_SIZE_HELP = "image side, 28, 32 or 64 (0: the data's own, 28 for the grey digit sets, else 32)"

def load_cifar10(split, data_dir=""):
    """CIFAR-10's python version (pickled batches of 10000 uint8 32x32 RGB images) from data_dir (the batches, or
    the cifar-10-batches-py folder in it), else from .cache/cifar10 (downloaded there once, its MD5 checked)."""
    folder = data_dir or os.path.join(CACHE, "cifar10")
    if os.path.isdir(os.path.join(folder, "cifar-10-batches-py")):
        folder = os.path.join(folder, "cifar-10-batches-py")
    missing = [f for f in CIFAR_FILES["train"] + CIFAR_FILES["test"] if not os.path.exists(os.path.join(folder, f))]
    check(not missing or not data_dir, f"cifar10: {', '.join(missing)} not found in --data-dir "
          f"{os.path.abspath(folder)}; give the folder of the python version's batches, or leave --data-dir out to "
          f"download into {CACHE}")
    if missing:
        try:
            tar = os.path.join(CACHE, "cifar-10-python.tar.gz")
            os.makedirs(folder, exist_ok=True)
            urllib.request.urlretrieve(CIFAR_URL, tar)
            with open(tar, "rb") as f:
                check(hashlib.md5(f.read()).hexdigest() == CIFAR_MD5, f"{tar}: checksum mismatch; delete it")
            with tarfile.open(tar) as t:
                for m in t.getmembers():                                 # the batches only, nothing outside
                    if m.isfile() and os.path.basename(m.name) in missing:
                        with open(os.path.join(folder, os.path.basename(m.name)), "wb") as out:
                            out.write(t.extractfile(m).read())
            os.remove(tar)                                               # 163 MB not needed any more
        except OSError as e:
            raise UserError(f"cifar10: the download failed ({e}); put the python version's batches in a folder and "
                            f"pass --data-dir FOLDER, or use --data color-digits, which needs no files")
    xs, ys = [], []
    for name in CIFAR_FILES[split]:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"cifar10: {os.path.join(folder, name)} is not a CIFAR-10 batch ({type(e).__name__}); "
                            f"delete it and fetch it again")
    return torch.from_numpy(np.concatenate(xs)).float() / 255, torch.from_numpy(np.concatenate(ys))

def square(im, size):
    """An image (C, H, W) centre-cropped to a square and resized to size x size (antialiased)."""
    h, w = im.shape[-2:]
    m = min(h, w)
    im = im[:, (h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
    return F.interpolate(im[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]

def image_files(path):
    """The .png/.jpg files under path (relative, sorted), with their modification times."""
    check(path and os.path.isdir(path), f"--data folder needs --data-dir PATH, a folder of .png/.jpg images; got "
          f"{path!r}")
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names
                   if f.lower().endswith((".png", ".jpg", ".jpeg")))
    check(len(files) >= 2, f"{os.path.abspath(path)} holds {len(files)} .png/.jpg images; it needs at least two")
    return tuple((f, os.path.getmtime(os.path.join(path, f))) for f in files)

@functools.lru_cache(maxsize=1)
def load_folder(path, size, stamped_files):
    """The images stamped_files (from image_files) under path as (x (N, 3, size, size), y (N,)): y is the class (the
    subfolder, in sorted order) when every image sits in one of two or more subfolders, else -1 (no labels)."""
    files = [f for f, _ in stamped_files]
    classes = sorted({f.split(os.sep)[0] for f in files})
    labelled = len(classes) >= 2 and all(f.count(os.sep) == 1 for f in files)
    x = torch.stack([square(read_rgb(os.path.join(path, f), grey_ok=True)[0].permute(2, 0, 1), size) for f in files])
    y = torch.tensor([classes.index(f.split(os.sep)[0]) if labelled else -1 for f in files])
    return x.clamp(0, 1), y

def color_digits(n, seed):
    """n digits (n, 3, 32, 32) in [0, 1] and their labels: render_digits(n, seed) padded by 2 px, the ink in one
    random colour over a background of another (each RGB uniform; luminances at least 0.4 apart)."""
    g, y = render_digits(n, seed)
    return colorize(F.pad(g, (2, 2, 2, 2)), seed), y

def colorize(g, seed):
    """Grey images g (N, 1, H, W), ink 1 on background 0, drawn as ink colour over background colour."""
    gen = torch.Generator().manual_seed(seed + 7919)
    fg, bg = torch.rand(len(g), 3, generator=gen), torch.rand(len(g), 3, generator=gen)
    lum = torch.tensor([0.299, 0.587, 0.114])
    for _ in range(100):                                                 # redraw the pairs of too close luminance
        close = ((fg - bg) @ lum).abs() < 0.4
        if not close.any():
            break
        fg[close] = torch.rand(int(close.sum()), 3, generator=gen)
        bg[close] = torch.rand(int(close.sum()), 3, generator=gen)
    return bg[:, :, None, None] + (fg - bg)[:, :, None, None] * g

def load_images(name, split="train", data_dir="", size=0, channels=0):
    """(x, y): x (N, C, S, S) float32 in [0, 1], y (N,) int64 (-1: unlabelled). Cached: do not modify in place.
    digits    rendered here: train 60000 (seed 0), test 10000 (seed 1); no files, no network (28x28 grey)
    mnist, fashion   the standard IDX files (train 60000 / test 10000, 28x28 grey)
    mnist10k  only the 10000-image MNIST test files (t10k-*), permuted with seed 0: train 8000 / test 2000
    color-digits   the digits at 32x32 in random ink and background colours (train seed 0, test seed 1)
    cifar10   the pickled batches: train 50000 / test 10000 (32x32 RGB)
    folder    every .png/.jpg under data_dir (32x32 unless size); a tenth (every tenth after a shuffle) is test
    size: the side S (0: the data's own); channels: 1 (grey, by luminance) or 3 (0: grey when every image is)."""
    check(name in IMAGE_DATA, f"unknown image dataset {name!r}; choose from {', '.join(IMAGE_DATA)}")
    check(split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}")
    check(size in (0,) + SIZES, f"--image-size {size} is not supported: the networks are built for "
          f"{', '.join(map(str, SIZES))} (0: the data's own)")
    files = image_files(data_dir) if name == "folder" else ()           # a changed folder is read again
    return _load_images(name, split, data_dir, size, channels, files)

@functools.lru_cache(maxsize=8)
def _load_images(name, split, data_dir, size, channels, files):
    if name in ("digits", "color-digits"):
        x, y = built_in(name, split)
    elif name in DIGIT_DATA:
        x, y = load_digit_set(name, split, data_dir)
    elif name == "cifar10":
        x, y = load_cifar10(split, data_dir)
    else:
        x, y = load_folder_split(data_dir, size or 32, split, files)
    grey = (x[:, :1] == x).all()
    if channels == 1 or (channels == 0 and grey):
        x = x if x.shape[1] == 1 else (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    elif x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x.contiguous(), y

@functools.lru_cache(maxsize=4)
def built_in(name, split):
    """The rendered digits or colour digits (kept apart from the files' cache: rendering takes seconds)."""
    seed, n = (0, 60000) if split == "train" else (1, 10000)
    return render_digits(n, seed) if name == "digits" else color_digits(n, seed)

def load_folder_split(path, size, split, files):
    x, y = load_folder(path, size, files)
    is_test = torch.zeros(len(x), dtype=torch.bool)
    is_test[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[::10]] = True
    keep = is_test if split == "test" else ~is_test
    return x[keep], y[keep]

def load_digit_set(name, split, data_dir):
    if name == "mnist10k":
        x, y = load_idx_dataset("mnist", "test", data_dir)
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        keep = keep[:8000] if split == "train" else keep[8000:]
        return x[keep], y[keep]
    return load_idx_dataset(name, split, data_dir)

def load_data(cfg, split):
    """load_images with a script's --data, --data-dir, --image-size and --grey."""
    return load_images(cfg.data, split, cfg.data_dir, cfg.image_size, 1 if cfg.grey else 0)

def labelled(y):
    """Whether every image has a class (a flat folder has none)."""
    return bool((y >= 0).all())

# ----------------------------------------------------------------------------- outputs
def image_grid(x, nrow=10):
    """x (N, C, H, W) in [0, 1] as one grid, 2-pixel grey borders: numpy (H', W') or (H', W', 3)."""
    x = x.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    grid = torch.full((c, math.ceil(n / nrow) * (h + 2) + 2, nrow * (w + 2) + 2), 0.5)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = x[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()

def save_images(x, path, labels=None, nrow=10):
    """Image grid of x (N, C, H, W) in [0, 1]; with labels, one row per class (first nrow of each)."""
    if labels is not None:
        x = torch.cat([x[labels.cpu() == c][:nrow] for c in labels.unique()])
    matplotlib.image.imsave(path, image_grid(x, nrow), cmap="gray", vmin=0, vmax=1)

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
MOVED = {"vae": ("model", "vae", "autoencoders.py (ae, dae, sae, cae) or vqvae.py"),     # models with a script
         "flow_matching": ("objective", "velocity", "score_matching.py")}                # of their own now

def load_run(cfg, script):
    r"""The checkpoint in cfg.out, with cfg made to agree with it. --sample-only: the MODEL_FLAGS are read from it.
    --resume: every flag but --device, --out and --steps is, and --steps defaults to the saved run's. A given flag
    that differs from the saved one is an error that names it."""
    path = os.path.join(cfg.out, "checkpoint.pt")
    check(os.path.exists(path) or not cfg.resume,
          f"--resume: no checkpoint at {path}; start the run without --resume (it saves there as it trains)")
    state = load_checkpoint(path, script)
    saved = state.get("config", {})
    key, own, new_home = MOVED.get(script, ("", None, ""))
    check(saved.get(key, own) == own, f"the checkpoint in {cfg.out} holds a --{key} {saved.get(key)} run: that "
          f"model now lives in {new_home}; train it there")
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
        cfg.defaults(cfg.given | {"--" + f.replace("_", "-") for f in cfg.MODEL_FLAGS})   # the model's flags are set
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

def save_density(log_p, log_p_data, title, path):
    """exp(log_p) on a 100 x 100 grid of [-5, 5]^2, titled `title`, beside the data's exp(log_p_data) where that is
    known (log_p_data returns None otherwise), on one colour scale. log_p, log_p_data: points (N, 2) -> (N,)."""
    g = torch.linspace(-5, 5, 100)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)
    true = log_p_data(grid)
    panels = ([("p_data", true.exp())] if true is not None else []) + [(title, log_p(grid).exp().cpu())]
    top = max(float(p.max()) for _, p in panels)
    fig = Figure(figsize=(4.5 * len(panels), 4.5))
    for ax, (name, p) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(p.view(100, 100).numpy(), extent=(-5, 5, -5, 5), origin="lower", cmap="magma", vmin=0, vmax=top)
        ax.set(title=name, xticks=[], yticks=[])
    fig.savefig(path, dpi=100, bbox_inches="tight")

# ----------------------------------------------------------------------------- animations (--gif)
def image_frame(x, nrow=10, scale=2):
    """A GIF frame: the image grid of x (N, C, H, W) in [0, 1] as uint8 RGB (H', W', 3), each pixel scale x scale."""
    g = np.round(image_grid(x, nrow) * 255).astype(np.uint8)
    g = np.repeat(np.repeat(g, scale, 0), scale, 1)
    return np.stack([g] * 3, -1) if g.ndim == 2 else g

def points_frame(x, ref=None, values=None, size=240):
    """A GIF frame of [-5, 5]^2 (size x size uint8 RGB): white, or values (a surface(), 120 x 120) in 16 shades of
    coolwarm; ref points grey (black over a surface), x blue (yellow over a surface), 2 x 2 pixels each."""
    img = np.full((size, size, 3), 255, np.uint8)
    if values is not None:
        v = (values - values.min()) / (values.max() - values.min() + 1e-12)
        shade = np.floor(v.numpy() * 15.999) / 15                        # 16 levels: a lossless GIF palette
        rgb = (matplotlib.colormaps["coolwarm"](shade)[..., :3] * 255).astype(np.uint8)[::-1]   # row 0 = top
        img = np.repeat(np.repeat(rgb, size // 120, 0), size // 120, 1)
    for pts, colour in ((ref, (0, 0, 0) if values is not None else (190, 190, 190)),
                        (x, (255, 220, 0) if values is not None else (31, 119, 180))):
        if pts is not None:
            ij = np.floor((pts.detach().cpu().numpy() + 5) / 10 * size).astype(int)
            ij = ij[((ij >= 0) & (ij < size - 1)).all(1)]
            for di in (0, 1):
                for dj in (0, 1):
                    img[size - 1 - ij[:, 1] - di, ij[:, 0] + dj] = colour
    return img

def save_gif(frames, path, ms=100):
    """frames (uint8 (H, W, 3) arrays, at most 256 colours each: stored losslessly) as a looping GIF, ms per frame,
    the last one held 2 s."""
    from PIL import Image                                                # matplotlib's own image library
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[ms] * (len(frames) - 1) + [2000], loop=0)

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
