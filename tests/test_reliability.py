"""No silent wrong result: a test for each way a run could go wrong quietly, and the bad-input table of
docs/reliability.md row by row (each bad input gets one `error:` line before any training starts)."""
import math, os, re, subprocess, sys

import matplotlib.image
import numpy as np
import pytest
import torch

import autoencoders, cgan, common, cyclegan, ddpm, flow_matching, gan, metrics, mgn, score_matching, sinkhorn
import stylegan_lite, vae, vqvae, wgan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = [vae, autoencoders, vqvae, gan, wgan, cgan, cyclegan, stylegan_lite, ddpm, flow_matching, score_matching,
            mgn]


# ----------------------------------------------------------------------------- silent wrong results
def test_auto_sinkhorn_on_far_apart_clouds_matches_the_log_domain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = torch.randn(60, 2, generator=g, dtype=torch.float64) + 31
    C = sinkhorn.sq_dist(x, y)
    w = torch.full((60,), 1 / 60, dtype=torch.float64)
    auto = sinkhorn.sinkhorn(w, w, C, 3.0, tol=1e-9)
    log = sinkhorn.sinkhorn(w, w, C, 3.0, tol=1e-9, method="log")
    assert auto["converged"] and float(auto["cost"]) == pytest.approx(float(log["cost"]), rel=1e-7)
    assert torch.allclose(auto["plan"], log["plan"], atol=1e-10)


def test_sinkhorn_with_zero_weights_solves_on_the_support():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    a = torch.tensor([0.2, 0.0, 0.3, 0.1, 0.4, 0.0], dtype=torch.float64)
    b = torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25], dtype=torch.float64)
    C = sinkhorn.sq_dist(x, y)
    r = sinkhorn.sinkhorn(a, b, C, 0.5, tol=1e-10)
    assert r["converged"] and torch.isfinite(r["plan"]).all() and torch.isfinite(r["f"]).all()
    assert torch.allclose(r["plan"].sum(1), a, atol=1e-9) and torch.allclose(r["plan"].sum(0), b, atol=1e-9)
    i, j = a > 0, b > 0
    sub = sinkhorn.sinkhorn(a[i], b[j], C[i][:, j], 0.5, tol=1e-10)
    assert float(r["cost"]) == pytest.approx(float(sub["cost"]), rel=1e-12)


def test_mgn_standardises_with_the_pooled_per_coordinate_std():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 2, generator=g) + torch.tensor([-6.0, 4.0])   # the ot-gaussian source: std 1 per axis
    y = torch.randn(4000, 2, generator=g) * 2
    T = mgn.Transport(mgn.CMGN(2, 4, 2), x, y)
    assert float(T.s_x) == pytest.approx(1.0, abs=0.05)                  # x.std() over all entries gives 5.1
    assert float(T.scale) == pytest.approx(2.0, abs=0.1)


