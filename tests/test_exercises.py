"""Tests of exercises.py: --list covers every script with its citations, a blanked folder holds no solution of the
blanked functions and leaves the rest intact, and --verify pins every exercise of divergences.py."""
import ast, glob, os

import pytest

import exercises

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))
                 if os.path.basename(p) not in ("common.py", "exercises.py", "conftest.py"))


def test_list_covers_every_script_and_each_exercise_cites_its_source(capsys):
    assert sorted(exercises.EXERCISES) == SCRIPTS
    assert exercises.main(["--list"]) == 0
    out = capsys.readouterr().out
    for script, names in exercises.EXERCISES.items():
        source = open(os.path.join(ROOT, script + ".py")).read()
        assert f"{script}.py" in out
        for name in names:
            assert exercises.citation(source, name), f"{script}.{name} cites no lecture or paper"


def bodies(path):
    """{function or Class.method: its body without the docstring, as source text}."""
    tree = ast.parse(open(path).read())
    found = {}
    for node in tree.body:
        inner = [(node.name + "." + n.name, n) for n in node.body if isinstance(n, ast.FunctionDef)] \
            if isinstance(node, ast.ClassDef) else [(node.name, node)] if isinstance(node, ast.FunctionDef) else []
        for name, fn in inner:
            body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
            found[name] = "\n".join(ast.unparse(statement) for statement in body)
    return found


def test_a_blanked_folder_holds_no_solution_and_keeps_everything_else(tmp_path):
    out = tmp_path / "hw"
    names = exercises.make("flow_matching", str(out), only=["cfm_target", "sample"])
    assert names == ["cfm_target", "sample"]
    for f in ("flow_matching.py", "common.py", "metrics.py", "test_flow_matching.py", "conftest.py", "pytest.ini",
              "README.md", "evaluators"):
        assert (out / f).exists(), f
    before, after = bodies(os.path.join(ROOT, "flow_matching.py")), bodies(out / "flow_matching.py")
    assert set(before) == set(after)
    for name in before:
        if name in names:
            assert after[name].startswith("raise NotImplementedError"), after[name]
            assert "x1 - x0" not in after[name] and "h * v(" not in after[name]
        else:
            assert after[name] == before[name], name
    text = open(out / "flow_matching.py").read()
    assert "# TODO: write cfm_target" in text and "x_{t+h} = x_t + h v(x_t, t)" in text   # the equation's comment
    readme = open(out / "README.md").read()
    assert "`cfm_target`" in readme and "Example: Gaussian conditional probability path" in readme


def test_bad_requests_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="error: nope are not exercises of ddpm.py"):
        exercises.main(["ddpm", "--out", str(tmp_path / "a"), "--only", "nope"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(SystemExit, match="error: .* exists and is not empty"):
        exercises.main(["ddpm", "--out", str(tmp_path / "b")])


def test_verify_pins_every_exercise_of_divergences(capsys):
    assert exercises.main(["--verify", "divergences"]) == 0
    out = capsys.readouterr().out
    assert "untouched folder, pytest: passes" in out and "untouched folder, pytest --runs: passes" in out
    for name in exercises.EXERCISES["divergences"]:
        row = next(line for line in out.splitlines() if line.startswith(f"| `divergences.{name}`"))
        assert "NOT PINNED" not in row and "test_" in row
