"""Hardening: every way a user can get train.py or edit.py wrong ends with one clear line on stderr,
never a traceback, and nothing is created or overwritten; saves survive `kill -9`; Ctrl-C saves and
says how to resume; a pickle is never opened.

The CLIs run as subprocesses from a private copy of the program whose weights/ holds only a
`model.tiny` checkpoint (as in test_cli.py). Every row of the table runs in its own folder, so the
rows can run in parallel and each can prove that nothing in its folder changed. Each row is then
run once more in-process with weight loading, training and sampling booby-trapped, which proves
that the input was checked before any of them started.
"""
import concurrent.futures
import errno
import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import tokenize
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import adamw
import cli
import edit
import finetuned_file
import outputs
import model.loader
import pictures
import sine
import train
from model import load_sd
from model.tiny import TINY, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PROMPT = "a photo of a [*] castle"
PHOTO_SIZE = (64, 48)  # (w, h)
MARKER = "PAYLOAD-RAN"  # what the booby-trapped pickles create, in the work folder, if ever unpickled
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------
# Helpers

def script(root, name):
    return [sys.executable, os.path.join(root, name)]


def run(root, name, *args, cwd):
    return subprocess.run(script(root, name) + [str(a) for a in args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def snapshot(folder, skip=()):
    """Every folder and file under folder, each file with its size, mtime and contents hash."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        state[os.path.relpath(dirpath, folder) + os.sep] = "folder"
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            state[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, sha256(path))
    return state


def changes(before, after):
    return {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def error_line(stderr):
    """The CLI's whole complaint: exactly one non-empty line, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


def exit_message(exit_info):
    """In-process, cli.fail's line is the SystemExit's message: Python prints it on the way out."""
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    return error_line(message)


def load_tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class Payload:
    """Unpickling this creates the marker file: proof that a pickle was opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


# ---------------------------------------------------------------------------------------------
# Inputs: photos in every awkward format, pickles, and checkpoints that are not SD v1

def photo_array():
    """A gradient with a different colour in every corner, so that a rotation is visible."""
    w, h = PHOTO_SIZE
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), 255 - x * 255 // (w - 1)], axis=-1).astype(np.uint8)


def photo_rgb(path):
    Image.fromarray(photo_array()).save(path)


def photo_gray(path):
    Image.fromarray(photo_array()).convert("L").save(path)


def photo_rgba(path):
    rgba = np.concatenate([photo_array(), np.full(photo_array().shape[:2] + (1,), 90, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(path)


PALETTE = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [240, 240, 20]], np.uint8)


def palette_indices():
    w, h = PHOTO_SIZE
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 2 // w) + 2 * (y * 2 // h)).astype(np.uint8)  # four quadrants


def photo_palette(path):
    image = Image.fromarray(palette_indices(), "P")
    image.putpalette(PALETTE.flatten().tolist())
    image.save(path)


def photo_cmyk_jpeg(path):
    Image.fromarray(photo_array()).convert("CMYK").save(path, quality=95)


def gray16_array():
    return photo_array()[..., 0].astype(np.uint16) * 256 + 100  # 100..65380: the low byte must not matter


def photo_gray16(path):
    image = Image.fromarray(gray16_array())
    assert image.mode == "I;16"
    image.save(path)


def photo_exif_rotated(path):
    """Stored landscape, with EXIF orientation 6: shown rotated 90 degrees clockwise, as a phone does."""
    image = Image.fromarray(photo_array())
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


def photo_bomb(path, width=8000, height=6000):
    """A real decompression bomb: 48 megapixels of grey that compress to ~50 kB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, row = zlib.compressobj(9), b"\0" * (width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def photo_truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray(photo_array()).save(buffer, format="PNG")
    Path(path).write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])


def pickle_p4(path, root):
    Path(path).write_bytes(pickle.dumps({"state_dict": Payload(os.path.join(root, MARKER))}, protocol=4))


def pickle_p0(path, root):
    Path(path).write_bytes(pickle.dumps(Payload(os.path.join(root, MARKER)), protocol=0))


def torch_zip(path, root):
    torch.save({"state_dict": Payload(os.path.join(root, MARKER))}, path)


def torch_legacy(path, root):
    torch.save({"state_dict": Payload(os.path.join(root, MARKER))}, path, _use_new_zipfile_serialization=False)


def fake_checkpoint(shapes):
    def make(path, root):
        save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in shapes.items()}, path)
    return make


SD2 = fake_checkpoint({"cond_stage_model.model.ln_final.weight": [1024],
                       "model.diffusion_model.input_blocks.1.1.proj_in.weight": [320, 320],
                       "first_stage_model.decoder.conv_out.bias": [3]})
SDXL = fake_checkpoint({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [768],
                        "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]})
INPAINTING = fake_checkpoint({"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3],
                              "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768],
                              "first_stage_model.decoder.conv_out.bias": [3]})
RANDOM_KEYS = fake_checkpoint({"encoder.layer.0.weight": [4, 4], "lm_head.bias": [4]})


def truncated_base(path, root):
    data = Path(root, "weights", "tiny.safetensors").read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def not_safetensors(path, root):
    photo_rgb(path + ".png")
    os.replace(path + ".png", path)  # a PNG named .safetensors


def header_longer_than_file(path, root):
    Path(path).write_bytes(struct.pack("<Q", 5000) + b'{"a": {}}')


def header_over_100mb(path, root):
    """A 150 MB (sparse) file whose header claims 120 MB: within the file, over the limit."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 120_000_000) + b"{")
        f.truncate(150_000_000)


def base_without_config(path, root):
    """The tiny checkpoint without its config: SD v1 key names, with shapes that are not SD v1's."""
    write_checkpoint(path, TINY, record_config=False)


def finetuned_copy(name):
    def make(path, root):
        shutil.copy(os.path.join(root, "finetuned.safetensors"), path)
    return make


def truncated_finetuned(path, root):
    data = Path(root, "finetuned.safetensors").read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def resume_state(step, planned, truncated=False):
    """A resume state as train.py writes it (its metadata; an RNG state stands in for the weights)."""
    def make(path, root):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({"rng": torch.Generator().get_state()}, path,
                  metadata={"step": str(step), "planned_steps": str(planned), "run": "{}"})
        if truncated:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[:len(data) - 100])
    return make


def kohya_lora(path, root):
    """Adapters as export.py --lora writes them (two layers suffice)."""
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1), "lora_unet_conv_in.alpha": torch.tensor(4.0),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)}, path,
              metadata={"sine.exported_from": "castle.safetensors", "ss_network_dim": "4"})


def whole_export(path, root):
    """A base with the metadata that export.py writes into a whole checkpoint."""
    with safe_open(os.path.join(root, "weights", "tiny.safetensors"), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, path,
                  metadata={**f.metadata(), "sine.exported_from": "castle.safetensors"})


def text_file(path, root):
    Path(path).write_text("not a photo\n")


def empty_file(path, root):
    Path(path).write_bytes(b"")


def regular_file(path, root):
    Path(path).write_bytes(b"some file in the way\n")


def photo(maker):
    return lambda path, root: maker(path)


# ---------------------------------------------------------------------------------------------
# The table

@dataclass
class Row:
    id: str
    script: str
    args: list                   # {root}, {base}, {finetuned}, {other_base} are filled in
    words: list                  # must all be in the one error line (same placeholders)
    inputs: dict = field(default_factory=dict)   # file name in the row's folder -> maker(path, root)
    accepted: tuple = None       # accepted rows: the source size (w, h) the fine-tuned file must record


def train_row(id, image, prompt, *options, words, inputs=None, accepted=None):
    inputs = {"photo.png": photo(photo_rgb), **(inputs or {})}
    return Row(id, "train.py", [image, prompt, "--steps", "1", *options], words, inputs, accepted)


def edit_row(id, *options, words, inputs=None, **flags):
    values = {"target": "... in snow", "finetuned": "{finetuned}", "steps": "1", "height": "64", "width": "64",
              "out": "pngs", **flags}
    args = [x for k, v in values.items() for x in (f"--{k}", v)]
    return Row(id, "edit.py", args + list(options), words, inputs or {})


def base_row(id, file, maker, *words):
    """train.py with --base file: the error names the file and the words."""
    return train_row(id, "photo.png", PROMPT, "--base", file, words=[file, *words], inputs={file: maker})


def accepted_row(id, file, maker, size):
    return train_row(id, file, PROMPT, words=[], inputs={file: photo(maker)}, accepted=size)


