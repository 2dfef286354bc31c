"""Tests of stylegan_lite.py: AdaIN statistics, shapes of f and A, noise inputs, style mixing, truncation,
equalized learning rate, R1, and a run through main()."""
import json, os

import pytest
import torch

import common
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
    assert w.shape == (3, 16) and G.styles(z).shape == (3, 8, 16)       # one style per layer
    gamma, beta = G.layers[3].A(w).chunk(2, 1)
    assert gamma.shape == beta.shape == (3, G.layers[3].conv.weight.shape[0])
    assert G(z).shape == (3, 1, 32, 32) and sg.to_image(G(z)).shape == (3, 1, 28, 28)


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
    G = small_generator()
    z1, z2a, z2b = torch.randn(3, 2, 16)
    noise = [torch.randn(2, 1, 4 * 2 ** (i // 2), 4 * 2 ** (i // 2)) for i in range(8)]
    feats = {}
    for name, z2 in (("a", z2a), ("b", z2b)):
        ws = G.styles(z1, z2, crossover=4)
        assert torch.equal(ws[:, :4], G.styles(z1)[:, :4]) and torch.equal(ws[:, 4:], G.styles(z2)[:, 4:])
        x, outs = G.const.expand(2, -1, -1, -1), []
        for i, layer in enumerate(G.layers):
            x = layer(x, ws[:, i], noise[i])
            outs.append(x)
        feats[name] = outs
    for i in range(4):                                                   # coarse layers: unchanged
        assert torch.equal(feats["a"][i], feats["b"][i])
    assert (feats["a"][4] - feats["b"][4]).abs().max() > 1e-4            # from the crossover on: w_2


def test_truncation_psi_zero_gives_one_image_for_all_z():
    G = small_generator()
    G.w_avg.normal_()
    noise = [torch.zeros(5, 1, 4 * 2 ** (i // 2), 4 * 2 ** (i // 2)) for i in range(8)]
    with torch.no_grad():
        x = G(torch.randn(5, 16), psi=0.0, noise=noise)
    assert (x - x[:1]).abs().max() < 1e-5
    with torch.no_grad():
        x = G(torch.randn(5, 16), psi=1.0, noise=noise)
    assert (x - x[:1]).abs().max() > 1e-3


def test_equalized_layers_keep_unit_variance_up_to_the_relu_gain():
    torch.manual_seed(0)
    lin, conv = sg.EqLinear(256, 256), sg.EqConv2d(64, 64, 3)
    with torch.no_grad():
        assert lin(torch.randn(4096, 256)).var().item() == pytest.approx(1.0, rel=0.1)
        assert conv(torch.randn(64, 64, 16, 16))[:, :, 1:-1, 1:-1].var().item() == pytest.approx(1.0, rel=0.1)
        slow = sg.EqLinear(256, 256, lr_mul=0.01)                       # same output scale, weights 100x larger
        assert slow(torch.randn(4096, 256)).var().item() == pytest.approx(1.0, rel=0.1)
        assert slow.weight.std().item() == pytest.approx(100, rel=0.05)


def test_r1_penalty_on_a_linear_critic():
    D = lambda x: 3.0 * x.sum((1, 2, 3))[:, None]                        # grad = 3 everywhere
    x = torch.randn(4, 1, 2, 2)
    assert sg.r1_penalty(D, x).item() == pytest.approx(0.5 * 9 * 4)


def test_minibatch_std_adds_one_channel():
    x = torch.randn(8, 3, 4, 4)
    out = sg.minibatch_std(x)
    assert out.shape == (8, 4, 4, 4) and torch.equal(out[:, :3], x)


def test_main_smoke_and_sample_only(tmp_path):
    args = ["--steps", "4", "--batch-size", "8", "--channels", "8", "--z-dim", "16", "--n-samples", "200",
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
