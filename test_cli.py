"""End-to-end tests of the two programs a user runs: train.py and edit.py, as subprocesses.

The scripts are copied into a temporary folder whose weights/ holds only a `model.tiny`
checkpoint, so the CLIs find their base exactly as they would for a user ("the one SD v1
.safetensors file in weights/"), and nothing is written into the repository. Training files are
made once per session and shared; every step of the tiny model costs a few seconds on a CPU.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

REPO = os.path.dirname(os.path.abspath(__file__))
SOURCE_SIZE = (112, 72)  # (w, h): wide, and 512 on the short side makes the long side 796, not a multiple of 64
PROMPT = "a photo of a [*] castle"
STYLE_PROMPT = "a painting in the [*] style"
SNOW = "a photo of a castle in snow"  # what "... in snow" must expand to with PROMPT


# ---------------------------------------------------------------------------------------------
# Helpers

def run(workdir, script, *args, cwd=None, check=True):
    """Run a CLI script from workdir with this interpreter; return the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, os.path.join(workdir, script), *map(str, args)],
                            cwd=cwd or workdir, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{script} {args} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def printed_paths(result, cwd):
    """Every line a CLI prints on stdout is a path; each must exist (relative to the CLI's cwd)."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"nothing printed on stdout; stderr:\n{result.stderr[-2000:]}"
    paths = [os.path.join(cwd, line) for line in lines]
    for path in paths:
        assert os.path.isfile(path), f"printed path {path!r} does not exist"
    return paths


def parameters(path):
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def pixels(path):
    with Image.open(path) as image:
        return np.array(image)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def expected_default_size(source_size):
    """The photo's aspect ratio, 512 on the short side, each side to the nearest multiple of 64."""
    w, h = source_size
    short = min(w, h)
    return (round(h * 512 / short / 64) * 64, round(w * 512 / short / 64) * 64)  # (height, width)


# ---------------------------------------------------------------------------------------------
# Session fixtures: a private copy of the program, a photo, two fine-tuned files