W, H = PHOTO_SIZE
PICKLED = ["pickle", "Convert it to .safetensors"]
NOT_V1 = "needs a Stable Diffusion v1 file"
HAS_MPS = torch.backends.mps.is_available()
ROWS = [
    # the photo
    train_row("image-missing", "nope.jpg", PROMPT, words=["nope.jpg", "no such file"]),
    train_row("image-is-a-folder", "pics", PROMPT, words=["pics", "directory"],
              inputs={"pics/a.png": photo(photo_rgb)}),
    train_row("image-text-named-jpg", "notes.jpg", PROMPT, words=["notes.jpg", "not an image"],
              inputs={"notes.jpg": text_file}),
    train_row("image-truncated", "cut.png", PROMPT, words=["cut.png", "truncated"],
              inputs={"cut.png": photo(photo_truncated_png)}),
    train_row("image-over-40-megapixels", "bomb.png", PROMPT, words=["bomb.png", "8000x6000", "40 megapixels"],
              inputs={"bomb.png": photo(photo_bomb)}),
    accepted_row("image-grayscale", "gray.png", photo_gray, (W, H)),
    accepted_row("image-rgba", "rgba.png", photo_rgba, (W, H)),
    accepted_row("image-palette", "palette.png", photo_palette, (W, H)),
    accepted_row("image-cmyk", "cmyk.jpg", photo_cmyk_jpeg, (W, H)),
    accepted_row("image-16-bit", "gray16.png", photo_gray16, (W, H)),
    accepted_row("image-exif-rotated", "phone.jpg", photo_exif_rotated, (H, W)),  # stored landscape, shown portrait
    # the prompt
    train_row("prompt-without-identifier", "photo.png", "a photo of a castle",
              words=["[*]", "identifier", 'e.g. "a photo of a [*] castle"']),
    # --base
    base_row("base-pickle-ckpt", "sd.ckpt", torch_zip, *PICKLED),
    base_row("base-pickle-pt", "sd.pt", torch_legacy, *PICKLED),
    base_row("base-pickle-bin", "sd.bin", pickle_p4, *PICKLED),
    base_row("base-pickle-renamed", "sd.safetensors", pickle_p4, *PICKLED),
    base_row("base-pickle-zip-renamed", "sd.safetensors", torch_zip, *PICKLED),
    base_row("base-pickle-protocol0-renamed", "sd.safetensors", pickle_p0, *PICKLED),
    train_row("base-missing", "photo.png", PROMPT, "--base", "nope.safetensors",
              words=["nope.safetensors", "no such file"]),
    base_row("base-truncated", "cut.safetensors", truncated_base, "truncated", "bytes on disk", "Download it again"),
    base_row("base-not-safetensors", "png.safetensors", not_safetensors, "not a valid safetensors file"),
    base_row("base-empty", "empty.safetensors", empty_file, "not a safetensors file", "0 bytes"),
    base_row("base-header-longer-than-file", "long.safetensors", header_longer_than_file, "header claims 5000 bytes"),
    base_row("base-header-over-100mb", "huge.safetensors", header_over_100mb, "header claims 120000000 bytes"),
    base_row("base-sd2", "sd2.safetensors", SD2, "an SD 2.x checkpoint", NOT_V1),
    base_row("base-sdxl", "sdxl.safetensors", SDXL, "an SDXL checkpoint", NOT_V1),
    base_row("base-inpainting", "inpaint.safetensors", INPAINTING, "inpainting", "9 input channels", NOT_V1),
    base_row("base-random-keys", "other.safetensors", RANDOM_KEYS, "not a Stable Diffusion checkpoint", NOT_V1),
    base_row("base-wrong-shapes", "odd.safetensors", base_without_config, "does not match the SD v1 layout"),
    base_row("base-is-a-kohya-lora", "lora.safetensors", kohya_lora, "LoRA in kohya's layout", "castle.safetensors",
             "not a base checkpoint"),
    base_row("base-is-finetuned", "ft.safetensors", finetuned_copy("ft"), "fine-tuned file", "--finetuned", "--base"),
    # numbers and the output
    train_row("train-steps-0", "photo.png", PROMPT, "--steps", "0", words=["--steps", "at least 1", "got 0"]),
    train_row("train-batch-0", "photo.png", PROMPT, "--batch", "0", words=["--batch", "at least 1", "got 0"]),
    train_row("train-threads-0", "photo.png", PROMPT, "--threads", "0", words=["--threads", "at least 1", "got 0"]),
    train_row("train-lr-nan", "photo.png", PROMPT, "--lr", "nan", words=["--lr", "positive"]),
    train_row("train-out-exists", "photo.png", PROMPT, "--out", "mine.safetensors",
              words=["mine.safetensors", "exists", "--overwrite"], inputs={"mine.safetensors": finetuned_copy("mine")}),
    train_row("train-out-under-a-file", "photo.png", PROMPT, "--out", "blocker/ft.safetensors",
              words=["blocker", "cannot write", "--out"], inputs={"blocker": regular_file}),
    train_row("train-out-a-pickle-name", "photo.png", PROMPT, "--out", "tri.ckpt",
              words=["--out tri.ckpt", ".safetensors", "pickle", "--out tri.safetensors"]),
    train_row("train-resume-without-state", "photo.png", PROMPT, "--resume",
              words=["--resume", "photo.resume.safetensors", "--save-every"]),
    train_row("train-out-is-an-unfinished-run", "photo.png", PROMPT,
              words=[os.path.join("finetuned", "photo.safetensors"), "unfinished run", "step 5 of 1000", "--overwrite",
                     "which replaces it", "continue it with: ", "train.py photo.png", "--resume"],
              inputs={"finetuned/photo.safetensors": finetuned_copy("photo"),
                      "finetuned/photo.resume.safetensors": resume_state(5, 1000)}),
    train_row("train-resume-state-truncated", "photo.png", PROMPT, "--resume",
              words=["photo.resume.safetensors", "truncated", "resume state", "--overwrite"],
              inputs={"finetuned/photo.safetensors": finetuned_copy("photo"),
                      "finetuned/photo.resume.safetensors": resume_state(5, 1000, truncated=True)}),
    train_row("train-seed-too-large", "photo.png", PROMPT, "--seed", "99999999999999999999",
              words=["--seed", "18446744073709551615", "got 99999999999999999999"]),
    train_row("train-device-gpu", "photo.png", PROMPT, "--device", "gpu", words=["--device gpu", "cuda", "cpu"]),
    train_row("train-device-0", "photo.png", PROMPT, "--device", "0", words=["--device 0", "cuda:N"]),
    *([] if HAS_MPS else [  # on a Mac, --device mps is no mistake
        train_row("train-device-mps", "photo.png", PROMPT, "--device", "mps", words=["--device mps", "Apple", "cpu"])]),
    train_row("prompt-where-the-photo-goes", PROMPT, "photo.png",
              words=["the photo comes first", f'train.py photo.png "{PROMPT}"']),
    # edit.py: the fine-tuned file and the base
    edit_row("finetuned-pickle-ckpt", words=["ft.ckpt", *PICKLED], inputs={"ft.ckpt": pickle_p4},
             finetuned="ft.ckpt"),
    edit_row("finetuned-pickle-renamed", words=["ft.safetensors", *PICKLED], inputs={"ft.safetensors": torch_zip},
             finetuned="ft.safetensors"),
    edit_row("finetuned-is-a-base", words=["{base}", "base checkpoint", "--base"], finetuned="{base}"),
    edit_row("finetuned-from-another-base", base="{other_base}",
             words=["{finetuned}", "fine-tuned from tiny.safetensors", "{other_base}", "--base"]),
    edit_row("finetuned-is-a-resume-state", words=["castle.resume.safetensors", "resume state", "castle.safetensors"],
             inputs={"castle.resume.safetensors": finetuned_copy("resume")}, finetuned="castle.resume.safetensors"),
    edit_row("finetuned-is-a-kohya-lora", words=["lora.safetensors", "LoRA in kohya's layout", "export.py",
                                                 "castle.safetensors", "the file train.py wrote"],
             inputs={"lora.safetensors": kohya_lora}, finetuned="lora.safetensors"),
    edit_row("finetuned-is-a-whole-export", words=["whole.safetensors", "export.py", "castle.safetensors",
                                                   "the one train.py wrote"],
             inputs={"whole.safetensors": whole_export}, finetuned="whole.safetensors"),
    edit_row("edit-threads-0", "--threads", "0", words=["--threads", "at least 1", "got 0"]),
    edit_row("finetuned-missing", words=["nope.safetensors", "no such file"], finetuned="nope.safetensors"),
    edit_row("finetuned-truncated", words=["cut.safetensors", "truncated", "train.py wrote it", "fine-tune again"],
             inputs={"cut.safetensors": truncated_finetuned}, finetuned="cut.safetensors"),
    edit_row("finetuned-base-not-in-weights", words=["{other_finetuned}", "fine-tuned from other-base.safetensors",
                                                     "not in weights/", "--base"], finetuned="{other_finetuned}"),
    edit_row("edit-base-pickle-renamed", words=["sd.safetensors", *PICKLED], inputs={"sd.safetensors": pickle_p4},
             base="sd.safetensors"),
    edit_row("edit-base-sd2", words=["sd2.safetensors", "SD 2", NOT_V1], inputs={"sd2.safetensors": SD2},
             base="sd2.safetensors"),
    # edit.py: numbers and sizes
    edit_row("K-above-1000", words=["--K 1001", "between 0 and 1000"], K="1001"),
    edit_row("K-negative", words=["--K -1", "between 0 and 1000"], K="-1"),
    edit_row("v-above-1", words=["--v 1.5", "between 0.0 and 1.0"], v="1.5"),
    edit_row("v-negative", words=["--v -0.1", "between 0.0 and 1.0"], v="-0.1"),
    edit_row("edit-steps-0", words=["--steps", "from 1 to 1000", "got 0"], steps="0"),
    edit_row("scale-negative", words=["--scale", "0 or more", "got -1.0"], scale="-1"),
    edit_row("height-not-multiple", words=["--height 100", "multiple of 64", "nearest: 64 or 128"], height="100"),
    edit_row("width-below-64", words=["--width 30", "multiple of 64", "nearest: 64"], width="30"),
    edit_row("height-zero", words=["--height 0", "nearest: 64"], height="0"),
    edit_row("height-absurd", words=["--height 64000", "4096", "nearest: 4096"], height="64000"),
    edit_row("edit-out-under-a-file", words=["blocker", "cannot write", "--out"], inputs={"blocker": regular_file},
             out="blocker/pngs"),
    edit_row("edit-steps-2000", words=["--steps", "1 to 1000", "got 2000"], steps="2000"),
    edit_row("edit-seed-too-large", words=["--seed", "got 99999999999999999999"], seed="99999999999999999999"),
    edit_row("edit-seeds-past-the-last", words=["--seed", "18446744073709551614"], seed=str(2 ** 64 - 1), n="2"),
    edit_row("edit-device-gpu", words=["--device gpu", "cuda", "cpu"], device="gpu"),
    edit_row("edit-device-0", words=["--device 0", "cuda:N"], device="0"),
    *([] if HAS_MPS else [edit_row("edit-device-mps", words=["--device mps", "Apple", "cpu"], device="mps")]),
    edit_row("edit-out-names-a-png", words=["--out result.png", "names a file", "folder"], out="result.png"),
    edit_row("edit-out-is-a-file", words=["--out notes", "names a file"], inputs={"notes": text_file}, out="notes"),
    edit_row("finetuned-prompt-without-identifier", "--finetuned-prompt", "a castle",
             words=["--finetuned-prompt 'a castle'", "[*]", "identifier"]),
    edit_row("finetuned-prompts-too-many", "--finetuned-prompt", "a [*] castle", "a [*] tower",
             words=["--finetuned-prompt", "one prompt per --finetuned file"]),
    edit_row("target-with-identifier", words=["--target", "[*]", "pre-trained model", "..."],
             target="a [*] castle in snow"),
    edit_row("negative-with-identifier", words=["--negative", "[*]", "pre-trained model"], negative="a [*] blob"),
    edit_row("edit-seed-minus-2", words=["--seed", "or -1 for a random one", "got -2"], seed="-2"),
]


