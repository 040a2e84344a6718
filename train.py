"""Fine-tune Stable Diffusion v1 on one photo (SINE, Sec. 3.3).

    python train.py castle.jpg "a photo of a [*] castle"

writes finetuned/castle.safetensors: the difference from the base weights, plus everything
edit.py needs (prompt, position map on or off, image size, which base). `--no-patch` is the
paper's whole-image ablation: 800 steps, no position map.
"""
import argparse
import os
import shlex
import signal
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import cli
import sine
from model import load_sd, read_header
from model.schedule import alphas_cumprod


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SINE patch-based fine-tuning on one image.")
    p.add_argument("image", help="the photo to learn")
    p.add_argument("prompt", help='describes the photo, with [*] before the class: "a photo of a [*] castle"')
    p.add_argument("--no-patch", action="store_true", help="whole-image ablation: no crops, no position map")
    p.add_argument("--base", help="SD v1 .safetensors (default: the one file in weights/)")
    p.add_argument("--out", help="fine-tuned file to write (default: finetuned/<image name>.safetensors)")
    p.add_argument("--steps", type=int, help="default 10000 with patches, 800 with --no-patch")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="every N steps save the weights and a resume state (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the resume state saved beside --out")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward: a lower peak, at little cost (default: on)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="forward and backward in bfloat16 autocast; weights and AdamW state stay fp32 "
                        "(default: on with CUDA, off on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first step is slow)")
    args = p.parse_args(argv)
    args.patch = not args.no_patch
    args.steps = args.steps if args.steps is not None else (10_000 if args.patch else 800)
    base_name = os.path.splitext(os.path.basename(args.image))[0]
    args.out = args.out or os.path.join(cli.FINETUNED_DIR, base_name + ("" if args.patch else "-nopatch") + ".safetensors")
    return args


def resume_path(out):
    return os.path.splitext(out)[0] + ".resume.safetensors"


def check_args(args):
    """Everything a user can get wrong, checked before any weight is loaded."""
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {args.steps})")
    if not 0 < args.lr < float("inf"):  # also refuses nan
        raise ValueError(f"--lr must be a positive number (got {args.lr})")
    if args.save_every < 0:
        raise ValueError(f"--save-every must be 0 or more (got {args.save_every})")
    sine.training_prompt(args.prompt)
    if args.resume and not os.path.exists(resume_path(args.out)):
        raise ValueError(f"--resume: no resume state at {resume_path(args.out)}; train with --save-every N to make one")
    if args.resume:
        read_header(resume_path(args.out))  # a damaged state is refused here, not after the model loads
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a folder: give a file name, "
                         f"e.g. {os.path.join(args.out, 'castle.safetensors')}")
    if os.path.exists(args.out) and not (args.overwrite or args.resume):
        raise ValueError(f"{args.out} exists: pass --overwrite to replace it, or choose another --out")
    cli.check_writable_folder(args.out)


# ---------------------------------------------------------------------------------------------
# Saving: the fine-tuned file (small, for edit.py) and a resume state (exact, for --resume)

def save(args, sd, optimizers, generator, step, image_size, resumable):
    try:
        sine.save_finetuned(args.out, sd, args.base, {
            "prompt": args.prompt, "position_map": args.patch, "source_size": f"{image_size[0]}x{image_size[1]}",
            "steps": step, "seed": args.seed, "lr": args.lr})
        if resumable:  # written last: a resume state on disk means its save completed
            save_resume_state(resume_path(args.out), sd, optimizers, generator, step)
    except OSError as e:
        cli.fail(f"could not save step {step} to {args.out} ({e.strerror or e}); files saved earlier are intact")
    except sine.NonFiniteWeights as e:
        diverged(args, f"at step {step} {e}")
    if not resumable and os.path.exists(resume_path(args.out)):
        os.remove(resume_path(args.out))  # finished: the large resume state is no longer needed


def diverged(args, what):
    """Stop a run whose numbers have become nan or inf, keeping whatever was saved before."""
    kept = f"the last good save, {args.out}, is kept" if os.path.exists(args.out) else "nothing was saved"
    cli.fail(f"training diverged: {what}. Lower --lr (now {args.lr:g})"
             f"{', or train without --bf16' if args.bf16 else ''}; {kept}")


