"""Tests of common.py: CLI, device, seeding, the 2-D distributions, digits, the IDX loader, outputs, checkpoints."""
import dataclasses, gzip, json, math, os, shutil, time

import numpy as np
import pytest
import torch
import torch.nn as nn

import common

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
needs_mnist = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(SHARED_MNIST, f)) for f in common.IDX_FILES["test"]),
    reason="../shared/data/mnist (the real MNIST test set: images and labels) is not present")


# ----------------------------------------------------------------------------- CLI, device, seed
@dataclasses.dataclass
class DemoConfig(common.Config):
    data: str = common.arg("ring8", "dataset", common.POINT_DATA)
    width: int = common.arg(64, "hidden units")
    flip: bool = common.arg(False, "a switch")


def test_parse_config_defaults_flags_and_out():
    cfg = common.parse_config(DemoConfig, ["--steps", "7", "--width", "3", "--flip", "--batch-size", "5"], "demo")
    assert (cfg.steps, cfg.width, cfg.flip, cfg.batch_size, cfg.data) == (7, 3, True, 5, "ring8")
    assert cfg.out == os.path.join("runs", "demo")


@pytest.mark.parametrize("argv, words", [(["--steps", "0"], "--steps"), (["--batch-size", "-1"], "--batch-size"),
                                          (["--lr", "0"], "--lr")])
def test_parse_config_rejects_non_positive(argv, words):
    with pytest.raises(common.UserError, match=words):
        common.parse_config(DemoConfig, argv, "demo")


def test_abbreviated_flags_are_refused_not_silently_reset(capsys):
    with pytest.raises(SystemExit):                                       # --step is not --steps
        common.parse_config(DemoConfig, ["--step", "10"], "demo")
    assert "unrecognized arguments: --step" in capsys.readouterr().err


def test_negative_seed_is_one_clear_error():
    with pytest.raises(common.UserError, match="--seed must be a non-negative integer, got -1"):
        common.parse_config(DemoConfig, ["--seed", "-1"], "demo")


def test_not_flags_are_not_offered(capsys):
    @dataclasses.dataclass
    class Cfg(DemoConfig):
        NOT_FLAGS = ("lr",)
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, ["--lr", "0.1"], "demo")
    assert "unrecognized arguments: --lr" in capsys.readouterr().err


def test_unknown_dataset_is_a_clear_cli_error(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(DemoConfig, ["--data", "nope"], "demo")
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_run_turns_user_errors_into_one_line(capsys):
    def main():
        raise common.UserError("what went wrong; what to do")
    with pytest.raises(SystemExit) as e:
        common.run(main)
    assert e.value.code == "error: what went wrong; what to do"          # python prints it on stderr, status 1


def test_run_turns_a_checkpoint_of_other_shapes_into_one_line():
    def main():                                                          # e.g. a run saved with another --ndf
        nn.Linear(2, 2).load_state_dict(nn.Linear(3, 2).state_dict())
    with pytest.raises(SystemExit) as e:
        common.run(main)
    assert e.value.code.startswith("error: the checkpoint does not fit this model (size mismatch for weight")
    with pytest.raises(RuntimeError):                                    # other errors still show their traceback
        common.run(lambda: torch.zeros(2) @ torch.zeros(3))


def test_device_resolution(monkeypatch):
    assert common.get_device("cpu").type == "cpu"
    with monkeypatch.context() as m:                                    # auto's order: cuda, then mps, then cpu
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert common.get_device("auto").type == "cuda"
        m.setattr(torch.cuda, "is_available", lambda: False)
        m.setattr(torch.backends.mps, "is_available", lambda: True)
        assert common.get_device("auto").type == "mps"
        m.setattr(torch.backends.mps, "is_available", lambda: False)
        assert common.get_device("auto").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="--device cuda"):
            common.get_device("cuda")