def fill(text, root):
    return text.format(root=root, base=os.path.join(root, "weights", "tiny.safetensors"),
                       finetuned=os.path.join(root, "finetuned.safetensors"),
                       other_base=os.path.join(root, "other-base.safetensors"),
                       other_finetuned=os.path.join(root, "other-finetuned.safetensors"))


# ---------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A private copy of the program; weights/ holds one tiny checkpoint. Beside it: a fine-tuned
    file made from that checkpoint (no training: the differences are zero) and a second base."""
    root = tmp_path_factory.mktemp("sine-hardening")
    for name in ("train.py", "edit.py", "cli.py", "sine.py", "outputs.py", "export.py", "pictures.py", "finetuned_file.py", "adamw.py"):
        shutil.copy(os.path.join(REPO, name), root / name)
    shutil.copytree(os.path.join(REPO, "model"), root / "model", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "weights").mkdir()
    for name in os.listdir(os.path.join(REPO, "weights")):
        if name.endswith(".gz"):
            shutil.copy(os.path.join(REPO, "weights", name), root / "weights" / name)
    base = str(root / "weights" / "tiny.safetensors")
    write_checkpoint(base, TINY, seed=0)
    write_checkpoint(str(root / "other-base.safetensors"), TINY, seed=1)
    for name, made_from in (("finetuned", base), ("other-finetuned", str(root / "other-base.safetensors"))):
        finetuned_file.save_finetuned(str(root / f"{name}.safetensors"), load_sd(made_from), made_from, {
            "prompt": PROMPT, "position_map": True, "source_size": f"{W}x{H}", "steps": 0, "seed": 0, "lr": 1e-6})
    return str(root)


def prepare(row, root, kind):
    """A fresh folder holding the row's inputs."""
    folder = os.path.join(root, "rows", kind, row.id)
    os.makedirs(folder)
    for name, make in row.inputs.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        make(os.path.join(folder, name), root)
    return folder


@pytest.fixture(scope="module")
def table(root):
    """Run every row's CLI once as a process, in parallel, each in its own folder; snapshot before and after."""
    shared_before = snapshot(root, skip={os.path.join(root, "rows")})
    results = {}
    folders = {row.id: prepare(row, root, "processes") for row in ROWS}
    befores = {row.id: snapshot(folders[row.id]) for row in ROWS}

    def go(row):
        args = [fill(a, root) for a in row.args]
        return row.id, run(root, row.script, *args, cwd=folders[row.id])

    # Accepted rows train a step: start them first so that they overlap the quick ones.
    order = sorted(ROWS, key=lambda r: r.accepted is None)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for row_id, result in pool.map(go, order):
            results[row_id] = result
    return {"results": results, "folders": folders, "before": befores,
            "after": {row.id: snapshot(folders[row.id]) for row in ROWS},
            "shared_before": shared_before, "shared_after": snapshot(root, skip={os.path.join(root, "rows")})}


class WeightsTouched(Exception):
    """Raised by the booby traps: a weight was loaded, a training step or the sampler started."""


@pytest.fixture
def booby_trapped(monkeypatch, root):
    def trap(*args, **kwargs):
        raise WeightsTouched
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", trap)
    monkeypatch.setattr(sine, "step_loss", trap)
    monkeypatch.setattr(sine, "edit", trap)
    monkeypatch.setattr(cli, "PROGRAM_DIR", root)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # load_image changes it
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # train.main must not take over pytest's Ctrl-C


# ---------------------------------------------------------------------------------------------
# The table, through the real CLIs

@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_table(row, root, booby_trapped, monkeypatch, capsys):
    """In-process, with weights, training and sampling booby-trapped: each mistake gets its one line
    before any of them, and an accepted photo passes every check and goes on to load the weights."""
    folder = prepare(row, root, "in-process")
    before = snapshot(folder)
    args = [fill(a, root) for a in row.args]
    monkeypatch.chdir(folder)
    if row.accepted:
        with pytest.raises(WeightsTouched):
            train.main(args)
        return
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        (train if row.script == "train.py" else edit).main(args)
    line = exit_message(exit_info)
    for word in row.words:
        assert fill(word, root) in line, f"{fill(word, root)!r} not in: {line}"
    assert capsys.readouterr().err == "", "nothing else is printed"
    assert not changes(before, snapshot(folder)), f"{row.id} changed files"
    assert not os.path.exists(os.path.join(root, MARKER)), "a pickle was unpickled"


@pytest.mark.full
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_table_as_processes(row, table, root):
    """The same rows through the real processes: a non-zero exit, one line and no traceback, nothing
    on stdout, no file touched; an accepted photo trains a step."""
    result, folder = table["results"][row.id], table["folders"][row.id]
    before, after = table["before"][row.id], table["after"][row.id]
    args = [fill(a, root) for a in row.args]
    if row.accepted:
        assert result.returncode == 0, f"{row.id}: the photo was refused:\n{result.stderr[-2000:]}"
        out = os.path.join("finetuned", os.path.splitext(args[0])[0] + ".safetensors")
        assert result.stdout.strip() == out
        log, state = (os.path.splitext(out)[0] + ext for ext in (".loss.csv", ".resume.safetensors"))
        assert set(changes(before, after)) == {"finetuned" + os.sep, out, log, state}, changes(before, after)
        _, metadata = load_tensors(os.path.join(folder, out))
        assert metadata["source_size"] == "{}x{}".format(*row.accepted), "EXIF rotation not applied?"
        return
    line = error_line(result.stderr)
    assert result.returncode != 0
    assert result.stdout == ""
    for word in row.words:
        assert fill(word, root) in line, f"{fill(word, root)!r} not in: {line}"
    assert not changes(before, after), f"{row.id} changed files: {changes(before, after)}"
    assert not os.path.exists(os.path.join(root, MARKER)), "a pickle was unpickled"


