"""Fine-tune Stable Diffusion v1 on one photo (SINE, Sec. 3.3).

    python train.py castle.jpg "a photo of a [*] castle"

writes finetuned/castle.safetensors: the difference from the base weights, plus everything
edit.py needs (prompt, position map on or off, image size, which base). `--no-patch` is the
paper's whole-image ablation: 800 steps, no position map.
"""
import argparse
import csv
import glob
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import adamw
import cli
import finetuned_file
import pictures
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
    p.add_argument("--out", help="the .safetensors file to write, or a folder to write <image name>.safetensors in "
                                 "(default: finetuned/<image name>.safetensors)")
    p.add_argument("--steps", type=int, help="default 10000 with patches, 800 with --no-patch; with --resume, the "
                                             "run's own plan: a larger number extends it, a smaller one stops there")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW's learning rate (the paper's; with --lora, 1e-4 "
                                                          "unless given, common DreamBooth-LoRA practice)")
    p.add_argument("--batch", type=int, default=1, help="crops a step (the paper's: 1); each costs memory")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train low-rank adapters of this rank (e.g. 8) on frozen weights, not every weight: far less "
                        "memory, and a file of megabytes (0: the paper's full fine-tune)")
    p.add_argument("--lora-convs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --lora, also adapt the convolutions around the position map's entry, not only attention")
    p.add_argument("--seed", type=int, default=0, help="draws the crops, timesteps, noise and adapters' start; "
                                                      "-1 draws one, recorded in the file")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="every N steps keep a numbered checkpoint beside --out, NAME-000200.safetensors, which "
                        "edit.py takes like the final file (2 GB each at SD v1's size, 9 MB with --lora 8), and "
                        "refresh the resume state (0: none)")
    p.add_argument("--state-every", type=float, default=30, metavar="MINUTES",
                   help="every MINUTES of training save the weights and the resume state, so that a crash or a "
                        "kill loses at most that (0: never); the state is 11.8 GB at SD v1's size, 27 MB with "
                        "--lora 8, rewritten in place")
    p.add_argument("--keep-state", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the resume state when the run ends, so that --resume --steps N can extend it "
                        "(11.8 GB at SD v1's size, 27 MB with --lora 8); --no-keep-state deletes it then")
    p.add_argument("--preview-every", type=int, default=0, metavar="N",
                   help="every N steps and at the end, save a PNG beside --out of what the model draws alone "
                        "from its training prompt (seed 0, 25 DDIM steps, the photo's aspect); each costs about "
                        "as much as 10 training steps on the toy base, 15 at SD v1's size (0: no previews)")
    p.add_argument("--resume", action="store_true", help="continue (or extend) the run saved beside --out")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: $SINE_DEVICE if set, else cuda, else mps, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run at --out: its files go once this run first saves")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward: a lower peak, at little cost (default: on for SD v1; "
                        "off for a small base such as the toy, which fits anyway and whose steps it slows by a "
                        "third or more)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="forward and backward in bfloat16 autocast; weights and AdamW state stay fp32 "
                        "(default: on with a GPU of compute capability 8.0 or newer, off elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first step is slow)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: one a core); on a busy machine, 1 keeps threads from waiting on "
                        "each other, which made a toy step 20 times slower")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for the --resume command we offer
    args.patch = not args.no_patch
    if args.lora > 0 and not any(a == "--lr" or a.startswith("--lr=") for a in args.argv):
        args.lr = 1e-4
    base_name = os.path.splitext(os.path.basename(args.image))[0] + ("" if args.patch else "-nopatch")
    if args.out is None or args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):  # a folder: name the file
        args.out = os.path.join(args.out or cli.FINETUNED_DIR, base_name + ".safetensors")
    elif not os.path.splitext(args.out)[1]:
        args.out += ".safetensors"
    args.plan, args.earlier, args.lock, args.made = args.steps, [], None, []
    return args


