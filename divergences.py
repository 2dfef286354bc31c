r"""divergences.py - what a divergence asks of a model: KL(p||q) covers, KL(q||p) picks a mode, JSD stalls on
disjoint supports where the Wasserstein distance still points the way. No network: densities on a grid.

Lectures: 003 "The Problem: Asymmetry" to "Summary of the Terror" (KL's two directions, JSD) and Part II "The
'Zero Gradient' Wall"; 004 "KL", eq. 1 and 2; 002 "D_KL is asymmetric"; 000 Part B 2.3 ("Why Wasserstein > KL").
Run: `python divergences.py` (both pictures, seconds).

    KL(p || q) = int p log(p / q)                                                       (004, eq. 1)
    KL(q || p) = int q log(q / p)
    JSD(p, q)  = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2                      (004, eq. 2)
    W_1(p, q)  = inf over couplings E|x - y|; in 1-D the mean |x_(i) - y_(i)| of sorted samples (004, "1D")
fits (samples.png): q = N(mu, sigma^2) fitted to the two-mode p = 0.4 N(-2.5, 0.6^2) + 0.6 N(2.5, 0.6^2) by
    minimizing each divergence (a Riemann sum on a grid of 2001 points) with Adam on (mu, log sigma), from three
    starts mu_0 = -2, 0.5, 2: KL(p || q) matches p's mean and variance (it covers both modes), KL(q || p) sits on
    one mode, JSD has a local optimum of each kind.
wall (wall.png): mu = N(0, 0.1^2) and nu = N(d, 0.1^2) for d in [0, 10] (000's example: d = 10). Closed forms
    KL = d^2 / (2 0.1^2) and W_1 = W_2 = d; JSD by quadrature, W_1 also from 20 000 samples by sorting. Below each
    curve its slope in d, the signal a generator gets: KL's grows without bound, JSD's vanishes once the two
    barely overlap (it saturates at log 2), W_1's stays 1. samples.pt: 5000 draws of each best fit, (3, 5000).
Slips: 003's first lines on asymmetry (l.78-97) call KL(P || Q) "mode seeking" and KL(Q || P) "mode
collapsing"; its own sections 2 and 3 then say it right: KL(P || Q) is covering (mean-seeking), KL(Q || P) picking
(mode-seeking). 000 2.3 says KL(mu || nu) is "about infinite" with "gradient about 0" for its two Gaussians; KL is
finite (5000) and its slope large (1000): it is JSD whose slope vanishes (and KL of disjoint supports is infinite).
"""
import dataclasses, math, os, time

import torch
from matplotlib.figure import Figure

import common
import metrics


@dataclasses.dataclass
class Config(common.Config):
    NOT_FLAGS = ("device", "data", "data_dir", "batch_size", "sample_only", "resume")   # nothing to train or load
    steps: int = common.arg(1500, "Adam steps of each Gaussian fit")
    lr: float = common.arg(0.05, "Adam learning rate of the fits")


# ----------------------------------------------------------------------------- densities and divergences
def mixture_log_density(x, means, std, weights):
    """log p(x) of the 1-D mixture p = sum_k w_k N(mu_k, std^2), by log-sum-exp."""
    log_n = -0.5 * ((x[:, None] - means) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))   # (N, K)
    return torch.logsumexp(log_n + weights.log(), 1)


def divergence(name, log_p, log_q, dx):
    r"""A divergence between densities given by their logs on a grid of spacing dx (a Riemann sum):
        kl_pq:  KL(p || q) = int p log(p / q)          (004, eq. 1)
        kl_qp:  KL(q || p) = int q log(q / p)
        jsd:    JSD = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2   (004, eq. 2)"""
    p = log_p.exp()
    q = log_q.exp()
    if name == "kl_pq":
        return (p * (log_p - log_q)).sum() * dx
    if name == "kl_qp":
        return (q * (log_q - log_p)).sum() * dx
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    return 0.5 * ((p * (log_p - log_m)).sum() + (q * (log_q - log_m)).sum()) * dx


