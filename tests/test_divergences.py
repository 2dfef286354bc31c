"""Tests of divergences.py: the quadrature divergences against closed forms, which Gaussian each one fits to two
modes, and the zero-gradient wall (JSD flat, KL growing, W_1 = d)."""
import math

import pytest
import torch

import divergences


def test_quadrature_divergences_match_closed_forms():
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2, both ways; JSD is
    symmetric and tends to log 2 for distributions that do not overlap."""
    x = torch.linspace(-15, 15, 6001, dtype=torch.float64)
    dx = float(x[1] - x[0])
    log_n = lambda m, s: -0.5 * ((x - m) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
    kl = lambda m1, s1, m2, s2: math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    p, q = log_n(0.3, 0.8), log_n(-1.0, 1.7)
    assert float(divergences.divergence("kl_pq", p, q, dx)) == pytest.approx(kl(0.3, 0.8, -1.0, 1.7), rel=1e-6)
    assert float(divergences.divergence("kl_qp", p, q, dx)) == pytest.approx(kl(-1.0, 1.7, 0.3, 0.8), rel=1e-6)
    jsd = lambda a, b: float(divergences.divergence("jsd", a, b, dx))
    assert jsd(p, q) == pytest.approx(jsd(q, p), rel=1e-9)
    P, Q = p.exp(), q.exp()                                              # JSD by hand: 1/2 KL(p || m) + 1/2 KL(q || m)
    by_hand = 0.5 * (P * (2 * P / (P + Q)).log() + Q * (2 * Q / (P + Q)).log()).sum() * dx
    assert jsd(p, q) == pytest.approx(float(by_hand), rel=1e-9)
    assert jsd(log_n(-8, 0.3), log_n(8, 0.3)) == pytest.approx(math.log(2), rel=1e-6)


def test_forward_kl_fit_matches_the_moments_and_reverse_kl_picks_a_mode():
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    means, w = torch.tensor([-2.5, 2.5], dtype=torch.float64), torch.tensor([0.4, 0.6], dtype=torch.float64)
    log_p = divergences.mixture_log_density(x, means, 0.6, w)
    mu, sigma, _ = divergences.fit_gaussian("kl_pq", x, log_p, 0.5)
    assert mu == pytest.approx(0.5, abs=1e-3)                            # E_p x = 0.6 * 2.5 - 0.4 * 2.5
    assert sigma == pytest.approx(math.sqrt(0.36 + 0.4 * 9 + 0.6 * 4), abs=1e-3)   # 0.6^2 + Var of the means
    mu, sigma, _ = divergences.fit_gaussian("kl_qp", x, log_p, 2.0)
    assert mu == pytest.approx(2.5, abs=0.01) and sigma == pytest.approx(0.6, abs=0.01)


def test_the_wall_jsd_saturates_kl_grows_w_stays_linear(tmp_path):
    cfg = divergences.Config(out=str(tmp_path))
    wall = divergences.wall(cfg)
    d, kl, jsd, w1 = (torch.tensor(wall[k]) for k in ("d", "kl", "jsd", "w1"))
    assert torch.allclose(kl, d ** 2 / (2 * 0.1 ** 2))                   # KL = d^2 / (2 s^2), s = 0.1
    assert jsd[0] == pytest.approx(0, abs=1e-9) and (jsd[d >= 1] - math.log(2)).abs().max() < 1e-6   # saturated
    assert (torch.tensor(wall["jsd_slope"])[d[:-1] >= 1]).abs().max() < 1e-5   # no learning signal once apart
    assert (w1 - d).abs().max() < 0.01 and (torch.tensor(wall["w1_slope"]) - 1).abs().max() < 0.02   # W_1 = d
    assert torch.allclose(torch.tensor(wall["kl_slope"]), (d[1:] + d[:-1]) / (2 * 0.1 ** 2), rtol=1e-9)   # grows
    assert (tmp_path / "wall.png").exists()


def test_the_script_runs_in_seconds_and_writes_its_outputs(tmp_path):
    rec = divergences.main(["--steps", "30", "--out", str(tmp_path)])
    assert set(rec) >= {"kl_pq", "kl_qp", "jsd", "p_mean", "wall"}
    for name in ("samples.png", "wall.png", "samples.pt", "loss.png", "metrics.json"):
        assert (tmp_path / name).exists(), name
    assert torch.load(tmp_path / "samples.pt").shape == (3, 5000)
