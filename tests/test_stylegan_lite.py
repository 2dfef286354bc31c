"""Tests of stylegan_lite.py: AdaIN statistics, shapes of f and A, noise inputs, style mixing, truncation,
equalized learning rate, R1, and a run through main()."""
import copy, json, os

import pytest
import torch

import common
import metrics
import stylegan_lite as sg


def small_generator(seed=0):
    torch.manual_seed(seed)
    return sg.Generator(z_dim=16, map_layers=2, ch=16).eval()


def test_adain_output_has_the_style_mean_and_std_per_channel():
    torch.manual_seed(0)
    x = 3 * torch.randn(4, 5, 8, 8) + 2
    gamma, beta = torch.rand(4, 5) + 0.5, torch.randn(4, 5)
    out = sg.adain(x, gamma, beta)
    assert torch.allclose(out.mean((2, 3)), beta, atol=1e-5)
    assert torch.allclose(out.var((2, 3), unbiased=False).sqrt(), gamma, atol=1e-5)


def test_mapping_and_affine_shapes_and_pixel_norm():
    G = small_generator()
    z = torch.randn(3, 16)
    assert torch.allclose(sg.pixel_norm(5 * z).pow(2).mean(1), torch.ones(3), atol=1e-5)
    w = G.mapping(z)
    assert w.shape == (3, 16) and G.styles(z).shape == (3, 6, 16)       # one style per layer
    gamma, beta = G.layers[3].A(w).chunk(2, 1)
    assert gamma.shape == beta.shape == (3, G.layers[3].conv.weight.shape[0])
    assert G(z).shape == (3, 1, 28, 28) and sg.to_image(G(z)).shape == (3, 1, 28, 28)


def test_noise_scale_starts_at_zero_and_then_changes_the_output():
    G = small_generator()
    z = torch.randn(2, 16)
    with torch.no_grad():
        assert all(float(layer.noise_scale.abs().max()) == 0 for layer in G.layers)
        assert torch.equal(G(z), G(z))                                   # independent of the noise draws
        for layer in G.layers:
            layer.noise_scale.fill_(0.5)
        assert (G(z) - G(z)).abs().max() > 1e-3


