"""Colour image data: folders of .png/.jpg (with and without class subfolders, mixed sizes), CIFAR-10's pickled
batches, the built-in colour digits, --image-size and --grey; the evaluators on such data; and every image script
trained on a colour folder and on a CIFAR-10-format folder."""
import importlib, json, os, pickle

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import metrics

SCRIPTS = {  # a few steps of each image script, small enough for the suite
    "vae": ["--steps", "2", "--n-samples", "20", "--n-eval", "10", "--iw-k", "2", "--batch-size", "8"],
    "autoencoders": ["--steps", "2", "--n-eval", "10", "--batch-size", "8"],
    "vqvae": ["--steps", "3", "--prior-steps", "1", "--n-samples", "10", "--n-eval", "10", "--batch-size", "8"],
    "gan": ["--steps", "2", "--n-samples", "20", "--batch-size", "8"],
    "wgan": ["--steps", "1", "--n-samples", "20", "--batch-size", "8"],
    "cgan": ["--steps", "2", "--n-samples", "20", "--batch-size", "8"],
    "stylegan_lite": ["--steps", "2", "--n-samples", "10", "--batch-size", "8"],
    "ddpm": ["--steps", "2", "--n-samples", "10", "--T", "10", "--sample-steps", "2", "--batch-size", "8"],
    "flow_matching": ["--steps", "2", "--n-samples", "10", "--sample-steps", "2", "--nll-steps", "2",
                      "--batch-size", "8"],
    "score_matching": ["--steps", "2", "--n-samples", "10", "--sample-steps", "2", "--batch-size", "8"],
}
LUMINANCE = torch.tensor([0.299, 0.587, 0.114])