def resume_path(out):
    return os.path.splitext(out)[0] + ".resume.safetensors"


def check_args(args):
    """Everything a user can get wrong, checked before any weight is loaded. Takes the run's lock."""
    if sine.PLACEHOLDER in args.image or (not os.path.exists(args.image) and os.path.isfile(args.prompt)):
        raise ValueError(f'the photo comes first and the prompt second: train.py {shlex.quote(args.prompt)} '
                         f'"{args.image}"')
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {args.steps})")
    if args.lora < 0:
        raise ValueError(f"--lora must be a rank of 1 or more, or 0 for the full fine-tune (got {args.lora})")
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1 (got {args.batch})")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1 (got {args.threads})")
    if not 0 < args.lr < float("inf"):  # also refuses nan
        raise ValueError(f"--lr must be a positive number (got {args.lr})")
    for flag, value in (("--save-every", args.save_every), ("--preview-every", args.preview_every),
                        ("--state-every", args.state_every)):
        if not 0 <= value < float("inf"):
            raise ValueError(f"{flag} must be 0 or more (got {value})")
    if args.seed != -1:
        cli.check_seed(args.seed, random_too=True)
    sine.training_prompt(args.prompt)
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: train.py writes safetensors files, named .safetensors (edit.py would "
                         f"take a {os.path.splitext(args.out)[1]} for a pickle): use --out "
                         f"{os.path.splitext(args.out)[0]}.safetensors")
    cli.check_writable_folder(args.out)
    folder = os.path.dirname(os.path.abspath(args.out))
    missing = folder
    while not os.path.isdir(missing):  # made now, removed again by main if this run saves nothing
        args.made.insert(0, missing)
        missing = os.path.dirname(missing)
    os.makedirs(folder, exist_ok=True)
    args.lock = lock_run(args.out)  # first: a run still going is the likelier story than any below
    if args.resume and not os.path.exists(resume_path(args.out)):
        raise ValueError(f"--resume: no resume state at {resume_path(args.out)}; it is saved every --state-every "
                         "minutes, every --save-every steps and at the end (unless --no-keep-state)")
    if args.resume:
        read_header(resume_path(args.out))  # a damaged state is refused here, not after the model loads
    args.unfinished = unfinished(args.out)
    if args.unfinished and not (args.overwrite or args.resume):
        raise ValueError(f"{args.out} is an unfinished run (saved at {args.unfinished}): pass --overwrite to start "
                         f"over, which replaces it, or continue it with: {command_line(args.argv, resume=True)}")
    if os.path.exists(args.out) and not (args.overwrite or args.resume):
        extend = " --resume --steps N to extend it," if os.path.exists(resume_path(args.out)) else ""
        raise ValueError(f"{args.out} exists: pass --overwrite to replace it,{extend} or choose another --out")
    if args.seed == -1 and not args.resume:
        args.seed = random.randrange(2**32)
        cli.say(f"seed: {args.seed}")


def unfinished(out):
    """'step 5 of 1000' if a resume state of a run short of its plan lies beside out, else None."""
    if not os.path.exists(resume_path(out)):
        return None
    try:
        metadata = read_header(resume_path(out)).get("__metadata__") or {}
    except CheckpointError:  # damaged: --overwrite must still be able to start over
        metadata = {}
    step, planned = metadata.get("step", "?"), metadata.get("planned_steps", "?")
    return None if step == planned else f"step {step} of {planned}"


def lock_path(out):
    return os.path.splitext(out)[0] + ".lock"


def lock_run(out):
    """One run per output: hold an exclusive lock on out's lock file while this process lives (the
    system drops it even on kill -9), so that a second run aimed at out is refused, naming the first.
    Where there is no fcntl (Windows), nothing is locked."""
    if fcntl is None:
        return None
    while True:
        f = open(lock_path(out), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another train.py"
            f.close()
            raise ValueError(f"{out} is being trained by another run ({holder}): wait for it to end, or choose "
                             "another --out") from None
        try:  # its last holder may have deleted it meanwhile: then lock the new one
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock_path(out))):
                break
        except FileNotFoundError:
            pass
        f.close()
    f.truncate(0)
    f.write(f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}: {command_line(sys.argv[1:])}")
    f.flush()
    return f