def test_style_mixing_uses_w2_only_from_the_crossover_layer():
    """G(z1, z2, crossover=4) itself, its layers' outputs read by forward hooks, with the same noise images."""
    G = small_generator()
    z1, z2a, z2b = torch.randn(3, 2, 16)
    noise = [torch.randn(2, 1, 7 * 2 ** (i // 2), 7 * 2 ** (i // 2)) for i in range(6)]
    for layer in G.layers:                                               # noise on, so its images matter too
        layer.noise_scale.data.fill_(0.3)
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: outs.append(out)) for layer in G.layers]
    with torch.no_grad():
        G(z1, z2a, 4, noise=noise)
        G(z1, z2b, 4, noise=noise)
    for h in hooks:
        h.remove()
    a, b = outs[:6], outs[6:]
    for i in range(4):                                                   # coarse layers: w_1 only, unchanged
        assert torch.equal(a[i], b[i])
    assert (a[4] - b[4]).abs().max() > 1e-4                              # from the crossover on: w_2
    ws = G.styles(z1, z2a, crossover=4)
    assert torch.equal(ws[:, :4], G.styles(z1)[:, :4]) and torch.equal(ws[:, 4:], G.styles(z2a)[:, 4:])


def test_mixing_probability_and_crossover_layers():
    G = small_generator()
    torch.manual_seed(0)
    draws = [sg.sample_latents(G, 1, "cpu", 0.9) for _ in range(4000)]
    mixed = [c for _, z2, c in draws if z2 is not None]
    assert abs(len(mixed) / 4000 - 0.9) < 0.024                          # 5 standard errors of 4000 draws
    assert set(mixed) == set(range(1, 6))                                # crossover in 1..5, all used
    assert all(sg.sample_latents(G, 1, "cpu", 0.0)[1] is None for _ in range(100))


def test_lazy_r1_every_r1_every_steps_scaled_by_r1_every(tmp_path, monkeypatch):
    """With the GAN loss patched to 0 and R1 patched to 1, D's loss is gamma * r1_every exactly on the R1 steps."""
    monkeypatch.setattr(sg, "d_loss", lambda l_real, l_fake: 0 * (l_real.sum() + l_fake.sum()))
    monkeypatch.setattr(sg, "r1_penalty", lambda D, x: 1 + 0 * D(x).sum())
    sg.main(["--steps", "6", "--batch-size", "4", "--width", "4", "--n-samples", "20", "--r1-every", "3",
             "--r1-gamma", "2", "--out", str(tmp_path)])
    history = torch.load(tmp_path / "checkpoint.pt")["history"]["D loss"]
    assert history == [0.0, 0.0, 6.0, 0.0, 0.0, 6.0]


def test_w_avg_is_the_running_mean_of_w(tmp_path, monkeypatch):
    """One step from w_bar = 0 with a fixed z: w_bar = 0.005 mean f(z), f the mapping after the step."""
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(sg, "sample_latents", lambda G, n, device, p: (z.to(device), None, None))
    sg.main(["--steps", "1", "--batch-size", "4", "--width", "8", "--z-dim", "16", "--n-samples", "20",
             "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pt")
    G = sg.Generator(16, 4, 8)
    G.load_state_dict(state["G"])
    with torch.no_grad():
        assert torch.allclose(G.w_avg, 0.005 * G.mapping(z).mean(0), atol=1e-7)
    assert torch.equal(state["G_ema"]["w_avg"], G.w_avg)                # the EMA copy carries it (a buffer)


def test_d_gets_a_gradient_only_in_its_own_step(tmp_path):
    """G's step freezes D (its weights' gradients would be thrown away), and D trains again after it; R1's
    steps included."""
    argv = ["--steps", "3", "--batch-size", "4", "--width", "8", "--ndf", "8", "--r1-every", "2", "--out",
            str(tmp_path)]
    cfg = common.parse_config(sg.Config, argv, "stylegan_lite")
    G = sg.Generator(cfg.z_dim, cfg.map_layers, cfg.width)
    D = sg.discriminator(cfg.ndf)
    calls = []
    D[0].weight.register_hook(lambda g: calls.append(1))
    sg.train(cfg, G, D, copy.deepcopy(G), "cpu")
    assert len(calls) == 3                                              # once per step: in D's step only


def test_channels_last_layout_is_kept_and_changes_no_output_or_gradient(tmp_path):
    """main() trains G and D channels_last (the CPU's convolutions are faster so); the layout is the same
    function: outputs and gradients agree with the default layout up to rounding (D's Flatten reads C, H, W in
    the same order in both)."""
    sg.main(["--steps", "1", "--batch-size", "4", "--width", "8", "--ndf", "8", "--n-samples", "20",
             "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pt")
    for w in (state["G"]["layers.2.conv.weight"], state["G_ema"]["const"], state["D"]["2.weight"]):
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    G = small_generator()
    D = sg.discriminator(8)
    G_cl = copy.deepcopy(G).to(memory_format=torch.channels_last)
    D_cl = copy.deepcopy(D).to(memory_format=torch.channels_last)
    z = torch.randn(4, 16)
    noise = [torch.randn(4, 1, 7 * 2 ** (i // 2), 7 * 2 ** (i // 2)) for i in range(6)]
    outs = []
    for g, d in ((G, D), (G_cl, D_cl)):
        logits = d(g(z, noise=noise))
        logits.sum().backward()
        outs.append((logits, g.const.grad, g.layers[1].conv.weight.grad, d[0].weight.grad, d[-1].weight.grad))
    assert outs[1][3].is_contiguous(memory_format=torch.channels_last)  # the layout really differed
    for a, b in zip(*outs):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()                # float32 rounding, not another function


def test_truncation_psi_zero_gives_one_image_for_all_z():
    G = small_generator()
    G.w_avg.normal_()
    noise = [torch.zeros(5, 1, 7 * 2 ** (i // 2), 7 * 2 ** (i // 2)) for i in range(6)]
    with torch.no_grad():
        x = G(torch.randn(5, 16), psi=0.0, noise=noise)
    assert (x - x[:1]).abs().max() < 1e-5
    with torch.no_grad():
        x = G(torch.randn(5, 16), psi=1.0, noise=noise)
    assert (x - x[:1]).abs().max() > 1e-3
    z = torch.randn(5, 16)
    with torch.no_grad():                                                # w' = w_bar + psi (w - w_bar), per layer
        w = G.mapping(z)[:, None]
        assert torch.allclose(G.styles(z, psi=0.7), G.w_avg + 0.7 * (w - G.w_avg), atol=1e-6)
        assert torch.allclose(G.styles(z, psi=1.0), w.expand(-1, 6, -1))


def test_equalized_layers_keep_unit_variance_up_to_the_relu_gain():
    torch.manual_seed(0)
    lin, conv = sg.EqLinear(256, 256), sg.EqConv2d(64, 64, 3)
    with torch.no_grad():
        assert lin(torch.randn(4096, 256)).var().item() == pytest.approx(1.0, rel=0.1)
        assert conv(torch.randn(64, 64, 16, 16))[:, :, 1:-1, 1:-1].var().item() == pytest.approx(1.0, rel=0.1)
        slow = sg.EqLinear(256, 256, lr_mul=0.01)                       # same output scale, weights 100x larger
        assert slow(torch.randn(4096, 256)).var().item() == pytest.approx(1.0, rel=0.1)
        assert slow.weight.std().item() == pytest.approx(100, rel=0.05)


def test_equalized_linear_bias_is_scaled_by_lr_mul():
    lin = sg.EqLinear(3, 2, lr_mul=0.01, bias_init=0.7)                # stored as 70, used as 0.7
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[100.0, 0.0, 0.0], [0.0, 200.0, -300.0]]))
        out = lin(torch.tensor([[1.0, 2.0, 3.0]]))
    # (0.01 / sqrt(3)) W x + 0.7
    assert torch.allclose(out, torch.tensor([[1.0, 4.0 - 9.0]]) / 3 ** 0.5 + 0.7, atol=1e-5)


def test_logistic_losses_by_hand():
    l_real, l_fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    want_d = -(torch.log(sig(l_real)).mean() + torch.log(1 - sig(l_fake)).mean())
    assert sg.d_loss(l_real, l_fake).item() == pytest.approx(want_d.item(), rel=1e-5)
    assert sg.g_loss(l_fake).item() == pytest.approx(-torch.log(sig(l_fake)).mean().item(), rel=1e-5)


def test_r1_penalty_on_a_linear_critic():
    D = lambda x: 3.0 * x.sum((1, 2, 3))[:, None]                        # grad = 3 everywhere
    x = torch.randn(4, 1, 2, 2)
    assert sg.r1_penalty(D, x).item() == pytest.approx(0.5 * 9 * 4)


def test_main_smoke_and_sample_only(tmp_path):
    args = ["--steps", "4", "--batch-size", "8", "--width", "8", "--z-dim", "16", "--n-samples", "200",
            "--r1-every", "2", "--out", str(tmp_path)]
    rec = sg.main(args)
    assert {"fd", "digit_confidence", "class_entropy"} <= set(rec)
    for name in ("samples.png", "samples.pt", "style_mixing.png", "truncation.png", "noise.png", "loss.png",
                 "checkpoint.pt", "metrics.json"):
        assert os.path.exists(tmp_path / name)
    x = torch.load(tmp_path / "samples.pt")
    assert x.shape == (200, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    again = sg.main(args + ["--sample-only"])
    assert again["fd"] == pytest.approx(rec["fd"], rel=0.05)             # same weights and z (noise draws differ)
    with pytest.raises(common.UserError, match=r"--mix-prob must be in \[0, 1\]"):
        sg.main(["--mix-prob", "2", "--out", str(tmp_path)])


def test_each_net_has_its_own_optimizer_settings_and_d_its_width(tmp_path):
    """G: Adam(--lr, betas (0, 0.99)); D (the DCGAN discriminator, one logit per image): Adam(--d-lr, (0.5, 0.999)),
    --ndf channels, then 2 ndf; --ndf is read back from the checkpoint."""
    sg.main(["--steps", "1", "--batch-size", "4", "--width", "4", "--n-samples", "20", "--lr", "3e-3",
             "--d-lr", "5e-4", "--ndf", "8", "--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pt")
    g_group = state["opt_g"]["param_groups"][0]
    d_group = state["opt_d"]["param_groups"][0]
    assert (g_group["lr"], g_group["betas"]) == (3e-3, (0.0, 0.99))
    assert (d_group["lr"], d_group["betas"]) == (5e-4, (0.5, 0.999))
    assert state["D"]["0.weight"].shape[0] == 8 and state["D"]["2.weight"].shape[:2] == (16, 8)
    with pytest.raises(common.UserError, match="--ndf 16 contradicts the checkpoint"):
        sg.main(["--sample-only", "--ndf", "16", "--out", str(tmp_path)])
    assert sg.main(["--sample-only", "--n-samples", "20", "--out", str(tmp_path)])["config"]["ndf"] == 8
    assert sg.discriminator()(torch.randn(3, 1, 28, 28)).shape == (3, 1)
    with pytest.raises(common.UserError, match="--ndf must be positive"):
        sg.main(["--ndf", "0", "--out", str(tmp_path)])


def test_style_walk_goes_from_the_sources_a_to_b_and_crosses_over_back(tmp_path):
    from PIL import Image
    torch.manual_seed(0)
    G = sg.Generator(z_dim=16, map_layers=2, ch=8).eval()                 # noise_scale 0 at init: no noise effect
    walk = sg.style_walk(G, n=5, seed=1, steps=24)
    grid = sg.style_mixing_grid(G, n=5, seed=1, coarse=2)[0].view(6, 6, 1, 28, 28)
    A, B = grid[0, 1:], grid[1:, 0]
    assert walk.shape == (31, 5, 1, 28, 28)
    assert torch.allclose(walk[0], A, atol=1e-5) and torch.allclose(walk[-1], A, atol=1e-5)
    assert torch.allclose(walk[24], B, atol=1e-5)
    assert torch.allclose(walk[28], torch.stack([grid[1 + i, 1 + i] for i in range(5)]), atol=1e-5)   # c = 2
    assert not torch.allclose(walk[12], A, atol=1e-3) and not torch.allclose(walk[12], B, atol=1e-3)
    sg.main(["--steps", "2", "--batch-size", "4", "--width", "8", "--z-dim", "16", "--n-samples", "20",
             "--out", str(tmp_path), "--gif"])
    assert Image.open(tmp_path / "style_walk.gif").n_frames == 31
