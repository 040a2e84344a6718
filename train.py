"""Fine-tune Stable Diffusion v1 on one photo (SINE, Sec. 3.3).

    python train.py castle.jpg "a photo of a [*] castle"

writes finetuned/castle.safetensors: the difference from the base weights, plus everything
edit.py needs (prompt, position map on or off, image size, which base). `--no-patch` is the
paper's whole-image ablation: 800 steps, no position map.
"""
import argparse
import csv
import hashlib
import json
import os
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

import cli
import edit
import sine
from model import load_sd, lora, read_header
from model.ddim import sample, text_to_image_eps
from model.loader import CheckpointError, atomic_path, fingerprint, iter_tensors, write_safetensors
from model.schedule import NUM_TRAIN_TIMESTEPS, alphas_cumprod


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SINE patch-based fine-tuning on one image.",
                                formatter_class=cli.HelpWithDefaults)
    p.add_argument("image", help="the photo to learn")
    p.add_argument("prompt", help='describes the photo, with [*] before the class: "a photo of a [*] castle"')
    p.add_argument("--no-patch", action="store_true", help="whole-image ablation: no crops, no position map")
    p.add_argument("--base", help="SD v1 .safetensors (default: the one SD v1 file in weights/)")
    p.add_argument("--out", help="fine-tuned file to write (default: finetuned/<image name>.safetensors)")
    p.add_argument("--steps", type=int, help="default 10000 with patches, 800 with --no-patch; "
                                             "with --resume, the run's own (a larger number extends it)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW's learning rate (the paper's; with --lora, 1e-4 "
                                                          "unless given, common DreamBooth-LoRA practice)")
    p.add_argument("--batch", type=int, default=1, help="crops a step (the paper's: 1); each costs memory")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train low-rank adapters of this rank (e.g. 8) on frozen weights, not every weight: far less "
                        "memory, and a file of megabytes (0: the paper's full fine-tune)")
    p.add_argument("--lora-convs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --lora, also adapt the convolutions around the position map's entry, not only attention")
    p.add_argument("--seed", type=int, default=0, help="draws the crops, timesteps, noise and adapters' start")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="every N steps save the weights and a resume state (0: only at the end)")
    p.add_argument("--preview-every", type=int, default=0, metavar="N",
                   help="every N steps and at the end, save a PNG beside --out of what the model draws alone "
                        "from its training prompt (seed 0, 25 DDIM steps, the photo's aspect); each costs about "
                        "as much as 10 training steps on the toy base, 15 at SD v1's size (0: no previews)")
    p.add_argument("--resume", action="store_true", help="continue from the resume state saved beside --out")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: $SINE_DEVICE if set, else cuda, else mps, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward: a lower peak, at little cost (default: on for SD v1; "
                        "off for a small base such as the toy, which fits anyway and whose steps it slows by a "
                        "third or more)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="forward and backward in bfloat16 autocast; weights and AdamW state stay fp32 "
                        "(default: on with a GPU of compute capability 8.0 or newer, off elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first step is slow)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for the --resume command we offer
    args.patch = not args.no_patch
    if args.lora > 0 and not any(a == "--lr" or a.startswith("--lr=") for a in args.argv):
        args.lr = 1e-4
    base_name = os.path.splitext(os.path.basename(args.image))[0]
    args.out = args.out or os.path.join(cli.FINETUNED_DIR, base_name + ("" if args.patch else "-nopatch") + ".safetensors")
    return args


def resume_path(out):
    return os.path.splitext(out)[0] + ".resume.safetensors"


def check_args(args):
    """Everything a user can get wrong, checked before any weight is loaded."""
    if sine.PLACEHOLDER in args.image or (not os.path.exists(args.image) and os.path.isfile(args.prompt)):
        raise ValueError(f'the photo comes first and the prompt second: train.py {shlex.quote(args.prompt)} '
                         f'"{args.image}"')
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {args.steps})")
    if args.lora < 0:
        raise ValueError(f"--lora must be a rank of 1 or more, or 0 for the full fine-tune (got {args.lora})")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1 (got {args.batch})")
    if not 0 < args.lr < float("inf"):  # also refuses nan
        raise ValueError(f"--lr must be a positive number (got {args.lr})")
    for flag, value in (("--save-every", args.save_every), ("--preview-every", args.preview_every)):
        if value < 0:
            raise ValueError(f"{flag} must be 0 or more (got {value})")
    cli.check_seed(args.seed)
    sine.training_prompt(args.prompt)
    if args.resume and not os.path.exists(resume_path(args.out)):
        raise ValueError(f"--resume: no resume state at {resume_path(args.out)}; train with --save-every N to make one")
    if args.resume:
        read_header(resume_path(args.out))  # a damaged state is refused here, not after the model loads
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a folder: give a file name, "
                         f"e.g. {os.path.join(args.out, 'castle.safetensors')}")
    args.unfinished = unfinished(args.out)
    if args.unfinished and not (args.overwrite or args.resume):
        raise ValueError(f"{args.out} is an unfinished run (saved at {args.unfinished}): pass --overwrite to start "
                         f"over, which deletes its resume state, or continue it with: {resume_command(args.argv)}")
    if os.path.exists(args.out) and not (args.overwrite or args.resume):
        raise ValueError(f"{args.out} exists: pass --overwrite to replace it, or choose another --out")
    cli.check_writable_folder(args.out)