def test_seed_all_reproducible():
    common.seed_all(3)
    a = torch.randn(5), common.sample_2d("ring8", 4)
    common.seed_all(3)
    b = torch.randn(5), common.sample_2d("ring8", 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- 2-D distributions
def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_ring8_radii_and_angles():
    x = common.sample_2d("ring8", 20000, gen())
    r = x.norm(dim=1)
    assert abs(r.mean() - 2) < 0.01 and r.std() < 0.03
    k = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (2 * math.pi / 8)) % 8       # nearest of the 8 angles
    counts = torch.bincount(k.long(), minlength=8).float()
    assert counts.min() > 0.11 * len(x) and counts.max() < 0.14 * len(x)
    means = common.MODES["ring8"][0]
    assert torch.allclose(means.norm(dim=1), torch.full((8,), 2.0))
    assert torch.allclose(means[1], torch.tensor([2 ** 0.5] * 2))


def test_grid25_means_and_std():
    x = common.sample_2d("grid25", 50000, gen())
    nearest = torch.round(x / 2) * 2
    assert set(nearest.flatten().tolist()) <= {-4.0, -2.0, 0.0, 2.0, 4.0}
    assert abs((x - nearest).std() - 0.05) < 0.003
    assert len(torch.unique(nearest, dim=0)) == 25


def test_checkerboard_support_parity_and_density():
    x = common.sample_2d("checkerboard", 40000, gen())
    assert x.abs().max() <= 4
    cells = torch.floor(x / 2).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = torch.unique(cells, dim=0, return_counts=True)[1]
    assert len(counts) == 8 and counts.min() > 0.115 * len(x)     # 1/8 of the mass each: density 1/(8*4) = 1/32


def test_banana_undone_is_two_independent_standard_normals():
    """Rotate back by -pi/5 to (u, v); then u and v - u^2 + 0.5 must be independent N(0, 1) (any draw order)."""
    x = common.sample_2d("banana", 200000, gen(7)).double()
    c, s = math.cos(math.pi / 5), math.sin(math.pi / 5)
    u = c * x[:, 0] + s * x[:, 1]
    w = -s * x[:, 0] + c * x[:, 1] - u ** 2 + 0.5
    for z in (u, w):                                              # 5 standard errors: 0.011 (mean), 0.008 (std)
        assert abs(float(z.mean())) < 0.011 and abs(float(z.std()) - 1) < 0.008
    assert abs(float(torch.corrcoef(torch.stack([u, w]))[0, 1])) < 0.011
    assert abs(float(torch.corrcoef(torch.stack([u ** 2, w]))[0, 1])) < 0.011


@pytest.mark.parametrize("name", common.POINT_DATA)
def test_every_2d_set_shape_range_and_seed(name):
    x = common.sample_2d(name, 1000, gen(1))
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, common.sample_2d(name, 1000, gen(1)))
    if name not in ("gaussian", "banana"):           # these two have unbounded support
        assert x.abs().max() < 6


# ----------------------------------------------------------------------------- digits
def test_digit_fonts_are_real_digit_fonts():
    names = [os.path.basename(p) for p in common.digit_fonts()]
    assert "DejaVuSans.ttf" in names and "cmr10.ttf" in names
    assert not {"cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"} & set(names)


