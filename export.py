"""Write a fine-tuned model as one complete SD v1 checkpoint, for AUTOMATIC1111, ComfyUI or diffusers.

    python export.py finetuned/cat.safetensors          # -> exported/cat.safetensors, fp16
    python export.py finetuned/cat.safetensors --fp32 --out cat-sine.safetensors

The file holds the base weights plus train.py's differences for the UNet and the text encoder, and
the base's VAE, under the original SD v1 keys. What no other program applies is the position map
(Sec. 3.3): there the model samples without it, as a DreamBooth-like model of the photo, and without
SINE's model-based guidance. Prompt it with the training prompt, `[*]` written as `sks`.

    python export.py finetuned/cat.safetensors --lora   # a train.py --lora file -> kohya's LoRA layout

writes the adapters alone, under the names that kohya's scripts give them (diffusers' module paths:
lora_unet_down_blocks_0_attentions_0_..., lora_te_text_model_...), with .lora_down, .lora_up and
.alpha: AUTOMATIC1111, ComfyUI and diffusers load such a file onto their own SD v1 base.
"""
import argparse
import json
import os

import torch
from safetensors import safe_open

import cli
import finetuned_file
import sine
from model import load_sd
from model.loader import CONFIG_KEY, PREFIXES, atomic_path, check_sd_v1, fingerprint, read_config, write_safetensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export a fine-tuned model as a complete SD v1 .safetensors file.",
                                formatter_class=cli.HelpWithDefaults)
    p.add_argument("finetuned", help="a fine-tuned file from train.py")
    p.add_argument("--base", help="the SD v1 file it was fine-tuned from (default: the file in weights/ with the "
                                  "fingerprint that the fine-tuned file records)")
    p.add_argument("--out", help="default: exported/ and the fine-tuned file's name")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16: half the size)")
    p.add_argument("--lora", action="store_true", help="a train.py --lora file: write its adapters alone, in "
                                                       "kohya's layout, not a whole checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("exported", os.path.basename(args.finetuned))
    return args


def load(args):
    """Check the arguments and the fine-tuned file; returns the exported file's metadata."""
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out} exists: pass --overwrite to replace it, or choose --out")
    cli.check_writable_folder(args.out)
    trained = finetuned_file.read_metadata(args.finetuned)
    if args.lora and "lora_alpha" not in trained:
        raise ValueError(f"{args.finetuned} is a full fine-tune, not a train.py --lora file: export it without --lora")
    args.base = cli.base_of(args.finetuned, trained, args.base)
    _, base_metadata = check_sd_v1(args.base)
    finetuned_file.check_base(args.finetuned, trained, args.base, fingerprint(args.base))
    metadata = {"sine.exported_from": os.path.basename(args.finetuned), "base": os.path.basename(args.base),
                "training_prompt": sine.training_prompt(trained["prompt"]), "steps": trained["steps"]}
    if args.lora:  # kohya's own metadata names: AUTOMATIC1111 offers the tags as activation text, and
        # files the LoRA under SD v1 by its base's version
        caption = sine.training_prompt(trained["prompt"])
        metadata.update(ss_network_dim=trained["lora_rank"], ss_network_alpha=trained["lora_alpha"],
                        ss_network_module="networks.lora", ss_base_model_version="sd_v1", ss_v2="False",
                        ss_sd_model_name=os.path.basename(args.base), ss_steps=trained["steps"],
                        ss_output_name=os.path.splitext(os.path.basename(args.out))[0],
                        ss_tag_frequency=json.dumps({"sine": {sine.IDENTIFIER: 1, caption: 1}}))
    elif CONFIG_KEY in base_metadata:  # a model.tiny base: its sizes go along
        metadata[CONFIG_KEY] = base_metadata[CONFIG_KEY]
    return metadata


def whole_checkpoint(args):
    """The base with the fine-tuned file applied, every weight under its SD v1 key."""
    sd = finetuned_file.apply_finetuned(load_sd(args.base), args.finetuned)
    return {PREFIXES[part] + name: weight for part in PREFIXES  # unet, vae, text_encoder
            for name, weight in getattr(sd, part).state_dict().items()}


# ---------------------------------------------------------------------------------------------
# --lora: our layer names (SD v1's checkpoint keys) -> kohya's, which are diffusers' module paths

RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_path(name, num_res_blocks):
    """Our module path -> diffusers', e.g. input_blocks.1.1.transformer_blocks.0.attn1.to_q ->
    down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q. Covers the layers that train.py --lora
    adapts: attention, ResBlock convolutions and conv_in."""
    if name == "input_blocks.0.0":
        return "conv_in"
    block, *numbers = name.split(".")
    if block == "middle_block":
        j, inner = int(numbers[0]), numbers[1:]
        where = "mid_block." + ("attentions.0" if j == 1 else f"resnets.{j // 2}")
    else:
        i, j, inner = int(numbers[0]), int(numbers[1]), numbers[2:]
        # down: each level is num_res_blocks blocks and a Downsample, after input_blocks.0 (conv_in);
        # up: num_res_blocks + 1 blocks, deepest level first.
        down = block == "input_blocks"
        level, k = divmod(i - 1 if down else i, num_res_blocks + 1)
        where = f"{'down' if down else 'up'}_blocks.{level}.{'resnets' if j == 0 else 'attentions'}.{k}"
    inner = ".".join(inner)
    return f"{where}.{RESNET.get(inner, inner)}"


def kohya_adapters(path, base, dtype):
    """{kohya key: tensor} of a LoRA fine-tuned file, alpha included."""
    num_res_blocks = read_config(base).unet.num_res_blocks
    names = {"unet": lambda name: "lora_unet_" + diffusers_path(name, num_res_blocks),
             "text_encoder": lambda name: "lora_te_text_model_" + name}
    weights = {}
    with safe_open(path, framework="pt") as f:
        alpha = torch.tensor(float(f.metadata()["lora_alpha"]), dtype=dtype)
        for key in f.keys():
            part = next(part for part, prefix in PREFIXES.items() if key.startswith(prefix))
            layer, side, _ = key[len(PREFIXES[part]):].rsplit(".", 2)  # ..., lora_down or lora_up, weight
            kohya = names[part](layer).replace(".", "_")
            weights[f"{kohya}.{side}.weight"] = f.get_tensor(key).to(dtype)
            weights[f"{kohya}.alpha"] = alpha  # one per layer, as kohya's files have it
    return weights


def main(argv=None):
    args = parse_args(argv)
    cli.plain_warnings()
    dtype = torch.float32 if args.fp32 else torch.float16
    try:
        metadata = load(args)
        weights = kohya_adapters(args.finetuned, args.base, dtype) if args.lora else whole_checkpoint(args)
    except (ValueError, OSError) as e:
        cli.fail(e)
    try:
        with atomic_path(args.out) as tmp, open(tmp, "wb") as f:
            write_safetensors(f, {key: w.shape for key, w in weights.items()},
                              (w.to(dtype) for w in weights.values()), metadata, dtype)
    except OSError as e:
        cli.fail(f"could not write {args.out} ({e.strerror or e})")
    print(args.out)


if __name__ == "__main__":
    main()