def unfinished(out):
    """'step 5 of 1000' if a resume state lies beside out, else None."""
    if not os.path.exists(resume_path(out)):
        return None
    try:
        metadata = read_header(resume_path(out)).get("__metadata__") or {}
    except CheckpointError:  # damaged: --overwrite must still be able to start over
        metadata = {}
    return f"step {metadata.get('step', '?')} of {metadata.get('planned_steps', '?')}"


# ---------------------------------------------------------------------------------------------
# Resuming: the same run, or a refusal that names what differs

def run_identity(args, image):
    """Every argument that shapes the run's numbers; the photo by its pixels, the base by its contents."""
    return {"photo": hashlib.sha256(image.tobytes()).hexdigest()[:16] + f" {image.width}x{image.height}",
            "prompt": args.prompt, "patch": args.patch, "lr": args.lr, "batch": args.batch, "seed": args.seed,
            "lora": args.lora, "lora_convs": bool(args.lora and args.lora_convs), "base": fingerprint(args.base)}


SHAPING = {"photo": "the photo", "prompt": "the prompt", "patch": "patch-based training", "lr": "--lr",
           "batch": "--batch", "seed": "--seed", "lora": "--lora", "lora_convs": "--lora-convs", "base": "--base"}


def check_resume(args, image):
    """--resume continues the saved run only with its own arguments; set args.steps to the plan."""
    metadata = read_header(resume_path(args.out)).get("__metadata__") or {}
    if "run" not in metadata:
        raise ValueError(f"{resume_path(args.out)} was saved by an older version of train.py and cannot be "
                         "checked: start a new run")
    saved, now, done = json.loads(metadata["run"]), run_identity(args, image), int(metadata["step"])
    for key, default in (("batch", 1), ("lora", 0), ("lora_convs", False)):  # saved before these flags existed
        saved.setdefault(key, default)
    shown = lambda key, value: ("on" if value else "off") if isinstance(value, bool) else repr(value)
    differ = [f"{name} is not the one it started with" if key in ("photo", "base") else
              f"{name} {shown(key, now[key])} (saved: {shown(key, saved.get(key))})"
              for key, name in SHAPING.items() if now[key] != saved.get(key)]
    if differ:
        raise ValueError(f"--resume continues a run started with other arguments: {'; '.join(differ)}. "
                         "Resume with the saved ones, or start a new run with another --out")
    if args.steps is not None and args.steps < done:
        raise ValueError(f"--steps {args.steps} is below the {done} steps this run has done: give more, or leave "
                         f"--steps out to finish its plan of {metadata['planned_steps']}")
    args.steps = args.steps or int(metadata["planned_steps"])


# ---------------------------------------------------------------------------------------------
# Saving: the fine-tuned file (small, for edit.py) and a resume state (exact, for --resume)

def save(args, sd, optimizers, generator, step, image, resumable, loss_before):
    sizes = sine.sizes_for(sd.config)
    run = run_identity(args, image)
    try:
        sine.save_finetuned(args.out, sd, args.base, {
            "prompt": args.prompt, "position_map": args.patch, "source_size": f"{image.width}x{image.height}",
            "photo": run["photo"], "canvas": sizes.canvas, "crop": sizes.crop,
            "steps": step, "planned_steps": args.steps, "seed": args.seed, "lr": args.lr,
            "batch": args.batch})
        if resumable:  # written last: a resume state on disk means its save completed
            save_resume_state(resume_path(args.out), sd, optimizers, generator, {
                "step": str(step), "planned_steps": str(args.steps), "run": json.dumps(run),
                "base_loss": repr(loss_before)})
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