def test_digits_shapes_range_balance_determinism():
    x, y = common.load_images("digits", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and 0.05 < x.mean() < 0.3
    assert torch.bincount(y).tolist() == [1000] * 10
    x2, y2 = common.render_digits(10000, 1)                           # the test split is seed 1
    assert torch.equal(x2, x) and torch.equal(y2, y)
    assert not torch.equal(common.render_digits(10000, 2)[0], x2)
    edge = torch.cat([x[:, 0, :2], x[:, 0, -2:], x[:, 0, :, :2].mT, x[:, 0, :, -2:].mT], 1).amax((1, 2))
    assert (edge > 0.3).float().mean() < 0.02                # like MNIST, digits keep a margin to the frame


# ----------------------------------------------------------------------------- the IDX loader
@needs_mnist
def test_idx_loader_on_real_mnist_test_set():
    x, y = common.load_images("mnist", "test", SHARED_MNIST)
    assert x.shape == (10000, 1, 28, 28) and y[:5].tolist() == [7, 2, 1, 0, 4]
    assert x.min() == 0 and x.max() == 1 and torch.bincount(y).min() > 800
    raw = gzip.open(os.path.join(SHARED_MNIST, "t10k-images-idx3-ubyte.gz")).read(16)
    assert int.from_bytes(raw[:4], "big") == 2051 and int.from_bytes(raw[4:8], "big") == 10000
    xa, _ = common.load_images("mnist10k", "train", SHARED_MNIST)
    xb, _ = common.load_images("mnist10k", "test", SHARED_MNIST)
    assert len(xa) == 8000 and len(xb) == 2000


def write_idx(path, magic, dims, payload):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def test_idx_loader_detects_corrupt_and_truncated(tmp_path):
    good = tmp_path / "good.gz"
    write_idx(good, 2051, (2, 28, 28), bytes(2 * 784))
    assert common.read_idx(str(good)).shape == (2, 28, 28)
    write_idx(tmp_path / "short.gz", 2051, (3, 28, 28), bytes(2 * 784))
    with pytest.raises(common.UserError, match="truncated or corrupt"):
        common.read_idx(str(tmp_path / "short.gz"))
    write_idx(tmp_path / "magic.gz", 1234, (2,), bytes(2))
    with pytest.raises(common.UserError, match="bad magic number 1234"):
        common.read_idx(str(tmp_path / "magic.gz"))
    (tmp_path / "cut.gz").write_bytes(good.read_bytes()[:30])              # gzip stream cut short
    with pytest.raises(common.UserError, match="corrupt or truncated"):
        common.read_idx(str(tmp_path / "cut.gz"))


def test_offline_error_names_files_folder_and_alternative(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(common.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(common, "CACHE", str(tmp_path))
    with pytest.raises(common.UserError) as e:
        common.load_idx_dataset("fashion", "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and "--data digits" in msg
    assert "\n" not in msg


def test_a_mistyped_data_dir_is_an_error_and_never_downloaded_into(tmp_path, monkeypatch):
    def network(*a, **k):
        raise AssertionError("no download may happen for a --data-dir")
    monkeypatch.setattr(common.urllib.request, "urlopen", network)
    typo = tmp_path / "mnsit"
    with pytest.raises(common.UserError, match="not found in --data-dir .*mnsit"):
        common.load_idx_dataset("mnist", "test", str(typo))
    assert not typo.exists()                                              # not created either


class FakeResponse:
    def __init__(self, body):
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def read(self, n=-1):
        return self.body if n < 0 else self.body[:n]


def test_download_checks_each_file_against_its_own_md5(tmp_path, monkeypatch):
    import hashlib
    body = b"a file whose MD5 is listed, but for another file"
    hashes = common.MD5["mnist"].split()
    hashes[0] = hashlib.md5(body).hexdigest()                             # listed for train images only
    monkeypatch.setitem(common.MD5, "mnist", " ".join(hashes))
    monkeypatch.setattr(common, "CACHE", str(tmp_path))
    monkeypatch.setattr(common.urllib.request, "urlopen", lambda *a, **k: FakeResponse(body))
    with pytest.raises(common.UserError, match="checksum mismatch"):
        common.load_idx_dataset("mnist", "test")                          # test images: another MD5
    assert not any((tmp_path / "mnist").iterdir())                        # nothing unverified is kept


def test_download_has_a_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "MAX_DOWNLOAD", 10)
    monkeypatch.setattr(common, "CACHE", str(tmp_path))
    monkeypatch.setattr(common.urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"x" * 11))
    with pytest.raises(common.UserError, match="too large"):
        common.load_idx_dataset("mnist", "test")


# ----------------------------------------------------------------------------- outputs and progress
def test_checkpoint_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, model=net.state_dict(), step=5, config={"lr": 0.1})
    state = common.load_checkpoint(path)
    other = torch.nn.Linear(3, 2)
    other.load_state_dict(state["model"])
    assert torch.equal(other.weight, net.weight) and state["step"] == 5 and state["config"]["lr"] == 0.1
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.load_checkpoint(str(tmp_path / "missing.pt"))


def test_save_checkpoint_refuses_nan_and_keeps_the_old_file(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, script="demo", model=net.state_dict(), step=1)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(common.UserError, match="model weight holds NaN"):
        common.save_checkpoint(path, script="demo", model=net.state_dict(), step=2)
    state = common.load_checkpoint(path, "demo")
    assert state["step"] == 1 and torch.isfinite(state["model"]["weight"]).all()


def test_corrupt_and_foreign_checkpoints_get_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        common.load_checkpoint(str(bad))
    other = str(tmp_path / "other.pt")
    common.save_checkpoint(other, script="vae", step=1)
    with pytest.raises(common.UserError, match="was not written by gan.py"):
        common.load_checkpoint(other, "gan")


def test_load_run_takes_model_flags_from_the_checkpoint(tmp_path):
    @dataclasses.dataclass
    class Cfg(DemoConfig):
        MODEL_FLAGS = ("width",)
    trained = common.parse_config(Cfg, ["--width", "7", "--out", str(tmp_path)], "demo")
    common.save_checkpoint(str(tmp_path / "checkpoint.pt"), script="demo", config=dataclasses.asdict(trained))
    cfg = common.parse_config(Cfg, ["--sample-only", "--out", str(tmp_path)], "demo")
    common.load_run(cfg, "demo")
    assert cfg.width == 7                                                 # not the default 64
    cfg = common.parse_config(Cfg, ["--sample-only", "--width", "8", "--out", str(tmp_path)], "demo")
    with pytest.raises(common.UserError, match="--width 8 contradicts the checkpoint"):
        common.load_run(cfg, "demo")


def test_ema_update_warm_up_and_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        ema.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    d = common.ema_update(ema, model, step=1, max_decay=0.999)
    assert d == pytest.approx(2 / 11)                                     # (1 + t) / (10 + t) at t = 1
    assert torch.allclose(ema.weight, torch.full((2,), 2 / 11 * 1 + 9 / 11 * 3))
    assert torch.equal(ema.running_mean, model.running_mean)             # buffers are copied
    assert common.ema_update(ema, model, step=10 ** 6, max_decay=0.999) == 0.999
    assert common.ema_update(ema, model, step=5, max_decay=0.0) == 0.0 and torch.equal(ema.weight, model.weight)


def test_outputs_and_metrics_json(tmp_path):
    cfg = common.parse_config(DemoConfig, ["--seed", "4", "--steps", "10", "--out", str(tmp_path)], "demo")
    rec = common.finish(cfg, {"mmd": 0.5}, time.time() - 1.5, "cpu", samples=torch.zeros(3, 2), history={"l": [2, 1]})
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved == json.loads(json.dumps(rec))
    for key in ("mmd", "steps", "seconds", "device", "seed", "torch_version", "config"):
        assert key in saved
    assert saved["seed"] == 4 and saved["config"]["width"] == 64 and saved["steps"] == 10 and saved["seconds"] >= 1.5
    assert torch.equal(torch.load(tmp_path / "samples.pt"), torch.zeros(3, 2)) and (tmp_path / "loss.png").exists()
    x, y = common.load_images("digits", "test")
    common.save_images(x[:50], str(tmp_path / "grid.png"), labels=y[:50])
    common.save_images(x[:8].repeat(1, 3, 1, 1), str(tmp_path / "rgb.png"), nrow=4)
    common.save_points(torch.randn(100, 2), str(tmp_path / "pts.png"), ref=torch.randn(50, 2))
    common.save_losses({"loss": [3, 2, 1]}, str(tmp_path / "loss.png"))
    for f in ("grid.png", "rgb.png", "pts.png", "loss.png"):
        assert (tmp_path / f).stat().st_size > 1000


def test_progress_guards_nan(capsys):
    p = common.Progress(total=4)
    p(1, 0.5)
    with pytest.raises(common.UserError, match=r"loss became nan at step 2: training diverged \(the checkpoints"):
        p(2, float("nan"))
    p(4, torch.tensor(0.25))
    assert "step 4/4  loss 0.2500" in capsys.readouterr().out


# ----------------------------------------------------------------------------- metrics


# Two kinds of "not a digit" that not_digits() never makes: held out from the evaluator's training.


# ----------------------------------------------------------------------------- exact OT metrics


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way (disk full, Ctrl-C) leaves the previous checkpoint whole."""
    path = str(tmp_path / "checkpoint.pt")
    common.save_checkpoint(path, step=1, w=torch.ones(3))

    def dies_half_way(obj, f):
        open(f, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        common.save_checkpoint(path, step=2, w=torch.zeros(3))
    monkeypatch.undo()
    state = common.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))




SCRIPTS = ["vae", "autoencoders", "vqvae", "gan", "wgan", "cgan", "cyclegan", "stylegan_lite", "ddpm", "flow_matching",
           "score_matching", "divergences", "sinkhorn", "mgn"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_default_once_and_no_empty_one(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())                    # argparse wraps lines: join them
    assert "(default: )" not in text
    flags = text.split(" --")[1:]
    doubled = [f.split()[0] for f in flags if f.count("(default") > 1]
    assert not doubled, doubled
    assert "(default: 1000)" in text or "(default:" in text               # the defaults are shown at all


@pytest.mark.parametrize("script", ["sinkhorn", "divergences"])
def test_scripts_that_train_nothing_refuse_resume_and_sample_only(script, capsys):
    for flag in ("--resume", "--sample-only"):
        with pytest.raises(SystemExit) as e:
            __import__(script).main([flag])
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_torch_jit_script_deprecation_is_silenced_whatever_its_category():
    """pytest.ini's filter must match torch's warning as a DeprecationWarning and as a FutureWarning (torch has
    used both): the filters are applied as pytest applies them, then the warning is raised in each category."""
    import builtins, configparser, warnings
    ini = configparser.ConfigParser()
    ini.read(os.path.join(os.path.dirname(__file__), "..", "pytest.ini"))
    filters = [f.strip() for f in ini["pytest"]["filterwarnings"].splitlines() if f.strip()]
    for category in (DeprecationWarning, FutureWarning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for f in filters:
                action, message, *rest = f.split(":")
                category_named = getattr(builtins, rest[0]) if rest and rest[0] else Warning
                warnings.filterwarnings(action, message=message, category=category_named)
            warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", category)
        assert not caught, category


def test_gif_frames_are_drawn_upright_and_stored_losslessly(tmp_path):
    from PIL import Image
    values = common.surface(lambda g: g[:, 1])                              # the height y: high at the top
    frame = common.points_frame(torch.tensor([[4.0, 4.0]]), torch.tensor([[-4.0, -4.0]]), values)
    top, bottom = frame[0, 120].astype(int), frame[-1, 120].astype(int)
    assert top[0] > top[2] and bottom[2] > bottom[0]                       # coolwarm: red on top, blue below
    assert (frame[:120, 120:] == (255, 220, 0)).all(-1).any()              # the sample (4, 4): upper right
    assert (frame[120:, :120] == (0, 0, 0)).all(-1).any()                  # the reference (-4, -4): lower left
    assert not (frame[:120, 120:] == (0, 0, 0)).all(-1).any()
    grid = common.image_frame(torch.rand(6, 1, 28, 28), nrow=3, scale=2)
    assert grid.shape == (2 * (2 * 30 + 2), 2 * (3 * 30 + 2), 3)
    common.save_gif([frame, frame[::-1].copy()], str(tmp_path / "a.gif"))
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 2
    gif.seek(1)
    assert np.array_equal(np.array(gif.convert("RGB")), frame[::-1])
