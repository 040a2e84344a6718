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
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import cli  # the repository's copy; the scripts run from a copy of it
import edit
from pictures import LABEL_HEIGHT
from model.tiny import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SOURCE_SIZE = (112, 72)  # (w, h): wide, and 128 on the short side makes the long side 199, not a multiple of 64
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
    """The settings edit.py records, as JSON under edit.py's flag names (outputs.py)."""
    with Image.open(path) as image:
        return json.loads(image.text["sine"])


def pixels(path):
    with Image.open(path) as image:
        return np.array(image)


def recorded(trained_path):
    """How edit.py records a file in the program's folder (workdir here): its path from there."""
    return os.path.join("finetuned", os.path.basename(trained_path))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def expected_default_size(source_size, native=TINY.image_size):
    """The photo's aspect ratio, the base's native size (512 for SD v1, 128 for the tiny model) on
    the short side, each side to the nearest multiple of 64."""
    w, h = source_size
    short = min(w, h)
    return (round(h * native / short / 64) * 64, round(w * native / short / 64) * 64)  # (height, width)


# ---------------------------------------------------------------------------------------------
# Session fixtures: a private copy of the program, a photo, two fine-tuned files

@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sine-cli")
    for name in ("train.py", "edit.py", "cli.py", "sine.py", "outputs.py", "export.py", "pictures.py", "finetuned_file.py", "adamw.py"):
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
    assert p["finetuned"] == [recorded(trained_patch["path"])]
    assert p["base"] == os.path.join("weights", "tiny.safetensors")  # from the program's folder, never absolute


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
            singles[int(p["K"]), float(p["v"])] = path
    return {"paths": paths, "grids": grids, "singles": singles}


def test_sweep_writes_every_combination_and_a_grid(sweep, trained_patch):
    assert len(sweep["paths"]) == 5 and len(sweep["grids"]) == 1
    assert len(set(sweep["paths"])) == 5
    assert set(sweep["singles"]) == {(400, 0.5), (400, 1.0), (900, 0.5), (900, 1.0)}
    for (K, v), path in sweep["singles"].items():
        p = parameters(path)
        assert (int(p["K"]), float(p["v"])) == (K, v)
        assert p["seed"] == 3
        assert (p["width"], p["height"]) == (128, 64)
        assert p["target"] == SNOW
        assert [m["prompt"] for m in p["models"]] == [PROMPT]
        assert os.path.basename(p["base"]) == "tiny.safetensors"
        assert p["finetuned"] == [recorded(trained_patch["path"])]
        with Image.open(path) as image:
            assert image.size == (128, 64)
    (grid,) = sweep["grids"]
    with Image.open(grid) as image:
        assert image.size == (2 * 128, LABEL_HEIGHT + 2 * (LABEL_HEIGHT + 64)), "a band for the target on top"
    assert parameters(grid)["seed"] == 3 and parameters(grid)["K"] == "400,900"


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
    assert p["finetuned"] == ["none"] and p["models"] == []
    assert os.path.basename(p["base"]) == "tiny.safetensors"
    assert (p["width"], p["height"], p["seed"]) == (128, 64, 3)
    assert np.array_equal(pixels(path), pixels(sweep["singles"][400, 1.0]))


def test_two_models_guide_one_edit(workdir, trained_patch, trained_nopatch):
    out = os.path.join(workdir, "out-two")
    result = run(workdir, "edit.py", "--target", "a painting of a castle", "--finetuned",
                 trained_patch["path"], trained_nopatch["path"], "--v", "0.8/0.9", "--K", "400/600",
                 "--height", 64, "--width", 64, "--steps", 2, "--out", out)
    (path,) = printed_paths(result, workdir)
    p = parameters(path)
    assert p["K"] == "400/600" and p["v"] == "0.8/0.9"
    assert p["finetuned"] == [recorded(trained_patch["path"]), recorded(trained_nopatch["path"])]
    assert [m["prompt"] for m in p["models"]] == [PROMPT, STYLE_PROMPT]
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
    assert [os.path.basename(f) for f in p["finetuned"]] == [newest]
    height, width = expected_default_size(SOURCE_SIZE)
    assert min(height, width) == TINY.image_size and height % 64 == 0 and width % 64 == 0
    assert (p["width"], p["height"]) == (width, height)
    with Image.open(path) as image:
        assert image.size == (width, height)


# ---------------------------------------------------------------------------------------------
# Fitting the SD ecosystem: AUTOMATIC1111's parameters, --from, --negative, several targets, export

