"""Edit the fine-tuned photo with a text prompt, at any size (SINE, Sec. 3.2 and 3.3).

    python edit.py --target "... covered by snow"

"..." stands for the training prompt without [*] ("a photo of a castle covered by snow").
`--K` and `--v` take comma-separated lists: every combination is rendered from the same seed,
plus a labelled grid. With two or more --finetuned files, "/" separates per-model values:
`--v 0.8/0.9 --K 400/600`. `--finetuned none` is plain SD text-to-image from the base.
"""
import argparse
import glob
import itertools
import json
import os
import sys
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

import cli
import sine
from model import LATENT_SCALE, load_sd, read_header
from model.loader import check_sd_v1, fingerprint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SINE model-guided editing.")
    p.add_argument("--target", required=True, help='the edit, e.g. "... covered by snow"')
    p.add_argument("--finetuned", nargs="+", help="fine-tuned file(s) from train.py (default: the newest); none: plain SD")
    p.add_argument("--finetuned-prompt", nargs="+", metavar="PROMPT",
                   help='what the fine-tuned model is asked for while it guides, with [*] (default: its training '
                        'prompt); one per --finetuned file. Content removal (Sec. 4.4) gives "a [*] dog" here')
    p.add_argument("--base", help="SD v1 .safetensors (default: the one file in weights/)")
    p.add_argument("--K", default="400", help="guide with the fine-tuned model while t > K (0..1000); a list sweeps")
    p.add_argument("--v", default="0.7", help="share of the pre-trained prediction (0..1); a list sweeps")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance weight w")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic")
    p.add_argument("--height", type=int, help="multiple of 64 (default: the photo's aspect, 512 on the short side)")
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="samples, with seeds seed, seed+1, ...")
    p.add_argument("--out", default="outputs", help="folder for the PNGs")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="UNet passes in bfloat16 autocast, the UNets' frozen weights stored in bf16; the text "
                        "encoder and VAE stay fp32 (default: on with a GPU of compute capability 8.0 or newer, "
                        "off elsewhere)")
    p.add_argument("--tile-vae", action=argparse.BooleanOptionalAction,
                   help="decode in overlapping 512-pixel tiles to save memory (default: above 1024x1024 pixels)")
    p.add_argument("--strip", action="store_true",
                   help="also save each image's steps: every DDIM step's predicted clean image, guided steps "
                        "marked (one VAE decode per step)")
    p.add_argument("--channels-last", action="store_true", help="NHWC layout for the UNets' convolutions")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (the first image is slow)")
    return p.parse_args(argv)


def parse_sweep(text, flag, n_models, kind, low, high):
    """'400,600' -> [(400,), (600,)] ; with 2 models '400/600' -> [(400, 600)]."""
    values = []
    for item in text.split(","):
        parts = item.split("/")
        if len(parts) not in (1, n_models):
            raise ValueError(f"--{flag} {item}: give one value, or one per fine-tuned model separated by '/'")
        try:
            numbers = [kind(x) for x in parts]
        except ValueError:
            raise ValueError(f"--{flag} {item}: not a number") from None
        if not all(low <= x <= high for x in numbers):
            raise ValueError(f"--{flag} {item}: must be between {low} and {high}")
        values.append(tuple(numbers) * (n_models if len(parts) == 1 else 1))
    return values


MAX_SIZE = 4096  # pixels a side; SD v1 was trained at 512, and far beyond this the VAE decoder fits no GPU


