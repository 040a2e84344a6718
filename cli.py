"""What train.py and edit.py share: finding files, choosing a device, memory pages, failing
politely (checked arguments, one-line warnings, Ctrl-C), reading any photo, and the speed switches.

A user's mistake ends the program with one line on stderr that says what to do, never a traceback.
"""
import argparse
import ctypes
import glob
import hashlib
import json
import os
import signal
import sys
import tempfile
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from model.loader import AUTOCAST_LAYERS, CheckpointError, fingerprint, read_header

PROGRAM_DIR = os.path.dirname(os.path.abspath(__file__))  # its weights/ holds the checkpoints
FINETUNED_DIR = "finetuned"


def fail(message):
    """End the program. sys.exit prints the message on stderr on the way out, after any progress
    bar has closed, so that the line stands alone."""
    sys.exit(f"error: {message}")


def say(message):
    print(message, file=sys.stderr)


def is_finetuned(path):
    return "sine.finetuned" in (read_header(path).get("__metadata__") or {})


TOY_BASE = "toy-base.safetensors"  # the toy world's base, committed in weights/; used only when named


MODEL_FOLDERS = "SINE_MODELS"  # the environment variable naming more folders of models, as PATH does


def model_folders():
    """weights/ beside the program, then each folder in $SINE_MODELS (separated by ':', ';' on Windows),
    e.g. AUTOMATIC1111's models/Stable-diffusion: searched for bases and fine-tuned files alike."""
    extra = [folder for folder in os.environ.get(MODEL_FOLDERS, "").split(os.pathsep) if folder]
    return [os.path.join(PROGRAM_DIR, "weights"), *extra]


def find_model(path):
    """A --base or --finetuned as given; a name that is not a file there is looked for in
    finetuned/ and in model_folders()."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    for folder in (FINETUNED_DIR, *model_folders()):
        if os.path.isfile(os.path.join(folder, path)):
            return os.path.join(folder, path)
    return path


def find_base(path=None):
    """--base if given, else the one SD v1 .safetensors file in weights/ or $SINE_MODELS's folders
    (the toy base does not count)."""
    if path:
        return find_model(path)
    candidates = sorted(p for folder in model_folders() for p in glob.glob(os.path.join(folder, "*.safetensors"))
                        if os.path.basename(p) != TOY_BASE and not _safe_is_finetuned(p))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(os.path.basename(p) for p in candidates) or "no SD v1 .safetensors file"
    where = f"weights/ and ${MODEL_FOLDERS} hold" if len(model_folders()) > 1 else "weights/ holds"
    raise CheckpointError(f"{where} {found}: put exactly one SD v1 .safetensors file there, or choose one "
                          f"with --base NAME (see README: Weights; the toy world's is weights/{TOY_BASE})")


def _safe_is_finetuned(path):
    try:
        return is_finetuned(path)
    except CheckpointError:
        return False


# ---------------------------------------------------------------------------------------------
# Files named by their fingerprint: a fine-tuned file names its base so, and a PNG each file it used

def recorded_path(path):
    """How a PNG records a file's place: from the program's folder if the file lies inside it, else
    by its name alone. Never an absolute path: a PNG shared online must not show the user's folders."""
    inside = os.path.relpath(os.path.abspath(path), PROGRAM_DIR)
    return inside if not inside.startswith(os.pardir) else os.path.basename(path)


def path_from(path, folder):
    """path from folder (edit.py records each file so from its PNG's folder too); None where there is
    no relative path (another drive on Windows)."""
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    except ValueError:
        return None


def model_hash(path):
    """AUTOMATIC1111's "Model hash", which civitai matches: the first 10 hex digits of the file's
    SHA-256. Hashing 4 GB takes seconds, so each hash is kept in weights/.hashes.json, by the file's
    path, size and time; where that cannot be written, it is hashed again next time."""
    stat, cache_path = os.stat(path), os.path.join(PROGRAM_DIR, "weights", ".hashes.json")
    key = f"{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns}"
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()[:10]
        try:
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(cache_path), delete=False) as f:
                json.dump(cache, f)
            os.replace(f.name, cache_path)
        except OSError:
            pass
    return cache[key]


def safe_fingerprint(path):
    """A file's fingerprint, or None for anything that is not a readable safetensors file."""
    try:
        read_header(path)  # validates first: fingerprint() trusts the header's length
        return fingerprint(path)
    except (CheckpointError, OSError):
        return None


def places(paths=(), folders=("weights", FINETUNED_DIR), near=None):
    """Where to look for a file: each of paths (from the program's folder, or as given), then every
    .safetensors file in folders, in near, the working folder and beside the program, and in
    $SINE_MODELS's folders. Each once, in that order."""
    found = [p for path in paths if path for p in (os.path.join(PROGRAM_DIR, path), path)]
    for folder in folders:
        for root in (near or PROGRAM_DIR, os.getcwd(), PROGRAM_DIR):
            found += sorted(glob.glob(os.path.join(root, folder, "*.safetensors")))
    for folder in model_folders()[1:]:
        found += sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in found) if os.path.isfile(p)]