def parse_a1111(text):
    """How AUTOMATIC1111 and the tools that copy it read a `parameters` text: prompt lines, then a
    'Negative prompt:' line, then one line of 'key: value' pairs separated by commas, where a value
    holding a comma, colon or quote is JSON-quoted. Returns (prompt, negative, {key: value})."""
    *lines, last = text.split("\n")
    negative_at = next(i for i, line in enumerate(lines) if line.startswith("Negative prompt: "))
    prompt = "\n".join(lines[:negative_at])
    negative = "\n".join(lines[negative_at:])[len("Negative prompt: "):]
    fields, rest = {}, last
    while rest:
        key, rest = rest.split(": ", 1)
        if rest.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(",")
        fields[key] = value
        rest = rest.lstrip(", ")
    return prompt, negative, fields


def a1111_fields(path):
    with Image.open(path) as image:
        return parse_a1111(image.text["parameters"])


NEGATIVE = 'blurry, "low" quality: bad'
SAMPLING_PROMPT = 'a photo of a [*] castle, "seen": at dusk'  # in the parameters line, it must be quoted


@pytest.fixture(scope="session")
def negative_run(workdir, trained_patch, tmp_path_factory):
    out = tmp_path_factory.mktemp("negative")
    command = ["--target", "... in snow", "--finetuned", trained_patch["path"], "--finetuned-prompt", SAMPLING_PROMPT,
               "--height", 64, "--width", 128, "--steps", 2, "--seed", 3, "--out", out]
    (path,) = printed_paths(run(workdir, "edit.py", *command, "--negative", NEGATIVE), workdir)
    (plain,) = printed_paths(run(workdir, "edit.py", *command), workdir)
    return path, plain


@pytest.mark.full
def test_parameters_read_back_with_an_a1111_parser(negative_run, trained_patch):
    path, _ = negative_run
    prompt, negative, fields = a1111_fields(path)
    p = parameters(path)
    assert (prompt, negative) == (SNOW, NEGATIVE)
    assert fields == {"Steps": "2", "Sampler": "DDIM", "CFG scale": "7.5", "Seed": "3", "Size": "128x64",
                      "Model hash": sha256(os.path.join(os.path.dirname(os.path.dirname(trained_patch["path"])),
                                                        "weights", "tiny.safetensors"))[:10],
                      "Model": "tiny", "Eta": "0.0", "SINE model": os.path.basename(trained_patch["path"]),
                      "SINE model steps": "2", "SINE training prompt": PROMPT, "SINE prompt": SAMPLING_PROMPT,
                      "SINE K": "400", "SINE v": "0.7", "Precision": "bf16/fp32" if cli.cpu_has_native_bf16() else "fp32",
                      "Device": "cpu", "Tiled VAE": "False",
                      "channels_last": "False"}
    # every setting that changes the pixels is in the text, with the value edit.py used
    assert (fields["Steps"], fields["Seed"], fields["SINE K"], fields["SINE v"]) == \
        (str(p["steps"]), str(p["seed"]), p["K"], p["v"])


@pytest.mark.full
def test_negative_prompt_changes_the_output_and_is_recorded(negative_run):
    path, plain = negative_run
    assert parameters(path)["negative"] == NEGATIVE and parameters(plain)["negative"] == ""
    assert a1111_fields(plain)[1] == ""
    assert not np.array_equal(pixels(path), pixels(plain))


@pytest.mark.full
def test_from_an_image_made_on_a_gpu_samples_in_this_devices_precision(workdir, negative_run, tmp_path):
    """Its fp16 would crawl on a CPU: auto instead, said in one line. (The image was in fact made here.)"""
    import outputs
    path, _ = negative_run
    with Image.open(path) as image:
        settings = {**json.loads(image.text["sine"]), "precision": "bf16/fp16", "device": "cuda"}
        gpu_png = outputs.write_png(image.copy(), str(tmp_path / "gpu"), "seed3", settings)
    result = run(workdir, "edit.py", "--from", gpu_png, "--out", tmp_path / "here")
    assert f"note: {gpu_png} was made in bf16/fp16 on cuda" in result.stderr
    (again,) = printed_paths(result, workdir)
    assert (parameters(again)["precision"], parameters(again)["device"]) == (parameters(path)["precision"], "cpu")
    assert np.array_equal(pixels(again), pixels(path))


@pytest.mark.full
def test_from_reproduces_the_pixels_and_an_override_changes_only_what_it_names(workdir, negative_run, tmp_path):
    path, _ = negative_run
    (again,) = printed_paths(run(workdir, "edit.py", "--from", path, "--out", tmp_path / "again"), workdir)
    assert np.array_equal(pixels(again), pixels(path))
    beside = lambda png: {k: v for k, v in parameters(png).items() if k != "paths_from_png"}  # from each PNG's folder
    assert beside(again) == beside(path)
    for flag, value, key in [("--seed", 5, "seed"), ("--K", 900, "K")]:
        (changed,) = printed_paths(run(workdir, "edit.py", "--from", path, flag, value, "--out", tmp_path / key),
                                   workdir)
        assert beside(changed) == {**beside(path), key: value if key == "seed" else str(value)}
        assert not np.array_equal(pixels(changed), pixels(path))


