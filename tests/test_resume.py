"""--resume and Ctrl-C: a run that is stopped and continued gives bit-identical samples.pt and metrics on the CPU.
The equality is the test that nothing was left out of the checkpoint (a forgotten optimizer, generator or pool
changes the numbers). Ctrl-C is a real SIGINT sent to this process at step k (in-process, so it is cheap) and to
a subprocess (the one-line message, the exit status, and a resume to the end)."""
import math, os, signal, subprocess, sys

import pytest
import torch

import autoencoders, cgan, common, cyclegan, ddpm, flow_matching, gan, metrics, mgn, score_matching, stylegan_lite
import vae, vqvae, wgan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {  # script: (tiny flags, N, k)
    vae: (["--latent-dim", "2", "--width", "32", "--n-eval", "50", "--iw-k", "2", "--n-samples", "100"], 6, 3),
    autoencoders: (["--kind", "dae", "--latent-dim", "2", "--width", "32", "--n-eval", "50"], 6, 3),
    vqvae: (["--prior-steps", "3", "--batch-size", "8", "--n-samples", "20", "--n-eval", "50"], 6, 5),   # k: prior
    gan: (["--width", "16", "--batch-size", "32", "--n-samples", "300"], 6, 3),
    wgan: (["--width", "16", "--batch-size", "32", "--n-samples", "300", "--exact-every", "4"], 6, 3),
    cgan: (["--batch-size", "8", "--n-samples", "20"], 6, 4),
    cyclegan: (["--batch-size", "2", "--width", "4", "--ndf", "4", "--n-res", "1", "--n-eval", "20", "--pool", "3",
                "--image-size", "16"], 6, 4),
    stylegan_lite: (["--width", "4", "--batch-size", "4", "--n-samples", "20", "--r1-every", "2"], 6, 3),
    ddpm: (["--width", "8", "--T", "20", "--batch-size", "8", "--n-samples", "10", "--sample-steps", "5"], 6, 3),
    flow_matching: (["--width", "16", "--batch-size", "32", "--n-samples", "100", "--coupling", "ot"], 6, 3),
    score_matching: (["--width", "16", "--batch-size", "32", "--n-samples", "100"], 6, 3),
    mgn: (["--task", "ot-banana", "--batch-size", "64", "--n-eval", "200"], 6, 3),
}
SCHEDULE_FREE = (vae, autoencoders, gan, stylegan_lite, ddpm)    # nothing planned over --steps (vqvae: its phases)
NOT_COMPARED = ("seconds", "train_seconds", "sampling_seconds", "config")
SCHEDULE = {  # the learning-rate factor at step s of n that each docstring states (others: constant)
    wgan: lambda s, n: 1 - s / n,
    cgan: lambda s, n: min(1.0, 2 * (1 - s / n)),
    cyclegan: lambda s, n: min(1.0, 2 * (1 - s / n)),
    flow_matching: lambda s, n: 1 - s / n,
    score_matching: lambda s, n: 1 - s / n,
    mgn: lambda s, n: 0.5 * (1 + math.cos(math.pi * s / n)),
}


@pytest.fixture(autouse=True)
def cheap_w_exact():
    """wgan's exact W_1 (an auction on 500 points: seconds a call) replaced by a cheap deterministic stand-in; these
    tests compare two runs with each other, not with the truth. Its own MonkeyPatch, so that the tests'
    monkeypatch.undo() (which ends the Ctrl-C) leaves it in place."""
    patch = pytest.MonkeyPatch()
    patch.setattr(metrics, "w_exact", lambda x, y, p=2: float(torch.cdist(x.double(), y.double()).mean()))
    yield
    patch.undo()


def numbers(record):
    return {k: v for k, v in record.items() if k not in NOT_COMPARED}