@pytest.mark.full
def test_damaged_files_that_train_py_wrote_are_not_called_downloads(table):
    """A truncated base is downloaded again; a fine-tuned file or resume state is made again."""
    for row_id in ("finetuned-truncated", "train-resume-state-truncated"):
        line = error_line(table["results"][row_id].stderr)
        assert "Download" not in line and "truncated" in line, line


@pytest.mark.full
def test_table_left_shared_files_alone(table):
    assert not changes(table["shared_before"], table["shared_after"])


def test_table_covers_every_photo_mode_and_checkpoint_kind():
    """The issue's rows, by name: a row deleted from the table fails here."""
    ids = {r.id for r in ROWS} | ({"train-device-mps", "edit-device-mps"} if HAS_MPS else set())
    needed = {"train-seed-too-large", "train-device-gpu", "train-device-0", "train-device-mps",
              "prompt-where-the-photo-goes", "edit-steps-2000", "edit-seed-too-large", "edit-device-gpu",
              "edit-device-0", "edit-device-mps", "edit-out-names-a-png", "target-with-identifier",
              "image-missing", "image-is-a-folder", "image-text-named-jpg", "image-over-40-megapixels",
              "image-grayscale", "image-rgba", "image-palette", "image-cmyk", "image-16-bit", "image-exif-rotated",
              "prompt-without-identifier", "base-pickle-ckpt", "base-pickle-pt", "base-pickle-bin",
              "base-pickle-renamed", "finetuned-pickle-ckpt", "finetuned-pickle-renamed", "base-truncated",
              "base-not-safetensors", "base-sd2", "base-sdxl", "base-inpainting", "base-random-keys",
              "finetuned-is-a-base", "finetuned-from-another-base", "K-above-1000", "K-negative", "v-above-1",
              "v-negative", "train-steps-0", "edit-steps-0", "scale-negative", "height-not-multiple",
              "width-below-64", "train-out-under-a-file", "edit-out-under-a-file", "train-out-exists"}
    assert needed <= ids, needed - ids


# ---------------------------------------------------------------------------------------------
# Photos: converted to RGB, rotation applied (pixel by pixel, in-process)

@pytest.mark.parametrize("maker, suffix, expected, tolerance", [
    (photo_gray, ".png", lambda: np.repeat(np.array(Image.fromarray(photo_array()).convert("L"))[..., None], 3, -1), 0),
    (photo_rgba, ".png", lambda: (photo_array().astype(float) * 90 + 255 * (255 - 90)) / 255, 0.5),  # alpha 90 over white
    (photo_palette, ".png", lambda: PALETTE[palette_indices()], 0),
    (photo_cmyk_jpeg, ".jpg", photo_array, 4),
    (photo_gray16, ".png", lambda: np.repeat((gray16_array() >> 8).astype(np.uint8)[..., None], 3, -1), 0),
    (photo_exif_rotated, ".jpg", lambda: np.rot90(photo_array(), k=-1), 4),  # k=-1: clockwise
], ids=["grayscale", "rgba", "palette", "cmyk", "16-bit", "exif-rotated"])
def test_photo_modes_become_rgb(tmp_path, maker, suffix, expected, tolerance):
    path = str(tmp_path / ("photo" + suffix))
    maker(path)
    image = cli.load_image(path)
    assert image.mode == "RGB"
    got, want = np.asarray(image).astype(int), expected().astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() <= tolerance, np.abs(got - want).mean()


# ---------------------------------------------------------------------------------------------
# Pickles are never opened

@pytest.mark.full
def test_renamed_pickle_is_refused_and_its_payload_never_runs(root, tmp_path):
    marker = os.path.join(root, MARKER)
    evil = str(tmp_path / "v1-5-pruned-emaonly.safetensors")
    pickle_p4(evil, root)
    # The payload is live: unpickling it does create the marker.
    pickle.loads(Path(evil).read_bytes())
    assert os.path.exists(marker)
    os.remove(marker)

    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    for name, args in [("train.py", ["photo.png", PROMPT, "--base", evil]),
                       ("edit.py", ["--target", "a castle", "--finetuned", evil, "--height", "64", "--width", "64"]),
                       ("edit.py", ["--target", "a castle", "--finetuned", "none", "--base", evil])]:
        result = run(root, name, *args, cwd=str(tmp_path))
        line = error_line(result.stderr)
        assert result.returncode != 0
        assert evil in line and "pickle" in line and "Convert it to .safetensors" in line, line
        assert not os.path.exists(marker), f"{name} unpickled {evil}"


def test_runtime_code_never_unpickles():
    """No runtime source calls torch.load, pickle, or another unpickler (comments and strings aside)."""
    files = [f for f in os.listdir(REPO) if f.endswith(".py") and not f.startswith(("test_", "conftest"))]
    files += [os.path.join("model", f) for f in os.listdir(os.path.join(REPO, "model")) if f.endswith(".py")]
    assert {"train.py", "edit.py", "cli.py", "sine.py", os.path.join("model", "loader.py")} <= set(files)
    forbidden = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
    for name in files:
        with open(os.path.join(REPO, name), "rb") as f:
            tokens = [t.string for t in tokenize.tokenize(f.readline) if t.type == tokenize.NAME or t.string == "."]
        assert not forbidden & set(tokens), f"{name} uses {forbidden & set(tokens)}"
        calls = {".".join(tokens[i:i + 3]) for i in range(len(tokens) - 2)}
        loaders = calls & {"torch.load", "np.load", "numpy.load", "jit.load"}
        assert not loaders, f"{name} calls {loaders}"