@pytest.mark.full
def test_two_targets_in_one_run_give_the_pixels_of_two_runs(workdir, trained_patch, tmp_path):
    common = ["--finetuned", trained_patch["path"], "--height", 64, "--width", 64, "--steps", 2, "--n", 2]
    both = printed_paths(run(workdir, "edit.py", "--target", "... in snow", "a red tower", *common,
                             "--out", tmp_path / "both"), workdir)
    alone = [p for target in ("... in snow", "a red tower") for p in
             printed_paths(run(workdir, "edit.py", "--target", target, *common, "--out", tmp_path / target), workdir)]
    assert len(both) == len(alone) == 4
    for one, other in zip(both, alone):
        assert parameters(one) == parameters(other)
        assert np.array_equal(pixels(one), pixels(other))


@pytest.mark.full
def test_names_sort_by_run_and_a_random_seed_is_recorded(workdir, tmp_path):
    out = tmp_path / "runs"
    runs = [run(workdir, "edit.py", "--target", "a castle", "--finetuned", "none", "--height", 64, "--width", 64,
                "--steps", 1, "--seed", -1, "--out", out) for _ in range(2)]
    paths = [printed_paths(result, workdir)[0] for result in runs]
    assert sorted(os.listdir(out)) == [os.path.basename(p) for p in paths]
    assert [os.path.basename(p)[:6] for p in paths] == ["00000-", "00001-"]
    for result, path in zip(runs, paths):
        seed = parameters(path)["seed"]
        assert f"seed: {seed}" in result.stderr and f"-seed{seed}" in path
    assert parameters(paths[0])["seed"] != parameters(paths[1])["seed"]


@pytest.mark.full
@pytest.mark.parametrize("png", ["photo", "grid", "gone"])
def test_from_a_png_it_cannot_use_gets_one_line(workdir, sweep, trained_patch, negative_run, tmp_path, png):
    if png == "photo":
        source = os.path.join(workdir, "castle.png")
    elif png == "grid":
        (source,) = sweep["grids"]
    else:  # a PNG whose fine-tuned file has since moved, and has no copy in finetuned/
        moved = os.path.join(workdir, "finetuned", "moved.safetensors")
        run(workdir, "train.py", "castle.png", PROMPT, "--steps", 1, "--seed", 9, "--out", moved)
        result = run(workdir, "edit.py", "--target", "a castle", "--finetuned", moved, "--height", 64, "--width",
                     64, "--steps", 1, "--out", tmp_path / "made")
        (source,) = printed_paths(result, workdir)
        os.remove(moved)
    result = run(workdir, "edit.py", "--from", source, "--out", tmp_path / "out", check=False)
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert {"photo": "holds no settings", "grid": "is a grid", "gone": "moved.safetensors"}[png] in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_export_is_a_complete_checkpoint_that_diffusers_reads(workdir, base, trained_patch, tmp_path):
    import finetuned_file
    from model import load_sd
    from test_model import reference_clip, reference_unet, reference_vae
    out = tmp_path / "castle-full.safetensors"
    (path,) = printed_paths(run(workdir, "export.py", trained_patch["path"], "--out", out), workdir)
    exported = load_sd(path)
    finetuned = finetuned_file.apply_finetuned(load_sd(base), trained_patch["path"])
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(exported, part).state_dict(), getattr(finetuned, part).state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:  # base + differences, rounded once to fp16
            assert torch.equal(ours[name], theirs[name].half().float()), (part, name)
    assert not torch.equal(exported.unet.state_dict()["out.2.weight"], load_sd(base).unet.state_dict()["out.2.weight"])

    # diffusers' single-file converter reads it, and its modules compute what ours compute
    cfg = exported.config
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, cfg.unet.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, cfg.unet.context_dim, generator=generator)
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.allclose(reference_unet(cfg.unet, path)(z, t, encoder_hidden_states=context).sample, exported.unet(z, t, context),
                              atol=1e-5)
        ids = exported.tokenizer(["a photo of a sks castle"])
        assert torch.allclose(reference_clip(cfg.text_encoder, path)(input_ids=ids).last_hidden_state,
                              exported.text_encoder(ids), atol=1e-5)
        image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
        assert torch.allclose(reference_vae(cfg.vae, path).encode(image).latent_dist.mean,
                              exported.vae.encode(image)[0], atol=1e-5)


def test_export_never_replaces_a_file_without_overwrite(workdir, trained_patch, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"mine")
    result = run(workdir, "export.py", trained_patch["path"], "--out", out, check=False)
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "--overwrite" in result.stderr
    assert out.read_bytes() == b"mine" and os.listdir(tmp_path) == ["exists.safetensors"]


# ---------------------------------------------------------------------------------------------
# Coming back: --from finds the files that made an image, by fingerprint, from any folder