def same(a, b):
    """Recursive equality of two saved states: tensors bit for bit, containers item by item."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def same_final_checkpoints(dir_a, dir_b):
    """Everything the two runs saved at their last step (weights, optimizers, schedulers, RNG states, history),
    except the config, which records --resume."""
    a, b = (torch.load(d / "checkpoint.pt") for d in (dir_a, dir_b))
    return same({k: v for k, v in a.items() if k != "config"}, {k: v for k, v in b.items() if k != "config"})


def run(script, flags, out, steps, *extra):
    return script.main(flags + ["--steps", str(steps), "--out", str(out)] + list(extra))


@pytest.fixture
def sigint_at(monkeypatch):
    """sigint_at(k): a real SIGINT reaches this process when the training loop reports step k."""
    def arm(k):
        report = common.Progress.__call__

        def reporting(self, step, loss):
            report(self, step, loss)
            if step == k:
                os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(common.Progress, "__call__", reporting)
    return arm


MODES = [pytest.param(script, TINY[script][0], id=script.__name__) for script in TINY] + [   # and the modes with
    pytest.param(cyclegan, TINY[cyclegan][0] + ["--paired"], id="cyclegan-paired"),      # their own loop or state
    pytest.param(flow_matching, ["--data", "digits", "--width", "8", "--batch-size", "8", "--n-samples", "20",
                                 "--sample-steps", "2", "--cond"], id="flow_matching-digits-cond"),
]


@pytest.mark.parametrize("script, flags", MODES)
def test_interrupted_and_resumed_run_equals_the_straight_run(script, flags, tmp_path, sigint_at, monkeypatch):
    _, N, k = TINY[script]
    straight = run(script, flags, tmp_path / "a", N)
    sigint_at(k)
    with pytest.raises(common.Interrupted, match=rf"interrupted at step {k}/{N}; continue with: python "
                                                 rf"{script.__name__}\.py .*--resume$"):
        run(script, flags, tmp_path / "b", N)
    monkeypatch.undo()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt")
    assert saved["step"] == k
    group = saved["opt" if "opt" in saved else "opt_g"]["param_groups"][0]       # the learning rate at step k
    factor = SCHEDULE[script](k, N) if script in SCHEDULE else 1.0
    assert group["lr"] == pytest.approx(group.get("initial_lr", saved["config"]["lr"]) * factor, rel=1e-12)
    resumed = run(script, flags, tmp_path / "b", N, "--resume")
    assert numbers(resumed) == numbers(straight)
    assert torch.equal(torch.load(tmp_path / "a" / "samples.pt"), torch.load(tmp_path / "b" / "samples.pt"))
    assert same_final_checkpoints(tmp_path / "a", tmp_path / "b")
    again = script.main(flags + ["--sample-only", "--out", str(tmp_path / "a")])        # the training run's samples
    assert torch.equal(torch.load(tmp_path / "a" / "samples.pt"), torch.load(tmp_path / "b" / "samples.pt"))
    assert numbers(again) == dict(numbers(straight), steps=0)


@pytest.mark.parametrize("script", [pytest.param(m, marks=[] if m is ddpm else pytest.mark.slow)   # the others: slow
                                    for m in SCHEDULE_FREE], ids=lambda m: m.__name__)
def test_short_run_continued_to_more_steps_equals_the_straight_run(script, tmp_path):
    flags, N, k = TINY[script]
    straight = run(script, flags, tmp_path / "a", N)
    run(script, flags, tmp_path / "b", k)
    resumed = run(script, flags, tmp_path / "b", N, "--resume")
    assert numbers(resumed) == numbers(straight)
    assert torch.equal(torch.load(tmp_path / "a" / "samples.pt"), torch.load(tmp_path / "b" / "samples.pt"))
    assert same_final_checkpoints(tmp_path / "a", tmp_path / "b")
    history = torch.load(tmp_path / "b" / "checkpoint.pt")["history"]
    assert all(len(values) == N for values in history.values())          # loss.png covers the whole run


def test_resume_safety_lines(tmp_path, capsys):
    flags, N, k = TINY[gan]
    with pytest.raises(common.UserError, match="--resume: no checkpoint at .*start the run without --resume"):
        run(gan, flags, tmp_path, N, "--resume")
    run(gan, flags, tmp_path, k)
    with pytest.raises(common.UserError, match=r"--width 64 contradicts the checkpoint .* trained with --width 16"):
        gan.main(["--width", "64", "--steps", str(N), "--out", str(tmp_path), "--resume"])
    with pytest.raises(common.UserError, match=r"--lr 0.001 contradicts the checkpoint"):
        gan.main(["--lr", "1e-3", "--steps", str(N), "--out", str(tmp_path), "--resume"])
    with pytest.raises(common.UserError, match=rf"already has {k} steps: continue it with a larger --steps"):
        gan.main(["--out", str(tmp_path), "--resume"])                   # --steps defaults to the saved run's
    with pytest.raises(common.UserError, match="not written by wgan.py"):
        wgan.main(["--out", str(tmp_path), "--resume"])
    with pytest.raises(common.UserError, match="give one of them"):
        gan.main(["--out", str(tmp_path), "--resume", "--sample-only"])
    capsys.readouterr()
    run(gan, flags, tmp_path, k)
    assert f"note: this new run replaces the checkpoint in {tmp_path}" in capsys.readouterr().out
    (tmp_path / "checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(common.UserError, match="is not a readable checkpoint"):
        gan.main(["--out", str(tmp_path), "--resume", "--steps", str(N)])


def test_rng_states_round_trip():
    gen = torch.Generator().manual_seed(3)
    saved = common.rng_states(gen)
    first = (torch.rand(3), torch.rand(3, generator=gen), common.np.random.rand(), common.random.random())
    common.set_rng_states(saved, gen)
    second = (torch.rand(3), torch.rand(3, generator=gen), common.np.random.rand(), common.random.random())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2:] == second[2:]


def test_ctrl_c_in_a_subprocess_saves_and_resumes(tmp_path):
    """A real Ctrl-C: one line naming the step and the command to continue, exit status 130, no traceback."""
    flags = ["--width", "16", "--batch-size", "32", "--n-samples", "300", "--steps", "2000", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "gan.py"] + flags, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("step ")                    # training has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    line = err.strip()
    assert line.startswith("interrupted at step ") and line.endswith(" --resume") and "\n" not in line
    step = int(line.split("interrupted at step ")[1].split("/")[0])
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == step
    command = line.split("continue with: ")[1].split()
    assert command[:2] == ["python", "gan.py"]
    done = subprocess.run([sys.executable] + command[1:] + ["--steps", str(step + 5)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == step + 5
