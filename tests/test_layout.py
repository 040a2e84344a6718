"""The reader's path: sine.py holds the method alone, and the three command lines are leaves that
nothing imports, so that each can be read (and changed) without fear for the rest."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "edit", "export"}


def modules():
    """Every Python file of the program, the toy world and the tools: the tests are left out."""
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for name in files:
            if name.endswith(".py") and not name.startswith("test_"):
                yield os.path.relpath(os.path.join(folder, name), REPO)


def imported(path):
    """The top-level names of every module that path imports, anywhere in it."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_no_module_imports_a_command_line():
    found = {path: sorted(SCRIPTS & set(imported(path))) for path in modules()}
    assert {path: names for path, names in found.items() if names} == {}
    assert {"sine.py", "pictures.py", "finetuned_file.py", "tools/bench.py"} <= set(found), "the walk missed files"


def test_sine_py_holds_the_method_alone():
    """No file format, no file system, no adapters: those live in finetuned_file.py, cli.py, model/."""
    assert not {"os", "finetuned_file", "cli"} & set(imported("sine.py"))
    with open(os.path.join(REPO, "sine.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert "step_loss" in names and "sine_eps" in names and "position_map" in names
    assert not [name for name in names if any(word in name.lower() for word in ("save", "load", "file", "adamw"))]
