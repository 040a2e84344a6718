"""Edit the fine-tuned photo with a text prompt, at any size (SINE, Sec. 3.2 and 3.3).

    python edit.py --target "... covered by snow"
    python edit.py --from outputs/00012-seed0-K400-v0.7.png --seed 5   # again, with one change

"..." stands for the training prompt without [*] ("a photo of a castle covered by snow").
Several targets are rendered in turn, with the models loaded once.
`--K` and `--v` take comma-separated lists: every combination is rendered from the same seed,
plus a labelled grid. With two or more --finetuned files, "/" separates per-model values:
`--v 0.8/0.9 --K 400/600`. `--finetuned none` is plain SD text-to-image from the base.
"""
import argparse
import glob
import itertools
import os
import random
import sys
from dataclasses import dataclass

import torch

import cli
import finetuned_file
import outputs
import pictures
import sine
from model import load_sd, read_header
from model.loader import fingerprint, read_config
from model.ddim import classifier_free_guidance
from model.schedule import alphas_cumprod, predict_x0
from model.vae import use_tiles


def parse_args(argv=None):
    """The flags; with --from PNG, the PNG's settings are the defaults, so flags given beside it win."""
    p = argparse.ArgumentParser(description="SINE model-guided editing.", formatter_class=cli.HelpWithDefaults)
    p.add_argument("--target", nargs="+", help='the edit, e.g. "... covered by snow"; several are rendered in turn')
    p.add_argument("--from", dest="from_png", metavar="PNG",
                   help="every setting from a PNG of ours; flags given beside it override, e.g. --seed 5")
    p.add_argument("--negative", default="",
                   help="negative prompt: replaces the empty prompt of the pre-trained model's unconditional pass "
                        "(default: empty)")
    p.add_argument("--finetuned", nargs="+", help="fine-tuned file(s) from train.py (default: the newest); none: plain SD")
    p.add_argument("--finetuned-prompt", nargs="+", metavar="PROMPT",
                   help='what the fine-tuned model is asked for while it guides, with [*] (default: its training '
                        'prompt); one per --finetuned file. Content removal (Sec. 4.4) gives "a [*] dog" here')
    p.add_argument("--base", help="SD v1 .safetensors (default: the file in weights/ that the fine-tuned file was "
                                  "made from; with --finetuned none, the one SD v1 file there)")
    p.add_argument("--K", default=str(sine.Guide.K), help="guide with the fine-tuned model while t > K (0..1000); a list sweeps")
    p.add_argument("--v", default=str(sine.Guide.v), help="share of the pre-trained prediction (0..1); a list sweeps")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance weight w")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic")
    p.add_argument("--height", type=int, help="multiple of 64 for SD v1 (default: the photo's aspect, with the base's native "
                                          "size on the short side: 512 for SD v1)")
    p.add_argument("--width", type=int, help="multiple of 64 for SD v1 (default: as for --height)")
    p.add_argument("--seed", type=int, default=0, help="-1 draws one, recorded in the PNG")
    p.add_argument("--n", type=int, default=1, help="samples, with seeds seed, seed+1, ...")
    p.add_argument("--out", default="outputs", help="folder for the PNGs")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: $SINE_DEVICE if set, else cuda, else mps, else cpu)")
    p.add_argument("--precision", default="auto",
                   help="the UNets' dtype: fp32, fp16, bf16, or BASE/FINETUNED such as bf16/fp32; text encoders "
                        "and the VAE stay fp32. auto: the pre-trained UNet in the device's fast dtype (bf16 on "
                        "GPUs of compute capability 8.0 or newer and CPUs with AVX512-BF16 or AMX, fp16 on older "
                        "GPUs and mps, else fp32), the fine-tuned ones in a dtype that keeps their fine-tuning "
                        "(fp16 on GPUs, fp32 on CPUs)")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="the same as --precision bf16")
    p.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32", help="the same as --precision fp32")
    p.add_argument("--tile-vae", action=argparse.BooleanOptionalAction,
                   help="decode in overlapping 512-pixel tiles to save memory (default: above 1024x1024 pixels)")
    p.add_argument("--strip", action="store_true",
                   help="also save each image's steps: every DDIM step's predicted clean image; under each "
                        "guided step, what the pre-trained and the fine-tuned model would make of it alone in "
                        "Eq. 3, and what the fine-tuned model draws with its own guidance (one more UNet pass a "
                        "guided step, one VAE decode per picture)")
    p.add_argument("--channels-last", action="store_true", help="NHWC layout for the UNets' convolutions")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (the first image is slow)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: one a core); on a busy machine, 1 keeps threads from waiting on "
                        "each other, which made a toy step 20 times slower")
    args = p.parse_args(argv)
    given = {key for key in ("finetuned_prompt", "height", "width") if getattr(args, key) is not None}
    if args.from_png:
        try:
            settings = outputs.read_settings(args.from_png)
        except ValueError as e:
            cli.fail(e)
        files = ("base", "finetuned", *outputs.FILES, *outputs.MADE_ON)  # found by fingerprint in load(), unless given
        p.set_defaults(**{**{key: value for key, value in settings.items() if key not in files},
                          "target": [settings["target"]]})
        args = p.parse_args(argv)
    args.recorded, args.given = (settings if args.from_png else None), given
    return args


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


