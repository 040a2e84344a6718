"""What fine-tuning changed must survive the precision edit.py samples in (BENCHMARKS.md, precision).

SINE fine-tunes at lr 1e-6: after SD v1's 10,000 steps the weights have moved by about 1e-4 (RMS),
less than bf16's rounding step for most of them. These tests fine-tune the tiny model, give its
difference SD v1's size, save it as train.py does, load it as edit.py does, and measure the
fine-tuned model's own change to its noise prediction, eps_ft - eps_base, against fp32's. Last,
the kind of device each default is chosen for.
"""
import functools

import pytest
import torch

import cli
import finetuned_file
from model import load_sd
from model.tiny import TINY, write_checkpoint
from tools.precision import compare, fine_tune, noise_prediction, noisy_inputs, trainable

# SD v1's difference against its weights: RMS 1e-4 (10,000 AdamW steps at lr 1e-6, BENCHMARKS.md)
# on UNet matrices of RMS about 0.03 (0.019 in the random full-size checkpoint; real ones are
# larger, which rounds more). The tiny model's weights are 4 times larger than SD v1's, so its
# difference is scaled to the same share of them.
SD_V1_SHARE = 1e-4 / 0.03
KEEPS = 0.95  # the cosine with fp32's change that each default must keep


def rms(tensors):
    return (sum(t.double().square().sum() for t in tensors) / sum(t.numel() for t in tensors)).sqrt().item()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    write_checkpoint(folder / "tiny.safetensors", TINY, seed=0)
    return folder


@functools.cache
def finetuned_pair(folder, kind):
    """(base, fine-tuned file) with a difference of SD v1's share of the weights: trained, in the
    direction of 4 real steps; incoherent, in a random direction, which a layer's output sums
    without a gradient's coherence, so that rounding costs the most (the worst case: the random-walk
    part of a long run's difference)."""
    base = str(folder / "tiny.safetensors")
    sd = load_sd(base)
    start = {name: p.detach().clone() for name, p in trainable(sd).items()}
    if kind == "trained":
        fine_tune(sd, steps=4)
        delta = {name: p.detach() - start[name] for name, p in trainable(sd).items()}
    else:
        g = torch.Generator().manual_seed(0)
        delta = {name: torch.randn(w.shape, generator=g) for name, w in start.items()}
    size = SD_V1_SHARE * rms([w for name, w in start.items() if name.startswith("unet.") and w.dim() > 1])
    scale = size / rms(delta.values())
    with torch.no_grad():
        for name, p in trainable(sd).items():
            p.copy_(start[name] + delta[name] * scale)
    path = str(folder / f"{kind}.safetensors")
    finetuned_file.save_finetuned(path, sd, base, {"prompt": "a photo of a [*] cat", "position_map": True,
                                         "source_size": "128x128", "steps": 4})
    return base, path


@functools.cache
def finetune_change(files, precision, device="cpu"):
    """eps_ft - eps_base as edit.py computes eps_ft in `precision`: the fine-tuned model loaded straight
    into its dtype, called inside the pre-trained UNet's autocast region."""
    base, finetuned = files
    dtype = precision.finetuned
    inputs = noisy_inputs(load_sd(base), latent=8)
    ft = finetuned_file.load_finetuned(base, finetuned, device, dtype)
    outer = cli.autocast_to(torch.device(device), precision.base)
    return (noise_prediction(ft.unet, dtype, inputs, outer, device) -
            noise_prediction(load_sd(base, device, dtype).unet, dtype, inputs, outer, device))


def kept(files, precision, device="cpu"):
    exact = finetune_change(files, cli.Precision(torch.float32, torch.float32))
    return compare(finetune_change(files, precision, device), exact)


def test_the_difference_is_added_before_rounding(folder):
    base, finetuned = finetuned_pair(folder, "incoherent")
    for dtype in (torch.float16, torch.bfloat16):
        loaded = finetuned_file.load_finetuned(base, finetuned, dtype=dtype).unet.input_blocks[1][0].in_layers[2].weight
        exact = finetuned_file.apply_finetuned(load_sd(base), finetuned).unet.input_blocks[1][0].in_layers[2].weight
        assert loaded.dtype == dtype and torch.equal(loaded, exact.to(dtype))


# Every kind of device edit.py chooses a default for: (device type, CUDA capability, native bf16 CPU)
DEVICES = {"A100+": ("cuda", (8, 0), False), "T4/V100": ("cuda", (7, 5), False), "mps": ("mps", None, False),
           "cpu with bf16": ("cpu", None, True), "cpu": ("cpu", None, False)}


@pytest.mark.parametrize("kind", ["trained", "incoherent"])
def test_every_default_keeps_the_finetune(folder, monkeypatch, kind):
    """edit.py's default on each kind of device, computed here on the CPU in the same dtypes."""
    files = finetuned_pair(folder, kind)
    for device, (device_type, capability, native_bf16) in DEVICES.items():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: native_bf16)
        precision = cli.sampling_precision(torch.device(device_type))
        result = kept(files, precision)
        assert result["cosine"] >= KEEPS and 0.9 <= result["norm_ratio"] <= 1.1, (device, str(precision), result)


def test_bf16_would_lose_the_finetune(folder):
    """Why the fine-tuned UNets do not sample in bf16, and what makes the test above able to fail:
    in the worst case bf16 keeps too little of the change."""
    result = kept(finetuned_pair(folder, "incoherent"), cli.Precision(torch.bfloat16, torch.bfloat16))
    assert result["cosine"] < KEEPS, result


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_the_default_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.delenv("SINE_DEVICE")  # which the tests set to cpu (tests/conftest.py)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert cli.pick_device() == torch.device(expected)
    monkeypatch.setenv("SINE_DEVICE", "cpu")  # what the tests run on, whatever the machine has
    assert cli.pick_device() == torch.device("cpu")
