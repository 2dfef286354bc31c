"""Checks that need a CUDA GPU: each skips where torch sees none (CI has none). On a GPU machine:
`pytest tests/test_gpu.py`. Every script trains on cuda, writes CPU tensors, reloads, and resumes to the same
samples (to 1e-3); ddpm's --bf16 and --compile run on the GPU they were written for."""
import math

import pytest
import torch

import common, ddpm
from test_ddpm import training_dtypes
from test_resume import TINY, cheap_w_exact, numbers, run, sigint_at  # noqa: F401 (fixtures used by name)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = ["--device", "cuda"]


@pytest.mark.parametrize("script", list(TINY), ids=lambda s: s.__name__)
def test_trains_on_cuda_saves_cpu_tensors_and_resumes(script, tmp_path, sigint_at, monkeypatch):
    """A run on cuda: finite metrics that say cuda, samples.pt that loads on a machine without a GPU, --sample-only
    reloads the checkpoint, and a Ctrl-C at step k then --resume to N gives the samples of one run to N. Not bit
    for bit: GPU kernels need not be reproducible, and a metric of 20 samples (fd) magnifies their rounding, so the
    samples are compared, to 1e-3, and not the metrics computed from them."""
    flags, n, k = TINY[script]
    rec = run(script, flags + CUDA, tmp_path / "full", n)
    assert rec["device"] == "cuda"
    assert all(math.isfinite(v) for v in numbers(rec).values() if isinstance(v, float))
    straight = _tensors(torch.load(tmp_path / "full" / "samples.pt"))
    assert straight and all(t.device.type == "cpu" for t in straight)                 # loads anywhere
    again = script.main(flags + CUDA + ["--sample-only", "--out", str(tmp_path / "full")])
    assert again["device"] == "cuda"
    sigint_at(k)
    with pytest.raises(common.Interrupted):
        run(script, flags + CUDA, tmp_path / "split", n)
    monkeypatch.undo()
    run(script, flags + CUDA, tmp_path / "split", n, "--resume")
    resumed = _tensors(torch.load(tmp_path / "split" / "samples.pt"))
    assert len(resumed) == len(straight)
    for a, b in zip(resumed, straight):
        assert torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-4)


def _tensors(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_ddpm_bf16_trains_in_bfloat16_on_cuda(tmp_path, monkeypatch):
    """--bf16 on cuda: the U-Net's training passes really run in bfloat16, and the run ends with finite numbers."""
    dtypes = training_dtypes(monkeypatch)
    rec = ddpm.main(CUDA + ["--bf16", "--width", "16", "--batch-size", "32", "--n-samples", "50",
                            "--sample-steps", "10", "--steps", "20", "--out", str(tmp_path)])
    assert dtypes == {torch.bfloat16} and math.isfinite(rec["fd"])


def test_ddpm_compile_matches_eager_on_cuda(tmp_path):
    """--compile on cuda (Triton kernels): the same training run as the eager model, to float tolerance."""
    args = CUDA + ["--width", "16", "--T", "50", "--batch-size", "16", "--n-samples", "20", "--sample-steps", "5",
                   "--steps", "5"]
    ddpm.main(args + ["--out", str(tmp_path / "eager")])
    ddpm.main(args + ["--compile", "--out", str(tmp_path / "compiled")])
    h_e = torch.load(tmp_path / "eager" / "checkpoint.pt")["history"]["loss"]
    h_c = torch.load(tmp_path / "compiled" / "checkpoint.pt")["history"]["loss"]
    assert h_c == pytest.approx(h_e, rel=1e-3)


@pytest.mark.parametrize("name", ["ddpm", "flow_matching", "stylegan_lite", "vqvae"])
def test_colour_digits_train_on_cuda(name, tmp_path):
    """The colour path on the GPU: 3x32x32 images through a few steps, CPU samples of that shape."""
    import importlib
    from test_image_data import SCRIPTS
    rec = importlib.import_module(name).main(SCRIPTS[name] + CUDA + ["--data", "color-digits", "--out", str(tmp_path)])
    assert rec["device"] == "cuda" and math.isfinite(rec["fd"])
    x = torch.load(tmp_path / "samples.pt")
    assert x.device.type == "cpu" and x.shape[1:] == (3, 32, 32)