def write_png(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    matplotlib.image.imsave(path, np.asarray(rgb, dtype=np.float64))


def framed(h, w, centre, side):
    """An h x w image (w > h): the centred h x h square in colour centre, the strips left and right in colour side."""
    im = np.tile(np.asarray(side, dtype=np.float64), (h, w, 1))
    left = (w - h) // 2
    im[:, left:left + h] = centre
    return im


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """Two classes in subfolders ("cat" red squares, "dog" green ones, blue strips cut off by the crop) of mixed
    sizes, 10 images each."""
    root = tmp_path_factory.mktemp("folder")
    sizes = [(40, 60), (33, 33), (20, 36), (64, 80), (28, 30)]
    for i in range(10):
        h, w = sizes[i % 5]
        write_png(str(root / "cat" / f"{i}.png"), framed(h, w, (0.9, 0.1, 0.1), (0, 0, 1)))
        write_png(str(root / "dog" / f"{i}.png"), framed(h, w, (0.1, 0.8, 0.2), (0, 0, 1)))
    return str(root)


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """CIFAR-10's python version in miniature: data_batch_1..5 and test_batch, 12 images each, the real layout (a
    dict with b"data": uint8 (N, 3072), the red plane, then green, then blue, each row by row; b"labels": a list)."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8),
                 b"labels": [int(k) for k in rng.integers(0, 10, 12)], b"batch_label": name.encode()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return str(root)


# ----------------------------------------------------------------------------- loaders
def test_folder_classes_crop_resize_and_split(colour_folder):
    x, y = common.load_images("folder", "train", colour_folder)
    x_test, y_test = common.load_images("folder", "test", colour_folder)
    assert x.shape == (18, 3, 32, 32) and x_test.shape == (2, 3, 32, 32)          # a tenth is held out
    assert sorted(y.tolist() + y_test.tolist()) == [0] * 10 + [1] * 10           # cat = 0, dog = 1 (sorted names)
    red, green = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.8, 0.2])
    for images, labels in ((x, y), (x_test, y_test)):
        want = torch.where(labels[:, None] == 0, red, green)[:, :, None, None]
        assert torch.allclose(images, want.expand_as(images), atol=2 / 255)  # the centre square, no blue strip
    x64, _ = common.load_images("folder", "train", colour_folder, size=64)
    assert x64.shape == (18, 3, 64, 64)


def test_folder_without_subfolders_is_unlabelled_and_grey_images_give_one_channel(tmp_path):
    for i in range(4):
        write_png(str(tmp_path / "flat" / f"{i}.png"), np.full((30, 40, 3), 0.1 * i))    # grey: r = g = b
        write_png(str(tmp_path / "flat" / f"c{i}.png"), framed(30, 40, (0, 1, 0), (1, 0, 0)))
    x, y = common.load_images("folder", "train", str(tmp_path / "flat"), channels=0)
    assert x.shape[1] == 3 and (y == -1).all() and not common.labelled(y)
    for f in (tmp_path / "flat").glob("c*.png"):
        f.unlink()
    grey, _ = common.load_images("folder", "train", str(tmp_path / "flat"))
    assert grey.shape[1:] == (1, 32, 32)                                  # every image grey: one channel


def test_grey_flag_is_the_luminance(colour_folder):
    x, y = common.load_images("folder", "train", colour_folder, channels=1)
    want = torch.where(y == 0, LUMINANCE @ torch.tensor([0.9, 0.1, 0.1]), LUMINANCE @ torch.tensor([0.1, 0.8, 0.2]))
    assert x.shape[1] == 1 and torch.allclose(x[:, 0, 16, 16], want, atol=2 / 255)


def test_cifar10_pixels_come_from_the_red_green_blue_planes(cifar_folder):
    x, y = common.load_images("cifar10", "train", cifar_folder)
    x_test, y_test = common.load_images("cifar10", "test", cifar_folder)
    assert x.shape == (60, 3, 32, 32) and x_test.shape == (12, 3, 32, 32)
    with open(os.path.join(cifar_folder, "data_batch_2"), "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch[b"data"]
    for c, i, j in ((0, 0, 1), (1, 5, 30), (2, 31, 2)):
        assert x[12 + 3, c, i, j] == pytest.approx(data[3, c * 1024 + i * 32 + j] / 255)   # batch 2, image 3
    assert y[12:24].tolist() == batch[b"labels"]


def test_cifar10_folder_with_a_missing_batch_is_one_error(cifar_folder, tmp_path):
    for name in os.listdir(cifar_folder):
        if name != "data_batch_4":
            os.symlink(os.path.join(cifar_folder, name), tmp_path / name)
    with pytest.raises(common.UserError, match="data_batch_4"):
        common.load_images("cifar10", "train", str(tmp_path))


def test_colour_digits_are_the_digits_in_two_colours_of_distinct_luminance():
    x, y = common.color_digits(50, 3)
    g, y_grey = common.render_digits(50, 3)
    assert x.shape == (50, 3, 32, 32) and torch.equal(y, y_grey)
    bg = x[:, :, :1, :1]                                                  # the 2 px padding is background
    for k in range(50):
        i, j = divmod(int(g[k, 0].argmax()), 28)                          # the darkest ink
        fg = bg[k] + (x[k, :, 2 + i:3 + i, 2 + j:3 + j] - bg[k]) / g[k, 0, i, j]   # the ink colour
        assert torch.allclose(x[k, :, 2:30, 2:30], bg[k] + (fg - bg[k]) * g[k], atol=1e-5)   # g mixes the two
        assert torch.allclose(x[k, :, :2], bg[k].expand(3, 2, 32), atol=1e-6)
        assert abs(float(LUMINANCE @ (fg - bg[k]).flatten())) >= 0.4


def test_only_the_supported_sizes(tmp_path):
    import ddpm
    with pytest.raises(SystemExit) as e:
        common.run(lambda: ddpm.main(["--data", "color-digits", "--image-size", "48", "--steps", "1", "--out",
                                      str(tmp_path)]))
    assert e.value.code.startswith("error: --image-size 48") and "28, 32, 64" in e.value.code
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("case", ["empty", "unreadable", "no-dir"])
def test_bad_folders_are_one_error_before_training(case, tmp_path):
    import gan
    (tmp_path / "data").mkdir()
    if case == "unreadable":
        write_png(str(tmp_path / "data" / "a.png"), np.zeros((8, 8, 3)))
        (tmp_path / "data" / "b.png").write_bytes(b"not an image")
    path = str(tmp_path / ("missing" if case == "no-dir" else "data"))
    with pytest.raises(common.UserError, match={"empty": "at least two", "unreadable": "b.png",
                                                "no-dir": "--data-dir"}[case]):
        gan.main(["--data", "folder", "--data-dir", path, "--steps", "1", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("script, flag", [("cgan", []), ("ddpm", ["--cond"]), ("flow_matching", ["--cond"])])
def test_a_conditional_run_on_unlabelled_images_is_one_error(script, flag, tmp_path):
    for i in range(3):
        write_png(str(tmp_path / "flat" / f"{i}.png"), framed(20, 30, (0, 1, 0), (1, 0, 0)))
    m = importlib.import_module(script)
    with pytest.raises(common.UserError, match="labelled"):
        m.main(["--data", "folder", "--data-dir", str(tmp_path / "flat"), "--steps", "1", *flag,
                "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- evaluators
def test_blur_of_colour_images_is_the_blur_of_each_channel():
    x = torch.rand(3, 3, 12, 12)
    sigma = torch.tensor([0.5, 1.5, 3.0])
    per_channel = torch.cat([metrics.gaussian_blur(x[:, c:c + 1], sigma) for c in range(3)], 1)
    assert torch.allclose(metrics.gaussian_blur(x, sigma), per_channel, atol=1e-6)


def test_the_colour_digits_evaluator_is_shipped_and_reads_colour_digits(monkeypatch):
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("the evaluator was trained"))
    net = metrics.get_classifier("color-digits")
    x, y = common.load_images("color-digits", "test")
    p = metrics.classify(net, x[:500])[1]
    assert p.shape == (500, 11) and (p.argmax(1) == y[:500]).float().mean() > 0.97
    negatives = common.colorize(metrics.not_digits(F.pad(common.render_digits(500, 5)[0], (2, 2, 2, 2)),
                                                   y[:500], 500, 5), 5)
    assert (metrics.classify(net, negatives)[1].argmax(1) == metrics.NOT_DIGIT).float().mean() > 0.8


# ----------------------------------------------------------------------------- every image script
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_image_script_trains_and_samples_again_on_a_colour_folder(script, colour_folder, tmp_path):
    m = importlib.import_module(script)
    argv = SCRIPTS[script] + ["--data", "folder", "--data-dir", colour_folder, "--out", str(tmp_path)]
    m.main(argv)
    first = torch.load(tmp_path / "samples.pt")
    assert first.shape[1:] == (3, 32, 32) and (tmp_path / "samples.png").exists()
    scores = json.load(open(tmp_path / "metrics.json"))
    if script != "autoencoders":                                         # (it scores reconstructions only)
        assert scores["evaluator"].startswith("classifier_folder_") and 0 <= scores["evaluator_accuracy"] <= 1
    m.main(argv + ["--sample-only"])
    assert torch.equal(torch.load(tmp_path / "samples.pt"), first)      # the training run's own samples again


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_image_script_trains_and_resumes_on_cifar10(script, cifar_folder, tmp_path):
    m = importlib.import_module(script)
    argv = SCRIPTS[script] + ["--data", "cifar10", "--data-dir", cifar_folder, "--out", str(tmp_path)]
    m.main(argv)
    k = argv.index("--steps") + 1
    steps = int(argv[k])
    m.main(argv[:k] + [str(steps + 1)] + argv[k + 1:] + ["--resume"])
    scores = json.load(open(tmp_path / "metrics.json"))
    assert scores["steps"] == steps + 1 and torch.load(tmp_path / "samples.pt").shape[1:] == (3, 32, 32)


def test_an_unlabelled_folder_is_scored_by_nn_ratio_only(tmp_path):
    import gan
    for i in range(12):
        write_png(str(tmp_path / "flat" / f"{i}.png"), framed(20, 30, (0.1 * (i % 10), 1, 0), (1, 0, 0)))
    gan.main(["--data", "folder", "--data-dir", str(tmp_path / "flat"), "--steps", "1", "--n-samples", "20",
              "--batch-size", "4", "--out", str(tmp_path / "out")])
    scores = json.load(open(tmp_path / "out" / "metrics.json"))
    assert "nn_ratio" in scores and "fd" not in scores and "evaluator" not in scores


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 64), (1, 64)])
def test_every_network_takes_and_gives_images_of_the_data_shape(channels, size):
    import cgan, ddpm, flow_matching, gan, score_matching, stylegan_lite, vae, vqvae
    torch.manual_seed(0)
    x, t, y = torch.rand(2, channels, size, size) * 2 - 1, torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    z = torch.randn(2, 16)
    assert vae.VAE(4, 32, shape=(channels, size, size)).mean(torch.randn(2, 4)).shape == x.shape
    vq = vqvae.VQVAE(8, 4, channels, size)
    k, z_q = vq.quantize(vq.encoder(x))
    assert vq.decoder(z_q).shape == x.shape and k.shape == ((2, 7, 7) if size == 28 else (2, 8, 8))
    assert gan.dcgan_generator(16, channels, size).eval()(z).shape == x.shape
    assert gan.dcgan_discriminator(True, channels, size)(x).shape == (2, 1)
    assert cgan.Generator(16, 4, 3, channels, size).eval()(z, y).shape == x.shape
    for cond in ("input", "every", "projection"):
        assert cgan.Discriminator(3, cond, 8, channels, size)(x, y).shape == (2, 1)
    G = stylegan_lite.Generator(16, 2, 8, channels, size)
    assert G(z).shape == x.shape and len(G.layers) == (8 if size == 64 else 6)
    assert stylegan_lite.discriminator(8, channels, size)(x).shape == (2, 1)
    assert ddpm.UNet(8, True, 3, channels, size)(x, (1000 * t).long(), y).shape == x.shape
    assert flow_matching.UNetVelocity(8, 3, channels, size)(x, t, y).shape == x.shape
    assert score_matching.UNetScore(8, channels, size)(x, t).shape == x.shape


def test_a_64_pixel_run_builds_one_more_level(colour_folder, tmp_path):
    import flow_matching
    flow_matching.main(SCRIPTS["flow_matching"] + ["--data", "folder", "--data-dir", colour_folder, "--image-size",
                                                   "64", "--grey", "--out", str(tmp_path)])
    assert torch.load(tmp_path / "samples.pt").shape[1:] == (1, 64, 64)
    state = common.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert "down_top.conv1.weight" in state["model"] and state["config"]["image_size"] == 64


@pytest.mark.slow
def test_the_shipped_colour_digits_evaluator_is_what_its_recipe_trains(tmp_path, monkeypatch):
    """Retrained from its recipe (about a minute): the same calls as the shipped net on nearly every test image."""
    monkeypatch.setattr(common, "EVALUATORS", str(tmp_path / "none"))
    monkeypatch.setattr(common, "CACHE", str(tmp_path))
    fresh = metrics.get_classifier("color-digits")
    monkeypatch.undo()
    shipped = metrics.get_classifier("color-digits")
    x, y = common.load_images("color-digits", "test")
    called = [metrics.classify(net, x)[1].argmax(1) for net in (fresh, shipped)]
    assert (called[0] == called[1]).float().mean() >= 0.99
    assert min((c == y).float().mean() for c in called) >= 0.98
