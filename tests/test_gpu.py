"""The GPU tier: `python -m pytest --gpu` on a machine with a CUDA GPU (skipped elsewhere). What a
GPU changes: the precision the fine-tuned models keep, the command lines on cuda, and resume."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
from model.tiny import TINY, write_checkpoint
from tests.test_precision import KEEPS, finetuned_file, kept

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a [*] cat"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    write_checkpoint(folder / "tiny.safetensors", TINY, seed=0)
    return folder


@pytest.mark.parametrize("kind", ["trained", "incoherent"])
def test_the_default_keeps_the_finetune_on_this_gpu(folder, kind):
    precision = cli.sampling_precision(torch.device("cuda"))
    result = kept(finetuned_file(folder, kind), precision, "cuda")
    assert result["cosine"] >= KEEPS and 0.9 <= result["norm_ratio"] <= 1.1, (str(precision), result)


def run(folder, script, *args, check=True, stop_when=None):
    """A CLI on cuda; stop_when(): a condition on which to send SIGTERM (train.py then saves and exits)."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=folder,
                               env=dict(os.environ, SINE_DEVICE="cuda"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    while stop_when and process.poll() is None and not stop_when():
        time.sleep(0.02)
    if stop_when and process.poll() is None:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=600)
    assert not check or process.returncode == 0, stderr[-2000:]
    return process.returncode, stdout, stderr


def test_train_resume_and_edit_on_cuda(folder):
    """A run stopped after a save and resumed ends where a straight run ends (to CUDA's reordered
    sums), and edit.py samples with it on the GPU."""
    base, photo = folder / "tiny.safetensors", os.path.join(REPO, "examples", "cat.png")
    common = [photo, PROMPT, "--base", base, "--lr", "1e-4", "--steps", "40", "--save-every", "2"]
    run(folder, "train.py", *common, "--out", "straight.safetensors")
    state = folder / "resumed.resume.safetensors"
    code, _, _ = run(folder, "train.py", *common, "--out", "resumed.safetensors", check=False,
                     stop_when=state.exists)
    assert code == 128 + signal.SIGTERM
    run(folder, "train.py", *common, "--out", "resumed.safetensors", "--resume")
    from safetensors.torch import load_file
    straight, resumed = load_file(folder / "straight.safetensors"), load_file(folder / "resumed.safetensors")
    assert all(torch.allclose(straight[k].float(), resumed[k].float(), atol=1e-6) for k in straight)
    _, stdout, stderr = run(folder, "edit.py", "--finetuned", "straight.safetensors", "--base", base, "--target",
                            "... covered by snow", "--steps", "4", "--out", "pngs")
    assert "on cuda" in stderr and stdout.strip().endswith(".png")