def edit_from(workdir, png, cwd, out, *extra, check=True):
    return run(workdir, "edit.py", "--from", png, "--out", out, *extra, cwd=str(cwd), check=check)


@pytest.mark.full
def test_from_refuses_a_retrained_model_then_finds_the_original_by_fingerprint(workdir, tmp_path):
    """The user's own folder (not the program's) holds finetuned/ and outputs/, as when train.py and
    edit.py run there with their defaults."""
    shutil.copy(os.path.join(workdir, "castle.png"), tmp_path / "castle.png")
    # --seed 5: a model unlike any other in the session (the same training gives the same file, and
    # the program's own finetuned/ is searched too).
    run(workdir, "train.py", "castle.png", PROMPT, "--steps", 2, "--seed", 5, cwd=str(tmp_path))
    made = run(workdir, "edit.py", "--target", "... in snow", "--height", 64, "--width", 64, "--steps", 2,
               cwd=str(tmp_path))
    (png,) = printed_paths(made, str(tmp_path))
    model = tmp_path / "finetuned" / "castle.safetensors"
    shutil.copy(model, tmp_path / "kept-aside.safetensors")  # outside weights/ and finetuned/: not searched
    run(workdir, "train.py", "castle.png", PROMPT, "--steps", 1, "--seed", 5, "--overwrite", cwd=str(tmp_path))

    refused = edit_from(workdir, png, tmp_path, "again", check=False)
    assert refused.returncode != 0 and refused.stdout == "" and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "castle.safetensors has changed since" in line and "1 steps, the image's had 2" in line, line
    assert "--finetuned" in line
    assert not (tmp_path / "again").exists()

    # A copy of the original, under another name in finetuned/, is found by its fingerprint.
    shutil.copy(tmp_path / "kept-aside.safetensors", tmp_path / "finetuned" / "old-castle.safetensors")
    (again,) = printed_paths(edit_from(workdir, png, tmp_path, "again"), str(tmp_path))
    assert np.array_equal(pixels(again), pixels(png))
    assert parameters(again)["finetuned"] == ["old-castle.safetensors"]
    assert parameters(again)["fingerprints"] == parameters(png)["fingerprints"]

    # A file given beside --from wins, unchecked, and is recorded.
    (retrained,) = printed_paths(edit_from(workdir, png, tmp_path, "new", "--finetuned", model), str(tmp_path))
    assert parameters(retrained)["models"][0]["steps"] == 1
    assert parameters(retrained)["fingerprints"]["finetuned"] != parameters(png)["fingerprints"]["finetuned"]


@pytest.mark.full
def test_from_works_from_any_folder_and_records_no_absolute_path(workdir, tmp_path):
    user, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    user.mkdir()
    elsewhere.mkdir()
    shutil.copy(os.path.join(workdir, "castle.png"), user / "castle.png")
    run(workdir, "train.py", "castle.png", PROMPT, "--steps", 1, cwd=str(user))
    made = run(workdir, "edit.py", "--target", "... in snow", "--height", 64, "--width", 128, "--steps", 2,
               cwd=str(user))
    (png,) = printed_paths(made, str(user))
    with Image.open(png) as image:
        chunks = image.text
    for text in chunks.values():
        assert str(tmp_path) not in text and workdir not in text, "an absolute path in the PNG"
    assert parameters(png)["base"] == os.path.join("weights", "tiny.safetensors")

    (again,) = printed_paths(edit_from(workdir, png, elsewhere, "again"), str(elsewhere))
    assert np.array_equal(pixels(again), pixels(png))


@pytest.mark.full
def test_from_finds_files_beside_its_outputs_folder_from_a_third_folder(workdir, base, tmp_path):
    """The model and the base sit beside the outputs folder, outside the program's folder; --from runs
    from a third folder and finds both by the paths recorded from the PNG's own folder."""
    project, third = tmp_path / "project", tmp_path / "third"
    project.mkdir()
    third.mkdir()
    shutil.copy(os.path.join(workdir, "castle.png"), project / "castle.png")
    shutil.copy(base, project / "my-base.safetensors")  # the same weights under another name, elsewhere
    run(workdir, "train.py", "castle.png", PROMPT, "--steps", 1, "--seed", 11, "--base", "my-base.safetensors",
        "--out", "my-castle.safetensors", cwd=str(project))
    made = run(workdir, "edit.py", "--target", "... in snow", "--finetuned", "my-castle.safetensors", "--base",
               "my-base.safetensors", "--height", 64, "--width", 64, "--steps", 2, cwd=str(project))
    (png,) = printed_paths(made, str(project))
    p = parameters(png)
    assert p["paths_from_png"] == {"base": os.path.join("..", "my-base.safetensors"),
                                   "finetuned": [os.path.join("..", "my-castle.safetensors")]}
    (again,) = printed_paths(edit_from(workdir, png, third, "again"), str(third))
    assert np.array_equal(pixels(again), pixels(png))