def fit_gaussian(name, x, log_p, mu0, steps=1500, lr=0.05, history=None):
    """(mu, sigma, divergence) of q = N(mu, sigma^2) minimizing the divergence to p, by Adam on (mu, log sigma)
    from (mu0, 1): a local optimum (003, "The Problem: Asymmetry": which q each direction of KL prefers).
    `history` (a list) collects the divergence at each step."""
    mu = torch.tensor(mu0, dtype=x.dtype, requires_grad=True)
    log_sigma = torch.tensor(0.0, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr)
    dx = float(x[1] - x[0])
    log_q = lambda: -0.5 * ((x - mu) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)   # log N
    for _ in range(steps):
        loss = divergence(name, log_p, log_q(), dx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if history is not None:
            history.append(loss.item())
    with torch.no_grad():                                                # the divergence at the returned (mu, sigma)
        return mu.item(), log_sigma.exp().item(), divergence(name, log_p, log_q(), dx).item()


def fits(cfg):
    """The three fits from three starts each; samples.png draws the best of each (and JSD's other optimum), loss.png
    each divergence during its fit from mu_0 = 0.5."""
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    means = torch.tensor([-2.5, 2.5], dtype=torch.float64)
    weights = torch.tensor([0.4, 0.6], dtype=torch.float64)
    log_p = mixture_log_density(x, means, 0.6, weights)
    mean = float((weights * means).sum())                                # p's moments: what KL(p || q) matches
    var = 0.6 ** 2 + float((weights * (means - mean) ** 2).sum())
    scores = {"p_mean": mean, "p_std": math.sqrt(var)}
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.fill_between(x.numpy(), log_p.exp().numpy(), color="0.85", label="p (two modes)")
    density = lambda mu, sigma: torch.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    history = {}
    for name, label, style in (("kl_pq", "KL(p||q): covers", "-"), ("kl_qp", "KL(q||p): picks a mode", "-"),
                               ("jsd", "JSD(p, q), best of 3 starts", "--")):
        history[name] = []
        found = [fit_gaussian(name, x, log_p, mu0, cfg.steps, cfg.lr, history[name] if mu0 == 0.5 else None)
                 for mu0 in (-2.0, 0.5, 2.0)]
        mu, sigma, value = min(found, key=lambda f: f[2])
        scores[name] = {"mu": mu, "sigma": sigma, "divergence": value, "from_mu0_-2_0.5_2": found}
        ax.plot(x.numpy(), density(mu, sigma).numpy(), style, lw=1.5, label=f"{label}: mu {mu:.2f}, sigma {sigma:.2f}")
    mu, sigma, value = scores["jsd"]["from_mu0_-2_0.5_2"][1]             # JSD's other local optimum
    ax.plot(x.numpy(), density(mu, sigma).numpy(), ":", lw=1.5, label=f"JSD from mu0 = 0.5: mu {mu:.2f}, sigma "
            f"{sigma:.2f} (JSD {value:.3f} vs {scores['jsd']['divergence']:.3f})")
    ax.set(xlim=(-7, 7), xlabel="x", title="one Gaussian q fitted to p by three divergences")
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(cfg.out, "samples.png"), dpi=100, bbox_inches="tight")
    gen = torch.Generator().manual_seed(cfg.seed)                        # samples.pt: draws of the three best q
    draws = torch.stack([scores[n]["mu"] + scores[n]["sigma"] * torch.randn(5000, generator=gen)
                         for n in ("kl_pq", "kl_qp", "jsd")])
    return scores, draws, history


# ----------------------------------------------------------------------------- the zero-gradient wall
def wall(cfg, s=0.1):
    """KL, JSD and W_1 between N(0, s^2) and N(d, s^2) for 41 values of d in [0, 10], and their slopes in d
    (finite differences between neighbours); wall.png."""
    ds = torch.linspace(0, 10, 41, dtype=torch.float64)
    grid = torch.linspace(-1, 11, 120001, dtype=torch.float64)
    pdf = lambda m: torch.exp(-(grid - m) ** 2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi))
    p, q = pdf(0.0).expand(len(ds), -1), pdf(ds[:, None])                # (41, G): mu, and nu for each d
    m = (p + q) / 2                                                      # the mixture of the JSD
    term = lambda r: torch.where(r > 0, r * torch.log(r / m), torch.zeros_like(r))       # 0 log 0 = 0
    curves = {"kl": ds ** 2 / (2 * s * s),                              # KL(mu || nu) = d^2 / (2 s^2)
              "jsd": 0.5 * torch.trapezoid(term(p), grid) + 0.5 * torch.trapezoid(term(q), grid)}
    z = s * torch.randn(2, 20000, 1, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)
    curves["w1"] = metrics.w1_sorted(z[0].expand(-1, len(ds)), z[1] + ds)   # one column per d
    titles = ["KL(mu || nu) = d^2 / (2 s^2)", "JSD(mu, nu), quadrature", "W_1(mu, nu), sorted samples"]
    fig = Figure(figsize=(13, 6))
    axes = fig.subplots(2, 3)
    out = {"d": ds.tolist()}
    for k, (name, values) in enumerate(curves.items()):
        slope = (values[1:] - values[:-1]) / (ds[1:] - ds[:-1])          # the generator's learning signal
        out[name], out[name + "_slope"] = values.tolist(), slope.tolist()
        axes[0, k].plot(ds, values, lw=2)
        axes[0, k].set_title(titles[k], fontsize=10)
        axes[1, k].plot((ds[1:] + ds[:-1]) / 2, slope, lw=2, c="tab:red")
        axes[1, k].set(xlabel="d, the distance between the means", title="its slope in d")
    axes[0, 1].axhline(math.log(2), c="k", ls="--", label="log 2")
    axes[0, 1].legend()
    axes[0, 2].plot(ds, ds, "k--", label="d (exact)")
    axes[0, 2].legend()
    fig.savefig(os.path.join(cfg.out, "wall.png"), dpi=100, bbox_inches="tight")
    return out


def main(argv=None):
    cfg = common.parse_config(Config, argv, "divergences", __doc__)
    common.seed_all(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()

    # the three fits, then the wall
    scores, draws, history = fits(cfg)
    scores["wall"] = wall(cfg)
    return common.finish(cfg, scores, t0, "cpu", samples=draws, history=history, logy=True)


if __name__ == "__main__":
    common.run(main)
