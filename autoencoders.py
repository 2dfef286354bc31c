r"""autoencoders.py - the autoencoder family of 004: one architecture, four losses (--kind ae|dae|sae|cae).

Lecture: 004 "Autoencoder" to "Contracting autoencoders" (eq. 13-14); 000 section 7. The probabilistic members
have their own files: vae.py (002 VAE) and vqvae.py (002 VQ-VAE).
Run: `python autoencoders.py` (--kind ae), `--kind dae`, `--kind sae`, `--kind cae`, and
`python autoencoders.py --linear` (a linear AE: the PCA comparison).

    autoencoder    h_{theta_e}: x -> z, g_{theta_d}: z -> x; min E L(x, g(h(x))), L = |x - g(h(x))|^2  (004 eq. 13-14)
    denoising      L(x, g(h(x~))), x~ a corrupted copy of x: x + noise N(0, I), or pixels zeroed (mask)   (004)
    sparse         L(x, g(h(x))) + Omega(z), Omega(z) = lambda |z|_1, z = h(x)                          (004)
    contractive    L(x, g(h(x))) + lambda sum_i |grad_x h(x)_i|^2                                     (004)
    PCA            a linear AE with the squared error spans the top-J principal subspace of the data: --linear
                   reports the largest principal angle between the decoder's columns and that subspace
Networks: MLPs D -> width -> width -> J and back, ReLU, a sigmoid on the output (pixels in [0, 1]); cae's
encoder is one layer h(x) = sigmoid(W x + b), so its Jacobian has a closed form; sae has a ReLU on the code, so
code units can be exactly 0. These models do not sample: samples.png/.pt hold the test reconstructions.
test_mse: |x - x_hat|^2 per image (summed over pixels); test_mse_noisy: the same from the corrupted input x~.
Beyond the slides: the contractive norm is squared (Rifai et al. 2011; the slide's unsquared norm is not smooth
at 0).
"""
import dataclasses, math, os, time

import torch
import torch.nn as nn
from matplotlib.figure import Figure

import common


@dataclasses.dataclass
class Config(common.Config):
    data: str = common.arg("digits", "dataset", common.IMAGE_DATA)
    steps: int = common.arg(5000, "training steps")
    lr: float = common.arg(1e-3, "Adam learning rate (--linear: 3e-3 unless given)")
    batch_size: int = common.arg(128, "images per training step (--linear: 1024 unless given)")
    kind: str = common.arg("ae", "which loss: ae, dae (denoising), sae (sparse), cae (contractive)",
                           ["ae", "dae", "sae", "cae"])
    latent_dim: int = common.arg(20, "J, the dimension of the code z (2 also draws latent_scatter.png)")
    width: int = common.arg(512, "hidden units per MLP layer")
    linear: bool = common.arg(False, "ae: one linear map each way, no sigmoid (then it spans PCA's subspace)")
    corrupt: str = common.arg("gauss", "dae's corruption, also used for test_mse_noisy", ["gauss", "mask"])
    noise: float = common.arg(0.5, "gauss: std of the added noise; mask: probability that a pixel is zeroed")
    lambda_sparse: float = common.arg(0.05, "sae: lambda, the weight of the L1 penalty |z|_1")
    lambda_contractive: float = common.arg(0.5, "cae: lambda, the weight of the penalty sum_i |grad_x h_i|^2")
    n_eval: int = common.arg(2000, "test images for the metrics")
    image_size: int = common.arg(0, common.IMAGE_SIZE_HELP)
    grey: bool = common.arg(False, "read colour images as grey (one channel)")
    MODEL_FLAGS = ("data", "kind", "latent_dim", "width", "linear", "image_size", "grey")

    def defaults(self, given):
        if self.linear:                                  # the PCA comparison needs an accurate subspace
            self.lr = self.lr if "--lr" in given else 3e-3
            self.batch_size = self.batch_size if "--batch-size" in given else 1024


# ----------------------------------------------------------------------------- model
def mlp(d_in, width, d_out):
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, d_out))


class AE(nn.Module):
    r"""Encoder h_{theta_e}: x -> z and decoder g_{theta_d}: z -> x (004 "Autoencoder"). --linear: one linear map
    each (no sigmoid). cae: h(x) = sigmoid(W x + b), one layer. sae: a ReLU on the code. d: pixels per image."""
    def __init__(self, kind, latent_dim, width, linear=False, d=784):
        super().__init__()
        if linear:
            self.h = nn.Linear(d, latent_dim)
            self.g = nn.Linear(latent_dim, d)
            return
        self.h = mlp(d, width, latent_dim)
        if kind == "cae":
            self.h = nn.Sequential(nn.Linear(d, latent_dim), nn.Sigmoid())
        if kind == "sae":
            self.h.append(nn.ReLU())
        self.g = nn.Sequential(mlp(latent_dim, width, d), nn.Sigmoid())

    def forward(self, x):
        return self.g(self.h(x.flatten(1))).view_as(x)