def test_cgan_ema_forgets_the_random_init(tmp_path):
    cgan.main(["--steps", "20", "--n-samples", "20", "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    common.seed_all(0)                                                   # the run's seed: the same initial G
    cfg = cgan.Config()                                                  # the defaults the run used
    init = cgan.Generator(cfg.z_dim, cfg.emb_dim).state_dict()
    key = "net.0.weight"
    to_g = (state["G_ema"][key] - state["G"][key]).norm()
    to_init = (state["G_ema"][key] - init[key]).norm()
    assert to_g < to_init                                                # without warm-up, 98% of it is the init


def test_cyclegan_without_pool_runs(tmp_path):
    rec = cyclegan.main(["--pool", "0", "--steps", "2", "--batch-size", "2", "--width", "4", "--ndf", "4",
                         "--n-eval", "20", "--out", str(tmp_path)])
    assert math.isfinite(rec["cycle_l1_x"])


def test_sample_only_reads_the_schedule_from_the_checkpoint(tmp_path):
    args = ["--steps", "2", "--n-samples", "10", "--sample-steps", "5", "--out", str(tmp_path)]
    ddpm.main(args + ["--T", "20", "--schedule", "cosine", "--width", "8"])
    rec = ddpm.main(["--sample-only", "--n-samples", "10", "--sample-steps", "5", "--out", str(tmp_path)])
    assert (rec["config"]["T"], rec["config"]["schedule"], rec["config"]["width"]) == (20, "cosine", 8)
    with pytest.raises(common.UserError, match="--T 30 contradicts the checkpoint"):
        ddpm.main(["--sample-only", "--T", "30", "--out", str(tmp_path)])


def test_wgan_guards_the_generator_loss_too(tmp_path, monkeypatch):
    class NanOnGeneratorStep(torch.nn.Module):                           # finite for the critic's own loss
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Linear(2, 1)

        def forward(self, x):
            return self.f(x) + (float("nan") if x.requires_grad else 0.0)
    real = wgan.make_nets
    monkeypatch.setattr(wgan, "make_nets", lambda cfg: (real(cfg)[0], NanOnGeneratorStep(), real(cfg)[2]))
    with pytest.raises(common.UserError, match="loss became nan"):
        wgan.main(["--lipschitz", "clip", "--steps", "3", "--width", "8", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- the bad-input table
BAD_INPUT = [  # (script, flags, the words of its error line): docs/reliability.md's table, row by row
    (ddpm, ["--grad-clip", "0"], "--grad-clip must be positive"),
    (ddpm, ["--grad-clip", "-1"], "--grad-clip must be positive"),
    (ddpm, ["--width", "12"], "--width must be a multiple of 8"),
    (ddpm, ["--T", "20", "--compare"], "--compare and --gif run 50-step samplers: they need --T >= 50"),
    (gan, ["--seed", "-1"], "--seed must be a non-negative integer"),
    (vae, ["--seed", "-1"], "--seed must be a non-negative integer"),
    (cgan, ["--ema", "1"], "--ema must be in [0, 1)"),
    (cgan, ["--ema", "1.5"], "--ema must be in [0, 1)"),
    (sinkhorn, ["--demo", "color", "--target", "no_such.png"], "image not found: no_such.png"),
    (flow_matching, ["--coupling", "corrupt"], "--coupling corrupt restores images"),
    (score_matching, ["--t0", "1"], "--t0 in (0, 1)"),
    (autoencoders, ["--kind", "cae", "--linear"], "--linear is for --kind ae"),
    (vqvae, ["--prior-steps", "0"], "--prior-steps must be in 1..--steps - 1"),
]


@pytest.mark.parametrize("script, args, words", BAD_INPUT)
def test_bad_input_table(script, args, words, tmp_path):
    with pytest.raises(common.UserError, match=re.escape(words)) as e:
        script.main(args + ["--out", str(tmp_path)])
    assert "\n" not in str(e.value)


def cli(script, *args):
    """Run a script as a student would; returns (exit status, stderr)."""
    p = subprocess.run([sys.executable, script + ".py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr.strip()


def test_from_the_shell_a_bad_input_is_one_error_line(tmp_path):
    status, err = cli("ddpm", "--width", "12", "--out", str(tmp_path))
    assert status == 1 and err == "error: --width must be a multiple of 8 (GroupNorm uses 8 groups), got 12"


@pytest.mark.parametrize("flag", [["--lr", "0.1"], ["--sample-only"], ["--device", "cpu"], ["--step", "3"]])
def test_flags_that_mean_nothing_or_are_abbreviated_are_refused(flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sinkhorn.main(flag + ["--out", str(tmp_path)])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_greyscale_colour_target_is_refused(tmp_path):
    grey = tmp_path / "grey.png"
    matplotlib.image.imsave(grey, np.random.rand(8, 8), cmap="gray")    # written as RGBA: make it truly grey
    from PIL import Image
    Image.open(grey).convert("L").save(grey)
    with pytest.raises(common.UserError, match="is a greyscale image"):
        sinkhorn.main(["--demo", "color", "--target", str(grey), "--pixels", "50", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("script", TRAINING)
def test_corrupt_checkpoint_with_sample_only(script, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(common.UserError, match="not a readable checkpoint"):
        script.main(["--sample-only", "--out", str(tmp_path)])


@pytest.mark.parametrize("script", TRAINING)
def test_foreign_checkpoint_with_sample_only(script, tmp_path):
    common.save_checkpoint(str(tmp_path / "checkpoint.pt"), script="sinkhorn", step=1, config={})
    with pytest.raises(common.UserError, match="was not written by"):
        script.main(["--sample-only", "--out", str(tmp_path)])


def test_corrupt_cached_evaluator_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE", str(tmp_path))
    monkeypatch.setattr(common, "EVALUATORS", str(tmp_path / "none"))    # as beside a common.py copied alone
    (tmp_path / "classifier_digits_v2.pt").write_bytes(b"junk")
    with pytest.raises(common.UserError, match="classifier_digits_v2.pt is not a readable checkpoint.*delete it"):
        metrics.get_classifier("digits")
    with pytest.raises(common.UserError, match="classifier_digits_v2.pt is not a readable checkpoint"):
        vae.main(["--out", str(tmp_path / "run")])                        # at once, before any training
    assert not (tmp_path / "run").exists()


def test_cyclegan_folder_with_a_broken_image_mixed_sizes_and_modes(tmp_path):
    for side in ("trainA", "trainB"):
        os.makedirs(tmp_path / side)
        matplotlib.image.imsave(tmp_path / side / "rgb.png", np.random.rand(20, 24, 3))
        matplotlib.image.imsave(tmp_path / side / "big.png", np.random.rand(40, 40, 3))
        from PIL import Image
        Image.fromarray((np.random.rand(16, 16) * 255).astype(np.uint8), "L").save(tmp_path / side / "grey.png")
    x = cyclegan.load_folder(str(tmp_path / "trainA"), 16)
    assert x.shape == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    (tmp_path / "trainA" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(common.UserError, match="broken.png is not an image"):
        cyclegan.load_folder(str(tmp_path / "trainA"), 16)