def save_resume_state(path, sd, optimizers, generator, metadata):
    """Exact fp32 weights, AdamW moments and the RNG: all a bitwise-identical continuation needs.

    Written one tensor at a time, each copied from the device only when its turn comes: host RAM
    never holds a second copy of the model and its moments (12 GB for SD v1)."""
    tensors = {"rng": generator.get_state()}  # still on the device, all but the RNG's state
    for i, (name, param) in enumerate(trainable_parameters(sd)):
        tensors[f"weight.{name}"] = param.detach()
        state = optimizers[param].state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"{key}.{i}"] = state[key].detach()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, {key: t.shape for key, t in tensors.items()}, (t.cpu() for t in tensors.values()),
                          metadata, {key: t.dtype for key, t in tensors.items()})


def load_resume_state(path, sd, optimizers, generator):
    """The saved run's weights, AdamW state and RNG, read one tensor at a time (no memory-mapped file);
    returns (step, the base's loss that the blow-up warning measures against)."""
    header = read_header(path)
    params = dict(trainable_parameters(sd))
    numbered = list(params.values())
    with torch.no_grad():
        for key, tensor in iter_tensors(path, header, {k: k for k in header if k != "__metadata__"}, dtype=None):
            kind, _, name = key.partition(".")
            if kind == "rng":
                generator.set_state(tensor)
            elif kind == "weight":
                params[name].copy_(tensor)
            else:  # exp_avg.i, exp_avg_sq.i, step.i: AdamW's state of parameter i
                param = numbered[int(name)]  # fused AdamW (train.py's) keeps even its step count on the device
                optimizers[param].state[param][kind] = tensor.to(param.device)
    return int(header["__metadata__"]["step"]), float(header["__metadata__"].get("base_loss", "nan"))


def trainable_parameters(sd):
    """(name, parameter) of what learns: every weight of the UNet and text encoder, or with --lora their adapters."""
    for part, module in sine.trainable_parts(sd).items():
        for name, param in module.named_parameters():
            if param.requires_grad:
                yield f"{part}.{name}", param


# ---------------------------------------------------------------------------------------------
# Watching a run: every step's loss in a CSV file, previews, and a warning if the loss blows up

def log_path(out):
    return os.path.splitext(out)[0] + ".loss.csv"


def preview_path(out, step):
    return os.path.splitext(out)[0] + f".preview-{step:06d}.png"


