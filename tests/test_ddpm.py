"""Tests of ddpm.py: schedule, forward process, samplers (against closed forms), guidance, the U-Net, runs."""
import dataclasses, math

import pytest
import torch

import common
import ddpm


def test_alpha_bar_closed_form_and_product():
    sch = ddpm.Schedule(1000, "linear")
    beta = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    prod, ab = 1.0, [1.0]
    for b in beta:
        prod *= 1 - b
        ab.append(prod)
    assert sch.alpha_bar[0] == 1 and sch.beta[1] == pytest.approx(1e-4) and sch.beta[1000] == pytest.approx(0.02)
    assert torch.allclose(sch.alpha_bar, torch.tensor(ab, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert sch.alpha_bar[1000] < 1e-4                                    # q(x_T) is close to N(0, I)
    cos = ddpm.Schedule(1000, "cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (1, 250, 500, 900):
        assert float(cos.alpha_bar[t]) == pytest.approx(f(t) / f(0), rel=1e-4)


@pytest.mark.parametrize("t", [1, 100, 500, 1000])
def test_q_sample_moments(t):
    sch, x0 = ddpm.Schedule(), torch.full((200000, 1), 0.7)
    eps = torch.randn(200000, 1, generator=torch.Generator().manual_seed(t))
    xt = ddpm.q_sample(sch, x0, torch.full((200000,), t), eps)
    ab = float(sch.alpha_bar[t])
    assert float(xt.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert float(xt.var()) == pytest.approx(1 - ab, abs=0.01 + 0.01 * (1 - ab))


def test_iterated_one_step_kernel_equals_closed_form():
    sch, g = ddpm.Schedule(), torch.Generator().manual_seed(0)
    x = torch.full((100000,), -0.5)
    for t in range(1, 301):                                  # x_t = sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) z
        x = sch.alpha[t].sqrt() * x + (1 - sch.alpha[t]).sqrt() * torch.randn(100000, generator=g)
    eps = torch.randn(100000, generator=g)
    closed = ddpm.q_sample(sch, torch.full((100000,), -0.5), torch.full((100000,), 300), eps)
    assert float(x.mean()) == pytest.approx(float(closed.mean()), abs=0.01)
    assert float(x.std()) == pytest.approx(float(closed.std()), abs=0.01)
    qs = torch.linspace(0.05, 0.95, 10)
    assert torch.allclose(torch.quantile(x, qs), torch.quantile(closed, qs), atol=0.02)


def test_posterior_mean_update_is_the_slide_formula():
    sch, g = ddpm.Schedule(), torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(5, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(3))   # float64: no rounding
    for t in (2, 10, 700):
        got = ddpm.ancestral_step(sch, x, t, t - 1, eps, z, "beta", clip=False)
        a, ab = sch.alpha[t], sch.alpha_bar[t]
        slide = 1 / a.sqrt() * (x - (1 - a) / (1 - ab).sqrt() * eps) + sch.beta[t].sqrt() * z
        assert torch.allclose(got, slide, atol=1e-10)


class Oracle(torch.nn.Module):
    """eps_theta for data that is a single known point x0: the true noise eps = (x_t - sqrt(ab) x0)/sqrt(1 - ab)."""
    n_classes, shape = 0, (1, 28, 28)                                    # the U-Net's interface

    def __init__(self, sch, x0):
        super().__init__()
        self.sch, self.x0 = sch, x0

    def forward(self, x, t, y=None):
        ab = self.sch.alpha_bar[t].view(-1, 1, 1, 1).float()
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("ddim", 50), ("ddpm", 50)])
def test_perfect_eps_recovers_x0(sampler, steps):
    sch = ddpm.Schedule()
    x0 = torch.rand(1, 1, 28, 28) * 2 - 1
    cfg = ddpm.Config(guidance=0.0, sigma="beta", clip_x0=False, eta=0.0, param="eps")
    out = ddpm.sample(Oracle(sch, x0), sch, 3, cfg, torch.device("cpu"), sampler=sampler, steps=steps)
    assert torch.allclose(out, x0.expand(3, -1, -1, -1), atol=1e-4)


def test_ddim_eta0_deterministic_and_eta1_is_ancestral_with_beta_tilde():
    sch, g = ddpm.Schedule(), torch.Generator().manual_seed(2)
    x, eps, z1, z2 = (torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(4))
    for t in (5, 300, 999):
        deterministic = ddpm.ddim_step(sch, x, t, t - 1, eps, z1, 0.0)
        assert torch.equal(deterministic, ddpm.ddim_step(sch, x, t, t - 1, eps, z2, 0.0))
        d = ddpm.ddim_step(sch, x, t, t - 1, eps, z1, eta=1.0, clip=False)
        a = ddpm.ancestral_step(sch, x, t, t - 1, eps, z1, "beta-tilde", clip=False)
        assert torch.allclose(d, a, atol=1e-10)


def test_timesteps_cover_T_to_0():
    assert ddpm.timesteps(1000, 1000) == list(range(1000, -1, -1))
    ts = ddpm.timesteps(1000, 50)
    assert ts[0] == 1000 and ts[-1] == 0 and len(ts) == 51 and all(a > b for a, b in zip(ts, ts[1:]))


def test_cfg_combination():
    class Fake(torch.nn.Module):
        n_classes = 10

        def forward(self, x, t, y):
            return torch.where(y == 10, -1.0, 2.0).view(-1, 1, 1, 1) * torch.ones_like(x)
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([1, 2, 3])
    assert torch.allclose(ddpm.guided_eps(Fake(), x, 5, y, 2.0), torch.full_like(x, 3 * 2.0 - 2 * (-1.0)))
    assert torch.allclose(ddpm.guided_eps(Fake(), x, 5, y, 0.0), torch.full_like(x, 2.0))


def test_label_dropout_rate_is_per_sample():
    seen = []

    class Spy(torch.nn.Module):
        n_classes = 10

        def forward(self, x, t, y):
            seen.append(y)
            return torch.zeros_like(x)
    torch.manual_seed(0)
    ddpm.diffusion_loss(Spy(), ddpm.Schedule(), torch.zeros(20000, 1, 2, 2), torch.randint(0, 10, (20000,)), 0.1)
    frac = float((seen[0] == 10).float().mean())
    assert abs(frac - 0.1) < 0.01


def test_unet_shapes_and_time_conditioning():
    torch.manual_seed(3)
    net = ddpm.UNet(width=8, attn=True, n_classes=10)
    x = torch.randn(2, 1, 28, 28)
    out = net(x, torch.tensor([10, 10]), torch.tensor([1, 10]))
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, torch.tensor([500, 500]), torch.tensor([1, 10])))      # t is used
    assert not torch.allclose(out, net(x, torch.tensor([10, 10]), torch.tensor([2, 10])))        # y is used
    assert ddpm.UNet(width=8)(x, torch.tensor([0.25, 0.5])).shape == x.shape                       # fractional t


