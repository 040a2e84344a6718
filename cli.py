"""What train.py and edit.py share: finding files, choosing a device, and failing politely.

A user's mistake ends the program with one line on stderr that says what to do, never a traceback.
"""
import glob
import os
import sys
import tempfile
from contextlib import contextmanager

import torch

from model.loader import CheckpointError, read_header

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
FINETUNED_DIR = "finetuned"


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def say(message):
    print(message, file=sys.stderr)


def is_finetuned(path):
    return "sine.finetuned" in (read_header(path).get("__metadata__") or {})


def find_base(path=None):
    """--base if given, else the one SD v1 .safetensors file in weights/."""
    if path:
        return path
    candidates = sorted(p for p in glob.glob(os.path.join(WEIGHTS_DIR, "*.safetensors")) if not _safe_is_finetuned(p))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(os.path.basename(p) for p in candidates) or "no .safetensors file"
    raise CheckpointError(f"weights/ holds {found}: put exactly one SD v1 .safetensors file there, "
                          "or choose one with --base PATH (see README: Weights)")


def _safe_is_finetuned(path):
    try:
        return is_finetuned(path)
    except CheckpointError:
        return False


@contextmanager
def out_of_memory_hint(hint):
    """Turn running out of GPU or CPU memory into one line saying what to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError):
        fail(f"out of memory: {hint}")
    except RuntimeError as e:
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        fail(f"out of memory: {hint}")


def pick_device(name=None):
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_writable_folder(path):
    """Make path's folder if needed and prove we can write there, before hours of work are spent."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"cannot write to {folder} ({e.strerror}): choose another place with --out") from None