def check_size(value, flag):
    if value is not None and (value < 64 or value > MAX_SIZE or value % 64):
        clamp = lambda x: min(max(x, 64), MAX_SIZE)
        nearest = sorted({clamp(value // 64 * 64), clamp(-(-value // 64) * 64)})
        raise ValueError(f"--{flag} {value}: must be a multiple of 64 from 64 to {MAX_SIZE} "
                         f"(nearest: {' or '.join(map(str, nearest))})")


def default_size(source_size, height, width):
    """The source photo's aspect ratio, rounded to multiples of 64: 512 on the short side, or the
    one side given."""
    w, h = source_size
    scale = height / h if height else width / w if width else 512 / min(w, h)
    return height or max(64, round(h * scale / 64) * 64), width or max(64, round(w * scale / 64) * 64)


def find_finetuned(paths):
    if paths == ["none"]:
        return []
    if paths:
        return paths
    found = sorted(glob.glob(os.path.join(cli.FINETUNED_DIR, "*.safetensors")), key=os.path.getmtime)
    found = [p for p in found if not p.endswith(".resume.safetensors")]
    if not found:
        raise ValueError(f"no fine-tuned file in {cli.FINETUNED_DIR}/: run train.py first, "
                         "pass --finetuned PATH, or --finetuned none for plain SD")
    cli.say(f"fine-tuned: {found[-1]} (the newest in {cli.FINETUNED_DIR}/)")
    return found[-1:]


def read_finetuned(path, base):
    metadata = read_header(path).get("__metadata__") or {}
    if path.endswith(".resume.safetensors"):
        raise ValueError(f"{path} is train.py's resume state; pass the fine-tuned file beside it, "
                         f"{path[:-len('.resume.safetensors')]}.safetensors")
    if "sine.finetuned" not in metadata:
        raise ValueError(f"{path} is not a fine-tuned file from train.py (it looks like a base checkpoint: "
                         "pass it as --base)")
    if int(metadata.get("steps", 0)) < int(metadata.get("planned_steps", 0)):
        cli.say(f"note: {path} is unfinished, trained for {metadata['steps']} of {metadata['planned_steps']} "
                "steps (train.py --resume continues it); editing with it anyway")
    if metadata.get("base_fingerprint") != fingerprint(base):
        raise ValueError(f"{path} was fine-tuned from {metadata.get('base')} (fingerprint "
                         f"{metadata.get('base_fingerprint')}), not from {base}: pass that file as --base")
    return metadata


def check_args(args):
    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be from 1 to 1000, the noise levels SD v1 was trained with (got {args.steps})")
    if not 0 <= args.scale < float("inf"):  # also refuses nan
        raise ValueError(f"--scale must be 0 or more (got {args.scale})")
    if args.n < 1:
        raise ValueError(f"--n must be at least 1 (got {args.n})")
    if not 0 <= args.eta <= 1:
        raise ValueError(f"--eta must be between 0 and 1 (got {args.eta})")
    check_size(args.height, "height")
    check_size(args.width, "width")
    cli.check_seed(args.seed, args.n)
    if sine.PLACEHOLDER in args.target:
        raise ValueError(f"--target is for the pre-trained model, which does not know {sine.PLACEHOLDER}: "
                         'name the class instead ("a castle in snow"), or continue the training prompt ("... in snow")')
    if os.path.isfile(args.out) or args.out.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        raise ValueError(f"--out {args.out} names a file, but --out is the folder for the PNGs, e.g. --out results")


# ---------------------------------------------------------------------------------------------

def write_png(image, folder, stem, parameters):
    """Save under a name that is not taken yet (never overwrite); return the path.

    The PNG is written to a temporary file, then linked under its name: a crash never leaves half a PNG.
    """
    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}.png")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        for i in itertools.count():
            path = os.path.join(folder, f"{stem}{'' if i == 0 else f'-{i}'}.png")
            try:
                os.link(tmp, path)  # unlike a rename, a link never replaces a file that exists
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links (FAT, some network shares)
                if os.path.exists(path):
                    continue
                os.replace(tmp, path)
            return path
    except OSError as e:
        cli.fail(f"could not write a PNG in {folder} ({e.strerror or e}); the images written before are intact")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_pil(pixels):
    array = ((pixels[0].float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(array.numpy())


def grid_image(cells, rows, cols):
    """cells: {(row, col): (image, label)} -> one image, labels drawn on each cell."""
    w, h = next(iter(cells.values()))[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for (r, c), (image, label) in cells.items():
        grid.paste(image, (c * w, r * h))
        draw.rectangle([c * w, r * h, c * w + 8 * len(label) + 8, r * h + 16], fill="black")
        draw.text((c * w + 4, r * h + 2), label, fill="white")
    return grid


def steps_strip(sd, estimates, guides, columns=10):
    """estimates: [(t, x0_hat latent)] of one sample -> one image, a cell per DDIM step, noisiest first.
    "guided" marks the steps on which a fine-tuned model guided (t > its K)."""
    cells = {}
    for i, (t, x0_hat) in enumerate(estimates):
        with torch.no_grad():
            image = to_pil(sd.vae.decode(x0_hat / LATENT_SCALE).clamp(-1, 1))
        cells[divmod(i, columns)] = (image, f"t={t}" + (" guided" if any(t > g.K for g in guides) else ""))
    return grid_image(cells, -(-len(estimates) // columns), min(columns, len(estimates)))


def label(K, v):
    show = lambda xs: "/".join(f"{x:g}" for x in xs)
    return f"K={show(K)} v={show(v)}"


@dataclass
class Setup:
    """What the rendering loop needs, all checked and loaded."""
    sd: object                       # the pre-trained model
    finetuned: list                  # one loaded model per --finetuned file
    files: list
    metadata: list                   # each fine-tuned file's metadata
    Ks: list
    vs: list
    height: int
    width: int
    device: torch.device


def load(args):
    """Check every argument, then load the models. A user's mistake raises ValueError or OSError
    before any weight is read."""
    check_args(args)
    cli.use_huge_pages()
    files = find_finetuned(args.finetuned)
    Ks = parse_sweep(args.K, "K", max(1, len(files)), int, 0, 1000)
    vs = parse_sweep(args.v, "v", max(1, len(files)), float, 0.0, 1.0)
    if not files:
        Ks, vs = Ks[:1], vs[:1]  # nothing to sweep without a fine-tuned model
    if any(sum(1 - x for x in v) > 1 for v in vs):
        raise ValueError(f"--v {args.v}: the fine-tuned models' shares (1 - v each) add up to more than 1")
    args.base = cli.find_base(args.base)
    check_sd_v1(args.base)
    metadata = [read_finetuned(path, args.base) for path in files]
    prompts = args.finetuned_prompt or [m["prompt"] for m in metadata]
    if len(prompts) != len(metadata):
        raise ValueError(f"--finetuned-prompt: give one prompt per --finetuned file ({len(metadata)})")
    for meta, prompt in zip(metadata, prompts):
        sine.training_prompt(prompt)  # needs [*]
        meta["sampling_prompt"] = prompt
    if args.target.startswith(("...", "\u2026")) and not metadata:
        raise ValueError('a target starting with "..." needs a fine-tuned model\'s prompt; write it in full')
    source = metadata[0]["source_size"] if metadata else "512x512"
    height, width = default_size(tuple(int(x) for x in source.split("x")), args.height, args.width)
    if max(height, width) > MAX_SIZE:
        raise ValueError(f"the photo's aspect ratio gives {width}x{height}, over {MAX_SIZE} a side: "
                         "choose the size with --height and --width")
    device = cli.pick_device(args.device)
    cli.check_writable_folder(os.path.join(args.out, "x.png"))
    sd = load_sd(args.base, device=device)
    finetuned = [sine.apply_finetuned(load_sd(args.base, device=device), path) for path in files]
    return Setup(sd, finetuned, files, metadata, Ks, vs, height, width, device)


def render(args, s, autocast):
    """Every seed and every (K, v) of the sweep, as soon as each is sampled: (image, file stem, parameters)."""
    target = sine.target_prompt(args.target, s.metadata[0]["prompt"] if s.metadata else "")
    encode = lambda model, prompt: model.text_encoder(model.tokenizer([prompt]).to(s.device))
    with torch.no_grad():
        cond, uncond = encode(s.sd, target), encode(s.sd, "")
        guides = [sine.Guide(ft.unet, encode(ft, sine.training_prompt(meta["sampling_prompt"])),
                             sine.full_position_map(ft.config.unet.model_channels, (s.height // 8, s.width // 8),
                                                    s.device) if meta["position_map"] == "True" else None)
                  for ft, meta in zip(s.finetuned, s.metadata)]
    cli.say(f"target: {target!r}, {s.width}x{s.height}")

    for seed in range(args.seed, args.seed + args.n):
        cells = {}
        for (r, K), (c, v) in itertools.product(enumerate(s.Ks), enumerate(s.vs)):
            for guide, K_i, v_i in zip(guides, K, v):
                guide.K, guide.v = K_i, v_i
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn((1, 4, s.height // 8, s.width // 8), generator=generator).to(s.device)
            estimates = []
            watch = (lambda t, x0_hat: estimates.append((t, x0_hat))) if args.strip else None
            with cli.out_of_memory_hint(f"{s.width}x{s.height} is too large for this device; lower --height/--width"):
                pixels = sine.edit(s.sd, guides, cond, uncond, noise, args.scale, args.steps, args.eta, generator,
                                   autocast=autocast, tiled=args.tile_vae, callback=watch)
            if not torch.isfinite(pixels).all():  # as a PNG it would be black
                cli.fail(f"the sample turned nan or inf (seed {seed}, {label(K, v)}), so no PNG was written for it: "
                         f"check that --base is a working SD v1 file{' and try without --bf16' if autocast else ''}")
            parameters = {"target": target, "training_prompts": [m["prompt"] for m in s.metadata],
                          "finetuned_prompts": [m["sampling_prompt"] for m in s.metadata],
                          "K": list(K) if guides else None, "v": list(v) if guides else None, "scale": args.scale,
                          "steps": args.steps, "eta": args.eta, "seed": seed, "width": s.width, "height": s.height,
                          "bf16": autocast is not None,
                          "base": os.path.basename(args.base), "finetuned": [os.path.basename(f) for f in s.files]}
            image = to_pil(pixels)
            stem = f"seed{seed}" + (f"-K{'_'.join(map(str, K))}-v{'_'.join(f'{x:g}' for x in v)}" if guides else "")
            yield image, stem, parameters
            if estimates:
                yield steps_strip(s.sd, estimates, guides), stem + "-steps", parameters
            cells[r, c] = (image, label(K, v))
        if len(cells) > 1:
            yield (grid_image(cells, len(s.Ks), len(s.vs)), f"seed{seed}-grid",
                   {"grid": "rows K, columns v", "K": args.K, "v": args.v, "seed": seed, "target": target})


def main(argv=None):
    args = parse_args(argv)
    cli.plain_warnings()
    try:
        setup = load(args)
    except (ValueError, OSError) as e:
        cli.fail(e)
    cli.say(f"base: {setup.sd.description}")
    autocast = cli.bf16_autocast(setup.device, args.bf16)
    cli.say(f"precision: {'bf16 autocast' if autocast else 'fp32'} on {setup.device}")
    for loaded in [setup.sd] + setup.finetuned:
        cli.speed_up(loaded.unet, args.channels_last, args.compile, bf16_weights=autocast is not None)
    written = []
    try:
        for image, stem, parameters in render(args, setup, autocast):
            with cli.hold_ctrl_c():  # so that every PNG on disk is printed and counted
                written.append(write_png(image, args.out, stem, parameters))
                print(written[-1], flush=True)
    except KeyboardInterrupt:
        cli.say(f"interrupted: the {len(written)} PNG(s) written so far are kept")
        sys.exit(130)


if __name__ == "__main__":
    main()