def save_resume_state(path, sd, optimizers, generator, step):
    """Exact fp32 weights, AdamW moments and the RNG: all a bitwise-identical continuation needs."""
    tensors = {"rng": generator.get_state()}
    params = list(trainable_parameters(sd))
    for i, (name, param) in enumerate(params):
        tensors[f"weight.{name}"] = param.detach().cpu()
        state = optimizers[param].state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"{key}.{i}"] = state[key].detach().cpu().reshape(state[key].shape)
    with sine.atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"step": str(step)})


def load_resume_state(path, sd, optimizers, generator):
    params = list(trainable_parameters(sd))
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for i, (name, param) in enumerate(params):
                param.copy_(f.get_tensor(f"weight.{name}"))
                if f"step.{i}" in keys:
                    optimizers[param].state[param] = {k: f.get_tensor(f"{k}.{i}").to(param.device if k != "step" else "cpu")
                                              for k in ("step", "exp_avg", "exp_avg_sq")}
        generator.set_state(f.get_tensor("rng"))
        return int(f.metadata()["step"])


def trainable_parameters(sd):
    for part, module in sine.trainable_parts(sd).items():
        for name, param in module.named_parameters():
            yield f"{part}.{name}", param


# ---------------------------------------------------------------------------------------------

def resume_command(argv):
    """The command line that continues this run: the same arguments, plus --resume."""
    return "python " + shlex.join(["train.py", *[a for a in argv if a not in ("--resume", "--overwrite")], "--resume"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        check_args(args)
        cli.use_huge_pages()
        image = sine.load_image(args.image)
        device = cli.pick_device(args.device)
        args.base = cli.find_base(args.base)
        sd = load_sd(args.base, device=device)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        cli.fail(e)
    cli.say(f"base: {sd.description}")

    for module in sine.trainable_parts(sd).values():
        module.train().requires_grad_(True)
    # Measured on a CPU in fp32 (BENCHMARKS.md): 13.4 GB with checkpointing, 14.6 GB without.
    memory_hint = ("fine-tuning SD v1 needs about 13.5 GB: use a machine or GPU with more memory"
                   if args.grad_checkpointing else "fine-tuning SD v1 needs about 14.6 GB without "
                   "--grad-checkpointing: turn it on, or use a machine or GPU with more memory")
    sd.unet.gradient_checkpointing = args.grad_checkpointing
    optimizers = sine.adamw_in_backward([p for _, p in trainable_parameters(sd)], args.lr, weight_decay=0.01,
                                        fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)  # a CPU generator: the same crops on any device
    canvas = sine.make_canvas(image)
    ids = sd.tokenizer([sine.training_prompt(args.prompt)]).to(device)
    full_map = sine.position_map(sd.config.unet.model_channels).to(device) if args.patch else None
    alphas = alphas_cumprod().to(device)
    autocast = sine.bf16_autocast(device, args.bf16)
    args.bf16 = autocast is not None  # as chosen, for the messages
    sine.speed_up(sd.unet, compile=args.compile)
    start = load_resume_state(resume_path(args.out), sd, optimizers, generator) if args.resume else 0

    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # finish the step, then save
    step = start
    with tqdm(total=args.steps, initial=start, desc="fine-tuning") as bar:  # closed before any error prints
        while step < args.steps and not interrupted:
            try:
                with cli.out_of_memory_hint(memory_hint):
                    loss = sine.training_step(sd, canvas, ids, args.patch, generator, alphas, full_map, autocast)
            except sine.NonFiniteLoss as e:
                diverged(args, f"the loss became {e} at step {step + 1}")
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save(args, sd, optimizers, generator, step, image.size, resumable=True)
    save(args, sd, optimizers, generator, step, image.size, resumable=bool(interrupted))
    if interrupted:
        cli.say(f"interrupted at step {step}, saved {args.out}; continue with: {resume_command(argv)}")
    print(args.out)


if __name__ == "__main__":
    main()