@pytest.mark.full
def test_model_folders_hold_bases_and_finetuned_files(workdir, base, tmp_path):
    """$SINE_MODELS names folders outside the program's: a base there needs no --base, a fine-tuned
    file there is found by its name."""
    program, models = tmp_path / "program", tmp_path / "models"
    shutil.copytree(workdir, program, ignore=shutil.ignore_patterns("*.safetensors", "finetuned", "out-*", "outputs"))
    models.mkdir()
    shutil.copy(base, models / "v1-5.safetensors")
    env = dict(os.environ, SINE_MODELS=str(models))
    trained = subprocess.run([sys.executable, program / "train.py", "castle.png", PROMPT, "--steps", "1",
                              "--out", models / "castle-model.safetensors"], cwd=program, env=env,
                             capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-2000:]
    edited = subprocess.run([sys.executable, program / "edit.py", "--target", "... in snow", "--finetuned",
                             "castle-model.safetensors", "--steps", "1", "--height", "64", "--width", "64"], cwd=program,
                            env=env, capture_output=True, text=True)
    assert edited.returncode == 0, edited.stderr[-2000:]
    (png,) = printed_paths(edited, str(program))
    assert parameters(png)["fingerprints"]["base"] == cli.safe_fingerprint(base)


@pytest.mark.full
def test_from_with_another_model_takes_its_prompt_and_aspect(workdir, negative_run, trained_patch, tmp_path):
    """--from PNG --finetuned OTHER: OTHER guides with its own training prompt, at its own photo's
    aspect, said in one line; given beside it, the image's are kept."""
    Image.new("RGB", (96, 96), (30, 90, 200)).save(tmp_path / "square.png")
    other = tmp_path / "square.safetensors"
    run(workdir, "train.py", tmp_path / "square.png", STYLE_PROMPT, "--steps", 1, "--out", other)
    path, _ = negative_run
    result = run(workdir, "edit.py", "--from", path, "--finetuned", other, "--out", tmp_path / "own")
    (own,) = printed_paths(result, workdir)
    assert "another model than --finetuned" in result.stderr and "training prompt and photo's aspect" in result.stderr
    assert parameters(own)["finetuned_prompt"] == [STYLE_PROMPT]
    assert (parameters(own)["width"], parameters(own)["height"]) == (TINY.image_size, TINY.image_size)
    kept = run(workdir, "edit.py", "--from", path, "--finetuned", other, "--finetuned-prompt", SAMPLING_PROMPT,
               "--height", 64, "--width", 128, "--out", tmp_path / "kept")
    (kept_png,) = printed_paths(kept, workdir)
    assert "another model" not in kept.stderr
    assert parameters(kept_png)["finetuned_prompt"] == [SAMPLING_PROMPT]
    assert (parameters(kept_png)["width"], parameters(kept_png)["height"]) == (128, 64)