def find_by_fingerprint(fingerprint_wanted, paths=(), folders=("weights", FINETUNED_DIR), near=None):
    """The first of places() whose fingerprint is the one wanted; None if there is none."""
    return next((p for p in places(paths, folders, near) if safe_fingerprint(p) == fingerprint_wanted), None)


def base_of(finetuned_path, metadata, given=None):
    """The base a fine-tuned file was made from: --base if given (edit.py checks that it matches),
    else the file in weights/ or $SINE_MODELS whose fingerprint the fine-tuned file records."""
    if given:
        return find_model(given)
    found = find_by_fingerprint(metadata.get("base_fingerprint"), folders=("weights",))
    if found is None:
        raise ValueError(f"{finetuned_path} was fine-tuned from {metadata.get('base')} (fingerprint "
                         f"{metadata.get('base_fingerprint')}), which is not in weights/ or ${MODEL_FOLDERS}'s "
                         "folders: put it there, or pass it as --base")
    return found


@contextmanager
def out_of_memory_hint(hint):
    """Turn running out of GPU or CPU memory into one line saying what to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        # Drop the failed computation's frames: that frees its tensors and closes its progress bar.
        traceback.clear_frames(e.__traceback__)
        fail(f"out of memory: {hint}")


@contextmanager
def hold_ctrl_c():
    """Delay a Ctrl-C to the end of the block, so that it never falls between writing a file and
    reporting it. Like any signal handling, it works in the main thread only."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def use_huge_pages():
    """Let PyTorch put its large CPU tensors on 2 MB pages (Linux; elsewhere nothing changes).

    On a CPU, PyTorch's fp32 convolutions repack their weights into a fresh buffer on every call.
    With 4 kB pages the kernel must fault in and zero each new buffer page by page: 7 million page
    faults in a 256 x 256 edit, a sixth of its CPU time. With 2 MB pages, 0.3 million. The numbers
    computed are the same."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by PyTorch at each allocation


def use_threads(n=None):
    """--threads: PyTorch's CPU threads (None: its default, one a core). Each op splits its work over
    them and they wait for each other at its end: when other programs hold some cores, every op
    waits for the slowest. Measured on the toy's one-minute check: 70 s with 2 threads on 2 idle
    cores of an AMD EPYC, 88 s with 1; on a busy machine a user saw 3.6 s a training step with the
    default and the whole check in 94 s with 1."""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be at least 1 (got {n})")
        torch.set_num_threads(n)


def return_freed_memory():
    """Give the memory that a step has freed back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed blocks of up to 32 MB in its heap for reuse, and the next step's tensors often
    fit them badly: measured on a full-size LoRA step (fp32, CPU), 0.75 GB more stayed resident after
    each step, and the next step peaked that much higher (6.1 GB, not 5.5). The numbers are the same."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


def pick_device(name=None):
    """--device as given (cuda, cuda:1, mps, cpu), checked; else $SINE_DEVICE if set; else a CUDA GPU,
    else Apple's mps, else the CPU."""
    name = name or os.environ.get("SINE_DEVICE")
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: mps needs a Mac with Apple silicon; use --device cpu")
    if device.type not in ("cuda", "cpu", "mps"):
        raise ValueError(f"--device {name}: sine runs on cuda, mps or cpu")
    return device


MAX_SEED = 2 ** 64 - 1  # what torch.Generator.manual_seed accepts


def check_seed(seed, count=1, random_too=False):
    """seed, seed + 1, ..., seed + count - 1 must all be seeds that PyTorch accepts. random_too:
    the program also takes -1, which draws a seed, and the message says so."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise ValueError(f"--seed must be from 0 to {MAX_SEED - (count - 1)}{', or -1 for a random one' * random_too} "
                         f"(got {seed})")


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default after its text, unless the text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def plain_warnings():
    """Warnings a user sees are one line, 'warning: ...', without Python's file name and source line."""
    warnings.formatwarning = lambda message, *rest: f"warning: {message}\n"


def check_writable_folder(path):
    """Prove that path's folder can be made and written to, before hours of work are spent.

    Creates nothing: the folder itself is made when the first file is saved."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot write to {folder}: {existing} is a file, not a folder; "
                         "choose another place with --out")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"cannot write to {folder} ({e.strerror}): choose another place with --out") from None


# ---------------------------------------------------------------------------------------------
# Photos

def load_image(path, max_pixels=40_000_000):
    """Any photo as RGB, with its EXIF rotation applied and transparency on white. Refuses decompression bombs."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {'is a directory, not an image' if os.path.isdir(path) else 'no such file'}")
    Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves, with a clearer message
    try:
        image = Image.open(path)
    except OSError:
        raise ValueError(f"{path} is not an image that Pillow can read (JPEG, PNG, WebP, ...)") from None
    with image:
        if image.width * image.height > max_pixels:
            raise ValueError(f"{path} is {image.width}x{image.height}, over {max_pixels // 1_000_000} "
                             "megapixels; resize it first")
        try:
            image = ImageOps.exif_transpose(image)
            if image.mode == "I;16" or image.mode == "I":  # 16-bit grey: scale to 8 bits before RGB
                image = image.point(lambda v: v / 256).convert("L")
            if image.has_transparency_data:  # transparent parts become white, as an image viewer shows them
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
            return image.convert("RGB")
        except (OSError, SyntaxError):  # Pillow's errors for truncated or corrupt image data
            raise ValueError(f"{path} is damaged or truncated: Pillow cannot decode it") from None