def unlock_run(lock):
    """Delete the lock file while still holding it (lock_run checks that it locked the file on disk)."""
    if lock is not None and not lock.closed:
        try:
            os.remove(lock.name)
        except OSError:
            pass
        lock.close()


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
    """--resume continues the saved run only with its own arguments. Sets args.steps, where this run
    stops, and args.plan, the run's plan: the saved one, or a larger --steps, which extends it."""
    metadata = read_header(resume_path(args.out)).get("__metadata__") or {}
    if "run" not in metadata:
        raise ValueError(f"{resume_path(args.out)} was saved by an older version of train.py and cannot be "
                         "checked: start a new run")
    saved, done, planned = json.loads(metadata["run"]), int(metadata["step"]), int(metadata["planned_steps"])
    for key, default in (("batch", 1), ("lora", 0), ("lora_convs", False)):  # saved before these flags existed
        saved.setdefault(key, default)
    if args.seed == -1:  # the seed drawn when the run began
        args.seed = saved["seed"]
    now = run_identity(args, image)
    shown = lambda key, value: ("on" if value else "off") if isinstance(value, bool) else repr(value)
    differ = [f"{name} is not the one it started with" if key in ("photo", "base") else
              f"{name} {shown(key, now[key])} (saved: {shown(key, saved.get(key))})"
              for key, name in SHAPING.items() if now[key] != saved.get(key)]
    if differ:
        raise ValueError(f"--resume continues a run started with other arguments: {'; '.join(differ)}. "
                         "Resume with the saved ones, or start a new run with another --out")
    if args.steps is not None and args.steps < done:
        raise ValueError(f"--steps {args.steps} is below the {done} steps this run has done: give more, or leave "
                         f"--steps out to finish its plan of {planned}")
    if (args.steps or planned) == done:
        raise ValueError(f"{args.out} has done its {done} steps: extend it with --resume --steps N, N above {done}")
    args.steps = args.steps or planned
    args.plan = max(args.steps, planned)  # a smaller --steps stops early; the plan stays for the next --resume


# ---------------------------------------------------------------------------------------------
# Saving: the fine-tuned file (small, for edit.py) and a resume state (exact, for --resume)

def save(args, sd, optimizers, generator, step, image, resumable, loss_before, numbered=False):
    """The fine-tuned file; if resumable, the resume state; if numbered, also a checkpoint of this step."""
    sizes = sine.sizes_for(sd.config)
    run = run_identity(args, image)
    try:
        finetuned_file.save_finetuned(args.out, sd, args.base, {
            "prompt": args.prompt, "position_map": args.patch, "source_size": f"{image.width}x{image.height}",
            "photo": run["photo"], "canvas": sizes.canvas, "crop": sizes.crop,
            "steps": step, "planned_steps": args.plan, "seed": args.seed, "lr": args.lr,
            "batch": args.batch})
        if numbered:
            keep_copy(args.out, checkpoint_path(args.out, step))
        if resumable:  # written last: a resume state on disk means its save completed
            save_resume_state(resume_path(args.out), sd, optimizers, generator, {
                "step": str(step), "planned_steps": str(args.plan), "run": json.dumps(run),
                "base_loss": repr(loss_before)})
    except OSError as e:
        cli.fail(f"could not save step {step} to {args.out} ({e.strerror or e}); files saved earlier are intact")
    except finetuned_file.NonFiniteWeights as e:
        diverged(args, f"at step {step} {e}")
    if not resumable and os.path.exists(resume_path(args.out)):
        os.remove(resume_path(args.out))  # the run is finished, and --no-keep-state asked
    forget_earlier_run(args)