# ----------------------------------------------------------------------------- the four losses
def squared_error(x, x_hat):
    return (x - x_hat).pow(2).flatten(1).sum(1)                          # L(x, x_hat) = |x - x_hat|^2, per image


def ae_loss(model, x):
    """L(x, g(h(x))) = |x - g(h(x))|^2 per image (004 eq. 14, "Autoencoder")."""
    return squared_error(x, model(x))                                    # L(x, g(h(x)))


def corrupt(x, kind, noise, gen=None):
    """x~, a corrupted copy of x: x + noise * N(0, I) (gauss), or each pixel zeroed with probability noise (mask)
    (004, "Denoising autoencoders")."""
    if kind == "gauss":
        return x + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return x * (torch.rand(x.shape, generator=gen) >= noise).to(x.device)


def dae_loss(model, x, x_tilde):
    """L(x, g(h(x~))): the clean x from the corrupted x~ (004, "Denoising autoencoders")."""
    return squared_error(x, model(x_tilde))                              # L(x, g(h(x~)))


def sae_loss(model, x, lam):
    """L(x, g(h(x))) + Omega(z), Omega(z) = lambda |z|_1, z = h(x) (004, "Sparse autoencoders")."""
    z = model.h(x.flatten(1))                                            # z = h(x), (B, J)
    return squared_error(x, model.g(z).view_as(x)) + lam * z.abs().sum(1)   # L + lambda |z|_1


def contractive_penalty(model, x):
    r"""sum_i |grad_x h(x)_i|^2 = |J_h(x)|_F^2; for h = sigmoid(W x + b), grad_x h_i = h_i (1 - h_i) W_i, so it is
    sum_i (h_i (1 - h_i))^2 |W_i|^2 (closed form, tested against autograd); (B,) (004, "Contracting autoencoders")."""
    z = model.h(x.flatten(1))                                            # (B, J)
    return ((z * (1 - z)) ** 2 * model.h[0].weight.pow(2).sum(1)).sum(1)


def cae_loss(model, x, lam):
    """L(x, g(h(x))) + lambda sum_i |grad_x h(x)_i|^2 (004, "Contracting autoencoders"; the norm squared)."""
    return ae_loss(model, x) + lam * contractive_penalty(model, x)       # L + lambda sum_i |grad h_i|^2


def batch_loss(model, cfg, x):
    """The mean loss of --kind on a batch (dae: a fresh x~ every time)."""
    if cfg.kind == "ae":
        return ae_loss(model, x).mean()
    if cfg.kind == "dae":
        return dae_loss(model, x, corrupt(x, cfg.corrupt, cfg.noise)).mean()
    if cfg.kind == "sae":
        return sae_loss(model, x, cfg.lambda_sparse).mean()
    return cae_loss(model, x, cfg.lambda_contractive).mean()


# ----------------------------------------------------------------------------- PCA, metrics and pictures
@torch.no_grad()
def pca_comparison(model, x_train, x_test):
    r"""(largest principal angle in degrees between the linear decoder's columns and the top-J principal subspace
    of the training data, PCA's test MSE); PCA reconstructs x as m + U U^T (x - m)."""
    X = x_train.flatten(1).double()
    m = X.mean(0)
    J = model.g.weight.shape[1]
    U = torch.linalg.eigh((X - m).T @ (X - m))[1][:, -J:]                # (D, J) top-J eigenvectors
    Q = torch.linalg.qr(model.g.weight.double().cpu())[0]               # (D, J) basis of the decoder's columns
    cos = torch.linalg.svdvals(U.T @ Q).clamp(max=1)                    # cosines of the principal angles
    Xt = x_test.flatten(1).double() - m
    pca_mse = float((Xt - Xt @ U @ U.T).pow(2).sum(1).mean())
    return math.degrees(math.acos(float(cos.min()))), pca_mse


@torch.no_grad()
def evaluate(model, cfg, x_train, x, device):
    """test_mse (clean input), test_mse_noisy (x~ in, x out), sparsity (sae), the PCA comparison (--linear)."""
    x = x.to(device)
    x_tilde = corrupt(x, cfg.corrupt, cfg.noise, torch.Generator().manual_seed(1234))   # the same x~ for every kind
    out = {"test_mse": float(ae_loss(model, x).mean()), "test_mse_noisy": float(dae_loss(model, x, x_tilde).mean())}
    if cfg.kind == "sae":
        out["sparsity"] = float((model.h(x.flatten(1)).abs() < 1e-2).float().mean())   # near-zero code units
    if cfg.linear:
        angle, pca_mse = pca_comparison(model, x_train, x.cpu())
        out.update(pca_angle_deg=angle, pca_mse_ratio=out["test_mse"] / pca_mse)
    return out


