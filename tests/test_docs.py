"""The pages stay true: every `python <script>.py ...` command in README.md and docs/ parses with that script's own
flags (nothing is trained), every linked file and picture exists, and no page, script or test speaks of how the
repository was made."""
import glob, os, re

import pytest

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
COMMAND = re.compile(r"python3? (\w+)\.py((?: [^`|\n]*)?)")            # up to the end of the code span or cell
PROCESS = re.compile(r"\bsessions?\b|the issue|issue #?\d|(?<![\w/])#\d{2}\b|device time|previous default", re.I)


def commands(path):
    """(script, argv) of every command in backticks or code blocks of a page."""
    text = open(path).read()
    spans = re.findall(r"```(?:bash)?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    found = []
    for span in spans:
        for line in span.splitlines():
            line = line.split("#")[0]                                  # a comment in a code block
            found += [(m.group(1), m.group(2).split()) for m in COMMAND.finditer(line)]
    return found


ALL = [(os.path.relpath(p, ROOT), script, argv) for p in PAGES for script, argv in commands(p)]


def test_the_pages_hold_commands_at_all():
    assert len(ALL) > 50 and {script for _, script, _ in ALL} >= {"vae", "ddpm", "flow_matching", "score_matching"}


@pytest.mark.parametrize("page, script, argv", ALL, ids=[f"{p}: {s} {' '.join(a)}" for p, s, a in ALL])
def test_every_command_parses_with_its_scripts_flags(page, script, argv, tmp_path):
    assert os.path.exists(os.path.join(ROOT, script + ".py")), f"{page}: no script {script}.py"
    module = __import__(script)
    if "--help" in argv:
        return
    if script == "exercises":                                            # a tool with its own parser, no Config
        module.parse(argv)
        return
    if "--out" not in argv:
        argv = argv + ["--out", str(tmp_path)]
    try:
        common.parse_config(module.Config, argv, script)
    except common.UserError:                                             # a bad value the page shows on purpose
        pass
    except SystemExit as e:                                              # argparse: an unknown flag or choice
        pytest.fail(f"{page}: `python {script}.py {' '.join(argv)}` does not parse (exit {e.code})")


def links(path):
    text = open(path).read()
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://", "#"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_link_and_picture_exists(page):
    missing = [t for t in links(page) if not os.path.exists(os.path.join(os.path.dirname(page), t.split("#")[0]))]
    assert not missing, missing


def test_a_page_per_script_and_the_readme_is_short():
    scripts = ["vae", "autoencoders", "vqvae", "gan", "wgan", "cgan", "cyclegan", "stylegan_lite", "ddpm",
               "flow_matching", "score_matching", "divergences", "sinkhorn", "mgn"]
    assert all(os.path.exists(os.path.join(ROOT, "docs", s + ".md")) for s in scripts)
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 250
    assert os.path.exists(os.path.join(ROOT, "LICENSE")) and "MIT" in open(os.path.join(ROOT, "LICENSE")).read()


def test_no_words_of_process_in_pages_scripts_or_tests():
    files = PAGES + glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
    hits = [f"{os.path.relpath(f, ROOT)}:{n}: {line.strip()}" for f in files if not f.endswith("test_docs.py")
            for n, line in enumerate(open(f), 1) if PROCESS.search(line)]
    assert not hits, hits
