r"""sinkhorn.py - discrete optimal transport you can trust, and the OT library of this repository.

Lectures: 000 Part B section 2 (Monge, Kantorovich LP, W vs KL, the Sinkhorn pseudo-code, sliced
Wasserstein); 004 "Optimal transport" (Monge, Kantorovich relaxation, "Special case: 1D distribution",
Kantorovich-Rubinstein); 002 (W and its transport interpretation).

Entropic OT: OT_eps = min_P <P, C> + eps KL(P | a b^T) s.t. P 1 = a, P^T 1 = b. Its plan is P = diag(u) K diag(v),
K = exp(-C/eps) (the lecture's scaling form), i.e. P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) (log domain):
    scaling:  u = a / (K v),  v = b / (K^T u)                                   (000, "Sinkhorn Algorithm")
    log:      f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps),  g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps)
K underflows for small eps or far-apart clouds and the scaling form then returns garbage; `sinkhorn` uses the
log domain there. Subtracting row and column minima from C changes no plan (it shifts f and g), so "auto"
decides on the size of the reduced C, and runs the scaling form on it when it is safe.
It evaluates each logsumexp as log(K_ref @ w), K_ref the kernel at reference potentials,
moved when the potentials drift by tau*eps: logsumexp's numbers at a matrix-vector product's cost.
eps-scaling solves eps_0 > eps_0/2 > ... > eps, each warm-started from the last.

Also here: the debiased Sinkhorn divergence S_eps, 1-D W_p by sorting and sliced Wasserstein (004, 000); the
exact assignment solver (auction) that serves as ground truth is metrics.assignment. W against KL and JSD
(000 2.3): divergences.py. Two demos:
    python sinkhorn.py                    # --demo plan: plan, convergence, OT_eps -> exact as eps -> 0
    python sinkhorn.py --demo color       # colour transfer of a photograph (matplotlib's grace_hopper.jpg)
"""
import dataclasses, math, os, time, warnings

import matplotlib
import torch
from matplotlib.figure import Figure

import common
import metrics

@dataclasses.dataclass
class Config(common.Config):
    NOT_FLAGS = ("device", "data_dir", "lr", "sample_only", "resume")    # nothing is trained or loaded here
    demo: str = common.arg("plan", "which demo to run", ["plan", "color"])
    data: str = common.arg("moons", "target cloud of the plan demo (the source is N(0, I))", common.POINT_DATA)
    steps: int = common.arg(10000, "maximum Sinkhorn iterations")
    batch_size: int = common.arg(300, "points per cloud (plan demo) or sampled pixels per image (color demo)")
    eps: str = common.arg("3,1,0.3,0.1,0.03,0.01", "comma-separated eps values of the plan demo")
    tol: float = common.arg(1e-6, "stop when the L1 marginal error is below this")
    pixels: int = common.arg(1000, "color demo: pixels sampled from each image for the OT problem")
    target: str = common.arg("", "color demo: target image (default matplotlib's Minduka_Present_Blue_Pack.png)")
    gif: bool = common.arg(False, "plan demo: also write interpolation.gif, McCann's interpolation in 41 frames")

# ----------------------------------------------------------------------------- entropic OT
def check_problem(a, b, C, eps):
    check = common.check
    check(C.dim() in (2, 3) and a.shape == C.shape[:-1] and b.shape == C.shape[:-2] + C.shape[-1:],
          f"shape mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, C {tuple(C.shape)}; "
          f"need a (..., n), b (..., m), C (..., n, m)")
    check(eps > 0, f"eps must be positive, got {eps}")
    check(bool(torch.isfinite(C).all()), "the cost matrix C must be finite (it holds NaN or inf)")
    check(bool((a >= 0).all() and (b >= 0).all()), "weights a and b must be non-negative")
    for w, name in ((a, "a"), (b, "b")):
        check(bool(((w.sum(-1) - 1).abs() < 1e-5).all()), f"weights {name} must sum to 1, got {w.sum(-1).tolist()}")

def _mv(K, w):
    return (K @ w[..., None])[..., 0]                                   # batched matrix-vector product