def find_finetuned(paths):
    if paths == ["none"]:
        return []
    if paths:
        return [cli.find_model(path) for path in paths]
    found = sorted(glob.glob(os.path.join(cli.FINETUNED_DIR, "*.safetensors")), key=os.path.getmtime)
    found = [p for p in found if not p.endswith(".resume.safetensors")]
    if not found:
        raise ValueError(f"no fine-tuned file in {cli.FINETUNED_DIR}/: run train.py first, "
                         "pass --finetuned PATH, or --finetuned none for plain SD")
    cli.say(f"fine-tuned: {found[-1]} (the newest in {cli.FINETUNED_DIR}/)")
    return found[-1:]


def find_recorded(png, flag, path, fingerprint_wanted, model=None, from_png=None):
    """A file that --from's PNG names: at its recorded place (from the program's folder, or from the
    PNG's own), or any copy with its fingerprint in weights/, finetuned/ or $SINE_MODELS. Else one
    line that says what changed. model: what the PNG recorded of a fine-tuned file (its training
    prompt and steps)."""
    if not fingerprint_wanted:  # a PNG from before fingerprints were recorded: the path, unchecked
        return path if os.path.isfile(path) else gone(png, flag, path)
    near = os.path.dirname(os.path.dirname(os.path.abspath(png)))  # where edit.py ran, if the PNG is in its --out
    paths = [path] + ([os.path.join(os.path.dirname(os.path.abspath(png)), from_png)] if from_png else [])
    found = cli.find_by_fingerprint(fingerprint_wanted, paths, near=near)
    if found:
        return found
    there = next((p for p in cli.places(paths, near=near) if os.path.basename(p) == os.path.basename(path)), None)
    if there is None:
        gone(png, flag, path)
    now = read_header(there).get("__metadata__") or {}
    what = (f": {now.get('steps')} steps, the image's had {model['steps']}"
            if model and str(model.get("steps")) != now.get("steps") else f" (fingerprint {fingerprint(there)}, "
            f"the image's {fingerprint_wanted})")
    raise ValueError(f"{os.path.relpath(there)} has changed since {png} was made{what}. No copy of the old one is "
                     f"in weights/ or finetuned/: pass {flag} with it, or give {flag} the new one to use it as it is")


def gone(png, flag, path):
    raise ValueError(f"--from {png} was made with {path}, which is not there (any more), and no file in "
                     f"weights/ or finetuned/ has its fingerprint: pass {flag} with the file's new place")


def recorded_files(args):
    """--from: the fine-tuned files its PNG names, found by fingerprint (a --finetuned given beside it wins)."""
    settings = args.recorded
    if args.finetuned or settings["finetuned"] == ["none"]:
        return args.finetuned or ["none"]
    count = len(settings["finetuned"])
    fingerprints = (settings.get("fingerprints") or {}).get("finetuned") or [None] * count
    from_png = (settings.get("paths_from_png") or {}).get("finetuned") or [None] * count
    return [find_recorded(args.from_png, "--finetuned", *found)
            for found in zip(settings["finetuned"], fingerprints, settings.get("models") or [None] * count, from_png)]


