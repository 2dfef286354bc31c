r"""exercises.py - any script as an exercise: the lecture's equations blanked, its tests as the grader.

    python exercises.py --list                         every script's exercise functions, with the lecture they cite
    python exercises.py ddpm --out hw1                 hw1/: ddpm.py with those functions blanked, its tests, a README
    python exercises.py ddpm --out hw1 --only q_sample,ddim_step
    python exercises.py --verify ddpm                  blank each function alone: a test of ddpm must fail on it
    python exercises.py --verify                       the same for every script

A blanked function keeps its signature and its docstring (the equation, in the lecture's notation, and where it is
on the slides); its body becomes a `# TODO` that gathers the body's own comments (the equations' names, never code)
and `raise NotImplementedError`. The folder holds the blanked script, common.py and metrics.py (blanked themselves
for `python exercises.py metrics`), the evaluators' weights, the script's test files, a conftest.py and a README for
the student, who grades with `pytest` there: the tests that run the whole script are skipped unless `pytest --runs`.
--verify is a mutation test of the suite, the proof that each exercise can be graded: with the function blanked
alone, a test must fail by its NotImplementedError (not by a collection error) without --runs; with nothing blanked
the folder must pass, without --runs (a student's grade) and with it. This file reads the scripts as text and
imports none of them.
"""
import argparse, ast, io, os, re, shutil, subprocess, sys, tempfile, time, tokenize
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.abspath(__file__))
EXERCISES = {  # script -> the functions that carry a lecture equation ("Class.method" for a method)
    "vae": ["reparametrize", "kl_to_prior", "log_normal", "log_px_given_z", "negative_elbo", "iw_log_likelihood"],
    "autoencoders": ["ae_loss", "corrupt", "dae_loss", "sae_loss", "contractive_penalty", "cae_loss"],
    "vqvae": ["VQVAE.quantize", "vq_loss", "MaskedConv2d.__init__", "sample_codes"],
    "gan": ["d_loss", "g_loss_saturating", "g_loss_nonsaturating", "lsgan_d_loss", "lsgan_g_loss",
            "optimal_discriminator", "gan_value", "jsd"],
    "wgan": ["critic_loss", "generator_loss", "gradient_penalty", "clip_weights"],
    "cgan": ["d_loss", "g_loss", "lsgan_d_loss", "lsgan_g_loss", "discriminator_loss"],
    "cyclegan": ["lsgan_d_loss", "lsgan_g_loss", "adversarial_loss", "cycle_loss", "identity_loss", "pix2pix_d_loss",
                 "pix2pix_g_loss"],
    "stylegan_lite": ["EqLinear.forward", "pixel_norm", "adain", "Generator.styles", "d_loss", "g_loss",
                      "r1_penalty"],
    "ddpm": ["Schedule.__init__", "q_sample", "prediction_target", "diffusion_loss", "eps_from_prediction",
             "guided_eps", "timesteps", "predict_x0", "ancestral_step", "ddim_step"],
    "flow_matching": ["cfm_target", "cfm_loss", "sinkhorn_plan", "corrupt", "velocity", "sample", "divergence",
                      "log_likelihood", "marginal_velocity"],
    "score_matching": ["path_coefficients", "csm_target", "csm_loss", "velocity_from_score", "start", "sample",
                       "log_likelihood", "mixture_score", "langevin", "naive_ascent", "annealed_langevin"],
    "divergences": ["divergence", "fit_gaussian"],
    "sinkhorn": ["_scaling_loop", "_log_loop", "ot_eps", "sinkhorn_divergence", "w1d", "sliced_wasserstein",
                 "barycentric_map", "displacement_interpolation"],
    "mgn": ["gaussian_map", "CMGN.forward", "MMGN.potential", "MMGN.forward", "Transport.forward", "ot_eps",
            "sinkhorn_divergence"],
    "metrics": ["frechet_distance", "inception_score", "class_entropy", "nn_ratio", "class_spread", "mmd",
                "mode_metrics", "w1_sorted", "w_exact"],
}
TESTS = {"metrics": ["test_metrics.py"]}                    # else tests/test_<script>.py
CITE = re.compile(r"\((?=00[0-4]\b|Algorithm \d|[A-Z][a-z]+ (et al\.|& [A-Z]))")   # where a citation opens