def _scaling_loop(a, b, C, eps, tol, max_iter, hist):
    K = torch.exp(-C / eps)                                             # Gibbs kernel (000, "Sinkhorn Algorithm")
    u, v = torch.ones_like(a), torch.ones_like(b)
    for it in range(1, max_iter + 1):
        u = a / _mv(K, v)                                               # u = a / (K v)
        Ktu = _mv(K.mT, u)
        err = float((v * Ktu - b).abs().sum(-1).max())                  # column error of diag(u) K diag(v)
        hist.append(err)
        if not math.isfinite(err) or err < tol:
            break
        v = b / Ktu                                                     # v = b / (K^T u)
    return eps * torch.log(u / a), eps * torch.log(v / b), it, err      # as potentials: u = a e^{f/eps}

def _log_loop(a, b, C, eps, tol, max_iter, f, g, hist, tau=30.0):
    """The scaling loop on the potentials u = a e^{f/eps}, v = b e^{g/eps} (000, "Sinkhorn Algorithm", in logs)."""
    kernel = lambda fr, gr: torch.exp((fr[..., :, None] + gr[..., None, :] - C) / eps)
    fr, gr, K = f, g, kernel(f, g)                                      # K_ij = exp((fr_i + gr_j - C_ij)/eps)
    for it in range(1, max_iter + 1):
        # f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps) = fr_i - eps log sum_j K_ij b_j exp((g_j - gr_j)/eps)
        s = _mv(K, b * torch.exp((g - gr) / eps))
        f = fr - eps * torch.log(s)
        if not torch.isfinite(f).all():                                 # a row underflowed: exact logsumexp
            f = -eps * torch.logsumexp((g[..., None, :] - C) / eps + torch.log(b)[..., None, :], -1)
        t = _mv(K.mT, a * torch.exp((f - fr) / eps))                    # sum_i K_ij a_i exp((f_i - fr_i)/eps)
        g_new = gr - eps * torch.log(t)                                 # g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps)
        if not torch.isfinite(g_new).all():
            g_new = -eps * torch.logsumexp((f[..., :, None] - C) / eps + torch.log(a)[..., :, None], -2)
        err = float((b * torch.expm1((g - g_new) / eps)).abs().sum(-1).max())  # column error of P(f, g)
        hist.append(err)
        if err < tol:
            break
        g = g_new
        if max(float((f - fr).abs().max()), float((g - gr).abs().max())) > tau * eps:
            fr, gr, K = f, g, kernel(f, g)                              # move the reference: no exponent > tau
    return f, g, it, err

def sinkhorn(a, b, C, eps, tol=1e-6, max_iter=10000, method="auto", eps_scaling=None):
    r"""Entropic OT. a (..., n), b (..., m) non-negative weights summing to 1, C (..., n, m); batched if C is 3-D.
    method: "scaling" (the lecture's u, v loop), "log" (potentials), "auto" (scaling while exp(-C/eps) is safe,
    else log). eps_scaling (default: on in the log domain when C/eps spans > 50) first solves eps_k = max(C)/2^k.
    Stops when the L1 marginal error < tol, or after max_iter iterations, and then warns and sets converged False.
    Returns a dict: plan P, potentials f, g, cost <P, C>, objective <P, C> + eps KL(P | ab^T), iterations,
    err (final marginal error), converged, method, history (error per iteration)."""
    check_problem(a, b, C, eps)
    common.check(method in ("auto", "scaling", "log"), f"method must be auto, scaling or log, got {method!r}")
    if C.dim() == 2 and not bool((a > 0).all() and (b > 0).all()):
        return _on_support(a, b, C, eps, tol, max_iter, method, eps_scaling)
    common.check(bool((a > 0).all() and (b > 0).all()), "zero weights are supported for a single problem (2-D C) "
                 "only; drop the zero-weight points from the batch")
    single, auto = C.dim() == 2, method == "auto"
    a, b, C = (a[None], b[None], C[None]) if single else (a, b, C)
    span = float(C.amax() - C.amin()) / eps
    row_min = C.amin(-1)                                                # the plan is unchanged by C_ij - r_i - c_j
    col_min = (C - row_min[..., :, None]).amin(-2)
    C_red = C - row_min[..., :, None] - col_min[..., None, :]            # >= 0, a zero in every row and column
    if method == "auto":  # exp(-C_red/eps) keeps >= half of the exponent range free for u and v
        method = "scaling" if float(C_red.amax()) / eps < -0.5 * math.log(torch.finfo(C.dtype).tiny) else "log"
    hist, iters = [], 0
    if method == "scaling":
        if auto:                                                        # scaling on C_red, potentials shifted back
            f, g, iters, err = _scaling_loop(a, b, C_red, eps, tol, max_iter, hist)
            f = f + row_min
            g = g + col_min
        else:                                                           # the lecture's loop on C, as asked
            f, g, iters, err = _scaling_loop(a, b, C, eps, tol, max_iter, hist)
        if auto and not math.isfinite(err):                             # u or v overflowed: redo in the log domain
            method, hist = "log", []
    if method == "log":
        f, g = torch.zeros_like(a), torch.zeros_like(b)
        if eps_scaling if eps_scaling is not None else span > 50:
            e = float(C.amax())
            while e > 2 * eps:                                          # warm starts, loose tolerance
                f, g, it, _ = _log_loop(a, b, C, e, max(tol, 1e-3), max_iter, f, g, [])
                iters, e = iters + it, e / 2
        f, g, it, err = _log_loop(a, b, C, eps, tol, max_iter, f, g, hist)
        iters += it
    P = a[..., :, None] * b[..., None, :] * torch.exp((f[..., :, None] + g[..., None, :] - C) / eps)
    converged = math.isfinite(err) and err < tol
    if not converged:
        hint = ", or use method='log'" if method == "scaling" else ""
        warnings.warn(f"sinkhorn ({method}) did not converge: marginal error {err:.3g} > tol {tol:g} after "
                      f"{iters} iterations; raise max_iter or eps{hint}")
    out = dict(plan=P, f=f, g=g, cost=(P * C).sum((-2, -1)),
               objective=(P * (f[..., :, None] + g[..., None, :])).sum((-2, -1)))  # = <P,C> + eps KL(P | ab^T)
    out = {k: v[0] if single else v for k, v in out.items()}
    return dict(out, iterations=iters, err=err, converged=converged, method=method, history=hist)