def test_help_shows_every_default(workdir, monkeypatch):
    """Every option that takes a value says its default (--target and --from have none), and --help prints them."""
    import argparse
    import edit
    import export
    import train

    class Parser(Exception):
        """Carries the parser a CLI built out of its parse_args."""

    def capture(parser, *args, **kwargs):
        raise Parser(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for module in (train, edit, export):
        with pytest.raises(Parser) as caught:
            module.parse_args([])
        parser = caught.value.args[0]
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and action.dest not in ("help", "target", "from_png"):
                shown = parser._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{module.__name__} {action.option_strings[0]}: {shown!r}"
    monkeypatch.undo()
    for script, defaults in [("edit.py", ("400", "0.7", "7.5", "50")), ("train.py", ("1e-06", "0"))]:
        shown = " ".join(run(workdir, script, "--help").stdout.split())  # one process a script: each imports torch
        for default in defaults:
            assert f"(default: {default})" in shown, (script, default)


def test_grid_labels_sit_above_the_images(sweep):
    """Each cell of the grid is its image, whole, under a band that holds the label; above them all,
    a band holds the target."""
    (grid,) = sweep["grids"]
    cells = pixels(grid)
    title = cells[:LABEL_HEIGHT]
    assert (title < 128).any() and (title == 255).mean() > 0.5, "the title band holds dark text on white"
    assert cells.shape[0] == LABEL_HEIGHT + 2 * (LABEL_HEIGHT + pixels(next(iter(sweep["singles"].values()))).shape[0])
    for (row, (K, v)) in enumerate([(400, 0.5), (400, 1.0), (900, 0.5), (900, 1.0)]):
        r, c = divmod(row, 2)
        single = pixels(sweep["singles"][K, v])
        h, w = single.shape[:2]
        top = LABEL_HEIGHT + r * (LABEL_HEIGHT + h)
        assert np.array_equal(cells[top + LABEL_HEIGHT:top + LABEL_HEIGHT + h, c * w:(c + 1) * w], single)
        band = cells[top:top + LABEL_HEIGHT, c * w:(c + 1) * w]
        assert (band < 128).any() and (band == 255).mean() > 0.5, "the band holds dark text on white"


def test_gitignore_covers_what_the_commands_write(tmp_path):
    written = ["outputs/00000-seed0-K400-v0.7.png", "finetuned/cat.safetensors", "finetuned/cat.resume.safetensors",
               "finetuned/cat.loss.csv", "finetuned/cat.preview-000100.png", "exported/cat.safetensors",
               "pictures/crops.jpg", "replication/seed-1/results.json", "weights/v1-5-pruned-emaonly.safetensors",
               "weights/.hashes.json", "finetuned/cat-000200.safetensors", "finetuned/cat.lock"]
    result = subprocess.run(["git", "-C", REPO, "check-ignore", "--no-index", *written], capture_output=True, text=True)
    assert result.stdout.split() == written, f"not ignored: {sorted(set(written) - set(result.stdout.split()))}"


# ---------------------------------------------------------------------------------------------
# Watching a run: the loss log, previews, the blow-up warning

def loss_log(path):
    with open(path) as f:
        header, *rows = [line.strip().split(",") for line in f if line.strip()]
    assert header == ["step", "t", "loss", "seconds"]
    return rows


@pytest.mark.full
def test_loss_log_and_previews_beside_out_and_previews_change_no_weight(workdir, tmp_path):
    watched = run(workdir, "train.py", "castle.png", PROMPT, "--steps", 3, "--preview-every", 2,
                  "--out", tmp_path / "watched" / "castle.safetensors")
    assert f"smaller than the {TINY.image_size}-pixel crops" in watched.stderr and "upscaled" in watched.stderr
    run(workdir, "train.py", "castle.png", PROMPT, "--steps", 3, "--out", tmp_path / "plain" / "castle.safetensors")

    rows = loss_log(tmp_path / "watched" / "castle.loss.csv")
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert rows[0][1] == "" and float(rows[0][2]) > 0, "step 0: the base model's loss"
    for step, t, loss, seconds in rows[1:]:
        assert 0 <= int(t) < 1000 and float(loss) > 0 and float(seconds) > 0
    previews = sorted(n for n in os.listdir(tmp_path / "watched") if n.endswith(".png"))
    assert previews == ["castle.preview-000002.png", "castle.preview-000003.png"], "every 2 steps and at the end"
    height, width = expected_default_size(SOURCE_SIZE)
    for name in previews:
        with Image.open(tmp_path / "watched" / name) as image:
            assert image.size == (width, height + LABEL_HEIGHT)
    first, last = (pixels(tmp_path / "watched" / name) for name in previews)
    assert not np.array_equal(first[:LABEL_HEIGHT], last[:LABEL_HEIGHT]), "labelled with the step"

    with safe_open(tmp_path / "watched" / "castle.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "plain" / "castle.safetensors", framework="pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), "a preview changed the training"


TOY_BASE = os.path.join(REPO, "weights", "toy-base.safetensors")
TOY_PROMPT = "a plain red [*] on a yellow background"


@pytest.fixture(scope="session")
def toy_scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, "-m", "toy.world", str(folder / "scene.png"), "--seed", "7", "--width", "128"],
                   cwd=REPO, check=True, capture_output=True)
    return folder


class StopAfterOneStep:
    """train.Stop as if SIGTERM came during step 1; installs no signal handler, so pytest keeps Ctrl-C."""

    def __init__(self):
        self.checks = 0

    @property
    def signal(self):
        self.checks += 1  # the loop asks before each step
        return signal.SIGTERM if self.checks > 1 else None


class NeverStop:
    signal = None