CONFTEST = '''"""The grader's set-up: this folder importable, a fresh evaluator cache, the `slow` marker, and the
tests that run the whole script (those that write files) skipped unless `pytest --runs`: they take minutes, and
each exercise has a test of its own that names it."""
import os, sys, tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["GENMODELS_CACHE"] = tempfile.mkdtemp(prefix="genmodels-cache-")


def pytest_addoption(parser):
    parser.addoption("--runs", action="store_true", help="also run the script end to end (slower), after the rest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer checks (run with -m slow)")


def pytest_collection_modifyitems(config, items):
    runs = [item for item in items if "tmp_path" in item.fixturenames]
    if config.getoption("--runs"):
        items[:] = [item for item in items if item not in runs] + runs
        return
    for item in runs:
        item.add_marker(pytest.mark.skip(reason="runs the whole script: `pytest --runs` includes it"))
'''
PYTEST_INI = '''[pytest]
addopts = -m "not slow" -q -p no:cacheprovider
filterwarnings = ignore:`torch.jit.script` is deprecated
'''


# ----------------------------------------------------------------------------- reading the scripts
def find(tree, name):
    """The FunctionDef of `name` or `Class.method` at the top level of a module's tree."""
    cls, _, fn = name.rpartition(".")
    nodes = tree.body
    if cls:
        nodes = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return next(n for n in nodes if isinstance(n, ast.FunctionDef) and n.name == fn)


def body_start(node):
    """The first line (1-based) of a function's body after its docstring."""
    first = node.body[0]
    return first.end_lineno + 1 if ast.get_docstring(node) is not None else first.lineno


def comments(source, start, end):
    """The comments on lines start..end, in order, each once."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and start <= tok.start[0] <= end and tok.string[1:].strip() not in found:
            found.append(tok.string[1:].strip())
    return found


def citation(source, name):
    """The lecture and topic a function cites, from its docstring or comments, else from its class's docstring:
    the first "(002, ...)" of its text, to its matching parenthesis, on one line."""
    tree = ast.parse(source)
    cls = name.rpartition(".")[0]
    nodes = [find(tree, name)] + [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    for node in nodes:
        text = " ".join(" ".join(source.splitlines()[node.lineno - 1:node.end_lineno]).split())
        found = CITE.search(text)
        if found:
            depth, i = 0, found.start()
            while i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    return text[found.start() + 1:i].split(";")[0]
                i += 1
    return ""


def blank(source, names):
    """The source with each named function's body replaced by a TODO and raise NotImplementedError."""
    tree = ast.parse(source)
    lines = source.splitlines()
    for name in sorted(names, key=lambda n: -find(tree, n).lineno):   # bottom up: line numbers stay valid
        node = find(tree, name)
        start = body_start(node)
        indent = " " * node.body[0].col_offset
        hints = comments(source, start, node.end_lineno)
        todo = [f"{indent}# TODO: write {name.split('.')[-1]}, the equation of its docstring"]
        todo += [f"{indent}#   {h}" for h in hints]
        todo += [f'{indent}raise NotImplementedError("{name}: an exercise (see its docstring)")']
        lines[start - 1:node.end_lineno] = todo
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the exercise folder
def make(script, out, only=None):
    """Write the exercise folder of a script; only: the functions to blank (default: all its exercises)."""
    names = only if only is not None else EXERCISES[script]
    unknown = [n for n in names if n not in EXERCISES[script]]
    if unknown:
        sys.exit(f"error: {', '.join(unknown)} are not exercises of {script}.py; `python exercises.py --list`")
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"error: {out} exists and is not empty; give another --out")
    os.makedirs(out, exist_ok=True)
    for module in dict.fromkeys([script, "common", "metrics"]):
        source = open(os.path.join(ROOT, module + ".py")).read()
        open(os.path.join(out, module + ".py"), "w").write(blank(source, names) if module == script else source)
    shutil.copytree(os.path.join(ROOT, "evaluators"), os.path.join(out, "evaluators"))
    tests = TESTS.get(script, [f"test_{script}.py"])
    for test in tests:
        shutil.copy(os.path.join(ROOT, "tests", test), out)
    open(os.path.join(out, "conftest.py"), "w").write(CONFTEST)
    open(os.path.join(out, "pytest.ini"), "w").write(PYTEST_INI)
    source = open(os.path.join(ROOT, script + ".py")).read()
    rows = "\n".join(f"| `{n}` | {citation(source, n) or 'see the docstring'} |" for n in names)
    open(os.path.join(out, "README.md"), "w").write(
        f"# Exercise: `{script}.py`\n\nWrite the body of each function below in `{script}.py`. Its docstring gives "
        f"the equation in the lecture's notation and where it is on the slides (`../shared/lectures/`); the `# TODO` "
        f"lists the names the lecture gives its parts.\n\n| function | lecture |\n|---|---|\n{rows}\n\n"
        f"Grade yourself with `pytest` in this folder: a failing test names the function it calls. The tests use "
        f"values where the usual slips (a flipped sign, two arguments swapped, a missing factor) change the result. "
        f"`pytest --runs` also runs the whole script end to end, a few steps at a time (slower). `python {script}.py "
        f"--help` lists the script's flags; once the tests pass, a real run trains the model.\n")
    return names