def _on_support(a, b, C, eps, tol, max_iter, method, eps_scaling):
    """Zero weights (a legal histogram): solve on the support, plan 0 elsewhere; the potentials off the support
    are the c-transforms f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps) (and likewise g_j), finite everywhere."""
    i, j = a > 0, b > 0
    out = sinkhorn(a[i], b[j], C[i][:, j], eps, tol, max_iter, method, eps_scaling)
    P = torch.zeros_like(C)
    P[i[:, None] & j[None, :]] = out["plan"].reshape(-1)
    f = -eps * torch.logsumexp((out["g"][None, :] - C[:, j]) / eps + torch.log(b[j])[None, :], 1)
    g = -eps * torch.logsumexp((out["f"][:, None] - C[i]) / eps + torch.log(a[i])[:, None], 0)
    return dict(out, plan=P, f=f, g=g)

def sq_dist(x, y):  # C_ij = |x_i - y_j|^2 written out (no sqrt), so its gradient is exact everywhere
    return (x[..., :, None, :] - y[..., None, :, :]).pow(2).sum(-1)

def ot_eps(x, y, eps, **kw):
    r"""OT_eps between uniform clouds x (n, d), y (m, d), cost |x - y|^2, differentiable in x and y (000, "Sinkhorn
    Algorithm": min_P <P, C> + eps KL(P | a b^T)).
    Envelope theorem: at the optimal plan P, dOT_eps/dC = P, so the gradient is sum_ij P_ij dC_ij; P is
    computed without autograd and <P, C> carries the gradient (value: the entropic objective)."""
    C = sq_dist(x, y)
    a = torch.full(C.shape[:-1], 1 / C.shape[-2], dtype=C.dtype, device=C.device)
    b = torch.full(C.shape[:-2] + C.shape[-1:], 1 / C.shape[-1], dtype=C.dtype, device=C.device)
    with torch.no_grad():
        out = sinkhorn(a, b, C.detach(), eps, **kw)
    pc = (out["plan"] * C).sum((-2, -1))
    return pc + (out["objective"] - pc).detach()

def sinkhorn_divergence(x, y, eps, **kw):
    r"""Debiased S_eps(alpha, beta) = OT_eps(alpha, beta) - 1/2 OT_eps(alpha, alpha) - 1/2 OT_eps(beta, beta):
    >= 0, = 0 iff the clouds are equal (Feydy et al. 2019), differentiable in the point positions."""
    return ot_eps(x, y, eps, **kw) - 0.5 * ot_eps(x, x, eps, **kw) - 0.5 * ot_eps(y, y, eps, **kw)