@pytest.mark.parametrize("lora", [[], ["--lora", "4"]], ids=["all-weights", "lora"])
def test_stopped_resumed_and_previewed_runs_end_alike(toy_scene, tmp_path, monkeypatch, capsys, lora):
    """The default tier's pass through a stop, --resume and --preview-every, in-process on the toy base
    (the full tier sends real signals to real processes): a run stopped after step 1 and resumed ends
    with every weight of a run never stopped, which drew previews on the way. Also for a LoRA run."""
    import train
    command = [str(toy_scene / "scene.png"), TOY_PROMPT, "--base", TOY_BASE, "--steps", "2", *lora]
    monkeypatch.setattr(train, "Stop", NeverStop)
    train.main(command + ["--out", str(tmp_path / "whole" / "scene.safetensors"), "--preview-every", "2"])
    assert [n for n in os.listdir(tmp_path / "whole") if n.endswith(".png")] == ["scene.preview-000002.png"]

    stopped = command + ["--out", str(tmp_path / "stopped" / "scene.safetensors")]
    monkeypatch.setattr(train, "Stop", StopAfterOneStep)
    with pytest.raises(SystemExit) as exit_info:
        train.main(stopped)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "interrupted at step 1 of 2" in capsys.readouterr().err
    assert (tmp_path / "stopped" / "scene.resume.safetensors").exists()
    monkeypatch.setattr(train, "Stop", NeverStop)
    train.main(stopped + ["--resume", "--no-keep-state"])
    assert not (tmp_path / "stopped" / "scene.resume.safetensors").exists(), "--no-keep-state: the state is gone"

    with safe_open(tmp_path / "whole" / "scene.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "stopped" / "scene.safetensors", framework="pt") as b:
        assert a.metadata()["steps"] == b.metadata()["steps"] == "2"
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert any(a.get_tensor(k).abs().max() > 0 for k in a.keys() if "lora_down" not in k), "it trained"
        assert all(("lora_" in k) == bool(lora) for k in a.keys())
    assert [r[0] for r in loss_log(tmp_path / "stopped" / "scene.loss.csv")] == ["0", "1", "2"]


def weights(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def same_weights(a, b):
    return all(torch.equal(a[1][k], b[1][k]) for k in a[1]) and a[1].keys() == b[1].keys()


def test_a_short_resume_keeps_the_plan_and_a_finished_run_extends(toy_scene, tmp_path, monkeypatch, capsys):
    """A run planned for 3 steps, stopped after 1: `--resume --steps 2` stops at 2 and keeps the state
    and the plan; `--resume` finishes the plan; `--resume --steps 4` extends the finished run. Each
    file is bitwise that of one run straight through, whose --save-every kept numbered checkpoints."""
    import train
    command = [str(toy_scene / "scene.png"), TOY_PROMPT, "--base", TOY_BASE]
    monkeypatch.setattr(train, "Stop", NeverStop)
    whole = tmp_path / "whole" / "scene.safetensors"
    train.main(command + ["--out", str(whole), "--steps", "4", "--save-every", "1"])
    checkpoint = lambda step: whole.parent / f"scene-00000{step}.safetensors"
    assert sorted(n for n in os.listdir(whole.parent) if n.endswith(".safetensors")) == \
        [checkpoint(step).name for step in (1, 2, 3)] + ["scene.resume.safetensors", "scene.safetensors"]

    out = tmp_path / "cut" / "scene.safetensors"
    monkeypatch.setattr(train, "Stop", StopAfterOneStep)
    with pytest.raises(SystemExit):
        train.main(command + ["--out", str(out), "--steps", "3"])
    monkeypatch.setattr(train, "Stop", NeverStop)
    capsys.readouterr()
    train.main(command + ["--out", str(out), "--resume", "--steps", "2"])
    assert "stopped at step 2 of the planned 3" in capsys.readouterr().err
    assert weights(out)[0]["steps"] == "2" and weights(out)[0]["planned_steps"] == "3"
    assert same_weights(weights(out), weights(checkpoint(2)))
    train.main(command + ["--out", str(out), "--resume"])
    assert weights(out)[0]["steps"] == weights(out)[0]["planned_steps"] == "3"
    assert same_weights(weights(out), weights(checkpoint(3)))
    assert "kept the resume state" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        train.main(command + ["--out", str(out), "--resume"])
    assert "has done its 3 steps: extend it with --resume --steps N" in str(refused.value.code)
    train.main(command + ["--out", str(out), "--resume", "--steps", "4"])
    assert weights(out)[0]["steps"] == weights(out)[0]["planned_steps"] == "4"
    assert same_weights(weights(out), weights(whole))
    assert [r[0] for r in loss_log(tmp_path / "cut" / "scene.loss.csv")] == ["0", "1", "2", "3", "4"]

    # a numbered checkpoint is a fine-tuned file like any: edit.py and --from take it
    edit_args = ["--target", "a striped red circle on a yellow background", "--finetuned", str(checkpoint(2)),
                 "--steps", "2", "--out", str(tmp_path / "pngs")]
    capsys.readouterr()
    edit.main(edit_args)
    (png,) = capsys.readouterr().out.split()
    edit.main(["--from", png, "--out", str(tmp_path / "again")])
    (again,) = capsys.readouterr().out.split()
    assert np.array_equal(pixels(png), pixels(again))


def test_nothing_optional_ends_a_run(toy_scene, tmp_path, monkeypatch, capsys):
    """A preview or loss log that cannot be written (here a folder stands where the file goes) is a
    warning: the run goes on and saves. `--out runs/`, a folder not there yet, is made."""
    import train
    monkeypatch.setattr(train, "Stop", NeverStop)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "scene.preview-000002.png").mkdir()
    (runs / "scene.loss.csv").mkdir()
    train.main([str(toy_scene / "scene.png"), TOY_PROMPT, "--base", TOY_BASE, "--steps", "2", "--preview-every", "2",
                "--out", str(runs) + os.sep])
    captured = capsys.readouterr()
    assert captured.out.split() == [str(runs / "scene.safetensors")]
    said = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("warning:")]
    assert len(said) == 2, said
    assert any("preview of step 2" in line for line in said) and any("loss log" in line for line in said), said
    assert weights(runs / "scene.safetensors")[0]["steps"] == "2"

    train.main([str(toy_scene / "scene.png"), TOY_PROMPT, "--base", TOY_BASE, "--steps", "1",
                "--out", str(tmp_path / "new" / "folder") + os.sep, "--seed", "-1"])
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "new" / "folder" / "scene.safetensors")]
    (seed,) = [line.split(": ")[1] for line in captured.err.splitlines() if line.startswith("seed: ")]
    assert weights(tmp_path / "new" / "folder" / "scene.safetensors")[0]["seed"] == seed, "the drawn seed is recorded"


