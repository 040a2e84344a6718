"""edit.py's PNGs: names that sort by run, and every setting of each image in two text chunks.

    parameters  AUTOMATIC1111's plain-text layout, which its "PNG Info" tab, ComfyUI and civitai read:
                    a photo of a cat covered by snow
                    Negative prompt: blurry
                    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 768x512, Model: v1-5, SINE K: 400, ...
    sine        the same settings as JSON, under edit.py's own flag names: `edit.py --from PNG` reads it.

Names start with a counter, as AUTOMATIC1111's do: 00012-seed0-K400-v0.7.png. Nothing is ever
overwritten.
"""
import itertools
import json
import os
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SETTINGS_CHUNK = "sine"
# What --from takes from a PNG: every setting that changes the pixels, under edit.py's flag names.
SETTINGS = ("target", "negative", "finetuned", "finetuned_prompt", "base", "K", "v", "scale", "steps", "eta",
            "seed", "width", "height", "precision", "tile_vae", "channels_last")
# And what --from checks and finds its files by: each file's fingerprint, each fine-tuned file's prompt and steps
# (PNGs from before fingerprints were recorded have none), and each file's path from the PNG's folder.
FILES = ("fingerprints", "models", "paths_from_png")
# Recorded, and compared by --from, but not taken: the device that made the image.
MADE_ON = ("device",)


def quote(value):
    """A value in the parameters line: JSON-quoted where a comma, colon or quote would split it."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def a1111_text(settings):
    """The settings as AUTOMATIC1111 writes them, with SINE's own after its usual keys."""
    fields = {"Steps": settings["steps"], "Sampler": "DDIM", "CFG scale": settings["scale"], "Seed": settings["seed"],
              "Size": f"{settings['width']}x{settings['height']}",
              **({"Model hash": settings["model_hash"]} if settings.get("model_hash") else {}),
              "Model": os.path.splitext(os.path.basename(settings["base"]))[0], "Eta": settings["eta"]}
    models = settings["models"]  # each fine-tuned file's training prompt and steps: what it learned
    for i, (path, prompt, model) in enumerate(zip(settings["finetuned"], settings["finetuned_prompt"], models)):
        n = "" if i == 0 else f" {i + 1}"
        fields.update({f"SINE model{n}": os.path.basename(path), f"SINE model{n} steps": model["steps"],
                       f"SINE training prompt{n}": model["prompt"], f"SINE prompt{n}": prompt})
    if models:
        fields.update({"SINE K": settings["K"], "SINE v": settings["v"]})
    fields.update({"Precision": settings["precision"], "Device": settings["device"], "Tiled VAE": settings["tile_vae"],
                   "channels_last": settings["channels_last"]})
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items())
    return f"{settings['target']}\nNegative prompt: {settings['negative']}\n{line}"


def next_number(folder):
    """One more than the largest counter among the names in folder (0 for an empty one)."""
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := re.match(r"(\d{5,})-", name))]
    return max(numbers, default=-1) + 1


def write_png(image, folder, stem, settings):
    """Save as `NNNNN-stem.png` under the next free counter; return the path. The PNG is written to
    a temporary file, then linked under its name: never half a PNG, never an overwrite."""
    info = PngInfo()
    info.add_text("parameters", a1111_text(settings))
    info.add_text(SETTINGS_CHUNK, json.dumps(settings))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}.png")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        for number in itertools.count(next_number(folder)):
            path = os.path.join(folder, f"{number:05d}-{stem}.png")
            try:
                os.link(tmp, path)  # unlike a rename, a link never replaces a file that exists
            except FileExistsError:  # another edit.py writes into the same folder
                continue
            except OSError:  # a file system without hard links (FAT, some network shares)
                if os.path.exists(path):
                    continue
                os.replace(tmp, path)
            return path
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_settings(path):
    """The settings of one of our PNGs, for edit.py --from. ValueError with one line otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"--from {path}: no such file")
    try:
        with Image.open(path) as image:
            chunk = image.text.get(SETTINGS_CHUNK) if hasattr(image, "text") else None
    except (OSError, SyntaxError):
        raise ValueError(f"--from {path}: not a PNG that can be read") from None
    if chunk is None:
        raise ValueError(f"--from {path}: it holds no settings of ours; --from takes a PNG that edit.py wrote")
    settings = json.loads(chunk)
    if settings.get("grid"):
        raise ValueError(f"--from {path} is a grid of several edits: pass one of its images")
    if "precision" not in settings:  # a PNG from before --precision: bf16 or fp32 for every UNet
        settings["precision"] = "bf16" if settings.get("bf16") else "fp32"
    return {**{key: settings[key] for key in SETTINGS}, **{key: settings.get(key) for key in FILES + MADE_ON}}
