"""The fine-tuned file: what train.py writes and edit.py and export.py read. Not the method (sine.py).

The authors saved a 12 GB Lightning checkpoint. We store only what changed, w_ft - w_base, for the
UNet and the text encoder in fp16: at lr 1e-6 the weights move by ~1e-4, so fp16 copies of the
whole weights would round the training away, while fp16 *differences* keep it to ~1e-7. A --lora
run stores its adapters alone (model/lora.py). The metadata holds what edit.py needs: the training
prompt, whether the position map was used, the photo's size, and the base by its fingerprint.
"""
import os

import torch

import cli
import sine
from model import lora
from model.loader import (PREFIXES, atomic_path, describe_lora, fingerprint, is_kohya_lora, iter_tensors, load_sd,
                          read_header, write_safetensors)

RESUME_SUFFIX = ".resume.safetensors"  # train.py's resume state, beside the fine-tuned file


class NonFiniteWeights(ArithmeticError):
    """A weight, or its fp16 difference from the base, is nan or inf: nothing is saved."""


def save_finetuned(path, sd, base_path, metadata):
    """Store (w_finetuned - w_base) in fp16 for every trainable weight, reading the base from its file.

    One tensor at a time, read and written: saving needs no second copy of the model. Refuses
    (NonFiniteWeights) to write a file holding nan or inf, so a diverged run never replaces a good save."""
    if any(lora.adapters(module) for module in sine.trainable_parts(sd).values()):
        return save_adapters(path, sd, base_path, metadata)
    weights = {PREFIXES[part] + name: (sd.file_keys[part][name], weight)
               for part, module in sine.trainable_parts(sd).items() for name, weight in module.state_dict().items()}
    base_header = read_header(base_path)

    def deltas():
        base_weights = iter_tensors(base_path, base_header, {key: file_key for key, (file_key, _) in weights.items()})
        for key, base_weight in base_weights:  # fp32, as load_sd read it
            delta = (weights[key][1].detach().float().cpu() - base_weight).half()
            if not torch.isfinite(delta).all():  # nan or inf weights, or a change beyond fp16's 65504
                raise NonFiniteWeights(f"{key} holds nan or inf values")
            yield delta

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, {key: weight.shape for key, (_, weight) in weights.items()}, deltas(),
                          file_metadata(base_path, metadata))


def file_metadata(base_path, metadata):
    return {"sine.finetuned": "1", "base": os.path.basename(base_path), "base_fingerprint": fingerprint(base_path),
            **{k: str(v) for k, v in metadata.items()}}


def save_adapters(path, sd, base_path, metadata):
    """A LoRA run (model/lora.py) stores its adapters alone, in fp32: megabytes, not the 2 GB of deltas."""
    weights = {PREFIXES[part] + f"{name}.{side}.weight": getattr(layer, side).weight.detach().float().cpu()
               for part, module in sine.trainable_parts(sd).items() for name, layer in lora.adapters(module).items()
               for side in ("lora_down", "lora_up")}
    for key, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise NonFiniteWeights(f"{key} holds nan or inf values")
    layer = next(iter(lora.adapters(sd.unet).values()))
    rank = layer.lora_down.weight.shape[0]
    metadata = file_metadata(base_path, {**metadata, "lora_rank": rank, "lora_alpha": layer.lora_scale * rank})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, {key: w.shape for key, w in weights.items()}, iter(weights.values()), metadata,
                          torch.float32)


def finetuned_weights(path):
    """adjust(part, name, w_base) -> w_finetuned for model.load_sd: the base weight plus this file's
    difference (or its merged adapters), in fp32, before any rounding to a sampling precision.

    bf16 rounds a weight of 0.03 in steps of 1.2e-4, about what 10,000 steps at lr 1e-6 move it:
    rounding the whole fine-tuned weight would round much of the fine-tune away, so the difference
    is added first, and the caller chooses a precision that keeps it (BENCHMARKS.md, precision)."""
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    read = lambda key: read_finite(next(iter_tensors(path, header, {key: key}))[1], key, path)
    if "lora_alpha" not in metadata:
        return lambda part, name, weight: weight + read(PREFIXES[part] + name)
    alpha, suffix = float(metadata["lora_alpha"]), ".lora_down.weight"
    adapted = {key[:-len(suffix)] for key in header if key.endswith(suffix)}

    def merged(part, name, weight):  # W + (alpha / rank) B A, for the layers that have adapters
        layer = PREFIXES[part] + name.removesuffix(".weight")
        if not name.endswith(".weight") or layer not in adapted:
            return weight
        down, up = read(layer + suffix), read(layer + ".lora_up.weight")
        return weight + lora.delta(up, down, alpha / down.shape[0], weight.shape)

    return merged


def read_finite(tensor, key, path):
    """A diverged run's nan or inf is refused with what to do."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path} holds nan or inf values ({key}): its training diverged; fine-tune again "
                         "with a lower --lr")
    return tensor


def load_finetuned(base_path, path, device="cpu", dtype=torch.float32, shared_vae=None):
    """The fine-tuned model: the base's weights plus the file's, each rounded to dtype only once added."""
    return load_sd(base_path, device, dtype, adjust=finetuned_weights(path), shared_vae=shared_vae)


def apply_finetuned(sd, path):
    """Add a fine-tuned file's differences, or its merged adapters, onto sd's fp32 UNet and text encoder, in place."""
    adjust = finetuned_weights(path)
    with torch.no_grad():
        for part, module in sine.trainable_parts(sd).items():
            for name, weight in module.state_dict().items():
                weight.copy_(adjust(part, name, weight.float()))
    return sd


def read_metadata(path):
    """A fine-tuned file's metadata, after checking that it is one; one line if it is something else."""
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    if path.endswith(RESUME_SUFFIX):
        raise ValueError(f"{path} is train.py's resume state; pass the fine-tuned file beside it, "
                         f"{path[:-len(RESUME_SUFFIX)]}.safetensors")
    if "sine.finetuned" not in metadata:
        if is_kohya_lora(header):
            raise ValueError(f"{path} is {describe_lora(metadata)}")
        if "sine.exported_from" in metadata:
            raise ValueError(f"{path} is a whole checkpoint that export.py made from {metadata['sine.exported_from']} "
                             "for other programs: pass that file, the one train.py wrote, as --finetuned")
        raise ValueError(f"{path} is not a fine-tuned file from train.py (it looks like a base checkpoint: "
                         "pass it as --base)")
    if int(metadata.get("steps", 0)) < int(metadata.get("planned_steps", 0)):
        cli.say(f"note: {path} is unfinished, trained for {metadata['steps']} of {metadata['planned_steps']} "
                "steps (train.py --resume continues it); using it anyway")
    return metadata


def check_base(path, metadata, base, base_fingerprint):
    """A fine-tuned file applies only to the base it was made from."""
    if metadata.get("base_fingerprint") != base_fingerprint:
        raise ValueError(f"{path} was fine-tuned from {metadata.get('base')} (fingerprint "
                         f"{metadata.get('base_fingerprint')}), not from {base}: pass that file as --base")