@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sine-cli")
    for name in ("train.py", "edit.py", "cli.py", "sine.py"):
        shutil.copy(os.path.join(REPO, name), root / name)
    shutil.copytree(os.path.join(REPO, "model"), root / "model",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "weights").mkdir()
    for name in os.listdir(os.path.join(REPO, "weights")):
        if name.endswith(".gz"):
            shutil.copy(os.path.join(REPO, "weights", name), root / "weights" / name)
    subprocess.run([sys.executable, "-m", "model.tiny", "weights/tiny.safetensors"], cwd=root, check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1"), capture_output=True)
    # A few colour blocks: enough for the VAE to see a picture, small enough to be instant.
    w, h = SOURCE_SIZE
    image = Image.new("RGB", (w, h), (200, 40, 40))
    image.paste((40, 200, 40), (w // 2, 0, w, h // 2))
    image.paste((40, 40, 200), (0, h // 2, w // 2, h))
    image.save(root / "castle.png")
    return str(root)


@pytest.fixture(scope="session")
def base(workdir):
    return os.path.join(workdir, "weights", "tiny.safetensors")


@pytest.fixture(scope="session")
def trained_patch(workdir):
    """train.py with its defaults (patch mode, default --out), only fewer steps."""
    result = run(workdir, "train.py", "castle.png", PROMPT, "--steps", 2)
    (path,) = printed_paths(result, workdir)
    return {"path": path, "stdout": result.stdout, "steps": 2, "prompt": PROMPT, "position_map": "True"}


@pytest.fixture(scope="session")
def trained_nopatch(workdir):
    """The whole-image ablation, with another prompt so that two models can be told apart."""
    result = run(workdir, "train.py", "castle.png", STYLE_PROMPT, "--no-patch", "--steps", 1)
    (path,) = printed_paths(result, workdir)
    return {"path": path, "stdout": result.stdout, "steps": 1, "prompt": STYLE_PROMPT, "position_map": "False"}


# ---------------------------------------------------------------------------------------------
# train.py

def test_train_default_out_is_under_finetuned(workdir, trained_patch, trained_nopatch):
    assert trained_patch["stdout"].strip() == os.path.join("finetuned", "castle.safetensors")
    assert os.path.dirname(os.path.relpath(trained_nopatch["path"], workdir)) == "finetuned"
    assert trained_nopatch["path"] != trained_patch["path"], "--no-patch must not reuse the patch file's name"


@pytest.mark.parametrize("which", ["trained_patch", "trained_nopatch"])
def test_finetuned_file_metadata_and_keys(request, which, base):
    from model.loader import fingerprint  # the repo's copy; the work copy is the same code
    trained = request.getfixturevalue(which)
    with safe_open(trained["path"], framework="pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
        unet_keys = [k for k in keys if k.startswith("model.diffusion_model.")]
        moved = any(f.get_tensor(k).abs().max() > 0 for k in unet_keys)
    with safe_open(base, framework="pt") as f:
        base_keys = set(f.keys())
    assert metadata["prompt"] == trained["prompt"]
    assert metadata["position_map"] == trained["position_map"]
    assert metadata["source_size"] == f"{SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}"
    assert metadata["base"] == "tiny.safetensors"
    assert metadata["base_fingerprint"] == fingerprint(base)
    assert int(metadata["steps"]) == trained["steps"]
    # Only the trained parts: every UNet and text-encoder weight of the base, and no VAE.
    assert not any(k.startswith("first_stage_model.") for k in keys)
    assert keys == {k for k in base_keys if not k.startswith("first_stage_model.")}
    assert moved, "the stored UNet differences are all zero: training changed nothing"


def test_train_refuses_existing_out(workdir, trained_patch):
    before = sha256(trained_patch["path"])
    result = run(workdir, "train.py", "castle.png", PROMPT, "--steps", 1, "--out", trained_patch["path"],
                 check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--overwrite" in result.stderr
    assert result.stdout == ""
    assert sha256(trained_patch["path"]) == before


# ---------------------------------------------------------------------------------------------
# edit.py

@pytest.fixture(scope="session")
def nonsquare_runs(workdir, trained_patch):
    """The same non-square edit twice into one folder, with the first run's files hashed in between."""
    out = os.path.join(workdir, "out-nonsquare")
    command = ["--target", "... in snow", "--finetuned", trained_patch["path"], "--height", 128, "--width", 192,
               "--steps", 2, "--out", out]
    first = printed_paths(run(workdir, "edit.py", *command), workdir)
    first_hashes = {p: sha256(p) for p in first}
    second = printed_paths(run(workdir, "edit.py", *command), workdir)
    return {"first": first, "second": second, "first_hashes": first_hashes}


def test_edit_nonsquare_size(nonsquare_runs, trained_patch):
    (path,) = nonsquare_runs["first"]
    with Image.open(path) as image:
        assert image.size == (192, 128)
    p = parameters(path)
    assert (p["width"], p["height"]) == (192, 128)
    assert p["target"] == SNOW
    assert p["finetuned"] == [os.path.basename(trained_patch["path"])]
    assert p["base"] == "tiny.safetensors"


def test_edit_is_deterministic(nonsquare_runs):
    (first,), (second,) = nonsquare_runs["first"], nonsquare_runs["second"]
    assert np.array_equal(pixels(first), pixels(second))


def test_edit_never_overwrites(nonsquare_runs):
    assert not set(nonsquare_runs["first"]) & set(nonsquare_runs["second"]), "the second run reused a name"
    for path, digest in nonsquare_runs["first_hashes"].items():
        assert sha256(path) == digest, f"{path} changed on the second run"


@pytest.fixture(scope="session")
def sweep(workdir, trained_patch):
    out = os.path.join(workdir, "out-sweep")
    result = run(workdir, "edit.py", "--target", "... in snow", "--finetuned", trained_patch["path"],
                 "--K", "400,900", "--v", "0.5,1.0", "--height", 64, "--width", 128, "--steps", 2,
                 "--seed", 3, "--out", out)
    paths = printed_paths(result, workdir)
    grids = [p for p in paths if "grid" in os.path.basename(p)]
    singles = {}
    for path in paths:
        if path not in grids:
            p = parameters(path)
            singles[p["K"][0], p["v"][0]] = path
    return {"paths": paths, "grids": grids, "singles": singles}


def test_sweep_writes_every_combination_and_a_grid(sweep, trained_patch):
    assert len(sweep["paths"]) == 5 and len(sweep["grids"]) == 1
    assert len(set(sweep["paths"])) == 5
    assert set(sweep["singles"]) == {(400, 0.5), (400, 1.0), (900, 0.5), (900, 1.0)}
    for (K, v), path in sweep["singles"].items():
        p = parameters(path)
        assert p["K"] == [K] and p["v"] == [v]
        assert p["seed"] == 3
        assert (p["width"], p["height"]) == (128, 64)
        assert p["target"] == SNOW
        assert p["training_prompts"] == [PROMPT]
        assert p["base"] == "tiny.safetensors"
        assert p["finetuned"] == [os.path.basename(trained_patch["path"])]
        with Image.open(path) as image:
            assert image.size == (128, 64)
    (grid,) = sweep["grids"]
    with Image.open(grid) as image:
        assert image.size == (2 * 128, 2 * 64)
    assert parameters(grid)["seed"] == 3


def test_sweep_guidance_follows_K_and_v(sweep):
    """v = 1 leaves the fine-tuned model no share, and with 2 DDIM steps (t = 501, 1) K = 900 never
    guides: those three images are plain SD. K = 400, v = 0.5 guides at t = 501 and must differ."""
    s = {key: pixels(path) for key, path in sweep["singles"].items()}
    assert np.array_equal(s[400, 1.0], s[900, 1.0])
    assert np.array_equal(s[900, 0.5], s[900, 1.0])
    assert not np.array_equal(s[400, 0.5], s[900, 0.5])


def test_finetuned_none_is_plain_sd(workdir, sweep, tmp_path):
    """No fine-tuned file anywhere (an empty cwd): plain SD, which must equal the sweep's unguided image."""
    result = run(workdir, "edit.py", "--target", SNOW, "--finetuned", "none", "--height", 64, "--width", 128,
                 "--steps", 2, "--seed", 3, "--out", "plain", cwd=str(tmp_path))
    (path,) = printed_paths(result, str(tmp_path))
    p = parameters(path)
    assert p["finetuned"] == [] and p["training_prompts"] == []
    assert p["base"] == "tiny.safetensors"
    assert (p["width"], p["height"], p["seed"]) == (128, 64, 3)
    assert np.array_equal(pixels(path), pixels(sweep["singles"][400, 1.0]))


def test_two_models_guide_one_edit(workdir, trained_patch, trained_nopatch):
    out = os.path.join(workdir, "out-two")
    result = run(workdir, "edit.py", "--target", "a painting of a castle", "--finetuned",
                 trained_patch["path"], trained_nopatch["path"], "--v", "0.8/0.9", "--K", "400/600",
                 "--height", 64, "--width", 64, "--steps", 2, "--out", out)
    (path,) = printed_paths(result, workdir)
    p = parameters(path)
    assert p["K"] == [400, 600] and p["v"] == [0.8, 0.9]
    assert p["finetuned"] == [os.path.basename(trained_patch["path"]), os.path.basename(trained_nopatch["path"])]
    assert p["training_prompts"] == [PROMPT, STYLE_PROMPT]
    with Image.open(path) as image:
        assert image.size == (64, 64)


def test_default_finetuned_is_newest_and_default_size_follows_photo(workdir, trained_patch, trained_nopatch):
    # The newest file is neither the alphabetically last one nor necessarily the last trained;
    # a still newer resume state must be skipped.
    now = time.time()
    os.utime(trained_patch["path"], (now - 100, now - 100))
    os.utime(trained_nopatch["path"], (now - 50, now - 50))
    resume = os.path.join(workdir, "finetuned", "castle.resume.safetensors")
    shutil.copy(trained_patch["path"], resume)
    try:
        result = run(workdir, "edit.py", "--target", "a castle in snow", "--steps", 2)
    finally:
        os.remove(resume)
    newest = os.path.basename(trained_nopatch["path"])
    assert newest in result.stderr, result.stderr
    (path,) = printed_paths(result, workdir)
    assert os.path.relpath(path, workdir).startswith("outputs" + os.sep)
    p = parameters(path)
    assert p["finetuned"] == [newest]
    height, width = expected_default_size(SOURCE_SIZE)
    assert min(height, width) == 512 and height % 64 == 0 and width % 64 == 0
    assert (p["width"], p["height"]) == (width, height)
    with Image.open(path) as image:
        assert image.size == (width, height)
