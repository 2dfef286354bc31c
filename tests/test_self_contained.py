"""Each script stands alone beside common.py and metrics.py: no script imports another, and a copy of one script
with those two in an empty folder runs (--help and a tiny main([...])) with nothing else importable. The shipped
evaluator weights (evaluators/) are copied too: they are data, and without them the first image run trains its own
evaluator (that path: test_metrics' cached_classifier tests)."""
import ast, json, os, shutil, subprocess, sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["vae", "autoencoders", "vqvae", "gan", "wgan", "cgan", "cyclegan", "stylegan_lite", "ddpm", "flow_matching",
           "score_matching", "divergences", "sinkhorn", "mgn"]
ALLOWED = {"common", "metrics", "torch", "numpy", "matplotlib"}
TINY = {  # a run of a few seconds that goes through training, sampling and every output
    "vae": ["--steps", "3", "--n-samples", "50", "--n-eval", "20", "--iw-k", "2"],
    "autoencoders": ["--steps", "3", "--n-eval", "20", "--kind", "sae"],
    "vqvae": ["--steps", "3", "--prior-steps", "1", "--n-samples", "20", "--n-eval", "20"],
    "gan": ["--steps", "3", "--n-samples", "100", "--width", "16"],
    "wgan": ["--steps", "3", "--n-samples", "100", "--width", "16", "--exact-every", "0"],
    "cgan": ["--steps", "2", "--n-samples", "20"],
    "cyclegan": ["--steps", "2", "--n-eval", "20", "--batch-size", "2", "--width", "4", "--ndf", "4"],
    "stylegan_lite": ["--steps", "2", "--n-samples", "20", "--batch-size", "4", "--width", "8"],
    "ddpm": ["--steps", "2", "--n-samples", "10", "--T", "20", "--sample-steps", "5", "--width", "8"],
    "flow_matching": ["--data", "digits", "--steps", "2", "--n-samples", "20", "--width", "8", "--sample-steps", "2"],
    "score_matching": ["--steps", "2", "--n-samples", "100", "--width", "16"],
    "divergences": ["--steps", "5"],
    "sinkhorn": ["--batch-size", "20", "--eps", "1,0.3"],
    "mgn": ["--task", "gradient", "--steps", "2", "--n-eval", "200", "--batch-size", "64"],
}
# One python process visits the ten folders in turn (one torch import, one rendering of the digits). Before each
# script, every script module is dropped from sys.modules and sys.path holds only that script's folder, so an
# `import gan` hidden in cgan.py would fail there exactly as in a student's empty folder.
DRIVER = r"""
import contextlib, importlib, io, json, os, sys
scripts, tiny = json.loads(sys.argv[1]), json.loads(sys.argv[2])
site = [p for p in sys.path if p]                  # the standard library and site-packages; '' (cwd) dropped
report = {}
for name in scripts:
    folder = os.path.join(os.getcwd(), name)
    os.chdir(folder)
    sys.path[:] = [folder] + site
    for other in scripts:
        sys.modules.pop(other, None)
    module = importlib.import_module(name)
    assert module.__file__ == os.path.join(folder, name + ".py"), module.__file__
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text):
        try:
            module.main(["--help"])
        except SystemExit as e:
            assert e.code == 0
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(tiny[name] + ["--out", "out"])
    report[name] = {"help": help_text.getvalue(), "outputs": sorted(os.listdir("out"))}
    os.chdir("..")
print(json.dumps(report))
"""


def imported_modules(path):
    mods = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_another(script):
    mods = imported_modules(os.path.join(ROOT, script + ".py"))
    assert not mods & (set(SCRIPTS) - {script}), f"{script}.py imports {sorted(mods & set(SCRIPTS))}"
    assert mods <= ALLOWED | set(sys.stdlib_module_names), sorted(mods - ALLOWED - set(sys.stdlib_module_names))


def test_common_and_metrics_import_no_script_and_common_no_metrics():
    assert not imported_modules(os.path.join(ROOT, "common.py")) & (set(SCRIPTS) | {"metrics"})
    assert imported_modules(os.path.join(ROOT, "metrics.py")) & (set(SCRIPTS) | {"common"}) == {"common"}


def test_each_script_copied_alone_beside_common_runs(tmp_path):
    for name in SCRIPTS:
        os.makedirs(tmp_path / name)
        shutil.copy(os.path.join(ROOT, name + ".py"), tmp_path / name)
        shutil.copy(os.path.join(ROOT, "common.py"), tmp_path / name)
        shutil.copy(os.path.join(ROOT, "metrics.py"), tmp_path / name)
        shutil.copytree(os.path.join(ROOT, "evaluators"), tmp_path / name / "evaluators")   # data, not code
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(SCRIPTS), json.dumps(TINY)], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=""), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name in SCRIPTS:
        assert "--steps" in report[name]["help"] and "--seed" in report[name]["help"], name
        assert {"samples.png", "samples.pt", "metrics.json"} <= set(report[name]["outputs"]), (name, report[name])