def barycentric_map(x, y, b, g, eps):
    r"""T(x) = sum_j y_j softmax_j(log b_j + (g_j - |x - y_j|^2)/eps): where the entropic plan sends x on average,
    for any x; on the source samples x_i it is sum_j P_ij y_j / a_i (000, "Sinkhorn Algorithm": P_ij = a_i b_j
    exp((f_i + g_j - C_ij)/eps), whose f_i makes row i sum to a_i)."""
    logits = torch.log(b) + (g - torch.cdist(x, y) ** 2) / eps           # (N, m)
    return torch.softmax(logits, 1) @ y

# ----------------------------------------------------------------------------- 1-D and sliced OT
def displacement_interpolation(x, y, sigma, s):
    """McCann's interpolation at time s in [0, 1] between two uniform clouds (000 section 2, "Interpolation between
    distributions"): each x_i moves on a straight line to its partner y_sigma(i) under an optimal assignment sigma,
    (1 - s) x_i + s y_sigma(i); with the squared cost it is a W_2 geodesic: W_2(mu_0, mu_s) = s W_2(mu_0, mu_1)."""
    return (1 - s) * x + s * y[sigma]

def w1d(x, y, p=1):
    r"""W_p between equal-size uniform 1-D samples by sorting (004, "Special case: 1D distribution"): the optimal
    plan is the monotone rearrangement, W_p^p = mean_i |x_(i) - y_(i)|^p. Columns of (n, d) inputs separately."""
    common.check(x.shape == y.shape, f"w1d needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (torch.sort(x, 0)[0] - torch.sort(y, 0)[0]).abs().pow(p).mean(0).pow(1 / p)

def sliced_wasserstein(x, y, n_proj=200, p=1, gen=None):
    r"""SW_p = (E_theta W_p^p(P_theta#mu, P_theta#nu))^{1/p}, theta uniform on the sphere (000, "Sliced
    Wasserstein"; p = 1 is the lecture's E_theta W_1), with n_proj random directions."""
    theta = torch.nn.functional.normalize(torch.randn(x.shape[1], n_proj, generator=gen, dtype=x.dtype), dim=0)
    return w1d(x @ theta, y @ theta, p).pow(p).mean().pow(1 / p)

# ----------------------------------------------------------------------------- demos
def parse_eps(text):
    """'3,1,0.3' -> [3.0, 1.0, 0.3], or a clear error."""
    try:
        values = [float(e) for e in text.split(",")]
    except ValueError:
        values = []
    common.check(values and all(v > 0 for v in values), f"--eps must be comma-separated positive numbers, got {text!r}")
    return values

def demo_plan(cfg, out):
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.batch_size
    x = (common.sample_2d("gaussian", n, gen) - torch.tensor([2.0, 0])).double()
    y = common.sample_2d(cfg.data, n, gen).double()
    C = torch.cdist(x, y) ** 2
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    t0 = time.time()
    sigma = metrics.assignment(C)                                        # the exact plan: a permutation
    exact = float(C[torch.arange(n), sigma].mean())                      # W_2^2, exact (ground truth)
    t_exact = time.time() - t0
    epsilons = parse_eps(cfg.eps)
    runs = {}
    for e in epsilons:
        t0 = time.time()
        runs[e] = sinkhorn(w, w, C, e, tol=cfg.tol, max_iter=cfg.steps)
        runs[e]["seconds"] = time.time() - t0
        print(f"eps {e:g}: cost {float(runs[e]['cost']):.5f} (exact {exact:.5f}), {runs[e]['iterations']} iterations, "
              f"{runs[e]['method']}, {runs[e]['seconds']:.3f}s")
    small = runs[min(epsilons)]
    bary = n * small["plan"] @ y                                         # barycentric map T(x_i) = sum_j P_ij y_j / a_i
    P = small["plan"]
    fig = Figure(figsize=(11, 5))
    ax, ax2 = fig.subplots(1, 2)
    for i, j in (P > 0.2 / n).nonzero().tolist():
        ax.plot([x[i, 0], y[j, 0]], [x[i, 1], y[j, 1]], c="0.6", lw=0.5, alpha=min(1.0, float(P[i, j]) * n))
    ax.scatter(*x.T, s=6, label="source N((-2,0), I)")
    ax.scatter(*y.T, s=6, label=f"target {cfg.data}")
    ax.set(aspect="equal", title=f"entropic plan, eps = {min(epsilons):g}")
    ax.legend()
    ax2.semilogx(epsilons, [float(runs[e]["cost"]) for e in epsilons], "o-", label="<P_eps, C>")
    ax2.axhline(exact, c="k", ls="--", label="exact W_2^2 (auction)")
    ax2.set(xlabel="eps", title="entropic cost -> exact cost as eps -> 0")
    ax2.legend()
    fig.savefig(os.path.join(out, "samples.png"), dpi=100, bbox_inches="tight")
    common.save_losses({f"eps {e:g}": r["history"] for e, r in runs.items()}, os.path.join(out, "loss.png"), logy=True)
    torch.save(bary.float(), os.path.join(out, "samples.pt"))
    if cfg.gif:                                                          # the source (s = 0) to the target (s = 1)
        frames = [common.points_frame(displacement_interpolation(x, y, sigma, k / 40), y) for k in range(41)]
        common.save_gif(frames, os.path.join(out, "interpolation.gif"))
    keys = ("cost", "objective", "iterations", "err", "seconds", "converged", "method")
    as_json = lambda r: {k: r[k] if k in ("converged", "method") else float(r[k]) for k in keys}
    entropic = {f"{e:g}": as_json(r) for e, r in runs.items()}
    return {"exact_cost": exact, "exact_seconds": t_exact, "entropic": entropic,
            "relative_gap_smallest_eps": float(small["cost"]) / exact - 1}

def demo_color(cfg, out):
    r"""Colour transfer: OT between n sampled source and target pixel colours (cost |x - y|^2 in RGB [0,1]^3,
    eps = the smallest --eps), then every pixel x moves to the entropic barycentric map T(x)."""
    data = os.path.join(matplotlib.get_data_path(), "sample_data")
    src, xs = common.read_rgb(os.path.join(data, "grace_hopper.jpg"), dtype=torch.float64)   # (H, W, 3), (N, 3)
    tgt, ys = common.read_rgb(cfg.target or os.path.join(data, "Minduka_Present_Blue_Pack.png"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.pixels
    eps = min(parse_eps(cfg.eps))
    x = xs[torch.randperm(len(xs), generator=gen)[:n]]                    # n source colours
    y = ys[torch.randperm(len(ys), generator=gen)[:n]]                    # n opaque target colours
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    res = sinkhorn(w, w, torch.cdist(x, y) ** 2, eps, tol=cfg.tol, max_iter=cfg.steps)
    mapped = torch.cat([barycentric_map(c, y, w, res["g"], eps) for c in xs.split(65536)])   # every pixel
    result = mapped.reshape(src.shape).clamp(0, 1)
    fig = Figure(figsize=(12, 4))
    titles = ("source", "target palette", "result")
    for ax, im, title in zip(fig.subplots(1, 3), (src, tgt.clamp(0, 1), result), titles):
        ax.imshow(im.numpy())
        ax.set_title(title)
        ax.axis("off")
    fig.savefig(os.path.join(out, "color.png"), dpi=100, bbox_inches="tight")
    matplotlib.image.imsave(os.path.join(out, "samples.png"), result.numpy())
    torch.save(result.float(), os.path.join(out, "samples.pt"))
    return {"eps": eps, "pixels": n, "cost": float(res["cost"]), "iterations": res["iterations"],
            "mean_rgb_source": xs.mean(0).tolist(), "mean_rgb_target": ys.mean(0).tolist(),
            "mean_rgb_result": result.reshape(-1, 3).mean(0).tolist()}

def main(argv=None):
    cfg = common.parse_config(Config, argv, "sinkhorn", __doc__)
    common.check(cfg.pixels > 1 and parse_eps(cfg.eps), f"--pixels must be at least 2, got {cfg.pixels}")
    common.check(not cfg.gif or cfg.demo == "plan", "--gif films the plan demo's interpolation: drop --demo color")
    common.seed_all(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    scores = {"plan": demo_plan, "color": demo_color}[cfg.demo](cfg, cfg.out)
    return common.finish(cfg, dict(scores, demo=cfg.demo), t0, "cpu")

if __name__ == "__main__":
    common.run(main)