def choose_base(args, files, metadata):
    """--base if given; else for --from the PNG's base, found by fingerprint; else the base that the
    first fine-tuned file records; with none, the one SD v1 file in weights/."""
    if args.base:
        return cli.find_model(args.base)
    if args.recorded and not (files and args.finetuned):
        fp = (args.recorded.get("fingerprints") or {}).get("base")
        from_png = (args.recorded.get("paths_from_png") or {}).get("base")
        return find_recorded(args.from_png, "--base", args.recorded["base"], fp, from_png=from_png)
    if files:
        return cli.base_of(files[0], metadata[0])
    return cli.find_base()


def check_args(args):
    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be from 1 to 1000, the noise levels SD v1 was trained with (got {args.steps})")
    if not 0 <= args.scale < float("inf"):  # also refuses nan
        raise ValueError(f"--scale must be 0 or more (got {args.scale})")
    if args.n < 1:
        raise ValueError(f"--n must be at least 1 (got {args.n})")
    if not 0 <= args.eta <= 1:
        raise ValueError(f"--eta must be between 0 and 1 (got {args.eta})")
    seed = random.randrange(2**32) if args.seed == -1 else args.seed
    if args.seed == -1:
        cli.say(f"seed: {seed}")
    cli.check_seed(seed, args.n, random_too=True)
    if not args.target:
        raise ValueError('--target is needed: the edit, e.g. --target "... covered by snow" (or --from PNG)')
    for flag, prompts in (("--target", args.target), ("--negative", [args.negative])):
        if any(sine.PLACEHOLDER in prompt for prompt in prompts):
            raise ValueError(f"{flag} is for the pre-trained model, which does not know {sine.PLACEHOLDER}: name the "
                             'class instead ("a castle in snow"), or continue the training prompt ("... in snow")')
    if os.path.isfile(args.out) or args.out.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        raise ValueError(f"--out {args.out} names a file, but --out is the folder for the PNGs, e.g. --out results")
    return seed


# ---------------------------------------------------------------------------------------------

class StepWatch:
    """sine.edit's two callbacks for --strip: every step's x0_hat, and at guided steps the x0_hat
    that each model asks for on its own (see sine.sine_eps), then what each fine-tuned model draws
    with its own classifier-free guidance: its training prompt against its own empty prompt, one
    more UNet pass a guided step, under --strip only."""

    def __init__(self, guides, own_unconds, scale):
        self.guides, self.own_unconds, self.scale = guides, own_unconds, scale
        self.estimates = []  # [(t, x0_hat)], noisiest first
        self.alone = {}      # t -> x0_hat of [the pre-trained model alone, each guide alone, each guide's own CFG]
        self.alphas = alphas_cumprod()

    def callback(self, t, x0_hat):
        self.estimates.append((t, x0_hat))

    def each_alone(self, z, t, eps_alone):
        t_batch, alphas = torch.full((1,), t, device=z.device), self.alphas.to(z.device)
        own = [None if eps is None else self.own_guidance(z, t, guide, uncond)
               for eps, guide, uncond in zip(eps_alone[1:], self.guides, self.own_unconds)]
        self.alone[t] = [e if e is None else predict_x0(z, e, t_batch, alphas) for e in eps_alone + own]

    def own_guidance(self, z, t, guide, uncond):
        """Eq. 2 with the fine-tuned model in both places: what it knows of the photo, by itself."""
        both = torch.cat([guide.context, uncond])                                 # (2, 77, 768)
        eps_cond, eps_uncond = guide.unet(torch.cat([z, z]), torch.full((2,), t, device=z.device), both,
                                          guide.position).float().chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.scale)


def steps_strip(sd, watch, guides, columns=10):
    """One image of one sample's steps, noisiest first, a cell per DDIM step. "guided" marks the
    steps on which a fine-tuned model guided (t > its K). Under each guided step, the rows below
    show what the pre-trained model and each fine-tuned model would make of it alone (Eq. 3 with all
    the weight on one model; the guided cell mixes their noise predictions, v times the first, 1 - v
    the second, not their pictures), then what each fine-tuned model draws with its own guidance."""
    n = len(guides)
    names = (["v=1: pre-trained", "v=0: fine-tuned", "fine-tuned's own CFG"] if n == 1 else
             ["pre-trained"] + [f"fine-tuned {i + 1} (v=0)" for i in range(n)] + [f"own CFG {i + 1}" for i in range(n)])
    rows_per_step = 1 + len(names) if watch.alone else 1
    cells = {}
    for i, (t, x0_hat) in enumerate(watch.estimates):
        band, col = divmod(i, columns)
        guided = " guided" if t in watch.alone else ""
        cells[band * rows_per_step, col] = (pictures.decode(sd, x0_hat), f"t={t}{guided}")
        for row, (x0_alone, name) in enumerate(zip(watch.alone.get(t, []), names), start=1):
            if x0_alone is not None:
                cells[band * rows_per_step + row, col] = (pictures.decode(sd, x0_alone), name)
    return pictures.grid_image(cells, max(row for row, _ in cells) + 1, min(columns, len(watch.estimates)))