# ----------------------------------------------------------------------------- --verify
def grade(folder, runs=False, timeout=900):
    """Run pytest in an exercise folder (runs: with --runs): (return code, the first failing test or None, its
    message, seconds)."""
    t0 = time.time()
    report = os.path.join(folder, "report.xml")
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", f"--junitxml={report}"] + ["--runs"] * runs,
                          cwd=folder, capture_output=True, text=True, timeout=timeout)
    failed, message = None, ""
    if os.path.exists(report):
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failed, message = case.get("name"), (bad.get("message") or "") + (bad.text or "")
                break
    return done.returncode, failed, message, time.time() - t0


def verify(scripts):
    """Each exercise blanked alone must fail a test of its script by NotImplementedError (not a collection error);
    the folder with nothing blanked must pass. Prints a table; returns the number of unpinned functions."""
    unpinned, t_all = 0, time.time()
    for script in scripts:
        with tempfile.TemporaryDirectory() as tmp:
            make(script, os.path.join(tmp, "none"), only=[])
            for runs in (False, True):                                   # a student's grade, then the whole script
                code, failed, _, seconds = grade(os.path.join(tmp, "none"), runs=runs)
                print(f"{script}: untouched folder, pytest{' --runs' * runs}: "
                      f"{'passes' if code == 0 else 'FAILS: ' + str(failed)} ({seconds:.0f} s)", flush=True)
                unpinned += code != 0
            print(f"| function | the test that fails | seconds |\n|---|---|---|")
            for name in EXERCISES[script]:
                folder = os.path.join(tmp, name.replace(".", "_"))
                make(script, folder, only=[name])
                code, failed, message, seconds = grade(folder)
                pinned = code == 1 and failed is not None and "NotImplementedError" in message
                unpinned += not pinned
                print(f"| `{script}.{name}` | {failed if pinned else 'NOT PINNED (exit ' + str(code) + ')'} | "
                      f"{seconds:.1f} |", flush=True)
    print(f"total {time.time() - t_all:.0f} s; {unpinned} not pinned")
    return unpinned


def parse(argv=None):
    """The command line: (parser, args)."""
    p = argparse.ArgumentParser(prog="python exercises.py", description=__doc__.strip().split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("script", nargs="?", choices=sorted(EXERCISES), help="the script to turn into an exercise")
    p.add_argument("--out", default="", help="the exercise folder to write (new or empty)")
    p.add_argument("--only", default="", help="comma-separated functions to blank (default: all the script's)")
    p.add_argument("--list", action="store_true", help="list every script's exercise functions")
    p.add_argument("--verify", action="store_true", help="check that each exercise is graded by a failing test")
    return p, p.parse_args(argv)


def main(argv=None):
    p, args = parse(argv)
    if args.list:
        for script, names in EXERCISES.items():
            source = open(os.path.join(ROOT, script + ".py")).read()
            print(f"{script}.py")
            for n in names:
                print(f"    {n:28s} {citation(source, n)}")
        return 0
    if args.verify:
        return 1 if verify([args.script] if args.script else list(EXERCISES)) else 0
    if not args.script or not args.out:
        p.error("give a script and --out (or --list, or --verify)")
    names = make(args.script, args.out, [n for n in args.only.split(",") if n] if args.only else None)
    print(f"{args.out}: {args.script}.py, functions to write: {', '.join(names)}; grade with `pytest` there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