@torch.no_grad()
def pictures(model, cfg, x_test, y_test, device):
    """reconstructions.png (inputs, outputs); denoising.png (x~, g(h(x~)), x); latent_scatter.png if J = 2."""
    x = x_test[:10].to(device)
    x_tilde = corrupt(x, cfg.corrupt, cfg.noise, torch.Generator().manual_seed(1234))
    common.save_images(torch.cat([x_tilde.clamp(0, 1), model(x_tilde), x]), os.path.join(cfg.out, "denoising.png"))
    if cfg.latent_dim == 2:
        z = model.h(x_test[:5000].flatten(1).to(device)).cpu()
        fig = Figure(figsize=(6, 6))
        ax = fig.subplots()
        fig.colorbar(ax.scatter(z[:, 0], z[:, 1], c=y_test[:5000], cmap="tab10", s=3), ax=ax)
        ax.set_title("test codes h(x), coloured by label")
        fig.savefig(os.path.join(cfg.out, "latent_scatter.png"), dpi=100, bbox_inches="tight")
    common.save_images(torch.cat([x, model(x)]), os.path.join(cfg.out, "reconstructions.png"))


# ----------------------------------------------------------------------------- training
def train(model, cfg, x_train, device, state=None):
    """Adam on the --kind loss for cfg.steps steps; state: a saved run to continue (--resume)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)                         # data order
    name = f"{cfg.kind} loss (per image)"
    history = {name: []}
    start = 0
    if state:                                                            # --resume: continue the saved run
        history, start = common.resume(state, gen, opt=opt)
    progress = common.Progress(cfg.steps, start)
    with common.Checkpoints(cfg, "autoencoders", every=1000) as save:
        for step in range(start + 1, cfg.steps + 1):

            # a batch, its loss, one Adam step
            x = x_train[torch.randint(len(x_train), (cfg.batch_size,), generator=gen)].to(device)
            loss = batch_loss(model, cfg, x)
            opt.zero_grad()
            loss.backward()
            opt.step()

            # record and checkpoint
            history[name].append(loss.item())
            progress(step, loss.item())
            save(step, lambda: dict(model=model.state_dict(), opt=opt.state_dict(), history=history,
                                    rng=common.rng_states(gen)))
    return history


def main(argv=None):
    cfg = common.parse_config(Config, argv, "autoencoders", __doc__)
    common.check(cfg.latent_dim > 0 and cfg.width > 0 and cfg.n_eval > 0,
                 "--latent-dim, --width and --n-eval must be positive integers")
    common.check(not cfg.linear or cfg.kind == "ae", "--linear is for --kind ae (the PCA equivalence)")
    common.check(cfg.noise >= 0 and cfg.lambda_sparse >= 0 and cfg.lambda_contractive >= 0,
                 "--noise, --lambda-sparse and --lambda-contractive must be >= 0")
    state = common.load_run(cfg, "autoencoders") if cfg.sample_only or cfg.resume else None   # flags from it

    # data and model
    common.seed_all(cfg.seed)
    device = common.get_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    x_train, _ = common.load_data(cfg, "train")
    x_test, y_test = common.load_data(cfg, "test")
    x_eval = x_test[:cfg.n_eval]
    model = AE(cfg.kind, cfg.latent_dim, cfg.width, cfg.linear, x_train[0].numel()).to(device)

    # train, or load the trained model
    t0 = time.time()
    history = {}
    if state:
        model.load_state_dict(state["model"])
    if cfg.sample_only:
        common.restore_rng(cfg, state)
    else:
        history = train(model, cfg, x_train, device, state)
    train_seconds = time.time() - t0

    # metrics, pictures, and the test reconstructions as samples
    model.eval()
    scores = evaluate(model, cfg, x_train, x_eval, device)
    pictures(model, cfg, x_test, y_test, device)
    with torch.no_grad():
        samples = model(x_eval.to(device)).clamp(0, 1).cpu()
    common.save_images(samples[:100], os.path.join(cfg.out, "samples.png"))
    scores["train_seconds"] = round(train_seconds, 2)
    return common.finish(cfg, scores, t0, device, samples=samples, history=history)


if __name__ == "__main__":
    common.run(main)