def joined(values, sep="/"):
    """(400, 600) -> '400/600', as --K and --v take them; (0.8,) -> '0.8'."""
    return sep.join(f"{x:g}" for x in values)


def label(K, v):
    return f"K={joined(K)} v={joined(v)}"


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
    precision: cli.Precision
    base: str                        # the base checkpoint's path
    base_fingerprint: str
    model_hash: str                  # AUTOMATIC1111's: the base file's SHA-256, 10 hex digits
    seed: int                        # --seed, or the one drawn for -1


def choose_precision(args, device, files):
    """--precision on this device. With --from, the image's, unless it was made on another kind of
    device, whose dtypes may not suit this one (fp16 is slow on a CPU): then auto."""
    choice, made_on = args.precision, args.recorded and args.recorded.get("device")
    if made_on and made_on != device.type and choice == args.recorded["precision"]:
        choice = "auto"
    precision = cli.sampling_precision(device, choice)
    return precision if files else cli.Precision(precision.base, precision.base)  # plain SD: one UNet


def own_prompt_and_size(args, metadata):
    """(--finetuned-prompt, --height, --width) as given, or from --from's PNG. With --from PNG
    --finetuned OTHER, OTHER guides with its own training prompt, at its own photo's aspect, not with
    the image's model's, unless those were given beside it; said in one line."""
    chosen = {"finetuned_prompt": args.finetuned_prompt, "height": args.height, "width": args.width}
    recorded = args.recorded and args.finetuned and (args.recorded.get("fingerprints") or {}).get("finetuned")
    if not recorded or recorded == [m["fingerprint"] for m in metadata]:
        return chosen.values()
    dropped = [key for key in chosen if key not in args.given]
    said = list(dict.fromkeys({"finetuned_prompt": "training prompt"}.get(key, "photo's aspect") for key in dropped))
    if said:
        cli.say(f"note: {args.from_png} was made with another model than --finetuned: this edit takes the new "
                f"model's {' and '.join(said)}, not the image's (--finetuned-prompt, --height and --width choose)")
    return [None if key in dropped else value for key, value in chosen.items()]


def find_models(args, files):
    """Each fine-tuned file's metadata and fingerprint, and the base they were made from, checked:
    (metadata, base, its fingerprint, its config)."""
    metadata = [finetuned_file.read_metadata(path) for path in files]
    base = choose_base(args, files, metadata)
    config = read_config(base)  # also refuses anything but an SD v1 file
    base_fingerprint = fingerprint(base)
    for path, meta in zip(files, metadata):
        finetuned_file.check_base(path, meta, base, base_fingerprint)
        meta["fingerprint"] = fingerprint(path)
    return metadata, base, base_fingerprint, config


def sampling_prompts(prompts, metadata):
    """Each guide's prompt, c_hat: its training prompt unless --finetuned-prompt gives one."""
    prompts = prompts or [m["prompt"] for m in metadata]
    if len(prompts) != len(metadata):
        raise ValueError(f"--finetuned-prompt: give one prompt per --finetuned file ({len(metadata)})")
    for meta, prompt in zip(metadata, prompts):
        if sine.PLACEHOLDER not in prompt:
            raise ValueError(f'--finetuned-prompt {prompt!r} needs the identifier {sine.PLACEHOLDER}, which stands '
                             'for what the model learned: e.g. "a [*] dog"')
        meta["sampling_prompt"] = prompt


def output_size(metadata, config, height, width):
    """The photo's aspect (or the base's square, for plain SD), unless --height or --width set it."""
    step = pictures.size_step(config)
    pictures.check_size(height, "height", step)
    pictures.check_size(width, "width", step)
    source = metadata[0]["source_size"] if metadata else f"{config.image_size}x{config.image_size}"
    height, width = pictures.default_size(tuple(int(x) for x in source.split("x")), height, width,
                                          config.image_size, step)
    if max(height, width) > pictures.MAX_SIZE:
        raise ValueError(f"the photo's aspect ratio gives {width}x{height}, over {pictures.MAX_SIZE} a side: "
                         "choose the size with --height and --width")
    return height, width