def checkpoint_path(out, step):
    return os.path.splitext(out)[0] + f"-{step:06d}.safetensors"


def keep_copy(path, copy):
    """copy: the same bytes as path, as a hard link (no second 2 GB on disk; our files are never
    changed in place, only replaced), or where links are not allowed (FAT, some shares) a copy."""
    with atomic_path(copy) as tmp:
        os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)


def earlier_run(out):
    """The files of a run at out that --overwrite replaces, with their stat: the file itself, its loss
    log, resume state, previews and numbered checkpoints."""
    stem = glob.escape(os.path.splitext(out)[0])
    paths = [out, log_path(out), resume_path(out), *glob.glob(stem + ".preview-[0-9]*.png"),
             *glob.glob(stem + "-[0-9]*.safetensors")]
    return [(path, os.stat(path)) for path in paths if os.path.isfile(path)]


def forget_earlier_run(args):
    """At an --overwrite run's first save: delete the earlier run's files, those it has not rewritten."""
    for path, stat in args.earlier:
        try:
            now = os.stat(path)
            if os.path.samestat(stat, now) and stat.st_mtime_ns == now.st_mtime_ns:
                os.remove(path)
        except OSError:
            pass
    args.earlier = []


def diverged(args, what):
    """Stop a run whose numbers have become nan or inf, keeping whatever was saved before."""
    kept = ("the earlier run's files are kept as they were" if args.earlier else
            f"the last good save, {args.out}, is kept" if os.path.exists(args.out) else "nothing was saved")
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
    height, width = pictures.default_size(source_size, None, None, config.image_size, pictures.size_step(config))
    latent_size = (height // config.vae.factor, width // config.vae.factor)
    context = sd.text_encoder(sd.tokenizer([sine.training_prompt(prompt), ""]).to(device))  # (2, 77, 768)
    position = (sine.full_position_map(config.unet.model_channels, latent_size, device, sine.sizes_for(config))
                if patch else None)
    noise = torch.randn((1, 4, *latent_size), generator=torch.Generator().manual_seed(seed)).to(device)
    with autocast or torch.autocast(device.type, enabled=False):
        latents = sample(text_to_image_eps(sd.unet, context[:1], context[1:], scale, position), noise, steps,
                         progress=False)
    return pictures.decode(sd, latents)


class Watch:
    """After each step: a row of the loss log, a preview every --preview-every steps, and one warning
    line if the loss blows up. The log is written from the first step done on (a run that fails at
    once leaves nothing); on --resume it keeps its rows up to the resumed step; an --overwrite run
    leaves the earlier run's log alone until it first saves. Neither log nor preview is worth the
    run: one that cannot be written is a warning."""

    def __init__(self, args, step, base):
        self.args, self.base, self.warned, self.file, self.written = args, base, False, None, 0
        self.rows = read_log(log_path(args.out), step) if args.resume else []
        if not self.rows:  # step 0: the base model's loss, which the warning measures against
            self.rows = [{"step": 0, "t": "", "loss": f"{base:.6g}", "seconds": ""}]
        self.losses = [float(row["loss"]) for row in self.rows if str(row["step"]) != "0"]
        self.deferred = any(path == log_path(args.out) for path, _ in args.earlier)

    def after_step(self, step, t, loss, seconds, sd, image, autocast):
        self.rows.append({"step": step, "t": " ".join(map(str, t)), "loss": f"{loss:.6g}", "seconds": f"{seconds:.3f}"})
        self.write_log()
        self.losses.append(loss)
        if not self.warned and blown_up(self.losses, self.base):
            self.warned = True
            tqdm.write(f"warning: the loss has grown from {self.base:.3g} (the base model's) to "
                       f"{statistics.median(self.losses[-WINDOW:]):.3g} (median of the last {WINDOW} steps): "
                       f"--lr {self.args.lr:g} is likely too high; the run goes on", file=sys.stderr)
        if self.args.preview_every and (step % self.args.preview_every == 0 or step == self.args.steps):
            picture = preview(sd, self.args.prompt, self.args.patch, image.size, autocast)
            try:
                pictures.grid_image({(0, 0): (picture, f"step {step}")}, 1, 1).save(preview_path(self.args.out, step))
            except OSError as e:
                tqdm.write(f"warning: could not write the preview of step {step} ({e.strerror or e}); the run goes on",
                           file=sys.stderr)

    def saved(self):
        """The run has saved: its log may now replace the earlier run's."""
        self.deferred = False
        self.write_log()

    def write_log(self):
        if self.deferred or self.written < 0:
            return
        try:
            if self.file is None:
                self.file = open(log_path(self.args.out), "w")
                self.file.write("step,t,loss,seconds\n")
            self.file.write("".join(f"{r['step']},{r['t']},{r['loss']},{r['seconds']}\n" for r in self.rows[self.written:]))
            self.file.flush()
            self.written = len(self.rows)
        except OSError as e:
            self.written = -1  # no more tries, no more warnings
            tqdm.write(f"warning: could not write the loss log {log_path(self.args.out)} ({e.strerror or e}); the "
                       "run goes on without it", file=sys.stderr)


def read_log(path, up_to):
    """The loss log's rows up to step up_to; rows after it (a run killed after its last save) are dropped."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [row for row in rows if row.get("seconds") is not None and int(row["step"]) <= up_to]


# ---------------------------------------------------------------------------------------------

def command_line(argv, resume=False):
    """This run's command line, with --resume (and without --overwrite) if asked: the interpreter and
    script as the user typed them when argv is the process's own, else `python train.py`."""
    typed = sys.orig_argv[:len(sys.orig_argv) - len(sys.argv) + 1] if list(argv) == sys.argv[1:] else []
    if resume:
        argv = [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
    return shlex.join([*(typed or ["python", "train.py"]), *argv])


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
    if args.batch > 1:
        return (f"--batch {args.batch} puts {args.batch} crops through the model at once, each with its own "
                "activations: lower --batch (the paper's is 1)")
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
    cli.use_threads(args.threads)
    image = cli.load_image(args.image)
    device = cli.pick_device(args.device)
    args.base = cli.find_base(args.base)
    if args.resume:
        check_resume(args, image)
    else:
        args.steps = args.plan = args.steps or (10_000 if args.patch else 800)
    sd = load_sd(args.base, device=device)
    crop = sine.sizes_for(sd.config).crop
    if min(image.size) < crop:
        cli.say(f"warning: {args.image} is {image.width}x{image.height}, smaller than the {crop}-pixel crops "
                "that fine-tuning sees: it will be upscaled, and the model learns its blur; use a larger photo "
                "if there is one")
    return image, device, sd


def start_over(args):
    """--overwrite: the earlier run's files stay until this run first saves, said in one line."""
    args.earlier = earlier_run(args.out) if args.overwrite else []
    if args.earlier:
        what = f"the unfinished run (at {args.unfinished})" if args.unfinished else "the earlier run"
        cli.say(f"--overwrite: starting over; {what} and its {len(args.earlier)} files are replaced when this run "
                "first saves")


@dataclass
class Run:
    """What the training loop needs, set up fresh or from a resume state."""
    canvas: Image.Image            # the photo on the square canvas that crops are cut from
    ids: torch.Tensor              # (1, 77) the training prompt's tokens
    full_map: torch.Tensor | None  # the whole position map, None with --no-patch
    alphas: torch.Tensor           # the noise schedule
    sizes: sine.Sizes
    autocast: object               # bf16 autocast, or None for fp32
    optimizer: object              # AdamW, or adamw.InBackward for SD v1
    optimizers: dict               # {parameter: the AdamW that holds its moments}, for the resume state
    generator: torch.Generator     # crops, timesteps and noise
    step: int                      # steps already done
    loss_before: float             # the base model's loss: the blow-up warning's yardstick


def prepare(args, sd, image, device):
    """Models set to train, the optimizer, the canvas and the map; the resume state if asked."""
    for module in sine.trainable_parts(sd).values():
        module.train().requires_grad_(True)
    if args.lora:  # the base weights stay frozen
        lora.adapt(sd, args.lora, args.lora_convs, generator=torch.Generator().manual_seed(args.seed))
    params = [p for _, p in trainable_parameters(sd)]
    optimizer, optimizers = adamw.make_optimizer(params, args.lr, adamw.room_for_gradients(device, params))
    if args.grad_checkpointing is None:
        args.grad_checkpointing = not adamw.small(sd.unet.parameters())
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
    return Run(canvas, ids, full_map, alphas, sizes, autocast, optimizer, optimizers, generator, step,
               loss_before)


def train(args, sd, image, device, stop):
    """Patch-based fine-tuning (Sec. 3.3): every step trains on a random crop of the photo, told by
    its position map where it lies. Saves now and then and at the end; returns the last step done."""
    run = prepare(args, sd, image, device)
    watch = Watch(args, run.step, run.loss_before)  # the loss log, previews, the blow-up warning
    step, last_save, hint = run.step, time.monotonic(), memory_hint(args, device)
    with tqdm(total=args.steps, initial=step, desc="fine-tuning") as bar:  # closed before any error prints
        while step < args.steps and not stop.signal:  # Ctrl-C and SIGTERM end the loop between steps
            started = time.perf_counter()
            with cli.out_of_memory_hint(hint):
                loss, t = sine.step_loss(sd, run.canvas, run.ids, args.patch, run.generator, run.alphas, run.full_map,
                                         run.autocast, run.sizes, args.batch)  # forward on random crops (Sec. 3.3)
                value, t = loss.item(), t.tolist()  # read once, before backward: a GPU waits here only
                if not math.isfinite(value):  # before backward: no weight is touched by it
                    diverged(args, f"the loss became {value} at step {step + 1}")
                loss.backward()  # with adamw.InBackward (SD v1), each weight is updated in here
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            if device.type == "cpu":
                cli.return_freed_memory()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            watch.after_step(step, t, value, time.perf_counter() - started, sd, image, run.autocast)
            numbered = bool(args.save_every) and step % args.save_every == 0
            timed = bool(args.state_every) and time.monotonic() - last_save >= 60 * args.state_every
            if (numbered or timed) and step < args.steps:
                save(args, sd, run.optimizers, run.generator, step, image, True, run.loss_before, numbered)
                watch.saved()
                last_save = time.monotonic()
    finished = step == args.plan
    save(args, sd, run.optimizers, run.generator, step, image, args.keep_state or not finished, run.loss_before)
    watch.saved()
    return step


def say_kept(args, step):
    """After a run that reached its --steps: what lies beside it to go on with."""
    if step < args.plan:
        cli.say(f"stopped at step {step} of the planned {args.plan}, as --steps asked; the resume state is kept: "
                "--resume without --steps finishes the plan")
    elif args.keep_state:
        size = os.path.getsize(resume_path(args.out)) / 1e6
        cli.say(f"kept the resume state, {resume_path(args.out)} ({size:,.0f} MB), so that --resume --steps N can "
                "extend the run; delete it if you will not (--no-keep-state: not kept)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cli.plain_warnings()
    try:
        fine_tune(args, argv)
    finally:
        unlock_run(args.lock)
        for folder in reversed(args.made):  # the folders --out asked for, if nothing was saved in them
            try:
                os.rmdir(folder)
            except OSError:
                break


def fine_tune(args, argv):
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
        cli.say(f"interrupted at step {step} of {args.plan}, saved {args.out}; continue with: {command_line(argv, resume=True)}")
        sys.exit(128 + stop.signal)
    say_kept(args, step)
    print(args.out)


if __name__ == "__main__":
    main()