def test_header_limits_are_checked_before_parsing(tmp_path, monkeypatch):
    """A header longer than the file, or over 100 MB, is refused having read only the first 8 bytes."""
    longer = str(tmp_path / "longer.safetensors")
    header_longer_than_file(longer, None)
    huge = str(tmp_path / "huge.safetensors")
    header_over_100mb(huge, None)
    reads = []

    class Spy(io.FileIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    monkeypatch.setattr(model.loader, "open", lambda path, mode="r": Spy(path, mode.replace("b", "")), raising=False)
    monkeypatch.setattr(model.loader.json, "loads", lambda *a, **k: pytest.fail("the header was parsed"))
    for path, claimed in [(longer, 5000), (huge, 120_000_000)]:
        reads.clear()
        with pytest.raises(model.loader.CheckpointError, match=f"claims {claimed} bytes"):
            model.loader.read_header(path)
        assert reads and max(reads) <= 8, reads


def test_valid_file_is_never_mistaken_for_a_pickle(tmp_path):
    """A valid file whose header length starts with the byte 0x80 (pickle's PROTO opcode): 1 in 32
    of real files, since safetensors pads its header to a multiple of 8 bytes."""
    path = str(tmp_path / "model.safetensors")
    for n in range(400):
        save_file({"w": torch.arange(3.0)}, path, metadata={"pad": "x" * n})
        if Path(path).read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no header length starting with 0x80 in range: widen the search")
    assert model.loader.read_header(path)["__metadata__"]["pad"] == "x" * n


# ---------------------------------------------------------------------------------------------
# Saving: atomic, kill -9, resume, Ctrl-C, disk full, out of memory

def train_command(root, out, *extra, steps=2):
    return script(root, "train.py") + ["photo.png", PROMPT, "--steps", str(steps), "--lr", "1e-4", "--seed", "3",
                                       "--out", out, *extra]


@pytest.mark.full
def test_kill_9_then_resume_matches_an_uninterrupted_run(root, tmp_path):
    """No --save-every: the resume state that --state-every saves (every 30 minutes by default; here
    after every step) is what a kill -9 leaves."""
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd = str(tmp_path)
    killed_out, state = tmp_path / "killed" / "castle.safetensors", tmp_path / "killed" / "castle.resume.safetensors"
    # The uninterrupted reference runs at the same time as the run that gets killed.
    reference_log = open(tmp_path / "reference.txt", "w+")
    reference = subprocess.Popen(train_command(root, "ref/castle.safetensors"), cwd=cwd, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=reference_log, text=True)
    victim = subprocess.Popen(train_command(root, str(killed_out), "--state-every", "1e-6"), cwd=cwd, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 500
        while not state.exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL, "training ended before the kill: no resume state seen"
    finally:
        if victim.poll() is None:
            victim.kill()
    assert state.exists() and killed_out.exists(), sorted(os.listdir(killed_out.parent))
    _, state_metadata = load_tensors(str(state))
    step1, metadata1 = load_tensors(str(killed_out))
    assert state_metadata["step"] == "1" and metadata1["steps"] == "1"

    # The file left by the killed run works in edit.py.
    result = run(root, "edit.py", "--target", "... in snow", "--finetuned", str(killed_out), "--steps", "2",
                 "--height", "64", "--width", "64", "--out", "pngs", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(os.path.join(cwd, result.stdout.strip()))

    resumed = subprocess.run(train_command(root, str(killed_out), "--resume"), cwd=cwd, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference.wait(timeout=600)
    reference_log.close()
    assert reference.returncode == 0, (tmp_path / "reference.txt").read_text()[-2000:]
    assert load_tensors(str(state))[1]["step"] == "2", "a finished run keeps its resume state, to be extended"
    assert not [n for n in os.listdir(killed_out.parent) if n.startswith("castle-")], "--save-every keeps checkpoints"

    final, metadata = load_tensors(str(killed_out))
    expected, expected_metadata = load_tensors(str(tmp_path / "ref" / "castle.safetensors"))
    assert metadata["steps"] == expected_metadata["steps"] == "2"
    assert final.keys() == expected.keys()
    different = [k for k in final if not torch.equal(final[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    assert any(not torch.equal(final[k], step1[k]) for k in final), "the resumed run did not train"
    assert any(final[k].abs().max() > 0 for k in final), "no weight moved"

    # The loss log goes on where the resumed step left off: each step once, the same losses as the reference's.
    logs = [Path(tmp_path, folder, "castle.loss.csv").read_text().splitlines() for folder in ("killed", "ref")]
    assert [line.split(",")[0] for line in logs[0]] == ["step", "0", "1", "2"]
    assert [line.split(",")[:3] for line in logs[0]] == [line.split(",")[:3] for line in logs[1]]


def start_training(root, cwd, out, *extra, steps, wait_for=None):
    """Start train.py; return (process, stderr file) once it trains (or once wait_for exists)."""
    log = open(os.path.join(cwd, f"stderr-{time.monotonic_ns()}.txt"), "w+")
    process = subprocess.Popen(train_command(root, out, *extra, steps=steps), cwd=cwd, env=ENV,
                               stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 300
    ready = lambda: os.path.exists(wait_for) if wait_for else "fine-tuning" in Path(log.name).read_text()
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, f"train.py ended before it was interrupted:\n{Path(log.name).read_text()}"
    return process, log


def finish(process, log):
    try:
        stdout, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    log.close()
    return stdout, Path(log.name).read_text()


@pytest.mark.full
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_saves_exits_nonzero_and_says_how_to_resume(root, tmp_path, signum):
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd, out = str(tmp_path), tmp_path / "ft" / "castle.safetensors"
    process, log = start_training(root, cwd, "ft/castle.safetensors", steps=3)
    process.send_signal(signum)
    stdout, stderr = finish(process, log)
    assert process.returncode == 128 + signum, stderr[-2000:]  # 130 and 143, as shells expect
    assert stdout == "", "nothing on stdout: a chained command must not take the model as finished"
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    (stopping,) = [i for i, l in enumerate(stderr.splitlines()) if l.startswith(f"{name}: stopping after this step")]
    (said,) = [i for i, l in enumerate(stderr.splitlines()) if "interrupted at step" in l]
    assert stopping < said
    line = stderr.splitlines()[said]
    assert "--resume" in line and "ft/castle.safetensors" in line
    _, metadata = load_tensors(str(out))
    _, state_metadata = load_tensors(str(tmp_path / "ft" / "castle.resume.safetensors"))
    step = int(metadata["steps"])  # 1 unless the signal beat the first step
    assert step < 3 and state_metadata["step"] == str(step) and metadata["planned_steps"] == "3"

    # edit.py says that the model is unfinished, and goes on
    result = run(root, "edit.py", "--target", "... in snow", "--finetuned", str(out), "--steps", "1",
                 "--height", "64", "--width", "64", "--out", "pngs", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"unfinished, trained for {step} of 3 steps" in result.stderr

    # The printed command continues the run to the end.
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:2] == script(root, "train.py"), "as the user ran it"
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ft/castle.safetensors"
    _, metadata = load_tensors(str(out))
    assert metadata["steps"] == metadata["planned_steps"] == "3"
    assert load_tensors(str(tmp_path / "ft" / "castle.resume.safetensors"))[1]["step"] == "3", "kept, to extend"


@pytest.mark.full
def test_an_unfinished_run_is_never_replaced_without_a_word(root, tmp_path):
    """The same command again is refused with the --resume command; --overwrite starts over and says
    in one line that the unfinished run is replaced once it saves."""
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd, state = str(tmp_path), tmp_path / "ft" / "castle.resume.safetensors"
    process, log = start_training(root, cwd, "ft/castle.safetensors", "--save-every", "1", steps=50,
                                  wait_for=str(state))
    process.send_signal(signal.SIGTERM)
    finish(process, log)
    assert process.returncode == 143
    done = load_tensors(str(state))[1]["step"]

    command = train_command(root, "ft/castle.safetensors", "--save-every", "1", steps=50)
    before = snapshot(cwd)
    again = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    line = error_line(again.stderr)
    assert again.returncode != 0 and not changes(before, snapshot(cwd))
    assert f"unfinished run (saved at step {done} of 50)" in line and "--overwrite" in line, line
    offered = shlex.split(line.split("continue it with: ", 1)[1])
    assert offered[2:] == command[2:] + ["--resume"], "the command as given, plus --resume"

    over = subprocess.run(train_command(root, "ft/castle.safetensors", "--overwrite", steps=2), cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert over.returncode == 0, over.stderr[-2000:]
    said = [l for l in over.stderr.replace("\r", "\n").splitlines() if l.startswith("--overwrite")]
    assert len(said) == 1 and f"the unfinished run (at step {done} of 50)" in said[0], said
    assert "replaced when this run first saves" in said[0]
    assert load_tensors(str(state))[1]["step"] == "2", "the new run's state"
    assert load_tensors(str(tmp_path / "ft" / "castle.safetensors"))[1]["steps"] == "2"


@pytest.mark.full
def test_a_second_run_on_the_same_out_is_refused_naming_the_first(root, tmp_path):
    """Two real processes: while one trains, another aimed at its file (even with --overwrite or
    --resume) is refused in one line that names the first's pid, and changes nothing; once the first
    has ended, its file can be extended."""
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd = str(tmp_path)
    first, log = start_training(root, cwd, "ft/castle.safetensors", steps=100_000)  # stopped below
    try:
        ours = lambda: {k: v for k, v in snapshot(os.path.join(cwd, "ft")).items() if "loss.csv" not in k}  # it logs
        before = ours()
        for extra in ([], ["--overwrite"], ["--resume"]):
            second = subprocess.run(train_command(root, "ft/castle.safetensors", *extra, steps=3), cwd=cwd, env=ENV,
                                    capture_output=True, text=True, timeout=600)
            line = error_line(second.stderr)
            assert second.returncode != 0 and second.stdout == "", line
            assert f"being trained by another run (pid {first.pid}" in line and "another --out" in line, line
        assert first.poll() is None, "the first run ended before the second runs were tried"
        assert not changes(before, ours()), "the second run touched the first's files"
    finally:
        first.send_signal(signal.SIGTERM)
        finish(first, log)
    assert first.returncode == 143
    assert not (tmp_path / "ft" / "castle.lock").exists(), "the lock goes with its run"
    done = int(load_tensors(str(tmp_path / "ft" / "castle.resume.safetensors"))[1]["step"])
    extended = subprocess.run(train_command(root, "ft/castle.safetensors", "--resume", steps=done + 1), cwd=cwd,
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert extended.returncode == 0, extended.stderr[-2000:]


@pytest.mark.full
def test_sigterm_then_resume_matches_an_uninterrupted_run(root, tmp_path):
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd = str(tmp_path)
    reference = subprocess.Popen(train_command(root, "ref/castle.safetensors", steps=3), cwd=cwd, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    process, log = start_training(root, cwd, "cut/castle.safetensors", steps=3)
    process.send_signal(signal.SIGTERM)
    finish(process, log)
    assert process.returncode == 143
    resumed = subprocess.run(train_command(root, "cut/castle.safetensors", "--resume", steps=3), cwd=cwd, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    final, metadata = load_tensors(str(tmp_path / "cut" / "castle.safetensors"))
    expected, _ = load_tensors(str(tmp_path / "ref" / "castle.safetensors"))
    assert metadata["steps"] == "3"
    different = [k for k in final if not torch.equal(final[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.mark.full
def test_chained_edit_does_not_run_after_an_interrupted_training(root, tmp_path):
    """Ctrl-C in a terminal reaches the whole foreground process group: here the shell and train.py."""
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    chain = (shlex.join(train_command(root, "ft/castle.safetensors", steps=3)) + " && " +
             shlex.join(script(root, "edit.py") + ["--target", "... in snow", "--finetuned", "ft/castle.safetensors",
                                                  "--steps", "1", "--height", "64", "--width", "64", "--out", "pngs"]))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        shell = subprocess.Popen(["bash", "-c", chain], cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE,
                                 stderr=err, text=True, start_new_session=True)
        deadline = time.time() + 300
        while "fine-tuning" not in log.read_text() and shell.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(shell.pid, signal.SIGINT)
        stdout, _ = shell.communicate(timeout=300)
    assert shell.returncode != 0 and stdout == "", log.read_text()[-2000:]
    assert not (tmp_path / "pngs").exists(), "edit.py ran on an unfinished model"
    assert (tmp_path / "ft" / "castle.safetensors").exists(), "the interrupted run saved"


@pytest.mark.full
def test_second_ctrl_c_stops_at_once_and_keeps_the_last_save(root, tmp_path):
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd, out = str(tmp_path), tmp_path / "ft" / "castle.safetensors"
    process, log = start_training(root, cwd, "ft/castle.safetensors", "--save-every", "1", steps=50,
                                  wait_for=str(tmp_path / "ft" / "castle.resume.safetensors"))
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = finish(process, log)
    assert process.returncode == 130 and stdout == "", stderr[-2000:]
    assert "Traceback" not in stderr
    assert not [n for n in os.listdir(out.parent) if n.startswith(".tmp")], "a half-written file was left"
    tensors, metadata = load_tensors(str(out))  # whichever save is there is whole
    assert int(metadata["steps"]) < 50 and all(torch.isfinite(t).all() for t in tensors.values())
    if "stopped at once" in stderr:
        assert "the last save, ft/castle.safetensors, is kept" in stderr


def resume_refusals():
    other_photo = lambda path, root: Image.fromarray(photo_array()[::-1].copy()).save(path)
    return [
        (["--resume", "--lr", "1e-3"], {}, ["--lr 0.001 (saved: 0.0001)"]),
        (["--resume", "--seed", "7"], {}, ["--seed 7 (saved: 3)"]),
        (["--resume", "--batch", "2"], {}, ["--batch 2 (saved: 1)"]),
        (["--resume", "--lora", "8"], {}, ["--lora 8 (saved: 0)"]),
        (["--resume", "--no-patch"], {}, ["patch-based training off (saved: on)"]),
        (["--resume", "--base", "{other_base}"], {}, ["--base is not the one it started with"]),
        (["--resume", "--image", "flipped.png"], {"flipped.png": other_photo}, ["the photo is not the one"]),
        (["--resume", "--prompt", "a photo of a [*] tower", "--lr", "1e-5"], {},
         ["the prompt 'a photo of a [*] tower' (saved: 'a photo of a [*] castle')", "--lr 1e-05 (saved: 0.0001)"]),
        (["--resume", "--steps", "1"], {}, ["--steps 1 is below the", "steps this run has done"]),
    ]


@pytest.mark.full
def test_resume_refuses_changed_arguments_and_a_smaller_plan(root, tmp_path):
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd = str(tmp_path)
    state = tmp_path / "ft" / "castle.resume.safetensors"
    process, log = start_training(root, cwd, "ft/castle.safetensors", "--save-every", "2", steps=6,
                                  wait_for=str(state))
    process.send_signal(signal.SIGTERM)
    finish(process, log)
    assert process.returncode == 143
    for extra, inputs, words in resume_refusals():
        for name, make in inputs.items():
            make(os.path.join(cwd, name), root)
        image = extra[extra.index("--image") + 1] if "--image" in extra else "photo.png"
        prompt = extra[extra.index("--prompt") + 1] if "--prompt" in extra else PROMPT
        options = [fill(a, root) for a in extra if a not in ("--image", image, "--prompt", prompt)]
        before = snapshot(cwd)
        result = subprocess.run(script(root, "train.py") + [image, prompt, "--lr", "1e-4", "--seed", "3",
                                                            "--out", "ft/castle.safetensors", *options],
                                cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
        line = error_line(result.stderr)
        assert result.returncode != 0 and result.stdout == "", line
        for word in words:
            assert word in line, f"{word!r} not in: {line}"
        assert not changes(before, snapshot(cwd)), f"{extra} changed files"

    # A larger --steps extends the run.
    result = subprocess.run(train_command(root, "ft/castle.safetensors", "--resume", steps=7), cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    _, metadata = load_tensors(str(tmp_path / "ft" / "castle.safetensors"))
    assert metadata["steps"] == metadata["planned_steps"] == "7"


@pytest.fixture
def tiny_training(root, monkeypatch, tmp_path):
    """What train.save needs, in-process: the tiny model, its optimizer and generator."""
    monkeypatch.setattr(cli, "PROGRAM_DIR", root)
    base = os.path.join(root, "weights", "tiny.safetensors")
    sd = load_sd(base)
    for module in sine.trainable_parts(sd).values():
        module.requires_grad_(True)
    optimizers = adamw.InBackward([p for _, p in train.trainable_parameters(sd)], lr=1e-6).per_weight
    args = train.parse_args(["photo.png", PROMPT, "--out", str(tmp_path / "ft.safetensors"), "--base", base,
                             "--steps", "10"])
    return args, sd, optimizers, torch.Generator().manual_seed(0)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["finetuned", "resume"])
def test_disk_full_while_saving_weights_keeps_the_earlier_file(tiny_training, tmp_path, monkeypatch, capsys, failing):
    args, sd, optimizers, generator = tiny_training
    Path(args.out).write_bytes(b"the previous save")
    state = train.resume_path(args.out)
    Path(state).write_bytes(b"the previous resume state")
    before = snapshot(str(tmp_path))

    def half_then_no_space(f, *args, **kwargs):  # as a write() fails on a full disk
        f.write(b"half a file")
        no_space()
    monkeypatch.setattr(finetuned_file if failing == "finetuned" else train, "write_safetensors", half_then_no_space)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.save(args, sd, optimizers, generator, 7, Image.fromarray(photo_array()), resumable=True, loss_before=0.1)
    line = exit_message(exit_info)
    assert capsys.readouterr().err == ""
    assert "No space left on device" in line and args.out in line and "intact" in line, line
    changed = changes(before, snapshot(str(tmp_path)))
    if failing == "finetuned":
        assert not changed, "the earlier files changed, or a temporary file was left"
    else:  # the fine-tuned file was saved whole before the resume state failed
        assert set(changed) == {os.path.basename(args.out)}, changed
        assert load_tensors(args.out)[1]["steps"] == "7"


# What outputs.write_png needs of an image's settings: those of a plain SD edit.
SETTINGS = {"target": "a castle", "negative": "", "finetuned": ["none"], "finetuned_prompt": [],
            "base": "weights/tiny.safetensors", "K": "400", "v": "0.7", "scale": 7.5, "steps": 2, "eta": 0.0,
            "seed": 0, "width": 64, "height": 64, "precision": "fp32", "device": "cpu", "tile_vae": False, "channels_last": False,
            "models": []}


def test_disk_full_while_saving_a_png_keeps_the_earlier_ones(tmp_path, monkeypatch):
    folder = str(tmp_path / "pngs")
    image = Image.fromarray(photo_array())
    first = outputs.write_png(image, folder, "seed0", SETTINGS)
    assert first == os.path.join(folder, "00000-seed0.png")
    before = snapshot(folder)

    def half_then_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        no_space()
    monkeypatch.setattr(Image.Image, "save", half_then_full)
    with pytest.raises(OSError, match="No space left on device"):  # edit.py's main makes it one line
        outputs.write_png(image, folder, "seed0", SETTINGS)
    assert not changes(before, snapshot(folder)), "the earlier PNG changed, or a partial PNG was left"


def test_png_names_are_never_reused_and_sort_by_run(tmp_path):
    folder = str(tmp_path / "pngs")
    os.makedirs(folder)
    open(os.path.join(folder, "00007-seed3.png"), "wb").close()  # an earlier run's
    open(os.path.join(folder, "notes.txt"), "wb").close()
    image = Image.fromarray(photo_array())
    paths = [outputs.write_png(image, folder, stem, {**SETTINGS, "seed": i}) for i, stem in
             enumerate(["seed0", "seed1", "seed0"])]
    assert [os.path.basename(p) for p in paths] == ["00008-seed0.png", "00009-seed1.png", "00010-seed0.png"]
    assert sorted(os.listdir(folder)) == ["00007-seed3.png", *map(os.path.basename, paths), "notes.txt"], \
        "a temporary file was left"
    for i, path in enumerate(paths):
        with Image.open(path) as png:
            assert json.loads(png.text["sine"])["seed"] == i


@pytest.fixture
def tmpfs(tmp_path):
    """A tiny RAM file system, when this machine lets us mount one (root in a container may not)."""
    mounts = []
    if not shutil.which("mount"):
        pytest.skip("no mount command")

    def mount(name, size):
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.full
def test_disk_really_full_and_read_only(root, tmp_path, tmpfs):
    """The same through the CLIs, on a real full disk and a real read-only one."""
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd = str(tmp_path)
    # train.py: the earlier fine-tuned file fills most of the disk; the save at step 1 (--save-every 1,
    # while the progress bar is up) does not fit. The error must still stand on a line of its own.
    earlier_size = os.path.getsize(os.path.join(root, "finetuned.safetensors"))
    disk = tmpfs("full", f"{earlier_size * 3 // 2 // 4096 * 4096}")
    earlier = disk / "castle.safetensors"
    shutil.copy(os.path.join(root, "finetuned.safetensors"), earlier)
    before = snapshot(str(disk))
    result = subprocess.run(train_command(root, str(earlier), "--overwrite", "--save-every", "1", steps=2), cwd=cwd,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]  # splitlines also splits at the bar's "\r"
    assert last.startswith("error:") and "could not save step 1" in last, last
    assert "No space left on device" in last and "intact" in last, last
    assert set(changes(before, snapshot(str(disk)))) == {"castle.loss.csv"}, "the earlier save changed"

    # edit.py: a PNG written earlier, and no room left.
    disk = tmpfs("pngs", "64k")
    Image.fromarray(photo_array()).save(disk / "seed0.png")
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # full
            pass
    before = snapshot(str(disk))
    result = run(root, "edit.py", "--target", "... in snow", "--finetuned", os.path.join(root, "finetuned.safetensors"),
                 "--steps", "1", "--height", "64", "--width", "64", "--out", str(disk), cwd=cwd)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "No space left on device" in last and "intact" in last, last
    assert not changes(before, snapshot(str(disk)))

    # Read-only: refused before any work, in one line.
    disk = tmpfs("readonly", "1m")
    (disk / "keep.txt").write_text("hello")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    before = snapshot(str(disk))
    for name, args in [("train.py", ["photo.png", PROMPT, "--out", str(disk / "ft" / "castle.safetensors")]),
                       ("edit.py", ["--target", "a castle", "--finetuned", "none", "--out", str(disk / "pngs")])]:
        result = run(root, name, *args, cwd=cwd)
        line = error_line(result.stderr)
        assert result.returncode != 0 and "cannot write" in line and "Read-only file system" in line, line
    assert not changes(before, snapshot(str(disk)))


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 68719476736 bytes."),
], ids=["cuda", "python", "cpu-allocator"])
def test_out_of_memory_says_what_to_lower(error, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        with cli.out_of_memory_hint("lower --height/--width"):
            raise error
    line = exit_message(exit_info)
    assert "out of memory" in line and "lower --height/--width" in line


def test_other_runtime_errors_are_not_called_out_of_memory():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with cli.out_of_memory_hint("lower --height/--width"):
            raise RuntimeError("shape mismatch")


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("checkpointing, hint", [pytest.param("--no-grad-checkpointing", "turn it on", marks=pytest.mark.full),
                                                 ("--grad-checkpointing", "GPU with more memory")])
def test_out_of_memory_while_training(root, tmp_path, monkeypatch, capsys, checkpointing, hint):
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "PROGRAM_DIR", root)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(sine, "step_loss", oom)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["photo.png", PROMPT, "--steps", "5", checkpointing])
    line = exit_message(exit_info)
    assert "error" not in capsys.readouterr().err
    assert "out of memory" in line and hint in line, line
    assert not os.path.exists(tmp_path / "finetuned"), "nothing is saved, and no folder is made"


def test_out_of_memory_while_sampling(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "PROGRAM_DIR", root)
    monkeypatch.setattr(sine, "edit", oom)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        edit.main(["--target", "... in snow", "--finetuned", os.path.join(root, "finetuned.safetensors"),
                   "--height", "128", "--width", "192", "--steps", "1"])
    line = exit_message(exit_info)
    assert "error" not in capsys.readouterr().err
    assert "out of memory" in line and "192x128" in line and "--height" in line and "--width" in line, line
    assert not os.path.exists(tmp_path / "outputs"), "no PNG, and no folder is made"


# ---------------------------------------------------------------------------------------------
# Divergence: a run whose numbers turn nan or inf never writes them, and edit.py never renders them

def last_line(stderr):
    """The CLI's complaint after its progress output: the last line, the only error, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert sum("error" in line for line in lines) == 1, stderr
    return lines[-1]


def all_finite(folder):
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name.endswith(".safetensors"):
                tensors, _ = load_tensors(os.path.join(dirpath, name))
                assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), name


@pytest.mark.parametrize("options, when", [
    ((), "the loss became"),                          # weights blow up; the next forward gives nan
    (("--save-every", "1"), "holds nan or inf"),      # the save after step 1 meets an fp16 overflow
], ids=["nan-loss", "save-every"])
@pytest.mark.full
def test_diverging_run_stops_and_keeps_the_last_good_save(root, tmp_path, options, when):
    Image.fromarray(photo_array()).save(tmp_path / "photo.png")
    cwd = str(tmp_path)
    good = run(root, "train.py", "photo.png", PROMPT, "--steps", "1", "--out", "ft/castle.safetensors", cwd=cwd)
    assert good.returncode == 0, good.stderr[-2000:]
    before = snapshot(cwd)

    result = run(root, "train.py", "photo.png", PROMPT, "--steps", "4", "--lr", "1e12", "--out",
                 "ft/castle.safetensors", "--overwrite", *options, cwd=cwd)
    line = last_line(result.stderr)
    assert result.returncode != 0 and result.stdout == ""
    assert line.startswith("error: training diverged") and when in line and "--lr" in line, line
    assert "the earlier run's files are kept as they were" in line, line
    # Nothing changed, the loss log included: it stays the earlier run's, beside the earlier model.
    assert not changes(before, snapshot(cwd)), "the earlier run changed"

    # With nothing saved before, no weights are written at all.
    result = run(root, "train.py", "photo.png", PROMPT, "--steps", "4", "--lr", "1e12", "--out",
                 "fresh/castle.safetensors", *options, cwd=cwd)
    line = last_line(result.stderr)
    assert result.returncode != 0 and "nothing was saved" in line, line
    assert [files for _, _, files in os.walk(tmp_path / "fresh") if files] == [["castle.loss.csv"]]
    steps = [row.split(",")[0] for row in (tmp_path / "fresh" / "castle.loss.csv").read_text().splitlines()]
    assert steps[:3] == ["step", "0", "1"] and len(steps) < 2 + 4, "the log of the run that diverged"
    all_finite(cwd)


def test_edit_refuses_a_finetuned_file_with_nan(root, tmp_path):
    tensors, metadata = load_tensors(os.path.join(root, "finetuned.safetensors"))
    key = sorted(tensors)[len(tensors) // 2]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=metadata)
    result = run(root, "edit.py", "--target", "... in snow", "--finetuned", "broken.safetensors", "--steps", "2",
                 "--height", "64", "--width", "64", "--out", "pngs", cwd=str(tmp_path))
    line = error_line(result.stderr)
    assert result.returncode != 0 and result.stdout == ""
    assert "broken.safetensors" in line and "nan or inf" in line and key in line, line
    assert not os.path.exists(tmp_path / "pngs")


def test_a_sample_that_turns_nan_writes_no_png(root, tmp_path):
    from model.loader import CONFIG_KEY
    from model.tiny import random_state_dict
    state = random_state_dict(TINY, seed=0)
    state["model.diffusion_model.out.2.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan-base.safetensors"), metadata={CONFIG_KEY: TINY.to_json()})
    result = run(root, "edit.py", "--target", "a castle", "--finetuned", "none", "--base", "nan-base.safetensors",
                 "--steps", "2", "--height", "64", "--width", "64", "--out", "pngs", cwd=str(tmp_path))
    line = last_line(result.stderr)
    assert result.returncode != 0 and result.stdout == ""
    assert "nan or inf" in line and "no PNG" in line, line
    assert not os.path.exists(tmp_path / "pngs")


# ---------------------------------------------------------------------------------------------
# Surprises: what an experienced SD user expects

def test_typographic_ellipsis_continues_the_training_prompt():
    assert sine.target_prompt("\u2026 wearing a hat", "a photo of a [*] cat") == "a photo of a cat wearing a hat"
    assert sine.target_prompt("... wearing a hat", "a photo of a [*] cat") == "a photo of a cat wearing a hat"


@pytest.mark.parametrize("height, width, expected", [(None, 512, (320, 512)), (512, None, (512, 768)),
                                                     (None, None, (512, 768)), (256, 1024, (256, 1024))])
def test_one_given_side_keeps_the_photos_aspect(height, width, expected):
    assert pictures.default_size((451, 300), height, width) == expected  # (w, h) of the photo -> (height, width)


@pytest.mark.parametrize("capability, native", [((6, 1), False), ((7, 0), False), ((7, 5), False), ((8, 0), True),
                                                ((9, 0), True)], ids=["P100", "V100", "T4", "A100", "H100"])
def test_bf16_by_default_only_on_gpus_that_compute_it_natively(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says even on a T4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU-only torch warns that CUDA autocast is unavailable
        assert (cli.bf16_autocast(torch.device("cuda")) is not None) == native
        assert cli.bf16_autocast(torch.device("cuda"), enabled=True) is not None  # --bf16 still asks for it
    assert cli.bf16_autocast(torch.device("cpu")) is None
    # edit.py: fp16 where bf16 is not native; the fine-tuned UNets in fp16, which keeps their fine-tuning
    fast = torch.bfloat16 if native else torch.float16
    assert cli.sampling_precision(torch.device("cuda")) == cli.Precision(fast, torch.float16)


@pytest.mark.parametrize("flags, native", [("fpu sse avx2", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_bf16 amx_tile", True)], ids=["AVX2", "AVX512-BF16", "AMX"])
def test_edit_defaults_to_bf16_on_cpus_that_compute_it_natively(monkeypatch, tmp_path, flags, native):
    """Measured (BENCHMARKS.md): a whole edit about 2x faster in bf16 on an AVX512-BF16 CPU.
    train.py keeps fp32 on every CPU: there bf16 gains less and peaks higher."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    assert cli.cpu_has_native_bf16() == native
    cpu = torch.device("cpu")
    fast = torch.bfloat16 if native else torch.float32
    assert cli.sampling_precision(cpu) == cli.Precision(fast, torch.float32)  # the fine-tuned UNets: fp32
    assert cli.sampling_precision(cpu, "fp32") == cli.Precision(torch.float32, torch.float32)  # --no-bf16
    assert cli.bf16_autocast(cpu) is None                                   # train.py


@pytest.mark.full
def test_a_long_prompt_warns_in_one_plain_line(root, tmp_path):
    result = run(root, "edit.py", "--target", " ".join(["castle"] * 90), "--finetuned", "none", "--steps", "1",
                 "--height", "64", "--width", "64", "--out", "pngs", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "75 tokens" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: CLIP reads at most 75 tokens"), result.stderr
    assert "UserWarning" not in result.stderr and "warn(" not in result.stderr
    precision = "bf16" if cli.cpu_has_native_bf16() else "fp32"  # edit.py's CPU default for plain SD
    assert result.stderr.count("precision: ") == 1 and f"precision: {precision} on cpu" in result.stderr


def test_ctrl_c_in_edit_keeps_the_pngs_written(root, tmp_path):
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        process = subprocess.Popen(script(root, "edit.py") + ["--target", "a castle", "--finetuned", "none",
                                   "--steps", "3", "--height", "64", "--width", "64", "--n", "200", "--out", "pngs"],
                                   cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
        first = process.stdout.readline().strip()  # the first PNG is written
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=300)
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    printed = [first] + rest.split()
    assert all(os.path.isfile(tmp_path / p) for p in printed)
    assert sorted(os.listdir(tmp_path / "pngs")) == sorted(os.path.basename(p) for p in printed)
    assert f"the {len(printed)} PNG(s) written so far are kept" in stderr.splitlines()[-1]


def test_a_ctrl_c_while_a_png_is_written_waits_for_it_to_be_reported():
    """The race CI once hit: Ctrl-C right after a PNG was printed, before it was counted."""
    reported = []
    with pytest.raises(KeyboardInterrupt):
        with cli.hold_ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a signal is handled between bytecodes: give it every chance
            reported.append("seed0.png")
    assert reported == ["seed0.png"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back
    with cli.hold_ctrl_c():
        reported.append("seed1.png")  # no Ctrl-C: nothing is raised
    assert reported == ["seed0.png", "seed1.png"]


@pytest.mark.full
def test_edit_reads_an_ellipsis_and_keeps_the_aspect_of_one_given_side(root, tmp_path):
    """Through the CLI: "…" continues the training prompt; --width alone keeps the photo's 4:3."""
    result = run(root, "edit.py", "--target", "\u2026 in snow", "--finetuned", os.path.join(root, "finetuned.safetensors"),
                 "--steps", "1", "--width", "256", "--out", "pngs", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = result.stdout.split()
    with Image.open(tmp_path / path) as image:
        assert image.size == (256, 192)  # the photo is 64 x 48
        assert json.loads(image.text["sine"])["target"] == "a photo of a castle in snow"


def test_the_finetuned_model_samples_with_the_prompt_it_is_given(root, tmp_path, monkeypatch, capsys):
    """Content removal (Sec. 4.4): the fine-tuned model is asked for "a [*] castle", not its training
    prompt; the guide's context is that prompt's encoding, and the PNG records it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "PROGRAM_DIR", root)
    contexts = []
    real_init = sine.Guide.__init__
    monkeypatch.setattr(sine.Guide, "__init__", lambda self, unet, context, *a, **k: contexts.append(context) or
                        real_init(self, unet, context, *a, **k))
    edit.main(["--target", "a castle", "--finetuned", os.path.join(root, "finetuned.safetensors"),
               "--finetuned-prompt", "a [*] tower", "--steps", "1", "--height", "64", "--width", "64"])
    (path,) = capsys.readouterr().out.split()
    sd = load_sd(os.path.join(root, "weights", "tiny.safetensors"))
    with torch.no_grad():
        expected = sd.text_encoder(sd.tokenizer(["a sks tower"]))
        training = sd.text_encoder(sd.tokenizer([sine.training_prompt(PROMPT)]))
    (context,) = contexts
    torch.testing.assert_close(context, expected)  # the fine-tuned file's differences are zero here
    assert not torch.allclose(context, training)
    with Image.open(path) as image:
        assert json.loads(image.text["sine"])["finetuned_prompt"] == ["a [*] tower"]


def test_steps_strip_shows_every_step_and_marks_the_guided_ones(root, tmp_path):
    result = run(root, "edit.py", "--target", "... in snow", "--finetuned", os.path.join(root, "finetuned.safetensors"),
                 "--steps", "12", "--K", "500", "--height", "64", "--width", "128", "--strip", "--out", "pngs",
                 cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    image_path, strip_path = result.stdout.split()
    image_name, strip_name = os.path.basename(image_path), os.path.basename(strip_path)
    assert strip_name[len("00001-"):] == image_name[len("00000-"):-len(".png")] + "-steps.png"  # the next number
    band = pictures.LABEL_HEIGHT  # each row of cells has its labels in a band above it
    with Image.open(tmp_path / strip_path) as strip:
        # 12 steps, 10 a row; under each step three rows: the pre-trained and the fine-tuned model alone
        # in Eq. 3, and the fine-tuned model's own guidance, which the last steps (unguided) do not need
        assert strip.size == (10 * 128, (4 + 1) * (band + 64))
    from model.ddim import ddim_timesteps
    is_guided = [t > 500 for t in ddim_timesteps(12).tolist()]
    assert 0 < sum(is_guided) < 12
    pixels = np.asarray(Image.open(tmp_path / strip_path).convert("L"))

    def cell(step, row):  # (label band, picture) of a step's row: 0 the mix, 1 and 2 each model alone, 3 own CFG
        r, c = divmod(step, 10)
        top = (4 * r + row) * (band + 64)
        return pixels[top:top + band, c * 128:(c + 1) * 128], pixels[top + band:top + band + 64, c * 128:(c + 1) * 128]

    # the labels: those of guided steps are longer ("t=917 guided"), so their text reaches further right
    label_width = [int(np.flatnonzero((cell(i, 0)[0] < 128).any(axis=0)).max()) for i in range(12)]
    assert [w > min(label_width) + 30 for w in label_width] == is_guided
    for i, guided in enumerate(is_guided):  # each model alone: under guided steps only, labelled
        for row in (1, 2, 3):
            label, picture = cell(i, row)
            assert (label < 128).any() == guided and (picture != 255).any() == guided