def load(args):
    """Check every argument, then load the models. A user's mistake raises ValueError or OSError
    before any weight is read. args stays as parsed: what is found or drawn is in the Setup."""
    seed = check_args(args)
    cli.use_huge_pages()
    cli.use_threads(args.threads)
    files = find_finetuned(recorded_files(args) if args.from_png else args.finetuned)
    Ks = parse_sweep(args.K, "K", max(1, len(files)), int, 0, 1000)
    vs = parse_sweep(args.v, "v", max(1, len(files)), float, 0.0, 1.0)
    if not files:
        Ks, vs = Ks[:1], vs[:1]  # nothing to sweep without a fine-tuned model
    if any(sum(1 - x for x in v) > 1 for v in vs):
        raise ValueError(f"--v {args.v}: the fine-tuned models' shares (1 - v each) add up to more than 1")
    metadata, base, base_fingerprint, config = find_models(args, files)
    prompts, height, width = own_prompt_and_size(args, metadata)
    sampling_prompts(prompts, metadata)
    if any(target.startswith(("...", "\u2026")) for target in args.target) and not metadata:
        raise ValueError('a target starting with "..." needs a fine-tuned model\'s prompt; write it in full')
    height, width = output_size(metadata, config, height, width)
    device = cli.pick_device(args.device)
    precision = choose_precision(args, device, files)
    cli.check_writable_folder(os.path.join(args.out, "x.png"))
    # Each model straight into its precision, the fine-tuned ones rounded only after their differences
    # are added; they share the base's VAE, which they never change.
    sd = load_sd(base, device=device, dtype=precision.base)
    finetuned = []
    for path in files:
        cli.return_freed_memory()  # the fp32 tensors each weight was read into
        finetuned.append(finetuned_file.load_finetuned(base, path, device, precision.finetuned, shared_vae=sd.vae))
    return Setup(sd, finetuned, files, metadata, Ks, vs, height, width, device, precision, base, base_fingerprint,
                 cli.model_hash(base), seed)


def trained_sizes(finetuned, metadata):
    """The canvas and crops it was fine-tuned with; files from before sizes were recorded are SD v1's."""
    sizes = sine.sizes_for(finetuned.config)
    return sine.Sizes(int(metadata.get("crop", sizes.crop)), sizes.cell)


def image_settings(args, s, target, K, v, seed):
    """Everything that made one image, under edit.py's flag names: outputs.py writes it into the PNG."""
    return {"target": target, "negative": args.negative,
            "finetuned": [cli.recorded_path(path) for path in s.files] or ["none"],
            "finetuned_prompt": [m["sampling_prompt"] for m in s.metadata], "base": cli.recorded_path(s.base),
            "fingerprints": {"base": s.base_fingerprint, "finetuned": [m["fingerprint"] for m in s.metadata]},
            "paths_from_png": {"base": cli.path_from(s.base, args.out),
                               "finetuned": [cli.path_from(path, args.out) for path in s.files]},
            "model_hash": s.model_hash,
            "K": joined(K), "v": joined(v), "scale": args.scale,
            "steps": args.steps, "eta": args.eta, "seed": seed, "width": s.width, "height": s.height,
            "precision": str(s.precision), "device": s.device.type, "tile_vae": use_tiles(args.tile_vae, s.width * s.height),
            "channels_last": args.channels_last,
            "models": [{"prompt": m["prompt"], "steps": int(m["steps"])} for m in s.metadata]}