# ---------------------------------------------------------------------------------------------
# Speed switches (tools/bench.py measures each, tests/test_fastpaths.py checks each)

def cpu_has_native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as Linux's /proc/cpuinfo says."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: assume not
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def bf16_autocast(device, enabled=None, cache=True):
    """train.py's bfloat16 autocast region for the UNet and text encoder passes, or None for fp32.

    Weights and optimizer state stay fp32 either way (lr 1e-6 updates would vanish in bf16 weights),
    and the VAE always runs in fp32. enabled=None chooses: on with a CUDA GPU that computes bf16
    natively (compute capability 8.0, Ampere, or newer; older GPUs such as the T4 or V100 only
    emulate it, slowly), off elsewhere: on a CPU, training in bf16 gains less and peaks higher. It
    changes the output slightly. (edit.py chooses with sampling_precision.)

    cache=False: autocast keeps no bf16 copy of each trainable weight for the whole forward pass
    (2 GB for SD v1). Under gradient checkpointing the copies would never be used again: backward
    casts afresh when it recomputes. The numbers are the same."""
    if enabled is None:
        enabled = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if enabled else None


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def fast_dtype(device):
    """The fastest dtype this device computes SD v1 in: bf16 where it is native (a CUDA GPU of compute
    capability 8.0 or newer, a CPU with AVX512-BF16 or AMX), fp16 on older CUDA GPUs (T4, V100) and
    Apple's mps, fp32 on other CPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class Precision:
    """What an edit samples in: the pre-trained UNet's dtype, and the fine-tuned UNets'. Text
    encoders, the VAE, the sampler and the guidance arithmetic stay fp32 in every case."""
    base: torch.dtype
    finetuned: torch.dtype

    def __str__(self):  # "bf16", or "bf16/fp32": how --precision takes it and the PNG records it
        names = [next(name for name, d in DTYPES.items() if d == dtype) for dtype in (self.base, self.finetuned)]
        return names[0] if names[0] == names[1] else "/".join(names)


def sampling_precision(device, choice="auto"):
    """--precision: auto, one of DTYPES for every UNet, or BASE/FINETUNED (e.g. bf16/fp32).

    auto: the pre-trained UNet in the device's fast dtype; the fine-tuned ones in a dtype that keeps
    what fine-tuning changed. At lr 1e-6 the weights move by about 1e-4, below bf16's rounding step
    for most of them: at full size, in the worst case, the fine-tuned model's own change to its noise
    prediction keeps a cosine of only 0.74 with fp32's in bf16, 0.997 in fp16 (BENCHMARKS.md,
    precision). So fp16 on GPUs and mps, where it is fast, and fp32 on CPUs, where fp16 is up to
    150 times slower."""
    if choice != "auto":
        names = choice.split("/")
        if len(names) not in (1, 2) or any(name not in DTYPES for name in names):
            raise ValueError(f"--precision {choice}: use auto, fp32, fp16, bf16, or BASE/FINETUNED such as bf16/fp32")
        return Precision(DTYPES[names[0]], DTYPES[names[-1]])
    keeps_finetune = torch.float32 if device.type == "cpu" else torch.float16
    return Precision(fast_dtype(device), keeps_finetune)


def autocast_to(device, dtype):
    """An autocast region computing in dtype, or None for fp32."""
    return None if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


class InPrecision(torch.nn.Module):
    """A UNet that runs under its own autocast region (none for fp32), whatever region calls it:
    edit.py's fine-tuned UNets keep their precision inside the pre-trained UNet's."""

    def __init__(self, unet, device, dtype):
        super().__init__()
        self.unet, self.device_type, self.dtype = unet, device.type, dtype

    def forward(self, *inputs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.unet(*inputs)


def speed_up(unet, channels_last=False, compile=False, weights_dtype=None):
    """Optional, in place. channels_last stores conv weights (and so activations) as NHWC, which
    some conv kernels prefer; compile has torch.compile fuse the UNet (minutes for the first call).

    weights_dtype (bf16 or fp16), for sampling under autocast to that dtype only (the weights are
    frozen there): autocast would round every Linear and Conv weight on every call, 1.7 GB of casts
    per UNet pass; rounding them once gives bitwise the same numbers, faster, in half the memory. Norm layers keep
    fp32 parameters, which autocast computes in fp32. Never for training: lr 1e-6 updates vanish in
    bf16 weights, so training keeps fp32 master weights and lets autocast cast them."""
    if weights_dtype is not None:
        for module in unet.modules():
            if isinstance(module, AUTOCAST_LAYERS):
                module.to(weights_dtype)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile()  # in place, so state_dict() keys stay the checkpoint's
    return unet