@torch.no_grad()
def base_loss(sd, canvas, ids, patch, full_map, alphas, autocast, sizes, n=16):
    """The model's median loss before any step, on n crops at evenly spaced t: the yardstick of the
    blow-up warning. Its own random draws, so the run's crops and noise are those of a run without it.
    (The loss of the first 100 steps would not do: a too high lr wrecks the model in AdamW's first
    few steps, which move every weight by about lr.)"""
    generator = torch.Generator().manual_seed(0)
    context = sd.text_encoder(ids)
    losses = []
    for i in range(n):
        example = sine.sample_example(sd.vae, canvas, patch, generator, full_map, sizes)
        t = torch.tensor([(2 * i + 1) * NUM_TRAIN_TIMESTEPS // (2 * n)], device=example.z0.device)
        noise = torch.randn(example.z0.shape, generator=generator).to(example.z0)
        with autocast or torch.autocast(example.z0.device.type, enabled=False):
            losses.append(sine.training_loss(sd.unet, example.z0, context, t, noise, alphas, example.position,
                                             recon_weight=1.0 if patch else 0.0).item())
    return statistics.median(losses)


BLOW_UP = 5      # the median loss of the last WINDOW steps, against the base's, above which we warn
WINDOW = 100


def blown_up(losses, base):
    """Measured through train.py on the toy base: at the lrs the toy uses (5e-5 to 2e-4) the median of
    100 steps stayed at 0.3-1.5x the base's loss; at lr 1e-3, still learning, 2-3.8x; at lr 0.03,
    wrecked, 25-117x. 5x lies between."""
    return len(losses) >= WINDOW and statistics.median(losses[-WINDOW:]) > BLOW_UP * base


@torch.no_grad()
def preview(sd, prompt, patch, source_size, autocast, steps=25, scale=7.5, seed=0):
    """What the fine-tuned model draws by itself from its training prompt, at the photo's aspect, with
    its whole position map: a DreamBooth-style validation image, with SINE's layout."""
    config, device = sd.config, next(sd.unet.parameters()).device
    height, width = edit.default_size(source_size, None, None, config.image_size, edit.size_step(config))
    latent_size = (height // config.vae.factor, width // config.vae.factor)
    context = sd.text_encoder(sd.tokenizer([sine.training_prompt(prompt), ""]).to(device))  # (2, 77, 768)
    position = (sine.full_position_map(config.unet.model_channels, latent_size, device, sine.sizes_for(config))
                if patch else None)
    noise = torch.randn((1, 4, *latent_size), generator=torch.Generator().manual_seed(seed)).to(device)
    with autocast or torch.autocast(device.type, enabled=False):
        latents = sample(text_to_image_eps(sd.unet, context[:1], context[1:], scale, position), noise, steps,
                         progress=False)
    return edit.decode(sd, latents)


class Watch:
    """After each step: a row of the loss log, a preview every --preview-every steps, and one warning
    line if the loss blows up. The log is written from the first step done on (a run that fails at
    once leaves nothing); on --resume it keeps its rows up to the resumed step."""

    def __init__(self, args, step, base):
        self.args, self.base, self.warned, self.file = args, base, False, None
        self.rows = read_log(log_path(args.out), step) if args.resume else []
        if not self.rows:  # step 0: the base model's loss, which the warning measures against
            self.rows = [{"step": 0, "t": "", "loss": f"{base:.6g}", "seconds": ""}]
        self.losses = [float(row["loss"]) for row in self.rows if str(row["step"]) != "0"]

    def after_step(self, step, t, loss, seconds, sd, image, autocast):
        if self.file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            self.file = open(log_path(self.args.out), "w")
            self.file.write("step,t,loss,seconds\n" + "".join(f"{r['step']},{r['t']},{r['loss']},{r['seconds']}\n"
                                                             for r in self.rows))
        self.file.write(f"{step},{' '.join(map(str, t))},{loss:.6g},{seconds:.3f}\n")  # t: one per crop
        self.file.flush()
        self.losses.append(loss)
        if not self.warned and blown_up(self.losses, self.base):
            self.warned = True
            tqdm.write(f"warning: the loss has grown from {self.base:.3g} (the base model's) to "
                       f"{statistics.median(self.losses[-WINDOW:]):.3g} (median of the last {WINDOW} steps): "
                       f"--lr {self.args.lr:g} is likely too high; the run goes on", file=sys.stderr)
        if self.args.preview_every and (step % self.args.preview_every == 0 or step == self.args.steps):
            picture = preview(sd, self.args.prompt, self.args.patch, image.size, autocast)
            edit.grid_image({(0, 0): (picture, f"step {step}")}, 1, 1).save(preview_path(self.args.out, step))


def read_log(path, up_to):
    """The loss log's rows up to step up_to; rows after it (a run killed after its last save) are dropped."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [row for row in rows if row.get("seconds") is not None and int(row["step"]) <= up_to]


# ---------------------------------------------------------------------------------------------

def resume_command(argv):
    """The command line that continues this run: the same arguments, plus --resume."""
    return "python " + shlex.join(["train.py", *[a for a in argv if a not in ("--resume", "--overwrite")], "--resume"])


class Stop:
    """Ctrl-C or SIGTERM (docker stop, Slurm, a preempted cloud machine): finish the current step,
    save, and exit with 130 or 143, as shells expect, so that `train.py ... && edit.py ...` stops.
    A second Ctrl-C stops at once; the last save stays."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, then saving "
                   "(Ctrl-C again stops at once)", file=sys.stderr)


def memory_hint(args, device):
    # Measured on a CPU in fp32 (BENCHMARKS.md), train.py's whole process: 13.7 GB with checkpointing,
    # 14.8 GB without; with --lora 8, 5.8 GB. On a GPU, worked out from the sizes, not yet measured:
    # about 13 GB, and 5.3 GB with --lora 8.
    if device.type != "cpu":
        return ("fine-tuning SD v1 needs about 5.3 GB of GPU memory with --lora, about 13 GB without (estimated, "
                "BENCHMARKS.md)" + ("" if args.lora else ": try --lora 8") + "; or train on the CPU (--device cpu)")
    if args.lora:
        return "fine-tuning SD v1 with --lora needs about 5.8 GB: use a machine or GPU with more memory"
    if args.grad_checkpointing:
        return ("fine-tuning SD v1 needs about 13.7 GB: try --lora 8 (about 5.8 GB), or use a machine or GPU with "
                "more memory")
    return ("fine-tuning SD v1 needs about 14.8 GB without --grad-checkpointing: turn it on, or try --lora 8, or use a "
            "machine or GPU with more memory")


def load(args):
    """Check every argument, then load the base: (photo, device, model)."""
    check_args(args)
    cli.use_huge_pages()
    image = cli.load_image(args.image)
    device = cli.pick_device(args.device)
    args.base = cli.find_base(args.base)
    if args.resume:
        check_resume(args, image)
    args.steps = args.steps or (10_000 if args.patch else 800)
    sd = load_sd(args.base, device=device)
    crop = sine.sizes_for(sd.config).crop
    if min(image.size) < crop:
        cli.say(f"warning: {args.image} is {image.width}x{image.height}, smaller than the {crop}-pixel crops "
                "that fine-tuning sees: it will be upscaled, and the model learns its blur; use a larger photo "
                "if there is one")
    return image, device, sd


def start_over(args):
    """--overwrite on an unfinished run: its resume state goes, said in one line."""
    if args.unfinished and not args.resume:
        os.remove(resume_path(args.out))
        cli.say(f"--overwrite: starting over; deleted the resume state of the unfinished run (it was at "
                f"{args.unfinished})")


@dataclass
class Run:
    """What the training loop needs, set up fresh or from a resume state."""
    canvas: Image.Image            # the photo on the square canvas that crops are cut from
    ids: torch.Tensor              # (1, 77) the training prompt's tokens
    full_map: torch.Tensor | None  # the whole position map, None with --no-patch
    alphas: torch.Tensor           # the noise schedule
    sizes: sine.Sizes
    autocast: object               # bf16 autocast, or None for fp32
    optimizers: dict               # {parameter: its AdamW}, for the resume state
    after_backward: object         # one AdamW over every parameter, stepped after backward; None: they step during it
    generator: torch.Generator     # crops, timesteps and noise
    step: int                      # steps already done
    loss_before: float             # the base model's loss: the blow-up warning's yardstick


# SD v1 needs its memory savers (gradient checkpointing, AdamW in backward); a small model, such as
# the toy (toy/), fits anyway and would only pay their time. Small: at most this many bytes of fp32
# weights (the toy's UNet and text encoder: 33 MB; SD v1's: 3.9 GB; its rank-8 LoRA adapters: 9 MB).
SMALL = 256 * 2**20


def small(params):
    return 4 * sum(p.numel() for p in params) <= SMALL


def make_optimizers(params, lr, room=0):
    """({parameter: its AdamW}, the one AdamW to step after backward, or None if they step during it).

    Large gradients are freed one by one during backward (sine.adamw_in_backward). Small ones, or
    any that fit in `room` (bytes of a GPU's memory to spare), are kept for one AdamW over all of
    them after backward: the same arithmetic, bitwise, without an optimizer call for each of
    hundreds of parameters, which made a toy step on a CPU 20-30% slower (BENCHMARKS.md) and would
    bind a GPU's step to Python. fused: one kernel, not a dozen, for each update: a toy step a
    quarter faster."""
    if not small(params) and 4 * sum(p.numel() for p in params) > room:
        return sine.adamw_in_backward(params, lr, weight_decay=0.01, fused=True), None
    after_backward = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    return dict.fromkeys(params, after_backward), after_backward


def room_for_gradients(device, params):
    """Bytes of GPU memory left for a whole set of gradients once AdamW's moments (8 bytes a weight)
    and 3 GB for activations are set aside: enough for SD v1's 3.9 GB on a 24 GB card, not on 16 GB."""
    if device.type != "cuda":
        return 0
    return torch.cuda.mem_get_info(device)[0] - 8 * sum(p.numel() for p in params) - 3 * 2**30


def prepare(args, sd, image, device):
    """Models set to train, the optimizer, the canvas and the map; the resume state if asked."""
    for module in sine.trainable_parts(sd).values():
        module.train().requires_grad_(True)
    if args.lora:  # the base weights stay frozen
        lora.adapt(sd, args.lora, args.lora_convs, generator=torch.Generator().manual_seed(args.seed))
    params = [p for _, p in trainable_parameters(sd)]
    optimizers, after_backward = make_optimizers(params, args.lr, room_for_gradients(device, params))
    if args.grad_checkpointing is None:
        args.grad_checkpointing = not small(sd.unet.parameters())
    sd.unet.gradient_checkpointing = args.grad_checkpointing
    generator = torch.Generator().manual_seed(args.seed)  # a CPU generator: the same crops on any device
    sizes = sine.sizes_for(sd.config)
    canvas = sine.make_canvas(image, sizes)
    ids = sd.tokenizer([sine.training_prompt(args.prompt)]).to(device)
    full_map = sine.position_map(sd.config.unet.model_channels, sizes=sizes).to(device) if args.patch else None
    alphas = alphas_cumprod().to(device)
    autocast = cli.bf16_autocast(device, args.bf16, cache=not args.grad_checkpointing)
    args.bf16 = autocast is not None  # as chosen, for the messages
    cli.say(f"precision: {'bf16 autocast, fp32 weights' if autocast else 'fp32'} on {device}")
    cli.speed_up(sd.unet, compile=args.compile)
    if args.resume:
        step, loss_before = load_resume_state(resume_path(args.out), sd, optimizers, generator)
    else:
        start_over(args)
        step, loss_before = 0, base_loss(sd, canvas, ids, args.patch, full_map, alphas, autocast, sizes)
    return Run(canvas, ids, full_map, alphas, sizes, autocast, optimizers, after_backward, generator, step,
               loss_before)


def take_step(args, sd, run, step):
    """sine.training_step, with one line for the user if memory runs out or the loss diverges."""
    try:
        with cli.out_of_memory_hint(memory_hint(args, run.alphas.device)):
            loss_and_t = sine.training_step(sd, run.canvas, run.ids, args.patch, run.generator, run.alphas,
                                            run.full_map, run.autocast, run.sizes, args.batch)
            if run.after_backward:
                run.after_backward.step()
                run.after_backward.zero_grad(set_to_none=True)
            return loss_and_t
    except sine.NonFiniteLoss as e:
        diverged(args, f"the loss became {e} at step {step + 1}")


def train(args, sd, image, device, stop):
    """Patch-based fine-tuning (Sec. 3.3): every step trains on a random crop of the photo, told by
    its position map where it lies. Saves now and then and at the end; returns the last step done."""
    run = prepare(args, sd, image, device)
    watch = Watch(args, run.step, run.loss_before)  # the loss log, previews, the blow-up warning
    step = run.step
    with tqdm(total=args.steps, initial=step, desc="fine-tuning") as bar:  # closed before any error prints
        while step < args.steps and not stop.signal:  # Ctrl-C and SIGTERM end the loop between steps
            started = time.perf_counter()
            loss, t = take_step(args, sd, run, step)  # random crops, noise at random t, one AdamW update
            if device.type == "cpu":
                cli.return_freed_memory()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            watch.after_step(step, t, loss, time.perf_counter() - started, sd, image, run.autocast)
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save(args, sd, run.optimizers, run.generator, step, image, True, run.loss_before)
    save(args, sd, run.optimizers, run.generator, step, image, step < args.steps, run.loss_before)
    return step


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cli.plain_warnings()
    try:
        image, device, sd = load(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        cli.fail(e)
    except KeyboardInterrupt:
        cli.say("stopped before training began; nothing was saved")
        sys.exit(130)
    cli.say(f"base: {sd.description}")
    stop = Stop()
    try:
        step = train(args, sd, image, device, stop)
    except KeyboardInterrupt:
        kept = f"the last save, {args.out}, is kept" if os.path.exists(args.out) else "nothing was saved"
        cli.say(f"stopped at once: {kept}")
        sys.exit(130)
    if stop.signal and step < args.steps:
        cli.say(f"interrupted at step {step} of {args.steps}, saved {args.out}; continue with: {resume_command(argv)}")
        sys.exit(128 + stop.signal)
    print(args.out)


if __name__ == "__main__":
    main()