def test_train_sample_only_and_cond_runs(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "30", "--n-samples", "40", "--sample-steps", "5", "--width", "8",
            "--T", "100"]
    rec = ddpm.main(args)
    for key in ("fd", "digit_confidence", "class_entropy", "network_calls"):
        assert key in rec
    for f in ("samples.png", "samples.pt", "loss.png", "forward.png", "denoising.png", "checkpoint.pt"):
        assert (tmp_path / f).exists(), f
    assert ddpm.main(args + ["--sample-only"])["steps"] == 0
    rec = ddpm.main(["--out", str(tmp_path / "c"), "--steps", "20", "--n-samples", "40", "--sample-steps", "5",
                     "--width", "8", "--cond", "--guidance", "2", "--T", "100"])
    assert "class_accuracy" in rec and rec["network_calls"] == 10 and (tmp_path / "c" / "guidance.png").exists()


def test_bad_input(tmp_path):
    with pytest.raises(common.UserError, match="--guidance needs --cond"):
        ddpm.main(["--guidance", "2", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--sample-steps"):
        ddpm.main(["--sample-steps", "0", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--sample-steps must be in 1..T=50, got 80"):
        ddpm.main(["--T", "50", "--sample-steps", "80", "--out", str(tmp_path)])
    assert common.parse_config(ddpm.Config, ["--T", "50"], "ddpm").sample_steps == 50    # the default 100, at most T
    assert common.parse_config(ddpm.Config, [], "ddpm").sample_steps == 100


class GaussianOracle(torch.nn.Module):
    """The exact eps_theta when every pixel of x_0 is N(m, s^2): x_t ~ N(sqrt(ab) m, ab s^2 + 1 - ab) and
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab)."""
    n_classes, shape = 0, (1, 28, 28)

    def __init__(self, sch, m, s):
        super().__init__()
        self.sch, self.m, self.s = sch, m, s

    def forward(self, x, t, y=None):
        ab = self.sch.alpha_bar[t].view(-1, 1, 1, 1).float()
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.m) / (ab * self.s ** 2 + 1 - ab)


# Measured with this oracle (seed 0, 64 x 784 pixels, m = 0.3, s = 0.2): every sampler gets the mean to 0.002;
# the std is 0.1997 (DDPM-1000), 0.1985 (DDIM-1000), 0.193 (DDIM-200), 0.174 (DDIM-50), 0.213 (ancestral-50):
# with the exact eps, DDIM's deterministic steps shrink the spread until the steps are small.
@pytest.mark.parametrize("sampler, steps, clip, tol", [("ddpm", 1000, False, 0.01), ("ddpm", 1000, True, 0.01),
                                                       ("ddim", 1000, False, 0.01), ("ddim", 50, False, 0.04),
                                                       ("ddim", 50, True, 0.04), ("ddpm", 50, False, 0.03),
                                                       ("ddpm", 50, True, 0.03)])
def test_samplers_draw_the_data_distribution_with_the_exact_eps(sampler, steps, clip, tol):
    """Unlike a point-mass oracle, this one needs every intermediate x_t to be right: a sampler that replaces
    the states by noise, or shifts t by one, ends with the wrong mean or spread."""
    sch, m, s = ddpm.Schedule(), 0.3, 0.2                                # data well inside [-1, 1]: clipping is idle
    torch.manual_seed(0)
    cfg = ddpm.Config(guidance=0.0, sigma="beta", clip_x0=clip, eta=0.0, param="eps")
    x = ddpm.sample(GaussianOracle(sch, m, s), sch, 64, cfg, torch.device("cpu"), sampler=sampler, steps=steps)
    assert abs(float(x.mean()) - m) < tol and abs(float(x.std()) - s) < tol, (float(x.mean()), float(x.std()))


def test_ddim_with_clipping_rederives_eps_from_the_clipped_x0():
    sch, g = ddpm.Schedule(), torch.Generator().manual_seed(4)
    x = 3 * torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64)  # x0_hat far outside [-1, 1]
    eps = torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64)
    t, s = 400, 380
    ab_t, ab_s = float(sch.alpha_bar[t]), float(sch.alpha_bar[s])
    x0 = ((x - (1 - ab_t) ** 0.5 * eps) / ab_t ** 0.5).clamp(-1, 1)
    eps_new = (x - ab_t ** 0.5 * x0) / (1 - ab_t) ** 0.5
    expected = ab_s ** 0.5 * x0 + (1 - ab_s) ** 0.5 * eps_new
    got = ddpm.ddim_step(sch, x, t, s, eps, torch.zeros_like(x), eta=0.0, clip=True)
    assert torch.allclose(got, expected, atol=1e-12)
    assert not torch.allclose(got, ddpm.ddim_step(sch, x, t, s, eps, torch.zeros_like(x), eta=0.0, clip=False))


def training_dtypes(monkeypatch):
    """The set that collects the dtype of every U-Net output computed with gradients (training passes)."""
    dtypes = set()
    real = ddpm.UNet.forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if torch.is_grad_enabled():
            dtypes.add(out.dtype)
        return out
    monkeypatch.setattr(ddpm.UNet, "forward", forward)
    return dtypes


def test_bf16_autocast_path_runs_on_the_cpu(tmp_path, monkeypatch):
    """The --bf16 path a GPU run takes (torch.autocast with bfloat16), exercised on the CPU: the U-Net's
    convolutions really run in bfloat16 during training, and the run ends with finite numbers."""
    dtypes = training_dtypes(monkeypatch)
    rec = ddpm.main(["--bf16", "--width", "8", "--T", "20", "--batch-size", "8", "--n-samples", "10",
                     "--sample-steps", "5", "--steps", "3", "--out", str(tmp_path)])
    assert dtypes == {torch.bfloat16} and math.isfinite(rec["fd"])


@pytest.mark.slow
def test_compile_path_matches_eager_on_the_cpu(tmp_path):
    """--compile on the CPU (about a minute of compilation): the same training run, to float tolerance."""
    args = ["--width", "8", "--T", "20", "--batch-size", "8", "--n-samples", "10", "--sample-steps", "5",
            "--steps", "3"]
    eager = ddpm.main(args + ["--out", str(tmp_path / "eager")])
    compiled = ddpm.main(args + ["--compile", "--out", str(tmp_path / "compiled")])
    h_e = torch.load(tmp_path / "eager" / "checkpoint.pt")["history"]["loss"]
    h_c = torch.load(tmp_path / "compiled" / "checkpoint.pt")["history"]["loss"]
    assert h_c == pytest.approx(h_e, rel=1e-4) and compiled["fd"] == pytest.approx(eager["fd"], rel=1e-3)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_prediction_targets_convert_back_to_eps_exactly(param):
    """The exact target of each --param, fed back through eps_from_prediction, gives the true eps at every t."""
    sch = ddpm.Schedule(1000)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    for t in (1, 10, 500, 1000):
        ab = float(sch.alpha_bar[t])
        x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        out = ddpm.prediction_target(sch, x0, torch.full((4,), t), eps, param).double()
        v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0                 # 000: v = alpha eps - sigma x
        want = {"eps": eps, "x0": x0, "v": v}[param]
        assert torch.allclose(out, want, atol=1e-6)
        assert torch.allclose(ddpm.eps_from_prediction(sch, x_t, t, want, param), eps, atol=1e-9)
    if param == "v":                                                     # and x0_hat = sqrt(ab) x_t - sqrt(1 - ab) v
        assert torch.allclose(math.sqrt(ab) * x_t - math.sqrt(1 - ab) * want, x0, atol=1e-12)


def test_param_runs(tmp_path):
    for param in ("eps", "v"):                                           # x0, the default, runs in every other test
        rec = ddpm.main(["--param", param, "--steps", "3", "--width", "8", "--n-samples", "20", "--sample-steps", "5",
                         "--T", "100", "--out", str(tmp_path / param)])
        assert rec["config"]["param"] == param and math.isfinite(rec["fd"])


def test_diffusion_loss_regresses_the_chosen_target():
    class Zero(torch.nn.Module):                                         # predicts 0: the loss is mean(target^2)
        n_classes = 0

        def forward(self, x, t, y=None):
            return torch.zeros_like(x)
    sch = ddpm.Schedule(1000)
    x0 = torch.full((4000, 1, 2, 2), 3.0)
    assert ddpm.diffusion_loss(Zero(), sch, x0, param="x0").item() == pytest.approx(9.0)
    assert ddpm.diffusion_loss(Zero(), sch, x0, param="eps").item() == pytest.approx(1.0, abs=0.05)
    torch.manual_seed(0)
    t = torch.randint(1, 1001, (4000,))                                  # what diffusion_loss draws after this seed
    v2 = (sch.alpha_bar[t] + 9 * (1 - sch.alpha_bar[t])).mean()          # E v^2 = ab + 9 (1 - ab): eps, x0 independent
    torch.manual_seed(0)
    assert ddpm.diffusion_loss(Zero(), sch, x0, param="v").item() == pytest.approx(float(v2), rel=0.05)


def test_denoising_gif_runs_from_x_T_to_the_samples_it_returns(tmp_path):
    from PIL import Image
    import numpy as np
    sch = ddpm.Schedule()
    x0 = torch.rand(1, 1, 28, 28) * 2 - 1
    cfg = ddpm.Config(guidance=0.0, sigma="beta", clip_x0=False, eta=0.0, param="eps", seed=3)
    end_ddpm, end_ddim = ddpm.save_chains_gif(Oracle(sch, x0), sch, cfg, torch.device("cpu"), str(tmp_path / "d.gif"))
    assert torch.allclose(end_ddpm, x0.expand(8, -1, -1, -1), atol=1e-3)      # the perfect eps: both end on x_0
    assert torch.allclose(end_ddim, x0.expand(8, -1, -1, -1), atol=1e-3)
    gif = Image.open(tmp_path / "d.gif")
    assert gif.n_frames == 51
    frame = lambda x: common.image_frame((x.clamp(-1, 1) + 1) / 2, nrow=8)
    torch.manual_seed(3)
    x_T = torch.randn(8, 1, 28, 28)
    gif.seek(0)
    assert np.array_equal(np.array(gif.convert("RGB")), frame(torch.cat([x_T, x_T])))
    gif.seek(50)
    assert np.array_equal(np.array(gif.convert("RGB")), frame(torch.cat([end_ddpm, end_ddim])))