def test_overwrite_replaces_the_earlier_run_only_once_it_saves(toy_scene, tmp_path, monkeypatch, capsys):
    """A diverged --overwrite run leaves the earlier run as it was, loss log included; one that saves
    takes its place, with none of the earlier previews or checkpoints left beside it."""
    import train
    monkeypatch.setattr(train, "Stop", NeverStop)
    out = tmp_path / "scene.safetensors"
    command = [str(toy_scene / "scene.png"), TOY_PROMPT, "--base", TOY_BASE, "--out", str(out)]
    train.main(command + ["--steps", "3", "--preview-every", "3", "--save-every", "2"])
    earlier = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert {"scene.loss.csv", "scene.preview-000003.png", "scene-000002.safetensors"} <= earlier.keys()
    with pytest.raises(SystemExit) as diverged:
        train.main(command + ["--steps", "6", "--lr", "0.5", "--overwrite"])
    assert "diverged" in str(diverged.value.code) and "the earlier run's files are kept" in str(diverged.value.code)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == earlier
    capsys.readouterr()
    train.main(command + ["--steps", "1", "--overwrite"])
    assert "replaced when this run first saves" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["scene.loss.csv", "scene.resume.safetensors", "scene.safetensors"]
    assert [r[0] for r in loss_log(tmp_path / "scene.loss.csv")] == ["0", "1"]


def test_out_of_memory_names_the_flag_that_caused_it():
    import train
    args = train.parse_args(["photo.png", PROMPT, "--batch", "512"])
    hint = train.memory_hint(args, torch.device("cpu"))
    assert "--batch 512" in hint and "lower --batch" in hint and "14.8" not in hint


@pytest.mark.full
def test_edit_and_export_take_the_base_that_a_toy_model_records(toy_scene, tmp_path):
    """The program as cloned (REPO): no --base after train.py; the toy base is found in weights/ by fingerprint."""
    model = tmp_path / "finetuned" / "scene.safetensors"
    run(REPO, "train.py", toy_scene / "scene.png", TOY_PROMPT, "--base", TOY_BASE, "--steps", 2, "--out", model,
        cwd=str(tmp_path))
    edited = run(REPO, "edit.py", "--target", "a striped red circle on a yellow background", "--finetuned", model,
                 "--steps", 2, cwd=str(tmp_path))
    (png,) = printed_paths(edited, str(tmp_path))
    assert parameters(png)["base"] == os.path.join("weights", "toy-base.safetensors")
    exported = run(REPO, "export.py", model, "--out", tmp_path / "exported.safetensors", cwd=str(tmp_path))
    assert printed_paths(exported, str(tmp_path)) == [str(tmp_path / "exported.safetensors")]


@pytest.mark.full
def test_a_blowing_up_loss_warns_once_and_the_run_goes_on(toy_scene, tmp_path):
    """At lr 0.03 AdamW's first steps, which move every weight by about lr, wreck the toy base."""
    out = tmp_path / "hot.safetensors"
    result = run(REPO, "train.py", toy_scene / "scene.png", TOY_PROMPT, "--base", TOY_BASE, "--lr", "0.03",
                 "--steps", 110, "--out", out, "--no-grad-checkpointing", cwd=str(tmp_path))
    warnings = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--lr 0.03" in warnings[0] and "the base model's" in warnings[0], warnings
    assert printed_paths(result, str(tmp_path)) == [str(out)]
    rows = loss_log(tmp_path / "hot.loss.csv")
    assert len(rows) == 111


@pytest.mark.full
def test_the_default_lr_never_warns_on_the_tiny_model(workdir, tmp_path):
    """SD v1's defaults (lr 1e-6) over the 100 steps that the warning's window needs, on a random tiny UNet."""
    out = tmp_path / "calm.safetensors"
    result = run(workdir, "train.py", "castle.png", PROMPT, "--steps", 100, "--out", out)
    assert "warning: the loss" not in result.stderr
    assert len(loss_log(tmp_path / "calm.loss.csv")) == 101