def render(args, s, autocast):
    """Every target, seed and (K, v) of the sweep, as soon as each is sampled: (image, file stem, settings)."""
    encode = lambda model, prompt: model.text_encoder(model.tokenizer([prompt]).to(s.device))
    latent_size = (s.height // s.sd.config.vae.factor, s.width // s.sd.config.vae.factor)
    with torch.no_grad():
        uncond = encode(s.sd, args.negative)
        guides = [sine.Guide(cli.InPrecision(ft.unet, s.device, s.precision.finetuned),
                             encode(ft, sine.training_prompt(meta["sampling_prompt"])),
                             sine.full_position_map(ft.config.unet.model_channels, latent_size, s.device,
                                                    trained_sizes(ft, meta)) if meta["position_map"] == "True" else None)
                  for ft, meta in zip(s.finetuned, s.metadata)]
        own_unconds = [encode(ft, "") for ft in s.finetuned] if args.strip else []  # for the strip's own-CFG rows
    for ft in s.finetuned:  # its text encoder's only work was c_hat: 0.5 GB freed
        ft.text_encoder = None
    for target in args.target:
        target = sine.target_prompt(target, s.metadata[0]["prompt"] if s.metadata else "")
        with torch.no_grad():
            cond = encode(s.sd, target)
        cli.say(f"target: {target!r}, {s.width}x{s.height}")
        for seed in range(s.seed, s.seed + args.n):
            cells = {}
            for (r, K), (c, v) in itertools.product(enumerate(s.Ks), enumerate(s.vs)):
                for guide, K_i, v_i in zip(guides, K, v):
                    guide.K, guide.v = K_i, v_i
                generator = torch.Generator().manual_seed(seed)
                noise = torch.randn((1, 4, *latent_size), generator=generator).to(s.device)
                watch = StepWatch(guides, own_unconds, args.scale) if args.strip else None
                with cli.out_of_memory_hint(f"{s.width}x{s.height} is too large for this device; lower --height/--width"):
                    pixels = sine.edit(s.sd, guides, cond, uncond, noise, args.scale, args.steps, args.eta, generator,
                                       autocast=autocast, tiled=args.tile_vae, callback=watch and watch.callback,
                                       each_alone=watch and watch.each_alone)
                if not torch.isfinite(pixels).all():  # as a PNG it would be black
                    cli.fail(f"the sample turned nan or inf (seed {seed}, {label(K, v)}), so no PNG was written for "
                             f"it: check that --base is a working SD v1 file{' and try --precision fp32' if autocast else ''}")
                settings = image_settings(args, s, target, K, v, seed)
                image = pictures.to_pil(pixels)
                stem = f"seed{seed}" + (f"-K{joined(K, '_')}-v{joined(v, '_')}" if guides else "")
                yield image, stem, settings
                if watch:
                    yield steps_strip(s.sd, watch, guides), stem + "-steps", settings
                cells[r, c] = (image, label(K, v))
            if len(cells) > 1:
                yield (pictures.grid_image(cells, len(s.Ks), len(s.vs), title=target), f"seed{seed}-grid",
                       {**settings, "K": args.K, "v": args.v, "grid": "rows K, columns v"})


def say_precision(args, s):
    """One line of what the UNets compute in; with --from, also when it or the device is not the image's."""
    cli.say(f"precision: {s.precision} (the pre-trained UNet's/the fine-tuned ones') on {s.device}"
            if s.precision.base != s.precision.finetuned else f"precision: {s.precision} on {s.device}")
    made = args.recorded and (args.recorded.get("precision"), args.recorded.get("device"))
    if made and made[1] and made != (str(s.precision), s.device.type):
        cli.say(f"note: {args.from_png} was made in {made[0]} on {made[1]}; its pixels will differ slightly here")


def main(argv=None):
    args = parse_args(argv)
    cli.plain_warnings()
    try:
        with cli.out_of_memory_hint("the models do not fit this device: use a machine with more memory, or "
                                    "--precision bf16, which needs 1.7 GB less but keeps less of the fine-tune"):
            setup = load(args)
    except (ValueError, OSError) as e:
        cli.fail(e)
    cli.say(f"base: {setup.sd.description}")
    say_precision(args, setup)
    autocast = cli.autocast_to(setup.device, setup.precision.base)
    for loaded in [setup.sd] + setup.finetuned:
        cli.speed_up(loaded.unet, args.channels_last, args.compile)
    written = []
    try:
        for image, stem, settings in render(args, setup, autocast):
            with cli.hold_ctrl_c():  # so that every PNG on disk is printed and counted
                written.append(outputs.write_png(image, args.out, stem, settings))
                print(written[-1], flush=True)
    except OSError as e:
        cli.fail(f"could not write a PNG in {args.out} ({e.strerror or e}); the {len(written)} written before are intact")
    except KeyboardInterrupt:
        cli.say(f"interrupted: the {len(written)} PNG(s) written so far are kept")
        sys.exit(130)


if __name__ == "__main__":
    main()
