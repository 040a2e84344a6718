"""Write a fine-tuned model as one complete SD v1 checkpoint, for AUTOMATIC1111, ComfyUI or diffusers.

    python export.py finetuned/cat.safetensors          # -> exported/cat.safetensors, fp16
    python export.py finetuned/cat.safetensors --fp32 --out cat-sine.safetensors

The file holds the base weights plus train.py's differences for the UNet and the text encoder, and
the base's VAE, under the original SD v1 keys. What no other program applies is the position map
(Sec. 3.3): there the model samples without it, as a DreamBooth-like model of the photo, and without
SINE's model-based guidance. Prompt it with the training prompt, `[*]` written as `sks`.
"""
import argparse
import os

import torch

import cli
import sine
from edit import check_base, read_finetuned
from model import load_sd
from model.loader import CONFIG_KEY, PREFIXES, atomic_path, check_sd_v1, fingerprint, write_safetensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export a fine-tuned model as a complete SD v1 .safetensors file.",
                                formatter_class=cli.HelpWithDefaults)
    p.add_argument("finetuned", help="a fine-tuned file from train.py")
    p.add_argument("--base", help="the SD v1 file it was fine-tuned from (default: the file in weights/ with the "
                                  "fingerprint that the fine-tuned file records)")
    p.add_argument("--out", help="default: exported/ and the fine-tuned file's name")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16: half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("exported", os.path.basename(args.finetuned))
    return args


def load(args):
    """Check the arguments, then the fine-tuned model: (model, metadata for the file)."""
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out} exists: pass --overwrite to replace it, or choose --out")
    cli.check_writable_folder(args.out)
    trained = read_finetuned(args.finetuned)
    args.base = cli.base_of(args.finetuned, trained, args.base)
    _, base_metadata = check_sd_v1(args.base)
    check_base(args.finetuned, trained, args.base, fingerprint(args.base))
    metadata = {"sine.exported_from": os.path.basename(args.finetuned), "base": os.path.basename(args.base),
                "training_prompt": sine.training_prompt(trained["prompt"]), "steps": trained["steps"]}
    if CONFIG_KEY in base_metadata:  # a model.tiny base: its sizes go along
        metadata[CONFIG_KEY] = base_metadata[CONFIG_KEY]
    return sine.apply_finetuned(load_sd(args.base), args.finetuned), metadata


def main(argv=None):
    args = parse_args(argv)
    cli.plain_warnings()
    try:
        sd, metadata = load(args)
    except (ValueError, OSError) as e:
        cli.fail(e)
    dtype = torch.float32 if args.fp32 else torch.float16
    weights = {PREFIXES[part] + name: weight for part in PREFIXES  # unet, vae, text_encoder
               for name, weight in getattr(sd, part).state_dict().items()}
    try:
        with atomic_path(args.out) as tmp, open(tmp, "wb") as f:
            write_safetensors(f, {key: w.shape for key, w in weights.items()},
                              (w.to(dtype) for w in weights.values()), metadata, dtype)
    except OSError as e:
        cli.fail(f"could not write {args.out} ({e.strerror or e})")
    print(args.out)


if __name__ == "__main__":
    main()
