"""The README is a promise: every `python ...` command in it runs as written.

The commands are read from the README itself, so an edit to the README is tested as it stands.
They run on a `model.tiny` checkpoint in a private copy of the program (the real weights are a 4 GB
download), so the pictures are noise; what is checked is that each command exits 0 and writes what
it says. Two liberties, both spelled out below: commands that would fine-tune for 10,000 steps or
sample for 50 get `--steps 2` appended, and paths under /tmp/ are moved into pytest's temporary
folder. The one-minute check runs with neither: it is meant to be fast as written, on the toy base.
The toy section's long commands are not run here: `toy.pretrain` takes half an hour or more, and
test_toy.py runs `toy.replicate` itself, reduced.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
ONE_MINUTE_CHECK = "## One-minute check, no download"
TOY_SECTION = "## See it work without a GPU"


def readme_commands():
    """[(section heading, command line)] for every `python` line in the README's bash blocks."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands, heading = [], None
    for chunk in re.split(r"(^#+ .*$)", text, flags=re.M):
        if chunk.startswith("#"):
            heading = chunk.strip()
            continue
        for block in re.findall(r"```bash\n(.*?)```", chunk, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()  # a trailing comment is not part of the command
                if line.startswith("python ") and "pytest" not in line:  # the test command runs this file
                    commands.append((heading, line))
    return commands


def run(command, cwd, tmp):
    """Run one README command line with this interpreter; /tmp/ paths go into the test's folder."""
    argv = [arg.replace("/tmp/", f"{tmp}/") for arg in shlex.split(command)]
    result = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README command failed ({result.returncode}): {command}\n{result.stderr[-3000:]}"
    assert "warning: the loss" not in result.stderr, f"{command}: the loss blew up at the lr the README gives"
    printed = [line for line in result.stdout.splitlines() if line.strip()]
    if command.startswith("python -m toy.score"):  # the one command that prints a score, not a path
        assert len(printed) == 1 and re.match(r"fidelity [01]\.\d\d, stripes (\d\.\d\d|none): ", printed[0]), printed
        return printed
    assert printed, f"{command} printed no path"
    for path in printed:
        assert os.path.isfile(os.path.join(cwd, path)), f"{command} printed {path}, which does not exist"
    return printed


def test_readme_has_the_commands_a_newcomer_needs():
    scripts = {shlex.split(line)[1] for _, line in readme_commands()}
    assert {"train.py", "edit.py", "-m"} <= scripts
    assert any(heading == ONE_MINUTE_CHECK for heading, _ in readme_commands())
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text, "the CPU build, before pip"
    assert text.index("whl/cpu") < text.index("pip install -r requirements.txt")
    check = text[text.index(ONE_MINUTE_CHECK):text.index("## Using it")]
    assert "`[*]` takes the shape's word's place" in check, "why the toy's prompt has no noun after [*]"


@pytest.mark.full
def test_one_minute_check_runs_as_written(tmp_path):
    """Twice: a newcomer who runs the check again must not be told that a file exists. The second time
    with a few steps (the last --steps wins): what is at stake is the files, not the pictures."""
    for again in (False, True):
        for heading, line in readme_commands():
            if heading == ONE_MINUTE_CHECK:
                run(line + (" --steps 2" if again and " --steps " in line else ""), REPO, tmp_path)


@pytest.fixture
def user_folder(tmp_path):
    """The program as a user holds it, with a tiny checkpoint as the one file in weights/."""
    for name in ("train.py", "edit.py", "cli.py", "sine.py", "outputs.py", "export.py", "pictures.py", "finetuned_file.py", "adamw.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    for folder in ("model", "tools", "weights", "examples"):
        shutil.copytree(os.path.join(REPO, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.safetensors"))
    subprocess.run([sys.executable, "-m", "model.tiny", "weights/tiny.safetensors"], cwd=tmp_path, env=ENV,
                   check=True, capture_output=True)
    return tmp_path


@pytest.mark.full
def test_every_other_command_runs(user_folder, tmp_path):
    """In README order, on the tiny model; the recipes' other models, a painting and a dog with a
    flower, are fine-tuned first from the example photo (the README leaves those steps to the reader)."""
    run('python train.py examples/cat.png "a painting in the [*] style" --out finetuned/painting.safetensors '
        "--steps 1", user_folder, tmp_path)
    run('python train.py examples/cat.png "a [*] dog with a flower in mouth" --out finetuned/dog.safetensors '
        "--steps 1", user_folder, tmp_path)
    ran = 0
    for heading, line in readme_commands():
        if heading in (ONE_MINUTE_CHECK, TOY_SECTION) or line.startswith("python -m model.tiny"):
            continue
        if line.startswith(("python train.py", "python edit.py")) and "--steps" not in line:
            line += " --steps 2"
        printed = run(line, user_folder, tmp_path)
        if "--K 200,400,600 --v 0.5,0.7,0.9" in line:
            assert len(printed) == 9 + 1, "a 3 x 3 sweep writes nine images and a grid"
        ran += 1
    assert ran >= 4


def test_the_pages_stay_short_and_open_with_what_they_found():
    """The README at most 1,800 words; the toy's page at most 1,500, its summary (at most 10 lines)
    first, before any command or table."""
    words = lambda path: len(open(os.path.join(REPO, path), encoding="utf-8").read().split())
    assert words("README.md") <= 1800 and words(os.path.join("toy", "README.md")) <= 1500
    with open(os.path.join(REPO, "toy", "README.md"), encoding="utf-8") as f:
        lines = f.read().split("\n\n")[1].splitlines()  # the first paragraph after the title
    assert lines[0].startswith("**What it found.**") and len(lines) <= 10, lines
